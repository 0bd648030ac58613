//! The TCP transport: a ring. Each rank connects to rank+1 and accepts rank-1, so it sends on
//! one socket and receives on another. All-reduce is the bandwidth-optimal ring (reduce-scatter
//! then all-gather, 2(n−1)/n of the buffer on the wire per rank); within a step the send runs on
//! its own thread while the receive side reduces each piece as it arrives.
//!
//! Every socket read and write has the communicator's timeout; a peer that dies closes its
//! sockets, so its neighbours fail at once. Besides the ring, every pair of ranks shares a control
//! connection that carries only failure notices: the rank that sees a connection break finds the
//! culprit (a notice from another rank, else the rank whose control connection closed, else its
//! neighbour) and tells everyone, so every rank's error names the rank that actually failed.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::cpu::reduce::reduce;
use crate::cpu::{describe, CallDesc, Transport};
use crate::store::Store;
use crate::{CollectiveError, DType, ReduceOp, Result};

const HELLO: u64 = 0x6464_6574_7274_6370; // "ddetrtcp"
/// Bytes received and reduced at a time while the send of the same step is in flight.
const PIECE: usize = 256 << 10;
const SOCKET_BUFFER: libc::c_int = 4 << 20;
const KIND_DATA: u32 = 0;
const KIND_CONTROL: u32 = 1;
/// How long a rank that saw a connection break waits for a notice naming the failed rank.
const DIAGNOSE_WAIT: Duration = Duration::from_millis(200);

struct Conns {
    /// To rank+1.
    send: TcpStream,
    /// From rank-1.
    recv: TcpStream,
}

pub(crate) struct TcpTransport {
    rank: usize,
    world: usize,
    conns: Mutex<Conns>,
    /// Clones used by `abort` to shut the sockets from any thread.
    shut: Vec<TcpStream>,
    /// Control connections to every other rank (failure notices only), non-blocking.
    control: Mutex<Vec<Option<TcpStream>>>,
    timeout: Duration,
    aborted: AtomicBool,
}

fn tcp_err(what: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Tcp {
        what: what.to_string(),
    }
}

fn set_buffers(s: &TcpStream) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on an owned socket with a valid int.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &SOCKET_BUFFER as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// A raw buffer handed to the sending thread of one ring step.
#[derive(Clone, Copy)]
struct SendBuf(*const u8, usize);
// SAFETY: the ring protocol never writes a segment while it is being sent.
unsafe impl Send for SendBuf {}

