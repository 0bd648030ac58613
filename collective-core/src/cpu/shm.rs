//! The shared-memory transport: every rank of one node maps one segment under /dev/shm.
//!
//! Layout: a header (abort flag, per-rank control lines: a sequence counter, a sleeper count, the
//! pid and the descriptor of the current call), then two slots per rank (double buffering), each
//! `world × chunk` bytes. A collective runs in rounds sized to stay in the shared L3 cache; in
//! each round a rank copies the pieces its peers need into its own slot, signals its counter,
//! waits for the peers' counters, and reads theirs. All-reduce is a reduce-scatter (each rank
//! reduces one piece of the round, reading every other rank's copy of it) followed by an
//! all-gather (every rank copies the reduced pieces out), and copies the next round in while the
//! peers finish the current one.
//!
//! Waiting spins briefly, then sleeps on the counter with a futex (the segment is shared, so the
//! futex is too) in short slices; every slice checks the deadline, the abort flag and whether the
//! awaited rank's process still exists, so a dead peer is reported by rank within ~50 ms and a
//! stuck one when the timeout expires.
//!
//! Cleanup: rank 0 creates the file, every rank maps it, and rank 0 unlinks it as soon as all
//! ranks are attached, so the kernel frees it when the last process exits however they exit.
//! Names carry the creator's pid; a creator that died before unlinking leaves a file that the
//! next creator on the node removes.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::cpu::reduce::reduce;
use crate::cpu::{describe, CallDesc, Transport};
use crate::store::Store;
use crate::{CollectiveError, DType, ReduceOp, Result};

const MAGIC: u64 = 0x6464_6574_7273_686d; // "ddetrshm"
const SHM_DIR: &str = "/dev/shm";
const NAME_PREFIX: &str = "ddetr-coll-";
const CTRL_BASE: usize = 256;
const CTRL_STRIDE: usize = 256;
/// Spin iterations before yielding when every rank has a core (DDETR_SHM_SPIN overrides): about
/// 100 µs, longer than a round's work, short enough not to starve a descheduled peer for long.
const DEFAULT_SPIN: u32 = 4_000;
/// Largest world that all-reduces with the direct scheme by default (DDETR_SHM_ALLREDUCE=direct
/// or split overrides).
const DIRECT_MAX_WORLD: usize = 4;
/// How long one futex sleep lasts before the waiter re-checks liveness, abort and deadline.
const SLICE: Duration = Duration::from_millis(50);

// Offsets inside the global header.
const OFF_MAGIC: usize = 0;
const OFF_ABORT: usize = 64; // rank+1 of the rank that aborted, 0 while healthy
const OFF_FAILED: usize = 128; // rank+1 of the rank whose failure caused the abort, 0 if none known
                               // Offsets inside one rank's control block (separate cache lines: written by different ranks).
const OFF_COUNTER: usize = 0;
const OFF_SLEEPERS: usize = 64;
const OFF_PID: usize = 128;
const OFF_DESC: usize = 136; // two u64: descriptors of calls with even and odd sequence numbers
const OFF_COPIED: usize = 192; // direct all-reduce: rounds this rank has copied into its slots
const OFF_DONE: usize = 200; // direct all-reduce: rounds this rank has finished reading
const OFF_ADDR: usize = 208; // cross-memory all-reduce: this rank's buffer address for the call
const OFF_BASE: usize = 216; // this rank's address of the segment (the cross-memory probe reads it)
/// Buffers at least this large all-reduce by cross-memory reads when the kernel allows them.
const CMA_MIN_BYTES: usize = 1 << 20;
/// Bytes read from each peer per step of the cross-memory all-reduce: the peers' pieces stay in
/// L2 while they are added.
const CMA_STEP_BYTES: usize = 256 << 10;
/// Slots the direct all-reduce keeps in flight per rank: a rank runs up to this many rounds ahead
/// of the slowest peer, so ranks that the scheduler runs in turns progress in bursts rather than
/// in lockstep.
const DEPTH: usize = 4;
/// Slot buffers per rank: two for the double-buffered operations, DEPTH for the direct
/// all-reduce (separate, so the two schemes never share a slot).
const BUFFERS: usize = 2 + DEPTH;

