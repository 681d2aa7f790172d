//! One worker task per assigned instance: it owns that instance's container on this node —
//! pull, create, start, wait, restart with backoff, stop, remove — and reports every status
//! transition, following the container's health probes while it runs (`super::probe`: readiness
//! sets Ready, a failed liveness probe stops the container and the restart policy takes over).
//! The reconciler starts, updates and retires workers; a worker adopts a container that already
//! exists (an agent restart) instead of creating another.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gantry::workload::{Network, Workload};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::probe::{self, Action, ContainerCheck, Kind, Probes, Timing, Tracker, Verdict};
use super::reconcile::{AfterExit, Assigned, Ended, after_exit};
use super::status::{self, Event, LastExit, State, Status};
use crate::image::{ImageRef, ImageStore, ProgressSink, PullDecision, PullOptions, PullPolicy};
use crate::image::{PullTotals, pull::follow};
use crate::runtime::spec::{NetworkMode, ProcessSpec, Resources};
use crate::runtime::{
    BuiltinRuntime, ContainerInfo, ContainerSpec, ContainerState, ExitStatus, Runtime, RuntimeError,
};

/// Label naming the instance a container runs.
pub const LABEL_INSTANCE: &str = "gantry.instance";
/// Label naming the workload of the instance.
pub const LABEL_WORKLOAD: &str = "gantry.workload";
/// Label with the generation the container runs.
pub const LABEL_GENERATION: &str = "gantry.generation";
/// Reason of an exit caused by a failing liveness probe.
pub const REASON_LIVENESS: &str = "LivenessProbeFailed";
/// Reason of a running instance whose readiness probe fails.
pub const REASON_READINESS: &str = "ReadinessProbeFailed";
/// How often a pull's progress is reported at most.
const PULL_REPORT_EVERY: Duration = Duration::from_millis(500);

/// What every worker shares.
pub struct Env {
    /// The node runtime.
    pub runtime: BuiltinRuntime,
    /// The image store.
    pub images: ImageStore,
    /// How images are pulled.
    pub pull: PullOptions,
    /// Where statuses are kept.
    pub status_dir: PathBuf,
    /// Where statuses go to the session.
    pub reports: mpsc::UnboundedSender<Status>,
    /// Container networking.
    pub net: Arc<super::net::Net>,
    /// The agent's metrics and health.
    pub metrics: Arc<super::metrics::Metrics>,
}

/// The handle of a running worker.
pub struct Worker {
    assigned: watch::Sender<Option<Assigned>>,
    task: tokio::task::JoinHandle<()>,
}

impl Worker {
    /// Starts a worker for instance `id`, continuing from `restored` (its status kept on disk,
    /// if any).
    pub fn start(
        env: Arc<Env>,
        id: String,
        assigned: Assigned,
        restored: Option<Status>,
    ) -> Worker {
        let (tx, rx) = watch::channel(Some(assigned));
        let task = tokio::spawn(run(env, id, rx, restored));
        Worker { assigned: tx, task }
    }

    /// The assignment the worker holds.
    pub fn assigned(&self) -> Option<Assigned> {
        self.assigned.borrow().clone()
    }

    /// Gives the worker a changed assignment.
    pub fn update(&self, assigned: Assigned) {
        self.assigned.send_replace(Some(assigned));
    }

    /// Tells the worker to stop and remove its container; returns when it did.
    pub async fn retire(self) {
        self.assigned.send_replace(None);
        let _ = self.task.await;
    }

