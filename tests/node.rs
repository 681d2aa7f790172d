//! End to end on one machine: a real scheduler (in the test process, embedded store), a real
//! `gantry-agent run` process and real containers, driven through the real `gantry` CLI.
//! `gantry apply` turns into running containers; scale, restart with backoff, a Job, agent
//! kill -9 and restart (live restore), and delete leaving nothing behind.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (`cargo test --workspace` builds
//! it; after changing the agent alone, `cargo build -p gantry-agent` first).

mod support;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use support::Cluster;
use support::node::{
    Agent, apply, can_run, instances, start_node, unclaimed_warm_mount, wait, warm_claims,
};

const IMAGE: &str = "gantry.test/busybox:1";

fn ready_ids(cluster: &Cluster, workload: &str) -> Vec<String> {
    let mut ids: Vec<String> = instances(cluster, workload)
        .iter()
        .filter(|i| i["state"] == "Ready")
        .map(|i| i["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Mounts under `dir`, but the namespace mounts of the agent's unclaimed warm namespaces.
fn mounts_under(dir: &Path) -> usize {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let claims = warm_claims(dir);
    // The runtime's state tmpfs is the agent's, not a container's.
    let state = format!(" {} ", dir.join("runtime/containers").display());
    let dir = dir.to_string_lossy();
    mountinfo
        .lines()
        .filter(|l| l.contains(&*dir) && !l.contains(&state) && !unclaimed_warm_mount(l, &claims))
        .count()
}

#[test]
fn services_jobs_restarts_and_live_restore_on_a_real_node() {
    if !can_run("node") {
        return;
    }
    let cluster = Cluster::start(0);
    let (data, mut agent) = start_node(&cluster, IMAGE);
    let limit = Duration::from_secs(30);
    let survivor = service_scaled_3_5_1(&cluster, &agent, "web", limit);

    // kill -9 the agent: the container keeps running; a new agent adopts it — same id, no
    // restart, nothing re-placed — and its status never leaves Ready.
    agent.kill();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        ready_ids(&cluster, "web"),
        survivor,
        "still Ready while the agent is down"
    );
    let mut agent = Agent::start(&cluster.addr, &data);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ready_ids(&cluster, "web"), survivor);
    assert_eq!(agent.containers(), survivor, "adopted, not created again");
    let web = instances(&cluster, "web");
    assert_eq!(web[0]["status"]["restartCount"], 0, "{web:?}");

    // A crashing container restarts with a growing backoff and shows its restarts.
    apply(
        &cluster,
        "crash",
        &format!(
            "kind: Service\nname: crash\nimage: {IMAGE}\ncommand: [sh, -c, 'exit 3']\n\
             restart: {{policy: always, backoff: {{initial: 200ms, max: 1s}}}}\n"
        ),
    );
    // Read between two runs (the container runs for a moment, without an exit code).
    let mut crash = serde_json::Value::Null;
    wait(&agent, "3 restarts of the crashing instance", limit, || {
        let list = instances(&cluster, "crash");
        crash = list.first().cloned().unwrap_or_default();
        list.len() == 1
            && crash["status"]["restartCount"].as_u64() >= Some(3)
            && !crash["status"]["exitCode"].is_null()
    });
    assert_eq!(crash["status"]["exitCode"], 3, "{crash:?}");
    assert_eq!(crash["status"]["lastExit"]["exitCode"], 3, "{crash:?}");
    assert_eq!(crash["status"]["lastExit"]["state"], "Exited", "{crash:?}");

    // A Job of 5 completions, 2 at a time: 5 instances that exited 0.
    apply(
        &cluster,
        "batch",
        &format!(
            "kind: Job\nname: batch\ncompletions: 5\nparallelism: 2\nimage: {IMAGE}\n\
             command: [sh, -c, 'sleep 0.2']\n"
        ),
    );
    wait(&agent, "5 completions", limit, || {
        instances(&cluster, "batch")
            .iter()
            .filter(|i| i["status"]["state"] == "Exited" && i["status"]["exitCode"] == 0)
            .count()
            == 5
    });

    // Delete everything: no container, rootfs mount or status left.
    for name in ["web", "crash", "batch"] {
        cluster.run(&["delete", "workload", name]).ok();
    }
    wait_all_removed(&agent, &data, limit);
    agent.kill();
    let _ = std::io::stderr().flush();
}

/// The same Service life cycle with the scheduler's state in a real etcd: 3 replicas, scaled to
/// 5 then 1, deleted with nothing left on the node.
#[test]
fn a_service_with_its_state_in_real_etcd() {
    if !can_run("node") {
        return;
    }
    let Some(cluster) = Cluster::start_on_etcd(0) else {
        return;
    };
    let (data, mut agent) = start_node(&cluster, IMAGE);
    let limit = Duration::from_secs(30);
    service_scaled_3_5_1(&cluster, &agent, "web-etcd", limit);
    cluster.run(&["delete", "workload", "web-etcd"]).ok();
    wait_all_removed(&agent, &data, limit);
    agent.kill();
}

/// Waits for the node to be Ready, then runs a Service `name` of 3 replicas (3 Ready containers)
/// and scales it to 5, then to 1; returns the id of the instance left, whose container is the
/// only one on the node.
fn service_scaled_3_5_1(
    cluster: &Cluster,
    agent: &Agent,
    name: &str,
    limit: Duration,
) -> Vec<String> {
    wait(agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });
    let service = |replicas: u32| {
        format!(
            "kind: Service\nname: {name}\nreplicas: {replicas}\nimage: {IMAGE}\n\
             command: [sleep, '3600']\nstopGracePeriod: 1s\n"
        )
    };
    apply(cluster, name, &service(3));
    wait(agent, "3 instances Ready", limit, || {
        ready_ids(cluster, name).len() == 3
    });
    assert_eq!(agent.containers(), ready_ids(cluster, name));
    // Each container holds its root filesystem in its own mount namespace; the node's mount
    // table does not keep one per container.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let rootfs_dir = format!(" {}/", agent.data().join("images/containers").display());
    let rootfs_mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(&rootfs_dir))
        .collect();
    assert!(rootfs_mounts.is_empty(), "{rootfs_mounts:#?}");
    // An exec resolves its user in the container's root as the container sees it now.
    let first = &ready_ids(cluster, name)[0];
    let line = "echo tester:x:4321:4321::/:/bin/sh >>/etc/passwd";
    cluster.run(&["exec", first, "--", "sh", "-c", line]).ok();
    let uid = cluster.run(&[
        "exec", first, "--user", "tester", "--", "busybox", "id", "-u",
    ]);
    assert_eq!(uid.ok(), "4321\n");
    cluster.run(&["scale", name, "5"]).ok();
    wait(agent, "5 instances Ready", limit, || {
        ready_ids(cluster, name).len() == 5 && agent.containers().len() == 5
    });
    cluster.run(&["scale", name, "1"]).ok();
    wait(agent, "1 instance left", limit, || {
        instances(cluster, name).len() == 1 && agent.containers().len() == 1
    });
    let survivor = ready_ids(cluster, name);
    assert_eq!(agent.containers(), survivor);
    survivor
}

/// Waits until the node holds no container, rootfs mount or instance status. Removal goes
/// container, then rootfs, then status: wait for all of it.
fn wait_all_removed(agent: &Agent, data: &Path, limit: Duration) {
    let statuses = || -> Vec<String> {
        std::fs::read_dir(data.join("instances"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait(
        agent,
        "every container, mount and status removed",
        limit,
        || agent.containers().is_empty() && mounts_under(data) == 0 && statuses().is_empty(),
    );
}
