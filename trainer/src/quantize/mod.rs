//! TAO's `quantize` task: static post-training INT8 quantization of the exported ONNX model.
//!
//! `ddetr quantize -e spec.yaml` exports the trained checkpoint (`quantize.model_path`, else
//! `export.checkpoint`) at the `export` section's input size, runs the float graph in
//! onnxruntime over the calibration images (`dataset.quant_calibration_data_sources`, else the
//! training images) to calibrate every quantized activation (`quantize.algorithm`), and writes
//! the QDQ graph ([`qdq`]): INT8 weights per output channel, UINT8 activations per tensor. The
//! heads and the deformable sampling ([`KEEP_FLOAT`]) and `quantize.skip_names` stay float.
//!
//! Then it scores both models with the same code (onnxruntime, post-process, COCOeval over
//! `dataset.val_data_sources`, each image stretched to the export size as a deployed engine
//! sees it) and times one-image inference of both, and writes `model_fp32.onnx`,
//! `model_int8.onnx`, `calibration.json`, `metrics.json` and `status.json` in
//! `<results_dir>/quantize`.

pub mod calibrate;
pub mod qdq;

use std::path::{Path, PathBuf};
use std::time::Instant;

use ddetr_dataset::cache::{ensure_split, Split};
use ddetr_dataset::image::decode_rgb8;
use ddetr_dataset::transforms::{self, Sample};
use fast_image_resize::Resizer;
use tch::Tensor;

use crate::coco_eval::{self, CocoStats};
use crate::export::graph::Graph;
use crate::export::{self, ExportOptions, OUTPUT_BOXES, OUTPUT_LOGITS};
use crate::onnx_runtime::OnnxModel;
use crate::post_process::post_process;
use crate::predict::coco_detections;
use crate::results::ResultsDir;
use crate::spec::{
    CalibrationAlgorithm, ExperimentSpec, QuantizeBackend, QuantizeConfig, QuantizeMode, Task,
};
use crate::TrainerError;
use calibrate::{Extremes, Histogram, Method};
use qdq::{OpKind, QuantOp, Ranges};

/// Modules that always stay float: the class and box heads (TAO skips them) and what places the
/// deformable sampling points (offsets, attention weights, reference points, DINO's query
/// position head), where an INT8 error moves where the model looks.
pub const KEEP_FLOAT: &[&str] = &[
    "*class_embed*",
    "*bbox_embed*",
    "*sampling_offsets*",
    "*attention_weights*",
    "*reference_points*",
    "*ref_point_head*",
];

/// The `backend_kwargs` ddetr reads.
const KWARGS: &[&str] = &[
    "calibration_images",
    "percentile",
    "weight_bits",
    "latency_runs",
];

/// `quantize.layers[]` resolved: a pattern and what it quantizes.
#[derive(Debug, Clone)]
struct LayerRule {
    pattern: String,
    weights: bool,
    activations: bool,
}

/// The `quantize` section checked and resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub method: Method,
    pub static_activations: bool,
    layers: Vec<LayerRule>,
    pub skip_names: Vec<String>,
    pub calibration_images: usize,
    /// Largest INT8 weight magnitude: 127 (8 bits) or 63 (7 bits).
    pub weight_qmax: f32,
    pub latency_runs: usize,
}

fn dtype_quantizes(
    key: &str,
    t: &Option<crate::spec::TensorQuantization>,
) -> Result<bool, (String, String)> {
    match t {
        None => Ok(false),
        Some(t) => match t.dtype.as_str() {
            "int8" => Ok(true),
            "native" => Ok(false),
            other => Err((
                key.into(),
                format!("is {other:?}: ddetr quantizes to int8 (onnxruntime's CPU kernels have no fp8): use int8, or native to keep the tensor float"),
            )),
        },
    }
}

