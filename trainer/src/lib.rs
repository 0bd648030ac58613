//! The `trainer` crate owns the model half and the tasks: the experiment spec ([`spec`]), the
//! Deformable DETR model in tch with upstream parameter names and initialisation ([`model`]), the
//! Hungarian matcher ([`matcher`], with an exact port of scipy's assignment solver in [`lsa`]),
//! the criterion ([`criterion`]), post-processing ([`post_process`]), weight loading/saving
//! under official keys with the transformers key map ([`weights`], reading `torch.save` archives
//! through [`torch_pickle`]), the checkpoints the tasks take in every published layout
//! ([`model_checkpoint`]), the tasks ([`train`], [`inference`]) with their progress display
//! ([`progress`]) and PNG curves ([`plot`]).
//!
//! Numerics are pinned by golden fixtures: `tests/golden/make_model_fixtures.py` (transformers'
//! Deformable DETR set to the official semantics, plus the official criterion and scipy's
//! matcher), `make_lsa_fixtures.py`, `make_pth_fixture.py` and `make_checkpoint_fixtures.py`;
//! run them with the peers venv (`$(../shared/peers/venv.sh) trainer/tests/golden/<script>`)
//! to regenerate.

pub mod amp;
pub mod budget;
pub mod checkpoint;
pub mod coco_eval;
pub mod criterion;
pub use ddetr_collective::cuda_runtime;
pub mod device_memory;
pub mod engine;
pub mod export;
pub mod inference;
pub mod input_sizes;
pub mod lsa;
pub mod matcher;
pub mod model;
pub mod model_checkpoint;
pub mod optim;
pub mod plot;
pub mod post_process;
pub mod progress;
pub mod spec;
pub mod step;
pub mod torch_pickle;
pub mod train;
pub mod weights;

/// Why the model half could not do what was asked. Messages are one line: what is wrong and
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("{0}")]
    BadModel(String),
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
    #[error("cost matrix is infeasible (contains NaN or -inf, or no full assignment exists)")]
    InfeasibleCost,
    #[error("{0}")]
    Torch(#[from] tch::TchError),
    /// A spec or input that cannot work (a usage error).
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Dataset(#[from] ddetr_dataset::DatasetError),
    #[error("{0}")]
    Collective(#[from] ddetr_collective::CollectiveError),
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
