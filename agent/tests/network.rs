//! Container networking against the real CNI plugins (Debian's containernetworking-plugins):
//! addresses and reachability between two container namespaces, published ports from the host,
//! cleanup after DEL (veths, host-local's store, iptables/nftables rules, namespace mounts),
//! failures that undo themselves, DEL after an agent restart, and host-gateway routes in a
//! namespace. Each test has its own bridge, subnet and directories, and tears them down even when
//! it fails. Needs root; skipped without it on a laptop, failed under CI.

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gantry_agent::network::cni::CniError;
use gantry_agent::network::netns;
use gantry_agent::network::routes::{NodeRoute, RouteTable};
use gantry_agent::network::{
    Attachment, Network, NetworkConfig, NetworkError, PortMapping, Protocol, default_conflist,
};
use ipnet::{IpNet, Ipv4Net};
use serde_json::{Value, json};

const PLUGIN_DIR: &str = "/usr/lib/cni";

/// Whether the environment can run these tests; under CI a missing piece is a failure.
fn can_run() -> bool {
    let plugin = ["bridge", "host-local", "portmap", "firewall", "loopback"]
        .into_iter()
        .find(|p| !Path::new(PLUGIN_DIR).join(p).exists());
    let tool = ["ip", "iptables-save", "nft"]
        .into_iter()
        .find(|t| Command::new(t).arg("-V").output().is_err());
    let missing = if !rustix::process::geteuid().is_root() {
        Some("root".to_owned())
    } else if let Some(p) = plugin {
        Some(format!("the {p} CNI plugin (containernetworking-plugins)"))
    } else {
        tool.map(|t| format!("{t} (iproute2, iptables, nftables)"))
    };
    match missing {
        None => true,
        Some(what) if std::env::var_os("CI").is_some() => {
            panic!("network tests need {what}; .ci/run should have provided it")
        }
        Some(what) => {
            eprintln!("skipping: network tests need {what}");
            false
        }
    }
}

/// One test's network: its own bridge, subnet, conflist and directories. Dropping it detaches
/// every container it named, removes leftover namespaces and rules, and deletes the bridge.
struct Env {
    tmp: tempfile::TempDir,
    bridge: String,
    subnet: Ipv4Net,
    config: NetworkConfig,
    tag: String,
    ids: Mutex<Vec<String>>,
}

impl Env {
    /// The default conflist, with a bridge and subnet unique to test `n` of this process.
    fn new(n: u8) -> Env {
        Env::with_conflist(n, |_| {})
    }

    fn with_conflist(n: u8, tweak: impl FnOnce(&mut Value)) -> Env {
        let pid = std::process::id();
        let tmp = tempfile::tempdir().unwrap();
        let bridge = format!("gt{}n{n}", pid % 100_000);
        let subnet = Ipv4Net::new(Ipv4Addr::new(10, 100 + (pid % 100) as u8, n, 0), 24).unwrap();
        let mut conflist = default_conflist(IpNet::V4(subnet), &bridge, &tmp.path().join("ipam"));
        tweak(&mut conflist);
        let path = tmp.path().join("net.conflist");
        std::fs::write(&path, serde_json::to_vec_pretty(&conflist).unwrap()).unwrap();
        let mut config = NetworkConfig::new(path, tmp.path().join("data"), tmp.path().join("run"));
        config.plugin_dirs = vec![PathBuf::from(PLUGIN_DIR)];
        config.plugin_timeout = Duration::from_secs(20);
        Env {
            tmp,
            bridge,
            subnet,
            config,
            tag: format!("gt-{pid}-{n}"),
            ids: Mutex::new(Vec::new()),
        }
    }

    /// A container id unique to this test, remembered for teardown.
    fn id(&self, name: &str) -> String {
        let id = format!("{}-{name}", self.tag);
        self.ids.lock().unwrap().push(id.clone());
        id
    }

    async fn network(&self) -> Network {
        Network::new(self.config.clone()).await.unwrap()
    }

    fn ipam_store(&self) -> PathBuf {
        self.tmp.path().join("ipam").join("gantry")
    }

    fn gateway(&self) -> Ipv4Addr {
        self.subnet.hosts().next().unwrap()
    }

