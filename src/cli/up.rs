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
//! With `--nodes N` (N > 1) every node is a "host" of its own: a network namespace made by
//! `deploy/netns-cluster.sh` (embedded in this binary), on a bridge whose address the
//! scheduler listens on. Agent i runs in namespace `PREFIX-i` with `D/agent-i`,
//! `D/logs/agent-i.log`, `D/run/agent-i.pid` and `D/run/node-i`; `D/run/nodes` holds N, so
//! that `down` stops them all and removes the namespaces.
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
    /// Nodes to start. With N > 1 each agent runs in a network namespace of its own ("host"
    /// PREFIX-i, made with deploy/netns-cluster.sh), and the scheduler listens on the hosts'
    /// bridge (NET.1, port of --listen) instead of loopback.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub nodes: u32,
    /// With --nodes N > 1: the hosts' names (PREFIX-1 … PREFIX-N; the bridge is PREFIX-br).
    #[arg(long, default_value = "gantry", value_name = "PREFIX")]
    pub hosts_prefix: String,
    /// With --nodes N > 1: the first three octets of the hosts' /24 (bridge NET.1, host i
    /// NET.(10+i)).
    #[arg(long, default_value = "172.31.250", value_name = "NET")]
    pub hosts_net: String,
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

/// One of the daemons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Scheduler,
    /// `Agent(0)`: the agent of a single-node cluster; `Agent(i)`: node i of `--nodes N`.
    Agent(u32),
}

impl Daemon {
    fn name(self) -> String {
        match self {
            Daemon::Scheduler => "scheduler".to_owned(),
            Daemon::Agent(0) => "agent".to_owned(),
            Daemon::Agent(i) => format!("agent-{i}"),
        }
    }

    fn binary(self) -> &'static str {
        match self {
            Daemon::Scheduler => "gantry-scheduler",
            Daemon::Agent(_) => "gantry-agent",
        }
    }
}

/// The hosts of a `--nodes N` cluster: network namespaces `PREFIX-1` … `PREFIX-N` on a bridge
/// with `NET.1`; host i has `NET.(10+i)`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hosts {
    prefix: String,
    net: String,
    count: u32,
}

/// `deploy/netns-cluster.sh`, run with `sh -s`.
const NETNS_SCRIPT: &str = include_str!("../../deploy/netns-cluster.sh");

impl Hosts {
    fn bridge_address(&self) -> String {
        format!("{}.1", self.net)
    }

    fn name(&self, i: u32) -> String {
        format!("{}-{i}", self.prefix)
    }

    fn address(&self, i: u32) -> String {
        format!("{}.{}", self.net, 10 + i)
    }

    fn netns(&self, i: u32) -> PathBuf {
        Path::new("/run/netns").join(self.name(i))
    }

    /// Runs the script's `up` (unless every namespace is there) or `down`.
    fn script(&self, action: &str) -> anyhow::Result<()> {
        use std::io::Write;
        if action == "up" && (1..=self.count).all(|i| self.netns(i).exists()) {
            return Ok(());
        }
        let mut child = Command::new("sh")
            .args([
                "-s",
                "--",
                action,
                &self.prefix,
                &self.count.to_string(),
                &self.net,
            ])
            .stdin(Stdio::piped())
            .spawn()
            .context("running sh for the network namespaces")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(NETNS_SCRIPT.as_bytes())
                .context("writing the namespace script to sh")?;
        }
        let status = child.wait().context("waiting for the namespace script")?;
        if !status.success() && action == "up" {
            // Leave nothing half made.
            let _ = self.script("down");
            bail!(
                "making the {} host namespaces {}-1…{} on {}.0/24 failed ({status}); is `ip` \
                 (iproute2) installed, and are the names and the network free?",
                self.count,
                self.prefix,
                self.count,
                self.net
            );
        }
        Ok(())
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

    fn node_file(&self, agent: Daemon) -> PathBuf {
        match agent {
            Daemon::Agent(i) if i > 0 => self.data.join("run").join(format!("node-{i}")),
            _ => self.data.join("run").join("node"),
        }
    }

    /// Where `up --nodes N` records its hosts (absent for a single node).
    fn hosts_file(&self) -> PathBuf {
        self.data.join("run").join("hosts")
    }

    /// The hosts of a `--nodes N` cluster on this data directory, if it is one.
    fn hosts(&self) -> Option<Hosts> {
        let text = fs::read_to_string(self.hosts_file()).ok()?;
        let mut words = text.split_whitespace();
        let prefix = words.next()?.to_owned();
        let net = words.next()?.to_owned();
        let count = words.next()?.parse().ok()?;
        Some(Hosts { prefix, net, count })
    }

