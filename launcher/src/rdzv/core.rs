//! The rendezvous as a pure state machine: no sockets, no clock. The shell hands it each request
//! with an id and the current time, and calls [`Core::tick`] when [`Core::next_deadline`] passes;
//! it answers with the replies that are now due (a request may be answered much later: a join
//! waits for every node, a wait for its keys, a barrier for its count).
//!
//! Supervision lives here too: agents heartbeat, report failures and completion, and read the
//! [`Verdict`] from the heartbeat reply. A failure in the current generation bumps the generation
//! (every agent restarts its trainers) until `max_restarts` are spent, then aborts the job; a
//! node silent for `missed_heartbeats` heartbeats, a rejected join or an agent that leaves aborts
//! it at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::proto::{NodeInfo, Reply, Request, Verdict};

/// Identifies one request for as long as it is unanswered (assigned by the shell).
pub type ReqId = u64;

/// How the job is shaped and timed.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub nodes: u32,
    /// Node 0's own description: every joiner must match it (but for rank and hostname).
    pub reference: NodeInfo,
    pub max_restarts: u32,
    pub heartbeat: Duration,
    /// A node silent for this many heartbeats is lost.
    pub missed_heartbeats: u32,
    /// How long the first join waits for the last node.
    pub join_timeout: Duration,
}

#[derive(Debug)]
struct Node {
    info: NodeInfo,
    last_seen: Instant,
}

#[derive(Debug)]
struct Parked {
    id: ReqId,
    deadline: Instant,
    what: ParkedOn,
}

