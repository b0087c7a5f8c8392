//! edXML (QCVN 102:2016) over the local API, for document-management systems that speak
//! it: `POST /v1/edxml` imports a package (a document to send, or a status message
//! about a received document), `GET /v1/inbox/{id}/edxml` exports a received document
//! or status report as a package.
//!
//! Invariants:
//! - An imported document takes exactly the path of `POST /v1/documents`
//!   ([`crate::api::accept_send_request`]): same rules, same signing, `202` only once it
//!   is durable in the outbox. A status message takes the path of a business status
//!   report ([`crate::business::report`]).
//! - A package is refused (`400`) when it breaks an edXML rule, naming the edXML path
//!   and the rule ([`lienthong_edxml::EdxmlError`]); when it is not from this agency
//!   (`MessageHeader/From/OrganId`, `Status/From/OrganId`); or when what it refers to
//!   is not known here. Nothing of a refused package is stored.
//! - An export reproduces the signed header's fields and the attachments byte for byte:
//!   attachments read from the inbox folder are checked against the header's digests.
//! - Package contents are never logged; refusals log the reason (a path and a rule,
//!   with values shortened by the edXML crate).
//! - Nothing accepted is dropped silently: the `202` answer (and the drop folder's
//!   `sent/NAME.edxml.json`) adds to the message and business id an `edxml` object
//!   naming every field accepted but not carried (`not_carried`, paths and reasons,
//!   see [`lienthong_edxml::FieldNote`]) and, for a document, the steering type as
//!   read (`0 (not stated)` included); the paths are logged too.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use lienthong_edxml::{
    AttachmentBytes, EdxmlDocument, EdxmlMessage, EdxmlStatus, FieldNote, ResponseFor, StaffInfo,
};
use lienthong_proto::agency::printable;
use lienthong_proto::document::is_valid_message_id;
use lienthong_proto::pb;
use prost::Message as _;
use tracing::{error, info};

use crate::Agent;
use crate::api::ApiError;
use crate::api_types::{AttachmentUpload, SendRequest, SendResponse, SignerJson};
use crate::error::StoreError;

/// Media type of an edXML package.
pub(crate) const EDXML_MEDIA_TYPE: &str = "application/xml";

/// The bounds a package must respect: the edXML crate's defaults, with the whole
/// package capped at the agent's `api_max_body_bytes` (the memory an import takes is
/// a small multiple of the package).
pub(crate) fn package_limits(agent: &Agent) -> lienthong_edxml::Limits {
    let cap = usize::try_from(agent.api_max_body_bytes).unwrap_or(usize::MAX);
    let defaults = lienthong_edxml::Limits::default();
    lienthong_edxml::Limits {
        max_package_bytes: defaults.max_package_bytes.min(cap),
        ..defaults
    }
}

/// The refusal of a package over the limit, naming it.
pub(crate) fn package_too_large(size: u64, limit: usize) -> ApiError {
    ApiError::Rejected(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the edXML package is {size} bytes or more; this agent reads at most {limit} \
             (api_max_body_bytes); send larger files with POST /v1/uploads and \
             POST /v1/documents"
        ),
    )
}

/// The edXML routes, merged into the API's router. The import reads its body itself,
/// up to [`package_limits`].
pub(crate) fn routes() -> Router<Arc<Agent>> {
    Router::new()
        .route("/v1/edxml", post(import).layer(DefaultBodyLimit::disable()))
        .route("/v1/inbox/{id}/edxml", get(export))
}

fn internal(context: &'static str) -> impl Fn(StoreError) -> ApiError {
    move |e| {
        error!(error = %e, "{context}");
        ApiError::Internal
    }
}

fn join_failed(e: tokio::task::JoinError) -> ApiError {
    error!(error = %e, "an edXML task failed");
    ApiError::Internal
}

