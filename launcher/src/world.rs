//! Who this node is: a pure function of the flags, the environment and what the host has.
//!
//! Precedence, highest first (DESIGN.md "Process model" 1; torchrun and Lightning are the
//! anchors, ../shared/reference/distributed-anchors.md §1, §4):
//!
//! | value          | flag              | DDETR_* env            | torchrun env            | Slurm                               | Kubernetes                                           | default                 |
//! |----------------|-------------------|------------------------|-------------------------|-------------------------------------|------------------------------------------------------|-------------------------|
//! | nodes          | `--nodes`         | `DDETR_NODES`          | `WORLD_SIZE` (see below)| `SLURM_NNODES`, `SLURM_JOB_NUM_NODES` | `PET_NNODES`                                       | 1                       |
//! | trainers/node  | `--gpus-per-node`, `--nproc-per-node` | `DDETR_NPROC_PER_NODE` | —       | —                                   | `PET_NPROC_PER_NODE`                                 | auto                    |
//! | node rank      | `--node-rank`     | `DDETR_NODE_RANK`      | `NODE_RANK`, `GROUP_RANK` | `SLURM_NODEID`                    | `PET_NODE_RANK`, `JOB_COMPLETION_INDEX`, `RANK` (PyTorchJob) | 0 on one node   |
//! | master address | `--master-addr`   | `DDETR_MASTER_ADDR`    | `MASTER_ADDR`           | first host of `SLURM_JOB_NODELIST`  | `PET_MASTER_ADDR`                                    | 127.0.0.1 on one node   |
//! | master port    | `--master-port`   | `DDETR_MASTER_PORT`    | `MASTER_PORT`           | 15000 + last 4 digits of `SLURM_JOB_ID` | `PET_MASTER_PORT`                                | a free port on one node, else 29500 |
//! | device         | `--device`        | `DDETR_DEVICE`         | —                       | —                                   | —                                                    | auto                    |
//! | job id         | —                 | `DDETR_JOB_ID`         | `TORCHELASTIC_RUN_ID`   | `SLURM_JOB_ID`                      | `PET_RDZV_ID`                                        | none                    |
//!
//! `WORLD_SIZE` counts nodes in older PyTorchJobs and processes under torchrun/Lightning and newer
//! PyTorchJobs. When the node count comes from a lower source (Slurm, `PET_NNODES`) it is accepted
//! if it equals nodes or nodes × trainers per node; alone it is read as nodes when that is the only
//! reading (one trainer per node, or not a multiple of it), else it is ambiguous. A flag or
//! `DDETR_NODES` overrides it. Empty variables count as unset.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::str::FromStr;

use crate::args::{Args, DeviceChoice, Slots};
use crate::gpu::GpuProbe;
use crate::hostlist::Hostlist;
use crate::LaunchError;

/// The environment as a map (a snapshot, so resolution is pure and testable).
pub type Env = BTreeMap<String, String>;

/// The process environment, lossily converted to UTF-8.
pub fn process_env() -> Env {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// What resolution needs to know about the machine.
pub trait Host {
    /// Visible CUDA GPUs; called only when the device may be CUDA.
    fn gpus(&mut self) -> GpuProbe;
    /// CPU cores this process may use.
    fn cores(&self) -> usize;
    /// A TCP port that is free right now on this host.
    fn free_port(&mut self) -> std::io::Result<u16>;
}

/// The real machine.
pub struct ThisHost;

impl Host for ThisHost {
    fn gpus(&mut self) -> GpuProbe {
        crate::gpu::probe()
    }

    fn cores(&self) -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    fn free_port(&mut self) -> std::io::Result<u16> {
        // Bound and released at once; the small race with other programs is torchrun's too.
        // The trainers' TCP store (under plain torchrun env) and the QUIC rendezvous (UDP) may
        // both use it: take one free in both.
        let mut last = None;
        for _ in 0..20 {
            let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            let port = listener.local_addr()?.port();
            match std::net::UdpSocket::bind(("0.0.0.0", port)) {
                Ok(_) => return Ok(port),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried at least once"))
    }
}

/// A value and where it came from (`--nodes`, `SLURM_NNODES`, `default`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub source: String,
}

fn sourced<T>(value: T, source: impl Into<String>) -> Sourced<T> {
    Sourced {
        value,
        source: source.into(),
    }
}

/// Where the trainers compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
        })
    }
}

/// This node's resolved place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub nodes: Sourced<u32>,
    pub node_rank: Sourced<u32>,
    pub nproc_per_node: Sourced<u32>,
    pub device: Sourced<Device>,
    /// Visible GPUs when they were counted.
    pub gpus: Option<usize>,
    pub cores: usize,
    pub master_addr: Sourced<String>,
    pub master_port: Sourced<u16>,
    pub job_id: Option<Sourced<String>>,
    /// Things the user should know (a CPU fallback, an ignored variable); the binary prints them.
    pub notices: Vec<String>,
}

impl World {
    /// Trainers in the whole job.
    pub fn world_size(&self) -> u32 {
        self.nodes.value * self.nproc_per_node.value
    }

    /// Global rank of this node's local rank `local` (node-major).
    pub fn global_rank(&self, local: u32) -> u32 {
        self.node_rank.value * self.nproc_per_node.value + local
    }

    /// `quic://MASTER_ADDR:MASTER_PORT` (IPv6 addresses bracketed).
    pub fn rdzv(&self) -> String {
        let addr = &self.master_addr.value;
        if addr.contains(':') && !addr.starts_with('[') {
            format!("quic://[{addr}]:{}", self.master_port.value)
        } else {
            format!("quic://{addr}:{}", self.master_port.value)
        }
    }

