//! A local replica of everything under `/gantry/v1/`, kept current by one store watch.
//!
//! Controllers plan from it and node sessions read their assignments from it, so the store
//! sees one watch per scheduler process however many nodes and controllers it serves. The
//! replica is only ever behind the store, never ahead: writers go to the store, and their
//! writes come back through the watch. Waiters learn of changes through notifications that
//! only mean "look again" (a controller's dirty set, a node's `Notify`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use crate::model::{
    self, InstanceRecord, InstanceStatus, Liveness, NodeRecord, RevisionRecord, WorkloadRecord,
    WorkloadStatus, keys,
};
use crate::network::SubnetIndex;
use crate::store::{EventKind, KeyValue, Revision, Store, StoreError};

/// A record with the store revision it was last written at (for compare-and-swap).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The record.
    pub value: T,
    /// The `mod_revision` of its key.
    pub mod_revision: Revision,
}

/// The replicated state at one store revision.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The store revision this view reflects.
    pub revision: Revision,
    /// Workload specs by name.
    pub workloads: BTreeMap<String, Versioned<WorkloadRecord>>,
    /// Workload statuses by name.
    pub workload_status: BTreeMap<String, Versioned<WorkloadStatus>>,
    /// Spec revisions by (workload, generation).
    pub revisions: BTreeMap<(String, u64), Arc<RevisionRecord>>,
    /// Instance records by workload, then id.
    pub instances: BTreeMap<String, BTreeMap<String, Versioned<InstanceRecord>>>,
    /// Instance statuses by instance id.
    pub statuses: HashMap<String, InstanceStatus>,
    /// Node records by name.
    pub nodes: BTreeMap<String, Versioned<NodeRecord>>,
    /// Liveness of the nodes that have a session, by node name.
    pub live: BTreeMap<String, Liveness>,
    /// Ids of the instances assigned to each node, as (workload, id).
    pub by_node: HashMap<String, BTreeSet<(String, String)>>,
    /// Counts changes to node records and live keys: equal counts mean the same nodes with
    /// the same liveness, so a reader can skip looking at every node again.
    pub membership: u64,
    /// Node subnets claimed or held, for allocating the next one.
    pub subnets: SubnetIndex,
}

impl View {
    /// Whether node `name` has a live session.
    pub fn is_live(&self, name: &str) -> bool {
        self.live.contains_key(name)
    }

    /// The instance record `id` of `workload`.
    pub fn instance(&self, workload: &str, id: &str) -> Option<&Versioned<InstanceRecord>> {
        self.instances.get(workload)?.get(id)
    }

    /// The spec revision `generation` of `workload`.
    pub fn revision_of(&self, workload: &str, generation: u64) -> Option<&Arc<RevisionRecord>> {
        self.revisions.get(&(workload.to_owned(), generation))
    }

