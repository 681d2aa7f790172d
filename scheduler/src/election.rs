//! Leader election over the [`Store`] contract: one scheduler at a time runs the controllers.
//!
//! # Protocol
//!
//! The leader is whoever holds one key (by default [`DEFAULT_LEADER_KEY`]) whose value is its
//! identity and which is attached to a lease of its own.
//!
//! - **Acquire.** A candidate reads the key. If it is present, the candidate watches it from
//!   the revision of that read and tries again when it is deleted, and at least once per TTL
//!   in case the watch broke silently. If it is absent, the candidate grants a lease of
//!   `ttl` and runs `txn(absent(key)) → put(key, identity, lease)`. Losing that race means
//!   watching from the revision the transaction was evaluated at, so no deletion is missed.
//! - **Hold.** The leader refreshes its lease every `ttl / 3` and watches the key. It steps
//!   down when the lease is gone, when the key is deleted or rewritten, or when no
//!   keep-alive has succeeded for `ttl * 2 / 3`, counted from the moment that keep-alive
//!   was *sent* (the server can only have refreshed the lease later than that).
//! - **Resign.** On shutdown, on [`Leadership::resign`] or when the [`Leadership`] is
//!   dropped, the leader first marks itself as no longer leading, then revokes the lease,
//!   which deletes the key at once and wakes the followers.
//!
//! # Invariants
//!
//! - Stepping down precedes any successor. The server keeps the lease at least `ttl` after
//!   the last keep-alive it received, and the leader gives up `ttl * 2 / 3` after it sent
//!   that keep-alive, so a cut-off leader stops acting at least `ttl / 3` before the key can
//!   be deleted and taken, as long as the two clocks drift less than that over one TTL.
//! - Fencing does not rely on that margin. [`Leadership::fence`] compares the key's
//!   `mod_revision` with the revision of the put that elected this leader; no other term
//!   can have that revision, so a controller transaction carrying the fence fails once
//!   this term is over, even if the same identity has been elected again since (a
//!   restarted process, or a zombie whose replacement has its host name).
//! - Takeover after a leader dies without resigning takes at most `ttl` (its lease runs
//!   out; etcd checks lease expiry every 500 ms) plus a few store round trips: about 3 s
//!   with the default TTL.
//!
//! A restarted process does not reclaim a key that still carries its identity: it cannot
//! tell its old lease from a zombie's, so it waits for the key to go, like anyone else.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::store::{Compare, EventKind, LeaseId, Op, Revision, Store, StoreError};

/// The key the scheduler's leader holds unless configured otherwise.
pub const DEFAULT_LEADER_KEY: &[u8] = b"/gantry/v1/leader";

/// The lease TTL unless configured otherwise: a dead leader is replaced within about this.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

/// Below this TTL, scheduling jitter alone could eat the `ttl / 3` safety margin.
const MIN_TTL: Duration = Duration::from_millis(100);

/// What a candidate campaigns with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElectionConfig {
    /// The key whose holder is the leader ([`DEFAULT_LEADER_KEY`] by default).
    pub key: Vec<u8>,
    /// The TTL of the leader's lease ([`DEFAULT_TTL`] by default, at least 100 ms). etcd
    /// rounds it up to whole seconds and to its minimum TTL.
    pub ttl: Duration,
    /// Who this candidate is, written as the value of the key; unique per process, e.g.
    /// `host:pid` or the pod name.
    pub identity: String,
}

impl ElectionConfig {
    /// A configuration with the default key and TTL for `identity`.
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            key: DEFAULT_LEADER_KEY.to_vec(),
            ttl: DEFAULT_TTL,
            identity: identity.into(),
        }
    }

    fn validate(&self) -> Result<(), ElectionError> {
        let reason = if self.key.is_empty() {
            "the leader key is empty".to_owned()
        } else if self.identity.is_empty() {
            "the identity is empty".to_owned()
        } else if self.ttl < MIN_TTL {
            format!("ttl {:?} is below the minimum of {MIN_TTL:?}", self.ttl)
        } else {
            return Ok(());
        };
        Err(ElectionError::InvalidConfig { reason })
    }
}

