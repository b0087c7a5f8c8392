//! Writes the seed corpora: `cargo run --bin seeds [DIR [TARGET...]]` (default: `corpus/`
//! next to this package's Cargo.toml, every target), one folder per fuzz target. Seeds are valid inputs in
//! each target's layout (see `src/lib.rs`), so the fuzzer starts past the parsers'
//! first checks. Certificates and signatures are fresh on every run; rerunning replaces
//! the files of the same name.

use std::fs;
use std::path::{Path, PathBuf};

use lienthong_certs_dev::{DevCa, KeyAlgorithm, LeafSpec};
use lienthong_fuzz::{
    Fixture, OTHER_RECIPIENT, RECIPIENT, SENDER, fixture, mutate_header, valid_header,
    valid_receipt,
};
use lienthong_proto::document::{business_id, describe_attachment};
use lienthong_proto::pb::{BusinessType, DocumentHeader, ReceiptKind, Signed};
use lienthong_proto::receipt::sign_receipt;
use prost::Message;

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) {
    let folder = dir.join(target);
    fs::create_dir_all(&folder).expect("create the corpus folder");
    fs::write(folder.join(name), bytes).expect("write a seed");
}

fn with_ctl(ctl: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rest.len() + 1);
    out.push(ctl);
    out.extend_from_slice(rest);
    out
}

/// Header variants: the full fixture header, a minimal one, a recall, one with no
/// attachments and several recipients.
fn headers() -> Vec<(&'static str, DocumentHeader)> {
    let full = valid_header();
    let mut minimal = DocumentHeader {
        message_id: full.message_id.clone(),
        sender: SENDER.to_owned(),
        recipients: vec![RECIPIENT.to_owned()],
        number: "1".to_owned(),
        subject: "s".to_owned(),
        issue_date: "2026/01/01".to_owned(),
        created_at_ms: 1,
        ..DocumentHeader::default()
    };
    minimal.business_id = business_id(SENDER, "2026/01/01", "1", "");
    let mut recall = full.clone();
    recall.business_type = BusinessType::Recall as i32;
    recall.refers_to = "019e1a2b-0000-7000-8000-000000000001".to_owned();
    recall.expires_at_ms = recall.created_at_ms + 86_400_000;
    let mut wide = full.clone();
    wide.attachments.clear();
    wide.recipients = (1..=12).map(|i| format!("000.00.{i:02}.G01")).collect();
    wide.recipients.push(OTHER_RECIPIENT.to_owned());
    wide.attachments
        .push(describe_attachment("bao-cao.xlsx", "", b""));
    vec![
        ("full", full),
        ("minimal", minimal),
        ("recall", recall),
        ("wide", wide),
    ]
}

fn envelope_seeds(dir: &Path, fx: &Fixture) {
    for (name, header) in headers() {
        let bytes = header.encode_to_vec();
        let envelope = fx
            .sender_key
            .sign(
                lienthong_proto::signing::Domain::DocumentHeader,
                bytes.clone().into(),
            )
            .expect("sign a seed header");
        write(
            dir,
            "envelope",
            &format!("0-signed-{name}"),
            &with_ctl(0, &envelope.encode_to_vec()),
        );
        write(
            dir,
            "envelope",
            &format!("1-header-{name}"),
            &with_ctl(1, &bytes),
        );
    }
    // Mode 2: partial envelopes, the rest filled in from the valid one.
    let partial = |signed: Signed| with_ctl(2, &signed.encode_to_vec());
    write(dir, "envelope", "2-empty", &[2]);
    write(
        dir,
        "envelope",
        "2-payload-only",
        &partial(Signed {
            payload: fx.header_bytes.clone().into(),
            ..Signed::default()
        }),
    );
    let chains: [(&str, Vec<Vec<u8>>); 4] = [
        (
            "2-chain-with-ca",
            vec![fx.sender_cert_der.clone(), fx.ca.cert_der().to_vec()],
        ),
        ("2-chain-operator", vec![fx.operator_cert_der.clone()]),
        ("2-chain-broker", vec![fx.broker_cert_der.clone()]),
        ("2-chain-other-agency", vec![fx.recipient_cert_der.clone()]),
    ];
    for (name, cert_chain) in chains {
        write(
            dir,
            "envelope",
            name,
            &partial(Signed {
                cert_chain,
                ..Signed::default()
            }),
        );
    }
    write(
        dir,
        "envelope",
        "2-algorithm-ed25519",
        &partial(Signed {
            algorithm: 3,
            ..Signed::default()
        }),
    );
    // Mode 3: one field of the valid header replaced.
    let fields: [(u8, &[u8]); 8] = [
        (0, b"019E1A2B-3C4D-7E5F-8A9B-0C1D2E3F4A5B"),
        (1, b"000.00.12.h31"),
        (13, b"2026/02/30"),
        (14, b"2026/13/01"),
        (18, b"../envelope.pb"),
        (26, b"019e1a2b-0000-7000-8000-000000000001"),
        (28, &1_000u64.to_le_bytes()),
        (0x86, "Mười hai".as_bytes()),
    ];
    for (selector, value) in fields {
        let mut input = vec![3, selector];
        input.extend_from_slice(value);
        // Check the selector is one mutate_header knows (it would panic otherwise).
        mutate_header(&mut valid_header(), selector, value);
        write(dir, "envelope", &format!("3-field-{selector:02x}"), &input);
    }
}

