//! The local HTTP JSON API for gateways and clerks (loopback by default).
//!
//! Routes: `POST /v1/uploads` (a file streamed to disk), `POST /v1/documents`,
//! `POST /v1/documents/batch` (many documents, one outcome each),
//! `GET /v1/documents/{id}/status` (with the business history),
//! `POST /v1/documents/{id}/recall`, `GET /v1/inbox` and `GET /v1/sent` (pages, see
//! `listing`), `GET /v1/inbox/count`, `GET /v1/inbox/{id}`,
//! `GET /v1/inbox/{id}/attachments/{name}`, `POST /v1/inbox/{id}/status`, `GET /v1/directory`,
//! `GET /v1/limits`, the edXML routes of `edxml_api`, `GET /healthz`, `GET /readyz`,
//! `GET /metrics` (Prometheus), `GET /openapi.json`.
//!
//! Invariants:
//! - Every route is behind `api_guard` (token, Host/Origin/Sec-Fetch-Site, Content-Type)
//!   and listed in `api_guard::ROUTES`; a route missing there is refused, not served.
//! - `202 Accepted` is answered only after the sealed document is durable in the
//!   outbox (for a batch: every accepted document of it). Documents are drafted here and
//!   sealed by `sealer` (one signature, one store write, one sync per group).
//! - Bad input is a `400` whose message names the field and the rule; storage failures
//!   are a `500` with a generic message (details go to the log, never to the client).
//! - Every error body is an [`ErrorBody`].

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::Bytes;
use lienthong_proto::document::{
    business_id, describe_attachment, is_valid_message_id, new_message_id, vietnam_date_today,
};
use lienthong_proto::pb;
use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
use lienthong_proto::{AgencyCode, ProtocolError, now_ms};
use prost::Message;
use tracing::{debug, error, info, warn};

use crate::Agent;
use crate::api_types::{
    AttemptView, ErrorBody, InboxDetail, InboxItem, Limits, RecipientView, SendBatchRequest,
    SendBatchResponse, SendBatchResult, SendRequest, SendResponse, StatusView, UploadResponse,
};
use crate::error::StoreError;
use crate::export::{document_json, rfc3339_ms};
use crate::store::OutboxState;

/// How long a status query to the broker may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

const OPENAPI: &str = include_str!("openapi.json");

pub(crate) mod idempotency;
mod listing;

/// An API failure and its HTTP answer.
#[derive(Debug)]
pub(crate) enum ApiError {
    BadRequest(String),
    NotFound(String),
    /// Already logged with details.
    Internal,
    Rejected(StatusCode, String),
}

impl ApiError {
    /// The HTTP status and the client-safe message.
    pub(crate) fn status_and_message(self) -> (StatusCode, String) {
        match self {
            ApiError::BadRequest(e) => (StatusCode::BAD_REQUEST, e),
            ApiError::NotFound(e) => (StatusCode::NOT_FOUND, e),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error of the agent's store; see the agent's log".to_owned(),
            ),
            ApiError::Rejected(status, e) => (status, e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = self.status_and_message();
        (status, Json(ErrorBody { error })).into_response()
    }
}

pub(crate) fn internal(context: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| {
        error!(error = %e, "{context}");
        ApiError::Internal
    }
}

/// The API's routes over the shared agent state, every one behind `guard` (token,
/// Host/Origin rules, Content-Type; see `api_guard::ROUTES`).
pub(crate) fn router(
    agent: Arc<Agent>,
    max_body_bytes: usize,
    guard: crate::api_guard::Guard,
) -> Router {
    Router::new()
        .route("/v1/documents", post(send_document))
        .route("/v1/documents/batch", post(send_documents_batch))
        .route(
            "/v1/uploads",
            post(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/limits", get(limits))
        .route("/v1/documents/{id}/status", get(document_status))
        .route("/v1/inbox", get(listing::list_inbox))
        .route("/v1/sent", get(listing::list_sent))
        .route(
            "/v1/inbox/{id}/attachments/{name}",
            get(listing::attachment),
        )
        .route("/v1/inbox/count", get(inbox_count))
        .route("/v1/inbox/{id}/status", post(report_status))
        .route("/v1/documents/{id}/recall", post(recall_document))
        .route("/v1/directory", get(directory))
        .route("/v1/inbox/{id}", get(inbox_document))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route(
            "/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .merge(crate::edxml_api::routes())
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            guard,
            crate::api_guard::guard,
        ))
        .with_state(agent)
}

/// Ready when the store answers a read (it is open: the API serves only after that).
async fn readyz(State(agent): State<Arc<Agent>>) -> Response {
    let checking = Arc::clone(&agent);
    match tokio::task::spawn_blocking(move || checking.store.outbox_record("")).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => {
            error!(agency = %agent.agency, error = %e, "readiness: the store cannot be read");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent's store cannot be read; see the log",
            )
                .into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "readiness check failed").into_response(),
    }
}

/// Prometheus text exposition of the agent's metrics.
async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let mut body = String::new();
    match agent.metrics.encode(&mut body) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Err(_) => {
            error!("cannot encode the metrics");
            ApiError::Internal.into_response()
        }
    }
}

/// The media type for a file name's extension.
pub fn guess_media_type(name: &str) -> &'static str {
    let extension = name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "pdf" => "application/pdf",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "doc" => "application/msword",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "txt" => "text/plain",
        "xml" => "application/xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        _ => "application/octet-stream",
    }
}

pub(crate) fn protocol_error(e: ProtocolError) -> ApiError {
    match e {
        ProtocolError::Key { .. } | ProtocolError::UnsupportedAlgorithm => {
            error!(error = %e, "cannot sign with the agency key");
            ApiError::Internal
        }
        other => ApiError::BadRequest(other.to_string()),
    }
}

/// Drafting requests whose base64 attachments decode to at most this in total is small
/// CPU work, done on the request's own task (no blocking-pool hop); larger ones and uploads
/// (files to read or spool) are drafted on the blocking pool.
const INLINE_DRAFT_BYTES: u64 = 256 * 1024;

/// The most documents `POST /v1/documents/batch` takes in one call.
pub const MAX_BATCH_DOCUMENTS: usize = 1000;

/// A drafted request ready for the sealer, with its answer channel.
type Job = (
    crate::sealer::SealJob,
    tokio::sync::oneshot::Receiver<Result<crate::sealer::Sealed, ApiError>>,
);

