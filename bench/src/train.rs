//! `ddetr bench train`: the CPU step time of the real training path — synthetic JPEGs in a temp
//! dir → dataset cache → loader → DDP (a world of one) → the TAO default model (ResNet-50, 4
//! levels, 6+6 layers, 300 queries, box refinement) → criterion → AdamW with groups → the step's
//! status — through `ddetr_trainer::train::train` itself, against transformers' Deformable DETR
//! (`hf_ddetr_step.py` of the peers folder, [`crate::peer`]) at the same batch and image size in
//! the same run.
//! `--curve status.json` instead prints a run's val mAP50 against wall-clock minutes.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context as _};
use clap::Args;
use ddetr_dataset::synth::{self, SynthOptions};
use ddetr_trainer::plot::{chart, Series};
use ddetr_trainer::process_group::ProcessGroup;
use ddetr_trainer::train;

use crate::peer::PeerArgs;
use crate::step::{HfStep, HF_STEP};

/// Flags of `ddetr bench train`.
#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    /// Images per step.
    #[arg(long, default_value_t = 2)]
    pub batch: u32,
    /// Side of the square synthetic images (and the training resolution) in pixels.
    #[arg(long, default_value_t = 320)]
    pub size: u32,
    /// Timed steps (after one warm-up step); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// The peer script (default: `hf_ddetr_step.py` in the peers folder).
    #[arg(long = "peer", value_name = "SCRIPT")]
    pub peer_script: Option<PathBuf>,
    #[command(flatten)]
    pub peer: PeerArgs,
    /// Instead of timing steps: print val mAP50 against minutes from a run's status.json.
    #[arg(long, value_name = "STATUS_JSON")]
    pub curve: Option<PathBuf>,
}

pub fn run(args: &TrainBenchArgs) -> anyhow::Result<()> {
    match &args.curve {
        Some(path) => curve(path),
        None => step(args),
    }
}

/// The spec of the benchmark run: TAO's model defaults, the synthetic set at `size`² with every
/// augmentation pinned to that size (the random crop takes `size - 1` or `size` per side, so
/// batches are `size`² or one pixel less per side), one epoch, no validation.
fn bench_spec(root: &Path, args: &TrainBenchArgs) -> String {
    let s = args.size;
    let d = root.display();
    format!(
        "results_dir: {d}/results
dataset:
  train_data_sources:
    - image_dir: {d}/train/images
      json_file: {d}/train/annotations.json
  num_classes: 91
  batch_size: {b}
  workers: 2
  augmentation:
    scales: [{s}]
    train_random_resize: [{s}]
    train_random_crop_min: {crop_min}
    train_random_crop_max: {s}
    random_resize_max_size: {s}
    test_random_resize: {s}
train:
  num_epochs: 1
  checkpoint_interval: 1
",
        b = args.batch,
        crop_min = s - 1
    )
}

fn step(args: &TrainBenchArgs) -> anyhow::Result<()> {
    if args.steps == 0 || args.batch == 0 || args.size < 32 {
        bail!("--steps and --batch must be at least 1 and --size at least 32");
    }
    let tmp = tempfile::tempdir().context("creating a temp dir")?;
    let images = args.batch as usize * (args.steps + 1);
    synth::generate(
        &tmp.path().join("train"),
        &SynthOptions {
            images,
            width: args.size,
            height: args.size,
            seed: 1,
            ..SynthOptions::default()
        },
    )?;
    let spec = ddetr_trainer::spec::load_str(&bench_spec(tmp.path(), args), &[], None)?.spec;
    let out = train::train(&spec, &ProcessGroup::single(), &AtomicBool::new(false))?;
    if out.step_s.len() < 2 {
        bail!(
            "the run made {} steps: expected {}",
            out.step_s.len(),
            args.steps + 1
        );
    }
    let mut timed = out.step_s[1..].to_vec();
    timed.sort_by(f64::total_cmp);
    let median = timed[timed.len() / 2];
    let threads = tch::get_num_threads();
    println!(
        "ddetr (train path: loader + DDP world 1 + R50 model + criterion + AdamW): batch={} size={} steps={:?} median_step={median:.3}s threads={threads}",
        args.batch,
        args.size,
        out.step_s
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>(),
    );
    let script = args
        .peer_script
        .clone()
        .unwrap_or_else(|| args.peer.script(HF_STEP));
    let Some(python) = args.peer.python(&[&script]) else {
        println!(
            "step_s={median:.3} batch={} size={} threads={threads}",
            args.batch, args.size
        );
        return Ok(());
    };
    let peer = HfStep {
        python: &python,
        script: &script,
        batch: i64::from(args.batch),
        size: i64::from(args.size),
        steps: args.steps,
        device: "cpu",
        amp: "",
    }
    .run()?
    .step_s;
    println!("peer (transformers, random tensors, no loader): median_step={peer:.3}s");
    println!(
        "step_s={median:.3} peer_step_s={peer:.3} ratio={:.3} batch={} size={} threads={threads}",
        median / peer,
        args.batch,
        args.size
    );
    Ok(())
}

