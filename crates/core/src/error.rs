//! The errors a store answers with. Each kind maps to exactly one HTTP problem type in
//! `skald-server`.

use crate::{EventId, ExpectedRevision, Position, Revision, StreamName};

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a store operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is well formed but describes an event or query the store will not accept:
    /// a bad stream name, an empty type, an event over the size limit.
    #[error("invalid event: {reason}")]
    InvalidEvent {
        /// What is wrong, naming the field.
        reason: String,
    },

    /// The stream's current revision is not the one the append expected.
    #[error(
        "wrong expected revision on stream {stream}: expected {expected}, actual {}",
        actual.map_or_else(|| "no stream".to_owned(), |r| r.to_string())
    )]
    WrongExpectedRevision {
        /// The stream appended to.
        stream: StreamName,
        /// What the append expected.
        expected: ExpectedRevision,
        /// The stream's last revision, or `None` when the stream does not exist.
        actual: Option<Revision>,
    },

    /// The append's DCB condition failed: an event matching the condition's query exists
    /// after the condition's position.
    #[error("append condition failed: event at position {position} matches the condition's query")]
    ConditionFailed {
        /// The position of the first matching event.
        position: Position,
    },

    /// An event id is already stored for a different event (or a different append).
    #[error("event id {id} is already used by the event at position {position}: {reason}")]
    IdReused {
        /// The reused id.
        id: EventId,
        /// Where the stored event with that id is.
        position: Position,
        /// How the stored event differs from the one sent.
        reason: String,
        /// The stream that holds the stored event, when the store knows it: an API shows the
        /// position and the reason only to callers who may read it.
        stream: Option<StreamName>,
    },

    /// The stream has no events.
    #[error("stream {0} not found")]
    StreamNotFound(StreamName),

    /// No persistent subscription group has this name.
    #[error("persistent subscription group {0:?} not found")]
    GroupNotFound(String),

    /// A persistent subscription group with this name exists already.
    #[error("persistent subscription group {0:?} already exists; update it, or delete it first")]
    GroupExists(String),

    /// No saga definition or instance by that name or id.
    #[error("{0}")]
    SagaNotFound(String),

    /// A saga definition that cannot be registered, with every problem's line and column.
    #[error("{0}")]
    InvalidSaga(String),

    /// A saga request that conflicts with what is stored: a version reused with other
    /// content, a cancel past the pivot, a retry of an instance that is not stuck.
    #[error("{0}")]
    SagaConflict(String),

    /// The disk is full; nothing of the failed append was stored.
    #[error("storage is full: {0}")]
    StorageFull(String),

    /// The store is closing or has stopped accepting writes; retry against a running server.
    #[error("store unavailable: {0}")]
    Unavailable(String),

    /// Stored data failed its integrity check. Never skipped silently.
    #[error("corruption in {file} at offset {offset}: {reason}")]
    Corruption {
        /// The damaged file.
        file: String,
        /// The byte offset of the damaged record.
        offset: u64,
        /// What check failed.
        reason: String,
    },

    /// A setting the caller gave cannot be used: a server URL that does not parse, TLS
    /// material that does not load. Trying again will not help; the setting must change.
    #[error("invalid setting: {0}")]
    InvalidConfig(String),

    /// Any other I/O failure of the backend.
    #[error("storage I/O error: {0}")]
    Io(String),

    /// A remote store refused the caller: missing or wrong credentials, no rule that allows
    /// the operation, or an exhausted rate limit. Only clients of a server see this.
    #[error("{detail}")]
    Refused {
        /// The problem kind: `unauthenticated`, `forbidden` or `rate-limited`.
        kind: String,
        /// Why, as the server said it.
        detail: String,
    },
}

impl Error {
    /// Builds an [`Error::InvalidEvent`].
    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::InvalidEvent {
            reason: reason.into(),
        }
    }
}
