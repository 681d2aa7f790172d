//! `Nodes.Top` and `Instances.Top`: resource usage measured by the agents, asked over the
//! node sessions this replica serves (see [`crate::relay::Relays::stats`]).
//!
//! Every node concerned is asked at once; the call takes as long as the slowest answer, at
//! most [`ASK_TIMEOUT`] (plus the agent's measuring window is inside it). A node that cannot
//! be measured does not fail the call: it is listed in `unavailable` with the reason — not
//! connected, connected to another replica (named, from its live key), timed out, or failed.

use std::collections::BTreeMap;
use std::time::Duration;

use gantry::pb;
use tonic::Status;

use super::{Shared, within};
use crate::ops::{self, InstanceQuery, NodeView, PageRequest};
use crate::relay::AskError;

/// How long a node's agent has to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// `Nodes.Top`: the usage of node `name`, or of every node when it is empty.
pub(super) async fn nodes(
    shared: &Shared,
    budget: Duration,
    name: String,
) -> Result<pb::TopNodesResponse, Status> {
    let nodes = nodes_named(shared, budget, &name).await?;
    let asked = futures::future::join_all(
        nodes
            .iter()
            .map(|node| ask(shared, budget, node, Vec::new())),
    )
    .await;
    let mut response = pb::TopNodesResponse::default();
    for (node, answer) in nodes.iter().zip(asked) {
        match answer {
            Ok(reply) => {
                let mut usage = reply.node.unwrap_or_default();
                usage.node = node.record.name.clone();
                response.nodes.push(usage);
            }
            Err(unavailable) => response.unavailable.push(unavailable),
        }
    }
    response.nodes.sort_by(|a, b| a.node.cmp(&b.node));
    response.unavailable.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(response)
}

/// `Instances.Top`: the usage of the running instances of `workload` (empty: all) on `node`
/// (empty: every node).
pub(super) async fn instances(
    shared: &Shared,
    budget: Duration,
    workload: String,
    node: String,
) -> Result<pb::TopInstancesResponse, Status> {
    let store = &*shared.store;
    let nodes = nodes_named(shared, budget, &node).await?;
    // Which nodes to ask, and for which instances (empty: all of the node's).
    let mut targets: Vec<(&NodeView, Vec<String>)> = Vec::new();
    if workload.is_empty() {
        targets.extend(nodes.iter().map(|n| (n, Vec::new())));
    } else {
        within(budget, ops::workloads::get(store, &workload)).await?;
        let query = InstanceQuery {
            workload: Some(workload.clone()),
            node: (!node.is_empty()).then(|| node.clone()),
            selector: String::new(),
            states: Vec::new(),
        };
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for instance in within(budget, all_instances(store, &query)).await? {
            if let Some(on) = instance.record.node.clone() {
                by_node
                    .entry(on)
                    .or_default()
                    .push(instance.record.id.clone());
            }
        }
        for n in &nodes {
            if let Some(ids) = by_node.remove(&n.record.name) {
                targets.push((n, ids));
            }
        }
    }
    let asked = futures::future::join_all(
        targets
            .iter()
            .map(|(n, ids)| ask(shared, budget, n, ids.clone())),
    )
    .await;
    let mut response = pb::TopInstancesResponse::default();
    for ((n, _), answer) in targets.iter().zip(asked) {
        match answer {
            Ok(reply) => {
                for mut usage in reply.instances {
                    if !workload.is_empty() && usage.workload != workload {
                        continue;
                    }
                    usage.node = n.record.name.clone();
                    response.instances.push(usage);
                }
            }
            Err(unavailable) => response.unavailable.push(unavailable),
        }
    }
    response
        .instances
        .sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    response.unavailable.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(response)
}

