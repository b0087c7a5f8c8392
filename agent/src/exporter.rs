//! The inbox-folder exporter: a background task that writes each received document's
//! folder (`export`) after the document is durable and acknowledged.
//!
//! Owns the export queue ([`ExportQueue`]): message ids the session hands over once
//! their group is durable. The store is the truth, the queue only a hint: a record
//! with `exported == false` is a document still to export.
//!
//! Invariants:
//! - Only durable documents are exported, each with all three signatures (envelope,
//!   submission receipt, delivery receipt); a record without a delivery receipt
//!   (stored by an earlier version that stopped before signing) waits for the
//!   broker's redelivery, which signs it and queues it again.
//! - Idempotent: a record marked exported, or whose complete folder exists, is not
//!   written again; a folder appears only complete (written as `.partial-<id>`,
//!   synced, renamed, synced).
//! - Batches without timers: the exporter takes whatever queued while the previous
//!   batch ran (at most [`EXPORT_BATCH`]) and shares one sync before and one after
//!   the renames among them.
//! - Resumed after a crash: at start every stored record not marked exported is
//!   queued; a failed export is retried with backoff, never dropped.
//! - Bounded memory: the queue holds at most [`QUEUE_LIMIT`] ids; beyond that it
//!   forgets them and rescans the store once it has drained. A batch holds one
//!   document's bytes at a time.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lienthong_proto::pb;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Agent;
use crate::export::{self, ExportDocument, ExportError, GroupSync, InboxAccess};
use crate::store::{InboxRecord, Store};

/// The most documents exported between two shared syncs.
pub const EXPORT_BATCH: usize = 256;
/// The most message ids the queue holds before it falls back to a rescan.
pub const QUEUE_LIMIT: usize = 100_000;

/// Message ids waiting for export, and the exporter's wake-up.
#[derive(Debug, Default)]
pub struct ExportQueue {
    state: std::sync::Mutex<QueueState>,
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    ids: VecDeque<String>,
    /// Ids were dropped at the limit: scan the store for unexported records.
    rescan: bool,
}

impl ExportQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues documents for export (call once they are durable).
    pub fn push(&self, ids: impl IntoIterator<Item = String>) {
        let mut state = self.lock();
        for id in ids {
            if state.ids.len() >= QUEUE_LIMIT {
                state.rescan = true;
                break;
            }
            state.ids.push_back(id);
        }
        drop(state);
        // Stores a permit when the exporter is busy: no wake-up is lost.
        self.wake.notify_one();
    }

    /// Up to `max` ids, and whether the store must be rescanned first.
    fn take(&self, max: usize) -> (Vec<String>, bool) {
        let mut state = self.lock();
        let n = state.ids.len().min(max);
        let ids: Vec<String> = state.ids.drain(..n).collect();
        let rescan = ids.is_empty() && std::mem::take(&mut state.rescan);
        (ids, rescan)
    }
}

/// Where documents are exported: the folder, its modes and its shared sync.
pub struct InboxFolder {
    /// Absolute.
    pub dir: PathBuf,
    pub access: InboxAccess,
    pub sync: GroupSync,
}

