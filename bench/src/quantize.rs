//! `ddetr bench quantize`: ddetr's INT8 model against the FP32 one and against onnxruntime's own
//! `quantize_static` of the same float graph (the peer: `bench/peers/ort_quantize_static.py`,
//! QDQ, per-channel INT8 weights, UINT8 activations, MinMax, the same calibration inputs and the
//! same nodes left float), all three scored by the same code (onnxruntime, ddetr's post-process,
//! COCOeval on the spec's validation data) and timed the same way (one image, median).
//!
//! The peer runs with the python of the venv that holds libtorch and onnxruntime (`--python`,
//! else `$VIRTUAL_ENV/bin/python`); without one the bench prints `peer: unavailable` and
//! measures ours alone.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use clap::Args;
use ddetr_dataset::cache::{ensure_split, Split};
use ddetr_trainer::onnx_runtime::OnnxModel;
use ddetr_trainer::quantize::{self, Settings};

use crate::peer;

const PEER: &str = include_str!("../peers/ort_quantize_static.py");

#[derive(Debug, Clone, Args)]
pub struct QuantizeBenchArgs {
    /// The experiment spec (its quantize, export and dataset sections).
    #[arg(
        short = 'e',
        long = "experiment-spec",
        default_value = "configs/shapes_tiny.yaml"
    )]
    pub spec: PathBuf,
    /// The trained checkpoint (quantize.model_path).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Extra `key=value` overrides of the spec (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Python with onnxruntime for the peer (default: $VIRTUAL_ENV/bin/python).
    #[arg(long, value_name = "PYTHON")]
    pub python: Option<PathBuf>,
    /// Measure ours only.
    #[arg(long)]
    pub no_peer: bool,
    /// Output folder.
    #[arg(long, default_value = "results/bench_quantize")]
    pub out: PathBuf,
}

fn python(args: &QuantizeBenchArgs) -> Result<PathBuf, String> {
    let p = match &args.python {
        Some(p) => p.clone(),
        None => PathBuf::from(
            std::env::var_os("VIRTUAL_ENV").ok_or("VIRTUAL_ENV is not set and no --python")?,
        )
        .join("bin/python"),
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} not found", p.display()))
    }
}

pub fn run(args: &QuantizeBenchArgs) -> anyhow::Result<()> {
    let mut overrides = args.overrides.clone();
    overrides.push(format!("quantize.model_path={}", args.checkpoint.display()));
    overrides.push(format!("quantize.results_dir={}", args.out.display()));
    let spec = ddetr_trainer::spec::load(&args.spec, &overrides, None)?.spec;
    let ours = quantize::quantize(&spec)?;
    let (Some((f_stats, q_stats)), Some((f_ms, q_ms))) = (&ours.scores, ours.latency_ms) else {
        anyhow::bail!(
            "the bench needs dataset.val_data_sources and quantize.backend_kwargs.latency_runs > 0"
        );
    };
    let mb = |b: usize| b as f64 / 1e6;
    println!(
        "{:<22} {:>8} {:>8} {:>9} {:>11}",
        "model", "mAP50", "mAP", "MB", "latency ms"
    );
    let row = |name: &str, m50: f64, m: f64, bytes: usize, ms: f64| {
        println!(
            "{name:<22} {m50:>8.4} {m:>8.4} {:>9.2} {ms:>11.2}",
            mb(bytes)
        );
    };
    row(
        "fp32",
        f_stats.map50(),
        f_stats.map(),
        ours.fp32_bytes,
        f_ms,
    );
    row(
        "ddetr int8",
        q_stats.map50(),
        q_stats.map(),
        ours.int8_bytes,
        q_ms,
    );
    let mut line = format!(
        "fp32_map50={:.4} fp32_map={:.4} int8_map50={:.4} int8_map={:.4} map50_delta={:+.4} fp32_mb={:.2} int8_mb={:.2} size_ratio={:.3} fp32_ms={f_ms:.2} int8_ms={q_ms:.2} latency_ratio={:.3}",
        f_stats.map50(),
        f_stats.map(),
        q_stats.map50(),
        q_stats.map(),
        q_stats.map50() - f_stats.map50(),
        mb(ours.fp32_bytes),
        mb(ours.int8_bytes),
        ours.int8_bytes as f64 / ours.fp32_bytes as f64,
        q_ms / f_ms,
    );
    let py = if args.no_peer {
        None
    } else {
        python(args).map_err(|why| peer::unavailable(&why)).ok()
    };
    if let Some(py) = py {
        let settings =
            Settings::from_spec(&spec.quantize).map_err(|(k, m)| anyhow::anyhow!("{k} {m}"))?;
        let hw = (spec.export.input_height, spec.export.input_width);
        let calib: Vec<u8> = quantize::calibration_inputs(&spec, &settings, hw)?
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let dir = &ours.results_dir;
        std::fs::write(dir.join("calibration_inputs.f32"), calib)?;
        std::fs::write(
            dir.join("float_nodes.json"),
            serde_json::to_vec(&ours.float_nodes)?,
        )?;
        std::fs::write(dir.join("ort_quantize_static.py"), PEER)?;
        let peer_file = dir.join("model_int8_ort.onnx");
        let out = Command::new(&py)
            .arg(dir.join("ort_quantize_static.py"))
            .arg("--model")
            .arg(&ours.fp32_file)
            .arg("--out")
            .arg(&peer_file)
            .arg("--calib")
            .arg(dir.join("calibration_inputs.f32"))
            .arg("--shape")
            .arg(format!("1,3,{},{}", hw.0, hw.1))
            .arg("--exclude")
            .arg(dir.join("float_nodes.json"))
            .output()
            .context("running the onnxruntime quantize_static peer")?;
        if !out.status.success() {
            anyhow::bail!(
                "the peer failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
        }
        let bytes = std::fs::read(&peer_file)?;
        let mut model = OnnxModel::new(&bytes, 0)?;
        let cache = ensure_split(&spec.dataset, Split::Val, 0, false)?;
        let stats = quantize::score(&mut model, &spec, &cache, hw)?;
        let runs = settings.latency_runs;
        let probe = vec![0.1f32; (3 * hw.0 * hw.1) as usize];
        let ms = quantize::latency_ms(&mut model, &probe, hw, runs)?;
        // Ours again beside it: the machine's load moves between the two timings.
        let mut q8 = OnnxModel::new(&std::fs::read(&ours.int8_file)?, 0)?;
        let q_ms2 = quantize::latency_ms(&mut q8, &probe, hw, runs)?;
        row(
            "onnxruntime int8",
            stats.map50(),
            stats.map(),
            bytes.len(),
            ms,
        );
        println!("(ddetr int8 timed again beside it: {q_ms2:.2} ms)");
        line += &format!(
            " peer_int8_map50={:.4} peer_int8_map={:.4} peer_int8_mb={:.2} peer_int8_ms={ms:.2} int8_ms_again={q_ms2:.2} latency_vs_peer={:.3}",
            stats.map50(),
            stats.map(),
            mb(bytes.len()),
            q_ms2 / ms,
        );
    }
    println!("{line}");
    Ok(())
}
