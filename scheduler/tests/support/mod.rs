//! Shared harness of the integration tests: a real single-member etcd on loopback ports,
//! with its data in a temp dir. Each test crate includes it with `mod support;`.
//!
//! etcd tests need `/usr/bin/etcd` (Debian `etcd-server`): without it they are skipped,
//! unless `CI` is set (to anything but `false` or `0`), where they fail.

// Each test crate uses only part of this module.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gantry_scheduler::store::{EtcdOptions, EtcdStore, Store};
use tempfile::TempDir;
use tokio::time::sleep;

const ETCD_BIN: &str = "/usr/bin/etcd";

/// Whether etcd tests can run here: skip without the binary, unless CI demands it.
pub fn etcd_available() -> bool {
    if Path::new(ETCD_BIN).exists() {
        return true;
    }
    let ci = std::env::var("CI").unwrap_or_default();
    assert!(
        matches!(ci.as_str(), "" | "0" | "false"),
        "{ETCD_BIN} is missing and CI={ci}: install Debian's etcd-server"
    );
    eprintln!("skipping etcd test: {ETCD_BIN} not found (set CI=true to make this an error)");
    false
}

/// Two distinct free loopback ports (both held until chosen, so they differ).
pub fn free_ports() -> Result<(u16, u16)> {
    let a = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    let b = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

/// A single-member etcd on loopback with its data in a temp dir; killed on drop.
pub struct EtcdServer {
    pub client_url: String,
    peer_url: String,
    extra_args: Vec<String>,
    child: Option<Child>,
    dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd with its default settings and waits until it answers.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Starts etcd with extra flags (e.g. `"--max-txn-ops=1024"`, kept across restarts) and
    /// waits until it answers.
    pub async fn start_with(extra_args: &[&str]) -> Result<Self> {
        // A port found free can be taken by someone else (another test's etcd, an outgoing
        // connection) before etcd binds it: try again with other ports.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (client_port, peer_port) = free_ports()?;
            let mut server = Self {
                client_url: format!("http://127.0.0.1:{client_port}"),
                peer_url: format!("http://127.0.0.1:{peer_port}"),
                extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
                child: None,
                dir: tempfile::tempdir().context("creating etcd temp dir")?,
            };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(err) if attempt < 5 && server.log_tail().contains("address already in use") => {
                    eprintln!("etcd could not bind its ports, retrying: {err}");
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// A new client connection, with a short request timeout (1 s).
    pub async fn connect(&self) -> Result<EtcdStore> {
        let mut options = EtcdOptions::new([self.client_url.clone()]);
        options.request_timeout = Duration::from_secs(1);
        Ok(EtcdStore::connect(options).await?)
    }

    /// Kills etcd (as a crash would: no clean shutdown) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills etcd if it runs, starts it again on the same data, ports and flags, and waits
    /// until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// The last 20 lines of etcd's log (of all its runs).
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Starts etcd (again, on the same data and ports) and waits until it answers.
    async fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening etcd log")?;
        let data_dir = self.dir.path().join("data");
        let child = Command::new(ETCD_BIN)
            .arg("--name=default")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={}", self.client_url))
            .arg(format!("--advertise-client-urls={}", self.client_url))
            .arg(format!("--listen-peer-urls={}", self.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", self.peer_url))
            .arg(format!("--initial-cluster=default={}", self.peer_url))
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("cloning log handle")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {ETCD_BIN}"))?;
        self.child = Some(child);
        let mut options = EtcdOptions::new([self.client_url.clone()]);
        options.request_timeout = Duration::from_millis(500);
        let probe = EtcdStore::connect(options).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match probe.current_revision().await {
                Ok(_) => return Ok(()),
                Err(err) if std::time::Instant::now() < deadline => {
                    if let Some(status) = self
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        bail!(
                            "etcd exited with {status} ({err}); log:\n{}",
                            self.log_tail()
                        );
                    }
                    sleep(Duration::from_millis(50)).await;
                }
                Err(err) => bail!(
                    "etcd did not answer within 30 s: {err}; log:\n{}",
                    self.log_tail()
                ),
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scheduler replica running in the test process on the embedded store, with simulated
/// agents (the real NodeSession API) to run its instances.
pub struct InProcess {
    /// The store the replica uses (the test reads it directly).
    pub store: std::sync::Arc<dyn Store>,
    /// `http://127.0.0.1:port` of its API.
    pub addr: String,
    /// The simulated nodes, `node-0`, `node-1`, ….
    pub agents: Vec<gantry_scheduler::sim::SimAgent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: TempDir,
}

impl InProcess {
    /// Starts a replica and `nodes` agents built from `agent(name)`.
    pub async fn start(
        nodes: usize,
        agent: impl Fn(String) -> gantry_scheduler::sim::SimConfig,
    ) -> Result<Self> {
        Self::start_with(nodes, agent, |_| {}).await
    }

    /// [`InProcess::start`] with the replica's configuration adjusted by `configure`.
    pub async fn start_with(
        nodes: usize,
        agent: impl Fn(String) -> gantry_scheduler::sim::SimConfig,
        configure: impl FnOnce(&mut gantry_scheduler::server::Config),
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(
            gantry_scheduler::store::EmbeddedStore::open(dir.path().join("store.redb")).await?,
        );
        let mut config =
            gantry_scheduler::server::Config::new("127.0.0.1:0".parse()?, dir.path().into());
        configure(&mut config);
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(gantry_scheduler::server::run_with_store(
            config,
            store.clone(),
            async {
                let _ = stop_rx.await;
            },
            Some(bound_tx),
        ));
        let addr = format!("http://{}", bound_rx.await?);
        let mut agents = Vec::new();
        for n in 0..nodes {
            agents.push(
                gantry_scheduler::sim::SimAgent::start(
                    vec![addr.clone()],
                    agent(format!("node-{n}")),
                )
                .await,
            );
        }
        Ok(InProcess {
            store,
            addr,
            agents,
            stop: Some(stop_tx),
            server: Some(server),
            _dir: dir,
        })
    }

    /// Stops the agents, then the replica.
    pub async fn stop(mut self) -> Result<()> {
        for agent in std::mem::take(&mut self.agents) {
            agent.stop().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await??;
        }
        Ok(())
    }
}

/// Polls `check` every 100 ms until it holds; fails after `limit`. Returns the time it took.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let started = std::time::Instant::now();
    loop {
        if check().await? {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{what}: not within {limit:?}");
        }
        sleep(Duration::from_millis(100)).await;
    }
}
