//! Placement tests: one-line table cases built with small builders and checked by one helper
//! (which also runs the naive oracle and the plan invariants on every case), then property
//! tests over random clusters.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::cluster::Cluster;
use super::filter::{self, changing_blocker, fixed_blocker};
use super::preempt::victims;
use super::*;
// The placement strategy, not proptest's trait of that name.
use super::Strategy;

// ---------------------------------------------------------------------------------------------
// Builders

const MI: u64 = 1 << 20;
const GI: u64 = 1 << 30;

struct NodeB(Node);

/// A ready, uncordoned node with 4 cores, 8Gi and 1024 pids.
fn node(name: &str) -> NodeB {
    NodeB(Node {
        name: name.to_string(),
        labels: BTreeMap::new(),
        ready: true,
        cordoned: false,
        capacity: Resources {
            cpu_millis: 4000,
            memory_bytes: 8 * GI,
            pids: 1024,
        },
        instances: Vec::new(),
    })
}

impl NodeB {
    fn cpu(self, cores: u64) -> Self {
        self.cpu_m(cores * 1000)
    }
    fn cpu_m(mut self, millis: u64) -> Self {
        self.0.capacity.cpu_millis = millis;
        self
    }
    fn mem_gib(self, gib: u64) -> Self {
        self.mem_bytes(gib * GI)
    }
    fn mem_mib(self, mib: u64) -> Self {
        self.mem_bytes(mib * MI)
    }
    fn mem_bytes(mut self, bytes: u64) -> Self {
        self.0.capacity.memory_bytes = bytes;
        self
    }
    fn pids(mut self, pids: u64) -> Self {
        self.0.capacity.pids = pids;
        self
    }
    fn label(mut self, key: &str, value: &str) -> Self {
        self.0.labels.insert(key.to_string(), value.to_string());
        self
    }
    fn cordoned(mut self) -> Self {
        self.0.cordoned = true;
        self
    }
    fn not_ready(mut self) -> Self {
        self.0.ready = false;
        self
    }
    fn runs(mut self, instance: InstB) -> Self {
        self.0.instances.push(instance.0);
        self
    }
}

struct InstB(Placed);

/// An instance already on a node: priority 0, no resources, no ports.
fn inst(id: &str, workload: &str) -> InstB {
    InstB(Placed {
        id: id.to_string(),
        workload: workload.to_string(),
        ..Placed::default()
    })
}

impl InstB {
    fn prio(mut self, priority: i32) -> Self {
        self.0.priority = priority;
        self
    }
    fn cpu(self, cores: u64) -> Self {
        self.cpu_m(cores * 1000)
    }
    fn cpu_m(mut self, millis: u64) -> Self {
        self.0.resources.cpu_millis = millis;
        self
    }
    fn mem_gib(mut self, gib: u64) -> Self {
        self.0.resources.memory_bytes = gib * GI;
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.0.host_ports.push(HostPort::tcp(port));
        self
    }
    fn udp(mut self, port: u16) -> Self {
        self.0.host_ports.push(HostPort::udp(port));
        self
    }
}

struct RequestB(Request);

/// `n` instances `workload-1` … `workload-n`, priority 0, no resources, no placement rules.
fn request(workload: &str, n: usize) -> RequestB {
    RequestB(Request {
        workload: workload.to_string(),
        instances: (1..=n).map(|i| format!("{workload}-{i}")).collect(),
        ..Request::default()
    })
}

impl RequestB {
    fn cpu(self, cores: u64) -> Self {
        self.cpu_m(cores * 1000)
    }
    fn cpu_m(mut self, millis: u64) -> Self {
        self.0.resources.cpu_millis = millis;
        self
    }
    fn mem_gib(self, gib: u64) -> Self {
        self.mem_mib(gib * 1024)
    }
    fn mem_mib(mut self, mib: u64) -> Self {
        self.0.resources.memory_bytes = mib * MI;
        self
    }
    fn pids(mut self, pids: u64) -> Self {
        self.0.resources.pids = pids;
        self
    }
    fn port(mut self, port: u16) -> Self {
        self.0.host_ports.push(HostPort::tcp(port));
        self
    }
    fn select(mut self, selector: &str) -> Self {
        self.0.node_selector = selector.parse().unwrap();
        self
    }
    fn constraint(mut self, selector: &str) -> Self {
        self.0.constraints.push(selector.parse().unwrap());
        self
    }
    fn spread(mut self, label: &str) -> Self {
        self.0.spread_label = Some(label.to_string());
        self
    }
    fn anti_affinity(mut self) -> Self {
        self.0.anti_affinity = true;
        self
    }
    fn prio(mut self, priority: i32) -> Self {
        self.0.priority = priority;
        self
    }
}

fn bin_pack() -> Config {
    Config {
        strategy: Strategy::BinPack,
        ..Config::default()
    }
}

