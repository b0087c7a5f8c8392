//! Replays fuzz inputs through the `api_json` fuzz target's own harness
//! (`fuzz/src/api_json.rs`, compiled here as a module), without libFuzzer.
//!
//! - `tests/fuzz-regressions/api_json/*`: inputs that once made the target fail, each
//!   named after what it found (see `fuzz/README.md`).
//! - `../fuzz/corpus/api_json/*`: the committed seeds, so the harness and its
//!   invariants keep compiling and passing on valid inputs too.
//! - Bodies too large for a fuzzer run are built here and go through the same harness.
//!
//! A failing input panics inside the harness; the test names the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/api_json.rs"]
mod harness;

use std::path::{Path, PathBuf};

use lienthong_agent::api_types::SendRequest;
use lienthong_agent::request_check::{Request, check_request};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    files.sort();
    files
}

fn replay(dir: &Path) -> usize {
    let files = inputs(dir);
    for file in &files {
        let bytes =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| harness::fuzz_api_json(&bytes));
        assert!(outcome.is_ok(), "api_json: {} fails", file.display());
    }
    files.len()
}

#[test]
fn regression_inputs_pass() {
    replay(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions/api_json"));
}

#[test]
fn seed_corpus_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/api_json");
    let count = replay(&dir);
    assert!(count > 0, "no seeds under {}", dir.display());
}

fn send_body(req: &SendRequest) -> Vec<u8> {
    let mut input = vec![0u8];
    input.extend(serde_json::to_vec(req).unwrap());
    input
}

fn places(count: usize) -> SendRequest {
    SendRequest {
        to: vec!["000.00.12.H31".into()],
        subject: "Nơi nhận".into(),
        number: Some("1".into()),
        to_places: Some(vec!["x".repeat(150); count]),
        ..SendRequest::default()
    }
}

/// `to_places` has a length rule per entry but no count: 2,000 entries of 150
/// characters make a 300 KB header, which `validate_header` accepted and the agent
/// signed, and which the broker then refused (`MAX_HEADER_BYTES`, checked before the
/// signature). The body must be refused before signing, naming the limit.
#[test]
fn a_header_over_max_header_bytes_is_refused_before_signing() {
    let big = places(2_000);
    harness::fuzz_api_json(&send_body(&big));
    let refusal = check_request(&harness::context(), Request::Send(Box::new(big))).unwrap_err();
    assert_eq!(refusal.status, 400, "{refusal:?}");
    assert!(
        refusal.message.contains("262144"),
        "the message names the limit: {}",
        refusal.message
    );
    // Just under the limit is accepted (and the harness checks the header).
    let fits = places(1_700);
    harness::fuzz_api_json(&send_body(&fits));
    assert!(check_request(&harness::context(), Request::Send(Box::new(fits))).is_ok());
}

/// The harness can fail: a body it accepts must give the header it checks, so an
/// input the checks accept but whose header breaks an invariant panics. Here the
/// recipient list names the sender, which `validate_header` refuses: the outcome is a
/// 400, and the harness passes; asserting acceptance instead must panic.
#[test]
fn the_harness_distinguishes_refusals() {
    let mut req = places(1);
    req.to = vec![harness::AGENCY.into()];
    harness::fuzz_api_json(&send_body(&req));
    let outcome = check_request(&harness::context(), Request::Send(Box::new(req)));
    let refusal = outcome.unwrap_err();
    assert_eq!(refusal.status, 400);
    assert!(
        refusal.message.contains("recipients"),
        "{}",
        refusal.message
    );
}

/// The valid seeds get past every check (else the fuzzer would start from refusals
/// only), and the edge-case ones are refused with the expected status.
#[test]
fn seeds_reach_the_outcome_they_are_named_for() {
    use lienthong_agent::api_types::{RecallRequest, ReportRequest};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/api_json");
    let expected: [(&str, Result<(), u16>); 16] = [
        ("0-send-minimal", Ok(())),
        ("0-send-full", Ok(())),
        ("0-send-recall", Ok(())),
        ("0-send-update-removes", Ok(())),
        ("0-send-attachment-at-limit", Ok(())),
        ("0-send-attachment-over-limit", Err(413)),
        ("0-send-attachment-path", Err(400)),
        ("0-send-attachment-upload", Err(400)),
        ("0-send-refers-unknown", Err(400)),
        ("1-report-accepted", Ok(())),
        ("1-report-refused", Ok(())),
        ("1-report-refused-no-reason", Err(400)),
        ("1-report-padded", Ok(())),
        ("2-recall", Ok(())),
        ("3-edxml-document", Ok(())),
        ("3-edxml-status", Ok(())),
    ];
    let ctx = harness::context();
    for (name, want) in expected {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let (ctl, body) = bytes.split_first().unwrap();
        let request = match ctl % 4 {
            0 => Request::Send(Box::new(
                serde_json::from_slice::<SendRequest>(body).unwrap(),
            )),
            1 => Request::Report {
                id: harness::RECEIVED_ID.into(),
                body: serde_json::from_slice::<ReportRequest>(body).unwrap(),
            },
            2 => Request::Recall {
                id: harness::SENT_ID.into(),
                body: serde_json::from_slice::<RecallRequest>(body).unwrap(),
            },
            _ => Request::Edxml(body.to_vec()),
        };
        let got = check_request(&ctx, request)
            .map(|_| ())
            .map_err(|r| r.status);
        assert_eq!(got, want, "{name}");
    }
}

