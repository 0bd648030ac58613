//! Running one node's trainers: spawn, drain, watch, stop, restart.
//!
//! Each trainer is the leader of its own process group (`setpgid(0, 0)` at spawn), so signals sent
//! with `killpg` reach whatever it started (shell wrappers, data-loader workers, a stray
//! `sleep &`). Its stdout and stderr are drained on their own threads into the console with a
//! `[rank N] ` prefix and into `rank_N.log`; the last [`TAIL_LINES`] stderr lines are kept and
//! attached to its failure (ripgrep's `CommandReader` habit).
//!
//! The agent polls the trainers every [`POLL`] and asks a [`Coordinator`] what comes next: the
//! first trainer that exits non-zero stops this node's group, and the coordinator decides whether
//! the job restarts (every node's group starts again with `DDETR_RESTART_COUNT` = the new
//! generation), completes, or fails. [`Alone`] decides for a node on its own (torchrun's gang
//! semantics); `ddetr-launch` uses the rendezvous, which decides for the whole job. A stop request
//! (SIGTERM/SIGINT/SIGHUP to the agent) takes the same shutdown path. Shutdown has one order and
//! is idempotent: SIGTERM to every group that still has members → wait up to the grace →
//! SIGKILL the groups left → reap → drain the logs.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::LaunchError;

/// How often the agent looks at its trainers and at the stop flag.
pub const POLL: Duration = Duration::from_millis(50);
/// Stderr lines kept per rank for its failure report.
pub const TAIL_LINES: usize = 20;
/// Of those, how many the one-line error shows.
const TAIL_IN_MESSAGE: usize = 5;
/// Longest stderr line kept in the tail (longer ones are cut).
const TAIL_LINE_CHARS: usize = 400;
/// How long shutdown waits for the log threads once every process is gone.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// Where the trainers' prefixed lines go (the binary passes stdout and stderr).
#[derive(Clone)]
pub struct Sinks {
    pub out: Arc<Mutex<dyn Write + Send>>,
    pub err: Arc<Mutex<dyn Write + Send>>,
}

impl Sinks {
    /// The agent's own stdout and stderr.
    pub fn stdio() -> Self {
        Self {
            out: Arc::new(Mutex::new(std::io::stdout())),
            err: Arc::new(Mutex::new(std::io::stderr())),
        }
    }
}

/// Set by a signal handler (or by hand in tests): the signal that asked the agent to stop.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    /// Installs handlers for SIGTERM, SIGINT and SIGHUP that set this flag to the signal number.
    pub fn install(&self) -> Result<(), LaunchError> {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            signal_hook::flag::register_usize(sig, Arc::clone(&self.0), sig as usize)
                .map_err(LaunchError::Signals)?;
        }
        Ok(())
    }

    /// Asks the supervisor to stop as if `signal` had arrived.
    pub fn request(&self, signal: i32) {
        self.0.store(signal as usize, Ordering::SeqCst);
    }

    /// The signal that asked for a stop, if any.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }
}

/// Makes the agent the reaper of its trainers' orphans (Linux `PR_SET_CHILD_SUBREAPER`;
/// idempotent, [`supervise`] calls it): a grandchild whose trainer exited is re-parented to the agent instead of init, so shutdown can
/// reap it and see its process group empty even where PID 1 does not reap.
pub fn become_subreaper() {
    // SAFETY: a process attribute of the calling process; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
    if rc != 0 {
        tracing::debug!(
            "PR_SET_CHILD_SUBREAPER: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// What to run on this node.
#[derive(Debug, Clone)]
pub struct TrainerSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Env shared by every rank (WORLD_SIZE, MASTER_ADDR, …); per-rank values are added here.
    pub env: Vec<(String, String)>,
    pub node_rank: u32,
    pub nproc: u32,
    /// Global rank of local rank 0 (node-major).
    pub first_rank: u32,
    pub log_dir: Option<PathBuf>,
    pub max_restarts: u32,
    pub grace: Duration,
}

/// How the supervisor ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every trainer exited 0.
    Completed,
    /// The agent was asked to stop by this signal and shut its trainers down.
    Signalled(i32),
}

/// How a trainer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    fn of(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(c), _) => Exit::Code(c),
            (None, Some(s)) => Exit::Signal(s),
            (None, None) => Exit::Code(-1),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "was killed by signal {s} ({})", signal_name(*s)),
        }
    }
}

pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}

/// The first trainer failure once restarts are spent: who, how, and what it last said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankFailure {
    pub node: u32,
    pub rank: u32,
    pub local_rank: u32,
    pub exit: Exit,
    pub restarts: u32,
    pub max_restarts: u32,
    /// The last stderr lines of the failed rank (oldest first).
    pub tail: Vec<String>,
    pub log: Option<PathBuf>,
}

impl fmt::Display for RankFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} (node {}, local rank {}) {} after {} restart(s) (--max-restarts {})",
            self.rank, self.node, self.local_rank, self.exit, self.restarts, self.max_restarts
        )?;
        let shown = &self.tail[self.tail.len().saturating_sub(TAIL_IN_MESSAGE)..];
        if shown.is_empty() {
            write!(f, "; it wrote nothing to stderr")?;
        } else {
            write!(f, "; last stderr: {}", shown.join(" | "))?;
        }
        if let Some(log) = &self.log {
            write!(f, "; full log: {}", log.display())?;
        }
        Ok(())
    }
}

/// This node's trainers, as the supervisor last saw them.
#[derive(Debug)]
pub enum LocalState {
    Running,
    /// The first failure of this generation (the group is already stopped).
    Failed(RankFailure),
    /// Every trainer exited 0.
    Succeeded,
}

/// What the job does next, as a [`Coordinator`] decides it.
#[derive(Debug)]
pub enum Next {
    Continue,
    /// Stop the trainers and start them again as this generation (= DDETR_RESTART_COUNT).
    Restart(u32),
    /// The job is done: every node's trainers succeeded.
    Complete,
    /// The job failed.
    Abort(LaunchError),
}

/// Decides restarts and the end of the job: [`Alone`] for a node on its own, the rendezvous
/// for a job (see `crate::launch`).
pub trait Coordinator {
    /// Called every [`POLL`] while the trainers of `generation` run (or have ended).
    fn poll(&mut self, generation: u32, local: &LocalState) -> Next;
    /// The agent was told to stop by `signal`; its trainers are being stopped.
    fn leaving(&mut self, _signal: i32) {}
}

/// One node deciding alone: restart after a failure while restarts remain (torchrun's gang
/// semantics), complete when every trainer succeeded.
pub struct Alone {
    pub max_restarts: u32,
}

impl Coordinator for Alone {
    fn poll(&mut self, generation: u32, local: &LocalState) -> Next {
        match local {
            LocalState::Running => Next::Continue,
            LocalState::Succeeded => Next::Complete,
            LocalState::Failed(f) if generation < self.max_restarts => {
                tracing::warn!(
                    "rank {} {}: restarting all trainer(s) (restart {} of {})",
                    f.rank,
                    f.exit,
                    generation + 1,
                    self.max_restarts
                );
                Next::Restart(generation + 1)
            }
            LocalState::Failed(f) => Next::Abort(LaunchError::TrainerFailed(Box::new(f.clone()))),
        }
    }
}

/// Runs the trainers until they all succeed, restarts are spent, or a stop is requested.
///
/// Call it from a thread that lives as long as the trainers (the binary's main thread): each
/// trainer is spawned with `PR_SET_PDEATHSIG = SIGKILL`, which Linux ties to the spawning thread.
pub fn supervise(
    spec: &TrainerSpec,
    sinks: &Sinks,
    stop: &StopFlag,
) -> Result<Outcome, LaunchError> {
    supervise_with(
        spec,
        sinks,
        stop,
        &mut Alone {
            max_restarts: spec.max_restarts,
        },
    )
}

