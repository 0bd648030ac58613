//! The thin tokio + quinn shell around [`Core`]: a server (node 0's agent runs it on its own
//! thread) and a blocking client (agents and trainers).
//!
//! A connection starts with the token proofs: the server sends HMAC(token, server role ‖ TLS
//! exported keying material) on a unidirectional stream; the client checks it before it sends
//! anything, then sends its own proof on the first bidirectional stream and waits for the
//! server's `ok`. Only then are requests served, one per bidirectional stream, each read with a
//! size limit and a deadline. The certificate is self-signed per job, so the proofs (bound to
//! the session) are what authenticates both ends; the TLS handshake signature is still checked.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, Endpoint, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::sync::{oneshot, Notify};

use super::core::{Core, CoreConfig, ReqId};
use super::proto::{
    self, NodeInfo, Reply, Request, Verdict, ALPN, CLIENT_ROLE, EXPORTER_LABEL, MAX_MESSAGE,
    PROOF_LEN, SERVER_ROLE,
};
use super::RdzvError;

/// The TLS server name clients ask for (the certificate carries it; nothing resolves it).
const SERVER_NAME: &str = "ddetr-rdzv";
/// Bound on the QUIC handshake and on each side's token proof.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on reading one request off its stream.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's round trip, on top of what the request itself waits (a wait's or barrier's timeout).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent requests one connection may have open.
const MAX_STREAMS: u32 = 64;
/// Connections closed idle after this long (clients send keep-alives every second).
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// How long a dropped client lets its close frame go out.
const CLOSE_FLUSH: Duration = Duration::from_millis(20);

/// QUIC application close codes.
const CLOSE_OK: u32 = 0;
const CLOSE_BAD_TOKEN: u32 = 1;
/// Stream reset code for a request that is too long, too slow or does not decode.
const RESET_BAD_REQUEST: u32 = 3;

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(idle: Duration, keep_alive: Option<Duration>) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).expect("idle timeout in range"),
    ))
    .keep_alive_interval(keep_alive)
    .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    Arc::new(t)
}

/// What [`Server::start`] needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    pub token: Vec<u8>,
    pub core: CoreConfig,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the ticker when a request may have moved a deadline.
    changed: Notify,
    shutdown: Notify,
}

struct Inner {
    core: Core,
    pending: HashMap<ReqId, oneshot::Sender<Reply>>,
    next_id: ReqId,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&self, req: Request) -> (ReqId, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.pending.insert(id, tx);
        let out = inner.core.handle(Instant::now(), id, req);
        inner.dispatch(out);
        drop(inner);
        self.changed.notify_one();
        (id, rx)
    }

    fn cancel(&self, id: ReqId) {
        let mut inner = self.lock();
        inner.pending.remove(&id);
        inner.core.cancel(id);
    }
}

impl Inner {
    fn dispatch(&mut self, out: Vec<(ReqId, Reply)>) {
        for (id, reply) in out {
            if let Some(tx) = self.pending.remove(&id) {
                let _ = tx.send(reply);
            }
        }
    }
}

