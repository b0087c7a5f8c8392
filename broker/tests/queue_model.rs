//! Model-based test of the broker's queue state machine.
//!
//! proptest generates sequences of operations (submit, push, acknowledge, refuse,
//! expire, sweep expired deliveries, redrive, restart) and runs each against the real
//! [`Store`] and against a small in-memory model of documents and their deliveries.
//! After every operation the store's views must match the model: each recipient's FIFO
//! queue, the pending counters, queue statistics, the expiry index, dead letters and
//! every delivery record, field by field.
//!
//! `PROPTEST_CASES` overrides the number of cases (128 by default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use lienthong_broker::records::{AttemptRecord, DeliveryRecord, DocumentRecord};
use lienthong_broker::store::{Accepted, CHUNK_BYTES, Pending, QueueStats, Settlement, Store};
use lienthong_proto::pb::DeliveryState;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const AGENCIES: [&str; 3] = ["000.00.00.H31", "000.00.12.H31", "000.00.15.H31"];
const START_MS: i64 = 1_750_000_000_000;
/// Every operation happens this long after the previous one.
const STEP_MS: i64 = 1_000;
/// Mirrors the store's attempt log length.
const ATTEMPT_LOG_LEN: usize = 32;

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

/// Chooses among the `len` things that exist when the operation runs.
#[derive(Debug, Clone, Copy)]
struct Pick(usize);

impl Pick {
    fn index(self, len: usize) -> usize {
        self.0 % len
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    (0usize..64).prop_map(Pick)
}

/// A delivery an operation is aimed at: a document by index, and either one of its
/// recipients or any agency (which may not be a recipient at all).
#[derive(Debug, Clone)]
struct Target {
    doc: Pick,
    recipient: Pick,
    any_agency: bool,
}

#[derive(Debug, Clone)]
enum Op {
    /// A new document: recipients as a bit mask over `AGENCIES`.
    Submit {
        recipients: u8,
        ttl_ms: i64,
        attachments: Vec<usize>,
        envelope_len: usize,
    },
    /// An accepted message id again (with a changed record, perhaps a new business id).
    Resubmit {
        doc: Pick,
        new_business_id: bool,
    },
    /// A new message id with the business id of an accepted document.
    ReuseBusinessId {
        doc: Pick,
        recipients: u8,
        attachments: Vec<usize>,
    },
    /// A message id refused for its business id, sent again with a fresh business id
    /// and other attachments.
    RetryRefused {
        which: Pick,
        recipients: u8,
        attachments: Vec<usize>,
    },
    /// The session takes the head of a recipient's queue and counts an attempt.
    Push {
        recipient: Pick,
    },
    /// No acknowledgement in time for the latest attempt.
    Unacked(Target),
    Ack(Target),
    Refuse(Target),
    Expire(Target),
    /// Time passes; the expired deliveries are listed and, if `settle`, dead-lettered.
    ExpireDue {
        advance: Advance,
        limit: usize,
        settle: bool,
    },
    Redrive {
        target: Target,
        ttl_ms: i64,
    },
    /// As an operator does: one of the dead letters, by its position in the list.
    RedriveDeadLetter {
        which: Pick,
        ttl_ms: i64,
    },
    /// Close the store (after making it durable) and open it again.
    Restart,
}

/// How far the clock moves before an expiry sweep.
#[derive(Debug, Clone)]
enum Advance {
    By(i64),
    /// To exactly the expiry of one of the queued deliveries still in the future (the
    /// boundary: due at its expiry, not after it).
    ToExpiryOf(Pick),
}

fn target() -> impl Strategy<Value = Target> {
    (pick(), pick(), prop::bool::weighted(0.15)).prop_map(|(doc, recipient, any_agency)| Target {
        doc,
        recipient,
        any_agency,
    })
}

fn attachment_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(
        prop_oneof![
            12 => 0usize..300,
            1 => Just(CHUNK_BYTES),
            1 => Just(CHUNK_BYTES + 1),
        ],
        0..4,
    )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (1u8..8, 0i64..40_000, attachment_sizes(), 0usize..64).prop_map(
            |(recipients, ttl_ms, attachments, envelope_len)| Op::Submit {
                recipients,
                ttl_ms,
                attachments,
                envelope_len,
            }
        ),
        1 => (pick(), any::<bool>())
            .prop_map(|(doc, new_business_id)| Op::Resubmit { doc, new_business_id }),
        1 => (pick(), 1u8..8, attachment_sizes()).prop_map(
            |(doc, recipients, attachments)| Op::ReuseBusinessId {
                doc,
                recipients,
                attachments,
            }
        ),
        1 => (pick(), 1u8..8, attachment_sizes()).prop_map(
            |(which, recipients, attachments)| Op::RetryRefused {
                which,
                recipients,
                attachments,
            }
        ),
        5 => pick().prop_map(|recipient| Op::Push { recipient }),
        1 => target().prop_map(Op::Unacked),
        3 => target().prop_map(Op::Ack),
        2 => target().prop_map(Op::Refuse),
        1 => target().prop_map(Op::Expire),
        3 => (
            prop_oneof![
                (0i64..20_000).prop_map(Advance::By),
                pick().prop_map(Advance::ToExpiryOf),
            ],
            1usize..6,
            any::<bool>(),
        ).prop_map(
            |(advance, limit, settle)| Op::ExpireDue {
                advance,
                limit,
                settle,
            }
        ),
        3 => (target(), 0i64..40_000).prop_map(|(target, ttl_ms)| Op::Redrive { target, ttl_ms }),
        2 => (pick(), 0i64..40_000)
            .prop_map(|(which, ttl_ms)| Op::RedriveDeadLetter { which, ttl_ms }),
        1 => Just(Op::Restart),
    ]
}

