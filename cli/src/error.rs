//! CLI errors and their exit codes: 1 when the operation failed or the document is
//! invalid, 2 for bad usage or configuration.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage: a missing or malformed argument.
    #[error("{0}")]
    Usage(String),
    /// A configuration file or a file it names cannot be used.
    #[error("{path}: {detail}")]
    Config { path: PathBuf, detail: String },
    /// The operation was attempted and failed.
    #[error("{0}")]
    Failed(String),
    /// `verify` found the document invalid.
    #[error("INVALID: {0}")]
    Invalid(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Config { .. } => 2,
            CliError::Failed(_) | CliError::Invalid(_) => 1,
        }
    }

    pub fn config(path: impl Into<PathBuf>, detail: impl std::fmt::Display) -> Self {
        CliError::Config {
            path: path.into(),
            detail: detail.to_string(),
        }
    }
}

impl From<lienthong_proto::tls::PemFileError> for CliError {
    fn from(e: lienthong_proto::tls::PemFileError) -> Self {
        CliError::Config {
            path: e.path,
            detail: e.detail,
        }
    }
}
