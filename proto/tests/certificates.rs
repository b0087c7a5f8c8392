//! Signer certificates: the issuer, validity, extended key usage and the lienthong
//! identity in the SAN URI; identities of peers; loading TLS PEM files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{Pki, RECIPIENT, SENDER, header, header_to, load_key};
use lienthong_certs_dev::{KeyAlgorithm, LeafSpec, agency_uri};
use lienthong_proto::document::{seal, verify_document};
use lienthong_proto::signing::{Domain, VerifyTime};
use lienthong_proto::tls::TlsFiles;
use lienthong_proto::{AgencyCode, PeerIdentity, ProtocolError, now_ms};
use prost::Message;

#[test]
fn signer_from_a_rogue_ca_is_unknown_issuer() {
    let pki = Pki::new("lienthong test CA");
    let rogue = Pki::new("rogue CA");
    let rogue_key = rogue.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let envelope = seal(&header(), &rogue_key).expect("seal works without anchors");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::UnknownIssuer)
    );
    // Under its own CA it verifies: only the issuer was wrong.
    verify_document(&envelope, &rogue.anchors, VerifyTime::Now).expect("own CA");
}

#[test]
fn rogue_ca_with_the_trusted_ca_name_is_refused() {
    // A rogue CA copying the trusted CA's subject name: webpki finds an anchor with
    // the right name whose key does not verify the leaf, and reports that (ranked
    // above UnknownIssuer) as an invalid signature on the chain.
    let pki = Pki::new("lienthong test CA");
    let rogue = Pki::new("lienthong test CA");
    let rogue_key = rogue.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    let envelope = seal(&header(), &rogue_key).expect("seal");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::CertificateInvalid {
            detail: "InvalidSignatureForPublicKey".to_owned()
        })
    );
}

#[test]
fn expired_signer_is_certificate_expired() {
    let pki = Pki::new("lienthong test CA");
    let issued = pki.issue(&LeafSpec::agency(SENDER).expired());
    let key = load_key(&issued); // loading the key does not look at validity
    let envelope = seal(&header(), &key).expect("sealing does not either");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::CertificateExpired)
    );
    // Checked at a time inside the certificate's validity (10 days ago), it verifies.
    let ten_days_ago = now_ms() - 10 * 24 * 3600 * 1000;
    verify_document(&envelope, &pki.anchors, VerifyTime::AtMs(ten_days_ago))
        .expect("valid at that time");
}

#[test]
fn signer_not_yet_valid() {
    let pki = Pki::new("lienthong test CA");
    let now = time::OffsetDateTime::now_utc();
    let issued = pki.issue(&LeafSpec::agency(SENDER).with_validity(
        now + time::Duration::days(1),
        now + time::Duration::days(30),
    ));
    let envelope = seal(&header(), &load_key(&issued)).expect("seal");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::CertificateNotYetValid)
    );
}

#[test]
fn signer_must_be_the_sender() {
    let pki = Pki::new("lienthong test CA");
    let key = pki.agency_key(SENDER, KeyAlgorithm::EcdsaP256);
    // Claims to come from RECIPIENT, signed with SENDER's key.
    let forged = header_to(RECIPIENT, &[SENDER]);
    let expected = ProtocolError::SignerNotSender {
        signer: format!("agency {SENDER}"),
        sender: RECIPIENT.to_owned(),
    };
    assert_eq!(seal(&forged, &key).map(|_| ()), Err(expected.clone()));

    let envelope = key
        .sign(Domain::DocumentHeader, forged.encode_to_vec().into())
        .expect("sign");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(expected)
    );
}

#[test]
fn operator_cannot_sign_documents() {
    let pki = Pki::new("lienthong test CA");
    let key = load_key(&pki.issue(&LeafSpec::operator("op")));
    let expected = ProtocolError::SignerNotSender {
        signer: "operator op".to_owned(),
        sender: SENDER.to_owned(),
    };
    assert_eq!(seal(&header(), &key).map(|_| ()), Err(expected.clone()));
    let envelope = key
        .sign(Domain::DocumentHeader, header().encode_to_vec().into())
        .expect("sign");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(expected)
    );
}

