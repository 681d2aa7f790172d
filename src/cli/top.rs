//! `gantry top nodes [NAME]` and `gantry top instances [-w WORKLOAD] [--node NODE]`: CPU and
//! memory in use, measured by the agents when asked (CPU as a rate over a quarter second), as
//! `kubectl top` shows them: CPU in millicores, memory in MiB.
//!
//! A node that cannot be measured (not connected, connected to another scheduler replica, no
//! answer within 5s) does not fail the command: tables name it on stderr, `-o json|yaml` list
//! it under `unavailable`.
//!
//! ```text
//! NodeUsageList      {kind, items: [{kind: "NodeUsage", name, cpuCores, cpuCapacityCores,
//!                     cpuPercent, memoryBytes, memoryTotalBytes, memoryPercent, windowSeconds}],
//!                     unavailable: [{node, reason, replica, message}]}
//! InstanceUsageList  {kind, items: [{kind: "InstanceUsage", name, workload, node, cpuCores,
//!                     memoryBytes, memoryLimitBytes, pids}], unavailable: [..]}
//! ```
//! `reason` is one of `NotConnected`, `OtherReplica`, `TimedOut`, `Failed`; `replica` is null
//! unless another replica holds the node; `memoryLimitBytes` is null when unlimited.

use clap::{Args, Subcommand};
use gantry::pb;
use serde::Serialize;

use super::error;
use super::output::{Format, OutputArgs, Table, machine};
use super::{Ctx, print};

/// `gantry top …`.
#[derive(Subcommand, Debug)]
pub enum TopCommand {
    /// CPU and memory in use on each node (or one).
    #[command(visible_alias = "node")]
    Nodes(NodesArgs),
    /// CPU, memory and processes of the running instances.
    #[command(visible_alias = "instance")]
    Instances(InstancesArgs),
}

/// `gantry top nodes`.
#[derive(Args, Debug)]
pub struct NodesArgs {
    /// Only this node.
    pub name: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `gantry top instances`.
#[derive(Args, Debug)]
pub struct InstancesArgs {
    /// Only instances of this workload.
    #[arg(short = 'w', long, value_name = "WORKLOAD")]
    pub workload: Option<String>,
    /// Only instances on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A node's usage.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeUsageDoc {
    /// Always `NodeUsage`.
    pub kind: &'static str,
    /// Node name.
    pub name: String,
    /// CPU in use, in cores.
    pub cpu_cores: f64,
    /// CPUs online.
    pub cpu_capacity_cores: f64,
    /// CPU in use, in percent of the CPUs online.
    pub cpu_percent: f64,
    /// Memory in use (total minus available), in bytes.
    pub memory_bytes: u64,
    /// Memory of the machine, in bytes.
    pub memory_total_bytes: u64,
    /// Memory in use, in percent of the total.
    pub memory_percent: f64,
    /// How long the CPU rate was measured over, in seconds.
    pub window_seconds: f64,
}

/// An instance's usage.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceUsageDoc {
    /// Always `InstanceUsage`.
    pub kind: &'static str,
    /// Instance id.
    pub name: String,
    /// Its workload.
    pub workload: String,
    /// Its node.
    pub node: String,
    /// CPU in use, in cores.
    pub cpu_cores: f64,
    /// Memory working set, in bytes.
    pub memory_bytes: u64,
    /// Memory limit in bytes; `null` when unlimited.
    pub memory_limit_bytes: Option<u64>,
    /// Processes and threads.
    pub pids: u64,
}

/// A node that could not be measured.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnavailableDoc {
    /// Node name.
    pub node: String,
    /// `NotConnected`, `OtherReplica`, `TimedOut` or `Failed`.
    pub reason: &'static str,
    /// The replica holding the node's session, with `OtherReplica`.
    pub replica: Option<String>,
    /// What happened.
    pub message: String,
}

/// A list of usages (or images) and the nodes left out.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageList<T> {
    /// `NodeUsageList` or `InstanceUsageList`.
    pub kind: &'static str,
    /// The usages.
    pub items: Vec<T>,
    /// Nodes that could not be measured.
    pub unavailable: Vec<UnavailableDoc>,
}

