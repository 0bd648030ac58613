//! `ddetr dataset synth|cache|inspect`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ddetr_dataset::synth::{self, SynthOptions};

use crate::exit::UsageError;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Write the synthetic shapes dataset (COCO JSON + JPEGs + label_map.txt).
    Synth(SynthArgs),
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
}

fn parse_size(s: &str) -> Result<(u32, u32), UsageError> {
    let bad = || UsageError(format!("--size '{s}' is not WIDTHxHEIGHT (e.g. 640x480)"));
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    ))
}

pub(super) fn run(cmd: &DatasetCommand) -> anyhow::Result<()> {
    match cmd {
        DatasetCommand::Synth(args) => {
            let (width, height) = parse_size(&args.size)?;
            let opts = SynthOptions {
                images: args.images,
                width,
                height,
                classes: args.classes,
                seed: args.seed,
                tar: args.tar,
            };
            let summary = synth::generate(&args.out, &opts).map_err(|e| match e {
                ddetr_dataset::DatasetError::InvalidArgument(m) => {
                    anyhow::Error::new(UsageError(m))
                }
                other => anyhow::Error::new(other),
            });
            let summary =
                summary.with_context(|| format!("dataset synth --out {}", args.out.display()))?;
            println!("{}: {summary}", args.out.display());
            Ok(())
        }
    }
}
