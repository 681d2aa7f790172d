//! The shape of `-o json` and `-o yaml`: documents built from the API's messages, stable for
//! scripts. Keys are camelCase; every key is always present (`null` when there is no value),
//! times are RFC 3339 in UTC, enums are words (`Ready`, `True`, `Service`). A list is
//! `{"kind": "WorkloadList", "revision": N, "items": […]}`, where `revision` is the store
//! revision the list was read at (watch from `revision + 1`). A workload's `spec` is the spec as
//! written in a workload file (`gantry apply -f` takes it back).
//!
//! ```text
//! Workload  {kind: "Workload", name, workloadKind, generation, revision, createdAt, updatedAt,
//!            spec, status: {observedGeneration, lastGoodGeneration,
//!            instances: {desired, current, updated, ready, unplaced, succeeded, failed},
//!            conditions: [{type, status, reason, message, lastTransitionTime}]} | null}
//! Instance  {kind: "Instance", name, workload, generation, node, labels, createdAt, scheduledAt,
//!            stopRequestedAt, placementFailures: [..], state, status: {state, reason, message,
//!            exitCode, restartCount, lastExit: {exitCode, state, reason, startedAt,
//!            finishedAt} | null, pull: {bytesDone, bytesTotal, layersDone, layersTotal} | null,
//!            imageDigest, ip, startedAt, readyAt, finishedAt, observedAt} | null, revision}
//! Node      {kind: "Node", name, labels, status ("Ready" | "NotReady"), cordoned, draining,
//!            capacity, allocatable, allocated: {cpu, memory, pids}, address, os, arch, runtime,
//!            agentVersion, kernelVersion, osImage, subnet, registeredAt, instanceCount, revision}
//! Event     {kind: "Event", revision, type ("Created" | "Updated" | "Deleted" | "Notice"),
//!            time, object: {kind, name, workload}, notice: {severity, reason, message, source}
//!            | null, workload | instance | node: the object's document (object changes only)}
//! ```

use std::collections::BTreeMap;

use anyhow::Context;
use gantry::pb;
use gantry::workload::Workload;
use serde::Serialize;

use super::output::rfc3339;

/// A list of documents.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct List<T> {
    /// `WorkloadList`, `InstanceList`, `NodeList`, `EventList`, `RevisionList`.
    pub kind: &'static str,
    /// Store revision the list was read at.
    pub revision: i64,
    /// The documents.
    pub items: Vec<T>,
}

fn time(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.map(rfc3339)
}

/// A workload.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadDoc {
    /// Always `Workload`.
    pub kind: &'static str,
    /// Workload name.
    pub name: String,
    /// `Service`, `Job` or `Daemon`.
    pub workload_kind: String,
    /// Spec generation.
    pub generation: u64,
    /// Store revision of the last write (for `expected_revision`).
    pub revision: i64,
    /// Creation time.
    pub created_at: Option<String>,
    /// Time of the last spec change.
    pub updated_at: Option<String>,
    /// The spec as written in a workload file.
    pub spec: Workload,
    /// Observed state; `null` before the controllers first looked.
    pub status: Option<WorkloadStatusDoc>,
}

/// A workload's observed state.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatusDoc {
    /// Generation the controllers last acted on.
    pub observed_generation: u64,
    /// Last generation whose instances were all ready.
    pub last_good_generation: u64,
    /// Instance counts.
    pub instances: CountsDoc,
    /// Conditions.
    pub conditions: Vec<ConditionDoc>,
}

/// Instance counts of a workload.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CountsDoc {
    /// Wanted.
    pub desired: u32,
    /// Existing and not finished.
    pub current: u32,
    /// Running the current generation.
    pub updated: u32,
    /// Ready.
    pub ready: u32,
    /// Not placed on a node.
    pub unplaced: u32,
    /// Jobs: exited 0.
    pub succeeded: u32,
    /// Failures (Jobs: against the backoff limit; Services: in the current rollout).
    pub failed: u32,
}