#[derive(Debug)]
enum ParkedOn {
    Keys(Vec<String>),
    Barrier(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Waiting for every node to join (the join requests are parked).
    Joining,
    Running,
    /// The job is over; agents still collect the verdict.
    Final {
        verdict: Verdict,
        at: Instant,
    },
}

/// The rendezvous server's state.
#[derive(Debug)]
pub struct Core {
    cfg: CoreConfig,
    started: Instant,
    phase: Phase,
    nodes: BTreeMap<u32, Node>,
    joins: Vec<(ReqId, u32)>,
    generation: u64,
    done: BTreeSet<u32>,
    /// Nodes that have seen the final verdict (or left).
    told: BTreeSet<u32>,
    kv: HashMap<String, Vec<u8>>,
    parked: Vec<Parked>,
    barriers: HashMap<String, (u32, Vec<ReqId>)>,
}

impl Core {
    pub fn new(cfg: CoreConfig, now: Instant) -> Self {
        Self {
            cfg,
            started: now,
            phase: Phase::Joining,
            nodes: BTreeMap::new(),
            joins: Vec::new(),
            generation: 0,
            done: BTreeSet::new(),
            told: BTreeSet::new(),
            kv: HashMap::new(),
            parked: Vec::new(),
            barriers: HashMap::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The final verdict, once there is one.
    pub fn verdict(&self) -> Option<&Verdict> {
        match &self.phase {
            Phase::Final { verdict, .. } => Some(verdict),
            _ => None,
        }
    }

    /// True once the job is over and every node has heard so (or has had
    /// `missed_heartbeats` heartbeats to hear it): the server may stop.
    pub fn finished(&self, now: Instant) -> bool {
        match &self.phase {
            Phase::Final { at, .. } => {
                self.told.len() as u32 >= self.cfg.nodes || now >= *at + self.silence()
            }
            _ => false,
        }
    }

    fn silence(&self) -> Duration {
        self.cfg.heartbeat * self.cfg.missed_heartbeats
    }

    /// Handles one request; returns every reply now due (possibly to earlier requests).
    pub fn handle(&mut self, now: Instant, id: ReqId, req: Request) -> Vec<(ReqId, Reply)> {
        let mut out = Vec::new();
        match req {
            Request::Join(info) => self.join(now, id, info, &mut out),
            Request::Set { key, value } => {
                self.kv.insert(key, value);
                out.push((id, Reply::Ok));
                self.wake_waiters(&mut out);
            }
            Request::Get { key } => out.push((id, Reply::Value(self.kv.get(&key).cloned()))),
            Request::Wait { keys, timeout_ms } => {
                if keys.iter().all(|k| self.kv.contains_key(k)) {
                    out.push((id, Reply::Ok));
                } else {
                    self.parked.push(Parked {
                        id,
                        deadline: now + Duration::from_millis(timeout_ms),
                        what: ParkedOn::Keys(keys),
                    });
                }
            }
            Request::Add { key, delta } => {
                let current = match self.kv.get(&key) {
                    None => Some(0),
                    Some(v) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok()),
                };
                match current.and_then(|c| c.checked_add(delta)) {
                    Some(n) => {
                        self.kv.insert(key, n.to_string().into_bytes());
                        out.push((id, Reply::Added(n)));
                        self.wake_waiters(&mut out);
                    }
                    None => out.push((
                        id,
                        Reply::Rejected(format!(
                            "add to key {key}: its value is not a decimal integer, or the sum overflows"
                        )),
                    )),
                }
            }
            Request::CompareSet {
                key,
                expected,
                value,
            } => {
                let current = self.kv.get(&key).cloned();
                if current == expected {
                    self.kv.insert(key, value.clone());
                    out.push((
                        id,
                        Reply::Swapped {
                            swapped: true,
                            current: Some(value),
                        },
                    ));
                    self.wake_waiters(&mut out);
                } else {
                    out.push((
                        id,
                        Reply::Swapped {
                            swapped: false,
                            current,
                        },
                    ));
                }
            }
            Request::Barrier {
                name,
                count,
                timeout_ms,
            } => {
                let entry = self
                    .barriers
                    .entry(name.clone())
                    .or_insert((count, Vec::new()));
                if entry.0 != count {
                    out.push((
                        id,
                        Reply::Rejected(format!(
                            "barrier {name}: this caller counts {count} participants but an earlier one counted {}",
                            entry.0
                        )),
                    ));
                    return out;
                }
                entry.1.push(id);
                if entry.1.len() as u32 >= count {
                    let (_, ids) = self.barriers.remove(&name).expect("entry exists");
                    self.parked.retain(|p| !ids.contains(&p.id));
                    out.extend(ids.into_iter().map(|i| (i, Reply::Ok)));
                } else {
                    self.parked.push(Parked {
                        id,
                        deadline: now + Duration::from_millis(timeout_ms),
                        what: ParkedOn::Barrier(name),
                    });
                }
            }
            Request::Heartbeat { node_rank } => out.push((id, self.heartbeat(now, node_rank))),
            Request::Failed {
                node_rank,
                generation,
                summary,
                report,
            } => {
                self.seen(now, node_rank);
                if self.phase == Phase::Running && generation == self.generation {
                    if generation < u64::from(self.cfg.max_restarts) {
                        self.generation += 1;
                        self.done.clear();
                        tracing::warn!(
                            "{summary} on node {node_rank}: restarting every node's trainers \
                             (restart {} of {})",
                            self.generation,
                            self.cfg.max_restarts
                        );
                    } else {
                        self.finish(now, Verdict::Abort(report));
                    }
                }
                out.push((id, Reply::Ok));
            }
            Request::Done {
                node_rank,
                generation,
            } => {
                self.seen(now, node_rank);
                if self.phase == Phase::Running && generation == self.generation {
                    self.done.insert(node_rank);
                    if self.done.len() as u32 == self.cfg.nodes {
                        self.finish(now, Verdict::Complete);
                    }
                }
                out.push((id, Reply::Ok));
            }
            Request::Leave { node_rank, reason } => {
                if !matches!(self.phase, Phase::Final { .. }) {
                    let host = self.host(node_rank);
                    self.finish(
                        now,
                        Verdict::Abort(format!("node {node_rank} ({host}) stopped: {reason}")),
                    );
                    self.fail_joins(&mut out);
                }
                self.told.insert(node_rank);
                out.push((id, Reply::Ok));
            }
        }
        out
    }

    /// Answers what timed out by `now` and notices silent nodes.
    pub fn tick(&mut self, now: Instant) -> Vec<(ReqId, Reply)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.parked.len() {
            if self.parked[i].deadline <= now {
                let p = self.parked.swap_remove(i);
                let missing = match p.what {
                    ParkedOn::Keys(keys) => {
                        let first = keys.iter().find(|k| !self.kv.contains_key(*k));
                        first.cloned().unwrap_or_default()
                    }
                    ParkedOn::Barrier(name) => {
                        let (count, arrived) = match self.barriers.get_mut(&name) {
                            Some((count, ids)) => {
                                ids.retain(|x| *x != p.id);
                                (*count, ids.len() + 1)
                            }
                            None => (0, 0),
                        };
                        format!("barrier {name} ({arrived} of {count} arrived)")
                    }
                };
                out.push((p.id, Reply::Timeout { missing }));
            } else {
                i += 1;
            }
        }
        match self.phase {
            Phase::Joining if now >= self.started + self.cfg.join_timeout => {
                let missing: Vec<String> = (0..self.cfg.nodes)
                    .filter(|r| !self.nodes.contains_key(r))
                    .map(|r| r.to_string())
                    .collect();
                let msg = format!(
                    "the rendezvous timed out after {:.0} s: node(s) {} did not join; check that \
                     their agents started with the same MASTER_ADDR/MASTER_PORT and job token, \
                     and that UDP to node 0 is open (or raise --rdzv-timeout)",
                    self.cfg.join_timeout.as_secs_f64(),
                    missing.join(", ")
                );
                self.finish(now, Verdict::Abort(msg));
                self.fail_joins(&mut out);
            }
            Phase::Running => {
                let silence = self.silence();
                let lost = self
                    .nodes
                    .iter()
                    .find(|(_, n)| now >= n.last_seen + silence)
                    .map(|(r, n)| (*r, n.info.hostname.clone(), now - n.last_seen));
                if let Some((rank, host, quiet)) = lost {
                    self.finish(
                        now,
                        Verdict::Abort(format!(
                            "node {rank} ({host}) missed {} heartbeats (silent for {:.1} s): its \
                             agent died or cannot reach node 0",
                            self.cfg.missed_heartbeats,
                            quiet.as_secs_f64()
                        )),
                    );
                }
            }
            _ => {}
        }
        out
    }

