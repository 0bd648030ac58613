//! `ddetr quantize` end to end on the tiny synthetic set: the FP32 and INT8 ONNX files, the
//! calibration record, both models scored by the same code and timed, status.json; DINO through
//! `ddetr dino quantize`; and bad settings answered with one line and exit code 2.

mod common;

use std::path::Path;

use common::{
    assert_one_error_line, ddetr_in, output, random_checkpoint, text, tiny_spec, tiny_workdir,
    TINY_64,
};

fn quantize(dir: &Path, ckpt: &Path, extra: &[&str]) -> std::process::Output {
    quantize_with(&["quantize"], &tiny_spec(), dir, ckpt, extra)
}

fn quantize_with(
    task: &[&str],
    spec: &Path,
    dir: &Path,
    ckpt: &Path,
    extra: &[&str],
) -> std::process::Output {
    let model = format!("quantize.model_path={}", ckpt.display());
    let mut args: Vec<&str> = task.to_vec();
    args.extend_from_slice(&["-e", spec.to_str().unwrap(), "-r", "results", &model]);
    args.extend_from_slice(TINY_64);
    args.extend_from_slice(&[
        "export.input_height=96",
        "export.input_width=96",
        "dataset.train_data_sources=[{image_dir: data/train/images, json_file: data/train/annotations.json}]",
        "dataset.val_data_sources=[{image_dir: data/val/images, json_file: data/val/annotations.json}]",
        "quantize.backend_kwargs={calibration_images: 4, latency_runs: 2}",
    ]);
    args.extend_from_slice(extra);
    output(ddetr_in(dir).args(&args))
}

#[test]
fn quantize_writes_both_models_scores_and_times_them() {
    let work = tiny_workdir();
    let ckpt = random_checkpoint(work.path(), 4);
    let out = quantize(work.path(), &ckpt, &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let dir = work.path().join("results/quantize");
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap();
    for key in [
        "fp32_mAP50",
        "int8_mAP50",
        "fp32_latency_ms",
        "int8_latency_ms",
        "size_ratio",
    ] {
        assert!(metrics[key].is_number(), "{key} in {metrics}");
    }
    assert_eq!(metrics["calibration_images"], 4);
    assert!(metrics["size_ratio"].as_f64().unwrap() < 0.4, "{metrics}");
    let fp32 = std::fs::metadata(dir.join("model_fp32.onnx"))
        .unwrap()
        .len();
    let int8 = std::fs::metadata(dir.join("model_int8.onnx"))
        .unwrap()
        .len();
    assert!(int8 * 5 < fp32 * 2, "{int8} vs {fp32}");
    let calib: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("calibration.json")).unwrap()).unwrap();
    assert!(!calib["activations"].as_object().unwrap().is_empty());
    let status = std::fs::read_to_string(dir.join("status.json")).unwrap();
    assert!(status.contains("SUCCESS"), "{status}");
    assert!(err.contains("val mAP50 fp32"), "{err}");
    assert!(err.contains("onnxruntime CPU latency"), "{err}");
}

#[test]
fn bad_quantize_inputs_get_one_line() {
    let work = tiny_workdir();
    let ckpt = random_checkpoint(work.path(), 4);
    for (extra, want) in [
        ("quantize.backend=torchao", "quantize.backend"),
        ("quantize.algorithm=entropi", "quantize.algorithm"),
        ("quantize.mode=dynamic", "quantize.mode"),
    ] {
        let out = quantize(work.path(), &ckpt, &[extra]);
        assert_one_error_line(out.status, &text(&out.stderr), 2, want);
    }
    let onnx = work.path().join("model.onnx");
    std::fs::write(&onnx, b"x").unwrap();
    let out = quantize(work.path(), &onnx, &[]);
    assert_one_error_line(out.status, &text(&out.stderr), 2, "is an ONNX file");
    let out = quantize(work.path(), &work.path().join("missing.safetensors"), &[]);
    assert_one_error_line(out.status, &text(&out.stderr), 2, "does not exist");
}

#[test]
fn dino_quantizes_through_its_command_group() {
    let work = tiny_workdir();
    let spec_path = common::root().join("configs/shapes_dino_tiny.yaml");
    let spec = ddetr_trainer::spec::load(&spec_path, &[], None)
        .unwrap()
        .spec;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = ddetr_trainer::model::dino::Dino::new(
        &vs.root(),
        ddetr_trainer::model::dino::DinoConfig::from_spec(&spec.model, spec.dataset.num_classes)
            .unwrap(),
    );
    let ckpt = work.path().join("dino.safetensors");
    ddetr_trainer::weights::save_safetensors(&vs, &ckpt).unwrap();
    let out = quantize_with(&["dino", "quantize"], &spec_path, work.path(), &ckpt, &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let metrics: serde_json::Value = serde_json::from_slice(
        &std::fs::read(work.path().join("results/quantize/metrics.json")).unwrap(),
    )
    .unwrap();
    assert!(metrics["int8_mAP50"].is_number(), "{metrics}");
    assert!(metrics["size_ratio"].as_f64().unwrap() < 0.4, "{metrics}");
}
