//! The agent side of the runtime: [`BuiltinRuntime`] prepares a container's state directory and
//! OCI bundle, starts one shim per container, and from then on drives it only through the state
//! directory, FIFOs, signals and pidfds — so a restarted agent re-adopts every container with
//! [`BuiltinRuntime::open`] and never starts a duplicate.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustix::event::{PollFd, PollFlags, poll};
use rustix::process::{Signal, WaitId, WaitIdOptions, pidfd_send_signal, waitid};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use super::cgroups::{self, CgroupError, CgroupStats, Layout};
use super::exec::ExecProcess;
use super::proc::ProcId;
use super::seccomp::{self, Profile};
use super::seccomp_bpf;
use super::spec::{self, ContainerSpec, ExecSpec, SpecErrors};
use super::state::{self, ContainerDir, ProcessRecord, RuntimeKind, ShimConfig};
use super::{ContainerInfo, ContainerState, ExecOutput, ExitStatus, Runtime, oci};
use crate::logs::LogConfig;

/// How long a start may take before the agent gives up waiting for the shim's answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the runtime.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// State root: container state directories live in `<root>/containers/<id>`.
    pub root: PathBuf,
    /// The agent binary, re-executed as `shim`.
    pub shim_binary: PathBuf,
    /// `Builtin` (libcontainer) or an OCI runtime binary.
    pub runtime: RuntimeKind,
    /// Where container cgroups go.
    pub cgroups: Layout,
    /// Log rotation.
    pub log: LogConfig,
    /// Seccomp profile in Docker's format; Gantry's default when `None`.
    pub seccomp_profile: Option<PathBuf>,
    /// The host's resolv.conf, copied (without loopback nameservers) into containers.
    pub host_resolv_conf: PathBuf,
    /// Where container logs go: `<log_root>/<id>/`, on disk, linked from the state directory
    /// as `logs`.
    pub log_root: PathBuf,
    /// Keep the container state directories (`<root>/containers`) on a tmpfs the runtime
    /// mounts there, as runc keeps its state in `/run`: they are small files written on every
    /// start and gone with the container, and a disk filesystem makes each of them cost.
    pub state_tmpfs: bool,
}

