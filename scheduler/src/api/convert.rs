//! The scheduler's one conversion module between the store's records (and the use cases'
//! views of them) and the wire types of `gantry.v1`.
//!
//! Records → proto cannot fail. Proto → domain destructures every message exhaustively, so
//! that a field added to the proto breaks the build here until it is handled, and reports
//! problems as [`ops::Error::InvalidArgument`] with the field's path. Workload specs go
//! through the root crate's conversion (`gantry::convert`), which also validates them.

use std::collections::HashMap;

use gantry::pb;
use gantry::quantity::{Bytes, Cpu};
use gantry::workload::{FieldError, Kind, Workload};

use crate::model::{
    self, Condition, InstanceCounts, InstanceState, NoticeRecord, RevisionRecord, Timestamp,
    WorkloadStatus,
};
use crate::ops::{
    self, ApplyOutcome, Change, ChangeKind, FieldChange, InstanceView, NodeView, Object,
    ObjectKind, PageRequest, WorkloadView,
};
use crate::placement::Resources;

fn timestamp(t: Timestamp) -> Option<prost_types::Timestamp> {
    Some(t.into())
}

fn labels(map: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

// ---------------------------------------------------------------------------------------
// Records → proto

impl From<&WorkloadView> for pb::Workload {
    fn from(view: &WorkloadView) -> Self {
        let record = &view.record;
        pb::Workload {
            spec: Some(pb::WorkloadSpec::from(&record.spec)),
            generation: record.generation,
            revision: view.revision,
            created_at: timestamp(record.created_at),
            updated_at: timestamp(record.updated_at),
            status: view.status.as_ref().map(pb::WorkloadStatus::from),
        }
    }
}

impl From<&WorkloadStatus> for pb::WorkloadStatus {
    fn from(status: &WorkloadStatus) -> Self {
        pb::WorkloadStatus {
            observed_generation: status.observed_generation,
            conditions: status.conditions.iter().map(pb::Condition::from).collect(),
            instances: Some(status.counts.into()),
            last_good_generation: status.last_good_generation,
        }
    }
}

impl From<&Condition> for pb::Condition {
    fn from(c: &Condition) -> Self {
        let status = if c.status {
            pb::ConditionStatus::True
        } else {
            pb::ConditionStatus::False
        };
        pb::Condition {
            r#type: c.kind.clone(),
            status: status.into(),
            reason: c.reason.clone(),
            message: c.message.clone(),
            last_transition_time: timestamp(c.last_transition),
        }
    }
}

impl From<InstanceCounts> for pb::InstanceCounts {
    fn from(c: InstanceCounts) -> Self {
        pb::InstanceCounts {
            desired: c.desired,
            current: c.current,
            updated: c.updated,
            ready: c.ready,
            unplaced: c.unplaced,
            succeeded: c.succeeded,
            failed: c.failed,
        }
    }
}

impl From<&InstanceView> for pb::Instance {
    fn from(view: &InstanceView) -> Self {
        let r = &view.record;
        pb::Instance {
            id: r.id.clone(),
            workload: r.workload.clone(),
            generation: r.generation,
            node: r.node.clone().unwrap_or_default(),
            labels: labels(&view.labels),
            created_at: timestamp(r.created_at),
            scheduled_at: r.scheduled_at.and_then(timestamp),
            placement_failures: r.placement_failures.clone(),
            stop_requested_at: r.stop_requested_at.and_then(timestamp),
            status: view
                .status
                .as_ref()
                .map(|s| instance_status_to_pb(&r.id, s)),
            revision: view.revision,
        }
    }
}

/// The wire form of the status of instance `id`.
pub fn instance_status_to_pb(id: &str, s: &model::InstanceStatus) -> pb::InstanceStatus {
    pb::InstanceStatus {
        instance_id: id.to_string(),
        generation: s.generation,
        state: pb::InstanceState::from(s.state).into(),
        reason: s.reason.clone(),
        message: s.message.clone(),
        exit_code: s.exit_code,
        restart_count: s.restart_count,
        last_exit: s.last_exit.as_ref().map(|l| pb::LastExit {
            exit_code: l.exit_code,
            state: pb::InstanceState::from(l.state).into(),
            reason: l.reason.clone(),
            started_at: l.started_at.and_then(timestamp),
            finished_at: l.finished_at.and_then(timestamp),
        }),
        pull: s.pull.map(|p| pb::PullProgress {
            bytes_done: p.bytes_done,
            bytes_total: p.bytes_total,
            layers_done: p.layers_done,
            layers_total: p.layers_total,
        }),
        image_digest: s.image_digest.clone(),
        ip: s.ip.clone(),
        started_at: s.started_at.and_then(timestamp),
        ready_at: s.ready_at.and_then(timestamp),
        finished_at: s.finished_at.and_then(timestamp),
        observed_at: timestamp(s.observed_at),
    }
}

impl From<InstanceState> for pb::InstanceState {
    fn from(state: InstanceState) -> Self {
        match state {
            InstanceState::Pending => pb::InstanceState::Pending,
            InstanceState::Pulling => pb::InstanceState::Pulling,
            InstanceState::Starting => pb::InstanceState::Starting,
            InstanceState::Running => pb::InstanceState::Running,
            InstanceState::Ready => pb::InstanceState::Ready,
            InstanceState::Exited => pb::InstanceState::Exited,
            InstanceState::OomKilled => pb::InstanceState::OomKilled,
            InstanceState::Failed => pb::InstanceState::Failed,
        }
    }
}

/// The wire form of resource amounts, all three set: cpu and memory as quantities
/// (`500m`, `64Mi`).
pub fn resources_to_pb(r: Resources) -> pb::Resources {
    pb::Resources {
        cpu: Some(Cpu::from_millis(r.cpu_millis).to_string()),
        memory: Some(Bytes::new(r.memory_bytes).to_string()),
        pids: Some(u32::try_from(r.pids).unwrap_or(u32::MAX)),
    }
}

impl From<&NodeView> for pb::Node {
    fn from(view: &NodeView) -> Self {
        let r = &view.record;
        let readiness = if view.ready() {
            pb::NodeReadiness::Ready
        } else {
            pb::NodeReadiness::NotReady
        };
        pb::Node {
            name: r.name.clone(),
            labels: labels(&r.labels),
            capacity: Some(resources_to_pb(r.capacity)),
            allocatable: Some(resources_to_pb(r.allocatable)),
            allocated: Some(resources_to_pb(view.allocated)),
            address: r.address.clone(),
            os: r.os.clone(),
            arch: r.arch.clone(),
            runtime: r.runtime.clone(),
            agent_version: r.agent_version.clone(),
            kernel_version: r.kernel_version.clone(),
            os_image: r.os_image.clone(),
            readiness: readiness.into(),
            cordoned: r.cordoned,
            draining: r.draining,
            subnet: r.subnet.clone().unwrap_or_default(),
            // Heartbeats are kept in the serving scheduler's memory, not in the store.
            last_heartbeat: None,
            registered_at: timestamp(r.registered_at),
            // Known while ready (the session's start); the loss of a session is not recorded.
            readiness_changed_at: view.liveness.as_ref().and_then(|l| timestamp(l.since)),
            instance_count: view.instance_count,
            revision: view.revision,
        }
    }
}

impl From<ObjectKind> for pb::ObjectKind {
    fn from(kind: ObjectKind) -> Self {
        match kind {
            ObjectKind::Workload => pb::ObjectKind::Workload,
            ObjectKind::Instance => pb::ObjectKind::Instance,
            ObjectKind::Node => pb::ObjectKind::Node,
        }
    }
}

impl From<&NoticeRecord> for pb::Notice {
    fn from(n: &NoticeRecord) -> Self {
        let kind = match n.kind.as_str() {
            "workload" => pb::ObjectKind::Workload,
            "instance" => pb::ObjectKind::Instance,
            "node" => pb::ObjectKind::Node,
            _ => pb::ObjectKind::Unspecified,
        };
        let severity = if n.warning {
            pb::Severity::Warning
        } else {
            pb::Severity::Normal
        };
        pb::Notice {
            kind: kind.into(),
            name: n.name.clone(),
            workload: n.workload.clone(),
            severity: severity.into(),
            reason: n.reason.clone(),
            message: n.message.clone(),
            source: n.source.clone(),
        }
    }
}

impl From<&FieldChange> for pb::FieldChange {
    fn from(c: &FieldChange) -> Self {
        pb::FieldChange {
            path: c.path.clone(),
            old_value: c.old.as_ref().map(ToString::to_string),
            new_value: c.new.as_ref().map(ToString::to_string),
        }
    }
}

impl From<&RevisionRecord> for pb::WorkloadRevision {
    fn from(r: &RevisionRecord) -> Self {
        pb::WorkloadRevision {
            generation: r.generation,
            spec: Some(pb::WorkloadSpec::from(&r.spec)),
            created_at: timestamp(r.created_at),
            cause: r.cause.clone(),
        }
    }
}

impl From<&ApplyOutcome> for pb::ApplyWorkloadResponse {
    fn from(o: &ApplyOutcome) -> Self {
        pb::ApplyWorkloadResponse {
            workload: Some(pb::Workload::from(&o.workload)),
            changed: o.changed,
            created: o.created,
            diff: o.diff.clone(),
            changes: o.changes.iter().map(pb::FieldChange::from).collect(),
        }
    }
}

/// The wire form of a change of the event stream; `now` stands in for the time of changes
/// whose records do not say when they were made.
pub fn event_to_pb(change: Change, now: Timestamp) -> pb::Event {
    match change {
        Change::Object {
            revision,
            kind,
            object,
            time,
        } => {
            let event_type = match kind {
                ChangeKind::Created => pb::EventType::Created,
                ChangeKind::Updated => pb::EventType::Updated,
                ChangeKind::Deleted => pb::EventType::Deleted,
            };
            let object = match &object {
                Object::Workload(w) => pb::event::Object::Workload((&**w).into()),
                Object::Instance(i) => pb::event::Object::Instance((&**i).into()),
                Object::Node(n) => pb::event::Object::Node((&**n).into()),
            };
            pb::Event {
                revision,
                r#type: event_type.into(),
                time: timestamp(time.unwrap_or(now)),
                notice: None,
                object: Some(object),
            }
        }
        Change::Notice { revision, notice } => pb::Event {
            revision,
            r#type: pb::EventType::Notice.into(),
            time: timestamp(notice.time),
            notice: Some((&notice).into()),
            object: None,
        },
        Change::Bookmark { revision } => pb::Event {
            revision,
            r#type: pb::EventType::Bookmark.into(),
            time: timestamp(now),
            notice: None,
            object: None,
        },
    }
}

// ---------------------------------------------------------------------------------------
// Proto → domain

/// The workload a request's spec describes, valid, or every problem with its field path.
pub fn spec_from_pb(spec: Option<pb::WorkloadSpec>) -> Result<Workload, ops::Error> {
    let spec = spec.ok_or_else(|| ops::Error::invalid("spec", "is required"))?;
    Ok(Workload::try_from(spec)?)
}

/// A workload kind filter: `None` for unspecified (all kinds).
pub fn kind_filter_from_pb(path: &str, kind: i32) -> Result<Option<Kind>, ops::Error> {
    match pb::WorkloadKind::try_from(kind) {
        Ok(pb::WorkloadKind::Unspecified) => Ok(None),
        Ok(pb::WorkloadKind::Service) => Ok(Some(Kind::Service)),
        Ok(pb::WorkloadKind::Job) => Ok(Some(Kind::Job)),
        Ok(pb::WorkloadKind::Daemon) => Ok(Some(Kind::Daemon)),
        Err(_) => Err(ops::Error::invalid(
            path,
            format!("{kind} is not a workload kind"),
        )),
    }
}

/// An instance state of a request (unspecified is rejected).
pub fn state_from_pb(path: &str, state: i32) -> Result<InstanceState, ops::Error> {
    let invalid = |why: &str| ops::Error::invalid(path, format!("{state} {why}"));
    match pb::InstanceState::try_from(state) {
        Ok(known) => instance_state(known).ok_or_else(|| invalid("(unspecified) is not a state")),
        Err(_) => Err(invalid("is not an instance state")),
    }
}

/// The domain's instance state for a wire one; `None` for unspecified.
pub(crate) fn instance_state(state: pb::InstanceState) -> Option<InstanceState> {
    match state {
        pb::InstanceState::Unspecified => None,
        pb::InstanceState::Pending => Some(InstanceState::Pending),
        pb::InstanceState::Pulling => Some(InstanceState::Pulling),
        pb::InstanceState::Starting => Some(InstanceState::Starting),
        pb::InstanceState::Running => Some(InstanceState::Running),
        pb::InstanceState::Ready => Some(InstanceState::Ready),
        pb::InstanceState::Exited => Some(InstanceState::Exited),
        pb::InstanceState::OomKilled => Some(InstanceState::OomKilled),
        pb::InstanceState::Failed => Some(InstanceState::Failed),
    }
}

/// Instance states of a request, each checked with its index in the path.
pub fn states_from_pb(path: &str, states: Vec<i32>) -> Result<Vec<InstanceState>, ops::Error> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, state) in states.into_iter().enumerate() {
        match state_from_pb(&format!("{path}[{i}]"), state) {
            Ok(s) => out.push(s),
            Err(ops::Error::InvalidArgument { errors: e }) => errors.extend(e),
            Err(other) => return Err(other),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ops::Error::InvalidArgument { errors })
    }
}

