//! The records the scheduler keeps in the store, and the key schema they live under.
//!
//! Every record is JSON under `/gantry/v1/`. Spec and status live under separate keys, so the
//! controllers writing status never conflict with users applying specs, and an agent's status
//! reports never conflict with either:
//!
//! | key | record | written by |
//! |---|---|---|
//! | `/gantry/v1/workloads/{name}` | [`WorkloadRecord`] (spec, generation) | API |
//! | `/gantry/v1/revisions/{name}/{generation:020}` | [`RevisionRecord`] (last 10 kept) | API |
//! | `/gantry/v1/workload-status/{name}` | [`WorkloadStatus`] | leader's controllers |
//! | `/gantry/v1/instances/{workload}/{id}` | [`InstanceRecord`] (desired: node, generation, stop) | leader's controllers |
//! | `/gantry/v1/status/{workload}/{id}` | [`InstanceStatus`] (observed, from the agent) | the scheduler serving the node's session |
//! | `/gantry/v1/nodes/{name}` | [`NodeRecord`] (registration, cordon, drain, subnet) | session (register), API (cordon, drain) |
//! | `/gantry/v1/live/{name}` | [`Liveness`], attached to the session's lease | the scheduler serving the node's session |
//! | `/gantry/v1/subnets/{a.b.c.d-len}` | the node name holding that subnet (see `crate::network`) | session (register) |
//! | `/gantry/v1/leader` | the leader's identity, attached to its lease | election |
//! | `/gantry/v1/notices/{revision:020}-{name}` | [`NoticeRecord`], pruned after an hour by the leader | controllers |
//!
//! A node is ready while its `live` key exists. Instance ids are never reused: an instance
//! that is replaced gets a new id, so an id with its generation fences a stale node.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gantry::workload::Workload;
use serde::{Deserialize, Serialize};

use crate::placement::Resources;

/// Revisions of a workload's spec kept for `History` and `Rollback`.
pub const KEPT_REVISIONS: usize = 10;

/// The key schema.
pub mod keys {
    /// Every Gantry key starts with this.
    pub const ROOT: &str = "/gantry/v1/";
    /// Prefix of workload specs.
    pub const WORKLOADS: &str = "/gantry/v1/workloads/";
    /// Prefix of spec revisions.
    pub const REVISIONS: &str = "/gantry/v1/revisions/";
    /// Prefix of workload statuses.
    pub const WORKLOAD_STATUS: &str = "/gantry/v1/workload-status/";
    /// Prefix of instance records.
    pub const INSTANCES: &str = "/gantry/v1/instances/";
    /// Prefix of instance statuses.
    pub const STATUS: &str = "/gantry/v1/status/";
    /// Prefix of node records.
    pub const NODES: &str = "/gantry/v1/nodes/";
    /// Prefix of node liveness keys.
    pub const LIVE: &str = "/gantry/v1/live/";
    /// Prefix of the node subnet claims (one key per allocated subnet).
    pub const SUBNETS: &str = "/gantry/v1/subnets/";
    /// The leader election key.
    pub const LEADER: &str = "/gantry/v1/leader";
    /// Prefix of notices (events with a message).
    pub const NOTICES: &str = "/gantry/v1/notices/";

    /// The spec of workload `name`.
    pub fn workload(name: &str) -> String {
        format!("{WORKLOADS}{name}")
    }

    /// Revision `generation` of workload `name`; zero-padded so keys sort by generation.
    pub fn revision(name: &str, generation: u64) -> String {
        format!("{REVISIONS}{name}/{generation:020}")
    }

    /// Prefix of the revisions of workload `name`.
    pub fn revisions(name: &str) -> String {
        format!("{REVISIONS}{name}/")
    }

    /// The status of workload `name`.
    pub fn workload_status(name: &str) -> String {
        format!("{WORKLOAD_STATUS}{name}")
    }

    /// Instance `id` of `workload`.
    pub fn instance(workload: &str, id: &str) -> String {
        format!("{INSTANCES}{workload}/{id}")
    }

    /// Prefix of the instances of `workload`.
    pub fn instances_of(workload: &str) -> String {
        format!("{INSTANCES}{workload}/")
    }

    /// The status of instance `id` of `workload`.
    pub fn status(workload: &str, id: &str) -> String {
        format!("{STATUS}{workload}/{id}")
    }

    /// Prefix of the statuses of the instances of `workload`.
    pub fn statuses_of(workload: &str) -> String {
        format!("{STATUS}{workload}/")
    }

    /// Node `name`.
    pub fn node(name: &str) -> String {
        format!("{NODES}{name}")
    }

    /// Liveness of node `name`.
    pub fn live(name: &str) -> String {
        format!("{LIVE}{name}")
    }

    /// Claim of a node subnet, in its key form (`10.88.3.0-24`); the value is the node name.
    pub fn subnet(key_form: &str) -> String {
        format!("{SUBNETS}{key_form}")
    }

