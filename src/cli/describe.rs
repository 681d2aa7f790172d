//! `gantry describe workload|instance|node NAME`: everything about one object for a person —
//! spec, status, conditions, instances, recent notices, and for an instance that is not placed,
//! why each node was rejected (the scheduler records the reasons on the instance).

use std::fmt::Write as _;
use std::time::SystemTime;

use clap::Args;
use gantry::client::Client;
use gantry::pb;

use super::error::UsageError;
use super::events;
use super::get::{self, Object, Query, Resource};
use super::output::{self, Table, Tone};
use super::view;
use super::{Ctx, print};

/// Notices shown at most.
const RECENT_EVENTS: usize = 20;

/// `gantry describe`.
#[derive(Args, Debug)]
pub struct DescribeArgs {
    /// workload, instance or node (singular, plural or short forms).
    #[arg(value_enum)]
    pub resource: Resource,
    /// Its name (an id for instances).
    pub name: String,
}

/// A `Label:   value` line, values aligned.
fn field(out: &mut String, label: &str, value: impl std::fmt::Display) {
    let value = value.to_string();
    let value = if value.is_empty() { "<none>" } else { &value };
    let _ = writeln!(out, "{:<16}{value}", format!("{label}:"));
}

fn time(ts: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    match ts {
        Some(t) => format!("{} ({} ago)", output::rfc3339(t), output::age(Some(t), now)),
        None => "<none>".to_string(),
    }
}

fn section(out: &mut String, title: &str, body: &str) {
    let _ = writeln!(out, "{title}:");
    if body.trim().is_empty() {
        out.push_str("  <none>\n");
    } else {
        out.push_str(&output::indent(body, 2));
    }
}

/// The notices of `filter` among the recent events, newest last.
async fn recent_notices(
    client: &Client,
    workload: &str,
    node: &str,
    keep: impl Fn(&pb::Notice) -> bool,
) -> anyhow::Result<Vec<pb::Event>> {
    let head = events::head_revision(client).await?;
    let request = pb::WatchRequest {
        from_revision: events::window_start(head),
        kinds: Vec::new(),
        workload: workload.to_string(),
        node: node.to_string(),
        notices: true,
    };
    let mut notices: Vec<pb::Event> = events::replay(client, request, head)
        .await?
        .into_iter()
        .filter(|e| e.notice.as_ref().is_some_and(&keep))
        .collect();
    let excess = notices.len().saturating_sub(RECENT_EVENTS);
    notices.drain(..excess);
    Ok(notices)
}

fn events_table(notices: &[pb::Event], color: bool, now: SystemTime) -> String {
    let mut table = Table::new(&events::event_header(false), color);
    for e in notices {
        if let Some(row) = events::event_row(e, false, now) {
            table.toned_row(row);
        }
    }
    if table.is_empty() {
        String::new()
    } else {
        table.render()
    }
}

/// `gantry describe`.
pub async fn describe(ctx: &mut Ctx, args: DescribeArgs) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let name = match args.name.split_once('/') {
        Some((_, name)) => name.to_string(),
        None => args.name.clone(),
    };
    let text = match args.resource {
        Resource::Workloads => workload(&client, &name, ctx.color).await?,
        Resource::Instances => instance(&client, &name, ctx.color).await?,
        Resource::Nodes => node(&client, &name, ctx.color).await?,
        Resource::Events => {
            return Err(UsageError(
                "events are not described; use `gantry events --workload NAME` or `--node NAME`"
                    .into(),
            )
            .into());
        }
    };
    print(&text)
}