/// `POST /v1/edxml`: the package is the body.
async fn import(
    State(agent): State<Arc<Agent>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<axum::response::Response, ApiError> {
    let limit = package_limits(&agent).max_package_bytes;
    let (package, _permit) = crate::intake::read_capped(
        &headers,
        body,
        u64::try_from(limit).unwrap_or(u64::MAX),
        &agent.body_budget,
        |size| package_too_large(size, limit),
    )
    .await?;
    // With an Idempotency-Key, a retry of the same package gets the first answer.
    let claim = match crate::api::idempotency::begin(&agent, &headers, "POST /v1/edxml", &package)?
    {
        crate::api::idempotency::Begin::Replay(answer) => return Ok(answer),
        crate::api::idempotency::Begin::Run(claim) => claim,
    };
    let imported = import_package(&agent, package).await?;
    Ok(crate::api::idempotency::finish(claim, StatusCode::ACCEPTED, &imported.json()).await)
}

/// What an accepted package became, and what of it was read but not carried.
#[derive(Debug, Clone)]
pub(crate) struct Imported {
    pub response: SendResponse,
    pub notes: ReadNotes,
}

/// What the import read from a package besides the request it made.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReadNotes {
    /// `Some` for a document: its `SteeringType` as read (0 when not stated).
    pub steering_type: Option<u32>,
    /// Fields accepted but not carried.
    pub not_carried: Vec<FieldNote>,
}

impl ReadNotes {
    /// The `edxml` object of the answer.
    pub(crate) fn json(&self) -> serde_json::Value {
        let not_carried: Vec<serde_json::Value> = self
            .not_carried
            .iter()
            .map(|n| serde_json::json!({ "path": n.path, "reason": n.reason }))
            .collect();
        let mut value = serde_json::json!({ "not_carried": not_carried });
        if let (Some(steering), Some(map)) = (self.steering_type, value.as_object_mut()) {
            map.insert("steering_type".into(), steering.into());
            map.insert(
                "steering_type_text".into(),
                lienthong_edxml::steering_type_text(steering).into(),
            );
        }
        value
    }
}

impl Imported {
    /// The answer: the `SendResponse` fields and `edxml` ([`ReadNotes::json`]).
    pub(crate) fn json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(&self.response).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("edxml".into(), self.notes.json());
        }
        value
    }
}

/// What a package asks for, once parsed and resolved.
pub(crate) enum Planned {
    Document(Box<SendRequest>),
    Status {
        message_id: String,
        code: String,
        reason: Option<String>,
        staff: Option<String>,
    },
}

/// Imports a package exactly like `POST /v1/edxml` (shared with the drop folder): a
/// document is signed and queued for its `To` agencies, a status message is reported to
/// the sender of the document it answers. Attachments are decoded straight into
/// upload files as the package is parsed; they are removed again whatever the outcome
/// (taken into the outbox, read inline, or refused).
pub(crate) async fn import_package(
    agent: &Arc<Agent>,
    package: Bytes,
) -> Result<Imported, ApiError> {
    let planning = Arc::clone(agent);
    let planned = tokio::task::spawn_blocking(move || {
        let mut spooled = Vec::new();
        let mut notes = ReadNotes::default();
        let planned = plan(&planning, &package, &mut spooled, &mut notes);
        // The package's copy goes before the document is prepared.
        drop(package);
        (planned, spooled, notes)
    })
    .await
    .map_err(join_failed)?;
    let (planned, spooled, notes) = planned;
    if planned.is_ok() && !notes.not_carried.is_empty() {
        let paths: Vec<&str> = notes.not_carried.iter().map(|n| n.path.as_str()).collect();
        info!(
            agency = %agent.agency,
            not_carried = %paths.join(", "),
            "edXML package accepted; fields not carried"
        );
    }
    let outcome = match planned {
        Ok(Planned::Document(request)) => crate::api::accept_send_request(agent, *request).await,
        Ok(Planned::Status {
            message_id,
            code,
            reason,
            staff,
        }) => crate::business::report(agent, &message_id, &code, reason, staff).await,
        Err(e) => {
            if let ApiError::BadRequest(reason) = &e {
                info!(agency = %agent.agency, reason = %reason, "edXML package refused");
            }
            Err(e)
        }
    };
    if !spooled.is_empty() {
        let removing = Arc::clone(agent);
        let _ = tokio::task::spawn_blocking(move || {
            for id in &spooled {
                removing.files.remove_upload(id);
            }
        })
        .await;
    }
    outcome.map(|response| Imported { response, notes })
}

