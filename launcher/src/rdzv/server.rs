//! The rendezvous server: node 0's agent runs it on its own thread, a one-worker tokio runtime
//! driving the QUIC endpoint around [`Core`]. One task per connection (admitted before any work,
//! then held to the token exchange of [`super::net`]), one per request stream (read with a size
//! limit and a deadline, answered when the core says), and a ticker that calls [`Core::tick`]
//! when a deadline passes. A bad connection or request ends its task, never the server.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{ConnectionError, Endpoint, VarInt};
use tokio::sync::{oneshot, Notify};

use super::core::{Core, CoreConfig, ReqId};
use super::net::{runtime, transport, CLOSE_BAD_TOKEN, CLOSE_OK, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT};
use super::proto::{
    self, Reply, Request, Verdict, CLIENT_ROLE, EXPORTER_LABEL, MAX_MESSAGE, PROOF_LEN, SERVER_ROLE,
};
use super::tls::server_crypto;
use super::RdzvError;

/// Bound on reading one request off its stream.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Stream reset code for a request that is too long, too slow or does not decode.
const RESET_BAD_REQUEST: u32 = 3;

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
        let quic = server_crypto()?;
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
        let rt = runtime("rdzv-server")?;
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
