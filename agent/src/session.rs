//! The broker session: one long-lived bidirectional stream on which the broker pushes
//! deliveries (one per `Delivery`, many per `DeliveryBatch`), and their handling.
//!
//! Invariants:
//! - Nothing from the broker is trusted: every delivery is verified end to end
//!   (sender signature and chain, this agency among the recipients, every attachment's
//!   size and digest, the broker's submission receipt bound to the header digest)
//!   before anything is stored. A delivery that fails is refused with the reason and
//!   nothing of it is stored or exported; it never fails the other deliveries of its
//!   batch or group.
//! - `Ack` (alone or in an `AckBatch`) is sent only after the document, its submission
//!   receipt and the signed delivery receipt are durable in the store. Export to the
//!   inbox folder follows the acknowledgement (the exporter, fed once the group is
//!   durable), so the folder is never a condition of the receipt.
//! - Batches without timers: whole deliveries that queue while a group is being
//!   checked and written form the next group (at most [`GROUP_MAX_DELIVERIES`] and
//!   [`GROUP_MAX_BYTES`], whole broker messages): one store transaction, one durable
//!   sync, one batch signature over the group's new delivery receipts, then one
//!   `AckBatch` per `DeliveryBatch` (an `Ack`/`Refuse` per single `Delivery`). One
//!   group at a time is checked and written; up to [`GROUPS_IN_FLIGHT`] written groups
//!   wait for the disk meanwhile (their syncs coalesce in the store's group commit), and
//!   each is answered only once its own sync has returned. Beside waiting groups only a
//!   full batch's worth starts a group, so under load groups grow rather than split.
//! - Limits: a batch may hold at most the `max_batch` this agent announced, and the
//!   broker may not push more unanswered deliveries than the window plus one batch;
//!   either violation ends the session.
//! - A message id is stored once; a redelivery is answered with the stored receipt. A
//!   different document reusing a stored message id is refused. A message id is
//!   handled at most once at a time (an offer of one in progress is dropped: the
//!   first answer serves both).
//! - A local failure (store, disk, signing) sends neither Ack nor Refuse for any
//!   delivery of the group: the session is dropped and the broker redelivers.
//! - A streamed delivery's envelope is verified when it arrives, its chunks are
//!   written to files as they come (hashed as they pass) and it is stored only once
//!   every attachment matches its digest; what is held is offered in the next Hello,
//!   so a broken link resumes rather than restarts. Its files stay in `incoming/` until
//!   the exporter links them into the inbox folder (or for good, without one).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use lienthong_proto::document::{
    VerifiedDocument, check_attachment, is_valid_message_id, verify_document,
};
use lienthong_proto::pb::{self, agent_message::Msg as Out, broker_message::Msg as In};
use lienthong_proto::receipt::{ExpectedReceipt, sign_receipts, verify_receipt};
use lienthong_proto::signing::VerifyTime;
use lienthong_proto::spool::{PartialAttachment, SpoolError};
use lienthong_proto::{ProtocolError, now_ms};
use prost::Message;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::Agent;
use crate::error::StoreError;
use crate::export;
use crate::store::{InboxDocument, InboxRecord, InboxWrite};