/// A condition.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionDoc {
    /// `Available`, `Progressing`, `RolledBack`, `Complete`, `Failed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// Detail.
    pub message: String,
    /// When `status` last changed.
    pub last_transition_time: Option<String>,
}

/// The word for a condition status.
pub fn condition_status(status: i32) -> &'static str {
    match pb::ConditionStatus::try_from(status) {
        Ok(pb::ConditionStatus::True) => "True",
        Ok(pb::ConditionStatus::False) => "False",
        _ => "Unknown",
    }
}

/// The word for a workload kind.
pub fn workload_kind(kind: i32) -> &'static str {
    match pb::WorkloadKind::try_from(kind) {
        Ok(pb::WorkloadKind::Service) => "Service",
        Ok(pb::WorkloadKind::Job) => "Job",
        Ok(pb::WorkloadKind::Daemon) => "Daemon",
        _ => "Unknown",
    }
}

/// The spec of a workload from the API as the domain type (what a workload file holds).
pub fn spec_of(spec: Option<&pb::WorkloadSpec>, name: &str) -> anyhow::Result<Workload> {
    let spec = spec
        .cloned()
        .with_context(|| format!("the scheduler sent workload {name} without a spec"))?;
    Workload::try_from(spec)
        .map_err(|e| anyhow::anyhow!("the scheduler sent a spec of workload {name} that this gantry cannot read ({e}); upgrade gantry"))
}

impl WorkloadDoc {
    /// The document of a workload from the API.
    pub fn new(w: &pb::Workload) -> anyhow::Result<Self> {
        let name = w.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        let spec = spec_of(w.spec.as_ref(), &name)?;
        Ok(WorkloadDoc {
            kind: "Workload",
            workload_kind: spec.kind.to_string(),
            name,
            generation: w.generation,
            revision: w.revision,
            created_at: time(w.created_at.as_ref()),
            updated_at: time(w.updated_at.as_ref()),
            spec,
            status: w.status.as_ref().map(|s| WorkloadStatusDoc {
                observed_generation: s.observed_generation,
                last_good_generation: s.last_good_generation,
                instances: s.instances.map(counts).unwrap_or_default(),
                conditions: s.conditions.iter().map(condition).collect(),
            }),
        })
    }
}

fn counts(c: pb::InstanceCounts) -> CountsDoc {
    let pb::InstanceCounts {
        desired,
        current,
        updated,
        ready,
        unplaced,
        succeeded,
        failed,
    } = c;
    CountsDoc {
        desired,
        current,
        updated,
        ready,
        unplaced,
        succeeded,
        failed,
    }
}

/// The document of a condition.
pub fn condition(c: &pb::Condition) -> ConditionDoc {
    ConditionDoc {
        kind: c.r#type.clone(),
        status: condition_status(c.status),
        reason: c.reason.clone(),
        message: c.message.clone(),
        last_transition_time: time(c.last_transition_time.as_ref()),
    }
}

/// An instance.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceDoc {
    /// Always `Instance`.
    pub kind: &'static str,
    /// Instance id.
    pub name: String,
    /// Its workload.
    pub workload: String,
    /// The workload generation it runs.
    pub generation: u64,
    /// Its node; `null` while unplaced.
    pub node: Option<String>,
    /// Labels (from the workload).
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: Option<String>,
    /// When it was placed.
    pub scheduled_at: Option<String>,
    /// When it was asked to stop.
    pub stop_requested_at: Option<String>,
    /// While unplaced: why each node was rejected.
    pub placement_failures: Vec<String>,
    /// Its state as one word (`Pending`, `Running`, `Ready`, `Exited`, …).
    pub state: &'static str,
    /// Observed state reported by the agent; `null` before the first report.
    pub status: Option<InstanceStatusDoc>,
    /// Store revision of the last write.
    pub revision: i64,
}

