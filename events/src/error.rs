//! Errors of the event store. Callers match on [`StoreError::Conflict`] and
//! [`StoreError::ClaimTaken`]; everything else is an infrastructure failure.

use crate::envelope::StreamId;

/// Why an append or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another command appended to the stream first (optimistic concurrency).
    #[error("stream {stream} changed concurrently (expected version {expected}, found {actual:?})")]
    Conflict {
        /// The stream whose version did not match.
        stream: StreamId,
        /// The version the command expected.
        expected: u64,
        /// The version found, when known.
        actual: Option<u64>,
    },
    /// A unique fact (such as an email in a tenant) already belongs to another stream.
    /// The value is not part of the message: it may be personal data.
    #[error("unique claim '{scope}' is already taken")]
    ClaimTaken {
        /// The claim's scope, such as `email`.
        scope: String,
    },
    /// The request itself is malformed (a programming error in the caller).
    #[error("invalid append: {0}")]
    Invalid(String),
    /// A stored payload could not be read as the current event type.
    #[error("cannot decode event {event_type} v{schema_version}: {reason}")]
    Decode {
        /// Stored event type.
        event_type: String,
        /// Stored schema version.
        schema_version: u32,
        /// What went wrong.
        reason: String,
    },
    /// The database failed or refused.
    #[error("event store: {0}")]
    Backend(String),
}

impl StoreError {
    /// True for errors that a retry of the whole command may resolve.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::Backend(error.to_string())
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Backend(error.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> Self {
        StoreError::Backend(format!("migration failed: {error}"))
    }
}

impl From<rusqlite::types::FromSqlError> for StoreError {
    fn from(error: rusqlite::types::FromSqlError) -> Self {
        StoreError::Backend(error.to_string())
    }
}