pub(crate) struct ShmTransport {
    rank: usize,
    world: usize,
    map: memmap2::MmapRaw,
    data: usize,
    chunk: usize,
    timeout: Duration,
    /// Value this rank's counter had at its last signal.
    seq: AtomicU32,
    /// Rounds run so far: picks the slot of the double buffer.
    rounds: AtomicU64,
    /// Calls made so far: picks the descriptor slot.
    calls: AtomicU64,
    spin: u32,
    yields: u32,
    aborted: AtomicBool,
    /// Rank 0 only: the segment's path while it is still linked.
    path: std::sync::Mutex<Option<PathBuf>>,
    pids: std::sync::Mutex<Vec<u32>>,
    busy: AtomicUsize,
    /// All-reduce by [`ShmTransport::all_reduce_direct`] (small worlds) or by split rounds.
    direct: bool,
    /// Rounds the direct all-reduce has run (the value of this rank's COPIED/DONE counters).
    direct_rounds: AtomicU32,
    /// Every rank may read every other's memory (process_vm_readv): large all-reduces read the
    /// peers' buffers in place instead of staging them through the segment.
    cma: bool,
}

// SAFETY: the mapping is shared memory accessed through atomics (control) or by the protocol's
// ownership rules (data slots); the struct's own state is atomics and mutexes.
unsafe impl Send for ShmTransport {}
unsafe impl Sync for ShmTransport {}

fn shm_err(path: &Path, e: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Shm {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return true;
    }
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // A killed child stays a zombie until its parent reaps it: treat that as dead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => rc == 0,
    }
}

