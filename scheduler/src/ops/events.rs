//! The change stream behind `Events.Watch`: the store's key events under `/gantry/v1/` turned
//! into changes of API objects, each with the store revision it was written at.
//!
//! An API object is made of two keys: a workload of its spec and its status, an instance of
//! its record and its status, a node of its record and its liveness key. The stream keeps the
//! last value it saw of every such key ([`LastSeen`]), primed by a range just before the first
//! revision it delivers, so that a change to either key can be reported as the whole object.
//! The key events of one revision (one transaction) are applied together, then every object
//! they touched is compared before and after: it was created, updated or deleted — and an
//! object whose two keys changed in one transaction yields one change, not two.
//!
//! Revisions of workload specs and the leader key are not objects and yield nothing; notices
//! yield [`Change::Notice`] when asked for.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::warn;

use super::instances::InstanceView;
use super::nodes::{NodeView, spec_resources, usage};
use super::workloads::WorkloadView;
use super::{Error, ObjectKind, Result};
use crate::model::{
    self, InstanceRecord, InstanceStatus, Liveness, NodeRecord, NoticeRecord, Timestamp,
    WorkloadRecord, WorkloadStatus, keys,
};
use crate::placement::Resources;
use crate::store::{Event, EventKind, KeyValue, Revision, Store, StoreError, WatchStream};

/// Changes buffered between the store watch and a slow client.
const BUFFER: usize = 256;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// It was created; the object is its new state.
    Created,
    /// Its spec, record, status or liveness changed; the object is its new state.
    Updated,
    /// It was deleted; the object is its last state.
    Deleted,
}

/// An API object as a change reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A workload with its status.
    Workload(Box<WorkloadView>),
    /// An instance with its status.
    Instance(Box<InstanceView>),
    /// A node with its readiness.
    Node(Box<NodeView>),
}

impl Object {
    /// The kind of object.
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Workload(_) => ObjectKind::Workload,
            Object::Instance(_) => ObjectKind::Instance,
            Object::Node(_) => ObjectKind::Node,
        }
    }
}

/// One item of the change stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// An object changed.
    Object {
        /// Store revision of the write.
        revision: Revision,
        /// What happened.
        kind: ChangeKind,
        /// The object.
        object: Object,
        /// When the change was made, when the records say (`updated_at` of a spec,
        /// `observed_at` of a status); `None` otherwise.
        time: Option<Timestamp>,
    },
    /// A notice was written.
    Notice {
        /// Store revision of the write.
        revision: Revision,
        /// The notice.
        notice: NoticeRecord,
    },
    /// Nothing matched the filters up to `revision`, and every change up to it was delivered.
    Bookmark {
        /// The revision up to which the stream is complete.
        revision: Revision,
    },
}

impl Change {
    /// The store revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            Change::Object { revision, .. }
            | Change::Notice { revision, .. }
            | Change::Bookmark { revision } => *revision,
        }
    }
}

/// Which changes a watch delivers; every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchFilter {
    /// Only objects (and notices about objects) of these kinds; empty: all.
    pub kinds: Vec<ObjectKind>,
    /// Only this workload and its instances.
    pub workload: Option<String>,
    /// Only this node and the instances placed on it (before or after the change).
    pub node: Option<String>,
    /// Deliver notices too.
    pub notices: bool,
}

impl WatchFilter {
    fn wants_kind(&self, kind: ObjectKind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }
}

/// A watch request.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchQuery {
    /// First revision to deliver; 0: changes written after the call.
    pub from_revision: Revision,
    /// What to deliver.
    pub filter: WatchFilter,
    /// A [`Change::Bookmark`] is sent after this long without any change sent.
    pub bookmark_interval: Duration,
    /// How long the stream may last (the caller's deadline); it then ends with
    /// [`Error::DeadlineExceeded`].
    pub timeout: Option<Duration>,
}

/// The changes of a watch; an `Err` item is the last one.
pub type ChangeStream = ReceiverStream<Result<Change>>;

