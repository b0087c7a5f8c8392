//! `GET /v1/inbox`, `GET /v1/sent` (pages in arrival order with an opaque cursor) and
//! `GET /v1/inbox/{id}/attachments/{name}` (one attachment, streamed).
//!
//! Invariants:
//! - Every query parameter is checked; an unknown one or a bad value is a `400`
//!   naming it. `limit` is 1..=[`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
//! - A page reads at most [`SCAN_BUDGET_FACTOR`] × `limit` index entries (at least
//!   [`MIN_SCAN_BUDGET`]): a filter that matches little gives a short page with
//!   `more: true` instead of reading the whole store.
//! - The cursor is `c` and 16 hex digits of the store's arrival sequence; anything
//!   else is refused, never interpreted.
//! - An attachment is found by its exact name in the stored header, never by a path
//!   built from the request: `..`, slashes or unknown names are a `404`. Its bytes
//!   are streamed chunk by chunk from sled or from its file (as received, or once
//!   exported, in the export folder, checked against the header's size), never held
//!   whole.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lienthong_proto::pb;
use lienthong_proto::{AgencyCode, rfc3339_ms};
use prost::Message as _;
use tracing::error;

use super::{ApiError, check_id, inbox_item, internal};
use crate::Agent;
use crate::api_types::{InboxItem, Page, SentItem};
use crate::store::{InboxRecord, OutboxRecord};

/// Entries per page when `limit` is absent.
pub const DEFAULT_LIMIT: usize = 100;
/// The largest `limit`.
pub const MAX_LIMIT: usize = 1000;
/// Index entries a page may read per entry it can return.
pub const SCAN_BUDGET_FACTOR: usize = 10;
/// Index entries a page may always read.
pub const MIN_SCAN_BUDGET: usize = 1000;

/// The query of both listings (each route refuses the parameters it has no use for).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    since: Option<String>,
    sender: Option<String>,
    recipient: Option<String>,
    status: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// A checked [`ListQuery`].
struct Checked {
    since_ms: Option<i64>,
    agency: Option<String>,
    status: Option<String>,
    limit: usize,
    after: Option<u64>,
}

fn bad(text: String) -> ApiError {
    ApiError::BadRequest(text)
}

fn check(
    query: Result<Query<ListQuery>, QueryRejection>,
    agency_param: &'static str,
    statuses: &[&str],
) -> Result<Checked, ApiError> {
    let Query(q) = query.map_err(|e| bad(format!("query: {}", e.body_text())))?;
    let (agency, other) = if agency_param == "sender" {
        (q.sender, q.recipient.map(|_| "recipient"))
    } else {
        (q.recipient, q.sender.map(|_| "sender"))
    };
    if let Some(other) = other {
        return Err(bad(format!(
            "{other}: not a filter of this listing; use {agency_param}"
        )));
    }
    let agency = agency
        .map(|code| {
            AgencyCode::parse(code.trim())
                .map(|c| c.to_string())
                .map_err(|e| bad(format!("{agency_param}: {e}")))
        })
        .transpose()?;
    let since_ms = q
        .since
        .map(|text| {
            let at = time::OffsetDateTime::parse(
                text.trim(),
                &time::format_description::well_known::Rfc3339,
            )
            .map_err(|e| {
                bad(format!(
                    "since: not an RFC 3339 time such as 2026-05-04T08:00:00+07:00 ({e})"
                ))
            })?;
            i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
                .map_err(|_| bad("since: out of range".into()))
        })
        .transpose()?;
    let status = q
        .status
        .map(|s| {
            if statuses.contains(&s.as_str()) {
                Ok(s)
            } else {
                Err(bad(format!(
                    "status: must be one of {}",
                    statuses.join(", ")
                )))
            }
        })
        .transpose()?;
    let limit = match q.limit {
        None => DEFAULT_LIMIT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(bad(format!(
                    "limit: must be a whole number from 1 to {MAX_LIMIT}"
                )));
            }
        },
    };
    let after = q.cursor.map(|c| parse_cursor(&c)).transpose()?;
    Ok(Checked {
        since_ms,
        agency,
        status,
        limit,
        after,
    })
}

fn parse_cursor(text: &str) -> Result<u64, ApiError> {
    text.strip_prefix('c')
        .filter(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| {
            bad("cursor: not a cursor this agent gave (use next_cursor as given)".into())
        })
}

fn cursor(seq: u64) -> String {
    format!("c{seq:016x}")
}

fn budget(limit: usize) -> usize {
    limit
        .saturating_mul(SCAN_BUDGET_FACTOR)
        .max(MIN_SCAN_BUDGET)
}

/// The inbox `status` of a received document.
fn inbox_status(record: &InboxRecord) -> &'static str {
    if record.recalled_by.is_some() {
        "recalled"
    } else if record.superseded_by.is_some() {
        "superseded"
    } else if record.removed_by.is_some() {
        "removed"
    } else {
        "active"
    }
}

const INBOX_STATUSES: &[&str] = &["active", "recalled", "superseded", "removed"];
const SENT_STATUSES: &[&str] = &["outbox", "submitted", "failed"];

