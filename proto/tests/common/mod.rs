//! Helpers shared by the lienthong-proto integration tests: a throw-away CA, keys
//! loaded from freshly issued certificates, and a valid document header.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use lienthong_certs_dev::{DevCa, IssuedCert, KeyAlgorithm, LeafSpec};
use lienthong_proto::document::vietnam_date_today;
use lienthong_proto::document::{business_id, describe_attachment, new_message_id};
use lienthong_proto::{SigningKey, TrustAnchors, now_ms, pb};

/// The sending agency in most tests.
pub const SENDER: &str = "000.00.12.H31";
/// The receiving agency in most tests.
pub const RECIPIENT: &str = "000.00.13.H31";
/// A third agency, neither sender nor recipient.
pub const OTHER: &str = "000.00.14.H31";

pub const NUMBER: &str = "12";
pub const NOTATION: &str = "UBND-VP";

/// A development CA and the trust anchors made of its certificate.
pub struct Pki {
    pub ca: DevCa,
    pub anchors: TrustAnchors,
}

impl Pki {
    pub fn new(name: &str) -> Self {
        let ca = DevCa::generate(name).expect("generate CA");
        let anchors = TrustAnchors::from_pem(ca.cert_pem().as_bytes()).expect("anchors");
        Self { ca, anchors }
    }

    pub fn issue(&self, spec: &LeafSpec) -> IssuedCert {
        self.ca.issue(spec).expect("issue leaf")
    }

    /// An agency signing key (certificate from this CA) with the given algorithm.
    pub fn agency_key(&self, code: &str, algorithm: KeyAlgorithm) -> SigningKey {
        load_key(&self.issue(&LeafSpec::agency(code).with_key_algorithm(algorithm)))
    }

    /// A broker (serverAuth) signing key.
    pub fn broker_key(&self) -> SigningKey {
        load_key(&self.issue(&LeafSpec::server(&["localhost"])))
    }
}

pub fn load_key(issued: &IssuedCert) -> SigningKey {
    SigningKey::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).expect("load key")
}

/// The two attachments the test documents carry.
pub fn attachment_bodies() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        (
            "cong-van-12.pdf",
            "application/pdf",
            b"%PDF-1.7 c\xc3\xb4ng v\xc4\x83n s\xe1\xbb\x91 12".to_vec(),
        ),
        (
            "phu-luc.docx",
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
            (0u8..=255).cycle().take(4096).collect(),
        ),
    ]
}

/// A header that passes every rule, from `sender` to `recipients`.
pub fn header_to(sender: &str, recipients: &[&str]) -> pb::DocumentHeader {
    let issue_date = vietnam_date_today();
    pb::DocumentHeader {
        message_id: new_message_id(),
        sender: sender.to_owned(),
        recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        business_id: business_id(sender, &issue_date, NUMBER, NOTATION),
        number: NUMBER.to_owned(),
        notation: NOTATION.to_owned(),
        document_type: "CV".to_owned(),
        document_type_name: "Công văn".to_owned(),
        subject: "Về việc triển khai liên thông văn bản điện tử".to_owned(),
        issue_place: "Hà Nội".to_owned(),
        issue_date,
        created_at_ms: now_ms(),
        attachments: attachment_bodies()
            .iter()
            .map(|(name, media_type, bytes)| describe_attachment(name, media_type, bytes))
            .collect(),
        sender_name: "Văn phòng UBND".to_owned(),
        ..Default::default()
    }
}

/// A valid header from [`SENDER`] to [`RECIPIENT`].
pub fn header() -> pb::DocumentHeader {
    header_to(SENDER, &[RECIPIENT])
}

/// Flips the lowest bit of `bytes[index]`.
pub fn flip_bit(bytes: &mut [u8], index: usize) {
    bytes[index] ^= 0x01;
}
