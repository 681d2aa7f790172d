//! `gantry up` / `gantry down` end to end: the real binaries started by the real CLI as
//! background processes on a temp data directory and free ports, an image built by
//! deploy/build-busybox-image.sh and imported with `gantry-agent image import`, a real
//! container, and nothing left behind by `gantry down`.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The daemons are the binaries cargo built next to `gantry` (`cargo build --workspace --bins`
//! first after changing them alone).

mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

const IMAGE: &str = "gantry.local/busybox:1";

fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_gantry")).with_file_name(name);
    assert!(
        path.exists(),
        "{path:?} is missing: build it with `cargo build --workspace --bins`"
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A cluster `gantry up` runs on a temp dir; on drop, `gantry down`, then SIGKILL for any
/// daemon its pid files still name, so a failed test leaves no process behind.
struct Local {
    data: tempfile::TempDir,
    listen: String,
    metrics: String,
}

impl Local {
    fn new() -> Local {
        Local {
            data: tempfile::tempdir().expect("temp dir"),
            listen: format!("127.0.0.1:{}", free_port()),
            metrics: format!("127.0.0.1:{}", free_port()),
        }
    }

    fn dir(&self) -> &Path {
        self.data.path()
    }

    fn gantry(&self, args: &[&str]) -> Output {
        self.gantry_at(&format!("http://{}", self.listen), args)
    }

    fn gantry_at(&self, address: &str, args: &[&str]) -> Output {
        Command::new(binary("gantry"))
            .args(args)
            .env("GANTRY_ADDR", address)
            .env_remove("GANTRY_CONFIG")
            .output()
            .expect("running gantry")
    }

    fn up(&self) -> Output {
        let dir = self.dir().to_str().expect("utf-8 dir");
        self.gantry(&[
            "up",
            "--data-dir",
            dir,
            "--listen",
            &self.listen,
            "--metrics-listen",
            &self.metrics,
            "--name",
            "up-node",
        ])
    }

    fn down(&self, keep: bool) -> Output {
        let dir = self.dir().to_str().expect("utf-8 dir");
        let mut args = vec!["down", "--data-dir", dir];
        if keep {
            args.push("--keep");
        }
        self.gantry(&args)
    }

    fn image(&self, args: &[&str]) -> Output {
        Command::new(binary("gantry-agent"))
            .arg("image")
            .args(args)
            .arg("--data-dir")
            .arg(self.dir().join("agent"))
            .output()
            .expect("running gantry-agent image")
    }

    /// The pids in the pid files.
    fn pids(&self) -> Vec<u32> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir().join("run"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|f| f.extension().is_some_and(|e| e == "pid"));
        files.sort();
        files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .filter_map(|text| text.trim().parse().ok())
            .collect()
    }

    /// Whether `pid` is alive and one of this cluster's daemons.
    fn ours(&self, pid: u32) -> bool {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(&*self.dir().to_string_lossy()))
            .unwrap_or(false)
    }

    fn containers(&self) -> Vec<String> {
        std::fs::read_dir(self.dir().join("agent/runtime/containers"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir().join("logs"))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|f| {
                let log = std::fs::read_to_string(f).unwrap_or_default();
                format!("--- {}:\n{log}", f.display())
            })
            .collect()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if !self.pids().iter().any(|pid| self.ours(*pid)) {
            return;
        }
        let _ = self.down(false);
        for pid in self.pids() {
            if self.ours(pid)
                && let Some(pid) = rustix::process::Pid::from_raw(pid as i32)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

fn ok(out: &Output, what: &str, local: &Local) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        local.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait(local: &Local, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            local.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn up_twice_import_run_and_down_leaving_nothing_behind() {
    let local = Local::new();
    // A usage error needs no root: checked first.
    let out = local.gantry(&["up", "--nodes", "0", "--data-dir", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least one node"));
    let out = local.gantry(&[
        "up",
        "--nodes",
        "2",
        "--name",
        "x",
        "--data-dir",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!Path::new("/nonexistent").exists());
    if !support::node::can_run("up") {
        return;
    }
    let tar = local.dir().join("busybox.tar");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/build-busybox-image.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&tar)
        .output()
        .expect("running build-busybox-image.sh");
    ok(&out, "build-busybox-image.sh", &local);

    let started = ok(&local.up(), "gantry up", &local);
    assert!(started.contains("node up-node is Ready"), "{started}");
    let pids = local.pids();
    assert_eq!(pids.len(), 2, "{pids:?}");
    let nodes = ok(&local.gantry(&["get", "nodes"]), "get nodes", &local);
    assert!(
        nodes.contains("up-node") && nodes.contains("Ready"),
        "{nodes}"
    );

    // Twice is harmless: the same daemons, still Ready.
    let again = ok(&local.up(), "gantry up (again)", &local);
    assert!(again.contains("already running"), "{again}");
    assert_eq!(local.pids(), pids);

    // The store is not shared with a running agent: import refuses, and works once it is down.
    let refused = local.image(&["import", tar.to_str().expect("utf-8")]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is running"),
        "{refused:?}"
    );
    ok(&local.down(true), "gantry down --keep", &local);
    assert!(!pids.iter().any(|pid| local.ours(*pid)));
    let imported = ok(
        &local.image(&["import", tar.to_str().expect("utf-8")]),
        "image import",
        &local,
    );
    assert!(imported.contains(IMAGE), "{imported}");
    let listed = ok(&local.image(&["ls"]), "image ls", &local);
    assert!(
        listed.starts_with("REFERENCE") && listed.contains(IMAGE),
        "{listed}"
    );

    ok(&local.up(), "gantry up (after import)", &local);
    ok(
        &local.gantry(&[
            "run", "-d", "--name", "sleeper", IMAGE, "--", "sleep", "3600",
        ]),
        "gantry run -d",
        &local,
    );
    wait(
        &local,
        "the instance is Ready",
        Duration::from_secs(60),
        || {
            let out = local.gantry(&["get", "instances", "--workload", "sleeper", "-o", "json"]);
            serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|list| list["items"].as_array().cloned())
                .is_some_and(|items| items.iter().any(|i| i["state"] == "Ready"))
        },
    );
    assert_eq!(local.containers().len(), 1);

    let pids = local.pids();
    let down = ok(&local.down(false), "gantry down", &local);
    assert!(down.contains("workload/sleeper deleted"), "{down}");
    assert!(
        !pids.iter().any(|pid| local.ours(*pid)),
        "{pids:?} still run"
    );
    assert_eq!(local.containers(), Vec::<String>::new());
    assert!(local.pids().is_empty());
    // The agent's network namespaces (the warm ones too) are detached and unmounted by down.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = local.dir().to_string_lossy().into_owned();
    let left: Vec<&str> = mountinfo.lines().filter(|l| l.contains(&dir)).collect();
    assert!(left.is_empty(), "mounts left under {dir}: {left:?}");
    // Down again: nothing to do, and says so.
    let idle = ok(&local.down(false), "gantry down (again)", &local);
    assert!(idle.contains("not running"), "{idle}");
}

/// Whether the network interface `name` exists in this namespace.
fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn up_with_two_nodes_in_network_namespaces_and_down_removing_them() {
    if !support::node::can_run("up --nodes 2") {
        return;
    }
    let local = Local::new();
    let pid = std::process::id();
    let prefix = format!("gup{}", pid % 10_000);
    let net = format!("172.31.{}", 150 + pid % 50);
    let port = local.listen.rsplit(':').next().expect("a port").to_owned();
    let address = format!("http://{net}.1:{port}");
    let dir = local.dir().to_str().expect("utf-8 dir").to_owned();
    let up = || {
        local.gantry(&[
            "up",
            "--nodes",
            "2",
            "--hosts-prefix",
            &prefix,
            "--hosts-net",
            &net,
            "--data-dir",
            &dir,
            "--listen",
            &local.listen,
            "--metrics-listen",
            &local.metrics,
        ])
    };
    let started = ok(&up(), "gantry up --nodes 2", &local);
    assert!(
        started.contains(&format!("nodes {prefix}-1, {prefix}-2 are Ready")),
        "{started}"
    );
    assert!(
        started.contains(&format!("export GANTRY_ADDR={address}")),
        "{started}"
    );
    let pids = local.pids();
    assert_eq!(pids.len(), 3, "{pids:?}");
    for i in 1..=2 {
        assert!(Path::new(&format!("/run/netns/{prefix}-{i}")).exists());
    }

    // The API answers on the hosts' bridge; both nodes are Ready with their hosts' addresses.
    let nodes = ok(
        &local.gantry_at(&address, &["get", "nodes", "-o", "json"]),
        "get nodes",
        &local,
    );
    let nodes: Value = serde_json::from_str(&nodes).expect("json");
    let items = nodes["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{nodes:#}");
    for item in items {
        assert_eq!(item["status"], "Ready", "{item:#}");
    }
    let text = nodes.to_string();
    assert!(
        text.contains(&format!("{net}.11")) && text.contains(&format!("{net}.12")),
        "{nodes:#}"
    );

    // Twice is harmless.
    let again = ok(&up(), "gantry up --nodes 2 (again)", &local);
    assert!(again.contains("already running"), "{again}");
    assert_eq!(local.pids(), pids);
    // A single-node `up` on the same directory is refused rather than half applied.
    let single = local.up();
    assert_eq!(single.status.code(), Some(1), "{single:?}");
    assert!(
        String::from_utf8_lossy(&single.stderr).contains("change its shape"),
        "{single:?}"
    );
    assert_eq!(local.pids(), pids);

    // Down stops every daemon and removes the hosts.
    let down = ok(&local.down(false), "gantry down", &local);
    assert!(down.contains("agent-2"), "{down}");
    assert!(
        !pids.iter().any(|pid| local.ours(*pid)),
        "{pids:?} still run"
    );
    for i in 1..=2 {
        assert!(!Path::new(&format!("/run/netns/{prefix}-{i}")).exists());
    }
    assert!(!link_exists(&format!("{prefix}-br")));
    assert!(local.pids().is_empty());
}
