//! The agent's pure decisions: which instance workers to start, update or retire for an
//! assignment set, and when an exited container runs again. No I/O, no clock: time comes in
//! as values.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gantry::workload::{RestartPolicy, Workload};

/// A run lasting at least this long resets the restart backoff (Kubernetes' 10 minutes).
pub const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// One instance the scheduler assigned to this node.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    /// Workload of the instance.
    pub workload: String,
    /// Workload generation of `spec`.
    pub generation: u64,
    /// The spec to run; `None` when the scheduler could not describe it (then `stop` is set).
    pub spec: Option<Arc<Workload>>,
    /// Stop the instance but keep it (status and logs stay available).
    pub stop: bool,
}

/// What the reconciler does for one instance.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start a worker for a newly assigned instance (it adopts an existing container).
    Start(String, Assigned),
    /// Give a worker its changed assignment.
    Update(String, Assigned),
    /// End a worker: stop and remove its container. Also for containers without a worker
    /// that no assignment names (left from before an agent restart).
    Retire(String),
}

/// Compares the assignments with the workers (instance id → the assignment each one holds)
/// and the containers found on the node; returns the actions, by instance id.
pub fn reconcile(
    desired: &BTreeMap<String, Assigned>,
    workers: &BTreeMap<String, Assigned>,
    containers: &[String],
) -> Vec<Action> {
    let mut actions = Vec::new();
    for (id, assigned) in desired {
        match workers.get(id) {
            None => actions.push(Action::Start(id.clone(), assigned.clone())),
            Some(held) if held != assigned => {
                actions.push(Action::Update(id.clone(), assigned.clone()))
            }
            Some(_) => {}
        }
    }
    for id in workers.keys() {
        if !desired.contains_key(id) {
            actions.push(Action::Retire(id.clone()));
        }
    }
    for id in containers {
        if !desired.contains_key(id) && !workers.contains_key(id) {
            actions.push(Action::Retire(id.clone()));
        }
    }
    actions
}

/// How a run of a container ended, as far as restarting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Exit code (128 + signal when killed).
    pub code: i32,
    /// How long the run lasted.
    pub ran_for: Duration,
}

/// After an exit: wait `delay` and run again, or stay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Run again after `delay`; `failures` is the new count of consecutive quick failures.
    Restart {
        /// Time to wait first.
        delay: Duration,
        /// Consecutive short runs so far, including this one (the backoff exponent).
        failures: u32,
    },
    /// Leave it ended (restart policy `never`, or `on-failure` after a success).
    Stay,
}

/// The restart decision for a container that ended: per `policy`, with an exponential delay
/// from `initial` doubling up to `max` over `failures` consecutive short runs (a run of
/// [`BACKOFF_RESET`] or more starts the count again).
pub fn after_exit(
    policy: RestartPolicy,
    initial: Duration,
    max: Duration,
    failures: u32,
    ended: Ended,
) -> AfterExit {
    let restart = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => ended.code != 0,
        RestartPolicy::Never => false,
    };
    if !restart {
        return AfterExit::Stay;
    }
    let failures = if ended.ran_for >= BACKOFF_RESET {
        0
    } else {
        failures
    };
    let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
    let delay = initial.saturating_mul(factor).min(max);
    AfterExit::Restart {
        delay,
        failures: failures.saturating_add(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry::workload::{Format, parse};

    fn assigned(generation: u64, stop: bool) -> Assigned {
        let spec = parse("kind: Service\nname: web\nimage: busybox\n", Format::Yaml)
            .unwrap()
            .remove(0);
        Assigned {
            workload: "web".into(),
            generation,
            spec: Some(Arc::new(spec)),
            stop,
        }
    }

    fn set(items: &[(&str, u64, bool)]) -> BTreeMap<String, Assigned> {
        items
            .iter()
            .map(|(id, generation, stop)| (id.to_string(), assigned(*generation, *stop)))
            .collect()
    }

    #[test]
    fn reconcile_table() {
        use Action::*;
        let a = |g, s| assigned(g, s);
        type Case = (&'static str, Set, Set, Vec<&'static str>, Vec<Action>);
        type Set = BTreeMap<String, Assigned>;
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("nothing", set(&[]), set(&[]), vec![], vec![]),
            ("new instance", set(&[("i1", 1, false)]), set(&[]), vec![], vec![Start("i1".into(), a(1, false))]),
            ("adopted container", set(&[("i1", 1, false)]), set(&[]), vec!["i1"], vec![Start("i1".into(), a(1, false))]),
            ("unchanged", set(&[("i1", 1, false)]), set(&[("i1", 1, false)]), vec!["i1"], vec![]),
            ("stop flag", set(&[("i1", 1, true)]), set(&[("i1", 1, false)]), vec![], vec![Update("i1".into(), a(1, true))]),
            ("removed", set(&[]), set(&[("i1", 1, false)]), vec!["i1"], vec![Retire("i1".into())]),
            ("orphan container", set(&[]), set(&[]), vec!["old"], vec![Retire("old".into())]),
        ];
        for (name, desired, workers, containers, want) in cases {
            let containers: Vec<String> = containers.into_iter().map(String::from).collect();
            assert_eq!(reconcile(&desired, &workers, &containers), want, "{name}");
        }
    }

    #[test]
    fn restart_table() {
        use AfterExit::*;
        use RestartPolicy::*;
        let s = Duration::from_secs;
        let quick = |code| Ended {
            code,
            ran_for: s(1),
        };
        #[rustfmt::skip]
        let cases = [
            (Always, 0, quick(0), Restart { delay: s(1), failures: 1 }),
            (Always, 1, quick(1), Restart { delay: s(2), failures: 2 }),
            (Always, 3, quick(1), Restart { delay: s(8), failures: 4 }),
            (Always, 12, quick(1), Restart { delay: s(300), failures: 13 }),
            (Always, 40, quick(1), Restart { delay: s(300), failures: 41 }),
            (Always, 5, Ended { code: 1, ran_for: s(600) }, Restart { delay: s(1), failures: 1 }),
            (OnFailure, 0, quick(0), Stay),
            (OnFailure, 0, quick(137), Restart { delay: s(1), failures: 1 }),
            (Never, 0, quick(1), Stay),
        ];
        for (policy, failures, ended, want) in cases {
            assert_eq!(
                after_exit(policy, s(1), s(300), failures, ended),
                want,
                "{policy:?} after {failures} failures, {ended:?}"
            );
        }
    }
}
