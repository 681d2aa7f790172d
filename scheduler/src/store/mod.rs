//! The store contract: one async [`Store`] trait over etcd and the embedded redb store.
//!
//! Everything Gantry keeps (desired state, assignments, node records, leases, leader
//! election) goes through [`Store`]. Two implementations pass the same conformance
//! suite (`tests/store_conformance.rs`):
//!
//! - [`EtcdStore`]: an etcd 3.4+ cluster through `etcd-client`;
//! - [`EmbeddedStore`]: a single-file redb database for a single-machine cluster,
//!   the way k3s uses SQLite instead of etcd.
//!
//! # The model (etcd's)
//!
//! - The store has one **revision**, a counter that every write transaction that changes
//!   something bumps by exactly one, however many keys it touches. A transaction that
//!   changes nothing (a failed compare with no `failure` ops, a delete of absent keys)
//!   leaves it alone. A fresh store is at revision 1.
//! - Every key carries `create_revision`, `mod_revision` and `version` (number of puts since
//!   creation). Compare-and-swap is [`Compare::ModRevision`] in a [`Store::txn`]; revision
//!   0 means "the key is absent".
//! - [`Store::watch`] delivers every [`Event`] with revision `>= from` under a prefix, in
//!   revision order (events of one transaction in the order of its ops), with no gaps and
//!   no duplicates. History before the compaction revision is gone: asking for it yields
//!   [`StoreError::Compacted`], and the caller re-lists and watches again.
//! - Leases have a TTL; keys put with a lease are deleted (one revision per lease) when it
//!   expires or is revoked. [`Store::keep_alive`] refreshes it once.
//!
//! # Differences that the contract allows
//!
//! - etcd rounds lease TTLs up to whole seconds and raises them to its minimum
//!   (2 s with default election settings); the embedded store keeps millisecond TTLs.
//! - etcd rejects transactions with more than `--max-txn-ops` (default 128) operations
//!   and requests over `--max-request-bytes` (default 1.5 MiB); the embedded store has
//!   no such limits. Callers that must work on both keep plans under those limits.
//! - Both stores answer `range` at a past revision down to the compaction revision
//!   (the embedded store rebuilds it from its commit log).
//! - After a restart, leases of both stores get their full TTL again (etcd does the same
//!   on leader change), so a lease never expires early because of a restart.

mod embedded;
mod error;
mod etcd;

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;

pub use embedded::{EmbeddedOptions, EmbeddedStore};
pub use error::{BoxError, Result, StoreError};
pub use etcd::{EtcdOptions, EtcdStore};

/// A store revision: a logical clock bumped once per write transaction that changes data.
pub type Revision = i64;

/// The identifier of a lease granted by [`Store::grant_lease`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key with its value and bookkeeping, as stored at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value; empty in delete events.
    pub value: Vec<u8>,
    /// The revision of the put that created this key (since its last deletion); 0 in delete events.
    pub create_revision: Revision,
    /// The revision of the last change; for delete events, the revision of the delete.
    pub mod_revision: Revision,
    /// Number of puts since creation (1 after the first put); 0 in delete events.
    pub version: i64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction; all conditions of a [`Store::txn`] must hold for its
/// `success` ops to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals `revision`; 0 means the key is absent.
    ModRevision {
        /// The key to check.
        key: Vec<u8>,
        /// The expected `mod_revision`.
        revision: Revision,
    },
    /// The key exists and its value equals `value` (never holds for an absent key).
    Value {
        /// The key to check.
        key: Vec<u8>,
        /// The expected value.
        value: Vec<u8>,
    },
    /// The key exists.
    Exists {
        /// The key to check.
        key: Vec<u8>,
    },
    /// The key does not exist.
    Absent {
        /// The key to check.
        key: Vec<u8>,
    },
}

impl Compare {
    /// `key`'s `mod_revision == revision` (0: absent).
    pub fn mod_revision(key: impl Into<Vec<u8>>, revision: Revision) -> Self {
        Compare::ModRevision {
            key: key.into(),
            revision,
        }
    }

    /// `key` exists with exactly `value`.
    pub fn value(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Compare::Value {
            key: key.into(),
            value: value.into(),
        }
    }

    /// `key` exists.
    pub fn exists(key: impl Into<Vec<u8>>) -> Self {
        Compare::Exists { key: key.into() }
    }

