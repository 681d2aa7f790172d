//! `gantry-agent run …`: the flags of the node agent daemon, turned into a
//! [`gantry_agent::daemon::Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use gantry::quantity::{Bytes, Cpu};
use gantry_agent::daemon::session::Dial;
use gantry_agent::daemon::{self, Config};
use gantry_agent::image::PullOptions;
use tokio::sync::watch;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Options of `gantry-agent run`.
#[derive(Parser, Debug)]
#[command(name = "gantry-agent run", about = "run the node agent")]
pub struct Run {
    /// Scheduler addresses, comma-separated (`http://host:7700`; `https://` for TLS).
    #[arg(
        long,
        env = "GANTRY_SCHEDULER",
        default_value = "http://127.0.0.1:7700",
        value_delimiter = ','
    )]
    scheduler: Vec<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Node labels, `key=value`, repeatable or comma-separated.
    #[arg(long = "label", short = 'l', value_delimiter = ',')]
    labels: Vec<String>,
    /// Address other nodes and the scheduler reach this node at.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    /// Data directory (runtime state, images, instance statuses).
    #[arg(
        long,
        default_value = "/var/lib/gantry/agent",
        env = "GANTRY_AGENT_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Parent cgroup for containers (default: a `gantry` child of the agent's own cgroup).
    #[arg(long)]
    cgroup_parent: Option<PathBuf>,
    /// CPU kept for the system, not offered to instances (`500m`, `1`).
    #[arg(long, default_value = "0")]
    reserve_cpu: Cpu,
    /// Memory kept for the system (`256Mi`).
    #[arg(long, default_value = "0")]
    reserve_memory: Bytes,
    /// Pids kept for the system.
    #[arg(long, default_value_t = 0)]
    reserve_pids: u32,
    /// CA certificate (PEM) that signed the scheduler's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client key (PEM) for mTLS; needs --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Registries reached over plain HTTP (besides localhost), comma-separated `host:port`.
    #[arg(long, value_delimiter = ',')]
    insecure_registry: Vec<String>,
    /// Docker-style config.json with registry credentials.
    #[arg(long)]
    registry_config: Option<PathBuf>,
    /// Layers downloaded at once.
    #[arg(long, default_value_t = 3)]
    max_concurrent_downloads: usize,
    /// Periodic reconcile interval, in seconds.
    #[arg(long, default_value_t = 30)]
    resync_secs: u64,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn main(run: Run) -> Result<()> {
    let config = config(run)?;
    let (stop, shutdown) = watch::channel(false);
    let agent = tokio::spawn(daemon::run(config, shutdown));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = stop.send(true);
    agent.await.context("the agent task failed")?
}

fn config(run: Run) -> Result<Config> {
    let name = match run.name {
        Some(name) => name,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name; give --name")?
            .trim()
            .to_owned(),
    };
    let mut labels = BTreeMap::new();
    for label in &run.labels {
        let Some((key, value)) = label.split_once('=') else {
            bail!("--label {label:?}: expected key=value");
        };
        labels.insert(key.to_owned(), value.to_owned());
    }
    let tls = if run.ca.is_some() || run.cert.is_some() {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &run.ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading --ca {ca:?}"))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let (Some(cert), Some(key)) = (&run.cert, &run.key) {
            let cert = std::fs::read(cert).with_context(|| format!("reading --cert {cert:?}"))?;
            let key = std::fs::read(key).with_context(|| format!("reading --key {key:?}"))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Some(tls)
    } else {
        None
    };
    Ok(Config {
        name,
        labels,
        dial: Dial {
            schedulers: run.scheduler,
            tls,
        },
        address: run.address,
        data_dir: run.data_dir,
        cgroup_parent: run.cgroup_parent,
        reserved: (
            run.reserve_cpu.millis(),
            run.reserve_memory.get(),
            run.reserve_pids,
        ),
        pull: PullOptions {
            docker_config: run.registry_config,
            insecure_registries: run.insecure_registry,
            max_concurrent_downloads: run.max_concurrent_downloads,
            ..PullOptions::default()
        },
        resync: Duration::from_secs(run.resync_secs.max(1)),
    })
}
