//! ONNX export checked by a real runtime: each test exports a model, runs ddetr's own forward on
//! the same images, and has `tests/onnx/check_onnx.py` (onnx.checker + onnxruntime CPU) compare
//! the outputs within 1e-4. The python is `$DDETR_ONNX_PYTHON`, else `$VIRTUAL_ENV/bin/python`
//! (the venv `scripts/setup.sh` creates, with onnx and onnxruntime).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ddetr_trainer::export::{self, ExportError, ExportOptions};
use ddetr_trainer::model::dino::{Dino, DinoConfig};
use ddetr_trainer::model::DeformableDetr;
use ddetr_trainer::spec::ModelConfig;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-4;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DDETR_ONNX_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("VIRTUAL_ENV").expect(
        "VIRTUAL_ENV is not set: run `eval \"$(scripts/setup.sh --env)\"` so the ONNX tests find the venv's onnxruntime",
    );
    PathBuf::from(venv).join("bin").join("python")
}

fn write_f32(dir: &Path, name: &str, t: &Tensor) -> serde_json::Value {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.reshape([-1]).copy_data(&mut v, n);
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(dir.join(name), bytes).unwrap();
    serde_json::json!({"file": name, "shape": t.size()})
}

/// Exports `model` with `opts`, runs both sides on each image batch, and returns the checker's
/// JSON report (panics when onnxruntime disagrees beyond the tolerance).
fn check(
    model: &DeformableDetr,
    opts: &ExportOptions,
    batches: &[Tensor],
    repeat: u32,
) -> serde_json::Value {
    check_graph(
        &export::to_onnx(model, opts).expect("export succeeds"),
        &|images, mask| {
            let out = model.forward(images, mask, false);
            let last = out.last();
            (last.logits.shallow_clone(), last.boxes.shallow_clone())
        },
        batches,
        repeat,
    )
}

