//! Certificate bindings by SPKI hash (issue 12): a certificate shaped like a government
//! CA's (no lienthong URI; O/OU/CN/UID subject; RSA 2048 or ECDSA; root + intermediate)
//! identifies an agency only once an operator binds it; the dev PKI's SAN URI
//! certificates are bound on first use and keep working unchanged; a binding is removed
//! by unbind; a certificate bound to one agency but naming another is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_certs_dev::{GovKey, GovLeafSpec, GovPki, IssuedCert, LeafSpec};
use lienthong_proto::SigningKey;
use lienthong_proto::agency::spki_sha256;
use lienthong_proto::pb::{
    self, AuditTailRequest, BindCertificateRequest, BindingsRequest, DirectoryRequest,
    UnbindCertificateRequest, exchange_client::ExchangeClient,
};
use lienthong_proto::signing::Domain;
use lienthong_proto::tls::TlsFiles;
use lienthong_tests::*;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The world's broker, trusting the government test root beside the dev CA for TLS
/// clients and document signatures.
fn config_with_gov_root(world: &World, gov: &GovPki, data: &str) -> lienthong_broker::BrokerConfig {
    let mut config = world.broker_config(data);
    config
        .tls
        .ca_pem
        .extend_from_slice(gov.root_pem().as_bytes());
    config
}

/// TLS files of a government-shaped certificate, trusting the dev CA for the broker.
fn gov_tls(world: &World, issued: &IssuedCert) -> TlsFiles {
    TlsFiles {
        ca_pem: std::fs::read(&world.pki.ca_cert).unwrap(),
        cert_pem: issued.cert_pem.clone().into_bytes(),
        key_pem: issued.key_pem.clone().into_bytes(),
    }
}

async fn client_of(url: &str, tls: &TlsFiles) -> ExchangeClient<Channel> {
    exchange_client(url, tls.client_config("localhost"))
        .await
        .unwrap()
}

/// A document from `sender` signed with `issued`'s key, whatever its certificate says
/// (`seal` refuses a key without a lienthong URI, as it should for an agent).
fn signed_by(issued: &IssuedCert, sender: &str, to: &[&str], body: &[u8]) -> pb::Signed {
    let key = SigningKey::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap();
    let header = header(sender, to, &[("cong-van.txt", body)]);
    key.sign(Domain::DocumentHeader, header.encode_to_vec().into())
        .unwrap()
}

fn gov_leaf(gov: &GovPki, unit: &str, uid: &str, key: GovKey) -> IssuedCert {
    gov.issue(&GovLeafSpec::new(
        "UBND tỉnh Hưng Yên",
        unit,
        &format!("{unit} tỉnh Hưng Yên"),
        uid,
        key,
    ))
    .unwrap()
}