/// Drafts one request for the sealer; `spooled` collects the uploads spooled from its
/// base64 attachments (removed once it is answered). Blocking unless
/// [`drafts_inline`].
///
/// Attachments given as base64 of a document that will be streamed (over
/// `STREAMED_THRESHOLD` in total) are first spooled to upload files, synced, so that
/// they take the path of uploaded files.
/// `drafted` with its request's `Idempotency-Key`, for the sealer.
fn tagged(
    drafted: Result<Job, ApiError>,
    tag: Option<crate::sealer::IdempotencyTag>,
) -> Result<Job, ApiError> {
    drafted.map(|(mut job, answer)| {
        job.idempotency = tag;
        (job, answer)
    })
}

fn draft_job(agent: &Agent, req: SendRequest, spooled: &mut Vec<String>) -> Result<Job, ApiError> {
    let sender = agent.agency.to_string();
    let ctx = DraftContext {
        sender: &sender,
        max_document_bytes: agent.max_document_bytes,
        message_id: new_message_id(),
        created_at_ms: now_ms(),
        today: vietnam_date_today(),
    };
    let Draft {
        header,
        given_number,
        inline: mut attachments,
        uploads,
        streamed,
    } = draft(
        ctx,
        req,
        DraftStore {
            sent: &mut |id| {
                Ok(agent
                    .store
                    .outbox_record(id)
                    .map_err(internal("cannot read the outbox"))?
                    .map(|r| SentDocument {
                        business_id: r.business_id,
                        recipients: r.recipients,
                    }))
            },
            upload: &mut |id| {
                agent
                    .files
                    .upload(id)
                    .map_err(internal("cannot read an upload"))
            },
            spool: &mut |index, text| {
                let id = spool_base64(agent, index, text)?;
                spooled.push(id.clone());
                Ok(id)
            },
        },
    )?;
    let mut upload_paths = Vec::new();
    let mut consumed = Vec::new();
    if streamed {
        // The sealer moves the files into the outbox.
        upload_paths = uploads.iter().map(|(_, u)| u.path.clone()).collect();
        attachments.clear();
    } else {
        // Small: kept inline in the store like a JSON upload.
        for (id, upload) in &uploads {
            let bytes = std::fs::read(&upload.path).map_err(|e| {
                error!(error = %e, "cannot read an upload");
                ApiError::Internal
            })?;
            attachments.push(Bytes::from(bytes));
            consumed.push(id.clone());
        }
    }
    Ok(crate::sealer::job(
        header,
        given_number,
        attachments,
        streamed,
        upload_paths,
        consumed,
    ))
}

/// Whether drafting `requests` is small enough for the async thread: no files to read
/// or spool, and little base64 to decode and hash in all of them together.
fn drafts_inline<'a>(requests: impl IntoIterator<Item = &'a SendRequest>) -> bool {
    let mut base64 = 0u64;
    for attachment in requests.into_iter().flat_map(|r| &r.attachments) {
        if attachment.upload_id.is_some() {
            return false;
        }
        base64 = base64.saturating_add(crate::intake::decoded_len(
            attachment.content_base64.as_bytes(),
        ));
    }
    base64 <= INLINE_DRAFT_BYTES
}

/// Spools base64 `text` (attachment `index`) to a new upload; returns its id.
/// Blocking.
fn spool_base64(agent: &Agent, index: usize, text: &[u8]) -> Result<String, ApiError> {
    let mut writer = agent
        .files
        .spool()
        .map_err(internal("cannot spool an attachment"))?;
    let mut failed = None;
    crate::intake::decode_pieces(
        text,
        |piece| {
            writer.write(piece).map_err(|e| {
                failed = Some(e);
                ApiError::Internal
            })
        },
        |e| {
            ApiError::BadRequest(format!(
                "attachments[{index}].content_base64: not valid standard base64 ({e})"
            ))
        },
    )
    .map_err(|e| match failed.take() {
        Some(store) => internal("cannot spool an attachment")(store),
        None => e,
    })?;
    writer
        .finish()
        .map(|(id, _)| id)
        .map_err(internal("cannot spool an attachment"))
}

/// What the store knows of the document a recall, update or replace refers to.
pub(crate) struct SentDocument {
    pub business_id: String,
    pub recipients: Vec<String>,
}

/// The values of a send request that come from the agent rather than the request.
pub(crate) struct DraftContext<'a> {
    /// This agency.
    pub sender: &'a str,
    /// `max_document_bytes`: the largest sum of attachment sizes.
    pub max_document_bytes: u64,
    pub message_id: String,
    pub created_at_ms: i64,
    /// Today in Vietnam, `yyyy/MM/dd`: the issue date when the request gives none.
    pub today: String,
}

/// A send request turned into the header the agent will seal, checked by every rule
/// (`validate_header` included) before a number is taken from the counter.
pub(crate) struct Draft {
    pub header: pb::DocumentHeader,
    /// The request gave its own number (else the counter gives one).
    pub given_number: bool,
    /// The attachments given inline (`content_base64`) and not spooled, decoded, in
    /// order.
    pub inline: Vec<Bytes>,
    /// The attachments given as uploads (or spooled to one), in order.
    pub uploads: Vec<(String, crate::files::Upload)>,
    /// The attachments total more than the streaming threshold.
    pub streamed: bool,
}

/// Answers the outbox record of a message id this agency sent.
pub(crate) type SentLookup<'a> = dyn FnMut(&str) -> Result<Option<SentDocument>, ApiError> + 'a;
/// Answers an upload by id.
pub(crate) type UploadLookup<'a> =
    dyn FnMut(&str) -> Result<Option<crate::files::Upload>, ApiError> + 'a;
/// Spools base64 text of attachment `index` to a new upload; answers its id.
pub(crate) type Spool<'a> = dyn FnMut(usize, &[u8]) -> Result<String, ApiError> + 'a;

/// The store as [`draft`] asks it, in the order the request is read (so a bad field
/// is reported before any lookup after it).
pub(crate) struct DraftStore<'a> {
    /// The outbox record of `refers_to`: what this agency sent under that message id.
    pub sent: &'a mut SentLookup<'a>,
    /// An upload by id.
    pub upload: &'a mut UploadLookup<'a>,
    /// Spools base64 text (of attachment `index`, over the streaming threshold in
    /// total) to a new upload, decoded piece by piece; answers the upload's id, which
    /// `upload` then finds. A refusal names the attachment.
    pub spool: &'a mut Spool<'a>,
}

