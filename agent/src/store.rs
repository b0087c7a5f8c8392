//! The agent's durable store: one sled database in the data directory.
//!
//! Trees and keys:
//! - `meta`: `format` → [`FORMAT`] (a database without it, or with another value, is
//!   refused); `next_number` → u64 BE, the per-agent counter for document numbers.
//! - `outbox`: `r<id>` → [`OutboxRecord`] (JSON), `e<id>` → the sealed envelope
//!   (prost-encoded `Signed`, exactly as sealed), `p<id>` → empty while the document
//!   still waits for submission. Message ids are UUIDv7, so key order is age order.
//! - `inbox`: `r<id>` → [`InboxRecord`] (JSON), `e<id>` → the envelope exactly as
//!   received.
//! - `outbox_attachments`, `inbox_attachments`: `<id> \0 index(u32 BE) chunk(u32 BE)` →
//!   at most [`CHUNK_BYTES`] of the attachment (small values stay inline in sled's log).
//! - `receipts`: `s<id>` → the broker's submission receipt, `d<id>` → our own delivery
//!   receipt (both prost-encoded `Signed`).
//! - `inbox` and `outbox` also hold `o<seq u64 BE>` → message id: documents in the
//!   order they were stored, for listing page by page (see [`listing`]).
//! - `idempotency`: the answers kept for `Idempotency-Key` retries (see
//!   [`idempotency`]).
//!
//! Invariants:
//! - A document (record, envelope, attachments) is written in one transaction: it is
//!   there whole or not at all. A group of received deliveries is one transaction
//!   ([`Store::put_inbox_batch`]): every new document of the group with its submission
//!   and delivery receipts, so a document stored this way always has both receipts.
//! - Nothing is acknowledged before [`Store::durable`] returned: sled's flush only
//!   issues `sync_file_range`, so `durable` also `fdatasync`s the main data file and any
//!   new blob file. Concurrent callers share one sync (group commit).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use sled::transaction::ConflictableTransactionResult;
use sled::{IVec, Transactional};

use crate::error::{AgentError, StoreError};

mod idempotency;
mod listing;
pub use idempotency::{IDEMPOTENCY_MAX_AGE_MS, IDEMPOTENCY_MAX_ENTRIES, IdempotencyRecord};
pub use listing::{AttachmentChunks, Page};

/// The value of `meta/format` in an agent store.
pub const FORMAT: &str = "lienthong-agent/1";
/// The largest attachment chunk stored in one sled value.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Where a document this agent sent stands locally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxState {
    /// Accepted locally, not yet accepted by the broker.
    #[default]
    Outbox,
    /// The broker returned a submission receipt.
    Submitted,
    /// The broker refused it for good.
    Failed,
}

impl OutboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxState::Outbox => "outbox",
            OutboxState::Submitted => "submitted",
            OutboxState::Failed => "failed",
        }
    }
}

/// A document this agent sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutboxRecord {
    pub message_id: String,
    pub business_id: String,
    pub recipients: Vec<String>,
    pub created_at_ms: i64,
    /// Hex SHA-256 of the signed header bytes.
    pub header_sha256: String,
    pub state: OutboxState,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub submitted_at_ms: Option<i64>,
    /// Total attachment bytes.
    #[serde(default)]
    pub bytes: u64,
    /// The attachments are files (see `files`), not chunks in sled.
    #[serde(default)]
    pub streamed: bool,
    /// Trích yếu (empty in records written before it was kept).
    #[serde(default)]
    pub subject: String,
    /// `DocumentKind`: 0 a document (listed as sent), 1 a status report.
    #[serde(default)]
    pub kind: i32,
}

impl OutboxRecord {
    /// The record of a document just sealed, waiting for submission.
    pub fn waiting(
        header: &lienthong_proto::pb::DocumentHeader,
        envelope: &lienthong_proto::pb::Signed,
        bytes: u64,
        streamed: bool,
    ) -> Self {
        Self {
            message_id: header.message_id.clone(),
            business_id: header.business_id.clone(),
            recipients: header.recipients.clone(),
            created_at_ms: header.created_at_ms,
            header_sha256: hex::encode(lienthong_proto::sha256(&envelope.payload)),
            state: OutboxState::Outbox,
            failure_reason: None,
            submitted_at_ms: None,
            bytes,
            streamed,
            subject: header.subject.clone(),
            kind: header.kind,
        }
    }
}

/// One document of [`Store::put_outbox_batch`].
pub struct NewOutbox<'a> {
    pub record: &'a OutboxRecord,
    /// The sealed envelope, prost-encoded, exactly as sealed.
    pub envelope: &'a [u8],
    /// Kept in sled (empty for a streamed document: its files are in `files`).
    pub attachments: &'a [Bytes],
    /// A recall, update or replace: the message id it refers to (linked to it).
    pub refers_to: Option<&'a str>,
}

