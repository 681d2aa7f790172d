//! The Job controller's decision: run instances until `completions` have exited 0, at most
//! `parallelism` at once, and give up once failures pass `backoffLimit`. Instances on a
//! draining node are stopped and replaced elsewhere.
//!
//! Pure. Failures count both restarts in place (policy `on-failure`: the agent restarts the
//! container and the restart count grows) and instances that ended in failure (policy `never`),
//! which are replaced. Finished instances keep their records, so the counts survive a leader
//! change; they go when the Job is deleted. A Job's spec is its template: a new generation
//! applies to the instances created after it, as with Kubernetes.

use crate::model::{InstanceCounts, InstanceState, Timestamp, WorkloadStatus};

use super::service::{Action, Decision, Observed, set_condition};

/// What the Job asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desired {
    /// The workload's current generation.
    pub generation: u64,
    /// Successful instances needed.
    pub completions: u32,
    /// Instances run at once.
    pub parallelism: u32,
    /// Failures after which the Job fails.
    pub backoff_limit: u32,
}

/// Decides what to do for one Job.
pub fn reconcile(
    desired: &Desired,
    observed: &[Observed],
    previous: &WorkloadStatus,
    now: Timestamp,
) -> Decision {
    let mut actions = Vec::new();
    let remove = super::service::gone(observed);
    let live: Vec<&Observed> = observed.iter().filter(|i| !i.lost).collect();
    let succeeded_count = live.iter().filter(|i| succeeded(i)).count() as u32;
    let ended_failed = live
        .iter()
        .filter(|i| i.state.is_terminal() && !succeeded(i) && !i.stopping)
        .count() as u32;
    let succeeded = succeeded_count;
    let failures = ended_failed + live.iter().map(|i| i.restart_count).sum::<u32>();
    let active: Vec<&Observed> = live
        .iter()
        .copied()
        .filter(|i| !i.stopping && !i.state.is_terminal())
        .collect();
    if !remove.is_empty() {
        actions.push(Action::Remove(remove));
    }

    let mut status = WorkloadStatus {
        observed_generation: desired.generation,
        last_good_generation: previous.last_good_generation,
        conditions: previous.conditions.clone(),
        counts: InstanceCounts {
            desired: desired.completions,
            current: active.len() as u32,
            updated: active.len() as u32,
            ready: active
                .iter()
                .filter(|i| i.state == InstanceState::Ready)
                .count() as u32,
            unplaced: active.iter().filter(|i| !i.placed).count() as u32,
            succeeded,
            failed: failures,
        },
    };
    let all_ids = |v: &[&Observed]| v.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
    if failures > desired.backoff_limit {
        if !active.is_empty() {
            actions.push(Action::Stop(all_ids(&active)));
        }
        set_condition(
            &mut status.conditions,
            "Failed",
            true,
            "BackoffLimitExceeded",
            format!(
                "{failures} failure(s), more than the backoff limit of {}",
                desired.backoff_limit
            ),
            now,
        );
    } else if succeeded >= desired.completions {
        if !active.is_empty() {
            actions.push(Action::Stop(all_ids(&active)));
        }
        set_condition(
            &mut status.conditions,
            "Complete",
            true,
            "Completed",
            format!("{succeeded} of {} completions", desired.completions),
            now,
        );
    } else {
        let wanted = desired.parallelism.min(desired.completions - succeeded) as usize;
        // Instances on a draining node are stopped and replaced elsewhere at once; a stopped
        // instance counts neither as a failure nor as running.
        let (staying, draining): (Vec<&Observed>, Vec<&Observed>) =
            active.iter().partition(|i| !(i.placed && i.draining));
        if !draining.is_empty() {
            actions.push(Action::Stop(all_ids(&draining)));
        }
        let unplaced: Vec<String> = staying
            .iter()
            .filter(|i| !i.placed)
            .map(|i| i.id.clone())
            .collect();
        if !unplaced.is_empty() {
            actions.push(Action::Place(unplaced));
        }
        if staying.len() < wanted {
            actions.push(Action::Create((wanted - staying.len()) as u32));
        }
        set_condition(
            &mut status.conditions,
            "Complete",
            false,
            "Running",
            format!(
                "{succeeded} of {} completions, {} running",
                desired.completions,
                active.len()
            ),
            now,
        );
    }
    Decision { actions, status }
}

fn succeeded(i: &Observed) -> bool {
    i.state == InstanceState::Exited && i.exit_code == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use InstanceState::*;

    fn inst(id: &str, state: InstanceState, exit_code: Option<i32>) -> Observed {
        Observed {
            state,
            exit_code,
            ..Observed::ready(id)
        }
    }

    fn job(completions: u32, parallelism: u32, backoff_limit: u32) -> Desired {
        Desired {
            generation: 1,
            completions,
            parallelism,
            backoff_limit,
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn check(desired: Desired, observed: Vec<Observed>, expected: Vec<Action>) -> WorkloadStatus {
        let d = reconcile(
            &desired,
            &observed,
            &WorkloadStatus::default(),
            Timestamp(0),
        );
        assert_eq!(d.actions, expected, "observed: {observed:#?}");
        d.status
    }

    #[test]
    fn job_table() {
        check(job(3, 2, 6), vec![], vec![Create(2)]);
        check(
            job(3, 2, 6),
            vec![inst("a", Running, None)],
            vec![Create(1)],
        );
        check(
            job(3, 2, 6),
            vec![inst("a", Exited, Some(0)), inst("b", Running, None)],
            vec![Create(1)],
        );
        // Drain: the instance on the draining node stops and is replaced at once.
        check(
            job(3, 2, 6),
            vec![
                Observed {
                    draining: true,
                    ..inst("a", Running, None)
                },
                inst("b", Running, None),
            ],
            vec![Stop(ids(&["a"])), Create(1)],
        );
        // Only one completion left: no more than one at a time.
        check(
            job(3, 2, 6),
            vec![inst("a", Exited, Some(0)), inst("b", Exited, Some(0))],
            vec![Create(1)],
        );
        let s = check(
            job(2, 2, 6),
            vec![inst("a", Exited, Some(0)), inst("b", Exited, Some(0))],
            vec![],
        );
        assert_eq!(s.counts.succeeded, 2);
        assert!(
            s.conditions
                .iter()
                .any(|c| c.kind == "Complete" && c.status)
        );
        // A failed instance (restart policy never) is replaced and counted.
        let s = check(
            job(1, 1, 6),
            vec![inst("a", Exited, Some(3))],
            vec![Create(1)],
        );
        assert_eq!(s.counts.failed, 1);
        // Past the backoff limit: everything stops and the Job fails.
        let mut restarting = inst("b", Running, None);
        restarting.restart_count = 2;
        let s = check(
            job(1, 1, 2),
            vec![inst("a", Failed, None), restarting],
            vec![Stop(ids(&["b"]))],
        );
        assert!(s.conditions.iter().any(|c| c.kind == "Failed" && c.status));
        // A lost node's running instance is replaced, not counted as a failure.
        let mut lost = inst("a", Running, None);
        lost.lost = true;
        let s = check(
            job(1, 1, 0),
            vec![lost],
            vec![Remove(ids(&["a"])), Create(1)],
        );
        assert_eq!(s.counts.failed, 0);
    }
}
