//! Text that cannot spoof: attachment names without control or format characters,
//! duplicate names after NFC, Windows device names after NFKC, one-line header fields
//! without line breaks, and the escaping every display uses. A crafted header signed
//! with a real key (bypassing `seal`) is refused by `verify_document` too, which is
//! what the broker and the recipient agent call.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Pki, SENDER, header};
use lienthong_certs_dev::KeyAlgorithm;
use lienthong_proto::ProtocolError;
use lienthong_proto::agency::{escape_for_display, is_hidden_control, printable};
use lienthong_proto::document::{
    describe_attachment, is_safe_file_name, validate_header, verify_document,
};
use lienthong_proto::pb::{self, DocumentHeader};
use lienthong_proto::signing::{Domain, VerifyTime};
use prost::Message;

/// A header whose first attachment is named `name` (and a second one `other`).
fn with_names(names: &[&str]) -> DocumentHeader {
    let mut h = header();
    h.attachments = names
        .iter()
        .map(|n| describe_attachment(n, "application/pdf", n.as_bytes()))
        .collect();
    h
}

#[track_caller]
fn assert_name_refused(name: &str, expected_detail: &str) {
    let err = validate_header(&with_names(&[name])).expect_err(name);
    match &err {
        ProtocolError::AttachmentMismatch {
            index: 0,
            name: shown,
            detail,
        } => {
            assert!(
                detail.contains(expected_detail),
                "{name:?}: detail {detail:?} should contain {expected_detail:?}"
            );
            // The name in the error cannot hide or reorder anything either.
            assert!(
                !shown.chars().any(is_hidden_control),
                "{name:?} shown as {shown:?}"
            );
        }
        other => panic!("{name:?}: expected AttachmentMismatch for attachment 0, got {other:?}"),
    }
}

#[test]
fn attachment_names_with_format_characters_are_refused() {
    // Bidi embeddings, overrides and isolates; zero-width characters and marks; BOM;
    // soft hyphen, word joiner, invisible operators, Arabic letter mark, tag characters.
    let format_chars = [
        '\u{202A}',
        '\u{202B}',
        '\u{202C}',
        '\u{202D}',
        '\u{202E}',
        '\u{2066}',
        '\u{2067}',
        '\u{2068}',
        '\u{2069}',
        '\u{200B}',
        '\u{200C}',
        '\u{200D}',
        '\u{200E}',
        '\u{200F}',
        '\u{FEFF}',
        '\u{00AD}',
        '\u{2060}',
        '\u{2062}',
        '\u{061C}',
        '\u{E0041}',
    ];
    for c in format_chars {
        assert_name_refused(&format!("evil{c}gnp.exe"), "plain file name");
        assert_name_refused(&format!("{c}a.pdf"), "plain file name");
    }
    // The classic: shows as "evilexe.png".
    assert_name_refused("evil\u{202e}gnp.exe", "no control, format");
}

#[test]
fn attachment_names_with_control_characters_or_separators_are_refused() {
    for c in [
        '\n', '\r', '\t', '\u{0}', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}', '\u{2028}', '\u{2029}',
    ] {
        assert_name_refused(&format!("a{c}b.pdf"), "plain file name");
    }
}

#[test]
fn names_equal_after_nfc_and_case_are_duplicates() {
    let nfc = "Quy\u{1EBF}t \u{0111}\u{1ECB}nh.pdf"; // "Quyết định.pdf", precomposed
    let nfd = "Quye\u{0302}\u{0301}t \u{0111}i\u{0323}nh.pdf"; // the same, decomposed
    assert_ne!(nfc, nfd);
    for pair in [[nfc, nfd], [nfd, nfc], [nfc, &nfd.to_uppercase()]] {
        let err = validate_header(&with_names(&pair)).expect_err("duplicate");
        assert!(
            matches!(&err, ProtocolError::AttachmentMismatch { index: 1, detail, .. }
                if detail.contains("NFC")),
            "{pair:?}: {err:?}"
        );
    }
    // Different names stay different.
    assert_eq!(
        validate_header(&with_names(&[nfc, "Quyet dinh.pdf"])),
        Ok(())
    );
}

#[test]
fn windows_device_names_are_caught_in_compatibility_forms() {
    for name in [
        "COM\u{00B9}",                  // COM¹
        "com\u{00B2}.txt",              // com².txt
        "LPT\u{00B3}.pdf",              // LPT³.pdf
        "\u{FF23}\u{FF2F}\u{FF2E}.txt", // ＣＯＮ.txt (full width)
        "nul.tar.gz",
        "COM0",
        "lpt0.doc",
        "CONIN$",
        "conout$.log",
        "aux ",
        "report.pdf\u{3000}", // trailing ideographic space
        "report.pdf\u{FF0E}", // trailing full-width full stop
        "a\u{FF0F}b.pdf",     // full-width solidus folds to '/'
    ] {
        assert!(!is_safe_file_name(name), "{name:?} must be refused");
        assert_name_refused(name, "plain file name");
    }
    // Names the export folder uses, also in compatibility forms.
    for name in [
        "envelope.pb",
        "Document.JSON",
        "submission-receipt.pb",
        "DELIVERY-RECEIPT.PB",
        "\u{FF45}nvelope.pb", // ｅnvelope.pb
    ] {
        assert!(!is_safe_file_name(name), "{name:?} must be refused");
    }
    // Ordinary names are fine, Vietnamese included.
    for name in [
        "COM10.txt",
        "console.pdf",
        "b\u{00E1}o c\u{00E1}o (1).pdf",
        "Quy\u{1EBF}t \u{0111}\u{1ECB}nh s\u{1ED1} 12.docx",
        "envelope.pb.pdf",
    ] {
        assert!(is_safe_file_name(name), "{name:?} must be accepted");
    }
}

