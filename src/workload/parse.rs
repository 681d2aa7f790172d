//! Reading workloads from YAML (one or more `---` documents) or JSON (one object or an array),
//! with errors that name the document, the field path and, where the parser knows it, the line.

use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_path_to_error::Segment;
use serde_saphyr::{ExternalMessageSource, MessageFormatter, UserMessageFormatter};

use super::Workload;
use super::validate::{FieldError, ValidationErrors};

/// The text formats workloads are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// YAML 1.2, one workload per document.
    Yaml,
    /// JSON: one workload object, or an array of them.
    Json,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Yaml => "yaml",
            Format::Json => "json",
        })
    }
}

/// Why workloads could not be read. Documents (YAML documents, JSON array elements) are
/// numbered from 1, and named only when the input holds several.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The input holds no workload.
    #[error("no workload in the input")]
    Empty,
    /// The text is not YAML or JSON.
    #[error("{format} syntax error at line {line}, column {column}: {message}")]
    Syntax {
        /// The format the text was read as.
        format: Format,
        /// Line of the error, from 1.
        line: u64,
        /// Column of the error, from 1.
        column: u64,
        /// What the parser expected.
        message: String,
    },
    /// A document does not have the shape of a workload (unknown field, wrong type, a quantity,
    /// duration or selector that does not parse).
    #[error(
        "{}{}{message}{}",
        document_prefix(*.document),
        path_prefix(.path),
        location_suffix(*.location)
    )]
    Decode {
        /// Which document, when there are several.
        document: Option<usize>,
        /// Path of the field (`resources.memory`); empty for the document itself.
        path: String,
        /// What is wrong.
        message: String,
        /// Line and column, when known.
        location: Option<(u64, u64)>,
    },
    /// Documents that decoded but did not validate, each with all its errors.
    #[error("{}", join_documents(.0))]
    Invalid(Vec<DocumentErrors>),
}

/// The validation errors of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentErrors {
    /// Which document, when there are several.
    pub document: Option<usize>,
    /// Its errors.
    pub errors: ValidationErrors,
}

impl fmt::Display for DocumentErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", document_prefix(self.document), self.errors)
    }
}

fn document_prefix(document: Option<usize>) -> String {
    document.map_or_else(String::new, |d| format!("document {d}: "))
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

fn location_suffix(location: Option<(u64, u64)>) -> String {
    location.map_or_else(String::new, |(line, column)| {
        format!(" (line {line}, column {column})")
    })
}

fn join_documents(documents: &[DocumentErrors]) -> String {
    let parts: Vec<String> = documents.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// Reads every workload in `text`, without validating them.
pub fn parse(text: &str, format: Format) -> Result<Vec<Workload>, Error> {
    let workloads = match format {
        Format::Yaml => parse_yaml(text)?,
        Format::Json => parse_json(text)?,
    };
    if workloads.is_empty() {
        return Err(Error::Empty);
    }
    Ok(workloads)
}

/// Reads and validates every workload in `text`; names must be unique across the input.
pub fn parse_and_validate(text: &str, format: Format) -> Result<Vec<Workload>, Error> {
    let workloads = parse(text, format)?;
    let several = workloads.len() > 1;
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut invalid = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        let mut errors = w.validate().err().map(|e| e.0).unwrap_or_default();
        match names.entry(&w.name) {
            Entry::Occupied(first) => errors.push(FieldError {
                path: "name".to_string(),
                message: format!(
                    "'{}' is already used by document {}",
                    w.name,
                    first.get() + 1
                ),
            }),
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
        }
        if !errors.is_empty() {
            invalid.push(DocumentErrors {
                document: several.then_some(i + 1),
                errors: ValidationErrors(errors),
            });
        }
    }
    if invalid.is_empty() {
        Ok(workloads)
    } else {
        Err(Error::Invalid(invalid))
    }
}

thread_local! {
    /// The field path at which the last `Tracked` failed to decode on this thread.
    static FAILED_PATH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A workload decoded with its field path tracked. serde-saphyr's document iterator takes a
/// type rather than a function, and its errors carry the location only while they stay its own
/// type, so the path leaves through `FAILED_PATH` and the error goes back unchanged.
struct Tracked(Workload);

impl<'de> Deserialize<'de> for Tracked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        serde_path_to_error::deserialize(deserializer)
            .map(Tracked)
            .map_err(|e| {
                let path = field_path(e.path().iter());
                FAILED_PATH.with_borrow_mut(|p| *p = path);
                e.into_inner()
            })
    }
}

