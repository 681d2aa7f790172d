//! Conversion of workload specs between the wire (`pb::WorkloadSpec`) and the domain
//! ([`Workload`]): the one place where the proto types of a spec meet the workload model.
//!
//! Domain → proto cannot fail and loses nothing of a valid workload: quantities, durations and
//! selectors travel as their canonical text or as `google.protobuf.Duration`, and the defaults
//! the domain already holds (stop signal, grace period, network, backoff…) are written out.
//! Sub-messages the domain holds at their default (`resources`, `restart`, `health`,
//! `placement`) are left out, as the YAML form leaves them out.
//!
//! Proto → domain reports every problem at once, each with its field path in the YAML spelling
//! (`resources.memory`, `ports[1].host`): first what could not be converted, then what
//! [`Workload::validate`] finds, so that a converted workload is always a valid one. Enum
//! value 0 means "not given": the domain's default, or an error where the field is required.

use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;

use crate::duration::Duration;
use crate::pb;
use crate::pb::probe::Check;
use crate::workload::{
    Backoff, ExecCheck, FieldError, Health, HttpCheck, Kind, Network, Placement, Port, Probe,
    Protocol, Resources, Restart, RestartPolicy, TcpCheck, Update, ValidationErrors, Volume,
    VolumeKind, Workload,
};

// The domain's serde defaults, which `workload` keeps in private functions; the test
// `absent_fields_take_the_defaults_of_the_yaml_form` pins them to those.
const DEFAULT_STOP_SIGNAL: &str = "SIGTERM";
const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);
const DEFAULT_PROBE_PERIOD: Duration = Duration::from_secs(10);
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;
const DEFAULT_HTTP_PATH: &str = "/";

const NANOS_PER_SEC: i128 = 1_000_000_000;

impl From<Workload> for pb::WorkloadSpec {
    /// The wire form of a workload. A probe with several checks (which validation rejects)
    /// keeps only the first of exec, http and tcp: the wire has room for one.
    fn from(workload: Workload) -> Self {
        let Workload {
            kind,
            name,
            labels,
            replicas,
            completions,
            parallelism,
            backoff_limit,
            image,
            command,
            args,
            env,
            working_dir,
            user,
            resources,
            ports,
            volumes,
            restart,
            health,
            placement,
            priority,
            update,
            stop_signal,
            stop_grace_period,
            network,
        } = workload;
        pb::WorkloadSpec {
            kind: kind_to_pb(kind).into(),
            name,
            labels: labels.into_iter().collect(),
            replicas,
            completions,
            parallelism,
            backoff_limit,
            image,
            command,
            args,
            env: env.into_iter().collect(),
            working_dir: working_dir.map(path_to_pb),
            user,
            resources: unless_default(resources, resources_to_pb),
            ports: ports.into_iter().map(port_to_pb).collect(),
            volumes: volumes.into_iter().map(volume_to_pb).collect(),
            restart: unless_default(restart, restart_to_pb),
            health: unless_default(health, health_to_pb),
            placement: unless_default(placement, placement_to_pb),
            priority,
            update: update.map(update_to_pb),
            stop_signal: Some(stop_signal),
            stop_grace_period: Some(duration_to_pb(stop_grace_period)),
            network: network_to_pb(network).into(),
        }
    }
}

impl From<&Workload> for pb::WorkloadSpec {
    /// The wire form of a borrowed workload; see `From<Workload>`.
    fn from(workload: &Workload) -> Self {
        workload.clone().into()
    }
}

impl TryFrom<pb::WorkloadSpec> for Workload {
    type Error = ValidationErrors;