    /// The world as `key=value` lines, then `source.key=…` lines (`--dry-run`).
    pub fn render(&self) -> String {
        let mut s = String::new();
        let first = self.global_rank(0);
        let last = self.global_rank(self.nproc_per_node.value - 1);
        let _ = writeln!(s, "nodes={}", self.nodes.value);
        let _ = writeln!(s, "node_rank={}", self.node_rank.value);
        let _ = writeln!(s, "nproc_per_node={}", self.nproc_per_node.value);
        let _ = writeln!(s, "world_size={}", self.world_size());
        let _ = writeln!(s, "ranks={first}-{last}");
        let _ = writeln!(s, "device={}", self.device.value);
        match self.gpus {
            Some(g) => {
                let _ = writeln!(s, "gpus={g}");
            }
            None => {
                let _ = writeln!(s, "gpus=not counted");
            }
        }
        let _ = writeln!(s, "cores={}", self.cores);
        let _ = writeln!(s, "master_addr={}", self.master_addr.value);
        let _ = writeln!(s, "master_port={}", self.master_port.value);
        let _ = writeln!(s, "rdzv={}", self.rdzv());
        let _ = writeln!(
            s,
            "job_id={}",
            self.job_id.as_ref().map_or("none", |j| j.value.as_str())
        );
        let _ = writeln!(s, "source.nodes={}", self.nodes.source);
        let _ = writeln!(s, "source.node_rank={}", self.node_rank.source);
        let _ = writeln!(s, "source.nproc_per_node={}", self.nproc_per_node.source);
        let _ = writeln!(s, "source.device={}", self.device.source);
        let _ = writeln!(s, "source.master_addr={}", self.master_addr.source);
        let _ = writeln!(s, "source.master_port={}", self.master_port.source);
        if let Some(j) = &self.job_id {
            let _ = writeln!(s, "source.job_id={}", j.source);
        }
        s
    }
}

/// Reads variables; empty ones count as unset.
struct Vars<'a>(&'a Env);

