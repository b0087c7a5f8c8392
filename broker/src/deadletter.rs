//! Dead letters: deliveries that end without a delivery receipt, because they expired or
//! the recipient refused them. Each gets a broker-signed notice for the sender, and an
//! operator can redrive it (queue it again under the same message id, so the recipient
//! still deduplicates).
//!
//! The expiry sweeper walks the expiry index (ordered by time), so each pass costs the
//! number of deliveries that are due, not the size of the queues.

use std::sync::Arc;

use lienthong_proto::pb::{self, DeliveryState, ReceiptKind};
use lienthong_proto::receipt::sign_receipt;
use prost::Message;

use crate::Shared;
use crate::error::BrokerError;
use crate::store::Settlement;

/// Turns a queued delivery into a dead letter with a signed notice. Returns false when
/// it was not queued any more (delivered or already dead).
pub(crate) fn make_dead(
    shared: &Shared,
    message_id: &str,
    recipient: &str,
    state: DeliveryState,
    reason: &str,
) -> Result<bool, BrokerError> {
    let Some(document) = shared.store.document(message_id)? else {
        return Ok(false);
    };
    let now = lienthong_proto::now_ms();
    let outcome = if state == DeliveryState::Refused {
        "refused"
    } else {
        "expired"
    };
    let signed = signed_notice(
        shared, message_id, &document, recipient, outcome, reason, now,
    )?;
    let settled = shared.store.settle(
        message_id,
        recipient,
        Settlement::Dead {
            state,
            reason: reason.to_owned(),
            notice: signed,
        },
        now,
    )?;
    if settled {
        shared.metrics.dead_letter(state);
        tracing::warn!(
            message_id,
            recipient,
            outcome,
            reason,
            "delivery dead-lettered"
        );
    }
    Ok(settled)
}

/// The broker's signed notice (a dead-letter receipt, encoded `Signed`) saying why a
/// delivery ended without a delivery receipt: `outcome` is "expired", "refused" or
/// "recalled".
pub(crate) fn signed_notice(
    shared: &Shared,
    message_id: &str,
    document: &crate::records::DocumentRecord,
    recipient: &str,
    outcome: &str,
    reason: &str,
    at_ms: i64,
) -> Result<Vec<u8>, BrokerError> {
    let notice = pb::Receipt {
        kind: ReceiptKind::DeadLetter as i32,
        message_id: message_id.to_owned(),
        header_sha256: document.header_sha256.clone(),
        at_ms,
        issuer: format!("broker:{}", shared.config.name),
        business_id: document.business_id.clone(),
        sender: document.sender.clone(),
        recipient: recipient.to_owned(),
        outcome: outcome.to_owned(),
        reason: reason.to_owned(),
    };
    Ok(sign_receipt(&notice, &shared.signing_key())?.encode_to_vec())
}

/// The expiry of a document: the sender's, or the default for its priority.
pub(crate) fn expiry_for(shared: &Shared, header: &pb::DocumentHeader, from_ms: i64) -> i64 {
    if header.expires_at_ms > 0 {
        return header.expires_at_ms;
    }
    let defaults = &shared.config.default_expiry;
    let index = (header.priority as usize).min(defaults.len().saturating_sub(1));
    let ttl = defaults
        .get(index)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(i64::MAX);
    from_ms.saturating_add(ttl)
}

/// Moves due deliveries to the dead letters, every `expiry_check_interval`, until shutdown.
pub(crate) async fn expiry_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.expiry_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = sweep(&shared) {
            tracing::error!(%error, "expiry sweep failed");
        }
    }
}

fn sweep(shared: &Shared) -> Result<(), BrokerError> {
    loop {
        let now = lienthong_proto::now_ms();
        let due = shared.store.expired_due(now, 1000)?;
        if due.is_empty() {
            return Ok(());
        }
        for (message_id, recipient) in &due {
            let at = shared
                .store
                .delivery(message_id, recipient)?
                .map(|d| d.expires_at_ms)
                .unwrap_or(now);
            let reason = format!(
                "not delivered before its expiry ({})",
                lienthong_proto::rfc3339_ms(at).unwrap_or_else(|| at.to_string())
            );
            make_dead(
                shared,
                message_id,
                recipient,
                DeliveryState::Expired,
                &reason,
            )?;
        }
        if due.len() < 1000 {
            return Ok(());
        }
    }
}

/// One dead letter queued again by [`redrive`].
#[derive(Debug, Clone)]
pub(crate) struct Redriven {
    pub message_id: String,
    pub recipient: String,
}

/// Queues dead letters again, each with a fresh expiry by its priority: the dead letter
/// `message_id` (of `agency` only, when given), or every dead letter of `agency` when
/// `message_id` is empty. Waits until the change is durable. `NotFound` when nothing
/// matches. Shared by the gRPC `Admin.Redrive` and the dashboard's `POST /api/redrive`.
/// `operator` names who asked, for the audit log.
pub(crate) async fn redrive(
    shared: &Shared,
    message_id: &str,
    agency: Option<&str>,
    operator: &str,
) -> Result<Vec<Redriven>, BrokerError> {
    let candidates: Vec<crate::store::DeadLetterEntry> = if message_id.is_empty() {
        let agency = agency.ok_or_else(|| {
            BrokerError::InvalidArgument("give a message id, an agency, or both".into())
        })?;
        shared.store.dead_letters(Some(agency))?
    } else {
        shared
            .store
            .dead_letters(agency)?
            .into_iter()
            .filter(|e| e.message_id == message_id)
            .collect()
    };
    if candidates.is_empty() {
        return Err(BrokerError::NotFound("no matching dead letter".into()));
    }
    let now = lienthong_proto::now_ms();
    let mut redriven = Vec::new();
    for entry in candidates {
        let Some(document) = shared.store.document(&entry.message_id)? else {
            continue;
        };
        let header = pb::Signed::decode(document.envelope.as_slice())
            .ok()
            .and_then(|e| pb::DocumentHeader::decode(e.payload.as_ref()).ok())
            .unwrap_or_default();
        // A redriven document gets a fresh expiry by its priority, from now.
        let fresh = pb::DocumentHeader {
            expires_at_ms: 0,
            ..header
        };
        let expires_at_ms = expiry_for(shared, &fresh, now);
        if shared.store.redrive(
            &entry.message_id,
            &entry.recipient,
            expires_at_ms,
            now,
            operator,
        )? {
            tracing::info!(message_id = %entry.message_id, agency = %entry.recipient, operator, "dead letter redriven");
            shared.hub.wake(&entry.recipient);
            redriven.push(Redriven {
                message_id: entry.message_id,
                recipient: entry.recipient,
            });
        }
    }
    shared.store.durable().await?;
    Ok(redriven)
}
