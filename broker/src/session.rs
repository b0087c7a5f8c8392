//! One agent session: push the recipient's queue over the stream the agent dialled,
//! with a bounded window of unacknowledged deliveries.
//!
//! Invariants:
//! - At most `window` deliveries are unacknowledged at once; memory per session is
//!   bounded by the window, not by the queue.
//! - A delivery leaves the queue only when the recipient's signed delivery receipt has
//!   been verified (or the recipient refused it, or it expired: then it is a dead
//!   letter). Anything unacknowledged is offered again after `ack_timeout`, doubling
//!   with each attempt up to `max_ack_timeout`, and from the start of the queue on the
//!   next session. Every attempt is recorded with its time and outcome.
//! - Each fill continues the queue scan from where the previous one stopped (the
//!   session's cursor, from the head when the session starts), skipping what is in
//!   flight. That is safe because the store takes sequences under the lock every
//!   queue-adding transaction holds until it commits, so entries commit in sequence
//!   order and none can appear before the cursor; what the session passed is in flight
//!   (redelivered by its deadline) or settled. As a guard against any entry still
//!   passed (a scan racing two commits across a page boundary), a fill that reaches the
//!   end while the pending counters hold more than is in flight scans once from the
//!   head, which costs at most `window` skipped entries, as every fill did before.
//! - Memory: what waits for the transport is bounded in bytes, per session
//!   (`session_buffer_bytes`) and for all sessions together (`sessions_buffer_bytes`),
//!   besides the window's count: each message holds its encoded size of both budgets
//!   from the moment it is queued until tonic takes it ([`OutgoingStream`]). A session
//!   that cannot queue anything for `session_stall_timeout` (the agent stopped reading)
//!   ends, and an ending session drops what it had queued, so a stalled agent cannot pin
//!   memory. One live session per agency (see `hub`): a second is refused with
//!   FAILED_PRECONDITION naming the live one.
//! - A delivery is logged and counted as delivered only once its settlement (dequeue
//!   with the receipt) is durable: acknowledgements that arrive together (an AckBatch,
//!   or several Acks already received) are settled in one store transaction and share
//!   one group commit, which a separate task waits for while the session goes on
//!   pushing (the settling transaction itself runs before the next fill, so a fill
//!   never offers what was just acknowledged). A status read in between may already
//!   show the delivery: that is true whatever happens next, since the recipient
//!   acknowledged only once its own copy and receipt were durable; after a crash the
//!   delivery is offered again and answered from the recipient's store.
//! - Batches (issue 11): to an agent whose Hello set `max_batch`, small deliveries go
//!   out as DeliveryBatch messages of at most `max_batch`, gathered within one fill of
//!   the window (never more than its free room) and of at most
//!   `MAX_BATCH_BYTES` (the protocol's batch size); no timer forms a batch. Each delivery in a batch is in flight on its own:
//!   its attempt recorded, its own acknowledgement deadline and redelivery. Streamed
//!   deliveries always go alone, after what was gathered before them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use lienthong_proto::AgencyCode;
use lienthong_proto::pb::{self, DeliveryState, ReceiptKind, Signed, agent_message::Msg};
use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
use prometheus_client::metrics::gauge::Gauge;
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::Shared;
use crate::deadletter;
use crate::error::BrokerError;
use crate::hub::SessionHandle;
use crate::store::{Settle, Settlement};

struct InFlight {
    /// When to offer it again if no acknowledgement came.
    deadline: Instant,
    attempt: u32,
    /// The task sending a streamed delivery's chunks, while it runs.
    sender: Option<tokio::task::AbortHandle>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            sender.abort();
        }
    }
}

/// Bytes per chunk of a streamed delivery. With the session channel's capacity this
/// bounds the memory a session holds for streamed deliveries.
const DELIVERY_CHUNK_BYTES: usize = 128 * 1024;

/// A streamed delivery's acknowledgement wait starts only when its last chunk is sent
/// (a large document over a slow link takes as long as it takes); until then this
/// far deadline stands, and a broken session ends the attempt anyway.
const STREAMED_NO_PROGRESS: Duration = Duration::from_secs(24 * 3600);

/// The wait for an acknowledgement of attempt `attempt` (1-based): `base` doubled for
/// each earlier attempt, at most `max`.
fn ack_wait(base: Duration, max: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    base.saturating_mul(1u32 << doublings).min(max.max(base))
}

