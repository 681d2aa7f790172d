//! The embedded store: the [`Store`] contract on a single redb file, for single-machine
//! clusters (what SQLite is to k3s).
//!
//! # Layout
//!
//! | table | key → value | what |
//! |---|---|---|
//! | `kv` | key → record (value, create, mod, version, lease) | current state |
//! | `log` | revision → events of that revision | commit log: watch history, past ranges |
//! | `meta` | name → i64 | `revision`, `compact_revision`, `next_lease_id`, `format` |
//! | `leases` | lease id → TTL in ms | granted leases |
//! | `lease_keys` | lease id →→ keys (multimap) | keys to delete when a lease ends |
//!
//! # Invariants
//!
//! - Every committed write transaction that changes a key bumps `revision` by one and writes
//!   exactly one `log` entry at the new revision, in the same redb transaction. So `log`
//!   holds every revision in `(compact_revision, revision]` that changed something.
//! - Writers are serialised by `Inner::writer` and publish their batch on the broadcast
//!   channel after commit and before releasing it: batches are published in revision order.
//! - Lease deadlines live in memory on the tokio clock (so tests run under paused time);
//!   only TTLs are persisted. On open every lease gets its full TTL again, as etcd does on
//!   leader change: a restart never expires a lease early.
//!
//! All redb work runs on the blocking pool (`spawn_blocking`), never on a runtime worker.

mod codec;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadableDatabase, ReadableTable, Table,
    TableDefinition, WriteTransaction,
};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tracing::{debug, warn};

use self::codec::{decode_events, decode_kv, encode_events, encode_kv};
use super::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError,
    TxnResult, WatchStream, validate_txn,
};

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");
const LEASE_KEYS: MultimapTableDefinition<i64, &[u8]> = MultimapTableDefinition::new("lease_keys");

const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_COMPACT: &str = "compact_revision";
const META_NEXT_LEASE: &str = "next_lease_id";
/// The on-disk layout this build reads and writes.
const FORMAT: i64 = 1;

/// How long to wait before retrying the revocation of an expired lease that failed.
const REVOKE_RETRY: Duration = Duration::from_secs(1);

/// Tuning of an [`EmbeddedStore`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// How many committed revisions the live watch channel buffers. A watcher that falls
    /// further behind is not lost: it re-reads the missed revisions from the commit log.
    pub watch_buffer: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self { watch_buffer: 1024 }
    }
}

/// The embedded [`Store`]: one redb file, a commit log for watches, leases expired by a
/// background task on the tokio clock.
///
/// Must be opened inside a tokio runtime. Dropping it closes the database once running
/// operations finish; open watch streams then end with [`StoreError::Closed`].
#[derive(Debug)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

/// One revision's worth of events, as published to live watchers.
#[derive(Debug)]
struct Batch {
    revision: Revision,
    events: Vec<Event>,
}

/// A write waiting for a group commit, and where its result goes.
struct Queued {
    write: Write,
    reply: std::sync::mpsc::SyncSender<Result<Written>>,
}

/// The writes that share group commits: transactions and lease grants (a registration storm
/// of nodes is a storm of both).
enum Write {
    Txn {
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    },
    GrantLease {
        ttl_ms: u64,
    },
}

/// The result of a [`Write`].
enum Written {
    Txn(TxnResult),
    Lease(LeaseId),
}

/// The first lease that `ops` put keys on and that does not exist.
fn missing_lease(tables: &Tables<'_>, ops: &[Op]) -> Result<Option<LeaseId>> {
    for op in ops {
        if let Op::Put {
            lease: Some(lease), ..
        } = op
            && tables
                .leases
                .get(lease.0)
                .map_err(db_error("txn"))?
                .is_none()
        {
            return Ok(Some(*lease));
        }
    }
    Ok(None)
}