impl<T: Serialize> UsageList<T> {
    /// A list of `kind` with the nodes `unavailable` left out.
    pub fn new(kind: &'static str, items: Vec<T>, unavailable: &[pb::UnavailableNode]) -> Self {
        UsageList {
            kind,
            items,
            unavailable: unavailable.iter().map(UnavailableDoc::new).collect(),
        }
    }

    /// Prints the list: JSON or YAML when asked; else the table `draw` makes, a warning per
    /// node left out (`not_done`: what was not done to it), and `empty` when nothing is there.
    pub fn show(
        &self,
        format: Format,
        draw: impl FnOnce(&Self) -> String,
        not_done: &str,
        empty: &str,
    ) -> anyhow::Result<()> {
        if let Some(text) = machine(format, self)? {
            return print(&text);
        }
        print(&draw(self))?;
        for u in &self.unavailable {
            eprintln!("warning: node {} not {not_done}: {}", u.node, u.message);
        }
        if self.items.is_empty() && self.unavailable.is_empty() {
            eprintln!("{empty}");
        }
        Ok(())
    }
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (part / whole * 1000.0).round() / 10.0
    } else {
        0.0
    }
}

impl NodeUsageDoc {
    fn new(u: &pb::NodeUsage) -> Self {
        NodeUsageDoc {
            kind: "NodeUsage",
            name: u.node.clone(),
            cpu_cores: u.cpu_cores,
            cpu_capacity_cores: u.cpu_capacity_cores,
            cpu_percent: percent(u.cpu_cores, u.cpu_capacity_cores),
            memory_bytes: u.memory_used_bytes,
            memory_total_bytes: u.memory_total_bytes,
            memory_percent: percent(u.memory_used_bytes as f64, u.memory_total_bytes as f64),
            window_seconds: u
                .window
                .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9),
        }
    }
}

impl InstanceUsageDoc {
    fn new(u: &pb::InstanceUsage) -> Self {
        InstanceUsageDoc {
            kind: "InstanceUsage",
            name: u.instance_id.clone(),
            workload: u.workload.clone(),
            node: u.node.clone(),
            cpu_cores: u.cpu_cores,
            memory_bytes: u.memory_working_set_bytes,
            memory_limit_bytes: (u.memory_limit_bytes > 0).then_some(u.memory_limit_bytes),
            pids: u.pids,
        }
    }
}

impl UnavailableDoc {
    /// The document of a node left out.
    pub fn new(u: &pb::UnavailableNode) -> Self {
        use pb::UnavailableReason as R;
        let reason = match R::try_from(u.reason).unwrap_or(R::Unspecified) {
            R::NotConnected => "NotConnected",
            R::OtherReplica => "OtherReplica",
            R::TimedOut => "TimedOut",
            R::Failed | R::Unspecified => "Failed",
        };
        UnavailableDoc {
            node: u.node.clone(),
            reason,
            replica: (!u.replica.is_empty()).then(|| u.replica.clone()),
            message: u.message.clone(),
        }
    }
}

/// Cores as `kubectl top` writes them: whole millicores (`250m`).
pub fn millicores(cores: f64) -> String {
    format!("{}m", (cores * 1000.0).round() as u64)
}

/// Bytes as `kubectl top` writes them: whole MiB (`64Mi`).
pub fn mebibytes(bytes: u64) -> String {
    format!("{}Mi", bytes / (1024 * 1024))
}

