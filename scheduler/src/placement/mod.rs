//! The placement core: which node each instance of a request runs on, as a pure function of a
//! cluster snapshot, the request and the configuration (no I/O, no clock, no randomness), so a
//! placement can be replayed from its inputs.
//!
//! The pipeline is Nomad's and kube-scheduler's: for each instance, in order, filter the nodes
//! (cheapest first: ready, cordoned, node selector, constraints, anti-affinity, host ports,
//! resources), score those that pass (resources by strategy, plus the spread label), normalised
//! to 0..=1 and weighted, and take the best, ties to the node whose name sorts first. Each
//! placement updates the working view, so later instances see earlier ones. An instance that
//! fits nowhere may evict lower-priority instances on one node (see `preempt`). "Fits nowhere" is
//! data: the plan lists, per node, the first filter it failed.
//!
//! Map: `model` (inputs and the plan), `reason` (why a node was refused, as text), `cluster`
//! (the working view), `filter` (filters and scores of one node), `preempt` (victims on one
//! node), `plan` (the incremental loop). Tests sit in `tests`, with a naive oracle that the
//! incremental loop must agree with.

mod cluster;
mod filter;
mod model;
mod plan;
mod preempt;
mod reason;
#[cfg(test)]
mod tests;

use gantry::selector::{Requirement, Selector};

pub use cluster::Cluster;
pub use model::{
    Assignment, Config, Eviction, HostPort, Node, Placed, Plan, Protocol, Rejection, Request,
    Resources, Snapshot, Strategy, Unplaced, Weights,
};
pub use reason::{Reason, Resource};

/// Places `request` on `snapshot`: a shorthand for [`Cluster::new`] then [`Cluster::place`].
/// For several requests against one snapshot, build the [`Cluster`] once.
pub fn schedule(snapshot: &Snapshot, request: &Request, config: &Config) -> Plan {
    Cluster::new(snapshot).place(request, config)
}
