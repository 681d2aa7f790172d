//! The scheduler's side of `NodeSession.Session`: the one long-lived stream each agent keeps
//! open, over which it registers its node, proves it is alive, receives its assignments and
//! reports the status of its instances.
//!
//! # One session
//!
//! 1. The agent's first message must be `register`; anything else ends the stream with
//!    `INVALID_ARGUMENT`. The registration is validated completely (node name, labels,
//!    quantities, restored statuses) and, when anything is wrong, the stream ends with
//!    `INVALID_ARGUMENT` naming every bad field (`register.capacity.cpu: …`) and nothing is
//!    written.
//! 2. The node record is upserted at `keys::node(name)` with a compare-and-swap on its
//!    `mod_revision` (retried on conflict); what operators and the scheduler own
//!    (`cordoned`, `draining`, `subnet`, `registered_at`) is kept from the existing record. In
//!    the same transaction the node's `live` key is put on the replica's liveness lease. At
//!    most a few registrations write at once: in a reconnection storm the others wait their
//!    turn.
//! 3. The statuses the agent restored from the machine (`Register.instances`) are written,
//!    fenced like every status report (below).
//! 4. The scheduler answers `welcome`, then the node's full `AssignmentSet`, read from the
//!    [`Cache`] after it caught up with the registration (and with the revision the agent
//!    last applied, so the agent never sees the set as stale).
//! 5. From then on, whenever the node's [`Cache::node_notify`] fires, the session diffs the
//!    node's assignments against what it last sent (instance id → generation, stop, revision
//!    and whether a spec was available) and sends one `AssignmentDelta` carrying every
//!    change, or nothing when nothing changed. The `Notify` is taken before the view is first
//!    read, so no change falls between the initial set and the first delta.
//!
//! An assignment's spec is the `RevisionRecord` of its (workload, generation). When that
//! revision is not in the view the assignment goes out without a spec and with `stop` set:
//! the agent stops the instance rather than run something it cannot describe.
//!
//! # Liveness
//!
//! A node is ready while its `live` key exists. The key hangs on the serving replica's one
//! liveness lease ([`crate::liveness`]); heartbeats touch memory only, and a node silent for
//! `lease_ttl` — even while its stream looks open — has its key deleted. A heartbeat after
//! that puts the key again.
//!
//! When the stream ends or breaks, the key is deliberately **not** deleted at once: it goes
//! `lease_ttl` after the last heartbeat, whatever happened to the connection. An agent that
//! reconnects within that time (to this replica or another one) never shows as NotReady. A
//! new registration of a node supersedes an older session of the same node in this process
//! (the older one ends with `ABORTED`).
//!
//! # Status reports
//!
//! Each reported `InstanceStatus` is written to `keys::status(workload, id)`, but only for
//! instances that the view currently assigns to the reporting node: a stale node cannot
//! overwrite the status of an instance that was re-placed elsewhere (such reports are
//! ignored and logged at debug level). A status equal to the last one written, apart from
//! `observed_at`, is not written again. Reports of every session in the process go to one
//! writer that coalesces what arrives within [`STATUS_COALESCE`] of its last write (a status
//! after a quiet spell is written at once) and writes it in
//! transactions of at most [`MAX_STATUS_OPS`] puts (etcd rejects more than 128 operations per
//! transaction by default); a later status of an instance replaces a pending earlier one.
//!
//! # Relays and network
//!
//! Each session registers its node with the process's [`Relays`] (see [`crate::relay`]) and
//! hands it every logs/exec frame of its agent, without waiting on any client. A node without a
//! subnet gets one of the cluster network at registration, in the registration's transaction
//! ([`crate::network`]); the `welcome` carries it. After the assignment set the session sends
//! `network` (the node's subnet, and every other node's subnet and address), then deltas whenever
//! node records change the peers: one task per process rebuilds a table of every node's route
//! at most once per [`NETWORK_COALESCE`] and logs which nodes changed; each session sends its
//! agent the changes since its last message (the complete list when it is too far behind).
//! `names` (every workload's Ready addresses, for the agents' name responders) go out the same
//! way, from the table of [`crate::names`].
//!
//! # Serving
//!
//! The handler answers at once and runs the session in its own task, so a server-side
//! request `timeout` never cuts a session. Sessions end with `UNAVAILABLE` when the shutdown
//! watch given to [`SessionService::new`] turns true; give the same signal to
//! `serve_with_shutdown`, whose graceful shutdown waits for open streams to finish. Every
//! agent holds one stream for its whole life: do not set `max_concurrent_streams` below the
//! number of agents that may share one connection (tonic's default is no limit), and enable
//! HTTP/2 keep-alive so that streams of vanished agents are noticed and closed.
//!
//! Agents send nothing but `register` until they are welcomed, so a session that waits for
//! the store leaves no unread frames behind; afterwards it reads its stream continuously
//! (h2 closes a whole connection once too many small frames sit unread on it).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use gantry::pb;
use gantry::pb::agent_message::Message as FromAgent;
use gantry::pb::node_session_server::{NodeSession, NodeSessionServer};
use gantry::pb::scheduler_message::Message as ToAgent;
use gantry::selector::{is_dns_label, validate_label_key, validate_label_value};
use gantry::workload::{FieldError, ValidationErrors};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::api::convert;
use crate::cache::{Cache, View};
use crate::changelog::ChangeLog;
use crate::liveness::LiveKeys;
use crate::model::{self, InstanceRecord, NodeRecord, RevisionRecord, Timestamp, keys};
use crate::names::{self, NameTable};
use crate::network::{self, Cidr};
use crate::placement::Resources;
use crate::relay::{Frame, NodeRelays, Relays};
use crate::store::{Compare, Op, Revision, Store, StoreError};

/// How often agents are told to heartbeat unless configured otherwise.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// The TTL of a node's liveness lease unless configured otherwise.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(6);
/// Status reports arriving within this window are written together.
pub const STATUS_COALESCE: Duration = Duration::from_millis(20);
/// Most status puts in one store transaction (etcd's `--max-txn-ops` defaults to 128).
pub const MAX_STATUS_OPS: usize = 120;

/// Status transactions written concurrently by the writer.
const STATUS_TXNS_IN_FLIGHT: usize = 4;
/// Batches of statuses queued for the writer before sessions wait.
const STATUS_QUEUE: usize = 1024;
/// Messages queued for one agent before its session waits.
const OUTBOUND_QUEUE: usize = 16;
/// Node changes within this window go out in one `network` message, so a registration storm
/// does not cost one message per node per session.
const NETWORK_COALESCE: Duration = Duration::from_secs(1);
/// Registrations writing to the store at once. A reconnection storm (a replica failing over
/// thousands of agents) queues here rather than in the store, so that a node's lease is not
/// granted long before the transaction that uses it, and heartbeats of registered nodes are
/// not stuck behind it.
const REGISTRATIONS_IN_FLIGHT: usize = 32;
/// Attempts of the node record's compare-and-swap before registration gives up.
const REGISTER_ATTEMPTS: usize = 5;
/// First delay before the writer retries statuses the store could not take.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest delay between the writer's retries.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Settings of the node sessions served by this scheduler replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// How often agents heartbeat (sent to them in `welcome`).
    pub heartbeat_interval: Duration,
    /// A node turns NotReady this long after its last heartbeat (also the TTL of the
    /// replica's liveness lease). Keep it a few heartbeats long.
    pub lease_ttl: Duration,
    /// The name of this scheduler replica, recorded in the nodes' liveness keys.
    pub identity: String,
    /// The cluster network node subnets are cut from.
    pub cluster_cidr: Cidr,
}

impl SessionConfig {
    /// The default settings (heartbeat every 2 s, lease of 6 s) for replica `identity`.
    pub fn new(identity: impl Into<String>) -> Self {
        SessionConfig {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            lease_ttl: DEFAULT_LEASE_TTL,
            identity: identity.into(),
            cluster_cidr: default_cluster_cidr(),
        }
    }
}

/// [`network::DEFAULT_CLUSTER_CIDR`].
pub fn default_cluster_cidr() -> Cidr {
    network::DEFAULT_CLUSTER_CIDR
        .parse()
        .expect("the default cluster network parses")
}

