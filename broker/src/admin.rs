//! The `Admin` service for operators (operator certificates only): queue depths and
//! connection state per agency, dead letters and their redrive.

use std::collections::BTreeSet;
use std::sync::Arc;

use lienthong_proto::AgencyCode;
use lienthong_proto::pb::{self, DeliveryState, admin_server::Admin};
use prost::Message;
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

    fn dead_letter_view(
        &self,
        entry: crate::store::DeadLetterEntry,
    ) -> Result<pb::DeadLetter, BrokerError> {
        let document = self
            .shared
            .store
            .document(&entry.message_id)?
            .unwrap_or_default();
        Ok(pb::DeadLetter {
            message_id: entry.message_id,
            agency: entry.recipient,
            state: entry.record.state,
            reason: entry.record.reason,
            at_ms: entry.record.dead_at_ms,
            sender: document.sender,
            business_id: document.business_id,
            attempts: entry.record.attempts,
        })
    }

    fn dead_letters_inner(&self, agency: &str) -> Result<pb::DeadLettersResponse, BrokerError> {
        let filter = if agency.is_empty() {
            None
        } else {
            Some(AgencyCode::parse(agency)?)
        };
        let entries = self
            .shared
            .store
            .dead_letters(filter.as_ref().map(AgencyCode::as_str))?;
        let dead_letters = entries
            .into_iter()
            .map(|e| self.dead_letter_view(e))
            .collect::<Result<_, _>>()?;
        Ok(pb::DeadLettersResponse { dead_letters })
    }

    async fn redrive_inner(
        &self,
        request: pb::RedriveRequest,
    ) -> Result<pb::RedriveResponse, BrokerError> {
        let agency = if request.agency.is_empty() {
            None
        } else {
            Some(AgencyCode::parse(&request.agency)?)
        };
        let candidates: Vec<crate::store::DeadLetterEntry> = if request.message_id.is_empty() {
            let agency = agency.as_ref().ok_or_else(|| {
                BrokerError::InvalidArgument("give a message id, an agency, or both".into())
            })?;
            self.shared.store.dead_letters(Some(agency.as_str()))?
        } else {
            self.shared
                .store
                .dead_letters(agency.as_ref().map(AgencyCode::as_str))?
                .into_iter()
                .filter(|e| e.message_id == request.message_id)
                .collect()
        };
        if candidates.is_empty() {
            return Err(BrokerError::NotFound("no matching dead letter".into()));
        }
        let now = lienthong_proto::now_ms();
        let mut redriven = Vec::new();
        for entry in candidates {
            let Some(document) = self.shared.store.document(&entry.message_id)? else {
                continue;
            };
            let header = pb::Signed::decode(document.envelope.as_slice())
                .ok()
                .and_then(|e| pb::DocumentHeader::decode(e.payload.as_ref()).ok())
                .unwrap_or_default();
            // A redriven document gets a fresh expiry by its priority, from now.
            let fresh = pb::DocumentHeader {
                expires_at_ms: 0,
                ..header
            };
            let expires_at_ms = crate::deadletter::expiry_for(&self.shared, &fresh, now);
            if self
                .shared
                .store
                .redrive(&entry.message_id, &entry.recipient, expires_at_ms, now)?
            {
                tracing::info!(message_id = %entry.message_id, agency = %entry.recipient, "dead letter redriven");
                self.shared.hub.wake(&entry.recipient);
                let mut view = self.dead_letter_view(entry)?;
                view.state = DeliveryState::Queued as i32;
                redriven.push(view);
            }
        }
        self.shared.store.durable().await?;
        Ok(pb::RedriveResponse { redriven })
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

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        auth::operator(&request)?;
        let reason = crate::not_ready_reason(&self.shared);
        Ok(Response::new(pb::HealthResponse {
            ready: reason.is_none(),
            reason: reason.unwrap_or_default(),
            store_writable: self.shared.store.is_writable(),
            free_bytes: self.shared.store.free_bytes().unwrap_or(0),
            min_free_bytes: self.shared.config.min_free_bytes,
            documents: self.shared.store.document_count() as u64,
        }))
    }

    async fn dead_letters(
        &self,
        request: Request<pb::DeadLettersRequest>,
    ) -> Result<Response<pb::DeadLettersResponse>, Status> {
        auth::operator(&request)?;
        let agency = request.into_inner().agency;
        Ok(Response::new(self.dead_letters_inner(&agency)?))
    }

    async fn redrive(
        &self,
        request: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        let operator = auth::operator(&request)?;
        let request = request.into_inner();
        tracing::info!(operator, message_id = %request.message_id, agency = %request.agency, "redrive requested");
        Ok(Response::new(self.redrive_inner(request).await?))
    }
}
