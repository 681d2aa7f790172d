//! Why a node cannot take an instance, in words an operator reads in `gantry describe`, with
//! quantities written the way users write them (`512Mi`, `500m`).

use std::fmt;

use super::{HostPort, Requirement};

/// A resource that placement accounts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    /// CPU, in millicores.
    Cpu,
    /// Memory, in bytes.
    Memory,
    /// Processes and threads.
    Pids,
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Pids => "pids",
        })
    }
}

/// The first filter a node failed for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The node is not ready.
    NotReady,
    /// The node is cordoned.
    Cordoned,
    /// The node's labels fail this requirement of the request's node selector.
    NodeSelector {
        /// The first requirement the node fails.
        requirement: Requirement,
    },
    /// The node's labels fail this requirement of one of the request's constraints.
    Constraint {
        /// The first requirement the node fails.
        requirement: Requirement,
    },
    /// The request has anti-affinity and the node already runs an instance of the workload.
    AntiAffinity {
        /// That instance (the smallest id if there are several).
        instance: String,
    },
    /// Another instance holds a host port the request needs.
    HostPortInUse {
        /// The port.
        port: HostPort,
    },
    /// Not enough of a resource is left.
    Insufficient {
        /// Which resource.
        resource: Resource,
        /// What one instance needs.
        requested: u64,
        /// What the node has left.
        free: u64,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NotReady => f.write_str("node not ready"),
            Reason::Cordoned => f.write_str("node cordoned"),
            Reason::NodeSelector { requirement } => {
                write!(f, "node selector {requirement} not matched")
            }
            Reason::Constraint { requirement } => write!(f, "constraint {requirement} not matched"),
            Reason::AntiAffinity { instance } => {
                write!(f, "anti-affinity: already runs {instance}")
            }
            Reason::HostPortInUse { port } => write!(f, "host port {port} in use"),
            Reason::Insufficient {
                resource,
                requested,
                free,
            } => {
                // The request is rounded up and the free amount down, so the two never read
                // the same when they differ.
                let requested = quantity(*resource, *requested, Round::Up);
                let free = quantity(*resource, *free, Round::Down);
                write!(
                    f,
                    "insufficient {resource}: requested {requested}, free {free}"
                )
            }
        }
    }
}

/// Which way an amount that has no exact short form is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    Up,
    Down,
}

/// `amount` of `resource` as users write it: cores or millicores, binary byte suffixes, counts.
fn quantity(resource: Resource, amount: u64, round: Round) -> String {
    match resource {
        Resource::Cpu if amount.is_multiple_of(1000) => (amount / 1000).to_string(),
        Resource::Cpu => format!("{amount}m"),
        Resource::Memory => bytes(amount, round),
        Resource::Pids => amount.to_string(),
    }
}

/// Binary suffixes: `Ki` is 1024¹ … `Ei` is 1024⁶.
const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// A byte amount in the largest binary unit it reaches: exact when a whole number of that unit
/// or of the next smaller one (`1536Mi`), otherwise with one decimal (`953.6Mi`).
fn bytes(amount: u64, round: Round) -> String {
    // The largest unit not above the amount; plain bytes below 1Ki.
    let Some(exp) = (1..=SUFFIXES.len()).rev().find(|&e| amount >> (10 * e) > 0) else {
        return amount.to_string();
    };
    let unit = 1u64 << (10 * exp);
    let suffix = SUFFIXES[exp - 1];
    if amount.is_multiple_of(unit) {
        return format!("{}{suffix}", amount / unit);
    }
    let smaller = unit >> 10;
    if exp >= 2 && amount.is_multiple_of(smaller) && amount / smaller < 10 * 1024 {
        return format!("{}{}", amount / smaller, SUFFIXES[exp - 2]);
    }
    let scaled = u128::from(amount) * 10;
    let unit = u128::from(unit);
    let mut tenths = scaled / unit;
    if round == Round::Up && scaled % unit != 0 {
        tenths += 1;
    }
    format!("{}.{}{suffix}", tenths / 10, tenths % 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_table() {
        let cases = [
            (Resource::Cpu, 0, Round::Down, "0"),
            (Resource::Cpu, 500, Round::Down, "500m"),
            (Resource::Cpu, 2000, Round::Down, "2"),
            (Resource::Cpu, 1500, Round::Up, "1500m"),
            (Resource::Pids, 100, Round::Up, "100"),
            (Resource::Memory, 0, Round::Down, "0"),
            (Resource::Memory, 1000, Round::Down, "1000"),
            (Resource::Memory, 1024, Round::Down, "1Ki"),
            (Resource::Memory, 256 << 20, Round::Down, "256Mi"),
            (Resource::Memory, 1536 << 20, Round::Down, "1536Mi"),
            (Resource::Memory, 8 << 30, Round::Down, "8Gi"),
            (Resource::Memory, 7424 << 20, Round::Down, "7424Mi"),
            (Resource::Memory, 1_000_000_000, Round::Down, "953.6Mi"),
            (Resource::Memory, 1_000_000_000, Round::Up, "953.7Mi"),
            (Resource::Memory, (1 << 30) + 1, Round::Down, "1.0Gi"),
            (Resource::Memory, (1 << 30) + 1, Round::Up, "1.1Gi"),
            (Resource::Memory, 1500, Round::Down, "1.4Ki"),
            (Resource::Memory, u64::MAX, Round::Down, "15.9Ei"),
        ];
        for (resource, amount, round, expected) in cases {
            assert_eq!(
                quantity(resource, amount, round),
                expected,
                "{resource} {amount} {round:?}"
            );
        }
    }
}
