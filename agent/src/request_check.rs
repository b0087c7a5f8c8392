//! One entry point, [`check_request`], for the fuzz target `api_json` (`fuzz/`) and its
//! replay test: the checks the local API applies to a request body before it signs,
//! run on a body without an agent. Not a stable API (hidden from the documentation).
//!
//! Invariants:
//! - Nothing is re-implemented here: a body goes through the same functions the
//!   handlers call ([`crate::api::draft`], [`crate::business::report_fields`] and
//!   [`crate::business::report_header`], [`crate::api::recall_request`],
//!   [`crate::edxml_api::plan_with`]); only the store's answers are replaced by the
//!   one sent and the one received document of a [`CheckContext`].
//! - What the store alone decides (the numbering counter, the order of status reports
//!   already sent, uploads on disk, the outbox quotas) is not checked: no upload is
//!   known, so a body naming one is refused as unknown. Base64 attachments the handler
//!   would spool to upload files (over the streaming threshold in total) are decoded
//!   by the handler's own piecewise decoder into memory instead, and found as uploads
//!   of this check only.
//! - An edXML package is parsed whole (`parse_message`) where the handler spools its
//!   attachments (`parse_message_into`); both map the parsed message to what it asks
//!   through one function (`edxml_api::planned_from`).
//! - A refusal is returned as the HTTP status and message the client would get.

use std::cell::RefCell;

use axum::response::IntoResponse as _;
use lienthong_proto::pb;

use crate::api::{
    ApiError, Draft, DraftContext, DraftStore, SentDocument, check_id, draft, recall_request,
};
use crate::api_types::{RecallRequest, ReportRequest, SendRequest};
use crate::business::{report_fields, report_header};
use crate::edxml_api::{Planned, not_received, not_sent, plan_with};
use crate::store::InboxRecord;

/// A request body as a handler receives it (after JSON decoding).
#[derive(Debug, Clone)]
pub enum Request {
    /// `POST /v1/documents`.
    Send(Box<SendRequest>),
    /// `POST /v1/inbox/{id}/status`; `id` is the path's message id.
    Report { id: String, body: ReportRequest },
    /// `POST /v1/documents/{id}/recall`; `id` is the path's message id.
    Recall { id: String, body: RecallRequest },
    /// `POST /v1/edxml`: the package bytes.
    Edxml(Vec<u8>),
}

/// What the agent and its store would say: this agency, the one document it sent and
/// the one it received, the size limit and the clock.
#[derive(Debug, Clone)]
pub struct CheckContext {
    pub agency: String,
    /// A document this agency sent: its message id, business id and recipients.
    pub sent_id: String,
    pub sent_business_id: String,
    pub sent_recipients: Vec<String>,
    /// A document this agency received: its message id, sender, subject, business id.
    pub received_id: String,
    pub received_sender: String,
    pub received_subject: String,
    pub received_business_id: String,
    /// `max_document_bytes`.
    pub max_document_bytes: u64,
    /// The new document's message id, creation time (Unix ms) and today (`yyyy/MM/dd`).
    pub message_id: String,
    pub created_at_ms: i64,
    pub today: String,
}

/// A refusal: the HTTP status and the `error` message of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl From<ApiError> for Refusal {
    fn from(e: ApiError) -> Self {
        let message = match &e {
            ApiError::BadRequest(m) | ApiError::NotFound(m) | ApiError::Rejected(_, m) => m.clone(),
            ApiError::Internal => String::new(),
        };
        Self {
            status: e.into_response().status().as_u16(),
            message,
        }
    }
}

