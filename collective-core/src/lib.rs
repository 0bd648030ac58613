//! `ddetr-collective-core` is the part of ddetr's collective layer that needs no tensors and
//! links no libtorch: the bootstrap key-value stores ([`store`]), the CPU transports (shared
//! memory within a node, a TCP ring between nodes) with their reduction kernels ([`cpu`]), and
//! [`CpuGroup`], the CPU collectives over plain byte buffers and slices. `ddetr-collective` builds
//! the tensor `Communicator`, NCCL, DDP and ZeRO on top and re-exports everything here under the
//! same paths; `ddetr`'s front binary uses this crate alone, so a worker that needs no tensors
//! (`ddetr bench barrier`) starts without loading libtorch.
//!
//! Every operation of a [`CpuGroup`] has a deadline, so a dead peer is an error that names its
//! rank, never a hang. Environment knobs (read by [`CommConfig::from_env`] and the transports):
//! `DDETR_COLLECTIVE_TIMEOUT_S`, `DDETR_CPU_TRANSPORT` (auto|shm|tcp), `DDETR_CPU_ADDR`,
//! `DDETR_SHM_CHUNK_KB`, `DDETR_SHM_ALLREDUCE` (direct|split|cma), `DDETR_SHM_SPIN`.

pub mod cpu;
pub mod group;
pub mod store;

use std::time::Duration;

pub use group::{
    default_chunk_bytes, CommConfig, CpuGroup, Element, RankInfo, Transport, DEFAULT_ROUND_BYTES,
    DEFAULT_TIMEOUT,
};
pub use store::{InProcessStore, Store, TcpStore, TcpStoreServer};

/// How an all-reduce or reduce-scatter combines the ranks' values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the world size (floating-point dtypes only).
    Avg,
    Max,
}

/// The element types the collectives move and reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
    I64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        !matches!(self, DType::I64)
    }
}

/// Why NCCL could not be opened (the NCCL backend itself lives in `ddetr-collective`).
#[derive(Debug, thiserror::Error)]
pub enum NcclLoadError {
    #[error("cannot open NCCL ({tried}): {reason}; install nvidia-nccl-cu13 or set DDETR_NCCL_LIB to libnccl.so.2")]
    Open { tried: String, reason: String },
    #[error("NCCL at {path} lacks {symbol}: {reason}")]
    Symbol {
        path: String,
        symbol: &'static str,
        reason: String,
    },
    #[error("ncclGetVersion failed with code {0}")]
    Call(i32),
}
/// Every failure of the collective layer. Messages are one line: what went wrong, which rank, and
/// what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error("bootstrap store: {what}")]
    Store { what: String },
    #[error("bootstrap store: key {key} was not set within {timeout:?}: a rank did not start or crashed during setup; check every rank's log")]
    StoreTimeout { key: String, timeout: Duration },
    #[error("{op} timed out after {timeout:?} waiting for rank {ranks:?}: that rank is stuck or dead; check its log, or raise the collective timeout if it is just slow")]
    Timeout {
        op: &'static str,
        ranks: Vec<usize>,
        timeout: Duration,
    },
    #[error("{op} failed: rank {rank} (pid {pid}) died; check that rank's log for the cause")]
    PeerDied {
        op: &'static str,
        rank: usize,
        pid: u32,
    },
    #[error("{op} failed: connection to rank {rank} broke ({reason}); that rank died or aborted, check its log")]
    PeerLost {
        op: &'static str,
        rank: usize,
        reason: String,
    },
    #[error("{op} aborted: rank {rank} aborted the communicator after an error of its own; check that rank's log")]
    Aborted { op: &'static str, rank: usize },
    #[error("{op} on rank {rank}: rank {peer} called {peer_call} but this rank called {call}: every rank must issue the same collectives in the same order with the same sizes")]
    Mismatch {
        op: &'static str,
        rank: usize,
        peer: usize,
        call: String,
        peer_call: String,
    },
    #[error("{op}: {what}")]
    InvalidArgument { op: &'static str, what: String },
    #[error("unsupported dtype {0}: collectives take f32, f16, bf16, f64 or i64 tensors")]
    UnsupportedDtype(String),
    #[error("shared memory {path}: {reason}; check that /dev/shm is mounted and has room")]
    Shm { path: String, reason: String },
    #[error("tcp transport: {what}")]
    Tcp { what: String },
    #[error(transparent)]
    NcclLoad(#[from] NcclLoadError),
    #[error("{call} failed: {reason}")]
    Nccl { call: &'static str, reason: String },
    #[error("the NCCL backend needs one CUDA GPU per local rank, but {what}: use the cpu backend on this machine, or check CUDA_VISIBLE_DEVICES")]
    NoGpu { what: String },
    #[error("{op} did not complete on the GPU within {timeout:?}: a peer rank is dead or stuck (NCCL cannot tell which); the communicator was aborted, check the other ranks' logs")]
    NcclTimeout { op: &'static str, timeout: Duration },
    #[error("the communicator was aborted on this rank; build a new one")]
    AbortedLocally,
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;
