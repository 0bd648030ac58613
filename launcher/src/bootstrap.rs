//! The trainer side of a job: where this process sits ([`RankInfo`] from RANK, WORLD_SIZE, …),
//! how its collectives are configured ([`CommConfig`] from DDETR_* env) and the bootstrap
//! [`Store`] to build them over — the launcher's rendezvous (DDETR_RDZV=quic://… with
//! DDETR_JOB_TOKEN, every key under this generation's `g{DDETR_RESTART_COUNT}/` prefix), or under
//! plain torchrun env a TCP store that rank 0 hosts at MASTER_ADDR:MASTER_PORT.
//!
//! Tensor-free on purpose: the trainer wraps a [`Bootstrap`] into its tensor communicator, and
//! `ddetr bench barrier` ([`barrier_check`]) builds a [`CpuGroup`] from it without loading
//! libtorch.

use std::time::Duration;

use ddetr_collective_core::{
    CollectiveError, CommConfig, CpuGroup, RankInfo, ReduceOp, Store, TcpStore, TcpStoreServer,
};

use crate::rdzv::{self, RdzvError};

/// What a process needs to build its communicator.
pub struct Bootstrap {
    pub info: RankInfo,
    /// Defaults for a world of one (the environment is not read then).
    pub cfg: CommConfig,
    /// The bootstrap store; None for a world of one. Only needed while a communicator is being
    /// built: drop it after.
    pub store: Option<Box<dyn Store>>,
    /// Under plain torchrun env, rank 0 hosts the TCP store: keep it for the job's lifetime.
    pub server: Option<TcpStoreServer>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap")
            .field("info", &self.info)
            .field("cfg", &self.cfg)
            .field("store", &self.store.is_some())
            .field("server", &self.server.is_some())
            .finish()
    }
}

