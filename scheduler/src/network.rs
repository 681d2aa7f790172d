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
//! Everything here is pure: the cache keeps the [`SubnetIndex`] current and the session does
//! the store work.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::cache::View;
use crate::model::keys;
use crate::store::{Compare, Op, Revision};

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
    allocate_where(cluster, start, |c| overlaps_any(c, taken)).ok_or_else(|| {
        AllocError::Exhausted {
            cluster,
            node: node.to_owned(),
            taken: taken.iter().filter(|t| cluster.contains(t)).count(),
        }
    })
}

/// The first /24 of `cluster` from the `start`-th on (wrapping around) that `is_taken` does not
/// refuse, with its index.
fn allocate_where(
    cluster: Cidr,
    start: u64,
    is_taken: impl Fn(&Cidr) -> bool,
) -> Option<(Cidr, u64)> {
    let count: u64 = 1 << (NODE_PREFIX - cluster.prefix.min(NODE_PREFIX));
    let base = u32::from(cluster.addr);
    (0..count).find_map(|k| {
        let i = (start.wrapping_add(k)) % count;
        let step = u32::try_from(i).unwrap_or(u32::MAX) << (32 - u32::from(NODE_PREFIX));
        let candidate = Cidr {
            addr: Ipv4Addr::from(base | step),
            prefix: NODE_PREFIX,
        };
        (!is_taken(&candidate)).then_some((candidate, i))
    })
}

/// The networks inside `candidate`, as a range of a sorted set or map.
fn inside(candidate: &Cidr) -> std::ops::RangeInclusive<Cidr> {
    let first = u32::from(candidate.addr);
    let last = first | !mask(candidate.prefix);
    Cidr {
        addr: Ipv4Addr::from(first),
        prefix: 0,
    }..=Cidr {
        addr: Ipv4Addr::from(last),
        prefix: 32,
    }
}

/// `candidate`'s strict supernets.
fn supernets(candidate: &Cidr) -> impl Iterator<Item = Cidr> + '_ {
    (0..candidate.prefix).filter_map(|p| Cidr::new(candidate.addr, p))
}

/// Whether `candidate` overlaps a network of `taken`: one that starts inside it, or one of
/// its supernets (O(prefix · log n) lookups, not a scan).
fn overlaps_any(candidate: &Cidr, taken: &BTreeSet<Cidr>) -> bool {
    taken.range(inside(candidate)).next().is_some()
        || supernets(candidate).any(|s| taken.contains(&s))
}

/// The entries of `map` whose network overlaps `candidate`.
fn overlapping<'a, V>(
    candidate: &'a Cidr,
    map: &'a BTreeMap<Cidr, V>,
) -> impl Iterator<Item = (&'a Cidr, &'a V)> + 'a {
    map.range(inside(candidate))
        .chain(supernets(candidate).filter_map(|s| map.get_key_value(&s)))
}

/// The subnets a replica's view knows of, indexed for allocation: the claim keys and the
/// subnets node records hold. The cache keeps it current from its watch, so a registration
/// picks a subnet in O(log n) without reading the store (its transaction checks the pick).
#[derive(Debug, Clone, Default)]
pub struct SubnetIndex {
    /// Claim keys: subnet → (its node, the key's mod revision).
    claims: BTreeMap<Cidr, (String, Revision)>,
    /// Node → the subnet its claim key names.
    claim_of: HashMap<String, Cidr>,
    /// Subnets held by node records → node (records written before claims existed have no
    /// claim key; they count as taken too).
    held: BTreeMap<Cidr, String>,
    /// Node → the subnet its record holds.
    held_by: HashMap<String, Cidr>,
}

impl SubnetIndex {
    /// Applies a put (`Some`) or delete (`None`) of the claim key whose name part is
    /// `key_form` (`10.88.3.0-24`); keys that do not parse are ignored.
    pub fn apply_claim(&mut self, key_form: &str, holder: Option<(String, Revision)>) {
        let Ok(subnet) = key_form.replace('-', "/").parse::<Cidr>() else {
            return;
        };
        if let Some((old, _)) = self.claims.remove(&subnet)
            && self.claim_of.get(&old) == Some(&subnet)
        {
            self.claim_of.remove(&old);
        }
        if let Some((node, revision)) = holder {
            self.claim_of.insert(node.clone(), subnet);
            self.claims.insert(subnet, (node, revision));
        }
    }

    /// Records that node `name`'s record holds `subnet` (`None`: no subnet, or no record).
    pub fn apply_node(&mut self, name: &str, subnet: Option<&str>) {
        if let Some(old) = self.held_by.remove(name)
            && self.held.get(&old).is_some_and(|n| n == name)
        {
            self.held.remove(&old);
        }
        if let Some(subnet) = subnet.and_then(|s| s.parse::<Cidr>().ok()) {
            self.held_by.insert(name.to_owned(), subnet);
            self.held.insert(subnet, name.to_owned());
        }
    }