/// What can stop a campaign or an observer.
#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The configuration cannot work (empty key or identity, TTL too short).
    #[error("invalid election config: {reason}")]
    InvalidConfig {
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed in a way retrying will not fix (closed, corrupt, rejected request);
    /// transient failures are retried inside [`campaign`] and never surface here.
    #[error("store failed while {step}")]
    Store {
        /// What the election was doing, e.g. `"creating the leader key"`.
        step: &'static str,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

/// Why a [`Leadership`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Loss {
    /// This process resigned: shutdown, [`Leadership::resign`], or the value was dropped.
    Resigned,
    /// The store says the lease is gone (it expired or someone revoked it).
    LeaseExpired,
    /// The leader key was deleted.
    KeyDeleted,
    /// The leader key was written by someone else, so the fence no longer holds.
    KeyOverwritten,
    /// No keep-alive succeeded for `ttl * 2 / 3`: the lease may expire any moment, so the
    /// leader stepped down before it could.
    Unreachable,
    /// The store was closed under the leader.
    StoreClosed,
    /// The task keeping the lease alive ended without saying why (it panicked, or its
    /// runtime shut down).
    Abandoned,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Loss::Resigned => "resigned",
            Loss::LeaseExpired => "lease expired",
            Loss::KeyDeleted => "leader key deleted",
            Loss::KeyOverwritten => "leader key overwritten",
            Loss::Unreachable => "store unreachable for too long",
            Loss::StoreClosed => "store closed",
            Loss::Abandoned => "keep-alive task ended",
        })
    }
}

impl Loss {
    /// Whether our lease may still exist on the server, so revoking it frees the key
    /// sooner (or cleans up after us).
    fn lease_may_live(self) -> bool {
        !matches!(
            self,
            Loss::LeaseExpired | Loss::StoreClosed | Loss::Abandoned
        )
    }
}

/// Being the leader: held until [`Leadership::lost`] fires.
///
/// A background task keeps the lease alive and watches the key. Dropping the value
/// resigns (in the background); [`Leadership::resign`] resigns and waits for it.
#[derive(Debug)]
#[must_use = "dropping a Leadership resigns it"]
pub struct Leadership {
    lease: LeaseId,
    identity: String,
    key: Vec<u8>,
    revision: Revision,
    state: watch::Receiver<Option<Loss>>,
    /// Dropping (or sending on) it tells the task to resign.
    resign: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Leadership {
    /// The lease the leader key is attached to.
    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    /// This leader's identity, the value of the key.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The leader key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The revision at which this term began (the put of the key). Terms of one key get
    /// increasing revisions, so it also serves as a term number.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// A condition for controller transactions that holds exactly while this term lasts:
    /// the key's `mod_revision` is still the revision of the put that elected us.
    ///
    /// Stronger than comparing the value with the identity, which would also hold for a
    /// later term of the same identity.
    pub fn fence(&self) -> Compare {
        Compare::mod_revision(self.key.clone(), self.revision)
    }

    /// Whether leadership has not been lost (as far as this process knows yet; the
    /// [`fence`](Self::fence) is the authority).
    pub fn is_held(&self) -> bool {
        self.state.borrow().is_none()
    }

    /// Completes when leadership is lost, with the reason; at once if it already is.
    ///
    /// The future does not borrow `self`, so it can be moved into the controllers' tasks.
    pub fn lost(&self) -> impl Future<Output = Loss> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            let loss = state.wait_for(Option::is_some).await.map(|loss| *loss);
            match loss {
                Ok(Some(loss)) => loss,
                // The task is gone without a word: it panicked or its runtime shut down.
                Ok(None) | Err(_) => state.borrow().unwrap_or(Loss::Abandoned),
            }
        }
    }

    /// Gives leadership up now: stops acting, then revokes the lease so a follower is
    /// elected at once. Returns why leadership ended ([`Loss::Resigned`], or the earlier
    /// loss if it was already lost).
    pub async fn resign(self) -> Loss {
        let Leadership {
            state,
            resign,
            task,
            ..
        } = self;
        drop(resign);
        if let Err(err) = task.await {
            warn!(?err, "the leadership task failed");
        }
        state.borrow().unwrap_or(Loss::Abandoned)
    }
}

