//! Gantry's own description of a container (what the agent asks the runtime for), and its
//! validation: every error names the field and the reason, and is found before anything is created.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::user;

/// The search path used when a spec's environment has no `PATH`, as Docker does.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Smallest memory limit accepted; below this the runtime itself cannot start (Docker: 6 MiB).
pub const MIN_MEMORY: u64 = 6 * 1024 * 1024;
/// Largest memory limit accepted (1 PiB): anything above is a unit mistake.
pub const MAX_MEMORY: u64 = 1 << 50;
/// Largest CPU request accepted, in millicores (1024 cores).
pub const MAX_CPU_MILLIS: u64 = 1024 * 1000;
/// Largest pids limit accepted.
pub const MAX_PIDS: i64 = 4_194_304;
/// Longest stop grace period accepted.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);

/// Everything needed to create one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerSpec {
    /// Unique id on this node: letters, digits, `_`, `-`, `.`; at most 128 characters.
    pub id: String,
    /// The root filesystem prepared by the image layer (absolute path of a directory).
    pub rootfs: PathBuf,
    /// Mount the root filesystem read-only.
    #[serde(default)]
    pub readonly_rootfs: bool,
    /// The process to run.
    pub process: ProcessSpec,
    /// Hostname inside the container; defaults to the first 12 characters of the id.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Resource limits.
    #[serde(default)]
    pub resources: Resources,
    /// Extra mounts (binds and tmpfs).
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Network namespace choice.
    #[serde(default)]
    pub network: NetworkMode,
    /// Extra /etc/hosts entries: name → address.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
    /// The whole /etc/resolv.conf; `None`: the host's, without loopback nameservers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
    /// Disable all hardening (all capabilities, no seccomp, no masked paths, all devices).
    #[serde(default)]
    pub privileged: bool,
    /// Capabilities added to Docker's default set (`NET_ADMIN` or `CAP_NET_ADMIN`; `ALL`).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// Capabilities removed from the default set (`ALL` removes every one).
    #[serde(default)]
    pub cap_drop: Vec<String>,
    /// Labels carried for status and metrics (workload, instance).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The container's main process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessSpec {
    /// Program and arguments; the program is looked up in `PATH` inside the rootfs.
    pub args: Vec<String>,
    /// Environment as `KEY=value` strings.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (absolute); `/` when empty.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// User as Docker takes it: `name`, `uid`, `name:group`, `uid:gid`; empty means root.
    #[serde(default)]
    pub user: String,
}

/// Resource limits, applied through cgroups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// CPU in millicores (`500` = half a core): sets both the CFS quota and the shares/weight.
    pub cpu_millis: Option<u64>,
    /// Memory limit in bytes (swap is not allowed beyond it).
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<i64>,
    /// CPUs the container may run on, cpuset syntax (`0-1,3`).
    pub cpuset: Option<String>,
}

/// One extra mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mount {
    /// Absolute path inside the container.
    pub destination: PathBuf,
    /// What to mount there.
    pub kind: MountKind,
    /// Mount read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// The kinds of extra mount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum MountKind {
    /// A bind mount of an absolute host path.
    Bind {
        /// Host path.
        source: PathBuf,
    },
    /// A fresh tmpfs of at most `size_bytes`.
    Tmpfs {
        /// Size limit in bytes.
        size_bytes: Option<u64>,
    },
}

/// Which network namespace the container gets.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum NetworkMode {
    /// A fresh network namespace with only loopback.
    #[default]
    None,
    /// The host's network namespace.
    Host,
    /// An existing network namespace (prepared by CNI), given by its bind-mount path.
    Path(PathBuf),
}