/// Parses the package and resolves what it refers to; each attachment is decoded into
/// a new upload file (its id pushed to `spooled`); what was read but is not carried
/// goes to `notes`. Blocking (parsing, files, store scans).
fn plan(
    agent: &Agent,
    package: &[u8],
    spooled: &mut Vec<String>,
    notes: &mut ReadNotes,
) -> Result<Planned, ApiError> {
    let mut writers: Vec<crate::files::SpoolWriter> = Vec::new();
    let mut store_failure: Option<StoreError> = None;
    let parsed = {
        let mut sink = |index: usize, bytes: &[u8]| -> Result<(), String> {
            if writers.len() <= index {
                let writer = agent.files.spool().map_err(|e| {
                    let text = e.to_string();
                    store_failure = Some(e);
                    text
                })?;
                writers.push(writer);
            }
            let writer = writers.get_mut(index).ok_or("attachment out of order")?;
            writer.write(bytes).map_err(|e| {
                let text = e.to_string();
                store_failure = Some(e);
                text
            })
        };
        lienthong_edxml::parse_message_into(package, &package_limits(agent), &mut sink)
    };
    if let Some(e) = store_failure {
        return Err(internal("cannot spool an edXML attachment")(e));
    }
    let (message, not_carried) = parsed.map_err(|e| ApiError::BadRequest(e.to_string()))?;
    notes.not_carried = not_carried;
    if let EdxmlMessage::Document(doc) = &message {
        notes.steering_type = Some(doc.steering_type);
    }
    let mut upload_ids = Vec::with_capacity(writers.len());
    for writer in writers {
        let (id, _) = writer
            .finish()
            .map_err(internal("cannot spool an edXML attachment"))?;
        spooled.push(id.clone());
        upload_ids.push(id);
    }
    planned_from(
        &agent.agency.to_string(),
        message,
        Some(upload_ids),
        &mut |doc, business_id| sent_message_id(agent, doc, business_id),
        &mut |response_for| received_message_id(agent, response_for),
    )
}

/// [`plan`] without an agent, for [`crate::request_check`]: the package parsed whole
/// (attachments kept in memory and given to the request as base64), the store asked
/// only through `sent` and `received` as in [`planned_from`].
pub(crate) fn plan_with(
    own: &str,
    package: &[u8],
    limits: &lienthong_edxml::Limits,
    sent: &mut dyn FnMut(&EdxmlDocument, &str) -> Result<String, ApiError>,
    received: &mut dyn FnMut(&ResponseFor) -> Result<String, ApiError>,
) -> Result<Planned, ApiError> {
    let message = lienthong_edxml::parse_message(package, limits)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    planned_from(own, message, None, sent, received)
}

/// What a parsed package asks of agency `own`: the one mapping shared by [`plan`] and
/// [`plan_with`]. The store is asked only through `sent` (the message id this agency
/// sent a business id under) and `received` (the received document a `ResponseFor`
/// names). `upload_ids` are the uploads the attachments were spooled to, in order;
/// `None` when they were parsed into memory (then given as base64).
fn planned_from(
    own: &str,
    message: EdxmlMessage,
    upload_ids: Option<Vec<String>>,
    sent: &mut dyn FnMut(&EdxmlDocument, &str) -> Result<String, ApiError>,
    received: &mut dyn FnMut(&ResponseFor) -> Result<String, ApiError>,
) -> Result<Planned, ApiError> {
    match message {
        EdxmlMessage::Document(doc) => {
            if doc.sender != own {
                return Err(ApiError::BadRequest(format!(
                    "MessageHeader/From/OrganId: \"{}\" is not this agent's agency {own}; an \
                     agent sends only its own agency's documents",
                    printable(&doc.sender)
                )));
            }
            let refers_to = match doc.refers_to_business_id() {
                Some(business_id) => Some(sent(&doc, &business_id)?),
                None => None,
            };
            Ok(Planned::Document(Box::new(send_request(
                *doc, refers_to, upload_ids,
            ))))
        }
        EdxmlMessage::Status(status) => {
            if status.from != own {
                return Err(ApiError::BadRequest(format!(
                    "Status/From/OrganId: \"{}\" is not this agent's agency {own}; an agent \
                     reports only its own agency's statuses",
                    printable(&status.from)
                )));
            }
            let message_id = received(&status.response_for)?;
            Ok(Planned::Status {
                message_id,
                code: status.status_code,
                reason: status.description,
                staff: status
                    .staff
                    .map(|s| s.staff)
                    .filter(|s| !s.trim().is_empty()),
            })
        }
    }
}

