//! `ddetr dataset synth|cache|inspect` and `ddetr convert` through the real binary: output,
//! exit codes (0 ok, 1 bad data, 2 usage) and one-line errors.

mod common;

use std::path::Path;
use std::process::Output;

use common::{ddetr_in, output};

fn ddetr(dir: &Path, args: &[&str]) -> Output {
    output(ddetr_in(dir).args(args).env("DDETR_LOG", "warn"))
}

/// (stdout, stderr).
fn text(o: &Output) -> (String, String) {
    (common::text(&o.stdout), common::text(&o.stderr))
}

const SPEC: &str = "dataset:
  train_data_sources:
    - image_dir: data/train/images
      json_file: data/train/annotations.json
  val_data_sources:
    - image_dir: data/val/images.tar.gz
      json_file: data/val/annotations.json
  num_classes: 4
";

#[test]
fn synth_cache_inspect_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let o = ddetr(
        d,
        &[
            "dataset",
            "synth",
            "--out",
            "data/train",
            "--images",
            "6",
            "--size",
            "64x48",
            "--seed",
            "3",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(
        text(&o).0.starts_with("data/train: 6 images, "),
        "{:?}",
        text(&o)
    );
    let o = ddetr(
        d,
        &[
            "dataset", "synth", "--out", "data/val", "--images", "3", "--size", "64x48", "--tar",
        ],
    );
    assert!(o.status.success(), "{:?}", text(&o));
    std::fs::write(d.join("spec.yaml"), SPEC).unwrap();

    let o = ddetr(d, &["dataset", "cache", "-e", "spec.yaml"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out} {err}");
    assert!(
        out.contains("train: ") && out.contains("(6 images,"),
        "{out}"
    );
    assert!(
        out.contains("val: ") && out.contains("(3 images,") && out.contains("images packed"),
        "{out}"
    );

    let o = ddetr(
        d,
        &[
            "dataset",
            "inspect",
            "-e",
            "spec.yaml",
            "--split",
            "val",
            "--verify",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out} {err}");
    assert!(
        out.contains("images 3 ")
            && out.contains("images.tar.gz (tar.gz)")
            && out.contains("checksum ok"),
        "{out}"
    );
    assert!(
        out.contains("rectangle") && out.contains("small  (< 32^2)"),
        "{out}"
    );

    // A cache file given directly.
    let cache = std::fs::read_dir(d.join("data/train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "ddetr-cache"))
        .unwrap();
    let o = ddetr(d, &["dataset", "inspect", cache.to_str().unwrap()]);
    assert!(
        o.status.success() && text(&o).0.contains("images 6 "),
        "{:?}",
        text(&o)
    );

    // num_classes too small: exit 1, one line that says what to set.
    let o = ddetr(
        d,
        &[
            "dataset",
            "cache",
            "-e",
            "spec.yaml",
            "dataset.num_classes=3",
        ],
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.trim_end().lines().count() == 1
            && err.contains("set dataset.num_classes to at least 4"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ddetr(
        tmp.path(),
        &[
            "dataset", "synth", "--out", "x", "--images", "2", "--size", "64by48",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).1.contains("--size '64by48' is not WIDTHxHEIGHT"),
        "{:?}",
        text(&o)
    );
    let o = ddetr(
        tmp.path(),
        &[
            "dataset",
            "synth",
            "--out",
            "x",
            "--images",
            "2",
            "--classes",
            "9",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let o = ddetr(tmp.path(), &["dataset", "inspect"]);
    assert_eq!(o.status.code(), Some(2));
}
