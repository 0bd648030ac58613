//! From a parsed command line to running trainers: resolve the world, choose the token and the
//! trainer binary; then serve the rendezvous (node 0), join it, and supervise the trainers with
//! the rendezvous deciding restarts and the end of the job ([`crate::supervise`]).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::rdzv::proto::Request;
use crate::rdzv::{Client, CoreConfig, NodeInfo, Server, ServerConfig, Verdict};
use crate::supervise::{self, Coordinator, LocalState, Next, Sinks, StopFlag, TrainerSpec};
use crate::world::{self, Env, Host, World};
use crate::{Args, LaunchError};

pub use crate::supervise::Outcome;

/// Longest grace accepted (an hour): longer is surely a typo.
const MAX_GRACE_S: f64 = 3600.0;
/// Longest rendezvous timeout accepted (a day).
const MAX_RDZV_TIMEOUT_S: f64 = 86400.0;
/// Longest heartbeat accepted.
const MAX_HEARTBEAT_S: f64 = 600.0;
/// A node silent for this many heartbeats is lost.
pub const MISSED_HEARTBEATS: u32 = 3;

/// A launch that is ready to run (or to print with `--dry-run`).
#[derive(Debug)]
pub struct Launch {
    pub world: World,
    pub dry_run: bool,
    trainer: PathBuf,
    command: Vec<OsString>,
    token: String,
    token_source: String,
    log_dir: Option<PathBuf>,
    max_restarts: u32,
    grace: Duration,
    rdzv_timeout: Duration,
    heartbeat: Duration,
    /// Hash of the trainer command and the spec files it names (checked across nodes).
    spec_hash: String,
    /// OMP_NUM_THREADS for the trainers when the environment does not set it.
    omp_threads: Option<u32>,
}

/// Resolves everything a launch needs; nothing is started. Errors are usage errors.
pub fn prepare(args: Args, env: &Env, host: &mut dyn Host) -> Result<Launch, LaunchError> {
    let world = world::resolve(&args, env, host)?;
    if !(0.0..=MAX_GRACE_S).contains(&args.grace) {
        return Err(LaunchError::BadGrace(args.grace));
    }
    let rdzv_timeout = seconds("rdzv-timeout", args.rdzv_timeout, MAX_RDZV_TIMEOUT_S)?;
    let heartbeat = seconds("heartbeat", args.heartbeat, MAX_HEARTBEAT_S)?;
    let (token, token_source) = job_token(&args, env)?;
    let trainer = match &args.trainer_bin {
        Some(p) => p.clone(),
        None => default_trainer(),
    };
    if !args.dry_run {
        if args.command.is_empty() {
            return Err(LaunchError::NoCommand);
        }
        if !trainer.exists() {
            return Err(LaunchError::TrainerNotFound { path: trainer });
        }
        if let Some(dir) = &args.log_dir {
            std::fs::create_dir_all(dir).map_err(|source| LaunchError::LogDir {
                path: dir.clone(),
                source,
            })?;
        }
    }
    let omp_threads = (!env.contains_key("OMP_NUM_THREADS"))
        .then(|| (world.cores as u32 / world.nproc_per_node.value).max(1));
    let spec_hash = spec_hash(&args.command);
    Ok(Launch {
        world,
        dry_run: args.dry_run,
        rdzv_timeout,
        heartbeat,
        spec_hash,
        trainer,
        command: args.command,
        token,
        token_source,
        log_dir: args.log_dir,
        max_restarts: args.max_restarts,
        grace: Duration::from_secs_f64(args.grace),
        omp_threads,
    })
}

impl Launch {
    /// Notices for the user (e.g. the CPU fallback); the binary prints them.
    pub fn notices(&self) -> &[String] {
        &self.world.notices
    }

