//! `ddetr bench barrier`: the worker side of `ddetr bench launch`. Joins the job through
//! DDETR_RDZV (the launcher's rendezvous), builds the CPU communicator, passes one barrier and
//! exits. With `--all-reduce` it also sums rank + 1 over the world and checks the total (the
//! multi-node tests use that).

use anyhow::{bail, Context};
use clap::Args;
use ddetr_collective::ReduceOp;
use ddetr_trainer::train::World;

#[derive(Debug, Clone, Args)]
pub struct BarrierArgs {
    /// Also all-reduce (sum) rank + 1 and check the total is world × (world + 1) / 2.
    #[arg(long)]
    all_reduce: bool,
}

pub fn run(args: &BarrierArgs) -> anyhow::Result<()> {
    let world = World::from_env().context("joining the job")?;
    let comm = &world.comm;
    comm.barrier().context("barrier")?;
    if args.all_reduce {
        let mut t = tch::Tensor::from_slice(&[comm.rank() as f64 + 1.0]);
        comm.all_reduce(&mut t, ReduceOp::Sum)
            .context("all_reduce")?;
        let (got, n) = (t.double_value(&[0]), comm.world() as f64);
        let want = n * (n + 1.0) / 2.0;
        if got != want {
            bail!(
                "all_reduce on rank {} gave {got}, expected {want}",
                comm.rank()
            );
        }
        println!(
            "rank {} of {}: barrier passed, all_reduce sum={got} ({})",
            comm.rank(),
            comm.world(),
            comm.backend_name()
        );
    } else {
        println!("rank {} of {}: barrier passed", comm.rank(), comm.world());
    }
    Ok(())
}