impl RuntimeConfig {
    /// Defaults for a runtime rooted at `root`: the builtin runtime, cgroups under a `gantry`
    /// child of this process's own cgroup, 10 MiB × 5 logs, the default seccomp profile.
    pub fn new(
        root: &Path,
        shim_binary: &Path,
        cgroup_parent: Option<&Path>,
    ) -> Result<RuntimeConfig, RuntimeError> {
        let proc_self =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|source| RuntimeError::Io {
                context: "reading /proc/self/cgroup".into(),
                source,
            })?;
        let cgroups =
            Layout::discover(Path::new(cgroups::DEFAULT_ROOT), &proc_self, cgroup_parent)?;
        Ok(RuntimeConfig {
            root: root.to_path_buf(),
            shim_binary: shim_binary.to_path_buf(),
            runtime: RuntimeKind::Builtin,
            cgroups,
            log: LogConfig::default(),
            seccomp_profile: None,
            host_resolv_conf: "/etc/resolv.conf".into(),
            log_root: root.join("logs"),
            state_tmpfs: false,
        })
    }
}

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec is invalid; nothing was created.
    #[error(transparent)]
    InvalidSpec(#[from] SpecErrors),
    /// A container with this id exists.
    #[error("container {0} already exists")]
    AlreadyExists(String),
    /// No container with this id.
    #[error("container {0} not found")]
    NotFound(String),
    /// The container is not in a state that allows the operation.
    #[error("container {id} is {state}: cannot {action}")]
    WrongState {
        /// Container id.
        id: String,
        /// Its state.
        state: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// Creating the container failed; nothing was left behind.
    #[error("container {id}: create failed: {reason}")]
    Create {
        /// Container id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Starting the container failed.
    #[error("container {id}: start failed: {reason}")]
    Start {
        /// Container id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Another agent holds this state root.
    #[error("another agent is using the runtime state in {0:?}")]
    Locked(PathBuf),
    /// A signal name or number that is not known.
    #[error("unknown signal {0:?}")]
    BadSignal(String),
    /// Cgroup access failed.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// Seccomp profile could not be loaded.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    /// The seccomp filter could not be compiled.
    #[error(transparent)]
    SeccompBpf(#[from] seccomp_bpf::BpfError),
    /// I/O on the state directory or with a shim failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl RuntimeError {
    /// The exit code Docker would report for this error: 127 when the program could not be
    /// found or run.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            RuntimeError::InvalidSpec(e) if e.is_exec_failure() => Some(127),
            _ => None,
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RuntimeError {
    let context = context.into();
    move |source| RuntimeError::Io { context, source }
}

/// What the agent keeps for a container between calls.
struct Tracked {
    dir: ContainerDir,
    spec: ContainerSpec,
    /// pidfd of the shim, if it is alive and verified.
    shim: Option<Arc<OwnedFd>>,
    /// pidfd of the container's init, if it was alive and verified when last looked at.
    init: Option<Arc<OwnedFd>>,
    record: Option<ProcessRecord>,
    /// Serialises start/stop/delete of one container.
    op: Arc<tokio::sync::Mutex<()>>,
}

/// The runtime: one shim per container, libcontainer or an OCI runtime binary inside it.
pub struct BuiltinRuntime {
    config: RuntimeConfig,
    /// Held for the runtime's life: one agent per state root.
    _lock: std::fs::File,
    profile: Profile,
    bpf: seccomp_bpf::Cache,
    containers: Mutex<HashMap<String, Arc<Tracked>>>,
}

/// Makes this process a child subreaper, so that a container whose shim died is reparented to
/// the agent, which can then reap it and learn its exit status.
pub fn become_subreaper() -> io::Result<()> {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
    Ok(())
}

impl BuiltinRuntime {
    /// Opens the runtime at `config.root`, re-adopting every container found there: their shims
    /// and init processes are identified by pidfd and start time, never by bare PID.
    pub fn open(config: RuntimeConfig) -> Result<BuiltinRuntime, RuntimeError> {
        let containers_dir = config.root.join("containers");
        std::fs::create_dir_all(&containers_dir)
            .map_err(io_err(format!("creating {containers_dir:?}")))?;
        let lock_path = config.root.join("runtime.lock");
        let lock =
            lock_file(&lock_path)?.ok_or_else(|| RuntimeError::Locked(config.root.clone()))?;
        if config.state_tmpfs {
            mount_state_tmpfs(&containers_dir)?;
        }
        let created = config.cgroups.prepare()?;
        record_created_cgroups(&config.root, &created)?;
        let profile = match &config.seccomp_profile {
            Some(p) => seccomp::load_profile(p)?,
            None => seccomp::default_profile()?,
        };
        let rt = BuiltinRuntime {
            config,
            _lock: lock,
            profile,
            bpf: seccomp_bpf::Cache::default(),
            containers: Mutex::new(HashMap::new()),
        };
        let entries = std::fs::read_dir(&containers_dir)
            .map_err(io_err(format!("reading {containers_dir:?}")))?;
        for entry in entries {
            let entry = entry.map_err(io_err(format!("reading {containers_dir:?}")))?;
            let dir = ContainerDir::from_path(entry.path());
            match rt.adopt(&dir) {
                Ok(Some(t)) => {
                    let id = t.spec.id.clone();
                    rt.lock().insert(id, Arc::new(t));
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(dir = ?dir.path(), %err, "skipping unreadable container state");
                }
            }
        }
        rt.remove_orphan_logs(&containers_dir);
        Ok(rt)
    }

    /// Removes the cgroup directories Gantry created for its parent (recorded when the runtime was
    /// opened), where no container is left in them: for `down` and for tests.
    pub fn release_cgroups(&self) -> Result<usize, RuntimeError> {
        let path = self.config.root.join(CREATED_CGROUPS);
        let dirs: Vec<PathBuf> = state::read_json(&path)
            .map_err(io_err(format!("reading {path:?}")))?
            .unwrap_or_default();
        let removed = cgroups::remove_created(&dirs);
        let left: Vec<PathBuf> = dirs.into_iter().filter(|d| d.exists()).collect();
        state::write_json(&path, &left).map_err(io_err(format!("writing {path:?}")))?;
        Ok(removed)
    }

    /// Removes the log directories of containers whose state directory is gone (a reboot
    /// empties the state tmpfs; the logs on disk would otherwise stay forever).
    fn remove_orphan_logs(&self, containers_dir: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.config.log_root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !containers_dir.join(&name).exists() {
                tracing::info!(dir = ?entry.path(), "removing the logs of a container that is gone");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Unmounts the state tmpfs (see [`RuntimeConfig::state_tmpfs`]) when the runtime holds no
    /// container: for `down` and for tests. Returns whether it unmounted.
    pub fn release_state_tmpfs(&self) -> Result<bool, RuntimeError> {
        let dir = self.config.root.join("containers");
        if !self.lock().is_empty() || !crate::sys::is_mount_point(&dir) {
            return Ok(false);
        }
        rustix::mount::unmount(&dir, rustix::mount::UnmountFlags::DETACH)
            .map_err(|e| io_err(format!("unmounting {dir:?}"))(e.into()))?;
        Ok(true)
    }

    /// The settings the runtime was opened with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Tracked>>> {
        // A poisoned map only means another thread panicked mid-insert; the map itself is fine.
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str) -> Result<Arc<Tracked>, RuntimeError> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(id.to_string()))
    }

    /// Rebuilds the agent's view of one state directory. A directory with no record and no
    /// live shim is a create that never finished: it is cleaned up.
    fn adopt(&self, dir: &ContainerDir) -> Result<Option<Tracked>, RuntimeError> {
        let spec: Option<ContainerSpec> =
            state::read_json(&dir.spec()).map_err(io_err(format!("reading {:?}", dir.spec())))?;
        let record: Option<ProcessRecord> = state::read_json(&dir.process())
            .map_err(io_err(format!("reading {:?}", dir.process())))?;
        let Some(spec) = spec else {
            if let Some(id) = dir.path().file_name().and_then(|n| n.to_str()) {
                let _ = remove_logs(&self.config.log_root, id);
            }
            let _ = std::fs::remove_dir_all(dir.path());
            return Ok(None);
        };
        let (shim, init) = match &record {
            Some(r) => (
                r.shim.open().ok().flatten().map(Arc::new),
                r.init.open().ok().flatten().map(Arc::new),
            ),
            None => (None, None),
        };
        if record.is_none() && !dir.exit().exists() {
            if lock_file(&dir.shim_lock())?.is_none() {
                // A shim holds the directory and is still creating: adopt what it reports.
                let record = wait_for_record(dir)?;
                let open =
                    |p: Option<ProcId>| p.and_then(|p| p.open().ok().flatten()).map(Arc::new);
                return Ok(Some(Tracked {
                    dir: dir.clone(),
                    spec,
                    shim: open(record.as_ref().map(|r| r.shim)),
                    init: open(record.as_ref().map(|r| r.init)),
                    record,
                    op: Arc::default(),
                }));
            }
            // Interrupted create: no shim holds the directory. Remove what it may have left.
            tracing::info!(id = %spec.id, "removing a container whose create never finished");
            self.run_shim_delete(dir);
            let _ = self.config.cgroups.remove(&spec.id);
            let _ = remove_logs(&self.config.log_root, &spec.id);
            let _ = std::fs::remove_dir_all(dir.path());
            return Ok(None);
        }
        Ok(Some(Tracked {
            dir: dir.clone(),
            spec,
            shim,
            init,
            record,
            op: Arc::default(),
        }))
    }

    fn run_shim_delete(&self, dir: &ContainerDir) {
        let status = std::process::Command::new(&self.config.shim_binary)
            .arg("shim")
            .arg("delete")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if let Err(err) = status {
            tracing::warn!(dir = ?dir.path(), %err, "running shim delete");
        }
    }

    fn info(&self, t: &Tracked) -> Result<ContainerInfo, RuntimeError> {
        Ok(ContainerInfo {
            id: t.spec.id.clone(),
            spec: t.spec.clone(),
            state: self.state_of(t)?,
            log_dir: t.dir.logs(),
        })
    }

    fn state_of(&self, t: &Tracked) -> Result<ContainerState, RuntimeError> {
        if let Some(exit) = read_exit(&t.dir)? {
            return Ok(ContainerState::Stopped(exit));
        }
        let record: Option<ProcessRecord> = state::read_json(&t.dir.process())
            .map_err(io_err(format!("reading {:?}", t.dir.process())))?;
        let Some(record) = record.or_else(|| t.record.clone()) else {
            return Ok(ContainerState::Created { pid: 0 });
        };
        let init_alive = t.init.as_ref().is_some_and(|fd| !has_exited(fd));
        let shim_alive = t.shim.as_ref().is_some_and(|fd| !has_exited(fd));
        if !init_alive && !shim_alive {
            // Between the shim's last write and its exit, or a shim that died: look once more
            // for its record before calling the container lost.
            if let Some(exit) = read_exit(&t.dir)? {
                return Ok(ContainerState::Stopped(exit));
            }
            return Ok(ContainerState::Stopped(lost_exit()));
        }
        Ok(match record.started_at {
            Some(started_at) => ContainerState::Running {
                pid: record.init.pid,
                started_at,
            },
            None => ContainerState::Created {
                pid: record.init.pid,
            },
        })
    }

    async fn create_inner(&self, spec: ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        let cgroups = self.config.cgroups.clone();
        // Fire and forget: see `Layout::warm_migration`. Failing only costs speed.
        tokio::task::spawn_blocking(move || {
            if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") {
                let _ = cgroups.warm_migration(&text);
            }
        });
        let validated = spec::validate(&spec)?;
        let id = spec.id.clone();
        let dir = ContainerDir::new(&self.config.root, &id);
        if self.lock().contains_key(&id) {
            return Err(RuntimeError::AlreadyExists(id));
        }
        match std::fs::create_dir(dir.path()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(id));
            }
            Err(e) => return Err(io_err(format!("creating {:?}", dir.path()))(e)),
        }
        match self.prepare_and_spawn(&spec, &validated, &dir).await {
            Ok(t) => {
                let info = self.info(&t)?;
                self.lock().insert(id, Arc::new(t));
                Ok(info)
            }
            Err(err) => {
                // A failed create leaves nothing: the shim removed its runtime state; the cgroup
                // and the state directory go here.
                let _ = self.config.cgroups.remove(&id);
                let _ = remove_logs(&self.config.log_root, &id);
                let _ = std::fs::remove_dir_all(dir.path());
                Err(err)
            }
        }
    }

    async fn prepare_and_spawn(
        &self,
        spec: &ContainerSpec,
        validated: &spec::Validated,
        dir: &ContainerDir,
    ) -> Result<Tracked, RuntimeError> {
        let id = &spec.id;
        // The builtin runtime installs a filter compiled once per capability set (see
        // `seccomp_bpf`); an OCI runtime binary gets the filter in config.json and compiles it.
        let filter = || {
            seccomp::oci_seccomp(
                &self.profile,
                &validated.capabilities,
                std::env::consts::ARCH,
            )
        };
        let seccomp = match (&self.config.runtime, spec.privileged) {
            (_, true) => None,
            (RuntimeKind::Builtin, false) => {
                let key = validated.capabilities.join(",");
                let program = self.bpf.get(&key, || Ok(filter()?))?;
                std::fs::write(dir.seccomp_bpf(), &*program)
                    .map_err(io_err("writing seccomp.bpf"))?;
                None
            }
            (RuntimeKind::Oci(_), false) => Some(seccomp::spec_encoding(&filter()?)?),
        };
        let cgroups_path = self.config.cgroups.cgroups_path(id)?;
        let etc = dir.etc();
        let node = oci::NodeContext {
            cgroups_path: &cgroups_path,
            cgroup_version: self.config.cgroups.version(),
            etc_dir: &etc,
            seccomp,
            nofile_hard_max: rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .maximum
                .unwrap_or(u64::MAX),
        };
        let oci_spec = oci::build(spec, validated, &node).map_err(|e| RuntimeError::Create {
            id: id.clone(),
            reason: format!("building the OCI spec: {e}"),
        })?;
        let host_resolv =
            std::fs::read_to_string(&self.config.host_resolv_conf).unwrap_or_default();
        oci::write_etc_files(&etc, spec, &validated.hostname, &host_resolv)
            .map_err(io_err(format!("writing {etc:?}")))?;
        std::fs::create_dir_all(dir.bundle()).map_err(io_err("creating the bundle"))?;
        // One write, not serde_json's many small ones on an unbuffered file.
        state::write_json(&dir.bundle().join("config.json"), &oci_spec)
            .map_err(io_err("writing config.json"))?;
        let shim_config = ShimConfig {
            id: id.clone(),
            runtime: self.config.runtime.clone(),
            log: self.config.log.clone(),
            cgroups: self.config.cgroups.clone(),
        };
        state::write_json(&dir.shim_config(), &shim_config).map_err(io_err("writing shim.json"))?;
        for fifo in [dir.start_fifo(), dir.started_fifo()] {
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &fifo,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o600),
                0,
            )
            .map_err(|e| io_err(format!("creating {fifo:?}"))(e.into()))?;
        }
        // spec.json last: its presence marks a directory worth adopting.
        state::write_json(&dir.spec(), spec).map_err(io_err("writing spec.json"))?;

        // The logs stay on disk, outside a state directory that may be a tmpfs.
        let logs = self.config.log_root.join(id);
        std::fs::create_dir_all(&logs).map_err(io_err("creating the log directory"))?;
        std::os::unix::fs::symlink(&logs, dir.logs()).map_err(io_err("linking the logs"))?;
        let shim_log =
            std::fs::File::create(dir.shim_log()).map_err(io_err("creating shim.log"))?;
        // The shim's stdin is its lock: an flock taken here and inherited, held for the shim's
        // whole life, tells a later agent that a shim still owns the directory.
        let lock =
            lock_file(&dir.shim_lock())?.ok_or_else(|| RuntimeError::AlreadyExists(id.clone()))?;
        let mut child = tokio::process::Command::new(&self.config.shim_binary)
            .arg("shim")
            .arg("run")
            .arg(dir.path())
            .stdin(lock)
            .stdout(Stdio::piped())
            .stderr(shim_log)
            .spawn()
            .map_err(io_err(format!(
                "starting shim {:?}",
                self.config.shim_binary
            )))?;
        let stdout = child.stdout.take().ok_or_else(|| RuntimeError::Create {
            id: id.clone(),
            reason: "shim has no stdout".into(),
        })?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .map_err(io_err("reading the shim's answer"))?;
        let line = line.trim();
        if let Some(reason) = line.strip_prefix("error: ") {
            let _ = child.wait().await;
            return Err(RuntimeError::Create {
                id: id.clone(),
                reason: reason.to_string(),
            });
        }
        if !line.starts_with("ok ") {
            let _ = child.wait().await;
            let log = std::fs::read_to_string(dir.shim_log()).unwrap_or_default();
            return Err(RuntimeError::Create {
                id: id.clone(),
                reason: format!("shim exited without answering: {}", log.trim()),
            });
        }
        // The shim lives on; tokio reaps it when it exits.
        drop(child);
        let record: ProcessRecord = state::read_json(&dir.process())
            .map_err(io_err("reading process.json"))?
            .ok_or_else(|| RuntimeError::Create {
                id: id.clone(),
                reason: "shim answered but wrote no process.json".into(),
            })?;
        Ok(Tracked {
            dir: dir.clone(),
            spec: spec.clone(),
            shim: record.shim.open().ok().flatten().map(Arc::new),
            init: record.init.open().ok().flatten().map(Arc::new),
            record: Some(record),
            op: Arc::default(),
        })
    }

    async fn start_inner(&self, id: &str) -> Result<(), RuntimeError> {
        let t = self.get(id)?;
        let _op = t.op.lock().await;
        match self.state_of(&t)? {
            ContainerState::Created { .. } => {}
            other => {
                return Err(RuntimeError::WrongState {
                    id: id.into(),
                    state: state_name(&other),
                    action: "start",
                });
            }
        }
        // Open our end of `started` read-write first, so the shim's non-blocking open for
        // writing finds a reader and our reads wait for data instead of seeing EOF.
        let mut answer = tokio::net::unix::pipe::OpenOptions::new()
            .read_write(true)
            .open_receiver(t.dir.started_fifo())
            .map_err(io_err("opening the started FIFO"))?;
        let mut start = tokio::net::unix::pipe::OpenOptions::new()
            .open_sender(t.dir.start_fifo())
            .map_err(io_err("opening the start FIFO"))?;
        start
            .write_all(b"s")
            .await
            .map_err(io_err("writing the start FIFO"))?;
        drop(start);
        let mut buf = Vec::with_capacity(128);
        {
            let read = async {
                loop {
                    let mut chunk = [0u8; 128];
                    let n = answer.read(&mut chunk).await?;
                    buf.extend_from_slice(&chunk[..n]);
                    if n == 0 || buf.contains(&b'\n') {
                        return Ok::<(), io::Error>(());
                    }
                }
            };
            tokio::pin!(read);
            let shim_gone = wait_exited(t.shim.clone());
            tokio::select! {
                biased;
                r = tokio::time::timeout(START_TIMEOUT, &mut read) => match r {
                    Ok(r) => r.map_err(io_err("reading the shim's start answer"))?,
                    Err(_) => return Err(RuntimeError::Start {
                        id: id.into(),
                        reason: format!("no answer from the shim within {START_TIMEOUT:?}"),
                    }),
                },
                () = shim_gone => {
                    // A container that ends at once lets its shim answer and exit at once: the
                    // answer may still be in the FIFO when the exit is noticed.
                    let late = tokio::time::timeout(LATE_ANSWER, &mut read).await;
                    if !matches!(late, Ok(Ok(()))) {
                        return Err(RuntimeError::Start {
                            id: id.into(),
                            reason: "the shim exited".into(),
                        });
                    }
                }
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim();
        match text.strip_prefix("error: ") {
            Some(reason) => Err(RuntimeError::Start {
                id: id.into(),
                reason: reason.to_string(),
            }),
            None if text == "ok" => Ok(()),
            None => Err(RuntimeError::Start {
                id: id.into(),
                reason: format!("unexpected answer from the shim: {text:?}"),
            }),
        }
    }

    fn kill_inner(&self, t: &Tracked, signal: Signal) -> Result<(), RuntimeError> {
        let id = &t.spec.id;
        let Some(init) = &t.init else {
            return Err(RuntimeError::WrongState {
                id: id.clone(),
                state: "stopped",
                action: "signal",
            });
        };
        match pidfd_send_signal(init.as_fd(), signal) {
            Ok(()) => Ok(()),
            // Exited but not reaped yet: the same as already stopped for the caller.
            Err(rustix::io::Errno::SRCH) => Err(RuntimeError::WrongState {
                id: id.clone(),
                state: "stopped",
                action: "signal",
            }),
            Err(e) => Err(io_err(format!("signalling container {id}"))(e.into())),
        }
    }

    async fn wait_inner(&self, t: &Tracked) -> Result<ExitStatus, RuntimeError> {
        loop {
            if let Some(exit) = read_exit(&t.dir)? {
                return Ok(exit);
            }
            match &t.shim {
                Some(shim) if !has_exited(shim) => {
                    wait_exited(Some(shim.clone())).await;
                    reap(shim);
                }
                _ => {
                    // No shim: it died without recording the exit. Wait for the init ourselves
                    // (as subreaper we may be its parent now), then record and clean up.
                    if let Some(exit) = read_exit(&t.dir)? {
                        return Ok(exit);
                    }
                    let mut exit = lost_exit();
                    if let Some(init) = &t.init {
                        wait_exited(Some(init.clone())).await;
                        if let Some((code, signal)) = reap(init) {
                            exit.code = code;
                            exit.signal = signal;
                        }
                    }
                    self.run_shim_delete(&t.dir);
                    state::write_json(&t.dir.exit(), &exit).map_err(io_err("writing exit.json"))?;
                    return Ok(exit);
                }
            }
        }
    }

    async fn delete_inner(&self, id: &str) -> Result<(), RuntimeError> {
        let t = self.get(id)?;
        let _op = t.op.lock().await;
        let state = self.state_of(&t)?;
        if !matches!(state, ContainerState::Stopped(_)) {
            return Err(RuntimeError::WrongState {
                id: id.into(),
                state: state_name(&state),
                action: "delete (stop it first)",
            });
        }
        if !t.dir.exit().exists() {
            // Lost shim: finish its cleanup.
            self.wait_inner(&t).await?;
        }
        if let Some(shim) = &t.shim {
            // The shim writes exit.json last and exits right after; reap it if it is ours.
            if tokio::time::timeout(Duration::from_secs(5), wait_exited(Some(shim.clone())))
                .await
                .is_ok()
            {
                reap(shim);
            }
        }
        self.config.cgroups.remove(id)?;
        remove_logs(&self.config.log_root, id)?;
        std::fs::remove_dir_all(t.dir.path())
            .map_err(io_err(format!("removing {:?}", t.dir.path())))?;
        self.lock().remove(id);
        Ok(())
    }

    async fn exec_inner(&self, id: &str, exec: ExecSpec) -> Result<ExecOutput, RuntimeError> {
        let limit = exec.output_limit;
        let mut process = self.spawn_exec(id, exec).await?;
        let out = process.take_stdout();
        let err = process.take_stderr();
        let (stdout, stderr, code) = tokio::join!(
            read_capped(out, limit),
            read_capped(err, limit),
            process.wait()
        );
        Ok(ExecOutput {
            code: code?,
            stdout: stdout.map_err(io_err("reading exec stdout"))?,
            stderr: stderr.map_err(io_err("reading exec stderr"))?,
        })
    }

    /// Starts a process in the running container and returns at once with its streams: stdin
    /// when `exec.stdin` (else it reads /dev/null), stdout, and stderr unless `exec.tty`, which
    /// gives the process a pseudo-terminal as its controlling terminal and one output stream.
    /// [`ExecProcess::wait`] returns its exit code; [`ExecProcess::resize`] sets the terminal's size.
    ///
    /// The process runs under an exec helper (`gantry-agent shim exec`, single-threaded, since
    /// libcontainer must not run in the agent). With a TTY the helper receives the terminal's
    /// master from the runtime on a console socket in the state directory and proxies between
    /// its stdio and the master; window sizes reach it through a FIFO there (see
    /// [`super::tty`]).
    pub async fn spawn_exec(&self, id: &str, exec: ExecSpec) -> Result<ExecProcess, RuntimeError> {
        let t = self.get(id)?;
        let state = self.state_of(&t)?;
        if !matches!(state, ContainerState::Running { .. }) {
            return Err(RuntimeError::WrongState {
                id: id.into(),
                state: state_name(&state),
                action: "exec",
            });
        }
        let json = serde_json::to_string(&exec).map_err(|e| io_err("encoding exec")(e.into()))?;
        let mut cmd = tokio::process::Command::new(&self.config.shim_binary);
        cmd.arg("shim").arg("exec").arg(t.dir.path()).arg(json);
        let resize = if exec.tty {
            let name = next_exec_name();
            let fifo = make_resize_fifo(&t.dir, &name)?;
            cmd.arg(&name);
            Some(fifo)
        } else {
            None
        };
        cmd.stdin(if exec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        // With a TTY the helper sends its own errors to stdout, the one output stream.
        .stderr(if exec.tty {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .kill_on_drop(true);
        match cmd.spawn() {
            Ok(child) => Ok(ExecProcess::new(child, exec.tty, resize)),
            Err(e) => {
                if let Some((path, _)) = &resize {
                    let _ = std::fs::remove_file(path);
                }
                Err(io_err("starting the exec helper")(e))
            }
        }
    }
}

/// A name for the per-exec files of a TTY exec in a state directory, unique while this agent
/// runs (and the pid keeps it apart from what an earlier agent may have left).
fn next_exec_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("exec-{}-{n}", std::process::id())
}

/// Makes the resize FIFO `<name>.resize` of a TTY exec (0600) and opens it read-write: the open
/// neither waits for the helper nor fails before it has opened its end, and writes never see a
/// missing reader.
fn make_resize_fifo(
    dir: &ContainerDir,
    name: &str,
) -> Result<(PathBuf, std::fs::File), RuntimeError> {
    let path = dir.path().join(format!("{name}.resize"));
    let mknod = || {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
    };
    match mknod() {
        Err(rustix::io::Errno::EXIST) => {
            // Left by a helper of an earlier agent with our pid: not ours to keep.
            let _ = std::fs::remove_file(&path);
            mknod()
        }
        other => other,
    }
    .map_err(|e| io_err(format!("creating {path:?}"))(e.into()))?;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&path);
    match opened {
        Ok(file) => Ok((path, file)),
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(io_err(format!("opening {path:?}"))(e))
        }
    }
}

impl Runtime for BuiltinRuntime {
    async fn create(&self, spec: ContainerSpec) -> Result<ContainerInfo, RuntimeError> {
        self.create_inner(spec).await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.start_inner(id).await
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let t = self.get(id)?;
        self.kill_inner(&t, parse_signal(signal)?)
    }

    async fn stop(
        &self,
        id: &str,
        signal: &str,
        grace: Duration,
    ) -> Result<ExitStatus, RuntimeError> {
        let t = self.get(id)?;
        let sig = parse_signal(signal)?;
        let first = match self.state_of(&t)? {
            ContainerState::Stopped(exit) => return Ok(exit),
            // A created container's init waits inside the runtime and would ignore a catchable
            // signal as PID 1 of its namespace: there is nothing to stop gracefully.
            ContainerState::Created { .. } => Signal::KILL,
            ContainerState::Running { .. } => sig,
        };
        // Racing with its own exit is fine: a stopped container is what we want.
        let _ = self.kill_inner(&t, first);
        if first != Signal::KILL {
            if let Ok(r) = tokio::time::timeout(grace, self.wait_inner(&t)).await {
                return r;
            }
            let _ = self.kill_inner(&t, Signal::KILL);
        }
        self.wait_inner(&t).await
    }

    async fn wait(&self, id: &str) -> Result<ExitStatus, RuntimeError> {
        let t = self.get(id)?;
        self.wait_inner(&t).await
    }

    async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        self.delete_inner(id).await
    }

    async fn state(&self, id: &str) -> Result<ContainerInfo, RuntimeError> {
        let t = self.get(id)?;
        self.info(&t)
    }

    async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let all: Vec<Arc<Tracked>> = self.lock().values().cloned().collect();
        let mut out = all
            .iter()
            .map(|t| self.info(t))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn stats(&self, id: &str) -> Result<CgroupStats, RuntimeError> {
        self.get(id)?;
        Ok(self.config.cgroups.stats(id)?)
    }

    async fn exec(&self, id: &str, exec: ExecSpec) -> Result<ExecOutput, RuntimeError> {
        self.exec_inner(id, exec).await
    }
}

