//! The filters and scores of placement, as plain functions of one node and the request, so the
//! incremental planner and the test oracle cannot disagree about what fits or what is better.

use std::cmp::Ordering;

use super::cluster::{NodeState, Rank};
use super::reason::Resource;
use super::{Config, Reason, Request, Requirement, Strategy, Weights};

/// Why a node fails a filter, without the allocations a [`Reason`] needs; the planner asks this
/// for every node and only turns it into a `Reason` for instances that stay unplaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocker<'r> {
    NotReady,
    Cordoned,
    NodeSelector(&'r Requirement),
    Constraint(&'r Requirement),
    AntiAffinity,
    HostPort(super::HostPort),
    Insufficient {
        resource: Resource,
        requested: u64,
        free: u64,
    },
}

impl Blocker<'_> {
    /// Whether evicting lower-priority instances can clear this blocker. Host ports can: the
    /// preemption search then evicts their holders, if it may.
    pub(crate) fn preemptible(self) -> bool {
        matches!(self, Blocker::HostPort(_) | Blocker::Insufficient { .. })
    }
}

/// The filters that stay the same while one request is placed, cheapest first: ready,
/// cordoned, node selector, constraints.
pub(crate) fn fixed_blocker<'r>(node: &NodeState<'_>, request: &'r Request) -> Option<Blocker<'r>> {
    let n = node.node;
    if !n.ready {
        return Some(Blocker::NotReady);
    }
    if n.cordoned {
        return Some(Blocker::Cordoned);
    }
    if let Some(r) = first_unmatched(request.node_selector.requirements(), n) {
        return Some(Blocker::NodeSelector(r));
    }
    let constraints = request.constraints.iter().flat_map(|s| s.requirements());
    if let Some(r) = first_unmatched(constraints, n) {
        return Some(Blocker::Constraint(r));
    }
    None
}

fn first_unmatched<'r>(
    requirements: impl IntoIterator<Item = &'r Requirement>,
    node: &super::Node,
) -> Option<&'r Requirement> {
    requirements.into_iter().find(|r| !r.matches(&node.labels))
}

/// The filters that placements and evictions change, cheapest first: anti-affinity, host
/// ports, resources (cpu, memory, pids). `same_workload` is how many instances of the request's
/// workload the node runs.
pub(crate) fn changing_blocker(
    node: &NodeState<'_>,
    request: &Request,
    same_workload: u32,
) -> Option<Blocker<'static>> {
    if request.anti_affinity && same_workload > 0 {
        return Some(Blocker::AntiAffinity);
    }
    if !node.ports.is_empty()
        && let Some(port) = request.host_ports.iter().find(|p| node.ports.contains(p))
    {
        return Some(Blocker::HostPort(*port));
    }
    let free = node.free();
    let wanted = request.resources;
    let short = |resource, requested, free| {
        (requested > free).then_some(Blocker::Insufficient {
            resource,
            requested,
            free,
        })
    };
    short(Resource::Cpu, wanted.cpu_millis, free.cpu_millis)
        .or_else(|| short(Resource::Memory, wanted.memory_bytes, free.memory_bytes))
        .or_else(|| short(Resource::Pids, wanted.pids, free.pids))
}

/// The first filter `node` fails, as an operator reads it.
pub(crate) fn reason(
    node: &NodeState<'_>,
    request: &Request,
    same_workload: u32,
) -> Option<Reason> {
    let blocker =
        fixed_blocker(node, request).or_else(|| changing_blocker(node, request, same_workload))?;
    Some(match blocker {
        Blocker::NotReady => Reason::NotReady,
        Blocker::Cordoned => Reason::Cordoned,
        Blocker::NodeSelector(r) => Reason::NodeSelector {
            requirement: r.clone(),
        },
        Blocker::Constraint(r) => Reason::Constraint {
            requirement: r.clone(),
        },
        Blocker::AntiAffinity => Reason::AntiAffinity {
            instance: node
                .residents
                .iter()
                .filter(|r| r.workload == request.workload.as_str())
                .map(|r| r.id.as_ref())
                .min()
                .unwrap_or_default()
                .to_string(),
        },
        Blocker::HostPort(port) => Reason::HostPortInUse { port },
        Blocker::Insufficient {
            resource,
            requested,
            free,
        } => Reason::Insufficient {
            resource,
            requested,
            free,
        },
    })
}

/// The weighted resource score of placing one instance of `request` on `node`. The score in
/// 0..=1 comes from the node's allocation afterwards, the larger of its cpu and memory
/// fractions: Spread scores `1 − allocation`, BinPack `allocation`.
pub(crate) fn resource_term(node: &NodeState<'_>, request: &Request, config: &Config) -> f64 {
    let after = node.used.saturating_add(request.resources);
    let capacity = node.node.capacity;
    let allocation = fraction(after.cpu_millis, capacity.cpu_millis)
        .max(fraction(after.memory_bytes, capacity.memory_bytes));
    let score = match config.strategy {
        Strategy::Spread => 1.0 - allocation,
        Strategy::BinPack => allocation,
    };
    // `+ 0.0` turns a `-0.0` into `0.0`, so that equal scores compare equal.
    config.weights.resources * score + 0.0
}

/// `used / capacity` clamped to 0..=1; a resource the node lacks counts as full once used.
fn fraction(used: u64, capacity: u64) -> f64 {
    if capacity == 0 {
        if used == 0 { 0.0 } else { 1.0 }
    } else {
        (used as f64 / capacity as f64).min(1.0)
    }
}

/// The spread-label score in 0..=1 of a label value holding `count` instances of the workload,
/// when the candidate values hold between `min` and `max`: 1 for the fewest, 0 for the most,
/// 1 for all when they are even.
pub(crate) fn spread_score(count: u64, min: u64, max: u64) -> f64 {
    if max == min {
        1.0
    } else {
        (max - count) as f64 / (max - min) as f64
    }
}

/// A node's total: its weighted resource score plus the weighted spread score of its label
/// value.
pub(crate) fn total(resource_term: f64, spread: f64, weights: &Weights) -> f64 {
    resource_term + weights.spread_label * spread + 0.0
}

/// How two candidates compare, best last: by total, then by resource term, then by name (the
/// lower rank is better). The resource term comes second because adding the spread term can
/// round two different resource terms to one total; preferring the larger one keeps each label
/// value's best node (by resource term alone) its best by this order too, which lets the
/// planner keep one heap per label value.
pub(crate) fn compare(a: (f64, f64, Rank), b: (f64, f64, Rank)) -> Ordering {
    a.0.total_cmp(&b.0)
        .then_with(|| a.1.total_cmp(&b.1))
        .then_with(|| b.2.cmp(&a.2))
}
