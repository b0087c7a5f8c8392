//! CRLs from files (issue 12): applied to TLS clients and document signers, re-read on
//! an operator's call and on a schedule, a stale CRL refused (fail closed) and shown in
//! `/readyz` and the metrics, a failed refresh keeping the previous CRLs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lienthong_certs_dev::{GovKey, GovLeafSpec, GovPki, IssuedCert};
use lienthong_proto::SigningKey;
use lienthong_proto::pb::{self, BindCertificateRequest, DirectoryRequest, ReloadCrlsRequest};
use lienthong_proto::signing::Domain;
use lienthong_proto::tls::TlsFiles;
use lienthong_tests::*;
use prost::Message;
use tonic::Code;

fn leaf(gov: &GovPki, unit: &str) -> IssuedCert {
    gov.issue(&GovLeafSpec::new(
        "UBND tỉnh Hưng Yên",
        unit,
        unit,
        "MST:0900123456",
        GovKey::EcdsaP256,
    ))
    .unwrap()
}

fn tls_of(world: &World, issued: &IssuedCert) -> TlsFiles {
    TlsFiles {
        ca_pem: std::fs::read(&world.pki.ca_cert).unwrap(),
        cert_pem: issued.cert_pem.clone().into_bytes(),
        key_pem: issued.key_pem.clone().into_bytes(),
    }
}

/// One Directory call on a new connection (a new handshake): Ok, or the failure.
async fn call_fresh(url: &str, tls: &TlsFiles) -> Result<(), tonic::Status> {
    let mut client = match exchange_client(url, tls.client_config("localhost")).await {
        Ok(client) => client,
        Err(e) => return Err(tonic::Status::unavailable(e.to_string())),
    };
    client.directory(DirectoryRequest {}).await.map(|_| ())
}

/// A CRL of the issuing CA revoking `revoked`, whose nextUpdate is `next_update_secs`
/// from now (negative: already stale).
fn crl(gov: &GovPki, revoked: &[&IssuedCert], next_update_secs: i64) -> String {
    let serials: Vec<&[u8]> = revoked.iter().map(|c| c.serial.as_slice()).collect();
    let this_update = next_update_secs.min(0) - 3600;
    gov.crl_from_now(&serials, this_update, next_update_secs)
        .unwrap()
}

