//! End to end on one machine: a real scheduler (in the test process, embedded store), a real
//! `gantry-agent run` process and real containers, driven through the real `gantry` CLI.
//! `gantry apply` turns into running containers; scale, restart with backoff, a Job, agent
//! kill -9 and restart (live restore), and delete leaving nothing behind.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (`cargo test --workspace` builds
//! it; after changing the agent alone, `cargo build -p gantry-agent` first).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use support::Cluster;

const IMAGE: &str = "gantry.test/busybox:1";

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
        Some(what) if std::env::var_os("CI").is_some() => panic!("node tests need {what}"),
        Some(what) => {
            eprintln!("skipping: node tests need {what}");
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
    for applet in ["sh", "sleep", "true", "false", "echo", "cat", "ls", "touch"] {
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

fn ready_ids(cluster: &Cluster, workload: &str) -> Vec<String> {
    let mut ids: Vec<String> = instances(cluster, workload)
        .iter()
        .filter(|i| i["state"] == "Ready")
        .map(|i| i["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
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

fn mounts_under(dir: &Path) -> usize {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = dir.to_string_lossy();
    mountinfo.lines().filter(|l| l.contains(&*dir)).count()
}

fn apply(cluster: &Cluster, name: &str, yaml: &str) {
    let file = cluster.file(&format!("{name}.yaml"), yaml);
    cluster
        .run(&["apply", "-f", file.to_str().expect("utf-8 path")])
        .ok();
}

#[test]
fn services_jobs_restarts_and_live_restore_on_a_real_node() {
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
    let mut agent = Agent::start(&cluster.addr, &data);
    let limit = Duration::from_secs(30);
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });

    // A Service of 3 → 3 running containers, each Ready.
    let service = |replicas: u32| {
        format!(
            "kind: Service\nname: web\nreplicas: {replicas}\nimage: {IMAGE}\n\
             command: [sleep, '3600']\nstopGracePeriod: 1s\n"
        )
    };
    apply(&cluster, "web", &service(3));
    wait(&agent, "3 instances Ready", limit, || {
        ready_ids(&cluster, "web").len() == 3
    });
    assert_eq!(agent.containers(), ready_ids(&cluster, "web"));

    // Scale to 5, then to 1.
    cluster.run(&["scale", "web", "5"]).ok();
    wait(&agent, "5 instances Ready", limit, || {
        ready_ids(&cluster, "web").len() == 5 && agent.containers().len() == 5
    });
    cluster.run(&["scale", "web", "1"]).ok();
    wait(&agent, "1 instance left", limit, || {
        instances(&cluster, "web").len() == 1 && agent.containers().len() == 1
    });
    let survivor = ready_ids(&cluster, "web");
    assert_eq!(agent.containers(), survivor);

    // kill -9 the agent: the container keeps running; a new agent adopts it — same id, no
    // restart, nothing re-placed — and its status never leaves Ready.
    agent.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ready_ids(&cluster, "web"),
        survivor,
        "still Ready while the agent is down"
    );
    let mut agent = Agent::start(&cluster.addr, &data);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ready_ids(&cluster, "web"), survivor);
    assert_eq!(agent.containers(), survivor, "adopted, not created again");
    let web = instances(&cluster, "web");
    assert_eq!(web[0]["status"]["restartCount"], 0, "{web:?}");

    // A crashing container restarts with a growing backoff and shows its restarts.
    apply(
        &cluster,
        "crash",
        &format!(
            "kind: Service\nname: crash\nimage: {IMAGE}\ncommand: [sh, -c, 'exit 3']\n\
             restart: {{policy: always, backoff: {{initial: 200ms, max: 1s}}}}\n"
        ),
    );
    wait(&agent, "3 restarts of the crashing instance", limit, || {
        let crash = instances(&cluster, "crash");
        crash.len() == 1 && crash[0]["status"]["restartCount"].as_u64() >= Some(3)
    });
    let crash = &instances(&cluster, "crash")[0];
    assert_eq!(crash["status"]["exitCode"], 3, "{crash:?}");

    // A Job of 5 completions, 2 at a time: 5 instances that exited 0.
    apply(
        &cluster,
        "batch",
        &format!(
            "kind: Job\nname: batch\ncompletions: 5\nparallelism: 2\nimage: {IMAGE}\n\
             command: [sh, -c, 'sleep 0.2']\n"
        ),
    );
    wait(&agent, "5 completions", limit, || {
        instances(&cluster, "batch")
            .iter()
            .filter(|i| i["status"]["state"] == "Exited" && i["status"]["exitCode"] == 0)
            .count()
            == 5
    });

    // Delete everything: no container, rootfs mount or status left.
    for name in ["web", "crash", "batch"] {
        cluster.run(&["delete", "workload", name]).ok();
    }
    let statuses = || -> Vec<String> {
        std::fs::read_dir(data.join("instances"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Removal goes container, then rootfs, then status: wait for all of it.
    wait(
        &agent,
        "every container, mount and status removed",
        limit,
        || agent.containers().is_empty() && mounts_under(&data) == 0 && statuses().is_empty(),
    );
    agent.kill();
    let _ = std::io::stderr().flush();
}
