//! The `live` keys of the nodes whose sessions one scheduler replica serves.
//!
//! Every such key hangs on **one** store lease of the replica, which the replica keeps alive
//! (one keep-alive every third of the TTL, whatever the number of nodes). Heartbeats touch
//! memory only: a node whose agent falls silent — stream open or not — has its key deleted
//! by a sweep once `lease_ttl` has passed since its last heartbeat, so a node still turns
//! NotReady exactly `lease_ttl` after its last heartbeat. If the replica itself dies, its
//! lease expires and every key it held goes with it, at most `lease_ttl` after its last
//! keep-alive.
//!
//! A per-session lease kept alive by each heartbeat would give the same semantics, but costs
//! the store one lease renewal per heartbeat: 2,500/s for 5,000 nodes heartbeating every 2 s,
//! which is most of what a single etcd member can do.
//!
//! Keys are only ever deleted or re-put with a compare on their `mod_revision`, so a replica
//! never removes or overwrites the key of a node that has meanwhile registered with another
//! replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::model::{self, Liveness, Timestamp, keys};
use crate::store::{Compare, LeaseId, Op, Revision, Store, StoreError};

/// Smallest interval between two sweeps for silent nodes.
const MIN_SWEEP: Duration = Duration::from_millis(20);
/// Longest interval between two sweeps: bounds how late a silent node is noticed.
const MAX_SWEEP: Duration = Duration::from_millis(200);

/// The live keys held by this replica. Cheap to clone.
#[derive(Clone)]
pub(crate) struct LiveKeys {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    ttl: Duration,
    identity: String,
    state: Mutex<State>,
    /// Serialises granting and replacing the lease.
    granting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    lease: Option<LeaseId>,
    nodes: HashMap<String, Entry>,
}

/// One node's key as this replica last wrote it.
struct Entry {
    /// The session that owns the entry; a newer registration of the node replaces it.
    session: u64,
    /// Whether that session's stream is still open.
    attached: bool,
    last_heartbeat: Instant,
    /// `mod_revision` of this replica's put of the key; `None` once deleted for silence.
    put: Option<Revision>,
}

