//! Builds the OCI runtime spec (`config.json` of the bundle) from a validated [`ContainerSpec`],
//! with Docker's hardening defaults: namespaces, mounts, masked and read-only paths, the 14
//! default capabilities, no_new_privs, the device allowlist, seccomp, and rlimits.

use std::path::Path;

use libcontainer::oci_spec::runtime::{LinuxSeccomp, Spec};
use serde_json::{Value, json};

use super::cgroups::CgroupVersion;
use super::spec::{ContainerSpec, MountKind, NetworkMode, Validated};

/// Paths inside the container that are hidden (bind-mounted over with /dev/null or an empty
/// read-only tmpfs) unless the container is privileged.
pub const MASKED_PATHS: [&str; 12] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths inside the container that are remounted read-only unless the container is privileged.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Inputs to [`build`] that come from the node rather than from the container spec.
pub struct NodeContext<'a> {
    /// Absolute cgroup path for the container (always set: without it libcontainer would create
    /// cgroups at the hierarchy root).
    pub cgroups_path: &'a Path,
    /// The node's cgroup version (the cgroup namespace is used on v2 only, as Docker does).
    pub cgroup_version: CgroupVersion,
    /// Directory holding the container's generated `hostname`, `hosts` and `resolv.conf`.
    pub etc_dir: &'a Path,
    /// Seccomp filter for the container's capabilities; `None` when privileged.
    pub seccomp: Option<LinuxSeccomp>,
    /// The highest RLIMIT_NOFILE hard limit the runtime may grant: raising a hard limit needs
    /// CAP_SYS_RESOURCE, which a sandboxed agent may lack, so the agent's own hard limit caps it.
    pub nofile_hard_max: u64,
}

/// Docker's and containerd's open-files limit for containers: soft 1024, hard 524288.
pub const NOFILE: (u64, u64) = (1024, 524_288);

/// The OCI spec for `spec`.
pub fn build(
    spec: &ContainerSpec,
    v: &Validated,
    node: &NodeContext<'_>,
) -> Result<Spec, serde_json::Error> {
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    match &spec.network {
        NetworkMode::None => namespaces.push(json!({"type": "network"})),
        NetworkMode::Host => {}
        NetworkMode::Path(p) => namespaces.push(json!({"type": "network", "path": p})),
    }
    if node.cgroup_version == CgroupVersion::V2 {
        namespaces.push(json!({"type": "cgroup"}));
    }

    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=67108864"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
    ];
    let sys_ro = if spec.privileged { "rw" } else { "ro" };
    mounts.push(
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                       "options": ["nosuid", "noexec", "nodev", sys_ro]}),
    );
    mounts.push(
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                       "options": ["nosuid", "noexec", "nodev", "relatime", sys_ro]}),
    );
    for name in ["hostname", "hosts", "resolv.conf"] {
        mounts.push(
            json!({"destination": format!("/etc/{name}"), "type": "bind",
                           "source": node.etc_dir.join(name),
                           "options": ["rbind", "rprivate"]}),
        );
    }
    for m in &spec.mounts {
        let ro = if m.readonly { "ro" } else { "rw" };
        mounts.push(match &m.kind {
            MountKind::Bind { source } => json!({
                "destination": m.destination, "type": "bind", "source": source,
                "options": ["rbind", "rprivate", ro]}),
            MountKind::Tmpfs { size_bytes } => {
                let mut options = vec!["nosuid".to_string(), "nodev".into(), ro.into()];
                if let Some(size) = size_bytes {
                    options.push(format!("size={size}"));
                }
                json!({"destination": m.destination, "type": "tmpfs", "source": "tmpfs",
                       "options": options})
            }
        });
    }

    let r = &spec.resources;
    let mut resources = serde_json::Map::new();
    resources.insert("devices".into(), device_rules(spec.privileged));
    if let Some(bytes) = r.memory_bytes {
        // Swap equal to the limit means no swap at all, so the limit is what triggers the OOM
        // killer, as with Kubernetes.
        resources.insert("memory".into(), json!({"limit": bytes, "swap": bytes}));
    }
    let mut cpu = serde_json::Map::new();
    if let Some(millis) = r.cpu_millis {
        // 100 ms period; quota in µs per period. Shares: 1024 per core, as Docker and kubelet.
        cpu.insert("period".into(), json!(100_000u64));
        cpu.insert("quota".into(), json!(millis * 100));
        cpu.insert("shares".into(), json!((millis * 1024 / 1000).max(2)));
    }
    if let Some(cpus) = &r.cpuset {
        cpu.insert("cpus".into(), json!(cpus));
    }
    if !cpu.is_empty() {
        resources.insert("cpu".into(), Value::Object(cpu));
    }
    if let Some(pids) = r.pids {
        resources.insert("pids".into(), json!({"limit": pids}));
    }

    let caps = &v.capabilities;
    let nofile_hard = NOFILE.1.min(node.nofile_hard_max);
    let nofile_soft = NOFILE.0.min(nofile_hard);
    let mut linux = json!({
        "namespaces": namespaces,
        "cgroupsPath": node.cgroups_path,
        "resources": resources,
    });
    if !spec.privileged {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }
    if let Some(seccomp) = &node.seccomp {
        linux["seccomp"] = serde_json::to_value(seccomp)?;
    }

    let cwd = spec.process.cwd.clone().unwrap_or_else(|| "/".into());
    let doc = json!({
        "ociVersion": "1.0.2",
        "root": {"path": spec.rootfs, "readonly": spec.readonly_rootfs},
        "hostname": v.hostname,
        "mounts": mounts,
        "process": {
            "terminal": false,
            "args": spec.process.args,
            "env": v.env,
            "cwd": cwd,
            "user": {
                "uid": v.user.uid,
                "gid": v.user.gid,
                "additionalGids": v.user.additional_gids,
            },
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                "inheritable": [], "ambient": [],
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile_hard, "soft": nofile_soft}],
            "noNewPrivileges": !spec.privileged,
            // Containers get the kernel's default OOM score, never the agent's protected one.
            "oomScoreAdj": 0,
        },
        "linux": linux,
    });
    serde_json::from_value(doc)
}

