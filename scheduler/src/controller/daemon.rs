//! The Daemon controller's decision: one instance on every eligible node (its labels match the
//! Daemon's placement), none elsewhere.
//!
//! Pure. Daemon instances are assigned to their node directly, without the placement core's
//! scoring (like Kubernetes' DaemonSet controller before it delegated to the scheduler): the
//! node is the point. A rolling update replaces a node's instance by stopping the old one first
//! (a node has room for one), at most `maxUnavailable` nodes at a time (at least one). A lost
//! node keeps its instance: there is nowhere else to run it.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{InstanceCounts, InstanceState, Timestamp, WorkloadStatus};

use super::service::{Action, Decision, Observed, set_condition};

/// What the Daemon asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The workload's current generation.
    pub generation: u64,
    /// The nodes that should run it.
    pub eligible: BTreeSet<String>,
    /// Nodes whose instance may be down at once during an update.
    pub max_unavailable: u32,
}

/// Decides what to do for one Daemon; `observed` pairs each instance with its node.
pub fn reconcile(
    desired: &Desired,
    observed: &[(Option<String>, Observed)],
    previous: &WorkloadStatus,
    now: Timestamp,
) -> Decision {
    let mut actions = Vec::new();
    let remove: Vec<String> = observed
        .iter()
        .map(|(_, i)| i)
        .filter(|i| i.stopping && i.gone())
        .map(|i| i.id.clone())
        .collect();
    if !remove.is_empty() {
        actions.push(Action::Remove(remove.clone()));
    }
    let mut per_node: BTreeMap<&str, Vec<&Observed>> = BTreeMap::new();
    let mut stop = Vec::new();
    for (node, i) in observed {
        match node.as_deref() {
            Some(n) if desired.eligible.contains(n) => {
                per_node.entry(n).or_default().push(i);
            }
            _ if !i.stopping => stop.push(i.id.clone()),
            _ => {}
        }
    }

    let mut create = Vec::new();
    let mut outdated = Vec::new();
    let mut unavailable = 0usize;
    for node in &desired.eligible {
        let instances = per_node.remove(node.as_str()).unwrap_or_default();
        let active: Vec<&&Observed> = instances.iter().filter(|i| !i.stopping).collect();
        let stopping = instances
            .iter()
            .any(|i| i.stopping && !remove.contains(&i.id));
        let current: Vec<&&&Observed> = active.iter().filter(|i| i.current).collect();
        if current.iter().all(|i| i.state != InstanceState::Ready) {
            unavailable += 1;
        }
        match (current.first(), active.is_empty(), stopping) {
            // Nothing here and nothing on its way out: start one.
            (None, true, false) => create.push(node.clone()),
            (None, false, _) => outdated.extend(active.iter().map(|i| i.id.clone())),
            // The old one is on its way out; the new one follows once it is gone.
            (None, true, true) => {}
            (Some(keep), _, _) => stop.extend(
                active
                    .iter()
                    .filter(|i| i.id != keep.id)
                    .map(|i| i.id.clone()),
            ),
        }
    }
    // Replace outdated instances a few nodes at a time.
    let budget = (desired.max_unavailable.max(1) as usize)
        .saturating_sub(unavailable.saturating_sub(outdated.len().min(unavailable)));
    stop.extend(outdated.iter().take(budget).cloned());
    if !create.is_empty() {
        actions.push(Action::CreateOn(create));
    }
    if !stop.is_empty() {
        actions.push(Action::Stop(stop));
    }

    let active: Vec<&Observed> = observed
        .iter()
        .map(|(_, i)| i)
        .filter(|i| !i.stopping)
        .collect();
    let ready = active
        .iter()
        .filter(|i| i.current && i.state == InstanceState::Ready)
        .count() as u32;
    let mut status = WorkloadStatus {
        observed_generation: desired.generation,
        last_good_generation: previous.last_good_generation,
        conditions: previous.conditions.clone(),
        counts: InstanceCounts {
            desired: desired.eligible.len() as u32,
            current: active.len() as u32,
            updated: active.iter().filter(|i| i.current).count() as u32,
            ready,
            unplaced: 0,
            succeeded: 0,
            failed: 0,
        },
    };
    if ready as usize == desired.eligible.len() && outdated.is_empty() {
        status.last_good_generation = desired.generation;
    }
    set_condition(
        &mut status.conditions,
        "Available",
        ready as usize == desired.eligible.len(),
        "InstancesReady",
        format!("{ready} of {} nodes ready", desired.eligible.len()),
        now,
    );
    Decision { actions, status }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn inst(id: &str, node: &str) -> (Option<String>, Observed) {
        (Some(node.into()), Observed::ready(id))
    }

    fn old((n, mut i): (Option<String>, Observed)) -> (Option<String>, Observed) {
        i.current = false;
        (n, i)
    }

    fn stopping((n, mut i): (Option<String>, Observed)) -> (Option<String>, Observed) {
        i.stopping = true;
        (n, i)
    }

    fn daemon(nodes: &[&str], max_unavailable: u32) -> Desired {
        Desired {
            generation: 2,
            eligible: nodes.iter().map(|s| s.to_string()).collect(),
            max_unavailable,
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn check(desired: Desired, observed: Vec<(Option<String>, Observed)>, expected: Vec<Action>) {
        let d = reconcile(
            &desired,
            &observed,
            &WorkloadStatus::default(),
            Timestamp(0),
        );
        assert_eq!(d.actions, expected, "observed: {observed:#?}");
    }

    #[test]
    fn daemon_table() {
        check(
            daemon(&["n1", "n2"], 1),
            vec![],
            vec![CreateOn(ids(&["n1", "n2"]))],
        );
        check(
            daemon(&["n1", "n2"], 1),
            vec![inst("a", "n1")],
            vec![CreateOn(ids(&["n2"]))],
        );
        check(
            daemon(&["n1", "n2"], 1),
            vec![inst("a", "n1"), inst("b", "n2")],
            vec![],
        );
        // A node that is no longer eligible loses its instance.
        check(
            daemon(&["n1"], 1),
            vec![inst("a", "n1"), inst("b", "n2")],
            vec![Stop(ids(&["b"]))],
        );
        // Two on one node: the extra one goes.
        check(
            daemon(&["n1"], 1),
            vec![inst("a", "n1"), inst("b", "n1")],
            vec![Stop(ids(&["b"]))],
        );
        // Update: one node at a time, old stopped before the new one starts.
        check(
            daemon(&["n1", "n2"], 1),
            vec![old(inst("a", "n1")), old(inst("b", "n2"))],
            vec![Stop(ids(&["a"]))],
        );
        check(
            daemon(&["n1", "n2"], 1),
            vec![stopping(old(inst("a", "n1"))), old(inst("b", "n2"))],
            vec![],
        );
        check(
            daemon(&["n1", "n2"], 2),
            vec![old(inst("a", "n1")), old(inst("b", "n2"))],
            vec![Stop(ids(&["a", "b"]))],
        );
    }
}
