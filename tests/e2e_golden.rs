//! End to end at the sizes users run, through the real loader: `ddetr evaluate` and
//! `ddetr inference` read image FILES (sizes the val transform keeps and sizes it changes,
//! landscape and portrait, two of one size, mixed in batches) and a transformers
//! `model.safetensors` (ResNet-50, 6+6 layers, 300 queries, d_model 256), and must give
//! transformers' own detections: scores within 1e-4, boxes within 1e-2 px, the same COCO stats.
//!
//! - Padding-free evaluation (`eval_padding: none`, the default) must equal each image run alone
//!   at its own size, at batch 1 and 3, on one rank and two (`ddetr-launch`), for TAO's default
//!   model (4 levels, box refinement), one level without refinement, and two-stage.
//! - TAO's padded evaluation (`eval_padding: tao`) must equal transformers fed TAO's padded batch
//!   (800×1333 / 1333×800 per image, then the batch's largest) and its mask, at batch 1 and 3.
//!
//! Fixtures: `trainer/tests/golden/make_e2e_fixtures.py` (transformers 5, pycocotools). The
//! transformers checkpoint is rebuilt here from its manifest of transformers' keys (the fill rule
//! is shared with the script), so nothing large is committed.

mod common;
#[path = "../trainer/tests/common/mod.rs"]
mod golden;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ddetr_bin, launch_bin, one_node_launch, serial};
use golden::e2e::{e2e_dir, meta, reference, write_transformers_checkpoint, RefDetections};

const SCORE_TOL: f64 = 1e-4;
const BOX_TOL_PX: f64 = 1e-2;
/// COCOeval prints 3 decimals; detections equal within the tolerances above give stats equal to
/// far better than that.
const STATS_TOL: f64 = 1e-4;
/// Upper bound for one run (ResNet-50 at ~1 MP per image on 2 cores).
const PATIENCE: Duration = Duration::from_secs(900);

/// One case's working folder: the transformers checkpoint, the annotations beside which the
/// dataset cache goes, and a spec.
struct Work {
    dir: tempfile::TempDir,
    case: &'static str,
}

