//! The `Exchange` service: submission, agent sessions and status.
//!
//! Submission order of checks, all before anything is stored: TLS identity (and the
//! sender not suspended), signature and chain, signer = sender = TLS identity,
//! recipients registered and not suspended, declared sizes
//! within limits, then the attachment bytes against their digests. Then store, wait for
//! the group commit, and only then answer with the signed submission receipt.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use lienthong_proto::document::{AttachmentCheck, is_streamed, verify_document};
use lienthong_proto::pb::{
    self, ReceiptKind, Signed, exchange_server::Exchange, submit_frame::Frame,
};
use lienthong_proto::receipt::sign_receipt;
use lienthong_proto::signing::VerifyTime;
use lienthong_proto::spool::{PartialAttachment, SpoolError};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::auth;
use crate::deadletter;
use crate::error::BrokerError;
use crate::records::DocumentRecord;
use crate::session;
use crate::store::Accepted;

pub struct ExchangeService {
    pub(crate) shared: Arc<Shared>,
}

impl ExchangeService {
    /// Registers the caller on first contact when the configuration allows it; refuses
    /// a suspended agency.
    fn admit(&self, agency: &str) -> Result<(), BrokerError> {
        if let Some(record) = self.shared.store.agency(agency)? {
            return suspended_check(agency, &record);
        }
        if self.shared.config.auto_register {
            if self
                .shared
                .store
                .register_agency(agency, "", true, lienthong_proto::now_ms())?
            {
                tracing::info!(agency, "agency registered on first connection");
            }
            Ok(())
        } else {
            Err(BrokerError::PermissionDenied(format!(
                "agency {agency} is not registered at this broker; ask the operator to register it"
            )))
        }
    }

