//! What the end-to-end tests of the binaries share: where the binaries and the workspace are, the
//! tiny synthetic set and spec most runs train on, a child process that is stopped on drop (even
//! when a test fails) with its output in files, the one-line-error assertion, and process
//! liveness checks.
//!
//! `DDETR_BIN_DIR` points every test at other binaries than cargo's (installed ones, or a private
//! copy when several worktrees share one target dir).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The workspace root (relative paths such as `configs/…` resolve from it).
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The binary `name` under test (`ddetr`, `ddetr-torch` or `ddetr-launch`).
pub fn bin(name: &str) -> PathBuf {
    if let Ok(d) = std::env::var("DDETR_BIN_DIR") {
        return Path::new(&d).join(name);
    }
    PathBuf::from(match name {
        "ddetr" => env!("CARGO_BIN_EXE_ddetr"),
        "ddetr-torch" => env!("CARGO_BIN_EXE_ddetr-torch"),
        "ddetr-launch" => env!("CARGO_BIN_EXE_ddetr-launch"),
        other => panic!("no binary {other} in this workspace"),
    })
}

pub fn ddetr_bin() -> PathBuf {
    bin("ddetr")
}

pub fn launch_bin() -> PathBuf {
    bin("ddetr-launch")
}

/// `ddetr` with its working directory `dir`, stdin closed, and no rank of an enclosing launch
/// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) leaking in.
pub fn ddetr_in(dir: &Path) -> Command {
    let mut cmd = Command::new(ddetr_bin());
    cmd.current_dir(dir).stdin(Stdio::null());
    for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"] {
        cmd.env_remove(k);
    }
    cmd
}

/// Runs `cmd` to the end and captures its output.
pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not run: {e}"))
}

