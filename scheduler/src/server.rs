//! One scheduler replica, assembled: the store (etcd, or the embedded store when no endpoints
//! are given), the replica cache, the gRPC API and node sessions, the metrics endpoint, and the
//! election that runs the controllers on the leader. The binary parses flags into a [`Config`]
//! and calls [`run`]; tests and benchmarks call it in-process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use tonic::transport::server::TcpIncoming;

use crate::api::{self, ApiConfig, ApiServer};
use crate::cache::Cache;
use crate::controller;
use crate::election::{self, ElectionConfig};
use crate::metrics::{self, Metrics};
use crate::model::{self, NoticeRecord, Timestamp, keys};
use crate::session::{SessionConfig, SessionService};
use crate::store::{EmbeddedStore, EtcdOptions, EtcdStore, Op, Store, StoreError};

/// HTTP/2 streams one client connection may hold open at once.
const MAX_CONCURRENT_STREAMS: u32 = 65_536;

/// Everything a replica needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the gRPC API listens.
    pub listen: SocketAddr,
    /// Where `/metrics`, `/healthz` and `/readyz` listen (none when `None`).
    pub metrics_listen: Option<SocketAddr>,
    /// etcd endpoints; the embedded store under `data_dir` when empty.
    pub etcd: Vec<String>,
    /// Directory of the embedded store.
    pub data_dir: PathBuf,
    /// This replica's identity in elections and node liveness records.
    pub identity: String,
    /// Leader lease TTL.
    pub leader_ttl: Duration,
    /// Interval at which agents heartbeat.
    pub heartbeat_interval: Duration,
    /// Controller settings (node grace, session lease TTL, resync, placement).
    pub controller: controller::Config,
    /// TLS for the gRPC API and node sessions; plain HTTP/2 when `None`.
    pub tls: Option<TlsFiles>,
    /// The cluster network node subnets are cut from.
    pub cluster_cidr: crate::network::Cidr,
    /// Largest image upload (`gantry image import`) kept under `<data_dir>/uploads`.
    pub max_upload_bytes: u64,
}

/// The files of the API's TLS settings.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA (PEM) that client certificates must chain to; clients need none when `None`.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The tonic settings, with the files read.
    pub fn load(&self) -> anyhow::Result<tonic::transport::ServerTlsConfig> {
        use anyhow::Context;
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).with_context(|| format!("reading the {what} {path:?}"))
        };
        let identity = Identity::from_pem(
            read(&self.cert, "TLS certificate")?,
            read(&self.key, "TLS key")?,
        );
        let mut tls = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
        }
        Ok(tls)
    }
}

impl Config {
    /// Defaults for a replica listening on `listen` with its data under `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Config {
            listen,
            metrics_listen: None,
            etcd: Vec::new(),
            data_dir,
            identity: default_identity(),
            leader_ttl: election::DEFAULT_TTL,
            heartbeat_interval: Duration::from_secs(2),
            controller: controller::Config::default(),
            tls: None,
            cluster_cidr: crate::session::default_cluster_cidr(),
            max_upload_bytes: ApiConfig::default().max_upload_bytes,
        }
    }
}

/// `hostname:pid`.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "scheduler".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Opens the store the configuration names.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    if config.etcd.is_empty() {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
        let path = config.data_dir.join("store.redb");
        let store = EmbeddedStore::open(&path)
            .await
            .with_context(|| format!("opening the embedded store {}", path.display()))?;
        info!(path = %path.display(), "embedded store");
        Ok(Arc::new(store))
    } else {
        let store = EtcdStore::connect(EtcdOptions::new(config.etcd.clone()))
            .await
            .with_context(|| format!("connecting to etcd at {}", config.etcd.join(",")))?;
        info!(endpoints = %config.etcd.join(","), "etcd store");
        Ok(Arc::new(store))
    }
}

