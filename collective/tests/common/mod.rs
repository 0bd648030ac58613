//! Multi-process test harness: the test binary re-runs itself as the ranks (its ignored `child`
//! test is the entry point, chosen by DDETR_TEST_SCENARIO), with a TCP store served by the parent.
//! Children are killed when a test fails or overruns, and their stderr comes with the failure.

#![allow(dead_code)]

pub mod reference;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ddetr_collective::{CommConfig, Communicator, RankInfo, TcpStore, TcpStoreServer};

pub const SCENARIO: &str = "DDETR_TEST_SCENARIO";

/// One multi-process launch at a time: the machine has few cores, and spinning ranks of two
/// launches would only slow each other down.
static LAUNCHES: Mutex<()> = Mutex::new(());

pub struct Rank {
    pub status: ExitStatus,
    pub stderr: String,
    pub pid: u32,
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `scenario` in `world` child processes; waits at most `limit` for all of them.
pub fn launch(
    test_file: &str,
    scenario: &str,
    world: usize,
    env: &[(&str, String)],
    limit: Duration,
) -> Vec<Rank> {
    let _one = LAUNCHES.lock().unwrap_or_else(|e| e.into_inner());
    let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    for rank in 0..world {
        let err = std::fs::File::create(dir.path().join(format!("rank{rank}.err"))).unwrap();
        let mut cmd = Command::new(&exe);
        cmd.args([
            "child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SCENARIO, scenario)
        .env("DDETR_TEST_FILE", test_file)
        .env("DDETR_TEST_STORE", server.addr().to_string())
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", world.to_string())
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        children.0.push(cmd.spawn().unwrap());
    }
    let deadline = Instant::now() + limit;
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; world];
    while statuses.iter().any(Option::is_none) {
        for (i, c) in children.0.iter_mut().enumerate() {
            if statuses[i].is_none() {
                statuses[i] = c.try_wait().unwrap();
            }
        }
        if Instant::now() > deadline {
            let logs = read_logs(dir.path(), world);
            drop(children);
            panic!("scenario {scenario} (world {world}) overran {limit:?}; stderr:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ranks = (0..world)
        .map(|r| Rank {
            status: statuses[r].unwrap(),
            stderr: std::fs::read_to_string(dir.path().join(format!("rank{r}.err")))
                .unwrap_or_default(),
            pid: children.0[r].id(),
        })
        .collect();
    drop(children);
    ranks
}

fn read_logs(dir: &std::path::Path, world: usize) -> String {
    (0..world)
        .map(|r| {
            format!(
                "--- rank {r}\n{}",
                std::fs::read_to_string(dir.join(format!("rank{r}.err"))).unwrap_or_default()
            )
        })
        .collect()
}

/// Panics with every rank's stderr unless all ranks exited 0.
pub fn assert_all_ok(scenario: &str, ranks: &[Rank]) {
    if ranks.iter().any(|r| !r.status.success()) {
        let logs: String = ranks
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- rank {i} ({})\n{}", r.status, r.stderr))
            .collect();
        panic!("scenario {scenario} failed:\n{logs}");
    }
}

/// [`launch`], then [`assert_all_ok`].
pub fn launch_ok(
    test_file: &str,
    scenario: &str,
    world: usize,
    env: &[(&str, String)],
    limit: Duration,
) {
    assert_all_ok(
        &format!("{scenario} (world {world})"),
        &launch(test_file, scenario, world, env, limit),
    );
}

/// In a child: the scenario the parent asked this rank to run.
pub fn scenario() -> String {
    std::env::var(SCENARIO).expect("only the multi-process tests run this")
}

/// In a child: this rank's communicator, built from the env the parent set.
pub fn child_comm() -> Communicator {
    let info = RankInfo::from_env().unwrap();
    let store = TcpStore::connect(
        std::env::var("DDETR_TEST_STORE").unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    let cfg = CommConfig::from_env().unwrap();
    Communicator::cpu(&store, info, &cfg).unwrap()
}

/// `/dev/shm` entries created by any of `pids`.
pub fn leftover_segments(pids: &[u32]) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| {
                    pids.iter()
                        .any(|p| n.starts_with(&format!("ddetr-coll-{p}-")))
                })
                .collect()
        })
        .unwrap_or_default()
}