/// The most deliveries this agent asks for in one `DeliveryBatch`.
const MAX_BATCH: u32 = 64;
/// A group (one store transaction, one sync, one receipt signature) takes whole
/// broker messages up to this many deliveries...
const GROUP_MAX_DELIVERIES: usize = 512;
/// ... and this many bytes of them (one message alone may be larger, up to the gRPC
/// message limit).
const GROUP_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Groups written and waiting for their sync (one more may be checked and written
/// meanwhile): bounds what a session holds besides its queue.
const GROUPS_IN_FLIGHT: usize = 4;

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

/// How one queued unit of whole deliveries is answered.
#[derive(Debug, Clone, Copy)]
enum Form {
    /// A `Delivery` message: answered with `Ack` or `Refuse`.
    Single,
    /// A `DeliveryBatch`: answered with one `AckBatch`.
    Batch,
}

/// Whole deliveries that arrived in one broker message.
struct Unit {
    form: Form,
    deliveries: Vec<pb::Delivery>,
    /// The (claimed) message ids, held in `in_progress` until answered.
    ids: Vec<String>,
    bytes: usize,
}

/// A group taken from the queue: the units' forms and sizes, to split the outcomes.
type GroupDone = (
    Vec<(Form, usize)>,
    Vec<String>,
    Result<Vec<Outcome>, LocalError>,
);

/// Takes whole units from the front of the queue for one group: at least one, then
/// more while the group stays within [`GROUP_MAX_DELIVERIES`] and [`GROUP_MAX_BYTES`].
fn take_group(queue: &mut VecDeque<Unit>) -> Vec<Unit> {
    let mut group = Vec::new();
    let (mut count, mut bytes) = (0usize, 0usize);
    while let Some(next) = queue.front() {
        let more_count = count.checked_add(next.deliveries.len());
        let more_bytes = bytes.checked_add(next.bytes);
        let fits = matches!(
            (more_count, more_bytes),
            (Some(c), Some(b)) if c <= GROUP_MAX_DELIVERIES && b <= GROUP_MAX_BYTES
        );
        if !group.is_empty() && !fits {
            break;
        }
        let Some(unit) = queue.pop_front() else { break };
        count = count.saturating_add(unit.deliveries.len());
        bytes = bytes.saturating_add(unit.bytes);
        group.push(unit);
    }
    group
}

/// Starts the next group when no group is being checked and written, fewer than
/// [`GROUPS_IN_FLIGHT`] wait for their sync, and something is queued (a whole batch's
/// worth, when groups are still waiting for their sync): a group is whatever queued
/// meanwhile (no timer).
fn start_group(
    agent: &Arc<Agent>,
    queue: &mut VecDeque<Unit>,
    queued: &mut usize,
    running: &mut JoinSet<GroupDone>,
    writing: &mut Option<oneshot::Receiver<()>>,
) {
    if writing.is_some() || running.len() >= GROUPS_IN_FLIGHT || queue.is_empty() {
        return;
    }
    // Beside groups waiting for their sync, only a full one starts: a partial group
    // waits for them, and what arrives meanwhile joins it (small groups each cost a
    // signature, a transaction and an answer).
    if !running.is_empty() && *queued < MAX_BATCH as usize {
        return;
    }
    let group = take_group(queue);
    let mut forms = Vec::with_capacity(group.len());
    let mut ids = Vec::new();
    let mut deliveries = Vec::new();
    for unit in group {
        forms.push((unit.form, unit.deliveries.len()));
        *queued = queued.saturating_sub(unit.deliveries.len());
        ids.extend(unit.ids);
        deliveries.extend(unit.deliveries);
    }
    let handling = Arc::clone(agent);
    let (written_tx, written_rx) = oneshot::channel();
    *writing = Some(written_rx);
    running.spawn(async move {
        let result = handle_group(handling, deliveries, written_tx).await;
        (forms, ids, result)
    });
}

async fn session_once(agent: &Arc<Agent>, stop: &CancellationToken) -> SessionEnd {
    let capacity = usize::try_from(agent.window)
        .unwrap_or(32)
        .saturating_add(8);
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::AgentMessage>(capacity);
    let partial = partial_deliveries(agent).await;
    let max_batch = agent.window.clamp(1, MAX_BATCH);
    let hello = pb::AgentMessage {
        msg: Some(Out::Hello(pb::Hello {
            window: agent.window,
            partial,
            max_batch,
        })),
    };
    if tx.send(hello).await.is_err() {
        return SessionEnd::Ended {
            reason: "the outgoing stream closed".into(),
            handled: 0,
        };
    }
    let mut client = agent.client();
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
    info!(agency = %agent.agency, window = agent.window, max_batch, "broker session established");
    let _up = agent.metrics.session_up();
    let mut handled: u64 = 0;
    let mut receiving: HashMap<String, Receiving> = HashMap::new();
    // Whole deliveries wait here while the previous group is checked and written; one
    // group at a time does that, so the next one is whatever arrived meanwhile. Groups
    // already written wait for their sync in `running` meanwhile (disks overlap CPU).
    let mut queue: VecDeque<Unit> = VecDeque::new();
    let mut writing: Option<oneshot::Receiver<()>> = None;
    let mut queued: usize = 0;
    // Unanswered deliveries never exceed the window the broker was given; a batch may
    // straddle it once.
    let queue_limit = usize::try_from(agent.window.saturating_add(max_batch)).unwrap_or(usize::MAX);
    let mut running: JoinSet<GroupDone> = JoinSet::new();
    let mut in_progress: HashSet<String> = HashSet::new();
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            Some(joined) = running.join_next(), if !running.is_empty() => {
                let (forms, ids, result) = match joined {
                    Ok(done) => done,
                    Err(e) => (Vec::new(), Vec::new(), Err(LocalError::Task(e.to_string()))),
                };
                for id in &ids {
                    in_progress.remove(id);
                }
                if let Some(end) = send_group(agent, &tx, forms, result, &mut handled).await {
                    return end;
                }
                start_group(agent, &mut queue, &mut queued, &mut running, &mut writing);
                continue;
            }
            // The group being written is in the store (or failed): the next may start.
            _ = async { if let Some(written) = writing.as_mut() { let _ = written.await; } }, if writing.is_some() => {
                writing = None;
                start_group(agent, &mut queue, &mut queued, &mut running, &mut writing);
                continue;
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
        let (form, deliveries) = match message {
            In::Delivery(delivery) if delivery.streamed => {
                let handling = start_streamed(agent, delivery, &mut receiving).await;
                if let Some(end) = reply_streamed(agent, &tx, handling, &mut handled).await {
                    return end;
                }
                continue;
            }
            In::Delivery(delivery) => (Form::Single, vec![delivery]),
            In::Chunk(chunk) => {
                let handling = on_chunk(agent, chunk, &mut receiving).await;
                if let Some(end) = reply_streamed(agent, &tx, handling, &mut handled).await {
                    return end;
                }
                continue;
            }
            In::Batch(batch) => {
                if batch.deliveries.len() > usize::try_from(max_batch).unwrap_or(usize::MAX) {
                    return SessionEnd::Ended {
                        reason: format!(
                            "the broker sent a batch of {} deliveries; this agent asked for at most {max_batch}",
                            batch.deliveries.len()
                        ),
                        handled,
                    };
                }
                let mut whole = Vec::with_capacity(batch.deliveries.len());
                for delivery in batch.deliveries {
                    if delivery.streamed {
                        // Its chunks follow on their own: taken like a streamed Delivery.
                        let handling = start_streamed(agent, delivery, &mut receiving).await;
                        if let Some(end) = reply_streamed(agent, &tx, handling, &mut handled).await
                        {
                            return end;
                        }
                    } else {
                        whole.push(delivery);
                    }
                }
                (Form::Batch, whole)
            }
        };
        let mut unit = Unit {
            form,
            deliveries: Vec::with_capacity(deliveries.len()),
            ids: Vec::new(),
            bytes: 0,
        };
        for delivery in deliveries {
            let id = delivery
                .envelope
                .as_ref()
                .map(untrusted_message_id)
                .unwrap_or_default();
            // Offered again while still being handled: the first answer serves both.
            if !id.is_empty() {
                if !in_progress.insert(id.clone()) {
                    continue;
                }
                unit.ids.push(id);
            }
            unit.bytes = unit.bytes.saturating_add(delivery.encoded_len());
            unit.deliveries.push(delivery);
        }
        if unit.deliveries.is_empty() {
            continue;
        }
        queued = queued.saturating_add(unit.deliveries.len());
        if queued > queue_limit {
            return SessionEnd::Ended {
                reason: format!(
                    "the broker pushed {queued} deliveries beyond the window of {}",
                    agent.window
                ),
                handled,
            };
        }
        queue.push_back(unit);
        start_group(agent, &mut queue, &mut queued, &mut running, &mut writing);
    }
}

/// Sends the answers of a group: `Ack`/`Refuse` for single deliveries, one `AckBatch`
/// per delivery batch. A local failure or a closed stream ends the session (the
/// broker redelivers whatever was not answered).
async fn send_group(
    agent: &Arc<Agent>,
    tx: &tokio::sync::mpsc::Sender<pb::AgentMessage>,
    forms: Vec<(Form, usize)>,
    result: Result<Vec<Outcome>, LocalError>,
    handled: &mut u64,
) -> Option<SessionEnd> {
    let outcomes = match result {
        Ok(outcomes) => outcomes,
        Err(e) => {
            error!(agency = %agent.agency, error = %e, "cannot take the deliveries; dropping the session so the broker redelivers");
            return Some(SessionEnd::Ended {
                reason: format!("local failure: {e}"),
                handled: *handled,
            });
        }
    };
    let mut outcomes = outcomes.into_iter();
    for (form, count) in forms {
        let mut messages = Vec::new();
        let mut batch = pb::AckBatch::default();
        for outcome in outcomes.by_ref().take(count) {
            if matches!(outcome, Outcome::Refuse { .. }) {
                agent.metrics.delivery_refused();
            }
            match (form, outcome) {
                (Form::Single, outcome) => messages.push(outcome.into_message()),
                (Form::Batch, Outcome::Ack { id, receipt }) => batch.acks.push(pb::Ack {
                    message_id: id,
                    delivery_receipt: Some(receipt),
                }),
                (Form::Batch, Outcome::Refuse { id, reason }) => {
                    batch.refusals.push(pb::Refuse {
                        message_id: id,
                        reason,
                    });
                }
            }
        }
        if matches!(form, Form::Batch) {
            messages.push(pb::AgentMessage {
                msg: Some(Out::Batch(batch)),
            });
        }
        for message in messages {
            if tx.send(message).await.is_err() {
                return Some(SessionEnd::Ended {
                    reason: "the outgoing stream closed".into(),
                    handled: *handled,
                });
            }
        }
        *handled = handled.saturating_add(u64::try_from(count).unwrap_or(u64::MAX));
    }
    None
}

/// Sends the answer to a streamed delivery, if it has one yet; a local failure or a
/// closed stream ends the session.
async fn reply_streamed(
    agent: &Arc<Agent>,
    tx: &tokio::sync::mpsc::Sender<pb::AgentMessage>,
    handling: Result<Option<pb::AgentMessage>, LocalError>,
    handled: &mut u64,
) -> Option<SessionEnd> {
    match handling {
        Ok(None) => None,
        Ok(Some(reply)) => reply_or_end(agent, tx, Ok(reply), handled).await,
        Err(e) => reply_or_end(agent, tx, Err(e), handled).await,
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

/// The answer to one delivery.
#[derive(Debug)]
enum Outcome {
    Ack { id: String, receipt: pb::Signed },
    Refuse { id: String, reason: String },
}

impl Outcome {
    fn into_message(self) -> pb::AgentMessage {
        match self {
            Outcome::Ack { id, receipt } => ack(id, receipt),
            Outcome::Refuse { id, reason } => refuse(id, reason),
        }
    }
}

/// A delivery that passed every check and waits to be stored with its group.
struct Accepting {
    evidence: Evidence,
    verified: VerifiedDocument,
    attempt: u32,
    body: Body,
}

/// Every check of one whole (not streamed) delivery; CPU only, no store access.
/// A refusal: the (claimed) message id and the reason.
type Refusal = (String, String);

fn check_one(agent: &Agent, delivery: pb::Delivery) -> Result<Accepting, Refusal> {
    let attempt = delivery.attempt;
    let Some(envelope) = delivery.envelope else {
        warn!(agency = %agent.agency, attempt, "refusing a delivery without an envelope");
        return Err((
            String::new(),
            "the delivery carries no signed envelope".into(),
        ));
    };
    let submission_receipt = delivery.submission_receipt;
    match check_delivery(
        agent,
        &envelope,
        submission_receipt.as_ref(),
        &delivery.attachments,
    ) {
        Ok(verified) => Ok(Accepting {
            evidence: Evidence {
                envelope,
                submission_receipt: submission_receipt.unwrap_or_default(),
            },
            verified,
            attempt,
            body: Body::Inline(delivery.attachments),
        }),
        Err(reason) => {
            let id = untrusted_message_id(&envelope);
            warn!(agency = %agent.agency, message_id = %id, reason = %reason, attempt, "refusing delivery");
            Err((id, reason))
        }
    }
}

/// A group of whole deliveries (one or more DeliveryBatch messages and single
/// Deliveries that queued together): checked each on its own, the accepted ones
/// stored in one transaction with one sync and one receipt signature. Outcomes are in
/// the order of `deliveries`; a refusal never affects the others.
///
/// `written` is answered (or dropped, on failure) once the group's writes are in the
/// store, before its sync: the next group may then be checked and written while this
/// one waits for the disk.
async fn handle_group(
    agent: Arc<Agent>,
    deliveries: Vec<pb::Delivery>,
    written: oneshot::Sender<()>,
) -> Result<Vec<Outcome>, LocalError> {
    let checking = Arc::clone(&agent);
    // Verification is the CPU cost of a delivery: off the async threads, in one go
    // (a batch signature's root is checked once, then only each inclusion proof).
    let checked: Vec<Result<Accepting, Refusal>> = tokio::task::spawn_blocking(move || {
        deliveries
            .into_iter()
            .map(|d| check_one(&checking, d))
            .collect()
    })
    .await
    .map_err(|e| LocalError::Task(e.to_string()))?;
    let mut accepting = Vec::new();
    let mut slots = Vec::with_capacity(checked.len());
    for result in checked {
        match result {
            Ok(item) => {
                accepting.push(item);
                slots.push(None);
            }
            Err((id, reason)) => slots.push(Some(Outcome::Refuse { id, reason })),
        }
    }
    let mut accepted = accept_all(&agent, accepting, Some(written))
        .await?
        .into_iter();
    let mut outcomes = Vec::with_capacity(slots.len());
    for slot in slots {
        match slot {
            Some(refusal) => outcomes.push(refusal),
            None => {
                let outcome = accepted.next().ok_or_else(|| {
                    LocalError::Task("an accepted delivery has no outcome".into())
                })?;
                outcomes.push(outcome);
            }
        }
    }
    Ok(outcomes)
}

/// What one verified delivery of a group needs before it can be answered.
enum Plan {
    Refuse(String),
    /// Stored before with its receipt: answered with that receipt.
    Stored(pb::Signed),
    /// Its delivery receipt is signed with the group's.
    Sign(pb::Receipt),
}

/// One verified delivery of a group on its way to its answer.
struct Planned {
    id: String,
    header: pb::DocumentHeader,
    plan: Plan,
    write: InboxWrite,
    /// Stored by this group (not a redelivery).
    new: bool,
    /// A document (not a status report) that belongs in the inbox folder.
    exportable: bool,
    body: Body,
    record: Option<InboxRecord>,
}

/// Decides what a verified delivery needs: refused (message id reused, unexpected
/// status report), answered from the store (redelivery), or stored and signed.
fn plan_one(agent: &Agent, item: Accepting) -> Result<Planned, LocalError> {
    let Accepting {
        evidence,
        verified,
        attempt,
        body,
    } = item;
    let id = verified.header.message_id.clone();
    let sha_hex = hex::encode(verified.header_sha256);
    let envelope_bytes = Bytes::from(evidence.envelope.encode_to_vec());
    let submission_bytes = Bytes::from(evidence.submission_receipt.encode_to_vec());
    let exportable = verified.header.kind == pb::DocumentKind::Document as i32;
    let receipt_at = |at_ms: i64| pb::Receipt {
        kind: pb::ReceiptKind::Delivery as i32,
        message_id: id.clone(),
        header_sha256: verified.header_sha256.to_vec(),
        at_ms,
        issuer: agent.agency.to_string(),
        business_id: verified.header.business_id.clone(),
        sender: verified.header.sender.clone(),
        recipient: agent.agency.to_string(),
        ..Default::default()
    };
    let mut planned = Planned {
        id: id.clone(),
        header: verified.header.clone(),
        plan: Plan::Refuse(String::new()),
        write: InboxWrite {
            message_id: id.clone(),
            ..InboxWrite::default()
        },
        new: false,
        exportable,
        body,
        record: None,
    };
    match agent.store.inbox_record(&id)? {
        Some(existing) if existing.header_sha256 != sha_hex => {
            let reason =
                "a different document with this message id was already received".to_owned();
            warn!(agency = %agent.agency, message_id = %id, reason = %reason, "refusing delivery");
            planned.plan = Plan::Refuse(reason);
        }
        Some(existing) => {
            debug!(agency = %agent.agency, message_id = %id, attempt, "redelivery of a stored document");
            agent.metrics.delivery_duplicate();
            // A record stored before this agent kept submission receipts gets the one
            // that came with this delivery, checked above.
            if agent.store.received_submission_receipt(&id)?.is_none() {
                planned.write.submission_receipt = Some(submission_bytes);
            }
            planned.plan = match agent.store.delivery_receipt(&id)? {
                Some(stored) => Plan::Stored(pb::Signed::decode(stored.as_ref()).map_err(|e| {
                    LocalError::Stored {
                        id: id.clone(),
                        detail: format!("delivery receipt: {e}"),
                    }
                })?),
                // Stored by an earlier version that stopped before signing.
                None => Plan::Sign(receipt_at(now_ms())),
            };
            planned.record = Some(existing);
        }
        None => {
            let is_status = verified.header.kind == pb::DocumentKind::Status as i32;
            if is_status
                && let Err(reason) = crate::business::check_received_report(agent, &verified.header)
            {
                warn!(agency = %agent.agency, message_id = %id, reason = %reason, "refusing a status report");
                planned.plan = Plan::Refuse(reason);
                return Ok(planned);
            }
            let received_at_ms = now_ms();
            let record = InboxRecord {
                message_id: id.clone(),
                received_at_ms,
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
                streamed: matches!(planned.body, Body::Files),
                kind: verified.header.kind,
                business_type: verified.header.business_type,
                refers_to: Some(verified.header.refers_to.clone()).filter(|r| !r.is_empty()),
                ..InboxRecord::default()
            };
            let attachments = match &planned.body {
                Body::Inline(attachments) => attachments.clone(),
                Body::Files => Vec::new(),
            };
            planned.write.document = Some(InboxDocument {
                record: record.clone(),
                envelope: envelope_bytes,
                attachments,
            });
            planned.write.submission_receipt = Some(submission_bytes);
            // The receipt states the time the record states: it is signed before the
            // write so that document and both receipts are one transaction, and it
            // leaves this agent only once that transaction is durable.
            planned.plan = Plan::Sign(receipt_at(received_at_ms));
            planned.record = Some(record);
            planned.new = true;
        }
    }
    Ok(planned)
}

/// Stores verified deliveries (once each) and answers each with its signed receipt:
/// one transaction for the group's documents and receipts, one durable sync, one
/// batch signature over the group's new delivery receipts.
async fn accept_all(
    agent: &Arc<Agent>,
    items: Vec<Accepting>,
    written: Option<oneshot::Sender<()>>,
) -> Result<Vec<Outcome>, LocalError> {
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let planning = Arc::clone(agent);
    let mut planned = tokio::task::spawn_blocking(move || {
        items
            .into_iter()
            .map(|item| plan_one(&planning, item))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| LocalError::Task(e.to_string()))??;

    let to_sign: Vec<pb::Receipt> = planned
        .iter()
        .filter_map(|p| match &p.plan {
            Plan::Sign(receipt) => Some(receipt.clone()),
            _ => None,
        })
        .collect();
    if !to_sign.is_empty() {
        let signing = Arc::clone(agent);
        // One signature over the group's Merkle root (a hardware key may take long).
        let signed =
            tokio::task::spawn_blocking(move || sign_receipts(&to_sign, &signing.signing_key()))
                .await
                .map_err(|e| LocalError::Task(e.to_string()))?
                .map_err(LocalError::Sign)?;
        let mut signed = signed.into_iter();
        for p in planned.iter_mut() {
            if matches!(p.plan, Plan::Sign(_)) {
                let receipt = signed.next().ok_or_else(|| {
                    LocalError::Task("the batch signature returned fewer receipts".into())
                })?;
                p.write.delivery_receipt = Some(Bytes::from(receipt.encode_to_vec()));
                p.plan = Plan::Stored(receipt);
            }
        }
    }

    let writes: Vec<InboxWrite> = planned
        .iter()
        .filter(|p| !matches!(p.plan, Plan::Refuse(_)))
        .filter(|p| {
            p.write.document.is_some()
                || p.write.submission_receipt.is_some()
                || p.write.delivery_receipt.is_some()
        })
        .map(|p| p.write.clone())
        .collect();
    if !writes.is_empty() {
        let storing = Arc::clone(agent);
        tokio::task::spawn_blocking(move || storing.store.put_inbox_batch(&writes))
            .await
            .map_err(|e| LocalError::Task(e.to_string()))??;
        if let Some(written) = written {
            let _ = written.send(());
        }
        // Acknowledge nothing before it is durable: one sync for the whole group (and
        // for any group written before it that still waits).
        agent.store.durable().await?;
    } else if let Some(written) = written {
        let _ = written.send(());
    }
    let new = planned.iter().filter(|p| p.new).count();
    if new > 0 {
        for _ in 0..new {
            agent.metrics.delivery_received();
        }
        let added = u64::try_from(new).unwrap_or(u64::MAX);
        agent
            .inbox_count
            .send_modify(|n| *n = n.saturating_add(added));
    }

    let mut outcomes = Vec::with_capacity(planned.len());
    let mut to_export = Vec::new();
    let mut refused = 0usize;
    for p in planned {
        let receipt = match p.plan {
            Plan::Refuse(reason) => {
                refused += 1;
                outcomes.push(Outcome::Refuse { id: p.id, reason });
                continue;
            }
            Plan::Stored(receipt) => receipt,
            Plan::Sign(_) => {
                return Err(LocalError::Task(format!(
                    "the delivery receipt of {} was not signed",
                    p.id
                )));
            }
        };
        if p.new {
            debug!(
                agency = %agent.agency,
                message_id = %p.id,
                sender = %p.header.sender,
                business_id = %p.header.business_id,
                "document received"
            );
        }
        if p.exportable && p.record.as_ref().is_some_and(|r| !r.exported) {
            to_export.push(p.id.clone());
        }
        // Links and recall/update effects; idempotent, so a redelivery repeats them safely.
        crate::business::on_received(agent, &p.header).await?;
        outcomes.push(Outcome::Ack { id: p.id, receipt });
    }
    // Durable now: the exporter writes the inbox folders after the answer, not before.
    if agent.inbox.is_some() && !to_export.is_empty() {
        agent.export_queue.push(to_export);
    }
    let acked = outcomes.len() - refused;
    info!(
        agency = %agent.agency,
        new,
        redelivered = acked - new,
        refused,
        "delivery group stored"
    );
    Ok(outcomes)
}

/// Stores one verified delivery (a streamed one, complete) like a group of one.
async fn accept(
    agent: &Arc<Agent>,
    evidence: Evidence,
    verified: VerifiedDocument,
    attempt: u32,
    body: Body,
) -> Result<pb::AgentMessage, LocalError> {
    let item = Accepting {
        evidence,
        verified,
        attempt,
        body,
    };
    accept_all(agent, vec![item], None)
        .await?
        .pop()
        .map(Outcome::into_message)
        .ok_or_else(|| LocalError::Task("a stored delivery has no outcome".into()))
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
    /// Files `incoming/<id>/<index>`, complete, checked and synced (a streamed
    /// delivery); they stay there until the export links them into its folder.
    Files,
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
        return accept(agent, evidence, verified, delivery.attempt, Body::Files)
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
    accept(
        agent,
        state.evidence,
        state.verified,
        state.attempt,
        Body::Files,
    )
    .await
}