async fn readyz(admin_url: &str) -> (u16, String) {
    let response = reqwest::get(format!("{admin_url}/readyz")).await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crls_refuse_revoked_clients_and_signers_and_stale_lists() {
    let world = World::new();
    let gov = GovPki::generate("http://crl.example.invalid/issuing.crl").unwrap();
    let b_tls_cert = leaf(&gov, "Sở Tài chính");
    let b_seal = leaf(&gov, "Sở Tài chính");
    let c_tls_cert = leaf(&gov, "Sở Nội vụ");
    let crl_path = world.path("issuing.crl");
    std::fs::write(&crl_path, crl(&gov, &[], 3600)).unwrap();

    let mut config = world.broker_config("broker");
    config
        .tls
        .ca_pem
        .extend_from_slice(gov.root_pem().as_bytes());
    config.crl_files = vec![crl_path.clone()];
    // Only the operator's call refreshes in this test.
    config.crl_refresh_interval = Duration::from_secs(3600);
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let mut admin = admin_client(&world, &broker.url).await;
    for (code, cert) in [(B, &b_tls_cert), (B, &b_seal), (C, &c_tls_cert)] {
        admin
            .bind_certificate(BindCertificateRequest {
                code: code.into(),
                cert_der: cert.cert_der.clone(),
            })
            .await
            .unwrap();
    }
    let b_tls = tls_of(&world, &b_tls_cert);
    let c_tls = tls_of(&world, &c_tls_cert);
    call_fresh(&broker.url, &b_tls).await.unwrap();
    call_fresh(&broker.url, &c_tls).await.unwrap();
    assert_eq!(readyz(&admin_url).await.0, 200);
    let out = run_admin_cli(
        std::path::Path::new(env!("CARGO_BIN_EXE_lienthong-under-test")),
        &world,
        &broker.url,
        &["--json", "crls", "reload"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["revoked"], 0, "{rows}");
    assert_eq!(rows[0]["stale"], false, "{rows}");
    assert!(
        rows[0]["issuer"].as_str().unwrap().contains("Issuing CA"),
        "{rows}"
    );

    // B's seal is revoked: its documents are refused (nothing stored); its TLS
    // certificate still works.
    std::fs::write(&crl_path, crl(&gov, &[&b_seal], 3600)).unwrap();
    let state = admin
        .reload_crls(ReloadCrlsRequest {})
        .await
        .unwrap()
        .into_inner()
        .crls;
    assert_eq!(state.len(), 1, "{state:?}");
    assert_eq!(state[0].revoked, 1);
    assert!(!state[0].stale);
    let key = SigningKey::from_pem(b_seal.cert_pem.as_bytes(), b_seal.key_pem.as_bytes()).unwrap();
    let doc = header(B, &[A], &[]);
    let envelope = key
        .sign(Domain::DocumentHeader, doc.encode_to_vec().into())
        .unwrap();
    let mut b = exchange_client(&broker.url, b_tls.client_config("localhost"))
        .await
        .unwrap();
    let refused = submit(&mut b, envelope, &[]).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    let missing = admin
        .message(pb::MessageRequest { id: doc.message_id })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    call_fresh(&broker.url, &b_tls).await.unwrap();

    // B's TLS certificate revoked too: its next handshake fails; C is unaffected.
    std::fs::write(&crl_path, crl(&gov, &[&b_seal, &b_tls_cert], 3600)).unwrap();
    admin.reload_crls(ReloadCrlsRequest {}).await.unwrap();
    assert!(call_fresh(&broker.url, &b_tls).await.is_err());
    call_fresh(&broker.url, &c_tls).await.unwrap();

    // A refresh that cannot read the file keeps the CRLs in force and says so.
    std::fs::write(&crl_path, b"not a CRL").unwrap();
    let failed = admin.reload_crls(ReloadCrlsRequest {}).await.unwrap_err();
    assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    assert!(
        failed.message().contains("issuing.crl"),
        "{}",
        failed.message()
    );
    assert!(
        call_fresh(&broker.url, &b_tls).await.is_err(),
        "still revoked"
    );
    let (code, text) = readyz(&admin_url).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("could not be refreshed"), "{text}");

    // A stale CRL (past nextUpdate, no grace): its CA's certificates are refused even
    // when not revoked, and the broker says why it is not ready.
    std::fs::write(&crl_path, crl(&gov, &[], -300)).unwrap();
    let state = admin
        .reload_crls(ReloadCrlsRequest {})
        .await
        .unwrap()
        .into_inner()
        .crls;
    assert!(state[0].stale, "{state:?}");
    assert!(
        call_fresh(&broker.url, &c_tls).await.is_err(),
        "stale CRL refused"
    );
    let (code, text) = readyz(&admin_url).await;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("stale CRL"), "{text}");
    let metrics = reqwest::get(format!("{admin_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("lienthong_broker_crls_stale 1"),
        "{metrics}"
    );
    // Dev-PKI agencies (a CA without a configured CRL) are not affected.
    call_fresh(&broker.url, &world.agency_tls(A)).await.unwrap();

    // A fresh CRL: ready again, C accepted.
    std::fs::write(&crl_path, crl(&gov, &[], 3600)).unwrap();
    admin.reload_crls(ReloadCrlsRequest {}).await.unwrap();
    call_fresh(&broker.url, &c_tls).await.unwrap();
    assert_eq!(readyz(&admin_url).await.0, 200);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crls_are_re_read_on_schedule_and_a_grace_accepts_a_late_crl() {
    let world = World::new();
    let gov = GovPki::generate("http://crl.example.invalid/issuing.crl").unwrap();
    let c_tls_cert = leaf(&gov, "Sở Nội vụ");
    let crl_path = world.path("issuing.crl");
    // Already past its nextUpdate, but within the grace.
    std::fs::write(&crl_path, crl(&gov, &[], -300)).unwrap();
    let mut config = world.broker_config("broker");
    config
        .tls
        .ca_pem
        .extend_from_slice(gov.root_pem().as_bytes());
    config.crl_files = vec![crl_path.clone()];
    config.crl_refresh_interval = Duration::from_millis(200);
    config.crl_stale_grace = Duration::from_secs(3600);
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let mut admin = admin_client(&world, &broker.url).await;
    admin
        .bind_certificate(BindCertificateRequest {
            code: C.into(),
            cert_der: c_tls_cert.cert_der.clone(),
        })
        .await
        .unwrap();
    let c_tls = tls_of(&world, &c_tls_cert);
    call_fresh(&broker.url, &c_tls).await.unwrap();
    assert_eq!(readyz(&admin_url).await.0, 200);

    // C revoked in the file: the schedule picks it up with no call from anyone.
    std::fs::write(&crl_path, crl(&gov, &[&c_tls_cert], 3600)).unwrap();
    let mut last = None;
    let refused = wait_until(
        "C refused after the scheduled refresh",
        Duration::from_secs(20),
        || {
            let url = broker.url.clone();
            let tls = c_tls.clone();
            async move { Some(call_fresh(&url, &tls).await.is_err()) }
        },
        |refused| *refused,
        &mut last,
    )
    .await;
    assert!(refused.is_some());
    broker.stop().await;
}
