//! Request bodies taken in by the local API, with bounded memory: a body is read up to
//! a cap (refused with `413` naming the cap as soon as it is declared or found larger),
//! and base64 attachments are decoded piece by piece, never whole.
//!
//! Invariants:
//! - No body is held beyond its cap: a declared `Content-Length` over the cap is refused
//!   before a byte is read, a body without one is refused as soon as it passes it.
//! - An early refusal still reads (and drops) what the client goes on sending, up to
//!   [`DRAIN_BYTES`] within [`DRAIN_TIME`]: a server that answers and closes while the
//!   request is in flight makes the client's kernel see a reset, and the client then
//!   loses the answer naming the limit. Past those bounds the connection is closed.
//! - Decoding keeps one piece ([`DECODE_PIECE`] base64 characters) in memory, and
//!   reports an invalid byte at its offset in the whole text, as a whole decode would.
//! - Bodies read and processed at once share a [`BodyBudget`] of 4× the cap: each holds
//!   twice its size (the body and one decoded copy of its text) until its answer, so
//!   concurrent large requests wait instead of multiplying the agent's memory.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::debug;

use crate::api::ApiError;

/// The most bytes of a refused body read and dropped so that the client sees the answer.
pub const DRAIN_BYTES: u64 = 64 * 1024 * 1024;
/// The longest a refused body is drained.
pub const DRAIN_TIME: Duration = Duration::from_secs(15);
/// Base64 characters decoded at a time (a multiple of 4).
pub const DECODE_PIECE: usize = 64 * 1024;

/// The `Content-Length` the client declared, if any.
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// Reads the rest of a refused body and drops it, within [`DRAIN_BYTES`] and
/// [`DRAIN_TIME`] (see the module invariants). Returns the bytes drained.
pub(crate) async fn drain(stream: &mut axum::body::BodyDataStream) -> u64 {
    let mut drained = 0u64;
    let reading = async {
        while let Some(Ok(chunk)) = stream.next().await {
            drained = drained.saturating_add(chunk.len() as u64);
            if drained >= DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, reading).await;
    drained
}

/// The memory request bodies may take at once, in KiB (see the module invariants).
pub(crate) struct BodyBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
}

impl BodyBudget {
    /// A budget of 4× `cap` bytes.
    pub(crate) fn new(cap: u64) -> Self {
        let total = (cap.saturating_mul(4) / 1024)
            .clamp(1, Semaphore::MAX_PERMITS as u64)
            .min(u64::from(u32::MAX));
        let total_kib = u32::try_from(total).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// Waits until twice `bytes` fits in the budget; held until the permit drops.
    async fn take(&self, bytes: u64) -> Result<OwnedSemaphorePermit, ApiError> {
        let kib = (bytes.saturating_mul(2) / 1024)
            .saturating_add(1)
            .min(u64::from(self.total_kib));
        let kib = u32::try_from(kib).unwrap_or(self.total_kib);
        Arc::clone(&self.permits)
            .acquire_many_owned(kib)
            .await
            .map_err(|_| ApiError::Internal)
    }
}

/// Reads a whole body of at most `limit` bytes into one buffer (sized from the declared
/// length, so it is never copied while it grows), once the budget has room for it; the
/// permit returned is held until the request is answered. Over the limit:
/// `too_large(size)`, after draining what the client still sends.
pub(crate) async fn read_capped(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
    budget: &BodyBudget,
    too_large: impl Fn(u64) -> ApiError,
) -> Result<(Bytes, OwnedSemaphorePermit), ApiError> {
    let mut stream = body.into_data_stream();
    let declared = declared_length(headers);
    if let Some(declared) = declared
        && declared > limit
    {
        let drained = drain(&mut stream).await;
        debug!(
            declared,
            limit, drained, "request body refused from its declared length"
        );
        return Err(too_large(declared));
    }
    let permit = budget.take(declared.unwrap_or(limit).min(limit)).await?;
    let capacity = declared.unwrap_or(0).min(limit);
    let mut buffer = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::BadRequest(format!("the request body could not be read: {e}"))
        })?;
        let size = (buffer.len() as u64).saturating_add(chunk.len() as u64);
        if size > limit {
            let drained = drain(&mut stream).await;
            debug!(limit, drained, "request body refused once over the limit");
            return Err(too_large(size.saturating_add(drained)));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok((Bytes::from(buffer), permit))
}

/// Whether the request says its body is JSON (`application/json` or `…+json`), the
/// rule `axum::Json` applies.
pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    kind == "application" && (subtype == "json" || subtype.ends_with("+json"))
}

