//! `ddetr bench step`: our training step vs the peer (transformers' Deformable DETR,
//! `/work/shared/peers/hf_ddetr_step.py`) in one run; the last line is `key=value` figures with
//! `step_s=` our median.

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
    let median = ours.median_s();
    println!(
        "ddetr: device={} params={} ({:.1}M) batch={} size={} activation_checkpoint={} steps={:?} median_step={:.3}s loss={:.3} peak_rss={peak} MiB",
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
        median,
        ours.final_loss
    );
    let peer = if args.no_peer {
        None
    } else {
        Some(run_peer(args)?)
    };
    match peer {
        Some(p) => {
            println!("peer (transformers): median_step={p:.3}s");
            println!(
                "step_s={median:.3} peer_step_s={p:.3} ratio={:.3} params={} batch={} size={} threads={} activation_checkpoint={} peak_rss_mb={peak}",
                median / p,
                ours.params,
                args.batch,
                args.size,
                args.threads,
                args.activation_checkpoint
            );
        }
        None => println!(
            "step_s={median:.3} params={} batch={} size={} threads={} activation_checkpoint={} peak_rss_mb={peak}",
            ours.params, args.batch, args.size, args.threads, args.activation_checkpoint
        ),
    }
    Ok(())
}
