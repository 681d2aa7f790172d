//! `gantry get workloads|instances|nodes|events [NAME]`: tables (`-o table|wide`) or documents
//! (`-o json|yaml`), filtered by a label selector (`-l`), and followed with `-w`: a List, then a
//! Watch from the List's revision + 1 that prints a row for every change.

use std::collections::BTreeMap;
use std::time::SystemTime;

use clap::{Args, ValueEnum};
use gantry::client::Client;
use gantry::pb;
use gantry::selector::Selector;

use super::error::{self, UsageError};
use super::events::{self, EventsArgs, Follow, Next};
use super::output::{self, Format, OutputArgs, Table, Tone};
use super::view::{self, InstanceDoc, List, NodeDoc, WorkloadDoc};
use super::{Ctx, print};

/// The kinds of object `get` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resource {
    /// Workloads (also: workload, wl).
    #[value(alias = "workload", alias = "wl")]
    Workloads,
    /// Instances (also: instance, inst, i).
    #[value(alias = "instance", alias = "inst", alias = "i")]
    Instances,
    /// Nodes (also: node, no).
    #[value(alias = "node", alias = "no")]
    Nodes,
    /// Events (also: event, ev).
    #[value(alias = "event", alias = "ev")]
    Events,
}

/// `gantry get`.
#[derive(Args, Debug)]
pub struct GetArgs {
    /// What to list: workloads, instances, nodes or events.
    #[arg(value_enum)]
    pub resource: Resource,
    /// Show only this one (a workload or node name, an instance id).
    pub name: Option<String>,
    /// Label selector (`app=web,tier!=db,disk in (ssd,nvme),!gpu`).
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// After listing, keep printing changes as they happen.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Instances only: of this workload.
    #[arg(long, value_name = "NAME")]
    pub workload: Option<String>,
    /// Instances only: placed on this node.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// One object of any kind `get` shows.
#[derive(Debug, Clone)]
pub enum Object {
    /// A workload.
    Workload(Box<pb::Workload>),
    /// An instance.
    Instance(Box<pb::Instance>),
    /// A node.
    Node(Box<pb::Node>),
}

impl Object {
    /// The name (an id for instances).
    pub fn name(&self) -> String {
        match self {
            Object::Workload(w) => w.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
            Object::Instance(i) => i.id.clone(),
            Object::Node(n) => n.name.clone(),
        }
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let map = match self {
            Object::Workload(w) => w
                .spec
                .as_ref()
                .map(|s| s.labels.clone())
                .unwrap_or_default(),
            Object::Instance(i) => i.labels.clone(),
            Object::Node(n) => n.labels.clone(),
        };
        map.into_iter().collect()
    }

    fn row(&self, wide: bool, now: SystemTime) -> Vec<(String, Tone)> {
        match self {
            Object::Workload(w) => workload_row(w, wide, now),
            Object::Instance(i) => instance_row(i, wide, now),
            Object::Node(n) => node_row(n, wide, now),
        }
    }

    fn doc(&self) -> anyhow::Result<Doc> {
        Ok(match self {
            Object::Workload(w) => Doc::Workload(Box::new(WorkloadDoc::new(w)?)),
            Object::Instance(i) => Doc::Instance(Box::new(InstanceDoc::new(i))),
            Object::Node(n) => Doc::Node(Box::new(NodeDoc::new(n))),
        })
    }
}

/// The document of an [`Object`], its fields in their declared order.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
enum Doc {
    Workload(Box<WorkloadDoc>),
    Instance(Box<InstanceDoc>),
    Node(Box<NodeDoc>),
}

/// The columns of a table of `resource`.
pub fn header(resource: Resource, wide: bool) -> Vec<&'static str> {
    let (mut h, extra): (Vec<&str>, &[&str]) = match resource {
        Resource::Workloads => (
            vec![
                "NAME",
                "KIND",
                "READY",
                "UPDATED",
                "STATUS",
                "GENERATION",
                "AGE",
            ],
            &["UNPLACED", "IMAGE"],
        ),
        Resource::Instances => (
            vec!["NAME", "WORKLOAD", "NODE", "STATE", "RESTARTS", "AGE"],
            &["GENERATION", "IP", "REASON"],
        ),
        Resource::Nodes => (
            vec!["NAME", "STATUS", "CPU", "MEM", "INSTANCES", "AGE"],
            &["ADDRESS", "ARCH", "AGENT", "SUBNET"],
        ),
        Resource::Events => (events::event_header(false), &["REVISION", "SOURCE"]),
    };
    if wide {
        h.extend(extra);
    }
    h
}