/// `ddetr args…` in the workspace root without `LD_LIBRARY_PATH`: the binaries find libtorch
/// through their rpath.
pub fn ddetr_at_root(args: &[&str]) -> Output {
    output(ddetr_in(root()).args(args).env_remove("LD_LIBRARY_PATH"))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a run exited with `code` and that its stderr holds exactly one line starting
/// with `error`, an `error: ` line containing `want`.
pub fn assert_one_error_line(status: ExitStatus, stderr: &str, code: i32, want: &str) {
    assert_eq!(status.code(), Some(code), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with("error: ") && errors[0].contains(want),
        "wanted {want:?} in {:?}",
        errors[0]
    );
}

/// The demo spec the tiny runs start from.
pub fn tiny_spec() -> PathBuf {
    root().join("configs/shapes_tiny.yaml")
}

/// Saves a freshly initialised model of the tiny spec (with `num_classes`) as a checkpoint.
pub fn random_checkpoint(dir: &Path, num_classes: u32) -> PathBuf {
    let spec = ddetr_trainer::spec::load(&tiny_spec(), &[], None)
        .unwrap()
        .spec;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _model = ddetr_trainer::model::DeformableDetr::new(
        &vs.root(),
        ddetr_trainer::model::deformable_detr::DetrConfig::from_spec(&spec.model, num_classes)
            .unwrap(),
    );
    let path = dir.join(format!("model_{num_classes}.safetensors"));
    ddetr_trainer::weights::save_safetensors(&vs, &path).unwrap();
    path
}

/// The demo spec at 64×64 with batch 2 and one loader worker (overrides after `-e`).
pub const TINY_64: &[&str] = &[
    "dataset.batch_size=2",
    "dataset.workers=1",
    "dataset.augmentation.scales=[64]",
    "dataset.augmentation.train_random_resize=[56,64]",
    "dataset.augmentation.train_random_crop_min=48",
    "dataset.augmentation.train_random_crop_max=64",
    "dataset.augmentation.random_resize_max_size=64",
    "dataset.augmentation.test_random_resize=64",
];

/// Two epochs, validated after each, on [`tiny_workdir`]'s train and val sets.
pub const TINY_TRAIN: &[&str] = &[
    "train.num_epochs=2",
    "train.validation_interval=1",
    "dataset.train_data_sources=[{image_dir: data/train/images, json_file: data/train/annotations.json}]",
    "dataset.val_data_sources=[{image_dir: data/val/images, json_file: data/val/annotations.json}]",
];

/// Images in [`tiny_workdir`]'s val set.
pub const TINY_VAL_IMAGES: usize = 6;

/// `<task> -e configs/shapes_tiny.yaml -r <results>`, then every list of `overrides` in order.
pub fn tiny_task(task: &str, results: &str, overrides: &[&[&str]]) -> Vec<String> {
    let mut v = vec![
        task.to_string(),
        "-e".into(),
        tiny_spec().display().to_string(),
        "-r".into(),
        results.into(),
    ];
    v.extend(
        overrides
            .iter()
            .flat_map(|o| o.iter().map(|s| s.to_string())),
    );
    v
}

/// A fresh work dir with the tiny synthetic sets: `data/train` (12 images 64×64, seed 1) and
/// `data/val` ([`TINY_VAL_IMAGES`], seed 2).
pub fn tiny_workdir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (split, n, seed) in [("train", 12, "1"), ("val", TINY_VAL_IMAGES, "2")] {
        let out = output(
            ddetr_in(dir.path())
                .args(["dataset", "synth", "--out", &format!("data/{split}")])
                .args([
                    "--images",
                    &n.to_string(),
                    "--size",
                    "64x64",
                    "--seed",
                    seed,
                ]),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    dir
}

/// `ddetr-launch` on this node with `nproc` CPU trainers, up to the `--`.
pub fn one_node_launch(nproc: u32) -> Vec<String> {
    let n = nproc.to_string();
    [
        "--nodes",
        "1",
        "--nproc-per-node",
        &n,
        "--device",
        "cpu",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One test at a time within a test binary, for runs that each use every core.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A child whose stdout and stderr go to files; stopped when dropped, even when a test fails.
pub struct Proc {
    pub child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and its output in `<log>.out` and `<log>.err`.
    pub fn spawn(cmd: &mut Command, log: &Path) -> Self {
        let (out, err) = (log.with_extension("out"), log.with_extension("err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"));
        Self { child, out, err }
    }

    /// `program args…` in `dir`, with `DDETR_LOG=info`, `env`, and no rank of an enclosing
    /// launch; its output in `dir/run<n>.out` and `dir/run<n>.err`, n counting up per test binary.
    pub fn start<I, S>(dir: &Path, program: &Path, args: I, env: &[(&str, &str)]) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(dir).env("DDETR_LOG", "info");
        for k in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"] {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied());
        Self::spawn(&mut cmd, &dir.join(format!("run{n}")))
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for it to exit; panics with its stderr after `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < limit,
                "{} still running after {limit:?}:\n{}",
                self.err.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` (e.g. `-TERM`) to it.
    pub fn signal(&self, sig: &str) {
        signal(sig, self.id() as i32);
    }

    /// SIGTERM (a ddetr process saves, an agent stops its trainers), up to 5 s to exit, then
    /// SIGKILL. Harmless when it has exited, and when called twice.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `program args…` (see [`Proc::start`]) to the end, at most `limit`; returns (status, stderr).
pub fn run<I, S>(
    dir: &Path,
    program: &Path,
    args: I,
    env: &[(&str, &str)],
    limit: Duration,
) -> (ExitStatus, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut p = Proc::start(dir, program, args, env);
    let st = p.wait(limit);
    (st, p.stderr())
}

/// `task` (a `train` command line) under `ddetr-launch` on 2 CPU ranks in `dir`: asserts it
/// succeeds, writes `results/train`'s epoch checkpoint, status and loss plot, and records
/// `backbone` in its `experiment.yaml`; returns that folder.
pub fn train_on_two_ranks(
    dir: &Path,
    task: Vec<String>,
    backbone: &str,
    limit: Duration,
) -> PathBuf {
    let mut launch = one_node_launch(2);
    launch.extend(task);
    let (st, err) = run(dir, &launch_bin(), &launch, &[], limit);
    assert!(st.success(), "{err}");
    let train = dir.join("results/train");
    for f in ["model_epoch_001.safetensors", "status.json", "loss.png"] {
        assert!(train.join(f).is_file(), "{f} missing:\n{err}");
    }
    let experiment = std::fs::read_to_string(train.join("experiment.yaml")).unwrap();
    assert!(
        experiment.contains(&format!("backbone: {backbone}")),
        "{experiment}"
    );
    train
}

/// `kill <sig> <pid>`; panics unless it succeeds.
pub fn signal(sig: &str, pid: i32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Alive and not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Waits up to `limit` for every pid to be gone; true when they all are.
pub fn all_gone(pids: &[i32], limit: Duration) -> bool {
    let t = Instant::now();
    while pids.iter().any(|p| alive(*p)) {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The pid a worker wrote to `path` (the file can exist a moment before its content does);
/// panics after `limit`.
pub fn read_pid(path: &Path, limit: Duration) -> i32 {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Ok(pid) = text.trim().parse() {
            return pid;
        }
        assert!(
            t.elapsed() < limit,
            "{} holds no pid: {text:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
