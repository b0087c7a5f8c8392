//! The broker session: one long-lived bidirectional stream on which the broker pushes
//! deliveries, and the handling of each delivery.
//!
//! Invariants:
//! - Nothing from the broker is trusted: every delivery is verified end to end
//!   (sender signature and chain, this agency among the recipients, every attachment's
//!   size and digest, the broker's submission receipt bound to the header digest)
//!   before anything is stored. A delivery that fails is refused with the reason and
//!   nothing is exported.
//! - `Ack` is sent only after the document and its submission receipt are durable in
//!   the store, the signed delivery receipt is durable, and the document is exported
//!   to the inbox folder with all three signatures (envelope, submission receipt,
//!   delivery receipt).
//! - A message id is stored and exported once; a redelivery is answered with the
//!   stored receipt. A different document reusing a stored message id is refused.
//! - A local failure (store, disk, signing) sends neither Ack nor Refuse: the session
//!   is dropped and the broker redelivers after the reconnect.
//! - Small deliveries are handled concurrently (at most the broker's window), a
//!   message id at most once at a time. A streamed
//!   delivery's envelope is verified when it arrives, its chunks are written to files
//!   as they come (hashed as they pass) and it is stored only once every attachment
//!   matches its digest; what is held is offered in the next Hello, so a broken link
//!   resumes rather than restarts.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use lienthong_proto::document::{
    VerifiedDocument, check_attachment, is_valid_message_id, verify_document,
};
use lienthong_proto::pb::{self, agent_message::Msg as Out, broker_message::Msg as In};
use lienthong_proto::receipt::{ExpectedReceipt, sign_receipt, verify_receipt};
use lienthong_proto::signing::VerifyTime;
use lienthong_proto::spool::{PartialAttachment, SpoolError};
use lienthong_proto::{ProtocolError, now_ms};
use prost::Message;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Agent;
use crate::error::StoreError;
use crate::export::{self, ExportDocument};
use crate::store::InboxRecord;

/// A failure on our side: the delivery is neither acknowledged nor refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LocalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error("signing the delivery receipt: {0}")]
    Sign(ProtocolError),
    #[error("stored data of {id} is unreadable: {detail}")]
    Stored { id: String, detail: String },
    #[error("background task failed: {0}")]
    Task(String),
    #[error("streamed delivery: {0}")]
    Files(String),
}

enum SessionEnd {
    Stopped,
    Ended { reason: String, handled: u64 },
}