/// Mounts a tmpfs on the containers directory unless one is there. A directory that already
/// holds containers on disk (left by an agent that kept them there) stays as it is: mounting
/// over it would hide them.
fn mount_state_tmpfs(dir: &Path) -> Result<(), RuntimeError> {
    if crate::sys::is_mount_point(dir) {
        return Ok(());
    }
    let held = std::fs::read_dir(dir)
        .map_err(io_err(format!("reading {dir:?}")))?
        .next()
        .is_some();
    if held {
        tracing::warn!(
            ?dir,
            "container state stays on disk: containers are kept there"
        );
        return Ok(());
    }
    use rustix::mount::{MountFlags, mount};
    mount(
        "gantry-state",
        dir,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"mode=0700,size=512m",
    )
    .map_err(|e| io_err(format!("mounting a tmpfs on {dir:?}"))(e.into()))
}

/// Removes container `id`'s log directory; a missing one is not an error.
fn remove_logs(log_root: &Path, id: &str) -> Result<(), RuntimeError> {
    let dir = log_root.join(id);
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {dir:?}"))(e))
        }
        _ => Ok(()),
    }
}

/// Opens (creating) `path` and takes an exclusive flock on it without waiting; `None` when
/// another process holds it.
fn lock_file(path: &Path) -> Result<Option<std::fs::File>, RuntimeError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(format!("opening {path:?}")))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Some(file)),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
        Err(e) => Err(io_err(format!("locking {path:?}"))(e.into())),
    }
}