// ---------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Delivered,
    Refused,
    Expired,
}

impl State {
    fn wire(self) -> DeliveryState {
        match self {
            State::Queued => DeliveryState::Queued,
            State::Delivered => DeliveryState::Delivered,
            State::Refused => DeliveryState::Refused,
            State::Expired => DeliveryState::Expired,
        }
    }

    fn is_dead(self) -> bool {
        matches!(self, State::Refused | State::Expired)
    }
}

#[derive(Debug, Clone)]
struct Delivery {
    recipient: String,
    state: State,
    /// Position in the recipient's queue while queued: acceptance (or redrive) order.
    seq: u64,
    enqueued_at: i64,
    expires_at: i64,
    attempts: u32,
    last_attempt_at: i64,
    delivered_at: i64,
    receipt: Vec<u8>,
    reason: String,
    notice: Vec<u8>,
    dead_at: i64,
    log: Vec<(i64, String)>,
}

impl Delivery {
    fn push_log(&mut self, at: i64, outcome: &str) {
        self.log.push((at, outcome.to_owned()));
        if self.log.len() > ATTEMPT_LOG_LEN {
            let excess = self.log.len() - ATTEMPT_LOG_LEN;
            self.log.drain(..excess);
        }
    }

    fn resolve_last(&mut self, outcome: &str) {
        if let Some(last) = self.log.last_mut()
            && last.1 == "pushed"
        {
            last.1 = outcome.to_owned();
        }
    }

