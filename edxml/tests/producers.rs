//! The producers' corpus (`tests/edxml-corpus/` of the workspace, see docs/edxml.md)
//! through the parser: every package gets exactly the outcome `expected.json` gives it,
//! and every accepted one is written back and read again equal.
//! (`tests/tests/edxml_corpus.rs` runs the same files through the agent and the CLI.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use lienthong_edxml::{
    EdxmlMessage, Limits, parse_document, parse_message_noted, parse_status, steering_type_text,
    write_document, write_status,
};
use serde_json::Value;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/edxml-corpus")
}

fn expected() -> serde_json::Map<String, Value> {
    let text = std::fs::read(corpus_dir().join("expected.json")).unwrap();
    match serde_json::from_slice(&text).unwrap() {
        Value::Object(map) => map,
        other => panic!("expected.json is not an object: {other}"),
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_producer_package_gets_its_expected_outcome() {
    let expected = expected();
    let mut files: Vec<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".edxml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{} packages", files.len());
    assert_eq!(
        files.len(),
        expected.len(),
        "every package has an outcome and every outcome a package"
    );
    let limits = Limits::default();
    for name in &files {
        let want = expected
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no outcome in expected.json"));
        let bytes = std::fs::read(corpus_dir().join(name)).unwrap();
        let parsed = parse_message_noted(&bytes, &limits);
        if want["outcome"] == "refused" {
            let error = parsed.expect_err(name);
            assert_eq!(
                Some(error.to_string().as_str()),
                want["error"].as_str(),
                "{name}"
            );
            continue;
        }
        let (message, notes) = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut paths: Vec<String> = notes.iter().map(|n| n.path.clone()).collect();
        paths.sort();
        let mut want_paths = strings(&want["not_carried"]);
        want_paths.sort();
        assert_eq!(paths, want_paths, "{name}: not carried");
        match message {
            EdxmlMessage::Document(doc) => {
                assert_eq!(want["kind"], "document", "{name}");
                assert_eq!(
                    doc.business_id(),
                    want["business_id"].as_str().unwrap(),
                    "{name}"
                );
                assert_eq!(doc.subject, want["subject"].as_str().unwrap(), "{name}");
                assert_eq!(
                    u64::from(doc.steering_type),
                    want["steering_type"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    steering_type_text(doc.steering_type),
                    want["steering_type_text"].as_str().unwrap(),
                    "{name}"
                );
                let names: Vec<String> = doc.attachments.iter().map(|a| a.name.clone()).collect();
                assert_eq!(names, strings(&want["attachments"]), "{name}");
                // The strict writer: written and read back, the same document.
                let written = write_document(&doc).unwrap();
                assert_eq!(parse_document(&written, &limits).unwrap(), *doc, "{name}");
            }
            EdxmlMessage::Status(status) => {
                assert_eq!(want["kind"], "status", "{name}");
                assert_eq!(
                    status.status_code,
                    want["status_code"].as_str().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    status.timestamp,
                    want["timestamp"].as_str().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    status.response_for.document_id,
                    want["response_for"].as_str().unwrap(),
                    "{name}"
                );
                let written = write_status(&status).unwrap();
                assert_eq!(parse_status(&written, &limits).unwrap(), *status, "{name}");
            }
        }
    }
}

/// The package of issue 16: `SteeringType` 0 is kept, written back as 0, and shown as
/// not stated; an absent one is not stated too.
#[test]
fn steering_type_zero_is_kept_and_written_back() {
    let bytes = std::fs::read(corpus_dir().join("lgsp-vdxp-steering-zero.edxml")).unwrap();
    let doc = parse_document(&bytes, &Limits::default()).unwrap();
    assert_eq!(doc.steering_type, 0);
    assert_eq!(steering_type_text(0), "0 (not stated)");
    let written = String::from_utf8(write_document(&doc).unwrap()).unwrap();
    assert!(
        written.contains("<edXML:SteeringType>0</edXML:SteeringType>"),
        "{written}"
    );
    let header = doc.to_header("m", 1).header;
    assert_eq!(header.steering_type, 0);
    assert_eq!(
        lienthong_edxml::from_header(&header, Vec::new()).steering_type,
        0
    );

    let text = String::from_utf8(bytes).unwrap();
    let start = text.find("<edXML:SteeringType>").unwrap();
    let end = text.find("</edXML:SteeringType>").unwrap() + "</edXML:SteeringType>".len();
    let without = format!("{}{}", &text[..start], &text[end..]);
    let doc = parse_document(without.as_bytes(), &Limits::default()).unwrap();
    assert_eq!(doc.steering_type, 0);
}
