//! The corpus: every valid file parses and round-trips (parse → write → parse equal);
//! every invalid file fails with exactly the variant and path in the table below.
//! Files named `*.status.edxml` are status messages, the others document packages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use lienthong_edxml::{
    EdxmlError, Limits, parse_document, parse_status, write_document, write_status,
};

fn corpus(dir: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "edxml"))
        .collect();
    files.sort();
    files
}

fn is_status(path: &Path) -> bool {
    path.to_string_lossy().ends_with(".status.edxml")
}

fn parse(path: &Path) -> Result<(), EdxmlError> {
    let bytes = std::fs::read(path).unwrap();
    let limits = Limits::default();
    if is_status(path) {
        parse_status(&bytes, &limits).map(|_| ())
    } else {
        parse_document(&bytes, &limits).map(|_| ())
    }
}

#[test]
fn valid_files_parse_and_round_trip() {
    let files = corpus("valid");
    assert!(files.len() >= 5, "corpus/valid has {} files", files.len());
    let limits = Limits::default();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        if is_status(&path) {
            let first =
                parse_status(&bytes, &limits).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let written = write_status(&first).unwrap();
            let second = parse_status(&written, &limits).unwrap();
            assert_eq!(first, second, "{}", path.display());
            assert_eq!(write_status(&second).unwrap(), written);
        } else {
            let first = parse_document(&bytes, &limits)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let written = write_document(&first).unwrap();
            let second = parse_document(&written, &limits)
                .unwrap_or_else(|e| panic!("{} rewritten: {e}", path.display()));
            assert_eq!(first, second, "{}", path.display());
            assert_eq!(write_document(&second).unwrap(), written);
        }
    }
}

/// (file stem, expected variant, expected path or None).
const INVALID: &[(&str, &str, Option<&str>)] = &[
    (
        "attachment-duplicate-content-id",
        "DuplicateContentId",
        Some("AttachmentEncoded/Attachment[2]/ContentId"),
    ),
    (
        "attachment-duplicate-name",
        "DuplicateAttachmentName",
        Some("AttachmentEncoded/Attachment[2]/AttachmentName"),
    ),
    (
        "attachment-unreferenced",
        "UnreferencedAttachment",
        Some("AttachmentEncoded/Attachment[2]"),
    ),
    (
        "attachment-unsafe-name",
        "UnsafeFileName",
        Some("AttachmentEncoded/Attachment[1]/AttachmentName"),
    ),
    (
        "base64-invalid",
        "InvalidBase64",
        Some("AttachmentEncoded/Attachment[1]/ContentTransferEncoded"),
    ),
    (
        "business-doc-type-out-of-range",
        "OutOfRange",
        Some("TraceHeaderList/Bussiness/BussinessDocType"),
    ),
    (
        "code-notation-too-long",
        "TooLong",
        Some("MessageHeader/Code/CodeNotation"),
    ),
    (
        "code-number-too-long",
        "TooLong",
        Some("MessageHeader/Code/CodeNumber"),
    ),
    ("content-too-long", "TooLong", Some("MessageHeader/Content")),
    (
        "control-character",
        "ControlCharacter",
        Some("MessageHeader/Subject"),
    ),
    (
        "document-id-format",
        "InvalidDocumentId",
        Some("MessageHeader/DocumentId"),
    ),
    (
        "document-id-mismatch",
        "DocumentIdMismatch",
        Some("MessageHeader/DocumentId"),
    ),
    (
        "due-date-invalid",
        "InvalidDate",
        Some("MessageHeader/DueDate"),
    ),
    (
        "duplicate-subject",
        "DuplicateElement",
        Some("MessageHeader/Subject"),
    ),
    (
        "missing-message-header",
        "MissingElement",
        Some("MessageHeader"),
    ),
    ("no-recipient", "MissingElement", Some("MessageHeader/To")),
    ("not-edxml-root", "NotEdxml", None),
    (
        "place-too-long",
        "TooLong",
        Some("MessageHeader/PromulgationInfo/Place"),
    ),
    (
        "priority-out-of-range",
        "OutOfRange",
        Some("MessageHeader/OtherInfo/Priority"),
    ),
    (
        "promulgation-date-format",
        "InvalidDate",
        Some("MessageHeader/PromulgationInfo/PromulgationDate"),
    ),
    (
        "promulgation-date-not-real",
        "InvalidDate",
        Some("MessageHeader/PromulgationInfo/PromulgationDate"),
    ),
    (
        "recipient-bad-agency-code",
        "InvalidAgencyCode",
        Some("MessageHeader/To/OrganId"),
    ),
    (
        "recipient-is-sender",
        "InvalidValue",
        Some("MessageHeader/To/OrganId"),
    ),
    (
        "reference-unresolved",
        "UnresolvedReference",
        Some("edXMLBody/edXMLManifest/Reference[1]"),
    ),
    (
        "response-for-bad-date",
        "InvalidDate",
        Some("MessageHeader/ResponseFor/PromulgationDate"),
    ),
    (
        "sender-bad-agency-code",
        "InvalidAgencyCode",
        Some("MessageHeader/From/OrganId"),
    ),
    (
        "status-recall-refused-without-reason",
        "DescriptionRequired",
        Some("Status/Description"),
    ),
    (
        "status-refused-without-reason",
        "DescriptionRequired",
        Some("Status/Description"),
    ),
    (
        "status-timestamp-format",
        "InvalidTimestamp",
        Some("Status/Timestamp"),
    ),
    (
        "status-unknown-code",
        "UnknownStatusCode",
        Some("Status/StatusCode"),
    ),
    (
        "steering-type-out-of-range",
        "OutOfRange",
        Some("MessageHeader/SteeringType"),
    ),
    (
        "subject-missing",
        "MissingElement",
        Some("MessageHeader/Subject"),
    ),
    ("subject-too-long", "TooLong", Some("MessageHeader/Subject")),
    (
        "to-place-too-long",
        "TooLong",
        Some("MessageHeader/ToPlaces/Place"),
    ),
    (
        "type-name-too-long",
        "TooLong",
        Some("MessageHeader/DocumentType/TypeName"),
    ),
    ("undeclared-entity", "EntityRefused", None),
    ("xml-syntax-unclosed", "XmlSyntax", None),
    ("xxe-external-entity", "DtdRefused", None),
];

#[test]
fn invalid_files_fail_with_the_expected_error() {
    let files = corpus("invalid");
    assert!(
        files.len() >= 20,
        "corpus/invalid has {} files",
        files.len()
    );
    let mut seen = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy();
        let stem = name
            .trim_end_matches(".edxml")
            .trim_end_matches(".status")
            .to_owned();
        let (_, kind, field) = INVALID
            .iter()
            .find(|(s, _, _)| *s == stem)
            .unwrap_or_else(|| panic!("{name} has no entry in the INVALID table"));
        let error = parse(path).expect_err(&name);
        assert_eq!(
            (error.kind(), error.path()),
            (*kind, *field),
            "{name}: got {error}"
        );
        seen.push(stem);
    }
    for (stem, _, _) in INVALID {
        assert!(
            seen.iter().any(|s| s == stem),
            "{stem} is in the table but not in the corpus"
        );
    }
}

#[test]
fn error_display_names_path_and_rule() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus/invalid/code-number-too-long.edxml");
    let error = parse(&path).unwrap_err();
    assert_eq!(
        error.to_string(),
        "MessageHeader/Code/CodeNumber: at most 11 characters (got 14)"
    );
}
