//! The agent's container networking, between the daemon and [`crate::network`]: which conflist
//! is in use (the agent's default one, written for the node's subnet, or the operator's), attach
//! and detach of instances with the `bridge` network, the clean-up of attachments whose container
//! is gone after an agent restart, and the host-gateway routes to the other nodes' subnets.
//!
//! The node's subnet comes from the scheduler: the `welcome` carries the node record (with the
//! subnet it allocated, if any) before the first assignment set, and `network` messages carry the
//! subnet again with the peers. When the scheduler allocates none, the agent falls back to
//! `--subnet` (10.88.0.0/24 by default, for a single-node setup). An operator conflist
//! (`--cni-conf`) is used as it is: its IPAM decides the addresses and the subnet is only used
//! for routes.
//!
//! Invariants: a worker attaches only once a network is loaded (it waits for the welcome); the
//! default conflist is rewritten only when the subnet changes (containers attached before keep
//! their address: DEL works from the cached result); an attachment without a live container is
//! detached at start, so an agent killed between attach and create leaks nothing for long.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gantry::pb;
use gantry::workload::{Port, Protocol as PortProtocol, Workload};
use ipnet::IpNet;
use tokio::sync::{Mutex, watch};
use tracing::{debug, info, warn};

use crate::network::routes::{self, Peer, RouteTable};
use crate::network::{
    self, Attachment, DEFAULT_BRIDGE, Network, NetworkConfig, NetworkError, PortMapping, Protocol,
};

/// The subnet used when the scheduler allocates none (a single-node setup).
pub const DEFAULT_SUBNET: &str = "10.88.0.0/24";

/// How long after a warm namespace was taken the pool is refilled.
const WARM_REFILL_DELAY: Duration = Duration::from_millis(100);

/// How long a worker waits for the node's network before giving up on this attempt.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How the agent's networking is configured (from flags).
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The operator's conflist; `None` for the agent's default, written under the data dir.
    pub conflist: Option<PathBuf>,
    /// Plugin directories; empty for `CNI_PATH` or the usual places.
    pub plugin_dirs: Vec<PathBuf>,
    /// The subnet used when the scheduler allocates none.
    pub fallback_subnet: IpNet,
    /// The bridge of the default conflist.
    pub bridge: String,
    /// The name responder ([`super::dns`]); `None` when turned off (`--dns=false`): containers
    /// then get the host's resolvers.
    pub dns: Option<super::dns::DnsConfig>,
    /// Whether the agent writes the node-wide masquerade and FORWARD rules of the default
    /// conflist ([`network::rules`]); off only in tests that must not touch the host's rules.
    pub node_rules: bool,
    /// How many namespaces the warm pool keeps attached ahead of need (default conflist only).
    pub warm: usize,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            conflist: None,
            plugin_dirs: Vec::new(),
            fallback_subnet: DEFAULT_SUBNET.parse().expect("the default subnet parses"),
            bridge: DEFAULT_BRIDGE.to_owned(),
            dns: Some(super::dns::DnsConfig::default()),
            node_rules: true,
            warm: 0,
        }
    }
}

/// What the scheduler said about this node's network.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeNetwork {
    /// The node's subnet; `None` when the scheduler allocated none (the fallback applies).
    pub subnet: Option<IpNet>,
    /// The other nodes: their subnets and addresses.
    pub peers: Vec<Peer>,
}

impl NodeNetwork {
    /// From the node record of a `welcome`: its subnet, no peers yet.
    pub fn from_welcome(node: Option<&pb::Node>) -> NodeNetwork {
        NodeNetwork {
            subnet: node.and_then(|n| parse_subnet(&n.subnet, "welcome")),
            peers: Vec::new(),
        }
    }

