//! Tests of the development PKI: files on disk, certificate contents, and
//! acceptance (or refusal) by webpki the way the broker and agents verify peers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;
use webpki::{ALL_VERIFICATION_ALGS, EndEntityCert, KeyUsage, anchor_from_trusted_cert};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::*;

fn codes(list: &[&str]) -> Vec<String> {
    list.iter().map(|code| (*code).to_owned()).collect()
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    parsed.contents
}

fn san_uris(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let Some(san) = cert.subject_alternative_name().unwrap() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect()
}

fn verify(ca_der: &[u8], leaf_der: &[u8], usage: KeyUsage) -> Result<(), webpki::Error> {
    let ca = CertificateDer::from(ca_der.to_vec());
    let anchors = [anchor_from_trusted_cert(&ca).unwrap().to_owned()];
    let leaf = CertificateDer::from(leaf_der.to_vec());
    let end_entity = EndEntityCert::try_from(&leaf)?;
    end_entity
        .verify_for_usage(
            ALL_VERIFICATION_ALGS,
            &anchors,
            &[],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
}

fn assert_key_mode(path: &Path) {
    let mode = fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
}

#[test]
fn writes_every_file_with_private_keys_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let paths = write_dev_pki(&dir, &codes(&DEFAULT_AGENCIES)).unwrap();

    assert_eq!(paths.dir, dir);
    assert_eq!(paths.ca_cert, dir.join("ca.crt"));
    assert_eq!(paths.broker_key, dir.join("broker.key"));
    let mut keys = vec![&paths.ca_key, &paths.broker_key, &paths.operator_key];
    let mut certs = vec![&paths.ca_cert, &paths.broker_cert, &paths.operator_cert];
    assert_eq!(paths.agencies.len(), 3);
    for (code, cert, key) in &paths.agencies {
        assert_eq!(cert, &dir.join("agencies").join(format!("{code}.crt")));
        assert_eq!(key, &dir.join("agencies").join(format!("{code}.key")));
        certs.push(cert);
        keys.push(key);
    }
    for cert in certs {
        let text = fs::read_to_string(cert).unwrap();
        assert!(
            text.starts_with("-----BEGIN CERTIFICATE-----"),
            "{}",
            cert.display()
        );
    }
    for key in keys {
        let text = fs::read_to_string(key).unwrap();
        assert!(
            text.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{}",
            key.display()
        );
        assert_key_mode(key);
    }
    let (cert, key) = paths.agency("000.00.15.H31").unwrap();
    assert_eq!(cert, dir.join("agencies/000.00.15.H31.crt"));
    assert_eq!(key, dir.join("agencies/000.00.15.H31.key"));
    assert!(paths.agency("000.00.99.H31").is_none());
}

#[test]
fn agency_cert_carries_uri_and_client_auth() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = write_dev_pki(tmp.path(), &codes(&DEFAULT_AGENCIES)).unwrap();
    let (cert_path, _) = paths.agency("000.00.12.H31").unwrap();
    let der = pem_to_der(&fs::read_to_string(cert_path).unwrap());

    assert_eq!(san_uris(&der), vec!["urn:lienthong:agency:000.00.12.H31"]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth);
    assert!(!eku.server_auth);
    let key_usage = cert.key_usage().unwrap().unwrap().value;
    assert!(key_usage.digital_signature());
    assert!(!key_usage.key_cert_sign());
    assert!(!cert.is_ca());
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "000.00.12.H31");

    let ca_der = pem_to_der(&fs::read_to_string(&paths.ca_cert).unwrap());
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
    assert!(ca.is_ca());
    let ca_usage = ca.key_usage().unwrap().unwrap().value;
    assert!(ca_usage.key_cert_sign() && ca_usage.crl_sign() && ca_usage.digital_signature());
}

#[test]
fn written_leaves_verify_with_webpki() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = write_dev_pki(tmp.path(), &codes(&["000.00.12.H31"])).unwrap();
    let read = |path: &Path| pem_to_der(&fs::read_to_string(path).unwrap());
    let ca = read(&paths.ca_cert);

    let agency = read(paths.agency("000.00.12.H31").unwrap().0);
    verify(&ca, &agency, KeyUsage::client_auth()).unwrap();
    verify(&ca, &agency, KeyUsage::server_auth()).unwrap_err();

    let operator = read(&paths.operator_cert);
    verify(&ca, &operator, KeyUsage::client_auth()).unwrap();
    assert_eq!(san_uris(&operator), vec!["urn:lienthong:operator:operator"]);

    let broker = read(&paths.broker_cert);
    verify(&ca, &broker, KeyUsage::server_auth()).unwrap();
    let broker_cert = CertificateDer::from(broker.clone());
    let end_entity = EndEntityCert::try_from(&broker_cert).unwrap();
    for name in ["localhost", "127.0.0.1", "::1"] {
        let server_name = ServerName::try_from(name).unwrap();
        end_entity
            .verify_is_valid_for_subject_name(&server_name)
            .unwrap();
    }
    let other = ServerName::try_from("example.org").unwrap();
    end_entity
        .verify_is_valid_for_subject_name(&other)
        .unwrap_err();
    assert!(san_uris(&broker).is_empty());
}