/// Waits (up to 30 s) for a shim that is still creating its container to write its record.
fn wait_for_record(dir: &ContainerDir) -> Result<Option<ProcessRecord>, RuntimeError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let record: Option<ProcessRecord> =
            state::read_json(&dir.process()).map_err(io_err("reading process.json"))?;
        if record.is_some() || dir.exit().exists() || lock_file(&dir.shim_lock())?.is_some() {
            return Ok(record);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(None)
}

/// File under the runtime root listing the cgroup directories Gantry created.
const CREATED_CGROUPS: &str = "cgroups-created.json";

/// Adds `created` to the list of cgroup directories Gantry created, kept under the root so that
/// a later teardown removes them even after restarts.
fn record_created_cgroups(root: &Path, created: &[PathBuf]) -> Result<(), RuntimeError> {
    if created.is_empty() {
        return Ok(());
    }
    let path = root.join(CREATED_CGROUPS);
    let mut dirs: Vec<PathBuf> = state::read_json(&path)
        .map_err(io_err(format!("reading {path:?}")))?
        .unwrap_or_default();
    for d in created {
        if !dirs.contains(d) {
            dirs.push(d.clone());
        }
    }
    state::write_json(&path, &dirs).map_err(io_err(format!("writing {path:?}")))
}

/// Parses `SIGTERM`, `TERM`, `term` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, RuntimeError> {
    let bad = || RuntimeError::BadSignal(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return Signal::from_named_raw(n).ok_or_else(bad);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let sig = match name {
        "HUP" => Signal::HUP,
        "INT" => Signal::INT,
        "QUIT" => Signal::QUIT,
        "KILL" => Signal::KILL,
        "USR1" => Signal::USR1,
        "USR2" => Signal::USR2,
        "TERM" => Signal::TERM,
        "ALRM" => Signal::ALARM,
        "CONT" => Signal::CONT,
        "STOP" => Signal::STOP,
        "WINCH" => Signal::WINCH,
        "PWR" => Signal::POWER,
        _ => return Err(bad()),
    };
    Ok(sig)
}