/// A spec enum value as the spec spells it (`torchao`, `awq_lite`).
fn spec_name(v: impl serde::Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl Settings {
    /// Checks `quantize` (each error: the key and one line of what to set).
    pub fn from_spec(q: &QuantizeConfig) -> Result<Self, (String, String)> {
        match q.backend {
            QuantizeBackend::ModeloptOnnx => {}
            other => {
                let name = spec_name(other);
                return Err((
                    "quantize.backend".into(),
                    format!("is {name}, a PyTorch backend; ddetr quantizes the exported ONNX graph (the modelopt.onnx way): set quantize.backend: modelopt.onnx"),
                ));
            }
        }
        for k in q.backend_kwargs.keys() {
            if !KWARGS.contains(&k.as_str()) {
                let hint = KWARGS
                    .iter()
                    .max_by(|a, b| {
                        strsim::jaro_winkler(a, k).total_cmp(&strsim::jaro_winkler(b, k))
                    })
                    .expect("kwargs");
                return Err((
                    format!("quantize.backend_kwargs.{k}"),
                    format!(
                        "is not a ddetr quantize option (did you mean {hint}?): the options are {}",
                        KWARGS.join(", ")
                    ),
                ));
            }
        }
        let num = |k: &str, default: f64| -> Result<f64, (String, String)> {
            match q.backend_kwargs.get(k) {
                None => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| {
                    (
                        format!("quantize.backend_kwargs.{k}"),
                        format!("is {v}: give a number"),
                    )
                }),
            }
        };
        let percentile = num("percentile", 99.99)?;
        if !(50.0..100.0).contains(&percentile) {
            return Err((
                "quantize.backend_kwargs.percentile".into(),
                format!(
                    "is {percentile}: give the central percentage kept, in [50, 100), e.g. 99.99"
                ),
            ));
        }
        let method = match q.algorithm {
            CalibrationAlgorithm::Minmax => Method::MinMax,
            CalibrationAlgorithm::Max => Method::Max,
            CalibrationAlgorithm::Entropy => Method::Entropy,
            CalibrationAlgorithm::Percentile => Method::Percentile(percentile),
            other => {
                let name = spec_name(other);
                return Err((
                    "quantize.algorithm".into(),
                    format!("is {name}, a weight-only method for language models: use minmax, max, entropy or percentile"),
                ));
            }
        };
        let calibration_images = num("calibration_images", 64.0)?;
        if calibration_images < 1.0 || calibration_images.fract() != 0.0 {
            return Err((
                "quantize.backend_kwargs.calibration_images".into(),
                format!("is {calibration_images}: give a whole number of images, at least 1"),
            ));
        }
        let weight_qmax = match num("weight_bits", 8.0)? {
            8.0 => 127.0,
            7.0 => 63.0,
            b => {
                return Err((
                    "quantize.backend_kwargs.weight_bits".into(),
                    format!(
                    "is {b}: use 8, or 7 for CPUs without VNNI whose u8×s8 kernels can saturate"
                ),
                ))
            }
        };
        let latency_runs = num("latency_runs", 30.0)?;
        if latency_runs < 0.0 || latency_runs.fract() != 0.0 {
            return Err((
                "quantize.backend_kwargs.latency_runs".into(),
                format!("is {latency_runs}: give a whole number of runs (0 skips the timing)"),
            ));
        }
        let mut layers = Vec::new();
        for (i, l) in q.layers.iter().enumerate() {
            if l.module_name.is_empty() {
                return Err((
                    format!("quantize.layers[{i}].module_name"),
                    "is empty: give a module path or pattern (\"*\", \"backbone.*\", \"Linear\")"
                        .into(),
                ));
            }
            layers.push(LayerRule {
                pattern: l.module_name.clone(),
                weights: dtype_quantizes(
                    &format!("quantize.layers[{i}].weights.dtype"),
                    &l.weights,
                )?,
                activations: dtype_quantizes(
                    &format!("quantize.layers[{i}].activations.dtype"),
                    &l.activations,
                )?,
            });
        }
        Ok(Self {
            method,
            static_activations: q.mode == QuantizeMode::StaticPtq,
            layers,
            skip_names: q.skip_names.clone(),
            calibration_images: calibration_images as usize,
            weight_qmax,
            latency_runs: latency_runs as usize,
        })
    }

    fn matches(pattern: &str, op: &QuantOp) -> bool {
        qdq::glob(pattern, &op.module) || qdq::glob(pattern, op.kind.class_name())
    }

    /// The graph's ops with what each quantizes; ops that quantize nothing are left out.
    pub fn plan(&self, graph: &Graph) -> Vec<QuantOp> {
        qdq::quantizable_ops(graph)
            .into_iter()
            .filter_map(|mut op| {
                let skipped = KEEP_FLOAT
                    .iter()
                    .copied()
                    .chain(self.skip_names.iter().map(String::as_str))
                    .any(|p| Self::matches(p, &op));
                if skipped {
                    return None;
                }
                if let Some(rule) = self
                    .layers
                    .iter()
                    .rev()
                    .find(|r| Self::matches(&r.pattern, &op))
                {
                    op.weights = rule.weights;
                    op.activations = rule.activations;
                } else if !self.layers.is_empty() {
                    return None;
                }
                // An op whose weight stays float runs in float: its input is not quantized.
                op.activations &= op.weights && self.static_activations;
                op.weights.then_some(op)
            })
            .collect()
    }
}