impl TcpTransport {
    /// Publishes this rank's endpoint under `key`, connects the ring.
    pub(crate) fn new(
        store: &dyn Store,
        key: &str,
        rank: usize,
        world: usize,
        advertise: IpAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(advertise, 0))
            .or_else(|_| TcpListener::bind(("0.0.0.0", 0)))
            .map_err(|e| tcp_err(format!("cannot listen on {advertise}: {e}")))?;
        let port = listener.local_addr().map_err(tcp_err)?.port();
        let me = SocketAddr::new(advertise, port);
        store.set(&format!("{key}/tcp/{rank}"), me.to_string().as_bytes())?;
        let next = (rank + 1) % world;
        let prev = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        let addr_of = |peer: usize| -> Result<SocketAddr> {
            String::from_utf8_lossy(&store.get_wait(&format!("{key}/tcp/{peer}"), timeout)?)
                .parse()
                .map_err(|e| tcp_err(format!("rank {peer} published a bad endpoint: {e}")))
        };
        let connect = |peer: usize, kind: u32| -> Result<TcpStream> {
            let addr = addr_of(peer)?;
            let mut s = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(CollectiveError::PeerLost {
                            op: "connect",
                            rank: peer,
                            reason: format!("cannot connect to {addr}: {e}"),
                        })
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            let mut hello = HELLO.to_le_bytes().to_vec();
            hello.extend_from_slice(&(rank as u32).to_le_bytes());
            hello.extend_from_slice(&kind.to_le_bytes());
            s.write_all(&hello).map_err(|e| CollectiveError::PeerLost {
                op: "connect",
                rank: peer,
                reason: e.to_string(),
            })?;
            Ok(s)
        };
        // The data ring: send to rank+1, receive from rank-1. The control mesh: rank j connects
        // to every rank i < j; it carries only failure notices.
        let mut send = connect(next, KIND_DATA)?;
        let mut control: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (i, slot) in control.iter_mut().enumerate().take(rank) {
            *slot = Some(connect(i, KIND_CONTROL)?);
        }
        listener.set_nonblocking(true).map_err(tcp_err)?;
        let mut recv = None;
        let mut expected_control = world - 1 - rank;
        while recv.is_none() || expected_control > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(tcp_err)?;
                    s.set_read_timeout(Some(timeout)).map_err(tcp_err)?;
                    let mut h = [0u8; 16];
                    if s.read_exact(&mut h).is_err()
                        || u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) != HELLO
                    {
                        tracing::warn!("ignoring a connection that is not from this ring");
                        continue;
                    }
                    let from = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
                    match u32::from_le_bytes(h[12..].try_into().expect("4 bytes")) {
                        KIND_DATA if from == prev && recv.is_none() => recv = Some(s),
                        KIND_CONTROL if from > rank && from < world && control[from].is_none() => {
                            control[from] = Some(s);
                            expected_control -= 1;
                        }
                        _ => tracing::warn!(from, "ignoring an unexpected connection"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => {
                    let missing = if recv.is_none() {
                        prev
                    } else {
                        (rank + 1..world)
                            .find(|&j| control[j].is_none())
                            .unwrap_or(prev)
                    };
                    return Err(CollectiveError::PeerLost {
                        op: "connect",
                        rank: missing,
                        reason: format!("rank {missing} never connected: {e}"),
                    });
                }
            }
        }
        let mut recv = recv.expect("accepted");
        for s in [&mut send, &mut recv] {
            s.set_nodelay(true).map_err(tcp_err)?;
            s.set_read_timeout(Some(timeout)).map_err(tcp_err)?;
            s.set_write_timeout(Some(timeout)).map_err(tcp_err)?;
            set_buffers(s);
        }
        for c in control.iter().flatten() {
            c.set_nonblocking(true).map_err(tcp_err)?;
            c.set_nodelay(true).map_err(tcp_err)?;
        }
        let shut = vec![
            send.try_clone().map_err(tcp_err)?,
            recv.try_clone().map_err(tcp_err)?,
        ];
        tracing::debug!(rank, world, %me, "tcp ring ready");
        Ok(Self {
            rank,
            world,
            conns: Mutex::new(Conns { send, recv }),
            shut,
            control: Mutex::new(control),
            timeout,
            aborted: AtomicBool::new(false),
        })
    }

    /// Which rank to blame for a broken connection to `suspect`: a notice from another rank
    /// naming the culprit wins, then a rank whose control connection closed (its process
    /// ended), else `suspect` itself. Waits briefly for notices to arrive.
    fn diagnose(&self, suspect: usize) -> (usize, Option<usize>) {
        let mut control = self.control.lock().expect("control poisoned");
        let deadline = Instant::now() + DIAGNOSE_WAIT;
        let mut closed = Vec::new();
        loop {
            for (peer, slot) in control.iter_mut().enumerate() {
                let Some(c) = slot else { continue };
                let mut b = [0u8; 4];
                match c.read(&mut b) {
                    Ok(4) => return (u32::from_le_bytes(b) as usize, Some(peer)),
                    Ok(0) => {
                        closed.push(peer);
                        *slot = None;
                    }
                    Ok(_) | Err(_) => {}
                }
            }
            if closed.contains(&suspect) {
                return (suspect, None);
            }
            if Instant::now() >= deadline {
                return (closed.first().copied().unwrap_or(suspect), None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Tells every other rank which rank failed.
    fn notify(&self, culprit: usize) {
        let mut control = self.control.lock().expect("control poisoned");
        for c in control.iter_mut().flatten() {
            let _ = c.write_all(&(culprit as u32).to_le_bytes());
        }
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn io_error(&self, op: &'static str, peer: usize, e: std::io::Error) -> CollectiveError {
        if self.aborted.load(Ordering::SeqCst) {
            return CollectiveError::AbortedLocally;
        }
        let (culprit, told_by) = self.diagnose(peer);
        self.notify(culprit);
        self.abort();
        match (e.kind(), told_by) {
            (ErrorKind::WouldBlock | ErrorKind::TimedOut, None) if culprit == peer => {
                CollectiveError::Timeout {
                    op,
                    ranks: vec![peer],
                    timeout: self.timeout,
                }
            }
            (_, Some(by)) => CollectiveError::PeerLost {
                op,
                rank: culprit,
                reason: format!("reported by rank {by}"),
            },
            _ if culprit != peer => CollectiveError::PeerLost {
                op,
                rank: culprit,
                reason: format!("its process is gone; rank {peer} then dropped the ring"),
            },
            _ => CollectiveError::PeerLost {
                op,
                rank: peer,
                reason: e.to_string(),
            },
        }
    }

    /// Locks the sockets and exchanges the call's descriptor with both neighbours.
    fn begin(&self, op: &'static str, desc: CallDesc) -> Result<std::sync::MutexGuard<'_, Conns>> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(CollectiveError::AbortedLocally);
        }
        let mut conns = self
            .conns
            .try_lock()
            .map_err(|_| CollectiveError::InvalidArgument {
                op,
                what: "another collective is running on this communicator from another thread"
                    .into(),
            })?;
        conns
            .send
            .write_all(&desc.0.to_le_bytes())
            .map_err(|e| self.io_error(op, self.next(), e))?;
        let mut theirs = [0u8; 8];
        conns
            .recv
            .read_exact(&mut theirs)
            .map_err(|e| self.io_error(op, self.prev(), e))?;
        let theirs = CallDesc(u64::from_le_bytes(theirs));
        if theirs != desc {
            self.abort();
            return Err(CollectiveError::Mismatch {
                op,
                rank: self.rank,
                peer: self.prev(),
                call: describe(desc),
                peer_call: describe(theirs),
            });
        }
        Ok(conns)
    }

    /// One ring step: sends `send` to rank+1 on a helper thread while receiving `recv_len`
    /// bytes from rank-1, handing each received piece to `on_piece(offset, bytes)`.
    fn step(
        &self,
        op: &'static str,
        conns: &mut Conns,
        send: SendBuf,
        recv_len: usize,
        mut on_piece: impl FnMut(usize, &[u8]),
    ) -> Result<()> {
        let Conns { send: tx, recv: rx } = conns;
        let next = self.next();
        std::thread::scope(|s| {
            let sender = s.spawn(move || {
                let send = send;
                // SAFETY: the segment stays valid and unwritten until this step ends.
                let bytes = unsafe { std::slice::from_raw_parts(send.0, send.1) };
                tx.write_all(bytes)
            });
            // u64-backed so every piece is aligned for any dtype.
            let mut words = vec![0u64; PIECE.min(recv_len).div_ceil(8)];
            // SAFETY: reinterpreting initialised u64s as bytes.
            let piece = unsafe {
                std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8)
            };
            let mut off = 0;
            let mut result = Ok(());
            while off < recv_len {
                let n = PIECE.min(recv_len - off);
                if let Err(e) = rx.read_exact(&mut piece[..n]) {
                    result = Err(self.io_error(op, self.prev(), e));
                    break;
                }
                on_piece(off, &piece[..n]);
                off += n;
            }
            if result.is_err() {
                // Unblock the sender so the scope can end.
                self.abort();
            }
            let sent = sender.join().expect("ring sender thread panicked");
            result?;
            sent.map_err(|e| self.io_error(op, next, e))
        })
    }

    /// Ring reduce-scatter over `buf` cut into `world` segments at `bounds` (element offsets,
    /// world+1 entries): afterwards segment `rank` holds the full reduction.
    fn ring_reduce_scatter(
        &self,
        op_name: &'static str,
        conns: &mut Conns,
        buf: *mut u8,
        bounds: &[usize],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        let (r, w, es) = (self.rank, self.world, dtype.size());
        for s in 0..w - 1 {
            let send_seg = (r + 2 * w - 1 - s) % w;
            let recv_seg = (r + 2 * w - 2 - s) % w;
            let step_op = if op == ReduceOp::Avg && s < w - 2 {
                ReduceOp::Sum
            } else {
                op
            };
            let send = SendBuf(
                unsafe { buf.add(bounds[send_seg] * es) },
                (bounds[send_seg + 1] - bounds[send_seg]) * es,
            );
            let base = bounds[recv_seg] * es;
            let recv_len = (bounds[recv_seg + 1] - bounds[recv_seg]) * es;
            self.step(op_name, conns, send, recv_len, |off, bytes| {
                // SAFETY: `bytes` is 8-aligned (see `step`); dst is inside segment recv_seg, which
                // no one else touches during this step. Avg divides the last step's full sum.
                unsafe {
                    let dst = buf.add(base + off);
                    reduce(
                        dtype,
                        step_op,
                        w,
                        &[dst as *const u8, bytes.as_ptr()],
                        &[dst],
                        bytes.len() / es,
                    );
                }
            })?;
        }
        Ok(())
    }

    /// Ring all-gather of segments at `bounds` (byte offsets here): rank r starts with segment r.
    fn ring_all_gather(
        &self,
        op_name: &'static str,
        conns: &mut Conns,
        buf: *mut u8,
        bounds: &[usize],
    ) -> Result<()> {
        let (r, w) = (self.rank, self.world);
        for s in 0..w - 1 {
            let send_seg = (r + w - s) % w;
            let recv_seg = (r + 2 * w - 1 - s) % w;
            let send = SendBuf(
                unsafe { buf.add(bounds[send_seg]) },
                bounds[send_seg + 1] - bounds[send_seg],
            );
            let base = bounds[recv_seg];
            self.step(
                op_name,
                conns,
                send,
                bounds[recv_seg + 1] - base,
                |off, bytes| {
                    // SAFETY: inside segment recv_seg, untouched by the sender during this step.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            bytes.as_ptr(),
                            buf.add(base + off),
                            bytes.len(),
                        )
                    };
                },
            )?;
        }
        Ok(())
    }

    fn even_bounds(&self, count: usize) -> Vec<usize> {
        (0..=self.world).map(|j| count * j / self.world).collect()
    }
}