#[test]
fn every_key_algorithm_verifies() {
    let ca = DevCa::generate("test CA").unwrap();
    for alg in [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
    ] {
        let leaf = ca
            .issue(&LeafSpec::agency("000.00.12.H31").with_key_algorithm(alg))
            .unwrap();
        verify(ca.cert_der(), &leaf.cert_der, KeyUsage::client_auth())
            .unwrap_or_else(|error| panic!("{alg:?}: {error:?}"));
        assert_eq!(pem_to_der(&leaf.cert_pem), leaf.cert_der);
        assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }
}

#[test]
fn ed25519_leaf_can_be_issued() {
    let ca = DevCa::generate("test CA").unwrap();
    let leaf = ca
        .issue(&LeafSpec::operator("alice").with_key_algorithm(KeyAlgorithm::Ed25519))
        .unwrap();
    let (_, cert) = X509Certificate::from_der(&leaf.cert_der).unwrap();
    // id-Ed25519 = 1.3.101.112
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.3.101.112"
    );
    // The PKCS#8 key loads back as an Ed25519 key.
    ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&leaf.key_der).unwrap();
}

#[test]
fn invalid_agency_code_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    for bad in [
        "000.00.12.h31",
        "00.00.12.H31",
        "000.00.12.H3",
        "000-00-12-H31",
        "",
        "000.00.12.H31 ",
    ] {
        let error = write_dev_pki(&dir, &codes(&["000.00.00.H31", bad])).unwrap_err();
        match error {
            CertsDevError::InvalidAgencyCode { code } => assert_eq!(code, bad),
            other => panic!("unexpected error {other:?}"),
        }
        assert!(!dir.exists(), "something was written for {bad:?}");
    }
    // Also nothing is added to an existing directory.
    write_dev_pki(&dir, &codes(&["000.00.00.H31"])).unwrap();
    write_dev_pki(&dir, &codes(&["000.00.01.H31", "bad"])).unwrap_err();
    assert!(!dir.join("agencies/000.00.01.H31.crt").exists());
}

#[test]
fn agency_code_validator() {
    for good in DEFAULT_AGENCIES
        .iter()
        .chain(&["123.45.67.Z89", "000.00.00.A00"])
    {
        assert!(is_valid_agency_code(good), "{good}");
    }
    for bad in [
        "000.00.00.H3I",
        "000.00.00.HH1",
        "000.00.00.31",
        "0000.00.00.H31",
        "000.000.0.H31",
        "000.00.00.Ĥ31",
        "٠٠٠.00.00.H31",
        "000.00.00.H31\n",
    ] {
        assert!(!is_valid_agency_code(bad), "{bad}");
    }
}

#[test]
fn expired_spec_is_entirely_in_the_past() {
    let now = OffsetDateTime::now_utc();
    let spec = LeafSpec::agency("000.00.12.H31").expired();
    assert!(spec.not_after < now);
    assert!(spec.not_before < spec.not_after);

    let ca = DevCa::generate("test CA").unwrap();
    let leaf = ca.issue(&spec).unwrap();
    let (_, cert) = X509Certificate::from_der(&leaf.cert_der).unwrap();
    assert!(cert.validity().not_after.timestamp() < now.unix_timestamp());
    assert!(matches!(
        verify(ca.cert_der(), &leaf.cert_der, KeyUsage::client_auth()),
        Err(webpki::Error::CertExpired { .. })
    ));

    let fresh = LeafSpec::agency("000.00.12.H31");
    assert!(fresh.not_before < now && now < fresh.not_after);
}