/// The header the agent would seal for `request` (every rule checked, the number
/// still the placeholder when the body gives none), or the answer refusing it.
pub fn check_request(ctx: &CheckContext, request: Request) -> Result<pb::DocumentHeader, Refusal> {
    match request {
        Request::Send(body) => send(ctx, *body),
        Request::Report { id, body } => {
            report(ctx, &id, body.status.trim(), body.reason, body.staff)
        }
        Request::Recall { id, body } => {
            check_id(&id)?;
            if body.reason.trim().is_empty() {
                return Err(ApiError::BadRequest("reason: a recall needs a reason".into()).into());
            }
            if id != ctx.sent_id {
                return Err(ApiError::NotFound(format!(
                    "document {id} was not sent by this agency"
                ))
                .into());
            }
            send(ctx, recall_request(id, &ctx.sent_business_id, body.reason))
        }
        Request::Edxml(package) => {
            let planned = plan_with(
                &ctx.agency,
                &package,
                &lienthong_edxml::Limits::default(),
                &mut |doc, business_id| {
                    if business_id == ctx.sent_business_id {
                        Ok(ctx.sent_id.clone())
                    } else {
                        Err(not_sent(doc, business_id))
                    }
                },
                &mut |response_for| {
                    if response_for.document_id == ctx.received_business_id
                        && response_for.organ_id == ctx.received_sender
                    {
                        Ok(ctx.received_id.clone())
                    } else {
                        Err(not_received(response_for))
                    }
                },
            )?;
            match planned {
                Planned::Document(body) => send(ctx, *body),
                Planned::Status {
                    message_id,
                    code,
                    reason,
                    staff,
                } => report(ctx, &message_id, &code, reason, staff),
            }
        }
    }
}

fn send(ctx: &CheckContext, body: SendRequest) -> Result<pb::DocumentHeader, Refusal> {
    let draft_ctx = DraftContext {
        sender: &ctx.agency,
        max_document_bytes: ctx.max_document_bytes,
        message_id: ctx.message_id.clone(),
        created_at_ms: ctx.created_at_ms,
        today: ctx.today.clone(),
    };
    // The uploads this check spooled base64 attachments to (id, decoded size, digest);
    // shared by the `spool` and `upload` answers.
    let spooled: RefCell<Vec<crate::files::Upload>> = RefCell::new(Vec::new());
    let Draft { header, .. } = draft(
        draft_ctx,
        body,
        DraftStore {
            sent: &mut |id| {
                Ok((id == ctx.sent_id).then(|| SentDocument {
                    business_id: ctx.sent_business_id.clone(),
                    recipients: ctx.sent_recipients.clone(),
                }))
            },
            upload: &mut |id| {
                let index = id
                    .strip_prefix(SPOOLED_PREFIX)
                    .and_then(|n| n.parse::<usize>().ok());
                Ok(index.and_then(|i| spooled.borrow().get(i).cloned()))
            },
            spool: &mut |index, text| {
                let mut bytes = Vec::new();
                crate::intake::decode_pieces(
                    text,
                    |piece| {
                        bytes.extend_from_slice(piece);
                        Ok(())
                    },
                    |e| {
                        ApiError::BadRequest(format!(
                            "attachments[{index}].content_base64: not valid standard base64 ({e})"
                        ))
                    },
                )?;
                let info = lienthong_proto::document::describe_attachment("", "", &bytes);
                let mut spooled = spooled.borrow_mut();
                let id = format!("{SPOOLED_PREFIX}{}", spooled.len());
                spooled.push(crate::files::Upload {
                    path: std::path::PathBuf::new(),
                    size: info.size,
                    sha256: info.sha256,
                });
                Ok(id)
            },
        },
    )?;
    Ok(header)
}

/// The id prefix of an attachment this check spooled; not a UUID, so a body cannot
/// name one as an upload of its own (the store's uploads are UUIDs).
const SPOOLED_PREFIX: &str = "spooled-";

fn report(
    ctx: &CheckContext,
    id: &str,
    code: &str,
    reason: Option<String>,
    staff: Option<String>,
) -> Result<pb::DocumentHeader, Refusal> {
    check_id(id)?;
    let reason = report_fields(code, reason)?;
    if id != ctx.received_id {
        return Err(ApiError::NotFound(format!(
            "this agency never received document {id}: a status can only be reported for a received document"
        ))
        .into());
    }
    let record = InboxRecord {
        message_id: ctx.received_id.clone(),
        sender: ctx.received_sender.clone(),
        subject: ctx.received_subject.clone(),
        business_id: ctx.received_business_id.clone(),
        kind: pb::DocumentKind::Document as i32,
        ..InboxRecord::default()
    };
    Ok(report_header(
        &ctx.agency,
        &record,
        id,
        code,
        reason,
        staff,
        (ctx.message_id.clone(), ctx.created_at_ms, ctx.today.clone()),
    )?)
}