    /// The record the store should hold, with the queue and expiry keys left empty.
    fn expected_record(&self) -> DeliveryRecord {
        DeliveryRecord {
            state: self.state.wire() as i32,
            queue_key: Vec::new(),
            attempts: self.attempts,
            last_attempt_at_ms: self.last_attempt_at,
            delivered_at_ms: self.delivered_at,
            receipt: self.receipt.clone(),
            reason: self.reason.clone(),
            expires_at_ms: self.expires_at,
            expiry_key: Vec::new(),
            notice: self.notice.clone(),
            dead_at_ms: self.dead_at,
            attempt_log: self
                .log
                .iter()
                .map(|(at_ms, outcome)| AttemptRecord {
                    at_ms: *at_ms,
                    outcome: outcome.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
struct Doc {
    message_id: String,
    record: DocumentRecord,
    attachments: Vec<Bytes>,
    deliveries: Vec<Delivery>,
}

impl Doc {
    fn queue_bytes(&self) -> u64 {
        self.record.attachment_bytes + self.record.envelope.len() as u64
    }
}

#[derive(Debug)]
struct Model {
    docs: Vec<Doc>,
    /// Message ids refused because their business id was taken, never accepted.
    refused_ids: Vec<String>,
    next_seq: u64,
    next_id: u64,
    now: i64,
}

/// Decoded recipient set from a bit mask over `AGENCIES` (never empty for 1..8).
fn recipients_of(mask: u8) -> Vec<String> {
    AGENCIES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, code)| (*code).to_owned())
        .collect()
}

fn attachments_of(sizes: &[usize], salt: u64) -> Vec<Bytes> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, size)| {
            let fill = (salt as usize).wrapping_mul(31).wrapping_add(i) as u8;
            Bytes::from(
                (0..*size)
                    .map(|k| fill.wrapping_add(k as u8))
                    .collect::<Vec<u8>>(),
            )
        })
        .collect()
}