#[test]
fn rogue_ca_leaf_is_rejected() {
    let ca = DevCa::generate("lienthong dev CA").unwrap();
    let rogue = DevCa::generate("lienthong dev CA").unwrap();
    let leaf = rogue.issue(&LeafSpec::agency("000.00.12.H31")).unwrap();
    verify(rogue.cert_der(), &leaf.cert_der, KeyUsage::client_auth()).unwrap();
    verify(ca.cert_der(), &leaf.cert_der, KeyUsage::client_auth()).unwrap_err();
}

#[test]
fn uri_override_and_omission() {
    let ca = DevCa::generate("test CA").unwrap();
    let wrong = ca
        .issue(&LeafSpec::agency("000.00.12.H31").with_uri("urn:lienthong:agency:999.99.99.Z99"))
        .unwrap();
    assert_eq!(
        san_uris(&wrong.cert_der),
        vec!["urn:lienthong:agency:999.99.99.Z99"]
    );

    let malformed = ca
        .issue(&LeafSpec::agency("000.00.12.H31").with_uri("urn:lienthong:agency:"))
        .unwrap();
    assert_eq!(san_uris(&malformed.cert_der), vec!["urn:lienthong:agency:"]);

    let none = ca
        .issue(&LeafSpec::agency("000.00.12.H31").without_uri())
        .unwrap();
    assert!(san_uris(&none.cert_der).is_empty());
    verify(ca.cert_der(), &none.cert_der, KeyUsage::client_auth()).unwrap();

    let not_ascii =
        ca.issue(&LeafSpec::agency("000.00.12.H31").with_uri("urn:lienthong:agency:Hưng"));
    assert!(matches!(
        not_ascii,
        Err(CertsDevError::InvalidName { kind: "URI", .. })
    ));
}

#[test]
fn rerun_reuses_ca_and_adds_agency() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let first = write_dev_pki(dir, &codes(&["000.00.00.H31"])).unwrap();
    let ca_before = fs::read(&first.ca_cert).unwrap();
    let ca_key_before = fs::read(&first.ca_key).unwrap();
    let broker_before = fs::read(&first.broker_cert).unwrap();
    let agency_before = fs::read(first.agency("000.00.00.H31").unwrap().0).unwrap();

    let second = write_dev_pki(dir, &codes(&["000.00.00.H31", "000.00.12.H31"])).unwrap();
    assert_eq!(fs::read(&second.ca_cert).unwrap(), ca_before);
    assert_eq!(fs::read(&second.ca_key).unwrap(), ca_key_before);
    assert_eq!(fs::read(&second.broker_cert).unwrap(), broker_before);
    assert_eq!(
        fs::read(second.agency("000.00.00.H31").unwrap().0).unwrap(),
        agency_before
    );

    let (new_cert, new_key) = second.agency("000.00.12.H31").unwrap();
    assert!(new_key.exists());
    assert_key_mode(new_key);
    let new_der = pem_to_der(&fs::read_to_string(new_cert).unwrap());
    verify(
        &pem_to_der(&String::from_utf8(ca_before).unwrap()),
        &new_der,
        KeyUsage::client_auth(),
    )
    .unwrap();
}

#[test]
fn half_present_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let paths = write_dev_pki(tmp.path(), &[]).unwrap();
    fs::remove_file(&paths.ca_key).unwrap();
    let before = fs::read(&paths.ca_cert).unwrap();
    assert!(matches!(
        write_dev_pki(tmp.path(), &[]),
        Err(CertsDevError::IncompleteCa { .. })
    ));
    assert_eq!(fs::read(&paths.ca_cert).unwrap(), before);
}

#[test]
fn ca_round_trips_through_pem() {
    let ca = DevCa::generate("test CA").unwrap();
    let loaded = DevCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
    assert_eq!(loaded.cert_der(), ca.cert_der());
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(pem_to_der(ca.cert_pem()), ca.cert_der());

    let leaf = loaded.issue(&LeafSpec::agency("000.00.12.H31")).unwrap();
    verify(ca.cert_der(), &leaf.cert_der, KeyUsage::client_auth()).unwrap();

    let other = DevCa::generate("other CA").unwrap();
    assert!(matches!(
        DevCa::from_pem(ca.cert_pem(), &other.key_pem()),
        Err(CertsDevError::CaKeyMismatch)
    ));
    assert!(matches!(
        DevCa::from_pem(&ca.key_pem(), &ca.key_pem()),
        Err(CertsDevError::InvalidPem { .. })
    ));
}