/// The in-memory half of a lease.
#[derive(Debug, Clone, Copy)]
struct LeaseTimer {
    ttl: Duration,
    deadline: Instant,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Serialises write transactions and the publication of their batches.
    writer: Mutex<()>,
    /// Transactions waiting for the next group commit.
    queue: Mutex<Vec<Queued>>,
    events: broadcast::Sender<Arc<Batch>>,
    leases: Mutex<HashMap<i64, LeaseTimer>>,
    /// Wakes the lease expiry task: a deadline moved earlier, or the store is closing.
    lease_wake: Arc<Notify>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the expiry task notice that the store is gone.
        self.lease_wake.notify_one();
    }
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store in the redb file at `path`.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::open_with(path, EmbeddedOptions::default()).await
    }

    /// Opens the store at `path` with explicit options.
    pub async fn open_with(path: impl Into<PathBuf>, options: EmbeddedOptions) -> Result<Self> {
        let path = path.into();
        let open_path = path.clone();
        let (db, leases) = tokio::task::spawn_blocking(move || open_database(&open_path))
            .await
            .map_err(|err| join_error("open", err))??;
        let now = Instant::now();
        let timers = leases
            .into_iter()
            .map(|(id, ttl)| {
                (
                    id,
                    LeaseTimer {
                        ttl,
                        deadline: now + ttl,
                    },
                )
            })
            .collect();
        let (events, _) = broadcast::channel(options.watch_buffer.max(1));
        let inner = Arc::new(Inner {
            db,
            path,
            writer: Mutex::new(()),
            queue: Mutex::new(Vec::new()),
            events,
            leases: Mutex::new(timers),
            lease_wake: Arc::new(Notify::new()),
        });
        tokio::spawn(expire_leases(
            Arc::downgrade(&inner),
            inner.lease_wake.clone(),
        ));
        Ok(Self { inner })
    }

    /// The redb file this store lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Runs `f` on the blocking pool with the store.
async fn blocking<T: Send + 'static>(
    inner: Arc<Inner>,
    operation: &'static str,
    f: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(move || f(&inner))
        .await
        .map_err(|err| join_error(operation, err))?
}

fn join_error(operation: &'static str, err: tokio::task::JoinError) -> StoreError {
    StoreError::Backend {
        operation,
        source: Box::new(err),
    }
}