/// A process to run inside a running container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecSpec {
    /// Program and arguments.
    pub args: Vec<String>,
    /// Extra environment (`KEY=value`), on top of the container's.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; the container's when `None`.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// User; the container's when empty.
    #[serde(default)]
    pub user: String,
    /// Cap on collected stdout and stderr, each, in bytes.
    #[serde(default = "default_output_limit")]
    pub output_limit: usize,
    /// Give the process a pseudo-terminal as its controlling terminal and its stdin, stdout and
    /// stderr (`docker exec -t`): its output is then one stream, and `TERM=xterm` is set unless
    /// the environment has a `TERM`.
    #[serde(default)]
    pub tty: bool,
    /// Keep the process's stdin open for the caller to write to (`docker exec -i`); when false it
    /// reads from /dev/null (or, with a TTY, nothing is ever typed).
    #[serde(default)]
    pub stdin: bool,
}

fn default_output_limit() -> usize {
    16 << 20
}

impl ExecSpec {
    /// An exec of `args` with the container's environment, directory and user.
    pub fn new<S: Into<String>>(args: impl IntoIterator<Item = S>) -> Self {
        ExecSpec {
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            user: String::new(),
            output_limit: default_output_limit(),
            tty: false,
            stdin: false,
        }
    }
}

impl ContainerSpec {
    /// A spec running `args` in `rootfs` with every other field at its default: root user, no
    /// limits, no extra mounts, a network namespace with only loopback, Docker's hardening.
    pub fn new<S: Into<String>>(
        id: &str,
        rootfs: &Path,
        args: impl IntoIterator<Item = S>,
    ) -> ContainerSpec {
        ContainerSpec {
            id: id.to_string(),
            rootfs: rootfs.to_path_buf(),
            readonly_rootfs: false,
            process: ProcessSpec {
                args: args.into_iter().map(Into::into).collect(),
                env: Vec::new(),
                cwd: None,
                user: String::new(),
            },
            hostname: None,
            resources: Resources::default(),
            mounts: Vec::new(),
            network: NetworkMode::None,
            hosts: BTreeMap::new(),
            resolv_conf: None,
            privileged: false,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// One thing wrong with a spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, as in the spec (`resources.memoryBytes`).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Every error found in a spec, in field order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<FieldError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "invalid container spec: {}", parts.join("; "))
    }
}

impl std::error::Error for SpecErrors {}

impl SpecErrors {
    /// Whether the program of the process could not be found or run, which Docker reports as
    /// exit code 127.
    pub fn is_exec_failure(&self) -> bool {
        self.0.iter().any(|e| e.field == "process.args[0]")
    }
}

/// What validation resolved on the way, used to build the OCI spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// The user the process runs as.
    pub user: user::ResolvedUser,
    /// The process environment with `PATH` and `HOME` filled in.
    pub env: Vec<String>,
    /// The hostname.
    pub hostname: String,
    /// Capabilities of the process (`CAP_…`), sorted.
    pub capabilities: Vec<String>,
}

