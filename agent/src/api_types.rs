//! JSON bodies of the agent's local HTTP API, shared with the CLI client.
//!
//! Invariant: these are the only shapes the API reads and writes; `openapi.json`
//! describes exactly these. Optional request fields may be omitted; optional response
//! fields are `null` when unknown.
//!
//! Every request type denies unknown fields: a misspelt optional field (`subjct`,
//! `priorty`) would otherwise be dropped silently and the document sent without it.
//! The refusal is a `400` naming the field. (serde cannot combine `deny_unknown_fields`
//! with `flatten`, so request types never flatten; only the `InboxDetail` answer does.)

use serde::{Deserialize, Serialize};

/// `POST /v1/documents`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    /// Recipient agency codes.
    pub to: Vec<String>,
    /// Trích yếu.
    pub subject: String,
    /// Số; when absent the agent's own counter gives the next number.
    #[serde(default)]
    pub number: Option<String>,
    /// Ký hiệu.
    #[serde(default)]
    pub notation: Option<String>,
    /// 0 normal .. 4 express at a set time.
    #[serde(default)]
    pub priority: Option<u32>,
    #[serde(default)]
    pub document_type: Option<String>,
    #[serde(default)]
    pub document_type_name: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub issue_place: Option<String>,
    /// `yyyy/MM/dd`; today in Vietnam when absent.
    #[serde(default)]
    pub issue_date: Option<String>,
    #[serde(default)]
    pub signer: Option<SignerJson>,
    /// 1 not a directive, 2 directive, 3 report on a directive.
    #[serde(default)]
    pub steering_type: Option<u32>,
    /// `yyyy/MM/dd`.
    #[serde(default)]
    pub due_date: Option<String>,
    #[serde(default)]
    pub to_places: Option<Vec<String>>,
    /// Unix milliseconds; the broker's default (by priority) when absent.
    #[serde(default)]
    pub expires_at_ms: Option<i64>,
    #[serde(default)]
    pub attachments: Vec<AttachmentUpload>,
    /// 0 new (default), 1 recall, 2 update, 3 replace.
    #[serde(default)]
    pub business_type: Option<u32>,
    /// Recall, update, replace: the message id (sent by this agent) it refers to.
    #[serde(default)]
    pub refers_to: Option<String>,
    /// Recall, update, replace: why. Required for a recall.
    #[serde(default)]
    pub business_reason: Option<String>,
    /// Update, replace: recipients of the earlier version that this one removes (they
    /// are told). `to` holds the recipients of the new version.
    #[serde(default)]
    pub removed_recipients: Option<Vec<String>>,
    /// From/OrganName, e.g. "Ủy ban nhân dân tỉnh Hưng Yên".
    #[serde(default)]
    pub sender_name: Option<String>,
}

/// Who signed the document on paper.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerJson {
    #[serde(default)]
    pub competence: String,
    #[serde(default)]
    pub position: String,
    #[serde(default)]
    pub full_name: String,
}

/// One attachment of a [`SendRequest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachmentUpload {
    /// Plain file name, no directory part.
    pub name: String,
    /// Guessed from the extension when absent.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The file's bytes, standard base64 with padding (small files). Give either this
    /// or `upload_id`.
    #[serde(default)]
    pub content_base64: String,
    /// An upload made with `POST /v1/uploads` (any size, streamed to disk).
    #[serde(default)]
    pub upload_id: Option<String>,
}

/// `201 Created` answer to `POST /v1/uploads` (the raw file as the body): the bytes are
/// synced to the agent's disk and can be named in a [`SendRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadResponse {
    pub upload_id: String,
    pub size: u64,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
}

/// `GET /v1/limits`: what this agent accepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest document, the sum of its attachments (max_document_bytes).
    pub max_document_bytes: u64,
}

/// `202 Accepted` answer to [`SendRequest`]: the document is durable in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendResponse {
    pub message_id: String,
    pub business_id: String,
}

/// `POST /v1/documents/batch`: each item exactly the body `POST /v1/documents` takes
/// (read one by one, so a malformed item fails only itself).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBatchRequest {
    pub documents: Vec<serde_json::Value>,
}

/// The answer to [`SendBatchRequest`]: one result per document, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendBatchResponse {
    pub results: Vec<SendBatchResult>,
}

/// One document's outcome in a batch: `202` with its ids (durable in the outbox), or
/// the status and error `POST /v1/documents` would have answered for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendBatchResult {
    pub status: u16,
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub business_id: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// `GET /v1/documents/{id}/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    pub message_id: String,
    pub business_id: String,
    pub sender: String,
    /// `outbox` (waiting for the broker), `submitted`, `failed`; `received` for a
    /// document this agent received rather than sent.
    pub outbox_state: String,
    #[serde(default)]
    pub failure_reason: Option<String>,
    /// When the broker accepted it (RFC 3339, from its receipt).
    #[serde(default)]
    pub submitted_at: Option<String>,
    /// The broker's submission receipt is present and checks out.
    pub submission_receipt_verified: bool,
    pub recipients: Vec<RecipientView>,
}