/// An instance's observed state.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatusDoc {
    /// State.
    pub state: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// Detail.
    pub message: String,
    /// Exit code of the last exit.
    pub exit_code: Option<i32>,
    /// Restarts on its node.
    pub restart_count: u32,
    /// How the previous run ended; `null` before the first restart.
    pub last_exit: Option<LastExitDoc>,
    /// Image pull progress (kept after the pull with the final numbers); `null` when the
    /// image was already on the node.
    pub pull: Option<PullDoc>,
    /// Resolved image digest; `null` before the image is resolved.
    pub image_digest: Option<String>,
    /// Container IP address; `null` when it has none.
    pub ip: Option<String>,
    /// When the process last started.
    pub started_at: Option<String>,
    /// When it last became ready.
    pub ready_at: Option<String>,
    /// When the process last finished.
    pub finished_at: Option<String>,
    /// When the agent observed this status.
    pub observed_at: Option<String>,
}

/// How the previous run of a restarted instance ended.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastExitDoc {
    /// Exit status; 128+N when killed by signal N.
    pub exit_code: i32,
    /// `Exited`, `OOMKilled` or `Failed`.
    pub state: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// When that run started.
    pub started_at: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
}

/// Image pull progress, summed over layers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PullDoc {
    /// Compressed bytes downloaded.
    pub bytes_done: u64,
    /// Compressed bytes to download; 0 while the manifest is not known.
    pub bytes_total: u64,
    /// Layers downloaded and verified.
    pub layers_done: u32,
    /// Layers in the image.
    pub layers_total: u32,
}

/// The word for an instance state.
pub fn instance_state(state: i32) -> &'static str {
    match pb::InstanceState::try_from(state) {
        Ok(pb::InstanceState::Pending) => "Pending",
        Ok(pb::InstanceState::Pulling) => "Pulling",
        Ok(pb::InstanceState::Starting) => "Starting",
        Ok(pb::InstanceState::Running) => "Running",
        Ok(pb::InstanceState::Ready) => "Ready",
        Ok(pb::InstanceState::Exited) => "Exited",
        Ok(pb::InstanceState::OomKilled) => "OOMKilled",
        Ok(pb::InstanceState::Failed) => "Failed",
        _ => "Unknown",
    }
}

/// The state of an instance: its reported state, or `Pending` before any report.
pub fn state_of(i: &pb::Instance) -> &'static str {
    i.status
        .as_ref()
        .map_or("Pending", |s| instance_state(s.state))
}

fn sorted(map: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl InstanceDoc {
    /// The document of an instance from the API.
    pub fn new(i: &pb::Instance) -> Self {
        InstanceDoc {
            kind: "Instance",
            name: i.id.clone(),
            workload: i.workload.clone(),
            generation: i.generation,
            node: non_empty(&i.node),
            labels: sorted(&i.labels),
            created_at: time(i.created_at.as_ref()),
            scheduled_at: time(i.scheduled_at.as_ref()),
            stop_requested_at: time(i.stop_requested_at.as_ref()),
            placement_failures: i.placement_failures.clone(),
            state: state_of(i),
            status: i.status.as_ref().map(|s| InstanceStatusDoc {
                state: instance_state(s.state),
                reason: s.reason.clone(),
                message: s.message.clone(),
                exit_code: s.exit_code,
                restart_count: s.restart_count,
                last_exit: s.last_exit.as_ref().map(|l| LastExitDoc {
                    exit_code: l.exit_code,
                    state: instance_state(l.state),
                    reason: l.reason.clone(),
                    started_at: time(l.started_at.as_ref()),
                    finished_at: time(l.finished_at.as_ref()),
                }),
                pull: s.pull.as_ref().map(|p| PullDoc {
                    bytes_done: p.bytes_done,
                    bytes_total: p.bytes_total,
                    layers_done: p.layers_done,
                    layers_total: p.layers_total,
                }),
                image_digest: non_empty(&s.image_digest),
                ip: non_empty(&s.ip),
                started_at: time(s.started_at.as_ref()),
                ready_at: time(s.ready_at.as_ref()),
                finished_at: time(s.finished_at.as_ref()),
                observed_at: time(s.observed_at.as_ref()),
            }),
            revision: i.revision,
        }
    }
}

/// A node.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDoc {
    /// Always `Node`.
    pub kind: &'static str,
    /// Node name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `Ready` or `NotReady`.
    pub status: &'static str,
    /// No new instances are placed on it.
    pub cordoned: bool,
    /// Instances are being moved off it.
    pub draining: bool,
    /// The machine's resources.
    pub capacity: ResourcesDoc,
    /// What placement may use.
    pub allocatable: ResourcesDoc,
    /// What the instances placed on it reserve.
    pub allocated: ResourcesDoc,
    /// Address.
    pub address: String,
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Container runtime.
    pub runtime: String,
    /// gantry-agent version.
    pub agent_version: String,
    /// Kernel release.
    pub kernel_version: String,
    /// OS image.
    pub os_image: String,
    /// Instance subnet; `null` before one is allocated.
    pub subnet: Option<String>,
    /// First registration.
    pub registered_at: Option<String>,
    /// Instances placed on it.
    pub instance_count: u32,
    /// Store revision of the last write.
    pub revision: i64,
}

