//! Simulated node agents for integration tests and the throughput benchmark: each one speaks
//! the real `NodeSession` gRPC protocol to the scheduler but runs no containers.
//!
//! A [`SimAgent`] registers its node, heartbeats once welcomed, and answers its assignments
//! the way a healthy agent would: a new assignment is reported Running and Ready (at once, or
//! Ready after [`SimConfig::ready_delay`]), a stopped one Exited(0), and an instance whose image
//! is listed in [`SimConfig::crash_images`] crash-loops (Exited(1), restart count going up).
//! Reports made while handling one scheduler message go out as one `StatusReport`, with at
//! most one entry per instance (so "Running then Ready" at once is reported as Ready, with both
//! times set). When its stream fails it reconnects to the next scheduler address in round
//! robin, after a jittered backoff from 100 ms doubling to 2 s, and registers again carrying
//! the current status of every instance it holds (live restore). Like a real agent it ignores
//! an assignment set or delta older than the last one it applied.
//!
//! Each agent is one tokio task with a few small maps (5,000 agents and their sessions take
//! about 300 MB in one process). Agents of one runtime share tonic `Channel`s, each an HTTP/2
//! connection multiplexing up to [`AGENTS_PER_CONNECTION`] session streams. The scheduler's
//! server must allow that many concurrent streams on one connection: tonic's
//! `Server::builder()` sets no `max_concurrent_streams` limit by default (it overrides hyper's
//! own default of 200), and a limit, if set, must stay above it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, SystemTime};

use gantry::pb;
use gantry::pb::agent_message::Message as ToScheduler;
use gantry::pb::node_session_client::NodeSessionClient;
use gantry::pb::scheduler_message::Message as FromScheduler;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, warn};

/// First reconnection delay (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest reconnection delay.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Messages queued towards the scheduler before the agent waits.
const OUTBOUND_QUEUE: usize = 8;
/// Largest scheduler message accepted (an assignment set carries every spec of the node).
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What a simulated node looks like and how its instances behave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Node name (a DNS label).
    pub name: String,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// CPU capacity (and allocatable), in millicores.
    pub cpu_millis: u64,
    /// Memory capacity (and allocatable), in bytes.
    pub memory_bytes: u64,
    /// Process limit of the node.
    pub pids: u32,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// Time from Running to Ready; zero reports Ready at once.
    pub ready_delay: Duration,
    /// Images whose instances crash-loop: Exited(1), restarted every `crash_backoff` with a
    /// growing restart count.
    pub crash_images: Vec<String>,
    /// Time between the restarts of a crash-looping instance.
    pub crash_backoff: Duration,
}

impl Default for SimConfig {
    /// [`SimConfig::new`] with the name `sim`.
    fn default() -> Self {
        SimConfig::new("sim")
    }
}

impl SimConfig {
    /// A node `name` with 4 cores, 8 GiB, 4096 pids, heartbeats every 2 s, instances ready at
    /// once, nothing crashing.
    pub fn new(name: impl Into<String>) -> Self {
        SimConfig {
            name: name.into(),
            labels: BTreeMap::new(),
            cpu_millis: 4000,
            memory_bytes: 8 << 30,
            pids: 4096,
            heartbeat_interval: Duration::from_secs(2),
            ready_delay: Duration::ZERO,
            crash_images: Vec::new(),
            crash_backoff: Duration::from_secs(1),
        }
    }
}

