//! From a parsed command line to running trainers: resolve the world, check what this version can
//! run, choose the token and the trainer binary, then hand over to [`crate::supervise`].

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use crate::supervise::{self, Sinks, StopFlag, TrainerSpec};
use crate::world::{self, Env, Host, World};
use crate::{Args, LaunchError};

pub use crate::supervise::Outcome;

/// Longest grace accepted (an hour): longer is surely a typo.
const MAX_GRACE_S: f64 = 3600.0;

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
    /// OMP_NUM_THREADS for the trainers when the environment does not set it.
    omp_threads: Option<u32>,
}

/// Resolves everything a launch needs; nothing is started. Errors are usage errors.
pub fn prepare(args: Args, env: &Env, host: &mut dyn Host) -> Result<Launch, LaunchError> {
    let world = world::resolve(&args, env, host)?;
    if !(0.0..=MAX_GRACE_S).contains(&args.grace) {
        return Err(LaunchError::BadGrace(args.grace));
    }
    let (token, token_source) = job_token(&args, env)?;
    let trainer = match &args.trainer_bin {
        Some(p) => p.clone(),
        None => default_trainer(),
    };
    if !args.dry_run {
        if world.nodes.value > 1 {
            return Err(LaunchError::MultiNode {
                nodes: world.nodes.value,
                nodes_source: world.nodes.source.clone(),
            });
        }
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
    Ok(Launch {
        world,
        dry_run: args.dry_run,
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

    /// Installs the signal handlers and supervises the trainers until they finish, fail for good,
    /// or the agent is told to stop.
    pub fn run(self, sinks: &Sinks) -> Result<Outcome, LaunchError> {
        let stop = StopFlag::default();
        stop.install()?;
        let spec = TrainerSpec {
            env: self.trainer_env(),
            program: self.trainer,
            args: self.command,
            node_rank: self.world.node_rank.value,
            nproc: self.world.nproc_per_node.value,
            first_rank: self.world.global_rank(0),
            log_dir: self.log_dir,
            max_restarts: self.max_restarts,
            grace: self.grace,
        };
        supervise::supervise(&spec, sinks, &stop)
    }
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
        assert_eq!(env["DDETR_RDZV"], "tcp://127.0.0.1:40000");
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
    fn what_this_version_cannot_run_is_a_usage_error() {
        let e = prep(
            &[
                "--nodes",
                "2",
                "--node-rank",
                "0",
                "--master-addr",
                "m",
                "--",
                "x",
            ],
            &[],
        )
        .unwrap_err();
        assert!(e.is_usage());
        assert!(e.to_string().starts_with("this is a 2-node job (nodes from --nodes), but launching several nodes needs the rendezvous"), "{e}");
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
    }
}
