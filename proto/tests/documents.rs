//! Sealing and verifying document envelopes: round trips for every algorithm the dev
//! PKI can mint, tampering with the header bytes, the signature, the certificate chain
//! and the attachments, and domain separation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Pki, RECIPIENT, SENDER, attachment_bodies, flip_bit, header};
use lienthong_certs_dev::{KeyAlgorithm, LeafSpec};
use lienthong_proto::document::{AttachmentCheck, check_attachment, seal, verify_document};
use lienthong_proto::pb::SignatureAlgorithm;
use lienthong_proto::signing::{Domain, VerifyTime};
use lienthong_proto::{AgencyCode, ProtocolError, sha256};
use prost::Message;

// RSA is accepted by `SigningKey` and by verification, but ring (and so rcgen) cannot
// generate RSA keys, so the dev PKI mints only ECDSA P-256, ECDSA P-384 and Ed25519.
// RSA is therefore not covered by a round trip here.
#[test]
fn round_trip_every_mintable_algorithm() {
    let pki = Pki::new("lienthong test CA");
    for (algorithm, expected) in [
        (KeyAlgorithm::EcdsaP256, SignatureAlgorithm::EcdsaP256Sha256),
        (KeyAlgorithm::EcdsaP384, SignatureAlgorithm::EcdsaP384Sha384),
        (KeyAlgorithm::Ed25519, SignatureAlgorithm::Ed25519),
    ] {
        let key = pki.agency_key(SENDER, algorithm);
        assert_eq!(key.algorithm(), expected);
        let header = header();
        let envelope = seal(&header, &key).expect("seal");
        assert_eq!(envelope.algorithm, expected as i32);
        assert_eq!(envelope.cert_chain.len(), 1);
        assert_eq!(envelope.payload.as_ref(), header.encode_to_vec().as_slice());

        let verified =
            verify_document(&envelope, &pki.anchors, VerifyTime::Now).expect("verify document");
        assert_eq!(verified.header, header, "{algorithm:?}");
        assert_eq!(verified.header_sha256, sha256(&envelope.payload));
        assert_eq!(verified.sender, AgencyCode::parse(SENDER).expect("code"));
        assert_eq!(verified.sender.as_str(), SENDER);

        // The attachments described in the header check out against their bytes.
        for (index, (_, _, bytes)) in attachment_bodies().iter().enumerate() {
            check_attachment(index, &verified.header.attachments[index], bytes)
                .expect("attachment matches");
        }
    }
}

#[test]
fn flipped_bit_in_header_bytes_is_bad_signature() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let envelope = seal(&header(), &key).expect("seal");
    // Every position, not just one: the prefix, the middle, the last byte.
    let len = envelope.payload.len();
    for index in [0, len / 2, len - 1] {
        let mut tampered = envelope.clone();
        let mut payload = tampered.payload.to_vec();
        flip_bit(&mut payload, index);
        tampered.payload = payload.into();
        assert_eq!(
            verify_document(&tampered, &pki.anchors, VerifyTime::Now).map(|_| ()),
            Err(ProtocolError::BadSignature),
            "bit flipped at byte {index}"
        );
    }
}

#[test]
fn flipped_bit_in_signature_is_bad_signature() {
    let pki = Pki::new("lienthong test CA");
    for algorithm in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let key = pki.agency_key(SENDER, algorithm);
        let envelope = seal(&header(), &key).expect("seal");
        let last = envelope.signature.len() - 1;
        let mut tampered = envelope.clone();
        flip_bit(&mut tampered.signature, last);
        assert_eq!(
            verify_document(&tampered, &pki.anchors, VerifyTime::Now).map(|_| ()),
            Err(ProtocolError::BadSignature),
            "{algorithm:?}"
        );
        // An empty signature fails the same way.
        let mut empty = envelope.clone();
        empty.signature.clear();
        assert_eq!(
            verify_document(&empty, &pki.anchors, VerifyTime::Now).map(|_| ()),
            Err(ProtocolError::BadSignature),
            "{algorithm:?}"
        );
    }
}

#[test]
fn claimed_algorithm_must_fit_the_key() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let mut envelope = seal(&header(), &key).expect("seal");
    envelope.algorithm = SignatureAlgorithm::Ed25519 as i32;
    // The P-256 certificate key cannot check an Ed25519 signature.
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::AlgorithmMismatch)
    );
    // Nor a P-384 one (the curve is part of the algorithm).
    envelope.algorithm = SignatureAlgorithm::EcdsaP384Sha384 as i32;
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::AlgorithmMismatch)
    );

    envelope.algorithm = SignatureAlgorithm::Unspecified as i32;
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::UnsupportedAlgorithm)
    );
    envelope.algorithm = 99;
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::UnsupportedAlgorithm)
    );
}

#[test]
fn empty_chain_is_no_certificate() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let mut envelope = seal(&header(), &key).expect("seal");
    envelope.cert_chain.clear();
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::NoCertificate)
    );
}

