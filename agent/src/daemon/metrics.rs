//! The agent's operations endpoint: `/metrics` in the Prometheus (OpenMetrics) text format,
//! `/healthz` and `/readyz`, on `--metrics-listen` (default `127.0.0.1:7702`).
//!
//! `/metrics` has two parts:
//! - per container, cAdvisor's names and labels, read from the container's cgroup at scrape
//!   time (so a dashboard or alert written for the kubelet's `/metrics/cadvisor` works):
//!   `container_cpu_usage_seconds_total`, `container_memory_usage_bytes`,
//!   `container_memory_working_set_bytes` (usage minus inactive file cache, as cAdvisor and
//!   the kubelet's eviction compute it), `container_spec_memory_limit_bytes` (0 when
//!   unlimited, as cAdvisor writes it), `container_oom_events_total`,
//!   `container_cpu_cfs_throttled_periods_total`, `container_cpu_cfs_throttled_seconds_total`;
//!   labelled `id` (the cgroup path), `name` (the container id), `workload` and `instance`;
//! - the agent's own, prefixed `gantry_agent_`: reconcile pass duration, image pull bytes,
//!   image garbage collection, container restarts by workload, instances by state.
//!
//! `/healthz` answers 200 `ok` while the agent's reconcile loop runs, 503 once the loop ended
//! and until the endpoint closes with the agent; it says nothing of the scheduler, whose view of the
//! node is its Ready condition. `/readyz` answers 200 `ready` once the first assignment set has
//! arrived from a scheduler, 503 before: until then the agent does not act on its containers.
//!
//! The endpoint is optional to the agent's work: when its address cannot be bound (another
//! agent on the machine holds the port), the agent logs why and what to do, keeps running its
//! containers, and tries to bind again every few seconds, as the kubelet does with its own.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets_range};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;
use tracing::{debug, error, info};

use super::instance::{Env, LABEL_INSTANCE, LABEL_WORKLOAD};
use super::status::{self, State as InstanceState};
use crate::runtime::{CgroupStats, ContainerState, Runtime};

/// Default address of the endpoint (the scheduler's is 7701).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7702";

/// Prefix of the agent's own metrics.
const PREFIX: &str = "gantry_agent";

/// Content type of `/metrics`: prometheus-client writes OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long the endpoint waits before binding its address again after a failure.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Every instance state, with its `state` label value.
const STATES: [(InstanceState, &str); 8] = [
    (InstanceState::Pending, "pending"),
    (InstanceState::Pulling, "pulling"),
    (InstanceState::Starting, "starting"),
    (InstanceState::Running, "running"),
    (InstanceState::Ready, "ready"),
    (InstanceState::Exited, "exited"),
    (InstanceState::OomKilled, "oom_killed"),
    (InstanceState::Failed, "failed"),
];

/// Labels of `container_restarts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkloadLabels {
    workload: String,
}

/// Labels of `instances`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Labels of the per-container series, as cAdvisor names them plus Gantry's own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ContainerLabels {
    id: String,
    name: String,
    workload: String,
    instance: String,
}

/// The agent's own metrics and its health flags. Shared as `Arc<Metrics>`; recording takes
/// `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconcile_duration: Histogram,
    image_pull_bytes: Counter,
    image_gc_images: Counter,
    image_gc_bytes: Counter,
    restarts: Family<WorkloadLabels, Counter>,
    instances: Family<StateLabels, Gauge>,
    looping: AtomicBool,
    assigned: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One reconcile pass: 100 µs to 10 s in half-decade steps.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets_range(100e-6, 10.0, 11))
}

impl Metrics {
    /// Creates every metric, registered under the `gantry_agent_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let reconcile_duration = reconcile_histogram();
        let image_pull_bytes = Counter::default();
        let image_gc_images = Counter::default();
        let image_gc_bytes = Counter::default();
        let restarts = Family::default();
        let instances = Family::default();
        registry.register_with_unit(
            "reconcile_duration",
            "Duration of one pass of the reconcile loop",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register_with_unit(
            "image_pull",
            "Bytes of image layers downloaded from registries",
            Unit::Bytes,
            image_pull_bytes.clone(),
        );
        registry.register(
            "image_gc_removed_images",
            "Images removed by the image garbage collector",
            image_gc_images.clone(),
        );
        registry.register_with_unit(
            "image_gc_freed",
            "Bytes of blobs the image garbage collector deleted",
            Unit::Bytes,
            image_gc_bytes.clone(),
        );
        registry.register(
            "container_restarts",
            "Containers restarted by the restart policy, by workload",
            restarts.clone(),
        );
        registry.register(
            "instances",
            "Instances on this node, by state",
            instances.clone(),
        );
        Metrics {
            registry,
            reconcile_duration,
            image_pull_bytes,
            image_gc_images,
            image_gc_bytes,
            restarts,
            instances,
            looping: AtomicBool::new(false),
            assigned: AtomicBool::new(false),
        }
    }

