//! Node use cases: list, get, cordon, uncordon and drain.
//!
//! Nodes are created by agent registration (the session), never here. A node is ready while
//! its `live/{name}` key exists; what it has allocated is the sum of the resource limits of
//! the instances assigned to it that are not stopping, each at the generation it runs.

use std::collections::{BTreeMap, HashMap};

use gantry::workload::{Kind, Workload};

use super::{
    Cursor, Error, MAX_ATTEMPTS, ObjectKind, Page, PageRequest, Result, decode, get_now,
    key_suffix, paginate, parse_selector, range, workloads_at,
};
use crate::model::{
    self, InstanceRecord, Liveness, NodeRecord, RevisionRecord, WorkloadRecord, keys,
};
use crate::placement::Resources;
use crate::store::{Compare, KeyValue, Op, Revision, Store};

/// A node as the API shows it: its record, its liveness and what is placed on it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// The record (registration, cordon, drain, subnet).
    pub record: NodeRecord,
    /// The node's session, while it has one (the node is ready).
    pub liveness: Option<Liveness>,
    /// Sum of the resource limits of the non-stopping instances assigned to it.
    pub allocated: Resources,
    /// Instances assigned to it, stopping ones included.
    pub instance_count: u32,
    /// `mod_revision` of the node record.
    pub revision: Revision,
}

impl NodeView {
    /// Whether the node has a live session.
    pub fn ready(&self) -> bool {
        self.liveness.is_some()
    }
}

/// What [`drain`] did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq)]
pub struct DrainOutcome {
    /// The node after the drain was recorded (in a dry run: as it is).
    pub node: NodeView,
    /// Ids of the Service and Job instances that move off (stopping ones excluded).
    pub to_move: Vec<String>,
    /// Ids of the Daemon instances that stay.
    pub staying: Vec<String>,
}

/// The resources a workload's instances reserve: their limits, an unlimited one as zero.
pub fn spec_resources(spec: &Workload) -> Resources {
    Resources {
        cpu_millis: spec.resources.cpu.map_or(0, |c| c.millis()),
        memory_bytes: spec.resources.memory.map_or(0, |b| b.get()),
        pids: spec.resources.pids.map_or(0, u64::from),
    }
}

/// What is placed on node `node`: the sum of the resources of its non-stopping instances and
/// the number of instances assigned to it. `resources_of` gives an instance's reservation.
pub fn usage<'a>(
    node: &str,
    instances: impl IntoIterator<Item = &'a InstanceRecord>,
    resources_of: impl Fn(&InstanceRecord) -> Resources,
) -> (Resources, u32) {
    let mut allocated = Resources::ZERO;
    let mut count = 0u32;
    for instance in instances {
        if instance.node.as_deref() != Some(node) {
            continue;
        }
        count = count.saturating_add(1);
        if !instance.stopping() {
            allocated = allocated.saturating_add(resources_of(instance));
        }
    }
    (allocated, count)
}

/// Everything a node view needs, read at one revision.
struct Cluster {
    at: Revision,
    nodes: Vec<(NodeRecord, Revision)>,
    live: HashMap<String, Liveness>,
    instances: Vec<InstanceRecord>,
    workloads: HashMap<String, WorkloadRecord>,
    revisions: HashMap<(String, u64), RevisionRecord>,
}

impl Cluster {
    /// Reads the nodes under `node_prefix` (one node's exact key, or all nodes) and what is
    /// placed on them, at `at` (now when `None`).
    async fn read(store: &dyn Store, node_key: Option<&str>, at: Option<Revision>) -> Result<Self> {
        let (node_kvs, at) = range(store, node_key.unwrap_or(keys::NODES), at).await?;
        let node_kvs: Vec<KeyValue> = match node_key {
            Some(key) => node_kvs
                .into_iter()
                .filter(|kv| kv.key == key.as_bytes())
                .collect(),
            None => node_kvs,
        };
        let nodes = node_kvs
            .iter()
            .map(|kv| Ok((decode::<NodeRecord>(kv)?, kv.mod_revision)))
            .collect::<Result<Vec<_>>>()?;
        let (live_kvs, _) = range(store, keys::LIVE, Some(at)).await?;
        let live = live_kvs
            .iter()
            .filter_map(|kv| {
                let name = key_suffix(kv, keys::LIVE)?.to_string();
                Some(decode::<Liveness>(kv).map(|l| (name, l)))
            })
            .collect::<Result<_>>()?;
        let (instance_kvs, _) = range(store, keys::INSTANCES, Some(at)).await?;
        let instances = instance_kvs.iter().map(decode).collect::<Result<_>>()?;
        let workloads = workloads_at(store, at, |w| w).await?;
        let (revision_kvs, _) = range(store, keys::REVISIONS, Some(at)).await?;
        let revisions = revision_kvs
            .iter()
            .filter_map(|kv| {
                let workload = key_suffix(kv, keys::REVISIONS)?
                    .split_once('/')?
                    .0
                    .to_string();
                Some(decode::<RevisionRecord>(kv).map(|r| ((workload, r.generation), r)))
            })
            .collect::<Result<_>>()?;
        Ok(Cluster {
            at,
            nodes,
            live,
            instances,
            workloads,
            revisions,
        })
    }

