//! End to end health probes on one machine: a real scheduler (in the test process, embedded
//! store), a real `gantry-agent run` process and real containers, driven through the real
//! `gantry` CLI. An `exec` readiness probe gates Ready (and takes it away again), an `http`
//! readiness probe reaches a server inside the container's own network namespace, and a
//! failing `tcp` liveness probe restarts the container.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (after changing the agent,
//! `cargo build -p gantry-agent` first). The helpers are copied from `tests/node.rs`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::Cluster;

const IMAGE: &str = "gantry.test/busybox:probes";

/// Whether this machine can run the test; under CI a missing piece is a failure.
fn can_run() -> bool {
    let missing = if !rustix::process::geteuid().is_root() {
        Some("root")
    } else if !Path::new("/bin/busybox").exists() {
        Some("/bin/busybox (busybox-static)")
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) if std::env::var_os("CI").is_some() => panic!("probe tests need {what}"),
        Some(what) => {
            eprintln!("skipping: probe tests need {what}");
            false
        }
    }
}

/// A tar header owned by root, dated 1970.
fn root_header() -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A `docker save` tarball of a one-layer busybox image tagged [`IMAGE`].
fn busybox_image() -> Vec<u8> {
    let mut layer = tar::Builder::new(Vec::new());
    let mut dir = |path: &str| {
        let mut header = root_header();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        layer
            .append_data(&mut header, path, std::io::empty())
            .expect("layer dir");
    };
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp", "root"] {
        dir(d);
    }
    let busybox = std::fs::read("/bin/busybox").expect("reading /bin/busybox");
    let mut header = root_header();
    header.set_mode(0o755);
    header.set_size(busybox.len() as u64);
    layer
        .append_data(&mut header, "bin/busybox", busybox.as_slice())
        .expect("layer busybox");
    for applet in [
        "sh", "sleep", "true", "false", "echo", "cat", "ls", "touch", "test", "rm", "mkdir",
        "httpd",
    ] {
        let mut header = root_header();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        layer
            .append_link(&mut header, format!("bin/{applet}"), "busybox")
            .expect("layer link");
    }
    let layer = layer.into_inner().expect("layer tar");
    let layer_hex = sha256_hex(&layer);
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Cmd": ["sh"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]},
    })
    .to_string();
    let config_hex = sha256_hex(config.as_bytes());
    let manifest = serde_json::json!([{
        "Config": format!("{config_hex}.json"),
        "RepoTags": [IMAGE],
        "Layers": [format!("{layer_hex}/layer.tar")],
    }])
    .to_string();
    let mut archive = tar::Builder::new(Vec::new());
    for (path, data) in [
        (format!("{layer_hex}/layer.tar"), layer.as_slice()),
        (format!("{config_hex}.json"), config.as_bytes()),
        ("manifest.json".to_owned(), manifest.as_bytes()),
    ] {
        let mut header = root_header();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        archive
            .append_data(&mut header, path, data)
            .expect("archive entry");
    }
    archive.into_inner().expect("archive")
}

/// A `gantry-agent run` process, killed (SIGKILL) on drop; its log in the data dir.
struct Agent {
    child: Child,
    data: PathBuf,
}

impl Agent {
    fn binary() -> PathBuf {
        let path = Path::new(env!("CARGO_BIN_EXE_gantry")).with_file_name("gantry-agent");
        assert!(
            path.exists(),
            "{path:?} is missing: build it with `cargo build -p gantry-agent`"
        );
        path
    }

    fn start(scheduler: &str, data: &Path) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("agent.log"))
            .expect("agent log");
        let child = Command::new(Self::binary())
            .args(["run", "--name", "node-a", "--scheduler", scheduler])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "info,gantry_agent=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting gantry-agent");
        Agent {
            child,
            data: data.to_owned(),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("agent.log")).unwrap_or_default()
    }

    /// Ids of the containers the runtime holds.
    fn containers(&self) -> Vec<String> {
        let dir = self.data.join("runtime/containers");
        let mut ids: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

impl Drop for Agent {
    /// Kills the agent; a test that failed half-way also removes the containers it left (they
    /// outlive the agent by design), so that no process or cgroup survives the test.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let ids = self.containers();
            if !ids.is_empty() {
                let _ = Command::new(Self::binary())
                    .arg("ctr")
                    .arg("--root")
                    .arg(self.data.join("runtime"))
                    .args(["rm", "--force"])
                    .args(&ids)
                    .status();
            }
        }
    }
}

/// Instances of `workload` as `gantry get instances -o json` shows them.
fn instances(cluster: &Cluster, workload: &str) -> Vec<Value> {
    let list = cluster.json(&["get", "instances", "--workload", workload, "-o", "json"]);
    list["items"].as_array().cloned().unwrap_or_default()
}

