//! Node lifecycle end to end: a scheduler replica in this process on the embedded store, four
//! simulated agents on the real NodeSession API. One agent stops heartbeating: within the
//! 10 s grace (plus a little scheduling slack) its instance is replaced on another node; when the
//! agent comes back, its stale instance is taken away from it.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use gantry::pb;
use gantry::pb::workloads_client::WorkloadsClient;
use gantry_scheduler::model::{self, InstanceRecord, NoticeRecord, keys};
use gantry_scheduler::sim::SimConfig;
use gantry_scheduler::store::Store;
use support::{InProcess, wait_until};

async fn assignments(store: &dyn Store) -> Result<BTreeMap<String, String>> {
    let (kvs, _) = store
        .range(keys::instances_of("web").as_bytes(), None)
        .await?;
    let mut out = BTreeMap::new();
    for kv in kvs {
        let rec: InstanceRecord = model::decode(&kv.value)?;
        if let (false, Some(node)) = (rec.stopping(), rec.node) {
            out.insert(rec.id, node);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_has_its_instances_replaced_within_the_grace() -> Result<()> {
    let cluster = InProcess::start(4, |name| SimConfig {
        name,
        cpu_millis: 4_000,
        memory_bytes: 8 << 30,
        pids: 10_000,
        ..SimConfig::default()
    })
    .await?;
    let (store, addr, agents) = (&*cluster.store, &cluster.addr, &cluster.agents);
    let mut api = WorkloadsClient::connect(addr.clone()).await?;
    api.apply(pb::ApplyWorkloadRequest {
        spec: Some(pb::WorkloadSpec {
            kind: pb::WorkloadKind::Service as i32,
            name: "web".into(),
            replicas: Some(3),
            image: "registry.example/web:1".into(),
            placement: Some(pb::Placement {
                anti_affinity: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
        dry_run: false,
        expected_revision: None,
    })
    .await?;
    wait_until("3 instances assigned", Duration::from_secs(20), || async {
        Ok(assignments(store).await?.len() == 3)
    })
    .await?;
    let before = assignments(store).await?;
    let (victim_id, victim_node) = before.iter().next().context("no instance")?;
    let victim = agents
        .iter()
        .find(|a| a.name() == victim_node)
        .context("victim agent")?;
    wait_until(
        "the victim holds its instance",
        Duration::from_secs(10),
        || async { Ok(victim.running().contains_key(victim_id)) },
    )
    .await?;

    victim.pause_heartbeats(true);
    let replaced_after = wait_until("instance replaced", Duration::from_secs(20), || async {
        let now = assignments(store).await?;
        Ok(now.len() == 3
            && !now.contains_key(victim_id)
            && now.values().all(|node| node != victim_node))
    })
    .await?;
    assert!(
        replaced_after <= Duration::from_secs(12),
        "replaced after {replaced_after:?}; the bar is the 10 s grace (+ a resync's slack)"
    );
    assert!(
        replaced_after >= Duration::from_secs(9),
        "replaced after {replaced_after:?}: before the grace period ended"
    );

    // Operators are told why.
    let (notices, _) = store.range(keys::NOTICES.as_bytes(), None).await?;
    let lost: Vec<NoticeRecord> = notices
        .iter()
        .map(|kv| model::decode(&kv.value))
        .collect::<Result<Vec<NoticeRecord>, _>>()?
        .into_iter()
        .filter(|n| n.reason == "NodeLost")
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(&lost[0].name, victim_node);
    assert!(lost[0].warning && lost[0].message.contains("no heartbeat for 10s"));

    // The node returns: its stale instance is taken away.
    victim.pause_heartbeats(false);
    wait_until(
        "stale instance removed from the returning node",
        Duration::from_secs(20),
        || async { Ok(!victim.running().contains_key(victim_id)) },
    )
    .await?;
    assert_eq!(assignments(store).await?.len(), 3);
    eprintln!("replaced after {replaced_after:.2?}");
    cluster.stop().await
}
