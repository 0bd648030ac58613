//! `ddetr bench step`: our training step vs the peer (transformers' Deformable DETR,
//! `hf_ddetr_step.py` of the peers folder) in one run, alternating the two `--rounds` times; the
//! last line is `key=value` figures with `step_s=` our median and `ratio=` the median of the
//! rounds' ours/peer. The step is `ddetr train`'s ([`crate::training_step`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;
use clap::{Args, ValueEnum};
use ddetr_trainer::spec::{Architecture, Backbone, Precision};

use crate::peer::{self, PeerArgs};
use crate::training_step::{step_bench, StepBenchConfig};

/// The peer script of `bench step` and `bench train`, in the peers folder.
pub const HF_STEP: &str = "hf_ddetr_step.py";

/// `--precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchPrecision {
    Fp32,
    Fp16,
    Bf16,
}

impl BenchPrecision {
    fn name(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Fp16 => "fp16",
            Self::Bf16 => "bf16",
        }
    }

    fn spec(self) -> Precision {
        match self {
            Self::Fp32 => Precision::Fp32,
            Self::Fp16 => Precision::Fp16,
            Self::Bf16 => Precision::Bf16,
        }
    }
}

/// `--size`: `N` (square) or `HxW`.
fn parse_size(s: &str) -> Result<(i64, i64), String> {
    let bad = || format!("--size '{s}': give N (square) or HxW, e.g. 320 or 800x1333");
    let parse = |v: &str| match v.trim().parse::<i64>() {
        Ok(n) if n >= 32 => Ok(n),
        Ok(_) => Err(format!(
            "--size '{s}': each side must be at least 32 pixels"
        )),
        Err(_) => Err(bad()),
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

/// Flags of `ddetr bench step`.
#[derive(Debug, Args)]
pub struct StepArgs {
    /// Images per step.
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    /// Image size in pixels: N for N×N or HxW (e.g. 800x1333, ours only: the peer script takes
    /// square sizes, so give 1024 to compare at about 800×1333's pixel count).
    #[arg(long, default_value = "320", value_parser = parse_size)]
    pub size: (i64, i64),
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// CPU threads for both sides (the peer script uses 2).
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    /// The peer script (default: `hf_ddetr_step.py` in the peers folder).
    #[arg(long = "peer", value_name = "SCRIPT")]
    pub peer_script: Option<PathBuf>,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// Run both sides on CUDA device 0 instead of the CPU; adds the peak GPU memory of a step
    /// (`torch.cuda.max_memory_allocated` on both sides).
    #[arg(long)]
    pub cuda: bool,
    /// fp16 or bf16 autocast on both sides (with --cuda; fp16 with dynamic loss scaling).
    #[arg(long, value_enum, default_value_t = BenchPrecision::Fp32)]
    pub precision: BenchPrecision,
    /// Ours with `train.activation_checkpoint` (backbone recomputed in backward); the peak
    /// resident memory of the step is printed either way, so two runs compare the modes.
    #[arg(long)]
    pub activation_checkpoint: bool,
    /// Alternate ours and the peer this many times (ours, peer, ours, peer, …); the ratio is the
    /// median of each round's ours/peer, so a machine whose speed drifts over minutes (shared
    /// hosts drift ±30% here) compares the two at the same moments.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// The detector at TAO's defaults. DINO has no peer that runs here (the official code needs
    /// its CUDA extension, transformers has no DINO): ours is measured alone.
    #[arg(long, value_enum, default_value_t = BenchModel::DeformableDetr)]
    pub model: BenchModel,
    /// A GCViT (`gc_vit_tiny`, …) or FAN (`fan_small`, …): time a training step of the backbone
    /// alone, ours against timm's GCViT (`bench/peers/timm_gcvit_step.py`) or TAO's own FAN
    /// (`bench/peers/tao_fan.py`, TAO's code from $TAO_PYTORCH_BACKEND), with both parameter
    /// counts.
    #[arg(long, value_name = "NAME", value_parser = parse_backbone)]
    pub backbone: Option<Backbone>,
}

/// `--backbone`: a `model.backbone` name.
fn parse_backbone(s: &str) -> Result<Backbone, String> {
    ddetr_trainer::spec::load_str("", &[format!("model.backbone={s}")], None)
        .map(|r| r.spec.model.backbone)
        .map_err(|e| e.to_string())
}

/// `--model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchModel {
    #[value(name = "deformable_detr")]
    DeformableDetr,
    Dino,
}

impl BenchModel {
    fn arch(self) -> Architecture {
        match self {
            Self::DeformableDetr => Architecture::DeformableDetr,
            Self::Dino => Architecture::Dino,
        }
    }
}

/// What the peer printed: median step seconds and, on CUDA, its peak memory in GiB.
pub struct PeerRun {
    pub step_s: f64,
    pub peak_gib: Option<f64>,
}

/// One run of `hf_ddetr_step.py`: `batch` images of `size`² for `steps` timed steps on `device`
/// ("cpu" or "cuda") with autocast `amp` ("", "fp16" or "bf16").
pub struct HfStep<'a> {
    pub python: &'a Path,
    pub script: &'a Path,
    pub batch: i64,
    pub size: i64,
    pub steps: usize,
    pub device: &'static str,
    pub amp: &'static str,
}

