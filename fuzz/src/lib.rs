//! Shared harness for the lienthong fuzz targets.
//!
//! Each `fuzz_*` function takes the raw fuzz input, drives the real decoding and
//! verification code of `lienthong-proto` with it, and asserts the invariants that must
//! hold whatever the bytes are. The fuzz targets in `fuzz_targets/` are one-line
//! wrappers, and `src/bin/seeds.rs` uses the same [`Fixture`] to write valid seeds.
//!
//! The fixture (a development CA, agency, broker and operator keys) is generated once
//! per process with `lienthong-certs-dev`. Its keys are random, but nothing an input can
//! reach depends on them: the structured modes below sign whatever the input supplies
//! with the fixture keys in the running process, so a saved crash input reproduces in a
//! fresh process.
//!
//! Input layouts (the first byte is a control byte where there is one):
//! - envelope: `ctl % 4` picks the mode. 0: the rest is a `Signed`, verified as is.
//!   1: the rest is header bytes, signed by the sender agency, then verified. 2: the rest
//!   is a `Signed` whose empty fields are filled from a valid envelope (an empty
//!   signature is re-made over the payload), then verified. 3: the rest is
//!   `[field, value...]`: one field of the valid header is replaced by `value`, the
//!   header is re-encoded, signed and verified.
//! - header: the whole input is `DocumentHeader` bytes.
//! - receipt: `ctl & 3` is the expected kind (unspecified, submission, delivery, dead
//!   letter), `ctl & 4` checks the chain now (live) rather than at the receipt's time,
//!   `(ctl >> 3) & 3` the mode: 0 a `Signed` as is, 1 receipt bytes signed by the key
//!   that kind needs, 2 a `Signed` with empty fields filled from a valid receipt,
//!   3 `Receipt` bytes decoded alone.
//! - cert_identity: the whole input is a DER certificate or a PEM bundle.

// The edXML and API harnesses need crates `lienthong-proto` does not have. They are left
// out when proto's replay test compiles this file as a module (under `cfg(test)`; this
// package itself never builds tests); edxml/ and agent/ replay them from their own
// tests, compiling each file as a module.
#[cfg(not(test))]
pub mod api_json;
#[cfg(not(test))]
pub mod edxml;

use std::path::{Component, Path};
use std::sync::OnceLock;

use bytes::Bytes;
use lienthong_certs_dev::{DevCa, KeyAlgorithm, LeafSpec};
use lienthong_proto::agency::is_valid_agency_code;
use lienthong_proto::document::{
    MAX_ATTACHMENTS, MAX_HEADER_BYTES, MAX_RECIPIENTS, business_id, describe_attachment,
    is_safe_file_name, is_valid_message_id, looks_like_agency_code, seal, validate_header,
    verify_document,
};
use lienthong_proto::pb::{
    BusinessType, DocumentHeader, Receipt, ReceiptKind, SignatureAlgorithm, Signed, SignerInfo,
};
use lienthong_proto::receipt::{ExpectedReceipt, sign_receipt, verify_receipt};
use lienthong_proto::signing::{Domain, VerifyTime, certs_from_pem};
use lienthong_proto::{AgencyCode, PeerIdentity, SigningKey, TrustAnchors, sha256};
use prost::Message;

/// The agency that signs the fixture document.
pub const SENDER: &str = "000.00.12.H31";
/// The first recipient; it signs delivery receipts.
pub const RECIPIENT: &str = "000.00.00.H31";
/// A second recipient.
pub const OTHER_RECIPIENT: &str = "000.01.12.H31";
/// The fixture document's message id.
pub const MESSAGE_ID: &str = "019e1a2b-3c4d-7e5f-8a9b-0c1d2e3f4a5b";

/// Keys and certificates made once per process, and the valid messages built with them.
pub struct Fixture {
    pub ca: DevCa,
    pub anchors: TrustAnchors,
    /// The CA certificate, PEM (a trust anchor bundle).
    pub ca_pem: String,
    pub sender_key: SigningKey,
    pub recipient_key: SigningKey,
    pub broker_key: SigningKey,
    pub sender_cert_der: Vec<u8>,
    pub sender_cert_pem: String,
    pub recipient_cert_der: Vec<u8>,
    pub broker_cert_der: Vec<u8>,
    pub operator_cert_der: Vec<u8>,
    pub header: DocumentHeader,
    /// The header encoded once: the signed payload of [`Fixture::envelope`].
    pub header_bytes: Vec<u8>,
    pub header_sha256: [u8; 32],
    pub envelope: Signed,
    /// When the fixture was made (Unix ms): a time inside every fixture certificate.
    pub at_ms: i64,
}

