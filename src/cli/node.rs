//! `gantry node ls|cordon|uncordon|drain NAME`.

use clap::{Args, Subcommand};
use gantry::pb;

use super::error;
use super::get::{self, GetArgs, Resource};
use super::output::OutputArgs;
use super::{Ctx, print};

/// `gantry node …`.
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List nodes (as `gantry get nodes`).
    #[command(visible_alias = "list")]
    Ls(LsArgs),
    /// Place no new instances on a node; running ones stay.
    Cordon {
        /// The node.
        name: String,
    },
    /// Let instances be placed on a cordoned or drained node again.
    Uncordon {
        /// The node.
        name: String,
    },
    /// Cordon a node and move its Service and Job instances elsewhere (Daemon instances stay).
    Drain {
        /// The node.
        name: String,
        /// Only print what would be moved; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `gantry node ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// Label selector over node labels.
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// After listing, keep printing changes as they happen.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `node/NAME` or `NAME` → `NAME`.
fn node_name(arg: &str) -> String {
    match arg.split_once('/') {
        Some(("node" | "nodes" | "no", name)) => name.to_string(),
        _ => arg.to_string(),
    }
}

/// `a, b, c`, or `none`.
fn ids(list: &[String]) -> String {
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

/// `gantry node …`.
pub async fn node(ctx: &mut Ctx, command: NodeCommand) -> anyhow::Result<()> {
    match command {
        NodeCommand::Ls(args) => {
            get::get(
                ctx,
                GetArgs {
                    resource: Resource::Nodes,
                    name: None,
                    selector: args.selector,
                    watch: args.watch,
                    workload: None,
                    node: None,
                    output: args.output,
                },
            )
            .await
        }
        NodeCommand::Cordon { name } => {
            let name = node_name(&name);
            let client = ctx.client().await?;
            let request = pb::CordonNodeRequest { name: name.clone() };
            client
                .nodes()
                .cordon(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?;
            print(&format!("node/{name} cordoned\n"))
        }
        NodeCommand::Uncordon { name } => {
            let name = node_name(&name);
            let client = ctx.client().await?;
            let request = pb::UncordonNodeRequest { name: name.clone() };
            client
                .nodes()
                .uncordon(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?;
            print(&format!("node/{name} uncordoned\n"))
        }
        NodeCommand::Drain { name, dry_run } => {
            let name = node_name(&name);
            let client = ctx.client().await?;
            let request = pb::DrainNodeRequest {
                name: name.clone(),
                dry_run,
            };
            let outcome = client
                .nodes()
                .drain(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?
                .into_inner();
            let moving = &outcome.instances_to_move;
            let staying = &outcome.instances_staying;
            let text = if dry_run {
                format!(
                    "node/{name} would be cordoned and drained (dry run)\n\
                     would move {} instance(s): {}\n\
                     would keep {} daemon instance(s): {}\n",
                    moving.len(),
                    ids(moving),
                    staying.len(),
                    ids(staying)
                )
            } else {
                format!(
                    "node/{name} cordoned and draining\n\
                     moving {} instance(s): {}\n\
                     keeping {} daemon instance(s): {}\n",
                    moving.len(),
                    ids(moving),
                    staying.len(),
                    ids(staying)
                )
            };
            print(&text)
        }
    }
}