/// One image as the exported model takes it: stretched to `h`×`w` (the engine's fixed input, as
/// TAO's deploy pre-processing), normalised by the spec's mean and std, CHW.
pub fn model_input(
    bytes: &[u8],
    name: &str,
    (h, w): (u32, u32),
    mean: &[f64],
    std: &[f64],
    resizer: &mut Resizer,
) -> Result<Vec<f32>, TrainerError> {
    let rgb = decode_rgb8(bytes, name)?;
    let mut s = Sample::new(rgb, Vec::new(), Vec::new());
    transforms::resize(&mut s, w, h, resizer);
    let plane = (h * w) as usize;
    let mut out = vec![0f32; 3 * plane];
    let scale: Vec<f32> = std.iter().map(|s| (1.0 / (255.0 * s)) as f32).collect();
    let shift: Vec<f32> = mean.iter().zip(std).map(|(m, s)| (-m / s) as f32).collect();
    for (p, px) in s.image.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + p] = f32::from(px[c]) * scale[c] + shift[c];
        }
    }
    Ok(out)
}

/// Runs the float `graph` over `images` and returns the calibrated range of every activation
/// the plan quantizes (two passes when the method needs a histogram).
pub fn calibrate(
    graph: &Graph,
    ops: &[QuantOp],
    images: &[Vec<f32>],
    (h, w): (u32, u32),
    method: Method,
) -> Result<Ranges, TrainerError> {
    let tensors = qdq::activation_tensors(graph, ops);
    if tensors.is_empty() {
        return Ok(Ranges::new());
    }
    // A graph input is observed from the images themselves: asking a runtime to return its own
    // input as an output hands back a buffer that dies with the call.
    let is_input = |t: &str| graph.inputs.iter().any(|i| i.name == t);
    let computed: Vec<String> = tensors.iter().filter(|t| !is_input(t)).cloned().collect();
    let mut model = OnnxModel::new(&graph.with_outputs(&computed).to_bytes(), 0)?;
    let names: Vec<&str> = computed.iter().map(String::as_str).collect();
    let shape = [1, 3, i64::from(h), i64::from(w)];
    let mut extremes = vec![Extremes::default(); tensors.len()];
    let passes = if method.needs_histogram() { 2 } else { 1 };
    let mut hists: Vec<Histogram> = Vec::new();
    for pass in 0..passes {
        if pass == 1 {
            hists = extremes
                .iter()
                .map(|&e| Histogram::for_method(method, e))
                .collect();
        }
        for (i, img) in images.iter().enumerate() {
            let outs = model.run(img.clone(), shape, &names)?;
            let mut outs = outs.iter();
            for (k, t) in tensors.iter().enumerate() {
                let v: &[f32] = if is_input(t) {
                    img
                } else {
                    &outs.next().expect("one output per computed tensor").1
                };
                if pass == 0 {
                    extremes[k].observe(v);
                } else {
                    hists[k].observe(v);
                }
            }
            if (i + 1) % 16 == 0 || i + 1 == images.len() {
                tracing::info!(
                    "calibration pass {}/{passes}: {}/{} images",
                    pass + 1,
                    i + 1,
                    images.len()
                );
            }
        }
    }
    Ok(tensors
        .into_iter()
        .enumerate()
        .map(|(k, t)| {
            let r = calibrate::range(method, extremes[k], hists.get(k));
            (t, r)
        })
        .collect())
}