/// Campaigns for leadership until elected, or until `shutdown` completes.
///
/// Returns `Ok(None)` if `shutdown` completed first (no lease or key is left behind), and
/// otherwise the [`Leadership`], which then resigns when `shutdown` completes. Store
/// failures are logged and retried; only lasting ones (closed store, corrupt data, a
/// rejected request) end the campaign with an error. After losing leadership, campaign
/// again with a fresh `shutdown` future.
///
/// Cancel safe: dropping the returned future revokes any lease it has granted.
///
/// ```no_run
/// # async fn run(store: std::sync::Arc<dyn gantry_scheduler::store::Store>)
/// # -> Result<(), gantry_scheduler::election::ElectionError> {
/// use gantry_scheduler::election::{ElectionConfig, campaign};
///
/// let (stop, stopped) = tokio::sync::watch::channel(false);
/// let config = ElectionConfig::new("scheduler-1");
/// loop {
///     let mut stopped = stopped.clone();
///     let shutdown = async move { stopped.wait_for(|&s| s).await.map(|_| ()) };
///     let Some(leadership) = campaign(store.clone(), config.clone(), shutdown).await? else {
///         break;
///     };
///     // Run the controllers with `leadership.fence()` in every transaction until:
///     let loss = leadership.lost().await;
///     tracing::warn!(%loss, "leadership lost");
/// }
/// # drop(stop);
/// # Ok(())
/// # }
/// ```
pub async fn campaign<F>(
    store: Arc<dyn Store>,
    config: ElectionConfig,
    shutdown: F,
) -> Result<Option<Leadership>, ElectionError>
where
    F: Future + Send + 'static,
{
    config.validate()?;
    let mut shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
        let _ = shutdown.await;
    });
    let elected = tokio::select! {
        () = &mut shutdown => {
            debug!(identity = %config.identity, "shut down before being elected");
            return Ok(None);
        }
        elected = acquire(&store, &config) => elected?,
    };
    info!(
        identity = %config.identity,
        lease = %elected.lease,
        revision = elected.revision,
        "elected leader"
    );
    let (state_tx, state) = watch::channel(None);
    let (resign, resign_rx) = oneshot::channel();
    let task = tokio::spawn(hold(
        store,
        config.clone(),
        elected,
        shutdown,
        resign_rx,
        state_tx,
    ));
    Ok(Some(Leadership {
        lease: elected.lease,
        identity: config.identity,
        key: config.key,
        revision: elected.revision,
        state,
        resign,
        task,
    }))
}

