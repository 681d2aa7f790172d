//! Placement throughput: `cargo run --release -p gantry-scheduler --example placement_bench` prints placements per second for
//! 1,000 and 5,000 nodes and 10,000 instances, per scenario, against the 50,000/s target.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use gantry_scheduler::placement::{
    Cluster, Config, HostPort, Node, Placed, Plan, Request, Resources, Snapshot, Strategy, schedule,
};

const INSTANCES: usize = 10_000;
const TARGET: f64 = 50_000.0;
const RUNS: usize = 5;

/// `n` nodes of 16 cores, 64Gi and 4096 pids in three zones, each already running `per_node`
/// instances of 250m and 512Mi from 100 workloads at `priority`.
fn cluster(n: usize, per_node: usize, priority: i32, cpu_each: u64) -> Snapshot {
    let nodes = (0..n)
        .map(|i| Node {
            name: format!("node-{i:05}"),
            labels: BTreeMap::from([
                ("zone".to_string(), format!("z{}", i % 3)),
                (
                    "disk".to_string(),
                    if i % 2 == 0 { "ssd" } else { "hdd" }.to_string(),
                ),
            ]),
            ready: true,
            cordoned: false,
            capacity: Resources {
                cpu_millis: 16_000,
                memory_bytes: 64 << 30,
                pids: 4096,
            },
            instances: (0..per_node)
                .map(|j| Placed {
                    id: format!("old-{i}-{j}"),
                    workload: format!("svc-{}", (i * per_node + j) % 100),
                    priority,
                    resources: Resources {
                        cpu_millis: cpu_each,
                        memory_bytes: 512 << 20,
                        pids: 16,
                    },
                    host_ports: if j == 0 {
                        vec![HostPort::tcp(9100)]
                    } else {
                        vec![]
                    },
                })
                .collect(),
        })
        .collect();
    Snapshot { nodes }
}

fn request(workload: &str, n: usize) -> Request {
    Request {
        workload: workload.to_string(),
        instances: (0..n).map(|i| format!("{workload}-{i}")).collect(),
        resources: Resources {
            cpu_millis: 100,
            memory_bytes: 128 << 20,
            pids: 8,
        },
        ..Request::default()
    }
}

/// The median of `RUNS` runs of `f`, and the last plan's summary.
fn time(mut f: impl FnMut() -> Vec<Plan>) -> (Duration, String) {
    let mut times = Vec::new();
    let mut summary = String::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let plans = black_box(f());
        times.push(start.elapsed());
        let placed: usize = plans.iter().map(|p| p.assignments.len()).sum();
        let unplaced: usize = plans.iter().map(|p| p.unplaced.len()).sum();
        let evicted: usize = plans.iter().map(|p| p.evictions.len()).sum();
        summary = format!("placed {placed}, unplaced {unplaced}, evicted {evicted}");
    }
    times.sort();
    (times[RUNS / 2], summary)
}

fn report(
    nodes: usize,
    scenario: &str,
    instances: usize,
    run: impl FnOnce() -> (Duration, String),
) {
    // `bench <words>` runs only the scenarios whose name contains them.
    let filter = std::env::args().nth(1).unwrap_or_default();
    if !format!("{nodes} {scenario}").contains(&filter) {
        return;
    }
    let (took, summary) = run();
    let rate = instances as f64 / took.as_secs_f64();
    println!(
        "| {nodes} | {scenario} | {:.1} ms | {:.0} | {:.1}× | {summary} |",
        took.as_secs_f64() * 1e3,
        rate,
        rate / TARGET
    );
}

fn main() {
    println!(
        "| nodes | scenario ({INSTANCES} instances) | median of {RUNS} | placements/s | vs 50k/s | plan |"
    );
    println!("|---|---|---|---|---|---|");
    for nodes in [1_000, 5_000] {
        let snapshot = cluster(nodes, 10, 0, 250);
        let spread = Config::default();
        let bin_pack = Config {
            strategy: Strategy::BinPack,
            ..Config::default()
        };

        let build = time(|| {
            black_box(Cluster::new(&snapshot));
            Vec::new()
        });
        println!(
            "| {nodes} | Cluster::new alone ({} instances already placed) | {:.2} ms | | | |",
            nodes * 10,
            build.0.as_secs_f64() * 1e3
        );

        let r = request("web", INSTANCES);
        report(nodes, "spread, one request", INSTANCES, || {
            time(|| vec![schedule(&snapshot, &r, &spread)])
        });
        report(nodes, "bin-pack, one request", INSTANCES, || {
            time(|| vec![schedule(&snapshot, &r, &bin_pack)])
        });

        let mut zoned = request("web", INSTANCES);
        zoned.spread_label = Some("zone".to_string());
        zoned.constraints = vec!["disk in (ssd,nvme)".parse().unwrap_or_default()];
        report(nodes, "spread over zone + constraint", INSTANCES, || {
            time(|| vec![schedule(&snapshot, &zoned, &spread)])
        });

        let mut per_node = request("web", INSTANCES);
        per_node.spread_label = Some("node".to_string());
        report(
            nodes,
            "spread over a per-node label (values = nodes)",
            INSTANCES,
            || {
                let mut labelled = snapshot.clone();
                for n in &mut labelled.nodes {
                    n.labels.insert("node".to_string(), n.name.clone());
                }
                time(|| vec![schedule(&labelled, &per_node, &spread)])
            },
        );

        let mut exclusive = request("web", INSTANCES);
        exclusive.anti_affinity = true;
        exclusive.host_ports = vec![HostPort::tcp(8080)];
        report(
            nodes,
            "anti-affinity + host port (rest unplaced)",
            INSTANCES,
            || time(|| vec![schedule(&snapshot, &exclusive, &spread)]),
        );

        // Every node full of priority-0 instances of 1 core; each placement evicts one.
        let full = cluster(nodes, 16, 0, 1000);
        let mut urgent = request("urgent", INSTANCES);
        urgent.resources.cpu_millis = 1000;
        urgent.priority = 10;
        report(
            nodes,
            "preemption: every placement evicts",
            INSTANCES,
            || time(|| vec![schedule(&full, &urgent, &spread)]),
        );

        // The workload controller's shape: one view, many small requests.
        let requests: Vec<Request> = (0..1000)
            .map(|w| request(&format!("app-{w}"), 10))
            .collect();
        report(
            nodes,
            "1,000 requests × 10 on one Cluster",
            INSTANCES,
            || {
                time(|| {
                    let mut cluster = Cluster::new(&snapshot);
                    requests.iter().map(|r| cluster.place(r, &spread)).collect()
                })
            },
        );
    }
}