/// The rendezvous server: a thread running the QUIC endpoint. Dropping it closes the endpoint.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds UDP `cfg.bind` and starts serving.
    pub fn start(cfg: ServerConfig) -> Result<Self, RdzvError> {
        let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
            .map_err(|e| RdzvError::Tls(e.to_string()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| RdzvError::Tls(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .map_err(|e| RdzvError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(|e| RdzvError::Tls(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server_config.transport_config(transport(IDLE_TIMEOUT, None));

        let socket = UdpSocket::bind(cfg.bind).map_err(|source| RdzvError::Bind {
            addr: cfg.bind,
            source,
        })?;
        let addr = socket.local_addr().map_err(|source| RdzvError::Bind {
            addr: cfg.bind,
            source,
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rdzv-server")
            .enable_all()
            .build()
            .map_err(|e| RdzvError::Tls(format!("cannot start the runtime: {e}")))?;
        let endpoint = {
            let _guard = rt.enter();
            Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server_config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|source| RdzvError::Bind {
                addr: cfg.bind,
                source,
            })?
        };
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                core: Core::new(cfg.core, Instant::now()),
                pending: HashMap::new(),
                next_id: 1,
            }),
            changed: Notify::new(),
            shutdown: Notify::new(),
        });
        let token = Arc::new(cfg.token);
        let s2 = Arc::clone(&shared);
        let limit = cfg.max_connections;
        let thread = std::thread::Builder::new()
            .name("rdzv-server".into())
            .spawn(move || rt.block_on(serve(endpoint, s2, token, limit)))
            .map_err(|e| RdzvError::Tls(format!("cannot start the server thread: {e}")))?;
        tracing::info!(%addr, "rendezvous listening (QUIC)");
        Ok(Self {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The job's final verdict, once there is one.
    pub fn verdict(&self) -> Option<Verdict> {
        self.shared.lock().core.verdict().cloned()
    }

    /// True once every node heard the final verdict (or had three heartbeats to).
    pub fn finished(&self) -> bool {
        self.shared.lock().core.finished(Instant::now())
    }

    /// Stops accepting, closes every connection and joins the server thread. Idempotent.
    pub fn shutdown(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.shutdown.notify_one();
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(endpoint: Endpoint, shared: Arc<Shared>, token: Arc<Vec<u8>>, limit: usize) {
    let ticker = tokio::spawn(tick(Arc::clone(&shared)));
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shared.shutdown.notified() => None,
        };
        let Some(incoming) = incoming else { break };
        let remote = incoming.remote_address();
        // Admission before any work: a full server refuses without a handshake.
        if active.load(Ordering::SeqCst) >= limit {
            tracing::warn!(%remote, limit, "rendezvous connection limit reached: refusing");
            incoming.refuse();
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        let (shared, token, active) =
            (Arc::clone(&shared), Arc::clone(&token), Arc::clone(&active));
        tokio::spawn(async move {
            if let Err(e) = connection(incoming, &shared, &token).await {
                tracing::debug!(%remote, "rendezvous connection ended: {e}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    ticker.abort();
    endpoint.close(VarInt::from_u32(CLOSE_OK), b"rendezvous closed");
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
}

async fn tick(shared: Arc<Shared>) {
    loop {
        let now = Instant::now();
        let next = {
            let mut inner = shared.lock();
            let out = inner.core.tick(now);
            inner.dispatch(out);
            inner.core.next_deadline()
        };
        let cap = now + Duration::from_secs(1);
        let at = next.map_or(cap, |n| n.clamp(now + Duration::from_millis(1), cap));
        tokio::select! {
            _ = tokio::time::sleep_until(at.into()) => {}
            _ = shared.changed.notified() => {}
        }
    }
}

async fn connection(
    incoming: quinn::Incoming,
    shared: &Arc<Shared>,
    token: &[u8],
) -> Result<(), String> {
    let conn = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        incoming.accept().map_err(|e| e.to_string())?,
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let mut ekm = [0u8; PROOF_LEN];
    conn.export_keying_material(&mut ekm, EXPORTER_LABEL, b"")
        .map_err(|_| "cannot export keying material".to_string())?;
    let authed = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut uni = conn.open_uni().await.map_err(|e| e.to_string())?;
        uni.write_all(&proto::proof(token, SERVER_ROLE, &ekm))
            .await
            .map_err(|e| e.to_string())?;
        uni.finish().map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let got = recv
            .read_to_end(PROOF_LEN)
            .await
            .map_err(|e| e.to_string())?;
        if !proto::verify(token, CLIENT_ROLE, &ekm, &got) {
            return Ok(false);
        }
        send.write_all(b"ok").await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        Ok::<bool, String>(true)
    })
    .await;
    match authed {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            tracing::warn!(remote = %conn.remote_address(), "rendezvous client proved a wrong job token: closing");
            conn.close(VarInt::from_u32(CLOSE_BAD_TOKEN), b"wrong job token");
            return Ok(());
        }
        Ok(Err(e)) => return Err(format!("during the token exchange: {e}")),
        Err(_) => {
            conn.close(VarInt::from_u32(CLOSE_BAD_TOKEN), b"no token proof in time");
            return Err("no token proof in time".into());
        }
    }
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(ConnectionError::ApplicationClosed(_)) | Err(ConnectionError::LocallyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(e.to_string()),
        };
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            if let Err(e) = request(send, recv, &shared).await {
                tracing::debug!("rendezvous request dropped: {e}");
            }
        });
    }
}

async fn request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Shared,
) -> Result<(), String> {
    // A request that cannot be read in time, is too long, or does not decode is answered with a
    // stream reset (a dropped send stream would look like an empty reply).
    let read = tokio::time::timeout(READ_TIMEOUT, recv.read_to_end(MAX_MESSAGE)).await;
    let decoded = match read {
        Err(_) => Err("request not read in time".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(bytes)) => {
            proto::decode::<Request>(&bytes).map_err(|e| format!("undecodable request: {e}"))
        }
    };
    let req = match decoded {
        Ok(r) => r,
        Err(e) => {
            let _ = send.reset(VarInt::from_u32(RESET_BAD_REQUEST));
            return Err(e);
        }
    };
    let (id, rx) = shared.submit(req);
    let reply = tokio::select! {
        r = rx => match r {
            Ok(reply) => reply,
            Err(_) => {
                let _ = send.reset(VarInt::from_u32(RESET_BAD_REQUEST));
                return Err("server closing".into());
            }
        },
        _ = send.stopped() => {
            shared.cancel(id);
            return Err("client gave up".into());
        }
    };
    let bytes = proto::encode(&reply)?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    Ok(())
}

/// Accepts the per-job self-signed certificate; the token proofs authenticate the server.
/// Handshake signatures are still verified, so the keying material is bound to the key that
/// signed it.
#[derive(Debug)]
struct TokenAuthenticated(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for TokenAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A blocking rendezvous client: one authenticated QUIC connection driven by a private
/// one-thread runtime (so keep-alives flow while the caller computes).
pub struct Client {
    rt: tokio::runtime::Runtime,
    endpoint: Endpoint,
    conn: quinn::Connection,
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

    fn connect_checked(
        addr: &str,
        token: &[u8],
        timeout: Duration,
        check_server: bool,
    ) -> Result<Self, RdzvError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("rdzv-client")
            .enable_all()
            .build()
            .map_err(|e| RdzvError::Tls(format!("cannot start the runtime: {e}")))?;
        let provider = crypto_provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| RdzvError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TokenAuthenticated(provider)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(|e| RdzvError::Tls(e.to_string()))?;
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

fn closed_with(e: &ConnectionError) -> Option<u32> {
    match e {
        ConnectionError::ApplicationClosed(c) => u32::try_from(c.error_code.into_inner()).ok(),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: u32) -> NodeInfo {
        NodeInfo {
            node_rank: rank,
            hostname: format!("host{rank}"),
            nproc: 1,
            devices: "cpu".into(),
            version: "t".into(),
            spec_hash: "h".into(),
        }
    }

    fn server(nodes: u32, max_connections: usize) -> Server {
        Server::start(ServerConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            token: b"secret".to_vec(),
            core: CoreConfig {
                nodes,
                reference: info(0),
                max_restarts: 0,
                heartbeat: Duration::from_millis(200),
                missed_heartbeats: 3,
                join_timeout: Duration::from_secs(20),
            },
            max_connections,
        })
        .unwrap()
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn clients_join_and_share_the_store() {
        let s = server(2, 16);
        let addr = s.addr().to_string();
        let a = Client::connect(&addr, b"secret", T).unwrap();
        let b = Client::connect(&addr, b"secret", T).unwrap();
        let joined = std::thread::scope(|sc| {
            let h = sc.spawn(|| b.join(info(1), T).unwrap());
            let j0 = a.join(info(0), T).unwrap();
            (j0, h.join().unwrap())
        });
        assert_eq!((joined.0.first_rank, joined.1.first_rank), (0, 1));
        assert_eq!(joined.0.world_size, 2);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                b.set("k", b"v").unwrap();
            });
            a.wait(&["k"], T).unwrap();
        });
        assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(a.add("n", 2).unwrap(), 2);
        assert_eq!(b.add("n", 3).unwrap(), 5);
        assert_eq!(
            a.compare_set("c", None, b"1").unwrap(),
            (true, Some(b"1".to_vec()))
        );
        assert_eq!(
            b.compare_set("c", None, b"2").unwrap(),
            (false, Some(b"1".to_vec()))
        );
        let e = a.wait(&["never"], Duration::from_millis(100)).unwrap_err();
        assert!(
            matches!(e, RdzvError::Timeout { ref missing, .. } if missing == "never"),
            "{e}"
        );
        std::thread::scope(|sc| {
            sc.spawn(|| b.barrier("x", 2, T).unwrap());
            a.barrier("x", 2, T).unwrap();
        });
        assert_eq!(a.heartbeat(0, T).unwrap(), (0, Verdict::Run));
    }

    #[test]
    fn a_wrong_token_is_refused_by_either_side() {
        let s = server(1, 16);
        let addr = s.addr().to_string();
        // The client checks the server's proof first and sends nothing.
        let e = Client::connect(&addr, b"other", T).err().unwrap();
        assert!(matches!(e, RdzvError::ServerNotAuthentic { .. }), "{e}");
        // A client that skips that check still cannot get past the server.
        let e = Client::connect_checked(&addr, b"other", T, false)
            .err()
            .unwrap();
        assert!(matches!(e, RdzvError::BadToken { .. }), "{e}");
        assert!(e.to_string().contains("same DDETR_JOB_TOKEN"), "{e}");
        // The server still serves the right token.
        let ok = Client::connect(&addr, b"secret", T).unwrap();
        ok.set("a", b"1").unwrap();
    }

    #[test]
    fn random_datagrams_and_half_open_connections_do_not_hurt_the_server() {
        let s = server(1, 4);
        let addr = s.addr();
        // Garbage, including things shaped like QUIC long headers.
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for i in 0..500 {
            let len = 1 + (i * 37) % 1400;
            let mut buf = vec![0u8; len];
            for b in &mut buf {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            if i % 3 == 0 {
                buf[0] = 0xc0 | (buf[0] & 0x0f);
                if len > 5 {
                    buf[1..5].copy_from_slice(&1u32.to_be_bytes());
                }
            }
            let _ = sock.send_to(&buf, addr);
        }
        // Half-open: connections that finish TLS and then say nothing (no proof). They are cut
        // after the handshake timeout and never reach the store.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let provider = crypto_provider();
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TokenAuthenticated(provider)))
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        let idle: Vec<quinn::Connection> = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..2 {
                let ep = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                v.push(
                    ep.connect_with(cfg.clone(), addr, SERVER_NAME)
                        .unwrap()
                        .await
                        .unwrap(),
                );
            }
            v
        });
        // A wrong ALPN is refused by TLS.
        let refused = rt.block_on(async {
            let provider = crypto_provider();
            let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(TokenAuthenticated(provider)))
                .with_no_client_auth();
            tls.alpn_protocols = vec![b"ddetr-rdzv/0".to_vec()];
            let cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
            let ep = Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            ep.connect_with(cfg, addr, SERVER_NAME).unwrap().await
        });
        assert!(refused.is_err());
        let ok = Client::connect(&addr.to_string(), b"secret", T).unwrap();
        ok.set("k", b"v").unwrap();
        assert_eq!(ok.get("k").unwrap().as_deref(), Some(&b"v"[..]));
        // The half-open ones are closed by the server once their proof is overdue.
        rt.block_on(async {
            for c in &idle {
                let e = tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, c.closed())
                    .await
                    .unwrap();
                assert_eq!(closed_with(&e), Some(CLOSE_BAD_TOKEN), "{e}");
            }
        });
        drop(ok);
    }

    #[test]
    fn garbage_and_oversized_requests_are_dropped_and_the_connection_still_serves() {
        let s = server(1, 4);
        let c = Client::connect(&s.addr().to_string(), b"secret", T).unwrap();
        let conn = c.conn.clone();
        for body in [vec![0xffu8; 64], vec![7u8; MAX_MESSAGE + 1]] {
            let got = c.rt.block_on(async {
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                // The server may stop reading an oversized body before it is all sent.
                let _ = send.write_all(&body).await;
                let _ = send.finish();
                tokio::time::timeout(T, recv.read_to_end(MAX_MESSAGE)).await
            });
            assert!(matches!(got, Ok(Err(_))), "{got:?}");
        }
        c.set("still", b"here").unwrap();
        assert_eq!(c.get("still").unwrap().as_deref(), Some(&b"here"[..]));
    }

    #[test]
    fn the_connection_limit_refuses_extra_clients() {
        let s = server(1, 2);
        let addr = s.addr().to_string();
        let a = Client::connect(&addr, b"secret", T).unwrap();
        let b = Client::connect(&addr, b"secret", T).unwrap();
        let e = Client::connect(&addr, b"secret", Duration::from_millis(500))
            .err()
            .unwrap();
        assert!(
            matches!(e, RdzvError::Unreachable { .. } | RdzvError::Full { .. }),
            "{e}"
        );
        drop(a);
        // A freed slot serves again.
        let c = Client::connect(&addr, b"secret", T).unwrap();
        c.set("x", b"1").unwrap();
        b.set("y", b"2").unwrap();
    }

    #[test]
    fn nobody_listening_is_unreachable_within_the_timeout() {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Instant::now();
        let e = Client::connect(
            &format!("127.0.0.1:{port}"),
            b"x",
            Duration::from_millis(300),
        )
        .err()
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(
            e.to_string()
                .starts_with("cannot reach the rendezvous at 127.0.0.1:"),
            "{e}"
        );
    }
}
