//! One worker task per assigned instance: it owns that instance's container on this node —
//! pull, create, start, wait, restart with backoff, stop, remove — and reports every status
//! transition. The reconciler starts, updates and retires workers; a worker adopts a
//! container that already exists (an agent restart) instead of creating another.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gantry::workload::{Network, Workload};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::reconcile::{AfterExit, Assigned, Ended, after_exit};
use super::status::{self, Event, LastExit, State, Status};
use crate::image::{ImageRef, ImageStore, ProgressSink, PullDecision, PullOptions, PullPolicy};
use crate::runtime::spec::{NetworkMode, ProcessSpec, Resources};
use crate::runtime::{
    BuiltinRuntime, ContainerSpec, ContainerState, ExitStatus, Runtime, RuntimeError,
};

/// Label naming the instance a container runs.
pub const LABEL_INSTANCE: &str = "gantry.instance";
/// Label naming the workload of the instance.
pub const LABEL_WORKLOAD: &str = "gantry.workload";
/// Label with the generation the container runs.
pub const LABEL_GENERATION: &str = "gantry.generation";

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
    loop {
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
        // Wait for the process to end, or for the assignment to change.
        let exit = tokio::select! {
            exit = w.env.runtime.wait(&w.id) => exit,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        match exit {
            Ok(exit) => match w.exited(&spec, exit, &mut rx).await {
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
        if let Err(err) = status::save(&self.env.status_dir, &self.status) {
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
        let images = self.env.images.clone();
        let id = self.id.clone();
        let rootfs = tokio::task::spawn_blocking(move || images.mount_rootfs(&image, &id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("preparing the root filesystem: {e}"))?;
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
            hostname: None,
            resources: Resources {
                cpu_millis: spec.resources.cpu.map(|c| c.millis()),
                memory_bytes: spec.resources.memory.map(|m| m.get()),
                pids: spec.resources.pids.map(i64::from),
                cpuset: None,
            },
            mounts: Vec::new(),
            // Bridge networking (CNI) is not wired into the agent yet: such instances get a
            // network namespace of their own with loopback only.
            network: match spec.network {
                Network::Host => NetworkMode::Host,
                Network::Bridge | Network::None => NetworkMode::None,
            },
            hosts: Default::default(),
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
        if let Err(err) = self.env.runtime.create(container).await {
            self.unmount().await;
            return Err(err.to_string());
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
                match self
                    .env
                    .images
                    .pull(&reference, &self.env.pull, ProgressSink::none())
                    .await
                {
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

    /// Handles the end of a run: restarts it after the backoff, or settles.
    async fn exited(
        &mut self,
        spec: &Workload,
        exit: ExitStatus,
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
        let reason = match (oom, exit.code, decision) {
            (true, _, _) => "OOMKilled",
            (false, 0, AfterExit::Stay) => "Completed",
            (false, _, AfterExit::Stay) => "Error",
            (false, _, AfterExit::Restart { .. }) => "CrashLoopBackOff",
        };
        self.status.apply(
            Event::Exit {
                code: exit.code,
                oom,
            },
            reason,
            &exit.reason.clone().unwrap_or_default(),
            exit.finished_at,
        );
        if let AfterExit::Restart { delay, .. } = decision {
            self.status.message = format!("restarting in {}s", delay.as_secs_f64());
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
        self.unmount().await;
        self.status.last_exit = Some(LastExit {
            code: exit.code,
            state: self.status.state,
            reason: reason.to_owned(),
            started_at,
            finished_at: Some(exit.finished_at),
        });
        self.status.restart_count += 1;
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

    async fn unmount(&self) {
        let images = self.env.images.clone();
        let id = self.id.clone();
        match tokio::task::spawn_blocking(move || images.unmount_rootfs(&id)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(instance = %self.id, %err, "releasing the root filesystem failed")
            }
            Err(err) => warn!(instance = %self.id, %err, "releasing the root filesystem failed"),
        }
    }
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
            if let Err(err) = env.runtime.delete(id).await {
                warn!(instance = %id, %err, "removing the container failed");
            }
        }
        Err(RuntimeError::NotFound(_)) => {}
        Err(err) => warn!(instance = %id, %err, "reading the container failed"),
    }
    let images = env.images.clone();
    let owned = id.to_owned();
    match tokio::task::spawn_blocking(move || images.unmount_rootfs(&owned)).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => warn!(instance = %id, %err, "releasing the root filesystem failed"),
        Err(err) => warn!(instance = %id, %err, "releasing the root filesystem failed"),
    }
    status::remove(&env.status_dir, id);
    debug!(instance = %id, "container, rootfs and status removed");
}
