//! Checks of a decoded workload beyond its shape: every problem is reported, each with the path
//! of its field as the user wrote it (`ports[1].host`, `health.readiness.period`).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::path::{Component, Path};

use super::{Kind, Network, Probe, RestartPolicy, VolumeKind, Workload};
use crate::duration::Duration;
use crate::quantity::Bytes;
use crate::selector::{is_dns_label, validate_label_key, validate_label_value};

/// Smallest memory limit accepted; below it the container cannot even start (Docker: 6 MiB).
pub const MIN_MEMORY: Bytes = Bytes::new(6 * 1024 * 1024);
/// Longest stop grace period accepted (the agent's limit).
pub const MAX_STOP_GRACE_PERIOD: Duration = Duration::from_secs(3600);
/// Shortest probe period accepted (Kubernetes').
pub const MIN_PROBE_PERIOD: Duration = Duration::from_secs(1);

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field as written in the spec (`resources.memory`, `ports[1].host`).
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a workload, in the order of the spec's fields.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", join(.0))]
pub struct ValidationErrors(pub Vec<FieldError>);

fn join(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// Collects field errors while the checks run.
#[derive(Default)]
struct Report(Vec<FieldError>);

impl Report {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }
}

impl Workload {
    /// Checks everything decoding could not, and returns every problem found.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut r = Report::default();
        check_name(&mut r, &self.name);
        check_labels(&mut r, "labels", &self.labels);
        check_kind_fields(&mut r, self);
        if let Err(message) = check_image(&self.image) {
            r.add("image", message);
        }
        if self.command.first().is_some_and(String::is_empty) {
            r.add("command[0]", "must name a program");
        }
        check_strings(&mut r, "command", &self.command);
        check_strings(&mut r, "args", &self.args);
        check_env(&mut r, &self.env);
        if let Some(dir) = &self.working_dir
            && let Err(message) = check_absolute(dir)
        {
            r.add("workingDir", message);
        }
        if let Some(user) = &self.user
            && let Err(message) = check_user(user)
        {
            r.add("user", message);
        }
        check_resources(&mut r, self);
        check_ports(&mut r, self);
        check_volumes(&mut r, self);
        check_restart(&mut r, self);
        if let Some(probe) = &self.health.readiness {
            check_probe(&mut r, "health.readiness", probe, false);
        }
        if let Some(probe) = &self.health.liveness {
            check_probe(&mut r, "health.liveness", probe, true);
        }
        check_placement(&mut r, self);
        check_update(&mut r, self);
        if !is_signal(&self.stop_signal) {
            r.add(
                "stopSignal",
                format!(
                    "'{}' is not a signal (a name like SIGTERM or a number from 1 to 64)",
                    self.stop_signal
                ),
            );
        }
        if self.stop_grace_period > MAX_STOP_GRACE_PERIOD {
            r.add(
                "stopGracePeriod",
                format!(
                    "{} is longer than the maximum of {MAX_STOP_GRACE_PERIOD}",
                    self.stop_grace_period
                ),
            );
        }
        if r.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(r.0))
        }
    }
}

fn check_name(r: &mut Report, name: &str) {
    if name.is_empty() {
        r.add("name", "must not be empty");
    } else if !is_dns_label(name) {
        r.add(
            "name",
            format!(
                "must be a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters), not '{name}'"
            ),
        );
    }
}

fn check_labels(r: &mut Report, path: &str, labels: &BTreeMap<String, String>) {
    for (key, value) in labels {
        if let Err(e) = validate_label_key(key) {
            r.add(format!("{path}.{key}"), e.to_string());
        }
        if let Err(e) = validate_label_value(value) {
            r.add(format!("{path}.{key}"), e.to_string());
        }
    }
}