    /// From a `network` message resolved into the node's subnet and complete route list.
    /// Unreadable entries are logged and left out.
    pub fn from_routes(subnet: &str, peers: Vec<pb::PeerRoute>) -> NodeNetwork {
        let peers = peers
            .into_iter()
            .filter_map(|p| {
                let pb::PeerRoute {
                    node,
                    subnet,
                    address,
                } = p;
                let subnet = parse_subnet(&subnet, &node)?;
                match address.parse::<IpAddr>() {
                    Ok(address) => Some(Peer { subnet, address }),
                    Err(_) => {
                        warn!(%node, %address, "peer address is not an ip address; no route to it");
                        None
                    }
                }
            })
            .collect();
        NodeNetwork {
            subnet: parse_subnet(subnet, "network"),
            peers,
        }
    }
}

fn parse_subnet(text: &str, origin: &str) -> Option<IpNet> {
    if text.is_empty() {
        return None;
    }
    match text.parse::<IpNet>() {
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            warn!(%origin, subnet = %text, "unreadable subnet from the scheduler ignored");
            None
        }
    }
}

/// A loaded network and the scheduler's subnet it was loaded for.
#[derive(Clone)]
struct Loaded {
    /// The subnet asked for (`None`: the fallback); `None` outside when loaded from disk at start,
    /// before the scheduler said anything.
    asked: Option<Option<IpNet>>,
    network: Arc<Network>,
}

/// The agent's container network.
pub struct Net {
    config: NetConfig,
    data_dir: PathBuf,
    /// The agent's own address, so that it never routes to itself.
    own_address: Option<IpAddr>,
    /// What the scheduler said last (`None` before the first welcome).
    updates: watch::Receiver<Option<NodeNetwork>>,
    loaded: watch::Sender<Option<Loaded>>,
    /// The subnet the default conflist was last written for.
    subnet: Mutex<Option<IpNet>>,
    /// The gateway address of the node network, where the name responder listens.
    gateway: watch::Sender<Option<IpAddr>>,
    /// Namespaces attached ahead of need, each with the network it was attached on.
    warm: std::sync::Mutex<Vec<(Arc<Network>, String, Attachment)>>,
    /// Wakes the task refilling `warm`.
    warm_wake: tokio::sync::Notify,
}

impl Net {
    /// Prepares the network of an agent with data directory `data_dir`. A conflist that already
    /// exists (the operator's, or the default written by an earlier agent) is loaded at once, so
    /// attachments of an earlier agent can be cleaned up before the scheduler is reached.
    pub async fn open(
        config: NetConfig,
        data_dir: &Path,
        own_address: &str,
        updates: watch::Receiver<Option<NodeNetwork>>,
    ) -> Net {
        let net = Net {
            own_address: own_address.parse().ok(),
            updates,
            data_dir: data_dir.to_owned(),
            loaded: watch::channel(None).0,
            subnet: Mutex::new(None),
            gateway: watch::channel(None).0,
            warm: std::sync::Mutex::new(Vec::new()),
            warm_wake: tokio::sync::Notify::new(),
            config,
        };
        let path = net.conflist_path();
        if path.exists() {
            match Network::new(net.network_config()).await {
                Ok(loaded) => {
                    net.loaded.send_replace(Some(Loaded {
                        asked: None,
                        network: Arc::new(loaded),
                    }));
                }
                Err(err) => {
                    warn!(path = %path.display(), ?err, "cannot load the network configuration")
                }
            }
        }
        net
    }

    /// The conflist in use.
    pub fn conflist_path(&self) -> PathBuf {
        match &self.config.conflist {
            Some(path) => path.clone(),
            None => self.data_dir.join("cni/gantry.conflist"),
        }
    }

    fn network_config(&self) -> NetworkConfig {
        let mut config = NetworkConfig::new(
            self.conflist_path(),
            self.data_dir.clone(),
            self.data_dir.clone(),
        );
        if !self.config.plugin_dirs.is_empty() {
            config.plugin_dirs.clone_from(&self.config.plugin_dirs);
        }
        config
    }

    /// Where the host-local IPAM plugin of the default conflist keeps its reservations.
    pub fn ipam_dir(&self) -> PathBuf {
        self.data_dir.join("cni/networks")
    }

