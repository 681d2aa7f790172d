//! `gantry-agent run`: the node agent daemon. It opens the runtime (re-adopting the
//! containers of an earlier agent process) and the image store, reads the statuses it kept,
//! registers with a scheduler reporting them — before it reconciles anything — and then keeps
//! the node's containers converged to the assignments the session delivers.
//!
//! # Live restore
//!
//! Stopping the agent never stops containers: each runs under its own shim. A new agent
//! process finds them in the runtime's state dir, reports their statuses as they were kept
//! (a Ready instance stays Ready), and its workers adopt them instead of creating new ones.
//! Containers whose instance is no longer assigned are removed only once the first assignment
//! set has arrived.

pub mod dns;
pub mod image_gc;
pub mod images;
pub mod instance;
pub mod metrics;
pub mod net;
pub mod probe;
pub mod reconcile;
pub mod relay;
pub mod session;
pub mod stats;
pub mod status;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use gantry::pb;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use self::instance::{Env, LABEL_INSTANCE, Worker};
use self::reconcile::{Action, Assigned, reconcile};
use self::session::{Desired, Dial};
use self::status::{Event, Status};
use crate::image::{ImageStore, PullOptions};
use crate::runtime::{BuiltinRuntime, ContainerState, Runtime, RuntimeConfig};

/// How often the reconciler looks again without being woken.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

/// Settings of the agent daemon.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node name.
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// How to reach the scheduler.
    pub dial: Dial,
    /// Address other nodes reach this one at.
    pub address: String,
    /// Data directory: `runtime/`, `images/`, `instances/` below it.
    pub data_dir: PathBuf,
    /// Parent cgroup of the containers (default: a `gantry` child of the agent's cgroup).
    pub cgroup_parent: Option<PathBuf>,
    /// Container state directories on a tmpfs (see `RuntimeConfig::state_tmpfs`).
    pub state_tmpfs: bool,
    /// Resources kept for the system: CPU millicores, memory bytes, pids.
    pub reserved: (u64, u64, u32),
    /// How images are pulled.
    pub pull: PullOptions,
    /// Periodic reconcile interval.
    pub resync: Duration,
    /// Container networking (conflist, plugins, fallback subnet).
    pub network: net::NetConfig,
    /// Where `/metrics`, `/healthz` and `/readyz` listen (none when `None`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Image garbage collection thresholds.
    pub image_gc: crate::image::gc::GcPolicy,
    /// How often image garbage collection looks at the disk.
    pub image_gc_interval: Duration,
}