impl Vars<'_> {
    fn get(&self, var: &str) -> Option<&str> {
        self.0.get(var).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn parse<T: FromStr>(
        &self,
        var: &str,
        expected: &'static str,
    ) -> Result<Option<Sourced<T>>, LaunchError> {
        match self.get(var) {
            None => Ok(None),
            Some(text) => {
                text.parse()
                    .map(|v| Some(sourced(v, var)))
                    .map_err(|_| LaunchError::BadValue {
                        var: var.to_string(),
                        value: text.to_string(),
                        expected,
                    })
            }
        }
    }

    /// The first of `vars` that is set, parsed.
    fn first<T: FromStr>(
        &self,
        vars: &[&str],
        expected: &'static str,
    ) -> Result<Option<Sourced<T>>, LaunchError> {
        for var in vars {
            if let Some(v) = self.parse(var, expected)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// `PET_NNODES`: `N` or torchrun's `MIN:MAX`, which must be fixed (`N:N`).
    fn pet_nnodes(&self) -> Result<Option<Sourced<u32>>, LaunchError> {
        let Some(text) = self.get("PET_NNODES") else {
            return Ok(None);
        };
        let bad = || LaunchError::BadValue {
            var: "PET_NNODES".into(),
            value: text.to_string(),
            expected: "a node count N or a fixed range N:N",
        };
        let (lo, hi) = text.split_once(':').unwrap_or((text, text));
        let (lo, hi): (u32, u32) = (
            lo.parse().map_err(|_| bad())?,
            hi.parse().map_err(|_| bad())?,
        );
        if lo != hi {
            return Err(LaunchError::ElasticRange {
                value: text.to_string(),
            });
        }
        Ok(Some(sourced(lo, "PET_NNODES")))
    }
}

const WHOLE: &str = "a whole number";
const PORT: &str = "a port number (0-65535)";
const SLOTS: &str = "a positive whole number or 'auto'";
/// torchrun's `--master-port` default, used for several nodes when nothing names a port.
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Lightning's Slurm port: this base plus the last four digits of the job id.
const SLURM_PORT_BASE: u16 = 15000;

/// Resolves this node's world. Pure apart from `host` (GPU count only when needed, a free port
/// only for a single node without one).
pub fn resolve(args: &Args, env: &Env, host: &mut dyn Host) -> Result<World, LaunchError> {
    let vars = Vars(env);
    let mut notices = Vec::new();
    let cores = host.cores().max(1);

    // Trainers per node and device first: WORLD_SIZE's reading depends on them.
    let slots = resolve_slots(args, &vars)?;
    let device_choice = resolve_device_choice(args, &vars)?;
    let Placement {
        device,
        nproc,
        gpus,
    } = place_trainers(args, slots, device_choice, cores, host, &mut notices)?;

    let nodes = resolve_nodes(args, &vars, &nproc)?;
    check_world_fits(&nodes, &nproc)?;
    notices.extend(ignored_world_size(&vars, &nodes, &nproc));
    let node_rank = resolve_node_rank(args, &vars, &nodes)?;
    let master_addr = resolve_master_addr(args, &vars, &nodes)?;
    let master_port = resolve_master_port(args, &vars, &nodes, host)?;
    let job_id = vars.first::<String>(
        &[
            "DDETR_JOB_ID",
            "TORCHELASTIC_RUN_ID",
            "SLURM_JOB_ID",
            "PET_RDZV_ID",
        ],
        "",
    )?;

    Ok(World {
        nodes,
        node_rank,
        nproc_per_node: nproc,
        device,
        gpus,
        cores,
        master_addr,
        master_port,
        job_id,
        notices,
    })
}

/// Trainers per node as asked: `--gpus-per-node`, `--nproc-per-node`, the environment, or `auto`.
fn resolve_slots(args: &Args, vars: &Vars) -> Result<Sourced<Slots>, LaunchError> {
    Ok(if let Some(s) = args.gpus_per_node {
        sourced(s, "--gpus-per-node")
    } else if let Some(s) = args.nproc_per_node {
        sourced(s, "--nproc-per-node")
    } else if let Some(s) = vars.first(&["DDETR_NPROC_PER_NODE", "PET_NPROC_PER_NODE"], SLOTS)? {
        s
    } else {
        sourced(Slots::Auto, "default")
    })
}

/// The device as asked: `--device`, `DDETR_DEVICE`, or `auto`.
fn resolve_device_choice(args: &Args, vars: &Vars) -> Result<Sourced<DeviceChoice>, LaunchError> {
    Ok(match args.device {
        Some(d) => sourced(d, "--device"),
        None => vars
            .parse("DDETR_DEVICE", "one of auto, cpu, cuda")?
            .unwrap_or_else(|| sourced(DeviceChoice::Auto, "default")),
    })
}

/// Where the trainers compute, how many run on this node, and the GPUs counted on the way.
struct Placement {
    device: Sourced<Device>,
    nproc: Sourced<u32>,
    gpus: Option<usize>,
}

/// The device and trainers per node from what was asked; counts the GPUs unless the device is
/// `cpu`, and falls back to the CPU (with a notice) when `auto` finds none.
fn place_trainers(
    args: &Args,
    slots: Sourced<Slots>,
    device_choice: Sourced<DeviceChoice>,
    cores: usize,
    host: &mut dyn Host,
    notices: &mut Vec<String>,
) -> Result<Placement, LaunchError> {
    let gpus_asked = args.gpus_per_node.is_some();
    match device_choice.value {
        DeviceChoice::Cpu => {
            if gpus_asked {
                return Err(LaunchError::GpusOnCpu {
                    device_source: device_choice.source,
                });
            }
            Ok(Placement {
                device: sourced(Device::Cpu, device_choice.source),
                nproc: trainers_on_cpu(slots, cores, "one per CPU core"),
                gpus: None,
            })
        }
        DeviceChoice::Auto | DeviceChoice::Cuda => {
            let probe = host.gpus();
            let g = probe.count();
            let (device, nproc) = if g == 0 {
                no_gpu_fallback(slots, device_choice, gpus_asked, cores, &probe, notices)?
            } else {
                trainers_on_gpus(slots, device_choice, g)?
            };
            Ok(Placement {
                device,
                nproc,
                gpus: Some(g),
            })
        }
    }
}

/// The slots' count, or for `auto` one trainer per CPU core (`why` names that in the source).
fn trainers_on_cpu(slots: Sourced<Slots>, cores: usize, why: &str) -> Sourced<u32> {
    match slots.value {
        Slots::Count(n) => sourced(n, slots.source),
        Slots::Auto => sourced(cores as u32, format!("{} ({why})", slots.source)),
    }
}

/// No GPU was found: an error when CUDA or a GPU count was asked for, else the CPU with a notice.
fn no_gpu_fallback(
    slots: Sourced<Slots>,
    device_choice: Sourced<DeviceChoice>,
    gpus_asked: bool,
    cores: usize,
    probe: &GpuProbe,
    notices: &mut Vec<String>,
) -> Result<(Sourced<Device>, Sourced<u32>), LaunchError> {
    if device_choice.value == DeviceChoice::Cuda {
        return Err(LaunchError::NoGpu {
            asked_by: format!("--device cuda (from {})", device_choice.source),
            reason: probe.reason(),
        });
    }
    if gpus_asked {
        if let Slots::Count(n) = slots.value {
            return Err(LaunchError::NoGpu {
                asked_by: format!("--gpus-per-node {n}"),
                reason: probe.reason(),
            });
        }
    }
    let nproc = trainers_on_cpu(slots, cores, "no GPU: one per CPU core");
    notices.push(format!(
        "no CUDA GPU ({}): running {} trainer(s) on CPU",
        probe.reason(),
        nproc.value
    ));
    Ok((
        sourced(Device::Cpu, format!("{} (no GPU)", device_choice.source)),
        nproc,
    ))
}

/// `gpus` GPUs were found: the slots' count if there are enough of them, or one per GPU.
fn trainers_on_gpus(
    slots: Sourced<Slots>,
    device_choice: Sourced<DeviceChoice>,
    gpus: usize,
) -> Result<(Sourced<Device>, Sourced<u32>), LaunchError> {
    let nproc = match slots.value {
        Slots::Count(n) if n as usize > gpus => {
            return Err(LaunchError::TooFewGpus {
                procs: n,
                procs_source: slots.source,
                gpus,
            })
        }
        Slots::Count(n) => sourced(n, slots.source),
        Slots::Auto => sourced(gpus as u32, format!("{} (one per GPU)", slots.source)),
    };
    Ok((
        sourced(
            Device::Cuda,
            format!("{} ({gpus} GPU(s))", device_choice.source),
        ),
        nproc,
    ))
}

/// The world size (nodes × trainers per node) must fit in 32 bits.
fn check_world_fits(nodes: &Sourced<u32>, nproc: &Sourced<u32>) -> Result<(), LaunchError> {
    if nodes.value.checked_mul(nproc.value).is_none() {
        return Err(LaunchError::BadValue {
            var: nodes.source.clone(),
            value: nodes.value.to_string(),
            expected: "a node count whose product with the trainers per node fits in 32 bits",
        });
    }
    Ok(())
}

/// A notice when `WORLD_SIZE` is set but neither gave the node count nor agrees with it.
fn ignored_world_size(vars: &Vars, nodes: &Sourced<u32>, nproc: &Sourced<u32>) -> Option<String> {
    let ws = vars.get("WORLD_SIZE")?;
    let fits = |n: u32| ws == n.to_string() || ws == (n * nproc.value).to_string();
    if !nodes.source.contains("WORLD_SIZE") && !fits(nodes.value) {
        return Some(format!(
            "WORLD_SIZE={ws} is ignored: {} nodes from {} win",
            nodes.value, nodes.source
        ));
    }
    None
}

/// This node's rank: the flag, the environment in precedence order, or 0 on a single node.
fn resolve_node_rank(
    args: &Args,
    vars: &Vars,
    nodes: &Sourced<u32>,
) -> Result<Sourced<u32>, LaunchError> {
    let node_rank = if let Some(r) = args.node_rank {
        sourced(r, "--node-rank")
    } else if let Some(r) = vars.first(
        &[
            "DDETR_NODE_RANK",
            "NODE_RANK",
            "GROUP_RANK",
            "SLURM_NODEID",
            "PET_NODE_RANK",
            "JOB_COMPLETION_INDEX",
            "RANK",
        ],
        WHOLE,
    )? {
        r
    } else if nodes.value == 1 {
        sourced(0, "default (one node)")
    } else {
        return Err(LaunchError::MissingNodeRank {
            nodes: nodes.value,
            nodes_source: nodes.source.clone(),
        });
    };
    if node_rank.value >= nodes.value {
        return Err(LaunchError::NodeRankOutOfRange {
            rank: node_rank.value,
            rank_source: node_rank.source,
            nodes: nodes.value,
            nodes_source: nodes.source.clone(),
        });
    }
    Ok(node_rank)
}

/// Node 0's address: the flag, the environment, Slurm's first host, or loopback on one node.
fn resolve_master_addr(
    args: &Args,
    vars: &Vars,
    nodes: &Sourced<u32>,
) -> Result<Sourced<String>, LaunchError> {
    Ok(if let Some(a) = &args.master_addr {
        sourced(a.clone(), "--master-addr")
    } else if let Some(a) = vars.first::<String>(&["DDETR_MASTER_ADDR", "MASTER_ADDR"], "")? {
        a
    } else if let Some(first) = slurm_first_host(vars)? {
        first
    } else if let Some(a) = vars.parse::<String>("PET_MASTER_ADDR", "")? {
        a
    } else if nodes.value == 1 {
        sourced("127.0.0.1".to_string(), "default (one node)")
    } else {
        return Err(LaunchError::MissingMasterAddr {
            nodes: nodes.value,
            nodes_source: nodes.source.clone(),
        });
    })
}

/// The rendezvous port: the flag, the environment, Slurm's job id, a free port on one node, or
/// torchrun's default.
fn resolve_master_port(
    args: &Args,
    vars: &Vars,
    nodes: &Sourced<u32>,
    host: &mut dyn Host,
) -> Result<Sourced<u16>, LaunchError> {
    Ok(if let Some(p) = args.master_port {
        sourced(p, "--master-port")
    } else if let Some(p) = vars.first(&["DDETR_MASTER_PORT", "MASTER_PORT"], PORT)? {
        p
    } else if let Some(p) = slurm_port(vars) {
        p
    } else if let Some(p) = vars.parse("PET_MASTER_PORT", PORT)? {
        p
    } else if nodes.value == 1 {
        let port = host.free_port().map_err(LaunchError::FreePort)?;
        sourced(port, "free port (one node)")
    } else {
        sourced(DEFAULT_MASTER_PORT, "default")
    })
}

fn resolve_nodes(
    args: &Args,
    vars: &Vars,
    nproc: &Sourced<u32>,
) -> Result<Sourced<u32>, LaunchError> {
    if let Some(n) = args.nodes {
        return positive(sourced(n, "--nodes"));
    }
    if let Some(n) = vars.parse("DDETR_NODES", WHOLE)? {
        return positive(n);
    }
    let below = match vars.first(&["SLURM_NNODES", "SLURM_JOB_NUM_NODES"], WHOLE)? {
        Some(n) => Some(n),
        None => vars.pet_nnodes()?,
    };
    let below = below.map(positive).transpose()?;
    let world_size: Option<Sourced<u32>> = vars.parse("WORLD_SIZE", WHOLE)?;
    let p = nproc.value;
    match (world_size, below) {
        (None, Some(n)) => Ok(n),
        (None, None) => Ok(sourced(1, "default")),
        (Some(ws), Some(n)) => {
            if ws.value == n.value {
                Ok(sourced(
                    n.value,
                    format!("{} (WORLD_SIZE={} counts nodes)", n.source, ws.value),
                ))
            } else if u64::from(ws.value) == u64::from(n.value) * u64::from(p) {
                Ok(sourced(
                    n.value,
                    format!("{} (WORLD_SIZE={} counts processes)", n.source, ws.value),
                ))
            } else {
                Err(LaunchError::WorldSizeMismatch {
                    world_size: ws.value,
                    nodes: n.value,
                    nodes_source: n.source,
                    procs: p,
                    procs_source: nproc.source.clone(),
                })
            }
        }
        (Some(ws), None) => {
            let ws = positive(ws)?;
            if p == 1 || ws.value % p != 0 {
                Ok(sourced(ws.value, "WORLD_SIZE (counts nodes)"))
            } else {
                Err(LaunchError::AmbiguousWorldSize {
                    world_size: ws.value,
                    procs: p,
                    procs_source: nproc.source.clone(),
                })
            }
        }
    }
}

fn positive(n: Sourced<u32>) -> Result<Sourced<u32>, LaunchError> {
    if n.value == 0 {
        return Err(LaunchError::BadValue {
            var: n.source,
            value: "0".into(),
            expected: "a node count of at least 1",
        });
    }
    Ok(n)
}

fn slurm_first_host(vars: &Vars) -> Result<Option<Sourced<String>>, LaunchError> {
    for var in ["SLURM_JOB_NODELIST", "SLURM_NODELIST"] {
        if let Some(text) = vars.get(var) {
            let list = Hostlist::parse(text).map_err(|e| LaunchError::Hostlist {
                var: var.to_string(),
                value: text.to_string(),
                reason: e.to_string(),
            })?;
            return Ok(Some(sourced(list.first(), format!("{var} (first host)"))));
        }
    }
    Ok(None)
}

/// Lightning's convention: 15000 + the last four digits of SLURM_JOB_ID, so every node of a job
/// agrees on a port without configuration.
fn slurm_port(vars: &Vars) -> Option<Sourced<u16>> {
    let id = vars.get("SLURM_JOB_ID")?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let last4: u16 = id[id.len().saturating_sub(4)..].parse().ok()?;
    Some(sourced(
        SLURM_PORT_BASE + last4,
        "SLURM_JOB_ID (15000 + its last 4 digits)",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    struct FakeHost {
        gpus: GpuProbe,
        cores: usize,
        probed: bool,
    }

    impl Host for FakeHost {
        fn gpus(&mut self) -> GpuProbe {
            self.probed = true;
            self.gpus.clone()
        }
        fn cores(&self) -> usize {
            self.cores
        }
        fn free_port(&mut self) -> std::io::Result<u16> {
            Ok(41234)
        }
    }

    fn cpu_host() -> FakeHost {
        FakeHost {
            gpus: GpuProbe::Unavailable("no NVIDIA driver (libcuda.so.1 not found)".into()),
            cores: 8,
            probed: false,
        }
    }

    fn gpu_host(n: usize) -> FakeHost {
        FakeHost {
            gpus: GpuProbe::Devices(n),
            cores: 64,
            probed: false,
        }
    }

    fn args(flags: &[&str]) -> Args {
        let mut argv = vec!["ddetr-launch"];
        argv.extend_from_slice(flags);
        Args::try_parse_from(argv).unwrap()
    }

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn world(flags: &[&str], pairs: &[(&str, &str)], host: &mut FakeHost) -> World {
        resolve(&args(flags), &env(pairs), host).unwrap()
    }

    fn error(flags: &[&str], pairs: &[(&str, &str)], host: &mut FakeHost) -> String {
        resolve(&args(flags), &env(pairs), host)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn nothing_given_is_one_node_on_cpu_slots_with_a_notice() {
        let w = world(&[], &[], &mut cpu_host());
        assert_eq!(w.nodes, sourced(1, "default"));
        assert_eq!(w.node_rank, sourced(0, "default (one node)"));
        assert_eq!(
            w.nproc_per_node,
            sourced(8, "default (no GPU: one per CPU core)")
        );
        assert_eq!(w.device.value, Device::Cpu);
        assert_eq!(
            w.master_addr,
            sourced("127.0.0.1".into(), "default (one node)")
        );
        assert_eq!(w.master_port, sourced(41234, "free port (one node)"));
        assert_eq!(w.job_id, None);
        assert_eq!(
            w.notices,
            ["no CUDA GPU (no NVIDIA driver (libcuda.so.1 not found)): running 8 trainer(s) on CPU"]
        );
        assert_eq!(w.world_size(), 8);
        assert_eq!(w.rdzv(), "quic://127.0.0.1:41234");
    }

    #[test]
    fn gpus_are_counted_for_auto() {
        let w = world(&["--gpus-per-node", "auto"], &[], &mut gpu_host(4));
        assert_eq!(
            w.nproc_per_node,
            sourced(4, "--gpus-per-node (one per GPU)")
        );
        assert_eq!(w.device.value, Device::Cuda);
        assert_eq!(w.gpus, Some(4));
        assert!(w.notices.is_empty());
        let w = world(&["--nproc-per-node", "2"], &[], &mut gpu_host(4));
        assert_eq!(w.nproc_per_node.value, 2);
        assert_eq!(w.device.value, Device::Cuda);
    }

    #[test]
    fn cpu_device_never_probes_the_driver() {
        let mut host = gpu_host(4);
        let w = world(&["--device", "cpu"], &[], &mut host);
        assert!(!host.probed);
        assert_eq!(w.device.value, Device::Cpu);
        assert_eq!(w.nproc_per_node, sourced(64, "default (one per CPU core)"));
        assert_eq!(w.gpus, None);
        let w = world(
            &[],
            &[("DDETR_DEVICE", "cpu"), ("DDETR_NPROC_PER_NODE", "3")],
            &mut gpu_host(4),
        );
        assert_eq!(w.nproc_per_node, sourced(3, "DDETR_NPROC_PER_NODE"));
        assert_eq!(w.device, sourced(Device::Cpu, "DDETR_DEVICE"));
    }

    #[test]
    fn cuda_without_a_gpu_is_one_clear_usage_error() {
        let e = resolve(&args(&["--device", "cuda"]), &Env::new(), &mut cpu_host()).unwrap_err();
        assert!(e.is_usage());
        assert_eq!(
            e.to_string(),
            "--device cuda (from --device) but no CUDA GPU is usable here: no NVIDIA driver \
             (libcuda.so.1 not found); run with --device cpu, or on a machine with a GPU"
        );
        let e = error(&["--gpus-per-node", "2"], &[], &mut gpu_host(0));
        assert!(e.starts_with("--gpus-per-node 2 but no CUDA GPU is usable here: the CUDA driver reports no device"), "{e}");
        let e = error(
            &["--gpus-per-node", "2", "--device", "cpu"],
            &[],
            &mut cpu_host(),
        );
        assert!(
            e.contains("--gpus-per-node asks for GPUs but the device is cpu"),
            "{e}"
        );
    }

    #[test]
    fn more_trainers_than_gpus_is_an_error() {
        let e = error(&["--nproc-per-node", "8"], &[], &mut gpu_host(2));
        assert_eq!(
            e,
            "8 trainers per node (from --nproc-per-node) but only 2 GPU(s) are visible: use \
             --nproc-per-node 2 or fewer, or --device cpu"
        );
    }

    #[test]
    fn explicit_count_without_gpu_runs_on_cpu_with_a_notice() {
        let w = world(&["--nproc-per-node", "2"], &[], &mut cpu_host());
        assert_eq!(w.nproc_per_node, sourced(2, "--nproc-per-node"));
        assert_eq!(w.device.value, Device::Cpu);
        assert_eq!(w.notices.len(), 1);
    }

    #[test]
    fn flags_beat_ddetr_env_beat_torchrun_env_beat_slurm_beat_kubernetes() {
        let all = [
            ("DDETR_NODES", "4"),
            ("DDETR_NODE_RANK", "3"),
            ("DDETR_MASTER_ADDR", "ddetr-host"),
            ("DDETR_MASTER_PORT", "1111"),
            ("DDETR_JOB_ID", "ddetr-job"),
            ("WORLD_SIZE", "3"),
            ("NODE_RANK", "2"),
            ("MASTER_ADDR", "torch-host"),
            ("MASTER_PORT", "2222"),
            ("TORCHELASTIC_RUN_ID", "torch-job"),
            ("SLURM_NNODES", "3"),
            ("SLURM_NODEID", "1"),
            ("SLURM_JOB_NODELIST", "slurm[07-09]"),
            ("SLURM_JOB_ID", "987654"),
            ("PET_NNODES", "3"),
            ("PET_NODE_RANK", "1"),
            ("JOB_COMPLETION_INDEX", "1"),
            ("PET_MASTER_ADDR", "k8s-host"),
            ("PET_MASTER_PORT", "4444"),
            ("PET_RDZV_ID", "k8s-job"),
        ];
        let mut pairs: Vec<(&str, &str)> = all.to_vec();
        let flags = [
            "--nodes",
            "5",
            "--node-rank",
            "4",
            "--master-addr",
            "flag-host",
            "--master-port",
            "999",
            "--nproc-per-node",
            "1",
            "--device",
            "cpu",
        ];
        let w = world(&flags, &pairs, &mut cpu_host());
        assert_eq!(
            (
                w.nodes.value,
                w.node_rank.value,
                w.master_addr.value.as_str(),
                w.master_port.value
            ),
            (5, 4, "flag-host", 999)
        );
        assert_eq!(w.nodes.source, "--nodes");
        let flags = ["--nproc-per-node", "1", "--device", "cpu"];
        let w = world(&flags, &pairs, &mut cpu_host());
        assert_eq!(
            (
                w.nodes.value,
                w.node_rank.value,
                w.master_addr.value.as_str(),
                w.master_port.value
            ),
            (4, 3, "ddetr-host", 1111)
        );
        assert_eq!(w.job_id, Some(sourced("ddetr-job".into(), "DDETR_JOB_ID")));
        pairs.retain(|(k, _)| !k.starts_with("DDETR_"));
        let w = world(&flags, &pairs, &mut cpu_host());
        assert_eq!(
            (
                w.nodes.value,
                w.node_rank.value,
                w.master_addr.value.as_str(),
                w.master_port.value
            ),
            (3, 2, "torch-host", 2222)
        );
        assert_eq!(w.nodes.source, "SLURM_NNODES (WORLD_SIZE=3 counts nodes)");
        assert_eq!(w.job_id.as_ref().unwrap().value, "torch-job");
        pairs.retain(|(k, _)| {
            !matches!(
                *k,
                "WORLD_SIZE" | "NODE_RANK" | "MASTER_ADDR" | "MASTER_PORT" | "TORCHELASTIC_RUN_ID"
            )
        });
        let w = world(&flags, &pairs, &mut cpu_host());
        assert_eq!(
            (
                w.nodes.value,
                w.node_rank.value,
                w.master_addr.value.as_str(),
                w.master_port.value
            ),
            (3, 1, "slurm07", 15000 + 7654)
        );
        assert_eq!(w.master_addr.source, "SLURM_JOB_NODELIST (first host)");
        assert_eq!(w.job_id.as_ref().unwrap().value, "987654");
        pairs.retain(|(k, _)| !k.starts_with("SLURM_"));
        let w = world(&flags, &pairs, &mut cpu_host());
        assert_eq!(
            (
                w.nodes.value,
                w.node_rank.value,
                w.master_addr.value.as_str(),
                w.master_port.value
            ),
            (3, 1, "k8s-host", 4444)
        );
        assert_eq!(w.node_rank.source, "PET_NODE_RANK");
        assert_eq!(w.job_id.as_ref().unwrap().value, "k8s-job");
    }

    #[test]
    fn node_rank_sources_in_order() {
        let chain = [
            ("DDETR_NODE_RANK", "7"),
            ("NODE_RANK", "6"),
            ("GROUP_RANK", "5"),
            ("SLURM_NODEID", "4"),
            ("PET_NODE_RANK", "3"),
            ("JOB_COMPLETION_INDEX", "2"),
            ("RANK", "1"),
        ];
        let flags = [
            "--nodes",
            "8",
            "--master-addr",
            "m",
            "--device",
            "cpu",
            "--nproc-per-node",
            "1",
        ];
        for skip in 0..chain.len() {
            let pairs = &chain[skip..];
            let w = world(&flags, pairs, &mut cpu_host());
            assert_eq!(w.node_rank, sourced(7 - skip as u32, chain[skip].0));
        }
    }

    #[test]
    fn node_count_and_address_sources_in_order() {
        let flags = [
            "--node-rank",
            "0",
            "--device",
            "cpu",
            "--nproc-per-node",
            "1",
        ];
        let w = world(
            &flags,
            &[
                ("SLURM_JOB_NUM_NODES", "3"),
                ("PET_NNODES", "5"),
                ("PET_MASTER_ADDR", "k"),
            ],
            &mut cpu_host(),
        );
        assert_eq!(w.nodes, sourced(3, "SLURM_JOB_NUM_NODES"));
        assert_eq!(w.master_addr, sourced("k".into(), "PET_MASTER_ADDR"));
        let w = world(
            &flags,
            &[
                ("SLURM_NNODES", "2"),
                ("SLURM_JOB_NUM_NODES", "3"),
                ("DDETR_MASTER_ADDR", "d"),
                ("MASTER_ADDR", "t"),
            ],
            &mut cpu_host(),
        );
        assert_eq!(w.nodes, sourced(2, "SLURM_NNODES"));
        assert_eq!(w.master_addr, sourced("d".into(), "DDETR_MASTER_ADDR"));
        let w = world(
            &flags,
            &[
                ("SLURM_JOB_NODELIST", "s[1-2]"),
                ("SLURM_NODELIST", "old1"),
                ("SLURM_NNODES", "2"),
            ],
            &mut cpu_host(),
        );
        assert_eq!(w.master_addr.value, "s1");
    }

    #[test]
    fn world_size_overridden_by_a_flag_is_ignored_with_a_notice() {
        let w = world(
            &["--nodes", "1", "--device", "cpu", "--nproc-per-node", "2"],
            &[("WORLD_SIZE", "16")],
            &mut cpu_host(),
        );
        assert_eq!(w.nodes, sourced(1, "--nodes"));
        assert_eq!(
            w.notices,
            ["WORLD_SIZE=16 is ignored: 1 nodes from --nodes win"]
        );
        // Agreeing with either reading: nothing to say.
        let w = world(
            &["--nodes", "1", "--device", "cpu", "--nproc-per-node", "2"],
            &[("WORLD_SIZE", "2")],
            &mut cpu_host(),
        );
        assert!(w.notices.is_empty());
    }

    #[test]
    fn torchrun_env_with_group_rank() {
        let w = world(
            &["--nproc-per-node", "4"],
            &[
                ("WORLD_SIZE", "8"),
                ("GROUP_RANK", "1"),
                ("MASTER_ADDR", "10.0.0.1"),
                ("MASTER_PORT", "29500"),
                ("DDETR_NODES", "2"),
            ],
            &mut gpu_host(4),
        );
        assert_eq!(w.node_rank, sourced(1, "GROUP_RANK"));
        assert_eq!(w.nodes, sourced(2, "DDETR_NODES"));
        assert_eq!(w.world_size(), 8);
        assert_eq!(w.global_rank(0), 4);
        assert_eq!(w.rdzv(), "quic://10.0.0.1:29500");
    }

    #[test]
    fn world_size_counting_nodes_or_processes_against_slurm() {
        let base = [
            ("SLURM_NNODES", "2"),
            ("SLURM_NODEID", "0"),
            ("SLURM_JOB_NODELIST", "n[1-2]"),
        ];
        for (ws, reading) in [("2", "counts nodes"), ("8", "counts processes")] {
            let mut pairs = base.to_vec();
            pairs.push(("WORLD_SIZE", ws));
            let w = world(&["--nproc-per-node", "4"], &pairs, &mut gpu_host(4));
            assert_eq!(w.nodes.value, 2);
            assert!(w.nodes.source.contains(reading), "{}", w.nodes.source);
        }
        let mut pairs = base.to_vec();
        pairs.push(("WORLD_SIZE", "6"));
        let e = error(&["--nproc-per-node", "4"], &pairs, &mut gpu_host(4));
        assert_eq!(
            e,
            "WORLD_SIZE=6 is neither the node count (2, from SLURM_NNODES) nor the process count \
             (2 nodes × 4 per node = 8): unset WORLD_SIZE or make --nodes/--nproc-per-node agree with it"
        );
    }

    #[test]
    fn pytorchjob_old_world_size_counts_pods() {
        // Older Kubeflow: WORLD_SIZE = number of pods, RANK = pod index, MASTER_* = master service.
        let pairs = [
            ("WORLD_SIZE", "3"),
            ("RANK", "2"),
            ("MASTER_ADDR", "job-master-0"),
            ("MASTER_PORT", "23456"),
        ];
        let w = world(&["--nproc-per-node", "4"], &pairs, &mut gpu_host(4));
        assert_eq!(w.nodes, sourced(3, "WORLD_SIZE (counts nodes)"));
        assert_eq!(w.node_rank, sourced(2, "RANK"));
        assert_eq!(w.world_size(), 12);
        assert_eq!(w.global_rank(3), 11);
        // One trainer per node: both readings agree.
        let w = world(&["--nproc-per-node", "1"], &pairs, &mut gpu_host(4));
        assert_eq!(w.nodes.value, 3);
    }

    #[test]
    fn pytorchjob_old_world_size_ambiguous_without_a_node_count() {
        let pairs = [
            ("WORLD_SIZE", "8"),
            ("RANK", "1"),
            ("MASTER_ADDR", "m"),
            ("MASTER_PORT", "23456"),
        ];
        let e = error(&["--nproc-per-node", "4"], &pairs, &mut gpu_host(4));
        assert_eq!(
            e,
            "WORLD_SIZE=8 can be read as 8 nodes (older PyTorchJob) or as 2 nodes × 4 processes \
             (torchrun; 4 per node from --nproc-per-node): pass --nodes"
        );
    }

    #[test]
    fn pytorchjob_new_world_size_counts_processes() {
        // Newer Kubeflow: WORLD_SIZE = replicas × nproc, PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK.
        let pairs = [
            ("WORLD_SIZE", "8"),
            ("RANK", "1"),
            ("PET_NNODES", "2"),
            ("PET_NPROC_PER_NODE", "4"),
            ("PET_NODE_RANK", "1"),
            ("MASTER_ADDR", "job-master-0"),
            ("MASTER_PORT", "23456"),
        ];
        let w = world(&[], &pairs, &mut gpu_host(4));
        assert_eq!(
            w.nodes,
            sourced(2, "PET_NNODES (WORLD_SIZE=8 counts processes)")
        );
        assert_eq!(w.nproc_per_node, sourced(4, "PET_NPROC_PER_NODE"));
        assert_eq!(w.node_rank, sourced(1, "PET_NODE_RANK"));
        assert_eq!(w.master_addr.value, "job-master-0");
        assert_eq!(w.world_size(), 8);
        // `N:N` is a fixed node count; `gpu` means one per GPU.
        let pairs = [
            ("PET_NNODES", "2:2"),
            ("PET_NPROC_PER_NODE", "gpu"),
            ("PET_NODE_RANK", "0"),
            ("MASTER_ADDR", "m"),
        ];
        let w = world(&[], &pairs, &mut gpu_host(2));
        assert_eq!((w.nodes.value, w.nproc_per_node.value), (2, 2));
        let e = error(&[], &[("PET_NNODES", "1:4")], &mut gpu_host(2));
        assert_eq!(
            e,
            "PET_NNODES=1:4 is an elastic node range, which ddetr-launch does not support: give a \
             fixed count (--nodes N or PET_NNODES=N)"
        );
    }

    #[test]
    fn indexed_job_uses_job_completion_index() {
        let pairs = [
            ("JOB_COMPLETION_INDEX", "3"),
            ("MASTER_ADDR", "train-0.train"),
        ];
        let w = world(
            &["--nodes", "4", "--nproc-per-node", "1"],
            &pairs,
            &mut gpu_host(1),
        );
        assert_eq!(w.node_rank, sourced(3, "JOB_COMPLETION_INDEX"));
        assert_eq!(
            w.master_addr,
            sourced("train-0.train".into(), "MASTER_ADDR")
        );
        assert_eq!(w.master_port, sourced(DEFAULT_MASTER_PORT, "default"));
    }

    #[test]
    fn slurm_compressed_nodelist_gives_the_first_host() {
        for (list, first) in [
            ("node[01-04,07]", "node01"),
            ("node64-[17-20]", "node64-17"),
            ("gpu7,gpu[8-9]", "gpu7"),
            ("a[3,1]", "a3"),
        ] {
            let pairs = [
                ("SLURM_NNODES", "2"),
                ("SLURM_NODEID", "1"),
                ("SLURM_JOB_NODELIST", list),
            ];
            let w = world(&["--nproc-per-node", "1"], &pairs, &mut cpu_host());
            assert_eq!(w.master_addr.value, first);
        }
        // The older name, and the job-id port.
        let pairs = [
            ("SLURM_NNODES", "2"),
            ("SLURM_NODEID", "0"),
            ("SLURM_NODELIST", "x[5-6]"),
            ("SLURM_JOB_ID", "42"),
        ];
        let w = world(&["--nproc-per-node", "1"], &pairs, &mut cpu_host());
        assert_eq!(
            w.master_addr,
            sourced("x5".into(), "SLURM_NODELIST (first host)")
        );
        assert_eq!(w.master_port.value, 15042);
        let e = error(
            &[],
            &[
                ("SLURM_NNODES", "2"),
                ("SLURM_NODEID", "0"),
                ("SLURM_JOB_NODELIST", "n[2-"),
            ],
            &mut cpu_host(),
        );
        assert_eq!(
            e,
            "SLURM_JOB_NODELIST=\"n[2-\" is not a Slurm hostlist ('[' without a matching ']'): pass --master-addr"
        );
    }

    #[test]
    fn missing_or_bad_values_are_usage_errors() {
        let e = error(&["--nodes", "2"], &[("MASTER_ADDR", "m")], &mut cpu_host());
        assert_eq!(
            e,
            "this node's rank is unknown in a 2-node job (nodes from --nodes): pass --node-rank or \
             set NODE_RANK (Slurm: SLURM_NODEID, Kubernetes: JOB_COMPLETION_INDEX)"
        );
        let e = error(&["--nodes", "2", "--node-rank", "1"], &[], &mut cpu_host());
        assert_eq!(
            e,
            "node 0's address is unknown in a 2-node job (nodes from --nodes): pass --master-addr \
             or set MASTER_ADDR"
        );
        let e = error(
            &["--nodes", "2", "--node-rank", "2"],
            &[("MASTER_ADDR", "m")],
            &mut cpu_host(),
        );
        assert_eq!(
            e,
            "node rank 2 (from --node-rank) is not below the node count 2 (from --nodes): node ranks run 0..=1"
        );
        let e = error(&[], &[("SLURM_NNODES", "two")], &mut cpu_host());
        assert_eq!(
            e,
            "SLURM_NNODES=\"two\" is not a whole number: fix or unset it"
        );
        let e = error(&[], &[("MASTER_PORT", "70000")], &mut cpu_host());
        assert_eq!(
            e,
            "MASTER_PORT=\"70000\" is not a port number (0-65535): fix or unset it"
        );
        let e = error(&[], &[("DDETR_NODES", "0")], &mut cpu_host());
        assert_eq!(
            e,
            "DDETR_NODES=\"0\" is not a node count of at least 1: fix or unset it"
        );
        let e = error(
            &[
                "--nodes",
                "4294967295",
                "--nproc-per-node",
                "2",
                "--device",
                "cpu",
            ],
            &[],
            &mut cpu_host(),
        );
        assert!(
            e.starts_with("--nodes=\"4294967295\" is not a node count whose product"),
            "{e}"
        );
        let e = error(&[], &[("DDETR_DEVICE", "tpu")], &mut cpu_host());
        assert_eq!(
            e,
            "DDETR_DEVICE=\"tpu\" is not one of auto, cpu, cuda: fix or unset it"
        );
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let w = world(
            &["--device", "cpu"],
            &[("MASTER_ADDR", ""), ("NODE_RANK", " "), ("WORLD_SIZE", "")],
            &mut cpu_host(),
        );
        assert_eq!(w.master_addr.value, "127.0.0.1");
        assert_eq!(w.nodes.value, 1);
    }

    #[test]
    fn ipv6_master_is_bracketed_and_render_lists_every_key() {
        let w = world(
            &[
                "--device",
                "cpu",
                "--nproc-per-node",
                "2",
                "--master-addr",
                "fe80::1",
                "--master-port",
                "5",
            ],
            &[],
            &mut cpu_host(),
        );
        assert_eq!(w.rdzv(), "quic://[fe80::1]:5");
        let text = w.render();
        for key in [
            "nodes=1\n",
            "node_rank=0\n",
            "nproc_per_node=2\n",
            "world_size=2\n",
            "ranks=0-1\n",
            "device=cpu\n",
            "gpus=not counted\n",
            "cores=8\n",
            "master_addr=fe80::1\n",
            "master_port=5\n",
            "rdzv=quic://[fe80::1]:5\n",
            "job_id=none\n",
            "source.nodes=default\n",
            "source.master_port=--master-port\n",
        ] {
            assert!(text.contains(key), "{key:?} missing from\n{text}");
        }
        assert!(text.lines().all(|l| l.contains('=')));
    }
}
