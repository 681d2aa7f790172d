//! The `Events` service: the resumable change stream (see `ops::events` for how key events
//! become object changes).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use gantry::pb;
use gantry::pb::events_server::Events;
use tonic::{Request, Response, Status};

use super::{Shared, client_timeout, convert, error, within};
use crate::model::Timestamp;
use crate::ops;

/// The `gantry.v1.Events` service over the store.
#[derive(Clone)]
pub struct EventsService {
    shared: Arc<Shared>,
}

impl EventsService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        EventsService { shared }
    }
}

#[tonic::async_trait]
impl Events for EventsService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // The stream lasts as long as the caller allows; opening it, as long as a unary call.
        let timeout = client_timeout(&request);
        let budget = self.shared.budget(&request);
        let pb::WatchRequest {
            from_revision,
            kinds,
            workload,
            node,
            notices,
        } = request.into_inner();
        let query = ops::WatchQuery {
            from_revision,
            filter: ops::WatchFilter {
                kinds: convert::object_kinds_from_pb("kinds", kinds)?,
                workload: convert::name_filter(workload),
                node: convert::name_filter(node),
                notices,
            },
            bookmark_interval: self.shared.config.bookmark_interval,
            timeout,
        };
        let changes = within(budget, ops::watch(self.shared.store.clone(), query)).await?;
        let events = changes.map(|item| {
            item.map(|change| convert::event_to_pb(change, Timestamp::now()))
                .map_err(Status::from)
        });
        // Tonic ends the call at the first error, so the shutdown's error ends the stream.
        let mut stopping = self.shared.stopping.clone();
        let stopped = futures::stream::once(async move {
            if stopping.wait_for(|stop| *stop).await.is_err() {
                // The server is gone without a shutdown: nothing will end the stream but its
                // client.
                std::future::pending::<()>().await;
            }
            Err(error::shutting_down())
        });
        Ok(Response::new(Box::pin(futures::stream::select(
            events, stopped,
        ))))
    }
}