/// Starts a watch: primes the last-seen state, opens the store watch, and streams changes
/// from a task until the receiver is dropped, the deadline passes or the store watch fails.
///
/// Errors that can be known up front come from this call rather than from the stream: a
/// compacted `from_revision` is [`StoreError::Compacted`] with `requested` set to it.
pub async fn watch(store: Arc<dyn Store>, query: WatchQuery) -> Result<ChangeStream> {
    if query.from_revision < 0 {
        return Err(Error::invalid(
            "from_revision",
            "must not be negative (0: changes from now on)",
        ));
    }
    let deadline = query.timeout.map(|t| (Instant::now() + t, t));
    let (seen, start) = prime(&*store, query.from_revision).await?;
    let events = store.watch(keys::ROOT.as_bytes(), start).await?;
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(run(events, seen, start - 1, query, deadline, tx));
    Ok(ReceiverStream::new(rx))
}

/// The state just before the first revision to deliver, and that revision.
async fn prime(store: &dyn Store, from: Revision) -> Result<(LastSeen, Revision)> {
    if from == 0 {
        let (kvs, at) = store.range(keys::ROOT.as_bytes(), None).await?;
        return Ok((LastSeen::from_kvs(&kvs), at + 1));
    }
    if from == 1 {
        // A store starts empty at revision 1.
        return Ok((LastSeen::default(), 1));
    }
    let kvs = match store.range(keys::ROOT.as_bytes(), Some(from - 1)).await {
        Ok((kvs, _)) => kvs,
        // History starts exactly at `from`: the state at `from` does as well, since the
        // events at `from` carry the values they replace.
        Err(StoreError::Compacted { compacted, .. }) if compacted == from => {
            store.range(keys::ROOT.as_bytes(), Some(from)).await?.0
        }
        Err(StoreError::Compacted { compacted, .. }) => {
            return Err(StoreError::Compacted {
                requested: from,
                compacted,
            }
            .into());
        }
        Err(err) => return Err(err.into()),
    };
    Ok((LastSeen::from_kvs(&kvs), from))
}

/// The watch task: store events in, changes out.
async fn run(
    events: WatchStream,
    mut seen: LastSeen,
    mut delivered: Revision,
    query: WatchQuery,
    deadline: Option<(Instant, Duration)>,
    tx: mpsc::Sender<Result<Change>>,
) {
    let mut events = events.peekable();
    let expired = async {
        match deadline {
            Some((at, _)) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let quiet = tokio::time::sleep(query.bookmark_interval);
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            biased;
            () = tx.closed() => return,
            () = &mut expired => {
                let budget = deadline.map(|(_, t)| t).unwrap_or_default();
                let _ = tx.send(Err(Error::DeadlineExceeded(budget))).await;
                return;
            }
            item = events.next() => {
                let first = match item {
                    Some(Ok(event)) => event,
                    Some(Err(err)) => {
                        let _ = tx.send(Err(err.into())).await;
                        return;
                    }
                    None => {
                        let _ = tx.send(Err(StoreError::Closed.into())).await;
                        return;
                    }
                };
                // The rest of the revision's events, as far as they are already there.
                let revision = first.revision();
                let mut batch = vec![first];
                loop {
                    let same = matches!(
                        std::pin::Pin::new(&mut events).peek().now_or_never(),
                        Some(Some(Ok(next))) if next.revision() == revision
                    );
                    match same.then(|| events.next().now_or_never()).flatten() {
                        Some(Some(Ok(next))) => batch.push(next),
                        _ => break,
                    }
                }
                let changes = seen.apply_batch(&batch, &query.filter);
                delivered = revision;
                let sent = !changes.is_empty();
                for change in changes {
                    if tx.send(Ok(change)).await.is_err() {
                        return;
                    }
                }
                if sent {
                    quiet.as_mut().reset(Instant::now() + query.bookmark_interval);
                }
            }
            () = &mut quiet => {
                if delivered > 0
                    && tx.send(Ok(Change::Bookmark { revision: delivered })).await.is_err()
                {
                    return;
                }
                quiet.as_mut().reset(Instant::now() + query.bookmark_interval);
            }
        }
    }
}

/// The two keys of an object: its record and its status (or liveness), each with the
/// `mod_revision` of its key.
#[derive(Debug, Clone, PartialEq)]
struct Pair<R, S> {
    record: Option<(R, Revision)>,
    status: Option<(S, Revision)>,
}