impl Transport for TcpTransport {
    fn all_reduce(&self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        const OP: &str = "all_reduce";
        let mut conns = self.begin(OP, CallDesc::new(1, buf.len(), dtype as u8, op as u8))?;
        let es = dtype.size();
        let bounds = self.even_bounds(buf.len() / es);
        self.ring_reduce_scatter(OP, &mut conns, buf.as_mut_ptr(), &bounds, dtype, op)?;
        let byte_bounds: Vec<usize> = bounds.iter().map(|b| b * es).collect();
        self.ring_all_gather(OP, &mut conns, buf.as_mut_ptr(), &byte_bounds)
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        const OP: &str = "broadcast";
        let mut conns = self.begin(OP, CallDesc::new(2, buf.len(), root as u8, 0))?;
        let pos = (self.rank + self.world - root) % self.world;
        let mut off = 0;
        while off < buf.len() {
            let n = PIECE.min(buf.len() - off);
            if pos != 0 {
                conns
                    .recv
                    .read_exact(&mut buf[off..off + n])
                    .map_err(|e| self.io_error(OP, self.prev(), e))?;
            }
            if pos != self.world - 1 {
                conns
                    .send
                    .write_all(&buf[off..off + n])
                    .map_err(|e| self.io_error(OP, self.next(), e))?;
            }
            off += n;
        }
        Ok(())
    }