/// `gantry top …`.
pub async fn top(ctx: &mut Ctx, command: TopCommand) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match command {
        TopCommand::Nodes(args) => {
            let name = args.name.map(|n| match n.split_once('/') {
                Some(("node" | "nodes" | "no", name)) => name.to_owned(),
                _ => n,
            });
            let request = pb::TopNodesRequest {
                name: name.unwrap_or_default(),
            };
            let response = client
                .nodes()
                .top(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?
                .into_inner();
            let items = response.nodes.iter().map(NodeUsageDoc::new).collect();
            let format = args.output.output;
            UsageList::new("NodeUsageList", items, &response.unavailable).show(
                format,
                |list| nodes_table(list, format, ctx.color),
                "measured",
                "no nodes found",
            )
        }
        TopCommand::Instances(args) => {
            let request = pb::TopInstancesRequest {
                workload: args.workload.unwrap_or_default(),
                node: args.node.unwrap_or_default(),
            };
            let response = client
                .instances()
                .top(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?
                .into_inner();
            let items = response
                .instances
                .iter()
                .map(InstanceUsageDoc::new)
                .collect();
            let format = args.output.output;
            UsageList::new("InstanceUsageList", items, &response.unavailable).show(
                format,
                |list| instances_table(list, format, ctx.color),
                "measured",
                "no running instances found",
            )
        }
    }
}

fn nodes_table(list: &UsageList<NodeUsageDoc>, format: Format, color: bool) -> String {
    if list.items.is_empty() {
        return String::new();
    }
    let wide = format == Format::Wide;
    let mut header = vec!["NAME", "CPU(cores)", "CPU%", "MEMORY", "MEMORY%"];
    if wide {
        header.extend(["CPUS", "MEMORY TOTAL"]);
    }
    let mut table = Table::new(&header, color);
    for n in &list.items {
        let mut row = vec![
            n.name.clone(),
            millicores(n.cpu_cores),
            format!("{:.0}%", n.cpu_percent),
            mebibytes(n.memory_bytes),
            format!("{:.0}%", n.memory_percent),
        ];
        if wide {
            row.push(format!("{}", n.cpu_capacity_cores));
            row.push(mebibytes(n.memory_total_bytes));
        }
        table.row(row);
    }
    table.render()
}

fn instances_table(list: &UsageList<InstanceUsageDoc>, format: Format, color: bool) -> String {
    if list.items.is_empty() {
        return String::new();
    }
    let wide = format == Format::Wide;
    let mut header = vec![
        "INSTANCE",
        "WORKLOAD",
        "NODE",
        "CPU(cores)",
        "MEMORY",
        "PIDS",
    ];
    if wide {
        header.push("MEMORY LIMIT");
    }
    let mut table = Table::new(&header, color);
    for i in &list.items {
        let mut row = vec![
            i.name.clone(),
            i.workload.clone(),
            i.node.clone(),
            millicores(i.cpu_cores),
            mebibytes(i.memory_bytes),
            i.pids.to_string(),
        ];
        if wide {
            row.push(i.memory_limit_bytes.map_or("none".into(), mebibytes));
        }
        table.row(row);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_as_kubectl_top_writes_them() {
        assert_eq!(millicores(0.25), "250m");
        assert_eq!(millicores(1.0004), "1000m");
        assert_eq!(mebibytes(64 * 1024 * 1024 + 5), "64Mi");
        assert_eq!(percent(1.0, 4.0), 25.0);
        assert_eq!(percent(1.0, 0.0), 0.0);
    }

    #[test]
    fn tables_and_documents() {
        let list = UsageList {
            kind: "InstanceUsageList",
            items: vec![InstanceUsageDoc::new(&pb::InstanceUsage {
                instance_id: "web-1".into(),
                workload: "web".into(),
                node: "n1".into(),
                cpu_cores: 0.5,
                memory_working_set_bytes: 3 * 1024 * 1024,
                memory_limit_bytes: 0,
                pids: 2,
            })],
            unavailable: vec![UnavailableDoc::new(&pb::UnavailableNode {
                node: "n2".into(),
                reason: pb::UnavailableReason::OtherReplica as i32,
                replica: "sched-b".into(),
                message: "elsewhere".into(),
            })],
        };
        let text = instances_table(&list, Format::Table, false);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "INSTANCE",
                "WORKLOAD",
                "NODE",
                "CPU(cores)",
                "MEMORY",
                "PIDS"
            ]
        );
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(row, ["web-1", "web", "n1", "500m", "3Mi", "2"]);
        let json: serde_json::Value =
            serde_json::from_str(&super::super::output::json(&list).unwrap()).unwrap();
        assert_eq!(
            json["items"][0]["memoryLimitBytes"],
            serde_json::Value::Null
        );
        assert_eq!(json["unavailable"][0]["reason"], "OtherReplica");
        assert_eq!(json["unavailable"][0]["replica"], "sched-b");
    }
}
