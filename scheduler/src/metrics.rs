//! Prometheus metrics of the scheduler, a tower layer that records gRPC requests, and the small
//! HTTP server that exposes `/metrics` beside the `/healthz` and `/readyz` probes.
//!
//! Every metric is registered once, in [`Metrics::new`]; afterwards the registry is only read, so
//! a scrape encodes it through a shared reference and needs no lock. Recording is cheap: the
//! unlabelled metrics are atomics, and labelled ones are families keyed by small label structs
//! whose values are `&'static str` where the set of values is known. The one exception is the
//! gRPC method label, which is owned because it comes from the request path (one small
//! allocation per request).

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State;
use axum::http::{self, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets_range};
use prometheus_client::registry::{Registry, Unit};
use tokio::time::Instant;
use tonic::Code;

/// Prefix of every metric name of this process.
const PREFIX: &str = "gantry_scheduler";

/// Content type of the `/metrics` response: prometheus-client encodes OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long `/readyz` waits for the readiness check before answering 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// The `op` label values of `store_operation_duration_seconds`. Anything else is recorded as
/// [`OTHER_STORE_OP`] so that a caller cannot grow the label set without bound.
const STORE_OPS: [&str; 5] = ["get", "range", "txn", "watch", "lease"];

/// The `op` label value for store operations outside [`STORE_OPS`].
const OTHER_STORE_OP: &str = "other";

/// The `method` label value for requests answered `Unimplemented`: their path is whatever the
/// client sent, so recording it verbatim would let any client create series at will.
pub const UNKNOWN_METHOD: &str = "unknown";

/// A family of histograms built by a plain function, so that its type can be named.
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Labels of `store_operation_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    op: &'static str,
}

/// Labels of `api_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    method: String,
    code: &'static str,
}

/// Labels of `api_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// Labels of `nodes`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    readiness: &'static str,
}

/// The scheduler's metrics and the registry that exposes them.
///
/// Share it as `Arc<Metrics>`: recording takes `&self`, and [`Metrics::encode`] reads the
/// registry without a lock because nothing is registered after construction.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pending_instances: Gauge,
    placement_duration: Histogram,
    placements: Counter,
    store_duration: HistogramFamily<StoreLabels>,
    api_requests: Family<ApiLabels, Counter>,
    api_duration: HistogramFamily<MethodLabels>,
    leader: Gauge,
    nodes: Family<NodeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One placement run: 50 µs to 5 s in half-decade steps.
fn placement_histogram() -> Histogram {
    Histogram::new(exponential_buckets_range(50e-6, 5.0, 11))
}

/// One store round trip: 100 µs to 10 s in half-decade steps.
fn store_histogram() -> Histogram {
    Histogram::new(exponential_buckets_range(100e-6, 10.0, 11))
}

/// One API request: 500 µs to 50 s in half-decade steps (slow calls wait on the store).
fn api_histogram() -> Histogram {
    Histogram::new(exponential_buckets_range(500e-6, 50.0, 11))
}

impl Metrics {
    /// Creates every metric, registered under the `gantry_scheduler_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let pending_instances = Gauge::default();
        let placement_duration = placement_histogram();
        let placements = Counter::default();
        let store_duration = HistogramFamily::new_with_constructor(store_histogram as fn() -> _);
        let api_requests = Family::default();
        let api_duration = HistogramFamily::new_with_constructor(api_histogram as fn() -> _);
        let leader = Gauge::default();
        let nodes = Family::default();

        registry.register(
            "pending_instances",
            "Instances not placed on a node",
            pending_instances.clone(),
        );
        registry.register_with_unit(
            "placement_duration",
            "Duration of one run of the placement core",
            Unit::Seconds,
            placement_duration.clone(),
        );
        registry.register(
            "placements",
            "Instances placed on a node",
            placements.clone(),
        );
        registry.register_with_unit(
            "store_operation_duration",
            "Duration of one store operation, by operation",
            Unit::Seconds,
            store_duration.clone(),
        );
        registry.register(
            "api_requests",
            "gRPC requests answered, by method and status code",
            api_requests.clone(),
        );
        registry.register_with_unit(
            "api_request_duration",
            "Duration of gRPC requests until response headers, by method",
            Unit::Seconds,
            api_duration.clone(),
        );
        registry.register(
            "leader",
            "1 when this process is the leader, else 0",
            leader.clone(),
        );
        registry.register(
            "nodes",
            "Nodes known to the scheduler, by readiness",
            nodes.clone(),
        );