    /// A notice about object `name`, written at store revision `after` (the revision the
    /// writer last saw): notices sort by time, one per object and revision.
    pub fn notice(after: i64, name: &str) -> String {
        format!("{NOTICES}{after:020}-{name}")
    }
}

/// A point in time, in milliseconds since the Unix epoch (UTC).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The wall clock now. Only edges call this; the cores take the time as a value.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// `self + d`.
    pub fn plus(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(d.as_millis().min(i64::MAX as u128) as i64),
            Err(e) => Timestamp(-(e.duration().as_millis().min(i64::MAX as u128) as i64)),
        }
    }
}

impl From<Timestamp> for prost_types::Timestamp {
    fn from(t: Timestamp) -> Self {
        prost_types::Timestamp {
            seconds: t.0.div_euclid(1000),
            nanos: (t.0.rem_euclid(1000) * 1_000_000) as i32,
        }
    }
}

impl From<prost_types::Timestamp> for Timestamp {
    fn from(t: prost_types::Timestamp) -> Self {
        Timestamp(
            t.seconds
                .saturating_mul(1000)
                .saturating_add(i64::from(t.nanos) / 1_000_000),
        )
    }
}

/// A workload's spec as applied, with its generation. Status lives apart ([`WorkloadStatus`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRecord {
    /// The validated spec.
    pub spec: Workload,
    /// Starts at 1; each change of the spec adds one. Instances carry the generation they run.
    pub generation: u64,
    /// When the workload was first applied.
    pub created_at: Timestamp,
    /// When the spec last changed.
    pub updated_at: Timestamp,
}

/// One revision of a workload's spec, for `History` and `Rollback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    /// The generation this spec had.
    pub generation: u64,
    /// The spec.
    pub spec: Workload,
    /// When it was applied.
    pub created_at: Timestamp,
    /// Why it was made: `apply`, `scale`, `rollback to 3`, `auto-rollback from 4`.
    pub cause: String,
}

/// What the controllers observed of a workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStatus {
    /// The generation this status describes.
    pub observed_generation: u64,
    /// The last generation whose rollout completed (all instances ready); auto-rollback
    /// returns to it.
    pub last_good_generation: u64,
    /// Conditions (`Available`, `Progressing`, `RolledBack`, `Complete`, `Failed`).
    pub conditions: Vec<Condition>,
    /// Instance counts.
    pub counts: InstanceCounts,
}

/// Instance counts of a workload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceCounts {
    /// Instances wanted.
    pub desired: u32,
    /// Instances that exist and are not stopping.
    pub current: u32,
    /// Of those, the ones at the current generation.
    pub updated: u32,
    /// Of those, the ones that are ready.
    pub ready: u32,
    /// Instances no node could take.
    pub unplaced: u32,
    /// Job: instances that exited 0.
    pub succeeded: u32,
    /// Job: instances that failed.
    pub failed: u32,
}

/// A condition of a workload, Kubernetes-style.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Available`, `Progressing`, `RolledBack`, `Complete`, `Failed`.
    pub kind: String,
    /// Whether it holds.
    pub status: bool,
    /// A CamelCase reason.
    pub reason: String,
    /// A sentence for humans.
    pub message: String,
    /// When `status` last changed.
    pub last_transition: Timestamp,
}

/// One instance as the controllers want it: which workload generation, on which node, and
/// whether it should stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRecord {
    /// Unique, never reused: `{workload}-{suffix}`.
    pub id: String,
    /// The workload it belongs to.
    pub workload: String,
    /// The workload generation it runs; with the id, the fencing token for its node.
    pub generation: u64,
    /// The node it is assigned to; `None` while no node fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When the controller created it.
    pub created_at: Timestamp,
    /// When it was assigned to its node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_at: Option<Timestamp>,
    /// While unplaced: why each node was rejected (`n1: insufficient memory: …`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement_failures: Vec<String>,
    /// Set when the instance should stop (scale down, update, delete, drain, eviction); the
    /// record is removed once the instance has stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_requested_at: Option<Timestamp>,
}

impl InstanceRecord {
    /// Whether the instance has been asked to stop.
    pub fn stopping(&self) -> bool {
        self.stop_requested_at.is_some()
    }
}

/// The states of an instance, as its agent reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InstanceState {
    /// Assigned, nothing done yet (or not yet assigned).
    #[default]
    Pending,
    /// Its image is being pulled.
    Pulling,
    /// Its container is being created and started.
    Starting,
    /// Its process runs; not (yet) ready.
    Running,
    /// Running and passing its readiness check (or running, without one).
    Ready,
    /// The process exited (see `exit_code`).
    Exited,
    /// Killed by the kernel's OOM killer.
    OomKilled,
    /// Could not be started (see `reason`).
    Failed,
}

impl InstanceState {
    /// Whether the instance's process is gone for good (until a restart).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceState::Exited | InstanceState::OomKilled | InstanceState::Failed
        )
    }
}

