//! `ddetr bench distill`: does the teacher help? The same DINO student trained alone (`train`)
//! and distilled from a trained teacher (`distill`), each for the same wall time under
//! `ddetr-launch` on this node's CPU ranks, on the spec's data; both curves in one PNG.
//!
//! - The spec (default `configs/shapes_dino_distill.yaml`) names the student, the teacher's
//!   model and the bindings; `train` ignores its distill section, so the same file trains the
//!   student alone.
//! - The teacher: `--teacher PATH`, else trained first by `train -e --teacher-spec` (default
//!   `configs/shapes_dino_tiny.yaml`) for `--teacher-minutes`.
//! - The last line: `minutes=… distilled_final_map50=… distilled_final_map=…
//!   alone_final_map50=… alone_final_map=… map50_gain=… teacher_map50=…` (the teacher's last
//!   validation when this run trained it).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use ddetr_trainer::plot::Series;

use crate::ranks::{launch_cpu, output_dir};
use crate::train::{ap_chart, curve_points, final_ap, print_curve, xy, CurvePoint};
use crate::UsageError;

#[derive(Debug, Args)]
pub struct DistillArgs {
    /// Wall-clock minutes each student trains (validations included).
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// The student's spec with its distill section.
    #[arg(long, default_value = "configs/shapes_dino_distill.yaml")]
    pub spec: PathBuf,
    /// A trained teacher checkpoint (skips training one).
    #[arg(long, value_name = "PATH")]
    pub teacher: Option<PathBuf>,
    /// The spec the teacher is trained with when --teacher is not given.
    #[arg(long, default_value = "configs/shapes_dino_tiny.yaml")]
    pub teacher_spec: PathBuf,
    /// Minutes the teacher trains when --teacher is not given.
    #[arg(long, default_value_t = 15.0)]
    pub teacher_minutes: f64,
    /// Extra `key=value` overrides of both students' spec (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Trainer processes (CPU ranks) of each run.
    #[arg(long, default_value_t = 2)]
    pub nproc: u32,
    /// Output folder.
    #[arg(long, default_value = "results/bench_distill")]
    pub out: PathBuf,
}

pub fn run(args: &DistillArgs) -> anyhow::Result<()> {
    if !(args.minutes > 0.0 && args.teacher_minutes > 0.0) || args.nproc == 0 {
        return Err(UsageError(
            "--minutes and --teacher-minutes must be positive and --nproc at least 1".into(),
        )
        .into());
    }
    let spec = ddetr_trainer::spec::load(&args.spec, &args.overrides, None)?.spec;
    if spec.distill.is_none() {
        return Err(UsageError(format!(
            "{} has no distill section: give a DINO student spec with distill.teacher and distill.bindings (configs/shapes_dino_distill.yaml)",
            args.spec.display()
        ))
        .into());
    }
    for src in spec
        .dataset
        .train_data_sources
        .iter()
        .chain(&spec.dataset.val_data_sources)
    {
        if !Path::new(&src.json_file).is_file() {
            return Err(UsageError(format!(
                "{} is missing: generate the shapes sets first (make demo, or ddetr dataset synth as scripts/demo.sh does)",
                src.json_file
            ))
            .into());
        }
    }
    let out = output_dir(&args.out)?;

    let (teacher, teacher_map50) = match &args.teacher {
        Some(p) => (
            std::fs::canonicalize(p).with_context(|| format!("--teacher {}", p.display()))?,
            None,
        ),
        None => {
            println!(
                "teacher: {} for {} minutes …",
                args.teacher_spec.display(),
                args.teacher_minutes
            );
            let dir = out.join("teacher");
            let _ = std::fs::remove_dir_all(&dir);
            let task = spec_task("train", &args.teacher_spec, &dir, args.teacher_minutes, &[]);
            launch_cpu(args.nproc, &task, &out.join("teacher.log"))?;
            let curve = read_curve(&dir.join("train/status.json"))?;
            (
                dir.join("train/dd_model_latest.safetensors"),
                curve.last().map(|p| p.map50),
            )
        }
    };

    println!("student alone: {} minutes …", args.minutes);
    let alone_dir = out.join("alone");
    let _ = std::fs::remove_dir_all(&alone_dir);
    let task = spec_task(
        "train",
        &args.spec,
        &alone_dir,
        args.minutes,
        &args.overrides,
    );
    launch_cpu(args.nproc, &task, &out.join("alone.log"))?;
    let alone = read_curve(&alone_dir.join("train/status.json"))?;

    println!("student distilled: {} minutes …", args.minutes);
    let distilled_dir = out.join("distilled");
    let _ = std::fs::remove_dir_all(&distilled_dir);
    let mut overrides = args.overrides.clone();
    overrides.push(format!(
        "distill.pretrained_teacher_model_path={}",
        teacher.display()
    ));
    let task = spec_task(
        "distill",
        &args.spec,
        &distilled_dir,
        args.minutes,
        &overrides,
    );
    launch_cpu(args.nproc, &task, &out.join("distilled.log"))?;
    let distilled = read_curve(&distilled_dir.join("distill/status.json"))?;

    print_curve("distilled", &distilled);
    print_curve("alone", &alone);
    let png = out.join("distill.png");
    let series: Vec<Series<'_>> = vec![
        (
            "distilled mAP50",
            [214, 39, 40],
            xy(&distilled, |p| p.map50),
        ),
        ("distilled mAP", [255, 152, 150], xy(&distilled, |p| p.map)),
        ("alone mAP50", [31, 119, 180], xy(&alone, |p| p.map50)),
        ("alone mAP", [174, 199, 232], xy(&alone, |p| p.map)),
    ];
    ap_chart(
        &png,
        "distillation: the same student with and without its teacher",
        &series,
    )?;
    let (d50, dm) = final_ap(&distilled);
    let (a50, am) = final_ap(&alone);
    println!(
        "minutes={} distilled_final_map50={d50:.4} distilled_final_map={dm:.4} alone_final_map50={a50:.4} alone_final_map={am:.4} map50_gain={:.4} teacher_map50={}",
        args.minutes,
        d50 - a50,
        teacher_map50.map_or("given".into(), |m| format!("{m:.4}"))
    );
    Ok(())
}

/// `<task> -e spec -r dir train.max_minutes=M overrides…`.
fn spec_task(
    task: &str,
    spec: &Path,
    dir: &Path,
    minutes: f64,
    overrides: &[String],
) -> Vec<String> {
    let mut v = vec![
        task.to_string(),
        "-e".into(),
        spec.display().to_string(),
        "-r".into(),
        dir.display().to_string(),
        format!("train.max_minutes={minutes}"),
    ];
    v.extend(overrides.iter().cloned());
    v
}

fn read_curve(status: &Path) -> anyhow::Result<Vec<CurvePoint>> {
    let text =
        std::fs::read_to_string(status).with_context(|| format!("reading {}", status.display()))?;
    let c = curve_points(&text);
    if c.is_empty() {
        bail!("{} has no validation", status.display());
    }
    Ok(c)
}
