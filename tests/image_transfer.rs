//! `gantry image import` and `gantry image pull` end to end: a real scheduler (in the test
//! process), a real `gantry-agent run` with an empty image store, and real containers.
//!
//! - a `docker save` tarball built here is uploaded through the scheduler, listed on the node,
//!   and runs (`gantry run --rm`); then an OCI layout directory (tarred by the CLI on the fly);
//!   a file that is no image archive fails naming the problem and leaves nothing in the
//!   scheduler's upload dir;
//! - a pull from Debian's `docker-registry` on 127.0.0.1 (filled by `skopeo`), and a missing
//!   tag failing with "not found".
//!
//! Needs root and busybox-static (and docker-registry and skopeo for the pull); skipped without
//! them on a laptop, failed under CI.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::Cluster;
use support::node::{Agent, busybox_image, can_run, wait};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const SKOPEO_BIN: &str = "/usr/bin/skopeo";

/// A cluster with one real agent (`node-a`) whose store starts empty.
fn node(cluster: &Cluster) -> Agent {
    let data = cluster.dir.path().join("agent");
    std::fs::create_dir_all(&data).expect("agent data dir");
    let agent = Agent::start(&cluster.addr, &data);
    wait(&agent, "the node is Ready", Duration::from_secs(30), || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });
    agent
}

/// The references of the images on the nodes.
fn references(cluster: &Cluster) -> Vec<String> {
    let list = cluster.json(&["image", "ls", "-o", "json"]);
    let mut refs: Vec<String> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .flat_map(|i| i["references"].as_array().cloned().unwrap_or_default())
        .map(|r| r.as_str().expect("reference").to_owned())
        .collect();
    refs.sort();
    refs
}

/// An OCI image layout directory of the busybox image tagged `tag` (the library's `save`,
/// unpacked, without Docker's `manifest.json`).
fn oci_layout(dir: &Path, tag: &str) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let store = gantry_agent::image::ImageStore::open(tmp.path().join("images")).expect("store");
    store
        .import(std::io::Cursor::new(busybox_image(tag)))
        .expect("importing the test image");
    let mut saved = Vec::new();
    store.save(tag, &mut saved).expect("saving the image");
    tar::Archive::new(saved.as_slice())
        .unpack(dir)
        .expect("unpacking the layout");
    let _ = std::fs::remove_file(dir.join("manifest.json"));
    assert!(dir.join("index.json").is_file(), "an OCI layout");
}

