//! `ddetr bench step` end to end on a tiny input, with a stand-in peer (a shell script that
//! reports a different median each call) so the round pairing and the ratio are checked without
//! Python.

use std::process::Command;

fn kv<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

/// Runs `ddetr bench step` with `args`, expects success and returns stdout.
fn bench_step_ok(args: &[&str], peer: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddetr"));
    cmd.args(["bench", "step"]).args(args);
    if let Some(peer) = peer {
        cmd.args(["--python", "/bin/sh", "--peer"]).arg(peer);
    }
    let out = cmd.output().expect("ddetr runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn rounds_alternate_ours_and_the_peer_and_the_ratio_is_their_median() {
    let dir = tempfile::tempdir().unwrap();
    let peer = dir.path().join("peer.sh");
    let count = dir.path().join("calls");
    // 1st call: 1.5 s, 2nd: 3.0 s; the args are batch size steps, as hf_ddetr_step.py takes.
    std::fs::write(
        &peer,
        format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}\n\
             [ \"$1 $2 $3\" = \"1 64 1\" ] || {{ echo \"bad args $*\" >&2; exit 3; }}\n\
             if [ $n = 1 ]; then m=1.5; else m=3.0; fi\n\
             echo \"hf-ddetr device=$DEVICE median_step=${{m}}s\"\n",
            c = count.display()
        ),
    )
    .unwrap();
    let stdout = bench_step_ok(
        &[
            "--batch", "1", "--size", "64", "--steps", "1", "--rounds", "2",
        ],
        Some(&peer),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let ours: Vec<f64> = lines
        .iter()
        .filter(|l| l.contains(": ddetr: "))
        .map(|l| kv(l, "median_step=").trim_end_matches('s').parse().unwrap())
        .collect();
    assert_eq!(ours.len(), 2, "{stdout}");
    assert!(lines[1].starts_with("round 1: peer") && lines[3].starts_with("round 2: peer"));
    let last = lines.last().unwrap();
    let ratio: f64 = kv(last, "ratio=").parse().unwrap();
    let want = (ours[0] / 1.5 + ours[1] / 3.0) / 2.0;
    assert!(
        (ratio - want).abs() < 2e-3,
        "ratio {ratio} vs {want}: {stdout}"
    );
    assert_eq!(kv(last, "peer_step_s="), "2.250");
    // Images per second are batch / median step on both sides.
    let ours_ips: f64 = kv(last, "imgs_per_s=").parse().unwrap();
    let ours_s: f64 = kv(last, "step_s=").parse().unwrap();
    assert!(
        (ours_ips - 1.0 / ours_s).abs() < 0.01 * ours_ips + 0.01,
        "{last}"
    );
    assert_eq!(kv(last, "peer_imgs_per_s="), "0.44");
    assert_eq!(kv(last, "precision="), "fp32");
    assert_eq!(kv(last, "device="), "cpu");
    assert_eq!(kv(last, "rounds="), "2");
    assert!(kv(last, "step_s=").parse::<f64>().unwrap() > 0.0);

    let zero = Command::new(env!("CARGO_BIN_EXE_ddetr"))
        .args(["bench", "step", "--no-peer", "--rounds", "0"])
        .output()
        .unwrap();
    assert_eq!(zero.status.code(), Some(1));
    let err = String::from_utf8_lossy(&zero.stderr);
    assert!(err.contains("--rounds 0"), "{err}");
}

#[test]
fn non_square_sizes_run_ours_alone_and_bad_flags_fail_with_one_line() {
    let stdout = bench_step_ok(
        &[
            "--batch",
            "1",
            "--size",
            "64x96",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--no-peer",
        ],
        None,
    );
    let last = stdout.lines().last().unwrap();
    assert_eq!(kv(last, "size="), "64x96");
    assert!(
        !last.contains("peer_") && !last.contains("peak_gpu"),
        "{last}"
    );

    for (args, code, want) in [
        (&["--size", "64x96"][..], 1, "square sizes only"),
        (&["--precision", "bf16", "--no-peer"][..], 1, "add --cuda"),
        (&["--size", "8"][..], 2, "at least 32 pixels"),
        (&["--size", "64by64"][..], 2, "give N (square) or HxW"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ddetr"))
            .args(["bench", "step"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?} ran something");
    }
}

#[test]
fn without_a_peers_folder_ours_runs_alone_and_one_line_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let absent = dir.path().join("no-peers");
    let out = Command::new(env!("CARGO_BIN_EXE_ddetr"))
        .args(["bench", "step", "--batch", "1", "--size", "64"])
        .args(["--steps", "1", "--rounds", "1"])
        .env("DDETR_PEERS_DIR", &absent)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: Vec<&str> = stdout.lines().filter(|l| l.starts_with("peer")).collect();
    assert_eq!(
        said,
        [format!(
            "peer: unavailable (DDETR_PEERS_DIR={} not found): ours only",
            absent.display()
        )],
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap();
    assert!(kv(last, "step_s=").parse::<f64>().unwrap() > 0.0, "{last}");
    assert!(
        !last.contains("peer_") && !last.contains("ratio="),
        "{last}"
    );
}

#[test]
fn dino_is_measured_alone_with_its_model_in_the_last_line() {
    let stdout = bench_step_ok(
        &[
            "--model", "dino", "--batch", "1", "--size", "160", "--steps", "1", "--rounds", "1",
        ],
        None,
    );
    assert!(stdout.contains("peer: none for DINO"), "{stdout}");
    let last = stdout.lines().last().unwrap();
    assert_eq!(kv(last, "model="), "dino");
    assert!(!last.contains("ratio="), "{last}");
    assert!(kv(last, "step_s=").parse::<f64>().unwrap() > 0.0);
}

#[test]
fn gcvit_backbone_step_against_a_stand_in_timm_and_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in python: checks the peer's arguments (script variant batch size steps threads)
    // and prints what timm_gcvit_step.py prints.
    let python = dir.path().join("python");
    std::fs::write(
        &python,
        "#!/bin/sh\n[ \"$2 $3 $4 $5 $6\" = \"xxtiny 1 64 1 2\" ] || { echo \"bad args $*\" >&2; exit 3; }\n\
         echo params=1000\necho \"timm-gcvit median_step=2.0s\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddetr"));
    cmd.args([
        "bench",
        "step",
        "--backbone",
        "gc_vit_xxtiny",
        "--batch",
        "1",
    ])
    .args(["--size", "64", "--steps", "1", "--rounds", "1", "--python"])
    .arg(&python);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    assert_eq!(kv(last, "backbone="), "gc_vit_xxtiny");
    assert_eq!(kv(last, "peer_params="), "1000");
    let ours: f64 = kv(last, "step_s=").parse().unwrap();
    let ratio: f64 = kv(last, "ratio=").parse().unwrap();
    assert!((ratio - ours / 2.0).abs() < 2e-3, "{last}");
    // timm_gcvit_step.py is the peer script the stand-in was given.
    assert!(stdout.contains("peer (timm gcvit_xxtiny)"), "{stdout}");

    for (args, want) in [
        (
            &["--backbone", "resnet_50"][..],
            "compares transformer backbones",
        ),
        (
            &["--backbone", "gc_vit_tny"][..],
            "did you mean 'gc_vit_tiny'",
        ),
        (&["--backbone", "gc_vit_tiny", "--cuda"][..], "on the CPU"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ddetr"))
            .args(["bench", "step", "--no-peer"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn fan_backbone_step_against_a_stand_in_tao_and_without_taos_code() {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in python: checks the peer's arguments (script variant batch height width steps
    // threads) and prints what tao_fan.py prints.
    let python = dir.path().join("python");
    std::fs::write(
        &python,
        "#!/bin/sh\n[ \"$2 $3 $4 $5 $6 $7\" = \"tiny 1 64 96 1 2\" ] || { echo \"bad args $*\" >&2; exit 3; }\n\
         echo params=2000\necho \"tao-fan median_step=4.0s\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let run = |tao: Option<&std::path::Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddetr"));
        cmd.args(["bench", "step", "--backbone", "fan_tiny", "--batch", "1"])
            .args([
                "--size", "64x96", "--steps", "1", "--rounds", "1", "--python",
            ])
            .arg(&python);
        match tao {
            Some(t) => cmd.env("TAO_PYTORCH_BACKEND", t),
            None => cmd.env_remove("TAO_PYTORCH_BACKEND"),
        };
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let stdout = run(Some(dir.path()));
    let last = stdout.lines().last().unwrap();
    assert_eq!(kv(last, "backbone="), "fan_tiny");
    assert_eq!(kv(last, "peer_params="), "2000");
    let ours: f64 = kv(last, "step_s=").parse().unwrap();
    let ratio: f64 = kv(last, "ratio=").parse().unwrap();
    assert!((ratio - ours / 4.0).abs() < 2e-3, "{last}");
    assert!(stdout.contains("peer (TAO fan_tiny)"), "{stdout}");
    // Without TAO's code: one line, ours alone.
    let stdout = run(None);
    assert!(
        stdout.contains("peer: unavailable (TAO's FAN is the peer: set TAO_PYTORCH_BACKEND"),
        "{stdout}"
    );
    assert!(
        !stdout.lines().last().unwrap().contains("ratio="),
        "{stdout}"
    );
}
