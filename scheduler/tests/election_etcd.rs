//! Leader election against a real etcd: the leader dies without resigning, and the follower
//! must take over within the TTL plus one second, after the old leader stepped down.
//!
//! Needs `/usr/bin/etcd` (Debian `etcd-server`): without it the test is skipped, unless `CI`
//! is set (to anything but `false` or `0`), where it fails. The embedded-store versions of
//! this and the other election scenarios are unit tests in `src/election.rs`.

use gantry_scheduler as crate_under_test;

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use crate_under_test::election::{
    DEFAULT_LEADER_KEY, DEFAULT_TTL, ElectionConfig, Leadership, Loss, campaign, current_leader,
};
use crate_under_test::store::{
    Compare, KeyValue, LeaseId, Op, Revision, Store, TxnResult, WatchStream,
};
use futures::StreamExt;
use support::{EtcdServer, etcd_available};
use tokio::time::{Instant, sleep, timeout};

/// Upper bound on waiting for an election: a guard, never a synchronisation.
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn election_replaces_a_dead_leader_within_the_ttl() -> Result<()> {
    if !etcd_available() {
        return Ok(());
    }
    let server = EtcdServer::start().await?;
    // Each candidate has its own connection, as separate processes would.
    let a_store: Arc<dyn Store> = Arc::new(server.connect().await?);
    let (a_store, a_cut) = Severable::wrap(a_store);
    let b_store: Arc<dyn Store> = Arc::new(server.connect().await?);

    let a = campaign(
        a_store,
        ElectionConfig::new("a"),
        std::future::pending::<()>(),
    );
    let a = timeout(WAIT, a)
        .await
        .context("a not elected in time")??
        .context("a shut down")?;
    let b = tokio::spawn(campaign(
        b_store.clone(),
        ElectionConfig::new("b"),
        std::future::pending::<()>(),
    ));
    // Longer than the TTL, so the lease lives on keep-alives; not on a keep-alive tick.
    sleep(Duration::from_millis(4500)).await;
    assert!(a.is_held(), "a lost leadership: {:?}", a.lost().await);
    assert!(!b.is_finished(), "two leaders at once");
    assert_eq!(
        current_leader(&*b_store, DEFAULT_LEADER_KEY)
            .await?
            .as_deref(),
        Some("a")
    );

    let died = Instant::now();
    a_cut.store(true, Ordering::SeqCst);
    let a_lost = a.lost();
    let a_lost = tokio::spawn(async move { (a_lost.await, Instant::now()) });
    let b = timeout(WAIT, b)
        .await
        .context("b not elected in time")???
        .context("b shut down")?;
    let b_at = Instant::now();
    let (loss, a_lost_at) = a_lost.await?;
    let (stepped_down, takeover) = (a_lost_at - died, b_at - died);
    eprintln!(
        "leader died (etcd, wall clock): stepped down after {stepped_down:?}, \
         follower elected after {takeover:?}"
    );
    assert_eq!(loss, Loss::Unreachable);
    assert!(
        stepped_down <= DEFAULT_TTL * 2 / 3 + Duration::from_millis(200),
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
    assert_eq!(
        current_leader(&*b_store, DEFAULT_LEADER_KEY)
            .await?
            .as_deref(),
        Some("b")
    );
    // A delayed write of the old leader's controllers is fenced off; the new one's is not.
    assert!(!fenced_write(&b_store, &a, "stale").await?);
    assert!(fenced_write(&b_store, &b, "fresh").await?);
    assert_eq!(b.resign().await, Loss::Resigned);
    Ok(())
}

async fn fenced_write(store: &Arc<dyn Store>, leader: &Leadership, value: &str) -> Result<bool> {
    let result = store
        .txn(
            vec![leader.fence()],
            vec![Op::put("/gantry/v1/test/election/fenced", value)],
            Vec::new(),
        )
        .await?;
    Ok(result.succeeded)
}

/// A store handle that can be cut off: while cut, calls and watch events stall, as for a
/// process that died (it can neither keep its lease alive nor revoke it).
struct Severable {
    inner: Arc<dyn Store>,
    cut: Arc<AtomicBool>,
}

impl Severable {
    fn wrap(inner: Arc<dyn Store>) -> (Arc<dyn Store>, Arc<AtomicBool>) {
        let cut = Arc::new(AtomicBool::new(false));
        let store = Severable {
            inner,
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
    async fn get(&self, key: &[u8]) -> crate_under_test::store::Result<Option<KeyValue>> {
        reachable(&self.cut).await;
        self.inner.get(key).await
    }

    async fn range(
        &self,
        prefix: &[u8],
        at: Option<Revision>,
    ) -> crate_under_test::store::Result<(Vec<KeyValue>, Revision)> {
        reachable(&self.cut).await;
        self.inner.range(prefix, at).await
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> crate_under_test::store::Result<TxnResult> {
        reachable(&self.cut).await;
        self.inner.txn(compares, success, failure).await
    }

    async fn watch(
        &self,
        prefix: &[u8],
        from: Revision,
    ) -> crate_under_test::store::Result<WatchStream> {
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

    async fn compact(&self, revision: Revision) -> crate_under_test::store::Result<()> {
        reachable(&self.cut).await;
        self.inner.compact(revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> crate_under_test::store::Result<LeaseId> {
        reachable(&self.cut).await;
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> crate_under_test::store::Result<()> {
        reachable(&self.cut).await;
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> crate_under_test::store::Result<()> {
        reachable(&self.cut).await;
        self.inner.revoke_lease(lease).await
    }

    async fn current_revision(&self) -> crate_under_test::store::Result<Revision> {
        reachable(&self.cut).await;
        self.inner.current_revision().await
    }
}
