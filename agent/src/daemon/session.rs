//! The agent's side of `NodeSession.Session`: dial a scheduler replica, register (with the
//! statuses of the instances found on the machine), heartbeat, turn assignment sets and
//! deltas into the desired set the reconciler works from, and send status reports batched.
//! When the stream breaks it dials the next replica with jittered exponential backoff
//! (0.5 s doubling to 30 s); containers keep running meanwhile.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gantry::pb;
use gantry::pb::agent_message::Message as ToScheduler;
use gantry::pb::node_session_client::NodeSessionClient;
use gantry::pb::scheduler_message::Message as FromScheduler;
use gantry::workload::Workload;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tracing::{debug, info, warn};

use super::dns::Names;
use super::net::NodeNetwork;
use super::reconcile::Assigned;
use super::relay::{self, Relays};
use super::status::Status;

/// First reconnection delay.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest reconnection delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// At most one status report per this window (the first after a quiet spell at once); changes
/// arriving meanwhile go out together.
const REPORT_COALESCE: Duration = Duration::from_millis(20);
/// Largest message accepted from the scheduler (a full assignment set of a busy node).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The assignments of this node as last received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Store revision of the last set or delta applied.
    pub revision: i64,
    /// Instance id → assignment.
    pub instances: BTreeMap<String, Assigned>,
}

/// How the agent reaches the scheduler.
#[derive(Debug, Clone)]
pub struct Dial {
    /// Scheduler addresses (`http://host:port` or `https://…`), tried in turn.
    pub schedulers: Vec<String>,
    /// TLS settings for `https` addresses (CA, and a client certificate for mTLS).
    pub tls: Option<ClientTlsConfig>,
}

