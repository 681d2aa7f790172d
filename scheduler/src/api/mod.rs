//! The scheduler's gRPC API (`gantry.v1`): the Workloads, Instances, Nodes, Images and Events
//! services, with gRPC health and reflection, served by every scheduler replica.
//!
//! The handlers are thin: convert the request ([`convert`]), call a use case ([`crate::ops`]),
//! convert the answer back; errors become statuses in one place ([`error`]). The server takes
//! its listener and its shutdown signal as parameters (as mini-redis does), so tests serve on
//! `127.0.0.1:0` and the daemon decides when to stop.
//!
//! | file | what |
//! |---|---|
//! | `workloads.rs` | `Workloads`: Apply, Get, List, Delete, Scale, History, Rollback |
//! | `instances.rs` | `Instances`: List, Get, and Logs and Exec relayed over node sessions |
//! | `nodes.rs` | `Nodes`: List, Get, Cordon, Uncordon, Drain |
//! | `top.rs` | `Nodes.Top`, `Instances.Top`: usage asked of the agents over their sessions |
//! | `images.rs` | `Images`: List, Remove, Prune, Pull, Import, Tag, Push, Save, asked of the agents over their sessions; FetchUpload and DeliverSave for the agents |
//! | `events.rs` | `Events`: Watch |
//!
//! Limits: requests over [`ApiConfig::max_message_bytes`] are refused with
//! RESOURCE_EXHAUSTED; a unary call gets the caller's `grpc-timeout`, capped by
//! [`ApiConfig::request_timeout`], and ends with DEADLINE_EXCEEDED when it runs out; a Watch
//! stream lasts until the caller's `grpc-timeout`, if it gave one.

pub mod convert;
pub mod error;
mod events;
mod images;
mod instances;
mod nodes;
pub mod top;
mod workloads;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gantry::pb;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::warn;

use crate::ops;
use crate::store::Store;

pub use events::EventsService;
pub use images::ImagesService;
pub use instances::InstancesService;
pub use nodes::NodesService;
pub use workloads::WorkloadsService;

/// Settings of the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Longest a unary call may take, whatever deadline the caller gives (default 30 s).
    pub request_timeout: Duration,
    /// Largest request message accepted, in bytes (default 1 MiB).
    pub max_message_bytes: usize,
    /// A Watch stream with nothing to deliver sends a BOOKMARK this often (default 10 s).
    pub bookmark_interval: Duration,
    /// HTTP/2 keepalive pings on idle connections, so that dead peers of long Watch streams
    /// are noticed (default 30 s).
    pub keepalive_interval: Duration,
    /// Where `Images.Import` keeps uploads while the call runs (default: the system's temp
    /// dir; the daemon uses `<data dir>/uploads`).
    pub upload_dir: std::path::PathBuf,
    /// Largest `Images.Import` upload, in bytes (default 16 GiB).
    pub max_upload_bytes: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            request_timeout: Duration::from_secs(30),
            max_message_bytes: 1024 * 1024,
            bookmark_interval: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            upload_dir: std::env::temp_dir(),
            max_upload_bytes: 16 << 30,
        }
    }
}

/// What every service of the API shares.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: ApiConfig,
    /// Turns true when the server shuts down: open Watch streams then end.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    /// The node sessions of this replica, for the logs and exec relays.
    pub(crate) relays: crate::relay::Relays,
}

impl Shared {
    /// The time a unary call may take: the caller's `grpc-timeout`, capped by the server's.
    fn budget<T>(&self, request: &tonic::Request<T>) -> Duration {
        match client_timeout(request) {
            Some(t) => t.min(self.config.request_timeout),
            None => self.config.request_timeout,
        }
    }
}

