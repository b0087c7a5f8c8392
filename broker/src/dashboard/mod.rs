//! The operator dashboard on the admin listener: one page (`GET /`, its assets embedded
//! in the binary) and the JSON it reads, straight from the store and the hub:
//!
//! - `GET /api/queues`: every registered agency, connection state and queue depth;
//! - `GET /api/agencies/{code}/pending`: its queued documents (first 200);
//! - `GET /api/agencies/{code}/dead-letters`: its dead letters;
//! - `GET /api/messages/{id}`: one document by message id or business document id, with
//!   each recipient's state and attempt log;
//! - `POST /api/redrive` `{message_id, agency}`: queue dead letters again.
//!
//! With an operator token configured (`BrokerConfig::admin_tokens`, `admin_token`), all
//! of these need `Authorization: Bearer <token>`; the page takes the token from its URL
//! fragment (`#token=`), which the browser never sends to the server. The token's name
//! is who the audit log records for a redrive.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lienthong_proto::AgencyCode;
use lienthong_proto::pb::{self, DeliveryState};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::error::BrokerError;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// Most queued documents listed for one agency.
const PENDING_LIMIT: usize = 200;

/// Who acts through the dashboard, for the audit log: the name of the operator token
/// the request carried, or, with no token configured (loopback only), a fixed name.
#[derive(Debug, Clone)]
pub(crate) struct Operator(pub String);

/// Name recorded when the admin listener has no token (it is then loopback-only).
const NO_TOKEN_OPERATOR: &str = "dashboard (no token configured; loopback)";

/// Rejects a request without an operator bearer token, when any is configured, and
/// records which operator it is as a request extension ([`Operator`]).
pub(crate) async fn require_token(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let tokens = shared.config.admin_operators();
    let operator = if tokens.is_empty() {
        Some(NO_TOKEN_OPERATOR.to_owned())
    } else {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Every token is compared, so the time taken does not tell which one matched.
        tokens.iter().fold(None, |found, candidate| {
            let matches = constant_time_eq(given.as_bytes(), candidate.token.as_bytes());
            if matches && found.is_none() {
                Some(candidate.name.clone())
            } else {
                found
            }
        })
    };
    let Some(operator) = operator else {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "operator bearer token required",
        )
            .into_response();
    };
    request.extensions_mut().insert(Operator(operator));
    next.run(request).await
}

/// Compares without returning early at the first differing byte, so the time taken does
/// not tell how much of a guess was right (only, at most, its length).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, &y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(crate) async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// A JSON error body `{error}` with the status of the broker error.
pub(crate) struct ApiError(BrokerError);

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        Self(e)
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self(e.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            BrokerError::InvalidArgument(_) | BrokerError::Protocol(_) => StatusCode::BAD_REQUEST,
            BrokerError::NotFound(_) => StatusCode::NOT_FOUND,
            BrokerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            BrokerError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            BrokerError::ResourceExhausted(_) | BrokerError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self.0, "dashboard request failed");
        }
        let body = serde_json_body(&ErrorBody {
            error: self.0.to_string(),
        });
        (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn serde_json_body<T: Serialize>(value: &T) -> Body {
    Json(value).into_response().into_body()
}

/// Runs a store read off the async threads.
async fn blocking<T: Send + 'static>(
    shared: Arc<Shared>,
    f: impl FnOnce(&Shared) -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(move || f(&shared))
        .await
        .map_err(|e| ApiError(BrokerError::Unavailable(format!("request failed: {e}"))))?
        .map_err(ApiError)
}

fn agency(code: &str) -> Result<AgencyCode, BrokerError> {
    Ok(AgencyCode::parse(code)?)
}

fn state_name(state: i32) -> &'static str {
    match DeliveryState::try_from(state) {
        Ok(DeliveryState::Queued) => "queued",
        Ok(DeliveryState::Delivered) => "delivered",
        Ok(DeliveryState::Expired) => "expired",
        Ok(DeliveryState::Refused) => "refused",
        Ok(DeliveryState::Recalled) => "recalled",
        _ => "unknown",
    }
}

fn header_of(document: &crate::records::DocumentRecord) -> pb::DocumentHeader {
    pb::Signed::decode(document.envelope.as_slice())
        .ok()
        .and_then(|e| pb::DocumentHeader::decode(e.payload.as_ref()).ok())
        .unwrap_or_default()
}

