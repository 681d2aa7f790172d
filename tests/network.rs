//! Container networking end to end on one machine: a real scheduler (in the test process), a
//! real `gantry-agent run` and real containers on the agent's CNI network (Debian's
//! containernetworking-plugins). Each instance of a Service gets an address in the subnet the
//! scheduler gave the node, serves a page reachable by that address from the host and through a
//! published port on 127.0.0.1, and names itself in its /etc/hosts; a second instance wanting the
//! same host port on the node is not placed; the address survives an agent restart (live
//! restore); an attachment whose container vanished while no agent ran is deleted at start; and
//! deleting the workloads leaves no namespace mount, host-local reservation, veth or
//! iptables/nftables rule. Then two "hosts" (network namespaces on a bridge, made by
//! `deploy/netns-cluster.sh`) each run an agent: host A has a route to host B's subnet via B's
//! address and reaches B's instance by its address and through the published port on B's address;
//! from inside an instance on host A, a workload that runs on host B only is found by name
//! (`nslookup named.gantry`, `wget http://named/`) through host A's name responder, and the name
//! is gone once the workload is deleted.
//!
//! Needs root, busybox-static, the CNI plugins, iproute2, iptables and nftables; skipped without
//! them on a laptop, failed under CI.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gantry_agent::network::routes::RouteTable;
use serde_json::Value;
use support::Cluster;
use support::node::{
    Agent, apply, can_run, containers_in, instances, start_node, unclaimed_warm_mount, wait,
    warm_claims,
};

const IMAGE: &str = "gantry.test/busybox:net";
const PLUGINS: &str = "/usr/lib/cni";
const BRIDGE: &str = "gantry0";

/// Whether the CNI plugins and tools are here; under CI a missing one is a failure.
fn can_run_network() -> bool {
    if !can_run("network") {
        return false;
    }
    let plugin = ["bridge", "host-local", "portmap", "firewall", "loopback"]
        .into_iter()
        .find(|p| !Path::new(PLUGINS).join(p).exists());
    let tool = ["ip", "iptables-save", "nft"]
        .into_iter()
        .find(|t| Command::new(t).arg("-V").output().is_err());
    let missing = plugin
        .map(|p| format!("the {p} CNI plugin (containernetworking-plugins)"))
        .or(tool.map(|t| format!("{t} (iproute2, iptables, nftables)")));
    match missing {
        None => true,
        Some(what) if std::env::var_os("CI").is_some() => panic!("network tests need {what}"),
        Some(what) => {
            eprintln!("skipping: network tests need {what}");
            false
        }
    }
}

/// A Service of busybox httpd instances serving their own /etc/hostname and /etc/hosts.
fn service(name: &str, replicas: u32, host_port: Option<u16>) -> String {
    let ports = match host_port {
        Some(port) => format!("ports: [{{container: 80, host: {port}}}]\n"),
        None => String::new(),
    };
    format!(
        "kind: Service\nname: {name}\nreplicas: {replicas}\nimage: {IMAGE}\n{ports}\
         command: [sh, -c, 'mkdir -p /www && cat /etc/hostname > /www/index.html && \
         cat /etc/hosts > /www/hosts && exec httpd -f -p 80 -h /www']\nstopGracePeriod: 1s\n"
    )
}

/// [`service`] placed on the host labelled `host=<host>` only.
fn service_on(name: &str, host: u32) -> String {
    format!(
        "{}placement: {{nodeSelector: {{host: \"{host}\"}}}}\n",
        service(name, 1, None)
    )
}

/// `GET path` over HTTP/1.0; the body.
fn fetch(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\n\r\n").map_err(|e| e.to_string())?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| e.to_string())?;
    match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_owned())
        }
        _ => Err(format!("unexpected reply: {reply:?}")),
    }
}