impl Model {
    fn new() -> Self {
        Self {
            docs: Vec::new(),
            refused_ids: Vec::new(),
            next_seq: 0,
            next_id: 0,
            now: START_MS,
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn fresh_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn record(
        &self,
        id: u64,
        business_id: String,
        recipients: Vec<String>,
        ttl_ms: i64,
        attachments: &[Bytes],
        envelope_len: usize,
    ) -> DocumentRecord {
        DocumentRecord {
            envelope: vec![0xe5; envelope_len],
            submission_receipt: format!("submission-receipt-{id}").into_bytes(),
            header_sha256: vec![(id % 251) as u8; 32],
            accepted_at_ms: self.now,
            business_id,
            sender: "000.00.99.H31".into(),
            recipients,
            attachment_bytes: attachments.iter().map(|a| a.len() as u64).sum(),
            attachment_count: attachments.len() as u32,
            expires_at_ms: self.now + ttl_ms,
            streamed: false,
        }
    }

    /// Adds an accepted document with all its deliveries queued.
    fn accept(&mut self, message_id: String, record: DocumentRecord, attachments: Vec<Bytes>) {
        let mut deliveries = Vec::new();
        for recipient in &record.recipients {
            let seq = self.fresh_seq();
            deliveries.push(Delivery {
                recipient: recipient.clone(),
                state: State::Queued,
                seq,
                enqueued_at: record.accepted_at_ms,
                expires_at: record.expires_at_ms,
                attempts: 0,
                last_attempt_at: 0,
                delivered_at: 0,
                receipt: Vec::new(),
                reason: String::new(),
                notice: Vec::new(),
                dead_at: 0,
                log: Vec::new(),
            });
        }
        self.docs.push(Doc {
            message_id,
            record,
            attachments,
            deliveries,
        });
    }

    fn doc(&self, index: Pick) -> Option<&Doc> {
        (!self.docs.is_empty()).then(|| &self.docs[index.index(self.docs.len())])
    }

    /// The (message id, recipient) a target names; a made-up message id when there is
    /// no document yet.
    fn resolve(&self, target: &Target) -> (String, String) {
        match self.doc(target.doc) {
            None => (
                "msg-none".into(),
                AGENCIES[target.recipient.index(AGENCIES.len())].to_owned(),
            ),
            Some(doc) => {
                let recipient = if target.any_agency {
                    AGENCIES[target.recipient.index(AGENCIES.len())].to_owned()
                } else {
                    let n = doc.record.recipients.len();
                    doc.record.recipients[target.recipient.index(n)].clone()
                };
                (doc.message_id.clone(), recipient)
            }
        }
    }

    fn advance(&mut self, advance: &Advance) {
        match advance {
            Advance::By(ms) => self.now += ms,
            Advance::ToExpiryOf(pick) => {
                let now = self.now;
                let mut future: Vec<i64> = self
                    .docs
                    .iter()
                    .flat_map(|doc| &doc.deliveries)
                    .filter(|d| d.state == State::Queued && d.expires_at > now)
                    .map(|d| d.expires_at)
                    .collect();
                future.sort_unstable();
                if !future.is_empty() {
                    self.now = future[pick.index(future.len())];
                }
            }
        }
    }

    fn delivery_mut(&mut self, message_id: &str, recipient: &str) -> Option<&mut Delivery> {
        self.docs
            .iter_mut()
            .find(|d| d.message_id == message_id)?
            .deliveries
            .iter_mut()
            .find(|d| d.recipient == recipient)
    }

    /// The queued deliveries of `recipient` in FIFO order: (message id, delivery, bytes).
    fn queue(&self, recipient: &str) -> Vec<(&str, &Delivery, u64)> {
        let mut queue: Vec<_> = self
            .docs
            .iter()
            .flat_map(|doc| {
                doc.deliveries
                    .iter()
                    .filter(|d| d.recipient == recipient && d.state == State::Queued)
                    .map(move |d| (doc.message_id.as_str(), d, doc.queue_bytes()))
            })
            .collect();
        queue.sort_by_key(|(_, d, _)| d.seq);
        queue
    }

    /// Queued deliveries due at `now`, in expiry-index order: expiry, then queue key
    /// (recipient codes all have the same length, so recipient then sequence).
    fn due(&self, now: i64) -> Vec<(String, String)> {
        let mut due: Vec<(i64, &str, u64, &str)> = self
            .docs
            .iter()
            .flat_map(|doc| {
                doc.deliveries
                    .iter()
                    .filter(move |d| d.state == State::Queued && d.expires_at <= now)
                    .map(move |d| {
                        (
                            d.expires_at.max(0),
                            d.recipient.as_str(),
                            d.seq,
                            doc.message_id.as_str(),
                        )
                    })
            })
            .collect();
        due.sort();
        due.into_iter()
            .map(|(_, recipient, _, message_id)| (message_id.to_owned(), recipient.to_owned()))
            .collect()
    }

    /// Dead letters in the store's key order: recipient, then message id.
    fn dead_letters(&self) -> Vec<(String, String)> {
        let set: BTreeSet<(String, String)> = self
            .docs
            .iter()
            .flat_map(|doc| {
                doc.deliveries
                    .iter()
                    .filter(|d| d.state.is_dead())
                    .map(|d| (d.recipient.clone(), doc.message_id.clone()))
            })
            .collect();
        set.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------

fn open(dir: &Path) -> Store {
    Store::open(dir).expect("open the store")
}

/// Runs `ops` against a fresh store and the model; `trace` receives the resolved
/// operations, for the failure message.
async fn run(ops: &[Op], dir: &Path, trace: &mut String) -> Result<(), TestCaseError> {
    let mut store = open(dir);
    let mut model = Model::new();
    check(&store, &model)?;
    for (step, op) in ops.iter().enumerate() {
        model.now += STEP_MS;
        let now = model.now;
        match op {
            Op::Submit {
                recipients,
                ttl_ms,
                attachments,
                envelope_len,
            } => {
                let id = model.fresh_id();
                let message_id = format!("msg-{id:06}");
                let files = attachments_of(attachments, id);
                let record = model.record(
                    id,
                    format!("biz-{id:06}"),
                    recipients_of(*recipients),
                    *ttl_ms,
                    &files,
                    *envelope_len,
                );
                let _ = writeln!(
                    trace,
                    "{step}: submit {message_id} to {:?}, expires {}, attachments {attachments:?}",
                    record.recipients,
                    record.expires_at_ms - START_MS
                );
                let outcome = store.accept(&record, &message_id, &files).unwrap();
                prop_assert!(matches!(outcome, Accepted::New), "{outcome:?}");
                let stored = store.attachments(&message_id, record.attachment_count);
                prop_assert_eq!(stored.unwrap(), files.clone());
                model.accept(message_id, record, files);
            }
            Op::Resubmit {
                doc,
                new_business_id,
            } => {
                let Some(original) = model.doc(*doc).cloned() else {
                    continue;
                };
                let mut record = original.record.clone();
                record.accepted_at_ms = now;
                record.submission_receipt = b"another receipt".to_vec();
                if *new_business_id {
                    record.business_id = format!("biz-{:06}", model.fresh_id());
                }
                let _ = writeln!(
                    trace,
                    "{step}: resubmit {} with business id {}",
                    original.message_id, record.business_id
                );
                let outcome = store
                    .accept(&record, &original.message_id, &original.attachments)
                    .unwrap();
                match outcome {
                    Accepted::Duplicate(existing) => prop_assert_eq!(existing, original.record),
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "expected a duplicate, got {other:?}"
                        )));
                    }
                }
            }
            Op::ReuseBusinessId {
                doc,
                recipients,
                attachments,
            } => {
                let Some(original) = model.doc(*doc).cloned() else {
                    continue;
                };
                let id = model.fresh_id();
                let message_id = format!("msg-{id:06}");
                let files = attachments_of(attachments, id);
                let record = model.record(
                    id,
                    original.record.business_id.clone(),
                    recipients_of(*recipients),
                    10_000,
                    &files,
                    8,
                );
                let _ = writeln!(
                    trace,
                    "{step}: submit {message_id} reusing business id {} of {}, attachments {attachments:?}",
                    record.business_id, original.message_id
                );
                let outcome = store.accept(&record, &message_id, &files).unwrap();
                match outcome {
                    Accepted::BusinessIdTaken { message_id: owner } => {
                        prop_assert_eq!(owner, original.message_id)
                    }
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "expected BusinessIdTaken, got {other:?}"
                        )));
                    }
                }
                model.refused_ids.push(message_id);
            }
            Op::RetryRefused {
                which,
                recipients,
                attachments,
            } => {
                if model.refused_ids.is_empty() {
                    continue;
                }
                let message_id = model
                    .refused_ids
                    .remove(which.index(model.refused_ids.len()));
                let id = model.fresh_id();
                let files = attachments_of(attachments, id);
                let record = model.record(
                    id,
                    format!("biz-{id:06}"),
                    recipients_of(*recipients),
                    20_000,
                    &files,
                    8,
                );
                let _ = writeln!(
                    trace,
                    "{step}: submit refused {message_id} again to {:?} with business id {}, attachments {attachments:?}",
                    record.recipients, record.business_id
                );
                let outcome = store.accept(&record, &message_id, &files).unwrap();
                prop_assert!(matches!(outcome, Accepted::New), "{outcome:?}");
                let stored = store.attachments(&message_id, record.attachment_count);
                prop_assert_eq!(
                    stored.map_err(|e| e.to_string()),
                    Ok(files.clone()),
                    "attachments of {} after its second submission",
                    message_id
                );
                model.accept(message_id, record, files);
            }
            Op::Push { recipient } => {
                let recipient = AGENCIES[recipient.index(AGENCIES.len())];
                let head = model
                    .queue(recipient)
                    .first()
                    .map(|(id, _, _)| (*id).to_owned());
                let _ = writeln!(trace, "{step}: push {recipient} (model head {head:?})");
                let actual = store.next_queued(recipient, None).unwrap();
                prop_assert_eq!(
                    actual.as_ref().map(|(_, e)| e.message_id.clone()),
                    head.clone()
                );
                if let Some(message_id) = head {
                    let attempt = store.record_attempt(&message_id, recipient, now).unwrap();
                    let delivery = model.delivery_mut(&message_id, recipient).unwrap();
                    delivery.attempts += 1;
                    delivery.last_attempt_at = now;
                    delivery.push_log(now, "pushed");
                    prop_assert_eq!(attempt, delivery.attempts);
                }
            }
            Op::Unacked(target) => {
                let (message_id, recipient) = model.resolve(target);
                let _ = writeln!(trace, "{step}: no ack from {recipient} for {message_id}");
                store
                    .resolve_attempt(&message_id, &recipient, "no acknowledgement")
                    .unwrap();
                if let Some(delivery) = model.delivery_mut(&message_id, &recipient) {
                    delivery.resolve_last("no acknowledgement");
                }
            }
            Op::Ack(target) => {
                let (message_id, recipient) = model.resolve(target);
                let receipt = format!("delivery-receipt-{step}").into_bytes();
                let _ = writeln!(trace, "{step}: ack {message_id} by {recipient}");
                let settled = store
                    .settle(
                        &message_id,
                        &recipient,
                        Settlement::Delivered {
                            receipt: receipt.clone(),
                        },
                        now,
                    )
                    .unwrap();
                let expected = match model.delivery_mut(&message_id, &recipient) {
                    Some(d) if d.state == State::Queued || d.state.is_dead() => {
                        d.state = State::Delivered;
                        d.receipt = receipt;
                        d.delivered_at = now;
                        d.resolve_last("acknowledged");
                        true
                    }
                    _ => false,
                };
                prop_assert_eq!(settled, expected, "ack {} by {}", message_id, recipient);
            }
            Op::Refuse(target) | Op::Expire(target) => {
                let state = if matches!(op, Op::Refuse(_)) {
                    State::Refused
                } else {
                    State::Expired
                };
                let (message_id, recipient) = model.resolve(target);
                let _ = writeln!(trace, "{step}: {state:?} {message_id} for {recipient}");
                dead(&store, &mut model, &message_id, &recipient, state, step)?;
            }
            Op::ExpireDue {
                advance,
                limit,
                settle,
            } => {
                model.advance(advance);
                let now = model.now;
                let mut expected = model.due(now);
                expected.truncate(*limit);
                let _ = writeln!(
                    trace,
                    "{step}: at {} list {limit} due (model {expected:?}), settle {settle}",
                    now - START_MS
                );
                let due = store.expired_due(now, *limit).unwrap();
                prop_assert_eq!(&due, &expected);
                if *settle {
                    for (message_id, recipient) in &due {
                        let settled = dead(
                            &store,
                            &mut model,
                            message_id,
                            recipient,
                            State::Expired,
                            step,
                        )?;
                        prop_assert!(settled, "due {} for {} not settled", message_id, recipient);
                    }
                }
            }
            Op::Redrive { target, ttl_ms } => {
                let (message_id, recipient) = model.resolve(target);
                let expires_at = now + ttl_ms;
                let _ = writeln!(
                    trace,
                    "{step}: redrive {message_id} for {recipient}, expires {}",
                    expires_at - START_MS
                );
                redrive(&store, &mut model, &message_id, &recipient, expires_at)?;
            }
            Op::RedriveDeadLetter { which, ttl_ms } => {
                let dead = model.dead_letters();
                if dead.is_empty() {
                    continue;
                }
                let (recipient, message_id) = dead[which.index(dead.len())].clone();
                let expires_at = now + ttl_ms;
                let _ = writeln!(
                    trace,
                    "{step}: redrive dead letter {message_id} for {recipient}, expires {}",
                    expires_at - START_MS
                );
                let redriven = redrive(&store, &mut model, &message_id, &recipient, expires_at)?;
                prop_assert!(redriven);
            }
            Op::Restart => {
                let _ = writeln!(trace, "{step}: restart");
                store.release().await.unwrap();
                store = open(dir);
                for doc in &model.docs {
                    let stored = store
                        .attachments(&doc.message_id, doc.record.attachment_count)
                        .unwrap();
                    prop_assert_eq!(stored, doc.attachments.clone());
                }
            }
        }
        check(&store, &model)?;
    }
    store.release().await.unwrap();
    Ok(())
}

