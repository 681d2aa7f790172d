//! The one error type of the store layer, shared by every implementation.

use super::{LeaseId, Revision};

/// A boxed error from a backend (etcd client, redb, the runtime), kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What can go wrong when talking to a [`Store`](super::Store).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The requested revision is older than the compaction point: its history is gone.
    /// A watcher must re-list (`range(prefix, None)`) and watch again from the new revision.
    #[error("revision {requested} has been compacted (history starts at revision {compacted})")]
    Compacted {
        /// The revision the caller asked for.
        requested: Revision,
        /// The compaction revision: the oldest revision still readable.
        compacted: Revision,
    },
    /// The requested revision has not been written yet.
    #[error("revision {requested} is in the future")]
    FutureRevision {
        /// The revision the caller asked for.
        requested: Revision,
    },
    /// The lease does not exist: never granted, revoked, or expired.
    #[error("lease {lease} not found")]
    LeaseNotFound {
        /// The lease the caller named.
        lease: LeaseId,
    },
    /// The request is malformed (duplicate keys in one transaction, empty key, bad revision).
    #[error("invalid store request: {reason}")]
    InvalidArgument {
        /// What is wrong with the request.
        reason: String,
    },
    /// The backend cannot be reached or did not answer in time; retrying may succeed.
    #[error("store unavailable during {operation}")]
    Unavailable {
        /// The store operation that failed, e.g. `"txn"`.
        operation: &'static str,
        /// The transport error or timeout.
        #[source]
        source: BoxError,
    },
    /// The backend answered with an error this layer does not classify.
    #[error("store backend failed during {operation}")]
    Backend {
        /// The store operation that failed.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// Stored or received data could not be decoded.
    #[error("corrupt store data: {detail}")]
    Corrupt {
        /// What could not be decoded, and where.
        detail: String,
    },
    /// The store was closed (dropped) while the operation or watch was in progress.
    #[error("store closed")]
    Closed,
}

impl StoreError {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// Shorthand for results of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