fn signing_key(cert_pem: &str, key_pem: &str) -> SigningKey {
    SigningKey::from_pem(cert_pem.as_bytes(), key_pem.as_bytes()).expect("fixture signing key")
}

/// The fixture document header: every field set, deterministic.
pub fn valid_header() -> DocumentHeader {
    let (issue_date, number, notation) = ("2026/05/04", "12", "UBND-VP");
    DocumentHeader {
        message_id: MESSAGE_ID.to_owned(),
        sender: SENDER.to_owned(),
        recipients: vec![RECIPIENT.to_owned(), OTHER_RECIPIENT.to_owned()],
        business_id: business_id(SENDER, issue_date, number, notation),
        number: number.to_owned(),
        notation: notation.to_owned(),
        document_type: "1".to_owned(),
        document_type_name: "Công văn".to_owned(),
        subject: "Về việc thử nghiệm liên thông văn bản".to_owned(),
        content: "Nội dung tóm tắt".to_owned(),
        issue_place: "Hà Nội".to_owned(),
        issue_date: issue_date.to_owned(),
        signer: Some(SignerInfo {
            competence: "TM. UBND".to_owned(),
            position: "Chủ tịch".to_owned(),
            full_name: "Nguyễn Văn A".to_owned(),
        }),
        priority: 1,
        steering_type: 1,
        due_date: "2026/06/01".to_owned(),
        business_type: BusinessType::New as i32,
        refers_to: String::new(),
        created_at_ms: 1_777_900_000_000,
        expires_at_ms: 0,
        attachments: vec![
            describe_attachment("cong-van.pdf", "application/pdf", b"%PDF-1.7 fuzz"),
            describe_attachment("phu-luc.docx", "application/msword", b"PK fuzz"),
        ],
        to_places: vec!["Như trên".to_owned(), "Lưu: VT".to_owned()],
        sender_name: "Văn phòng UBND".to_owned(),
        ..DocumentHeader::default()
    }
}

/// A valid receipt of `kind` for the fixture document, stamped `at_ms`.
pub fn valid_receipt(kind: ReceiptKind, at_ms: i64) -> Receipt {
    let header = valid_header();
    let header_sha256 = sha256(&header.encode_to_vec());
    let (issuer, recipient, outcome, reason) = match kind {
        ReceiptKind::Submission => ("broker:localhost", "", "", ""),
        ReceiptKind::Delivery => (RECIPIENT, RECIPIENT, "", ""),
        ReceiptKind::DeadLetter => ("broker:localhost", RECIPIENT, "expired", "no ack in 7 days"),
        ReceiptKind::Unspecified => (SENDER, "", "", ""),
    };
    Receipt {
        kind: kind as i32,
        message_id: MESSAGE_ID.to_owned(),
        header_sha256: header_sha256.to_vec(),
        at_ms,
        issuer: issuer.to_owned(),
        business_id: header.business_id,
        sender: SENDER.to_owned(),
        recipient: recipient.to_owned(),
        outcome: outcome.to_owned(),
        reason: reason.to_owned(),
    }
}

impl Fixture {
    fn generate() -> Self {
        let ca = DevCa::generate("lienthong fuzz CA").expect("fixture CA");
        let anchors = TrustAnchors::from_pem(ca.cert_pem().as_bytes()).expect("fixture anchors");
        let sender = ca.issue(&LeafSpec::agency(SENDER)).expect("sender cert");
        let recipient = ca
            .issue(&LeafSpec::agency(RECIPIENT).with_key_algorithm(KeyAlgorithm::Ed25519))
            .expect("recipient cert");
        let broker = ca
            .issue(&LeafSpec::server(&["localhost", "127.0.0.1"]))
            .expect("broker cert");
        let operator = ca.issue(&LeafSpec::operator("ops")).expect("operator cert");
        let sender_key = signing_key(&sender.cert_pem, &sender.key_pem);
        let header = valid_header();
        let envelope = seal(&header, &sender_key).expect("fixture envelope");
        let header_bytes = envelope.payload.to_vec();
        Fixture {
            ca_pem: ca.cert_pem().to_owned(),
            anchors,
            recipient_key: signing_key(&recipient.cert_pem, &recipient.key_pem),
            broker_key: signing_key(&broker.cert_pem, &broker.key_pem),
            sender_key,
            sender_cert_der: sender.cert_der,
            sender_cert_pem: sender.cert_pem,
            recipient_cert_der: recipient.cert_der,
            broker_cert_der: broker.cert_der,
            operator_cert_der: operator.cert_der,
            header_sha256: sha256(&header_bytes),
            header,
            header_bytes,
            envelope,
            at_ms: lienthong_proto::now_ms(),
            ca,
        }
    }