/// Runs the agent until `shutdown` turns true. Containers keep running afterwards.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> Result<()> {
    let runtime_root = config.data_dir.join("runtime");
    let status_dir = config.data_dir.join("instances");
    std::fs::create_dir_all(&status_dir).with_context(|| format!("creating {status_dir:?}"))?;
    let shim = std::env::current_exe().context("locating the agent binary for the shim")?;
    let mut runtime_config =
        RuntimeConfig::new(&runtime_root, &shim, config.cgroup_parent.as_deref())
            .context("configuring the runtime")?;
    runtime_config.state_tmpfs = config.state_tmpfs;
    let runtime = BuiltinRuntime::open(runtime_config).context("opening the runtime")?;
    let images =
        ImageStore::open(config.data_dir.join("images")).context("opening the image store")?;

    let restored = restore(&runtime, &status_dir).await;
    release_orphan_rootfs(&runtime, &images).await;
    let (network_tx, network_rx) = watch::channel(None);
    let net = net::Net::open(
        config.network.clone(),
        &config.data_dir,
        &config.address,
        network_rx,
    )
    .await;
    if let Some(running) = running_containers(&runtime).await {
        net.cleanup(&running).await;
    }
    let net = Arc::new(net);
    let net_task = tokio::spawn(net.clone().run());
    let warm_task = tokio::spawn(net.clone().keep_warm());
    let (names_tx, names_rx) = watch::channel(dns::Names::new());
    let dns_task = config
        .network
        .dns
        .clone()
        .map(|dns| tokio::spawn(dns::run(dns, net.gateways(), names_rx)));
    info!(node = %config.name, instances = restored.len(), "agent starting");
    let register = registration(&config);
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (desired_tx, mut desired_rx) = watch::channel::<Option<Desired>>(None);
    let env = Arc::new(Env {
        runtime,
        images,
        pull: config.pull.clone(),
        status_dir,
        reports: reports_tx,
        net,
        metrics: Arc::new(metrics::Metrics::new()),
    });
    let metrics_task = config.metrics_listen.map(|addr| {
        let router = metrics::router(env.clone());
        tokio::spawn(metrics::serve(addr, router, shutdown.clone()))
    });
    let gc_wake = Arc::new(tokio::sync::Notify::new());
    let gc_task = tokio::spawn(image_gc::run(
        env.clone(),
        config.image_gc,
        config.image_gc_interval,
        desired_rx.clone(),
        gc_wake.clone(),
        shutdown.clone(),
    ));
    let session = tokio::spawn(session::run(
        config.dial.clone(),
        register,
        restored.clone(),
        desired_tx,
        network_tx,
        names_tx,
        reports_rx,
        shutdown.clone(),
        relay::Relays::new(env.clone()),
    ));

    let mut restored: HashMap<String, Status> =
        restored.into_iter().map(|s| (s.id.clone(), s)).collect();
    let mut workers: BTreeMap<String, Worker> = BTreeMap::new();
    let retiring: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut resync = tokio::time::interval(config.resync);
    let mut shutdown = shutdown;
    env.metrics.set_looping(true);
    loop {
        tokio::select! {
            () = session::stopped(&mut shutdown) => break,
            changed = desired_rx.changed() => if changed.is_err() { break },
            _ = resync.tick() => {}
        }
        let Some(desired) = desired_rx.borrow_and_update().clone() else {
            continue;
        };
        env.metrics.set_assigned();
        let started = std::time::Instant::now();
        workers.retain(|_, w| !w.finished());
        let held: BTreeMap<String, Assigned> = workers
            .iter()
            .filter_map(|(id, w)| w.assigned().map(|a| (id.clone(), a)))
            .collect();
        let containers = match env.runtime.list().await {
            Ok(list) => list
                .into_iter()
                .filter_map(|c| c.spec.labels.get(LABEL_INSTANCE).map(|_| c.id))
                .collect(),
            Err(err) => {
                warn!(%err, "listing containers failed");
                Vec::new()
            }
        };
        let containers: Vec<String> = {
            let retiring = retiring.lock().expect("retiring lock");
            containers
                .into_iter()
                .filter(|id: &String| !retiring.contains(id))
                .collect()
        };
        for action in reconcile(&desired.instances, &held, &containers) {
            match action {
                Action::Start(id, assigned) => {
                    let kept = restored.remove(&id);
                    let worker = Worker::start(env.clone(), id.clone(), assigned, kept);
                    workers.insert(id, worker);
                }
                Action::Update(id, assigned) => {
                    if let Some(worker) = workers.get(&id) {
                        worker.update(assigned);
                    }
                }
                Action::Retire(id) => {
                    retiring.lock().expect("retiring lock").insert(id.clone());
                    let worker = workers.remove(&id);
                    let env = env.clone();
                    let retiring = retiring.clone();
                    let gc_wake = gc_wake.clone();
                    tokio::spawn(async move {
                        match worker {
                            Some(worker) => worker.retire().await,
                            None => instance::remove_orphan(&env, &id).await,
                        }
                        retiring.lock().expect("retiring lock").remove(&id);
                        // The image may be unused now.
                        gc_wake.notify_one();
                    });
                }
            }
        }
        // Statuses kept for instances the scheduler no longer assigns, with no container.
        restored.retain(|id, _| {
            let keep = desired.instances.contains_key(id);
            if !keep {
                status::remove(&env.status_dir, id);
            }
            keep
        });
        env.metrics.observe_reconcile(started.elapsed());
        tracing::debug!(revision = desired.revision, elapsed = ?started.elapsed(), "reconciled");
    }
    env.metrics.set_looping(false);
    info!("agent stopping; containers keep running");
    gc_task.abort();
    if let Some(task) = metrics_task {
        // The endpoint stops with the shutdown signal; a reconcile loop that ended otherwise
        // (the session gone) takes it down too.
        task.abort();
    }
    session.abort();
    net_task.abort();
    // Warm namespaces stay attached; the next agent's clean-up detaches those never claimed.
    warm_task.abort();
    if let Some(task) = dns_task {
        task.abort();
    }
    Ok(())
}