impl<R, S> Default for Pair<R, S> {
    fn default() -> Self {
        Pair {
            record: None,
            status: None,
        }
    }
}

impl<R, S> Pair<R, S> {
    fn revision(&self) -> Revision {
        let record = self.record.as_ref().map_or(0, |(_, r)| *r);
        let status = self.status.as_ref().map_or(0, |(_, r)| *r);
        record.max(status)
    }
}

/// What a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Workload(String),
    WorkloadStatus(String),
    Instance(String, String),
    InstanceStatus(String, String),
    Node(String),
    Live(String),
    Notice,
    Other,
}

impl Slot {
    fn of(key: &[u8]) -> Slot {
        let Ok(key) = std::str::from_utf8(key) else {
            return Slot::Other;
        };
        let pair = |rest: &str| {
            rest.split_once('/')
                .map(|(w, id)| (w.to_string(), id.to_string()))
        };
        if let Some(name) = key.strip_prefix(keys::WORKLOADS) {
            Slot::Workload(name.to_string())
        } else if let Some(name) = key.strip_prefix(keys::WORKLOAD_STATUS) {
            Slot::WorkloadStatus(name.to_string())
        } else if let Some((w, id)) = key.strip_prefix(keys::INSTANCES).and_then(pair) {
            Slot::Instance(w, id)
        } else if let Some((w, id)) = key.strip_prefix(keys::STATUS).and_then(pair) {
            Slot::InstanceStatus(w, id)
        } else if let Some(name) = key.strip_prefix(keys::NODES) {
            Slot::Node(name.to_string())
        } else if let Some(name) = key.strip_prefix(keys::LIVE) {
            Slot::Live(name.to_string())
        } else if key.starts_with(keys::NOTICES) {
            Slot::Notice
        } else {
            Slot::Other
        }
    }

    fn target(&self) -> Option<Target> {
        match self {
            Slot::Workload(n) | Slot::WorkloadStatus(n) => Some(Target::Workload(n.clone())),
            Slot::Instance(w, id) | Slot::InstanceStatus(w, id) => {
                Some(Target::Instance(w.clone(), id.clone()))
            }
            Slot::Node(n) | Slot::Live(n) => Some(Target::Node(n.clone())),
            Slot::Notice | Slot::Other => None,
        }
    }
}

/// An object, by its identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Workload(String),
    Instance(String, String),
    Node(String),
}

/// The two keys of one object, as last seen.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Workload(Box<Pair<WorkloadRecord, WorkloadStatus>>),
    Instance(Pair<InstanceRecord, InstanceStatus>),
    Node(Pair<NodeRecord, Liveness>),
}

impl State {
    fn exists(&self) -> bool {
        match self {
            State::Workload(p) => p.record.is_some(),
            State::Instance(p) => p.record.is_some(),
            State::Node(p) => p.record.is_some(),
        }
    }

    /// The node an instance is assigned to.
    fn node(&self) -> Option<&str> {
        match self {
            State::Instance(p) => p.record.as_ref()?.0.node.as_deref(),
            _ => None,
        }
    }

    /// Sets the half that `slot` names to the value of `kv` (`None`: absent).
    fn set(&mut self, slot: &Slot, kv: Option<&KeyValue>) {
        match (self, slot) {
            (State::Workload(p), Slot::Workload(_)) => p.record = kv.and_then(decoded),
            (State::Workload(p), Slot::WorkloadStatus(_)) => p.status = kv.and_then(decoded),
            (State::Instance(p), Slot::Instance(..)) => p.record = kv.and_then(decoded),
            (State::Instance(p), Slot::InstanceStatus(..)) => p.status = kv.and_then(decoded),
            (State::Node(p), Slot::Node(_)) => p.record = kv.and_then(decoded),
            (State::Node(p), Slot::Live(_)) => p.status = kv.and_then(decoded),
            _ => {}
        }
    }
}

