//! The controllers, run by the leader: each pass reads the replica ([`Cache`]), decides per
//! workload with a pure reconcile function, places new instances with the placement core, and
//! commits each workload's plan in transactions guarded by the workload's `mod_revision` and by
//! the leader key (a deposed leader's writes fail). A pass runs when the replica reports a
//! change, when a node's grace period ends, and on a periodic resync; a conflict only means the
//! next pass looks again.
//!
//! Map: `service` (the Service reconcile), `nodes` (when a node counts as lost), this file (the
//! loop and the executor).

pub mod daemon;
pub mod job;
pub mod nodes;
pub mod service;

use std::cell::OnceCell;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use gantry::workload::{Mode, Workload};
use tracing::{debug, info, warn};

use crate::cache::{Cache, View};
use crate::metrics::Metrics;
use crate::model::{
    self, InstanceRecord, InstanceState, NoticeRecord, RevisionRecord, Timestamp, WorkloadRecord,
    keys,
};
use crate::placement::{self, Cluster, HostPort, Placed, Request, Resources, Snapshot};
use crate::store::{Compare, Op, Revision, Store};

/// Most operations in one transaction: etcd refuses more than `--max-txn-ops` (default 128).
const MAX_TXN_OPS: usize = 120;
/// Transactions in flight at once.
const TXN_CONCURRENCY: usize = 16;
/// Least time between two status writes of a workload that only change its counts.
const STATUS_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Placement failures kept on an unplaced instance (the worst nodes are enough to explain).
const KEPT_FAILURES: usize = 8;

/// Controller settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Placement strategy and weights.
    pub placement: placement::Config,
    /// Time after a node's last heartbeat before its instances are re-placed.
    pub node_grace: Duration,
    /// The node session lease's TTL: a node's live key disappears this long after its last
    /// heartbeat.
    pub lease_ttl: Duration,
    /// Full pass at least this often.
    pub resync: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            placement: placement::Config::default(),
            node_grace: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(6),
            resync: Duration::from_secs(30),
        }
    }
}

/// Runs the controllers until `shutdown` or until a write finds that this process is no longer
/// the leader (`fence` fails).
pub async fn run(
    store: Arc<dyn Store>,
    cache: Cache,
    config: Config,
    fence: Compare,
    metrics: Option<Arc<Metrics>>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    cache.synced().await;
    let dirty = cache.subscribe();
    let mut tracker = nodes::Tracker::new(config.node_grace, config.lease_ttl);
    let mut last_full = Instant::now();
    let mut seen_revision: Revision = 0;
    let mut pacer = StatusPacer::default();
    loop {
        let now = Timestamp::now();
        let full = last_full.elapsed() >= config.resync;
        let changes = dirty.take();
        let lost_before = tracker.lost().clone();
        let lost_changed = tracker.observe(&cache.read(), now);
        if lost_changed {
            announce_lost(&*store, &cache, &fence, &tracker, &lost_before, now).await;
        }
        let mut all = changes.nodes || full || lost_changed;
        if full {
            last_full = Instant::now();
        }
        let mut names: BTreeSet<String> = if all {
            let view = cache.read();
            view.workloads
                .keys()
                .chain(view.instances.keys())
                .cloned()
                .collect()
        } else {
            changes.workloads
        };
        names.extend(pacer.take_due());
        if !names.is_empty() {
            let started = Instant::now();
            let env = Env {
                store: &*store,
                cache: &cache,
                config: &config,
                fence: &fence,
            };
            let outcome = pass(env, &tracker, &mut pacer, &names, now).await;
            debug!(
                workloads = names.len(),
                placed = outcome.placed,
                elapsed = ?started.elapsed(),
                "controller pass"
            );
            if let Some(metrics) = &metrics {
                metrics.observe_placement(started.elapsed(), outcome.placed);
                metrics.set_pending(outcome.pending);
            }
            if outcome.deposed {
                warn!("a controller write found another leader; stopping the controllers");
                return;
            }
            if outcome.conflicts > 0 {
                all = true;
            }
            // The next pass must see this pass's writes, or it would act on them twice.
            seen_revision = seen_revision.max(outcome.revision);
            cache.wait_for(seen_revision).await;
            if all && outcome.conflicts > 0 {
                continue;
            }
        }
        let wake = tracker
            .next_deadline(now)
            .unwrap_or(config.resync)
            .min(config.resync.saturating_sub(last_full.elapsed()))
            .min(pacer.until_due().unwrap_or(Duration::MAX));
        tokio::select! {
            _ = &mut shutdown => return,
            _ = dirty.changed() => {}
            _ = tokio::time::sleep(wake) => {}
        }
    }
}

