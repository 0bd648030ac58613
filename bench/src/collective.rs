//! `ddetr bench collective`: runs `--nproc` local ranks of this binary under the launcher's
//! supervisor ([`ddetr_launcher::supervise`]: one process group per rank, the env contract of
//! DESIGN.md with rank 0 hosting the bootstrap store at MASTER_ADDR:MASTER_PORT, stderr tails in
//! a failure, SIGTERM then SIGKILL on the way out), measures one collective per size with
//! nccl-tests' formulas ([`crate::bandwidth`]), then runs torch.distributed's gloo all-reduce on
//! the same world and sizes (the peer script, `python gloo_allreduce.py N MiB…`) and prints both.
//! The last line is key=value figures for the largest size.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ddetr_collective::{Communicator, Transport};
use ddetr_launcher::bootstrap::Bootstrap;
use ddetr_launcher::supervise::{self, Outcome, Sinks, StopFlag, TrainerSpec};
use ddetr_launcher::world::{Host, ThisHost};

use crate::bandwidth::{measure, BenchOp, Measurement};
use crate::peer::PeerArgs;
use crate::UsageError;

/// The peer: torch.distributed (gloo) all-reduce between local processes (a copy of the peers'
/// gloo_allreduce.py; `--gloo-script` runs another).
const GLOO_PEER: &str = include_str!("../peers/gloo_allreduce.py");
/// Bound on the whole run of the ranks.
const RANKS_LIMIT: Duration = Duration::from_secs(900);
/// How long a rank gets between SIGTERM and SIGKILL when the run is cut short.
const RANKS_GRACE: Duration = Duration::from_secs(5);
/// Rank 0's first stdout line names the backend; then one line per size.
const BACKEND_LINE: &str = "BACKEND";
const RESULT_LINE: &str = "RESULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Cpu,
    Nccl,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Nccl => "nccl",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct CollectiveArgs {
    /// cpu (shared memory within this node) or nccl (one GPU per rank).
    #[arg(long, value_enum, default_value = "cpu")]
    backend: Backend,
    /// all_reduce, all_gather or reduce_scatter.
    #[arg(long, default_value = "all_reduce")]
    op: BenchOp,
    /// Sizes of the operation (nccl-tests' S), comma-separated, with K/M/G binary suffixes.
    #[arg(long, default_value = "1M,16M,64M,256M", value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Local processes (ranks) to spawn.
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// CPU transport: auto, shm or tcp (tcp over loopback measures the between-nodes path).
    #[arg(long, default_value = "auto")]
    transport: Transport,
    /// Peer script to run instead of the built-in copy of gloo_allreduce.py.
    #[arg(long, env = "DDETR_GLOO_PEER")]
    gloo_script: Option<PathBuf>,
    // The gloo peer needs only torch: where the peers' venv is unavailable it runs with the
    // python of the venv that holds ddetr's libtorch.
    #[command(flatten)]
    peer: PeerArgs,
    /// Internal: run as one rank of the launcher's env contract.
    #[arg(long, hide = true)]
    worker: bool,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    num.parse::<usize>()
        .map(|n| n << shift)
        .map_err(|_| format!("bad size {s:?}: use bytes or K/M/G, e.g. 64M"))
}