/// A record and its key's `mod_revision`; `None` (and a warning) when it does not decode.
fn decoded<T: DeserializeOwned>(kv: &KeyValue) -> Option<(T, Revision)> {
    match model::decode(&kv.value) {
        Ok(value) => Some((value, kv.mod_revision)),
        Err(err) => {
            let key = String::from_utf8_lossy(&kv.key);
            warn!(%key, %err, "skipping a corrupt record in the event stream");
            None
        }
    }
}

/// The last value seen of every key that makes up an API object.
#[derive(Debug, Default)]
pub(crate) struct LastSeen {
    workloads: BTreeMap<String, Pair<WorkloadRecord, WorkloadStatus>>,
    instances: BTreeMap<(String, String), Pair<InstanceRecord, InstanceStatus>>,
    nodes: BTreeMap<String, Pair<NodeRecord, Liveness>>,
}

impl LastSeen {
    /// The state that a range returned.
    pub(crate) fn from_kvs(kvs: &[KeyValue]) -> Self {
        let mut seen = LastSeen::default();
        for kv in kvs {
            let slot = Slot::of(&kv.key);
            if let Some(target) = slot.target() {
                let mut state = seen.state(&target);
                state.set(&slot, Some(kv));
                seen.store(&target, state);
            }
        }
        seen
    }

    /// The state of `target` (empty halves when unknown).
    fn state(&self, target: &Target) -> State {
        match target {
            Target::Workload(n) => {
                State::Workload(Box::new(self.workloads.get(n).cloned().unwrap_or_default()))
            }
            Target::Instance(w, id) => State::Instance(
                self.instances
                    .get(&(w.clone(), id.clone()))
                    .cloned()
                    .unwrap_or_default(),
            ),
            Target::Node(n) => State::Node(self.nodes.get(n).cloned().unwrap_or_default()),
        }
    }

    /// Replaces the state of `target`, forgetting it when both halves are absent.
    fn store(&mut self, target: &Target, state: State) {
        fn put<K: Ord, R, S>(map: &mut BTreeMap<K, Pair<R, S>>, key: K, pair: Pair<R, S>) {
            if pair.record.is_none() && pair.status.is_none() {
                map.remove(&key);
            } else {
                map.insert(key, pair);
            }
        }
        match (target, state) {
            (Target::Workload(n), State::Workload(p)) => put(&mut self.workloads, n.clone(), *p),
            (Target::Instance(w, id), State::Instance(p)) => {
                put(&mut self.instances, (w.clone(), id.clone()), p)
            }
            (Target::Node(n), State::Node(p)) => put(&mut self.nodes, n.clone(), p),
            _ => {}
        }
    }

    /// Applies the events of one revision and returns the changes the filter wants.
    pub(crate) fn apply_batch(&mut self, events: &[Event], filter: &WatchFilter) -> Vec<Change> {
        let mut before: BTreeMap<Target, State> = BTreeMap::new();
        let mut keys_seen: HashSet<&[u8]> = HashSet::new();
        let mut notices = Vec::new();
        let mut revision = 0;
        for event in events {
            revision = event.revision();
            let slot = Slot::of(&event.kv.key);
            let Some(target) = slot.target() else {
                if slot == Slot::Notice
                    && event.kind == EventKind::Put
                    && filter.notices
                    && let Some((notice, _)) = decoded::<NoticeRecord>(&event.kv)
                    && self.wants_notice(filter, &notice)
                {
                    notices.push(Change::Notice { revision, notice });
                }
                continue;
            };
            let old = before
                .entry(target.clone())
                .or_insert_with(|| self.state(&target));
            // The value this event replaces is the key's value before the revision; it
            // corrects a state primed after the revision (see `prime`).
            if keys_seen.insert(&event.kv.key) {
                old.set(&slot, event.prev.as_ref());
            }
            let mut state = self.state(&target);
            let kv = (event.kind == EventKind::Put).then_some(&event.kv);
            state.set(&slot, kv);
            self.store(&target, state);
        }
        let mut changes: Vec<Change> = before
            .into_iter()
            .filter_map(|(target, old)| {
                let new = self.state(&target);
                self.change(revision, &target, old, new, filter)
            })
            .collect();
        changes.extend(notices);
        changes
    }