fn upload_dir_entries(cluster: &Cluster) -> Vec<String> {
    std::fs::read_dir(cluster.dir.path().join("scheduler/uploads"))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn archives_and_layouts_are_imported_through_the_scheduler() {
    if !can_run("image import") {
        return;
    }
    let cluster = Cluster::start(0);
    let mut agent = node(&cluster);

    // A docker save tarball: imported on node-a, listed, and a container runs from it.
    let tarball = cluster.dir.path().join("busybox.tar");
    std::fs::write(&tarball, busybox_image("gantry.test/imported:1")).expect("tarball");
    let out = cluster.run(&["image", "import", tarball.to_str().expect("utf-8")]);
    let text = out.ok();
    assert!(
        text.starts_with("node-a: imported gantry.test/imported:1 sha256:"),
        "{out:#?}"
    );
    assert_eq!(references(&cluster), ["gantry.test/imported:1"]);
    let ran = cluster.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "gantry.test/imported:1",
        "--",
        "/bin/true",
    ]);
    ran.ok();

    // An OCI layout directory, as JSON.
    let layout = cluster.dir.path().join("layout");
    oci_layout(&layout, "gantry.test/layout:2");
    let doc = cluster.json(&[
        "image",
        "import",
        "--node",
        "node-a",
        layout.to_str().expect("utf-8"),
        "-o",
        "json",
    ]);
    assert_eq!(doc["kind"], "ImportResult", "{doc:#}");
    assert_eq!(doc["items"][0]["node"], "node-a", "{doc:#}");
    assert_eq!(doc["items"][0]["ok"], true, "{doc:#}");
    assert!(
        references(&cluster).contains(&"gantry.test/layout:2".to_owned()),
        "{:?}",
        references(&cluster)
    );

    // Not an image archive: the agent's reason, exit code 1, nothing left behind.
    let junk = cluster.file("junk.tar", "this is not a tarball at all\n");
    let out = cluster.run(&["image", "import", junk.to_str().expect("utf-8")]);
    let err = out.fails(1);
    assert!(
        err.contains("node-a") && err.contains("importing the archive"),
        "{err}"
    );
    assert_eq!(upload_dir_entries(&cluster), Vec::<String>::new());
    assert!(
        std::fs::read_dir(cluster.dir.path().join("agent/uploads"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "the agent keeps no upload"
    );

    // Bad input caught before any upload.
    let out = cluster.run(&["image", "import", "/nonexistent/image.tar"]);
    let err = out.fails(1);
    assert!(err.contains("cannot read /nonexistent/image.tar"), "{err}");
    let out = cluster.run(&[
        "image",
        "import",
        "--node",
        "nosuch",
        tarball.to_str().unwrap(),
    ]);
    let err = out.fails(1);
    assert!(err.contains("nosuch") && err.contains("not found"), "{err}");
    assert_eq!(upload_dir_entries(&cluster), Vec::<String>::new());

    agent.kill();
}

/// Debian's registry on a free loopback port, storage in `dir`; killed on drop.
struct Registry {
    child: Child,
    addr: String,
}

/// A bcrypt hash (cost 4) of `pa55word`, for a registry behind htpasswd basic auth.
const HTPASSWD: &str = "gantry:$2a$04$/jWaCGFp1/MOAaFkz8K8J.TehkystgyN9jwCOwcNlvLKMgs56DVZC\n";

impl Registry {
    fn start(dir: &Path) -> Registry {
        Self::start_with(dir, "")
    }

    /// A registry whose configuration ends with `auth` (an `auth:` YAML section, or nothing).
    fn start_with(dir: &Path, auth: &str) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    \
                 rootdirectory: {}\nhttp:\n  addr: {addr}\n{auth}",
                dir.join("registry").display()
            ),
        )
        .expect("registry config");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting docker-registry");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Registry { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_import_over_the_upload_limit_is_refused_and_leaves_nothing() {
    // No container runs here: one simulated node is enough for the import to be accepted.
    let cluster = Cluster::start_configured(1, |c| c.max_upload_bytes = 1024);
    let archive = cluster.dir.path().join("big.tar");
    std::fs::write(&archive, vec![b'x'; 4096]).expect("writing the archive");
    let path = archive.to_str().expect("utf-8 path");

    // A file announces its size: refused before a byte is spooled.
    let ran = cluster.run(&["image", "import", path]);
    assert_eq!(ran.code, 1, "{ran:#?}");
    assert!(
        ran.stderr
            .contains("larger than the scheduler's upload limit of 1024 bytes"),
        "{ran:#?}"
    );
    assert!(ran.stderr.contains("--max-upload-size"), "{ran:#?}");

    // Standard input announces nothing: refused once the spool passes the limit.
    let out = cluster
        .gantry()
        .args(["image", "import", "-"])
        .write_stdin(vec![b'x'; 4096])
        .output()
        .expect("running gantry");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("upload limit of 1024 bytes"), "{stderr}");
    assert!(
        upload_dir_entries(&cluster).is_empty(),
        "{:?}",
        upload_dir_entries(&cluster)
    );
}

#[test]
fn images_are_pulled_from_a_registry_through_the_scheduler() {
    if !can_run("image pull") {
        return;
    }
    let missing = [REGISTRY_BIN, SKOPEO_BIN]
        .into_iter()
        .find(|tool| !Path::new(tool).exists());
    if let Some(tool) = missing {
        assert!(
            std::env::var_os("CI").is_none(),
            "image pull tests need {tool}"
        );
        eprintln!("skipping: image pull tests need {tool}");
        return;
    }
    let cluster = Cluster::start(0);
    let registry = Registry::start(cluster.dir.path());
    let layout = cluster.dir.path().join("layout");
    oci_layout(&layout, "gantry.test/pushed:1");
    let pushed = Command::new(SKOPEO_BIN)
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
        ])
        .arg(format!("oci:{}", layout.display()))
        .arg(format!("docker://{}/test/busybox:1", registry.addr))
        .env("HOME", cluster.dir.path())
        .output()
        .expect("running skopeo");
    assert!(
        pushed.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let mut agent = node(&cluster);

    let reference = format!("{}/test/busybox:1", registry.addr);
    let out = cluster.run(&["image", "pull", &reference]);
    let text = out.ok();
    assert!(
        text.starts_with(&format!("node-a: pulled {reference} sha256:")),
        "{out:#?}"
    );
    assert_eq!(references(&cluster), [reference.as_str()]);
    let doc = cluster.json(&[
        "image", "pull", "--node", "node-a", &reference, "-o", "json",
    ]);
    assert_eq!(doc["kind"], "PullResult", "{doc:#}");
    assert_eq!(doc["items"][0]["ok"], true, "{doc:#}");

    let missing = format!("{}/test/busybox:nosuch", registry.addr);
    let out = cluster.run(&["image", "pull", &missing]);
    let err = out.fails(1);
    assert!(err.contains("node-a") && err.contains("not found"), "{err}");

    agent.kill();
}

