//! Host-gateway routes between nodes: every node reaches another node's container subnet through
//! that node's address. `desired_routes` and `reconcile` are pure; `RouteTable` applies the actions
//! with `ip route` in the agent's namespace (or a given one), touching only routes marked with
//! Gantry's routing protocol number, so routes it did not install are never changed.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Output;

use ipnet::IpNet;
use serde::Deserialize;

use super::netns::{self, NetnsError};

/// The routing protocol number marking Gantry's routes (`ip route … proto 152`); iproute2's
/// `rt_protos` leaves it unassigned.
pub const ROUTE_PROTOCOL: u8 = 152;

/// What can go wrong applying routes.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// `ip` could not be run.
    #[error("cannot run ip {args}")]
    Spawn {
        /// The arguments.
        args: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `ip` failed.
    #[error("ip {args} failed: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// `ip -j route show` printed something unexpected.
    #[error("cannot parse the output of ip {args}")]
    Parse {
        /// The arguments.
        args: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The namespace to work in could not be entered.
    #[error("cannot run ip in the network namespace")]
    Netns(#[source] NetnsError),
}

/// Another node as far as routing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its container subnet.
    pub subnet: IpNet,
    /// Its node address, reachable from this node.
    pub address: IpAddr,
}

/// A route to a subnet through a next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeRoute {
    /// Destination subnet.
    pub subnet: IpNet,
    /// Next hop.
    pub via: IpAddr,
}

/// One change to the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RouteAction {
    /// Install or change the route to a subnet (`ip route replace`).
    Replace(NodeRoute),
    /// Remove Gantry's route to a subnet (`ip route del`).
    Delete(IpNet),
}

/// The routes this node wants: one per other node, to its subnet via its address.
///
/// Left out: peers whose address is one of this node's own (itself, under another record);
/// subnets overlapping this node's subnet (they are local); next hops of the other address family;
/// next hops inside the subnet they lead to (unreachable by construction). When two peers claim
/// one subnet (the scheduler never allows it, but records can briefly disagree), the lowest
/// address wins, so every node picks the same.
pub fn desired_routes(
    own_subnet: Option<IpNet>,
    own_addresses: &[IpAddr],
    peers: &[Peer],
) -> BTreeSet<NodeRoute> {
    let mut by_subnet: BTreeMap<IpNet, IpAddr> = BTreeMap::new();
    for peer in peers {
        let subnet = peer.subnet.trunc();
        let local = own_addresses.contains(&peer.address)
            || own_subnet.is_some_and(|own| overlaps(own.trunc(), subnet));
        let reachable = peer.address.is_ipv4() == subnet.addr().is_ipv4()
            && !subnet.contains(&peer.address)
            && !peer.address.is_unspecified();
        if local || !reachable {
            continue;
        }
        by_subnet
            .entry(subnet)
            .and_modify(|via| *via = (*via).min(peer.address))
            .or_insert(peer.address);
    }
    by_subnet
        .into_iter()
        .map(|(subnet, via)| NodeRoute { subnet, via })
        .collect()
}

fn overlaps(a: IpNet, b: IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The actions that turn the observed Gantry routes into the desired ones: a replace for each
/// desired route missing or pointing elsewhere, a delete for each observed subnet no longer
/// desired. Deletes come first.
pub fn reconcile(
    desired: &BTreeSet<NodeRoute>,
    observed: &BTreeSet<NodeRoute>,
) -> Vec<RouteAction> {
    let wanted: BTreeSet<IpNet> = desired.iter().map(|r| r.subnet).collect();
    let mut actions: Vec<RouteAction> = observed
        .iter()
        .map(|r| r.subnet)
        .filter(|s| !wanted.contains(s))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(RouteAction::Delete)
        .collect();
    actions.extend(
        desired
            .iter()
            .filter(|r| !observed.contains(r))
            .map(|r| RouteAction::Replace(*r)),
    );
    actions
}

/// A routing table reached through `ip`: the agent's own, or that of a network namespace.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    netns: Option<PathBuf>,
}