    /// The change of `target` from `old` to `new`, if there is one and the filter wants it.
    fn change(
        &self,
        revision: Revision,
        target: &Target,
        old: State,
        new: State,
        filter: &WatchFilter,
    ) -> Option<Change> {
        let kind = match (old.exists(), new.exists()) {
            (false, true) => ChangeKind::Created,
            (true, true) if old != new => ChangeKind::Updated,
            (true, false) => ChangeKind::Deleted,
            _ => return None,
        };
        let wanted = match target {
            Target::Workload(name) => {
                filter.wants_kind(ObjectKind::Workload)
                    && filter.node.is_none()
                    && filter.workload.as_ref().is_none_or(|w| w == name)
            }
            Target::Instance(workload, _) => {
                filter.wants_kind(ObjectKind::Instance)
                    && filter.workload.as_ref().is_none_or(|w| w == workload)
                    && filter
                        .node
                        .as_deref()
                        .is_none_or(|n| old.node() == Some(n) || new.node() == Some(n))
            }
            Target::Node(name) => {
                filter.wants_kind(ObjectKind::Node)
                    && filter.workload.is_none()
                    && filter.node.as_ref().is_none_or(|n| n == name)
            }
        };
        if !wanted {
            return None;
        }
        let (shown, time) = match kind {
            ChangeKind::Deleted => (old, None),
            _ => {
                let time = change_time(&old, &new);
                (new, time)
            }
        };
        let object = match shown {
            State::Workload(p) => Object::Workload(Box::new(self.workload_view(*p)?)),
            State::Instance(p) => Object::Instance(Box::new(self.instance_view(p)?)),
            State::Node(p) => Object::Node(Box::new(self.node_view(p)?)),
        };
        Some(Change::Object {
            revision,
            kind,
            object,
            time,
        })
    }

    fn workload_view(&self, pair: Pair<WorkloadRecord, WorkloadStatus>) -> Option<WorkloadView> {
        let revision = pair.revision();
        let (record, _) = pair.record?;
        Some(WorkloadView {
            record,
            status: pair.status.map(|(s, _)| s),
            revision,
        })
    }

    fn instance_view(&self, pair: Pair<InstanceRecord, InstanceStatus>) -> Option<InstanceView> {
        let revision = pair.revision();
        let (record, _) = pair.record?;
        let labels = self
            .workloads
            .get(&record.workload)
            .and_then(|w| w.record.as_ref())
            .map(|(w, _)| w.spec.labels.clone())
            .unwrap_or_default();
        Some(InstanceView {
            record,
            status: pair.status.map(|(s, _)| s),
            labels,
            revision,
        })
    }

    fn node_view(&self, pair: Pair<NodeRecord, Liveness>) -> Option<NodeView> {
        let (record, revision) = pair.record?;
        let instances = self
            .instances
            .values()
            .filter_map(|p| p.record.as_ref().map(|(r, _)| r));
        let (allocated, instance_count) = usage(&record.name, instances, |i| {
            self.workloads
                .get(&i.workload)
                .and_then(|w| w.record.as_ref())
                .map_or(Resources::ZERO, |(w, _)| spec_resources(&w.spec))
        });
        Some(NodeView {
            record,
            liveness: pair.status.map(|(l, _)| l),
            allocated,
            instance_count,
            revision,
        })
    }

    fn wants_notice(&self, filter: &WatchFilter, notice: &NoticeRecord) -> bool {
        let kind = match notice.kind.as_str() {
            "workload" => Some(ObjectKind::Workload),
            "instance" => Some(ObjectKind::Instance),
            "node" => Some(ObjectKind::Node),
            _ => None,
        };
        let kind_ok = filter.kinds.is_empty() || kind.is_some_and(|k| filter.wants_kind(k));
        let workload_ok = filter.workload.as_ref().is_none_or(|w| {
            notice.workload == *w || (kind == Some(ObjectKind::Workload) && notice.name == *w)
        });
        let node_ok = filter.node.as_ref().is_none_or(|n| match kind {
            Some(ObjectKind::Node) => notice.name == *n,
            Some(ObjectKind::Instance) => self
                .instances
                .get(&(notice.workload.clone(), notice.name.clone()))
                .and_then(|p| p.record.as_ref())
                .is_some_and(|(r, _)| r.node.as_deref() == Some(n.as_str())),
            _ => false,
        });
        kind_ok && workload_ok && node_ok
    }
}