/// Wraps a redb error with the operation it broke.
fn db_error<E: Into<redb::Error>>(operation: &'static str) -> impl FnOnce(E) -> StoreError {
    move |err| StoreError::Backend {
        operation,
        source: Box::new(err.into()),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves no half-done state behind (redb
    // aborts the transaction on drop), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Opens the file, creates the tables and metadata of a new store, checks the format of an
/// existing one, and returns the persisted leases (id, TTL).
fn open_database(path: &Path) -> Result<(Database, Vec<(i64, Duration)>)> {
    const OP: &str = "open";
    let db = Database::create(path).map_err(db_error(OP))?;
    let wtx = db.begin_write().map_err(db_error(OP))?;
    let leases = {
        let mut meta = wtx.open_table(META).map_err(db_error(OP))?;
        let format = meta
            .get(META_FORMAT)
            .map_err(db_error(OP))?
            .map(|f| f.value());
        match format {
            Some(FORMAT) => {}
            Some(format) => {
                return Err(StoreError::Corrupt {
                    detail: format!(
                        "{} has store format {}, this build reads format {FORMAT}",
                        path.display(),
                        format
                    ),
                });
            }
            None => {
                for (name, value) in [
                    (META_FORMAT, FORMAT),
                    (META_REVISION, 1),
                    (META_COMPACT, 0),
                    (META_NEXT_LEASE, 1),
                ] {
                    meta.insert(name, value).map_err(db_error(OP))?;
                }
            }
        }
        wtx.open_table(KV).map_err(db_error(OP))?;
        wtx.open_table(LOG).map_err(db_error(OP))?;
        wtx.open_multimap_table(LEASE_KEYS).map_err(db_error(OP))?;
        let table = wtx.open_table(LEASES).map_err(db_error(OP))?;
        let mut leases = Vec::new();
        for entry in table.iter().map_err(db_error(OP))? {
            let (id, ttl_ms) = entry.map_err(db_error(OP))?;
            leases.push((id.value(), Duration::from_millis(ttl_ms.value())));
        }
        leases
    };
    wtx.commit().map_err(db_error(OP))?;
    Ok((db, leases))
}

fn read_meta(table: &impl ReadableTable<&'static str, i64>, name: &str) -> Result<i64> {
    let value = table.get(name).map_err(db_error("read metadata"))?;
    value.map(|v| v.value()).ok_or_else(|| StoreError::Corrupt {
        detail: format!("metadata {name} is missing"),
    })
}

fn read_kv(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    key: &[u8],
) -> Result<Option<KeyValue>> {
    let record = table.get(key).map_err(db_error("read key"))?;
    record.map(|r| decode_kv(key, r.value())).transpose()
}

/// Every current key under `prefix`, in key order.
fn scan_prefix(
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<Vec<KeyValue>> {
    let mut out = Vec::new();
    for entry in table.range(prefix..).map_err(db_error("range"))? {
        let (key, record) = entry.map_err(db_error("range"))?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        out.push(decode_kv(key, record.value())?);
    }
    Ok(out)
}

fn tombstone(key: Vec<u8>, revision: Revision) -> KeyValue {
    KeyValue {
        key,
        value: Vec::new(),
        create_revision: 0,
        mod_revision: revision,
        version: 0,
        lease: None,
    }
}

/// The tables a write transaction touches.
struct Tables<'txn> {
    kv: Table<'txn, &'static [u8], &'static [u8]>,
    log: Table<'txn, i64, &'static [u8]>,
    meta: Table<'txn, &'static str, i64>,
    leases: Table<'txn, i64, u64>,
    lease_keys: MultimapTable<'txn, i64, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(wtx: &'txn WriteTransaction, operation: &'static str) -> Result<Self> {
        Ok(Self {
            kv: wtx.open_table(KV).map_err(db_error(operation))?,
            log: wtx.open_table(LOG).map_err(db_error(operation))?,
            meta: wtx.open_table(META).map_err(db_error(operation))?,
            leases: wtx.open_table(LEASES).map_err(db_error(operation))?,
            lease_keys: wtx
                .open_multimap_table(LEASE_KEYS)
                .map_err(db_error(operation))?,
        })
    }

    fn put(
        &mut self,
        revision: Revision,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        events: &mut Vec<Event>,
    ) -> Result<()> {
        const OP: &str = "put";
        if let Some(lease) = lease
            && self.leases.get(lease.0).map_err(db_error(OP))?.is_none()
        {
            return Err(StoreError::LeaseNotFound { lease });
        }
        let prev = read_kv(&self.kv, &key)?;
        let kv = KeyValue {
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(0, |p| p.version) + 1,
            lease,
            key,
            value,
        };
        self.kv
            .insert(kv.key.as_slice(), encode_kv(&kv).as_slice())
            .map_err(db_error(OP))?;
        let old_lease = prev.as_ref().and_then(|p| p.lease);
        if old_lease != lease {
            if let Some(old) = old_lease {
                self.lease_keys
                    .remove(old.0, kv.key.as_slice())
                    .map_err(db_error(OP))?;
            }
            if let Some(new) = lease {
                self.lease_keys
                    .insert(new.0, kv.key.as_slice())
                    .map_err(db_error(OP))?;
            }
        }
        events.push(Event {
            kind: EventKind::Put,
            kv,
            prev,
        });
        Ok(())
    }

    fn delete(&mut self, revision: Revision, key: &[u8], events: &mut Vec<Event>) -> Result<()> {
        const OP: &str = "delete";
        let Some(prev) = read_kv(&self.kv, key)? else {
            return Ok(());
        };
        self.kv.remove(key).map_err(db_error(OP))?;
        if let Some(lease) = prev.lease {
            self.lease_keys.remove(lease.0, key).map_err(db_error(OP))?;
        }
        events.push(Event {
            kind: EventKind::Delete,
            kv: tombstone(key.to_vec(), revision),
            prev: Some(prev),
        });
        Ok(())
    }

    fn apply(&mut self, revision: Revision, ops: Vec<Op>) -> Result<Vec<Event>> {
        let mut events = Vec::new();
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    self.put(revision, key, value, lease, &mut events)?;
                }
                Op::Delete { key } => self.delete(revision, &key, &mut events)?,
                Op::DeletePrefix { prefix } => {
                    for kv in scan_prefix(&self.kv, &prefix)? {
                        self.delete(revision, &kv.key, &mut events)?;
                    }
                }
            }
        }
        Ok(events)
    }

    /// Records `events` as revision `revision` (the current revision + 1).
    fn append(&mut self, revision: Revision, events: &[Event]) -> Result<()> {
        const OP: &str = "append to log";
        self.log
            .insert(revision, encode_events(events)?.as_slice())
            .map_err(db_error(OP))?;
        self.meta
            .insert(META_REVISION, revision)
            .map_err(db_error(OP))?;
        Ok(())
    }
}