    /// Applies one store change; returns what it touched, for notifications.
    fn apply(&mut self, kind: EventKind, kv: &KeyValue) -> Touched {
        let key = String::from_utf8_lossy(&kv.key);
        let put = kind == EventKind::Put;
        let mut touched = Touched::default();
        if let Some(name) = key.strip_prefix(keys::WORKLOADS) {
            touched.workload = Some(name.to_owned());
            if put && let Some(value) = parse::<WorkloadRecord>(&key, &kv.value) {
                self.workloads.insert(name.to_owned(), versioned(value, kv));
            } else {
                self.workloads.remove(name);
            }
        } else if let Some(name) = key.strip_prefix(keys::WORKLOAD_STATUS) {
            if put && let Some(value) = parse::<WorkloadStatus>(&key, &kv.value) {
                self.workload_status
                    .insert(name.to_owned(), versioned(value, kv));
            } else {
                self.workload_status.remove(name);
            }
        } else if let Some(rest) = key.strip_prefix(keys::REVISIONS) {
            let Some((name, generation)) = rest
                .rsplit_once('/')
                .and_then(|(n, g)| Some((n.to_owned(), g.parse::<u64>().ok()?)))
            else {
                return touched;
            };
            // Sessions holding an instance of this workload may be waiting for this spec.
            touched.nodes.extend(
                self.instances
                    .get(&name)
                    .into_iter()
                    .flat_map(|ids| ids.values())
                    .filter_map(|r| r.value.node.clone()),
            );
            if put && let Some(value) = parse::<RevisionRecord>(&key, &kv.value) {
                self.revisions.insert((name, generation), Arc::new(value));
            } else {
                self.revisions.remove(&(name, generation));
            }
        } else if let Some(rest) = key.strip_prefix(keys::INSTANCES) {
            let Some((workload, id)) = rest.split_once('/') else {
                return touched;
            };
            touched.workload = Some(workload.to_owned());
            let ids = self.instances.entry(workload.to_owned()).or_default();
            let old_node = ids.get(id).and_then(|r| r.value.node.clone());
            let new = if put {
                parse::<InstanceRecord>(&key, &kv.value)
            } else {
                None
            };
            let new_node = new.as_ref().and_then(|r| r.node.clone());
            // An instance answers by name while its record exists without a stop request.
            let counts =
                |r: Option<&InstanceRecord>| r.is_some_and(|r| r.stop_requested_at.is_none());
            if counts(ids.get(id).map(|r| &r.value)) != counts(new.as_ref())
                && self.statuses.get(id).and_then(endpoint).is_some()
            {
                touched.endpoints = Some(workload.to_owned());
            }
            match new {
                Some(record) => {
                    ids.insert(id.to_owned(), versioned(record, kv));
                }
                None => {
                    ids.remove(id);
                    if ids.is_empty() {
                        self.instances.remove(workload);
                    }
                }
            }
            let entry = (workload.to_owned(), id.to_owned());
            if let Some(node) = &old_node
                && old_node != new_node
                && let Some(set) = self.by_node.get_mut(node)
            {
                set.remove(&entry);
                if set.is_empty() {
                    self.by_node.remove(node);
                }
            }
            if let Some(node) = &new_node {
                self.by_node.entry(node.clone()).or_default().insert(entry);
            }
            touched.nodes.extend(old_node);
            touched.nodes.extend(new_node);
        } else if let Some(rest) = key.strip_prefix(keys::STATUS) {
            let Some((workload, id)) = rest.split_once('/') else {
                return touched;
            };
            touched.workload = Some(workload.to_owned());
            let before = self.statuses.get(id).and_then(endpoint).map(str::to_owned);
            if put && let Some(value) = parse::<InstanceStatus>(&key, &kv.value) {
                if endpoint(&value) != before.as_deref() {
                    touched.endpoints = Some(workload.to_owned());
                }
                self.statuses.insert(id.to_owned(), value);
            } else if self.statuses.remove(id).is_some() && before.is_some() {
                touched.endpoints = Some(workload.to_owned());
            }
        } else if let Some(name) = key.strip_prefix(keys::NODES) {
            self.membership += 1;
            touched.any_node = true;
            touched.nodes.push(name.to_owned());
            if put && let Some(value) = parse::<NodeRecord>(&key, &kv.value) {
                self.subnets.apply_node(name, value.subnet.as_deref());
                self.nodes.insert(name.to_owned(), versioned(value, kv));
            } else {
                self.subnets.apply_node(name, None);
                self.nodes.remove(name);
            }
        } else if let Some(subnet) = key.strip_prefix(keys::SUBNETS) {
            let holder = put.then(|| {
                let node = String::from_utf8_lossy(&kv.value).into_owned();
                (node, kv.mod_revision)
            });
            self.subnets.apply_claim(subnet, holder);
        } else if let Some(name) = key.strip_prefix(keys::LIVE) {
            self.membership += 1;
            touched.any_node = true;
            touched.nodes.push(name.to_owned());
            if put && let Some(value) = parse::<Liveness>(&key, &kv.value) {
                self.live.insert(name.to_owned(), value);
            } else {
                self.live.remove(name);
            }
        }
        touched
    }
}

