//! `ddetr bench collective`: spawns `--nproc` local ranks of this binary, measures one collective
//! per size with nccl-tests' formulas (ddetr_collective::bench), then runs torch.distributed's
//! gloo all-reduce on the same world and sizes (the peer script, `python gloo_allreduce.py N
//! MiB…`) and prints both. The last line is key=value figures for the largest size.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::exit::UsageError;
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ddetr_collective::bench::{measure, BenchOp, Measurement};
use ddetr_collective::{CommConfig, Communicator, RankInfo, TcpStore, TcpStoreServer, Transport};

/// The peer: torch.distributed (gloo) all-reduce between local processes (a copy of
/// shared/peers/gloo_allreduce.py; `--gloo-script` runs another).
const GLOO_PEER: &str = include_str!("../../../collective/peers/gloo_allreduce.py");
/// Bound on the whole run of the ranks.
const RANKS_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Cpu,
    Nccl,
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
    /// Python with torch for the gloo peer (default: the venv that holds our libtorch).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Peer script to run instead of the built-in copy of gloo_allreduce.py.
    #[arg(long, env = "DDETR_GLOO_PEER")]
    gloo_script: Option<PathBuf>,
    /// Skip the gloo peer.
    #[arg(long)]
    no_peer: bool,
    /// Internal: run as one rank, with the parent's store at this address.
    #[arg(long, hide = true)]
    worker: Option<String>,
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
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{}MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes % (1 << 10) == 0 {
        format!("{}KiB", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

pub fn run(args: CollectiveArgs) -> anyhow::Result<()> {
    if let Some(addr) = &args.worker {
        return worker(&args, addr);
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
    let (backend, ours) = run_ranks(&args)?;
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
    let peer = if args.no_peer {
        Err("skipped (--no-peer)".to_string())
    } else if args.op != BenchOp::AllReduce || args.backend != Backend::Cpu {
        Err(format!(
            "no figure: the gloo peer script measures CPU all_reduce only (this run: {} on {})",
            args.op.name(),
            if args.backend == Backend::Cpu {
                "cpu"
            } else {
                "nccl"
            }
        ))
    } else {
        run_gloo(&args)
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

/// Kills the ranks still running when dropped.
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_ranks(args: &CollectiveArgs) -> anyhow::Result<(String, Vec<Measurement>)> {
    let server = TcpStoreServer::bind("127.0.0.1:0")?;
    let exe = std::env::current_exe().context("cannot find this executable to spawn the ranks")?;
    let sizes: Vec<String> = args.sizes.iter().map(|s| s.to_string()).collect();
    let mut ranks = Ranks(Vec::new());
    for rank in 0..args.nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "collective", "--op", args.op.name(), "--nproc"])
            .arg(args.nproc.to_string())
            .arg("--backend")
            .arg(if args.backend == Backend::Cpu {
                "cpu"
            } else {
                "nccl"
            })
            .arg("--transport")
            .arg(match args.transport {
                Transport::Auto => "auto",
                Transport::Shm => "shm",
                Transport::Tcp => "tcp",
            })
            .arg("--sizes")
            .arg(sizes.join(","))
            .arg("--worker")
            .arg(server.addr().to_string())
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", args.nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .stdout(if rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit());
        ranks.0.push(
            cmd.spawn()
                .with_context(|| format!("cannot spawn rank {rank}"))?,
        );
    }
    let stdout = ranks.0[0].stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let deadline = Instant::now() + RANKS_LIMIT;
    let mut done = vec![false; args.nproc];
    while done.iter().any(|d| !d) {
        for (rank, child) in ranks.0.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("bench rank {rank} failed ({status}); its error is printed above");
                }
                done[rank] = true;
            }
        }
        if Instant::now() > deadline {
            bail!("the bench ranks did not finish within {RANKS_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let lines = reader
        .join()
        .map_err(|_| anyhow::anyhow!("rank 0's output reader panicked"))?;
    let mut backend = String::from("unknown");
    let mut out = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["BACKEND", b] => backend = b.to_string(),
            ["RESULT", bytes, iters, t, alg, bus] => out.push(Measurement {
                bytes: bytes.parse()?,
                iters: iters.parse()?,
                time_s: t.parse()?,
                algbw_gbps: alg.parse()?,
                busbw_gbps: bus.parse()?,
            }),
            _ => {}
        }
    }
    if out.len() != args.sizes.len() {
        bail!(
            "rank 0 reported {} of {} sizes",
            out.len(),
            args.sizes.len()
        );
    }
    Ok((backend, out))
}

fn worker(args: &CollectiveArgs, store_addr: &str) -> anyhow::Result<()> {
    let info = RankInfo::from_env()?;
    let store = TcpStore::connect(store_addr, Duration::from_secs(30))?;
    let mut cfg = CommConfig::from_env()?;
    cfg.transport = args.transport;
    let (comm, device) = match args.backend {
        Backend::Cpu => (Communicator::cpu(&store, info, &cfg)?, tch::Device::Cpu),
        Backend::Nccl => (
            Communicator::nccl(&store, info, &cfg)?,
            tch::Device::Cuda(info.local_rank),
        ),
    };
    if info.rank == 0 {
        println!("BACKEND {}", comm.backend_name());
    }
    for &bytes in &args.sizes {
        let m = measure(&comm, args.op, bytes, device)
            .with_context(|| format!("{} of {}", args.op.name(), human(bytes)))?;
        if info.rank == 0 {
            println!(
                "RESULT {} {} {} {} {}",
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

fn default_python() -> PathBuf {
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
    let python = args.python.clone().unwrap_or_else(default_python);
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
