//! `ddetr bench launch` end to end (without the torchrun peer): it launches `ddetr-launch` with
//! `ddetr bench barrier` workers and ends with the key=value line; a bad `--runs` exits 2.

use std::process::Command;

fn ddetr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ddetr"))
}

#[test]
fn bench_launch_times_the_launcher_and_ends_with_key_values() {
    let out = ddetr()
        .args([
            "bench",
            "launch",
            "--nproc",
            "2",
            "--runs",
            "1",
            "--no-peer",
        ])
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("run 0: ddetr-launch + bench barrier: "),
        "{stdout}"
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("nproc=2 runs=1 ours_s="), "{last}");
    let figure = |key: &str| -> f64 {
        last.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {last}"))
            .parse()
            .unwrap()
    };
    // The agent alone (no libtorch in its workers) is faster than with ddetr workers.
    let (ours, agent) = (figure("ours_s="), figure("agent_only_s="));
    assert!(agent > 0.0 && ours > agent, "{last}");
}

#[test]
fn bench_barrier_alone_is_a_world_of_one() {
    let out = ddetr()
        .args(["bench", "barrier", "--all-reduce"])
        .env_remove("WORLD_SIZE")
        .env_remove("DDETR_RDZV")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim(),
        "rank 0 of 1: barrier passed, all_reduce sum=1 (single)"
    );
}

#[test]
fn bench_launch_rejects_zero_runs_as_usage() {
    let out = ddetr()
        .args(["bench", "launch", "--runs", "0", "--no-peer"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
