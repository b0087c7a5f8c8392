//! Batch signatures (DESIGN section 4): many documents or receipts under one signature
//! over a Merkle root, each item verifiable alone, offline, with its inclusion proof; and
//! every way a batch item can be forged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Pki, RECIPIENT, SENDER, header, header_to};
use lienthong_certs_dev::KeyAlgorithm;
use lienthong_proto::document::{seal, seal_batch, verify_document};
use lienthong_proto::merkle::ProofError;
use lienthong_proto::pb::{Receipt, ReceiptKind};
use lienthong_proto::receipt::{ExpectedReceipt, sign_receipt, sign_receipts, verify_receipt};
use lienthong_proto::signing::{Domain, SignerRole, VerifyTime, verify_signed};
use lienthong_proto::{ProtocolError, now_ms};

fn headers(n: usize) -> Vec<lienthong_proto::pb::DocumentHeader> {
    (0..n).map(|_| header()).collect()
}

#[test]
fn every_document_of_a_batch_verifies_alone_and_a_batch_of_one_is_version_one() {
    let pki = Pki::new("lienthong test CA");
    for algorithm in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let key = pki.agency_key(SENDER, algorithm);
        for n in [1usize, 2, 3, 7, 64] {
            let headers = headers(n);
            let sealed = seal_batch(&headers, &key);
            assert_eq!(sealed.len(), n);
            let signatures: std::collections::HashSet<Vec<u8>> = sealed
                .iter()
                .map(|s| s.as_ref().unwrap().signature.clone())
                .collect();
            assert_eq!(signatures.len(), 1, "one signature for the whole batch");
            for (i, envelope) in sealed.iter().enumerate() {
                let envelope = envelope.as_ref().unwrap();
                assert_eq!(envelope.batch.is_some(), n > 1, "batch of {n}");
                // A fresh verifier (no cache) and the shared one both accept it.
                let fresh =
                    lienthong_proto::TrustAnchors::from_pem(pki.ca.cert_pem().as_bytes()).unwrap();
                for anchors in [&pki.anchors, &fresh] {
                    let verified = verify_document(envelope, anchors, VerifyTime::Now).unwrap();
                    assert_eq!(verified.header.message_id, headers[i].message_id);
                }
            }
        }
    }
}

#[test]
fn one_invalid_header_fails_alone() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let mut headers = headers(4);
    headers[1].subject = String::new();
    headers[2] = header_to(RECIPIENT, &[SENDER]); // another sender than the key's
    let sealed = seal_batch(&headers, &key);
    assert!(
        matches!(sealed[1], Err(ProtocolError::MissingField { .. })),
        "{:?}",
        sealed[1]
    );
    assert!(
        matches!(sealed[2], Err(ProtocolError::SignerNotSender { .. })),
        "{:?}",
        sealed[2]
    );
    for i in [0, 3] {
        let envelope = sealed[i].as_ref().unwrap();
        assert_eq!(envelope.batch.as_ref().unwrap().tree_size, 2);
        verify_document(envelope, &pki.anchors, VerifyTime::Now).unwrap();
    }
}

