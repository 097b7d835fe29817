//! The crate's error type, and the one place where errors become gRPC statuses.

use tonic::{Code, Status};

/// Everything that can go wrong inside likeness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something unusable; `field` names where (`items[3].vector`).
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// A collection or model that does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A collection name that is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A limit was hit; retrying later (or smaller) may work.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The daemon is still recovering or is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// sled failed.
    #[error("storage: {0}")]
    Storage(#[from] sled::Error),
    /// usearch failed.
    #[error("index: {0}")]
    Index(String),
    /// A file operation failed (snapshots, data dir).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A model failed to load or to run.
    #[error("model: {0}")]
    Model(String),
    /// A blocking worker panicked or was cancelled.
    #[error("worker: {0}")]
    Worker(String),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Bad input in `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefixes the field of an InvalidArgument (a stream message's index, say).
    pub fn within(self, prefix: &str) -> Self {
        match self {
            Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                field: format!("{prefix}{field}"),
                reason,
            },
            other => other,
        }
    }
}

impl From<cxx::Exception> for Error {
    fn from(e: cxx::Exception) -> Self {
        Error::Index(e.what().to_string())
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Worker(e.to_string())
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        // Exhaustive on purpose: a new variant must decide its status here.
        let code = match &e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Storage(_)
            | Error::Index(_)
            | Error::Io(_)
            | Error::Worker(_)
            | Error::Model(_)
            | Error::Corrupt(_) => {
                tracing::error!(error = %e, "internal error");
                Code::Internal
            }
        };
        Status::new(code, e.to_string())
    }
}
