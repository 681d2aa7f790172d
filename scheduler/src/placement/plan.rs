//! Placing one request on a [`Cluster`]: the filter → score → pick loop, kept incremental so that,
//! after O(nodes) of set-up per request, an instance costs O(log nodes) (times the number of
//! distinct per-value counts, one or two when spreading evenly), not O(nodes).
//!
//! Every instance of a request is alike, so a node's fixed filters (ready, cordon, selectors)
//! are evaluated once per request, and its changing filters and score change only when that
//! node changes. Feasible nodes sit in one max-heap per value of the spread label, keyed by
//! resource score; the label values sit in buckets by how many instances of the workload they
//! hold, each bucket a heap keyed by its values' best node. A pick looks at the best value of
//! each bucket (with even spreading there are one or two buckets), adds the spread score, and
//! takes the best total, ties to the node whose name sorts first. Entries are never updated in
//! place: a change bumps the node's (or value's) version and pushes a new entry, and stale ones
//! are dropped when they reach the top.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use super::cluster::{Cluster, FixedHashMap, Rank, Resident};
use super::filter::{self, changing_blocker, fixed_blocker};
use super::preempt::{Victims, victims};
use super::{Assignment, Config, Eviction, Plan, Rejection, Request, Unplaced};

impl<'a> Cluster<'a> {
    /// Places `request`'s instances in order and returns the plan; the plan is also applied to
    /// this view, so a later call sees the instances it placed and evicted.
    pub fn place(&mut self, request: &Request, config: &Config) -> Plan {
        let mut plan = Plan::default();
        let mut placer = Placer::new(self, request, config);
        let mut instances = request.instances.iter();
        for id in instances.by_ref() {
            let (rank, evicted) = match placer.pick() {
                Some(rank) => (rank, Vec::new()),
                None => match config.preemption.then(|| placer.preempt(self)).flatten() {
                    Some((rank, victims)) => (rank, victims.indexes),
                    None => {
                        // Nothing changed since this instance failed, and the rest are alike:
                        // they all fail, for the same reasons.
                        let reasons = rejections(self, request);
                        for id in std::iter::once(id).chain(instances.by_ref()) {
                            plan.unplaced.push(Unplaced {
                                instance: id.clone(),
                                reasons: Arc::clone(&reasons),
                            });
                        }
                        break;
                    }
                },
            };
            let node = self.nodes[rank as usize].name();
            // Remove from the highest index down, so the lower indexes stay valid.
            let mut evictions: Vec<Eviction> = Vec::with_capacity(evicted.len());
            for &index in evicted.iter().rev() {
                if let Some(victim) = self.remove(rank, index) {
                    if victim.workload == request.workload.as_str() {
                        placer.count_changed(rank, -1);
                    }
                    evictions.push(Eviction {
                        instance: victim.id.into_owned(),
                        node: node.to_string(),
                        workload: victim.workload.into_owned(),
                        priority: victim.priority,
                        for_instance: id.clone(),
                    });
                }
            }
            evictions.sort_by(|a, b| a.instance.cmp(&b.instance));
            plan.evictions.append(&mut evictions);
            debug_assert!(
                changing_blocker(&self.nodes[rank as usize], request, 0).is_none(),
                "the chosen node must fit"
            );
            self.add(rank, Resident::of_request(request, id));
            placer.count_changed(rank, 1);
            placer.node_changed(self, rank);
            plan.assignments.push(Assignment {
                instance: id.clone(),
                node: node.to_string(),
            });
        }
        plan
    }
}

/// Every node's reason for refusing an instance of `request`, in node-name order.
fn rejections(cluster: &Cluster<'_>, request: &Request) -> Arc<[Rejection]> {
    let counts = cluster.by_workload.get(request.workload.as_str());
    (0..)
        .zip(&cluster.nodes)
        .filter_map(|(rank, node)| {
            let same = counts.and_then(|c| c.get(&rank)).copied().unwrap_or(0);
            let reason = filter::reason(node, request, same);
            debug_assert!(reason.is_some(), "asked for reasons while a node fits");
            Some(Rejection {
                node: node.name().to_string(),
                reason: reason?,
            })
        })
        .collect()
}