    /// When [`Core::tick`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let parked = self.parked.iter().map(|p| p.deadline).min();
        let phase = match &self.phase {
            Phase::Joining => Some(self.started + self.cfg.join_timeout),
            Phase::Running => self
                .nodes
                .values()
                .map(|n| n.last_seen + self.silence())
                .min(),
            Phase::Final { at, .. } => Some(*at + self.silence()),
        };
        [parked, phase].into_iter().flatten().min()
    }

    /// Forgets a request whose client went away before its answer.
    pub fn cancel(&mut self, id: ReqId) {
        self.parked.retain(|p| p.id != id);
        for (_, ids) in self.barriers.values_mut() {
            ids.retain(|x| *x != id);
        }
        if let Some(pos) = self.joins.iter().position(|(j, _)| *j == id) {
            let (_, rank) = self.joins.remove(pos);
            if self.phase == Phase::Joining {
                self.nodes.remove(&rank);
            }
        }
    }

    fn wake_waiters(&mut self, out: &mut Vec<(ReqId, Reply)>) {
        let kv = &self.kv;
        self.parked.retain(|p| match &p.what {
            ParkedOn::Keys(keys) if keys.iter().all(|k| kv.contains_key(k)) => {
                out.push((p.id, Reply::Ok));
                false
            }
            _ => true,
        });
    }

    fn host(&self, node_rank: u32) -> String {
        self.nodes
            .get(&node_rank)
            .map_or_else(|| "not joined".into(), |n| n.info.hostname.clone())
    }

    fn seen(&mut self, now: Instant, node_rank: u32) {
        if let Some(n) = self.nodes.get_mut(&node_rank) {
            n.last_seen = now;
        }
    }

    fn finish(&mut self, now: Instant, verdict: Verdict) {
        match &verdict {
            Verdict::Abort(why) => tracing::warn!("job aborted: {why}"),
            _ => tracing::info!("every node completed"),
        }
        self.phase = Phase::Final { verdict, at: now };
    }

    fn fail_joins(&mut self, out: &mut Vec<(ReqId, Reply)>) {
        let why = match &self.phase {
            Phase::Final {
                verdict: Verdict::Abort(why),
                ..
            } => why.clone(),
            _ => "the job is over".into(),
        };
        out.extend(
            self.joins
                .drain(..)
                .map(|(id, _)| (id, Reply::Rejected(why.clone()))),
        );
    }

    fn heartbeat(&mut self, now: Instant, node_rank: u32) -> Reply {
        if !self.nodes.contains_key(&node_rank) {
            return Reply::Rejected(format!(
                "node {node_rank} sent a heartbeat without having joined"
            ));
        }
        self.seen(now, node_rank);
        let verdict = match &self.phase {
            Phase::Final { verdict, .. } => {
                self.told.insert(node_rank);
                verdict.clone()
            }
            _ => Verdict::Run,
        };
        Reply::Status {
            generation: self.generation,
            verdict,
        }
    }

