//! The container runtime of a node: what a container is asked to be (`spec`), how that becomes an
//! OCI bundle (`oci`), the per-container shim process that creates and holds it (`shim`), and the
//! agent-side `Runtime` that drives shims through their state directories.

pub mod builtin;
pub mod cgroups;
pub mod exec;
pub mod oci;
pub mod proc;
pub mod seccomp;
pub mod seccomp_bpf;
pub mod shim;
pub mod spec;
pub mod state;
pub mod tty;
pub mod user;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use builtin::{BuiltinRuntime, RuntimeConfig, RuntimeError};
pub use cgroups::CgroupStats;
pub use exec::{ExecProcess, ExecStdin};
pub use spec::{ContainerSpec, ExecSpec};

/// How a container's main process ended, as recorded by its shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code the way Docker reports it: the process's code, or 128 + signal number.
    pub code: i32,
    /// The signal that ended the process, if a signal did.
    pub signal: Option<i32>,
    /// Whether the kernel's OOM killer killed a process of the container.
    pub oom_killed: bool,
    /// When the shim saw the process end.
    pub finished_at: SystemTime,
    /// Why the container ended when it was not a plain exit (for example the shim died).
    pub reason: Option<String>,
}

/// Where a container is in its life, as seen from its state directory and processes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Created: namespaces, cgroup and rootfs are set up, the process waits to be started.
    Created {
        /// Host PID of the container's init process.
        pid: i32,
    },
    /// The main process runs.
    Running {
        /// Host PID of the container's init process.
        pid: i32,
        /// When it was started.
        started_at: SystemTime,
    },
    /// The main process ended and the shim recorded how.
    Stopped(ExitStatus),
}

/// One container as the runtime knows it.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    /// Container id.
    pub id: String,
    /// The spec it was created from.
    pub spec: ContainerSpec,
    /// Its current state.
    pub state: ContainerState,
    /// Directory holding its log files.
    pub log_dir: PathBuf,
}

/// The result of a finished exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed by a signal, 127 when the command could not run).
    pub code: i32,
    /// Everything the process wrote to stdout (capped at `ExecSpec::output_limit`).
    pub stdout: Vec<u8>,
    /// Everything the process wrote to stderr (capped likewise).
    pub stderr: Vec<u8>,
}

/// What a node runtime does with containers. Implemented by [`BuiltinRuntime`], which runs each
/// container under its own shim (with libcontainer, or an OCI runtime binary such as runc).
pub trait Runtime: Send + Sync {
    /// Validates `spec` and creates the container without starting its process.
    fn create(
        &self,
        spec: ContainerSpec,
    ) -> impl Future<Output = Result<ContainerInfo, RuntimeError>> + Send;
    /// Starts the process of a created container.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Sends `signal` (a name like `SIGTERM` or a number) to the container's main process.
    fn kill(&self, id: &str, signal: &str)
    -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Sends the stop signal, waits up to `grace`, then SIGKILL; returns how it ended.
    fn stop(
        &self,
        id: &str,
        signal: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<ExitStatus, RuntimeError>> + Send;
    /// Waits until the container's main process has ended and its shim recorded the exit.
    fn wait(&self, id: &str) -> impl Future<Output = Result<ExitStatus, RuntimeError>> + Send;
    /// Removes a stopped container: its cgroup, runtime state and state directory.
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// The current state of one container.
    fn state(&self, id: &str) -> impl Future<Output = Result<ContainerInfo, RuntimeError>> + Send;
    /// Every container this runtime holds.
    fn list(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;
    /// Resource usage read from the container's cgroup.
    fn stats(&self, id: &str) -> impl Future<Output = Result<CgroupStats, RuntimeError>> + Send;
    /// Runs a new process in the running container's namespaces and cgroup and collects its
    /// output and exit code.
    fn exec(
        &self,
        id: &str,
        exec: ExecSpec,
    ) -> impl Future<Output = Result<ExecOutput, RuntimeError>> + Send;
}