/// Most acknowledgements settled under one group commit.
const SETTLE_BATCH: usize = 1024;

/// Starts the session task and returns the stream of messages to the agent, or refuses
/// the session with FAILED_PRECONDITION when the agency already has a live one.
pub fn start(
    shared: Arc<Shared>,
    agency: AgencyCode,
    peer: Option<SocketAddr>,
    inbound: Streaming<pb::AgentMessage>,
) -> Result<OutgoingStream, Status> {
    let handle = match shared
        .hub
        .try_register(agency.as_str(), peer, &shared.shutdown)
    {
        Ok(handle) => handle,
        Err(conflict) => {
            shared.metrics.connections.session_conflict();
            let message = conflict_message(&agency, peer, conflict);
            tracing::warn!(agency = %agency, peer = peer.map(tracing::field::display), live_peer = conflict.peer.map(tracing::field::display), "{message}");
            return Err(Status::failed_precondition(message));
        }
    };
    // Suspended between the admission check and the hub registration: end here.
    let suspended = shared
        .store
        .agency(agency.as_str())
        .map_err(BrokerError::from)
        .and_then(|record| match record {
            Some(record) => crate::exchange::suspended_check(agency.as_str(), &record),
            None => Ok(()),
        });
    if let Err(refused) = suspended {
        shared.hub.deregister(agency.as_str(), handle.id);
        return Err(refused.into());
    }
    let window = shared.config.window.max(1) as usize;
    let (outbox, stream) = Outbox::new(&shared, window, handle.cancel.clone());
    let (streamed_tx, streamed_rx) = mpsc::unbounded_channel();
    let registration = Registration {
        shared: shared.clone(),
        agency: agency.clone(),
        id: handle.id,
    };
    tokio::spawn(async move {
        let session_id = handle.id;
        tracing::info!(agency = %agency, session = session_id, peer = peer.map(tracing::field::display), "agent session opened");
        let mut session = Session {
            shared: shared.clone(),
            agency: agency.clone(),
            handle,
            tx: outbox.clone(),
            window,
            max_batch: 0,
            cursor: None,
            in_flight: HashMap::new(),
            partial: HashMap::new(),
            streamed_tx,
            streamed_rx,
        };
        if let Err(error) = session.run(inbound).await {
            tracing::warn!(agency = %agency, %error, "agent session ended with an error");
        }
        session.abandon_in_flight();
        drop(registration);
        // Frees what the agent never took, and ends the stream for tonic.
        outbox.close();
        tracing::info!(agency = %agency, session = session_id, "agent session closed");
    });
    Ok(stream)
}

/// The hub's entry for a session, removed when the session task ends however it ends
/// (a panic included): a stale entry would refuse the agency's every later session.
struct Registration {
    shared: Arc<Shared>,
    agency: AgencyCode,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.hub.deregister(self.agency.as_str(), self.id);
    }
}

/// The refusal of a second session, naming the live one.
fn conflict_message(
    agency: &AgencyCode,
    peer: Option<SocketAddr>,
    live: crate::hub::Conflict,
) -> String {
    let from = live
        .peer
        .map_or_else(|| "an unknown address".to_owned(), |p| p.to_string());
    let since =
        lienthong_proto::rfc3339_ms(live.since_ms).unwrap_or_else(|| live.since_ms.to_string());
    let this = peer.map_or_else(String::new, |p| format!(" (this one came from {p})"));
    format!(
        "agency {agency} already has a live session from {from} since {since}; is a second \
         agent running with the same certificate?{this} Stop it; this agent will retry"
    )
}

/// One queued message and the budget bytes it holds until the transport takes it.
struct Outgoing {
    message: Result<pb::BrokerMessage, Status>,
    _held: Held,
}