/// One recipient's delivery state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecipientView {
    pub agency: String,
    /// `queued`, `delivered`, `refused`, `expired` or `unknown` (broker not reachable).
    pub state: String,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub delivered_at: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Present when the broker returned a delivery receipt: whether it checks out.
    #[serde(default)]
    pub receipt_verified: Option<bool>,
    /// The time the verified delivery receipt states (RFC 3339).
    #[serde(default)]
    pub receipt_at: Option<String>,
    /// Present for dead letters (expired, refused): whether the broker's signed notice
    /// checks out.
    #[serde(default)]
    pub notice_verified: Option<bool>,
    /// When an undelivered copy becomes a dead letter (RFC 3339).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Each push attempt with its time and outcome, oldest first.
    #[serde(default)]
    pub attempt_log: Vec<AttemptView>,
    /// The business history with this recipient, oldest first: 01 (arrived: its signed
    /// delivery receipt), 13 (our recall), and the statuses it reported (02–06, 15, 16).
    #[serde(default)]
    pub business: Vec<BusinessEntry>,
    /// When we recalled the document: `pending` (no answer yet), `agreed` (15),
    /// `refused` (16), or `stopped before delivery` (the broker stopped it).
    #[serde(default)]
    pub recall: Option<String>,
    /// `receipt_at` in Unix milliseconds, for ordering the history (not serialized).
    #[serde(skip)]
    pub receipt_at_ms: Option<i64>,
}

/// One business status in a document's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusinessEntry {
    /// 01 arrived, 02 refused, 03 accepted, 04 assigned, 05 in progress, 06 completed,
    /// 13 recall requested, 15 recall agreed, 16 recall refused.
    pub code: String,
    /// When it was signed (RFC 3339).
    pub at: String,
    /// The same instant in Unix milliseconds (the history is ordered by it).
    #[serde(default)]
    pub at_ms: i64,
    /// The agency that signed it.
    pub by: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub staff: Option<String>,
    /// The message id of the signed status report or recall (its evidence); none for
    /// 01, whose evidence is the delivery receipt.
    #[serde(default)]
    pub report_id: Option<String>,
    /// The signature of its evidence checks out.
    pub verified: bool,
}

/// `POST /v1/inbox/{id}/status`: report a business status to the document's sender.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {
    /// 02, 03, 04, 05, 06, 15 or 16.
    pub status: String,
    /// Required for 02 and 16.
    #[serde(default)]
    pub reason: Option<String>,
    /// Who (the clerk's name).
    #[serde(default)]
    pub staff: Option<String>,
}

/// `POST /v1/documents/{id}/recall`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecallRequest {
    pub reason: String,
}

/// `GET /v1/directory` entries: the agencies registered at the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectoryEntry {
    pub code: String,
    pub name: String,
    /// The parent agency's code; empty at the top.
    pub parent: String,
    pub suspended: bool,
}

/// One push attempt of the broker to a recipient.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptView {
    pub at: String,
    pub outcome: String,
}

/// `GET /v1/inbox` entries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboxItem {
    pub message_id: String,
    pub sender: String,
    pub subject: String,
    pub business_id: String,
    /// When it became durable here (RFC 3339).
    pub received_at: String,
    /// The export folder, absolute.
    pub path: String,
    /// Attachment file names, in header order.
    pub attachments: Vec<String>,
    /// `new`, `recall`, `update` or `replace`.
    #[serde(default)]
    pub business_type: String,
    /// Recall, update, replace: the message id it is about.
    #[serde(default)]
    pub refers_to: Option<String>,
    /// The sender recalled this document (message id of the recall); its folder is
    /// under `recalled/`.
    #[serde(default)]
    pub recalled_by: Option<String>,
    /// A later version (update or replace) of this document.
    #[serde(default)]
    pub superseded_by: Option<String>,
    /// The later version removed this agency from the recipients.
    #[serde(default)]
    pub removed_by: Option<String>,
}

/// `GET /v1/inbox/{id}`: the item plus the `document.json` value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InboxDetail {
    #[serde(flatten)]
    pub item: InboxItem,
    pub document: serde_json::Value,
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `GET /v1/inbox/count?above=N&wait_ms=M`: documents received so far. With `above`, the
/// answer waits (at most `wait_ms`, default 0, at most 30 000) until the count exceeds
/// it: a gateway's cheap way to learn that something arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxCount {
    pub count: u64,
}

/// `GET /v1/inbox` and `GET /v1/sent`: one page, oldest arrival first. Pass
/// `next_cursor` as `cursor` for the next page (also later, to get only what arrived
/// since): a cursor never repeats or skips an entry, however many arrive meanwhile.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The position after this page; `null` while nothing has been read (start over
    /// from the beginning).
    #[serde(default)]
    pub next_cursor: Option<String>,
    /// More entries follow right now: ask again with `next_cursor`.
    pub more: bool,
}

/// `GET /v1/sent` entries: a document this agency sent and where it stands locally
/// (per-recipient delivery: `GET /v1/documents/{id}/status`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SentItem {
    pub message_id: String,
    pub business_id: String,
    /// Empty for documents stored before the subject was kept.
    pub subject: String,
    pub recipients: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// `outbox` (not yet at the broker), `submitted` or `failed`.
    pub state: String,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub submitted_at: Option<String>,
}