/// Node `name`, or every node when it is empty. NOT_FOUND for an unknown name.
pub(super) async fn nodes_named(
    shared: &Shared,
    budget: Duration,
    name: &str,
) -> Result<Vec<NodeView>, Status> {
    let store = &*shared.store;
    Ok(if name.is_empty() {
        within(budget, all_nodes(store)).await?
    } else {
        vec![within(budget, ops::get_node(store, name)).await?]
    })
}

/// Every node, read page by page.
async fn all_nodes(store: &dyn crate::store::Store) -> ops::Result<Vec<NodeView>> {
    let mut page = PageRequest {
        size: ops::MAX_PAGE_SIZE,
        token: String::new(),
    };
    let mut nodes = Vec::new();
    loop {
        let found = ops::list_nodes(store, "", &page).await?;
        nodes.extend(found.items);
        if found.next_token.is_empty() {
            return Ok(nodes);
        }
        page.token = found.next_token;
    }
}

/// Every instance matching `query`, read page by page.
async fn all_instances(
    store: &dyn crate::store::Store,
    query: &InstanceQuery,
) -> ops::Result<Vec<ops::InstanceView>> {
    let mut page = PageRequest {
        size: ops::MAX_PAGE_SIZE,
        token: String::new(),
    };
    let mut instances = Vec::new();
    loop {
        let found = ops::list_instances(store, query, &page).await?;
        instances.extend(found.items);
        if found.next_token.is_empty() {
            return Ok(instances);
        }
        page.token = found.next_token;
    }
}

/// Asks `node`'s agent for its usage; what to list when it cannot be measured.
async fn ask(
    shared: &Shared,
    budget: Duration,
    node: &NodeView,
    instance_ids: Vec<String>,
) -> Result<pb::StatsReply, pb::UnavailableNode> {
    connected(node)?;
    let name = &node.record.name;
    shared
        .relays
        .stats(name, instance_ids, ask_timeout(budget))
        .await
        .map_err(|err| unavailable(shared, node, err))
}

/// How long one node may take within a call's `budget`.
pub(super) fn ask_timeout(budget: Duration) -> Duration {
    ASK_TIMEOUT.min(budget.saturating_sub(budget / 10))
}

fn entry(
    node: &NodeView,
    reason: pb::UnavailableReason,
    replica: String,
    message: String,
) -> pb::UnavailableNode {
    pb::UnavailableNode {
        node: node.record.name.clone(),
        reason: reason as i32,
        replica,
        message,
    }
}

/// Whether `node` has a session at all; what to list when it has none.
pub(super) fn connected(node: &NodeView) -> Result<(), pb::UnavailableNode> {
    if node.liveness.is_some() {
        return Ok(());
    }
    let name = &node.record.name;
    Err(entry(
        node,
        pb::UnavailableReason::NotConnected,
        String::new(),
        format!(
            "node {name} is not connected to the scheduler (NotReady); it answers once its \
             agent reconnects"
        ),
    ))
}

/// What to list for a node whose agent could not be asked.
pub(super) fn unavailable(shared: &Shared, node: &NodeView, err: AskError) -> pb::UnavailableNode {
    use pb::UnavailableReason as Reason;
    let name = &node.record.name;
    let here = shared.relays.replica();
    let holder = node.liveness.as_ref().map(|l| l.scheduler.clone());
    match err {
        AskError::NoSession { .. } => match holder {
            Some(holder) if holder != here => entry(
                node,
                Reason::OtherReplica,
                holder.clone(),
                format!(
                    "node {name} is connected to scheduler replica {holder}, not to this one \
                     ({here}); point --addr at {holder} to reach it"
                ),
            ),
            _ => entry(
                node,
                Reason::NotConnected,
                String::new(),
                format!("{err}; it answers once its agent reconnects"),
            ),
        },
        AskError::TimedOut { .. } | AskError::Silent { .. } => {
            entry(node, Reason::TimedOut, String::new(), err.to_string())
        }
        AskError::Ended { .. } | AskError::Failed { .. } | AskError::TooMany { .. } => {
            entry(node, Reason::Failed, String::new(), err.to_string())
        }
    }
}
