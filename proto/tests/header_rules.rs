//! The document header rules enforced by `validate_header` (and therefore by `seal` and
//! `verify_document`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{NOTATION, NUMBER, OTHER, Pki, RECIPIENT, SENDER, header};
use lienthong_certs_dev::KeyAlgorithm;
use lienthong_proto::document::{
    business_id, describe_attachment, is_valid_message_id, new_message_id, seal, validate_header,
    verify_document,
};
use lienthong_proto::pb::{BusinessType, DocumentHeader};
use lienthong_proto::signing::{Domain, VerifyTime};
use lienthong_proto::{ProtocolError, pb};
use prost::Message;

/// The header after `change`, which must be refused.
fn refused(change: impl FnOnce(&mut DocumentHeader)) -> ProtocolError {
    let mut h = header();
    change(&mut h);
    validate_header(&h).expect_err("header should be refused")
}

/// Asserts `err` is `InvalidField` for `field`.
#[track_caller]
fn assert_invalid_field(err: &ProtocolError, field: &str) {
    assert!(
        matches!(err, ProtocolError::InvalidField { field: f, .. } if *f == field),
        "expected InvalidField {{ field: {field:?} }}, got {err:?}"
    );
}

/// Asserts `err` is `AttachmentMismatch` for attachment `index` named `name`.
#[track_caller]
fn assert_attachment(err: &ProtocolError, index: usize, name: &str) {
    assert!(
        matches!(err, ProtocolError::AttachmentMismatch { index: i, name: n, .. }
            if *i == index && n == name),
        "expected AttachmentMismatch {{ index: {index}, name: {name:?} }}, got {err:?}"
    );
}

/// Keeps `business_id` consistent after the fields it is made of changed.
fn fix_business_id(h: &mut DocumentHeader) {
    h.business_id = business_id(&h.sender, &h.issue_date, &h.number, &h.notation);
}

#[test]
fn the_helper_header_is_valid() {
    let h = header();
    assert_eq!(validate_header(&h), Ok(()));
    assert!(is_valid_message_id(&h.message_id));
    assert_eq!(
        h.business_id,
        format!("{SENDER},{},{NUMBER}/{NOTATION}", h.issue_date)
    );
}

#[test]
fn message_id_must_be_a_canonical_uuid() {
    for bad in [
        String::new(),
        "not-a-uuid".to_owned(),
        new_message_id().to_uppercase(),
        new_message_id().replace('-', ""),
        format!("{{{}}}", new_message_id()),
        format!("urn:uuid:{}", new_message_id()),
    ] {
        let err = refused(|h| h.message_id = bad.clone());
        assert_eq!(
            err,
            ProtocolError::InvalidField {
                field: "message_id",
                rule: "a lowercase hyphenated UUID".into(),
            },
            "{bad:?}"
        );
    }
}

#[test]
fn sender_and_recipients_are_agency_codes() {
    let err = refused(|h| h.recipients.push("000.00.13.h31".into()));
    assert_eq!(
        err,
        ProtocolError::InvalidAgencyCode {
            code: "000.00.13.h31".into()
        }
    );
    let err = refused(|h| h.recipients = vec!["H31".into()]);
    assert_eq!(err, ProtocolError::InvalidAgencyCode { code: "H31".into() });

    let err = refused(|h| {
        h.sender = "000.00.12".into();
        fix_business_id(h);
    });
    assert_eq!(
        err,
        ProtocolError::InvalidAgencyCode {
            code: "000.00.12".into()
        }
    );

    let err = refused(|h| h.recipients.clear());
    assert_eq!(
        err,
        ProtocolError::MissingField {
            field: "recipients"
        }
    );
}

#[test]
fn sender_cannot_be_a_recipient() {
    let err = refused(|h| h.recipients.push(SENDER.into()));
    assert_eq!(
        err,
        ProtocolError::InvalidField {
            field: "recipients",
            rule: "the sender cannot be a recipient".into(),
        }
    );
}

#[test]
fn recipients_are_listed_once() {
    let err = refused(|h| h.recipients = vec![RECIPIENT.into(), OTHER.into(), RECIPIENT.into()]);
    assert_eq!(
        err,
        ProtocolError::InvalidField {
            field: "recipients",
            rule: format!("{RECIPIENT} is listed twice"),
        }
    );
    let mut h = header();
    h.recipients = vec![RECIPIENT.into(), OTHER.into()];
    assert_eq!(validate_header(&h), Ok(()));
}