/// Runs the session, reconnecting with jittered backoff, until `stop` is cancelled.
pub(crate) async fn run(agent: Arc<Agent>, stop: CancellationToken) {
    let mut failures: u32 = 0;
    loop {
        let started = Instant::now();
        let (reason, handled) = match session_once(&agent, &stop).await {
            SessionEnd::Stopped => return,
            SessionEnd::Ended { reason, handled } => (reason, handled),
        };
        if handled > 0 || started.elapsed() >= agent.reconnect_max {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = agent.backoff(failures);
        let reconnect_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        // The broker refuses a second session for the agency (another agent runs with
        // this certificate): say so loudly; the backoff grows while it lasts.
        if reason.starts_with("FailedPrecondition") {
            tracing::error!(agency = %agent.agency, reason = %reason, reconnect_in_ms, "the broker refused this agent's session");
        } else {
            warn!(agency = %agent.agency, reason = %reason, handled, reconnect_in_ms, "broker session ended");
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn session_once(agent: &Arc<Agent>, stop: &CancellationToken) -> SessionEnd {
    let capacity = usize::try_from(agent.window)
        .unwrap_or(32)
        .saturating_add(8);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(capacity);
    let partial = partial_deliveries(agent).await;
    let hello = pb::AgentMessage {
        msg: Some(Out::Hello(pb::Hello {
            window: agent.window,
            partial,
            max_batch: 0,
        })),
    };
    if tx.send(hello).await.is_err() {
        return SessionEnd::Ended {
            reason: "the outgoing stream closed".into(),
            handled: 0,
        };
    }
    let mut client = agent.client.clone();
    let response = tokio::select! {
        response = client.session(ReceiverStream::new(rx)) => response,
        () = stop.cancelled() => return SessionEnd::Stopped,
    };
    let mut inbound = match response {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return SessionEnd::Ended {
                reason: format!("{:?}: {}", status.code(), status.message()),
                handled: 0,
            };
        }
    };
    info!(agency = %agent.agency, window = agent.window, "broker session established");
    let _up = agent.metrics.session_up();
    let mut handled: u64 = 0;
    let mut receiving: HashMap<String, Receiving> = HashMap::new();
    // Small deliveries are handled concurrently (the broker's window bounds how many),
    // so that their fsyncs are shared by the store's group commit.
    let mut handlers: JoinSet<(String, Result<pb::AgentMessage, LocalError>)> = JoinSet::new();
    let mut in_progress: HashSet<String> = HashSet::new();
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            Some(joined) = handlers.join_next(), if !handlers.is_empty() => {
                let (id, handled_result) = match joined {
                    Ok(done) => done,
                    Err(e) => (String::new(), Err(LocalError::Task(e.to_string()))),
                };
                in_progress.remove(&id);
                match reply_or_end(agent, &tx, handled_result, &mut handled).await {
                    Some(end) => return end,
                    None => continue,
                }
            }
            () = stop.cancelled() => return SessionEnd::Stopped,
        };
        let message = match message {
            Ok(Some(pb::BrokerMessage { msg: Some(message) })) => message,
            Ok(Some(_)) => {
                debug!(agency = %agent.agency, "ignoring an empty broker message");
                continue;
            }
            Ok(None) => {
                return SessionEnd::Ended {
                    reason: "the broker closed the session".into(),
                    handled,
                };
            }
            Err(status) => {
                return SessionEnd::Ended {
                    reason: format!("{:?}: {}", status.code(), status.message()),
                    handled,
                };
            }
        };
        let handling = match message {
            In::Delivery(delivery) if delivery.streamed => {
                start_streamed(agent, delivery, &mut receiving).await
            }
            In::Delivery(delivery) => {
                let id = delivery
                    .envelope
                    .as_ref()
                    .map(untrusted_message_id)
                    .unwrap_or_default();
                // Offered again while still being handled: the first answer serves both.
                if !id.is_empty() && !in_progress.insert(id.clone()) {
                    continue;
                }
                let handling_agent = Arc::clone(agent);
                handlers.spawn(async move {
                    let result = handle_delivery(&handling_agent, delivery).await;
                    (id, result)
                });
                continue;
            }
            In::Chunk(chunk) => on_chunk(agent, chunk, &mut receiving).await,
            In::Batch(_) => {
                return SessionEnd::Ended {
                    reason: "the broker sent a delivery batch this session did not ask for".into(),
                    handled,
                };
            }
        };
        let handling = match handling {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => continue,
            Err(e) => Err(e),
        };
        if let Some(end) = reply_or_end(agent, &tx, handling, &mut handled).await {
            return end;
        }
    }
}

/// Sends the answer to a delivery; a local failure or a closed stream ends the session.
async fn reply_or_end(
    agent: &Arc<Agent>,
    tx: &tokio::sync::mpsc::Sender<pb::AgentMessage>,
    handling: Result<pb::AgentMessage, LocalError>,
    handled: &mut u64,
) -> Option<SessionEnd> {
    let reply = match handling {
        Ok(reply) => reply,
        Err(e) => {
            error!(agency = %agent.agency, error = %e, "cannot take the delivery; dropping the session so the broker redelivers");
            return Some(SessionEnd::Ended {
                reason: format!("local failure: {e}"),
                handled: *handled,
            });
        }
    };
    if matches!(reply.msg, Some(Out::Refuse(_))) {
        agent.metrics.delivery_refused();
    }
    if tx.send(reply).await.is_err() {
        return Some(SessionEnd::Ended {
            reason: "the outgoing stream closed".into(),
            handled: *handled,
        });
    }
    *handled += 1;
    None
}

fn refuse(message_id: String, reason: String) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Out::Refuse(pb::Refuse { message_id, reason })),
    }
}