/// How an outbox entry settles after a submission attempt (see [`Store::settle_outbox`]).
#[derive(Debug, Clone, Copy)]
pub enum OutboxSettle<'a> {
    /// The broker accepted it: its submission receipt and the receipt's time.
    Submitted { receipt: &'a [u8], at_ms: i64 },
    /// The broker refused it for good.
    Failed { reason: &'a str },
}

/// A document this agent received.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InboxRecord {
    pub message_id: String,
    pub received_at_ms: i64,
    pub sender: String,
    pub subject: String,
    pub business_id: String,
    /// Hex SHA-256 of the signed header bytes.
    pub header_sha256: String,
    /// Attachment names in header order.
    pub attachments: Vec<String>,
    pub exported: bool,
    /// The attachments arrived as files (see `files`) and are not kept in sled.
    #[serde(default)]
    pub streamed: bool,
    /// `DocumentKind`: 0 a document (exported, listed), 1 a status report about a
    /// document we sent (kept as evidence, shown in that document's status).
    #[serde(default)]
    pub kind: i32,
    /// `BusinessType` of the document: 0 new, 1 recall, 2 update, 3 replace.
    #[serde(default)]
    pub business_type: i32,
    /// Recall, update, replace, status report: the message id it is about.
    #[serde(default)]
    pub refers_to: Option<String>,
    /// The sender recalled this document with that recall's message id; its folder
    /// moved to `<inbox>/recalled/<id>/`.
    #[serde(default)]
    pub recalled_by: Option<String>,
    /// A later version (update or replace) of this document.
    #[serde(default)]
    pub superseded_by: Option<String>,
    /// The later version removed this agency from the recipients.
    #[serde(default)]
    pub removed_by: Option<String>,
}

/// What one delivery of a group writes (see [`Store::put_inbox_batch`]).
#[derive(Debug, Clone, Default)]
pub struct InboxWrite {
    pub message_id: String,
    /// A document not stored before.
    pub document: Option<InboxDocument>,
    /// The broker's submission receipt that came with it, when not stored yet.
    pub submission_receipt: Option<Bytes>,
    /// This agency's signed delivery receipt, when not stored yet.
    pub delivery_receipt: Option<Bytes>,
}

/// A received document as stored: its record, the envelope exactly as received and
/// its attachments (empty when they arrived streamed, as files).
#[derive(Debug, Clone, Default)]
pub struct InboxDocument {
    pub record: InboxRecord,
    pub envelope: Bytes,
    pub attachments: Vec<Bytes>,
}

/// The agent's sled database and the files synced after each flush.
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    outbox: sled::Tree,
    outbox_attachments: sled::Tree,
    inbox: sled::Tree,
    inbox_attachments: sled::Tree,
    receipts: sled::Tree,
    /// `<about id> \0 <other id>` → (): status reports, recalls, updates and replaces
    /// about a document, sent or received.
    links: sled::Tree,
    /// Answers kept for `Idempotency-Key` retries.
    idempotency: sled::Tree,
    /// Entries in `idempotency` (counted on first write), guarded for exact pruning.
    idempotency_count: std::sync::Mutex<Option<u64>>,
    /// Idempotency keys of send requests running now.
    idempotency_running: std::sync::Mutex<HashSet<String>>,
    /// Held while a sequence number of the `o` indexes is taken and committed, so
    /// entries become visible in sequence order (see [`listing`]).
    order_lock: std::sync::Mutex<()>,
    /// Documents and bytes in the outbox state, mirrored from the records.
    outbox_pending: std::sync::Mutex<(u64, u64)>,
    data_file: Arc<File>,
    /// Group commit: tickets handed out to callers of `durable` after their writes.
    requested: AtomicU64,
    /// Guarded: the highest ticket covered by a completed sync, and blob files synced.
    sync_state: tokio::sync::Mutex<SyncState>,
}

#[derive(Default)]
struct SyncState {
    completed: u64,
    synced_blobs: HashSet<OsString>,
}

fn key(tag: u8, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.push(tag);
    k.extend_from_slice(id.as_bytes());
    k
}

fn attachment_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 1);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

fn attachment_index_prefix(id: &str, index: u32) -> Vec<u8> {
    let mut k = attachment_prefix(id);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The (key, value) pairs that store `attachments` of message `id`.
fn attachment_writes(id: &str, attachments: &[Bytes]) -> Vec<(IVec, IVec)> {
    let mut writes = Vec::new();
    for (index, bytes) in attachments.iter().enumerate() {
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        for (chunk, part) in bytes.chunks(CHUNK_BYTES).enumerate() {
            let chunk = u32::try_from(chunk).unwrap_or(u32::MAX);
            let mut k = attachment_index_prefix(id, index);
            k.extend_from_slice(&chunk.to_be_bytes());
            writes.push((IVec::from(k), IVec::from(part)));
        }
    }
    writes
}

fn decode_json<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Record {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

fn encode_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Record {
        key: "(new record)".into(),
        detail: e.to_string(),
    })
}

/// Parses `<id> \0 index chunk` into the attachment index.
fn attachment_index_of(key: &[u8], prefix_len: usize) -> Option<u32> {
    let index = key.get(prefix_len..prefix_len + 4)?;
    Some(u32::from_be_bytes(index.try_into().ok()?))
}

