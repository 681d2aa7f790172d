//! When a node counts as lost: its session's live key disappears `lease_ttl` after its last
//! heartbeat (the node is NotReady from then on), and the node is lost `grace` after that last
//! heartbeat, when its Service instances are re-placed.
//!
//! The tracker notes, per node that is not live, when its last heartbeat was: one lease TTL
//! before the tracker first saw it without its live key. That is exact when the key has just
//! gone (the controller looks as soon as the view changes) and errs on the side of waiting
//! otherwise (a new leader, a node already gone). It only looks at every node again when node
//! records or live keys changed ([`View::membership`]) or a node's grace ran out, so a pass
//! costs nothing per node in a steady cluster.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::cache::View;
use crate::model::Timestamp;

/// Per-node liveness memory of the leader.
#[derive(Debug)]
pub struct Tracker {
    grace: Duration,
    lease_ttl: Duration,
    /// Assumed last heartbeat of each node without a live key.
    down_since: HashMap<String, Timestamp>,
    lost: BTreeSet<String>,
    /// `View::membership` when the nodes were last looked at.
    seen: Option<u64>,
    /// When the next node that is down becomes lost.
    next_due: Option<Timestamp>,
}

impl Tracker {
    /// A tracker that declares a node lost `grace` after its last heartbeat.
    pub fn new(grace: Duration, lease_ttl: Duration) -> Self {
        Tracker {
            grace,
            lease_ttl,
            down_since: HashMap::new(),
            lost: BTreeSet::new(),
            seen: None,
            next_due: None,
        }
    }

    /// Updates from a view at time `now`; returns whether the set of lost nodes changed.
    pub fn observe(&mut self, view: &View, now: Timestamp) -> bool {
        if self.seen == Some(view.membership) && self.next_due.is_none_or(|due| now < due) {
            return false;
        }
        self.seen = Some(view.membership);
        let assumed = Timestamp(now.0 - self.lease_ttl.as_millis() as i64);
        for name in view.nodes.keys() {
            if view.is_live(name) {
                self.down_since.remove(name);
            } else if !self.down_since.contains_key(name) {
                self.down_since.insert(name.clone(), assumed);
            }
        }
        self.down_since
            .retain(|name, _| view.nodes.contains_key(name));
        let grace = self.grace;
        let lost: BTreeSet<String> = self
            .down_since
            .iter()
            .filter(|(_, last)| now.since(**last) >= grace)
            .map(|(name, _)| name.clone())
            .collect();
        self.next_due = self
            .down_since
            .values()
            .filter(|last| now.since(**last) < grace)
            .map(|last| Timestamp(last.0 + grace.as_millis() as i64))
            .min();
        let changed = lost != self.lost;
        self.lost = lost;
        changed
    }

    /// Time after the last heartbeat at which a node is lost.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The nodes that are lost now.
    pub fn lost(&self) -> &BTreeSet<String> {
        &self.lost
    }

    /// Whether node `name` is lost.
    pub fn is_lost(&self, name: &str) -> bool {
        self.lost.contains(name)
    }

    /// Time from `now` until the next node that is not live becomes lost.
    pub fn next_deadline(&self, now: Timestamp) -> Option<Duration> {
        self.next_due
            .map(|due| Duration::from_millis(due.0.saturating_sub(now.0).max(0) as u64))
            .filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Versioned;
    use crate::model::{Liveness, NodeRecord};

    fn view(nodes: &[(&str, bool)]) -> View {
        use std::sync::atomic::{AtomicU64, Ordering};
        static CHANGES: AtomicU64 = AtomicU64::new(1);
        let mut view = View {
            membership: CHANGES.fetch_add(1, Ordering::Relaxed),
            ..View::default()
        };
        for (name, live) in nodes {
            view.nodes.insert(
                name.to_string(),
                Versioned {
                    value: NodeRecord {
                        name: name.to_string(),
                        ..NodeRecord::default()
                    },
                    mod_revision: 1,
                },
            );
            if *live {
                view.live.insert(
                    name.to_string(),
                    Liveness {
                        scheduler: "s".into(),
                        since: Timestamp(0),
                    },
                );
            }
        }
        view
    }

    #[test]
    fn a_node_is_lost_grace_after_its_last_heartbeat() {
        let mut t = Tracker::new(Duration::from_secs(10), Duration::from_secs(6));
        assert!(!t.observe(&view(&[("n1", true)]), Timestamp(0)));
        // Heartbeats stop at 0; the live key expires at 6 s.
        assert!(!t.observe(&view(&[("n1", false)]), Timestamp(6_000)));
        assert_eq!(
            t.next_deadline(Timestamp(6_000)),
            Some(Duration::from_secs(4))
        );
        assert!(!t.observe(&view(&[("n1", false)]), Timestamp(9_999)));
        assert!(t.observe(&view(&[("n1", false)]), Timestamp(10_000)));
        assert!(t.is_lost("n1"));
        // It comes back.
        assert!(t.observe(&view(&[("n1", true)]), Timestamp(12_000)));
        assert!(!t.is_lost("n1"));
    }

    #[test]
    fn an_unchanged_view_is_looked_at_again_only_when_a_grace_runs_out() {
        let mut t = Tracker::new(Duration::from_secs(10), Duration::from_secs(6));
        let down = view(&[("n1", false), ("n2", true)]);
        assert!(!t.observe(&down, Timestamp(6_000)));
        assert!(
            !t.observe(&down, Timestamp(9_000)),
            "same view, before the deadline"
        );
        assert!(t.observe(&down, Timestamp(10_000)), "the deadline passed");
        assert_eq!(t.lost().iter().collect::<Vec<_>>(), ["n1"]);
        assert_eq!(t.next_deadline(Timestamp(10_000)), None);
    }

    #[test]
    fn a_new_leader_assumes_the_lease_just_expired() {
        let mut t = Tracker::new(Duration::from_secs(10), Duration::from_secs(6));
        assert!(!t.observe(&view(&[("n1", false)]), Timestamp(100_000)));
        assert!(t.observe(&view(&[("n1", false)]), Timestamp(104_000)));
    }
}
