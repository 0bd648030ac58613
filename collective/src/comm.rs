//! [`Communicator`]: the collectives over tch tensors, whichever backend moves the bytes.
//!
//! Tensors must be contiguous and of a supported dtype ([`crate::DType`]); CPU tensors go to the
//! CPU backend, CUDA tensors to NCCL. Every rank must issue the same calls in the same order with
//! the same shapes; a mismatch, a dead peer or a peer that stops answering is an error naming the
//! rank, raised within the communicator's timeout.

use std::time::Duration;

use tch::{Device, Tensor};

pub use ddetr_collective_core::group::{
    default_chunk_bytes, CommConfig, RankInfo, Transport, DEFAULT_ROUND_BYTES, DEFAULT_TIMEOUT,
};

use crate::store::Store;
use crate::{CollectiveError, CpuGroup, DType, DTypeKind, ReduceOp, Result};

/// A backend's view of the collectives, on validated tensors.
pub(crate) trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    fn device(&self) -> Device;
    fn all_reduce(&self, t: &mut Tensor, dtype: DType, op: ReduceOp) -> Result<()>;
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    /// `input` is None when it is this rank's block of `output` already.
    fn all_gather(&self, input: Option<&Tensor>, output: &mut Tensor) -> Result<()>;
    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    fn abort(&self);
    fn group_start(&self) -> Result<()> {
        Ok(())
    }
    fn group_end(&self) -> Result<()> {
        Ok(())
    }
}

fn bytes_of(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// The CPU backend: a [`CpuGroup`] over contiguous CPU tensors' memory.
struct CpuBackend {
    group: CpuGroup,
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        self.group.backend_name()
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn all_reduce(&self, t: &mut Tensor, dtype: DType, op: ReduceOp) -> Result<()> {
        // SAFETY: a contiguous CPU tensor owns numel × elt bytes at data_ptr.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, bytes_of(t)) };
        self.group.all_reduce_bytes(buf, dtype, op)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, bytes_of(t)) };
        self.group.broadcast_bytes(buf, root)
    }
    fn all_gather(&self, input: Option<&Tensor>, output: &mut Tensor) -> Result<()> {
        let bytes = bytes_of(output) / self.group.world();
        // SAFETY: validated sizes; aliasing checked by the caller.
        unsafe {
            self.group.all_gather_raw(
                input.map(|i| i.data_ptr() as *const u8),
                output.data_ptr() as *mut u8,
                bytes,
            )
        }
    }
    fn reduce_scatter(
        &self,
        input: &Tensor,
        output: &mut Tensor,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        // SAFETY: validated sizes; aliasing checked by the caller.
        unsafe {
            self.group.reduce_scatter_raw(
                input.data_ptr() as *const u8,
                output.data_ptr() as *mut u8,
                output.numel(),
                dtype,
                op,
            )
        }
    }
    fn barrier(&self) -> Result<()> {
        self.group.barrier()
    }
    fn abort(&self) {
        self.group.abort()
    }
}

/// The collectives of one rank. Built collectively: every rank of the world calls the same
/// constructor with the same store and prefix.
pub struct Communicator {
    info: RankInfo,
    backend: Option<Box<dyn Backend>>,
    timeout: Duration,
}

impl std::fmt::Debug for Communicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Communicator")
            .field("info", &self.info)
            .field("backend", &self.backend_name())
            .finish()
    }
}

impl Communicator {
    /// A world of one: every collective is the identity (or a copy).
    pub fn single() -> Self {
        Self {
            info: RankInfo::single(),
            backend: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Builds the CPU backend (a [`CpuGroup`]): shared memory when every rank is on this node
    /// (unless `cfg.transport` says TCP), else a TCP ring.
    pub fn cpu(store: &dyn Store, info: RankInfo, cfg: &CommConfig) -> Result<Self> {
        let group = CpuGroup::new(store, info, cfg)?;
        Ok(Self {
            info,
            backend: (group.world() > 1)
                .then(|| Box::new(CpuBackend { group }) as Box<dyn Backend>),
            timeout: cfg.timeout,
        })
    }

    /// Wraps a backend (the NCCL constructor uses this).
    pub(crate) fn with_backend(
        info: RankInfo,
        backend: Box<dyn Backend>,
        timeout: Duration,
    ) -> Self {
        Self {
            info,
            backend: Some(backend),
            timeout,
        }
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }
    pub fn world(&self) -> usize {
        self.info.world
    }
    pub fn local_rank(&self) -> usize {
        self.info.local_rank
    }
    pub fn local_world(&self) -> usize {
        self.info.local_world
    }
    pub fn info(&self) -> RankInfo {
        self.info
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// "single", "cpu-shm", "cpu-tcp" or "nccl".
    pub fn backend_name(&self) -> &'static str {
        self.backend.as_ref().map_or("single", |b| b.name())
    }

    fn check(&self, op: &'static str, t: &Tensor) -> Result<DType> {
        let dtype = DType::from_kind(t.kind())?;
        if !t.is_contiguous() {
            return Err(CollectiveError::InvalidArgument {
                op,
                what: "tensor is not contiguous: call .contiguous() first".into(),
            });
        }
        Ok(dtype)
    }

    /// The device the backend works on, when `t` is elsewhere (a CPU scalar in a NCCL job, say):
    /// the op then runs on a staging copy there and the result is copied back.
    fn staging_device(&self, t: &Tensor) -> Option<Device> {
        self.backend
            .as_ref()
            .map(|b| b.device())
            .filter(|&d| d != t.device())
    }

    fn check_op(&self, op: &'static str, dtype: DType, rop: ReduceOp) -> Result<()> {
        if rop == ReduceOp::Avg && !dtype.is_float() {
            return Err(CollectiveError::InvalidArgument {
                op,
                what: format!("average of {dtype:?} is not defined: use Sum and divide"),
            });
        }
        Ok(())
    }

    /// In place: every rank's `t` becomes the reduction of all ranks' `t`.
    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let dtype = self.check("all_reduce", t)?;
        self.check_op("all_reduce", dtype, op)?;
        match (&self.backend, self.staging_device(t)) {
            (None, _) => Ok(()),
            (Some(b), None) => b.all_reduce(t, dtype, op),
            (Some(b), Some(d)) => {
                let mut staged = t.to_device(d);
                b.all_reduce(&mut staged, dtype, op)?;
                t.copy_(&staged);
                Ok(())
            }
        }
    }

    /// In place: every rank's `t` becomes rank `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check("broadcast", t)?;
        if root >= self.world() {
            return Err(CollectiveError::InvalidArgument {
                op: "broadcast",
                what: format!("root {root} is not a rank of a world of {}", self.world()),
            });
        }
        match (&self.backend, self.staging_device(t)) {
            (None, _) => Ok(()),
            (Some(b), None) => b.broadcast(t, root),
            (Some(b), Some(d)) => {
                let mut staged = t.to_device(d);
                b.broadcast(&mut staged, root)?;
                t.copy_(&staged);
                Ok(())
            }
        }
    }