/// `GET /v1/inbox?since=&sender=&status=&limit=&cursor=`.
pub(crate) async fn list_inbox(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page<InboxItem>>, ApiError> {
    let q = check(query, "sender", INBOX_STATUSES)?;
    let reading = Arc::clone(&agent);
    let page = tokio::task::spawn_blocking(move || {
        reading
            .store
            .inbox_page(q.after, q.limit, budget(q.limit), |r| {
                q.since_ms.is_none_or(|since| r.received_at_ms >= since)
                    && q.agency.as_ref().is_none_or(|a| *a == r.sender)
                    && q.status.as_deref().is_none_or(|s| s == inbox_status(r))
            })
            .map(|page| (page, q.after))
    })
    .await
    .map_err(|e| {
        error!(error = %e, "listing the inbox failed");
        ApiError::Internal
    })?
    .map_err(internal("cannot read the inbox"))?;
    let (page, after) = page;
    Ok(Json(Page {
        items: page.items.iter().map(|r| inbox_item(&agent, r)).collect(),
        next_cursor: page.last_seq.or(after).map(cursor),
        more: page.more,
    }))
}

fn sent_item(record: OutboxRecord) -> SentItem {
    SentItem {
        created_at: rfc3339_ms(record.created_at_ms).unwrap_or_default(),
        submitted_at: record.submitted_at_ms.and_then(rfc3339_ms),
        state: record.state.as_str().to_owned(),
        message_id: record.message_id,
        business_id: record.business_id,
        subject: record.subject,
        recipients: record.recipients,
        failure_reason: record.failure_reason,
    }
}

/// `GET /v1/sent?since=&recipient=&status=&limit=&cursor=`.
pub(crate) async fn list_sent(
    State(agent): State<Arc<Agent>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page<SentItem>>, ApiError> {
    let q = check(query, "recipient", SENT_STATUSES)?;
    let reading = Arc::clone(&agent);
    let (page, after) = tokio::task::spawn_blocking(move || {
        reading
            .store
            .sent_page(q.after, q.limit, budget(q.limit), |r| {
                q.since_ms.is_none_or(|since| r.created_at_ms >= since)
                    && q.agency.as_ref().is_none_or(|a| r.recipients.contains(a))
                    && q.status.as_deref().is_none_or(|s| s == r.state.as_str())
            })
            .map(|page| (page, q.after))
    })
    .await
    .map_err(|e| {
        error!(error = %e, "listing the sent documents failed");
        ApiError::Internal
    })?
    .map_err(internal("cannot read the outbox"))?;
    Ok(Json(Page {
        items: page.items.into_iter().map(sent_item).collect(),
        next_cursor: page.last_seq.or(after).map(cursor),
        more: page.more,
    }))
}

/// `GET /v1/inbox/{id}/attachments/{name}`: the attachment named exactly `name`
/// (percent-decoded by the router), streamed, with its media type and size from the
/// signed header.
pub(crate) async fn attachment(
    State(agent): State<Arc<Agent>>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_id(&id)?;
    let not_found = || {
        ApiError::NotFound(format!(
            "document {id} has no attachment named {}",
            lienthong_proto::agency::printable(&name)
        ))
    };
    let record = agent
        .store
        .inbox_record(&id)
        .map_err(internal("cannot read the inbox"))?
        .ok_or_else(|| ApiError::NotFound(format!("message {id} is not in this agent's inbox")))?;
    let index = record
        .attachments
        .iter()
        .position(|n| *n == name)
        .ok_or_else(not_found)?;
    let envelope = agent
        .store
        .inbox_envelope(&id)
        .map_err(internal("cannot read the inbox"))?
        .ok_or_else(not_found)?;
    let header = pb::Signed::decode(envelope.as_ref())
        .ok()
        .and_then(|signed| pb::DocumentHeader::decode(signed.payload.as_ref()).ok())
        .ok_or_else(|| {
            error!(message_id = %id, "stored envelope is unreadable");
            ApiError::Internal
        })?;
    let info = header.attachments.get(index).ok_or_else(not_found)?;
    let body = if record.streamed {
        // As received until it is exported, then in its export folder (or the
        // `recalled/` one) under the name from the signed header, which matched.
        let mut candidates = vec![agent.files.incoming_dir(&id).join(index.to_string())];
        if let Some(inbox) = agent.inbox_dir() {
            candidates.push(inbox.join(&id).join(&info.name));
            candidates.push(inbox.join("recalled").join(&id).join(&info.name));
        }
        let mut found = None;
        for path in candidates {
            if let Ok(file) = tokio::fs::File::open(&path).await {
                // A file of another size is not the attachment the header describes.
                match file.metadata().await {
                    Ok(meta) if meta.is_file() && meta.len() == info.size => {
                        found = Some(file);
                        break;
                    }
                    _ => {}
                }
            }
        }
        let file = found.ok_or_else(|| {
            error!(message_id = %id, index, "a received attachment is in none of its places");
            ApiError::Internal
        })?;
        Body::from_stream(tokio_util::io::ReaderStream::new(file))
    } else {
        let store = Arc::clone(&agent);
        let chunks = crate::store::AttachmentChunks::new(id.clone(), index);
        Body::from_stream(futures_util::stream::unfold(
            (store, chunks),
            |(store, mut chunks)| async move {
                let reading = Arc::clone(&store);
                let (next, chunks) = tokio::task::spawn_blocking(move || {
                    let next = chunks.next_chunk(&reading.store);
                    (next, chunks)
                })
                .await
                .ok()?;
                match next {
                    Ok(Some(bytes)) => Some((Ok::<_, std::io::Error>(bytes), (store, chunks))),
                    Ok(None) => None,
                    Err(e) => {
                        error!(error = %e, "cannot read a received attachment");
                        Some((
                            Err(std::io::Error::other("store read failed")),
                            (store, chunks),
                        ))
                    }
                }
            },
        ))
    };
    let media_type = HeaderValue::from_str(&info.media_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, media_type),
            (header::CONTENT_LENGTH, HeaderValue::from(info.size)),
            (
                header::HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response())
}