    async fn submit_inner(
        &self,
        request: Request<Streaming<pb::SubmitFrame>>,
    ) -> Result<pb::SubmitResponse, BrokerError> {
        let caller = auth::agency(&request)?;
        self.admit(caller.as_str())?;
        let mut frames = request.into_inner();
        let envelope = match frames.next().await {
            Some(Ok(pb::SubmitFrame {
                frame: Some(Frame::Envelope(envelope)),
            })) => envelope,
            Some(Ok(_)) => {
                return Err(BrokerError::InvalidArgument(
                    "the first frame of a submission must be the signed envelope".into(),
                ));
            }
            Some(Err(status)) => {
                return Err(BrokerError::InvalidArgument(status.message().to_owned()));
            }
            None => return Err(BrokerError::InvalidArgument("empty submission".into())),
        };
        let verified = verify_document(&envelope, &self.shared.document_anchors, VerifyTime::Now)?;
        let header = &verified.header;
        let message_id = header.message_id.clone();
        if header.sender != caller.as_str() {
            return Err(BrokerError::PermissionDenied(format!(
                "the TLS identity is agency {caller} but the document's sender is {}",
                header.sender
            )));
        }
        if let Some(existing) = self.shared.store.document(&message_id)? {
            return self
                .answer_duplicate(existing, &verified.header_sha256)
                .await;
        }
        for recipient in &header.recipients {
            match self.shared.store.agency(recipient)? {
                None => {
                    return Err(BrokerError::InvalidArgument(format!(
                        "recipient {recipient} is not a registered agency"
                    )));
                }
                // INVALID_ARGUMENT like an unregistered recipient: the document as
                // addressed cannot be accepted now; nothing is stored.
                Some(record) if record.suspended => {
                    return Err(BrokerError::InvalidArgument(format!(
                        "recipient {recipient} is suspended: {}; the document was not accepted",
                        record.suspended_reason
                    )));
                }
                Some(_) => {}
            }
        }
        self.check_business(header)?;
        let declared: u64 = header.attachments.iter().map(|a| a.size).sum();
        let limit = self.shared.config.max_document_bytes;
        if declared > limit {
            return Err(BrokerError::TooLarge(format!(
                "the document's attachments total {declared} bytes; the broker accepts at most {limit} (max_document_bytes)"
            )));
        }
        self.check_queue_limits(
            header,
            declared.saturating_add(envelope.payload.len() as u64),
        )?;

        let size = declared.saturating_add(envelope.payload.len() as u64);
        let _space = self.reserve_space(size)?;
        let _guard = self.shared.in_progress.claim(&message_id).ok_or_else(|| {
            BrokerError::Unavailable(
                "the same message id is being submitted right now; retry".into(),
            )
        })?;
        // Accepted by a concurrent submission that finished before our claim.
        if let Some(existing) = self.shared.store.document(&message_id)? {
            return self
                .answer_duplicate(existing, &verified.header_sha256)
                .await;
        }
        let streamed = is_streamed(header);
        let attachments = if streamed {
            let partial = self
                .shared
                .store
                .partial_dir(caller.as_str(), &verified.header_sha256);
            receive_streamed(&mut frames, header, partial).await?;
            self.shared.store.promote_partial(
                caller.as_str(),
                &verified.header_sha256,
                &message_id,
            )?;
            Vec::new()
        } else {
            receive_attachments(&mut frames, header).await?
        };
        let accepted_at_ms = lienthong_proto::now_ms();
        let expires_at_ms = deadletter::expiry_for(&self.shared, header, accepted_at_ms);
        let receipt = pb::Receipt {
            kind: ReceiptKind::Submission as i32,
            message_id: message_id.clone(),
            header_sha256: verified.header_sha256.to_vec(),
            at_ms: accepted_at_ms,
            issuer: format!("broker:{}", self.shared.config.name),
            business_id: header.business_id.clone(),
            sender: header.sender.clone(),
            ..Default::default()
        };
        let signed_receipt = sign_receipt(&receipt, &self.shared.signing_key)?;
        let record = DocumentRecord {
            envelope: envelope.encode_to_vec(),
            submission_receipt: signed_receipt.encode_to_vec(),
            header_sha256: verified.header_sha256.to_vec(),
            accepted_at_ms,
            // A status report's business id is not a document's: it names nothing.
            business_id: if header.kind == pb::DocumentKind::Status as i32 {
                String::new()
            } else {
                header.business_id.clone()
            },
            sender: header.sender.clone(),
            recipients: header.recipients.clone(),
            attachment_bytes: declared,
            attachment_count: u32::try_from(header.attachments.len()).unwrap_or(u32::MAX),
            expires_at_ms,
            streamed,
        };
        let store = self.shared.store.clone();
        let id = message_id.clone();
        let outcome = tokio::task::spawn_blocking(move || store.accept(&record, &id, &attachments))
            .await
            .map_err(|e| BrokerError::Serve(e.to_string()))??;
        match outcome {
            Accepted::New => {}
            Accepted::Duplicate(existing) => {
                return self
                    .answer_duplicate(existing, &verified.header_sha256)
                    .await;
            }
            Accepted::BusinessIdTaken { message_id: other } => {
                return Err(BrokerError::AlreadyExists(format!(
                    "business document id {} is already used by message {other} with other content",
                    header.business_id
                )));
            }
        }
        self.shared.store.durable().await?;
        tracing::info!(
            message_id = %message_id,
            sender = %header.sender,
            recipients = header.recipients.len(),
            bytes = declared,
            "document accepted"
        );
        if header.business_type == pb::BusinessType::Recall as i32 {
            crate::recall::stop_undelivered(&self.shared, header)?;
        }
        for recipient in &header.recipients {
            self.shared.hub.wake(recipient);
        }
        Ok(pb::SubmitResponse {
            submission_receipt: Some(signed_receipt),
            duplicate: false,
        })
    }

    /// A status report must come from a recipient of the document it is about and go
    /// to that document's sender; a recall, update or replace must refer to a document
    /// of the same sender. Checked against what this broker holds.
    fn check_business(&self, header: &pb::DocumentHeader) -> Result<(), BrokerError> {
        let is_status = header.kind == pb::DocumentKind::Status as i32;
        if !is_status && header.business_type == pb::BusinessType::New as i32 {
            return Ok(());
        }
        let referred = self.shared.store.document(&header.refers_to)?;
        let printable_id = lienthong_proto::agency::printable(&header.refers_to);
        if is_status {
            let received = referred
                .as_ref()
                .is_some_and(|d| d.recipients.contains(&header.sender));
            if !received {
                return Err(BrokerError::InvalidArgument(format!(
                    "a status report about {printable_id}, which {} did not receive through this broker, is refused",
                    header.sender
                )));
            }
            let to_sender = referred
                .as_ref()
                .is_some_and(|d| header.recipients.first() == Some(&d.sender));
            if !to_sender {
                return Err(BrokerError::InvalidArgument(
                    "a status report goes to the sender of the document it is about, only".into(),
                ));
            }
            return Ok(());
        }
        match referred {
            Some(d) if d.sender == header.sender => Ok(()),
            Some(_) => Err(BrokerError::PermissionDenied(format!(
                "{printable_id} was sent by another agency; only its sender can recall, update or replace it"
            ))),
            None => Err(BrokerError::InvalidArgument(format!(
                "refers_to: {printable_id} is not a document this broker holds"
            ))),
        }
    }

