//! [`CpuGroup`]: the CPU collectives of one rank over plain memory (byte buffers and slices of
//! [`Element`]s), and how one is configured ([`CommConfig`], [`RankInfo`], [`Transport`]).
//!
//! Built collectively: every rank of the world calls [`CpuGroup::new`] with the same store and
//! prefix. Shared memory when every rank is on this node (unless the config says TCP), else a TCP
//! ring. Every rank must issue the same calls in the same order with the same sizes; a mismatch,
//! a dead peer or a peer that stops answering is an error naming the rank, raised within the
//! group's timeout.

use std::net::IpAddr;
use std::time::Duration;

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

    /// Checks rank < world and local_rank < local_world <= world.
    pub fn validate(&self) -> Result<()> {
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

/// A slice element the group can reduce: f32, f64, i64 (and half's f16, bf16).
pub trait Element: Copy + sealed::Sealed {
    const DTYPE: DType;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! element {
    ($t:ty, $d:ident) => {
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
        }
    };
}
element!(f32, F32);
element!(f64, F64);
element!(i64, I64);
element!(half::f16, F16);
element!(half::bf16, BF16);

/// The CPU collectives of one rank, on memory the caller owns. A world of one has no transport:
/// every call is the identity.
pub struct CpuGroup {
    info: RankInfo,
    transport: Option<Box<dyn CpuTransport>>,
    name: &'static str,
    timeout: Duration,
}

impl std::fmt::Debug for CpuGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuGroup")
            .field("info", &self.info)
            .field("backend", &self.name)
            .finish()
    }
}