/// COCO scores of an ONNX detector over the cached split: one image at a time, stretched to the
/// export size; boxes come back normalised, so they scale to each image's own size.
pub fn score(
    model: &mut OnnxModel,
    spec: &ExperimentSpec,
    cache: &ddetr_dataset::cache::Cache,
    hw: (u32, u32),
) -> Result<CocoStats, TrainerError> {
    let aug = &spec.dataset.augmentation;
    let mut resizer = Resizer::new();
    let mut dets = Vec::new();
    let shape = [1, 3, i64::from(hw.0), i64::from(hw.1)];
    for (i, rec) in cache.images().iter().enumerate() {
        let input = model_input(
            &cache.image_bytes(i)?,
            cache.file_name(i),
            hw,
            &aug.input_mean,
            &aug.input_std,
            &mut resizer,
        )?;
        let outs = model.run(input, shape, &[OUTPUT_LOGITS, OUTPUT_BOXES])?;
        let (ls, logits) = &outs[0];
        let (bs, boxes) = &outs[1];
        let logits = Tensor::from_slice(logits).view(ls.as_slice());
        let boxes = Tensor::from_slice(boxes).view(bs.as_slice());
        let size = (f64::from(rec.height), f64::from(rec.width));
        let d = post_process(
            &logits,
            &boxes,
            &[size],
            i64::from(spec.model.num_select),
            spec.evaluate.conf_threshold,
        );
        dets.extend(coco_detections(rec.id, &d[0])?);
    }
    let gt = coco_eval::ground_truth(cache)?;
    coco_eval::evaluate(&gt, &dets, spec.dataset.eval_class_ids.as_deref())
}

/// Median milliseconds of one-image inference over `runs` runs (after 3 warm-up runs).
pub fn latency_ms(
    model: &mut OnnxModel,
    input: &[f32],
    hw: (u32, u32),
    runs: usize,
) -> Result<f64, TrainerError> {
    let shape = [1, 3, i64::from(hw.0), i64::from(hw.1)];
    for _ in 0..3 {
        model.run(input.to_vec(), shape, &[OUTPUT_LOGITS])?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        model.run(input.to_vec(), shape, &[OUTPUT_LOGITS])?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN))
}

/// What `ddetr quantize` produced and measured.
#[derive(Debug, Clone)]
pub struct QuantizeOutcome {
    pub results_dir: PathBuf,
    pub fp32_file: PathBuf,
    pub int8_file: PathBuf,
    pub fp32_bytes: usize,
    pub int8_bytes: usize,
    pub quantized_ops: usize,
    pub quantizable_ops: usize,
    pub calibration_images: usize,
    /// The names of the Conv/MatMul nodes left float (for a peer quantizer's exclude list).
    pub float_nodes: Vec<String>,
    /// (FP32, INT8) COCO scores over the validation data, when the spec has some.
    pub scores: Option<(CocoStats, CocoStats)>,
    /// (FP32, INT8) median one-image milliseconds, when timed.
    pub latency_ms: Option<(f64, f64)>,
}

