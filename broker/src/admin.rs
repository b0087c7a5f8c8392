//! The `Admin` service for operators (operator certificates only): queue depths and
//! connection state per agency.

use std::collections::BTreeSet;
use std::sync::Arc;

use lienthong_proto::pb::{self, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::auth;
use crate::error::BrokerError;

pub struct AdminService {
    pub(crate) shared: Arc<Shared>,
}

impl AdminService {
    fn queues_inner(&self) -> Result<pb::QueuesResponse, BrokerError> {
        let now = lienthong_proto::now_ms();
        let agencies: BTreeSet<String> = self
            .shared
            .store
            .agencies()?
            .into_iter()
            .map(|(code, _)| code)
            .collect();
        let mut queues = Vec::with_capacity(agencies.len());
        for agency in agencies {
            let stats = self.shared.store.queue_stats(&agency)?;
            let session = self.shared.hub.info(&agency);
            queues.push(pb::QueueInfo {
                connected: session.is_some(),
                pending: stats.pending,
                pending_bytes: stats.pending_bytes,
                oldest_pending_seconds: stats
                    .oldest_enqueued_ms
                    .map(|t| u64::try_from((now - t).max(0) / 1000).unwrap_or(0))
                    .unwrap_or(0),
                in_flight: session.map(|s| s.in_flight).unwrap_or(0),
                connected_since_ms: session.map(|s| s.connected_since_ms).unwrap_or(0),
                last_seen_ms: session.map(|s| s.last_seen_ms).unwrap_or(0),
                agency,
            });
        }
        Ok(pb::QueuesResponse { queues })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn queues(
        &self,
        request: Request<pb::QueuesRequest>,
    ) -> Result<Response<pb::QueuesResponse>, Status> {
        let operator = auth::operator(&request)?;
        tracing::debug!(operator, "admin queues");
        Ok(Response::new(self.queues_inner()?))
    }
}
