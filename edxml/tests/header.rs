//! Mapping between edXML and our header, and writer round trips built from code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_edxml::{
    AttachmentBytes, EdxmlError, EdxmlStatus, Limits, ResponseFor, StaffInfo, from_header,
    parse_document, parse_status, write_document, write_status,
};
use lienthong_proto::document::{new_message_id, validate_header};

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/corpus/valid/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn imported_header_passes_the_protocol_rules_and_exports_back() {
    let doc = parse_document(&read("full-fields.edxml"), &Limits::default()).unwrap();
    let imported = doc.to_header(&new_message_id(), 1_777_000_000_000);
    assert_eq!(imported.refers_to_business_id, None);
    validate_header(&imported.header).unwrap();
    let header = &imported.header;
    assert_eq!(header.sender, "000.00.00.H31");
    assert_eq!(header.recipients, ["000.00.12.H31", "000.00.13.H31"]);
    assert_eq!(header.business_id, "000.00.00.H31,2026/05/04,125/UBND-KGVX");
    assert_eq!(header.priority, 2);
    assert_eq!(header.steering_type, 2);
    assert_eq!(header.due_date, "2026/05/20");
    assert_eq!(header.signer.as_ref().unwrap().full_name, "Nguyễn Văn A");

    let mut back = from_header(header, Vec::new());
    back.response_for = doc.response_for.clone();
    back.business_reason = doc.business_reason.clone();
    back.page_amount = doc.page_amount;
    back.promulgation_amount = doc.promulgation_amount;
    back.sphere_of_promulgation = doc.sphere_of_promulgation.clone();
    back.typist_text = doc.typist_text.clone();
    back.appendixes = doc.appendixes.clone();
    assert_eq!(back, doc);
}

#[test]
fn attachments_map_to_digests_and_back() {
    let doc = parse_document(
        &read("attachments-vietnamese-names.edxml"),
        &Limits::default(),
    )
    .unwrap();
    let imported = doc.to_header(&new_message_id(), 1_777_000_000_000);
    validate_header(&imported.header).unwrap();
    assert_eq!(imported.header.attachments.len(), 3);
    assert_eq!(imported.header.attachments[2].size, 256);
    let files: Vec<AttachmentBytes> = doc
        .attachments
        .iter()
        .map(|a| AttachmentBytes {
            name: a.name.clone(),
            media_type: a.media_type.clone(),
            bytes: a.bytes.clone(),
        })
        .collect();
    let exported = from_header(&imported.header, files);
    let written = write_document(&exported).unwrap();
    let reread = parse_document(&written, &Limits::default()).unwrap();
    assert_eq!(reread, exported);
    assert_eq!(reread.attachments[1].name, "Phụ lục kèm theo.docx");
    assert_eq!(reread.attachments[0].content_id, "att1@lienthong");
}

#[test]
fn recall_names_the_document_it_concerns() {
    let doc = parse_document(&read("recall.edxml"), &Limits::default()).unwrap();
    assert_eq!(doc.business_type, 1);
    let imported = doc.to_header(&new_message_id(), 1);
    assert_eq!(
        imported.refers_to_business_id.as_deref(),
        Some("000.00.00.H31,2026/05/04,12/UBND-VP")
    );
    assert_eq!(imported.header.business_type, 1);
}

#[test]
fn writer_refuses_what_the_parser_would_refuse() {
    let mut doc = parse_document(&read("minimal.edxml"), &Limits::default()).unwrap();
    doc.number = "123456789012".into();
    assert_eq!(
        write_document(&doc),
        Err(EdxmlError::TooLong {
            path: "MessageHeader/Code/CodeNumber".into(),
            max: 11,
            got: 12
        })
    );
    doc.number = "1".into();
    doc.subject = "nguy hiểm \u{0} ở đây".into();
    assert_eq!(
        write_document(&doc).unwrap_err().path(),
        Some("MessageHeader/Subject")
    );
}

#[test]
fn special_characters_round_trip() {
    let mut doc = parse_document(&read("minimal.edxml"), &Limits::default()).unwrap();
    doc.subject = "A & B <c> \"d\" 'e' ]]> h".into();
    doc.content = "A & B <c>\r\nf\tg ]]> h".into();
    let written = write_document(&doc).unwrap();
    assert_eq!(parse_document(&written, &Limits::default()).unwrap(), doc);
}

/// Fields the signed header shows on one line refuse line breaks and tabs when read, as
/// the header rules would after the import (the fuzz target found a `ContentType` that
/// passed here and failed there).
#[test]
fn one_line_fields_refuse_line_breaks() {
    let doc = parse_document(&read("minimal.edxml"), &Limits::default()).unwrap();
    for (path, edit) in [
        (
            "MessageHeader/Subject",
            (|d: &mut lienthong_edxml::EdxmlDocument| d.subject = "a\nb".into())
                as fn(&mut lienthong_edxml::EdxmlDocument),
        ),
        ("MessageHeader/Subject", |d| d.subject = "a\tb".into()),
        ("MessageHeader/Subject", |d| d.subject = "a\u{2028}b".into()),
        ("MessageHeader/Code/CodeNotation", |d| {
            d.notation = "UBND\r\nVP".into()
        }),
    ] {
        let mut bad = doc.clone();
        edit(&mut bad);
        let written = write_document(&bad);
        let refused = match written {
            Ok(bytes) => parse_document(&bytes, &Limits::default()).unwrap_err(),
            Err(e) => e,
        };
        assert_eq!(
            refused,
            EdxmlError::NotOneLine { path: path.into() },
            "{path}"
        );
    }
}

#[test]
fn status_round_trip_from_code() {
    let status = EdxmlStatus {
        from: "000.00.12.H31".into(),
        from_name: "Sở Nội vụ".into(),
        response_for: ResponseFor {
            organ_id: "000.00.00.H31".into(),
            code: "12/UBND-VP".into(),
            promulgation_date: "2026/05/04".into(),
            document_id: "000.00.00.H31,2026/05/04,12/UBND-VP".into(),
        },
        status_code: "16".into(),
        description: Some("Văn bản đã được xử lý, không thể thu hồi".into()),
        timestamp: "2026/05/04 16:00:00".into(),
        staff: Some(StaffInfo {
            department: "Văn phòng".into(),
            staff: "Lê Văn C".into(),
            mobile: String::new(),
            email: String::new(),
        }),
    };
    let written = write_status(&status).unwrap();
    assert_eq!(parse_status(&written, &Limits::default()).unwrap(), status);
    let mut refused = status.clone();
    refused.description = None;
    assert_eq!(
        write_status(&refused),
        Err(EdxmlError::DescriptionRequired {
            path: "Status/Description".into(),
            code: "16".into()
        })
    );
}