/// What a workload's status comes to, in a word.
pub fn workload_status(w: &pb::Workload) -> (String, Tone) {
    let Some(status) = &w.status else {
        return ("Pending".into(), Tone::Warn);
    };
    let condition = |kind: &str| status.conditions.iter().find(|c| c.r#type == kind);
    let holds =
        |kind: &str| condition(kind).is_some_and(|c| c.status == pb::ConditionStatus::True as i32);
    let kind = w.spec.as_ref().map_or(0, |s| s.kind);
    if kind == pb::WorkloadKind::Job as i32 {
        return if holds("Failed") {
            ("Failed".into(), Tone::Bad)
        } else if holds("Complete") {
            ("Complete".into(), Tone::Good)
        } else {
            ("Running".into(), Tone::Warn)
        };
    }
    if status.observed_generation < w.generation {
        return ("Progressing".into(), Tone::Warn);
    }
    if let Some(p) = condition("Progressing") {
        if p.status == pb::ConditionStatus::False as i32 {
            return (p.reason.clone(), Tone::Bad);
        }
        if p.reason == "Rolling" {
            return ("Rolling".into(), Tone::Warn);
        }
    }
    match condition("Available") {
        Some(a) if a.status == pb::ConditionStatus::True as i32 => ("Available".into(), Tone::Good),
        Some(_) => ("Unavailable".into(), Tone::Bad),
        None => ("Progressing".into(), Tone::Warn),
    }
}

/// A workload's table row.
pub fn workload_row(w: &pb::Workload, wide: bool, now: SystemTime) -> Vec<(String, Tone)> {
    let spec = w.spec.clone().unwrap_or_default();
    let counts = w
        .status
        .as_ref()
        .and_then(|s| s.instances)
        .unwrap_or_default();
    let ready_tone = if counts.ready >= counts.desired {
        Tone::Good
    } else {
        Tone::Warn
    };
    let mut row = vec![
        (spec.name.clone(), Tone::Plain),
        (view::workload_kind(spec.kind).to_string(), Tone::Plain),
        (format!("{}/{}", counts.ready, counts.desired), ready_tone),
        (counts.updated.to_string(), Tone::Plain),
        workload_status(w),
        (w.generation.to_string(), Tone::Plain),
        (output::age(w.created_at.as_ref(), now), Tone::Plain),
    ];
    if wide {
        row.push((counts.unplaced.to_string(), Tone::Plain));
        row.push((spec.image, Tone::Plain));
    }
    row
}

/// An instance's state for tables: `Ready`, `Exited(1)`, `Stopping`, …
pub fn instance_state(i: &pb::Instance) -> (String, Tone) {
    let state = view::state_of(i);
    let status = i.status.as_ref();
    let code = status.and_then(|s| s.exit_code);
    let terminal = matches!(state, "Exited" | "OOMKilled" | "Failed");
    if i.stop_requested_at.is_some() && !terminal {
        return ("Stopping".into(), Tone::Warn);
    }
    match state {
        "Ready" => ("Ready".into(), Tone::Good),
        "Exited" => match code {
            Some(0) => ("Exited(0)".into(), Tone::Plain),
            Some(c) => (format!("Exited({c})"), Tone::Bad),
            None => ("Exited".into(), Tone::Bad),
        },
        "OOMKilled" | "Failed" => (state.into(), Tone::Bad),
        "Pending" if i.node.is_empty() && !i.placement_failures.is_empty() => {
            ("Unschedulable".into(), Tone::Bad)
        }
        other => (other.into(), Tone::Warn),
    }
}

/// An instance's table row.
pub fn instance_row(i: &pb::Instance, wide: bool, now: SystemTime) -> Vec<(String, Tone)> {
    let status = i.status.clone().unwrap_or_default();
    let node = if i.node.is_empty() {
        "<none>".to_string()
    } else {
        i.node.clone()
    };
    let mut row = vec![
        (i.id.clone(), Tone::Plain),
        (i.workload.clone(), Tone::Plain),
        (node, Tone::Plain),
        instance_state(i),
        (status.restart_count.to_string(), Tone::Plain),
        (output::age(i.created_at.as_ref(), now), Tone::Plain),
    ];
    if wide {
        let reason = if !status.reason.is_empty() {
            status.reason.clone()
        } else {
            i.placement_failures.first().cloned().unwrap_or_default()
        };
        row.push((i.generation.to_string(), Tone::Plain));
        row.push((or_none(&status.ip), Tone::Plain));
        row.push((or_none(&reason), Tone::Plain));
    }
    row
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "<none>".to_string()
    } else {
        s.to_string()
    }
}