/// Why a session ended early. Becomes a `tonic::Status` in exactly one place.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The agent's first message was not `register`.
    #[error("the first message of a session must be register")]
    NotRegistered,
    /// The agent sent `register` again within a session.
    #[error("register may only be the first message of a session; open a new session instead")]
    RegisteredTwice,
    /// The agent opened a stream and sent nothing.
    #[error("no register message within {0:?}")]
    RegisterTimeout(Duration),
    /// The registration is invalid; every problem with its field path.
    #[error("invalid register: {0}")]
    InvalidRegister(#[from] ValidationErrors),
    /// The node record kept changing under the registration's compare-and-swap.
    #[error("node {node} kept changing while it was being registered ({attempts} attempts); retry")]
    Conflict {
        /// The node.
        node: String,
        /// How many times the write was tried.
        attempts: usize,
    },
    /// A newer session of the same node replaced this one.
    #[error("a newer session of node {node} replaced this one")]
    Superseded {
        /// The node.
        node: String,
    },
    /// This scheduler replica is stopping.
    #[error("scheduler {identity} is shutting down; reconnect to another replica")]
    ShuttingDown {
        /// The replica.
        identity: String,
    },
    /// The agent's client certificate does not name the node it registers.
    #[error("the client certificate is not valid for node {node}: {reason}")]
    WrongIdentity {
        /// The node name registered.
        node: String,
        /// Why the certificate does not match.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No node subnet is free.
    #[error(transparent)]
    Network(#[from] network::AllocError),
}

impl From<SessionError> for Status {
    fn from(err: SessionError) -> Self {
        let message = err.to_string();
        match err {
            SessionError::NotRegistered
            | SessionError::RegisteredTwice
            | SessionError::InvalidRegister(_) => Status::invalid_argument(message),
            SessionError::RegisterTimeout(_) => Status::deadline_exceeded(message),
            SessionError::Conflict { .. } | SessionError::Superseded { .. } => {
                Status::aborted(message)
            }
            SessionError::ShuttingDown { .. } => Status::unavailable(message),
            SessionError::WrongIdentity { .. } => Status::permission_denied(message),
            SessionError::Store(err) if err.is_retryable() => Status::unavailable(message),
            SessionError::Store(_) => Status::internal(message),
            SessionError::Network(_) => Status::resource_exhausted(message),
        }
    }
}

/// The `NodeSession` gRPC service. Cheap to clone; all clones share their sessions.
#[derive(Clone)]
pub struct SessionService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SessionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionService")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl SessionService {
    /// A service writing to `store` and reading assignments from `cache` (which the caller
    /// keeps running with [`Cache::run`]). Sessions end with `UNAVAILABLE` once `shutdown`
    /// turns true or its sender is dropped.
    pub fn new(
        store: Arc<dyn Store>,
        cache: Cache,
        config: SessionConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let config_identity = config.identity.clone();
        SessionService {
            shared: Arc::new(Shared {
                store,
                cache,
                config,
                shutdown,
                sessions: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                registrations: Semaphore::new(REGISTRATIONS_IN_FLIGHT),
                pending_subnets: Mutex::new(BTreeSet::new()),
                subnet_cursor: AtomicU64::new(0),
                networks: Arc::new(Mutex::new(NetworkTable::default())),
                network_versions: OnceLock::new(),
                names: Arc::new(Mutex::new(NameTable::default())),
                name_versions: OnceLock::new(),
                writer: OnceLock::new(),
                live: OnceLock::new(),
                relays: Relays::new(config_identity),
            }),
        }
    }

    /// The relays of the sessions this service serves, for the `Instances` API.
    pub fn relays(&self) -> Relays {
        self.shared.relays.clone()
    }

    /// The service, ready for `tonic::transport::Server::add_service`.
    pub fn server(self) -> NodeSessionServer<SessionService> {
        NodeSessionServer::new(self)
    }
}

#[tonic::async_trait]
impl NodeSession for SessionService {
    type SessionStream = ReceiverStream<Result<pb::SchedulerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        if *self.shared.shutdown.borrow() {
            return Err(SessionError::ShuttingDown {
                identity: self.shared.config.identity.clone(),
            }
            .into());
        }
        let peer = request.remote_addr();
        // With mTLS, the verified chain of the agent's certificate (leaf first).
        let certs = request.peer_certs();
        let inbound = request.into_inner();
        let (out, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let shared = self.shared.clone();
        tokio::spawn(async move { shared.run(inbound, out, peer, certs).await });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Outbound = mpsc::Sender<Result<pb::SchedulerMessage, Status>>;

struct Shared {
    store: Arc<dyn Store>,
    cache: Cache,
    config: SessionConfig,
    shutdown: watch::Receiver<bool>,
    /// The session serving each node in this process: its id, and how to end it.
    sessions: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
    next_session: AtomicU64,
    /// Bounds the registrations in flight.
    registrations: Semaphore,
    /// The status writer, started by the first session (a runtime is needed to spawn it).
    writer: OnceLock<mpsc::Sender<Vec<StatusWrite>>>,
    /// The live keys of the nodes served here, started by the first session.
    live: OnceLock<LiveKeys>,
    /// The logs and exec relays of the sessions served here.
    relays: Relays,
    /// Subnets picked by registrations in flight, not yet written (see [`network::claim`]).
    pending_subnets: Mutex<BTreeSet<Cidr>>,
    /// Where the next subnet search starts: after this replica's last pick.
    subnet_cursor: AtomicU64,
    /// Every node's network, built once per change for all sessions.
    networks: Arc<Mutex<NetworkTable>>,
    /// The network table's version, published by its maintainer (started by the first
    /// session).
    network_versions: OnceLock<watch::Receiver<u64>>,
    /// Every workload's Ready addresses, built once per change for all sessions.
    names: Arc<Mutex<NameTable>>,
    /// The name table's version, published by its maintainer (started by the first session).
    name_versions: OnceLock<watch::Receiver<u64>>,
}

/// One status put, encoded.
struct StatusWrite {
    key: String,
    value: Vec<u8>,
}

/// What was last sent of one assignment; a difference means "send it again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    generation: u64,
    stop: bool,
    revision: Revision,
    has_spec: bool,
}

/// An assignment to send, read from the view.
struct Planned {
    record: InstanceRecord,
    revision: Revision,
    spec: Option<Arc<RevisionRecord>>,
}

/// What one session knows of its node.
struct NodeState {
    name: String,
    /// This session's id in the process.
    session: u64,
    /// Assignments as last sent, by instance id.
    sent: HashMap<String, Sent>,
    /// Statuses this session last queued for writing, by instance id.
    reported: HashMap<String, model::InstanceStatus>,
    /// This session's logs and exec relays.
    relays: NodeRelays,
    /// The network as last sent: the table's version, and the node's own subnet.
    network: Option<(u64, String)>,
    /// The version of the name table last sent.
    names: Option<u64>,
}

/// Rebuilds `table` from the cache whenever nodes change, at most once per
/// [`NETWORK_COALESCE`], and publishes its version.
async fn maintain_networks(cache: Cache, table: Arc<Mutex<NetworkTable>>, tx: watch::Sender<u64>) {
    let mut membership = cache.membership();
    loop {
        {
            let mut table = table.lock().expect("network table lock");
            table.refresh(&cache.read());
            let version = table.version();
            tx.send_if_modified(|v| std::mem::replace(v, version) != version);
        }
        if membership.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(NETWORK_COALESCE).await;
    }
}

/// Every node's route target (its subnet and address), built once per change of the nodes for
/// all the sessions of the process, with a log of which nodes each version changed: a session
/// sends only the changes since its last `network` message, so that N nodes joining cost each
/// session O(N) routes in all, not O(N) per message. The routes of a message are encoded once
/// per (version, starting point) and shared by every session at that point.
#[derive(Debug, Default)]
struct NetworkTable {
    /// `View::membership` the table was built at.
    membership: Option<u64>,
    /// Node → (subnet, address), for nodes that have a subnet.
    nodes: BTreeMap<String, (String, String)>,
    /// The version, and which nodes each recent version changed.
    log: ChangeLog,
    /// Messages of the current version, by the version they start from (`None`: the
    /// complete list).
    encoded: HashMap<Option<u64>, Arc<SharedNetwork>>,
}

/// The routes of one `network` message, encoded for every session it goes to.
#[derive(Debug)]
struct SharedNetwork {
    /// An encoded `PeerRoutes`.
    routes: prost::bytes::Bytes,
    /// Nodes whose route is gone (deltas only).
    removed: Vec<String>,
    /// The nodes the message names, when it names exactly one (a session skips a delta that
    /// only names its own node).
    only: Option<String>,
}

impl NetworkTable {
    /// Brings the table up to `view` (a no-op while the view's nodes did not change).
    fn refresh(&mut self, view: &View) {
        if self.membership == Some(view.membership) {
            return;
        }
        self.membership = Some(view.membership);
        let nodes: BTreeMap<String, (String, String)> = view
            .nodes
            .iter()
            .filter_map(|(name, v)| {
                let subnet = v.value.subnet.clone()?;
                Some((name.clone(), (subnet, v.value.address.clone())))
            })
            .collect();
        let mut changed: Vec<String> = nodes
            .iter()
            .filter(|(name, entry)| self.nodes.get(*name) != Some(*entry))
            .map(|(name, _)| name.clone())
            .collect();
        changed.extend(
            self.nodes
                .keys()
                .filter(|name| !nodes.contains_key(*name))
                .cloned(),
        );
        if changed.is_empty() {
            return;
        }
        self.nodes = nodes;
        self.encoded.clear();
        self.log.record(changed);
    }

    /// The current version.
    fn version(&self) -> u64 {
        self.log.version()
    }

    /// The message taking a session from version `since` (`None`: nothing sent yet) to the
    /// current version, with whether it is a delta; encoded at most once per starting point.
    fn message(&mut self, since: Option<u64>) -> (Arc<SharedNetwork>, bool) {
        let changes = since.and_then(|since| self.log.changes_since(since));
        let key = changes.is_some().then_some(since).flatten();
        if let Some(shared) = self.encoded.get(&key) {
            return (shared.clone(), key.is_some());
        }
        let route = |node: &str, (subnet, address): &(String, String)| pb::PeerRoute {
            node: node.to_owned(),
            subnet: subnet.clone(),
            address: address.clone(),
        };
        let (peers, removed, only) = match &changes {
            Some(changes) => {
                let mut peers = Vec::new();
                let mut removed = Vec::new();
                for &node in changes {
                    match self.nodes.get(node) {
                        Some(entry) if !entry.1.is_empty() => peers.push(route(node, entry)),
                        _ => removed.push(node.to_owned()),
                    }
                }
                let only = (changes.len() == 1)
                    .then(|| changes.iter().next().map(|n| (*n).to_owned()))
                    .flatten();
                (peers, removed, only)
            }
            None => (
                self.nodes
                    .iter()
                    .filter(|(_, (_, address))| !address.is_empty())
                    .map(|(node, entry)| route(node, entry))
                    .collect(),
                Vec::new(),
                None,
            ),
        };
        let routes = prost::Message::encode_to_vec(&pb::PeerRoutes { peers }).into();
        let shared = Arc::new(SharedNetwork {
            routes,
            removed,
            only,
        });
        self.encoded.insert(key, shared.clone());
        (shared, key.is_some())
    }
}

/// This session's claim on its node within the process. Dropping it releases the claim.
struct Attachment {
    shared: Arc<Shared>,
    node: String,
    id: u64,
    notify: Arc<Notify>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut sessions = self.shared.sessions.lock().expect("sessions lock");
        self.shared.live().detached(&self.node, self.id);
        if sessions
            .get(&self.node)
            .is_some_and(|(id, _)| *id == self.id)
        {
            sessions.remove(&self.node);
            self.shared.cache.forget_node_notify(&self.node);
        } else {
            // Superseded: the successor waits on the same `Notify`; hand over a wake-up this
            // session may have consumed (a spurious one costs a diff that finds nothing).
            self.notify.notify_one();
        }
    }
}

impl Shared {
    async fn run(
        self: Arc<Self>,
        mut inbound: Streaming<pb::AgentMessage>,
        out: Outbound,
        peer: Option<SocketAddr>,
        certs: Option<Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
    ) {
        let result = self.serve(&mut inbound, &out, certs.as_deref()).await;
        match result {
            Ok(()) => debug!(?peer, "node session ended"),
            Err(err) => {
                match &err {
                    SessionError::Store(_) | SessionError::Conflict { .. } => {
                        warn!(?peer, %err, "node session failed")
                    }
                    _ => debug!(?peer, %err, "node session ended"),
                }
                let _ = out.send(Err(err.into())).await;
            }
        }
    }

    async fn serve(
        self: &Arc<Self>,
        inbound: &mut Streaming<pb::AgentMessage>,
        out: &Outbound,
        certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>,
    ) -> Result<(), SessionError> {
        let mut shutdown_rx = self.shutdown.clone();
        let shutdown = async move {
            // A dropped sender counts as shutdown: nobody can stop the sessions any more.
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        };
        tokio::pin!(shutdown);
        let shutting_down = || SessionError::ShuttingDown {
            identity: self.config.identity.clone(),
        };

        let ttl = self.config.lease_ttl;
        let register = tokio::select! {
            biased;
            () = &mut shutdown => return Err(shutting_down()),
            first = tokio::time::timeout(ttl, inbound.message()) => match first {
                Err(_) => return Err(SessionError::RegisterTimeout(ttl)),
                Ok(Err(status)) => {
                    debug!(%status, "stream broke before register");
                    return Ok(());
                }
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(pb::AgentMessage { message: Some(FromAgent::Register(register)) }))) => {
                    register
                }
                Ok(Ok(Some(_))) => return Err(SessionError::NotRegistered),
            },
        };
        let now = Timestamp::now();
        let registration = registration(register, now)?;
        let name = registration.node.name.clone();
        if let Some(leaf) = certs.and_then(|chain| chain.first()) {
            check_identity(leaf, &name)?;
        }

        // Claim the node and take its wake-up before anything is read from the view.
        let (attachment, mut superseded) = self.attach(&name);
        let notify = attachment.notify.clone();
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let (record, node_revision) = self
            .register_node(&registration.node, attachment.id)
            .await?;
        info!(node = %name, boot_id = %record.boot_id, "node registered");
        let caught_up = node_revision.max(registration.applied_revision);
        if tokio::time::timeout(ttl, self.cache.wait_for(caught_up))
            .await
            .is_err()
        {
            warn!(node = %name, revision = caught_up, "store replica is behind; sending assignments as it is");
        }

        let relays = self.relays.attach(&name, out.clone());
        let mut state = NodeState {
            name,
            session: attachment.id,
            sent: HashMap::new(),
            reported: HashMap::new(),
            relays,
            network: None,
            names: None,
        };
        let mut network_versions = self.network_versions();
        let mut name_versions = self.name_versions();
        self.record_statuses(&mut state, registration.instances)
            .await;

        let (welcome, revision, planned) = {
            let view = self.cache.read();
            let count = view.by_node.get(&state.name).map_or(0, |set| set.len());
            let welcome = pb::Welcome {
                node: Some(node_to_pb(&record, node_revision, count, now)),
                heartbeat_interval: Some(duration_to_pb(self.config.heartbeat_interval)),
                lease_ttl: Some(duration_to_pb(ttl)),
                scheduler: self.config.identity.clone(),
            };
            let (planned, _) = plan(&view, &state.name, &mut state.sent, true);
            (welcome, view.revision, planned)
        };
        if !send(out, ToAgent::Welcome(welcome)).await {
            return Ok(());
        }
        let set = pb::AssignmentSet {
            revision,
            assignments: planned.into_iter().map(assignment_to_pb).collect(),
        };
        if !send(out, ToAgent::Assignments(set)).await {
            return Ok(());
        }
        network_versions.mark_unchanged();
        if !self.send_network(&mut state, out).await {
            return Ok(());
        }
        name_versions.mark_unchanged();
        if !self.send_names(&mut state, out).await {
            return Ok(());
        }

        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Err(shutting_down()),
                _ = &mut superseded => return Err(SessionError::Superseded { node: state.name }),
                () = out.closed() => return Ok(()),
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.handle(&mut state, message).await?,
                    Ok(None) => return Ok(()),
                    Err(status) => {
                        debug!(node = %state.name, %status, "agent stream broke");
                        return Ok(());
                    }
                },
                () = &mut notified => {
                    notified.set(notify.notified());
                    notified.as_mut().enable();
                    if !self.send_changes(&mut state, out).await {
                        return Ok(());
                    }
                }
                Ok(()) = network_versions.changed() => {
                    if !self.send_network(&mut state, out).await {
                        return Ok(());
                    }
                }
                Ok(()) = name_versions.changed() => {
                    if !self.send_names(&mut state, out).await {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Claims node `name` for a new session, ending an older session of it in this process,
    /// and returns the claim and the signal that a newer session took over.
    fn attach(self: &Arc<Self>, name: &str) -> (Attachment, oneshot::Receiver<()>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let previous = self
            .sessions
            .lock()
            .expect("sessions lock")
            .insert(name.to_owned(), (id, tx));
        if let Some((_, end)) = previous {
            info!(node = %name, "node registered again; ending its older session");
            let _ = end.send(());
        }
        // Taken after the claim: a predecessor forgets the `Notify` only while it still holds
        // the claim, so this one is the one the cache pokes.
        let notify = self.cache.node_notify(name);
        let attachment = Attachment {
            shared: self.clone(),
            node: name.to_owned(),
            id,
            notify,
        };
        (attachment, rx)
    }

    /// Upserts the node record and puts its `live` key on the replica's lease for session
    /// `session`; returns the record as written and the revision of its last write.
    async fn register_node(
        &self,
        registered: &NodeRecord,
        session: u64,
    ) -> Result<(NodeRecord, Revision), SessionError> {
        // The semaphore is never closed.
        let _permit = self.registrations.acquire().await;
        let name = &registered.name;
        let key = keys::node(name);
        let live_keys = self.live();
        let live = live_keys.value();
        for _ in 0..REGISTER_ATTEMPTS {
            let lease = live_keys.lease().await?;
            let current = self.store.get(key.as_bytes()).await?;
            let (existing, expected) = match &current {
                None => (None, 0),
                Some(kv) => match model::decode::<NodeRecord>(&kv.value) {
                    Ok(record) => (Some(record), kv.mod_revision),
                    Err(err) => {
                        warn!(node = %name, %err, "unreadable node record; replacing it");
                        (None, kv.mod_revision)
                    }
                },
            };
            let mut record = merge_node(registered, existing.as_ref());
            let mut ops = vec![Op::put_with_lease(keys::live(name), live.clone(), lease)];
            let mut compare = vec![Compare::mod_revision(key.clone(), expected)];
            let mut picked = None;
            if record.subnet.is_none() {
                // Picked and marked pending under one lock, so that concurrent registrations
                // of this replica never pick the same subnet.
                let claim = {
                    let mut pending = self.pending_subnets.lock().expect("pending lock");
                    let start = self.subnet_cursor.load(Ordering::Relaxed);
                    let claim = network::claim(
                        &self.cache.read(),
                        self.config.cluster_cidr,
                        name,
                        &pending,
                        start,
                    )?;
                    pending.insert(claim.subnet);
                    claim
                };
                info!(node = %name, subnet = %claim.subnet, "node subnet allocated");
                record.subnet = Some(claim.subnet.to_string());
                if let Some(index) = claim.index {
                    self.subnet_cursor.store(index + 1, Ordering::Relaxed);
                }
                picked = Some(claim.subnet);
                compare.extend(claim.compares);
                ops.extend(claim.ops);
            }
            let unchanged = existing.as_ref() == Some(&record);
            if !unchanged {
                ops.push(Op::put(key.clone(), model::encode(&record)));
            }
            let result = self.store.txn(compare, ops, Vec::new()).await;
            if let Some(subnet) = picked {
                self.pending_subnets
                    .lock()
                    .expect("pending lock")
                    .remove(&subnet);
            }
            let result = match result {
                Err(StoreError::LeaseNotFound { .. }) => {
                    // The replica could not reach the store for a TTL: replace the lease and
                    // try again.
                    debug!(node = %name, "liveness lease expired before registration; retrying");
                    live_keys.replace_lost(lease).await?;
                    continue;
                }
                result => result?,
            };
            if result.succeeded {
                live_keys.registered(name, session, result.revision);
                let revision = if unchanged { expected } else { result.revision };
                return Ok((record, revision));
            }
            debug!(node = %name, "node record changed during registration; retrying");
        }
        Err(SessionError::Conflict {
            node: name.clone(),
            attempts: REGISTER_ATTEMPTS,
        })
    }

    fn live(&self) -> &LiveKeys {
        self.live.get_or_init(|| {
            LiveKeys::start(
                self.store.clone(),
                self.config.lease_ttl,
                self.config.identity.clone(),
                self.shutdown.clone(),
            )
        })
    }

    async fn handle(
        &self,
        state: &mut NodeState,
        message: pb::AgentMessage,
    ) -> Result<(), SessionError> {
        let pb::AgentMessage { message } = message;
        match message {
            Some(FromAgent::Heartbeat(pb::Heartbeat { .. })) => {
                self.live().heartbeat(&state.name, state.session).await
            }
            Some(FromAgent::Status(pb::StatusReport { instances })) => {
                let now = Timestamp::now();
                let mut statuses = Vec::with_capacity(instances.len());
                for status in instances {
                    match status_from_pb(status, now) {
                        Ok(status) => statuses.push(status),
                        Err(err) => {
                            warn!(node = %state.name, %err, "invalid instance status ignored")
                        }
                    }
                }
                self.record_statuses(state, statuses).await;
            }
            Some(FromAgent::Register(_)) => return Err(SessionError::RegisteredTwice),
            Some(FromAgent::Logs(frame)) => state.relays.deliver(Frame::Logs(frame)),
            Some(FromAgent::ExecOutput(frame)) => state.relays.deliver(Frame::Exec(frame)),
            Some(FromAgent::RelayEnd(end)) => state.relays.deliver(Frame::End(end)),
            Some(FromAgent::Stats(reply)) => state.relays.deliver(Frame::Stats(reply)),
            Some(FromAgent::Images(reply)) => state.relays.deliver(Frame::Images(reply)),
            Some(FromAgent::ImageProgress(frame)) => {
                state.relays.deliver(Frame::ImageProgress(frame))
            }
            None => debug!(node = %state.name, "empty agent message ignored"),
        }
        Ok(())
    }

    /// Queues the statuses of the instances the view assigns to this node, unless equal to
    /// what was last written; ignores the others (fencing).
    async fn record_statuses(
        &self,
        state: &mut NodeState,
        statuses: Vec<(String, model::InstanceStatus)>,
    ) {
        if statuses.is_empty() {
            return;
        }
        let writes: Vec<StatusWrite> = {
            let view = self.cache.read();
            let assigned: HashMap<&str, &str> = view
                .by_node
                .get(&state.name)
                .into_iter()
                .flatten()
                .map(|(workload, id)| (id.as_str(), workload.as_str()))
                .collect();
            let mut writes = Vec::with_capacity(statuses.len());
            for (id, status) in statuses {
                let Some(workload) = assigned.get(id.as_str()) else {
                    debug!(node = %state.name, instance = %id, "status of an instance not assigned to this node ignored");
                    continue;
                };
                // What this session queued last is newer than the view, which may not show it
                // yet.
                let last = state.reported.get(&id).or_else(|| view.statuses.get(&id));
                if last.is_some_and(|last| same_apart_from_observed_at(last, &status)) {
                    continue;
                }
                writes.push(StatusWrite {
                    key: keys::status(workload, &id),
                    value: model::encode(&status),
                });
                state.reported.insert(id, status);
            }
            writes
        };
        if writes.is_empty() {
            return;
        }
        if self.writer().send(writes).await.is_err() {
            warn!(node = %state.name, "status writer stopped; statuses dropped");
        }
    }

    /// The network table's versions; the first call starts the task that rebuilds the table
    /// when nodes change (at most once per [`NETWORK_COALESCE`]), so that a registration storm
    /// costs one rebuild per window in the process, not one per session.
    fn network_versions(&self) -> watch::Receiver<u64> {
        self.network_versions
            .get_or_init(|| {
                let (tx, rx) = watch::channel(0);
                tokio::spawn(maintain_networks(
                    self.cache.clone(),
                    self.networks.clone(),
                    tx,
                ));
                rx
            })
            .clone()
    }

    /// The name table's versions; the first call starts the task that rebuilds the table when
    /// Ready addresses change (at most once per [`names::NAMES_COALESCE`]).
    fn name_versions(&self) -> watch::Receiver<u64> {
        self.name_versions
            .get_or_init(|| {
                let (tx, rx) = watch::channel(0);
                tokio::spawn(names::maintain(self.cache.clone(), self.names.clone(), tx));
                rx
            })
            .clone()
    }

    /// Sends the workloads' Ready addresses when they changed since they were last sent — the
    /// complete table first, then only what changed; returns false when the agent's stream is
    /// gone.
    async fn send_names(&self, state: &mut NodeState, out: &Outbound) -> bool {
        let (version, shared) = {
            let mut table = self.names.lock().expect("name table lock");
            if !table.is_built() {
                table.refresh(&self.cache.read(), self.cache.take_endpoint_changes());
            }
            (table.version(), table.message(state.names))
        };
        state.names = Some(version);
        if shared.is_empty() {
            return true;
        }
        send(out, ToAgent::Names(shared.to_pb())).await
    }

    fn writer(&self) -> &mpsc::Sender<Vec<StatusWrite>> {
        self.writer.get_or_init(|| {
            let (tx, rx) = mpsc::channel(STATUS_QUEUE);
            tokio::spawn(write_statuses(self.store.clone(), rx));
            tx
        })
    }

    /// Sends the node's network (its subnet, the other nodes' routes) when it changed since it
    /// was last sent — the complete list first, then only what changed (`delta`); returns
    /// false when the agent's stream is gone.
    async fn send_network(&self, state: &mut NodeState, out: &Outbound) -> bool {
        let (version, own_subnet, message) = {
            let mut table = self.networks.lock().expect("network table lock");
            if table.membership.is_none() {
                table.refresh(&self.cache.read());
            }
            let Some((own_subnet, _)) = table.nodes.get(&state.name) else {
                // No subnet yet: nothing to say.
                return true;
            };
            let own_subnet = own_subnet.clone();
            let same_subnet = state.network.as_ref().map(|(_, s)| s) == Some(&own_subnet);
            let since = state
                .network
                .as_ref()
                .filter(|_| same_subnet)
                .map(|(sent, _)| *sent);
            (table.version(), own_subnet, table.message(since))
        };
        let (shared, delta) = message;
        let nothing_new = delta
            && (shared.routes.is_empty() && shared.removed.is_empty()
                || shared.only.as_deref() == Some(state.name.as_str()));
        state.network = Some((version, own_subnet.clone()));
        if nothing_new {
            return true;
        }
        let config = pb::NetworkConfig {
            subnet: own_subnet,
            cluster_cidr: self.config.cluster_cidr.to_string(),
            delta,
            removed_peers: shared.removed.clone(),
            routes: shared.routes.clone(),
        };
        send(out, ToAgent::Network(config)).await
    }

    /// Sends what changed in the node's assignments since the last message, if anything;
    /// returns false when the agent's stream is gone.
    async fn send_changes(&self, state: &mut NodeState, out: &Outbound) -> bool {
        let (revision, planned, removals) = {
            let view = self.cache.read();
            let (planned, removals) = plan(&view, &state.name, &mut state.sent, false);
            (view.revision, planned, removals)
        };
        if planned.is_empty() && removals.is_empty() {
            return true;
        }
        for id in &removals {
            state.reported.remove(id);
        }
        let delta = pb::AssignmentDelta {
            revision,
            upserts: planned.into_iter().map(assignment_to_pb).collect(),
            removals,
        };
        send(out, ToAgent::AssignmentDelta(delta)).await
    }
}

/// Checks that a node's (already verified) client certificate names `node` as a DNS name,
/// so that one node's certificate cannot register another node.
pub(crate) fn check_identity(
    leaf: &tonic::transport::CertificateDer<'static>,
    node: &str,
) -> Result<(), SessionError> {
    use rustls_pki_types::ServerName;
    let wrong = |reason: String| SessionError::WrongIdentity {
        node: node.to_owned(),
        reason,
    };
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| wrong(format!("{e:?}")))?;
    let name = ServerName::try_from(node).map_err(|e| wrong(e.to_string()))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|e| wrong(format!("{e:?}")))
}