    /// Asserts that nothing of container `id` is left: namespace, cache, veth, address, rules.
    fn assert_clean(&self, id: &str, attached: Option<&Attachment>) {
        let netns = self.config.run_dir.join("netns").join(id);
        assert!(!netns.exists(), "{} left behind", netns.display());
        let cache = self.config.data_dir.join("cni/results");
        for entry in std::fs::read_dir(&cache).into_iter().flatten() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains(id), "cache record {name} left behind");
        }
        // The interfaces die with the namespace, asynchronously: give the kernel a moment.
        let brif = PathBuf::from(format!("/sys/class/net/{}/brif", self.bridge));
        let host_veth = attached.and_then(|a| {
            a.result
                .interfaces
                .iter()
                .find(|i| !i.in_container() && i.name != self.bridge)
                .map(|i| i.name.clone())
        });
        eventually(|| {
            if let Some(veth) = &host_veth
                && Path::new("/sys/class/net").join(veth).exists()
            {
                return Err(format!("{veth} still there"));
            }
            // Without an attachment to look at (a failed attach), the bridge must be empty.
            let ports = std::fs::read_dir(&brif).map_or(0, |d| d.count());
            if attached.is_none() && ports > 0 {
                return Err(format!("{ports} ports left on {}", self.bridge));
            }
            Ok(())
        });
        for entry in std::fs::read_dir(self.ipam_store()).into_iter().flatten() {
            let path = entry.unwrap().path();
            let content = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                !content.contains(id),
                "host-local still holds {} for {id}",
                path.display()
            );
        }
        let mut needles = vec![id.to_owned()];
        match attached {
            Some(a) => needles.push(format!("{}/", a.ip.addr())),
            // Without an address, nothing of this test's subnet may remain.
            None => needles.push(self.subnet_prefix()),
        }
        let rules = rules();
        for needle in &needles {
            assert!(
                !rules.contains(needle.as_str()),
                "rules mentioning {needle} left behind:\n{}",
                rules
                    .lines()
                    .filter(|l| l.contains(needle.as_str()))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }

    /// "10.x.y." — the text every address of this test's subnet starts with.
    fn subnet_prefix(&self) -> String {
        let [a, b, c, _] = self.subnet.network().octets();
        format!("{a}.{b}.{c}.")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        let config = self.config.clone();
        let detach_ids = ids.clone();
        // Detach on a thread of its own: this may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(network) = Network::new(config.clone()).await {
                    for id in &detach_ids {
                        let _ = network.detach(id).await;
                    }
                }
                let dir = config.run_dir.join("netns");
                for name in netns::list(&dir).await.unwrap_or_default() {
                    let _ = netns::remove(&dir.join(name)).await;
                }
            });
        })
        .join();
        // Whatever a failed DEL left: rules naming our containers or subnet.
        let mut needles = ids;
        needles.push(self.subnet_prefix());
        purge_rules(&needles);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// iptables (all tables) and nftables rules as text.
fn rules() -> String {
    let mut text = String::new();
    for cmd in [&["iptables-save"][..], &["nft", "list", "ruleset"][..]] {
        let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    text
}

/// Deletes the iptables rules whose text contains one of `needles`, and the per-container chains
/// they jump to (teardown after a failed DEL).
fn purge_rules(needles: &[String]) {
    let Ok(out) = Command::new("iptables-save").output() else {
        return;
    };
    let mut table = String::new();
    let mut chains = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.to_owned();
        } else if let Some(rule) = line.strip_prefix("-A ")
            && needles.iter().any(|n| rule.contains(n.as_str()))
        {
            let words = split_words(rule);
            // Per-container chains are CNI-<hash> (bridge) and CNI-DN-<hash> (portmap); the
            // shared ones (CNI-HOSTPORT-*, CNI-FORWARD, CNI-ADMIN) stay.
            if let Some(target) = words.iter().skip_while(|w| *w != "-j").nth(1)
                && (target.starts_with("CNI-DN-")
                    || target
                        .strip_prefix("CNI-")
                        .is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit())))
            {
                chains.push((table.clone(), target.clone()));
            }
            let _ = Command::new("iptables")
                .args(["-w", "-t", &table, "-D"])
                .args(words)
                .output();
        }
    }
    for (table, chain) in chains {
        for op in ["-F", "-X"] {
            let _ = Command::new("iptables")
                .args(["-w", "-t", &table, op, &chain])
                .output();
        }
    }
}

