//! The outbox submitter: submits documents waiting in the outbox to the broker, oldest
//! first, and records the outcome.
//!
//! Invariants:
//! - An entry leaves the outbox only as `submitted` (with the broker's receipt stored)
//!   or `failed` (the broker refused it with a permanent gRPC code).
//! - Retryable failures back off exponentially with full jitter: when the broker is
//!   unreachable all submissions wait; other retryable errors delay only that entry.
//! - Documents kept whole in the store go to the broker in batches (`SubmitBatch`): a
//!   batch is whatever waited while the previous ones ran (at most [`BATCH_DOCUMENTS`]
//!   documents and [`BATCH_BYTES`] bytes), never formed by a timer; up to
//!   [`CONCURRENT_BATCHES`] batches are in flight, of which at most one is not full
//!   (so under load the batches grow instead of each free slot taking a document). Each document keeps its own outcome,
//!   mapped exactly as a `Submit` answer is, and the outcomes of one batch are stored in
//!   one store transaction made durable by one `durable()`.
//! - Streamed documents (attachments in files) always use `Submit`. A broker that
//!   answers `SubmitBatch` with UNIMPLEMENTED (older brokers) gets per-document `Submit`
//!   calls, up to [`CONCURRENT_SUBMISSIONS`] at once, until the connection to it is lost
//!   (a reconnect may reach a newer broker); so does a batch refused as a whole with a
//!   permanent code (one refused call never fails its documents without their own
//!   answer), and a document refused RESOURCE_EXHAUSTED in a batch (only `Submit`'s
//!   answer carries the broker's mark that tells "too large" from "queue full").
//! - A document is never submitted twice at the same time. New documents arrive on a
//!   channel from the API; the outbox itself is re-read at start and every
//!   [`RESCAN_EVERY`] as a safety net.
//! - A submission sends exactly the stored envelope and attachment bytes: with `Submit`
//!   the envelope frame first, then each attachment's bytes in header order, in frames
//!   of at most [`FRAME_BYTES`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use futures_util::StreamExt as _;
use lienthong_proto::document::MAX_ATTACHMENTS;
use lienthong_proto::pb::{self, submit_frame::Frame};
use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
use prost::Message;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Agent;
use crate::broker_client::{is_permanent, is_permanent_status};
use crate::error::StoreError;
use crate::metrics::{SubmissionOutcome, SubmitCall};
use crate::store::{OutboxRecord, OutboxSettle};

/// The largest attachment frame sent.
pub const FRAME_BYTES: usize = 1024 * 1024;

enum Outcome {
    Submitted,
    Failed,
    /// The broker could not be reached: everything waits.
    Unreachable(String),
    /// This entry failed for now.
    Retry(String),
}

/// Submissions in flight at once. Each waits for the broker's group commit (and then
/// our own), so many in flight share those fsyncs instead of queueing behind them.
pub const CONCURRENT_SUBMISSIONS: usize = 128;

/// The most documents sent in one `SubmitBatch` call (the broker's own limit is larger).
pub const BATCH_DOCUMENTS: usize = 64;

/// The most bytes (envelopes and attachments) sent in one `SubmitBatch` call, the
/// protocol's batch size (below the broker's gRPC message limit); a single larger
/// document still goes, alone.
pub const BATCH_BYTES: u64 = lienthong_proto::document::MAX_BATCH_BYTES;

/// `SubmitBatch` calls in flight at once. While they run, new documents queue up and
/// form the next batches: this bound is what makes batches grow under load.
pub const CONCURRENT_BATCHES: usize = 8;

