//! The `Admin` service for operators (operator certificates only): queue depths and
//! connection state per agency (with settled counts of the last hour and day), dead
//! letters and their redrive, one document's timeline and evidence, agency
//! registration and suspension, the audit log (`audit`), the purge of one sender's
//! queued documents to one recipient (dead letters with signed notices, audited), and
//! certificate bindings and the block list (`trust`).
//!
//! Suspension: every call of the agency is refused (PERMISSION_DENIED), its open
//! session is ended and its open submissions are cancelled without storing anything
//! (`admission`), documents addressed to it are refused at submission with
//! INVALID_ARGUMENT naming it; deliveries already queued for it stay queued (their
//! expiry still runs) and go out after it is resumed.

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
            let recent = self.shared.store.recent_counts(&agency, now);
            queues.push(pb::QueueInfo {
                delivered_last_hour: recent.delivered_last_hour,
                delivered_last_day: recent.delivered_last_day,
                dead_lettered_last_hour: recent.dead_lettered_last_hour,
                dead_lettered_last_day: recent.dead_lettered_last_day,
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
        operator: &str,
    ) -> Result<pb::RedriveResponse, BrokerError> {
        let agency = if request.agency.is_empty() {
            None
        } else {
            Some(AgencyCode::parse(&request.agency)?)
        };
        let done = crate::deadletter::redrive(
            &self.shared,
            &request.message_id,
            agency.as_ref().map(AgencyCode::as_str),
            operator,
        )
        .await?;
        let mut redriven = Vec::with_capacity(done.len());
        for item in done {
            let record = self
                .shared
                .store
                .delivery(&item.message_id, &item.recipient)?
                .unwrap_or_default();
            let mut view = self.dead_letter_view(crate::store::DeadLetterEntry {
                message_id: item.message_id,
                recipient: item.recipient,
                record,
            })?;
            view.state = DeliveryState::Queued as i32;
            redriven.push(view);
        }
        Ok(pb::RedriveResponse { redriven })
    }

    /// One document by message id, or else by business document id.
    fn message_inner(&self, id: &str) -> Result<pb::MessageResponse, BrokerError> {
        let store = &self.shared.store;
        let (message_id, document) = find_document(store, id)?;
        let envelope = pb::Signed::decode(document.envelope.as_slice()).ok();
        // The header as the sender signed it; stored only after verification.
        let header = envelope
            .as_ref()
            .and_then(|e| pb::DocumentHeader::decode(e.payload.as_ref()).ok())
            .unwrap_or_default();
        let decode_signed = |bytes: &[u8]| {
            if bytes.is_empty() {
                None
            } else {
                pb::Signed::decode(bytes).ok()
            }
        };
        let mut timelines = Vec::with_capacity(document.recipients.len());
        for agency in &document.recipients {
            let delivery = store.delivery(&message_id, agency)?.unwrap_or_default();
            timelines.push(timeline(agency, &document, delivery, decode_signed));
        }
        Ok(pb::MessageResponse {
            message_id,
            business_id: document.business_id.clone(),
            sender: document.sender.clone(),
            recipients: document.recipients.clone(),
            subject: header.subject,
            number: header.number,
            notation: header.notation,
            priority: header.priority,
            created_at_ms: header.created_at_ms,
            accepted_at_ms: document.accepted_at_ms,
            expires_at_ms: document.expires_at_ms,
            envelope,
            submission_receipt: decode_signed(&document.submission_receipt),
            timelines,
        })
    }
}

impl AdminService {
    fn agency_info(code: String, record: crate::records::AgencyRecord) -> pb::AgencyInfo {
        let parent = AgencyCode::parse(&code)
            .ok()
            .and_then(|c| c.parent())
            .map(|p| p.to_string())
            .unwrap_or_default();
        pb::AgencyInfo {
            code,
            name: record.name,
            parent,
            suspended: record.suspended,
            suspended_reason: record.suspended_reason,
            suspended_at_ms: record.suspended_at_ms,
            registered_at_ms: record.registered_at_ms,
            auto_registered: record.auto_registered,
        }
    }

