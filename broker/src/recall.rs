//! Recalls that overtake their document: a recall accepted while the recalled document
//! still waits in a recipient's queue stops that delivery, so the recipient never sees
//! the document (nor the recall, which has nothing to act on), and the sender is told
//! by the broker's signed notice (outcome "recalled").
//!
//! Invariant: only a delivery still queued and not pushed (no unanswered attempt) is
//! stopped; one already on its way is left to arrive, and the recall follows it.

use lienthong_proto::pb::{self, DeliveryState};

use crate::Shared;
use crate::error::BrokerError;
use crate::store::Settlement;

/// Stops the undelivered copies of the document `recall` refers to. Returns the
/// recipients whose delivery was stopped.
pub(crate) fn stop_undelivered(
    shared: &Shared,
    recall: &pb::DocumentHeader,
) -> Result<Vec<String>, BrokerError> {
    let recalled_id = recall.refers_to.as_str();
    let mut stopped = Vec::new();
    for recipient in &recall.recipients {
        let Some(delivery) = shared.store.delivery(recalled_id, recipient)? else {
            continue;
        };
        let on_its_way = delivery
            .attempt_log
            .last()
            .is_some_and(|attempt| attempt.outcome == "pushed");
        if delivery.state != DeliveryState::Queued as i32 || on_its_way {
            continue;
        }
        let reason = format!(
            "recalled by the sender before delivery: {}",
            lienthong_proto::agency::printable(&recall.business_reason)
        );
        if settle_recalled(shared, recalled_id, recipient, &reason)? {
            // The recall itself has nothing to act on at this recipient.
            settle_recalled(
                shared,
                &recall.message_id,
                recipient,
                "the recalled document was never delivered to this recipient",
            )?;
            tracing::info!(
                message_id = recalled_id,
                recipient,
                "delivery stopped by a recall"
            );
            stopped.push(recipient.clone());
        }
    }
    Ok(stopped)
}

fn settle_recalled(
    shared: &Shared,
    message_id: &str,
    recipient: &str,
    reason: &str,
) -> Result<bool, BrokerError> {
    let Some(document) = shared.store.document(message_id)? else {
        return Ok(false);
    };
    let now = lienthong_proto::now_ms();
    let notice = crate::deadletter::signed_notice(
        shared, message_id, &document, recipient, "recalled", reason, now,
    )?;
    Ok(shared.store.settle(
        message_id,
        recipient,
        Settlement::Recalled {
            reason: reason.to_owned(),
            notice,
        },
        now,
    )?)
}
