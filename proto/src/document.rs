//! The document header: its rules, sealing (encode once, sign) and verification.
//!
//! Invariants:
//! - A header is encoded exactly once, by [`seal`]; the encoded bytes are what is
//!   signed, stored and transmitted. Verification never re-encodes.
//! - [`verify_document`] checks the signature and chain before it decodes anything, then
//!   checks the header's rules and that the signer's agency is the header's sender.
//! - Attachment names are safe file names (they become files in inbox folders) that
//!   show what they are: no control or format characters (a right-to-left override
//!   turns `evil\u{202E}gnp.exe` into "evilexe.png" on screen), no two names that are
//!   the same after NFC normalisation and case folding, no Windows device name even
//!   in compatibility form (`COM¹`).
//! - One-line fields (subject, number, notation, names, places...) hold no control
//!   characters at all, so a header cannot forge a second line in a listing; the few
//!   free-text fields (content, reasons) may hold line breaks and tabs.

use std::collections::HashSet;

use prost::Message;
use unicode_normalization::UnicodeNormalization;

use crate::agency::{AgencyCode, PeerIdentity, is_hidden_control, is_valid_agency_code, printable};
use crate::pb::{AttachmentInfo, DocumentHeader, Signed};
use crate::signing::{Domain, SignerRole, SigningKey, TrustAnchors, VerifyTime, verify_signed};
use crate::{ProtocolError, sha256};

/// Names an exported document folder already uses, so attachments may not.
pub const RESERVED_FILE_NAMES: [&str; 4] = [
    "envelope.pb",
    "document.json",
    "submission-receipt.pb",
    "delivery-receipt.pb",
];

/// The largest header accepted, encoded; real headers are a few KiB.
pub const MAX_HEADER_BYTES: usize = 256 * 1024;
/// At most this many recipients and attachments per document.
pub const MAX_RECIPIENTS: usize = 1000;
pub const MAX_ATTACHMENTS: usize = 1000;
/// A document whose attachments total more than this is streamed: stored in files
/// chunk by chunk as it arrives, resumable, and delivered in chunks. Smaller ones are
/// stored inline and travel whole, which is faster for the common small document.
pub const STREAMED_THRESHOLD: u64 = 1024 * 1024;
/// The most envelope and attachment bytes one batch message carries (`SubmitBatch`
/// from an agent, `DeliveryBatch` from the broker); a single document larger than this
/// (at most [`STREAMED_THRESHOLD`] plus its header) still travels, alone. Both ends
/// take it from here so a batch always fits the other end's gRPC message limit
/// (`STREAMED_THRESHOLD` + 8 MiB at the broker): when the agent used 16 MiB against the
/// broker's 9 MiB, every batch of 256 KiB documents was refused whole and resent one
/// document per call (scenario 3 of the bench ran at 20 MiB/s).
pub const MAX_BATCH_BYTES: u64 = 4 * 1024 * 1024;

/// The latest time a header may name (`created_at_ms`, `expires_at_ms`): the end of
/// year 9999 UTC, so every time in a valid header can be shown as RFC 3339 text and
/// added to without overflow. Rules that depend on the clock (how far in the future or
/// the past) belong to the broker, not here: a header is checked again years later.
pub const MAX_TIME_MS: i64 = 253_402_300_799_999;

/// The sum of the declared attachment sizes, or None when it does not fit in a u64.
/// Sizes are untrusted: a plain (wrapping) sum of two sizes near 2^63 would pass every
/// limit as a tiny document.
pub fn total_attachment_bytes(header: &DocumentHeader) -> Option<u64> {
    header
        .attachments
        .iter()
        .try_fold(0u64, |total, a| total.checked_add(a.size))
}

/// True when a document with this header travels streamed.
pub fn is_streamed(header: &DocumentHeader) -> bool {
    header
        .attachments
        .iter()
        .map(|a| a.size)
        .fold(0u64, u64::saturating_add)
        > STREAMED_THRESHOLD
}

/// A document whose sender signature and header rules were checked.
#[derive(Debug, Clone)]
pub struct VerifiedDocument {
    pub header: DocumentHeader,
    /// SHA-256 of the exact signed header bytes: what receipts refer to.
    pub header_sha256: [u8; 32],
    pub sender: AgencyCode,
}