    /// The workload a wire spec describes, valid, or every problem with its field path.
    fn try_from(spec: pb::WorkloadSpec) -> Result<Self, Self::Error> {
        let pb::WorkloadSpec {
            kind,
            name,
            labels,
            replicas,
            completions,
            parallelism,
            backoff_limit,
            image,
            command,
            args,
            env,
            working_dir,
            user,
            resources,
            ports,
            volumes,
            restart,
            health,
            placement,
            priority,
            update,
            stop_signal,
            stop_grace_period,
            network,
        } = spec;
        let mut r = Report::default();
        let kind = required_enum(&mut r, "kind", kind, kind_from_pb);
        let workload = Workload {
            // A stand-in when there is no kind: `validated` then checks only what every kind
            // agrees on.
            kind: kind.unwrap_or(Kind::Service),
            name,
            labels: labels.into_iter().collect(),
            replicas,
            completions,
            parallelism,
            backoff_limit,
            image,
            command,
            args,
            env: env.into_iter().collect(),
            working_dir: working_dir.map(PathBuf::from),
            user,
            resources: resources_from_pb(&mut r, resources.unwrap_or_default()),
            ports: ports
                .into_iter()
                .enumerate()
                .map(|(i, port)| port_from_pb(&mut r, i, port))
                .collect(),
            volumes: volumes
                .into_iter()
                .enumerate()
                .map(|(i, volume)| volume_from_pb(&mut r, i, volume))
                .collect(),
            restart: restart_from_pb(&mut r, restart.unwrap_or_default()),
            health: health_from_pb(&mut r, health.unwrap_or_default()),
            placement: placement_from_pb(&mut r, placement.unwrap_or_default()),
            priority,
            update: update.map(|u| update_from_pb(&mut r, u)),
            stop_signal: stop_signal.unwrap_or_else(|| DEFAULT_STOP_SIGNAL.to_string()),
            stop_grace_period: duration_field(
                &mut r,
                "stopGracePeriod",
                stop_grace_period,
                DEFAULT_STOP_GRACE_PERIOD,
            ),
            network: enum_field(&mut r, "network", network, network_from_pb).unwrap_or_default(),
        };
        validated(workload, kind, r)
    }
}

/// Problems found while converting, and the fields that hold a stand-in for a value that could
/// not be converted (validation errors about those would only be noise).
#[derive(Default)]
struct Report {
    errors: Vec<FieldError>,
    stand_ins: Vec<String>,
}

impl Report {
    /// Records a problem with the field at `path`, whose value is replaced by a stand-in.
    fn add(&mut self, path: &str, message: impl Display) {
        self.stand_in(path);
        self.errors.push(FieldError {
            path: path.to_string(),
            message: message.to_string(),
        });
    }

    /// Marks the field at `path` as checked against a stand-in.
    fn stand_in(&mut self, path: &str) {
        self.stand_ins.push(path.to_string());
    }

