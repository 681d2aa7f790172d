//! The `gantry` command line: global options, the verbs, and what they share (the connection,
//! colour). One module per verb group; printing lives in [`output`] and [`view`], errors and
//! exit codes in [`error`].
//!
//! | module | verbs |
//! |---|---|
//! | `apply.rs` | `apply -f`, `delete` |
//! | `get.rs` | `get workloads|instances|nodes|events [NAME] [-w]` |
//! | `describe.rs` | `describe workload|instance|node NAME` |
//! | `rollout.rs` | `scale`, `rollout status|history|undo` |
//! | `node.rs` | `node ls|cordon|uncordon|drain` |
//! | `events.rs` | `events [-w]`, and following the Events stream for the others |
//! | `run.rs` | `run IMAGE [-- CMD ARGS…]` (attached: logs streamed, exit code returned) |
//! | `logs.rs` | `logs NAME|INSTANCE [-f]`: output relayed from the node |
//! | `exec.rs` | `exec [-i] [-t] INSTANCE -- CMD…`: a command relayed to the node |
//! | `up.rs` | `up`, `down`: a local cluster as background processes |
//! | `top.rs` | `top nodes|instances`: CPU and memory in use, measured by the agents |
//! | `image.rs` | `image ls|rm|prune`: the nodes' images, through the scheduler |

pub mod apply;
pub mod describe;
pub mod error;
pub mod events;
pub mod exec;
pub mod get;
pub mod image;
pub mod logs;
pub mod node;
pub mod output;
pub mod rollout;
pub mod run;
pub mod top;
pub mod up;
pub mod view;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gantry::client::{self, Client, FileConfig, Settings};

/// Gantry: containers on a fleet of Linux machines.
///
/// The cluster commands talk to gantry-scheduler's API at --addr (or GANTRY_ADDR, or `address`
/// in the config file; default http://127.0.0.1:7700). Exit codes: 0 ok, 1 error, 2 usage.
#[derive(Parser, Debug)]
#[command(name = "gantry", version, about, propagate_version = true)]
pub struct Cli {
    /// Scheduler address (http://HOST:PORT or https://HOST:PORT).
    #[arg(long, global = true, env = "GANTRY_ADDR", value_name = "URL")]
    pub addr: Option<String>,
    /// Config file (YAML: address, ca, cert, key, token). Default: GANTRY_CONFIG, then
    /// ~/.config/gantry/config.yaml, then /etc/gantry/config.yaml.
    #[arg(long, global = true, env = "GANTRY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// How long one request may take (default 30s); for `rollout status`, how long to wait
    /// for the rollout (default: until it ends). Watches are not limited.
    #[arg(long, global = true, value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create or update workloads from files (YAML or JSON, several documents each).
    Apply(apply::ApplyArgs),
    /// List workloads, instances, nodes or events, or show one.
    Get(get::GetArgs),
    /// Show a workload, instance or node in detail, with its recent events.
    Describe(describe::DescribeArgs),
    /// Delete workloads by name or from files.
    Delete(apply::DeleteArgs),
    /// Set the replica count of a Service.
    Scale(rollout::ScaleArgs),
    /// Follow, list or undo the rollouts of a workload.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// List, cordon, uncordon and drain nodes.
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Show the cluster's events (notices), and follow them with -w.
    Events(events::EventsArgs),
    /// Run an image: attached (output streamed, its exit code returned) or as a Service (-d).
    Run(run::RunArgs),
    /// Show the output of an instance, or of a workload's instances.
    Logs(logs::LogsArgs),
    /// Run a command in a running instance.
    Exec(exec::ExecArgs),
    /// Show CPU and memory in use by nodes or instances.
    #[command(subcommand)]
    Top(top::TopCommand),
    /// List, remove or prune the images on the nodes.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Start a single-machine cluster (scheduler and agent) in the background.
    Up(up::UpArgs),
    /// Stop the cluster `gantry up` started (and its containers, unless --keep).
    Down(up::DownArgs),
}

/// `30s`, `1m30s`, `250ms`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    text.parse::<gantry::duration::Duration>()
        .map(Duration::from)
        .map_err(|e| e.to_string())
}

/// What every verb shares: how to reach the scheduler, and how to print.
#[derive(Debug)]
pub struct Ctx {
    settings: Settings,
    client: Option<Client>,
    /// `--timeout` as given (`None`: the default applies).
    pub timeout_flag: Option<Duration>,
    /// Whether stdout gets colour.
    pub color: bool,
}

impl Ctx {
    /// The context of a parsed command line: reads the config file.
    pub fn new(cli: &Cli) -> anyhow::Result<Self> {
        let file = match &cli.config {
            Some(path) => FileConfig::load(path)?,
            None => match FileConfig::default_path() {
                Some(path) => FileConfig::load(&path)?,
                None => FileConfig::default(),
            },
        };
        let timeout = cli.timeout.unwrap_or(client::DEFAULT_TIMEOUT);
        Ok(Ctx {
            settings: Settings::resolve(cli.addr.clone(), file, timeout),
            client: None,
            timeout_flag: cli.timeout,
            color: output::stdout_color(),
        })
    }

    /// The connection to the scheduler, made on first use.
    pub async fn client(&mut self) -> anyhow::Result<Client> {
        if let Some(client) = &self.client {
            return Ok(client.clone());
        }
        let client = client::connect(&self.settings).await?;
        self.client = Some(client.clone());
        Ok(client)
    }
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut ctx = Ctx::new(&cli).context("reading the configuration")?;
    match cli.command {
        Command::Apply(args) => apply::apply(&mut ctx, args).await,
        Command::Get(args) => get::get(&mut ctx, args).await,
        Command::Describe(args) => describe::describe(&mut ctx, args).await,
        Command::Delete(args) => apply::delete(&mut ctx, args).await,
        Command::Scale(args) => rollout::scale(&mut ctx, args).await,
        Command::Rollout(command) => rollout::rollout(&mut ctx, command).await,
        Command::Node(command) => node::node(&mut ctx, command).await,
        Command::Events(args) => events::events(&mut ctx, args).await,
        Command::Run(args) => run::run(&mut ctx, args).await,
        Command::Logs(args) => logs::logs(&mut ctx, args).await,
        Command::Exec(args) => exec::exec(&mut ctx, args).await,
        Command::Top(command) => top::top(&mut ctx, command).await,
        Command::Image(command) => image::image(&mut ctx, command).await,
        Command::Up(args) => up::up(&mut ctx, args).await,
        Command::Down(args) => up::down(&mut ctx, args).await,
    }
}

/// Writes `text` to stdout. A closed pipe (`gantry get -w … | head`) ends the command
/// quietly, as it would end any Unix filter.
pub fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(i32::from(error::EXIT_OK))
        }
        Err(e) => Err(e).context("writing to stdout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_take_units_or_seconds() {
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
    }
}
