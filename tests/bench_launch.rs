//! `ddetr bench launch` end to end (without the torchrun peer): it launches `ddetr-launch` with
//! `ddetr bench barrier` workers and ends with the key=value line; a bad `--runs` exits 2. And the
//! `ddetr` front binary around it: `bench barrier` runs in the front (world of one, plain torchrun
//! env, the join errors), everything else is exec'd to `ddetr-torch`, and a missing `ddetr-torch`
//! is one error line.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    // Both are measured (whether the workers' join shows above the noise of one run is not
    // something a test can rely on).
    let (ours, agent) = (figure("ours_s="), figure("agent_only_s="));
    assert!(ours > 0.0 && agent > 0.0, "{last}");
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

#[test]
fn the_front_hands_every_other_command_line_to_the_full_cli() {
    let out = ddetr().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        concat!("ddetr ", env!("CARGO_PKG_VERSION"))
    );
    // Help for the command the front runs itself still comes from the full CLI, as `ddetr`.
    let out = ddetr()
        .args(["bench", "barrier", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("Usage: ddetr bench barrier [OPTIONS]"),
        "{help}"
    );
    assert!(help.contains("--all-reduce"), "{help}");
    // A usage error is the full CLI's: clap's message and exit code 2.
    let out = ddetr()
        .args(["bench", "barrier", "--all-reduce", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unexpected argument '--bogus'"), "{err}");
    assert!(err.contains("Usage: ddetr bench barrier"), "{err}");
}

#[test]
fn the_front_without_its_full_cli_says_where_it_looked_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let front = dir.path().join("ddetr");
    std::fs::copy(env!("CARGO_BIN_EXE_ddetr"), &front).unwrap();
    let out = Command::new(&front)
        .args(["spec", "show", "-e", "x.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let want = format!(
        "error: {} does not exist: ",
        dir.path().join("ddetr-torch").display()
    );
    assert!(err.starts_with(&want), "{err}");
    assert!(err.contains("cargo build --release --bins"), "{err}");
    // The barrier needs no full CLI (and no libtorch).
    let out = Command::new(&front)
        .args(["bench", "barrier"])
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "rank 0 of 1: barrier passed"
    );
}

/// Kills the ranks that are still running when a test ends, passed or failed.
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn bench_barrier_joins_under_plain_torchrun_env() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let mut ranks = Ranks(Vec::new());
    for rank in ["0", "1"] {
        ranks.0.push(
            ddetr()
                .args(["bench", "barrier", "--all-reduce"])
                .env_remove("DDETR_RDZV")
                .env("RANK", rank)
                .env("LOCAL_RANK", rank)
                .env("WORLD_SIZE", "2")
                .env("LOCAL_WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("DDETR_COLLECTIVE_TIMEOUT_S", "20")
                .env("DDETR_CPU_TRANSPORT", "tcp")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while ranks.0.iter_mut().any(|c| c.try_wait().unwrap().is_none()) {
        assert!(
            Instant::now() < deadline,
            "the ranks did not finish in 40 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (rank, child) in std::mem::take(&mut ranks.0).into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.trim(),
            format!("rank {rank} of 2: barrier passed, all_reduce sum=3 (cpu-tcp)")
        );
    }
}

#[test]
fn bench_barrier_join_errors_are_one_line() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = ddetr();
        cmd.args(["bench", "barrier"])
            .env_remove("DDETR_RDZV")
            .env_remove("DDETR_JOB_TOKEN")
            .env_remove("MASTER_PORT")
            .env("RANK", "1")
            .env("WORLD_SIZE", "2");
        let out = cmd.envs(env.iter().copied()).output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "{err}");
        err
    };
    let err = run(&[]);
    assert!(
        err.starts_with("error: joining the job: WORLD_SIZE is 2 but MASTER_PORT is not a port number: run under ddetr-launch"),
        "{err}"
    );
    let err = run(&[("DDETR_RDZV", "quic://127.0.0.1:9")]);
    assert!(
        err.starts_with("error: joining the job: DDETR_RDZV is quic://127.0.0.1:9 but DDETR_JOB_TOKEN is not set"),
        "{err}"
    );
    let err = run(&[("RANK", "2")]);
    assert!(err.contains("need rank < world"), "{err}");
}