    /// Checks both tensors of a two-tensor op and that they share one dtype.
    fn check_pair(&self, op: &'static str, input: &Tensor, output: &Tensor) -> Result<DType> {
        let dtype = self.check(op, input)?;
        if self.check(op, output)? != dtype {
            return Err(CollectiveError::InvalidArgument {
                op,
                what: format!(
                    "input is {:?} but output is {:?}",
                    input.kind(),
                    output.kind()
                ),
            });
        }
        Ok(dtype)
    }

    /// `output` (world × input.numel() elements, any shape) receives every rank's `input` in rank
    /// order. `input` may be this rank's block of `output` (a `narrow` of it).
    pub fn all_gather(&self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        const OP: &str = "all_gather";
        self.check_pair(OP, input, output)?;
        if output.numel() != input.numel() * self.world() {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                what: format!(
                    "output has {} elements, expected world {} × input {}",
                    output.numel(),
                    self.world(),
                    input.numel()
                ),
            });
        }
        let in_place = alias_block(input, output, self.rank())?;
        match &self.backend {
            None => {
                if !in_place {
                    output.view(input.size().as_slice()).copy_(input);
                }
                Ok(())
            }
            Some(b) => match self
                .staging_device(output)
                .or_else(|| self.staging_device(input))
            {
                None => b.all_gather(if in_place { None } else { Some(input) }, output),
                Some(d) => {
                    // The staged output holds this rank's block already when input aliases it.
                    let mut staged = output.to_device(d);
                    let input = (!in_place).then(|| input.to_device(d));
                    b.all_gather(input.as_ref(), &mut staged)?;
                    output.copy_(&staged);
                    Ok(())
                }
            },
        }
    }

    /// `output` receives block `rank` (output.numel() elements) of the reduction of every rank's
    /// `input` (world × output.numel() elements). `output` may be this rank's block of `input`.
    pub fn reduce_scatter(&self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        const OP: &str = "reduce_scatter";
        let dtype = self.check_pair(OP, input, output)?;
        self.check_op(OP, dtype, op)?;
        if input.numel() != output.numel() * self.world() {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                what: format!(
                    "input has {} elements, expected world {} × output {}",
                    input.numel(),
                    self.world(),
                    output.numel()
                ),
            });
        }
        alias_block(output, input, self.rank())?;
        match &self.backend {
            None => {
                if output.data_ptr() != input.data_ptr() {
                    output.copy_(&input.view(output.size().as_slice()));
                }
                Ok(())
            }
            Some(b) => match self
                .staging_device(output)
                .or_else(|| self.staging_device(input))
            {
                None => b.reduce_scatter(input, output, dtype, op),
                Some(d) => {
                    let mut staged = output.to_device(d);
                    b.reduce_scatter(&input.to_device(d), &mut staged, dtype, op)?;
                    output.copy_(&staged);
                    Ok(())
                }
            },
        }
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        match &self.backend {
            None => Ok(()),
            Some(b) => b.barrier(),
        }
    }

    /// Fails this rank's pending and future calls and makes the peers' calls fail promptly.
    pub fn abort(&self) {
        if let Some(b) = &self.backend {
            b.abort();
        }
    }

    /// Runs `f` as one group (NCCL fuses the calls inside; the CPU backend runs them in order).
    pub fn group<T>(&self, f: impl FnOnce(&Self) -> Result<T>) -> Result<T> {
        if let Some(b) = &self.backend {
            b.group_start()?;
        }
        let r = f(self);
        if let Some(b) = &self.backend {
            let end = b.group_end();
            if r.is_ok() {
                end?;
            }
        }
        r
    }
}

/// Whether `block` is exactly block `index` of `whole` (true), or disjoint from it (false).
/// Partial overlap is an error.
fn alias_block(block: &Tensor, whole: &Tensor, index: usize) -> Result<bool> {
    let es = block.kind().elt_size_in_bytes();
    let b0 = block.data_ptr() as usize;
    let b1 = b0 + block.numel() * es;
    let w0 = whole.data_ptr() as usize;
    let w1 = w0 + whole.numel() * es;
    if b1 <= w0 || w1 <= b0 || block.numel() == 0 {
        return Ok(false);
    }
    if b0 == w0 + index * block.numel() * es {
        return Ok(true);
    }
    Err(CollectiveError::InvalidArgument {
        op: "collective",
        what: "input and output overlap other than at this rank's block".into(),
    })
}
