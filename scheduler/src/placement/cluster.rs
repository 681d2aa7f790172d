//! The scheduler's working view of a snapshot: per-node used resources and held ports, and an
//! index of where each workload runs, kept up to date as plans place and evict instances.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, DefaultHasher};

use super::{HostPort, Node, Placed, Request, Resources, Snapshot};

/// A hash map with a fixed (unseeded) hasher: the core has no randomness, not even in the
/// layout of its maps. No result depends on iteration order; this keeps it that way if one ever
/// did.
pub(crate) type FixedHashMap<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;

/// A node's position in name order; ties between nodes are broken by it.
pub(crate) type Rank = u32;

/// The snapshot as placement works on it. Build it once per snapshot; [`Cluster::place`] plans
/// a request and applies the plan to this view, so further requests see it, as if each plan
/// were committed before the next is made. Commit such a batch of plans together: a later plan
/// may evict an instance that an earlier one placed, if its priority is higher.
#[derive(Debug, Clone)]
pub struct Cluster<'a> {
    /// Nodes sorted by name; a node's index is its [`Rank`].
    pub(crate) nodes: Vec<NodeState<'a>>,
    /// Workload name → node → number of its instances there.
    pub(crate) by_workload: FixedHashMap<Cow<'a, str>, BTreeMap<Rank, u32>>,
}

/// One node and what it runs now.
#[derive(Debug, Clone)]
pub(crate) struct NodeState<'a> {
    /// The node as in the snapshot (labels, capacity, state).
    pub(crate) node: &'a Node,
    /// Sum of the residents' resources.
    pub(crate) used: Resources,
    pub(crate) residents: Vec<Resident<'a>>,
    /// Every host port held by a resident (a port held twice appears twice).
    pub(crate) ports: Vec<HostPort>,
}

/// An instance on a node: from the snapshot (borrowed) or placed by a plan (owned).
#[derive(Debug, Clone)]
pub(crate) struct Resident<'a> {
    pub(crate) id: Cow<'a, str>,
    pub(crate) workload: Cow<'a, str>,
    pub(crate) priority: i32,
    pub(crate) resources: Resources,
    pub(crate) host_ports: Cow<'a, [HostPort]>,
}

impl<'a> Resident<'a> {
    fn borrowed(placed: &'a Placed) -> Self {
        Resident {
            id: Cow::Borrowed(&placed.id),
            workload: Cow::Borrowed(&placed.workload),
            priority: placed.priority,
            resources: placed.resources,
            host_ports: Cow::Borrowed(&placed.host_ports),
        }
    }

    /// Instance `id` of `request`.
    pub(crate) fn of_request(request: &Request, id: &str) -> Self {
        Resident {
            id: Cow::Owned(id.to_string()),
            workload: Cow::Owned(request.workload.clone()),
            priority: request.priority,
            resources: request.resources,
            host_ports: Cow::Owned(request.host_ports.clone()),
        }
    }
}

impl<'a> NodeState<'a> {
    /// The node's name.
    pub(crate) fn name(&self) -> &'a str {
        &self.node.name
    }

    /// What is left of the capacity (zero, not negative, on an overcommitted node).
    pub(crate) fn free(&self) -> Resources {
        self.node.capacity.saturating_sub(self.used)
    }
}

impl<'a> Cluster<'a> {
    /// The view of `snapshot`: O(nodes · log nodes + instances).
    pub fn new(snapshot: &'a Snapshot) -> Self {
        let mut sorted: Vec<&'a Node> = snapshot.nodes.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(sorted.len()),
            by_workload: FixedHashMap::default(),
        };
        for (rank, node) in (0..).zip(sorted) {
            cluster.nodes.push(NodeState {
                node,
                used: Resources::ZERO,
                residents: Vec::with_capacity(node.instances.len()),
                ports: Vec::new(),
            });
            for placed in &node.instances {
                cluster.add(rank, Resident::borrowed(placed));
            }
        }
        cluster
    }

    /// Puts `resident` on node `rank`.
    pub(crate) fn add(&mut self, rank: Rank, resident: Resident<'a>) {
        let Some(node) = self.nodes.get_mut(rank as usize) else {
            return;
        };
        node.used = node.used.saturating_add(resident.resources);
        node.ports.extend_from_slice(&resident.host_ports);
        match self.by_workload.get_mut(resident.workload.as_ref()) {
            Some(counts) => *counts.entry(rank).or_default() += 1,
            None => {
                self.by_workload
                    .insert(resident.workload.clone(), BTreeMap::from([(rank, 1)]));
            }
        }
        node.residents.push(resident);
    }

    /// Takes resident `index` off node `rank`; `None` if there is no such resident.
    pub(crate) fn remove(&mut self, rank: Rank, index: usize) -> Option<Resident<'a>> {
        let node = self.nodes.get_mut(rank as usize)?;
        if index >= node.residents.len() {
            return None;
        }
        let resident = node.residents.remove(index);
        node.used = node.used.saturating_sub(resident.resources);
        for port in resident.host_ports.iter() {
            if let Some(at) = node.ports.iter().position(|p| p == port) {
                node.ports.swap_remove(at);
            }
        }
        if let Some(counts) = self.by_workload.get_mut(resident.workload.as_ref())
            && let Some(count) = counts.get_mut(&rank)
        {
            *count -= 1;
            if *count == 0 {
                counts.remove(&rank);
            }
        }
        Some(resident)
    }

    /// How many instances of `workload` node `rank` runs.
    pub(crate) fn count(&self, workload: &str, rank: Rank) -> u32 {
        self.by_workload
            .get(workload)
            .and_then(|counts| counts.get(&rank))
            .copied()
            .unwrap_or(0)
    }
}