/// Parses a JSON request body (already read with [`read_capped`]).
pub(crate) fn json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if !is_json(headers) {
        return Err(ApiError::Rejected(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`".into(),
        ));
    }
    let mut reader = serde_json::Deserializer::from_slice(body);
    let parsed: T = serde_path_to_error::deserialize(&mut reader).map_err(json_refusal)?;
    reader.end().map_err(|e| json_refusal_at(".", e))?;
    Ok(parsed)
}

/// Reads a JSON value already parsed (an item of a batch) into `T`, refused like a
/// body.
pub(crate) fn json_value<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(json_refusal)
}

/// A `400` naming where in the body the value was wrong (`signer.fullname`,
/// `attachments[0].name`) and serde's reason (for an unknown field, its name and the
/// fields allowed).
fn json_refusal<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ApiError {
    let path = e.path().to_string();
    json_refusal_at(&path, e.into_inner())
}

fn json_refusal_at(path: &str, e: impl std::fmt::Display) -> ApiError {
    if path == "." {
        ApiError::BadRequest(format!("Failed to deserialize the JSON body: {e}"))
    } else {
        ApiError::BadRequest(format!("Failed to deserialize the JSON body: {path}: {e}"))
    }
}

/// The exact decoded length of valid padded base64 `text` (an invalid text is refused
/// when decoded; this is only the size it would have).
pub(crate) fn decoded_len(text: &[u8]) -> u64 {
    let padding = text.iter().rev().take(2).filter(|&&b| b == b'=').count() as u64;
    ((text.len() / 4) as u64)
        .saturating_mul(3)
        .saturating_sub(padding)
}

/// Decodes padded standard base64 piece by piece into `emit`. An error names the
/// offset in the whole text.
pub(crate) fn decode_pieces<E>(
    text: &[u8],
    mut emit: impl FnMut(&[u8]) -> Result<(), E>,
    invalid: impl Fn(base64::DecodeError) -> E,
) -> Result<u64, E> {
    let mut decoded = Vec::with_capacity(DECODE_PIECE / 4 * 3);
    let mut size = 0u64;
    let mut base = 0usize;
    for piece in text.chunks(DECODE_PIECE) {
        // Padding ends the whole text: a piece before the last ending in `=` would
        // decode on its own, where the whole text is invalid.
        let last = base.saturating_add(piece.len()) >= text.len();
        if !last && piece.last() == Some(&b'=') {
            return Err(invalid(base64::DecodeError::InvalidPadding));
        }
        decoded.clear();
        base64::engine::general_purpose::STANDARD
            .decode_vec(piece, &mut decoded)
            .map_err(|e| {
                use base64::DecodeError as D;
                invalid(match e {
                    D::InvalidByte(at, byte) => D::InvalidByte(at.saturating_add(base), byte),
                    D::InvalidLastSymbol(at, byte) => {
                        D::InvalidLastSymbol(at.saturating_add(base), byte)
                    }
                    other => other,
                })
            })?;
        size = size.saturating_add(decoded.len() as u64);
        emit(&decoded)?;
        base = base.saturating_add(piece.len());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(text: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        decode_pieces(
            text,
            |piece| {
                out.extend_from_slice(piece);
                Ok::<(), String>(())
            },
            |e| e.to_string(),
        )?;
        Ok(out)
    }

    #[test]
    fn pieces_decode_like_a_whole_decode() {
        let engine = base64::engine::general_purpose::STANDARD;
        for len in [
            0usize,
            1,
            2,
            3,
            DECODE_PIECE / 4 * 3 - 1,
            DECODE_PIECE / 4 * 3,
            DECODE_PIECE / 4 * 3 + 1,
            3 * DECODE_PIECE + 7,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let text = engine.encode(&bytes);
            assert_eq!(whole(text.as_bytes()).unwrap(), bytes, "{len}");
            assert_eq!(decoded_len(text.as_bytes()), len as u64, "{len}");
        }
        // An invalid byte in the second piece is reported at its offset in the whole.
        let mut text = engine.encode(vec![7u8; DECODE_PIECE]).into_bytes();
        text[DECODE_PIECE + 5] = b'@';
        let expected = engine.decode(&text).unwrap_err().to_string();
        assert_eq!(whole(&text).unwrap_err(), expected);
        // Padding in the middle is refused as a whole decode refuses it.
        let mut text = engine.encode(vec![7u8; DECODE_PIECE]).into_bytes();
        text[DECODE_PIECE - 1] = b'=';
        assert!(whole(&text).is_err());
        assert!(engine.decode(&text).is_err());
        assert!(whole(b"abc").is_err());
    }

    #[tokio::test]
    async fn the_budget_lets_two_bodies_at_the_cap_in_at_once() {
        let cap = 1024 * 1024;
        let budget = BodyBudget::new(cap);
        let first = budget.take(cap).await.unwrap();
        let second = budget.take(cap - 4096).await.unwrap();
        // A third waits until one of them is answered.
        let waiting = tokio::time::timeout(Duration::from_millis(100), budget.take(cap)).await;
        assert!(waiting.is_err());
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), budget.take(cap)).await;
        assert!(third.is_ok());
        drop(second);
        // Sizes near 2^64 take the whole budget, never more.
        drop(third);
        let all = budget.take(u64::MAX).await.unwrap();
        assert_eq!(all.num_permits(), budget.total_kib as usize);
    }

    #[test]
    fn json_media_types() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, v.parse().unwrap());
            h
        };
        assert!(is_json(&with("application/json")));
        assert!(is_json(&with("application/json; charset=utf-8")));
        assert!(is_json(&with("application/problem+json")));
        assert!(!is_json(&with("text/plain")));
        assert!(!is_json(&HeaderMap::new()));
    }
}