/// Removes segments whose creator died before unlinking them.
fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir(SHM_DIR) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(NAME_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            tracing::info!(path = %entry.path().display(), "removing a stale collective segment");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a shared (non-private) futex wait on a live, aligned u32 with a relative timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: waking waiters of a live, aligned u32.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// `value` has reached `target` in wrapping u32 order.
fn reached(value: u32, target: u32) -> bool {
    (value.wrapping_sub(target) as i32) >= 0
}

fn segment_bytes(world: usize, chunk: usize) -> (usize, usize) {
    let data = (CTRL_BASE + world * CTRL_STRIDE).next_multiple_of(4096);
    (data, data + BUFFERS * world * world * chunk)
}

impl ShmTransport {
    /// Creates (rank 0) or attaches (others) the node's segment. `key` is the store prefix.
    pub(crate) fn new(
        store: &dyn Store,
        key: &str,
        rank: usize,
        world: usize,
        chunk: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let chunk = chunk.max(64).next_multiple_of(64);
        let (data, total) = segment_bytes(world, chunk);
        let name_key = format!("{key}/shm/name");
        let (map, path) = if rank == 0 {
            sweep_stale();
            let nonce = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path =
                PathBuf::from(SHM_DIR).join(format!("{NAME_PREFIX}{}-{nonce}", std::process::id()));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| shm_err(&path, e))?;
            file.set_len(total as u64).map_err(|e| shm_err(&path, e))?;
            let map = memmap2::MmapRaw::map_raw(&file).map_err(|e| shm_err(&path, e))?;
            // A fresh file is zero: counters, sleepers and flags start at 0. Magic goes last.
            // SAFETY: in bounds, aligned; nobody else has the name yet.
            unsafe {
                (*(map.as_mut_ptr().add(OFF_MAGIC) as *const AtomicU64))
                    .store(MAGIC ^ world as u64, Ordering::Release)
            };
            store.set(&name_key, path.to_string_lossy().as_bytes())?;
            (map, Some(path))
        } else {
            let path = PathBuf::from(
                String::from_utf8_lossy(&store.get_wait(&name_key, timeout)?).into_owned(),
            );
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).map_err(|e| {
                shm_err(&path, format!("{e} (is every rank of this communicator on the same node, sharing /dev/shm?)"))
            })?;
            let len = file.metadata().map_err(|e| shm_err(&path, e))?.len() as usize;
            if len != total {
                return Err(shm_err(&path, format!("segment is {len} bytes, expected {total}: ranks disagree on world size or chunk size")));
            }
            let map = memmap2::MmapRaw::map_raw(&file).map_err(|e| shm_err(&path, e))?;
            // SAFETY: in bounds and aligned.
            let magic = unsafe {
                (*(map.as_mut_ptr().add(OFF_MAGIC) as *const AtomicU64)).load(Ordering::Acquire)
            };
            if magic != MAGIC ^ world as u64 {
                return Err(shm_err(
                    &path,
                    "not a ddetr collective segment of this world size",
                ));
            }
            (map, None)
        };
        let t = Self {
            rank,
            world,
            map,
            data,
            chunk,
            timeout,
            seq: AtomicU32::new(0),
            rounds: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            spin: std::env::var("DDETR_SHM_SPIN")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(
                    if world
                        <= std::thread::available_parallelism()
                            .map(|n| n.get())
                            .unwrap_or(1)
                    {
                        DEFAULT_SPIN
                    } else {
                        200
                    },
                ),
            yields: 8,
            direct_rounds: AtomicU32::new(0),
            direct: match std::env::var("DDETR_SHM_ALLREDUCE").as_deref() {
                Ok("direct") => true,
                Ok("split") => false,
                _ => world <= DIRECT_MAX_WORLD,
            },
            cma: false,
            aborted: AtomicBool::new(false),
            path: std::sync::Mutex::new(path),
            pids: std::sync::Mutex::new(vec![0; world]),
            busy: AtomicUsize::new(0),
        };
        t.ctrl_u32(rank, OFF_PID)
            .store(std::process::id(), Ordering::SeqCst);
        t.ctrl_u64(rank, OFF_BASE)
            .store(t.base() as u64, Ordering::SeqCst);
        store.set(
            &format!("{key}/shm/attached/{rank}"),
            &std::process::id().to_le_bytes(),
        )?;
        let keys: Vec<String> = (0..world)
            .map(|r| format!("{key}/shm/attached/{r}"))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        store.wait(&refs, timeout)?;
        {
            let mut pids = t.pids.lock().expect("pids");
            for r in 0..world {
                pids[r] = t.ctrl_u32(r, OFF_PID).load(Ordering::SeqCst);
            }
        }
        t.unlink();
        // Cross-memory reads, when asked for (DDETR_SHM_ALLREDUCE=cma): each rank reads its right
        // neighbour's magic word through the neighbour's own mapping; all must succeed (ptrace
        // rules, seccomp and old kernels can refuse), else every rank keeps the staged schemes.
        // Not the default: on the 2-core reference machine the direct scheme is faster (64 MiB,
        // 2 ranks: 13.4-14.4 ms against 15.8-16.2 ms; process_vm_readv pins every page it reads).
        let mut t = t;
        let wanted = std::env::var("DDETR_SHM_ALLREDUCE").ok();
        let probe =
            world > 1 && wanted.as_deref() == Some("cma") && t.cma_probe((rank + 1) % world);
        store.set(&format!("{key}/shm/cma/{rank}"), &[u8::from(probe)])?;
        let keys: Vec<String> = (0..world).map(|r| format!("{key}/shm/cma/{r}")).collect();
        let mut all = world > 1;
        for k in &keys {
            all &= store.get_wait(k, timeout)? == [1];
        }
        t.cma = all;
        tracing::debug!(
            rank,
            world,
            chunk,
            cma = t.cma,
            "shared-memory transport ready"
        );
        Ok(t)
    }

    fn unlink(&self) {
        if let Some(path) = self.path.lock().expect("path").take() {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot unlink the collective segment");
            }
        }
    }

    fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    fn global_u32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: header offsets are in bounds and 4-aligned; the mapping outlives &self.
        unsafe { &*(self.base().add(off) as *const AtomicU32) }
    }

    fn ctrl_u32(&self, rank: usize, off: usize) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*(self.base().add(CTRL_BASE + rank * CTRL_STRIDE + off) as *const AtomicU32) }
    }

    fn ctrl_u64(&self, rank: usize, off: usize) -> &AtomicU64 {
        // SAFETY: as above; `off` is 8-aligned.
        unsafe { &*(self.base().add(CTRL_BASE + rank * CTRL_STRIDE + off) as *const AtomicU64) }
    }

    /// Whether this process may read `peer`'s memory: reads the segment's magic word through
    /// the peer's own mapping.
    fn cma_probe(&self, peer: usize) -> bool {
        let pid = self.pids.lock().expect("pids")[peer];
        let base = self.ctrl_u64(peer, OFF_BASE).load(Ordering::SeqCst) as usize;
        let mut word = 0u64;
        let ok = cma_read(
            pid,
            base + OFF_MAGIC,
            (&mut word as *mut u64).cast(),
            std::mem::size_of::<u64>(),
        )
        .is_ok();
        ok && word == MAGIC ^ self.world as u64
    }

    fn ctrl_desc(&self, rank: usize, parity: usize) -> &AtomicU64 {
        // SAFETY: as above, 8-aligned.
        unsafe {
            &*(self
                .base()
                .add(CTRL_BASE + rank * CTRL_STRIDE + OFF_DESC + 8 * parity)
                as *const AtomicU64)
        }
    }

    /// Start of `rank`'s slot `buf` (0 or 1).
    fn slot(&self, rank: usize, buf: usize) -> *mut u8 {
        // SAFETY: in bounds by construction of the segment size.
        unsafe {
            self.base()
                .add(self.data + (rank * BUFFERS + buf) * self.world * self.chunk)
        }
    }

    fn slot_bytes(&self) -> usize {
        self.world * self.chunk
    }

    fn next_buf(&self) -> usize {
        (self.rounds.fetch_add(1, Ordering::Relaxed) % 2) as usize
    }

    /// Starts a call: refuses after an abort, publishes the call's descriptor for the mismatch
    /// check and returns its parity.
    /// Calls that move no bytes (except barriers) do not synchronise and publish nothing.
    fn begin(&self, desc: CallDesc) -> Result<usize> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CollectiveError::AbortedLocally);
        }
        if desc.bytes() == 0 && desc.code() != 5 {
            return Ok(0);
        }
        let parity = (self.calls.fetch_add(1, Ordering::Relaxed) % 2) as usize;
        self.ctrl_desc(self.rank, parity)
            .store(desc.0, Ordering::SeqCst);
        Ok(parity)
    }

    /// After the first wait of a call every peer has published its descriptor for it.
    fn check_desc(&self, op: &'static str, desc: CallDesc, parity: usize) -> Result<()> {
        for peer in 0..self.world {
            let theirs = self.ctrl_desc(peer, parity).load(Ordering::SeqCst);
            if theirs != desc.0 {
                return Err(self.fail(CollectiveError::Mismatch {
                    op,
                    rank: self.rank,
                    peer,
                    call: describe(desc),
                    peer_call: describe(CallDesc(theirs)),
                }));
            }
        }
        Ok(())
    }

    fn signal(&self) -> u32 {
        let v = self.seq.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let counter = self.ctrl_u32(self.rank, OFF_COUNTER);
        counter.store(v, Ordering::SeqCst);
        if self
            .ctrl_u32(self.rank, OFF_SLEEPERS)
            .load(Ordering::SeqCst)
            > 0
        {
            futex_wake(counter);
        }
        v
    }

    /// The error an abort flag set by another rank means for this call.
    fn abort_error(&self, op: &'static str) -> Option<CollectiveError> {
        let by = self.global_u32(OFF_ABORT).load(Ordering::SeqCst);
        if by == 0 {
            return None;
        }
        let failed = self.global_u32(OFF_FAILED).load(Ordering::SeqCst);
        if failed != 0 && failed as usize - 1 != self.rank {
            let rank = failed as usize - 1;
            let pid = self.pids.lock().expect("pids")[rank];
            if !pid_alive(pid) {
                return Some(CollectiveError::PeerDied { op, rank, pid });
            }
            return Some(CollectiveError::Timeout {
                op,
                ranks: vec![rank],
                timeout: self.timeout,
            });
        }
        Some(CollectiveError::Aborted {
            op,
            rank: by as usize - 1,
        })
    }

    /// Waits until every peer's counter reaches `target`.
    fn wait_all(&self, target: u32, op: &'static str) -> Result<()> {
        self.wait_all_at(OFF_COUNTER, target, op)
    }

    /// Whether every peer's counter at `off` has reached `target` (no waiting).
    fn peers_reached(&self, off: usize, target: u32) -> bool {
        (0..self.world)
            .filter(|&p| p != self.rank)
            .all(|p| reached(self.ctrl_u32(p, off).load(Ordering::Acquire), target))
    }

    /// Publishes this rank's counter at `off` and wakes sleepers.
    fn publish(&self, off: usize, value: u32) {
        let c = self.ctrl_u32(self.rank, off);
        c.store(value, Ordering::SeqCst);
        if self
            .ctrl_u32(self.rank, OFF_SLEEPERS)
            .load(Ordering::SeqCst)
            > 0
        {
            futex_wake(c);
        }
    }

    /// Waits until every peer's counter at `off` reaches `target`.
    fn wait_all_at(&self, off: usize, target: u32, op: &'static str) -> Result<()> {
        let mut deadline = None;
        for peer in (0..self.world).filter(|&p| p != self.rank) {
            let counter = self.ctrl_u32(peer, off);
            if reached(counter.load(Ordering::Acquire), target) {
                continue;
            }
            let mut ready = false;
            for _ in 0..self.spin {
                std::hint::spin_loop();
                if reached(counter.load(Ordering::Acquire), target) {
                    ready = true;
                    break;
                }
            }
            for _ in 0..self.yields {
                if ready {
                    break;
                }
                std::thread::yield_now();
                ready = reached(counter.load(Ordering::Acquire), target);
            }
            if ready {
                continue;
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.timeout);
            let sleepers = self.ctrl_u32(peer, OFF_SLEEPERS);
            loop {
                if let Some(e) = self.abort_error(op) {
                    self.aborted.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                sleepers.fetch_add(1, Ordering::SeqCst);
                let v = counter.load(Ordering::SeqCst);
                let now = Instant::now();
                if !reached(v, target) && now < deadline {
                    futex_wait(counter, v, SLICE.min(deadline - now));
                }
                sleepers.fetch_sub(1, Ordering::SeqCst);
                if reached(counter.load(Ordering::Acquire), target) {
                    break;
                }
                let pid = self.pids.lock().expect("pids")[peer];
                if !pid_alive(pid) {
                    self.abort_with(Some(peer));
                    return Err(CollectiveError::PeerDied {
                        op,
                        rank: peer,
                        pid,
                    });
                }
                if Instant::now() >= deadline {
                    let ranks: Vec<usize> = (0..self.world)
                        .filter(|&p| {
                            p != self.rank
                                && !reached(self.ctrl_u32(p, off).load(Ordering::SeqCst), target)
                        })
                        .collect();
                    self.abort_with(ranks.first().copied());
                    return Err(CollectiveError::Timeout {
                        op,
                        ranks,
                        timeout: self.timeout,
                    });
                }
            }
        }
        Ok(())
    }

    fn sync(&self, op: &'static str) -> Result<()> {
        let t = self.signal();
        self.wait_all(t, op)
    }

    /// Marks the communicator failed here and everywhere, and returns `e`.
    fn fail(&self, e: CollectiveError) -> CollectiveError {
        self.abort_with(None);
        e
    }

    fn abort_with(&self, failed: Option<usize>) {
        self.aborted.store(true, Ordering::SeqCst);
        if let Some(f) = failed {
            let _ = self.global_u32(OFF_FAILED).compare_exchange(
                0,
                f as u32 + 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
        let _ = self.global_u32(OFF_ABORT).compare_exchange(
            0,
            self.rank as u32 + 1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        for r in 0..self.world {
            futex_wake(self.ctrl_u32(r, OFF_COUNTER));
        }
    }

    /// Runs `f` with a guard against concurrent calls on one communicator (a usage error that
    /// would corrupt the protocol).
    fn exclusive<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if self.busy.swap(1, Ordering::SeqCst) != 0 {
            return Err(CollectiveError::InvalidArgument {
                op,
                what: "another collective is running on this communicator from another thread"
                    .into(),
            });
        }
        let r = f();
        self.busy.store(0, Ordering::SeqCst);
        r
    }
}

impl ShmTransport {
    /// All-reduce for small worlds: each round every rank copies its whole round into a slot and
    /// publishes it (COPIED), then every rank reduces all ranks' slots of that round itself (in
    /// rank order, so all ranks compute identical bits) and says so (DONE). Same DRAM traffic as
    /// the split rounds, the extra reads hit the shared L3, and no second sync per round. Copies
    /// run up to DEPTH rounds ahead of the slowest peer's reads, so when the scheduler runs the
    /// ranks in turns (more processes than idle cores) each one progresses in bursts instead of
    /// waiting for the other at every round.
    fn all_reduce_direct(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        desc: CallDesc,
        parity: usize,
    ) -> Result<()> {
        const OP: &str = "all_reduce";
        let (r, w, es) = (self.rank, self.world, dtype.size());
        let count = buf.len() / es;
        let round = self.slot_bytes() / es;
        let rounds = count.div_ceil(round);
        let p = buf.as_mut_ptr();
        // Global round numbers: every rank runs the same rounds, so they agree.
        let base = self.direct_rounds.load(Ordering::Relaxed);
        let g = |k: usize| base.wrapping_add(k as u32);
        let slot = |j: usize, k: usize| self.slot(j, 2 + (g(k) as usize) % DEPTH);
        // Round k may reuse its slot once every peer finished reading round k − DEPTH.
        let free = |k: usize| g(k).wrapping_add(1).wrapping_sub(DEPTH as u32);
        let (mut copied, mut reduced) = (0usize, 0usize);
        while reduced < rounds {
            let ahead = copied < rounds && copied < reduced + DEPTH;
            if ahead && (copied == reduced || self.peers_reached(OFF_DONE, free(copied))) {
                self.wait_all_at(OFF_DONE, free(copied), OP)?;
                let start = copied * round;
                let n = round.min(count - start);
                // SAFETY: inside `buf`; the slot is this rank's and no peer reads it any more.
                unsafe {
                    std::ptr::copy_nonoverlapping(p.add(start * es), slot(r, copied), n * es)
                };
                copied += 1;
                self.publish(OFF_COPIED, g(copied));
                continue;
            }
            self.wait_all_at(OFF_COPIED, g(reduced + 1), OP)?;
            if reduced == 0 {
                self.check_desc(OP, desc, parity)?;
            }
            let start = reduced * round;
            let n = round.min(count - start);
            // SAFETY: every rank published this round's slot; none rewrites it before this rank
            // publishes that it is done with it. Rank order, so all ranks compute the same bits.
            let srcs: Vec<*const u8> = (0..w).map(|j| slot(j, reduced) as *const u8).collect();
            unsafe { reduce(dtype, op, w, &srcs, &[p.add(start * es)], n) };
            reduced += 1;
            self.publish(OFF_DONE, g(reduced));
        }
        // Every peer done with every slot: the next call may write them.
        self.wait_all_at(OFF_DONE, g(rounds), OP)?;
        self.direct_rounds.store(g(rounds), Ordering::Relaxed);
        Ok(())
    }
}

impl ShmTransport {
    /// All-reduce by cross-memory reads (Linux CMA, `process_vm_readv`), with no staging copy:
    /// every rank publishes its buffer's address; rank r reduces piece r of the buffer, reading
    /// the peers' piece r straight from their memory in L2-sized steps and adding in rank order
    /// (so the bits equal the other schemes'); after a sync, every rank reads the other reduced
    /// pieces straight into its buffer; a last sync keeps each buffer untouched until every peer
    /// has read it. Per rank that moves ~2.5 N bytes through DRAM for N bytes, against ~5 N when
    /// every buffer is first copied into the shared segment.
    fn all_reduce_cma(
        &self,
        buf: &mut [u8],
        dtype: DType,
        op: ReduceOp,
        desc: CallDesc,
        parity: usize,
    ) -> Result<()> {
        const OP: &str = "all_reduce";
        let (r, w, es) = (self.rank, self.world, dtype.size());
        let count = buf.len() / es;
        let p = buf.as_mut_ptr();
        self.ctrl_u64(r, OFF_ADDR).store(p as u64, Ordering::SeqCst);
        let t = self.signal();
        self.wait_all(t, OP)?;
        self.check_desc(OP, desc, parity)?;
        let pids = self.pids.lock().expect("pids").clone();
        let addrs: Vec<usize> = (0..w)
            .map(|j| self.ctrl_u64(j, OFF_ADDR).load(Ordering::SeqCst) as usize)
            .collect();
        let read = |j: usize, elem: usize, dst: *mut u8, n: usize| -> Result<()> {
            cma_read(pids[j], addrs[j] + elem * es, dst, n * es).map_err(|e| {
                // A peer that failed first may have unwound its buffer (EFAULT) or exited
                // (ESRCH): report the failure that started it, once its abort is visible.
                let t = std::time::Instant::now();
                while t.elapsed() < Duration::from_millis(200) {
                    if let Some(cause) = self.abort_error(OP) {
                        return cause;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                if pid_alive(pids[j]) {
                    self.fail(CollectiveError::Shm {
                        path: format!("process_vm_readv from rank {j} (pid {})", pids[j]),
                        reason: e.to_string(),
                    })
                } else {
                    self.abort_with(Some(j));
                    CollectiveError::PeerDied {
                        op: OP,
                        rank: j,
                        pid: pids[j],
                    }
                }
            })
        };
        // Phase 1: reduce piece r.
        let (start, len) = piece(0, count, w, r);
        let step = (CMA_STEP_BYTES / es).max(1);
        let mut tmp = vec![0u8; step * es * (w - 1)];
        let mut off = 0;
        while off < len {
            let n = step.min(len - off);
            let mut srcs: Vec<*const u8> = Vec::with_capacity(w);
            let mut k = 0;
            for j in 0..w {
                if j == r {
                    // SAFETY: inside `buf`.
                    srcs.push(unsafe { p.add((start + off) * es) });
                } else {
                    let dst = tmp[k * step * es..].as_mut_ptr();
                    read(j, start + off, dst, n)?;
                    srcs.push(dst);
                    k += 1;
                }
            }
            // SAFETY: every source holds n elements; the destination is this rank's piece.
            unsafe { reduce(dtype, op, w, &srcs, &[p.add((start + off) * es)], n) };
            off += n;
        }
        let t = self.signal();
        self.wait_all(t, OP)?;
        // Phase 2: every other piece, reduced by its owner, straight into `buf`.
        for j in (0..w).filter(|&j| j != r) {
            let (a, n) = piece(0, count, w, j);
            if n > 0 {
                // SAFETY: inside `buf`.
                read(j, a, unsafe { p.add(a * es) }, n)?;
            }
        }
        let t = self.signal();
        self.wait_all(t, OP)?;
        Ok(())
    }
}

/// Reads `len` bytes at `remote` in process `pid` into `local` (process_vm_readv, retried on
/// short reads).
fn cma_read(pid: u32, remote: usize, local: *mut u8, len: usize) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let l = libc::iovec {
            // SAFETY: the caller gives `len` writable bytes at `local`.
            iov_base: unsafe { local.add(done) }.cast(),
            iov_len: len - done,
        };
        let rv = libc::iovec {
            iov_base: (remote + done) as *mut libc::c_void,
            iov_len: len - done,
        };
        // SAFETY: one local and one remote iovec as above; the kernel checks the remote range.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &l, 1, &rv, 1, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer's buffer ended early",
            ));
        }
        done += n as usize;
    }
    Ok(())
}

