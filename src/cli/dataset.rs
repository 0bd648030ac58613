//! `ddetr dataset synth|cache|inspect`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ddetr_dataset::cache::{self, Cache, Split};
use ddetr_dataset::synth::{self, SynthOptions};

use super::SpecArgs;
use crate::exit::UsageError;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Write the synthetic shapes dataset (COCO JSON + JPEGs + label_map.txt).
    Synth(SynthArgs),
    /// Build (or check and reuse) the cache file of each split of the spec's dataset section.
    Cache(CacheArgs),
    /// Print a cache's counts, class histogram, box sizes by COCO area range and sources.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Output directory (images/, annotations.json, label_map.txt, images.tar.gz with --tar).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of images.
    #[arg(long, value_name = "N")]
    pub images: usize,
    /// Image size WIDTHxHEIGHT.
    #[arg(long, default_value = "640x480", value_name = "WxH")]
    pub size: String,
    /// Number of shape classes (1-5: rectangle, ellipse, triangle, diamond, cross).
    #[arg(long, default_value_t = synth::DEFAULT_CLASSES, value_name = "K")]
    pub classes: usize,
    /// Seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
    /// Also write images.tar.gz (TAO's image artifact).
    #[arg(long)]
    pub tar: bool,
    /// Smallest object side in pixels (above 32 no object is COCO-small).
    #[arg(long, default_value_t = synth::MIN_SIDE, value_name = "PX")]
    pub min_side: u32,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Only this split (train, val or test); default: every split that has sources.
    #[arg(long, value_name = "SPLIT")]
    pub split: Option<String>,
    /// Pack the original image bytes into the cache (tar.gz sources are always packed).
    #[arg(long)]
    pub pack: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A cache file, or a spec (then its split's cache is opened, built first if needed).
    #[arg(value_name = "CACHE|SPEC")]
    pub target: Option<PathBuf>,
    /// The experiment spec (instead of a positional target).
    #[arg(short = 'e', long = "experiment-spec", value_name = "SPEC")]
    pub spec: Option<PathBuf>,
    /// Results directory (overrides the spec's results_dir).
    #[arg(short = 'r', long = "results-dir", value_name = "DIR")]
    pub results_dir: Option<String>,
    /// Which split of the spec (train, val or test).
    #[arg(long, default_value = "train", value_name = "SPLIT")]
    pub split: String,
    /// Also re-hash the packed image bytes against their checksum.
    #[arg(long)]
    pub verify: bool,
    /// Spec overrides: key.path=value.
    #[arg(value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

fn parse_size(s: &str) -> Result<(u32, u32), UsageError> {
    let bad = || UsageError(format!("--size '{s}' is not WIDTHxHEIGHT (e.g. 640x480)"));
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    ))
}

fn parse_split(s: &str) -> anyhow::Result<Split> {
    Ok(s.parse::<Split>()?)
}

pub(super) fn run(cmd: &DatasetCommand) -> anyhow::Result<()> {
    match cmd {
        DatasetCommand::Synth(args) => synth_cmd(args),
        DatasetCommand::Cache(args) => cache_cmd(args),
        DatasetCommand::Inspect(args) => inspect_cmd(args),
    }
}

fn synth_cmd(args: &SynthArgs) -> anyhow::Result<()> {
    let (width, height) = parse_size(&args.size)?;
    let opts = SynthOptions {
        images: args.images,
        width,
        height,
        classes: args.classes,
        seed: args.seed,
        tar: args.tar,
        min_side: args.min_side,
    };
    let summary = synth::generate(&args.out, &opts)
        .with_context(|| format!("dataset synth --out {}", args.out.display()))?;
    println!("{}: {summary}", args.out.display());
    Ok(())
}

fn cache_cmd(args: &CacheArgs) -> anyhow::Result<()> {
    let resolved = super::spec::resolve(&args.spec)?;
    let config = &resolved.spec.dataset;
    let splits: Vec<Split> = match &args.split {
        Some(s) => vec![parse_split(s)?],
        None => Split::ALL
            .into_iter()
            .filter(|s| !s.sources(config).is_empty())
            .collect(),
    };
    if splits.is_empty() {
        return Err(UsageError(
            "the spec has no dataset sources: set dataset.train_data_sources (and val/test)".into(),
        )
        .into());
    }
    for split in splits {
        let started = Instant::now();
        let c = cache::ensure_split(config, split, 0, args.pack)
            .with_context(|| format!("{} cache", split.name()))?;
        println!(
            "{}: {} ({} images, {} boxes{}) ready in {:.2} s",
            split.name(),
            c.path().display(),
            c.len(),
            c.boxes().len(),
            if c.is_packed() { ", images packed" } else { "" },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn inspect_cmd(args: &InspectArgs) -> anyhow::Result<()> {
    let mut overrides = args.overrides.clone();
    let spec_path = match (&args.spec, &args.target) {
        // With -e every positional is an override.
        (Some(s), Some(t)) => {
            overrides.insert(0, t.display().to_string());
            Some(s.clone())
        }
        (Some(s), None) => Some(s.clone()),
        (None, Some(t)) if !is_cache_file(t) => Some(t.clone()),
        (None, Some(_)) => None,
        (None, None) => {
            return Err(UsageError(
                "name a cache file or a spec: ddetr dataset inspect CACHE | -e spec.yaml".into(),
            )
            .into())
        }
    };
    let c: Cache = match spec_path {
        Some(spec) => {
            let resolved = super::spec::resolve(&SpecArgs {
                spec,
                results_dir: args.results_dir.clone(),
                overrides,
            })?;
            let split = parse_split(&args.split)?;
            cache::ensure_split(&resolved.spec.dataset, split, 0, false)
                .with_context(|| format!("{} cache", split.name()))?
        }
        None => {
            if !overrides.is_empty() {
                return Err(
                    UsageError("overrides apply to a spec, not to a cache file".into()).into(),
                );
            }
            let path = args.target.as_ref().expect("checked above");
            Cache::open(path).with_context(|| format!("dataset inspect {}", path.display()))?
        }
    };
    print!("{}", ddetr_dataset::inspect::summarize(&c));
    if args.verify {
        c.verify_heap()?;
        println!("packed image bytes: checksum ok");
    }
    Ok(())
}

/// Whether `path` starts with the cache magic (else it is taken as a spec).
fn is_cache_file(path: &std::path::Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == cache::MAGIC
}
