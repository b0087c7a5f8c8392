//! Submission and delivery receipts: signing, verification, and every way a receipt
//! can fail to be evidence for a given document.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{OTHER, Pki, RECIPIENT, SENDER, flip_bit, header};
use lienthong_certs_dev::KeyAlgorithm;
use lienthong_proto::document::{VerifiedDocument, seal, verify_document};
use lienthong_proto::pb::{Receipt, ReceiptKind};
use lienthong_proto::receipt::{ExpectedReceipt, sign_receipt, verify_receipt};
use lienthong_proto::signing::{Domain, VerifyTime};
use lienthong_proto::{ProtocolError, now_ms};
use prost::Message;

/// A document sealed by [`SENDER`] and verified, as a recipient would hold it.
fn verified_document(pki: &Pki) -> VerifiedDocument {
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let envelope = seal(&header(), &key).expect("seal");
    verify_document(&envelope, &pki.anchors, VerifyTime::Now).expect("verify")
}

fn receipt(kind: ReceiptKind, doc: &VerifiedDocument, recipient: &str, issuer: &str) -> Receipt {
    Receipt {
        kind: kind as i32,
        message_id: doc.header.message_id.clone(),
        header_sha256: doc.header_sha256.to_vec(),
        at_ms: now_ms(),
        issuer: issuer.to_owned(),
        business_id: doc.header.business_id.clone(),
        sender: doc.header.sender.clone(),
        recipient: recipient.to_owned(),
        ..Default::default()
    }
}

fn expected<'a>(
    kind: ReceiptKind,
    doc: &'a VerifiedDocument,
    recipient: Option<&'a str>,
) -> ExpectedReceipt<'a> {
    ExpectedReceipt {
        kind,
        message_id: &doc.header.message_id,
        header_sha256: &doc.header_sha256,
        recipient,
        live: true,
    }
}

#[test]
fn delivery_receipt_signed_by_recipient_verifies() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);
    for algorithm in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let recipient_key = pki.agency_key(RECIPIENT, algorithm);
        let body = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
        let signed = sign_receipt(&body, &recipient_key).expect("sign receipt");
        assert_eq!(signed.payload.as_ref(), body.encode_to_vec().as_slice());

        let live = expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT));
        assert_eq!(
            verify_receipt(&signed, &pki.anchors, &live).expect("live"),
            body
        );
        // Checked later as evidence, at the receipt's own time.
        let later = ExpectedReceipt {
            live: false,
            ..live.clone()
        };
        assert_eq!(
            verify_receipt(&signed, &pki.anchors, &later).expect("later"),
            body
        );
    }
}

#[test]
fn submission_receipt_signed_by_broker_verifies() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);
    let broker_key = pki.broker_key();
    let body = receipt(ReceiptKind::Submission, &doc, "", "broker:central");
    let signed = sign_receipt(&body, &broker_key).expect("sign receipt");
    let exp = expected(ReceiptKind::Submission, &doc, None);
    assert_eq!(
        verify_receipt(&signed, &pki.anchors, &exp).expect("verify"),
        body
    );
}

#[test]
fn signer_role_must_fit_the_receipt_kind() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);

    // An agency (clientAuth) cannot sign a submission receipt.
    let agency_key = pki.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    let body = receipt(ReceiptKind::Submission, &doc, "", "broker:central");
    let signed = sign_receipt(&body, &agency_key).expect("sign");
    let err = verify_receipt(
        &signed,
        &pki.anchors,
        &expected(ReceiptKind::Submission, &doc, None),
    )
    .unwrap_err();
    assert!(
        matches!(err, ProtocolError::CertificateInvalid { .. }),
        "{err:?}"
    );

    // The broker (serverAuth) cannot sign a delivery receipt.
    let broker_key = pki.broker_key();
    let body = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
    let signed = sign_receipt(&body, &broker_key).expect("sign");
    let err = verify_receipt(
        &signed,
        &pki.anchors,
        &expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT)),
    )
    .unwrap_err();
    assert!(
        matches!(err, ProtocolError::CertificateInvalid { .. }),
        "{err:?}"
    );
}

#[test]
fn flipped_bit_in_receipt_payload_is_bad_signature() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);
    let recipient_key = pki.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    let body = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
    let signed = sign_receipt(&body, &recipient_key).expect("sign receipt");
    let exp = expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT));

    // Flip a bit inside the header digest bytes (the last field bytes of the
    // payload are the recipient text; a digest byte keeps the receipt decodable).
    let payload = signed.payload.to_vec();
    let digest_at = payload
        .windows(32)
        .position(|w| w == doc.header_sha256)
        .expect("digest in payload");
    for index in [digest_at, digest_at + 31, payload.len() - 1] {
        let mut tampered = signed.clone();
        let mut bytes = payload.clone();
        flip_bit(&mut bytes, index);
        tampered.payload = bytes.into();
        assert_eq!(
            verify_receipt(&tampered, &pki.anchors, &exp),
            Err(ProtocolError::BadSignature),
            "bit flipped at byte {index}"
        );
    }

    let mut tampered = signed.clone();
    flip_bit(&mut tampered.signature, 10);
    assert_eq!(
        verify_receipt(&tampered, &pki.anchors, &exp),
        Err(ProtocolError::BadSignature)
    );
}

