//! The Service controller's decision: from a Service's desired state and its observed
//! instances, what to create, stop and remove, whether to roll back, and the status to show.
//!
//! Pure: values in, values out. A rolling update works like a Kubernetes Deployment's, at
//! instance granularity: instances that run the current template are "updated"; the others
//! (an older template, or a node being drained) are "outdated" and are replaced, never more
//! than `maxSurge` above the wanted count and never more than `maxUnavailable` ready
//! instances below it. The template is the spec without `replicas`, so scaling replaces
//! nothing and a rollback reuses the instances still running the target spec.

use std::time::Duration;

use crate::model::{Condition, InstanceCounts, InstanceState, Timestamp, WorkloadStatus};

/// What the Service should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The workload's current generation.
    pub generation: u64,
    /// Instances wanted.
    pub replicas: u32,
    /// Instances above `replicas` allowed during a rollout.
    pub max_surge: u32,
    /// Ready instances below `replicas` allowed during a rollout.
    pub max_unavailable: u32,
    /// Whether a failing rollout goes back to the last good generation on its own.
    pub auto_rollback: bool,
    /// Time a rollout may take before it counts as failed.
    pub progress_deadline: Duration,
    /// When the current generation was applied (the rollout's start).
    pub updated_at: Timestamp,
}

/// One existing instance of the Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Instance id.
    pub id: String,
    /// Whether it runs the current template (its generation's spec equals the current one,
    /// ignoring `replicas`).
    pub current: bool,
    /// Whether it has a node.
    pub placed: bool,
    /// Whether it has been asked to stop.
    pub stopping: bool,
    /// Whether its node is being drained: it must move.
    pub draining: bool,
    /// Whether its node was lost (no heartbeat for the grace period): it is gone.
    pub lost: bool,
    /// Whether its node has a live session.
    pub node_live: bool,
    /// Reported state (`Pending` before any report).
    pub state: InstanceState,
    /// Exit code of its last exit, if it exited.
    pub exit_code: Option<i32>,
    /// Restarts so far.
    pub restart_count: u32,
    /// When it was created (newest are stopped first on scale-down).
    pub created_at: Timestamp,
}

impl Observed {
    /// Whether the record can go: the instance was lost with its node, or it was asked to
    /// stop and has stopped — its process exited, it never got a node, or its node is not there
    /// to stop it (should the node come back, its assignment set no longer holds the instance
    /// and it stops it).
    pub fn gone(&self) -> bool {
        self.lost
            || (self.stopping && (!self.placed || !self.node_live || self.state.is_terminal()))
    }

    /// A placed, ready instance of the current template on a live node: the starting point of
    /// table tests.
    #[cfg(test)]
    pub fn ready(id: &str) -> Self {
        Observed {
            id: id.into(),
            current: true,
            placed: true,
            stopping: false,
            draining: false,
            lost: false,
            node_live: true,
            state: InstanceState::Ready,
            exit_code: None,
            restart_count: 0,
            created_at: Timestamp(0),
        }
    }
}

/// The ids of the instances whose records can go (see [`Observed::gone`]).
pub fn gone(observed: &[Observed]) -> Vec<String> {
    observed
        .iter()
        .filter(|i| i.gone())
        .map(|i| i.id.clone())
        .collect()
}

/// What the executor should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create and place this many instances of the current generation.
    Create(u32),
    /// Create one instance of the current generation on each of these nodes (Daemon).
    CreateOn(Vec<String>),
    /// Place these existing, unplaced instances (nodes may have changed).
    Place(Vec<String>),
    /// Ask these instances to stop.
    Stop(Vec<String>),
    /// Delete these records: their instances are gone.
    Remove(Vec<String>),
    /// Apply the spec of this generation as a new generation (auto-rollback).
    Rollback {
        /// The generation to go back to.
        to: u64,
        /// Why, for status and events.
        reason: String,
    },
}

/// The decision for one Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Actions, to run in order.
    pub actions: Vec<Action>,
    /// The status to record.
    pub status: WorkloadStatus,
}

