//! `ddetr bench <name>`: each benchmark prints ours against its peer in one run and ends with one
//! `key=value` line that a script can read.

mod barrier;
mod collective;
mod converge;
mod data;
mod launch;
mod step;
mod train;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// One training step (forward, loss, backward, AdamW) of the TAO default model on CPU vs
    /// transformers' Deformable DETR.
    Step(step::StepArgs),
    /// The real training path (loader + DDP world of 1 + TAO default model + criterion + AdamW) on
    /// CPU vs transformers' Deformable DETR; `--curve status.json`: mAP50 against minutes.
    Train(train::TrainBenchArgs),
    /// Convergence per minute: ours and transformers' Deformable DETR trained on the same unseen
    /// COCO data for the same wall time; both curves in one PNG.
    Converge(converge::ConvergeArgs),
    /// Data path: transform img/s on one core, cache build/open/RSS on COCO-sized annotations.
    Data(data::DataBenchArgs),
    /// Collective bandwidth (nccl-tests' time/algbw/busbw) against torch.distributed's gloo on the
    /// same world and sizes; spawns the ranks itself.
    Collective(collective::CollectiveArgs),
    /// Worker of `bench launch`: join via DDETR_RDZV, build the CPU communicator, one barrier.
    Barrier(barrier::BarrierArgs),
    /// Launch + rendezvous + one barrier: ddetr-launch vs torchrun, wall time.
    Launch(launch::LaunchArgs),
}

pub fn run(cmd: &BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Step(args) => step::step(args),
        BenchCommand::Train(args) => train::run(args),
        BenchCommand::Converge(args) => converge::run(args),
        BenchCommand::Data(args) => data::data(args),
        BenchCommand::Collective(args) => collective::run(args.clone()),
        BenchCommand::Barrier(args) => barrier::run(args),
        BenchCommand::Launch(args) => launch::run(args),
    }
}

/// The peer scripts' folder: `DDETR_PEERS_DIR`, else `../shared/peers` beside this clone.
pub(crate) fn peers_dir() -> PathBuf {
    match std::env::var_os("DDETR_PEERS_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers"),
    }
}

/// The python that runs the peer scripts: `explicit` when given, else what the peers' `venv.sh`
/// prints (it creates that venv the first time).
pub(crate) fn peers_python(explicit: Option<&Path>, venv_sh: &Path) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let out = Command::new(venv_sh)
        .output()
        .with_context(|| format!("running {}", venv_sh.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!(
            "{} failed: {}",
            venv_sh.display(),
            err.lines().last().unwrap_or("").trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
