//! Rollouts end to end: a scheduler replica in this process on the embedded store, simulated
//! agents on the real NodeSession API. A Service rolls out; an update to an image whose
//! instances crash-loop is rolled back on its own, the status says so, and the instances of the
//! good spec keep running throughout (maxUnavailable 0).

mod support;

use std::time::Duration;

use anyhow::Result;
use gantry::pb;
use gantry::pb::workloads_client::WorkloadsClient;
use gantry_scheduler::model::{self, InstanceRecord, RevisionRecord, WorkloadStatus, keys};
use gantry_scheduler::sim::SimConfig;
use gantry_scheduler::store::Store;
use support::{InProcess, wait_until};

fn web(image: &str) -> pb::ApplyWorkloadRequest {
    pb::ApplyWorkloadRequest {
        spec: Some(pb::WorkloadSpec {
            kind: pb::WorkloadKind::Service as i32,
            name: "web".into(),
            replicas: Some(3),
            image: image.into(),
            ..Default::default()
        }),
        dry_run: false,
        expected_revision: None,
    }
}

async fn status(store: &dyn Store) -> Result<Option<WorkloadStatus>> {
    Ok(
        match store.get(keys::workload_status("web").as_bytes()).await? {
            Some(kv) => Some(model::decode(&kv.value)?),
            None => None,
        },
    )
}

/// Id and generation of every active instance.
async fn active(store: &dyn Store) -> Result<Vec<(String, u64)>> {
    let (kvs, _) = store
        .range(keys::instances_of("web").as_bytes(), None)
        .await?;
    let mut out = Vec::new();
    for kv in kvs {
        let rec: InstanceRecord = model::decode(&kv.value)?;
        if !rec.stopping() {
            out.push((rec.id, rec.generation));
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_update_rolls_back_on_its_own() -> Result<()> {
    let cluster = InProcess::start(3, |name| SimConfig {
        name,
        cpu_millis: 4_000,
        memory_bytes: 8 << 30,
        pids: 10_000,
        crash_images: vec!["web:broken".into()],
        crash_backoff: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await?;
    let store = &*cluster.store;
    let mut api = WorkloadsClient::connect(cluster.addr.clone()).await?;

    api.apply(web("web:1")).await?;
    wait_until(
        "generation 1 rolled out",
        Duration::from_secs(20),
        || async {
            Ok(status(store)
                .await?
                .is_some_and(|s| s.last_good_generation == 1 && s.counts.ready == 3))
        },
    )
    .await?;

    let good = active(store).await?;

    api.apply(web("web:broken")).await?;
    wait_until("rolled back", Duration::from_secs(30), || async {
        Ok(status(store).await?.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.kind == "RolledBack" && c.status)
        }))
    })
    .await?;
    // Generation 3 is the rollback: generation 1's spec, made by the controller.
    let rollback: RevisionRecord = model::decode(
        &store
            .get(keys::revision("web", 3).as_bytes())
            .await?
            .expect("revision 3 written")
            .value,
    )?;
    assert_eq!(rollback.spec.image, "web:1");
    assert!(
        rollback.cause.starts_with("auto-rollback to 1"),
        "{}",
        rollback.cause
    );
    let current = api
        .get(pb::GetWorkloadRequest { name: "web".into() })
        .await?
        .into_inner();
    assert_eq!(current.spec.expect("spec").image, "web:1");

    // Settles on three instances of the good template, all ready; the broken one is gone.
    wait_until(
        "settled on the good spec",
        Duration::from_secs(20),
        || async {
            let now = active(store).await?;
            Ok(now.len() == 3
                && now.iter().all(|(_, g)| *g != 2)
                && status(store).await?.is_some_and(|s| s.counts.ready == 3))
        },
    )
    .await?;
    // The same three instances as before the update: none was replaced by the broken spec.
    assert_eq!(active(store).await?, good);
    let rolled = status(store).await?.expect("status");
    let condition = rolled
        .conditions
        .iter()
        .find(|c| c.kind == "RolledBack")
        .expect("RolledBack condition");
    assert!(
        condition.message.contains("of generation 2"),
        "{}",
        condition.message
    );
    cluster.stop().await
}
