//! Arrival-order indexes for listing the inbox and the sent documents page by page.
//!
//! Keys: `o<seq u64 BE>` → message id, in the `inbox` tree for received documents
//! (kind Document) and in the `outbox` tree for documents this agent sealed.
//!
//! Invariants:
//! - An index entry is written in the same transaction as the document it indexes.
//! - Sequence numbers are taken and committed under [`Store::order_lock`], so entries
//!   become visible in sequence order: a reader that saw `seq` never later finds a
//!   smaller one appear. A cursor (the last sequence a page read) therefore never
//!   repeats or skips an entry, however many documents arrive meanwhile.
//! - A store written before the index existed is indexed once at open, in
//!   (time, message id) order.

use sled::IVec;

use super::{InboxRecord, OutboxRecord, Store, StoreError, decode_json};

/// The index key of sequence `seq`.
pub(super) fn order_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'o';
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.get(1..9)?.try_into().ok()?))
}

/// One page of a listing: the entries and the position after the last one read.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The sequence of the last entry examined (matching or not); `None` when nothing
    /// was examined (the position stays where it was).
    pub last_seq: Option<u64>,
    /// More entries follow right now (the scan stopped at the limit or its budget).
    pub more: bool,
}

impl Store {
    /// Builds the arrival indexes of a store written before they existed.
    pub(super) fn backfill_order(&self) -> Result<(), StoreError> {
        let _order = self
            .order_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.inbox.scan_prefix(b"o").next().is_none() {
            let mut records: Vec<(i64, String)> = Vec::new();
            for entry in self.inbox.scan_prefix(b"r") {
                let (k, v) = entry?;
                let record: InboxRecord = decode_json(&k, &v)?;
                if record.kind == 0 {
                    records.push((record.received_at_ms, record.message_id));
                }
            }
            records.sort();
            let mut batch = sled::Batch::default();
            for (_, id) in &records {
                batch.insert(&order_key(self.db.generate_id()?)[..], id.as_bytes());
            }
            self.inbox.apply_batch(batch)?;
        }
        if self.outbox.scan_prefix(b"o").next().is_none() {
            let mut records: Vec<(i64, String)> = Vec::new();
            for entry in self.outbox.scan_prefix(b"r") {
                let (k, v) = entry?;
                let record: OutboxRecord = decode_json(&k, &v)?;
                if record.kind == 0 {
                    records.push((record.created_at_ms, record.message_id));
                }
            }
            records.sort();
            let mut batch = sled::Batch::default();
            for (_, id) in &records {
                batch.insert(&order_key(self.db.generate_id()?)[..], id.as_bytes());
            }
            self.outbox.apply_batch(batch)?;
        }
        Ok(())
    }

    /// Received documents after sequence `after` (from the start when `None`), oldest
    /// arrival first: at most `limit` that `keep` accepts, examining at most `budget`
    /// entries (so a filter that matches little costs a bounded read per page).
    pub fn inbox_page(
        &self,
        after: Option<u64>,
        limit: usize,
        budget: usize,
        keep: impl FnMut(&InboxRecord) -> bool,
    ) -> Result<Page<InboxRecord>, StoreError> {
        page(&self.inbox, after, limit, budget, keep)
    }

    /// Documents this agent sent after sequence `after`, oldest first, like
    /// [`Store::inbox_page`].
    pub fn sent_page(
        &self,
        after: Option<u64>,
        limit: usize,
        budget: usize,
        keep: impl FnMut(&OutboxRecord) -> bool,
    ) -> Result<Page<OutboxRecord>, StoreError> {
        page(&self.outbox, after, limit, budget, keep)
    }
}

fn page<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    after: Option<u64>,
    limit: usize,
    budget: usize,
    mut keep: impl FnMut(&T) -> bool,
) -> Result<Page<T>, StoreError> {
    let start: IVec = match after.and_then(|s| s.checked_add(1)) {
        Some(next) => IVec::from(&order_key(next)[..]),
        None if after.is_some() => {
            // After the largest sequence there is nothing.
            return Ok(Page {
                items: Vec::new(),
                last_seq: None,
                more: false,
            });
        }
        None => IVec::from(&b"o"[..]),
    };
    let end = [b'o' + 1];
    let mut items = Vec::new();
    let mut last_seq = None;
    let mut examined = 0usize;
    let mut entries = tree.range(start..IVec::from(&end[..]));
    let mut more = false;
    for entry in entries.by_ref() {
        if items.len() >= limit || examined >= budget {
            more = true;
            break;
        }
        let (k, id) = entry?;
        examined = examined.saturating_add(1);
        last_seq = seq_of(&k);
        let mut record_key = Vec::with_capacity(id.len().saturating_add(1));
        record_key.push(b'r');
        record_key.extend_from_slice(&id);
        // A record removed since it was indexed is skipped.
        let Some(value) = tree.get(&record_key)? else {
            continue;
        };
        let record: T = decode_json(&record_key, &value)?;
        if keep(&record) {
            items.push(record);
        }
    }
    Ok(Page {
        items,
        last_seq,
        more,
    })
}

/// Reads one received attachment kept in sled, one chunk per call, so that a large
/// one is never held whole.
#[derive(Debug)]
pub struct AttachmentChunks {
    id: String,
    index: u32,
    next: u32,
}

impl AttachmentChunks {
    /// Attachment `index` (header order) of received document `id`.
    pub fn new(id: String, index: usize) -> Self {
        Self {
            id,
            index: u32::try_from(index).unwrap_or(u32::MAX),
            next: 0,
        }
    }

    /// The next chunk, `None` after the last. Blocking.
    pub fn next_chunk(&mut self, store: &Store) -> Result<Option<bytes::Bytes>, StoreError> {
        let mut k = super::attachment_index_prefix(&self.id, self.index);
        k.extend_from_slice(&self.next.to_be_bytes());
        let Some(value) = store.inbox_attachments.get(&k)? else {
            return Ok(None);
        };
        self.next = self.next.checked_add(1).ok_or_else(|| StoreError::Record {
            key: self.id.clone(),
            detail: "too many attachment chunks".into(),
        })?;
        Ok(Some(bytes::Bytes::copy_from_slice(&value)))
    }
}