#[test]
fn subject_counts_characters_not_bytes() {
    // "ă" is two bytes in UTF-8: 500 of them are 1000 bytes but 500 characters.
    let mut h = header();
    h.subject = "ă".repeat(500);
    assert_eq!(h.subject.len(), 1000);
    assert_eq!(validate_header(&h), Ok(()));

    // With a combining form ("a" + U+0306) each letter is two characters.
    h.subject = "a\u{306}".repeat(250);
    assert_eq!(validate_header(&h), Ok(()));

    let err = refused(|h| h.subject = "ă".repeat(501));
    assert_eq!(
        err,
        ProtocolError::InvalidField {
            field: "subject",
            rule: "at most 500 characters".into(),
        }
    );

    let err = refused(|h| h.subject = "   ".into());
    assert_eq!(err, ProtocolError::MissingField { field: "subject" });
    let err = refused(|h| h.subject = "Về việc\u{0}".into());
    assert_eq!(
        err,
        ProtocolError::InvalidField {
            field: "subject",
            rule: "no control characters".into(),
        }
    );
    // The subject is shown on one line: a line break would let the sender forge a
    // second line in a listing, so it is refused (display_rules.rs has every variant).
    h.subject = "Về việc\r\n\ttriển khai".into();
    assert_eq!(
        validate_header(&h),
        Err(ProtocolError::InvalidField {
            field: "subject",
            rule: "one line: no line breaks, tabs or other control characters".into(),
        })
    );
}

#[test]
fn number_at_most_eleven_characters() {
    let mut h = header();
    h.number = "12345678901".into();
    fix_business_id(&mut h);
    assert_eq!(validate_header(&h), Ok(()));

    let err = refused(|h| {
        h.number = "123456789012".into();
        fix_business_id(h);
    });
    assert_eq!(
        err,
        ProtocolError::InvalidField {
            field: "number",
            rule: "at most 11 characters".into(),
        }
    );
    let err = refused(|h| {
        h.number = String::new();
        fix_business_id(h);
    });
    assert_eq!(err, ProtocolError::MissingField { field: "number" });
}

#[test]
fn other_lengths_are_checked() {
    let err = refused(|h| {
        h.notation = "Đ".repeat(31);
        fix_business_id(h);
    });
    assert_invalid_field(&err, "notation");
    assert_invalid_field(&refused(|h| h.content = "ư".repeat(501)), "content");
    assert_invalid_field(&refused(|h| h.issue_place = "ơ".repeat(51)), "issue_place");
    assert_invalid_field(&refused(|h| h.sender_name = "x".repeat(201)), "sender_name");
    assert_invalid_field(
        &refused(|h| h.to_places = vec!["Như trên".into(), "ê".repeat(151)]),
        "to_places",
    );
    assert_invalid_field(
        &refused(|h| {
            h.signer = Some(pb::SignerInfo {
                competence: "TM. UBND".into(),
                position: "Chủ tịch".into(),
                full_name: "N".repeat(101),
            })
        }),
        "signer.full_name",
    );
}

#[test]
fn issue_date_is_a_real_date_written_yyyy_mm_dd() {
    for bad in [
        "2026-11-25",
        "2026/02/30",
        "2026/13/01",
        "2026/00/10",
        "2026/1/5",
        "26/11/2026",
        "",
        "2026/11/25 ",
    ] {
        let err = refused(|h| {
            h.issue_date = bad.into();
            fix_business_id(h);
        });
        assert_eq!(
            err,
            ProtocolError::InvalidField {
                field: "issue_date",
                rule: "a date written yyyy/MM/dd".into(),
            },
            "{bad:?}"
        );
    }
    for good in ["2024/02/29", "2026/11/25", "2026/12/31"] {
        let mut h = header();
        h.issue_date = good.into();
        fix_business_id(&mut h);
        assert_eq!(validate_header(&h), Ok(()), "{good}");
    }
    let err = refused(|h| h.due_date = "2026/02/29".into());
    assert_invalid_field(&err, "due_date");
}

#[test]
fn dates_are_written_with_digits_only() {
    // `str::parse::<u32>` accepts a leading '+', so these once passed as dates.
    for bad in ["2026/+2/05", "+026/02/05", "2026/02/+5"] {
        let err = refused(|h| {
            h.issue_date = bad.into();
            fix_business_id(h);
        });
        assert_invalid_field(&err, "issue_date");
        let err = refused(|h| h.due_date = bad.into());
        assert_invalid_field(&err, "due_date");
    }
}

#[test]
fn priority_and_steering_type_ranges() {
    let mut h = header();
    h.priority = 4;
    h.steering_type = 3;
    assert_eq!(validate_header(&h), Ok(()));
    assert_invalid_field(&refused(|h| h.priority = 5), "priority");
    assert_invalid_field(&refused(|h| h.steering_type = 4), "steering_type");
    assert_invalid_field(&refused(|h| h.business_type = 4), "business_type");
}