#[derive(Serialize)]
pub(crate) struct QueueView {
    agency: String,
    name: String,
    connected: bool,
    pending: u64,
    pending_bytes: u64,
    oldest_pending_seconds: u64,
    in_flight: u64,
    dead_letters: usize,
    last_seen_ms: i64,
}

#[derive(Serialize)]
pub(crate) struct QueuesView {
    now_ms: i64,
    queues: Vec<QueueView>,
}

pub(crate) async fn queues(
    State(shared): State<Arc<Shared>>,
) -> Result<Json<QueuesView>, ApiError> {
    blocking(shared, |shared| {
        let now = lienthong_proto::now_ms();
        let mut dead: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for entry in shared.store.dead_letters(None)? {
            *dead.entry(entry.recipient).or_default() += 1;
        }
        let agencies = shared.store.agencies()?;
        let codes: BTreeSet<&String> = agencies.iter().map(|(c, _)| c).collect();
        let mut queues = Vec::with_capacity(codes.len());
        for (code, record) in &agencies {
            let stats = shared.store.queue_stats(code)?;
            let session = shared.hub.info(code);
            queues.push(QueueView {
                agency: code.clone(),
                name: record.name.clone(),
                connected: session.is_some(),
                pending: stats.pending,
                pending_bytes: stats.pending_bytes,
                oldest_pending_seconds: stats
                    .oldest_enqueued_ms
                    .map(|t| u64::try_from((now - t).max(0) / 1000).unwrap_or(0))
                    .unwrap_or(0),
                in_flight: session.map(|s| s.in_flight).unwrap_or(0),
                dead_letters: dead.get(code).copied().unwrap_or(0),
                last_seen_ms: session.map(|s| s.last_seen_ms).unwrap_or(0),
            });
        }
        Ok(QueuesView {
            now_ms: now,
            queues,
        })
    })
    .await
    .map(Json)
}

#[derive(Serialize)]
pub(crate) struct PendingView {
    message_id: String,
    business_id: String,
    sender: String,
    subject: String,
    bytes: u64,
    enqueued_at_ms: i64,
    expires_at_ms: i64,
    attempts: u32,
}

#[derive(Serialize)]
pub(crate) struct PendingList {
    agency: String,
    total: u64,
    truncated: bool,
    pending: Vec<PendingView>,
}

pub(crate) async fn pending(
    State(shared): State<Arc<Shared>>,
    Path(code): Path<String>,
) -> Result<Json<PendingList>, ApiError> {
    blocking(shared, move |shared| {
        let code = agency(&code)?;
        let code = code.as_str();
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        let mut truncated = false;
        while let Some((key, entry)) = shared.store.next_queued(code, after.as_deref())? {
            if out.len() == PENDING_LIMIT {
                truncated = true;
                break;
            }
            let document = shared
                .store
                .document(&entry.message_id)?
                .unwrap_or_default();
            let attempts = shared
                .store
                .delivery(&entry.message_id, code)?
                .map(|d| d.attempts)
                .unwrap_or(0);
            out.push(PendingView {
                business_id: document.business_id.clone(),
                sender: document.sender.clone(),
                subject: header_of(&document).subject,
                message_id: entry.message_id,
                bytes: entry.bytes,
                enqueued_at_ms: entry.enqueued_at_ms,
                expires_at_ms: entry.expires_at_ms,
                attempts,
            });
            after = Some(key);
        }
        Ok(PendingList {
            agency: code.to_owned(),
            total: shared.store.pending(code).documents,
            truncated,
            pending: out,
        })
    })
    .await
    .map(Json)
}

#[derive(Serialize)]
pub(crate) struct DeadLetterView {
    message_id: String,
    business_id: String,
    sender: String,
    subject: String,
    state: &'static str,
    reason: String,
    at_ms: i64,
    attempts: u32,
}

#[derive(Serialize)]
pub(crate) struct DeadLetterList {
    agency: String,
    dead_letters: Vec<DeadLetterView>,
}

