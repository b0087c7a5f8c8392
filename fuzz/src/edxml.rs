//! Harness of the fuzz target `edxml`: the edXML package parser, validator and writer of
//! `lienthong-edxml` on arbitrary bytes.
//!
//! Self-contained (only external crates), because `edxml/tests/fuzz_regressions.rs`
//! compiles this file as a module to replay the corpora without libFuzzer.
//!
//! Input layout: the first byte `ctl` picks the mode, the rest is the payload.
//! - `ctl % 4 == 0`: the payload is a package, parsed with the default [`Limits`]
//!   (`parse_message`, `parse_document`, `parse_status`).
//! - `ctl % 4 == 1`: the same under small limits picked by `ctl >> 2` (attachment bytes,
//!   attachments, depth, elements, package bytes around their edges), so the limits are
//!   reached by short inputs; a package accepted under them must be accepted, equal,
//!   under the defaults.
//! - `ctl % 4 == 2`: the payload is `[field, value...]`: one field of a valid document
//!   is replaced by `value` (UTF-8, lossy), and the document is written with
//!   `write_document` and read back.
//! - `ctl % 4 == 3`: the same for a status message (`write_status`).
//!
//! What an accepted package must give, beyond "no panic":
//! - it passes `validate_document` / `validate_status` again, under the limits it was
//!   read with (attachment count and sizes included);
//! - attachment names are safe (one plain path component, `is_safe_file_name`,
//!   distinct without case) and the header it maps to (`to_header`) declares each
//!   attachment's real size and SHA-256, in order;
//! - the header of a new document passes `validate_header` and encodes within
//!   `MAX_HEADER_BYTES` (what the broker checks before it verifies), as the crate
//!   promises;
//! - writing it and reading it back gives the same document, and writing that gives
//!   the same bytes.
//!
//! A written document must always read back; a field that has no surrounding
//! whitespace (and no empty list entry, both dropped on reading) must read back equal.

use std::path::{Component, Path};

use lienthong_edxml::{
    EdxmlAttachment, EdxmlDocument, EdxmlMessage, EdxmlStatus, Limits, ResponseFor, Signer,
    StaffInfo, parse_document, parse_message, parse_status, validate_document, validate_status,
    write_document, write_status,
};
use lienthong_proto::document::{MAX_HEADER_BYTES, is_safe_file_name, validate_header};
use prost::Message as _;

/// A message id the mapped header gets (any valid one).
const MESSAGE_ID: &str = "019e1a2b-3c4d-7e5f-8a9b-0c1d2e3f4a5b";
/// The creation time the mapped header gets.
const CREATED_AT_MS: i64 = 1_777_900_000_000;

/// Runs one input (see the module documentation for the layout).
pub fn fuzz_edxml(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    match ctl % 4 {
        0 => {
            check_package(rest, &Limits::default());
        }
        1 => {
            let limits = small_limits(ctl >> 2);
            if let Some(doc) = check_package(rest, &limits) {
                let again = parse_document(rest, &Limits::default());
                assert_eq!(
                    again.as_ref().ok(),
                    Some(&doc),
                    "accepted under small limits, not under the defaults: {again:?}"
                );
            }
        }
        2 => edit_document(rest),
        _ => edit_status(rest),
    }
}

/// Limits around their edges: `sel` picks one of four values for each.
pub fn small_limits(sel: u8) -> Limits {
    let pick = |shift: u8, values: [usize; 4]| values[usize::from((sel >> shift) & 3)];
    Limits {
        max_attachment_bytes: pick(0, [0, 1, 3, 64]),
        max_attachments: pick(2, [0, 1, 2, 3]),
        max_depth: pick(4, [1, 6, 7, 32]),
        max_elements: pick(6, [1, 60, 120, 4096]),
        max_package_bytes: 64 * 1024,
    }
}