/// A running simulated agent. Dropping it stops it, like [`SimAgent::stop`] without waiting.
#[derive(Debug)]
pub struct SimAgent {
    name: String,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// What the agent's task shares with its handle.
#[derive(Debug)]
struct Shared {
    /// Non-stopped assignments held: instance id → generation.
    running: watch::Sender<BTreeMap<String, u64>>,
    /// The scheduler address of the session that welcomed the agent, while it lasts.
    connected: watch::Sender<Option<String>>,
    paused: AtomicBool,
    sessions: AtomicU64,
    /// Peer routes held: the last complete list plus the deltas since (a node changed twice
    /// counts twice; the benchmark only needs to know when every peer arrived).
    peers: AtomicU64,
}

impl SimAgent {
    /// Starts an agent that dials `addrs` (`http://127.0.0.1:port`), the first one first.
    /// An address that is not a valid URI is logged and counts as unreachable; with no
    /// address at all the agent never connects.
    pub async fn start(addrs: Vec<String>, config: SimConfig) -> SimAgent {
        let schedulers: Vec<(String, Option<Arc<Channel>>)> = addrs
            .into_iter()
            .map(|address| match shared_channel(&address) {
                Ok(channel) => (address, Some(channel)),
                Err(err) => {
                    warn!(node = %config.name, %address, %err, "invalid scheduler address; skipped");
                    (address, None)
                }
            })
            .collect();
        let shared = Arc::new(Shared {
            running: watch::Sender::new(BTreeMap::new()),
            connected: watch::Sender::new(None),
            paused: AtomicBool::new(false),
            sessions: AtomicU64::new(0),
            peers: AtomicU64::new(0),
        });
        let (stop, stop_rx) = watch::channel(false);
        let name = config.name.clone();
        let agent = Agent::new(config, shared.clone());
        let task = tokio::spawn(agent.run(schedulers, stop_rx));
        SimAgent {
            name,
            shared,
            stop,
            task: Some(task),
        }
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The non-stopped assignments the agent holds: instance id → generation.
    pub fn running(&self) -> BTreeMap<String, u64> {
        self.shared.running.borrow().clone()
    }

    /// Waits until the held assignments satisfy `done`.
    pub async fn wait_running(&self, done: impl FnMut(&BTreeMap<String, u64>) -> bool) {
        let mut rx = self.shared.running.subscribe();
        // The sender lives in `self`, so this cannot fail.
        let _ = rx.wait_for(done).await;
    }

    /// The scheduler address of the current session, once it welcomed the agent.
    pub fn connected_to(&self) -> Option<String> {
        self.shared.connected.borrow().clone()
    }

    /// Waits until a session welcomed the agent; returns the scheduler's address.
    pub async fn wait_connected(&self) -> String {
        let mut rx = self.shared.connected.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(address) => address.clone().unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// How many sessions welcomed the agent so far (1 + reconnections).
    pub fn sessions(&self) -> u64 {
        self.shared.sessions.load(Ordering::Relaxed)
    }

    /// Peer routes received (see [`Shared::peers`]).
    pub fn peers(&self) -> u64 {
        self.shared.peers.load(Ordering::Relaxed)
    }

    /// Stops (or resumes) heartbeats while keeping the stream open, to simulate a node that
    /// hangs: the scheduler lets its lease expire.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::Relaxed);
    }

    /// Stops the agent: its stream closes as if the agent process exited.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Most agents sharing one connection. HTTP/2 servers bound the small DATA frames they hold
/// unread per connection (h2 closes the connection with `ENHANCE_YOUR_CALM` /
/// `too_many_data_frames` once half the connection window, 512 KiB with hyper's defaults, is
/// spent on frame overhead, ~230 bytes per heartbeat); spreading agents over a few
/// connections keeps one slow moment of the scheduler from dropping every agent at once, and
/// is closer to real agents, which each have their own connection.
pub const AGENTS_PER_CONNECTION: usize = 100;

/// Channels shared by the agents of one runtime, per scheduler address. A channel lives as
/// long as an agent uses it; one made on another runtime would be dead once that runtime is.
static CHANNELS: LazyLock<Mutex<ChannelPool>> = LazyLock::new(Mutex::default);

/// Channels by (runtime, scheduler address).
type ChannelPool = HashMap<(tokio::runtime::Id, String), Vec<Weak<Channel>>>;

/// A channel to `address` with room for one more agent (each agent holds one `Arc`).
fn shared_channel(address: &str) -> Result<Arc<Channel>, tonic::transport::Error> {
    let key = (tokio::runtime::Handle::current().id(), address.to_owned());
    let mut pool = CHANNELS.lock().expect("sim channels lock");
    pool.retain(|_, channels| {
        channels.retain(|channel| channel.strong_count() > 0);
        !channels.is_empty()
    });
    let channels = pool.entry(key).or_default();
    let roomy = channels
        .iter()
        .filter(|channel| channel.strong_count() < AGENTS_PER_CONNECTION)
        .find_map(Weak::upgrade);
    if let Some(channel) = roomy {
        return Ok(channel);
    }
    let endpoint = Endpoint::from_shared(address.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = Arc::new(endpoint.connect_lazy());
    channels.push(Arc::downgrade(&channel));
    Ok(channel)
}

/// One simulated instance.
#[derive(Debug)]
struct Instance {
    generation: u64,
    stop: bool,
    crash: bool,
    status: pb::InstanceStatus,
}

/// Something due later: an instance turning Ready, or crashing again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    id: String,
    generation: u64,
    kind: TimerKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Ready,
    Crash,
}

/// How a session ended.
enum Ended {
    /// The agent was stopped.
    Stopped,
    /// The stream failed or could not be opened; `welcomed` if it got as far as `welcome`.
    Lost { welcomed: bool },
}

/// The agent task's state.
struct Agent {
    config: SimConfig,
    shared: Arc<Shared>,
    boot_id: String,
    instances: HashMap<String, Instance>,
    timers: BinaryHeap<Reverse<Timer>>,
    /// Statuses to send in the next report, by instance id.
    pending: BTreeMap<String, pb::InstanceStatus>,
    applied_revision: i64,
    /// Whether the held assignments changed since they were last published.
    held_changed: bool,
    rng: u64,
}

impl Agent {
    fn new(config: SimConfig, shared: Arc<Shared>) -> Self {
        // Jitter only needs agents to differ from one another.
        let seed = RandomState::new().hash_one(&config.name) | 1;
        Agent {
            boot_id: format!("{seed:016x}"),
            config,
            shared,
            instances: HashMap::new(),
            timers: BinaryHeap::new(),
            pending: BTreeMap::new(),
            applied_revision: 0,
            held_changed: false,
            rng: seed,
        }
    }

    async fn run(
        mut self,
        schedulers: Vec<(String, Option<Arc<Channel>>)>,
        mut stop: watch::Receiver<bool>,
    ) {
        if schedulers.is_empty() {
            warn!(node = %self.config.name, "no scheduler address; the agent stays disconnected");
            stopped(&mut stop).await;
            return;
        }
        let mut next = 0;
        let mut backoff = BACKOFF_MIN;
        loop {
            let ended = match &schedulers[next] {
                (address, Some(channel)) => self.session(address, channel, &mut stop).await,
                (_, None) => Ended::Lost { welcomed: false },
            };
            match ended {
                Ended::Stopped => return,
                Ended::Lost { welcomed } => {
                    if welcomed {
                        backoff = BACKOFF_MIN;
                    }
                }
            }
            self.shared.connected.send_replace(None);
            next = (next + 1) % schedulers.len();
            let delay = self.jitter(backoff);
            tokio::select! {
                () = stopped(&mut stop) => return,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Half of `backoff` plus a random part of the other half.
    fn jitter(&mut self, backoff: Duration) -> Duration {
        // xorshift64: plenty for spreading reconnections.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = backoff / 2;
        let extra = u64::try_from(half.as_micros()).unwrap_or(u64::MAX);
        half + Duration::from_micros(self.rng % extra.max(1))
    }

    async fn session(
        &mut self,
        address: &str,
        channel: &Channel,
        stop: &mut watch::Receiver<bool>,
    ) -> Ended {
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        // The queue is empty, so this always fits: `register` goes out first.
        let _ = tx.try_send(message(ToScheduler::Register(self.register())));
        let mut client =
            NodeSessionClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let response = tokio::select! {
            () = stopped(stop) => return Ended::Stopped,
            response = client.session(ReceiverStream::new(rx)) => response,
        };
        let mut inbound = match response {
            Ok(response) => response.into_inner(),
            Err(status) => {
                debug!(node = %self.config.name, %address, %status, "session not opened");
                return Ended::Lost { welcomed: false };
            }
        };
        let mut welcomed = false;
        // Heartbeats start with the session, once `welcome` arrived.
        let mut heartbeat: Option<Interval> = None;
        loop {
            let next_timer = self.timers.peek().map(|Reverse(timer)| timer.at);
            tokio::select! {
                () = stopped(stop) => return Ended::Stopped,
                received = inbound.message() => match received {
                    Ok(Some(pb::SchedulerMessage { message: Some(received) })) => {
                        if let FromScheduler::Welcome(_) = received {
                            welcomed = true;
                            let period = self.config.heartbeat_interval;
                            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                            heartbeat = Some(interval);
                            self.shared.sessions.fetch_add(1, Ordering::Relaxed);
                            self.shared.connected.send_replace(Some(address.to_owned()));
                        }
                        self.receive(received);
                    }
                    Ok(Some(pb::SchedulerMessage { message: None })) => {}
                    Ok(None) => return Ended::Lost { welcomed },
                    Err(status) => {
                        debug!(node = %self.config.name, %address, %status, "session lost");
                        return Ended::Lost { welcomed };
                    }
                },
                () = tick(&mut heartbeat) => {
                    if !self.shared.paused.load(Ordering::Relaxed) {
                        let beat = pb::Heartbeat {
                            sent_at: Some(SystemTime::now().into()),
                            applied_revision: self.applied_revision,
                        };
                        if tx.send(message(ToScheduler::Heartbeat(beat))).await.is_err() {
                            return Ended::Lost { welcomed };
                        }
                    }
                }
                () = sleep_until(next_timer), if next_timer.is_some() => self.fire_timers(),
            }
            self.publish_running();
            if !self.pending.is_empty() {
                let instances = std::mem::take(&mut self.pending).into_values().collect();
                let report = pb::StatusReport { instances };
                if tx.send(message(ToScheduler::Status(report))).await.is_err() {
                    return Ended::Lost { welcomed };
                }
            }
        }
    }

    fn register(&self) -> pb::Register {
        let resources = pb::Resources {
            cpu: Some(format!("{}m", self.config.cpu_millis)),
            memory: Some(self.config.memory_bytes.to_string()),
            pids: Some(self.config.pids),
        };
        pb::Register {
            name: self.config.name.clone(),
            labels: self.config.labels.clone().into_iter().collect(),
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            address: "127.0.0.1".to_owned(),
            os: "linux".to_owned(),
            arch: "amd64".to_owned(),
            runtime: "sim".to_owned(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel_version: String::new(),
            os_image: "simulated".to_owned(),
            boot_id: self.boot_id.clone(),
            applied_revision: self.applied_revision,
            instances: self.instances.values().map(|i| i.status.clone()).collect(),
        }
    }

    fn receive(&mut self, received: FromScheduler) {
        if matches!(
            received,
            FromScheduler::Assignments(_) | FromScheduler::AssignmentDelta(_)
        ) {
            self.held_changed = true;
        }
        match received {
            FromScheduler::Assignments(pb::AssignmentSet {
                revision,
                assignments,
            }) => {
                if revision < self.applied_revision {
                    debug!(node = %self.config.name, revision, "stale assignment set ignored");
                    return;
                }
                self.applied_revision = revision;
                let keep: std::collections::HashSet<&str> =
                    assignments.iter().map(|a| a.instance_id.as_str()).collect();
                self.instances.retain(|id, _| keep.contains(id.as_str()));
                self.pending.retain(|id, _| keep.contains(id.as_str()));
                for assignment in assignments {
                    self.assign(assignment);
                }
            }
            FromScheduler::AssignmentDelta(pb::AssignmentDelta {
                revision,
                upserts,
                removals,
            }) => {
                if revision < self.applied_revision {
                    debug!(node = %self.config.name, revision, "stale assignment delta ignored");
                    return;
                }
                self.applied_revision = revision;
                for assignment in upserts {
                    self.assign(assignment);
                }
                for id in removals {
                    self.instances.remove(&id);
                    self.pending.remove(&id);
                }
            }
            FromScheduler::Network(network) => {
                let count = count_routes(&network.routes);
                let removed = network.removed_peers.len() as u64;
                let peers = &self.shared.peers;
                if network.delta {
                    let held = peers.load(Ordering::Relaxed);
                    peers.store((held + count).saturating_sub(removed), Ordering::Relaxed);
                } else {
                    peers.store(count, Ordering::Relaxed);
                }
            }
            FromScheduler::Welcome(_)
            | FromScheduler::Logs(_)
            | FromScheduler::ExecStart(_)
            | FromScheduler::ExecInput(_)
            | FromScheduler::RelayCancel(_)
            | FromScheduler::StatsRequest(_)
            | FromScheduler::ImageRequest(_)
            | FromScheduler::Names(_) => {}
        }
    }

    /// Applies one assignment as an agent would, queueing the status it leads to.
    fn assign(&mut self, assignment: pb::Assignment) {
        let pb::Assignment {
            instance_id: id,
            workload: _,
            generation,
            spec,
            revision: _,
            stop,
        } = assignment;
        let now = Instant::now();
        let existing = self.instances.get(&id);
        if stop {
            if existing.is_some_and(|i| i.stop) {
                return;
            }
            let mut status =
                existing.map_or_else(|| new_status(&id, generation), |i| i.status.clone());
            exited(&mut status, 0, "Completed");
            self.pending.insert(id.clone(), status.clone());
            self.instances.insert(
                id,
                Instance {
                    generation,
                    stop: true,
                    crash: false,
                    status,
                },
            );
            return;
        }
        if existing.is_some_and(|i| !i.stop && i.generation == generation) {
            return;
        }
        let crash = spec
            .as_ref()
            .is_some_and(|spec| self.config.crash_images.contains(&spec.image));
        let mut status = new_status(&id, generation);
        let observed = Some(SystemTime::now().into());
        status.started_at = observed;
        status.observed_at = observed;
        if crash {
            exited(&mut status, 1, "Error");
            self.timers.push(Reverse(Timer {
                at: now + self.config.crash_backoff,
                id: id.clone(),
                generation,
                kind: TimerKind::Crash,
            }));
        } else if self.config.ready_delay.is_zero() {
            status.state = pb::InstanceState::Ready.into();
            status.ready_at = observed;
        } else {
            status.state = pb::InstanceState::Running.into();
            self.timers.push(Reverse(Timer {
                at: now + self.config.ready_delay,
                id: id.clone(),
                generation,
                kind: TimerKind::Ready,
            }));
        }
        self.pending.insert(id.clone(), status.clone());
        self.instances.insert(
            id,
            Instance {
                generation,
                stop: false,
                crash,
                status,
            },
        );
    }

    /// Handles every timer that is due.
    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse(timer)) = self.timers.peek() {
            if timer.at > now {
                break;
            }
            let Some(Reverse(timer)) = self.timers.pop() else {
                break;
            };
            let Some(instance) = self.instances.get_mut(&timer.id) else {
                continue;
            };
            if instance.stop || instance.generation != timer.generation {
                continue;
            }
            let observed = Some(SystemTime::now().into());
            let status = &mut instance.status;
            match timer.kind {
                TimerKind::Ready => {
                    status.state = pb::InstanceState::Ready.into();
                    status.ready_at = observed;
                }
                TimerKind::Crash if instance.crash => {
                    status.restart_count += 1;
                    status.started_at = observed;
                    exited(status, 1, "Error");
                    self.timers.push(Reverse(Timer {
                        at: now + self.config.crash_backoff,
                        ..timer.clone()
                    }));
                }
                TimerKind::Crash => continue,
            }
            status.observed_at = observed;
            self.pending.insert(timer.id.clone(), status.clone());
        }
    }

    fn publish_running(&mut self) {
        if !std::mem::take(&mut self.held_changed) {
            return;
        }
        let running: BTreeMap<String, u64> = self
            .instances
            .iter()
            .filter(|(_, i)| !i.stop)
            .map(|(id, i)| (id.clone(), i.generation))
            .collect();
        self.shared.running.send_if_modified(|held| {
            if *held == running {
                return false;
            }
            *held = running;
            true
        });
    }
}

fn message(message: ToScheduler) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(message),
    }
}

fn new_status(id: &str, generation: u64) -> pb::InstanceStatus {
    pb::InstanceStatus {
        instance_id: id.to_owned(),
        generation,
        state: pb::InstanceState::Pending.into(),
        ..pb::InstanceStatus::default()
    }
}

/// Marks `status` exited now with `code`.
fn exited(status: &mut pb::InstanceStatus, code: i32, reason: &str) {
    let now = Some(SystemTime::now().into());
    status.state = pb::InstanceState::Exited.into();
    status.exit_code = Some(code);
    status.reason = reason.to_owned();
    status.finished_at = now;
    status.observed_at = now;
    status.ready_at = None;
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender means the handle is gone: stop too.
    let _ = stop.wait_for(|stop| *stop).await;
}

async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The number of routes in an encoded `PeerRoutes`, counted on the wire without decoding them
/// (thousands of simulated agents in one process would otherwise spend the benchmark's CPU
/// decoding routes that real agents decode on their own machines). Stops at the first
/// malformed entry.
fn count_routes(mut wire: &[u8]) -> u64 {
    use prost::encoding::{decode_key, decode_varint};
    let mut count = 0;
    while !wire.is_empty() {
        let Ok((_, _)) = decode_key(&mut wire) else {
            break;
        };
        let Ok(len) = decode_varint(&mut wire) else {
            break;
        };
        let Some(rest) = usize::try_from(len).ok().and_then(|len| wire.get(len..)) else {
            break;
        };
        wire = rest;
        count += 1;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{self, InstanceState, Liveness, Timestamp, keys};
    use crate::session::test_support::*;
    use crate::store::Store;

    const TTL: Duration = Duration::from_secs(5);

    #[test]
    fn routes_are_counted_on_the_wire() {
        let route = |node: &str| pb::PeerRoute {
            node: node.into(),
            subnet: "10.88.1.0/24".into(),
            address: "10.0.0.2".into(),
        };
        let wire = |peers| prost::Message::encode_to_vec(&pb::PeerRoutes { peers });
        assert_eq!(count_routes(&wire(vec![])), 0);
        assert_eq!(
            count_routes(&wire(vec![route("a"), route("b"), route("c")])),
            3
        );
        // Truncated: the whole entries before the cut.
        let full = wire(vec![route("a"), route("b")]);
        assert_eq!(count_routes(&full[..full.len() - 1]), 1);
    }

    fn sim(name: &str) -> SimConfig {
        SimConfig {
            heartbeat_interval: Duration::from_millis(250),
            ..SimConfig::new(name)
        }
    }

    async fn liveness(store: &dyn Store, node: &str) -> Option<Liveness> {
        let kv = store.get(keys::live(node).as_bytes()).await.unwrap()?;
        Some(model::decode(&kv.value).unwrap())
    }

    #[tokio::test]
    async fn three_agents_run_what_the_store_assigns() {
        let store = store().await;
        let s = &*store.store;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let mut agents = Vec::new();
        for name in ["n1", "n2", "n3"] {
            let agent = SimAgent::start(vec![scheduler.addr.clone()], sim(name)).await;
            assert_eq!(agent.wait_connected().await, scheduler.addr);
            agents.push(agent);
        }
        for agent in &agents {
            assert!(liveness(s, agent.name()).await.is_some());
        }

        put_revision(s, "web", 1, "nginx").await;
        for agent in &agents {
            for i in 0..2 {
                let id = format!("web-{}-{i}", agent.name());
                put_instance(s, &instance("web", &id, agent.name())).await;
            }
        }
        for agent in &agents {
            agent.wait_running(|running| running.len() == 2).await;
            for id in agent.running().keys() {
                let status =
                    stored_status(s, "web", id, |st| st.state == InstanceState::Ready).await;
                assert!(status.started_at.is_some() && status.ready_at.is_some());
                assert_eq!(status.generation, 1);
            }
        }

        // A stop request: the instance exits 0 and is no longer running.
        let mut stopping = instance("web", "web-n2-0", "n2");
        stopping.stop_requested_at = Some(Timestamp::now());
        put_instance(s, &stopping).await;
        let exited =
            stored_status(s, "web", "web-n2-0", |st| st.state == InstanceState::Exited).await;
        assert_eq!(exited.exit_code, Some(0));
        agents[1]
            .wait_running(|running| !running.contains_key("web-n2-0"))
            .await;
        for agent in agents {
            agent.stop().await;
        }
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn instances_become_ready_after_the_delay_or_crash_loop() {
        let store = store().await;
        let s = &*store.store;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let agent = SimAgent::start(
            vec![scheduler.addr.clone()],
            SimConfig {
                ready_delay: Duration::from_millis(500),
                crash_images: vec!["broken:1".into()],
                crash_backoff: Duration::from_millis(100),
                ..sim("n1")
            },
        )
        .await;
        agent.wait_connected().await;
        put_revision(s, "web", 1, "nginx").await;
        put_revision(s, "bad", 1, "broken:1").await;
        put_instance(s, &instance("web", "web-a", "n1")).await;
        put_instance(s, &instance("bad", "bad-a", "n1")).await;

        stored_status(s, "web", "web-a", |st| st.state == InstanceState::Running).await;
        let ready = stored_status(s, "web", "web-a", |st| st.state == InstanceState::Ready).await;
        assert!(ready.ready_at.is_some());
        let crashing = stored_status(s, "bad", "bad-a", |st| st.restart_count >= 3).await;
        assert_eq!(crashing.state, InstanceState::Exited);
        assert_eq!(crashing.exit_code, Some(1));
        agent.stop().await;
        scheduler.stop().await;
    }

    #[tokio::test]
    async fn agents_fail_over_to_the_next_scheduler_and_restore() {
        let store = store().await;
        let s = &*store.store;
        let a = Scheduler::start(store.store.clone(), config("a", TTL)).await;
        let b = Scheduler::start(store.store.clone(), config("b", TTL)).await;
        let (a_addr, b_addr) = (a.addr.clone(), b.addr.clone());
        // The first address is unreachable: the agent moves on to the next one.
        let agent = SimAgent::start(
            vec!["http://127.0.0.1:1".into(), a_addr.clone(), b_addr.clone()],
            sim("n1"),
        )
        .await;
        assert_eq!(agent.wait_connected().await, a_addr);
        put_revision(s, "web", 1, "nginx").await;
        put_instance(s, &instance("web", "web-a", "n1")).await;
        stored_status(s, "web", "web-a", |st| st.state == InstanceState::Ready).await;

        a.stop().await;
        eventually("the agent to reconnect to b", || async {
            (agent.connected_to().as_deref() == Some(b_addr.as_str())).then_some(())
        })
        .await;
        assert_eq!(agent.sessions(), 2);
        let live = eventually("b to serve the node", || async {
            liveness(s, "n1").await.filter(|live| live.scheduler == "b")
        })
        .await;
        assert_eq!(live.scheduler, "b");
        assert_eq!(agent.running().keys().collect::<Vec<_>>(), ["web-a"]);

        // Still served: a new assignment through b.
        put_instance(s, &instance("web", "web-b", "n1")).await;
        stored_status(s, "web", "web-b", |st| st.state == InstanceState::Ready).await;
        agent.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    async fn paused_heartbeats_lose_the_node_lease() {
        let ttl = Duration::from_millis(1000);
        let store = store().await;
        let s = &*store.store;
        let scheduler = Scheduler::start(store.store.clone(), config("s", ttl)).await;
        let agent = SimAgent::start(vec![scheduler.addr.clone()], sim("n1")).await;
        agent.wait_connected().await;
        tokio::time::sleep(ttl * 2).await;
        assert!(liveness(s, "n1").await.is_some(), "heartbeats keep it live");

        agent.pause_heartbeats(true);
        eventually("the live key to expire", || async {
            liveness(s, "n1").await.is_none().then_some(())
        })
        .await;
        assert_eq!(agent.connected_to(), Some(scheduler.addr.clone()));

        agent.pause_heartbeats(false);
        eventually("the node to be live again", || async {
            liveness(s, "n1").await
        })
        .await;
        assert_eq!(agent.sessions(), 1, "same session throughout");
        agent.stop().await;
        scheduler.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hundreds_of_agents_register_at_once() {
        // Several shared connections, more registrations than the service runs at once.
        let store = store().await;
        let s = &*store.store;
        let scheduler = Scheduler::start(store.store.clone(), config("s", TTL)).await;
        let mut agents = Vec::new();
        for n in 0..300 {
            let agent = SimAgent::start(vec![scheduler.addr.clone()], sim(&format!("n{n}"))).await;
            agents.push(agent);
        }
        for agent in &agents {
            agent.wait_connected().await;
        }
        let (live, _) = s.range(keys::LIVE.as_bytes(), None).await.unwrap();
        assert_eq!(live.len(), 300);
        for agent in agents {
            agent.stop().await;
        }
        scheduler.stop().await;
    }
}