/// Business status codes a recipient may report, in the order a document moves
/// through them; 02 and 16 need a reason. 15 and 16 answer a recall or update.
pub const STATUS_CODES: [&str; 7] = ["02", "03", "04", "05", "06", "15", "16"];

/// The rank of a processing status: statuses only go forward (01 arrived < 02 refused
/// or 03 accepted < 04 assigned < 05 in progress < 06 completed). None for the recall
/// answers 15/16, which are not part of the sequence.
pub fn status_rank(code: &str) -> Option<u8> {
    match code {
        "01" => Some(1),
        "02" | "03" => Some(2),
        "04" => Some(3),
        "05" => Some(4),
        "06" => Some(5),
        _ => None,
    }
}

/// True when `code` may follow `last` (the latest status this reporter sent).
pub fn status_may_follow(last: Option<&str>, code: &str) -> bool {
    match (last.and_then(status_rank), status_rank(code)) {
        // Nothing follows a refusal.
        _ if last == Some("02") => false,
        (Some(before), Some(now)) => now > before,
        _ => true,
    }
}

/// The rules of business types and status reports.
fn validate_business(header: &DocumentHeader) -> Result<(), ProtocolError> {
    use crate::pb::{BusinessType, DocumentKind};
    let kind = DocumentKind::try_from(header.kind).map_err(|_| ProtocolError::InvalidField {
        field: "kind",
        rule: "0 document, 1 status report".into(),
    })?;
    max_chars("business_reason", &header.business_reason, 500)?;
    let business = header.business_type;
    if business == BusinessType::Recall as i32 && header.business_reason.trim().is_empty() {
        return Err(ProtocolError::MissingField {
            field: "business_reason",
        });
    }
    if !header.removed_recipients.is_empty()
        && business != BusinessType::Update as i32
        && business != BusinessType::Replace as i32
    {
        return Err(ProtocolError::InvalidField {
            field: "removed_recipients",
            rule: "only an update or a replace removes recipients".into(),
        });
    }
    for removed in &header.removed_recipients {
        if !header.recipients.contains(removed) {
            return Err(ProtocolError::InvalidField {
                field: "removed_recipients",
                rule: format!("{removed} must also be a recipient, so that it is told"),
            });
        }
    }
    if header.removed_recipients.len() >= header.recipients.len()
        && !header.removed_recipients.is_empty()
    {
        return Err(ProtocolError::InvalidField {
            field: "removed_recipients",
            rule: "an update or replace keeps at least one recipient".into(),
        });
    }
    match (kind, &header.status) {
        (DocumentKind::Document, None) => Ok(()),
        (DocumentKind::Document, Some(_)) => Err(ProtocolError::InvalidField {
            field: "status",
            rule: "only a status report carries a status".into(),
        }),
        (DocumentKind::Status, None) => Err(ProtocolError::MissingField { field: "status" }),
        (DocumentKind::Status, Some(status)) => {
            if !STATUS_CODES.contains(&status.code.as_str()) {
                return Err(ProtocolError::InvalidField {
                    field: "status.code",
                    rule: "one of 02, 03, 04, 05, 06, 15, 16".into(),
                });
            }
            max_chars("status.reason", &status.reason, 500)?;
            one_line("status.staff", &status.staff, 100)?;
            one_line("status.department", &status.department, 200)?;
            if (status.code == "02" || status.code == "16") && status.reason.trim().is_empty() {
                return Err(ProtocolError::MissingField {
                    field: "status.reason",
                });
            }
            if header.recipients.len() != 1 {
                return Err(ProtocolError::InvalidField {
                    field: "recipients",
                    rule: "a status report goes to the document's sender only".into(),
                });
            }
            if business != BusinessType::New as i32 || !header.attachments.is_empty() {
                return Err(ProtocolError::InvalidField {
                    field: "kind",
                    rule: "a status report has no attachments and business type 0".into(),
                });
            }
            Ok(())
        }
    }
}