impl CpuGroup {
    /// A world of one: every collective is the identity.
    pub fn single() -> Self {
        Self {
            info: RankInfo::single(),
            transport: None,
            name: "single",
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Builds the group: shared memory when every rank is on this node (unless `cfg.transport`
    /// says TCP), else a TCP ring; no transport for a world of one.
    pub fn new(store: &dyn Store, info: RankInfo, cfg: &CommConfig) -> Result<Self> {
        info.validate()?;
        if info.world == 1 {
            return Ok(Self {
                info,
                transport: None,
                name: "single",
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
        let (transport, name): (Box<dyn CpuTransport>, _) = match transport {
            Transport::Shm => (
                Box::new(ShmTransport::new(
                    store,
                    key,
                    info.rank,
                    info.world,
                    cfg.chunk_bytes
                        .unwrap_or_else(|| default_chunk_bytes(info.world)),
                    cfg.timeout,
                )?),
                "cpu-shm",
            ),
            _ => (
                Box::new(TcpTransport::new(
                    store,
                    key,
                    info.rank,
                    info.world,
                    cfg.advertise_addr.unwrap_or_else(default_advertise),
                    cfg.timeout,
                )?),
                "cpu-tcp",
            ),
        };
        tracing::info!(
            rank = info.rank,
            world = info.world,
            backend = name,
            "communicator ready"
        );
        Ok(Self {
            info,
            transport: Some(transport),
            name,
            timeout: cfg.timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }
    pub fn world(&self) -> usize {
        self.info.world
    }
    pub fn info(&self) -> RankInfo {
        self.info
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// "single", "cpu-shm" or "cpu-tcp".
    pub fn backend_name(&self) -> &'static str {
        self.name
    }

    /// In place: `buf` (elements of `dtype`) holds this rank's values and receives the reduction.
    pub fn all_reduce_bytes(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        if op == ReduceOp::Avg && !dtype.is_float() {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                what: format!("average of {dtype:?} is not defined: use Sum and divide"),
            });
        }
        if buf.len() % dtype.size() != 0 {
            return Err(CollectiveError::InvalidArgument {
                op: OP,
                what: format!(
                    "{} bytes is not a whole number of {dtype:?} elements",
                    buf.len()
                ),
            });
        }
        match &self.transport {
            None => Ok(()),
            Some(t) => t.all_reduce(buf, dtype, op),
        }
    }

    /// In place: every rank's `data` becomes the reduction of all ranks' `data`.
    pub fn all_reduce<T: Element>(&self, data: &mut [T], op: ReduceOp) -> Result<()> {
        // SAFETY: Element is sealed to plain numeric types with no padding and no invalid bit
        // patterns; the byte view covers exactly the slice.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                data.as_mut_ptr() as *mut u8,
                std::mem::size_of_val(data),
            )
        };
        self.all_reduce_bytes(bytes, T::DTYPE, op)
    }

    /// In place: the root's `buf` is copied to every rank's.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world() {
            return Err(CollectiveError::InvalidArgument {
                op: "broadcast",
                what: format!("root {root} is not a rank of a world of {}", self.world()),
            });
        }
        match &self.transport {
            None => Ok(()),
            Some(t) => t.broadcast(buf, root),
        }
    }

    /// Gathers `bytes` from every rank into `output` (world × bytes, rank order). With `input`
    /// None, this rank's part is already at `output + rank × bytes`. A world of one copies.
    ///
    /// # Safety
    /// `output` is valid for world × bytes; `input`, if any, for bytes and either equal to this
    /// rank's part of `output` or disjoint from `output`.
    pub unsafe fn all_gather_raw(
        &self,
        input: Option<*const u8>,
        output: *mut u8,
        bytes: usize,
    ) -> Result<()> {
        match &self.transport {
            None => {
                if let Some(i) = input {
                    if i != output as *const u8 {
                        // SAFETY: the caller's contract: both valid for `bytes`, disjoint.
                        unsafe { std::ptr::copy_nonoverlapping(i, output, bytes) };
                    }
                }
                Ok(())
            }
            // SAFETY: forwarded contract.
            Some(t) => unsafe { t.all_gather(input, output, bytes) },
        }
    }

    /// Reduces `input` (world × count elements of `dtype`) across ranks; this rank receives
    /// block `rank` (count elements) in `output`. A world of one copies.
    ///
    /// # Safety
    /// `input` is valid for world × count elements, `output` for count; `output` is either
    /// exactly this rank's block of `input` or disjoint from it.
    pub unsafe fn reduce_scatter_raw(
        &self,
        input: *const u8,
        output: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        match &self.transport {
            None => {
                if input != output as *const u8 {
                    // SAFETY: the caller's contract: both valid for count elements, disjoint.
                    unsafe { std::ptr::copy_nonoverlapping(input, output, count * dtype.size()) };
                }
                Ok(())
            }
            // SAFETY: forwarded contract.
            Some(t) => unsafe { t.reduce_scatter(input, output, count, dtype, op) },
        }
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        match &self.transport {
            None => Ok(()),
            Some(t) => t.barrier(),
        }
    }

    /// Fails this rank's pending and future calls and makes the peers' calls fail promptly.
    pub fn abort(&self) {
        if let Some(t) = &self.transport {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InProcessStore;
    use std::sync::Arc;

    fn run_world<T: Send + 'static>(
        world: usize,
        transport: Transport,
        f: impl Fn(CpuGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let store = Arc::new(InProcessStore::new());
        let f = Arc::new(f);
        let prefix = format!("test/{}/{transport:?}", std::process::id());
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (store, f, prefix) = (store.clone(), f.clone(), prefix.clone());
                std::thread::spawn(move || {
                    let info = RankInfo {
                        rank,
                        world,
                        local_rank: rank,
                        local_world: world,
                    };
                    let cfg = CommConfig {
                        timeout: Duration::from_secs(20),
                        prefix,
                        transport,
                        ..CommConfig::default()
                    };
                    f(CpuGroup::new(&*store, info, &cfg).expect("group builds"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_of_slices_over_both_transports() {
        for transport in [Transport::Shm, Transport::Tcp] {
            let got = run_world(3, transport, |g| {
                g.barrier().unwrap();
                let r = g.rank() as f64;
                let mut f = [r + 1.0, 2.0 * r];
                g.all_reduce(&mut f, ReduceOp::Sum).unwrap();
                let mut i = [g.rank() as i64 * 10];
                g.all_reduce(&mut i, ReduceOp::Max).unwrap();
                let mut a = [r as f32];
                g.all_reduce(&mut a, ReduceOp::Avg).unwrap();
                (g.backend_name(), f, i, a)
            });
            for (name, f, i, a) in got {
                assert_eq!(name, format!("cpu-{transport:?}").to_lowercase());
                assert_eq!(f, [6.0, 6.0]);
                assert_eq!(i, [20]);
                assert_eq!(a, [1.0]);
            }
        }
    }

    #[test]
    fn a_world_of_one_is_the_identity_and_checks_arguments() {
        let g = CpuGroup::new(
            &InProcessStore::new(),
            RankInfo::single(),
            &CommConfig::default(),
        )
        .unwrap();
        assert_eq!(g.backend_name(), "single");
        g.barrier().unwrap();
        let mut v = [1.5f64, -2.0];
        g.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        assert_eq!(v, [1.5, -2.0]);
        let e = g.all_reduce(&mut [3i64], ReduceOp::Avg).unwrap_err();
        assert!(
            e.to_string().contains("average of I64 is not defined"),
            "{e}"
        );
        let e = g
            .all_reduce_bytes(&mut [0u8; 6], DType::F32, ReduceOp::Sum)
            .unwrap_err();
        assert!(e.to_string().contains("6 bytes"), "{e}");
        let e = g.broadcast_bytes(&mut [0u8; 4], 1).unwrap_err();
        assert!(e.to_string().contains("root 1"), "{e}");
    }

    #[test]
    fn inconsistent_rank_info_is_refused() {
        let info = RankInfo {
            rank: 2,
            world: 2,
            local_rank: 0,
            local_world: 2,
        };
        let e = CpuGroup::new(&InProcessStore::new(), info, &CommConfig::default()).unwrap_err();
        assert!(e.to_string().contains("need rank < world"), "{e}");
    }
}
