//! The workload spec users write (YAML or JSON, camelCase): what to run, how many, with which
//! resources, ports, volumes, health checks, placement and update strategy.
//!
//! The types here are the spec as written: quantities, durations and selectors are parsed while
//! decoding, everything else is checked by [`Workload::validate`], which reports every problem
//! with its field path. Fields that only some kinds take (`replicas`, `completions`, …) are
//! options on one flat struct so that a misplaced one is a validation error naming the kind,
//! not an "unknown field"; [`Workload::mode`] gives the kind with its defaults applied.

mod parse;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::quantity::{Bytes, Cpu};
use crate::selector::Selector;

pub use parse::{DocumentErrors, Error, Format, parse, parse_and_validate};
pub use validate::{FieldError, ValidationErrors};

/// A Service using every field, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) use parse::tests::EXAMPLE;

/// Instances of a Service when `replicas` is not given.
pub const DEFAULT_REPLICAS: u32 = 1;
/// Successful instances a Job needs when `completions` is not given.
pub const DEFAULT_COMPLETIONS: u32 = 1;
/// Instances of a Job run at once when `parallelism` is not given.
pub const DEFAULT_PARALLELISM: u32 = 1;
/// Failed instances after which a Job gives up, when `backoffLimit` is not given (Kubernetes').
pub const DEFAULT_BACKOFF_LIMIT: u32 = 6;

/// One workload: a Service, a Job or a Daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// What kind of workload this is.
    pub kind: Kind,
    /// Unique name: a DNS label.
    pub name: String,
    /// Labels of the workload and its instances.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Service only: instances to keep running (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Job only: successful instances needed (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completions: Option<u32>,
    /// Job only: instances run at once (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<u32>,
    /// Job only: failed instances after which the job fails (default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<u32>,
    /// Image reference (`registry.example:5000/team/web:1.2`, `busybox@sha256:…`).
    pub image: String,
    /// Replaces the image's entrypoint when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's command when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment variables, on top of the image's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute); the image's when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<PathBuf>,
    /// User as Docker takes it: `name`, `uid`, `name:group` or `uid:gid`; the image's when not
    /// given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Resource limits, also what placement reserves on a node.
    #[serde(default, skip_serializing_if = "is_default")]
    pub resources: Resources,
    /// Published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    /// Mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// When an exited instance is restarted, and how fast.
    #[serde(default, skip_serializing_if = "is_default")]
    pub restart: Restart,
    /// Readiness and liveness checks.
    #[serde(default, skip_serializing_if = "is_default")]
    pub health: Health,
    /// Which nodes may run instances, and how instances spread over them.
    #[serde(default, skip_serializing_if = "is_default")]
    pub placement: Placement,
    /// Higher priorities are placed first and may preempt lower ones.
    #[serde(default)]
    pub priority: i32,
    /// Service and Daemon only: how a changed spec rolls out (see
    /// [`Workload::update_strategy`] for the defaults).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Update>,
    /// Signal that asks the process to stop: a name (`SIGTERM`, `TERM`) or a number.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// Time between the stop signal and SIGKILL.
    #[serde(default = "default_stop_grace_period")]
    pub stop_grace_period: Duration,
    /// Network namespace of the instances.
    #[serde(default)]
    pub network: Network,
}

/// The kinds of workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Long-running, a number of replicas, rolling updates.
    Service,
    /// Runs to completion.
    Job,
    /// One instance on every eligible node.
    Daemon,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::Job => "Job",
            Kind::Daemon => "Daemon",
        })
    }
}

/// The kind of a workload with the kind's own settings, defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A Service.
    Service {
        /// Instances to keep running.
        replicas: u32,
    },
    /// A Job.
    Job {
        /// Successful instances needed.
        completions: u32,
        /// Instances run at once.
        parallelism: u32,
        /// Failed instances after which the job fails.
        backoff_limit: u32,
    },
    /// A Daemon.
    Daemon,
}