impl Store {
    /// Opens (or creates) the store in `dir`. Refuses a directory holding something
    /// else, a database of another format, or one sled cannot open.
    pub fn open(dir: &Path) -> Result<Self, AgentError> {
        let io = |source| AgentError::Io {
            path: dir.to_owned(),
            source,
        };
        let not_ours = |detail: String| AgentError::NotOurs {
            path: dir.to_owned(),
            detail,
        };
        let corrupt = |detail: String| AgentError::Corrupt {
            path: dir.to_owned(),
            detail,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // The API token file may be created before the store (the agent writes it
        // before it listens); it alone does not make the directory foreign.
        let has_entries = std::fs::read_dir(dir)
            .map_err(io)?
            .any(|e| e.is_ok_and(|e| e.file_name() != crate::api_guard::TOKEN_FILE_NAME));
        if has_entries && !dir.join("conf").exists() {
            return Err(not_ours(
                "the directory is not empty and holds no agent store".into(),
            ));
        }
        let db = open_sled(dir).map_err(|e| {
            corrupt(format!(
                "sled cannot open it (corrupt, or used by another process?): {e}"
            ))
        })?;
        let sled_err = |e: sled::Error| corrupt(e.to_string());
        let meta = db.open_tree("meta").map_err(sled_err)?;
        match meta.get("format").map_err(sled_err)? {
            Some(format) if format.as_ref() == FORMAT.as_bytes() => {}
            Some(other) => {
                return Err(not_ours(lienthong_proto::store_format::mismatch(
                    &other, FORMAT,
                )));
            }
            None => {
                let foreign = !db.is_empty()
                    || db.tree_names().iter().any(|name| {
                        name.as_ref() != b"meta"
                            && name.as_ref() != b"__sled__default"
                            && db.open_tree(name).is_ok_and(|t| !t.is_empty())
                    });
                if foreign {
                    return Err(not_ours(
                        "a sled database without the lienthong agent format marker".into(),
                    ));
                }
                meta.insert("format", FORMAT).map_err(sled_err)?;
                db.flush().map_err(sled_err)?;
            }
        }
        let data_path = dir.join("db");
        let data_file = File::open(&data_path).map_err(|source| AgentError::Io {
            path: data_path.clone(),
            source,
        })?;
        data_file.sync_data().map_err(|source| AgentError::Io {
            path: data_path,
            source,
        })?;
        let outbox = db.open_tree("outbox").map_err(sled_err)?;
        let pending = Self::count_outbox_pending(&outbox).map_err(|e| corrupt(e.to_string()))?;
        let store = Self {
            path: dir.to_owned(),
            outbox,
            outbox_pending: std::sync::Mutex::new(pending),
            outbox_attachments: db.open_tree("outbox_attachments").map_err(sled_err)?,
            inbox: db.open_tree("inbox").map_err(sled_err)?,
            inbox_attachments: db.open_tree("inbox_attachments").map_err(sled_err)?,
            receipts: db.open_tree("receipts").map_err(sled_err)?,
            links: db.open_tree("links").map_err(sled_err)?,
            idempotency: db.open_tree("idempotency").map_err(sled_err)?,
            idempotency_count: std::sync::Mutex::new(None),
            idempotency_running: std::sync::Mutex::new(HashSet::new()),
            order_lock: std::sync::Mutex::new(()),
            meta,
            db,
            data_file: Arc::new(data_file),
            requested: AtomicU64::new(0),
            sync_state: tokio::sync::Mutex::new(SyncState::default()),
        };
        store
            .backfill_order()
            .map_err(|e| corrupt(format!("cannot index the documents for listing: {e}")))?;
        Ok(store)
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns once everything written before the call is on stable storage.
    pub async fn durable(&self) -> Result<(), StoreError> {
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut state = self.sync_state.lock().await;
        if state.completed >= ticket {
            return Ok(());
        }
        // Every ticket up to `covers` was taken after its writes, so this sync covers it.
        let covers = self.requested.load(Ordering::SeqCst);
        self.db.flush_async().await?;
        let file = Arc::clone(&self.data_file);
        let data_path = self.path.join("db");
        let blobs_dir = self.path.join("blobs");
        let known = std::mem::take(&mut state.synced_blobs);
        let synced = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            file.sync_data().map_err(|source| StoreError::Sync {
                path: data_path,
                source,
            })?;
            sync_new_blobs(&blobs_dir, known)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        state.synced_blobs = synced;
        state.completed = covers;
        Ok(())
    }

    /// The next document number of this agent (1, 2, ...). Durable with the document
    /// that uses it.
    pub fn next_number(&self) -> Result<u64, StoreError> {
        self.take_numbers(1)
    }

    /// Takes `count` consecutive document numbers at once (one counter update for a
    /// group of documents); answers the first. Durable with the documents that use them.
    pub fn take_numbers(&self, count: u64) -> Result<u64, StoreError> {
        let overflow = || StoreError::Record {
            key: "next_number".into(),
            detail: "the document number counter would overflow".into(),
        };
        let mut overflowed = false;
        let value = self.meta.update_and_fetch("next_number", |old| {
            let current = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            match current.checked_add(count) {
                Some(next) => {
                    overflowed = false;
                    Some(next.to_be_bytes().to_vec())
                }
                // Leave the counter as it is and refuse the numbers.
                None => {
                    overflowed = true;
                    old.map(<[u8]>::to_vec)
                }
            }
        })?;
        if overflowed {
            return Err(overflow());
        }
        let last = value
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(overflow)?;
        // `last` counts `count` new numbers after the previous value: last - count + 1.
        last.checked_sub(count)
            .and_then(|before| before.checked_add(1))
            .ok_or_else(overflow)
    }

    // ---- outbox ----

    /// Stores a sealed document waiting for submission, in one transaction.
    /// Call [`Store::durable`] before telling anyone it is accepted.
    pub fn put_outbox(
        &self,
        record: &OutboxRecord,
        envelope: &[u8],
        attachments: &[Bytes],
    ) -> Result<(), StoreError> {
        let id = record.message_id.as_str();
        let bytes = record.bytes;
        let record = encode_json(record)?;
        // The `p` key marks it pending submission.
        put_document(
            &self.outbox,
            &self.outbox_attachments,
            id,
            &record,
            envelope,
            attachments,
            Some(b'p'),
        )?;
        let mut pending = self
            .outbox_pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.0 += 1;
        pending.1 = pending.1.saturating_add(bytes);
        Ok(())
    }

    /// Stores a group of sealed documents waiting for submission in ONE transaction
    /// (records, envelopes, attachments, links to the documents they refer to): all of
    /// them or none. Call [`Store::durable`] once before telling anyone they are accepted.
    pub fn put_outbox_batch(&self, documents: &[NewOutbox<'_>]) -> Result<(), StoreError> {
        if documents.is_empty() {
            return Ok(());
        }
        let mut prepared = Vec::with_capacity(documents.len());
        let mut bytes = 0u64;
        // Sequence numbers are taken and committed under the lock (see `listing`).
        let _order = self
            .order_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut order = Vec::new();
        for document in documents {
            let id = document.record.message_id.as_str();
            bytes = bytes.saturating_add(document.record.bytes);
            let link = document.refers_to.map(|about| {
                let mut k = about.as_bytes().to_vec();
                k.push(0);
                k.extend_from_slice(id.as_bytes());
                IVec::from(k)
            });
            if document.record.kind == 0 {
                order.push((listing::order_key(self.db.generate_id()?), id));
            }
            prepared.push((
                id,
                IVec::from(encode_json(document.record)?),
                IVec::from(document.envelope),
                attachment_writes(id, document.attachments),
                link,
            ));
        }
        (&self.outbox, &self.outbox_attachments, &self.links).transaction(
            |(outbox, atts, links)| -> ConflictableTransactionResult<(), StoreError> {
                for (id, record, envelope, writes, link) in &prepared {
                    for (k, v) in writes {
                        atts.insert(k.clone(), v.clone())?;
                    }
                    outbox.insert(key(b'e', id), envelope.clone())?;
                    outbox.insert(key(b'r', id), record.clone())?;
                    // The `p` key marks it pending submission.
                    outbox.insert(key(b'p', id), IVec::default())?;
                    if let Some(link) = link {
                        links.insert(link.clone(), IVec::default())?;
                    }
                }
                for (k, id) in &order {
                    outbox.insert(&k[..], id.as_bytes())?;
                }
                Ok(())
            },
        )?;
        let mut pending = self
            .outbox_pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.0 = pending
            .0
            .saturating_add(u64::try_from(documents.len()).unwrap_or(u64::MAX));
        pending.1 = pending.1.saturating_add(bytes);
        Ok(())
    }

    /// Message ids waiting for submission, oldest first.
    pub fn pending_outbox(&self) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for entry in self.outbox.scan_prefix(b"p") {
            let (k, _) = entry?;
            ids.push(String::from_utf8_lossy(&k[1..]).into_owned());
        }
        Ok(ids)
    }

    /// How many sent documents are in each state: (outbox, submitted, failed). Reads
    /// every record; used once at start, the metrics follow the changes from there.
    pub fn outbox_counts(&self) -> Result<(u64, u64, u64), StoreError> {
        let mut counts = (0, 0, 0);
        for entry in self.outbox.scan_prefix(b"r") {
            let (k, v) = entry?;
            let record: OutboxRecord = decode_json(&k, &v)?;
            match record.state {
                OutboxState::Outbox => counts.0 += 1,
                OutboxState::Submitted => counts.1 += 1,
                OutboxState::Failed => counts.2 += 1,
            }
        }
        Ok(counts)
    }

    /// Documents and attachment bytes waiting in the outbox (not yet accepted), from
    /// counters kept with every change (the outbox is read once, at open).
    pub fn outbox_pending(&self) -> Result<(u64, u64), StoreError> {
        Ok(*self
            .outbox_pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn count_outbox_pending(outbox: &sled::Tree) -> Result<(u64, u64), StoreError> {
        let mut pending = (0, 0);
        for entry in outbox.scan_prefix(b"r") {
            let (k, v) = entry?;
            let record: OutboxRecord = decode_json(&k, &v)?;
            if record.state == OutboxState::Outbox {
                pending.0 += 1;
                pending.1 += record.bytes;
            }
        }
        Ok(pending)
    }

    pub fn outbox_record(&self, id: &str) -> Result<Option<OutboxRecord>, StoreError> {
        let k = key(b'r', id);
        self.outbox
            .get(&k)?
            .map(|v| decode_json(&k, &v))
            .transpose()
    }

    pub fn outbox_envelope(&self, id: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.outbox.get(key(b'e', id))?)
    }

    /// The stored chunks of every attachment of `id`, in order, as (index, bytes).
    pub fn outbox_attachment_chunks(
        &self,
        id: &str,
    ) -> impl Iterator<Item = Result<(u32, IVec), StoreError>> + Send + 'static {
        let prefix = attachment_prefix(id);
        let prefix_len = prefix.len();
        self.outbox_attachments
            .scan_prefix(prefix)
            .map(move |entry| {
                let (k, v) = entry?;
                let index =
                    attachment_index_of(&k, prefix_len).ok_or_else(|| StoreError::Record {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        detail: "attachment key too short".into(),
                    })?;
                Ok((index, v))
            })
    }

    fn update_outbox(
        &self,
        id: &str,
        receipt: Option<&[u8]>,
        change: impl Fn(&mut OutboxRecord),
    ) -> Result<(), StoreError> {
        let rkey = key(b'r', id);
        let receipt = receipt.map(IVec::from);
        // (was waiting, is waiting, bytes) of the attempt that committed.
        let transition = std::cell::Cell::new(None);
        (&self.outbox, &self.receipts).transaction(
            |(outbox, receipts)| -> ConflictableTransactionResult<(), StoreError> {
                let Some(current) = outbox.get(&rkey)? else {
                    return Ok(());
                };
                let mut record: OutboxRecord = decode_json(&rkey, &current)
                    .map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                let was = record.state == OutboxState::Outbox;
                change(&mut record);
                transition.set(Some((
                    was,
                    record.state == OutboxState::Outbox,
                    record.bytes,
                )));
                let value = encode_json(&record)
                    .map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                outbox.insert(rkey.clone(), value)?;
                outbox.remove(key(b'p', id))?;
                if let Some(receipt) = &receipt {
                    receipts.insert(key(b's', id), receipt.clone())?;
                }
                Ok(())
            },
        )?;
        if let Some((true, false, bytes)) = transition.get() {
            let mut pending = self
                .outbox_pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.0 = pending.0.saturating_sub(1);
            pending.1 = pending.1.saturating_sub(bytes);
        }
        Ok(())
    }

    /// The broker accepted `id`: keep its receipt, stop submitting.
    pub fn mark_submitted(&self, id: &str, receipt: &[u8], at_ms: i64) -> Result<(), StoreError> {
        self.update_outbox(id, Some(receipt), |r| {
            r.state = OutboxState::Submitted;
            r.failure_reason = None;
            r.submitted_at_ms = Some(at_ms);
        })
    }

    /// Records the outcomes of one submitted batch in ONE transaction (over the outbox
    /// and the receipts): each entry becomes submitted (with its receipt) or failed and
    /// stops waiting. Entries without a record are skipped. Call [`Store::durable`]
    /// once afterwards, for the whole batch.
    pub fn settle_outbox(&self, changes: &[(&str, OutboxSettle<'_>)]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        // Per change: (was waiting, is waiting, bytes) of the attempt that committed.
        let transitions = std::cell::RefCell::new(Vec::with_capacity(changes.len()));
        (&self.outbox, &self.receipts).transaction(
            |(outbox, receipts)| -> ConflictableTransactionResult<(), StoreError> {
                // A retried attempt starts over: only the last one's transitions count.
                let mut seen = Vec::with_capacity(changes.len());
                for (id, change) in changes {
                    let rkey = key(b'r', id);
                    let Some(current) = outbox.get(&rkey)? else {
                        continue;
                    };
                    let mut record: OutboxRecord = decode_json(&rkey, &current)
                        .map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                    let was = record.state == OutboxState::Outbox;
                    match change {
                        OutboxSettle::Submitted { receipt, at_ms } => {
                            record.state = OutboxState::Submitted;
                            record.failure_reason = None;
                            record.submitted_at_ms = Some(*at_ms);
                            receipts.insert(key(b's', id), IVec::from(*receipt))?;
                        }
                        OutboxSettle::Failed { reason } => {
                            record.state = OutboxState::Failed;
                            record.failure_reason = Some((*reason).to_owned());
                        }
                    }
                    seen.push((was, record.bytes));
                    let value = encode_json(&record)
                        .map_err(sled::transaction::ConflictableTransactionError::Abort)?;
                    outbox.insert(rkey, value)?;
                    outbox.remove(key(b'p', id))?;
                }
                *transitions.borrow_mut() = seen;
                Ok(())
            },
        )?;
        let mut pending = self
            .outbox_pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (was_waiting, bytes) in transitions.into_inner() {
            // Both outcomes leave the outbox state: only a waiting entry changes counts.
            if was_waiting {
                pending.0 = pending.0.saturating_sub(1);
                pending.1 = pending.1.saturating_sub(bytes);
            }
        }
        Ok(())
    }

    /// The broker refused `id` for good.
    pub fn mark_failed(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        self.update_outbox(id, None, |r| {
            r.state = OutboxState::Failed;
            r.failure_reason = Some(reason.to_owned());
        })
    }

    pub fn submission_receipt(&self, id: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.receipts.get(key(b's', id))?)
    }

    /// Every outbox record (documents this agent sent), in message id order.
    pub fn outbox_records(&self) -> Result<Vec<OutboxRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.outbox.scan_prefix(b"r") {
            let (k, v) = entry?;
            records.push(decode_json(&k, &v)?);
        }
        Ok(records)
    }

    // ---- inbox ----

    /// Stores a received document, in one transaction. Call [`Store::durable`] before
    /// acknowledging it.
    pub fn put_inbox(
        &self,
        record: &InboxRecord,
        envelope: &[u8],
        attachments: &[Bytes],
    ) -> Result<(), StoreError> {
        let id = record.message_id.as_str();
        let record = encode_json(record)?;
        put_document(
            &self.inbox,
            &self.inbox_attachments,
            id,
            &record,
            envelope,
            attachments,
            None,
        )
    }

    /// Stores everything a group of deliveries brings, in ONE transaction over the
    /// inbox, its attachments and the receipts: new documents whole (record, envelope,
    /// attachments) and the receipts of new and earlier ones. One group, one commit:
    /// call [`Store::durable`] once afterwards, before acknowledging any of them.
    pub fn put_inbox_batch(&self, writes: &[InboxWrite]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        // Encoded outside the transaction: its closure may run more than once.
        let mut documents: Vec<(IVec, IVec)> = Vec::new();
        let mut attachments: Vec<(IVec, IVec)> = Vec::new();
        let mut receipts: Vec<(IVec, IVec)> = Vec::new();
        // Sequence numbers are taken and committed under the lock (see `listing`).
        let _order = self
            .order_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for write in writes {
            let id = write.message_id.as_str();
            if let Some(document) = &write.document {
                documents.push((
                    IVec::from(key(b'e', id)),
                    IVec::from(document.envelope.as_ref()),
                ));
                documents.push((
                    IVec::from(key(b'r', id)),
                    IVec::from(encode_json(&document.record)?),
                ));
                attachments.extend(attachment_writes(id, &document.attachments));
                if document.record.kind == 0 {
                    documents.push((
                        IVec::from(&listing::order_key(self.db.generate_id()?)[..]),
                        IVec::from(id.as_bytes()),
                    ));
                }
            }
            if let Some(receipt) = &write.submission_receipt {
                receipts.push((IVec::from(key(b'i', id)), IVec::from(receipt.as_ref())));
            }
            if let Some(receipt) = &write.delivery_receipt {
                receipts.push((IVec::from(key(b'd', id)), IVec::from(receipt.as_ref())));
            }
        }
        (&self.inbox, &self.inbox_attachments, &self.receipts).transaction(
            |(inbox, atts, recs)| -> ConflictableTransactionResult<(), StoreError> {
                for (k, v) in &attachments {
                    atts.insert(k.clone(), v.clone())?;
                }
                for (k, v) in &documents {
                    inbox.insert(k.clone(), v.clone())?;
                }
                for (k, v) in &receipts {
                    recs.insert(k.clone(), v.clone())?;
                }
                Ok(())
            },
        )?;
        Ok(())
    }

    pub fn inbox_record(&self, id: &str) -> Result<Option<InboxRecord>, StoreError> {
        let k = key(b'r', id);
        self.inbox.get(&k)?.map(|v| decode_json(&k, &v)).transpose()
    }

    pub fn inbox_envelope(&self, id: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.inbox.get(key(b'e', id))?)
    }

    /// How many documents the inbox holds.
    pub fn inbox_len(&self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for key in self.inbox.scan_prefix(b"r").keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    /// Every inbox record, in message id order.
    pub fn inbox_records(&self) -> Result<Vec<InboxRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.inbox.scan_prefix(b"r") {
            let (k, v) = entry?;
            records.push(decode_json(&k, &v)?);
        }
        Ok(records)
    }

    /// The attachments of received document `id`, `count` of them, whole.
    pub fn inbox_attachments(&self, id: &str, count: usize) -> Result<Vec<Bytes>, StoreError> {
        let mut out: Vec<BytesMut> = (0..count).map(|_| BytesMut::new()).collect();
        let prefix = attachment_prefix(id);
        let prefix_len = prefix.len();
        for entry in self.inbox_attachments.scan_prefix(prefix) {
            let (k, v) = entry?;
            let slot = attachment_index_of(&k, prefix_len)
                .and_then(|i| out.get_mut(usize::try_from(i).ok()?))
                .ok_or_else(|| StoreError::Record {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    detail: "attachment chunk outside the header's list".into(),
                })?;
            slot.extend_from_slice(&v);
        }
        Ok(out.into_iter().map(BytesMut::freeze).collect())
    }

    /// Records that the document's export folder is complete.
    pub fn mark_exported(&self, id: &str) -> Result<(), StoreError> {
        self.update_inbox(id, |record| record.exported = true)
    }

    /// Changes a received document's record (if there is one).
    pub fn update_inbox(
        &self,
        id: &str,
        change: impl Fn(&mut InboxRecord),
    ) -> Result<(), StoreError> {
        let k = key(b'r', id);
        self.inbox.fetch_and_update(&k, |old| {
            let old = old?;
            let Ok(mut record) = serde_json::from_slice::<InboxRecord>(old) else {
                return Some(old.to_vec());
            };
            change(&mut record);
            serde_json::to_vec(&record)
                .ok()
                .or_else(|| Some(old.to_vec()))
        })?;
        Ok(())
    }

    // ---- links between documents ----

    /// Records that `other` (a status report, recall, update or replace, sent or
    /// received) is about document `about`. Idempotent.
    pub fn link(&self, about: &str, other: &str) -> Result<(), StoreError> {
        let mut k = about.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(other.as_bytes());
        self.links.insert(k, IVec::default())?;
        Ok(())
    }

    /// The message ids linked to document `about`, in id (= time) order.
    pub fn links(&self, about: &str) -> Result<Vec<String>, StoreError> {
        let mut prefix = about.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for k in self.links.scan_prefix(&prefix).keys() {
            let k = k?;
            if let Some(rest) = k.get(prefix.len()..) {
                out.push(String::from_utf8_lossy(rest).into_owned());
            }
        }
        Ok(out)
    }

    pub fn put_delivery_receipt(&self, id: &str, receipt: &[u8]) -> Result<(), StoreError> {
        self.receipts.insert(key(b'd', id), receipt)?;
        Ok(())
    }

    pub fn delivery_receipt(&self, id: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.receipts.get(key(b'd', id))?)
    }

