//! Replays fuzz inputs through the fuzz targets' own harness (`fuzz/src/lib.rs`,
//! compiled here as a module), without libFuzzer.
//!
//! - `tests/fuzz-regressions/<target>/*`: inputs that once made a target fail. Each
//!   file is named after what it found; see `fuzz/README.md`.
//! - `../fuzz/corpus/<target>/*`: the committed seed corpora, so the harness and its
//!   invariants keep compiling and passing on valid inputs too.
//!
//! A failing input panics inside the harness; the test names the file.

#[allow(dead_code, unreachable_pub, clippy::expect_used, clippy::unwrap_used)]
#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// A fuzz target's name (its folder) and its harness entry point.
type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 4] = [
    ("envelope", harness::fuzz_envelope),
    ("header", harness::fuzz_header),
    ("receipt", harness::fuzz_receipt),
    ("cert_identity", harness::fuzz_cert_identity),
];

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(root: &Path, target: &str, run: fn(&[u8])) -> usize {
    let files = inputs(&root.join(target));
    for file in &files {
        let bytes =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{target}: {} fails", file.display());
    }
    files.len()
}

#[test]
fn regression_inputs_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    for (target, run) in TARGETS {
        replay(&root, target, run);
    }
}

#[test]
fn seed_corpora_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, run) in TARGETS {
        let count = replay(&root, target, run);
        assert!(count > 0, "no seeds for {target} under {}", root.display());
    }
}
