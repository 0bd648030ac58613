//! The rendezvous over QUIC: what the [`Server`] (node 0's agent runs it on its own thread) and
//! the blocking [`Client`] (agents and trainers) agree on. The server lives in `server.rs`, the
//! client in `client.rs`, their TLS in `tls.rs`; this file holds the connection's contract
//! (timeouts, close codes, transport settings) and the tests that run both ends on loopback.
//!
//! A connection starts with the token proofs: the server sends HMAC(token, server role ‖ TLS
//! exported keying material) on a unidirectional stream; the client checks it before it sends
//! anything, then sends its own proof on the first bidirectional stream and waits for the
//! server's `ok`. Only then are requests served, one per bidirectional stream, each read with a
//! size limit and a deadline. The certificate is self-signed per job, so the proofs (bound to
//! the session) are what authenticates both ends; the TLS handshake signature is still checked.

use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, VarInt};

use super::RdzvError;

pub use super::client::{Client, Joined};
pub use super::server::{Server, ServerConfig};

/// Bound on the QUIC handshake and on each side's token proof.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent requests one connection may have open.
const MAX_STREAMS: u32 = 64;
/// Connections closed idle after this long (clients send keep-alives every second).
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// QUIC application close codes.
pub(super) const CLOSE_OK: u32 = 0;
pub(super) const CLOSE_BAD_TOKEN: u32 = 1;

/// Both ends' transport: closed after `idle` without traffic, keep-alives every `keep_alive`,
/// at most [`MAX_STREAMS`] open requests.
pub(super) fn transport(
    idle: Duration,
    keep_alive: Option<Duration>,
) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).expect("idle timeout in range"),
    ))
    .keep_alive_interval(keep_alive)
    .max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS));
    Arc::new(t)
}

/// The one-worker runtime an end drives its endpoint on (`name` names its thread).
pub(super) fn runtime(name: &str) -> Result<tokio::runtime::Runtime, RdzvError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| RdzvError::Tls(format!("cannot start the runtime: {e}")))
}

/// The application close code the peer closed the connection with, if it did.
pub(super) fn closed_with(e: &ConnectionError) -> Option<u32> {
    match e {
        ConnectionError::ApplicationClosed(c) => u32::try_from(c.error_code.into_inner()).ok(),
        _ => None,
    }
}

/// Both ends on loopback: the store and the join, the token exchange, and a server that keeps
/// serving through garbage, half-open connections and its connection limit.
#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::time::Instant;

    use quinn::Endpoint;

    use super::super::core::CoreConfig;
    use super::super::proto::{NodeInfo, Verdict, ALPN, MAX_MESSAGE};
    use super::super::tls::{client_crypto, SERVER_NAME};
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
        let cfg = quinn::ClientConfig::new(Arc::new(client_crypto(ALPN).unwrap()));
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
            let cfg = quinn::ClientConfig::new(Arc::new(client_crypto(b"ddetr-rdzv/0").unwrap()));
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