/// Seconds since the epoch of a status record's `date` (m/d/y) and `time` (H:M:S), UTC.
fn record_secs(rec: &serde_json::Value) -> Option<i64> {
    let date: Vec<i64> = rec["date"]
        .as_str()?
        .split('/')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let time: Vec<i64> = rec["time"]
        .as_str()?
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [m, d, y]: [i64; 3] = date.try_into().ok()?;
    let [hh, mm, ss]: [i64; 3] = time.try_into().ok()?;
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}

/// One validated epoch of a run: minutes since the run's first record, epoch, mAP50, mAP.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub minutes: f64,
    pub epoch: u64,
    pub map50: f64,
    pub map: f64,
}

/// The validated epochs of a `status.json`.
pub fn curve_points(text: &str) -> Vec<CurvePoint> {
    let mut t0 = None;
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(rec) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(t) = record_secs(&rec) else { continue };
        // A resumed run appends to the same file: minutes keep counting from the first start.
        let t0 = *t0.get_or_insert(t);
        let kpi = &rec["kpi"];
        if let (Some(e), Some(m50)) = (kpi["epoch"].as_u64(), kpi["val_mAP50"].as_f64()) {
            out.push(CurvePoint {
                minutes: (t - t0) as f64 / 60.0,
                epoch: e,
                map50: m50,
                map: kpi["val_mAP"].as_f64().unwrap_or(f64::NAN),
            });
        }
    }
    out
}

fn curve(path: &Path) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let pts = curve_points(&text);
    if pts.is_empty() {
        bail!(
            "{} has no validated epoch (no val_mAP50 record): give the status.json of a run with validation",
            path.display()
        );
    }
    println!("{:>8} {:>6} {:>7}", "minutes", "epoch", "mAP50");
    for p in &pts {
        println!("{:>8.1} {:>6} {:>7.4}", p.minutes, p.epoch, p.map50);
    }
    let (min, last) = (pts[pts.len() - 1].minutes, pts[pts.len() - 1].map50);
    let best = pts.iter().map(|p| p.map50).fold(0.0, f64::max);
    let reach = minutes_to(&pts, 0.5).map_or("never".to_string(), |m| format!("{m:.1}"));
    println!(
        "curve_points={} final_map50={last:.4} best_map50={best:.4} minutes={min:.1} minutes_to_map50_0.5={reach}",
        pts.len()
    );
    Ok(())
}

/// A curve as (minutes, f(point)) pairs for a chart.
pub fn xy(c: &[CurvePoint], f: impl Fn(&CurvePoint) -> f64) -> Vec<(f64, f64)> {
    c.iter().map(|p| (p.minutes, f(p))).collect()
}

/// The curve as a table, each line prefixed by `name`.
pub fn print_curve(name: &str, c: &[CurvePoint]) {
    println!("{name}: {:>8} {:>7} {:>7}", "minutes", "mAP50", "mAP");
    for p in c {
        println!("{name}: {:>8.2} {:>7.4} {:>7.4}", p.minutes, p.map50, p.map);
    }
}

/// Draws AP `series` against minutes into `png` (AP axis 0–1) and prints where.
pub fn ap_chart(png: &Path, title: &str, series: &[Series<'_>]) -> anyhow::Result<()> {
    chart(
        png,
        title,
        "minutes",
        "COCO bbox AP",
        series,
        Some((0.0, 1.0)),
    )?;
    println!("plot: {}", png.display());
    Ok(())
}

/// The last point's (mAP50, mAP); zeros for an empty curve.
pub fn final_ap(c: &[CurvePoint]) -> (f64, f64) {
    c.last().map_or((0.0, 0.0), |p| (p.map50, p.map))
}

/// Minutes until mAP50 first reached `level`, if it did.
pub fn minutes_to(pts: &[CurvePoint], level: f64) -> Option<f64> {
    pts.iter().find(|p| p.map50 >= level).map(|p| p.minutes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_counts_minutes_from_the_first_record() {
        let text = concat!(
            "{\"date\":\"11/21/2026\",\"time\":\"23:58:00\",\"status\":\"STARTED\"}\n",
            "{\"date\":\"11/21/2026\",\"time\":\"23:59:30\",\"kpi\":{\"epoch\":0,\"train_loss\":3.0}}\n",
            "{\"date\":\"11/22/2026\",\"time\":\"0:1:0\",\"kpi\":{\"epoch\":1,\"val_mAP50\":0.25}}\n",
            "{\"date\":\"11/22/2026\",\"time\":\"0:4:0\",\"kpi\":{\"epoch\":2,\"val_mAP50\":0.5,\"val_mAP\":0.3}}\n",
        );
        let p = curve_points(text);
        let got: Vec<(f64, u64, f64)> = p.iter().map(|p| (p.minutes, p.epoch, p.map50)).collect();
        assert_eq!(got, vec![(3.0, 1, 0.25), (6.0, 2, 0.5)]);
        assert!(p[0].map.is_nan());
        assert_eq!(p[1].map, 0.3);
        assert_eq!(minutes_to(&p, 0.5), Some(6.0));
        assert_eq!(minutes_to(&p, 0.6), None);
    }
}