/// Builds and checks the header of a send request: everything `POST /v1/documents`
/// does before it takes a number, seals and stores. The store is asked only through
/// `store`. Pure otherwise: the fuzz target `api_json` drives it through
/// [`crate::request_check::check_request`].
pub(crate) fn draft(
    ctx: DraftContext<'_>,
    req: SendRequest,
    store: DraftStore<'_>,
) -> Result<Draft, ApiError> {
    let mut req = req;
    let mut recipients = Vec::with_capacity(req.to.len());
    for code in &req.to {
        let code =
            AgencyCode::parse(code.trim()).map_err(|e| ApiError::BadRequest(format!("to: {e}")))?;
        recipients.push(code.to_string());
    }
    let business_type = req.business_type.unwrap_or(0);
    let mut removed_recipients = Vec::new();
    for code in req.removed_recipients.iter().flatten() {
        let code = AgencyCode::parse(code.trim())
            .map_err(|e| ApiError::BadRequest(format!("removed_recipients: {e}")))?;
        removed_recipients.push(code.to_string());
    }
    // A recall, update or replace refers to a document this agent sent.
    let refers_to = req.refers_to.clone().unwrap_or_default();
    let mut refers_to_business_id = String::new();
    if business_type != 0 || !refers_to.is_empty() {
        let original = (store.sent)(&refers_to)?.ok_or_else(|| {
            ApiError::BadRequest(format!(
                "refers_to: {} is not a document this agency sent",
                lienthong_proto::agency::printable(&refers_to)
            ))
        })?;
        refers_to_business_id = original.business_id.clone();
        if business_type == pb::BusinessType::Recall as u32 && recipients.is_empty() {
            recipients = original.recipients.clone();
        }
        // Removed recipients must hear of the new version: they are addressed too.
        for removed in &removed_recipients {
            if !original.recipients.contains(removed) {
                return Err(ApiError::BadRequest(format!(
                    "removed_recipients: {removed} was not a recipient of {refers_to}"
                )));
            }
            if !recipients.contains(removed) {
                recipients.push(removed.clone());
            }
        }
    }
    if req.attachments.iter().any(|a| a.upload_id.is_some())
        && req.attachments.iter().any(|a| a.upload_id.is_none())
    {
        return Err(ApiError::BadRequest(
            "attachments: give every attachment as upload_id or every one as content_base64, not a mix"
                .into(),
        ));
    }
    // Whether the base64 attachments make a streamed document: then they are spooled
    // to files as they are decoded, never held whole.
    let base64_total = req
        .attachments
        .iter()
        .filter(|a| a.upload_id.is_none())
        .map(|a| crate::intake::decoded_len(a.content_base64.as_bytes()))
        .fold(0, u64::saturating_add);
    let spool_base64_attachments = base64_total > lienthong_proto::document::STREAMED_THRESHOLD;
    let mut inline = Vec::with_capacity(req.attachments.len());
    let mut infos = Vec::with_capacity(req.attachments.len());
    let mut uploads = Vec::new();
    for (index, attachment) in req.attachments.iter_mut().enumerate() {
        let media_type = attachment
            .media_type
            .clone()
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| guess_media_type(&attachment.name).to_owned());
        if attachment.upload_id.is_none() && spool_base64_attachments {
            // The text goes as soon as it is decoded: one copy at a time.
            let text = std::mem::take(&mut attachment.content_base64);
            let id = (store.spool)(index, text.as_bytes())?;
            drop(text);
            attachment.upload_id = Some(id);
        }
        if let Some(upload_id) = &attachment.upload_id {
            let found = (store.upload)(upload_id)?.ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "attachments[{index}].upload_id: no upload {} at this agent (POST /v1/uploads first)",
                    lienthong_proto::agency::printable(upload_id)
                ))
            })?;
            infos.push(pb::AttachmentInfo {
                name: attachment.name.clone(),
                media_type,
                size: found.size,
                sha256: found.sha256.clone(),
            });
            uploads.push((upload_id.clone(), found));
            continue;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(attachment.content_base64.as_bytes())
            .map_err(|e| {
                ApiError::BadRequest(format!(
                    "attachments[{index}].content_base64: not valid standard base64 ({e})"
                ))
            })?;
        infos.push(describe_attachment(&attachment.name, &media_type, &bytes));
        inline.push(Bytes::from(bytes));
    }
    let total: u64 = infos.iter().map(|a| a.size).fold(0, u64::saturating_add);
    if total > ctx.max_document_bytes {
        return Err(too_large(total, ctx.max_document_bytes));
    }
    let streamed = total > lienthong_proto::document::STREAMED_THRESHOLD;
    let issue_date = req
        .issue_date
        .clone()
        .filter(|d| !d.is_empty())
        .unwrap_or(ctx.today);
    let notation = req.notation.clone().unwrap_or_default();
    let given_number = req.number.clone().filter(|n| !n.trim().is_empty());
    let mut header = pb::DocumentHeader {
        message_id: ctx.message_id,
        sender: ctx.sender.to_owned(),
        recipients,
        business_id: String::new(),
        number: given_number.clone().unwrap_or_else(|| "0".into()),
        notation,
        document_type: req.document_type.unwrap_or_default(),
        document_type_name: req.document_type_name.unwrap_or_default(),
        subject: req.subject,
        content: req.content.unwrap_or_default(),
        issue_place: req.issue_place.unwrap_or_default(),
        issue_date,
        signer: req.signer.map(|s| pb::SignerInfo {
            competence: s.competence,
            position: s.position,
            full_name: s.full_name,
        }),
        priority: req.priority.unwrap_or(0),
        steering_type: req.steering_type.unwrap_or(0),
        due_date: req.due_date.unwrap_or_default(),
        business_type: i32::try_from(business_type).unwrap_or(i32::MAX),
        refers_to,
        created_at_ms: ctx.created_at_ms,
        expires_at_ms: req.expires_at_ms.unwrap_or(0),
        attachments: infos,
        to_places: req.to_places.unwrap_or_default(),
        sender_name: req.sender_name.unwrap_or_default(),
        kind: pb::DocumentKind::Document as i32,
        status: None,
        business_reason: req.business_reason.unwrap_or_default(),
        removed_recipients,
        refers_to_business_id,
    };
    set_business_id(&mut header);
    // Check every rule before a number is taken from the counter, so that bad requests
    // leave no gaps in the numbering.
    lienthong_proto::document::validate_header(&header).map_err(protocol_error)?;
    Ok(Draft {
        header,
        given_number: given_number.is_some(),
        inline,
        uploads,
        streamed,
    })
}