/// Splits an iptables-save rule into words, honouring its double quotes and backslash escapes.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for c in line.chars() {
        if escaped {
            word.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
            any = true;
        } else if c == ' ' && !quoted {
            if any || !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            any = false;
        } else {
            word.push(c);
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
}

/// Retries `check` for up to 3 s.
fn eventually(mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A TCP listener inside a namespace that answers each connection with `reply` and closes it.
fn serve_in(netns: &Path, port: u16, reply: &'static [u8]) -> SocketAddr {
    let listener = netns::run_in_blocking(netns, move || TcpListener::bind(("0.0.0.0", port)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(reply);
        }
    });
    addr
}

/// Connects to `to` (from inside `netns` when given) and reads what the server says.
fn fetch(netns: Option<&Path>, to: SocketAddr) -> std::io::Result<Vec<u8>> {
    let get = move || {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        conn.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf)?;
        Ok(buf)
    };
    match netns {
        Some(ns) => netns::run_in_blocking(ns, get).unwrap(),
        None => get(),
    }
}

/// A port nothing on the host listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn two_containers_get_addresses_and_reach_each_other() {
    if !can_run() {
        return;
    }
    let env = Env::new(1);
    let net = env.network().await;
    net.validate().await.unwrap();
    let (a, b) = (env.id("a"), env.id("b"));
    let at_a = net.attach(&a, &[]).await.unwrap();
    let at_b = net.attach(&b, &[]).await.unwrap();
    assert_eq!(at_a.netns_path, net.netns_path(&a));

    for at in [&at_a, &at_b] {
        let IpAddr::V4(ip) = at.ip.addr() else {
            panic!("not IPv4: {at:?}")
        };
        assert!(env.subnet.contains(&ip), "{ip} outside {}", env.subnet);
        assert_eq!(at.ip.prefix_len(), 24);
        assert_eq!(at.gateway, Some(IpAddr::V4(env.gateway())));
        assert_eq!(at.interface, "eth0");
        assert_eq!(
            at.netns_path.parent(),
            Some(env.config.run_dir.join("netns").as_path())
        );
        assert!(netns::exists(&at.netns_path).await);
    }
    assert_ne!(at_a.ip, at_b.ip);
    // host-local recorded each address for its container.
    let held = std::fs::read_to_string(env.ipam_store().join(at_a.ip.addr().to_string())).unwrap();
    assert!(held.contains(&a), "{held:?}");

    // Loopback is up inside, and the containers reach each other through the bridge.
    let lo = serve_in(&at_a.netns_path, 7000, b"from a");
    assert_eq!(
        fetch(
            Some(&at_a.netns_path),
            SocketAddr::new("127.0.0.1".parse().unwrap(), lo.port())
        )
        .unwrap(),
        b"from a"
    );
    let to_a = SocketAddr::new(at_a.ip.addr(), 7000);
    assert_eq!(fetch(Some(&at_b.netns_path), to_a).unwrap(), b"from a");
    serve_in(&at_b.netns_path, 7001, b"from b");
    let to_b = SocketAddr::new(at_b.ip.addr(), 7001);
    assert_eq!(fetch(Some(&at_a.netns_path), to_b).unwrap(), b"from b");

    net.check(&a).await.unwrap();
    assert_eq!(
        net.attached().await.unwrap(),
        BTreeSet::from([a.clone(), b.clone()])
    );

    net.detach(&a).await.unwrap();
    env.assert_clean(&a, Some(&at_a));
    // b is untouched by a's detach.
    net.check(&b).await.unwrap();
    net.detach(&b).await.unwrap();
    env.assert_clean(&b, Some(&at_b));
    // DEL twice, and DEL of what never was, are fine.
    net.detach(&a).await.unwrap();
    net.detach(&env.id("never")).await.unwrap();
    assert!(net.attached().await.unwrap().is_empty());
    assert!(matches!(
        net.check(&a).await,
        Err(NetworkError::NotAttached { .. })
    ));
}