/// Resource limits; a missing one is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// CPU (`0.5`, `500m`, `2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Cpu>,
    /// Memory limit (`64Mi`, `1G`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Bytes>,
    /// Maximum number of processes and threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Port {
    /// Port inside the container (1-65535; wider type so that validation can name the value).
    pub container: u32,
    /// Port on the node; not published on the node when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<u32>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Transport protocols of ports.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A mount. Which fields apply depends on `type`: `source` for bind, `name` for named, `size`
/// for tmpfs; validation rejects the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    /// What is mounted.
    #[serde(rename = "type")]
    pub kind: VolumeKind,
    /// bind: the absolute host path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
    /// named: the volume's name, shared by the workloads on a node that use it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Absolute path inside the container.
    pub target: PathBuf,
    /// Mount read-only.
    #[serde(default, skip_serializing_if = "is_default")]
    pub read_only: bool,
    /// tmpfs: size limit; half the node's memory when not given (the kernel's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Bytes>,
}

/// The kinds of mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeKind {
    /// A path of the node.
    Bind,
    /// A fresh in-memory filesystem.
    Tmpfs,
    /// A volume kept by the node across instances, created on first use.
    Named,
}

impl fmt::Display for VolumeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VolumeKind::Bind => "bind",
            VolumeKind::Tmpfs => "tmpfs",
            VolumeKind::Named => "named",
        })
    }
}

/// Restart policy and backoff.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Restart {
    /// When to restart; see [`Workload::restart_policy`] for the default of each kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<RestartPolicy>,
    /// Delay between restarts.
    #[serde(default, skip_serializing_if = "is_default")]
    pub backoff: Backoff,
}

/// When an exited instance is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Whatever the exit status.
    Always,
    /// When it exited with a non-zero status or was killed.
    OnFailure,
    /// Never.
    Never,
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        })
    }
}

/// Exponential restart delay: `initial`, doubled after each restart up to `max`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backoff {
    /// First delay (default 1s).
    #[serde(default = "default_backoff_initial")]
    pub initial: Duration,
    /// Largest delay (default 5m).
    #[serde(default = "default_backoff_max")]
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
        }
    }
}

/// Health checks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Health {
    /// Whether an instance may take traffic and counts as available in a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
    /// Whether an instance is alive; a failing one is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
}

/// One health check: exactly one of `exec`, `http`, `tcp`, and its timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// Run a command in the container; exit status 0 is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    /// An HTTP GET; a status from 200 to 399 is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// A TCP connection that opens is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// Time between checks (default 10s).
    #[serde(default = "default_probe_period")]
    pub period: Duration,
    /// Time after which a check counts as failed (default 1s).
    #[serde(default = "default_probe_timeout")]
    pub timeout: Duration,
    /// Consecutive failures that make the instance unready or dead (default 3).
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Consecutive successes that make it ready again (default 1; must be 1 for liveness).
    #[serde(default = "default_success_threshold")]
    pub success_threshold: u32,
    /// Time after the start before the first check (default 0s).
    #[serde(default, skip_serializing_if = "is_default")]
    pub initial_delay: Duration,
}

/// A command run inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecCheck {
    /// Program and arguments.
    pub command: Vec<String>,
}

/// An HTTP GET to the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheck {
    /// Path of the request (default `/`).
    #[serde(default = "default_http_path")]
    pub path: String,
    /// Container port.
    pub port: u32,
}

/// A TCP connection to the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpCheck {
    /// Container port.
    pub port: u32,
}

/// Which nodes may run instances, and how they spread.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Placement {
    /// Node labels that must be present with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Selectors that node labels must all satisfy (`disk in (ssd,nvme)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Selector>,
    /// Node label key whose values instances spread evenly over (`zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<String>,
    /// At most one instance of this workload per node.
    #[serde(default, skip_serializing_if = "is_default")]
    pub anti_affinity: bool,
}

impl Placement {
    /// Whether a node with `labels` satisfies the node selector and every constraint.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.node_selector
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.constraints.iter().all(|c| c.matches(labels))
    }
}