/// Spaces out status-only writes of a workload (see [`STATUS_MIN_INTERVAL`]).
#[derive(Debug, Default)]
struct StatusPacer {
    written: HashMap<String, Instant>,
    deferred: BTreeSet<String>,
    due: Option<Instant>,
}

impl StatusPacer {
    fn record(&mut self, written: Vec<String>, deferred: Vec<String>) {
        let now = Instant::now();
        self.written
            .retain(|_, t| now.duration_since(*t) < STATUS_MIN_INTERVAL);
        for name in written {
            self.deferred.remove(&name);
            self.written.insert(name, now);
        }
        if !deferred.is_empty() && self.due.is_none() {
            self.due = Some(now + STATUS_MIN_INTERVAL);
        }
        self.deferred.extend(deferred);
    }

    /// The deferred workloads, once their time has come.
    fn take_due(&mut self) -> BTreeSet<String> {
        match self.due {
            Some(due) if Instant::now() >= due => {
                self.due = None;
                std::mem::take(&mut self.deferred)
            }
            _ => BTreeSet::new(),
        }
    }

    fn until_due(&self) -> Option<Duration> {
        self.due
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

/// What one pass did.
#[derive(Debug, Default)]
struct Outcome {
    placed: u64,
    pending: usize,
    conflicts: usize,
    deposed: bool,
    revision: Revision,
}

/// One workload's writes, and what they are guarded by.
struct Work {
    guard: Vec<Compare>,
    ops: Vec<Op>,
    placed: u64,
}

/// Decides for `names` and commits the result.
/// Writes a warning notice for each node lost since `before`.
async fn announce_lost(
    store: &dyn Store,
    cache: &Cache,
    fence: &Compare,
    tracker: &nodes::Tracker,
    before: &BTreeSet<String>,
    now: Timestamp,
) {
    let ops: Vec<Op> = {
        let view = cache.read();
        tracker
            .lost()
            .difference(before)
            .map(|node| {
                let held = view.by_node.get(node).map_or(0, |set| set.len());
                let message = format!(
                    "node {node} sent no heartbeat for {}s: its Service and Job instances ({held} \
                     assigned) are replaced elsewhere",
                    tracker.grace().as_secs()
                );
                notice(view.revision, "node", node, true, "NodeLost", &message, now)
            })
            .collect()
    };
    if ops.is_empty() {
        return;
    }
    if let Err(err) = store.txn(vec![fence.clone()], ops, Vec::new()).await {
        warn!(?err, "writing node-lost notices failed");
    }
}

/// What every pass works with.
#[derive(Clone, Copy)]
struct Env<'a> {
    store: &'a dyn Store,
    cache: &'a Cache,
    config: &'a Config,
    fence: &'a Compare,
}

async fn pass(
    env: Env<'_>,
    tracker: &nodes::Tracker,
    pacer: &mut StatusPacer,
    names: &BTreeSet<String>,
    now: Timestamp,
) -> Outcome {
    let Env {
        store,
        cache,
        config,
        fence,
    } = env;
    let mut works = Vec::new();
    let mut pending = 0usize;
    {
        let view = cache.read();
        let snapshot = OnceCell::new();
        let mut planner = Planner::new(&view, tracker, config, &snapshot, &pacer.written);
        for name in names {
            let work = planner.workload(name, now);
            pending += planner.pending;
            planner.pending = 0;
            works.extend(work);
        }
        let (written, deferred) = (planner.written, planner.deferred);
        pacer.record(written, deferred);
    }
    let mut outcome = Outcome {
        pending,
        ..Outcome::default()
    };
    // Pack the workloads' writes into transactions etcd accepts (at most MAX_TXN_OPS compares
    // and as many ops), several small workloads per transaction: the store commits far fewer,
    // larger transactions. A workload's writes never span a conflict boundary unguarded: a
    // workload too big for one transaction is split, each part with the workload's guard.
    let mut txns: Vec<(Vec<Compare>, Vec<Op>, u64)> = Vec::new();
    let mut current: (Vec<Compare>, Vec<Op>, u64) = (vec![fence.clone()], Vec::new(), 0);
    for work in works {
        let full = current.1.len() + work.ops.len() > MAX_TXN_OPS
            || current.0.len() + work.guard.len() > MAX_TXN_OPS;
        if full && !current.1.is_empty() {
            txns.push(std::mem::replace(
                &mut current,
                (vec![fence.clone()], Vec::new(), 0),
            ));
        }
        if work.ops.len() <= MAX_TXN_OPS && work.guard.len() < MAX_TXN_OPS {
            current.0.extend(work.guard);
            current.1.extend(work.ops);
            current.2 += work.placed;
            continue;
        }
        let mut ops = work.ops.into_iter().peekable();
        let mut first = true;
        while ops.peek().is_some() {
            let chunk: Vec<Op> = ops.by_ref().take(MAX_TXN_OPS).collect();
            let mut guard = work.guard.clone();
            guard.truncate(MAX_TXN_OPS - 1);
            guard.push(fence.clone());
            txns.push((guard, chunk, if first { work.placed } else { 0 }));
            first = false;
        }
    }
    if !current.1.is_empty() {
        txns.push(current);
    }
    let mut results =
        futures::stream::iter(txns.into_iter().map(|(guard, ops, placed)| async move {
            (
                store.txn(guard.clone(), ops, Vec::new()).await,
                guard.len(),
                placed,
            )
        }))
        .buffer_unordered(TXN_CONCURRENCY);
    while let Some((result, guard, placed)) = results.next().await {
        match result {
            Ok(r) if r.succeeded => {
                outcome.placed += placed;
                outcome.revision = outcome.revision.max(r.revision);
            }
            Ok(r) => {
                outcome.revision = outcome.revision.max(r.revision);
                outcome.conflicts += 1;
                if !fence_holds(store, fence).await {
                    outcome.deposed = true;
                }
                debug!(
                    compares = guard,
                    "controller write conflicted; will look again"
                );
            }
            Err(err) => {
                outcome.conflicts += 1;
                warn!(?err, "controller write failed; will look again");
            }
        }
    }
    outcome
}

async fn fence_holds(store: &dyn Store, fence: &Compare) -> bool {
    match store.get(fence.key()).await {
        Ok(current) => fence.holds(current.as_ref()),
        // Unknown: keep going; the next write tells.
        Err(_) => true,
    }
}

/// Builds each workload's writes from one view, placing against one working cluster so that
/// later workloads of the pass see the earlier ones' placements.
struct Planner<'a> {
    view: &'a View,
    tracker: &'a nodes::Tracker,
    config: &'a Config,
    /// Built on the first placement of the pass.
    snapshot: &'a OnceCell<Snapshot>,
    cluster: Option<Cluster<'a>>,
    pending: usize,
    /// When each workload's status was last written.
    status_written: &'a HashMap<String, Instant>,
    /// Workloads whose status write was put off.
    deferred: Vec<String>,
    /// Workloads whose status this pass writes.
    written: Vec<String>,
}