    /// Subnets held or claimed inside `cluster`.
    fn count_in(&self, cluster: Cidr) -> usize {
        let mut all: BTreeSet<&Cidr> = self.claims.keys().collect();
        all.extend(self.held.keys());
        all.into_iter().filter(|c| cluster.contains(c)).count()
    }
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

/// Picks a subnet for node `name` from what `view` knows and prepares the transaction parts
/// that take it; the caller retries when the transaction fails (the view was behind). A claim
/// whose node record is gone is an orphan and free again: the transaction then checks that the
/// claim is still the one read and that the node's record is still absent.
///
/// `pending` are subnets this replica's registrations in flight have picked (their
/// transactions not yet written): they are skipped, so concurrent registrations do not all
/// pick the same subnet and fail but one. The search starts at the `start`-th /24 (the one
/// after this replica's last pick).
pub fn claim(
    view: &View,
    cluster: Cidr,
    name: &str,
    pending: &BTreeSet<Cidr>,
    start: u64,
) -> Result<Claim, AllocError> {
    let index = &view.subnets;
    if let Some(subnet) = index.claim_of.get(name) {
        // Taken by this node before (its record lost the subnet): it is still its own.
        let revision = index.claims.get(subnet).map_or(0, |(_, r)| *r);
        return Ok(Claim {
            subnet: *subnet,
            index: None,
            compares: vec![Compare::mod_revision(
                keys::subnet(&subnet.key_form()),
                revision,
            )],
            ops: Vec::new(),
        });
    }
    let is_taken = |candidate: &Cidr| {
        overlaps_any(candidate, pending)
            || overlapping(candidate, &index.held).next().is_some()
            || overlapping(candidate, &index.claims).any(|(subnet, (holder, _))| {
                // An orphan counts as free only when it is exactly the candidate.
                subnet != candidate || view.nodes.contains_key(holder)
            })
    };
    let (subnet, picked) =
        allocate_where(cluster, start, is_taken).ok_or_else(|| AllocError::Exhausted {
            cluster,
            node: name.to_owned(),
            taken: index.count_in(cluster),
        })?;
    let key = keys::subnet(&subnet.key_form());
    let compares = match index.claims.get(&subnet) {
        Some((holder, revision)) => vec![
            Compare::mod_revision(key.clone(), *revision),
            Compare::mod_revision(keys::node(holder), 0),
        ],
        None => vec![Compare::mod_revision(key.clone(), 0)],
    };
    Ok(Claim {
        subnet,
        index: Some(picked),
        compares,
        ops: vec![Op::put(key, name.as_bytes().to_vec())],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeRecord;

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

    fn node(subnet: Option<&str>) -> crate::cache::Versioned<NodeRecord> {
        crate::cache::Versioned {
            value: NodeRecord {
                subnet: subnet.map(str::to_owned),
                ..NodeRecord::default()
            },
            mod_revision: 1,
        }
    }

    /// A view with node records (name, subnet) and claim keys (subnet key form, holder, rev).
    fn view(nodes: &[(&str, Option<&str>)], claims: &[(&str, &str, Revision)]) -> View {
        let mut view = View::default();
        for (name, subnet) in nodes {
            view.nodes.insert((*name).to_owned(), node(*subnet));
            view.subnets.apply_node(name, *subnet);
        }
        for (key_form, holder, revision) in claims {
            view.subnets
                .apply_claim(key_form, Some(((*holder).to_owned(), *revision)));
        }
        view
    }

    #[test]
    fn a_claim_skips_held_claimed_and_pending_subnets() {
        let cluster = cidr("10.88.0.0/16");
        let view = view(
            &[("a", Some("10.88.0.0/24")), ("b", None)],
            &[("10.88.1.0-24", "b", 7)],
        );
        let pending = taken(&["10.88.2.0/24"]);
        let claim = claim(&view, cluster, "c", &pending, 0).unwrap();
        assert_eq!(claim.subnet, cidr("10.88.3.0/24"));
        assert_eq!(claim.index, Some(3));
        assert_eq!(
            claim.compares,
            [Compare::mod_revision(keys::subnet("10.88.3.0-24"), 0)]
        );
        assert_eq!(claim.ops.len(), 1);
    }

    #[test]
    fn a_node_gets_its_own_claim_back_and_an_orphan_is_reclaimed() {
        let cluster = cidr("10.88.0.0/16");
        // b holds a claim but its record lost the subnet: the same subnet, checked unchanged.
        let v = view(&[("b", None)], &[("10.88.1.0-24", "b", 7)]);
        let own = claim(&v, cluster, "b", &BTreeSet::new(), 0).unwrap();
        assert_eq!(own.subnet, cidr("10.88.1.0/24"));
        assert_eq!(own.index, None);
        assert!(own.ops.is_empty());
        assert_eq!(
            own.compares,
            [Compare::mod_revision(keys::subnet("10.88.1.0-24"), 7)]
        );
        // gone's record was deleted: its claim is free, under a compare on both keys.
        let v = view(&[], &[("10.88.0.0-24", "gone", 5)]);
        let reclaimed = claim(&v, cluster, "n", &BTreeSet::new(), 0).unwrap();
        assert_eq!(reclaimed.subnet, cidr("10.88.0.0/24"));
        assert_eq!(
            reclaimed.compares,
            [
                Compare::mod_revision(keys::subnet("10.88.0.0-24"), 5),
                Compare::mod_revision(keys::node("gone"), 0),
            ]
        );
        // Deleting the claim key and moving a node's subnet keep the index exact.
        let mut v = view(&[("a", Some("10.88.0.0/24"))], &[("10.88.0.0-24", "a", 3)]);
        v.subnets.apply_claim("10.88.0.0-24", None);
        v.subnets.apply_node("a", Some("10.88.5.0/24"));
        let next = claim(&v, cluster, "n", &BTreeSet::new(), 0).unwrap();
        assert_eq!(next.subnet, cidr("10.88.0.0/24"));
    }

    #[test]
    fn a_full_cluster_network_counts_what_is_taken() {
        let cluster = cidr("10.88.0.0/23");
        let v = view(&[("a", Some("10.88.0.0/24"))], &[("10.88.1.0-24", "b", 2)]);
        let mut v = v;
        v.nodes.insert("b".into(), node(Some("10.88.1.0/24")));
        v.subnets.apply_node("b", Some("10.88.1.0/24"));
        let err = claim(&v, cluster, "c", &BTreeSet::new(), 0).unwrap_err();
        assert!(err.to_string().contains("(2 nodes hold one)"), "{err}");
    }
}
