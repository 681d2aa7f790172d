//! `gantry image ls|rm|prune` end to end: a real scheduler (in the test process), a real
//! `gantry-agent run` whose store holds a busybox image under two references, and a real
//! container using it: listing through the scheduler, removal refused while the instance runs
//! (naming it), untagging, removal by digest, unknown references.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (`cargo build -p gantry-agent`
//! after changing the agent alone).

mod support;

use std::time::Duration;

use serde_json::Value;
use support::Cluster;
use support::node::{Agent, apply, busybox_image, can_run, instances, wait};

const IMAGE: &str = "gantry.test/busybox:1";
const SPARE: &str = "gantry.test/spare:1";

#[test]
fn images_are_listed_and_removed_through_the_scheduler() {
    if !can_run("image") {
        return;
    }
    let cluster = Cluster::start(0);
    // The agent's store: one image under two references.
    let data = cluster.dir.path().join("agent");
    std::fs::create_dir_all(&data).expect("agent data dir");
    let store = gantry_agent::image::ImageStore::open(data.join("images")).expect("image store");
    for tag in [IMAGE, SPARE] {
        store
            .import(std::io::Cursor::new(busybox_image(tag)))
            .expect("importing the test image");
    }
    drop(store);
    let mut agent = Agent::start(&cluster.addr, &data);
    let limit = Duration::from_secs(30);
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });

    // ls: one image, both references, the node holding it.
    let list = cluster.json(&["image", "ls", "-o", "json"]);
    assert_eq!(list["kind"], "ImageList");
    assert_eq!(list["unavailable"], Value::Array(vec![]), "{list:#}");
    let items = list["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{list:#}");
    let image = &items[0];
    assert_eq!(
        image["references"],
        serde_json::json!([IMAGE, SPARE]),
        "{list:#}"
    );
    assert_eq!(image["nodes"], serde_json::json!(["node-a"]));
    assert!(image["sizeBytes"].as_u64().unwrap() > 100_000, "{list:#}");
    let digest = image["digest"].as_str().expect("digest").to_owned();
    assert!(digest.starts_with("sha256:"), "{digest}");
    let table = cluster.run(&["image", "ls", "--node", "node-a"]);
    let text = table.ok();
    assert!(text.starts_with("REFERENCE"), "{text}");
    assert!(
        text.contains(IMAGE) && text.contains(&digest[7..19]),
        "{text}"
    );

    // An instance uses the image: removing it, by either reference, is refused naming it.
    apply(
        &cluster,
        "user",
        &format!(
            "kind: Service\nname: user\nimage: {IMAGE}\nnetwork: none\nstopGracePeriod: 1s\n\
             command: [sleep, '3600']\n"
        ),
    );
    wait(&agent, "the instance is Ready", limit, || {
        instances(&cluster, "user")
            .first()
            .is_some_and(|i| i["state"] == "Ready")
    });
    let id = instances(&cluster, "user")[0]["name"]
        .as_str()
        .expect("instance name")
        .to_owned();
    for reference in [IMAGE, SPARE] {
        let refused = cluster.run(&["image", "rm", reference]);
        let err = refused.fails(1);
        assert!(
            err.contains(&id) && err.contains("node-a") && err.contains(reference),
            "{err}"
        );
    }
    assert_eq!(
        cluster.json(&["image", "ls", "-o", "json"])["items"][0]["references"],
        serde_json::json!([IMAGE, SPARE]),
        "nothing untagged"
    );

    // Unknown references and nodes: a clear error, exit code 1.
    let err = cluster.run(&["image", "rm", "gantry.test/nosuch:1"]);
    let err = err.fails(1);
    assert!(err.contains("nosuch") && err.contains("not found"), "{err}");
    let err = cluster.run(&["image", "ls", "--node", "nosuch"]);
    let err = err.fails(1);
    assert!(err.contains("nosuch") && err.contains("not found"), "{err}");

    // Once the instance is gone: a tag is untagged, then the digest removes the image.
    cluster.run(&["delete", "workload", "user"]).ok();
    wait(&agent, "every container removed", limit, || {
        agent.containers().is_empty()
    });
    // The container's hold on the image goes with its rootfs, just after the container.
    let mut untagged = None;
    wait(&agent, "the image is released and untagged", limit, || {
        let ran = cluster.run(&["image", "rm", SPARE]);
        let done = ran.code == 0;
        untagged = Some(ran);
        done
    });
    assert_eq!(
        untagged.expect("ran").ok(),
        format!("image {SPARE} removed from node-a\n")
    );
    assert_eq!(
        cluster.json(&["image", "ls", "-o", "json"])["items"][0]["references"],
        serde_json::json!([IMAGE])
    );
    let pruned = cluster.run(&["image", "prune"]);
    assert!(pruned.ok().contains("0 image(s) removed"), "{pruned:#?}");
    cluster.run(&["image", "rm", &digest]).ok();
    let empty = cluster.json(&["image", "ls", "-o", "json"]);
    assert_eq!(empty["items"], Value::Array(vec![]), "{empty:#}");

    agent.kill();
}
