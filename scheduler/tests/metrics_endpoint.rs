//! The replica's /metrics, /healthz and /readyz as a scraper sees them: after an Apply on a
//! leader with nodes, the leader gauge, node gauges, placements, API requests and store latency
//! are all exposed.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gantry::pb;
use gantry::pb::workloads_client::WorkloadsClient;
use gantry_scheduler::sim::SimConfig;
use support::InProcess;
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
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let cluster = InProcess::start_with(1, SimConfig::new, |config| {
        config.metrics_listen = Some(metrics_addr);
    })
    .await?;
    cluster.agents[0].wait_connected().await;
    let addr = cluster.addr.clone();
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
    cluster.stop().await
}