/// Decides what to do for one Service.
pub fn reconcile(
    desired: &Desired,
    observed: &[Observed],
    previous: &WorkloadStatus,
    now: Timestamp,
) -> Decision {
    let mut actions = Vec::new();

    let remove = gone(observed);
    let active: Vec<&Observed> = observed.iter().filter(|i| !i.stopping && !i.lost).collect();
    if !remove.is_empty() {
        actions.push(Action::Remove(remove));
    }

    let (updated, outdated): (Vec<&Observed>, Vec<&Observed>) =
        active.iter().partition(|i| i.current && !i.draining);
    let wanted = desired.replicas as usize;
    let ready = |i: &Observed| i.state == InstanceState::Ready;
    let mut stop = Vec::new();
    let mut create = 0usize;

    if outdated.is_empty() {
        // Steady state: scale.
        if updated.len() < wanted {
            create = wanted - updated.len();
        } else if updated.len() > wanted {
            stop.extend(
                scale_down_order(&updated)
                    .into_iter()
                    .take(updated.len() - wanted),
            );
        }
    } else {
        // Rolling: bring up updated instances within the surge, take down outdated ones
        // within the availability budget.
        let total = active.len();
        let max_total = wanted + desired.max_surge as usize;
        create = wanted
            .saturating_sub(updated.len())
            .min(max_total.saturating_sub(total));
        let min_available = wanted.saturating_sub(desired.max_unavailable as usize);
        let updated_unavailable = updated.iter().filter(|i| !ready(i)).count();
        let mut budget = total
            .saturating_sub(min_available)
            .saturating_sub(updated_unavailable);
        // Outdated instances that are not ready cost no availability: they go first.
        let mut candidates = scale_down_order(&outdated);
        candidates.sort_by_key(|id| {
            outdated
                .iter()
                .find(|i| &i.id == id)
                .is_some_and(|i| i.state == InstanceState::Ready)
        });
        for id in candidates {
            if budget == 0 {
                break;
            }
            stop.push(id);
            budget -= 1;
        }
        // More updated instances than wanted (scaled down mid-rollout).
        if updated.len() > wanted {
            stop.extend(
                scale_down_order(&updated)
                    .into_iter()
                    .take(updated.len() - wanted),
            );
        }
    }

    let unplaced: Vec<String> = active
        .iter()
        .filter(|i| !i.placed && !stop.contains(&i.id))
        .map(|i| i.id.clone())
        .collect();
    if !unplaced.is_empty() {
        actions.push(Action::Place(unplaced));
    }
    if create > 0 {
        actions.push(Action::Create(create as u32));
    }
    if !stop.is_empty() {
        actions.push(Action::Stop(stop));
    }

    // Status.
    let updated_ready = updated.iter().filter(|i| ready(i)).count();
    let counts = InstanceCounts {
        desired: desired.replicas,
        current: active.len() as u32,
        updated: updated.len() as u32,
        ready: active.iter().filter(|i| ready(i)).count() as u32,
        unplaced: active.iter().filter(|i| !i.placed).count() as u32,
        succeeded: 0,
        failed: 0,
    };
    let complete = outdated.is_empty() && updated.len() == wanted && updated_ready == wanted;
    let mut status = WorkloadStatus {
        observed_generation: desired.generation,
        last_good_generation: if complete {
            desired.generation
        } else {
            previous.last_good_generation
        },
        conditions: previous.conditions.clone(),
        counts,
    };
    let min_available = wanted.saturating_sub(desired.max_unavailable as usize);
    set_condition(
        &mut status.conditions,
        "Available",
        counts.ready as usize >= min_available,
        if counts.ready as usize >= min_available {
            "MinimumInstancesReady"
        } else {
            "MinimumInstancesUnavailable"
        },
        format!("{} of {} instances ready", counts.ready, wanted),
        now,
    );

    let failing = updated
        .iter()
        .find(|i| i.restart_count > 0 || i.state.is_terminal());
    let overdue = !complete && now.since(desired.updated_at) > desired.progress_deadline;
    let rollback_target = previous.last_good_generation;
    let can_roll_back = rollback_target != 0 && rollback_target != desired.generation;
    if complete {
        set_condition(
            &mut status.conditions,
            "Progressing",
            true,
            "RolloutComplete",
            format!("generation {} is rolled out", desired.generation),
            now,
        );
    } else if let Some(failing) = failing.filter(|_| can_roll_back || !desired.auto_rollback) {
        let why = match failing.state {
            InstanceState::Exited | InstanceState::OomKilled | InstanceState::Failed => {
                format!(
                    "instance {} of generation {} {}",
                    failing.id,
                    desired.generation,
                    state_word(failing.state)
                )
            }
            _ => format!(
                "instance {} of generation {} restarted {} time(s)",
                failing.id, desired.generation, failing.restart_count
            ),
        };
        fail_rollout(
            desired,
            &mut status,
            &mut actions,
            can_roll_back,
            "InstancesFailing",
            why,
            now,
        );
    } else if overdue && (can_roll_back || !desired.auto_rollback) {
        let why = format!(
            "generation {} made no full progress within {}s",
            desired.generation,
            desired.progress_deadline.as_secs()
        );
        fail_rollout(
            desired,
            &mut status,
            &mut actions,
            can_roll_back,
            "ProgressDeadlineExceeded",
            why,
            now,
        );
    } else {
        set_condition(
            &mut status.conditions,
            "Progressing",
            true,
            "Rolling",
            format!(
                "{} of {} instances updated, {} ready",
                updated.len(),
                wanted,
                updated_ready
            ),
            now,
        );
    }
    Decision { actions, status }
}

