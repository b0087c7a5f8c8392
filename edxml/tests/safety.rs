//! Hostile input: DTDs and entities are refused, limits hold, and no input panics.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_edxml::{EdxmlError, Limits, parse_document, parse_message, parse_status};
use proptest::prelude::*;

const NS: &str = "http://www.mic.gov.vn/TBT/QCVN_102_2016";

fn valid() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/corpus/valid/attachments-vietnamese-names.edxml"
    ))
    .unwrap()
}

#[test]
fn billion_laughs_is_refused_before_expansion() {
    let xml = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE lolz [<!ENTITY lol \"lol\"><!ENTITY lol2 \"&lol;&lol;&lol;&lol;\">]><edXML xmlns=\"{NS}\"><edXMLEnvelope>&lol2;</edXMLEnvelope></edXML>"
    );
    assert_eq!(
        parse_document(xml.as_bytes(), &Limits::default()),
        Err(EdxmlError::DtdRefused)
    );
}

#[test]
fn external_entity_in_attribute_is_refused() {
    let xml = format!("<edXML xmlns=\"{NS}\" a=\"&xxe;\"/>");
    assert_eq!(
        parse_document(xml.as_bytes(), &Limits::default()),
        Err(EdxmlError::EntityRefused { name: "xxe".into() })
    );
}

#[test]
fn package_and_attachment_limits() {
    let xml = valid();
    let small = Limits {
        max_package_bytes: 100,
        ..Limits::default()
    };
    assert_eq!(
        parse_document(&xml, &small),
        Err(EdxmlError::TooLarge {
            what: "package",
            limit: 100
        })
    );
    let tiny_attachment = Limits {
        max_attachment_bytes: 10,
        ..Limits::default()
    };
    assert_eq!(
        parse_document(&xml, &tiny_attachment),
        Err(EdxmlError::TooLarge {
            what: "attachment",
            limit: 10
        })
    );
    let few = Limits {
        max_attachments: 2,
        ..Limits::default()
    };
    assert_eq!(
        parse_document(&xml, &few),
        Err(EdxmlError::TooMany {
            what: "attachments",
            limit: 2
        })
    );
    let deep = format!("<edXML xmlns=\"{NS}\">{}", "<a>".repeat(100));
    assert_eq!(
        parse_document(deep.as_bytes(), &Limits::default()),
        Err(EdxmlError::TooMany {
            what: "nesting levels",
            limit: 32
        })
    );
}

#[test]
fn non_utf8_encoding_is_refused() {
    let xml = format!("<?xml version=\"1.0\" encoding=\"windows-1258\"?><edXML xmlns=\"{NS}\"/>");
    let error = parse_document(xml.as_bytes(), &Limits::default()).unwrap_err();
    assert_eq!(error.kind(), "XmlSyntax", "{error}");
}

#[test]
fn mutated_inputs_never_panic() {
    // Deterministic mutations of a valid package: truncation, byte flips, deletions.
    let base = valid();
    let limits = Limits::default();
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for cut in (0..base.len()).step_by(7) {
        let _ = parse_document(&base[..cut], &limits);
    }
    for _ in 0..3000 {
        let mut bytes = base.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % bytes.len();
            match next() % 3 {
                0 => bytes[at] = next() as u8,
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, b"<>&;/\"'#x"[(next() % 9) as usize]),
            }
        }
        let _ = parse_document(&bytes, &limits);
        let _ = parse_status(&bytes, &limits);
        let _ = parse_message(&bytes, &limits);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_message(&bytes, &Limits::default());
    }

    #[test]
    fn arbitrary_text_in_subject_never_panics(subject in "\\PC{0,40}") {
        let xml = String::from_utf8(valid()).unwrap()
            .replace("Về việc triển khai liên thông văn bản", &subject);
        let _ = parse_document(xml.as_bytes(), &Limits::default());
    }
}
