//! The sealer: numbers, signs and stores the documents the API (single and batch
//! routes, edXML import, drop folder) has drafted, a group at a time.
//!
//! One task takes every group of drafts that waited while the previous group was being
//! sealed (no timer: an idle agent seals a lone document at once), then, in one blocking
//! step for the whole group: takes the document numbers the drafts need with one counter
//! update, signs every header with ONE batch signature (`seal_batch`; a group of one is
//! the single-signature format), checks the outbox limits in order, and writes every
//! accepted document with ONE store transaction. One `durable()` then covers the group
//! before any of its drafts is answered.
//!
//! Invariants:
//! - A draft is answered `Ok` only once its document is durable in the outbox; an error
//!   answer means nothing of it is stored (a refused draft never fails its neighbours,
//!   but a failed store write fails the whole group, as nothing of it was written) or,
//!   when the sync itself failed, that the store is poisoned: the outbox may already
//!   have submitted the document, as it is told of each written document before the
//!   sync so that this disk and the broker's overlap.
//! - Numbers are unique: they come from one atomic counter update per group, in the
//!   order the drafts arrived; a refused draft may leave a gap, as before.
//! - The outbox limits (`max_outbox_documents`, `max_outbox_bytes`) count the drafts
//!   accepted earlier in the same group.
//! - A single send with an `Idempotency-Key` has its answer kept under the key right
//!   after its document is written, so the group's one sync covers both (the API then
//!   neither writes it nor syncs again).

use std::path::PathBuf;
use std::sync::{Arc, Weak};

use axum::http::StatusCode;
use bytes::Bytes;
use lienthong_proto::document::{business_id, seal_batch};
use lienthong_proto::pb;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info};

use crate::Agent;
use crate::api::{ApiError, protocol_error};
use crate::store::{NewOutbox, OutboxRecord};

/// A group grows from what waits until it holds at least this many drafts (a batch call
/// of the API arrives whole, so a group may exceed it by one call's documents).
const MAX_GROUP: usize = 64;

/// A document sealed and durable in the outbox.
#[derive(Debug, Clone)]
pub(crate) struct Sealed {
    pub message_id: String,
    pub business_id: String,
    /// The API's answer was kept under the job's `Idempotency-Key`, written after the
    /// document and made durable by the same sync.
    pub answer_kept: bool,
}

/// The `Idempotency-Key` a single send came with: the sealer keeps its answer (`202`,
/// the message and business ids) in the same group write and sync as the document,
/// instead of the API writing it and syncing again afterwards.
#[derive(Debug, Clone)]
pub(crate) struct IdempotencyTag {
    pub key: String,
    pub fingerprint: String,
    pub route: &'static str,
}

/// A drafted document for the sealer: header checked, attachments in hand.
pub(crate) struct SealJob {
    pub header: pb::DocumentHeader,
    /// The request gave its own number (else the counter gives the next one).
    pub given_number: bool,
    /// Kept in the store (empty for a streamed document).
    pub attachments: Vec<Bytes>,
    /// Total attachment bytes.
    pub bytes: u64,
    /// The attachments are the files in `upload_paths`, moved into the outbox.
    pub streamed: bool,
    pub upload_paths: Vec<PathBuf>,
    /// Uploads read into `attachments`: removed once the document is stored.
    pub consumed_uploads: Vec<String>,
    /// Keep the API's answer under this key (single sends only).
    pub idempotency: Option<IdempotencyTag>,
    pub reply: oneshot::Sender<Result<Sealed, ApiError>>,
}

/// Hands groups of drafts to the sealer task.
pub(crate) type SealSender = mpsc::UnboundedSender<Vec<SealJob>>;
pub(crate) type SealReceiver = mpsc::UnboundedReceiver<Vec<SealJob>>;

