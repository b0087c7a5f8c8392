//! The hash-chained audit log: every accepted document, delivery receipt, dead letter,
//! redrive and agency registration or suspension, each entry chained to the one before
//! by SHA-256, so that a changed, removed or reordered entry is found by walking the
//! chain ([`verify`]).
//!
//! Appends are serialised by one mutex around the chain head ([`Chain`]); the store
//! writes a document's or a delivery's entry in the same sled transaction as the event
//! itself, and an agency's entry right after its change.

use std::sync::{Mutex, MutexGuard, PoisonError};

use prost::Message;

use crate::records::AuditRecord;

/// The `prev_hash` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// What an entry records, before it is chained.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub kind: &'static str,
    pub message_id: String,
    pub agency: String,
    pub header_sha256: Vec<u8>,
    pub detail: String,
    pub at_ms: i64,
}

/// The hash of `entry`: SHA-256(prev_hash ‖ entry encoded without its hash).
pub fn hash_of(entry: &AuditRecord) -> [u8; 32] {
    let unhashed = AuditRecord {
        hash: Vec::new(),
        ..entry.clone()
    };
    let mut bytes = entry.prev_hash.clone();
    bytes.extend_from_slice(&unhashed.encode_to_vec());
    lienthong_proto::sha256(&bytes)
}

/// The next sequence number and the hash of the last entry.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub next_seq: u64,
    pub last_hash: [u8; 32],
}

impl Head {
    /// The head after `last`, or the empty chain's.
    pub fn after(last: Option<&AuditRecord>) -> Self {
        match last {
            Some(last) => Self {
                next_seq: last.seq.saturating_add(1),
                last_hash: last.hash.as_slice().try_into().unwrap_or(GENESIS),
            },
            None => Self {
                next_seq: 0,
                last_hash: GENESIS,
            },
        }
    }

    /// The chained entry for `event` at this head.
    pub fn chain(&self, event: Event) -> AuditRecord {
        let mut entry = AuditRecord {
            seq: self.next_seq,
            at_ms: event.at_ms,
            kind: event.kind.to_owned(),
            message_id: event.message_id,
            agency: event.agency,
            header_sha256: event.header_sha256,
            prev_hash: self.last_hash.to_vec(),
            hash: Vec::new(),
            detail: event.detail,
        };
        entry.hash = hash_of(&entry).to_vec();
        entry
    }
}

/// The chain head behind its mutex: hold the guard from building an entry until it is
/// written (or given up), then [`Head::advance`] on success.
pub struct Chain(Mutex<Head>);

impl Chain {
    pub fn new(head: Head) -> Self {
        Self(Mutex::new(head))
    }

    pub fn lock(&self) -> MutexGuard<'_, Head> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Head {
    /// Moves the head past `entry`, once it is written.
    pub fn advance(&mut self, entry: &AuditRecord) {
        *self = Self::after(Some(entry));
    }
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verification {
    pub entries: u64,
    /// The first entry that breaks the chain, and how.
    pub first_break: Option<(u64, String)>,
    pub head_hash: Vec<u8>,
}

/// Walks `entries` (key, value) in key order and reports the first break.
pub fn verify<E>(
    entries: impl Iterator<Item = Result<(sled::IVec, sled::IVec), E>>,
) -> Result<Verification, E> {
    let mut head = Head::after(None);
    let mut result = Verification {
        head_hash: GENESIS.to_vec(),
        ..Verification::default()
    };
    for item in entries {
        let (key, value) = item?;
        let position = head.next_seq;
        let broken = |detail: String| Some((position, detail));
        let entry = match AuditRecord::decode(value.as_ref()) {
            Ok(entry) => entry,
            Err(e) => {
                result.first_break = broken(format!("entry {position} cannot be decoded: {e}"));
                return Ok(result);
            }
        };
        let break_detail = if key.as_ref() != entry.seq.to_be_bytes() {
            Some(format!(
                "entry stored under another key than its seq {}",
                entry.seq
            ))
        } else if entry.seq != head.next_seq {
            Some(format!(
                "seq {} where {} was expected (entries missing or reordered)",
                entry.seq, head.next_seq
            ))
        } else if entry.prev_hash != head.last_hash {
            Some(format!(
                "entry {} does not follow the previous entry's hash",
                entry.seq
            ))
        } else if entry.hash != hash_of(&entry) {
            Some(format!(
                "entry {} was changed: its hash does not match its content",
                entry.seq
            ))
        } else {
            None
        };
        if let Some(detail) = break_detail {
            result.first_break = broken(detail);
            return Ok(result);
        }
        head.advance(&entry);
        result.entries += 1;
        result.head_hash = entry.hash;
    }
    Ok(result)
}