/// Bounds of piece `j` of `world` when `len` elements starting at `start` are split evenly.
fn piece(start: usize, len: usize, world: usize, j: usize) -> (usize, usize) {
    let a = start + len * j / world;
    let b = start + len * (j + 1) / world;
    (a, b - a)
}

impl Transport for ShmTransport {
    fn all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        self.exclusive(OP, || {
            let desc = CallDesc::new(1, buf.len(), dtype as u8, op as u8);
            let parity = self.begin(desc)?;
            let es = dtype.size();
            let count = buf.len() / es;
            if count == 0 {
                return Ok(());
            }
            if self.cma && buf.len() >= CMA_MIN_BYTES {
                return self.all_reduce_cma(buf, dtype, op, desc, parity);
            }
            if self.direct {
                return self.all_reduce_direct(buf, dtype, op, desc, parity);
            }
            let (r, w) = (self.rank, self.world);
            let chunk = self.chunk / es;
            let round = chunk * w;
            let rounds = count.div_ceil(round);
            let p = buf.as_mut_ptr();
            let span = |k: usize| (k * round, round.min(count - k * round));
            let copy_in = |k: usize, b: usize| {
                let (start, len) = span(k);
                for j in (0..w).filter(|&j| j != r) {
                    let (off, n) = piece(start, len, w, j);
                    // SAFETY: the piece is inside `buf`; the slot piece is this rank's to write.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            p.add(off * es),
                            self.slot(r, b).add(j * self.chunk),
                            n * es,
                        )
                    };
                }
            };
            let mut b = self.next_buf();
            copy_in(0, b);
            for k in 0..rounds {
                let t = self.signal();
                self.wait_all(t, OP)?;
                if k == 0 {
                    self.check_desc(OP, desc, parity)?;
                }
                let (start, len) = span(k);
                let (off, n) = piece(start, len, w, r);
                // SAFETY: peers finished writing their slots for this round (counter), and no
                // one writes piece r of any slot until the next signal.
                let srcs: Vec<*const u8> = (0..w)
                    .map(|j| {
                        if j == r {
                            unsafe { p.add(off * es) as *const u8 }
                        } else {
                            unsafe { self.slot(j, b).add(r * self.chunk) as *const u8 }
                        }
                    })
                    .collect();
                unsafe {
                    reduce(
                        dtype,
                        op,
                        w,
                        &srcs,
                        &[p.add(off * es), self.slot(r, b).add(r * self.chunk)],
                        n,
                    )
                };
                let t = self.signal();
                let next = (k + 1 < rounds).then(|| {
                    let nb = self.next_buf();
                    copy_in(k + 1, nb);
                    nb
                });
                self.wait_all(t, OP)?;
                for j in (0..w).filter(|&j| j != r) {
                    let (off, n) = piece(start, len, w, j);
                    // SAFETY: rank j wrote its reduced piece before signalling.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.slot(j, b).add(j * self.chunk),
                            p.add(off * es),
                            n * es,
                        )
                    };
                }
                if let Some(nb) = next {
                    b = nb;
                }
            }
            Ok(())
        })
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        self.exclusive(OP, || {
            let desc = CallDesc::new(2, buf.len(), root as u8, 0);
            let parity = self.begin(desc)?;
            let step = self.slot_bytes();
            let mut off = 0;
            while off < buf.len() {
                let n = step.min(buf.len() - off);
                let b = self.next_buf();
                if self.rank == root {
                    // SAFETY: the root's slot is the root's to write in this round.
                    unsafe {
                        std::ptr::copy_nonoverlapping(buf.as_ptr().add(off), self.slot(root, b), n)
                    };
                }
                self.sync(OP)?;
                if off == 0 {
                    self.check_desc(OP, desc, parity)?;
                }
                if self.rank != root {
                    // SAFETY: the root wrote this round before signalling.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.slot(root, b),
                            buf.as_mut_ptr().add(off),
                            n,
                        )
                    };
                }
                off += n;
            }
            Ok(())
        })
    }

    unsafe fn all_gather(
        &self,
        input: Option<*const u8>,
        output: *mut u8,
        bytes: usize,
    ) -> Result<()> {
        const OP: &str = "all_gather";
        self.exclusive(OP, || {
            let desc = CallDesc::new(3, bytes, 0, 0);
            let parity = self.begin(desc)?;
            let (r, w) = (self.rank, self.world);
            let mine = output.add(r * bytes);
            if let Some(input) = input {
                if input != mine as *const u8 {
                    std::ptr::copy_nonoverlapping(input, mine, bytes);
                }
            }
            let step = self.slot_bytes();
            let mut off = 0;
            while off < bytes {
                let n = step.min(bytes - off);
                let b = self.next_buf();
                std::ptr::copy_nonoverlapping(mine.add(off), self.slot(r, b), n);
                self.sync(OP)?;
                if off == 0 {
                    self.check_desc(OP, desc, parity)?;
                }
                for j in (0..w).filter(|&j| j != r) {
                    std::ptr::copy_nonoverlapping(self.slot(j, b), output.add(j * bytes + off), n);
                }
                off += n;
            }
            Ok(())
        })
    }

    unsafe fn reduce_scatter(
        &self,
        input: *const u8,
        output: *mut u8,
        count: usize,
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        const OP: &str = "reduce_scatter";
        self.exclusive(OP, || {
            let es = dtype.size();
            let desc = CallDesc::new(4, count * es, dtype as u8, op as u8);
            let parity = self.begin(desc)?;
            let (r, w) = (self.rank, self.world);
            let chunk = self.chunk / es;
            let mut off = 0;
            while off < count {
                let n = chunk.min(count - off);
                let b = self.next_buf();
                for j in (0..w).filter(|&j| j != r) {
                    std::ptr::copy_nonoverlapping(
                        input.add((j * count + off) * es),
                        self.slot(r, b).add(j * self.chunk),
                        n * es,
                    );
                }
                self.sync(OP)?;
                if off == 0 {
                    self.check_desc(OP, desc, parity)?;
                }
                let srcs: Vec<*const u8> = (0..w)
                    .map(|j| {
                        if j == r {
                            input.add((r * count + off) * es)
                        } else {
                            self.slot(j, b).add(r * self.chunk) as *const u8
                        }
                    })
                    .collect();
                reduce(dtype, op, w, &srcs, &[output.add(off * es)], n);
                off += n;
            }
            Ok(())
        })
    }

    fn barrier(&self) -> Result<()> {
        const OP: &str = "barrier";
        self.exclusive(OP, || {
            let desc = CallDesc::new(5, 0, 0, 0);
            let parity = self.begin(desc)?;
            self.sync(OP)?;
            self.check_desc(OP, desc, parity)
        })
    }

    fn abort(&self) {
        self.abort_with(None);
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.unlink();
    }
}