impl<'a> Planner<'a> {
    fn new(
        view: &'a View,
        tracker: &'a nodes::Tracker,
        config: &'a Config,
        snapshot: &'a OnceCell<Snapshot>,
        status_written: &'a HashMap<String, Instant>,
    ) -> Self {
        Planner {
            view,
            tracker,
            config,
            snapshot,
            cluster: None,
            pending: 0,
            status_written,
            deferred: Vec::new(),
            written: Vec::new(),
        }
    }

    fn workload(&mut self, name: &str, now: Timestamp) -> Option<Work> {
        let view = self.view;
        let Some(record) = view.workloads.get(name) else {
            return self.orphans(name, now);
        };
        self.controlled(name, record.mod_revision, &record.value, now)
    }

    /// Instances whose workload was deleted: stop them, then remove them once stopped.
    fn orphans(&mut self, name: &str, now: Timestamp) -> Option<Work> {
        let instances = self.view.instances.get(name)?;
        let mut ops = Vec::new();
        let mut guard = Vec::new();
        for (id, rec) in instances {
            let observed = self.observe(&rec.value, true);
            if observed.gone() {
                ops.push(Op::delete(keys::instance(name, id)));
                ops.push(Op::delete(keys::status(name, id)));
            } else if !rec.value.stopping() {
                let mut stopped = rec.value.clone();
                stopped.stop_requested_at = Some(now);
                guard.push(Compare::mod_revision(
                    keys::instance(name, id),
                    rec.mod_revision,
                ));
                ops.push(Op::put(keys::instance(name, id), model::encode(&stopped)));
            }
        }
        // Guard on the workload key still being absent: a re-created workload adopts nothing,
        // but must not race with this cleanup's view of it.
        guard.push(Compare::absent(keys::workload(name)));
        (!ops.is_empty()).then_some(Work {
            guard,
            ops,
            placed: 0,
        })
    }

