//! Resource usage for `gantry top`: the answer to the scheduler's `stats_request`.
//!
//! CPU figures are rates measured on demand: the machine's busy time (/proc/stat) and each
//! container's cgroup CPU time are read twice, [`WINDOW`] apart, and the difference is divided
//! by the time between the reads. Nothing is kept between requests, so the first answer is as
//! good as any other and an idle agent does no sampling; each request costs a quarter second
//! of waiting (not of work). Memory is read once, at the end: the machine's as MemTotal minus
//! MemAvailable, each container's as its working set (usage minus inactive file cache, the
//! same figure as `/metrics`' `container_memory_working_set_bytes`).
//!
//! The kernel files are read under a root path (`/proc` in the daemon), so tests point them at
//! a directory of their own.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry::pb;

use super::instance::{Env, LABEL_INSTANCE, LABEL_WORKLOAD};
use crate::runtime::{CgroupStats, ContainerState, Runtime};

/// Time between the two CPU readings of a request.
pub const WINDOW: Duration = Duration::from_millis(250);

/// Where the daemon reads the machine's figures.
pub const PROC_ROOT: &str = "/proc";

/// Why the machine's figures could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file did not hold what the kernel writes there.
    #[error("{path}: {what}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        what: &'static str,
    },
}

/// The machine's cumulative CPU time, from the `cpu` lines of /proc/stat (in clock ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineCpu {
    /// Ticks spent on anything but idle and iowait, over all CPUs.
    pub busy: u64,
    /// All ticks, over all CPUs.
    pub total: u64,
    /// CPUs online (`cpuN` lines).
    pub cpus: u32,
}

/// The machine's memory, from /proc/meminfo, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MachineMemory {
    /// MemTotal.
    pub total: u64,
    /// MemAvailable.
    pub available: u64,
}

fn read(path: PathBuf) -> Result<(String, PathBuf), ProcError> {
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok((text, path)),
        Err(source) => Err(ProcError::Read { path, source }),
    }
}

/// Reads `<proc>/stat`.
pub fn machine_cpu(proc: &Path) -> Result<MachineCpu, ProcError> {
    let (text, path) = read(proc.join("stat"))?;
    let mut cpu = MachineCpu::default();
    let mut found = false;
    for line in text.lines() {
        let mut fields = line.split_ascii_whitespace();
        match fields.next() {
            Some("cpu") => {
                // user nice system idle iowait irq softirq steal (guest time is inside user).
                let ticks: Vec<u64> = fields.take(8).map(|f| f.parse().unwrap_or(0)).collect();
                if ticks.len() < 4 {
                    return Err(ProcError::Malformed {
                        path,
                        what: "the cpu line has fewer than 4 fields",
                    });
                }
                let idle = ticks[3] + ticks.get(4).copied().unwrap_or(0);
                cpu.total = ticks.iter().sum();
                cpu.busy = cpu.total.saturating_sub(idle);
                found = true;
            }
            Some(name) if name.starts_with("cpu") => cpu.cpus += 1,
            _ => {}
        }
    }
    if !found {
        return Err(ProcError::Malformed {
            path,
            what: "no cpu line",
        });
    }
    Ok(cpu)
}

/// Reads `<proc>/meminfo`.
pub fn machine_memory(proc: &Path) -> Result<MachineMemory, ProcError> {
    let (text, path) = read(proc.join("meminfo"))?;
    let kib = |key: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(key)?.strip_prefix(':')?;
            let number = rest.split_ascii_whitespace().next()?;
            number.parse::<u64>().ok().map(|n| n * 1024)
        })
    };
    let Some(total) = kib("MemTotal") else {
        return Err(ProcError::Malformed {
            path,
            what: "no MemTotal line",
        });
    };
    // Kernels before 3.14 lack MemAvailable; free memory is the nearest figure there.
    let available = kib("MemAvailable").or_else(|| kib("MemFree")).unwrap_or(0);
    Ok(MachineMemory { total, available })
}

/// Cores in use between two readings of the machine's CPU.
pub fn machine_cores(before: MachineCpu, after: MachineCpu) -> f64 {
    let total = after.total.saturating_sub(before.total);
    if total == 0 {
        return 0.0;
    }
    let busy = after.busy.saturating_sub(before.busy);
    busy as f64 / total as f64 * f64::from(after.cpus.max(1))
}