fn set_business_id(h: &mut pb::DocumentHeader) {
    h.business_id = business_id(&h.sender, &h.issue_date, &h.number, &h.notation);
}

fn too_large(size: u64, limit: u64) -> ApiError {
    ApiError::Rejected(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the document is {size} bytes; this agent accepts at most {limit} (max_document_bytes)"
        ),
    )
}

/// `GET /v1/limits`.
async fn limits(State(agent): State<Arc<Agent>>) -> Json<Limits> {
    Json(Limits {
        max_document_bytes: agent.max_document_bytes,
    })
}

/// `POST /v1/uploads`: the raw file as the body, written to disk as it arrives (never
/// held whole), hashed as it passes, synced before the answer. A body declared or
/// found larger than `max_document_bytes` is refused before (or as soon as) it
/// exceeds the limit, and nothing of it is kept; so is one that would take the bytes
/// waiting for the broker plus unused uploads over `max_outbox_bytes` (`429`). A
/// refusal drains what the client still sends (bounded) so that it sees the answer.
async fn upload(
    State(agent): State<Arc<Agent>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<UploadResponse>), ApiError> {
    use futures_util::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    let limit = agent.max_document_bytes;
    let declared = crate::intake::declared_length(&headers);
    let mut stream = body.into_data_stream();
    let room = match outbox_room(&agent).await {
        Ok(room) => room,
        Err(e) => {
            crate::intake::drain(&mut stream).await;
            return Err(e);
        }
    };
    if let Some(declared) = declared {
        let refusal = if declared > limit {
            Some(too_large(declared, limit))
        } else if declared > room.free {
            Some(outbox_full(&room, declared))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            let drained = crate::intake::drain(&mut stream).await;
            debug!(agency = %agent.agency, declared, drained, "upload refused from its declared length");
            return Err(refusal);
        }
    }
    let id = uuid::Uuid::now_v7().to_string();
    let part = agent.files.uploads().join(format!("{id}.part"));
    let io_failure = |e: std::io::Error| {
        error!(error = %e, "cannot write an upload");
        ApiError::Internal
    };
    let mut file = match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .await
    {
        Ok(file) => file,
        Err(e) => {
            crate::intake::drain(&mut stream).await;
            return Err(io_failure(e));
        }
    };
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size: u64 = 0;
    let outcome: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::BadRequest(format!("the upload body could not be read: {e}"))
            })?;
            size = size.saturating_add(chunk.len() as u64);
            if size > limit {
                crate::intake::drain(&mut stream).await;
                return Err(too_large(size, limit));
            }
            if size > room.free {
                crate::intake::drain(&mut stream).await;
                return Err(outbox_full(&room, size));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_failure)?;
        }
        file.sync_data().await.map_err(io_failure)
    }
    .await;
    drop(file);
    if let Err(e) = outcome {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    let sha256 = hasher.finish().as_ref().to_vec();
    let finishing = Arc::clone(&agent);
    let (id_done, sha) = (id.clone(), sha256.clone());
    tokio::task::spawn_blocking(move || finishing.files.finish_upload(&id_done, size, &sha))
        .await
        .map_err(|e| {
            error!(error = %e, "finishing an upload failed");
            ApiError::Internal
        })?
        .map_err(internal("cannot finish an upload"))?;
    debug!(agency = %agent.agency, upload = %id, size, "upload stored");
    Ok((
        StatusCode::CREATED,
        Json(UploadResponse {
            upload_id: id,
            size,
            sha256: hex::encode(sha256),
        }),
    ))
}

/// What the outbox byte limit leaves for a new upload: the bytes waiting for the
/// broker and the unused uploads (and `.part` files) both count against it.
struct OutboxRoom {
    pending: u64,
    uploads: u64,
    free: u64,
    limit: u64,
}

async fn outbox_room(agent: &Arc<Agent>) -> Result<OutboxRoom, ApiError> {
    let reading = Arc::clone(agent);
    let (pending, uploads) = tokio::task::spawn_blocking(move || {
        let (_, pending) = reading.store.outbox_pending()?;
        let (uploads, _) = reading.files.spool_bytes();
        Ok::<_, StoreError>((pending, uploads))
    })
    .await
    .map_err(|e| {
        error!(error = %e, "reading the outbox failed");
        ApiError::Internal
    })?
    .map_err(internal("cannot read the outbox"))?;
    let used = pending.saturating_add(uploads);
    Ok(OutboxRoom {
        pending,
        uploads,
        free: agent.max_outbox_bytes.saturating_sub(used),
        limit: agent.max_outbox_bytes,
    })
}

fn outbox_full(room: &OutboxRoom, size: u64) -> ApiError {
    ApiError::Rejected(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "the outbox holds {} bytes not yet accepted by the broker and {} bytes of uploads \
             not yet sent; this upload of {size} bytes would exceed the limit of {} \
             (max_outbox_bytes); send the uploads or retry when the broker is reachable again",
            room.pending, room.uploads, room.limit
        ),
    )
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(v)| v).map_err(|rejection| {
        let status = rejection.status();
        let text = rejection.body_text();
        ApiError::Rejected(
            if status == StatusCode::PAYLOAD_TOO_LARGE
                || status == StatusCode::UNSUPPORTED_MEDIA_TYPE
            {
                status
            } else {
                StatusCode::BAD_REQUEST
            },
            text,
        )
    })
}

/// `POST /v1/inbox/{id}/status`: a business status for a received document.
async fn report_status(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    body: Result<Json<crate::api_types::ReportRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<SendResponse>), ApiError> {
    let req = json_body(body)?;
    let sent =
        crate::business::report(&agent, &id, req.status.trim(), req.reason, req.staff).await?;
    Ok((StatusCode::ACCEPTED, Json(sent)))
}

/// `POST /v1/documents/{id}/recall`: recall a document this agency sent (status 13,
/// business type 1), addressed to all its recipients.
async fn recall_document(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    body: Result<Json<crate::api_types::RecallRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<SendResponse>), ApiError> {
    let req = json_body(body)?;
    check_id(&id)?;
    if req.reason.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "reason: a recall needs a reason".into(),
        ));
    }
    let original = agent
        .store
        .outbox_record(&id)
        .map_err(internal("cannot read the outbox"))?
        .ok_or_else(|| ApiError::NotFound(format!("document {id} was not sent by this agency")))?;
    let request = recall_request(id, &original.business_id, req.reason);
    let sent = accept_send_request(&agent, request).await?;
    Ok((StatusCode::ACCEPTED, Json(sent)))
}