    fn observe(&self, rec: &InstanceRecord, current: bool) -> service::Observed {
        let view = self.view;
        let node = rec.node.as_deref();
        let status = view.statuses.get(&rec.id);
        service::Observed {
            id: rec.id.clone(),
            current,
            placed: node.is_some(),
            stopping: rec.stopping(),
            draining: node
                .and_then(|n| view.nodes.get(n))
                .is_some_and(|n| n.value.draining),
            lost: node.is_some_and(|n| self.tracker.is_lost(n) || !view.nodes.contains_key(n)),
            node_live: node.is_some_and(|n| view.is_live(n)),
            state: status
                .filter(|s| s.generation == rec.generation)
                .map_or(InstanceState::Pending, |s| s.state),
            exit_code: status
                .filter(|s| s.generation == rec.generation)
                .and_then(|s| s.exit_code),
            restart_count: status.map_or(0, |s| s.restart_count),
            created_at: rec.created_at,
        }
    }

    fn controlled(
        &mut self,
        name: &str,
        mod_revision: Revision,
        record: &WorkloadRecord,
        now: Timestamp,
    ) -> Option<Work> {
        let view = self.view;
        let spec = &record.spec;
        let template = template_of(spec);
        let mut equivalent: HashMap<u64, bool> = HashMap::new();
        let empty = Default::default();
        let instances = view.instances.get(name).unwrap_or(&empty);
        let observed: Vec<service::Observed> = instances
            .values()
            .map(|rec| {
                let generation = rec.value.generation;
                let current = *equivalent.entry(generation).or_insert_with(|| {
                    generation == record.generation
                        || view
                            .revision_of(name, generation)
                            .is_some_and(|r| template_of(&r.spec) == template)
                });
                self.observe(&rec.value, current)
            })
            .collect();
        let strategy = spec.update_strategy();
        let previous_status = view.workload_status.get(name).map(|s| &s.value);
        let previous = previous_status.cloned().unwrap_or_default();
        let decision = match spec.mode() {
            Mode::Service { replicas } => {
                let desired = service::Desired {
                    generation: record.generation,
                    replicas,
                    max_surge: strategy.max_surge,
                    max_unavailable: strategy.max_unavailable,
                    auto_rollback: strategy.auto_rollback,
                    progress_deadline: strategy.progress_deadline.into(),
                    updated_at: record.updated_at,
                };
                service::reconcile(&desired, &observed, &previous, now)
            }
            Mode::Job {
                completions,
                parallelism,
                backoff_limit,
            } => {
                let desired = job::Desired {
                    generation: record.generation,
                    completions,
                    parallelism,
                    backoff_limit,
                };
                job::reconcile(&desired, &observed, &previous, now)
            }
            Mode::Daemon => {
                let desired = daemon::Desired {
                    generation: record.generation,
                    eligible: view
                        .nodes
                        .values()
                        .filter(|n| spec.placement.matches(&n.value.labels))
                        .map(|n| n.value.name.clone())
                        .collect(),
                    max_unavailable: strategy.max_unavailable,
                };
                let pairs: Vec<(Option<String>, service::Observed)> = instances
                    .values()
                    .map(|r| r.value.node.clone())
                    .zip(observed)
                    .collect();
                daemon::reconcile(&desired, &pairs, &previous, now)
            }
        };

        let mut ops = Vec::new();
        let mut placed = 0;
        let mut guard = vec![Compare::mod_revision(keys::workload(name), mod_revision)];
        for action in decision.actions {
            match action {
                service::Action::Remove(ids) => {
                    for id in ids {
                        ops.push(Op::delete(keys::instance(name, &id)));
                        ops.push(Op::delete(keys::status(name, &id)));
                    }
                }
                service::Action::Stop(ids) => {
                    for id in ids {
                        if let Some(rec) = instances.get(&id) {
                            let mut stopped = rec.value.clone();
                            stopped.stop_requested_at = Some(now);
                            ops.push(Op::put(keys::instance(name, &id), model::encode(&stopped)));
                        }
                    }
                }
                service::Action::Place(ids) => {
                    let plan = self.place(name, spec, ids.clone());
                    let outcomes = Outcomes::of(&plan);
                    for id in ids {
                        let Some(rec) = instances.get(&id) else {
                            continue;
                        };
                        let mut updated = rec.value.clone();
                        outcomes.apply(&mut updated, now);
                        if updated != rec.value {
                            if updated.node.is_some() {
                                placed += 1;
                            }
                            guard.push(Compare::mod_revision(
                                keys::instance(name, &id),
                                rec.mod_revision,
                            ));
                            ops.push(Op::put(keys::instance(name, &id), model::encode(&updated)));
                        }
                    }
                    self.evict(&plan, now, &mut guard, &mut ops);
                }
                service::Action::Create(count) => {
                    let ids: Vec<String> = (0..count)
                        .map(|n| instance_id(name, view.revision, n))
                        .collect();
                    let plan = self.place(name, spec, ids.clone());
                    let outcomes = Outcomes::of(&plan);
                    for id in ids {
                        let mut rec = InstanceRecord {
                            id: id.clone(),
                            workload: name.to_owned(),
                            generation: record.generation,
                            node: None,
                            created_at: now,
                            scheduled_at: None,
                            placement_failures: Vec::new(),
                            stop_requested_at: None,
                        };
                        outcomes.apply(&mut rec, now);
                        if rec.node.is_some() {
                            placed += 1;
                        }
                        ops.push(Op::put(keys::instance(name, &id), model::encode(&rec)));
                    }
                    self.evict(&plan, now, &mut guard, &mut ops);
                }
                service::Action::CreateOn(nodes) => {
                    for (n, node) in nodes.into_iter().enumerate() {
                        let id = instance_id(name, view.revision, n as u32);
                        let rec = InstanceRecord {
                            id: id.clone(),
                            workload: name.to_owned(),
                            generation: record.generation,
                            node: Some(node),
                            created_at: now,
                            scheduled_at: Some(now),
                            placement_failures: Vec::new(),
                            stop_requested_at: None,
                        };
                        placed += 1;
                        ops.push(Op::put(keys::instance(name, &id), model::encode(&rec)));
                    }
                }
                service::Action::Rollback { to, reason } => {
                    if let Some(target) = view.revision_of(name, to) {
                        info!(workload = name, to, %reason, "rolling back");
                        rollback_ops(name, record, target, &reason, now, view, &mut ops);
                        ops.push(notice(
                            view.revision,
                            "workload",
                            name,
                            true,
                            "RolledBack",
                            &reason,
                            now,
                        ));
                    }
                }
            }
        }
        let unplaced = decision.status.counts.unplaced;
        self.pending += unplaced as usize;
        if previous_status != Some(&decision.status) {
            // A status that only moved its counts waits a little when nothing else is written
            // for the workload, so a rollout of many instances costs a few status writes, not
            // one per instance report. Anything else goes with the workload's other writes.
            let minor = previous_status.is_some_and(|p| same_shape(p, &decision.status));
            let recent = self
                .status_written
                .get(name)
                .is_some_and(|t| t.elapsed() < STATUS_MIN_INTERVAL);
            if minor && recent && ops.is_empty() {
                self.deferred.push(name.to_owned());
            } else {
                ops.push(Op::put(
                    keys::workload_status(name),
                    model::encode(&decision.status),
                ));
                self.written.push(name.to_owned());
            }
        }
        if ops.is_empty() {
            return None;
        }
        guard.dedup();
        Some(Work { guard, ops, placed })
    }

