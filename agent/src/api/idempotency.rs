//! `Idempotency-Key` on the send routes (`POST /v1/documents`, `/v1/documents/batch`,
//! `/v1/edxml`): a gateway that lost an answer retries with the same key and gets the
//! first answer again instead of sending the document twice.
//!
//! Invariants:
//! - A key is 1 to [`MAX_KEY_CHARS`] visible ASCII characters (0x21–0x7E); anything
//!   else, or the header given twice, is a `400` before any work.
//! - Keys are scoped to the API client. The agent has one API token, so there is one
//!   client and the key alone is the scope.
//! - Only successful answers (2xx) are kept: a refused request changed nothing, so a
//!   retry simply runs again. The answer is durable before it is sent (see
//!   `store::idempotency` for what a crash in between can cost).
//! - The same key with another request (route or body bytes differ) is a `422` naming
//!   the key and the route it was first used on; nothing is sent.
//! - While a request with a key runs, another with the same key is a `409` (retry
//!   later): two concurrent retries never both send.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lienthong_proto::now_ms;
use tracing::{debug, error};

use super::ApiError;
use crate::Agent;
use crate::store::IdempotencyRecord;

/// The request header.
pub(crate) const HEADER: &str = "idempotency-key";
/// Set on an answer replayed from an earlier request.
pub(crate) const REPLAYED_HEADER: &str = "idempotent-replayed";
/// The longest key accepted.
pub(crate) const MAX_KEY_CHARS: usize = 200;

/// What the handler does after [`begin`].
pub(crate) enum Begin {
    /// The first answer to this key and request: send it as it is.
    Replay(Response),
    /// Run the request; with a claim when it carried a key.
    Run(Option<Claim>),
}

/// A key held by the running request; released when dropped.
pub(crate) struct Claim {
    agent: Arc<Agent>,
    key: String,
    fingerprint: String,
    route: &'static str,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.agent.store.idempotency_release(&self.key);
    }
}

/// The key of a request, checked; `None` when it carries none.
pub(crate) fn key_of(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "Idempotency-Key: give the header once".into(),
        ));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_KEY_CHARS {
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key: must be 1 to {MAX_KEY_CHARS} characters, got {}",
            bytes.len()
        )));
    }
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ApiError::BadRequest(
            "Idempotency-Key: only visible ASCII characters (no spaces), e.g. a UUID".into(),
        ));
    }
    // Checked as visible ASCII just above.
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// Looks the request's key up: the kept answer, a conflict, or a claim to run it.
/// `route` names the route (`POST /v1/documents`), `body` is the request body as
/// received.
pub(crate) fn begin(
    agent: &Arc<Agent>,
    headers: &HeaderMap,
    route: &'static str,
    body: &[u8],
) -> Result<Begin, ApiError> {
    let Some(key) = key_of(headers)? else {
        return Ok(Begin::Run(None));
    };
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    hasher.update(route.as_bytes());
    hasher.update(&[0]);
    hasher.update(body);
    let fingerprint = hex::encode(hasher.finish().as_ref());
    if !agent.store.idempotency_claim(&key) {
        return Err(ApiError::Rejected(
            StatusCode::CONFLICT,
            format!(
                "Idempotency-Key {key}: a request with this key is still running; retry when \
                 it has been answered"
            ),
        ));
    }
    let claim = Claim {
        agent: Arc::clone(agent),
        key,
        fingerprint,
        route,
    };
    let kept = agent
        .store
        .idempotency_get(&claim.key, now_ms())
        .map_err(super::internal("cannot read the idempotency keys"))?;
    let Some(kept) = kept else {
        return Ok(Begin::Run(Some(claim)));
    };
    if kept.fingerprint != claim.fingerprint {
        return Err(ApiError::Rejected(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "Idempotency-Key {}: already used for another request ({} at {}); nothing \
                 was sent; use a new key for a new request",
                claim.key,
                kept.route,
                crate::export::rfc3339_ms(kept.at_ms).unwrap_or_default()
            ),
        ));
    }
    debug!(agency = %agent.agency, route, "answer replayed for an idempotency key");
    Ok(Begin::Replay(json_response(kept.status, kept.body, true)))
}

impl Claim {
    /// The key, fingerprint and route, for the sealer to keep the answer with the
    /// document (`POST /v1/documents`).
    pub(crate) fn tag(&self) -> crate::sealer::IdempotencyTag {
        crate::sealer::IdempotencyTag {
            key: self.key.clone(),
            fingerprint: self.fingerprint.clone(),
            route: self.route,
        }
    }
}

/// The answer to a request whose answer the sealer already kept (durably, with its
/// document): sent as it is; the claim is released when it goes.
pub(crate) fn answer<T: serde::Serialize>(
    claim: Option<Claim>,
    status: StatusCode,
    answer: &T,
) -> Response {
    let response = match serde_json::to_string(answer) {
        Ok(body) => json_response(status.as_u16(), body, false),
        Err(e) => {
            error!(error = %e, "cannot encode an answer");
            ApiError::Internal.into_response()
        }
    };
    drop(claim);
    response
}

/// The answer to a request that ran: kept under its key (durably) when it succeeded.
/// A failure to keep it is logged, and the answer still goes out: the documents are
/// accepted, so the client must learn their ids.
pub(crate) async fn finish<T: serde::Serialize>(
    claim: Option<Claim>,
    status: StatusCode,
    answer: &T,
) -> Response {
    let body = match serde_json::to_string(answer) {
        Ok(body) => body,
        Err(e) => {
            error!(error = %e, "cannot encode an answer");
            return ApiError::Internal.into_response();
        }
    };
    if let Some(claim) = claim.filter(|_| status.is_success()) {
        let record = IdempotencyRecord {
            fingerprint: claim.fingerprint.clone(),
            route: claim.route.to_owned(),
            at_ms: now_ms(),
            status: status.as_u16(),
            body: body.clone(),
        };
        let kept = match claim.agent.store.idempotency_put(&claim.key, &record) {
            Ok(()) => claim.agent.store.durable().await,
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            error!(error = %e, route = claim.route, "cannot keep the answer of an idempotency key; a retry would send again");
        }
    }
    json_response(status.as_u16(), body, false)
}

fn json_response(status: u16, body: String, replayed: bool) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let mut response = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, HeaderValue::from_bytes(value).unwrap());
        h
    }

    #[test]
    fn keys_are_checked() {
        assert_eq!(key_of(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            key_of(&with(b"0192a-retry:1")).unwrap().as_deref(),
            Some("0192a-retry:1")
        );
        assert!(key_of(&with(&[b'k'; 200])).is_ok());
        assert!(key_of(&with(&[b'k'; 201])).is_err());
        assert!(key_of(&with(b"")).is_err());
        assert!(key_of(&with(b"a b")).is_err());
        assert!(key_of(&with(b"a\tb")).is_err());
        assert!(key_of(&with("khóa".as_bytes())).is_err());
        let mut twice = with(b"a");
        twice.append(HEADER, HeaderValue::from_static("b"));
        assert!(key_of(&twice).is_err());
    }
}
