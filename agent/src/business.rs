//! The agencies' own workflow on top of delivery: business status reports (02–06,
//! 15, 16), recalls, updates and replaces, and the business history a sender sees.
//!
//! Invariants:
//! - A status report is a small document signed by the reporting agency, addressed to
//!   the original sender only, sent through the same durable outbox. It is refused here
//!   (before anything is signed) unless this agency received the document, and the
//!   broker and the sender's agent check the same again.
//! - Processing statuses only go forward (`status_may_follow`); 15/16 answer a recall
//!   or update that arrived; 02 and 16 carry a reason.
//! - Received reports are kept as inbox records of kind STATUS (their signed envelope
//!   is the evidence) and linked to the document they are about; they are neither
//!   exported nor listed in the inbox.
//! - A recall never destroys anything: the recalled document's folder moves to
//!   `<inbox>/recalled/<id>/`, and back if the clerk refuses the recall (16).

use std::sync::Arc;

use lienthong_proto::document::{STATUS_CODES, seal, status_may_follow, vietnam_date_today};
use lienthong_proto::pb::{self, BusinessType, DocumentKind};
use lienthong_proto::signing::VerifyTime;
use lienthong_proto::{now_ms, rfc3339_ms};
use prost::Message;
use tracing::{info, warn};

use crate::Agent;
use crate::api::{ApiError, internal, protocol_error};
use crate::api_types::{BusinessEntry, RecipientView, SendResponse};
use crate::error::StoreError;
use crate::store::{InboxRecord, OutboxRecord};

/// Where a recalled document's folder goes, under the inbox folder.
pub const RECALLED_DIR: &str = "recalled";

/// Reports `code` for the received document `message_id` to its sender.
pub(crate) async fn report(
    agent: &Arc<Agent>,
    message_id: &str,
    code: &str,
    reason: Option<String>,
    staff: Option<String>,
) -> Result<SendResponse, ApiError> {
    crate::api::check_id(message_id)?;
    let reason = report_fields(code, reason)?;
    let record = agent
        .store
        .inbox_record(message_id)
        .map_err(internal("cannot read the inbox"))?
        .filter(|r| r.kind == DocumentKind::Document as i32)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "this agency never received document {message_id}: a status can only be reported for a received document"
            ))
        })?;
    let sent = sent_reports(agent, message_id).map_err(internal("cannot read the links"))?;
    if code == "15" || code == "16" {
        if record.recalled_by.is_none() && record.superseded_by.is_none() {
            return Err(ApiError::BadRequest(format!(
                "status: {code} answers a recall or an update, and document {message_id} has none"
            )));
        }
        if sent.iter().any(|h| {
            h.status
                .as_ref()
                .is_some_and(|s| s.code == "15" || s.code == "16")
        }) {
            return Err(ApiError::Rejected(
                axum::http::StatusCode::CONFLICT,
                "status: the recall was already answered".into(),
            ));
        }
    } else {
        let last = sent
            .iter()
            .filter_map(|h| h.status.as_ref())
            .map(|s| s.code.as_str())
            .filter(|c| lienthong_proto::document::status_rank(c).is_some())
            .max_by_key(|c| lienthong_proto::document::status_rank(c));
        if !status_may_follow(last, code) {
            return Err(ApiError::Rejected(
                axum::http::StatusCode::CONFLICT,
                format!(
                    "status: {code} cannot follow {} (statuses only go forward; nothing follows 02)",
                    last.unwrap_or("")
                ),
            ));
        }
    }
    let header = report_header(
        &agent.agency.to_string(),
        &record,
        message_id,
        code,
        reason,
        staff,
        (
            lienthong_proto::document::new_message_id(),
            now_ms(),
            vietnam_date_today(),
        ),
    )?;
    let envelope = seal(&header, &agent.signing_key()).map_err(protocol_error)?;
    let outbox = OutboxRecord::waiting(&header, &envelope, 0, false);
    let store = &agent.store;
    store
        .put_outbox(&outbox, &envelope.encode_to_vec(), &[])
        .map_err(internal("cannot store the status report"))?;
    store
        .link(message_id, &header.message_id)
        .map_err(internal("cannot link the status report"))?;
    if code == "16" && record.recalled_by.is_some() {
        restore_recalled(agent, message_id).await;
        store
            .update_inbox(message_id, |r| r.recalled_by = None)
            .map_err(internal("cannot update the inbox"))?;
    }
    store
        .durable()
        .await
        .map_err(internal("cannot make the status report durable"))?;
    agent.metrics.outbox_added();
    let _ = agent.outbox_tx.send(header.message_id.clone());
    info!(agency = %agent.agency, about = %message_id, code, report = %header.message_id, "status reported");
    Ok(SendResponse {
        message_id: header.message_id,
        business_id: header.business_id,
    })
}

