//! Harness of the end-to-end tests on a real node: a busybox image built in the test, a real
//! `gantry-agent run` process (cleaned up even when the test fails), and CLI helpers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Cluster;

/// Whether this machine can run the test; under CI a missing piece is a failure.
pub fn can_run(what_for: &str) -> bool {
    let missing = if !rustix::process::geteuid().is_root() {
        Some("root")
    } else if !Path::new("/bin/busybox").exists() {
        Some("/bin/busybox (busybox-static)")
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) if std::env::var_os("CI").is_some() => panic!("{what_for} tests need {what}"),
        Some(what) => {
            eprintln!("skipping: {what_for} tests need {what}");
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

/// A `docker save` tarball of a one-layer busybox image tagged `tag`.
pub fn busybox_image(tag: &str) -> Vec<u8> {
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
        "RepoTags": [tag],
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
pub struct Agent {
    child: Child,
    data: PathBuf,
}

impl Agent {
    pub fn binary() -> PathBuf {
        let path = Path::new(env!("CARGO_BIN_EXE_gantry")).with_file_name("gantry-agent");
        assert!(
            path.exists(),
            "{path:?} is missing: build it with `cargo build -p gantry-agent`"
        );
        path
    }

    pub fn start(scheduler: &str, data: &Path) -> Agent {
        Self::start_with(scheduler, data, &[])
    }

    /// [`Agent::start`] with more flags for `gantry-agent run`.
    pub fn start_with(scheduler: &str, data: &Path, flags: &[&str]) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join("agent.log"))
            .expect("agent log");
        let child = Command::new(Self::binary())
            .args(["run", "--name", "node-a", "--scheduler", scheduler])
            .arg("--data-dir")
            .arg(data)
            .arg("--cni-bridge")
            .arg(bridge_of(data))
            .args(flags)
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

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("agent.log")).unwrap_or_default()
    }

    /// The agent's data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Ids of the containers the runtime holds.
    pub fn containers(&self) -> Vec<String> {
        containers_in(&self.data)
    }
}

/// Ids of the containers the runtime of the agent on data dir `data` holds, sorted.
pub fn containers_in(data: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(data.join("runtime/containers"))
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

impl Drop for Agent {
    /// Kills the agent; a test that failed half-way also removes the containers it left (they
    /// outlive the agent by design), so that no process or cgroup survives the test. Network
    /// attachments of containers that no longer run are detached, and with no container left
    /// the agent's bridge goes too.
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
        cleanup_after_agent(&self.data, &bridge_of(&self.data), None);
    }
}

/// What an agent on data dir `data` would clean up at its next start, for a test tearing it
/// down (`gantry-agent cleanup`, in host namespace `netns` when given): network attachments
/// and root filesystems of containers that are gone; with none left, the node rules of
/// `bridge`, the state tmpfs and (in this namespace) the bridge itself.
pub fn cleanup_after_agent(data: &Path, bridge: &str, netns: Option<&Path>) {
    let mut command = match netns {
        Some(netns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", netns.display()))
                .arg(Agent::binary());
            c
        }
        None => Command::new(Agent::binary()),
    };
    let _ = command
        .args(["cleanup", "--data-dir"])
        .arg(data)
        .args(["--cni-bridge", bridge])
        .env("RUST_LOG", "warn")
        .status();
    if netns.is_none() && containers_in(data).is_empty() {
        let _ = Command::new("ip")
            .args(["link", "del", bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// The bridge of the agent with data dir `data`: one per agent, since agents of tests running
/// at once share the machine's network namespace and a bridge carries one node subnet; the same
/// across restarts of that agent.
pub fn bridge_of(data: &Path) -> String {
    let digest = Sha256::digest(data.as_os_str().as_encoded_bytes());
    format!("gt{}", &hex::encode(digest)[..10])
}

/// Warm network namespaces claimed by instances: CNI id → instance id (the agent records each
/// claim in `cni/warm/<instance>`).
pub fn warm_claims(data: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read_dir(data.join("cni/warm"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let cni_id = std::fs::read_to_string(e.path()).ok()?;
            Some((
                cni_id.trim().to_owned(),
                e.file_name().to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

/// Whether `mountinfo_line` is the namespace mount of a warm namespace no instance claimed
/// (the agent keeps two attached ahead of need while it runs).
pub fn unclaimed_warm_mount(
    mountinfo_line: &str,
    claims: &std::collections::HashMap<String, String>,
) -> bool {
    mountinfo_line
        .split_whitespace()
        .find_map(|w| w.rsplit_once("/netns/"))
        .is_some_and(|(_, id)| id.starts_with("warm-") && !claims.contains_key(id))
}

/// Instances of `workload` as `gantry get instances -o json` shows them.
pub fn instances(cluster: &Cluster, workload: &str) -> Vec<Value> {
    let list = cluster.json(&["get", "instances", "--workload", workload, "-o", "json"]);
    list["items"].as_array().cloned().unwrap_or_default()
}

/// Polls `check` every 100 ms until it holds; panics with the agent's log after `limit`.
pub fn wait(agent: &Agent, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
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

/// `gantry apply -f` of `yaml`, which must succeed.
pub fn apply(cluster: &Cluster, name: &str, yaml: &str) {
    let file = cluster.file(&format!("{name}.yaml"), yaml);
    cluster
        .run(&["apply", "-f", file.to_str().expect("utf-8 path")])
        .ok();
}

/// A node for `cluster`: the agent's data dir in the cluster's scratch dir, a busybox image
/// tagged `image` imported into its store, and `gantry-agent run` started on it.
pub fn start_node(cluster: &Cluster, image: &str) -> (PathBuf, Agent) {
    let data = cluster.dir.path().join("agent");
    std::fs::create_dir_all(&data).expect("agent data dir");
    let images = gantry_agent::image::ImageStore::open(data.join("images")).expect("image store");
    images
        .import(std::io::Cursor::new(busybox_image(image)))
        .expect("importing the test image");
    drop(images);
    let agent = Agent::start(&cluster.addr, &data);
    (data, agent)
}