impl LiveKeys {
    /// Live keys written to `store` by replica `identity`; a node turns NotReady `ttl` after
    /// its last heartbeat. The upkeep task runs until `shutdown` turns true; the lease is not
    /// revoked then, so nodes stay ready while their agents reconnect elsewhere.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        ttl: Duration,
        identity: String,
        shutdown: watch::Receiver<bool>,
    ) -> LiveKeys {
        let keys = LiveKeys {
            inner: Arc::new(Inner {
                store,
                ttl,
                identity,
                state: Mutex::new(State::default()),
                granting: tokio::sync::Mutex::new(()),
            }),
        };
        tokio::spawn(keys.clone().upkeep(shutdown));
        keys
    }

    /// The encoded value of a live key written now.
    pub(crate) fn value(&self) -> Vec<u8> {
        model::encode(&Liveness {
            scheduler: self.inner.identity.clone(),
            since: Timestamp::now(),
        })
    }

    /// The replica's lease, granted on first use.
    pub(crate) async fn lease(&self) -> Result<LeaseId, StoreError> {
        if let Some(lease) = self.state().lease {
            return Ok(lease);
        }
        let _granting = self.inner.granting.lock().await;
        if let Some(lease) = self.state().lease {
            return Ok(lease);
        }
        let lease = self.inner.store.grant_lease(self.inner.ttl).await?;
        self.state().lease = Some(lease);
        Ok(lease)
    }

    /// Records that session `session` put node `node`'s key at `revision` (registration).
    pub(crate) fn registered(&self, node: &str, session: u64, revision: Revision) {
        self.state().nodes.insert(
            node.to_owned(),
            Entry {
                session,
                attached: true,
                last_heartbeat: Instant::now(),
                put: Some(revision),
            },
        );
    }

    /// A heartbeat of `node` on session `session`. Touches memory only, unless the node had
    /// been silent long enough to lose its key: then the key is put again.
    pub(crate) async fn heartbeat(&self, node: &str, session: u64) {
        {
            let mut state = self.state();
            let Some(entry) = state.nodes.get_mut(node).filter(|e| e.session == session) else {
                return;
            };
            entry.last_heartbeat = Instant::now();
            if entry.put.is_some() {
                return;
            }
        }
        match self.put_again(node).await {
            Ok(Some(revision)) => {
                info!(%node, "node heartbeat after silence; live again");
                if let Some(entry) = self
                    .state()
                    .nodes
                    .get_mut(node)
                    .filter(|e| e.session == session)
                {
                    entry.put = Some(revision);
                }
            }
            Ok(None) => debug!(%node, "live key held elsewhere; not put again"),
            Err(err) => warn!(%node, ?err, "putting the live key of a node again failed"),
        }
    }

    /// The stream of session `session` ended: its key stays until the node has been silent
    /// for the TTL (or another session of the node takes it over).
    pub(crate) fn detached(&self, node: &str, session: u64) {
        let mut state = self.state();
        let Some(entry) = state.nodes.get_mut(node).filter(|e| e.session == session) else {
            return;
        };
        if entry.put.is_none() {
            state.nodes.remove(node);
        } else {
            entry.attached = false;
        }
    }

    /// A transaction found `lost` expired: replaces it (once, whoever notices first) and puts
    /// the keys of the attached nodes again on the new lease.
    pub(crate) async fn replace_lost(&self, lost: LeaseId) -> Result<(), StoreError> {
        let _granting = self.inner.granting.lock().await;
        if self.state().lease != Some(lost) {
            return Ok(());
        }
        warn!(lease = ?lost, "the replica's liveness lease expired; putting live keys again");
        let lease = self.inner.store.grant_lease(self.inner.ttl).await?;
        let nodes: Vec<String> = {
            let mut state = self.state();
            state.lease = Some(lease);
            // Detached nodes' keys went with the lease: they are simply NotReady now.
            state.nodes.retain(|_, entry| entry.attached);
            state
                .nodes
                .iter_mut()
                .map(|(name, entry)| {
                    entry.put = None;
                    name.clone()
                })
                .collect()
        };
        let results = join_all(nodes.iter().map(|node| self.put_on(node, lease))).await;
        let mut state = self.state();
        for (node, result) in nodes.iter().zip(results) {
            match result {
                Ok(Some(revision)) => {
                    if let Some(entry) = state.nodes.get_mut(node) {
                        entry.put = Some(revision);
                    }
                }
                Ok(None) => {}
                Err(err) => warn!(%node, ?err, "putting a live key on the new lease failed"),
            }
        }
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().expect("live keys lock")
    }

    /// Puts `node`'s key on the current lease unless another replica holds it now.
    async fn put_again(&self, node: &str) -> Result<Option<Revision>, StoreError> {
        loop {
            let lease = self.lease().await?;
            match self.put_on(node, lease).await {
                Err(StoreError::LeaseNotFound { .. }) => self.replace_lost(lease).await?,
                result => return result,
            }
        }
    }

    /// Puts `node`'s key on `lease` if no key exists; the revision of the put, or `None`
    /// when a key exists (another replica's, since this one's was deleted or expired).
    async fn put_on(&self, node: &str, lease: LeaseId) -> Result<Option<Revision>, StoreError> {
        let key = keys::live(node);
        let result = self
            .inner
            .store
            .txn(
                vec![Compare::absent(key.clone())],
                vec![Op::put_with_lease(key, self.value(), lease)],
                Vec::new(),
            )
            .await?;
        Ok(result.succeeded.then_some(result.revision))
    }

    async fn upkeep(self, mut shutdown: watch::Receiver<bool>) {
        let ttl = self.inner.ttl;
        let sweep = (ttl / 16).clamp(MIN_SWEEP, MAX_SWEEP);
        let renew = ttl / 3;
        let mut sweeps = tokio::time::interval(sweep);
        sweeps.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewals = tokio::time::interval(renew);
        renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stop = async move {
            // A dropped sender counts as shutdown.
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                () = &mut stop => return,
                _ = renewals.tick() => self.renew().await,
                _ = sweeps.tick() => self.sweep().await,
            }
        }
    }

    async fn renew(&self) {
        let Some(lease) = self.state().lease else {
            return;
        };
        match self.inner.store.keep_alive(lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound { .. }) => {
                if let Err(err) = self.replace_lost(lease).await {
                    warn!(?err, "replacing the replica's liveness lease failed");
                }
            }
            Err(err) => warn!(?err, "keeping the replica's liveness lease alive failed"),
        }
    }

    /// Deletes the keys of nodes silent for the TTL.
    async fn sweep(&self) {
        let ttl = self.inner.ttl;
        let silent: Vec<(String, Revision)> = {
            let state = self.state();
            state
                .nodes
                .iter()
                .filter(|(_, e)| e.last_heartbeat.elapsed() >= ttl)
                .filter_map(|(name, e)| e.put.map(|revision| (name.clone(), revision)))
                .collect()
        };
        if silent.is_empty() {
            return;
        }
        let deletes = silent.iter().map(|(node, revision)| {
            let key = keys::live(node);
            self.inner.store.txn(
                vec![Compare::mod_revision(key.clone(), *revision)],
                vec![Op::delete(key)],
                Vec::new(),
            )
        });
        let results = join_all(deletes).await;
        let mut state = self.state();
        for ((node, revision), result) in silent.iter().zip(results) {
            match result {
                Ok(_) => {
                    info!(%node, "node silent for its lease TTL; live key deleted");
                    // A new registration since the snapshot put a key of its own. (A
                    // heartbeat that raced the delete puts the key again at the next one.)
                    let Some(entry) = state.nodes.get_mut(node) else {
                        continue;
                    };
                    if entry.put != Some(*revision) {
                        continue;
                    }
                    if entry.attached {
                        entry.put = None;
                    } else {
                        state.nodes.remove(node);
                    }
                }
                Err(err) => warn!(%node, ?err, "deleting the live key of a silent node failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;
    use crate::ops::testing::store;

    const TTL: Duration = Duration::from_millis(600);

    /// Puts `node`'s key on `keys`'s lease the way a registration does.
    async fn register(keys: &LiveKeys, store: &dyn Store, node: &str, session: u64) {
        let lease = keys.lease().await.unwrap();
        let result = store
            .txn(
                Vec::new(),
                vec![Op::put_with_lease(keys::live(node), keys.value(), lease)],
                Vec::new(),
            )
            .await
            .unwrap();
        keys.registered(node, session, result.revision);
    }

    async fn holder(store: &dyn Store, node: &str) -> Option<String> {
        let kv = store.get(keys::live(node).as_bytes()).await.unwrap()?;
        Some(model::decode::<Liveness>(&kv.value).unwrap().scheduler)
    }

    async fn eventually<T, F: Future<Output = Option<T>>>(what: &str, f: impl Fn() -> F) -> T {
        let deadline = Instant::now() + TTL * 10;
        loop {
            if let Some(value) = f().await {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn silent_nodes_lose_their_keys_and_heartbeating_ones_keep_them() {
        let store = store().await;
        let s = &*store.store;
        let (_stop, shutdown) = watch::channel(false);
        let keys = LiveKeys::start(store.store.clone(), TTL, "a".into(), shutdown);
        register(&keys, s, "talks", 1).await;
        register(&keys, s, "silent", 2).await;
        register(&keys, s, "gone", 3).await;
        keys.detached("gone", 3);
        let start = Instant::now();
        while start.elapsed() < TTL * 3 {
            keys.heartbeat("talks", 1).await;
            tokio::time::sleep(TTL / 6).await;
        }
        assert_eq!(holder(s, "talks").await.as_deref(), Some("a"));
        assert_eq!(
            holder(s, "silent").await,
            None,
            "silent with its stream open"
        );
        assert_eq!(
            holder(s, "gone").await,
            None,
            "silent after its stream ended"
        );
        // A heartbeat of an old session does nothing; one of the current session revives.
        keys.heartbeat("silent", 99).await;
        assert_eq!(holder(s, "silent").await, None);
        keys.heartbeat("silent", 2).await;
        assert_eq!(holder(s, "silent").await.as_deref(), Some("a"));
        assert!(!keys.state().nodes.contains_key("gone"), "forgotten");
    }

    #[tokio::test]
    async fn a_key_another_replica_took_over_is_left_alone() {
        let store = store().await;
        let s = &*store.store;
        let (_stop, shutdown) = watch::channel(false);
        let a = LiveKeys::start(store.store.clone(), TTL, "a".into(), shutdown.clone());
        let b = LiveKeys::start(store.store.clone(), TTL, "b".into(), shutdown);
        register(&a, s, "n1", 1).await;
        // The agent moves to replica b without a's stream noticing yet.
        register(&b, s, "n1", 1).await;
        let start = Instant::now();
        while start.elapsed() < TTL * 3 {
            b.heartbeat("n1", 1).await;
            tokio::time::sleep(TTL / 6).await;
        }
        assert_eq!(holder(s, "n1").await.as_deref(), Some("b"));
        // a's entry noticed the silence; a late heartbeat there does not steal the key.
        a.heartbeat("n1", 1).await;
        assert_eq!(holder(s, "n1").await.as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn a_lost_lease_is_replaced_and_attached_keys_put_again() {
        let store = store().await;
        let s = &*store.store;
        let (_stop, shutdown) = watch::channel(false);
        let keys = LiveKeys::start(store.store.clone(), TTL, "a".into(), shutdown);
        register(&keys, s, "attached", 1).await;
        register(&keys, s, "detached", 2).await;
        keys.detached("detached", 2);
        let lost = keys.lease().await.unwrap();
        // The store dropped the lease (as when the replica could not reach it for a TTL).
        s.revoke_lease(lost).await.unwrap();
        assert_eq!(holder(s, "attached").await, None);
        keys.heartbeat("attached", 1).await;
        eventually("the key on a new lease", || async {
            holder(s, "attached").await
        })
        .await;
        let kv = s
            .get(keys::live("attached").as_bytes())
            .await
            .unwrap()
            .unwrap();
        assert_ne!(kv.lease, Some(lost));
        assert_eq!(holder(s, "detached").await, None, "not put again");
    }
}