/// Checks `spec` completely and returns what it resolved, or every error found.
pub fn validate(spec: &ContainerSpec) -> Result<Validated, SpecErrors> {
    let mut errs = Vec::new();
    let mut err = |field: &str, reason: String| {
        errs.push(FieldError {
            field: field.to_string(),
            reason,
        })
    };

    if let Err(reason) = check_id(&spec.id) {
        err("id", reason);
    }
    let rootfs_ok = if !spec.rootfs.is_absolute() {
        err(
            "rootfs",
            format!("{:?} is not an absolute path", spec.rootfs),
        );
        false
    } else if !spec.rootfs.is_dir() {
        err("rootfs", format!("{:?} is not a directory", spec.rootfs));
        false
    } else {
        true
    };

    // Environment.
    for (i, kv) in spec.process.env.iter().enumerate() {
        if let Err(reason) = check_env(kv) {
            err(&format!("process.env[{i}]"), reason);
        }
    }
    let mut env = spec.process.env.clone();
    if !env.iter().any(|kv| kv.starts_with("PATH=")) {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    let path_var = env
        .iter()
        .rev()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH)
        .to_string();

    // Process.
    match spec.process.args.first() {
        None => err("process.args", "must name a program".into()),
        Some(prog) if prog.is_empty() => err("process.args[0]", "is empty".into()),
        Some(prog) if rootfs_ok => {
            if let Err(reason) = find_executable(&spec.rootfs, prog, &path_var) {
                err("process.args[0]", reason);
            }
        }
        Some(_) => {}
    }
    for (i, a) in spec.process.args.iter().enumerate() {
        if a.contains('\0') {
            err(&format!("process.args[{i}]"), "contains a NUL byte".into());
        }
    }
    if let Some(cwd) = &spec.process.cwd
        && let Err(reason) = check_container_path(cwd)
    {
        err("process.cwd", reason);
    }
    let resolved_user = if rootfs_ok {
        match user::resolve(&spec.rootfs, &spec.process.user) {
            Ok(u) => Some(u),
            Err(e) => {
                err("process.user", e.to_string());
                None
            }
        }
    } else {
        None
    };
    if let Some(u) = &resolved_user
        && !env.iter().any(|kv| kv.starts_with("HOME="))
    {
        env.push(format!("HOME={}", u.home));
    }

    // Hostname.
    let hostname = spec
        .hostname
        .clone()
        .unwrap_or_else(|| spec.id.chars().take(12).collect());
    if let Err(reason) = check_hostname(&hostname) {
        err("hostname", reason);
    }
    for (name, addr) in &spec.hosts {
        if check_hostname(name).is_err() {
            err(&format!("hosts.{name}"), "is not a valid host name".into());
        }
        if addr.parse::<std::net::IpAddr>().is_err() {
            err(
                &format!("hosts.{name}"),
                format!("{addr:?} is not an IP address"),
            );
        }
    }

    // Resources.
    let r = &spec.resources;
    if let Some(m) = r.memory_bytes {
        if m < MIN_MEMORY {
            err(
                "resources.memoryBytes",
                format!("{m} is below the minimum of {MIN_MEMORY} bytes (6 MiB)"),
            );
        } else if m > MAX_MEMORY {
            err(
                "resources.memoryBytes",
                format!("{m} is above the maximum of {MAX_MEMORY} bytes (1 PiB)"),
            );
        }
    }
    if let Some(c) = r.cpu_millis
        && (c == 0 || c > MAX_CPU_MILLIS)
    {
        err(
            "resources.cpuMillis",
            format!("{c} is out of range: must be between 1 and {MAX_CPU_MILLIS}"),
        );
    }
    if let Some(p) = r.pids
        && !(1..=MAX_PIDS).contains(&p)
    {
        err(
            "resources.pids",
            format!("{p} is out of range: must be between 1 and {MAX_PIDS}"),
        );
    }
    if let Some(cs) = &r.cpuset
        && !is_cpuset(cs)
    {
        err(
            "resources.cpuset",
            format!("{cs:?} is not a cpu list like 0-1,3"),
        );
    }

    // Mounts.
    for (i, m) in spec.mounts.iter().enumerate() {
        if let Err(reason) = check_container_path(&m.destination) {
            err(&format!("mounts[{i}].destination"), reason);
        }
        if let MountKind::Bind { source } = &m.kind {
            if !source.is_absolute() {
                err(
                    &format!("mounts[{i}].source"),
                    format!("{source:?} is not an absolute path"),
                );
            } else if !source.exists() {
                err(
                    &format!("mounts[{i}].source"),
                    format!("{source:?} does not exist"),
                );
            }
        }
    }
    if let NetworkMode::Path(p) = &spec.network {
        if !p.is_absolute() {
            err("network", format!("{p:?} is not an absolute path"));
        } else if !p.exists() {
            err("network", format!("network namespace {p:?} does not exist"));
        }
    }

    // Capabilities.
    let capabilities = match capabilities(spec) {
        Ok(c) => c,
        Err(e) => {
            errs.push(e);
            Vec::new()
        }
    };

    match resolved_user {
        Some(user) if errs.is_empty() => Ok(Validated {
            user,
            env,
            hostname,
            capabilities,
        }),
        _ => Err(SpecErrors(errs)),
    }
}