/// `resources.memory`, `ports[1].host`; empty for the root, `?` for an unknown step.
fn field_path<'a>(segments: impl Iterator<Item = &'a Segment>) -> String {
    let mut path = String::new();
    for segment in segments {
        if !matches!(segment, Segment::Seq { .. }) && !path.is_empty() {
            path.push('.');
        }
        path.push_str(&segment.to_string());
    }
    if path == "?" { String::new() } else { path }
}

fn parse_yaml(text: &str) -> Result<Vec<Workload>, Error> {
    FAILED_PATH.with_borrow_mut(String::clear);
    let mut reader = text.as_bytes();
    let mut workloads = Vec::new();
    let mut first_error = None;
    let mut documents = 0;
    // The iterator goes on after a document that does not decode; reading to the end tells
    // whether there are several documents to name.
    for result in serde_saphyr::read::<_, Tracked>(&mut reader) {
        documents += 1;
        match result {
            Ok(Tracked(w)) => workloads.push(w),
            Err(e) => {
                // Taken at every error so that no path outlives its document.
                let path = FAILED_PATH.with_borrow_mut(std::mem::take);
                if first_error.is_none() {
                    first_error = Some((documents, path, e));
                }
            }
        }
    }
    let Some((document, path, e)) = first_error else {
        return Ok(workloads);
    };
    let e = e.without_snippet();
    let message = UserMessageFormatter.format_message(e).into_owned();
    let location = e.location().map(|l| (l.line(), l.column()));
    let syntax = match e {
        serde_saphyr::Error::ExternalMessage { source, .. } => {
            matches!(**source, ExternalMessageSource::Parser(_))
        }
        serde_saphyr::Error::Eof { .. } => true,
        _ => false,
    };
    Err(match location {
        Some((line, column)) if syntax => Error::Syntax {
            format: Format::Yaml,
            line,
            column,
            message,
        },
        _ => Error::Decode {
            document: (documents > 1).then_some(document),
            path,
            message,
            location,
        },
    })
}

fn parse_json(text: &str) -> Result<Vec<Workload>, Error> {
    let array = text.trim_start().starts_with('[');
    let mut de = serde_json::Deserializer::from_str(text);
    let decoded = if array {
        serde_path_to_error::deserialize::<_, Vec<Workload>>(&mut de)
    } else {
        serde_path_to_error::deserialize::<_, Workload>(&mut de).map(|w| vec![w])
    };
    let workloads = decoded.map_err(|e| {
        let mut segments = e.path().iter().peekable();
        let document = match segments.peek() {
            Some(Segment::Seq { index }) if array => {
                let document = index + 1;
                segments.next();
                Some(document)
            }
            _ => None,
        };
        let path = field_path(segments);
        json_error(e.inner(), document, path)
    })?;
    de.end().map_err(|e| json_error(&e, None, String::new()))?;
    Ok(workloads)
}