fn header_seeds(dir: &Path) {
    for (name, header) in headers() {
        write(dir, "header", name, &header.encode_to_vec());
    }
}

fn receipt_seeds(dir: &Path, fx: &Fixture) {
    let kinds = [
        (0u8, ReceiptKind::Unspecified, "unspecified"),
        (1, ReceiptKind::Submission, "submission"),
        (2, ReceiptKind::Delivery, "delivery"),
        (3, ReceiptKind::DeadLetter, "dead-letter"),
    ];
    for (bits, kind, name) in kinds {
        let receipt = valid_receipt(kind, fx.at_ms);
        let bytes = receipt.encode_to_vec();
        let signed = sign_receipt(&receipt, fx.receipt_key(kind)).expect("sign a seed receipt");
        for live in [0u8, 4] {
            let mode = |m: u8| bits | live | (m << 3);
            let tag = if live == 4 { "live" } else { "at" };
            write(
                dir,
                "receipt",
                &format!("0-signed-{name}-{tag}"),
                &with_ctl(mode(0), &signed.encode_to_vec()),
            );
            write(
                dir,
                "receipt",
                &format!("1-payload-{name}-{tag}"),
                &with_ctl(mode(1), &bytes),
            );
            write(dir, "receipt", &format!("2-empty-{name}-{tag}"), &[mode(2)]);
        }
        write(
            dir,
            "receipt",
            &format!("3-decode-{name}"),
            &with_ctl(bits | (3 << 3), &bytes),
        );
    }
}

fn cert_seeds(dir: &Path, fx: &Fixture) {
    let ca = &fx.ca;
    let issue = |spec: LeafSpec| ca.issue(&spec).expect("issue a seed certificate");
    let certs = [
        ("ca.der", ca.cert_der().to_vec()),
        ("agency-p256.der", fx.sender_cert_der.clone()),
        ("agency-ed25519.der", fx.recipient_cert_der.clone()),
        (
            "agency-p384.der",
            issue(LeafSpec::agency(OTHER_RECIPIENT).with_key_algorithm(KeyAlgorithm::EcdsaP384))
                .cert_der,
        ),
        ("operator.der", fx.operator_cert_der.clone()),
        ("server.der", fx.broker_cert_der.clone()),
        (
            "agency-bad-code.der",
            issue(LeafSpec::agency(SENDER).with_uri("urn:lienthong:agency:000.00.12.h31")).cert_der,
        ),
        (
            "operator-empty.der",
            issue(LeafSpec::operator("x").with_uri("urn:lienthong:operator:")).cert_der,
        ),
        (
            "agency-no-uri.der",
            issue(LeafSpec::agency(SENDER).without_uri()).cert_der,
        ),
        (
            "agency-expired.der",
            issue(LeafSpec::agency(SENDER).expired()).cert_der,
        ),
    ];
    for (name, der) in certs {
        write(dir, "cert_identity", name, &der);
    }
    write(dir, "cert_identity", "ca.pem", fx.ca_pem.as_bytes());
    let bundle = format!("{}{}", fx.sender_cert_pem, fx.ca_pem);
    write(dir, "cert_identity", "bundle.pem", bundle.as_bytes());
    let other = DevCa::generate("second fuzz CA").expect("second CA");
    let anchors = format!("{}{}", fx.ca_pem, other.cert_pem());
    write(dir, "cert_identity", "anchors.pem", anchors.as_bytes());
}

/// The fixture must verify, or every seed stops at the first error.
fn self_check(fx: &Fixture) {
    use lienthong_proto::document::verify_document;
    use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
    use lienthong_proto::signing::VerifyTime;
    verify_document(&fx.envelope, &fx.anchors, VerifyTime::Now).expect("fixture envelope verifies");
    for kind in [
        ReceiptKind::Submission,
        ReceiptKind::Delivery,
        ReceiptKind::DeadLetter,
    ] {
        let signed = sign_receipt(&valid_receipt(kind, fx.at_ms), fx.receipt_key(kind))
            .expect("sign a receipt");
        for live in [false, true] {
            let expected = ExpectedReceipt {
                kind,
                message_id: lienthong_fuzz::MESSAGE_ID,
                header_sha256: &fx.header_sha256,
                recipient: (kind != ReceiptKind::Submission).then_some(RECIPIENT),
                live,
            };
            verify_receipt(&signed, &fx.anchors, &expected).expect("fixture receipt verifies");
        }
    }
}