/// The send request a recall of document `id` (sent under `business_id`) makes: status
/// 13, business type 1, addressed to all the original's recipients.
pub(crate) fn recall_request(id: String, business_id: &str, reason: String) -> SendRequest {
    SendRequest {
        to: Vec::new(),
        subject: format!("Thu hồi văn bản {business_id}")
            .chars()
            .take(500)
            .collect(),
        business_type: Some(pb::BusinessType::Recall as u32),
        refers_to: Some(id),
        business_reason: Some(reason),
        ..SendRequest::default()
    }
}

/// `GET /v1/directory`: the agencies registered at the broker, for picking recipients.
async fn directory(
    State(agent): State<Arc<Agent>>,
) -> Result<Json<Vec<crate::api_types::DirectoryEntry>>, ApiError> {
    let mut client = agent.client();
    let answer = tokio::time::timeout(STATUS_TIMEOUT, client.directory(pb::DirectoryRequest {}))
        .await
        .map_err(|_| {
            ApiError::Rejected(
                StatusCode::SERVICE_UNAVAILABLE,
                "the broker did not answer in time; try again".into(),
            )
        })?
        .map_err(|status| {
            ApiError::Rejected(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the broker cannot give the directory now: {}",
                    status.message()
                ),
            )
        })?;
    Ok(Json(
        answer
            .into_inner()
            .agencies
            .into_iter()
            .map(|a| crate::api_types::DirectoryEntry {
                code: a.code,
                name: a.name,
                parent: a.parent,
                suspended: a.suspended,
            })
            .collect(),
    ))
}

#[derive(Debug, serde::Deserialize)]
struct CountQuery {
    above: Option<u64>,
    wait_ms: Option<u64>,
}

/// `GET /v1/inbox/count`, optionally waiting until it exceeds `above`.
async fn inbox_count(
    State(agent): State<Arc<Agent>>,
    axum::extract::Query(query): axum::extract::Query<CountQuery>,
) -> Json<crate::api_types::InboxCount> {
    let mut watch = agent.inbox_count.subscribe();
    if let Some(above) = query.above {
        let wait = Duration::from_millis(query.wait_ms.unwrap_or(0).min(30_000));
        let _ = tokio::time::timeout(wait, watch.wait_for(|n| *n > above)).await;
    }
    let count = *watch.borrow();
    Json(crate::api_types::InboxCount { count })
}

/// Reads a request body of at most `api_max_body_bytes` (within the agent's body
/// budget). A larger body is refused with `413` naming the limit and `advice`; the
/// budget permit is held by the caller until the request is answered (the parsed
/// request is about as large).
async fn read_body(
    agent: &Agent,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    advice: &str,
) -> Result<(Bytes, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let limit = agent.api_max_body_bytes;
    crate::intake::read_capped(headers, body, limit, &agent.body_budget, |size| {
        ApiError::Rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is {size} bytes or more; this agent reads at most {limit} \
                 (api_max_body_bytes); {advice}"
            ),
        )
    })
    .await
}

/// `POST /v1/documents`: the body is read up to `api_max_body_bytes` (refused with
/// `413` naming the limit and pointing to `/v1/uploads` for larger files). With an
/// `Idempotency-Key`, a retry gets the first answer (see [`idempotency`]).
async fn send_document(
    State(agent): State<Arc<Agent>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let (body, _permit) = read_body(
        &agent,
        &headers,
        body,
        "send larger files with POST /v1/uploads and refer to them by upload_id",
    )
    .await?;
    let claim = match idempotency::begin(&agent, &headers, "POST /v1/documents", &body)? {
        idempotency::Begin::Replay(answer) => return Ok(answer),
        idempotency::Begin::Run(claim) => claim,
    };
    let req: SendRequest = crate::intake::json(&headers, &body)?;
    // The request holds what it needs: the body's copy goes before the work.
    drop(body);
    let tag = claim.as_ref().map(idempotency::Claim::tag);
    let (sent, kept) = accept_send_request_keyed(&agent, req, tag).await?;
    if kept {
        // Kept by the sealer with the document, durable before this answer.
        return Ok(idempotency::answer(claim, StatusCode::ACCEPTED, &sent));
    }
    Ok(idempotency::finish(claim, StatusCode::ACCEPTED, &sent).await)
}

/// Prepares a document (header, seal, outbox), makes it durable and hands it to the
/// submitter: what `POST /v1/documents` does after reading its body, shared with the
/// edXML import and the drop folder.
pub(crate) async fn accept_send_request(
    agent: &Arc<Agent>,
    req: SendRequest,
) -> Result<SendResponse, ApiError> {
    accept_send_request_keyed(agent, req, None)
        .await
        .map(|(sent, _)| sent)
}

/// [`accept_send_request`] for a request that came with an `Idempotency-Key`: the
/// sealer keeps the answer under it in the document's own group write and sync. The
/// flag says whether it did (else the caller keeps it, see `idempotency::finish`).
pub(crate) async fn accept_send_request_keyed(
    agent: &Arc<Agent>,
    req: SendRequest,
    tag: Option<crate::sealer::IdempotencyTag>,
) -> Result<(SendResponse, bool), ApiError> {
    accept_send_requests_tagged(agent, vec![(req, tag)])
        .await
        .pop()
        .unwrap_or(Err(ApiError::Internal))
}

/// [`accept_send_request`] for many requests at once, answered in order: drafted
/// together (one blocking-pool hop at most), sealed as one group of the sealer (one
/// batch signature, one store write, one `durable()`), each with its own outcome.
pub(crate) async fn accept_send_requests(
    agent: &Arc<Agent>,
    requests: Vec<SendRequest>,
) -> Vec<Result<SendResponse, ApiError>> {
    accept_send_requests_tagged(agent, requests.into_iter().map(|r| (r, None)).collect())
        .await
        .into_iter()
        .map(|r| r.map(|(sent, _)| sent))
        .collect()
}

