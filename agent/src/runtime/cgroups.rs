//! Cgroupfs plumbing around libcontainer: where Gantry's cgroups live, stats, OOM kills and cleanup.
//!
//! libcontainer creates each container's cgroup itself from the OCI `cgroupsPath` and applies
//! the limits. This module does the rest: it works out the parent cgroup all containers go
//! under (`<agent's own cgroup>/gantry`), makes that parent usable, reads usage statistics,
//! reports OOM kills and removes cgroups left behind.
//!
//! Every entry point takes the cgroupfs root explicitly (normally [`DEFAULT_ROOT`]) so the
//! logic can be exercised against a fake tree in a temporary directory.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::thread;
use std::time::Duration;

/// Where cgroupfs is mounted on a normal host.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// Name of the parent cgroup created below the agent's own cgroup.
pub const PARENT_NAME: &str = "gantry";

/// Leaf (v2) that the agent's processes are moved into so that its own cgroup may delegate
/// controllers; cgroup v2 forbids processes in a cgroup that has controllers enabled for children.
const AGENT_LEAF: &str = "agent";

/// v2 controllers Gantry limits or reports on; anything else is left alone.
const V2_CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

/// v1 named hierarchies carry no controller, so container cgroups are not created in them.
const V1_NAMED_HIERARCHIES: [&str; 2] = ["systemd", "elogind"];

/// Exiting processes keep a cgroup busy for a short while after they are killed.
const RMDIR_ATTEMPTS: u32 = 50;
const RMDIR_BACKOFF: Duration = Duration::from_millis(10);

/// Bound on re-reading `cgroup.procs` while processes fork during the move to the agent leaf.
const MOVE_ROUNDS: usize = 10;

/// v1 reports "no limit" as PAGE_COUNTER_MAX in bytes (9223372036854771712 on 4 KiB pages),
/// which varies with the page size; anything this large can't be a real limit.
const V1_UNLIMITED: u64 = 1 << 62;

/// Linux errno for "no such process": a pid vanished between listing and moving it.
const ESRCH: i32 = 3;

/// Result type of this module.
pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Everything that can go wrong while dealing with cgroupfs.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A filesystem operation on a cgroupfs path failed.
    #[error("cgroup i/o failed at {}", path.display())]
    Io {
        /// File or directory the operation was on.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The root holds neither a cgroup v2 mount nor any v1 hierarchy.
    #[error("no cgroup v1 or v2 hierarchy found at {}", root.display())]
    NotCgroupfs {
        /// The root that was inspected.
        root: PathBuf,
    },
    /// A v1 controller the agent depends on is not mounted under the root.
    #[error("cgroup v1 controller {controller} is not mounted under {}", root.display())]
    ControllerNotMounted {
        /// Missing controller.
        controller: &'static str,
        /// The root that was inspected.
        root: PathBuf,
    },
    /// `/proc/self/cgroup` has no line for the hierarchy that defines the agent's cgroup.
    #[error("no {hierarchy} line in /proc/self/cgroup")]
    OwnCgroupMissing {
        /// Which line was looked for.
        hierarchy: &'static str,
    },
    /// A cgroup path (from `/proc/self/cgroup` or a configured parent) can't be used.
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath {
        /// The offending path.
        path: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// On v2 the parent must sit below the agent's own cgroup, the only subtree it may change.
    #[error("parent cgroup {} is not below the agent's own cgroup {}", parent.display(), own.display())]
    ParentOutsideOwn {
        /// Requested parent.
        parent: PathBuf,
        /// The agent's own cgroup.
        own: PathBuf,
    },
    /// The container id can't be used as a single cgroup directory name.
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId {
        /// The offending id.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The container has no cgroup.
    #[error("no cgroup for container {id} at {}", path.display())]
    NotFound {
        /// Container id.
        id: String,
        /// Directory that was expected.
        path: PathBuf,
    },
    /// A cgroupfs file holds something other than what the kernel documents.
    #[error("unexpected content in {}: {reason}", path.display())]
    Parse {
        /// File that was read.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// No ancestor has a cpuset to copy into a new v1 cgroup, so no task could ever join it.
    #[error("no ancestor of {} has {file} set", path.display())]
    CpusetUnset {
        /// Cgroup left without a value.
        path: PathBuf,
        /// `cpuset.cpus` or `cpuset.mems`.
        file: &'static str,
    },
    /// A cgroup still had processes after all removal attempts.
    #[error("cgroup {} still busy after {attempts} removal attempts", path.display())]
    Busy {
        /// Cgroup that could not be removed.
        path: PathBuf,
        /// How many times rmdir was tried.
        attempts: u32,
    },
}

fn io_error(path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup interface the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CgroupVersion {
    /// Legacy or hybrid: one hierarchy per controller (a `unified` v2 mount may exist beside them).
    V1,
    /// Unified hierarchy mounted at the root.
    V2,
}

/// Tells whether `root` is a cgroup v2 mount or a directory of v1 hierarchies.
pub fn detect(root: &Path) -> Result<CgroupVersion> {
    // Only the root itself counts: hybrid hosts have `unified/cgroup.controllers` too.
    let marker = root.join("cgroup.controllers");
    if marker.try_exists().map_err(|e| io_error(&marker, e))? {
        return Ok(CgroupVersion::V2);
    }
    if v1_hierarchies(root)?.is_empty() {
        return Err(CgroupError::NotCgroupfs {
            root: root.to_path_buf(),
        });
    }
    Ok(CgroupVersion::V1)
}

/// Finds the agent's own cgroup in the text of `/proc/self/cgroup`.
///
/// On v1 that is the memory controller's path, because libcontainer uses one path for all
/// controllers and memory accounting matters most; on v2 it is the `0::` line.
pub fn own_cgroup(proc_self_cgroup: &str, version: CgroupVersion) -> Result<PathBuf> {
    for line in proc_self_cgroup.lines() {
        // The path is last and may itself contain ':', so split at most twice.
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy_id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let wanted = match version {
            CgroupVersion::V1 => controllers.split(',').any(|c| c == "memory"),
            CgroupVersion::V2 => hierarchy_id == "0" && controllers.is_empty(),
        };
        if wanted {
            return normalize(Path::new(path));
        }
    }
    Err(CgroupError::OwnCgroupMissing {
        hierarchy: match version {
            CgroupVersion::V1 => "memory controller",
            CgroupVersion::V2 => "cgroup v2 (0::)",
        },
    })
}

/// Turns an absolute in-hierarchy path into a canonical form, refusing anything that could
/// escape the hierarchy when joined under a mount point.
fn normalize(path: &Path) -> Result<PathBuf> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: path.display().to_string(),
        reason,
    };
    let mut components = path.components();
    if components.next() != Some(Component::RootDir) {
        return Err(invalid("must be absolute"));
    }
    let mut out = PathBuf::from("/");
    for component in components {
        match component {
            Component::Normal(name) => out.push(name),
            Component::CurDir => {}
            // Seen when the agent sits outside its cgroup namespace root; such a path has no
            // location under our mount.
            Component::ParentDir => return Err(invalid("must not contain '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(invalid("malformed path")),
        }
    }
    Ok(out)
}

/// Joins an absolute in-hierarchy path under a mount directory (a plain `join` would replace it).
fn under(mount: &Path, path: &Path) -> PathBuf {
    mount.join(path.strip_prefix("/").unwrap_or(path))
}

/// Checks that `id` names exactly one directory directly below the parent.
fn validate_id(id: &str) -> Result<()> {
    let reason = if id.is_empty() {
        "must not be empty"
    } else if id == "." || id == ".." {
        "must not be '.' or '..'"
    } else if id.contains('/') {
        "must not contain '/'"
    } else if id.contains('\0') {
        "must not contain NUL"
    } else {
        return Ok(());
    };
    Err(CgroupError::InvalidId {
        id: id.to_owned(),
        reason,
    })
}

/// One mounted v1 hierarchy.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Hierarchy {
    /// Mount directory, e.g. `/sys/fs/cgroup/cpu,cpuacct`.
    dir: PathBuf,
    /// Controllers bound to it, taken from the directory name.
    controllers: Vec<String>,
}

impl Hierarchy {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// Lists the v1 hierarchies under `root` that container cgroups are created in.
fn v1_hierarchies(root: &Path) -> Result<Vec<Hierarchy>> {
    let entries = fs::read_dir(root).map_err(|e| io_error(root, e))?;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(root, e))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| io_error(&path, e))?;
        // `cpu` and `cpuacct` are often symlinks to `cpu,cpuacct`, which is listed itself.
        if !file_type.is_dir() {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name == "unified"
            || name.starts_with("name=")
            || V1_NAMED_HIERARCHIES.contains(&name.as_str())
        {
            continue;
        }
        // Only hierarchy roots have cgroup.procs; anything else living here is not ours.
        let procs = path.join("cgroup.procs");
        if !procs.try_exists().map_err(|e| io_error(&procs, e))? {
            continue;
        }
        // The same hierarchy may be mounted twice; acting on it twice would only collide.
        let meta = fs::metadata(&path).map_err(|e| io_error(&path, e))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        out.push(Hierarchy {
            controllers: name.split(',').map(str::to_owned).collect(),
            dir: path,
        });
    }
    // read_dir order is arbitrary; a stable order keeps container_dirs predictable.
    out.sort_by(|a, b| a.dir.cmp(&b.dir));
    Ok(out)
}

/// Resource usage of one container cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CgroupStats {
    /// Total CPU time consumed, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Number of CFS periods in which the cgroup was throttled.
    pub cpu_throttled_periods: u64,
    /// Total time spent throttled, in nanoseconds.
    pub cpu_throttled_ns: u64,
    /// Memory charged to the cgroup, page cache included, in bytes.
    pub memory_usage: u64,
    /// Usage minus inactive file cache, as cAdvisor and the kubelet compute it, in bytes.
    pub memory_working_set: u64,
    /// Memory limit in bytes; `None` when unlimited.
    pub memory_limit: Option<u64>,
    /// Highest usage seen, in bytes; `None` when the kernel doesn't track it.
    pub memory_max_usage: Option<u64>,
    /// Number of tasks currently in the cgroup.
    pub pids_current: u64,
    /// Task limit; `None` when unlimited.
    pub pids_limit: Option<u64>,
    /// Number of processes killed by the OOM killer in this cgroup.
    pub oom_kills: u64,
}

/// Where Gantry's container cgroups live on this host.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    root: PathBuf,
    version: CgroupVersion,
    own: PathBuf,
    parent: PathBuf,
    /// v1 only: hierarchies container cgroups are created in, found once at discovery.
    hierarchies: Vec<Hierarchy>,
}

