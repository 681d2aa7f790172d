//! Harness of the CLI tests: a real gantry-scheduler running in the test process (on the
//! embedded store in a temp dir, its own tokio runtime) with simulated nodes that speak the real
//! NodeSession API, and the real `gantry` binary pointed at it.

// Each test crate uses only part of this module.
#![allow(dead_code)]

pub mod node;

/// A real single-member etcd on loopback (the scheduler's own test harness).
#[path = "../../scheduler/tests/support/mod.rs"]
pub mod etcd;

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_scheduler::server::{Config, run_with_store};
use gantry_scheduler::sim::{SimAgent, SimConfig};
use gantry_scheduler::store::{EmbeddedStore, Store};
use serde_json::Value;
use tempfile::TempDir;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Longest a test waits for the cluster to converge: a guard, not a synchronisation.
pub const CONVERGE: Duration = Duration::from_secs(30);

/// The `gantry` binary with a clean environment: no address or config from the machine it
/// runs on, no colour, `HOME` in `home`.
pub fn gantry(home: &std::path::Path) -> assert_cmd::Command {
    let mut cmd = assert_cmd::Command::new(env!("CARGO_BIN_EXE_gantry"));
    cmd.env_remove("GANTRY_ADDR")
        .env_remove("GANTRY_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home)
        .env("NO_COLOR", "1")
        .timeout(Duration::from_secs(120));
    cmd
}

/// What a finished `gantry` said.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(out: Output) -> Self {
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Ran {
    /// Asserts exit code 0 and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "gantry failed: {self:#?}");
        &self.stdout
    }

    /// Asserts exit code `code` and returns stderr.
    #[track_caller]
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, code, "unexpected exit code: {self:#?}");
        &self.stderr
    }
}

/// A scheduler and simulated nodes, stopped on drop.
pub struct Cluster {
    runtime: Runtime,
    /// `http://127.0.0.1:PORT` of the scheduler's API.
    pub addr: String,
    /// The simulated nodes `node-0`, `node-1`, ….
    pub agents: Vec<SimAgent>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Scratch space for workload files, and `HOME` of the CLI.
    pub dir: TempDir,
    /// The etcd the scheduler stores its state in ([`Cluster::start_on_etcd`]); dropped after
    /// the scheduler.
    etcd: Option<etcd::EtcdServer>,
}

/// A cluster network of its own for each cluster of the test process (10.160.0.0/16,
/// 10.161.0.0/16, …): tests running at once start real agents on one machine, whose containers
/// share its bridge, so their node subnets must not overlap.
fn next_cluster_cidr() -> gantry_scheduler::network::Cidr {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 64;
    format!("10.{}.0.0/16", 160 + n)
        .parse()
        .expect("a cluster network")
}

impl Cluster {
    /// A scheduler with `nodes` default simulated nodes (4 cores, 8 GiB), all Ready.
    pub fn start(nodes: usize) -> Self {
        Self::start_with(nodes, SimConfig::new)
    }

    /// A scheduler with `nodes` simulated nodes built by `agent(name)`, all Ready.
    pub fn start_with(nodes: usize, agent: impl Fn(String) -> SimConfig) -> Self {
        Self::start_on(nodes, agent, false, "127.0.0.1:0", |_| {})
    }

    /// [`Cluster::start`] with the scheduler's settings changed by `tweak`.
    pub fn start_configured(nodes: usize, tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_on(nodes, SimConfig::new, false, "127.0.0.1:0", tweak)
    }

    /// A scheduler without simulated nodes listening on `listen` (`IP:0`), for real agents
    /// reaching it from network namespaces the test made.
    pub fn start_listening(listen: &str) -> Self {
        Self::start_on(0, SimConfig::new, false, listen, |_| {})
    }

    /// A scheduler on a real etcd (started here, on loopback) with `nodes` default simulated
    /// nodes. `None` where etcd is missing and the test may skip (never under `CI=true`).
    pub fn start_on_etcd(nodes: usize) -> Option<Self> {
        etcd::etcd_available()
            .then(|| Self::start_on(nodes, SimConfig::new, true, "127.0.0.1:0", |_| {}))
    }