impl Inner {
    /// Runs one write transaction under the writer lock: `body` gets the tables and the
    /// current revision and returns a value plus the events of the next revision. With
    /// events, the transaction takes the next revision, commits and publishes its batch;
    /// without, it commits only if `always_commit` (it changed something else) and
    /// otherwise aborts, which saves an fsync.
    fn write<T>(
        &self,
        operation: &'static str,
        always_commit: bool,
        body: impl FnOnce(&mut Tables<'_>, Revision) -> Result<(T, Vec<Event>)>,
    ) -> Result<(T, Option<Revision>)> {
        let _writer = lock(&self.writer);
        let wtx = self.db.begin_write().map_err(db_error(operation))?;
        let (value, revision) = {
            let mut tables = Tables::open(&wtx, operation)?;
            let current = read_meta(&tables.meta, META_REVISION)?;
            let (value, events) = body(&mut tables, current)?;
            if events.is_empty() {
                (value, None)
            } else {
                let revision = current + 1;
                tables.append(revision, &events)?;
                (value, Some((revision, events)))
            }
        };
        match revision {
            None if always_commit => {
                wtx.commit().map_err(db_error(operation))?;
                Ok((value, None))
            }
            None => {
                wtx.abort().map_err(db_error(operation))?;
                Ok((value, None))
            }
            Some((revision, events)) => {
                wtx.commit().map_err(db_error(operation))?;
                // No receivers is fine: nobody is watching.
                let _ = self.events.send(Arc::new(Batch { revision, events }));
                Ok((value, Some(revision)))
            }
        }
    }

    fn revisions(&self) -> Result<(Revision, Revision)> {
        let rtx = self.db.begin_read().map_err(db_error("read revision"))?;
        let meta = rtx.open_table(META).map_err(db_error("read revision"))?;
        Ok((
            read_meta(&meta, META_REVISION)?,
            read_meta(&meta, META_COMPACT)?,
        ))
    }

    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let rtx = self.db.begin_read().map_err(db_error("get"))?;
        let kv = rtx.open_table(KV).map_err(db_error("get"))?;
        read_kv(&kv, key)
    }