    /// `key` does not exist.
    pub fn absent(key: impl Into<Vec<u8>>) -> Self {
        Compare::Absent { key: key.into() }
    }

    /// The key this condition reads.
    pub fn key(&self) -> &[u8] {
        match self {
            Compare::ModRevision { key, .. }
            | Compare::Value { key, .. }
            | Compare::Exists { key }
            | Compare::Absent { key } => key,
        }
    }

    /// Evaluates the condition against the current state of its key.
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        match self {
            Compare::ModRevision { revision, .. } => {
                current.map_or(0, |kv| kv.mod_revision) == *revision
            }
            Compare::Value { value, .. } => current.is_some_and(|kv| kv.value == *value),
            Compare::Exists { .. } => current.is_some(),
            Compare::Absent { .. } => current.is_none(),
        }
    }
}

/// A write operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create or replace `key`, attached to `lease` if given (detached otherwise).
    Put {
        /// The key to write.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
        /// The lease to attach the key to; it must exist.
        lease: Option<LeaseId>,
    },
    /// Delete `key` if present.
    Delete {
        /// The key to delete.
        key: Vec<u8>,
    },
    /// Delete every key starting with `prefix` (every key when `prefix` is empty).
    DeletePrefix {
        /// The prefix of the keys to delete.
        prefix: Vec<u8>,
    },
}

impl Op {
    /// Put without a lease.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    /// Put attached to `lease`.
    pub fn put_with_lease(
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }

    /// Delete one key.
    pub fn delete(key: impl Into<Vec<u8>>) -> Self {
        Op::Delete { key: key.into() }
    }

    /// Delete every key under `prefix`.
    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Self {
        Op::DeletePrefix {
            prefix: prefix.into(),
        }
    }
}

/// The outcome of [`Store::txn`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether all compares held (so the `success` ops ran, else the `failure` ops).
    pub succeeded: bool,
    /// The store revision after the transaction: the transaction's own revision if it
    /// changed anything, else the revision it was evaluated at.
    pub revision: Revision,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The key was created or replaced.
    Put,
    /// The key was deleted (explicitly, by prefix, or by its lease ending).
    Delete,
}

/// One change delivered by [`Store::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change; for deletes only `key` and `mod_revision` (the revision of
    /// the delete) are set.
    pub kv: KeyValue,
    /// The key before the change, if it existed.
    pub prev: Option<KeyValue>,
}