fn state_word(state: InstanceState) -> &'static str {
    match state {
        InstanceState::OomKilled => "was OOM-killed",
        InstanceState::Failed => "failed to start",
        _ => "exited",
    }
}

fn fail_rollout(
    desired: &Desired,
    status: &mut WorkloadStatus,
    actions: &mut Vec<Action>,
    can_roll_back: bool,
    reason: &str,
    why: String,
    now: Timestamp,
) {
    if desired.auto_rollback && can_roll_back {
        let to = status.last_good_generation;
        set_condition(
            &mut status.conditions,
            "RolledBack",
            true,
            reason,
            format!("{why}; rolling back to generation {to}"),
            now,
        );
        set_condition(
            &mut status.conditions,
            "Progressing",
            false,
            reason,
            why.clone(),
            now,
        );
        actions.push(Action::Rollback {
            to,
            reason: format!("{why}; rolled back to generation {to}"),
        });
    } else {
        set_condition(
            &mut status.conditions,
            "Progressing",
            false,
            reason,
            why,
            now,
        );
    }
}

/// Order in which instances are taken down: unplaced, then not ready, then newest.
fn scale_down_order(instances: &[&Observed]) -> Vec<String> {
    let mut sorted: Vec<&&Observed> = instances.iter().collect();
    sorted.sort_by(|a, b| {
        a.placed
            .cmp(&b.placed)
            .then((a.state == InstanceState::Ready).cmp(&(b.state == InstanceState::Ready)))
            .then(b.created_at.cmp(&a.created_at))
            .then(b.id.cmp(&a.id))
    });
    sorted.into_iter().map(|i| i.id.clone()).collect()
}

