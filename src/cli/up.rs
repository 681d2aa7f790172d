//! `gantry up` / `gantry down`: a single-machine cluster — gantry-scheduler and one
//! gantry-agent as background processes, with their state, logs and pid files under one data
//! directory:
//!
//! ```text
//! D/scheduler/                 the scheduler's embedded store (unless --etcd)
//! D/agent/                     the agent's data dir (runtime/, images/, instances/)
//! D/logs/{scheduler,agent}.log their output
//! D/run/{scheduler,agent}.pid  their pids
//! D/run/address, D/run/node    where the API listens, the node's name (for `down`)
//! ```
//!
//! A pid file is trusted only while `/proc/PID/cmdline` is the daemon `up` started on this data
//! directory, so a stale file (reboot, kill -9, a reused pid) is replaced, and `down` never
//! signals a process it did not start. Both verbs are idempotent.

use std::ffi::OsString;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use gantry::client::{self, Client, Settings};
use gantry::pb;
use tonic::Code;

use super::error::{self, UsageError};
use super::{Ctx, print};

/// The data directory `up` and `down` use when given none.
const DEFAULT_DATA_DIR: &str = "/var/lib/gantry";
/// How long `up` waits for the node to be Ready, and `down` for the containers to stop,
/// unless --timeout says otherwise.
const DEFAULT_WAIT: Duration = Duration::from_secs(90);
/// How long a daemon has between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Polling interval while waiting.
const POLL: Duration = Duration::from_millis(200);

/// `gantry up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory of the cluster's state, logs and pid files.
    #[arg(long, default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// etcd endpoints, comma-separated; without them the scheduler keeps its state in an
    /// embedded store under DIR/scheduler.
    #[arg(long, value_delimiter = ',', value_name = "URLS")]
    pub etcd: Vec<String>,
    /// Address of the scheduler's API.
    #[arg(long, default_value = "127.0.0.1:7700", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Address of the scheduler's /metrics, /healthz and /readyz ("" to turn off).
    #[arg(long, default_value = "127.0.0.1:7701", value_name = "ADDR")]
    pub metrics_listen: String,
    /// Node name of the agent (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Agents to start; only 1 is supported yet.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nodes: u32,
}

/// `gantry down`.
#[derive(Args, Debug)]
pub struct DownArgs {
    /// Directory `gantry up` used.
    #[arg(long, default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Stop only the daemons: keep the workloads and leave their containers running (a later
    /// `gantry up` adopts them).
    #[arg(long)]
    pub keep: bool,
}

/// One of the two daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Scheduler,
    Agent,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Daemon::Scheduler => "scheduler",
            Daemon::Agent => "agent",
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Daemon::Scheduler => "gantry-scheduler",
            Daemon::Agent => "gantry-agent",
        }
    }
}

/// Where everything of one local cluster lives.
#[derive(Debug, Clone)]
struct Layout {
    data: PathBuf,
}

impl Layout {
    fn new(data: &Path) -> anyhow::Result<Self> {
        let data = std::path::absolute(data)
            .with_context(|| format!("resolving the data directory {}", data.display()))?;
        Ok(Layout { data })
    }

    fn dir(&self, daemon: Daemon) -> PathBuf {
        self.data.join(daemon.name())
    }

    fn log(&self, daemon: Daemon) -> PathBuf {
        self.data
            .join("logs")
            .join(format!("{}.log", daemon.name()))
    }

    fn pid_file(&self, daemon: Daemon) -> PathBuf {
        self.data.join("run").join(format!("{}.pid", daemon.name()))
    }

    fn address_file(&self) -> PathBuf {
        self.data.join("run").join("address")
    }

    fn node_file(&self) -> PathBuf {
        self.data.join("run").join("node")
    }

    fn containers_dir(&self) -> PathBuf {
        self.dir(Daemon::Agent).join("runtime").join("containers")
    }

