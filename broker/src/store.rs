//! The broker's durable state in sled, behind a narrow interface (so a replicated store
//! can replace it later).
//!
//! Trees and keys:
//! - default tree: `lienthong-format` → [`FORMAT`]; a database without it is corrupt or
//!   not ours and is refused. The one exception is an empty data file holding no data:
//!   a creation interrupted before its first flush (the crash tests kill the broker while
//!   it starts), which is initialised.
//! - `documents`: message id → [`DocumentRecord`].
//! - `attachments`: message id ‖ 0 ‖ index (u32 BE) ‖ chunk (u32 BE) → ≤ 64 KiB of bytes.
//! - `business_ids`: business document id → message id (a business id names one content).
//! - `queue`: recipient code (13 bytes) ‖ sequence (u64 BE) → [`QueueEntry`]; per-recipient
//!   FIFO order, sequences from `generate_id`, which only grows, even across restarts.
//!   Sequences are taken under the audit chain's lock, which every transaction that adds
//!   queue entries holds until it commits: entries commit in sequence order.
//! - `deliveries`: message id ‖ 0 ‖ recipient → [`DeliveryRecord`].
//! - `agencies`: code → [`AgencyRecord`].
//! - `expiry`: expires-at (u64 BE ms) ‖ queue key → delivery key; the queued deliveries
//!   in the order they expire.
//! - `dead_letters`: recipient ‖ 0 ‖ message id → (); deliveries expired or refused.
//! - `pending`: recipient ‖ 0 ‖ sender → documents (u64 BE) ‖ bytes (u64 BE): what the
//!   queue tree holds per (sender, recipient), written in the same transaction as every
//!   queue change (accept, settle, redrive), so a restart reads it instead of walking
//!   every queue entry. Trusted only while the default tree holds `lienthong-pending`
//!   (written once it was built from a walk of the queue tree).
//! - `audit`: seq (u64 BE) → [`AuditRecord`], the hash-chained audit log (see `audit`):
//!   an accepted document's, a settled or redriven delivery's entry is written in the
//!   same transaction as the change; an agency's registration or suspension right after.
//!
//! - Streamed documents (attachments over `STREAMED_THRESHOLD`) keep their attachments
//!   as files: `<dir>/lienthong-blobs/partial/<header sha256 hex>/<index>` while they
//!   arrive (bound to one signed header, so a resume can only continue the same
//!   document), then `<dir>/lienthong-blobs/<message id>/<index>`, synced and renamed
//!   before the document's transaction.
//!
//! Invariants: a document, its business id, its queue entries and delivery records are
//! written in one transaction, after its attachments; nothing is acknowledged before
//! [`Store::durable`] returns. A queue entry and an expiry entry exist exactly while the
//! delivery record is `Queued`; a dead-letter entry exactly while it is `Expired` or
//! `Refused`. The in-memory pending counters, per recipient and per (sender, recipient),
//! mirror the queue tree (loaded at open from the `pending` tree, which mirrors it
//! exactly; rebuilt from a walk when that is absent). An accept
//! counts its document in them before its transaction and uncounts it if that does not
//! commit, so the queue limits hold exactly under concurrent submissions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use lienthong_proto::pb::DeliveryState;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::audit::{self, Chain, Event, Head};
use crate::commit::{CommitError, GroupCommit, sled_data_file};
use crate::records::{
    AgencyRecord, AttemptRecord, AuditRecord, DeliveryRecord, DocumentRecord, QueueEntry,
};

/// Written into the default tree when a store is created.
pub const FORMAT: &[u8] = b"lienthong-broker/1";
const FORMAT_KEY: &[u8] = b"lienthong-format";
/// Default tree: how many documents the store holds (u64 BE), kept in the accept
/// transaction so that reading it costs nothing (counting the tree walks every page).
const DOCUMENT_COUNT_KEY: &[u8] = b"lienthong-documents";
/// Default tree: present once the `pending` tree mirrors the queue tree.
const PENDING_TREE_KEY: &[u8] = b"lienthong-pending";
/// Attachments are stored in chunks of this size.
pub const CHUNK_BYTES: usize = 64 * 1024;
/// Attempts kept per delivery record.
const ATTEMPT_LOG_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Commit(#[from] CommitError),
}

impl From<prost::DecodeError> for StoreError {
    fn from(e: prost::DecodeError) -> Self {
        StoreError::Corrupt(e.to_string())
    }
}

/// A verified document for [`Store::accept_batch`].
#[derive(Debug, Clone)]
pub struct NewDocument {
    pub record: DocumentRecord,
    pub message_id: String,
    /// Whole attachments in header order (empty for a streamed document, whose files
    /// are in its blob folder already).
    pub attachments: Vec<Bytes>,
}

/// The outcome of [`Store::accept`].
#[derive(Debug)]
pub enum Accepted {
    New,
    /// A queue limit would be exceeded: why, naming the limit. Nothing was stored.
    OverLimit(String),
    /// The same message id was accepted before: here is its record.
    Duplicate(DocumentRecord),
    /// The business id is already used by another message.
    BusinessIdTaken {
        message_id: String,
    },
}

/// Queue depth of one recipient.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QueueStats {
    pub pending: u64,
    pub pending_bytes: u64,
    pub oldest_enqueued_ms: Option<i64>,
}

/// Pending documents and bytes in one recipient's queue (or one sender's part of it).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub documents: u64,
    pub bytes: u64,
}

/// The in-memory mirror of the queue tree: per recipient and per (sender, recipient).
#[derive(Debug, Default)]
struct PendingCounts {
    by_recipient: HashMap<String, Pending>,
    by_pair: HashMap<(String, String), Pending>,
}

impl PendingCounts {
    fn add(&mut self, sender: &str, recipient: &str, bytes: u64) {
        let pair = (sender.to_owned(), recipient.to_owned());
        for p in [
            self.by_recipient.entry(recipient.to_owned()).or_default(),
            self.by_pair.entry(pair).or_default(),
        ] {
            p.documents = p.documents.saturating_add(1);
            p.bytes = p.bytes.saturating_add(bytes);
        }
    }

    fn remove(&mut self, sender: &str, recipient: &str, bytes: u64) {
        let pair = (sender.to_owned(), recipient.to_owned());
        if let Some(p) = self.by_recipient.get_mut(recipient) {
            p.documents = p.documents.saturating_sub(1);
            p.bytes = p.bytes.saturating_sub(bytes);
        }
        if let Some(p) = self.by_pair.get_mut(&pair) {
            p.documents = p.documents.saturating_sub(1);
            p.bytes = p.bytes.saturating_sub(bytes);
            // Pairs come and go with senders; an empty one costs memory for nothing.
            if p.documents == 0 {
                self.by_pair.remove(&pair);
            }
        }
    }
}

/// Queue limits per recipient and per (sender, recipient) pair; over one, a
/// submission is refused with RESOURCE_EXHAUSTED naming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub max_documents: u64,
    pub max_bytes: u64,
    pub max_pair_documents: u64,
    pub max_pair_bytes: u64,
}

impl QueueLimits {
    /// Why one more document of `bytes` from `sender` may not join `recipient`'s queue
    /// holding `queued` (of which `pair` from this sender), or None when it may.
    pub fn refusal(
        &self,
        sender: &str,
        recipient: &str,
        queued: Pending,
        pair: Pending,
        bytes: u64,
    ) -> Option<String> {
        let over = |held: u64, add: u64, max: u64| held.checked_add(add).is_none_or(|n| n > max);
        if over(queued.documents, 1, self.max_documents) {
            return Some(format!(
                "the queue for {recipient} holds {} documents, the limit (max_pending_documents); retry later",
                queued.documents
            ));
        }
        if over(queued.bytes, bytes, self.max_bytes) {
            return Some(format!(
                "the queue for {recipient} holds {} bytes; this document would exceed the limit of {} (max_pending_bytes); retry later",
                queued.bytes, self.max_bytes
            ));
        }
        if over(pair.documents, 1, self.max_pair_documents) {
            return Some(format!(
                "{sender} already has {} documents waiting for {recipient}, the limit per sender \
                 (max_pending_per_sender_documents = {}); retry once they are delivered",
                pair.documents, self.max_pair_documents
            ));
        }
        if over(pair.bytes, bytes, self.max_pair_bytes) {
            return Some(format!(
                "{sender} already has {} bytes waiting for {recipient}; this document would exceed \
                 the limit per sender of {} (max_pending_per_sender_bytes); retry once they are delivered",
                pair.bytes, self.max_pair_bytes
            ));
        }
        None
    }

