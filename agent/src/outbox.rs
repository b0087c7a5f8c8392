//! The outbox submitter: submits documents waiting in the outbox to the broker, oldest
//! first, and records the outcome.
//!
//! Invariants:
//! - An entry leaves the outbox only as `submitted` (with the broker's receipt stored)
//!   or `failed` (the broker refused it with a permanent gRPC code).
//! - Retryable failures back off exponentially with full jitter: when the broker is
//!   unreachable all submissions wait; other retryable errors delay only that entry.
//! - Up to [`CONCURRENT_SUBMISSIONS`] documents are submitted at once, so they share
//!   the broker's group commit; a document is never submitted twice at the same time.
//!   New documents arrive on a channel from the API; the outbox itself is re-read at
//!   start and every [`RESCAN_EVERY`] as a safety net.
//! - A submission sends exactly the stored envelope and attachment bytes: the envelope
//!   frame first, then each attachment's bytes in header order, in frames of at most
//!   [`FRAME_BYTES`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use lienthong_proto::document::MAX_ATTACHMENTS;
use lienthong_proto::pb::{self, submit_frame::Frame};
use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
use prost::Message;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::Agent;
use crate::broker_client::is_permanent_status;
use crate::error::StoreError;
use crate::metrics::SubmissionOutcome;

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
    let mut running: JoinSet<(String, Outcome)> = JoinSet::new();
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
            while running.len() < CONCURRENT_SUBMISSIONS {
                let Some(id) = queue.pop_front() else { break };
                if let Some(&(_, due)) = retries.get(&id)
                    && due > now
                {
                    next_due = Some(next_due.map_or(due, |n| n.min(due)));
                    not_due.push(id);
                    continue;
                }
                let submitting = Arc::clone(&agent);
                running.spawn(async move {
                    let outcome = submit_one(&submitting, &id).await;
                    (id, outcome)
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
                let Ok((id, outcome)) = joined else { continue };
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
                        warn!(
                            agency = %agent.agency,
                            message_id = %id,
                            reason = %reason,
                            attempts = entry.0,
                            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                            "submission failed; will retry"
                        );
                        queue.push_back(id);
                    }
                }
            }
            Some(id) = new_ids.recv() => {
                if known.insert(id.clone()) {
                    queue.push_back(id);
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
    let mut client = agent.client.clone();
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
    info!(
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
    let mut client = agent.client.clone();
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
        info!(agency = %agent.agency, message_id = %id, held = ?answer.stored_bytes, "resuming an interrupted upload");
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
