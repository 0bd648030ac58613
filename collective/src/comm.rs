//! [`Communicator`]: the collectives over tch tensors, whichever backend moves the bytes.
//!
//! Tensors must be contiguous and of a supported dtype ([`crate::DType`]); CPU tensors go to the
//! CPU backend, CUDA tensors to NCCL. Every rank must issue the same calls in the same order with
//! the same shapes; a mismatch, a dead peer or a peer that stops answering is an error naming the
//! rank, raised within the communicator's timeout.

use std::net::IpAddr;
use std::time::Duration;

use tch::{Device, Tensor};

use crate::cpu::shm::ShmTransport;
use crate::cpu::tcp::TcpTransport;
use crate::cpu::Transport as CpuTransport;
use crate::store::Store;
use crate::{CollectiveError, DType, ReduceOp, Result};

/// Default bound on any one collective: long enough for a slow first step, short enough that a
/// dead job does not sit for the 30 minutes gloo would.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Default bytes of one shared-memory round (all ranks' pieces together): few enough rounds that
/// a rank descheduled by other load costs little, small enough that the segment (6 buffers ×
/// world × round) stays in a server's L3 for the worlds one node runs.
pub const DEFAULT_ROUND_BYTES: usize = 1 << 20;

/// The per-rank piece for `world` ranks when none is configured.
pub fn default_chunk_bytes(world: usize) -> usize {
    (DEFAULT_ROUND_BYTES / world.max(1))
        .next_multiple_of(4096)
        .max(64 << 10)
}

/// Which CPU transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Shared memory when every rank is on this node, else TCP.
    Auto,
    Shm,
    Tcp,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Transport::Auto),
            "shm" => Ok(Transport::Shm),
            "tcp" => Ok(Transport::Tcp),
            other => Err(format!(
                "unknown CPU transport {other:?}: use auto, shm or tcp"
            )),
        }
    }
}

/// How a communicator is built.
#[derive(Debug, Clone)]
pub struct CommConfig {
    /// Bound on every collective and on bootstrap waits.
    pub timeout: Duration,
    /// Store key prefix; communicators built over one store need distinct prefixes.
    pub prefix: String,
    pub transport: Transport,
    /// Shared-memory round piece per rank, bytes (None: [`default_chunk_bytes`]).
    pub chunk_bytes: Option<usize>,
    /// Address the TCP transport publishes for this rank (default: DDETR_CPU_ADDR, else the
    /// address that routes to MASTER_ADDR, else 127.0.0.1).
    pub advertise_addr: Option<IpAddr>,
}

impl Default for CommConfig {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_TIMEOUT,
            prefix: "ddetr/collective".into(),
            transport: Transport::Auto,
            chunk_bytes: None,
            advertise_addr: None,
        }
    }
}

impl CommConfig {
    /// Defaults overridden by DDETR_COLLECTIVE_TIMEOUT_S, DDETR_CPU_TRANSPORT, DDETR_SHM_CHUNK_KB.
    pub fn from_env() -> Result<Self> {
        let mut c = Self::default();
        let bad = |k: &str, v: &str, want: &str| CollectiveError::InvalidArgument {
            op: "config",
            what: format!("{k}={v:?} is not {want}"),
        };
        if let Ok(v) = std::env::var("DDETR_COLLECTIVE_TIMEOUT_S") {
            c.timeout = Duration::from_secs_f64(
                v.parse::<f64>().ok().filter(|s| *s > 0.0).ok_or_else(|| {
                    bad(
                        "DDETR_COLLECTIVE_TIMEOUT_S",
                        &v,
                        "a positive number of seconds",
                    )
                })?,
            );
        }
        if let Ok(v) = std::env::var("DDETR_CPU_TRANSPORT") {
            c.transport = v
                .parse()
                .map_err(|e: String| CollectiveError::InvalidArgument {
                    op: "config",
                    what: e,
                })?;
        }
        if let Ok(v) = std::env::var("DDETR_SHM_CHUNK_KB") {
            c.chunk_bytes = Some(
                v.parse::<usize>()
                    .ok()
                    .filter(|k| *k > 0)
                    .ok_or_else(|| bad("DDETR_SHM_CHUNK_KB", &v, "a positive integer"))?
                    << 10,
            );
        }
        if let Ok(v) = std::env::var("DDETR_CPU_ADDR") {
            c.advertise_addr = Some(
                v.parse()
                    .map_err(|_| bad("DDETR_CPU_ADDR", &v, "an IP address"))?,
            );
        }
        Ok(c)
    }
}

/// Where this process sits in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub local_world: usize,
}

impl RankInfo {
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
        }
    }

    /// From the launcher's (and torchrun's) RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE;
    /// a world of one when none is set.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| -> Result<Option<usize>> {
            match std::env::var(k) {
                Err(_) => Ok(None),
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| CollectiveError::InvalidArgument {
                        op: "rank info",
                        what: format!("{k}={v:?} is not a non-negative integer"),
                    }),
            }
        };
        let world = var("WORLD_SIZE")?.unwrap_or(1);
        let rank = var("RANK")?.unwrap_or(0);
        let local_rank = var("LOCAL_RANK")?.unwrap_or(rank);
        let local_world = var("LOCAL_WORLD_SIZE")?.unwrap_or(world);
        let info = Self {
            rank,
            world,
            local_rank,
            local_world,
        };
        info.validate()?;
        Ok(info)
    }

    fn validate(&self) -> Result<()> {
        if self.world == 0
            || self.rank >= self.world
            || self.local_rank >= self.local_world.max(1)
            || self.local_world > self.world
        {
            return Err(CollectiveError::InvalidArgument {
                op: "rank info",
                what: format!(
                    "inconsistent {self:?}: need rank < world, local_rank < local_world <= world"
                ),
            });
        }
        Ok(())
    }
}

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

