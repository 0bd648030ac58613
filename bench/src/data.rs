//! `ddetr bench data`: the data path against its peers, in one run.
//!
//! 1. Train transform throughput on one core: decode (zune-jpeg) → flip/resize/crop (the
//!    two-tap AVX2 horizontal pass of `ddetr_dataset::upsample` when stretching, else
//!    fast_image_resize) → u8 batch → normalized float tensor, over 640×480 JPEGs from the
//!    peers' `make_shapes_jpegs.py` (ddetr's synth when the peers' Python is missing), with and
//!    without the normalize and stage by stage; the peer is the peers' `torchvision_pipeline.py`
//!    (PIL + torchvision) on the same files. Then the loader's throughput with 1 and 2 worker
//!    threads (`--loader-threads`).
//! 2. A COCO-train-sized annotation file (the peers' `make_big_coco_json.py`, run with the
//!    system `python3`; this part is left out, with a line saying so, where the peers folder is
//!    absent): cache build time, open time, and the extra resident memory of each additional
//!    process that maps the cache and reads every record; the peer is pycocotools loading the
//!    JSON (`pycocotools_load.py`).
//!
//! The last line is `key=value` pairs (`imgs_per_s_core=` first).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context as _};
use clap::Args;
use ddetr_dataset::cache::{self, Cache, CacheOptions};
use ddetr_dataset::image::decode_rgb8;
use ddetr_dataset::loader::{collate, Loader, LoaderMode, Meta};
use ddetr_dataset::rng::Rng;
use ddetr_dataset::synth::{self, SynthOptions};
use ddetr_dataset::transforms::{self, Sample};
use ddetr_dataset::{AugmentationConfig, DataSource, DatasetConfig};

use crate::peer::{self, PeerArgs};

#[derive(Debug, Args)]
pub struct DataBenchArgs {
    /// Synthetic 640x480 JPEGs for the transform benchmark.
    #[arg(long, default_value_t = 400)]
    pub images: usize,
    /// Working folder (default: a fresh temporary folder, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// Skip the COCO-train-sized annotation part.
    #[arg(long)]
    pub skip_big: bool,
    /// Additional reader processes that map the big cache.
    #[arg(long, default_value_t = 3)]
    pub readers: usize,
    /// Loader throughput runs with these worker-thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub loader_threads: Vec<usize>,
    /// Internal: run as one reader process on CACHE and print its memory figures.
    #[arg(long, value_name = "CACHE", hide = true)]
    pub reader: Option<PathBuf>,
}

/// (VmRSS, RssAnon, RssFile) in KiB from /proc/self/status.
fn rss_kib() -> (u64, u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"))
}

fn reader(path: &Path) -> anyhow::Result<()> {
    let before = rss_kib();
    let c = Cache::open(path)?;
    // Touch every record as a training epoch would.
    let mut acc = 0f64;
    for i in 0..c.len() {
        acc += c.images()[i].width as f64 + c.file_name(i).len() as f64;
        acc += c.boxes_of(i).iter().map(|b| b.bbox[2] as f64).sum::<f64>();
    }
    let after = rss_kib();
    println!(
        "reader rss_delta_kib={} anon_delta_kib={} file_delta_kib={} checksum={acc:.0}",
        after.0 - before.0,
        after.1 - before.1,
        after.2 - before.2
    );
    Ok(())
}

/// Runs a peer script on `arg` and returns the figures `keys` of the last line that has the
/// first of them.
fn run_peer(python: &Path, script: &Path, arg: &Path, keys: &[&str]) -> anyhow::Result<Vec<f64>> {
    let stdout = peer::output(
        Command::new(python)
            .arg(script)
            .arg(arg)
            .env("HF_HUB_OFFLINE", "1"),
        script,
    )?;
    let line = peer::line_with(&stdout, keys[0])?;
    keys.iter().map(|k| peer::figure(line, k)).collect()
}