/// Redrives a delivery in both; returns whether the store did (checked against the
/// model: only a dead letter can be redriven, to the back of the queue).
fn redrive(
    store: &Store,
    model: &mut Model,
    message_id: &str,
    recipient: &str,
    expires_at: i64,
) -> Result<bool, TestCaseError> {
    let now = model.now;
    let redriven = store
        .redrive(message_id, recipient, expires_at, now, "certificate test")
        .unwrap();
    let seq = model.next_seq + 1;
    let expected = match model.delivery_mut(message_id, recipient) {
        Some(d) if d.state.is_dead() => {
            d.state = State::Queued;
            d.seq = seq;
            d.enqueued_at = now;
            d.expires_at = expires_at;
            d.reason.clear();
            d.notice.clear();
            d.dead_at = 0;
            d.push_log(now, "redriven");
            true
        }
        _ => false,
    };
    if expected {
        model.fresh_seq();
    }
    prop_assert_eq!(
        redriven,
        expected,
        "redrive {} for {}",
        message_id,
        recipient
    );
    Ok(redriven)
}

/// Dead-letters a delivery in both; returns whether the store settled it (checked
/// against the model: only a queued delivery can die).
fn dead(
    store: &Store,
    model: &mut Model,
    message_id: &str,
    recipient: &str,
    state: State,
    step: usize,
) -> Result<bool, TestCaseError> {
    let reason = format!("{state:?} at step {step}");
    let notice = format!("notice-{step}-{recipient}").into_bytes();
    let now = model.now;
    let settled = store
        .settle(
            message_id,
            recipient,
            Settlement::Dead {
                state: state.wire(),
                reason: reason.clone(),
                notice: notice.clone(),
            },
            now,
        )
        .unwrap();
    let expected = match model.delivery_mut(message_id, recipient) {
        Some(d) if d.state == State::Queued => {
            d.state = state;
            d.reason = reason;
            d.notice = notice;
            d.dead_at = now;
            d.resolve_last(if state == State::Refused {
                "refused"
            } else {
                "expired"
            });
            true
        }
        _ => false,
    };
    prop_assert_eq!(
        settled,
        expected,
        "{:?} {} for {}",
        state,
        message_id,
        recipient
    );
    Ok(settled)
}

