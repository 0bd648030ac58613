//! Two "nodes" on one machine, two trainers each: `ddetr-launch` agents joined by the QUIC
//! rendezvous. The nodes are two network namespaces joined by a veth pair when this process may
//! make them (root), else two agents on loopback; every test prints which ran. Trainers are
//! `/bin/sh` scripts (fast), except the barrier + all_reduce test, which runs the real `ddetr bench
//! barrier --all-reduce` over the CPU backend's TCP ring. Every test is bounded in time; the
//! guards kill every agent (and with it, by PDEATHSIG, its trainers) and delete the namespaces
//! even when an assertion fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{alive, ddetr_bin, launch_bin, Proc};

/// Upper bound for anything a test waits on.
const PATIENCE: Duration = Duration::from_secs(60);
/// Heartbeat of the agents in these tests (seconds).
const HB: f64 = 0.3;

/// Where the two nodes live.
enum Net {
    /// Two namespaces; node k runs in `names[k]` and node 0 is reachable at 10.77.0.1.
    Namespaces {
        names: [String; 2],
    },
    Loopback,
}

impl Net {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id() % 100_000);
        let names = [format!("ddetr-{tag}a"), format!("ddetr-{tag}b")];
        let (va, vb) = (format!("dv{tag}a"), format!("dv{tag}b"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &names[0]],
            vec!["netns", "add", &names[1]],
            vec!["link", "add", &va, "type", "veth", "peer", "name", &vb],
            vec!["link", "set", &va, "netns", &names[0]],
            vec!["link", "set", &vb, "netns", &names[1]],
            vec!["-n", &names[0], "addr", "add", "10.77.0.1/24", "dev", &va],
            vec!["-n", &names[1], "addr", "add", "10.77.0.2/24", "dev", &vb],
            vec!["-n", &names[0], "link", "set", &va, "up"],
            vec!["-n", &names[1], "link", "set", &vb, "up"],
            vec!["-n", &names[0], "link", "set", "lo", "up"],
            vec!["-n", &names[1], "link", "set", "lo", "up"],
        ];
        let net = Net::Namespaces {
            names: names.clone(),
        };
        for step in steps {
            let out = Command::new("ip").args(&step).output();
            let failed = match &out {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = failed {
                drop(net);
                eprintln!(
                    "two nodes: loopback agents (network namespaces not permitted: `ip {}`: {why})",
                    step.join(" ")
                );
                return Net::Loopback;
            }
        }
        eprintln!(
            "two nodes: network namespaces {} and {} joined by a veth pair (10.77.0.1, 10.77.0.2)",
            names[0], names[1]
        );
        net
    }

    fn master_addr(&self) -> &'static str {
        match self {
            Net::Namespaces { .. } => "10.77.0.1",
            Net::Loopback => "127.0.0.1",
        }
    }

    /// A port for the rendezvous (any port is free in a fresh namespace).
    fn port(&self) -> u16 {
        match self {
            Net::Namespaces { .. } => 29500,
            Net::Loopback => std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port(),
        }
    }

    /// The command that runs `program` on `node`.
    fn command(&self, node: usize, program: &Path) -> Command {
        match self {
            Net::Namespaces { names } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &names[node]]).arg(program);
                c
            }
            Net::Loopback => Command::new(program),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Net::Namespaces { names } = self {
            for n in names.iter() {
                let _ = Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }
}

/// One agent; its output goes to files in the job's temp dir.
struct Agent {
    proc: Proc,
    node: usize,
}

impl Agent {
    /// Waits for the agent to exit (panics with its stderr after `limit`).
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        self.proc.wait(limit)
    }

    fn stderr(&self) -> String {
        self.proc.stderr()
    }

    fn stdout(&self) -> String {
        self.proc.stdout()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.proc.id() as i32, sig) };
    }
}

/// A two-node job: the network, the temp dir, the agents (agents drop before the network).
struct Job {
    agents: Vec<Agent>,
    dir: tempfile::TempDir,
    net: Net,
    port: u16,
}

impl Job {
    fn new() -> Self {
        let net = Net::new();
        let port = net.port();
        Job {
            agents: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            net,
            port,
        }
    }