impl Layout {
    /// Works out the layout from the cgroupfs root and the text of `/proc/self/cgroup`.
    ///
    /// The parent defaults to `<own cgroup>/gantry`; `parent_override` is an absolute
    /// in-hierarchy path. On v2 it must lie below the agent's own cgroup.
    pub fn discover(
        root: &Path,
        proc_self_cgroup: &str,
        parent_override: Option<&Path>,
    ) -> Result<Layout> {
        let version = detect(root)?;
        let own = own_cgroup(proc_self_cgroup, version)?;
        let parent = match parent_override {
            Some(path) => normalize(path)?,
            None => own.join(PARENT_NAME),
        };
        let invalid = |reason| CgroupError::InvalidPath {
            path: parent.display().to_string(),
            reason,
        };
        // list() and remove() treat every child of the parent as a container, so the parent
        // must be a cgroup of its own.
        if parent == Path::new("/") {
            return Err(invalid("the parent must not be the root cgroup"));
        }
        if parent == own {
            return Err(invalid("the parent must not be the agent's own cgroup"));
        }
        let hierarchies = match version {
            CgroupVersion::V1 => {
                let hierarchies = v1_hierarchies(root)?;
                if !hierarchies.iter().any(|h| h.has("memory")) {
                    return Err(CgroupError::ControllerNotMounted {
                        controller: "memory",
                        root: root.to_path_buf(),
                    });
                }
                hierarchies
            }
            CgroupVersion::V2 => {
                if !parent.starts_with(&own) {
                    return Err(CgroupError::ParentOutsideOwn { parent, own });
                }
                if parent.starts_with(own.join(AGENT_LEAF)) {
                    return Err(invalid(
                        "the parent must not be inside the agent's leaf cgroup",
                    ));
                }
                Vec::new()
            }
        };
        Ok(Layout {
            root: root.to_path_buf(),
            version,
            own,
            parent,
            hierarchies,
        })
    }

    /// The cgroupfs root this layout was discovered under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup interface in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The agent's own cgroup, absolute within the hierarchy.
    pub fn own(&self) -> &Path {
        &self.own
    }

    /// The parent of all container cgroups, absolute within the hierarchy.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// The value for the OCI `cgroupsPath` of container `id`: `<parent>/<id>`.
    pub fn cgroups_path(&self, id: &str) -> Result<PathBuf> {
        validate_id(id)?;
        Ok(self.parent.join(id))
    }

    /// Directories of container `id`'s cgroup: one per v1 controller hierarchy, or one on v2.
    pub fn container_dirs(&self, id: &str) -> Result<Vec<PathBuf>> {
        validate_id(id)?;
        Ok(self
            .parent_dirs()
            .into_iter()
            .map(|dir| dir.join(id))
            .collect())
    }