#[test]
fn business_id_must_match_its_parts() {
    let err = refused(|h| h.business_id = format!("{SENDER},2020/01/01,{NUMBER}/{NOTATION}"));
    assert_invalid_field(&err, "business_id");
    // Changing a part without rebuilding the id is caught too.
    let err = refused(|h| h.number = "13".into());
    assert_invalid_field(&err, "business_id");
    let err = refused(|h| h.notation = "UBND-TH".into());
    assert_invalid_field(&err, "business_id");
}

#[test]
fn attachment_names_are_plain_file_names() {
    for bad in [
        "../x",
        "a/b",
        "a\\b",
        "envelope.pb",
        "document.json",
        ".hidden",
        "..",
        "",
        "c:x",
        "tab\there",
        // Names a case-insensitive or Windows filesystem would refuse or confuse.
        "ENVELOPE.PB",
        "Document.Json",
        "CON",
        "nul.pdf",
        "com1.txt",
        "trailing-dot.",
        "trailing-space ",
    ] {
        let err = refused(|h| {
            let a = &mut h.attachments[1];
            a.name = bad.into();
        });
        assert_attachment(&err, 1, &bad.replace('\t', "?"));
    }
    // Vietnamese names with spaces are fine.
    let mut h = header();
    h.attachments[0].name = "Công văn số 12 (bản chính).pdf".into();
    assert_eq!(validate_header(&h), Ok(()));
}

#[test]
fn attachment_names_are_unique() {
    let err = refused(|h| {
        let copy = h.attachments[0].clone();
        h.attachments.push(copy);
    });
    assert_attachment(&err, 2, "cong-van-12.pdf");

    let err = refused(|h| h.attachments[1].name = h.attachments[0].name.clone());
    assert_attachment(&err, 1, "cong-van-12.pdf");

    // Names differing only in case collide on case-insensitive filesystems.
    let err = refused(|h| h.attachments[1].name = h.attachments[0].name.to_uppercase());
    assert_attachment(&err, 1, "CONG-VAN-12.PDF");
}

#[test]
fn attachment_digest_is_32_bytes() {
    let err = refused(|h| h.attachments[0].sha256.truncate(20));
    assert_attachment(&err, 0, "cong-van-12.pdf");
    let mut h = header();
    h.attachments
        .push(describe_attachment("empty.txt", "text/plain", b""));
    assert_eq!(validate_header(&h), Ok(()));
}

#[test]
fn recall_update_and_replace_refer_to_a_message() {
    for kind in [
        BusinessType::Recall,
        BusinessType::Update,
        BusinessType::Replace,
    ] {
        let err = refused(|h| h.business_type = kind as i32);
        assert_invalid_field(&err, "refers_to");
        let err = refused(|h| {
            h.business_type = kind as i32;
            h.refers_to = "not-a-uuid".into();
        });
        assert_invalid_field(&err, "refers_to");

        let mut h = header();
        h.business_type = kind as i32;
        h.refers_to = new_message_id();
        h.business_reason = "Sai số liệu".into();
        assert_eq!(validate_header(&h), Ok(()), "{kind:?}");
    }
    // A new document refers to nothing.
    let err = refused(|h| h.refers_to = new_message_id());
    assert_invalid_field(&err, "refers_to");
    // A recall says why.
    let err = refused(|h| {
        h.business_type = BusinessType::Recall as i32;
        h.refers_to = new_message_id();
    });
    assert_eq!(
        err,
        ProtocolError::MissingField {
            field: "business_reason"
        }
    );
}