/// The identity of the current leader of `key`, if any. A value that is not UTF-8 is
/// converted lossily: observers display it, they do not compare it.
pub async fn current_leader(
    store: &dyn Store,
    key: &[u8],
) -> Result<Option<String>, ElectionError> {
    let kv = store
        .get(key)
        .await
        .map_err(|source| ElectionError::Store {
            step: "reading the leader key",
            source,
        })?;
    Ok(kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// The clock of one TTL.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Time between keep-alives, and between retries of failed campaign steps.
    period: Duration,
    /// Time since the last good keep-alive was sent after which the leader steps down.
    step_down: Duration,
    /// Time before retrying a failed keep-alive.
    retry: Duration,
}

impl Timing {
    fn of(ttl: Duration) -> Self {
        Self {
            period: ttl / 3,
            step_down: ttl * 2 / 3,
            retry: ttl / 12,
        }
    }
}

/// What winning the race gave us.
#[derive(Debug, Clone, Copy)]
struct Elected {
    lease: LeaseId,
    /// The revision of the put of the key.
    revision: Revision,
    /// When the grant of the lease was sent: the server's TTL starts later than that.
    granted_at: Instant,
}

/// The outcome of one try at the key.
enum Attempt {
    Elected(Elected),
    /// Someone holds the key; deletions from revision `from` on concern us.
    Occupied {
        from: Revision,
    },
}

/// A failed campaign step.
struct StepError {
    step: &'static str,
    source: StoreError,
}

impl StepError {
    fn at(step: &'static str) -> impl FnOnce(StoreError) -> Self {
        move |source| Self { step, source }
    }

    /// Errors retrying cannot fix.
    fn is_lasting(&self) -> bool {
        matches!(
            self.source,
            StoreError::Closed | StoreError::InvalidArgument { .. } | StoreError::Corrupt { .. }
        )
    }
}

/// Tries until elected; waits for the key to be free in between.
async fn acquire(
    store: &Arc<dyn Store>,
    config: &ElectionConfig,
) -> Result<Elected, ElectionError> {
    let timing = Timing::of(config.ttl);
    loop {
        let result = match try_once(store, config).await {
            Ok(Attempt::Elected(elected)) => return Ok(elected),
            Ok(Attempt::Occupied { from }) => wait_for_vacancy(&**store, config, from).await,
            Err(err) => Err(err),
        };
        match result {
            Ok(()) => {}
            Err(err) if err.is_lasting() => {
                return Err(ElectionError::Store {
                    step: err.step,
                    source: err.source,
                });
            }
            Err(StepError { step, source }) => {
                warn!(identity = %config.identity, step, err = ?source, "campaign step failed, retrying");
                sleep(timing.period).await;
            }
        }
    }
}

async fn try_once(store: &Arc<dyn Store>, config: &ElectionConfig) -> Result<Attempt, StepError> {
    // Read the revision first: if the key is present in the later read, it was present
    // at this revision too or was written after it, so a watch from the next revision
    // sees its deletion.
    let revision = store
        .current_revision()
        .await
        .map_err(StepError::at("reading the store revision"))?;
    let holder = store
        .get(&config.key)
        .await
        .map_err(StepError::at("reading the leader key"))?;
    if let Some(holder) = holder {
        debug!(
            identity = %config.identity,
            leader = %String::from_utf8_lossy(&holder.value),
            "following"
        );
        return Ok(Attempt::Occupied { from: revision + 1 });
    }
    let granted_at = Instant::now();
    let lease = store
        .grant_lease(config.ttl)
        .await
        .map_err(StepError::at("granting a lease"))?;
    let guard = LeaseGuard {
        store: store.clone(),
        lease: Some(lease),
        ttl: config.ttl,
    };
    let result = store
        .txn(
            vec![Compare::absent(config.key.clone())],
            vec![Op::put_with_lease(
                config.key.clone(),
                config.identity.clone(),
                lease,
            )],
            Vec::new(),
        )
        .await;
    match result {
        Ok(result) if result.succeeded => {
            guard.disarm();
            Ok(Attempt::Elected(Elected {
                lease,
                revision: result.revision,
                granted_at,
            }))
        }
        Ok(result) => {
            guard.revoke().await;
            Ok(Attempt::Occupied {
                from: result.revision + 1,
            })
        }
        Err(err) => {
            // The put may have happened even so (a timeout after commit): revoking the
            // lease undoes it either way.
            guard.revoke().await;
            Err(StepError::at("creating the leader key")(err))
        }
    }
}

/// Returns when the key is deleted at or after `from`, after one TTL at most (in case
/// the watch broke silently), or when the watch fails.
async fn wait_for_vacancy(
    store: &dyn Store,
    config: &ElectionConfig,
    from: Revision,
) -> Result<(), StepError> {
    let mut events = store
        .watch(&config.key, from)
        .await
        .map_err(StepError::at("watching the leader key"))?;
    let recheck = Instant::now() + config.ttl;
    loop {
        match timeout_at(recheck, events.next()).await {
            Err(_) | Ok(None) => return Ok(()),
            Ok(Some(Err(source))) => {
                return Err(StepError {
                    step: "watching the leader key",
                    source,
                });
            }
            // The watch is by prefix: other keys may start with ours.
            Ok(Some(Ok(event)))
                if event.kind == EventKind::Delete && event.kv.key == config.key =>
            {
                return Ok(());
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// A lease granted during a campaign, revoked unless disarmed (also when the campaign
/// future is dropped).
struct LeaseGuard {
    store: Arc<dyn Store>,
    lease: Option<LeaseId>,
    ttl: Duration,
}

impl LeaseGuard {
    fn disarm(mut self) {
        self.lease = None;
    }

    /// Revokes now, best effort: a lease we fail to revoke expires within its TTL.
    async fn revoke(mut self) {
        if let Some(lease) = self.lease.take() {
            revoke(&*self.store, lease, self.ttl).await;
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let (store, ttl) = (self.store.clone(), self.ttl);
            runtime.spawn(async move { revoke(&*store, lease, ttl).await });
        }
    }
}

/// Revokes `lease`, giving up after `ttl`: by then it has expired anyway.
async fn revoke(store: &dyn Store, lease: LeaseId, ttl: Duration) {
    match timeout(ttl, store.revoke_lease(lease)).await {
        Ok(Ok(()) | Err(StoreError::LeaseNotFound { .. })) => debug!(%lease, "lease revoked"),
        Ok(Err(err)) => warn!(%lease, ?err, "revoking a lease failed, it will expire"),
        Err(_) => warn!(%lease, "revoking a lease timed out, it will expire"),
    }
}

/// The leader's task: keeps the lease, guards the key, and publishes the loss.
async fn hold(
    store: Arc<dyn Store>,
    config: ElectionConfig,
    elected: Elected,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    resign: oneshot::Receiver<()>,
    state: watch::Sender<Option<Loss>>,
) {
    let timing = Timing::of(config.ttl);
    let loss = tokio::select! {
        () = shutdown => Loss::Resigned,
        // Sent or dropped: either way the owner wants out.
        _ = resign => Loss::Resigned,
        loss = keep_lease(&*store, elected.lease, timing, elected.granted_at) => loss,
        loss = guard_key(&*store, &config.key, elected.revision, timing) => loss,
    };
    // Step down first, so that the controllers stop before a successor can start.
    state.send_replace(Some(loss));
    let lease = elected.lease;
    if loss == Loss::Resigned {
        info!(identity = %config.identity, %lease, "resigning leadership");
    } else {
        warn!(identity = %config.identity, %lease, %loss, "leadership lost");
    }
    if loss.lease_may_live() {
        revoke(&*store, lease, config.ttl).await;
    }
}

/// Refreshes the lease every period; returns when it is gone or cannot be refreshed in
/// time. `last_good` is when the last successful refresh (or the grant) was sent.
async fn keep_lease(
    store: &dyn Store,
    lease: LeaseId,
    timing: Timing,
    mut last_good: Instant,
) -> Loss {
    let mut next = last_good + timing.period;
    loop {
        let deadline = last_good + timing.step_down;
        sleep_until(next.min(deadline)).await;
        let sent = Instant::now();
        if sent >= deadline {
            return Loss::Unreachable;
        }
        match timeout_at(deadline, store.keep_alive(lease)).await {
            Ok(Ok(())) => {
                last_good = sent;
                next = sent + timing.period;
            }
            Ok(Err(StoreError::LeaseNotFound { .. })) => return Loss::LeaseExpired,
            Ok(Err(StoreError::Closed)) => return Loss::StoreClosed,
            Ok(Err(err)) => {
                warn!(%lease, ?err, "keeping the leader lease alive failed, retrying");
                next = Instant::now() + timing.retry;
            }
            Err(_) => return Loss::Unreachable,
        }
    }
}

/// Whether the key is still the one we put, after a re-read.
enum KeyState {
    /// Unchanged; changes from revision `from` on are still to be watched.
    Ours {
        from: Revision,
    },
    Gone(Loss),
}

/// Watches the key; returns when it is deleted or rewritten. A broken watch is re-opened
/// after re-reading the key; an unreachable store is `keep_lease`'s business.
async fn guard_key(store: &dyn Store, key: &[u8], elected: Revision, timing: Timing) -> Loss {
    let mut from = elected + 1;
    loop {
        match store.watch(key, from).await {
            Ok(mut events) => {
                while let Some(event) = events.next().await {
                    match event {
                        // The watch is by prefix: other keys may start with ours.
                        Ok(event) if event.kv.key == key => {
                            return match event.kind {
                                EventKind::Delete => Loss::KeyDeleted,
                                EventKind::Put => Loss::KeyOverwritten,
                            };
                        }
                        Ok(_) => {}
                        Err(StoreError::Closed) => return Loss::StoreClosed,
                        Err(err) => {
                            debug!(?err, "the watch of the leader key ended, re-reading it");
                            break;
                        }
                    }
                }
            }
            Err(StoreError::Closed) => return Loss::StoreClosed,
            Err(err) => debug!(?err, "watching the leader key failed, re-reading it"),
        }
        from = loop {
            sleep(timing.period).await;
            match reread_key(store, key, elected).await {
                Ok(KeyState::Ours { from }) => break from,
                Ok(KeyState::Gone(loss)) => return loss,
                Err(StoreError::Closed) => return Loss::StoreClosed,
                Err(err) => debug!(?err, "re-reading the leader key failed"),
            }
        };
    }
}

async fn reread_key(
    store: &dyn Store,
    key: &[u8],
    elected: Revision,
) -> Result<KeyState, StoreError> {
    // Revision first: a key unchanged at the later read was unchanged at this revision.
    let revision = store.current_revision().await?;
    Ok(match store.get(key).await? {
        None => KeyState::Gone(Loss::KeyDeleted),
        Some(kv) if kv.mod_revision != elected => KeyState::Gone(Loss::KeyOverwritten),
        Some(_) => KeyState::Ours { from: revision + 1 },
    })
}

#[cfg(test)]
mod tests {
    //! Elections on the embedded store under paused tokio time (its leases expire on the
    //! tokio clock). A candidate "dies" by losing its store: every call and watch event
    //! through its handle stalls, so it can neither keep its lease alive nor revoke it,
    //! exactly what the server sees of a dead process. The same scenario against etcd is
    //! in `tests/election_etcd.rs`.

    use std::sync::atomic::{AtomicBool, Ordering};

    use anyhow::{Context, Result, bail};
    use tempfile::TempDir;

    use super::*;
    use crate::store::{EmbeddedOptions, EmbeddedStore, KeyValue, TxnResult, WatchStream};

    /// Upper bound on waiting for an election: a guard, never a synchronisation.
    const WAIT: Duration = Duration::from_secs(120);
    const FENCED: &[u8] = b"/gantry/v1/test/fenced";

    async fn embedded() -> Result<(Arc<dyn Store>, TempDir)> {
        let dir = tempfile::tempdir().context("creating temp dir")?;
        let store =
            EmbeddedStore::open_with(dir.path().join("store.redb"), EmbeddedOptions::default())
                .await
                .context("opening embedded store")?;
        Ok((Arc::new(store), dir))
    }

    type Campaign = JoinHandle<Result<Option<Leadership>, ElectionError>>;

    /// A campaign with the default key and TTL that never shuts down.
    fn candidate(store: &Arc<dyn Store>, identity: &str) -> Campaign {
        tokio::spawn(campaign(
            store.clone(),
            ElectionConfig::new(identity),
            std::future::pending::<()>(),
        ))
    }

    /// Waits for `campaign` to elect, and returns the leadership and when it was elected.
    async fn elected(campaign: Campaign) -> Result<(Leadership, Instant)> {
        let leadership = timeout(WAIT, campaign)
            .await
            .context("not elected in time")??
            .context("campaign failed")?
            .context("campaign shut down")?;
        Ok((leadership, Instant::now()))
    }

    /// A guarded controller write: whether it went through.
    async fn fenced_write(store: &Arc<dyn Store>, fence: Compare, value: &str) -> Result<bool> {
        let result = store
            .txn(vec![fence], vec![Op::put(FENCED, value)], Vec::new())
            .await?;
        Ok(result.succeeded)
    }

    /// A store handle that can be cut off: while cut, calls and watch events stall (and
    /// resume when it is restored), as for a process that lost its connection or died.
    struct Severable {
        inner: Arc<dyn Store>,
        cut: Arc<AtomicBool>,
    }

    impl Severable {
        fn wrap(inner: &Arc<dyn Store>) -> (Arc<dyn Store>, Arc<AtomicBool>) {
            let cut = Arc::new(AtomicBool::new(false));
            let store = Severable {
                inner: inner.clone(),
                cut: cut.clone(),
            };
            (Arc::new(store), cut)
        }
    }

    async fn reachable(cut: &AtomicBool) {
        while cut.load(Ordering::SeqCst) {
            sleep(Duration::from_millis(10)).await;
        }
    }

    #[async_trait::async_trait]
    impl Store for Severable {
        async fn get(&self, key: &[u8]) -> crate::store::Result<Option<KeyValue>> {
            reachable(&self.cut).await;
            self.inner.get(key).await
        }

        async fn range(
            &self,
            prefix: &[u8],
            at: Option<Revision>,
        ) -> crate::store::Result<(Vec<KeyValue>, Revision)> {
            reachable(&self.cut).await;
            self.inner.range(prefix, at).await
        }

        async fn txn(
            &self,
            compares: Vec<Compare>,
            success: Vec<Op>,
            failure: Vec<Op>,
        ) -> crate::store::Result<TxnResult> {
            reachable(&self.cut).await;
            self.inner.txn(compares, success, failure).await
        }

        async fn watch(&self, prefix: &[u8], from: Revision) -> crate::store::Result<WatchStream> {
            reachable(&self.cut).await;
            let events = self.inner.watch(prefix, from).await?;
            let cut = self.cut.clone();
            Ok(WatchStream::new(futures::stream::unfold(
                (events, cut),
                |(mut events, cut)| async move {
                    let event = events.next().await?;
                    reachable(&cut).await;
                    Some((event, (events, cut)))
                },
            )))
        }

        async fn compact(&self, revision: Revision) -> crate::store::Result<()> {
            reachable(&self.cut).await;
            self.inner.compact(revision).await
        }

        async fn grant_lease(&self, ttl: Duration) -> crate::store::Result<LeaseId> {
            reachable(&self.cut).await;
            self.inner.grant_lease(ttl).await
        }

        async fn keep_alive(&self, lease: LeaseId) -> crate::store::Result<()> {
            reachable(&self.cut).await;
            self.inner.keep_alive(lease).await
        }

        async fn revoke_lease(&self, lease: LeaseId) -> crate::store::Result<()> {
            reachable(&self.cut).await;
            self.inner.revoke_lease(lease).await
        }

        async fn current_revision(&self) -> crate::store::Result<Revision> {
            reachable(&self.cut).await;
            self.inner.current_revision().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn two_candidates_elect_exactly_one() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let mut a = candidate(&store, "a");
        let mut b = candidate(&store, "b");
        let (leader, follower) = tokio::select! {
            won = &mut a => (won??.context("a shut down")?, b),
            won = &mut b => (won??.context("b shut down")?, a),
        };
        // Several TTLs of keep-alives and follower re-checks: nobody else gets in.
        sleep(DEFAULT_TTL * 4).await;
        assert!(!follower.is_finished(), "two leaders at once");
        assert!(leader.is_held());
        assert_eq!(
            current_leader(&*store, DEFAULT_LEADER_KEY)
                .await?
                .as_deref(),
            Some(leader.identity())
        );
        let kv = store
            .get(DEFAULT_LEADER_KEY)
            .await?
            .context("no leader key")?;
        assert_eq!(kv.lease, Some(leader.lease()));
        assert_eq!(kv.mod_revision, leader.revision());

        assert!(fenced_write(&store, leader.fence(), "leader").await?);
        let other = if leader.identity() == "a" { "b" } else { "a" };
        assert!(
            !fenced_write(
                &store,
                Compare::value(DEFAULT_LEADER_KEY, other),
                "follower"
            )
            .await?,
            "the follower's identity must not pass as the leader's"
        );
        follower.abort();
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn resigning_hands_over_at_once() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let (stop_a, stopped_a) = oneshot::channel::<()>();
        let a = tokio::spawn(campaign(store.clone(), ElectionConfig::new("a"), stopped_a));
        let (a, _) = elected(a).await?;
        let b = candidate(&store, "b");
        sleep(Duration::from_millis(1500)).await;
        assert!(!b.is_finished());

        // Shutdown resigns.
        let a_lost = a.lost();
        let resigned = Instant::now();
        stop_a.send(()).ok().context("a's campaign is gone")?;
        let (b, b_at) = elected(b).await?;
        let handover = b_at - resigned;
        eprintln!("takeover after shutdown (embedded, paused clock): {handover:?}");
        assert!(handover < Duration::from_secs(1), "took {handover:?}");
        assert_eq!(a_lost.await, Loss::Resigned);
        assert!(matches!(
            store.keep_alive(a.lease()).await,
            Err(StoreError::LeaseNotFound { .. })
        ));

        // So does `resign`, and it returns after the lease is gone.
        let c = candidate(&store, "c");
        sleep(Duration::from_millis(1500)).await;
        let resigned = Instant::now();
        let b_lease = b.lease();
        assert_eq!(b.resign().await, Loss::Resigned);
        assert!(matches!(
            store.keep_alive(b_lease).await,
            Err(StoreError::LeaseNotFound { .. })
        ));
        let (c, c_at) = elected(c).await?;
        let handover = c_at - resigned;
        eprintln!("takeover after resign (embedded, paused clock): {handover:?}");
        assert!(handover < Duration::from_secs(1), "took {handover:?}");
        assert_eq!(c.identity(), "c");
        drop(a);
        Ok(())
    }

    /// The leader dies without resigning; measures when it steps down and when the
    /// follower takes over.
    async fn leader_dies(store: &Arc<dyn Store>) -> Result<(Leadership, Leadership)> {
        let (a_store, a_cut) = Severable::wrap(store);
        let (a, _) = elected(candidate(&a_store, "a")).await?;
        let b = candidate(store, "b");
        // Not on a keep-alive tick: the lease then has between 2/3 and all of its TTL left.
        sleep(Duration::from_millis(2500)).await;
        assert!(a.is_held() && !b.is_finished());

        let died = Instant::now();
        a_cut.store(true, Ordering::SeqCst);
        let a_lost = a.lost();
        let a_lost = tokio::spawn(async move { (a_lost.await, Instant::now()) });
        let (b, b_at) = elected(b).await?;
        let (loss, a_lost_at) = a_lost.await?;
        let (stepped_down, takeover) = (a_lost_at - died, b_at - died);
        eprintln!(
            "leader died (embedded, paused clock): stepped down after {stepped_down:?}, \
             follower elected after {takeover:?}"
        );
        assert_eq!(loss, Loss::Unreachable);
        assert!(
            stepped_down <= DEFAULT_TTL * 2 / 3,
            "stepped down after {stepped_down:?}"
        );
        assert!(
            a_lost_at < b_at,
            "the old leader must step down before the new one starts"
        );
        assert!(
            takeover <= DEFAULT_TTL + Duration::from_secs(1),
            "took over after {takeover:?}"
        );
        assert!(!a.is_held() && b.is_held());
        Ok((a, b))
    }

    #[tokio::test(start_paused = true)]
    async fn dead_leader_is_replaced_within_the_ttl() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let (_old, _new) = leader_dies(&store).await?;
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn old_fence_fails_after_takeover() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let (a, b) = leader_dies(&store).await?;
        // The old leader's connection heals and a delayed controller write arrives.
        assert!(!fenced_write(&store, a.fence(), "stale").await?);
        assert!(fenced_write(&store, b.fence(), "fresh").await?);
        let kv = store.get(FENCED).await?.context("fenced key missing")?;
        assert_eq!(kv.value, b"fresh");
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn fence_is_per_term_even_for_the_same_identity() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let (first, _) = elected(candidate(&store, "a")).await?;
        let old_fence = first.fence();
        assert_eq!(first.resign().await, Loss::Resigned);
        let (second, _) = elected(candidate(&store, "a")).await?;
        assert!(second.revision() > old_fence_revision(&old_fence)?);
        assert!(!fenced_write(&store, old_fence, "stale").await?);
        assert!(fenced_write(&store, second.fence(), "fresh").await?);
        Ok(())
    }

    fn old_fence_revision(fence: &Compare) -> Result<Revision> {
        match fence {
            Compare::ModRevision { revision, .. } => Ok(*revision),
            other => bail!("unexpected fence {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tampering_with_the_key_ends_leadership() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let (a, _) = elected(candidate(&store, "a")).await?;
        store.delete(DEFAULT_LEADER_KEY).await?;
        assert_eq!(timeout(WAIT, a.lost()).await?, Loss::KeyDeleted);

        let (b, _) = elected(candidate(&store, "b")).await?;
        store.put(DEFAULT_LEADER_KEY, b"b").await?;
        assert_eq!(timeout(WAIT, b.lost()).await?, Loss::KeyOverwritten);
        assert!(!fenced_write(&store, b.fence(), "stale").await?);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn short_outage_keeps_leadership() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let (a_store, a_cut) = Severable::wrap(&store);
        let (a, _) = elected(candidate(&a_store, "a")).await?;
        // Cut across one keep-alive tick (at 1 s), for less than the step-down margin.
        sleep(Duration::from_millis(900)).await;
        a_cut.store(true, Ordering::SeqCst);
        sleep(Duration::from_millis(600)).await;
        a_cut.store(false, Ordering::SeqCst);
        sleep(DEFAULT_TTL * 3).await;
        assert!(a.is_held());
        assert!(fenced_write(&store, a.fence(), "still").await?);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_before_election_leaves_nothing_behind() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let (a, _) = elected(candidate(&store, "a")).await?;
        let (stop_b, stopped_b) = oneshot::channel::<()>();
        let b = tokio::spawn(campaign(store.clone(), ElectionConfig::new("b"), stopped_b));
        sleep(Duration::from_secs(1)).await;
        stop_b.send(()).ok().context("b's campaign is gone")?;
        assert!(timeout(WAIT, b).await???.is_none());
        assert!(a.is_held());
        assert_eq!(
            current_leader(&*store, DEFAULT_LEADER_KEY)
                .await?
                .as_deref(),
            Some("a")
        );
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn invalid_configs_are_refused() -> Result<()> {
        let (store, _dir) = embedded().await?;
        let short = ElectionConfig {
            ttl: Duration::from_millis(10),
            ..ElectionConfig::new("a")
        };
        let no_key = ElectionConfig {
            key: Vec::new(),
            ..ElectionConfig::new("a")
        };
        for config in [ElectionConfig::new(""), short, no_key] {
            let result =
                campaign(store.clone(), config.clone(), std::future::pending::<()>()).await;
            assert!(
                matches!(result, Err(ElectionError::InvalidConfig { .. })),
                "{config:?} must be refused"
            );
        }
        Ok(())
    }
}