    /// Whether the worker task ended.
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Stops and removes a container no worker owns, with its rootfs and status.
pub async fn remove_orphan(env: &Env, id: &str) {
    info!(instance = %id, "removing a container no assignment names");
    remove(env, id, "SIGKILL", Duration::from_secs(0)).await;
}

/// What a worker does after handling an exit.
enum Next {
    /// Look at the assignment again and run (the restart is due).
    Again,
    /// The instance ended for good; wait for the assignment to change.
    Settled,
    /// The worker's handle is gone.
    End,
}

/// A worker task's own state.
struct Task {
    env: Arc<Env>,
    id: String,
    status: Status,
}

async fn run(
    env: Arc<Env>,
    id: String,
    mut rx: watch::Receiver<Option<Assigned>>,
    restored: Option<Status>,
) {
    let Some(first) = rx.borrow_and_update().clone() else {
        return;
    };
    let status = restored
        .filter(|s| s.generation == first.generation)
        .unwrap_or_else(|| Status::pending(&id, &first.workload, first.generation));
    let mut w = Task { env, id, status };
    w.report();
    let mut last_spec: Option<Arc<Workload>> = None;
    // The container ended and is not to run again (a completed Job instance): wait for the
    // assignment to change.
    let mut settled = false;
    'assigned: loop {
        let Some(assigned) = rx.borrow_and_update().clone() else {
            let (signal, grace) = stop_params(last_spec.as_deref());
            remove(&w.env, &w.id, &signal, grace).await;
            status::remove(&w.env.status_dir, &w.id);
            return;
        };
        if assigned.spec.is_some() {
            last_spec.clone_from(&assigned.spec);
        }
        let spec = match (&assigned.spec, assigned.stop) {
            (Some(_), false) if settled => {
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
            (Some(spec), false) => spec.clone(),
            (spec, _) => {
                w.stop(spec.as_deref()).await;
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        match w.ensure_running(&spec).await {
            Ok(()) => {}
            Err(message) => {
                warn!(instance = %w.id, %message, "instance could not start");
                w.set(Event::Fail, "StartError", &message);
                // Try again later, or when the assignment changes.
                let delay = spec.restart.backoff.max.get().min(Duration::from_secs(10));
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(delay) => {}
                }
                continue;
            }
        }
        // Wait for the process to end, or for the assignment to change, following the probes
        // meanwhile. They stop (dropped) with this run or when the assignment changes.
        let mut probes = w.probes(&spec).await;
        let env = w.env.clone();
        let id = w.id.clone();
        let wait = env.runtime.wait(&id);
        tokio::pin!(wait);
        let mut killed = None;
        let exit = loop {
            tokio::select! {
                exit = &mut wait => break exit,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue 'assigned;
                }
                report = probes.next() => match (report.kind, report.verdict) {
                    (Kind::Readiness, Verdict::Ready) => w.set(Event::Ready, "", ""),
                    (Kind::Readiness, _) => {
                        w.set(Event::Unready, REASON_READINESS, &report.message);
                    }
                    (Kind::Liveness, Verdict::Failed) => {
                        warn!(instance = %w.id, message = %report.message, "liveness probe failed; stopping the container");
                        let (signal, grace) = stop_params(Some(&spec));
                        match w.env.runtime.stop(&w.id, &signal, grace).await {
                            Ok(exit) => {
                                killed = Some(report.message);
                                break Ok(exit);
                            }
                            // It keeps running without its liveness probe until it ends.
                            Err(err) => warn!(instance = %w.id, %err, "stopping the container failed"),
                        }
                    }
                    (Kind::Liveness, _) => {}
                },
            }
        };
        drop(probes);
        match exit {
            Ok(exit) => match w.exited(&spec, exit, killed.as_deref(), &mut rx).await {
                Next::End => return,
                Next::Settled => settled = true,
                Next::Again => {}
            },
            Err(err) => {
                warn!(instance = %w.id, %err, "waiting for the container failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl Task {
    fn set(&mut self, event: Event, reason: &str, message: &str) {
        self.status.apply(event, reason, message, SystemTime::now());
        self.report();
    }

    fn report(&self) {
        debug!(instance = %self.id, state = ?self.status.state, reason = %self.status.reason, "status");
        // On the way to a container nothing needs keeping: an agent restarted meanwhile finds
        // the container (or none) in the runtime, and the last kept status (restart count,
        // last exit) stays as it was. Each save is a file created and one replaced.
        let passing = matches!(
            self.status.state,
            State::Pending | State::Pulling | State::Starting
        );
        if !passing && let Err(err) = status::save(&self.env.status_dir, &self.status) {
            warn!(instance = %self.id, %err, "keeping the instance status on disk failed");
        }
        let _ = self.env.reports.send(self.status.clone());
    }

    /// Makes sure the container exists and runs: adopts a running one, starts a created one,
    /// creates one when there is none. A container that already ended is left for the exit
    /// handling (the caller's `wait` returns at once).
    async fn ensure_running(&mut self, spec: &Workload) -> Result<(), String> {
        match self.env.runtime.state(&self.id).await {
            Ok(info) => match info.state {
                ContainerState::Running { started_at, .. } => {
                    if !self.status.is_running() {
                        self.status.apply(Event::Started, "", "", started_at);
                        self.report();
                        self.readiness(spec);
                    }
                    Ok(())
                }
                ContainerState::Created { .. } => self.start(spec).await,
                ContainerState::Stopped(_) => Ok(()),
            },
            Err(RuntimeError::NotFound(_)) => self.create(spec).await,
            Err(err) => Err(err.to_string()),
        }
    }

    /// Starts the probes of the container's current run, if it runs and has any. A readiness
    /// probe starts from the status as it is (an adopted run that was Ready stays Ready until
    /// the probe fails); initial delays count from the start of the run.
    async fn probes(&self, spec: &Workload) -> Probes {
        let mut probes = Probes::new();
        let health = &spec.health;
        if health.readiness.is_none() && health.liveness.is_none() {
            return probes;
        }
        let (pid, started_at) = match self.env.runtime.state(&self.id).await {
            Ok(ContainerInfo {
                state: ContainerState::Running { pid, started_at },
                ..
            }) => (pid, started_at),
            // Ended already (the exit handling follows) or unreadable (so is waiting).
            _ => return probes,
        };
        let network = match spec.network {
            Network::Host => probe::Network::Host,
            Network::Bridge | Network::None => match probe::Network::open(&netns_path(pid)) {
                Ok(network) => network,
                Err(err) => {
                    warn!(instance = %self.id, %err, "probes not started");
                    return probes;
                }
            },
        };
        let now = SystemTime::now();
        for (kind, probe) in [
            (Kind::Readiness, &health.readiness),
            (Kind::Liveness, &health.liveness),
        ] {
            let Some((probe, action)) = probe.as_ref().and_then(|p| Some((p, Action::of(p)?)))
            else {
                continue;
            };
            let tracker = match kind {
                Kind::Readiness => Tracker::readiness(
                    self.status.state == State::Ready,
                    probe.success_threshold,
                    probe.failure_threshold,
                ),
                Kind::Liveness => Tracker::liveness(probe.failure_threshold),
            };
            let check = ContainerCheck {
                env: self.env.clone(),
                container: self.id.clone(),
                action,
                network: network.clone(),
            };
            debug!(instance = %self.id, ?kind, "probe started");
            probes.spawn(kind, tracker, Timing::of(probe, started_at, now), check);
        }
        probes
    }

    /// Readiness without a probe: ready once running.
    fn readiness(&mut self, spec: &Workload) {
        if spec.health.readiness.is_none() && self.status.state == State::Running {
            self.set(Event::Ready, "", "");
        }
    }

    async fn create(&mut self, spec: &Workload) -> Result<(), String> {
        let image = self.image(spec).await?;
        self.set(Event::Start, "", "");
        let merged = crate::image::merge(
            &image.config,
            &spec.command,
            &spec.args,
            &spec.env,
            spec.working_dir.as_deref(),
            spec.user.as_deref(),
        )
        .map_err(|e| format!("image {}: {e}", spec.image))?;
        // The root filesystem and the network namespace are independent: they are prepared at
        // once (a bridge attach is tens of milliseconds of plugin runs).
        let images = self.env.images.clone();
        let id = self.id.clone();
        let mount = async move {
            tokio::task::spawn_blocking(move || images.mount_rootfs(&image, &id))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("preparing the root filesystem: {e}"))
        };
        let attach = async {
            match spec.network {
                Network::Bridge => Some(self.env.net.attach(&self.id, &spec.ports).await),
                Network::Host | Network::None => None,
            }
        };
        let (rootfs, attached) = tokio::join!(mount, attach);
        let rootfs = match rootfs {
            Ok(rootfs) => rootfs,
            Err(err) => {
                if matches!(attached, Some(Ok(_))) {
                    self.env.net.detach(&self.id).await;
                }
                return Err(err);
            }
        };
        // Bridge instances get a namespace on the node network (CNI), named in /etc/hosts, and
        // the node's name responder as their resolver.
        let (network, hostname, hosts, resolv_conf) = match attached {
            None if spec.network == Network::Host => {
                (NetworkMode::Host, None, Default::default(), None)
            }
            None => (NetworkMode::None, None, Default::default(), None),
            Some(Ok(attached)) => {
                self.status.ip = attached.ip.addr().to_string();
                let hostname = super::net::hostname(&self.id);
                let hosts = super::net::hosts(&hostname, &attached);
                let resolv_conf = self.env.net.resolv_conf(&attached);
                (
                    NetworkMode::Path(attached.netns_path),
                    Some(hostname),
                    hosts,
                    resolv_conf,
                )
            }
            Some(Err(err)) => {
                release_rootfs(&self.env.images, &self.id).await;
                return Err(format!("network: {err}"));
            }
        };
        let container = ContainerSpec {
            id: self.id.clone(),
            rootfs,
            readonly_rootfs: false,
            process: ProcessSpec {
                args: merged.args,
                env: merged.env,
                cwd: Some(merged.cwd),
                user: merged.user.unwrap_or_default(),
            },
            hostname,
            resources: Resources {
                cpu_millis: spec.resources.cpu.map(|c| c.millis()),
                memory_bytes: spec.resources.memory.map(|m| m.get()),
                pids: spec.resources.pids.map(i64::from),
                cpuset: None,
            },
            mounts: Vec::new(),
            network,
            hosts,
            resolv_conf,
            privileged: false,
            cap_add: Vec::new(),
            cap_drop: Vec::new(),
            labels: [
                (LABEL_INSTANCE.to_owned(), self.id.clone()),
                (LABEL_WORKLOAD.to_owned(), self.status.workload.clone()),
                (
                    LABEL_GENERATION.to_owned(),
                    self.status.generation.to_string(),
                ),
            ]
            .into(),
        };
        let bare_netns = container.network == NetworkMode::None;
        let created = match self.env.runtime.create(container).await {
            Ok(created) => created,
            Err(err) => {
                self.env.net.detach(&self.id).await;
                self.status.ip.clear();
                release_rootfs(&self.env.images, &self.id).await;
                return Err(err.to_string());
            }
        };
        // The container holds its root filesystem now; the node's mount of it can go.
        let images = self.env.images.clone();
        let id = self.id.clone();
        let detached = tokio::task::spawn_blocking(move || images.detach_rootfs(&id))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(err) = detached {
            warn!(instance = %self.id, %err, "detaching the root filesystem");
        }
        if bare_netns && let ContainerState::Created { pid } = created.state {
            // Nothing else sets up a `none` namespace, and a new one has its loopback down:
            // probes (and the workload) could not use 127.0.0.1.
            if let Err(err) = loopback_up(pid).await {
                warn!(instance = %self.id, %err, "setting the loopback interface up failed");
            }
        }
        self.start(spec).await
    }

    async fn start(&mut self, spec: &Workload) -> Result<(), String> {
        self.env
            .runtime
            .start(&self.id)
            .await
            .map_err(|e| e.to_string())?;
        info!(instance = %self.id, "container started");
        self.set(Event::Started, "", "");
        self.readiness(spec);
        Ok(())
    }

    /// The image of `spec`, pulled when the pull policy says so.
    async fn image(&mut self, spec: &Workload) -> Result<crate::image::Image, String> {
        let reference = ImageRef::parse(&spec.image).map_err(|e| e.to_string())?;
        let canonical = reference.to_string();
        let present = self
            .env
            .images
            .resolve(&canonical)
            .map_err(|e| e.to_string())?;
        let decision = PullPolicy::default_for(&reference).decide(present.is_some());
        let image = match (decision, present) {
            (PullDecision::UseLocal, Some(image)) => image,
            (PullDecision::Missing, _) | (PullDecision::UseLocal, None) => {
                return Err(format!("image {canonical} is not on this node"));
            }
            (PullDecision::Pull, present) => {
                self.set(Event::Pull, "", &format!("pulling {canonical}"));
                // Progress shows in the status (Pulling, bytes done/total), twice a second at most.
                let env = self.env.clone();
                let (sink, progress) = ProgressSink::channel();
                let mut downloaded = 0;
                let pull = env.images.pull(&reference, &env.pull, sink);
                let pulled = follow(pull, progress.clone(), PULL_REPORT_EVERY, |totals| {
                    downloaded = self.pull_progress(totals, downloaded);
                })
                .await;
                // The final numbers stay in the status (the wire contract keeps them).
                self.pull_progress(progress.borrow().totals(), downloaded);
                match pulled {
                    Ok(image) => image,
                    // A pull of `latest` that fails falls back to the local copy, as
                    // Docker's `run` does when it has one.
                    Err(err) => match present {
                        Some(image) => {
                            warn!(instance = %self.id, %err, "pull failed; using the local image");
                            image
                        }
                        None => {
                            self.status.reason = "ImagePullBackOff".into();
                            return Err(format!("pulling {canonical}: {err}"));
                        }
                    },
                }
            }
        };
        self.status.image_digest = image.digest.clone();
        Ok(image)
    }

    /// Shows pull progress in the status and counts the bytes downloaded since `counted`;
    /// returns the bytes counted so far.
    fn pull_progress(&mut self, totals: PullTotals, counted: u64) -> u64 {
        self.env
            .metrics
            .add_pull_bytes(totals.downloaded.saturating_sub(counted));
        self.status.pull = Some(status::Pull {
            bytes_done: totals.bytes_done,
            bytes_total: totals.bytes_total,
            layers_done: totals.layers_done,
            layers_total: totals.layers_total,
        });
        self.report();
        totals.downloaded.max(counted)
    }

    /// Handles the end of a run: restarts it after the backoff, or settles. `killed` is the
    /// failure of the liveness probe that made the worker stop the container, if one did.
    async fn exited(
        &mut self,
        spec: &Workload,
        exit: ExitStatus,
        killed: Option<&str>,
        rx: &mut watch::Receiver<Option<Assigned>>,
    ) -> Next {
        let started_at = self.status.started_at;
        let ran_for = started_at
            .and_then(|t| exit.finished_at.duration_since(t).ok())
            .unwrap_or_default();
        let oom = exit.oom_killed;
        let decision = after_exit(
            spec.restart_policy(),
            spec.restart.backoff.initial.get(),
            spec.restart.backoff.max.get(),
            self.status.failures,
            Ended {
                code: exit.code,
                ran_for,
            },
        );
        let reason = match (killed, oom, exit.code, decision) {
            (Some(_), _, _, _) => REASON_LIVENESS,
            (None, true, _, _) => "OOMKilled",
            (None, false, 0, AfterExit::Stay) => "Completed",
            (None, false, _, AfterExit::Stay) => "Error",
            (None, false, _, AfterExit::Restart { .. }) => "CrashLoopBackOff",
        };
        let message = match killed {
            Some(failure) => format!("liveness probe failed: {failure}"),
            None => exit.reason.clone().unwrap_or_default(),
        };
        self.status.apply(
            Event::Exit {
                code: exit.code,
                oom,
            },
            reason,
            &message,
            exit.finished_at,
        );
        if let AfterExit::Restart { delay, .. } = decision {
            let restarting = format!("restarting in {}s", delay.as_secs_f64());
            self.status.message = match killed {
                Some(_) => format!("{message}; {restarting}"),
                None => restarting,
            };
        }
        info!(instance = %self.id, code = exit.code, oom, ?decision, "container ended");
        self.report();
        let AfterExit::Restart { delay, failures } = decision else {
            return Next::Settled;
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            changed = rx.changed() => {
                if changed.is_err() {
                    return Next::End;
                }
                // Stopped or retired meanwhile: the loop looks again (a stopped instance is
                // not restarted).
                if rx.borrow().as_ref().is_none_or(|a| a.stop) {
                    return Next::Again;
                }
            }
        }
        // A new container for the next run, like Kubernetes (a fresh writable layer).
        if let Err(err) = self.env.runtime.delete(&self.id).await {
            debug!(instance = %self.id, %err, "removing the ended container");
        }
        self.env.net.detach(&self.id).await;
        self.status.ip.clear();
        release_rootfs(&self.env.images, &self.id).await;
        self.status.last_exit = Some(LastExit {
            code: exit.code,
            state: self.status.state,
            reason: reason.to_owned(),
            started_at,
            finished_at: Some(exit.finished_at),
        });
        self.status.restart_count += 1;
        self.env.metrics.add_restart(&self.status.workload);
        self.status.failures = failures;
        Next::Again
    }

    /// Stops the container (kept, so status and logs stay) for a `stop` assignment.
    async fn stop(&mut self, spec: Option<&Workload>) {
        let (signal, grace) = stop_params(spec);
        match self.env.runtime.state(&self.id).await {
            Ok(info) if !matches!(info.state, ContainerState::Stopped(_)) => {
                match self.env.runtime.stop(&self.id, &signal, grace).await {
                    Ok(exit) => {
                        self.status.apply(
                            Event::Exit {
                                code: exit.code,
                                oom: exit.oom_killed,
                            },
                            "Stopped",
                            "",
                            exit.finished_at,
                        );
                        self.report();
                    }
                    Err(err) => warn!(instance = %self.id, %err, "stopping the container failed"),
                }
            }
            _ => {
                if self.status.is_running() || self.status.state == State::Pending {
                    self.set(
                        Event::Exit {
                            code: 0,
                            oom: false,
                        },
                        "Stopped",
                        "",
                    );
                }
            }
        }
    }
}

/// The network namespace file of process `pid`.
fn netns_path(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Sets the loopback interface of process `pid`'s network namespace up, as Docker does for a
/// container with a namespace of its own. Runs on a thread that joins the namespace and is
/// thrown away (see [`crate::network::netns::run_in`]).
async fn loopback_up(pid: i32) -> Result<(), String> {
    let path = netns_path(pid);
    crate::network::netns::run_in(&path, crate::network::netns::set_loopback_up)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("rtnetlink: {e}"))
}

fn stop_params(spec: Option<&Workload>) -> (String, Duration) {
    match spec {
        Some(spec) => (spec.stop_signal.clone(), spec.stop_grace_period.get()),
        None => ("SIGTERM".to_owned(), Duration::from_secs(10)),
    }
}

/// Stops (signal, then SIGKILL after `grace`) and removes container `id` and its rootfs.
async fn remove(env: &Env, id: &str, signal: &str, grace: Duration) {
    match env.runtime.state(id).await {
        Ok(info) => {
            if !matches!(info.state, ContainerState::Stopped(_))
                && let Err(err) = env.runtime.stop(id, signal, grace).await
            {
                warn!(instance = %id, %err, "stopping the container failed");
            }
            // Before the container goes, so that a container gone means its network is too.
            env.net.detach(id).await;
            if let Err(err) = env.runtime.delete(id).await {
                warn!(instance = %id, %err, "removing the container failed");
            }
        }
        Err(RuntimeError::NotFound(_)) => {}
        Err(err) => warn!(instance = %id, %err, "reading the container failed"),
    }
    env.net.detach(id).await;
    release_rootfs(&env.images, id).await;
    status::remove(&env.status_dir, id);
    debug!(instance = %id, "container, rootfs and status removed");
}

/// Unmounts container `id`'s root filesystem and releases its hold on the image, off the async
/// threads (unmounting blocks); a failure is logged, not returned: callers are cleaning up.
pub async fn release_rootfs(images: &ImageStore, id: &str) {
    let store = images.clone();
    let owned = id.to_owned();
    let result = tokio::task::spawn_blocking(move || store.unmount_rootfs(&owned))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(err) = result {
        warn!(instance = %id, %err, "releasing the root filesystem failed");
    }
}