/// A node's STATUS: `Ready`, `NotReady`, with `,SchedulingDisabled` when cordoned and
/// `,Draining` while drained.
pub fn node_status(n: &pb::Node) -> (String, Tone) {
    let ready = view::node_ready(n);
    let mut text = if ready { "Ready" } else { "NotReady" }.to_string();
    if n.cordoned {
        text.push_str(",SchedulingDisabled");
    }
    if n.draining {
        text.push_str(",Draining");
    }
    let tone = match (ready, n.cordoned || n.draining) {
        (false, _) => Tone::Bad,
        (true, true) => Tone::Warn,
        (true, false) => Tone::Good,
    };
    (text, tone)
}

/// `allocated/allocatable` of one resource.
fn usage(allocated: Option<&String>, allocatable: Option<&String>) -> String {
    let show = |q: Option<&String>| q.cloned().unwrap_or_else(|| "?".into());
    format!("{}/{}", show(allocated), show(allocatable))
}

/// A node's table row.
pub fn node_row(n: &pb::Node, wide: bool, now: SystemTime) -> Vec<(String, Tone)> {
    let allocated = n.allocated.clone().unwrap_or_default();
    let allocatable = n.allocatable.clone().unwrap_or_default();
    let mut row = vec![
        (n.name.clone(), Tone::Plain),
        node_status(n),
        (
            usage(allocated.cpu.as_ref(), allocatable.cpu.as_ref()),
            Tone::Plain,
        ),
        (
            usage(allocated.memory.as_ref(), allocatable.memory.as_ref()),
            Tone::Plain,
        ),
        (n.instance_count.to_string(), Tone::Plain),
        (output::age(n.registered_at.as_ref(), now), Tone::Plain),
    ];
    if wide {
        row.push((or_none(&n.address), Tone::Plain));
        row.push((or_none(&n.arch), Tone::Plain));
        row.push((or_none(&n.agent_version), Tone::Plain));
        row.push((or_none(&n.subnet), Tone::Plain));
    }
    row
}

/// Filters of a list.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Label selector (as typed).
    pub selector: String,
    /// Instances: of this workload.
    pub workload: String,
    /// Instances: on this node.
    pub node: String,
}