/// The request `POST /v1/documents` would get for this package.
/// `upload_ids`: see [`planned_from`].
fn send_request(
    doc: EdxmlDocument,
    refers_to: Option<String>,
    upload_ids: Option<Vec<String>>,
) -> SendRequest {
    let signer = (!doc.signer.competence.is_empty()
        || !doc.signer.position.is_empty()
        || !doc.signer.full_name.is_empty())
    .then_some(SignerJson {
        competence: doc.signer.competence,
        position: doc.signer.position,
        full_name: doc.signer.full_name,
    });
    let optional = |s: String| (!s.is_empty()).then_some(s);
    SendRequest {
        to: doc.recipients,
        subject: doc.subject,
        number: Some(doc.number),
        notation: Some(doc.notation),
        priority: Some(doc.priority),
        document_type: optional(doc.document_type),
        document_type_name: optional(doc.document_type_name),
        content: optional(doc.content),
        issue_place: optional(doc.issue_place),
        issue_date: Some(doc.issue_date),
        signer,
        steering_type: Some(doc.steering_type),
        due_date: doc.due_date,
        to_places: Some(doc.to_places),
        expires_at_ms: None,
        attachments: match upload_ids {
            Some(upload_ids) => doc
                .attachments
                .into_iter()
                .zip(upload_ids)
                .map(|(a, upload_id)| AttachmentUpload {
                    content_base64: String::new(),
                    name: a.name,
                    media_type: Some(a.media_type),
                    upload_id: Some(upload_id),
                })
                .collect(),
            None => doc
                .attachments
                .into_iter()
                .map(|a| AttachmentUpload {
                    content_base64: base64::engine::general_purpose::STANDARD.encode(&a.bytes),
                    name: a.name,
                    media_type: Some(a.media_type),
                    upload_id: None,
                })
                .collect(),
        },
        business_type: Some(doc.business_type),
        refers_to,
        business_reason: doc.business_reason,
        removed_recipients: None,
        sender_name: optional(doc.sender_name),
    }
}

/// The edXML path a recall, update or replacement took its referred document id from
/// (see [`EdxmlDocument::refers_to_business_id`]).
fn refers_to_path(doc: &EdxmlDocument) -> &'static str {
    if doc.business_document_id.is_some() {
        "TraceHeaderList/Bussiness/DocumentId"
    } else if doc
        .response_for
        .as_ref()
        .is_some_and(|r| !r.document_id.is_empty())
    {
        "MessageHeader/ResponseFor/DocumentId"
    } else {
        "MessageHeader/DocumentId"
    }
}

/// The message id of the document this agent sent under `business_id`: the original
/// (a new document) when there is one, else the earliest; documents the broker refused
/// for good do not count.
fn sent_message_id(
    agent: &Agent,
    doc: &EdxmlDocument,
    business_id: &str,
) -> Result<String, ApiError> {
    let mut candidates: Vec<_> = agent
        .store
        .outbox_records()
        .map_err(internal("cannot read the outbox"))?
        .into_iter()
        .filter(|r| r.business_id == business_id && r.state != crate::store::OutboxState::Failed)
        .collect();
    candidates.sort_by(|a, b| {
        a.created_at_ms
            .cmp(&b.created_at_ms)
            .then_with(|| a.message_id.cmp(&b.message_id))
    });
    for record in &candidates {
        let envelope = agent
            .store
            .outbox_envelope(&record.message_id)
            .map_err(internal("cannot read the outbox"))?;
        let header = envelope
            .and_then(|bytes| pb::Signed::decode(bytes.as_ref()).ok())
            .and_then(|signed| pb::DocumentHeader::decode(signed.payload.as_ref()).ok());
        if header.is_some_and(|h| {
            h.kind == pb::DocumentKind::Document as i32
                && h.business_type == pb::BusinessType::New as i32
        }) {
            return Ok(record.message_id.clone());
        }
    }
    candidates
        .first()
        .map(|r| r.message_id.clone())
        .ok_or_else(|| not_sent(doc, business_id))
}

/// The refusal of a recall, update or replacement whose document this agency never sent.
pub(crate) fn not_sent(doc: &EdxmlDocument, business_id: &str) -> ApiError {
    ApiError::BadRequest(format!(
        "{}: \"{}\" is not a document this agency sent; a recall, update or replacement \
         concerns one of its own documents",
        refers_to_path(doc),
        printable(business_id)
    ))
}