/// Runs `forward` (→ logits, boxes) and onnxruntime on the exported `graph` for each batch.
fn check_graph(
    graph: &[u8],
    forward: &dyn Fn(&Tensor, &Tensor) -> (Tensor, Tensor),
    batches: &[Tensor],
    repeat: u32,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let onnx_path = dir.path().join("model.onnx");
    std::fs::write(&onnx_path, graph).unwrap();
    let mut runs = Vec::new();
    for (i, images) in batches.iter().enumerate() {
        let (n, _, h, w) = images.size4().unwrap();
        let mask = Tensor::zeros([n, h, w], (Kind::Bool, Device::Cpu));
        let (logits, boxes) = tch::no_grad(|| forward(images, &mask));
        runs.push(serde_json::json!({
            "input": write_f32(dir.path(), &format!("x{i}.f32"), images),
            "expected": {
                "pred_logits": write_f32(dir.path(), &format!("logits{i}.f32"), &logits),
                "pred_boxes": write_f32(dir.path(), &format!("boxes{i}.f32"), &boxes),
            }
        }));
    }
    let case = serde_json::json!({"model": "model.onnx", "tolerance": TOLERANCE, "repeat": repeat, "runs": runs});
    let case_path = dir.path().join("case.json");
    std::fs::write(&case_path, case.to_string()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/onnx/check_onnx.py");
    let py = python();
    let out = Command::new(&py)
        .arg(&script)
        .arg(&case_path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", py.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "check_onnx.py failed ({}): {stdout}{stderr}",
        out.status
    );
    eprintln!("{stdout}");
    serde_json::from_str(stdout.trim()).expect("one JSON line")
}

fn synthetic(n: i64, h: i64, w: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([n, 3, h, w], (Kind::Float, Device::Cpu))
}

fn opts(h: u32, w: u32, batch: i32) -> ExportOptions {
    ExportOptions {
        opset_version: 17,
        input_channel: 3,
        input_height: h,
        input_width: w,
        batch_size: batch,
    }
}

/// The brief's small config: ResNet-18, hidden 128, one level, no refinement.
fn small_config() -> ModelConfig {
    ModelConfig {
        hidden_dim: 128,
        dim_feedforward: 256,
        num_queries: 20,
        ..common::model_config(1, false, false)
    }
}

#[test]
fn small_model_matches_onnxruntime_on_golden_and_synthetic_images() {
    let (vs, model) = common::build(&small_config());
    common::fill_model(&vs);
    let (golden, _) = common::inputs(); // [2, 3, 64, 72], exported without its padding mask
    let report = check(
        &model,
        &opts(64, 72, -1),
        &[golden, synthetic(1, 64, 72, 1)],
        0,
    );
    assert_eq!(report["runs"][0]["batch"], 2);
    assert_eq!(report["runs"][1]["batch"], 1);
}

#[test]
fn four_levels_with_box_refinement_match_onnxruntime() {
    let (vs, model) = common::build(&common::model_config(4, true, false));
    common::fill_model(&vs);
    check(
        &model,
        &opts(96, 128, -1),
        &[synthetic(2, 96, 128, 2), synthetic(1, 96, 128, 3)],
        0,
    );
}

#[test]
fn tao_default_structure_at_a_small_input_matches_onnxruntime() {
    // TAO's default architecture (ResNet-50, d 256, 4 levels, 6+6 layers, 300 queries, refine)
    // at 128×160 to stay fast; the 544×960 export is `tao_default_at_544x960` (ignored: slow).
    let cfg = ModelConfig {
        with_box_refine: true,
        ..ModelConfig::default()
    };
    let (vs, model) = common::build(&cfg);
    common::fill_model(&vs);
    check(&model, &opts(128, 160, 1), &[synthetic(1, 128, 160, 4)], 0);
}

#[test]
#[ignore = "slow: TAO's default model at 544×960 (about 175 MB of ONNX, ~6 s per image in onnxruntime on 2 CPU cores); run with --ignored"]
fn tao_default_at_544x960() {
    let cfg = ModelConfig {
        with_box_refine: true,
        ..ModelConfig::default()
    };
    let (vs, model) = common::build(&cfg);
    common::fill_model(&vs);
    let report = check(&model, &opts(544, 960, -1), &[synthetic(1, 544, 960, 5)], 5);
    eprintln!("tao default 544x960: {report}");
}

#[test]
fn fixed_batch_export_matches_at_its_batch_size() {
    let (vs, model) = common::build(&small_config());
    common::fill_model(&vs);
    let bytes = export::to_onnx(&model, &opts(64, 72, 2)).unwrap();
    assert!(!bytes.is_empty());
    // A fixed batch of 2 matches at batch 2.
    check(&model, &opts(64, 72, 2), &[synthetic(2, 64, 72, 6)], 0);
}

#[test]
fn bad_options_are_one_line_errors() {
    let (_vs, model) = common::build(&small_config());
    let e = export::to_onnx(
        &model,
        &ExportOptions {
            opset_version: 16,
            ..opts(64, 72, -1)
        },
    )
    .unwrap_err();
    assert!(matches!(e, ExportError::OpsetTooLow(16)));
    assert!(
        e.to_string().contains("set export.opset_version to 17"),
        "{e}"
    );
    let e = export::to_onnx(
        &model,
        &ExportOptions {
            opset_version: 99,
            ..opts(64, 72, -1)
        },
    )
    .unwrap_err();
    assert!(matches!(e, ExportError::OpsetTooHigh(99)));
    let e = export::to_onnx(
        &model,
        &ExportOptions {
            input_channel: 1,
            ..opts(64, 72, -1)
        },
    )
    .unwrap_err();
    assert!(matches!(e, ExportError::InputChannels(1)));
    let e = export::to_onnx(&model, &opts(64, 72, 0)).unwrap_err();
    assert!(matches!(e, ExportError::BatchSize(0)));
    let e = export::export_file(
        &model,
        &opts(64, 72, -1),
        Path::new("/proc/ddetr/model.onnx"),
    )
    .unwrap_err();
    assert!(matches!(e, ExportError::Write { .. }), "{e}");
    for e in [ExportError::OpsetTooLow(16).to_string(), e.to_string()] {
        assert!(!e.contains('\n'), "one line: {e}");
    }
    let two_stage = ModelConfig {
        with_box_refine: true,
        two_stage: true,
        ..small_config()
    };
    let (_vs2, m2) = common::build(&two_stage);
    assert!(matches!(
        export::to_onnx(&m2, &opts(64, 72, -1)).unwrap_err(),
        ExportError::TwoStage
    ));
}

#[test]
fn dino_matches_onnxruntime() {
    // The parity fixture's architecture (R50, 4 levels, d 256, 1+2 layers, 30 queries) with
    // per-layer box heads, so the graph reads every head it should.
    let o: Vec<String> = [
        "model_name=dino",
        "model.backbone=resnet_50",
        "model.hidden_dim=256",
        "model.enc_layers=1",
        "model.dec_layers=2",
        "model.dim_feedforward=64",
        "model.num_queries=30",
        "model.num_select=30",
        "model.dec_pred_bbox_embed_share=false",
        "dataset.num_classes=5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let spec = ddetr_trainer::spec::load_str("", &o, None).unwrap().spec;
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = DinoConfig::from_spec(&spec.model, spec.dataset.num_classes).unwrap();
    let model = Dino::new(&vs.root(), cfg);
    common::fill_model(&vs);
    let graph = export::dino_to_onnx(&model, &opts(96, 128, -1)).expect("export succeeds");
    let report = check_graph(
        &graph,
        &|images, mask| {
            let out = model.forward(images, mask, None, false);
            let last = out.last();
            (last.logits.shallow_clone(), last.boxes.shallow_clone())
        },
        &[synthetic(2, 96, 128, 4), synthetic(1, 96, 128, 5)],
        0,
    );
    assert_eq!(report["runs"][0]["batch"], 2);
    // Too small an input for 30 proposals is one line.
    let e = export::dino_to_onnx(&model, &opts(32, 32, -1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.num_queries = 30"), "{e}");
}

/// A small Deformable DETR or DINO spec over `gc_vit_xxtiny` (or the backbone `extra` names).
fn gcvit_spec(extra: &[&str]) -> ddetr_trainer::spec::ExperimentSpec {
    let o: Vec<String> = [
        "model.backbone=gc_vit_xxtiny",
        "model.hidden_dim=64",
        "model.nheads=4",
        "model.enc_layers=1",
        "model.dec_layers=2",
        "model.dim_feedforward=64",
        "model.num_queries=20",
        "model.num_select=20",
        "dataset.num_classes=5",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    ddetr_trainer::spec::load_str("", &o, None).unwrap().spec
}

#[test]
fn gcvit_backbone_matches_onnxruntime_off_the_window_grid() {
    // 100×140: level maps 25×35 … 4×5 against windows 7, 7, 14, 7, so blocks pad and crop, and
    // the pooled global queries are resized to the window.
    let spec = gcvit_spec(&["model.with_box_refine=true"]);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = ddetr_trainer::model::deformable_detr::DetrConfig::from_spec(
        &spec.model,
        spec.dataset.num_classes,
    )
    .unwrap();
    let model = DeformableDetr::new(&vs.root(), cfg);
    common::fill_model(&vs);
    let report = check(
        &model,
        &opts(100, 140, -1),
        &[synthetic(2, 100, 140, 6), synthetic(1, 100, 140, 7)],
        0,
    );
    assert_eq!(report["runs"][0]["batch"], 2);
}

#[test]
fn gcvit_resize_matrices_are_neither_quantized_nor_counted_as_linear_layers() {
    // At 100×140 every level's pooled global query is resized to the window by two MatMuls
    // with constant matrices: a resize, not a Linear module.
    let spec = gcvit_spec(&[]);
    let graph = export::spec_graph(&spec, None, &opts(100, 140, 1)).unwrap();
    let resize: Vec<&str> = graph
        .inits
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| export::gcvit::is_resize_matrix(n))
        .collect();
    assert!(resize.len() >= 2, "{resize:?}");
    let ops = ddetr_trainer::quantize::qdq::quantizable_ops(&graph);
    assert!(ops.iter().any(|o| o.module.contains(".levels.")));
    assert!(ops.iter().all(|o| !o.module.contains("resize")));
    // Every linear layer counted is a quantizable one (the resize MatMuls are neither).
    let linear_weights: usize = ops
        .iter()
        .filter(|o| o.kind == ddetr_trainer::quantize::qdq::OpKind::Linear)
        .count();
    let matmuls_by_constant = graph
        .nodes
        .iter()
        .filter(|n| n.op == "MatMul" && n.inputs.iter().any(|i| graph.init(i).is_some()))
        .count();
    assert_eq!(matmuls_by_constant, linear_weights + resize.len());
}

/// The DINO of `spec`, filled, exported at `h × w` with a dynamic batch and run on `batches`.
fn export_dino_and_compare(
    spec: &ddetr_trainer::spec::ExperimentSpec,
    h: u32,
    w: u32,
    batches: &[Tensor],
) {
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let cfg = DinoConfig::from_spec(&spec.model, spec.dataset.num_classes).unwrap();
    let model = Dino::new(&vs.root(), cfg);
    common::fill_model(&vs);
    let graph = export::dino_to_onnx(&model, &opts(h, w, -1)).expect("export succeeds");
    check_graph(
        &graph,
        &|images, mask| {
            let out = model.forward(images, mask, None, false);
            let last = out.last();
            (last.logits.shallow_clone(), last.boxes.shallow_clone())
        },
        batches,
        0,
    );
}

#[test]
fn dino_with_a_gcvit_backbone_matches_onnxruntime() {
    let spec = gcvit_spec(&["model_name=dino"]);
    export_dino_and_compare(&spec, 96, 128, &[synthetic(1, 96, 128, 8)]);
}

#[test]
fn dino_with_a_fan_backbone_matches_onnxruntime_off_the_stride_grid() {
    // TAO's DINO over fan_tiny at 100×140: ConvNeXt maps 25×35 and 12×17, tokens 6×8 (the patch
    // projection floors), the downsampled level 3×4; a dynamic batch of 2, then 1. The
    // BatchNorms run on their (filled) running statistics, as TAO's export.
    let spec = gcvit_spec(&["model_name=dino", "model.backbone=fan_tiny"]);
    // fvcore counts each FAN block's BatchNorm (2 per element): its scale Mul is recognised.
    let graph = export::spec_graph(&spec, None, &opts(100, 140, 1)).unwrap();
    let bn_scales = graph
        .nodes
        .iter()
        .filter(|n| {
            n.op == "Mul"
                && n.inputs.iter().any(|i| {
                    graph
                        .init(i)
                        .is_some_and(|t| export::fan::is_batch_norm_scale(&t.name))
                })
        })
        .count();
    assert_eq!(bn_scales, 8, "one per fan_tiny block");
    assert!(!export::fan::is_batch_norm_scale(
        "backbone.0.body.blocks.0.gamma1_12"
    ));
    export_dino_and_compare(
        &spec,
        100,
        140,
        &[synthetic(2, 100, 140, 9), synthetic(1, 100, 140, 10)],
    );
}
