//! The `gantry` binary end to end, against a real scheduler started in this process with
//! simulated nodes (the real NodeSession API): what users type and what scripts parse.

mod support;

use std::time::Duration;

use gantry_scheduler::sim::SimConfig;
use serde_json::Value;
use support::{Cluster, Ran, gantry};

fn web(image: &str, replicas: u32) -> String {
    format!("kind: Service\nname: web\nimage: {image}\nreplicas: {replicas}\nlabels:\n  app: web\n")
}

fn workload_json(cluster: &Cluster, name: &str) -> Value {
    cluster.json(&["get", "workload", name, "-o", "json"])
}

fn ready(cluster: &Cluster, name: &str) -> u64 {
    workload_json(cluster, name)["status"]["instances"]["ready"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn usage_errors_exit_2() {
    let home = tempfile::tempdir().unwrap();
    let ran: Ran = gantry(home.path())
        .args(["get", "frobs"])
        .output()
        .unwrap()
        .into();
    assert!(ran.fails(2).contains("frobs"), "{ran:#?}");
    let ran: Ran = gantry(home.path()).output().unwrap().into();
    ran.fails(2);
    let ran: Ran = gantry(home.path())
        .args(["delete", "node", "n1"])
        .output()
        .unwrap()
        .into();
    assert!(ran.fails(2).contains("only workloads"), "{ran:#?}");
    let ran: Ran = gantry(home.path())
        .args(["scale", "web", "many"])
        .output()
        .unwrap()
        .into();
    ran.fails(2);
}

#[test]
fn an_unreachable_scheduler_is_named_with_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("http://127.0.0.1:{port}");
    let ran: Ran = gantry(home.path())
        .args(["--addr", &addr, "get", "workloads"])
        .output()
        .unwrap()
        .into();
    let stderr = ran.fails(1);
    assert!(
        stderr.contains(&format!(
            "cannot reach the scheduler at {addr}: connection refused; is it running?"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("gantry up"), "{stderr}");
}

#[test]
fn attached_run_refuses_service_flags_before_calling_the_scheduler() {
    // (Attached runs themselves are tested with a real node in tests/relay.rs.)
    let home = tempfile::tempdir().unwrap();
    for (flag, value) in [("--replicas", "2"), ("--restart", "always")] {
        let ran: Ran = gantry(home.path())
            .args([
                "--addr",
                "http://127.0.0.1:9",
                "run",
                flag,
                value,
                "busybox",
            ])
            .output()
            .unwrap()
            .into();
        let stderr = ran.fails(2);
        assert!(
            stderr.contains(flag) && stderr.contains("needs -d"),
            "{ran:#?}"
        );
    }
}

#[test]
fn apply_creates_then_leaves_unchanged_then_configures_and_dry_run_changes_nothing() {
    let cluster = Cluster::start(1);
    let v1 = cluster.file("web.yaml", &web("web:1", 1));
    let v1 = v1.to_str().unwrap();
    assert_eq!(
        cluster.run(&["apply", "-f", v1]).ok(),
        "workload/web created\n"
    );
    assert_eq!(
        cluster.run(&["apply", "-f", v1]).ok(),
        "workload/web unchanged\n"
    );

    let v2 = cluster.file("web2.yaml", &web("web:2", 1));
    let v2 = v2.to_str().unwrap();
    let dry = cluster.run(&["apply", "--dry-run", "-f", v2]);
    let out = dry.ok();
    assert!(
        out.starts_with("workload/web configured (dry run)\n"),
        "{out}"
    );
    assert!(
        out.contains("-image: web:1") && out.contains("+image: web:2"),
        "{out}"
    );
    let w = workload_json(&cluster, "web");
    assert_eq!(w["spec"]["image"], "web:1", "the dry run changed nothing");
    assert_eq!(w["generation"], 1);

    // From stdin, as JSON.
    let ran: Ran = cluster
        .gantry()
        .args(["apply", "-f", "-"])
        .write_stdin(r#"{"kind": "Service", "name": "web", "image": "web:2", "replicas": 1, "labels": {"app": "web"}}"#)
        .output()
        .unwrap()
        .into();
    assert_eq!(ran.ok(), "workload/web configured\n");
    let w = workload_json(&cluster, "web");
    assert_eq!(w["spec"]["image"], "web:2");
    assert_eq!(w["generation"], 2);
}

#[test]
fn invalid_specs_list_every_field_error_and_store_nothing() {
    let cluster = Cluster::start(1);
    let file = cluster.file(
        "bad.yaml",
        "kind: Service\nname: good\nimage: web:1\n---\n\
         kind: Service\nname: Bad_Name\nimage: ''\nreplicas: 1\n",
    );
    let ran = cluster.run(&["apply", "-f", file.to_str().unwrap()]);
    let stderr = ran.fails(1);
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert!(stderr.contains("document 2: name:"), "{stderr}");
    assert!(stderr.contains("document 2: image:"), "{stderr}");
    // Not even the valid first document was applied.
    let list = cluster.json(&["get", "workloads", "-o", "json"]);
    assert_eq!(list["items"], Value::Array(vec![]), "{list}");

    let unknown = cluster.file(
        "unknown.yaml",
        "kind: Service\nname: x\nimage: a\nreplicaz: 2\n",
    );
    let stderr = cluster
        .run(&["apply", "-f", unknown.to_str().unwrap()])
        .fails(1)
        .to_string();
    assert!(stderr.contains("replicaz"), "{stderr}");
}

#[test]
fn json_output_has_a_stable_shape() {
    let cluster = Cluster::start(2);
    let file = cluster.file("web.yaml", &web("web:1", 2));
    cluster.run(&["apply", "-f", file.to_str().unwrap()]).ok();
    cluster.wait_until("2 instances ready", || ready(&cluster, "web") == 2);

    let list = cluster.json(&["get", "workloads", "-o", "json"]);
    assert_eq!(list["kind"], "WorkloadList");
    assert!(list["revision"].as_i64().unwrap() > 0);
    let w = &list["items"][0];
    assert_eq!(w["kind"], "Workload");
    assert_eq!(w["name"], "web");
    assert_eq!(w["workloadKind"], "Service");
    assert_eq!(w["spec"]["replicas"], 2);
    assert_eq!(w["spec"]["labels"]["app"], "web");
    assert!(w["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(w["status"]["instances"]["desired"], 2);
    assert!(
        w["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Available" && c["status"] == "True"),
        "{w}"
    );

    let instances = cluster.json(&["get", "instances", "-l", "app=web", "-o", "json"]);
    assert_eq!(instances["kind"], "InstanceList");
    let items = instances["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for i in items {
        assert_eq!(i["workload"], "web");
        assert_eq!(i["state"], "Ready");
        assert!(i["node"].as_str().unwrap().starts_with("node-"));
        assert!(i["placementFailures"].as_array().unwrap().is_empty());
    }
    let none = cluster.json(&["get", "inst", "-l", "app=db", "-o", "json"]);
    assert_eq!(none["items"], Value::Array(vec![]));

    let nodes = cluster.json(&["get", "no", "-o", "json"]);
    assert_eq!(nodes["kind"], "NodeList");
    assert_eq!(nodes["items"][0]["name"], "node-0");
    assert_eq!(nodes["items"][0]["allocatable"]["cpu"], "4");

    // YAML has the same shape, and tables name their columns.
    let yaml = cluster.run(&["get", "wl", "web", "-o", "yaml"]);
    assert!(yaml.ok().contains("workloadKind: Service"), "{yaml:#?}");
    let table = cluster.run(&["get", "workloads"]);
    let header = table.ok().lines().next().unwrap().to_string();
    assert!(
        header.starts_with("NAME") && header.contains("READY"),
        "{header}"
    );
    assert!(table.stdout.contains("2/2"), "{table:#?}");
    let table = cluster.run(&["get", "instances", "-o", "wide"]);
    assert!(table.ok().starts_with("NAME"), "{table:#?}");
    assert!(table.stdout.contains("WORKLOAD") && table.stdout.contains("NODE"));

    // describe puts it together.
    let described = cluster.run(&["describe", "workload", "web"]);
    let text = described.ok();
    assert!(text.contains("Kind:           Service"), "{text}");
    assert!(
        text.contains("Conditions:") && text.contains("Instances:"),
        "{text}"
    );
}

#[test]
fn scale_changes_the_count_and_the_nodes_run_that_many() {
    let cluster = Cluster::start(2);
    let file = cluster.file("web.yaml", &web("web:1", 1));
    cluster.run(&["apply", "-f", file.to_str().unwrap()]).ok();
    cluster.wait_until("1 ready", || ready(&cluster, "web") == 1);
    assert_eq!(
        cluster.run(&["scale", "web", "3"]).ok(),
        "workload/web scaled to 3\n"
    );
    assert_eq!(workload_json(&cluster, "web")["spec"]["replicas"], 3);
    cluster.wait_until("3 ready", || ready(&cluster, "web") == 3);
    cluster.wait_until("the nodes run 3", || cluster.running() == 3);
    let ran = cluster.run(&["rollout", "status", "web", "--timeout", "20s"]);
    assert!(ran.ok().contains("rolled out"), "{ran:#?}");
}

#[test]
fn rollout_status_succeeds_for_a_good_update_and_fails_when_it_is_rolled_back() {
    let cluster = Cluster::start_with(2, |name| SimConfig {
        crash_images: vec!["web:broken".into()],
        crash_backoff: Duration::from_millis(200),
        ..SimConfig::new(name)
    });
    let good = cluster.file("good.yaml", &web("web:1", 2));
    cluster.run(&["apply", "-f", good.to_str().unwrap()]).ok();
    let ran = cluster.run(&["rollout", "status", "web", "--timeout", "30s"]);
    assert!(ran.ok().contains("generation 1 rolled out"), "{ran:#?}");

    let good2 = cluster.file("good2.yaml", &web("web:2", 2));
    cluster.run(&["apply", "-f", good2.to_str().unwrap()]).ok();
    let ran = cluster.run(&["rollout", "status", "web", "--timeout", "30s"]);
    assert!(ran.ok().contains("generation 2 rolled out"), "{ran:#?}");

    let broken = cluster.file("broken.yaml", &web("web:broken", 2));
    cluster.run(&["apply", "-f", broken.to_str().unwrap()]).ok();
    let ran = cluster.run(&["rollout", "status", "web", "--timeout", "30s"]);
    let stderr = ran.fails(1);
    assert!(stderr.contains("rolled back"), "{stderr}");
    // Once rolled back, asking again still reports the failed rollout.
    cluster
        .run(&["rollout", "status", "web", "--timeout", "30s"])
        .fails(1);

    let history = cluster.run(&["rollout", "history", "web"]);
    let text = history.ok();
    assert!(text.contains("auto-rollback to 2"), "{text}");
    let events = cluster.run(&["events"]);
    assert!(events.ok().contains("RolledBack"), "{events:#?}");
    let undo = cluster.run(&["rollout", "undo", "web", "--to-revision", "1"]);
    assert!(
        undo.ok().contains("rolled back to generation 1"),
        "{undo:#?}"
    );
    assert_eq!(workload_json(&cluster, "web")["spec"]["image"], "web:1");
}

#[test]
fn nodes_are_cordoned_drained_and_uncordoned() {
    let cluster = Cluster::start(2);
    let file = cluster.file("web.yaml", &web("web:1", 2));
    cluster.run(&["apply", "-f", file.to_str().unwrap()]).ok();
    cluster.wait_until("2 ready", || ready(&cluster, "web") == 2);
    let node = |name: &str| cluster.json(&["get", "node", name, "-o", "json"]);

    assert_eq!(
        cluster.run(&["node", "cordon", "node-0"]).ok(),
        "node/node-0 cordoned\n"
    );
    assert_eq!(node("node-0")["cordoned"], true);
    let ls = cluster.run(&["node", "ls"]);
    assert!(ls.ok().contains("Ready,SchedulingDisabled"), "{ls:#?}");

    let dry = cluster.run(&["node", "drain", "node-1", "--dry-run"]);
    assert!(dry.ok().contains("would move"), "{dry:#?}");
    assert_eq!(
        node("node-1")["cordoned"],
        false,
        "a dry run changes nothing"
    );

    cluster.run(&["node", "uncordon", "node-0"]).ok();
    let drained = cluster.run(&["node", "drain", "node-1"]);
    assert!(
        drained.ok().contains("cordoned and draining"),
        "{drained:#?}"
    );
    let n1 = node("node-1");
    assert_eq!(n1["cordoned"], true);
    cluster.wait_until("instances moved off node-1", || {
        let list = cluster.json(&["get", "instances", "--node", "node-1", "-o", "json"]);
        list["items"].as_array().is_some_and(|i| i.is_empty())
    });
    cluster.wait_until("2 ready elsewhere", || ready(&cluster, "web") == 2);
    cluster.run(&["node", "uncordon", "node-1"]).ok();
    assert_eq!(node("node-1")["cordoned"], false);
}

#[test]
fn delete_and_not_found() {
    let cluster = Cluster::start(1);
    let ran = cluster.run(&["get", "workload", "web"]);
    assert_eq!(
        ran.fails(1),
        "error: workload web not found; see `gantry get workloads`\n"
    );
    let file = cluster.file("web.yaml", &web("web:1", 1));
    cluster.run(&["apply", "-f", file.to_str().unwrap()]).ok();
    assert_eq!(
        cluster.run(&["delete", "workload", "web"]).ok(),
        "workload/web deleted\n"
    );
    let ran = cluster.run(&["delete", "workload", "web"]);
    assert!(ran.fails(1).contains("workload web not found"), "{ran:#?}");
    cluster.run(&["apply", "-f", file.to_str().unwrap()]).ok();
    assert_eq!(
        cluster.run(&["delete", "-f", file.to_str().unwrap()]).ok(),
        "workload/web deleted\n"
    );
    cluster.wait_until("the nodes stop it", || cluster.running() == 0);
    let describe = cluster.run(&["describe", "node", "node-9"]);
    assert!(
        describe.fails(1).contains("node node-9 not found"),
        "{describe:#?}"
    );
}

#[test]
fn describe_says_why_an_instance_is_not_placed() {
    let cluster = Cluster::start(1);
    let file = cluster.file(
        "big.yaml",
        "kind: Service\nname: big\nimage: big:1\nresources:\n  memory: 64Gi\n",
    );
    cluster.run(&["apply", "-f", file.to_str().unwrap()]).ok();
    cluster.wait_until("the instance is unplaced", || {
        let list = cluster.json(&["get", "instances", "--workload", "big", "-o", "json"]);
        list["items"][0]["placementFailures"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
    });
    let text = cluster
        .run(&["describe", "workload", "big"])
        .ok()
        .to_string();
    assert!(text.contains("Not placed (why no node fits)"), "{text}");
    assert!(text.contains("node-0: insufficient memory"), "{text}");
    let id =
        cluster.json(&["get", "instances", "--workload", "big", "-o", "json"])["items"][0]["name"]
            .as_str()
            .unwrap()
            .to_string();
    let text = cluster.run(&["describe", "instance", &id]).ok().to_string();
    assert!(text.contains("node-0: insufficient memory"), "{text}");
    let table = cluster.run(&["get", "instances"]);
    assert!(table.ok().contains("Unschedulable"), "{table:#?}");
}

#[test]
fn run_detached_creates_a_service_once() {
    let cluster = Cluster::start(1);
    let ran = cluster.run(&[
        "run",
        "-d",
        "--name",
        "hello",
        "-e",
        "GREETING=hi",
        "-p",
        "8080:80",
        "--replicas",
        "2",
        "--memory",
        "64Mi",
        "busybox",
        "--",
        "httpd",
        "-f",
    ]);
    assert_eq!(ran.ok(), "workload/hello created\n");
    let w = workload_json(&cluster, "hello");
    assert_eq!(w["spec"]["image"], "busybox");
    assert_eq!(w["spec"]["args"], serde_json::json!(["httpd", "-f"]));
    assert_eq!(w["spec"]["env"]["GREETING"], "hi");
    assert_eq!(w["spec"]["ports"][0]["host"], 8080);
    assert_eq!(w["spec"]["replicas"], 2);
    let again = cluster.run(&["run", "-d", "--name", "hello", "busybox"]);
    assert!(again.fails(1).contains("already exists"), "{again:#?}");
}

#[test]
fn the_config_file_names_the_scheduler() {
    let cluster = Cluster::start(1);
    let config = cluster.file(
        "config.yaml",
        &format!("address: {}\ntoken: s3cret\n", cluster.addr),
    );
    let ran: Ran = support::gantry(cluster.dir.path())
        .args(["--config", config.to_str().unwrap(), "get", "nodes"])
        .output()
        .unwrap()
        .into();
    assert!(ran.ok().contains("node-0"), "{ran:#?}");
    // The default place: ~/.config/gantry/config.yaml.
    let dir = cluster.dir.path().join(".config/gantry");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.yaml"),
        format!("address: {}\n", cluster.addr),
    )
    .unwrap();
    let ran: Ran = support::gantry(cluster.dir.path())
        .args(["get", "nodes", "-o", "json"])
        .output()
        .unwrap()
        .into();
    ran.ok();
    // TLS material that is not there is named, before anything is sent.
    let tls = cluster.file(
        "tls-config.yaml",
        &format!("address: {}\nca: missing-ca.pem\n", cluster.addr),
    );
    let ran: Ran = support::gantry(cluster.dir.path())
        .args(["--config", tls.to_str().unwrap(), "get", "nodes"])
        .output()
        .unwrap()
        .into();
    assert!(
        ran.fails(1).contains("cannot read the CA certificate"),
        "{ran:#?}"
    );
    let bad = cluster.file("bad-config.yaml", "adress: x\n");
    let ran: Ran = support::gantry(cluster.dir.path())
        .args(["--config", bad.to_str().unwrap(), "get", "nodes"])
        .output()
        .unwrap()
        .into();
    assert!(ran.fails(1).contains("adress"), "{ran:#?}");
}

#[test]
fn watches_print_changes_as_they_arrive() {
    let cluster = Cluster::start(1);
    let mut workloads = cluster.spawn(&["get", "workloads", "-w"]);
    workloads.wait_for("the header", |l| l.starts_with("NAME"));
    let mut instances =
        cluster.spawn(&["get", "instances", "--workload", "web", "-w", "-o", "json"]);
    let mut events = cluster.spawn(&["events", "-w", "--all"]);
    events.wait_for("the header", |l| l.starts_with("AGE"));

    let file = cluster.file("web.yaml", &web("web:1", 1));
    cluster.run(&["apply", "-f", file.to_str().unwrap()]).ok();
    workloads.wait_for("a row for web", |l| l.starts_with("web "));
    let line = instances.wait_for("the instance, ready", |l| l.contains("\"Ready\""));
    let doc: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(doc["kind"], "Instance");
    assert_eq!(doc["workload"], "web");
    events.wait_for("the workload's creation", |l| {
        l.contains("Created") && l.contains("workload/web")
    });

    cluster.run(&["scale", "web", "2"]).ok();
    workloads.wait_for("web at 2/2", |l| l.starts_with("web ") && l.contains("2/2"));
}
