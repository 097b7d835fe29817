//! The one mapping from the crate's [`Error`] to a gRPC [`Status`].
//!
//! Exhaustive on purpose: a new error kind must decide its status here. Bad input is
//! INVALID_ARGUMENT naming the field; internal failures (storage, index, files, models,
//! workers) are logged with their detail under a request id, and the client gets a
//! generic message carrying that id, never sled's or usearch's text.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound { .. } => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            // The client may retry later; its acknowledged writes are safe.
            Error::StorageUnavailable(_) => Code::Unavailable,
            // The store maps its own I/O errors to StorageUnavailable (and marks itself
            // failed); one that reaches here another way is still the disk, not a bug.
            Error::StorageIo(_) => Code::Unavailable,
            Error::Storage(_)
            | Error::Index(_)
            | Error::Io(_)
            | Error::Model(_)
            | Error::Worker(_)
            | Error::Corrupt(_) => {
                let id = request_id();
                tracing::error!(request_id = %id, error = %e, "internal error");
                return Status::internal(format!(
                    "internal error (request id {id}); the daemon's log has the detail"
                ));
            }
        };
        Status::new(code, e.to_string())
    }
}

/// A request id for the log and the client: this process's random prefix and a counter.
fn request_id() -> String {
    static BOOT: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let boot = *BOOT.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish() as u32
    });
    format!("{boot:08x}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_hide_their_detail_behind_a_request_id() {
        let s = Status::from(Error::Index("usearch: out of memory at 0xdeadbeef".into()));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("usearch"), "{}", s.message());
        assert!(s.message().contains("request id"), "{}", s.message());
        let s = Status::from(Error::Storage("unsupported: x".into()));
        assert_eq!(s.code(), Code::Internal);
        let s = Status::from(Error::StorageIo(std::io::Error::from_raw_os_error(28)));
        assert_eq!(s.code(), Code::Unavailable, "a disk error is not a bug");
        assert!(
            s.message().starts_with("storage unavailable"),
            "{}",
            s.message()
        );
        let s = Status::from(Error::invalid("items", "must not be empty"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "items: must not be empty");
    }
}