/// A fresh message id: UUIDv7 (time-ordered), lowercase hyphenated text.
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// True for canonical lowercase hyphenated UUID text.
pub fn is_valid_message_id(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

/// The business document id: `{sender},{yyyy/MM/dd},{number}/{notation}`.
pub fn business_id(sender: &str, issue_date: &str, number: &str, notation: &str) -> String {
    format!("{sender},{issue_date},{number}/{notation}")
}

/// Today's date in Vietnam (UTC+7) as `yyyy/MM/dd`, for the promulgation date.
pub fn vietnam_date_today() -> String {
    let offset = time::UtcOffset::from_hms(7, 0, 0).unwrap_or(time::UtcOffset::UTC);
    let now = time::OffsetDateTime::now_utc().to_offset(offset);
    format!(
        "{:04}/{:02}/{:02}",
        now.year(),
        u8::from(now.month()),
        now.day()
    )
}

fn is_valid_date(date: &str) -> bool {
    let b = date.as_bytes();
    if b.len() != 10 || b[4] != b'/' || b[7] != b'/' {
        return false;
    }
    // Digits only: `str::parse::<u32>` below would also accept a leading '+'.
    if !b
        .iter()
        .enumerate()
        .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
    {
        return false;
    }
    let num = |s: &str| s.parse::<u32>().ok();
    let (Some(y), Some(m), Some(d)) = (num(&date[0..4]), num(&date[5..7]), num(&date[8..10]))
    else {
        return false;
    };
    let Ok(month) = time::Month::try_from(u8::try_from(m).unwrap_or(0)) else {
        return false;
    };
    let Ok(year) = i32::try_from(y) else {
        return false;
    };
    time::Date::from_calendar_date(year, month, u8::try_from(d).unwrap_or(0)).is_ok()
}

/// Free text from a person (e.g. an operator's reason): at most `max` characters and no
/// control characters but line breaks and tabs.
pub fn validate_text(field: &'static str, value: &str, max: usize) -> Result<(), ProtocolError> {
    max_chars(field, value, max)
}

fn max_chars(field: &'static str, value: &str, max: usize) -> Result<(), ProtocolError> {
    if value.chars().count() > max {
        return Err(ProtocolError::InvalidField {
            field,
            rule: format!("at most {max} characters"),
        });
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(ProtocolError::InvalidField {
            field,
            rule: "no control characters".into(),
        });
    }
    Ok(())
}

/// A field shown on one line: [`max_chars`], and no control character at all (CR, LF
/// and tab included) nor a line or paragraph separator.
fn one_line(field: &'static str, value: &str, max: usize) -> Result<(), ProtocolError> {
    max_chars(field, value, max)?;
    if value
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        return Err(ProtocolError::InvalidField {
            field,
            rule: "one line: no line breaks, tabs or other control characters".into(),
        });
    }
    Ok(())
}

fn required(field: &'static str, value: &str) -> Result<(), ProtocolError> {
    if value.trim().is_empty() {
        Err(ProtocolError::MissingField { field })
    } else {
        Ok(())
    }
}

/// True when `name` can be used as a file name inside an inbox folder on any system:
/// one plain path component, no characters or names Windows refuses (recipients may
/// export to a Windows share), not ending in a dot or space, not one of the names the
/// export folder uses itself (compared without case, as case-insensitive filesystems do).
///
/// No control or format character (general categories Cc and Cf: bidi overrides,
/// zero-width characters, the BOM) nor line separator may appear: they make a name
/// show as something it is not. The reserved names are compared after NFKC
/// normalisation, so that `COM¹` (Windows treats superscript digits as digits) and
/// full-width look-alikes are caught.
pub fn is_safe_file_name(name: &str) -> bool {
    const WINDOWS_RESERVED: [&str; 26] = [
        "CON", "PRN", "AUX", "NUL", "COM0", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7",
        "COM8", "COM9", "LPT0", "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8",
        "LPT9", "CONIN$", "CONOUT$",
    ];
    let plain = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name.ends_with('.')
        && !name.ends_with(' ')
        && !name.chars().any(|c| {
            is_hidden_control(c)
                || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
        });
    if !plain {
        return false;
    }
    // Compatibility forms fold onto the names they imitate: `COM¹` → `COM1`,
    // `ＣＯＮ` → `CON`. The folded name must pass the same character rules.
    let folded: String = name.nfkc().collect();
    // Windows also drops trailing dots and spaces, and an ideographic space folds to
    // a plain one.
    if folded.starts_with('.') || folded.ends_with('.') || folded.ends_with(' ') {
        return false;
    }
    if folded.chars().any(|c| {
        is_hidden_control(c) || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
    }) {
        return false;
    }
    let stem = folded.split('.').next().unwrap_or(&folded).trim_end();
    !RESERVED_FILE_NAMES.iter().any(|reserved| {
        reserved.eq_ignore_ascii_case(name) || reserved.eq_ignore_ascii_case(&folded)
    }) && !WINDOWS_RESERVED
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(stem))
}