    /// Whether a command line is `daemon` as `up` starts it on this data directory.
    fn matches(&self, daemon: Daemon, cmdline: &[OsString]) -> bool {
        let Some(program) = cmdline.first() else {
            return false;
        };
        if Path::new(program).file_name() != Some(daemon.binary().as_ref()) {
            return false;
        }
        if daemon == Daemon::Agent && cmdline.get(1).is_none_or(|a| a != "run") {
            return false;
        }
        let dir = self.dir(daemon);
        cmdline
            .windows(2)
            .any(|w| w[0] == "--data-dir" && Path::new(&w[1]) == dir)
    }

    /// The pid of `daemon` if its pid file names a live process that is this daemon.
    fn running(&self, daemon: Daemon) -> Option<u32> {
        let text = fs::read_to_string(self.pid_file(daemon)).ok()?;
        let pid: u32 = text.trim().parse().ok()?;
        self.is(daemon, pid).then_some(pid)
    }

    /// Whether `pid` is `daemon` on this data directory (a zombie's command line is empty).
    fn is(&self, daemon: Daemon, pid: u32) -> bool {
        cmdline(pid).is_some_and(|args| self.matches(daemon, &args))
    }

    /// Names of the containers the agent's runtime holds.
    fn containers(&self) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(self.containers_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|name| !name.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }
}

/// The arguments of a process, from /proc.
fn cmdline(pid: u32) -> Option<Vec<OsString>> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| std::ffi::OsStr::from_bytes(a).to_os_string())
            .collect(),
    )
}

/// The daemon binary: next to this `gantry`, else on PATH.
fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe() {
        let beside = exe.with_file_name(name);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    on_path(name).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot find {name} next to this gantry binary or on PATH; build it with \
             `cargo build --release --workspace --bins`"
        )
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The URL the CLI and the agent dial for a listen address (a wildcard becomes loopback).
fn dial_address(listen: SocketAddr) -> String {
    let ip = listen.ip();
    let host = if ip.is_unspecified() {
        if ip.is_ipv4() {
            "127.0.0.1".to_string()
        } else {
            "[::1]".to_string()
        }
    } else if ip.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    format!("http://{host}:{}", listen.port())
}

/// Starts `binary args…` in a session of its own (so it outlives this CLI and its terminal),
/// with its output appended to `log`, and writes its pid file.
fn spawn(
    layout: &Layout,
    daemon: Daemon,
    args: &[OsString],
    env_remove: &[&str],
) -> anyhow::Result<Child> {
    let binary = find_binary(daemon.binary())?;
    let log_path = layout.log(daemon);
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let err_log = log
        .try_clone()
        .with_context(|| format!("opening {}", log_path.display()))?;
    // `setsid PROGRAM` execs PROGRAM in a new session (no fork: our child is not a process
    // group leader), so the pid stays the daemon's. Without util-linux, a process group of its
    // own keeps it away from the terminal's signals.
    let mut command = match on_path("setsid") {
        Some(setsid) => {
            let mut command = Command::new(setsid);
            command.arg(&binary);
            command
        }
        None => {
            use std::os::unix::process::CommandExt;
            let mut command = Command::new(&binary);
            command.process_group(0);
            command
        }
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log);
    for var in env_remove {
        command.env_remove(var);
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let pid_file = layout.pid_file(daemon);
    fs::write(&pid_file, format!("{}\n", child.id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    Ok(child)
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(15)..];
    format!("last lines of {}:\n  {}", path.display(), tail.join("\n  "))
}

fn host_name() -> anyhow::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name; give --name")?
        .trim()
        .to_owned())
}

async fn connect(address: &str) -> Result<Client, client::Error> {
    let settings = Settings {
        address: address.to_string(),
        ca: None,
        cert: None,
        key: None,
        token: None,
        timeout: Duration::from_secs(5),
    };
    client::connect(&settings).await
}