impl HfStep<'_> {
    /// Runs the peer and returns its median step seconds (and peak GPU memory on CUDA).
    pub fn run(&self) -> anyhow::Result<PeerRun> {
        let stdout = peer::output(
            Command::new(self.python)
                .env("DEVICE", self.device)
                .env("AMP", self.amp)
                .arg(self.script)
                .args([
                    self.batch.to_string(),
                    self.size.to_string(),
                    self.steps.to_string(),
                ]),
            self.script,
        )?;
        let line = peer::line_with(&stdout, "median_step")?;
        Ok(PeerRun {
            step_s: peer::figure(line, "median_step")?,
            peak_gib: (self.device == "cuda")
                .then(|| peer::figure(line, "peak_gib").ok())
                .flatten(),
        })
    }
}

/// Bytes as GiB.
fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

pub fn run(args: &StepArgs) -> anyhow::Result<()> {
    tch::set_num_threads(args.threads);
    if let Some(kind) = args.backbone {
        if args.cuda || args.activation_checkpoint || args.precision != BenchPrecision::Fp32 {
            bail!("--backbone times the backbone alone in fp32 on the CPU: drop --cuda, --precision and --activation-checkpoint");
        }
        return crate::backbone_step::run(
            kind,
            args.batch,
            args.size,
            args.steps,
            args.threads,
            args.rounds,
            &args.peer,
        );
    }
    let device = if args.cuda {
        if !ddetr_trainer::cuda_runtime::cuda_available() {
            bail!("--cuda asked for a GPU but libtorch sees no CUDA device: drop --cuda or run on a GPU machine");
        }
        tch::Device::Cuda(0)
    } else {
        tch::Device::Cpu
    };
    if args.rounds == 0 {
        bail!("--rounds 0 measures nothing: give at least 1");
    }
    let (height, width) = args.size;
    let no_peer = args.peer.no_peer || args.model == BenchModel::Dino;
    if height != width && !no_peer {
        bail!(
            "--size {height}x{width}: the peer script takes square sizes only; add --no-peer, or give one side (1024 has about 800x1333's pixel count)"
        );
    }
    if args.precision != BenchPrecision::Fp32 && !args.cuda {
        bail!(
            "--precision {} is CUDA autocast: add --cuda on a GPU machine, or drop it for fp32 on the CPU",
            args.precision.name()
        );
    }
    let device_name = if args.cuda { "cuda" } else { "cpu" };
    let script = args
        .peer_script
        .clone()
        .unwrap_or_else(|| args.peer.script(HF_STEP));
    let python = if args.model == BenchModel::Dino {
        println!("peer: none for DINO (the official code needs its CUDA extension; transformers has no DINO): ours only");
        None
    } else {
        args.peer.python(&[&script])
    };
    let hf = python.as_deref().map(|python| HfStep {
        python,
        script: &script,
        batch: args.batch,
        size: height,
        steps: args.steps,
        device: device_name,
        amp: match args.precision {
            BenchPrecision::Fp32 => "",
            p => p.name(),
        },
    });
    let cfg = StepBenchConfig {
        batch: args.batch,
        height,
        width,
        steps: args.steps,
        device,
        activation_checkpoint: args.activation_checkpoint,
        precision: args.precision.spec(),
        arch: args.model.arch(),
    };
    let size = if height == width {
        height.to_string()
    } else {
        format!("{height}x{width}")
    };
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let ours = step_bench(cfg)?;
        let peak = ours.peak_rss.map_or("n/a".to_string(), |b| {
            format!("{:.0}", b as f64 / (1u64 << 20) as f64)
        });
        let gpu = ours
            .peak_device
            .map_or(String::new(), |b| format!(" peak_gpu={:.2} GiB", gib(b)));
        let skipped = if ours.skipped_steps > 0 {
            format!(" fp16_skipped_steps={}", ours.skipped_steps)
        } else {
            String::new()
        };
        println!(
            "round {}: ddetr: model={} device={} precision={} params={} ({:.1}M) batch={} size={size} activation_checkpoint={} steps={:?} median_step={:.3}s imgs_per_s={:.2} loss={:.3} peak_rss={peak} MiB{gpu}{skipped}",
            round + 1,
            args.model.arch().name(),
            device_name,
            args.precision.name(),
            ours.params,
            ours.params as f64 / 1e6,
            args.batch,
            args.activation_checkpoint,
            ours.step_s
                .iter()
                .map(|s| format!("{s:.2}"))
                .collect::<Vec<_>>(),
            ours.median_s(),
            args.batch as f64 / ours.median_s(),
            ours.final_loss
        );
        let peer = if let Some(hf) = &hf {
            let p = hf.run()?;
            let gpu = p
                .peak_gib
                .map_or(String::new(), |g| format!(" peak_gpu={g:.2} GiB"));
            println!(
                "round {}: peer (transformers): median_step={:.3}s imgs_per_s={:.2}{gpu}  ratio={:.3}",
                round + 1,
                p.step_s,
                args.batch as f64 / p.step_s,
                ours.median_s() / p.step_s
            );
            Some(p)
        } else {
            None
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
    let mut head = format!(
        "step_s={ours_s:.3} imgs_per_s={:.2}",
        args.batch as f64 / ours_s
    );
    let mut tail = format!(
        "model={} params={params} batch={} size={size} precision={} device={} threads={} activation_checkpoint={} rounds={} peak_rss_mb={peak}",
        args.model.arch().name(),
        args.batch,
        args.precision.name(),
        device_name,
        args.threads,
        args.activation_checkpoint,
        args.rounds
    );
    let ours_gpu = rounds
        .iter()
        .filter_map(|(o, _, _)| o.peak_device)
        .max()
        .map(gib);
    if let Some(g) = ours_gpu {
        tail.push_str(&format!(" peak_gpu_gib={g:.3}"));
    }
    if hf.is_some() {
        let peer_s = median(
            rounds
                .iter()
                .filter_map(|(_, p, _)| p.as_ref().map(|p| p.step_s))
                .collect(),
        );
        let ratio = median(
            rounds
                .iter()
                .filter_map(|(o, p, _)| p.as_ref().map(|p| o.median_s() / p.step_s))
                .collect(),
        );
        head.push_str(&format!(
            " peer_step_s={peer_s:.3} peer_imgs_per_s={:.2} ratio={ratio:.3}",
            args.batch as f64 / peer_s
        ));
        let peer_gpu = rounds
            .iter()
            .filter_map(|(_, p, _)| p.as_ref().and_then(|p| p.peak_gib))
            .reduce(f64::max);
        if let (Some(ours), Some(peer)) = (ours_gpu, peer_gpu) {
            tail.push_str(&format!(
                " peer_peak_gpu_gib={peer:.3} gpu_mem_ratio={:.3}",
                ours / peer
            ));
        }
    }
    println!("{head} {tail}");
    Ok(())
}
