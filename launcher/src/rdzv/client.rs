//! The blocking rendezvous client that agents and trainers use: one authenticated QUIC connection
//! driven by a private one-worker runtime, retried while node 0's server is not up yet, then one
//! request per bidirectional stream (the store, the join, barriers, heartbeats and reports).

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{ConnectionError, Endpoint, VarInt};

use super::net::{
    closed_with, runtime, transport, CLOSE_BAD_TOKEN, CLOSE_OK, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT,
};
use super::proto::{
    self, NodeInfo, Reply, Request, Verdict, ALPN, CLIENT_ROLE, EXPORTER_LABEL, MAX_MESSAGE,
    PROOF_LEN, SERVER_ROLE,
};
use super::tls::{client_crypto, SERVER_NAME};
use super::RdzvError;

/// A request's round trip, on top of what the request itself waits (a wait's or barrier's timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alives sent this often keep the connection from idling out while the caller computes.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// How long a dropped client lets its close frame go out.
const CLOSE_FLUSH: Duration = Duration::from_millis(20);

/// A blocking rendezvous client: one authenticated QUIC connection driven by a private
/// one-thread runtime (so keep-alives flow while the caller computes).
pub struct Client {
    pub(super) rt: tokio::runtime::Runtime,
    endpoint: Endpoint,
    pub(super) conn: quinn::Connection,
    addr: SocketAddr,
}

enum Attempt {
    Retry(String),
    Fatal(RdzvError),
}

impl Client {
    /// Connects to `addr` (`host:port`) and exchanges the token proofs, retrying for `timeout`
    /// while the server is not up yet. A server without the token is an error at once.
    pub fn connect(addr: &str, token: &[u8], timeout: Duration) -> Result<Self, RdzvError> {
        Self::connect_checked(addr, token, timeout, true)
    }