/// Every object of `resource` matching `query` (all pages), with the revision of the read.
pub async fn list(
    client: &Client,
    resource: Resource,
    query: &Query,
) -> anyhow::Result<(Vec<Object>, i64)> {
    let fail = |s: tonic::Status| error::api(s, client.address());
    let mut items = Vec::new();
    let mut token = String::new();
    let mut revision = 0;
    loop {
        let next = match resource {
            Resource::Workloads => {
                let request = pb::ListWorkloadsRequest {
                    label_selector: query.selector.clone(),
                    kind: pb::WorkloadKind::Unspecified as i32,
                    page_size: 0,
                    page_token: token.clone(),
                };
                let r = client
                    .workloads()
                    .list(client.request(request))
                    .await
                    .map_err(fail)?
                    .into_inner();
                items.extend(
                    r.workloads
                        .into_iter()
                        .map(|w| Object::Workload(Box::new(w))),
                );
                (r.revision, r.next_page_token)
            }
            Resource::Instances => {
                let request = pb::ListInstancesRequest {
                    workload: query.workload.clone(),
                    node: query.node.clone(),
                    label_selector: query.selector.clone(),
                    states: Vec::new(),
                    page_size: 0,
                    page_token: token.clone(),
                };
                let r = client
                    .instances()
                    .list(client.request(request))
                    .await
                    .map_err(fail)?
                    .into_inner();
                items.extend(
                    r.instances
                        .into_iter()
                        .map(|i| Object::Instance(Box::new(i))),
                );
                (r.revision, r.next_page_token)
            }
            Resource::Nodes | Resource::Events => {
                let request = pb::ListNodesRequest {
                    label_selector: query.selector.clone(),
                    page_size: 0,
                    page_token: token.clone(),
                };
                let r = client
                    .nodes()
                    .list(client.request(request))
                    .await
                    .map_err(fail)?
                    .into_inner();
                items.extend(r.nodes.into_iter().map(|n| Object::Node(Box::new(n))));
                (r.revision, r.next_page_token)
            }
        };
        if revision == 0 {
            revision = next.0;
        }
        token = next.1;
        if token.is_empty() {
            return Ok((items, revision));
        }
    }
}

/// One object by name (an id for instances).
pub async fn get_one(client: &Client, resource: Resource, name: &str) -> anyhow::Result<Object> {
    let fail = |s: tonic::Status| error::api(s, client.address());
    Ok(match resource {
        Resource::Workloads => Object::Workload(Box::new(
            client
                .workloads()
                .get(client.request(pb::GetWorkloadRequest { name: name.into() }))
                .await
                .map_err(fail)?
                .into_inner(),
        )),
        Resource::Instances => Object::Instance(Box::new(
            client
                .instances()
                .get(client.request(pb::GetInstanceRequest { id: name.into() }))
                .await
                .map_err(fail)?
                .into_inner(),
        )),
        Resource::Nodes | Resource::Events => Object::Node(Box::new(
            client
                .nodes()
                .get(client.request(pb::GetNodeRequest { name: name.into() }))
                .await
                .map_err(fail)?
                .into_inner(),
        )),
    })
}

fn revision_of(object: &Object) -> i64 {
    match object {
        Object::Workload(w) => w.revision,
        Object::Instance(i) => i.revision,
        Object::Node(n) => n.revision,
    }
}

/// Prints objects as tables or documents, the first batch with a header.
struct Printer {
    resource: Resource,
    format: Format,
    color: bool,
    widths: Option<Vec<usize>>,
}

impl Printer {
    fn table(&self, objects: &[Object]) -> Table {
        let wide = self.format == Format::Wide;
        let mut table = Table::new(&header(self.resource, wide), self.color);
        let now = SystemTime::now();
        for o in objects {
            table.toned_row(o.row(wide, now));
        }
        table
    }

    /// The first output: a table with its header, a list document, or one document.
    /// A watch (`watching`) prints the header even when there is nothing to list yet.
    fn first(
        &mut self,
        objects: &[Object],
        single: bool,
        revision: i64,
        watching: bool,
    ) -> anyhow::Result<()> {
        if self.format.is_table() {
            let table = self.table(objects);
            self.widths = Some(table.widths());
            if objects.is_empty() && !watching {
                eprintln!("no {} found", plural(self.resource));
                return Ok(());
            }
            return print(&table.render());
        }
        let mut docs = objects
            .iter()
            .map(Object::doc)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let text = if single && docs.len() == 1 {
            output::machine(self.format, &docs.remove(0))?
        } else {
            let list = List {
                kind: list_kind(self.resource),
                revision,
                items: docs,
            };
            output::machine(self.format, &list)?
        };
        if let Some(text) = text {
            print(&text)?;
        }
        Ok(())
    }