fn ack(message_id: String, receipt: pb::Signed) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Out::Ack(pb::Ack {
            message_id,
            delivery_receipt: Some(receipt),
        })),
    }
}

/// The message id an unverified envelope claims, only to name it in a refusal.
fn untrusted_message_id(envelope: &pb::Signed) -> String {
    pb::DocumentHeader::decode(envelope.payload.as_ref())
        .ok()
        .map(|h| h.message_id)
        .filter(|id| is_valid_message_id(id))
        .unwrap_or_default()
}

/// The sender's signature and chain, this agency among the recipients, and the
/// broker's submission receipt for exactly this header: what every delivery, whole or
/// streamed, passes first.
fn verify_addressed_to_us(
    agent: &Agent,
    envelope: &pb::Signed,
    submission_receipt: Option<&pb::Signed>,
) -> Result<VerifiedDocument, String> {
    let verified = verify_document(envelope, &agent.document_anchors, VerifyTime::Now)
        .map_err(|e| e.to_string())?;
    if !verified
        .header
        .recipients
        .iter()
        .any(|r| r == agent.agency.as_str())
    {
        return Err(format!(
            "this agency ({}) is not a recipient of the document",
            agent.agency
        ));
    }
    check_submission_receipt(agent, submission_receipt, &verified)?;
    Ok(verified)
}

/// The broker's submission receipt that came with a delivery: signed by a broker the
/// TLS anchors trust (chain checked at the time it states), for this message id and
/// these exact header bytes. Its time is the document's trusted time (DESIGN.md
/// section 5), so a delivery without a valid one is refused: the evidence would be
/// incomplete.
fn check_submission_receipt(
    agent: &Agent,
    receipt: Option<&pb::Signed>,
    verified: &VerifiedDocument,
) -> Result<pb::Receipt, String> {
    let receipt = receipt
        .ok_or_else(|| "the delivery carries no submission receipt from the broker".to_owned())?;
    let expected = ExpectedReceipt {
        kind: pb::ReceiptKind::Submission,
        message_id: &verified.header.message_id,
        header_sha256: &verified.header_sha256,
        recipient: None,
        live: false,
    };
    verify_receipt(receipt, &agent.tls_anchors, &expected)
        .map_err(|e| format!("the broker's submission receipt does not verify: {e}"))
}

/// Every check a delivery must pass before it is stored.
fn check_delivery(
    agent: &Agent,
    envelope: &pb::Signed,
    submission_receipt: Option<&pb::Signed>,
    attachments: &[Bytes],
) -> Result<lienthong_proto::document::VerifiedDocument, String> {
    let verified = verify_addressed_to_us(agent, envelope, submission_receipt)?;
    let header = &verified.header;
    if attachments.len() != header.attachments.len() {
        return Err(format!(
            "the delivery carries {} attachments, the header lists {}",
            attachments.len(),
            header.attachments.len()
        ));
    }
    for (index, (info, bytes)) in header.attachments.iter().zip(attachments).enumerate() {
        check_attachment(index, info, bytes).map_err(|e| e.to_string())?;
    }
    Ok(verified)
}

async fn handle_delivery(
    agent: &Arc<Agent>,
    delivery: pb::Delivery,
) -> Result<pb::AgentMessage, LocalError> {
    let Some(envelope) = delivery.envelope else {
        warn!(agency = %agent.agency, "refusing a delivery without an envelope");
        return Ok(refuse(
            String::new(),
            "the delivery carries no signed envelope".into(),
        ));
    };
    let attachments = delivery.attachments;
    let attempt = delivery.attempt;
    let submission_receipt = delivery.submission_receipt;
    let checking = Arc::clone(agent);
    let (envelope, submission_receipt, attachments, checked) =
        tokio::task::spawn_blocking(move || {
            let checked = check_delivery(
                &checking,
                &envelope,
                submission_receipt.as_ref(),
                &attachments,
            );
            (envelope, submission_receipt, attachments, checked)
        })
        .await
        .map_err(|e| LocalError::Task(e.to_string()))?;
    let verified = match checked {
        Ok(verified) => verified,
        Err(reason) => {
            let message_id = untrusted_message_id(&envelope);
            warn!(
                agency = %agent.agency,
                message_id = %message_id,
                reason = %reason,
                attempt,
                "refusing delivery"
            );
            return Ok(refuse(message_id, reason));
        }
    };
    accept(
        agent,
        Evidence {
            envelope,
            submission_receipt: submission_receipt.unwrap_or_default(),
        },
        verified,
        attempt,
        Body::Inline(attachments),
    )
    .await
}

