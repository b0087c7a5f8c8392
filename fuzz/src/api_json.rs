//! Harness of the fuzz target `api_json`: the agent's request bodies, decoded with
//! `serde_json` into the API's own types (as axum's `Json` extractor does), then run
//! through the checks the agent applies before it signs
//! (`lienthong_agent::request_check::check_request`, which calls the handlers' own
//! functions; only the store's answers are fixed, see [`context`]).
//!
//! Self-contained (only external crates), because `agent/tests/fuzz_regressions_api.rs`
//! compiles this file as a module to replay the corpora without libFuzzer.
//!
//! Input layout: the first byte `ctl` picks the body, the rest is the body.
//! - `ctl % 4 == 0`: `POST /v1/documents`, a `SendRequest`.
//! - `ctl % 4 == 1`: `POST /v1/inbox/{id}/status`, a `ReportRequest`.
//! - `ctl % 4 == 2`: `POST /v1/documents/{id}/recall`, a `RecallRequest`.
//! - `ctl % 4 == 3`: `POST /v1/edxml`, an edXML package (document or status message).
//! - `ctl & 4`: the path's `{id}` is another message id than the known document's
//!   (`ctl & 8`: not a message id at all).
//!
//! What must hold, beyond "no panic":
//! - a refusal is a 400, 404 or 413 with a message (never a 500: nothing here touches
//!   the store), and a 413 only when the attachments exceed `max_document_bytes`;
//! - an accepted body gives a header that passes `validate_header`, encodes within
//!   `MAX_HEADER_BYTES` (the broker refuses larger ones before it verifies) and
//!   decodes back equal; its sender is this agency, its business id is its own; each
//!   recipient is a canonical agency code given in the body (or the recalled
//!   document's); attachment names are exactly the given ones, safe, one plain path
//!   component; each declared size and SHA-256 is that of the given bytes; the total is
//!   within `max_document_bytes`;
//! - a status report is addressed to the received document's sender only and refers to
//!   it; a recall to every recipient of the recalled document.

use std::path::{Component, Path};

use base64::Engine as _;
use lienthong_agent::api_types::{RecallRequest, ReportRequest, SendRequest};
use lienthong_agent::request_check::{CheckContext, Request, check_request};
use lienthong_proto::AgencyCode;
use lienthong_proto::document::{
    MAX_HEADER_BYTES, business_id, is_safe_file_name, validate_header,
};
use lienthong_proto::pb::{BusinessType, DocumentHeader, DocumentKind};
use prost::Message as _;

/// This agency.
pub const AGENCY: &str = "000.00.00.H31";
/// The document it sent (recalls, updates and replacements may refer to it).
pub const SENT_ID: &str = "019e1a2b-0000-7000-8000-000000000001";
pub const SENT_BUSINESS_ID: &str = "000.00.00.H31,2026/05/04,125/UBND-KGVX";
/// The document it received (status reports are about it).
pub const RECEIVED_ID: &str = "019e1a2b-0000-7000-8000-000000000002";
pub const RECEIVED_SENDER: &str = "000.00.12.H31";
pub const RECEIVED_BUSINESS_ID: &str = "000.00.12.H31,2026/04/28,45/SNV-VP";
/// `max_document_bytes`: small, so that short inputs reach it.
pub const MAX_DOCUMENT_BYTES: u64 = 64;

/// The agent and store the checks run against.
pub fn context() -> CheckContext {
    CheckContext {
        agency: AGENCY.into(),
        sent_id: SENT_ID.into(),
        sent_business_id: SENT_BUSINESS_ID.into(),
        sent_recipients: vec!["000.00.12.H31".into(), "000.00.13.H31".into()],
        received_id: RECEIVED_ID.into(),
        received_sender: RECEIVED_SENDER.into(),
        received_subject: "V/v trả lời Công văn số 45/SNV-VP".into(),
        received_business_id: RECEIVED_BUSINESS_ID.into(),
        max_document_bytes: MAX_DOCUMENT_BYTES,
        message_id: "019e1a2b-3c4d-7e5f-8a9b-0c1d2e3f4a5b".into(),
        created_at_ms: 1_777_900_000_000,
        today: "2026/05/04".into(),
    }
}

/// Runs one input (see the module documentation for the layout).
pub fn fuzz_api_json(data: &[u8]) {
    let Some((&ctl, body)) = data.split_first() else {
        return;
    };
    let ctx = context();
    let path_id = |known: &str| -> String {
        if ctl & 8 != 0 {
            String::from_utf8_lossy(body.get(..8).unwrap_or(body)).into_owned()
        } else if ctl & 4 != 0 {
            "019e1a2b-0000-7000-8000-0000000000ff".into()
        } else {
            known.into()
        }
    };
    match ctl % 4 {
        0 => {
            let Ok(req) = serde_json::from_slice::<SendRequest>(body) else {
                return;
            };
            let outcome = check_request(&ctx, Request::Send(Box::new(req.clone())));
            check_outcome(&ctx, &outcome);
            if let Ok(header) = &outcome {
                check_send(&ctx, &req, header);
            } else if let Err(refusal) = &outcome
                && refusal.status == 413
            {
                assert!(inline_total(&req).is_some_and(|t| t > MAX_DOCUMENT_BYTES));
            }
        }
        1 => {
            let Ok(req) = serde_json::from_slice::<ReportRequest>(body) else {
                return;
            };
            let id = path_id(RECEIVED_ID);
            let outcome = check_request(
                &ctx,
                Request::Report {
                    id: id.clone(),
                    body: req.clone(),
                },
            );
            check_outcome(&ctx, &outcome);
            if let Ok(header) = &outcome {
                assert_eq!(id, RECEIVED_ID);
                check_report(header, req.status.trim());
            }
        }
        2 => {
            let Ok(req) = serde_json::from_slice::<RecallRequest>(body) else {
                return;
            };
            let id = path_id(SENT_ID);
            let outcome = check_request(
                &ctx,
                Request::Recall {
                    id: id.clone(),
                    body: req.clone(),
                },
            );
            check_outcome(&ctx, &outcome);
            if let Ok(header) = &outcome {
                assert_eq!(id, SENT_ID);
                assert_eq!(header.business_type, BusinessType::Recall as i32);
                assert_eq!(header.recipients, ctx.sent_recipients);
                assert_eq!(header.refers_to, SENT_ID);
                assert_eq!(header.refers_to_business_id, SENT_BUSINESS_ID);
                assert_eq!(header.business_reason, req.reason);
            }
        }
        _ => {
            let outcome = check_request(&ctx, Request::Edxml(body.to_vec()));
            check_outcome(&ctx, &outcome);
            if let Ok(header) = &outcome {
                if header.kind == DocumentKind::Status as i32 {
                    let code = header.status.as_ref().map(|s| s.code.clone());
                    check_report(header, code.as_deref().unwrap_or_default());
                } else {
                    check_attachment_names(header);
                }
            }
        }
    }
}

