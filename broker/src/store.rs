//! The broker's durable state in sled, behind a narrow interface (so a replicated store
//! can replace it later).
//!
//! Trees and keys:
//! - `meta`: `format` → [`FORMAT`]; a directory without it is not ours and is refused.
//! - `documents`: message id → [`DocumentRecord`].
//! - `attachments`: message id ‖ 0 ‖ index (u32 BE) ‖ chunk (u32 BE) → ≤ 64 KiB of bytes.
//! - `business_ids`: business document id → message id (a business id names one content).
//! - `queue`: recipient code (13 bytes) ‖ sequence (u64 BE) → [`QueueEntry`]; per-recipient
//!   FIFO order, sequences from `generate_id`, which only grows, even across restarts.
//! - `deliveries`: message id ‖ 0 ‖ recipient → [`DeliveryRecord`].
//! - `agencies`: code → [`AgencyRecord`].
//!
//! Invariants: a document, its business id, its queue entries and delivery records are
//! written in one transaction, after its attachments; nothing is acknowledged before
//! [`Store::durable`] returns. A queue entry exists exactly while its delivery record is
//! `Queued`.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use lienthong_proto::pb::DeliveryState;
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, abort};

use crate::commit::{CommitError, GroupCommit, sled_data_file};
use crate::records::{AgencyRecord, DeliveryRecord, DocumentRecord, QueueEntry};

/// Written into `meta` when a store is created.
pub const FORMAT: &[u8] = b"lienthong-broker/1";
/// Attachments are stored in chunks of this size.
pub const CHUNK_BYTES: usize = 64 * 1024;

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