/// Resource amounts as quantities.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesDoc {
    /// CPU (`500m`, `4`).
    pub cpu: Option<String>,
    /// Memory (`64Mi`).
    pub memory: Option<String>,
    /// Processes.
    pub pids: Option<u32>,
}

fn resources(r: Option<&pb::Resources>) -> ResourcesDoc {
    r.map(|r| ResourcesDoc {
        cpu: r.cpu.clone(),
        memory: r.memory.clone(),
        pids: r.pids,
    })
    .unwrap_or_default()
}

/// Whether a node's session is live.
pub fn node_ready(n: &pb::Node) -> bool {
    n.readiness == pb::NodeReadiness::Ready as i32
}

impl NodeDoc {
    /// The document of a node from the API.
    pub fn new(n: &pb::Node) -> Self {
        NodeDoc {
            kind: "Node",
            name: n.name.clone(),
            labels: sorted(&n.labels),
            status: if node_ready(n) { "Ready" } else { "NotReady" },
            cordoned: n.cordoned,
            draining: n.draining,
            capacity: resources(n.capacity.as_ref()),
            allocatable: resources(n.allocatable.as_ref()),
            allocated: resources(n.allocated.as_ref()),
            address: n.address.clone(),
            os: n.os.clone(),
            arch: n.arch.clone(),
            runtime: n.runtime.clone(),
            agent_version: n.agent_version.clone(),
            kernel_version: n.kernel_version.clone(),
            os_image: n.os_image.clone(),
            subnet: non_empty(&n.subnet),
            registered_at: time(n.registered_at.as_ref()),
            instance_count: n.instance_count,
            revision: n.revision,
        }
    }
}

/// An event of the Events stream.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventDoc {
    /// Always `Event`.
    pub kind: &'static str,
    /// Store revision it was written at.
    pub revision: i64,
    /// `Created`, `Updated`, `Deleted` or `Notice`.
    #[serde(rename = "type")]
    pub event_type: &'static str,
    /// When the scheduler wrote it.
    pub time: Option<String>,
    /// What it is about.
    pub object: ObjectRef,
    /// The notice, for `Notice` events.
    pub notice: Option<NoticeDoc>,
    /// The workload, for changes of a workload.
    pub workload: Option<WorkloadDoc>,
    /// The instance, for changes of an instance.
    pub instance: Option<InstanceDoc>,
    /// The node, for changes of a node.
    pub node: Option<NodeDoc>,
}

/// What an event is about.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    /// `workload`, `instance` or `node`.
    pub kind: &'static str,
    /// Name (an id for instances).
    pub name: String,
    /// The workload involved; `null` for nodes.
    pub workload: Option<String>,
}