    /// No limits: for operators' own actions and tests.
    pub fn none() -> Self {
        Self {
            max_documents: u64::MAX,
            max_bytes: u64::MAX,
            max_pair_documents: u64::MAX,
            max_pair_bytes: u64::MAX,
        }
    }
}

/// How a queued delivery ends.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// The recipient's verified delivery receipt (`Signed`, encoded).
    Delivered { receipt: Vec<u8> },
    /// Expired or refused: the state, the reason and the broker's signed notice.
    Dead {
        state: DeliveryState,
        reason: String,
        notice: Vec<u8>,
    },
    /// Recalled by the sender before delivery: never delivered, not a dead letter (it
    /// must not be redriven), with the broker's signed notice.
    Recalled { reason: String, notice: Vec<u8> },
}

/// One delivery to end with [`Store::settle_batch`].
#[derive(Debug, Clone)]
pub struct Settle {
    pub message_id: String,
    pub recipient: String,
    pub settlement: Settlement,
}

/// A dead letter as listed for operators.
#[derive(Debug, Clone)]
pub struct DeadLetterEntry {
    pub message_id: String,
    pub recipient: String,
    pub record: DeliveryRecord,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    documents: sled::Tree,
    attachments: sled::Tree,
    business_ids: sled::Tree,
    queue: sled::Tree,
    deliveries: sled::Tree,
    agencies: sled::Tree,
    expiry: sled::Tree,
    dead_letters: sled::Tree,
    audit: sled::Tree,
    /// The persisted pending counters per (sender, recipient); see the module header.
    pending_tree: sled::Tree,
    /// The audit chain's head; its mutex serialises appends.
    chain: Arc<Chain>,
    pending: Arc<Mutex<PendingCounts>>,
    /// Dead letters held per recipient (the `dead_letters` tree counted at open, then
    /// kept in step after each commit that adds or removes one).
    dead_counts: Arc<Mutex<HashMap<String, u64>>>,
    /// Settled deliveries per recipient over the last hour and day; in memory only.
    recent: Arc<crate::recent::RecentCounts>,
    commit: GroupCommit,
    dir: PathBuf,
}

fn delivery_key(message_id: &str, recipient: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(message_id.len() + 1 + recipient.len());
    key.extend_from_slice(message_id.as_bytes());
    key.push(0);
    key.extend_from_slice(recipient.as_bytes());
    key
}