    /// Records one reconcile pass.
    pub fn observe_reconcile(&self, duration: Duration) {
        self.reconcile_duration.observe(duration.as_secs_f64());
    }

    /// Records `bytes` downloaded from a registry.
    pub fn add_pull_bytes(&self, bytes: u64) {
        self.image_pull_bytes.inc_by(bytes);
    }

    /// Records a garbage collection that removed `images` images and `bytes` bytes of blobs.
    pub fn add_gc(&self, images: u64, bytes: u64) {
        self.image_gc_images.inc_by(images);
        self.image_gc_bytes.inc_by(bytes);
    }

    /// Records a restart of a container of `workload`.
    pub fn add_restart(&self, workload: &str) {
        self.restarts
            .get_or_create(&WorkloadLabels {
                workload: workload.to_owned(),
            })
            .inc();
    }

    /// Sets whether the reconcile loop runs (`/healthz`).
    pub fn set_looping(&self, looping: bool) {
        self.looping.store(looping, Ordering::Relaxed);
    }

    /// Notes that an assignment set arrived (`/readyz`).
    pub fn set_assigned(&self) {
        self.assigned.store(true, Ordering::Relaxed);
    }

    /// Sets the instance gauge from the states of the instances (every state, zeros too, so a
    /// series does not vanish when its last instance leaves the state).
    fn set_instances(&self, states: impl IntoIterator<Item = InstanceState>) {
        let mut counts = [0i64; STATES.len()];
        for state in states {
            if let Some(i) = STATES.iter().position(|(s, _)| *s == state) {
                counts[i] += 1;
            }
        }
        for ((_, state), count) in STATES.iter().zip(counts) {
            self.instances
                .get_or_create(&StateLabels { state })
                .set(count);
        }
    }

    /// The agent's own metrics as OpenMetrics text, without the closing `# EOF`.
    fn encode_own(&self, out: &mut String) -> fmt::Result {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }
}

/// What a scrape read of one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSample {
    /// The container's cgroup path (cAdvisor's `id`).
    pub cgroup: String,
    /// The container id (cAdvisor's `name`); the instance id for Gantry's containers.
    pub name: String,
    /// The workload of the instance.
    pub workload: String,
    /// The instance id.
    pub instance: String,
    /// What its cgroup says.
    pub stats: CgroupStats,
}

