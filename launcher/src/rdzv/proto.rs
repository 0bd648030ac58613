//! The rendezvous wire format: one bincode 2 message per QUIC stream (a request on a
//! bidirectional stream, its reply on the same stream), each at most [`MAX_MESSAGE`] bytes, and
//! the token proofs exchanged right after the TLS handshake.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The ALPN protocol id; a new wire format gets a new version here.
pub const ALPN: &[u8] = b"ddetr-rdzv/1";
/// Largest request or reply (keys and values are small bootstrap records).
pub const MAX_MESSAGE: usize = 1 << 20;
/// TLS exporter label the token proofs are bound to (RFC 8446 §7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-ddetr-rdzv-token-proof";
/// Bytes of keying material exported and of each proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// What the server proves with (it sends first), and what the client proves with.
pub const SERVER_ROLE: &[u8] = b"ddetr-rdzv server";
pub const CLIENT_ROLE: &[u8] = b"ddetr-rdzv client";

/// What an agent tells the rendezvous about its node; every field but the rank and the hostname
/// must equal node 0's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_rank: u32,
    pub hostname: String,
    /// Trainers on this node.
    pub nproc: u32,
    /// `cpu` or `cuda`.
    pub devices: String,
    /// ddetr-launch's version.
    pub version: String,
    /// Hash of the resolved job (trainer command, spec file contents, world shape).
    pub spec_hash: String,
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// An agent joins; answered once every node has joined (or the join timed out).
    Join(NodeInfo),
    Set {
        key: String,
        value: Vec<u8>,
    },
    Get {
        key: String,
    },
    /// Answered when every key is set, or with [`Reply::Timeout`] after `timeout_ms`.
    Wait {
        keys: Vec<String>,
        timeout_ms: u64,
    },
    /// Adds `delta` to the decimal integer stored at `key` (absent = 0); replies the new value.
    Add {
        key: String,
        delta: i64,
    },
    /// Sets `key` to `value` if its current value is `expected` (`None`: the key is absent).
    CompareSet {
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    },
    /// Answered when `count` requests for `name` have arrived, or after `timeout_ms`.
    Barrier {
        name: String,
        count: u32,
        timeout_ms: u64,
    },
    /// An agent is alive; the reply says what the job does next.
    Heartbeat {
        node_rank: u32,
    },
    /// A trainer of this node failed in `generation`: `summary` says who and how (for the
    /// restart notice), `report` is the one-line failure the job ends with if restarts are spent.
    Failed {
        node_rank: u32,
        generation: u64,
        summary: String,
        report: String,
    },
    /// Every trainer of this node exited 0 in `generation` (the exit barrier).
    Done {
        node_rank: u32,
        generation: u64,
    },
    /// The agent is leaving (it was told to stop); the job stops.
    Leave {
        node_rank: u32,
        reason: String,
    },
}

/// What the job does next, as the heartbeat reply says it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Run (or restart into) this generation.
    Run,
    /// Every node's trainers succeeded in the current generation.
    Complete,
    /// The job stops; the one-line reason.
    Abort(String),
}

/// The server's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Joined {
        /// Global rank of this node's local rank 0 (node-major).
        first_rank: u32,
        world_size: u32,
        generation: u64,
        max_restarts: u32,
    },
    Ok,
    Value(Option<Vec<u8>>),
    Added(i64),
    Swapped {
        swapped: bool,
        current: Option<Vec<u8>>,
    },
    /// A wait or barrier ran out of time; what was still missing.
    Timeout {
        missing: String,
    },
    Status {
        generation: u64,
        verdict: Verdict,
    },
    /// The request is refused; one line naming the node and the field.
    Rejected(String),
}

fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_MESSAGE>,
> {
    bincode::config::standard().with_limit::<MAX_MESSAGE>()
}

/// Encodes a message (fails only past [`MAX_MESSAGE`]).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, String> {
    let bytes = bincode::serde::encode_to_vec(msg, config()).map_err(|e| e.to_string())?;
    if bytes.len() > MAX_MESSAGE {
        return Err(format!(
            "message of {} bytes is over the {MAX_MESSAGE}-byte limit",
            bytes.len()
        ));
    }
    Ok(bytes)
}

/// Decodes exactly one message from `bytes`; trailing bytes are an error.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > MAX_MESSAGE {
        return Err(format!("message of {} bytes", bytes.len()));
    }
    let (msg, used) =
        bincode::serde::decode_from_slice(bytes, config()).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - used));
    }
    Ok(msg)
}

/// HMAC-SHA256(token, role ‖ keying material): proves knowledge of the token, bound to this TLS
/// session (a proof from another session, or reflected from the other side, does not verify).
pub fn proof(token: &[u8], role: &[u8], ekm: &[u8]) -> [u8; PROOF_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes any key length");
    mac.update(role);
    mac.update(ekm);
    mac.finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify(token: &[u8], role: &[u8], ekm: &[u8], got: &[u8]) -> bool {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC takes any key length");
    mac.update(role);
    mac.update(ekm);
    mac.verify_slice(got).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let req = Request::CompareSet {
            key: "k".into(),
            expected: None,
            value: vec![1, 2],
        };
        assert_eq!(decode::<Request>(&encode(&req).unwrap()).unwrap(), req);
        let mut bytes = encode(&req).unwrap();
        bytes.push(0);
        assert!(decode::<Request>(&bytes).unwrap_err().contains("trailing"));
        assert!(decode::<Request>(&[0xff, 0xff, 0xff]).is_err());
        // A length prefix claiming more than the limit is refused before allocating.
        let huge = [2u8, 1, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        assert!(decode::<Request>(&huge).is_err());
        let too_big = Request::Set {
            key: "k".into(),
            value: vec![0; MAX_MESSAGE],
        };
        assert!(encode(&too_big).is_err());
    }

    #[test]
    fn proofs_bind_token_role_and_session() {
        let p = proof(b"tok", SERVER_ROLE, &[7; 32]);
        assert!(verify(b"tok", SERVER_ROLE, &[7; 32], &p));
        assert!(!verify(b"other", SERVER_ROLE, &[7; 32], &p));
        assert!(!verify(b"tok", CLIENT_ROLE, &[7; 32], &p));
        assert!(!verify(b"tok", SERVER_ROLE, &[8; 32], &p));
        assert!(!verify(b"tok", SERVER_ROLE, &[7; 32], &p[..31]));
    }
}