    fn start_on(
        nodes: usize,
        agent: impl Fn(String) -> SimConfig,
        on_etcd: bool,
        listen: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("test runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("scheduler");
        let (addr, stop, server, agents, etcd) = runtime.block_on(async {
            std::fs::create_dir_all(&data).expect("scheduler data dir");
            let (store, etcd): (Arc<dyn Store>, _) = if on_etcd {
                let etcd = etcd::EtcdServer::start().await.expect("starting etcd");
                let store = etcd.connect().await.expect("connecting to etcd");
                (Arc::new(store), Some(etcd))
            } else {
                let store = EmbeddedStore::open(data.join("store.redb"))
                    .await
                    .expect("embedded store");
                (Arc::new(store), None)
            };
            let mut config = Config::new(listen.parse().expect("addr"), data.clone());
            config.cluster_cidr = next_cluster_cidr();
            tweak(&mut config);
            let (bound_tx, bound_rx) = oneshot::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let server = tokio::spawn(run_with_store(
                config,
                store,
                async {
                    let _ = stop_rx.await;
                },
                Some(bound_tx),
            ));
            let addr = format!("http://{}", bound_rx.await.expect("scheduler bound"));
            let mut agents = Vec::new();
            for n in 0..nodes {
                agents.push(SimAgent::start(vec![addr.clone()], agent(format!("node-{n}"))).await);
            }
            (addr, stop_tx, server, agents, etcd)
        });
        let cluster = Cluster {
            runtime,
            addr,
            agents,
            stop: Some(stop),
            server: Some(server),
            dir,
            etcd,
        };
        cluster.wait_until("every node is Ready", || {
            let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
            let items = nodes["items"].as_array().cloned().unwrap_or_default();
            items.len() == nodes_len(&cluster) && items.iter().all(|n| n["status"] == "Ready")
        });
        cluster
    }

    /// `gantry` pointed at this cluster through `GANTRY_ADDR`.
    pub fn gantry(&self) -> assert_cmd::Command {
        let mut cmd = gantry(self.dir.path());
        cmd.env("GANTRY_ADDR", &self.addr);
        cmd
    }

    /// Runs `gantry ARGS…` against this cluster.
    pub fn run(&self, args: &[&str]) -> Ran {
        self.gantry()
            .args(args)
            .output()
            .expect("running gantry")
            .into()
    }

    /// Runs `gantry ARGS…`, asserts success and parses stdout as JSON.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> Value {
        let ran = self.run(args);
        serde_json::from_str(ran.ok()).unwrap_or_else(|e| panic!("{e}: {ran:#?}"))
    }

    /// Writes a file into the scratch dir and returns its path.
    pub fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).expect("writing a test file");
        path
    }

    /// Instances the simulated nodes run, over all nodes.
    pub fn running(&self) -> usize {
        self.agents.iter().map(|a| a.running().len()).sum()
    }

    /// Polls `check` every 100 ms until it holds; panics after [`CONVERGE`].
    #[track_caller]
    pub fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let started = Instant::now();
        while !check() {
            assert!(
                started.elapsed() < CONVERGE,
                "{what}: not within {CONVERGE:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn nodes_len(cluster: &Cluster) -> usize {
    cluster.agents.len()
}

/// A `gantry` still running (a watch), its stdout read line by line; killed on drop.
pub struct Watcher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Watcher {
    /// Reads lines until one satisfies `check`; panics after [`CONVERGE`] or when the
    /// process ends first.
    #[track_caller]
    pub fn wait_for(&mut self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if check(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("{what}: {e}; read so far: {:#?}", self.seen),
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Cluster {
    /// Starts `gantry ARGS…` (a watch) against this cluster.
    pub fn spawn(&self, args: &[&str]) -> Watcher {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(args)
            .env_remove("GANTRY_CONFIG")
            .env_remove("XDG_CONFIG_HOME")
            .env("GANTRY_ADDR", &self.addr)
            .env("HOME", self.dir.path())
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("starting gantry");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watcher {
            child,
            lines,
            seen: Vec::new(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let agents = std::mem::take(&mut self.agents);
        let stop = self.stop.take();
        let server = self.server.take();
        self.runtime.block_on(async move {
            for agent in agents {
                agent.stop().await;
            }
            if let Some(stop) = stop {
                let _ = stop.send(());
            }
            if let Some(server) = server {
                let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
            }
        });
        drop(self.etcd.take());
    }
}