/// What an agent reported of one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// The generation the reported container runs.
    pub generation: u64,
    /// The state.
    pub state: InstanceState,
    /// A CamelCase reason (`ImagePullFailed`, `CrashLoopBackOff`, `Completed`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Details for humans.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Exit code, once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Restarts so far.
    #[serde(default)]
    pub restart_count: u32,
    /// How the previous run ended, once restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
    /// Image pull progress (kept after the pull with the final numbers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullProgress>,
    /// The resolved image digest (`sha256:…`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image_digest: String,
    /// The instance's IP.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ip: String,
    /// When the current container started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it became ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Timestamp>,
    /// When it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// When the agent observed this.
    pub observed_at: Timestamp,
}

/// How the previous run of a restarted instance ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastExit {
    /// Exit status; 128+N when killed by signal N.
    pub exit_code: i32,
    /// The state it ended in (Exited, OOMKilled or Failed).
    pub state: InstanceState,
    /// CamelCase reason.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When that run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
}

/// Image pull progress, summed over layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullProgress {
    /// Compressed bytes downloaded.
    pub bytes_done: u64,
    /// Compressed bytes to download; 0 while the manifest is not known.
    pub bytes_total: u64,
    /// Layers downloaded and verified.
    pub layers_done: u32,
    /// Layers in the image.
    pub layers_total: u32,
}

/// A node as registered by its agent, plus what operators set on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Unique node name.
    pub name: String,
    /// Labels that selectors and constraints read.
    pub labels: BTreeMap<String, String>,
    /// The machine's resources.
    #[serde(with = "resources_serde")]
    pub capacity: Resources,
    /// What instances may use: capacity minus the agent's reservation.
    #[serde(with = "resources_serde")]
    pub allocatable: Resources,
    /// Address other nodes and the scheduler reach it at.
    pub address: String,
    /// `linux`.
    pub os: String,
    /// `amd64`, `arm64`.
    pub arch: String,
    /// Container runtime.
    pub runtime: String,
    /// Agent version.
    pub agent_version: String,
    /// Kernel release.
    pub kernel_version: String,
    /// OS image (`Debian GNU/Linux 13`).
    pub os_image: String,
    /// Boot id of the machine at registration.
    pub boot_id: String,
    /// First registration.
    pub registered_at: Timestamp,
    /// Whether an operator cordoned it.
    #[serde(default)]
    pub cordoned: bool,
    /// Whether an operator is draining it (implies cordoned).
    #[serde(default)]
    pub draining: bool,
    /// The node's pod subnet (networking).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
}

/// The value of a node's liveness key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Liveness {
    /// The scheduler replica serving the session.
    pub scheduler: String,
    /// When the session started.
    pub since: Timestamp,
}

/// An event with a message ("scaled up", "rolled back", "node lost"), kept for an hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoticeRecord {
    /// `workload`, `instance` or `node`.
    pub kind: String,
    /// The object's name.
    pub name: String,
    /// The workload involved, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload: String,
    /// Whether it is a warning.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// A sentence.
    pub message: String,
    /// What wrote it (`service-controller`, `node-controller`).
    pub source: String,
    /// When.
    pub time: Timestamp,
}

/// JSON of a record; records always serialize.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    serde_json::to_vec(record).expect("records serialize to JSON")
}

/// A record from JSON.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    serde_json::from_slice(bytes)
}

mod resources_serde {
    //! [`Resources`] as `{cpuMillis, memoryBytes, pids}` without deriving serde in the core.
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::placement::Resources;

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        cpu_millis: u64,
        memory_bytes: u64,
        pids: u64,
    }

    pub fn serialize<S: Serializer>(r: &Resources, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            pids: r.pids,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Resources, D::Error> {
        let w = Wire::deserialize(d)?;
        Ok(Resources {
            cpu_millis: w.cpu_millis,
            memory_bytes: w.memory_bytes,
            pids: w.pids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revision_keys_sort_by_generation() {
        assert!(keys::revision("web", 9) < keys::revision("web", 10));
        assert!(keys::notice(9, "b") < keys::notice(10, "a"));
    }

    #[test]
    fn workload_prefixes_do_not_overlap() {
        // `web` must not see the instances of `web-api`.
        assert!(!keys::instance("web-api", "web-api-1").starts_with(&keys::instances_of("web")));
    }

    #[test]
    fn timestamps_convert_both_ways() {
        for ms in [0, 1, 999, 1_000, 1_764_000_000_123, -1, -1_001] {
            let t = Timestamp(ms);
            assert_eq!(Timestamp::from(prost_types::Timestamp::from(t)), t, "{ms}");
        }
    }

    #[test]
    fn node_record_round_trips() {
        let node = NodeRecord {
            name: "n1".into(),
            capacity: Resources {
                cpu_millis: 2000,
                memory_bytes: 1 << 30,
                pids: 4096,
            },
            ..NodeRecord::default()
        };
        let back: NodeRecord = decode(&encode(&node)).unwrap();
        assert_eq!(back, node);
    }
}