    fn parent_dirs(&self) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V1 => self
                .hierarchies
                .iter()
                .map(|h| under(&h.dir, &self.parent))
                .collect(),
            CgroupVersion::V2 => vec![under(&self.root, &self.parent)],
        }
    }

    /// Makes the parent ready for container cgroups; safe to call repeatedly.
    ///
    /// On v1 the parent is created in every hierarchy and, in cpuset, given the CPUs and
    /// memory nodes of its nearest configured ancestor. On v2 the agent's processes are moved
    /// into a leaf `<own>/agent` (as systemd-nspawn and kind do), the parent is created and the
    /// controllers Gantry uses are enabled from the agent's own cgroup down to the parent.
    ///
    /// Returns the directories it created, parents first, so that whoever tears Gantry down can
    /// remove exactly those with [`remove_created`] and nothing that existed before.
    pub fn prepare(&self) -> Result<Vec<PathBuf>> {
        match self.version {
            CgroupVersion::V1 => self.prepare_v1(),
            CgroupVersion::V2 => self.prepare_v2(),
        }
    }

    fn prepare_v1(&self) -> Result<Vec<PathBuf>> {
        let mut created = Vec::new();
        let relative = self.parent.strip_prefix("/").unwrap_or(&self.parent);
        for hierarchy in &self.hierarchies {
            let cpuset = hierarchy.has("cpuset");
            let mut dir = hierarchy.dir.clone();
            for component in relative.components() {
                dir.push(component);
                if create_dir_if_missing(&dir)? {
                    created.push(dir.clone());
                }
                if cpuset {
                    fill_cpuset(&hierarchy.dir, &dir)?;
                }
            }
        }
        Ok(created)
    }

    fn prepare_v2(&self) -> Result<Vec<PathBuf>> {
        let mut created = Vec::new();
        let own_dir = under(&self.root, &self.own);
        // The root cgroup is exempt from the no-internal-processes rule, and moving every
        // process on the host into a leaf is not ours to do.
        if self.own != Path::new("/") {
            move_procs_to_leaf(&own_dir)?;
        }
        let controllers_file = own_dir.join("cgroup.controllers");
        let available =
            fs::read_to_string(&controllers_file).map_err(|e| io_error(&controllers_file, e))?;
        let available: HashSet<&str> = available.split_whitespace().collect();
        let wanted: Vec<&str> = V2_CONTROLLERS
            .into_iter()
            .filter(|c| available.contains(c))
            .collect();

        let Ok(relative) = self.parent.strip_prefix(&self.own) else {
            return Err(CgroupError::ParentOutsideOwn {
                parent: self.parent.clone(),
                own: self.own.clone(),
            });
        };
        // A cgroup only gets a controller its parent delegates, so every level from own down
        // to the parent delegates; the parent delegates to the containers.
        let mut dir = own_dir;
        enable_controllers(&dir, &wanted)?;
        for component in relative.components() {
            dir.push(component);
            if create_dir_if_missing(&dir)? {
                created.push(dir.clone());
            }
            enable_controllers(&dir, &wanted)?;
        }
        Ok(created)
    }

    /// Writes this process into the cgroup it is already in (a no-op migration), to start the
    /// RCU grace period that the kernel's first cgroup migration after a quiet spell waits for
    /// (`cgroup_threadgroup_rwsem`, ~16 ms on a 2-CPU machine). Called as a container create
    /// begins, the wait overlaps the agent's and the shim's own work, and the container's
    /// migration a few milliseconds later finds the lock warm.
    pub fn warm_migration(&self, proc_self_cgroup: &str) -> Result<()> {
        let own = own_cgroup(proc_self_cgroup, self.version)?;
        let mount = match self.version {
            CgroupVersion::V2 => self.root.clone(),
            CgroupVersion::V1 => self
                .hierarchies
                .iter()
                .find(|h| h.has("memory"))
                .map(|h| h.dir.clone())
                .ok_or(CgroupError::ControllerNotMounted {
                    controller: "memory",
                    root: self.root.clone(),
                })?,
        };
        let procs = under(&mount, &own).join("cgroup.procs");
        // "0" is the writing process itself, on v1 and v2.
        fs::write(&procs, "0").map_err(|e| io_error(&procs, e))
    }

    /// Reads the resource usage of container `id`.
    ///
    /// Files the kernel doesn't provide read as zero or `None`; a missing cgroup is
    /// [`CgroupError::NotFound`].
    pub fn stats(&self, id: &str) -> Result<CgroupStats> {
        validate_id(id)?;
        match self.version {
            CgroupVersion::V1 => self.stats_v1(id),
            CgroupVersion::V2 => self.stats_v2(id),
        }
    }

    fn stats_v1(&self, id: &str) -> Result<CgroupStats> {
        let memory = self.v1_memory_dir(id)?;
        require_dir(id, &memory)?;
        let mut stats = CgroupStats::default();
        if let Some(dir) = self.v1_container_dir("cpuacct", id) {
            stats.cpu_usage_ns = read_u64(&dir.join("cpuacct.usage"))?.unwrap_or(0);
        }
        if let Some(dir) = self.v1_container_dir("cpu", id) {
            let cpu_stat = dir.join("cpu.stat");
            stats.cpu_throttled_periods = read_key(&cpu_stat, "nr_throttled")?.unwrap_or(0);
            stats.cpu_throttled_ns = read_key(&cpu_stat, "throttled_time")?.unwrap_or(0);
        }
        stats.memory_usage = read_u64(&memory.join("memory.usage_in_bytes"))?.unwrap_or(0);
        // total_* includes descendants, which is what a container's usage means.
        let inactive_file =
            read_key(&memory.join("memory.stat"), "total_inactive_file")?.unwrap_or(0);
        stats.memory_working_set = stats.memory_usage.saturating_sub(inactive_file);
        stats.memory_limit =
            read_u64(&memory.join("memory.limit_in_bytes"))?.filter(|&limit| limit < V1_UNLIMITED);
        stats.memory_max_usage = read_u64(&memory.join("memory.max_usage_in_bytes"))?;
        stats.oom_kills = read_key(&memory.join("memory.oom_control"), "oom_kill")?.unwrap_or(0);
        if let Some(dir) = self.v1_container_dir("pids", id) {
            stats.pids_current = read_u64(&dir.join("pids.current"))?.unwrap_or(0);
            stats.pids_limit = read_limit(&dir.join("pids.max"))?;
        }
        Ok(stats)
    }

    fn stats_v2(&self, id: &str) -> Result<CgroupStats> {
        let dir = under(&self.root, &self.parent).join(id);
        require_dir(id, &dir)?;
        let cpu_stat = dir.join("cpu.stat");
        let usage = read_u64(&dir.join("memory.current"))?.unwrap_or(0);
        let inactive_file = read_key(&dir.join("memory.stat"), "inactive_file")?.unwrap_or(0);
        Ok(CgroupStats {
            cpu_usage_ns: read_key(&cpu_stat, "usage_usec")?
                .unwrap_or(0)
                .saturating_mul(1000),
            cpu_throttled_periods: read_key(&cpu_stat, "nr_throttled")?.unwrap_or(0),
            cpu_throttled_ns: read_key(&cpu_stat, "throttled_usec")?
                .unwrap_or(0)
                .saturating_mul(1000),
            memory_usage: usage,
            memory_working_set: usage.saturating_sub(inactive_file),
            memory_limit: read_limit(&dir.join("memory.max"))?,
            // memory.peak only exists on kernels 5.19 and later.
            memory_max_usage: read_u64(&dir.join("memory.peak"))?,
            pids_current: read_u64(&dir.join("pids.current"))?.unwrap_or(0),
            pids_limit: read_limit(&dir.join("pids.max"))?,
            oom_kills: read_key(&dir.join("memory.events"), "oom_kill")?.unwrap_or(0),
        })
    }

    /// Number of OOM kills in container `id`, reading only the one file that reports it.
    pub fn oom_kills(&self, id: &str) -> Result<u64> {
        validate_id(id)?;
        let (dir, file) = match self.version {
            CgroupVersion::V1 => (self.v1_memory_dir(id)?, "memory.oom_control"),
            CgroupVersion::V2 => (under(&self.root, &self.parent).join(id), "memory.events"),
        };
        match read_key(&dir.join(file), "oom_kill")? {
            Some(count) => Ok(count),
            None => {
                // Tell "no such cgroup" apart from "kernel too old to count OOM kills".
                require_dir(id, &dir)?;
                Ok(0)
            }
        }
    }

    fn v1_container_dir(&self, controller: &str, id: &str) -> Option<PathBuf> {
        self.hierarchies
            .iter()
            .find(|h| h.has(controller))
            .map(|h| under(&h.dir, &self.parent).join(id))
    }

    fn v1_memory_dir(&self, id: &str) -> Result<PathBuf> {
        self.v1_container_dir("memory", id)
            .ok_or_else(|| CgroupError::ControllerNotMounted {
                controller: "memory",
                root: self.root.clone(),
            })
    }

    /// Removes container `id`'s cgroup, and any cgroups below it, in every hierarchy.
    ///
    /// A cgroup that is already gone is fine; one that is busy is retried for a while
    /// because its processes may still be exiting.
    pub fn remove(&self, id: &str) -> Result<()> {
        self.remove_with(id, &|dir: &Path| fs::remove_dir(dir))
    }

    /// `remove` with the rmdir step injectable: cgroupfs drops a cgroup's files along with the
    /// directory, which a plain filesystem (as in tests) does not.
    fn remove_with<F>(&self, id: &str, rmdir: &F) -> Result<()>
    where
        F: Fn(&Path) -> io::Result<()>,
    {
        let mut first_error = None;
        // Keep going after a failure so one stuck hierarchy doesn't leave the others behind.
        for dir in self.container_dirs(id)? {
            if let Err(error) = remove_tree(&dir, rmdir) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Ids of containers that have a cgroup under the parent in any hierarchy.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut ids = BTreeSet::new();
        for dir in self.parent_dirs() {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Not prepared yet, so nothing can have been created there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_error(&dir, e))?;
                let file_type = entry.file_type().map_err(|e| io_error(&entry.path(), e))?;
                if !file_type.is_dir() {
                    continue;
                }
                if let Some(name) = entry.file_name().to_str()
                    && validate_id(name).is_ok()
                {
                    ids.insert(name.to_owned());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }
}

/// Removes directories that [`Layout::prepare`] created, children first, as long as they are
/// empty of cgroups (a cgroup still holding containers or processes stays). Returns how many
/// were removed.
pub fn remove_created(dirs: &[PathBuf]) -> usize {
    dirs.iter()
        .rev()
        .filter(|dir| fs::remove_dir(dir).is_ok())
        .count()
}

/// Creates `dir` unless it exists; says whether it created it.
fn create_dir_if_missing(dir: &Path) -> Result<bool> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error(dir, e)),
    }
}

/// Gives a v1 cpuset cgroup the CPUs and memory nodes of its nearest configured ancestor if it
/// has none: the kernel refuses to attach tasks to a cpuset with an empty set. Dirs that are
/// already set are left alone; an empty cpuset holds no tasks, so filling it disturbs nobody.
fn fill_cpuset(hierarchy_root: &Path, dir: &Path) -> Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let target = dir.join(file);
        if !read_trimmed(&target)?.is_empty() {
            continue;
        }
        let mut value = None;
        let mut ancestor = dir.parent();
        while let Some(candidate) = ancestor {
            if !candidate.starts_with(hierarchy_root) {
                break;
            }
            let candidate_value = read_trimmed(&candidate.join(file))?;
            if !candidate_value.is_empty() {
                value = Some(candidate_value);
                break;
            }
            ancestor = candidate.parent();
        }
        let Some(value) = value else {
            return Err(CgroupError::CpusetUnset {
                path: dir.to_path_buf(),
                file,
            });
        };
        fs::write(&target, value).map_err(|e| io_error(&target, e))?;
    }
    Ok(())
}