/// `gantry up`.
pub async fn up(ctx: &mut Ctx, args: UpArgs) -> anyhow::Result<()> {
    if args.nodes != 1 {
        return Err(UsageError(format!(
            "--nodes {}: only a single-node cluster is supported yet (--nodes 1); a cluster of \
             several agents in network namespaces is not supported yet",
            args.nodes
        ))
        .into());
    }
    let layout = Layout::new(&args.data_dir)?;
    for dir in [
        layout.dir(Daemon::Scheduler),
        layout.dir(Daemon::Agent),
        layout.data.join("logs"),
        layout.data.join("run"),
    ] {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let wait = ctx.timeout_flag.unwrap_or(DEFAULT_WAIT);
    let deadline = Instant::now() + wait;

    let mut children: Vec<(Daemon, Child)> = Vec::new();
    let mut notes = Vec::new();
    let address = match layout.running(Daemon::Scheduler) {
        Some(pid) => {
            notes.push(format!("scheduler already running (pid {pid})"));
            fs::read_to_string(layout.address_file())
                .map(|a| a.trim().to_string())
                .unwrap_or_else(|_| dial_address(args.listen))
        }
        None => {
            let mut argv: Vec<OsString> = vec![
                "--listen".into(),
                args.listen.to_string().into(),
                "--metrics-listen".into(),
                args.metrics_listen.clone().into(),
                "--data-dir".into(),
                layout.dir(Daemon::Scheduler).into(),
            ];
            if !args.etcd.is_empty() {
                argv.push("--etcd".into());
                argv.push(args.etcd.join(",").into());
            }
            let child = spawn(&layout, Daemon::Scheduler, &argv, &["GANTRY_ETCD"])?;
            notes.push(format!("scheduler started (pid {})", child.id()));
            children.push((Daemon::Scheduler, child));
            let address = dial_address(args.listen);
            fs::write(layout.address_file(), format!("{address}\n"))
                .with_context(|| format!("writing {}", layout.address_file().display()))?;
            address
        }
    };
    let node = match (layout.running(Daemon::Agent), &args.name) {
        (Some(pid), _) => {
            notes.push(format!("agent already running (pid {pid})"));
            match fs::read_to_string(layout.node_file()) {
                Ok(name) => name.trim().to_string(),
                Err(_) => host_name()?,
            }
        }
        (None, name) => {
            let name = match name {
                Some(name) => name.clone(),
                None => host_name()?,
            };
            let argv: Vec<OsString> = vec![
                "run".into(),
                "--scheduler".into(),
                address.clone().into(),
                "--name".into(),
                name.clone().into(),
                "--data-dir".into(),
                layout.dir(Daemon::Agent).into(),
            ];
            let child = spawn(&layout, Daemon::Agent, &argv, &[])?;
            notes.push(format!("agent started (pid {})", child.id()));
            children.push((Daemon::Agent, child));
            fs::write(layout.node_file(), format!("{name}\n"))
                .with_context(|| format!("writing {}", layout.node_file().display()))?;
            name
        }
    };
    print(&format!("{}\n", notes.join("; ")))?;

    // Ready when the API answers and the agent's node is Ready; a daemon that exits early is
    // reported with its log rather than waited for.
    loop {
        for (daemon, child) in &mut children {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "gantry-{} exited ({status}) while starting; {}",
                    daemon.name(),
                    log_tail(&layout.log(*daemon))
                );
            }
        }
        if let Ok(client) = connect(&address).await {
            let request = client.request(pb::GetNodeRequest { name: node.clone() });
            if let Ok(found) = client.nodes().get(request).await
                && found.get_ref().readiness() == pb::NodeReadiness::Ready
            {
                break;
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "node {node} was not Ready within {wait:?} (the scheduler at {address}); see {} and {}",
                layout.log(Daemon::Scheduler).display(),
                layout.log(Daemon::Agent).display()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let export = if address == client::DEFAULT_ADDRESS {
        String::new()
    } else {
        format!("  export GANTRY_ADDR={address}\n")
    };
    print(&format!(
        "gantry is up: the scheduler answers at {address}, node {node} is Ready\n\
         logs: {}, {}\n\n\
         {export}  gantry get nodes\n  gantry run -d --name hello IMAGE -- CMD ARGS\n  \
         gantry get instances\n  gantry down{}\n",
        layout.log(Daemon::Scheduler).display(),
        layout.log(Daemon::Agent).display(),
        if layout.data == Path::new(DEFAULT_DATA_DIR) {
            String::new()
        } else {
            format!(" --data-dir {}", layout.data.display())
        },
    ))
}

/// `gantry down`.
pub async fn down(ctx: &mut Ctx, args: DownArgs) -> anyhow::Result<()> {
    let layout = Layout::new(&args.data_dir)?;
    let scheduler = layout.running(Daemon::Scheduler);
    let agent = layout.running(Daemon::Agent);
    let wait = ctx.timeout_flag.unwrap_or(DEFAULT_WAIT);
    if !args.keep {
        match scheduler {
            Some(_) => remove_workloads(&layout, agent.is_some(), wait).await?,
            None if !layout.containers().is_empty() => print(
                "the scheduler is not running: workloads not deleted; leftover containers are removed below\n",
            )?,
            None => {}
        }
    }
    let mut stopped = Vec::new();
    for (daemon, pid) in [(Daemon::Agent, agent), (Daemon::Scheduler, scheduler)] {
        if let Some(pid) = pid {
            stop(&layout, daemon, pid).await?;
            stopped.push(format!("{} (pid {pid})", daemon.name()));
        }
        // Gone, or stale: either way the file no longer names a daemon.
        let _ = fs::remove_file(layout.pid_file(daemon));
    }
    if !args.keep {
        let left = layout.containers();
        if !left.is_empty() {
            remove_containers(&layout, &left)?;
        }
    }
    if stopped.is_empty() {
        print(&format!(
            "gantry is not running on {}\n",
            layout.data.display()
        ))
    } else {
        print(&format!("stopped {}\n", stopped.join(", ")))
    }
}

/// Deletes every workload, then waits until no instance is left on the node and (while the
/// agent runs) its runtime holds no container.
async fn remove_workloads(
    layout: &Layout,
    agent_running: bool,
    wait: Duration,
) -> anyhow::Result<()> {
    let address = fs::read_to_string(layout.address_file())
        .map(|a| a.trim().to_string())
        .unwrap_or_else(|_| client::DEFAULT_ADDRESS.to_string());
    let node = fs::read_to_string(layout.node_file())
        .map(|n| n.trim().to_string())
        .unwrap_or_default();
    let client = connect(&address).await?;
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = client.request(pb::ListWorkloadsRequest {
            label_selector: String::new(),
            kind: 0,
            page_size: 0,
            page_token: page_token.clone(),
        });
        let page = client
            .workloads()
            .list(request)
            .await
            .map_err(|s| error::api(s, client.address()))?
            .into_inner();
        names.extend(
            page.workloads
                .into_iter()
                .filter_map(|w| w.spec.map(|s| s.name)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    for name in &names {
        let request = client.request(pb::DeleteWorkloadRequest {
            name: name.clone(),
            expected_revision: None,
        });
        match client.workloads().delete(request).await {
            Ok(_) => print(&format!("workload/{name} deleted\n"))?,
            Err(status) if status.code() == Code::NotFound => {}
            Err(status) => return Err(error::api(status, client.address())),
        }
    }
    let deadline = Instant::now() + wait;
    loop {
        let request = client.request(pb::ListInstancesRequest {
            workload: String::new(),
            node: node.clone(),
            label_selector: String::new(),
            states: Vec::new(),
            page_size: 1,
            page_token: String::new(),
        });
        let instances = client
            .instances()
            .list(request)
            .await
            .map_err(|s| error::api(s, client.address()))?
            .into_inner()
            .instances
            .len();
        let containers = if agent_running {
            layout.containers().len()
        } else {
            0
        };
        if instances == 0 && containers == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            print(&format!(
                "{instances} instance(s) and {containers} container(s) still there after {wait:?}; stopping anyway\n"
            ))?;
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sends `signal` to `pid` through the shell's `kill` builtin (this crate has no unsafe code).
fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    Command::new("sh")
        .args(["-c", "kill -s \"$1\" \"$2\" 2>/dev/null || true", "sh"])
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .with_context(|| format!("sending SIG{signal} to {pid}"))?;
    Ok(())
}

/// SIGTERM, up to [`STOP_GRACE`] for it to exit, then SIGKILL.
async fn stop(layout: &Layout, daemon: Daemon, pid: u32) -> anyhow::Result<()> {
    signal(pid, "TERM")?;
    let deadline = Instant::now() + STOP_GRACE;
    while layout.is(daemon, pid) {
        if Instant::now() >= deadline {
            print(&format!(
                "{} (pid {pid}) did not stop within {STOP_GRACE:?}; killing it\n",
                daemon.name()
            ))?;
            signal(pid, "KILL")?;
            let killed = Instant::now();
            while layout.is(daemon, pid) {
                if killed.elapsed() > Duration::from_secs(5) {
                    bail!("{} (pid {pid}) survived SIGKILL", daemon.name());
                }
                tokio::time::sleep(POLL).await;
            }
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Removes containers the agent did not stop (with the agent down, through its runtime).
fn remove_containers(layout: &Layout, ids: &[String]) -> anyhow::Result<()> {
    print(&format!(
        "removing {} container(s) left behind: {}\n",
        ids.len(),
        ids.join(", ")
    ))?;
    let status = Command::new(find_binary(Daemon::Agent.binary())?)
        .arg("ctr")
        .arg("--root")
        .arg(layout.dir(Daemon::Agent).join("runtime"))
        .args(["rm", "--force"])
        .args(ids)
        .status()
        .context("running gantry-agent ctr rm")?;
    if !status.success() {
        bail!(
            "gantry-agent ctr rm --force failed ({status}); containers may be left in {}",
            layout.containers_dir().display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn pid_files_are_trusted_only_for_our_daemons() {
        let layout = Layout::new(Path::new("/d")).unwrap();
        let s = Daemon::Scheduler;
        let a = Daemon::Agent;
        assert!(layout.matches(
            s,
            &args(&[
                "/x/gantry-scheduler",
                "--listen",
                "l",
                "--data-dir",
                "/d/scheduler"
            ])
        ));
        assert!(!layout.matches(
            s,
            &args(&["/x/gantry-scheduler", "--data-dir", "/e/scheduler"])
        ));
        assert!(!layout.matches(s, &args(&["/bin/sleep", "--data-dir", "/d/scheduler"])));
        assert!(layout.matches(a, &args(&["gantry-agent", "run", "--data-dir", "/d/agent"])));
        assert!(!layout.matches(
            a,
            &args(&["gantry-agent", "shim", "--data-dir", "/d/agent"])
        ));
        assert!(!layout.matches(
            a,
            &args(&["gantry-agent", "run", "--data-dir", "/d/scheduler"])
        ));
        assert!(!layout.matches(a, &[]));
    }

    #[test]
    fn wildcard_listen_addresses_are_dialled_on_loopback() {
        assert_eq!(
            dial_address("0.0.0.0:7700".parse().unwrap()),
            "http://127.0.0.1:7700"
        );
        assert_eq!(
            dial_address("10.0.0.1:80".parse().unwrap()),
            "http://10.0.0.1:80"
        );
        assert_eq!(
            dial_address("[::]:7700".parse().unwrap()),
            "http://[::1]:7700"
        );
    }
}