#[test]
fn forged_batch_items_fail_with_the_exact_error() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let sealed: Vec<_> = seal_batch(&headers(5), &key)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // Verify one first, so the root is in the cache: forgeries must still fail.
    verify_document(&sealed[0], &pki.anchors, VerifyTime::Now).unwrap();

    // Another document's bytes under this item's proof.
    let mut swapped = sealed[0].clone();
    swapped.payload = sealed[1].payload.clone();
    assert_eq!(
        verify_document(&swapped, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadSignature
    );
    // A single-signature header presented with a batch item's signature.
    let single = seal(&header(), &key).unwrap();
    let mut grafted = sealed[2].clone();
    grafted.payload = single.payload.clone();
    assert_eq!(
        verify_document(&grafted, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadSignature
    );
    // The proof dropped: the batch signature does not cover the payload directly.
    let mut stripped = sealed[3].clone();
    stripped.batch = None;
    assert_eq!(
        verify_document(&stripped, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadSignature
    );
    // A tampered path, index or size.
    let mut path = sealed[3].clone();
    path.batch.as_mut().unwrap().audit_path[0][0] ^= 1;
    assert_eq!(
        verify_document(&path, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadSignature
    );
    let mut index = sealed[3].clone();
    index.batch.as_mut().unwrap().leaf_index = 9;
    assert_eq!(
        verify_document(&index, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadBatchProof(ProofError::LeafIndex)
    );
    let mut size = sealed[3].clone();
    size.batch.as_mut().unwrap().tree_size = 6;
    assert_eq!(
        verify_document(&size, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadSignature
    );
    let mut huge = sealed[3].clone();
    huge.batch.as_mut().unwrap().tree_size = u64::MAX;
    assert_eq!(
        verify_document(&huge, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadBatchProof(ProofError::TreeSize)
    );
    let mut entry = sealed[3].clone();
    entry.batch.as_mut().unwrap().audit_path[1].push(0);
    assert_eq!(
        verify_document(&entry, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadBatchProof(ProofError::PathEntry)
    );
    // The same batch item checked as a receipt: the leaf binds the domain.
    assert_eq!(
        verify_signed(
            &sealed[4],
            Domain::Receipt,
            &pki.anchors,
            SignerRole::Agency,
            VerifyTime::Now
        )
        .unwrap_err(),
        ProtocolError::BadSignature
    );
    // Another agency's chain on a valid item.
    let other = pki.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    let mut chain = sealed[4].clone();
    chain.cert_chain = other.chain().iter().map(|c| c.to_vec()).collect();
    assert_eq!(
        verify_document(&chain, &pki.anchors, VerifyTime::Now).unwrap_err(),
        ProtocolError::BadSignature
    );
}

/// A batch-signed delivery receipt checked years later, at the receipt's own time,
/// after the signer's certificate expired: it still verifies, and a time outside the
/// certificate fails as a single signature would.
#[test]
fn batch_receipts_verify_offline_at_their_own_time() {
    let pki = Pki::new("lienthong test CA");
    let sender = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let recipient = pki.agency_key(RECIPIENT, KeyAlgorithm::EcdsaP256);
    let documents: Vec<_> = seal_batch(&headers(3), &sender)
        .into_iter()
        .map(|s| verify_document(&s.unwrap(), &pki.anchors, VerifyTime::Now).unwrap())
        .collect();
    let receipts: Vec<Receipt> = documents
        .iter()
        .map(|d| Receipt {
            kind: ReceiptKind::Delivery as i32,
            message_id: d.header.message_id.clone(),
            header_sha256: d.header_sha256.to_vec(),
            at_ms: now_ms(),
            issuer: RECIPIENT.into(),
            recipient: RECIPIENT.into(),
            ..Default::default()
        })
        .collect();
    let signed = sign_receipts(&receipts, &recipient).unwrap();
    assert_eq!(signed.len(), 3);
    for (document, receipt) in documents.iter().zip(&signed) {
        let expected = ExpectedReceipt {
            kind: ReceiptKind::Delivery,
            message_id: &document.header.message_id,
            header_sha256: &document.header_sha256,
            recipient: Some(RECIPIENT),
            live: false,
        };
        verify_receipt(receipt, &pki.anchors, &expected).unwrap();
        // Another document's receipt is a mismatch, never a pass.
        let next = documents
            .iter()
            .find(|d| d.header.message_id != document.header.message_id)
            .unwrap();
        let other = ExpectedReceipt {
            message_id: &next.header.message_id,
            ..expected.clone()
        };
        assert!(verify_receipt(receipt, &pki.anchors, &other).is_err());
    }
    // Dated ten years ahead (the certificate has expired by then), batch-signed.
    let mut late = receipts.clone();
    for r in &mut late {
        r.at_ms = now_ms() + 10 * 366 * 24 * 3600 * 1000;
    }
    let signed = sign_receipts(&late, &recipient).unwrap();
    let expected = ExpectedReceipt {
        kind: ReceiptKind::Delivery,
        message_id: &documents[0].header.message_id,
        header_sha256: &documents[0].header_sha256,
        recipient: Some(RECIPIENT),
        live: false,
    };
    assert_eq!(
        verify_receipt(&signed[0], &pki.anchors, &expected),
        Err(ProtocolError::CertificateExpired)
    );
    // A batch of one is the single-signature format, byte for byte the same shape.
    let one = sign_receipts(&receipts[..1], &recipient).unwrap();
    assert!(one[0].batch.is_none());
    let single = sign_receipt(&receipts[0], &recipient).unwrap();
    assert_eq!(one[0].payload, single.payload);
    assert!(sign_receipts(&[], &recipient).unwrap().is_empty());
}