#[test]
fn one_line_fields_refuse_line_breaks_and_control_characters() {
    type Set = fn(&mut DocumentHeader, String);
    let fields: [(&str, Set); 10] = [
        ("subject", |h, v| h.subject = v),
        ("notation", |h, v| {
            h.notation = v;
            h.business_id = lienthong_proto::document::business_id(
                &h.sender,
                &h.issue_date,
                &h.number,
                &h.notation,
            );
        }),
        ("document_type", |h, v| h.document_type = v),
        ("document_type_name", |h, v| h.document_type_name = v),
        ("issue_place", |h, v| h.issue_place = v),
        ("sender_name", |h, v| h.sender_name = v),
        ("signer.full_name", |h, v| {
            h.signer = Some(pb::SignerInfo {
                full_name: v,
                ..Default::default()
            })
        }),
        ("signer.position", |h, v| {
            h.signer = Some(pb::SignerInfo {
                position: v,
                ..Default::default()
            })
        }),
        ("to_places", |h, v| h.to_places = vec![v]),
        ("attachments.media_type", |h, v| {
            h.attachments[0].media_type = v
        }),
    ];
    // The forged second line of `lienthong inbox`: a CR/LF and a fake row.
    let forged = "Thông báo\r\n0190a5b2-0000-7000-8000-000000000001  000.00.00.H31  x";
    for (field, set) in fields {
        for value in [
            forged.to_owned(),
            "a\nb".to_owned(),
            "a\rb".to_owned(),
            "a\tb".to_owned(),
            "a\u{1b}[2Jb".to_owned(),
            "a\u{85}b".to_owned(),
            "a\u{2028}b".to_owned(),
        ] {
            let mut h = header();
            set(&mut h, value.clone());
            let err = validate_header(&h).expect_err(field);
            assert!(
                matches!(&err, ProtocolError::InvalidField { field: f, .. } if *f == field),
                "{field} = {value:?}: {err:?}"
            );
        }
        // The same field without the break is fine.
        let mut h = header();
        set(&mut h, "Công văn".to_owned());
        assert_eq!(validate_header(&h), Ok(()), "{field}");
    }
    // The number cannot carry one either (it is required and at most 11 characters).
    let mut h = header();
    h.number = "1\n2".into();
    h.business_id =
        lienthong_proto::document::business_id(&h.sender, &h.issue_date, &h.number, &h.notation);
    assert!(matches!(
        validate_header(&h),
        Err(ProtocolError::InvalidField {
            field: "number",
            ..
        })
    ));
}

#[test]
fn free_text_fields_keep_line_breaks() {
    let mut h = header();
    h.content = "Dòng một\r\nDòng hai\tcột".into();
    assert_eq!(validate_header(&h), Ok(()));
    h.content = "no escape \u{1b}[2J".into();
    assert!(matches!(
        validate_header(&h),
        Err(ProtocolError::InvalidField {
            field: "content",
            ..
        })
    ));
}

#[test]
fn a_crafted_header_signed_without_seal_is_refused_on_verification() {
    // What a modified agent could send: a real signature over a header `seal` refuses.
    let pki = Pki::new("display CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    for change in [
        (|h: &mut DocumentHeader| h.subject = "a\r\nb".into()) as fn(&mut DocumentHeader),
        |h| h.attachments[0].name = "evil\u{202e}gnp.exe".into(),
        |h| {
            let mut second = h.attachments[0].clone();
            second.name = second.name.to_uppercase();
            h.attachments.push(second);
        },
        |h| h.attachments[0].name = "COM\u{00B9}.pdf".into(),
    ] {
        let mut h = header();
        change(&mut h);
        let envelope = key
            .sign(Domain::DocumentHeader, h.encode_to_vec().into())
            .unwrap();
        let err = verify_document(&envelope, &pki.anchors, VerifyTime::Now).expect_err("refused");
        assert!(
            matches!(
                err,
                ProtocolError::InvalidField { .. } | ProtocolError::AttachmentMismatch { .. }
            ),
            "{err:?}"
        );
    }
}

#[test]
fn display_escaping_shows_every_hidden_character() {
    assert_eq!(escape_for_display("Công văn 12/UBND"), "Công văn 12/UBND");
    assert_eq!(
        escape_for_display("x\r\ny\u{202e}z\u{200b}\u{feff}\u{2066}\u{2028}"),
        "x\\u{000D}\\u{000A}y\\u{202E}z\\u{200B}\\u{FEFF}\\u{2066}\\u{2028}"
    );
    // Combining marks are shown, not escaped: NFD Vietnamese stays readable.
    assert_eq!(escape_for_display("e\u{0302}\u{0301}"), "e\u{0302}\u{0301}");
    assert_eq!(printable("a\u{202e}b\nc"), "a?b?c");
}