    fn agencies_inner(&self) -> Result<pb::AgenciesResponse, BrokerError> {
        let agencies = self
            .shared
            .store
            .agencies()?
            .into_iter()
            .map(|(code, record)| Self::agency_info(code, record))
            .collect();
        Ok(pb::AgenciesResponse { agencies })
    }

    async fn register_inner(
        &self,
        operator: &str,
        request: pb::RegisterAgencyRequest,
    ) -> Result<pb::AgencyInfo, BrokerError> {
        let code = AgencyCode::parse(request.code.trim())?;
        let now = lienthong_proto::now_ms();
        if !self.shared.store.register_agency(
            code.as_str(),
            request.name.trim(),
            false,
            now,
            &format!("operator {operator}"),
        )? {
            return Err(BrokerError::AlreadyExists(format!(
                "agency {code} is already registered"
            )));
        }
        self.shared.store.durable().await?;
        self.agency_view(code.as_str())
    }

    /// Suspends (`reason` given) or resumes an agency. Suspending ends its live session;
    /// its queued deliveries stay queued and are pushed again once it is resumed.
    async fn suspend_inner(
        &self,
        operator: &str,
        code: &str,
        reason: Option<String>,
    ) -> Result<pb::AgencyInfo, BrokerError> {
        let code = AgencyCode::parse(code.trim())?;
        let now = lienthong_proto::now_ms();
        // No submission of this agency stores a document while the suspension is being
        // written; those still open are cancelled below (see `admission`).
        let gate = self.shared.admission.hold_gate(code.as_str()).await;
        let updated = self.shared.store.set_suspended(
            code.as_str(),
            reason.as_deref().map(|r| (r, now)),
            &format!("operator {operator}"),
        )?;
        let Some(record) = updated else {
            return Err(BrokerError::NotFound(format!(
                "agency {code} is not registered at this broker"
            )));
        };
        if record.suspended && self.shared.admission.cancel_calls(code.as_str()) {
            tracing::info!(agency = %code, "open submissions of the suspended agency cancelled");
        }
        drop(gate);
        self.shared.store.durable().await?;
        if record.suspended {
            if self.shared.hub.end_session(code.as_str()) {
                tracing::info!(agency = %code, "session of the suspended agency ended");
            }
        } else {
            self.shared.hub.wake(code.as_str());
        }
        Ok(Self::agency_info(code.to_string(), record))
    }

    /// Dead-letters every document from `request.from` queued for `request.to`, each with
    /// the broker's signed notice, and audits the purge with the operator and the count.
    async fn purge_inner(
        &self,
        operator: &str,
        request: pb::PurgeRequest,
    ) -> Result<pb::PurgeResponse, BrokerError> {
        let from = AgencyCode::parse(request.from.trim())?;
        let to = AgencyCode::parse(request.to.trim())?;
        let reason = match request.reason.trim() {
            "" => format!("purged by operator {operator}"),
            reason => format!("purged by operator {operator}: {reason}"),
        };
        lienthong_proto::document::validate_text("reason", &reason, 600)?;
        let store = &self.shared.store;
        let mut purged = Vec::new();
        for message_id in store.queued_from(from.as_str(), to.as_str())? {
            let Some(document) = store.document(&message_id)? else {
                continue;
            };
            let now = lienthong_proto::now_ms();
            let notice = crate::deadletter::signed_notice(
                &self.shared,
                &message_id,
                &document,
                to.as_str(),
                "purged",
                &reason,
                now,
            )?;
            let settled = store.settle(
                &message_id,
                to.as_str(),
                crate::store::Settlement::Dead {
                    state: DeliveryState::Refused,
                    reason: reason.clone(),
                    notice,
                },
                now,
            )?;
            // Delivered or dead-lettered meanwhile: not ours to purge any more.
            if settled {
                self.shared.metrics.dead_letter(DeliveryState::Refused);
                purged.push(message_id);
            }
        }
        let count = purged.len() as u64;
        store.audit_operator_action(
            "purged",
            to.as_str(),
            format!("operator {operator} purged {count} documents from {from} to {to}: {reason}"),
            lienthong_proto::now_ms(),
        )?;
        store.durable().await?;
        tracing::warn!(operator, from = %from, to = %to, count, "queued documents purged");
        Ok(pb::PurgeResponse {
            purged: count,
            message_ids: purged,
        })
    }