/// The message id of the received document a status message answers: the document
/// received from `ResponseFor/OrganId` under `ResponseFor/DocumentId`, the original
/// (a new document, which a recall or update also names) when there is one, else the
/// latest.
fn received_message_id(agent: &Agent, response_for: &ResponseFor) -> Result<String, ApiError> {
    agent
        .store
        .inbox_records()
        .map_err(internal("cannot read the inbox"))?
        .into_iter()
        .filter(|r| {
            r.business_id == response_for.document_id
                && r.sender == response_for.organ_id
                && r.kind == pb::DocumentKind::Document as i32
        })
        .max_by(|a, b| {
            let original =
                |r: &crate::store::InboxRecord| r.business_type == pb::BusinessType::New as i32;
            original(a)
                .cmp(&original(b))
                .then_with(|| a.received_at_ms.cmp(&b.received_at_ms))
                .then_with(|| a.message_id.cmp(&b.message_id))
        })
        .map(|r| r.message_id)
        .ok_or_else(|| not_received(response_for))
}

/// The refusal of a status message about a document this agency never received.
pub(crate) fn not_received(response_for: &ResponseFor) -> ApiError {
    ApiError::BadRequest(format!(
        "Status/ResponseFor/DocumentId: \"{}\" is not a document this agency received from {}",
        printable(&response_for.document_id),
        printable(&response_for.organ_id)
    ))
}

/// `GET /v1/inbox/{id}/edxml`.
async fn export(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    if !is_valid_message_id(&id) {
        return Err(ApiError::BadRequest(
            "message id: must be a lowercase hyphenated UUID".into(),
        ));
    }
    let exporting = Arc::clone(&agent);
    let package = tokio::task::spawn_blocking(move || export_package(&exporting, &id))
        .await
        .map_err(join_failed)??;
    Ok(([(header::CONTENT_TYPE, EDXML_MEDIA_TYPE)], package).into_response())
}

/// A received document (or status report) as an edXML package. Blocking.
pub(crate) fn export_package(agent: &Agent, id: &str) -> Result<Vec<u8>, ApiError> {
    let not_found = || ApiError::NotFound(format!("message {id} is not in this agent's inbox"));
    agent
        .store
        .inbox_record(id)
        .map_err(internal("cannot read the inbox"))?
        .ok_or_else(not_found)?;
    let envelope = agent
        .store
        .inbox_envelope(id)
        .map_err(internal("cannot read the inbox"))?
        .ok_or_else(not_found)?;
    let header = pb::Signed::decode(envelope.as_ref())
        .and_then(|signed| pb::DocumentHeader::decode(signed.payload.as_ref()))
        .map_err(|e| {
            error!(message_id = %id, error = %e, "stored envelope is unreadable");
            ApiError::Internal
        })?;
    if header.kind == pb::DocumentKind::Status as i32 {
        status_package(&header)
    } else {
        document_package(agent, id, &header)
    }
}

fn unexportable(e: lienthong_edxml::EdxmlError) -> ApiError {
    ApiError::Rejected(
        StatusCode::UNPROCESSABLE_ENTITY,
        format!("this document cannot be written as edXML: {e}"),
    )
}

fn document_package(
    agent: &Agent,
    id: &str,
    header: &pb::DocumentHeader,
) -> Result<Vec<u8>, ApiError> {
    let limits = package_limits(agent);
    let total: u64 = header
        .attachments
        .iter()
        .map(|a| a.size)
        .fold(0, u64::saturating_add);
    // Base64 takes 4 bytes for 3.
    if total.saturating_mul(4) / 3 >= limits.max_package_bytes as u64 {
        return Err(ApiError::Rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the attachments total {total} bytes: too large for an edXML package of at \
                 most {} bytes; take them from the inbox folder",
                limits.max_package_bytes
            ),
        ));
    }
    let attachments = attachment_bytes(agent, id, header)?;
    let mut doc = lienthong_edxml::from_header(header, attachments);
    if header.business_type != pb::BusinessType::New as i32
        && !header.refers_to_business_id.is_empty()
    {
        doc.business_document_id = Some(header.refers_to_business_id.clone());
    }
    if !header.business_reason.is_empty() {
        doc.business_reason = Some(header.business_reason.clone());
    }
    lienthong_edxml::write_document(&doc).map_err(unexportable)
}