/// [`supervise`] with restarts and the end of the job decided by `coord`.
pub fn supervise_with(
    spec: &TrainerSpec,
    sinks: &Sinks,
    stop: &StopFlag,
    coord: &mut dyn Coordinator,
) -> Result<Outcome, LaunchError> {
    // Without this, a killed grandchild stays a zombie in its group until init reaps it, and
    // shutdown would wait out the grace for it (seen where PID 1 reaps slowly).
    become_subreaper();
    let mut generation = 0;
    loop {
        if let Some(sig) = stop.requested() {
            coord.leaving(sig);
            return Ok(Outcome::Signalled(sig));
        }
        tracing::info!(
            ranks = %format!("{}-{}", spec.first_rank, spec.first_rank + spec.nproc - 1),
            restart = generation,
            "starting trainers"
        );
        let mut group = Group::spawn(spec, generation, sinks)?;
        let mut local = LocalState::Running;
        loop {
            if let Some(sig) = stop.requested() {
                tracing::warn!(
                    "{} received: stopping the trainers (SIGTERM, SIGKILL after {:.1} s)",
                    signal_name(sig),
                    spec.grace.as_secs_f64()
                );
                group.shutdown(spec.grace);
                coord.leaving(sig);
                return Ok(Outcome::Signalled(sig));
            }
            if matches!(local, LocalState::Running) {
                match group.poll()? {
                    Some(Watch::Succeeded) => local = LocalState::Succeeded,
                    Some(Watch::Failed { local: l, exit }) => {
                        // Stop the siblings at once; the coordinator decides what comes next.
                        group.shutdown(spec.grace);
                        local = LocalState::Failed(RankFailure {
                            node: spec.node_rank,
                            rank: spec.first_rank + l,
                            local_rank: l,
                            exit,
                            restarts: generation,
                            max_restarts: spec.max_restarts,
                            tail: group.tail(l),
                            log: spec
                                .log_dir
                                .as_ref()
                                .map(|d| log_path(d, spec.first_rank + l)),
                        });
                    }
                    None => {}
                }
            }
            match coord.poll(generation, &local) {
                Next::Continue => std::thread::sleep(POLL),
                Next::Restart(g) => {
                    if matches!(local, LocalState::Running | LocalState::Succeeded) {
                        tracing::warn!(
                            "the job restarts (a trainer failed elsewhere): stopping this node's \
                             trainers for restart {g}"
                        );
                    }
                    group.shutdown(spec.grace);
                    if let Some(sig) = stop.requested() {
                        coord.leaving(sig);
                        return Ok(Outcome::Signalled(sig));
                    }
                    generation = g;
                    break;
                }
                Next::Complete => {
                    group.shutdown(spec.grace);
                    return Ok(Outcome::Completed);
                }
                Next::Abort(e) => {
                    group.shutdown(spec.grace);
                    return Err(e);
                }
            }
        }
    }
}

/// `<log_dir>/rank_<rank>.log`.
pub fn log_path(dir: &Path, rank: u32) -> PathBuf {
    dir.join(format!("rank_{rank}.log"))
}

enum Watch {
    Succeeded,
    Failed { local: u32, exit: Exit },
}

