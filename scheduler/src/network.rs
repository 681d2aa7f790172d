//! Node subnets: the scheduler cuts the cluster network (`--cluster-cidr`, default
//! 10.88.0.0/16) into /24s and gives each node one at its first registration; the node keeps it
//! across sessions. Each agent gets its own subnet and, for host-gateway routing, every other
//! node's subnet with that node's address.
//!
//! Uniqueness across replicas: a subnet is claimed with a key of its own
//! (`/gantry/v1/subnets/{a.b.c.d-len}` → node name) created in the same transaction as the node
//! record that names it, conditional on the claim being absent, so two replicas registering two
//! nodes at once can never both take one subnet: one transaction fails and that registration
//! picks again. A claim whose node record is gone (a removed node) is free again, reclaimed under
//! a compare on both keys.
//!
//! Everything here is pure: the session does the store work.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::cache::View;
use crate::model::{NodeRecord, keys};
use crate::store::{Compare, Op, Revision, Store, StoreError};

/// The default cluster network.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.88.0.0/16";

/// Prefix length of a node subnet.
pub const NODE_PREFIX: u8 = 24;

/// An IPv4 network in CIDR notation, with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// The network of `addr`/`prefix` (host bits cleared); `None` when `prefix` > 32.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Option<Cidr> {
        (prefix <= 32).then(|| Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        })
    }

    /// The first address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The claim-key form: `10.88.3.0-24`.
    pub fn key_form(&self) -> String {
        format!("{}-{}", self.addr, self.prefix)
    }

    /// Whether `other` lies inside this network.
    pub fn contains(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix
            && u32::from(other.addr) & mask(self.prefix) == u32::from(self.addr)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a CIDR did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an IPv4 network in CIDR notation (such as 10.88.0.0/16)")]
pub struct CidrError {
    text: String,
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError {
            text: text.to_owned(),
        };
        let (addr, prefix) = text.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let prefix: u8 = prefix.parse().map_err(|_| err())?;
        Cidr::new(addr, prefix).ok_or_else(err)
    }
}

/// Why no subnet could be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Every /24 of the cluster network is taken.
    #[error(
        "the cluster network {cluster} has no free /{NODE_PREFIX} left for node {node} \
         ({taken} nodes hold one): restart the schedulers with a wider --cluster-cidr (it must \
         contain the current one, so that nodes keep their subnets), or delete the records of \
         nodes that are gone for good (/gantry/v1/nodes/NAME in the store)"
    )]
    Exhausted {
        /// The cluster network.
        cluster: Cidr,
        /// The node asking.
        node: String,
        /// Subnets held.
        taken: usize,
    },
}

/// Checks a cluster network for use: it must hold at least one node subnet.
pub fn check_cluster(cluster: Cidr) -> Result<(), String> {
    if cluster.prefix > NODE_PREFIX {
        return Err(format!(
            "--cluster-cidr {cluster}: too small; node subnets are /{NODE_PREFIX}, so give a \
             network of /{NODE_PREFIX} or wider (such as {DEFAULT_CLUSTER_CIDR})"
        ));
    }
    Ok(())
}

/// The first subnet of `cluster` that overlaps none of `taken`, looking from the `start`-th
/// /24 on (wrapping around), with its index. Callers pass the index after their last pick as
/// `start`, so that allocating N subnets in order costs O(N log N), not O(N²).
pub fn allocate(
    cluster: Cidr,
    node: &str,
    taken: &BTreeSet<Cidr>,
    start: u64,
) -> Result<(Cidr, u64), AllocError> {
    let count: u64 = 1 << (NODE_PREFIX - cluster.prefix.min(NODE_PREFIX));
    let base = u32::from(cluster.addr);
    for k in 0..count {
        let i = (start.wrapping_add(k)) % count;
        let step = u32::try_from(i).unwrap_or(u32::MAX) << (32 - u32::from(NODE_PREFIX));
        let candidate = Cidr {
            addr: Ipv4Addr::from(base | step),
            prefix: NODE_PREFIX,
        };
        if !overlaps_any(&candidate, taken) {
            return Ok((candidate, i));
        }
    }
    Err(AllocError::Exhausted {
        cluster,
        node: node.to_owned(),
        taken: taken.iter().filter(|t| cluster.contains(t)).count(),
    })
}