    /// Preempted instances of other workloads are asked to stop.
    fn evict(
        &self,
        plan: &placement::Plan,
        now: Timestamp,
        guard: &mut Vec<Compare>,
        ops: &mut Vec<Op>,
    ) {
        for eviction in &plan.evictions {
            let Some(rec) = self.view.instance(&eviction.workload, &eviction.instance) else {
                continue;
            };
            let key = keys::instance(&eviction.workload, &eviction.instance);
            let mut stopped = rec.value.clone();
            stopped.stop_requested_at = Some(now);
            guard.push(Compare::mod_revision(key.clone(), rec.mod_revision));
            ops.push(Op::put(key, model::encode(&stopped)));
        }
    }

    fn place(&mut self, name: &str, spec: &Workload, ids: Vec<String>) -> placement::Plan {
        let view = self.view;
        let cells = self.snapshot;
        let cluster = self
            .cluster
            .get_or_insert_with(|| Cluster::new(cells.get_or_init(|| snapshot(view))));
        cluster.place(&request_for(name, spec, ids), &self.config.placement)
    }
}

/// Whether two statuses differ at most in counts and messages.
fn same_shape(a: &model::WorkloadStatus, b: &model::WorkloadStatus) -> bool {
    a.observed_generation == b.observed_generation
        && a.last_good_generation == b.last_good_generation
        && a.conditions.len() == b.conditions.len()
        && a.conditions
            .iter()
            .zip(&b.conditions)
            .all(|(x, y)| x.kind == y.kind && x.status == y.status && x.reason == y.reason)
}

