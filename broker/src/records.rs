//! The records the broker keeps in sled, encoded with prost. These are internal storage
//! formats, not wire messages; changing one needs a new store format version.

/// One accepted document.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DocumentRecord {
    /// The sender's `Signed` envelope, encoded exactly as received.
    #[prost(bytes = "vec", tag = "1")]
    pub envelope: Vec<u8>,
    /// The broker's signed submission receipt (`Signed`, encoded).
    #[prost(bytes = "vec", tag = "2")]
    pub submission_receipt: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub header_sha256: Vec<u8>,
    #[prost(int64, tag = "4")]
    pub accepted_at_ms: i64,
    #[prost(string, tag = "5")]
    pub business_id: String,
    #[prost(string, tag = "6")]
    pub sender: String,
    #[prost(string, repeated, tag = "7")]
    pub recipients: Vec<String>,
    /// Sum of the attachments' sizes.
    #[prost(uint64, tag = "8")]
    pub attachment_bytes: u64,
    #[prost(uint32, tag = "9")]
    pub attachment_count: u32,
    /// When undelivered copies become dead letters, Unix ms.
    #[prost(int64, tag = "10")]
    pub expires_at_ms: i64,
    /// The attachments are files under the store's blob folder, not chunks in sled.
    #[prost(bool, tag = "11")]
    pub streamed: bool,
}

/// A queue entry: the value under `recipient ‖ seq` in the queue tree.
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueueEntry {
    #[prost(string, tag = "1")]
    pub message_id: String,
    #[prost(uint64, tag = "2")]
    pub bytes: u64,
    #[prost(int64, tag = "3")]
    pub enqueued_at_ms: i64,
    #[prost(int64, tag = "4")]
    pub expires_at_ms: i64,
    /// The document's sender, for the per-(sender, recipient) counters; empty in
    /// entries written before it was kept (then read from the document record).
    #[prost(string, tag = "5")]
    pub sender: String,
}

/// The state of one document for one recipient.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeliveryRecord {
    /// `lienthong_proto::pb::DeliveryState` as i32.
    #[prost(int32, tag = "1")]
    pub state: i32,
    /// The queue key while queued.
    #[prost(bytes = "vec", tag = "2")]
    pub queue_key: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub attempts: u32,
    #[prost(int64, tag = "4")]
    pub last_attempt_at_ms: i64,
    #[prost(int64, tag = "5")]
    pub delivered_at_ms: i64,
    /// The recipient's signed delivery receipt (`Signed`, encoded), once delivered.
    #[prost(bytes = "vec", tag = "6")]
    pub receipt: Vec<u8>,
    #[prost(string, tag = "7")]
    pub reason: String,
    #[prost(int64, tag = "8")]
    pub expires_at_ms: i64,
    /// The key in the expiry index while queued.
    #[prost(bytes = "vec", tag = "9")]
    pub expiry_key: Vec<u8>,
    /// The broker's signed dead-letter notice (`Signed`, encoded) when expired or refused.
    #[prost(bytes = "vec", tag = "10")]
    pub notice: Vec<u8>,
    /// When it became a dead letter, Unix ms.
    #[prost(int64, tag = "11")]
    pub dead_at_ms: i64,
    /// The latest attempts, oldest first.
    #[prost(message, repeated, tag = "12")]
    pub attempt_log: Vec<AttemptRecord>,
}

/// One push attempt and what became of it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttemptRecord {
    #[prost(int64, tag = "1")]
    pub at_ms: i64,
    #[prost(string, tag = "2")]
    pub outcome: String,
}

/// A registered agency.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AgencyRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int64, tag = "2")]
    pub registered_at_ms: i64,
    /// True when registered automatically on its first authenticated connection.
    #[prost(bool, tag = "3")]
    pub auto_registered: bool,
    /// A suspended agency can neither send nor receive; its queue waits.
    #[prost(bool, tag = "4")]
    pub suspended: bool,
    #[prost(string, tag = "5")]
    pub suspended_reason: String,
    /// When it was suspended, Unix ms; 0 when not suspended.
    #[prost(int64, tag = "6")]
    pub suspended_at_ms: i64,
}

/// One entry of the hash-chained audit log (tree `audit`, key: `seq` as u64 BE).
/// `hash` = SHA-256(`prev_hash` ‖ this entry encoded with `hash` empty); the first
/// entry's `prev_hash` is 32 zero bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditRecord {
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    #[prost(int64, tag = "2")]
    pub at_ms: i64,
    /// "accepted", "delivered", "dead_letter", "redriven", "agency_registered",
    /// "agency_suspended", "agency_resumed".
    #[prost(string, tag = "3")]
    pub kind: String,
    #[prost(string, tag = "4")]
    pub message_id: String,
    /// The sender for "accepted", the recipient for deliveries, the agency itself else.
    #[prost(string, tag = "5")]
    pub agency: String,
    #[prost(bytes = "vec", tag = "6")]
    pub header_sha256: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    pub prev_hash: Vec<u8>,
    #[prost(bytes = "vec", tag = "8")]
    pub hash: Vec<u8>,
    /// E.g. a dead letter's outcome and reason, a suspension's reason.
    #[prost(string, tag = "9")]
    pub detail: String,
}

/// One event in the life of a delivery, for operators' views.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineEvent {
    pub at_ms: i64,
    pub event: &'static str,
    pub detail: String,
}

/// The life of one delivery: accepted, each attempt with its outcome (the attempt log
/// keeps the latest 32), then the receipt or the refusal/expiry. Shared by the Admin
/// service and the dashboard so both tell the same story.
pub fn delivery_timeline(
    document: &DocumentRecord,
    delivery: &DeliveryRecord,
) -> Vec<TimelineEvent> {
    use lienthong_proto::pb::DeliveryState;
    let event = |at_ms: i64, event: &'static str, detail: String| TimelineEvent {
        at_ms,
        event,
        detail,
    };
    let mut events = vec![event(
        document.accepted_at_ms,
        "accepted",
        "queued for this recipient".into(),
    )];
    for attempt in &delivery.attempt_log {
        events.push(match attempt.outcome.as_str() {
            "redriven" => event(
                attempt.at_ms,
                "redriven",
                "queued again by an operator".into(),
            ),
            outcome => event(attempt.at_ms, "pushed", outcome.to_owned()),
        });
    }
    match DeliveryState::try_from(delivery.state) {
        Ok(DeliveryState::Delivered) => events.push(event(
            delivery.delivered_at_ms,
            "delivered",
            "signed delivery receipt received".into(),
        )),
        Ok(DeliveryState::Refused) => events.push(event(
            delivery.dead_at_ms,
            "refused",
            delivery.reason.clone(),
        )),
        Ok(DeliveryState::Expired) => events.push(event(
            delivery.dead_at_ms,
            "expired",
            delivery.reason.clone(),
        )),
        Ok(DeliveryState::Recalled) => events.push(event(
            delivery.dead_at_ms,
            "recalled",
            delivery.reason.clone(),
        )),
        _ => {}
    }
    events
}
