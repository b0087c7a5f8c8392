//! The `Exchange` service: submission, agent sessions and status.
//!
//! Submission order of checks, all before anything is stored: TLS identity, the
//! sender's open submissions (`admission`) and the sender not suspended, signature and
//! chain, signer = sender = TLS identity, recipients registered and not suspended,
//! created/expiry times against the broker's clock, declared sizes (summed with checked
//! arithmetic, each attachment and the total within `max_document_bytes`), queue limits
//! per recipient and per (sender, recipient), the sender's reserved bytes and the disk
//! reserve; then the attachment bytes as they arrive, against the declared sizes, the
//! disk reserve and their digests, each frame within `stall_timeout` and the stream
//! ended at once if the sender is suspended. Then, with suspension held off, store
//! (the queue limits checked again exactly), wait for the group commit, and only then
//! answer with the signed submission receipt. Every RPC refuses a suspended agency.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use lienthong_proto::document::{
    AttachmentCheck, VerifiedDocument, is_streamed, verify_document_with,
};
use lienthong_proto::pb::{
    self, ReceiptKind, Signed, exchange_server::Exchange, submit_frame::Frame,
};
use lienthong_proto::receipt::{sign_receipt, sign_receipts};
use lienthong_proto::signing::VerifyTime;
use lienthong_proto::spool::{PartialAttachment, SpoolError};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::admission::Submission;
use crate::auth;
use crate::deadletter;
use crate::error::BrokerError;
use crate::records::DocumentRecord;
use crate::session;
use crate::store::{Accepted, NewDocument};

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
                .register_agency(agency, "", true, lienthong_proto::now_ms(), "")?
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

    /// Refuses a suspended agency (any RPC); unlike [`Self::admit`] registers nothing.
    fn refuse_suspended(&self, agency: &str) -> Result<(), BrokerError> {
        match self.shared.store.agency(agency)? {
            Some(record) => suspended_check(agency, &record),
            None => Ok(()),
        }
    }

    async fn submit_inner(
        &self,
        request: Request<Streaming<pb::SubmitFrame>>,
    ) -> Result<pb::SubmitResponse, BrokerError> {
        let caller = auth::agency(&self.shared, &request)?;
        let spki = auth::leaf_spki(&request)?;
        let config = &self.shared.config;
        // Counted before anything else, so that streams that never send their envelope
        // also hold a slot; registered before the suspension check, so that a
        // suspension written after that check still cancels this stream.
        let mut call = self
            .shared
            .admission
            .begin_submission(caller.as_str(), config.max_submissions_per_agency)?;
        self.admit(caller.as_str())?;
        self.shared.trust.refuse_blocked(&spki)?;
        let mut frames = request.into_inner();
        let stall = config.stall_timeout;
        let envelope = match next_frame(&mut frames, &call, stall).await? {
            Some(pb::SubmitFrame {
                frame: Some(Frame::Envelope(envelope)),
            }) => envelope,
            Some(_) => {
                return Err(BrokerError::InvalidArgument(
                    "the first frame of a submission must be the signed envelope".into(),
                ));
            }
            None => return Err(BrokerError::InvalidArgument("empty submission".into())),
        };
        let (verified, declared, size) = match self.check_document(&caller, &envelope).await? {
            Checked::Fresh {
                verified,
                declared,
                size,
            } => (verified, declared, size),
            Checked::Duplicate(response) => {
                // The original may still be in its group commit.
                self.shared.store.durable().await?;
                return Ok(response);
            }
        };
        let header = &verified.header;
        let message_id = header.message_id.clone();
        let leftover = if is_streamed(header) {
            let root = self.shared.store.blob_root().join("partial");
            let resuming = self
                .shared
                .store
                .partial_dir(caller.as_str(), &verified.header_sha256);
            let shared = self.shared.clone();
            let sender = caller.to_string();
            tokio::task::spawn_blocking(move || {
                shared
                    .admission
                    .idle_partial_bytes(&root, &sender, &resuming)
            })
            .await
            .map_err(|e| BrokerError::Serve(e.to_string()))?
        } else {
            0
        };
        call.reserve(size, leftover, config.max_reserved_bytes_per_agency)?;
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
        let (attachments, _suspension_held_off) = if streamed {
            let partial = self
                .shared
                .store
                .partial_dir(caller.as_str(), &verified.header_sha256);
            call.claim_partial(&partial);
            let limits = StreamLimits {
                declared,
                stall,
                min_free_bytes: config.min_free_bytes,
            };
            receive_streamed(
                &mut frames,
                header,
                partial.clone(),
                &call,
                limits,
                &self.shared.store,
            )
            .await?;
            // From here until the document is stored, a suspension of the sender waits;
            // one written before now refuses the document.
            let held = call.hold_off_suspension().await;
            let held = match held {
                Ok(held) => held,
                Err(error) => {
                    remove_partial(partial).await;
                    return Err(error);
                }
            };
            self.shared.store.promote_partial(
                caller.as_str(),
                &verified.header_sha256,
                &message_id,
            )?;
            (Vec::new(), held)
        } else {
            let attachments =
                receive_attachments(&mut frames, header, &call, declared, stall).await?;
            (attachments, call.hold_off_suspension().await?)
        };
        // The stored record is the truth (the token is replaced after a suspension).
        self.refuse_suspended(caller.as_str())?;
        let accepted_at_ms = lienthong_proto::now_ms();
        let receipt = self.submission_receipt(&verified, accepted_at_ms);
        let signed_receipt = sign_receipt(&receipt, &self.shared.signing_key())?;
        let record = self.document_record(
            &envelope,
            &verified,
            &signed_receipt,
            accepted_at_ms,
            declared,
            streamed,
        );
        let store = self.shared.store.clone();
        let id = message_id.clone();
        let limits = self.shared.config.queue_limits();
        let outcome = tokio::task::spawn_blocking(move || {
            store.accept_within(&record, &id, &attachments, &limits)
        })
        .await
        .map_err(|e| BrokerError::Serve(e.to_string()))??;
        if let Accepted::OverLimit(_) = &outcome
            && streamed
        {
            self.shared.store.remove_blob_dir(&message_id);
        }
        // A duplicate's original may still be in its group commit.
        if let Accepted::New | Accepted::Duplicate(_) = &outcome {
            self.shared.store.durable().await?;
        }
        let response = self.answer_stored(outcome, &verified, signed_receipt)?;
        if !response.duplicate {
            self.after_accepted(header, declared)?;
        }
        Ok(response)
    }

    /// Every check of a document that needs none of its attachment bytes, in the order
    /// Submit and SubmitBatch share: signature and chain, signer = sender = caller, the
    /// same message id accepted before (its original receipt, which the caller gives
    /// once the store is durable), recipients registered and not suspended, business
    /// rules, times, declared sizes and the queue limits. Returns the verified document
    /// with its declared attachment bytes and the size its queue entries will count.
    async fn check_document(
        &self,
        caller: &lienthong_proto::AgencyCode,
        envelope: &Signed,
    ) -> Result<Checked, BrokerError> {
        let verified = verify_document_with(
            envelope,
            &self.shared.document_anchors,
            VerifyTime::Now,
            &self.shared.trust,
        )?;
        let header = &verified.header;
        if header.sender != caller.as_str() {
            return Err(BrokerError::PermissionDenied(format!(
                "the TLS identity is agency {caller} but the document's sender is {}",
                header.sender
            )));
        }
        if let Some(existing) = self.shared.store.document(&header.message_id)? {
            return Ok(Checked::Duplicate(duplicate_response(
                existing,
                &verified.header_sha256,
            )?));
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
        self.check_times(header)?;
        let declared = declared_bytes(header, self.shared.config.max_document_bytes)?;
        // What the queue entry will count: attachments and the encoded envelope.
        let size = declared
            .checked_add(envelope.encoded_len() as u64)
            .ok_or_else(|| {
                BrokerError::InvalidArgument(
                    "attachments.size: the document's size does not fit in 64 bits".into(),
                )
            })?;
        self.check_queue_limits(header, size)?;
        Ok(Checked::Fresh {
            verified: Box::new(verified),
            declared,
            size,
        })
    }

    /// The submission receipt of a document accepted at `accepted_at_ms` (unsigned).
    fn submission_receipt(&self, verified: &VerifiedDocument, accepted_at_ms: i64) -> pb::Receipt {
        let header = &verified.header;
        pb::Receipt {
            kind: ReceiptKind::Submission as i32,
            message_id: header.message_id.clone(),
            header_sha256: verified.header_sha256.to_vec(),
            at_ms: accepted_at_ms,
            issuer: format!("broker:{}", self.shared.config.name),
            business_id: header.business_id.clone(),
            sender: header.sender.clone(),
            ..Default::default()
        }
    }

    /// The stored record of a document about to be accepted; it holds its signed
    /// receipt, so a duplicate submission gets exactly the original one.
    fn document_record(
        &self,
        envelope: &Signed,
        verified: &VerifiedDocument,
        signed_receipt: &Signed,
        accepted_at_ms: i64,
        declared: u64,
        streamed: bool,
    ) -> DocumentRecord {
        let header = &verified.header;
        DocumentRecord {
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
            expires_at_ms: deadletter::expiry_for(&self.shared, header, accepted_at_ms),
            streamed,
        }
    }

    /// The answer for one document the store has taken (or refused), once everything
    /// written for it is durable: the caller has waited for the group commit.
    fn answer_stored(
        &self,
        outcome: Accepted,
        verified: &VerifiedDocument,
        signed_receipt: Signed,
    ) -> Result<pb::SubmitResponse, BrokerError> {
        match outcome {
            Accepted::New => Ok(pb::SubmitResponse {
                submission_receipt: Some(signed_receipt),
                duplicate: false,
            }),
            Accepted::OverLimit(detail) => Err(BrokerError::ResourceExhausted(detail)),
            Accepted::Duplicate(existing) => duplicate_response(existing, &verified.header_sha256),
            Accepted::BusinessIdTaken { message_id: other } => {
                Err(BrokerError::AlreadyExists(format!(
                    "business document id {} is already used by message {other} with other content",
                    verified.header.business_id
                )))
            }
        }
    }

    /// What follows a durable acceptance: a recall stops what is undelivered, and the
    /// recipients' sessions are woken.
    fn after_accepted(&self, header: &pb::DocumentHeader, bytes: u64) -> Result<(), BrokerError> {
        tracing::debug!(
            message_id = %header.message_id,
            sender = %header.sender,
            recipients = header.recipients.len(),
            bytes,
            "document accepted"
        );
        if header.business_type == pb::BusinessType::Recall as i32 {
            crate::recall::stop_undelivered(&self.shared, header)?;
        }
        for recipient in &header.recipients {
            self.shared.hub.wake(recipient);
        }
        Ok(())
    }

    /// SubmitBatch: every document through the checks Submit makes ([`Self::check_document`],
    /// then its whole attachments against their digests), the accepted ones stored in
    /// one store batch ([`Store::accept_batch`]) after one batch signature over their
    /// receipts, one group commit, then one outcome per document. Errors returned here
    /// refuse the whole call (nothing of it stored, or nothing acknowledged).
    ///
    /// [`Store::accept_batch`]: crate::store::Store::accept_batch
    async fn submit_batch_inner(
        &self,
        request: Request<pb::SubmitBatchRequest>,
    ) -> Result<pb::SubmitBatchResponse, BrokerError> {
        let started = std::time::Instant::now();
        let caller = auth::agency(&self.shared, &request)?;
        let spki = auth::leaf_spki(&request)?;
        let config = &self.shared.config;
        let documents = request.into_inner().documents;
        if documents.is_empty() {
            return Err(BrokerError::InvalidArgument(
                "a batch holds at least one document".into(),
            ));
        }
        if documents.len() > config.max_batch_documents {
            return Err(BrokerError::InvalidArgument(format!(
                "the batch holds {} documents; the broker takes at most {} per call \
                 (max_batch_documents); nothing was stored, split it",
                documents.len(),
                config.max_batch_documents
            )));
        }
        // tonic's decode limit bounds the call already; counted again so that the sum
        // of what is reserved below can never exceed what one message may hold.
        let total = documents
            .iter()
            .try_fold(0usize, |sum, d| sum.checked_add(d.encoded_len()))
            .filter(|total| *total <= config.max_message_bytes())
            .ok_or_else(|| {
                BrokerError::ResourceExhausted(format!(
                    "the batch is larger than {} bytes, the largest message; nothing was \
                     stored, split it",
                    config.max_message_bytes()
                ))
            })?;
        // One submission slot for the whole batch; its reserved bytes are the sum.
        let mut call = self
            .shared
            .admission
            .begin_submission(caller.as_str(), config.max_submissions_per_agency)?;
        self.admit(caller.as_str())?;
        self.shared.trust.refuse_blocked(&spki)?;

        let count = documents.len();
        let mut outcomes: Vec<Option<pb::SubmitOutcome>> = vec![None; count];
        let mut ready: Vec<Ready> = Vec::new();
        // A message id's first fresh copy in this batch, and the later copies of it.
        let mut firsts: HashMap<String, usize> = HashMap::new();
        let mut copies: Vec<(usize, usize, [u8; 32])> = Vec::new();
        let mut spaces = Vec::new();
        let mut claims = Vec::new();
        // Accepted before: their originals may still be in a group commit, so one wait
        // for durability covers them all before the call answers.
        let mut answered_duplicates = false;
        for (index, document) in documents.into_iter().enumerate() {
            let claimed_id = claimed_message_id(document.envelope.as_ref());
            let staged = self
                .stage_batch_document(&caller, &mut call, document, &firsts)
                .await;
            let outcome = match staged {
                Ok(Staged::Ready {
                    ready: item,
                    space,
                    claim,
                }) => {
                    firsts.insert(item.verified.header.message_id.clone(), ready.len());
                    spaces.push(space);
                    claims.push(claim);
                    ready.push(Ready { index, ..*item });
                    continue;
                }
                Ok(Staged::CopyOf {
                    first,
                    header_sha256,
                }) => {
                    copies.push((index, first, header_sha256));
                    continue;
                }
                Ok(Staged::Answered(response)) => {
                    answered_duplicates = true;
                    accepted_outcome(claimed_id, response, &self.shared, started)
                }
                Err(error) => refused_outcome(claimed_id, error, &self.shared),
            };
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = Some(outcome);
            }
        }

        let mut stored_bytes = 0u64;
        if !ready.is_empty() {
            let stored = self.store_batch(&caller, &call, &ready).await;
            match stored {
                Ok(results) => {
                    for (item, result) in ready.iter().zip(results) {
                        let id = item.verified.header.message_id.clone();
                        let outcome = match result {
                            Ok(response) => {
                                if !response.duplicate {
                                    stored_bytes = stored_bytes.saturating_add(item.declared);
                                    // Durable and answered as accepted whatever follows:
                                    // its receipt is owed (a recall's stop is retried
                                    // by nothing, so it is logged loudly).
                                    if let Err(error) =
                                        self.after_accepted(&item.verified.header, item.declared)
                                    {
                                        tracing::error!(message_id = %id, %error, "accepted, but what follows acceptance failed");
                                    }
                                }
                                accepted_outcome(id, response, &self.shared, started)
                            }
                            Err(error) => refused_outcome(id, error, &self.shared),
                        };
                        if let Some(slot) = outcomes.get_mut(item.index) {
                            *slot = Some(outcome);
                        }
                    }
                }
                // Refused before anything was stored (the sender was suspended):
                // each of these documents gets the refusal Submit would have given.
                Err(BatchRefused::EachDocument(status)) => {
                    for item in &ready {
                        let id = item.verified.header.message_id.clone();
                        if let Some(slot) = outcomes.get_mut(item.index) {
                            *slot = Some(status_outcome(id, &status));
                        }
                    }
                }
                Err(BatchRefused::Whole(error)) => return Err(error),
            }
        }
        drop(claims);
        drop(spaces);
        // Later copies of a message id answer as a resubmission would: the first
        // copy's receipt as a duplicate, or its refusal.
        for (index, first, header_sha256) in copies {
            let first_ready = ready.get(first);
            let first = first_ready
                .and_then(|r| outcomes.get(r.index))
                .cloned()
                .flatten();
            let outcome = match first {
                Some(first) if first.code != 0 => first,
                Some(first) if first.submission_receipt.is_some() => {
                    let same =
                        first_ready.is_some_and(|r| r.verified.header_sha256 == header_sha256);
                    if same {
                        self.shared
                            .metrics
                            .submission_accepted(true, started.elapsed());
                        pb::SubmitOutcome {
                            duplicate: true,
                            ..first
                        }
                    } else {
                        refused_outcome(
                            first.message_id,
                            BrokerError::AlreadyExists(
                                "this message id was already accepted with other content".into(),
                            ),
                            &self.shared,
                        )
                    }
                }
                _ => refused_outcome(
                    String::new(),
                    BrokerError::Serve("a batch copy lost its first".into()),
                    &self.shared,
                ),
            };
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = Some(outcome);
            }
        }
        if answered_duplicates {
            self.shared.store.durable().await?;
        }
        let outcomes: Vec<pb::SubmitOutcome> = outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| pb::SubmitOutcome {
                    code: tonic::Code::Internal as i32,
                    message: "internal error".into(),
                    ..Default::default()
                })
            })
            .collect();
        let accepted = outcomes
            .iter()
            .filter(|o| o.code == 0 && !o.duplicate)
            .count();
        let duplicates = outcomes.iter().filter(|o| o.duplicate).count();
        tracing::info!(
            sender = %caller,
            documents = count,
            accepted,
            duplicates,
            refused = count.saturating_sub(accepted).saturating_sub(duplicates),
            bytes = stored_bytes,
            request_bytes = total,
            "submission batch answered"
        );
        Ok(pb::SubmitBatchResponse { outcomes })
    }

    /// One document of a batch through Submit's checks, with its whole attachments,
    /// its share of the call's reservation, disk space and its in-progress claim.
    async fn stage_batch_document<'s>(
        &'s self,
        caller: &lienthong_proto::AgencyCode,
        call: &mut Submission<'_>,
        document: pb::BatchDocument,
        firsts: &HashMap<String, usize>,
    ) -> Result<Staged<'s>, BrokerError> {
        let config = &self.shared.config;
        let envelope = document.envelope.ok_or_else(|| {
            BrokerError::InvalidArgument("a batch document without its signed envelope".into())
        })?;
        let (verified, declared, size) = match self.check_document(caller, &envelope).await? {
            Checked::Fresh {
                verified,
                declared,
                size,
            } => (verified, declared, size),
            Checked::Duplicate(response) => return Ok(Staged::Answered(response)),
        };
        if let Some(first) = firsts.get(&verified.header.message_id) {
            return Ok(Staged::CopyOf {
                first: *first,
                header_sha256: verified.header_sha256,
            });
        }
        if is_streamed(&verified.header) {
            return Err(BrokerError::InvalidArgument(format!(
                "the document's attachments total {declared} bytes, over the {} bytes sent \
                 whole in a batch: its attachments must be streamed; use Submit",
                lienthong_proto::document::STREAMED_THRESHOLD
            )));
        }
        let attachments = check_whole_attachments(&verified.header, document.attachments)?;
        call.reserve(size, 0, config.max_reserved_bytes_per_agency)?;
        let space = self.reserve_space(size)?;
        let message_id = verified.header.message_id.clone();
        let claim = self.shared.in_progress.claim(&message_id).ok_or_else(|| {
            BrokerError::Unavailable(
                "the same message id is being submitted right now; retry".into(),
            )
        })?;
        // Accepted by a concurrent submission that finished before our claim.
        if let Some(existing) = self.shared.store.document(&message_id)? {
            return Ok(Staged::Answered(duplicate_response(
                existing,
                &verified.header_sha256,
            )?));
        }
        Ok(Staged::Ready {
            ready: Box::new(Ready {
                index: 0,
                envelope,
                verified: *verified,
                declared,
                attachments,
            }),
            space,
            claim,
        })
    }

    /// Signs the receipts of `ready` with one batch signature, stores them in one store
    /// batch, waits for one group commit; returns each document's answer in order.
    async fn store_batch(
        &self,
        caller: &lienthong_proto::AgencyCode,
        call: &Submission<'_>,
        ready: &[Ready],
    ) -> Result<Vec<Result<pb::SubmitResponse, BrokerError>>, BatchRefused> {
        // From here until the batch is stored, a suspension of the sender waits; one
        // written before now refuses every document of it.
        let _held = match call.hold_off_suspension().await {
            Ok(held) => held,
            Err(error) => return Err(BatchRefused::EachDocument(error.into())),
        };
        // The stored record is the truth (the token is replaced after a suspension).
        if let Err(error) = self.refuse_suspended(caller.as_str()) {
            return Err(BatchRefused::EachDocument(error.into()));
        }
        let accepted_at_ms = lienthong_proto::now_ms();
        let receipts: Vec<pb::Receipt> = ready
            .iter()
            .map(|r| self.submission_receipt(&r.verified, accepted_at_ms))
            .collect();
        let signed = sign_receipts(&receipts, &self.shared.signing_key())
            .map_err(|e| BatchRefused::Whole(e.into()))?;
        if signed.len() != ready.len() {
            return Err(BatchRefused::Whole(BrokerError::Serve(
                "the batch signer returned another number of receipts".into(),
            )));
        }
        let documents: Vec<NewDocument> = ready
            .iter()
            .zip(&signed)
            .map(|(r, receipt)| NewDocument {
                record: self.document_record(
                    &r.envelope,
                    &r.verified,
                    receipt,
                    accepted_at_ms,
                    r.declared,
                    false,
                ),
                message_id: r.verified.header.message_id.clone(),
                attachments: r.attachments.clone(),
            })
            .collect();
        let store = self.shared.store.clone();
        let limits = self.shared.config.queue_limits();
        let stored = tokio::task::spawn_blocking(move || store.accept_batch(&documents, &limits))
            .await
            .map_err(|e| BatchRefused::Whole(BrokerError::Serve(e.to_string())))?
            .map_err(|e| BatchRefused::Whole(e.into()))?;
        // One group commit for the batch (duplicates' originals may still be in theirs).
        if stored
            .iter()
            .any(|o| matches!(o, Accepted::New | Accepted::Duplicate(_)))
        {
            self.shared
                .store
                .durable()
                .await
                .map_err(|e| BatchRefused::Whole(e.into()))?;
        }
        Ok(ready
            .iter()
            .zip(signed)
            .zip(stored)
            .map(|((r, receipt), outcome)| self.answer_stored(outcome, &r.verified, receipt))
            .collect())
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

    /// Backpressure before any byte is received: refuses a document that would push a
    /// recipient's queue, or this sender's share of it, over the configured limits,
    /// naming the recipient and the limit. The store checks again, exactly, when it
    /// accepts (concurrent submissions may pass here together).
    fn check_queue_limits(
        &self,
        header: &pb::DocumentHeader,
        bytes: u64,
    ) -> Result<(), BrokerError> {
        let limits = self.shared.config.queue_limits();
        let store = &self.shared.store;
        for recipient in &header.recipients {
            let queued = store.pending(recipient);
            let pair = store.pending_from(&header.sender, recipient);
            if let Some(refusal) = limits.refusal(&header.sender, recipient, queued, pair, bytes) {
                return Err(BrokerError::ResourceExhausted(refusal));
            }
        }
        Ok(())
    }

    /// The sender's clock and expiry against the broker's: `created_at_ms` at most
    /// `max_clock_skew` ahead and at most `max_document_age` behind; `expires_at_ms` at
    /// most `max_expiry` ahead. Done after the duplicate check, so an agent retrying
    /// an accepted document still gets its receipt.
    fn check_times(&self, header: &pb::DocumentHeader) -> Result<(), BrokerError> {
        let config = &self.shared.config;
        let now = lienthong_proto::now_ms();
        let ms = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let ahead = header.created_at_ms.saturating_sub(now);
        if ahead > ms(config.max_clock_skew) {
            return Err(BrokerError::InvalidArgument(format!(
                "created_at_ms is {} s ahead of the broker's clock; at most {} s are allowed                  (max_clock_skew); check the sending agent's clock",
                ahead / 1000,
                config.max_clock_skew.as_secs()
            )));
        }
        let age = now.saturating_sub(header.created_at_ms);
        if age > ms(config.max_document_age) {
            return Err(BrokerError::InvalidArgument(format!(
                "created_at_ms is {} s in the past; the broker accepts documents created at most                  {} s ago (max_document_age)",
                age / 1000,
                config.max_document_age.as_secs()
            )));
        }
        if header.expires_at_ms != 0 {
            let horizon = header.expires_at_ms.saturating_sub(now);
            if horizon > ms(config.max_expiry) {
                return Err(BrokerError::InvalidArgument(format!(
                    "expires_at_ms is {} s from now; a sender may set at most {} s (max_expiry)",
                    horizon / 1000,
                    config.max_expiry.as_secs()
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
        duplicate_response(existing, header_sha256)
    }

    async fn status_inner(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<pb::StatusResponse, BrokerError> {
        let caller = auth::agency(&self.shared, &request)?;
        self.refuse_suspended(caller.as_str())?;
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

/// A batch document that passed every check, with what it holds until answered.
struct Ready {
    /// Its place in the request.
    index: usize,
    envelope: Signed,
    verified: VerifiedDocument,
    declared: u64,
    attachments: Vec<Bytes>,
}

/// Where one batch document stands after its checks.
enum Staged<'s> {
    Ready {
        ready: Box<Ready>,
        space: SpaceGuard<'s>,
        claim: crate::InProgressGuard<'s>,
    },
    /// The same message id as an earlier fresh document of the batch (its index among
    /// the ready ones), with this copy's header digest.
    CopyOf {
        first: usize,
        header_sha256: [u8; 32],
    },
    /// Accepted before: the original receipt (answered once the store is durable).
    Answered(pb::SubmitResponse),
}

/// Why the storing step of a batch did not run.
enum BatchRefused {
    /// Each remaining document gets this refusal (nothing of them was stored).
    EachDocument(Status),
    /// The call fails (storage or signing failure).
    Whole(BrokerError),
}

/// The message id as the envelope claims it, for the outcome of a document that may
/// not verify: read from the unverified header, never trusted for anything else.
fn claimed_message_id(envelope: Option<&Signed>) -> String {
    envelope
        .and_then(|e| pb::DocumentHeader::decode(e.payload.as_ref()).ok())
        .map(|h| h.message_id)
        .filter(|id| id.len() <= 64)
        .unwrap_or_default()
}

/// An accepted (or accepted before) document's outcome, counted.
fn accepted_outcome(
    message_id: String,
    response: pb::SubmitResponse,
    shared: &crate::Shared,
    started: std::time::Instant,
) -> pb::SubmitOutcome {
    shared
        .metrics
        .submission_accepted(response.duplicate, started.elapsed());
    tracing::debug!(message_id = %message_id, duplicate = response.duplicate, "batch document accepted");
    pb::SubmitOutcome {
        message_id,
        submission_receipt: response.submission_receipt,
        duplicate: response.duplicate,
        code: 0,
        message: String::new(),
    }
}

/// A refused document's outcome: the code and client-safe text of the `Status` that
/// Submit would have answered (the one mapping in `error`), counted.
fn refused_outcome(
    message_id: String,
    error: BrokerError,
    shared: &crate::Shared,
) -> pb::SubmitOutcome {
    shared.metrics.submission_refused(&error);
    tracing::debug!(message_id = %message_id, %error, "batch document refused");
    status_outcome(message_id, &Status::from(error))
}

fn status_outcome(message_id: String, status: &Status) -> pb::SubmitOutcome {
    pb::SubmitOutcome {
        message_id,
        submission_receipt: None,
        duplicate: false,
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// A batch document's attachments, sent whole: one per header entry, each matching its
/// declared size and digest.
fn check_whole_attachments(
    header: &pb::DocumentHeader,
    attachments: Vec<Vec<u8>>,
) -> Result<Vec<Bytes>, BrokerError> {
    if attachments.len() != header.attachments.len() {
        return Err(BrokerError::InvalidArgument(format!(
            "the header lists {} attachments but the batch document carries {}",
            header.attachments.len(),
            attachments.len()
        )));
    }
    for (index, (info, bytes)) in header.attachments.iter().zip(&attachments).enumerate() {
        let mut check = AttachmentCheck::new(index, info);
        check.update(bytes)?;
        check.finish()?;
    }
    // Bytes takes each buffer over without copying it.
    Ok(attachments.into_iter().map(Bytes::from).collect())
}

/// A document after the checks that need none of its attachment bytes.
enum Checked {
    Fresh {
        verified: Box<VerifiedDocument>,
        /// Its attachments' declared total.
        declared: u64,
        /// What its queue entries count: attachments and the encoded envelope.
        size: u64,
    },
    /// Accepted before with the same content: the original receipt, which the caller
    /// gives only once the store is durable (the original may be in its group commit).
    Duplicate(pb::SubmitResponse),
}

/// The original receipt for the same message id again, if the content is the same.
/// The caller makes sure the original is durable first.
fn duplicate_response(
    existing: DocumentRecord,
    header_sha256: &[u8; 32],
) -> Result<pb::SubmitResponse, BrokerError> {
    if existing.header_sha256 != header_sha256 {
        return Err(BrokerError::AlreadyExists(
            "this message id was already accepted with other content".into(),
        ));
    }
    let receipt = Signed::decode(existing.submission_receipt.as_slice())
        .map_err(|e| BrokerError::Store(crate::store::StoreError::Corrupt(e.to_string())))?;
    Ok(pb::SubmitResponse {
        submission_receipt: Some(receipt),
        duplicate: true,
    })
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

/// The declared attachment sizes summed with checked arithmetic, each attachment and
/// the total within `limit` (`max_document_bytes`).
fn declared_bytes(header: &pb::DocumentHeader, limit: u64) -> Result<u64, BrokerError> {
    let mut total = 0u64;
    for (index, attachment) in header.attachments.iter().enumerate() {
        if attachment.size > limit {
            return Err(BrokerError::TooLarge(format!(
                "attachment {index} ({}) declares {} bytes; the broker accepts at most {limit} \
                 per document (max_document_bytes)",
                lienthong_proto::agency::printable(&attachment.name),
                attachment.size
            )));
        }
        total = total.checked_add(attachment.size).ok_or_else(|| {
            BrokerError::InvalidArgument(
                "attachments.size: the declared sizes add up to more than 2^64 bytes".into(),
            )
        })?;
    }
    if total > limit {
        return Err(BrokerError::TooLarge(format!(
            "the document's attachments total {total} bytes; the broker accepts at most {limit} (max_document_bytes)"
        )));
    }
    Ok(total)
}

/// The next frame of a submission, or None at its end. Ends the stream with
/// PERMISSION_DENIED when the sender is suspended meanwhile, and with UNAVAILABLE when
/// no frame arrives for `stall` (`stall_timeout`): a stalled stream must not hold its
/// slot and reservation.
async fn next_frame(
    frames: &mut Streaming<pb::SubmitFrame>,
    call: &Submission<'_>,
    stall: std::time::Duration,
) -> Result<Option<pb::SubmitFrame>, Ended> {
    tokio::select! {
        biased;
        _ = call.cancelled().cancelled() => Err(Ended {
            error: crate::admission::suspended_during(call.agency()),
            by_broker: true,
        }),
        next = tokio::time::timeout(stall, frames.next()) => match next {
            Err(_) => Err(Ended {
                error: BrokerError::Unavailable(format!(
                    "the submission stream sent nothing for {} s (stall_timeout); it was ended \
                     and nothing was stored",
                    stall.as_secs()
                )),
                by_broker: true,
            }),
            Ok(None) => Ok(None),
            Ok(Some(Ok(frame))) => Ok(Some(frame)),
            Ok(Some(Err(status))) => Err(Ended {
                error: BrokerError::Unavailable(format!(
                    "submission stream failed: {}",
                    status.message()
                )),
                by_broker: false,
            }),
        },
    }
}

/// A submission stream that ended early: broken off by the sender (its partial upload
/// is kept for a resume) or ended by the broker (stalled, sender suspended: its
/// partial upload goes).
struct Ended {
    error: BrokerError,
    by_broker: bool,
}

impl From<Ended> for BrokerError {
    fn from(ended: Ended) -> Self {
        ended.error
    }
}

/// Adds `len` received bytes to `received`, refusing at once a stream that sends more
/// than the attachments declare in total.
fn count_received(received: &mut u64, len: usize, declared: u64) -> Result<(), BrokerError> {
    match received
        .checked_add(len as u64)
        .filter(|total| *total <= declared)
    {
        Some(total) => {
            *received = total;
            Ok(())
        }
        None => Err(BrokerError::InvalidArgument(format!(
            "the stream sent more attachment bytes than the {declared} the header declares; \
             refused, nothing was stored"
        ))),
    }
}

/// Reads the attachment frames, checking sizes and digests as they pass.
async fn receive_attachments(
    frames: &mut Streaming<pb::SubmitFrame>,
    header: &pb::DocumentHeader,
    call: &Submission<'_>,
    declared: u64,
    stall: std::time::Duration,
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
    let mut received = 0u64;
    while let Some(frame) = next_frame(frames, call, stall).await? {
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
        count_received(&mut received, chunk.data.len(), declared)?;
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

/// What a streamed upload is held to as its bytes arrive.
struct StreamLimits {
    /// The attachments' declared total: a stream never sends more.
    declared: u64,
    stall: std::time::Duration,
    /// Free disk space never given up to an upload.
    min_free_bytes: u64,
}

/// How many received bytes pass between two checks of the free disk space.
const FREE_SPACE_CHECK_BYTES: u64 = 4 * 1024 * 1024;

/// Removes a partial upload folder (the broker ended its stream, or it was refused).
async fn remove_partial(dir: std::path::PathBuf) {
    let shown = dir.display().to_string();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    })
    .await;
    match removed {
        Ok(Ok(())) => tracing::info!(partial = %shown, "partial upload removed"),
        Ok(Err(error)) => {
            tracing::warn!(partial = %shown, %error, "cannot remove a partial upload")
        }
        Err(error) => {
            tracing::warn!(partial = %shown, %error, "partial upload removal did not finish")
        }
    }
}

/// Receives a streamed document's attachments into files in `dir`, continuing what an
/// earlier, interrupted submission of the same signed header left there. Every chunk is
/// written as it arrives and hashed as it passes, and counted against the declared
/// size and the disk reserve; returns once every attachment is complete, matches its
/// digest and is synced. A stream the broker ends itself (more bytes than declared,
/// stalled, sender suspended, disk reserve reached) loses its partial upload; one that
/// the sender broke off keeps it for a resume.
async fn receive_streamed(
    frames: &mut Streaming<pb::SubmitFrame>,
    header: &pb::DocumentHeader,
    dir: std::path::PathBuf,
    call: &Submission<'_>,
    limits: StreamLimits,
    store: &crate::store::Store,
) -> Result<(), BrokerError> {
    let result = receive_streamed_into(frames, header, dir.clone(), call, &limits, store).await;
    if let Err((error, true)) = &result {
        tracing::warn!(%error, "streamed submission ended by the broker; its partial upload goes");
        remove_partial(dir).await;
    }
    result.map_err(|(error, _)| error)
}

/// [`receive_streamed`]; errors carry whether the partial upload must go.
async fn receive_streamed_into(
    frames: &mut Streaming<pb::SubmitFrame>,
    header: &pb::DocumentHeader,
    dir: std::path::PathBuf,
    call: &Submission<'_>,
    limits: &StreamLimits,
    store: &crate::store::Store,
) -> Result<(), (BrokerError, bool)> {
    let keep = |e: BrokerError| (e, false);
    let sweep = |e: BrokerError| (e, true);
    let infos = header.attachments.clone();
    let count = infos.len();
    let opened =
        tokio::task::spawn_blocking(move || lienthong_proto::spool::open_all(&dir, &infos))
            .await
            .map_err(|e| keep(BrokerError::Serve(e.to_string())))?
            .map_err(|e| keep(spool_error(e)))?;
    let mut parts: Vec<Option<PartialAttachment>> = opened.into_iter().map(Some).collect();
    let mut current = 0usize;
    let mut received = 0u64;
    let mut next_space_check = 0u64;
    loop {
        let frame = match next_frame(frames, call, limits.stall).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(ended) => return Err((ended.error, ended.by_broker)),
        };
        let Some(Frame::Chunk(chunk)) = frame.frame else {
            return Err(keep(BrokerError::InvalidArgument(
                "only attachment chunks may follow the envelope".into(),
            )));
        };
        let index = chunk.attachment_index as usize;
        if index < current || index >= count {
            return Err(keep(BrokerError::InvalidArgument(format!(
                "attachment chunk for index {index} out of order or out of range"
            ))));
        }
        current = index;
        count_received(&mut received, chunk.data.len(), limits.declared).map_err(sweep)?;
        if received >= next_space_check {
            next_space_check = received.saturating_add(FREE_SPACE_CHECK_BYTES);
            let free = store.free_bytes().map_err(|e| {
                keep(BrokerError::Unavailable(format!(
                    "cannot read free disk space: {e}"
                )))
            })?;
            if free < limits.min_free_bytes {
                tracing::warn!(free, "streamed submission ended: disk reserve reached");
                return Err(sweep(BrokerError::ResourceExhausted(format!(
                    "the broker's disk reached its reserve ({free} bytes free, {} kept in reserve, \
                     min_free_bytes) while receiving; nothing was stored, retry later",
                    limits.min_free_bytes
                ))));
            }
        }
        let Some(mut part) = parts.get_mut(index).and_then(Option::take) else {
            return Err(keep(BrokerError::Serve("attachment file missing".into())));
        };
        let (part, written) = tokio::task::spawn_blocking(move || {
            let written = part.write_chunk(chunk.offset, &chunk.data);
            (part, written)
        })
        .await
        .map_err(|e| keep(BrokerError::Serve(e.to_string())))?;
        if let Some(slot) = parts.get_mut(index) {
            *slot = Some(part);
        }
        match written {
            Ok(()) => {}
            // More than this attachment declares: refused at once, partial removed.
            Err(e @ SpoolError::Mismatch(_)) => return Err(sweep(spool_error(e))),
            Err(e) => return Err(keep(spool_error(e))),
        }
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
    .map_err(|e| keep(BrokerError::Serve(e.to_string())))?
    .map_err(keep)?;
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

    async fn submit_batch(
        &self,
        request: Request<pb::SubmitBatchRequest>,
    ) -> Result<Response<pb::SubmitBatchResponse>, Status> {
        match self.submit_batch_inner(request).await {
            Ok(response) => Ok(Response::new(response)),
            Err(error) => {
                self.shared.metrics.submission_refused(&error);
                tracing::warn!(%error, "submission batch refused");
                Err(error.into())
            }
        }
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let agency = auth::agency(&self.shared, &request)?;
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
        let caller = auth::agency(&self.shared, &request)?;
        self.refuse_suspended(caller.as_str())?;
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
        let caller = auth::agency(&self.shared, &request)?;
        self.refuse_suspended(caller.as_str())?;
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