/// Docker's default capability set: exactly these, nothing inheritable or ambient.
pub const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability the kernel knows as of Linux 6.x, in number order.
pub const ALL_CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The process's capabilities: Docker's defaults (all of them when privileged), plus `cap_add`,
/// minus `cap_drop`. Names are accepted with or without the `CAP_` prefix, in any case.
fn capabilities(spec: &ContainerSpec) -> Result<Vec<String>, FieldError> {
    let canon = |field: &str, name: &str| -> Result<Option<String>, FieldError> {
        let upper = name.trim().to_ascii_uppercase();
        if upper == "ALL" {
            return Ok(None);
        }
        let full = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        if ALL_CAPABILITIES.contains(&full.as_str()) {
            Ok(Some(full))
        } else {
            Err(FieldError {
                field: field.to_string(),
                reason: format!("unknown capability {name:?}"),
            })
        }
    };
    // A process can only hand out capabilities in its own bounding set: "all" means all of
    // those, and asking for one outside it is an error rather than a failed create.
    let host = host_capabilities();
    let all = || {
        ALL_CAPABILITIES
            .iter()
            .filter(|c| host.contains(*c))
            .map(|c| c.to_string())
    };
    let mut caps: std::collections::BTreeSet<String> = if spec.privileged {
        all().collect()
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .filter(|c| host.contains(*c))
            .map(|c| c.to_string())
            .collect()
    };
    for (i, name) in spec.cap_drop.iter().enumerate() {
        match canon(&format!("capDrop[{i}]"), name)? {
            None => caps.clear(),
            Some(c) => {
                caps.remove(&c);
            }
        }
    }
    for (i, name) in spec.cap_add.iter().enumerate() {
        match canon(&format!("capAdd[{i}]"), name)? {
            None => caps.extend(all()),
            Some(c) if !host.contains(&c.as_str()) => {
                return Err(FieldError {
                    field: format!("capAdd[{i}]"),
                    reason: format!("{c} is not in the agent's bounding set"),
                });
            }
            Some(c) => {
                caps.insert(c);
            }
        }
    }
    Ok(caps.into_iter().collect())
}

/// The capabilities in this process's bounding set (read once from /proc/self/status); all of
/// them if it cannot be read.
fn host_capabilities() -> &'static [&'static str] {
    static HOST: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let mask = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(u64::MAX);
        ALL_CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| mask & (1 << bit) != 0)
            .map(|(_, name)| *name)
            .collect()
    })
}

/// Checks a container id: what libcontainer accepts, bounded in length so paths stay short.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > 128 {
        return Err(format!("{} characters is longer than 128", id.len()));
    }
    if id == "." || id == ".." || id.starts_with('.') || id.starts_with('-') {
        return Err(format!("{id:?} must start with a letter, digit or '_'"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{id:?} has the character {c:?}; only letters, digits, '_', '-' and '.' are allowed"
        ));
    }
    Ok(())
}

fn check_env(kv: &str) -> Result<(), String> {
    match kv.split_once('=') {
        None => Err(format!("{kv:?} is not KEY=value")),
        Some(("", _)) => Err(format!("{kv:?} has an empty name")),
        Some(_) if kv.contains('\0') => Err("contains a NUL byte".into()),
        Some(_) => Ok(()),
    }
}

fn check_container_path(p: &Path) -> Result<(), String> {
    if !p.is_absolute() {
        return Err(format!("{p:?} is not an absolute path"));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{p:?} must not contain '..'"));
    }
    Ok(())
}

fn check_hostname(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{h:?} is not a valid host name"))
    }
}

fn is_cpuset(s: &str) -> bool {
    !s.is_empty()
        && s.split(',').all(|part| {
            let mut it = part.splitn(2, '-');
            let a = it.next().map(|x| x.parse::<u32>().is_ok()).unwrap_or(false);
            let b = it.next().map(|x| x.parse::<u32>().is_ok()).unwrap_or(true);
            a && b
        })
}