/// Parses `xml` every way the crate offers and checks what is accepted. Returns the
/// document when it is one and was accepted.
pub fn check_package(xml: &[u8], limits: &Limits) -> Option<EdxmlDocument> {
    let message = parse_message(xml, limits);
    let document = parse_document(xml, limits);
    let status = parse_status(xml, limits);
    if xml.len() > limits.max_package_bytes {
        assert!(message.is_err() && document.is_err() && status.is_err());
    }
    match &message {
        Ok(EdxmlMessage::Document(doc)) => {
            assert_eq!(document.as_ref().ok(), Some(doc.as_ref()), "parse_message");
        }
        Ok(EdxmlMessage::Status(s)) => {
            assert_eq!(status.as_ref().ok(), Some(s.as_ref()), "parse_message");
        }
        Err(_) => {}
    }
    if let Ok(status) = &status {
        check_status(status);
    }
    let doc = document.ok()?;
    check_document(&doc, limits);
    Some(doc)
}

/// The invariants of an accepted document (see the module documentation).
pub fn check_document(doc: &EdxmlDocument, limits: &Limits) {
    if let Err(e) = validate_document(doc, limits) {
        panic!("an accepted document fails validate_document: {e}");
    }
    assert!(doc.attachments.len() <= limits.max_attachments);
    let mut names = std::collections::HashSet::new();
    for attachment in &doc.attachments {
        assert!(attachment.bytes.len() <= limits.max_attachment_bytes);
        assert!(is_safe_file_name(&attachment.name), "{:?}", attachment.name);
        let mut parts = Path::new(&attachment.name).components();
        assert!(
            matches!(parts.next(), Some(Component::Normal(_))) && parts.next().is_none(),
            "not one plain path component: {:?}",
            attachment.name
        );
        assert!(
            names.insert(attachment.name.to_lowercase()),
            "two attachments named {:?}",
            attachment.name
        );
    }
    if let Some(id) = &doc.document_id {
        assert_eq!(*id, doc.business_id());
    }

    let imported = doc.to_header(MESSAGE_ID, CREATED_AT_MS);
    let header = &imported.header;
    assert_eq!(header.attachments.len(), doc.attachments.len());
    for (info, attachment) in header.attachments.iter().zip(&doc.attachments) {
        assert_eq!(info.name, attachment.name);
        assert_eq!(info.media_type, attachment.media_type);
        assert_eq!(info.size, attachment.bytes.len() as u64, "declared size");
        assert_eq!(
            info.sha256,
            lienthong_proto::sha256(&attachment.bytes).to_vec(),
            "declared digest"
        );
    }
    assert_eq!(imported.refers_to_business_id, doc.refers_to_business_id());
    if doc.business_type == 0 {
        if let Err(e) = validate_header(header) {
            panic!("the header of an accepted new document fails validate_header: {e}");
        }
        let encoded = header.encoded_len();
        assert!(
            encoded <= MAX_HEADER_BYTES,
            "the header of an accepted document is {encoded} bytes, over MAX_HEADER_BYTES \
             ({MAX_HEADER_BYTES}): the broker would refuse what the agent signs"
        );
    }

    let written = match write_document(doc) {
        Ok(bytes) => bytes,
        Err(e) => panic!("an accepted document cannot be written: {e}"),
    };
    let read = parse_document(&written, &write_limits(limits, written.len()));
    assert_eq!(read.as_ref().ok(), Some(doc), "parse(write(doc)): {read:?}");
    assert_eq!(
        write_document(doc).ok(),
        Some(written),
        "write is deterministic"
    );
}

/// The limits a written package is read back with: the caller's, except the package
/// size (the writer's indentation makes it longer than the input).
fn write_limits(limits: &Limits, len: usize) -> Limits {
    Limits {
        max_package_bytes: limits.max_package_bytes.max(len),
        max_elements: limits.max_elements.max(Limits::default().max_elements),
        max_depth: limits.max_depth.max(Limits::default().max_depth),
        ..limits.clone()
    }
}

