//! `ddetr export` end to end: a checkpoint of `configs/shapes_tiny.yaml` exported with TAO's keys,
//! the file loaded and run by onnxruntime at batch 1 and 2 (dynamic batch), and each bad input
//! answered with one line and the right exit code; `export.serialize_nvdsinfer`'s DeepStream
//! files parsed. The numerics of the graph against ddetr's forward are checked in
//! trainer/tests/onnx_export.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{
    assert_one_error_line, ddetr_at_root as ddetr, random_checkpoint as checkpoint, text,
};

const SPEC: &str = "configs/shapes_tiny.yaml";

fn export(ckpt: &Path, onnx: &str, extra: &[&str]) -> Output {
    let c = format!("export.checkpoint={}", ckpt.display());
    let o = format!("export.onnx_file={onnx}");
    let mut args = vec!["export", "-e", SPEC, &c, &o];
    args.extend_from_slice(extra);
    ddetr(&args)
}

fn assert_one_line_error(out: &Output, code: i32, needle: &str) {
    assert_one_error_line(out.status, &text(&out.stderr), code, needle);
}

#[test]
fn export_writes_an_onnx_file_onnxruntime_runs_at_batch_1_and_2() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 4);
    let onnx = dir.path().join("out/model.onnx");
    let out = export(
        &ckpt,
        onnx.to_str().unwrap(),
        &["export.input_height=96", "export.input_width=128"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("opset 17"));
    let venv = std::env::var_os("VIRTUAL_ENV")
        .expect("VIRTUAL_ENV is not set: run `eval \"$(scripts/setup.sh --env)\"` first");
    let py = PathBuf::from(venv).join("bin/python");
    let script = r#"
import sys, numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(sys.argv[1], full_check=True)
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
for n in (1, 2):
    logits, boxes = s.run(None, {"inputs": np.zeros((n, 3, 96, 128), np.float32)})
    assert logits.shape == (n, 50, 4), logits.shape
    assert boxes.shape == (n, 50, 4), boxes.shape
    assert np.isfinite(logits).all() and ((boxes >= 0) & (boxes <= 1)).all()
print("ok")
"#;
    let run = Command::new(&py)
        .args(["-c", script, onnx.to_str().unwrap()])
        .output()
        .expect("the venv python runs");
    assert!(
        run.status.success() && text(&run.stdout).contains("ok"),
        "{}{}",
        text(&run.stdout),
        text(&run.stderr)
    );
}

#[test]
fn bad_inputs_are_one_line_each() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 4);
    let onnx = dir.path().join("m.onnx");
    let onnx = onnx.to_str().unwrap();

    // Checkpoint missing.
    let out = export(&dir.path().join("nope.pth"), onnx, &[]);
    assert_one_line_error(&out, 2, "export.checkpoint");
    // A checkpoint of another shape (7 classes where the spec says 4).
    let other = checkpoint(dir.path(), 7);
    let out = export(&other, onnx, &[]);
    assert_one_line_error(&out, 2, "class_embed");
    // Unwritable path.
    let out = export(&ckpt, "/proc/ddetr-no/m.onnx", &[]);
    assert_one_line_error(&out, 1, "cannot write ONNX file");
    // Opset below what the graph needs.
    let out = export(&ckpt, onnx, &["export.opset_version=16"]);
    assert_one_line_error(&out, 2, "below 17");
    assert!(!Path::new(onnx).exists());
}

#[test]
fn serialize_nvdsinfer_writes_labels_and_taos_nvinfer_config() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = checkpoint(dir.path(), 4);
    let json = dir.path().join("val.json");
    std::fs::write(
        &json,
        r#"{"images": [], "annotations": [], "categories": [{"id": 1, "name": "rectangle"}, {"id": 3, "name": "triangle"}, {"id": 2, "name": "ellipse"}]}"#,
    )
    .unwrap();
    let val = format!(
        "dataset.val_data_sources=[{{image_dir: {d}, json_file: {j}}}]",
        d = dir.path().display(),
        j = json.display()
    );
    let onnx = dir.path().join("ds/detector.onnx");
    let out = export(
        &ckpt,
        onnx.to_str().unwrap(),
        &[
            "export.serialize_nvdsinfer=true",
            "export.input_height=96",
            "export.input_width=128",
            &val,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let labels = std::fs::read_to_string(dir.path().join("ds/labels.txt")).unwrap();
    assert_eq!(labels, "class_0\nrectangle\nellipse\ntriangle\n");
    let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(dir.path().join("ds/nvdsinfer_config.yaml")).unwrap(),
    )
    .unwrap();
    let p = &yaml["property"];
    let s = |k: &str| {
        p[k].as_str()
            .unwrap_or_else(|| panic!("{k} in {p:?}"))
            .to_string()
    };
    let n = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} in {p:?}"));
    assert_eq!(s("onnx-file"), "detector.onnx");
    assert_eq!(s("labelfile-path"), "labels.txt");
    assert_eq!(s("infer-dims"), "3;96;128");
    assert_eq!(s("output-blob-names"), "pred_logits;pred_boxes");
    assert_eq!(s("offsets"), "123.675;116.28;103.53");
    assert_eq!(s("parse-bbox-func-name"), "NvDsInferParseCustomDDETRTAO");
    assert_eq!(n("num-detected-classes"), 4.0);
    assert_eq!(n("net-scale-factor"), 0.0173520735728);
    assert_eq!(
        (n("cluster-mode"), n("network-type"), n("network-mode")),
        (4.0, 0.0, 2.0)
    );
    assert_eq!(n("model-color-format"), 0.0);
    assert_eq!(yaml["class-attrs-all"]["topk"].as_f64(), Some(20.0));
    assert_eq!(
        yaml["class-attrs-all"]["pre-cluster-threshold"].as_f64(),
        Some(0.5)
    );

    // A category the model has no output for, and no data to name the classes: one line each.
    std::fs::write(&json, r#"{"categories": [{"id": 7, "name": "boat"}]}"#).unwrap();
    let out = export(
        &ckpt,
        onnx.to_str().unwrap(),
        &["export.serialize_nvdsinfer=true", &val],
    );
    assert_one_line_error(
        &out,
        2,
        "category 7 (boat) is outside dataset.num_classes = 4",
    );
    let out = export(
        &ckpt,
        onnx.to_str().unwrap(),
        &[
            "export.serialize_nvdsinfer=true",
            "dataset.val_data_sources=[]",
            "dataset.train_data_sources=[]",
            "dataset.test_data_sources=[]",
        ],
    );
    assert_one_line_error(&out, 2, "export.serialize_nvdsinfer needs the class names");
}