/// Hands `jobs` to the sealer as one group (it may add what else waits) and waits for
/// each answer, in order: `Ok` once the document is durable in the outbox.
pub(crate) async fn seal(
    agent: &Agent,
    jobs: Vec<(SealJob, oneshot::Receiver<Result<Sealed, ApiError>>)>,
) -> Vec<Result<Sealed, ApiError>> {
    let (jobs, answers): (Vec<_>, Vec<_>) = jobs.into_iter().unzip();
    if agent.sealer.send(jobs).is_err() {
        // The jobs went with the failed send: every answer channel is closed below.
        error!(agency = %agent.agency, "the sealer has stopped; refusing documents");
    }
    let mut out = Vec::with_capacity(answers.len());
    for answer in answers {
        out.push(answer.await.unwrap_or(Err(ApiError::Internal)));
    }
    out
}

/// A job and the channel of its answer, before it is sent.
pub(crate) fn job(
    header: pb::DocumentHeader,
    given_number: bool,
    attachments: Vec<Bytes>,
    streamed: bool,
    upload_paths: Vec<PathBuf>,
    consumed_uploads: Vec<String>,
) -> (SealJob, oneshot::Receiver<Result<Sealed, ApiError>>) {
    let bytes = header
        .attachments
        .iter()
        .fold(0u64, |sum, a| sum.saturating_add(a.size));
    let (reply, answer) = oneshot::channel();
    (
        SealJob {
            header,
            given_number,
            attachments,
            bytes,
            streamed,
            upload_paths,
            consumed_uploads,
            idempotency: None,
            reply,
        },
        answer,
    )
}

/// Runs until the agent is gone (its sender with it). It holds the agent only while a
/// group is sealed, and does not stop with the other tasks: the API drains its
/// requests after shutdown was asked, and those still need their documents sealed.
pub(crate) async fn run(weak: Weak<Agent>, mut jobs: SealReceiver) {
    while let Some(first) = jobs.recv().await {
        // Everything that queued while the previous group was sealed, up to a bound that
        // keeps one store transaction (and the memory it holds) in proportion.
        let mut group = first;
        while group.len() < MAX_GROUP {
            let Ok(more) = jobs.try_recv() else { break };
            group.extend(more);
        }
        // Gone: the jobs' answer channels close with them.
        let Some(agent) = weak.upgrade() else { return };
        let sealing = Arc::clone(&agent);
        let sealed = tokio::task::spawn_blocking(move || seal_group(&sealing, group)).await;
        let answers = match sealed {
            Ok(answers) => answers,
            Err(e) => {
                // The jobs (and their reply channels) are gone with the task: their
                // callers see a closed channel and answer 500.
                error!(agency = %agent.agency, error = %e, "sealing a group of documents failed");
                continue;
            }
        };
        // The outbox may submit before the sync returns ("overlap the disks"): the
        // broker's receipt never reaches the gateway, whose 202 still waits for the
        // sync below, so nothing is acknowledged upstream before it is durable here;
        // the submission's own store writes follow these in sled's log.
        for (_, answer) in &answers {
            if let Ok(done) = answer {
                let _ = agent.outbox_tx.send(done.message_id.clone());
            }
        }
        // The sync runs beside the next group's sealing; concurrent syncs share one.
        let syncing = Arc::clone(&agent);
        tokio::spawn(async move {
            let durable = if answers.iter().any(|(_, a)| a.is_ok()) {
                syncing.store.durable().await
            } else {
                Ok(())
            };
            if let Err(e) = &durable {
                error!(agency = %syncing.agency, error = %e, "cannot make the outbox durable");
            }
            for (reply, answer) in answers {
                let answer = match (&durable, answer) {
                    (Err(_), Ok(_)) => Err(ApiError::Internal),
                    (_, answer) => answer,
                };
                let _ = reply.send(answer);
            }
        });
    }
}

/// The `202` answer of a single send, to keep under its key; `None`, logged, when it
/// cannot be encoded (the API then keeps it itself).
fn kept_answer(
    agent: &Agent,
    tag: &IdempotencyTag,
    message_id: &str,
    business_id: &str,
) -> Option<crate::store::IdempotencyRecord> {
    let answer = crate::api_types::SendResponse {
        message_id: message_id.to_owned(),
        business_id: business_id.to_owned(),
    };
    match serde_json::to_string(&answer) {
        Ok(body) => Some(crate::store::IdempotencyRecord {
            fingerprint: tag.fingerprint.clone(),
            route: tag.route.to_owned(),
            at_ms: lienthong_proto::now_ms(),
            status: StatusCode::ACCEPTED.as_u16(),
            body,
        }),
        Err(e) => {
            error!(agency = %agent.agency, error = %e, "cannot encode an answer");
            None
        }
    }
}

