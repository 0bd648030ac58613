//! End-to-end checks of the `ddetr-launch` binary on one node, with `/bin/sh -c <script>` as the
//! trainer: output prefixing, the env contract, log files, failure reports, group restarts,
//! signal forwarding, and that no trainer or grandchild outlives the agent. Every test is bounded
//! in time and its Drop guard kills whatever is left.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use common::{launch_bin, read_pid, signal, Proc};

/// Upper bound for anything a test waits on.
const PATIENCE: Duration = Duration::from_secs(30);

/// One agent run in its own temp dir; stdout/stderr go to files there.
struct Agent {
    proc: Proc,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start(flags: &[&str], script: &str) -> Self {
        Self::start_env(flags, script, &[])
    }

    fn start_env(flags: &[&str], script: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(launch_bin());
        for (flag, default) in [("--device", "cpu"), ("--trainer-bin", "/bin/sh")] {
            if !flags.contains(&flag) {
                cmd.args([flag, default]);
            }
        }
        cmd.args(flags)
            .args(["--", "-c", script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("D", dir.path())
            .envs(env.iter().copied())
            .current_dir(dir.path());
        let proc = Proc::spawn(&mut cmd, &dir.path().join("agent"));
        Agent { proc, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits for the agent to exit (panics after `limit`).
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        self.proc.wait(limit)
    }

    fn stdout(&self) -> String {
        self.proc.stdout()
    }

    fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// Waits until the trainers have written all of `names` (non-empty) in the temp dir.
    fn wait_files(&self, names: &[&str]) {
        let t = Instant::now();
        while !names
            .iter()
            .all(|n| std::fs::metadata(self.path(n)).is_ok_and(|m| m.len() > 0))
        {
            assert!(
                t.elapsed() < PATIENCE,
                "{names:?} not written: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pid a worker wrote.
    fn pid(&self, name: &str) -> i32 {
        read_pid(&self.path(name), PATIENCE)
    }

    fn signal(&self, sig: &str, pid: i32) {
        signal(sig, pid);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.proc.stop();
        // Whatever the trainers recorded: their groups and their grandchildren.
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("pid_") || name.starts_with("gc_") {
                    if let Ok(pid) = std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .trim()
                        .parse::<i32>()
                    {
                        let _ = Command::new("kill")
                            .args(["-KILL", "--", &format!("-{pid}")])
                            .status();
                        let _ = Command::new("kill")
                            .args(["-KILL", &pid.to_string()])
                            .status();
                    }
                }
            }
        }
    }
}

/// Waits (bounded) for every pid to be gone; true when they all are.
fn all_gone(pids: &[i32]) -> bool {
    common::all_gone(pids, Duration::from_secs(2))
}

fn log(dir: &Path, rank: u32) -> String {
    std::fs::read_to_string(dir.join(format!("logs/rank_{rank}.log"))).unwrap()
}

#[test]
fn two_ranks_succeed_with_prefixed_output_env_contract_and_log_files() {
    let script = r#"echo "rank=$RANK local=$LOCAL_RANK ws=$WORLD_SIZE lws=$LOCAL_WORLD_SIZE node=$NODE_RANK addr=$MASTER_ADDR port=$MASTER_PORT rdzv=$DDETR_RDZV restart=$DDETR_RESTART_COUNT omp=$OMP_NUM_THREADS"; echo "token=$DDETR_JOB_TOKEN"; echo "to stderr $RANK" >&2"#;
    let mut a = Agent::start(&["--nproc-per-node", "2", "--log-dir", "logs"], script);
    let st = a.wait(PATIENCE);
    assert!(st.success(), "{st:?}: {}", a.stderr());
    let out = a.stdout();
    let err = a.stderr();
    for rank in 0..2 {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("[rank {rank}] rank=")))
            .unwrap_or_else(|| panic!("no [rank {rank}] line in {out}"));
        let port: u16 = line
            .split("port=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(port > 0);
        let omp: u32 = line.split("omp=").nth(1).unwrap().parse().unwrap();
        assert!(omp >= 1);
        assert_eq!(
            line,
            format!(
                "{rank} local={rank} ws=2 lws=2 node=0 addr=127.0.0.1 port={port} \
                 rdzv=quic://127.0.0.1:{port} restart=0 omp={omp}"
            )
        );
        assert!(
            err.contains(&format!("[rank {rank}] to stderr {rank}\n")),
            "{err}"
        );
        // The log holds the trainer's own lines, unprefixed, both streams.
        let log = log(a.dir.path(), rank);
        assert!(log.contains(&format!("rank={rank} local={rank}")), "{log}");
        assert!(log.contains(&format!("to stderr {rank}\n")), "{log}");
        assert!(!log.contains("[rank"), "{log}");
    }
    // One random token shared by the ranks of a launch.
    let tokens: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("token=").nth(1))
        .collect();
    assert_eq!(tokens.len(), 2);
    assert_eq!(tokens[0], tokens[1]);
    assert_eq!(tokens[0].len(), 32);
}

#[test]
fn a_failing_rank_exits_1_naming_rank_code_and_stderr_and_leaves_nothing_running() {
    // Rank 0 records its pid and a background child, then waits; rank 1 fails once they exist.
    let script = r#"
        if [ "$RANK" = 0 ]; then sleep 1000 & echo $! > "$D/gc_0"; echo $$ > "$D/pid_0"; wait; fi
        while [ ! -s "$D/pid_0" ]; do sleep 0.02; done
        echo "loading shard 7" >&2; echo "CUDA out of memory (pretend)" >&2; exit 3"#;
    let mut a = Agent::start(
        &[
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "0",
            "--grace",
            "5",
        ],
        script,
    );
    let st = a.wait(PATIENCE);
    assert_eq!(st.code(), Some(1), "{}", a.stderr());
    let err = a.stderr();
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with(
            "error: rank 1 (node 0, local rank 1) exited with code 3 after 0 restart(s) \
             (--max-restarts 0); last stderr: loading shard 7 | CUDA out of memory (pretend)"
        ),
        "{err}"
    );
    // The other rank's process group is gone: the shell and its background sleep.
    let (pid0, gc0) = (a.pid("pid_0"), a.pid("gc_0"));
    assert!(
        all_gone(&[pid0, gc0]),
        "rank 0 ({pid0}) or its child ({gc0}) survived"
    );
}

#[test]
fn kill_9_of_one_trainer_restarts_the_group_which_then_completes() {
    let script = r#"
        if [ "$DDETR_RESTART_COUNT" = 0 ]; then echo $$ > "$D/pid_$RANK"; sleep 1000 & wait; fi
        echo "rank $RANK done on restart $DDETR_RESTART_COUNT""#;
    let mut a = Agent::start(&["--nproc-per-node", "2", "--max-restarts", "1"], script);
    a.wait_files(&["pid_0", "pid_1"]);
    a.signal("-KILL", a.pid("pid_1"));
    let st = a.wait(PATIENCE);
    assert!(st.success(), "{st:?}: {}", a.stderr());
    let out = a.stdout();
    assert!(out.contains("[rank 0] rank 0 done on restart 1\n"), "{out}");
    assert!(out.contains("[rank 1] rank 1 done on restart 1\n"), "{out}");
    assert!(
        a.stderr().contains(
            "rank 1 was killed by signal 9 (SIGKILL) on node 0: restarting every node's trainers (restart 1 of 1)"
        ),
        "{}",
        a.stderr()
    );
    assert!(all_gone(&[a.pid("pid_0"), a.pid("pid_1")]));
}

#[test]
fn restarts_spent_reports_the_signal() {
    let script = r#"echo $$ > "$D/pid_${RANK}_$DDETR_RESTART_COUNT"; if [ "$RANK" = 1 ]; then kill -9 $$; fi; sleep 1000 & wait"#;
    let mut a = Agent::start(&["--nproc-per-node", "2", "--max-restarts", "1"], script);
    let st = a.wait(PATIENCE);
    assert_eq!(st.code(), Some(1), "{}", a.stderr());
    assert!(
        a.stderr().contains(
            "error: rank 1 (node 0, local rank 1) was killed by signal 9 (SIGKILL) after 1 restart(s) \
             (--max-restarts 1); it wrote nothing to stderr"
        ),
        "{}",
        a.stderr()
    );
}

#[test]
fn sigterm_to_the_agent_reaches_every_trainer_and_it_exits_143_within_the_grace() {
    let script = r#"
        trap 'echo "$RANK" > "$D/term_$RANK"; exit 0' TERM
        sleep 1000 & echo $! > "$D/gc_$RANK"; echo $$ > "$D/pid_$RANK"; wait"#;
    let grace = 8;
    let mut a = Agent::start(
        &["--nproc-per-node", "2", "--grace", &grace.to_string()],
        script,
    );
    a.wait_files(&["pid_0", "pid_1", "gc_0", "gc_1"]);
    let t = Instant::now();
    a.signal("-TERM", a.proc.id() as i32);
    let st = a.wait(PATIENCE);
    let took = t.elapsed();
    assert_eq!(st.code(), Some(143), "{}", a.stderr());
    assert!(
        a.stderr()
            .contains("SIGTERM received: stopping the trainers"),
        "{}",
        a.stderr()
    );
    assert!(took < Duration::from_secs(grace), "took {took:?}");
    for rank in 0..2 {
        assert_eq!(
            std::fs::read_to_string(a.path(&format!("term_{rank}")))
                .unwrap()
                .trim(),
            rank.to_string()
        );
    }
    let pids = [a.pid("pid_0"), a.pid("pid_1"), a.pid("gc_0"), a.pid("gc_1")];
    assert!(all_gone(&pids), "{pids:?}");
}

#[test]
fn sigint_to_the_agent_exits_130_and_a_trainer_ignoring_sigterm_is_killed_after_the_grace() {
    let script = r#"trap '' TERM; echo $$ > "$D/pid_$RANK"; while :; do sleep 0.05; done"#;
    let mut a = Agent::start(&["--nproc-per-node", "1", "--grace", "0.5"], script);
    a.wait_files(&["pid_0"]);
    let t = Instant::now();
    a.signal("-INT", a.proc.id() as i32);
    let st = a.wait(PATIENCE);
    assert_eq!(st.code(), Some(130), "{}", a.stderr());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        a.stderr()
            .contains("still running after the 0.5 s grace: SIGKILL"),
        "{}",
        a.stderr()
    );
    assert!(all_gone(&[a.pid("pid_0")]));
}