/// Ids of the containers that are created or running, whose network attachments are kept;
/// `None` when they cannot be listed (then nothing is detached).
async fn running_containers(runtime: &BuiltinRuntime) -> Option<HashSet<String>> {
    match runtime.list().await {
        Ok(list) => Some(
            list.into_iter()
                .filter(|c| !matches!(c.state, ContainerState::Stopped(_)))
                .map(|c| c.id)
                .collect(),
        ),
        Err(err) => {
            warn!(%err, "listing containers failed; network attachments not checked");
            None
        }
    }
}

/// The statuses kept on disk, brought up to date with the runtime: a container that ended
/// while no agent watched is reported as ended; one that is gone is forgotten.
async fn restore(runtime: &BuiltinRuntime, dir: &std::path::Path) -> Vec<Status> {
    let mut statuses = status::load_all(dir);
    let containers: HashMap<String, ContainerState> = match runtime.list().await {
        Ok(list) => list.into_iter().map(|c| (c.id, c.state)).collect(),
        Err(err) => {
            warn!(%err, "listing containers failed");
            HashMap::new()
        }
    };
    statuses.retain_mut(|s| match containers.get(&s.id) {
        Some(ContainerState::Stopped(exit)) if s.is_running() => {
            s.apply(
                Event::Exit {
                    code: exit.code,
                    oom: exit.oom_killed,
                },
                if exit.oom_killed {
                    "OOMKilled"
                } else {
                    "Error"
                },
                "ended while the agent was down",
                exit.finished_at,
            );
            let _ = status::save(dir, s);
            true
        }
        Some(_) => true,
        None => {
            // Removed (or never created) before the last agent stopped: nothing to report;
            // a worker that is still assigned the instance starts over.
            status::remove(dir, &s.id);
            false
        }
    });
    statuses
}

/// Releases root filesystems whose container is gone: an agent killed between removing a
/// container and unmounting its rootfs, or between mounting one and creating the container.
pub async fn release_orphan_rootfs(runtime: &BuiltinRuntime, images: &ImageStore) {
    let containers: HashSet<String> = match runtime.list().await {
        Ok(list) => list.into_iter().map(|c| c.id).collect(),
        Err(err) => {
            warn!(%err, "listing containers failed; root filesystems not checked");
            return;
        }
    };
    for (container, _) in images.holds() {
        if containers.contains(&container) {
            continue;
        }
        info!(%container, "releasing the root filesystem of a container that is gone");
        instance::release_rootfs(images, &container).await;
    }
}

/// The registration of this node (statuses are added per session).
fn registration(config: &Config) -> pb::Register {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let memory = meminfo_total().unwrap_or(0);
    let pids = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(32768);
    let (cpu_reserved, memory_reserved, pids_reserved) = config.reserved;
    let resources = |cpu_millis: u64, memory: u64, pids: u32| pb::Resources {
        cpu: Some(format!("{cpu_millis}m")),
        memory: Some(memory.to_string()),
        pids: Some(pids),
    };
    pb::Register {
        name: config.name.clone(),
        labels: config.labels.clone().into_iter().collect(),
        capacity: Some(resources(cpus * 1000, memory, pids)),
        allocatable: Some(resources(
            (cpus * 1000).saturating_sub(cpu_reserved),
            memory.saturating_sub(memory_reserved),
            pids.saturating_sub(pids_reserved),
        )),
        address: config.address.clone(),
        os: std::env::consts::OS.to_owned(),
        arch: match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }
        .to_owned(),
        runtime: "libcontainer 0.7.0".to_owned(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default(),
        os_image: os_image(),
        boot_id: format!(
            "{:x}{:x}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
            std::process::id()
        ),
        applied_revision: 0,
        instances: Vec::new(),
    }
}

fn meminfo_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_default()
}
