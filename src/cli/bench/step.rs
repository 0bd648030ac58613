//! `ddetr bench step`: our training step vs the peer (transformers' Deformable DETR,
//! `/work/shared/peers/hf_ddetr_step.py`) in one run, alternating the two `--rounds` times; the
//! last line is `key=value` figures with `step_s=` our median and `ratio=` the median of the
//! rounds' ours/peer.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Args;

/// Flags of `ddetr bench step`.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// Images per step.
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    /// Square image side in pixels.
    #[arg(long, default_value_t = 320)]
    pub size: i64,
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// CPU threads for both sides (the peer script uses 2).
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    /// The peer script; skip the peer with --no-peer.
    #[arg(long, default_value = "/work/shared/peers/hf_ddetr_step.py")]
    pub peer: PathBuf,
    /// Python of the peers venv (default: what /work/shared/peers/venv.sh prints).
    #[arg(long)]
    pub python: Option<PathBuf>,
    /// Measure ours only.
    #[arg(long)]
    pub no_peer: bool,
    /// Run both sides on CUDA device 0 instead of the CPU.
    #[arg(long)]
    pub cuda: bool,
    /// Ours with `train.activation_checkpoint` (backbone recomputed in backward); the peak
    /// resident memory of the step is printed either way, so two runs compare the modes.
    #[arg(long)]
    pub activation_checkpoint: bool,
    /// Alternate ours and the peer this many times (ours, peer, ours, peer, …); the ratio is the
    /// median of each round's ours/peer, so a machine whose speed drifts over minutes (shared
    /// hosts drift ±30% here) compares the two at the same moments.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
}

/// Runs the peer and returns its median step seconds.
fn run_peer(args: &StepArgs) -> anyhow::Result<f64> {
    let python = super::peers_python(args.python.as_deref(), &args.peer.with_file_name("venv.sh"))?;
    let out = Command::new(&python)
        .env("DEVICE", if args.cuda { "cuda" } else { "cpu" })
        .arg(&args.peer)
        .args([
            args.batch.to_string(),
            args.size.to_string(),
            args.steps.to_string(),
        ])
        .output()
        .with_context(|| format!("running {} {}", python.display(), args.peer.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "peer {} exited with {}: {}",
            args.peer.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.contains("median_step="))
        .context("peer printed no median_step=")?;
    let value = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("median_step="))
        .map(|v| v.trim_end_matches('s'))
        .context("peer printed no median_step=")?;
    value
        .parse::<f64>()
        .with_context(|| format!("peer median_step '{value}' is not a number"))
}

pub fn step(args: &StepArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads);
    let device = if args.cuda {
        if !tch::Cuda::is_available() {
            bail!("--cuda asked for a GPU but libtorch sees no CUDA device: drop --cuda or run on a GPU machine");
        }
        tch::Device::Cuda(0)
    } else {
        tch::Device::Cpu
    };
    if args.rounds == 0 {
        bail!("--rounds 0 measures nothing: give at least 1");
    }
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let ours = ddetr_trainer::bench::step_bench(
            args.batch,
            args.size,
            args.steps,
            device,
            args.activation_checkpoint,
        )?;
        let peak = ours.peak_rss.map_or("n/a".to_string(), |b| {
            format!("{:.0}", b as f64 / (1u64 << 20) as f64)
        });
        println!(
            "round {}: ddetr: device={} params={} ({:.1}M) batch={} size={} activation_checkpoint={} steps={:?} median_step={:.3}s loss={:.3} peak_rss={peak} MiB",
            round + 1,
            if args.cuda { "cuda" } else { "cpu" },
            ours.params,
            ours.params as f64 / 1e6,
            args.batch,
            args.size,
            args.activation_checkpoint,
            ours.step_s
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>(),
            ours.median_s(),
            ours.final_loss
        );
        let peer = if args.no_peer {
            None
        } else {
            let p = run_peer(args)?;
            println!(
                "round {}: peer (transformers): median_step={p:.3}s  ratio={:.3}",
                round + 1,
                ours.median_s() / p
            );
            Some(p)
        };
        rounds.push((ours, peer, peak));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        // The mean of the middle two for an even count.
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    let ours_s = median(rounds.iter().map(|(o, _, _)| o.median_s()).collect());
    let (params, peak) = (rounds[0].0.params, rounds[0].2.clone());
    let head = format!("step_s={ours_s:.3}");
    let tail = format!(
        "params={params} batch={} size={} threads={} activation_checkpoint={} rounds={} peak_rss_mb={peak}",
        args.batch, args.size, args.threads, args.activation_checkpoint, args.rounds
    );
    if args.no_peer {
        println!("{head} {tail}");
    } else {
        let peer_s = median(rounds.iter().filter_map(|(_, p, _)| *p).collect());
        let ratio = median(
            rounds
                .iter()
                .filter_map(|(o, p, _)| p.map(|p| o.median_s() / p))
                .collect(),
        );
        println!("{head} peer_step_s={peer_s:.3} ratio={ratio:.3} {tail}");
    }
    Ok(())
}
