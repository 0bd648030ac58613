//! `ddetr quantize`'s graph work, run by onnxruntime (the venv's wheel, opened at run time): the
//! plan keeps the heads and the deformable sampling float, the QDQ graph has one INT8 weight per
//! quantized op and one Q/DQ pair per calibrated activation, it is a third of the float file, and
//! onnxruntime's INT8 outputs track the float ones, far closer than a mis-calibrated graph's.

mod common;

use ddetr_trainer::export::graph::Graph;
use ddetr_trainer::export::{self, proto, ExportOptions, OUTPUT_BOXES, OUTPUT_LOGITS};
use ddetr_trainer::onnx_runtime::OnnxModel;
use ddetr_trainer::quantize::calibrate::Method;
use ddetr_trainer::quantize::qdq::{self, Ranges};
use ddetr_trainer::quantize::{self, Settings, KEEP_FLOAT};
use ddetr_trainer::spec::{ModelConfig, QuantizeConfig};

const H: u32 = 64;
const W: u32 = 64;

/// Deterministic images (a smooth pattern plus LCG noise, roughly unit scale like normalised
/// photos), independent of libtorch's global RNG.
fn images(n: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|k| {
            (0..(3 * H * W) as usize)
                .map(|i| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let noise = ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
                    let (c, p) = (i / (H * W) as usize, i % (H * W) as usize);
                    let (y, x) = ((p / W as usize) as f32, (p % W as usize) as f32);
                    ((x * 0.2 + y * 0.1 + c as f32 + k as f32).sin()) + noise
                })
                .collect()
        })
        .collect()
}

fn graph() -> Graph {
    let cfg = ModelConfig {
        hidden_dim: 128,
        dim_feedforward: 256,
        num_queries: 20,
        ..common::model_config(4, true, false)
    };
    let (vs, model) = common::build(&cfg);
    common::fill_model(&vs);
    let opts = ExportOptions {
        opset_version: 17,
        input_channel: 3,
        input_height: H,
        input_width: W,
        batch_size: 1,
    };
    export::to_graph(&model, &opts).unwrap()
}

/// Mean absolute difference of the two models' boxes and logits over `inputs`.
fn gaps(a: &Graph, b: &Graph, inputs: &[Vec<f32>]) -> (f64, f64) {
    let mut ma = OnnxModel::new(&a.to_bytes(), 1).unwrap();
    let mut mb = OnnxModel::new(&b.to_bytes(), 1).unwrap();
    let (mut boxes, mut logits, mut n_boxes, mut n_logits) = (0f64, 0f64, 0usize, 0usize);
    for img in inputs {
        let shape = [1, 3, i64::from(H), i64::from(W)];
        let oa = ma
            .run(img.clone(), shape, &[OUTPUT_LOGITS, OUTPUT_BOXES])
            .unwrap();
        let ob = mb
            .run(img.clone(), shape, &[OUTPUT_LOGITS, OUTPUT_BOXES])
            .unwrap();
        assert_eq!(oa[0].0, ob[0].0, "logits shapes");
        for (x, y) in oa[0].1.iter().zip(&ob[0].1) {
            logits += f64::from((x - y).abs());
            n_logits += 1;
        }
        for (x, y) in oa[1].1.iter().zip(&ob[1].1) {
            boxes += f64::from((x - y).abs());
            n_boxes += 1;
        }
    }
    (boxes / n_boxes as f64, logits / n_logits as f64)
}

