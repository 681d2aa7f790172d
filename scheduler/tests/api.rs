//! The gRPC API end to end: a server on 127.0.0.1:0 over an embedded store in a temp dir,
//! driven by the generated clients, as the CLI and deployment controllers drive it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use gantry::pb;
use gantry::pb::events_client::EventsClient;
use gantry::pb::instances_client::InstancesClient;
use gantry::pb::nodes_client::NodesClient;
use gantry::pb::workloads_client::WorkloadsClient;
use gantry::workload::{Format, Workload, parse};
use gantry_scheduler::api;
use gantry_scheduler::model::{self, InstanceRecord, NodeRecord, Timestamp, keys};
use gantry_scheduler::store::{EmbeddedStore, Store};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;

/// Upper bound on waiting for one event: a guard, never a synchronisation.
const EVENT_WAIT: Duration = Duration::from_secs(30);

/// A served API and what keeps it alive. Dropping it stops the server.
struct Served {
    channel: Channel,
    store: Arc<dyn Store>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start() -> Result<Self> {
        let dir = tempfile::tempdir().context("creating temp dir")?;
        let store: Arc<dyn Store> = Arc::new(
            EmbeddedStore::open(dir.path().join("store.redb"))
                .await
                .context("opening embedded store")?,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(api::serve(listener, store.clone(), async {
            let _ = stopped.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
            .context("connecting to the API")?;
        Ok(Served {
            channel,
            store,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
        })
    }

    fn workloads(&self) -> WorkloadsClient<Channel> {
        WorkloadsClient::new(self.channel.clone())
    }

    /// Stops the server and waits for it to finish.
    async fn stop(mut self) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await?.context("server failed")?;
        }
        Ok(())
    }
}

fn spec_of(yaml: &str) -> pb::WorkloadSpec {
    let workloads: Vec<Workload> = parse(yaml, Format::Yaml).expect("test spec parses");
    pb::WorkloadSpec::from(&workloads[0])
}

fn service(name: &str, replicas: u32, image: &str) -> pb::WorkloadSpec {
    spec_of(&format!(
        "kind: Service\nname: {name}\nimage: {image}\nreplicas: {replicas}\nlabels: {{app: {name}}}\nenv: {{GREETING: hello}}\n"
    ))
}

fn apply(spec: pb::WorkloadSpec) -> pb::ApplyWorkloadRequest {
    pb::ApplyWorkloadRequest {
        spec: Some(spec),
        dry_run: false,
        expected_revision: None,
    }
}

fn get(name: &str) -> pb::GetWorkloadRequest {
    pb::GetWorkloadRequest { name: name.into() }
}

#[tokio::test]
async fn workloads_apply_get_list_scale_history_rollback_delete() -> Result<()> {
    let api = Served::start().await?;
    let mut client = api.workloads();

    let created = client
        .apply(apply(service("web", 2, "busybox:1.36")))
        .await?
        .into_inner();
    assert!(created.created && created.changed);
    let web = created.workload.context("workload")?;
    assert_eq!(web.generation, 1);
    assert!(web.revision > 0);

    let same = client
        .apply(apply(service("web", 2, "busybox:1.36")))
        .await?
        .into_inner();
    assert!(!same.changed && !same.created && same.diff.is_empty());
    assert_eq!(same.workload.context("workload")?.revision, web.revision);

    let changed = client
        .apply(apply(service("web", 3, "busybox:1.36")))
        .await?
        .into_inner();
    assert!(changed.changed);
    assert_eq!(changed.workload.as_ref().context("workload")?.generation, 2);
    let paths: Vec<&str> = changed.changes.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, ["replicas"]);
    assert_eq!(changed.changes[0].old_value.as_deref(), Some("2"));
    assert_eq!(changed.changes[0].new_value.as_deref(), Some("3"));
    assert!(changed.diff.contains("+replicas: 3"), "{}", changed.diff);

    // Compare-and-swap with a revision read before the last change.
    let mut stale = apply(service("web", 4, "busybox:1.36"));
    stale.expected_revision = Some(web.revision);
    let err = client.apply(stale).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    client
        .apply(apply(service("api", 1, "busybox:1.36")))
        .await?;
    let got = client.get(get("web")).await?.into_inner();
    assert_eq!(got.generation, 2);
    assert_eq!(got.spec.context("spec")?.replicas, Some(3));

    let listed = client
        .list(pb::ListWorkloadsRequest {
            label_selector: "app=web".into(),
            kind: pb::WorkloadKind::Service.into(),
            page_size: 0,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    let names: Vec<String> = listed
        .workloads
        .iter()
        .filter_map(|w| w.spec.as_ref().map(|s| s.name.clone()))
        .collect();
    assert_eq!(names, ["web"]);
    assert!(listed.revision >= got.revision);

    let scaled = client
        .scale(pb::ScaleWorkloadRequest {
            name: "web".into(),
            replicas: 5,
            expected_revision: None,
        })
        .await?
        .into_inner();
    assert_eq!(scaled.generation, 3);

    client
        .apply(apply(service("web", 5, "busybox:1.37")))
        .await?;
    let history = client
        .history(pb::WorkloadHistoryRequest { name: "web".into() })
        .await?
        .into_inner();
    let generations: Vec<u64> = history.revisions.iter().map(|r| r.generation).collect();
    assert_eq!(generations, [4, 3, 2, 1]);
    let causes: Vec<&str> = history.revisions.iter().map(|r| r.cause.as_str()).collect();
    assert_eq!(causes, ["apply", "scale", "apply", "apply"]);

    let rolled = client
        .rollback(pb::RollbackWorkloadRequest {
            name: "web".into(),
            to_generation: None,
        })
        .await?
        .into_inner();
    assert_eq!(rolled.generation, 5);
    let spec = rolled.spec.context("spec")?;
    assert_eq!(spec.image, "busybox:1.36");
    assert_eq!(spec.replicas, Some(5));
    let err = client
        .rollback(pb::RollbackWorkloadRequest {
            name: "web".into(),
            to_generation: Some(99),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    let deleted = client
        .delete(pb::DeleteWorkloadRequest {
            name: "web".into(),
            expected_revision: None,
        })
        .await?
        .into_inner();
    assert_eq!(deleted.workload.context("workload")?.generation, 5);
    let err = client.get(get("web")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    api.stop().await
}

#[tokio::test]
async fn errors_name_the_field_and_say_what_to_do() -> Result<()> {
    let api = Served::start().await?;
    let mut client = api.workloads();

    let mut bad = service("web", 1, "busybox");
    bad.image = String::new();
    bad.kind = pb::WorkloadKind::Job.into();
    let err = client.apply(apply(bad)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let lines: Vec<&str> = err.message().lines().collect();
    assert!(lines.iter().any(|l| l.starts_with("image: ")), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("replicas: ")),
        "{lines:?}"
    );

    let err = client
        .apply(pb::ApplyWorkloadRequest {
            spec: None,
            dry_run: false,
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("spec: "), "{}", err.message());

    let err = client.get(get("nope")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "workload nope not found; see `gantry get workloads`"
    );

    client.apply(apply(service("web", 1, "busybox"))).await?;
    let job = spec_of("kind: Job\nname: web\nimage: busybox\n");
    let err = client.apply(apply(job)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "kind cannot change from Service to Job; delete web first"
    );

    let err = client
        .list(pb::ListWorkloadsRequest {
            label_selector: "app in".into(),
            kind: 0,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("label_selector: "),
        "{}",
        err.message()
    );

    // Over the 1 MiB request limit.
    let mut huge = service("big", 1, "busybox");
    huge.env.insert("BLOB".into(), "x".repeat(1_100_000));
    let err = client.apply(apply(huge)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");

    let err = InstancesClient::new(api.channel.clone())
        .logs(pb::LogsRequest {
            instance_id: "web-1".into(),
            tail_lines: None,
            follow: false,
            since: None,
            stream: 0,
            previous: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(
        err.message(),
        "instance web-1 not found; see `gantry get instances`"
    );
    api.stop().await
}

/// The next event of a watch, or an error if none comes in time.
async fn next_event(stream: &mut tonic::Streaming<pb::Event>) -> Result<pb::Event> {
    tokio::time::timeout(EVENT_WAIT, stream.message())
        .await
        .context("no event in time")??
        .context("stream ended")
}

#[tokio::test]
async fn watch_sees_applies_as_created_then_updated() -> Result<()> {
    let api = Served::start().await?;
    let mut client = api.workloads();
    let mut events = EventsClient::new(api.channel.clone())
        .watch(pb::WatchRequest {
            from_revision: 0,
            kinds: vec![pb::ObjectKind::Workload.into()],
            workload: String::new(),
            node: String::new(),
            notices: false,
        })
        .await?
        .into_inner();

    client.apply(apply(service("web", 1, "busybox"))).await?;
    client.apply(apply(service("web", 2, "busybox"))).await?;

    let created = next_event(&mut events).await?;
    assert_eq!(created.r#type(), pb::EventType::Created);
    let updated = next_event(&mut events).await?;
    assert_eq!(updated.r#type(), pb::EventType::Updated);
    assert!(updated.revision > created.revision);
    let Some(pb::event::Object::Workload(workload)) = updated.object else {
        anyhow::bail!("not a workload event: {updated:?}");
    };
    assert_eq!(workload.generation, 2);
    assert_eq!(workload.revision, updated.revision);

    // Resuming from the first event's revision replays both.
    let mut replay = EventsClient::new(api.channel.clone())
        .watch(pb::WatchRequest {
            from_revision: created.revision,
            kinds: Vec::new(),
            workload: "web".into(),
            node: String::new(),
            notices: false,
        })
        .await?
        .into_inner();
    assert_eq!(next_event(&mut replay).await?.revision, created.revision);
    assert_eq!(next_event(&mut replay).await?.revision, updated.revision);

    // Shutting down ends open streams, so that their clients resume elsewhere.
    let stopped = tokio::spawn(api.stop());
    let end = tokio::time::timeout(EVENT_WAIT, events.message())
        .await
        .context("the stream did not end")?;
    let err = end.expect_err("the stream ends with an error");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    stopped.await?
}

#[tokio::test]
async fn watch_from_a_compacted_revision_is_out_of_range() -> Result<()> {
    let api = Served::start().await?;
    let mut client = api.workloads();
    for replicas in 1..=3 {
        client
            .apply(apply(service("web", replicas, "busybox")))
            .await?;
    }
    let now = api.store.current_revision().await?;
    api.store.compact(now).await?;
    let err = EventsClient::new(api.channel.clone())
        .watch(pb::WatchRequest {
            from_revision: 2,
            kinds: Vec::new(),
            workload: String::new(),
            node: String::new(),
            notices: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert_eq!(
        err.message(),
        format!("revision 2 has been compacted; oldest available is {now}")
    );
    let compacted = err
        .metadata()
        .get("gantry-compact-revision")
        .context("compact revision metadata")?
        .to_str()?;
    assert_eq!(compacted, now.to_string());
    api.stop().await
}

#[tokio::test]
async fn nodes_and_instances_are_served_from_the_store() -> Result<()> {
    let api = Served::start().await?;
    let store = &*api.store;
    api.workloads()
        .apply(apply(service("web", 1, "busybox")))
        .await?;
    let node = NodeRecord {
        name: "n1".into(),
        ..NodeRecord::default()
    };
    store
        .put(keys::node("n1").as_bytes(), &model::encode(&node))
        .await?;
    let instance = InstanceRecord {
        id: "web-a1".into(),
        workload: "web".into(),
        generation: 1,
        node: Some("n1".into()),
        created_at: Timestamp(1),
        scheduled_at: Some(Timestamp(2)),
        placement_failures: Vec::new(),
        stop_requested_at: None,
    };
    store
        .put(
            keys::instance("web", "web-a1").as_bytes(),
            &model::encode(&instance),
        )
        .await?;

    let mut nodes = NodesClient::new(api.channel.clone());
    let n1 = nodes
        .get(pb::GetNodeRequest { name: "n1".into() })
        .await?
        .into_inner();
    assert_eq!(n1.readiness(), pb::NodeReadiness::NotReady);
    assert_eq!(n1.instance_count, 1);
    let drained = nodes
        .drain(pb::DrainNodeRequest {
            name: "n1".into(),
            dry_run: false,
        })
        .await?
        .into_inner();
    assert_eq!(drained.instances_to_move, ["web-a1"]);
    let node = drained.node.context("node")?;
    assert!(node.cordoned && node.draining);
    let node = nodes
        .uncordon(pb::UncordonNodeRequest { name: "n1".into() })
        .await?
        .into_inner();
    assert!(!node.cordoned && !node.draining);

    let mut instances = InstancesClient::new(api.channel.clone());
    let listed = instances
        .list(pb::ListInstancesRequest {
            workload: String::new(),
            node: "n1".into(),
            label_selector: "app=web".into(),
            states: vec![pb::InstanceState::Pending.into()],
            page_size: 0,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(listed.instances.len(), 1);
    assert_eq!(listed.instances[0].labels["app"], "web");
    let one = instances
        .get(pb::GetInstanceRequest {
            id: "web-a1".into(),
        })
        .await?
        .into_inner();
    assert_eq!(one.node, "n1");

    // Logs and exec are relayed over node sessions; this server has none.
    let logs = |id: &str| pb::LogsRequest {
        instance_id: id.into(),
        ..Default::default()
    };
    let err = instances.logs(logs("web-a1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().starts_with("node n1 is not connected"),
        "{err:?}"
    );
    let live = model::Liveness {
        scheduler: "sched-b".into(),
        since: Timestamp(3),
    };
    store
        .put(keys::live("n1").as_bytes(), &model::encode(&live))
        .await?;
    let err = instances.logs(logs("web-a1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("sched-b"), "{err:?}");
    let start = pb::ExecInput {
        input: Some(pb::exec_input::Input::Start(pb::ExecStart {
            instance_id: "web-a1".into(),
            command: vec!["true".into()],
            ..Default::default()
        })),
    };
    let err = instances
        .exec(tokio_stream::iter(vec![start]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("not running"), "{err:?}");
    api.stop().await
}

#[tokio::test]
async fn health_and_reflection_are_served() -> Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

    let api = Served::start().await?;
    let mut health = HealthClient::new(api.channel.clone());
    for service in ["", "gantry.v1.Workloads", "gantry.v1.Events"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        assert_eq!(status.status(), ServingStatus::Serving, "{service:?}");
    }

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(api.channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let response: ServerReflectionResponse =
        responses.message().await?.context("a reflection answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"gantry.v1.Workloads"), "{names:?}");
    api.stop().await
}