    /// The key that signs receipts of `kind`.
    pub fn receipt_key(&self, kind: ReceiptKind) -> &SigningKey {
        match kind {
            ReceiptKind::Submission | ReceiptKind::DeadLetter => &self.broker_key,
            ReceiptKind::Delivery => &self.recipient_key,
            ReceiptKind::Unspecified => &self.sender_key,
        }
    }
}

/// The process-wide fixture, made on first use.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::generate)
}

fn sign(key: &SigningKey, domain: Domain, payload: &[u8]) -> Signed {
    key.sign(domain, Bytes::copy_from_slice(payload))
        .expect("signing with a fixture key")
}

/// Fills the empty fields of `signed` from a valid signature by `key` over `default_payload`.
fn fill_defaults(signed: &mut Signed, key: &SigningKey, domain: Domain, default_payload: &[u8]) {
    if signed.payload.is_empty() {
        signed.payload = Bytes::copy_from_slice(default_payload);
    }
    if signed.algorithm == SignatureAlgorithm::Unspecified as i32 {
        signed.algorithm = key.algorithm() as i32;
    }
    if signed.cert_chain.is_empty() {
        signed.cert_chain = key.chain().iter().map(|c| c.to_vec()).collect();
    }
    if signed.signature.is_empty() {
        signed.signature = sign(key, domain, &signed.payload).signature;
    }
}

// ---------------------------------------------------------------------------------------
// envelope