/// Finds `prog` inside `rootfs` the way execvp would inside the container, refusing what cannot
/// be run, with Docker's wording.
fn find_executable(rootfs: &Path, prog: &str, path_var: &str) -> Result<PathBuf, String> {
    if prog.contains('/') {
        let p = Path::new(prog);
        let inside = if p.is_absolute() {
            p.to_path_buf()
        } else {
            // A relative path with a slash is taken from the working directory; checking it
            // needs the cwd, which is resolved in the container: leave it to exec.
            return Ok(p.to_path_buf());
        };
        return match is_executable_in(rootfs, &inside) {
            Ok(true) => Ok(inside),
            Ok(false) => Err(format!("exec: {prog}: permission denied")),
            Err(e) => Err(format!("exec: {prog}: {e}")),
        };
    }
    for dir in path_var.split(':').filter(|d| d.starts_with('/')) {
        let candidate = Path::new(dir).join(prog);
        if let Ok(true) = is_executable_in(rootfs, &candidate) {
            return Ok(candidate);
        }
    }
    Err(format!(
        "exec: {prog:?}: executable file not found in $PATH"
    ))
}

/// Whether `path` (inside the container) names an executable regular file, resolved race-free
/// inside `rootfs` so that a symlink in the image cannot point the check at the host.
fn is_executable_in(rootfs: &Path, path: &Path) -> Result<bool, String> {
    let file = user::open_in_root(rootfs, path).map_err(|e| match e {
        user::UserError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            "no such file or directory".to_string()
        }
        other => other.to_string(),
    })?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    Ok(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("bin/sh"), "#!").unwrap();
        fs::set_permissions(dir.path().join("bin/sh"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.path().join("bin/data"), "x").unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nwww:x:33:33::/var/www:/bin/sh\n",
        )
        .unwrap();
        fs::write(dir.path().join("etc/group"), "root:x:0:\nwww:x:33:\n").unwrap();
        dir
    }

    fn spec(rootfs: &Path) -> ContainerSpec {
        ContainerSpec::new("c1", rootfs, ["sh"])
    }

    fn errors(s: &ContainerSpec) -> Vec<String> {
        match validate(s) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn valid_spec_resolves_defaults() {
        let r = rootfs();
        let v = validate(&spec(r.path())).unwrap();
        assert_eq!(v.hostname, "c1");
        assert!(v.env.contains(&format!("PATH={DEFAULT_PATH}")));
        assert!(v.env.contains(&"HOME=/root".to_string()));
        assert_eq!(v.capabilities.len(), 14);
        assert_eq!(v.user.uid, 0);
    }

    #[test]
    fn each_bad_field_is_named() {
        let r = rootfs();
        type Case = (fn(&mut ContainerSpec), &'static str);
        let cases: Vec<Case> = vec![
            (|s| s.id = "a/b".into(), "id: \"a/b\" has the character '/'"),
            (|s| s.id = String::new(), "id: must not be empty"),
            (
                |s| s.rootfs = "rel".into(),
                "rootfs: \"rel\" is not an absolute path",
            ),
            (
                |s| s.process.args = vec![],
                "process.args: must name a program",
            ),
            (
                |s| s.process.args = vec!["/bin/nope".into()],
                "process.args[0]: exec: /bin/nope: no such file or directory",
            ),
            (
                |s| s.process.args = vec!["nope".into()],
                "process.args[0]: exec: \"nope\": executable file not found in $PATH",
            ),
            (
                |s| s.process.args = vec!["/bin/data".into()],
                "process.args[0]: exec: /bin/data: permission denied",
            ),
            (|s| s.process.user = "ghost".into(), "process.user: "),
            (
                |s| s.process.cwd = Some("tmp".into()),
                "process.cwd: \"tmp\" is not an absolute",
            ),
            (
                |s| s.process.env = vec!["NOVALUE".into()],
                "process.env[0]: \"NOVALUE\" is not",
            ),
            (
                |s| s.resources.memory_bytes = Some(1024),
                "resources.memoryBytes: 1024 is below",
            ),
            (
                |s| s.resources.memory_bytes = Some(u64::MAX),
                "resources.memoryBytes: 18446744073709551615 is above",
            ),
            (
                |s| s.resources.cpu_millis = Some(0),
                "resources.cpuMillis: 0 is out of range",
            ),
            (
                |s| s.resources.pids = Some(-1),
                "resources.pids: -1 is out of range",
            ),
            (
                |s| s.resources.cpuset = Some("a-b".into()),
                "resources.cpuset: \"a-b\"",
            ),
            (
                |s| s.hostname = Some("bad host".into()),
                "hostname: \"bad host\"",
            ),
            (
                |s| s.cap_add = vec!["FLY".into()],
                "capAdd[0]: unknown capability \"FLY\"",
            ),
            (
                |s| {
                    s.mounts = vec![Mount {
                        destination: "data".into(),
                        kind: MountKind::Tmpfs { size_bytes: None },
                        readonly: false,
                    }]
                },
                "mounts[0].destination: \"data\" is not an absolute path",
            ),
            (
                |s| {
                    s.mounts = vec![Mount {
                        destination: "/data".into(),
                        kind: MountKind::Bind {
                            source: "/no/such/dir/x".into(),
                        },
                        readonly: false,
                    }]
                },
                "mounts[0].source: \"/no/such/dir/x\" does not exist",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = spec(r.path());
            mutate(&mut s);
            let got = errors(&s);
            assert!(
                got.iter().any(|e| e.starts_with(want)),
                "want an error starting with {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn all_errors_are_reported_together() {
        let r = rootfs();
        let mut s = spec(r.path());
        s.resources.pids = Some(0);
        s.resources.cpu_millis = Some(0);
        s.process.args = vec!["/bin/nope".into()];
        let err = validate(&s).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(err.is_exec_failure());
    }

    #[test]
    fn symlinked_program_resolves_inside_rootfs() {
        let r = rootfs();
        // A host binary reached through an absolute symlink must not count as present.
        std::os::unix::fs::symlink("/usr/bin/env", r.path().join("bin/escape")).unwrap();
        let mut s = spec(r.path());
        s.process.args = vec!["/bin/escape".into()];
        assert!(errors(&s)[0].contains("no such file or directory"));
        std::os::unix::fs::symlink("/bin/sh", r.path().join("bin/link")).unwrap();
        s.process.args = vec!["/bin/link".into()];
        assert!(errors(&s).is_empty());
    }

    #[test]
    fn capabilities_add_drop_and_privileged() {
        let r = rootfs();
        let mut s = spec(r.path());
        s.cap_add = vec!["net_admin".into()];
        s.cap_drop = vec!["CAP_KILL".into()];
        let caps = validate(&s).unwrap().capabilities;
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_KILL".to_string()));
        assert_eq!(caps.len(), 14);
        s.cap_drop = vec!["ALL".into()];
        s.cap_add = vec!["CHOWN".into()];
        assert_eq!(validate(&s).unwrap().capabilities, vec!["CAP_CHOWN"]);
        let mut p = spec(r.path());
        p.privileged = true;
        assert_eq!(
            validate(&p).unwrap().capabilities.len(),
            host_capabilities().len()
        );
        // Asking for a capability this process cannot grant names it (where one is missing, as
        // CAP_SYS_RESOURCE is in some sandboxes).
        if let Some(missing) = ALL_CAPABILITIES
            .iter()
            .find(|c| !host_capabilities().contains(*c))
        {
            let mut m = spec(r.path());
            m.cap_add = vec![missing.to_string()];
            let errs = errors(&m);
            assert!(errs[0].starts_with("capAdd[0]:"), "{errs:?}");
        }
    }
}