#[test]
fn receipt_for_another_document_is_a_mismatch() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);
    let recipient_key = pki.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    let body = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
    let signed = sign_receipt(&body, &recipient_key).expect("sign receipt");
    let exp = expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT));

    let other_id = lienthong_proto::document::new_message_id();
    assert_eq!(
        verify_receipt(
            &signed,
            &pki.anchors,
            &ExpectedReceipt {
                message_id: &other_id,
                ..exp.clone()
            }
        ),
        Err(ProtocolError::ReceiptMismatch {
            field: "message_id"
        })
    );

    let mut other_digest = doc.header_sha256;
    other_digest[0] ^= 0x80;
    assert_eq!(
        verify_receipt(
            &signed,
            &pki.anchors,
            &ExpectedReceipt {
                header_sha256: &other_digest,
                ..exp.clone()
            }
        ),
        Err(ProtocolError::ReceiptMismatch {
            field: "header_sha256"
        })
    );

    assert_eq!(
        verify_receipt(
            &signed,
            &pki.anchors,
            &ExpectedReceipt {
                recipient: Some(OTHER),
                ..exp.clone()
            }
        ),
        Err(ProtocolError::ReceiptMismatch { field: "recipient" })
    );

    // A delivery receipt is not a submission receipt, even when the role check passes:
    // the kind is compared after the chain (checked for an agency here).
    assert_eq!(
        verify_receipt(
            &signed,
            &pki.anchors,
            &ExpectedReceipt {
                kind: ReceiptKind::Unspecified,
                ..exp.clone()
            }
        ),
        Err(ProtocolError::ReceiptMismatch { field: "kind" })
    );
}

#[test]
fn delivery_receipt_from_the_wrong_agency() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);
    let intruder_key = pki.agency_key(OTHER, KeyAlgorithm::EcdsaP256);
    let exp = expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT));

    // Agency C signs a receipt that honestly names itself as the recipient: the
    // receipt's own `recipient` field is compared first.
    let honest = receipt(ReceiptKind::Delivery, &doc, OTHER, OTHER);
    let signed = sign_receipt(&honest, &intruder_key).expect("sign receipt");
    assert_eq!(
        verify_receipt(&signed, &pki.anchors, &exp),
        Err(ProtocolError::ReceiptMismatch { field: "recipient" })
    );

    // Agency C signs a receipt claiming to be from B: the signer's certificate decides.
    let forged = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
    let signed = sign_receipt(&forged, &intruder_key).expect("sign receipt");
    assert_eq!(
        verify_receipt(&signed, &pki.anchors, &exp),
        Err(ProtocolError::ReceiptSigner {
            signer: format!("agency {OTHER}"),
            expected: RECIPIENT.to_owned(),
        })
    );
}

#[test]
fn document_domain_signature_is_not_a_receipt_signature() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);
    let recipient_key = pki.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    let body = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
    let exp = expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT));
    let wrong_domain = recipient_key
        .sign(Domain::DocumentHeader, body.encode_to_vec().into())
        .expect("sign");
    assert_eq!(
        verify_receipt(&wrong_domain, &pki.anchors, &exp),
        Err(ProtocolError::BadSignature)
    );
    let right_domain = recipient_key
        .sign(Domain::Receipt, body.encode_to_vec().into())
        .expect("sign");
    assert_eq!(verify_receipt(&right_domain, &pki.anchors, &exp), Ok(body));
}

#[test]
fn receipt_from_a_rogue_ca_is_unknown_issuer() {
    let pki = Pki::new("lienthong test CA");
    let rogue = Pki::new("rogue CA");
    let doc = verified_document(&pki);
    let rogue_key = rogue.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    let body = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
    let signed = sign_receipt(&body, &rogue_key).expect("sign receipt");
    assert_eq!(
        verify_receipt(
            &signed,
            &pki.anchors,
            &expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT))
        ),
        Err(ProtocolError::UnknownIssuer)
    );
}

#[test]
fn receipt_time_outside_the_chain_validity_fails_later_checks() {
    let pki = Pki::new("lienthong test CA");
    let doc = verified_document(&pki);
    let recipient_key = pki.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    // A receipt dated ten years ahead: the certificate has expired by then.
    let mut body = receipt(ReceiptKind::Delivery, &doc, RECIPIENT, RECIPIENT);
    body.at_ms = now_ms() + 10 * 366 * 24 * 3600 * 1000;
    let signed = sign_receipt(&body, &recipient_key).expect("sign receipt");
    let later = ExpectedReceipt {
        live: false,
        ..expected(ReceiptKind::Delivery, &doc, Some(RECIPIENT))
    };
    assert_eq!(
        verify_receipt(&signed, &pki.anchors, &later),
        Err(ProtocolError::CertificateExpired)
    );
    // Dated before the certificate existed.
    body.at_ms = now_ms() - 10 * 24 * 3600 * 1000;
    let signed = sign_receipt(&body, &recipient_key).expect("sign receipt");
    assert_eq!(
        verify_receipt(&signed, &pki.anchors, &later),
        Err(ProtocolError::CertificateNotYetValid)
    );
}