    /// Makes the network of `subnet` (or the fallback) the one new attachments use: writes the
    /// default conflist when it is missing or was written for another subnet, and loads it.
    async fn use_subnet(&self, asked: Option<IpNet>) -> Result<(), String> {
        let subnet = asked.unwrap_or(self.config.fallback_subnet);
        let mut current = self.subnet.lock().await;
        let loaded = self.loaded.borrow().clone();
        let reuse = match loaded {
            // The operator's conflist decides addresses: it is loaded once.
            Some(loaded) if self.config.conflist.is_some() => Some(loaded.network),
            Some(loaded) if *current == Some(subnet) => Some(loaded.network),
            _ => None,
        };
        if let Some(network) = reuse {
            *current = Some(subnet);
            self.loaded.send_replace(Some(Loaded {
                asked: Some(asked),
                network,
            }));
            return Ok(());
        }
        if self.config.conflist.is_some() {
            let network = Network::new(self.network_config())
                .await
                .map_err(|e| error_chain(&e))?;
            *current = Some(subnet);
            self.loaded.send_replace(Some(Loaded {
                asked: Some(asked),
                network: Arc::new(network),
            }));
            return Ok(());
        }
        let path = self.conflist_path();
        let wanted = network::default_conflist(subnet, &self.config.bridge, &self.ipam_dir());
        let on_disk = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        if on_disk.as_ref() != Some(&wanted) {
            if on_disk.is_some() {
                info!(%subnet, "the node subnet changed; new containers get addresses from it");
            }
            write_atomic(&path, &wanted).map_err(|e| {
                format!(
                    "cannot write the network configuration {}: {e}",
                    path.display()
                )
            })?;
        }
        if self.config.node_rules {
            network::rules::install(&self.config.bridge, subnet)
                .await
                .map_err(|e| {
                    format!(
                        "cannot write the node's masquerade and forward rules: {}",
                        error_chain(&e)
                    )
                })?;
        }
        let network = Network::new(self.network_config())
            .await
            .map_err(|e| error_chain(&e))?;
        self.loaded.send_replace(Some(Loaded {
            asked: Some(asked),
            network: Arc::new(network),
        }));
        *current = Some(subnet);
        // The bridge plugin gives the bridge the subnet's first address (`isGateway`).
        if let Some(gateway) = subnet.hosts().next() {
            self.gateway
                .send_if_modified(|g| g.replace(gateway) != Some(gateway));
        }
        info!(%subnet, conflist = %path.display(), "container network ready");
        Ok(())
    }

