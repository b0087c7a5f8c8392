//! The broker's error type and its one mapping to `tonic::Status`.
//!
//! Messages for rule violations say what was wrong so the sender can fix it; storage
//! and internal failures are logged here and reach the caller only as a generic
//! message, never with paths or internals.

use lienthong_proto::ProtocolError;
use tonic::{Code, Status};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    /// The caller must first ask where to resume (a streamed upload with a gap):
    /// ABORTED, which a sender retries.
    #[error("{0}")]
    ResumeConflict(String),
    /// RESOURCE_EXHAUSTED that no retry changes (a document over the size limit),
    /// marked so with the `lienthong-permanent` metadata.
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing or reading a streamed document's files failed.
    #[error("attachment file: {0}")]
    Spool(String),
    #[error("{path}: {detail}")]
    Config { path: String, detail: String },
    #[error("cannot serve: {0}")]
    Serve(String),
}

impl From<BrokerError> for Status {
    fn from(error: BrokerError) -> Self {
        match error {
            BrokerError::Unauthenticated(m) => Status::unauthenticated(m),
            BrokerError::PermissionDenied(m) => Status::permission_denied(m),
            BrokerError::InvalidArgument(m) => Status::invalid_argument(m),
            BrokerError::Protocol(
                e @ (ProtocolError::SignerNotSender { .. } | ProtocolError::SignerRefused { .. }),
            ) => Status::permission_denied(e.to_string()),
            BrokerError::Protocol(e) => Status::invalid_argument(e.to_string()),
            BrokerError::AlreadyExists(m) => Status::already_exists(m),
            BrokerError::ResourceExhausted(m) => Status::resource_exhausted(m),
            BrokerError::NotFound(m) => Status::not_found(m),
            BrokerError::Unavailable(m) => Status::unavailable(m),
            BrokerError::ResumeConflict(m) => Status::aborted(m),
            BrokerError::TooLarge(m) => {
                let mut status = Status::resource_exhausted(m);
                status.metadata_mut().insert(
                    "lienthong-permanent",
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                status
            }
            BrokerError::Spool(detail) => {
                tracing::error!(error = %detail, "attachment file error");
                Status::unavailable("the broker could not store the attachment; retry later")
            }
            BrokerError::Store(StoreError::Commit(e)) => {
                tracing::error!(error = %e, "store cannot make writes durable");
                Status::new(
                    Code::ResourceExhausted,
                    "the broker cannot store documents right now (storage full or failing); retry later",
                )
            }
            BrokerError::Store(e) => {
                tracing::error!(error = %e, "store error");
                Status::internal(
                    "internal storage error; the operator has been told in the broker log",
                )
            }
            BrokerError::Config { .. } | BrokerError::Serve(_) => {
                tracing::error!(%error, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
