//! End-to-end checks of the `ddetr` binary: the spec commands, doctor, and the exit-code contract.

mod common;

use std::process::{Command, Output};

use common::{ddetr_at_root as ddetr, ddetr_bin, text};

#[test]
fn spec_show_prints_the_resolved_spec_with_overrides() {
    let out = ddetr(&[
        "spec",
        "show",
        "-e",
        "configs/coco_r50.yaml",
        "train.num_epochs=3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(yaml.contains("  num_epochs: 3\n"), "{yaml}");
    // Defaults not in the file are printed too.
    assert!(yaml.contains("  dim_feedforward: 1024\n"));
    assert!(yaml.contains("  lr_linear_proj_mult: 0.1\n"));
}

#[test]
fn typo_in_spec_exits_2_with_one_line_and_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, "model:\n  num_querys: 100\n").unwrap();
    let out = ddetr(&["spec", "validate", "-e", spec.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("unknown key 'model.num_querys' in model: did you mean 'model.num_queries'?"),
        "{err}"
    );
}

#[test]
fn missing_spec_file_and_bad_flags_exit_2() {
    let out = ddetr(&["spec", "show", "-e", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read spec does/not/exist.yaml"));
    let out = ddetr(&["spec", "show", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let out = ddetr(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn validate_prints_notices_and_succeeds() {
    let out = ddetr(&[
        "spec",
        "validate",
        "-e",
        "configs/shapes_tiny.yaml",
        "train.num_gpus=2",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("notice: train.num_gpus = 2 and train.gpu_ids = [0] disagree"),
        "{err}"
    );
    assert!(err.contains("valid (spec hash "), "{err}");
}

#[test]
fn doctor_runs_on_this_machine_and_is_honest() {
    let out = ddetr(&["doctor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    for label in ["ddetr ", "libtorch ", "cpu ", "cuda ", "nccl ", "venv "] {
        assert!(
            report.lines().any(|l| l.starts_with(label)),
            "no '{label}' line in:\n{report}"
        );
    }
    assert!(report.contains("libtorch  2.11.0"), "{report}");
    // CUDA line agrees with what libtorch sees (with its CUDA half loaded, as the binary does).
    let cuda_line = report.lines().find(|l| l.starts_with("cuda")).unwrap();
    if !ddetr_trainer::cuda_runtime::cuda_available() {
        assert!(
            cuda_line.contains("none") || cuda_line.contains("no CUDA device"),
            "{cuda_line}"
        );
    } else {
        assert!(cuda_line.contains("device(s)"), "{cuda_line}");
    }
}

/// The binaries link no libtorch_cuda (the linker drops it), so `ddetr-torch` opens it at start
/// where the NVIDIA driver is present, and only there. A stand-in `libcuda.so.1` (an empty
/// library) makes this machine look like it has a driver; `LD_DEBUG=files` shows what the loader
/// opened.
#[test]
fn libtorch_cuda_is_opened_where_a_driver_is_present_and_only_there() {
    if ddetr_trainer::cuda_runtime::driver_present() {
        return; // a real GPU machine: the doctor test covers it
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("fake.cc");
    std::fs::write(&src, "extern \"C\" { int ddetr_fake_cuda_driver = 0; }\n").unwrap();
    let lib = dir.path().join("libcuda.so.1");
    let built = Command::new("c++")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("c++ runs (scripts/setup.sh installs g++)");
    assert!(built.success());
    let run = |fake_driver: bool| {
        let mut cmd = Command::new(ddetr_bin());
        cmd.arg("doctor").env("LD_DEBUG", "files");
        if fake_driver {
            cmd.env("LD_LIBRARY_PATH", dir.path());
        }
        cmd.output().unwrap()
    };
    let opened = |out: &Output| {
        text(&out.stderr)
            .lines()
            .any(|l| l.contains("libtorch_cuda.so") && l.contains("dynamically loaded"))
    };
    let with = run(true);
    assert!(opened(&with), "{}", text(&with.stderr));
    let report = text(&with.stdout);
    assert!(
        report.contains("the driver loads, but reports no device"),
        "{report}"
    );
    let without = run(false);
    assert!(!opened(&without));
    assert!(text(&without.stdout).contains("no NVIDIA driver"));
}

#[test]
fn model_info_counts_parameters_per_module() {
    let out = ddetr(&["model", "info", "-e", "configs/dino_r50.yaml"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.starts_with(
            "model: dino (resnet_50, 4 levels, d 256, 6+6 layers, 300 queries, 91 classes)"
        ),
        "{table}"
    );
    // The rows add up to the total; the official DINO-4scale R50 has 46.79 M parameters at 300
    // queries, here plus the FrozenBatchNorm running statistics (frozen).
    let num = |s: &str| s.replace(',', "").parse::<i64>().unwrap();
    let (mut t, mut f) = (0, 0);
    for line in table.lines().skip(2) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() != 3 || line.contains('=') {
            continue;
        }
        if cols[0] == "total" {
            assert_eq!((num(cols[1]), num(cols[2])), (t, f), "{table}");
        } else {
            t += num(cols[1]);
            f += num(cols[2]);
        }
    }
    assert!(table.contains("transformer.encoder ") && table.contains("backbone.0.body.layer4 "));
    let last = table.lines().last().unwrap();
    assert!(
        last.starts_with("params=46845822 trainable=46517182 frozen=328640 input=544x960 gflops="),
        "{last}"
    );
    // FLOPs at TAO's export size: the backbone's convolutions alone are ~4.1 GFLOPs per
    // 224² image for ResNet-50, about 43 at 544×960; the transformer adds tens more.
    let gflops: f64 = last
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("gflops="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((60.0..250.0).contains(&gflops), "{last}");
    let out = ddetr(&[
        "model",
        "info",
        "-e",
        "configs/shapes_tiny.yaml",
        "model.nheads=3",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}