async fn accept_send_requests_tagged(
    agent: &Arc<Agent>,
    requests: Vec<(SendRequest, Option<crate::sealer::IdempotencyTag>)>,
) -> Vec<Result<(SendResponse, bool), ApiError>> {
    let count = requests.len();
    let drafted: Vec<Result<Job, ApiError>>;
    let mut spooled = Vec::new();
    if drafts_inline(requests.iter().map(|(req, _)| req)) {
        // No file is touched: spooling happens only above the streaming threshold.
        drafted = requests
            .into_iter()
            .map(|(req, tag)| tagged(draft_job(agent, req, &mut spooled), tag))
            .collect();
    } else {
        let drafting = Arc::clone(agent);
        match tokio::task::spawn_blocking(move || {
            let mut spooled = Vec::new();
            let drafted: Vec<_> = requests
                .into_iter()
                .map(|(req, tag)| tagged(draft_job(&drafting, req, &mut spooled), tag))
                .collect();
            (drafted, spooled)
        })
        .await
        {
            Ok((done, files)) => {
                drafted = done;
                spooled = files;
            }
            Err(e) => {
                error!(error = %e, "drafting documents failed");
                return (0..count).map(|_| Err(ApiError::Internal)).collect();
            }
        }
    }
    // Sealed (numbered, signed, stored, durable) as one group, answers in order.
    let mut results: Vec<Option<Result<(SendResponse, bool), ApiError>>> =
        Vec::with_capacity(count);
    let mut jobs = Vec::with_capacity(count);
    for draft in drafted {
        match draft {
            Ok(job) => {
                jobs.push(job);
                results.push(None);
            }
            Err(e) => {
                if let ApiError::BadRequest(reason) = &e {
                    debug!(agency = %agent.agency, reason = %reason, "document refused");
                }
                results.push(Some(Err(e)));
            }
        }
    }
    let mut sealed = if jobs.is_empty() {
        Vec::new()
    } else {
        crate::sealer::seal(agent, jobs).await
    }
    .into_iter();
    let results = results
        .into_iter()
        .map(|slot| match slot {
            Some(refused) => refused,
            None => match sealed.next() {
                Some(Ok(done)) => {
                    agent.metrics.outbox_added();
                    debug!(
                        agency = %agent.agency,
                        message_id = %done.message_id,
                        business_id = %done.business_id,
                        "document accepted into the outbox"
                    );
                    Ok((
                        SendResponse {
                            message_id: done.message_id,
                            business_id: done.business_id,
                        },
                        done.answer_kept,
                    ))
                }
                Some(Err(e)) => Err(e),
                None => Err(ApiError::Internal),
            },
        })
        .collect();
    // Taken into the outbox (streamed), read inline, or refused: no longer needed.
    if !spooled.is_empty() {
        let removing = Arc::clone(agent);
        let _ = tokio::task::spawn_blocking(move || {
            for id in &spooled {
                removing.files.remove_upload(id);
            }
        })
        .await;
    }
    results
}

/// `POST /v1/documents/batch`: `{"documents": [...]}`, each item the body
/// `POST /v1/documents` takes, at most [`MAX_BATCH_DOCUMENTS`] of them within the body
/// cap. Answers `200` with `{"results": [...]}` in order, once every accepted document
/// is durable in the outbox: each result is `202` with the message id, or the status
/// and error the single route would have answered for that item.
async fn send_documents_batch(
    State(agent): State<Arc<Agent>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let (body, _permit) = read_body(
        &agent,
        &headers,
        body,
        "split the batch, or send larger files with POST /v1/uploads and refer to them by \
         upload_id",
    )
    .await?;
    let claim = match idempotency::begin(&agent, &headers, "POST /v1/documents/batch", &body)? {
        idempotency::Begin::Replay(answer) => return Ok(answer),
        idempotency::Begin::Run(claim) => claim,
    };
    let batch: SendBatchRequest = crate::intake::json(&headers, &body)?;
    drop(body);
    let count = batch.documents.len();
    if count > MAX_BATCH_DOCUMENTS {
        return Err(ApiError::Rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "documents: {count} documents in one call; this agent takes at most \
                 {MAX_BATCH_DOCUMENTS} per call; split the batch (nothing was accepted)"
            ),
        ));
    }
    if count == 0 {
        return Err(ApiError::BadRequest(
            "documents: give at least one document".into(),
        ));
    }
    // Each item is read on its own, so one malformed item fails only itself.
    let mut parsed: Vec<Option<ApiError>> = Vec::with_capacity(count);
    let mut requests = Vec::with_capacity(count);
    for item in batch.documents {
        match crate::intake::json_value::<SendRequest>(item) {
            Ok(req) => {
                requests.push(req);
                parsed.push(None);
            }
            Err(e) => parsed.push(Some(e)),
        }
    }
    let mut accepted = accept_send_requests(&agent, requests).await.into_iter();
    let mut ok = 0usize;
    let results: Vec<SendBatchResult> = parsed
        .into_iter()
        .map(|refused| {
            let outcome = match refused {
                Some(e) => Err(e),
                None => accepted.next().unwrap_or(Err(ApiError::Internal)),
            };
            match outcome {
                Ok(sent) => {
                    ok = ok.saturating_add(1);
                    SendBatchResult {
                        status: StatusCode::ACCEPTED.as_u16(),
                        message_id: Some(sent.message_id),
                        business_id: Some(sent.business_id),
                        error: None,
                    }
                }
                Err(e) => {
                    let (status, error) = e.status_and_message();
                    SendBatchResult {
                        status: status.as_u16(),
                        message_id: None,
                        business_id: None,
                        error: Some(error),
                    }
                }
            }
        })
        .collect();
    info!(
        agency = %agent.agency,
        documents = count,
        accepted = ok,
        refused = count.saturating_sub(ok),
        "batch of documents accepted into the outbox"
    );
    Ok(idempotency::finish(claim, StatusCode::OK, &SendBatchResponse { results }).await)
}

pub(crate) fn check_id(id: &str) -> Result<(), ApiError> {
    if is_valid_message_id(id) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(
            "message id: must be a lowercase hyphenated UUID".into(),
        ))
    }
}

/// What the broker says about a document, checked against our own header digest.
struct Live {
    recipients: Vec<RecipientView>,
    submission_receipt: Option<pb::Signed>,
}