/// Runs the exporter until `stop`; returns at once when the agent has no inbox folder.
pub(crate) async fn run(agent: Arc<Agent>, stop: CancellationToken) {
    if agent.inbox.is_none() {
        return;
    }
    let mut failures: u32 = 0;
    let mut rescan = true;
    loop {
        let (mut ids, wants_rescan) = agent.export_queue.take(EXPORT_BATCH);
        if rescan || wants_rescan {
            rescan = false;
            let reading = Arc::clone(&agent);
            match tokio::task::spawn_blocking(move || unexported(&reading.store)).await {
                Ok(Ok(found)) => {
                    if !found.is_empty() {
                        info!(agency = %agent.agency, documents = found.len(), "exporting stored documents not yet in the inbox folder");
                    }
                    agent.export_queue.push(found);
                }
                Ok(Err(e)) => {
                    error!(agency = %agent.agency, error = %e, "cannot read the inbox to resume exports");
                    rescan = true;
                }
                Err(e) => {
                    error!(agency = %agent.agency, error = %e, "resuming exports failed");
                    rescan = true;
                }
            }
            if ids.is_empty() {
                continue;
            }
        }
        if ids.is_empty() {
            tokio::select! {
                () = agent.export_queue.wake.notified() => continue,
                () = stop.cancelled() => return,
            }
        }
        // A redelivery may queue an id twice: export each once per batch.
        let mut seen = std::collections::HashSet::new();
        ids.retain(|id| seen.insert(id.clone()));
        let exporting = Arc::clone(&agent);
        let batch = ids.clone();
        let result = tokio::task::spawn_blocking(move || export_batch(&exporting, &batch)).await;
        let failed = match result {
            Ok(Ok(summary)) => {
                if summary.exported > 0 || !summary.failed.is_empty() {
                    info!(
                        agency = %agent.agency,
                        exported = summary.exported,
                        skipped = summary.skipped,
                        failed = summary.failed.len(),
                        "inbox folder export"
                    );
                }
                summary.failed
            }
            Ok(Err(e)) => {
                error!(agency = %agent.agency, error = %e, documents = ids.len(), "exporting to the inbox folder failed; retrying");
                ids
            }
            Err(e) => {
                error!(agency = %agent.agency, error = %e, "export task failed; retrying");
                ids
            }
        };
        if failed.is_empty() {
            failures = 0;
            continue;
        }
        agent.export_queue.push(failed);
        failures = failures.saturating_add(1);
        let delay = agent.backoff(failures);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Every stored document record not marked exported, in message id order.
fn unexported(store: &Store) -> Result<Vec<String>, crate::error::StoreError> {
    Ok(store
        .inbox_records()?
        .into_iter()
        .filter(|r| !r.exported && r.kind == pb::DocumentKind::Document as i32)
        .map(|r| r.message_id)
        .collect())
}

#[derive(Debug, Default)]
struct Summary {
    exported: usize,
    skipped: usize,
    /// To retry.
    failed: Vec<String>,
}

/// A store read failed, or a shared sync or rename of the inbox folder.
#[derive(Debug, thiserror::Error)]
enum BatchError {
    #[error(transparent)]
    Store(#[from] crate::error::StoreError),
    #[error(transparent)]
    Folder(#[from] ExportError),
}

/// Exports one batch. Per document: a failure to write its folder fails that document
/// only. The shared sync and the renames fail the batch (all retried). Blocking.
fn export_batch(agent: &Agent, ids: &[String]) -> Result<Summary, BatchError> {
    let Some(folder) = agent.inbox.as_ref() else {
        return Ok(Summary::default());
    };
    let mut summary = Summary::default();
    let mut written: Vec<(String, Option<PathBuf>)> = Vec::new();
    for id in ids {
        let Some(record) = agent.store.inbox_record(id)? else {
            summary.skipped += 1;
            continue;
        };
        if record.exported || record.kind != pb::DocumentKind::Document as i32 {
            summary.skipped += 1;
            continue;
        }
        if export::is_exported(&folder.dir, id) {
            // Renamed into place before a crash lost the mark.
            agent.store.mark_exported(id)?;
            summary.skipped += 1;
            continue;
        }
        match write_one(agent, folder, &record) {
            Ok(Some(files)) => written.push((id.clone(), files)),
            Ok(None) => summary.skipped += 1,
            Err(e) => {
                warn!(agency = %agent.agency, message_id = %id, error = %e, "cannot write a document's inbox folder");
                summary.failed.push(id.clone());
            }
        }
    }
    let names: Vec<&str> = written.iter().map(|(id, _)| id.as_str()).collect();
    export::publish(&folder.dir, &names, &folder.sync)?;
    for (id, files) in &written {
        agent.store.mark_exported(id)?;
        if let Some(files) = files {
            export::remove_attachment_files(files);
        }
        if let Err(e) = place_if_recalled(agent, folder, id) {
            warn!(agency = %agent.agency, message_id = %id, error = %e, "cannot move a recalled document's folder");
        }
        debug!(agency = %agent.agency, message_id = %id, "document exported");
    }
    summary.exported = written.len();
    Ok(summary)
}

/// Writes one document's partial folder. `Ok(None)`: nothing to write yet (no
/// delivery receipt; the redelivery queues it again). `Ok(Some(files))`: written, with
/// the streamed files to remove once published.
fn write_one(
    agent: &Agent,
    folder: &InboxFolder,
    record: &InboxRecord,
) -> Result<Option<Option<PathBuf>>, BatchError> {
    let id = record.message_id.as_str();
    let stored = |detail: String| crate::error::StoreError::Record {
        key: id.to_owned(),
        detail,
    };
    let Some(delivery_receipt) = agent.store.delivery_receipt(id)? else {
        debug!(agency = %agent.agency, message_id = %id, "export waits for the redelivery");
        return Ok(None);
    };
    let submission_receipt = agent.store.received_submission_receipt(id)?;
    let envelope_bytes = agent
        .store
        .inbox_envelope(id)?
        .ok_or_else(|| stored("no envelope".into()))?;
    let envelope = pb::Signed::decode(envelope_bytes.as_ref())
        .map_err(|e| stored(format!("envelope: {e}")))?;
    // Verified before it was stored; decoded here only to write document.json.
    let header = pb::DocumentHeader::decode(envelope.payload.as_ref())
        .map_err(|e| stored(format!("header: {e}")))?;
    let sha = lienthong_proto::sha256(&envelope.payload);
    let files = record.streamed.then(|| agent.files.incoming_dir(id));
    let attachments: Vec<Bytes> = if record.streamed {
        Vec::new()
    } else {
        agent
            .store
            .inbox_attachments(id, header.attachments.len())?
    };
    let doc = ExportDocument {
        message_id: id,
        envelope: &envelope_bytes,
        header: &header,
        header_sha256: &sha,
        received_at_ms: record.received_at_ms,
        attachments: &attachments,
        attachment_files: files.as_deref(),
        submission_receipt: submission_receipt.as_deref(),
        delivery_receipt: Some(delivery_receipt.as_ref()),
    };
    Ok(export::write_partial(&folder.dir, &doc, &folder.access)?.map(|_| files))
}

/// A recall processed before the recalled document's export found no folder to move:
/// move it now, so the folder ends where the record says.
fn place_if_recalled(agent: &Agent, folder: &InboxFolder, id: &str) -> Result<(), BatchError> {
    let recalled = agent
        .store
        .inbox_record(id)?
        .is_some_and(|r| r.recalled_by.is_some());
    if !recalled {
        return Ok(());
    }
    let dir = folder.dir.join(crate::business::RECALLED_DIR);
    folder.access.create_dir(&dir)?;
    let from = export::folder(&folder.dir, id);
    let to = dir.join(id);
    if from.is_dir() && !to.exists() {
        std::fs::rename(&from, &to).map_err(|source| ExportError {
            path: to.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The inbox folder as logs show it.
pub fn describe(dir: Option<&Path>) -> String {
    dir.map_or_else(|| "(none)".to_owned(), |d| d.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_bounded_and_asks_for_a_rescan_once_drained() {
        let queue = ExportQueue::default();
        queue.push((0..QUEUE_LIMIT + 10).map(|i| i.to_string()));
        let mut taken = 0;
        loop {
            let (ids, rescan) = queue.take(EXPORT_BATCH);
            if ids.is_empty() {
                // Ids were dropped at the limit: the exporter must look at the store.
                assert!(rescan);
                break;
            }
            assert!(!rescan, "a rescan waits until the queue is drained");
            taken += ids.len();
        }
        assert_eq!(taken, QUEUE_LIMIT);
        assert_eq!(queue.take(EXPORT_BATCH), (Vec::new(), false));
    }
}