/// What a verified delivery brings besides its attachments: the sender's envelope and
/// the broker's checked submission receipt.
struct Evidence {
    envelope: pb::Signed,
    submission_receipt: pb::Signed,
}

/// Where a verified delivery's attachment bytes are.
enum Body {
    Inline(Vec<Bytes>),
    /// Files `<dir>/<index>`, complete, checked and synced (a streamed delivery).
    Files(PathBuf),
}

/// Stores a verified delivery (once), exports it and answers with the signed receipt.
async fn accept(
    agent: &Arc<Agent>,
    evidence: Evidence,
    verified: VerifiedDocument,
    attempt: u32,
    body: Body,
) -> Result<pb::AgentMessage, LocalError> {
    let id = verified.header.message_id.clone();
    let sha_hex = hex::encode(verified.header_sha256);
    let envelope_bytes = Bytes::from(evidence.envelope.encode_to_vec());

    let (record, durable_at) = match agent.store.inbox_record(&id)? {
        Some(existing) if existing.header_sha256 != sha_hex => {
            let reason =
                "a different document with this message id was already received".to_owned();
            warn!(agency = %agent.agency, message_id = %id, reason = %reason, "refusing delivery");
            return Ok(refuse(id, reason));
        }
        Some(existing) => {
            debug!(agency = %agent.agency, message_id = %id, attempt, "redelivery of a stored document");
            agent.metrics.delivery_duplicate();
            (existing, None)
        }
        None => {
            let streamed = matches!(body, Body::Files(_));
            let is_status = verified.header.kind == pb::DocumentKind::Status as i32;
            if is_status
                && let Err(reason) = crate::business::check_received_report(agent, &verified.header)
            {
                warn!(agency = %agent.agency, message_id = %id, reason = %reason, "refusing a status report");
                return Ok(refuse(id, reason));
            }
            let record = InboxRecord {
                message_id: id.clone(),
                received_at_ms: now_ms(),
                sender: verified.header.sender.clone(),
                subject: verified.header.subject.clone(),
                business_id: verified.header.business_id.clone(),
                header_sha256: sha_hex,
                attachments: verified
                    .header
                    .attachments
                    .iter()
                    .map(|a| a.name.clone())
                    .collect(),
                // A status report is evidence, not a document for the gateway.
                exported: is_status,
                streamed,
                kind: verified.header.kind,
                business_type: verified.header.business_type,
                refers_to: Some(verified.header.refers_to.clone()).filter(|r| !r.is_empty()),
                ..InboxRecord::default()
            };
            let storing = Arc::clone(agent);
            let inline = match &body {
                Body::Inline(attachments) => attachments.clone(),
                Body::Files(_) => Vec::new(),
            };
            let (r, e) = (record.clone(), envelope_bytes.clone());
            tokio::task::spawn_blocking(move || storing.store.put_inbox(&r, &e, &inline))
                .await
                .map_err(|e| LocalError::Task(e.to_string()))??;
            agent.store.put_received_submission_receipt(
                &id,
                &evidence.submission_receipt.encode_to_vec(),
            )?;
            agent.store.durable().await?;
            agent.metrics.delivery_received();
            agent.inbox_count.send_modify(|n| *n += 1);
            (record, Some(now_ms()))
        }
    };

    // A record stored before this agent kept submission receipts (or a crash between
    // the two writes) gets the one that came with this delivery, checked above.
    if agent.store.received_submission_receipt(&id)?.is_none() {
        agent
            .store
            .put_received_submission_receipt(&id, &evidence.submission_receipt.encode_to_vec())?;
        agent.store.durable().await?;
    }

    let receipt = match agent.store.delivery_receipt(&id)? {
        Some(stored) => pb::Signed::decode(stored.as_ref()).map_err(|e| LocalError::Stored {
            id: id.clone(),
            detail: format!("delivery receipt: {e}"),
        })?,
        None => {
            let receipt = pb::Receipt {
                kind: pb::ReceiptKind::Delivery as i32,
                message_id: id.clone(),
                header_sha256: verified.header_sha256.to_vec(),
                at_ms: durable_at.unwrap_or_else(now_ms),
                issuer: agent.agency.to_string(),
                business_id: verified.header.business_id.clone(),
                sender: verified.header.sender.clone(),
                recipient: agent.agency.to_string(),
                ..Default::default()
            };
            let signed = sign_receipt(&receipt, &agent.signing_key).map_err(LocalError::Sign)?;
            agent
                .store
                .put_delivery_receipt(&id, &signed.encode_to_vec())?;
            agent.store.durable().await?;
            info!(
                agency = %agent.agency,
                message_id = %id,
                sender = %verified.header.sender,
                business_id = %verified.header.business_id,
                "document received"
            );
            signed
        }
    };
    // Exported after the delivery receipt, so the folder holds all three signatures.
    if record.kind == pb::DocumentKind::Document as i32 {
        ensure_exported(
            agent,
            &record,
            &envelope_bytes,
            &verified.header,
            &verified.header_sha256,
            body,
        )
        .await?;
    }
    // Links and recall/update effects; idempotent, so a redelivery repeats them safely.
    crate::business::on_received(agent, &verified.header).await?;
    Ok(ack(id, receipt))
}