    /// Whether the field at `path` is, or is inside, a stand-in.
    fn is_stand_in(&self, path: &str) -> bool {
        self.stand_ins.iter().any(|s| {
            path.strip_prefix(s.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }
}

/// The workload if neither conversion nor validation found a problem; else the conversion
/// problems, then the validation problems that are not about stand-ins. Without a kind, only
/// the validation problems that every kind agrees on are kept, as which fields apply depends on
/// the kind.
fn validated(
    mut workload: Workload,
    kind: Option<Kind>,
    report: Report,
) -> Result<Workload, ValidationErrors> {
    let problems = |w: &Workload| w.validate().err().map(|e| e.0).unwrap_or_default();
    let mut found: Vec<FieldError> = match kind {
        Some(kind) => {
            workload.kind = kind;
            problems(&workload)
        }
        None => {
            let [service, job, daemon] = [Kind::Service, Kind::Job, Kind::Daemon].map(|kind| {
                problems(&Workload {
                    kind,
                    ..workload.clone()
                })
            });
            service
                .into_iter()
                .filter(|e| job.contains(e) && daemon.contains(e))
                .collect()
        }
    };
    found.retain(|e| !report.is_stand_in(&e.path));
    let mut errors = report.errors;
    errors.append(&mut found);
    if errors.is_empty() {
        Ok(workload)
    } else {
        Err(ValidationErrors(errors))
    }
}

/// A proto enum field: `None` for 0 ("not given") and for a number the proto does not define,
/// which is a problem.
fn enum_field<P: TryFrom<i32>, D>(
    r: &mut Report,
    path: &str,
    raw: i32,
    from_pb: fn(P) -> Option<D>,
) -> Option<D> {
    match P::try_from(raw) {
        Ok(value) => from_pb(value),
        Err(_) => {
            r.add(path, format!("unknown value {raw}"));
            None
        }
    }
}

/// A proto enum field that must be given.
fn required_enum<P: TryFrom<i32>, D>(
    r: &mut Report,
    path: &str,
    raw: i32,
    from_pb: fn(P) -> Option<D>,
) -> Option<D> {
    if raw == 0 {
        r.add(path, "not given");
        return None;
    }
    enum_field(r, path, raw, from_pb)
}

/// An optional text field parsed into a domain value (a quantity, a selector).
fn parse_field<T>(r: &mut Report, path: &str, text: Option<String>) -> Option<T>
where
    T: FromStr,
    T::Err: Display,
{
    match text?.parse() {
        Ok(value) => Some(value),
        Err(e) => {
            r.add(path, e);
            None
        }
    }
}

/// An optional proto duration: `default` when absent, else seconds + nanos (not necessarily
/// normalised), which must be neither negative nor beyond the 64 bits of nanoseconds that a
/// duration written in a spec holds, so that every converted spec reads back from its YAML.
fn duration_field(
    r: &mut Report,
    path: &str,
    value: Option<prost_types::Duration>,
    default: Duration,
) -> Duration {
    let Some(prost_types::Duration { seconds, nanos }) = value else {
        return default;
    };
    // Cannot overflow: at most 2^63 × 10^9 + 2^31 in magnitude.
    let total = i128::from(seconds) * NANOS_PER_SEC + i128::from(nanos);
    match u64::try_from(total) {
        Ok(nanos) => std::time::Duration::from_nanos(nanos).into(),
        Err(_) if total < 0 => {
            r.add(path, format!("{} is negative", show_nanos(total)));
            default
        }
        Err(_) => {
            let max = Duration::from(std::time::Duration::from_nanos(u64::MAX));
            r.add(
                path,
                format!("{} is too large (at most {max})", show_nanos(total)),
            );
            default
        }
    }
}

/// Nanoseconds written as spec durations are (`-1m30s`, `250ms`), whatever their size.
fn show_nanos(total: i128) -> String {
    let magnitude = total.unsigned_abs();
    let per_sec = NANOS_PER_SEC.unsigned_abs();
    // The seconds fit: at most 2^63 + 3 from an i64 and an i32.
    let seconds = u64::try_from(magnitude / per_sec).unwrap_or(u64::MAX);
    let nanos = u32::try_from(magnitude % per_sec).unwrap_or(0);
    let shown = Duration::from(std::time::Duration::new(seconds, nanos));
    if total < 0 {
        format!("-{shown}")
    } else {
        shown.to_string()
    }
}

fn duration_to_pb(duration: Duration) -> prost_types::Duration {
    // Only a duration built from a std one can pass i64 seconds; spec text stops at 584 years.
    prost_types::Duration::try_from(duration.get()).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

/// `None` for a message the domain holds at its default.
fn unless_default<T: Default + PartialEq, P>(value: T, to_pb: fn(T) -> P) -> Option<P> {
    (value != T::default()).then(|| to_pb(value))
}

/// A path as text; spec paths come from text, so only a path built otherwise can be non-UTF-8,
/// and it is written lossily.
fn path_to_pb(path: PathBuf) -> String {
    path.into_os_string()
        .into_string()
        .unwrap_or_else(|os| os.to_string_lossy().into_owned())
}

fn kind_to_pb(kind: Kind) -> pb::WorkloadKind {
    match kind {
        Kind::Service => pb::WorkloadKind::Service,
        Kind::Job => pb::WorkloadKind::Job,
        Kind::Daemon => pb::WorkloadKind::Daemon,
    }
}

fn kind_from_pb(kind: pb::WorkloadKind) -> Option<Kind> {
    match kind {
        pb::WorkloadKind::Unspecified => None,
        pb::WorkloadKind::Service => Some(Kind::Service),
        pb::WorkloadKind::Job => Some(Kind::Job),
        pb::WorkloadKind::Daemon => Some(Kind::Daemon),
    }
}

fn resources_to_pb(resources: Resources) -> pb::Resources {
    let Resources { cpu, memory, pids } = resources;
    pb::Resources {
        cpu: cpu.map(|c| c.to_string()),
        memory: memory.map(|m| m.to_string()),
        pids,
    }
}

fn resources_from_pb(r: &mut Report, resources: pb::Resources) -> Resources {
    let pb::Resources { cpu, memory, pids } = resources;
    Resources {
        cpu: parse_field(r, "resources.cpu", cpu),
        memory: parse_field(r, "resources.memory", memory),
        pids,
    }
}

fn port_to_pb(port: Port) -> pb::Port {
    let Port {
        container,
        host,
        protocol,
    } = port;
    pb::Port {
        container,
        host,
        protocol: protocol_to_pb(protocol).into(),
    }
}

/// Ports stay 32-bit: validation names a number out of range with its path.
fn port_from_pb(r: &mut Report, i: usize, port: pb::Port) -> Port {
    let pb::Port {
        container,
        host,
        protocol,
    } = port;
    let protocol_path = format!("ports[{i}].protocol");
    Port {
        container,
        host,
        protocol: enum_field(r, &protocol_path, protocol, protocol_from_pb).unwrap_or_default(),
    }
}

fn protocol_to_pb(protocol: Protocol) -> pb::Protocol {
    match protocol {
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
    }
}

fn protocol_from_pb(protocol: pb::Protocol) -> Option<Protocol> {
    match protocol {
        pb::Protocol::Unspecified => None,
        pb::Protocol::Tcp => Some(Protocol::Tcp),
        pb::Protocol::Udp => Some(Protocol::Udp),
    }
}

fn volume_to_pb(volume: Volume) -> pb::Volume {
    let Volume {
        kind,
        source,
        name,
        target,
        read_only,
        size,
    } = volume;
    pb::Volume {
        r#type: volume_kind_to_pb(kind).into(),
        source: source.map(path_to_pb),
        name,
        target: path_to_pb(target),
        read_only,
        size: size.map(|s| s.to_string()),
    }
}

fn volume_from_pb(r: &mut Report, i: usize, volume: pb::Volume) -> Volume {
    let pb::Volume {
        r#type,
        source,
        name,
        target,
        read_only,
        size,
    } = volume;
    let path = |field: &str| format!("volumes[{i}].{field}");
    let kind = match required_enum(r, &path("type"), r#type, volume_kind_from_pb) {
        Some(kind) => kind,
        None => {
            // Which of these apply depends on the type.
            for field in ["source", "name", "size"] {
                r.stand_in(&path(field));
            }
            VolumeKind::Bind
        }
    };
    Volume {
        kind,
        source: source.map(PathBuf::from),
        name,
        target: PathBuf::from(target),
        read_only,
        size: parse_field(r, &path("size"), size),
    }
}

fn volume_kind_to_pb(kind: VolumeKind) -> pb::VolumeType {
    match kind {
        VolumeKind::Bind => pb::VolumeType::Bind,
        VolumeKind::Tmpfs => pb::VolumeType::Tmpfs,
        VolumeKind::Named => pb::VolumeType::Named,
    }
}

fn volume_kind_from_pb(kind: pb::VolumeType) -> Option<VolumeKind> {
    match kind {
        pb::VolumeType::Unspecified => None,
        pb::VolumeType::Bind => Some(VolumeKind::Bind),
        pb::VolumeType::Tmpfs => Some(VolumeKind::Tmpfs),
        pb::VolumeType::Named => Some(VolumeKind::Named),
    }
}

fn restart_to_pb(restart: Restart) -> pb::Restart {
    let Restart { policy, backoff } = restart;
    let Backoff { initial, max } = backoff;
    pb::Restart {
        policy: policy
            .map_or(pb::RestartPolicy::Unspecified, restart_policy_to_pb)
            .into(),
        backoff: Some(pb::Backoff {
            initial: Some(duration_to_pb(initial)),
            max: Some(duration_to_pb(max)),
        }),
    }
}

fn restart_from_pb(r: &mut Report, restart: pb::Restart) -> Restart {
    let pb::Restart { policy, backoff } = restart;
    let pb::Backoff { initial, max } = backoff.unwrap_or_default();
    let defaults = Backoff::default();
    let policy = enum_field(r, "restart.policy", policy, restart_policy_from_pb);
    let initial = duration_field(r, "restart.backoff.initial", initial, defaults.initial);
    let max = duration_field(r, "restart.backoff.max", max, defaults.max);
    if r.is_stand_in("restart.backoff.max") {
        // The initial delay is checked against the largest.
        r.stand_in("restart.backoff.initial");
    }
    Restart {
        policy,
        backoff: Backoff { initial, max },
    }
}

fn restart_policy_to_pb(policy: RestartPolicy) -> pb::RestartPolicy {
    match policy {
        RestartPolicy::Always => pb::RestartPolicy::Always,
        RestartPolicy::OnFailure => pb::RestartPolicy::OnFailure,
        RestartPolicy::Never => pb::RestartPolicy::Never,
    }
}

fn restart_policy_from_pb(policy: pb::RestartPolicy) -> Option<RestartPolicy> {
    match policy {
        pb::RestartPolicy::Unspecified => None,
        pb::RestartPolicy::Always => Some(RestartPolicy::Always),
        pb::RestartPolicy::OnFailure => Some(RestartPolicy::OnFailure),
        pb::RestartPolicy::Never => Some(RestartPolicy::Never),
    }
}

fn health_to_pb(health: Health) -> pb::Health {
    let Health {
        readiness,
        liveness,
    } = health;
    pb::Health {
        readiness: readiness.map(probe_to_pb),
        liveness: liveness.map(probe_to_pb),
    }
}

fn health_from_pb(r: &mut Report, health: pb::Health) -> Health {
    let pb::Health {
        readiness,
        liveness,
    } = health;
    Health {
        readiness: readiness.map(|p| probe_from_pb(r, "health.readiness", p)),
        liveness: liveness.map(|p| probe_from_pb(r, "health.liveness", p)),
    }
}

fn probe_to_pb(probe: Probe) -> pb::Probe {
    let Probe {
        exec,
        http,
        tcp,
        period,
        timeout,
        failure_threshold,
        success_threshold,
        initial_delay,
    } = probe;
    let exec = exec.map(|ExecCheck { command }| Check::Exec(pb::ExecCheck { command }));
    let http = http.map(|HttpCheck { path, port }| Check::Http(pb::HttpCheck { path, port }));
    let tcp = tcp.map(|TcpCheck { port }| Check::Tcp(pb::TcpCheck { port }));
    pb::Probe {
        check: exec.or(http).or(tcp),
        period: Some(duration_to_pb(period)),
        timeout: Some(duration_to_pb(timeout)),
        failure_threshold: Some(failure_threshold),
        success_threshold: Some(success_threshold),
        initial_delay: Some(duration_to_pb(initial_delay)),
    }
}

fn probe_from_pb(r: &mut Report, path: &str, probe: pb::Probe) -> Probe {
    let pb::Probe {
        check,
        period,
        timeout,
        failure_threshold,
        success_threshold,
        initial_delay,
    } = probe;
    let (mut exec, mut http, mut tcp) = (None, None, None);
    match check {
        Some(Check::Exec(pb::ExecCheck { command })) => exec = Some(ExecCheck { command }),
        Some(Check::Http(pb::HttpCheck {
            path: request,
            port,
        })) => {
            let path = if request.is_empty() {
                DEFAULT_HTTP_PATH.to_string()
            } else {
                request
            };
            http = Some(HttpCheck { path, port });
        }
        Some(Check::Tcp(pb::TcpCheck { port })) => tcp = Some(TcpCheck { port }),
        // Validation names the missing check.
        None => {}
    }
    let field = |name: &str| format!("{path}.{name}");
    Probe {
        exec,
        http,
        tcp,
        period: duration_field(r, &field("period"), period, DEFAULT_PROBE_PERIOD),
        timeout: duration_field(r, &field("timeout"), timeout, DEFAULT_PROBE_TIMEOUT),
        failure_threshold: failure_threshold.unwrap_or(DEFAULT_FAILURE_THRESHOLD),
        success_threshold: success_threshold.unwrap_or(DEFAULT_SUCCESS_THRESHOLD),
        initial_delay: duration_field(r, &field("initialDelay"), initial_delay, Duration::ZERO),
    }
}

fn placement_to_pb(placement: Placement) -> pb::Placement {
    let Placement {
        node_selector,
        constraints,
        spread,
        anti_affinity,
    } = placement;
    pb::Placement {
        node_selector: node_selector.into_iter().collect(),
        constraints: constraints.iter().map(ToString::to_string).collect(),
        spread,
        anti_affinity,
    }
}

fn placement_from_pb(r: &mut Report, placement: pb::Placement) -> Placement {
    let pb::Placement {
        node_selector,
        constraints,
        spread,
        anti_affinity,
    } = placement;
    Placement {
        node_selector: node_selector.into_iter().collect(),
        constraints: constraints
            .into_iter()
            .enumerate()
            .map(|(i, text)| {
                let path = format!("placement.constraints[{i}]");
                parse_field(r, &path, Some(text)).unwrap_or_default()
            })
            .collect(),
        spread,
        anti_affinity,
    }
}

fn update_to_pb(update: Update) -> pb::Update {
    let Update {
        max_surge,
        max_unavailable,
        auto_rollback,
        progress_deadline,
    } = update;
    pb::Update {
        max_surge: Some(max_surge),
        max_unavailable,
        auto_rollback: Some(auto_rollback),
        progress_deadline: Some(duration_to_pb(progress_deadline)),
    }
}

fn update_from_pb(r: &mut Report, update: pb::Update) -> Update {
    let pb::Update {
        max_surge,
        max_unavailable,
        auto_rollback,
        progress_deadline,
    } = update;
    let defaults = Update::default();
    Update {
        max_surge: max_surge.unwrap_or(defaults.max_surge),
        max_unavailable,
        auto_rollback: auto_rollback.unwrap_or(defaults.auto_rollback),
        progress_deadline: duration_field(
            r,
            "update.progressDeadline",
            progress_deadline,
            defaults.progress_deadline,
        ),
    }
}

fn network_to_pb(network: Network) -> pb::Network {
    match network {
        Network::Bridge => pb::Network::Bridge,
        Network::Host => pb::Network::Host,
        Network::None => pb::Network::None,
    }
}

fn network_from_pb(network: pb::Network) -> Option<Network> {
    match network {
        pb::Network::Unspecified => None,
        pb::Network::Bridge => Some(Network::Bridge),
        pb::Network::Host => Some(Network::Host),
        pb::Network::None => Some(Network::None),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::quantity::{Bytes, Cpu};
    use crate::workload::{Format, parse_and_validate};

    /// The example of the workload spec issue (as in `workload::parse`'s tests).
    use crate::workload::EXAMPLE;

    /// The smallest valid workload.
    const MINIMAL: &str = "kind: Service\nname: web\nimage: web:1\n";

    /// The kinds and variants the example does not show.
    const OTHERS: &str = r#"
kind: Job
name: batch
image: batch:1
completions: 4
parallelism: 2
backoffLimit: 0
restart: {policy: never, backoff: {initial: 250ms, max: 1m30s}}
health: {liveness: {exec: {command: [check, --quick]}, timeout: 1.5s, failureThreshold: 5, initialDelay: 3s}}
volumes: [{type: tmpfs, target: /scratch}]
stopSignal: '9'
stopGracePeriod: 0s
network: none
---
kind: Daemon
name: agent
image: agent@sha256:0123456789abcdef0123456789abcdef
ports: [{container: 53, host: 53, protocol: udp}, {container: 9100}]
update: {maxSurge: 0, maxUnavailable: 1, autoRollback: false, progressDeadline: 1h30m}
placement: {constraints: ["!gpu", "zone notin (c)"]}
priority: -5
network: host
"#;

    fn workloads(yaml: &str) -> Vec<Workload> {
        parse_and_validate(yaml, Format::Yaml).unwrap()
    }

    /// Domain → proto → bytes → proto → domain gives back `workload`.
    #[track_caller]
    fn assert_round_trip(workload: &Workload) {
        let spec = pb::WorkloadSpec::from(workload);
        let decoded = pb::WorkloadSpec::decode(spec.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, spec);
        assert_eq!(Workload::try_from(decoded).as_ref(), Ok(workload));
    }

    #[test]
    fn full_example_round_trips() {
        assert_round_trip(&workloads(EXAMPLE)[0]);
    }

    #[test]
    fn minimal_workload_round_trips() {
        assert_round_trip(&workloads(MINIMAL)[0]);
    }

    #[test]
    fn other_kinds_and_variants_round_trip() {
        for workload in workloads(OTHERS) {
            assert_round_trip(&workload);
        }
        // Owned and borrowed conversions agree.
        let w = workloads(OTHERS).remove(0);
        assert_eq!(pb::WorkloadSpec::from(&w), pb::WorkloadSpec::from(w));
    }

    #[test]
    fn wire_form_is_canonical_text_with_defaults_written_out() {
        let spec = pb::WorkloadSpec::from(&workloads(EXAMPLE)[0]);
        let resources = spec.resources.as_ref().unwrap();
        assert_eq!(resources.cpu.as_deref(), Some("500m"));
        assert_eq!(resources.memory.as_deref(), Some("64Mi"));
        assert_eq!(spec.volumes[1].size.as_deref(), Some("64Mi"));
        let placement = spec.placement.as_ref().unwrap();
        assert_eq!(placement.constraints, ["disk in (nvme,ssd)"]);
        assert_eq!(spec.network(), pb::Network::Bridge);
        assert_eq!(spec.ports[0].protocol(), pb::Protocol::Tcp);

        let minimal = pb::WorkloadSpec::from(&workloads(MINIMAL)[0]);
        assert_eq!(minimal.kind(), pb::WorkloadKind::Service);
        assert_eq!(minimal.stop_signal.as_deref(), Some("SIGTERM"));
        let ten_seconds = prost_types::Duration {
            seconds: 10,
            nanos: 0,
        };
        assert_eq!(minimal.stop_grace_period, Some(ten_seconds));
        assert_eq!(minimal.network(), pb::Network::Bridge);
        assert_eq!(
            (minimal.resources, minimal.restart),
            (None, None),
            "left out at their defaults"
        );
        assert_eq!((minimal.health, minimal.placement), (None, None));
    }

    /// A valid Service on the wire with nothing but its required fields.
    fn minimal() -> pb::WorkloadSpec {
        pb::WorkloadSpec {
            kind: pb::WorkloadKind::Service.into(),
            name: "web".into(),
            image: "web:1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn absent_fields_take_the_defaults_of_the_yaml_form() {
        let yaml = format!(
            "{MINIMAL}health: {{readiness: {{http: {{port: 80}}}}}}\nrestart: {{backoff: {{}}}}\nupdate: {{}}\n"
        );
        let http = pb::HttpCheck {
            path: String::new(),
            port: 80,
        };
        let spec = pb::WorkloadSpec {
            health: Some(pb::Health {
                readiness: Some(pb::Probe {
                    check: Some(Check::Http(http)),
                    ..Default::default()
                }),
                liveness: None,
            }),
            restart: Some(pb::Restart {
                policy: 0,
                backoff: Some(pb::Backoff::default()),
            }),
            update: Some(pb::Update::default()),
            ..minimal()
        };
        assert_eq!(Workload::try_from(spec), Ok(workloads(&yaml).remove(0)));
        assert_eq!(
            Workload::try_from(minimal()),
            Ok(workloads(MINIMAL).remove(0))
        );
    }

    #[test]
    fn durations_are_seconds_plus_nanos() {
        let spec = pb::WorkloadSpec {
            stop_grace_period: Some(prost_types::Duration {
                seconds: 1,
                nanos: -500_000_000,
            }),
            ..minimal()
        };
        let w = Workload::try_from(spec).unwrap();
        assert_eq!(w.stop_grace_period, Duration::from_millis(500));
        let w = Workload {
            stop_grace_period: Duration::from(std::time::Duration::new(90, 250_000_000)),
            ..w
        };
        let spec = pb::WorkloadSpec::from(&w);
        let expected = prost_types::Duration {
            seconds: 90,
            nanos: 250_000_000,
        };
        assert_eq!(spec.stop_grace_period, Some(expected));
    }

    fn duration(seconds: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration { seconds, nanos })
    }

    fn probe(check: Check) -> Option<pb::Probe> {
        Some(pb::Probe {
            check: Some(check),
            ..Default::default()
        })
    }

    /// Converts `minimal()` changed by `edit` and compares the whole error (or its start when
    /// `expected` ends with `…`), or `ok`.
    #[track_caller]
    fn check(edit: impl FnOnce(&mut pb::WorkloadSpec), expected: &str) {
        let mut spec = minimal();
        edit(&mut spec);
        let got = match Workload::try_from(spec) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        match expected.strip_suffix('…') {
            Some(prefix) => assert!(got.starts_with(prefix), "got: {got}"),
            None => assert_eq!(got, expected),
        }
    }

    #[test]
    #[rustfmt::skip]
    fn bad_input_names_its_field() {
        check(|_| {}, "ok");
        // Kind: required; without it, only kind-independent problems are reported.
        check(|s| s.kind = 0, "kind: not given");
        check(|s| s.kind = 7, "kind: unknown value 7");
        check(|s| { s.kind = 0; s.completions = Some(0); s.name = "Web".into() }, "kind: not given; name: must be a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters), not 'Web'");
        check(|s| { s.kind = pb::WorkloadKind::Job.into(); s.replicas = Some(2) }, "replicas: does not apply to kind Job (use completions and parallelism)");
        // Quantities.
        check(|s| s.resources = Some(pb::Resources { memory: Some("64Q".into()), ..Default::default() }), "resources.memory: '64Q' is not a quantity");
        check(|s| s.resources = Some(pb::Resources { cpu: Some("0.0005".into()), ..Default::default() }), "resources.cpu: '0.0005' is finer than a millicore (at most 3 decimals)");
        check(|s| s.resources = Some(pb::Resources { cpu: Some("abc".into()), memory: Some("1Mi".into()), pids: None }), "resources.cpu: 'abc' is not a cpu quantity (cores like 0.5 or millicores like 500m); resources.memory: 1Mi is below the minimum of 6Mi");
        check(|s| s.volumes = vec![pb::Volume { r#type: pb::VolumeType::Tmpfs.into(), target: "/t".into(), size: Some("1Q".into()), ..Default::default() }], "volumes[0].size: '1Q' is not a quantity");
        // Durations.
        check(|s| s.stop_grace_period = duration(-5, 0), "stopGracePeriod: -5s is negative");
        check(|s| s.stop_grace_period = duration(0, -1), "stopGracePeriod: -1ns is negative");
        check(|s| s.stop_grace_period = duration(i64::MIN, -999_999_999), "stopGracePeriod: -2562047788015215h30m8.999999999s is negative");
        check(|s| s.stop_grace_period = duration(i64::MAX, 999_999_999), "stopGracePeriod: 2562047788015215h30m7.999999999s is too large (at most 5124095h34m33.709551615s)");
        check(|s| s.stop_grace_period = duration(7200, 0), "stopGracePeriod: 2h is longer than the maximum of 1h");
        check(|s| s.restart = Some(pb::Restart { policy: 0, backoff: Some(pb::Backoff { initial: duration(600, 0), max: duration(-1, 0) }) }), "restart.backoff.max: -1s is negative");
        check(|s| s.restart = Some(pb::Restart { policy: 0, backoff: Some(pb::Backoff { initial: duration(-1, 0), max: None }) }), "restart.backoff.initial: -1s is negative");
        check(|s| s.health = Some(pb::Health { readiness: Some(pb::Probe { period: duration(-1, 0), timeout: duration(0, -5_000_000), initial_delay: duration(-3, 0), ..probe(Check::Tcp(pb::TcpCheck { port: 80 })).unwrap() }), liveness: None }), "health.readiness.period: -1s is negative; health.readiness.timeout: -5ms is negative; health.readiness.initialDelay: -3s is negative");
        check(|s| s.update = Some(pb::Update { progress_deadline: duration(i64::MAX, 0), ..Default::default() }), "update.progressDeadline: 2562047788015215h30m7s is too large…");
        // Selectors.
        check(|s| s.placement = Some(pb::Placement { constraints: vec!["zone=a".into(), "disk in (ssd".into()], ..Default::default() }), "placement.constraints[1]: expected ',' or ')' at column 13, found end of input");
        check(|s| s.placement = Some(pb::Placement { constraints: vec!["".into()], ..Default::default() }), "placement.constraints[0]: must not be empty");
        // Ports.
        check(|s| s.ports = vec![pb::Port { container: 70000, host: None, protocol: 0 }], "ports[0].container: 70000 is out of range (1-65535)");
        check(|s| s.ports = vec![pb::Port { container: 80, host: None, protocol: 0 }, pb::Port { container: 0, host: Some(65536), protocol: 0 }], "ports[1].container: 0 is out of range (1-65535); ports[1].host: 65536 is out of range (1-65535)");
        check(|s| s.health = Some(pb::Health { readiness: probe(Check::Http(pb::HttpCheck { path: "/".into(), port: 0 })), liveness: probe(Check::Tcp(pb::TcpCheck { port: 70000 })) }), "health.readiness.http.port: 0 is out of range (1-65535); health.liveness.tcp.port: 70000 is out of range (1-65535)");
        // Enums.
        check(|s| s.ports = vec![pb::Port { container: 80, host: None, protocol: 9 }], "ports[0].protocol: unknown value 9");
        check(|s| s.volumes = vec![pb::Volume { target: "/a".into(), source: Some("rel".into()), ..Default::default() }], "volumes[0].type: not given");
        check(|s| s.volumes = vec![pb::Volume { r#type: 7, target: "a".into(), ..Default::default() }], "volumes[0].type: unknown value 7; volumes[0].target: 'a' must be an absolute path");
        check(|s| s.restart = Some(pb::Restart { policy: 9, backoff: None }), "restart.policy: unknown value 9");
        check(|s| s.network = 9, "network: unknown value 9");
        // What only validation finds.
        check(|s| s.health = Some(pb::Health { readiness: Some(pb::Probe::default()), liveness: None }), "health.readiness: needs one of exec, http or tcp");
        check(|s| s.stop_signal = Some(String::new()), "stopSignal: '' is not a signal (a name like SIGTERM or a number from 1 to 64)");
        check(|s| s.image = String::new(), "image: must not be empty");
        // Every problem at once: conversion first, then validation, each in field order.
        check(|s| {
            s.kind = 0;
            s.image = String::new();
            s.resources = Some(pb::Resources { memory: Some("64Q".into()), ..Default::default() });
            s.ports = vec![pb::Port { container: 70000, host: None, protocol: 0 }];
            s.placement = Some(pb::Placement { constraints: vec!["a b".into()], ..Default::default() });
            s.stop_grace_period = duration(-1, 0);
        }, "kind: not given; resources.memory: '64Q' is not a quantity; placement.constraints[0]: expected an operator (=, ==, !=, in, notin), ',' or end of input at column 3, found 'b'; stopGracePeriod: -1s is negative; image: must not be empty; ports[0].container: 70000 is out of range (1-65535)");
    }

    #[test]
    fn quantities_and_selectors_keep_their_value() {
        let spec = pb::WorkloadSpec {
            resources: Some(pb::Resources {
                cpu: Some("1.5".into()),
                memory: Some("1.5Gi".into()),
                pids: Some(64),
            }),
            placement: Some(pb::Placement {
                constraints: vec!["zone == a".into()],
                ..Default::default()
            }),
            ..minimal()
        };
        let w = Workload::try_from(spec).unwrap();
        assert_eq!(w.resources.cpu, Some(Cpu::from_millis(1500)));
        assert_eq!(w.resources.memory, Some(Bytes::new(1536 << 20)));
        let back = pb::WorkloadSpec::from(w);
        let resources = back.resources.unwrap();
        assert_eq!(resources.cpu.as_deref(), Some("1500m"));
        assert_eq!(resources.memory.as_deref(), Some("1536Mi"));
        assert_eq!(back.placement.unwrap().constraints, ["zone=a"]);
    }
}
