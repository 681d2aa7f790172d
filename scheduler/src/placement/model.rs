//! The placement core's values: the cluster snapshot and the request it reads, the configuration
//! that tunes it, and the plan it returns.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::{Reason, Selector};

/// The cluster at one store revision: every node, with the instances already assigned to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The nodes; their names are unique. Their order does not matter: the plan is the same for
    /// any order.
    pub nodes: Vec<Node>,
}

/// One machine as the scheduler sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// The node's unique name; it also breaks ties between equally good nodes.
    pub name: String,
    /// Labels that selectors, constraints and the spread label read.
    pub labels: BTreeMap<String, String>,
    /// Whether the node's agent is connected and healthy; a node that is not ready gets nothing.
    pub ready: bool,
    /// Whether an operator cordoned the node; a cordoned node gets nothing new.
    pub cordoned: bool,
    /// What the node offers to instances in total.
    pub capacity: Resources,
    /// The instances already assigned to the node.
    pub instances: Vec<Placed>,
}

/// An instance already assigned to a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placed {
    /// The instance's unique id (`web-2`).
    pub id: String,
    /// The workload it belongs to.
    pub workload: String,
    /// Its workload's priority: an instance of higher priority may evict it.
    pub priority: i32,
    /// What it reserves on the node.
    pub resources: Resources,
    /// The host ports it holds on the node.
    pub host_ports: Vec<HostPort>,
}

/// Amounts of the resources that placement accounts for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// CPU in millicores (1000 is one core).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Number of processes and threads.
    pub pids: u64,
}

impl Resources {
    /// Nothing at all.
    pub const ZERO: Resources = Resources {
        cpu_millis: 0,
        memory_bytes: 0,
        pids: 0,
    };

    /// The sum, per resource, clamped at `u64::MAX`.
    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            pids: self.pids.saturating_add(other.pids),
        }
    }

    /// The difference, per resource, clamped at zero.
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            pids: self.pids.saturating_sub(other.pids),
        }
    }

    /// Whether every resource of `self` is at most the same resource of `other`.
    pub fn fits_in(self, other: Resources) -> bool {
        self.cpu_millis <= other.cpu_millis
            && self.memory_bytes <= other.memory_bytes
            && self.pids <= other.pids
    }
}

/// The transport protocol of a host port: the workload model's own.
pub use gantry::workload::Protocol;

/// A port on the node's own address that an instance publishes; one holder per node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPort {
    /// The port number.
    pub port: u16,
    /// The protocol; `8080/tcp` and `8080/udp` do not conflict.
    pub protocol: Protocol,
}

impl HostPort {
    /// TCP port `port`.
    pub const fn tcp(port: u16) -> Self {
        HostPort {
            port,
            protocol: Protocol::Tcp,
        }
    }

    /// UDP port `port`.
    pub const fn udp(port: u16) -> Self {
        HostPort {
            port,
            protocol: Protocol::Udp,
        }
    }
}

impl fmt::Display for HostPort {
    /// `8080/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// Instances of one workload to place, all alike.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The workload the instances belong to; anti-affinity and the spread label count its
    /// instances.
    pub workload: String,
    /// The ids of the instances to place, placed in this order. They must not already be in the
    /// snapshot.
    pub instances: Vec<String>,
    /// What each instance reserves.
    pub resources: Resources,
    /// The host ports each instance holds.
    pub host_ports: Vec<HostPort>,
    /// Labels a node must have (the empty selector matches every node).
    pub node_selector: Selector,
    /// Further selectors a node must match, all of them.
    pub constraints: Vec<Selector>,
    /// A node label (`zone`) whose values should hold equal numbers of the workload's
    /// instances. Nodes without the label form one group of their own.
    pub spread_label: Option<String>,
    /// At most one instance of this workload per node.
    pub anti_affinity: bool,
    /// The workload's priority; with preemption, only instances of strictly lower priority are
    /// evicted for it.
    pub priority: i32,
}

/// How the resource score ranks nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Prefer the least allocated node, so load and failures spread out.
    #[default]
    Spread,
    /// Prefer the most allocated node that fits, so whole nodes stay free.
    BinPack,
}

/// How much each score counts in a node's total. Scores are in 0..=1 before weighting; weights
/// should be finite and not negative.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weights {
    /// Weight of the resource score (see [`Strategy`]).
    pub resources: f64,
    /// Weight of the spread-label score, which is 1 for the label values holding the fewest
    /// instances of the workload and 0 for those holding the most (among the values with a node
    /// that fits), linear in between. At the default of twice the
    /// resource weight, evening out the label values wins over any resource difference.
    pub spread_label: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            resources: 1.0,
            spread_label: 2.0,
        }
    }
}

/// The scheduler's placement settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    /// Spread (the default) or bin-pack.
    pub strategy: Strategy,
    /// Whether an instance that fits nowhere may evict instances of lower priority (on by
    /// default).
    pub preemption: bool,
    /// Score weights.
    pub weights: Weights,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            strategy: Strategy::Spread,
            preemption: true,
            weights: Weights::default(),
        }
    }
}

/// What placing one request decided: nothing is applied until the plan is committed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Instances placed, in request order.
    pub assignments: Vec<Assignment>,
    /// Instances that fit nowhere, in request order, each with every node's reason.
    pub unplaced: Vec<Unplaced>,
    /// Instances to stop to make room, in the order they were chosen.
    pub evictions: Vec<Eviction>,
}

/// One instance placed on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The instance id.
    pub instance: String,
    /// The node's name.
    pub node: String,
}

/// An instance that no node could take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unplaced {
    /// The instance id.
    pub instance: String,
    /// One rejection per node, in node-name order. Instances of one request that stay unplaced
    /// share the same list (nothing changes between them), hence the `Arc`: a large request on a
    /// full cluster costs one list, not one per instance.
    pub reasons: Arc<[Rejection]>,
}

/// Why one node was not chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The node's name.
    pub node: String,
    /// The first filter it failed.
    pub reason: Reason,
}

impl fmt::Display for Rejection {
    /// `n1: insufficient memory: requested 512Mi, free 256Mi`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.node, self.reason)
    }
}

/// An instance to stop so that a higher-priority one fits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// The evicted instance's id.
    pub instance: String,
    /// The node it runs on.
    pub node: String,
    /// Its workload.
    pub workload: String,
    /// Its priority, always lower than the request's.
    pub priority: i32,
    /// The instance of the request that takes its place.
    pub for_instance: String,
}