/// The outcome of [`Store::accept`].
#[derive(Debug)]
pub enum Accepted {
    New,
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

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    documents: sled::Tree,
    attachments: sled::Tree,
    business_ids: sled::Tree,
    queue: sled::Tree,
    deliveries: sled::Tree,
    agencies: sled::Tree,
    commit: GroupCommit,
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
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| open_error(format!("cannot open the store (corrupt or in use?): {e}")))?;
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            Some(format) if format.as_ref() == FORMAT => {}
            Some(other) => {
                return Err(open_error(format!(
                    "store format {:?} is not {:?}",
                    String::from_utf8_lossy(&other),
                    String::from_utf8_lossy(FORMAT)
                )));
            }
            None if fresh => {
                meta.insert("format", FORMAT)?;
                db.flush()?;
            }
            None => {
                return Err(open_error(
                    "a sled database without the lienthong broker format marker".into(),
                ));
            }
        }
        let commit = GroupCommit::start(db.clone(), dir)
            .map_err(|e| open_error(format!("cannot open the data file for syncing: {e}")))?;
        Ok(Self {
            documents: db.open_tree("documents")?,
            attachments: db.open_tree("attachments")?,
            business_ids: db.open_tree("business_ids")?,
            queue: db.open_tree("queue")?,
            deliveries: db.open_tree("deliveries")?,
            agencies: db.open_tree("agencies")?,
            db,
            commit,
        })
    }

    /// Waits until every write made before this call is on disk (group commit).
    pub async fn durable(&self) -> Result<(), StoreError> {
        Ok(self.commit.durable().await?)
    }

    /// False after a failed flush: the store then refuses writes.
    pub fn is_writable(&self) -> bool {
        !self.commit.is_poisoned()
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
    /// first: if the process dies before the transaction, they are unreferenced bytes
    /// that the next submission of the same message id overwrites with the same content
    /// (the header binds their digests).
    pub fn accept(
        &self,
        record: &DocumentRecord,
        message_id: &str,
        attachments: &[Bytes],
    ) -> Result<Accepted, StoreError> {
        if let Some(existing) = self.document(message_id)? {
            return Ok(Accepted::Duplicate(existing));
        }
        let mut batch = sled::Batch::default();
        for (index, bytes) in attachments.iter().enumerate() {
            let index = u32::try_from(index)
                .map_err(|_| StoreError::Corrupt("too many attachments".into()))?;
            for (chunk, part) in bytes.chunks(CHUNK_BYTES).enumerate() {
                let chunk = u32::try_from(chunk)
                    .map_err(|_| StoreError::Corrupt("attachment too large".into()))?;
                batch.insert(attachment_key(message_id, index, chunk), part);
            }
        }
        self.attachments.apply_batch(batch)?;

        let mut sequences = Vec::with_capacity(record.recipients.len());
        for _ in &record.recipients {
            sequences.push(self.db.generate_id()?);
        }
        let encoded = record.encode_to_vec();
        let entry_bytes = record
            .attachment_bytes
            .saturating_add(record.envelope.len() as u64);
        let result = (
            &self.documents,
            &self.business_ids,
            &self.queue,
            &self.deliveries,
        )
            .transaction(|(documents, business_ids, queue, deliveries)| {
                if let Some(existing) = documents.get(message_id)? {
                    return abort(AcceptAbort::Duplicate(existing.to_vec()));
                }
                if let Some(other) = business_ids.get(record.business_id.as_bytes())?
                    && other.as_ref() != message_id.as_bytes()
                {
                    return abort(AcceptAbort::BusinessIdTaken(
                        String::from_utf8_lossy(&other).into_owned(),
                    ));
                }
                documents.insert(message_id.as_bytes(), encoded.as_slice())?;
                business_ids.insert(record.business_id.as_bytes(), message_id.as_bytes())?;
                for (recipient, seq) in record.recipients.iter().zip(&sequences) {
                    let key = queue_key(recipient, *seq);
                    let entry = QueueEntry {
                        message_id: message_id.to_owned(),
                        bytes: entry_bytes,
                        enqueued_at_ms: record.accepted_at_ms,
                    };
                    queue.insert(key.as_slice(), entry.encode_to_vec())?;
                    let delivery = DeliveryRecord {
                        state: DeliveryState::Queued as i32,
                        queue_key: key,
                        ..Default::default()
                    };
                    deliveries.insert(
                        delivery_key(message_id, recipient),
                        delivery.encode_to_vec(),
                    )?;
                }
                Ok(())
            });
        match result {
            Ok(()) => Ok(Accepted::New),
            Err(TransactionError::Abort(AcceptAbort::Duplicate(bytes))) => {
                Ok(Accepted::Duplicate(decode(&bytes)?))
            }
            Err(TransactionError::Abort(AcceptAbort::BusinessIdTaken(message_id))) => {
                Ok(Accepted::BusinessIdTaken { message_id })
            }
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
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

    pub fn queue_stats(&self, recipient: &str) -> Result<QueueStats, StoreError> {
        let mut stats = QueueStats::default();
        for item in self.queue.scan_prefix(recipient.as_bytes()) {
            let (_, value) = item?;
            let entry: QueueEntry = decode(&value)?;
            stats.pending += 1;
            stats.pending_bytes += entry.bytes;
            let oldest = stats.oldest_enqueued_ms.get_or_insert(entry.enqueued_at_ms);
            *oldest = (*oldest).min(entry.enqueued_at_ms);
        }
        Ok(stats)
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

    /// Counts a push attempt.
    pub fn record_attempt(
        &self,
        message_id: &str,
        recipient: &str,
        at_ms: i64,
    ) -> Result<u32, StoreError> {
        let key = delivery_key(message_id, recipient);
        let mut attempts = 0;
        self.deliveries.fetch_and_update(&key, |old| {
            let mut record: DeliveryRecord = old.and_then(|b| DeliveryRecord::decode(b).ok())?;
            record.attempts = record.attempts.saturating_add(1);
            record.last_attempt_at_ms = at_ms;
            attempts = record.attempts;
            Some(record.encode_to_vec())
        })?;
        Ok(attempts)
    }

    /// Ends a queued delivery: `Delivered` with the recipient's receipt, or `Refused`
    /// with a reason. Returns false when it was not queued (already settled).
    pub fn settle(
        &self,
        message_id: &str,
        recipient: &str,
        state: DeliveryState,
        receipt: Vec<u8>,
        reason: String,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let key = delivery_key(message_id, recipient);
        let result = (&self.queue, &self.deliveries).transaction(|(queue, deliveries)| {
            let Some(bytes) = deliveries.get(&key)? else {
                return Ok(false);
            };
            let mut record = DeliveryRecord::decode(bytes.as_ref())
                .map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            if record.state != DeliveryState::Queued as i32 {
                return Ok(false);
            }
            queue.remove(record.queue_key.as_slice())?;
            record.state = state as i32;
            record.queue_key.clear();
            record.receipt = receipt.clone();
            record.reason = reason.clone();
            if state == DeliveryState::Delivered {
                record.delivered_at_ms = at_ms;
            }
            deliveries.insert(key.as_slice(), record.encode_to_vec())?;
            Ok(true)
        });
        match result {
            Ok(settled) => Ok(settled),
            Err(TransactionError::Abort(detail)) => Err(StoreError::Corrupt(detail)),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    pub fn register_agency(
        &self,
        code: &str,
        name: &str,
        auto: bool,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        let record = AgencyRecord {
            name: name.to_owned(),
            registered_at_ms: at_ms,
            auto_registered: auto,
        };
        let inserted = self
            .agencies
            .compare_and_swap(code, None as Option<&[u8]>, Some(record.encode_to_vec()))?
            .is_ok();
        Ok(inserted)
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
        self.documents.len()
    }

    /// Flushes sled; used at shutdown.
    pub async fn close(&self) -> Result<(), StoreError> {
        self.durable().await
    }
}

enum AcceptAbort {
    Duplicate(Vec<u8>),
    BusinessIdTaken(String),
}