struct Member {
    local: u32,
    child: Child,
    pgid: libc::pid_t,
    status: Option<ExitStatus>,
    drains: Vec<JoinHandle<()>>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Member {
    /// Reaps the leader if it has exited; then any reparented members of its group that are our
    /// children (when the agent is PID 1 or a subreaper), so they do not linger as zombies.
    fn reap(&mut self) -> std::io::Result<()> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        if self.status.is_some() {
            loop {
                let mut st = 0;
                // SAFETY: waitpid on our own process group id with WNOHANG only reaps exited children.
                let pid = unsafe { libc::waitpid(-self.pgid, &mut st, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Whether any process is still in the trainer's process group.
    fn group_alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the group exists.
        unsafe { libc::killpg(self.pgid, 0) == 0 }
    }

    fn signal_group(&self, sig: i32) {
        // SAFETY: the group is the one this agent created for the trainer.
        let rc = unsafe { libc::killpg(self.pgid, sig) };
        if rc != 0 {
            tracing::debug!(
                pgid = self.pgid,
                sig,
                "killpg: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

struct Group {
    members: Vec<Member>,
    shut_down: bool,
}

impl Group {
    fn spawn(spec: &TrainerSpec, restart: u32, sinks: &Sinks) -> Result<Self, LaunchError> {
        let mut group = Group {
            members: Vec::new(),
            shut_down: false,
        };
        for local in 0..spec.nproc {
            // On an error the group drops here and its Drop shuts down what did start.
            group.members.push(spawn_one(spec, local, restart, sinks)?);
        }
        Ok(group)
    }

    /// Looks at the trainers once: the first failure, success of all, or None while running.
    fn poll(&mut self) -> Result<Option<Watch>, LaunchError> {
        let mut first_failure = None;
        for m in &mut self.members {
            if m.status.is_some() {
                continue;
            }
            m.status = m.child.try_wait().map_err(|source| LaunchError::Wait {
                rank: m.local,
                source,
            })?;
            if let Some(st) = m.status {
                tracing::debug!(local_rank = m.local, "trainer ended: {}", Exit::of(st));
                if !st.success() && first_failure.is_none() {
                    first_failure = Some((m.local, Exit::of(st)));
                }
            }
        }
        if let Some((local, exit)) = first_failure {
            return Ok(Some(Watch::Failed { local, exit }));
        }
        if self.members.iter().all(|m| m.status.is_some()) {
            return Ok(Some(Watch::Succeeded));
        }
        Ok(None)
    }

    /// SIGTERM → grace → SIGKILL for every group that still has members; reap; drain the logs.
    /// A second call does nothing.
    fn shutdown(&mut self, grace: Duration) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        for m in &mut self.members {
            let _ = m.reap();
            if m.group_alive() {
                tracing::debug!(
                    local_rank = m.local,
                    pgid = m.pgid,
                    "SIGTERM to the trainer's group"
                );
                m.signal_group(libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        loop {
            let mut busy = false;
            for m in &mut self.members {
                let _ = m.reap();
                busy |= m.status.is_none() || m.group_alive();
            }
            if !busy || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(POLL / 5);
        }
        for m in &mut self.members {
            if m.status.is_none() || m.group_alive() {
                tracing::warn!(
                    local_rank = m.local,
                    "trainer group still running after the {:.1} s grace: SIGKILL",
                    grace.as_secs_f64()
                );
                m.signal_group(libc::SIGKILL);
            }
        }
        for m in &mut self.members {
            if m.status.is_none() {
                m.status = m.child.wait().ok();
            }
            let _ = m.reap();
        }
        // Log threads end when the last writer of each pipe is gone; one that outlived its group
        // (a daemon that left the group) must not hang the agent.
        let deadline = Instant::now() + DRAIN_WAIT;
        for m in &mut self.members {
            for h in std::mem::take(&mut m.drains) {
                while !h.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if h.is_finished() {
                    let _ = h.join();
                }
            }
        }
    }

    fn tail(&self, local: u32) -> Vec<String> {
        self.members
            .iter()
            .find(|m| m.local == local)
            .map(|m| {
                m.tail
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Only reached without a shutdown on an error path (a later rank failed to spawn).
        self.shutdown(Duration::from_secs(1));
    }
}

fn spawn_one(
    spec: &TrainerSpec,
    local: u32,
    restart: u32,
    sinks: &Sinks,
) -> Result<Member, LaunchError> {
    let rank = spec.first_rank + local;
    let log = match &spec.log_dir {
        Some(dir) => Some(open_log(dir, rank, restart)?),
        None => None,
    };
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", local.to_string())
        .env("DDETR_RESTART_COUNT", restart.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: prctl is async-signal-safe. If the agent dies without a shutdown (SIGKILL), the
    // kernel kills the trainer too instead of leaving it running unsupervised.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        rank,
        program: spec.program.clone(),
        source,
    })?;
    let pgid = child.id() as libc::pid_t;
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let log = log.map(|f| Arc::new(Mutex::new(f)));
    let prefix = format!("[rank {rank}] ");
    let mut drains = Vec::new();
    if let Some(out) = child.stdout.take() {
        drains.push(drain(
            out,
            prefix.clone(),
            Arc::clone(&sinks.out),
            log.clone(),
            None,
        ));
    }
    if let Some(err) = child.stderr.take() {
        drains.push(drain(
            err,
            prefix,
            Arc::clone(&sinks.err),
            log,
            Some(Arc::clone(&tail)),
        ));
    }
    Ok(Member {
        local,
        child,
        pgid,
        status: None,
        drains,
        tail,
    })
}

/// Opens `rank_N.log`: truncated on the first start, appended to (after a marker line) on restarts.
fn open_log(dir: &Path, rank: u32, restart: u32) -> Result<File, LaunchError> {
    let path = log_path(dir, rank);
    let opened = if restart == 0 {
        File::create(&path)
    } else {
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| {
                writeln!(f, "--- ddetr-launch: restart {restart} ---")?;
                Ok(f)
            })
    };
    opened.map_err(|source| LaunchError::LogDir { path, source })
}

/// Copies one pipe line by line to the console (prefixed) and the log; keeps a stderr tail.
/// Write errors are ignored: the pipe must keep draining or the trainer would block.
fn drain(
    pipe: impl Read + Send + 'static,
    prefix: String,
    console: Arc<Mutex<dyn Write + Send>>,
    log: Option<Arc<Mutex<File>>>,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                line.push(b'\n');
            }
            {
                let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
                let _ = c.write_all(prefix.as_bytes());
                let _ = c.write_all(&line);
                let _ = c.flush();
            }
            if let Some(log) = &log {
                let _ = log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write_all(&line);
            }
            if let Some(tail) = &tail {
                let text = String::from_utf8_lossy(&line[..line.len() - 1]);
                let text: String = text.trim_end().chars().take(TAIL_LINE_CHARS).collect();
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(text);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the tests can read back.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    fn sinks() -> (Sinks, Buf, Buf) {
        let (out, err) = (Buf::default(), Buf::default());
        let s = Sinks {
            out: Arc::new(Mutex::new(out.clone())),
            err: Arc::new(Mutex::new(err.clone())),
        };
        (s, out, err)
    }

    fn sh(script: &str, nproc: u32, max_restarts: u32) -> TrainerSpec {
        TrainerSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("WORLD_SIZE".into(), nproc.to_string())],
            node_rank: 0,
            nproc,
            first_rank: 0,
            log_dir: None,
            max_restarts,
            grace: Duration::from_secs(5),
        }
    }

    #[test]
    fn all_ranks_succeed_with_prefixed_lines() {
        let (s, out, err) = sinks();
        let spec = sh(
            "echo out $RANK of $WORLD_SIZE; echo err $LOCAL_RANK >&2",
            2,
            0,
        );
        assert_eq!(
            supervise(&spec, &s, &StopFlag::default()).unwrap(),
            Outcome::Completed
        );
        let (out, err) = (out.text(), err.text());
        assert!(
            out.contains("[rank 0] out 0 of 2\n") && out.contains("[rank 1] out 1 of 2\n"),
            "{out}"
        );
        assert!(
            err.contains("[rank 0] err 0\n") && err.contains("[rank 1] err 1\n"),
            "{err}"
        );
    }

    #[test]
    fn failure_after_restarts_names_rank_code_and_tail() {
        let (s, _, _) = sinks();
        let dir = tempfile::tempdir().unwrap();
        let mut spec = sh(
            "if [ $RANK = 1 ]; then echo first >&2; echo \"try $DDETR_RESTART_COUNT\" >&2; exit 3; fi; sleep 30 & wait",
            2,
            1,
        );
        spec.log_dir = Some(dir.path().to_path_buf());
        let started = Instant::now();
        let e = supervise(&spec, &s, &StopFlag::default()).unwrap_err();
        // Rank 0 dies of the SIGTERM at once; nothing waits out the grace.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        let LaunchError::TrainerFailed(f) = &e else {
            panic!("{e}")
        };
        assert_eq!(
            (f.rank, f.exit, f.restarts, f.max_restarts),
            (1, Exit::Code(3), 1, 1)
        );
        assert_eq!(f.tail, ["first", "try 1"]);
        assert_eq!(
            e.to_string(),
            format!(
                "rank 1 (node 0, local rank 1) exited with code 3 after 1 restart(s) (--max-restarts 1); \
                 last stderr: first | try 1; full log: {}",
                dir.path().join("rank_1.log").display()
            )
        );
        let log = std::fs::read_to_string(dir.path().join("rank_1.log")).unwrap();
        assert_eq!(
            log,
            "first\ntry 0\n--- ddetr-launch: restart 1 ---\nfirst\ntry 1\n"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines_only() {
        let (s, _, _) = sinks();
        let spec = sh(
            "i=0; while [ $i -lt 30 ]; do echo line$i >&2; i=$((i+1)); done; kill -9 $$",
            1,
            0,
        );
        let LaunchError::TrainerFailed(f) = supervise(&spec, &s, &StopFlag::default()).unwrap_err()
        else {
            panic!()
        };
        assert_eq!(f.exit, Exit::Signal(9));
        assert_eq!(f.tail.len(), TAIL_LINES);
        assert_eq!(f.tail[0], "line10");
        assert_eq!(f.tail[TAIL_LINES - 1], "line29");
        assert!(f.to_string().contains("was killed by signal 9 (SIGKILL)"));
        assert!(f
            .to_string()
            .contains("last stderr: line25 | line26 | line27 | line28 | line29"));
    }

    #[test]
    fn stop_request_terminates_the_groups_within_the_grace() {
        let (s, out, _) = sinks();
        let stop = StopFlag::default();
        let spec = sh(
            "trap 'echo got-term; exit 0' TERM; echo ready; sleep 30 & wait",
            2,
            0,
        );
        let stopper = {
            let stop = stop.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                while out.text().matches("ready").count() < 2
                    && t.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                stop.request(libc::SIGTERM);
            })
        };
        let started = Instant::now();
        assert_eq!(
            supervise(&spec, &s, &stop).unwrap(),
            Outcome::Signalled(libc::SIGTERM)
        );
        stopper.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        let out = out.text();
        assert!(
            out.contains("[rank 0] got-term") && out.contains("[rank 1] got-term"),
            "{out}"
        );
    }

    #[test]
    fn a_trainer_ignoring_sigterm_is_killed_after_the_grace() {
        let (s, out, _) = sinks();
        let stop = StopFlag::default();
        let mut spec = sh(
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
            1,
            0,
        );
        spec.grace = Duration::from_millis(300);
        let stopper = {
            let (stop, out) = (stop.clone(), out.clone());
            std::thread::spawn(move || {
                while !out.text().contains("ready") {
                    std::thread::sleep(Duration::from_millis(10));
                }
                stop.request(libc::SIGINT);
            })
        };
        let started = Instant::now();
        assert_eq!(
            supervise(&spec, &s, &stop).unwrap(),
            Outcome::Signalled(libc::SIGINT)
        );
        stopper.join().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let (s, _, _) = sinks();
        let mut spec = sh("true", 2, 0);
        spec.program = "/nonexistent/ddetr".into();
        let e = supervise(&spec, &s, &StopFlag::default()).unwrap_err();
        assert!(matches!(e, LaunchError::Spawn { rank: 0, .. }), "{e}");
        assert!(!e.is_usage());
    }
}