/// The caller's deadline, from the `grpc-timeout` header (`<digits><unit>`, unit one of
/// `H M S m u n`).
fn client_timeout<T>(request: &tonic::Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let unit = value.chars().last()?;
    let digits = value.get(..value.len() - unit.len_utf8())?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs a use case within `budget`, ending it with [`ops::Error::DeadlineExceeded`] when it
/// runs out. It stops a little early, so that the caller hears DEADLINE_EXCEEDED from us
/// rather than the CANCELLED of tonic's own timeout, which fires at the deadline itself.
async fn within<T>(budget: Duration, call: impl Future<Output = ops::Result<T>>) -> ops::Result<T> {
    let margin = (budget / 10).min(Duration::from_millis(10));
    tokio::time::timeout(budget - margin, call)
        .await
        .unwrap_or(Err(ops::Error::DeadlineExceeded(budget)))
}

/// The API server: every service of the API, health and reflection, ready to serve.
///
/// ```no_run
/// # async fn run(store: std::sync::Arc<dyn gantry_scheduler::store::Store>) -> anyhow::Result<()> {
/// use gantry_scheduler::api::{ApiConfig, ApiServer};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:7700").await?;
/// ApiServer::new(store, ApiConfig::default())
///     // .add_service(NodeSessionServer::new(..))  // the agents' session service goes here
///     .serve(listener, async { let _ = tokio::signal::ctrl_c().await; })
///     .await?;
/// # Ok(()) }
/// ```
pub struct ApiServer {
    config: ApiConfig,
    routes: RoutesBuilder,
    health: HealthReporter,
    /// Names of the services reported by the health service.
    names: Vec<&'static str>,
    stop: tokio::sync::watch::Sender<bool>,
}

/// Ends what keeps a server from shutting down gracefully: reports every service
/// NOT_SERVING and ends open Watch streams with UNAVAILABLE (their clients resume on another
/// replica). [`ApiServer::serve`] uses it when its shutdown signal completes; a server built
/// by the caller from [`ApiServer::into_routes`] must call [`Stopper::stop`] itself.
pub struct Stopper {
    health: HealthReporter,
    names: Vec<&'static str>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Stopper {
    /// Reports NOT_SERVING and ends the Watch streams.
    pub async fn stop(self) {
        set_status(&self.health, &self.names, ServingStatus::NotServing).await;
        self.stop.send_replace(true);
    }
}

impl ApiServer {
    /// The API's services over `store`, without node sessions (logs and exec then answer
    /// UNAVAILABLE).
    pub fn new(store: Arc<dyn Store>, config: ApiConfig) -> Self {
        Self::with_relays(store, config, crate::relay::Relays::new("this replica"))
    }

    /// The API's services over `store`, relaying logs and exec through the node sessions of
    /// `relays` (from [`crate::session::SessionService::relays`]).
    pub fn with_relays(
        store: Arc<dyn Store>,
        config: ApiConfig,
        relays: crate::relay::Relays,
    ) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        routes.add_service(health_service);
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .build_v1();
        match reflection {
            Ok(service) => {
                routes.add_service(service);
            }
            Err(err) => warn!(%err, "gRPC reflection is off: the descriptor set does not load"),
        }
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let shared = Arc::new(Shared {
            store,
            config: config.clone(),
            stopping,
            relays,
        });
        let max = config.max_message_bytes;
        ApiServer {
            config,
            routes,
            health,
            names: Vec::new(),
            stop,
        }
        .add_service(
            pb::workloads_server::WorkloadsServer::new(WorkloadsService::new(shared.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::instances_server::InstancesServer::new(InstancesService::new(shared.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::nodes_server::NodesServer::new(NodesService::new(shared.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::images_server::ImagesServer::new(ImagesService::new(shared.clone()))
                .max_decoding_message_size(max),
        )
        .add_service(
            pb::events_server::EventsServer::new(EventsService::new(shared))
                .max_decoding_message_size(max),
        )
    }

    /// Adds a service, reported SERVING by the health service.
    ///
    /// THE PLACE FOR THE AGENTS' SESSION SERVICE: `.add_service(NodeSessionServer::new(..)
    /// .max_decoding_message_size(..))`. Set its message size limit on the service itself; the
    /// API's limit is [`ApiConfig::max_message_bytes`].
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tonic::codegen::Service<tonic::codegen::http::Request<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// The health reporter, to mark services NOT_SERVING (e.g. while the store is
    /// unreachable).
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Marks every service SERVING and returns the routes of all of them, for a server built
    /// by the caller (e.g. [`server_builder`] with a metrics layer), and what stops them.
    pub async fn into_routes(self) -> (Routes, Stopper) {
        set_status(&self.health, &self.names, ServingStatus::Serving).await;
        let router = self
            .routes
            .routes()
            .into_axum_router()
            .layer(axum::middleware::map_response(error::request_too_large));
        let stopper = Stopper {
            health: self.health,
            names: self.names,
            stop: self.stop,
        };
        (Routes::from(router), stopper)
    }

    /// Serves on `listener` until `shutdown` completes: then every service turns NOT_SERVING,
    /// open Watch streams end with UNAVAILABLE, the listener closes and open calls finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        let config = self.config.clone();
        let (routes, stopper) = self.into_routes().await;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let shutdown = async move {
            shutdown.await;
            stopper.stop().await;
        };
        server_builder(&config)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }
}

async fn set_status(health: &HealthReporter, names: &[&'static str], status: ServingStatus) {
    health.set_service_status("", status).await;
    for name in names {
        health.set_service_status(name, status).await;
    }
}

/// A tonic server with the API's settings: the request timeout (tonic's, a backstop to the
/// handlers' own) and HTTP/2 keepalive.
pub fn server_builder(config: &ApiConfig) -> Server {
    Server::builder()
        .timeout(config.request_timeout)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
}

/// Serves the API over `store` on `listener` with the default settings until `shutdown`
/// completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    ApiServer::new(store, ApiConfig::default())
        .serve(listener, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(value: &str) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        request
            .metadata_mut()
            .insert("grpc-timeout", value.parse().unwrap());
        request
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            client_timeout(&with_timeout("100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            client_timeout(&with_timeout("2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            client_timeout(&with_timeout("1H")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(client_timeout(&with_timeout("5x")), None);
        assert_eq!(client_timeout(&with_timeout("123456789S")), None);
        assert_eq!(client_timeout(&tonic::Request::new(())), None);
    }

    #[tokio::test(start_paused = true)]
    async fn use_cases_end_at_the_deadline() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        };
        let err = within(Duration::from_secs(1), slow).await.unwrap_err();
        assert!(matches!(err, ops::Error::DeadlineExceeded(_)), "{err:?}");
        let fast = async { Ok(7) };
        assert_eq!(within(Duration::from_secs(1), fast).await.unwrap(), 7);
    }
}
