//! `ddetr bench collective` end to end: it spawns its ranks, measures, and ends with the
//! key=value line; misuse exits 2.

use std::process::Command;

fn ddetr() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ddetr"))
}

#[test]
fn bench_collective_spawns_ranks_and_ends_with_key_values() {
    for op in ["all_reduce", "all_gather", "reduce_scatter"] {
        let out = ddetr()
            .args([
                "bench",
                "collective",
                "--nproc",
                "3",
                "--op",
                op,
                "--sizes",
                "64K,1M",
                "--no-peer",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{op}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap_or_default();
        assert!(
            last.starts_with(&format!(
                "op={op} backend=cpu-shm nproc=3 size_bytes=1048572 "
            )),
            "{last}"
        );
        let busbw: f64 = last
            .split_whitespace()
            .find_map(|f| f.strip_prefix("busbw_gbps="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(busbw > 0.0, "{last}");
        assert!(stdout.contains("size= 65532B"), "{stdout}");
    }
}

#[test]
fn bench_collective_rejects_a_world_of_one_as_usage() {
    let out = ddetr()
        .args(["bench", "collective", "--nproc", "1"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nproc 2 or more"));
}

#[test]
fn a_failing_rank_is_one_error_line_with_its_last_stderr() {
    let out = ddetr()
        .args(["bench", "collective", "--nproc", "2", "--sizes", "64K"])
        .arg("--no-peer")
        .env("DDETR_COLLECTIVE_TIMEOUT_S", "bad")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: bench collective ranks: rank "),
        "{err}"
    );
    assert!(
        last.contains("last stderr: error: config: DDETR_COLLECTIVE_TIMEOUT_S=\"bad\""),
        "{err}"
    );
}