/// The CPU backend: a transport over contiguous CPU tensors' memory.
struct CpuBackend {
    transport: Box<dyn CpuTransport>,
    name: &'static str,
    world: usize,
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        self.name
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn all_reduce(&self, t: &mut Tensor, dtype: DType, op: ReduceOp) -> Result<()> {
        // SAFETY: a contiguous CPU tensor owns numel × elt bytes at data_ptr.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, bytes_of(t)) };
        self.transport.all_reduce(buf, dtype, op)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        // SAFETY: as above.
        let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, bytes_of(t)) };
        self.transport.broadcast(buf, root)
    }
    fn all_gather(&self, input: Option<&Tensor>, output: &mut Tensor) -> Result<()> {
        let bytes = bytes_of(output) / self.world;
        // SAFETY: validated sizes; aliasing checked by the caller.
        unsafe {
            self.transport.all_gather(
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
            self.transport.reduce_scatter(
                input.data_ptr() as *const u8,
                output.data_ptr() as *mut u8,
                output.numel(),
                dtype,
                op,
            )
        }
    }
    fn barrier(&self) -> Result<()> {
        self.transport.barrier()
    }
    fn abort(&self) {
        self.transport.abort()
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

/// Identifies the machine: ranks with equal keys can share /dev/shm.
fn node_key() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    format!("{}/{}", host.trim(), boot.trim())
}

fn default_advertise() -> IpAddr {
    if let Ok(master) = std::env::var("MASTER_ADDR") {
        let port = std::env::var("MASTER_PORT")
            .ok()
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(29500);
        if let Ok(Some(addr)) =
            std::net::ToSocketAddrs::to_socket_addrs(&(master.as_str(), port)).map(|mut a| a.next())
        {
            if addr.ip().is_loopback() {
                return addr.ip();
            }
            let bind = if addr.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            if let Ok(sock) = std::net::UdpSocket::bind(bind) {
                if sock.connect(addr).is_ok() {
                    if let Ok(local) = sock.local_addr() {
                        return local.ip();
                    }
                }
            }
        }
    }
    IpAddr::from([127, 0, 0, 1])
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

    /// Builds the CPU backend: shared memory when every rank is on this node (unless
    /// `cfg.transport` says TCP), else a TCP ring.
    pub fn cpu(store: &dyn Store, info: RankInfo, cfg: &CommConfig) -> Result<Self> {
        info.validate()?;
        if info.world == 1 {
            return Ok(Self {
                info,
                backend: None,
                timeout: cfg.timeout,
            });
        }
        let key = &cfg.prefix;
        let transport = match cfg.transport {
            Transport::Auto => {
                store.set(&format!("{key}/node/{}", info.rank), node_key().as_bytes())?;
                let mine = node_key();
                let mut same = true;
                for r in 0..info.world {
                    same &=
                        store.get_wait(&format!("{key}/node/{r}"), cfg.timeout)? == mine.as_bytes();
                }
                if same {
                    Transport::Shm
                } else {
                    Transport::Tcp
                }
            }
            t => t,
        };
        let backend = match transport {
            Transport::Shm => CpuBackend {
                transport: Box::new(ShmTransport::new(
                    store,
                    key,
                    info.rank,
                    info.world,
                    cfg.chunk_bytes
                        .unwrap_or_else(|| default_chunk_bytes(info.world)),
                    cfg.timeout,
                )?),
                name: "cpu-shm",
                world: info.world,
            },
            _ => CpuBackend {
                transport: Box::new(TcpTransport::new(
                    store,
                    key,
                    info.rank,
                    info.world,
                    cfg.advertise_addr.unwrap_or_else(default_advertise),
                    cfg.timeout,
                )?),
                name: "cpu-tcp",
                world: info.world,
            },
        };
        tracing::info!(
            rank = info.rank,
            world = info.world,
            backend = backend.name,
            "communicator ready"
        );
        Ok(Self {
            info,
            backend: Some(Box::new(backend)),
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
        if let Some(b) = &self.backend {
            let want = b.device();
            if t.device() != want {
                return Err(CollectiveError::InvalidArgument {
                    op,
                    what: format!(
                        "tensor is on {:?} but the {} backend works on {want:?}",
                        t.device(),
                        b.name()
                    ),
                });
            }
        }
        Ok(dtype)
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
        match &self.backend {
            None => Ok(()),
            Some(b) => b.all_reduce(t, dtype, op),
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
        match &self.backend {
            None => Ok(()),
            Some(b) => b.broadcast(t, root),
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
            Some(b) => b.all_gather(if in_place { None } else { Some(input) }, output),
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
            Some(b) => b.reduce_scatter(input, output, dtype, op),
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