    /// A snapshot of `prefix` at `at`: the current keys, with the log entries after `at`
    /// undone newest first (each event's `prev` is the key's state before it).
    fn range(&self, prefix: &[u8], at: Option<Revision>) -> Result<(Vec<KeyValue>, Revision)> {
        const OP: &str = "range";
        let rtx = self.db.begin_read().map_err(db_error(OP))?;
        let meta = rtx.open_table(META).map_err(db_error(OP))?;
        let current = read_meta(&meta, META_REVISION)?;
        let compacted = read_meta(&meta, META_COMPACT)?;
        let at = at.unwrap_or(current);
        if at <= 0 {
            return Err(StoreError::InvalidArgument {
                reason: format!("range at revision {at}: revisions start at 1"),
            });
        }
        if at > current {
            return Err(StoreError::FutureRevision { requested: at });
        }
        if at < compacted {
            return Err(StoreError::Compacted {
                requested: at,
                compacted,
            });
        }
        let kv = rtx.open_table(KV).map_err(db_error(OP))?;
        let now = scan_prefix(&kv, prefix)?;
        if at == current {
            return Ok((now, at));
        }
        let mut state: BTreeMap<Vec<u8>, KeyValue> =
            now.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        let log = rtx.open_table(LOG).map_err(db_error(OP))?;
        for entry in log.range(at + 1..=current).map_err(db_error(OP))?.rev() {
            let (revision, bytes) = entry.map_err(db_error(OP))?;
            let events = decode_events(revision.value(), bytes.value())?;
            for event in events.into_iter().rev() {
                if !event.kv.key.starts_with(prefix) {
                    continue;
                }
                match event.prev {
                    Some(prev) => state.insert(event.kv.key, prev),
                    None => state.remove(&event.kv.key),
                };
            }
        }
        Ok((state.into_values().collect(), at))
    }

    /// Runs a transaction, committed together with whatever other transactions are queued
    /// (group commit): each keeps its own revision, log entry and published batch, in queue
    /// order, but they share one redb commit and so one fsync. The first caller to take the
    /// writer lock commits the whole queue; the others find their result waiting.
    fn txn(&self, compares: Vec<Compare>, success: Vec<Op>, failure: Vec<Op>) -> Result<TxnResult> {
        match self.grouped(Write::Txn {
            compares,
            success,
            failure,
        })? {
            Written::Txn(result) => Ok(result),
            Written::Lease(_) => unreachable!("a transaction answers with a transaction result"),
        }
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        match self.grouped(Write::GrantLease { ttl_ms })? {
            Written::Lease(lease) => Ok(lease),
            Written::Txn(_) => unreachable!("a grant answers with a lease"),
        }
    }

    /// Queues `write` for the next group commit: writes queued together share one redb
    /// commit and so one fsync, while each transaction keeps its own revision, log entry and
    /// published batch, in queue order. The first caller to take the writer lock commits the
    /// whole queue; the others find their result waiting.
    fn grouped(&self, write: Write) -> Result<Written> {
        let (reply, result) = std::sync::mpsc::sync_channel(1);
        lock(&self.queue).push(Queued { write, reply });
        let _writer = lock(&self.writer);
        if let Ok(done) = result.try_recv() {
            return done;
        }
        let queued = std::mem::take(&mut *lock(&self.queue));
        self.commit_group(queued);
        result.try_recv().unwrap_or_else(|_| {
            Err(StoreError::Backend {
                operation: "txn",
                source: "group commit failed".into(),
            })
        })
    }

