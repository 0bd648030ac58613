//! A real Slurm: `../shared/tools/local-slurm.sh start 2` (beside the clone) (Debian's slurm-wlm, two slurmd
//! "nodes" n1 and n2 on this machine; it installs Slurm the first time) runs
//! `examples/slurm.sbatch` submitted with the real `sbatch`: one ddetr-launch agent per node,
//! joined by the rendezvous, two `ddetr bench barrier --all-reduce` trainers each. The test checks
//! that all four ranks passed, that both nodes ran, and that Slurm recorded a clean exit.
//!
//! It skips (passing, with a message saying why) where it cannot run: not root, the script
//! missing, or Slurm not installable (no network to Debian's mirror). Set DDETR_SLURM_SCRIPT to
//! use another cluster script.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{launch_bin, root};

const PATIENCE: Duration = Duration::from_secs(180);

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The value of `Key=` in `scontrol show job` output.
fn field<'a>(show: &'a str, key: &str) -> Option<&'a str> {
    show.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Cancels the job if the test gives up on it.
struct Cancel(String);

impl Drop for Cancel {
    fn drop(&mut self) {
        let _ = Command::new("scancel").arg(&self.0).output();
    }
}

/// Stops the cluster this test started.
struct StopCluster(String);

impl Drop for StopCluster {
    fn drop(&mut self) {
        let _ = Command::new(&self.0).arg("stop").output();
    }
}

#[test]
fn sbatch_runs_the_example_on_two_nodes_through_the_rendezvous() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("SKIPPED: the local Slurm cluster needs root (local-slurm.sh installs and runs slurmctld/slurmd)");
        return;
    }
    let script = std::env::var("DDETR_SLURM_SCRIPT").unwrap_or_else(|_| {
        root()
            .join("../shared/tools/local-slurm.sh")
            .display()
            .to_string()
    });
    if !Path::new(&script).exists() {
        eprintln!("SKIPPED: {script} does not exist (set DDETR_SLURM_SCRIPT)");
        return;
    }
    // A cluster that already runs is used as it is; one this test starts, it stops again.
    let running = run(Command::new("sinfo").args(["-h", "-o", "%N"]))
        .is_ok_and(|nodes| nodes.trim() == "n[1-2]");
    let _stop = if running {
        eprintln!("Slurm: the local two-node cluster (n1, n2) is already running");
        None
    } else {
        if let Err(e) = run(Command::new(&script).args(["start", "2"])) {
            eprintln!("SKIPPED: Slurm cannot be installed or started here: {e}");
            return;
        }
        eprintln!("Slurm: local two-node cluster (n1, n2) started by {script}");
        Some(StopCluster(script.clone()))
    };

    let launcher = launch_bin();
    let bin_dir = launcher.parent().unwrap();
    let sbatch_file = root().join("examples/slurm.sbatch");
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("job.out");
    let submitted = run(Command::new("sbatch")
        .arg("--parsable")
        // The example asks for 8 GPUs and 64 CPUs per node; this cluster has neither.
        .args(["--gpus-per-node=0", "--cpus-per-task=1", "--time=5"])
        .arg(format!("--chdir={}", dir.path().display()))
        .arg(format!("--output={}", out_file.display()))
        .arg(&sbatch_file)
        .args(["bench", "barrier", "--all-reduce"])
        .env("DDETR_BIN", bin_dir)
        .env("DDETR_NPROC_PER_NODE", "2")
        .env("DDETR_DEVICE", "cpu")
        .env("OMP_NUM_THREADS", "1"))
    .expect("sbatch accepts the example");
    let job = submitted.trim().split(';').next().unwrap().to_string();
    let _cancel = Cancel(job.clone());

    let t = Instant::now();
    let show = loop {
        let show = run(Command::new("scontrol").args(["show", "job", &job])).unwrap_or_default();
        let state = field(&show, "JobState").unwrap_or("UNKNOWN");
        if !matches!(
            state,
            "PENDING" | "CONFIGURING" | "RUNNING" | "COMPLETING" | "UNKNOWN"
        ) {
            break show;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "job {job} still {state} after {PATIENCE:?}; output so far:\n{}",
            std::fs::read_to_string(&out_file).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let out = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert_eq!(field(&show, "JobState"), Some("COMPLETED"), "{show}\n{out}");
    assert_eq!(field(&show, "ExitCode"), Some("0:0"), "{show}\n{out}");
    assert_eq!(field(&show, "NodeList"), Some("n[1-2]"), "{show}");
    for rank in 0..4 {
        assert!(
            out.contains(&format!(
                "[rank {rank}] rank {rank} of 4: barrier passed, all_reduce sum=10"
            )),
            "rank {rank} missing:\n{out}"
        );
    }
    assert!(
        out.contains(&format!("ddetr job {job}: every node finished")),
        "{out}"
    );
    // Both agents logged their node's ranks.
    let logs = dir.path().join(format!("logs/{job}"));
    for rank in 0..4 {
        assert!(
            logs.join(format!("rank_{rank}.log")).exists(),
            "no log for rank {rank} in {}",
            logs.display()
        );
    }
}