impl QuantizeOutcome {
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::json!({
            "fp32_onnx": self.fp32_file.display().to_string(),
            "int8_onnx": self.int8_file.display().to_string(),
            "fp32_bytes": self.fp32_bytes,
            "int8_bytes": self.int8_bytes,
            "size_ratio": self.int8_bytes as f64 / self.fp32_bytes as f64,
            "quantized_ops": self.quantized_ops,
            "quantizable_ops": self.quantizable_ops,
            "calibration_images": self.calibration_images,
        });
        if let Some((f, q)) = &self.scores {
            m["fp32_mAP"] = f.map().into();
            m["fp32_mAP50"] = f.map50().into();
            m["int8_mAP"] = q.map().into();
            m["int8_mAP50"] = q.map50().into();
        }
        if let Some((f, q)) = self.latency_ms {
            m["fp32_latency_ms"] = f.into();
            m["int8_latency_ms"] = q.into();
            m["latency_ratio"] = (q / f).into();
        }
        m
    }
}

/// The calibration image files: `dataset.quant_calibration_data_sources.image_dir`, else the
/// training sources' folders; the first `n` in name order.
fn calibration_files(spec: &ExperimentSpec, n: usize) -> Result<Vec<PathBuf>, TrainerError> {
    let d = &spec.dataset;
    let dirs: Vec<String> = match &d.quant_calibration_data_sources {
        Some(c) if !c.image_dir.is_empty() => vec![c.image_dir.clone()],
        _ => {
            tracing::info!("dataset.quant_calibration_data_sources is not set: calibrating on the training images");
            d.train_data_sources
                .iter()
                .map(|s| s.image_dir.clone())
                .collect()
        }
    };
    if dirs.is_empty() {
        return Err(TrainerError::Config("quantize needs calibration images: set dataset.quant_calibration_data_sources.image_dir (or dataset.train_data_sources)".into()));
    }
    let mut files = crate::inference::list_images(&dirs)?;
    files.truncate(n);
    Ok(files)
}

/// The calibration images as the model takes them (see [`model_input`]).
pub fn calibration_inputs(
    spec: &ExperimentSpec,
    settings: &Settings,
    hw: (u32, u32),
) -> Result<Vec<Vec<f32>>, TrainerError> {
    let aug = &spec.dataset.augmentation;
    let mut resizer = Resizer::new();
    calibration_files(spec, settings.calibration_images)?
        .iter()
        .map(|f| {
            model_input(
                &read(f)?,
                &f.display().to_string(),
                hw,
                &aug.input_mean,
                &aug.input_std,
                &mut resizer,
            )
        })
        .collect()
}

/// The checkpoint to quantize: `quantize.model_path`, else `export.checkpoint`.
fn checkpoint(spec: &ExperimentSpec) -> Result<PathBuf, TrainerError> {
    let set = |p: &Option<String>| p.as_deref().filter(|p| !p.is_empty()).map(PathBuf::from);
    let path = set(&spec.quantize.model_path)
        .or_else(|| set(&spec.export.checkpoint))
        .ok_or_else(|| TrainerError::Config("quantize.model_path is not set: pass quantize.model_path=<results>/train/dd_model_latest.safetensors (or set export.checkpoint)".into()))?;
    if path.extension().is_some_and(|e| e == "onnx") {
        return Err(TrainerError::Config(format!("quantize.model_path {} is an ONNX file: ddetr quantizes from the trained checkpoint (it writes the float ONNX beside the INT8 one): pass the .safetensors/.pth checkpoint", path.display())));
    }
    if !path.is_file() {
        return Err(TrainerError::Config(format!(
            "quantize.model_path {} does not exist: pass the path of a trained checkpoint",
            path.display()
        )));
    }
    Ok(path)
}

