//! `ddetr bench <name>`: each benchmark prints ours against its peer in one run and ends with one
//! `key=value` line that a script can read.

mod collective;
mod data;
mod step;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// One training step (forward, loss, backward, AdamW) of the TAO default model on CPU vs
    /// transformers' Deformable DETR.
    Step(step::StepArgs),
    /// Data path: transform img/s on one core, cache build/open/RSS on COCO-sized annotations.
    Data(data::DataBenchArgs),
    /// Collective bandwidth (nccl-tests' time/algbw/busbw) against torch.distributed's gloo on the
    /// same world and sizes; spawns the ranks itself.
    Collective(collective::CollectiveArgs),
}

pub fn run(cmd: &BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Step(args) => step::step(args),
        BenchCommand::Data(args) => data::data(args),
        BenchCommand::Collective(args) => collective::run(args.clone()),
    }
}