    fn join(&mut self, now: Instant, id: ReqId, info: NodeInfo, out: &mut Vec<(ReqId, Reply)>) {
        if self.phase != Phase::Joining {
            let why = match &self.phase {
                Phase::Final {
                    verdict: Verdict::Abort(why),
                    ..
                } => format!("the job already stopped: {why}"),
                _ => "every node already joined; the job is running".into(),
            };
            out.push((
                id,
                Reply::Rejected(format!(
                    "node {} ({}) cannot join: {why}",
                    info.node_rank, info.hostname
                )),
            ));
            return;
        }
        if let Some(why) = self.mismatch(&info) {
            tracing::warn!("{why}");
            out.push((id, Reply::Rejected(why.clone())));
            self.finish(now, Verdict::Abort(why));
            self.fail_joins(out);
            return;
        }
        let rank = info.node_rank;
        self.nodes.insert(
            rank,
            Node {
                info,
                last_seen: now,
            },
        );
        self.joins.push((id, rank));
        if self.nodes.len() as u32 == self.cfg.nodes {
            self.phase = Phase::Running;
            let nproc = self.cfg.reference.nproc;
            for n in self.nodes.values_mut() {
                n.last_seen = now;
            }
            for (jid, rank) in std::mem::take(&mut self.joins) {
                out.push((
                    jid,
                    Reply::Joined {
                        first_rank: rank * nproc,
                        world_size: self.cfg.nodes * nproc,
                        generation: self.generation,
                        max_restarts: self.cfg.max_restarts,
                    },
                ));
            }
            tracing::info!(nodes = self.cfg.nodes, "every node joined");
        }
    }