fn read(path: &Path) -> Result<Vec<u8>, TrainerError> {
    std::fs::read(path).map_err(|source| TrainerError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `ddetr quantize` as `spec` says.
pub fn quantize(spec: &ExperimentSpec) -> Result<QuantizeOutcome, TrainerError> {
    let settings = Settings::from_spec(&spec.quantize)
        .map_err(|(k, m)| TrainerError::Config(format!("{k} {m}")))?;
    let ckpt = checkpoint(spec)?;
    let opts = ExportOptions::from_spec(&spec.export);
    let hw = (opts.input_height, opts.input_width);
    let dir = ResultsDir::create(spec.task_results_dir(Task::Quantize))?;
    let graph = export::checkpoint_graph(spec, &ckpt, &opts)?;
    let ops = settings.plan(&graph);
    let quantizable = qdq::quantizable_ops(&graph).len();
    tracing::info!(
        "quantize: {} of {quantizable} Conv/Linear ops in INT8 ({} with activations), the rest float",
        ops.len(),
        ops.iter().filter(|o| o.activations).count()
    );
    let mut calibrated = 0;
    let ranges = if ops.iter().any(|o| o.activations) {
        let images = calibration_inputs(spec, &settings, hw)?;
        calibrated = images.len();
        tracing::info!("calibrating on {calibrated} images ({:?})", settings.method);
        calibrate(&graph, &ops, &images, hw, settings.method)?
    } else {
        Ranges::new()
    };
    let int8 = qdq::rewrite(&graph, &ops, &ranges, settings.weight_qmax);
    let fp32_bytes = graph.to_bytes();
    let int8_bytes = int8.to_bytes();
    let fp32_file = dir.path.join("model_fp32.onnx");
    let int8_file = dir.path.join("model_int8.onnx");
    export::write_file(&fp32_bytes, &fp32_file)?;
    export::write_file(&int8_bytes, &int8_file)?;
    let calibration: serde_json::Map<String, serde_json::Value> = ranges
        .iter()
        .map(|(t, &(lo, hi))| {
            let (scale, zp) = qdq::uint8_params(lo, hi);
            (
                t.clone(),
                serde_json::json!({"min": lo, "max": hi, "scale": scale, "zero_point": zp}),
            )
        })
        .collect();
    let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).expect("json");
    dir.write(
        "calibration.json",
        &json(&serde_json::json!({
            "algorithm": format!("{:?}", settings.method),
            "layers": ops.iter().map(|o| serde_json::json!({
                "module": o.module,
                "kind": match o.kind { OpKind::Conv => "Conv2d", OpKind::Linear => "Linear" },
                "activations": o.activations,
            })).collect::<Vec<_>>(),
            "activations": calibration,
        })),
    )?;
    let mut fp32 = OnnxModel::new(&fp32_bytes, 0)?;
    let mut q8 = OnnxModel::new(&int8_bytes, 0)?;
    let scores = if spec.dataset.val_data_sources.is_empty() {
        tracing::info!("dataset.val_data_sources is not set: the models are not scored");
        None
    } else {
        let cache = ensure_split(&spec.dataset, Split::Val, 0, false)?;
        tracing::info!("scoring FP32 and INT8 on {} validation images", cache.len());
        Some((
            score(&mut fp32, spec, &cache, hw)?,
            score(&mut q8, spec, &cache, hw)?,
        ))
    };
    let latency = if settings.latency_runs > 0 {
        let probe = vec![0.1f32; (3 * hw.0 * hw.1) as usize];
        let f = latency_ms(&mut fp32, &probe, hw, settings.latency_runs)?;
        let q = latency_ms(&mut q8, &probe, hw, settings.latency_runs)?;
        Some((f, q))
    } else {
        None
    };
    let outcome = QuantizeOutcome {
        results_dir: dir.path.clone(),
        fp32_file,
        int8_file,
        fp32_bytes: fp32_bytes.len(),
        int8_bytes: int8_bytes.len(),
        quantized_ops: ops.len(),
        quantizable_ops: quantizable,
        calibration_images: calibrated,
        float_nodes: graph
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                matches!(n.op.as_str(), "Conv" | "MatMul") && !ops.iter().any(|o| o.node == *i)
            })
            .map(|(_, n)| n.name.clone())
            .collect(),
        scores,
        latency_ms: latency,
    };
    dir.write("metrics.json", &json(&outcome.to_json()))?;
    dir.write_experiment(spec)?;
    dir.status(
        "SUCCESS",
        "Quantized model generated.",
        Some(outcome.to_json()),
    )?;
    Ok(outcome)
}
