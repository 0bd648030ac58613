//! The `bench` crate is the `ddetr bench` harness: each benchmark measures ours and, in the same
//! run, its peer (the PyTorch-world program doing the same job), prints both, and ends with one
//! `key=value` line that a script can read. The binary parses [`BenchCommand`] and calls [`run`];
//! unlike the other library crates this one prints to stdout, because its report is its product
//! (errors still go back to the binary, which prints them once).
//!
//! Layout:
//!
//! - `lib.rs`: [`BenchCommand`] (the `ddetr bench` subcommands), [`run`], [`UsageError`].
//! - `peer.rs`: [`PeerArgs`], the flags every bench with a peer shares (`--python`, `--peers`,
//!   `--no-peer`); where the peer scripts are (`DDETR_PEERS_DIR`, else `../shared/peers` beside
//!   the repository) and the python that runs them; the one line printed when no peer can run.
//! - `step.rs`: `bench step`, rounds of ours and transformers' step (`hf_ddetr_step.py`).
//! - `training_step.rs`: the step `bench step` times, `ddetr train`'s own: the model of
//!   `detector::build_model` and `train::update::optimizer_step`, the step `ddetr train` runs.
//! - `train.rs`: `bench train`, the whole training path, and `--curve` (mAP50 against minutes).
//! - `converge.rs`: `bench converge`, convergence per minute against transformers' tiny model.
//! - `distill.rs`: `bench distill`, a DINO student with and without its teacher, same minutes.
//! - `ranks.rs`: ours under `ddetr-launch` with N CPU ranks (converge, distill).
//! - `flops.rs`: `bench flops`, `ddetr model info`'s FLOPs against fvcore's count of
//!   transformers' Deformable DETR (`fvcore_flops.py`).
//! - `data.rs`: `bench data`, the transform, loader and dataset cache against PIL/torchvision
//!   and pycocotools.
//! - `collective.rs`: `bench collective`, its ranks run by the launcher's supervisor
//!   (`ddetr_launcher::supervise`), against torch.distributed's gloo.
//! - `bandwidth.rs`: one collective measured the way nccl-tests reports it (algbw, busbw).
//! - `launch.rs` and `barrier.rs`: `bench launch` (ddetr-launch against torchrun) and its worker.
//! - `peers/`: the peer scripts carried inside the binary (`include_str!`):
//!   `hf_coco_convergence.py` (converge) and `gloo_allreduce.py` (collective).

mod backbone_step;
mod bandwidth;
mod barrier;
mod collective;
mod converge;
mod data;
mod distill;
pub mod flops;
mod launch;
mod peer;
mod quantize;
mod ranks;
mod step;
mod train;
mod training_step;

use clap::Subcommand;

pub use peer::PeerArgs;

/// An error that is the invocation's fault, not the run's: the binary exits 2 on it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

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
    /// Distillation: the same DINO student trained alone and from a trained teacher, for the
    /// same wall time; both curves in one PNG.
    Distill(distill::DistillArgs),
    /// INT8 quantization: ddetr's QDQ model against the FP32 one and onnxruntime's
    /// quantize_static, scored and timed by the same code.
    Quantize(quantize::QuantizeBenchArgs),
    /// FLOPs of one forward: `ddetr model info`'s count against fvcore's on transformers'
    /// Deformable DETR of the same spec, operator by operator.
    Flops(flops::FlopsBenchArgs),
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

/// Runs one benchmark; its report goes to stdout, its last line `key=value` figures.
pub fn run(cmd: &BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Step(args) => step::run(args),
        BenchCommand::Train(args) => train::run(args),
        BenchCommand::Converge(args) => converge::run(args),
        BenchCommand::Data(args) => data::run(args),
        BenchCommand::Distill(args) => distill::run(args),
        BenchCommand::Quantize(args) => quantize::run(args),
        BenchCommand::Flops(args) => flops::run(args),
        BenchCommand::Collective(args) => collective::run(args),
        BenchCommand::Barrier(args) => barrier::run(args),
        BenchCommand::Launch(args) => launch::run(args),
    }
}