    /// The `--dry-run` report: the world, then how the trainers would be started.
    pub fn render(&self) -> String {
        let mut s = self.world.render();
        let missing = if self.trainer.exists() {
            ""
        } else {
            " (missing)"
        };
        let _ = writeln!(s, "trainer={}{missing}", self.trainer.display());
        let cmd: Vec<String> = self
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let _ = writeln!(s, "command={}", cmd.join(" "));
        let _ = writeln!(s, "max_restarts={}", self.max_restarts);
        let _ = writeln!(s, "grace_s={}", self.grace.as_secs_f64());
        let _ = writeln!(s, "rdzv_timeout_s={}", self.rdzv_timeout.as_secs_f64());
        let _ = writeln!(s, "heartbeat_s={}", self.heartbeat.as_secs_f64());
        let _ = writeln!(s, "spec_hash={}", self.spec_hash);
        let _ = writeln!(
            s,
            "log_dir={}",
            self.log_dir
                .as_ref()
                .map_or("none".into(), |d| d.display().to_string())
        );
        if let Some(n) = self.omp_threads {
            let _ = writeln!(s, "omp_num_threads={n}");
        }
        // The token itself is a secret: only where it came from.
        let _ = writeln!(s, "source.job_token={}", self.token_source);
        s
    }

    /// The env every trainer of this node gets (RANK, LOCAL_RANK and DDETR_RESTART_COUNT are
    /// added per process).
    pub fn trainer_env(&self) -> Vec<(String, String)> {
        let w = &self.world;
        let mut env = vec![
            ("WORLD_SIZE".to_string(), w.world_size().to_string()),
            (
                "LOCAL_WORLD_SIZE".to_string(),
                w.nproc_per_node.value.to_string(),
            ),
            ("NODE_RANK".to_string(), w.node_rank.value.to_string()),
            ("MASTER_ADDR".to_string(), w.master_addr.value.clone()),
            ("MASTER_PORT".to_string(), w.master_port.value.to_string()),
            ("DDETR_RDZV".to_string(), w.rdzv()),
            ("DDETR_JOB_TOKEN".to_string(), self.token.clone()),
        ];
        if let Some(n) = self.omp_threads {
            env.push(("OMP_NUM_THREADS".to_string(), n.to_string()));
        }
        env
    }

    /// Installs the signal handlers; serves the rendezvous on node 0; joins it; supervises the
    /// trainers until the job completes, fails for good, or the agent is told to stop.
    pub fn run(self, sinks: &Sinks) -> Result<Outcome, LaunchError> {
        let stop = StopFlag::default();
        stop.install()?;
        let w = &self.world;
        let (node, nodes, nproc) = (w.node_rank.value, w.nodes.value, w.nproc_per_node.value);
        let info = NodeInfo {
            node_rank: node,
            hostname: hostname(),
            nproc,
            devices: w.device.value.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            spec_hash: self.spec_hash.clone(),
        };
        let port = w.master_port.value;
        let mut server = if node == 0 {
            let any: IpAddr = if w.master_addr.value.contains(':') {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            Some(Server::start(ServerConfig {
                bind: SocketAddr::new(any, port),
                token: self.token.as_bytes().to_vec(),
                core: CoreConfig {
                    nodes,
                    reference: info.clone(),
                    max_restarts: self.max_restarts,
                    heartbeat: self.heartbeat,
                    missed_heartbeats: MISSED_HEARTBEATS,
                    join_timeout: self.rdzv_timeout,
                },
                max_connections: (nodes * (nproc + 2) + 16) as usize,
            })?)
        } else {
            None
        };
        let addr = crate::rdzv::parse_url(&w.rdzv())
            .expect("World::rdzv is a quic:// url")
            .to_string();
        let Some((client, joined)) = self.join(&addr, info, &stop)? else {
            return Ok(Outcome::Signalled(
                stop.requested().unwrap_or(libc::SIGTERM),
            ));
        };
        tracing::info!(
            node,
            first_rank = joined.first_rank,
            world_size = joined.world_size,
            "joined the rendezvous at {addr}"
        );
        let spec = TrainerSpec {
            env: self.trainer_env(),
            program: self.trainer.clone(),
            args: self.command.clone(),
            node_rank: node,
            nproc,
            first_rank: joined.first_rank,
            log_dir: self.log_dir.clone(),
            max_restarts: joined.max_restarts,
            grace: self.grace,
        };
        let mut coord = RdzvCoordinator {
            client: &client,
            node,
            heartbeat: self.heartbeat,
            last_sent: None,
            last_ok: Instant::now(),
            failed_sent: None,
            done_sent: None,
        };
        let outcome = supervise::supervise_with(&spec, sinks, &stop, &mut coord);
        drop(client);
        if let Some(server) = &mut server {
            // The exit barrier: stay until every node has heard how the job ended (bounded).
            let until = Instant::now() + self.heartbeat * (MISSED_HEARTBEATS + 1);
            while !server.finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            server.shutdown();
        }
        outcome
    }

    /// Connects and joins on a helper thread so a stop signal during the rendezvous is heard.
    /// None when a stop was requested first.
    fn join(
        &self,
        addr: &str,
        info: NodeInfo,
        stop: &StopFlag,
    ) -> Result<Option<(Arc<Client>, crate::rdzv::Joined)>, LaunchError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (addr, token, timeout) = (
            addr.to_string(),
            self.token.as_bytes().to_vec(),
            self.rdzv_timeout,
        );
        std::thread::Builder::new()
            .name("rdzv-join".into())
            .spawn(move || {
                let r = Client::connect(&addr, &token, timeout).and_then(|c| {
                    let j = c.join(info, timeout)?;
                    Ok((Arc::new(c), j))
                });
                let _ = tx.send(r);
            })
            .map_err(LaunchError::Signals)?;
        loop {
            if stop.requested().is_some() {
                return Ok(None);
            }
            match rx.recv_timeout(supervise::POLL) {
                Ok(r) => return r.map(Some).map_err(LaunchError::from),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(LaunchError::JobFailed(
                        "the rendezvous join thread ended without an answer".into(),
                    ))
                }
            }
        }
    }
}