/// A notice.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NoticeDoc {
    /// `Normal` or `Warning`.
    pub severity: &'static str,
    /// CamelCase reason.
    pub reason: String,
    /// Detail.
    pub message: String,
    /// Which component wrote it.
    pub source: String,
}

/// The word for an event type.
pub fn event_type(t: i32) -> &'static str {
    match pb::EventType::try_from(t) {
        Ok(pb::EventType::Created) => "Created",
        Ok(pb::EventType::Updated) => "Updated",
        Ok(pb::EventType::Deleted) => "Deleted",
        Ok(pb::EventType::Notice) => "Notice",
        Ok(pb::EventType::Bookmark) => "Bookmark",
        _ => "Unknown",
    }
}

/// The word for an object kind.
pub fn object_kind(k: i32) -> &'static str {
    match pb::ObjectKind::try_from(k) {
        Ok(pb::ObjectKind::Workload) => "workload",
        Ok(pb::ObjectKind::Instance) => "instance",
        Ok(pb::ObjectKind::Node) => "node",
        _ => "unknown",
    }
}

/// What an event is about: kind, name and workload.
pub fn object_of(e: &pb::Event) -> ObjectRef {
    use pb::event::Object;
    if let Some(n) = &e.notice {
        return ObjectRef {
            kind: object_kind(n.kind),
            name: n.name.clone(),
            workload: non_empty(&n.workload),
        };
    }
    match &e.object {
        Some(Object::Workload(w)) => {
            let name = w.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
            ObjectRef {
                kind: "workload",
                workload: Some(name.clone()),
                name,
            }
        }
        Some(Object::Instance(i)) => ObjectRef {
            kind: "instance",
            name: i.id.clone(),
            workload: non_empty(&i.workload),
        },
        Some(Object::Node(n)) => ObjectRef {
            kind: "node",
            name: n.name.clone(),
            workload: None,
        },
        None => ObjectRef {
            kind: "unknown",
            name: String::new(),
            workload: None,
        },
    }
}

/// Whether a notice is a warning.
pub fn is_warning(n: &pb::Notice) -> bool {
    n.severity == pb::Severity::Warning as i32
}

impl EventDoc {
    /// The document of an event from the API.
    pub fn new(e: &pb::Event) -> anyhow::Result<Self> {
        use pb::event::Object;
        let (workload, instance, node) = match &e.object {
            Some(Object::Workload(w)) => (Some(WorkloadDoc::new(w)?), None, None),
            Some(Object::Instance(i)) => (None, Some(InstanceDoc::new(i)), None),
            Some(Object::Node(n)) => (None, None, Some(NodeDoc::new(n))),
            None => (None, None, None),
        };
        Ok(EventDoc {
            kind: "Event",
            revision: e.revision,
            event_type: event_type(e.r#type),
            time: time(e.time.as_ref()),
            object: object_of(e),
            notice: e.notice.as_ref().map(|n| NoticeDoc {
                severity: if is_warning(n) { "Warning" } else { "Normal" },
                reason: n.reason.clone(),
                message: n.message.clone(),
                source: n.source.clone(),
            }),
            workload,
            instance,
            node,
        })
    }
}

/// A kept revision of a workload.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionDoc {
    /// The generation.
    pub generation: u64,
    /// What made it.
    pub cause: String,
    /// When it was written.
    pub created_at: Option<String>,
    /// Its spec.
    pub spec: Workload,
}

impl RevisionDoc {
    /// The document of a kept revision of workload `name`.
    pub fn new(r: &pb::WorkloadRevision, name: &str) -> anyhow::Result<Self> {
        Ok(RevisionDoc {
            generation: r.generation,
            cause: r.cause.clone(),
            created_at: time(r.created_at.as_ref()),
            spec: spec_of(r.spec.as_ref(), name)?,
        })
    }
}