fn human(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

pub fn run(args: &CollectiveArgs) -> anyhow::Result<()> {
    if args.worker {
        return worker(args);
    }
    if args.nproc < 2 {
        return Err(UsageError(format!(
            "--nproc {} measures nothing: use --nproc 2 or more",
            args.nproc
        ))
        .into());
    }
    if args.sizes.is_empty() {
        return Err(UsageError(
            "--sizes is empty: give at least one size, e.g. --sizes 64M".into(),
        )
        .into());
    }
    if args.backend == Backend::Nccl {
        let gpus = tch::Cuda::device_count() as usize;
        if gpus < args.nproc {
            bail!("--backend nccl --nproc {} needs {} CUDA GPUs but {gpus} are visible: use --backend cpu here, or fewer processes", args.nproc, args.nproc);
        }
    }
    let (backend, ours) = run_ranks(args)?;
    println!(
        "ddetr {} nproc={} backend={}",
        args.op.name(),
        args.nproc,
        backend
    );
    for m in &ours {
        println!(
            "  ddetr size={:>7} time={:9.3}ms algbw={:7.2}GB/s busbw={:7.2}GB/s iters={}",
            human(m.bytes),
            m.time_s * 1e3,
            m.algbw_gbps,
            m.busbw_gbps,
            m.iters
        );
    }
    let peer = if args.peer.no_peer {
        Err("skipped (--no-peer)".to_string())
    } else if args.op != BenchOp::AllReduce || args.backend != Backend::Cpu {
        Err(format!(
            "no figure: the gloo peer script measures CPU all_reduce only (this run: {} on {})",
            args.op.name(),
            args.backend.name()
        ))
    } else {
        run_gloo(args)
    };
    match &peer {
        Ok(lines) => {
            for l in lines {
                println!("  {}", l.line);
            }
        }
        Err(e) => println!("  gloo: {e}"),
    }
    let last = ours.last().expect("at least one size");
    let mut kv = format!(
        "op={} backend={} nproc={} size_bytes={} time_ms={:.3} algbw_gbps={:.3} busbw_gbps={:.3}",
        args.op.name(),
        backend,
        args.nproc,
        last.bytes,
        last.time_s * 1e3,
        last.algbw_gbps,
        last.busbw_gbps
    );
    match peer
        .ok()
        .and_then(|lines| lines.into_iter().find(|l| l.mib << 20 == last.bytes))
    {
        Some(g) => kv.push_str(&format!(
            " gloo_time_ms={:.3} gloo_busbw_gbps={:.3} speedup_vs_gloo={:.2}",
            g.time_ms,
            g.busbw_gbps,
            last.busbw_gbps / g.busbw_gbps
        )),
        None => kv.push_str(" gloo_busbw_gbps=na"),
    }
    println!("{kv}");
    Ok(())
}

/// Runs the ranks under the launcher's supervisor and returns the backend and the figures rank 0
/// printed.
fn run_ranks(args: &CollectiveArgs) -> anyhow::Result<(String, Vec<Measurement>)> {
    let exe = std::env::current_exe().context("cannot find this executable to spawn the ranks")?;
    let port = ThisHost
        .free_port()
        .context("cannot find a free port for the ranks' store")?;
    let sizes: Vec<String> = args.sizes.iter().map(|s| s.to_string()).collect();
    let nproc = args.nproc.to_string();
    let spec = TrainerSpec {
        program: exe,
        args: [
            "bench",
            "collective",
            "--op",
            args.op.name(),
            "--nproc",
            nproc.as_str(),
            "--backend",
            args.backend.name(),
            "--transport",
            match args.transport {
                Transport::Auto => "auto",
                Transport::Shm => "shm",
                Transport::Tcp => "tcp",
            },
            "--sizes",
            sizes.join(",").as_str(),
            "--worker",
        ]
        .map(OsString::from)
        .to_vec(),
        // The supervisor adds RANK, LOCAL_RANK and DDETR_RESTART_COUNT. An empty DDETR_RDZV keeps
        // the ranks off a rendezvous this process may have inherited: they meet at rank 0's store.
        env: [
            ("WORLD_SIZE", nproc.clone()),
            ("LOCAL_WORLD_SIZE", nproc.clone()),
            ("NODE_RANK", "0".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
            ("DDETR_RDZV", String::new()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec(),
        node_rank: 0,
        nproc: args.nproc as u32,
        first_rank: 0,
        log_dir: None,
        max_restarts: 0,
        grace: RANKS_GRACE,
    };
    // Rank 0's figures are read back from its stdout; the ranks' stderr goes to ours, prefixed.
    let stdout = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sinks = Sinks {
        out: stdout.clone(),
        err: Arc::new(Mutex::new(std::io::stderr())),
    };
    let stop = StopFlag::default();
    let (finished, wait) = mpsc::channel::<()>();
    let watchdog = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            if wait.recv_timeout(RANKS_LIMIT) == Err(mpsc::RecvTimeoutError::Timeout) {
                stop.request(libc::SIGALRM);
            }
        })
    };
    let outcome = supervise::supervise(&spec, &sinks, &stop);
    drop(finished);
    let _ = watchdog.join();
    match outcome.context("bench collective ranks")? {
        Outcome::Completed => {}
        Outcome::Signalled(_) => bail!("the bench ranks did not finish within {RANKS_LIMIT:?}"),
    }
    let text =
        String::from_utf8_lossy(&stdout.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let (backend, out) = rank0_report(&text)?;
    if out.len() != args.sizes.len() {
        bail!(
            "rank 0 reported {} of {} sizes",
            out.len(),
            args.sizes.len()
        );
    }
    Ok((backend, out))
}

/// The backend and figures in rank 0's lines of the supervisor's stdout (`[rank 0] RESULT …`).
fn rank0_report(text: &str) -> anyhow::Result<(String, Vec<Measurement>)> {
    let mut backend = String::from("unknown");
    let mut out = Vec::new();
    for l in text.lines().filter_map(|l| l.strip_prefix("[rank 0] ")) {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            [BACKEND_LINE, b] => backend = b.to_string(),
            [RESULT_LINE, bytes, iters, t, alg, bus] => out.push(Measurement {
                bytes: bytes.parse()?,
                iters: iters.parse()?,
                time_s: t.parse()?,
                algbw_gbps: alg.parse()?,
                busbw_gbps: bus.parse()?,
            }),
            _ => {}
        }
    }
    Ok((backend, out))
}

/// One rank: joins the world from the launcher's env, builds the communicator, measures every
/// size; rank 0 prints the backend and one line per size.
fn worker(args: &CollectiveArgs) -> anyhow::Result<()> {
    // Kept to the end: rank 0 hosts the store the others bootstrap from.
    let mut boot = Bootstrap::from_env()?;
    boot.cfg.transport = args.transport;
    let info = boot.info;
    let store = boot
        .store
        .as_deref()
        .context("a bench rank runs in a world of at least 2 (WORLD_SIZE)")?;
    let (comm, device) = match args.backend {
        Backend::Cpu => (Communicator::cpu(store, info, &boot.cfg)?, tch::Device::Cpu),
        Backend::Nccl => (
            Communicator::nccl(store, info, &boot.cfg)?,
            tch::Device::Cuda(info.local_rank),
        ),
    };
    if info.rank == 0 {
        println!("{BACKEND_LINE} {}", comm.backend_name());
    }
    for &bytes in &args.sizes {
        let m = measure(&comm, args.op, bytes, device)
            .with_context(|| format!("{} of {}", args.op.name(), human(bytes)))?;
        if info.rank == 0 {
            println!(
                "{RESULT_LINE} {} {} {} {} {}",
                m.bytes, m.iters, m.time_s, m.algbw_gbps, m.busbw_gbps
            );
        }
    }
    Ok(())
}

struct GlooLine {
    line: String,
    mib: usize,
    time_ms: f64,
    busbw_gbps: f64,
}

/// The python of the venv that holds ddetr's libtorch (the gloo peer needs only torch), else
/// `python3`.
fn libtorch_python() -> PathBuf {
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        let p = PathBuf::from(v).join("bin/python");
        if p.exists() {
            return p;
        }
    }
    if let Some(lib) = option_env!("DDETR_LIBTORCH_LIB") {
        // <venv>/lib/pythonX.Y/site-packages/torch/lib → <venv>/bin/python
        let p = PathBuf::from(lib).join("../../../../../bin/python");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("python3")
}

/// Runs the gloo peer; Err says why there is no figure.
fn run_gloo(args: &CollectiveArgs) -> Result<Vec<GlooLine>, String> {
    let mibs: Vec<usize> = args
        .sizes
        .iter()
        .filter(|b| *b % (1 << 20) == 0)
        .map(|b| b >> 20)
        .collect();
    if mibs.is_empty() {
        return Err("the gloo peer takes whole MiB sizes only".into());
    }
    let tmp;
    let script = match &args.gloo_script {
        Some(p) => p.clone(),
        None => {
            tmp = tempfile::Builder::new()
                .suffix(".py")
                .tempfile()
                .map_err(|e| format!("cannot write the peer script: {e}"))?;
            std::fs::write(tmp.path(), GLOO_PEER)
                .map_err(|e| format!("cannot write the peer script: {e}"))?;
            tmp.path().to_path_buf()
        }
    };
    // `--python`, else the peers' venv, else ours.
    let python = args
        .peer
        .find_python(&[])
        .unwrap_or_else(|_| libtorch_python());
    let out = Command::new(&python)
        .arg(&script)
        .arg(args.nproc.to_string())
        .args(mibs.iter().map(|m| m.to_string()))
        .env("OMP_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e} (pass --python)", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "peer failed ({}): {}",
            out.status,
            err.lines().last().unwrap_or("")
        ));
    }
    let mut lines = Vec::new();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        // gloo world=2 size=64MiB time=44.71ms algbw=1.50GB/s busbw=1.50GB/s
        let field = |k: &str| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix(k))
                .map(|v| v.trim_end_matches(|c: char| c.is_alphabetic() || c == '/'))
        };
        if let (Some(size), Some(t), Some(bus)) = (field("size="), field("time="), field("busbw="))
        {
            if let (Ok(mib), Ok(time_ms), Ok(busbw_gbps)) = (size.parse(), t.parse(), bus.parse()) {
                lines.push(GlooLine {
                    line: l.to_string(),
                    mib,
                    time_ms,
                    busbw_gbps,
                });
            }
        }
    }
    if lines.is_empty() {
        return Err("the peer printed no figures".into());
    }
    Ok(lines)
}