/// Invariants of every outcome.
pub fn check_outcome(
    ctx: &CheckContext,
    outcome: &Result<DocumentHeader, lienthong_agent::request_check::Refusal>,
) {
    let header = match outcome {
        Ok(header) => header,
        Err(refusal) => {
            assert!(
                matches!(refusal.status, 400 | 404 | 413),
                "refused with {}: {}",
                refusal.status,
                refusal.message
            );
            assert!(!refusal.message.is_empty(), "a refusal without a message");
            return;
        }
    };
    if let Err(e) = validate_header(header) {
        panic!("an accepted body gives a header that fails validate_header: {e}");
    }
    let bytes = header.encode_to_vec();
    assert!(
        bytes.len() <= MAX_HEADER_BYTES,
        "an accepted body gives a {}-byte header, over MAX_HEADER_BYTES ({MAX_HEADER_BYTES}): \
         the agent would sign what the broker refuses",
        bytes.len()
    );
    assert_eq!(
        DocumentHeader::decode(bytes.as_slice()).ok().as_ref(),
        Some(header)
    );
    assert_eq!(header.sender, ctx.agency);
    assert_eq!(header.message_id, ctx.message_id);
    assert_eq!(
        header.business_id,
        business_id(
            &header.sender,
            &header.issue_date,
            &header.number,
            &header.notation
        )
    );
    for recipient in &header.recipients {
        let code = AgencyCode::parse(recipient).map(|c| c.to_string());
        assert_eq!(
            code.as_ref().ok(),
            Some(recipient),
            "recipient not canonical"
        );
    }
    let total = header
        .attachments
        .iter()
        .map(|a| a.size)
        .fold(0u64, u64::saturating_add);
    assert!(total <= ctx.max_document_bytes, "{total} bytes accepted");
    check_attachment_names(header);
}

fn check_attachment_names(header: &DocumentHeader) {
    for info in &header.attachments {
        assert!(is_safe_file_name(&info.name), "{:?}", info.name);
        let mut parts = Path::new(&info.name).components();
        assert!(
            matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none(),
            "not one plain path component: {:?}",
            info.name
        );
    }
}

/// The sum of the inline attachments' decoded sizes, `None` when one is not base64 or
/// one is an upload.
fn inline_total(req: &SendRequest) -> Option<u64> {
    req.attachments.iter().try_fold(0u64, |sum, a| {
        if a.upload_id.is_some() {
            return None;
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(a.content_base64.as_bytes())
            .ok()?;
        Some(sum.saturating_add(bytes.len() as u64))
    })
}

/// An accepted `SendRequest`: the header says what the body gave.
fn check_send(ctx: &CheckContext, req: &SendRequest, header: &DocumentHeader) {
    assert_eq!(header.kind, DocumentKind::Document as i32);
    assert_eq!(header.subject, req.subject);
    let given: Vec<String> = req
        .to
        .iter()
        .chain(req.removed_recipients.iter().flatten())
        .filter_map(|c| AgencyCode::parse(c.trim()).ok().map(|c| c.to_string()))
        .collect();
    for recipient in &header.recipients {
        assert!(
            given.contains(recipient) || ctx.sent_recipients.contains(recipient),
            "recipient {recipient} was not in the body"
        );
    }
    assert_eq!(header.attachments.len(), req.attachments.len());
    for (info, given) in header.attachments.iter().zip(&req.attachments) {
        assert_eq!(info.name, given.name, "an attachment name was changed");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(given.content_base64.as_bytes())
            .unwrap_or_else(|e| panic!("accepted attachment bytes that are not base64: {e}"));
        assert_eq!(info.size, bytes.len() as u64, "declared size");
        assert_eq!(
            info.sha256,
            lienthong_proto::sha256(&bytes).to_vec(),
            "declared digest"
        );
    }
    if header.business_type != BusinessType::New as i32 || !header.refers_to.is_empty() {
        assert_eq!(header.refers_to, SENT_ID);
        assert_eq!(header.refers_to_business_id, SENT_BUSINESS_ID);
    }
}

/// An accepted status report: to the received document's sender, about it.
fn check_report(header: &DocumentHeader, code: &str) {
    assert_eq!(header.kind, DocumentKind::Status as i32);
    assert_eq!(header.recipients, vec![RECEIVED_SENDER.to_owned()]);
    assert_eq!(header.refers_to, RECEIVED_ID);
    assert_eq!(header.refers_to_business_id, RECEIVED_BUSINESS_ID);
    let status = header.status.as_ref().map(|s| s.code.as_str());
    assert_eq!(status, Some(code));
}