#[test]
fn a_grandchild_does_not_outlive_the_agent() {
    // The trainer succeeds at once but leaves a background process holding its stdout.
    let script = r#"sleep 1000 & echo $! > "$D/gc_$RANK"; echo "left a child""#;
    let mut a = Agent::start(&["--nproc-per-node", "1", "--grace", "5"], script);
    let st = a.wait(PATIENCE);
    assert!(st.success(), "{}", a.stderr());
    assert!(a.stdout().contains("[rank 0] left a child\n"));
    let gc = a.pid("gc_0");
    assert!(all_gone(&[gc]), "grandchild {gc} outlived the agent");
}

#[test]
fn dry_run_prints_the_world_resolved_from_slurm() {
    let env = [
        ("SLURM_NNODES", "4"),
        ("SLURM_NODEID", "2"),
        ("SLURM_JOB_NODELIST", "gpu[07-09,12]"),
        ("SLURM_JOB_ID", "123456"),
    ];
    let mut a = Agent::start_env(&["--nproc-per-node", "2", "--dry-run"], "unused", &env);
    let st = a.wait(PATIENCE);
    assert!(st.success(), "{}", a.stderr());
    let out = a.stdout();
    for line in [
        "nodes=4",
        "node_rank=2",
        "nproc_per_node=2",
        "world_size=8",
        "ranks=4-5",
        "device=cpu",
        "master_addr=gpu07",
        "master_port=18456",
        "rdzv=quic://gpu07:18456",
        "job_id=123456",
        "source.nodes=SLURM_NNODES",
        "source.node_rank=SLURM_NODEID",
        "source.master_addr=SLURM_JOB_NODELIST (first host)",
        "trainer=/bin/sh",
        "source.job_token=random",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "{line:?} missing from\n{out}"
        );
    }
}