/// The checks of a status report's own fields, before anything is looked up: the code
/// is one a recipient may report and 02 and 16 give a reason. Returns the trimmed
/// reason (`None` when empty).
pub(crate) fn report_fields(
    code: &str,
    reason: Option<String>,
) -> Result<Option<String>, ApiError> {
    let reason = reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    if !STATUS_CODES.contains(&code) {
        return Err(ApiError::BadRequest(format!(
            "status: {code:?} is not one of 02 (refused), 03 (accepted), 04 (assigned), \
             05 (in progress), 06 (completed), 15 (recall agreed), 16 (recall refused)"
        )));
    }
    if (code == "02" || code == "16") && reason.is_none() {
        return Err(ApiError::BadRequest(format!(
            "reason: status {code} needs a reason"
        )));
    }
    Ok(reason)
}

/// The signed header of status report `code` by `sender` about the received document
/// `message_id` (`record`), checked by `validate_header`. `stamp` is the report's
/// message id, creation time (Unix ms) and issue date (today in Vietnam).
pub(crate) fn report_header(
    sender: &str,
    record: &InboxRecord,
    message_id: &str,
    code: &str,
    reason: Option<String>,
    staff: Option<String>,
    stamp: (String, i64, String),
) -> Result<pb::DocumentHeader, ApiError> {
    let (report_id, created_at_ms, issue_date) = stamp;
    let subject: String = format!("Trạng thái {code}: {}", record.subject)
        .chars()
        .take(500)
        .collect();
    let mut header = pb::DocumentHeader {
        message_id: report_id,
        sender: sender.to_owned(),
        recipients: vec![record.sender.clone()],
        number: code.to_owned(),
        notation: "TT".into(),
        subject,
        issue_date,
        created_at_ms,
        kind: DocumentKind::Status as i32,
        status: Some(pb::StatusReport {
            code: code.to_owned(),
            reason: reason.unwrap_or_default(),
            staff: staff.unwrap_or_default(),
            department: String::new(),
        }),
        refers_to: message_id.to_owned(),
        refers_to_business_id: record.business_id.clone(),
        ..pb::DocumentHeader::default()
    };
    header.business_id = lienthong_proto::document::business_id(
        &header.sender,
        &header.issue_date,
        &header.number,
        &header.notation,
    );
    lienthong_proto::document::validate_header(&header).map_err(protocol_error)?;
    Ok(header)
}

/// The status reports this agency sent about `about`, decoded from its outbox.
fn sent_reports(agent: &Agent, about: &str) -> Result<Vec<pb::DocumentHeader>, StoreError> {
    let mut out = Vec::new();
    for id in agent.store.links(about)? {
        if let Some(bytes) = agent.store.outbox_envelope(&id)?
            && let Ok(envelope) = pb::Signed::decode(bytes.as_ref())
            && let Ok(header) = pb::DocumentHeader::decode(envelope.payload.as_ref())
            && header.kind == DocumentKind::Status as i32
        {
            out.push(header);
        }
    }
    Ok(out)
}

/// Before a received status report is stored: it must be about a document this agency
/// sent to the reporter. The reason is the refusal's.
pub(crate) fn check_received_report(
    agent: &Agent,
    header: &pb::DocumentHeader,
) -> Result<(), String> {
    let sent = agent
        .store
        .outbox_record(&header.refers_to)
        .map_err(|e| format!("cannot read the outbox: {e}"))?;
    match sent {
        Some(record) if record.recipients.contains(&header.sender) => Ok(()),
        _ => Err(format!(
            "a status report about {}, which this agency did not send to {}, is refused",
            lienthong_proto::agency::printable(&header.refers_to),
            header.sender
        )),
    }
}

