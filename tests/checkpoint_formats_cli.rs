//! `ddetr evaluate` and `ddetr export` take a TAO Lightning checkpoint as they are: the trainer
//! fixture `trainer/tests/golden/ckpt_tao_l4_refine.pth` (a real PyTorch Lightning save of TAO's
//! module layout, keys `model.model.*`; made by `make_checkpoint_fixtures.py`) of the tiny model
//! below. The log names the layout in one line; a spec of another shape is one error line (exit
//! 2) naming the field. The formats themselves are tested in trainer/tests/checkpoint_formats.rs.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{assert_one_error_line, ddetr_in, output, root, text, tiny_task, TINY_64};

/// `configs/shapes_tiny.yaml` turned into the fixture's model (ResNet-18, d 32, 8 heads, 2+2
/// layers, 4 levels, box refinement, 12 queries, 5 classes); with `TINY_64`, on a few 64×64
/// images.
const TINY_MODEL: &[&str] = &[
    "model.hidden_dim=32",
    "model.nheads=8",
    "model.num_feature_levels=4",
    "model.return_interm_indices=[1,2,3,4]",
    "model.dim_feedforward=64",
    "model.num_queries=12",
    "model.num_select=12",
    "model.enc_n_points=4",
    "model.dec_n_points=2",
    "model.backbone_from_scratch=false",
    "dataset.num_classes=5",
    "dataset.test_data_sources={image_dir: data/images, json_file: data/annotations.json}",
];

fn tao_checkpoint() -> PathBuf {
    root().join("trainer/tests/golden/ckpt_tao_l4_refine.pth")
}

fn ddetr<S: AsRef<OsStr>>(dir: &Path, args: &[S]) -> Output {
    output(ddetr_in(dir).args(args).env("DDETR_LOG", "info"))
}

/// `ddetr <task> -e configs/shapes_tiny.yaml -r r TINY_MODEL… TINY_64… extra…` in `dir`.
fn task(dir: &Path, task: &str, extra: &[&str]) -> Output {
    ddetr(dir, &tiny_task(task, "r", &[TINY_MODEL, TINY_64, extra]))
}

fn stderr(out: &Output) -> String {
    text(&out.stderr)
}

#[test]
fn evaluate_and_export_take_a_tao_lightning_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let synth = ddetr(
        d,
        &[
            "dataset", "synth", "--out", "data", "--images", "2", "--size", "64x64", "--seed", "2",
        ],
    );
    assert!(synth.status.success(), "{}", stderr(&synth));
    let ck = format!("evaluate.checkpoint={}", tao_checkpoint().display());

    let out = task(d, "evaluate", &[&ck]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("TAO Lightning (state_dict, prefix model.model.) — ")
            && err.contains("tensors loaded, 0 missing, 0 unexpected"),
        "{err}"
    );
    assert!(d.join("r/evaluate/metrics.json").is_file());

    // The same checkpoint against a spec of another depth: one line, exit 2, the field named.
    let out = task(d, "evaluate", &[&ck, "model.dec_layers=3"]);
    assert_one_error_line(out.status, &stderr(&out), 2, "set model.dec_layers to 2");

    let onnx = d.join("m.onnx");
    let out = task(
        d,
        "export",
        &[
            &format!("export.checkpoint={}", tao_checkpoint().display()),
            &format!("export.onnx_file={}", onnx.display()),
            "export.input_height=64",
            "export.input_width=64",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(onnx.is_file());
}