fn no_preemption() -> Config {
    Config {
        preemption: false,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The check helper

/// The plan in one line: `web-1→n1 web-2→n2 | evict db-1@n1 for web-1 | unplaced web-3 (n1:
/// node cordoned; n2: …)`, consecutive unplaced instances with the same reasons together.
fn render(plan: &Plan) -> String {
    let mut parts = Vec::new();
    let assigned: Vec<String> = plan
        .assignments
        .iter()
        .map(|a| format!("{}→{}", a.instance, a.node))
        .collect();
    if !assigned.is_empty() {
        parts.push(assigned.join(" "));
    }
    let evicted: Vec<String> = plan
        .evictions
        .iter()
        .map(|e| format!("evict {}@{} for {}", e.instance, e.node, e.for_instance))
        .collect();
    if !evicted.is_empty() {
        parts.push(evicted.join(", "));
    }
    let mut unplaced = plan.unplaced.iter().peekable();
    while let Some(first) = unplaced.next() {
        let mut ids = vec![first.instance.as_str()];
        while let Some(next) = unplaced.next_if(|u| u.reasons == first.reasons) {
            ids.push(&next.instance);
        }
        let reasons: Vec<String> = first.reasons.iter().map(ToString::to_string).collect();
        parts.push(format!(
            "unplaced {} ({})",
            ids.join(" "),
            reasons.join("; ")
        ));
    }
    parts.join(" | ")
}

#[track_caller]
fn check(nodes: impl IntoIterator<Item = NodeB>, request: RequestB, expected: &str) {
    check_with(Config::default(), nodes, request, expected);
}

/// Schedules, compares the rendered plan with `expected`, and checks that the oracle agrees and
/// the invariants hold.
#[track_caller]
fn check_with(
    config: Config,
    nodes: impl IntoIterator<Item = NodeB>,
    request: RequestB,
    expected: &str,
) {
    let snapshot = Snapshot {
        nodes: nodes.into_iter().map(|n| n.0).collect(),
    };
    let plan = schedule(&snapshot, &request.0, &config);
    assert_eq!(render(&plan), expected);
    assert_eq!(
        plan,
        oracle(&snapshot, &request.0, &config),
        "oracle disagrees"
    );
    if let Err(e) = invariants(&snapshot, &request.0, &plan) {
        panic!("invariant broken: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Table cases

#[test]
fn resource_fit() {
    check(
        [node("n1").cpu(1).mem_gib(1)],
        request("web", 1).cpu_m(500).mem_mib(256),
        "web-1→n1",
    );
    check(
        [node("n1").cpu(1).mem_mib(512).pids(10)],
        request("web", 1).cpu(1).mem_mib(512).pids(10),
        "web-1→n1",
    );
    check(
        [node("n1").cpu_m(200)],
        request("web", 1).cpu_m(500),
        "unplaced web-1 (n1: insufficient cpu: requested 500m, free 200m)",
    );
    check(
        [node("n1").mem_mib(256)],
        request("web", 1).mem_mib(512),
        "unplaced web-1 (n1: insufficient memory: requested 512Mi, free 256Mi)",
    );
    check(
        [node("n1").pids(50)],
        request("web", 1).pids(100),
        "unplaced web-1 (n1: insufficient pids: requested 100, free 50)",
    );
    check(
        [node("n1").cpu_m(100).mem_mib(100)],
        request("web", 1).cpu_m(500).mem_mib(500),
        "unplaced web-1 (n1: insufficient cpu: requested 500m, free 100m)",
    );
    check(
        [node("n1").cpu(2).runs(inst("db-1", "db").cpu_m(1500))],
        request("web", 1).cpu(1),
        "unplaced web-1 (n1: insufficient cpu: requested 1, free 500m)",
    );
    check(
        [node("n1").mem_bytes(1_000_000_000)],
        request("web", 1).mem_gib(1),
        "unplaced web-1 (n1: insufficient memory: requested 1Gi, free 953.6Mi)",
    );
    check(
        [node("n1").cpu(1)],
        request("web", 3).cpu_m(500),
        "web-1→n1 web-2→n1 | unplaced web-3 (n1: insufficient cpu: requested 500m, free 0)",
    );
    check([node("n1")], request("web", 0), "");
    check([], request("web", 1), "unplaced web-1 ()");
}

#[test]
fn node_state() {
    check(
        [node("n1").not_ready()],
        request("web", 1),
        "unplaced web-1 (n1: node not ready)",
    );
    check(
        [node("n1").cordoned()],
        request("web", 1),
        "unplaced web-1 (n1: node cordoned)",
    );
    check(
        [node("n1").not_ready().cordoned()],
        request("web", 1),
        "unplaced web-1 (n1: node not ready)",
    );
    check(
        [node("n1").cordoned().cpu(0)],
        request("web", 1).select("zone=a").cpu(1),
        "unplaced web-1 (n1: node cordoned)",
    );
}

#[test]
fn node_selector() {
    let zone = |z| node("n1").label("zone", z).label("disk", "hdd");
    check([zone("a")], request("web", 1).select("zone=a"), "web-1→n1");
    check(
        [zone("b")],
        request("web", 1).select("zone=a"),
        "unplaced web-1 (n1: node selector zone=a not matched)",
    );
    check(
        [zone("a")],
        request("web", 1).select("zone=a,disk=ssd"),
        "unplaced web-1 (n1: node selector disk=ssd not matched)",
    );
    check(
        [zone("b")],
        request("web", 1).select("zone=a").constraint("disk=ssd"),
        "unplaced web-1 (n1: node selector zone=a not matched)",
    );
}

#[test]
fn constraint_operators() {
    let disk = |d: &str| {
        let n = node("n1");
        if d.is_empty() { n } else { n.label("disk", d) }
    };
    let cases = [
        ("disk=ssd", "ssd", None),
        ("disk=ssd", "hdd", Some("disk=ssd")),
        ("disk=ssd", "", Some("disk=ssd")),
        ("disk!=hdd", "ssd", None),
        ("disk!=hdd", "", None),
        ("disk!=hdd", "hdd", Some("disk!=hdd")),
        ("disk in (ssd,nvme)", "nvme", None),
        ("disk in (ssd,nvme)", "hdd", Some("disk in (nvme,ssd)")),
        ("disk in (ssd,nvme)", "", Some("disk in (nvme,ssd)")),
        ("disk notin (hdd)", "ssd", None),
        ("disk notin (hdd)", "", None),
        ("disk notin (hdd)", "hdd", Some("disk notin (hdd)")),
        ("disk", "hdd", None),
        ("disk", "", Some("disk")),
        ("!disk", "", None),
        ("!disk", "ssd", Some("!disk")),
    ];
    for (constraint, label, failed) in cases {
        let expected = match failed {
            None => "web-1→n1".to_string(),
            Some(r) => format!("unplaced web-1 (n1: constraint {r} not matched)"),
        };
        check(
            [disk(label)],
            request("web", 1).constraint(constraint),
            &expected,
        );
    }
    check(
        [node("n1").label("disk", "ssd")],
        request("web", 1).constraint("disk=ssd").constraint("gpu"),
        "unplaced web-1 (n1: constraint gpu not matched)",
    );
}

#[test]
fn anti_affinity() {
    check(
        [node("n1").runs(inst("web-0", "web"))],
        request("web", 1).anti_affinity(),
        "unplaced web-1 (n1: anti-affinity: already runs web-0)",
    );
    check(
        [node("n1").runs(inst("web-0", "web"))],
        request("web", 1),
        "web-1→n1",
    );
    check(
        [node("n1").runs(inst("db-1", "db"))],
        request("web", 1).anti_affinity(),
        "web-1→n1",
    );
    check(
        [node("n1")
            .runs(inst("web-b", "web"))
            .runs(inst("web-a", "web"))],
        request("web", 1).anti_affinity(),
        "unplaced web-1 (n1: anti-affinity: already runs web-a)",
    );
    check_with(
        bin_pack(),
        [node("n1"), node("n2")],
        request("web", 3).anti_affinity().cpu_m(100),
        "web-1→n1 web-2→n2 | unplaced web-3 (n1: anti-affinity: already runs web-1; n2: \
         anti-affinity: already runs web-2)",
    );
    // Evicting cannot cure anti-affinity, whatever the priorities.
    check(
        [node("n1").cpu(1).runs(inst("web-0", "web").cpu(1))],
        request("web", 1).anti_affinity().cpu(1).prio(10),
        "unplaced web-1 (n1: anti-affinity: already runs web-0)",
    );
}

#[test]
fn host_ports() {
    check(
        [node("n1").runs(inst("db-1", "db").port(8080))],
        request("web", 1).port(8080),
        "unplaced web-1 (n1: host port 8080/tcp in use)",
    );
    check(
        [node("n1").runs(inst("dns-1", "dns").udp(8080))],
        request("web", 1).port(8080),
        "web-1→n1",
    );
    check(
        [node("n1")],
        request("web", 2).port(8080),
        "web-1→n1 | unplaced web-2 (n1: host port 8080/tcp in use)",
    );
    check_with(
        bin_pack(),
        [node("n1"), node("n2")],
        request("web", 2).port(8080).cpu_m(100),
        "web-1→n1 web-2→n2",
    );
}

#[test]
fn spread() {
    check(
        [node("n1"), node("n2"), node("n3")],
        request("web", 3).cpu_m(500),
        "web-1→n1 web-2→n2 web-3→n3",
    );
    // Input order does not matter: ties go to the first name.
    check(
        [node("n3"), node("n2"), node("n1")],
        request("web", 4).cpu_m(500),
        "web-1→n1 web-2→n2 web-3→n3 web-4→n1",
    );
    check(
        [node("n1").runs(inst("db-1", "db").cpu(2)), node("n2")],
        request("web", 1).cpu_m(500),
        "web-1→n2",
    );
    // Allocation is the larger of the cpu and memory fractions: 75% cpu beats 50% memory.
    check(
        [
            node("n1").runs(inst("db-1", "db").cpu(3)),
            node("n2").runs(inst("cache-1", "cache").mem_gib(4)),
        ],
        request("web", 1).cpu_m(100),
        "web-1→n2",
    );
}

#[test]
fn spread_label() {
    let zones = || {
        [
            node("a1").label("zone", "a"),
            node("a2").label("zone", "a"),
            node("b1").label("zone", "b"),
        ]
    };
    check(
        zones(),
        request("web", 4).cpu_m(500),
        "web-1→a1 web-2→a2 web-3→b1 web-4→a1",
    );
    check(
        zones(),
        request("web", 4).cpu_m(500).spread("zone"),
        "web-1→a1 web-2→b1 web-3→a2 web-4→b1",
    );
    // Instances already in a zone count, wherever they run; other workloads do not.
    check(
        [
            node("a1").label("zone", "a").runs(inst("web-0", "web")),
            node("a2")
                .label("zone", "a")
                .cordoned()
                .runs(inst("web-00", "web")),
            node("b1")
                .label("zone", "b")
                .runs(inst("db-1", "db"))
                .runs(inst("db-2", "db")),
        ],
        request("web", 3).cpu_m(500).spread("zone"),
        "web-1→b1 web-2→b1 web-3→a1",
    );
    // Nodes without the label are a group of their own.
    check(
        [
            node("a1").label("zone", "a"),
            node("a2").label("zone", "a"),
            node("x"),
        ],
        request("web", 2).cpu_m(500).spread("zone"),
        "web-1→a1 web-2→x",
    );
    // Bin-pack within the emptiest zone.
    check_with(
        bin_pack(),
        zones(),
        request("web", 3).cpu_m(500).spread("zone"),
        "web-1→a1 web-2→b1 web-3→a1",
    );
}

#[test]
fn bin_pack_packs() {
    check_with(
        bin_pack(),
        [node("n1").cpu(2), node("n2").cpu(2), node("n3").cpu(2)],
        request("web", 5).cpu_m(500),
        "web-1→n1 web-2→n1 web-3→n1 web-4→n1 web-5→n2",
    );
    check_with(
        bin_pack(),
        [node("n1"), node("n2").runs(inst("db-1", "db").cpu(1))],
        request("web", 1).cpu_m(500),
        "web-1→n2",
    );
}

#[test]
fn preemption() {
    check(
        [node("n1").cpu(2).runs(inst("batch-1", "batch").cpu(2))],
        request("web", 1).cpu(1).prio(10),
        "web-1→n1 | evict batch-1@n1 for web-1",
    );
    // The fewest victims, even of a higher (but still lower than the request's) priority.
    check(
        [
            node("n1")
                .cpu(3)
                .runs(inst("b-1", "batch").cpu(1))
                .runs(inst("b-2", "batch").cpu(1))
                .runs(inst("b-3", "batch").cpu(1)),
            node("n2").cpu(3).runs(inst("big", "db").cpu(3).prio(5)),
        ],
        request("web", 1).cpu(3).prio(10),
        "web-1→n2 | evict big@n2 for web-1",
    );
    check(
        [node("n1")
            .runs(inst("s-1", "batch").cpu(1))
            .runs(inst("s-2", "batch").cpu(1))
            .runs(inst("big", "db").cpu(2).prio(1))],
        request("web", 1).cpu(2).prio(10),
        "web-1→n1 | evict big@n1 for web-1",
    );
    // As many victims: the lowest priority sum, then the first node name.
    check(
        [
            node("n1").cpu(1).runs(inst("a", "x").cpu(1).prio(3)),
            node("n2").cpu(1).runs(inst("b", "x").cpu(1).prio(1)),
            node("n3").cpu(1).runs(inst("c", "x").cpu(1).prio(1)),
        ],
        request("web", 1).cpu(1).prio(10),
        "web-1→n2 | evict b@n2 for web-1",
    );
    // Among one node's candidates, the lowest priority.
    check(
        [node("n1")
            .cpu(2)
            .runs(inst("a", "x").cpu(1).prio(3))
            .runs(inst("b", "x").cpu(1).prio(1))],
        request("web", 1).cpu(1).prio(10),
        "web-1→n1 | evict b@n1 for web-1",
    );
    // Never equal or higher priority.
    check(
        [node("n1").cpu(1).runs(inst("db-1", "db").cpu(1).prio(10))],
        request("web", 1).cpu(1).prio(10),
        "unplaced web-1 (n1: insufficient cpu: requested 1, free 0)",
    );
    check(
        [node("n1")
            .cpu(2)
            .runs(inst("hi", "db").cpu(1).prio(20))
            .runs(inst("lo", "batch").cpu(1))],
        request("web", 1).cpu(2).prio(10),
        "unplaced web-1 (n1: insufficient cpu: requested 2, free 0)",
    );
    check_with(
        no_preemption(),
        [node("n1").cpu(1).runs(inst("batch-1", "batch").cpu(1))],
        request("web", 1).cpu(1).prio(10),
        "unplaced web-1 (n1: insufficient cpu: requested 1, free 0)",
    );
    // Never on a node refused for another reason.
    let full = |n: NodeB| n.cpu(1).runs(inst("batch-1", "batch").cpu(1));
    check(
        [
            full(node("n1").cordoned()),
            full(node("n2").not_ready()),
            full(node("n3").label("zone", "b")),
            full(node("n4").label("zone", "a").label("disk", "hdd")),
        ],
        request("web", 1)
            .cpu(1)
            .prio(10)
            .select("zone!=b")
            .constraint("disk!=hdd"),
        "unplaced web-1 (n1: node cordoned; n2: node not ready; n3: node selector zone!=b not \
         matched; n4: constraint disk!=hdd not matched)",
    );
    // One instance after another, each making its own room.
    check(
        [
            node("n1").cpu(2).runs(inst("b-1", "batch").cpu(2)),
            node("n2").cpu(2).runs(inst("b-2", "batch").cpu(2)),
        ],
        request("web", 3).cpu(2).prio(5),
        "web-1→n1 web-2→n2 | evict b-1@n1 for web-1, evict b-2@n2 for web-2 | unplaced web-3 \
         (n1: insufficient cpu: requested 2, free 0; n2: insufficient cpu: requested 2, free 0)",
    );
    // Greedy takes x (the largest share) then y and z, then spares x, which y and z cover.
    check(
        [node("n1")
            .cpu(7)
            .mem_gib(7)
            .runs(inst("x", "db").cpu(3).mem_gib(3).prio(2))
            .runs(inst("y", "batch").cpu(4).prio(1))
            .runs(inst("z", "batch").mem_gib(4).prio(1))],
        request("web", 1).cpu(4).mem_gib(4).prio(10),
        "web-1→n1 | evict y@n1 for web-1, evict z@n1 for web-1",
    );
}

#[test]
fn preemption_of_host_ports() {
    check(
        [node("n1").runs(inst("db-1", "db").port(8080))],
        request("web", 1).port(8080).prio(5),
        "web-1→n1 | evict db-1@n1 for web-1",
    );
    check(
        [node("n1").runs(inst("db-1", "db").port(8080).prio(9))],
        request("web", 1).port(8080).prio(5),
        "unplaced web-1 (n1: host port 8080/tcp in use)",
    );
    // The port's holder goes; it frees enough, so the other stays.
    check(
        [node("n1")
            .cpu(2)
            .runs(inst("p", "db").cpu(1).port(8080))
            .runs(inst("q", "batch").cpu(1))],
        request("web", 1).cpu(1).port(8080).prio(5),
        "web-1→n1 | evict p@n1 for web-1",
    );
    // A port holder of higher priority rules its node out even when another node needs more
    // victims.
    check(
        [
            node("n1").runs(inst("db-1", "db").port(8080).prio(9)),
            node("n2")
                .cpu(2)
                .runs(inst("a", "batch").cpu(1))
                .runs(inst("b", "batch").cpu(1).port(8080)),
        ],
        request("web", 1).port(8080).cpu(2).prio(5),
        "web-1→n2 | evict a@n2 for web-1, evict b@n2 for web-1",
    );
}

#[test]
fn every_node_gives_one_reason() {
    check(
        [
            node("n1").not_ready(),
            node("n2").cordoned(),
            node("n3").label("zone", "b"),
            node("n4").label("zone", "a").cpu_m(100),
            node("n5")
                .label("zone", "a")
                .runs(inst("db-1", "db").port(80)),
        ],
        request("web", 2).select("zone=a").cpu_m(500).port(80),
        "unplaced web-1 web-2 (n1: node not ready; n2: node cordoned; n3: node selector zone=a \
         not matched; n4: insufficient cpu: requested 500m, free 100m; n5: host port 80/tcp in \
         use)",
    );
}

#[test]
fn plan_values() {
    let snapshot = Snapshot {
        nodes: vec![
            node("n1")
                .mem_mib(512)
                .runs(inst("batch-1", "batch").prio(-1).mem_gib(0))
                .0,
        ],
    };
    let plan = schedule(
        &snapshot,
        &request("web", 2).mem_mib(512).prio(3).0,
        &Config::default(),
    );
    assert_eq!(
        plan.assignments,
        [Assignment {
            instance: "web-1".into(),
            node: "n1".into()
        }]
    );
    assert_eq!(plan.evictions, []);
    let [unplaced] = &plan.unplaced[..] else {
        panic!("{plan:?}")
    };
    assert_eq!(unplaced.instance, "web-2");
    assert_eq!(
        unplaced.reasons[0].to_string(),
        "n1: insufficient memory: requested 512Mi, free 0"
    );

    let snapshot = Snapshot {
        nodes: vec![node("n1").runs(inst("db-1", "db").prio(-1).port(53)).0],
    };
    let plan = schedule(&snapshot, &request("dns", 1).port(53).0, &Config::default());
    assert_eq!(
        plan.evictions,
        [Eviction {
            instance: "db-1".into(),
            node: "n1".into(),
            workload: "db".into(),
            priority: -1,
            for_instance: "dns-1".into(),
        }]
    );
}

#[test]
fn a_cluster_sees_its_earlier_plans() {
    let snapshot = Snapshot {
        nodes: vec![node("n1").0, node("n2").runs(inst("db-1", "db").port(80)).0],
    };
    let mut cluster = Cluster::new(&snapshot);
    let config = Config::default();
    let web = cluster.place(&request("web", 1).port(80).cpu_m(100).0, &config);
    assert_eq!(render(&web), "web-1→n1");
    let api = cluster.place(&request("api", 1).port(80).0, &config);
    assert_eq!(
        render(&api),
        "unplaced api-1 (n1: host port 80/tcp in use; n2: host port 80/tcp in use)"
    );
    let evicting = cluster.place(&request("ops", 1).port(80).prio(1).0, &config);
    assert_eq!(render(&evicting), "ops-1→n1 | evict web-1@n1 for ops-1");
}

// ---------------------------------------------------------------------------------------------
// The oracle: the same filters and scores, without any incremental state. For each instance it
// re-reads every node, recounts the workload by scanning, and re-runs preemption on every node.

fn oracle(snapshot: &Snapshot, request: &Request, config: &Config) -> Plan {
    let mut cluster = Cluster::new(snapshot);
    let mut plan = Plan::default();
    for id in &request.instances {
        let nodes = &cluster.nodes;
        let same: Vec<u32> = nodes
            .iter()
            .map(|n| {
                let same = n
                    .residents
                    .iter()
                    .filter(|r| r.workload == request.workload);
                same.count() as u32
            })
            .collect();
        let value: Vec<Option<&str>> = nodes
            .iter()
            .map(|n| {
                let label = request.spread_label.as_ref()?;
                n.node.labels.get(label).map(String::as_str)
            })
            .collect();
        let mut counts: BTreeMap<Option<&str>, u64> = BTreeMap::new();
        for (v, s) in value.iter().zip(&same) {
            *counts.entry(*v).or_default() += u64::from(*s);
        }
        let feasible: Vec<usize> = (0..nodes.len())
            .filter(|&i| {
                fixed_blocker(&nodes[i], request).is_none()
                    && changing_blocker(&nodes[i], request, same[i]).is_none()
            })
            .collect();
        let chosen = if !feasible.is_empty() {
            let held = |i: usize| counts[&value[i]];
            let min = feasible.iter().map(|&i| held(i)).min().unwrap();
            let max = feasible.iter().map(|&i| held(i)).max().unwrap();
            let mut best: Option<(f64, f64, u32)> = None;
            for &i in &feasible {
                let resource = filter::resource_term(&nodes[i], request, config);
                let spread = filter::spread_score(held(i), min, max);
                let candidate = (
                    filter::total(resource, spread, &config.weights),
                    resource,
                    i as u32,
                );
                if best.is_none_or(|b| filter::compare(candidate, b).is_gt()) {
                    best = Some(candidate);
                }
            }
            best.map(|(_, _, i)| (i as usize, Vec::new()))
        } else if config.preemption {
            (0..nodes.len())
                .filter(|&i| {
                    fixed_blocker(&nodes[i], request).is_none()
                        && changing_blocker(&nodes[i], request, same[i])
                            .is_none_or(|b| b.preemptible())
                })
                .filter_map(|i| victims(&nodes[i], request).map(|v| (i, v)))
                .min_by_key(|(i, v)| (v.indexes.len(), v.priority_sum, *i))
                .map(|(i, v)| (i, v.indexes))
        } else {
            None
        };
        let Some((i, evicted)) = chosen else {
            let reasons = (0..nodes.len())
                .map(|i| Rejection {
                    node: nodes[i].name().to_string(),
                    reason: filter::reason(&nodes[i], request, same[i]).unwrap(),
                })
                .collect();
            plan.unplaced.push(Unplaced {
                instance: id.clone(),
                reasons,
            });
            continue;
        };
        let rank = i as u32;
        let name = nodes[i].name().to_string();
        let mut evictions = Vec::new();
        for &index in evicted.iter().rev() {
            let victim = cluster.remove(rank, index).unwrap();
            evictions.push(Eviction {
                instance: victim.id.into_owned(),
                node: name.clone(),
                workload: victim.workload.into_owned(),
                priority: victim.priority,
                for_instance: id.clone(),
            });
        }
        evictions.sort_by(|a, b| a.instance.cmp(&b.instance));
        plan.evictions.extend(evictions);
        cluster.add(rank, super::cluster::Resident::of_request(request, id));
        plan.assignments.push(Assignment {
            instance: id.clone(),
            node: name,
        });
    }
    plan
}

// ---------------------------------------------------------------------------------------------
// Invariants of every plan

/// What every plan must satisfy, whatever the input (given unique names and ids).
fn invariants(snapshot: &Snapshot, request: &Request, plan: &Plan) -> Result<(), String> {
    // Every requested instance exactly once, placed or not; never more than asked.
    let mut seen: Vec<&str> = plan
        .assignments
        .iter()
        .map(|a| a.instance.as_str())
        .collect();
    seen.extend(plan.unplaced.iter().map(|u| u.instance.as_str()));
    let mut asked: Vec<&str> = request.instances.iter().map(String::as_str).collect();
    seen.sort_unstable();
    asked.sort_unstable();
    if seen != asked {
        return Err(format!("instances {seen:?}, asked {asked:?}"));
    }
    // Every unplaced instance has one reason per node, in name order.
    let mut names: Vec<&str> = snapshot.nodes.iter().map(|n| n.name.as_str()).collect();
    names.sort_unstable();
    for u in &plan.unplaced {
        let nodes: Vec<&str> = u.reasons.iter().map(|r| r.node.as_str()).collect();
        if nodes != names {
            return Err(format!("{} has reasons for {nodes:?}", u.instance));
        }
    }
    for e in &plan.evictions {
        if e.priority >= request.priority {
            return Err(format!("{} evicted at priority {}", e.instance, e.priority));
        }
        let for_node = plan
            .assignments
            .iter()
            .find(|a| a.instance == e.for_instance);
        if for_node.is_none_or(|a| a.node != e.node) {
            return Err(format!(
                "{} evicted for an instance placed elsewhere",
                e.instance
            ));
        }
    }
    for a in &plan.assignments {
        let node = snapshot
            .nodes
            .iter()
            .find(|n| n.name == a.node)
            .ok_or("no such node")?;
        if !node.ready || node.cordoned {
            return Err(format!("{} placed on an unavailable node", a.instance));
        }
        let selectors = std::iter::once(&request.node_selector).chain(&request.constraints);
        if selectors.into_iter().any(|s| !s.matches(&node.labels)) {
            return Err(format!(
                "{} placed on a node its selectors refuse",
                a.instance
            ));
        }
    }
    let applied = apply(snapshot, request, plan)?;
    for (node, before) in applied.nodes.iter().zip(&snapshot.nodes) {
        let name = &node.name;
        let instances = &node.instances;
        if request.anti_affinity
            && plan.assignments.iter().any(|a| a.node == *name)
            && instances
                .iter()
                .filter(|p| p.workload == request.workload)
                .count()
                > 1
        {
            return Err(format!(
                "{name} runs its workload twice despite anti-affinity"
            ));
        }
        // No node overcommitted, no host port held twice (unless it already was).
        let total = |ps: &[Placed]| {
            ps.iter()
                .fold(Resources::ZERO, |acc, p| acc.saturating_add(p.resources))
        };
        if total(&before.instances).fits_in(node.capacity)
            && !total(instances).fits_in(node.capacity)
        {
            return Err(format!("{name} overcommitted"));
        }
        let mut ports: Vec<HostPort> = instances
            .iter()
            .flat_map(|p| p.host_ports.clone())
            .collect();
        let held = ports.len();
        ports.sort_unstable();
        ports.dedup();
        if ports.len() != held && instances != &before.instances {
            return Err(format!("{name} has a host port held twice"));
        }
    }
    Ok(())
}

/// `snapshot` after `plan`: evicted instances gone, assigned ones added (same node order).
fn apply(snapshot: &Snapshot, request: &Request, plan: &Plan) -> Result<Snapshot, String> {
    let mut applied = snapshot.clone();
    for e in &plan.evictions {
        let node = applied
            .nodes
            .iter_mut()
            .find(|n| n.name == e.node)
            .ok_or("no such node")?;
        let at = node
            .instances
            .iter()
            .position(|p| {
                p.id == e.instance && p.priority == e.priority && p.workload == e.workload
            })
            .ok_or_else(|| format!("{} is not on {}", e.instance, e.node))?;
        node.instances.remove(at);
    }
    for a in &plan.assignments {
        let node = applied
            .nodes
            .iter_mut()
            .find(|n| n.name == a.node)
            .ok_or("no such node")?;
        node.instances.push(Placed {
            id: a.instance.clone(),
            workload: request.workload.clone(),
            priority: request.priority,
            resources: request.resources,
            host_ports: request.host_ports.clone(),
        });
    }
    Ok(applied)
}

// ---------------------------------------------------------------------------------------------
// Property tests

const WORKLOADS: [&str; 3] = ["w0", "w1", "w2"];
const ZONES: [&str; 3] = ["a", "b", "c"];
const DISKS: [&str; 3] = ["ssd", "nvme", "hdd"];
const PORTS: [HostPort; 3] = [HostPort::tcp(80), HostPort::udp(80), HostPort::tcp(443)];
const SELECTORS: [&str; 7] = [
    "",
    "zone=a",
    "zone!=b",
    "zone in (a,b)",
    "disk notin (hdd)",
    "disk",
    "!disk",
];

fn ports(mask: u8) -> Vec<HostPort> {
    (0..3)
        .filter(|b| mask & (1 << b) != 0)
        .map(|b| PORTS[b])
        .collect()
}

fn resources(cpu: u64, mem: u64, pids: u64) -> Resources {
    Resources {
        cpu_millis: cpu * 500,
        memory_bytes: mem * 256 * MI,
        pids: pids * 8,
    }
}

prop_compose! {
    fn arb_placed()(
        workload in 0..3usize,
        priority in -1..3i32,
        cpu in 0..=4u64,
        mem in 0..=4u64,
        pids in 0..=2u64,
        mask in 0..8u8,
    ) -> Placed {
        Placed {
            id: String::new(),
            workload: WORKLOADS[workload].to_string(),
            priority,
            resources: resources(cpu, mem, pids),
            host_ports: ports(mask & 0b101),
        }
    }
}

prop_compose! {
    fn arb_node()(
        ready in prop::bool::weighted(0.85),
        cordoned in prop::bool::weighted(0.1),
        zone in 0..4usize,
        disk in 0..4usize,
        cpu in 1..=8u64,
        mem in 1..=8u64,
        pids in 1..=8u64,
        instances in prop::collection::vec(arb_placed(), 0..6),
    ) -> Node {
        let mut labels = BTreeMap::new();
        if let Some(z) = ZONES.get(zone) {
            labels.insert("zone".to_string(), z.to_string());
        }
        if let Some(d) = DISKS.get(disk) {
            labels.insert("disk".to_string(), d.to_string());
        }
        Node {
            name: String::new(),
            labels,
            ready,
            cordoned,
            capacity: resources(cpu, mem, pids),
            instances,
        }
    }
}

prop_compose! {
    /// Nodes `n0`, `n1`, …, each holding only instances that fit and no port twice.
    fn arb_snapshot_of(max_nodes: usize)(
        nodes in prop::collection::vec(arb_node(), 0..=max_nodes),
    ) -> Snapshot {
        let nodes = nodes.into_iter().enumerate().map(|(i, mut node)| {
            node.name = format!("n{i}");
            let mut used = Resources::ZERO;
            let mut held: Vec<HostPort> = Vec::new();
            let candidates = std::mem::take(&mut node.instances);
            for (j, mut p) in candidates.into_iter().enumerate() {
                let total = used.saturating_add(p.resources);
                if total.fits_in(node.capacity) && !p.host_ports.iter().any(|h| held.contains(h)) {
                    used = total;
                    held.extend(&p.host_ports);
                    p.id = format!("n{i}-i{j}");
                    node.instances.push(p);
                }
            }
            node
        }).collect();
        Snapshot { nodes }
    }
}

prop_compose! {
    fn arb_request_of(max_instances: usize)(
        workload in 0..3usize,
        n in 0..=max_instances,
        cpu in 0..=3u64,
        mem in 0..=3u64,
        pids in 0..=1u64,
        mask in 0..8u8,
        // Half the requests have no node selector, most have at most one constraint.
        selector in 0..2 * SELECTORS.len(),
        constraints in prop::collection::vec(0..SELECTORS.len(), 0..2),
        spread in 0..5usize,
        anti_affinity in any::<bool>(),
        priority in -1..4i32,
    ) -> Request {
        let workload = WORKLOADS[workload];
        Request {
            workload: workload.to_string(),
            instances: (0..n).map(|i| format!("{workload}-r{i}")).collect(),
            resources: resources(cpu, mem, pids),
            host_ports: ports(mask & 0b011),
            node_selector: SELECTORS.get(selector).unwrap_or(&"").parse().unwrap(),
            constraints: constraints.into_iter().map(|c| SELECTORS[c].parse().unwrap()).collect(),
            spread_label: ["zone", "disk", "rack"].get(spread).map(|s| s.to_string()),
            anti_affinity,
            priority,
        }
    }
}

prop_compose! {
    fn arb_config()(
        bin_pack in any::<bool>(),
        preemption in prop::bool::weighted(0.7),
        weights in prop::sample::select(vec![(1.0, 2.0), (1.0, 1.0), (1.0, 0.5), (0.0, 1.0)]),
    ) -> Config {
        Config {
            strategy: if bin_pack { Strategy::BinPack } else { Strategy::Spread },
            preemption,
            weights: Weights { resources: weights.0, spread_label: weights.1 },
        }
    }
}

fn arb_snapshot() -> impl proptest::strategy::Strategy<Value = Snapshot> {
    arb_snapshot_of(6)
}

fn arb_request() -> impl proptest::strategy::Strategy<Value = Request> {
    arb_request_of(9)
}

/// `snapshot` with its nodes, and each node's instances, in another order (a seeded shuffle).
fn shuffled(snapshot: &Snapshot, mut seed: u64) -> Snapshot {
    let mut next = move |bound: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % bound as u64) as usize
    };
    let mut nodes = snapshot.nodes.clone();
    for i in (1..nodes.len()).rev() {
        nodes.swap(i, next(i + 1));
    }
    for node in &mut nodes {
        for i in (1..node.instances.len()).rev() {
            node.instances.swap(i, next(i + 1));
        }
    }
    Snapshot { nodes }
}

/// 1000 cases, unless `PROPTEST_CASES` says otherwise.
fn cases() -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 1000;
    }
    config
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn plans_keep_the_invariants(
        snapshot in arb_snapshot(),
        request in arb_request(),
        config in arb_config(),
    ) {
        let plan = schedule(&snapshot, &request, &config);
        prop_assert!(plan.assignments.len() <= request.instances.len());
        if let Err(e) = invariants(&snapshot, &request, &plan) {
            prop_assert!(false, "{e}: {plan:#?}");
        }
        if !config.preemption {
            prop_assert!(plan.evictions.is_empty());
        }
    }

    #[test]
    fn plans_are_deterministic(
        snapshot in arb_snapshot(),
        request in arb_request(),
        config in arb_config(),
        seed in 1..u64::MAX,
    ) {
        let plan = schedule(&snapshot, &request, &config);
        prop_assert_eq!(&plan, &schedule(&snapshot, &request, &config));
        prop_assert_eq!(&plan, &schedule(&shuffled(&snapshot, seed), &request, &config));
    }

    #[test]
    fn incremental_plans_match_the_oracle(
        snapshot in arb_snapshot(),
        request in arb_request(),
        config in arb_config(),
    ) {
        prop_assert_eq!(schedule(&snapshot, &request, &config), oracle(&snapshot, &request, &config));
    }

    #[test]
    fn a_cluster_plans_as_if_the_earlier_plan_were_committed(
        snapshot in arb_snapshot(),
        first in arb_request(),
        mut second in arb_request(),
        config in arb_config(),
    ) {
        for id in &mut second.instances {
            id.push_str("-second");
        }
        let mut cluster = Cluster::new(&snapshot);
        let plan = cluster.place(&first, &config);
        let then = cluster.place(&second, &config);
        let committed = apply(&snapshot, &first, &plan).unwrap();
        prop_assert_eq!(then, schedule(&committed, &second, &config));
    }
}

proptest! {
    // Fewer cases of larger clusters: deep heaps, many stale entries, many count buckets.
    #![proptest_config(ProptestConfig { cases: cases().cases / 4, ..cases() })]

    #[test]
    fn larger_plans_match_the_oracle(
        snapshot in arb_snapshot_of(40),
        request in arb_request_of(80),
        config in arb_config(),
    ) {
        prop_assert_eq!(schedule(&snapshot, &request, &config), oracle(&snapshot, &request, &config));
    }
}