/// After a new received document is durable: links it to the document it is about and
/// applies a recall, update or replace to that document's record and folder.
pub(crate) async fn on_received(
    agent: &Arc<Agent>,
    header: &pb::DocumentHeader,
) -> Result<(), StoreError> {
    let about = header.refers_to.as_str();
    if about.is_empty() {
        return Ok(());
    }
    let store = &agent.store;
    store.link(about, &header.message_id)?;
    if header.kind == DocumentKind::Status as i32 {
        return Ok(());
    }
    let Some(original) = store.inbox_record(about)? else {
        info!(agency = %agent.agency, about, "a recall or update of a document this agency never received");
        return Ok(());
    };
    if original.sender != header.sender {
        warn!(agency = %agent.agency, about, "a recall or update from another sender than the document's; ignored");
        return Ok(());
    }
    let id = header.message_id.clone();
    if header.business_type == BusinessType::Recall as i32 {
        if original.recalled_by.is_none() {
            move_recalled(agent, about).await;
            store.update_inbox(about, |r| r.recalled_by = Some(id.clone()))?;
            info!(agency = %agent.agency, about, recall = %id, "document recalled by its sender; its folder moved to recalled/");
        }
    } else {
        let removed = header
            .removed_recipients
            .iter()
            .any(|r| r == agent.agency.as_str());
        store.update_inbox(about, |r| {
            r.superseded_by = Some(id.clone());
            if removed {
                r.removed_by = Some(id.clone());
            }
        })?;
    }
    Ok(())
}

/// `<inbox>/<id>` → `<inbox>/recalled/<id>`; logged, never fatal.
async fn move_recalled(agent: &Arc<Agent>, id: &str) {
    // Without an inbox folder there is nothing to move.
    let Some(inbox) = agent.inbox_dir() else {
        return;
    };
    let from = inbox.join(id);
    let dir = inbox.join(RECALLED_DIR);
    let to = dir.join(id);
    let access = agent.inbox_access;
    let moved = async {
        let creating = dir.clone();
        tokio::task::spawn_blocking(move || access.create_dir(&creating))
            .await
            .map_err(std::io::Error::other)?
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if tokio::fs::try_exists(&from).await? && !tokio::fs::try_exists(&to).await? {
            tokio::fs::rename(&from, &to).await?;
        }
        Ok::<_, std::io::Error>(())
    }
    .await;
    if let Err(e) = moved {
        warn!(agency = %agent.agency, message_id = %id, error = %e, "cannot move a recalled document's folder");
    }
}

/// `<inbox>/recalled/<id>` → `<inbox>/<id>` when the clerk keeps the document (16).
async fn restore_recalled(agent: &Arc<Agent>, id: &str) {
    let Some(inbox) = agent.inbox_dir() else {
        return;
    };
    let from = inbox.join(RECALLED_DIR).join(id);
    let to = inbox.join(id);
    let moved = async {
        if tokio::fs::try_exists(&from).await? && !tokio::fs::try_exists(&to).await? {
            tokio::fs::rename(&from, &to).await?;
        }
        Ok::<_, std::io::Error>(())
    }
    .await;
    if let Err(e) = moved {
        warn!(agency = %agent.agency, message_id = %id, error = %e, "cannot move a document back from recalled/");
    }
}

/// The folder a received document is in now (or will be, once exported); `None`
/// when the agent has no inbox folder.
pub(crate) fn folder_of(agent: &Agent, record: &InboxRecord) -> Option<std::path::PathBuf> {
    let inbox = agent.inbox_dir()?;
    Some(if record.recalled_by.is_some() {
        inbox.join(RECALLED_DIR).join(&record.message_id)
    } else {
        inbox.join(&record.message_id)
    })
}

/// The trusted time of a received document or report: the time in the broker's
/// submission receipt kept with it (checked again here against the broker's anchors
/// and the exact header bytes), or else when this agent stored it. Never the
/// `created_at` its signer claims.
fn trusted_time_ms(agent: &Agent, id: &str, record: &InboxRecord, envelope: &pb::Signed) -> i64 {
    let header_sha256 = lienthong_proto::sha256(&envelope.payload);
    let expected = lienthong_proto::receipt::ExpectedReceipt {
        kind: pb::ReceiptKind::Submission,
        message_id: id,
        header_sha256: &header_sha256,
        recipient: None,
        live: false,
    };
    agent
        .store
        .received_submission_receipt(id)
        .ok()
        .flatten()
        .and_then(|bytes| pb::Signed::decode(bytes.as_ref()).ok())
        .and_then(|receipt| {
            lienthong_proto::receipt::verify_receipt(&receipt, &agent.tls_anchors, &expected).ok()
        })
        .map_or(record.received_at_ms, |receipt| receipt.at_ms)
}