#[test]
fn serial_numbers_are_random() {
    let ca = DevCa::generate("test CA").unwrap();
    let serial = |der: &[u8]| {
        let (_, cert) = X509Certificate::from_der(der).unwrap();
        cert.raw_serial().to_vec()
    };
    let a = ca.issue(&LeafSpec::agency("000.00.12.H31")).unwrap();
    let b = ca.issue(&LeafSpec::agency("000.00.12.H31")).unwrap();
    assert_ne!(serial(&a.cert_der), serial(&b.cert_der));
    assert_eq!(serial(&a.cert_der).len(), 16);
    assert!(serial(&a.cert_der)[0] < 0x80);
}

#[test]
fn issued_cert_debug_hides_the_key() {
    let ca = DevCa::generate("test CA").unwrap();
    let leaf = ca.issue(&LeafSpec::server(&["localhost"])).unwrap();
    assert!(!format!("{leaf:?}").contains("PRIVATE"));
    assert!(!format!("{ca:?}").contains("PRIVATE"));
}

/// Verifies `leaf` against `root` through `intermediates`, with `crls` checked when
/// given (unknown status refused).
fn verify_chain(
    root_der: &[u8],
    intermediates: &[Vec<u8>],
    leaf_der: &[u8],
    crls: &[Vec<u8>],
) -> Result<(), webpki::Error> {
    let root = CertificateDer::from(root_der.to_vec());
    let anchors = [anchor_from_trusted_cert(&root).unwrap().to_owned()];
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let leaf = CertificateDer::from(leaf_der.to_vec());
    let parsed: Vec<webpki::CertRevocationList<'_>> = crls
        .iter()
        .map(|der| {
            webpki::OwnedCertRevocationList::from_der(der)
                .unwrap()
                .into()
        })
        .collect();
    let refs: Vec<&webpki::CertRevocationList<'_>> = parsed.iter().collect();
    let revocation = if refs.is_empty() {
        None
    } else {
        Some(
            // The root publishes no CRL for the intermediate here: leaves only.
            webpki::RevocationOptionsBuilder::new(&refs)
                .unwrap()
                .with_depth(webpki::RevocationCheckDepth::EndEntity)
                .build(),
        )
    };
    EndEntityCert::try_from(&leaf)?
        .verify_for_usage(
            ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            UnixTime::now(),
            KeyUsage::client_auth(),
            revocation,
            None,
        )
        .map(|_| ())
}

fn crl_der(pem: &str) -> Vec<u8> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    parsed.contents
}

#[test]
fn government_shaped_leaves_chain_to_the_root_without_a_lienthong_uri() {
    let gov = GovPki::generate("http://crl.example.invalid/ca.crl").unwrap();
    let root = pem_to_der(gov.root_pem());
    let intermediate = pem_to_der(gov.intermediate_pem());
    for key in [GovKey::Rsa2048, GovKey::EcdsaP256] {
        let leaf = gov
            .issue(&GovLeafSpec::new(
                "UBND tỉnh Hưng Yên",
                "Sở Tài chính",
                "Sở Tài chính tỉnh Hưng Yên",
                "MST:0900123456",
                key,
            ))
            .unwrap();
        assert!(san_uris(&leaf.cert_der).is_empty(), "no lienthong URI");
        let (_, cert) = X509Certificate::from_der(&leaf.cert_der).unwrap();
        let subject = cert.subject().to_string();
        for part in ["O=UBND", "OU=Sở Tài chính", "CN=Sở Tài chính", "0900123456"] {
            assert!(subject.contains(part), "{part} in {subject}");
        }
        // cert_pem is the leaf and then the intermediate.
        assert!(leaf.cert_pem.ends_with(gov.intermediate_pem()));
        verify_chain(
            &root,
            std::slice::from_ref(&intermediate),
            &leaf.cert_der,
            &[],
        )
        .unwrap();
        // Without the intermediate the chain does not reach the root.
        assert!(verify_chain(&root, &[], &leaf.cert_der, &[]).is_err());

        // A CRL of the intermediate revoking the leaf is honoured; one revoking
        // another serial is not.
        let now = OffsetDateTime::now_utc();
        let later = now + time::Duration::hours(1);
        let revoking = crl_der(&gov.crl(&[&leaf.serial], now, later).unwrap());
        assert_eq!(
            verify_chain(
                &root,
                std::slice::from_ref(&intermediate),
                &leaf.cert_der,
                &[revoking]
            ),
            Err(webpki::Error::CertRevoked)
        );
        let other = crl_der(&gov.crl(&[&[1, 2, 3]], now, later).unwrap());
        verify_chain(
            &root,
            std::slice::from_ref(&intermediate),
            &leaf.cert_der,
            &[other],
        )
        .unwrap();
    }
}