fn gauge_of(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Encodes the per-container series under cAdvisor's names, without the closing `# EOF`.
pub fn encode_containers(samples: &[ContainerSample], out: &mut String) -> fmt::Result {
    type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;
    let cpu = Family::<ContainerLabels, FloatCounter>::default();
    let throttled_periods = Family::<ContainerLabels, Counter>::default();
    let throttled_seconds = Family::<ContainerLabels, FloatCounter>::default();
    let usage = Family::<ContainerLabels, Gauge>::default();
    let working_set = Family::<ContainerLabels, Gauge>::default();
    let limit = Family::<ContainerLabels, Gauge>::default();
    let ooms = Family::<ContainerLabels, Counter>::default();
    for sample in samples {
        let labels = ContainerLabels {
            id: sample.cgroup.clone(),
            name: sample.name.clone(),
            workload: sample.workload.clone(),
            instance: sample.instance.clone(),
        };
        let s = &sample.stats;
        // Fresh counters: incrementing from zero sets them to the cgroup's totals.
        cpu.get_or_create(&labels)
            .inc_by(s.cpu_usage_ns as f64 / 1e9);
        throttled_periods
            .get_or_create(&labels)
            .inc_by(s.cpu_throttled_periods);
        throttled_seconds
            .get_or_create(&labels)
            .inc_by(s.cpu_throttled_ns as f64 / 1e9);
        usage.get_or_create(&labels).set(gauge_of(s.memory_usage));
        working_set
            .get_or_create(&labels)
            .set(gauge_of(s.memory_working_set));
        limit
            .get_or_create(&labels)
            .set(gauge_of(s.memory_limit.unwrap_or(0)));
        ooms.get_or_create(&labels).inc_by(s.oom_kills);
    }
    let mut registry = Registry::default();
    registry.register_with_unit(
        "container_cpu_usage",
        "Cumulative cpu time consumed",
        Unit::Seconds,
        cpu,
    );
    registry.register(
        "container_cpu_cfs_throttled_periods",
        "Number of throttled period intervals",
        throttled_periods,
    );
    registry.register_with_unit(
        "container_cpu_cfs_throttled",
        "Total time duration the container has been throttled",
        Unit::Seconds,
        throttled_seconds,
    );
    registry.register_with_unit(
        "container_memory_usage",
        "Current memory usage, including all memory regardless of when it was accessed",
        Unit::Bytes,
        usage,
    );
    registry.register_with_unit(
        "container_memory_working_set",
        "Current working set (usage minus inactive file cache)",
        Unit::Bytes,
        working_set,
    );
    registry.register_with_unit(
        "container_spec_memory_limit",
        "Memory limit for the container (0 when unlimited)",
        Unit::Bytes,
        limit,
    );
    registry.register(
        "container_oom_events",
        "Count of out of memory events observed for the container",
        ooms,
    );
    prometheus_client::encoding::text::encode_registry(out, &registry)
}

/// Reads the cgroups of the containers that run Gantry instances. Blocking (cgroupfs reads).
fn sample_containers(
    env: &Env,
    containers: Vec<crate::runtime::ContainerInfo>,
) -> Vec<ContainerSample> {
    let layout = &env.runtime.config().cgroups;
    let mut samples = Vec::new();
    for c in containers {
        // A stopped container's cgroup is gone; its last figures went with it.
        if matches!(c.state, ContainerState::Stopped(_)) {
            continue;
        }
        let Some(instance) = c.spec.labels.get(LABEL_INSTANCE) else {
            continue;
        };
        let stats = match layout.stats(&c.id) {
            Ok(stats) => stats,
            // Ended since the listing, or unreadable: no series for it in this scrape.
            Err(err) => {
                debug!(container = %c.id, %err, "container skipped in the scrape");
                continue;
            }
        };
        let cgroup = layout
            .cgroups_path(&c.id)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        samples.push(ContainerSample {
            cgroup,
            name: c.id.clone(),
            workload: c
                .spec
                .labels
                .get(LABEL_WORKLOAD)
                .cloned()
                .unwrap_or_default(),
            instance: instance.clone(),
            stats,
        });
    }
    samples
}

/// The whole `/metrics` text: the agent's own metrics (instances by state brought up to date
/// from the statuses kept on disk), then the containers', then `# EOF`.
async fn scrape_text(env: &Arc<Env>) -> Result<String, String> {
    let containers = env.runtime.list().await.map_err(|e| e.to_string())?;
    let env = env.clone();
    tokio::task::spawn_blocking(move || {
        let samples = sample_containers(&env, containers);
        let states = status::load_all(&env.status_dir)
            .into_iter()
            .map(|s| s.state);
        env.metrics.set_instances(states);
        let mut text = String::new();
        env.metrics
            .encode_own(&mut text)
            .and_then(|()| encode_containers(&samples, &mut text))
            .and_then(|()| prometheus_client::encoding::text::encode_eof(&mut text))
            .map_err(|e| e.to_string())?;
        Ok(text)
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn scrape(State(env): State<Arc<Env>>) -> Response {
    match scrape_text(&env).await {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(err) => {
            error!(%err, "collecting metrics failed");
            let body = format!("collecting metrics failed: {err}");
            (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
        }
    }
}

async fn healthz(State(env): State<Arc<Env>>) -> (StatusCode, &'static str) {
    if env.metrics.looping.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the reconcile loop is not running",
        )
    }
}

async fn readyz(State(env): State<Arc<Env>>) -> (StatusCode, &'static str) {
    if env.metrics.assigned.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first assignment set from a scheduler",
        )
    }
}

/// The routes of the endpoint: `/metrics`, `/healthz`, `/readyz`.
pub fn router(env: Arc<Env>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(env)
}

/// Serves `router` (see [`router`]) on `addr` until `shutdown` turns true; binds again every few
/// seconds while the address cannot be bound, without stopping the agent.
pub async fn serve(addr: SocketAddr, router: axum::Router, mut shutdown: watch::Receiver<bool>) {
    let mut failures = 0u32;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                info!(%addr, "serving /metrics, /healthz and /readyz");
                let stopped = {
                    let mut shutdown = shutdown.clone();
                    async move { super::session::stopped(&mut shutdown).await }
                };
                if let Err(err) = axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    error!(%addr, %err, "the metrics endpoint failed");
                }
                return;
            }
            Err(err) => {
                if failures == 0 {
                    error!(
                        %addr, %err,
                        "cannot listen for /metrics and /healthz (is another agent using the \
                         port?); retrying every 5s; choose another address with \
                         --metrics-listen, or turn the endpoint off with --metrics-listen ''"
                    );
                } else {
                    debug!(%addr, %err, attempt = failures + 1, "metrics endpoint still not bound");
                }
                failures = failures.saturating_add(1);
            }
        }
        tokio::select! {
            () = super::session::stopped(&mut shutdown) => return,
            () = tokio::time::sleep(BIND_RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, stats: CgroupStats) -> ContainerSample {
        ContainerSample {
            cgroup: format!("/system/gantry/{name}"),
            name: name.to_owned(),
            workload: "web".to_owned(),
            instance: name.to_owned(),
            stats,
        }
    }

    /// The value of the series of `metric` whose label set contains `labels`.
    fn value(text: &str, metric: &str, labels: &str) -> Option<f64> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(labels))
            .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
    }

    /// `GET path` on `addr`: the status line and body.
    async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_in_use_is_bound_again_later() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let router = axum::Router::new().route("/healthz", get(|| async { "ok" }));
        let server = tokio::spawn(serve(addr, router, shutdown));
        // Two attempts fail; the agent is not stopped by them.
        tokio::time::sleep(BIND_RETRY * 2 + Duration::from_secs(1)).await;
        assert!(!server.is_finished());
        drop(holder);
        let mut answer = None;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Ok(response) = http_get(addr, "/healthz").await {
                answer = Some(response);
                break;
            }
        }
        let answer = answer.expect("bound within a retry period");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        stop.send_replace(true);
        server.await.unwrap();
    }

    #[test]
    fn containers_under_cadvisor_names() {
        let limited = CgroupStats {
            cpu_usage_ns: 1_500_000_000,
            cpu_throttled_periods: 3,
            cpu_throttled_ns: 250_000_000,
            memory_usage: 10 << 20,
            memory_working_set: 8 << 20,
            memory_limit: Some(64 << 20),
            oom_kills: 2,
            ..CgroupStats::default()
        };
        let unlimited = CgroupStats {
            memory_usage: 4096,
            memory_working_set: 4096,
            ..CgroupStats::default()
        };
        let mut text = String::new();
        encode_containers(
            &[sample("web-1", limited), sample("web-2", unlimited)],
            &mut text,
        )
        .unwrap();
        let one = r#"id="/system/gantry/web-1",name="web-1",workload="web",instance="web-1""#;
        let two = r#"instance="web-2""#;
        let cases = [
            ("container_cpu_usage_seconds_total", one, 1.5),
            ("container_cpu_cfs_throttled_periods_total", one, 3.0),
            ("container_cpu_cfs_throttled_seconds_total", one, 0.25),
            ("container_memory_usage_bytes", one, (10 << 20) as f64),
            ("container_memory_working_set_bytes", one, (8 << 20) as f64),
            ("container_spec_memory_limit_bytes", one, (64 << 20) as f64),
            ("container_oom_events_total", one, 2.0),
            ("container_spec_memory_limit_bytes", two, 0.0),
            ("container_memory_working_set_bytes", two, 4096.0),
        ];
        for (metric, labels, want) in cases {
            assert_eq!(value(&text, metric, labels), Some(want), "{metric}\n{text}");
        }
        assert!(
            text.contains("# TYPE container_cpu_usage_seconds counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE container_memory_working_set_bytes gauge"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "the caller closes the exposition");
    }

    #[test]
    fn own_metrics_and_instance_states() {
        let metrics = Metrics::new();
        metrics.observe_reconcile(Duration::from_millis(3));
        metrics.add_pull_bytes(1000);
        metrics.add_pull_bytes(24);
        metrics.add_restart("crash");
        metrics.add_restart("crash");
        metrics.add_gc(2, 4096);
        use InstanceState::*;
        metrics.set_instances([Ready, Ready, Pulling, Exited]);
        let mut text = String::new();
        metrics.encode_own(&mut text).unwrap();
        let plain = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse::<f64>().ok())
        };
        assert_eq!(
            plain("gantry_agent_image_pull_bytes_total"),
            Some(1024.0),
            "{text}"
        );
        assert_eq!(
            plain("gantry_agent_image_gc_removed_images_total"),
            Some(2.0)
        );
        assert_eq!(
            plain("gantry_agent_image_gc_freed_bytes_total"),
            Some(4096.0)
        );
        assert_eq!(
            plain("gantry_agent_reconcile_duration_seconds_count"),
            Some(1.0)
        );
        let labelled = |name: &str, labels: &str| value(&text, name, labels);
        assert_eq!(
            labelled(
                "gantry_agent_container_restarts_total",
                r#"workload="crash""#
            ),
            Some(2.0)
        );
        for (state, want) in [
            ("ready", 2.0),
            ("pulling", 1.0),
            ("exited", 1.0),
            ("failed", 0.0),
        ] {
            let labels = format!(r#"state="{state}""#);
            assert_eq!(
                labelled("gantry_agent_instances", &labels),
                Some(want),
                "{text}"
            );
        }
        // A later scrape replaces the counts, zeros included.
        metrics.set_instances([]);
        let mut text = String::new();
        metrics.encode_own(&mut text).unwrap();
        assert_eq!(
            value(&text, "gantry_agent_instances", r#"state="ready""#),
            Some(0.0)
        );
    }
}