async fn workload(client: &Client, name: &str, color: bool) -> anyhow::Result<String> {
    let Object::Workload(w) = get::get_one(client, Resource::Workloads, name).await? else {
        return Ok(String::new());
    };
    let now = SystemTime::now();
    let spec = view::spec_of(w.spec.as_ref(), name)?;
    let mut out = String::new();
    field(&mut out, "Name", &spec.name);
    field(&mut out, "Kind", spec.kind);
    field(&mut out, "Labels", output::labels(&spec.labels));
    field(&mut out, "Image", &spec.image);
    let status = w.status.clone().unwrap_or_default();
    field(
        &mut out,
        "Generation",
        format!(
            "{} (observed {}, last good {})",
            w.generation, status.observed_generation, status.last_good_generation
        ),
    );
    field(&mut out, "Revision", w.revision);
    field(&mut out, "Created", time(w.created_at.as_ref(), now));
    field(&mut out, "Updated", time(w.updated_at.as_ref(), now));
    field(&mut out, "Status", get::workload_status(&w).0);
    let c = status.instances.unwrap_or_default();
    let mut counts = format!(
        "{} desired, {} current, {} updated, {} ready, {} unplaced",
        c.desired, c.current, c.updated, c.ready, c.unplaced
    );
    if spec.kind == gantry::workload::Kind::Job || c.failed > 0 {
        let _ = write!(counts, ", {} succeeded, {} failed", c.succeeded, c.failed);
    }
    field(&mut out, "Instances", counts);

    let mut conditions = Table::new(&["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], color);
    for c in &status.conditions {
        let holds = view::condition_status(c.status);
        conditions.toned_row(vec![
            (c.r#type.clone(), Tone::Plain),
            (holds.to_string(), Tone::Plain),
            (c.reason.clone(), Tone::Plain),
            (
                output::age(c.last_transition_time.as_ref(), now),
                Tone::Plain,
            ),
            (c.message.clone(), Tone::Plain),
        ]);
    }
    let body = if conditions.is_empty() {
        String::new()
    } else {
        conditions.render()
    };
    section(&mut out, "Conditions", &body);
    section(&mut out, "Spec", &output::yaml(&spec)?);

    let query = Query {
        workload: name.to_string(),
        ..Query::default()
    };
    let (instances, _) = get::list(client, Resource::Instances, &query).await?;
    let mut table = Table::new(&get::header(Resource::Instances, true), color);
    let mut unplaced = String::new();
    for o in &instances {
        if let Object::Instance(i) = o {
            table.toned_row(get::instance_row(i, true, now));
            if i.node.is_empty() && i.stop_requested_at.is_none() {
                let _ = writeln!(unplaced, "{}:", i.id);
                unplaced.push_str(&output::indent(&why_pending(i), 2));
            }
        }
    }
    let body = if table.is_empty() {
        String::new()
    } else {
        table.render()
    };
    section(&mut out, "Instances", &body);
    if !unplaced.is_empty() {
        section(&mut out, "Not placed (why no node fits)", &unplaced);
    }
    let notices = recent_notices(client, name, "", |_| true).await?;
    section(&mut out, "Events", &events_table(&notices, color, now));
    Ok(out)
}

/// Why an unplaced instance has no node: the scheduler's reason per node, one per line.
fn why_pending(i: &pb::Instance) -> String {
    if i.placement_failures.is_empty() {
        return "the scheduler has not tried to place it yet\n".to_string();
    }
    let mut out = String::new();
    for reason in &i.placement_failures {
        out.push_str(reason);
        out.push('\n');
    }
    out
}

async fn instance(client: &Client, id: &str, color: bool) -> anyhow::Result<String> {
    let Object::Instance(i) = get::get_one(client, Resource::Instances, id).await? else {
        return Ok(String::new());
    };
    let now = SystemTime::now();
    let status = i.status.clone().unwrap_or_default();
    let mut out = String::new();
    field(&mut out, "Name", &i.id);
    field(&mut out, "Workload", &i.workload);
    field(&mut out, "Generation", i.generation);
    field(
        &mut out,
        "Node",
        if i.node.is_empty() { "<none>" } else { &i.node },
    );
    field(&mut out, "Labels", output::labels(&i.labels));
    field(&mut out, "State", get::instance_state(&i).0);
    if !status.reason.is_empty() {
        field(&mut out, "Reason", &status.reason);
    }
    if !status.message.is_empty() {
        field(&mut out, "Message", &status.message);
    }
    if let Some(code) = status.exit_code {
        field(&mut out, "Exit code", code);
    }
    field(&mut out, "Restarts", status.restart_count);
    if let Some(last) = &status.last_exit {
        let reason = if last.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", last.reason)
        };
        field(
            &mut out,
            "Last exit",
            format!(
                "{} code {}{reason}, finished {}",
                view::instance_state(last.state),
                last.exit_code,
                time(last.finished_at.as_ref(), now)
            ),
        );
    }
    if let Some(pull) = &status.pull {
        field(
            &mut out,
            "Image pull",
            format!(
                "{} of {} layers, {} of {} bytes",
                pull.layers_done, pull.layers_total, pull.bytes_done, pull.bytes_total
            ),
        );
    }
    if !status.image_digest.is_empty() {
        field(&mut out, "Image digest", &status.image_digest);
    }
    if !status.ip.is_empty() {
        field(&mut out, "IP", &status.ip);
    }
    field(&mut out, "Created", time(i.created_at.as_ref(), now));
    field(&mut out, "Scheduled", time(i.scheduled_at.as_ref(), now));
    field(&mut out, "Started", time(status.started_at.as_ref(), now));
    field(&mut out, "Ready since", time(status.ready_at.as_ref(), now));
    if status.finished_at.is_some() {
        field(&mut out, "Finished", time(status.finished_at.as_ref(), now));
    }
    if i.stop_requested_at.is_some() {
        field(
            &mut out,
            "Stop requested",
            time(i.stop_requested_at.as_ref(), now),
        );
    }
    field(&mut out, "Revision", i.revision);
    if i.node.is_empty() {
        section(&mut out, "Not placed (why no node fits)", &why_pending(&i));
    }
    let id = i.id.clone();
    let notices = recent_notices(client, &i.workload, "", |n| n.name == id).await?;
    section(&mut out, "Events", &events_table(&notices, color, now));
    Ok(out)
}

async fn node(client: &Client, name: &str, color: bool) -> anyhow::Result<String> {
    let Object::Node(n) = get::get_one(client, Resource::Nodes, name).await? else {
        return Ok(String::new());
    };
    let now = SystemTime::now();
    let mut out = String::new();
    field(&mut out, "Name", &n.name);
    field(&mut out, "Labels", output::labels(&n.labels));
    field(&mut out, "Status", get::node_status(&n).0);
    field(&mut out, "Cordoned", n.cordoned);
    field(&mut out, "Draining", n.draining);
    field(&mut out, "Address", &n.address);
    field(&mut out, "OS/Arch", format!("{}/{}", n.os, n.arch));
    field(&mut out, "OS image", &n.os_image);
    field(&mut out, "Kernel", &n.kernel_version);
    field(&mut out, "Runtime", &n.runtime);
    field(&mut out, "Agent", &n.agent_version);
    field(&mut out, "Subnet", &n.subnet);
    field(&mut out, "Registered", time(n.registered_at.as_ref(), now));
    field(&mut out, "Instances", n.instance_count);
    let mut resources = Table::new(&["RESOURCE", "CAPACITY", "ALLOCATABLE", "ALLOCATED"], color);
    let cpu = |r: &Option<pb::Resources>| r.as_ref().and_then(|r| r.cpu.clone());
    let memory = |r: &Option<pb::Resources>| r.as_ref().and_then(|r| r.memory.clone());
    let pids = |r: &Option<pb::Resources>| r.as_ref().and_then(|r| r.pids.map(|p| p.to_string()));
    let known = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    resources.row(vec![
        "cpu".into(),
        known(cpu(&n.capacity)),
        known(cpu(&n.allocatable)),
        known(cpu(&n.allocated)),
    ]);
    resources.row(vec![
        "memory".into(),
        known(memory(&n.capacity)),
        known(memory(&n.allocatable)),
        known(memory(&n.allocated)),
    ]);
    resources.row(vec![
        "pids".into(),
        known(pids(&n.capacity)),
        known(pids(&n.allocatable)),
        known(pids(&n.allocated)),
    ]);
    section(&mut out, "Resources", &resources.render());
    let query = Query {
        node: name.to_string(),
        ..Query::default()
    };
    let (instances, _) = get::list(client, Resource::Instances, &query).await?;
    let mut table = Table::new(&get::header(Resource::Instances, false), color);
    for o in &instances {
        if let Object::Instance(i) = o {
            table.toned_row(get::instance_row(i, false, now));
        }
    }
    let body = if table.is_empty() {
        String::new()
    } else {
        table.render()
    };
    section(&mut out, "Instances", &body);
    let notices = recent_notices(client, "", name, |_| true).await?;
    section(&mut out, "Events", &events_table(&notices, color, now));
    Ok(out)
}