    /// Commits `queued` in one redb transaction; the caller holds the writer lock.
    fn commit_group(&self, queued: Vec<Queued>) {
        const OP: &str = "txn";
        let mut replies = Vec::with_capacity(queued.len());
        let mut batches = Vec::new();
        let mut pending = queued.into_iter();
        let mut granted = false;
        let outcome = (|| -> Result<()> {
            let wtx = self.db.begin_write().map_err(db_error(OP))?;
            {
                let mut tables = Tables::open(&wtx, OP)?;
                let mut current = read_meta(&tables.meta, META_REVISION)?;
                for q in pending.by_ref() {
                    let (compares, success, failure) = match q.write {
                        Write::GrantLease { ttl_ms } => {
                            let id = read_meta(&tables.meta, META_NEXT_LEASE)?;
                            tables
                                .meta
                                .insert(META_NEXT_LEASE, id + 1)
                                .map_err(db_error(OP))?;
                            tables.leases.insert(id, ttl_ms).map_err(db_error(OP))?;
                            granted = true;
                            replies.push((q.reply, Ok(Written::Lease(LeaseId(id)))));
                            continue;
                        }
                        Write::Txn {
                            compares,
                            success,
                            failure,
                        } => (compares, success, failure),
                    };
                    let mut succeeded = true;
                    for compare in &compares {
                        if !compare.holds(read_kv(&tables.kv, compare.key())?.as_ref()) {
                            succeeded = false;
                            break;
                        }
                    }
                    let ops = if succeeded { success } else { failure };
                    // The only error a valid transaction can meet half-way is a missing lease:
                    // check before changing anything, so a failing one changes nothing.
                    if let Some(lease) = missing_lease(&tables, &ops)? {
                        replies.push((q.reply, Err(StoreError::LeaseNotFound { lease })));
                        continue;
                    }
                    let events = tables.apply(current + 1, ops)?;
                    if events.is_empty() {
                        replies.push((
                            q.reply,
                            Ok(Written::Txn(TxnResult {
                                succeeded,
                                revision: current,
                            })),
                        ));
                        continue;
                    }
                    current += 1;
                    tables.append(current, &events)?;
                    batches.push(Arc::new(Batch {
                        revision: current,
                        events,
                    }));
                    replies.push((
                        q.reply,
                        Ok(Written::Txn(TxnResult {
                            succeeded,
                            revision: current,
                        })),
                    ));
                }
            }
            if batches.is_empty() && !granted {
                wtx.abort().map_err(db_error(OP))?;
            } else {
                wtx.commit().map_err(db_error(OP))?;
            }
            Ok(())
        })();
        match outcome {
            Ok(()) => {
                for batch in batches {
                    // No receivers is fine: nobody is watching.
                    let _ = self.events.send(batch);
                }
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
            }
            Err(err) => {
                // Nothing was committed: every transaction of the group fails alike.
                let unanswered = pending.map(|q| q.reply);
                for reply in replies.into_iter().map(|(r, _)| r).chain(unanswered) {
                    let _ = reply.send(Err(StoreError::Backend {
                        operation: OP,
                        source: format!("group commit failed: {err}").into(),
                    }));
                }
            }
        }
    }

    fn compact(&self, revision: Revision) -> Result<()> {
        const OP: &str = "compact";
        let _writer = lock(&self.writer);
        let wtx = self.db.begin_write().map_err(db_error(OP))?;
        {
            let mut meta = wtx.open_table(META).map_err(db_error(OP))?;
            let current = read_meta(&meta, META_REVISION)?;
            let compacted = read_meta(&meta, META_COMPACT)?;
            if revision > current {
                return Err(StoreError::FutureRevision {
                    requested: revision,
                });
            }
            if revision <= compacted {
                return Err(StoreError::Compacted {
                    requested: revision,
                    compacted,
                });
            }
            let mut log = wtx.open_table(LOG).map_err(db_error(OP))?;
            log.retain_in(..revision, |_, _| false)
                .map_err(db_error(OP))?;
            meta.insert(META_COMPACT, revision).map_err(db_error(OP))?;
        }
        wtx.commit().map_err(db_error(OP))
    }

    /// Deletes the lease and its keys (one revision if it had keys).
    fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.write("revoke lease", true, |tables, current| {
            const OP: &str = "revoke lease";
            if tables
                .leases
                .remove(lease.0)
                .map_err(db_error(OP))?
                .is_none()
            {
                return Err(StoreError::LeaseNotFound { lease });
            }
            let mut keys = Vec::new();
            for key in tables
                .lease_keys
                .remove_all(lease.0)
                .map_err(db_error(OP))?
            {
                keys.push(key.map_err(db_error(OP))?.value().to_vec());
            }
            let mut events = Vec::new();
            for key in keys {
                tables.delete(current + 1, &key, &mut events)?;
            }
            Ok(((), events))
        })?;
        Ok(())
    }

    fn next_lease_deadline(&self) -> Option<Instant> {
        lock(&self.leases).values().map(|t| t.deadline).min()
    }

    /// Removes and returns the leases whose deadline has passed.
    fn take_expired(&self, now: Instant) -> Vec<(i64, LeaseTimer)> {
        let mut leases = lock(&self.leases);
        let expired: Vec<_> = leases
            .iter()
            .filter(|(_, timer)| timer.deadline <= now)
            .map(|(id, timer)| (*id, *timer))
            .collect();
        for (id, _) in &expired {
            leases.remove(id);
        }
        expired
    }
}