#[test]
fn receipt_domain_signature_is_not_a_document_signature() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let header = header();
    // The same bytes, signed by the right key, but under the receipt domain.
    let as_receipt = key
        .sign(Domain::Receipt, header.encode_to_vec().into())
        .expect("sign");
    assert_eq!(
        verify_document(&as_receipt, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::BadSignature)
    );
    // Signed under the document domain by hand, it verifies: only the domain differed.
    let as_document = key
        .sign(Domain::DocumentHeader, header.encode_to_vec().into())
        .expect("sign");
    let verified =
        verify_document(&as_document, &pki.anchors, VerifyTime::Now).expect("verify document");
    assert_eq!(verified.header, header);
}

#[test]
fn chain_leaf_swapped_for_another_agency_is_bad_signature() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    // Another agency's certificate from the same CA, with its own (different) key but
    // the same algorithm, and claiming the same agency code.
    let impostor = pki.issue(&LeafSpec::agency(SENDER));
    let other = pki.issue(&LeafSpec::agency(RECIPIENT));
    let envelope = seal(&header(), &key).expect("seal");
    for cert_der in [impostor.cert_der, other.cert_der] {
        let mut tampered = envelope.clone();
        tampered.cert_chain[0] = cert_der;
        assert_eq!(
            verify_document(&tampered, &pki.anchors, VerifyTime::Now).map(|_| ()),
            Err(ProtocolError::BadSignature)
        );
    }
}

#[test]
fn flipped_byte_in_attachment_names_its_index() {
    let header = header();
    for (index, (name, _, bytes)) in attachment_bodies().into_iter().enumerate() {
        let info = &header.attachments[index];
        check_attachment(index, info, &bytes).expect("untouched attachment");

        let mut tampered = bytes.clone();
        let middle = tampered.len() / 2;
        tampered[middle] ^= 0xff;
        let err = check_attachment(index, info, &tampered).unwrap_err();
        assert!(
            matches!(
                &err,
                ProtocolError::AttachmentMismatch { index: i, name: n, .. }
                    if *i == index && n == name
            ),
            "{err:?}"
        );
    }
}

#[test]
fn truncated_or_extended_attachment_fails() {
    let header = header();
    let bodies = attachment_bodies();
    let (name, _, bytes) = &bodies[1];
    let info = &header.attachments[1];

    let truncated = &bytes[..bytes.len() - 1];
    let err = check_attachment(1, info, truncated).unwrap_err();
    assert!(
        matches!(&err, ProtocolError::AttachmentMismatch { index: 1, name: n, .. } if n == name),
        "{err:?}"
    );

    let mut extended = bytes.clone();
    extended.push(0);
    let err = check_attachment(1, info, &extended).unwrap_err();
    assert!(
        matches!(&err, ProtocolError::AttachmentMismatch { index: 1, name: n, .. } if n == name),
        "{err:?}"
    );

    // Streaming: the extra byte is refused as soon as it arrives.
    let mut check = AttachmentCheck::new(1, info);
    check.update(&bytes[..100]).expect("first chunk");
    check.update(&bytes[100..]).expect("rest");
    let err = check.update(b"x").unwrap_err();
    assert!(
        matches!(err, ProtocolError::AttachmentMismatch { index: 1, .. }),
        "{err:?}"
    );

    // Streaming in chunks gives the same verdict as the whole-buffer check.
    let mut check = AttachmentCheck::new(1, info);
    for chunk in bytes.chunks(1000) {
        check.update(chunk).expect("chunk");
    }
    check.finish().expect("whole attachment in chunks");

    let mut check = AttachmentCheck::new(1, info);
    check.update(truncated).expect("short");
    let err = check.finish().unwrap_err();
    assert!(
        matches!(err, ProtocolError::AttachmentMismatch { index: 1, .. }),
        "{err:?}"
    );

    // Bytes of the other attachment do not pass for this one.
    let err = check_attachment(1, info, &bodies[0].2).unwrap_err();
    assert!(
        matches!(err, ProtocolError::AttachmentMismatch { index: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn oversized_header_is_refused_before_verification() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let mut envelope = seal(&header(), &key).expect("seal");
    envelope.payload = vec![0u8; lienthong_proto::document::MAX_HEADER_BYTES + 1].into();
    let err = verify_document(&envelope, &pki.anchors, VerifyTime::Now).unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::InvalidField {
                field: "header",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_remembered_chain_still_gets_every_signature_checked() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let envelope = seal(&header(), &key).expect("seal");
    // The first verification checks the chain and remembers it; the second uses that.
    verify_document(&envelope, &pki.anchors, VerifyTime::Now).expect("first");
    verify_document(&envelope, &pki.anchors, VerifyTime::Now).expect("second");
    // With the chain remembered, a tampered payload or signature is still refused.
    let mut payload = envelope.payload.to_vec();
    let middle = payload.len() / 2;
    flip_bit(&mut payload, middle);
    let mut tampered = envelope.clone();
    tampered.payload = payload.into();
    assert_eq!(
        verify_document(&tampered, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::BadSignature)
    );
    let mut tampered = envelope.clone();
    let last = tampered.signature.len() - 1;
    flip_bit(&mut tampered.signature, last);
    assert_eq!(
        verify_document(&tampered, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::BadSignature)
    );
    // Anchors of another CA never benefit from what these anchors remembered.
    let other = Pki::new("lienthong other CA");
    assert!(verify_document(&envelope, &other.anchors, VerifyTime::Now).is_err());
}