#[derive(Deserialize)]
struct IpRoute {
    dst: String,
    #[serde(default)]
    gateway: Option<IpAddr>,
}

impl RouteTable {
    /// The main table of the agent's network namespace.
    pub fn host() -> RouteTable {
        RouteTable { netns: None }
    }

    /// The main table of the network namespace mounted at `path`.
    pub fn in_netns(path: PathBuf) -> RouteTable {
        RouteTable { netns: Some(path) }
    }

    /// Gantry's routes currently installed (both address families).
    pub async fn observed(&self) -> Result<BTreeSet<NodeRoute>, RouteError> {
        let proto = ROUTE_PROTOCOL.to_string();
        let mut routes = BTreeSet::new();
        for family in ["-4", "-6"] {
            let args = ["-j", family, "route", "show", "proto", &proto];
            let out = self.ip(&args).await?;
            let text = String::from_utf8_lossy(&out);
            if text.trim().is_empty() {
                continue;
            }
            let parsed: Vec<IpRoute> =
                serde_json::from_str(&text).map_err(|source| RouteError::Parse {
                    args: args.join(" "),
                    source,
                })?;
            for route in parsed {
                let subnet = match route.dst.parse::<IpNet>() {
                    Ok(net) => net,
                    // A host route is printed without its prefix length.
                    Err(_) => match route.dst.parse::<IpAddr>() {
                        Ok(addr) => IpNet::from(addr),
                        Err(_) => continue,
                    },
                };
                if let Some(via) = route.gateway {
                    routes.insert(NodeRoute { subnet, via });
                }
            }
        }
        Ok(routes)
    }