/// Sends one message; returns false when the agent's stream is gone.
async fn send(out: &Outbound, message: ToAgent) -> bool {
    out.send(Ok(pb::SchedulerMessage {
        message: Some(message),
    }))
    .await
    .is_ok()
}

/// The node's assignments that differ from `sent` (all of them when `full`), updating
/// `sent`, and the ids that are no longer assigned.
fn plan(
    view: &View,
    node: &str,
    sent: &mut HashMap<String, Sent>,
    full: bool,
) -> (Vec<Planned>, Vec<String>) {
    if full {
        sent.clear();
    }
    let mut planned = Vec::new();
    let mut present = HashSet::new();
    for (workload, id) in view.by_node.get(node).into_iter().flatten() {
        let Some(versioned) = view.instance(workload, id) else {
            continue;
        };
        present.insert(id.as_str());
        let record = &versioned.value;
        let spec = view.revision_of(workload, record.generation).cloned();
        let now = Sent {
            generation: record.generation,
            stop: record.stopping() || spec.is_none(),
            revision: versioned.mod_revision,
            has_spec: spec.is_some(),
        };
        if sent.get(id) == Some(&now) {
            continue;
        }
        sent.insert(id.clone(), now);
        planned.push(Planned {
            record: record.clone(),
            revision: versioned.mod_revision,
            spec,
        });
    }
    let mut removals: Vec<String> = sent
        .keys()
        .filter(|id| !present.contains(id.as_str()))
        .cloned()
        .collect();
    removals.sort_unstable();
    for id in &removals {
        sent.remove(id);
    }
    (planned, removals)
}