/// Fields that only some kinds take, and the kind-specific rules.
fn check_kind_fields(r: &mut Report, w: &Workload) {
    let job_only = [
        ("completions", w.completions),
        ("parallelism", w.parallelism),
        ("backoffLimit", w.backoff_limit),
    ];
    match w.kind {
        Kind::Service => {}
        Kind::Job => {
            if w.replicas.is_some() {
                r.add(
                    "replicas",
                    "does not apply to kind Job (use completions and parallelism)",
                );
            }
        }
        Kind::Daemon => {
            if w.replicas.is_some() {
                r.add(
                    "replicas",
                    "does not apply to kind Daemon (it runs one instance on every eligible node)",
                );
            }
        }
    }
    for (field, value) in job_only {
        match (w.kind, value) {
            (Kind::Job, Some(0)) if field != "backoffLimit" => r.add(field, "must be at least 1"),
            (Kind::Service | Kind::Daemon, Some(_)) => {
                r.add(field, format!("only applies to kind Job, not {}", w.kind));
            }
            _ => {}
        }
    }
}

/// Checks a Docker/OCI image reference: `[host[:port]/]path[:tag][@algorithm:hex]`.
fn check_image(image: &str) -> Result<(), String> {
    if image.is_empty() {
        return Err("must not be empty".to_string());
    }
    let bad = |why: &str| Err(format!("'{image}' is not an image reference: {why}"));
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("it contains whitespace");
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let ok = digest.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty()
                && algorithm
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+._-".contains(c))
                && hex.len() >= 32
                && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
        if !ok {
            return bad("the digest must be algorithm:hex (like sha256:…)");
        }
    }
    let last_component = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_component..].find(':') {
        Some(i) => (
            &rest[..last_component + i],
            Some(&rest[last_component + i + 1..]),
        ),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = (1..=128).contains(&tag.len())
            && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return bad(
                "the tag must be 1 to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'",
            );
        }
    }
    let mut components: Vec<&str> = name.split('/').collect();
    let registry = components.len() > 1
        && (components[0].contains(['.', ':'])
            || components[0] == "localhost"
            || components[0].chars().any(|c| c.is_ascii_uppercase()));
    if registry {
        let host = components.remove(0);
        let (hostname, port) = host.split_once(':').unwrap_or((host, "1"));
        let ok = !hostname.is_empty()
            && hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
            && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !ok {
            return bad("the registry must be host or host:port");
        }
    }
    if !components.iter().all(|c| is_path_component(c)) {
        return bad(
            "the repository path must be lowercase letters and digits, separated by '/', '.', '_', '__' or '-'",
        );
    }
    Ok(())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, the repository path component of the distribution spec.
fn is_path_component(c: &str) -> bool {
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    if !c.starts_with(alnum) || !c.ends_with(alnum) {
        return false;
    }
    c.split(alnum)
        .filter(|sep| !sep.is_empty())
        .all(|sep| matches!(sep, "." | "_" | "__") || sep.chars().all(|ch| ch == '-'))
}

fn check_strings(r: &mut Report, path: &str, strings: &[String]) {
    for (i, s) in strings.iter().enumerate() {
        if s.contains('\0') {
            r.add(format!("{path}[{i}]"), "contains a NUL byte");
        }
    }
}

fn check_env(r: &mut Report, env: &BTreeMap<String, String>) {
    for (name, value) in env {
        let name_ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !name_ok {
            r.add(
                format!("env.{name}"),
                format!(
                    "'{name}' is not a variable name (letters, digits, '_', '.' and '-', not starting with a digit)"
                ),
            );
        }
        if value.contains('\0') {
            r.add(format!("env.{name}"), "the value contains a NUL byte");
        }
    }
}

/// An absolute path without `..`, as mount targets and working directories must be.
fn check_absolute(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("'{}' must be an absolute path", path.display()));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("'{}' must not contain '..'", path.display()));
    }
    Ok(())
}

/// `name`, `uid`, `name:group` or `uid:gid`.
fn check_user(user: &str) -> Result<(), String> {
    let parts: Vec<&str> = user.split(':').collect();
    let ok = parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{user}' is not a user (name, uid, name:group or uid:gid)"
        ))
    }
}

fn check_resources(r: &mut Report, w: &Workload) {
    let res = &w.resources;
    if res.cpu.is_some_and(|c| c.millis() == 0) {
        r.add("resources.cpu", "must be more than 0");
    }
    if let Some(memory) = res.memory
        && memory < MIN_MEMORY
    {
        r.add(
            "resources.memory",
            format!("{memory} is below the minimum of {MIN_MEMORY}"),
        );
    }
    if res.pids == Some(0) {
        r.add("resources.pids", "must be at least 1");
    }
}