    /// The broker's submission receipt of a document this agent received (checked on
    /// arrival): its time is the trusted time of the document. Kept apart from the
    /// submission receipts of documents this agent sent (`s`).
    pub fn put_received_submission_receipt(
        &self,
        id: &str,
        receipt: &[u8],
    ) -> Result<(), StoreError> {
        self.receipts.insert(key(b'i', id), receipt)?;
        Ok(())
    }

    pub fn received_submission_receipt(&self, id: &str) -> Result<Option<IVec>, StoreError> {
        Ok(self.receipts.get(key(b'i', id))?)
    }
}

/// The group paths of the outbox: numbers, one-transaction writes and settlements.
#[cfg(test)]
mod outbox_batch_tests {
    use super::*;

    fn waiting(id: &str, bytes: u64) -> OutboxRecord {
        OutboxRecord {
            message_id: id.into(),
            business_id: format!("b-{id}"),
            recipients: vec![],
            created_at_ms: 1,
            header_sha256: "00".into(),
            state: OutboxState::Outbox,
            failure_reason: None,
            submitted_at_ms: None,
            bytes,
            streamed: false,
            ..OutboxRecord::default()
        }
    }

    #[tokio::test]
    async fn numbers_groups_and_settlements() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_number().unwrap(), 1);
        assert_eq!(store.take_numbers(3).unwrap(), 2);
        assert_eq!(store.next_number().unwrap(), 5);

        let records = [waiting("a", 3), waiting("b", 0), waiting("c", 5)];
        let atts = [Bytes::from_static(b"123")];
        let docs: Vec<NewOutbox<'_>> = records
            .iter()
            .map(|r| NewOutbox {
                record: r,
                envelope: b"env",
                attachments: if r.bytes == 3 { &atts } else { &[] },
                refers_to: (r.message_id == "c").then_some("a"),
            })
            .collect();
        store.put_outbox_batch(&docs).unwrap();
        store.durable().await.unwrap();
        assert_eq!(store.pending_outbox().unwrap(), vec!["a", "b", "c"]);
        assert_eq!(store.outbox_pending().unwrap(), (3, 8));
        assert_eq!(store.links("a").unwrap(), vec!["c"]);
        assert_eq!(store.outbox_attachment_chunks("a").count(), 1);

        store
            .settle_outbox(&[
                (
                    "a",
                    OutboxSettle::Submitted {
                        receipt: b"receipt",
                        at_ms: 7,
                    },
                ),
                ("c", OutboxSettle::Failed { reason: "refused" }),
                // Unknown ids are skipped, not errors.
                ("zz", OutboxSettle::Failed { reason: "x" }),
            ])
            .unwrap();
        store.durable().await.unwrap();
        assert_eq!(store.pending_outbox().unwrap(), vec!["b"]);
        assert_eq!(store.outbox_pending().unwrap(), (1, 0));
        let a = store.outbox_record("a").unwrap().unwrap();
        assert_eq!(
            (a.state, a.submitted_at_ms),
            (OutboxState::Submitted, Some(7))
        );
        assert_eq!(
            store.submission_receipt("a").unwrap().unwrap().as_ref(),
            b"receipt"
        );
        let c = store.outbox_record("c").unwrap().unwrap();
        assert_eq!(c.state, OutboxState::Failed);
        assert_eq!(c.failure_reason.as_deref(), Some("refused"));
        // Settling again changes no count.
        store
            .settle_outbox(&[("c", OutboxSettle::Failed { reason: "again" })])
            .unwrap();
        assert_eq!(store.outbox_pending().unwrap(), (1, 0));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.outbox_pending().unwrap(), (1, 0));
        assert_eq!(store.next_number().unwrap(), 6);
    }

    #[tokio::test]
    async fn the_counter_refuses_to_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.take_numbers(u64::MAX - 1).unwrap();
        assert!(store.take_numbers(2).is_err());
        assert_eq!(store.take_numbers(1).unwrap(), u64::MAX);
    }
}