/// How a changed spec rolls out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Update {
    /// Instances above the wanted count during a rollout (default 1).
    #[serde(default = "default_max_surge")]
    pub max_surge: u32,
    /// Instances below the wanted count during a rollout (default 0).
    #[serde(default)]
    pub max_unavailable: u32,
    /// Go back to the previous spec when the rollout fails (default true).
    #[serde(default = "default_true")]
    pub auto_rollback: bool,
    /// Time for a rollout to make progress before it counts as failed (default 10m).
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline: Duration,
}

impl Default for Update {
    fn default() -> Self {
        Update {
            max_surge: default_max_surge(),
            max_unavailable: 0,
            auto_rollback: true,
            progress_deadline: default_progress_deadline(),
        }
    }
}

/// Network namespace choices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The node's bridge network (CNI), with published ports.
    #[default]
    Bridge,
    /// The node's own network namespace.
    Host,
    /// Only loopback.
    None,
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Network::Bridge => "bridge",
            Network::Host => "host",
            Network::None => "none",
        })
    }
}

impl Workload {
    /// The kind with its settings, defaults applied.
    pub fn mode(&self) -> Mode {
        match self.kind {
            Kind::Service => Mode::Service {
                replicas: self.replicas.unwrap_or(DEFAULT_REPLICAS),
            },
            Kind::Job => Mode::Job {
                completions: self.completions.unwrap_or(DEFAULT_COMPLETIONS),
                parallelism: self.parallelism.unwrap_or(DEFAULT_PARALLELISM),
                backoff_limit: self.backoff_limit.unwrap_or(DEFAULT_BACKOFF_LIMIT),
            },
            Kind::Daemon => Mode::Daemon,
        }
    }

    /// The restart policy: as given, else `always` for Service and Daemon, `on-failure` for Job.
    pub fn restart_policy(&self) -> RestartPolicy {
        self.restart.policy.unwrap_or(match self.kind {
            Kind::Service | Kind::Daemon => RestartPolicy::Always,
            Kind::Job => RestartPolicy::OnFailure,
        })
    }

    /// The update strategy: as given, else max surge 1, max unavailable 0, auto-rollback,
    /// progress deadline 10m.
    pub fn update_strategy(&self) -> Update {
        self.update.clone().unwrap_or_default()
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn default_true() -> bool {
    true
}

fn default_stop_signal() -> String {
    "SIGTERM".to_string()
}

fn default_stop_grace_period() -> Duration {
    Duration::from_secs(10)
}

fn default_backoff_initial() -> Duration {
    Duration::from_secs(1)
}

fn default_backoff_max() -> Duration {
    Duration::from_secs(300)
}

fn default_probe_period() -> Duration {
    Duration::from_secs(10)
}

fn default_probe_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_failure_threshold() -> u32 {
    3
}

fn default_success_threshold() -> u32 {
    1
}

fn default_http_path() -> String {
    "/".to_string()
}

fn default_max_surge() -> u32 {
    1
}

fn default_progress_deadline() -> Duration {
    Duration::from_secs(600)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels written `k=v,k=v`.
    fn labels(text: &str) -> BTreeMap<String, String> {
        text.split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    /// Whether a node labelled `node` satisfies `placement` (YAML).
    #[track_caller]
    fn check(placement: &str, node: &str, expected: bool) {
        let p: Placement = serde_saphyr::from_str(placement).unwrap();
        assert_eq!(
            p.matches(&labels(node)),
            expected,
            "{placement} on {node:?}"
        );
    }

    #[rustfmt::skip]
    #[test]
    fn placement_matches_selector_and_constraints() {
        check("{}", "", true);
        check("{nodeSelector: {zone: a}}", "zone=a,disk=ssd", true);
        check("{nodeSelector: {zone: a}}", "zone=b", false);
        check("{nodeSelector: {zone: a}}", "", false);
        check("{constraints: ['disk in (ssd,nvme)', '!gpu']}", "disk=nvme", true);
        check("{constraints: ['disk in (ssd,nvme)', '!gpu']}", "disk=nvme,gpu=a", false);
        check("{nodeSelector: {zone: a}, constraints: ['disk=ssd']}", "zone=a,disk=hdd", false);
        check("{nodeSelector: {zone: a}, constraints: ['disk=ssd']}", "zone=a,disk=ssd", true);
    }
}
