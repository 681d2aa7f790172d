//! A container's state directory: the files through which the agent and the container's shim
//! talk (written atomically, so a reader never sees half a record), and their formats.
//!
//! ```text
//! <root>/containers/<id>/
//!   spec.json      the ContainerSpec (agent)
//!   shim.json      how the shim must run the container (agent)
//!   bundle/        the OCI bundle: config.json (agent)
//!   etc/           hostname, hosts, resolv.conf bind-mounted into the container (agent)
//!   seccomp.bpf    the compiled seccomp filter, for the builtin runtime (agent)
//!   process.json   shim and init identities, creation and start times (shim)
//!   start          FIFO: a byte written here starts the container (agent → shim)
//!   started        FIFO: the shim's answer to a start (shim → agent)
//!   exit.json      how the main process ended; written last, after cleanup (shim)
//!   logs/          container.log and its rotations (shim)
//!   oci/           the private state root of libcontainer or the OCI runtime binary
//!   shim.log       the shim's own diagnostics
//!   shim.lock      flocked by the shim for its whole life (an agent can tell a shim holds it)
//!   exec-<pid>-<n>.{resize,sock,json,pid}
//!                  per-exec files of an exec with a TTY, while it starts (see `tty`)
//! ```

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::cgroups::Layout;
use super::proc::ProcId;
use crate::logs::LogConfig;

/// Paths of one container's state directory.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    dir: PathBuf,
}

impl ContainerDir {
    /// The state directory of container `id` under the runtime root.
    pub fn new(root: &Path, id: &str) -> ContainerDir {
        ContainerDir {
            dir: root.join("containers").join(id),
        }
    }

    /// Wraps an existing state directory.
    pub fn from_path(dir: PathBuf) -> ContainerDir {
        ContainerDir { dir }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.dir
    }
    /// `spec.json`.
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    /// `shim.json`.
    pub fn shim_config(&self) -> PathBuf {
        self.dir.join("shim.json")
    }
    /// `bundle/`.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    /// `etc/`.
    pub fn etc(&self) -> PathBuf {
        self.dir.join("etc")
    }
    /// `process.json`.
    pub fn process(&self) -> PathBuf {
        self.dir.join("process.json")
    }
    /// `start` FIFO.
    pub fn start_fifo(&self) -> PathBuf {
        self.dir.join("start")
    }
    /// `started` FIFO.
    pub fn started_fifo(&self) -> PathBuf {
        self.dir.join("started")
    }
    /// `exit.json`.
    pub fn exit(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    /// `logs/`.
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    /// `oci/`.
    pub fn oci_root(&self) -> PathBuf {
        self.dir.join("oci")
    }
    /// `seccomp.bpf`: the compiled filter the builtin runtime installs in the container.
    pub fn seccomp_bpf(&self) -> PathBuf {
        self.dir.join("seccomp.bpf")
    }
    /// `shim.lock`: flocked by the shim (as its stdin) for its whole life.
    pub fn shim_lock(&self) -> PathBuf {
        self.dir.join("shim.lock")
    }
    /// `shim.log`.
    pub fn shim_log(&self) -> PathBuf {
        self.dir.join("shim.log")
    }
}

/// Which runtime creates the container inside the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RuntimeKind {
    /// youki's libcontainer, in the shim's own process.
    Builtin,
    /// An OCI runtime binary (runc, crun, youki) driven with the same bundle.
    Oci(PathBuf),
}

/// What the agent tells a shim, in `shim.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShimConfig {
    /// Container id.
    pub id: String,
    /// Runtime to create the container with.
    pub runtime: RuntimeKind,
    /// Log rotation settings.
    pub log: LogConfig,
    /// Where the container's cgroup is, to read its OOM kill count.
    pub cgroups: Layout,
}

/// What the shim records once the container exists, in `process.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRecord {
    /// The shim process.
    pub shim: ProcId,
    /// The container's init process.
    pub init: ProcId,
    /// When the container was created.
    pub created_at: SystemTime,
    /// When it was started, once it was.
    pub started_at: Option<SystemTime>,
}

/// Writes `value` as JSON to `path` atomically: one write to a temporary file in the same
/// directory, renamed over the target.
///
/// No fsync: these records only have to survive the crash of a process (agent or shim), which
/// the page cache does. After a machine crash every container is gone anyway, and the agent
/// rebuilds from the scheduler's assignments; an fsync per record would cost milliseconds on
/// every create, start and exit.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Reads a JSON record; `Ok(None)` when the file does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> io::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{path:?}: {e}"))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        assert_eq!(read_json::<ProcId>(&p).unwrap(), None);
        let v = ProcId {
            pid: 7,
            start_time: 9,
        };
        write_json(&p, &v).unwrap();
        assert_eq!(read_json::<ProcId>(&p).unwrap(), Some(v));
        assert!(!p.with_extension("json.tmp").exists());
        std::fs::write(&p, "{").unwrap();
        assert!(read_json::<ProcId>(&p).is_err());
    }
}
