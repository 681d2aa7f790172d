//! End to end health probes on one machine: a real scheduler (in the test process, embedded
//! store), a real `gantry-agent run` process and real containers, driven through the real
//! `gantry` CLI. An `exec` readiness probe gates Ready (and takes it away again), an `http`
//! readiness probe reaches a server inside the container's own network namespace, and a
//! failing `tcp` liveness probe restarts the container.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (after changing the agent,
//! `cargo build -p gantry-agent` first). The helpers are copied from `tests/node.rs`.

mod support;

use std::time::Duration;

use support::Cluster;
use support::node::{apply, can_run, instances, start_node, wait};

const IMAGE: &str = "gantry.test/busybox:probes";

/// The state and reason of the only instance of `workload`, if it has one.
fn state(cluster: &Cluster, workload: &str) -> Option<(String, String, u64)> {
    let list = instances(cluster, workload);
    let status = &list.first()?["status"];
    Some((
        status["state"].as_str().unwrap_or_default().to_owned(),
        status["reason"].as_str().unwrap_or_default().to_owned(),
        status["restartCount"].as_u64().unwrap_or_default(),
    ))
}

#[test]
fn probes_gate_readiness_and_liveness_restarts() {
    if !can_run("probe") {
        return;
    }
    let cluster = Cluster::start(0);
    let (_data, agent) = start_node(&cluster, IMAGE);
    let limit = Duration::from_secs(30);
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });

    // Readiness by exec: the file appears after 2 s and goes away 4 s later.
    apply(
        &cluster,
        "gated",
        &format!(
            "kind: Service\nname: gated\nimage: {IMAGE}\nstopGracePeriod: 1s\n\
             command: [sh, -c, 'sleep 2; touch /tmp/ready; sleep 4; rm /tmp/ready; sleep 3600']\n\
             health: {{readiness: {{exec: {{command: [test, -f, /tmp/ready]}}, period: 1s, \
             timeout: 5s, failureThreshold: 1}}}}\n"
        ),
    );
    // An http readiness probe against a server in the container's own network namespace.
    apply(
        &cluster,
        "web",
        &format!(
            "kind: Service\nname: web\nimage: {IMAGE}\nstopGracePeriod: 1s\n\
             command: [sh, -c, 'mkdir -p /www && echo ok > /www/index.html && \
             exec httpd -f -p 8080 -h /www']\n\
             health: {{readiness: {{http: {{path: /, port: 8080}}, period: 1s, initialDelay: 1s}}}}\n"
        ),
    );
    // A liveness probe on a port nothing listens on: stopped (SIGTERM, which `sleep` as init
    // ignores, then SIGKILL after 1 s) and restarted, again and again.
    apply(
        &cluster,
        "dead",
        &format!(
            "kind: Service\nname: dead\nimage: {IMAGE}\ncommand: [sleep, '3600']\n\
             stopGracePeriod: 1s\n\
             restart: {{policy: always, backoff: {{initial: 2s, max: 2s}}}}\n\
             health: {{liveness: {{tcp: {{port: 9}}, period: 1s, failureThreshold: 1}}}}\n"
        ),
    );

    // Running, not Ready, until the probe passes; then Ready; then unready again.
    wait(&agent, "gated is Running", limit, || {
        state(&cluster, "gated").is_some_and(|(s, _, _)| s == "Running")
    });
    wait(&agent, "gated is Ready", limit, || {
        state(&cluster, "gated").is_some_and(|(s, _, _)| s == "Ready")
    });
    wait(&agent, "gated is unready again", limit, || {
        state(&cluster, "gated")
            .is_some_and(|(s, reason, _)| s == "Running" && reason == "ReadinessProbeFailed")
    });
    let (_, _, restarts) = state(&cluster, "gated").expect("gated");
    assert_eq!(restarts, 0, "readiness never restarts");

    wait(&agent, "web is Ready", limit, || {
        state(&cluster, "web").is_some_and(|(s, _, _)| s == "Ready")
    });

    // `dead` runs `sleep 3600`: only the failing liveness probe can end it, so restarts prove
    // the probe acted (the transient LivenessProbeFailed reason is too short-lived to poll for;
    // the agent's log names it).
    wait(&agent, "dead restarted twice", limit, || {
        state(&cluster, "dead").is_some_and(|(_, _, restarts)| restarts >= 2)
    });
    let log = agent.log();
    assert!(log.contains("liveness probe failed"), "agent log:\n{log}");
    let (_, _, restarts) = state(&cluster, "web").expect("web");
    assert_eq!(restarts, 0);

    // Delete everything: no container left.
    for name in ["gated", "web", "dead"] {
        cluster.run(&["delete", "workload", name]).ok();
    }
    wait(&agent, "every container removed", limit, || {
        agent.containers().is_empty()
    });
}