/// Reads a file's trimmed content; an absent file reads as empty, i.e. unset.
fn read_trimmed(path: &Path) -> Result<String> {
    Ok(read_optional(path)?.unwrap_or_default().trim().to_owned())
}

/// Moves every process in `own_dir` into its `agent` leaf so `own_dir` may enable controllers.
fn move_procs_to_leaf(own_dir: &Path) -> Result<()> {
    let procs_file = own_dir.join("cgroup.procs");
    let leaf = own_dir.join(AGENT_LEAF);
    let leaf_procs = leaf.join("cgroup.procs");
    let mut moved = HashSet::new();
    // Processes may fork while we move them, so re-read until no unmoved pid shows up.
    for _ in 0..MOVE_ROUNDS {
        let pending: Vec<u32> = read_pids(&procs_file)?
            .into_iter()
            .filter(|pid| !moved.contains(pid))
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        create_dir_if_missing(&leaf)?;
        // Append rather than truncate so that every pid written is kept on a plain
        // filesystem as well; cgroupfs ignores the file position either way.
        let mut file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&leaf_procs)
            .map_err(|e| io_error(&leaf_procs, e))?;
        for pid in pending {
            // cgroupfs takes one pid per write(2), so the newline must go in the same buffer.
            match file.write_all(format!("{pid}\n").as_bytes()) {
                Ok(()) => {}
                // The process exited after it was listed.
                Err(e) if e.raw_os_error() == Some(ESRCH) => {}
                Err(e) => return Err(io_error(&leaf_procs, e)),
            }
            moved.insert(pid);
        }
    }
    // Still not drained: enabling controllers below will report the leftover processes.
    Ok(())
}

fn read_pids(path: &Path) -> Result<Vec<u32>> {
    let content = fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    content
        .split_whitespace()
        .map(|pid| {
            pid.parse().map_err(|_| CgroupError::Parse {
                path: path.to_path_buf(),
                reason: format!("expected a pid, got {pid:?}"),
            })
        })
        .collect()
}

/// Enables those of `wanted` that are not yet enabled in `dir`'s `cgroup.subtree_control`.
fn enable_controllers(dir: &Path, wanted: &[&str]) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    let current = read_optional(&path)?.unwrap_or_default();
    let enabled: HashSet<&str> = current.split_whitespace().collect();
    let missing: Vec<String> = wanted
        .iter()
        .filter(|c| !enabled.contains(*c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // One write so the kernel applies the set atomically.
    fs::write(&path, missing.join(" ")).map_err(|e| io_error(&path, e))
}

fn require_dir(id: &str, dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(CgroupError::NotFound {
            id: id.to_owned(),
            path: dir.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CgroupError::NotFound {
            id: id.to_owned(),
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(io_error(dir, e)),
    }
}

/// Removes `dir` and every directory below it, deepest first, using only `rmdir`.
fn remove_tree<F>(dir: &Path, rmdir: &F) -> Result<()>
where
    F: Fn(&Path) -> io::Result<()>,
{
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let path = entry.path();
        let file_type = match entry.file_type() {
            Ok(file_type) => file_type,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&path, e)),
        };
        if file_type.is_dir() {
            remove_tree(&path, rmdir)?;
        }
    }
    for attempt in 1..=RMDIR_ATTEMPTS {
        match rmdir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ResourceBusy => {
                if attempt < RMDIR_ATTEMPTS {
                    thread::sleep(RMDIR_BACKOFF);
                }
            }
            Err(e) => return Err(io_error(dir, e)),
        }
    }
    Err(CgroupError::Busy {
        path: dir.to_path_buf(),
        attempts: RMDIR_ATTEMPTS,
    })
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(content) => Ok(Some(content)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, e)),
    }
}

fn parse_u64(path: &Path, value: &str) -> Result<u64> {
    value.parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        reason: format!("expected an unsigned integer, got {value:?}"),
    })
}

/// Reads a single-number file; `None` if the file doesn't exist.
fn read_u64(path: &Path) -> Result<Option<u64>> {
    read_optional(path)?
        .map(|content| parse_u64(path, content.trim()))
        .transpose()
}

/// Reads a limit file where "max" means unlimited; `None` if unlimited or absent.
fn read_limit(path: &Path) -> Result<Option<u64>> {
    match read_optional(path)? {
        None => Ok(None),
        Some(content) if content.trim() == "max" => Ok(None),
        Some(content) => parse_u64(path, content.trim()).map(Some),
    }
}

