//! `ddetr bench converge`: convergence per minute, ours against transformers' Deformable DETR on
//! the same COCO-format data for the same wall time, in one run.
//!
//! - Data: `--data DIR` (`DIR/train`, `DIR/val`, each with `annotations.json` and `images/`), by
//!   default made by the peers' `make_shapes_jpegs.py` with seeds the project never trains on
//!   (640×480 JPEGs, 1–6 shapes; 2000 train, 200 val), so no recipe was tuned on them.
//! - Ours: `ddetr-launch --nproc-per-node N -- train -e SPEC train.max_minutes=M` on that data
//!   (the tiny spec by default), its curve from `status.json` (a validation every epoch).
//! - The peer: `bench/peers/hf_coco_convergence.py` (the tiny configuration of the peers'
//!   `hf_shapes_convergence.py`, shorter side `--size`, pycocotools every `--peer-eval-every`
//!   minutes) for the same M minutes.
//!
//! Both curves (mAP50 and mAP against minutes) go to `OUT/converge.png`; the last line is
//! `minutes=… final_map50=… final_map=… peer_final_map50=… peer_final_map=…
//! minutes_to_map50_0.5=… peer_minutes_to_map50_0.5=… map50_ratio=…`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use clap::Args;
use ddetr_trainer::plot::Series;

use crate::peer::PeerArgs;
use crate::ranks::{launch_cpu, output_dir};
use crate::train::{ap_chart, curve_points, final_ap, minutes_to, print_curve, xy, CurvePoint};

/// The peer script, versioned with the benchmark.
const PEER: &str = include_str!("../peers/hf_coco_convergence.py");
/// The peers' generator of the default data.
const MAKE_SHAPES: &str = "make_shapes_jpegs.py";

#[derive(Debug, Args)]
pub struct ConvergeArgs {
    /// Wall-clock minutes each side trains (validations included).
    #[arg(long, default_value_t = 15.0)]
    pub minutes: f64,
    /// Data folder with train/ and val/ COCO sets (default: generated under OUT/data).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Images generated for train and val when --data is not given.
    #[arg(long, default_value_t = 2000)]
    pub train_images: usize,
    #[arg(long, default_value_t = 200)]
    pub val_images: usize,
    /// Our spec (its data sources are replaced by the benchmark's).
    #[arg(long, default_value = "configs/shapes_tiny.yaml")]
    pub spec: PathBuf,
    /// Extra `key=value` overrides of our spec (repeatable), for ablations.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Our trainer processes (CPU ranks).
    #[arg(long, default_value_t = 2)]
    pub nproc: u32,
    /// The peer's shorter image side (ours follows the spec's scales / test_random_resize).
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Minutes between the peer's validations.
    #[arg(long, default_value_t = 2.5)]
    pub peer_eval_every: f64,
    /// Output folder.
    #[arg(long, default_value = "results/bench_converge")]
    pub out: PathBuf,
    #[command(flatten)]
    pub peer: PeerArgs,
}

pub fn run(args: &ConvergeArgs) -> anyhow::Result<()> {
    if args.minutes.is_nan() || args.minutes <= 0.0 || args.nproc == 0 {
        bail!("--minutes must be positive and --nproc at least 1");
    }
    let out = output_dir(&args.out)?;
    // The default data comes from the peers' generator, so it needs their python even for ours.
    let (data, python) = match &args.data {
        Some(d) => (
            std::fs::canonicalize(d).with_context(|| format!("--data {}", d.display()))?,
            args.peer.python(&[]),
        ),
        None => {
            let script = args.peer.script(MAKE_SHAPES);
            let python = args.peer.find_python(&[&script]).map_err(|why| {
                anyhow::anyhow!("the default data comes from the peers ({why}): pass --data DIR")
            })?;
            let data = generate(&python, &script, &out.join("data"), args)?;
            (data, (!args.peer.no_peer).then_some(python))
        }
    };
    for split in ["train", "val"] {
        let ann = data.join(split).join("annotations.json");
        if !ann.is_file() {
            bail!(
                "{} is missing: --data must hold train/ and val/ COCO sets",
                ann.display()
            );
        }
    }

    println!("ours: {} ranks, {} minutes …", args.nproc, args.minutes);
    let ours = train_ours(args, &data, &out)?;
    let peer = match &python {
        Some(py) => {
            println!("peer: transformers, {} minutes …", args.minutes);
            Some(train_peer(py, args, &data, &out)?)
        }
        None => None,
    };

    print_curve("ours", &ours);
    if let Some(p) = &peer {
        print_curve("peer", p);
    }
    let png = out.join("converge.png");
    let mut series: Vec<Series<'_>> = vec![
        ("ours mAP50", [214, 39, 40], xy(&ours, |p| p.map50)),
        ("ours mAP", [255, 152, 150], xy(&ours, |p| p.map)),
    ];
    if let Some(p) = &peer {
        series.push(("transformers mAP50", [31, 119, 180], xy(p, |p| p.map50)));
        series.push(("transformers mAP", [174, 199, 232], xy(p, |p| p.map)));
    }
    ap_chart(
        &png,
        "convergence: validation AP against wall-clock minutes",
        &series,
    )?;

    let reach = |c: &[CurvePoint]| minutes_to(c, 0.5).map_or("never".into(), |m| format!("{m:.1}"));
    let (m50, m) = final_ap(&ours);
    let mut line = format!(
        "minutes={} final_map50={m50:.4} final_map={m:.4} minutes_to_map50_0.5={}",
        args.minutes,
        reach(&ours)
    );
    if let Some(p) = &peer {
        let (p50, pm) = final_ap(p);
        line += &format!(
            " peer_final_map50={p50:.4} peer_final_map={pm:.4} peer_minutes_to_map50_0.5={} map50_ratio={}",
            reach(p),
            if p50 > 0.0 {
                format!("{:.3}", m50 / p50)
            } else {
                "inf".into()
            }
        );
    }
    println!("{line}");
    Ok(())
}