fn json_error(e: &serde_json::Error, document: Option<usize>, path: String) -> Error {
    // serde_json has no accessor for the bare message; it appends the position it also exposes.
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
    match e.classify() {
        serde_json::error::Category::Data => Error::Decode {
            document,
            path,
            message,
            location: (e.line() > 0).then_some((e.line() as u64, e.column() as u64)),
        },
        _ => Error::Syntax {
            format: Format::Json,
            line: e.line() as u64,
            column: e.column() as u64,
            message,
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::duration::Duration;
    use crate::quantity::{Bytes, Cpu};
    use crate::workload::{Kind, Mode, Network, Protocol, RestartPolicy, Update, VolumeKind};

    /// A Service using every field; other modules' tests use it too.
    pub(crate) const EXAMPLE: &str = r#"
kind: Service
name: web
labels: {app: web}
replicas: 3
image: registry.example:5000/web:1.2
command: ["httpd"]
args: ["-f", "-p", "80"]
env: {GREETING: hello}
workingDir: /srv
user: "1000:1000"
resources: {cpu: "0.5", memory: 64Mi, pids: 128}
ports: [{container: 80, host: 8080, protocol: tcp}]
volumes: [{type: bind, source: /data, target: /data, readOnly: true}, {type: tmpfs, target: /tmp, size: 64Mi}, {type: named, name: cache, target: /cache}]
restart: {policy: always, backoff: {initial: 1s, max: 5m}}
health: {readiness: {http: {path: /, port: 80}, period: 2s}, liveness: {tcp: {port: 80}}}
placement: {nodeSelector: {zone: a}, constraints: ["disk in (ssd,nvme)"], spread: zone, antiAffinity: true}
priority: 100
update: {maxSurge: 1, maxUnavailable: 0, autoRollback: true, progressDeadline: 10m}
stopSignal: SIGTERM
stopGracePeriod: 10s
network: bridge   # or host / none
"#;

    #[test]
    fn example_parses_validates_and_round_trips_through_json() {
        let parsed = parse_and_validate(EXAMPLE, Format::Yaml).unwrap();
        assert_eq!(parsed.len(), 1);
        let w = &parsed[0];
        assert_eq!(w.kind, Kind::Service);
        assert_eq!(w.mode(), Mode::Service { replicas: 3 });
        assert_eq!(w.user.as_deref(), Some("1000:1000"));
        assert_eq!(w.resources.cpu, Some(Cpu::from_millis(500)));
        assert_eq!(w.resources.memory, Some(Bytes::new(64 << 20)));
        assert_eq!(w.resources.pids, Some(128));
        assert_eq!(w.ports[0].host, Some(8080));
        assert_eq!(w.volumes[1].kind, VolumeKind::Tmpfs);
        assert_eq!(w.volumes[2].name.as_deref(), Some("cache"));
        assert!(w.volumes[0].read_only);
        let readiness = w.health.readiness.as_ref().unwrap();
        assert_eq!(readiness.period, Duration::from_secs(2));
        assert_eq!(readiness.timeout, Duration::from_secs(1));
        assert_eq!(readiness.failure_threshold, 3);
        assert_eq!(w.placement.constraints[0].to_string(), "disk in (nvme,ssd)");
        assert_eq!(w.priority, 100);
        assert_eq!(w.network, Network::Bridge);

        let json = serde_json::to_string_pretty(&parsed).unwrap();
        assert!(json.contains(r#""cpu": "500m""#), "{json}");
        assert!(json.contains(r#""progressDeadline": "10m""#), "{json}");
        assert_eq!(parse_and_validate(&json, Format::Json).unwrap(), parsed);
        let one = serde_json::to_string(w).unwrap();
        assert_eq!(parse(&one, Format::Json).unwrap(), parsed);
    }

    #[test]
    fn defaults() {
        let service = &parse("kind: Service\nname: a\nimage: a\n", Format::Yaml).unwrap()[0];
        assert_eq!(service.mode(), Mode::Service { replicas: 1 });
        assert_eq!(service.restart_policy(), RestartPolicy::Always);
        assert_eq!(service.restart.backoff.initial, Duration::from_secs(1));
        assert_eq!(service.restart.backoff.max, Duration::from_secs(300));
        assert_eq!(service.stop_signal, "SIGTERM");
        assert_eq!(service.stop_grace_period, Duration::from_secs(10));
        assert_eq!(service.priority, 0);
        assert_eq!(service.network, Network::Bridge);
        assert_eq!(
            service.update_strategy(),
            Update {
                max_surge: 1,
                max_unavailable: 0,
                auto_rollback: true,
                progress_deadline: Duration::from_secs(600),
            }
        );
        let job = &parse("kind: Job\nname: a\nimage: a\n", Format::Yaml).unwrap()[0];
        assert_eq!(
            job.mode(),
            Mode::Job {
                completions: 1,
                parallelism: 1,
                backoff_limit: 6
            }
        );
        assert_eq!(job.restart_policy(), RestartPolicy::OnFailure);
        let daemon = &parse("kind: Daemon\nname: a\nimage: a\n", Format::Yaml).unwrap()[0];
        assert_eq!(daemon.mode(), Mode::Daemon);
        assert_eq!(daemon.restart_policy(), RestartPolicy::Always);

        let w = &parse(
            "{kind: Service, name: a, image: a, ports: [{container: 53, protocol: udp}, {container: 80}], env: {PORT: 80, RATIO: 1.10}, health: {liveness: {exec: {command: [true]}}}}",
            Format::Yaml,
        )
        .unwrap()[0];
        assert_eq!(w.ports[0].protocol, Protocol::Udp);
        assert_eq!(w.ports[1].protocol, Protocol::Tcp);
        // Unquoted scalars are strings where the spec wants strings, as written.
        assert_eq!(w.env["PORT"], "80");
        assert_eq!(w.env["RATIO"], "1.10");
        let liveness = w.health.liveness.as_ref().unwrap();
        assert_eq!(liveness.period, Duration::from_secs(10));
        assert_eq!(liveness.success_threshold, 1);
        assert_eq!(liveness.initial_delay, Duration::ZERO);
        // Defaults are written out, so the JSON form is complete.
        let json = serde_json::to_string(w).unwrap();
        assert!(json.contains(r#""stopGracePeriod":"10s""#), "{json}");
        assert!(json.contains(r#""protocol":"udp""#), "{json}");
    }

    /// A valid Service, with the fields that `extra` sets left out.
    fn document(extra: &str) -> String {
        let sets = |key: &str| extra.lines().any(|l| l.starts_with(&format!("{key}:")));
        let mut doc = String::new();
        for (key, line) in [
            ("kind", "kind: Service"),
            ("name", "name: web"),
            ("image", "image: web:1"),
        ] {
            if !sets(key) {
                doc.push_str(line);
                doc.push('\n');
            }
        }
        doc.push_str(extra);
        doc
    }

    /// Parses and validates a Service with `extra` YAML lines and compares the error (all of it,
    /// or its start when `expected` ends with `…`) or `ok`.
    #[track_caller]
    fn check(extra: &str, expected: &str) {
        check_text(&document(extra), Format::Yaml, expected);
    }

    #[track_caller]
    fn check_text(text: &str, format: Format, expected: &str) {
        let got = match parse_and_validate(text, format) {
            Ok(_) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        match expected.strip_suffix('…') {
            Some(prefix) => assert!(got.starts_with(prefix), "{text}\ngot: {got}"),
            None => assert_eq!(got, expected, "{text}"),
        }
    }

    #[test]
    #[rustfmt::skip]
    fn validation_errors_name_their_field() {
        check("", "ok");
        check("name: Web_1", "name: must be a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters), not 'Web_1'");
        check("name: ''", "name: must not be empty");
        check("name: web-", "name: must be a DNS label…");
        check("labels: {Bad Key: x}", "labels.Bad Key: 'Bad Key' is not a valid label key: the name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
        check("labels: {app: -x}", "labels.app: '-x' is not a valid label value: must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
        check("image: ''", "image: must not be empty");
        check("image: Web", "image: 'Web' is not an image reference: the repository path must be lowercase letters and digits, separated by '/', '.', '_', '__' or '-'");
        check("image: web:-1", "image: 'web:-1' is not an image reference: the tag must be 1 to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'");
        check("image: web@sha256:xyz", "image: 'web@sha256:xyz' is not an image reference: the digest must be algorithm:hex (like sha256:…)");
        check("image: 'a b'", "image: 'a b' is not an image reference: it contains whitespace");
        check("image: host:99999/web", "image: 'host:99999/web' is not an image reference: the registry must be host or host:port");
        check("image: localhost/a__b/c-d.e_f:v1.0-rc_1@sha256:0123456789abcdef0123456789abcdef", "ok");
        check("image: docker.io/library/busybox", "ok");
        check("kind: Job\nreplicas: 2", "replicas: does not apply to kind Job (use completions and parallelism)");
        check("kind: Daemon\nreplicas: 2", "replicas: does not apply to kind Daemon (it runs one instance on every eligible node)");
        check("completions: 2", "completions: only applies to kind Job, not Service");
        check("kind: Daemon\nparallelism: 2\nbackoffLimit: 1", "parallelism: only applies to kind Job, not Daemon; backoffLimit: only applies to kind Job, not Daemon");
        check("kind: Job\ncompletions: 0\nparallelism: 0\nbackoffLimit: 0", "completions: must be at least 1; parallelism: must be at least 1");
        check("kind: Job\nrestart: {policy: always}", "restart.policy: always does not apply to kind Job (use on-failure or never)");
        check("kind: Job\nrestart: {policy: never}", "ok");
        check("kind: Job\nupdate: {}", "update: does not apply to kind Job");
        check("command: ['']\nargs: [\"a\\0b\"]", "command[0]: must name a program; args[0]: contains a NUL byte");
        check("args: [\"a\\0b\"]", "args[0]: contains a NUL byte");
        check("env: {1BAD: x, GOOD_1: y, 'a=b': z}", "env.1BAD: '1BAD' is not a variable name (letters, digits, '_', '.' and '-', not starting with a digit); env.a=b: 'a=b' is not a variable name (letters, digits, '_', '.' and '-', not starting with a digit)");
        check("workingDir: srv", "workingDir: 'srv' must be an absolute path");
        check("workingDir: /srv/../etc", "workingDir: '/srv/../etc' must not contain '..'");
        check("user: '1000:'", "user: '1000:' is not a user (name, uid, name:group or uid:gid)");
        check("user: a:b:c", "user: 'a:b:c' is not a user (name, uid, name:group or uid:gid)");
        check("user: www-data:www", "ok");
        check("resources: {cpu: 0, memory: 1Mi, pids: 0}", "resources.cpu: must be more than 0; resources.memory: 1Mi is below the minimum of 6Mi; resources.pids: must be at least 1");
        check("ports: [{container: 80}, {container: 80, host: 70000}]", "ports[1].host: 70000 is out of range (1-65535)");
        check("ports: [{container: 0}]", "ports[0].container: 0 is out of range (1-65535)");
        check("ports: [{container: 80, host: 8080}, {container: 81, host: 8080}, {container: 82, host: 8080, protocol: udp}, {container: 83, host: 8080}]", "ports[1].host: 8080/tcp is already published by ports[0]; ports[3].host: 8080/tcp is already published by ports[0]");
        check("network: none\nports: [{container: 80, host: 8080}, {container: 81}]", "ports[0].host: cannot publish a port with network none");
        check("network: host\nports: [{container: 80, host: 8080}, {container: 81, host: 81}]", "ports[0].host: must equal the container port (80) with network host");
        check("volumes: [{type: bind, target: data}]", "volumes[0].target: 'data' must be an absolute path; volumes[0].source: is required for type bind");
        check("volumes: [{type: bind, source: rel, target: /a, name: x, size: 1Mi}]", "volumes[0].source: 'rel' must be an absolute path; volumes[0].name: does not apply to type bind; volumes[0].size: does not apply to type bind");
        check("volumes: [{type: tmpfs, target: /a, source: /b, size: 0}]", "volumes[0].size: must be more than 0; volumes[0].source: does not apply to type tmpfs");
        check("volumes: [{type: named, target: /a}, {type: named, name: -x, target: /b}]", "volumes[0].name: is required for type named; volumes[1].name: '-x' is not a volume name (letters, digits, '_', '.' and '-', starting with a letter or digit, at most 63 characters)");
        check("volumes: [{type: tmpfs, target: /a}, {type: tmpfs, target: /a/}, {type: tmpfs, target: /}]", "volumes[1].target: '/a/' is already mounted by volumes[0]; volumes[2].target: cannot mount over /");
        check("restart: {backoff: {initial: 10m}}", "restart.backoff.initial: 10m is longer than restart.backoff.max (5m)");
        check("restart: {backoff: {initial: 0s}}", "restart.backoff.initial: must be more than 0s");
        check("health: {readiness: {period: 2s}}", "health.readiness: needs one of exec, http or tcp");
        check("health: {liveness: {tcp: {port: 1}, http: {port: 1}}}", "health.liveness: must have only one of exec, http and tcp");
        check("health: {liveness: {tcp: {port: 70000}}}", "health.liveness.tcp.port: 70000 is out of range (1-65535)");
        check("health: {readiness: {http: {port: 0, path: healthz}}}", "health.readiness.http.path: 'healthz' must start with '/'; health.readiness.http.port: 0 is out of range (1-65535)");
        check("health: {readiness: {exec: {command: []}, period: 500ms, timeout: 0s, failureThreshold: 0, successThreshold: 0}}", "health.readiness.exec.command: must name a program; health.readiness.period: 500ms is shorter than the minimum of 1s; health.readiness.timeout: must be more than 0s; health.readiness.failureThreshold: must be at least 1; health.readiness.successThreshold: must be at least 1");
        check("health: {readiness: {tcp: {port: 80}, successThreshold: 2}, liveness: {tcp: {port: 80}, successThreshold: 2}}", "health.liveness.successThreshold: must be 1 for liveness");
        check("placement: {constraints: ['']}", "placement.constraints[0]: must not be empty");
        check("placement: {nodeSelector: {Zone!: a}, spread: -zone}", "placement.nodeSelector.Zone!: 'Zone!' is not a valid label key: the name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit; placement.spread: '-zone' is not a valid label key: the name must consist of letters, digits, '-', '_' and '.', and start and end with a letter or digit");
        check("update: {maxSurge: 0, progressDeadline: 0s}", "update: maxSurge and maxUnavailable must not both be 0 (the rollout could not progress); update.progressDeadline: must be more than 0s");
        check("stopSignal: SIGFOO", "stopSignal: 'SIGFOO' is not a signal (a name like SIGTERM or a number from 1 to 64)");
        check("stopSignal: '65'", "stopSignal: '65' is not a signal (a name like SIGTERM or a number from 1 to 64)");
        check("stopSignal: QUIT", "ok");
        check("stopSignal: SIGRTMIN+3", "ok");
        check("stopSignal: '9'", "ok");
        check("stopGracePeriod: 2h", "stopGracePeriod: 2h is longer than the maximum of 1h");
        // Every error at once, in field order.
        check("name: Web\nimage: ''\nports: [{container: 70000}]", "name: must be a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters), not 'Web'; image: must not be empty; ports[0].container: 70000 is out of range (1-65535)");
    }

    #[test]
    #[rustfmt::skip]
    fn decode_errors_name_their_field_and_line() {
        check("resources: {memory: 64Q}", "resources.memory: '64Q' is not a quantity (line 4, column 21)");
        check("resources:\n  cpu: 0.0005", "resources.cpu: '0.0005' is finer than a millicore (at most 3 decimals) (line 5, column 8)");
        check("placement: {constraints: [zone=a, 'disk in (ssd']}", "placement.constraints[1]: expected ',' or ')' at column 13, found end of input (line 4, column 35)");
        check("stopGracePeriod: 10", "stopGracePeriod: '10' is missing a unit (like 10s, 5m or 250ms) (line 4, column 18)");
        check("restart: {policy: sometimes}", "restart.policy: unknown variant `sometimes`, expected one of always, on-failure, never (line 4, column 19)");
        check("bogus: 1", "bogus: unknown field `bogus`…");
        check("resources: {gpu: 1}", "resources.gpu: unknown field `gpu`…");
        check("volumes: [{type: nfs, target: /a}]", "volumes[0].type: unknown variant `nfs`…");
        check("replicas: -1", "replicas: …");
        check("kind: Pod", "kind: unknown variant `Pod`, expected one of Service, Job, Daemon (line 3, column 7)");
        check_text("kind: Service\nname: web\n", Format::Yaml, "missing field `image`…");
    }

    #[test]
    #[rustfmt::skip]
    fn syntax_errors_name_the_line() {
        check_text("kind: Service\nname: web\n  image: x\n", Format::Yaml, "yaml syntax error at line 3, column …");
        check_text("kind: Service\nports: [{container: 80}\n", Format::Yaml, "yaml syntax error at line …");
        check_text("{\"kind\": \"Service\",\n\"name\": }", Format::Json, "json syntax error at line 2, column 9: expected value");
        check_text("{\"kind\": \"Service\", \"name\": \"a\", \"image\": \"a\"} x", Format::Json, "json syntax error at line 1, column 48: trailing characters");
    }

    #[test]
    #[rustfmt::skip]
    fn several_documents() {
        let yaml = "kind: Service\nname: a\nimage: a\n---\nkind: Job\nname: b\nimage: b\n---\nkind: Daemon\nname: c\nimage: c\n";
        let names: Vec<String> = parse_and_validate(yaml, Format::Yaml)
            .unwrap()
            .into_iter()
            .map(|w| w.name)
            .collect();
        assert_eq!(names, ["a", "b", "c"]);
        // A leading `---` and a trailing empty document are not documents.
        assert_eq!(
            parse(&format!("---\n{yaml}---\n"), Format::Yaml)
                .unwrap()
                .len(),
            3
        );

        check_text("kind: Service\nname: a\nimage: a\n---\nkind: Service\nname: b\nimage: b\nresources: {memory: 64Q}\n---\nkind: Service\nname: c\nimage: c\n", Format::Yaml, "document 2: resources.memory: '64Q' is not a quantity (line 8, column 21)");
        check_text("kind: Service\nname: a\nimage: a\n---\nkind: Service\nname: B\nimage: ''\n---\nkind: Service\nname: a\nimage: a\n", Format::Yaml, "document 2: name: must be a DNS label (lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters), not 'B'; image: must not be empty; document 3: name: 'a' is already used by document 1");
        check_text(r#"[{"kind": "Service", "name": "a", "image": "a"}, {"kind": "Job", "name": "b", "image": "b", "replicas": 2}]"#, Format::Json, "document 2: replicas: does not apply to kind Job (use completions and parallelism)");
        check_text(r#"[{"kind": "Service", "name": "a", "image": "a"}, {"kind": "Job", "name": "b", "image": "b", "resources": {"memory": "1Q"}}]"#, Format::Json, "document 2: resources.memory: '1Q' is not a quantity (line 1, column 120)");
        check_text(r#"{"kind": "Job", "name": "b", "image": "b", "ports": [{"container": 1, "hots": 2}]}"#, Format::Json, "ports[0].hots: unknown field `hots`, expected one of `container`, `host`, `protocol` (line 1, column 76)");
        check_text(r#"[{"kind": "Service", "name": "a", "image": "a"}]"#, Format::Json, "ok");
        check_text("[]", Format::Json, "no workload in the input");
        check_text("", Format::Yaml, "no workload in the input");
        check_text("# nothing\n---\n", Format::Yaml, "no workload in the input");
    }
}