fn port_in_range(port: u32) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("{port} is out of range (1-65535)"))
    }
}

fn check_ports(r: &mut Report, w: &Workload) {
    let mut published = BTreeMap::new();
    for (i, port) in w.ports.iter().enumerate() {
        if let Err(message) = port_in_range(port.container) {
            r.add(format!("ports[{i}].container"), message);
        }
        let Some(host) = port.host else {
            continue;
        };
        let path = format!("ports[{i}].host");
        if let Err(message) = port_in_range(host) {
            r.add(path, message);
            continue;
        }
        match published.entry((host, port.protocol)) {
            Entry::Occupied(first) => r.add(
                &path,
                format!(
                    "{host}/{} is already published by ports[{}]",
                    port.protocol,
                    first.get()
                ),
            ),
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
        }
        match w.network {
            Network::None => r.add(path, "cannot publish a port with network none"),
            Network::Host if host != port.container => r.add(
                path,
                format!(
                    "must equal the container port ({}) with network host",
                    port.container
                ),
            ),
            _ => {}
        }
    }
}

fn check_volumes(r: &mut Report, w: &Workload) {
    let mut targets: BTreeMap<&Path, usize> = BTreeMap::new();
    for (i, v) in w.volumes.iter().enumerate() {
        let path = |field: &str| format!("volumes[{i}].{field}");
        if let Err(message) = check_absolute(&v.target) {
            r.add(path("target"), message);
        } else if v.target == Path::new("/") {
            r.add(path("target"), "cannot mount over /");
        } else if let Some(first) = targets.get(v.target.as_path()) {
            r.add(
                path("target"),
                format!(
                    "'{}' is already mounted by volumes[{first}]",
                    v.target.display()
                ),
            );
        } else {
            targets.insert(&v.target, i);
        }
        let not_for_type = |r: &mut Report, field: &str| {
            r.add(path(field), format!("does not apply to type {}", v.kind));
        };
        match v.kind {
            VolumeKind::Bind => match &v.source {
                None => r.add(path("source"), "is required for type bind"),
                Some(source) => {
                    if let Err(message) = check_absolute(source) {
                        r.add(path("source"), message);
                    }
                }
            },
            VolumeKind::Named => match &v.name {
                None => r.add(path("name"), "is required for type named"),
                Some(name) if !is_volume_name(name) => r.add(
                    path("name"),
                    format!(
                        "'{name}' is not a volume name (letters, digits, '_', '.' and '-', starting with a letter or digit, at most 63 characters)"
                    ),
                ),
                Some(_) => {}
            },
            VolumeKind::Tmpfs => {
                if v.size.is_some_and(|s| s.get() == 0) {
                    r.add(path("size"), "must be more than 0");
                }
            }
        }
        if v.kind != VolumeKind::Bind && v.source.is_some() {
            not_for_type(r, "source");
        }
        if v.kind != VolumeKind::Named && v.name.is_some() {
            not_for_type(r, "name");
        }
        if v.kind != VolumeKind::Tmpfs && v.size.is_some() {
            not_for_type(r, "size");
        }
    }
}