/// Revokes leases whose deadline passed; runs until the store is dropped.
async fn expire_leases(store: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let next = match store.upgrade() {
            Some(inner) => inner.next_lease_deadline(),
            None => return,
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = wake.notified() => continue,
                    () = tokio::time::sleep_until(deadline) => {}
                }
            }
            None => {
                wake.notified().await;
                continue;
            }
        }
        let Some(inner) = store.upgrade() else {
            return;
        };
        let now = Instant::now();
        for (id, timer) in inner.take_expired(now) {
            let lease = LeaseId(id);
            match blocking(inner.clone(), "revoke lease", move |i| {
                i.revoke_lease(lease)
            })
            .await
            {
                Ok(()) => debug!(%lease, "lease expired"),
                Err(StoreError::LeaseNotFound { .. }) => {}
                Err(err) => {
                    warn!(%lease, ?err, "revoking an expired lease failed, will retry");
                    lock(&inner.leases).insert(
                        id,
                        LeaseTimer {
                            ttl: timer.ttl,
                            deadline: now + REVOKE_RETRY,
                        },
                    );
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let key = key.to_vec();
        blocking(self.inner.clone(), "get", move |i| i.get(&key)).await
    }

    async fn range(
        &self,
        prefix: &[u8],
        at: Option<Revision>,
    ) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_vec();
        blocking(self.inner.clone(), "range", move |i| i.range(&prefix, at)).await
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResult> {
        validate_txn(&compares, &success, &failure)?;
        blocking(self.inner.clone(), "txn", move |i| {
            i.txn(compares, success, failure)
        })
        .await
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream> {
        watch::watch(&self.inner, prefix.to_vec(), from).await
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        blocking(self.inner.clone(), "compact", move |i| i.compact(revision)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument {
                reason: "lease ttl must be positive".to_owned(),
            });
        }
        let lease = blocking(self.inner.clone(), "grant lease", move |i| {
            i.grant_lease(ttl)
        })
        .await?;
        lock(&self.inner.leases).insert(
            lease.0,
            LeaseTimer {
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        self.inner.lease_wake.notify_one();
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let now = Instant::now();
        let mut leases = lock(&self.inner.leases);
        match leases.get_mut(&lease.0) {
            Some(timer) if timer.deadline > now => {
                timer.deadline = now + timer.ttl;
                Ok(())
            }
            Some(_) => {
                // Expired but not yet revoked: the expiry task is due; say so now.
                self.inner.lease_wake.notify_one();
                Err(StoreError::LeaseNotFound { lease })
            }
            None => Err(StoreError::LeaseNotFound { lease }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let timer = lock(&self.inner.leases).remove(&lease.0);
        let result = blocking(self.inner.clone(), "revoke lease", move |i| {
            i.revoke_lease(lease)
        })
        .await;
        if let (Err(err), Some(timer)) = (&result, timer)
            && !matches!(err, StoreError::LeaseNotFound { .. })
        {
            // The lease is still on disk: keep it alive in memory so that it still expires.
            lock(&self.inner.leases).insert(lease.0, timer);
        }
        result
    }

    async fn current_revision(&self) -> Result<Revision> {
        let (current, _) =
            blocking(self.inner.clone(), "current revision", |i| i.revisions()).await?;
        Ok(current)
    }
}