impl Work {
    fn new(case: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        write_transformers_checkpoint(case, &dir.path().join("model.safetensors"));
        std::fs::copy(
            e2e_dir().join("annotations.json"),
            dir.path().join("annotations.json"),
        )
        .unwrap();
        let names: String = (1..5).map(|c| format!("class{c}\n")).collect();
        std::fs::write(dir.path().join("classmap.txt"), names).unwrap();
        Self { dir, case }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The spec of this case with `eval_padding` and `batch_size`.
    fn spec(&self, padding: &str, batch: u32) -> PathBuf {
        let c = &meta()["cases"][self.case];
        let levels = c["levels"].as_u64().unwrap();
        let interm = if levels == 1 { "[3]" } else { "[1, 2, 3, 4]" };
        let e2e = e2e_dir();
        let yaml = format!(
            "results_dir: {results}
model:
  backbone: resnet_50
  num_feature_levels: {levels}
  return_interm_indices: {interm}
  with_box_refine: {refine}
  two_stage: {two_stage}
  num_select: {k}
  dropout_ratio: 0.0
dataset:
  num_classes: 5
  batch_size: {batch}
  workers: 1
  test_data_sources:
    image_dir: {images}
    json_file: {ann}
  infer_data_sources:
    image_dir: [{images}]
    classmap: {classmap}
  augmentation:
    eval_padding: {padding}
evaluate:
  checkpoint: {ckpt}
  conf_threshold: 0.0
inference:
  checkpoint: {ckpt}
  conf_threshold: 0.0
",
            results = self
                .path()
                .join(format!("results_{padding}_{batch}"))
                .display(),
            refine = c["refine"],
            two_stage = c["two_stage"],
            k = c["num_select"],
            images = e2e.display(),
            ann = self.path().join("annotations.json").display(),
            classmap = self.path().join("classmap.txt").display(),
            ckpt = self.path().join("model.safetensors").display(),
        );
        let p = self.path().join(format!("spec_{padding}_{batch}.yaml"));
        std::fs::write(&p, yaml).unwrap();
        p
    }

    /// Runs `ddetr <task> -e spec` (under `ddetr-launch` with `world` > 1); returns the stderr.
    /// The runs share the machine's cores: one at a time.
    fn run(&self, task: &str, spec: &Path, world: u32) -> String {
        let _serial = serial();
        let (program, mut args) = if world == 1 {
            (ddetr_bin(), Vec::new())
        } else {
            (launch_bin(), one_node_launch(world))
        };
        args.extend([task.to_string(), "-e".into(), spec.display().to_string()]);
        let (st, stderr) = common::run(
            self.path(),
            &program,
            &args,
            &[("DDETR_DEVICE", "cpu")],
            PATIENCE,
        );
        assert!(st.success(), "ddetr {task} failed ({st}):\n{stderr}");
        stderr
    }
}

/// Image file name by COCO image id (the annotations list a.png … f.png as ids 1…6).
fn names_by_id() -> BTreeMap<i64, String> {
    let ann: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(e2e_dir().join("annotations.json")).unwrap())
            .unwrap();
    ann["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|im| {
            (
                im["id"].as_i64().unwrap(),
                im["file_name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// One of our detections: label, score, xyxy in original pixels.
#[derive(Debug, Clone, Copy)]
struct Det {
    label: i64,
    score: f64,
    xyxy: [f64; 4],
}

/// Matches every reference detection to one of ours (same label, score within `score_tol`, every
/// box coordinate within `box_tol`); returns the largest score and box differences.
fn match_image(
    name: &str,
    ours: &[Det],
    theirs: &[Det],
    score_tol: f64,
    box_tol: f64,
) -> (f64, f64) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{name}: {} detections, transformers {}",
        ours.len(),
        theirs.len()
    );
    let mut used = vec![false; ours.len()];
    let (mut worst_score, mut worst_box) = (0.0f64, 0.0f64);
    for t in theirs {
        let best = ours
            .iter()
            .enumerate()
            .filter(|(i, o)| {
                !used[*i] && o.label == t.label && (o.score - t.score).abs() <= score_tol
            })
            .map(|(i, o)| {
                let d = (0..4)
                    .map(|k| (o.xyxy[k] - t.xyxy[k]).abs())
                    .fold(0.0, f64::max);
                (i, d, (o.score - t.score).abs())
            })
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let Some((i, d, ds)) = best.filter(|b| b.1 <= box_tol) else {
            panic!(
                "{name}: transformers' detection {t:?} has no counterpart within {score_tol:e} in score and {box_tol:e} px; nearest of ours: {:?}",
                best.map(|b| ours[b.0])
            );
        };
        used[i] = true;
        worst_score = worst_score.max(ds);
        worst_box = worst_box.max(d);
    }
    (worst_score, worst_box)
}

fn reference_dets(r: &RefDetections) -> Vec<Det> {
    r.scores
        .iter()
        .zip(&r.labels)
        .zip(&r.boxes)
        .map(|((s, l), b)| Det {
            label: *l,
            score: f64::from(*s),
            xyxy: b.map(f64::from),
        })
        .collect()
}

/// `results.json` and `metrics.json` of an evaluate run against the reference of `mode`.
fn check_evaluate(w: &Work, padding: &str, batch: u32, mode: &str, stderr: &str) {
    let out = w.path().join(format!("results_{padding}_{batch}/evaluate"));
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let names = names_by_id();
    let mut ours: BTreeMap<String, Vec<Det>> = BTreeMap::new();
    for r in &results {
        let b: Vec<f64> = r["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        ours.entry(names[&r["image_id"].as_i64().unwrap()].clone())
            .or_default()
            .push(Det {
                label: r["category_id"].as_i64().unwrap(),
                score: r["score"].as_f64().unwrap(),
                xyxy: [b[0], b[1], b[0] + b[2], b[1] + b[3]],
            });
    }
    let reference = reference(w.case, mode);
    assert_eq!(ours.len(), reference.len(), "every image has detections");
    let (mut ws, mut wb) = (0.0f64, 0.0f64);
    for (name, r) in &reference {
        let (s, b) = match_image(name, &ours[name], &reference_dets(r), SCORE_TOL, BOX_TOL_PX);
        ws = ws.max(s);
        wb = wb.max(b);
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let want = meta()["cases"][w.case]["modes"][mode]["coco_stats"].clone();
    let names12 = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100", "ARs", "ARm",
        "ARl",
    ];
    for (i, n) in names12.iter().enumerate() {
        let (a, b) = (metrics[n].as_f64().unwrap(), want[i].as_f64().unwrap());
        assert!(
            (a - b).abs() <= STATS_TOL,
            "{} {mode} batch {batch}: {n} {a} vs pycocotools {b}",
            w.case
        );
    }
    eprintln!(
        "{} {mode} batch {batch}: max score diff {ws:.2e}, max box diff {wb:.2e} px, AP {:.4}",
        w.case, metrics["AP"]
    );
    assert!(
        stderr.contains("input sizes"),
        "evaluate logs the input sizes it ran at:\n{stderr}"
    );
}

#[test]
fn padding_free_evaluation_equals_each_image_alone_for_any_batch_size_and_world() {
    let w = Work::new("l4_refine");
    let spec = w.spec("none", 1);
    let err = w.run("evaluate", &spec, 1);
    check_evaluate(&w, "none", 1, "none", &err);
    assert!(
        err.contains("6 images at 5 input sizes, none padded"),
        "the log names the sizes:\n{err}"
    );
    // Batch 3 on two ranks: a.png and f.png (same size) share a forward on rank 0.
    let spec = w.spec("none", 3);
    let err = w.run("evaluate", &spec, 2);
    check_evaluate(&w, "none", 3, "none", &err);
}

#[test]
fn tao_padded_evaluation_equals_transformers_on_the_padded_batch() {
    let w = Work::new("l4_refine");
    for batch in [1, 3] {
        let spec = w.spec("tao", batch);
        let err = w.run("evaluate", &spec, 1);
        check_evaluate(&w, "tao", batch, &format!("tao_b{batch}"), &err);
        assert!(err.contains("all padded"), "{err}");
    }
}

#[test]
fn one_level_and_two_stage_models_evaluate_like_transformers() {
    for case in ["l1", "l4_two_stage"] {
        let w = Work::new(case);
        let spec = w.spec("none", 3);
        let err = w.run("evaluate", &spec, 1);
        check_evaluate(&w, "none", 3, "none", &err);
    }
}

#[test]
fn inference_writes_transformers_detections_in_kitti_labels() {
    let w = Work::new("l4_refine");
    let spec = w.spec("none", 3);
    let err = w.run("inference", &spec, 1);
    assert!(
        err.contains("6 images at 5 input sizes, none padded"),
        "{err}"
    );
    let labels = w.path().join("results_none_3/inference/labels");
    for (name, r) in reference("l4_refine", "none") {
        let stem = name.trim_end_matches(".png");
        let text = std::fs::read_to_string(labels.join(format!("{stem}.txt"))).unwrap();
        let ours: Vec<Det> = text
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let n = |i: usize| f[i].parse::<f64>().unwrap();
                Det {
                    label: f[0].trim_start_matches("class").parse().unwrap(),
                    score: n(15),
                    xyxy: [n(4), n(5), n(6), n(7)],
                }
            })
            .collect();
        // Inference skips category id 0 (no class name) and clips boxes to the image; KITTI
        // lines carry 3 decimals.
        let [h, w_] = {
            let m = meta();
            let o = &m["images"][&name]["orig"];
            [o[0].as_f64().unwrap(), o[1].as_f64().unwrap()]
        };
        let theirs: Vec<Det> = reference_dets(&r)
            .into_iter()
            .filter(|d| d.label >= 1)
            .map(|mut d| {
                d.xyxy = [
                    d.xyxy[0].clamp(0.0, w_),
                    d.xyxy[1].clamp(0.0, h),
                    d.xyxy[2].clamp(0.0, w_),
                    d.xyxy[3].clamp(0.0, h),
                ];
                d
            })
            .collect();
        match_image(&name, &ours, &theirs, SCORE_TOL + 5e-4, BOX_TOL_PX + 5e-4);
    }
}
