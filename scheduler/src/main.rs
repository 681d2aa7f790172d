//! The `gantry-scheduler` daemon: serves the gRPC API and node sessions, and runs the
//! controllers while it is the elected leader. Flags map onto `server::Config`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use gantry::duration::Duration;
use gantry_scheduler::placement::Strategy;
use gantry_scheduler::server::{self, Config};
use tracing_subscriber::EnvFilter;

/// Gantry's control plane: API, store, placement, controllers.
#[derive(Debug, Parser)]
#[command(name = "gantry-scheduler", version, about)]
struct Args {
    /// Address of the gRPC API (operators, the CLI and agents).
    #[arg(
        long,
        env = "GANTRY_SCHEDULER_LISTEN",
        default_value = "127.0.0.1:7700"
    )]
    listen: SocketAddr,
    /// Address of /metrics, /healthz and /readyz ("" to turn off).
    #[arg(
        long,
        env = "GANTRY_SCHEDULER_METRICS_LISTEN",
        default_value = "127.0.0.1:7701"
    )]
    metrics_listen: String,
    /// etcd endpoints, comma-separated (http://10.0.0.1:2379,...); without them the embedded
    /// store under --data-dir holds the state.
    #[arg(long, env = "GANTRY_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Directory of the embedded store.
    #[arg(
        long,
        env = "GANTRY_SCHEDULER_DATA_DIR",
        default_value = "/var/lib/gantry/scheduler"
    )]
    data_dir: PathBuf,
    /// This replica's name in elections (default hostname:pid).
    #[arg(long, env = "GANTRY_SCHEDULER_NAME")]
    name: Option<String>,
    /// Time after a node's last heartbeat before its instances are re-placed.
    #[arg(long, default_value = "10s")]
    node_grace: Duration,
    /// TTL of a node session's lease: a node is NotReady this long after its last heartbeat.
    #[arg(long, default_value = "6s")]
    session_ttl: Duration,
    /// How often agents heartbeat.
    #[arg(long, default_value = "2s")]
    heartbeat_interval: Duration,
    /// TTL of the leader's lease: a dead leader is replaced within about this.
    #[arg(long, default_value = "3s")]
    leader_ttl: Duration,
    /// Full controller pass at least this often.
    #[arg(long, default_value = "30s")]
    resync: Duration,
    /// Placement strategy.
    #[arg(long, value_enum, default_value_t = StrategyArg::Spread)]
    strategy: StrategyArg,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve TLS with this certificate (PEM chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS); a node's certificate must name
    /// the node (DNS SAN). Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// The cluster network: each node gets one /24 of it for its containers at its first
    /// registration. Give every replica the same value.
    #[arg(long, default_value = gantry_scheduler::network::DEFAULT_CLUSTER_CIDR)]
    cluster_cidr: String,
    /// Largest image upload `gantry image import` may send ("16Gi", "500Mi"); it is kept
    /// under --data-dir/uploads while the import runs.
    #[arg(long, default_value = "16Gi")]
    max_upload_size: gantry::quantity::Bytes,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StrategyArg {
    /// Prefer the least allocated nodes.
    Spread,
    /// Prefer the most allocated nodes that fit.
    Binpack,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
    }
    if args.session_ttl.get() >= args.node_grace.get() {
        anyhow::bail!(
            "--session-ttl ({}) must be shorter than --node-grace ({})",
            args.session_ttl,
            args.node_grace
        );
    }
    let mut config = Config::new(args.listen, args.data_dir);
    config.metrics_listen = if args.metrics_listen.is_empty() {
        None
    } else {
        Some(
            args.metrics_listen
                .parse()
                .with_context(|| format!("--metrics-listen {:?}", args.metrics_listen))?,
        )
    };
    config.etcd = args.etcd;
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        config.tls = Some(server::TlsFiles {
            cert,
            key,
            client_ca: args.client_ca,
        });
    }
    if let Some(name) = args.name {
        config.identity = name;
    }
    config.leader_ttl = args.leader_ttl.into();
    config.heartbeat_interval = args.heartbeat_interval.into();
    config.cluster_cidr = args
        .cluster_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--cluster-cidr: {e}"))?;
    gantry_scheduler::network::check_cluster(config.cluster_cidr).map_err(anyhow::Error::msg)?;
    config.max_upload_bytes = args.max_upload_size.get();
    config.controller.node_grace = args.node_grace.into();
    config.controller.lease_ttl = args.session_ttl.into();
    config.controller.resync = args.resync.into();
    config.controller.placement.strategy = match args.strategy {
        StrategyArg::Spread => Strategy::Spread,
        StrategyArg::Binpack => Strategy::BinPack,
    };

    let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        server::run(config, shutdown, None).await
    })
}