/// `fdatasync`s blob files in `dir` not in `known` (sled writes large values there
/// without syncing), then the directory itself if any was new. Returns the names now
/// present.
fn sync_new_blobs(dir: &Path, known: HashSet<OsString>) -> Result<HashSet<OsString>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(known),
        Err(source) => {
            return Err(StoreError::Sync {
                path: dir.to_owned(),
                source,
            });
        }
    };
    let mut present = HashSet::new();
    let mut any_new = false;
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Sync {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        if !known.contains(&name) {
            let path = entry.path();
            match File::open(&path) {
                Ok(f) => f
                    .sync_data()
                    .map_err(|source| StoreError::Sync { path, source })?,
                // Removed by sled's garbage collection meanwhile: nothing to sync.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(StoreError::Sync { path, source }),
            }
            any_new = true;
        }
        present.insert(name);
    }
    if any_new {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| StoreError::Sync {
                path: dir.to_owned(),
                source,
            })?;
    }
    Ok(present)
}

/// Writes a document's record (`r`), envelope (`e`), attachments and an optional marker
/// key in one transaction over `tree` and its attachment tree.
fn put_document(
    tree: &sled::Tree,
    attachment_tree: &sled::Tree,
    id: &str,
    record: &[u8],
    envelope: &[u8],
    attachments: &[Bytes],
    marker: Option<u8>,
) -> Result<(), StoreError> {
    let writes = attachment_writes(id, attachments);
    let record = IVec::from(record);
    let envelope = IVec::from(envelope);
    (tree, attachment_tree).transaction(
        |(documents, atts)| -> ConflictableTransactionResult<(), StoreError> {
            for (k, v) in &writes {
                atts.insert(k.clone(), v.clone())?;
            }
            documents.insert(key(b'e', id), envelope.clone())?;
            documents.insert(key(b'r', id), record.clone())?;
            if let Some(marker) = marker {
                documents.insert(key(marker, id), IVec::default())?;
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// Opens sled at `dir`, waiting up to 10 s while another handle in this process still
/// holds its file lock (sled's threads release it a moment after the last handle drops,
/// e.g. when a component restarts in place). Another process's lock is refused after that.
fn open_sled(dir: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::Config::new().path(dir).open() {
            // sled reports a held lock as ErrorKind::Other with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> InboxRecord {
        InboxRecord {
            message_id: id.into(),
            received_at_ms: 1,
            sender: "000.00.00.H31".into(),
            subject: "s".into(),
            business_id: "b".into(),
            header_sha256: "00".into(),
            attachments: vec!["a.pdf".into(), "empty.txt".into(), "b.bin".into()],
            exported: false,
            streamed: false,
            ..InboxRecord::default()
        }
    }

    #[tokio::test]
    async fn reopen_keeps_documents_and_counter() {
        let dir = tempfile::tempdir().unwrap();
        let big: Bytes = (0..(CHUNK_BYTES * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.next_number().unwrap(), 1);
            assert_eq!(store.next_number().unwrap(), 2);
            store
                .put_inbox(
                    &record("id1"),
                    b"envelope",
                    &[Bytes::from_static(b"pdf"), Bytes::new(), big.clone()],
                )
                .unwrap();
            store.mark_exported("id1").unwrap();
            store.durable().await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.next_number().unwrap(), 3);
        let rec = store.inbox_record("id1").unwrap().unwrap();
        assert!(rec.exported);
        assert_eq!(
            store.inbox_envelope("id1").unwrap().unwrap().as_ref(),
            b"envelope"
        );
        let atts = store.inbox_attachments("id1", 3).unwrap();
        assert_eq!(atts[0].as_ref(), b"pdf");
        assert!(atts[1].is_empty());
        assert_eq!(atts[2], big);
    }

    #[tokio::test]
    async fn outbox_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for id in ["a", "b"] {
            let rec = OutboxRecord {
                message_id: id.into(),
                business_id: "x".into(),
                recipients: vec![],
                created_at_ms: 1,
                header_sha256: "00".into(),
                state: OutboxState::Outbox,
                failure_reason: None,
                submitted_at_ms: None,
                bytes: 5,
                streamed: false,
                ..OutboxRecord::default()
            };
            store
                .put_outbox(&rec, b"env", &[Bytes::from_static(b"12345")])
                .unwrap();
        }
        store.durable().await.unwrap();
        assert_eq!(store.pending_outbox().unwrap(), vec!["a", "b"]);
        let chunks: Vec<_> = store
            .outbox_attachment_chunks("a")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].0, 0);
        store.mark_submitted("a", b"receipt", 5).unwrap();
        store.mark_failed("b", "refused").unwrap();
        assert!(store.pending_outbox().unwrap().is_empty());
        assert_eq!(
            store.outbox_record("a").unwrap().unwrap().state,
            OutboxState::Submitted
        );
        assert_eq!(
            store.submission_receipt("a").unwrap().unwrap().as_ref(),
            b"receipt"
        );
        let b = store.outbox_record("b").unwrap().unwrap();
        assert_eq!(b.state, OutboxState::Failed);
        assert_eq!(b.failure_reason.as_deref(), Some("refused"));
    }

    #[test]
    fn refuses_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, AgentError::NotOurs { .. }), "{err}");
        assert!(err.to_string().contains(&dir.path().display().to_string()));

        let other = tempfile::tempdir().unwrap();
        {
            let db = sled::open(other.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert("format", "lienthong-broker/1")
                .unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(other.path()).err().unwrap();
        assert!(
            err.to_string()
                .contains("not a lienthong agent data directory"),
            "{err}"
        );
    }

    #[test]
    fn refuses_corrupt_store() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("conf"), b"garbage\0\0").unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, AgentError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_group_is_stored_whole_with_its_receipts() {
        let dir = tempfile::tempdir().unwrap();
        let big: Bytes = (0..(CHUNK_BYTES + 5)).map(|i| (i % 7) as u8).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            // An earlier document without receipts (stored by an older version).
            store.put_inbox(&record("old"), b"env-old", &[]).unwrap();
            let new = |id: &str, attachments: Vec<Bytes>| InboxWrite {
                message_id: id.into(),
                document: Some(InboxDocument {
                    record: record(id),
                    envelope: Bytes::from(format!("env-{id}")),
                    attachments,
                }),
                submission_receipt: Some(Bytes::from(format!("sub-{id}"))),
                delivery_receipt: Some(Bytes::from(format!("del-{id}"))),
            };
            let writes = vec![
                new(
                    "a",
                    vec![Bytes::from_static(b"pdf"), Bytes::new(), big.clone()],
                ),
                InboxWrite {
                    message_id: "old".into(),
                    document: None,
                    submission_receipt: None,
                    delivery_receipt: Some(Bytes::from_static(b"del-old")),
                },
                new("b", Vec::new()),
            ];
            store.put_inbox_batch(&writes).unwrap();
            store.put_inbox_batch(&[]).unwrap();
            store.durable().await.unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.inbox_len().unwrap(), 3);
        for id in ["a", "b"] {
            assert_eq!(store.inbox_record(id).unwrap().unwrap().message_id, id);
            assert_eq!(
                store.inbox_envelope(id).unwrap().unwrap().as_ref(),
                format!("env-{id}").as_bytes()
            );
            assert_eq!(
                store
                    .received_submission_receipt(id)
                    .unwrap()
                    .unwrap()
                    .as_ref(),
                format!("sub-{id}").as_bytes()
            );
            assert_eq!(
                store.delivery_receipt(id).unwrap().unwrap().as_ref(),
                format!("del-{id}").as_bytes()
            );
        }
        let attachments = store.inbox_attachments("a", 3).unwrap();
        assert_eq!(attachments[0].as_ref(), b"pdf");
        assert!(attachments[1].is_empty());
        assert_eq!(attachments[2], big);
        assert_eq!(
            store.delivery_receipt("old").unwrap().unwrap().as_ref(),
            b"del-old"
        );
        assert!(store.received_submission_receipt("old").unwrap().is_none());
    }
}
