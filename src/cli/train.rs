//! `ddetr train`, `ddetr dino distill` and `ddetr evaluate`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use ddetr_trainer::evaluate::evaluate as evaluate_spec;
use ddetr_trainer::process_group::ProcessGroup;
use ddetr_trainer::train;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::spec::resolve;
use super::SpecArgs;
use crate::exit::SIGNAL_BASE;

/// Which training task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Run {
    Train,
    Distill,
}

pub(super) fn train(args: &SpecArgs, run: Run) -> anyhow::Result<()> {
    let spec = resolve(args)?.spec;
    if run == Run::Train && spec.automl_policy == ddetr_trainer::spec::AutomlPolicy::On {
        if std::env::var_os("RANK").is_some() {
            return Err(crate::exit::UsageError(
                "automl_policy is on, which runs the search from a plain `ddetr train` (it starts its own trials under ddetr-launch): run it without ddetr-launch, or set automl_policy=off".into(),
            )
            .into());
        }
        eprintln!("train: automl_policy is on: running the automl search (set automl_policy=off to train once)");
        return super::automl::search(args);
    }
    let task = match run {
        Run::Train => "train",
        Run::Distill => "distill",
    };
    // SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) both stop the run at the end of the
    // current step with a checkpoint; the exit code says which: 128 + N.
    let stop = Arc::new(AtomicBool::new(false));
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [SIGTERM, SIGINT] {
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)?;
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let group = ProcessGroup::from_env()?;
    let out = match run {
        Run::Train => train::train(&spec, &group, &stop)?,
        Run::Distill => train::distill(&spec, &group, &stop)?,
    };
    let rank = group.comm.rank();
    if rank == 0 {
        match out.last_map {
            Some((m, m50)) => eprintln!(
                "{task}: results in {} (last validation mAP {m:.4}, mAP50 {m50:.4})",
                out.results_dir.display()
            ),
            None => eprintln!("{task}: results in {}", out.results_dir.display()),
        }
    }
    if let Some((epoch, step)) = out.stopped_at {
        if rank == 0 {
            eprintln!(
                "{task}: stopped by a signal at epoch {epoch} step {step}; {} holds the position: rerun the same command to resume",
                out.results_dir.join(train::LATEST).display()
            );
        }
        drop(group);
        // A stop raised by another rank (its signal, not this process's) is reported as SIGTERM.
        let sig = match signal.load(Ordering::SeqCst) {
            0 => SIGTERM as usize,
            s => s,
        };
        std::process::exit(i32::from(SIGNAL_BASE) + sig as i32);
    }
    Ok(())
}

pub(super) fn evaluate(args: &SpecArgs) -> anyhow::Result<()> {
    let spec = resolve(args)?.spec;
    let group = ProcessGroup::from_env()?;
    if let Some(out) = evaluate_spec(&spec, &group)? {
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