/// Budget bytes held by one queued message; returned when it drops.
struct Held {
    _session: OwnedSemaphorePermit,
    _global: OwnedSemaphorePermit,
    bytes: i64,
    gauge: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

/// The session's outgoing side (cloned into chunk senders): a bounded channel whose
/// messages also hold bytes of the session's and the broker's budgets.
#[derive(Clone)]
struct Outbox {
    /// Boxed messages: the channel allocates its slots in blocks of 32 when it is
    /// made, and an idle session should not hold 32 unboxed messages' worth (~11 KiB).
    tx: mpsc::Sender<Box<Outgoing>>,
    rx: Arc<Mutex<mpsc::Receiver<Box<Outgoing>>>>,
    session_budget: Arc<Semaphore>,
    session_max: u32,
    global_budget: Arc<Semaphore>,
    global_max: u32,
    gauge: Gauge,
    cancel: CancellationToken,
    stall: Duration,
}

/// The outbox could not take a message: the session is ending or the agent stopped
/// reading for `session_stall_timeout`.
#[derive(Debug)]
struct OutboxClosed(&'static str);

impl Outbox {
    fn new(shared: &Shared, window: usize, cancel: CancellationToken) -> (Self, OutgoingStream) {
        let (tx, rx) = mpsc::channel(window.saturating_add(1));
        let rx = Arc::new(Mutex::new(rx));
        let config = &shared.config;
        let session_max = u32::try_from(config.session_buffer_bytes)
            .unwrap_or(u32::MAX)
            .max(1);
        let outbox = Self {
            tx,
            rx: rx.clone(),
            session_budget: Arc::new(Semaphore::new(session_max as usize)),
            session_max,
            global_budget: shared.session_bytes.clone(),
            global_max: shared.session_bytes_max,
            gauge: shared.metrics.connections.session_buffered_bytes().clone(),
            cancel,
            stall: config.session_stall_timeout,
        };
        (outbox, OutgoingStream { rx })
    }

    /// Queues `message` once both budgets have room for its encoded size (a message
    /// larger than a whole budget takes all of it, alone).
    ///
    /// The wait is boxed, so it is sized for one message only while one is queued:
    /// inline, it (and the message) would be part of the session task's size for the
    /// session's whole life, idle or not (issue 11's S5: memory per idle connection).
    fn send(
        &self,
        message: Result<pb::BrokerMessage, Status>,
    ) -> Pin<Box<dyn Future<Output = Result<(), OutboxClosed>> + Send + '_>> {
        Box::pin(async move {
            let bytes = message.as_ref().map_or(0, Message::encoded_len);
            let want = u32::try_from(bytes).unwrap_or(u32::MAX);
            let queue = async {
                let session = self
                    .session_budget
                    .clone()
                    .acquire_many_owned(want.min(self.session_max))
                    .await
                    .map_err(|_| OutboxClosed("session ended"))?;
                let global = self
                    .global_budget
                    .clone()
                    .acquire_many_owned(want.min(self.global_max))
                    .await
                    .map_err(|_| OutboxClosed("session ended"))?;
                let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
                self.gauge.inc_by(bytes);
                let held = Held {
                    _session: session,
                    _global: global,
                    bytes,
                    gauge: self.gauge.clone(),
                };
                self.tx
                    .send(Box::new(Outgoing {
                        message,
                        _held: held,
                    }))
                    .await
                    .map_err(|_| OutboxClosed("session ended"))
            };
            tokio::select! {
                () = self.cancel.cancelled() => Err(OutboxClosed("session ended")),
                () = self.tx.closed() => Err(OutboxClosed("the agent's stream ended")),
                queued = tokio::time::timeout(self.stall, queue) => match queued {
                    Ok(result) => result,
                    Err(_) => Err(OutboxClosed(
                        "the agent took nothing from its session for session_stall_timeout",
                    )),
                },
            }
        })
    }

    /// Ends the stream: drops every message not yet taken (returning its bytes) so a
    /// session whose agent never read cannot keep them, and stops further sends.
    fn close(&self) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        rx.close();
        while rx.try_recv().is_ok() {}
    }
}

/// The messages to the agent, for tonic; a message's budget bytes return as it is
/// taken. Ends after the session closes its outbox.
pub struct OutgoingStream {
    rx: Arc<Mutex<mpsc::Receiver<Box<Outgoing>>>>,
}

/// The transport let go of the stream (the agent reset it, or its connection died):
/// what was queued is dropped and the session's next send fails, so the session ends
/// now instead of waiting for room that will never come.
impl Drop for OutgoingStream {
    fn drop(&mut self) {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        rx.close();
        while rx.try_recv().is_ok() {}
    }
}

impl futures_util::Stream for OutgoingStream {
    type Item = Result<pb::BrokerMessage, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut rx = self.rx.lock().unwrap_or_else(PoisonError::into_inner);
        rx.poll_recv(cx)
            .map(|next| next.map(|outgoing| outgoing.message))
    }
}

