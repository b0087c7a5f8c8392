//! Error types of the agent.
//!
//! [`AgentError`] is what [`crate::run`] returns: every variant names the file,
//! directory or setting involved so that an operator knows what to fix.
//! [`StoreError`] is the internal error of the sled store; it is never shown to API
//! clients (they get a generic message), only logged.

use std::path::PathBuf;

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The data directory holds something that is not this agent's store.
    #[error("{path}: not a lienthong agent data directory ({detail})")]
    NotOurs { path: PathBuf, detail: String },
    /// The store could not be opened or used (corrupt, locked by another process, ...).
    #[error("{path}: agent store is corrupt or unusable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    /// A file or directory could not be created, read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration is inconsistent (e.g. a signing key for another agency).
    #[error("configuration: {0}")]
    Config(String),
    /// A key or certificate could not be used.
    #[error("{what}: {source}")]
    Key {
        what: &'static str,
        #[source]
        source: lienthong_proto::ProtocolError,
    },
    /// The API token file cannot be used (unreadable, too open, not a file, malformed).
    #[error("API token: {0}")]
    ApiToken(#[source] crate::api_guard::TokenError),
    /// The local HTTP API stopped with an error.
    #[error("local HTTP API: {0}")]
    Api(#[source] std::io::Error),
    /// The store failed while running.
    #[error("agent store: {0}")]
    Store(#[from] StoreError),
}

/// A failure of the agent's sled store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("syncing {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("stored record {key} is unreadable: {detail}")]
    Record { key: String, detail: String },
    #[error("background task failed: {0}")]
    Task(String),
    /// A streamed document's attachment files.
    #[error("attachment files: {0}")]
    Files(String),
}

impl From<sled::transaction::TransactionError<StoreError>> for StoreError {
    fn from(e: sled::transaction::TransactionError<StoreError>) -> Self {
        match e {
            sled::transaction::TransactionError::Abort(inner) => inner,
            sled::transaction::TransactionError::Storage(s) => StoreError::Sled(s),
        }
    }
}