/// Verifies `signed` as a document envelope and checks what an accepted one promises.
pub fn check_envelope(signed: &Signed) {
    let fx = fixture();
    match verify_document(signed, &fx.anchors, VerifyTime::Now) {
        Ok(doc) => {
            assert!(signed.payload.len() <= MAX_HEADER_BYTES);
            assert_eq!(doc.header_sha256, sha256(&signed.payload));
            assert_eq!(doc.sender.as_str(), doc.header.sender);
            assert!(validate_header(&doc.header).is_ok());
            // Only the fixture's sender key can sign an accepted envelope.
            assert_eq!(doc.sender.as_str(), SENDER);
            assert_eq!(
                DocumentHeader::decode(signed.payload.as_ref())
                    .ok()
                    .as_ref(),
                Some(&doc.header)
            );
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

/// Replaces one field of the valid header, picked by `selector`, with `value`.
pub fn mutate_header(header: &mut DocumentHeader, selector: u8, value: &[u8]) {
    let text = String::from_utf8_lossy(value).into_owned();
    let mut int = [0u8; 8];
    let n = value.len().min(8);
    int[..n].copy_from_slice(&value[..n]);
    let int = i64::from_le_bytes(int);
    let small = u32::try_from(int & 0xffff_ffff).unwrap_or(0);
    // Keep business_id consistent unless the selector's high bit asks not to, so the
    // fuzzer reaches the rules checked after it.
    let keep_business_id = selector & 0x80 == 0;
    match selector & 0x7f {
        0 => header.message_id = text,
        1 => header.sender = text,
        2 => header.recipients[0] = text,
        3 => header.recipients.push(text),
        4 => header.recipients.clear(),
        5 => header.business_id = text,
        6 => header.number = text,
        7 => header.notation = text,
        8 => header.document_type = text,
        9 => header.document_type_name = text,
        10 => header.subject = text,
        11 => header.content = text,
        12 => header.issue_place = text,
        13 => header.issue_date = text,
        14 => header.due_date = text,
        15 => header.refers_to = text,
        16 => header.sender_name = text,
        17 => header.to_places.push(text),
        18 => header.attachments[0].name = text,
        19 => header.attachments[1].media_type = text,
        20 => header.attachments[0].sha256 = value.to_vec(),
        21 => header.attachments[0].size = u64::from_le_bytes(int.to_le_bytes()),
        22 => {
            let mut extra = header.attachments[0].clone();
            extra.name = text;
            header.attachments.push(extra);
        }
        23 => header.priority = small,
        24 => header.steering_type = small,
        25 => header.business_type = i32::from_le_bytes(small.to_le_bytes()),
        26 => {
            header.business_type = BusinessType::Recall as i32;
            header.refers_to = text;
        }
        27 => header.created_at_ms = int,
        28 => header.expires_at_ms = int,
        29 => header.signer = None,
        30 => {
            if let Some(signer) = header.signer.as_mut() {
                signer.full_name = text;
            }
        }
        31 => {
            if let Some(signer) = header.signer.as_mut() {
                signer.competence = text;
            }
        }
        _ => {
            // Many recipients or attachments at once: the count limits.
            let count = usize::from(value.first().copied().unwrap_or(0)) * 8;
            for i in 0..count {
                header
                    .recipients
                    .push(format!("{:03}.{:02}.00.H31", i % 1000, i / 1000 % 100));
            }
        }
    }
    if keep_business_id {
        header.business_id = business_id(
            &header.sender,
            &header.issue_date,
            &header.number,
            &header.notation,
        );
    }
}

pub fn fuzz_envelope(data: &[u8]) {
    let fx = fixture();
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    match ctl % 4 {
        0 => {
            if let Ok(signed) = Signed::decode(rest) {
                check_envelope(&signed);
            }
        }
        1 => check_envelope(&sign(&fx.sender_key, Domain::DocumentHeader, rest)),
        2 => {
            if let Ok(mut signed) = Signed::decode(rest) {
                fill_defaults(
                    &mut signed,
                    &fx.sender_key,
                    Domain::DocumentHeader,
                    &fx.header_bytes,
                );
                check_envelope(&signed);
            }
        }
        _ => {
            let Some((&selector, value)) = rest.split_first() else {
                return;
            };
            let mut header = fx.header.clone();
            mutate_header(&mut header, selector, value);
            check_header(&header);
            let bytes = header.encode_to_vec();
            check_envelope(&sign(&fx.sender_key, Domain::DocumentHeader, &bytes));
        }
    }
}

// ---------------------------------------------------------------------------------------
// header

/// A safe file name joins a folder as exactly one plain path component.
fn assert_plain_file_name(name: &str) {
    let mut components = Path::new(name).components();
    assert_eq!(
        components.next(),
        Some(Component::Normal(name.as_ref())),
        "{name:?}"
    );
    assert_eq!(components.next(), None, "{name:?}");
}

/// Runs the header rules on a decoded header and checks they agree with the pieces.
pub fn check_header(header: &DocumentHeader) {
    for name in header.attachments.iter().map(|a| a.name.as_str()) {
        if is_safe_file_name(name) {
            assert_plain_file_name(name);
        }
    }
    for code in std::iter::once(&header.sender).chain(&header.recipients) {
        let parsed = AgencyCode::parse(code);
        assert_eq!(parsed.is_ok(), looks_like_agency_code(code));
        match parsed {
            Ok(code) => {
                if let Some(parent) = code.parent() {
                    assert!(is_valid_agency_code(parent.as_str()), "{parent}");
                }
            }
            Err(error) => {
                let _ = error.to_string();
            }
        }
    }
    let expected_business_id = business_id(
        &header.sender,
        &header.issue_date,
        &header.number,
        &header.notation,
    );
    match validate_header(header) {
        Ok(()) => {
            assert!(is_valid_message_id(&header.message_id));
            assert!(AgencyCode::parse(&header.sender).is_ok());
            assert!(!header.recipients.is_empty() && header.recipients.len() <= MAX_RECIPIENTS);
            assert!(
                header
                    .recipients
                    .iter()
                    .all(|r| AgencyCode::parse(r).is_ok())
            );
            assert!(!header.recipients.contains(&header.sender));
            assert_eq!(header.business_id, expected_business_id);
            assert!(header.attachments.len() <= MAX_ATTACHMENTS);
            for attachment in &header.attachments {
                assert!(is_safe_file_name(&attachment.name));
                assert_eq!(attachment.sha256.len(), 32);
            }
            assert!(header.created_at_ms > 0);
            // Whatever the rules accept, sealing and verifying accept too.
            if header.sender == SENDER {
                let fx = fixture();
                let envelope = seal(header, &fx.sender_key).expect("seal a valid header");
                let doc = verify_document(&envelope, &fx.anchors, VerifyTime::Now);
                match doc {
                    Ok(doc) => assert_eq!(&doc.header, header),
                    Err(error) => {
                        // Only the size cap may refuse what validate_header accepted.
                        assert!(envelope.payload.len() > MAX_HEADER_BYTES, "{error}");
                    }
                }
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

pub fn fuzz_header(data: &[u8]) {
    if let Ok(header) = DocumentHeader::decode(data) {
        check_header(&header);
        // Decoding what prost encodes gives the same header back.
        let again = DocumentHeader::decode(header.encode_to_vec().as_slice());
        assert_eq!(again.ok().as_ref(), Some(&header));
    }
}

// ---------------------------------------------------------------------------------------
// receipt

fn receipt_kind(ctl: u8) -> ReceiptKind {
    match ctl & 3 {
        0 => ReceiptKind::Unspecified,
        1 => ReceiptKind::Submission,
        2 => ReceiptKind::Delivery,
        _ => ReceiptKind::DeadLetter,
    }
}

fn check_receipt(signed: &Signed, kind: ReceiptKind, live: bool) {
    let fx = fixture();
    let recipient = match kind {
        ReceiptKind::Delivery | ReceiptKind::DeadLetter => Some(RECIPIENT),
        _ => None,
    };
    let expected = ExpectedReceipt {
        kind,
        message_id: MESSAGE_ID,
        header_sha256: &fx.header_sha256,
        recipient,
        live,
    };
    match verify_receipt(signed, &fx.anchors, &expected) {
        Ok(receipt) => {
            assert_eq!(receipt.kind, kind as i32);
            assert_eq!(receipt.message_id, MESSAGE_ID);
            assert_eq!(receipt.header_sha256, fx.header_sha256);
            if let Some(recipient) = recipient {
                assert_eq!(receipt.recipient, recipient);
            }
            assert_eq!(
                Receipt::decode(signed.payload.as_ref()).ok().as_ref(),
                Some(&receipt)
            );
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

pub fn fuzz_receipt(data: &[u8]) {
    let fx = fixture();
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let kind = receipt_kind(ctl);
    let live = ctl & 4 != 0;
    let key = fx.receipt_key(kind);
    match (ctl >> 3) & 3 {
        0 => {
            if let Ok(signed) = Signed::decode(rest) {
                check_receipt(&signed, kind, live);
            }
        }
        1 => check_receipt(&sign(key, Domain::Receipt, rest), kind, live),
        2 => {
            if let Ok(mut signed) = Signed::decode(rest) {
                let default = valid_receipt(kind, fx.at_ms).encode_to_vec();
                fill_defaults(&mut signed, key, Domain::Receipt, &default);
                check_receipt(&signed, kind, live);
            }
        }
        _ => {
            if let Ok(receipt) = Receipt::decode(rest) {
                let again = Receipt::decode(receipt.encode_to_vec().as_slice());
                assert_eq!(again.ok().as_ref(), Some(&receipt));
                let _ = lienthong_proto::rfc3339_ms(receipt.at_ms);
                // A receipt the broker signs verifies whatever its fields say.
                let signed = sign_receipt(&receipt, key).expect("sign a receipt");
                check_receipt(&signed, kind, true);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// cert_identity

fn check_identity(der: &[u8]) {
    match PeerIdentity::from_cert_der(der) {
        Ok(PeerIdentity::Agency(code)) => assert!(is_valid_agency_code(code.as_str())),
        Ok(PeerIdentity::Operator(name)) => {
            assert!(!name.is_empty() && !name.chars().any(char::is_control));
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}

pub fn fuzz_cert_identity(data: &[u8]) {
    check_identity(data);
    match TrustAnchors::from_pem(data) {
        Ok(anchors) => {
            let _ = format!("{anchors:?}");
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
    match certs_from_pem(data, "fuzz certificates") {
        Ok(certs) => {
            assert!(!certs.is_empty());
            for cert in certs.iter().take(16) {
                check_identity(cert);
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
}
