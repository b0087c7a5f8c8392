//! Submission and delivery receipts: proofs that a document became durable at the
//! broker (submission) or in the recipient's inbox (delivery).
//!
//! A receipt names the message id and the SHA-256 of the exact signed header bytes, so
//! it proves receipt of exactly that document. Submission receipts are signed by the
//! broker's server certificate; delivery receipts by the recipient agency. Dead-letter
//! notices (a delivery ended without receipt: expired or refused) are signed by the
//! broker and name the recipient, the outcome and the reason.

use prost::Message;

use crate::ProtocolError;
use crate::agency::PeerIdentity;
use crate::pb::{Receipt, ReceiptKind, Signed};
use crate::signing::{Domain, SignerRole, SigningKey, TrustAnchors, VerifyTime, verify_signed};

/// The largest receipt accepted, encoded; real ones are a few hundred bytes.
pub const MAX_RECEIPT_BYTES: usize = 64 * 1024;

/// Encodes and signs a receipt.
pub fn sign_receipt(receipt: &Receipt, key: &SigningKey) -> Result<Signed, ProtocolError> {
    key.sign(Domain::Receipt, receipt.encode_to_vec().into())
}

/// Encodes and signs many receipts with one batch signature; the result is in the
/// order of `receipts`, each with its inclusion proof (none for a batch of one).
pub fn sign_receipts(receipts: &[Receipt], key: &SigningKey) -> Result<Vec<Signed>, ProtocolError> {
    let payloads = receipts
        .iter()
        .map(|r| bytes::Bytes::from(r.encode_to_vec()))
        .collect();
    key.sign_batch(Domain::Receipt, payloads)
}

/// What a receipt must say to count as evidence for a given document.
#[derive(Debug, Clone)]
pub struct ExpectedReceipt<'a> {
    pub kind: ReceiptKind,
    pub message_id: &'a str,
    pub header_sha256: &'a [u8],
    /// Delivery receipts: the agency that must have signed it. Dead-letter notices:
    /// the recipient they are about.
    pub recipient: Option<&'a str>,
    /// Check the chain now (a receipt arriving live) rather than at the receipt's own
    /// time (evidence checked later).
    pub live: bool,
}

/// Verifies a receipt's signature and chain, decodes it, and checks it matches
/// `expected`. Chains are checked at the time the receipt states, so old evidence stays
/// checkable after certificates expire; that time must itself fall in the chain's
/// validity.
pub fn verify_receipt(
    signed: &Signed,
    anchors: &TrustAnchors,
    expected: &ExpectedReceipt<'_>,
) -> Result<Receipt, ProtocolError> {
    if signed.payload.len() > MAX_RECEIPT_BYTES {
        return Err(ProtocolError::InvalidField {
            field: "receipt",
            rule: format!("at most {MAX_RECEIPT_BYTES} bytes"),
        });
    }
    // Decoding before the signature check is safe here only because nothing from the
    // decoded receipt is trusted until verify_signed has passed below.
    let receipt =
        Receipt::decode(signed.payload.as_ref()).map_err(|e| ProtocolError::Malformed {
            what: "receipt",
            detail: e.to_string(),
        })?;
    let role = match expected.kind {
        ReceiptKind::Submission | ReceiptKind::DeadLetter => SignerRole::Broker,
        _ => SignerRole::Agency,
    };
    let leaf = verify_signed(
        signed,
        Domain::Receipt,
        anchors,
        role,
        if expected.live {
            VerifyTime::Now
        } else {
            VerifyTime::AtMs(receipt.at_ms)
        },
    )?;
    if receipt.kind != expected.kind as i32 {
        return Err(ProtocolError::ReceiptMismatch { field: "kind" });
    }
    if receipt.message_id != expected.message_id {
        return Err(ProtocolError::ReceiptMismatch {
            field: "message_id",
        });
    }
    if receipt.header_sha256 != expected.header_sha256 {
        return Err(ProtocolError::ReceiptMismatch {
            field: "header_sha256",
        });
    }
    if let Some(recipient) = expected.recipient
        && receipt.recipient != recipient
    {
        return Err(ProtocolError::ReceiptMismatch { field: "recipient" });
    }
    if let (ReceiptKind::Delivery, Some(recipient)) = (expected.kind, expected.recipient) {
        match PeerIdentity::from_cert_der(leaf)? {
            PeerIdentity::Agency(code) if code.as_str() == recipient => {}
            other => {
                return Err(ProtocolError::ReceiptSigner {
                    signer: other.to_string(),
                    expected: recipient.to_owned(),
                });
            }
        }
    }
    Ok(receipt)
}