async fn live_status(agent: &Agent, id: &str, header_sha256: &[u8]) -> Option<Live> {
    let mut client = agent.client();
    let request = pb::StatusRequest {
        message_id: id.to_owned(),
    };
    let response = match tokio::time::timeout(STATUS_TIMEOUT, client.status(request)).await {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
            debug!(agency = %agent.agency, message_id = %id, "the broker does not know the document");
            return None;
        }
        Ok(Err(status)) => {
            warn!(agency = %agent.agency, message_id = %id, code = ?status.code(), reason = %status.message(), "broker status query failed");
            return None;
        }
        Err(_) => {
            warn!(agency = %agent.agency, message_id = %id, "broker status query timed out");
            return None;
        }
    };
    let recipients = response
        .recipients
        .iter()
        .map(|r| {
            let state = match pb::DeliveryState::try_from(r.state) {
                Ok(pb::DeliveryState::Queued) => "queued",
                Ok(pb::DeliveryState::Delivered) => "delivered",
                Ok(pb::DeliveryState::Refused) => "refused",
                Ok(pb::DeliveryState::Expired) => "expired",
                Ok(pb::DeliveryState::Recalled) => "recalled",
                _ => "unknown",
            };
            let mut receipt_at_ms = None;
            let (receipt_verified, receipt_at) = match &r.delivery_receipt {
                None => (None, None),
                Some(receipt) => {
                    let expected = ExpectedReceipt {
                        kind: pb::ReceiptKind::Delivery,
                        message_id: id,
                        header_sha256,
                        recipient: Some(&r.agency),
                        live: false,
                    };
                    match verify_receipt(receipt, &agent.document_anchors, &expected) {
                        Ok(verified) => {
                            receipt_at_ms = Some(verified.at_ms);
                            (Some(true), rfc3339_ms(verified.at_ms))
                        }
                        Err(e) => {
                            warn!(
                                agency = %agent.agency,
                                message_id = %id,
                                recipient = %lienthong_proto::agency::printable(&r.agency),
                                error = %e,
                                "delivery receipt does not verify"
                            );
                            (Some(false), None)
                        }
                    }
                }
            };
            // A dead letter comes with the broker's signed notice saying why.
            let notice_verified = r.notice.as_ref().map(|notice| {
                let expected = ExpectedReceipt {
                    kind: pb::ReceiptKind::DeadLetter,
                    message_id: id,
                    header_sha256,
                    recipient: Some(&r.agency),
                    live: false,
                };
                verify_receipt(notice, &agent.tls_anchors, &expected)
                    .map_err(|e| {
                        warn!(agency = %agent.agency, message_id = %id, error = %e, "dead-letter notice does not verify");
                    })
                    .is_ok()
            });
            RecipientView {
                agency: r.agency.clone(),
                state: state.to_owned(),
                attempts: r.attempts,
                delivered_at: (r.delivered_at_ms > 0)
                    .then(|| rfc3339_ms(r.delivered_at_ms))
                    .flatten(),
                reason: (!r.reason.is_empty()).then(|| r.reason.clone()),
                receipt_verified,
                receipt_at,
                notice_verified,
                expires_at: (r.expires_at_ms > 0).then(|| rfc3339_ms(r.expires_at_ms)).flatten(),
                attempt_log: r
                    .attempt_log
                    .iter()
                    .map(|a| AttemptView {
                        at: rfc3339_ms(a.at_ms).unwrap_or_default(),
                        outcome: a.outcome.clone(),
                    })
                    .collect(),
                receipt_at_ms,
                ..RecipientView::default()
            }
        })
        .collect();
    Some(Live {
        recipients,
        submission_receipt: response.submission_receipt,
    })
}

fn recipients_in_state(recipients: &[String], state: &str) -> Vec<RecipientView> {
    recipients
        .iter()
        .map(|agency| RecipientView {
            agency: agency.clone(),
            state: state.to_owned(),
            attempts: 0,
            delivered_at: None,
            reason: None,
            receipt_verified: None,
            receipt_at: None,
            notice_verified: None,
            expires_at: None,
            attempt_log: Vec::new(),
            ..RecipientView::default()
        })
        .collect()
}

/// Checks a submission receipt; returns whether it verified and the time it states.
fn check_submission_receipt(
    agent: &Agent,
    receipt: &pb::Signed,
    id: &str,
    header_sha256: &[u8],
) -> (bool, Option<String>) {
    let expected = ExpectedReceipt {
        kind: pb::ReceiptKind::Submission,
        message_id: id,
        header_sha256,
        recipient: None,
        live: false,
    };
    match verify_receipt(receipt, &agent.tls_anchors, &expected) {
        Ok(verified) => (true, rfc3339_ms(verified.at_ms)),
        Err(e) => {
            debug!(agency = %agent.agency, message_id = %id, error = %e, "submission receipt does not verify");
            (false, None)
        }
    }
}

fn decode_stored(id: &str, what: &'static str, bytes: &[u8]) -> Result<pb::Signed, ApiError> {
    pb::Signed::decode(bytes).map_err(|e| {
        error!(message_id = %id, error = %e, "stored {what} is unreadable");
        ApiError::Internal
    })
}