/// Whether `candidate` overlaps a network of `taken`: one that starts inside it, or one of
/// its supernets (O(prefix · log n) lookups, not a scan).
fn overlaps_any(candidate: &Cidr, taken: &BTreeSet<Cidr>) -> bool {
    let first = u32::from(candidate.addr);
    let last = first | !mask(candidate.prefix);
    let inside = Cidr {
        addr: Ipv4Addr::from(first),
        prefix: 0,
    }..=Cidr {
        addr: Ipv4Addr::from(last),
        prefix: 32,
    };
    taken.range(inside).next().is_some()
        || (0..candidate.prefix)
            .any(|p| Cidr::new(candidate.addr, p).is_some_and(|supernet| taken.contains(&supernet)))
}

/// Another node, as a route target.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// Its name.
    pub node: String,
    /// Its subnet.
    pub subnet: String,
    /// Its address.
    pub address: String,
}

/// What a node is told about the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Its own subnet.
    pub subnet: String,
    /// The cluster network.
    pub cluster: Cidr,
    /// Every other node that has a subnet and an address, by name.
    pub peers: Vec<Peer>,
}

/// The network of node `name` from the node records, `None` while it has no subnet.
pub fn node_network<'a>(
    name: &str,
    cluster: Cidr,
    nodes: impl IntoIterator<Item = (&'a String, &'a NodeRecord)>,
) -> Option<NodeNetwork> {
    let mut own = None;
    let mut peers = Vec::new();
    for (node, record) in nodes {
        let Some(subnet) = &record.subnet else {
            continue;
        };
        if node == name {
            own = Some(subnet.clone());
        } else if !record.address.is_empty() {
            peers.push(Peer {
                node: node.clone(),
                subnet: subnet.clone(),
                address: record.address.clone(),
            });
        }
    }
    peers.sort();
    Some(NodeNetwork {
        subnet: own?,
        cluster,
        peers,
    })
}

/// The subnets the node records hold (unreadable ones left out), with their holders.
pub fn held<'a>(
    nodes: impl IntoIterator<Item = (&'a String, &'a NodeRecord)>,
) -> BTreeMap<Cidr, String> {
    nodes
        .into_iter()
        .filter_map(|(name, r)| Some((r.subnet.as_deref()?.parse().ok()?, name.clone())))
        .collect()
}

/// What a registration adds to its transaction to take a subnet.
#[derive(Debug)]
pub struct Claim {
    /// The subnet, for the node record.
    pub subnet: Cidr,
    /// Its index among the cluster's /24s when newly picked (the next search starts after it).
    pub index: Option<u64>,
    /// Conditions: the claim key is as read (absent, or an orphan's), and an orphan's node is gone.
    pub compares: Vec<Compare>,
    /// The claim key's put.
    pub ops: Vec<Op>,
}

/// Why a claim could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// No subnet is free.
    #[error(transparent)]
    Exhausted(#[from] AllocError),
    /// The claims could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The nodes a replica's view knows at its revision, with their subnets.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The view's revision.
    pub revision: Revision,
    /// Node name → its subnet, if it has one.
    pub nodes: BTreeMap<String, Option<String>>,
}

impl Known {
    /// What `view` knows.
    pub fn of(view: &View) -> Known {
        Known {
            revision: view.revision,
            nodes: view
                .nodes
                .iter()
                .map(|(n, v)| (n.clone(), v.value.subnet.clone()))
                .collect(),
        }
    }
}