    /// Starts node `node`'s agent with `flags` (before `--`) and trainer arguments `args`.
    fn start(&mut self, node: usize, flags: &[&str], args: &[&str], env: &[(&str, &str)]) {
        let d = self.dir.path();
        let mut cmd = self.net.command(node, &launch_bin());
        let port = self.port.to_string();
        let rank = node.to_string();
        let hb = HB.to_string();
        let mut defaults: Vec<(&str, &str)> = vec![
            ("--nodes", "2"),
            ("--node-rank", &rank),
            ("--master-addr", self.net.master_addr()),
            ("--master-port", &port),
            ("--nproc-per-node", "2"),
            ("--device", "cpu"),
            ("--heartbeat", &hb),
            ("--grace", "3"),
            ("--rdzv-timeout", "20"),
            ("--trainer-bin", "/bin/sh"),
        ];
        defaults.retain(|(f, _)| !flags.contains(f));
        for (f, v) in defaults {
            cmd.args([f, v]);
        }
        cmd.args(flags)
            .arg("--")
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("D", d)
            .env("DDETR_JOB_TOKEN", "multi-node-test-token")
            .env("OMP_NUM_THREADS", "1")
            .envs(env.iter().copied())
            .current_dir(d);
        self.agents.push(Agent {
            proc: Proc::spawn(&mut cmd, &d.join(format!("agent{node}"))),
            node,
        });
    }