#[test]
fn certificate_without_uri_is_no_identity() {
    let pki = Pki::new("lienthong test CA");
    let issued = pki.issue(&LeafSpec::agency(SENDER).without_uri());
    assert_eq!(
        PeerIdentity::from_cert_der(&issued.cert_der),
        Err(ProtocolError::NoIdentity)
    );
    let key = load_key(&issued);
    assert_eq!(key.identity(), Err(ProtocolError::NoIdentity));
    assert_eq!(
        seal(&header(), &key).map(|_| ()),
        Err(ProtocolError::NoIdentity)
    );
    let envelope = key
        .sign(Domain::DocumentHeader, header().encode_to_vec().into())
        .expect("sign");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(ProtocolError::NoIdentity)
    );
}

#[test]
fn malformed_agency_uri_is_invalid_agency_code() {
    let pki = Pki::new("lienthong test CA");
    let issued = pki.issue(&LeafSpec::agency(SENDER).with_uri("urn:lienthong:agency:XYZ"));
    let expected = ProtocolError::InvalidAgencyCode {
        code: "XYZ".to_owned(),
    };
    assert_eq!(
        PeerIdentity::from_cert_der(&issued.cert_der),
        Err(expected.clone())
    );
    let key = load_key(&issued);
    assert_eq!(seal(&header(), &key).map(|_| ()), Err(expected.clone()));
    let envelope = key
        .sign(Domain::DocumentHeader, header().encode_to_vec().into())
        .expect("sign");
    assert_eq!(
        verify_document(&envelope, &pki.anchors, VerifyTime::Now).map(|_| ()),
        Err(expected)
    );
}

#[test]
fn server_certificate_cannot_sign_documents() {
    let pki = Pki::new("lienthong test CA");
    // A serverAuth-only certificate that even carries the sender's agency URI, so that
    // seal accepts it and only the extended key usage is wrong.
    let issued = pki.issue(&LeafSpec::server(&["localhost"]).with_uri(&agency_uri(SENDER)));
    let key = load_key(&issued);
    let envelope = seal(&header(), &key).expect("seal");
    let err = verify_document(&envelope, &pki.anchors, VerifyTime::Now).unwrap_err();
    assert!(
        matches!(&err, ProtocolError::CertificateInvalid { detail } if detail.contains("Eku")),
        "{err:?}"
    );

    // The plain server certificate (no URI) fails on the usage too, before identity.
    let plain = load_key(&pki.issue(&LeafSpec::server(&["localhost"])));
    let envelope = plain
        .sign(Domain::DocumentHeader, header().encode_to_vec().into())
        .expect("sign");
    let err = verify_document(&envelope, &pki.anchors, VerifyTime::Now).unwrap_err();
    assert!(
        matches!(&err, ProtocolError::CertificateInvalid { detail } if detail.contains("Eku")),
        "{err:?}"
    );
}

#[test]
fn peer_identity_from_certificates() {
    let pki = Pki::new("lienthong test CA");
    let agency = pki.issue(&LeafSpec::agency(SENDER));
    assert_eq!(
        PeerIdentity::from_cert_der(&agency.cert_der),
        Ok(PeerIdentity::Agency(
            AgencyCode::parse(SENDER).expect("code")
        ))
    );
    let identity = PeerIdentity::from_cert_der(&agency.cert_der).expect("identity");
    assert_eq!(identity.agency().map(AgencyCode::as_str), Some(SENDER));
    assert_eq!(identity.to_string(), format!("agency {SENDER}"));

    let operator = pki.issue(&LeafSpec::operator("op"));
    let identity = PeerIdentity::from_cert_der(&operator.cert_der).expect("identity");
    assert_eq!(identity, PeerIdentity::Operator("op".to_owned()));
    assert_eq!(identity.agency(), None);
    assert_eq!(identity.to_string(), "operator op");

    let server = pki.issue(&LeafSpec::server(&["localhost", "127.0.0.1"]));
    assert_eq!(
        PeerIdentity::from_cert_der(&server.cert_der),
        Err(ProtocolError::NoIdentity)
    );

    // A URI outside the lienthong scheme is not an identity.
    let foreign = pki.issue(&LeafSpec::agency(SENDER).with_uri("https://example.vn/agency"));
    assert_eq!(
        PeerIdentity::from_cert_der(&foreign.cert_der),
        Err(ProtocolError::NoIdentity)
    );

    let err = PeerIdentity::from_cert_der(b"not a certificate").unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Malformed {
                what: "certificate",
                ..
            }
        ),
        "{err:?}"
    );
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write PEM file");
    path
}