/// Compares every view of the store with the model.
fn check(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    // Queues: walked from the start, FIFO, each entry matching its delivery record.
    let mut queue_keys = std::collections::HashMap::new();
    for recipient in AGENCIES {
        let expected = model.queue(recipient);
        let mut walked = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        while let Some((key, entry)) = store.next_queued(recipient, after.as_deref()).unwrap() {
            prop_assert!(key.starts_with(recipient.as_bytes()));
            prop_assert!(walked.len() <= expected.len() + 1, "queue walk runs away");
            queue_keys.insert((entry.message_id.clone(), recipient), key.clone());
            walked.push(entry);
            after = Some(key);
        }
        let walked_ids: Vec<&str> = walked.iter().map(|e| e.message_id.as_str()).collect();
        let expected_ids: Vec<&str> = expected.iter().map(|(id, _, _)| *id).collect();
        prop_assert_eq!(&walked_ids, &expected_ids, "queue of {}", recipient);
        for (entry, (_, delivery, bytes)) in walked.iter().zip(&expected) {
            prop_assert_eq!(entry.bytes, *bytes);
            prop_assert_eq!(entry.enqueued_at_ms, delivery.enqueued_at);
            prop_assert_eq!(entry.expires_at_ms, delivery.expires_at);
        }
        let pending = Pending {
            documents: expected.len() as u64,
            bytes: expected.iter().map(|(_, _, b)| b).sum(),
        };
        prop_assert_eq!(
            store.pending(recipient),
            pending,
            "pending of {}",
            recipient
        );
        let stats = QueueStats {
            pending: pending.documents,
            pending_bytes: pending.bytes,
            oldest_enqueued_ms: expected.iter().map(|(_, d, _)| d.enqueued_at).min(),
        };
        prop_assert_eq!(
            store.queue_stats(recipient).unwrap(),
            stats,
            "stats of {}",
            recipient
        );
    }

    // The expiry index holds exactly the queued deliveries, in expiry order.
    prop_assert_eq!(
        store.expired_due(i64::MAX, usize::MAX).unwrap(),
        model.due(i64::MAX),
        "the whole expiry index"
    );

    // Dead letters: all, and per recipient.
    let dead = model.dead_letters();
    let listed = store.dead_letters(None).unwrap();
    let listed_pairs: Vec<(String, String)> = listed
        .iter()
        .map(|e| (e.recipient.clone(), e.message_id.clone()))
        .collect();
    prop_assert_eq!(&listed_pairs, &dead, "dead letters");
    for entry in &listed {
        let state = entry.record.state;
        prop_assert!(
            state == DeliveryState::Expired as i32 || state == DeliveryState::Refused as i32,
            "dead letter {} for {} in state {}",
            entry.message_id,
            entry.recipient,
            state
        );
    }
    for recipient in AGENCIES {
        let mine: Vec<(String, String)> = store
            .dead_letters(Some(recipient))
            .unwrap()
            .into_iter()
            .map(|e| (e.recipient, e.message_id))
            .collect();
        let expected: Vec<(String, String)> = dead
            .iter()
            .filter(|(r, _)| r == recipient)
            .cloned()
            .collect();
        prop_assert_eq!(mine, expected, "dead letters of {}", recipient);
    }

    // Documents, business ids and every delivery record.
    prop_assert_eq!(store.document_count(), model.docs.len());
    for doc in &model.docs {
        prop_assert_eq!(
            store.document(&doc.message_id).unwrap(),
            Some(doc.record.clone())
        );
        prop_assert_eq!(
            store
                .message_for_business_id(&doc.record.business_id)
                .unwrap(),
            Some(doc.message_id.clone())
        );
        for recipient in AGENCIES {
            let actual = store.delivery(&doc.message_id, recipient).unwrap();
            let Some(expected) = doc.deliveries.iter().find(|d| d.recipient == recipient) else {
                prop_assert!(
                    actual.is_none(),
                    "{} has no delivery to {}",
                    doc.message_id,
                    recipient
                );
                continue;
            };
            let Some(actual) = actual else {
                return Err(TestCaseError::fail(format!(
                    "{} to {recipient}: no delivery record",
                    doc.message_id
                )));
            };
            let mut wanted = expected.expected_record();
            if expected.state == State::Queued {
                let key = queue_keys
                    .get(&(doc.message_id.clone(), recipient))
                    .cloned()
                    .unwrap_or_default();
                let mut expiry_key = (expected.expires_at.max(0) as u64).to_be_bytes().to_vec();
                expiry_key.extend_from_slice(&key);
                wanted.queue_key = key;
                wanted.expiry_key = expiry_key;
            }
            prop_assert_eq!(
                &actual,
                &wanted,
                "delivery record of {} to {}",
                doc.message_id,
                recipient
            );
        }
    }
    for message_id in &model.refused_ids {
        prop_assert!(store.document(message_id).unwrap().is_none());
    }
    Ok(())
}

