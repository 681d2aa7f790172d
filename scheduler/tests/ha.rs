//! High availability with real processes: two `gantry-scheduler` replicas on one real etcd,
//! simulated agents (the real NodeSession API) connected to both. The leader is killed with
//! SIGKILL while a Service scales from 0 to 50; the other replica must take over within 5 s and
//! the cluster must end with exactly 50 instances, none lost and none doubled.
//!
//! Needs `/usr/bin/etcd` (Debian `etcd-server`): skipped without it unless `CI` is set.

mod support;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gantry::pb;
use gantry::pb::workloads_client::WorkloadsClient;
use gantry_scheduler::election::{DEFAULT_LEADER_KEY, current_leader};
use gantry_scheduler::model::{self, InstanceRecord, keys};
use gantry_scheduler::sim::{SimAgent, SimConfig};
use gantry_scheduler::store::Store;
use support::{EtcdServer, etcd_available};
use tempfile::TempDir;

/// One scheduler process; killed on drop.
struct Replica {
    name: String,
    child: Child,
    addr: String,
    dir: TempDir,
}

impl Replica {
    fn start(name: &str, etcd: &str) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("scheduler.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_gantry-scheduler"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", ""])
            .args(["--etcd", etcd])
            .args(["--name", name])
            .arg("--data-dir")
            .arg(dir.path())
            .env("RUST_LOG", "info,gantry_scheduler=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning gantry-scheduler")?;
        Ok(Replica {
            name: name.to_owned(),
            child,
            addr: format!("http://127.0.0.1:{port}"),
            dir,
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scheduler.log")).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn client(addr: &str) -> Result<WorkloadsClient<tonic::transport::Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match WorkloadsClient::connect(addr.to_owned()).await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => bail!("{addr} did not answer: {err}"),
        }
    }
}

/// Active (not stopping) instances by id → node, from the store.
async fn active_instances(store: &dyn Store) -> Result<BTreeMap<String, Option<String>>> {
    let (kvs, _) = store
        .range(keys::instances_of("web").as_bytes(), None)
        .await?;
    let mut out = BTreeMap::new();
    for kv in kvs {
        let rec: InstanceRecord = model::decode(&kv.value)?;
        if !rec.stopping() {
            out.insert(rec.id, rec.node);
        }
    }
    Ok(out)
}

fn running(agents: &[SimAgent]) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for agent in agents {
        for id in agent.running().keys() {
            *count.entry(id.clone()).or_insert(0) += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_mid_scale_up_loses_and_doubles_nothing() -> Result<()> {
    if !etcd_available() {
        return Ok(());
    }
    let etcd = EtcdServer::start().await?;
    let store: Arc<dyn Store> = Arc::new(etcd.connect().await?);
    let mut replicas = [
        Replica::start("s1", &etcd.client_url)?,
        Replica::start("s2", &etcd.client_url)?,
    ];
    let addrs: Vec<String> = replicas.iter().map(|r| r.addr.clone()).collect();
    let mut api = client(&addrs[0]).await?;
    client(&addrs[1]).await?;

    let mut agents = Vec::new();
    for n in 0..10 {
        agents.push(
            SimAgent::start(
                addrs.clone(),
                SimConfig {
                    name: format!("node-{n}"),
                    cpu_millis: 8_000,
                    memory_bytes: 16 << 30,
                    pids: 10_000,
                    ..SimConfig::default()
                },
            )
            .await,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.range(keys::LIVE.as_bytes(), None).await?.0.len() < 10 {
        if Instant::now() > deadline {
            bail!("the simulated nodes did not all register");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let spec = |replicas: u32| pb::WorkloadSpec {
        kind: pb::WorkloadKind::Service as i32,
        name: "web".into(),
        replicas: Some(replicas),
        image: "registry.example/web:1".into(),
        resources: Some(pb::Resources {
            cpu: Some("100m".into()),
            memory: Some("64Mi".into()),
            pids: None,
        }),
        ..Default::default()
    };
    api.apply(pb::ApplyWorkloadRequest {
        spec: Some(spec(0)),
        dry_run: false,
        expected_revision: None,
    })
    .await?;

    // Scale in steps, and kill the leader right after the last step was accepted.
    let leader = loop {
        if let Some(leader) = current_leader(&*store, DEFAULT_LEADER_KEY).await? {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for replicas_wanted in [10, 30, 50] {
        api.scale(pb::ScaleWorkloadRequest {
            name: "web".into(),
            replicas: replicas_wanted,
            expected_revision: None,
        })
        .await?;
        if replicas_wanted < 50 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let index = replicas
        .iter()
        .position(|r| r.name == leader)
        .context("the leader is not one of ours")?;
    let killed_at = Instant::now();
    replicas[index].kill();
    let survivor = &replicas[1 - index];

    // The survivor takes over within 5 s.
    loop {
        if current_leader(&*store, DEFAULT_LEADER_KEY)
            .await?
            .as_deref()
            == Some(&survivor.name)
        {
            break;
        }
        if killed_at.elapsed() > Duration::from_secs(5) {
            bail!(
                "{} did not take over within 5 s; its log:\n{}",
                survivor.name,
                survivor.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = killed_at.elapsed();

    // Exactly 50, each assigned and held by exactly one agent, and it stays so.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active = active_instances(&*store).await?;
        let held = running(&agents);
        let settled = active.len() == 50
            && active.values().all(Option::is_some)
            && held.len() == 50
            && held.values().all(|&n| n == 1)
            && active.keys().all(|id| held.contains_key(id));
        if settled {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "not settled: {} active in the store, {} held by agents; survivor log:\n{}",
                active.len(),
                held.len(),
                survivor.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let active = active_instances(&*store).await?;
    assert_eq!(
        active.len(),
        50,
        "instances appeared or vanished after settling"
    );
    let held = running(&agents);
    assert_eq!(held.len(), 50);
    assert!(
        held.values().all(|&n| n == 1),
        "an instance runs twice: {held:?}"
    );
    eprintln!("takeover after {takeover:.2?}");
    for agent in agents {
        agent.stop().await;
    }
    Ok(())
}