#[tokio::test]
async fn a_published_port_is_reachable_on_localhost_and_the_gateway() {
    if !can_run() {
        return;
    }
    let env = Env::new(2);
    let net = env.network().await;
    let web = env.id("web");
    let host_port = free_port();
    let ports = [PortMapping {
        host_port,
        container_port: 80,
        protocol: Protocol::Tcp,
        host_ip: None,
    }];
    let at = net.attach(&web, &ports).await.unwrap();
    serve_in(&at.netns_path, 80, b"hello from port 80");

    let localhost = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), host_port);
    assert_eq!(fetch(None, localhost).unwrap(), b"hello from port 80");
    let gateway = SocketAddr::new(IpAddr::V4(env.gateway()), host_port);
    assert_eq!(fetch(None, gateway).unwrap(), b"hello from port 80");
    // portmap's rules name the container.
    assert!(rules().contains(&web), "no portmap rule for {web}");

    net.detach(&web).await.unwrap();
    env.assert_clean(&web, Some(&at));
    assert!(
        fetch(None, localhost).is_err(),
        "the port is still published"
    );
}

#[tokio::test]
async fn a_missing_plugin_fails_clearly_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let env = Env::with_conflist(3, |list| {
        list["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "gantry-no-such-plugin"}));
    });
    let net = env.network().await;
    assert!(matches!(
        net.validate().await,
        Err(NetworkError::Load { .. })
    ));
    let id = env.id("c");
    let err = net.attach(&id, &[]).await.unwrap_err();
    match &err {
        NetworkError::Attach {
            source: CniError::PluginNotFound { plugin, .. },
            cleanup: None,
            ..
        } => assert_eq!(plugin, "gantry-no-such-plugin"),
        other => panic!("unexpected {other:?}"),
    }
    let chain = error_chain(&err);
    assert!(
        chain.contains("\"gantry-no-such-plugin\" not found in /usr/lib/cni"),
        "{chain}"
    );
    env.assert_clean(&id, None);
}

#[tokio::test]
async fn a_plugin_error_is_surfaced_and_leaves_nothing() {
    if !can_run() {
        return;
    }
    let env = Env::with_conflist(4, |list| {
        list["plugins"][0]["ipam"]["ranges"] = json!([[{"subnet": "10.300.0.0/24"}]]);
    });
    let net = env.network().await;
    let id = env.id("c");
    let err = net.attach(&id, &[]).await.unwrap_err();
    match &err {
        NetworkError::Attach {
            source: CniError::Plugin { plugin, msg, .. },
            ..
        } => {
            assert_eq!(plugin, "bridge");
            assert!(msg.contains("10.300.0.0"), "{msg}");
        }
        other => panic!("unexpected {other:?}"),
    }
    let chain = error_chain(&err);
    assert!(chain.contains("cni plugin bridge ADD failed"), "{chain}");
    env.assert_clean(&id, None);
}

#[tokio::test]
async fn detach_after_a_restart_works_from_the_cache() {
    if !can_run() {
        return;
    }
    let env = Env::new(5);
    let id = env.id("c");
    let at = env
        .network()
        .await
        .attach(
            &id,
            &[PortMapping {
                host_port: free_port(),
                container_port: 80,
                protocol: Protocol::Tcp,
                host_ip: None,
            }],
        )
        .await
        .unwrap();

    // The agent restarts, and meanwhile its conflist changed into one that could not undo
    // anything: DEL must run what ADD ran, from the cache.
    std::fs::write(
        &env.config.conflist,
        serde_json::to_vec(&json!({
            "cniVersion": "1.0.0",
            "name": "gantry",
            "plugins": [{"type": "gantry-gone"}],
        }))
        .unwrap(),
    )
    .unwrap();
    let restarted = env.network().await;
    assert_eq!(
        restarted.attached().await.unwrap(),
        BTreeSet::from([id.clone()])
    );
    // No CHECK here: Debian's portmap (1.1.1) fails CHECK of an IPv4-only container with ports
    // by looking for IPv6 rules (containernetworking/plugins#819); CHECK after a restart is
    // covered by the cleanup test.
    restarted.detach(&id).await.unwrap();
    env.assert_clean(&id, Some(&at));
}