#[test]
fn status_reports_carry_a_known_code_go_to_one_agency_and_give_reasons() {
    use lienthong_proto::pb::{DocumentKind, StatusReport};
    fn status(code: &str, reason: &str) -> impl Fn(&mut lienthong_proto::pb::DocumentHeader) {
        let (code, reason) = (code.to_owned(), reason.to_owned());
        move |h: &mut lienthong_proto::pb::DocumentHeader| {
            h.kind = DocumentKind::Status as i32;
            h.refers_to = new_message_id();
            h.recipients.truncate(1);
            h.attachments.clear();
            h.status = Some(StatusReport {
                code: code.clone(),
                reason: reason.clone(),
                ..Default::default()
            });
        }
    }
    for code in ["03", "04", "05", "06", "15"] {
        let mut h = header();
        status(code, "")(&mut h);
        assert_eq!(validate_header(&h), Ok(()), "{code}");
    }
    assert_invalid_field(&refused(status("07", "")), "status.code");
    assert_invalid_field(&refused(status("01", "")), "status.code");
    for code in ["02", "16"] {
        assert_eq!(
            refused(status(code, " ")),
            ProtocolError::MissingField {
                field: "status.reason"
            }
        );
        let mut h = header();
        status(code, "Không thuộc thẩm quyền")(&mut h);
        assert_eq!(validate_header(&h), Ok(()), "{code}");
    }
    let err = refused(|h| {
        status("03", "")(h);
        h.recipients.push("000.00.15.H31".into());
    });
    assert_invalid_field(&err, "recipients");
    let err = refused(|h| {
        h.status = Some(StatusReport {
            code: "03".into(),
            ..Default::default()
        })
    });
    assert_invalid_field(&err, "status");
    let err = refused(|h| {
        status("03", "")(h);
        h.refers_to.clear();
    });
    assert_invalid_field(&err, "refers_to");
}

#[test]
fn statuses_only_go_forward() {
    use lienthong_proto::document::status_may_follow;
    assert!(status_may_follow(None, "03"));
    assert!(status_may_follow(Some("03"), "04"));
    assert!(status_may_follow(Some("04"), "06"));
    assert!(!status_may_follow(Some("06"), "03"));
    assert!(!status_may_follow(Some("05"), "05"));
    assert!(
        !status_may_follow(Some("02"), "06"),
        "nothing follows a refusal"
    );
    assert!(
        !status_may_follow(Some("03"), "02"),
        "refused after accepted"
    );
}

#[test]
fn creation_and_expiry_times() {
    let err = refused(|h| h.created_at_ms = 0);
    assert_eq!(
        err,
        ProtocolError::MissingField {
            field: "created_at_ms"
        }
    );
    let err = refused(|h| h.expires_at_ms = h.created_at_ms);
    assert_invalid_field(&err, "expires_at_ms");
    let mut h = header();
    h.expires_at_ms = h.created_at_ms + 1;
    assert_eq!(validate_header(&h), Ok(()));
}

#[test]
fn seal_and_verify_apply_the_rules() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let mut bad = header();
    bad.priority = 5;
    let err = seal(&bad, &key).unwrap_err();
    assert_invalid_field(&err, "priority");

    // Signed by hand, the rule is still enforced on the receiving side.
    let envelope = key
        .sign(Domain::DocumentHeader, bad.encode_to_vec().into())
        .expect("sign");
    let err = verify_document(&envelope, &pki.anchors, VerifyTime::Now).unwrap_err();
    assert_invalid_field(&err, "priority");

    // Signed garbage that does not decode as a header.
    let envelope = key
        .sign(Domain::DocumentHeader, vec![0xff; 8].into())
        .expect("sign");
    let err = verify_document(&envelope, &pki.anchors, VerifyTime::Now).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Malformed {
                what: "document header",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn attachment_sizes_that_overflow_a_u64_and_times_past_year_9999_are_refused() {
    use lienthong_proto::document::{MAX_TIME_MS, total_attachment_bytes};
    let with_sizes = |sizes: &[u64]| {
        let mut h = header();
        h.attachments = sizes
            .iter()
            .enumerate()
            .map(|(i, size)| pb::AttachmentInfo {
                size: *size,
                ..describe_attachment(&format!("a{i}.pdf"), "application/pdf", b"x")
            })
            .collect();
        h
    };
    // Two sizes near 2^63 wrap to a tiny sum with plain addition.
    for sizes in [
        vec![1u64 << 63, 1u64 << 63],
        vec![u64::MAX, 1],
        vec![(1u64 << 63) + 5, (1u64 << 63) - 4, 1],
    ] {
        let h = with_sizes(&sizes);
        assert_eq!(total_attachment_bytes(&h), None, "{sizes:?}");
        assert_invalid_field(&validate_header(&h).unwrap_err(), "attachments.size");
    }
    // The largest sum that fits is a valid header (limits are the broker's business).
    let h = with_sizes(&[u64::MAX - 1, 1]);
    assert_eq!(total_attachment_bytes(&h), Some(u64::MAX));
    assert_eq!(validate_header(&h), Ok(()));

    let err = refused(|h| h.created_at_ms = MAX_TIME_MS + 1);
    assert_invalid_field(&err, "created_at_ms");
    let err = refused(|h| h.expires_at_ms = i64::MAX);
    assert_invalid_field(&err, "expires_at_ms");
    let mut h = header();
    h.expires_at_ms = MAX_TIME_MS;
    assert_eq!(validate_header(&h), Ok(()));
}