/// A node in its label value's heap, or a label value in its count bucket (standing for its
/// best node): ordered by the node's weighted resource score (higher first in a max-heap), then
/// by its rank (lower first), which within one label value is the order of
/// [`filter::compare`].
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f64,
    rank: Rank,
    /// The node's label value.
    value: u32,
    /// The node's version in a value's heap, the value's version in a bucket.
    version: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        filter::compare(
            (self.score, self.score, self.rank),
            (other.score, other.score, other.rank),
        )
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// One value of the spread label (all nodes are one value when there is no spread label).
#[derive(Debug, Default)]
struct LabelValue {
    /// Instances of the workload on nodes with this value.
    count: u64,
    /// Its feasible nodes (and stale entries).
    nodes: BinaryHeap<Candidate>,
    version: u32,
}

/// A preemption candidate: fewest victims, then lowest priority sum, then first name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PreemptEntry {
    victims: usize,
    priority_sum: i64,
    rank: Rank,
    version: u32,
}

/// The per-request state of the incremental planner.
struct Placer<'r> {
    request: &'r Request,
    config: &'r Config,
    /// Per node: whether it passes the fixed filters.
    eligible: Vec<bool>,
    /// Per node: its label value.
    value_of: Vec<u32>,
    /// Per node: bumped on every change, to recognise stale heap entries.
    version: Vec<u32>,
    values: Vec<LabelValue>,
    /// Instance count → heap of the label values holding that many.
    buckets: BTreeMap<u64, BinaryHeap<Candidate>>,
    /// Built on the first instance that fits nowhere.
    preemption: Option<BinaryHeap<Reverse<PreemptEntry>>>,
    /// Scratch for `pick`.
    tops: Vec<(u64, Candidate)>,
}

impl<'r> Placer<'r> {
    /// O(nodes + instances of the workload): the fixed filters of every node, the label values,
    /// and the heaps of feasible nodes.
    fn new(cluster: &Cluster<'_>, request: &'r Request, config: &'r Config) -> Self {
        let n = cluster.nodes.len();
        let mut placer = Placer {
            request,
            config,
            eligible: Vec::with_capacity(n),
            value_of: vec![0; n],
            version: vec![0; n],
            values: Vec::new(),
            buckets: BTreeMap::new(),
            preemption: None,
            tops: Vec::new(),
        };
        match &request.spread_label {
            None => placer.values.push(LabelValue::default()),
            Some(label) => {
                let mut ids: FixedHashMap<Option<&str>, u32> = FixedHashMap::default();
                for (node, value_of) in cluster.nodes.iter().zip(&mut placer.value_of) {
                    let value = node.node.labels.get(label).map(String::as_str);
                    let next = ids.len() as u32;
                    *value_of = *ids.entry(value).or_insert(next);
                }
                placer.values.resize_with(ids.len(), LabelValue::default);
            }
        }
        let counts = cluster.by_workload.get(request.workload.as_str());
        for (&rank, &count) in counts.into_iter().flatten() {
            placer.values[placer.value_of[rank as usize] as usize].count += u64::from(count);
        }
        let mut feasible: Vec<Vec<Candidate>> = placer.values.iter().map(|_| Vec::new()).collect();
        for (rank, node) in (0..).zip(&cluster.nodes) {
            let eligible = fixed_blocker(node, request).is_none();
            placer.eligible.push(eligible);
            let same = counts.and_then(|c| c.get(&rank)).copied().unwrap_or(0);
            if eligible && changing_blocker(node, request, same).is_none() {
                let value = placer.value_of[rank as usize];
                feasible[value as usize].push(Candidate {
                    score: filter::resource_term(node, request, config),
                    rank,
                    value,
                    version: 0,
                });
            }
        }
        for (value, entries) in feasible.into_iter().enumerate() {
            placer.values[value].nodes = BinaryHeap::from(entries);
            placer.refresh_value(value as u32);
        }
        placer
    }