#[tokio::test]
async fn cleanup_after_a_restart_detaches_what_is_not_kept() {
    if !can_run() {
        return;
    }
    let env = Env::new(6);
    let (keep, stale) = (env.id("keep"), env.id("stale"));
    let net = env.network().await;
    net.attach(&keep, &[]).await.unwrap();
    let at_stale = net.attach(&stale, &[]).await.unwrap();
    drop(net);

    let restarted = env.network().await;
    let report = restarted
        .cleanup_stale(&HashSet::from([keep.clone()]))
        .await
        .unwrap();
    assert_eq!(report.detached, std::slice::from_ref(&stale));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    env.assert_clean(&stale, Some(&at_stale));
    restarted.check(&keep).await.unwrap();
    restarted.detach(&keep).await.unwrap();
}

#[tokio::test]
async fn check_notices_a_lost_route() {
    if !can_run() {
        return;
    }
    let env = Env::new(7);
    let net = env.network().await;
    let id = env.id("c");
    let at = net.attach(&id, &[]).await.unwrap();
    net.check(&id).await.unwrap();
    let out = netns::run_in(&at.netns_path, || {
        Command::new("ip")
            .args(["route", "del", "default"])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(out.status.success());
    let err = net.check(&id).await.unwrap_err();
    assert!(
        matches!(
            &err,
            NetworkError::Check {
                source: CniError::Plugin { .. },
                ..
            }
        ),
        "{err:?}"
    );
    net.detach(&id).await.unwrap();
    env.assert_clean(&id, Some(&at));
}

#[tokio::test]
async fn routes_to_other_nodes_are_installed_replaced_and_removed() {
    if !can_run() {
        return;
    }
    let env = Env::new(8);
    let ns = env.config.run_dir.join("netns").join(env.id("routes"));
    netns::create(&ns).await.unwrap();
    let ip = |args: &'static [&'static str]| {
        let out = netns::run_in_blocking(&ns, move || Command::new("ip").args(args).output())
            .unwrap()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A "node" with one link, and a route that is not Gantry's.
    ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]);
    ip(&["addr", "add", "192.168.77.1/24", "dev", "v0"]);
    ip(&["link", "set", "v1", "up"]);
    ip(&["link", "set", "v0", "up"]);
    ip(&["route", "add", "10.99.0.0/24", "via", "192.168.77.50"]);

    let route = |subnet: &str, via: &str| NodeRoute {
        subnet: subnet.parse().unwrap(),
        via: via.parse().unwrap(),
    };
    let table = RouteTable::in_netns(ns.clone());
    let two = BTreeSet::from([
        route("10.88.2.0/24", "192.168.77.2"),
        route("10.88.3.0/24", "192.168.77.3"),
    ]);
    assert_eq!(table.sync(&two).await.unwrap().len(), 2);
    assert_eq!(table.observed().await.unwrap(), two);
    assert!(
        table.sync(&two).await.unwrap().is_empty(),
        "sync is idempotent"
    );

    let moved = BTreeSet::from([route("10.88.2.0/24", "192.168.77.22")]);
    table.sync(&moved).await.unwrap();
    assert_eq!(table.observed().await.unwrap(), moved);
    let shown = ip(&["route", "show"]);
    assert!(shown.contains("10.88.2.0/24 via 192.168.77.22"), "{shown}");
    assert!(!shown.contains("10.88.3.0/24"), "{shown}");

    table.sync(&BTreeSet::new()).await.unwrap();
    assert!(table.observed().await.unwrap().is_empty());
    let shown = ip(&["route", "show"]);
    assert!(
        shown.contains("10.99.0.0/24 via 192.168.77.50"),
        "a foreign route went: {shown}"
    );
    netns::remove(&ns).await.unwrap();
    assert!(!ns.exists());
}

/// The error and its sources, one per line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(&format!("\n{e}"));
        source = e.source();
    }
    text
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A namespace standing for a host outside the node, behind a veth of its own /30; removed on
/// drop.
struct Outside {
    name: String,
    host_end: String,
    /// The bridge whose node rules the test wrote (removed here too, should the test fail).
    bridge: String,
}