/// Polls `fetch` until it answers (the server starts a moment after the container).
fn fetch_eventually(agent: &Agent, addr: SocketAddr, path: &str) -> String {
    let mut last = String::new();
    for _ in 0..50 {
        match fetch(addr, path) {
            Ok(body) => return body,
            Err(err) => last = err,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{addr}{path}: {last}\nagent log:\n{}", agent.log());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// (instance id, ip) of the Ready instances of `workload`.
fn ready(cluster: &Cluster, workload: &str) -> Vec<(String, String)> {
    let mut list: Vec<(String, String)> = instances(cluster, workload)
        .iter()
        .filter(|i| i["state"] == "Ready")
        .map(|i| {
            let ip = i["status"]["ip"].as_str().or(i["ip"].as_str());
            (
                i["name"].as_str().unwrap_or_default().to_owned(),
                ip.unwrap_or_default().to_owned(),
            )
        })
        .collect();
    list.sort();
    list
}

fn node_subnet(cluster: &Cluster) -> String {
    let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
    let node = &nodes["items"][0];
    node["subnet"]
        .as_str()
        .or(node["status"]["subnet"].as_str())
        .or(node["spec"]["subnet"].as_str())
        .unwrap_or_else(|| panic!("no subnet in {node}"))
        .to_owned()
}

fn in_subnet(ip: &str, subnet: &str) -> bool {
    let (net, len) = subnet.split_once('/').expect("cidr");
    let len: u32 = len.parse().expect("prefix");
    let ip: std::net::Ipv4Addr = ip.parse().expect("ipv4");
    let net: std::net::Ipv4Addr = net.parse().expect("ipv4");
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// Host interfaces enslaved to the bridge.
fn bridge_ports() -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "master", BRIDGE])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .collect()
}

/// iptables and nftables rules, as text.
fn rules() -> String {
    let mut text = String::new();
    for (tool, args) in [
        ("iptables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        if let Ok(out) = Command::new(tool).args(args).output() {
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    text
}

/// Whether `text` names `ip` (not as the prefix of a longer address).
fn names_ip(text: &str, ip: &str) -> bool {
    text.match_indices(ip).any(|(at, _)| {
        let after = text[at + ip.len()..].chars().next();
        !after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn netns_mounts(data: &Path) -> Vec<String> {
    let dir = data.join("netns");
    let dir = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&*dir))
        .map(str::to_owned)
        .collect()
}

/// The instances holding addresses in host-local's store (each file names its holder on its
/// first line; a claimed warm namespace stands for its instance), without the agent's unclaimed
/// warm namespaces (attached ahead of need: at most 2).
fn holders_but_warm(data: &Path) -> Vec<String> {
    let claims = warm_claims(data);
    let dir = data.join("cni/networks/gantry");
    let mut holders = Vec::new();
    let mut warm = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .parse::<std::net::IpAddr>()
            .is_err()
        {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let holder = text.lines().next().unwrap_or_default().to_owned();
        match claims.get(&holder) {
            Some(instance) => holders.push(instance.clone()),
            None if holder.starts_with("warm-") => warm += 1,
            None => holders.push(holder),
        }
    }
    assert!(
        warm <= 2,
        "{warm} warm namespaces hold addresses; the pool keeps 2"
    );
    holders.sort();
    holders
}

/// Namespace mounts of the agent but those of unclaimed warm namespaces.
fn netns_mounts_but_warm(data: &Path) -> Vec<String> {
    let claims = warm_claims(data);
    netns_mounts(data)
        .into_iter()
        .filter(|m| !unclaimed_warm_mount(m, &claims))
        .collect()
}

/// Addresses host-local holds in the agent's store.
fn reservations(data: &Path) -> Vec<String> {
    let dir = data.join("cni/networks/gantry");
    let mut ips: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    ips.sort();
    ips
}

#[test]
fn instances_get_addresses_published_ports_and_leave_nothing_behind() {
    if !can_run_network() {
        return;
    }
    let cluster = Cluster::start(0);
    let ports_before = bridge_ports();
    let (data, agent) = start_node(&cluster, IMAGE);
    let limit = Duration::from_secs(30);
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });
    let subnet = node_subnet(&cluster);

    // Two instances without a published port, and one of two wanting host port P: the other
    // cannot go on the same node.
    let port = free_port();
    apply(&cluster, "web", &service("web", 2, None));
    apply(&cluster, "pub", &service("pub", 2, Some(port)));
    wait(&agent, "3 instances Ready", limit, || {
        ready(&cluster, "web").len() == 2 && ready(&cluster, "pub").len() == 1
    });
    let web = ready(&cluster, "web");
    let published = ready(&cluster, "pub");
    let unplaced: Vec<Value> = instances(&cluster, "pub")
        .into_iter()
        .filter(|i| i["state"] != "Ready")
        .collect();
    assert_eq!(unplaced.len(), 1, "{unplaced:?}");
    assert!(
        unplaced[0]["node"].as_str().unwrap_or_default().is_empty()
            || unplaced[0]["node"].is_null(),
        "the second instance wanting port {port} must not be placed: {unplaced:?}"
    );

    let mut ips = Vec::new();
    for (id, ip) in web.iter().chain(&published) {
        assert!(in_subnet(ip, &subnet), "{id}: {ip} is not in {subnet}");
        let addr: SocketAddr = format!("{ip}:80").parse().expect("address");
        let page = fetch_eventually(&agent, addr, "/");
        assert_eq!(page.trim(), id, "the page of {id} by its address");
        let hosts = fetch_eventually(&agent, addr, "/hosts");
        assert!(
            hosts
                .lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [ip, id]),
            "{id} names itself at {ip} in /etc/hosts:\n{hosts}"
        );
        ips.push(ip.clone());
    }
    assert_ne!(ips[0], ips[1], "each instance has its own address");
    let page = fetch_eventually(&agent, ([127, 0, 0, 1], port).into(), "/");
    assert_eq!(page.trim(), published[0].0, "through the published port");

    // kill -9 the agent: the containers keep their namespaces and addresses; the web instance
    // whose container is removed meanwhile is detached at start and gets a new address.
    drop(agent);
    let gone = &web[0];
    let status = Command::new(Agent::binary())
        .arg("ctr")
        .arg("--root")
        .arg(data.join("runtime"))
        .args(["rm", "--force", &gone.0])
        .status()
        .expect("gantry-agent ctr rm");
    assert!(status.success());
    let agent = Agent::start(&cluster.addr, &data);
    wait(&agent, "the removed container replaced", limit, || {
        let now = ready(&cluster, "web");
        now.len() == 2 && now.iter().all(|(_, ip)| !ip.is_empty() && ip != &gone.1)
    });
    let kept = ready(&cluster, "pub");
    assert_eq!(kept, published, "live restore keeps the address");
    let page = fetch_eventually(&agent, ([127, 0, 0, 1], port).into(), "/");
    assert_eq!(page.trim(), published[0].0);
    let web = ready(&cluster, "web");
    assert!(
        !reservations(&data).contains(&gone.1),
        "the address of the removed container is released: {:?}",
        reservations(&data)
    );
    assert_eq!(
        holders_but_warm(&data).len(),
        3,
        "{:?}",
        holders_but_warm(&data)
    );
    for (id, ip) in &web {
        let addr: SocketAddr = format!("{ip}:80").parse().expect("address");
        assert_eq!(fetch_eventually(&agent, addr, "/").trim(), id);
    }

    // Delete: nothing left.
    cluster.run(&["delete", "workload", "web"]).ok();
    cluster.run(&["delete", "workload", "pub"]).ok();
    wait(&agent, "every container removed", limit, || {
        agent.containers().is_empty()
    });
    // The worker releases the root filesystem and status after the container; network first.
    assert!(
        netns_mounts_but_warm(&data).is_empty(),
        "{:?}",
        netns_mounts(&data)
    );
    assert!(
        holders_but_warm(&data).is_empty(),
        "{:?}",
        holders_but_warm(&data)
    );
    let left: Vec<String> = bridge_ports()
        .into_iter()
        .filter(|p| !ports_before.contains(p))
        .collect();
    assert!(left.is_empty(), "veths left on {BRIDGE}: {left:?}");
    let rules = rules();
    let all: Vec<&(String, String)> = web.iter().chain(&published).chain([gone]).collect();
    for (id, ip) in all {
        assert!(!rules.contains(id.as_str()), "a rule names {id}");
        assert!(!names_ip(&rules, ip), "a rule names {ip}");
    }
    assert!(
        !rules.contains(&format!("dport {port} ")) && !rules.contains(&format!("--dport {port} ")),
        "a rule publishes port {port}"
    );
    // Stopped for good (the agent killed, its clean-up run): the warm namespaces go too.
    drop(agent);
    assert!(netns_mounts(&data).is_empty(), "{:?}", netns_mounts(&data));
    assert!(reservations(&data).is_empty(), "{:?}", reservations(&data));
}

/// Two "hosts" made by `deploy/netns-cluster.sh`, removed on drop (after their agents).
struct Hosts {
    prefix: String,
    net: String,
}

impl Hosts {
    fn up(count: u32) -> Hosts {
        let pid = std::process::id();
        let hosts = Hosts {
            prefix: format!("gtn{}", pid % 10_000),
            net: format!("172.31.{}", 200 + pid % 50),
        };
        hosts.script("down", count);
        hosts.script("up", count);
        hosts
    }

    fn script(&self, action: &str, count: u32) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/netns-cluster.sh");
        let status = Command::new("sh")
            .arg(script)
            .args([action, &self.prefix, &count.to_string(), &self.net])
            .status()
            .expect("running deploy/netns-cluster.sh");
        assert!(
            status.success() || action == "down",
            "netns-cluster.sh {action} failed"
        );
    }

    fn name(&self, i: u32) -> String {
        format!("{}-{i}", self.prefix)
    }

    fn netns(&self, i: u32) -> std::path::PathBuf {
        Path::new("/run/netns").join(self.name(i))
    }

    fn address(&self, i: u32) -> String {
        format!("{}.{}", self.net, 10 + i)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.script("down", 2);
    }
}

