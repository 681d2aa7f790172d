//! Container networking for the agent: each container gets its own network namespace, set up by
//! standard CNI plugins from a conflist (Gantry's default — bridge, host-local, portmap, with the
//! node-wide masquerade and FORWARD rules of `rules` — or the operator's), and host-gateway
//! routes to the other nodes' subnets.
//!
//! Map: `netns` makes and removes the namespaces (`<run dir>/netns/<container id>`), `cni` runs
//! the plugins and caches their results (`<data dir>/cni/results`), `routes` computes and applies
//! the inter-node routes, and [`Network`] here ties namespaces and plugins into attach / detach /
//! check / cleanup.
//!
//! Invariants: a namespace exists only while the container is attached or being attached; a
//! failed attach undoes itself (DEL, then the namespace goes); a cache record exists from the
//! start of ADD until a DEL succeeds, so DEL works after an agent restart. Calls for one container
//! must not overlap (the agent serialises work per container).

pub mod cni;
pub mod netns;
pub mod routes;
pub mod rules;

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Value, json};
use tracing::warn;

pub use cni::{CniError, CniResult, ConfList, PortMapping, Protocol};
pub use netns::NetnsError;
pub use routes::{NodeRoute, Peer, RouteAction, RouteError, RouteTable};

use cni::{Cni, RuntimeConf};

/// Name of Gantry's default network.
pub const DEFAULT_NETWORK_NAME: &str = "gantry";

/// Name of Gantry's default bridge.
pub const DEFAULT_BRIDGE: &str = "gantry0";

/// Where plugins are looked for when `CNI_PATH` is not set: Debian's package, then the upstream
/// tarball's usual place.
pub const DEFAULT_PLUGIN_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

/// The interface name of the loopback network.
const LOOPBACK_IFNAME: &str = "lo";