/// Restarts and the end of the job as the rendezvous decides them: reports this node's failure
/// or completion at once, heartbeats every `heartbeat`, and gives up when node 0 has not
/// answered for [`MISSED_HEARTBEATS`] heartbeats.
struct RdzvCoordinator<'a> {
    client: &'a Client,
    node: u32,
    heartbeat: Duration,
    last_sent: Option<Instant>,
    last_ok: Instant,
    failed_sent: Option<u32>,
    done_sent: Option<u32>,
}

impl Coordinator for RdzvCoordinator<'_> {
    fn poll(&mut self, generation: u32, local: &LocalState) -> Next {
        let mut urgent = false;
        let report = match local {
            LocalState::Failed(f) if self.failed_sent != Some(generation) => {
                self.failed_sent = Some(generation);
                Some(Request::Failed {
                    node_rank: self.node,
                    generation: generation.into(),
                    summary: format!("rank {} {}", f.rank, f.exit),
                    report: f.to_string(),
                })
            }
            LocalState::Succeeded if self.done_sent != Some(generation) => {
                self.done_sent = Some(generation);
                Some(Request::Done {
                    node_rank: self.node,
                    generation: generation.into(),
                })
            }
            _ => None,
        };
        if let Some(req) = report {
            urgent = true;
            if let Err(e) = self.client.report(&req, self.heartbeat) {
                tracing::warn!("cannot report to the rendezvous: {e}");
            }
        }
        let now = Instant::now();
        if !urgent && self.last_sent.is_some_and(|t| now - t < self.heartbeat) {
            return Next::Continue;
        }
        self.last_sent = Some(now);
        match self.client.heartbeat(self.node, self.heartbeat) {
            Ok((g, verdict)) => {
                self.last_ok = Instant::now();
                match verdict {
                    Verdict::Run if g > u64::from(generation) => Next::Restart(g as u32),
                    Verdict::Run => Next::Continue,
                    Verdict::Complete => Next::Complete,
                    Verdict::Abort(why) => Next::Abort(LaunchError::JobFailed(why)),
                }
            }
            Err(e) if now.duration_since(self.last_ok) >= self.heartbeat * MISSED_HEARTBEATS => {
                Next::Abort(LaunchError::JobFailed(format!(
                    "node {}: no answer from the rendezvous at {} (node 0's agent) for {} \
                     heartbeats ({e}): node 0's agent died or the network to it is down",
                    self.node,
                    self.client.addr(),
                    MISSED_HEARTBEATS
                )))
            }
            Err(e) => {
                tracing::debug!("heartbeat failed: {e}");
                Next::Continue
            }
        }
    }

    fn leaving(&mut self, signal: i32) {
        let req = Request::Leave {
            node_rank: self.node,
            reason: format!("its agent received {}", supervise::signal_name(signal)),
        };
        if let Err(e) = self
            .client
            .report(&req, self.heartbeat.min(Duration::from_secs(1)))
        {
            tracing::debug!("cannot tell the rendezvous this node leaves: {e}");
        }
    }
}