    /// The best feasible node, or `None` if no node fits.
    fn pick(&mut self) -> Option<Rank> {
        self.tops.clear();
        let values = &self.values;
        self.buckets.retain(|&count, heap| {
            while let Some(top) = heap.peek() {
                if values[top.value as usize].version == top.version {
                    break;
                }
                heap.pop();
            }
            match heap.peek() {
                Some(top) => {
                    self.tops.push((count, *top));
                    true
                }
                None => false,
            }
        });
        let min = self.tops.first()?.0;
        let max = self.tops.last()?.0;
        let weights = &self.config.weights;
        self.tops
            .iter()
            .map(|&(count, top)| {
                let total =
                    filter::total(top.score, filter::spread_score(count, min, max), weights);
                (total, top.score, top.rank)
            })
            .max_by(|&a, &b| filter::compare(a, b))
            .map(|(_, _, rank)| rank)
    }

    /// Re-files label value `value` in its count bucket under its current best node.
    fn refresh_value(&mut self, value: u32) {
        let v = &mut self.values[value as usize];
        v.version = v.version.wrapping_add(1);
        while let Some(top) = v.nodes.peek() {
            if self.version[top.rank as usize] == top.version {
                break;
            }
            v.nodes.pop();
        }
        if let Some(top) = v.nodes.peek() {
            self.buckets.entry(v.count).or_default().push(Candidate {
                version: v.version,
                ..*top
            });
        }
    }

    /// Records that node `rank` gained (`+1`) or lost (`-1`) an instance of the workload.
    fn count_changed(&mut self, rank: Rank, delta: i64) {
        let v = &mut self.values[self.value_of[rank as usize] as usize];
        v.count = v.count.saturating_add_signed(delta);
    }

    /// Re-evaluates node `rank` after a placement or eviction on it.
    fn node_changed(&mut self, cluster: &Cluster<'_>, rank: Rank) {
        let at = rank as usize;
        self.version[at] = self.version[at].wrapping_add(1);
        let value = self.value_of[at];
        if self.eligible[at] {
            let node = &cluster.nodes[at];
            let same = cluster.count(&self.request.workload, rank);
            if changing_blocker(node, self.request, same).is_none() {
                self.values[value as usize].nodes.push(Candidate {
                    score: filter::resource_term(node, self.request, self.config),
                    rank,
                    value,
                    version: self.version[at],
                });
            }
            if self.preemption.is_some()
                && let Some(entry) = self.preempt_entry(cluster, rank)
                && let Some(heap) = &mut self.preemption
            {
                heap.push(Reverse(entry));
            }
        }
        // The value's count may have changed too, so re-file it even if its best node did not.
        self.refresh_value(value);
    }

    /// The node where evicting makes room with the fewest victims (then the lowest priority
    /// sum, then the first name), with its victims.
    fn preempt(&mut self, cluster: &Cluster<'_>) -> Option<(Rank, Victims)> {
        if self.preemption.is_none() {
            let entries: Vec<_> = (0..)
                .zip(&cluster.nodes)
                .filter_map(|(rank, _)| self.preempt_entry(cluster, rank).map(Reverse))
                .collect();
            self.preemption = Some(BinaryHeap::from(entries));
        }
        let heap = self.preemption.as_mut()?;
        while let Some(Reverse(top)) = heap.pop() {
            if self.version[top.rank as usize] != top.version {
                continue;
            }
            // The entry is current, so the node's victims are what they were when it was
            // pushed; the node is about to change, which pushes a fresh entry.
            return victims(&cluster.nodes[top.rank as usize], self.request)
                .map(|victims| (top.rank, victims));
        }
        None
    }

    /// Node `rank` as a preemption candidate: only if its fixed filters and anti-affinity pass,
    /// since evicting cannot change those.
    fn preempt_entry(&self, cluster: &Cluster<'_>, rank: Rank) -> Option<PreemptEntry> {
        let at = rank as usize;
        if !self.eligible[at] {
            return None;
        }
        let node = &cluster.nodes[at];
        if let Some(blocker) = changing_blocker(
            node,
            self.request,
            cluster.count(&self.request.workload, rank),
        ) && !blocker.preemptible()
        {
            return None;
        }
        let v = victims(node, self.request)?;
        Some(PreemptEntry {
            victims: v.indexes.len(),
            priority_sum: v.priority_sum,
            rank,
            version: self.version[at],
        })
    }
}