/// The invariants of an accepted status message.
pub fn check_status(status: &EdxmlStatus) {
    if let Err(e) = validate_status(status) {
        panic!("an accepted status fails validate_status: {e}");
    }
    let written = match write_status(status) {
        Ok(bytes) => bytes,
        Err(e) => panic!("an accepted status cannot be written: {e}"),
    };
    let read = parse_status(&written, &Limits::default());
    assert_eq!(
        read.as_ref().ok(),
        Some(status),
        "parse(write(status)): {read:?}"
    );
}

/// A valid document with every field set: the base of the edit modes and a seed.
pub fn valid_document() -> EdxmlDocument {
    let mut doc = EdxmlDocument {
        sender: "000.00.00.H31".into(),
        sender_name: "UBND tỉnh".into(),
        recipients: vec!["000.00.12.H31".into(), "000.00.13.H31".into()],
        number: "125".into(),
        notation: "UBND-KGVX".into(),
        document_type: "1".into(),
        document_type_name: "Công văn".into(),
        subject: "V/v trả lời Công văn số 45/SNV-VP".into(),
        content: "Nội dung & ghi chú <quan trọng>".into(),
        issue_place: "Hà Nội".into(),
        issue_date: "2026/05/04".into(),
        signer: Signer {
            competence: "TM. UBND".into(),
            position: "Chủ tịch".into(),
            full_name: "Nguyễn Văn A".into(),
        },
        priority: 2,
        steering_type: 2,
        due_date: Some("2026/05/20".into()),
        to_places: vec!["Như trên".into(), "Lưu: VT, KGVX".into()],
        business_type: 0,
        business_reason: Some("Văn bản mới".into()),
        business_document_id: None,
        document_id: None,
        response_for: Some(ResponseFor {
            organ_id: "000.00.12.H31".into(),
            code: "45/SNV-VP".into(),
            promulgation_date: "2026/04/28".into(),
            document_id: "000.00.12.H31,2026/04/28,45/SNV-VP".into(),
        }),
        page_amount: Some(2),
        promulgation_amount: Some(3),
        sphere_of_promulgation: Some("Liên thông văn bản".into()),
        typist_text: Some("TVC".into()),
        appendixes: vec!["Phụ lục I".into(), "Phụ lục II".into()],
        attachments: vec![
            EdxmlAttachment {
                name: "cong-van.pdf".into(),
                media_type: "application/pdf".into(),
                content_id: "att1@lienthong".into(),
                description: "Văn bản".into(),
                bytes: b"%PDF-1.7 fuzz".to_vec(),
            },
            EdxmlAttachment {
                name: "phụ lục.docx".into(),
                media_type: "application/msword".into(),
                content_id: "att2@lienthong".into(),
                description: String::new(),
                bytes: Vec::new(),
            },
        ],
    };
    doc.document_id = Some(doc.business_id());
    doc
}

/// A valid status message with every field set.
pub fn valid_status() -> EdxmlStatus {
    EdxmlStatus {
        from: "000.00.12.H31".into(),
        from_name: "Sở Nội vụ".into(),
        response_for: ResponseFor {
            organ_id: "000.00.00.H31".into(),
            code: "125/UBND-KGVX".into(),
            promulgation_date: "2026/05/04".into(),
            document_id: "000.00.00.H31,2026/05/04,125/UBND-KGVX".into(),
        },
        status_code: "02".into(),
        description: Some("Sai thể thức".into()),
        timestamp: "2026/05/05 08:30:00".into(),
        staff: Some(StaffInfo {
            department: "Văn phòng".into(),
            staff: "Trần Thị B".into(),
            mobile: "0912345678".into(),
            email: "b@example.vn".into(),
        }),
    }
}

/// Whether a single value reads back as written: the reader trims single values.
fn plain(value: &str) -> bool {
    value.trim() == value
}