/// Cores used by a cgroup whose CPU time went from `before_ns` to `after_ns` in `elapsed`.
pub fn cgroup_cores(before_ns: u64, after_ns: u64, elapsed: Duration) -> f64 {
    if elapsed.is_zero() {
        return 0.0;
    }
    after_ns.saturating_sub(before_ns) as f64 / elapsed.as_nanos() as f64
}

/// A container being measured.
struct Measured {
    id: String,
    instance: String,
    workload: String,
}

/// Answers a `stats_request`: measures for [`WINDOW`], then replies. Never fails: what could
/// not be measured goes into the reply's `error`.
pub async fn measure(env: Arc<Env>, request: pb::StatsRequest) -> pb::StatsReply {
    let pb::StatsRequest {
        relay_id,
        instance_ids,
    } = request;
    let mut reply = match measure_usage(env, Path::new(PROC_ROOT), instance_ids).await {
        Ok(reply) => reply,
        Err(error) => pb::StatsReply {
            error,
            ..Default::default()
        },
    };
    reply.relay_id = relay_id;
    reply
}

async fn measure_usage(
    env: Arc<Env>,
    proc: &Path,
    instance_ids: Vec<String>,
) -> Result<pb::StatsReply, String> {
    let wanted: HashSet<String> = instance_ids.into_iter().collect();
    let containers = env
        .runtime
        .list()
        .await
        .map_err(|e| format!("listing containers: {e}"))?;
    let measured: Vec<Measured> = containers
        .into_iter()
        // A stopped container's cgroup is gone with its figures.
        .filter(|c| !matches!(c.state, ContainerState::Stopped(_)))
        .filter_map(|c| {
            let instance = c.spec.labels.get(LABEL_INSTANCE)?.clone();
            if !wanted.is_empty() && !wanted.contains(&instance) {
                return None;
            }
            let workload = c
                .spec
                .labels
                .get(LABEL_WORKLOAD)
                .cloned()
                .unwrap_or_default();
            Some(Measured {
                id: c.id,
                instance,
                workload,
            })
        })
        .collect();
    let measured = Arc::new(measured);

    let first = {
        let (env, measured, proc) = (env.clone(), measured.clone(), proc.to_owned());
        tokio::task::spawn_blocking(move || read_all(&env, &measured, &proc))
    }
    .await
    .map_err(|e| e.to_string())??;
    tokio::time::sleep(WINDOW).await;
    let second = {
        let (env, measured, proc) = (env.clone(), measured.clone(), proc.to_owned());
        tokio::task::spawn_blocking(move || read_all(&env, &measured, &proc))
    }
    .await
    .map_err(|e| e.to_string())??;

    let elapsed = second.at.duration_since(first.at);
    let memory = second.memory;
    let node = pb::NodeUsage {
        node: String::new(),
        cpu_cores: machine_cores(first.cpu, second.cpu),
        cpu_capacity_cores: f64::from(second.cpu.cpus),
        memory_used_bytes: memory.total.saturating_sub(memory.available),
        memory_total_bytes: memory.total,
        window: prost_types::Duration::try_from(elapsed).ok(),
    };
    let before: HashMap<&str, u64> = measured
        .iter()
        .zip(&first.containers)
        .filter_map(|(m, s)| Some((m.id.as_str(), s.as_ref()?.cpu_usage_ns)))
        .collect();
    // Containers whose cgroup is gone by the second reading are left out.
    let instances = measured
        .iter()
        .zip(&second.containers)
        .filter_map(|(m, after)| Some((m, after.as_ref()?)));
    let mut usage: Vec<pb::InstanceUsage> = instances
        .into_iter()
        .map(|(m, after)| pb::InstanceUsage {
            instance_id: m.instance.clone(),
            workload: m.workload.clone(),
            node: String::new(),
            // A container that started within the window counts from zero.
            cpu_cores: cgroup_cores(
                before.get(m.id.as_str()).copied().unwrap_or(0),
                after.cpu_usage_ns,
                elapsed,
            ),
            memory_working_set_bytes: after.memory_working_set,
            memory_limit_bytes: after.memory_limit.unwrap_or(0),
            pids: after.pids_current,
        })
        .collect();
    usage.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    Ok(pb::StatsReply {
        relay_id: 0,
        node: Some(node),
        instances: usage,
        error: String::new(),
    })
}