    /// [`Client::connect`], checking the server's proof only when `check_server` (tests skip it
    /// to see the server refuse a wrong token).
    pub(super) fn connect_checked(
        addr: &str,
        token: &[u8],
        timeout: Duration,
        check_server: bool,
    ) -> Result<Self, RdzvError> {
        let rt = runtime("rdzv-client")?;
        let quic = client_crypto(ALPN)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
        client_config.transport_config(transport(IDLE_TIMEOUT, Some(KEEP_ALIVE)));

        let deadline = Instant::now() + timeout;
        let mut last = String::from("no attempt");
        loop {
            let target = match addr.to_socket_addrs().map(|mut a| a.next()) {
                Ok(Some(a)) => Some(a),
                Ok(None) => {
                    last = "the name resolves to no address".into();
                    None
                }
                Err(e) => {
                    last = format!("cannot resolve it: {e}");
                    None
                }
            };
            if let Some(target) = target {
                let bind: SocketAddr = if target.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let endpoint = {
                    let _guard = rt.enter();
                    Endpoint::client(bind)
                        .map_err(|source| RdzvError::Bind { addr: bind, source })?
                };
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = rt.block_on(async {
                    match tokio::time::timeout(
                        left.clamp(Duration::from_millis(100), HANDSHAKE_TIMEOUT),
                        handshake(&endpoint, &client_config, target, token, check_server),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(Attempt::Retry("no answer".into())),
                    }
                });
                match attempt {
                    Ok(conn) => {
                        return Ok(Self {
                            rt,
                            endpoint,
                            conn,
                            addr: target,
                        })
                    }
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Retry(why)) => last = why,
                }
            }
            if Instant::now() >= deadline {
                return Err(RdzvError::Unreachable {
                    addr: addr.to_string(),
                    timeout,
                    reason: last,
                });
            }
            tracing::trace!(addr, "rendezvous not reachable yet: {last}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request and waits for its reply (`waits`: how long the request itself may
    /// wait at the server, added to the round-trip bound).
    pub fn request(&self, req: &Request, waits: Duration) -> Result<Reply, RdzvError> {
        self.request_within(req, REQUEST_TIMEOUT + waits)
    }

    /// Like [`Client::request`] with a deadline of `within` for the whole round trip (for
    /// heartbeats, which must not block the agent longer than one heartbeat).
    pub fn request_within(&self, req: &Request, within: Duration) -> Result<Reply, RdzvError> {
        let addr = self.addr;
        let fut = async { self.request_async(req).await };
        match self
            .rt
            .block_on(async { tokio::time::timeout(within, fut).await })
        {
            Ok(r) => r,
            Err(_) => Err(RdzvError::Lost {
                addr,
                reason: format!("no reply within {:.1} s", within.as_secs_f64()),
            }),
        }
    }

    async fn request_async(&self, req: &Request) -> Result<Reply, RdzvError> {
        let addr = self.addr;
        let bytes = proto::encode(req).map_err(|what| RdzvError::Protocol { addr, what })?;
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(|e| lost(addr, e))?;
        send.write_all(&bytes).await.map_err(|e| lost(addr, e))?;
        send.finish().map_err(|e| lost(addr, e))?;
        let got = recv
            .read_to_end(MAX_MESSAGE)
            .await
            .map_err(|e| lost(addr, e))?;
        proto::decode::<Reply>(&got).map_err(|what| RdzvError::Protocol { addr, what })
    }

    fn expect_ok(&self, reply: Reply) -> Result<(), RdzvError> {
        match reply {
            Reply::Ok => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    fn unexpected(&self, reply: Reply) -> RdzvError {
        match reply {
            Reply::Rejected(why) => RdzvError::Rejected(why),
            other => RdzvError::Protocol {
                addr: self.addr,
                what: format!("unexpected reply {other:?}"),
            },
        }
    }

    /// Joins the job; returns once every node has joined.
    pub fn join(&self, info: NodeInfo, timeout: Duration) -> Result<Joined, RdzvError> {
        match self.request(&Request::Join(info), timeout)? {
            Reply::Joined {
                first_rank,
                world_size,
                generation,
                max_restarts,
            } => Ok(Joined {
                first_rank,
                world_size,
                generation,
                max_restarts,
            }),
            other => Err(self.unexpected(other)),
        }
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), RdzvError> {
        let r = self.request(
            &Request::Set {
                key: key.into(),
                value: value.to_vec(),
            },
            Duration::ZERO,
        )?;
        self.expect_ok(r)
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RdzvError> {
        match self.request(&Request::Get { key: key.into() }, Duration::ZERO)? {
            Reply::Value(v) => Ok(v),
            other => Err(self.unexpected(other)),
        }
    }

    pub fn wait(&self, keys: &[&str], timeout: Duration) -> Result<(), RdzvError> {
        let req = Request::Wait {
            keys: keys.iter().map(|k| k.to_string()).collect(),
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.request(&req, timeout)? {
            Reply::Ok => Ok(()),
            Reply::Timeout { missing } => Err(RdzvError::Timeout { missing, timeout }),
            other => Err(self.unexpected(other)),
        }
    }

    pub fn add(&self, key: &str, delta: i64) -> Result<i64, RdzvError> {
        match self.request(
            &Request::Add {
                key: key.into(),
                delta,
            },
            Duration::ZERO,
        )? {
            Reply::Added(n) => Ok(n),
            other => Err(self.unexpected(other)),
        }
    }

    /// Sets `key` to `value` if it currently holds `expected` (`None`: absent). Returns whether
    /// it swapped and the value now stored.
    pub fn compare_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<(bool, Option<Vec<u8>>), RdzvError> {
        let req = Request::CompareSet {
            key: key.into(),
            expected: expected.map(<[u8]>::to_vec),
            value: value.to_vec(),
        };
        match self.request(&req, Duration::ZERO)? {
            Reply::Swapped { swapped, current } => Ok((swapped, current)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Returns when `count` callers have entered barrier `name`.
    pub fn barrier(&self, name: &str, count: u32, timeout: Duration) -> Result<(), RdzvError> {
        let req = Request::Barrier {
            name: name.into(),
            count,
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.request(&req, timeout)? {
            Reply::Ok => Ok(()),
            Reply::Timeout { missing } => Err(RdzvError::Timeout { missing, timeout }),
            other => Err(self.unexpected(other)),
        }
    }

    /// Heartbeat; the reply says the current generation and what the job does next.
    pub fn heartbeat(&self, node_rank: u32, within: Duration) -> Result<(u64, Verdict), RdzvError> {
        match self.request_within(&Request::Heartbeat { node_rank }, within)? {
            Reply::Status {
                generation,
                verdict,
            } => Ok((generation, verdict)),
            other => Err(self.unexpected(other)),
        }
    }

    /// Sends a supervision report (Failed, Done or Leave).
    pub fn report(&self, req: &Request, within: Duration) -> Result<(), RdzvError> {
        let r = self.request_within(req, within)?;
        self.expect_ok(r)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Tell the server now rather than letting the connection idle out: the close frame
        // goes out on the driver's next turn (the draining period after it need not be awaited).
        self.conn.close(VarInt::from_u32(CLOSE_OK), b"bye");
        let endpoint = self.endpoint.clone();
        self.rt.block_on(async {
            let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
        });
    }
}

/// What a successful join returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub first_rank: u32,
    pub world_size: u32,
    pub generation: u64,
    pub max_restarts: u32,
}

fn lost(addr: SocketAddr, e: impl std::fmt::Display) -> RdzvError {
    RdzvError::Lost {
        addr,
        reason: e.to_string(),
    }
}

async fn handshake(
    endpoint: &Endpoint,
    config: &quinn::ClientConfig,
    target: SocketAddr,
    token: &[u8],
    check_server: bool,
) -> Result<quinn::Connection, Attempt> {
    let connecting = endpoint
        .connect_with(config.clone(), target, SERVER_NAME)
        .map_err(|e| Attempt::Retry(e.to_string()))?;
    let conn = connecting.await.map_err(|e| match e {
        // The server's admission check: it serves its connection limit already.
        ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Attempt::Fatal(RdzvError::Full { addr: target })
        }
        e => Attempt::Retry(e.to_string()),
    })?;
    let mut ekm = [0u8; PROOF_LEN];
    conn.export_keying_material(&mut ekm, EXPORTER_LABEL, b"")
        .map_err(|_| Attempt::Retry("cannot export keying material".into()))?;
    let fatal_on_close = |e: &dyn std::fmt::Display, code: Option<u32>| match code {
        Some(CLOSE_BAD_TOKEN) => Attempt::Fatal(RdzvError::BadToken { addr: target }),
        _ => Attempt::Retry(e.to_string()),
    };
    // The server proves itself first; nothing is sent before its proof checks out.
    let mut uni = conn
        .accept_uni()
        .await
        .map_err(|e| fatal_on_close(&e, closed_with(&e)))?;
    let got = uni
        .read_to_end(PROOF_LEN)
        .await
        .map_err(|e| Attempt::Retry(e.to_string()))?;
    if check_server && !proto::verify(token, SERVER_ROLE, &ekm, &got) {
        conn.close(VarInt::from_u32(CLOSE_BAD_TOKEN), b"server proof wrong");
        return Err(Attempt::Fatal(RdzvError::ServerNotAuthentic {
            addr: target.to_string(),
        }));
    }
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| fatal_on_close(&e, closed_with(&e)))?;
    send.write_all(&proto::proof(token, CLIENT_ROLE, &ekm))
        .await
        .map_err(|e| Attempt::Retry(e.to_string()))?;
    send.finish().map_err(|e| Attempt::Retry(e.to_string()))?;
    match recv.read_to_end(16).await {
        Ok(ack) if ack == b"ok" => Ok(conn),
        Ok(_) => Err(Attempt::Retry("unexpected token acknowledgement".into())),
        Err(e) => {
            let code = match &e {
                quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => closed_with(c),
                _ => None,
            };
            Err(fatal_on_close(&e, code))
        }
    }
}