/// The device cgroup rules: deny everything, then allow Docker's default devices.
fn device_rules(privileged: bool) -> Value {
    if privileged {
        return json!([{"allow": true, "access": "rwm"}]);
    }
    let allow = |kind: &str, major: Option<i64>, minor: Option<i64>, access: &str| json!({"allow": true, "type": kind, "major": major, "minor": minor, "access": access});
    json!([
        {"allow": false, "access": "rwm"},
        // mknod of any device is allowed (CAP_MKNOD is a default); using one is not.
        allow("c", None, None, "m"),
        allow("b", None, None, "m"),
        allow("c", Some(1), Some(3), "rwm"),  // null
        allow("c", Some(1), Some(5), "rwm"),  // zero
        allow("c", Some(1), Some(7), "rwm"),  // full
        allow("c", Some(1), Some(8), "rwm"),  // random
        allow("c", Some(1), Some(9), "rwm"),  // urandom
        allow("c", Some(5), Some(0), "rwm"),  // tty
        allow("c", Some(5), Some(1), "rwm"),  // console
        allow("c", Some(5), Some(2), "rwm"),  // ptmx
        allow("c", Some(136), None, "rwm"),   // pts/*
        allow("c", Some(10), Some(200), "rwm"), // net/tun
    ])
}

/// Writes `/etc/hostname`, `/etc/hosts` and `/etc/resolv.conf` for the container into `etc_dir`.
/// `host_resolv` is the host's resolv.conf text: its loopback nameservers are dropped, since
/// they would point at the container's own loopback.
pub fn write_etc_files(
    etc_dir: &Path,
    spec: &ContainerSpec,
    hostname: &str,
    host_resolv: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(etc_dir)?;
    std::fs::write(etc_dir.join("hostname"), format!("{hostname}\n"))?;
    let mut hosts = String::from(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\n\
         ff02::2\tip6-allrouters\n",
    );
    // A container on a network has its own name at its address (in `spec.hosts`).
    if !spec.hosts.contains_key(hostname) {
        hosts.push_str(&format!("127.0.1.1\t{hostname}\n"));
    }
    for (name, addr) in &spec.hosts {
        hosts.push_str(&format!("{addr}\t{name}\n"));
    }
    std::fs::write(etc_dir.join("hosts"), hosts)?;
    let resolv = match &spec.resolv_conf {
        Some(given) => given.clone(),
        None => container_resolv_conf(host_resolv),
    };
    std::fs::write(etc_dir.join("resolv.conf"), resolv)
}