/// Runs a replica until `shutdown`; returns the address the API listens on through `bound`
/// as soon as it is bound (useful with port 0).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let store = open_store(&config).await?;
    run_with_store(config, store, shutdown, bound).await
}

/// [`run`] on a store the caller opened (benchmarks read it alongside).
pub async fn run_with_store(
    config: Config,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(Metrics::new());
    let store: Arc<dyn Store> = Arc::new(metrics::MeteredStore::new(store, metrics.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let cache = Cache::new();
    let cache_task = tokio::spawn({
        let cache = cache.clone();
        let store = store.clone();
        let stopped = stopped();
        async move { cache.run(store, stopped).await }
    });

    let metrics_task = match config.metrics_listen {
        Some(metrics_addr) => {
            let listener = TcpListener::bind(metrics_addr)
                .await
                .with_context(|| format!("listening on {metrics_addr} for metrics"))?;
            let ready_store = store.clone();
            let router = metrics::router(metrics.clone(), move || {
                let store = ready_store.clone();
                Box::pin(async move { store.current_revision().await.is_ok() })
            });
            let stopped = stopped();
            Some(tokio::spawn(async move {
                if let Err(err) = metrics::serve(listener, router, stopped).await {
                    warn!(%err, "metrics endpoint failed");
                }
            }))
        }
        None => None,
    };

    let session = SessionService::new(
        store.clone(),
        cache.clone(),
        SessionConfig {
            heartbeat_interval: config.heartbeat_interval,
            lease_ttl: config.controller.lease_ttl,
            identity: config.identity.clone(),
            cluster_cidr: config.cluster_cidr,
        },
        stop_tx.subscribe(),
    );
    let api_config = ApiConfig {
        upload_dir: config.data_dir.join("uploads"),
        max_upload_bytes: config.max_upload_bytes,
        ..ApiConfig::default()
    };
    let (routes, stopper) =
        ApiServer::with_relays(store.clone(), api_config.clone(), session.relays())
            .add_service(session.server())
            .into_routes()
            .await;
    let tls = config.tls.as_ref().map(TlsFiles::load).transpose()?;
    let mut builder = api::server_builder(&api_config);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS settings: {e}"))?;
    }
    let api_task = tokio::spawn({
        let metrics = metrics.clone();
        let stopped = stopped();
        async move {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            builder
                // One connection may carry thousands of node sessions (a proxy, the
                // benchmark's simulated agents).
                .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
                .layer(metrics::grpc_layer(metrics))
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, async move {
                    stopped.await;
                    stopper.stop().await;
                })
                .await
        }
    });
    if let Some(bound) = bound {
        let _ = bound.send(addr);
    }
    info!(%addr, identity = %config.identity, "scheduler serving");

    let lead_task = tokio::spawn(lead(
        store.clone(),
        cache.clone(),
        config.clone(),
        metrics.clone(),
        stopped(),
    ));
    let gauges_task = tokio::spawn(node_gauges(cache.clone(), metrics.clone(), stopped()));

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    if let Err(err) = lead_task.await {
        warn!(%err, "leader task failed");
    }
    match api_task.await {
        Ok(Err(err)) => warn!(%err, "API server failed"),
        Err(err) => warn!(%err, "API task failed"),
        Ok(Ok(())) => {}
    }
    let _ = cache_task.await;
    let _ = gauges_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    Ok(())
}

