//! Node sessions over mTLS, with certificates made in the test: an agent with a certificate
//! from the cluster's CA that names its node registers; one whose certificate comes from
//! another CA, and one whose certificate names another node, are refused. The CLI reaches the
//! same scheduler through its config file (CA, client certificate and key).
//!
//! Needs root (the agent opens its runtime); skipped without it on a laptop, failed under CI.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_scheduler::server::{Config, TlsFiles, run_with_store};
use gantry_scheduler::store::{EmbeddedStore, Store};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::Value;

fn can_run() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "the TLS tests need root (the agent opens its runtime)"
    );
    eprintln!("skipping: the TLS tests need root");
    false
}

/// A CA: its certificate (PEM) and what signs with it.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` (DNS SANs): (certificate PEM, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<String>>())
                .expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("writing a test file");
    path
}

/// A `gantry-agent run` process, killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
    data: PathBuf,
}

impl Agent {
    fn start(dir: &Path, name: &str, scheduler: &str, ca: &Path, cert: &Path, key: &Path) -> Agent {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("agent dir");
        let log = data.join("agent.log");
        let out = std::fs::File::create(&log).expect("agent log");
        let binary = Path::new(env!("CARGO_BIN_EXE_gantry")).with_file_name("gantry-agent");
        assert!(
            binary.exists(),
            "{binary:?} is missing: `cargo build -p gantry-agent`"
        );
        let child = Command::new(binary)
            .args(["run", "--name", name, "--scheduler", scheduler])
            .arg("--data-dir")
            .arg(&data)
            .arg("--ca")
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--cni-bridge")
            .arg(support::node::bridge_of(&data))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("starting gantry-agent");
        Agent { child, log, data }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let bridge = support::node::bridge_of(&self.data);
        support::node::cleanup_after_agent(&self.data, &bridge, None);
    }
}

#[test]
fn mtls_sessions_need_the_clusters_ca_and_a_certificate_naming_the_node() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    let cluster_ca = Ca::new("gantry test CA");
    let other_ca = Ca::new("some other CA");
    let ca = write(d, "ca.pem", &cluster_ca.pem);
    let (server_cert, server_key) = cluster_ca.issue(&["localhost"]);
    let issue = |ca: &Ca, file: &str, names: &[&str]| {
        let (cert, key) = ca.issue(names);
        (
            write(d, &format!("{file}.pem"), &cert),
            write(d, &format!("{file}.key"), &key),
        )
    };
    let good = issue(&cluster_ca, "node-a", &["node-a"]);
    let foreign = issue(&other_ca, "node-b", &["node-b"]);
    let borrowed = issue(&cluster_ca, "node-x", &["node-x"]);

    // The scheduler, serving mTLS.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (addr, stop) = runtime.block_on(async {
        let data = d.join("scheduler");
        std::fs::create_dir_all(&data).expect("scheduler dir");
        let store: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open(data.join("store.redb"))
                .await
                .expect("store"),
        );
        let mut config = Config::new("127.0.0.1:0".parse().expect("addr"), data);
        config.tls = Some(TlsFiles {
            cert: write(d, "server.pem", &server_cert),
            key: write(d, "server.key", &server_key),
            client_ca: Some(ca.clone()),
        });
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(run_with_store(
            config,
            store,
            async {
                let _ = stopped.await;
            },
            Some(bound_tx),
        ));
        (bound_rx.await.expect("bound"), stop)
    });
    let scheduler = format!("https://localhost:{}", addr.port());

    let a = Agent::start(d, "node-a", &scheduler, &ca, &good.0, &good.1);
    // Signed by another CA: the TLS handshake fails.
    let b = Agent::start(d, "node-b", &scheduler, &ca, &foreign.0, &foreign.1);
    // The cluster's CA, but the certificate names node-x: PERMISSION_DENIED.
    let c = Agent::start(d, "node-c", &scheduler, &ca, &borrowed.0, &borrowed.1);

    // The CLI, through its config file.
    let config = write(
        d,
        "gantry.yaml",
        &format!(
            "address: {scheduler}\nca: {}\ncert: {}\nkey: {}\n",
            ca.display(),
            good.0.display(),
            good.1.display()
        ),
    );
    let nodes = || -> Value {
        let out = support::gantry(d)
            .arg("--config")
            .arg(&config)
            .args(["get", "nodes", "-o", "json"])
            .output()
            .expect("gantry");
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let started = Instant::now();
    loop {
        let list = nodes();
        if list["items"][0]["name"] == "node-a" && list["items"][0]["status"] == "Ready" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node-a not Ready: {list}\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Give the refused agents time to try (and retry) before checking they never got in.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && !(c.log().contains("permission") || c.log().contains("PermissionDenied"))
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let names: Vec<Value> = nodes()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| n["name"].clone())
        .collect();
    assert_eq!(names, vec![Value::from("node-a")], "only node-a registered");
    assert!(
        c.log().contains("not valid for node node-c"),
        "node-c's agent says why it was refused:\n{}",
        c.log()
    );
    assert!(
        b.log().contains("session not opened") || b.log().contains("session lost"),
        "node-b's agent could not open a session:\n{}",
        b.log()
    );
    drop((a, b, c));
    let _ = stop.send(());
}