impl Drop for Outside {
    fn drop(&mut self) {
        for (table, parent, chain) in [
            ("nat", "POSTROUTING", format!("GANTRY-NAT-{}", self.bridge)),
            ("filter", "FORWARD", format!("GANTRY-FWD-{}", self.bridge)),
        ] {
            for args in [
                &["-t", table, "-D", parent, "-j", &chain][..],
                &["-t", table, "-F", &chain],
                &["-t", table, "-X", &chain],
            ] {
                let _ = Command::new("iptables").arg("-w").args(args).output();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[tokio::test]
async fn node_rules_masquerade_traffic_leaving_the_subnet_and_go_away_on_remove() {
    use gantry_agent::network::rules;
    if !can_run() {
        return;
    }
    let env = Env::new(9);
    let pid = std::process::id();
    let octet = (100 + pid % 100) as u8;
    let outside = Outside {
        name: format!("gt{}out", pid % 100_000),
        host_end: format!("gt{}o0", pid % 100_000),
        bridge: env.bridge.clone(),
    };
    let inside_end = format!("gt{}o1", pid % 100_000);
    let (host_addr, outside_addr) = (
        Ipv4Addr::new(10, octet, 209, 1),
        Ipv4Addr::new(10, octet, 209, 2),
    );
    ip(&["netns", "add", &outside.name]);
    ip(&[
        "link",
        "add",
        &outside.host_end,
        "type",
        "veth",
        "peer",
        "name",
        &inside_end,
        "netns",
        &outside.name,
    ]);
    ip(&[
        "addr",
        "add",
        &format!("{host_addr}/30"),
        "dev",
        &outside.host_end,
    ]);
    ip(&["link", "set", &outside.host_end, "up"]);
    let in_outside = |args: &[&str]| {
        let mut all = vec!["-n", outside.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    };
    in_outside(&[
        "addr",
        "add",
        &format!("{outside_addr}/30"),
        "dev",
        &inside_end,
    ]);
    in_outside(&["link", "set", &inside_end, "up"]);
    in_outside(&["link", "set", "lo", "up"]);
    // A server on the outside host that answers with the address it sees the client at. The
    // outside host has no route to the node subnet: only a masqueraded client gets an answer.
    let ns_path = PathBuf::from("/var/run/netns").join(&outside.name);
    let listener = netns::run_in_blocking(&ns_path, move || TcpListener::bind((outside_addr, 0)))
        .unwrap()
        .unwrap();
    let server = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let peer = conn
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = conn.write_all(peer.as_bytes());
        }
    });

    let subnet = IpNet::V4(env.subnet);
    rules::install(&env.bridge, subnet).await.unwrap();
    // Idempotent: a second install leaves one jump per chain.
    rules::install(&env.bridge, subnet).await.unwrap();
    let nat = rules::nat_chain(&env.bridge);
    let fwd = rules::forward_chain(&env.bridge);
    let saved = rules();
    assert_eq!(
        saved.matches(&format!("-A POSTROUTING -j {nat}")).count(),
        1,
        "{saved}"
    );
    assert_eq!(
        saved.matches(&format!("-A FORWARD -j {fwd}")).count(),
        1,
        "{saved}"
    );
    assert!(
        saved.contains(&format!("-A {nat} ! -s {subnet} -j RETURN")),
        "{saved}"
    );

    let net = env.network().await;
    let id = env.id("masq");
    let attached = net.attach(&id, &[]).await.unwrap();
    let seen = fetch(Some(&attached.netns_path), server).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seen),
        host_addr.to_string(),
        "the outside host must see the node's address, not the container's {}",
        attached.ip
    );

    // A new subnet replaces the rules of the old one.
    let other: IpNet = format!("10.{octet}.210.0/24").parse().unwrap();
    rules::install(&env.bridge, other).await.unwrap();
    let saved = rules();
    assert!(
        saved.contains(&format!("-A {nat} ! -s {other} -j RETURN")),
        "{saved}"
    );
    assert!(
        !saved.contains(&format!("! -s {subnet} -j RETURN")),
        "{saved}"
    );

    net.detach(&id).await.unwrap();
    rules::remove(&env.bridge).await.unwrap();
    let saved = rules();
    assert!(!saved.contains(&nat), "{saved}");
    assert!(!saved.contains(&fwd), "{saved}");
}