/// One reading of everything measured.
struct Reading {
    at: Instant,
    cpu: MachineCpu,
    memory: MachineMemory,
    /// Per container, in the order measured; `None` where its cgroup is gone.
    containers: Vec<Option<CgroupStats>>,
}

/// Reads the machine and every container's cgroup. Blocking.
fn read_all(env: &Env, measured: &[Measured], proc: &Path) -> Result<Reading, String> {
    let layout = &env.runtime.config().cgroups;
    let containers = measured
        .iter()
        .map(|m| match layout.stats(&m.id) {
            Ok(stats) => Some(stats),
            Err(err) => {
                tracing::debug!(container = %m.id, %err, "container skipped in the stats");
                None
            }
        })
        .collect();
    let cpu = machine_cpu(proc).map_err(|e| e.to_string())?;
    let memory = machine_memory(proc).map_err(|e| e.to_string())?;
    Ok(Reading {
        at: Instant::now(),
        cpu,
        memory,
        containers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_dir(stat: &str, meminfo: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("stat"), stat).unwrap();
        std::fs::write(dir.path().join("meminfo"), meminfo).unwrap();
        dir
    }

    const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:          100000 kB\n\
                           MemAvailable:    6000000 kB\nBuffers:  1 kB\n";

    #[test]
    fn machine_cpu_sums_busy_ticks_and_counts_cpus() {
        let dir = proc_dir(
            "cpu  100 5 50 1000 20 3 2 0 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n\
             cpu1 50 3 25 500 10 2 1 0 0 0\nintr 1 2 3\nctxt 99\n",
            MEMINFO,
        );
        let cpu = machine_cpu(dir.path()).unwrap();
        assert_eq!(
            cpu,
            MachineCpu {
                busy: 100 + 5 + 50 + 3 + 2,
                total: 100 + 5 + 50 + 1000 + 20 + 3 + 2,
                cpus: 2
            }
        );
    }

    #[test]
    fn machine_memory_reads_total_and_available() {
        let dir = proc_dir("cpu 1 1 1 1\n", MEMINFO);
        let memory = machine_memory(dir.path()).unwrap();
        assert_eq!(memory.total, 8_000_000 * 1024);
        assert_eq!(memory.available, 6_000_000 * 1024);
        // Without MemAvailable, MemFree stands in.
        let dir = proc_dir("cpu 1 1 1 1\n", "MemTotal: 100 kB\nMemFree: 40 kB\n");
        assert_eq!(machine_memory(dir.path()).unwrap().available, 40 * 1024);
    }

    #[test]
    fn unreadable_or_malformed_files_name_the_file() {
        let dir = proc_dir("intr 1\n", "Buffers: 1 kB\n");
        let err = machine_cpu(dir.path()).unwrap_err().to_string();
        assert!(err.contains("stat") && err.contains("no cpu line"), "{err}");
        let err = machine_memory(dir.path()).unwrap_err().to_string();
        assert!(err.contains("meminfo") && err.contains("MemTotal"), "{err}");
        let missing = dir.path().join("nothing");
        let err = machine_cpu(&missing).unwrap_err().to_string();
        assert!(err.contains("reading") && err.contains("nothing"), "{err}");
    }

    #[test]
    fn rates_over_the_window() {
        let before = MachineCpu {
            busy: 1000,
            total: 4000,
            cpus: 4,
        };
        // 2 of 4 CPUs busy over the window.
        let after = MachineCpu {
            busy: 1200,
            total: 4400,
            cpus: 4,
        };
        assert!((machine_cores(before, after) - 2.0).abs() < 1e-9);
        assert_eq!(machine_cores(before, before), 0.0);
        let window = Duration::from_millis(250);
        assert!((cgroup_cores(0, 125_000_000, window) - 0.5).abs() < 1e-9);
        // A counter that went backwards (a new container under the same id) counts as zero.
        assert_eq!(cgroup_cores(500, 100, window), 0.0);
        assert_eq!(cgroup_cores(0, 100, Duration::ZERO), 0.0);
    }
}