/// The harness context with room for a streamed document (`max_document_bytes`
/// `limit`), so base64 attachments over the streaming threshold take the path the
/// handler spools to upload files (here decoded by the same piecewise decoder).
fn streamed_context(limit: u64) -> lienthong_agent::request_check::CheckContext {
    lienthong_agent::request_check::CheckContext {
        max_document_bytes: limit,
        ..harness::context()
    }
}

fn with_attachments(sizes: &[usize]) -> (SendRequest, Vec<Vec<u8>>) {
    use base64::Engine as _;
    let contents: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|b| (b % 251) as u8 ^ (i as u8)).collect())
        .collect();
    let req = SendRequest {
        to: vec!["000.00.12.H31".into()],
        subject: "Tệp lớn".into(),
        number: Some("7".into()),
        attachments: contents
            .iter()
            .enumerate()
            .map(|(i, c)| lienthong_agent::api_types::AttachmentUpload {
                content_base64: base64::engine::general_purpose::STANDARD.encode(c),
                name: format!("tep-{i}.pdf"),
                media_type: None,
                upload_id: None,
            })
            .collect(),
        ..SendRequest::default()
    };
    (req, contents)
}

/// Base64 attachments over the streaming threshold go through the spool answer: the
/// header declares each one's decoded size and SHA-256, in order; the total at the
/// limit is accepted and one byte over is a 413 naming `max_document_bytes`.
#[test]
fn spooled_base64_attachments_are_described_and_capped() {
    let threshold = usize::try_from(lienthong_proto::document::STREAMED_THRESHOLD).unwrap();
    let sizes = [threshold / 2, threshold / 2 + 1];
    let total = u64::try_from(sizes.iter().sum::<usize>()).unwrap();
    assert!(total > lienthong_proto::document::STREAMED_THRESHOLD);
    let (req, contents) = with_attachments(&sizes);
    // At the limit: accepted, every attachment described by its own bytes.
    let header = check_request(
        &streamed_context(total),
        Request::Send(Box::new(req.clone())),
    )
    .unwrap();
    assert_eq!(header.attachments.len(), 2);
    for (info, bytes) in header.attachments.iter().zip(&contents) {
        let want = lienthong_proto::document::describe_attachment(&info.name, "", bytes);
        assert_eq!(info.size, want.size, "{}", info.name);
        assert_eq!(info.sha256, want.sha256, "{}", info.name);
    }
    assert_eq!(header.attachments[1].name, "tep-1.pdf");
    // One byte under the total: 413, naming the limit and the size.
    let refusal =
        check_request(&streamed_context(total - 1), Request::Send(Box::new(req))).unwrap_err();
    assert_eq!(refusal.status, 413, "{refusal:?}");
    assert!(
        refusal.message.contains("max_document_bytes")
            && refusal.message.contains(&total.to_string()),
        "{}",
        refusal.message
    );
}

/// Invalid base64 on the spooled path is a 400 naming the attachment it is in.
#[test]
fn spooled_base64_that_does_not_decode_names_its_attachment() {
    let threshold = usize::try_from(lienthong_proto::document::STREAMED_THRESHOLD).unwrap();
    let (mut req, _) = with_attachments(&[threshold, 4096]);
    // Valid length, one byte outside the alphabet, in the second attachment.
    req.attachments[1].content_base64.replace_range(8..9, "*");
    let ctx = streamed_context(lienthong_proto::document::STREAMED_THRESHOLD * 4);
    let refusal = check_request(&ctx, Request::Send(Box::new(req))).unwrap_err();
    assert_eq!(refusal.status, 400, "{refusal:?}");
    assert!(
        refusal.message.contains("attachments[1].content_base64"),
        "{}",
        refusal.message
    );
}

/// A body cannot name an upload of the check's own spool: only a mix refusal or an
/// unknown upload, never a header.
#[test]
fn a_body_naming_a_spooled_id_is_refused() {
    let (mut req, _) = with_attachments(&[10]);
    req.attachments[0].content_base64 = String::new();
    req.attachments[0].upload_id = Some("spooled-0".into());
    let refusal = check_request(
        &streamed_context(lienthong_proto::document::STREAMED_THRESHOLD * 4),
        Request::Send(Box::new(req)),
    )
    .unwrap_err();
    assert_eq!(refusal.status, 400, "{refusal:?}");
    assert!(
        refusal.message.contains("attachments[0].upload_id"),
        "{}",
        refusal.message
    );
}

/// The edXML seed's attachments reach the header through the mapping the handler
/// uses (`planned_from`), given as base64 here: each declared size and digest is that
/// of the attachment the package carries.
#[test]
fn edxml_attachments_are_described_by_their_package_bytes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/api_json");
    let bytes = std::fs::read(dir.join("3-edxml-document")).unwrap();
    let package = &bytes[1..];
    let lienthong_edxml::EdxmlMessage::Document(doc) =
        lienthong_edxml::parse_message(package, &lienthong_edxml::Limits::default()).unwrap()
    else {
        panic!("the seed is a document");
    };
    assert!(!doc.attachments.is_empty(), "the seed carries attachments");
    let ctx = streamed_context(lienthong_proto::document::STREAMED_THRESHOLD);
    let header = check_request(&ctx, Request::Edxml(package.to_vec())).unwrap();
    assert_eq!(header.attachments.len(), doc.attachments.len());
    for (info, attachment) in header.attachments.iter().zip(&doc.attachments) {
        let want = lienthong_proto::document::describe_attachment("", "", &attachment.bytes);
        assert_eq!(info.name, attachment.name);
        assert_eq!(info.media_type, attachment.media_type);
        assert_eq!((info.size, &info.sha256), (want.size, &want.sha256));
    }
}