/// `edxml` seeds: every package of `edxml/tests/corpus` (valid and invalid) as is and
/// under small limits, the valid document and status as written, and one field edit
/// of each kind with a valid value.
fn edxml_seeds(dir: &Path) {
    use lienthong_fuzz::edxml::{valid_document, valid_status};
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../edxml/tests/corpus");
    for folder in ["valid", "invalid"] {
        let mut files: Vec<PathBuf> = fs::read_dir(corpus.join(folder))
            .expect("read edxml/tests/corpus")
            .map(|e| e.expect("a corpus entry").path())
            .collect();
        files.sort();
        for file in files {
            let bytes = fs::read(&file).expect("read a corpus file");
            let stem = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("package")
                .trim_end_matches(".edxml")
                .to_owned();
            write(dir, "edxml", &format!("0-{folder}-{stem}"), &with_ctl(0, &bytes));
            if folder == "valid" {
                // Small limits: 64-byte attachments, 3 of them, depth 32, 4096 elements.
                write(dir, "edxml", &format!("1-small-{stem}"), &with_ctl(1 | (0xff << 2), &bytes));
            }
        }
    }
    let document = lienthong_edxml::write_document(&valid_document()).expect("write the document");
    write(dir, "edxml", "0-written-document", &with_ctl(0, &document));
    let status = lienthong_edxml::write_status(&valid_status()).expect("write the status");
    write(dir, "edxml", "0-written-status", &with_ctl(0, &status));
    let edits: [(u8, &str); 8] = [
        (2, "000.00.12.H31;000.00.14.H31"),
        (7, "Về việc & <thử>"),
        (10, "2028/02/29"),
        (17, "Như trên;Lưu: VT"),
        (18, "1"),
        (27, "báo cáo.pdf"),
        (29, "cid-1@example"),
        (31, "bytes"),
    ];
    for (selector, value) in edits {
        let mut input = vec![2, selector];
        input.extend_from_slice(value.as_bytes());
        write(dir, "edxml", &format!("2-edit-{selector:02}"), &input);
    }
    for (selector, value) in [(6u8, "03"), (7, "Lý do"), (8, "2026/12/31 23:59:59")] {
        let mut input = vec![3, selector];
        input.extend_from_slice(value.as_bytes());
        write(dir, "edxml", &format!("3-status-{selector:02}"), &input);
    }
}

