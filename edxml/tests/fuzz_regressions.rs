//! Replays fuzz inputs through the `edxml` fuzz target's own harness
//! (`fuzz/src/edxml.rs`, compiled here as a module), without libFuzzer.
//!
//! - `tests/fuzz-regressions/edxml/*`: inputs that once made the target fail, each named
//!   after what it found (see `fuzz/README.md`).
//! - `../fuzz/corpus/edxml/*`: the committed seeds, so the harness and its invariants
//!   keep compiling and passing on valid inputs too.
//! - Inputs too large for a fuzzer run (a package over `MAX_HEADER_BYTES` of header
//!   fields) are built here and go through the same harness.
//!
//! A failing input panics inside the harness; the test names the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code, unreachable_pub)]
#[path = "../../fuzz/src/edxml.rs"]
mod harness;

use std::path::{Path, PathBuf};

use lienthong_edxml::{EdxmlError, Limits, parse_document, write_document};

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
        let outcome = std::panic::catch_unwind(|| harness::fuzz_edxml(&bytes));
        assert!(outcome.is_ok(), "edxml: {} fails", file.display());
    }
    files.len()
}

#[test]
fn regression_inputs_pass() {
    replay(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions/edxml"));
}

#[test]
fn seed_corpus_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/edxml");
    let count = replay(&dir);
    assert!(count > 0, "no seeds under {}", dir.display());
}

fn with_places(count: usize) -> Vec<u8> {
    let mut doc = harness::valid_document();
    doc.to_places = vec!["x".repeat(150); count];
    let mut input = vec![0u8];
    input.extend(write_document(&doc).unwrap_or_else(|e| panic!("{count} places: {e}")));
    input
}

/// `ToPlaces/Place` has a length rule but no count: 2,000 places of 150 characters
/// made a document that passed `validate_document` but mapped to a 300 KB header, which
/// the agent signed and the broker refused (`MAX_HEADER_BYTES`). Such a package is now
/// refused when read (and written), naming the limit; 1,600 places still fit.
#[test]
fn a_package_whose_header_exceeds_max_header_bytes_is_refused() {
    let mut doc = harness::valid_document();
    doc.to_places = vec!["x".repeat(150); 2_000];
    let err = write_document(&doc).unwrap_err();
    assert_eq!(err.kind(), "TooLarge");
    assert!(err.to_string().contains("262144"), "{err}");

    let fits = with_places(1_600);
    harness::fuzz_edxml(&fits);
    let doc = parse_document(&fits[1..], &Limits::default()).unwrap();
    let header = doc.to_header("019e1a2b-3c4d-7e5f-8a9b-0c1d2e3f4a5b", 1);
    assert!(lienthong_proto::document::validate_header(&header.header).is_ok());

    // The package itself (well within the package limit) is refused when read.
    let mut package = String::from_utf8(fits[1..].to_vec()).unwrap();
    let place = format!("<edXML:Place>{}</edXML:Place>", "x".repeat(150));
    package = package.replacen(&place, &place.repeat(401), 1);
    let err = parse_document(package.as_bytes(), &Limits::default()).unwrap_err();
    assert!(
        matches!(err, EdxmlError::TooLarge { limit: 262_144, .. }),
        "{err}"
    );
    let mut input = vec![0u8];
    input.extend(package.as_bytes());
    harness::fuzz_edxml(&input);
}

/// The harness can fail: a written document that reads back different is caught (here
/// a subject with surrounding spaces, which reading trims: the edit mode knows and
/// compares only plain values, so this compares by hand).
#[test]
fn the_harness_compares_what_it_reads_back() {
    let mut doc = harness::valid_document();
    assert!(!harness::edit_field(&mut doc, 7, " padded "));
    assert!(harness::edit_field(&mut doc, 7, "padded"));
    let mut padded = harness::valid_document();
    padded.subject = " padded ".into();
    let read = parse_document(&write_document(&padded).unwrap(), &Limits::default()).unwrap();
    assert_ne!(read, padded);
    assert_eq!(read, doc);
    // And an invariant broken on purpose panics: the harness checks a document read
    // under limits it does not respect.
    let small = Limits {
        max_attachments: 1,
        ..Limits::default()
    };
    let outcome = std::panic::catch_unwind(|| harness::check_document(&read, &small));
    assert!(outcome.is_err());
}
