//! lienthong-proto: the wire schema and the protocol rules every other crate uses.
//!
//! Layout:
//! - [`pb`]: the generated protobuf messages and gRPC services (`proto/lienthong/v1`).
//! - [`agency`]: agency codes and the identity a certificate carries in its SAN URI.
//! - [`signing`]: signing keys, trust anchors, and signatures over exact bytes with a
//!   domain-separation prefix, one at a time or many under one batch signature.
//! - [`merkle`]: the hash tree and inclusion proofs of batch signatures.
//! - [`document`]: the document header rules: encode once, sign, verify, attachments.
//! - [`receipt`]: submission and delivery receipts.
//! - [`revocation`]: CRLs, for TLS clients and document signers.
//! - [`spool`]: attachment files received chunk by chunk (streamed documents).
//! - [`tls`]: mutual-TLS configuration for tonic from PEM files.
//! - [`error`]: the one error type for protocol rule violations.
//!
//! Invariant: nobody outside this crate encodes signed bytes or checks a signature.
#![forbid(unsafe_code)]

pub mod agency;
pub mod document;
pub mod error;
pub mod merkle;
pub mod metrics;
pub mod receipt;
pub mod revocation;
pub mod signing;
pub mod spool;
pub mod store_format;
pub mod tls;

/// Generated code for `lienthong.v1`.
#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod pb {
    tonic::include_proto!("lienthong.v1");
}

pub use agency::{AgencyCode, PeerIdentity};
pub use error::ProtocolError;
pub use signing::{SigningKey, TrustAnchors};

/// Milliseconds since the Unix epoch, now. Clamped to 0 for clocks set before 1970.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Unix milliseconds as RFC 3339 text in UTC, e.g. `2026-11-25T23:10:49.434Z`.
pub fn rfc3339_ms(ms: i64) -> Option<String> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}