    /// An instance's reservation: its generation's spec if kept, else the current spec.
    fn resources_of(&self, instance: &InstanceRecord) -> Resources {
        let spec = self
            .revisions
            .get(&(instance.workload.clone(), instance.generation))
            .map(|r| &r.spec)
            .or_else(|| self.workloads.get(&instance.workload).map(|w| &w.spec));
        spec.map_or(Resources::ZERO, spec_resources)
    }

    fn view(&self, record: NodeRecord, revision: Revision) -> NodeView {
        let (allocated, instance_count) =
            usage(&record.name, &self.instances, |i| self.resources_of(i));
        NodeView {
            liveness: self.live.get(&record.name).cloned(),
            record,
            allocated,
            instance_count,
            revision,
        }
    }

    fn into_views(mut self) -> Vec<NodeView> {
        let nodes = std::mem::take(&mut self.nodes);
        nodes
            .into_iter()
            .map(|(record, revision)| self.view(record, revision))
            .collect()
    }
}

/// One page of the nodes whose labels match `selector` (kubectl syntax; empty: all), ordered
/// by name, read at one revision.
pub async fn list_nodes(
    store: &dyn Store,
    selector: &str,
    page: &PageRequest,
) -> Result<Page<NodeView>> {
    let selector = parse_selector(selector)?;
    let cursor: Cursor = page.cursor()?;
    let cluster = Cluster::read(store, None, cursor.revision).await?;
    let at = cluster.at;
    let mut views: Vec<NodeView> = cluster
        .into_views()
        .into_iter()
        .filter(|n| selector.matches(&n.record.labels))
        .collect();
    views.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    Ok(paginate(
        views,
        |n| n.record.name.clone(),
        &cursor,
        page,
        at,
    ))
}

/// Node `name`.
pub async fn get_node(store: &dyn Store, name: &str) -> Result<NodeView> {
    let key = keys::node(name);
    Cluster::read(store, Some(&key), None)
        .await?
        .into_views()
        .pop()
        .ok_or_else(|| Error::not_found(ObjectKind::Node, name))
}

/// Applies `change` to node `name`'s record and writes it if it changed, guarded by the
/// record's `mod_revision`; returns the node afterwards.
async fn update_node(
    store: &dyn Store,
    name: &str,
    change: impl Fn(&mut NodeRecord),
) -> Result<NodeView> {
    let key = keys::node(name);
    for _ in 0..MAX_ATTEMPTS {
        let (kv, at) = get_now(store, &key).await?;
        let Some(kv) = kv else {
            return Err(Error::not_found(ObjectKind::Node, name));
        };
        let record: NodeRecord = decode(&kv)?;
        let mut updated = record.clone();
        change(&mut updated);
        if updated == record {
            return get_node_at(store, name, at).await;
        }
        let result = store
            .txn(
                vec![Compare::mod_revision(key.as_bytes(), kv.mod_revision)],
                vec![Op::put(key.as_bytes(), model::encode(&updated))],
                Vec::new(),
            )
            .await?;
        if result.succeeded {
            return get_node_at(store, name, result.revision).await;
        }
    }
    Err(Error::Conflict {
        kind: ObjectKind::Node,
        name: name.to_string(),
        attempts: MAX_ATTEMPTS,
    })
}

async fn get_node_at(store: &dyn Store, name: &str, at: Revision) -> Result<NodeView> {
    let key = keys::node(name);
    Cluster::read(store, Some(&key), Some(at))
        .await?
        .into_views()
        .pop()
        .ok_or_else(|| Error::not_found(ObjectKind::Node, name))
}

/// Marks node `name` unschedulable; instances on it keep running. Idempotent.
pub async fn cordon(store: &dyn Store, name: &str) -> Result<NodeView> {
    update_node(store, name, |n| n.cordoned = true).await
}

/// Makes node `name` schedulable again, ending a drain. Idempotent.
pub async fn uncordon(store: &dyn Store, name: &str) -> Result<NodeView> {
    update_node(store, name, |n| {
        n.cordoned = false;
        n.draining = false;
    })
    .await
}