/// Safety net: the whole outbox is re-read this often even without news.
const RESCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs until `stop` is cancelled.
pub(crate) async fn run(agent: Arc<Agent>, stop: CancellationToken) {
    let mut new_ids = match agent
        .outbox_new
        .lock()
        .ok()
        .and_then(|mut slot| slot.take())
    {
        Some(receiver) => receiver,
        None => {
            error!(agency = %agent.agency, "the outbox submitter was started twice");
            return;
        }
    };
    let mut global_failures: u32 = 0;
    let mut not_before = Instant::now();
    // Per-entry backoff after retryable failures: (failures, not before).
    let mut retries: HashMap<String, (u32, Instant)> = HashMap::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    // Queued or being submitted: never both, never twice.
    let mut known: HashSet<String> = HashSet::new();
    let mut running: JoinSet<(bool, Vec<(String, Outcome)>)> = JoinSet::new();
    // Batches in flight that were not full: at most one at a time (see below).
    let mut partial_in_flight = 0usize;
    // Whether the broker serves SubmitBatch (assumed until it answers UNIMPLEMENTED).
    let batches = Arc::new(AtomicBool::new(true));
    let mut rescan_at = Instant::now();
    loop {
        let now = Instant::now();
        if now >= rescan_at {
            rescan_at = now + RESCAN_EVERY;
            match agent.store.pending_outbox() {
                Ok(ids) => {
                    for id in ids {
                        if known.insert(id.clone()) {
                            queue.push_back(id);
                        }
                    }
                }
                Err(e) => {
                    error!(agency = %agent.agency, error = %e, "cannot read the outbox");
                    global_failures = global_failures.saturating_add(1);
                    not_before = now + agent.backoff(global_failures);
                    rescan_at = not_before;
                }
            }
        }
        let mut next_due: Option<Instant> = None;
        if now >= not_before {
            let mut not_due = Vec::new();
            loop {
                let (slots, group_max) = if batches.load(Ordering::Relaxed) {
                    (CONCURRENT_BATCHES, BATCH_DOCUMENTS)
                } else {
                    (CONCURRENT_SUBMISSIONS, 1)
                };
                if running.len() >= slots {
                    break;
                }
                let mut group = Vec::new();
                while group.len() < group_max {
                    let Some(id) = queue.pop_front() else { break };
                    if let Some(&(_, due)) = retries.get(&id)
                        && due > now
                    {
                        next_due = Some(next_due.map_or(due, |n| n.min(due)));
                        not_due.push(id);
                        continue;
                    }
                    group.push(id);
                }
                if group.is_empty() {
                    break;
                }
                // A batch that is not full waits while another one that was not full
                // runs: what queues meanwhile joins it. Without this, every free slot
                // took the one or two documents just sealed and the broker paid a
                // whole call per document (most of scenario 1's calls carried one).
                // Full batches still go concurrently, up to the slots.
                let partial = group.len() < group_max;
                if partial && partial_in_flight > 0 {
                    for id in group.into_iter().rev() {
                        queue.push_front(id);
                    }
                    break;
                }
                if partial {
                    partial_in_flight = partial_in_flight.saturating_add(1);
                }
                let submitting = Arc::clone(&agent);
                let batches = Arc::clone(&batches);
                running.spawn(async move {
                    (partial, submit_group(&submitting, group, &batches).await)
                });
            }
            queue.extend(not_due);
        }
        let wake_at = if now < not_before {
            Some(not_before)
        } else {
            next_due
        };
        tokio::select! {
            Some(joined) = running.join_next(), if !running.is_empty() => {
                let Ok((partial, outcomes)) = joined else {
                    // A submission task that panicked (a bug): whether it was the
                    // partial batch is unknown; the count is right again at the latest
                    // once nothing runs.
                    partial_in_flight = running.len().min(partial_in_flight);
                    continue;
                };
                if partial {
                    partial_in_flight = partial_in_flight.saturating_sub(1);
                }
                let mut retried = 0usize;
                let mut last_reason = None;
                for (id, outcome) in outcomes {
                    agent.metrics.submission(match outcome {
                        Outcome::Submitted => SubmissionOutcome::Ok,
                        Outcome::Failed => SubmissionOutcome::Refused,
                        Outcome::Unreachable(_) | Outcome::Retry(_) => SubmissionOutcome::Retried,
                    });
                    match outcome {
                        Outcome::Submitted | Outcome::Failed => {
                            known.remove(&id);
                            retries.remove(&id);
                            global_failures = 0;
                        }
                        Outcome::Unreachable(reason) => {
                            // The next connection may reach another (newer) broker.
                            batches.store(true, Ordering::Relaxed);
                            // Concurrent submissions fail together: count one failure per
                            // backoff round, not one per document.
                            if Instant::now() >= not_before {
                                global_failures = global_failures.saturating_add(1);
                                let delay = agent.backoff(global_failures);
                                not_before = Instant::now() + delay;
                                warn!(
                                    agency = %agent.agency,
                                    message_id = %id,
                                    reason = %reason,
                                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                                    "broker unreachable; outbox waits"
                                );
                            }
                            queue.push_front(id);
                        }
                        Outcome::Retry(reason) => {
                            global_failures = 0;
                            let entry = retries.entry(id.clone()).or_insert((0, Instant::now()));
                            entry.0 = entry.0.saturating_add(1);
                            let delay = agent.backoff(entry.0);
                            entry.1 = Instant::now() + delay;
                            debug!(
                                agency = %agent.agency,
                                message_id = %id,
                                reason = %reason,
                                attempts = entry.0,
                                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                                "submission failed; will retry"
                            );
                            retried = retried.saturating_add(1);
                            last_reason = Some(reason);
                            queue.push_back(id);
                        }
                    }
                }
                // One line per group, not one per document (a batch fails together).
                if let Some(reason) = last_reason {
                    warn!(
                        agency = %agent.agency,
                        documents = retried,
                        reason = %reason,
                        "submissions failed; will retry with backoff"
                    );
                }
            }
            Some(id) = new_ids.recv() => {
                if known.insert(id.clone()) {
                    queue.push_back(id);
                }
                // Take every id already announced (a sealed group arrives at once), so
                // they go out together rather than one batch each.
                while let Ok(id) = new_ids.try_recv() {
                    if known.insert(id.clone()) {
                        queue.push_back(id);
                    }
                }
            }
            () = sleep_until_or_forever(wake_at) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The frames of one submission, read lazily from the store.
struct Frames {
    envelope: Option<pb::Signed>,
    chunks: Box<dyn Iterator<Item = Result<(u32, sled::IVec), StoreError>> + Send>,
    carry: Option<(u32, sled::IVec)>,
    /// The attachment the next frame belongs to, and its offset there.
    position: (u32, u64),
    /// Set when reading the store failed mid-stream (the stream then ends early).
    failure: Arc<Mutex<Option<String>>>,
    done: bool,
}

impl Frames {
    fn fail(&mut self, e: StoreError) {
        self.done = true;
        if let Ok(mut slot) = self.failure.lock() {
            *slot = Some(e.to_string());
        }
    }
}

impl Iterator for Frames {
    type Item = pb::SubmitFrame;

    fn next(&mut self) -> Option<pb::SubmitFrame> {
        if let Some(envelope) = self.envelope.take() {
            return Some(pb::SubmitFrame {
                frame: Some(Frame::Envelope(envelope)),
            });
        }
        if self.done {
            return None;
        }
        let (index, first) = match self.carry.take() {
            Some(carry) => carry,
            None => match self.chunks.next() {
                None => return None,
                Some(Err(e)) => {
                    self.fail(e);
                    return None;
                }
                Some(Ok(chunk)) => chunk,
            },
        };
        let mut data = BytesMut::with_capacity(FRAME_BYTES.min(first.len() * 16));
        data.extend_from_slice(&first);
        loop {
            match self.chunks.next() {
                None => {
                    self.done = true;
                    break;
                }
                Some(Err(e)) => {
                    self.fail(e);
                    break;
                }
                Some(Ok((i, bytes))) => {
                    if i == index && data.len() + bytes.len() <= FRAME_BYTES {
                        data.extend_from_slice(&bytes);
                    } else {
                        self.carry = Some((i, bytes));
                        break;
                    }
                }
            }
        }
        if self.position.0 != index {
            self.position = (index, 0);
        }
        let offset = self.position.1;
        self.position.1 += data.len() as u64;
        Some(pb::SubmitFrame {
            frame: Some(Frame::Chunk(pb::AttachmentChunk {
                attachment_index: index,
                data: data.freeze(),
                offset,
            })),
        })
    }
}

async fn submit_one(agent: &Agent, id: &str) -> Outcome {
    let local = |e: StoreError| {
        error!(agency = %agent.agency, message_id = %id, error = %e, "outbox store failure");
        Outcome::Unreachable(format!("local store: {e}"))
    };
    let record = match agent.store.outbox_record(id) {
        Ok(Some(record)) => record,
        Ok(None) => {
            return local(StoreError::Record {
                key: id.to_owned(),
                detail: "pending entry without a record".into(),
            });
        }
        Err(e) => return local(e),
    };
    let envelope = match agent.store.outbox_envelope(id) {
        Ok(Some(bytes)) => match pb::Signed::decode(bytes.as_ref()) {
            Ok(envelope) => envelope,
            Err(e) => {
                return local(StoreError::Record {
                    key: id.to_owned(),
                    detail: format!("stored envelope: {e}"),
                });
            }
        },
        Ok(None) => {
            return local(StoreError::Record {
                key: id.to_owned(),
                detail: "no stored envelope".into(),
            });
        }
        Err(e) => return local(e),
    };
    let header_sha256 = lienthong_proto::sha256(&envelope.payload);
    let failure = Arc::new(Mutex::new(None));
    let mut client = agent.client();
    agent.metrics.submit_call(SubmitCall::Single);
    let result = if record.streamed {
        let offsets = match resume_offsets(agent, id, &header_sha256).await {
            Ok(offsets) => offsets,
            Err(status) => return status_outcome(agent, id, status).await,
        };
        let frames = streamed_frames(agent, id, envelope, offsets, Arc::clone(&failure));
        client.submit(frames).await
    } else {
        let frames = Frames {
            envelope: Some(envelope),
            chunks: Box::new(agent.store.outbox_attachment_chunks(id)),
            carry: None,
            position: (0, 0),
            failure: Arc::clone(&failure),
            done: false,
        };
        client.submit(tokio_stream::iter(frames)).await
    };
    let store_failure = failure.lock().ok().and_then(|mut slot| slot.take());
    if let Some(detail) = store_failure {
        error!(agency = %agent.agency, message_id = %id, error = %detail, "reading the outbox failed during submission");
        return Outcome::Unreachable(format!("local store: {detail}"));
    }
    let response = match result {
        Ok(response) => response.into_inner(),
        Err(status) => return status_outcome(agent, id, status).await,
    };
    let Some(receipt) = response.submission_receipt else {
        return Outcome::Retry("the broker answered without a submission receipt".into());
    };
    let expected = ExpectedReceipt {
        kind: pb::ReceiptKind::Submission,
        message_id: id,
        header_sha256: &header_sha256,
        recipient: None,
        live: true,
    };
    let at_ms = match verify_receipt(&receipt, &agent.tls_anchors, &expected) {
        Ok(verified) => verified.at_ms,
        Err(e) => {
            // Resubmitting would only return the same receipt: keep it, and let the
            // status show it unverified.
            error!(
                agency = %agent.agency,
                message_id = %id,
                error = %e,
                "the broker's submission receipt does not verify; kept as unverified"
            );
            lienthong_proto::now_ms()
        }
    };
    if let Err(e) = agent
        .store
        .mark_submitted(id, &receipt.encode_to_vec(), at_ms)
    {
        return local(e);
    }
    if let Err(e) = agent.store.durable().await {
        return local(e);
    }
    if record.streamed {
        // The broker holds the attachments now, with a signed receipt for them.
        let dir = agent.files.outbox_dir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            warn!(agency = %agent.agency, message_id = %id, error = %e, "cannot remove a submitted document's files");
        }
    }
    debug!(
        agency = %agent.agency,
        message_id = %id,
        business_id = %record.business_id,
        duplicate = response.duplicate,
        "document submitted"
    );
    Outcome::Submitted
}

/// What a failed submission means: a permanent refusal marks the document failed.
async fn status_outcome(agent: &Agent, id: &str, status: tonic::Status) -> Outcome {
    let reason = format!("{:?}: {}", status.code(), status.message());
    if is_permanent_status(&status) {
        warn!(agency = %agent.agency, message_id = %id, reason = %reason, "the broker refused the document");
        let marked = match agent.store.mark_failed(id, &reason) {
            Ok(()) => agent.store.durable().await,
            Err(e) => Err(e),
        };
        if let Err(e) = marked {
            error!(agency = %agent.agency, message_id = %id, error = %e, "outbox store failure");
            return Outcome::Unreachable(format!("local store: {e}"));
        }
        return Outcome::Failed;
    }
    match status.code() {
        tonic::Code::Unavailable => Outcome::Unreachable(reason),
        _ => Outcome::Retry(reason),
    }
}

/// Where a streamed upload resumes: what the broker already holds of each attachment.
async fn resume_offsets(
    agent: &Agent,
    id: &str,
    header_sha256: &[u8; 32],
) -> Result<Vec<u64>, tonic::Status> {
    let mut client = agent.client();
    let answer = client
        .upload_status(pb::UploadStatusRequest {
            message_id: id.to_owned(),
            header_sha256: header_sha256.to_vec(),
        })
        .await?
        .into_inner();
    if answer.accepted {
        // Only the envelope is sent: the broker answers with the original receipt.
        return Ok(vec![u64::MAX; MAX_ATTACHMENTS]);
    }
    if answer.stored_bytes.iter().any(|&n| n > 0) {
        let held_bytes = answer
            .stored_bytes
            .iter()
            .fold(0u64, |sum, &n| sum.saturating_add(n));
        info!(agency = %agent.agency, message_id = %id, held_bytes, "resuming an interrupted upload");
    }
    Ok(answer.stored_bytes)
}

/// The frames of a streamed submission: the envelope, then each attachment's file
/// from its resume offset, read one frame at a time as the network takes them.
fn streamed_frames(
    agent: &Agent,
    id: &str,
    envelope: pb::Signed,
    offsets: Vec<u64>,
    failure: Arc<Mutex<Option<String>>>,
) -> tokio_stream::wrappers::ReceiverStream<pb::SubmitFrame> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::SubmitFrame>(2);
    let dir = agent.files.outbox_dir(id);
    let count = pb::DocumentHeader::decode(envelope.payload.as_ref())
        .map(|h| h.attachments.len())
        .unwrap_or(0);
    tokio::task::spawn_blocking(move || {
        let first = pb::SubmitFrame {
            frame: Some(Frame::Envelope(envelope)),
        };
        if tx.blocking_send(first).is_err() {
            return;
        }
        for index in 0..count {
            let from = offsets.get(index).copied().unwrap_or(0);
            let path = dir.join(index.to_string());
            let size = std::fs::metadata(&path).map_or(0, |m| m.len());
            if from >= size {
                continue;
            }
            let attachment_index = u32::try_from(index).unwrap_or(u32::MAX);
            let read =
                lienthong_proto::spool::read_pieces(&path, from, FRAME_BYTES, |at, bytes| {
                    let frame = pb::SubmitFrame {
                        frame: Some(Frame::Chunk(pb::AttachmentChunk {
                            attachment_index,
                            data: bytes.into(),
                            offset: at,
                        })),
                    };
                    tx.blocking_send(frame).is_ok()
                });
            if let Err(e) = read {
                if let Ok(mut slot) = failure.lock() {
                    *slot = Some(e.to_string());
                }
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A waiting document read from the store for a batch: what `SubmitBatch` sends.
struct Loaded {
    id: String,
    record: OutboxRecord,
    envelope: pb::Signed,
    header_sha256: [u8; 32],
    /// Attachment bytes in header order (an empty attachment has no stored chunk).
    attachments: Vec<Vec<u8>>,
    /// Envelope and attachment bytes: what the document weighs in a call.
    weight: u64,
}

/// Why a document of a group could not be loaded: a store failure, handled as today.
fn store_outcome(agent: &Agent, id: &str, e: StoreError) -> Outcome {
    error!(agency = %agent.agency, message_id = %id, error = %e, "outbox store failure");
    Outcome::Unreachable(format!("local store: {e}"))
}

/// Reads a waiting document whole. `Ok(None)`: it is streamed (it goes with `Submit`).
fn load(agent: &Agent, id: &str) -> Result<Option<Loaded>, StoreError> {
    let record_error = |detail: String| StoreError::Record {
        key: id.to_owned(),
        detail,
    };
    let record = agent
        .store
        .outbox_record(id)?
        .ok_or_else(|| record_error("pending entry without a record".into()))?;
    if record.streamed {
        return Ok(None);
    }
    let bytes = agent
        .store
        .outbox_envelope(id)?
        .ok_or_else(|| record_error("no stored envelope".into()))?;
    let envelope = pb::Signed::decode(bytes.as_ref())
        .map_err(|e| record_error(format!("stored envelope: {e}")))?;
    // The header names how many attachments there are (empty ones have no chunk).
    let count = pb::DocumentHeader::decode(envelope.payload.as_ref())
        .map_err(|e| record_error(format!("stored header: {e}")))?
        .attachments
        .len();
    if count > MAX_ATTACHMENTS {
        return Err(record_error(format!(
            "{count} attachments in a stored header"
        )));
    }
    let mut attachments: Vec<Vec<u8>> = vec![Vec::new(); count];
    for chunk in agent.store.outbox_attachment_chunks(id) {
        let (index, part) = chunk?;
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| attachments.get_mut(i))
            .ok_or_else(|| record_error("attachment chunk outside the header's list".into()))?;
        slot.extend_from_slice(&part);
    }
    let weight = attachments
        .iter()
        .try_fold(u64::try_from(bytes.len()).unwrap_or(u64::MAX), |sum, a| {
            sum.checked_add(u64::try_from(a.len()).ok()?)
        })
        .unwrap_or(u64::MAX);
    Ok(Some(Loaded {
        id: id.to_owned(),
        header_sha256: lienthong_proto::sha256(&envelope.payload),
        record,
        envelope,
        attachments,
        weight,
    }))
}

/// Submits a group of waiting documents: whole ones in `SubmitBatch` calls of at most
/// [`BATCH_BYTES`], streamed ones (and all of them when the broker has no batches) one
/// by one with `Submit`. Answers one outcome per id.
async fn submit_group(
    agent: &Agent,
    ids: Vec<String>,
    batches: &AtomicBool,
) -> Vec<(String, Outcome)> {
    let mut outcomes = Vec::with_capacity(ids.len());
    let mut singles = Vec::new();
    if !batches.load(Ordering::Relaxed) {
        singles = ids;
    } else {
        let mut loaded = Vec::with_capacity(ids.len());
        for id in ids {
            match load(agent, &id) {
                Ok(Some(document)) => loaded.push(document),
                Ok(None) => singles.push(id),
                Err(e) => {
                    let outcome = store_outcome(agent, &id, e);
                    outcomes.push((id, outcome));
                }
            }
        }
        // Consecutive calls of at most BATCH_BYTES each, in outbox order.
        let mut calls: Vec<Vec<Loaded>> = Vec::new();
        let mut weight = 0u64;
        for document in loaded {
            let next = weight.saturating_add(document.weight);
            match calls.last_mut() {
                Some(call) if next <= BATCH_BYTES => {
                    weight = next;
                    call.push(document);
                }
                _ => {
                    weight = document.weight;
                    calls.push(vec![document]);
                }
            }
        }
        for call in calls {
            if !batches.load(Ordering::Relaxed) {
                singles.extend(call.into_iter().map(|d| d.id));
                continue;
            }
            match submit_batch(agent, call).await {
                Batched::Done(done, alone) => {
                    outcomes.extend(done);
                    singles.extend(alone);
                }
                Batched::Unsupported(ids) => {
                    if batches.swap(false, Ordering::Relaxed) {
                        info!(
                            agency = %agent.agency,
                            "the broker does not serve SubmitBatch; submitting one document per call"
                        );
                    }
                    singles.extend(ids);
                }
                Batched::Individually(ids) => singles.extend(ids),
            }
        }
    }
    let one_by_one: Vec<(String, Outcome)> = futures_util::stream::iter(singles)
        .map(|id| async move {
            let outcome = submit_one(agent, &id).await;
            (id, outcome)
        })
        // Groups share today's bound on Submit calls in flight.
        .buffer_unordered(CONCURRENT_SUBMISSIONS / CONCURRENT_BATCHES)
        .collect()
        .await;
    outcomes.extend(one_by_one);
    outcomes
}

/// What became of one `SubmitBatch` call.
enum Batched {
    /// Outcomes of documents, and the documents to ask again one by one with
    /// `Submit` (over a limit: only Submit's answer says whether for good).
    Done(Vec<(String, Outcome)>, Vec<String>),
    /// The broker does not know `SubmitBatch`: submit these one by one.
    Unsupported(Vec<String>),
    /// The call was refused as a whole with a permanent code: submit these one by one,
    /// so each gets its own answer (a batch-level refusal says nothing about one).
    Individually(Vec<String>),
}

/// One `SubmitBatch` call; its accepted and refused documents are stored with one
/// transaction and one `durable()`.
async fn submit_batch(agent: &Agent, mut documents: Vec<Loaded>) -> Batched {
    // The attachment bytes move into the request (no second copy is kept).
    let request = pb::SubmitBatchRequest {
        documents: documents
            .iter_mut()
            .map(|d| pb::BatchDocument {
                envelope: Some(d.envelope.clone()),
                attachments: std::mem::take(&mut d.attachments),
            })
            .collect(),
    };
    let bytes = documents
        .iter()
        .fold(0u64, |sum, d| sum.saturating_add(d.weight));
    let mut client = agent.client();
    agent.metrics.submit_call(SubmitCall::Batch);
    let response = match client.submit_batch(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            let ids = documents.into_iter().map(|d| d.id).collect::<Vec<_>>();
            let reason = format!("{:?}: {}", status.code(), status.message());
            return match status.code() {
                tonic::Code::Unimplemented => Batched::Unsupported(ids),
                tonic::Code::Unavailable => Batched::Done(
                    ids.into_iter()
                        .map(|id| (id, Outcome::Unreachable(reason.clone())))
                        .collect(),
                    Vec::new(),
                ),
                _ if is_permanent_status(&status) => {
                    warn!(agency = %agent.agency, documents = ids.len(), reason = %reason, "the broker refused a whole batch; submitting its documents one by one");
                    Batched::Individually(ids)
                }
                _ => Batched::Done(
                    ids.into_iter()
                        .map(|id| (id, Outcome::Retry(reason.clone())))
                        .collect(),
                    Vec::new(),
                ),
            };
        }
    };
    if response.outcomes.len() != documents.len() {
        let reason = format!(
            "the broker answered {} outcomes for a batch of {} documents",
            response.outcomes.len(),
            documents.len()
        );
        return Batched::Done(
            documents
                .into_iter()
                .map(|d| (d.id, Outcome::Retry(reason.clone())))
                .collect(),
            Vec::new(),
        );
    }
    // Decide each document's outcome first, then store every decision at once.
    enum Decided {
        Submitted {
            receipt: Vec<u8>,
            at_ms: i64,
        },
        Failed(String),
        Other(Outcome),
        /// Asked again with `Submit` (see below).
        Alone,
    }
    let mut decided = Vec::with_capacity(documents.len());
    let mut duplicates = 0usize;
    for (document, answer) in documents.iter().zip(response.outcomes) {
        let id = document.id.as_str();
        if answer.message_id != id {
            decided.push(Decided::Other(Outcome::Retry(format!(
                "the broker's outcome names message {}",
                lienthong_proto::agency::printable(&answer.message_id)
            ))));
            continue;
        }
        if answer.code == tonic::Code::ResourceExhausted as i32 {
            // Over a limit: a full queue passes, an oversized document does not, and only
            // Submit's answer carries the broker's "permanent" mark that tells them apart.
            decided.push(Decided::Alone);
            continue;
        }
        if answer.code != 0 {
            let code = tonic::Code::from_i32(answer.code);
            let reason = format!("{code:?}: {}", answer.message);
            decided.push(if is_permanent(code) {
                warn!(agency = %agent.agency, message_id = %id, reason = %reason, "the broker refused the document");
                Decided::Failed(reason)
            } else if code == tonic::Code::Unavailable {
                Decided::Other(Outcome::Unreachable(reason))
            } else {
                Decided::Other(Outcome::Retry(reason))
            });
            continue;
        }
        let Some(receipt) = answer.submission_receipt else {
            decided.push(Decided::Other(Outcome::Retry(
                "the broker answered without a submission receipt".into(),
            )));
            continue;
        };
        let expected = ExpectedReceipt {
            kind: pb::ReceiptKind::Submission,
            message_id: id,
            header_sha256: &document.header_sha256,
            recipient: None,
            live: true,
        };
        let at_ms = match verify_receipt(&receipt, &agent.tls_anchors, &expected) {
            Ok(verified) => verified.at_ms,
            Err(e) => {
                // As with Submit: resubmitting would only return the same receipt.
                error!(
                    agency = %agent.agency,
                    message_id = %id,
                    error = %e,
                    "the broker's submission receipt does not verify; kept as unverified"
                );
                lienthong_proto::now_ms()
            }
        };
        if answer.duplicate {
            duplicates = duplicates.saturating_add(1);
        }
        debug!(
            agency = %agent.agency,
            message_id = %id,
            business_id = %document.record.business_id,
            duplicate = answer.duplicate,
            "document submitted"
        );
        decided.push(Decided::Submitted {
            receipt: receipt.encode_to_vec(),
            at_ms,
        });
    }
    let changes: Vec<(&str, OutboxSettle<'_>)> = documents
        .iter()
        .zip(&decided)
        .filter_map(|(d, decision)| match decision {
            Decided::Submitted { receipt, at_ms } => Some((
                d.id.as_str(),
                OutboxSettle::Submitted {
                    receipt,
                    at_ms: *at_ms,
                },
            )),
            Decided::Failed(reason) => Some((d.id.as_str(), OutboxSettle::Failed { reason })),
            Decided::Other(_) | Decided::Alone => None,
        })
        .collect();
    let stored = match agent.store.settle_outbox(&changes) {
        Ok(()) => agent.store.durable().await,
        Err(e) => Err(e),
    };
    drop(changes);
    if let Err(e) = &stored {
        // Nothing is lost: the documents still wait, and resubmitting them returns the
        // broker's original receipts.
        error!(agency = %agent.agency, documents = documents.len(), error = %e, "cannot store a batch's outcomes");
    }
    let (mut submitted, mut refused, mut later) = (0usize, 0usize, 0usize);
    let mut alone = Vec::new();
    let outcomes = documents
        .into_iter()
        .zip(decided)
        .filter_map(|(d, decision)| {
            let outcome = match (decision, &stored) {
                (Decided::Alone, _) => {
                    alone.push(d.id);
                    return None;
                }
                (Decided::Other(outcome), _) => outcome,
                (_, Err(e)) => Outcome::Unreachable(format!("local store: {e}")),
                (Decided::Submitted { .. }, Ok(())) => Outcome::Submitted,
                (Decided::Failed(_), Ok(())) => Outcome::Failed,
            };
            match outcome {
                Outcome::Submitted => submitted = submitted.saturating_add(1),
                Outcome::Failed => refused = refused.saturating_add(1),
                Outcome::Unreachable(_) | Outcome::Retry(_) => later = later.saturating_add(1),
            }
            Some((d.id, outcome))
        })
        .collect();
    info!(
        agency = %agent.agency,
        submitted,
        duplicates,
        refused,
        retry = later,
        resubmitted_alone = alone.len(),
        bytes,
        "batch submitted"
    );
    Batched::Done(outcomes, alone)
}