        Self {
            registry,
            pending_instances,
            placement_duration,
            placements,
            store_duration,
            api_requests,
            api_duration,
            leader,
            nodes,
        }
    }

    /// Records one run of the placement core that took `duration` and placed `placed` instances.
    pub fn observe_placement(&self, duration: Duration, placed: u64) {
        self.placement_duration.observe(duration.as_secs_f64());
        self.placements.inc_by(placed);
    }

    /// Sets the number of instances not placed on a node.
    pub fn set_pending(&self, pending: usize) {
        self.pending_instances.set(saturating_i64(pending));
    }

    /// Records one store operation. `op` is one of `get`, `range`, `txn`, `watch`, `lease`; any
    /// other value is recorded as `other`.
    pub fn observe_store(&self, op: &str, duration: Duration) {
        let op = STORE_OPS
            .into_iter()
            .find(|known| *known == op)
            .unwrap_or(OTHER_STORE_OP);
        self.store_duration
            .get_or_create(&StoreLabels { op })
            .observe(duration.as_secs_f64());
    }

    /// Records one gRPC request to `method` (its path, e.g. `/gantry.v1.Workloads/Apply`)
    /// answered with `code` after `duration`.
    pub fn observe_api(&self, method: &str, code: Code, duration: Duration) {
        let labels = ApiLabels {
            method: method.to_owned(),
            code: code_name(code),
        };
        self.api_requests.get_or_create(&labels).inc();
        let labels = MethodLabels {
            method: labels.method,
        };
        self.api_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
    }

    /// Sets whether this process is the leader.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Sets the number of ready and not ready nodes.
    pub fn set_nodes(&self, ready: usize, not_ready: usize) {
        for (readiness, count) in [("ready", ready), ("not_ready", not_ready)] {
            self.nodes
                .get_or_create(&NodeLabels { readiness })
                .set(saturating_i64(count));
        }
    }

    /// Encodes every metric in the OpenMetrics text format, `# EOF` line included.
    pub fn encode(&self) -> Result<String, fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Converts a count for a gauge, which holds an `i64`; counts that large do not occur.
fn saturating_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The name of a gRPC status code as grpc-go spells it, which is what dashboards built on
/// go-grpc-prometheus expect in a `code` label.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Returns a layer that records every gRPC request in `metrics` (`api_requests_total` and
/// `api_request_duration_seconds`); pass it to `tonic::transport::Server::builder().layer(..)`.
///
/// See [`GrpcMetrics`] for what is recorded and its limits.
pub fn grpc_layer(metrics: Arc<Metrics>) -> GrpcMetricsLayer {
    GrpcMetricsLayer { metrics }
}

/// The layer returned by [`grpc_layer`]: wraps a service in [`GrpcMetrics`].
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// A gRPC service that records each request when its response headers are ready.
///
/// Limitations, because the layer looks at response headers only and never at the body:
/// - The code is read from the `grpc-status` header. Tonic sends errors returned by a handler
///   as trailers-only responses, which carry `grpc-status` in the headers, so those codes are
///   exact. A response whose headers carry no `grpc-status` is recorded as `OK`, even when its
///   trailers later carry an error, as a streaming response that fails mid-stream does.
/// - The duration runs until the response headers: the whole call for a unary method, only
///   the time to the first response for a streaming one.
/// - Requests answered `Unimplemented` are recorded under the method [`UNKNOWN_METHOD`], since
///   their path is chosen by the client.
/// - An error of the inner service (a transport failure, not a gRPC status) is recorded as
///   `Unknown`, which is how tonic reports such an error to the client.
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    // A box per request keeps this free of pin projection; next to decoding a gRPC message it
    // costs nothing measurable.
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let start = Instant::now();
        let method = request.uri().path().to_owned();
        let metrics = Arc::clone(&self.metrics);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get(tonic::Status::GRPC_STATUS)
                    .map_or(Code::Ok, |status| Code::from_bytes(status.as_bytes())),
                Err(_) => Code::Unknown,
            };
            let method = if code == Code::Unimplemented {
                UNKNOWN_METHOD
            } else {
                &method
            };
            metrics.observe_api(method, code, start.elapsed());
            response
        })
    }
}

