//! `ddetr train`: the dataset cache → loader → detector → loss (num_boxes averaged across ranks)
//! → the distributed strategy's gradient sync (DDP buckets or ZeRO-2) → global-norm clip →
//! AdamW/SGD with upstream's parameter groups → MultiStep/StepLR per epoch; checkpoints with
//! checksums and auto-resume (mid-epoch after a SIGTERM); COCO mAP validation; `status.json`
//! (JSON lines in TAO's KPI shape) and `experiment.yaml`; a wall-clock budget
//! (`train.max_minutes`) the schedule is fitted to.
//!
//! | file | holds |
//! |------|-------|
//! | `trainer.rs` | [`Trainer`]: one rank's run, with a method per step, epoch end, validation, checkpoint |
//! | `data.rs` | the training and validation loaders and the validation ground truth |
//! | `resume.rs` | which checkpoint a run resumes from, and loading it into the model |
//! | `update.rs` | one optimizer step (shared with `ddetr bench step`) |
//! | `budget.rs` | `train.max_minutes`: the schedule fitted to measured seconds (no clock) |
//! | `ema.rs` | `train.ema`: the moving average of the weights, its checkpoint tensors |
//! | `early_stop.rs` | `train.early_stopping`: when a metric has stopped improving (no clock, no I/O) |

pub mod budget;
mod data;
pub mod early_stop;
pub mod ema;
mod resume;
mod trainer;
pub mod update;

pub use trainer::{EpochEnd, Trainer};

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use crate::detector::{DeformableDetrDetector, Detector, DinoDetector};
use crate::distill::DinoDistiller;
use crate::process_group::ProcessGroup;
use crate::spec::{Architecture, ExperimentSpec, Task};
use crate::TrainerError;

/// The rolling checkpoint every epoch end (and a preemption) rewrites.
pub const LATEST: &str = "dd_model_latest.safetensors";

/// `model_epoch_NNN.safetensors` (epoch 0-based, as Lightning names them).
pub fn epoch_checkpoint_name(epoch: u32) -> String {
    format!("model_epoch_{epoch:03}.safetensors")
}

/// `model_step_NNNNNN.safetensors` (`train.checkpoint_interval_unit: step`; optimizer steps
/// done).
pub fn step_checkpoint_name(step: u64) -> String {
    format!("model_step_{step:06}.safetensors")
}

/// How a training run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The epoch and step where a SIGTERM stopped the run (a checkpoint holds the position).
    pub stopped_at: Option<(u32, usize)>,
    /// The last validation's (mAP, mAP50), if any ran.
    pub last_map: Option<(f64, f64)>,
    pub results_dir: PathBuf,
    /// Wall seconds of each step this rank ran (see [`crate::progress`]).
    pub step_s: Vec<f64>,
}

/// Trains the spec's architecture (Deformable DETR or DINO) as `spec` says. `stop` is raised by a signal handler (or a test): the
/// current step finishes, a checkpoint is written and the run returns with `stopped_at` set.
pub fn train(
    spec: &ExperimentSpec,
    group: &ProcessGroup,
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainerError> {
    match spec.architecture() {
        Architecture::DeformableDetr => {
            train_detector::<DeformableDetrDetector>(spec, group, stop, Task::Train)
        }
        Architecture::Dino => train_detector::<DinoDetector>(spec, group, stop, Task::Train),
    }
}

/// DINO's `distill` task: `train` with the frozen teacher of `spec.distill` beside the student
/// ([`crate::distill`]), in `<results_dir>/distill`.
pub fn distill(
    spec: &ExperimentSpec,
    group: &ProcessGroup,
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainerError> {
    if spec.architecture() != Architecture::Dino {
        return Err(TrainerError::Config(
            "distill trains a DINO student: run ddetr dino distill on a spec with model_name: dino and a distill section".into(),
        ));
    }
    train_detector::<DinoDistiller>(spec, group, stop, Task::Distill)
}

/// The training loop over any [`Detector`], writing to `task`'s results folder.
pub fn train_detector<D: Detector>(
    spec: &ExperimentSpec,
    group: &ProcessGroup,
    stop: &AtomicBool,
    task: Task,
) -> Result<TrainOutcome, TrainerError> {
    let mut trainer = Trainer::<D>::new(spec, &group.comm, task)?;
    while trainer.epoch < trainer.epochs() {
        if let EpochEnd::Stopped(epoch, step) = trainer.run_epoch(stop)? {
            return Ok(trainer.outcome(Some((epoch, step))));
        }
        trainer.end_epoch()?;
    }
    trainer.finish()
}

/// The libtorch seed of training step `step` on `rank` (SplitMix64's mix of the three).
pub fn step_seed(seed: i64, rank: usize, step: u64) -> i64 {
    let key = (seed as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((rank as u64) << 40)
        .wrapping_add(step);
    (ddetr_dataset::rng::mix(key) >> 1) as i64
}