    /// The network for the subnet the scheduler asked for last, waiting for the welcome and for
    /// the network to be loaded if needed.
    async fn network(&self) -> Result<Arc<Network>, String> {
        let mut updates = self.updates.clone();
        let mut loaded = self.loaded.subscribe();
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let asked = updates.borrow_and_update().as_ref().map(|u| u.subnet);
            if let (Some(asked), Some(current)) = (asked, loaded.borrow_and_update().as_ref())
                && (self.config.conflist.is_some() || current.asked == Some(asked))
            {
                return Ok(current.network.clone());
            }
            tokio::select! {
                _ = updates.changed() => {}
                _ = loaded.changed() => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(format!(
                        "the node's container network is not ready: no welcome from the \
                         scheduler, or {} could not be loaded (see the agent's log)",
                        self.conflist_path().display()
                    ));
                }
            }
        }
    }

    /// Gives instance `id` a network namespace on the node network, with `ports` published.
    /// A namespace left by an earlier attempt (an agent killed between attach and create) is
    /// detached first. Without ports, a namespace of the warm pool is taken when there is one.
    pub async fn attach(&self, id: &str, ports: &[Port]) -> Result<Attachment, String> {
        let network = self.network().await?;
        if ports.is_empty() && self.warm_enabled() {
            self.warm_wake.notify_one();
            if let Some(attached) = self.take_warm(&network, id).await {
                return Ok(attached);
            }
        }
        self.attach_as(&network, id, &port_mappings(ports)).await
    }

    /// CNI ADD of `cni_id` on `network`, detaching a leftover namespace of that id first.
    async fn attach_as(
        &self,
        network: &Network,
        cni_id: &str,
        mappings: &[PortMapping],
    ) -> Result<Attachment, String> {
        let attached = match network.attach(cni_id, mappings).await {
            Err(NetworkError::AlreadyAttached { .. }) => {
                network.detach(cni_id).await.map_err(|e| error_chain(&e))?;
                network
                    .attach(cni_id, mappings)
                    .await
                    .map_err(|e| error_chain(&e))
            }
            other => other.map_err(|e| error_chain(&e)),
        }?;
        // The bridge exists now: the name responder binds at once rather than at its next try.
        if let Some(gateway) = attached.gateway {
            self.gateway.send_replace(Some(gateway));
        }
        Ok(attached)
    }

    fn warm_enabled(&self) -> bool {
        self.config.warm > 0 && self.config.conflist.is_none()
    }

    /// Where the claim of instance `id` on a warm namespace is kept: a file naming the
    /// namespace's CNI id, so that its detach (also by a later agent) finds it.
    fn claim_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("cni/warm").join(id)
    }

    /// The CNI id instance `id` is attached as: a claimed warm namespace's, else its own.
    fn cni_id(&self, id: &str) -> String {
        std::fs::read_to_string(self.claim_path(id))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty() && !s.contains('/'))
            .unwrap_or_else(|| id.to_owned())
    }

    /// A warm namespace of `network` for instance `id`, its claim recorded first. Warm
    /// namespaces of an older network (the subnet changed) are left to [`Net::keep_warm`],
    /// which the caller has woken, so that no start waits on their detach.
    async fn take_warm(&self, network: &Arc<Network>, id: &str) -> Option<Attachment> {
        let (on, cni_id, attached) = {
            let mut warm = self
                .warm
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = warm
                .iter()
                .rposition(|(on, _, _)| Arc::ptr_eq(on, network))?;
            warm.swap_remove(at)
        };
        let path = self.claim_path(id);
        let claimed = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| write_bytes_atomic(&path, cni_id.as_bytes()));
        if let Err(err) = claimed {
            warn!(instance = %id, %err, "cannot record the claim of a warm namespace; attaching afresh");
            let _ = on.detach(&cni_id).await;
            return None;
        }
        debug!(instance = %id, namespace = %cni_id, "took a warm network namespace");
        Some(attached)
    }

    /// Keeps the warm pool filled (the configured number of namespaces attached on the current
    /// network, without ports) until the agent stops; woken when one is taken.
    pub async fn keep_warm(self: Arc<Self>) {
        if !self.warm_enabled() {
            return;
        }
        let mut serial: u64 = 0;
        loop {
            let mut failed = false;
            match self.network().await {
                Ok(network) => loop {
                    let stale: Vec<_> = {
                        let mut warm = self
                            .warm
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let (current, stale) = std::mem::take(&mut *warm)
                            .into_iter()
                            .partition(|(on, _, _)| Arc::ptr_eq(on, &network));
                        *warm = current;
                        stale
                    };
                    for (on, cni_id, _) in stale {
                        let _ = on.detach(&cni_id).await;
                    }
                    let count = self
                        .warm
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .len();
                    if count >= self.config.warm {
                        break;
                    }
                    serial += 1;
                    let cni_id = warm_id(serial);
                    match self.attach_as(&network, &cni_id, &[]).await {
                        Ok(attached) => self
                            .warm
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((network.clone(), cni_id, attached)),
                        Err(err) => {
                            warn!(%err, "cannot attach a warm network namespace");
                            failed = true;
                            break;
                        }
                    }
                },
                Err(_) => failed = true,
            }
            let wait = if failed {
                Duration::from_secs(3)
            } else {
                Duration::from_secs(60)
            };
            tokio::select! {
                () = self.warm_wake.notified() => {
                    // Refill after the start that took a namespace, not during it: both want
                    // the CPU, and the start is what someone waits for.
                    tokio::time::sleep(WARM_REFILL_DELAY).await;
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The gateway address of the node network as it becomes known (from the default
    /// conflist's subnet, and from each attachment), for the name responder.
    pub fn gateways(&self) -> watch::Receiver<Option<IpAddr>> {
        self.gateway.subscribe()
    }

    /// The /etc/resolv.conf of an attached container when the name responder is on: its
    /// gateway as the nameserver, `search gantry`; `None` when the responder is off or the
    /// network has no gateway (the container gets the host's resolvers).
    pub fn resolv_conf(&self, attachment: &Attachment) -> Option<String> {
        let dns = self.config.dns.as_ref()?;
        let gateway = attachment.gateway?;
        let host = std::fs::read_to_string(&dns.resolv_conf).unwrap_or_default();
        Some(super::dns::resolv_conf(gateway, &host))
    }

    /// Detaches instance `id` (CNI DEL, namespace removed); nothing to do when it is not attached.
    /// A failure is logged: the clean-up at the next start retries it.
    pub async fn detach(&self, id: &str) {
        let Some(network) = self.loaded.borrow().clone().map(|l| l.network) else {
            return;
        };
        let cni_id = self.cni_id(id);
        match network.detach(&cni_id).await {
            Ok(()) => {
                if cni_id != id {
                    let _ = std::fs::remove_file(self.claim_path(id));
                }
                debug!(instance = %id, "detached from the network")
            }
            Err(err) => warn!(instance = %id, err = %error_chain(&err), "network detach failed"),
        }
    }

    /// Detaches every attachment whose container is not in `running` (after an agent restart:
    /// containers that ended or vanished while no agent watched), and the warm namespaces of
    /// an earlier agent that no instance claimed.
    pub async fn cleanup(&self, running: &HashSet<String>) {
        let Some(network) = self.loaded.borrow().clone().map(|l| l.network) else {
            return;
        };
        let mut keep = running.clone();
        let claims = self.data_dir.join("cni/warm");
        for entry in std::fs::read_dir(&claims).into_iter().flatten().flatten() {
            let instance = entry.file_name().to_string_lossy().into_owned();
            if running.contains(&instance) {
                keep.insert(self.cni_id(&instance));
            } else {
                // Its namespace (if any is left) is not kept below, so it is detached.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        match network.cleanup_stale(&keep).await {
            Ok(report) => {
                if !report.detached.is_empty() {
                    info!(detached = ?report.detached, "network attachments of dead containers removed");
                }
            }
            Err(err) => warn!(err = %error_chain(&err), "network clean-up failed"),
        }
    }

    /// Applies what the scheduler says about the node's network until `updates` closes: the
    /// subnet for new attachments, and one route per peer subnet via the peer's address (routes of
    /// departed peers are removed). Failures are retried every few seconds.
    pub async fn run(self: Arc<Self>) {
        let mut updates = self.updates.clone();
        let table = RouteTable::host();
        loop {
            let update = updates.borrow_and_update().clone();
            let mut retry = false;
            if let Some(update) = update {
                if let Err(err) = self.use_subnet(update.subnet).await {
                    warn!(%err, "the container network could not be configured");
                    retry = true;
                }
                let own = self.subnet.lock().await.or(update.subnet);
                let own_addresses: Vec<IpAddr> = self.own_address.into_iter().collect();
                let desired = routes::desired_routes(own, &own_addresses, &update.peers);
                match table.sync(&desired).await {
                    Ok(actions) if !actions.is_empty() => {
                        info!(?actions, "routes to other nodes updated")
                    }
                    Ok(_) => {}
                    Err(err) => {
                        warn!(err = %error_chain(&err), "routes to other nodes not applied");
                        retry = true;
                    }
                }
            }
            let delay = if retry {
                Duration::from_secs(3)
            } else {
                Duration::from_secs(60)
            };
            tokio::select! {
                changed = updates.changed() => if changed.is_err() { return },
                // Look again now and then: an operator may have flushed the routes.
                () = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// The `portMappings` of a workload's published ports.
pub fn port_mappings(ports: &[Port]) -> Vec<PortMapping> {
    ports
        .iter()
        .filter_map(|p| {
            let host = u16::try_from(p.host?).ok()?;
            Some(PortMapping {
                host_port: host,
                container_port: u16::try_from(p.container).ok()?,
                protocol: match p.protocol {
                    PortProtocol::Tcp => Protocol::Tcp,
                    PortProtocol::Udp => Protocol::Udp,
                },
                host_ip: None,
            })
        })
        .collect()
}

/// The host name of an instance's container on the node network: the instance id, or its first
/// 12 characters (the runtime's default) when the id is too long for a host name.
pub fn hostname(id: &str) -> String {
    if id.len() <= 63 {
        id.to_owned()
    } else {
        id.chars().take(12).collect()
    }
}

/// The `/etc/hosts` entries of a container on the node network: its own name at its address.
pub fn hosts(hostname: &str, attachment: &Attachment) -> BTreeMap<String, String> {
    [(hostname.to_owned(), attachment.ip.addr().to_string())].into()
}

/// Whether the spec's instances get a namespace on the node network.
pub fn wants_bridge(spec: &Workload) -> bool {
    spec.network == gantry::workload::Network::Bridge
}

/// The CNI id of the `serial`th warm namespace of this agent process: unique across agent
/// restarts (the time in microseconds) and within one (the serial).
fn warm_id(serial: u64) -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("warm-{micros:x}-{serial}")
}

fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn write_atomic(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    let tmp = path.with_extension("conflist.tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, path)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_become_port_mappings() {
        let ports = vec![
            Port {
                container: 80,
                host: Some(8080),
                protocol: PortProtocol::Tcp,
            },
            Port {
                container: 53,
                host: None,
                protocol: PortProtocol::Udp,
            },
            Port {
                container: 53,
                host: Some(5353),
                protocol: PortProtocol::Udp,
            },
        ];
        let maps = port_mappings(&ports);
        assert_eq!(maps.len(), 2);
        assert_eq!((maps[0].host_port, maps[0].container_port), (8080, 80));
        assert_eq!(maps[1].protocol, Protocol::Udp);
    }

    #[test]
    fn network_messages_convert_and_skip_bad_entries() {
        let n = NodeNetwork::from_routes(
            "10.88.1.7/24",
            vec![
                pb::PeerRoute {
                    node: "b".into(),
                    subnet: "10.88.2.0/24".into(),
                    address: "192.168.1.2".into(),
                },
                pb::PeerRoute {
                    node: "c".into(),
                    subnet: "nonsense".into(),
                    address: "192.168.1.3".into(),
                },
                pb::PeerRoute {
                    node: "d".into(),
                    subnet: "10.88.4.0/24".into(),
                    address: "node-d.example".into(),
                },
            ],
        );
        assert_eq!(n.subnet, Some("10.88.1.0/24".parse().unwrap()));
        assert_eq!(
            n.peers,
            [Peer {
                subnet: "10.88.2.0/24".parse().unwrap(),
                address: "192.168.1.2".parse().unwrap(),
            }]
        );
        assert_eq!(NodeNetwork::from_welcome(None).subnet, None);
    }

    #[tokio::test]
    async fn the_default_conflist_follows_the_subnet() {
        let tmp = tempfile::tempdir().unwrap();
        let (_tx, rx) = watch::channel(None);
        let config = NetConfig {
            node_rules: false,
            ..NetConfig::default()
        };
        let net = Net::open(config.clone(), tmp.path(), "127.0.0.1", rx.clone()).await;
        net.use_subnet(None).await.unwrap();
        let read = || std::fs::read_to_string(net.conflist_path()).unwrap();
        assert!(read().contains("10.88.0.0/24"), "{}", read());
        net.use_subnet(Some("10.88.7.0/24".parse().unwrap()))
            .await
            .unwrap();
        assert!(read().contains("10.88.7.0/24"), "{}", read());
        // A new agent on the same data dir loads it before any welcome.
        let again = Net::open(config, tmp.path(), "127.0.0.1", rx).await;
        assert!(again.loaded.borrow().is_some());
    }
}