/// The readiness check of `/readyz`, shared by the handler's clones.
type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

/// State of the HTTP handlers.
#[derive(Clone)]
struct Probes {
    metrics: Arc<Metrics>,
    ready: ReadyCheck,
}

/// Returns the HTTP routes of the scheduler's operations port:
/// - `GET /metrics`: every metric of `metrics` as OpenMetrics text;
/// - `GET /healthz`: 200 `ok` while the process serves HTTP at all;
/// - `GET /readyz`: 200 `ready` when `ready()` resolves to `true` within [`READY_TIMEOUT`],
///   else 503 with a short reason.
pub fn router(
    metrics: Arc<Metrics>,
    ready: impl Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static,
) -> axum::Router {
    let probes = Probes {
        metrics,
        ready: Arc::new(ready),
    };
    axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(probes)
}

async fn scrape(State(probes): State<Probes>) -> Response {
    match probes.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text).into_response(),
        Err(err) => {
            tracing::warn!(?err, "encoding metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed").into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(probes): State<Probes>) -> (StatusCode, &'static str) {
    match readiness(&probes.ready).await {
        Ok(()) => (StatusCode::OK, "ready"),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

/// Runs the readiness check with its deadline; the error is the reason `/readyz` gives.
async fn readiness(ready: &ReadyCheck) -> Result<(), &'static str> {
    match tokio::time::timeout(READY_TIMEOUT, ready()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err("not ready"),
        Err(_elapsed) => Err("readiness check timed out"),
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting connections
/// and returns once the requests in flight are answered.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A [`Store`](crate::store::Store) that records how long each operation takes
/// (`gantry_scheduler_store_operation_duration_seconds{op}`); a watch is timed until its stream
/// is open.
pub struct MeteredStore {
    inner: Arc<dyn crate::store::Store>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn crate::store::Store>, metrics: Arc<Metrics>) -> Self {
        MeteredStore { inner, metrics }
    }

    async fn timed<T>(&self, op: &str, call: impl Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let result = call.await;
        self.metrics.observe_store(op, started.elapsed());
        result
    }
}

impl std::fmt::Debug for MeteredStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredStore").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl crate::store::Store for MeteredStore {
    async fn get(&self, key: &[u8]) -> crate::store::Result<Option<crate::store::KeyValue>> {
        self.timed("get", self.inner.get(key)).await
    }

    async fn range(
        &self,
        prefix: &[u8],
        at: Option<crate::store::Revision>,
    ) -> crate::store::Result<(Vec<crate::store::KeyValue>, crate::store::Revision)> {
        self.timed("range", self.inner.range(prefix, at)).await
    }

    async fn txn(
        &self,
        compares: Vec<crate::store::Compare>,
        success: Vec<crate::store::Op>,
        failure: Vec<crate::store::Op>,
    ) -> crate::store::Result<crate::store::TxnResult> {
        self.timed("txn", self.inner.txn(compares, success, failure))
            .await
    }

    async fn watch(
        &self,
        prefix: &[u8],
        from: crate::store::Revision,
    ) -> crate::store::Result<crate::store::WatchStream> {
        self.timed("watch", self.inner.watch(prefix, from)).await
    }

    async fn compact(&self, revision: crate::store::Revision) -> crate::store::Result<()> {
        self.timed("compact", self.inner.compact(revision)).await
    }

    async fn grant_lease(
        &self,
        ttl: std::time::Duration,
    ) -> crate::store::Result<crate::store::LeaseId> {
        self.timed("lease", self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: crate::store::LeaseId) -> crate::store::Result<()> {
        self.timed("lease", self.inner.keep_alive(lease)).await
    }

    async fn revoke_lease(&self, lease: crate::store::LeaseId) -> crate::store::Result<()> {
        self.timed("lease", self.inner.revoke_lease(lease)).await
    }

    async fn current_revision(&self) -> crate::store::Result<crate::store::Revision> {
        self.timed("get", self.inner.current_revision()).await
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use futures::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tower::{Layer, Service};

    use super::*;

    const APPLY: &str = "/gantry.v1.Workloads/Apply";

    /// A server on an ephemeral port; dropping `shutdown` stops it too.
    struct Running {
        addr: SocketAddr,
        shutdown: oneshot::Sender<()>,
        task: JoinHandle<io::Result<()>>,
    }

    impl Running {
        async fn start(router: axum::Router) -> Running {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (shutdown, signal) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, router, signal.map(drop)));
            Running {
                addr,
                shutdown,
                task,
            }
        }

        async fn stop(self) {
            self.shutdown.send(()).unwrap();
            self.task.await.unwrap().unwrap();
        }
    }

    struct HttpResponse {
        status: u16,
        content_type: Option<String>,
        body: String,
    }

    /// A minimal HTTP/1.1 GET: one request per connection, read until the server closes.
    async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();

        let (head, body) = raw.split_once("\r\n\r\n").expect("no end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "this client does not decode chunked bodies"
        );
        let content_type = lines.find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        });
        HttpResponse {
            status,
            content_type,
            body: body.to_owned(),
        }
    }

    fn always(ready: bool) -> impl Fn() -> BoxFuture<'static, bool> + Send + Sync + 'static {
        move || futures::future::ready(ready).boxed()
    }

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[tokio::test]
    async fn metrics_endpoint_shows_recorded_values() {
        let metrics = Arc::new(Metrics::new());
        metrics.observe_api(APPLY, Code::Ok, Duration::from_millis(3));
        metrics.observe_placement(Duration::from_micros(80), 3);
        metrics.set_pending(2);
        metrics.observe_store("txn", Duration::from_millis(1));
        metrics.observe_store("compact", Duration::from_millis(1));
        metrics.set_leader(true);
        metrics.set_nodes(4, 1);
        let server = Running::start(router(Arc::clone(&metrics), always(true))).await;

        let response = http_get(server.addr, "/metrics").await;

        assert_eq!(response.status, 200);
        assert_eq!(
            response.content_type.as_deref(),
            Some(OPENMETRICS_CONTENT_TYPE)
        );
        let text = response.body;
        for line in [
            r#"gantry_scheduler_api_requests_total{method="/gantry.v1.Workloads/Apply",code="OK"} 1"#,
            r#"gantry_scheduler_api_request_duration_seconds_count{method="/gantry.v1.Workloads/Apply"} 1"#,
            "gantry_scheduler_placements_total 3",
            "gantry_scheduler_placement_duration_seconds_count 1",
            "gantry_scheduler_pending_instances 2",
            r#"gantry_scheduler_store_operation_duration_seconds_count{op="txn"} 1"#,
            r#"gantry_scheduler_store_operation_duration_seconds_count{op="other"} 1"#,
            "gantry_scheduler_leader 1",
            r#"gantry_scheduler_nodes{readiness="ready"} 4"#,
            r#"gantry_scheduler_nodes{readiness="not_ready"} 1"#,
            "# EOF",
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }
        server.stop().await;
    }

    #[test]
    fn placement_buckets_span_50us_to_5s() {
        let text = {
            let metrics = Metrics::new();
            metrics.observe_placement(Duration::from_secs(1), 1);
            metrics.encode().unwrap()
        };
        let bounds: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("gantry_scheduler_placement_duration_seconds_bucket"))
            .filter_map(|l| l.split('"').nth(1)?.parse().ok())
            .collect();
        assert_eq!(bounds.len(), 12, "11 finite bounds and +Inf:\n{text}");
        assert!((bounds[0] - 50e-6).abs() < 1e-12);
        assert!((bounds[10] - 5.0).abs() < 1e-9);
        assert!(bounds[11].is_infinite());
    }

    #[tokio::test]
    async fn healthz_answers_ok() {
        let server = Running::start(router(Arc::new(Metrics::new()), always(false))).await;
        let response = http_get(server.addr, "/healthz").await;
        assert_eq!((response.status, response.body.as_str()), (200, "ok"));
        server.stop().await;
    }

    #[tokio::test]
    async fn readyz_follows_the_check() {
        for (ready, status, body) in [(true, 200, "ready"), (false, 503, "not ready")] {
            let server = Running::start(router(Arc::new(Metrics::new()), always(ready))).await;
            let response = http_get(server.addr, "/readyz").await;
            assert_eq!((response.status, response.body.as_str()), (status, body));
            server.stop().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn readyz_gives_up_after_the_timeout() {
        let mut router = router(Arc::new(Metrics::new()), || {
            futures::future::pending().boxed()
        });
        let request = http::Request::get("/readyz")
            .body(axum::body::Body::empty())
            .unwrap();
        std::future::poll_fn(|cx| {
            Service::<http::Request<axum::body::Body>>::poll_ready(&mut router, cx)
        })
        .await
        .unwrap();

        let response = router.call(request).await.unwrap();

        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&body[..], b"readiness check timed out");
    }

    /// The layer in front of tonic's own health service, over a real HTTP/2 connection.
    #[tokio::test]
    async fn layer_records_tonic_requests() {
        let metrics = Arc::new(Metrics::new());
        let (_reporter, health) = tonic_health::server::health_reporter();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .layer(grpc_layer(Arc::clone(&metrics)))
                .add_service(health)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    signal.map(drop),
                ),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);

        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        let err = client
            .check(HealthCheckRequest {
                service: "gantry.v1.Nope".to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);

        let text = metrics.encode().unwrap();
        for line in [
            r#"gantry_scheduler_api_requests_total{method="/grpc.health.v1.Health/Check",code="OK"} 1"#,
            r#"gantry_scheduler_api_requests_total{method="/grpc.health.v1.Health/Check",code="NotFound"} 1"#,
            r#"gantry_scheduler_api_request_duration_seconds_count{method="/grpc.health.v1.Health/Check"} 2"#,
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }
        drop(client);
        shutdown.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    /// An inner service that answers every request with a fixed `grpc-status` header, or none.
    #[derive(Clone)]
    struct Answer(Option<&'static str>);

    impl Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = futures::future::Ready<Result<http::Response<()>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let mut response = http::Response::builder();
            if let Some(status) = self.0 {
                response = response.header("grpc-status", status);
            }
            futures::future::ready(Ok(response.body(()).unwrap()))
        }
    }

    #[tokio::test]
    async fn layer_reads_the_code_from_headers() {
        // (grpc-status header, request path, expected series)
        let cases = [
            (None, APPLY, format!(r#"{{method="{APPLY}",code="OK"}} 1"#)),
            (
                Some("0"),
                APPLY,
                format!(r#"{{method="{APPLY}",code="OK"}} 1"#),
            ),
            (
                Some("5"),
                APPLY,
                format!(r#"{{method="{APPLY}",code="NotFound"}} 1"#),
            ),
            (
                Some("1"),
                APPLY,
                format!(r#"{{method="{APPLY}",code="Canceled"}} 1"#),
            ),
            (
                Some("x"),
                APPLY,
                format!(r#"{{method="{APPLY}",code="Unknown"}} 1"#),
            ),
            (
                Some("12"),
                "/made.up/Path",
                r#"{method="unknown",code="Unimplemented"} 1"#.to_owned(),
            ),
        ];
        for (header, path, series) in cases {
            let metrics = Arc::new(Metrics::new());
            let mut service = grpc_layer(Arc::clone(&metrics)).layer(Answer(header));
            let request = http::Request::post(path).body(()).unwrap();
            service.call(request).await.unwrap();

            let line = format!("gantry_scheduler_api_requests_total{series}");
            let text = metrics.encode().unwrap();
            assert!(
                has_line(&text, &line),
                "header {header:?}: missing {line:?} in:\n{text}"
            );
        }
    }
}