    /// Output for objects that changed while watching.
    fn more(&mut self, objects: &[Object]) -> anyhow::Result<()> {
        match self.format {
            Format::Table | Format::Wide => {
                let table = self.table(objects);
                let text = match &self.widths {
                    Some(w) => table.render_rows(w),
                    None => table.render(),
                };
                if self.widths.is_none() {
                    self.widths = Some(table.widths());
                }
                print(&text)
            }
            Format::Json => {
                for o in objects {
                    print(&output::json_line(&o.doc()?)?)?;
                }
                Ok(())
            }
            Format::Yaml => {
                for o in objects {
                    print(&format!("---\n{}", output::yaml(&o.doc()?)?))?;
                }
                Ok(())
            }
        }
    }
}

fn plural(resource: Resource) -> &'static str {
    match resource {
        Resource::Workloads => "workloads",
        Resource::Instances => "instances",
        Resource::Nodes => "nodes",
        Resource::Events => "events",
    }
}

fn list_kind(resource: Resource) -> &'static str {
    match resource {
        Resource::Workloads => "WorkloadList",
        Resource::Instances => "InstanceList",
        Resource::Nodes => "NodeList",
        Resource::Events => "EventList",
    }
}

/// `gantry get`.
pub async fn get(ctx: &mut Ctx, args: GetArgs) -> anyhow::Result<()> {
    if args.resource == Resource::Events {
        if args.name.is_some() || args.selector.is_some() {
            return Err(UsageError(
                "events take no NAME or -l; use --workload or --node to filter them".into(),
            )
            .into());
        }
        return events::events(
            ctx,
            EventsArgs {
                watch: args.watch,
                since_revision: None,
                all: false,
                workload: args.workload,
                node: args.node,
                output: args.output,
            },
        )
        .await;
    }
    if args.resource != Resource::Instances && (args.workload.is_some() || args.node.is_some()) {
        return Err(UsageError("--workload and --node filter instances only".into()).into());
    }
    if args.name.is_some() && args.selector.is_some() {
        return Err(UsageError("give a NAME or a selector (-l), not both".into()).into());
    }
    let selector: Option<Selector> = match &args.selector {
        Some(text) => Some(
            gantry::selector::parse(text)
                .map_err(|e| UsageError(format!("invalid selector `{text}`: {e}")))?,
        ),
        None => None,
    };
    let query = Query {
        selector: args.selector.clone().unwrap_or_default(),
        workload: args.workload.clone().unwrap_or_default(),
        node: args.node.clone().unwrap_or_default(),
    };
    let client = ctx.client().await?;
    let mut printer = Printer {
        resource: args.resource,
        format: args.output.output,
        color: ctx.color,
        widths: None,
    };
    let read = |client: Client| {
        let query = query.clone();
        let name = args.name.clone();
        async move {
            match &name {
                Some(name) => {
                    let one = get_one(&client, args.resource, name).await?;
                    let revision = revision_of(&one);
                    anyhow::Ok((vec![one], revision))
                }
                None => list(&client, args.resource, &query).await,
            }
        }
    };
    let (objects, revision) = read(client.clone()).await?;
    printer.first(&objects, args.name.is_some(), revision, args.watch)?;
    if !args.watch {
        return Ok(());
    }
    let kind = match args.resource {
        Resource::Workloads => pb::ObjectKind::Workload,
        Resource::Instances => pb::ObjectKind::Instance,
        Resource::Nodes | Resource::Events => pb::ObjectKind::Node,
    };
    let workload_filter = match (&args.name, args.resource) {
        (Some(name), Resource::Workloads) => name.clone(),
        (Some(_), Resource::Instances) => match objects.first() {
            Some(Object::Instance(i)) => i.workload.clone(),
            _ => String::new(),
        },
        _ => query.workload.clone(),
    };
    let node_filter = match (&args.name, args.resource) {
        (Some(name), Resource::Nodes) => name.clone(),
        _ => query.node.clone(),
    };
    let request = |from_revision| pb::WatchRequest {
        from_revision,
        kinds: vec![kind as i32],
        workload: workload_filter.clone(),
        node: node_filter.clone(),
        notices: false,
    };
    let mut follow = Follow::new(client.clone(), request(revision + 1));
    loop {
        match follow.next().await? {
            Next::Event(e) => {
                use pb::event::Object as O;
                let object = match e.object {
                    Some(O::Workload(w)) => Object::Workload(Box::new(w)),
                    Some(O::Instance(i)) => Object::Instance(Box::new(i)),
                    Some(O::Node(n)) => Object::Node(Box::new(n)),
                    None => continue,
                };
                if args.name.as_ref().is_some_and(|n| *n != object.name()) {
                    continue;
                }
                if selector
                    .as_ref()
                    .is_some_and(|s| !s.matches(&object.labels()))
                {
                    continue;
                }
                printer.more(&[object])?;
            }
            Next::Compacted { .. } => {
                // Changes were lost: list again and go on from there.
                let (objects, revision) = read(client.clone()).await?;
                printer.more(&objects)?;
                follow = Follow::new(client.clone(), request(revision + 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(state: pb::InstanceState, code: Option<i32>) -> pb::Instance {
        pb::Instance {
            id: "web-1".into(),
            workload: "web".into(),
            node: "node-0".into(),
            status: Some(pb::InstanceStatus {
                state: state as i32,
                exit_code: code,
                restart_count: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn instance_states_read_at_a_glance() {
        let state = |i: &pb::Instance| instance_state(i).0;
        assert_eq!(state(&instance(pb::InstanceState::Ready, None)), "Ready");
        assert_eq!(
            state(&instance(pb::InstanceState::Exited, Some(1))),
            "Exited(1)"
        );
        let mut stopping = instance(pb::InstanceState::Running, None);
        stopping.stop_requested_at = Some(prost_types::Timestamp::default());
        assert_eq!(state(&stopping), "Stopping");
        let unplaced = pb::Instance {
            placement_failures: vec!["node-0: insufficient memory".into()],
            ..Default::default()
        };
        assert_eq!(state(&unplaced), "Unschedulable");
        assert_eq!(
            instance_row(&unplaced, false, SystemTime::now())[2].0,
            "<none>"
        );
    }

    #[test]
    fn node_status_reads_like_kubectl() {
        let mut n = pb::Node {
            readiness: pb::NodeReadiness::Ready as i32,
            ..Default::default()
        };
        assert_eq!(node_status(&n).0, "Ready");
        n.cordoned = true;
        assert_eq!(node_status(&n).0, "Ready,SchedulingDisabled");
        n.readiness = pb::NodeReadiness::NotReady as i32;
        n.draining = true;
        assert_eq!(node_status(&n).0, "NotReady,SchedulingDisabled,Draining");
    }

    #[test]
    fn workload_status_summarises_conditions() {
        let condition = |kind: &str, holds: bool, reason: &str| pb::Condition {
            r#type: kind.into(),
            status: if holds {
                pb::ConditionStatus::True
            } else {
                pb::ConditionStatus::False
            } as i32,
            reason: reason.into(),
            ..Default::default()
        };
        let w = |conditions: Vec<pb::Condition>, observed: u64| pb::Workload {
            spec: Some(pb::WorkloadSpec {
                kind: pb::WorkloadKind::Service as i32,
                ..Default::default()
            }),
            generation: 2,
            status: Some(pb::WorkloadStatus {
                observed_generation: observed,
                conditions,
                ..Default::default()
            }),
            ..Default::default()
        };
        let status = |w: &pb::Workload| workload_status(w).0;
        assert_eq!(status(&w(vec![], 1)), "Progressing");
        assert_eq!(
            status(&w(
                vec![
                    condition("Available", true, "x"),
                    condition("Progressing", true, "RolloutComplete")
                ],
                2
            )),
            "Available"
        );
        assert_eq!(
            status(&w(
                vec![condition("Progressing", false, "ProgressDeadlineExceeded")],
                2
            )),
            "ProgressDeadlineExceeded"
        );
        assert_eq!(
            status(&w(vec![condition("Progressing", true, "Rolling")], 2)),
            "Rolling"
        );
    }
}