    /// Why `info` cannot join, as one line naming the node and the field.
    fn mismatch(&self, info: &NodeInfo) -> Option<String> {
        let who = format!("node {} ({})", info.node_rank, info.hostname);
        if info.node_rank >= self.cfg.nodes {
            return Some(format!(
                "{who}: node rank {} is not below the node count {}: node ranks run 0..={}",
                info.node_rank,
                self.cfg.nodes,
                self.cfg.nodes - 1
            ));
        }
        if let Some(other) = self.nodes.get(&info.node_rank) {
            return Some(format!(
                "{who}: node rank {} already joined from {}: give every agent its own --node-rank",
                info.node_rank, other.info.hostname
            ));
        }
        let r = &self.cfg.reference;
        let fields: [(&str, String, String); 4] = [
            ("nproc", info.nproc.to_string(), r.nproc.to_string()),
            ("devices", info.devices.clone(), r.devices.clone()),
            ("version", info.version.clone(), r.version.clone()),
            ("spec_hash", info.spec_hash.clone(), r.spec_hash.clone()),
        ];
        for (field, theirs, ours) in fields {
            if theirs != ours {
                return Some(format!(
                    "{who}: {field} is {theirs} but node 0 has {ours}: every node must run the \
                     same ddetr-launch version, trainer command and spec, with as many trainers \
                     on the same kind of device"
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_secs(1);

    fn info(rank: u32) -> NodeInfo {
        NodeInfo {
            node_rank: rank,
            hostname: format!("host{rank}"),
            nproc: 2,
            devices: "cpu".into(),
            version: "0.1.0".into(),
            spec_hash: "abc".into(),
        }
    }

    /// A core for `nodes` nodes and a fake clock starting at `t0`.
    fn core(nodes: u32, max_restarts: u32) -> (Core, Instant) {
        let t0 = Instant::now();
        let cfg = CoreConfig {
            nodes,
            reference: info(0),
            max_restarts,
            heartbeat: HB,
            missed_heartbeats: 3,
            join_timeout: Duration::from_secs(60),
        };
        (Core::new(cfg, t0), t0)
    }

    fn secs(t0: Instant, s: f64) -> Instant {
        t0 + Duration::from_secs_f64(s)
    }

    fn joined(c: &mut Core, t: Instant) {
        let n = c.cfg.nodes;
        for r in 0..n {
            let out = c.handle(t, 100 + u64::from(r), Request::Join(info(r)));
            assert_eq!(out.is_empty(), r + 1 < n, "{out:?}");
        }
    }

    fn status(c: &mut Core, t: Instant, node: u32) -> (u64, Verdict) {
        match c.handle(t, 1, Request::Heartbeat { node_rank: node }).pop() {
            Some((
                1,
                Reply::Status {
                    generation,
                    verdict,
                },
            )) => (generation, verdict),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn join_waits_for_every_node_and_assigns_node_major_ranks() {
        let (mut c, t0) = core(3, 0);
        assert!(c.handle(t0, 1, Request::Join(info(2))).is_empty());
        assert!(c.handle(t0, 2, Request::Join(info(0))).is_empty());
        let mut out = c.handle(secs(t0, 5.0), 3, Request::Join(info(1)));
        out.sort_by_key(|(id, _)| *id);
        let ranks: Vec<(u64, u32, u32)> = out
            .iter()
            .map(|(id, r)| match r {
                Reply::Joined {
                    first_rank,
                    world_size,
                    ..
                } => (*id, *first_rank, *world_size),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ranks, [(1, 4, 6), (2, 0, 6), (3, 2, 6)]);
        assert_eq!(status(&mut c, secs(t0, 5.5), 1), (0, Verdict::Run));
    }

    #[test]
    fn duplicate_rank_and_mismatched_fields_are_rejected_naming_node_and_field() {
        let (mut c, t0) = core(2, 0);
        assert!(c.handle(t0, 1, Request::Join(info(0))).is_empty());
        let out = c.handle(t0, 2, Request::Join(info(0)));
        let Reply::Rejected(why) = &out[0].1 else {
            panic!("{out:?}")
        };
        assert_eq!(
            why,
            "node 0 (host0): node rank 0 already joined from host0: give every agent its own --node-rank"
        );
        // The whole rendezvous stops: the waiting join hears it too.
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[1], (1, Reply::Rejected(w)) if w == why));

        for (field, edit) in [
            (
                "spec_hash",
                Box::new(|i: &mut NodeInfo| i.spec_hash = "zzz".into())
                    as Box<dyn Fn(&mut NodeInfo)>,
            ),
            ("nproc", Box::new(|i: &mut NodeInfo| i.nproc = 3)),
            (
                "devices",
                Box::new(|i: &mut NodeInfo| i.devices = "cuda".into()),
            ),
            (
                "version",
                Box::new(|i: &mut NodeInfo| i.version = "0.2.0".into()),
            ),
        ] {
            let (mut c, t0) = core(2, 0);
            let mut i = info(1);
            edit(&mut i);
            let out = c.handle(t0, 1, Request::Join(i));
            let Reply::Rejected(why) = &out[0].1 else {
                panic!("{out:?}")
            };
            assert!(
                why.starts_with(&format!("node 1 (host1): {field} is ")),
                "{why}"
            );
            assert!(matches!(c.verdict(), Some(Verdict::Abort(_))));
        }
        let (mut c, t0) = core(2, 0);
        let out = c.handle(t0, 1, Request::Join(info(2)));
        assert!(
            matches!(&out[0].1, Reply::Rejected(w) if w.contains("node rank 2 is not below the node count 2")),
            "{out:?}"
        );
    }

    #[test]
    fn join_times_out_naming_the_missing_nodes() {
        let (mut c, t0) = core(3, 0);
        assert!(c.handle(t0, 7, Request::Join(info(1))).is_empty());
        assert_eq!(c.next_deadline(), Some(secs(t0, 60.0)));
        assert!(c.tick(secs(t0, 59.9)).is_empty());
        let out = c.tick(secs(t0, 60.0));
        assert!(
            matches!(&out[..], [(7, Reply::Rejected(w))] if w.contains("node(s) 0, 2 did not join")),
            "{out:?}"
        );
        // A late joiner hears why.
        let out = c.handle(secs(t0, 61.0), 8, Request::Join(info(0)));
        assert!(
            matches!(&out[..], [(8, Reply::Rejected(w))] if w.contains("already stopped")),
            "{out:?}"
        );
    }

    #[test]
    fn store_set_get_wait_add_and_compare_set() {
        let (mut c, t0) = core(1, 0);
        assert_eq!(
            c.handle(t0, 1, Request::Get { key: "k".into() }),
            [(1, Reply::Value(None))]
        );
        // A wait parks until its keys are set.
        let wait = Request::Wait {
            keys: vec!["a".into(), "b".into()],
            timeout_ms: 1000,
        };
        assert!(c.handle(t0, 2, wait).is_empty());
        let set = |k: &str| Request::Set {
            key: k.into(),
            value: b"v".to_vec(),
        };
        assert_eq!(c.handle(t0, 3, set("a")), [(3, Reply::Ok)]);
        assert_eq!(c.handle(t0, 4, set("b")), [(4, Reply::Ok), (2, Reply::Ok)]);
        // ...or times out naming the first missing key.
        let wait = Request::Wait {
            keys: vec!["a".into(), "c".into()],
            timeout_ms: 500,
        };
        assert!(c.handle(t0, 5, wait).is_empty());
        assert_eq!(c.next_deadline(), Some(secs(t0, 0.5)));
        assert!(c.tick(secs(t0, 0.4)).is_empty());
        assert_eq!(
            c.tick(secs(t0, 0.5)),
            [(
                5,
                Reply::Timeout {
                    missing: "c".into()
                }
            )]
        );
        let add = |d| Request::Add {
            key: "n".into(),
            delta: d,
        };
        assert_eq!(c.handle(t0, 6, add(5)), [(6, Reply::Added(5))]);
        assert_eq!(c.handle(t0, 7, add(-7)), [(7, Reply::Added(-2))]);
        assert!(matches!(
            c.handle(
                t0,
                8,
                Request::Add {
                    key: "a".into(),
                    delta: 1
                }
            )[0]
            .1,
            Reply::Rejected(_)
        ));
        let cas = |e: Option<&[u8]>, v: &[u8]| Request::CompareSet {
            key: "c".into(),
            expected: e.map(<[u8]>::to_vec),
            value: v.to_vec(),
        };
        assert_eq!(
            c.handle(t0, 9, cas(None, b"1")),
            [(
                9,
                Reply::Swapped {
                    swapped: true,
                    current: Some(b"1".to_vec())
                }
            )]
        );
        assert_eq!(
            c.handle(t0, 10, cas(None, b"2")),
            [(
                10,
                Reply::Swapped {
                    swapped: false,
                    current: Some(b"1".to_vec())
                }
            )]
        );
        assert_eq!(
            c.handle(t0, 11, cas(Some(b"1"), b"3")),
            [(
                11,
                Reply::Swapped {
                    swapped: true,
                    current: Some(b"3".to_vec())
                }
            )]
        );
    }

    #[test]
    fn barrier_releases_at_its_count_and_times_out_alone() {
        let (mut c, t0) = core(1, 0);
        let b = |n: &str| Request::Barrier {
            name: n.into(),
            count: 3,
            timeout_ms: 1000,
        };
        assert!(c.handle(t0, 1, b("x")).is_empty());
        assert!(c.handle(t0, 2, b("x")).is_empty());
        let mut out = c.handle(t0, 3, b("x"));
        out.sort_by_key(|(i, _)| *i);
        assert_eq!(out, [(1, Reply::Ok), (2, Reply::Ok), (3, Reply::Ok)]);
        assert!(c.tick(secs(t0, 2.0)).is_empty());
        assert!(c.handle(t0, 4, b("y")).is_empty());
        let out = c.tick(secs(t0, 1.0));
        assert_eq!(
            out,
            [(
                4,
                Reply::Timeout {
                    missing: "barrier y (1 of 3 arrived)".into()
                }
            )]
        );
        // A disagreeing count is refused.
        assert!(c.handle(t0, 5, b("z")).is_empty());
        let out = c.handle(
            t0,
            6,
            Request::Barrier {
                name: "z".into(),
                count: 2,
                timeout_ms: 9,
            },
        );
        assert!(matches!(&out[..], [(6, Reply::Rejected(_))]), "{out:?}");
        // A cancelled arrival no longer counts.
        c.cancel(5);
        assert!(c.handle(t0, 7, b("z")).is_empty());
        assert!(c.handle(t0, 8, b("z")).is_empty());
    }

    #[test]
    fn a_failure_bumps_the_generation_until_restarts_are_spent() {
        let (mut c, t0) = core(2, 1);
        joined(&mut c, t0);
        let fail = |g| Request::Failed {
            node_rank: 1,
            generation: g,
            summary: "rank 3 was killed by signal 9 (SIGKILL)".into(),
            report: format!(
                "rank 3 (node 1, local rank 1) was killed by signal 9 (SIGKILL) after {g} \
                 restart(s) (--max-restarts 1)"
            ),
        };
        assert_eq!(c.handle(secs(t0, 1.0), 1, fail(0)), [(1, Reply::Ok)]);
        assert_eq!(status(&mut c, secs(t0, 1.1), 0), (1, Verdict::Run));
        // A second report of the same generation (the other node's trainers died of the stop)
        // does not count again.
        c.handle(secs(t0, 1.2), 1, fail(0));
        assert_eq!(status(&mut c, secs(t0, 1.3), 1), (1, Verdict::Run));
        // Completion needs every node in the current generation.
        c.handle(
            secs(t0, 2.0),
            1,
            Request::Done {
                node_rank: 0,
                generation: 0,
            },
        );
        c.handle(
            secs(t0, 2.0),
            1,
            Request::Done {
                node_rank: 0,
                generation: 1,
            },
        );
        assert_eq!(status(&mut c, secs(t0, 2.1), 0), (1, Verdict::Run));
        c.handle(secs(t0, 2.2), 1, fail(1));
        let (g, v) = status(&mut c, secs(t0, 2.3), 0);
        assert_eq!(g, 1);
        assert_eq!(
            v,
            Verdict::Abort(
                "rank 3 (node 1, local rank 1) was killed by signal 9 (SIGKILL) after 1 restart(s) (--max-restarts 1)".into()
            )
        );
        assert!(!c.finished(secs(t0, 2.4)));
        assert!(matches!(
            status(&mut c, secs(t0, 2.5), 1).1,
            Verdict::Abort(_)
        ));
        assert!(c.finished(secs(t0, 2.5)));
    }

    #[test]
    fn every_node_done_completes_the_job() {
        let (mut c, t0) = core(2, 0);
        joined(&mut c, t0);
        c.handle(
            secs(t0, 0.5),
            1,
            Request::Done {
                node_rank: 1,
                generation: 0,
            },
        );
        assert_eq!(status(&mut c, secs(t0, 0.6), 1), (0, Verdict::Run));
        c.handle(
            secs(t0, 0.7),
            1,
            Request::Done {
                node_rank: 0,
                generation: 0,
            },
        );
        assert_eq!(status(&mut c, secs(t0, 0.8), 0), (0, Verdict::Complete));
        assert!(!c.finished(secs(t0, 0.8)));
        // Node 1 never asks again: the server stops after three heartbeats anyway.
        assert!(c.finished(secs(t0, 3.8)));
    }

    #[test]
    fn a_silent_node_aborts_the_job_after_three_heartbeats() {
        let (mut c, t0) = core(2, 5);
        joined(&mut c, t0);
        for i in 1..=3 {
            let t = secs(t0, f64::from(i) * 0.9);
            status(&mut c, t, 0);
            assert!(c.tick(t).is_empty());
            assert!(c.verdict().is_none());
        }
        // Node 1 was last seen at t0; three heartbeats later it is lost, restarts or not.
        assert_eq!(c.next_deadline(), Some(secs(t0, 3.0)));
        c.tick(secs(t0, 3.1));
        let (_, v) = status(&mut c, secs(t0, 3.1), 0);
        let Verdict::Abort(why) = v else {
            panic!("{v:?}")
        };
        assert!(
            why.starts_with("node 1 (host1) missed 3 heartbeats (silent for 3.1 s)"),
            "{why}"
        );
    }

    #[test]
    fn an_agent_that_leaves_stops_the_job() {
        let (mut c, t0) = core(2, 3);
        joined(&mut c, t0);
        c.handle(
            t0,
            1,
            Request::Leave {
                node_rank: 1,
                reason: "SIGTERM".into(),
            },
        );
        assert_eq!(
            status(&mut c, t0, 0).1,
            Verdict::Abort("node 1 (host1) stopped: SIGTERM".into())
        );
        assert!(c.finished(t0));
    }

    #[test]
    fn a_join_whose_client_vanished_frees_its_rank() {
        let (mut c, t0) = core(2, 0);
        assert!(c.handle(t0, 1, Request::Join(info(1))).is_empty());
        c.cancel(1);
        assert!(c.handle(t0, 2, Request::Join(info(1))).is_empty());
        assert_eq!(c.handle(t0, 3, Request::Join(info(0))).len(), 2);
    }
}