fn wait(agent: &Agent, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn apply(cluster: &Cluster, name: &str, yaml: &str) {
    let file = cluster.file(&format!("{name}.yaml"), yaml);
    cluster
        .run(&["apply", "-f", file.to_str().expect("utf-8 path")])
        .ok();
}

/// The state and reason of the only instance of `workload`, if it has one.
fn state(cluster: &Cluster, workload: &str) -> Option<(String, String, u64)> {
    let list = instances(cluster, workload);
    let status = &list.first()?["status"];
    Some((
        status["state"].as_str().unwrap_or_default().to_owned(),
        status["reason"].as_str().unwrap_or_default().to_owned(),
        status["restartCount"].as_u64().unwrap_or_default(),
    ))
}

#[test]
fn probes_gate_readiness_and_liveness_restarts() {
    if !can_run() {
        return;
    }
    let cluster = Cluster::start(0);
    let data = cluster.dir.path().join("agent");
    std::fs::create_dir_all(&data).expect("agent data dir");
    let images = gantry_agent::image::ImageStore::open(data.join("images")).expect("image store");
    images
        .import(std::io::Cursor::new(busybox_image()))
        .expect("importing the test image");
    drop(images);
    let agent = Agent::start(&cluster.addr, &data);
    let limit = Duration::from_secs(30);
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });

    // Readiness by exec: the file appears after 2 s and goes away 4 s later.
    apply(
        &cluster,
        "gated",
        &format!(
            "kind: Service\nname: gated\nimage: {IMAGE}\nstopGracePeriod: 1s\n\
             command: [sh, -c, 'sleep 2; touch /tmp/ready; sleep 4; rm /tmp/ready; sleep 3600']\n\
             health: {{readiness: {{exec: {{command: [test, -f, /tmp/ready]}}, period: 1s, \
             timeout: 5s, failureThreshold: 1}}}}\n"
        ),
    );
    // An http readiness probe against a server in the container's own network namespace.
    apply(
        &cluster,
        "web",
        &format!(
            "kind: Service\nname: web\nimage: {IMAGE}\nstopGracePeriod: 1s\n\
             command: [sh, -c, 'mkdir -p /www && echo ok > /www/index.html && \
             exec httpd -f -p 8080 -h /www']\n\
             health: {{readiness: {{http: {{path: /, port: 8080}}, period: 1s, initialDelay: 1s}}}}\n"
        ),
    );
    // A liveness probe on a port nothing listens on: stopped (SIGTERM, which `sleep` as init
    // ignores, then SIGKILL after 1 s) and restarted, again and again.
    apply(
        &cluster,
        "dead",
        &format!(
            "kind: Service\nname: dead\nimage: {IMAGE}\ncommand: [sleep, '3600']\n\
             stopGracePeriod: 1s\n\
             restart: {{policy: always, backoff: {{initial: 2s, max: 2s}}}}\n\
             health: {{liveness: {{tcp: {{port: 9}}, period: 1s, failureThreshold: 1}}}}\n"
        ),
    );

    // Running, not Ready, until the probe passes; then Ready; then unready again.
    wait(&agent, "gated is Running", limit, || {
        state(&cluster, "gated").is_some_and(|(s, _, _)| s == "Running")
    });
    wait(&agent, "gated is Ready", limit, || {
        state(&cluster, "gated").is_some_and(|(s, _, _)| s == "Ready")
    });
    wait(&agent, "gated is unready again", limit, || {
        state(&cluster, "gated")
            .is_some_and(|(s, reason, _)| s == "Running" && reason == "ReadinessProbeFailed")
    });
    let (_, _, restarts) = state(&cluster, "gated").expect("gated");
    assert_eq!(restarts, 0, "readiness never restarts");

    wait(&agent, "web is Ready", limit, || {
        state(&cluster, "web").is_some_and(|(s, _, _)| s == "Ready")
    });

    let mut reasons = Vec::new();
    wait(&agent, "dead restarted twice", limit, || {
        let Some((_, reason, restarts)) = state(&cluster, "dead") else {
            return false;
        };
        reasons.push(reason);
        restarts >= 2
    });
    assert!(
        reasons.iter().any(|r| r == "LivenessProbeFailed"),
        "reasons seen: {reasons:?}"
    );
    let log = agent.log();
    assert!(log.contains("liveness probe failed"), "agent log:\n{log}");
    let (_, _, restarts) = state(&cluster, "web").expect("web");
    assert_eq!(restarts, 0);

    // Delete everything: no container left.
    for name in ["gated", "web", "dead"] {
        cluster.run(&["delete", "workload", name]).ok();
    }
    wait(&agent, "every container removed", limit, || {
        agent.containers().is_empty()
    });
}