/// A `gantry-agent run` inside a host's network namespace, killed on drop; a test that failed
/// half-way also removes the containers it left.
struct HostAgent {
    child: std::process::Child,
    data: std::path::PathBuf,
    netns: std::path::PathBuf,
}

impl HostAgent {
    fn start(cluster: &Cluster, hosts: &Hosts, i: u32) -> HostAgent {
        let data = cluster.dir.path().join(format!("agent-{i}"));
        std::fs::create_dir_all(&data).expect("agent data dir");
        let images =
            gantry_agent::image::ImageStore::open(data.join("images")).expect("image store");
        images
            .import(std::io::Cursor::new(support::node::busybox_image(IMAGE)))
            .expect("importing the test image");
        drop(images);
        let log = std::fs::File::create(data.join("agent.log")).expect("agent log");
        let netns = hosts.netns(i);
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg(Agent::binary())
            .args([
                "run",
                "--name",
                &hosts.name(i),
                "--address",
                &hosts.address(i),
                "--label",
                &format!("host={i}"),
            ])
            .args(["--scheduler", &cluster.addr])
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "info,gantry_agent=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("starting gantry-agent in the host");
        HostAgent { child, data, netns }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.data.join("agent.log")).unwrap_or_default()
    }

    fn containers(&self) -> Vec<String> {
        containers_in(&self.data)
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let ids = self.containers();
        if !ids.is_empty() {
            let _ = Command::new("nsenter")
                .arg(format!("--net={}", self.netns.display()))
                .arg(Agent::binary())
                .arg("ctr")
                .arg("--root")
                .arg(self.data.join("runtime"))
                .args(["rm", "--force"])
                .args(&ids)
                .status();
        }
        support::node::cleanup_after_agent(
            &self.data,
            gantry_agent::network::DEFAULT_BRIDGE,
            Some(&self.netns),
        );
    }
}