impl Event {
    /// The revision of the transaction that made this change.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// The stream returned by [`Store::watch`]: events in revision order.
///
/// An `Err` item (e.g. [`StoreError::Compacted`] when history was compacted under a slow
/// watcher, [`StoreError::Unavailable`] when the backend stayed unreachable) is the last
/// item; the caller re-lists and watches again. Dropping the stream cancels the watch.
pub struct WatchStream {
    inner: Pin<Box<dyn Stream<Item = Result<Event>> + Send>>,
}

impl WatchStream {
    /// Wraps any stream of events as a watch stream.
    pub fn new(stream: impl Stream<Item = Result<Event>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(stream),
        }
    }
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl Stream for WatchStream {
    type Item = Result<Event>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A revisioned key-value store with transactions, watches and leases (etcd's model).
///
/// Object safe: services hold an `Arc<dyn Store>`.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    /// Reads one key at the current revision.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>>;

    /// Reads every key under `prefix` (all keys when empty), sorted by key, as one
    /// consistent snapshot at revision `at` (the current revision when `None`), and
    /// returns the snapshot's revision. Watching from that revision + 1 misses nothing.
    ///
    /// Errors: [`StoreError::Compacted`] below the compaction revision,
    /// [`StoreError::FutureRevision`] above the current one.
    async fn range(&self, prefix: &[u8], at: Option<Revision>)
    -> Result<(Vec<KeyValue>, Revision)>;

    /// Runs `success` if every compare holds, else `failure`, atomically, as one revision.
    ///
    /// Within one branch a key may be put at most once and may not be both put and
    /// deleted ([`StoreError::InvalidArgument`], as etcd). A put with a missing lease fails
    /// the whole transaction with [`StoreError::LeaseNotFound`] and changes nothing.
    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResult>;

    /// Streams every event under `prefix` with revision `>= from`, in order, with no gap,
    /// starting with history and continuing live. `from == 0` means "changes after now".
    ///
    /// Fails with [`StoreError::Compacted`] when `from` is below the compaction revision.
    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream>;

    /// Discards history below `revision`: reads and watches at `revision` and later still
    /// work, earlier ones fail with [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// Grants a lease that expires `ttl` after the grant or the last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Refreshes a lease once; [`StoreError::LeaseNotFound`] if it expired or was revoked.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;

    /// Ends a lease now, deleting its keys in one revision.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// The current revision of the store.
    async fn current_revision(&self) -> Result<Revision>;

    /// Unconditionally puts one key; returns the revision of the write.
    async fn put(&self, key: &[u8], value: &[u8]) -> Result<Revision> {
        let result = self
            .txn(Vec::new(), vec![Op::put(key, value)], Vec::new())
            .await?;
        Ok(result.revision)
    }

    /// Unconditionally deletes one key; returns the store revision afterwards.
    async fn delete(&self, key: &[u8]) -> Result<Revision> {
        let result = self
            .txn(Vec::new(), vec![Op::delete(key)], Vec::new())
            .await?;
        Ok(result.revision)
    }
}

/// Rejects transactions etcd would reject, so both implementations fail the same way:
/// empty keys, a key put twice, or a key both put and deleted in one branch.
pub(crate) fn validate_txn(compares: &[Compare], success: &[Op], failure: &[Op]) -> Result<()> {
    if compares.iter().any(|c| c.key().is_empty()) {
        return Err(invalid("compare on an empty key"));
    }
    validate_ops(success)?;
    validate_ops(failure)
}

fn validate_ops(ops: &[Op]) -> Result<()> {
    let mut puts: Vec<&[u8]> = Vec::new();
    for op in ops {
        if let Op::Put { key, .. } = op {
            if key.is_empty() {
                return Err(invalid("put of an empty key"));
            }
            puts.push(key);
        }
    }
    puts.sort_unstable();
    if let Some(pair) = puts.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(invalid(format!(
            "key {} is put twice in one transaction",
            String::from_utf8_lossy(pair[0])
        )));
    }
    for op in ops {
        match op {
            Op::Put { .. } => {}
            Op::Delete { key } => {
                if key.is_empty() {
                    return Err(invalid("delete of an empty key"));
                }
                if puts.binary_search(&key.as_slice()).is_ok() {
                    return Err(invalid(format!(
                        "key {} is both put and deleted in one transaction",
                        String::from_utf8_lossy(key)
                    )));
                }
            }
            Op::DeletePrefix { prefix } => {
                if let Some(key) = puts.iter().find(|key| key.starts_with(prefix)) {
                    return Err(invalid(format!(
                        "key {} is both put and deleted (by prefix {}) in one transaction",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(prefix)
                    )));
                }
            }
        }
    }
    Ok(())
}

fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::InvalidArgument {
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_matches_etcd_rules() {
        let ok = [
            Op::put("a", "1"),
            Op::put("b", "2"),
            Op::delete("c"),
            Op::delete("c"),
            Op::delete_prefix("/x/"),
            Op::delete_prefix("/x/y/"),
        ];
        assert!(validate_txn(&[Compare::exists("a")], &ok, &[]).is_ok());
        let bad: [&[Op]; 4] = [
            &[Op::put("a", "1"), Op::put("a", "2")],
            &[Op::put("a", "1"), Op::delete("a")],
            &[Op::put("/x/a", "1"), Op::delete_prefix("/x/")],
            &[Op::put("", "1")],
        ];
        for ops in bad {
            assert!(
                matches!(
                    validate_txn(&[], &[], ops),
                    Err(StoreError::InvalidArgument { .. })
                ),
                "{ops:?} should be rejected"
            );
        }
        assert!(validate_txn(&[Compare::absent("")], &[], &[]).is_err());
    }

    #[test]
    fn compares_treat_absent_as_revision_zero() {
        let kv = KeyValue {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            create_revision: 2,
            mod_revision: 3,
            version: 2,
            lease: None,
        };
        assert!(Compare::mod_revision("k", 0).holds(None));
        assert!(!Compare::mod_revision("k", 0).holds(Some(&kv)));
        assert!(Compare::mod_revision("k", 3).holds(Some(&kv)));
        assert!(!Compare::value("k", "").holds(None));
        assert!(Compare::value("k", "v").holds(Some(&kv)));
        assert!(Compare::absent("k").holds(None) && !Compare::exists("k").holds(None));
    }
}