/// Replaces field `selector % 32` of the valid document with `value`. Returns whether
/// the edited value is one the reader gives back unchanged (see [`plain`]).
pub fn edit_field(doc: &mut EdxmlDocument, selector: u8, value: &str) -> bool {
    let v = value.to_owned();
    let number = value.trim().parse::<u32>().unwrap_or(u32::MAX);
    match selector % 32 {
        0 => doc.sender = v,
        1 => doc.sender_name = v,
        2 => doc.recipients = value.split(';').map(str::to_owned).collect(),
        3 => doc.number = v,
        4 => doc.notation = v,
        5 => doc.document_type = v,
        6 => doc.document_type_name = v,
        7 => doc.subject = v,
        8 => doc.content = v,
        9 => doc.issue_place = v,
        10 => doc.issue_date = v,
        11 => doc.signer.competence = v,
        12 => doc.signer.position = v,
        13 => doc.signer.full_name = v,
        14 => doc.priority = number,
        15 => doc.steering_type = number,
        16 => doc.due_date = Some(v),
        17 => doc.to_places = value.split(';').map(str::to_owned).collect(),
        18 => doc.business_type = number,
        19 => doc.business_reason = Some(v),
        20 => doc.business_document_id = Some(v),
        21 => doc.document_id = Some(v),
        22 => {
            if let Some(r) = doc.response_for.as_mut() {
                r.document_id = v;
            }
        }
        23 => doc.page_amount = Some(number),
        24 => doc.sphere_of_promulgation = Some(v),
        25 => doc.typist_text = Some(v),
        26 => doc.appendixes = value.split(';').map(str::to_owned).collect(),
        27 => doc.attachments[0].name = v,
        28 => doc.attachments[0].media_type = v,
        29 => doc.attachments[0].content_id = v,
        30 => doc.attachments[0].description = v,
        _ => doc.attachments[1].bytes = value.as_bytes().to_vec(),
    }
    match selector % 32 {
        2 | 17 | 26 => value.split(';').all(|p| plain(p) && !p.is_empty()),
        14 | 15 | 18 | 23 | 31 => true,
        _ => plain(value) && !value.is_empty(),
    }
}

fn edit_document(data: &[u8]) {
    let Some((&selector, value)) = data.split_first() else {
        return;
    };
    let value = String::from_utf8_lossy(value);
    let mut doc = valid_document();
    let exact = edit_field(&mut doc, selector, &value);
    let Ok(written) = write_document(&doc) else {
        return;
    };
    let read = match parse_document(&written, &write_limits(&Limits::default(), written.len())) {
        Ok(read) => read,
        Err(e) => panic!("write_document wrote a package its parser refuses: {e}"),
    };
    check_document(&read, &Limits::default());
    if exact {
        assert_eq!(read, doc, "a written document reads back different");
    }
}

fn edit_status(data: &[u8]) {
    let Some((&selector, value)) = data.split_first() else {
        return;
    };
    let v = String::from_utf8_lossy(value).into_owned();
    let exact = plain(&v) && !v.is_empty();
    let mut status = valid_status();
    match selector % 12 {
        0 => status.from = v,
        1 => status.from_name = v,
        2 => status.response_for.organ_id = v,
        3 => status.response_for.code = v,
        4 => status.response_for.promulgation_date = v,
        5 => status.response_for.document_id = v,
        6 => status.status_code = v,
        7 => status.description = Some(v),
        8 => status.timestamp = v,
        9 => status.staff.get_or_insert_with(StaffInfo::default).staff = v,
        10 => status.staff.get_or_insert_with(StaffInfo::default).email = v,
        _ => status.staff.get_or_insert_with(StaffInfo::default).mobile = v,
    }
    let Ok(written) = write_status(&status) else {
        return;
    };
    let read = match parse_status(&written, &Limits::default()) {
        Ok(read) => read,
        Err(e) => panic!("write_status wrote a message its parser refuses: {e}"),
    };
    check_status(&read);
    if exact {
        assert_eq!(read, status, "a written status reads back different");
    }
}