/// Runs a fixed sequence through the same harness as the property.
fn run_fixed(ops: &[Op]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut trace = String::new();
    let result = runtime.block_on(run(ops, &tmp.path().join("store"), &mut trace));
    if let Err(error) = result {
        panic!("{error}\noperations:\n{trace}");
    }
}

/// Found by the model: a message id refused for its business id had its attachments
/// stored already; accepted later with fewer (or shorter) attachments, the refused
/// submission's chunks were still under its prefix, so `attachments()` returned extra
/// bytes or failed with "attachment index out of range" (and the push with it).
#[test]
fn refused_message_id_accepted_later_with_other_attachments() {
    let first = Pick(0);
    run_fixed(&[
        Op::Submit {
            recipients: 1,
            ttl_ms: 10_000,
            attachments: vec![],
            envelope_len: 4,
        },
        Op::ReuseBusinessId {
            doc: first,
            recipients: 2,
            attachments: vec![CHUNK_BYTES + 1, 10],
        },
        Op::RetryRefused {
            which: first,
            recipients: 2,
            attachments: vec![10],
        },
        Op::Push { recipient: Pick(1) },
        Op::Restart,
    ]);
}

fn config() -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(128)
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn queue_matches_model(ops in prop::collection::vec(op(), 20..=60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("store");
        let mut trace = String::new();
        let result = runtime.block_on(run(&ops, &dir, &mut trace));
        if let Err(error) = result {
            return Err(TestCaseError::fail(format!("{error}\noperations:\n{trace}")));
        }
    }
}