/// Fills each recipient's business history of a document this agency sent: 01 from
/// the verified delivery receipt, 13 for our recall, and every status report received
/// from that recipient (its signature checked again here), oldest first.
pub(crate) fn fill_history(agent: &Agent, about: &str, recipients: &mut [RecipientView]) {
    let mut ours: Vec<BusinessEntry> = Vec::new();
    let mut theirs: Vec<BusinessEntry> = Vec::new();
    let links = agent.store.links(about).unwrap_or_default();
    for id in links {
        // A recall we sent.
        if let Ok(Some(bytes)) = agent.store.outbox_envelope(&id)
            && let Ok(envelope) = pb::Signed::decode(bytes.as_ref())
            && let Ok(header) = pb::DocumentHeader::decode(envelope.payload.as_ref())
        {
            if header.business_type == BusinessType::Recall as i32 {
                ours.push(BusinessEntry {
                    code: "13".into(),
                    at: rfc3339_ms(header.created_at_ms).unwrap_or_default(),
                    at_ms: header.created_at_ms,
                    by: header.sender.clone(),
                    reason: Some(header.business_reason.clone()).filter(|r| !r.is_empty()),
                    staff: None,
                    report_id: Some(id.clone()),
                    verified: true,
                });
            }
            continue;
        }
        // A status report received.
        let Ok(Some(record)) = agent.store.inbox_record(&id) else {
            continue;
        };
        if record.kind != DocumentKind::Status as i32 {
            continue;
        }
        let Ok(Some(bytes)) = agent.store.inbox_envelope(&id) else {
            continue;
        };
        let Ok(envelope) = pb::Signed::decode(bytes.as_ref()) else {
            continue;
        };
        let Ok(header) = pb::DocumentHeader::decode(envelope.payload.as_ref()) else {
            continue;
        };
        // The signer's certificate is checked at a time this agent trusts, never at the
        // `created_at` the signer wrote itself: a report forged with an expired key and
        // backdated would otherwise verify.
        let trusted_at = trusted_time_ms(agent, &id, &record, &envelope);
        let verified = lienthong_proto::document::verify_document(
            &envelope,
            &agent.document_anchors,
            VerifyTime::AtMs(trusted_at),
        )
        .is_ok_and(|v| v.header.refers_to == about);
        let Some(status) = header.status else {
            continue;
        };
        theirs.push(BusinessEntry {
            code: status.code,
            at: rfc3339_ms(header.created_at_ms).unwrap_or_default(),
            at_ms: header.created_at_ms,
            by: header.sender,
            reason: Some(status.reason).filter(|r| !r.is_empty()),
            staff: Some(status.staff).filter(|s| !s.is_empty()),
            report_id: Some(id),
            verified,
        });
    }
    for recipient in recipients.iter_mut() {
        let mut entries = Vec::new();
        if recipient.receipt_verified == Some(true)
            && let (Some(at), Some(at_ms)) = (&recipient.receipt_at, recipient.receipt_at_ms)
        {
            entries.push(BusinessEntry {
                code: "01".into(),
                at: at.clone(),
                at_ms,
                by: recipient.agency.clone(),
                reason: None,
                staff: None,
                report_id: None,
                verified: true,
            });
        }
        entries.extend(ours.iter().cloned());
        entries.extend(theirs.iter().filter(|e| e.by == recipient.agency).cloned());
        // By time, then by rank for statuses signed in the same millisecond.
        entries.sort_by_key(|e| {
            (
                e.at_ms,
                lienthong_proto::document::status_rank(&e.code).unwrap_or(u8::MAX),
            )
        });
        let recalled = entries.iter().any(|e| e.code == "13");
        recipient.recall = if !recalled {
            None
        } else if recipient.state == "recalled" {
            Some("stopped before delivery".into())
        } else if entries.iter().any(|e| e.code == "15") {
            Some("agreed".into())
        } else if entries.iter().any(|e| e.code == "16") {
            Some("refused".into())
        } else {
            Some("pending".into())
        };
        recipient.business = entries;
    }
}