/// The key under which two attachment names count as the same: NFC (a precomposed
/// "ệ" and "e" + combining marks are one name on screen, and on macOS one file) and
/// lower case (case-insensitive filesystems).
fn name_key(name: &str) -> String {
    name.nfc().collect::<String>().to_lowercase()
}

/// Checks every header rule (DESIGN.md sections 4 and 9).
pub fn validate_header(header: &DocumentHeader) -> Result<(), ProtocolError> {
    if !is_valid_message_id(&header.message_id) {
        return Err(ProtocolError::InvalidField {
            field: "message_id",
            rule: "a lowercase hyphenated UUID".into(),
        });
    }
    AgencyCode::parse(&header.sender)?;
    if header.recipients.is_empty() {
        return Err(ProtocolError::MissingField {
            field: "recipients",
        });
    }
    if header.recipients.len() > MAX_RECIPIENTS {
        return Err(ProtocolError::InvalidField {
            field: "recipients",
            rule: format!("at most {MAX_RECIPIENTS}"),
        });
    }
    let mut seen = HashSet::new();
    for recipient in &header.recipients {
        AgencyCode::parse(recipient)?;
        if recipient == &header.sender {
            return Err(ProtocolError::InvalidField {
                field: "recipients",
                rule: "the sender cannot be a recipient".into(),
            });
        }
        if !seen.insert(recipient.as_str()) {
            return Err(ProtocolError::InvalidField {
                field: "recipients",
                rule: format!("{recipient} is listed twice"),
            });
        }
    }
    required("number", &header.number)?;
    one_line("number", &header.number, 11)?;
    one_line("notation", &header.notation, 30)?;
    one_line("document_type", &header.document_type, 100)?;
    one_line("document_type_name", &header.document_type_name, 100)?;
    required("subject", &header.subject)?;
    one_line("subject", &header.subject, 500)?;
    max_chars("content", &header.content, 500)?;
    one_line("issue_place", &header.issue_place, 50)?;
    one_line("sender_name", &header.sender_name, 200)?;
    if !is_valid_date(&header.issue_date) {
        return Err(ProtocolError::InvalidField {
            field: "issue_date",
            rule: "a date written yyyy/MM/dd".into(),
        });
    }
    if !header.due_date.is_empty() && !is_valid_date(&header.due_date) {
        return Err(ProtocolError::InvalidField {
            field: "due_date",
            rule: "a date written yyyy/MM/dd, or empty".into(),
        });
    }
    let expected_business_id = business_id(
        &header.sender,
        &header.issue_date,
        &header.number,
        &header.notation,
    );
    if header.business_id != expected_business_id {
        return Err(ProtocolError::InvalidField {
            field: "business_id",
            rule: "must be {sender},{yyyy/MM/dd},{number}/{notation}".into(),
        });
    }
    if let Some(signer) = &header.signer {
        one_line("signer.competence", &signer.competence, 100)?;
        one_line("signer.position", &signer.position, 100)?;
        one_line("signer.full_name", &signer.full_name, 100)?;
    }
    if header.priority > 4 {
        return Err(ProtocolError::InvalidField {
            field: "priority",
            rule: "0 normal, 1 urgent, 2 very urgent, 3 express, 4 express at a set time".into(),
        });
    }
    if header.steering_type > 3 {
        return Err(ProtocolError::InvalidField {
            field: "steering_type",
            rule: "1 not a directive, 2 directive, 3 report on a directive (0: not given)".into(),
        });
    }
    if crate::pb::BusinessType::try_from(header.business_type).is_err() {
        return Err(ProtocolError::InvalidField {
            field: "business_type",
            rule: "0 new, 1 recall, 2 update, 3 replace".into(),
        });
    }
    let refers = header.business_type != crate::pb::BusinessType::New as i32
        || header.kind == crate::pb::DocumentKind::Status as i32;
    if refers && !is_valid_message_id(&header.refers_to) {
        return Err(ProtocolError::InvalidField {
            field: "refers_to",
            rule: "a recall, update or replace names the message id it refers to".into(),
        });
    }
    if !refers && !header.refers_to.is_empty() {
        return Err(ProtocolError::InvalidField {
            field: "refers_to",
            rule: "only a recall, update, replace or status report refers to another document"
                .into(),
        });
    }
    validate_business(header)?;
    if header.created_at_ms <= 0 {
        return Err(ProtocolError::MissingField {
            field: "created_at_ms",
        });
    }
    if header.created_at_ms > MAX_TIME_MS {
        return Err(ProtocolError::InvalidField {
            field: "created_at_ms",
            rule: "a time before the year 10000".into(),
        });
    }
    if header.expires_at_ms > MAX_TIME_MS {
        return Err(ProtocolError::InvalidField {
            field: "expires_at_ms",
            rule: "a time before the year 10000, or 0 for the default".into(),
        });
    }
    if header.expires_at_ms != 0 && header.expires_at_ms <= header.created_at_ms {
        return Err(ProtocolError::InvalidField {
            field: "expires_at_ms",
            rule: "after created_at_ms, or 0 for the default".into(),
        });
    }
    for place in &header.to_places {
        one_line("to_places", place, 150)?;
    }
    if header.attachments.len() > MAX_ATTACHMENTS {
        return Err(ProtocolError::InvalidField {
            field: "attachments",
            rule: format!("at most {MAX_ATTACHMENTS}"),
        });
    }
    if total_attachment_bytes(header).is_none() {
        return Err(ProtocolError::InvalidField {
            field: "attachments.size",
            rule: "the declared sizes must add up to less than 2^64 bytes".into(),
        });
    }
    let mut names = HashSet::new();
    for (index, attachment) in header.attachments.iter().enumerate() {
        let bad = |detail: String| ProtocolError::AttachmentMismatch {
            index,
            name: printable(&attachment.name),
            detail,
        };
        if !is_safe_file_name(&attachment.name) {
            return Err(bad(
                "the name must be a plain file name (no path, no control, format or reserved \
                 characters, no reserved name)"
                    .into(),
            ));
        }
        if !names.insert(name_key(&attachment.name)) {
            return Err(bad(
                "two attachments have this name (names are compared after NFC normalisation \
                 and without case)"
                    .into(),
            ));
        }
        if attachment.sha256.len() != 32 {
            return Err(bad("sha256 must be 32 bytes".into()));
        }
        one_line("attachments.media_type", &attachment.media_type, 127)?;
    }
    // `verify_document` refuses a larger header before it looks at the signature: a
    // header passing here but not there would be signed, queued, then refused.
    let encoded = header.encoded_len();
    if encoded > MAX_HEADER_BYTES {
        return Err(ProtocolError::InvalidField {
            field: "header",
            rule: format!("at most {MAX_HEADER_BYTES} bytes encoded (this one is {encoded})"),
        });
    }
    Ok(())
}