/// When the records say a change was made: a spec's `updated_at`, a status's `observed_at`.
fn change_time(old: &State, new: &State) -> Option<Timestamp> {
    match (old, new) {
        (State::Workload(o), State::Workload(n)) if o.record != n.record => {
            n.record.as_ref().map(|(r, _)| r.updated_at)
        }
        (State::Instance(o), State::Instance(n)) if o.status != n.status => {
            n.status.as_ref().map(|(s, _)| s.observed_at)
        }
        (State::Instance(o), State::Instance(n)) if o.record.is_none() => {
            n.record.as_ref().map(|(r, _)| r.created_at)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::nodes::tests::{instance, node, put, put_instance};
    use crate::ops::testing::{applied, service, store};
    use crate::store::Op;

    const WAIT: Duration = Duration::from_secs(30);

    fn query(from: Revision, filter: WatchFilter) -> WatchQuery {
        WatchQuery {
            from_revision: from,
            filter,
            bookmark_interval: Duration::from_secs(3600),
            timeout: None,
        }
    }

    async fn next(stream: &mut ChangeStream) -> Change {
        tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("a change in time")
            .expect("stream open")
            .expect("no error")
    }

    /// `kind object-name` of an object change.
    fn show(change: &Change) -> String {
        match change {
            Change::Object { kind, object, .. } => {
                let name = match object {
                    Object::Workload(w) => format!("workload {}", w.name()),
                    Object::Instance(i) => format!(
                        "instance {} {:?} on {:?}",
                        i.record.id,
                        i.state(),
                        i.record.node
                    ),
                    Object::Node(n) => format!("node {} ready={}", n.record.name, n.ready()),
                };
                format!("{kind:?} {name}")
            }
            Change::Notice { notice, .. } => format!("notice {}", notice.reason),
            Change::Bookmark { revision } => format!("bookmark {revision}"),
        }
    }

    fn status(state: model::InstanceState) -> InstanceStatus {
        InstanceStatus {
            generation: 1,
            state,
            observed_at: Timestamp(7),
            ..InstanceStatus::default()
        }
    }

    #[tokio::test]
    async fn instance_record_and_status_merge_into_one_object() {
        let s = store().await;
        let st = &*s.store;
        applied(st, service("web", 1), Timestamp(1)).await;
        let mut stream = watch(s.store.clone(), query(0, WatchFilter::default()))
            .await
            .unwrap();

        let record = instance("web", "a", Some("n1"));
        put(st, &keys::instance("web", "web-a"), &record).await;
        let created = next(&mut stream).await;
        assert_eq!(
            show(&created),
            "Created instance web-a Pending on Some(\"n1\")"
        );

        put(
            st,
            &keys::status("web", "web-a"),
            &status(model::InstanceState::Ready),
        )
        .await;
        let ready = next(&mut stream).await;
        assert_eq!(show(&ready), "Updated instance web-a Ready on Some(\"n1\")");
        assert!(ready.revision() > created.revision());
        let Change::Object { object, time, .. } = &ready else {
            unreachable!()
        };
        assert_eq!(*time, Some(Timestamp(7)));
        let Object::Instance(view) = object else {
            unreachable!()
        };
        assert_eq!(view.labels["app"], "web");

        // Record and status removed in one transaction: one change.
        st.txn(
            Vec::new(),
            vec![
                Op::delete(keys::instance("web", "web-a")),
                Op::delete(keys::status("web", "web-a")),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
        let deleted = next(&mut stream).await;
        assert_eq!(
            show(&deleted),
            "Deleted instance web-a Ready on Some(\"n1\")"
        );

        // A status without a record is no object.
        put(
            st,
            &keys::status("web", "web-b"),
            &status(model::InstanceState::Running),
        )
        .await;
        put(st, &keys::node("n1"), &node("n1")).await;
        assert_eq!(
            show(&next(&mut stream).await),
            "Created node n1 ready=false"
        );
    }

    #[tokio::test]
    async fn resuming_from_a_revision_replays_history_with_the_state_before_it() {
        let s = store().await;
        let st = &*s.store;
        put(st, &keys::node("n1"), &node("n1")).await;
        let live_rev = st
            .put(
                keys::live("n1").as_bytes(),
                &model::encode(&Liveness {
                    scheduler: "s".into(),
                    since: Timestamp(1),
                }),
            )
            .await
            .unwrap();
        st.delete(keys::live("n1").as_bytes()).await.unwrap();
        let mut stream = watch(s.store.clone(), query(live_rev, WatchFilter::default()))
            .await
            .unwrap();
        let ready = next(&mut stream).await;
        assert_eq!(show(&ready), "Updated node n1 ready=true");
        assert_eq!(ready.revision(), live_rev);
        let lost = next(&mut stream).await;
        assert_eq!(show(&lost), "Updated node n1 ready=false");
        assert_eq!(lost.revision(), live_rev + 1);

        // From a compacted revision: the error says where history starts.
        st.compact(live_rev).await.unwrap();
        let err = watch(s.store.clone(), query(live_rev - 1, WatchFilter::default()))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Store(StoreError::Compacted { requested, compacted })
                    if requested == live_rev - 1 && compacted == live_rev
            ),
            "{err:?}"
        );
        // Exactly at the compaction revision still works.
        let mut stream = watch(s.store.clone(), query(live_rev, WatchFilter::default()))
            .await
            .unwrap();
        assert_eq!(show(&next(&mut stream).await), "Updated node n1 ready=true");
    }

    #[tokio::test]
    async fn filters_select_workload_node_and_kind() {
        let s = store().await;
        let st = &*s.store;
        let filter = WatchFilter {
            node: Some("n2".into()),
            ..WatchFilter::default()
        };
        let mut on_n2 = watch(s.store.clone(), query(0, filter)).await.unwrap();
        let filter = WatchFilter {
            kinds: vec![ObjectKind::Workload],
            workload: Some("api".into()),
            notices: true,
            ..WatchFilter::default()
        };
        let mut api = watch(s.store.clone(), query(0, filter)).await.unwrap();

        applied(st, service("web", 1), Timestamp(1)).await;
        put_instance(st, "web", "a", Some("n1")).await;
        put_instance(st, "web", "b", None).await;
        // Moved onto n2: the n2 watcher sees it.
        put_instance(st, "web", "b", Some("n2")).await;
        applied(st, service("api", 1), Timestamp(1)).await;
        put(
            st,
            &keys::notice(1, "n1"),
            &NoticeRecord {
                kind: "workload".into(),
                name: "api".into(),
                workload: "api".into(),
                warning: false,
                reason: "Scaled".into(),
                message: "scaled".into(),
                source: "test".into(),
                time: Timestamp(1),
            },
        )
        .await;
        put(st, &keys::node("n2"), &node("n2")).await;

        assert_eq!(
            show(&next(&mut on_n2).await),
            "Updated instance web-b Pending on Some(\"n2\")"
        );
        assert_eq!(show(&next(&mut on_n2).await), "Created node n2 ready=false");
        assert_eq!(show(&next(&mut api).await), "Created workload api");
        assert_eq!(show(&next(&mut api).await), "notice Scaled");
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_streams_get_bookmarks_and_deadlines_end_them() {
        let s = store().await;
        let filter = WatchFilter {
            workload: Some("nothing".into()),
            ..WatchFilter::default()
        };
        let mut q = query(0, filter);
        q.bookmark_interval = Duration::from_secs(10);
        q.timeout = Some(Duration::from_secs(25));
        let mut stream = watch(s.store.clone(), q).await.unwrap();
        let rev = applied(&*s.store, service("web", 1), Timestamp(1))
            .await
            .workload
            .revision;
        let bookmark = next(&mut stream).await;
        assert_eq!(bookmark, Change::Bookmark { revision: rev });
        assert_eq!(next(&mut stream).await, Change::Bookmark { revision: rev });
        let end = stream.next().await.expect("an error item");
        assert!(matches!(end, Err(Error::DeadlineExceeded(_))), "{end:?}");
        assert!(stream.next().await.is_none());
    }
}