    /// Applies actions in order; deleting a route that is already gone succeeds.
    pub async fn apply(&self, actions: &[RouteAction]) -> Result<(), RouteError> {
        let proto = ROUTE_PROTOCOL.to_string();
        for action in actions {
            match action {
                RouteAction::Replace(route) => {
                    let (subnet, via) = (route.subnet.to_string(), route.via.to_string());
                    self.ip(&["route", "replace", &subnet, "via", &via, "proto", &proto])
                        .await?;
                }
                RouteAction::Delete(subnet) => {
                    let subnet = subnet.to_string();
                    match self.ip(&["route", "del", &subnet, "proto", &proto]).await {
                        Err(RouteError::Failed { stderr, .. })
                            if stderr.contains("No such process") => {}
                        other => {
                            other?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Observes, reconciles against `desired` and applies; returns what was done.
    pub async fn sync(
        &self,
        desired: &BTreeSet<NodeRoute>,
    ) -> Result<Vec<RouteAction>, RouteError> {
        let observed = self.observed().await?;
        let actions = reconcile(desired, &observed);
        self.apply(&actions).await?;
        Ok(actions)
    }

    async fn ip(&self, args: &[&str]) -> Result<Vec<u8>, RouteError> {
        let joined = args.join(" ");
        let owned: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let output: io::Result<Output> = match &self.netns {
            None => {
                tokio::process::Command::new("ip")
                    .args(&owned)
                    .output()
                    .await
            }
            // A process started from a thread inside the namespace runs inside it.
            Some(path) => netns::run_in(path, move || {
                std::process::Command::new("ip").args(&owned).output()
            })
            .await
            .map_err(RouteError::Netns)?,
        };
        let output = output.map_err(|source| RouteError::Spawn {
            args: joined.clone(),
            source,
        })?;
        if !output.status.success() {
            return Err(RouteError::Failed {
                args: joined,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(output.stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn peer(subnet: &str, address: &str) -> Peer {
        Peer {
            subnet: net(subnet),
            address: ip(address),
        }
    }
    fn route(subnet: &str, via: &str) -> NodeRoute {
        NodeRoute {
            subnet: net(subnet),
            via: ip(via),
        }
    }

    /// One case: own subnet, own addresses, peers → the routes wanted.
    fn check(own: Option<&str>, own_addrs: &[&str], peers: &[Peer], want: &[NodeRoute]) {
        let own_addrs: Vec<IpAddr> = own_addrs.iter().map(|a| ip(a)).collect();
        let got = desired_routes(own.map(net), &own_addrs, peers);
        let want: BTreeSet<NodeRoute> = want.iter().copied().collect();
        assert_eq!(got, want, "own {own:?} {own_addrs:?}, peers {peers:?}");
    }

    #[test]
    fn desired_routes_table() {
        let me = Some("10.88.1.0/24");
        let mine = &["192.168.0.1"];
        // No peers, no routes.
        check(me, mine, &[], &[]);
        // One route per other node.
        check(
            me,
            mine,
            &[
                peer("10.88.2.0/24", "192.168.0.2"),
                peer("10.88.3.0/24", "192.168.0.3"),
            ],
            &[
                route("10.88.2.0/24", "192.168.0.2"),
                route("10.88.3.0/24", "192.168.0.3"),
            ],
        );
        // Our own record (same address or same subnet) is skipped.
        check(me, mine, &[peer("10.88.1.0/24", "192.168.0.1")], &[]);
        check(me, mine, &[peer("10.88.9.0/24", "192.168.0.1")], &[]);
        check(me, mine, &[peer("10.88.1.0/24", "192.168.0.7")], &[]);
        // A subnet overlapping ours is local.
        check(me, mine, &[peer("10.88.0.0/16", "192.168.0.7")], &[]);
        // Host bits in a subnet are dropped.
        check(
            me,
            mine,
            &[peer("10.88.2.7/24", "192.168.0.2")],
            &[route("10.88.2.0/24", "192.168.0.2")],
        );
        // Mixed families and next hops inside their own subnet are unusable.
        check(me, mine, &[peer("10.88.2.0/24", "fd00::2")], &[]);
        check(me, mine, &[peer("10.88.2.0/24", "10.88.2.1")], &[]);
        check(me, mine, &[peer("10.88.2.0/24", "0.0.0.0")], &[]);
        // Two claims on a subnet: the lowest address, whatever the order.
        let twice = [
            peer("10.88.2.0/24", "192.168.0.9"),
            peer("10.88.2.0/24", "192.168.0.4"),
        ];
        check(me, mine, &twice, &[route("10.88.2.0/24", "192.168.0.4")]);
        let reversed = [twice[1], twice[0]];
        check(me, mine, &reversed, &[route("10.88.2.0/24", "192.168.0.4")]);
        // A node without a subnet yet still routes to the others; IPv6 works the same.
        check(
            None,
            mine,
            &[peer("10.88.2.0/24", "192.168.0.2")],
            &[route("10.88.2.0/24", "192.168.0.2")],
        );
        check(
            None,
            &["fd00::1"],
            &[peer("fd88:2::/64", "fd00::2")],
            &[route("fd88:2::/64", "fd00::2")],
        );
    }

    #[test]
    fn reconcile_table() {
        let set = |rs: &[NodeRoute]| rs.iter().copied().collect::<BTreeSet<_>>();
        let a = route("10.88.2.0/24", "192.168.0.2");
        let a_moved = route("10.88.2.0/24", "192.168.0.22");
        let b = route("10.88.3.0/24", "192.168.0.3");
        let cases: Vec<(Vec<NodeRoute>, Vec<NodeRoute>, Vec<RouteAction>)> = vec![
            (vec![], vec![], vec![]),
            (vec![a], vec![], vec![RouteAction::Replace(a)]),
            (vec![a], vec![a], vec![]),
            (vec![], vec![a], vec![RouteAction::Delete(a.subnet)]),
            // A subnet whose node changed address is replaced in place, never deleted.
            (vec![a_moved], vec![a], vec![RouteAction::Replace(a_moved)]),
            (
                vec![b],
                vec![a],
                vec![RouteAction::Delete(a.subnet), RouteAction::Replace(b)],
            ),
            (vec![a, b], vec![b], vec![RouteAction::Replace(a)]),
        ];
        for (desired, observed, want) in cases {
            assert_eq!(
                reconcile(&set(&desired), &set(&observed)),
                want,
                "desired {desired:?} observed {observed:?}"
            );
        }
    }
}
