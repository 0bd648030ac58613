//! The CPU backend: shared memory between the ranks of one node ([`shm`]), a TCP ring between
//! nodes ([`tcp`]), and the reduction kernels both use ([`reduce`]). Transports work on raw byte
//! buffers; [`crate::CpuGroup`] picks one and runs the collectives on it (`ddetr-collective`'s
//! communicator hands it contiguous CPU tensors' memory).

pub(crate) mod reduce;
pub(crate) mod shm;
pub(crate) mod tcp;

use crate::{DType, ReduceOp, Result};

/// One CPU transport. Every rank must issue the same calls in the same order with the same sizes
/// (checked: a mismatch is an error naming the rank that differs).
pub(crate) trait Transport: Send + Sync {
    /// In place: `buf` holds this rank's values and receives the reduction.
    fn all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    /// In place: the root's `buf` is copied to every rank's.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Gathers `bytes` from every rank into `output` (world × bytes, rank order). With `input`
    /// None, this rank's part is already at `output + rank × bytes`.
    ///
    /// # Safety
    /// `output` is valid for world × bytes; `input`, if any, for bytes and either equal to this
    /// rank's part of `output` or disjoint from `output`.
    unsafe fn all_gather(
        &self,
        input: Option<*const u8>,
        output: *mut u8,
        bytes: usize,
    ) -> Result<()>;
    /// Reduces `input` (world × count elements) across ranks; this rank receives block `rank`
    /// (count elements) in `output`.
    ///
    /// # Safety
    /// `input` is valid for world × count elements, `output` for count; `output` is either
    /// exactly this rank's block of `input` or disjoint from it.
    unsafe fn reduce_scatter(
        &self,
        input: *const u8,
        output: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Fails this rank's pending and future calls, and the peers' as soon as they notice.
    fn abort(&self);
}

/// What one call is: exchanged by the transports to catch ranks that issue different calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CallDesc(pub u64);

impl CallDesc {
    /// code: 1 all_reduce, 2 broadcast, 3 all_gather, 4 reduce_scatter, 5 barrier.
    pub(crate) fn new(code: u8, bytes: usize, a: u8, b: u8) -> Self {
        CallDesc(
            (code as u64) << 56
                | (a as u64 & 0xf) << 52
                | (b as u64 & 0xf) << 48
                | (bytes as u64 & ((1 << 48) - 1)),
        )
    }
    pub(crate) fn code(self) -> u8 {
        (self.0 >> 56) as u8
    }
    pub(crate) fn bytes(self) -> usize {
        (self.0 & ((1 << 48) - 1)) as usize
    }
}

pub(crate) fn describe(d: CallDesc) -> String {
    let name = match d.code() {
        0 => return "nothing yet".into(),
        1 => "all_reduce",
        2 => "broadcast",
        3 => "all_gather",
        4 => "reduce_scatter",
        5 => "barrier",
        _ => "an unknown call",
    };
    format!("{name} of {} bytes", d.bytes())
}