fn queue_key(recipient: &str, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(recipient.len() + 8);
    key.extend_from_slice(recipient.as_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn expiry_key(expires_at_ms: i64, queue_key: &[u8]) -> Vec<u8> {
    let mut key = u64::try_from(expires_at_ms.max(0))
        .unwrap_or(0)
        .to_be_bytes()
        .to_vec();
    key.extend_from_slice(queue_key);
    key
}

/// Dead letters per recipient in `tree` (keys recipient ‖ 0 ‖ message id).
fn count_dead_letters(tree: &sled::Tree) -> Result<HashMap<String, u64>, StoreError> {
    let mut counts = HashMap::new();
    for key in tree.iter().keys() {
        let key = key?;
        if let Some(at) = key.iter().position(|b| *b == 0) {
            let recipient = String::from_utf8_lossy(&key[..at]).into_owned();
            let count: &mut u64 = counts.entry(recipient).or_default();
            *count = count.saturating_add(1);
        }
    }
    Ok(counts)
}

fn dead_letter_key(recipient: &str, message_id: &str) -> Vec<u8> {
    let mut key = recipient.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(message_id.as_bytes());
    key
}

/// Splits a delivery key into message id and recipient.
fn split_pair(key: &[u8]) -> Option<(String, String)> {
    let at = key.iter().position(|b| *b == 0)?;
    let first = String::from_utf8(key.get(..at)?.to_vec()).ok()?;
    let second = String::from_utf8(key.get(at + 1..)?.to_vec()).ok()?;
    Some((first, second))
}

fn attachment_prefix(message_id: &str) -> Vec<u8> {
    let mut key = message_id.as_bytes().to_vec();
    key.push(0);
    key
}

fn attachment_key(message_id: &str, index: u32, chunk: u32) -> Vec<u8> {
    let mut key = attachment_prefix(message_id);
    key.extend_from_slice(&index.to_be_bytes());
    key.extend_from_slice(&chunk.to_be_bytes());
    key
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, StoreError> {
    Ok(M::decode(bytes)?)
}

impl Store {
    /// Opens the store in `dir`, creating it when `dir` is absent or empty. A directory
    /// holding anything else, or a sled database without our format marker, is refused
    /// with an error naming the path: never a silent fresh start over someone's data.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open_error = |detail: String| StoreError::Open {
            path: dir.to_owned(),
            detail,
        };
        let fresh = match std::fs::read_dir(dir) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(open_error(e.to_string())),
        };
        if !fresh && !sled_data_file(dir).is_file() {
            return Err(open_error(
                "not a lienthong broker data directory (it holds other files); \
                 give an empty or new directory"
                    .into(),
            ));
        }
        // A creation interrupted before its first flush leaves an empty data file; a
        // data file with bytes but no marker is corrupt or foreign, never reinitialised.
        let data_file_was_empty =
            std::fs::metadata(sled_data_file(dir)).is_ok_and(|m| m.len() == 0);
        let db = open_sled(dir)
            .map_err(|e| open_error(format!("cannot open the store (corrupt or in use?): {e}")))?;
        match db.get(FORMAT_KEY)? {
            Some(format) if format.as_ref() == FORMAT => {}
            Some(other) => {
                return Err(open_error(lienthong_proto::store_format::mismatch(
                    &other,
                    &String::from_utf8_lossy(FORMAT),
                )));
            }
            None if fresh || (data_file_was_empty && holds_no_data(&db)?) => {
                db.insert(FORMAT_KEY, FORMAT)?;
                db.flush()?;
                std::fs::File::open(sled_data_file(dir))
                    .and_then(|f| f.sync_all())
                    .map_err(|e| open_error(format!("cannot sync the new store: {e}")))?;
            }
            None => {
                return Err(open_error(
                    "the store holds no lienthong broker format marker: it is corrupt or \
                     belongs to something else; restore it from a backup or give a new directory"
                        .into(),
                ));
            }
        }
        if db.get(DOCUMENT_COUNT_KEY)?.is_none() {
            // A store from before the counter: count once.
            let documents = db.open_tree("documents")?.len() as u64;
            db.insert(DOCUMENT_COUNT_KEY, &documents.to_be_bytes())?;
        }
        let dead_letters = db.open_tree("dead_letters")?;
        let commit = GroupCommit::start(db.clone(), dir)
            .map_err(|e| open_error(format!("cannot open the data file for syncing: {e}")))?;
        let queue = db.open_tree("queue")?;
        let pending_tree = db.open_tree("pending")?;
        let pending = Arc::new(Mutex::new(load_pending(
            &db,
            &pending_tree,
            &queue,
            &db.open_tree("documents")?,
        )?));
        let audit = db.open_tree("audit")?;
        let last_audit: Option<AuditRecord> =
            audit.last()?.map(|(_, value)| decode(&value)).transpose()?;
        let chain = Arc::new(Chain::new(Head::after(last_audit.as_ref())));
        Ok(Self {
            documents: db.open_tree("documents")?,
            attachments: db.open_tree("attachments")?,
            business_ids: db.open_tree("business_ids")?,
            queue,
            deliveries: db.open_tree("deliveries")?,
            agencies: db.open_tree("agencies")?,
            expiry: db.open_tree("expiry")?,
            dead_counts: Arc::new(Mutex::new(count_dead_letters(&dead_letters)?)),
            dead_letters,
            audit,
            pending_tree,
            chain,
            pending,
            recent: Arc::default(),
            dir: dir.to_owned(),
            db,
            commit,
        })
    }

    /// Another tree of the same database, for a module that keeps its own records
    /// beside these (`trust`: certificate bindings, the block list); its writes are made
    /// durable by the same group commit.
    pub(crate) fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Waits until every write made before this call is on disk (group commit).
    pub async fn durable(&self) -> Result<(), StoreError> {
        Ok(self.commit.durable().await?)
    }

    /// False after a failed flush: the store then refuses writes.
    pub fn is_writable(&self) -> bool {
        !self.commit.is_poisoned()
    }

    /// Bytes available to us on the filesystem that holds the store.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let stat = rustix::fs::statvfs(&self.dir).map_err(std::io::Error::from)?;
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Where the attachments of streamed documents live.
    pub fn blob_root(&self) -> PathBuf {
        self.dir.join("lienthong-blobs")
    }

    /// The folder a streamed upload by `sender` of the header with this SHA-256 is
    /// received in.
    pub fn partial_dir(&self, sender: &str, header_sha256: &[u8]) -> PathBuf {
        self.blob_root()
            .join("partial")
            .join(format!("{sender}-{}", hex::encode(header_sha256)))
    }

    /// The folder of an accepted streamed document's attachments.
    pub fn blob_dir(&self, message_id: &str) -> PathBuf {
        self.blob_root().join(message_id)
    }

    /// Removes the attachment folder of a streamed document that was refused after its
    /// upload was complete; never one of an accepted document.
    pub fn remove_blob_dir(&self, message_id: &str) {
        if matches!(self.document(message_id), Ok(None)) {
            let dir = self.blob_dir(message_id);
            if let Err(error) = std::fs::remove_dir_all(&dir)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove a refused document's files");
            }
        }
    }

    /// Bytes held per attachment of a partial upload, up to the last attachment with a
    /// file (empty when there is none).
    pub fn partial_lengths(&self, sender: &str, header_sha256: &[u8]) -> Vec<u64> {
        let dir = self.partial_dir(sender, header_sha256);
        let mut lengths = Vec::new();
        for index in 0..lienthong_proto::document::MAX_ATTACHMENTS {
            match std::fs::metadata(dir.join(index.to_string())) {
                Ok(meta) => lengths.push(meta.len()),
                Err(_) => break,
            }
        }
        lengths
    }

    /// Makes a complete partial upload the document's blob folder: the files were
    /// synced by the caller; the rename and both folders are synced here. A folder
    /// left by a crash between this and the document's transaction is replaced.
    pub fn promote_partial(
        &self,
        sender: &str,
        header_sha256: &[u8],
        message_id: &str,
    ) -> Result<(), StoreError> {
        let partial = self.partial_dir(sender, header_sha256);
        let target = self.blob_dir(message_id);
        let io = |path: &Path| {
            let path = path.to_owned();
            move |e: std::io::Error| StoreError::Open {
                path,
                detail: e.to_string(),
            }
        };
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(io(&target))?;
        }
        lienthong_proto::spool::sync_dir(&partial)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        std::fs::rename(&partial, &target).map_err(io(&target))?;
        lienthong_proto::spool::sync_dir(&self.blob_root())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(())
    }

    pub fn document(&self, message_id: &str) -> Result<Option<DocumentRecord>, StoreError> {
        self.documents
            .get(message_id)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn message_for_business_id(&self, business_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .business_ids
            .get(business_id)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Stores a verified document and queues it for each recipient. The attachments go
    /// first: if the process dies before the transaction, or the document is refused
    /// for its business id, they are unreferenced bytes that the next submission of the
    /// same message id replaces (its content may differ from the refused one's).
    pub fn accept(
        &self,
        record: &DocumentRecord,
        message_id: &str,
        attachments: &[Bytes],
    ) -> Result<Accepted, StoreError> {
        self.accept_within(record, message_id, attachments, &QueueLimits::none())
    }

    /// [`Store::accept`] within queue limits: [`Store::accept_batch`] of one document.
    pub fn accept_within(
        &self,
        record: &DocumentRecord,
        message_id: &str,
        attachments: &[Bytes],
        limits: &QueueLimits,
    ) -> Result<Accepted, StoreError> {
        let document = NewDocument {
            record: record.clone(),
            message_id: message_id.to_owned(),
            attachments: attachments.to_vec(),
        };
        self.accept_batch(std::slice::from_ref(&document), limits)?
            .pop()
            .ok_or_else(|| StoreError::Corrupt("the accept batch lost its document".into()))
    }

    /// Stores many verified documents in ONE transaction, each with exactly the
    /// semantics it would have alone: a duplicate message id gets its original record,
    /// a queue limit or a taken business id refuses that document only, and the audit
    /// entries of the accepted ones are chained in the order of `documents`. The limits
    /// are checked and the counters reserved under one lock before the transaction, in
    /// order (so documents of the batch count against each other), and released again
    /// for every document that is not stored. Returns one outcome per document, in order.
    /// A message id given twice is stored once; its second copy is a duplicate.
    pub fn accept_batch(
        &self,
        documents: &[NewDocument],
        limits: &QueueLimits,
    ) -> Result<Vec<Accepted>, StoreError> {
        let mut outcomes: Vec<Option<Accepted>> = Vec::with_capacity(documents.len());
        let mut candidates: Vec<Candidate> = Vec::with_capacity(documents.len());
        let mut seen = std::collections::HashSet::with_capacity(documents.len());
        for (index, document) in documents.iter().enumerate() {
            if let Some(existing) = self.document(&document.message_id)? {
                outcomes.push(Some(Accepted::Duplicate(existing)));
                continue;
            }
            let entry_bytes = document
                .record
                .attachment_bytes
                .saturating_add(document.record.envelope.len() as u64);
            // A second copy of an id in this batch: the transaction finds the first one
            // and answers it as a duplicate; it is never counted nor its bytes written.
            if seen.contains(document.message_id.as_str()) {
                outcomes.push(None);
                candidates.push(Candidate {
                    index,
                    entry_bytes,
                    counted: false,
                });
                continue;
            }
            if let Some(refusal) = self.reserve_pending(&document.record, entry_bytes, limits) {
                outcomes.push(Some(Accepted::OverLimit(refusal)));
                continue;
            }
            seen.insert(document.message_id.as_str());
            outcomes.push(None);
            candidates.push(Candidate {
                index,
                entry_bytes,
                counted: true,
            });
        }
        let stored = self.accept_reserved(documents, &candidates);
        let stored = match stored {
            Ok(stored) => stored,
            Err(error) => {
                self.unreserve(documents, &candidates, |_| true);
                return Err(error);
            }
        };
        let mut not_new = vec![false; documents.len()];
        for (candidate, outcome) in candidates.iter().zip(stored) {
            if !matches!(outcome, Accepted::New)
                && let Some(flag) = not_new.get_mut(candidate.index)
            {
                *flag = true;
            }
            if let Some(slot) = outcomes.get_mut(candidate.index) {
                *slot = Some(outcome);
            }
        }
        self.unreserve(documents, &candidates, |index| {
            not_new.get(index).copied().unwrap_or(true)
        });
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Corrupt("an accept outcome is missing".into())))
            .collect()
    }

    /// Uncounts the candidates for which `release(index)` holds (not stored).
    fn unreserve(
        &self,
        documents: &[NewDocument],
        candidates: &[Candidate],
        release: impl Fn(usize) -> bool,
    ) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for candidate in candidates.iter().filter(|c| c.counted && release(c.index)) {
            let Some(document) = documents.get(candidate.index) else {
                continue;
            };
            for recipient in &document.record.recipients {
                pending.remove(&document.record.sender, recipient, candidate.entry_bytes);
            }
        }
    }

    /// Counts the document in every recipient's queue, unless one limit refuses it.
    fn reserve_pending(
        &self,
        record: &DocumentRecord,
        bytes: u64,
        limits: &QueueLimits,
    ) -> Option<String> {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        for recipient in &record.recipients {
            let queued = pending
                .by_recipient
                .get(recipient)
                .copied()
                .unwrap_or_default();
            let pair = pending
                .by_pair
                .get(&(record.sender.clone(), recipient.clone()))
                .copied()
                .unwrap_or_default();
            if let Some(refusal) = limits.refusal(&record.sender, recipient, queued, pair, bytes) {
                return Some(refusal);
            }
        }
        for recipient in &record.recipients {
            pending.add(&record.sender, recipient, bytes);
        }
        None
    }

    /// Writes the candidates' attachments (one sled batch), then every candidate's
    /// document, business id, queue entries, delivery records, expiry entries and audit
    /// entry in one transaction. Returns one outcome per candidate, in order.
    fn accept_reserved(
        &self,
        documents: &[NewDocument],
        candidates: &[Candidate],
    ) -> Result<Vec<Accepted>, StoreError> {
        struct Prepared<'a> {
            document: &'a NewDocument,
            entry_bytes: u64,
            counted: bool,
            encoded: Vec<u8>,
            sequences: Vec<u64>,
        }
        let mut batch = sled::Batch::default();
        let mut written = std::collections::HashSet::new();
        let mut prepared = Vec::with_capacity(candidates.len());
        for candidate in candidates {
            let document = documents
                .get(candidate.index)
                .ok_or_else(|| StoreError::Corrupt("accept candidate out of range".into()))?;
            let message_id = document.message_id.as_str();
            if written.insert(message_id) {
                for key in self
                    .attachments
                    .scan_prefix(attachment_prefix(message_id))
                    .keys()
                {
                    batch.remove(key?);
                }
                for (index, bytes) in document.attachments.iter().enumerate() {
                    let index = u32::try_from(index)
                        .map_err(|_| StoreError::Corrupt("too many attachments".into()))?;
                    for (chunk, part) in bytes.chunks(CHUNK_BYTES).enumerate() {
                        let chunk = u32::try_from(chunk)
                            .map_err(|_| StoreError::Corrupt("attachment too large".into()))?;
                        batch.insert(attachment_key(message_id, index, chunk), part);
                    }
                }
            }
            prepared.push(Prepared {
                document,
                entry_bytes: candidate.entry_bytes,
                counted: candidate.counted,
                encoded: document.record.encode_to_vec(),
                sequences: Vec::new(),
            });
        }
        self.attachments.apply_batch(batch)?;

        let mut head = self.chain.lock();
        // Sequences taken under the chain lock, which every queue-changing transaction
        // holds: queue entries then commit in sequence order, which lets a session keep
        // its place in the queue (see `session`).
        for item in &mut prepared {
            for _ in &item.document.record.recipients {
                item.sequences.push(self.db.generate_id()?);
            }
        }
        let start = *head;
        let result = (
            &self.documents,
            &self.business_ids,
            &self.queue,
            &self.deliveries,
            &self.expiry,
            &self.audit,
            &*self.db,
            &self.pending_tree,
        )
            .transaction(
                |(documents, business_ids, queue, deliveries, expiry, audit, counters, pending)| {
                    // Rebuilt on every try: a retried transaction starts from scratch.
                    let mut head = start;
                    let mut entries = Vec::new();
                    let mut outcomes = Vec::with_capacity(prepared.len());
                    let mut added = 0u64;
                    for item in &prepared {
                        let record = &item.document.record;
                        let message_id = item.document.message_id.as_str();
                        if let Some(existing) = documents.get(message_id)? {
                            outcomes.push(TxOutcome::Duplicate(existing.to_vec()));
                            continue;
                        }
                        // A second copy whose first was not stored: the same refusal
                        // (it was never counted, so it must not be stored either).
                        if !item.counted {
                            let first = prepared
                                .iter()
                                .position(|p| p.document.message_id == message_id)
                                .and_then(|at| outcomes.get(at).cloned())
                                .unwrap_or(TxOutcome::Unstored);
                            outcomes.push(first);
                            continue;
                        }
                        if !record.business_id.is_empty()
                            && let Some(other) = business_ids.get(record.business_id.as_bytes())?
                            && other.as_ref() != message_id.as_bytes()
                        {
                            outcomes.push(TxOutcome::BusinessIdTaken(
                                String::from_utf8_lossy(&other).into_owned(),
                            ));
                            continue;
                        }
                        documents.insert(message_id.as_bytes(), item.encoded.as_slice())?;
                        added = added.saturating_add(1);
                        if !record.business_id.is_empty() {
                            business_ids
                                .insert(record.business_id.as_bytes(), message_id.as_bytes())?;
                        }
                        for (recipient, seq) in record.recipients.iter().zip(&item.sequences) {
                            let key = queue_key(recipient, *seq);
                            let entry = QueueEntry {
                                message_id: message_id.to_owned(),
                                bytes: item.entry_bytes,
                                enqueued_at_ms: record.accepted_at_ms,
                                expires_at_ms: record.expires_at_ms,
                                sender: record.sender.clone(),
                            };
                            queue.insert(key.as_slice(), entry.encode_to_vec())?;
                            count_in(pending, &record.sender, recipient, item.entry_bytes, true)?;
                            let pair = delivery_key(message_id, recipient);
                            let expires = expiry_key(record.expires_at_ms, &key);
                            expiry.insert(expires.as_slice(), pair.as_slice())?;
                            let delivery = DeliveryRecord {
                                state: DeliveryState::Queued as i32,
                                queue_key: key,
                                expires_at_ms: record.expires_at_ms,
                                expiry_key: expires,
                                ..Default::default()
                            };
                            deliveries.insert(pair, delivery.encode_to_vec())?;
                        }
                        let entry = head.chain(Event {
                            kind: "accepted",
                            message_id: message_id.to_owned(),
                            agency: record.sender.clone(),
                            header_sha256: record.header_sha256.clone(),
                            detail: format!("to {}", record.recipients.join(", ")),
                            at_ms: record.accepted_at_ms,
                        });
                        audit.insert(&entry.seq.to_be_bytes(), entry.encode_to_vec())?;
                        head.advance(&entry);
                        entries.push(entry);
                        outcomes.push(TxOutcome::New);
                    }
                    if added > 0 {
                        let held = counters
                            .get(DOCUMENT_COUNT_KEY)?
                            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                            .map_or(0, u64::from_be_bytes);
                        counters.insert(
                            DOCUMENT_COUNT_KEY,
                            &held.saturating_add(added).to_be_bytes(),
                        )?;
                    }
                    Ok::<_, ConflictableTransactionError<()>>((outcomes, entries))
                },
            );
        let (outcomes, entries) = match result {
            Ok(done) => done,
            Err(TransactionError::Abort(())) => {
                return Err(StoreError::Corrupt("the accept transaction aborted".into()));
            }
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        if let Some(last) = entries.last() {
            head.advance(last);
        }
        drop(head);
        outcomes
            .into_iter()
            .map(|outcome| match outcome {
                // Counted in the pending counters by `reserve_pending` already.
                TxOutcome::New => Ok(Accepted::New),
                TxOutcome::Duplicate(bytes) => Ok(Accepted::Duplicate(decode(&bytes)?)),
                TxOutcome::Unstored => Ok(Accepted::OverLimit(
                    "the first copy of this message id in the batch was refused".into(),
                )),
                TxOutcome::BusinessIdTaken(message_id) => {
                    Ok(Accepted::BusinessIdTaken { message_id })
                }
            })
            .collect()
    }

    /// The attachments of a document, whole, in header order.
    pub fn attachments(&self, message_id: &str, count: u32) -> Result<Vec<Bytes>, StoreError> {
        let mut out = vec![Vec::new(); count as usize];
        let prefix = attachment_prefix(message_id);
        for item in self.attachments.scan_prefix(&prefix) {
            let (key, value) = item?;
            let index_bytes: [u8; 4] = key
                .get(prefix.len()..prefix.len() + 4)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("attachment key".into()))?;
            let index = u32::from_be_bytes(index_bytes) as usize;
            let slot = out
                .get_mut(index)
                .ok_or_else(|| StoreError::Corrupt("attachment index out of range".into()))?;
            slot.extend_from_slice(&value);
        }
        Ok(out.into_iter().map(Bytes::from).collect())
    }

    /// The first queue entry of `recipient` strictly after `after` (a queue key).
    pub fn next_queued(
        &self,
        recipient: &str,
        after: Option<&[u8]>,
    ) -> Result<Option<(Vec<u8>, QueueEntry)>, StoreError> {
        let start = match after {
            Some(key) => {
                let mut k = key.to_vec();
                k.push(0);
                k
            }
            None => recipient.as_bytes().to_vec(),
        };
        let mut end = recipient.as_bytes().to_vec();
        end.push(0xff);
        for item in self.queue.range(start..end) {
            let (key, value) = item?;
            if key.starts_with(recipient.as_bytes()) {
                return Ok(Some((key.to_vec(), decode(&value)?)));
            }
        }
        Ok(None)
    }

    /// Queue depth of `recipient` from the in-memory counters, and its oldest entry.
    pub fn queue_stats(&self, recipient: &str) -> Result<QueueStats, StoreError> {
        let pending = self.pending(recipient);
        let oldest = self
            .next_queued(recipient, None)?
            .map(|(_, entry)| entry.enqueued_at_ms);
        Ok(QueueStats {
            pending: pending.documents,
            pending_bytes: pending.bytes,
            oldest_enqueued_ms: oldest,
        })
    }

    /// Deliveries to `recipient` settled (delivered, dead-lettered) in the last hour and
    /// day before `now_ms`, counted since this broker started (not kept across restarts).
    pub fn recent_counts(&self, recipient: &str, now_ms: i64) -> crate::recent::Counts {
        self.recent.counts(recipient, now_ms)
    }

    /// Pending documents and bytes queued for `recipient`.
    pub fn pending(&self, recipient: &str) -> Pending {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_recipient
            .get(recipient)
            .copied()
            .unwrap_or_default()
    }

    /// Pending documents and bytes from `sender` queued for `recipient`.
    pub fn pending_from(&self, sender: &str, recipient: &str) -> Pending {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_pair
            .get(&(sender.to_owned(), recipient.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    pub fn delivery(
        &self,
        message_id: &str,
        recipient: &str,
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        self.deliveries
            .get(delivery_key(message_id, recipient))?
            .map(|v| decode(&v))
            .transpose()
    }

    fn update_delivery(
        &self,
        message_id: &str,
        recipient: &str,
        change: impl Fn(&mut DeliveryRecord),
    ) -> Result<Option<DeliveryRecord>, StoreError> {
        let key = delivery_key(message_id, recipient);
        let updated = self.deliveries.update_and_fetch(&key, |old| {
            let mut record: DeliveryRecord = old.and_then(|b| DeliveryRecord::decode(b).ok())?;
            change(&mut record);
            Some(record.encode_to_vec())
        })?;
        updated.map(|v| decode(&v)).transpose()
    }

    /// Counts a push attempt; returns the attempt number.
    pub fn record_attempt(
        &self,
        message_id: &str,
        recipient: &str,
        at_ms: i64,
    ) -> Result<u32, StoreError> {
        let record = self.update_delivery(message_id, recipient, |record| {
            record.attempts = record.attempts.saturating_add(1);
            record.last_attempt_at_ms = at_ms;
            push_attempt(record, at_ms, "pushed");
        })?;
        Ok(record.map(|r| r.attempts).unwrap_or(0))
    }

    /// Records what became of the latest push attempt (e.g. no acknowledgement in time).
    pub fn resolve_attempt(
        &self,
        message_id: &str,
        recipient: &str,
        outcome: &str,
    ) -> Result<(), StoreError> {
        self.update_delivery(message_id, recipient, |record| {
            resolve_last(record, outcome)
        })?;
        Ok(())
    }

    /// Ends a delivery. `Delivered` is accepted while queued and also after it became a
    /// dead letter (a late receipt still proves delivery); `Dead` only while queued.
    /// Returns false when there was nothing to settle. [`Store::settle_batch`] of one.
    pub fn settle(
        &self,
        message_id: &str,
        recipient: &str,
        settlement: Settlement,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let item = Settle {
            message_id: message_id.to_owned(),
            recipient: recipient.to_owned(),
            settlement,
        };
        Ok(self
            .settle_batch(std::slice::from_ref(&item), at_ms)?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Ends many deliveries in ONE transaction, each exactly as [`Store::settle`] would
    /// alone (in order: a second settlement of the same delivery finds it settled), with
    /// their audit entries chained in order. Returns, per item, whether it settled.
    pub fn settle_batch(&self, items: &[Settle], at_ms: i64) -> Result<Vec<bool>, StoreError> {
        struct Prepared<'a> {
            item: &'a Settle,
            key: Vec<u8>,
            dead_key: Vec<u8>,
            sender: String,
            event: Event,
        }
        let mut prepared = Vec::with_capacity(items.len());
        for item in items {
            let (header_sha256, sender) = self
                .document(&item.message_id)?
                .map(|d| (d.header_sha256, d.sender))
                .unwrap_or_default();
            let event = match &item.settlement {
                Settlement::Delivered { .. } => Event {
                    kind: "delivered",
                    detail: "signed delivery receipt".into(),
                    ..Event::default()
                },
                Settlement::Recalled { reason, .. } => Event {
                    kind: "recalled",
                    detail: reason.clone(),
                    ..Event::default()
                },
                Settlement::Dead { state, reason, .. } => Event {
                    kind: "dead_letter",
                    detail: format!(
                        "{}: {reason}",
                        if *state == DeliveryState::Refused {
                            "refused"
                        } else {
                            "expired"
                        }
                    ),
                    ..Event::default()
                },
            };
            prepared.push(Prepared {
                item,
                key: delivery_key(&item.message_id, &item.recipient),
                dead_key: dead_letter_key(&item.recipient, &item.message_id),
                sender,
                event: Event {
                    message_id: item.message_id.clone(),
                    agency: item.recipient.clone(),
                    header_sha256,
                    at_ms,
                    ..event
                },
            });
        }
        let mut head = self.chain.lock();
        let start = *head;
        let result = (
            &self.queue,
            &self.deliveries,
            &self.expiry,
            &self.dead_letters,
            &self.audit,
            &self.pending_tree,
        )
            .transaction(
                |(queue, deliveries, expiry, dead_letters, audit, pending)| {
                    // Rebuilt on every try: a retried transaction starts from scratch.
                    let mut head = start;
                    let mut entries = Vec::new();
                    // Per item: None = nothing settled; Some((freed queue entry bytes,
                    // dead letters added (+1) or removed (-1))).
                    let mut outcomes: Vec<Option<(Option<u64>, i8)>> =
                        Vec::with_capacity(prepared.len());
                    for p in &prepared {
                        let Some(bytes) = deliveries.get(&p.key)? else {
                            outcomes.push(None);
                            continue;
                        };
                        let mut record = DeliveryRecord::decode(bytes.as_ref())
                            .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
                        let queued = record.state == DeliveryState::Queued as i32;
                        let dead = record.state == DeliveryState::Expired as i32
                            || record.state == DeliveryState::Refused as i32
                            || record.state == DeliveryState::Recalled as i32;
                        let mut freed = None;
                        let mut dead_delta = 0i8;
                        match &p.item.settlement {
                            Settlement::Delivered { receipt } if queued || dead => {
                                record.state = DeliveryState::Delivered as i32;
                                record.receipt = receipt.clone();
                                record.delivered_at_ms = at_ms;
                                resolve_last(&mut record, "acknowledged");
                            }
                            Settlement::Dead {
                                state,
                                reason,
                                notice,
                            } if queued => {
                                record.state = *state as i32;
                                record.reason = reason.clone();
                                record.notice = notice.clone();
                                record.dead_at_ms = at_ms;
                                resolve_last(
                                    &mut record,
                                    if *state == DeliveryState::Refused {
                                        "refused"
                                    } else {
                                        "expired"
                                    },
                                );
                                if dead_letters
                                    .insert(p.dead_key.as_slice(), &[] as &[u8])?
                                    .is_none()
                                {
                                    dead_delta = 1;
                                }
                            }
                            Settlement::Recalled { reason, notice } if queued => {
                                record.state = DeliveryState::Recalled as i32;
                                record.reason = reason.clone();
                                record.notice = notice.clone();
                                record.dead_at_ms = at_ms;
                                resolve_last(&mut record, "recalled");
                            }
                            _ => {
                                outcomes.push(None);
                                continue;
                            }
                        }
                        if queued {
                            if let Some(entry) = queue.remove(record.queue_key.as_slice())? {
                                let entry = QueueEntry::decode(entry.as_ref()).map_err(|e| {
                                    ConflictableTransactionError::Abort(e.to_string())
                                })?;
                                // The in-memory counters use the document's sender too.
                                count_in(
                                    pending,
                                    &p.sender,
                                    &p.item.recipient,
                                    entry.bytes,
                                    false,
                                )?;
                                freed = Some(entry.bytes);
                            }
                            expiry.remove(record.expiry_key.as_slice())?;
                            record.queue_key.clear();
                            record.expiry_key.clear();
                        } else if dead_letters.remove(p.dead_key.as_slice())?.is_some() {
                            dead_delta = -1;
                        }
                        deliveries.insert(p.key.as_slice(), record.encode_to_vec())?;
                        let entry = head.chain(p.event.clone());
                        audit.insert(&entry.seq.to_be_bytes(), entry.encode_to_vec())?;
                        head.advance(&entry);
                        entries.push(entry);
                        outcomes.push(Some((freed, dead_delta)));
                    }
                    Ok((outcomes, entries))
                },
            );
        let (outcomes, entries) = match result {
            Ok(done) => done,
            Err(TransactionError::Abort(detail)) => return Err(StoreError::Corrupt(detail)),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        if let Some(last) = entries.last() {
            head.advance(last);
        }
        drop(head);
        let mut settled = Vec::with_capacity(outcomes.len());
        for (p, outcome) in prepared.iter().zip(outcomes) {
            let Some((freed, dead_delta)) = outcome else {
                settled.push(false);
                continue;
            };
            if let Some(bytes) = freed {
                self.adjust_pending(&p.sender, &p.item.recipient, bytes, false);
            }
            self.adjust_dead_letters(&p.item.recipient, dead_delta);
            match p.item.settlement {
                Settlement::Delivered { .. } => {
                    self.recent
                        .record(&p.item.recipient, crate::recent::Outcome::Delivered, at_ms);
                }
                Settlement::Dead { .. } => {
                    self.recent.record(
                        &p.item.recipient,
                        crate::recent::Outcome::DeadLettered,
                        at_ms,
                    );
                }
                Settlement::Recalled { .. } => {}
            }
            settled.push(true);
        }
        Ok(settled)
    }

    /// Dead letters to `recipient` held now.
    pub fn dead_letter_count(&self, recipient: &str) -> u64 {
        self.dead_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(recipient)
            .copied()
            .unwrap_or(0)
    }

    fn adjust_dead_letters(&self, recipient: &str, delta: i8) {
        if delta == 0 {
            return;
        }
        let mut counts = self
            .dead_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(recipient.to_owned()).or_default();
        *count = if delta > 0 {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
    }

    /// Adds (`queued`) or removes one document of `bytes` from `sender` to the counters
    /// of `recipient` and of the pair.
    fn adjust_pending(&self, sender: &str, recipient: &str, bytes: u64, queued: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if queued {
            pending.add(sender, recipient, bytes);
        } else {
            pending.remove(sender, recipient, bytes);
        }
    }

    /// Queued deliveries whose expiry is at or before `now_ms`, oldest expiry first, at
    /// most `limit` of them: (message id, recipient).
    pub fn expired_due(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let end = u64::try_from(now_ms.max(0))
            .unwrap_or(0)
            .saturating_add(1)
            .to_be_bytes();
        let mut due = Vec::new();
        for item in self.expiry.range(..end.to_vec()).take(limit) {
            let (_, pair) = item?;
            if let Some(pair) = split_pair(&pair) {
                due.push(pair);
            }
        }
        Ok(due)
    }

    /// Dead letters, for one recipient or all.
    pub fn dead_letters(
        &self,
        recipient: Option<&str>,
    ) -> Result<Vec<DeadLetterEntry>, StoreError> {
        let prefix = recipient.map(|r| {
            let mut p = r.as_bytes().to_vec();
            p.push(0);
            p
        });
        let mut out = Vec::new();
        for item in self.dead_letters.scan_prefix(prefix.unwrap_or_default()) {
            let (key, _) = item?;
            let Some((recipient, message_id)) = split_pair(&key) else {
                continue;
            };
            if let Some(record) = self.delivery(&message_id, &recipient)? {
                out.push(DeadLetterEntry {
                    message_id,
                    recipient,
                    record,
                });
            }
        }
        Ok(out)
    }

    /// Queues a dead letter again under the same message id, with a new expiry; the
    /// audit entry names `operator`. Returns false when it is not a dead letter.
    pub fn redrive(
        &self,
        message_id: &str,
        recipient: &str,
        expires_at_ms: i64,
        now_ms: i64,
        operator: &str,
    ) -> Result<bool, StoreError> {
        let Some(document) = self.document(message_id)? else {
            return Ok(false);
        };
        let bytes = document
            .attachment_bytes
            .saturating_add(document.envelope.len() as u64);
        let mut head = self.chain.lock();
        // Under the chain lock: queue entries commit in sequence order (see accept).
        let seq = self.db.generate_id()?;
        let key = delivery_key(message_id, recipient);
        let dead_key = dead_letter_key(recipient, message_id);
        let queue_key = queue_key(recipient, seq);
        let audit_entry = head.chain(Event {
            kind: "redriven",
            message_id: message_id.to_owned(),
            agency: recipient.to_owned(),
            header_sha256: document.header_sha256.clone(),
            detail: format!("queued again by operator {operator}"),
            at_ms: now_ms,
        });
        let audit_key = audit_entry.seq.to_be_bytes();
        let audit_bytes = audit_entry.encode_to_vec();
        let result = (
            &self.queue,
            &self.deliveries,
            &self.expiry,
            &self.dead_letters,
            &self.audit,
            &self.pending_tree,
        )
            .transaction(
                |(queue, deliveries, expiry, dead_letters, audit, pending)| {
                    let Some(current) = deliveries.get(&key)? else {
                        return Ok(None);
                    };
                    let mut record = DeliveryRecord::decode(current.as_ref())
                        .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
                    if record.state != DeliveryState::Expired as i32
                        && record.state != DeliveryState::Refused as i32
                    {
                        return Ok(None);
                    }
                    let entry = QueueEntry {
                        message_id: message_id.to_owned(),
                        bytes,
                        enqueued_at_ms: now_ms,
                        expires_at_ms,
                        sender: document.sender.clone(),
                    };
                    queue.insert(queue_key.as_slice(), entry.encode_to_vec())?;
                    count_in(pending, &document.sender, recipient, bytes, true)?;
                    let expires = expiry_key(expires_at_ms, &queue_key);
                    expiry.insert(expires.as_slice(), key.as_slice())?;
                    let was_dead = dead_letters.remove(dead_key.as_slice())?.is_some();
                    record.state = DeliveryState::Queued as i32;
                    record.queue_key = queue_key.clone();
                    record.expiry_key = expires;
                    record.expires_at_ms = expires_at_ms;
                    record.reason.clear();
                    record.notice.clear();
                    record.dead_at_ms = 0;
                    push_attempt(&mut record, now_ms, "redriven");
                    deliveries.insert(key.as_slice(), record.encode_to_vec())?;
                    audit.insert(&audit_key, audit_bytes.as_slice())?;
                    Ok(Some(was_dead))
                },
            );
        if matches!(result, Ok(Some(_))) {
            head.advance(&audit_entry);
        }
        drop(head);
        match result {
            Ok(Some(was_dead)) => {
                self.adjust_pending(&document.sender, recipient, bytes, true);
                if was_dead {
                    self.adjust_dead_letters(recipient, -1);
                }
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(TransactionError::Abort(detail)) => Err(StoreError::Corrupt(detail)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    /// Registers `code` under `name`; the audit entry names who did it (`by`, e.g.
    /// "operator NAME"), or says it was automatic. False when already registered.
    pub fn register_agency(
        &self,
        code: &str,
        name: &str,
        auto: bool,
        at_ms: i64,
        by: &str,
    ) -> Result<bool, StoreError> {
        let record = AgencyRecord {
            name: name.to_owned(),
            registered_at_ms: at_ms,
            auto_registered: auto,
            ..Default::default()
        };
        let inserted = self
            .agencies
            .compare_and_swap(code, None as Option<&[u8]>, Some(record.encode_to_vec()))?
            .is_ok();
        if inserted {
            self.append_audit(Event {
                kind: "agency_registered",
                agency: code.to_owned(),
                detail: if auto {
                    "automatically on its first connection".into()
                } else {
                    format!("{name} (registered by {by})")
                },
                at_ms,
                ..Event::default()
            })?;
        }
        Ok(inserted)
    }

    pub fn agency(&self, code: &str) -> Result<Option<AgencyRecord>, StoreError> {
        self.agencies.get(code)?.map(|v| decode(&v)).transpose()
    }

    /// Suspends (`Some((reason, at_ms))`) or resumes (`None`) a registered agency; the
    /// audit entry names who did it (`by`). Returns the updated record, or None when the
    /// agency is not registered.
    pub fn set_suspended(
        &self,
        code: &str,
        suspension: Option<(&str, i64)>,
        by: &str,
    ) -> Result<Option<AgencyRecord>, StoreError> {
        let updated = self.agencies.update_and_fetch(code, |old| {
            let mut record: AgencyRecord = old.and_then(|b| AgencyRecord::decode(b).ok())?;
            match suspension {
                Some((reason, at_ms)) => {
                    record.suspended = true;
                    record.suspended_reason = reason.to_owned();
                    record.suspended_at_ms = at_ms;
                }
                None => {
                    record.suspended = false;
                    record.suspended_reason.clear();
                    record.suspended_at_ms = 0;
                }
            }
            Some(record.encode_to_vec())
        })?;
        let updated: Option<AgencyRecord> = updated.map(|v| decode(&v)).transpose()?;
        if let Some(record) = &updated {
            self.append_audit(Event {
                kind: if record.suspended {
                    "agency_suspended"
                } else {
                    "agency_resumed"
                },
                agency: code.to_owned(),
                detail: if record.suspended {
                    format!("{} (suspended by {by})", record.suspended_reason)
                } else {
                    format!("resumed by {by}")
                },
                at_ms: suspension.map_or_else(lienthong_proto::now_ms, |(_, at)| at),
                ..Event::default()
            })?;
        }
        Ok(updated)
    }

    /// Message ids of the documents from `sender` queued for `recipient`, oldest first.
    pub fn queued_from(&self, sender: &str, recipient: &str) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        for item in self.queue.scan_prefix(recipient.as_bytes()) {
            let (_, value) = item?;
            let entry: QueueEntry = decode(&value)?;
            let from = if entry.sender.is_empty() {
                self.document(&entry.message_id)?
                    .map(|d| d.sender)
                    .unwrap_or_default()
            } else {
                entry.sender
            };
            if from == sender {
                ids.push(entry.message_id);
            }
        }
        Ok(ids)
    }

    /// Records an operator's action that is not a single delivery's change (e.g. a
    /// purge: who, what and how many) in the audit log.
    pub fn audit_operator_action(
        &self,
        kind: &'static str,
        agency: &str,
        detail: String,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.append_audit(Event {
            kind,
            agency: agency.to_owned(),
            detail,
            at_ms,
            ..Event::default()
        })
    }

    /// Appends an entry for a change already written (not in its transaction).
    fn append_audit(&self, event: Event) -> Result<(), StoreError> {
        let mut head = self.chain.lock();
        let entry = head.chain(event);
        self.audit
            .insert(entry.seq.to_be_bytes(), entry.encode_to_vec())?;
        head.advance(&entry);
        Ok(())
    }

    /// The last `n` audit entries, oldest first.
    pub fn audit_tail(&self, n: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let mut entries = self
            .audit
            .iter()
            .rev()
            .take(n)
            .map(|item| {
                let (_, value) = item?;
                decode(&value)
            })
            .collect::<Result<Vec<AuditRecord>, StoreError>>()?;
        entries.reverse();
        Ok(entries)
    }

    /// Walks the whole audit chain from its first entry; reports the first break.
    pub fn audit_verify(&self) -> Result<audit::Verification, StoreError> {
        Ok(audit::verify(self.audit.iter())?)
    }

    pub fn is_registered(&self, code: &str) -> Result<bool, StoreError> {
        Ok(self.agencies.contains_key(code)?)
    }

    pub fn agencies(&self) -> Result<Vec<(String, AgencyRecord)>, StoreError> {
        self.agencies
            .iter()
            .map(|item| {
                let (key, value) = item?;
                Ok((String::from_utf8_lossy(&key).into_owned(), decode(&value)?))
            })
            .collect()
    }

    /// Number of stored documents.
    pub fn document_count(&self) -> usize {
        self.db
            .get(DOCUMENT_COUNT_KEY)
            .ok()
            .flatten()
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, |b| {
                usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX)
            })
    }

    /// Flushes sled; used at shutdown.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.durable().await
    }

    /// Makes everything durable, drops this handle and waits until sled's files are
    /// released, so that the directory can be opened again in this process. Returns
    /// only once every other clone of this store has been dropped too.
    pub async fn release(self) -> Result<(), StoreError> {
        self.durable().await?;
        let commit = self.commit.clone();
        let dir = self.dir.clone();
        drop(self);
        commit.finish().await;
        wait_until_unlocked(&dir).await
    }
}

/// Waits until sled's lock on its data file in `dir` is gone: sled's own threads can
/// hold the file for a moment after the last handle is dropped, and close it then.
async fn wait_until_unlocked(dir: &Path) -> Result<(), StoreError> {
    use rustix::fs::{FlockOperation, flock};
    let failed = |detail: String| StoreError::Open {
        path: dir.to_owned(),
        detail,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let file = std::fs::File::open(sled_data_file(dir)).map_err(|e| failed(e.to_string()))?;
        // Dropping `file` releases this probe's own lock again.
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::WOULDBLOCK) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Err(e) => return Err(failed(format!("the store is still locked: {e}"))),
        }
    }
}

fn push_attempt(record: &mut DeliveryRecord, at_ms: i64, outcome: &str) {
    record.attempt_log.push(AttemptRecord {
        at_ms,
        outcome: outcome.to_owned(),
    });
    if record.attempt_log.len() > ATTEMPT_LOG_LEN {
        let excess = record.attempt_log.len() - ATTEMPT_LOG_LEN;
        record.attempt_log.drain(..excess);
    }
}

fn resolve_last(record: &mut DeliveryRecord, outcome: &str) {
    if let Some(last) = record.attempt_log.last_mut()
        && last.outcome == "pushed"
    {
        last.outcome = outcome.to_owned();
    }
}

/// True when no tree of `db` holds a single key.
fn holds_no_data(db: &sled::Db) -> Result<bool, StoreError> {
    for name in db.tree_names() {
        if !db.open_tree(&name)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(db.is_empty())
}

/// The `pending` tree's key of a (sender, recipient) pair.
fn pending_key(sender: &str, recipient: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(recipient.len() + 1 + sender.len());
    key.extend_from_slice(recipient.as_bytes());
    key.push(0);
    key.extend_from_slice(sender.as_bytes());
    key
}

fn encode_pending(p: Pending) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&p.documents.to_be_bytes());
    value[8..].copy_from_slice(&p.bytes.to_be_bytes());
    value
}

fn decode_pending(value: &[u8]) -> Option<Pending> {
    let documents = <[u8; 8]>::try_from(value.get(..8)?).ok()?;
    let bytes = <[u8; 8]>::try_from(value.get(8..16)?).ok()?;
    Some(Pending {
        documents: u64::from_be_bytes(documents),
        bytes: u64::from_be_bytes(bytes),
    })
}

/// Counts one queue entry of `bytes` in (`add`) or out of the persisted counter of
/// (sender, recipient), inside the transaction that changes the queue tree; with the
/// same saturating arithmetic as the in-memory counters, and a pair at zero removed.
fn count_in(
    pending: &sled::transaction::TransactionalTree,
    sender: &str,
    recipient: &str,
    bytes: u64,
    add: bool,
) -> Result<(), sled::transaction::UnabortableTransactionError> {
    let key = pending_key(sender, recipient);
    let mut held = pending
        .get(&key)?
        .and_then(|v| decode_pending(&v))
        .unwrap_or_default();
    if add {
        held.documents = held.documents.saturating_add(1);
        held.bytes = held.bytes.saturating_add(bytes);
    } else {
        held.documents = held.documents.saturating_sub(1);
        held.bytes = held.bytes.saturating_sub(bytes);
    }
    if held.documents == 0 {
        pending.remove(key)?;
    } else {
        pending.insert(key, &encode_pending(held)[..])?;
    }
    Ok(())
}

/// The pending counters at open: read from the `pending` tree when it is marked as
/// mirroring the queue tree; otherwise (a store from before it, or a crash while it
/// was being built) from a walk of the queue tree, which is then written to the
/// `pending` tree and marked, durably, before anything else can change the queue.
fn load_pending(
    db: &sled::Db,
    pending_tree: &sled::Tree,
    queue: &sled::Tree,
    documents: &sled::Tree,
) -> Result<PendingCounts, StoreError> {
    if db.get(PENDING_TREE_KEY)?.is_some() {
        let mut counts = PendingCounts::default();
        for item in pending_tree.iter() {
            let (key, value) = item?;
            let (recipient, sender) = split_pair(&key)
                .ok_or_else(|| StoreError::Corrupt("pending counter key".into()))?;
            let held = decode_pending(&value)
                .ok_or_else(|| StoreError::Corrupt("pending counter value".into()))?;
            let total = counts.by_recipient.entry(recipient.clone()).or_default();
            total.documents = total.documents.saturating_add(held.documents);
            total.bytes = total.bytes.saturating_add(held.bytes);
            counts.by_pair.insert((sender, recipient), held);
        }
        return Ok(counts);
    }
    let counts = count_pending(queue, documents)?;
    pending_tree.clear()?;
    let mut batch = sled::Batch::default();
    for ((sender, recipient), held) in &counts.by_pair {
        if held.documents > 0 {
            batch.insert(pending_key(sender, recipient), &encode_pending(*held)[..]);
        }
    }
    pending_tree.apply_batch(batch)?;
    db.flush()?;
    db.insert(PENDING_TREE_KEY, &[1u8][..])?;
    db.flush()?;
    Ok(counts)
}

/// Rebuilds the pending counters from the queue tree (entries written before the
/// sender was kept in them find it in the document record).
fn count_pending(queue: &sled::Tree, documents: &sled::Tree) -> Result<PendingCounts, StoreError> {
    let mut pending = PendingCounts::default();
    for item in queue.iter() {
        let (key, value) = item?;
        let recipient =
            String::from_utf8_lossy(key.get(..key.len().saturating_sub(8)).unwrap_or_default())
                .into_owned();
        let entry: QueueEntry = decode(&value)?;
        let sender = if entry.sender.is_empty() {
            documents
                .get(entry.message_id.as_bytes())?
                .map(|v| decode::<DocumentRecord>(&v))
                .transpose()?
                .map(|d| d.sender)
                .unwrap_or_default()
        } else {
            entry.sender
        };
        pending.add(&sender, &recipient, entry.bytes);
    }
    Ok(pending)
}

/// A document of an accept batch that goes into the transaction.
struct Candidate {
    index: usize,
    /// What its queue entries count: attachments and the encoded envelope.
    entry_bytes: u64,
    /// Counted in the pending counters (false for a second copy of an id in the batch).
    counted: bool,
}

/// One candidate's outcome inside the accept transaction.
#[derive(Clone)]
enum TxOutcome {
    New,
    /// A second copy of an id whose first copy was refused for its queue limit.
    Unstored,
    Duplicate(Vec<u8>),
    BusinessIdTaken(String),
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
mod audit_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn audit_chain_survives_a_restart_and_verify_finds_the_first_break() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = Store::open(&path).unwrap();
        store
            .register_agency("000.00.00.H31", "UBND", false, 1, "test")
            .unwrap();
        store
            .register_agency("000.00.12.H31", "STC", false, 2, "test")
            .unwrap();
        store
            .set_suspended("000.00.12.H31", Some(("kiểm tra", 3)), "test")
            .unwrap();
        let verified = store.audit_verify().unwrap();
        assert_eq!(verified.entries, 3);
        assert_eq!(verified.first_break, None);
        store.release().await.unwrap();

        // The head is reloaded: new entries chain on.
        let store = Store::open(&path).unwrap();
        store.set_suspended("000.00.12.H31", None, "test").unwrap();
        let tail = store.audit_tail(2).unwrap();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0].kind, "agency_suspended");
        assert_eq!(tail[1].kind, "agency_resumed");
        assert_eq!(tail[1].seq, 3);
        assert_eq!(tail[1].prev_hash, tail[0].hash);
        let intact = store.audit_verify().unwrap();
        assert_eq!((intact.entries, intact.first_break.clone()), (4, None));
        assert_eq!(intact.head_hash, tail[1].hash);

        // A changed entry is found, at its seq.
        let mut changed = store.audit_tail(4).unwrap()[1].clone();
        changed.detail = "Sở Tài chính".into();
        store
            .audit
            .insert(1u64.to_be_bytes(), changed.encode_to_vec())
            .unwrap();
        let broken = store.audit_verify().unwrap();
        assert_eq!(broken.entries, 1);
        let (seq, detail) = broken.first_break.unwrap();
        assert_eq!(seq, 1);
        assert!(detail.contains("changed"), "{detail}");

        // A changed entry whose hash was recomputed breaks the link to the next one.
        changed.hash = audit::hash_of(&changed).to_vec();
        store
            .audit
            .insert(1u64.to_be_bytes(), changed.encode_to_vec())
            .unwrap();
        let (seq, detail) = store.audit_verify().unwrap().first_break.unwrap();
        assert_eq!(seq, 2);
        assert!(detail.contains("previous entry's hash"), "{detail}");

        // A removed entry is found too.
        store.audit.remove(1u64.to_be_bytes()).unwrap();
        let (seq, detail) = store.audit_verify().unwrap().first_break.unwrap();
        assert_eq!(seq, 1);
        assert!(detail.contains("missing"), "{detail}");
    }

    fn record(sender: &str, recipients: &[&str], size: u64) -> DocumentRecord {
        DocumentRecord {
            envelope: vec![1; 100],
            header_sha256: vec![2; 32],
            accepted_at_ms: 1,
            sender: sender.to_owned(),
            recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
            attachment_bytes: size,
            expires_at_ms: i64::MAX / 2,
            ..Default::default()
        }
    }

    fn counts(store: &Store) -> Vec<(String, Pending)> {
        let mut out = Vec::new();
        for r in ["000.00.12.H31", "000.00.15.H31"] {
            out.push((r.to_owned(), store.pending(r)));
            for s in ["000.00.00.H31", "000.00.15.H31"] {
                out.push((format!("{s}->{r}"), store.pending_from(s, r)));
            }
        }
        out
    }

    #[tokio::test]
    async fn pending_counters_persist_exactly_and_are_rebuilt_without_their_marker() {
        let (a, b, c) = ("000.00.00.H31", "000.00.12.H31", "000.00.15.H31");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = Store::open(&path).unwrap();
        let documents: Vec<NewDocument> = (0..6u64)
            .map(|i| NewDocument {
                record: record(if i % 2 == 0 { a } else { c }, &[b, c], 10 * i),
                message_id: format!("m{i}"),
                attachments: Vec::new(),
            })
            .collect();
        let outcomes = store
            .accept_batch(&documents, &QueueLimits::none())
            .unwrap();
        assert!(outcomes.iter().all(|o| matches!(o, Accepted::New)));
        let settled = store
            .settle_batch(
                &[
                    Settle {
                        message_id: "m1".into(),
                        recipient: b.into(),
                        settlement: Settlement::Delivered { receipt: vec![3] },
                    },
                    Settle {
                        message_id: "m2".into(),
                        recipient: c.into(),
                        settlement: Settlement::Dead {
                            state: DeliveryState::Refused,
                            reason: "no".into(),
                            notice: vec![4],
                        },
                    },
                    // Settled twice in one batch: the second finds nothing to settle.
                    Settle {
                        message_id: "m1".into(),
                        recipient: b.into(),
                        settlement: Settlement::Delivered { receipt: vec![3] },
                    },
                ],
                2,
            )
            .unwrap();
        assert_eq!(settled, vec![true, true, false]);
        assert!(store.redrive("m2", c, i64::MAX / 2, 3, "test").unwrap());
        let before = counts(&store);
        assert_eq!(store.pending(b).documents, 5);
        store.release().await.unwrap();

        // Read back from the `pending` tree.
        let store = Store::open(&path).unwrap();
        assert_eq!(counts(&store), before);
        let walked = count_pending(&store.queue, &store.documents).unwrap();
        assert_eq!(store.pending(b), walked.by_recipient[b]);
        // Without the marker (a store from before the tree): rebuilt from a walk.
        store.db.remove(PENDING_TREE_KEY).unwrap();
        store.pending_tree.clear().unwrap();
        store.release().await.unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(counts(&store), before);
        assert!(store.db.get(PENDING_TREE_KEY).unwrap().is_some());
        store.release().await.unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(counts(&store), before);
        store.release().await.unwrap();
    }
}

#[cfg(test)]
mod format_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[tokio::test]
    async fn a_store_written_by_a_newer_version_is_refused_untouched_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let store = Store::open(&path).unwrap();
        store
            .register_agency("000.00.00.H31", "UBND", false, 1, "test")
            .unwrap();
        store.release().await.unwrap();
        {
            let db = open_sled(&path).unwrap();
            db.insert(FORMAT_KEY, b"lienthong-broker/2".as_slice())
                .unwrap();
            db.flush().unwrap();
        }
        let Err(refused) = Store::open(&path) else {
            panic!("a newer store opened");
        };
        let text = refused.to_string();
        assert!(text.contains("newer version"), "{text}");
        assert!(text.contains("lienthong-broker/2"), "{text}");
        // Refused untouched: the marker and the data are as they were.
        let db = open_sled(&path).unwrap();
        assert_eq!(
            db.get(FORMAT_KEY).unwrap().unwrap().as_ref(),
            b"lienthong-broker/2"
        );
        assert!(db.open_tree("agencies").unwrap().len() == 1);
    }
}