    unsafe fn all_gather(
        &self,
        input: Option<*const u8>,
        output: *mut u8,
        bytes: usize,
    ) -> Result<()> {
        const OP: &str = "all_gather";
        let mut conns = self.begin(OP, CallDesc::new(3, bytes, 0, 0))?;
        let mine = output.add(self.rank * bytes);
        if let Some(input) = input {
            if input != mine as *const u8 {
                std::ptr::copy_nonoverlapping(input, mine, bytes);
            }
        }
        let bounds: Vec<usize> = (0..=self.world).map(|j| j * bytes).collect();
        self.ring_all_gather(OP, &mut conns, output, &bounds)
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
        let es = dtype.size();
        let mut conns = self.begin(OP, CallDesc::new(4, count * es, dtype as u8, op as u8))?;
        // The ring accumulates in place, and `input` is the caller's: work on an aligned copy.
        let total = self.world * count * es;
        let mut work = vec![0u64; total.div_ceil(8)];
        let wp = work.as_mut_ptr() as *mut u8;
        std::ptr::copy_nonoverlapping(input, wp, total);
        let bounds: Vec<usize> = (0..=self.world).map(|j| j * count).collect();
        self.ring_reduce_scatter(OP, &mut conns, wp, &bounds, dtype, op)?;
        std::ptr::copy(wp.add(self.rank * count * es), output, count * es);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        const OP: &str = "barrier";
        let mut conns = self.begin(OP, CallDesc::new(5, 0, 0, 0))?;
        // One byte around the ring world−1 times: done only once every rank has entered.
        let mut marks = vec![0u8; self.world];
        marks[self.rank] = 1;
        let bounds: Vec<usize> = (0..=self.world).collect();
        self.ring_all_gather(OP, &mut conns, marks.as_mut_ptr(), &bounds)?;
        debug_assert!(marks.iter().all(|&m| m == 1));
        Ok(())
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for s in &self.shut {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