pub fn run(args: &DataBenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.reader {
        return reader(path);
    }
    let tmp;
    let work = match &args.work {
        Some(w) => w.clone(),
        None => {
            tmp = tempfile_dir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut kv: Vec<(String, String)> = Vec::new();
    let peers = args.peer.dir();
    let python = args.peer.python(&[]);

    // 1. Transform throughput on one core, on the peer's JPEGs where its Python is there.
    let shapes = work.join("shapes640");
    let c = shapes_cache(args, python.as_deref(), &peers, &shapes, &work)?;
    tch::set_num_threads(1);
    // TAO's default augmentation, without fixed_padding (the peer does not pad either).
    let mut config = DatasetConfig {
        batch_size: 1,
        workers: 0,
        ..DatasetConfig::default()
    };
    config.augmentation.fixed_padding = false;
    let (ours, worker) = transform_throughput(&c, &config, &mut kv)?;
    if let Some(py) = &python {
        transform_peer(py, &peers, &shapes, ours, worker, &mut kv);
    }
    loader_throughput(&c, &config, &args.loader_threads, &mut kv)?;

    // 2. COCO-train-sized annotations.
    if !args.skip_big {
        big_annotations(args, python.as_deref(), &peers, &work, &mut kv)?;
    }
    let line: Vec<String> = kv.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("{}", line.join(" "));
    Ok(())
}

/// The 640×480 JPEG set (the peer's generator where its Python runs, else `ddetr dataset
/// synth`) and its packed cache.
fn shapes_cache(
    args: &DataBenchArgs,
    python: Option<&Path>,
    peers: &Path,
    shapes: &Path,
    work: &Path,
) -> anyhow::Result<Arc<Cache>> {
    if !shapes.join("annotations.json").exists() {
        let made_by_peer = python.is_some_and(|py| {
            Command::new(py)
                .arg(peers.join("make_shapes_jpegs.py"))
                .arg(&shapes)
                .arg(args.images.to_string())
                .status()
                .is_ok_and(|s| s.success())
        });
        if made_by_peer {
            println!(
                "images: {} 640x480 JPEGs from make_shapes_jpegs.py",
                args.images
            );
        } else {
            println!(
                "images: {} 640x480 JPEGs from ddetr dataset synth (make_shapes_jpegs.py not run)",
                args.images
            );
            synth::generate(
                shapes,
                &SynthOptions {
                    images: args.images,
                    width: 640,
                    height: 480,
                    classes: 3,
                    seed: 0,
                    tar: false,
                    ..Default::default()
                },
            )?;
        }
    }
    let src = DataSource {
        image_dir: shapes.join("images").display().to_string(),
        json_file: shapes.join("annotations.json").display().to_string(),
    };
    Ok(Arc::new(cache::ensure(
        &[src],
        &CacheOptions {
            path: Some(work.join("shapes640.ddetr-cache")),
            pack_images: true,
            ..Default::default()
        },
    )?))
}

/// The train transform over every image on one core: with and without the float normalize
/// (images per second).
fn transform_throughput(
    c: &Arc<Cache>,
    config: &DatasetConfig,
    kv: &mut Vec<(String, String)>,
) -> anyhow::Result<(f64, f64)> {
    let aug = config.augmentation.clone();
    let mode = LoaderMode::Train { seed: 0 };
    let loader = Loader::new(c.clone(), config, mode, 1, 0)?;
    // Warm the page cache and the allocator with a few images, then time a full pass: the
    // worker's part (decode, transform, collate into the u8 batch) and the normalization to the
    // float model input (on the CPU here; on the training device when there is one).
    for i in 0..c.len().min(8) {
        let s = loader.sample(i, 99)?;
        let _ = collate(&[s], &aug, mode, 0, 0).normalized(tch::Device::Cpu);
    }
    let (mut worker_s, mut norm_s) = (0f64, 0f64);
    for i in 0..c.len() {
        let t = Instant::now();
        let s = loader.sample(i, 0)?;
        let b = collate(&[s], &aug, mode, 0, 0);
        let t2 = Instant::now();
        let _ = std::hint::black_box(b.normalized(tch::Device::Cpu));
        worker_s += (t2 - t).as_secs_f64();
        norm_s += t2.elapsed().as_secs_f64();
    }
    let n = c.len() as f64;
    let (ours, worker) = (n / (worker_s + norm_s), n / worker_s);
    println!("ddetr train transform, 1 core, {} 640x480 JPEGs:", c.len());
    println!("  decode, flip, resize/crop, u8 batch, float normalize on the CPU: {ours:.1} img/s");
    println!(
        "  without the normalize (a data worker's share when training on a GPU): {worker:.1} img/s"
    );
    let stages = stage_breakdown(c, &aug)?;
    println!(
        "  per image: decode {:.2} ms, transform (resize/crop) {:.2} ms, collate (layout, flip, pad) {:.2} ms, normalize {:.2} ms",
        stages[0], stages[1], stages[2], stages[3]
    );
    kv.push(("imgs_per_s_core".into(), format!("{ours:.1}")));
    kv.push(("worker_imgs_per_s_core".into(), format!("{worker:.1}")));

    Ok((ours, worker))
}

/// The peer's transform (PIL + torchvision) on the same JPEGs; a failure is one line.
fn transform_peer(
    python: &Path,
    peers: &Path,
    shapes: &Path,
    ours: f64,
    worker: f64,
    kv: &mut Vec<(String, String)>,
) {
    match run_peer(
        python,
        &peers.join("torchvision_pipeline.py"),
        shapes,
        &["imgs_per_s_per_core"],
    ) {
        Ok(v) => {
            println!(
                "peer torchvision_pipeline.py (PIL + torchvision), 1 core: {:.1} img/s  → ddetr {:.2}x with the CPU normalize, {:.2}x without",
                v[0],
                ours / v[0],
                worker / v[0]
            );
            kv.push(("peer_imgs_per_s_core".into(), format!("{:.1}", v[0])));
            kv.push(("ratio".into(), format!("{:.2}", ours / v[0])));
            kv.push(("worker_ratio".into(), format!("{:.2}", worker / v[0])));
        }
        Err(e) => println!("peer torchvision_pipeline.py: not run ({e:#})"),
    }
}

/// The loader with each thread count (batches of 4, u8 batches as the trainer gets them).
fn loader_throughput(
    c: &Arc<Cache>,
    config: &DatasetConfig,
    threads_list: &[usize],
    kv: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    let mode = LoaderMode::Train { seed: 0 };
    for &threads in threads_list {
        let cfg = DatasetConfig {
            batch_size: 4,
            workers: threads as u32,
            ..config.clone()
        };
        let l = Loader::new(c.clone(), &cfg, mode, 1, 0)?;
        let t = Instant::now();
        let mut images = 0usize;
        for b in l.epoch(0, 0) {
            images += b?.indices.len();
        }
        let rate = images as f64 / t.elapsed().as_secs_f64();
        println!("ddetr loader, {threads} worker thread(s), batch 4: {rate:.1} img/s");
        kv.push((
            format!("loader_{threads}t_imgs_per_s"),
            format!("{rate:.1}"),
        ));
    }

    Ok(())
}

/// A cache of COCO-train-sized annotations: build and open times, the memory each extra reader
/// process adds, against pycocotools loading the same JSON.
fn big_annotations(
    args: &DataBenchArgs,
    python: Option<&Path>,
    peers: &Path,
    work: &Path,
    kv: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    let big = work.join("big");
    let json = big.join("instances_train_like.json");
    let make_big = peers.join("make_big_coco_json.py");
    if !json.exists() && !make_big.is_file() {
        println!(
            "cache of COCO-train-sized annotations: not measured ({} not found)",
            make_big.display()
        );
        return Ok(());
    }
    {
        let images = big.join("images");
        if !json.exists() {
            std::fs::create_dir_all(&images)?;
            let status = Command::new("python3")
                .arg(&make_big)
                .arg(&json)
                .status()
                .context("running make_big_coco_json.py with python3")?;
            if !status.success() {
                bail!("make_big_coco_json.py failed");
            }
        }
        ensure_placeholder_files(&json, &images)?;
        let src = DataSource {
            image_dir: images.display().to_string(),
            json_file: json.display().to_string(),
        };
        let path = big.join("big.ddetr-cache");
        let started = Instant::now();
        let c = cache::build(
            &[src],
            &path,
            &CacheOptions {
                path: Some(path.clone()),
                num_classes: Some(91),
                ..Default::default()
            },
        )?;
        let build_s = started.elapsed().as_secs_f64();
        drop(c);
        let mut open_ms = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let c = Cache::open(&path)?;
            open_ms = open_ms.min(t.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(c.len());
        }
        let c = Cache::open(&path)?;
        println!(
            "ddetr cache of {} images / {} boxes: build {build_s:.2} s, open {open_ms:.2} ms, file {:.1} MiB",
            c.len(),
            c.boxes().len(),
            c.sizes().0 as f64 / 1048576.0
        );
        // Additional readers: separate processes, all mapping the file at once.
        let exe = std::env::current_exe()?;
        let children: Vec<_> = (0..args.readers)
            .map(|_| {
                Command::new(&exe)
                    .args(["bench", "data", "--reader"])
                    .arg(&path)
                    .output()
            })
            .collect::<Result<_, _>>()?;
        let mut worst = (0u64, 0u64);
        for out in &children {
            let line = String::from_utf8_lossy(&out.stdout);
            let get = |k: &str| {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            if !out.status.success() {
                bail!("reader failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            worst = (
                worst.0.max(get("rss_delta_kib")),
                worst.1.max(get("anon_delta_kib")),
            );
        }
        let (rss_mib, anon_mib) = (worst.0 as f64 / 1024.0, worst.1 as f64 / 1024.0);
        println!("ddetr reader process (open + read every record), worst of {}: +{rss_mib:.1} MiB RSS, of which +{anon_mib:.1} MiB private (the rest is shared page cache)", args.readers);
        kv.push(("cache_build_s".into(), format!("{build_s:.2}")));
        kv.push(("cache_open_ms".into(), format!("{open_ms:.2}")));
        kv.push(("reader_extra_rss_mib".into(), format!("{rss_mib:.1}")));
        kv.push(("reader_extra_private_mib".into(), format!("{anon_mib:.1}")));
        if let Some(py) = python {
            match run_peer(
                py,
                &peers.join("pycocotools_load.py"),
                &json,
                &["seconds", "maxrss_mib"],
            ) {
                Ok(v) => {
                    println!(
                        "peer pycocotools COCO(json) per process: {:.2} s, {:.0} MiB RSS",
                        v[0], v[1]
                    );
                    kv.push(("peer_load_s".into(), format!("{:.2}", v[0])));
                    kv.push(("peer_load_rss_mib".into(), format!("{:.0}", v[1])));
                }
                Err(e) => println!("peer pycocotools_load.py: not run ({e:#})"),
            }
        }
    }
    Ok(())
}

/// Milliseconds per image in each stage of the worker path and the normalization, over every
/// image of `c`, run stage by stage as the loader does (decode, transform, collate, normalize).
fn stage_breakdown(c: &Cache, aug: &AugmentationConfig) -> anyhow::Result<[f64; 4]> {
    let mut resizer = transforms::Resizer::new();
    let mut t = [0f64; 4];
    let mode = LoaderMode::Train { seed: 0 };
    for i in 0..c.len() {
        let clock = Instant::now();
        let image = decode_rgb8(&c.image_bytes(i)?, c.file_name(i))?;
        let t1 = Instant::now();
        let (boxes, labels) = c
            .boxes_of(i)
            .iter()
            .map(|b| {
                let [x, y, w, h] = b.bbox;
                ([x, y, x + w, y + h], b.category_id)
            })
            .unzip();
        let mut s = Sample::new(image, boxes, labels);
        let ops = transforms::train_ops(
            s.image.width,
            s.image.height,
            aug,
            &mut Rng::derive(0, &[0, i as u64]),
        );
        transforms::apply_fused(&mut s, &ops, &mut resizer);
        let t2 = Instant::now();
        let meta = Meta {
            index: i,
            image_id: 0,
            orig_size: [0, 0],
        };
        let b = collate(&[(s, meta)], aug, mode, 0, 0);
        let t3 = Instant::now();
        let _ = std::hint::black_box(b.normalized(tch::Device::Cpu));
        let t4 = Instant::now();
        for (k, d) in [t1 - clock, t2 - t1, t3 - t2, t4 - t3].iter().enumerate() {
            t[k] += d.as_secs_f64();
        }
    }
    Ok(t.map(|x| x * 1e3 / c.len() as f64))
}

/// The cache build checks that every image file exists; the big JSON's images are empty files.
fn ensure_placeholder_files(json: &Path, images: &Path) -> anyhow::Result<()> {
    let marker = images.join(".complete");
    if marker.exists() {
        return Ok(());
    }
    let file: ddetr_dataset::coco::CocoFile = ddetr_dataset::coco::read(json)?;
    for im in &file.images {
        std::fs::File::create(images.join(&im.file_name))?;
    }
    std::fs::File::create(marker)?;
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
    let base = std::env::temp_dir().join(format!("ddetr-bench-data-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(TempDir(base))
}

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
