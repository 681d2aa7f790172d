//! `gantry top` end to end: a real scheduler (in the test process), a real `gantry-agent run`
//! and real containers — one spinning a CPU, one holding 60 MiB in its /dev/shm (charged to
//! its memory cgroup) — measured through the scheduler with `gantry top instances|nodes`.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (`cargo build -p gantry-agent`
//! after changing the agent alone).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::Cluster;
use support::node::{apply, can_run, start_node, wait};

const IMAGE: &str = "gantry.test/busybox:1";
const MIB: f64 = 1024.0 * 1024.0;

/// The `items` of a usage list, by `name`.
fn item<'a>(list: &'a Value, name_prefix: &str) -> Option<&'a Value> {
    list["items"].as_array()?.iter().find(|i| {
        i["name"]
            .as_str()
            .is_some_and(|n| n.starts_with(name_prefix))
    })
}

#[test]
fn top_shows_cpu_and_memory_measured_by_the_agent() {
    if !can_run("top") {
        return;
    }
    let cluster = Cluster::start(0);
    let (_data, mut agent) = start_node(&cluster, IMAGE);
    let limit = Duration::from_secs(30);
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });
    let node = cluster.json(&["get", "nodes", "-o", "json"])["items"][0]["name"]
        .as_str()
        .expect("node name")
        .to_owned();

    apply(
        &cluster,
        "burner",
        &format!(
            "kind: Service\nname: burner\nimage: {IMAGE}\nnetwork: none\nstopGracePeriod: 1s\n\
             command: [sh, -c, 'while :; do :; done']\n"
        ),
    );
    apply(
        &cluster,
        "hog",
        &format!(
            "kind: Service\nname: hog\nimage: {IMAGE}\nnetwork: none\nstopGracePeriod: 1s\n\
             resources:\n  memory: 256Mi\n\
             command: [sh, -c, 'dd if=/dev/zero of=/dev/shm/fill bs=1M count=60; exec sleep 3600']\n"
        ),
    );

    // Both measured as expected; polled, since the hog fills its memory after it starts.
    let mut last = Value::Null;
    wait(
        &agent,
        "the burner's CPU and the hog's memory",
        limit,
        || {
            last = cluster.json(&["top", "instances", "-o", "json"]);
            let burner = item(&last, "burner-").and_then(|b| b["cpuCores"].as_f64());
            let hog = item(&last, "hog-").and_then(|h| h["memoryBytes"].as_f64());
            burner.is_some_and(|c| c > 0.3) && hog.is_some_and(|m| m >= 50.0 * MIB)
        },
    );
    assert_eq!(last["kind"], "InstanceUsageList");
    assert_eq!(last["unavailable"], Value::Array(vec![]), "{last:#}");
    let burner = item(&last, "burner-").expect("the burner");
    assert_eq!(burner["workload"], "burner");
    assert_eq!(burner["node"], node.as_str());
    assert!(burner["cpuCores"].as_f64().unwrap() < 1.5, "{last:#}");
    assert_eq!(burner["memoryLimitBytes"], Value::Null, "unlimited");
    assert!(burner["pids"].as_u64().unwrap() >= 1, "{last:#}");
    let hog = item(&last, "hog-").expect("the hog");
    assert_eq!(hog["memoryLimitBytes"].as_f64(), Some(256.0 * MIB));
    // The hog sleeps: next to no CPU.
    assert!(hog["cpuCores"].as_f64().unwrap() < 0.2, "{last:#}");

    // Filtered by workload and by node; the table has kubectl's columns.
    let only = cluster.json(&["top", "instances", "-w", "hog", "-o", "json"]);
    let names: Vec<&str> = only["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["workload"].as_str())
        .collect();
    assert_eq!(names, ["hog"], "{only:#}");
    let on_node = cluster.json(&["top", "instances", "--node", &node, "-o", "json"]);
    assert_eq!(
        on_node["items"].as_array().map(Vec::len),
        Some(2),
        "{on_node:#}"
    );
    let table = cluster.run(&["top", "instances", "-w", "burner"]);
    let text = table.ok();
    eprintln!("{text}");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(
        header,
        [
            "INSTANCE",
            "WORKLOAD",
            "NODE",
            "CPU(cores)",
            "MEMORY",
            "PIDS"
        ]
    );
    let row: Vec<&str> = lines.next().expect("a row").split_whitespace().collect();
    assert_eq!(row[1], "burner");
    let millicores: u64 = row[3].trim_end_matches('m').parse().expect("millicores");
    assert!(millicores > 300, "{text}");

    // The node: CPU busy (the burner), memory in use and its total.
    let nodes = cluster.json(&["top", "nodes", "-o", "json"]);
    assert_eq!(nodes["kind"], "NodeUsageList");
    let n = item(&nodes, &node).unwrap_or_else(|| panic!("{node} measured: {nodes:#}"));
    assert!(n["cpuCores"].as_f64().unwrap() > 0.3, "{nodes:#}");
    assert!(n["cpuCapacityCores"].as_f64().unwrap() >= 1.0, "{nodes:#}");
    let used = n["memoryBytes"].as_u64().unwrap();
    let total = n["memoryTotalBytes"].as_u64().unwrap();
    assert!(used > 0 && used < total, "{nodes:#}");
    let window = n["windowSeconds"].as_f64().unwrap();
    assert!((0.2..2.0).contains(&window), "{nodes:#}");
    let table = cluster.run(&["top", "nodes"]);
    eprintln!("{}", table.stdout);
    let header: Vec<String> = table
        .ok()
        .lines()
        .next()
        .expect("a header")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(header, ["NAME", "CPU(cores)", "CPU%", "MEMORY", "MEMORY%"]);

    // Unknown names: a clear error, exit code 1.
    let err = cluster.run(&["top", "instances", "-w", "nosuch"]);
    let err = err.fails(1);
    assert!(err.contains("nosuch") && err.contains("not found"), "{err}");
    let err = cluster.run(&["top", "nodes", "nosuch"]);
    let err = err.fails(1);
    assert!(err.contains("nosuch") && err.contains("not found"), "{err}");

    // A node whose agent is gone is listed as not measured rather than failing the call.
    cluster.run(&["delete", "workload", "burner", "hog"]).ok();
    wait(&agent, "every container removed", limit, || {
        agent.containers().is_empty()
    });
    agent.kill();
    wait(&agent, "the node is NotReady", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "NotReady"
    });
    let gone = cluster.json(&["top", "nodes", "-o", "json"]);
    assert_eq!(gone["items"], Value::Array(vec![]), "{gone:#}");
    assert_eq!(gone["unavailable"][0]["node"], node.as_str(), "{gone:#}");
    assert_eq!(gone["unavailable"][0]["reason"], "NotConnected", "{gone:#}");
    let table = cluster.run(&["top", "nodes"]);
    assert_eq!(table.ok(), "");
    assert!(table.stderr.contains("not measured"), "{table:#?}");
}