/// Why a process could not join its job.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("DDETR_RDZV is {rdzv} but DDETR_JOB_TOKEN is not set: run under ddetr-launch, which sets both")]
    NoToken { rdzv: String },
    #[error("WORLD_SIZE is {world} but MASTER_PORT is not a port number: run under ddetr-launch or set MASTER_ADDR and MASTER_PORT")]
    NoMasterPort { world: usize },
    #[error(transparent)]
    Rdzv(#[from] RdzvError),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

impl Bootstrap {
    /// From the launcher's environment (RANK, WORLD_SIZE, … and DDETR_RDZV with DDETR_JOB_TOKEN,
    /// or MASTER_ADDR/MASTER_PORT under plain torchrun); a world of one without it.
    pub fn from_env() -> Result<Self, BootstrapError> {
        let info = RankInfo::from_env()?;
        if info.world == 1 {
            return Ok(Self {
                info,
                cfg: CommConfig::default(),
                store: None,
                server: None,
            });
        }
        let cfg = CommConfig::from_env()?;
        let rdzv = std::env::var("DDETR_RDZV").unwrap_or_default();
        if let Some(addr) = rdzv::parse_url(&rdzv) {
            let token = std::env::var("DDETR_JOB_TOKEN")
                .map_err(|_| BootstrapError::NoToken { rdzv: rdzv.clone() })?;
            let client = rdzv::Client::connect(addr, token.as_bytes(), cfg.timeout)?;
            // Keys of one generation of trainers never meet another's.
            let restart = std::env::var("DDETR_RESTART_COUNT").unwrap_or_else(|_| "0".into());
            let store = RdzvStore {
                client,
                prefix: format!("g{restart}/"),
            };
            return Ok(Self {
                info,
                cfg,
                store: Some(Box::new(store)),
                server: None,
            });
        }
        let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port: u16 = std::env::var("MASTER_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .ok_or(BootstrapError::NoMasterPort { world: info.world })?;
        let server = if info.rank == 0 {
            Some(TcpStoreServer::bind(("0.0.0.0", port))?)
        } else {
            None
        };
        let store = TcpStore::connect((addr.as_str(), port), cfg.timeout)?;
        Ok(Self {
            info,
            cfg,
            store: Some(Box::new(store)),
            server,
        })
    }

    /// The CPU collectives over this bootstrap (a world of one without a store).
    pub fn cpu_group(&self) -> Result<CpuGroup, CollectiveError> {
        match &self.store {
            None => Ok(CpuGroup::single()),
            Some(store) => CpuGroup::new(store.as_ref(), self.info, &self.cfg),
        }
    }
}

/// The launcher's rendezvous as the collective layer's bootstrap [`Store`], with every key under
/// this generation's prefix.
struct RdzvStore {
    client: rdzv::Client,
    prefix: String,
}

impl RdzvStore {
    fn err(e: RdzvError) -> CollectiveError {
        CollectiveError::Store {
            what: e.to_string(),
        }
    }
}

impl Store for RdzvStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<(), CollectiveError> {
        self.client
            .set(&format!("{}{key}", self.prefix), value)
            .map_err(Self::err)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CollectiveError> {
        self.client
            .get(&format!("{}{key}", self.prefix))
            .map_err(Self::err)
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), CollectiveError> {
        let full: Vec<String> = keys.iter().map(|k| format!("{}{k}", self.prefix)).collect();
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        match self.client.wait(&refs, timeout) {
            Ok(()) => Ok(()),
            Err(RdzvError::Timeout { missing, timeout }) => Err(CollectiveError::StoreTimeout {
                key: missing
                    .strip_prefix(&self.prefix)
                    .unwrap_or(&missing)
                    .to_string(),
                timeout,
            }),
            Err(e) => Err(Self::err(e)),
        }
    }
}

/// What one `ddetr bench barrier` worker saw.
#[derive(Debug, Clone, PartialEq)]
pub struct BarrierReport {
    pub rank: usize,
    pub world: usize,
    /// "single", "cpu-shm" or "cpu-tcp".
    pub backend: &'static str,
    /// The all-reduced sum of rank + 1, when asked for.
    pub sum: Option<f64>,
}

impl std::fmt::Display for BarrierReport {
    /// The worker's output line: `rank R of W: barrier passed[, all_reduce sum=S (backend)]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}: barrier passed", self.rank, self.world)?;
        if let Some(sum) = self.sum {
            write!(f, ", all_reduce sum={sum} ({})", self.backend)?;
        }
        Ok(())
    }
}

/// Why a `ddetr bench barrier` worker failed.
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("joining the job: {0}")]
    Join(#[from] BootstrapError),
    #[error("barrier: {0}")]
    Barrier(CollectiveError),
    #[error("all_reduce: {0}")]
    AllReduce(CollectiveError),
    #[error("all_reduce on rank {rank} gave {got}, expected {want}")]
    WrongSum { rank: usize, got: f64, want: f64 },
}

/// The worker of `ddetr bench launch`: joins the job from the environment, builds the CPU
/// collectives, passes one barrier; with `all_reduce` also sums rank + 1 (f64) over the world and
/// checks the total is world × (world + 1) / 2.
pub fn barrier_check(all_reduce: bool) -> Result<BarrierReport, BarrierError> {
    let boot = Bootstrap::from_env()?;
    let group = boot.cpu_group().map_err(BootstrapError::from)?;
    drop(boot.store);
    group.barrier().map_err(BarrierError::Barrier)?;
    let (rank, world) = (group.rank(), group.world());
    let sum = if all_reduce {
        let mut v = [rank as f64 + 1.0];
        group
            .all_reduce(&mut v, ReduceOp::Sum)
            .map_err(BarrierError::AllReduce)?;
        let n = world as f64;
        let want = n * (n + 1.0) / 2.0;
        if v[0] != want {
            return Err(BarrierError::WrongSum {
                rank,
                got: v[0],
                want,
            });
        }
        Some(v[0])
    } else {
        None
    };
    Ok(BarrierReport {
        rank,
        world,
        backend: group.backend_name(),
        sum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_match_the_bench_output() {
        let r = BarrierReport {
            rank: 1,
            world: 4,
            backend: "cpu-shm",
            sum: None,
        };
        assert_eq!(r.to_string(), "rank 1 of 4: barrier passed");
        let r = BarrierReport {
            sum: Some(10.0),
            ..r
        };
        assert_eq!(
            r.to_string(),
            "rank 1 of 4: barrier passed, all_reduce sum=10 (cpu-shm)"
        );
    }
}