/// Writes queued statuses until every sender is gone: at most one write per
/// [`STATUS_COALESCE`] (the first after a quiet spell at once), what arrived meanwhile going
/// out together, a later status of an
/// instance replacing an earlier one, in transactions of at most [`MAX_STATUS_OPS`] puts.
/// Statuses the store could not take for a retryable reason are retried with backoff.
async fn write_statuses(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Vec<StatusWrite>>) {
    let mut pending: HashMap<String, Vec<u8>> = HashMap::new();
    let mut open = true;
    let mut backoff = RETRY_MIN;
    // The window is counted from the last write: a status arriving after a quiet spell is
    // written at once, while a burst is written every STATUS_COALESCE.
    let mut last_write = tokio::time::Instant::now()
        .checked_sub(STATUS_COALESCE)
        .unwrap_or_else(tokio::time::Instant::now);
    loop {
        if pending.is_empty() {
            if !open {
                return;
            }
            match rx.recv().await {
                Some(batch) => merge_writes(&mut pending, batch),
                None => return,
            }
        }
        let window = tokio::time::sleep_until(last_write + STATUS_COALESCE);
        tokio::pin!(window);
        while open {
            tokio::select! {
                biased;
                () = &mut window => break,
                batch = rx.recv() => match batch {
                    Some(batch) => merge_writes(&mut pending, batch),
                    None => open = false,
                },
            }
        }
        last_write = tokio::time::Instant::now();
        if flush_statuses(&*store, &mut pending).await {
            backoff = RETRY_MIN;
            continue;
        }
        if !open {
            warn!(
                statuses = pending.len(),
                "store unavailable at shutdown; statuses dropped"
            );
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(RETRY_MAX);
    }
}

fn merge_writes(pending: &mut HashMap<String, Vec<u8>>, batch: Vec<StatusWrite>) {
    for StatusWrite { key, value } in batch {
        pending.insert(key, value);
    }
}

/// Writes everything pending; puts back what failed for a retryable reason (unless a newer
/// status of the same instance is already pending). Returns whether everything was written.
async fn flush_statuses(store: &dyn Store, pending: &mut HashMap<String, Vec<u8>>) -> bool {
    let mut chunks: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    for (n, write) in pending.drain().enumerate() {
        if n % MAX_STATUS_OPS == 0 {
            chunks.push(Vec::with_capacity(MAX_STATUS_OPS));
        }
        if let Some(chunk) = chunks.last_mut() {
            chunk.push(write);
        }
    }
    let results: Vec<_> = futures::stream::iter(chunks)
        .map(|chunk| async move {
            let ops = chunk
                .iter()
                .map(|(key, value)| Op::put(key.as_bytes(), value.as_slice()))
                .collect();
            (store.txn(Vec::new(), ops, Vec::new()).await, chunk)
        })
        .buffer_unordered(STATUS_TXNS_IN_FLIGHT)
        .collect()
        .await;
    let mut all_written = true;
    for (result, chunk) in results {
        match result {
            Ok(_) => debug!(statuses = chunk.len(), "instance statuses written"),
            Err(err) if err.is_retryable() => {
                warn!(
                    ?err,
                    statuses = chunk.len(),
                    "writing instance statuses failed; will retry"
                );
                all_written = false;
                for (key, value) in chunk {
                    pending.entry(key).or_insert(value);
                }
            }
            Err(err) => {
                warn!(
                    ?err,
                    statuses = chunk.len(),
                    "writing instance statuses failed; dropped"
                )
            }
        }
    }
    all_written
}

fn same_apart_from_observed_at(old: &model::InstanceStatus, new: &model::InstanceStatus) -> bool {
    let mut aligned = new.clone();
    aligned.observed_at = old.observed_at;
    *old == aligned
}

/// A validated registration.
struct Registration {
    /// The node as the agent describes it (`registered_at` = now, nothing operator-owned).
    node: NodeRecord,
    /// Revision of the last assignments the agent applied.
    applied_revision: Revision,
    /// Statuses restored from the machine, by instance id.
    instances: Vec<(String, model::InstanceStatus)>,
}

/// Checks a registration; every problem is reported with its field path.
fn registration(register: pb::Register, now: Timestamp) -> Result<Registration, ValidationErrors> {
    let pb::Register {
        name,
        labels,
        capacity,
        allocatable,
        address,
        os,
        arch,
        runtime,
        agent_version,
        kernel_version,
        os_image,
        boot_id,
        applied_revision,
        instances,
    } = register;
    let mut errors = Vec::new();
    if !is_dns_label(&name) {
        errors.push(field_error(
            "register.name",
            format!(
                "'{name}' is not a DNS label (1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit)"
            ),
        ));
    }
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    for (key, value) in &labels {
        let path = format!("register.labels[{key:?}]");
        if let Err(err) = validate_label_key(key) {
            errors.push(field_error(&path, err.to_string()));
        }
        if let Err(err) = validate_label_value(value) {
            errors.push(field_error(&path, err.to_string()));
        }
    }
    let capacity = resources_from_pb("register.capacity", capacity, &mut errors);
    let allocatable = resources_from_pb("register.allocatable", allocatable, &mut errors);
    let mut restored = Vec::with_capacity(instances.len());
    for (i, status) in instances.into_iter().enumerate() {
        match status_from_pb(status, now) {
            Ok(status) => restored.push(status),
            Err(err) => errors.push(field_error(
                format!("register.instances[{i}].{}", err.path),
                err.message,
            )),
        }
    }
    if !errors.is_empty() {
        return Err(ValidationErrors(errors));
    }
    Ok(Registration {
        node: NodeRecord {
            name,
            labels,
            capacity,
            allocatable,
            address,
            os,
            arch,
            runtime,
            agent_version,
            kernel_version,
            os_image,
            boot_id,
            registered_at: now,
            cordoned: false,
            draining: false,
            subnet: None,
        },
        applied_revision,
        instances: restored,
    })
}

/// The registered node, keeping what operators and the scheduler own from `existing`.
fn merge_node(registered: &NodeRecord, existing: Option<&NodeRecord>) -> NodeRecord {
    let mut record = registered.clone();
    if let Some(existing) = existing {
        record.registered_at = existing.registered_at;
        record.cordoned = existing.cordoned;
        record.draining = existing.draining;
        record.subnet = existing.subnet.clone();
    }
    record
}

fn field_error(path: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        path: path.into(),
        message: message.into(),
    }
}