    /// Refuses a document the disk cannot take while keeping the configured reserve, and
    /// counts it as being written until the returned guard drops.
    fn reserve_space(&self, size: u64) -> Result<SpaceGuard<'_>, BrokerError> {
        use std::sync::atomic::Ordering;
        let shared = &self.shared;
        if !shared.store.is_writable() {
            return Err(BrokerError::ResourceExhausted(
                "the broker's store failed to flush and refuses writes; the operator must act"
                    .into(),
            ));
        }
        let writing = shared.writing_bytes.fetch_add(size, Ordering::AcqRel);
        let guard = SpaceGuard {
            counter: &shared.writing_bytes,
            size,
        };
        let free = shared
            .store
            .free_bytes()
            .map_err(|e| BrokerError::Unavailable(format!("cannot read free disk space: {e}")))?;
        let needed = shared
            .config
            .min_free_bytes
            .saturating_add(writing)
            .saturating_add(size.saturating_mul(2));
        if free < needed {
            shared.space_needed.store(needed, Ordering::Release);
            tracing::warn!(free, needed, "submission refused: disk nearly full");
            return Err(BrokerError::ResourceExhausted(format!(
                "the broker's disk is nearly full ({free} bytes free; this document needs {size} \
                 plus the {} bytes kept in reserve, min_free_bytes); retry later",
                shared.config.min_free_bytes
            )));
        }
        shared.space_needed.store(0, Ordering::Release);
        Ok(guard)
    }

    /// Backpressure: refuses a document that would push a recipient's queue over the
    /// configured limits, naming the recipient and the limit.
    fn check_queue_limits(
        &self,
        header: &pb::DocumentHeader,
        bytes: u64,
    ) -> Result<(), BrokerError> {
        let config = &self.shared.config;
        for recipient in &header.recipients {
            let pending = self.shared.store.pending(recipient);
            if pending.documents >= config.max_pending_documents {
                return Err(BrokerError::ResourceExhausted(format!(
                    "the queue for {recipient} holds {} documents, the limit (max_pending_documents); retry later",
                    pending.documents
                )));
            }
            if pending.bytes.saturating_add(bytes) > config.max_pending_bytes {
                return Err(BrokerError::ResourceExhausted(format!(
                    "the queue for {recipient} holds {} bytes; this document would exceed the limit of {} (max_pending_bytes); retry later",
                    pending.bytes, config.max_pending_bytes
                )));
            }
        }
        Ok(())
    }

    /// The same message id again: the original receipt if the content is the same,
    /// after making sure the original is durable (it may still be in a group commit).
    async fn answer_duplicate(
        &self,
        existing: DocumentRecord,
        header_sha256: &[u8; 32],
    ) -> Result<pb::SubmitResponse, BrokerError> {
        if existing.header_sha256 != header_sha256 {
            return Err(BrokerError::AlreadyExists(
                "this message id was already accepted with other content".into(),
            ));
        }
        self.shared.store.durable().await?;
        let receipt = Signed::decode(existing.submission_receipt.as_slice())
            .map_err(|e| BrokerError::Store(crate::store::StoreError::Corrupt(e.to_string())))?;
        Ok(pb::SubmitResponse {
            submission_receipt: Some(receipt),
            duplicate: true,
        })
    }

    async fn status_inner(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<pb::StatusResponse, BrokerError> {
        let caller = auth::agency(&request)?;
        let message_id = request.into_inner().message_id;
        let not_found = || {
            BrokerError::NotFound(format!(
                "no document {} visible to {caller}",
                lienthong_proto::agency::printable(&message_id)
            ))
        };
        let record = self
            .shared
            .store
            .document(&message_id)?
            .ok_or_else(not_found)?;
        let is_sender = record.sender == caller.as_str();
        let visible: Vec<&String> = record
            .recipients
            .iter()
            .filter(|r| is_sender || r.as_str() == caller.as_str())
            .collect();
        if visible.is_empty() {
            return Err(not_found());
        }
        let mut recipients = Vec::with_capacity(visible.len());
        for agency in visible {
            let delivery = self
                .shared
                .store
                .delivery(&message_id, agency)?
                .unwrap_or_default();
            recipients.push(pb::RecipientStatus {
                agency: agency.clone(),
                state: delivery.state,
                delivery_receipt: if delivery.receipt.is_empty() {
                    None
                } else {
                    Signed::decode(delivery.receipt.as_slice()).ok()
                },
                delivered_at_ms: delivery.delivered_at_ms,
                reason: delivery.reason,
                attempts: delivery.attempts,
                last_attempt_at_ms: delivery.last_attempt_at_ms,
                notice: if delivery.notice.is_empty() {
                    None
                } else {
                    Signed::decode(delivery.notice.as_slice()).ok()
                },
                expires_at_ms: delivery.expires_at_ms,
                attempt_log: delivery
                    .attempt_log
                    .into_iter()
                    .map(|a| pb::DeliveryAttempt {
                        at_ms: a.at_ms,
                        outcome: a.outcome,
                    })
                    .collect(),
            });
        }
        // A delivery settled a moment ago (delivered, refused, expired, recalled) may
        // still be in its group commit: the sender is told only once that is durable.
        if recipients
            .iter()
            .any(|r| r.state != pb::DeliveryState::Queued as i32)
        {
            self.shared.store.durable().await?;
        }
        Ok(pb::StatusResponse {
            message_id,
            business_id: record.business_id,
            sender: record.sender,
            submission_receipt: Signed::decode(record.submission_receipt.as_slice()).ok(),
            recipients,
            envelope: Signed::decode(record.envelope.as_slice()).ok(),
        })
    }
}

