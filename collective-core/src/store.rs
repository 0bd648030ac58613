//! Bootstrap key-value stores. A communicator uses its [`Store`] only while it is being built:
//! rank 0 publishes what the others need (the shared-memory segment's name, the NCCL unique id,
//! the TCP endpoints), everyone waits for it, and after that no collective touches the store.
//!
//! The launcher's rendezvous implements [`Store`]; [`InProcessStore`] serves threads of one
//! process (tests) and [`TcpStoreServer`]/[`TcpStore`] serve processes that share nothing but a
//! socket (tests, `ddetr bench collective`, any setup without the launcher).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::CollectiveError;

type Result<T> = std::result::Result<T, CollectiveError>;

/// A bootstrap key-value store shared by all ranks of a job.
pub trait Store: Send + Sync {
    /// Sets `key` to `value`, replacing any earlier value.
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    /// The value of `key` if it is set now; never blocks on the key.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Blocks until every key in `keys` is set, or fails with [`CollectiveError::StoreTimeout`]
    /// naming the first missing key after `timeout`.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()>;

    /// Waits for `key` and returns its value.
    fn get_wait(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        self.wait(&[key], timeout)?;
        self.get(key)?.ok_or_else(|| CollectiveError::Store {
            what: format!("key {key} vanished after wait"),
        })
    }
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        (**self).set(key, value)
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        (**self).get(key)
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        (**self).wait(keys, timeout)
    }
}

/// A map plus a condition variable: the state both the in-process store and the TCP server use.
#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl Table {
    fn set(&self, key: &str, value: &[u8]) {
        self.map
            .lock()
            .expect("store table poisoned")
            .insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.map
            .lock()
            .expect("store table poisoned")
            .get(key)
            .cloned()
    }

    /// The first key still missing when the deadline passed, or None when all are set.
    fn wait(&self, keys: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut map = self.map.lock().expect("store table poisoned");
        loop {
            let missing = keys.iter().find(|k| !map.contains_key(**k));
            let Some(missing) = missing else { return None };
            let now = Instant::now();
            if now >= deadline {
                return Some((*missing).to_owned());
            }
            map = self
                .changed
                .wait_timeout(map, deadline - now)
                .expect("store table poisoned")
                .0;
        }
    }
}

/// A store shared by the threads of one process.
#[derive(Clone, Default)]
pub struct InProcessStore {
    table: Arc<Table>,
}

impl InProcessStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for InProcessStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.table.set(key, value);
        Ok(())
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.table.get(key))
    }
    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        match self.table.wait(keys, timeout) {
            None => Ok(()),
            Some(key) => Err(CollectiveError::StoreTimeout { key, timeout }),
        }
    }
}

// Wire format, both directions: u8 opcode/status, then length-prefixed (u32 LE) fields.
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_WAIT: u8 = 3;
const REPLY_OK: u8 = 0;
const REPLY_MISSING: u8 = 1;
const REPLY_TIMEOUT: u8 = 2;
/// Keys and values are small bootstrap records; anything larger is a protocol error.
const MAX_FIELD_BYTES: u32 = 16 << 20;

fn write_field(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(bytes)
}

