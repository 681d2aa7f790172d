//! Choosing, on one node, the instances to evict so that an instance of higher priority fits.
//!
//! Holders of a host port the request needs must all go. Beyond them, finding the fewest
//! instances that free enough cpu, memory and pids is a multi-dimensional covering problem
//! (NP-hard), so the choice is greedy: repeatedly take the lower-priority instance that covers
//! the largest share of what is still missing (lowest priority, then smallest id, on a tie),
//! then spare every victim that turns out not to be needed (highest priority first). The result
//! is exact when one victim suffices, and never evicts an instance it could spare.

use super::cluster::{NodeState, Resident};
use super::{Request, Resources};

/// The instances to evict on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Victims {
    /// Indexes into the node's residents, ascending.
    pub(crate) indexes: Vec<usize>,
    /// Sum of their priorities: among nodes with as many victims, the lowest sum is preferred.
    pub(crate) priority_sum: i64,
}

/// The victims that make room for one instance of `request` on `node`, or `None` if evicting
/// instances of lower priority cannot make room. Filters other than host ports and resources
/// are the caller's to check first.
pub(crate) fn victims(node: &NodeState<'_>, request: &Request) -> Option<Victims> {
    let residents = &node.residents;
    let mut chosen = Vec::new();
    for (i, r) in residents.iter().enumerate() {
        if r.host_ports.iter().any(|p| request.host_ports.contains(p)) {
            if r.priority >= request.priority {
                return None;
            }
            chosen.push(i);
        }
    }
    // What must be released, per resource, for the request to fit.
    let needed = node
        .used
        .saturating_add(request.resources)
        .saturating_sub(node.node.capacity);
    let mut released = sum(residents, &chosen);
    if !needed.fits_in(released) {
        let mut candidates: Vec<usize> = (0..residents.len())
            .filter(|&i| residents[i].priority < request.priority && !chosen.contains(&i))
            .collect();
        if !needed.fits_in(released.saturating_add(sum(residents, &candidates))) {
            return None;
        }
        let mandatory = chosen.len();
        while !needed.fits_in(released) {
            let missing = needed.saturating_sub(released);
            let (at, best) = candidates
                .iter()
                .enumerate()
                .map(|(at, &i)| (at, i, coverage(residents[i].resources, missing)))
                .max_by(|(_, a, ca), (_, b, cb)| {
                    let (a, b) = (&residents[*a], &residents[*b]);
                    ca.total_cmp(cb)
                        .then_with(|| b.priority.cmp(&a.priority))
                        .then_with(|| b.id.cmp(&a.id))
                })
                .map(|(at, i, _)| (at, i))?;
            candidates.swap_remove(at);
            released = released.saturating_add(residents[best].resources);
            chosen.push(best);
        }
        // Spare what is not needed, keeping the highest priorities first.
        let mut extra = chosen.split_off(mandatory);
        extra.sort_by(|&a, &b| {
            let (a, b) = (&residents[a], &residents[b]);
            b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id))
        });
        for i in extra {
            let without = released.saturating_sub(residents[i].resources);
            if needed.fits_in(without) {
                released = without;
            } else {
                chosen.push(i);
            }
        }
    }
    chosen.sort_unstable();
    let priority_sum = chosen
        .iter()
        .map(|&i| i64::from(residents[i].priority))
        .sum();
    Some(Victims {
        indexes: chosen,
        priority_sum,
    })
}

fn sum(residents: &[Resident<'_>], indexes: &[usize]) -> Resources {
    indexes.iter().fold(Resources::ZERO, |acc, &i| {
        acc.saturating_add(residents[i].resources)
    })
}

/// How much of `missing` evicting an instance of size `size` covers: the sum over the missing
/// resources of the covered fraction, so one that covers everything scores highest.
fn coverage(size: Resources, missing: Resources) -> f64 {
    [
        (size.cpu_millis, missing.cpu_millis),
        (size.memory_bytes, missing.memory_bytes),
        (size.pids, missing.pids),
    ]
    .into_iter()
    .filter(|&(_, m)| m > 0)
    .map(|(s, m)| s.min(m) as f64 / m as f64)
    .sum()
}