/// The spec without what may change without replacing instances (`replicas`).
fn template_of(spec: &Workload) -> Workload {
    Workload {
        replicas: None,
        ..spec.clone()
    }
}

/// A new instance id: the workload name, the view revision it was planned at (in hex) and its
/// number in the batch, so ids are never reused (revisions only grow and a plan is re-made
/// only after the view has moved past its own writes).
fn instance_id(workload: &str, revision: Revision, n: u32) -> String {
    format!("{workload}-{revision:x}{n:05x}")
}

/// A plan's outcome by instance id: a large scale-up looks each instance up once, not by a
/// scan of the plan.
struct Outcomes<'p> {
    placed: HashMap<&'p str, &'p str>,
    unplaced: HashMap<&'p str, &'p placement::Unplaced>,
}

impl<'p> Outcomes<'p> {
    fn of(plan: &'p placement::Plan) -> Self {
        Outcomes {
            placed: plan
                .assignments
                .iter()
                .map(|a| (a.instance.as_str(), a.node.as_str()))
                .collect(),
            unplaced: plan
                .unplaced
                .iter()
                .map(|u| (u.instance.as_str(), u))
                .collect(),
        }
    }

    /// Records the outcome for one instance on its record.
    fn apply(&self, rec: &mut InstanceRecord, now: Timestamp) {
        if let Some(node) = self.placed.get(rec.id.as_str()) {
            rec.node = Some((*node).to_owned());
            rec.scheduled_at = Some(now);
            rec.placement_failures.clear();
        } else if let Some(u) = self.unplaced.get(rec.id.as_str()) {
            rec.placement_failures = if u.reasons.is_empty() {
                vec!["no nodes are registered".to_owned()]
            } else {
                u.reasons
                    .iter()
                    .take(KEPT_FAILURES)
                    .map(|r| format!("{}: {}", r.node, r.reason))
                    .collect()
            };
        }
    }
}

/// Writes generation `record.generation + 1` with `target`'s spec (keeping the current
/// replicas), and trims old revisions.
fn rollback_ops(
    name: &str,
    record: &WorkloadRecord,
    target: &RevisionRecord,
    reason: &str,
    now: Timestamp,
    view: &View,
    ops: &mut Vec<Op>,
) {
    let generation = record.generation + 1;
    let spec = Workload {
        replicas: record.spec.replicas,
        ..target.spec.clone()
    };
    let new = WorkloadRecord {
        spec: spec.clone(),
        generation,
        created_at: record.created_at,
        updated_at: now,
    };
    ops.push(Op::put(keys::workload(name), model::encode(&new)));
    ops.push(Op::put(
        keys::revision(name, generation),
        model::encode(&RevisionRecord {
            generation,
            spec,
            created_at: now,
            cause: format!("auto-rollback to {}: {reason}", target.generation),
        }),
    ));
    let kept: Vec<u64> = view
        .revisions
        .range((name.to_owned(), 0)..=(name.to_owned(), u64::MAX))
        .map(|((_, g), _)| *g)
        .collect();
    let excess = (kept.len() + 1).saturating_sub(model::KEPT_REVISIONS);
    for g in kept.into_iter().take(excess) {
        ops.push(Op::delete(keys::revision(name, g)));
    }
}