/// Cordons node `name` and marks it draining: the controllers then move its Service and Job
/// instances elsewhere, while Daemon instances stay. With `dry_run` nothing is written and
/// the outcome says which instances would move.
pub async fn drain(store: &dyn Store, name: &str, dry_run: bool) -> Result<DrainOutcome> {
    let node = if dry_run {
        get_node(store, name).await?
    } else {
        update_node(store, name, |n| {
            n.cordoned = true;
            n.draining = true;
        })
        .await?
    };
    // The instances as of the node view's revision, so that both agree.
    let (instance_kvs, at) = range(store, keys::INSTANCES, None).await?;
    let kinds: BTreeMap<String, Kind> = workloads_at(store, at, |w| w.spec.kind).await?;
    let mut to_move = Vec::new();
    let mut staying = Vec::new();
    for kv in &instance_kvs {
        let instance: InstanceRecord = decode(kv)?;
        if instance.node.as_deref() != Some(name) || instance.stopping() {
            continue;
        }
        match kinds.get(&instance.workload) {
            Some(Kind::Daemon) => staying.push(instance.id),
            _ => to_move.push(instance.id),
        }
    }
    Ok(DrainOutcome {
        node,
        to_move,
        staying,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::Timestamp;
    use crate::ops::testing::{applied, service, spec, store};

    pub(crate) fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.to_string(),
            labels: [("zone".to_string(), format!("z-{name}"))].into(),
            ..NodeRecord::default()
        }
    }

    pub(crate) fn instance(workload: &str, suffix: &str, node: Option<&str>) -> InstanceRecord {
        InstanceRecord {
            id: format!("{workload}-{suffix}"),
            workload: workload.to_string(),
            generation: 1,
            node: node.map(str::to_string),
            created_at: Timestamp(1),
            scheduled_at: node.map(|_| Timestamp(2)),
            placement_failures: Vec::new(),
            stop_requested_at: None,
        }
    }

    pub(crate) async fn put<T: serde::Serialize>(store: &dyn Store, key: &str, value: &T) {
        store
            .put(key.as_bytes(), &model::encode(value))
            .await
            .unwrap();
    }

    /// Puts [`instance`] `{workload}-{suffix}` under its key.
    pub(crate) async fn put_instance(
        store: &dyn Store,
        workload: &str,
        suffix: &str,
        node: Option<&str>,
    ) {
        let record = instance(workload, suffix, node);
        put(store, &keys::instance(workload, &record.id), &record).await;
    }

    #[tokio::test]
    async fn nodes_show_readiness_and_allocation() {
        let s = store().await;
        let st = &*s.store;
        let mut web = service("web", 2);
        web.resources.memory = Some(gantry::quantity::Bytes::new(64 << 20));
        web.resources.cpu = Some(gantry::quantity::Cpu::from_millis(500));
        applied(st, web, Timestamp(1)).await;
        put(st, &keys::node("n1"), &node("n1")).await;
        put(st, &keys::node("n2"), &node("n2")).await;
        put(
            st,
            &keys::live("n1"),
            &Liveness {
                scheduler: "s1".into(),
                since: Timestamp(5),
            },
        )
        .await;
        put_instance(st, "web", "a", Some("n1")).await;
        put_instance(st, "web", "b", Some("n1")).await;
        let mut stopping = instance("web", "c", Some("n1"));
        stopping.stop_requested_at = Some(Timestamp(9));
        put(st, &keys::instance("web", "web-c"), &stopping).await;

        let n1 = get_node(st, "n1").await.unwrap();
        assert!(n1.ready());
        assert_eq!(n1.instance_count, 3);
        assert_eq!(n1.allocated.memory_bytes, 2 * (64 << 20));
        assert_eq!(n1.allocated.cpu_millis, 1000);
        let n2 = get_node(st, "n2").await.unwrap();
        assert!(!n2.ready());
        assert_eq!(n2.instance_count, 0);
        assert!(matches!(
            get_node(st, "n3").await,
            Err(Error::NotFound { .. })
        ));

        let page = list_nodes(st, "zone=z-n2", &PageRequest::default())
            .await
            .unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].record.name, "n2");
    }

    #[tokio::test]
    async fn cordon_and_uncordon_are_idempotent() {
        let s = store().await;
        let st = &*s.store;
        put(st, &keys::node("n1"), &node("n1")).await;
        let cordoned = cordon(st, "n1").await.unwrap();
        assert!(cordoned.record.cordoned);
        let before = st.current_revision().await.unwrap();
        let again = cordon(st, "n1").await.unwrap();
        assert_eq!(again, cordoned);
        assert_eq!(st.current_revision().await.unwrap(), before);
        let open = uncordon(st, "n1").await.unwrap();
        assert!(!open.record.cordoned && !open.record.draining);
        assert!(matches!(
            cordon(st, "nope").await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn drain_moves_all_but_daemons() {
        let s = store().await;
        let st = &*s.store;
        applied(st, service("web", 2), Timestamp(1)).await;
        let daemon = spec("kind: Daemon\nname: logs\nimage: busybox\n");
        applied(st, daemon, Timestamp(1)).await;
        put(st, &keys::node("n1"), &node("n1")).await;
        put_instance(st, "web", "a", Some("n1")).await;
        put_instance(st, "web", "b", Some("n2")).await;
        put_instance(st, "logs", "a", Some("n1")).await;

        let before = st.current_revision().await.unwrap();
        let dry = drain(st, "n1", true).await.unwrap();
        assert_eq!(dry.to_move, ["web-a"]);
        assert_eq!(dry.staying, ["logs-a"]);
        assert!(!dry.node.record.draining);
        assert_eq!(st.current_revision().await.unwrap(), before);

        let done = drain(st, "n1", false).await.unwrap();
        assert!(done.node.record.draining && done.node.record.cordoned);
        assert_eq!(done.to_move, ["web-a"]);
    }
}
