//! The `trainer` crate owns the model half and the tasks.
//!
//! - **The detector seam** ([`detector`]): the [`detector::Detector`] trait (build from the spec,
//!   forward to per-layer outputs, loss, post-process, checkpoint layouts) that the tasks drive;
//!   Deformable DETR is its first implementation: the network in tch with upstream parameter
//!   names and initialisation ([`model`]), the Hungarian matcher ([`matcher`], with an exact port
//!   of scipy's assignment solver in [`lsa`]), the criterion ([`criterion`]), post-processing
//!   ([`post_process`]), the staged backward of activation checkpointing ([`step`]).
//! - **The tasks**: [`train`] (the [`train::Trainer`] engine, its data, resume and wall-clock
//!   budget), [`evaluate`], [`inference`], [`export`] (ONNX); shared by them: which device
//!   ([`device`]), the job's communicator ([`process_group`]), distributed prediction
//!   ([`predict`]), the results folder and `status.json` ([`results`]), COCO scoring
//!   ([`coco_eval`]), the progress display ([`progress`]) and PNG curves ([`plot`]).
//! - **Optimisation**: the spec ([`spec`]), AdamW/SGD with upstream's parameter groups
//!   ([`optim`], [`param_groups`]), the distributed strategies DDP and ZeRO-2 ([`strategy`]),
//!   mixed precision ([`amp`]).
//! - **Weights**: loading/saving under official keys with the transformers key map ([`weights`],
//!   reading `torch.save` archives through [`torch_pickle`]), training checkpoints with checksums
//!   ([`checkpoint`]), and the checkpoints the tasks take in every published layout
//!   ([`model_checkpoint`]).
//!
//! Numerics are pinned by golden fixtures: `tests/golden/make_model_fixtures.py` (transformers'
//! Deformable DETR set to the official semantics, plus the official criterion and scipy's
//! matcher), `make_lsa_fixtures.py`, `make_pth_fixture.py` and `make_checkpoint_fixtures.py`;
//! run them with the peers venv (`$(../shared/peers/venv.sh) trainer/tests/golden/<script>`)
//! to regenerate.

pub mod amp;
pub mod automl_space;
pub mod checkpoint;
pub mod coco_eval;
pub mod criterion;
pub use ddetr_collective::cuda_runtime;
pub mod detector;
pub mod device;
pub mod device_memory;
pub mod dino_criterion;
pub mod distill;
pub mod evaluate;
pub mod export;
pub mod flops;
pub mod inference;
pub mod input_sizes;
pub mod lsa;
pub mod matcher;
pub mod model;
pub mod model_checkpoint;
pub mod onnx_runtime;
pub mod optim;
pub mod param_groups;
pub mod plot;
pub mod post_process;
pub mod predict;
pub mod process_group;
pub mod progress;
pub mod quantize;
pub mod results;
pub mod spec;
pub mod step;
pub mod strategy;
pub mod torch_pickle;
pub mod train;
pub mod weights;

/// Why the model half could not do what was asked. Messages are one line: what is wrong and
/// what to do. [`TrainerError::is_usage`] tells the binaries which errors are the invocation's
/// (the spec, a flag, a checkpoint that does not fit the spec: exit 2) and which the run's (1).
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A spec or input that cannot work.
    #[error("{0}")]
    Config(String),
    /// The model section describes a network the architecture cannot build.
    #[error("{0}")]
    UnsupportedModel(String),
    #[error("cannot read weights {path}: {reason}")]
    ReadWeights { path: String, reason: String },
    #[error("cannot write weights {path}: {reason}")]
    WriteWeights { path: String, reason: String },
    #[error("weights {path}: tensor {key} has shape {found:?} but the model expects {expected:?}: {hint}")]
    ShapeMismatch {
        path: String,
        key: String,
        found: Vec<i64>,
        expected: Vec<i64>,
        hint: String,
    },
    #[error("weights {path} lack {count} model tensors (first: {first}): {hint}")]
    MissingKeys {
        path: String,
        count: usize,
        first: String,
        hint: String,
    },
    #[error(
        "weights {path} hold {count} tensors the model has no place for (first: {first}): {hint}"
    )]
    UnexpectedKeys {
        path: String,
        count: usize,
        first: String,
        hint: String,
    },
    /// A checkpoint's optimizer state is not the shape of its parameter.
    #[error("checkpoint optimizer state {key} has shape {found:?} but the parameter has {expected:?}: the checkpoint is from another model shape")]
    OptimizerState {
        key: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("cost matrix is infeasible (contains NaN or -inf, or no full assignment exists)")]
    InfeasibleCost,
    /// A file a task reads or writes.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// An input image that cannot be decoded.
    #[error("{} is not a readable image ({reason}): remove it from the image folder or replace it", .path.display())]
    BadImage {
        path: std::path::PathBuf,
        reason: String,
    },
    /// A picture (annotated image, training curves) that could not be drawn.
    #[error("cannot draw {what}: {reason}")]
    Draw { what: String, reason: String },
    /// The COCO evaluation library refused the detections or the ground truth.
    #[error("COCO evaluation failed: {0}")]
    Evaluation(String),
    #[error("{0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Dataset(#[from] ddetr_dataset::DatasetError),
    #[error("{0}")]
    Collective(#[from] ddetr_collective::CollectiveError),
    #[error(transparent)]
    Export(#[from] crate::export::ExportError),
}

impl TrainerError {
    /// An I/O error on `path` while trying to `action` it ("read", "write", …).
    pub fn io(action: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        TrainerError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether the invocation is at fault (the spec, the environment it was given, a checkpoint
    /// that does not fit the spec), not the run: the binaries exit 2 for these.
    pub fn is_usage(&self) -> bool {
        match self {
            TrainerError::Config(_)
            | TrainerError::UnsupportedModel(_)
            | TrainerError::ShapeMismatch { .. }
            | TrainerError::MissingKeys { .. }
            | TrainerError::UnexpectedKeys { .. }
            | TrainerError::OptimizerState { .. } => true,
            // The class count sizes the model: too small for the data is the spec's to fix.
            TrainerError::Dataset(e) => {
                e.is_usage() || matches!(e, ddetr_dataset::DatasetError::NumClassesTooSmall { .. })
            }
            TrainerError::Export(e) => !matches!(e, crate::export::ExportError::Write { .. }),
            _ => false,
        }
    }
}

/// Joining the job: a missing token or port, or a refused rendezvous, is the invocation's fault
/// ([`TrainerError::Config`]); a store or transport failure stays a collective error.
impl From<ddetr_launcher::bootstrap::BootstrapError> for TrainerError {
    fn from(e: ddetr_launcher::bootstrap::BootstrapError) -> Self {
        match e {
            ddetr_launcher::bootstrap::BootstrapError::Collective(e) => TrainerError::Collective(e),
            other => TrainerError::Config(other.to_string()),
        }
    }
}

/// Unit tests that seed or draw from libtorch's process-wide generator hold this, so tests
/// running in parallel threads cannot interleave draws (a reseeded draw must repeat exactly).
#[cfg(test)]
pub(crate) fn torch_rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