/// Node resources from the wire, where all three amounts are required.
fn resources_from_pb(
    path: &str,
    resources: Option<pb::Resources>,
    errors: &mut Vec<FieldError>,
) -> Resources {
    let Some(resources) = resources else {
        errors.push(field_error(path, "required"));
        return Resources::ZERO;
    };
    let (resources, problems) = convert::resource_amounts(path, resources, "required");
    errors.extend(problems);
    resources
}

/// An agent's instance status as the store keeps it, with the instance id; a missing
/// `observed_at` is `now`.
fn status_from_pb(
    status: pb::InstanceStatus,
    now: Timestamp,
) -> Result<(String, model::InstanceStatus), FieldError> {
    convert::instance_status_with(
        status,
        now,
        || field_error("instance_id", "required"),
        |state, instance_id| {
            pb::InstanceState::try_from(state)
                .ok()
                .and_then(convert::instance_state)
                .ok_or_else(|| {
                    field_error(
                        "state",
                        format!("{state} is not an instance state (instance {instance_id})"),
                    )
                })
        },
    )
}

/// The node as `welcome` shows it: ready, as just registered.
fn node_to_pb(
    record: &NodeRecord,
    revision: Revision,
    instances: usize,
    now: Timestamp,
) -> pb::Node {
    let NodeRecord {
        name,
        labels,
        capacity,
        allocatable,
        address,
        os,
        arch,
        runtime,
        agent_version,
        kernel_version,
        os_image,
        boot_id: _,
        registered_at,
        cordoned,
        draining,
        subnet,
    } = record.clone();
    pb::Node {
        name,
        labels: labels.into_iter().collect(),
        capacity: Some(convert::resources_to_pb(capacity)),
        allocatable: Some(convert::resources_to_pb(allocatable)),
        allocated: None,
        address,
        os,
        arch,
        runtime,
        agent_version,
        kernel_version,
        os_image,
        readiness: pb::NodeReadiness::Ready.into(),
        cordoned,
        draining,
        subnet: subnet.unwrap_or_default(),
        last_heartbeat: Some(now.into()),
        registered_at: Some(registered_at.into()),
        readiness_changed_at: None,
        instance_count: u32::try_from(instances).unwrap_or(u32::MAX),
        revision,
    }
}

fn assignment_to_pb(planned: Planned) -> pb::Assignment {
    let Planned {
        record,
        revision,
        spec,
    } = planned;
    let stop = record.stopping() || spec.is_none();
    pb::Assignment {
        instance_id: record.id,
        workload: record.workload,
        generation: record.generation,
        spec: spec.map(|revision| pb::WorkloadSpec::from(&revision.spec)),
        revision,
        stop,
    }
}

fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A scheduler serving node sessions over real TCP on an embedded store, and records to
    //! put in front of it; shared by the session and sim tests.

    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    use gantry::workload::{Format, Workload, parse};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;
    use tonic::transport::server::TcpIncoming;

    use super::{SessionConfig, SessionService};
    use crate::cache::Cache;
    use crate::model::{self, InstanceRecord, RevisionRecord, Timestamp, keys};
    use crate::store::{Revision, Store};

    /// An embedded store in a temp dir, as the use-case tests make it.
    pub(crate) use crate::ops::testing::store;

    /// Session settings for tests: short lease, quick heartbeats.
    pub(crate) fn config(identity: &str, lease_ttl: Duration) -> SessionConfig {
        SessionConfig {
            heartbeat_interval: lease_ttl / 4,
            lease_ttl,
            identity: identity.to_owned(),
            // Room for the hundreds of simulated nodes some tests register.
            cluster_cidr: "10.64.0.0/12".parse().expect("a cluster network"),
        }
    }

    /// One scheduler replica: its own cache and a NodeSession server on 127.0.0.1.
    pub(crate) struct Scheduler {
        pub(crate) addr: String,
        shutdown: watch::Sender<bool>,
        server: JoinHandle<()>,
        replica: JoinHandle<()>,
    }

    impl Scheduler {
        pub(crate) async fn start(store: Arc<dyn Store>, config: SessionConfig) -> Scheduler {
            let (shutdown, rx) = watch::channel(false);
            let cache = Cache::new();
            let replica = tokio::spawn({
                let cache = cache.clone();
                let store = store.clone();
                let stop = signal(rx.clone());
                async move { cache.run(store, stop).await }
            });
            cache.synced().await;
            let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = format!("http://{}", incoming.local_addr().unwrap());
            let service = SessionService::new(store, cache.clone(), config, rx.clone());
            let server = tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(service.server())
                    .serve_with_incoming_shutdown(incoming, signal(rx))
                    .await
                    .expect("session server");
            });
            Scheduler {
                addr,
                shutdown,
                server,
                replica,
            }
        }

        /// Ends every session and stops the server, as the process would on SIGTERM.
        pub(crate) async fn stop(self) {
            self.shutdown.send_replace(true);
            tokio::time::timeout(Duration::from_secs(10), self.server)
                .await
                .expect("server stops")
                .unwrap();
            self.replica.await.unwrap();
        }
    }

    async fn signal(mut rx: watch::Receiver<bool>) {
        let _ = rx.wait_for(|stop| *stop).await;
    }

    pub(crate) fn workload(name: &str, image: &str) -> Workload {
        let yaml = format!("kind: Service\nname: {name}\nimage: {image}\nreplicas: 1\n");
        parse(&yaml, Format::Yaml)
            .expect("test spec parses")
            .remove(0)
    }

    /// Puts revision `generation` of workload `name` running `image`.
    pub(crate) async fn put_revision(store: &dyn Store, name: &str, generation: u64, image: &str) {
        let record = RevisionRecord {
            generation,
            spec: workload(name, image),
            created_at: Timestamp(1),
            cause: "apply".into(),
        };
        store
            .put(
                keys::revision(name, generation).as_bytes(),
                &model::encode(&record),
            )
            .await
            .unwrap();
    }

    pub(crate) fn instance(workload: &str, id: &str, node: &str) -> InstanceRecord {
        InstanceRecord {
            id: id.into(),
            workload: workload.into(),
            generation: 1,
            node: Some(node.into()),
            created_at: Timestamp(1),
            scheduled_at: Some(Timestamp(2)),
            placement_failures: Vec::new(),
            stop_requested_at: None,
        }
    }

    pub(crate) async fn put_instance(store: &dyn Store, record: &InstanceRecord) -> Revision {
        store
            .put(
                keys::instance(&record.workload, &record.id).as_bytes(),
                &model::encode(record),
            )
            .await
            .unwrap()
    }

    /// Polls until `check` returns something (10 s at most).
    pub(crate) async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The instance status stored for `workload`/`id`, once it satisfies `done`.
    pub(crate) async fn stored_status(
        store: &dyn Store,
        workload: &str,
        id: &str,
        done: impl Fn(&model::InstanceStatus) -> bool,
    ) -> model::InstanceStatus {
        let key = keys::status(workload, id);
        let done = &done;
        eventually(&format!("status of {id}"), || {
            let key = key.clone();
            async move {
                let kv = store.get(key.as_bytes()).await.unwrap()?;
                let status = model::decode::<model::InstanceStatus>(&kv.value).unwrap();
                done(&status).then_some(status)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gantry::pb::node_session_client::NodeSessionClient;
    use tonic::Code;
    use tonic::transport::Endpoint;

    use super::test_support::*;
    use super::*;

    #[test]
    fn the_network_table_logs_which_nodes_changed() {
        let mut view = View::default();
        let node = |subnet: &str, address: &str| crate::cache::Versioned {
            value: NodeRecord {
                subnet: Some(subnet.into()),
                address: address.into(),
                ..NodeRecord::default()
            },
            mod_revision: 1,
        };
        let mut table = NetworkTable::default();
        view.nodes
            .insert("a".into(), node("10.88.0.0/24", "10.0.0.1"));
        view.membership = 1;
        table.refresh(&view);
        assert_eq!(table.version(), 1);
        view.nodes
            .insert("b".into(), node("10.88.1.0/24", "10.0.0.2"));
        view.membership = 2;
        table.refresh(&view);
        // A membership change that changes no route (a node turning NotReady) is no version.
        view.membership = 3;
        table.refresh(&view);
        assert_eq!(table.version(), 2);
        view.nodes.remove("a");
        view.membership = 4;
        table.refresh(&view);
        assert_eq!(table.log.changes_since(3), Some(BTreeSet::new()));
        assert_eq!(table.log.changes_since(1), Some(["a", "b"].into()));
        assert_eq!(table.log.changes_since(2), Some(["a"].into()));
        // Further behind than the log reaches: the complete list instead.
        for n in 0..crate::changelog::KEPT_VERSIONS as u64 + 1 {
            view.nodes
                .insert(format!("n{n}"), node("10.88.9.0/24", "10.0.0.9"));
            view.membership = 10 + n;
            table.refresh(&view);
        }
        assert_eq!(table.log.changes_since(1), None);
    }

    #[test]
    fn network_messages_are_encoded_once_per_starting_point() {
        let node = |subnet: &str| crate::cache::Versioned {
            value: NodeRecord {
                subnet: Some(subnet.into()),
                address: "10.0.0.1".into(),
                ..NodeRecord::default()
            },
            mod_revision: 1,
        };
        let names = |shared: &SharedNetwork| {
            <pb::PeerRoutes as prost::Message>::decode(shared.routes.clone())
                .unwrap()
                .peers
                .into_iter()
                .map(|p| p.node)
                .collect::<Vec<_>>()
        };
        let mut view = View::default();
        let mut table = NetworkTable::default();
        view.nodes.insert("a".into(), node("10.88.0.0/24"));
        view.membership = 1;
        table.refresh(&view);
        view.nodes.insert("b".into(), node("10.88.1.0/24"));
        view.membership = 2;
        table.refresh(&view);
        // The complete list: every node, shared by every session that asks.
        let (full, delta) = table.message(None);
        assert!(!delta);
        assert_eq!(names(&full), ["a", "b"]);
        assert!(Arc::ptr_eq(&full, &table.message(None).0));
        // From version 1: only b, and b is the only node named.
        let (from1, delta) = table.message(Some(1));
        assert!(delta);
        assert_eq!(names(&from1), ["b"]);
        assert_eq!(from1.only.as_deref(), Some("b"));
        assert!(Arc::ptr_eq(&from1, &table.message(Some(1)).0));
        // A new version drops the old encodings; a removed node is listed as removed.
        view.nodes.remove("a");
        view.membership = 3;
        table.refresh(&view);
        let (from2, _) = table.message(Some(2));
        assert!(names(&from2).is_empty());
        assert_eq!(from2.removed, ["a"]);
        assert!(!Arc::ptr_eq(&full, &table.message(None).0));
        // Too far behind the log (or never sent): the complete list.
        let (unknown, delta) = table.message(Some(99));
        assert!(!delta);
        assert_eq!(names(&unknown), ["b"]);
    }
    use crate::model::Liveness;
    use crate::store::LeaseId;

    const TTL: Duration = Duration::from_secs(5);

    /// The agent's end of a session, driven by hand.
    struct Agent {
        tx: mpsc::Sender<pb::AgentMessage>,
        inbound: Streaming<pb::SchedulerMessage>,
    }

    impl Agent {
        async fn open(addr: &str, first: FromAgent) -> Agent {
            let channel = Endpoint::from_shared(addr.to_owned())
                .unwrap()
                .connect()
                .await
                .unwrap();
            let (tx, rx) = mpsc::channel(16);
            tx.send(pb::AgentMessage {
                message: Some(first),
            })
            .await
            .unwrap();
            let inbound = NodeSessionClient::new(channel)
                .session(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            Agent { tx, inbound }
        }

        /// Registers; returns the session with its welcome and first assignment set.
        async fn register(
            addr: &str,
            register: pb::Register,
        ) -> (Agent, pb::Welcome, pb::AssignmentSet) {
            let mut agent = Agent::open(addr, FromAgent::Register(register)).await;
            let ToAgent::Welcome(welcome) = agent.next().await else {
                panic!("welcome first");
            };
            let ToAgent::Assignments(set) = agent.next().await else {
                panic!("assignment set second");
            };
            (agent, welcome, set)
        }

        /// The next message other than `network` and `names` (see [`Agent::network`],
        /// [`Agent::names`]).
        async fn next(&mut self) -> ToAgent {
            loop {
                match self.next_any().await {
                    ToAgent::Network(_) | ToAgent::Names(_) => continue,
                    other => return other,
                }
            }
        }

        async fn next_any(&mut self) -> ToAgent {
            tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
                .await
                .expect("a message in time")
                .expect("the stream is healthy")
                .expect("the stream is open")
                .message
                .expect("a message with content")
        }

        /// The next `network` message, skipping others.
        async fn network(&mut self) -> pb::NetworkConfig {
            loop {
                if let ToAgent::Network(network) = self.next_any().await {
                    return network;
                }
            }
        }

        /// The next `names` message, skipping others: (delta, workload → addresses, removed).
        async fn names(&mut self) -> (bool, Vec<(String, Vec<String>)>, Vec<String>) {
            loop {
                if let ToAgent::Names(table) = self.next_any().await {
                    let entries =
                        <pb::NameEntries as prost::Message>::decode(table.workloads).unwrap();
                    let entries = entries
                        .workloads
                        .into_iter()
                        .map(|w| (w.workload, w.addresses))
                        .collect();
                    return (table.delta, entries, table.removed);
                }
            }
        }

        async fn delta(&mut self) -> pb::AssignmentDelta {
            match self.next().await {
                ToAgent::AssignmentDelta(delta) => delta,
                other => panic!("expected a delta, got {other:?}"),
            }
        }

        /// Waits for the stream to end with an error status.
        async fn ended(&mut self) -> Status {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), self.inbound.message())
                    .await
                    .expect("the stream ends in time")
                {
                    Err(status) => return status,
                    Ok(None) => panic!("the stream ended without a status"),
                    Ok(Some(_)) => {}
                }
            }
        }

        async fn send(&self, message: FromAgent) {
            self.tx
                .send(pb::AgentMessage {
                    message: Some(message),
                })
                .await
                .unwrap();
        }

        async fn heartbeat(&self) {
            self.send(FromAgent::Heartbeat(pb::Heartbeat::default()))
                .await;
        }

        async fn report(&self, instances: Vec<pb::InstanceStatus>) {
            self.send(FromAgent::Status(pb::StatusReport { instances }))
                .await;
        }
    }

    fn resources(cpu: &str, memory: &str, pids: u32) -> Option<pb::Resources> {
        Some(pb::Resources {
            cpu: Some(cpu.into()),
            memory: Some(memory.into()),
            pids: Some(pids),
        })
    }

    fn register(name: &str) -> pb::Register {
        pb::Register {
            name: name.into(),
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            capacity: resources("4", "8Gi", 4096),
            allocatable: resources("3500m", "7Gi", 4000),
            address: "10.0.0.1".into(),
            os: "linux".into(),
            arch: "amd64".into(),
            runtime: "test".into(),
            agent_version: "0.1.0".into(),
            kernel_version: "6.1.0".into(),
            os_image: "Test Linux".into(),
            boot_id: "boot-1".into(),
            applied_revision: 0,
            instances: Vec::new(),
        }
    }

    fn status(id: &str, state: pb::InstanceState) -> pb::InstanceStatus {
        pb::InstanceStatus {
            instance_id: id.into(),
            generation: 1,
            state: state.into(),
            observed_at: Some(Timestamp::now().into()),
            ..pb::InstanceStatus::default()
        }
    }

    async fn node_record(store: &dyn Store, name: &str) -> Option<NodeRecord> {
        let kv = store.get(keys::node(name).as_bytes()).await.unwrap()?;
        Some(model::decode(&kv.value).unwrap())
    }

    async fn live(store: &dyn Store, name: &str) -> Option<(Liveness, Option<LeaseId>)> {
        let kv = store.get(keys::live(name).as_bytes()).await.unwrap()?;
        Some((model::decode(&kv.value).unwrap(), kv.lease))
    }

    #[tokio::test]
    async fn register_welcomes_and_records_the_node() {
        let store = store().await;
        let scheduler = Scheduler::start(store.store.clone(), config("sched-a", TTL)).await;
        let (_agent, welcome, set) = Agent::register(&scheduler.addr, register("n1")).await;

        assert_eq!(welcome.scheduler, "sched-a");
        assert_eq!(welcome.lease_ttl, Some(duration_to_pb(TTL)));
        assert_eq!(welcome.heartbeat_interval, Some(duration_to_pb(TTL / 4)));
        let node = welcome.node.unwrap();
        assert_eq!(node.name, "n1");
        assert_eq!(node.readiness, i32::from(pb::NodeReadiness::Ready));
        assert_eq!(node.allocatable, resources("3500m", "7Gi", 4000));
        assert!(set.assignments.is_empty());
        assert!(set.revision >= node.revision && node.revision > 0);

        let record = node_record(&*store.store, "n1").await.unwrap();
        assert_eq!(
            record.capacity,
            Resources {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                pids: 4096
            }
        );
        assert_eq!(record.labels["zone"], "a");
        let (liveness, lease) = live(&*store.store, "n1").await.unwrap();
        assert_eq!(liveness.scheduler, "sched-a");
        assert!(lease.is_some(), "the live key hangs on the session lease");
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn registration_keeps_what_operators_set() {
        let store = store().await;
        let existing = NodeRecord {
            name: "n1".into(),
            registered_at: Timestamp(42),
            cordoned: true,
            draining: true,
            subnet: Some("10.88.3.0/24".into()),
            ..NodeRecord::default()
        };
        store
            .store
            .put(keys::node("n1").as_bytes(), &model::encode(&existing))
            .await
            .unwrap();
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let (_agent, welcome, _) = Agent::register(&scheduler.addr, register("n1")).await;
        let node = welcome.node.unwrap();
        assert!(node.cordoned && node.draining);
        assert_eq!(node.subnet, "10.88.3.0/24");

        let record = node_record(&*store.store, "n1").await.unwrap();
        assert_eq!(record.registered_at, Timestamp(42));
        assert!(record.cordoned && record.draining);
        assert_eq!(record.subnet.as_deref(), Some("10.88.3.0/24"));
        assert_eq!(record.address, "10.0.0.1", "the agent's part is updated");
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn bad_registrations_are_refused_and_write_nothing() {
        let store = store().await;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let cases: Vec<(pb::Register, &[&str])> = vec![
            (
                pb::Register {
                    name: "Bad_Name".into(),
                    ..register("n1")
                },
                &["register.name"],
            ),
            (
                pb::Register {
                    labels: [("-bad".to_owned(), "ok".to_owned())].into(),
                    ..register("n1")
                },
                &["register.labels[\"-bad\"]"],
            ),
            (
                pb::Register {
                    capacity: Some(pb::Resources {
                        cpu: Some("lots".into()),
                        memory: None,
                        pids: Some(1),
                    }),
                    allocatable: None,
                    ..register("n1")
                },
                &[
                    "register.capacity.cpu",
                    "register.capacity.memory: required",
                    "register.allocatable: required",
                ],
            ),
            (
                pb::Register {
                    instances: vec![status("web-a", pb::InstanceState::Unspecified)],
                    ..register("n1")
                },
                &["register.instances[0].state"],
            ),
        ];
        for (bad, fields) in cases {
            let mut agent = Agent::open(&scheduler.addr, FromAgent::Register(bad)).await;
            let status = agent.ended().await;
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            for field in fields {
                assert!(status.message().contains(field), "{field} in {status:?}");
            }
        }
        let mut agent = Agent::open(
            &scheduler.addr,
            FromAgent::Heartbeat(pb::Heartbeat::default()),
        )
        .await;
        let status = agent.ended().await;
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("register"), "{status:?}");

        let (written, _) = store
            .store
            .range(keys::ROOT.as_bytes(), None)
            .await
            .unwrap();
        assert!(written.is_empty(), "nothing written: {written:?}");
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn assignments_follow_the_store() {
        let store = store().await;
        let s = &*store.store;
        put_revision(s, "web", 1, "nginx:1.27").await;
        put_instance(s, &instance("web", "web-a", "n1")).await;
        put_instance(s, &instance("web", "web-other", "n2")).await;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let (mut agent, _, set) = Agent::register(&scheduler.addr, register("n1")).await;
        assert_eq!(set.assignments.len(), 1, "only this node's instances");
        let a = &set.assignments[0];
        assert_eq!((a.instance_id.as_str(), a.stop), ("web-a", false));
        assert_eq!(a.spec.as_ref().unwrap().image, "nginx:1.27");

        // A new assignment arrives as an upsert with its spec.
        let revision = put_instance(s, &instance("web", "web-b", "n1")).await;
        let delta = agent.delta().await;
        assert_eq!(delta.revision, revision);
        assert!(delta.revision > set.revision);
        assert_eq!(delta.upserts.len(), 1);
        let b = &delta.upserts[0];
        assert_eq!(
            (b.instance_id.as_str(), b.workload.as_str(), b.generation),
            ("web-b", "web", 1)
        );
        assert_eq!((b.revision, b.stop), (revision, false));
        assert_eq!(b.spec.as_ref().unwrap().image, "nginx:1.27");
        assert!(delta.removals.is_empty());

        // A stop request.
        let mut stopping = instance("web", "web-b", "n1");
        stopping.stop_requested_at = Some(Timestamp::now());
        put_instance(s, &stopping).await;
        let delta = agent.delta().await;
        assert_eq!(delta.upserts.len(), 1);
        assert!(delta.upserts[0].stop);

        // Deletion.
        s.delete(keys::instance("web", "web-b").as_bytes())
            .await
            .unwrap();
        let delta = agent.delta().await;
        assert!(delta.upserts.is_empty());
        assert_eq!(delta.removals, ["web-b"]);

        // Moved to another node: removed here too.
        put_instance(s, &instance("web", "web-a", "n2")).await;
        assert_eq!(agent.delta().await.removals, ["web-a"]);

        // Without its spec revision, an assignment goes out stopped; the spec arriving
        // later starts it.
        let mut api = instance("api", "api-a", "n1");
        api.generation = 3;
        put_instance(s, &api).await;
        let delta = agent.delta().await;
        assert!(delta.upserts[0].stop && delta.upserts[0].spec.is_none());
        put_revision(s, "api", 3, "api:3").await;
        let delta = agent.delta().await;
        assert!(!delta.upserts[0].stop);
        assert_eq!(delta.upserts[0].spec.as_ref().unwrap().image, "api:3");

        // A change elsewhere sends nothing: the next message is the next change here.
        put_instance(s, &instance("web", "web-c", "n2")).await;
        put_instance(s, &instance("web", "web-d", "n1")).await;
        let delta = agent.delta().await;
        assert_eq!(delta.upserts.len(), 1);
        assert_eq!(delta.upserts[0].instance_id, "web-d");
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn names_follow_ready_instances_on_every_node() {
        let store = store().await;
        let s = &*store.store;
        put_revision(s, "web", 1, "nginx").await;
        put_instance(s, &instance("web", "web-a", "n1")).await;
        put_instance(s, &instance("web", "web-b", "n2")).await;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let (mut n1, _, _) = Agent::register(&scheduler.addr, register("n1")).await;
        let (n2, _, _) = Agent::register(&scheduler.addr, register("n2")).await;
        // The first table is complete, and empty: nothing is Ready yet.
        assert_eq!(n1.names().await, (false, Vec::new(), Vec::new()));
        let with_ip = |id: &str, state, ip: &str| pb::InstanceStatus {
            ip: ip.into(),
            ..status(id, state)
        };
        let web = |ips: &[&str]| {
            vec![(
                "web".to_owned(),
                ips.iter().map(|ip| (*ip).to_owned()).collect::<Vec<_>>(),
            )]
        };
        // An instance on the other node becomes Ready: n1 hears of it.
        n2.report(vec![with_ip(
            "web-b",
            pb::InstanceState::Ready,
            "10.88.1.2",
        )])
        .await;
        assert_eq!(n1.names().await, (true, web(&["10.88.1.2"]), Vec::new()));
        n1.report(vec![with_ip(
            "web-a",
            pb::InstanceState::Ready,
            "10.88.0.2",
        )])
        .await;
        assert_eq!(
            n1.names().await,
            (true, web(&["10.88.0.2", "10.88.1.2"]), Vec::new())
        );
        // Not Ready any more: its address goes.
        n2.report(vec![with_ip(
            "web-b",
            pb::InstanceState::Running,
            "10.88.1.2",
        )])
        .await;
        assert_eq!(n1.names().await, (true, web(&["10.88.0.2"]), Vec::new()));
        // The last instance removed: the name goes.
        s.delete(keys::instance("web", "web-a").as_bytes())
            .await
            .unwrap();
        assert_eq!(n1.names().await, (true, Vec::new(), vec!["web".to_owned()]));
        // A new session starts from the complete table again.
        drop(n1);
        let (mut again, _, _) = Agent::register(&scheduler.addr, register("n1")).await;
        assert_eq!(again.names().await, (false, Vec::new(), Vec::new()));
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn statuses_are_written_for_this_nodes_instances_only() {
        let store = store().await;
        let s = &*store.store;
        put_revision(s, "web", 1, "nginx").await;
        put_instance(s, &instance("web", "web-a", "n1")).await;
        put_instance(s, &instance("web", "web-b", "n1")).await;
        put_instance(s, &instance("web", "web-x", "n2")).await;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;

        // Live restore: statuses found on the machine, reported at registration.
        let restored = pb::Register {
            instances: vec![status("web-a", pb::InstanceState::Running)],
            ..register("n1")
        };
        let (agent, _, _) = Agent::register(&scheduler.addr, restored).await;
        let a = stored_status(s, "web", "web-a", |_| true).await;
        assert_eq!(a.state, model::InstanceState::Running);

        let mut ready = status("web-b", pb::InstanceState::Ready);
        ready.restart_count = 2;
        ready.ready_at = Some(Timestamp(1_700_000_000_000).into());
        agent
            .report(vec![
                status("web-x", pb::InstanceState::Ready),
                status("web-gone", pb::InstanceState::Ready),
                status("web-a", pb::InstanceState::Unspecified),
                ready,
            ])
            .await;
        let b = stored_status(s, "web", "web-b", |_| true).await;
        assert_eq!(b.state, model::InstanceState::Ready);
        assert_eq!(b.restart_count, 2);
        assert_eq!(b.ready_at, Some(Timestamp(1_700_000_000_000)));
        // Written in the same batch as web-b had they been accepted.
        for id in ["web-x", "web-gone"] {
            let key = keys::status("web", id);
            assert!(s.get(key.as_bytes()).await.unwrap().is_none(), "{id}");
        }
        let a = stored_status(s, "web", "web-a", |_| true).await;
        assert_eq!(
            a.state,
            model::InstanceState::Running,
            "invalid entry ignored"
        );

        // A repeat that only differs in observed_at is not written again.
        let before = s
            .get(keys::status("web", "web-b").as_bytes())
            .await
            .unwrap()
            .unwrap();
        let mut again = status("web-b", pb::InstanceState::Ready);
        again.restart_count = 2;
        again.ready_at = Some(Timestamp(1_700_000_000_000).into());
        agent
            .report(vec![again, status("web-a", pb::InstanceState::Exited)])
            .await;
        stored_status(s, "web", "web-a", |a| {
            a.state == model::InstanceState::Exited
        })
        .await;
        let after = s
            .get(keys::status("web", "web-b").as_bytes())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.mod_revision, before.mod_revision);
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn status_writes_are_batched_under_the_transaction_limit() {
        let store = store().await;
        let s = &*store.store;
        put_revision(s, "web", 1, "nginx").await;
        let ids: Vec<String> = (0..300).map(|i| format!("web-{i:03}")).collect();
        let ops = ids
            .iter()
            .map(|id| {
                Op::put(
                    keys::instance("web", id),
                    model::encode(&instance("web", id, "n1")),
                )
            })
            .collect();
        s.txn(Vec::new(), ops, Vec::new()).await.unwrap();
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let (agent, _, set) = Agent::register(&scheduler.addr, register("n1")).await;
        assert_eq!(set.assignments.len(), 300);
        let before = s.current_revision().await.unwrap();
        agent
            .report(
                ids.iter()
                    .map(|id| status(id, pb::InstanceState::Ready))
                    .collect(),
            )
            .await;
        for id in &ids {
            stored_status(s, "web", id, |_| true).await;
        }
        let after = s.current_revision().await.unwrap();
        // 300 statuses in ⌈300 / 120⌉ transactions, not one each.
        assert_eq!(after - before, 3);
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn the_live_key_lives_on_heartbeats_only() {
        let ttl = Duration::from_millis(1000);
        let store = store().await;
        let s = &*store.store;
        let scheduler = Scheduler::start(store.store.clone(), config("s", ttl)).await;
        let (agent, _, _) = Agent::register(&scheduler.addr, register("n1")).await;
        let (_, first_lease) = live(s, "n1").await.unwrap();

        // Heartbeats keep the node live well past the TTL.
        for _ in 0..10 {
            agent.heartbeat().await;
            tokio::time::sleep(ttl / 4).await;
        }
        assert!(live(s, "n1").await.is_some(), "heartbeats keep the lease");

        // Silence, with the stream still open: the live key goes about a TTL later.
        let silent = tokio::time::Instant::now();
        eventually("the live key to expire", || async {
            live(s, "n1").await.is_none().then_some(())
        })
        .await;
        let gone_after = silent.elapsed();
        assert!(
            gone_after >= ttl / 2 && gone_after < ttl * 3,
            "gone after {gone_after:?}"
        );

        // A heartbeat after that makes the node live again, on the replica's lease, which the
        // replica kept alive all along.
        agent.heartbeat().await;
        let (liveness, lease) = eventually("the node to be live again", || async {
            live(s, "n1").await
        })
        .await;
        assert_eq!(liveness.scheduler, "s");
        assert_eq!(lease, first_lease);

        // A closed stream does not revoke the lease: it expires on its own.
        drop(agent);
        tokio::time::sleep(ttl / 4).await;
        assert!(live(s, "n1").await.is_some(), "not revoked at stream end");
        eventually("the live key to expire", || async {
            live(s, "n1").await.is_none().then_some(())
        })
        .await;
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn nodes_get_distinct_subnets_and_routes_to_each_other() {
        let store = store().await;
        // Two replicas on one store, a cluster network of two /24s.
        let mut small = config("sched-a", TTL);
        small.cluster_cidr = "10.77.0.0/23".parse().unwrap();
        let a = Scheduler::start(store.store.clone(), small.clone()).await;
        small.identity = "sched-b".into();
        let b = Scheduler::start(store.store.clone(), small).await;
        let mut r2 = register("n2");
        r2.address = "10.0.0.2".into();
        let ((mut n1, w1, _), (mut n2, w2, _)) = tokio::join!(
            Agent::register(&a.addr, register("n1")),
            Agent::register(&b.addr, r2),
        );
        let s1 = w1.node.unwrap().subnet;
        let s2 = w2.node.unwrap().subnet;
        let mut both = [s1.clone(), s2.clone()];
        both.sort();
        assert_eq!(both, ["10.77.0.0/24", "10.77.1.0/24"]);
        // Each is told the other's subnet via its address (once the other is in its view).
        // Other nodes' routes (a message may name the receiving node itself too).
        let peers = |n: &pb::NetworkConfig, own: &str| {
            <pb::PeerRoutes as prost::Message>::decode(n.routes.clone())
                .expect("routes decode")
                .peers
                .into_iter()
                .filter(|p| p.node != own)
                .map(|p| (p.node, p.subnet, p.address))
                .collect::<Vec<_>>()
        };
        let mut net1 = n1.network().await;
        while peers(&net1, "n1").is_empty() {
            net1 = n1.network().await;
        }
        assert_eq!(net1.subnet, s1);
        assert_eq!(net1.cluster_cidr, "10.77.0.0/23");
        assert_eq!(
            peers(&net1, "n1"),
            [("n2".into(), s2.clone(), "10.0.0.2".into())]
        );
        let mut net2 = n2.network().await;
        while peers(&net2, "n2").is_empty() {
            net2 = n2.network().await;
        }
        assert_eq!(
            peers(&net2, "n2"),
            [("n1".into(), s1.clone(), "10.0.0.1".into())]
        );
        // A third node finds the cluster network full and is told what to do.
        let mut n3 = Agent::open(&a.addr, FromAgent::Register(register("n3"))).await;
        let status = n3.ended().await;
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("--cluster-cidr"), "{status:?}");
        // A node keeps its subnet across sessions.
        drop(n1);
        let (_again, welcome, _) = Agent::register(&b.addr, register("n1")).await;
        assert_eq!(welcome.node.unwrap().subnet, s1);
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn a_new_registration_supersedes_the_old_session() {
        let store = store().await;
        let s = &*store.store;
        put_revision(s, "web", 1, "nginx").await;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let (mut old, _, _) = Agent::register(&scheduler.addr, register("n1")).await;
        let (mut new, _, _) = Agent::register(&scheduler.addr, register("n1")).await;
        let status = old.ended().await;
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        put_instance(s, &instance("web", "web-a", "n1")).await;
        assert_eq!(new.delta().await.upserts[0].instance_id, "web-a");
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn shutdown_ends_sessions_as_unavailable() {
        let store = store().await;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let (mut agent, _, _) = Agent::register(&scheduler.addr, register("n1")).await;
        let stopped = tokio::spawn(scheduler.stop());
        let status = agent.ended().await;
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        stopped.await.unwrap();
    }
}