/// A notice write.
fn notice(
    after: Revision,
    kind: &str,
    name: &str,
    warning: bool,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> Op {
    Op::put(
        keys::notice(after, name),
        model::encode(&NoticeRecord {
            kind: kind.to_owned(),
            name: name.to_owned(),
            workload: if kind == "workload" {
                name.to_owned()
            } else {
                String::new()
            },
            warning,
            reason: reason.to_owned(),
            message: message.to_owned(),
            source: if kind == "node" {
                "node-controller"
            } else {
                "service-controller"
            }
            .to_owned(),
            time: now,
        }),
    )
}

/// What placement reserves for one instance of `spec`.
fn resources_of(spec: &Workload) -> Resources {
    Resources {
        cpu_millis: spec.resources.cpu.map_or(0, |c| c.millis()),
        memory_bytes: spec.resources.memory.map_or(0, |m| m.get()),
        pids: spec.resources.pids.map_or(0, u64::from),
    }
}

fn host_ports_of(spec: &Workload) -> Vec<HostPort> {
    spec.ports
        .iter()
        .filter_map(|p| {
            Some(HostPort {
                port: u16::try_from(p.host?).ok()?,
                protocol: p.protocol,
            })
        })
        .collect()
}

/// The placement request for `ids` of workload `name`.
fn request_for(name: &str, spec: &Workload, ids: Vec<String>) -> Request {
    let node_selector = gantry::selector::Selector::new(
        spec.placement
            .node_selector
            .iter()
            .map(|(k, v)| gantry::selector::Requirement {
                key: k.clone(),
                op: gantry::selector::Operator::Equals,
                values: vec![v.clone()],
            })
            .collect(),
    );
    Request {
        workload: name.to_owned(),
        instances: ids,
        resources: resources_of(spec),
        host_ports: host_ports_of(spec),
        node_selector,
        constraints: spec.placement.constraints.clone(),
        spread_label: spec.placement.spread.clone(),
        anti_affinity: spec.placement.anti_affinity,
        priority: spec.priority,
    }
}

/// The placement snapshot of a view: every node with the instances assigned to it (stopping
/// ones included: they hold their resources until they are gone).
pub fn snapshot(view: &View) -> Snapshot {
    let mut specs: HashMap<(&str, u64), (Resources, Vec<HostPort>, i32)> = HashMap::new();
    let nodes = view
        .nodes
        .values()
        .map(|node| {
            let node = &node.value;
            let instances = view
                .by_node
                .get(&node.name)
                .into_iter()
                .flatten()
                .filter_map(|(workload, id)| {
                    let rec = &view.instance(workload, id)?.value;
                    let (resources, host_ports, priority) = specs
                        .entry((workload.as_str(), rec.generation))
                        .or_insert_with(|| {
                            let spec = view
                                .revision_of(workload, rec.generation)
                                .map(|r| &r.spec)
                                .or_else(|| view.workloads.get(workload).map(|w| &w.value.spec));
                            spec.map_or((Resources::ZERO, Vec::new(), 0), |s| {
                                (resources_of(s), host_ports_of(s), s.priority)
                            })
                        })
                        .clone();
                    Some(Placed {
                        id: id.clone(),
                        workload: workload.clone(),
                        priority,
                        resources,
                        host_ports,
                    })
                })
                .collect();
            placement::Node {
                name: node.name.clone(),
                labels: node.labels.clone(),
                ready: view.is_live(&node.name),
                cordoned: node.cordoned || node.draining,
                capacity: node.allocatable,
                instances,
            }
        })
        .collect();
    Snapshot { nodes }
}