    /// Both agents with the same script.
    fn start_both(&mut self, script: &str) {
        for node in 0..2 {
            self.start(node, &[], &["-c", script], &[]);
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until `name` exists in the job dir (panics after PATIENCE, with the agents' stderr).
    fn wait_file(&self, name: &str) {
        let t = Instant::now();
        while !self.path(name).exists() {
            if t.elapsed() > PATIENCE {
                panic!("{name} never appeared; agent stderr:\n{}", self.stderrs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderrs(&self) -> String {
        self.agents
            .iter()
            .map(|a| format!("--- node {} ---\n{}", a.node, a.stderr()))
            .collect()
    }
}

/// The pid a worker wrote to `path`.
fn read_pid(path: &Path) -> i32 {
    common::read_pid(path, Duration::from_secs(10))
}

#[test]
fn two_nodes_pass_a_barrier_and_all_reduce_over_the_cpu_backend() {
    let ddetr = ddetr_bin();
    let mut job = Job::new();
    let trainer = ddetr.to_str().unwrap().to_string();
    for node in 0..2 {
        job.start(
            node,
            &["--trainer-bin", &trainer],
            &["bench", "barrier", "--all-reduce"],
            // Between "nodes" the CPU backend's TCP ring carries the data.
            &[
                ("DDETR_CPU_TRANSPORT", "tcp"),
                ("DDETR_COLLECTIVE_TIMEOUT_S", "60"),
            ],
        );
    }
    for a in &mut job.agents {
        let st = a.wait(PATIENCE * 2);
        assert!(st.success(), "node {}: {st}\n{}", a.node, a.stderr());
    }
    let out: String = job.agents.iter().map(Agent::stdout).collect();
    for rank in 0..4 {
        assert!(
            out.contains(&format!(
                "[rank {rank}] rank {rank} of 4: barrier passed, all_reduce sum=10 (cpu-tcp)"
            )),
            "{out}\n{}",
            job.stderrs()
        );
    }
}

#[test]
fn kill_9_of_one_trainer_restarts_both_nodes_which_then_complete() {
    let mut job = Job::new();
    // Generation 0 waits to be killed; generation 1 finishes at once.
    let script = "echo $$ > $D/pid_${RANK}_$DDETR_RESTART_COUNT; \
                  if [ $DDETR_RESTART_COUNT = 0 ]; then sleep 60 & wait; fi; echo finished";
    for node in 0..2 {
        job.start(node, &["--max-restarts", "1"], &["-c", script], &[]);
    }
    for r in 0..4 {
        job.wait_file(&format!("pid_{r}_0"));
    }
    let victim = read_pid(&job.path("pid_3_0"));
    // SAFETY: kill(2) on a trainer this test's agent started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    for a in &mut job.agents {
        let st = a.wait(PATIENCE);
        assert!(st.success(), "node {}: {st}\n{}", a.node, a.stderr());
    }
    for r in 0..4 {
        assert!(
            job.path(&format!("pid_{r}_1")).exists(),
            "rank {r} was not restarted\n{}",
            job.stderrs()
        );
        let old = read_pid(&job.path(&format!("pid_{r}_0")));
        assert!(!alive(old), "rank {r}'s first trainer still runs");
    }
}

#[test]
fn restarts_spent_every_node_exits_1_naming_the_first_failure() {
    let mut job = Job::new();
    let script = "if [ $RANK = 2 ]; then echo 'rank two gives up' >&2; exit 7; fi; sleep 60 & wait";
    job.start_both(script);
    for a in &mut job.agents {
        let st = a.wait(PATIENCE);
        assert_eq!(st.code(), Some(1), "node {}\n{}", a.node, a.stderr());
        let err = a.stderr();
        assert!(
            err.contains(
                "error: rank 2 (node 1, local rank 0) exited with code 7 after 0 restart(s) \
                 (--max-restarts 0); last stderr: rank two gives up"
            ),
            "node {}: {err}",
            a.node
        );
    }
}

/// Kills one agent with SIGKILL; the other must notice within 3 heartbeats (plus its own
/// shutdown) and exit 1 with a message that says what happened.
fn kill_one_agent(victim: usize, expect: &str) {
    let mut job = Job::new();
    job.start_both("echo $$ > $D/pid_$RANK; sleep 60 & wait");
    for r in 0..4 {
        job.wait_file(&format!("pid_{r}"));
    }
    let trainers: Vec<i32> = (0..4)
        .map(|r| read_pid(&job.path(&format!("pid_{r}"))))
        .collect();
    job.agents[victim].signal(libc::SIGKILL);
    let killed = Instant::now();
    let survivor = &mut job.agents[1 - victim];
    let st = survivor.wait(PATIENCE);
    let took = killed.elapsed();
    assert_eq!(st.code(), Some(1), "{}", survivor.stderr());
    // 3 heartbeats to notice (+ one to hear it on node 0), and SIGTERM to trainers that exit
    // at once.
    let bound = Duration::from_secs_f64(HB * 5.0 + 1.5);
    assert!(took < bound, "took {took:?} (bound {bound:?})");
    let err = survivor.stderr();
    assert!(err.contains(expect), "{err}");
    // No trainer of either node survives (the victim's die of PDEATHSIG).
    assert!(
        common::all_gone(&trainers, Duration::from_secs(5)),
        "a trainer survived"
    );
}

#[test]
fn killing_node_1s_agent_stops_node_0_within_three_heartbeats() {
    kill_one_agent(1, "missed 3 heartbeats");
}

#[test]
fn killing_node_0s_agent_stops_node_1_within_three_heartbeats() {
    kill_one_agent(0, "no answer from the rendezvous at");
}

#[test]
fn sigterm_to_the_agents_reaches_every_trainer_within_the_grace() {
    let mut job = Job::new();
    job.start_both(
        "trap 'echo term > $D/term_$RANK; exit 0' TERM; echo $$ > $D/pid_$RANK; \
         while :; do sleep 0.05; done",
    );
    for r in 0..4 {
        job.wait_file(&format!("pid_{r}"));
    }
    let t = Instant::now();
    for a in &job.agents {
        a.signal(libc::SIGTERM);
    }
    for a in &mut job.agents {
        let st = a.wait(PATIENCE);
        assert_eq!(st.code(), Some(143), "node {}\n{}", a.node, a.stderr());
    }
    // The grace is 3 s; trainers that trap TERM exit at once.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    for r in 0..4 {
        assert!(
            job.path(&format!("term_{r}")).exists(),
            "rank {r} got no SIGTERM\n{}",
            job.stderrs()
        );
    }
}

#[test]
fn a_wrong_token_and_a_mismatched_spec_are_refused_with_one_line() {
    let mut job = Job::new();
    job.start(0, &["--rdzv-timeout", "3"], &["-c", "true"], &[]);
    job.start(
        1,
        &[],
        &["-c", "true"],
        &[("DDETR_JOB_TOKEN", "not-the-job-token")],
    );
    let st = job.agents[1].wait(PATIENCE);
    assert_eq!(st.code(), Some(2), "{}", job.agents[1].stderr());
    let err = job.agents[1].stderr();
    assert!(
        err.contains("could not prove it holds the job token"),
        "{err}"
    );
    let st = job.agents[0].wait(PATIENCE);
    assert_eq!(st.code(), Some(2), "{}", job.agents[0].stderr());
    assert!(
        job.agents[0].stderr().contains("node(s) 1 did not join"),
        "{}",
        job.agents[0].stderr()
    );

    // Same token, different trainer command on node 1.
    let mut job = Job::new();
    job.start(0, &[], &["-c", "true"], &[]);
    job.start(1, &[], &["-c", "false"], &[]);
    for a in &mut job.agents {
        let st = a.wait(PATIENCE);
        assert_eq!(st.code(), Some(2), "node {}\n{}", a.node, a.stderr());
        let err = a.stderr();
        let line = err
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("{err}"));
        assert!(
            line.contains("node 1 (") && line.contains("): spec_hash is "),
            "{line}"
        );
    }

    // Two agents claiming node rank 1 of three.
    let mut job = Job::new();
    job.start(0, &["--nodes", "3"], &["-c", "true"], &[]);
    job.start(1, &["--nodes", "3"], &["-c", "true"], &[]);
    job.start(1, &["--nodes", "3"], &["-c", "true"], &[]);
    for a in &mut job.agents {
        let st = a.wait(PATIENCE);
        assert_eq!(st.code(), Some(2), "{}", a.stderr());
    }
    let all = job.stderrs();
    assert!(
        all.contains("node rank 1 already joined from") && all.contains("--node-rank"),
        "{all}"
    );
}