/// PERMISSION_DENIED for a suspended agency.
pub(crate) fn suspended_check(
    agency: &str,
    record: &crate::records::AgencyRecord,
) -> Result<(), BrokerError> {
    if record.suspended {
        return Err(BrokerError::PermissionDenied(format!(
            "agency {agency} is suspended: {}",
            record.suspended_reason
        )));
    }
    Ok(())
}

/// Reads the attachment frames, checking sizes and digests as they pass.
async fn receive_attachments(
    frames: &mut Streaming<pb::SubmitFrame>,
    header: &pb::DocumentHeader,
) -> Result<Vec<Bytes>, BrokerError> {
    let mut buffers: Vec<Vec<u8>> = header
        .attachments
        .iter()
        .map(|a| Vec::with_capacity(usize::try_from(a.size).unwrap_or(0).min(64 << 20)))
        .collect();
    let mut checks: Vec<AttachmentCheck<'_>> = header
        .attachments
        .iter()
        .enumerate()
        .map(|(i, info)| AttachmentCheck::new(i, info))
        .collect();
    let mut current = 0usize;
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|s| {
            BrokerError::InvalidArgument(format!("submission stream failed: {}", s.message()))
        })?;
        let Some(Frame::Chunk(chunk)) = frame.frame else {
            return Err(BrokerError::InvalidArgument(
                "only attachment chunks may follow the envelope".into(),
            ));
        };
        let index = chunk.attachment_index as usize;
        if index < current || index >= checks.len() {
            return Err(BrokerError::InvalidArgument(format!(
                "attachment chunk for index {index} out of order or out of range"
            )));
        }
        current = index;
        if let (Some(check), Some(buffer)) = (checks.get_mut(index), buffers.get_mut(index)) {
            check.update(&chunk.data)?;
            buffer.extend_from_slice(&chunk.data);
        }
    }
    for check in checks {
        check.finish()?;
    }
    Ok(buffers.into_iter().map(Bytes::from).collect())
}