    /// The agents of the cluster on this data directory.
    fn agents(&self) -> Vec<Daemon> {
        match self.hosts() {
            Some(hosts) => (1..=hosts.count).map(Daemon::Agent).collect(),
            None => vec![Daemon::Agent(0)],
        }
    }

    fn containers_dir(&self, agent: Daemon) -> PathBuf {
        self.dir(agent).join("runtime").join("containers")
    }

    /// Whether a command line is `daemon` as `up` starts it on this data directory.
    fn matches(&self, daemon: Daemon, cmdline: &[OsString]) -> bool {
        let Some(program) = cmdline.first() else {
            return false;
        };
        if Path::new(program).file_name() != Some(daemon.binary().as_ref()) {
            return false;
        }
        if matches!(daemon, Daemon::Agent(_)) && cmdline.get(1).is_none_or(|a| a != "run") {
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

    /// Names of the containers an agent's runtime holds.
    fn containers(&self, agent: Daemon) -> Vec<String> {
        let mut ids: Vec<String> = fs::read_dir(self.containers_dir(agent))
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
/// With `netns`, the daemon runs in that network namespace (through `nsenter`, which execs it).
fn spawn(
    layout: &Layout,
    daemon: Daemon,
    args: &[OsString],
    env_remove: &[&str],
    netns: Option<&Path>,
) -> anyhow::Result<Child> {
    let binary = find_binary(daemon.binary())?;
    let (program, mut args_before): (PathBuf, Vec<OsString>) = match netns {
        Some(netns) => {
            let nsenter = on_path("nsenter").ok_or_else(|| {
                anyhow::anyhow!(
                    "--nodes needs nsenter (util-linux) on PATH to start agents in their hosts"
                )
            })?;
            let mut net = OsString::from("--net=");
            net.push(netns);
            (nsenter, vec![net, binary.clone().into()])
        }
        None => (binary.clone(), Vec::new()),
    };
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
            command.arg(&program);
            command
        }
        None => {
            use std::os::unix::process::CommandExt;
            let mut command = Command::new(&program);
            command.process_group(0);
            command
        }
    };
    args_before.extend(args.iter().cloned());
    command
        .args(&args_before)
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
    if args.nodes == 0 {
        return Err(UsageError("--nodes 0: a cluster needs at least one node".into()).into());
    }
    if args.nodes > 1 && args.name.is_some() {
        return Err(UsageError(
            "--name names the node of a single-node cluster; with --nodes N the nodes are \
             PREFIX-1 … PREFIX-N (--hosts-prefix)"
                .into(),
        )
        .into());
    }
    let layout = Layout::new(&args.data_dir)?;
    let hosts = (args.nodes > 1).then(|| Hosts {
        prefix: args.hosts_prefix.clone(),
        net: args.hosts_net.clone(),
        count: args.nodes,
    });
    let existing = layout.hosts();
    if existing != hosts && layout.running(Daemon::Scheduler).is_some() {
        let shape = match &existing {
            Some(existing) => format!("{} nodes ({}-1…)", existing.count, existing.prefix),
            None => "a single node".to_owned(),
        };
        bail!(
            "{} runs a cluster of {shape}: `gantry down --data-dir {}` first to change its shape",
            layout.data.display(),
            layout.data.display()
        );
    }
    let agents: Vec<Daemon> = match &hosts {
        Some(hosts) => (1..=hosts.count).map(Daemon::Agent).collect(),
        None => vec![Daemon::Agent(0)],
    };
    let mut dirs = vec![
        layout.dir(Daemon::Scheduler),
        layout.data.join("logs"),
        layout.data.join("run"),
    ];
    dirs.extend(agents.iter().map(|a| layout.dir(*a)));
    for dir in dirs {
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The API listens on the hosts' bridge when agents run in namespaces of their own.
    let listen = match &hosts {
        Some(hosts) if args.listen.ip().is_loopback() => {
            let ip: std::net::IpAddr = hosts.bridge_address().parse().map_err(|_| {
                UsageError(format!(
                    "--hosts-net {}: give the first three octets of an IPv4 /24 (such as 172.31.250)",
                    hosts.net
                ))
            })?;
            SocketAddr::new(ip, args.listen.port())
        }
        _ => args.listen,
    };
    match &hosts {
        Some(hosts) => {
            hosts.script("up")?;
            let record = format!("{} {} {}\n", hosts.prefix, hosts.net, hosts.count);
            fs::write(layout.hosts_file(), record)
                .with_context(|| format!("writing {}", layout.hosts_file().display()))?;
        }
        None => {
            let _ = fs::remove_file(layout.hosts_file());
        }
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
                .unwrap_or_else(|_| dial_address(listen))
        }
        None => {
            let mut argv: Vec<OsString> = vec![
                "--listen".into(),
                listen.to_string().into(),
                "--metrics-listen".into(),
                args.metrics_listen.clone().into(),
                "--data-dir".into(),
                layout.dir(Daemon::Scheduler).into(),
            ];
            if !args.etcd.is_empty() {
                argv.push("--etcd".into());
                argv.push(args.etcd.join(",").into());
            }
            let child = spawn(&layout, Daemon::Scheduler, &argv, &["GANTRY_ETCD"], None)?;
            notes.push(format!("scheduler started (pid {})", child.id()));
            children.push((Daemon::Scheduler, child));
            let address = dial_address(listen);
            fs::write(layout.address_file(), format!("{address}\n"))
                .with_context(|| format!("writing {}", layout.address_file().display()))?;
            address
        }
    };
    let mut nodes = Vec::new();
    for &agent in &agents {
        let Daemon::Agent(index) = agent else {
            continue;
        };
        let node = match layout.running(agent) {
            Some(pid) => {
                notes.push(format!("{} already running (pid {pid})", agent.name()));
                match (fs::read_to_string(layout.node_file(agent)), &hosts) {
                    (Ok(name), _) => name.trim().to_string(),
                    (Err(_), Some(hosts)) => hosts.name(index),
                    (Err(_), None) => host_name()?,
                }
            }
            None => {
                let name = match (&hosts, &args.name) {
                    (Some(hosts), _) => hosts.name(index),
                    (None, Some(name)) => name.clone(),
                    (None, None) => host_name()?,
                };
                let mut argv: Vec<OsString> = vec![
                    "run".into(),
                    "--scheduler".into(),
                    address.clone().into(),
                    "--name".into(),
                    name.clone().into(),
                    "--data-dir".into(),
                    layout.dir(agent).into(),
                ];
                let netns = hosts.as_ref().map(|h| h.netns(index));
                if let Some(hosts) = &hosts {
                    argv.push("--address".into());
                    argv.push(hosts.address(index).into());
                }
                let child = spawn(&layout, agent, &argv, &[], netns.as_deref())?;
                notes.push(format!("{} started (pid {})", agent.name(), child.id()));
                children.push((agent, child));
                fs::write(layout.node_file(agent), format!("{name}\n"))
                    .with_context(|| format!("writing {}", layout.node_file(agent).display()))?;
                name
            }
        };
        nodes.push(node);
    }
    print(&format!("{}\n", notes.join("; ")))?;

    // Ready when the API answers and every node is Ready; a daemon that exits early is
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
            let mut ready = 0;
            for node in &nodes {
                let request = client.request(pb::GetNodeRequest { name: node.clone() });
                if let Ok(found) = client.nodes().get(request).await
                    && found.get_ref().readiness() == pb::NodeReadiness::Ready
                {
                    ready += 1;
                }
            }
            if ready == nodes.len() {
                break;
            }
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = agents
                .iter()
                .map(|a| layout.log(*a).display().to_string())
                .collect();
            bail!(
                "node(s) {} not all Ready within {wait:?} (the scheduler at {address}); see {} and {}",
                nodes.join(", "),
                layout.log(Daemon::Scheduler).display(),
                logs.join(", ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let export = if address == client::DEFAULT_ADDRESS {
        String::new()
    } else {
        format!("  export GANTRY_ADDR={address}\n")
    };
    let (are, nodes_text) = match nodes.as_slice() {
        [one] => ("is", format!("node {one}")),
        many => ("are", format!("nodes {}", many.join(", "))),
    };
    let agent_logs: Vec<String> = agents
        .iter()
        .map(|a| layout.log(*a).display().to_string())
        .collect();
    print(&format!(
        "gantry is up: the scheduler answers at {address}, {nodes_text} {are} Ready\n\
         logs: {}, {}\n\n\
         {export}  gantry get nodes\n  gantry run -d --name hello IMAGE -- CMD ARGS\n  \
         gantry get instances\n  gantry down{}\n",
        layout.log(Daemon::Scheduler).display(),
        agent_logs.join(", "),
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
    let agents: Vec<(Daemon, Option<u32>)> = layout
        .agents()
        .into_iter()
        .map(|a| (a, layout.running(a)))
        .collect();
    let wait = ctx.timeout_flag.unwrap_or(DEFAULT_WAIT);
    if !args.keep {
        let any_containers = agents
            .iter()
            .any(|(a, _)| !layout.containers(*a).is_empty());
        match scheduler {
            Some(_) => remove_workloads(&layout, &agents, wait).await?,
            None if any_containers => print(
                "the scheduler is not running: workloads not deleted; leftover containers are removed below\n",
            )?,
            None => {}
        }
    }
    let mut stopped = Vec::new();
    let daemons = agents
        .iter()
        .copied()
        .chain([(Daemon::Scheduler, scheduler)]);
    for (daemon, pid) in daemons {
        if let Some(pid) = pid {
            stop(&layout, daemon, pid).await?;
            stopped.push(format!("{} (pid {pid})", daemon.name()));
        }
        // Gone, or stale: either way the file no longer names a daemon.
        let _ = fs::remove_file(layout.pid_file(daemon));
    }
    if !args.keep {
        let hosts = layout.hosts();
        for (agent, _) in &agents {
            let left = layout.containers(*agent);
            if !left.is_empty() {
                remove_containers(&layout, *agent, &left)?;
            }
            let netns = match (agent, &hosts) {
                (Daemon::Agent(i), Some(hosts)) => Some(hosts.netns(*i)),
                _ => None,
            };
            agent_cleanup(&layout, *agent, netns.as_deref());
        }
        // The hosts go with their agents (kept with --keep: the containers live in them).
        if let Some(hosts) = layout.hosts() {
            hosts.script("down")?;
            let _ = fs::remove_file(layout.hosts_file());
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

/// Cleans up after the stopped agent: detaches what it left attached (its warm network
/// namespaces, attachments of removed containers), releases root filesystems of removed
/// containers and, with no container left, removes its node-wide rules and unmounts its state
/// tmpfs: `gantry-agent cleanup`, in the agent's host namespace when it has one. A failure is reported,
/// not fatal: the next agent on the data dir cleans up the same way.
fn agent_cleanup(layout: &Layout, agent: Daemon, netns: Option<&Path>) {
    let Ok(binary) = find_binary(agent.binary()) else {
        return;
    };
    let mut command = match (netns, on_path("nsenter")) {
        (Some(netns), Some(nsenter)) => {
            let mut command = Command::new(nsenter);
            command
                .arg(format!("--net={}", netns.display()))
                .arg(binary);
            command
        }
        (Some(_), None) => return,
        (None, _) => Command::new(binary),
    };
    let status = command
        .args(["cleanup", "--data-dir"])
        .arg(layout.dir(agent))
        // Only its warnings: what it detached is the agent's business, not the operator's.
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!(
            "warning: the clean-up after {} failed; the next agent on {} retries it",
            agent.name(),
            layout.dir(agent).display()
        );
    }
}

/// Deletes every workload, then waits until no instance is left on the node and (while the
/// agent runs) its runtime holds no container.
async fn remove_workloads(
    layout: &Layout,
    agents: &[(Daemon, Option<u32>)],
    wait: Duration,
) -> anyhow::Result<()> {
    let address = fs::read_to_string(layout.address_file())
        .map(|a| a.trim().to_string())
        .unwrap_or_else(|_| client::DEFAULT_ADDRESS.to_string());
    let nodes: Vec<String> = agents
        .iter()
        .filter_map(|(agent, _)| fs::read_to_string(layout.node_file(*agent)).ok())
        .map(|n| n.trim().to_string())
        .collect();
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
        let mut instances = 0;
        for node in &nodes {
            let request = client.request(pb::ListInstancesRequest {
                workload: String::new(),
                node: node.clone(),
                label_selector: String::new(),
                states: Vec::new(),
                page_size: 1,
                page_token: String::new(),
            });
            instances += client
                .instances()
                .list(request)
                .await
                .map_err(|s| error::api(s, client.address()))?
                .into_inner()
                .instances
                .len();
        }
        let containers: usize = agents
            .iter()
            .filter(|(_, pid)| pid.is_some())
            .map(|(agent, _)| layout.containers(*agent).len())
            .sum();
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
fn remove_containers(layout: &Layout, agent: Daemon, ids: &[String]) -> anyhow::Result<()> {
    print(&format!(
        "removing {} container(s) left behind: {}\n",
        ids.len(),
        ids.join(", ")
    ))?;
    let status = Command::new(find_binary(agent.binary())?)
        .arg("ctr")
        .arg("--root")
        .arg(layout.dir(agent).join("runtime"))
        .args(["rm", "--force"])
        .args(ids)
        .status()
        .context("running gantry-agent ctr rm")?;
    if !status.success() {
        bail!(
            "gantry-agent ctr rm --force failed ({status}); containers may be left in {}",
            layout.containers_dir(agent).display()
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
        let a = Daemon::Agent(0);
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
        // Node i of --nodes N has its own data dir.
        let a2 = Daemon::Agent(2);
        assert_eq!(a2.name(), "agent-2");
        assert!(layout.matches(
            a2,
            &args(&["gantry-agent", "run", "--data-dir", "/d/agent-2"])
        ));
        assert!(!layout.matches(
            a2,
            &args(&["gantry-agent", "run", "--data-dir", "/d/agent"])
        ));
        assert_eq!(layout.node_file(a2), Path::new("/d/run/node-2"));
        assert_eq!(layout.node_file(a), Path::new("/d/run/node"));
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