/// The paths of a `docker save` tarball's entries, sorted.
fn tar_entries(path: &Path) -> Vec<String> {
    let file = std::fs::File::open(path).expect("opening the tarball");
    let mut names: Vec<String> = tar::Archive::new(file)
        .entries()
        .expect("a tarball")
        .map(|e| {
            e.expect("an entry")
                .path()
                .expect("a path")
                .display()
                .to_string()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn images_are_tagged_and_saved_through_the_scheduler() {
    if !can_run("image tag and save") {
        return;
    }
    let cluster = Cluster::start(0);
    let mut agent = node(&cluster);
    let tarball = cluster.dir.path().join("busybox.tar");
    std::fs::write(&tarball, busybox_image("gantry.test/tagme:1")).expect("tarball");
    cluster
        .run(&["image", "import", tarball.to_str().expect("utf-8")])
        .ok();

    // Tag: both references name the same image on node-a.
    let out = cluster.run(&[
        "image",
        "tag",
        "gantry.test/tagme:1",
        "gantry.test/tagged:2",
    ]);
    let text = out.ok();
    assert!(
        text.starts_with("node-a: tagged gantry.test/tagme:1 as gantry.test/tagged:2"),
        "{out:#?}"
    );
    let list = cluster.json(&["image", "ls", "-o", "json"]);
    assert_eq!(
        list["items"].as_array().expect("items").len(),
        1,
        "{list:#}"
    );
    assert_eq!(
        list["items"][0]["references"],
        serde_json::json!(["gantry.test/tagged:2", "gantry.test/tagme:1"]),
        "{list:#}"
    );
    assert_eq!(list["items"][0]["nodes"], serde_json::json!(["node-a"]));
    let doc = cluster.json(&[
        "image",
        "tag",
        "--node",
        "node-a",
        "gantry.test/tagme:1",
        "gantry.test/tagged:3",
        "-o",
        "json",
    ]);
    assert_eq!(doc["kind"], "TagResult", "{doc:#}");
    assert_eq!(doc["tagged"][0]["node"], "node-a", "{doc:#}");
    assert_eq!(doc["tagged"][0]["digest"], list["items"][0]["digest"]);
    cluster.run(&["image", "rm", "gantry.test/tagged:3"]).ok();

    // Tagging an image no node holds, or to a bad reference.
    let out = cluster.run(&["image", "tag", "gantry.test/nosuch:1", "gantry.test/x:1"]);
    let err = out.fails(1);
    assert!(
        err.contains("image gantry.test/nosuch:1 not found on any node"),
        "{err}"
    );
    let out = cluster.run(&["image", "tag", "gantry.test/tagme:1", "Bad Reference!"]);
    let err = out.fails(1);
    assert!(
        err.contains("node-a") && err.contains("Bad Reference!"),
        "{err}"
    );

    // Save to a file: a docker save tarball, and no temp file left.
    let saved = cluster.dir.path().join("saved.tar");
    let saved_str = saved.to_str().expect("utf-8");
    let out = cluster.run(&["image", "save", "gantry.test/tagme:1", "-o", saved_str]);
    out.ok();
    assert!(
        out.stderr.contains("node-a: saved gantry.test/tagme:1"),
        "{out:#?}"
    );
    let entries = tar_entries(&saved);
    for expected in ["index.json", "manifest.json", "oci-layout"] {
        assert!(entries.iter().any(|e| e == expected), "{entries:?}");
    }
    assert!(!Path::new(&format!("{saved_str}.tmp")).exists());

    // The same bytes on stdout when it is no terminal.
    let piped = cluster
        .gantry()
        .args(["image", "save", "gantry.test/tagme:1", "-o", "-"])
        .output()
        .expect("running gantry");
    assert!(piped.status.success(), "{piped:#?}");
    assert_eq!(
        piped.stdout,
        std::fs::read(&saved).expect("the saved tarball"),
        "the tarball on stdout differs from the file"
    );

    // The saved file brings the image back after it is removed, and runs.
    cluster.run(&["image", "rm", "gantry.test/tagged:2"]).ok();
    cluster.run(&["image", "rm", "gantry.test/tagme:1"]).ok();
    assert_eq!(references(&cluster), Vec::<String>::new());
    cluster.run(&["image", "import", saved_str]).ok();
    assert!(
        references(&cluster).contains(&"gantry.test/tagme:1".to_owned()),
        "{:?}",
        references(&cluster)
    );
    cluster
        .run(&[
            "run",
            "--rm",
            "--network",
            "none",
            "gantry.test/tagme:1",
            "--",
            "/bin/true",
        ])
        .ok();

    // Saving an image no node holds fails and leaves neither the file nor its temp file.
    let missing = cluster.dir.path().join("missing.tar");
    let missing_str = missing.to_str().expect("utf-8");
    let out = cluster.run(&["image", "save", "gantry.test/nosuch:1", "-o", missing_str]);
    let err = out.fails(1);
    assert!(
        err.contains("image gantry.test/nosuch:1 not found on any node"),
        "{err}"
    );
    assert!(!missing.exists(), "a failed save leaves no file");
    assert!(!Path::new(&format!("{missing_str}.tmp")).exists());
    assert_eq!(
        std::fs::read_dir(cluster.dir.path().join("agent/saves"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the agent keeps no saved tarball"
    );

    agent.kill();
}

/// Whether the registry tools are here (skips on a laptop, fails under CI).
fn have_registry_tools(what: &str) -> bool {
    let missing = [REGISTRY_BIN, SKOPEO_BIN]
        .into_iter()
        .find(|tool| !Path::new(tool).exists());
    match missing {
        None => true,
        Some(tool) => {
            assert!(std::env::var_os("CI").is_none(), "{what} tests need {tool}");
            eprintln!("skipping: {what} tests need {tool}");
            false
        }
    }
}

#[test]
fn images_are_pushed_to_a_registry_through_the_scheduler() {
    if !can_run("image push") || !have_registry_tools("image push") {
        return;
    }
    let cluster = Cluster::start(0);
    let registry = Registry::start(cluster.dir.path());
    let mut agent = node(&cluster);
    let tarball = cluster.dir.path().join("busybox.tar");
    std::fs::write(&tarball, busybox_image("gantry.test/pushme:1")).expect("tarball");
    cluster
        .run(&["image", "import", tarball.to_str().expect("utf-8")])
        .ok();
    let reference = format!("{}/test/pushed:1", registry.addr);
    cluster
        .run(&["image", "tag", "gantry.test/pushme:1", &reference])
        .ok();

    let out = cluster.run(&["image", "push", &reference]);
    let text = out.ok();
    let prefix = format!("node-a: pushed {reference} ");
    assert!(text.starts_with(&prefix), "{out:#?}");
    let digest = text[prefix.len()..]
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned();
    assert!(digest.starts_with("sha256:"), "{text}");
    assert!(text.contains("already present"), "{text}");

    // Again: the registry has every blob.
    let doc = cluster.json(&[
        "image", "push", "--node", "node-a", &reference, "-o", "json",
    ]);
    assert_eq!(doc["kind"], "PushResult", "{doc:#}");
    assert_eq!(doc["digest"], digest.as_str(), "{doc:#}");
    assert_eq!(doc["pushedBlobs"], 0, "{doc:#}");
    assert!(doc["existingBlobs"].as_u64().unwrap_or(0) >= 2, "{doc:#}");

    // Pulled back after removal: the same digest.
    cluster.run(&["image", "rm", &reference]).ok();
    let out = cluster.run(&["image", "pull", &reference]);
    let text = out.ok();
    assert!(
        text.starts_with(&format!("node-a: pulled {reference} {digest}")),
        "{out:#?}"
    );

    // An image no node holds; a registry that does not answer.
    let missing = format!("{}/test/nosuch:1", registry.addr);
    let out = cluster.run(&["image", "push", &missing]);
    let err = out.fails(1);
    assert!(
        err.contains(&format!("image {missing} not found on any node")),
        "{err}"
    );
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let nowhere = format!("127.0.0.1:{closed}/test/pushed:1");
    cluster
        .run(&["image", "tag", "gantry.test/pushme:1", &nowhere])
        .ok();
    let out = cluster.run(&["image", "push", &nowhere]);
    let err = out.fails(1);
    assert!(
        err.contains("node-a") && err.contains(&format!("registry 127.0.0.1:{closed}")),
        "{err}"
    );
    assert!(!err.contains("cannot reach the scheduler"), "{err}");

    // A registry behind basic auth refuses the agent's anonymous push: the error names it.
    let private_dir = cluster.dir.path().join("private");
    std::fs::create_dir_all(&private_dir).expect("registry dir");
    let htpasswd = private_dir.join("htpasswd");
    std::fs::write(&htpasswd, HTPASSWD).expect("htpasswd");
    let private = Registry::start_with(
        &private_dir,
        &format!(
            "auth:\n  htpasswd:\n    realm: gantry-test\n    path: {}\n",
            htpasswd.display()
        ),
    );
    let guarded = format!("{}/private/busybox:1", private.addr);
    cluster
        .run(&["image", "tag", "gantry.test/pushme:1", &guarded])
        .ok();
    let out = cluster.run(&["image", "push", &guarded]);
    let err = out.fails(1);
    assert!(
        err.contains("node-a")
            && err.contains(&format!("registry {}", private.addr))
            && err.contains("401"),
        "{err}"
    );

    agent.kill();
}