#[test]
fn int8_graph_keeps_heads_and_sampling_float_and_tracks_the_float_model() {
    let g = graph();
    let settings = Settings::from_spec(&QuantizeConfig::default()).unwrap();
    let ops = settings.plan(&g);
    let all = qdq::quantizable_ops(&g);
    // Every backbone conv, the input projections and the transformer's linear layers; nothing
    // that KEEP_FLOAT names.
    for want in [
        "backbone.0.body.conv1",
        "input_proj.0.0",
        "value_proj",
        "output_proj",
        "linear1",
        "out_proj",
    ] {
        assert!(
            ops.iter().any(|o| o.module.contains(want)),
            "{want} is quantized"
        );
    }
    for o in &ops {
        assert!(
            !KEEP_FLOAT.iter().any(|p| qdq::glob(p, &o.module)),
            "{} stays float",
            o.module
        );
        assert!(o.weights && o.activations);
    }
    let kept: Vec<&str> = all
        .iter()
        .filter(|o| !ops.iter().any(|q| q.node == o.node))
        .map(|o| o.module.as_str())
        .collect();
    assert!(kept.iter().any(|m| m.contains("class_embed")));
    assert!(kept.iter().any(|m| m.contains("sampling_offsets")));

    let calib = images(6, 1);
    let ranges = quantize::calibrate(&g, &ops, &calib, (H, W), Method::MinMax).unwrap();
    assert_eq!(ranges.len(), qdq::activation_tensors(&g, &ops).len());
    // The image input's range is the images' own (read from them, not from the runtime).
    let (lo, hi) = calib
        .iter()
        .flatten()
        .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!(ranges[export::INPUT_NAME], (lo, hi));
    let q = qdq::rewrite(&g, &ops, &ranges, 127.0);
    // Structure: one INT8 weight behind a DequantizeLinear per op, one Q/DQ pair per activation.
    let int8_weights = q
        .inits
        .iter()
        .filter(|i| i.data_type == proto::INT8 && i.dims.len() >= 2)
        .count();
    assert_eq!(int8_weights, ops.len());
    let count = |op: &str| q.nodes.iter().filter(|n| n.op == op).count();
    assert_eq!(count("QuantizeLinear"), ranges.len());
    let int32_biases = q
        .inits
        .iter()
        .filter(|i| i.data_type == proto::INT32 && i.dims.len() == 1 && i.name.contains("int32"))
        .count();
    assert_eq!(
        count("DequantizeLinear"),
        ranges.len() + ops.len() + int32_biases
    );
    let (fb, qb) = (g.to_bytes().len(), q.to_bytes().len());
    assert!(
        (qb as f64) < 0.4 * fb as f64,
        "INT8 file {qb} bytes vs float {fb}"
    );

    // Numerics on images the calibration did not see.
    let held_out = images(3, 99);
    let (box_gap, logit_gap) = gaps(&g, &q, &held_out);
    eprintln!("int8 vs fp32: boxes {box_gap:.5}, logits {logit_gap:.5}");
    // A graph whose activation ranges are 50x too narrow clips nearly everything.
    let narrow: Ranges = ranges
        .iter()
        .map(|(k, &(lo, hi))| (k.clone(), (lo / 50.0, hi / 50.0)))
        .collect();
    let broken = qdq::rewrite(&g, &ops, &narrow, 127.0);
    let (broken_box, broken_logit) = gaps(&g, &broken, &held_out);
    eprintln!("mis-calibrated vs fp32: boxes {broken_box:.5}, logits {broken_logit:.5}");
    assert!(box_gap < 0.02, "boxes move {box_gap} on average");
    assert!(box_gap * 4.0 < broken_box, "{box_gap} vs {broken_box}");
    assert!(
        logit_gap * 4.0 < broken_logit,
        "{logit_gap} vs {broken_logit}"
    );
}

#[test]
fn weight_only_mode_and_layer_rules_choose_what_is_quantized() {
    let g = graph();
    let weight_only: QuantizeConfig = serde_yaml_ng::from_str("mode: weight_only_ptq").unwrap();
    let ops = Settings::from_spec(&weight_only).unwrap().plan(&g);
    assert!(!ops.is_empty() && ops.iter().all(|o| o.weights && !o.activations));
    assert!(qdq::activation_tensors(&g, &ops).is_empty());
    let q = qdq::rewrite(&g, &ops, &Ranges::new(), 127.0);
    assert_eq!(
        q.nodes.iter().filter(|n| n.op == "QuantizeLinear").count(),
        0
    );

    // Only the backbone, and its first conv kept float by a later, more specific entry.
    let rules: QuantizeConfig = serde_yaml_ng::from_str(
        "layers:\n  - module_name: 'backbone.*'\n    weights: {dtype: int8}\n    activations: {dtype: int8}\n  - module_name: backbone.0.body.conv1\n    weights: {dtype: native}\n",
    )
    .unwrap();
    let ops = Settings::from_spec(&rules).unwrap().plan(&g);
    assert!(!ops.is_empty());
    assert!(ops.iter().all(|o| o.module.starts_with("backbone.")));
    assert!(!ops.iter().any(|o| o.module == "backbone.0.body.conv1"));
    // `Linear` matches the class name: every linear layer outside KEEP_FLOAT.
    let linear: QuantizeConfig =
        serde_yaml_ng::from_str("layers:\n  - module_name: Linear\n    weights: {dtype: int8}\n    activations: {dtype: int8}\n")
            .unwrap();
    let ops = Settings::from_spec(&linear).unwrap().plan(&g);
    assert!(!ops.is_empty() && ops.iter().all(|o| o.kind == qdq::OpKind::Linear));
}

#[test]
fn bad_quantize_settings_name_the_key() {
    let cases = [
        ("backend: torchao", "quantize.backend"),
        ("algorithm: awq_lite", "quantize.algorithm"),
        (
            "backend_kwargs: {calibraton_images: 4}",
            "did you mean calibration_images",
        ),
        (
            "backend_kwargs: {weight_bits: 4}",
            "quantize.backend_kwargs.weight_bits",
        ),
        (
            "backend_kwargs: {percentile: 100}",
            "quantize.backend_kwargs.percentile",
        ),
        (
            "layers: [{module_name: '*', weights: {dtype: fp8_e4m3fn}}]",
            "quantize.layers[0].weights.dtype",
        ),
    ];
    for (yaml, want) in cases {
        let q: QuantizeConfig = serde_yaml_ng::from_str(yaml).unwrap();
        let (key, msg) = Settings::from_spec(&q).unwrap_err();
        let line = format!("{key} {msg}");
        assert!(line.contains(want), "{yaml}: {line}");
        assert!(!line.contains('\n'));
    }
}