    fn agency_view(&self, code: &str) -> Result<pb::AgencyInfo, BrokerError> {
        let record = self
            .shared
            .store
            .agency(code)?
            .ok_or_else(|| BrokerError::NotFound(format!("agency {code} is not registered")))?;
        Ok(Self::agency_info(code.to_owned(), record))
    }
}

fn binding_info(hash: [u8; 32], record: crate::trust::BindingRecord) -> pb::BindingInfo {
    pb::BindingInfo {
        spki_sha256: hash.to_vec(),
        code: record.code,
        subject: record.subject,
        bound_at_ms: record.bound_at_ms,
        bound_by: record.bound_by,
    }
}

fn block_info(hash: [u8; 32], record: crate::trust::BlockRecord, blocked: bool) -> pb::BlockInfo {
    pb::BlockInfo {
        spki_sha256: hash.to_vec(),
        reason: record.reason,
        blocked_at_ms: record.blocked_at_ms,
        blocked_by: record.blocked_by,
        code: record.code,
        blocked,
    }
}

fn audit_entry(entry: crate::records::AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: entry.seq,
        at_ms: entry.at_ms,
        kind: entry.kind,
        message_id: entry.message_id,
        agency: entry.agency,
        header_sha256: entry.header_sha256,
        prev_hash: entry.prev_hash,
        hash: entry.hash,
        detail: entry.detail,
    }
}

/// A document by message id, or else by business document id; shared by the Admin
/// service and the dashboard.
pub(crate) fn find_document(
    store: &crate::store::Store,
    id: &str,
) -> Result<(String, crate::records::DocumentRecord), BrokerError> {
    let not_found = || {
        BrokerError::NotFound(format!(
            "no document with message id or business document id {}",
            lienthong_proto::agency::printable(id)
        ))
    };
    if id.is_empty() {
        return Err(BrokerError::InvalidArgument(
            "give a message id or a business document id".into(),
        ));
    }
    match store.document(id)? {
        Some(document) => Ok((id.to_owned(), document)),
        None => {
            let message_id = store.message_for_business_id(id)?.ok_or_else(not_found)?;
            let document = store.document(&message_id)?.ok_or_else(not_found)?;
            Ok((message_id, document))
        }
    }
}

