//! `ddetr bench launch`: wall time from starting the launcher to every worker having passed one
//! barrier and exited: `ddetr-launch --nodes 1 --nproc-per-node N --device cpu -- bench barrier`
//! against `torchrun --standalone --nproc-per-node N torchrun_barrier.py` (gloo init + barrier),
//! alternating, in the same run. Prints each run and the medians; the last line is
//! `nproc=… runs=… ours_s=… peer_s=… ratio=… agent_only_s=…` (ratio = peer / ours: above 1 means
//! we are faster; agent_only_s is the same launch with `/bin/true` as the worker, i.e. the
//! launcher and rendezvous alone, without the workers' join and communicator).
//!
//! The workers are the `ddetr` front binary next to this one (what `ddetr-launch` runs by
//! default), which passes the barrier without loading libtorch (src/bin/ddetr.rs).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::peer::{self, PeerArgs};
use crate::UsageError;

#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Workers per launch.
    #[arg(long, default_value_t = 4)]
    nproc: u32,
    /// Launches of each (the medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The peer worker script (default: `torchrun_barrier.py` in the peers folder); torchrun is
    /// the one beside the peers' python.
    #[arg(long = "peer", value_name = "SCRIPT")]
    peer_script: Option<PathBuf>,
    #[command(flatten)]
    peer: PeerArgs,
}

fn timed(cmd: &mut Command, what: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {what}"))?;
    let took = t.elapsed();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().rev().take(3).collect();
        bail!(
            "{what} failed ({}): {}",
            out.status,
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(took)
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

pub fn run(args: &LaunchArgs) -> anyhow::Result<()> {
    if args.runs == 0 || args.nproc == 0 {
        bail!(UsageError("--runs and --nproc must be at least 1".into()));
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let launcher = exe.with_file_name("ddetr-launch");
    // This runs in `ddetr-torch` (the front execs it); the workers are the front itself.
    let worker = exe.with_file_name("ddetr");
    for bin in [&launcher, &worker] {
        if !bin.exists() {
            bail!(
                "{} does not exist: build the binaries (`cargo build --release --bins`)",
                bin.display()
            );
        }
    }
    let peer_script = args
        .peer_script
        .clone()
        .unwrap_or_else(|| args.peer.script("torchrun_barrier.py"));
    let torchrun = args
        .peer
        .python(&[&peer_script])
        .map(|python| python.with_file_name("torchrun"))
        .filter(|torchrun| {
            let found = torchrun.is_file();
            if !found {
                peer::unavailable(&format!("{} not found", torchrun.display()));
            }
            found
        });
    let nproc = args.nproc.to_string();
    let (mut ours, mut peer, mut bare) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..args.runs {
        let t = timed(
            Command::new(&launcher)
                .args([
                    "--nodes",
                    "1",
                    "--nproc-per-node",
                    &nproc,
                    "--device",
                    "cpu",
                ])
                .args(["--trainer-bin", "/bin/true", "--", "bench"])
                .env_remove("DDETR_JOB_TOKEN")
                .env("RUST_LOG", "warn"),
            "ddetr-launch … /bin/true",
        )?;
        println!(
            "run {i}: ddetr-launch + /bin/true:      {:.3} s",
            t.as_secs_f64()
        );
        bare.push(t);
        let t = timed(
            Command::new(&launcher)
                .args([
                    "--nodes",
                    "1",
                    "--nproc-per-node",
                    &nproc,
                    "--device",
                    "cpu",
                ])
                .arg("--trainer-bin")
                .arg(&worker)
                .args(["--", "bench", "barrier"])
                .env_remove("DDETR_JOB_TOKEN")
                .env("RUST_LOG", "warn"),
            "ddetr-launch … -- bench barrier",
        )?;
        println!(
            "run {i}: ddetr-launch + bench barrier: {:.3} s",
            t.as_secs_f64()
        );
        ours.push(t);
        if let Some(torchrun) = &torchrun {
            let t = timed(
                Command::new(torchrun)
                    .args(["--standalone", "--nproc-per-node", &nproc])
                    .arg(&peer_script)
                    .env("OMP_NUM_THREADS", "1"),
                "torchrun",
            )?;
            println!(
                "run {i}: torchrun + gloo barrier:       {:.3} s",
                t.as_secs_f64()
            );
            peer.push(t);
        }
    }
    let ours_s = median(&mut ours);
    let bare_s = median(&mut bare);
    if peer.is_empty() {
        println!(
            "nproc={} runs={} ours_s={ours_s:.3} agent_only_s={bare_s:.3}",
            args.nproc, args.runs
        );
    } else {
        let peer_s = median(&mut peer);
        println!(
            "nproc={} runs={} ours_s={ours_s:.3} peer_s={peer_s:.3} ratio={:.2} agent_only_s={bare_s:.3}",
            args.nproc,
            args.runs,
            peer_s / ours_s
        );
    }
    Ok(())
}