/// Reads `key` from a flat-keyed file (`key value` per line); `None` if file or key is absent.
fn read_key(path: &Path, key: &str) -> Result<Option<u64>> {
    let Some(content) = read_optional(path)? else {
        return Ok(None);
    };
    for line in content.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() == Some(key) {
            let value = fields.next().unwrap_or_default();
            return parse_u64(path, value).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;
    use std::process::{Child, Command};
    use std::time::Instant;
    use tempfile::TempDir;

    const V1_OWN: &str = "/process_api/b0dad346236c945e6c1b1b6675ffa59d";
    const V1_PROC: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n6:freezer:/\n5:devices:/\n\
        4:memory:/process_api/b0dad346236c945e6c1b1b6675ffa59d\n3:cpuset:/\n2:cpuacct:/\n\
        1:cpu:/\n0::/\n";
    const V2_OWN: &str = "/system.slice/gantry-agent.service";
    const V2_PROC: &str = "0::/system.slice/gantry-agent.service\n";
    const V1_CONTROLLERS: [&str; 8] = [
        "blkio", "cpu", "cpuacct", "cpuset", "devices", "freezer", "memory", "pids",
    ];

    /// A fake cgroupfs in a temp dir.
    struct Fake {
        dir: TempDir,
    }

    impl Fake {
        fn empty() -> Fake {
            Fake {
                dir: tempfile::tempdir().expect("tempdir"),
            }
        }

        /// Hybrid v1 layout like this machine: one dir per controller, plus systemd and unified.
        fn v1() -> Fake {
            let fake = Fake::empty();
            for name in V1_CONTROLLERS.iter().chain(&["systemd"]) {
                fake.write(&format!("{name}/cgroup.procs"), "1\n");
            }
            fake.write("cpuset/cpuset.cpus", "0-3\n");
            fake.write("cpuset/cpuset.mems", "0\n");
            fake.write("unified/cgroup.procs", "");
            fake.write("unified/cgroup.controllers", "hugetlb\n");
            // The agent's memory cgroup exists only in the memory hierarchy, as here.
            fake.write(&format!("memory{V1_OWN}/cgroup.procs"), "4242\n");
            fake
        }

        /// Pure v2 with the agent in a service cgroup.
        fn v2() -> Fake {
            let fake = Fake::empty();
            fake.write(
                "cgroup.controllers",
                "cpuset cpu io memory hugetlb pids rdma misc\n",
            );
            fake.write("cgroup.subtree_control", "cpuset cpu io memory pids\n");
            fake.write("cgroup.procs", "1\n");
            fake.write(
                &format!("{V2_OWN}/cgroup.controllers"),
                "cpuset cpu io memory pids\n",
            );
            fake.write(&format!("{V2_OWN}/cgroup.subtree_control"), "");
            fake.write(&format!("{V2_OWN}/cgroup.procs"), "123\n456\n");
            fake
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.root().join(rel.trim_start_matches('/'))
        }

        fn write(&self, rel: &str, content: &str) {
            let path = self.path(rel);
            fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
            fs::write(path, content).expect("write");
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.path(rel)).expect("read")
        }

        fn mkdir(&self, rel: &str) {
            fs::create_dir_all(self.path(rel)).expect("mkdir");
        }

        fn exists(&self, rel: &str) -> bool {
            self.path(rel).exists()
        }

        /// Every file's content, keyed by path relative to the root.
        fn snapshot(&self) -> BTreeMap<PathBuf, String> {
            fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
                for entry in fs::read_dir(dir).expect("read_dir") {
                    let path = entry.expect("entry").path();
                    if path.is_dir() {
                        walk(base, &path, out);
                    } else {
                        let rel = path.strip_prefix(base).expect("under base").to_path_buf();
                        out.insert(rel, fs::read_to_string(&path).unwrap_or_default());
                    }
                }
            }
            let mut out = BTreeMap::new();
            walk(self.root(), self.root(), &mut out);
            out
        }
    }

    /// The fake's rmdir: a cgroupfs dir takes its files with it, a tempdir needs them deleted.
    fn fake_rmdir(dir: &Path) -> io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                fs::remove_file(entry.path())?;
            }
        }
        fs::remove_dir(dir)
    }

    fn v1_layout(fake: &Fake) -> Layout {
        Layout::discover(fake.root(), V1_PROC, None).expect("discover v1")
    }

    fn v2_layout(fake: &Fake) -> Layout {
        Layout::discover(fake.root(), V2_PROC, None).expect("discover v2")
    }

    #[test]
    fn warm_migration_writes_self_into_the_own_cgroup() {
        let fake = Fake::v1();
        v1_layout(&fake).warm_migration(V1_PROC).unwrap();
        let procs = fake.root().join(format!("memory{V1_OWN}/cgroup.procs"));
        assert_eq!(fs::read_to_string(procs).unwrap(), "0");
        // The cpu hierarchy (where the agent sits at the root) is left alone.
        assert_eq!(
            fs::read_to_string(fake.root().join("cpu/cgroup.procs")).unwrap(),
            "1\n"
        );

        let fake = Fake::v2();
        let after_prepare = format!("0::{V2_OWN}/agent\n");
        fs::create_dir_all(fake.root().join(format!("{}/agent", &V2_OWN[1..]))).unwrap();
        v2_layout(&fake).warm_migration(&after_prepare).unwrap();
        let procs = fake
            .root()
            .join(format!("{}/agent/cgroup.procs", &V2_OWN[1..]));
        assert_eq!(fs::read_to_string(procs).unwrap(), "0");
    }

    #[test]
    fn detect_v2_by_controllers_file_at_root() {
        let fake = Fake::v2();
        assert_eq!(detect(fake.root()).unwrap(), CgroupVersion::V2);
    }

    #[test]
    fn detect_hybrid_is_v1_despite_unified_controllers_file() {
        let fake = Fake::v1();
        assert!(fake.exists("unified/cgroup.controllers"));
        assert_eq!(detect(fake.root()).unwrap(), CgroupVersion::V1);
    }

    #[test]
    fn detect_rejects_a_dir_without_hierarchies() {
        let fake = Fake::empty();
        fake.mkdir("memory"); // a stray dir, not a hierarchy: no cgroup.procs
        assert!(matches!(
            detect(fake.root()),
            Err(CgroupError::NotCgroupfs { .. })
        ));
    }

    #[test]
    fn own_cgroup_v1_uses_memory_line() {
        let own = own_cgroup(V1_PROC, CgroupVersion::V1).unwrap();
        assert_eq!(own, Path::new(V1_OWN));
        // Co-mounted controllers are listed comma-separated.
        let own = own_cgroup("3:cpu,memory:/a/b\n0::/\n", CgroupVersion::V1).unwrap();
        assert_eq!(own, Path::new("/a/b"));
    }

    #[test]
    fn own_cgroup_v2_uses_zero_line() {
        let own = own_cgroup(V2_PROC, CgroupVersion::V2).unwrap();
        assert_eq!(own, Path::new(V2_OWN));
        // On hybrid hosts the 0:: line is not the memory line.
        assert_eq!(
            own_cgroup(V1_PROC, CgroupVersion::V2).unwrap(),
            Path::new("/")
        );
    }

    #[test]
    fn own_cgroup_reports_missing_lines() {
        let err = own_cgroup("0::/x\n", CgroupVersion::V1).unwrap_err();
        assert!(matches!(err, CgroupError::OwnCgroupMissing { .. }));
        assert_eq!(
            err.to_string(),
            "no memory controller line in /proc/self/cgroup"
        );
        let err = own_cgroup("4:memory:/x\n", CgroupVersion::V2).unwrap_err();
        assert!(matches!(err, CgroupError::OwnCgroupMissing { .. }));
    }

    #[test]
    fn own_cgroup_rejects_paths_outside_the_namespace() {
        let err = own_cgroup("0::/../../x\n", CgroupVersion::V2).unwrap_err();
        assert!(matches!(err, CgroupError::InvalidPath { .. }));
    }

    #[test]
    fn discover_v1_defaults_parent_below_memory_cgroup() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        assert_eq!(layout.version(), CgroupVersion::V1);
        let parent = format!("{V1_OWN}/gantry");
        assert_eq!(layout.parent(), Path::new(&parent));
        assert_eq!(
            layout.cgroups_path("ct1").unwrap(),
            Path::new(&format!("{parent}/ct1"))
        );
    }

    #[test]
    fn container_dirs_v1_cover_controllers_only() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        let dirs = layout.container_dirs("ct1").unwrap();
        let expected: Vec<PathBuf> = V1_CONTROLLERS
            .iter()
            .map(|c| fake.path(&format!("{c}{V1_OWN}/gantry/ct1")))
            .collect();
        assert_eq!(dirs, expected);
    }

    #[test]
    fn container_dirs_v1_skip_symlinks_and_duplicates() {
        let fake = Fake::empty();
        for name in ["cpu,cpuacct", "memory", "name=foo", "systemd"] {
            fake.write(&format!("{name}/cgroup.procs"), "");
        }
        symlink("cpu,cpuacct", fake.path("cpu")).unwrap();
        symlink("cpu,cpuacct", fake.path("cpuacct")).unwrap();
        let layout = Layout::discover(fake.root(), "4:memory:/m\n", None).unwrap();
        let dirs = layout.container_dirs("ct").unwrap();
        assert_eq!(
            dirs,
            vec![
                fake.path("cpu,cpuacct/m/gantry/ct"),
                fake.path("memory/m/gantry/ct"),
            ]
        );
        // Controller lookups still find co-mounted controllers.
        assert_eq!(
            layout.v1_container_dir("cpuacct", "ct").unwrap(),
            fake.path("cpu,cpuacct/m/gantry/ct")
        );
    }

    #[test]
    fn discover_v1_requires_memory_hierarchy() {
        let fake = Fake::empty();
        fake.write("cpu/cgroup.procs", "");
        let err = Layout::discover(fake.root(), V1_PROC, None).unwrap_err();
        assert!(matches!(
            err,
            CgroupError::ControllerNotMounted {
                controller: "memory",
                ..
            }
        ));
    }

    #[test]
    fn container_dirs_v2_is_a_single_dir() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        assert_eq!(
            layout.container_dirs("ct").unwrap(),
            vec![fake.path(&format!("{V2_OWN}/gantry/ct"))]
        );
    }

    #[test]
    fn discover_validates_parent_override() {
        let fake = Fake::v2();
        let root = fake.root();
        let ok =
            Layout::discover(root, V2_PROC, Some(Path::new(&format!("{V2_OWN}/./pods/")))).unwrap();
        assert_eq!(ok.parent(), Path::new(&format!("{V2_OWN}/pods")));
        let outside = Layout::discover(root, V2_PROC, Some(Path::new("/elsewhere")));
        assert!(matches!(outside, Err(CgroupError::ParentOutsideOwn { .. })));
        for bad in ["/", "relative", V2_OWN, "/a/../b"] {
            let result = Layout::discover(root, V2_PROC, Some(Path::new(bad)));
            assert!(
                matches!(result, Err(CgroupError::InvalidPath { .. })),
                "{bad}: {result:?}"
            );
        }
        let in_leaf = format!("{V2_OWN}/agent/x");
        let result = Layout::discover(root, V2_PROC, Some(Path::new(&in_leaf)));
        assert!(matches!(result, Err(CgroupError::InvalidPath { .. })));
    }

    #[test]
    fn ids_are_validated_everywhere() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        fake.mkdir(&format!("memory{V1_OWN}/gantry/keep"));
        for bad in ["", ".", "..", "a/b", "../gantry", "a\0b"] {
            assert!(matches!(
                layout.cgroups_path(bad),
                Err(CgroupError::InvalidId { .. })
            ));
            assert!(matches!(
                layout.container_dirs(bad),
                Err(CgroupError::InvalidId { .. })
            ));
            assert!(matches!(
                layout.stats(bad),
                Err(CgroupError::InvalidId { .. })
            ));
            assert!(matches!(
                layout.oom_kills(bad),
                Err(CgroupError::InvalidId { .. })
            ));
            assert!(matches!(
                layout.remove(bad),
                Err(CgroupError::InvalidId { .. })
            ));
        }
        assert!(fake.exists(&format!("memory{V1_OWN}/gantry/keep")));
        assert!(layout.cgroups_path("abc-123_x.y").is_ok());
    }

    /// Lays out v1 stat files for container `id` under the default parent.
    fn write_v1_stats(fake: &Fake, id: &str, files: &[(&str, &str, &str)]) {
        for (controller, file, content) in files {
            fake.write(&format!("{controller}{V1_OWN}/gantry/{id}/{file}"), content);
        }
    }

    #[test]
    fn stats_v1_reads_realistic_files() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        write_v1_stats(
            &fake,
            "ct",
            &[
                ("cpuacct", "cpuacct.usage", "1234567890\n"),
                (
                    "cpu",
                    "cpu.stat",
                    "nr_periods 40\nnr_throttled 7\nthrottled_time 350000000\nnr_bursts 0\nburst_time 0\n",
                ),
                ("memory", "memory.usage_in_bytes", "104857600\n"),
                (
                    "memory",
                    "memory.stat",
                    "cache 40000000\nrss 60000000\ninactive_file 1\ntotal_cache 40000000\n\
                     total_rss 60000000\ntotal_inactive_file 20971520\ntotal_active_file 5000\n",
                ),
                ("memory", "memory.limit_in_bytes", "9223372036854771712\n"),
                ("memory", "memory.max_usage_in_bytes", "209715200\n"),
                (
                    "memory",
                    "memory.oom_control",
                    "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
                ),
                ("pids", "pids.current", "3\n"),
                ("pids", "pids.max", "max\n"),
            ],
        );
        let stats = layout.stats("ct").unwrap();
        assert_eq!(
            stats,
            CgroupStats {
                cpu_usage_ns: 1_234_567_890,
                cpu_throttled_periods: 7,
                cpu_throttled_ns: 350_000_000,
                memory_usage: 104_857_600,
                memory_working_set: 104_857_600 - 20_971_520,
                memory_limit: None,
                memory_max_usage: Some(209_715_200),
                pids_current: 3,
                pids_limit: None,
                oom_kills: 2,
            }
        );
        assert_eq!(layout.oom_kills("ct").unwrap(), 2);
    }

    #[test]
    fn stats_v1_limits_and_saturating_working_set() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        write_v1_stats(
            &fake,
            "ct",
            &[
                ("memory", "memory.usage_in_bytes", "1000\n"),
                ("memory", "memory.stat", "total_inactive_file 5000\n"),
                ("memory", "memory.limit_in_bytes", "268435456\n"),
                ("pids", "pids.max", "100\n"),
            ],
        );
        let stats = layout.stats("ct").unwrap();
        assert_eq!(stats.memory_working_set, 0);
        assert_eq!(stats.memory_limit, Some(268_435_456));
        assert_eq!(stats.pids_limit, Some(100));
        // Files that are absent read as zero / None.
        assert_eq!(stats.cpu_usage_ns, 0);
        assert_eq!(stats.memory_max_usage, None);
        assert_eq!(stats.oom_kills, 0);
        assert_eq!(layout.oom_kills("ct").unwrap(), 0);

        // Any huge value is "unlimited", whatever the page size made of PAGE_COUNTER_MAX.
        fake.write(
            &format!("memory{V1_OWN}/gantry/ct/memory.limit_in_bytes"),
            "9223372036854775807\n",
        );
        assert_eq!(layout.stats("ct").unwrap().memory_limit, None);
    }

    #[test]
    fn stats_missing_cgroup_is_not_found() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        // Present in another hierarchy only: the memory cgroup is what counts.
        fake.mkdir(&format!("pids{V1_OWN}/gantry/gone"));
        assert!(matches!(
            layout.stats("gone"),
            Err(CgroupError::NotFound { .. })
        ));
        assert!(matches!(
            layout.oom_kills("gone"),
            Err(CgroupError::NotFound { .. })
        ));
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        assert!(matches!(
            layout.stats("gone"),
            Err(CgroupError::NotFound { .. })
        ));
        assert!(matches!(
            layout.oom_kills("gone"),
            Err(CgroupError::NotFound { .. })
        ));
    }

    #[test]
    fn stats_reports_garbage_as_parse_error() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        fake.write(&format!("{V2_OWN}/gantry/ct/memory.current"), "lots\n");
        let err = layout.stats("ct").unwrap_err();
        assert!(matches!(err, CgroupError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn stats_v2_reads_realistic_files() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        let dir = format!("{V2_OWN}/gantry/ct");
        fake.write(
            &format!("{dir}/cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\nnr_periods 10\n\
             nr_throttled 4\nthrottled_usec 1500\nnr_bursts 0\nburst_usec 0\n",
        );
        fake.write(&format!("{dir}/memory.current"), "52428800\n");
        fake.write(
            &format!("{dir}/memory.stat"),
            "anon 30000000\nfile 20000000\ninactive_anon 0\nactive_anon 30000000\n\
             inactive_file 10485760\nactive_file 9514240\n",
        );
        fake.write(&format!("{dir}/memory.max"), "max\n");
        fake.write(&format!("{dir}/memory.peak"), "62914560\n");
        fake.write(
            &format!("{dir}/memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        fake.write(&format!("{dir}/pids.current"), "5\n");
        fake.write(&format!("{dir}/pids.max"), "64\n");
        assert_eq!(
            layout.stats("ct").unwrap(),
            CgroupStats {
                cpu_usage_ns: 2_500_000,
                cpu_throttled_periods: 4,
                cpu_throttled_ns: 1_500_000,
                memory_usage: 52_428_800,
                memory_working_set: 52_428_800 - 10_485_760,
                memory_limit: None,
                memory_max_usage: Some(62_914_560),
                pids_current: 5,
                pids_limit: Some(64),
                oom_kills: 1,
            }
        );
        assert_eq!(layout.oom_kills("ct").unwrap(), 1);

        fake.write(&format!("{dir}/memory.max"), "536870912\n");
        fs::remove_file(fake.path(&format!("{dir}/memory.peak"))).unwrap();
        let stats = layout.stats("ct").unwrap();
        assert_eq!(stats.memory_limit, Some(536_870_912));
        assert_eq!(stats.memory_max_usage, None);
    }

    #[test]
    fn prepare_v2_moves_procs_into_leaf_and_enables_controllers() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        layout.prepare().unwrap();
        assert_eq!(
            fake.read(&format!("{V2_OWN}/agent/cgroup.procs")),
            "123\n456\n"
        );
        let all = "+cpu +cpuset +io +memory +pids";
        assert_eq!(fake.read(&format!("{V2_OWN}/cgroup.subtree_control")), all);
        assert_eq!(
            fake.read(&format!("{V2_OWN}/gantry/cgroup.subtree_control")),
            all
        );
    }

    #[test]
    fn prepare_v2_is_idempotent() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        layout.prepare().unwrap();
        // What the kernel shows afterwards: procs moved, controllers listed without '+'.
        let enabled = "cpu cpuset io memory pids\n";
        fake.write(&format!("{V2_OWN}/cgroup.procs"), "");
        fake.write(&format!("{V2_OWN}/cgroup.subtree_control"), enabled);
        fake.write(&format!("{V2_OWN}/gantry/cgroup.subtree_control"), enabled);
        let before = fake.snapshot();
        layout.prepare().unwrap();
        assert_eq!(fake.snapshot(), before);
    }

    #[test]
    fn prepare_v2_enables_only_available_and_missing_controllers() {
        let fake = Fake::v2();
        fake.write(
            &format!("{V2_OWN}/cgroup.controllers"),
            "cpu memory pids hugetlb\n",
        );
        fake.write(&format!("{V2_OWN}/cgroup.subtree_control"), "memory\n");
        fake.write(&format!("{V2_OWN}/cgroup.procs"), "");
        let layout = v2_layout(&fake);
        layout.prepare().unwrap();
        assert_eq!(
            fake.read(&format!("{V2_OWN}/cgroup.subtree_control")),
            "+cpu +pids"
        );
        assert_eq!(
            fake.read(&format!("{V2_OWN}/gantry/cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        // No processes to move, so no leaf.
        assert!(!fake.exists(&format!("{V2_OWN}/agent")));
    }

    #[test]
    fn prepare_v2_enables_every_level_of_a_nested_parent() {
        let fake = Fake::v2();
        let parent = format!("{V2_OWN}/a/b");
        let layout = Layout::discover(fake.root(), V2_PROC, Some(Path::new(&parent))).unwrap();
        layout.prepare().unwrap();
        for dir in [V2_OWN.to_owned(), format!("{V2_OWN}/a"), parent] {
            assert_eq!(
                fake.read(&format!("{dir}/cgroup.subtree_control")),
                "+cpu +cpuset +io +memory +pids",
                "{dir}"
            );
        }
    }

    #[test]
    fn prepare_v2_never_writes_outside_own_subtree() {
        let fake = Fake::v2();
        let outside = |snapshot: BTreeMap<PathBuf, String>| {
            let own = PathBuf::from(V2_OWN.trim_start_matches('/'));
            snapshot
                .into_iter()
                .filter(|(path, _)| !path.starts_with(&own))
                .collect::<BTreeMap<_, _>>()
        };
        let before = outside(fake.snapshot());
        v2_layout(&fake).prepare().unwrap();
        assert_eq!(outside(fake.snapshot()), before);
    }

    #[test]
    fn prepare_v2_in_root_cgroup_leaves_processes_alone() {
        let fake = Fake::v2();
        let layout = Layout::discover(fake.root(), "0::/\n", None).unwrap();
        assert_eq!(layout.parent(), Path::new("/gantry"));
        layout.prepare().unwrap();
        assert!(!fake.exists("agent"));
        assert_eq!(fake.read("cgroup.procs"), "1\n");
        assert_eq!(
            fake.read("gantry/cgroup.subtree_control"),
            "+cpu +cpuset +io +memory +pids"
        );
    }

    #[test]
    fn prepare_v1_creates_parent_in_each_controller_and_copies_cpuset() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        layout.prepare().unwrap();
        for controller in V1_CONTROLLERS {
            assert!(
                fake.exists(&format!("{controller}{V1_OWN}/gantry")),
                "{controller}"
            );
        }
        assert!(!fake.exists("systemd/process_api"));
        assert!(!fake.exists("unified/process_api"));
        // Every cpuset dir that had to be created inherits the root's sets.
        for dir in [
            "process_api",
            &V1_OWN[1..],
            &format!("{}/gantry", &V1_OWN[1..]),
        ] {
            assert_eq!(
                fake.read(&format!("cpuset/{dir}/cpuset.cpus")),
                "0-3",
                "{dir}"
            );
            assert_eq!(
                fake.read(&format!("cpuset/{dir}/cpuset.mems")),
                "0",
                "{dir}"
            );
        }
        // Idempotent: a second run changes nothing.
        let before = fake.snapshot();
        layout.prepare().unwrap();
        assert_eq!(fake.snapshot(), before);
    }

    #[test]
    fn prepare_v1_copies_cpuset_from_nearest_configured_ancestor() {
        let fake = Fake::v1();
        fake.write("cpuset/process_api/cpuset.cpus", "1\n");
        fake.write("cpuset/process_api/cpuset.mems", "0\n");
        // Left empty, e.g. by a crash between mkdir and write.
        fake.write(&format!("cpuset{V1_OWN}/cpuset.cpus"), "\n");
        fake.write(&format!("cpuset{V1_OWN}/cpuset.mems"), "");
        v1_layout(&fake).prepare().unwrap();
        assert_eq!(fake.read(&format!("cpuset{V1_OWN}/cpuset.cpus")), "1");
        assert_eq!(
            fake.read(&format!("cpuset{V1_OWN}/gantry/cpuset.cpus")),
            "1"
        );
        assert_eq!(
            fake.read(&format!("cpuset{V1_OWN}/gantry/cpuset.mems")),
            "0"
        );
        // An ancestor that was already set keeps its own value.
        assert_eq!(fake.read("cpuset/process_api/cpuset.cpus"), "1\n");
    }

    /// Lays out a container cgroup with a nested child and files in every v1 hierarchy.
    fn v1_container_with_files(fake: &Fake, id: &str) {
        for controller in V1_CONTROLLERS {
            let dir = format!("{controller}{V1_OWN}/gantry/{id}");
            fake.write(&format!("{dir}/cgroup.procs"), "");
            fake.write(&format!("{dir}/nested/cgroup.procs"), "");
            fake.write(&format!("{dir}/nested/deeper/tasks"), "");
        }
    }

    #[test]
    fn remove_deletes_container_tree_and_keeps_parent() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        layout.prepare().unwrap();
        v1_container_with_files(&fake, "ct");
        v1_container_with_files(&fake, "other");
        layout.remove_with("ct", &fake_rmdir).unwrap();
        for controller in V1_CONTROLLERS {
            let parent = format!("{controller}{V1_OWN}/gantry");
            assert!(!fake.exists(&format!("{parent}/ct")), "{controller}");
            assert!(fake.exists(&parent), "{controller}");
            assert!(fake.exists(&format!("{parent}/other/nested/deeper")));
        }
        // Already gone is fine.
        layout.remove_with("ct", &fake_rmdir).unwrap();
    }

    #[test]
    fn remove_uses_plain_rmdir_in_production() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        // Empty dirs, as rmdir sees cgroupfs dirs.
        fake.mkdir(&format!("{V2_OWN}/gantry/ct/sub/subsub"));
        layout.remove("ct").unwrap();
        assert!(!fake.exists(&format!("{V2_OWN}/gantry/ct")));
        assert!(fake.exists(&format!("{V2_OWN}/gantry")));
        layout.remove("never-existed").unwrap();
        // A regular file stops rmdir; production must not delete files itself.
        fake.write(&format!("{V2_OWN}/gantry/ct2/memory.max"), "max\n");
        let err = layout.remove("ct2").unwrap_err();
        assert!(matches!(err, CgroupError::Io { .. }), "{err:?}");
        assert!(fake.exists(&format!("{V2_OWN}/gantry/ct2/memory.max")));
    }

    #[test]
    fn remove_retries_while_busy() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        fake.mkdir(&format!("{V2_OWN}/gantry/ct"));
        let calls = Cell::new(0);
        let flaky = |dir: &Path| {
            calls.set(calls.get() + 1);
            if calls.get() <= 3 {
                Err(io::Error::from(io::ErrorKind::ResourceBusy))
            } else {
                fs::remove_dir(dir)
            }
        };
        layout.remove_with("ct", &flaky).unwrap();
        assert_eq!(calls.get(), 4);
        assert!(!fake.exists(&format!("{V2_OWN}/gantry/ct")));
    }

    #[test]
    fn remove_gives_up_when_always_busy() {
        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        fake.mkdir(&format!("{V2_OWN}/gantry/ct"));
        let calls = Cell::new(0);
        let busy = |_: &Path| {
            calls.set(calls.get() + 1);
            Err(io::Error::from(io::ErrorKind::ResourceBusy))
        };
        let err = layout.remove_with("ct", &busy).unwrap_err();
        assert!(
            matches!(err, CgroupError::Busy { attempts: 50, .. }),
            "{err:?}"
        );
        assert_eq!(calls.get(), RMDIR_ATTEMPTS);
        assert!(fake.exists(&format!("{V2_OWN}/gantry/ct")));
    }

    #[test]
    fn list_unions_hierarchies_and_ignores_non_containers() {
        let fake = Fake::v1();
        let layout = v1_layout(&fake);
        assert!(layout.list().unwrap().is_empty(), "unprepared parent");
        layout.prepare().unwrap();
        fake.mkdir(&format!("memory{V1_OWN}/gantry/b"));
        fake.mkdir(&format!("cpu{V1_OWN}/gantry/b"));
        // Half-removed leftover: only one hierarchy still has it.
        fake.mkdir(&format!("pids{V1_OWN}/gantry/a"));
        fake.write(&format!("memory{V1_OWN}/gantry/memory.stat"), "");
        fake.mkdir(&format!("systemd{V1_OWN}/gantry/not-ours"));
        assert_eq!(layout.list().unwrap(), vec!["a", "b"]);

        let fake = Fake::v2();
        let layout = v2_layout(&fake);
        fake.mkdir(&format!("{V2_OWN}/gantry/x"));
        fake.mkdir(&format!("{V2_OWN}/agent"));
        assert_eq!(layout.list().unwrap(), vec!["x"]);
    }

    #[test]
    fn error_messages_carry_context() {
        let err = CgroupError::NotFound {
            id: "ct".into(),
            path: PathBuf::from("/sys/fs/cgroup/x/ct"),
        };
        assert_eq!(
            err.to_string(),
            "no cgroup for container ct at /sys/fs/cgroup/x/ct"
        );
        let err = validate_id("a/b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid container id \"a/b\": must not contain '/'"
        );
    }

    // ---- Tests against the real cgroupfs; they skip unless run as root on a matching host.

    fn running_as_root() -> bool {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .and_then(|uids| uids.split_whitespace().next().map(|uid| uid == "0"))
            })
            .unwrap_or(false)
    }

    /// Kills the helper process and removes what a real test created, even after a panic.
    struct RealCleanup {
        child: Option<Child>,
        /// Removed in order, so deepest first.
        dirs: Vec<PathBuf>,
    }

    impl Drop for RealCleanup {
        fn drop(&mut self) {
            if let Some(child) = &mut self.child {
                let _ = child.kill();
                let _ = child.wait();
            }
            for dir in &self.dirs {
                let _ = remove_tree(dir, &|d: &Path| fs::remove_dir(d));
            }
        }
    }

    /// Dirs on the way from `mount` to `mount/<path>` that don't exist yet, deepest first.
    fn missing_dirs(mount: &Path, path: &Path) -> Vec<PathBuf> {
        let mut dir = mount.to_path_buf();
        let mut missing = Vec::new();
        for component in path.strip_prefix("/").unwrap_or(path).components() {
            dir.push(component);
            if !dir.exists() {
                missing.push(dir.clone());
            }
        }
        missing.reverse();
        missing
    }

    fn spawn_busy_child() -> Child {
        // Burns CPU for a while after being moved so the new cgroup accounts some usage.
        Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 2000000 ]; do i=$((i+1)); done; sleep 60",
            ])
            .spawn()
            .expect("spawn sh")
    }

    #[test]
    fn real_v1_round_trip() {
        let root = Path::new(DEFAULT_ROOT);
        if !running_as_root()
            || !root.join("memory").is_dir()
            || detect(root).ok() != Some(CgroupVersion::V1)
        {
            eprintln!("skipping: needs root on a cgroup v1 host");
            return;
        }
        let proc_self = fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own_cgroup(&proc_self, CgroupVersion::V1).unwrap();
        let pid = std::process::id();
        let parent = own.join(format!("gantry-test-{pid}"));
        let layout = Layout::discover(root, &proc_self, Some(&parent)).unwrap();
        let id = format!("ct-{pid}");

        let mut cleanup = RealCleanup {
            child: None,
            dirs: layout.container_dirs(&id).unwrap(),
        };
        for hierarchy in &layout.hierarchies {
            cleanup.dirs.extend(missing_dirs(&hierarchy.dir, &parent));
        }

        layout.prepare().unwrap();
        layout.prepare().unwrap();
        for dir in layout.parent_dirs() {
            assert!(dir.is_dir(), "{}", dir.display());
        }
        let cpuset = layout.hierarchies.iter().find(|h| h.has("cpuset"));
        if let Some(cpuset) = cpuset {
            let parent_dir = under(&cpuset.dir, &parent);
            for file in ["cpuset.cpus", "cpuset.mems"] {
                assert_eq!(
                    read_trimmed(&parent_dir.join(file)).unwrap(),
                    read_trimmed(&cpuset.dir.join(file)).unwrap(),
                    "{file}"
                );
            }
        }

        // Stand in for libcontainer: create the container cgroup, set limits, add a task.
        for dir in layout.container_dirs(&id).unwrap() {
            fs::create_dir(&dir).unwrap();
        }
        let memory = layout.v1_container_dir("memory", &id).unwrap();
        fs::write(memory.join("memory.limit_in_bytes"), "268435456").unwrap();
        let pids = layout.v1_container_dir("pids", &id).unwrap();
        fs::write(pids.join("pids.max"), "10").unwrap();
        let child = cleanup.child.insert(spawn_busy_child());
        let child_pid = child.id().to_string();
        for controller in ["memory", "pids", "cpu", "cpuacct"] {
            let dir = layout.v1_container_dir(controller, &id).unwrap();
            fs::write(dir.join("cgroup.procs"), &child_pid).unwrap();
        }

        assert_eq!(layout.list().unwrap(), vec![id.clone()]);
        let deadline = Instant::now() + Duration::from_secs(5);
        let stats = loop {
            let stats = layout.stats(&id).unwrap();
            if stats.cpu_usage_ns > 0 || Instant::now() > deadline {
                break stats;
            }
            thread::sleep(Duration::from_millis(20));
        };
        eprintln!("real v1 stats: {stats:?}");
        assert!(stats.cpu_usage_ns > 0);
        assert_eq!(stats.pids_current, 1);
        assert_eq!(stats.pids_limit, Some(10));
        assert_eq!(stats.memory_limit, Some(268_435_456));
        assert!(stats.memory_max_usage.is_some());
        assert!(stats.memory_working_set <= stats.memory_usage);
        assert_eq!(layout.oom_kills(&id).unwrap(), 0);

        // Busy while the task lives: removal must fail rather than pretend.
        assert!(matches!(layout.remove(&id), Err(CgroupError::Busy { .. })));
        if let Some(mut child) = cleanup.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        layout.remove(&id).unwrap();
        for dir in layout.container_dirs(&id).unwrap() {
            assert!(!dir.exists(), "{}", dir.display());
        }
        for dir in layout.parent_dirs() {
            assert!(dir.is_dir(), "{}", dir.display());
        }
        assert!(layout.list().unwrap().is_empty());
        assert!(matches!(
            layout.stats(&id),
            Err(CgroupError::NotFound { .. })
        ));
    }

    /// Exercises the v2 process move on a real cgroup2 mount (the `unified` one on hybrid
    /// hosts), in a throwaway cgroup standing in for the agent's own.
    #[test]
    fn real_v2_moves_processes_into_leaf() {
        let root = Path::new(DEFAULT_ROOT).join("unified");
        if !running_as_root() || detect(&root).ok() != Some(CgroupVersion::V2) {
            eprintln!(
                "skipping: needs root and a cgroup2 mount at {}",
                root.display()
            );
            return;
        }
        let own = PathBuf::from(format!("/gantry-v2test-{}", std::process::id()));
        let own_dir = under(&root, &own);
        let mut cleanup = RealCleanup {
            child: None,
            dirs: vec![own_dir.clone()],
        };
        fs::create_dir(&own_dir).unwrap();
        let child = cleanup.child.insert(spawn_busy_child());
        let child_pid = child.id();
        fs::write(own_dir.join("cgroup.procs"), child_pid.to_string()).unwrap();

        let proc_self = format!("0::{}\n", own.display());
        let layout = Layout::discover(&root, &proc_self, None).unwrap();
        layout.prepare().unwrap();
        layout.prepare().unwrap();

        assert!(read_pids(&own_dir.join("cgroup.procs")).unwrap().is_empty());
        assert_eq!(
            read_pids(&own_dir.join("agent/cgroup.procs")).unwrap(),
            vec![child_pid]
        );
        assert!(own_dir.join("gantry").is_dir());
        // Whatever of Gantry's controllers the mount offers must now reach the parent.
        let offered = read_trimmed(&own_dir.join("cgroup.controllers")).unwrap();
        let parent_has = read_trimmed(&own_dir.join("gantry/cgroup.controllers")).unwrap();
        for controller in offered.split_whitespace() {
            if V2_CONTROLLERS.contains(&controller) {
                assert!(parent_has.split_whitespace().any(|c| c == controller));
            }
        }
        fs::create_dir(own_dir.join("gantry/ct")).unwrap();
        assert_eq!(layout.list().unwrap(), vec!["ct"]);
        let stats = layout.stats("ct").unwrap();
        assert_eq!(stats.pids_current, 0);
        layout.remove("ct").unwrap();
        assert!(layout.list().unwrap().is_empty());

        if let Some(mut child) = cleanup.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        remove_tree(&own_dir, &|d: &Path| fs::remove_dir(d)).unwrap();
        assert!(!own_dir.exists());
    }
}