fn read_field(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FIELD_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("field of {len} bytes"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn read_u8(r: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

/// The server side of the TCP store: a listener thread and one thread per client. Dropping it
/// stops accepting; connected clients keep working until they disconnect.
pub struct TcpStoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TcpStoreServer {
    /// Listens on `addr` (port 0 picks a free port; see [`TcpStoreServer::addr`]).
    pub fn bind(addr: impl ToSocketAddrs) -> Result<Self> {
        let listener = TcpListener::bind(addr).map_err(|e| CollectiveError::Store {
            what: format!("cannot listen: {e}"),
        })?;
        let addr = listener.local_addr().map_err(|e| CollectiveError::Store {
            what: e.to_string(),
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| CollectiveError::Store {
                what: e.to_string(),
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let table = Arc::new(Table::default());
        let stop2 = stop.clone();
        let accept = std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, table, stop2))
            .map_err(|e| CollectiveError::Store {
                what: e.to_string(),
            })?;
        tracing::debug!(%addr, "tcp store listening");
        Ok(Self {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, table: Arc<Table>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let table = table.clone();
                let _ = std::thread::Builder::new()
                    .name("store-conn".into())
                    .spawn(move || {
                        if let Err(e) = serve(stream, &table) {
                            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                                tracing::debug!(%peer, error = %e, "store connection ended");
                            }
                        }
                    });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                tracing::warn!(error = %e, "store accept failed");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve(mut stream: TcpStream, table: &Table) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    loop {
        let op = read_u8(&mut stream)?;
        let mut reply = Vec::new();
        match op {
            OP_SET => {
                let key = String::from_utf8_lossy(&read_field(&mut stream)?).into_owned();
                let value = read_field(&mut stream)?;
                table.set(&key, &value);
                reply.push(REPLY_OK);
            }
            OP_GET => {
                let key = String::from_utf8_lossy(&read_field(&mut stream)?).into_owned();
                match table.get(&key) {
                    Some(v) => {
                        reply.push(REPLY_OK);
                        write_field(&mut reply, &v)?;
                    }
                    None => reply.push(REPLY_MISSING),
                }
            }
            OP_WAIT => {
                let mut ms = [0u8; 8];
                stream.read_exact(&mut ms)?;
                let timeout = Duration::from_millis(u64::from_le_bytes(ms));
                let mut count = [0u8; 4];
                stream.read_exact(&mut count)?;
                let mut keys = Vec::new();
                for _ in 0..u32::from_le_bytes(count) {
                    keys.push(String::from_utf8_lossy(&read_field(&mut stream)?).into_owned());
                }
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                match table.wait(&refs, timeout) {
                    None => reply.push(REPLY_OK),
                    Some(missing) => {
                        reply.push(REPLY_TIMEOUT);
                        write_field(&mut reply, missing.as_bytes())?;
                    }
                }
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("unknown store opcode {other}"),
                ));
            }
        }
        stream.write_all(&reply)?;
    }
}

/// A client of [`TcpStoreServer`]. One connection, used by one request at a time.
pub struct TcpStore {
    addr: SocketAddr,
    conn: Mutex<TcpStream>,
    /// Bound on one request's round trip (a `wait` adds its own timeout to this).
    io_timeout: Duration,
}

impl TcpStore {
    /// Connects to the server at `addr`, retrying until `timeout` (the server may start later).
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Self> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| CollectiveError::Store {
                what: format!("bad store address: {e}"),
            })?
            .collect();
        let addr = *addrs.first().ok_or_else(|| CollectiveError::Store {
            what: "store address resolves to nothing".into(),
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1).min(timeout.max(Duration::from_millis(1)))) {
                Ok(stream) => {
                    stream.set_nodelay(true).map_err(|e| CollectiveError::Store { what: e.to_string() })?;
                    return Ok(Self { addr, conn: Mutex::new(stream), io_timeout: Duration::from_secs(60) });
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!(%addr, error = %e, "store not reachable yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(CollectiveError::Store {
                        what: format!("cannot reach the store at {addr} within {timeout:?}: {e}; check MASTER_ADDR/MASTER_PORT"),
                    })
                }
            }
        }
    }

    fn request(&self, body: &[u8], extra: Duration) -> Result<(u8, Option<Vec<u8>>)> {
        let io = |e: std::io::Error| CollectiveError::Store {
            what: format!("store at {}: {e}", self.addr),
        };
        let mut conn = self.conn.lock().expect("store connection poisoned");
        conn.set_read_timeout(Some(self.io_timeout + extra))
            .map_err(io)?;
        conn.set_write_timeout(Some(self.io_timeout)).map_err(io)?;
        conn.write_all(body).map_err(io)?;
        let status = read_u8(&mut *conn).map_err(io)?;
        let payload = match (body[0], status) {
            (OP_GET, REPLY_OK) | (OP_WAIT, REPLY_TIMEOUT) => {
                Some(read_field(&mut *conn).map_err(io)?)
            }
            _ => None,
        };
        Ok((status, payload))
    }
}

impl Store for TcpStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut body = vec![OP_SET];
        write_field(&mut body, key.as_bytes()).expect("vec write");
        write_field(&mut body, value).expect("vec write");
        self.request(&body, Duration::ZERO).map(|_| ())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut body = vec![OP_GET];
        write_field(&mut body, key.as_bytes()).expect("vec write");
        Ok(self.request(&body, Duration::ZERO)?.1)
    }

    fn wait(&self, keys: &[&str], timeout: Duration) -> Result<()> {
        let mut body = vec![OP_WAIT];
        body.extend_from_slice(&(timeout.as_millis() as u64).to_le_bytes());
        body.extend_from_slice(&(keys.len() as u32).to_le_bytes());
        for k in keys {
            write_field(&mut body, k.as_bytes()).expect("vec write");
        }
        match self.request(&body, timeout)? {
            (REPLY_OK, _) => Ok(()),
            (_, missing) => Err(CollectiveError::StoreTimeout {
                key: String::from_utf8_lossy(&missing.unwrap_or_default()).into_owned(),
                timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(a: &dyn Store, b: &dyn Store) {
        assert_eq!(a.get("k").unwrap(), None);
        let err = a.wait(&["k"], Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(err, CollectiveError::StoreTimeout { ref key, .. } if key == "k"),
            "{err}"
        );
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                b.set("k", b"v1").unwrap();
            });
            assert_eq!(a.get_wait("k", Duration::from_secs(5)).unwrap(), b"v1");
        });
        b.set("k", b"v2").unwrap();
        assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"v2"[..]));
        b.set("empty", b"").unwrap();
        a.wait(&["k", "empty"], Duration::from_secs(1)).unwrap();
        assert_eq!(a.get("empty").unwrap().as_deref(), Some(&b""[..]));
    }

    #[test]
    fn in_process_store_sets_gets_and_times_out() {
        let s = InProcessStore::new();
        exercise(&s, &s.clone());
    }

    #[test]
    fn tcp_store_sets_gets_and_times_out() {
        let server = TcpStoreServer::bind("127.0.0.1:0").unwrap();
        let a = TcpStore::connect(server.addr(), Duration::from_secs(5)).unwrap();
        let b = TcpStore::connect(server.addr(), Duration::from_secs(5)).unwrap();
        exercise(&a, &b);
    }

    #[test]
    fn tcp_store_connect_fails_clearly_when_nobody_listens() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = TcpStore::connect(("127.0.0.1", port), Duration::from_millis(100))
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot reach the store"), "{err}");
    }
}