struct Session {
    shared: Arc<Shared>,
    agency: AgencyCode,
    handle: SessionHandle,
    tx: Outbox,
    window: usize,
    /// Most deliveries per DeliveryBatch, from the agent's Hello; 0: one Delivery per
    /// message (agents before batches).
    max_batch: usize,
    /// The last queue key this session's scan reached (see the module header).
    cursor: Option<Vec<u8>>,
    in_flight: HashMap<String, InFlight>,
    /// Streamed deliveries the agent holds in part (from its Hello): bytes per attachment.
    partial: HashMap<String, Vec<u64>>,
    /// Chunk senders report here when a streamed delivery's last chunk is sent.
    streamed_tx: mpsc::UnboundedSender<(String, u32)>,
    streamed_rx: mpsc::UnboundedReceiver<(String, u32)>,
}

enum Step {
    Continue,
    Stop,
}

impl Session {
    async fn run(&mut self, mut inbound: Streaming<pb::AgentMessage>) -> Result<(), BrokerError> {
        match inbound.message().await {
            Ok(Some(pb::AgentMessage {
                msg: Some(Msg::Hello(hello)),
            })) => {
                if hello.window > 0 {
                    self.window = self.window.min(hello.window as usize);
                }
                // Never more than the window holds, whatever the agent asks for.
                self.max_batch = (hello.max_batch as usize).min(self.window);
                self.partial = hello
                    .partial
                    .into_iter()
                    .take(1024)
                    .map(|p| (p.message_id, p.stored_bytes))
                    .collect();
            }
            Ok(_) => {
                return Err(BrokerError::InvalidArgument(
                    "a session must start with Hello".into(),
                ));
            }
            Err(status) => return Err(BrokerError::Unavailable(status.message().to_owned())),
        }
        loop {
            // Boxed (here and below): only while they run, not in every idle session.
            Box::pin(self.fill_window()).await?;
            self.handle
                .in_flight
                .store(self.in_flight.len() as u64, Ordering::Relaxed);
            let next_deadline = self.in_flight.values().map(|f| f.deadline).min();
            let step = tokio::select! {
                _ = self.handle.cancel.cancelled() => Step::Stop,
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        self.handle.last_seen_ms.store(lienthong_proto::now_ms(), Ordering::Relaxed);
                        let mut acks = Vec::new();
                        self.on_message(message, &mut acks)?;
                        // Whatever else has already arrived joins this store batch and
                        // group commit.
                        while acks.len() < SETTLE_BATCH {
                            match inbound.message().now_or_never() {
                                Some(Ok(Some(message))) => self.on_message(message, &mut acks)?,
                                // The end or an error shows again on the next read.
                                _ => break,
                            }
                        }
                        self.settle_acks(acks).await?;
                        Step::Continue
                    }
                    Ok(None) => Step::Stop,
                    Err(status) => {
                        tracing::debug!(agency = %self.agency, %status, "session stream failed");
                        Step::Stop
                    }
                },
                _ = self.handle.notify.notified() => Step::Continue,
                Some((message_id, attempt)) = self.streamed_rx.recv() => {
                    self.streamed_sent(&message_id, attempt);
                    Step::Continue
                }
                _ = sleep_until_or_forever(next_deadline) => {
                    Box::pin(self.redeliver_overdue()).await?;
                    Step::Continue
                }
            };
            if let Step::Stop = step {
                return Ok(());
            }
        }
    }

    /// Pushes queued documents until the window is full or the queue is exhausted; to
    /// an agent that asked for batches, small deliveries go out as DeliveryBatch
    /// messages of at most `max_batch` (and the window's free room).
    async fn fill_window(&mut self) -> Result<(), BrokerError> {
        let mut batch = Batch::default();
        let mut from_head = self.cursor.is_none();
        while self.in_flight.len() < self.window {
            let next = self
                .shared
                .store
                .next_queued(self.agency.as_str(), self.cursor.as_deref())?;
            let Some((key, entry)) = next else {
                let queued = self.shared.store.pending(self.agency.as_str()).documents;
                if from_head || queued <= self.in_flight.len() as u64 {
                    break;
                }
                // More queued than in flight, yet nothing after the cursor: look once
                // from the head (see the module header).
                from_head = true;
                self.cursor = None;
                continue;
            };
            self.cursor = Some(key);
            if self.in_flight.contains_key(&entry.message_id) {
                continue;
            }
            if let Some(flight) = self.push(&entry.message_id, &mut batch).await? {
                self.in_flight.insert(entry.message_id, flight);
            }
        }
        self.flush(&mut batch).await
    }

    /// A streamed delivery's last chunk went out: the acknowledgement wait starts now.
    fn streamed_sent(&mut self, message_id: &str, attempt: u32) {
        let wait = self.ack_wait(attempt);
        if let Some(flight) = self.in_flight.get_mut(message_id)
            && flight.attempt == attempt
        {
            flight.deadline = Instant::now() + wait;
            flight.sender = None;
        }
    }

    fn ack_wait(&self, attempt: u32) -> Duration {
        let config = &self.shared.config;
        ack_wait(config.ack_timeout, config.max_ack_timeout, attempt)
    }

    /// Records the fate of every delivery still unacknowledged when the session ends.
    fn abandon_in_flight(&mut self) {
        for message_id in self.in_flight.keys() {
            if let Err(error) =
                self.shared
                    .store
                    .resolve_attempt(message_id, self.agency.as_str(), "session ended")
            {
                tracing::warn!(agency = %self.agency, %error, "cannot record an attempt");
            }
        }
        self.in_flight.clear();
    }

    /// Sends one delivery if it is still queued. Returns what is now in flight, or None
    /// when it is not deliverable (settled meanwhile, or missing).
    /// To an agent that takes batches, a small delivery joins `batch` (sent when full,
    /// or by the caller's [`Self::flush`]); a streamed one goes alone, after the batch.
    async fn push(
        &mut self,
        message_id: &str,
        batch: &mut Batch,
    ) -> Result<Option<InFlight>, BrokerError> {
        let queued = self
            .shared
            .store
            .delivery(message_id, self.agency.as_str())?
            .is_some_and(|d| d.state == DeliveryState::Queued as i32);
        if !queued {
            return Ok(None);
        }
        let Some(record) = self.shared.store.document(message_id)? else {
            tracing::error!(agency = %self.agency, message_id, "queued document is missing from the store");
            return Ok(None);
        };
        let envelope = Signed::decode(record.envelope.as_slice())
            .map_err(|e| BrokerError::Store(crate::store::StoreError::Corrupt(e.to_string())))?;
        let attachments = if record.streamed {
            Vec::new()
        } else {
            self.shared
                .store
                .attachments(message_id, record.attachment_count)?
        };
        let attempt = self.shared.store.record_attempt(
            message_id,
            self.agency.as_str(),
            lienthong_proto::now_ms(),
        )?;
        let start_offsets = if record.streamed {
            self.partial.remove(message_id).unwrap_or_default()
        } else {
            Vec::new()
        };
        let delivery = pb::Delivery {
            envelope: Some(envelope),
            attachments,
            attempt,
            streamed: record.streamed,
            start_offsets: start_offsets.clone(),
            // Stored with the document when it was accepted; the recipient exports
            // it as the trusted time of the document.
            submission_receipt: Signed::decode(record.submission_receipt.as_slice()).ok(),
        };
        tracing::debug!(agency = %self.agency, message_id, attempt, streamed = record.streamed, "delivery pushed");
        if self.max_batch > 0 && !record.streamed {
            let size = delivery.encoded_len();
            let full = batch.deliveries.len() >= self.max_batch
                || u64::try_from(batch.bytes.saturating_add(size)).unwrap_or(u64::MAX)
                    > lienthong_proto::document::MAX_BATCH_BYTES;
            if full {
                self.flush(batch).await?;
            }
            batch.bytes = batch.bytes.saturating_add(size);
            batch.deliveries.push(delivery);
        } else {
            // Order kept: what was gathered before goes first.
            self.flush(batch).await?;
            self.send(pb::broker_message::Msg::Delivery(delivery))
                .await?;
        }
        self.shared.metrics.delivery_pushed(attempt);
        let mut flight = InFlight {
            deadline: Instant::now() + self.ack_wait(attempt),
            attempt,
            sender: None,
        };
        if record.streamed {
            flight.deadline = Instant::now() + STREAMED_NO_PROGRESS;
            let task = tokio::spawn(send_chunks(
                self.shared.store.blob_dir(message_id),
                message_id.to_owned(),
                record.attachment_count,
                start_offsets,
                attempt,
                self.tx.clone(),
                self.streamed_tx.clone(),
            ));
            flight.sender = Some(task.abort_handle());
        }
        Ok(Some(flight))
    }

    async fn redeliver_overdue(&mut self) -> Result<(), BrokerError> {
        let now = Instant::now();
        let overdue: Vec<(String, u32)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, f)| (id.clone(), f.attempt))
            .collect();
        if !overdue.is_empty() {
            tracing::info!(agency = %self.agency, deliveries = overdue.len(), "no acknowledgement in time; offering again");
        }
        let mut batch = Batch::default();
        for (message_id, attempt) in overdue {
            tracing::debug!(agency = %self.agency, message_id = %message_id, attempt, "no acknowledgement in time; offering again");
            self.shared.store.resolve_attempt(
                &message_id,
                self.agency.as_str(),
                "no acknowledgement",
            )?;
            // Stops the chunks of the earlier attempt, if any still flow.
            self.in_flight.remove(&message_id);
            if let Some(flight) = self.push(&message_id, &mut batch).await? {
                self.in_flight.insert(message_id, flight);
            }
        }
        self.flush(&mut batch).await
    }

    /// Sends what `batch` gathered as one DeliveryBatch, if anything.
    async fn flush(&self, batch: &mut Batch) -> Result<(), BrokerError> {
        if batch.deliveries.is_empty() {
            return Ok(());
        }
        let deliveries = std::mem::take(&mut batch.deliveries);
        batch.bytes = 0;
        self.send(pb::broker_message::Msg::Batch(pb::DeliveryBatch {
            deliveries,
        }))
        .await
    }

    async fn send(&self, message: pb::broker_message::Msg) -> Result<(), BrokerError> {
        self.tx
            .send(Ok(pb::BrokerMessage { msg: Some(message) }))
            .await
            .map_err(|closed| BrokerError::Unavailable(closed.0.into()))
    }

    /// Settles the verified acknowledgements that arrived together in one store
    /// transaction; a task then waits until that is durable and logs and counts them (a
    /// delivery reported as delivered must not come back into the queue after a crash),
    /// while this session fills the window again.
    async fn settle_acks(&mut self, acks: Vec<VerifiedAck>) -> Result<(), BrokerError> {
        if acks.is_empty() {
            return Ok(());
        }
        let items: Vec<Settle> = acks
            .iter()
            .map(|ack| Settle {
                message_id: ack.message_id.clone(),
                recipient: self.agency.to_string(),
                settlement: Settlement::Delivered {
                    receipt: ack.receipt.clone(),
                },
            })
            .collect();
        let store = self.shared.store.clone();
        let settled = tokio::task::spawn_blocking(move || {
            store.settle_batch(&items, lienthong_proto::now_ms())
        })
        .await
        .map_err(|e| BrokerError::Serve(e.to_string()))??;
        for ack in &acks {
            self.in_flight.remove(&ack.message_id);
        }
        if !settled.contains(&true) {
            return Ok(());
        }
        // The settlement is written; the session goes on pushing while the group commit
        // makes it durable, and only then are the deliveries counted and logged. A crash
        // before that puts them back in the queue (redelivered, answered from the
        // recipient's store); a failed commit poisons the store and ends the session.
        let shared = self.shared.clone();
        let agency = self.agency.clone();
        let cancel = self.handle.cancel.clone();
        tokio::spawn(async move {
            if let Err(error) = shared.store.durable().await {
                tracing::error!(agency = %agency, %error, "settled deliveries could not be made durable; ending the session");
                cancel.cancel();
                return;
            }
            let mut count = 0usize;
            for (ack, newly) in acks.iter().zip(settled) {
                if newly {
                    count = count.saturating_add(1);
                    shared.metrics.acknowledged(ack.accepted_at_ms);
                    tracing::debug!(agency = %agency, message_id = %ack.message_id, "delivered with receipt");
                }
            }
            tracing::info!(agency = %agency, delivered = count, acknowledgements = acks.len(), "deliveries settled with receipts");
        });
        Ok(())
    }

    /// Handles one message from the agent; an acknowledgement whose receipt verifies
    /// is added to `acks`, to be settled with the others that arrived together.
    fn on_message(
        &mut self,
        message: pb::AgentMessage,
        acks: &mut Vec<VerifiedAck>,
    ) -> Result<(), BrokerError> {
        match message.msg {
            Some(Msg::Ack(ack)) => self.on_ack(ack, acks),
            Some(Msg::Refuse(refuse)) => {
                let reason = format!(
                    "refused by {}: {}",
                    self.agency,
                    lienthong_proto::agency::printable(&refuse.reason)
                );
                deadletter::make_dead(
                    &self.shared,
                    &refuse.message_id,
                    self.agency.as_str(),
                    DeliveryState::Refused,
                    &reason,
                )?;
                self.in_flight.remove(&refuse.message_id);
                Ok(())
            }
            Some(Msg::Batch(batch)) => {
                // Bounded by the decode limit of one message; each item is what its
                // own Ack or Refuse would be.
                for ack in batch.acks {
                    self.on_ack(ack, acks)?;
                }
                for refuse in batch.refusals {
                    self.on_message(
                        pb::AgentMessage {
                            msg: Some(Msg::Refuse(refuse)),
                        },
                        acks,
                    )?;
                }
                Ok(())
            }
            Some(Msg::Hello(_)) | None => Ok(()),
        }
    }

    fn on_ack(&mut self, ack: pb::Ack, acks: &mut Vec<VerifiedAck>) -> Result<(), BrokerError> {
        let Some(record) = self.shared.store.document(&ack.message_id)? else {
            tracing::warn!(agency = %self.agency, "acknowledgement for an unknown message id");
            return Ok(());
        };
        let Some(receipt) = ack.delivery_receipt else {
            tracing::warn!(agency = %self.agency, message_id = %ack.message_id, "acknowledgement without a receipt; will offer again");
            return Ok(());
        };
        let expected = ExpectedReceipt {
            kind: ReceiptKind::Delivery,
            message_id: &ack.message_id,
            header_sha256: &record.header_sha256,
            recipient: Some(self.agency.as_str()),
            live: true,
        };
        // A batch-signed receipt's root is checked once; its neighbours cost their path.
        if let Err(error) = verify_receipt(&receipt, &self.shared.document_anchors, &expected) {
            tracing::warn!(agency = %self.agency, message_id = %ack.message_id, %error, "delivery receipt rejected; will offer again");
            return Ok(());
        }
        acks.push(VerifiedAck {
            message_id: ack.message_id,
            receipt: receipt.encode_to_vec(),
            accepted_at_ms: record.accepted_at_ms,
        });
        Ok(())
    }
}