/// Object kinds of a watch request.
pub fn object_kinds_from_pb(path: &str, kinds: Vec<i32>) -> Result<Vec<ObjectKind>, ops::Error> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, kind) in kinds.into_iter().enumerate() {
        match pb::ObjectKind::try_from(kind) {
            Ok(pb::ObjectKind::Workload) => out.push(ObjectKind::Workload),
            Ok(pb::ObjectKind::Instance) => out.push(ObjectKind::Instance),
            Ok(pb::ObjectKind::Node) => out.push(ObjectKind::Node),
            Ok(pb::ObjectKind::Unspecified) | Err(_) => errors.push(FieldError {
                path: format!("{path}[{i}]"),
                message: format!("{kind} is not an object kind"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(ops::Error::InvalidArgument { errors })
    }
}

/// The status an agent reported for an instance, and the instance's id.
pub fn instance_status_from_pb(
    status: pb::InstanceStatus,
) -> Result<(String, model::InstanceStatus), ops::Error> {
    instance_status_with(
        status,
        Timestamp::default(),
        || ops::Error::invalid("instance_id", "is required"),
        |state, _| state_from_pb("state", state),
    )
}

/// The status an agent reported for an instance, and the instance's id, for callers that
/// word their own errors: `missing_id` when the id is empty, else `state` converts the
/// wire state (given with the instance id). A missing `observed_at` is `observed_default`.
pub(crate) fn instance_status_with<E>(
    status: pb::InstanceStatus,
    observed_default: Timestamp,
    missing_id: impl FnOnce() -> E,
    state: impl FnOnce(i32, &str) -> Result<InstanceState, E>,
) -> Result<(String, model::InstanceStatus), E> {
    let pb::InstanceStatus {
        instance_id,
        generation,
        state: wire_state,
        reason,
        message,
        exit_code,
        restart_count,
        last_exit,
        pull,
        image_digest,
        ip,
        started_at,
        ready_at,
        finished_at,
        observed_at,
    } = status;
    if instance_id.is_empty() {
        return Err(missing_id());
    }
    let state = state(wire_state, &instance_id)?;
    // A last exit whose state is not a known one keeps the run's code and times: it is
    // history, not something to refuse the report for.
    let last_exit = last_exit.map(|l| model::LastExit {
        exit_code: l.exit_code,
        state: pb::InstanceState::try_from(l.state)
            .ok()
            .and_then(instance_state)
            .unwrap_or(InstanceState::Exited),
        reason: l.reason,
        started_at: l.started_at.map(Timestamp::from),
        finished_at: l.finished_at.map(Timestamp::from),
    });
    let pull = pull.map(|p| model::PullProgress {
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        layers_done: p.layers_done,
        layers_total: p.layers_total,
    });
    Ok((
        instance_id,
        model::InstanceStatus {
            generation,
            state,
            reason,
            message,
            exit_code,
            restart_count,
            last_exit,
            pull,
            image_digest,
            ip,
            started_at: started_at.map(Timestamp::from),
            ready_at: ready_at.map(Timestamp::from),
            finished_at: finished_at.map(Timestamp::from),
            observed_at: observed_at.map_or(observed_default, Timestamp::from),
        },
    ))
}

/// Resource amounts of a node (capacity or allocatable), all three required.
pub fn resources_from_pb(path: &str, resources: pb::Resources) -> Result<Resources, ops::Error> {
    let (resources, errors) = resource_amounts(path, resources, "is required");
    if errors.is_empty() {
        Ok(resources)
    } else {
        Err(ops::Error::InvalidArgument { errors })
    }
}

/// Resource amounts of a node, all three required, and a problem per field that is missing
/// (reported as `missing`) or does not parse; such a field reads as zero.
pub(crate) fn resource_amounts(
    path: &str,
    resources: pb::Resources,
    missing: &str,
) -> (Resources, Vec<FieldError>) {
    let pb::Resources { cpu, memory, pids } = resources;
    let mut errors = Vec::new();
    let mut field = |name: &str, message: String| {
        errors.push(FieldError {
            path: format!("{path}.{name}"),
            message,
        })
    };
    let cpu_millis = match cpu.as_deref().map(str::parse::<Cpu>) {
        Some(Ok(cpu)) => cpu.millis(),
        Some(Err(err)) => {
            field("cpu", err.to_string());
            0
        }
        None => {
            field("cpu", missing.to_string());
            0
        }
    };
    let memory_bytes = match memory.as_deref().map(str::parse::<Bytes>) {
        Some(Ok(bytes)) => bytes.get(),
        Some(Err(err)) => {
            field("memory", err.to_string());
            0
        }
        None => {
            field("memory", missing.to_string());
            0
        }
    };
    let pids = match pids {
        Some(p) => u64::from(p),
        None => {
            field("pids", missing.to_string());
            0
        }
    };
    let resources = Resources {
        cpu_millis,
        memory_bytes,
        pids,
    };
    (resources, errors)
}

/// The page a list request asks for.
pub fn page(size: u32, token: String) -> PageRequest {
    PageRequest { size, token }
}

/// An optional name filter: empty means none.
pub fn name_filter(name: String) -> Option<String> {
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_states_convert_both_ways() {
        let all = [
            InstanceState::Pending,
            InstanceState::Pulling,
            InstanceState::Starting,
            InstanceState::Running,
            InstanceState::Ready,
            InstanceState::Exited,
            InstanceState::OomKilled,
            InstanceState::Failed,
        ];
        for state in all {
            let wire: i32 = pb::InstanceState::from(state).into();
            assert_eq!(state_from_pb("state", wire).unwrap(), state);
        }
        assert!(state_from_pb("state", 0).is_err());
        assert!(state_from_pb("state", 99).is_err());
    }

    #[test]
    fn instance_status_round_trips() {
        let status = model::InstanceStatus {
            generation: 3,
            state: InstanceState::Exited,
            reason: "Completed".into(),
            message: "done".into(),
            exit_code: Some(0),
            restart_count: 2,
            last_exit: Some(model::LastExit {
                exit_code: 137,
                state: InstanceState::OomKilled,
                reason: "OOMKilled".into(),
                started_at: Some(Timestamp(500)),
                finished_at: Some(Timestamp(900)),
            }),
            pull: Some(model::PullProgress {
                bytes_done: 10,
                bytes_total: 20,
                layers_done: 1,
                layers_total: 2,
            }),
            image_digest: "sha256:abc".into(),
            ip: "10.88.0.2".into(),
            started_at: Some(Timestamp(1_000)),
            ready_at: None,
            finished_at: Some(Timestamp(2_000)),
            observed_at: Timestamp(2_001),
        };
        let wire = instance_status_to_pb("web-1", &status);
        let (id, back) = instance_status_from_pb(wire).unwrap();
        assert_eq!(id, "web-1");
        assert_eq!(back, status);
    }

    #[test]
    fn resources_convert_as_quantities() {
        let r = Resources {
            cpu_millis: 1500,
            memory_bytes: 64 << 20,
            pids: 100,
        };
        let wire = resources_to_pb(r);
        assert_eq!(wire.cpu.as_deref(), Some("1500m"));
        assert_eq!(wire.memory.as_deref(), Some("64Mi"));
        assert_eq!(resources_from_pb("capacity", wire).unwrap(), r);
        let err = resources_from_pb(
            "capacity",
            pb::Resources {
                cpu: Some("lots".into()),
                memory: None,
                pids: Some(1),
            },
        )
        .unwrap_err();
        let ops::Error::InvalidArgument { errors } = err else {
            panic!("{err:?}")
        };
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["capacity.cpu", "capacity.memory"]);
    }

    #[test]
    fn bad_enum_values_name_their_field() {
        let err = states_from_pb("states", vec![1, 42]).unwrap_err();
        assert!(err.to_string().contains("states[1]"), "{err}");
        let err = object_kinds_from_pb("kinds", vec![0]).unwrap_err();
        assert!(err.to_string().contains("kinds[0]"), "{err}");
        assert_eq!(kind_filter_from_pb("kind", 0).unwrap(), None);
        assert!(kind_filter_from_pb("kind", 7).is_err());
    }
}