/// `--<flag>` as a duration in (0, max].
fn seconds(flag: &'static str, value: f64, max: f64) -> Result<Duration, LaunchError> {
    if value > 0.0 && value <= max {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(LaunchError::BadSeconds { flag, value, max })
    }
}

/// Hash of the trainer command and of the spec files it names (YAML/JSON/TOML files that
/// exist): nodes whose commands or specs differ are refused at the rendezvous.
fn spec_hash(command: &[OsString]) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut h = Sha256::new();
    for arg in command {
        h.update(arg.as_bytes());
        h.update([0]);
        let path = std::path::Path::new(arg);
        let is_spec = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json" | "toml"));
        if is_spec {
            if let Ok(bytes) = std::fs::read(path) {
                h.update(&bytes);
            }
        }
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `ddetr` next to the running `ddetr-launch`.
fn default_trainer() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("ddetr")))
        .unwrap_or_else(|| PathBuf::from("ddetr"))
}

/// `--token-file` > DDETR_JOB_TOKEN > 128 random bits as hex.
fn job_token(args: &Args, env: &Env) -> Result<(String, String), LaunchError> {
    if let Some(path) = &args.token_file {
        let text = std::fs::read_to_string(path).map_err(|source| LaunchError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(LaunchError::EmptyToken {
                from: format!("--token-file {}", path.display()),
            });
        }
        return Ok((token.to_string(), "--token-file".into()));
    }
    if let Some(token) = env.get("DDETR_JOB_TOKEN") {
        let token = token.trim();
        if token.is_empty() {
            return Err(LaunchError::EmptyToken {
                from: "DDETR_JOB_TOKEN".into(),
            });
        }
        return Ok((token.to_string(), "DDETR_JOB_TOKEN".into()));
    }
    Ok((random_hex(16), "random".into()))
}

