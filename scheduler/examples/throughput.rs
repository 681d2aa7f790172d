//! End-to-end scheduler throughput: a scheduler replica (API, sessions, controllers) in this
//! process, `--nodes` simulated agents speaking the real NodeSession gRPC API over loopback, and
//! `--instances` instances submitted through the real Workloads API as Services of
//! `--replicas` each. Measures placements/s from the first Apply to the moment every instance
//! is assigned to a node in the store, and the time until every instance is reported Ready.
//!
//! ```sh
//! cargo run --release -p gantry-scheduler --example throughput -- --nodes 5000 --instances 10000
//! # on etcd (started by deploy/bench-scheduler.sh):
//! cargo run --release -p gantry-scheduler --example throughput -- --etcd http://127.0.0.1:2379 ...
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures::StreamExt;
use gantry::pb;
use gantry::pb::workloads_client::WorkloadsClient;
use gantry_scheduler::model::{self, InstanceRecord, InstanceState, InstanceStatus, keys};
use gantry_scheduler::server::{self, Config};
use gantry_scheduler::sim::{SimAgent, SimConfig};
use gantry_scheduler::store::{EmbeddedStore, EtcdOptions, EtcdStore, EventKind, Store};

#[derive(Debug, Parser)]
struct Args {
    /// Simulated nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Instances to place.
    #[arg(long, default_value_t = 10_000)]
    instances: usize,
    /// Replicas per Service.
    #[arg(long, default_value_t = 10)]
    replicas: usize,
    /// Seconds to wait after every node has its routes, before submitting.
    #[arg(long, default_value_t = 0)]
    settle_secs: u64,
    /// Applies in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// etcd endpoint (a fresh, empty etcd); the embedded store in a temp dir when absent.
    #[arg(long)]
    etcd: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.instances % args.replicas != 0 {
        bail!("--instances must be a multiple of --replicas");
    }
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = match &args.etcd {
        Some(url) => Arc::new(EtcdStore::connect(EtcdOptions::new([url.clone()])).await?),
        None => Arc::new(EmbeddedStore::open(dir.path().join("store.redb")).await?),
    };
    let (existing, _) = store.range(keys::ROOT.as_bytes(), None).await?;
    if !existing.is_empty() {
        bail!("the store is not empty: start from a fresh etcd");
    }
    let mut config = Config::new("127.0.0.1:0".parse()?, dir.path().to_path_buf());
    config.identity = "bench".into();
    // Room for a node subnet (/24) per simulated node.
    config.cluster_cidr = "10.0.0.0/8".parse()?;
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run_with_store(
        config,
        store.clone(),
        async {
            let _ = stop_rx.await;
        },
        Some(bound_tx),
    ));
    let addr = format!("http://{}", bound_rx.await?);

    // Nodes.
    let started = Instant::now();
    let mut agents = Vec::with_capacity(args.nodes);
    for n in 0..args.nodes {
        agents.push(
            SimAgent::start(
                vec![addr.clone()],
                SimConfig {
                    name: format!("node-{n:05}"),
                    labels: [("zone".to_owned(), format!("z{}", n % 3))].into(),
                    cpu_millis: 16_000,
                    memory_bytes: 64 << 30,
                    pids: 100_000,
                    ..SimConfig::default()
                },
            )
            .await,
        );
    }
    wait_for_nodes(&*store, args.nodes).await?;
    println!(
        "{} nodes registered in {:.2?}",
        args.nodes,
        started.elapsed()
    );

    // Every node is told a route to every other node (host-gateway routing): wait until the
    // routes reached every agent, so that placements are measured on a settled cluster.
    let peers = (args.nodes - 1) as u64;
    while agents.iter().any(|a| a.peers() < peers) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "routes to every peer on every node after {:.2?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;

    // Submit and watch.
    let from = store.current_revision().await? + 1;
    let mut watch = store.watch(keys::ROOT.as_bytes(), from).await?;
    let client = WorkloadsClient::connect(addr.clone()).await?;
    let workloads = args.instances / args.replicas;
    let t0 = Instant::now();
    let submit = tokio::spawn({
        let replicas = args.replicas as u32;
        let concurrency = args.concurrency;
        async move {
            futures::stream::iter((0..workloads).map(|w| {
                let mut client = client.clone();
                async move {
                    let spec = pb::WorkloadSpec {
                        kind: pb::WorkloadKind::Service as i32,
                        name: format!("svc-{w:05}"),
                        replicas: Some(replicas),
                        image: "registry.example/web:1".into(),
                        resources: Some(pb::Resources {
                            cpu: Some("100m".into()),
                            memory: Some("64Mi".into()),
                            pids: Some(64),
                        }),
                        ..Default::default()
                    };
                    client
                        .apply(pb::ApplyWorkloadRequest {
                            spec: Some(spec),
                            dry_run: false,
                            expected_revision: None,
                        })
                        .await
                        .map(|_| ())
                }
            }))
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, tonic::Status>>()
        }
    });

    let mut assigned = HashSet::new();
    let mut ready = HashSet::new();
    let mut t_assigned = None;
    let mut t_submitted = None;
    while ready.len() < args.instances {
        let event = tokio::time::timeout(Duration::from_secs(120), watch.next())
            .await
            .context("no progress for 120 s")?
            .context("watch ended")??;
        if t_submitted.is_none() && submit.is_finished() {
            t_submitted = Some(t0.elapsed());
        }
        if event.kind != EventKind::Put {
            continue;
        }
        let key = String::from_utf8_lossy(&event.kv.key).into_owned();
        if key.starts_with(keys::INSTANCES) {
            let rec: InstanceRecord = model::decode(&event.kv.value)?;
            if rec.node.is_some() && assigned.insert(rec.id) && assigned.len() == args.instances {
                t_assigned = Some(t0.elapsed());
            }
        } else if let Some(rest) = key.strip_prefix(keys::STATUS) {
            let status: InstanceStatus = model::decode(&event.kv.value)?;
            if status.state == InstanceState::Ready {
                ready.insert(rest.to_owned());
            }
        }
    }
    let t_ready = t0.elapsed();
    submit.await?.context("an Apply failed")?;
    let t_assigned = t_assigned.context("instances were never all assigned")?;
    println!(
        "store={} nodes={} instances={} workloads={}x{}",
        if args.etcd.is_some() {
            "etcd"
        } else {
            "embedded"
        },
        args.nodes,
        args.instances,
        workloads,
        args.replicas
    );
    if let Some(t) = t_submitted {
        println!("  all Applies answered after {t:.2?}");
    }
    println!(
        "  all assigned after {t_assigned:.2?}: {:.0} placements/s",
        args.instances as f64 / t_assigned.as_secs_f64()
    );
    println!(
        "  all reported Ready after {t_ready:.2?}: {:.0} instances/s",
        args.instances as f64 / t_ready.as_secs_f64()
    );
    for agent in agents {
        agent.stop().await;
    }
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}

async fn wait_for_nodes(store: &dyn Store, nodes: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (live, _) = store.range(keys::LIVE.as_bytes(), None).await?;
        if live.len() == nodes {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {} of {nodes} nodes registered", live.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
