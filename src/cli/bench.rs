//! `ddetr bench <name>`: each benchmark prints ours against its peer in one run and ends with one
//! `key=value` line.

#[path = "bench_collective.rs"]
mod collective;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Collective bandwidth (nccl-tests' time/algbw/busbw) against torch.distributed's gloo on the
    /// same world and sizes; spawns the ranks itself.
    Collective(collective::CollectiveArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Collective(args) => collective::run(args),
    }
}
