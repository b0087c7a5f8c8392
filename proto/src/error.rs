//! The error type for every protocol rule. Variants are precise so that callers (and
//! tests) can tell exactly which rule failed; messages name the field and the rule.

/// A violation of a lienthong protocol rule, or a key or certificate that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("malformed {what}: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("field `{field}` is required")]
    MissingField { field: &'static str },
    #[error("field `{field}` is invalid: {rule}")]
    InvalidField { field: &'static str, rule: String },
    #[error("`{code}` is not a valid agency code (expected ddd.dd.dd.Xdd, e.g. 000.00.12.H31)")]
    InvalidAgencyCode { code: String },
    #[error("signature algorithm is unspecified or not supported")]
    UnsupportedAlgorithm,
    #[error("the signature does not match the signed bytes and the signer's key")]
    BadSignature,
    #[error("the batch signature's inclusion proof is invalid: {0}")]
    BadBatchProof(crate::merkle::ProofError),
    #[error("the signer's certificate key does not fit the signature algorithm")]
    AlgorithmMismatch,
    #[error("no signer certificate was provided")]
    NoCertificate,
    #[error("the signer's certificate is not issued by a trusted authority")]
    UnknownIssuer,
    #[error("the signer's certificate expired")]
    CertificateExpired,
    #[error("the signer's certificate is not valid yet")]
    CertificateNotYetValid,
    #[error("the signer's certificate is not valid for this use: {detail}")]
    CertificateInvalid { detail: String },
    #[error("the certificate carries no lienthong identity (SAN URI urn:lienthong:agency:<code>)")]
    NoIdentity,
    #[error("the certificate carries more than one lienthong identity")]
    AmbiguousIdentity,
    /// A verifier's registry refuses the signer's certificate (not bound to an agency,
    /// blocked, revoked...): `detail` says which and what to do.
    #[error("the signer's certificate is not accepted: {detail}")]
    SignerRefused { detail: String },
    #[error("the document is signed by {signer} but claims sender {sender}")]
    SignerNotSender { signer: String, sender: String },
    #[error("attachment {index} ({name}): {detail}")]
    AttachmentMismatch {
        index: usize,
        name: String,
        detail: String,
    },
    #[error("receipt does not match the document: {field} differs")]
    ReceiptMismatch { field: &'static str },
    #[error("receipt is signed by {signer}, expected {expected}")]
    ReceiptSigner { signer: String, expected: String },
    #[error("cannot use key: {detail}")]
    Key { detail: String },
    #[error("cannot read PEM {what}: {detail}")]
    Pem { what: &'static str, detail: String },
}