/// Runs the session until `shutdown`: publishes the desired set to `desired` (starting from
/// the first set received after registration; `None` until then), publishes what the scheduler
/// says about the node's network to `network` (from the `welcome`, before the first set), keeps
/// the cluster's instance names in `names` (for the name responder), and
/// sends what arrives on `reports`. `register` is the registration, without instances; `restored` are the statuses
/// found on the machine. `relays` serves the logs and exec relays the scheduler opens.
// Each argument is one channel of the daemon's wiring; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    dial: Dial,
    register: pb::Register,
    restored: Vec<Status>,
    desired: watch::Sender<Option<Desired>>,
    network: watch::Sender<Option<NodeNetwork>>,
    names: watch::Sender<Names>,
    mut reports: mpsc::UnboundedReceiver<Status>,
    mut shutdown: watch::Receiver<bool>,
    relays: Relays,
) {
    let mut session = Session {
        relays,
        register,
        latest: restored.into_iter().map(|s| (s.id.clone(), s)).collect(),
        desired,
        network,
        names,
        peer_routes: BTreeMap::new(),
        applied: 0,
        rng: seed(),
    };
    let channels: Vec<(String, Option<Channel>)> = dial
        .schedulers
        .iter()
        .map(|address| (address.clone(), channel(address, dial.tls.as_ref())))
        .collect();
    if channels.is_empty() {
        warn!("no scheduler address; the agent stays disconnected");
        stopped(&mut shutdown).await;
        return;
    }
    let mut next = 0;
    let mut backoff = BACKOFF_MIN;
    loop {
        let (address, channel) = &channels[next];
        let welcomed = match channel {
            Some(channel) => {
                match session
                    .serve(address, channel.clone(), &mut reports, &mut shutdown)
                    .await
                {
                    None => return,
                    Some(welcomed) => welcomed,
                }
            }
            None => false,
        };
        if welcomed {
            backoff = BACKOFF_MIN;
        }
        next = (next + 1) % channels.len();
        let delay = session.jitter(backoff);
        debug!(?delay, "reconnecting to a scheduler");
        tokio::select! {
            () = stopped(&mut shutdown) => return,
            () = tokio::time::sleep(delay) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn channel(address: &str, tls: Option<&ClientTlsConfig>) -> Option<Channel> {
    let endpoint = match Endpoint::from_shared(address.to_owned()) {
        Ok(endpoint) => endpoint,
        Err(err) => {
            warn!(%address, %err, "bad scheduler address");
            return None;
        }
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let endpoint = match tls {
        Some(tls) => match endpoint.tls_config(tls.clone()) {
            Ok(endpoint) => endpoint,
            Err(err) => {
                warn!(%address, %err, "bad TLS settings");
                return None;
            }
        },
        None => endpoint,
    };
    Some(endpoint.connect_lazy())
}

fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    (nanos ^ u64::from(std::process::id())) | 1
}

struct Session {
    /// Serves the logs and exec relays of each session.
    relays: Relays,
    register: pb::Register,
    /// The latest status of every instance, sent again in full at each registration.
    latest: BTreeMap<String, Status>,
    desired: watch::Sender<Option<Desired>>,
    network: watch::Sender<Option<NodeNetwork>>,
    /// The cluster's instance names, for the name responder.
    names: watch::Sender<Names>,
    /// The other nodes' routes as the scheduler last listed them, by node (the base that
    /// `delta` network messages change).
    peer_routes: BTreeMap<String, pb::PeerRoute>,
    applied: i64,
    rng: u64,
}

fn message(message: ToScheduler) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(message),
    }
}

impl Session {
    /// Half of `backoff` plus a random part of the other half.
    fn jitter(&mut self, backoff: Duration) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let half = backoff / 2;
        let extra = u64::try_from(half.as_micros()).unwrap_or(u64::MAX).max(1);
        half + Duration::from_micros(self.rng % extra)
    }

    /// One session; `None` on shutdown, else whether it got as far as `welcome`.
    async fn serve(
        &mut self,
        address: &str,
        channel: Channel,
        reports: &mut mpsc::UnboundedReceiver<Status>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<bool> {
        let (tx, rx) = mpsc::channel(64);
        let mut register = self.register.clone();
        register.applied_revision = self.applied;
        register.instances = self.latest.values().map(pb::InstanceStatus::from).collect();
        // The queue is empty: this fits.
        let _ = tx.try_send(message(ToScheduler::Register(register)));
        let mut client =
            NodeSessionClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        // Relay frames have a queue of their own, sent only when the session's own messages
        // (heartbeats, status reports) are not waiting.
        let (relay_tx, relay_rx) = mpsc::channel(relay::OUTBOUND_QUEUE);
        let mut relays = self.relays.session(relay_tx, channel);
        let outbound = futures_util::stream::select_with_strategy(
            ReceiverStream::new(rx),
            ReceiverStream::new(relay_rx),
            |_: &mut ()| futures_util::stream::PollNext::Left,
        );
        let response = tokio::select! {
            () = stopped(shutdown) => return None,
            response = client.session(outbound) => response,
        };
        let mut inbound = match response {
            Ok(response) => response.into_inner(),
            Err(status) => {
                warn!(%address, %status, "session not opened");
                return Some(false);
            }
        };
        let mut welcomed = false;
        let mut heartbeat: Option<tokio::time::Interval> = None;
        let mut pending: BTreeMap<String, Status> = BTreeMap::new();
        let mut flush_at: Option<Instant> = None;
        let mut last_flush = Instant::now()
            .checked_sub(REPORT_COALESCE)
            .unwrap_or_else(Instant::now);
        loop {
            tokio::select! {
                () = stopped(shutdown) => return None,
                received = inbound.message() => match received {
                    Ok(Some(pb::SchedulerMessage { message: Some(received) })) => {
                        if let FromScheduler::Welcome(welcome) = &received {
                            welcomed = true;
                            let period = welcome
                                .heartbeat_interval
                                .and_then(|d| Duration::try_from(d).ok())
                                .filter(|d| !d.is_zero())
                                .unwrap_or(Duration::from_secs(2));
                            let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                            heartbeat = Some(interval);
                            info!(%address, scheduler = %welcome.scheduler, "registered with the scheduler");
                        }
                        match received {
                            FromScheduler::Logs(_)
                            | FromScheduler::ExecStart(_)
                            | FromScheduler::ExecInput(_)
                            | FromScheduler::RelayCancel(_)
                            | FromScheduler::StatsRequest(_)
                            | FromScheduler::ImageRequest(_) => relays.handle(received),
                            received => self.receive(received),
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        info!(%address, "the scheduler ended the session");
                        return Some(welcomed);
                    }
                    Err(status) => {
                        warn!(%address, %status, "session lost");
                        return Some(welcomed);
                    }
                },
                () = tick(&mut heartbeat) => {
                    let beat = pb::Heartbeat {
                        sent_at: Some(SystemTime::now().into()),
                        applied_revision: self.applied,
                    };
                    if tx.send(message(ToScheduler::Heartbeat(beat))).await.is_err() {
                        return Some(welcomed);
                    }
                }
                report = reports.recv() => {
                    let Some(status) = report else {
                        // The reconciler is gone: the agent is stopping.
                        return None;
                    };
                    self.latest.insert(status.id.clone(), status.clone());
                    pending.insert(status.id.clone(), status);
                    // At once after a quiet spell; a burst goes out every REPORT_COALESCE.
                    flush_at.get_or_insert_with(|| {
                        Instant::now().max(last_flush + REPORT_COALESCE)
                    });
                }
                () = sleep_until(flush_at), if welcomed => {
                    flush_at = None;
                    last_flush = Instant::now();
                    let instances = std::mem::take(&mut pending)
                        .values()
                        .map(pb::InstanceStatus::from)
                        .collect();
                    let report = pb::StatusReport { instances };
                    if tx.send(message(ToScheduler::Status(report))).await.is_err() {
                        return Some(welcomed);
                    }
                }
            }
        }
    }

    fn receive(&mut self, received: FromScheduler) {
        match received {
            FromScheduler::Welcome(welcome) => {
                // The subnet arrives before the first assignment set, so no worker attaches an
                // instance to the fallback network of a node that has a subnet of its own.
                let subnet = NodeNetwork::from_welcome(welcome.node.as_ref()).subnet;
                self.network.send_modify(|network| {
                    network.get_or_insert_with(NodeNetwork::default).subnet = subnet;
                });
            }
            FromScheduler::Assignments(set) => {
                if set.revision < self.applied {
                    debug!(
                        revision = set.revision,
                        applied = self.applied,
                        "stale assignment set ignored"
                    );
                    return;
                }
                let instances: BTreeMap<String, Assigned> = set
                    .assignments
                    .into_iter()
                    .map(|a| (a.instance_id.clone(), assigned(a)))
                    .collect();
                self.latest.retain(|id, _| instances.contains_key(id));
                self.applied = set.revision;
                info!(
                    revision = set.revision,
                    instances = instances.len(),
                    "assignment set received"
                );
                self.desired.send_replace(Some(Desired {
                    revision: set.revision,
                    instances,
                }));
            }
            FromScheduler::AssignmentDelta(delta) => {
                if delta.revision < self.applied {
                    debug!(
                        revision = delta.revision,
                        applied = self.applied,
                        "stale assignment delta ignored"
                    );
                    return;
                }
                self.applied = delta.revision;
                let latest = &mut self.latest;
                self.desired.send_modify(|desired| {
                    let desired = desired.get_or_insert_with(Desired::default);
                    desired.revision = delta.revision;
                    for id in &delta.removals {
                        desired.instances.remove(id);
                        latest.remove(id);
                    }
                    for a in delta.upserts {
                        desired.instances.insert(a.instance_id.clone(), assigned(a));
                    }
                });
            }
            FromScheduler::Network(config) => {
                match apply_network(&mut self.peer_routes, &self.register.name, config) {
                    Ok((subnet, peers)) => {
                        self.network
                            .send_replace(Some(NodeNetwork::from_routes(&subnet, peers)));
                    }
                    Err(err) => {
                        // Routes stay as they were; the next complete list sets them right.
                        warn!(%err, "network message with unreadable routes ignored");
                    }
                }
            }
            FromScheduler::Names(table) => {
                let mut result = Ok(());
                // Applied in place: a delta costs what it changes, not the whole table.
                self.names.send_if_modified(|names| {
                    result = super::dns::apply(names, table);
                    result.is_ok()
                });
                if let Err(err) = result {
                    // The names stay as they were; the next complete table sets them right.
                    warn!(%err, "unreadable name table ignored");
                }
            }
            FromScheduler::Logs(_)
            | FromScheduler::ExecStart(_)
            | FromScheduler::ExecInput(_)
            | FromScheduler::RelayCancel(_)
            | FromScheduler::StatsRequest(_)
            | FromScheduler::ImageRequest(_) => {
                // Handled by the session's relays before `receive`.
            }
        }
    }
}

/// Applies a `network` message to the routes last listed (`peers`, by node) and returns the
/// node's subnet and every other node's route: a full message replaces the list, a `delta`
/// changes it. The node's own entry (`own`) is skipped. Unreadable routes change nothing.
fn apply_network(
    peers: &mut BTreeMap<String, pb::PeerRoute>,
    own: &str,
    config: pb::NetworkConfig,
) -> Result<(String, Vec<pb::PeerRoute>), prost::DecodeError> {
    let routes = <pb::PeerRoutes as prost::Message>::decode(config.routes)?;
    if !config.delta {
        peers.clear();
    }
    for node in &config.removed_peers {
        peers.remove(node);
    }
    for route in routes.peers {
        if route.node != own {
            peers.insert(route.node.clone(), route);
        }
    }
    Ok((config.subnet, peers.values().cloned().collect()))
}

/// The agent's form of an assignment. A spec that does not convert is treated like a missing
/// one: the instance is stopped rather than run from something the agent cannot read.
fn assigned(a: pb::Assignment) -> Assigned {
    let pb::Assignment {
        instance_id,
        workload,
        generation,
        spec,
        revision: _,
        stop,
    } = a;
    let spec = spec.and_then(|spec| match Workload::try_from(spec) {
        Ok(spec) => Some(Arc::new(spec)),
        Err(err) => {
            warn!(instance = %instance_id, %err, "unreadable workload spec in an assignment");
            None
        }
    });
    Assigned {
        workload,
        generation,
        stop: stop || spec.is_none(),
        spec,
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
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

/// Returns once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(node: &str, subnet: &str) -> pb::PeerRoute {
        pb::PeerRoute {
            node: node.into(),
            subnet: subnet.into(),
            address: format!("192.168.0.{}", node.len()),
        }
    }

    fn nodes(routes: &[pb::PeerRoute]) -> Vec<(&str, &str)> {
        routes
            .iter()
            .map(|p| (p.node.as_str(), p.subnet.as_str()))
            .collect()
    }

    fn encoded(peers: Vec<pb::PeerRoute>) -> prost::bytes::Bytes {
        prost::Message::encode_to_vec(&pb::PeerRoutes { peers }).into()
    }

    #[test]
    fn network_deltas_change_the_last_complete_list() {
        let mut peers = BTreeMap::new();
        // The node's own entry ("a") is skipped.
        let (subnet, full) = apply_network(
            &mut peers,
            "a",
            pb::NetworkConfig {
                subnet: "10.88.0.0/24".into(),
                routes: encoded(vec![
                    route("a", "10.88.0.0/24"),
                    route("b", "10.88.1.0/24"),
                    route("c", "10.88.2.0/24"),
                ]),
                ..pb::NetworkConfig::default()
            },
        )
        .unwrap();
        assert_eq!(subnet, "10.88.0.0/24");
        assert_eq!(nodes(&full), [("b", "10.88.1.0/24"), ("c", "10.88.2.0/24")]);
        let (_, changed) = apply_network(
            &mut peers,
            "a",
            pb::NetworkConfig {
                subnet: "10.88.0.0/24".into(),
                routes: encoded(vec![route("d", "10.88.3.0/24"), route("b", "10.88.9.0/24")]),
                delta: true,
                removed_peers: vec!["c".into()],
                ..pb::NetworkConfig::default()
            },
        )
        .unwrap();
        assert_eq!(
            nodes(&changed),
            [("b", "10.88.9.0/24"), ("d", "10.88.3.0/24")]
        );
        // Unreadable routes change nothing.
        let garbage = pb::NetworkConfig {
            routes: prost::bytes::Bytes::from_static(&[0x0a, 0x7f]),
            ..pb::NetworkConfig::default()
        };
        assert!(apply_network(&mut peers, "a", garbage).is_err());
        assert_eq!(peers.len(), 2);
        // A complete list again replaces everything.
        let (_, again) = apply_network(
            &mut peers,
            "a",
            pb::NetworkConfig {
                routes: encoded(vec![route("e", "10.88.4.0/24")]),
                ..pb::NetworkConfig::default()
            },
        )
        .unwrap();
        assert_eq!(nodes(&again), [("e", "10.88.4.0/24")]);
    }
}