/// Unseen shapes data from the peers' generator (seeds the project's own sets never use).
fn generate(
    python: &Path,
    script: &Path,
    dir: &Path,
    args: &ConvergeArgs,
) -> anyhow::Result<PathBuf> {
    for (split, n, seed) in [
        ("train", args.train_images, "101"),
        ("val", args.val_images, "202"),
    ] {
        let d = dir.join(split);
        if d.join("annotations.json").is_file() {
            continue;
        }
        let st = Command::new(python)
            .arg(script)
            .arg(&d)
            .args([n.to_string().as_str(), seed])
            .stdout(Stdio::null())
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !st.success() {
            bail!("{} failed ({st})", script.display());
        }
    }
    Ok(dir.to_path_buf())
}

fn train_ours(args: &ConvergeArgs, data: &Path, out: &Path) -> anyhow::Result<Vec<CurvePoint>> {
    let results = out.join("ours");
    let _ = std::fs::remove_dir_all(&results);
    let src = |split: &str| {
        format!(
            "[{{image_dir: {d}/{split}/images, json_file: {d}/{split}/annotations.json}}]",
            d = data.display()
        )
    };
    let mut task = vec![
        "train".to_string(),
        "-e".into(),
        args.spec.display().to_string(),
        "-r".into(),
        results.display().to_string(),
        format!("train.max_minutes={}", args.minutes),
        format!("dataset.train_data_sources={}", src("train")),
        format!("dataset.val_data_sources={}", src("val")),
    ];
    task.extend(args.overrides.iter().cloned());
    launch_cpu(args.nproc, &task, &out.join("ours.log"))?;
    let status = results.join("train/status.json");
    let text = std::fs::read_to_string(&status)
        .with_context(|| format!("reading {}", status.display()))?;
    Ok(curve_points(&text))
}

fn train_peer(
    python: &Path,
    args: &ConvergeArgs,
    data: &Path,
    out: &Path,
) -> anyhow::Result<Vec<CurvePoint>> {
    let dir = out.join("peer");
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("hf_coco_convergence.py");
    std::fs::write(&script, PEER)?;
    let curve = dir.join("curve.jsonl");
    let log = out.join("peer.log");
    let st = Command::new(python)
        .arg(&script)
        .arg("--train")
        .arg(data.join("train"))
        .arg("--val")
        .arg(data.join("val"))
        .args(["--minutes", &args.minutes.to_string()])
        .args(["--size", &args.size.to_string()])
        .args(["--eval-every", &args.peer_eval_every.to_string()])
        .args(["--threads", &args.nproc.to_string()])
        .arg("--out")
        .arg(&curve)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !st.success() {
        bail!("the peer failed ({st}): see {}", log.display());
    }
    let text = std::fs::read_to_string(&curve)?;
    peer_points(&text)
}

/// The peer's JSON lines (`minutes`, `map`, `map50`) as curve points.
fn peer_points(text: &str) -> anyhow::Result<Vec<CurvePoint>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            let v: serde_json::Value =
                serde_json::from_str(l).with_context(|| format!("peer curve line {l:?}"))?;
            let f = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {l:?}"));
            Ok(CurvePoint {
                minutes: f("minutes")?,
                epoch: i as u64,
                map50: f("map50")?,
                map: f("map")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_lines_become_curve_points() {
        let p = peer_points(
            "{\"minutes\": 2.5, \"images\": 800, \"map\": 0.1, \"map50\": 0.3}\n\n{\"minutes\": 5.0, \"images\": 1600, \"map\": 0.2, \"map50\": 0.55}\n",
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[1].minutes, p[1].map50, p[1].map), (5.0, 0.55, 0.2));
        assert_eq!(minutes_to(&p, 0.5), Some(5.0));
        assert!(peer_points("{\"minutes\": 1}").is_err());
    }
}