/// `n` random bytes as hex, from /dev/urandom (std's randomly keyed hasher if that is missing).
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(std::process::id() as u64);
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuProbe;
    use clap::Parser;

    struct Cpu;
    impl Host for Cpu {
        fn gpus(&mut self) -> GpuProbe {
            GpuProbe::Unavailable("no driver".into())
        }
        fn cores(&self) -> usize {
            4
        }
        fn free_port(&mut self) -> std::io::Result<u16> {
            Ok(40000)
        }
    }

    fn prep(flags: &[&str], env: &[(&str, &str)]) -> Result<Launch, LaunchError> {
        let mut argv = vec!["ddetr-launch"];
        argv.extend_from_slice(flags);
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        prepare(Args::try_parse_from(argv).unwrap(), &env, &mut Cpu)
    }

    #[test]
    fn trainer_env_follows_the_contract() {
        let l = prep(
            &[
                "--nproc-per-node",
                "2",
                "--trainer-bin",
                "/bin/sh",
                "--",
                "-c",
                "true",
            ],
            &[],
        )
        .unwrap();
        let env: std::collections::BTreeMap<_, _> = l.trainer_env().into_iter().collect();
        assert_eq!(env["WORLD_SIZE"], "2");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["NODE_RANK"], "0");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(env["MASTER_PORT"], "40000");
        assert_eq!(env["DDETR_RDZV"], "quic://127.0.0.1:40000");
        assert_eq!(env["OMP_NUM_THREADS"], "2");
        let token = &env["DDETR_JOB_TOKEN"];
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        // A fresh token each launch.
        let other = prep(&["--trainer-bin", "/bin/sh", "--", "x"], &[]).unwrap();
        assert_ne!(other.token, *token);
    }

    #[test]
    fn omp_threads_and_token_from_the_environment_are_kept() {
        let l = prep(
            &["--trainer-bin", "/bin/sh", "--", "x"],
            &[("OMP_NUM_THREADS", "7"), ("DDETR_JOB_TOKEN", "s3cret")],
        )
        .unwrap();
        let env: std::collections::BTreeMap<_, _> = l.trainer_env().into_iter().collect();
        assert!(!env.contains_key("OMP_NUM_THREADS"));
        assert_eq!(env["DDETR_JOB_TOKEN"], "s3cret");
        assert!(!l.render().contains("s3cret"));
        assert!(l.render().contains("source.job_token=DDETR_JOB_TOKEN\n"));
    }

    #[test]
    fn token_file_beats_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "from-file\n").unwrap();
        let l = prep(
            &[
                "--token-file",
                f.to_str().unwrap(),
                "--trainer-bin",
                "/bin/sh",
                "--",
                "x",
            ],
            &[("DDETR_JOB_TOKEN", "from-env")],
        )
        .unwrap();
        assert_eq!(l.token, "from-file");
        std::fs::write(&f, "  \n").unwrap();
        let e = prep(&["--token-file", f.to_str().unwrap(), "--", "x"], &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the job token from --token-file "),
            "{e}"
        );
        let e = prep(&["--token-file", "/nonexistent/token", "--", "x"], &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot read the job token from /nonexistent/token: "),
            "{e}"
        );
    }

    #[test]
    fn usage_errors_and_the_multi_node_dry_run() {
        // ...but the world can still be printed.
        let l = prep(
            &[
                "--nodes",
                "2",
                "--node-rank",
                "1",
                "--master-addr",
                "m",
                "--dry-run",
            ],
            &[],
        )
        .unwrap();
        assert!(l.render().contains("ranks=4-7\n"), "{}", l.render());
        assert!(l.render().contains("heartbeat_s=2\n"), "{}", l.render());
        let e = prep(&["--trainer-bin", "/bin/sh"], &[]).unwrap_err();
        assert!(matches!(e, LaunchError::NoCommand));
        let e = prep(&["--trainer-bin", "/nonexistent/ddetr", "--", "x"], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the trainer binary /nonexistent/ddetr does not exist: build both binaries \
             (`cargo build --release --bins`) or pass --trainer-bin"
        );
        let e = prep(&["--grace=-1", "--", "x"], &[]).unwrap_err();
        assert!(matches!(e, LaunchError::BadGrace(_)));
        let e = prep(&["--heartbeat", "0", "--", "x"], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--heartbeat 0 is not a number of seconds above 0 and at most 600"
        );
        assert!(e.is_usage());
    }
}

#[cfg(test)]
mod spec_hash_tests {
    use super::*;

    #[test]
    fn spec_hash_covers_the_command_and_the_spec_contents() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("spec.yaml");
        std::fs::write(&spec, "train:\n  num_epochs: 1\n").unwrap();
        let cmd = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        let args = cmd(&["train", "-e", spec.to_str().unwrap()]);
        let h1 = spec_hash(&args);
        assert_eq!(h1.len(), 16);
        assert_eq!(spec_hash(&args), h1);
        assert_ne!(spec_hash(&cmd(&["train", "-e", "other.yaml"])), h1);
        std::fs::write(&spec, "train:\n  num_epochs: 2\n").unwrap();
        assert_ne!(spec_hash(&args), h1);
    }
}