#[test]
fn tls_files_load_a_matching_set() {
    let pki = Pki::new("lienthong test CA");
    let agency = pki.issue(&LeafSpec::agency(SENDER));
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", pki.ca.cert_pem());
    let cert = write(dir.path(), "agency.pem", &agency.cert_pem);
    let key = write(dir.path(), "agency.key", &agency.key_pem);

    let files = TlsFiles::load(&ca, &cert, &key).expect("load");
    assert_eq!(files.ca_pem, pki.ca.cert_pem().as_bytes());
    assert_eq!(files.cert_pem, agency.cert_pem.as_bytes());
    assert_eq!(files.key_pem, agency.key_pem.as_bytes());
    let signing_key = files.signing_key().expect("signing key");
    assert_eq!(
        signing_key.identity(),
        Ok(PeerIdentity::Agency(
            AgencyCode::parse(SENDER).expect("code")
        ))
    );
    // The loaded anchors verify what the loaded key seals.
    let envelope = seal(&header(), &signing_key).expect("seal");
    let anchors = files.trust_anchors().expect("anchors");
    verify_document(&envelope, &anchors, VerifyTime::Now).expect("verify");
}

#[test]
fn tls_files_refuse_a_key_of_another_certificate() {
    let pki = Pki::new("lienthong test CA");
    let agency = pki.issue(&LeafSpec::agency(SENDER));
    let other_same_alg = pki.issue(&LeafSpec::agency(RECIPIENT));
    let other_ed25519 =
        pki.issue(&LeafSpec::agency(RECIPIENT).with_key_algorithm(KeyAlgorithm::Ed25519));
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", pki.ca.cert_pem());
    let cert = write(dir.path(), "agency.pem", &agency.cert_pem);

    for (name, wrong) in [
        ("other.key", &other_same_alg),
        ("other-ed25519.key", &other_ed25519),
    ] {
        let key = write(dir.path(), name, &wrong.key_pem);
        let err = TlsFiles::load(&ca, &cert, &key).unwrap_err();
        assert_eq!(err.path, key);
        assert!(
            err.to_string().contains(&key.display().to_string()),
            "{err}"
        );
        assert!(err.detail.contains("does not match"), "{err}");
    }

    // The same mismatch through SigningKey directly is a Key error.
    let err = lienthong_proto::SigningKey::from_pem(
        agency.cert_pem.as_bytes(),
        other_same_alg.key_pem.as_bytes(),
    )
    .unwrap_err();
    assert!(matches!(err, ProtocolError::Key { .. }), "{err:?}");
}

#[test]
fn tls_files_name_the_file_at_fault() {
    let pki = Pki::new("lienthong test CA");
    let agency = pki.issue(&LeafSpec::agency(SENDER));
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", pki.ca.cert_pem());
    let cert = write(dir.path(), "agency.pem", &agency.cert_pem);
    let key = write(dir.path(), "agency.key", &agency.key_pem);

    // A missing file.
    let missing = dir.path().join("missing.pem");
    let err = TlsFiles::load(&missing, &cert, &key).unwrap_err();
    assert_eq!(err.path, missing);

    // A key where the CA bundle should be: no certificate in it.
    let err = TlsFiles::load(&key, &cert, &key).unwrap_err();
    assert_eq!(err.path, key);

    // A certificate where the key should be.
    let err = TlsFiles::load(&ca, &cert, &cert).unwrap_err();
    assert_eq!(err.path, cert);
    assert!(err.detail.contains("PKCS#8"), "{err}");

    // The key where the certificate should be.
    let err = TlsFiles::load(&ca, &key, &key).unwrap_err();
    assert_eq!(err.path, key);
}