/// Campaigns for leadership and runs the controllers while elected, until `stopped`.
async fn lead(
    store: Arc<dyn Store>,
    cache: Cache,
    config: Config,
    metrics: Arc<Metrics>,
    stopped: impl Future<Output = ()> + Send + 'static,
) {
    let stopped = futures::FutureExt::shared(Box::pin(stopped));
    loop {
        let election = ElectionConfig {
            ttl: config.leader_ttl,
            ..ElectionConfig::new(config.identity.clone())
        };
        let leadership = match election::campaign(store.clone(), election, stopped.clone()).await {
            Ok(Some(leadership)) => leadership,
            Ok(None) => return,
            Err(err) => {
                warn!(%err, "campaign failed; retrying");
                tokio::select! {
                    _ = stopped.clone() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        metrics.set_leader(true);
        let fence = leadership.fence();
        let lost = leadership.lost();
        let compactor = tokio::spawn(compact(store.clone(), COMPACT_EVERY));
        let shutting_down = tokio::select! {
            _ = controller::run(
                store.clone(),
                cache.clone(),
                config.controller.clone(),
                fence,
                Some(metrics.clone()),
                stopped.clone(),
            ) => futures::FutureExt::now_or_never(stopped.clone()).is_some(),
            loss = lost => {
                warn!(%loss, "leadership lost; controllers stopped");
                false
            }
        };
        compactor.abort();
        metrics.set_leader(false);
        if shutting_down {
            let _ = leadership.resign().await;
            return;
        }
    }
}

/// How often the leader compacts the store's history, keeping one period of it: watchers
/// (Events streams, replicas' caches) that fall further behind re-list.
const COMPACT_EVERY: Duration = Duration::from_secs(300);

/// Notices are kept this long.
const NOTICE_TTL: Duration = Duration::from_secs(3600);

/// Compacts the store every `period` to the revision it had one period earlier, and deletes
/// notices older than [`NOTICE_TTL`].
async fn compact(store: Arc<dyn Store>, period: Duration) {
    let mut previous = None;
    loop {
        tokio::time::sleep(period).await;
        if let Err(err) = prune_notices(&*store, Timestamp::now()).await {
            warn!(%err, "pruning old notices failed");
        }
        if let Some(revision) = previous
            && let Err(err) = store.compact(revision).await
        {
            warn!(%err, revision, "compaction failed");
        }
        previous = store.current_revision().await.ok();
    }
}

/// Deletes the notices older than [`NOTICE_TTL`] at `now`.
async fn prune_notices(store: &dyn Store, now: Timestamp) -> Result<(), StoreError> {
    let (kvs, _) = store.range(keys::NOTICES.as_bytes(), None).await?;
    let cutoff = Timestamp(now.0 - NOTICE_TTL.as_millis() as i64);
    let old: Vec<Op> = kvs
        .iter()
        .filter(|kv| model::decode::<NoticeRecord>(&kv.value).map_or(true, |n| n.time < cutoff))
        .map(|kv| Op::delete(kv.key.clone()))
        .collect();
    for chunk in old.chunks(100) {
        store.txn(Vec::new(), chunk.to_vec(), Vec::new()).await?;
    }
    Ok(())
}

/// Keeps the node gauges current.
async fn node_gauges(cache: Cache, metrics: Arc<Metrics>, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    loop {
        {
            let view = cache.read();
            let ready = view.nodes.keys().filter(|n| view.is_live(n)).count();
            metrics.set_nodes(ready, view.nodes.len() - ready);
        }
        tokio::select! {
            _ = &mut stopped => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn old_notices_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("store.redb"))
            .await
            .unwrap();
        let notice = |minutes_ago: i64| NoticeRecord {
            kind: "node".into(),
            name: "n1".into(),
            workload: String::new(),
            warning: true,
            reason: "NodeLost".into(),
            message: "m".into(),
            source: "node-controller".into(),
            time: Timestamp(10_000_000 - minutes_ago * 60_000),
        };
        store
            .put(
                keys::notice(1, "n1").as_bytes(),
                &model::encode(&notice(61)),
            )
            .await
            .unwrap();
        store
            .put(
                keys::notice(2, "n1").as_bytes(),
                &model::encode(&notice(59)),
            )
            .await
            .unwrap();
        prune_notices(&store, Timestamp(10_000_000)).await.unwrap();
        let (left, _) = store.range(keys::NOTICES.as_bytes(), None).await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].key, keys::notice(2, "n1").as_bytes());
    }
}
