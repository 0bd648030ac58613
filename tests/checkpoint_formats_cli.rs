//! `ddetr evaluate` and `ddetr export` take a TAO Lightning checkpoint as they are: the trainer
//! fixture `trainer/tests/golden/ckpt_tao_l4_refine.pth` (a real PyTorch Lightning save of TAO's
//! module layout, keys `model.model.*`; made by `make_checkpoint_fixtures.py`) of the tiny model
//! below. The log names the layout in one line; a spec of another shape is one error line (exit
//! 2) naming the field. The formats themselves are tested in trainer/tests/checkpoint_formats.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const SPEC: &str = "configs/shapes_tiny.yaml";

/// `configs/shapes_tiny.yaml` turned into the fixture's model (ResNet-18, d 32, 8 heads, 2+2
/// layers, 4 levels, box refinement, 12 queries, 5 classes) on a few 64×64 images.
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
    "dataset.batch_size=2",
    "dataset.workers=1",
    "dataset.augmentation.scales=[64]",
    "dataset.augmentation.train_random_resize=[56,64]",
    "dataset.augmentation.train_random_crop_min=48",
    "dataset.augmentation.train_random_crop_max=64",
    "dataset.augmentation.random_resize_max_size=64",
    "dataset.augmentation.test_random_resize=64",
    "dataset.test_data_sources={image_dir: data/images, json_file: data/annotations.json}",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tao_checkpoint() -> PathBuf {
    root().join("trainer/tests/golden/ckpt_tao_l4_refine.pth")
}

fn ddetr(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddetr"))
        .args(args)
        .current_dir(dir)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env("DDETR_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("ddetr runs")
}

/// `ddetr <task> -e SPEC -r r TINY_MODEL… extra…` in `dir`.
fn task(dir: &Path, task: &str, extra: &[&str]) -> Output {
    let spec = root().join(SPEC);
    let mut args = vec![task, "-e", spec.to_str().unwrap(), "-r", "r"];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(extra);
    ddetr(dir, &args)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("set model.dec_layers to 2"), "{err}");

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