fn state_name(s: &ContainerState) -> &'static str {
    match s {
        ContainerState::Created { .. } => "created",
        ContainerState::Running { .. } => "running",
        ContainerState::Stopped(_) => "stopped",
    }
}

fn read_exit(dir: &ContainerDir) -> Result<Option<ExitStatus>, RuntimeError> {
    state::read_json(&dir.exit()).map_err(io_err(format!("reading {:?}", dir.exit())))
}

/// The exit recorded for a container whose shim died before recording one.
fn lost_exit() -> ExitStatus {
    ExitStatus {
        code: 255,
        signal: None,
        oom_killed: false,
        finished_at: SystemTime::now(),
        reason: Some("the shim exited without recording the container's exit".into()),
    }
}

/// Whether the process behind a pidfd has exited (a pidfd polls readable once it has).
fn has_exited(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    matches!(poll(&mut fds, Some(&rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 })), Ok(n) if n > 0)
}

/// Resolves when the process behind `fd` has exited; never when `fd` is `None`'s opposite…
/// with `None` (no process to watch) it resolves at once.
/// How long an answer from a shim that exited is still waited for (it is in the FIFO already
/// if it was written: this only covers the event reaching the reactor).
const LATE_ANSWER: Duration = Duration::from_millis(200);

async fn wait_exited(fd: Option<Arc<OwnedFd>>) {
    let Some(fd) = fd else { return };
    let dup = match rustix::io::fcntl_dupfd_cloexec(fd.as_fd(), 0) {
        Ok(d) => d,
        Err(_) => return,
    };
    match crate::sys::async_readable(dup) {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            // Not pollable through the reactor: fall back to polling.
            while !has_exited(&fd) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Reaps the process behind `fd` if it is our child and has exited; returns its exit code the
/// way Docker reports it, and the signal.
fn reap(fd: &OwnedFd) -> Option<(i32, Option<i32>)> {
    match waitid(
        WaitId::PidFd(fd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    ) {
        Ok(Some(st)) => match st.terminating_signal() {
            Some(sig) => Some((128 + sig, Some(sig))),
            None => st.exit_status().map(|c| (c, None)),
        },
        _ => None,
    }
}

async fn read_capped(
    r: Option<impl tokio::io::AsyncRead + Unpin>,
    limit: usize,
) -> io::Result<Vec<u8>> {
    let Some(mut r) = r else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        let room = limit.saturating_sub(out.len());
        out.extend_from_slice(&buf[..n.min(room)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM").unwrap(), Signal::TERM);
        assert_eq!(parse_signal("term").unwrap(), Signal::TERM);
        assert_eq!(parse_signal("9").unwrap(), Signal::KILL);
        assert!(parse_signal("SIGNOPE").is_err());
        assert!(parse_signal("0").is_err());
    }
}
