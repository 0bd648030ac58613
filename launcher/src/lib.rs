//! The `launcher` crate owns `ddetr-launch`, the per-node agent: resolving a node's identity from
//! flags, DDETR_* env, torchrun env, Slurm and Kubernetes ([`world`], [`hostlist`], [`gpu`]);
//! spawning one trainer per GPU or CPU slot, each in its own process group with DESIGN.md's env
//! contract, prefixing and logging their output, restarting the group when one fails and
//! forwarding SIGTERM/SIGINT/SIGHUP ([`supervise`]); the authenticated QUIC rendezvous that joins
//! the nodes, supervises the job across them and serves the trainers' bootstrap store
//! ([`rdzv`]); and the trainer side of that contract, joining a job from its environment
//! ([`bootstrap`]). The crate does not link libtorch (its collective dependency is the tensor-free
//! `ddetr-collective-core`), so `ddetr-launch`, and `ddetr` for a worker that needs no tensors,
//! start in milliseconds.

pub mod args;
pub mod bootstrap;
pub mod gpu;
pub mod hostlist;
mod launch;
pub mod rdzv;
pub mod supervise;
pub mod world;

pub use args::Args;
pub use launch::{prepare, Launch, Outcome};
pub use supervise::RankFailure;

use std::path::PathBuf;

/// The exit codes of every ddetr binary (README "Exit codes"): here, in the crate that links no
/// libtorch, so that `ddetr-launch` and the `ddetr` front use them; `ddetr`'s `src/exit.rs`
/// re-exports them and maps the crates' errors onto them.
pub mod exit {
    pub const SUCCESS: u8 = 0;
    /// A trainer failed after its restarts, a node was lost, the rendezvous failed.
    pub const FAILURE: u8 = 1;
    /// Usage: bad flags or environment, a node that does not match the job.
    pub const USAGE: u8 = 2;
    /// Stopped by signal N after a clean shutdown: 128 + N.
    pub const SIGNAL_BASE: u8 = 128;
}

/// Logs to stderr with `RUST_LOG` (else `default`) as the filter; no colours in pipes and files.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Everything that can go wrong in `ddetr-launch`. [`LaunchError::is_usage`] tells the binary
/// which ones are the invocation's fault (exit 2) and which are the run's (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{var}={value:?} is not {expected}: fix or unset it")]
    BadValue {
        var: String,
        value: String,
        expected: &'static str,
    },
    #[error(
        "WORLD_SIZE={world_size} is neither the node count ({nodes}, from {nodes_source}) nor the \
         process count ({nodes} nodes × {procs} per node = {}): unset WORLD_SIZE or make \
         --nodes/--nproc-per-node agree with it",
        u64::from(*nodes) * u64::from(*procs)
    )]
    WorldSizeMismatch {
        world_size: u32,
        nodes: u32,
        nodes_source: String,
        procs: u32,
        procs_source: String,
    },
    #[error(
        "WORLD_SIZE={world_size} can be read as {world_size} nodes (older PyTorchJob) or as {} \
         nodes × {procs} processes (torchrun; {procs} per node from {procs_source}): pass --nodes",
        world_size / procs
    )]
    AmbiguousWorldSize {
        world_size: u32,
        procs: u32,
        procs_source: String,
    },
    #[error(
        "PET_NNODES={value} is an elastic node range, which ddetr-launch does not support: give a \
         fixed count (--nodes N or PET_NNODES=N)"
    )]
    ElasticRange { value: String },
    #[error(
        "this node's rank is unknown in a {nodes}-node job (nodes from {nodes_source}): pass \
         --node-rank or set NODE_RANK (Slurm: SLURM_NODEID, Kubernetes: JOB_COMPLETION_INDEX)"
    )]
    MissingNodeRank { nodes: u32, nodes_source: String },
    #[error(
        "node rank {rank} (from {rank_source}) is not below the node count {nodes} (from \
         {nodes_source}): node ranks run 0..={}",
        nodes - 1
    )]
    NodeRankOutOfRange {
        rank: u32,
        rank_source: String,
        nodes: u32,
        nodes_source: String,
    },
    #[error(
        "node 0's address is unknown in a {nodes}-node job (nodes from {nodes_source}): pass \
         --master-addr or set MASTER_ADDR"
    )]
    MissingMasterAddr { nodes: u32, nodes_source: String },
    #[error("{var}={value:?} is not a Slurm hostlist ({reason}): pass --master-addr")]
    Hostlist {
        var: String,
        value: String,
        reason: String,
    },
    #[error("{asked_by} but no CUDA GPU is usable here: {reason}; run with --device cpu, or on a machine with a GPU")]
    NoGpu { asked_by: String, reason: String },
    #[error(
        "{procs} trainers per node (from {procs_source}) but only {gpus} GPU(s) are visible: use \
         --nproc-per-node {gpus} or fewer, or --device cpu"
    )]
    TooFewGpus {
        procs: u32,
        procs_source: String,
        gpus: usize,
    },
    #[error(
        "--gpus-per-node asks for GPUs but the device is cpu (from {device_source}): use \
         --nproc-per-node for CPU trainers"
    )]
    GpusOnCpu { device_source: String },
    #[error("cannot find a free TCP port for MASTER_PORT: {0}; pass --master-port")]
    FreePort(std::io::Error),
    #[error(
        "no trainer command: put the ddetr arguments after `--`, e.g. `ddetr-launch \
         --nproc-per-node 2 -- train -e spec.yaml`"
    )]
    NoCommand,
    #[error(
        "the trainer binary {} does not exist: build both binaries (`cargo build --release --bins`) \
         or pass --trainer-bin",
        path.display()
    )]
    TrainerNotFound { path: PathBuf },
    #[error("--grace {0} is not a number of seconds between 0 and 3600")]
    BadGrace(f64),
    #[error("cannot read the job token from {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the job token from {from} is empty: write a non-empty token there")]
    EmptyToken { from: String },
    #[error("cannot write logs to {}: {source}; fix --log-dir", path.display())]
    LogDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start rank {rank} ({}): {source}", program.display())]
    Spawn {
        rank: u32,
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for rank {rank} failed: {source}")]
    Wait { rank: u32, source: std::io::Error },
    #[error("{0}")]
    TrainerFailed(Box<RankFailure>),
    /// The job stopped elsewhere (another node's failure, a lost node); the reason.
    #[error("{0}")]
    JobFailed(String),
    #[error("--{flag} {value} is not a number of seconds above 0 and at most {max}")]
    BadSeconds {
        flag: &'static str,
        value: f64,
        max: f64,
    },
    #[error(transparent)]
    Rdzv(#[from] rdzv::RdzvError),
}

impl LaunchError {
    /// True when the invocation is at fault (flags, environment, missing binary): exit code 2.
    pub fn is_usage(&self) -> bool {
        !matches!(
            self,
            LaunchError::FreePort(_)
                | LaunchError::Signals(_)
                | LaunchError::Spawn { .. }
                | LaunchError::Wait { .. }
                | LaunchError::TrainerFailed(_)
                | LaunchError::JobFailed(_)
                | LaunchError::Rdzv(
                    rdzv::RdzvError::Lost { .. }
                        | rdzv::RdzvError::Full { .. }
                        | rdzv::RdzvError::Protocol { .. }
                        | rdzv::RdzvError::Tls(_)
                        | rdzv::RdzvError::Timeout { .. }
                )
        )
    }
}
