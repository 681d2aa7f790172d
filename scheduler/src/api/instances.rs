//! The `Instances` service: list and get instances. Logs and Exec are relayed to the agents
//! over their sessions, which are not served yet.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use gantry::pb;
use gantry::pb::instances_server::Instances;
use tonic::{Request, Response, Status, Streaming};

use super::{Shared, convert, error, within};
use crate::ops;

/// The `gantry.v1.Instances` service over the store.
#[derive(Clone)]
pub struct InstancesService {
    shared: Arc<Shared>,
}

impl InstancesService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        InstancesService { shared }
    }
}

/// A stream of server messages.
type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Instances for InstancesService {
    async fn list(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::ListInstancesRequest {
            workload,
            node,
            label_selector,
            states,
            page_size,
            page_token,
        } = request.into_inner();
        let query = ops::InstanceQuery {
            workload: convert::name_filter(workload),
            node: convert::name_filter(node),
            selector: label_selector,
            states: convert::states_from_pb("states", states)?,
        };
        let page = convert::page(page_size, page_token);
        let store = &*self.shared.store;
        let found = within(budget, ops::list_instances(store, &query, &page)).await?;
        Ok(Response::new(pb::ListInstancesResponse {
            instances: found.items.iter().map(pb::Instance::from).collect(),
            revision: found.revision,
            next_page_token: found.next_token,
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let budget = self.shared.budget(&request);
        let pb::GetInstanceRequest { id } = request.into_inner();
        let instance = within(budget, ops::get_instance(&*self.shared.store, &id)).await?;
        Ok(Response::new((&instance).into()))
    }

    type LogsStream = Streamed<pb::LogChunk>;

    async fn logs(
        &self,
        _request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        Err(error::unimplemented(
            "logs relay arrives with the agent session",
        ))
    }

    type ExecStream = Streamed<pb::ExecOutput>;

    async fn exec(
        &self,
        _request: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        Err(error::unimplemented(
            "exec relay arrives with the agent session",
        ))
    }
}
