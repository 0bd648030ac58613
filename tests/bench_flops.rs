//! `ddetr bench flops` end to end with a stand-in peer (a shell script in place of the python
//! that runs `fvcore_flops.py`), so the report's arithmetic — the head calls and mask resize a
//! deployed graph does not make taken off fvcore's total, the ratio — is checked without Python;
//! and a spec transformers cannot build, measured alone.

mod common;

use common::{ddetr_at_root, text};

fn kv(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

/// `ddetr bench flops args…` from the workspace root; expects success, returns stdout.
fn bench(args: &[&str]) -> String {
    let out = ddetr_at_root(&[&["bench", "flops"], args].concat());
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    stdout
}

#[test]
fn the_peer_is_compared_without_what_a_deployed_graph_does_not_compute() {
    let dir = tempfile::tempdir().unwrap();
    let python = dir.path().join("python");
    // `-c "import fvcore"` succeeds; the script run gets the spec's network as arguments.
    std::fs::write(
        &python,
        "#!/bin/sh\n[ \"$1\" = -c ] && exit 0\n\
         case \"$*\" in *'--height 96 --width 128 --backbone resnet18 --levels 4 --classes 4 \
         --queries 50 --enc 2 --dec 2 --ffn 256 --d-model 128 --heads 4'*'--refine') ;; \
         *) echo \"bad args $*\" >&2; exit 3;; esac\n\
         echo 'some log line'\n\
         echo '{\"total\": 3.0e9, \"aux_heads\": 0.5e9, \"params\": 7, \"by_operator\": \
         {\"conv\": 1.5e9, \"linear\": 1.0e9, \"layer_norm\": 0.25e9, \"grid_sampler\": 0.2e9, \
         \"upsample_nearest2d\": 0.05e9}, \"transformers\": \"x\", \"fvcore\": \"y\"}'\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = bench(&[
        "-e",
        "configs/shapes_tiny.yaml",
        "--set",
        "model.num_feature_levels=4",
        "--set",
        "model.return_interm_indices=[1,2,3,4]",
        "--set",
        "export.input_height=96",
        "--set",
        "export.input_width=128",
        "--python",
        python.to_str().unwrap(),
    ]);
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("input=96x128 gflops="), "{out}");
    // 3.0 - 0.5 (heads on every layer) - 0.05 (mask resize) = 2.45 G.
    assert_eq!(kv(last, "peer_gflops="), 2.45, "{out}");
    assert_eq!(kv(last, "peer_gflops_all="), 3.0, "{out}");
    let ratio = kv(last, "gflops=") / 2.45;
    assert!((kv(last, "ratio=") - ratio).abs() < 1e-3, "{out}");
    // fvcore's linear without the extra head calls: 1.0 - 0.5.
    let linear = out.lines().find(|l| l.starts_with("linear")).unwrap();
    assert!(linear.trim_end().ends_with("0.5000"), "{out}");
}

#[test]
fn a_network_transformers_cannot_build_is_measured_alone() {
    let out = bench(&[
        "-e",
        "configs/shapes_tiny.yaml",
        "--python",
        "/nonexistent/python",
    ]);
    assert!(
        out.starts_with("peer: unavailable (transformers' Deformable DETR reads"),
        "{out}"
    );
    let last = out.lines().last().unwrap();
    assert!(last.starts_with("input=544x960 gflops="), "{out}");
    assert!(!last.contains("peer_"), "{out}");
    assert!(kv(last, "gflops=") > 1.0, "{out}");
}

#[test]
fn a_fan_without_taos_code_is_measured_alone() {
    let out = common::output(
        common::ddetr_in(common::root())
            .args(["bench", "flops", "-e", "configs/dino_r50.yaml"])
            .args([
                "--set",
                "model.backbone=fan_tiny",
                "--set",
                "model.num_queries=100",
            ])
            .args([
                "--set",
                "export.input_height=100",
                "--set",
                "export.input_width=140",
            ])
            .env_remove("TAO_PYTORCH_BACKEND")
            .env_remove("LD_LIBRARY_PATH"),
    );
    let stdout = common::text(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        common::text(&out.stderr)
    );
    assert!(
        stdout.starts_with("peer: unavailable (TAO's FAN is the peer: set TAO_PYTORCH_BACKEND"),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("input=100x140 gflops="), "{stdout}");
    assert!(!last.contains("peer_"), "{stdout}");
}