/// What can go wrong attaching containers to the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The conflist could not be loaded.
    #[error("cannot load network configuration {path}")]
    Load {
        /// The conflist file.
        path: PathBuf,
        /// Why.
        #[source]
        source: CniError,
    },
    /// The container id is unusable as a file name.
    #[error("invalid container id")]
    InvalidId(#[source] CniError),
    /// The container already has a namespace.
    #[error("container {container} is already attached ({path} exists)")]
    AlreadyAttached {
        /// The container id.
        container: String,
        /// Its namespace.
        path: PathBuf,
    },
    /// The container has no namespace.
    #[error("container {container} is not attached")]
    NotAttached {
        /// The container id.
        container: String,
    },
    /// Creating or removing the container's namespace failed.
    #[error("network namespace of container {container}")]
    Netns {
        /// The container id.
        container: String,
        /// Why.
        #[source]
        source: NetnsError,
    },
    /// The namespace's loopback interface could not be brought up; the namespace is removed.
    #[error("cannot bring up the loopback interface of container {container}")]
    Loopback {
        /// The container id.
        container: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// ADD failed; what was done is undone (and `cleanup` says if undoing failed too).
    #[error("cannot attach container {container} to network {network}{}", cleanup_note(.cleanup))]
    Attach {
        /// The container id.
        container: String,
        /// The network name.
        network: String,
        /// Why.
        #[source]
        source: CniError,
        /// The error of the undoing DEL, if it failed.
        cleanup: Option<CniError>,
    },
    /// ADD succeeded without giving the container an address; it is undone.
    #[error("network {network} gave container {container} no ip address{}", cleanup_note(.cleanup))]
    NoAddress {
        /// The container id.
        container: String,
        /// The network name.
        network: String,
        /// The error of the undoing DEL, if it failed.
        cleanup: Option<CniError>,
    },
    /// DEL failed; the namespace and cache record are kept for a retry.
    #[error("cannot detach container {container} from network {network}")]
    Detach {
        /// The container id.
        container: String,
        /// The network name.
        network: String,
        /// Why.
        #[source]
        source: CniError,
    },
    /// CHECK failed: the attachment is not as ADD left it.
    #[error("network check of container {container} on {network} failed")]
    Check {
        /// The container id.
        container: String,
        /// The network name.
        network: String,
        /// Why.
        #[source]
        source: CniError,
    },
    /// The attachments could not be listed.
    #[error("cannot list network attachments")]
    List(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The default conflist could not be written.
    #[error("cannot write default network configuration {path}")]
    WriteDefault {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn cleanup_note(cleanup: &Option<CniError>) -> String {
    match cleanup {
        None => String::new(),
        Some(err) => format!(" (and undoing it failed: {err})"),
    }
}

/// How the agent's networking is set up.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// The conflist for container networks.
    pub conflist: PathBuf,
    /// Where plugins are looked for, in order.
    pub plugin_dirs: Vec<PathBuf>,
    /// The agent's data directory: the CNI cache lives in `<data_dir>/cni`.
    pub data_dir: PathBuf,
    /// The agent's run directory: namespaces are mounted in `<run_dir>/netns`.
    pub run_dir: PathBuf,
    /// Name of the container's interface.
    pub ifname: String,
    /// Whether to bring up the container's `lo` (in-process, over rtnetlink) before the network.
    pub loopback: bool,
    /// Limit for one plugin call.
    pub plugin_timeout: Duration,
}

impl NetworkConfig {
    /// A configuration with the defaults: plugins from [`default_plugin_dirs`], interface `eth0`,
    /// loopback brought up, 30 s per plugin call.
    pub fn new(conflist: PathBuf, data_dir: PathBuf, run_dir: PathBuf) -> NetworkConfig {
        NetworkConfig {
            conflist,
            plugin_dirs: default_plugin_dirs(),
            data_dir,
            run_dir,
            ifname: "eth0".into(),
            loopback: true,
            plugin_timeout: Duration::from_secs(30),
        }
    }
}

/// `CNI_PATH` split on `:` when set, else [`DEFAULT_PLUGIN_DIRS`].
pub fn default_plugin_dirs() -> Vec<PathBuf> {
    match std::env::var_os("CNI_PATH") {
        Some(paths) if !paths.is_empty() => std::env::split_paths(&paths)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        _ => DEFAULT_PLUGIN_DIRS.iter().map(PathBuf::from).collect(),
    }
}

/// What attaching gave a container.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    /// Its network namespace, for `NetworkMode::Path`.
    pub netns_path: PathBuf,
    /// Its address, with the subnet's prefix length (IPv4 preferred when it has both).
    pub ip: IpNet,
    /// Its default gateway, if the network has one.
    pub gateway: Option<IpAddr>,
    /// Its interface name inside the namespace.
    pub interface: String,
    /// The network's whole result.
    pub result: CniResult,
}

/// What [`Network::cleanup_stale`] did.
#[derive(Debug, Default)]
pub struct CleanupReport {
    /// Containers detached.
    pub detached: Vec<String>,
    /// Containers whose detach failed (they stay for the next cleanup).
    pub failed: Vec<(String, NetworkError)>,
}

/// The agent's container network: a conflist, the plugins, and the namespaces.
#[derive(Debug)]
pub struct Network {
    config: NetworkConfig,
    list: ConfList,
    loopback: ConfList,
    cni: Cni,
}

impl Network {
    /// Loads the conflist. Plugins are only looked for when used; [`Network::validate`] checks
    /// them up front.
    pub async fn new(config: NetworkConfig) -> Result<Network, NetworkError> {
        let list = ConfList::load(&config.conflist)
            .await
            .map_err(|source| NetworkError::Load {
                path: config.conflist.clone(),
                source,
            })?;
        // Attachments made before loopback was brought up in-process ran the loopback plugin as a
        // network of its own on "lo" (as containerd's CRI does); their records still need its DEL.
        let loopback = ConfList::from_value(
            json!({
                "cniVersion": "1.0.0",
                "name": "gantry-loopback",
                "plugins": [{ "type": "loopback" }],
            }),
            "the built-in loopback network",
        )
        .map_err(|source| NetworkError::Load {
            path: config.conflist.clone(),
            source,
        })?;
        let cni = Cni::new(
            config.plugin_dirs.clone(),
            config.data_dir.join("cni"),
            config.plugin_timeout,
        );
        Ok(Network {
            config,
            list,
            loopback,
            cni,
        })
    }

    /// The conflist in use.
    pub fn conflist(&self) -> &ConfList {
        &self.list
    }

    /// Checks that every plugin is installed and speaks the conflist's version.
    pub async fn validate(&self) -> Result<(), NetworkError> {
        self.cni
            .validate(&self.list)
            .await
            .map_err(|source| NetworkError::Load {
                path: self.config.conflist.clone(),
                source,
            })
    }

    /// Where a container's namespace is mounted.
    pub fn netns_path(&self, container_id: &str) -> PathBuf {
        self.netns_dir().join(container_id)
    }

    fn netns_dir(&self) -> PathBuf {
        self.config.run_dir.join("netns")
    }

    /// Gives a container a new namespace attached to the network, publishing `ports`. On failure
    /// everything done is undone (DEL, namespace removed) before the error is returned.
    pub async fn attach(
        &self,
        container_id: &str,
        ports: &[PortMapping],
    ) -> Result<Attachment, NetworkError> {
        cni::check_container_id(container_id).map_err(NetworkError::InvalidId)?;
        let path = self.netns_path(container_id);
        netns::create(&path).await.map_err(|source| match source {
            NetnsError::Exists { path } => NetworkError::AlreadyAttached {
                container: container_id.to_owned(),
                path,
            },
            source => NetworkError::Netns {
                container: container_id.to_owned(),
                source,
            },
        })?;
        // Loopback up in-process (one rtnetlink message) rather than by the loopback plugin: the
        // same result for ~5 ms less of a plugin process per container.
        if self.config.loopback {
            let up = netns::run_in(&path, netns::set_loopback_up)
                .await
                .map_err(io::Error::other)
                .and_then(|r| r);
            if let Err(source) = up {
                if let Err(err) = netns::remove(&path).await {
                    warn!(
                        container = container_id,
                        ?err,
                        "cannot remove a network namespace"
                    );
                }
                return Err(NetworkError::Loopback {
                    container: container_id.to_owned(),
                    source,
                });
            }
        }
        let added = self.add(container_id, &path, ports).await;
        let network = self.list.name.clone();
        let container = container_id.to_owned();
        match added {
            Ok(result) => match attachment(&path, &self.config.ifname, result) {
                Some(attachment) => Ok(attachment),
                None => {
                    let cleanup = self.undo(container_id, &path).await;
                    Err(NetworkError::NoAddress {
                        container,
                        network,
                        cleanup,
                    })
                }
            },
            Err(source) => {
                let cleanup = self.undo(container_id, &path).await;
                Err(NetworkError::Attach {
                    container,
                    network,
                    source,
                    cleanup,
                })
            }
        }
    }

    async fn add(
        &self,
        container_id: &str,
        path: &Path,
        ports: &[PortMapping],
    ) -> Result<CniResult, CniError> {
        let rt = self.runtime_conf(container_id, Some(path), &self.config.ifname, ports);
        self.cni.add(&self.list, &rt).await
    }

    /// Undoes a failed attach: DEL, then the namespace goes whatever DEL said. The cache records
    /// go too — the container never ran, and a record whose DEL keeps failing (a plugin that
    /// errors on its own configuration) would otherwise be retried forever; removing the
    /// namespace has already destroyed its interfaces.
    async fn undo(&self, container_id: &str, path: &Path) -> Option<CniError> {
        let failed = self.del(container_id, Some(path), true).await.err();
        if let Some(err) = &failed {
            warn!(
                container = container_id,
                ?err,
                "cni del after a failed attach failed"
            );
        }
        for (network, ifname) in self.networks() {
            if let Err(err) = self.cni.forget(network, container_id, ifname).await {
                warn!(
                    container = container_id,
                    ?err,
                    "cannot remove a cni cache record"
                );
            }
        }
        if let Err(err) = netns::remove(path).await {
            warn!(
                container = container_id,
                ?err,
                "cannot remove the network namespace of a failed attach"
            );
        }
        failed
    }

    /// DEL on every network (main first, loopback last: the reverse of ADD), all of them even
    /// when one fails; returns the first failure.
    ///
    /// A network without a cache record never started an ADD (the record is written first) or
    /// was already deleted, so it is skipped when `recorded_only`. Otherwise it still gets a DEL
    /// without a result, the spec's way to clean up after a lost cache.
    async fn del(
        &self,
        container_id: &str,
        netns: Option<&Path>,
        recorded_only: bool,
    ) -> Result<(), CniError> {
        let mut first = None;
        let mut lists = vec![(&self.list, self.config.ifname.as_str())];
        if self.config.loopback {
            lists.push((&self.loopback, LOOPBACK_IFNAME));
        }
        for (list, ifname) in lists {
            // The loopback network is only DELeted for attachments that ran its plugin (before
            // loopback was brought up in-process); a namespace being removed needs nothing else.
            if recorded_only || list.name == self.loopback.name {
                match self.cni.cached(&list.name, container_id, ifname).await {
                    Ok(None) => continue,
                    Ok(Some(_)) => {}
                    // An unreadable record: DEL without it is still worth a try.
                    Err(err) => warn!(
                        container = container_id,
                        ?err,
                        "cannot read a cni cache record"
                    ),
                }
            }
            let rt = self.runtime_conf(container_id, netns, ifname, &[]);
            if let Err(err) = self.cni.del(list, &rt).await {
                first.get_or_insert(err);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The (network, interface) pairs a container is attached with.
    fn networks(&self) -> Vec<(&str, &str)> {
        let mut nets = vec![(self.list.name.as_str(), self.config.ifname.as_str())];
        if self.config.loopback {
            nets.push((self.loopback.name.as_str(), LOOPBACK_IFNAME));
        }
        nets
    }

    /// Detaches a container: DEL with the cached result, then its namespace is removed. Succeeds
    /// when the container is already detached or was never attached. On failure the namespace and
    /// cache stay, so a later detach (or [`Network::cleanup_stale`]) can retry.
    pub async fn detach(&self, container_id: &str) -> Result<(), NetworkError> {
        cni::check_container_id(container_id).map_err(NetworkError::InvalidId)?;
        let path = self.netns_path(container_id);
        let netns = netns::exists(&path).await.then_some(path.as_path());
        // With the namespace gone and no record left there is nothing to undo: the container was
        // detached before (DEL twice), or never attached.
        self.del(container_id, netns, netns.is_none())
            .await
            .map_err(|source| NetworkError::Detach {
                container: container_id.to_owned(),
                network: self.list.name.clone(),
                source,
            })?;
        netns::remove(&path)
            .await
            .map_err(|source| NetworkError::Netns {
                container: container_id.to_owned(),
                source,
            })
    }

    /// Checks that a container's attachment is still as ADD left it (CNI CHECK).
    pub async fn check(&self, container_id: &str) -> Result<(), NetworkError> {
        cni::check_container_id(container_id).map_err(NetworkError::InvalidId)?;
        let path = self.netns_path(container_id);
        if !netns::exists(&path).await {
            return Err(NetworkError::NotAttached {
                container: container_id.to_owned(),
            });
        }
        let rt = self.runtime_conf(container_id, Some(&path), &self.config.ifname, &[]);
        self.cni
            .check(&self.list, &rt)
            .await
            .map_err(|source| NetworkError::Check {
                container: container_id.to_owned(),
                network: self.list.name.clone(),
                source,
            })
    }

    /// Containers with something to detach: a namespace or a cache record of this network.
    pub async fn attached(&self) -> Result<BTreeSet<String>, NetworkError> {
        let mut ids: BTreeSet<String> = netns::list(&self.netns_dir())
            .await
            .map_err(|e| NetworkError::List(Box::new(e)))?
            .into_iter()
            .filter(|id| cni::check_container_id(id).is_ok())
            .collect();
        let names: Vec<&str> = self.networks().into_iter().map(|(n, _)| n).collect();
        let records = self
            .cni
            .cached_all()
            .await
            .map_err(|e| NetworkError::List(Box::new(e)))?;
        ids.extend(
            records
                .into_iter()
                .filter(|r| names.contains(&r.network_name.as_str()))
                .map(|r| r.container_id),
        );
        Ok(ids)
    }

    /// Detaches every container not in `keep` (after an agent restart, `keep` is the containers
    /// it re-adopted). Failures are reported, not fatal: the rest are still cleaned.
    pub async fn cleanup_stale(
        &self,
        keep: &HashSet<String>,
    ) -> Result<CleanupReport, NetworkError> {
        let mut report = CleanupReport::default();
        for id in self.attached().await? {
            if keep.contains(&id) {
                continue;
            }
            match self.detach(&id).await {
                Ok(()) => report.detached.push(id),
                Err(err) => {
                    warn!(container = %id, ?err, "cannot detach a stale container");
                    report.failed.push((id, err));
                }
            }
        }
        Ok(report)
    }

    fn runtime_conf(
        &self,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        ports: &[PortMapping],
    ) -> RuntimeConf {
        RuntimeConf {
            container_id: container_id.to_owned(),
            netns: netns.map(Path::to_owned),
            ifname: ifname.to_owned(),
            args: Vec::new(),
            capability_args: cni::port_mappings_arg(ports),
        }
    }
}

/// The container's address, gateway and interface from a result: the addresses of the interface
/// in `netns` (or of no particular interface), IPv4 first.
fn attachment(netns: &Path, ifname: &str, result: CniResult) -> Option<Attachment> {
    let sandbox = netns.to_string_lossy();
    let own = result
        .interfaces
        .iter()
        .position(|i| i.sandbox.as_deref() == Some(&*sandbox) && i.name == ifname)
        .or_else(|| result.interfaces.iter().position(|i| i.in_container()));
    let candidates: Vec<_> = result
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none() || ip.interface == own)
        .collect();
    let (ip, gateway) = candidates
        .iter()
        .find(|ip| ip.address.addr().is_ipv4())
        .or_else(|| candidates.first())
        .map(|chosen| (chosen.address, chosen.gateway))?;
    let interface = own
        .and_then(|i| result.interfaces.get(i))
        .map_or_else(|| ifname.to_owned(), |i| i.name.clone());
    Some(Attachment {
        netns_path: netns.to_owned(),
        ip,
        gateway,
        interface,
        result,
    })
}

/// Gantry's default conflist for a node: a bridge that is the containers' gateway, host-local
/// addresses from the node's subnet (its store under `ipam_dir`, not the system-wide
/// /var/lib/cni), and published ports through portmap (reachable on the node's addresses and on
/// localhost). Loopback is brought up by [`Network`] itself. The masquerade of traffic leaving
/// the node and its admission through FORWARD are node-wide rules ([`rules`]), written once
/// per subnet by the agent instead of per container by the bridge's `ipMasq` and the firewall
/// plugin.
pub fn default_conflist(node_subnet: IpNet, bridge: &str, ipam_dir: &Path) -> Value {
    let subnet = node_subnet.trunc();
    let default_route = if subnet.addr().is_ipv4() {
        "0.0.0.0/0"
    } else {
        "::/0"
    };
    json!({
        "cniVersion": "1.0.0",
        "name": DEFAULT_NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": subnet.to_string() }]],
                    "routes": [{ "dst": default_route }],
                    "dataDir": ipam_dir,
                },
            },
            {
                "type": "portmap",
                "snat": true,
                "capabilities": { "portMappings": true },
            },
        ],
    })
}

/// Writes [`default_conflist`] to `path` unless a file is already there (an operator's own, or
/// one written before); returns whether it wrote.
pub async fn write_default_conflist(
    path: &Path,
    node_subnet: IpNet,
    bridge: &str,
    ipam_dir: &Path,
) -> Result<bool, NetworkError> {
    use tokio::io::AsyncWriteExt;
    let write_err = |source| NetworkError::WriteDefault {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await.map_err(write_err)?;
    }
    let mut bytes = serde_json::to_vec_pretty(&default_conflist(node_subnet, bridge, ipam_dir))
        .map_err(|e| write_err(io::Error::other(e)))?;
    bytes.push(b'\n');
    let mut file = match tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .await
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(write_err(e)),
    };
    file.write_all(&bytes).await.map_err(write_err)?;
    file.sync_all().await.map_err(write_err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cni::{Interface, IpConfig};

    /// The agent spawns these on its multi-threaded runtime: they must stay `Send`.
    #[allow(dead_code)]
    fn futures_are_send(net: &Network, keep: &HashSet<String>) {
        fn send<T: Send>(_: T) {}
        send(net.attach("c", &[]));
        send(net.detach("c"));
        send(net.check("c"));
        send(net.cleanup_stale(keep));
        send(RouteTable::host().sync(&BTreeSet::new()));
    }

    #[test]
    fn default_conflist_is_a_valid_conflist() {
        let value = default_conflist(
            "10.88.3.7/24".parse().unwrap(),
            "gantry0",
            Path::new("/var/lib/gantry/cni/networks"),
        );
        let list = ConfList::from_value(value.clone(), "default").unwrap();
        let types: Vec<_> = list
            .plugins
            .iter()
            .map(|p| p.plugin_type.as_str())
            .collect();
        assert_eq!(types, ["bridge", "portmap"]);
        // Masquerade and FORWARD admission are the node's rules, not per-container chains.
        assert_eq!(value["plugins"][0]["ipMasq"], false);
        let ipam = &value["plugins"][0]["ipam"];
        assert_eq!(ipam["ranges"][0][0]["subnet"], "10.88.3.0/24");
        assert_eq!(ipam["dataDir"], "/var/lib/gantry/cni/networks");
        assert_eq!(value["plugins"][0]["isGateway"], true);
        assert_eq!(
            list.plugins[1].capabilities().collect::<Vec<_>>(),
            ["portMappings"]
        );
    }

    #[tokio::test]
    async fn default_conflist_is_written_once() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("etc/net.conflist");
        let subnet: IpNet = "10.88.1.0/24".parse().unwrap();
        assert!(
            write_default_conflist(&path, subnet, "gt0", tmp.path())
                .await
                .unwrap()
        );
        std::fs::write(&path, b"{\"operator\": true}").unwrap();
        assert!(
            !write_default_conflist(&path, subnet, "gt0", tmp.path())
                .await
                .unwrap()
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"operator\": true}");
    }

    #[test]
    fn attachment_takes_the_container_interface_and_prefers_ipv4() {
        let netns = Path::new("/run/gantry/netns/c1");
        let result = CniResult {
            interfaces: vec![
                Interface {
                    name: "gt0".into(),
                    ..Interface::default()
                },
                Interface {
                    name: "eth0".into(),
                    sandbox: Some(netns.display().to_string()),
                    ..Interface::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.0.0.1/24".parse().unwrap(),
                    gateway: None,
                    interface: Some(0),
                },
                IpConfig {
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
                IpConfig {
                    address: "10.0.0.5/24".parse().unwrap(),
                    gateway: Some("10.0.0.1".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            ..CniResult::default()
        };
        let a = attachment(netns, "eth0", result.clone()).unwrap();
        assert_eq!(a.ip.to_string(), "10.0.0.5/24");
        assert_eq!(a.gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(a.interface, "eth0");
        let none = CniResult {
            ips: vec![],
            ..result
        };
        assert!(attachment(netns, "eth0", none).is_none());
    }
}