/// A streamed delivery being received.
struct Receiving {
    evidence: Evidence,
    verified: VerifiedDocument,
    attempt: u32,
    parts: Vec<Option<PartialAttachment>>,
}

/// What this agent holds of streamed deliveries not yet stored, for the Hello.
async fn partial_deliveries(agent: &Arc<Agent>) -> Vec<pb::PartialDelivery> {
    let reading = Arc::clone(agent);
    tokio::task::spawn_blocking(move || {
        reading
            .files
            .partial_deliveries()
            .into_iter()
            .filter(|(id, _)| matches!(reading.store.inbox_record(id), Ok(None)))
            .map(|(message_id, stored_bytes)| pb::PartialDelivery {
                message_id,
                stored_bytes,
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// The checks a streamed delivery's envelope must pass before any chunk is kept.
fn check_streamed(
    agent: &Agent,
    envelope: &pb::Signed,
    submission_receipt: Option<&pb::Signed>,
) -> Result<VerifiedDocument, String> {
    let verified = verify_addressed_to_us(agent, envelope, submission_receipt)?;
    let header = &verified.header;
    let total = header
        .attachments
        .iter()
        .map(|a| a.size)
        .fold(0u64, u64::saturating_add);
    if total > agent.max_document_bytes {
        return Err(format!(
            "the document is {total} bytes; this agency accepts at most {} (max_document_bytes)",
            agent.max_document_bytes
        ));
    }
    Ok(verified)
}

/// The header of a streamed delivery: verified, then its files opened (continuing
/// whatever an earlier session left). Answers at once when it needs no bytes.
async fn start_streamed(
    agent: &Arc<Agent>,
    delivery: pb::Delivery,
    receiving: &mut HashMap<String, Receiving>,
) -> Result<Option<pb::AgentMessage>, LocalError> {
    let Some(envelope) = delivery.envelope else {
        return Ok(Some(refuse(
            String::new(),
            "the delivery carries no signed envelope".into(),
        )));
    };
    let checking = Arc::clone(agent);
    let submission_receipt = delivery.submission_receipt;
    let (envelope, submission_receipt, checked) = tokio::task::spawn_blocking(move || {
        let checked = check_streamed(&checking, &envelope, submission_receipt.as_ref());
        (envelope, submission_receipt, checked)
    })
    .await
    .map_err(|e| LocalError::Task(e.to_string()))?;
    let verified = match checked {
        Ok(verified) => verified,
        Err(reason) => {
            let message_id = untrusted_message_id(&envelope);
            warn!(agency = %agent.agency, message_id = %message_id, reason = %reason, "refusing delivery");
            return Ok(Some(refuse(message_id, reason)));
        }
    };
    let id = verified.header.message_id.clone();
    let dir = agent.files.incoming_dir(&id);
    let evidence = Evidence {
        envelope,
        submission_receipt: submission_receipt.unwrap_or_default(),
    };
    if agent.store.inbox_record(&id)?.is_some() {
        // Stored before: no bytes needed (the chunks that follow are ignored).
        receiving.remove(&id);
        return accept(
            agent,
            evidence,
            verified,
            delivery.attempt,
            Body::Files(dir),
        )
        .await
        .map(Some);
    }
    let infos = verified.header.attachments.clone();
    let opening = dir.clone();
    let parts =
        tokio::task::spawn_blocking(move || lienthong_proto::spool::open_all(&opening, &infos))
            .await
            .map_err(|e| LocalError::Task(e.to_string()))?
            .map_err(|e| LocalError::Files(e.to_string()))?;
    debug!(
        agency = %agent.agency,
        message_id = %id,
        held = parts.iter().map(PartialAttachment::stored).sum::<u64>(),
        "streamed delivery started"
    );
    let state = Receiving {
        evidence,
        verified,
        attempt: delivery.attempt,
        parts: parts.into_iter().map(Some).collect(),
    };
    if state
        .parts
        .iter()
        .flatten()
        .all(PartialAttachment::is_complete)
    {
        return complete_streamed(agent, state).await.map(Some);
    }
    receiving.insert(id, state);
    Ok(None)
}

/// One chunk of a streamed delivery: written to its file as it arrives.
async fn on_chunk(
    agent: &Arc<Agent>,
    chunk: pb::DeliveryChunk,
    receiving: &mut HashMap<String, Receiving>,
) -> Result<Option<pb::AgentMessage>, LocalError> {
    let id = chunk.message_id.clone();
    let Some(state) = receiving.get_mut(&id) else {
        // A chunk of a delivery already stored or refused.
        return Ok(None);
    };
    let index = chunk.attachment_index as usize;
    let Some(mut part) = state.parts.get_mut(index).and_then(Option::take) else {
        receiving.remove(&id);
        return Ok(Some(refuse(
            id,
            format!("a chunk names attachment {index}, which the header does not list"),
        )));
    };
    let (part, written) = tokio::task::spawn_blocking(move || {
        let written = part.write_chunk(chunk.offset, &chunk.data);
        (part, written)
    })
    .await
    .map_err(|e| LocalError::Task(e.to_string()))?;
    if let Some(slot) = state.parts.get_mut(index) {
        *slot = Some(part);
    }
    match written {
        Ok(()) => {}
        Err(SpoolError::Mismatch(e)) => {
            receiving.remove(&id);
            discard_incoming(agent, &id).await;
            return Ok(Some(refuse(id, e.to_string())));
        }
        // A gap or a write failure: the next session resumes from what is held.
        Err(e) => return Err(LocalError::Files(e.to_string())),
    }
    if state
        .parts
        .iter()
        .flatten()
        .all(PartialAttachment::is_complete)
        && let Some(state) = receiving.remove(&id)
    {
        return complete_streamed(agent, state).await.map(Some);
    }
    Ok(None)
}

async fn discard_incoming(agent: &Arc<Agent>, id: &str) {
    let _ = tokio::fs::remove_dir_all(agent.files.incoming_dir(id)).await;
}

/// Every byte of a streamed delivery is here: check the digests, sync, then store,
/// export and acknowledge like any delivery.
async fn complete_streamed(
    agent: &Arc<Agent>,
    state: Receiving,
) -> Result<pb::AgentMessage, LocalError> {
    let id = state.verified.header.message_id.clone();
    let resumed = state.parts.iter().flatten().any(PartialAttachment::resumed);
    let parts = state.parts;
    let finished = tokio::task::spawn_blocking(move || -> Result<(), SpoolError> {
        for part in parts.into_iter().flatten() {
            part.finish()?;
        }
        Ok(())
    })
    .await
    .map_err(|e| LocalError::Task(e.to_string()))?;
    match finished {
        Ok(()) => {}
        Err(SpoolError::Mismatch(e)) => {
            discard_incoming(agent, &id).await;
            if resumed {
                // Bytes kept from before may have been damaged here (a crash): start
                // again from zero rather than blame the sender.
                return Err(LocalError::Files(format!(
                    "{e} after resuming; the partial copy was discarded"
                )));
            }
            warn!(agency = %agent.agency, message_id = %id, reason = %e, "refusing delivery");
            return Ok(refuse(id, e.to_string()));
        }
        Err(e) => return Err(LocalError::Files(e.to_string())),
    }
    let dir = agent.files.incoming_dir(&id);
    accept(
        agent,
        state.evidence,
        state.verified,
        state.attempt,
        Body::Files(dir),
    )
    .await
}

/// Exports the document unless its complete folder exists and the record says so.
async fn ensure_exported(
    agent: &Arc<Agent>,
    record: &InboxRecord,
    envelope_bytes: &[u8],
    header: &pb::DocumentHeader,
    header_sha256: &[u8],
    body: Body,
) -> Result<(), LocalError> {
    let id = record.message_id.as_str();
    if record.exported && export::is_exported(&agent.inbox_dir, id) {
        return Ok(());
    }
    let (attachments, files) = match body {
        Body::Inline(attachments) => (attachments, None),
        Body::Files(dir) => (Vec::new(), Some(dir)),
    };
    let inbox_dir = agent.inbox_dir.clone();
    let id_owned = id.to_owned();
    let envelope = envelope_bytes.to_vec();
    let header = header.clone();
    let sha = header_sha256.to_vec();
    let received_at_ms = record.received_at_ms;
    let submission_receipt = agent.store.received_submission_receipt(id)?;
    let delivery_receipt = agent.store.delivery_receipt(id)?;
    let exporting = Arc::clone(agent);
    let path = tokio::task::spawn_blocking(move || {
        export::export(
            &inbox_dir,
            &ExportDocument {
                message_id: &id_owned,
                envelope: &envelope,
                header: &header,
                header_sha256: &sha,
                received_at_ms,
                attachments: &attachments,
                attachment_files: files.as_deref(),
                submission_receipt: submission_receipt.as_deref(),
                delivery_receipt: delivery_receipt.as_deref(),
            },
            &exporting.inbox_access,
            &exporting.export_sync,
        )
    })
    .await
    .map_err(|e| LocalError::Task(e.to_string()))??;
    agent.store.mark_exported(id)?;
    info!(agency = %agent.agency, message_id = %id, path = %path.display(), "document exported");
    Ok(())
}

/// On start-up: exports every stored document whose export did not complete.
/// Failures are logged; the broker's redelivery retries them.
pub(crate) async fn reexport_pending(agent: &Arc<Agent>) {
    let records = match agent.store.inbox_records() {
        Ok(records) => records,
        Err(e) => {
            error!(agency = %agent.agency, error = %e, "cannot read the inbox");
            return;
        }
    };
    for record in records.into_iter().filter(|r| !r.exported) {
        if let Err(e) = reexport(agent, &record).await {
            error!(agency = %agent.agency, message_id = %record.message_id, error = %e, "cannot export a stored document");
        }
    }
}

async fn reexport(agent: &Arc<Agent>, record: &InboxRecord) -> Result<(), LocalError> {
    let id = record.message_id.as_str();
    let stored = |detail: String| LocalError::Stored {
        id: id.to_owned(),
        detail,
    };
    if agent.store.delivery_receipt(id)?.is_none() {
        // Stopped before the delivery receipt was signed: the broker redelivers, and
        // that delivery signs it and exports the folder with all three signatures.
        debug!(agency = %agent.agency, message_id = %id, "export waits for the redelivery");
        return Ok(());
    }
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
    let body = if record.streamed {
        Body::Files(agent.files.incoming_dir(id))
    } else {
        Body::Inline(
            agent
                .store
                .inbox_attachments(id, header.attachments.len())?,
        )
    };
    ensure_exported(agent, record, &envelope_bytes, &header, &sha, body).await
}