/// Validates `header`, encodes it once and signs the bytes. The signing key's identity
/// must be the header's sender.
pub fn seal(header: &DocumentHeader, key: &SigningKey) -> Result<Signed, ProtocolError> {
    validate_header(header)?;
    match key.identity()? {
        PeerIdentity::Agency(code) if code.as_str() == header.sender => {}
        other => {
            return Err(ProtocolError::SignerNotSender {
                signer: other.to_string(),
                sender: header.sender.clone(),
            });
        }
    }
    let bytes = header.encode_to_vec();
    key.sign(Domain::DocumentHeader, bytes.into())
}

/// [`seal`] for many headers with one batch signature (DESIGN section 4). Each header is
/// validated on its own: an invalid one gets its error and is left out of the batch,
/// so it never fails its neighbours. Results are in the order of `headers`.
pub fn seal_batch(
    headers: &[DocumentHeader],
    key: &SigningKey,
) -> Vec<Result<Signed, ProtocolError>> {
    let identity = key.identity();
    let mut results: Vec<Option<Result<Signed, ProtocolError>>> = Vec::with_capacity(headers.len());
    let mut payloads = Vec::new();
    for header in headers {
        let checked = validate_header(header).and_then(|()| match &identity {
            Ok(PeerIdentity::Agency(code)) if code.as_str() == header.sender => Ok(()),
            Ok(other) => Err(ProtocolError::SignerNotSender {
                signer: other.to_string(),
                sender: header.sender.clone(),
            }),
            Err(e) => Err(e.clone()),
        });
        match checked {
            Ok(()) => {
                payloads.push(bytes::Bytes::from(header.encode_to_vec()));
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    let mut signed = match key.sign_batch(Domain::DocumentHeader, payloads) {
        Ok(signed) => signed.into_iter(),
        Err(e) => {
            return results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(e.clone())))
                .collect();
        }
    };
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                signed.next().ok_or(ProtocolError::Key {
                    detail: "the batch signer returned fewer items than it was given".into(),
                })
            })
        })
        .collect()
}