/// `api_json` seeds: valid and edge-case bodies of each kind (see `src/api_json.rs`).
fn api_json_seeds(dir: &Path) {
    use lienthong_fuzz::api_json::{AGENCY, RECEIVED_BUSINESS_ID, RECEIVED_SENDER, SENT_ID};
    let send: [(&str, String); 14] = [
        ("minimal", r#"{"to":["000.00.12.H31"],"subject":"Về việc thử"}"#.into()),
        (
            "full",
            r#"{"to":[" 000.00.12.H31 ","000.00.13.H31"],"subject":"Về việc thử nghiệm","number":"12","notation":"UBND-VP","priority":2,"document_type":"1","document_type_name":"Công văn","content":"Nội dung","issue_place":"Hà Nội","issue_date":"2026/05/04","signer":{"competence":"TM. UBND","position":"Chủ tịch","full_name":"Nguyễn Văn A"},"steering_type":1,"due_date":"2026/06/01","to_places":["Như trên","Lưu: VT"],"expires_at_ms":1777990000000,"attachments":[{"name":"cong-van.pdf","content_base64":"JVBERi0xLjc="},{"name":"phụ lục.docx","media_type":"application/msword","content_base64":""}],"sender_name":"Văn phòng UBND"}"#.into(),
        ),
        (
            "recall",
            format!(r#"{{"to":[],"subject":"Thu hồi","business_type":1,"refers_to":"{SENT_ID}","business_reason":"Sai sót"}}"#),
        ),
        (
            "update-removes",
            format!(r#"{{"to":["000.00.12.H31"],"subject":"Cập nhật","number":"13","business_type":2,"refers_to":"{SENT_ID}","business_reason":"Bổ sung","removed_recipients":["000.00.13.H31"]}}"#),
        ),
        (
            "refers-unknown",
            r#"{"to":["000.00.12.H31"],"subject":"s","business_type":3,"refers_to":"019e1a2b-0000-7000-8000-0000000000ff"}"#.into(),
        ),
        (
            "attachment-at-limit",
            format!(r#"{{"to":["000.00.12.H31"],"subject":"s","attachments":[{{"name":"a.bin","content_base64":"{}"}}]}}"#, "A".repeat(84) + "AA=="),
        ),
        (
            "attachment-over-limit",
            format!(r#"{{"to":["000.00.12.H31"],"subject":"s","attachments":[{{"name":"a.bin","content_base64":"{}"}}]}}"#, "A".repeat(84) + "AAA="),
        ),
        (
            "attachment-path",
            r#"{"to":["000.00.12.H31"],"subject":"s","attachments":[{"name":"../etc/passwd","content_base64":"eA=="}]}"#.into(),
        ),
        (
            "attachment-upload",
            r#"{"to":["000.00.12.H31"],"subject":"s","attachments":[{"name":"a.pdf","upload_id":"019e1a2b-0000-7000-8000-000000000003"}]}"#.into(),
        ),
        (
            "attachment-bad-base64",
            r#"{"to":["000.00.12.H31"],"subject":"s","attachments":[{"name":"a.pdf","content_base64":"e==A"}]}"#.into(),
        ),
        (
            "to-self",
            format!(r#"{{"to":["{AGENCY}"],"subject":"s"}}"#),
        ),
        (
            "number-too-long",
            r#"{"to":["000.00.12.H31"],"subject":"s","number":"123456789012"}"#.into(),
        ),
        (
            "control-subject",
            r#"{"to":["000.00.12.H31"],"subject":"a\u0001b","priority":4294967295,"expires_at_ms":-9223372036854775808}"#.into(),
        ),
        (
            "dates",
            r#"{"to":["000.00.12.H31"],"subject":"s","issue_date":"2027/02/29","due_date":"9999/12/31"}"#.into(),
        ),
    ];
    for (name, body) in send {
        write(dir, "api_json", &format!("0-send-{name}"), &with_ctl(0, body.as_bytes()));
    }
    let reports: [(&str, &str); 6] = [
        ("accepted", r#"{"status":"03","staff":"Trần Thị B"}"#),
        ("refused", r#"{"status":"02","reason":"Sai thể thức"}"#),
        ("refused-no-reason", r#"{"status":"02","reason":"  "}"#),
        ("padded", r#"{"status":" 05 "}"#),
        ("recall-agreed", r#"{"status":"15"}"#),
        ("unknown", r#"{"status":"13"}"#),
    ];
    for (name, body) in reports {
        write(dir, "api_json", &format!("1-report-{name}"), &with_ctl(1, body.as_bytes()));
    }
    write(dir, "api_json", "5-report-other-id", &with_ctl(5, br#"{"status":"03"}"#));
    write(dir, "api_json", "2-recall", &with_ctl(2, r#"{"reason":"Sai sót"}"#.as_bytes()));
    write(dir, "api_json", "2-recall-empty", &with_ctl(2, br#"{"reason":" "}"#));
    write(dir, "api_json", "6-recall-other-id", &with_ctl(6, br#"{"reason":"r"}"#));
    // edXML: a document from this agency, and a status about the received document.
    let mut document = lienthong_fuzz::edxml::valid_document();
    document.sender = AGENCY.into();
    document.recipients = vec!["000.00.12.H31".into(), "000.00.13.H31".into()];
    document.response_for = None;
    document.document_id = Some(document.business_id());
    let package = lienthong_edxml::write_document(&document).expect("write a package");
    write(dir, "api_json", "3-edxml-document", &with_ctl(3, &package));
    let mut status = lienthong_fuzz::edxml::valid_status();
    status.from = AGENCY.into();
    status.response_for.organ_id = RECEIVED_SENDER.into();
    status.response_for.document_id = RECEIVED_BUSINESS_ID.into();
    status.response_for.code = "45/SNV-VP".into();
    status.response_for.promulgation_date = "2026/04/28".into();
    let message = lienthong_edxml::write_status(&status).expect("write a status");
    write(dir, "api_json", "3-edxml-status", &with_ctl(3, &message));
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    // Targets to write, all when none are named: `cargo run --bin seeds -- corpus edxml`.
    let only: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let wanted = |target: &str| only.is_empty() || only.iter().any(|t| t == target);
    let fx = fixture();
    self_check(fx);
    if wanted("envelope") {
        envelope_seeds(&dir, fx);
    }
    if wanted("header") {
        header_seeds(&dir);
    }
    if wanted("receipt") {
        receipt_seeds(&dir, fx);
    }
    if wanted("cert_identity") {
        cert_seeds(&dir, fx);
    }
    if wanted("edxml") {
        edxml_seeds(&dir);
    }
    if wanted("api_json") {
        api_json_seeds(&dir);
    }
    println!("seeds written to {}", dir.display());
}