/// Runs `args` in instance `id` with `gantry exec`; (success, stdout + stderr).
fn exec_in(cluster: &Cluster, id: &str, args: &[&str]) -> (bool, String) {
    let mut all = vec!["exec", id, "--"];
    all.extend_from_slice(args);
    let ran = cluster.run(&all);
    (ran.code == 0, format!("{}{}", ran.stdout, ran.stderr))
}

/// The addresses of the answer in busybox `nslookup` output (the `Address` lines after `Name`,
/// not the server's).
fn answer_addresses(out: &str) -> Vec<String> {
    out.lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter_map(|l| l.strip_prefix("Address:"))
        .map(|a| a.trim().to_owned())
        .collect()
}

/// Calls `check` until it succeeds, for at most 30 s; then panics with its last error and `logs`.
fn retry(what: &str, logs: &dyn Fn() -> String, mut check: impl FnMut() -> Result<(), String>) {
    let started = std::time::Instant::now();
    loop {
        let Err(err) = check() else { return };
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: not within 30s; last: {err}\nagent logs:\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `fetch` from inside the network namespace at `netns`.
fn fetch_from(netns: &Path, addr: SocketAddr, path: &str) -> Result<String, String> {
    let path = path.to_owned();
    gantry_agent::network::netns::run_in_blocking(netns, move || fetch(addr, &path))
        .map_err(|e| e.to_string())?
}

#[test]
fn instances_on_two_hosts_reach_each_other_by_address_and_published_port() {
    if !can_run_network() {
        return;
    }
    let hosts = Hosts::up(2);
    let cluster = Cluster::start_listening(&format!("{}.1:0", hosts.net));
    let agents = [
        HostAgent::start(&cluster, &hosts, 1),
        HostAgent::start(&cluster, &hosts, 2),
    ];
    let logs = || {
        agents
            .iter()
            .map(|a| a.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let until = |what: &str, mut check: Box<dyn FnMut() -> bool + '_>| {
        let started = std::time::Instant::now();
        while !check() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{what}: not within 30s\nagent logs:\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until(
        "both nodes Ready with a subnet",
        Box::new(|| {
            let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
            let items = nodes["items"].as_array().cloned().unwrap_or_default();
            items.len() == 2
                && items
                    .iter()
                    .all(|n| n["status"] == "Ready" && n["subnet"].is_string())
        }),
    );

    // Two instances wanting one host port: one per host.
    let port = free_port();
    apply(&cluster, "spread", &service("spread", 2, Some(port)));
    until(
        "2 instances Ready",
        Box::new(|| ready(&cluster, "spread").len() == 2),
    );
    let on_b = instances(&cluster, "spread")
        .into_iter()
        .find(|i| i["node"] == hosts.name(2))
        .unwrap_or_else(|| panic!("no instance on {}", hosts.name(2)));
    let id = on_b["name"].as_str().expect("id").to_owned();
    let ip = on_b["status"]["ip"].as_str().expect("ip").to_owned();

    // Host A has a route to host B's subnet via B's address, and reaches the instance on B by
    // its address and through the published port on B's address.
    let a = hosts.netns(1);
    let subnet_b = cluster.json(&["get", "nodes", "-o", "json"])["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == hosts.name(2))
        .and_then(|n| n["subnet"].as_str().map(str::to_owned))
        .expect("the subnet of host B");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let has_route = || {
        let routes = runtime
            .block_on(RouteTable::in_netns(a.clone()).observed())
            .expect("routes of host A");
        routes
            .iter()
            .any(|r| r.subnet.to_string() == subnet_b && r.via.to_string() == hosts.address(2))
    };
    until(
        &format!("host A routes {subnet_b} via {}", hosts.address(2)),
        Box::new(has_route),
    );
    let by_ip: SocketAddr = format!("{ip}:80").parse().expect("address");
    let published: SocketAddr = format!("{}:{port}", hosts.address(2))
        .parse()
        .expect("address");
    for target in [by_ip, published] {
        let mut last = String::new();
        let got = (0..50).find_map(|_| match fetch_from(&a, target, "/") {
            Ok(body) => Some(body),
            Err(err) => {
                last = err;
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        });
        let body = got.unwrap_or_else(|| {
            panic!(
                "{target} from {}: {last}\nagent logs:\n{}",
                hosts.name(1),
                logs()
            )
        });
        assert_eq!(body.trim(), id, "the page of {id} through {target}");
    }

    // Names: a workload on host B only, found by name from inside the instance on host A,
    // whose resolver is host A's name responder on its bridge's gateway address.
    apply(&cluster, "named", &service_on("named", 2));
    until(
        "the named instance Ready",
        Box::new(|| ready(&cluster, "named").len() == 1),
    );
    let (named_id, named_ip) = ready(&cluster, "named").remove(0);
    let on_a = instances(&cluster, "spread")
        .into_iter()
        .find(|i| i["node"] == hosts.name(1))
        .and_then(|i| i["name"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no instance on {}", hosts.name(1)));
    let subnet_a = cluster.json(&["get", "nodes", "-o", "json"])["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"] == hosts.name(1))
        .and_then(|n| n["subnet"].as_str().map(str::to_owned))
        .expect("the subnet of host A");
    let gateway_a = format!("{}.1", subnet_a.rsplit_once('.').expect("a /24").0);
    let (_, resolv) = exec_in(&cluster, &on_a, &["cat", "/etc/resolv.conf"]);
    assert!(
        resolv.lines().next() == Some(&format!("nameserver {gateway_a}"))
            && resolv.contains("search gantry"),
        "{on_a}'s resolv.conf names host A's responder:\n{resolv}"
    );
    let lookup = || exec_in(&cluster, &on_a, &["busybox", "nslookup", "named.gantry"]);
    retry(
        &format!("named.gantry → {named_ip} inside {on_a}"),
        &logs,
        || {
            let (_, out) = lookup();
            if out.contains(&named_ip) {
                Ok(())
            } else {
                Err(out)
            }
        },
    );
    // The address the name gave inside the instance on host A serves the named instance on
    // host B. (The test image's busybox is linked statically against glibc, whose getaddrinfo
    // cannot run without the shared NSS libraries, so its wget cannot look names up itself;
    // its nslookup has a resolver of its own.)
    let (_, out) = lookup();
    let resolved = answer_addresses(&out);
    assert_eq!(
        resolved,
        std::slice::from_ref(&named_ip),
        "named.gantry answers its instance:\n{out}"
    );
    let by_name: SocketAddr = format!("{}:80", resolved[0]).parse().expect("address");
    retry(
        &format!("{by_name} from {}", hosts.name(1)),
        &logs,
        || match fetch_from(&a, by_name, "/") {
            Ok(body) if body.trim() == named_id => Ok(()),
            Ok(body) => Err(format!("unexpected page {body:?}")),
            Err(err) => Err(err),
        },
    );
    cluster.run(&["delete", "workload", "named"]).ok();
    retry("named.gantry gone after the delete", &logs, || {
        let (ok, out) = lookup();
        if !ok && !out.contains(&named_ip) && out.contains("NXDOMAIN") {
            Ok(())
        } else {
            Err(out)
        }
    });

    cluster.run(&["delete", "workload", "spread"]).ok();
    until(
        "every container removed",
        Box::new(|| agents.iter().all(|a| a.containers().is_empty())),
    );
    for agent in &agents {
        assert!(netns_mounts_but_warm(&agent.data).is_empty());
        assert!(holders_but_warm(&agent.data).is_empty());
    }
    drop(agents);
}