/// Picks a subnet for node `name` from the claims in the store and prepares the transaction
/// parts that take it. `known` tells whose claims are orphaned: a claim is free again only when
/// the view has seen its revision and its node is no longer there (and the transaction checks
/// that the node's record is still absent). The caller retries on a failed transaction.
///
/// `pending` are subnets this replica's registrations in flight have picked (their
/// transactions not yet written): they are skipped, so concurrent registrations do not all
/// pick the same subnet and fail but one. The search starts at the `start`-th /24 (the one
/// after this replica's last pick).
pub async fn claim(
    store: &dyn Store,
    known: &Known,
    cluster: Cidr,
    name: &str,
    pending: &BTreeSet<Cidr>,
    start: u64,
) -> Result<Claim, ClaimError> {
    let (claims, _) = store.range(keys::SUBNETS.as_bytes(), None).await?;
    let mut taken = BTreeSet::new();
    let mut orphans: BTreeMap<Cidr, (String, Revision)> = BTreeMap::new();
    for kv in claims {
        let key = String::from_utf8_lossy(&kv.key);
        let Some(subnet) = key
            .strip_prefix(keys::SUBNETS)
            .and_then(|k| k.replace('-', "/").parse::<Cidr>().ok())
        else {
            continue;
        };
        let holder = String::from_utf8_lossy(&kv.value).into_owned();
        if holder == name {
            // Taken by this node before (its record lost the subnet): it is still its own.
            return Ok(Claim {
                subnet,
                index: None,
                compares: vec![Compare::mod_revision(
                    keys::subnet(&subnet.key_form()),
                    kv.mod_revision,
                )],
                ops: Vec::new(),
            });
        }
        let gone = kv.mod_revision <= known.revision && !known.nodes.contains_key(&holder);
        if gone {
            orphans.insert(subnet, (holder, kv.mod_revision));
        } else {
            taken.insert(subnet);
        }
    }
    // Records holding a subnet without a claim (written before claims existed) count too.
    taken.extend(
        known
            .nodes
            .values()
            .filter_map(|s| s.as_deref()?.parse::<Cidr>().ok()),
    );
    taken.extend(pending.iter().copied());
    let (subnet, index) = allocate(cluster, name, &taken, start)?;
    let key = keys::subnet(&subnet.key_form());
    let mut compares = Vec::new();
    match orphans.get(&subnet) {
        Some((holder, revision)) => {
            compares.push(Compare::mod_revision(key.clone(), *revision));
            compares.push(Compare::mod_revision(keys::node(holder), 0));
        }
        None => compares.push(Compare::mod_revision(key.clone(), 0)),
    }
    Ok(Claim {
        subnet,
        index: Some(index),
        compares,
        ops: vec![Op::put(key, name.as_bytes().to_vec())],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn taken(list: &[&str]) -> BTreeSet<Cidr> {
        list.iter().map(|s| cidr(s)).collect()
    }

    #[test]
    fn cidrs_parse_and_clear_host_bits() {
        assert_eq!(cidr("10.88.3.7/24").to_string(), "10.88.3.0/24");
        assert_eq!(cidr("10.88.3.7/24").key_form(), "10.88.3.0-24");
        for bad in ["10.88.0.0", "10.88.0.0/33", "fd00::/64", "x/8", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(cidr("10.88.0.0/16").contains(&cidr("10.88.200.0/24")));
        assert!(!cidr("10.88.0.0/16").contains(&cidr("10.89.0.0/24")));
    }

    #[test]
    fn allocation_takes_the_lowest_free_subnet() {
        let cluster = cidr("10.88.0.0/16");
        let cases: &[(&[&str], &str)] = &[
            (&[], "10.88.0.0/24"),
            (&["10.88.0.0/24"], "10.88.1.0/24"),
            (&["10.88.0.0/24", "10.88.2.0/24"], "10.88.1.0/24"),
            // Outside the cluster: no effect.
            (&["10.99.0.0/24"], "10.88.0.0/24"),
            // A wider subnet held (an older cluster setting) covers several /24s.
            (&["10.88.0.0/23"], "10.88.2.0/24"),
        ];
        for (held, want) in cases {
            let (got, _) = allocate(cluster, "n", &taken(held), 0).unwrap();
            assert_eq!(got.to_string(), *want, "held {held:?}");
        }
    }

    #[test]
    fn an_exhausted_cluster_says_what_to_do() {
        let cluster = cidr("10.88.0.0/23");
        let err =
            allocate(cluster, "n3", &taken(&["10.88.0.0/24", "10.88.1.0/24"]), 0).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("10.88.0.0/23"), "{text}");
        assert!(
            text.contains("n3") && text.contains("--cluster-cidr"),
            "{text}"
        );
        assert!(check_cluster(cidr("10.88.0.0/25")).is_err());
        assert!(check_cluster(cidr("10.88.0.0/24")).is_ok());
        assert_eq!(
            allocate(cidr("10.88.0.0/24"), "n", &taken(&[]), 0)
                .unwrap()
                .0,
            cidr("10.88.0.0/24")
        );
    }

    #[test]
    fn every_subnet_of_a_cluster_is_handed_once() {
        let cluster = cidr("10.0.0.0/20");
        let mut held = BTreeSet::new();
        for i in 0..16 {
            let (s, _) = allocate(cluster, &format!("n{i}"), &held, 0).unwrap();
            assert!(cluster.contains(&s));
            assert!(held.insert(s), "{s} handed twice");
        }
        assert!(allocate(cluster, "n16", &held, 0).is_err());
    }

    #[test]
    fn the_search_starts_at_the_cursor_and_wraps_around() {
        let cluster = cidr("10.88.0.0/22");
        let held = taken(&["10.88.2.0/24"]);
        assert_eq!(
            allocate(cluster, "n", &held, 1).unwrap(),
            (cidr("10.88.1.0/24"), 1)
        );
        assert_eq!(
            allocate(cluster, "n", &held, 2).unwrap(),
            (cidr("10.88.3.0/24"), 3)
        );
        assert_eq!(
            allocate(cluster, "n", &held, 7).unwrap(),
            (cidr("10.88.3.0/24"), 3),
            "start wraps"
        );
        // A supernet held covers every /24 inside it.
        let wide = taken(&["10.88.0.0/23"]);
        assert_eq!(
            allocate(cluster, "n", &wide, 0).unwrap(),
            (cidr("10.88.2.0/24"), 2)
        );
    }

    #[test]
    fn thousands_of_nodes_allocate_in_linear_time() {
        // 20,000 subnets one after the other with the cursor: a quadratic search would take
        // minutes here.
        let cluster = cidr("10.0.0.0/8");
        let mut held = BTreeSet::new();
        let mut next = 0;
        let started = std::time::Instant::now();
        for i in 0..20_000 {
            let (s, index) = allocate(cluster, &format!("n{i}"), &held, next).unwrap();
            assert!(held.insert(s), "{s} handed twice");
            next = index + 1;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    fn record(subnet: Option<&str>, address: &str) -> NodeRecord {
        NodeRecord {
            address: address.to_owned(),
            subnet: subnet.map(str::to_owned),
            ..NodeRecord::default()
        }
    }

    #[test]
    fn a_node_is_told_its_subnet_and_every_other_nodes_route() {
        let nodes: BTreeMap<String, NodeRecord> = [
            ("a".to_owned(), record(Some("10.88.0.0/24"), "192.168.1.1")),
            ("b".to_owned(), record(Some("10.88.1.0/24"), "192.168.1.2")),
            ("c".to_owned(), record(None, "192.168.1.3")),
            ("d".to_owned(), record(Some("10.88.2.0/24"), "")),
        ]
        .into();
        let cluster = cidr("10.88.0.0/16");
        let a = node_network("a", cluster, &nodes).unwrap();
        assert_eq!(a.subnet, "10.88.0.0/24");
        assert_eq!(
            a.peers,
            [Peer {
                node: "b".into(),
                subnet: "10.88.1.0/24".into(),
                address: "192.168.1.2".into(),
            }]
        );
        assert!(node_network("c", cluster, &nodes).is_none());
        assert_eq!(held(&nodes).len(), 3);
    }
}
