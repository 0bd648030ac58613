//! The rendezvous: node 0's agent serves it over QUIC at MASTER_ADDR:MASTER_PORT (UDP); agents
//! join it and heartbeat through it, trainers use it as their bootstrap key-value store
//! (`DDETR_RDZV=quic://host:port`, authenticated with `DDETR_JOB_TOKEN`).
//!
//! [`proto`] is the wire format and the token proofs, [`core`] the state machine (no sockets, no
//! clock), and the tokio + quinn shell around it is [`Server`] (`server.rs`), the blocking
//! [`Client`] (`client.rs`), their TLS (`tls.rs`) and, in [`net`], what both ends agree on.

mod client;
pub mod core;
pub mod net;
pub mod proto;
mod server;
mod tls;

use std::net::SocketAddr;
use std::time::Duration;

pub use self::core::{Core, CoreConfig};
pub use net::{Client, Joined, Server, ServerConfig};
pub use proto::{NodeInfo, Verdict};

/// The scheme of `DDETR_RDZV` for this rendezvous.
pub const SCHEME: &str = "quic://";

/// `host:port` from `quic://host:port`, or None for another scheme.
pub fn parse_url(url: &str) -> Option<&str> {
    url.strip_prefix(SCHEME).filter(|rest| !rest.is_empty())
}

/// Everything that can go wrong talking to, or serving, the rendezvous.
#[derive(Debug, thiserror::Error)]
pub enum RdzvError {
    #[error("cannot listen for the rendezvous on UDP {addr}: {source}; pick a free --master-port")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("rendezvous TLS setup failed: {0}")]
    Tls(String),
    #[error(
        "cannot reach the rendezvous at {addr} within {:.0} s ({reason}): check that node 0's \
         agent is running and that UDP to MASTER_ADDR:MASTER_PORT is open",
        timeout.as_secs_f64()
    )]
    Unreachable {
        addr: String,
        timeout: Duration,
        reason: String,
    },
    #[error(
        "the rendezvous at {addr} could not prove it holds the job token: it serves another job, \
         or this node's DDETR_JOB_TOKEN/--token-file differs from node 0's"
    )]
    ServerNotAuthentic { addr: String },
    #[error(
        "the rendezvous at {addr} refused this process's job token: give every node the same \
         DDETR_JOB_TOKEN or --token-file"
    )]
    BadToken { addr: SocketAddr },
    #[error(
        "the rendezvous at {addr} refused the connection: it serves its connection limit already"
    )]
    Full { addr: SocketAddr },
    #[error("lost the rendezvous at {addr} (node 0's agent): {reason}")]
    Lost { addr: SocketAddr, reason: String },
    #[error("{0}")]
    Rejected(String),
    #[error("timed out after {:.1} s waiting at the rendezvous for {missing}: a rank did not start or crashed; check every rank's log", timeout.as_secs_f64())]
    Timeout { missing: String, timeout: Duration },
    #[error("rendezvous protocol error with {addr}: {what}")]
    Protocol { addr: SocketAddr, what: String },
}
