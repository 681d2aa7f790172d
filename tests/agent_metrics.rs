//! The agent's `/metrics`, `/healthz` and `/readyz` end to end: a real scheduler (in the test
//! process), a real `gantry-agent run` with its endpoint on a free loopback port, and a real
//! container with a memory limit whose cgroup the scrape reads.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (after changing the agent,
//! `cargo build -p gantry-agent` first).

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use support::Cluster;
use support::node::{Agent, apply, busybox_image, can_run, instances, wait};

const IMAGE: &str = "gantry.test/busybox:1";

/// Status code and body of `GET path` on `addr` (HTTP/1.1, one request per connection).
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// The value of the series of `metric` whose labels include every one of `labels`.
fn series(text: &str, metric: &str, labels: &[String]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[test]
fn agent_metrics_read_the_containers_cgroups() {
    if !can_run("agent metrics") {
        return;
    }
    let cluster = Cluster::start(0);
    let data = cluster.dir.path().join("agent");
    std::fs::create_dir_all(&data).expect("agent data dir");
    let images = gantry_agent::image::ImageStore::open(data.join("images")).expect("image store");
    images
        .import(std::io::Cursor::new(busybox_image(IMAGE)))
        .expect("importing the test image");
    drop(images);
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start_with(&cluster.addr, &data, &["--metrics-listen", &addr]);
    let limit = Duration::from_secs(30);

    wait(&agent, "/healthz answers 200 ok", limit, || {
        get(&addr, "/healthz") == Some((200, "ok".to_owned()))
    });
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });
    wait(
        &agent,
        "/readyz answers 200 once assignments arrived",
        limit,
        || get(&addr, "/readyz").is_some_and(|(code, _)| code == 200),
    );

    // A container that holds 8 MiB in its /dev/shm (tmpfs pages are charged to the cgroup of
    // the process that writes them, and are not file cache the kernel may drop), under a
    // 64 MiB limit.
    apply(
        &cluster,
        "mem",
        &format!(
            "kind: Service\nname: mem\nimage: {IMAGE}\nnetwork: none\nresources:\n  memory: 64Mi\n\
             command: [sh, -c, 'busybox dd if=/dev/zero of=/dev/shm/held bs=1048576 count=8 \
             && sleep 3600']\nstopGracePeriod: 1s\n"
        ),
    );
    let mut id = String::new();
    wait(&agent, "the instance is Ready", limit, || {
        let list = instances(&cluster, "mem");
        match list.first() {
            Some(i) if i["state"] == "Ready" => {
                id = i["name"].as_str().unwrap_or_default().to_owned();
                true
            }
            _ => false,
        }
    });
    let labels = vec![
        format!("name=\"{id}\""),
        "workload=\"mem\"".to_owned(),
        format!("instance=\"{id}\""),
    ];
    let mut text = String::new();
    wait(&agent, "a working set of at least 8 MiB", limit, || {
        text = match get(&addr, "/metrics") {
            Some((200, body)) => body,
            _ => return false,
        };
        series(&text, "container_memory_working_set_bytes", &labels)
            .is_some_and(|v| v >= (8 << 20) as f64)
    });
    let value = |metric: &str| series(&text, metric, &labels);
    assert_eq!(
        value("container_spec_memory_limit_bytes"),
        Some((64u64 << 20) as f64),
        "{text}"
    );
    let usage = value("container_memory_usage_bytes").expect("usage series");
    let working_set = value("container_memory_working_set_bytes").expect("working set series");
    assert!(
        working_set <= usage,
        "working set {working_set} > usage {usage}"
    );
    assert!(
        value("container_cpu_usage_seconds_total").is_some_and(|v| v > 0.0),
        "{text}"
    );
    assert_eq!(value("container_oom_events_total"), Some(0.0), "{text}");
    // The series name the container's cgroup, as cAdvisor's `id` does.
    let cgroup_line = text
        .lines()
        .find(|l| l.starts_with("container_memory_working_set_bytes{") && l.contains(&id))
        .expect("working set line");
    assert!(
        cgroup_line.contains("id=\"/") && cgroup_line.contains(&format!("/{id}\"")),
        "{cgroup_line}"
    );

    // The agent's own metrics.
    assert_eq!(
        series(
            &text,
            "gantry_agent_instances",
            &["state=\"ready\"".to_owned()]
        ),
        Some(1.0),
        "{text}"
    );
    assert!(
        series(&text, "gantry_agent_reconcile_duration_seconds_count", &[])
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(text.trim_end().ends_with("# EOF"), "{text}");

    // Deleted: the container's series go with it.
    cluster.run(&["delete", "workload", "mem"]).ok();
    wait(&agent, "the container is removed", limit, || {
        agent.containers().is_empty()
    });
    let (code, text) = get(&addr, "/metrics").expect("scrape");
    assert_eq!(code, 200);
    assert!(!text.contains(&id), "{text}");
    assert_eq!(
        series(
            &text,
            "gantry_agent_instances",
            &["state=\"ready\"".to_owned()]
        ),
        Some(0.0),
        "{text}"
    );
}