#[tokio::test]
async fn government_certificates_identify_an_agency_only_through_a_binding() {
    let world = World::new();
    let gov = GovPki::generate("http://crl.example.invalid/issuing.crl").unwrap();
    let broker = Broker::start(config_with_gov_root(&world, &gov, "broker")).await;
    let mut admin = admin_client(&world, &broker.url).await;

    // B's TLS certificate is RSA 2048, its seal ECDSA P-256; neither names B.
    let b_tls_cert = gov_leaf(&gov, "Sở Tài chính", "MST:0900123456", GovKey::Rsa2048);
    let b_seal = gov_leaf(&gov, "Sở Tài chính", "MST:0900123456", GovKey::EcdsaP256);
    let stranger = gov_leaf(&gov, "Sở Nội vụ", "MST:0900654321", GovKey::EcdsaP256);
    let b_tls = gov_tls(&world, &b_tls_cert);
    let b_hash = spki_sha256(&b_tls_cert.cert_der).unwrap();

    // Unbound: authenticated by TLS (the chain is good) but nobody.
    let mut b = client_of(&broker.url, &b_tls).await;
    let refused = b.directory(DirectoryRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(
        refused.message().contains("not bound"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains(&hex(b_hash)),
        "{}",
        refused.message()
    );
    let envelope = signed_by(&b_seal, B, &[A], b"unbound");
    let refused = submit(&mut b, envelope, &[b"unbound"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // Binding needs a registered agency.
    let missing = admin
        .bind_certificate(BindCertificateRequest {
            code: "000.00.99.H31".into(),
            cert_der: b_tls_cert.cert_der.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // The operator binds both of B's certificates.
    for cert in [&b_tls_cert, &b_seal] {
        let info = admin
            .bind_certificate(BindCertificateRequest {
                code: B.into(),
                cert_der: cert.cert_der.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.code, B);
        assert_eq!(
            info.spki_sha256,
            spki_sha256(&cert.cert_der).unwrap().to_vec()
        );
        assert!(info.subject.contains("MST:0900123456"), "{}", info.subject);
        assert!(info.bound_by.starts_with("operator "), "{}", info.bound_by);
    }
    // Binding the same certificate to another agency is refused.
    let taken = admin
        .bind_certificate(BindCertificateRequest {
            code: C.into(),
            cert_der: b_seal.cert_der.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);

    // Now the RSA certificate is B: the directory answers, and a document sealed by
    // B's ECDSA certificate is accepted over it.
    let directory = b.directory(DirectoryRequest {}).await.unwrap().into_inner();
    assert!(directory.agencies.iter().any(|a| a.code == B));
    let body = b"Kinh gui UBND tinh";
    let receipt = submit(&mut b, signed_by(&b_seal, B, &[A], body), &[body])
        .await
        .unwrap();
    assert!(receipt.submission_receipt.is_some());

    // A seal bound to nobody, or a sender other than the seal's agency: refused, and
    // nothing stored (Status finds neither).
    let unbound_doc = signed_by(&stranger, B, &[A], body);
    let unbound_id = pb::DocumentHeader::decode(unbound_doc.payload.as_ref())
        .unwrap()
        .message_id;
    let refused = submit(&mut b, unbound_doc, &[body]).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("not bound"),
        "{}",
        refused.message()
    );
    let other_sender = signed_by(&b_seal, C, &[A], body);
    let refused = submit(&mut b, other_sender, &[body]).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let status = b
        .status(pb::StatusRequest {
            message_id: unbound_id,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    // The bindings of B, and the audit entries naming them.
    let bindings = admin
        .bindings(BindingsRequest { code: B.into() })
        .await
        .unwrap()
        .into_inner()
        .bindings;
    assert_eq!(bindings.len(), 2, "{bindings:?}");
    let audit = admin
        .audit_tail(AuditTailRequest { n: 50 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(
        audit
            .iter()
            .filter(|e| e.kind == "certificate_bound" && e.agency == B)
            .count()
            >= 2,
        "{audit:?}"
    );

    // Unbound again: the next call is refused.
    admin
        .unbind_certificate(UnbindCertificateRequest {
            spki_sha256: b_hash.to_vec(),
        })
        .await
        .unwrap();
    let mut b = client_of(&broker.url, &b_tls).await;
    let refused = b.directory(DirectoryRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    broker.stop().await;
}

#[tokio::test]
async fn dev_pki_certificates_are_bound_on_first_use_and_conflicts_refused() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut admin = admin_client(&world, &broker.url).await;

    // Today's flow, unchanged: agents with SAN URI certificates exchange a document.
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let id = a.send(&[B], "first use", &[("x.txt", b"x")]).await;
    a.wait_status(&id, "delivered to B", |v| {
        v.recipients.iter().all(|r| r.state == "delivered")
    })
    .await;
    let bindings = admin
        .bindings(BindingsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .bindings;
    for code in [A, B] {
        let cert = std::fs::read(world.pki.agency(code).unwrap().0).unwrap();
        let der = lienthong_proto::signing::certs_from_pem(&cert, "certificate").unwrap();
        let hash = spki_sha256(&der[0]).unwrap().to_vec();
        let binding = bindings
            .iter()
            .find(|b| b.spki_sha256 == hash)
            .unwrap_or_else(|| panic!("{code} bound on first use: {bindings:?}"));
        assert_eq!(binding.code, code);
        assert_eq!(binding.bound_by, "SAN URI on first use");
    }
    a.stop().await;
    b.stop().await;

    // A certificate naming A in its URI but bound by the operator to B: refused as
    // conflicting, not trusted as either.
    let issued = world.ca.issue(&LeafSpec::agency(A)).unwrap();
    admin
        .bind_certificate(BindCertificateRequest {
            code: B.into(),
            cert_der: issued.cert_der.clone(),
        })
        .await
        .unwrap();
    let tls = TlsFiles {
        ca_pem: std::fs::read(&world.pki.ca_cert).unwrap(),
        cert_pem: issued.cert_pem.into_bytes(),
        key_pem: issued.key_pem.into_bytes(),
    };
    let mut client = client_of(&broker.url, &tls).await;
    let refused = client.directory(DirectoryRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("conflicting"),
        "{}",
        refused.message()
    );
    broker.stop().await;
}

#[tokio::test]
async fn admin_cli_binds_lists_and_unbinds_by_file_or_hash() {
    let world = World::new();
    let gov = GovPki::generate("http://crl.example.invalid/issuing.crl").unwrap();
    let broker = Broker::start(config_with_gov_root(&world, &gov, "broker")).await;
    let cert = gov_leaf(&gov, "Sở Nội vụ", "MST:0900111222", GovKey::EcdsaP256);
    let path = world.path("noi-vu.pem");
    std::fs::write(&path, &cert.cert_pem).unwrap();
    let hash = hex(spki_sha256(&cert.cert_der).unwrap());
    let bin = std::path::Path::new(BIN);

    let out = run_admin_cli(
        bin,
        &world,
        &broker.url,
        &["agencies", "bind", C, path.to_str().unwrap()],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&hash));

    let out = run_admin_cli(
        bin,
        &world,
        &broker.url,
        &["--json", "agencies", "bindings", C],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["spki_sha256"], hash.as_str());
    assert_eq!(rows[0]["agency"], C);

    let mut client = client_of(&broker.url, &gov_tls(&world, &cert)).await;
    client.directory(DirectoryRequest {}).await.unwrap();

    let out = run_admin_cli(bin, &world, &broker.url, &["agencies", "unbind", &hash]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_admin_cli(bin, &world, &broker.url, &["agencies", "unbind", &hash]).await;
    assert_eq!(out.status.code(), Some(1), "unbinding twice fails");
    let out = run_admin_cli(
        bin,
        &world,
        &broker.url,
        &["agencies", "unbind", "not-a-hash"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "bad usage");

    let mut client = client_of(&broker.url, &gov_tls(&world, &cert)).await;
    let refused = client.directory(DirectoryRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    broker.stop().await;
}