/// An acknowledgement whose delivery receipt verified, waiting to be settled.
struct VerifiedAck {
    message_id: String,
    /// The receipt (`Signed`, encoded) as stored with the delivery.
    receipt: Vec<u8>,
    accepted_at_ms: i64,
}

/// Small deliveries gathered for one DeliveryBatch.
#[derive(Default)]
struct Batch {
    deliveries: Vec<pb::Delivery>,
    /// Their encoded size, kept well under one gRPC message.
    bytes: usize,
}

/// Sends a streamed delivery's attachments from their files as `DeliveryChunk`s, each
/// from its start offset, then reports the delivery as sent. Reads one chunk at a time;
/// the bounded session channel makes it wait for the network.
async fn send_chunks(
    dir: std::path::PathBuf,
    message_id: String,
    count: u32,
    start_offsets: Vec<u64>,
    attempt: u32,
    tx: Outbox,
    done: mpsc::UnboundedSender<(String, u32)>,
) {
    for index in 0..count {
        let offset = start_offsets.get(index as usize).copied().unwrap_or(0);
        let path = dir.join(index.to_string());
        let (chunks_tx, mut chunks_rx) = mpsc::channel::<(u64, Vec<u8>)>(2);
        let reader = tokio::task::spawn_blocking(move || {
            lienthong_proto::spool::read_pieces(&path, offset, DELIVERY_CHUNK_BYTES, |at, bytes| {
                chunks_tx.blocking_send((at, bytes)).is_ok()
            })
        });
        while let Some((at, bytes)) = chunks_rx.recv().await {
            let chunk = pb::BrokerMessage {
                msg: Some(pb::broker_message::Msg::Chunk(pb::DeliveryChunk {
                    message_id: message_id.clone(),
                    attachment_index: index,
                    offset: at,
                    data: bytes.into(),
                })),
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
        match reader.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(message_id, %error, "cannot read a streamed document's attachment");
                return;
            }
            Err(_) => return,
        }
    }
    let _ = done.send((message_id, attempt));
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