/// The address an instance answers at by name: its `ip` while it is Ready.
pub fn endpoint(status: &InstanceStatus) -> Option<&str> {
    (status.state == model::InstanceState::Ready && !status.ip.is_empty())
        .then_some(status.ip.as_str())
}

fn versioned<T>(value: T, kv: &KeyValue) -> Versioned<T> {
    Versioned {
        value,
        mod_revision: kv.mod_revision,
    }
}

fn parse<T: for<'de> serde::Deserialize<'de>>(key: &str, value: &[u8]) -> Option<T> {
    match model::decode(value) {
        Ok(v) => Some(v),
        Err(err) => {
            // A record this version cannot read is left out rather than stopping the replica.
            warn!(key, %err, "unreadable record in the store; ignored");
            None
        }
    }
}

/// What one change touched.
#[derive(Debug, Default)]
struct Touched {
    workload: Option<String>,
    /// The workload whose Ready addresses ([`endpoint`]) may have changed.
    endpoints: Option<String>,
    nodes: Vec<String>,
    any_node: bool,
}

/// Workloads that changed since a controller last looked.
#[derive(Debug, Default)]
struct DirtySet {
    names: BTreeSet<String>,
    all: bool,
}

/// A controller's subscription: which workloads changed, and a wake-up.
#[derive(Debug, Clone)]
pub struct Dirty {
    set: Arc<Mutex<DirtySet>>,
    notify: Arc<Notify>,
}

/// What changed since the last [`Dirty::take`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Workloads whose spec, instances or instance statuses changed.
    pub workloads: BTreeSet<String>,
    /// Whether a node changed (registration, readiness, cordon, drain): every workload may be
    /// affected.
    pub nodes: bool,
}

impl Dirty {
    /// Waits until something changed (returns at once if something already did).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// Takes what changed so far.
    pub fn take(&self) -> Changes {
        let mut set = self.set.lock().expect("dirty set lock");
        let DirtySet { names, all } = std::mem::take(&mut *set);
        Changes {
            workloads: names,
            nodes: all,
        }
    }
}

/// Shared handle to the replica. Cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    view: RwLock<View>,
    revision: watch::Sender<Revision>,
    synced: watch::Sender<bool>,
    dirty: Mutex<Vec<Dirty>>,
    node_notify: Mutex<HashMap<String, Arc<Notify>>>,
    /// Bumped whenever node records or live keys change (node sessions resend the network).
    membership: watch::Sender<u64>,
    /// Workloads whose Ready addresses changed since [`Cache::take_endpoint_changes`].
    endpoint_changes: Mutex<EndpointChanges>,
    /// Bumped whenever `endpoint_changes` grows (node sessions resend the names).
    endpoints: watch::Sender<u64>,
}

