//! One agent session: push the recipient's queue over the stream the agent dialled,
//! with a bounded window of unacknowledged deliveries.
//!
//! Invariants:
//! - At most `window` deliveries are unacknowledged at once; memory per session is
//!   bounded by the window, not by the queue.
//! - A delivery leaves the queue only when the recipient's signed delivery receipt has
//!   been verified (or the recipient refused it). Anything unacknowledged is offered
//!   again after `ack_timeout`, and from the start of the queue on the next session.
//! - Queue sequences only grow, so a cursor over the queue key sees every new entry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lienthong_proto::AgencyCode;
use lienthong_proto::pb::{self, DeliveryState, ReceiptKind, Signed, agent_message::Msg};
use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::Shared;
use crate::error::BrokerError;
use crate::hub::SessionHandle;

struct InFlight {
    sent_at: Instant,
}

/// Starts the session task and returns the stream of messages to the agent.
pub fn start(
    shared: Arc<Shared>,
    agency: AgencyCode,
    inbound: Streaming<pb::AgentMessage>,
) -> ReceiverStream<Result<pb::BrokerMessage, Status>> {
    let window = shared.config.window.max(1) as usize;
    let (tx, rx) = mpsc::channel(window + 1);
    let handle = shared.hub.register(agency.as_str(), &shared.shutdown);
    tokio::spawn(async move {
        let session_id = handle.id;
        tracing::info!(agency = %agency, session = session_id, "agent session opened");
        let mut session = Session {
            shared: shared.clone(),
            agency: agency.clone(),
            handle,
            tx,
            window,
            in_flight: HashMap::new(),
            cursor: None,
        };
        if let Err(error) = session.run(inbound).await {
            tracing::warn!(agency = %agency, %error, "agent session ended with an error");
        }
        shared.hub.deregister(agency.as_str(), session_id);
        tracing::info!(agency = %agency, session = session_id, "agent session closed");
    });
    ReceiverStream::new(rx)
}

struct Session {
    shared: Arc<Shared>,
    agency: AgencyCode,
    handle: SessionHandle,
    tx: mpsc::Sender<Result<pb::BrokerMessage, Status>>,
    window: usize,
    in_flight: HashMap<String, InFlight>,
    /// The last queue key pushed in this session.
    cursor: Option<Vec<u8>>,
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
            }
            Ok(_) => {
                return Err(BrokerError::InvalidArgument(
                    "a session must start with Hello".into(),
                ));
            }
            Err(status) => return Err(BrokerError::Unavailable(status.message().to_owned())),
        }
        let ack_timeout = self.shared.config.ack_timeout;
        loop {
            self.fill_window().await?;
            self.handle
                .in_flight
                .store(self.in_flight.len() as u64, Ordering::Relaxed);
            let next_deadline = self
                .in_flight
                .values()
                .map(|f| f.sent_at + ack_timeout)
                .min();
            let step = tokio::select! {
                _ = self.handle.cancel.cancelled() => Step::Stop,
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        self.handle.last_seen_ms.store(lienthong_proto::now_ms(), Ordering::Relaxed);
                        self.on_message(message)?;
                        Step::Continue
                    }
                    Ok(None) => Step::Stop,
                    Err(status) => {
                        tracing::debug!(agency = %self.agency, %status, "session stream failed");
                        Step::Stop
                    }
                },
                _ = self.handle.notify.notified() => Step::Continue,
                _ = sleep_until_or_forever(next_deadline) => {
                    self.redeliver_overdue(ack_timeout).await?;
                    Step::Continue
                }
            };
            if let Step::Stop = step {
                return Ok(());
            }
        }
    }

    /// Pushes queued documents until the window is full or the queue is exhausted.
    async fn fill_window(&mut self) -> Result<(), BrokerError> {
        while self.in_flight.len() < self.window {
            let next = self
                .shared
                .store
                .next_queued(self.agency.as_str(), self.cursor.as_deref())?;
            let Some((key, entry)) = next else {
                return Ok(());
            };
            self.cursor = Some(key);
            if self.in_flight.contains_key(&entry.message_id) {
                continue;
            }
            if self.push(&entry.message_id).await? {
                self.in_flight.insert(
                    entry.message_id,
                    InFlight {
                        sent_at: Instant::now(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Sends one delivery. Returns false when the document is not deliverable.
    async fn push(&mut self, message_id: &str) -> Result<bool, BrokerError> {
        let Some(record) = self.shared.store.document(message_id)? else {
            tracing::error!(agency = %self.agency, message_id, "queued document is missing from the store");
            return Ok(false);
        };
        let envelope = Signed::decode(record.envelope.as_slice())
            .map_err(|e| BrokerError::Store(crate::store::StoreError::Corrupt(e.to_string())))?;
        let attachments = self
            .shared
            .store
            .attachments(message_id, record.attachment_count)?;
        let attempt = self.shared.store.record_attempt(
            message_id,
            self.agency.as_str(),
            lienthong_proto::now_ms(),
        )?;
        let delivery = pb::BrokerMessage {
            msg: Some(pb::broker_message::Msg::Delivery(pb::Delivery {
                envelope: Some(envelope),
                attachments,
                attempt,
            })),
        };
        tracing::debug!(agency = %self.agency, message_id, attempt, "delivery pushed");
        self.tx
            .send(Ok(delivery))
            .await
            .map_err(|_| BrokerError::Unavailable("the agent went away".into()))?;
        Ok(true)
    }

    async fn redeliver_overdue(&mut self, ack_timeout: Duration) -> Result<(), BrokerError> {
        let now = Instant::now();
        let overdue: Vec<String> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.sent_at + ack_timeout <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for message_id in overdue {
            tracing::info!(agency = %self.agency, message_id = %message_id, "no acknowledgement in time; offering again");
            if self.push(&message_id).await? {
                if let Some(flight) = self.in_flight.get_mut(&message_id) {
                    flight.sent_at = Instant::now();
                }
            } else {
                self.in_flight.remove(&message_id);
            }
        }
        Ok(())
    }

    fn on_message(&mut self, message: pb::AgentMessage) -> Result<(), BrokerError> {
        match message.msg {
            Some(Msg::Ack(ack)) => self.on_ack(ack),
            Some(Msg::Refuse(refuse)) => {
                let reason = lienthong_proto::agency::printable(&refuse.reason);
                let settled = self.shared.store.settle(
                    &refuse.message_id,
                    self.agency.as_str(),
                    DeliveryState::Refused,
                    Vec::new(),
                    reason.clone(),
                    lienthong_proto::now_ms(),
                )?;
                self.in_flight.remove(&refuse.message_id);
                if settled {
                    tracing::warn!(agency = %self.agency, message_id = %refuse.message_id, reason = %reason, "recipient refused a delivery");
                }
                Ok(())
            }
            Some(Msg::Hello(_)) | None => Ok(()),
        }
    }

    fn on_ack(&mut self, ack: pb::Ack) -> Result<(), BrokerError> {
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
        if let Err(error) = verify_receipt(&receipt, &self.shared.document_anchors, &expected) {
            tracing::warn!(agency = %self.agency, message_id = %ack.message_id, %error, "delivery receipt rejected; will offer again");
            return Ok(());
        }
        let settled = self.shared.store.settle(
            &ack.message_id,
            self.agency.as_str(),
            DeliveryState::Delivered,
            receipt.encode_to_vec(),
            String::new(),
            lienthong_proto::now_ms(),
        )?;
        self.in_flight.remove(&ack.message_id);
        if settled {
            tracing::info!(agency = %self.agency, message_id = %ack.message_id, "delivered with receipt");
        }
        Ok(())
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