pub(crate) async fn dead_letters(
    State(shared): State<Arc<Shared>>,
    Path(code): Path<String>,
) -> Result<Json<DeadLetterList>, ApiError> {
    blocking(shared, move |shared| {
        let code = agency(&code)?;
        let mut dead_letters = Vec::new();
        for entry in shared.store.dead_letters(Some(code.as_str()))? {
            let document = shared
                .store
                .document(&entry.message_id)?
                .unwrap_or_default();
            dead_letters.push(DeadLetterView {
                business_id: document.business_id.clone(),
                sender: document.sender.clone(),
                subject: header_of(&document).subject,
                message_id: entry.message_id,
                state: state_name(entry.record.state),
                reason: entry.record.reason,
                at_ms: entry.record.dead_at_ms,
                attempts: entry.record.attempts,
            });
        }
        Ok(DeadLetterList {
            agency: code.as_str().to_owned(),
            dead_letters,
        })
    })
    .await
    .map(Json)
}

#[derive(Serialize)]
pub(crate) struct EventView {
    at_ms: i64,
    event: String,
    detail: String,
}

#[derive(Serialize)]
pub(crate) struct RecipientView {
    agency: String,
    state: &'static str,
    attempts: u32,
    reason: String,
    /// This copy's expiry (a redrive gives it a fresh one).
    expires_at_ms: i64,
    events: Vec<EventView>,
}

#[derive(Serialize)]
pub(crate) struct MessageView {
    message_id: String,
    business_id: String,
    sender: String,
    subject: String,
    number: String,
    notation: String,
    priority: u32,
    accepted_at_ms: i64,
    expires_at_ms: i64,
    recipients: Vec<RecipientView>,
}

pub(crate) async fn message(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<MessageView>, ApiError> {
    blocking(shared, move |shared| {
        let id = id.trim();
        let store = &shared.store;
        let (message_id, document) = crate::admin::find_document(store, id)?;
        let header = header_of(&document);
        let mut recipients = Vec::with_capacity(document.recipients.len());
        for agency in &document.recipients {
            let delivery = store.delivery(&message_id, agency)?.unwrap_or_default();
            recipients.push(recipient_view(agency, &document, delivery));
        }
        Ok(MessageView {
            message_id,
            business_id: document.business_id.clone(),
            sender: document.sender.clone(),
            subject: header.subject,
            number: header.number,
            notation: header.notation,
            priority: header.priority,
            accepted_at_ms: document.accepted_at_ms,
            expires_at_ms: document.expires_at_ms,
            recipients,
        })
    })
    .await
    .map(Json)
}

/// Accepted, each attempt with its outcome, then the receipt or the refusal/expiry.
fn recipient_view(
    agency: &str,
    document: &crate::records::DocumentRecord,
    delivery: crate::records::DeliveryRecord,
) -> RecipientView {
    let events: Vec<EventView> = crate::records::delivery_timeline(document, &delivery)
        .into_iter()
        .map(|e| EventView {
            at_ms: e.at_ms,
            event: e.event.to_owned(),
            detail: e.detail,
        })
        .collect();
    RecipientView {
        agency: agency.to_owned(),
        state: state_name(delivery.state),
        attempts: delivery.attempts,
        reason: delivery.reason,
        expires_at_ms: delivery.expires_at_ms,
        events,
    }
}

#[derive(Deserialize)]
pub(crate) struct RedriveBody {
    #[serde(default)]
    message_id: String,
    #[serde(default)]
    agency: String,
}

#[derive(Serialize)]
pub(crate) struct RedrivenView {
    message_id: String,
    agency: String,
}

#[derive(Serialize)]
pub(crate) struct RedriveResult {
    redriven: Vec<RedrivenView>,
}

pub(crate) async fn redrive(
    State(shared): State<Arc<Shared>>,
    axum::Extension(Operator(operator)): axum::Extension<Operator>,
    Json(body): Json<RedriveBody>,
) -> Result<Json<RedriveResult>, ApiError> {
    let agency = if body.agency.trim().is_empty() {
        None
    } else {
        Some(agency(body.agency.trim())?)
    };
    let message_id = body.message_id.trim();
    tracing::info!(message_id, agency = agency.as_ref().map(AgencyCode::as_str), %operator, "redrive requested from the dashboard");
    let redriven = crate::deadletter::redrive(
        &shared,
        message_id,
        agency.as_ref().map(AgencyCode::as_str),
        &operator,
    )
    .await?;
    Ok(Json(RedriveResult {
        redriven: redriven
            .into_iter()
            .map(|r| RedrivenView {
                message_id: r.message_id,
                agency: r.recipient,
            })
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret-longer", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"sec", b"secret"));
    }
}
