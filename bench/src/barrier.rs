//! `ddetr bench barrier`: the worker side of `ddetr bench launch`. Joins the job through
//! DDETR_RDZV (the launcher's rendezvous), builds the CPU collectives, passes one barrier and
//! exits. With `--all-reduce` it also sums rank + 1 over the world and checks the total (the
//! multi-node tests use that).
//!
//! The `ddetr` front binary runs these command lines itself, without libtorch
//! (src/bin/ddetr.rs); this path serves `ddetr-torch` run directly. Both call
//! [`ddetr_launcher::bootstrap::barrier_check`] and print the same line.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct BarrierArgs {
    /// Also all-reduce (sum) rank + 1 and check the total is world × (world + 1) / 2.
    #[arg(long)]
    all_reduce: bool,
}

pub fn run(args: &BarrierArgs) -> anyhow::Result<()> {
    let report = ddetr_launcher::bootstrap::barrier_check(args.all_reduce)?;
    println!("{report}");
    Ok(())
}