type Answer = (
    oneshot::Sender<Result<Sealed, ApiError>>,
    Result<Sealed, ApiError>,
);

/// Numbers, signs and stores one group. Blocking. Nothing is durable yet.
fn seal_group(agent: &Agent, group: Vec<SealJob>) -> Vec<Answer> {
    let count = group.len();
    let mut results: Vec<Option<Result<Sealed, ApiError>>> = (0..count).map(|_| None).collect();
    let mut jobs = group;
    // Numbers for the drafts without their own, in arrival order, with one update.
    let wanted = jobs.iter().filter(|j| !j.given_number).count();
    if wanted > 0 {
        match agent
            .store
            .take_numbers(u64::try_from(wanted).unwrap_or(u64::MAX))
        {
            Ok(first) => {
                let mut next = first;
                for job in jobs.iter_mut().filter(|j| !j.given_number) {
                    job.header.number = next.to_string();
                    job.header.business_id = business_id(
                        &job.header.sender,
                        &job.header.issue_date,
                        &job.header.number,
                        &job.header.notation,
                    );
                    next = next.saturating_add(1);
                }
            }
            Err(e) => {
                error!(agency = %agent.agency, error = %e, "cannot take document numbers");
                for (slot, job) in results.iter_mut().zip(&jobs) {
                    if !job.given_number {
                        *slot = Some(Err(ApiError::Internal));
                    }
                }
            }
        }
    }
    let headers: Vec<pb::DocumentHeader> = jobs
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_none())
        .map(|(j, _)| j.header.clone())
        .collect();
    let mut signed = seal_batch(&headers, &agent.signing_key()).into_iter();
    let mut envelopes: Vec<Option<pb::Signed>> = (0..count).map(|_| None).collect();
    for (slot, envelope) in results.iter_mut().zip(envelopes.iter_mut()) {
        if slot.is_some() {
            continue;
        }
        match signed.next() {
            Some(Ok(s)) => *envelope = Some(s),
            Some(Err(e)) => *slot = Some(Err(protocol_error(e))),
            None => {
                error!(agency = %agent.agency, "the batch signer answered fewer envelopes than headers");
                *slot = Some(Err(ApiError::Internal));
            }
        }
    }
    // The outbox limits, counting what this group adds before each draft.
    let (mut pending, mut pending_bytes) = match agent.store.outbox_pending() {
        Ok(counts) => counts,
        Err(e) => {
            error!(agency = %agent.agency, error = %e, "cannot read the outbox");
            return refuse_all(jobs, results);
        }
    };
    let mut records: Vec<Option<(OutboxRecord, Vec<u8>)>> = (0..count).map(|_| None).collect();
    for ((job, slot), (envelope, record)) in jobs
        .iter()
        .zip(results.iter_mut())
        .zip(envelopes.iter().zip(records.iter_mut()))
    {
        let Some(envelope) = envelope else { continue };
        if slot.is_some() {
            continue;
        }
        if let Some(refusal) = outbox_limit(agent, pending, pending_bytes, job.bytes) {
            *slot = Some(Err(refusal));
            continue;
        }
        if job.streamed
            && let Err(e) = agent
                .files
                .take_into_outbox(&job.header.message_id, &job.upload_paths)
        {
            error!(agency = %agent.agency, error = %e, "cannot move the uploads into the outbox");
            *slot = Some(Err(ApiError::Internal));
            continue;
        }
        pending = pending.saturating_add(1);
        pending_bytes = pending_bytes.saturating_add(job.bytes);
        *record = Some((
            OutboxRecord::waiting(&job.header, envelope, job.bytes, job.streamed),
            envelope.encode_to_vec(),
        ));
    }
    let new: Vec<NewOutbox<'_>> = jobs
        .iter()
        .zip(&records)
        .filter_map(|(job, record)| {
            let (record, envelope) = record.as_ref()?;
            Some(NewOutbox {
                record,
                envelope,
                attachments: if job.streamed { &[] } else { &job.attachments },
                refers_to: Some(job.header.refers_to.as_str()).filter(|r| !r.is_empty()),
            })
        })
        .collect();
    let stored = agent.store.put_outbox_batch(&new);
    let written = new.len();
    drop(new);
    if let Err(e) = &stored {
        error!(agency = %agent.agency, documents = written, error = %e, "cannot store documents in the outbox");
    }
    let mut accepted = 0usize;
    let mut refused = 0usize;
    let mut to_keep: Vec<(String, crate::store::IdempotencyRecord)> = Vec::new();
    let mut answers: Vec<Answer> = jobs
        .into_iter()
        .zip(results)
        .zip(records)
        .map(|((job, result), record)| {
            let answer = match (result, record, &stored) {
                (Some(refusal), _, _) => refusal,
                (None, Some(_), Ok(())) => {
                    // Read into the store: the upload files are no longer needed.
                    for id in &job.consumed_uploads {
                        agent.files.remove_upload(id);
                    }
                    debug!(
                        agency = %agent.agency,
                        message_id = %job.header.message_id,
                        business_id = %job.header.business_id,
                        "document sealed into the outbox"
                    );
                    let answer_kept = match &job.idempotency {
                        Some(tag) => match kept_answer(
                            agent,
                            tag,
                            &job.header.message_id,
                            &job.header.business_id,
                        ) {
                            Some(record) => {
                                to_keep.push((tag.key.clone(), record));
                                true
                            }
                            None => false,
                        },
                        None => false,
                    };
                    Ok(Sealed {
                        message_id: job.header.message_id,
                        business_id: job.header.business_id,
                        answer_kept,
                    })
                }
                (None, _, _) => Err(ApiError::Internal),
            };
            if answer.is_ok() {
                accepted = accepted.saturating_add(1);
            } else {
                refused = refused.saturating_add(1);
            }
            (job.reply, answer)
        })
        .collect();
    // The answers under their keys: one batch, after the documents in the log.
    if !to_keep.is_empty() {
        let entries: Vec<(&str, &crate::store::IdempotencyRecord)> =
            to_keep.iter().map(|(k, r)| (k.as_str(), r)).collect();
        if let Err(e) = agent.store.idempotency_put_many(&entries) {
            error!(agency = %agent.agency, error = %e, "cannot keep the answers of idempotency keys in the group write; the API keeps them");
            for (_, answer) in &mut answers {
                if let Ok(sealed) = answer {
                    sealed.answer_kept = false;
                }
            }
        }
    }
    info!(
        agency = %agent.agency,
        documents = count,
        accepted,
        refused,
        numbered = wanted,
        "sealed a group of documents with one signature"
    );
    answers
}

fn refuse_all(jobs: Vec<SealJob>, results: Vec<Option<Result<Sealed, ApiError>>>) -> Vec<Answer> {
    jobs.into_iter()
        .zip(results)
        .map(|(job, result)| (job.reply, result.unwrap_or(Err(ApiError::Internal))))
        .collect()
}

/// The refusal when one more document of `bytes` would pass an outbox limit.
fn outbox_limit(agent: &Agent, pending: u64, pending_bytes: u64, bytes: u64) -> Option<ApiError> {
    if pending >= agent.max_outbox_documents {
        return Some(ApiError::Rejected(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the outbox holds {pending} documents not yet accepted by the broker, the limit \
                 (max_outbox_documents); retry when the broker is reachable again"
            ),
        ));
    }
    if pending_bytes.saturating_add(bytes) > agent.max_outbox_bytes {
        return Some(ApiError::Rejected(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the outbox holds {pending_bytes} bytes not yet accepted by the broker; this \
                 document would exceed the limit of {} (max_outbox_bytes)",
                agent.max_outbox_bytes
            ),
        ));
    }
    None
}