/// Sets a condition, keeping its transition time when its status does not change.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    match conditions.iter_mut().find(|c| c.kind == kind) {
        Some(c) => {
            if c.status != status {
                c.last_transition = now;
            }
            c.status = status;
            c.reason = reason.to_owned();
            c.message = message;
        }
        None => conditions.push(Condition {
            kind: kind.to_owned(),
            status,
            reason: reason.to_owned(),
            message,
            last_transition: now,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use InstanceState::*;

    /// Builder of an observed instance: `inst("a")` is current, placed, ready, on a live node.
    fn inst(id: &str) -> Observed {
        Observed {
            created_at: Timestamp(id.bytes().map(i64::from).sum()),
            ..Observed::ready(id)
        }
    }

    trait Tweak {
        fn old(self) -> Self;
        fn state(self, s: InstanceState) -> Self;
        fn stopping(self) -> Self;
        fn unplaced(self) -> Self;
        fn lost(self) -> Self;
        fn draining(self) -> Self;
        fn dead_node(self) -> Self;
        fn restarts(self, n: u32) -> Self;
    }

    impl Tweak for Observed {
        fn old(mut self) -> Self {
            self.current = false;
            self
        }
        fn state(mut self, s: InstanceState) -> Self {
            self.state = s;
            self
        }
        fn stopping(mut self) -> Self {
            self.stopping = true;
            self
        }
        fn unplaced(mut self) -> Self {
            self.placed = false;
            self.state = Pending;
            self
        }
        fn lost(mut self) -> Self {
            self.lost = true;
            self.node_live = false;
            self
        }
        fn draining(mut self) -> Self {
            self.draining = true;
            self
        }
        fn dead_node(mut self) -> Self {
            self.node_live = false;
            self
        }
        fn restarts(mut self, n: u32) -> Self {
            self.restart_count = n;
            self
        }
    }

    fn svc(replicas: u32, surge: u32, unavailable: u32) -> Desired {
        Desired {
            generation: 2,
            replicas,
            max_surge: surge,
            max_unavailable: unavailable,
            auto_rollback: true,
            progress_deadline: Duration::from_secs(600),
            updated_at: Timestamp(0),
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn check(desired: Desired, observed: Vec<Observed>, last_good: u64, expected: Vec<Action>) {
        let previous = WorkloadStatus {
            last_good_generation: last_good,
            ..WorkloadStatus::default()
        };
        let decision = reconcile(&desired, &observed, &previous, Timestamp(1_000));
        assert_eq!(decision.actions, expected, "observed: {observed:#?}");
    }

    #[test]
    fn scaling_table() {
        use Action::*;
        // Cases: (desired, observed, last good generation, expected actions).
        check(svc(3, 1, 0), vec![], 0, vec![Create(3)]);
        check(
            svc(3, 1, 0),
            vec![inst("a"), inst("b"), inst("c")],
            2,
            vec![],
        );
        check(
            svc(1, 1, 0),
            vec![inst("a"), inst("b").state(Running), inst("c").unplaced()],
            2,
            vec![Stop(ids(&["c", "b"]))],
        );
        check(svc(0, 1, 0), vec![inst("a")], 2, vec![Stop(ids(&["a"]))]);
        check(
            svc(2, 1, 0),
            vec![inst("a"), inst("b").unplaced()],
            2,
            vec![Place(ids(&["b"]))],
        );
        // Stopping instances are removed once gone; until then they are not counted.
        check(
            svc(1, 1, 0),
            vec![inst("a").stopping().state(Exited), inst("b")],
            2,
            vec![Remove(ids(&["a"]))],
        );
        check(
            svc(1, 1, 0),
            vec![inst("a").stopping(), inst("b")],
            2,
            vec![],
        );
        check(
            svc(1, 1, 0),
            vec![inst("a").stopping().dead_node(), inst("b")],
            2,
            vec![Remove(ids(&["a"]))],
        );
        check(
            svc(1, 1, 0),
            vec![inst("a").stopping().unplaced(), inst("b")],
            2,
            vec![Remove(ids(&["a"]))],
        );
        // A lost node's instances are gone and replaced at once.
        check(
            svc(2, 1, 0),
            vec![inst("a").lost(), inst("b")],
            2,
            vec![Remove(ids(&["a"])), Create(1)],
        );
        // A node that is only not ready keeps its instances (grace period).
        check(
            svc(2, 1, 0),
            vec![inst("a").dead_node(), inst("b")],
            2,
            vec![],
        );
    }

    #[test]
    fn rolling_update_table() {
        use Action::*;
        // Surge 1, unavailable 0: one new instance first, nothing stopped until it is ready.
        check(
            svc(2, 1, 0),
            vec![inst("a").old(), inst("b").old()],
            1,
            vec![Create(1)],
        );
        check(
            svc(2, 1, 0),
            vec![inst("a").old(), inst("b").old(), inst("c").state(Starting)],
            1,
            vec![],
        );
        check(
            svc(2, 1, 0),
            vec![inst("a").old(), inst("b").old(), inst("c")],
            1,
            vec![Stop(ids(&["b"]))],
        );
        check(
            svc(2, 1, 0),
            vec![inst("a").old(), inst("b").old().stopping(), inst("c")],
            1,
            vec![Create(1)],
        );
        // Surge 0, unavailable 1: stop first, then replace.
        check(
            svc(2, 0, 1),
            vec![inst("a").old(), inst("b").old()],
            1,
            vec![Stop(ids(&["b"]))],
        );
        check(
            svc(2, 0, 1),
            vec![inst("a").old(), inst("b").old().stopping()],
            1,
            vec![Create(1)],
        );
        // Outdated instances that are not ready go first, whatever the budget.
        check(
            svc(2, 1, 0),
            vec![inst("a").old(), inst("b").old().state(Running), inst("c")],
            1,
            vec![Stop(ids(&["b"]))],
        );
        // Draining moves instances like an update does.
        check(svc(1, 1, 0), vec![inst("a").draining()], 2, vec![Create(1)]);
        check(
            svc(1, 1, 0),
            vec![inst("a").draining(), inst("b")],
            2,
            vec![Stop(ids(&["a"]))],
        );
    }

    #[test]
    fn rollout_completion_records_the_last_good_generation() {
        let d = reconcile(
            &svc(2, 1, 0),
            &[inst("a"), inst("b")],
            &WorkloadStatus::default(),
            Timestamp(5),
        );
        assert_eq!(d.status.last_good_generation, 2);
        assert_eq!(d.status.counts.ready, 2);
        let progressing = d
            .status
            .conditions
            .iter()
            .find(|c| c.kind == "Progressing")
            .unwrap();
        assert_eq!(progressing.reason, "RolloutComplete");
        let d = reconcile(
            &svc(2, 1, 0),
            &[inst("a"), inst("b").state(Running)],
            &WorkloadStatus::default(),
            Timestamp(5),
        );
        assert_eq!(d.status.last_good_generation, 0);
    }

    #[test]
    fn failing_rollout_rolls_back_to_the_last_good_generation() {
        let observed = [inst("a").old(), inst("b").state(Running).restarts(1)];
        let previous = WorkloadStatus {
            last_good_generation: 1,
            ..Default::default()
        };
        let d = reconcile(&svc(1, 1, 0), &observed, &previous, Timestamp(5));
        assert!(
            matches!(d.actions.last(), Some(Action::Rollback { to: 1, .. })),
            "{:?}",
            d.actions
        );
        let rolled = d
            .status
            .conditions
            .iter()
            .find(|c| c.kind == "RolledBack")
            .unwrap();
        assert!(rolled.status);
        assert!(
            rolled
                .message
                .contains("instance b of generation 2 restarted 1 time"),
            "{}",
            rolled.message
        );

        // Without auto-rollback the rollout is only marked failed.
        let mut desired = svc(1, 1, 0);
        desired.auto_rollback = false;
        let d = reconcile(&desired, &observed, &previous, Timestamp(5));
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::Rollback { .. }))
        );
        let progressing = d
            .status
            .conditions
            .iter()
            .find(|c| c.kind == "Progressing")
            .unwrap();
        assert!(!progressing.status);
        assert_eq!(progressing.reason, "InstancesFailing");

        // Nothing to go back to on a first rollout.
        let d = reconcile(
            &svc(1, 1, 0),
            &[inst("b").state(Exited)],
            &WorkloadStatus::default(),
            Timestamp(5),
        );
        assert!(
            !d.actions
                .iter()
                .any(|a| matches!(a, Action::Rollback { .. }))
        );
    }

    #[test]
    fn a_stalled_rollout_fails_at_its_deadline() {
        let observed = [inst("a").old(), inst("b").state(Running)];
        let previous = WorkloadStatus {
            last_good_generation: 1,
            ..Default::default()
        };
        let mut desired = svc(1, 1, 0);
        desired.progress_deadline = Duration::from_secs(60);
        let before = reconcile(&desired, &observed, &previous, Timestamp(59_000));
        assert!(
            !before
                .actions
                .iter()
                .any(|a| matches!(a, Action::Rollback { .. }))
        );
        let after = reconcile(&desired, &observed, &previous, Timestamp(61_000));
        assert!(matches!(
            after.actions.last(),
            Some(Action::Rollback { to: 1, .. })
        ));
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            "Available",
            true,
            "A",
            "m".into(),
            Timestamp(1),
        );
        set_condition(
            &mut conditions,
            "Available",
            true,
            "A",
            "m2".into(),
            Timestamp(2),
        );
        assert_eq!(conditions[0].last_transition, Timestamp(1));
        set_condition(
            &mut conditions,
            "Available",
            false,
            "B",
            "m3".into(),
            Timestamp(3),
        );
        assert_eq!(conditions[0].last_transition, Timestamp(3));
    }

    proptest::proptest! {
        /// Never more than replicas + maxSurge active instances after creating, and never a
        /// ready instance stopped below replicas - maxUnavailable.
        #[test]
        fn rollouts_respect_surge_and_availability(
            replicas in 0u32..6, surge in 0u32..3, unavailable in 0u32..3,
            states in proptest::collection::vec((proptest::bool::ANY, 0u8..4), 0..10),
        ) {
            proptest::prop_assume!(surge + unavailable > 0);
            let observed: Vec<Observed> = states.iter().enumerate().map(|(n, (current, s))| {
                let mut i = inst(&format!("i{n}"));
                i.current = *current;
                i.state = [Pending, Running, Ready, Exited][*s as usize];
                i
            }).collect();
            let d = reconcile(&svc(replicas, surge, unavailable), &observed,
                &WorkloadStatus::default(), Timestamp(0));
            let created: u32 = d.actions.iter().map(|a| match a { Action::Create(n) => *n, _ => 0 }).sum();
            let stopped: Vec<&String> = d.actions.iter().flat_map(|a| match a {
                Action::Stop(ids) => ids.iter().collect(), _ => Vec::new() }).collect();
            let has_outdated = observed.iter().any(|i| !i.current);
            if has_outdated {
                proptest::prop_assert!(observed.len() as u32 + created <= (replicas + surge).max(observed.len() as u32));
                let ready_after = observed.iter()
                    .filter(|i| i.state == Ready && !stopped.contains(&&i.id)).count() as u32;
                let ready_before = observed.iter().filter(|i| i.state == Ready).count() as u32;
                proptest::prop_assert!(ready_after >= ready_before.min(replicas.saturating_sub(unavailable)));
            } else {
                proptest::prop_assert_eq!(observed.len() as u32 + created - stopped.len() as u32, replicas);
            }
        }
    }
}
