//! The `Nodes` service: list, get, cordon, uncordon and drain nodes; Top asks the agents
//! (see [`super::top`]).

use std::sync::Arc;

use gantry::pb;
use gantry::pb::nodes_server::Nodes;
use tonic::{Request, Response, Status};

use super::{Shared, convert, within};
use crate::ops;

/// The `gantry.v1.Nodes` service over the store.
#[derive(Clone)]
pub struct NodesService {
    shared: Arc<Shared>,
}

impl NodesService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        NodesService { shared }
    }
}

#[tonic::async_trait]
impl Nodes for NodesService {
    async fn list(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::ListNodesRequest {
            label_selector,
            page_size,
            page_token,
        } = request.into_inner();
        let page = convert::page(page_size, page_token);
        let store = &*self.shared.store;
        let found = within(budget, ops::list_nodes(store, &label_selector, &page)).await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: found.items.iter().map(pb::Node::from).collect(),
            revision: found.revision,
            next_page_token: found.next_token,
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let budget = self.shared.budget(&request);
        let pb::GetNodeRequest { name } = request.into_inner();
        let node = within(budget, ops::get_node(&*self.shared.store, &name)).await?;
        Ok(Response::new((&node).into()))
    }

    async fn cordon(
        &self,
        request: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let budget = self.shared.budget(&request);
        let pb::CordonNodeRequest { name } = request.into_inner();
        let node = within(budget, ops::cordon(&*self.shared.store, &name)).await?;
        Ok(Response::new((&node).into()))
    }

    async fn uncordon(
        &self,
        request: Request<pb::UncordonNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let budget = self.shared.budget(&request);
        let pb::UncordonNodeRequest { name } = request.into_inner();
        let node = within(budget, ops::uncordon(&*self.shared.store, &name)).await?;
        Ok(Response::new((&node).into()))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::DrainNodeRequest { name, dry_run } = request.into_inner();
        let outcome = within(budget, ops::drain(&*self.shared.store, &name, dry_run)).await?;
        Ok(Response::new(pb::DrainNodeResponse {
            node: Some((&outcome.node).into()),
            instances_to_move: outcome.to_move,
            instances_staying: outcome.staying,
        }))
    }

    async fn top(
        &self,
        request: Request<pb::TopNodesRequest>,
    ) -> Result<Response<pb::TopNodesResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::TopNodesRequest { name } = request.into_inner();
        let response = super::top::nodes(&self.shared, budget, name).await?;
        Ok(Response::new(response))
    }
}