async fn document_status(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<StatusView>, ApiError> {
    check_id(&id)?;
    let store = &agent.store;
    if let Some(record) = store
        .outbox_record(&id)
        .map_err(internal("cannot read the outbox"))?
    {
        let sha = hex::decode(&record.header_sha256).unwrap_or_default();
        let receipt = store
            .submission_receipt(&id)
            .map_err(internal("cannot read receipts"))?
            .map(|bytes| decode_stored(&id, "submission receipt", &bytes))
            .transpose()?;
        let (verified, receipt_at) = match &receipt {
            Some(receipt) => check_submission_receipt(&agent, receipt, &id, &sha),
            None => (false, None),
        };
        let submitted_at = receipt_at.or_else(|| record.submitted_at_ms.and_then(rfc3339_ms));
        let recipients = match record.state {
            OutboxState::Submitted => match live_status(&agent, &id, &sha).await {
                Some(live) => live.recipients,
                None => recipients_in_state(&record.recipients, "unknown"),
            },
            OutboxState::Outbox => recipients_in_state(&record.recipients, "queued"),
            OutboxState::Failed => recipients_in_state(&record.recipients, "unknown"),
        };
        let mut recipients = recipients;
        let reading = Arc::clone(&agent);
        let about = id.clone();
        let recipients = tokio::task::spawn_blocking(move || {
            crate::business::fill_history(&reading, &about, &mut recipients);
            recipients
        })
        .await
        .map_err(|e| {
            error!(error = %e, "reading the business history failed");
            ApiError::Internal
        })?;
        return Ok(Json(StatusView {
            message_id: record.message_id,
            business_id: record.business_id,
            sender: agent.agency.to_string(),
            outbox_state: record.state.as_str().to_owned(),
            failure_reason: record.failure_reason,
            submitted_at,
            submission_receipt_verified: verified,
            recipients,
        }));
    }
    if let Some(record) = store
        .inbox_record(&id)
        .map_err(internal("cannot read the inbox"))?
    {
        let sha = hex::decode(&record.header_sha256).unwrap_or_default();
        let (recipients, verified, submitted_at) = match live_status(&agent, &id, &sha).await {
            Some(live) => {
                let (verified, at) = match &live.submission_receipt {
                    Some(receipt) => check_submission_receipt(&agent, receipt, &id, &sha),
                    None => (false, None),
                };
                (live.recipients, verified, at)
            }
            None => (
                recipients_in_state(&[agent.agency.to_string()], "delivered"),
                false,
                None,
            ),
        };
        return Ok(Json(StatusView {
            message_id: record.message_id,
            business_id: record.business_id,
            sender: record.sender,
            outbox_state: "received".into(),
            failure_reason: None,
            submitted_at,
            submission_receipt_verified: verified,
            recipients,
        }));
    }
    Err(ApiError::NotFound(format!(
        "message {id} is unknown to this agent"
    )))
}

fn inbox_item(agent: &Agent, record: &crate::store::InboxRecord) -> InboxItem {
    InboxItem {
        message_id: record.message_id.clone(),
        sender: record.sender.clone(),
        subject: record.subject.clone(),
        business_id: record.business_id.clone(),
        received_at: rfc3339_ms(record.received_at_ms).unwrap_or_default(),
        // Empty when the agent exports to no inbox folder.
        path: crate::business::folder_of(agent, record)
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        attachments: record.attachments.clone(),
        business_type: match pb::BusinessType::try_from(record.business_type) {
            Ok(pb::BusinessType::Recall) => "recall",
            Ok(pb::BusinessType::Update) => "update",
            Ok(pb::BusinessType::Replace) => "replace",
            _ => "new",
        }
        .to_owned(),
        refers_to: record.refers_to.clone(),
        recalled_by: record.recalled_by.clone(),
        superseded_by: record.superseded_by.clone(),
        removed_by: record.removed_by.clone(),
    }
}

async fn inbox_document(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Json<InboxDetail>, ApiError> {
    check_id(&id)?;
    let not_found = || ApiError::NotFound(format!("message {id} is not in this agent's inbox"));
    let record = agent
        .store
        .inbox_record(&id)
        .map_err(internal("cannot read the inbox"))?
        .ok_or_else(not_found)?;
    let envelope_bytes = agent
        .store
        .inbox_envelope(&id)
        .map_err(internal("cannot read the inbox"))?
        .ok_or_else(not_found)?;
    let envelope = decode_stored(&id, "envelope", &envelope_bytes)?;
    // Verified before it was stored; decoded here only to describe it.
    let header = pb::DocumentHeader::decode(envelope.payload.as_ref()).map_err(|e| {
        error!(message_id = %id, error = %e, "stored header is unreadable");
        ApiError::Internal
    })?;
    let sha = lienthong_proto::sha256(&envelope.payload);
    Ok(Json(InboxDetail {
        item: inbox_item(&agent, &record),
        document: document_json(&header, &sha, record.received_at_ms),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(guess_media_type("QD.PDF"), "application/pdf");
        assert_eq!(guess_media_type("a.b.docx"), guess_media_type("x.docx"));
        assert_eq!(guess_media_type("noext"), "application/octet-stream");
        assert_eq!(guess_media_type("a.jpg"), "image/jpeg");
    }

    /// Each documented request schema names exactly the fields of its Rust type, and
    /// every required one exists there (the types deny unknown fields, so a documented
    /// field missing in Rust would be refused).
    #[test]
    fn openapi_request_schemas_match_the_rust_types() {
        use crate::api_types::{
            AttachmentUpload, RecallRequest, ReportRequest, SendBatchRequest, SignerJson,
        };
        let value: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let schemas = &value["components"]["schemas"];
        let types: Vec<(&str, serde_json::Value)> = vec![
            (
                "SendRequest",
                serde_json::to_value(SendRequest::default()).unwrap(),
            ),
            (
                "Signer",
                serde_json::to_value(SignerJson::default()).unwrap(),
            ),
            (
                "Attachment",
                serde_json::to_value(AttachmentUpload::default()).unwrap(),
            ),
            (
                "ReportRequest",
                serde_json::to_value(ReportRequest::default()).unwrap(),
            ),
            (
                "RecallRequest",
                serde_json::to_value(RecallRequest::default()).unwrap(),
            ),
            (
                "SendBatchRequest",
                serde_json::to_value(SendBatchRequest::default()).unwrap(),
            ),
        ];
        for (name, rust) in types {
            let schema = &schemas[name];
            let rust: std::collections::BTreeSet<&str> = rust
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            let documented: std::collections::BTreeSet<&str> = schema["properties"]
                .as_object()
                .unwrap_or_else(|| panic!("{name} has no properties"))
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(documented, rust, "{name}: documented vs Rust fields");
            for required in schema["required"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap();
                assert!(rust.contains(required), "{name}.{required} is not in Rust");
            }
            assert_eq!(
                schema["additionalProperties"],
                serde_json::Value::Bool(false),
                "{name}: unknown fields are refused"
            );
        }
        // Uploads need no base64.
        let attachment_required = &schemas["Attachment"]["required"];
        assert_eq!(attachment_required, &serde_json::json!(["name"]));
        // The inbox detail describes its document.
        assert!(schemas["Document"]["properties"]["subject"].is_object());
    }

    /// The documented paths and methods are exactly the routes the guard serves (a
    /// route missing from `api_guard::ROUTES` is refused, so that table is what the
    /// router serves; the live check is in tests/tests/gateway_openapi.rs).
    #[test]
    fn openapi_paths_are_the_guarded_routes() {
        let value: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in value["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let routed: std::collections::BTreeSet<(String, String)> = crate::api_guard::ROUTES
            .iter()
            .map(|r| (r.method.to_owned(), r.path.to_owned()))
            .collect();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let missing: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty(),
            "routes not in openapi.json: {undocumented:?}"
        );
        assert!(missing.is_empty(), "documented but not routed: {missing:?}");
    }

    #[test]
    fn openapi_is_json() {
        let value: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(value["openapi"], "3.0.3");
        assert!(value["paths"]["/v1/documents"]["post"].is_object());
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert!(value["paths"][path]["get"].is_object(), "{path}");
        }
    }
}
