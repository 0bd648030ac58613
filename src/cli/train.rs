//! `ddetr train` and `ddetr evaluate`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ddetr_trainer::train::{self, World};
use ddetr_trainer::TrainerError;

use super::spec::resolve;
use super::SpecArgs;
use crate::exit::{UsageError, SIGNAL_BASE};

/// A spec/input problem exits 2, anything else 1. A checkpoint of another model than the spec
/// describes is the spec's (or the checkpoint's) to fix.
pub(super) fn classify(e: TrainerError) -> anyhow::Error {
    match e {
        TrainerError::Config(m) => UsageError(m).into(),
        e @ (TrainerError::ShapeMismatch { .. }
        | TrainerError::MissingKeys { .. }
        | TrainerError::UnexpectedKeys { .. }) => UsageError(e.to_string()).into(),
        TrainerError::Dataset(ddetr_dataset::DatasetError::InvalidArgument(m)) => {
            UsageError(m).into()
        }
        TrainerError::Dataset(e @ ddetr_dataset::DatasetError::NumClassesTooSmall { .. }) => {
            UsageError(e.to_string()).into()
        }
        other => other.into(),
    }
}

pub(super) fn train(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = resolve(args)?.spec;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let world = World::from_env().map_err(classify)?;
    let out = train::train(&spec, &world, stop).map_err(classify)?;
    if world.comm.rank() == 0 {
        match out.last_map {
            Some((m, m50)) => eprintln!(
                "train: results in {} (last validation mAP {m:.4}, mAP50 {m50:.4})",
                out.results_dir.display()
            ),
            None => eprintln!("train: results in {}", out.results_dir.display()),
        }
    }
    if let Some((epoch, step)) = out.stopped_at {
        if world.comm.rank() == 0 {
            eprintln!(
                "train: stopped by a signal at epoch {epoch} step {step}; {} holds the position: rerun the same command to resume",
                out.results_dir.join(train::LATEST).display()
            );
        }
        drop(world);
        std::process::exit(i32::from(SIGNAL_BASE) + signal_hook::consts::SIGTERM);
    }
    Ok(())
}

pub(super) fn evaluate(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = resolve(args)?.spec;
    let world = World::from_env().map_err(classify)?;
    if let Some(out) = train::evaluate(&spec, &world).map_err(classify)? {
        for line in &out.stats.lines {
            println!("{line}");
        }
        eprintln!(
            "evaluate: detections in {}, metrics in {}",
            out.results_dir.join("results.json").display(),
            out.results_dir.join("metrics.json").display()
        );
    }
    Ok(())
}
