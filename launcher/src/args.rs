//! The `ddetr-launch` command line (clap derive; the binary only parses it and calls [`crate::run`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

/// ddetr-launch: one agent per node. Resolves this node's place in the job (flags > DDETR_* env >
/// torchrun env > Slurm > Kubernetes), starts one `ddetr` trainer per GPU or CPU slot, prefixes
/// their output with `[rank N]`, restarts them all when one dies, and forwards SIGTERM/SIGINT.
/// Exit codes: 0 ok, 1 a trainer failed after its restarts, 2 usage, 128+N stopped by signal N.
#[derive(Debug, Clone, Parser)]
#[command(name = "ddetr-launch", version)]
pub struct Args {
    /// Number of nodes (agents) in the job [env: DDETR_NODES; else WORLD_SIZE, SLURM_NNODES,
    /// PET_NNODES].
    #[arg(long)]
    pub nodes: Option<u32>,
    /// Trainers per node, one per GPU: a number, or `auto` to count the visible GPUs (falls back
    /// to one per CPU core, with a notice).
    #[arg(long, value_name = "G|auto", conflicts_with = "nproc_per_node")]
    pub gpus_per_node: Option<Slots>,
    /// Trainers per node on any device (a number or `auto`) [env: DDETR_NPROC_PER_NODE; else
    /// PET_NPROC_PER_NODE; default auto].
    #[arg(long, value_name = "P|auto")]
    pub nproc_per_node: Option<Slots>,
    /// This node's rank [env: DDETR_NODE_RANK; else NODE_RANK, GROUP_RANK, SLURM_NODEID,
    /// PET_NODE_RANK, JOB_COMPLETION_INDEX, RANK].
    #[arg(long)]
    pub node_rank: Option<u32>,
    /// Address of node 0 [env: DDETR_MASTER_ADDR; else MASTER_ADDR, first host of
    /// SLURM_JOB_NODELIST, PET_MASTER_ADDR; 127.0.0.1 on one node].
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Port on node 0 [env: DDETR_MASTER_PORT; else MASTER_PORT, 15000 + last 4 digits of
    /// SLURM_JOB_ID, PET_MASTER_PORT; a free port on one node].
    #[arg(long)]
    pub master_port: Option<u16>,
    /// How many times the whole group of trainers is restarted after a failure.
    #[arg(long, default_value_t = 0)]
    pub max_restarts: u32,
    /// Seconds node 0's rendezvous waits for every node to join.
    #[arg(long, value_name = "S", default_value_t = 300.0)]
    pub rdzv_timeout: f64,
    /// Seconds between agent heartbeats; a node silent for 3 heartbeats stops the job.
    #[arg(long, value_name = "S", default_value_t = 2.0)]
    pub heartbeat: f64,
    /// Seconds a trainer gets between SIGTERM and SIGKILL of its process group.
    #[arg(long, value_name = "S", default_value_t = 10.0)]
    pub grace: f64,
    /// File holding the job token (else DDETR_JOB_TOKEN, else a random one).
    #[arg(long, value_name = "F")]
    pub token_file: Option<PathBuf>,
    /// Directory for one `rank_N.log` per trainer (stdout and stderr).
    #[arg(long, value_name = "D")]
    pub log_dir: Option<PathBuf>,
    /// Device for the trainers [env: DDETR_DEVICE; default auto: CUDA when a GPU is visible].
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Trainer program (default: the `ddetr` binary next to `ddetr-launch`).
    #[arg(long, value_name = "PATH")]
    pub trainer_bin: Option<PathBuf>,
    /// Print the resolved world (one key=value per line) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Arguments of each trainer, after `--` (e.g. `-- train -e spec.yaml`).
    #[arg(last = true, value_name = "DDETR ARGS")]
    pub command: Vec<OsString>,
}

/// A count of trainers per node, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slots {
    Auto,
    Count(u32),
}

impl FromStr for Slots {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" | "gpu" => Ok(Slots::Auto),
            _ => match s.parse::<u32>() {
                Ok(0) | Err(_) => Err(format!("'{s}' is not a positive whole number or 'auto'")),
                Ok(n) => Ok(Slots::Count(n)),
            },
        }
    }
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <DeviceChoice as clap::ValueEnum>::from_str(s, true)
            .map_err(|_| format!("'{s}' is not one of auto, cpu, cuda"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_command_line() {
        let a = Args::try_parse_from([
            "ddetr-launch",
            "--nodes",
            "1",
            "--gpus-per-node",
            "auto",
            "--max-restarts",
            "3",
            "--device",
            "cpu",
            "--",
            "train",
            "-e",
            "spec.yaml",
        ])
        .unwrap();
        assert_eq!(a.nodes, Some(1));
        assert_eq!(a.gpus_per_node, Some(Slots::Auto));
        assert_eq!(a.max_restarts, 3);
        assert_eq!(a.device, Some(DeviceChoice::Cpu));
        assert_eq!(a.command, ["train", "-e", "spec.yaml"]);
        assert_eq!(a.grace, 10.0);
    }

    #[test]
    fn gpus_and_nproc_conflict_and_zero_is_refused() {
        assert!(
            Args::try_parse_from(["x", "--gpus-per-node", "2", "--nproc-per-node", "2"]).is_err()
        );
        assert!(Args::try_parse_from(["x", "--nproc-per-node", "0"]).is_err());
        assert!(Args::try_parse_from(["x", "--nproc-per-node", "two"]).is_err());
        // Trainer arguments need the `--`.
        assert!(Args::try_parse_from(["x", "train"]).is_err());
    }
}
