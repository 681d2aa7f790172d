//! The replica's /metrics, /healthz and /readyz as a scraper sees them: after an Apply on a
//! leader with nodes, the leader gauge, node gauges, placements, API requests and store latency
//! are all exposed.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gantry::pb;
use gantry::pb::workloads_client::WorkloadsClient;
use gantry_scheduler::server::{self, Config};
use gantry_scheduler::sim::{SimAgent, SimConfig};
use gantry_scheduler::store::{EmbeddedStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response
        .split(' ')
        .nth(1)
        .context("no status line")?
        .parse()?;
    Ok((code, response))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_leader_nodes_placements_api_and_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store: std::sync::Arc<dyn Store> =
        std::sync::Arc::new(EmbeddedStore::open(dir.path().join("store.redb")).await?);
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let mut config = Config::new("127.0.0.1:0".parse()?, dir.path().into());
    config.metrics_listen = Some(metrics_addr);
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run_with_store(
        config,
        store,
        async {
            let _ = stop_rx.await;
        },
        Some(bound_tx),
    ));
    let addr = format!("http://{}", bound_rx.await?);
    let agent = SimAgent::start(vec![addr.clone()], SimConfig::new("node-0")).await;
    agent.wait_connected().await;
    let mut api = WorkloadsClient::connect(addr).await?;
    api.apply(pb::ApplyWorkloadRequest {
        spec: Some(pb::WorkloadSpec {
            kind: pb::WorkloadKind::Service as i32,
            name: "web".into(),
            replicas: Some(2),
            image: "registry.example/web:1".into(),
            ..Default::default()
        }),
        dry_run: false,
        expected_revision: None,
    })
    .await?;

    let wanted = [
        "gantry_scheduler_leader 1",
        r#"gantry_scheduler_api_requests_total{method="/gantry.v1.Workloads/Apply",code="OK"} 1"#,
        "gantry_scheduler_placements_total 2",
        r#"gantry_scheduler_store_operation_duration_seconds_count{op="txn"}"#,
        r#"gantry_scheduler_nodes{readiness="ready"} 1"#,
    ];
    let started = std::time::Instant::now();
    loop {
        let (code, body) = http_get(metrics_addr, "/metrics").await?;
        assert_eq!(code, 200);
        let missing: Vec<&&str> = wanted.iter().filter(|w| !body.contains(**w)).collect();
        if missing.is_empty() {
            break;
        }
        // The node gauge is refreshed every 5 s.
        if started.elapsed() > Duration::from_secs(15) {
            bail!("missing {missing:?} in:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(http_get(metrics_addr, "/healthz").await?.0, 200);
    assert_eq!(http_get(metrics_addr, "/readyz").await?.0, 200);
    agent.stop().await;
    let _ = stop_tx.send(());
    server.await??;
    Ok(())
}