/// Verifies a signed envelope: chain and signature first, then decode, then the header
/// rules, then that the signing agency is the sender.
pub fn verify_document(
    envelope: &Signed,
    anchors: &TrustAnchors,
    time: VerifyTime,
) -> Result<VerifiedDocument, ProtocolError> {
    verify_document_with(envelope, anchors, time, &crate::agency::SanUri)
}

/// [`verify_document`] with the signer's identity decided by `signers` (a registry of
/// certificate bindings) instead of the certificate's SAN URI alone. The identity is
/// asked for only after the chain and the signature verified.
pub fn verify_document_with(
    envelope: &Signed,
    anchors: &TrustAnchors,
    time: VerifyTime,
    signers: &dyn crate::agency::SignerIdentity,
) -> Result<VerifiedDocument, ProtocolError> {
    if envelope.payload.len() > MAX_HEADER_BYTES {
        return Err(ProtocolError::InvalidField {
            field: "header",
            rule: format!("at most {MAX_HEADER_BYTES} bytes"),
        });
    }
    // The leaf verified is the chain's first certificate, which `signers` is given.
    verify_signed(
        envelope,
        Domain::DocumentHeader,
        anchors,
        SignerRole::Agency,
        time,
    )?;
    let signer = signers.identify(&envelope.cert_chain)?;
    let header = DocumentHeader::decode(envelope.payload.as_ref()).map_err(|e| {
        ProtocolError::Malformed {
            what: "document header",
            detail: e.to_string(),
        }
    })?;
    validate_header(&header)?;
    let sender = match signer {
        PeerIdentity::Agency(code) if code.as_str() == header.sender => code,
        other => {
            return Err(ProtocolError::SignerNotSender {
                signer: other.to_string(),
                sender: header.sender.clone(),
            });
        }
    };
    Ok(VerifiedDocument {
        header_sha256: sha256(&envelope.payload),
        header,
        sender,
    })
}

/// Incremental check of one attachment's bytes against its header entry.
pub struct AttachmentCheck<'a> {
    index: usize,
    info: &'a AttachmentInfo,
    seen: u64,
    hasher: ring::digest::Context,
}

impl<'a> AttachmentCheck<'a> {
    pub fn new(index: usize, info: &'a AttachmentInfo) -> Self {
        Self {
            index,
            info,
            seen: 0,
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    fn error(&self, detail: String) -> ProtocolError {
        ProtocolError::AttachmentMismatch {
            index: self.index,
            name: printable(&self.info.name),
            detail,
        }
    }

    /// Feeds the next bytes; fails as soon as more arrive than the header declares.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), ProtocolError> {
        self.seen = self.seen.saturating_add(chunk.len() as u64);
        if self.seen > self.info.size {
            return Err(self.error(format!("more than the declared {} bytes", self.info.size)));
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// Checks the total size and the SHA-256.
    pub fn finish(self) -> Result<(), ProtocolError> {
        if self.seen != self.info.size {
            return Err(self.error(format!(
                "{} bytes received, the header declares {}",
                self.seen, self.info.size
            )));
        }
        let mismatch = self.error("SHA-256 does not match the header".into());
        let digest = self.hasher.finish();
        if digest.as_ref() != self.info.sha256.as_slice() {
            return Err(mismatch);
        }
        Ok(())
    }
}

/// Checks a whole attachment at once.
pub fn check_attachment(
    index: usize,
    info: &AttachmentInfo,
    bytes: &[u8],
) -> Result<(), ProtocolError> {
    let mut check = AttachmentCheck::new(index, info);
    check.update(bytes)?;
    check.finish()
}

/// Describes an attachment for the header.
pub fn describe_attachment(name: &str, media_type: &str, bytes: &[u8]) -> AttachmentInfo {
    AttachmentInfo {
        name: name.to_owned(),
        media_type: media_type.to_owned(),
        size: bytes.len() as u64,
        sha256: sha256(bytes).to_vec(),
    }
}

/// A shape check usable on untrusted codes without building an [`AgencyCode`].
pub fn looks_like_agency_code(code: &str) -> bool {
    is_valid_agency_code(code)
}
