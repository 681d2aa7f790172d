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
use gantry_agent::image::gc::GcPolicy;
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
    /// Keep container state directories (`<data-dir>/runtime/containers`) on a tmpfs mounted
    /// there, as runc keeps its state in `/run`; logs stay on disk. `false` keeps them on disk.
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    state_tmpfs: bool,
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
    /// Address of /metrics, /healthz and /readyz ("" to turn them off).
    #[arg(long, default_value = daemon::metrics::DEFAULT_LISTEN)]
    metrics_listen: String,
    /// Disk usage (percent of the image store's filesystem) at which unused images are
    /// removed, least recently used first; 100 turns image garbage collection off.
    #[arg(long, default_value_t = 85)]
    image_gc_high_threshold: u8,
    /// Disk usage (percent) image garbage collection brings the filesystem down to.
    #[arg(long, default_value_t = 80)]
    image_gc_low_threshold: u8,
    /// Images younger than this are never collected (`2m`, `1h`).
    #[arg(long, default_value = "2m")]
    image_gc_min_age: gantry::duration::Duration,
    /// How often image garbage collection measures the disk (also soon after a container is
    /// removed).
    #[arg(long, default_value = "5m")]
    image_gc_interval: gantry::duration::Duration,
    /// CNI conflist for containers with the `bridge` network (default: one the agent writes
    /// under the data dir: bridge `gantry0`, host-local addresses from the node subnet, portmap,
    /// firewall). Point it at another network's conflist (Calico, Cilium, Flannel, …) to use it.
    #[arg(long)]
    cni_conf: Option<PathBuf>,
    /// Directory of the CNI plugins (default: `CNI_PATH`, else /usr/lib/cni then /opt/cni/bin);
    /// repeatable or comma-separated.
    #[arg(long, value_delimiter = ',')]
    cni_bin_dir: Vec<PathBuf>,
    /// The node subnet used when the scheduler allocates none (a scheduler without a cluster
    /// network, or a single-node setup); the scheduler's allocation wins when it sends one.
    #[arg(long, default_value = daemon::net::DEFAULT_SUBNET)]
    subnet: String,
    /// Bridge of the default conflist. A bridge carries one node subnet: agents sharing a
    /// network namespace (tests) need one each.
    #[arg(long, default_value = gantry_agent::network::DEFAULT_BRIDGE)]
    cni_bridge: String,
    /// The node's name responder: a DNS server on the bridge gateway address (port 53) that
    /// answers `<workload>.gantry` with the workload's Ready instances and forwards other names
    /// to the host's resolvers; `bridge` containers use it. `--dns=false` turns it off
    /// (containers then get the host's resolvers).
    #[arg(
        long,
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    dns: bool,
    /// Network namespaces kept attached to the default network ahead of need, so that an
    /// instance without published ports starts without waiting for the CNI plugins; 0 turns
    /// it off. Not used with --cni-conf.
    #[arg(long, default_value_t = 2, value_name = "N")]
    network_warm: usize,
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
    let fallback_subnet: ipnet::IpNet = run.subnet.parse().map_err(|_| {
        anyhow::anyhow!(
            "--subnet {:?}: expected a subnet in CIDR notation, such as 10.88.0.0/24",
            run.subnet
        )
    })?;
    if let Some(conf) = &run.cni_conf
        && !conf.is_file()
    {
        bail!(
            "--cni-conf {}: no such file; give the path of a CNI conflist (or leave the flag out \
             for the agent's default network)",
            conf.display()
        );
    }
    let metrics_listen = match run.metrics_listen.trim() {
        "" => None,
        addr => Some(addr.parse().map_err(|_| {
            anyhow::anyhow!(
                "--metrics-listen {addr:?}: expected IP:PORT, such as 127.0.0.1:7702 or \
                 0.0.0.0:7702 (or \"\" to turn the endpoint off)"
            )
        })?),
    };
    let image_gc = image_gc_policy(
        run.image_gc_high_threshold,
        run.image_gc_low_threshold,
        run.image_gc_min_age.get(),
    )?;
    if run.image_gc_interval.is_zero() {
        bail!("--image-gc-interval 0: give a period such as 5m");
    }
    if run.cni_bridge.is_empty()
        || run.cni_bridge.len() > 15
        || !run
            .cni_bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!(
            "--cni-bridge {:?}: an interface name is 1 to 15 letters, digits, '-', '_' or '.'",
            run.cni_bridge
        );
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
        state_tmpfs: run.state_tmpfs,
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
        metrics_listen,
        image_gc,
        image_gc_interval: run.image_gc_interval.get(),
        network: daemon::net::NetConfig {
            conflist: run.cni_conf,
            plugin_dirs: run.cni_bin_dir,
            fallback_subnet: fallback_subnet.trunc(),
            bridge: run.cni_bridge,
            dns: run.dns.then(gantry_agent::daemon::dns::DnsConfig::default),
            node_rules: true,
            warm: run.network_warm.min(64),
        },
    })
}

/// The garbage collection policy from the flags, checked the way the kubelet checks its own.
fn image_gc_policy(high: u8, low: u8, min_age: Duration) -> Result<GcPolicy> {
    if high > 100 || low > 100 {
        bail!(
            "--image-gc-high-threshold {high} / --image-gc-low-threshold {low}: percentages go \
             from 0 to 100 (100 turns image garbage collection off)"
        );
    }
    if high < 100 && low >= high {
        bail!(
            "--image-gc-low-threshold {low} must be below --image-gc-high-threshold {high}: \
             collection starts at the high mark and stops at the low one"
        );
    }
    Ok(GcPolicy {
        high_percent: high,
        low_percent: low,
        min_age,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_gc_flags() {
        let min = Duration::from_secs(120);
        assert_eq!(image_gc_policy(85, 80, min).unwrap(), GcPolicy::default());
        assert!(image_gc_policy(100, 100, min).is_ok(), "100 turns it off");
        let err = image_gc_policy(80, 85, min).unwrap_err().to_string();
        assert!(err.contains("must be below"), "{err}");
        assert!(image_gc_policy(80, 80, min).is_err());
        let err = image_gc_policy(101, 80, min).unwrap_err().to_string();
        assert!(err.contains("from 0 to 100"), "{err}");
    }

    #[test]
    fn the_name_responder_is_on_unless_turned_off() {
        let dns = |args: &[&str]| {
            let mut all = vec!["gantry-agent run", "--name", "n1"];
            all.extend_from_slice(args);
            config(Run::try_parse_from(all).unwrap())
                .unwrap()
                .network
                .dns
        };
        assert!(dns(&[]).is_some());
        assert!(dns(&["--dns"]).is_some());
        assert!(dns(&["--dns=true"]).is_some());
        assert!(dns(&["--dns=false"]).is_none());
        let err = Run::try_parse_from(["gantry-agent run", "--dns=maybe"]).unwrap_err();
        assert!(err.to_string().contains("--dns"), "{err}");
    }
}
