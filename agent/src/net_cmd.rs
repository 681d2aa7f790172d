//! `gantry-agent cleanup` (also `gantry-agent network cleanup`): what the agent does at start,
//! for an agent that will not start again (a node being retired, `gantry down`, a test tearing
//! down). Refuses while an agent runs on the data dir (the runtime's lock).
//! - Detaches, with CNI DEL, every network attachment whose container no longer runs.
//! - Releases the root filesystem of every container the runtime no longer holds.
//! - With no container left: removes the node-wide masquerade and forward rules of the default
//!   network's bridge, and unmounts the state tmpfs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use gantry_agent::daemon::net::{Net, NetConfig};
use gantry_agent::image::ImageStore;
use gantry_agent::runtime::{BuiltinRuntime, ContainerState, Runtime, RuntimeConfig};

/// Options of `gantry-agent network`.
#[derive(Parser, Debug)]
#[command(name = "gantry-agent network", about = "the agent's container network")]
pub struct NetworkCmd {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// The same as `gantry-agent cleanup`.
    Cleanup(CleanupArgs),
}

/// `gantry-agent cleanup`.
#[derive(Parser, Debug)]
#[command(
    name = "gantry-agent cleanup",
    about = "clean up after an agent that will not start again: network attachments and root \
             filesystems of containers that are gone; with none left, the node's rules and the \
             state tmpfs"
)]
pub struct CleanupArgs {
    /// The agent's data directory.
    #[arg(
        long,
        default_value = "/var/lib/gantry/agent",
        env = "GANTRY_AGENT_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// The conflist the agent was given with --cni-conf, if any.
    #[arg(long)]
    cni_conf: Option<PathBuf>,
    /// The plugin directories the agent was given with --cni-bin-dir, if any.
    #[arg(long, value_delimiter = ',')]
    cni_bin_dir: Vec<PathBuf>,
    /// The bridge the agent was given with --cni-bridge.
    #[arg(long, default_value = gantry_agent::network::DEFAULT_BRIDGE)]
    cni_bridge: String,
}

/// Runs `gantry-agent network …`.
pub async fn main(opts: NetworkCmd) -> Result<()> {
    let Cmd::Cleanup(args) = opts.cmd;
    cleanup(args).await
}

/// Runs `gantry-agent cleanup`.
pub async fn cleanup(args: CleanupArgs) -> Result<()> {
    let CleanupArgs {
        data_dir,
        cni_conf,
        cni_bin_dir,
        cni_bridge,
    } = args;
    let shim = std::env::current_exe().context("finding the agent binary")?;
    let config = RuntimeConfig::new(&data_dir.join("runtime"), &shim, None)?;
    let runtime = BuiltinRuntime::open(config)
        .context("opening the runtime (is an agent running on this data dir?)")?;
    let running: std::collections::HashSet<String> = runtime
        .list()
        .await
        .context("listing containers")?
        .into_iter()
        .filter(|c| !matches!(c.state, ContainerState::Stopped(_)))
        .map(|c| c.id)
        .collect();
    let (_updates, rx) = tokio::sync::watch::channel(None);
    let default_network = cni_conf.is_none();
    let config = NetConfig {
        conflist: cni_conf,
        plugin_dirs: cni_bin_dir,
        ..NetConfig::default()
    };
    let net = Net::open(config, &data_dir, "", rx).await;
    net.cleanup(&running).await;
    let images = data_dir.join("images");
    if images.exists() {
        let images = ImageStore::open(images).context("opening the image store")?;
        gantry_agent::daemon::release_orphan_rootfs(&runtime, &images).await;
    }
    if default_network && running.is_empty() {
        gantry_agent::network::rules::remove(&cni_bridge)
            .await
            .context("removing the node's masquerade and forward rules")?;
    }
    runtime
        .release_state_tmpfs()
        .context("unmounting the state tmpfs")?;
    Ok(())
}