/// Docker's volume name rule, capped at 63 characters.
fn is_volume_name(name: &str) -> bool {
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn check_restart(r: &mut Report, w: &Workload) {
    if w.kind == Kind::Job && w.restart.policy == Some(RestartPolicy::Always) {
        r.add(
            "restart.policy",
            "always does not apply to kind Job (use on-failure or never)",
        );
    }
    let backoff = &w.restart.backoff;
    if backoff.initial.is_zero() {
        r.add("restart.backoff.initial", "must be more than 0s");
    } else if backoff.initial > backoff.max {
        r.add(
            "restart.backoff.initial",
            format!(
                "{} is longer than restart.backoff.max ({})",
                backoff.initial, backoff.max
            ),
        );
    }
}

fn check_probe(r: &mut Report, path: &str, probe: &Probe, liveness: bool) {
    let checks = [
        probe.exec.is_some(),
        probe.http.is_some(),
        probe.tcp.is_some(),
    ];
    match checks.iter().filter(|c| **c).count() {
        0 => r.add(path, "needs one of exec, http or tcp"),
        1 => {}
        _ => r.add(path, "must have only one of exec, http and tcp"),
    }
    if let Some(exec) = &probe.exec {
        if exec.command.first().is_none_or(String::is_empty) {
            r.add(format!("{path}.exec.command"), "must name a program");
        }
        check_strings(r, &format!("{path}.exec.command"), &exec.command);
    }
    if let Some(http) = &probe.http {
        if !http.path.starts_with('/') {
            r.add(
                format!("{path}.http.path"),
                format!("'{}' must start with '/'", http.path),
            );
        }
        if let Err(message) = port_in_range(http.port) {
            r.add(format!("{path}.http.port"), message);
        }
    }
    if let Some(tcp) = &probe.tcp
        && let Err(message) = port_in_range(tcp.port)
    {
        r.add(format!("{path}.tcp.port"), message);
    }
    if probe.period < MIN_PROBE_PERIOD {
        r.add(
            format!("{path}.period"),
            format!(
                "{} is shorter than the minimum of {MIN_PROBE_PERIOD}",
                probe.period
            ),
        );
    }
    if probe.timeout.is_zero() {
        r.add(format!("{path}.timeout"), "must be more than 0s");
    }
    if probe.failure_threshold == 0 {
        r.add(format!("{path}.failureThreshold"), "must be at least 1");
    }
    if probe.success_threshold == 0 {
        r.add(format!("{path}.successThreshold"), "must be at least 1");
    } else if liveness && probe.success_threshold != 1 {
        r.add(format!("{path}.successThreshold"), "must be 1 for liveness");
    }
}

fn check_placement(r: &mut Report, w: &Workload) {
    let p = &w.placement;
    check_labels(r, "placement.nodeSelector", &p.node_selector);
    for (i, constraint) in p.constraints.iter().enumerate() {
        if constraint.is_empty() {
            r.add(format!("placement.constraints[{i}]"), "must not be empty");
        }
    }
    if let Some(spread) = &p.spread
        && let Err(e) = validate_label_key(spread)
    {
        r.add("placement.spread", e.to_string());
    }
}

fn check_update(r: &mut Report, w: &Workload) {
    let Some(update) = &w.update else {
        return;
    };
    if w.kind == Kind::Job {
        r.add("update", "does not apply to kind Job");
    }
    if update.max_surge == 0 && update.max_unavailable == 0 {
        r.add(
            "update",
            "maxSurge and maxUnavailable must not both be 0 (the rollout could not progress)",
        );
    }
    if update.progress_deadline.is_zero() {
        r.add("update.progressDeadline", "must be more than 0s");
    }
}

/// Linux signal names, without the `SIG` prefix.
const SIGNALS: [&str; 33] = [
    "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "IOT", "BUS", "FPE", "KILL", "USR1", "SEGV",
    "USR2", "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU",
    "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "POLL", "PWR", "SYS",
];

/// A signal as Docker takes it: `SIGTERM`, `TERM`, `RTMIN+3`, or a number from 1 to 64.
fn is_signal(signal: &str) -> bool {
    if let Ok(n) = signal.parse::<u8>() {
        return (1..=64).contains(&n);
    }
    let name = signal.strip_prefix("SIG").unwrap_or(signal);
    if SIGNALS.contains(&name) || name == "RTMIN" || name == "RTMAX" {
        return true;
    }
    let offset = |s: Option<&str>| s.and_then(|n| n.parse::<u8>().ok());
    // SIGRTMIN is 34 and SIGRTMAX 64 on Linux.
    offset(name.strip_prefix("RTMIN+")).is_some_and(|n| (1..=30).contains(&n))
        || offset(name.strip_prefix("RTMAX-")).is_some_and(|n| (1..=30).contains(&n))
}

#[cfg(test)]
mod tests {
    use crate::workload::{Format, parse};

    #[test]
    fn validate_returns_every_error_with_its_path() {
        let text = "kind: Job\nname: Web\nimage: ''\nreplicas: 2\nports: [{container: 70000}]\nrestart: {backoff: {initial: 10m, max: 1m}}\n";
        let w = &parse(text, Format::Yaml).unwrap()[0];
        let paths: Vec<String> = w
            .validate()
            .unwrap_err()
            .0
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            paths,
            [
                "name",
                "replicas",
                "image",
                "ports[0].container",
                "restart.backoff.initial"
            ]
        );
    }
}
