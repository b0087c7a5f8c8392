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