/// Receives a streamed document's attachments into files in `dir`, continuing what an
/// earlier, interrupted submission of the same signed header left there. Every chunk is
/// written as it arrives and hashed as it passes; returns once every attachment is
/// complete, matches its digest and is synced.
async fn receive_streamed(
    frames: &mut Streaming<pb::SubmitFrame>,
    header: &pb::DocumentHeader,
    dir: std::path::PathBuf,
) -> Result<(), BrokerError> {
    let infos = header.attachments.clone();
    let count = infos.len();
    let opened =
        tokio::task::spawn_blocking(move || lienthong_proto::spool::open_all(&dir, &infos))
            .await
            .map_err(|e| BrokerError::Serve(e.to_string()))?
            .map_err(spool_error)?;
    let mut parts: Vec<Option<PartialAttachment>> = opened.into_iter().map(Some).collect();
    let mut current = 0usize;
    while let Some(frame) = frames.next().await {
        let frame = frame.map_err(|s| {
            BrokerError::Unavailable(format!("submission stream failed: {}", s.message()))
        })?;
        let Some(Frame::Chunk(chunk)) = frame.frame else {
            return Err(BrokerError::InvalidArgument(
                "only attachment chunks may follow the envelope".into(),
            ));
        };
        let index = chunk.attachment_index as usize;
        if index < current || index >= count {
            return Err(BrokerError::InvalidArgument(format!(
                "attachment chunk for index {index} out of order or out of range"
            )));
        }
        current = index;
        let Some(mut part) = parts.get_mut(index).and_then(Option::take) else {
            return Err(BrokerError::Serve("attachment file missing".into()));
        };
        let (part, written) = tokio::task::spawn_blocking(move || {
            let written = part.write_chunk(chunk.offset, &chunk.data);
            (part, written)
        })
        .await
        .map_err(|e| BrokerError::Serve(e.to_string()))?;
        if let Some(slot) = parts.get_mut(index) {
            *slot = Some(part);
        }
        written.map_err(spool_error)?;
    }
    tokio::task::spawn_blocking(move || -> Result<(), BrokerError> {
        for part in parts.into_iter().flatten() {
            let resumed = part.resumed();
            match part.finish() {
                Ok(_) => {}
                // Bytes kept from an earlier attempt may have been damaged by a crash
                // here: the file was emptied, and the sender retries from zero.
                Err(SpoolError::Mismatch(e)) if resumed => {
                    return Err(BrokerError::Unavailable(format!(
                        "{e} after resuming an earlier upload; retry the submission"
                    )));
                }
                Err(e) => return Err(spool_error(e)),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| BrokerError::Serve(e.to_string()))??;
    Ok(())
}

fn spool_error(error: SpoolError) -> BrokerError {
    match error {
        SpoolError::Mismatch(e) => BrokerError::Protocol(e),
        gap @ SpoolError::Gap { .. } => {
            BrokerError::ResumeConflict(format!("{gap}; ask UploadStatus where to resume"))
        }
        io @ SpoolError::Io { .. } => BrokerError::Spool(io.to_string()),
    }
}

/// Bytes counted as being written; released when the submission ends.
struct SpaceGuard<'a> {
    counter: &'a std::sync::atomic::AtomicU64,
    size: u64,
}

impl Drop for SpaceGuard<'_> {
    fn drop(&mut self) {
        self.counter
            .fetch_sub(self.size, std::sync::atomic::Ordering::AcqRel);
    }
}

type SessionStream = session::OutgoingStream;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    async fn submit(
        &self,
        request: Request<Streaming<pb::SubmitFrame>>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let started = std::time::Instant::now();
        match self.submit_inner(request).await {
            Ok(response) => {
                self.shared
                    .metrics
                    .submission_accepted(response.duplicate, started.elapsed());
                Ok(Response::new(response))
            }
            Err(error) => {
                self.shared.metrics.submission_refused(&error);
                tracing::warn!(%error, "submission refused");
                Err(error.into())
            }
        }
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let agency = auth::agency(&request)?;
        self.admit(agency.as_str())?;
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let stream = session::start(self.shared.clone(), agency, peer, inbound)?;
        Ok(Response::new(stream))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.status_inner(request).await?))
    }

    async fn directory(
        &self,
        request: Request<pb::DirectoryRequest>,
    ) -> Result<Response<pb::DirectoryResponse>, Status> {
        auth::agency(&request)?;
        let agencies = self
            .shared
            .store
            .agencies()
            .map_err(BrokerError::from)?
            .into_iter()
            .map(|(code, record)| pb::DirectoryEntry {
                parent: lienthong_proto::AgencyCode::parse(&code)
                    .ok()
                    .and_then(|c| c.parent())
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                code,
                name: record.name,
                suspended: record.suspended,
            })
            .collect();
        Ok(Response::new(pb::DirectoryResponse { agencies }))
    }

    async fn upload_status(
        &self,
        request: Request<pb::UploadStatusRequest>,
    ) -> Result<Response<pb::UploadStatusResponse>, Status> {
        let caller = auth::agency(&request)?;
        let request = request.into_inner();
        let store = &self.shared.store;
        let accepted = store
            .document(&request.message_id)
            .map_err(BrokerError::from)?
            .is_some_and(|d| {
                d.sender == caller.as_str() && d.header_sha256 == request.header_sha256
            });
        let stored_bytes = if accepted {
            Vec::new()
        } else {
            store.partial_lengths(caller.as_str(), &request.header_sha256)
        };
        Ok(Response::new(pb::UploadStatusResponse {
            stored_bytes,
            accepted,
        }))
    }
}
