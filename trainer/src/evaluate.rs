//! `ddetr evaluate`: loads `evaluate.checkpoint` (any published layout), runs
//! `test_data_sources` on every rank's shard, and on rank 0 scores them with COCOeval and writes
//! `results.json` (COCO detections), `metrics.json` (the 12 numbers), `experiment.yaml` and
//! `status.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ddetr_dataset::cache::{ensure_split, Split};
use ddetr_dataset::loader::{Loader, LoaderMode};
use ddetr_dataset::{AugmentationConfig, EvalPadding};

use crate::coco_eval::{self, CocoStats, Detection};
use crate::detector::{build_model, DeformableDetrDetector, Detector, DinoDetector};
use crate::device::pick_device;
use crate::predict::predict;
use crate::process_group::ProcessGroup;
use crate::results::ResultsDir;
use crate::spec::{Architecture, ExperimentSpec, Task};
use crate::TrainerError;

/// What `ddetr evaluate` produced.
#[derive(Debug, Clone)]
pub struct EvalOutcome {
    pub stats: CocoStats,
    pub results_dir: PathBuf,
}

/// Evaluates the spec's architecture as `spec` says; `None` on ranks other than 0.
pub fn evaluate(
    spec: &ExperimentSpec,
    group: &ProcessGroup,
) -> Result<Option<EvalOutcome>, TrainerError> {
    match spec.architecture() {
        Architecture::DeformableDetr => evaluate_detector::<DeformableDetrDetector>(spec, group),
        Architecture::Dino => evaluate_detector::<DinoDetector>(spec, group),
    }
}

fn evaluate_detector<D: Detector>(
    spec: &ExperimentSpec,
    group: &ProcessGroup,
) -> Result<Option<EvalOutcome>, TrainerError> {
    let comm = &group.comm;
    let rank = comm.rank();
    let device = pick_device(comm.local_rank())?;
    let ckpt = spec
        .evaluate
        .checkpoint
        .as_deref()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| TrainerError::Config("evaluate.checkpoint is not set: pass evaluate.checkpoint=<results>/train/dd_model_latest.safetensors; an official .pth, a transformers model.safetensors/pytorch_model.bin or a TAO .pth works too".into()))?;
    let dir = ResultsDir::create(spec.task_results_dir(Task::Evaluate))?;
    // The checkpoint first: a wrong one is reported before the dataset cache is built.
    let built = build_model::<D>(spec, device, 0)?;
    D::load_checkpoint(&built.vs, Path::new(ckpt))?;
    let cache = Arc::new(ensure_split(
        &spec.dataset,
        Split::Test,
        comm.local_rank() as u32,
        false,
    )?);
    let loader = Loader::new(
        cache.clone(),
        &spec.dataset,
        LoaderMode::Eval,
        comm.world(),
        rank,
    )?;
    let (dets, sizes_seen) = predict(
        &built.model,
        &loader,
        comm,
        i64::from(spec.model.num_select),
        spec.evaluate.conf_threshold,
        device,
    )?;
    tracing::info!(
        "evaluate: {} ({})",
        sizes_seen.summary(),
        eval_padding_name(&spec.dataset.augmentation)
    );
    if rank != 0 {
        return Ok(None);
    }
    let gt = coco_eval::ground_truth(&cache)?;
    let stats = coco_eval::evaluate(&gt, &dets, spec.dataset.eval_class_ids.as_deref())?;
    let results: Vec<serde_json::Value> = dets.iter().map(Detection::to_json).collect();
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
    dir.write("results.json", &json(&serde_json::Value::Array(results)))?;
    dir.write("metrics.json", &json(&stats.to_json()))?;
    dir.write_experiment(spec)?;
    dir.status(
        "SUCCESS",
        "Evaluation metrics generated.",
        Some(serde_json::json!({"test_mAP": stats.map(), "test_mAP50": stats.map50()})),
    )?;
    Ok(Some(EvalOutcome {
        stats,
        results_dir: dir.path,
    }))
}

/// How evaluation lays out its batches, for the log: `dataset.augmentation.eval_padding` and,
/// for TAO's, what the padding goes to.
pub fn eval_padding_name(aug: &AugmentationConfig) -> String {
    match (aug.eval_padding, aug.pad_size_divisor, aug.fixed_padding) {
        (EvalPadding::None, ..) => "eval_padding none: each image at its own size".into(),
        (EvalPadding::Tao, Some(d), _) => format!("eval_padding tao: padded to multiples of {d}"),
        (EvalPadding::Tao, None, true) => format!(
            "eval_padding tao: padded to {}x{} (fixed_padding)",
            aug.test_random_resize,
            ddetr_dataset::transforms::EVAL_MAX_SIZE
        ),
        (EvalPadding::Tao, None, false) => {
            "eval_padding tao: padded to the batch's largest image".into()
        }
    }
}