/// The life of one delivery: accepted, each attempt with its outcome (the attempt log
/// keeps the latest 32), then the receipt or the refusal/expiry.
fn timeline(
    agency: &str,
    document: &crate::records::DocumentRecord,
    delivery: crate::records::DeliveryRecord,
    decode_signed: impl Fn(&[u8]) -> Option<pb::Signed>,
) -> pb::RecipientTimeline {
    let events: Vec<pb::TimelineEvent> = crate::records::delivery_timeline(document, &delivery)
        .into_iter()
        .map(|e| pb::TimelineEvent {
            at_ms: e.at_ms,
            event: e.event.to_owned(),
            detail: e.detail,
        })
        .collect();
    pb::RecipientTimeline {
        agency: agency.to_owned(),
        state: delivery.state,
        events,
        delivery_receipt: decode_signed(&delivery.receipt),
        notice: decode_signed(&delivery.notice),
        reason: delivery.reason,
        attempts: delivery.attempts,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn queues(
        &self,
        request: Request<pb::QueuesRequest>,
    ) -> Result<Response<pb::QueuesResponse>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        tracing::debug!(operator, "admin queues");
        Ok(Response::new(self.queues_inner()?))
    }

    async fn health(
        &self,
        request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        auth::operator(&self.shared, &request)?;
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
        auth::operator(&self.shared, &request)?;
        let agency = request.into_inner().agency;
        Ok(Response::new(self.dead_letters_inner(&agency)?))
    }

    async fn redrive(
        &self,
        request: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let request = request.into_inner();
        tracing::info!(operator, message_id = %request.message_id, agency = %request.agency, "redrive requested");
        Ok(Response::new(
            self.redrive_inner(request, &format!("certificate {operator}"))
                .await?,
        ))
    }

    async fn message(
        &self,
        request: Request<pb::MessageRequest>,
    ) -> Result<Response<pb::MessageResponse>, Status> {
        auth::operator(&self.shared, &request)?;
        let id = request.into_inner().id;
        Ok(Response::new(self.message_inner(id.trim())?))
    }

    async fn agencies(
        &self,
        request: Request<pb::AgenciesRequest>,
    ) -> Result<Response<pb::AgenciesResponse>, Status> {
        auth::operator(&self.shared, &request)?;
        Ok(Response::new(self.agencies_inner()?))
    }

    async fn register_agency(
        &self,
        request: Request<pb::RegisterAgencyRequest>,
    ) -> Result<Response<pb::AgencyInfo>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let request = request.into_inner();
        tracing::info!(operator, code = %lienthong_proto::agency::printable(&request.code), "agency registration requested");
        Ok(Response::new(
            self.register_inner(&operator, request).await?,
        ))
    }

    async fn suspend_agency(
        &self,
        request: Request<pb::SuspendAgencyRequest>,
    ) -> Result<Response<pb::AgencyInfo>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let request = request.into_inner();
        let reason = match request.reason.trim() {
            "" => format!("suspended by operator {operator}"),
            reason => reason.to_owned(),
        };
        tracing::warn!(operator, code = %lienthong_proto::agency::printable(&request.code), reason, "agency suspension requested");
        Ok(Response::new(
            self.suspend_inner(&operator, &request.code, Some(reason))
                .await?,
        ))
    }

    async fn resume_agency(
        &self,
        request: Request<pb::ResumeAgencyRequest>,
    ) -> Result<Response<pb::AgencyInfo>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let request = request.into_inner();
        tracing::info!(operator, code = %lienthong_proto::agency::printable(&request.code), "agency resumption requested");
        Ok(Response::new(
            self.suspend_inner(&operator, &request.code, None).await?,
        ))
    }

    async fn audit_tail(
        &self,
        request: Request<pb::AuditTailRequest>,
    ) -> Result<Response<pb::AuditTailResponse>, Status> {
        auth::operator(&self.shared, &request)?;
        let n = match request.into_inner().n {
            0 => 20,
            n => n.min(10_000) as usize,
        };
        let entries = self
            .shared
            .store
            .audit_tail(n)
            .map_err(BrokerError::from)?
            .into_iter()
            .map(audit_entry)
            .collect();
        Ok(Response::new(pb::AuditTailResponse { entries }))
    }

    async fn purge(
        &self,
        request: Request<pb::PurgeRequest>,
    ) -> Result<Response<pb::PurgeResponse>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let request = request.into_inner();
        tracing::warn!(
            operator,
            from = %lienthong_proto::agency::printable(&request.from),
            to = %lienthong_proto::agency::printable(&request.to),
            "purge requested"
        );
        Ok(Response::new(self.purge_inner(&operator, request).await?))
    }

    async fn bind_certificate(
        &self,
        request: Request<pb::BindCertificateRequest>,
    ) -> Result<Response<pb::BindingInfo>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let request = request.into_inner();
        let code = AgencyCode::parse(request.code.trim()).map_err(BrokerError::from)?;
        let (record, hash) = self
            .shared
            .trust
            .bind(&code, &request.cert_der, &operator)?;
        self.shared
            .store
            .durable()
            .await
            .map_err(BrokerError::from)?;
        Ok(Response::new(binding_info(hash, record)))
    }

    async fn unbind_certificate(
        &self,
        request: Request<pb::UnbindCertificateRequest>,
    ) -> Result<Response<pb::BindingInfo>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let hash = crate::trust::parse_hash(&request.into_inner().spki_sha256)?;
        let record = crate::trust::unbind(&self.shared, &hash, &operator).await?;
        Ok(Response::new(binding_info(hash, record)))
    }

    async fn bindings(
        &self,
        request: Request<pb::BindingsRequest>,
    ) -> Result<Response<pb::BindingsResponse>, Status> {
        auth::operator(&self.shared, &request)?;
        let code = match request.into_inner().code.trim() {
            "" => None,
            code => Some(AgencyCode::parse(code).map_err(BrokerError::from)?),
        };
        let bindings = self
            .shared
            .trust
            .bindings(code.as_ref())
            .map_err(BrokerError::from)?
            .into_iter()
            .map(|(hash, record)| binding_info(hash, record))
            .collect();
        Ok(Response::new(pb::BindingsResponse { bindings }))
    }

    async fn block(
        &self,
        request: Request<pb::BlockRequest>,
    ) -> Result<Response<pb::BlockInfo>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let request = request.into_inner();
        let hash = crate::trust::parse_hash(&request.spki_sha256)?;
        let reason = match request.reason.trim() {
            "" => format!("blocked by operator {operator}"),
            reason => reason.to_owned(),
        };
        lienthong_proto::document::validate_text("reason", &reason, 600)
            .map_err(BrokerError::from)?;
        let record = crate::trust::block(&self.shared, &hash, &reason, &operator).await?;
        Ok(Response::new(block_info(hash, record, true)))
    }

    async fn unblock(
        &self,
        request: Request<pb::UnblockRequest>,
    ) -> Result<Response<pb::BlockInfo>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let hash = crate::trust::parse_hash(&request.into_inner().spki_sha256)?;
        let record = crate::trust::unblock(&self.shared, &hash, &operator).await?;
        Ok(Response::new(block_info(hash, record, false)))
    }

    async fn block_list(
        &self,
        request: Request<pb::BlockListRequest>,
    ) -> Result<Response<pb::BlockListResponse>, Status> {
        auth::operator(&self.shared, &request)?;
        let blocked = self
            .shared
            .trust
            .blocks()
            .map_err(BrokerError::from)?
            .into_iter()
            .map(|(hash, record)| block_info(hash, record, true))
            .collect();
        Ok(Response::new(pb::BlockListResponse { blocked }))
    }

    async fn reload_crls(
        &self,
        request: Request<pb::ReloadCrlsRequest>,
    ) -> Result<Response<pb::ReloadCrlsResponse>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        tracing::info!(operator, "CRL reload requested");
        let revocation = &self.shared.revocation;
        revocation.refresh().await?;
        let loaded = revocation.loaded();
        let stale = crate::revocation::stale(
            &loaded,
            self.shared.config.crl_stale_grace,
            lienthong_proto::now_ms(),
        );
        let crls = loaded
            .lists
            .infos()
            .iter()
            .map(|info| pb::CrlState {
                stale: stale.contains(&info.issuer),
                issuer: info.issuer.clone(),
                this_update_ms: info.this_update_ms,
                next_update_ms: info.next_update_ms.unwrap_or(0),
                revoked: info.revoked as u64,
            })
            .collect();
        Ok(Response::new(pb::ReloadCrlsResponse { crls }))
    }

    async fn audit_verify(
        &self,
        request: Request<pb::AuditVerifyRequest>,
    ) -> Result<Response<pb::AuditVerifyResponse>, Status> {
        let operator = auth::operator(&self.shared, &request)?;
        let store = self.shared.store.clone();
        let verification = tokio::task::spawn_blocking(move || store.audit_verify())
            .await
            .map_err(|e| BrokerError::Serve(e.to_string()))?
            .map_err(BrokerError::from)?;
        if let Some((seq, detail)) = &verification.first_break {
            tracing::error!(operator, seq, detail, "the audit chain is broken");
        }
        let (first_break_seq, detail) = verification.first_break.clone().unwrap_or_default();
        Ok(Response::new(pb::AuditVerifyResponse {
            intact: verification.first_break.is_none(),
            entries: verification.entries,
            first_break_seq,
            detail,
            head_hash: verification.head_hash,
        }))
    }
}