/// Flags, environment, the start of the expected stderr.
type UsageCase = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

#[test]
fn usage_errors_exit_2_with_one_line() {
    let cases: [UsageCase; 4] = [
        (
            &["--heartbeat", "0"],
            &[],
            "error: --heartbeat 0 is not a number of seconds above 0 and at most 600",
        ),
        (
            &["--nproc-per-node", "2"],
            &[("WORLD_SIZE", "6"), ("SLURM_NNODES", "2"), ("SLURM_NODEID", "0"), ("SLURM_JOB_NODELIST", "a[1-2]")],
            "error: WORLD_SIZE=6 is neither the node count (2, from SLURM_NNODES) nor the process count (2 nodes × 2 per node = 4)",
        ),
        (&["--trainer-bin", "/nonexistent/ddetr"], &[], "error: the trainer binary /nonexistent/ddetr does not exist"),
        (&["--nproc-per-node", "zero"], &[], "error: invalid value 'zero' for '--nproc-per-node <P|auto>'"),
    ];
    for (flags, env, expected) in cases {
        let mut a = Agent::start_env(flags, "true", env);
        let st = a.wait(PATIENCE);
        assert_eq!(st.code(), Some(2), "{flags:?}: {}", a.stderr());
        let err = a.stderr();
        assert!(err.starts_with(expected), "{flags:?}: {err}");
        if !expected.contains("invalid value") {
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }
}

/// The agent must start at once: it links no libtorch (its bin uses only the launcher crate).
#[test]
fn ddetr_launch_does_not_link_libtorch() {
    let out = Command::new("ldd")
        .arg(launch_bin())
        .output()
        .expect("ldd runs");
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{libs}");
    assert!(libs.contains("libc.so"), "{libs}");
    assert!(!libs.contains("torch") && !libs.contains("cuda"), "{libs}");
}

/// `ddetr` is the tch-free front (its bin uses only the launcher crate and, through it,
/// collective-core), so `bench barrier` workers start at once; the full CLI it execs,
/// `ddetr-torch`, is the one that links libtorch.
#[test]
fn ddetr_front_does_not_link_libtorch_but_the_full_cli_does() {
    let ldd = |bin: &Path| {
        let out = Command::new("ldd").arg(bin).output().expect("ldd runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let front = ldd(&common::ddetr_bin());
    assert!(front.contains("libc.so"), "{front}");
    assert!(
        !front.contains("torch") && !front.contains("cuda"),
        "{front}"
    );
    let full = ldd(&common::bin("ddetr-torch"));
    assert!(full.contains("libtorch"), "{full}");
}

#[test]
fn device_cuda_without_a_gpu_is_one_line_and_exit_2() {
    // CUDA_VISIBLE_DEVICES=-1 hides every GPU, so this holds on GPU machines too.
    let out = Command::new(launch_bin())
        .args(["--device", "cuda", "--dry-run"])
        .env_clear()
        .env("CUDA_VISIBLE_DEVICES", "-1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: --device cuda (from --device) but no CUDA GPU is usable here: "),
        "{err}"
    );
    assert!(
        err.trim_end()
            .ends_with("run with --device cpu, or on a machine with a GPU"),
        "{err}"
    );
}
