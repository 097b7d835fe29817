//! The crate's error type, free of any transport: `grpc::status` is the one place where
//! errors become gRPC statuses.
//!
//! Bad input names where it is with a typed [`Field`] path (`items[3].vector[7]`), built
//! and re-rooted structurally, so a layer that calls another (an embedder working on
//! "its" `inputs[2]`) can say which of *its caller's* fields that was without parsing
//! strings.

use std::borrow::Cow;
use std::fmt;

/// One step of a field path: a name or an index into a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Name(Cow<'static, str>),
    Index(usize),
}

/// Where in a request something is: `items[3].input.image`. Empty means "the request".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Field(Vec<Step>);

impl Field {
    /// A path starting at a named field.
    pub fn name(name: impl Into<Cow<'static, str>>) -> Field {
        Field(vec![Step::Name(name.into())])
    }

    /// A path starting at an index into the caller's list (`[3]`): what a callee that
    /// works on a list reports, for its caller to re-root with [`Error::rebase`].
    pub fn index(i: usize) -> Field {
        Field(vec![Step::Index(i)])
    }

    /// `self[i]`.
    pub fn at(mut self, i: usize) -> Field {
        self.0.push(Step::Index(i));
        self
    }

    /// `self.name`.
    pub fn field(mut self, name: impl Into<Cow<'static, str>>) -> Field {
        self.0.push(Step::Name(name.into()));
        self
    }

    /// `prefix` followed by this path.
    pub fn under(self, prefix: &Field) -> Field {
        let mut steps = prefix.0.clone();
        steps.extend(self.0);
        Field(steps)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn steps(&self) -> &[Step] {
        &self.0
    }
}

impl From<&'static str> for Field {
    fn from(name: &'static str) -> Field {
        Field::name(name)
    }
}

impl From<String> for Field {
    fn from(name: String) -> Field {
        Field::name(name)
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            match step {
                Step::Name(n) if i == 0 => write!(f, "{n}")?,
                Step::Name(n) => write!(f, ".{n}")?,
                Step::Index(j) => write!(f, "[{j}]")?,
            }
        }
        Ok(())
    }
}

/// Everything that can go wrong inside likeness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something unusable; `field` names where (`items[3].vector`).
    #[error("{field}: {reason}")]
    InvalidArgument { field: Field, reason: String },
    /// A collection, item, model or tower that does not exist; `field` names the request
    /// field that asked for it, when there is one.
    #[error("{}{what} not found", prefix(.field))]
    NotFound { field: Field, what: String },
    /// A collection name that is taken.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is valid but the collection's state does not allow it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller's token may not do this part of a request (a read token asking a
    /// Session to write back).
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit was hit; retrying later (or smaller) may work.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The daemon is still recovering or is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Writes to the data dir fail (a full disk, an I/O error): writes are refused until
    /// the storage probe finds it writable again; reads go on. The text says why and
    /// what brings writes back.
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    /// The disk failed under sled outside the live store's own mapping (which turns its
    /// I/O errors into [`Error::StorageUnavailable`] and marks itself failed): a backup's
    /// export, an open. Still the disk, not a bug: the client may retry later.
    #[error("storage unavailable: {0}; writes resume once the data dir takes writes again")]
    StorageIo(std::io::Error),
    /// sled failed other than by I/O (corruption, an unsupported operation, a bug).
    #[error("storage: {0}")]
    Storage(String),
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

fn prefix(field: &Field) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Bad input in `field`.
    pub fn invalid(field: impl Into<Field>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// `what` does not exist (no request field to blame).
    pub fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound {
            field: Field::default(),
            what: what.into(),
        }
    }

    /// `what`, which the request's `field` names, does not exist.
    pub fn not_found_at(field: impl Into<Field>, what: impl Into<String>) -> Self {
        Error::NotFound {
            field: field.into(),
            what: what.into(),
        }
    }

    /// Puts the field of an error under `prefix` (a stream message, say:
    /// `messages[4]` + `items[2].id`).
    pub fn under(self, prefix: &Field) -> Self {
        match self {
            Error::NotFound { ref field, .. } if field.is_empty() => self,
            other => other.map_field(|f| f.under(prefix)),
        }
    }

    /// Re-roots a callee's field that starts with an index into the list the caller
    /// handed it (`[2].image`) at the caller's own field for that element
    /// (`queries[7].input` + `.image`). Other errors pass through.
    pub fn rebase(self, root: impl Fn(usize) -> Field) -> Self {
        self.map_field(|field| match field.0.as_slice() {
            [Step::Index(i), rest @ ..] => {
                let mut f = root(*i);
                f.0.extend(rest.iter().cloned());
                f
            }
            _ => field,
        })
    }

    /// Like [`Error::rebase`] for a callee that works on a list of pairs: a field that
    /// starts `[j].a` or `[j].b` is re-rooted at `root(j, "a" | "b")`.
    pub fn rebase_pair(self, root: impl Fn(usize, &str) -> Field) -> Self {
        self.map_field(|field| match field.0.as_slice() {
            [Step::Index(j), Step::Name(side), rest @ ..] => {
                let mut f = root(*j, side);
                f.0.extend(rest.iter().cloned());
                f
            }
            _ => field,
        })
    }

    /// Rewrites the field of the errors that name one.
    fn map_field(self, fix: impl FnOnce(Field) -> Field) -> Self {
        match self {
            Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                field: fix(field),
                reason,
            },
            Error::NotFound { field, what } => Error::NotFound {
                field: fix(field),
                what,
            },
            other => other,
        }
    }

    /// The field an error names, if any.
    pub fn field(&self) -> Option<&Field> {
        match self {
            Error::InvalidArgument { field, .. } | Error::NotFound { field, .. } => Some(field),
            _ => None,
        }
    }

    /// Storage, index, file, model and worker failures: the daemon's problem, not the
    /// caller's. Their detail goes to the log, not to clients.
    pub fn is_internal(&self) -> bool {
        match self {
            Error::InvalidArgument { .. }
            | Error::NotFound { .. }
            | Error::AlreadyExists(_)
            | Error::FailedPrecondition(_)
            | Error::PermissionDenied(_)
            | Error::ResourceExhausted(_)
            | Error::Unavailable(_)
            | Error::StorageUnavailable(_)
            | Error::StorageIo(_) => false,
            Error::Storage(_)
            | Error::Index(_)
            | Error::Io(_)
            | Error::Model(_)
            | Error::Worker(_)
            | Error::Corrupt(_) => true,
        }
    }
}

/// sled's errors arrive classified: an I/O error is the disk's, anything else is
/// internal.
impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => Error::StorageIo(io),
            other => Error::Storage(other.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_and_rebase() {
        let f = Field::name("items").at(3).field("vector").at(7);
        assert_eq!(f.to_string(), "items[3].vector[7]");
        let e = Error::invalid(Field::index(2).field("image"), "undecodable");
        let e = e.rebase(|i| Field::name("queries").at(i + 5).field("input"));
        assert_eq!(e.to_string(), "queries[7].input.image: undecodable");
        let e = Error::invalid(Field::name("items").at(0).field("id"), "empty");
        let e = e.under(&Field::name("messages").at(4));
        assert_eq!(e.to_string(), "messages[4].items[0].id: empty");
        let nf = Error::not_found_at(Field::name("query").field("id"), "item \"x\"");
        assert_eq!(nf.to_string(), "query.id: item \"x\" not found");
        assert_eq!(
            Error::not_found("collection \"c\"").to_string(),
            "collection \"c\" not found"
        );
    }
}
