//! The error type of the development PKI (`CertsDevError`).

use std::path::PathBuf;

/// Everything that can go wrong while minting or writing development certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsDevError {
    /// An agency code does not match `ddd.dd.dd.Xdd`.
    #[error("`{code}` is not a valid agency code (expected ddd.dd.dd.Xdd, e.g. 000.00.12.H31)")]
    InvalidAgencyCode {
        /// The rejected code.
        code: String,
    },
    /// rcgen refused to build, sign or parse something.
    #[error("cannot {action}: {source}")]
    Certificate {
        /// What was being done, e.g. "sign the certificate for agency 000.00.12.H31".
        action: String,
        /// The underlying rcgen error.
        source: rcgen::Error,
    },
    /// A name (URI, DNS name) cannot be put in a certificate, e.g. it is not ASCII.
    #[error("cannot put {kind} `{value}` in a certificate: {source}")]
    InvalidName {
        /// "URI" or "DNS name".
        kind: &'static str,
        /// The offending value.
        value: String,
        /// The underlying rcgen error.
        source: rcgen::Error,
    },
    /// A PEM input is not what was expected (wrong label, not PEM at all).
    #[error("cannot read {what}: {detail}")]
    InvalidPem {
        /// What was being read, e.g. "CA private key".
        what: &'static str,
        /// Why it was refused.
        detail: String,
    },
    /// The CA private key does not belong to the CA certificate.
    #[error("the CA private key does not match the CA certificate's public key")]
    CaKeyMismatch,
    /// Only one of `ca.crt` / `ca.key` exists, so the CA can neither be reused nor safely replaced.
    #[error(
        "found {present} but not {missing}: refusing to replace a half-present CA (remove it or restore the missing file)"
    )]
    IncompleteCa {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// Reading, writing or creating a file or directory failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// "read", "write", "create directory", ...
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

impl CertsDevError {
    pub(crate) fn cert(action: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Self {
        let action = action.into();
        move |source| CertsDevError::Certificate { action, source }
    }

    pub(crate) fn io(
        action: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| CertsDevError::Io {
            action,
            path,
            source,
        }
    }
}