/// The attachments of received document `id`, from its inbox folder (or the
/// `recalled/` one), else from the store; each checked against the signed header.
fn attachment_bytes(
    agent: &Agent,
    id: &str,
    header: &pb::DocumentHeader,
) -> Result<Vec<AttachmentBytes>, ApiError> {
    let folders: Vec<std::path::PathBuf> = agent
        .inbox_dir()
        .map(|inbox| vec![inbox.join(id), inbox.join("recalled").join(id)])
        .unwrap_or_default();
    let mut stored: Option<Vec<bytes::Bytes>> = None;
    let mut out = Vec::with_capacity(header.attachments.len());
    for (index, info) in header.attachments.iter().enumerate() {
        let from_folder = folders
            .iter()
            .map(|folder| folder.join(&info.name))
            .find(|path| path.is_file())
            .map(|path| {
                std::fs::read(&path).map_err(|e| {
                    error!(message_id = %id, path = %path.display(), error = %e, "cannot read an exported attachment");
                    ApiError::Internal
                })
            })
            .transpose()?;
        // A streamed document not (yet) exported keeps its attachments as received.
        let received = agent.files.incoming_dir(id).join(index.to_string());
        let from_folder = match from_folder {
            Some(bytes) => Some(bytes),
            None if received.is_file() => Some(std::fs::read(&received).map_err(|e| {
                error!(message_id = %id, path = %received.display(), error = %e, "cannot read a received attachment");
                ApiError::Internal
            })?),
            None => None,
        };
        let bytes = match from_folder {
            Some(bytes) => bytes,
            None => {
                if stored.is_none() {
                    stored = Some(
                        agent
                            .store
                            .inbox_attachments(id, header.attachments.len())
                            .map_err(internal("cannot read the inbox"))?,
                    );
                }
                stored
                    .as_ref()
                    .and_then(|all| all.get(index))
                    .map(|b| b.to_vec())
                    .unwrap_or_default()
            }
        };
        let sha = lienthong_proto::sha256(&bytes);
        if bytes.len() as u64 != info.size || sha.as_slice() != info.sha256.as_slice() {
            error!(
                message_id = %id,
                attachment = %printable(&info.name),
                "an attachment in the inbox folder no longer matches the signed header"
            );
            return Err(ApiError::Rejected(
                StatusCode::CONFLICT,
                format!(
                    "attachment {}: the copy in the inbox folder differs from what was signed \
                     (changed or removed since it was received)",
                    printable(&info.name)
                ),
            ));
        }
        out.push(AttachmentBytes {
            name: info.name.clone(),
            media_type: info.media_type.clone(),
            bytes,
        });
    }
    Ok(out)
}

/// A status report as an edXML status message.
pub(crate) fn status_package(header: &pb::DocumentHeader) -> Result<Vec<u8>, ApiError> {
    let report = header.status.clone().unwrap_or_default();
    let document_id = header.refers_to_business_id.as_str();
    let parts = lienthong_edxml::rules::split_document_id(document_id).ok_or_else(|| {
        ApiError::Rejected(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "this status report cannot be written as edXML: the document it is about has \
                 no business id of the form OrganId,yyyy/MM/dd,Number/Notation (got \"{}\")",
                printable(document_id)
            ),
        )
    })?;
    let code = document_id
        .splitn(3, ',')
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let staff = (!report.staff.is_empty() || !report.department.is_empty()).then(|| StaffInfo {
        department: report.department.clone(),
        staff: report.staff.clone(),
        mobile: String::new(),
        email: String::new(),
    });
    let status = EdxmlStatus {
        from: header.sender.clone(),
        from_name: header.sender_name.clone(),
        response_for: ResponseFor {
            organ_id: parts.organ_id.to_owned(),
            code,
            promulgation_date: parts.date.to_owned(),
            document_id: document_id.to_owned(),
        },
        status_code: report.code.clone(),
        description: Some(report.reason.clone()).filter(|r| !r.is_empty()),
        timestamp: vietnam_timestamp(header.created_at_ms),
        staff,
    };
    lienthong_edxml::write_status(&status).map_err(unexportable)
}

/// `yyyy/MM/dd HH:mm:ss` in Vietnam time (UTC+7) for Unix milliseconds.
fn vietnam_timestamp(ms: i64) -> String {
    let offset = time::UtcOffset::from_hms(7, 0, 0).unwrap_or(time::UtcOffset::UTC);
    let at = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(offset);
    format!(
        "{:04}/{:02}/{:02} {:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_vietnam_time() {
        // 2026-05-04T17:30:05Z is 2026/05/05 00:30:05 in Vietnam.
        assert_eq!(vietnam_timestamp(1_777_915_805_000), "2026/05/05 00:30:05");
        assert_eq!(vietnam_timestamp(0), "1970/01/01 07:00:00");
    }
}