/// Workloads whose Ready instances' addresses may have changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EndpointChanges {
    /// The workloads touched.
    pub workloads: BTreeSet<String>,
    /// Every workload may have changed (the view was listed again).
    pub all: bool,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("revision", &*self.inner.revision.borrow())
            .finish()
    }
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    /// An empty replica; [`Cache::run`] fills it.
    pub fn new() -> Self {
        Cache {
            inner: Arc::new(Inner {
                view: RwLock::new(View::default()),
                revision: watch::channel(0).0,
                synced: watch::channel(false).0,
                dirty: Mutex::new(Vec::new()),
                node_notify: Mutex::new(HashMap::new()),
                membership: watch::channel(0).0,
                endpoint_changes: Mutex::new(EndpointChanges::default()),
                endpoints: watch::channel(0).0,
            }),
        }
    }

    /// Reads the view. Hold the guard briefly: the watch waits for it.
    pub fn read(&self) -> RwLockReadGuard<'_, View> {
        self.inner.view.read().expect("view lock")
    }

    /// Changes whenever a node record or live key changes (or the view is listed again).
    pub fn membership(&self) -> watch::Receiver<u64> {
        self.inner.membership.subscribe()
    }

    /// Changes whenever an instance becomes Ready or stops being Ready, or a Ready instance's
    /// address changes (or the view is listed again); see [`Cache::take_endpoint_changes`].
    pub fn endpoints(&self) -> watch::Receiver<u64> {
        self.inner.endpoints.subscribe()
    }

    /// Takes the workloads whose Ready addresses changed since the last call. There is one
    /// taker per process (the sessions' name table).
    pub fn take_endpoint_changes(&self) -> EndpointChanges {
        std::mem::take(&mut *self.inner.endpoint_changes.lock().expect("endpoints lock"))
    }

    /// The revision the view reflects.
    pub fn revision(&self) -> Revision {
        *self.inner.revision.borrow()
    }

    /// Waits until the view reflects at least `revision` (read-your-writes for a writer).
    pub async fn wait_for(&self, revision: Revision) {
        let mut rx = self.inner.revision.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    /// Waits until the first full load is in.
    pub async fn synced(&self) {
        let mut rx = self.inner.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Subscribes a controller to workload changes. Starts with everything dirty.
    pub fn subscribe(&self) -> Dirty {
        let dirty = Dirty {
            set: Arc::new(Mutex::new(DirtySet {
                names: BTreeSet::new(),
                all: true,
            })),
            notify: Arc::new(Notify::new()),
        };
        dirty.notify.notify_one();
        self.inner
            .dirty
            .lock()
            .expect("dirty lock")
            .push(dirty.clone());
        dirty
    }

    /// The wake-up of node `name`'s session: notified when an instance assigned to the node
    /// changes, or a spec revision of a workload with an instance on the node.
    pub fn node_notify(&self, name: &str) -> Arc<Notify> {
        self.inner
            .node_notify
            .lock()
            .expect("node notify lock")
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    /// Forgets node `name`'s wake-up (its session ended).
    pub fn forget_node_notify(&self, name: &str) {
        self.inner
            .node_notify
            .lock()
            .expect("node notify lock")
            .remove(name);
    }

    /// The live subscriptions; those whose controller is gone (a leader that stepped down)
    /// are dropped here, so re-elections do not pile up subscriptions to feed.
    fn subscribers(&self) -> MutexGuard<'_, Vec<Dirty>> {
        let mut dirty = self.inner.dirty.lock().expect("dirty lock");
        dirty.retain(|d| Arc::strong_count(&d.set) > 1);
        dirty
    }

    /// Replaces the whole view with a fresh listing at `revision`.
    fn load(&self, kvs: &[KeyValue], revision: Revision) {
        let mut view = View::default();
        for kv in kvs {
            view.apply(EventKind::Put, kv);
        }
        view.revision = revision;
        *self.inner.view.write().expect("view lock") = view;
        for dirty in self.subscribers().iter() {
            dirty.set.lock().expect("dirty set lock").all = true;
            dirty.notify.notify_one();
        }
        for notify in self
            .inner
            .node_notify
            .lock()
            .expect("node notify lock")
            .values()
        {
            notify.notify_one();
        }
        self.inner.revision.send_replace(revision);
        self.inner.membership.send_modify(|n| *n += 1);
        self.inner
            .endpoint_changes
            .lock()
            .expect("endpoints lock")
            .all = true;
        self.inner.endpoints.send_modify(|n| *n += 1);
        self.inner.synced.send_replace(true);
    }

    /// Applies a batch of events of one or more revisions, then notifies once.
    fn apply(&self, events: &[crate::store::Event]) {
        let Some(last) = events.last() else { return };
        let mut workloads = BTreeSet::new();
        let mut nodes = BTreeSet::new();
        let mut any_node = false;
        let mut endpoints = BTreeSet::new();
        {
            let mut view = self.inner.view.write().expect("view lock");
            for event in events {
                let touched = view.apply(event.kind, &event.kv);
                workloads.extend(touched.workload);
                endpoints.extend(touched.endpoints);
                nodes.extend(touched.nodes);
                any_node |= touched.any_node;
            }
            view.revision = last.revision();
        }
        if !workloads.is_empty() || any_node {
            for dirty in self.subscribers().iter() {
                let mut set = dirty.set.lock().expect("dirty set lock");
                set.names.extend(workloads.iter().cloned());
                set.all |= any_node;
                drop(set);
                dirty.notify.notify_one();
            }
        }
        if any_node {
            self.inner.membership.send_modify(|n| *n += 1);
        }
        if !endpoints.is_empty() {
            self.inner
                .endpoint_changes
                .lock()
                .expect("endpoints lock")
                .workloads
                .extend(endpoints);
            self.inner.endpoints.send_modify(|n| *n += 1);
        }
        if !nodes.is_empty() {
            let notifies = self.inner.node_notify.lock().expect("node notify lock");
            for node in &nodes {
                if let Some(notify) = notifies.get(node) {
                    notify.notify_one();
                }
            }
        }
        self.inner.revision.send_replace(last.revision());
    }

    /// Keeps the replica current until `shutdown`: lists, then watches from the listing's
    /// revision; lists again when the watch falls behind compaction, and retries with backoff
    /// while the store is unreachable.
    pub async fn run(&self, store: Arc<dyn Store>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            let synced_at = tokio::select! {
                _ = &mut shutdown => return,
                r = self.sync(&*store) => r,
            };
            let error = match synced_at {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    continue;
                }
                Err(err) => err,
            };
            warn!(?error, "store replica lost its watch; listing again");
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One list + watch cycle; returns when the watch ends.
    async fn sync(&self, store: &dyn Store) -> Result<(), StoreError> {
        let from = if *self.inner.synced.borrow() {
            self.revision() + 1
        } else {
            0
        };
        let mut stream = if from > 0 {
            match store.watch(keys::ROOT.as_bytes(), from).await {
                Ok(stream) => stream,
                Err(StoreError::Compacted { .. }) => self.relist(store).await?,
                Err(err) => return Err(err),
            }
        } else {
            self.relist(store).await?
        };
        let mut batch = Vec::new();
        loop {
            // Drain what is ready into one batch, so a burst of writes costs one notification.
            let Some(first) = stream.next().await else {
                return Err(StoreError::Closed);
            };
            batch.push(first?);
            while batch.len() < 4096 {
                match futures::FutureExt::now_or_never(stream.next()) {
                    Some(Some(Ok(event))) => batch.push(event),
                    Some(Some(Err(err))) => {
                        self.apply(&batch);
                        return Err(err);
                    }
                    Some(None) => {
                        self.apply(&batch);
                        return Err(StoreError::Closed);
                    }
                    None => break,
                }
            }
            debug!(events = batch.len(), "replica applying");
            self.apply(&batch);
            batch.clear();
        }
    }

    async fn relist(&self, store: &dyn Store) -> Result<crate::store::WatchStream, StoreError> {
        let (kvs, revision) = store.range(keys::ROOT.as_bytes(), None).await?;
        self.load(&kvs, revision);
        store.watch(keys::ROOT.as_bytes(), revision + 1).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Timestamp, encode};
    use crate::store::{EmbeddedStore, Op};

    fn instance(workload: &str, id: &str, node: Option<&str>) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            workload: workload.into(),
            generation: 1,
            node: node.map(Into::into),
            created_at: Timestamp(0),
            scheduled_at: None,
            placement_failures: Vec::new(),
            stop_requested_at: None,
        }
    }

    fn kv(key: &str, value: Vec<u8>, rev: Revision) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value,
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: None,
        }
    }

    #[test]
    fn view_indexes_instances_by_node_and_follows_moves() {
        let mut view = View::default();
        let key = keys::instance("web", "web-a");
        view.apply(
            EventKind::Put,
            &kv(&key, encode(&instance("web", "web-a", None)), 2),
        );
        assert!(view.by_node.is_empty());
        view.apply(
            EventKind::Put,
            &kv(&key, encode(&instance("web", "web-a", Some("n1"))), 3),
        );
        assert_eq!(view.by_node["n1"].len(), 1);
        assert_eq!(view.instance("web", "web-a").unwrap().mod_revision, 3);
        view.apply(EventKind::Delete, &kv(&key, Vec::new(), 4));
        assert!(view.by_node.is_empty());
        assert!(view.instances.is_empty());
    }

    #[test]
    fn only_changes_of_ready_addresses_touch_endpoints() {
        let mut view = View::default();
        let status = |state, ip: &str, at| InstanceStatus {
            state,
            ip: ip.into(),
            observed_at: Timestamp(at),
            ..InstanceStatus::default()
        };
        let key = keys::status("web", "web-a");
        let record = keys::instance("web", "web-a");
        let mut put =
            |kind, key: &str, value: Vec<u8>| view.apply(kind, &kv(key, value, 2)).endpoints;
        let web = Some("web".to_owned());
        use model::InstanceState::{Ready, Running};
        assert_eq!(
            put(
                EventKind::Put,
                &record,
                encode(&instance("web", "web-a", Some("n1")))
            ),
            None
        );
        assert_eq!(
            put(
                EventKind::Put,
                &key,
                encode(&status(Running, "10.0.0.2", 1))
            ),
            None
        );
        assert_eq!(
            put(EventKind::Put, &key, encode(&status(Ready, "10.0.0.2", 2))),
            web
        );
        // The same address observed again costs nothing.
        assert_eq!(
            put(EventKind::Put, &key, encode(&status(Ready, "10.0.0.2", 3))),
            None
        );
        assert_eq!(
            put(EventKind::Put, &key, encode(&status(Ready, "10.0.0.3", 4))),
            web
        );
        // A stop request, or the record going, takes the name away.
        let mut stopping = instance("web", "web-a", Some("n1"));
        stopping.stop_requested_at = Some(Timestamp(5));
        assert_eq!(put(EventKind::Put, &record, encode(&stopping)), web);
        assert_eq!(
            put(EventKind::Delete, &record, Vec::new()),
            None,
            "already without a name"
        );
        assert_eq!(put(EventKind::Delete, &key, Vec::new()), web);
    }

    #[test]
    fn dropped_subscriptions_are_forgotten() {
        let cache = Cache::new();
        let kept = cache.subscribe();
        drop(cache.subscribe());
        assert_eq!(cache.subscribers().len(), 1);
        drop(kept);
        assert!(cache.subscribers().is_empty());
    }

    #[test]
    fn unreadable_records_are_skipped() {
        let mut view = View::default();
        view.apply(
            EventKind::Put,
            &kv(&keys::node("n1"), b"not json".to_vec(), 2),
        );
        assert!(view.nodes.is_empty());
    }

    #[tokio::test]
    async fn replica_follows_the_store_and_marks_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(dir.path().join("db")).await.unwrap());
        store
            .put(
                keys::instance("web", "web-a").as_bytes(),
                &encode(&instance("web", "web-a", Some("n1"))),
            )
            .await
            .unwrap();
        let cache = Cache::new();
        let dirty = cache.subscribe();
        let notify = cache.node_notify("n2");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn({
            let cache = cache.clone();
            let store = store.clone();
            async move {
                cache
                    .run(store, async {
                        let _ = stop_rx.await;
                    })
                    .await
            }
        });
        cache.synced().await;
        assert_eq!(cache.read().by_node["n1"].len(), 1);
        dirty.changed().await;
        assert!(dirty.take().nodes, "a fresh subscription starts all dirty");

        let result = store
            .txn(
                Vec::new(),
                vec![Op::put(
                    keys::instance("web", "web-b"),
                    encode(&instance("web", "web-b", Some("n2"))),
                )],
                Vec::new(),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), cache.wait_for(result.revision))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), notify.notified())
            .await
            .expect("the node's session is woken");
        dirty.changed().await;
        let changes = dirty.take();
        assert_eq!(changes.workloads, BTreeSet::from(["web".to_owned()]));
        assert!(!changes.nodes);
        assert_eq!(cache.read().by_node["n2"].len(), 1);
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }
}
