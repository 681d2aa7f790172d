//! When a node counts as lost: its session's live key disappears `lease_ttl` after its last
//! heartbeat (the node is NotReady from then on), and the node is lost `grace` after that last
//! heartbeat, when its Service instances are re-placed.
//!
//! The tracker remembers, per node, the last time it saw the node live; for a node it has never
//! seen live (a new leader, a node already gone) it assumes the last heartbeat was one lease TTL
//! before it first looked, which is exact when the lease has just expired and errs on the side
//! of waiting otherwise.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::cache::View;
use crate::model::Timestamp;

/// Per-node liveness memory of the leader.
#[derive(Debug)]
pub struct Tracker {
    grace: Duration,
    lease_ttl: Duration,
    last_live: HashMap<String, Timestamp>,
    lost: BTreeSet<String>,
}

impl Tracker {
    /// A tracker that declares a node lost `grace` after its last heartbeat.
    pub fn new(grace: Duration, lease_ttl: Duration) -> Self {
        Tracker {
            grace,
            lease_ttl,
            last_live: HashMap::new(),
            lost: BTreeSet::new(),
        }
    }

    /// Updates from a view at time `now`; returns whether the set of lost nodes changed.
    pub fn observe(&mut self, view: &View, now: Timestamp) -> bool {
        let assumed = Timestamp(now.0 - self.lease_ttl.as_millis() as i64);
        let mut lost = BTreeSet::new();
        for name in view.nodes.keys() {
            if view.is_live(name) {
                self.last_live.insert(name.clone(), now);
                continue;
            }
            let last = *self.last_live.entry(name.clone()).or_insert(assumed);
            if now.since(last) >= self.grace {
                lost.insert(name.clone());
            }
        }
        self.last_live
            .retain(|name, _| view.nodes.contains_key(name));
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
        self.last_live
            .iter()
            .filter(|(name, last)| !self.lost.contains(*name) && now.since(**last) > Duration::ZERO)
            .map(|(_, last)| self.grace.saturating_sub(now.since(*last)))
            .filter(|d| !d.is_zero())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Versioned;
    use crate::model::{Liveness, NodeRecord};

    fn view(nodes: &[(&str, bool)]) -> View {
        let mut view = View::default();
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
    fn a_new_leader_assumes_the_lease_just_expired() {
        let mut t = Tracker::new(Duration::from_secs(10), Duration::from_secs(6));
        assert!(!t.observe(&view(&[("n1", false)]), Timestamp(100_000)));
        assert!(t.observe(&view(&[("n1", false)]), Timestamp(104_000)));
    }
}