/// The host's resolv.conf without loopback nameservers.
pub fn container_resolv_conf(host: &str) -> String {
    let mut out = String::new();
    for line in host.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver")
            && let Some(Ok(ip)) = words.next().map(str::parse::<std::net::IpAddr>)
            && ip.is_loopback()
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::spec::{Resources, validate};
    use std::os::unix::fs::PermissionsExt;

    fn fixture() -> (tempfile::TempDir, ContainerSpec) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::write(dir.path().join("bin/sh"), "#!").unwrap();
        std::fs::set_permissions(
            dir.path().join("bin/sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let mut spec = ContainerSpec::new("web-1", dir.path(), ["sh", "-c", "true"]);
        spec.process.env = vec!["A=b".into()];
        spec.process.user = "1000:1000".into();
        spec.resources = Resources {
            cpu_millis: Some(500),
            memory_bytes: Some(64 << 20),
            pids: Some(128),
            cpuset: None,
        };
        (dir, spec)
    }

    fn node(v: CgroupVersion) -> NodeContext<'static> {
        NodeContext {
            cgroups_path: Path::new("/gantry/web-1"),
            cgroup_version: v,
            etc_dir: Path::new("/state/web-1/etc"),
            seccomp: None,
            nofile_hard_max: u64::MAX,
        }
    }

    #[test]
    fn hardening_defaults() {
        let (_d, s) = fixture();
        let v = validate(&s).unwrap();
        let oci = build(&s, &v, &node(CgroupVersion::V1)).unwrap();
        let j = serde_json::to_value(&oci).unwrap();
        let p = &j["process"];
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["capabilities"]["bounding"].as_array().unwrap().len(), 14);
        assert_eq!(p["capabilities"]["inheritable"], json!([]));
        assert_eq!(p["capabilities"]["ambient"], json!([]));
        assert_eq!(p["user"]["uid"], 1000);
        assert_eq!(p["rlimits"][0]["hard"], 524288);
        let l = &j["linux"];
        assert_eq!(l["cgroupsPath"], "/gantry/web-1");
        assert_eq!(l["maskedPaths"].as_array().unwrap().len(), 12);
        assert_eq!(l["readonlyPaths"].as_array().unwrap().len(), 5);
        assert_eq!(l["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(l["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(l["resources"]["cpu"]["shares"], 512);
        assert_eq!(l["resources"]["pids"]["limit"], 128);
        assert_eq!(l["resources"]["devices"][0]["allow"], false);
        let ns: Vec<&str> = l["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        let sys = j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys")
            .unwrap();
        assert!(sys["options"].as_array().unwrap().contains(&json!("ro")));
    }

    #[test]
    fn cgroup_namespace_only_on_v2_and_host_network_has_no_netns() {
        let (_d, mut s) = fixture();
        s.network = NetworkMode::Host;
        let v = validate(&s).unwrap();
        let j = serde_json::to_value(build(&s, &v, &node(CgroupVersion::V2)).unwrap()).unwrap();
        let ns: Vec<&str> = j["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "cgroup"]);
    }

    #[test]
    fn privileged_lifts_hardening() {
        let (_d, mut s) = fixture();
        s.privileged = true;
        let v = validate(&s).unwrap();
        let j = serde_json::to_value(build(&s, &v, &node(CgroupVersion::V1)).unwrap()).unwrap();
        assert!(j["linux"].get("maskedPaths").is_none());
        assert_eq!(j["process"]["noNewPrivileges"], false);
        assert_eq!(j["linux"]["resources"]["devices"][0]["allow"], true);
    }

    #[test]
    fn resolv_conf_drops_loopback_nameservers() {
        let out = container_resolv_conf(
            "nameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch example\n",
        );
        assert_eq!(out, "nameserver 10.0.0.2\nsearch example\n");
    }
}
