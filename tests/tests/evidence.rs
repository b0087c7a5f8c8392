//! Evidence that cannot be forged (DESIGN.md section 5): an exported folder holds the
//! sender's envelope, the broker's submission receipt and the recipient's delivery
//! receipt, and `lienthong verify` checks all three, taking the trusted time from the
//! broker's receipt. A document signed today with an expired key and backdated is
//! refused however it is dressed up; a genuine old document whose signer certificate
//! expired after the broker accepted it stays valid.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lienthong_certs_dev::LeafSpec;
use lienthong_proto::document::{describe_attachment, verify_document};
use lienthong_proto::pb::{self, ReceiptKind, Signed};
use lienthong_proto::receipt::sign_receipt;
use lienthong_proto::signing::{Domain, VerifyTime};
use lienthong_proto::{SigningKey, TrustAnchors, now_ms, sha256};
use lienthong_tests::fake_broker::FakeExchange;
use lienthong_tests::*;
use prost::Message;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");
const DAY: Duration = Duration::from_secs(86_400);
const DAY_MS: i64 = 86_400_000;

fn lienthong(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// `lienthong verify DIR --ca CA`: (exit code, stdout, stderr).
fn verify(world: &World, dir: &Path) -> (Option<i32>, String, String) {
    let out = lienthong(&[
        "verify",
        &dir.display().to_string(),
        "--ca",
        &world.pki.ca_cert.display().to_string(),
    ]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[track_caller]
fn assert_invalid(world: &World, dir: &Path, needles: &[&str]) {
    let (code, stdout, stderr) = verify(world, dir);
    assert_eq!(code, Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stdout.contains("VALID"), "{stdout}");
    assert!(stderr.contains("INVALID"), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

fn key_for(world: &World, spec: &LeafSpec) -> SigningKey {
    let issued = world.ca.issue(spec).unwrap();
    SigningKey::from_pem(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).unwrap()
}

/// A broker key whose certificate has been valid for 60 days (it can sign evidence
/// dated in the past) and still is.
fn old_broker_key(world: &World) -> SigningKey {
    let mut spec = LeafSpec::server(&["localhost"]);
    spec.not_before -= 60 * DAY;
    key_for(world, &spec)
}

/// An agency key valid for the last 60 days and still.
fn old_agency_key(world: &World, code: &str) -> SigningKey {
    let mut spec = LeafSpec::agency(code);
    spec.not_before -= 60 * DAY;
    key_for(world, &spec)
}

fn receipt(
    kind: ReceiptKind,
    header: &pb::DocumentHeader,
    envelope: &Signed,
    at_ms: i64,
    recipient: &str,
) -> pb::Receipt {
    pb::Receipt {
        kind: kind as i32,
        message_id: header.message_id.clone(),
        header_sha256: sha256(&envelope.payload).to_vec(),
        at_ms,
        issuer: if kind == ReceiptKind::Submission {
            "broker:localhost".into()
        } else {
            recipient.into()
        },
        business_id: header.business_id.clone(),
        sender: header.sender.clone(),
        recipient: if kind == ReceiptKind::Submission {
            String::new()
        } else {
            recipient.into()
        },
        ..Default::default()
    }
}

const BODY: &[u8] = b"%PDF-1.4 quyet dinh so 7";

/// A header from A to B created at `created_at_ms`, with one attachment.
fn backdated_header(created_at_ms: i64) -> pb::DocumentHeader {
    let mut h = header(A, &[B], &[("qd.pdf", BODY)]);
    h.created_at_ms = created_at_ms;
    h.attachments = vec![describe_attachment("qd.pdf", "application/pdf", BODY)];
    h
}

/// Writes an export-like folder: the envelope, the receipts given and the attachment.
fn write_folder(
    dir: &Path,
    envelope: &Signed,
    submission: Option<&Signed>,
    delivery: Option<&Signed>,
) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("envelope.pb"), envelope.encode_to_vec()).unwrap();
    if let Some(s) = submission {
        std::fs::write(dir.join("submission-receipt.pb"), s.encode_to_vec()).unwrap();
    }
    if let Some(d) = delivery {
        std::fs::write(dir.join("delivery-receipt.pb"), d.encode_to_vec()).unwrap();
    }
    std::fs::write(dir.join("qd.pdf"), BODY).unwrap();
    dir.to_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn read_signed(path: &Path) -> Signed {
    Signed::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backdated_document_signed_with_an_expired_key_is_refused() {
    let world = World::new();
    let anchors = TrustAnchors::from_pem(&std::fs::read(&world.pki.ca_cert).unwrap()).unwrap();
    // A's certificate was valid from 30 days ago until yesterday.
    let expired = key_for(&world, &LeafSpec::agency(A).expired());
    let now = now_ms();
    // Signed today, claiming to be 10 days old: inside the certificate's validity.
    let h = backdated_header(now - 10 * DAY_MS);
    let forged = expired
        .sign(Domain::DocumentHeader, h.encode_to_vec().into())
        .unwrap();
    // What the old check trusted: at the signer's own created_at the chain is fine.
    // (So the refusals below come from the trusted time, not from a broken forgery.)
    verify_document(&forged, &anchors, VerifyTime::AtMs(h.created_at_ms)).unwrap();
    assert!(verify_document(&forged, &anchors, VerifyTime::Now).is_err());

    // 1. Alone, as the old folder layout had it: no broker receipt, no trusted time.
    let alone = write_folder(&world.path("forged-alone"), &forged, None, None);
    assert_invalid(&world, &alone, &["submission-receipt.pb"]);

    // 2. With a real broker receipt stamped today (as if the broker had accepted it):
    // the certificate was not valid at the trusted time.
    let broker = old_broker_key(&world);
    let b_key = old_agency_key(&world, B);
    let submission = sign_receipt(
        &receipt(ReceiptKind::Submission, &h, &forged, now, ""),
        &broker,
    )
    .unwrap();
    let delivery = sign_receipt(
        &receipt(ReceiptKind::Delivery, &h, &forged, now + 1000, B),
        &b_key,
    )
    .unwrap();
    let today = write_folder(
        &world.path("forged-today"),
        &forged,
        Some(&submission),
        Some(&delivery),
    );
    assert_invalid(
        &world,
        &today,
        &["sender signature", "expired", "trusted time"],
    );

    // 3. With receipts borrowed from a genuine exchange: they name other header bytes.
    let broker_process = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker_process.url)).await;
    let b = Agent::start(world.agent_config(B, &broker_process.url)).await;
    let id = a.send(&[B], "Văn bản thật", &[("qd.pdf", BODY)]).await;
    let genuine = world.inbox_dir(B).join(&id);
    wait_for_path(&genuine).await;
    let borrowed = write_folder(
        &world.path("forged-borrowed"),
        &forged,
        Some(&read_signed(&genuine.join("submission-receipt.pb"))),
        Some(&read_signed(&genuine.join("delivery-receipt.pb"))),
    );
    assert_invalid(&world, &borrowed, &["submission receipt", "differs"]);

    // 4. And the broker never issues a receipt for it: the expired signer is refused
    // at submission, and nothing is stored.
    let mut exchange = exchange_client(
        &broker_process.url,
        world.agency_tls(A).client_config("localhost"),
    )
    .await
    .unwrap();
    let refused = submit(&mut exchange, forged.clone(), &[BODY]).await;
    let status = refused.expect_err("the broker refuses an expired signer");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    let mut admin = admin_client(&world, &broker_process.url).await;
    let lookup = admin
        .message(pb::MessageRequest {
            id: h.message_id.clone(),
        })
        .await;
    assert_eq!(
        lookup.expect_err("not stored").code(),
        tonic::Code::NotFound
    );

    a.stop().await;
    b.stop().await;
    broker_process.stop().await;
}

#[test]
fn an_old_document_whose_certificate_expired_after_submission_stays_valid() {
    let world = World::new();
    let expired = key_for(&world, &LeafSpec::agency(A).expired());
    let broker = old_broker_key(&world);
    let b_key = old_agency_key(&world, B);
    let accepted_at = now_ms() - 10 * DAY_MS;
    let h = backdated_header(accepted_at - 60_000);
    let envelope = expired
        .sign(Domain::DocumentHeader, h.encode_to_vec().into())
        .unwrap();
    let submission = sign_receipt(
        &receipt(ReceiptKind::Submission, &h, &envelope, accepted_at, ""),
        &broker,
    )
    .unwrap();
    let delivery = sign_receipt(
        &receipt(ReceiptKind::Delivery, &h, &envelope, accepted_at + 5_000, B),
        &b_key,
    )
    .unwrap();
    let dir = write_folder(
        &world.path("old"),
        &envelope,
        Some(&submission),
        Some(&delivery),
    );
    let (code, stdout, stderr) = verify(&world, &dir);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("3 signatures checked"), "{stdout}");
    assert!(stdout.contains("expired since"), "{stdout}");
    let trusted = lienthong_proto::rfc3339_ms(accepted_at).unwrap();
    assert!(
        stdout.contains(&format!("trusted time  {trusted}")),
        "{stdout}"
    );

    // A delivery receipt dated before the broker accepted the document is refused.
    let early = sign_receipt(
        &receipt(ReceiptKind::Delivery, &h, &envelope, accepted_at - 1, B),
        &b_key,
    )
    .unwrap();
    let dir = write_folder(
        &world.path("early"),
        &envelope,
        Some(&submission),
        Some(&early),
    );
    assert_invalid(
        &world,
        &dir,
        &["delivery receipt", "before the broker accepted"],
    );
}

#[test]
fn a_signer_certificate_not_yet_valid_at_the_trusted_time_is_refused() {
    let world = World::new();
    let mut spec = LeafSpec::agency(A);
    spec.not_before += 2 * DAY;
    spec.not_after = spec.not_before + 30 * DAY;
    let future = key_for(&world, &spec);
    let broker = old_broker_key(&world);
    let b_key = old_agency_key(&world, B);
    let now = now_ms();
    // Claims to be created 3 days from now, when the certificate will be valid.
    let h = backdated_header(now + 3 * DAY_MS);
    let envelope = future
        .sign(Domain::DocumentHeader, h.encode_to_vec().into())
        .unwrap();
    let submission = sign_receipt(
        &receipt(ReceiptKind::Submission, &h, &envelope, now, ""),
        &broker,
    )
    .unwrap();
    let delivery = sign_receipt(
        &receipt(ReceiptKind::Delivery, &h, &envelope, now + 10, B),
        &b_key,
    )
    .unwrap();
    let dir = write_folder(
        &world.path("future"),
        &envelope,
        Some(&submission),
        Some(&delivery),
    );
    assert_invalid(
        &world,
        &dir,
        &["sender signature", "not valid yet", "trusted time"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exported_folder_verifies_with_three_signatures_and_tampered_receipts_are_refused() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let c = Agent::start(world.agent_config(C, &broker.url)).await;
    let id = a.send(&[B], "Bằng chứng đầy đủ", &[("qd.pdf", BODY)]).await;
    let other = a
        .send(&[B, C], "Văn bản khác", &[("khac.pdf", b"khac")])
        .await;
    let folder = world.inbox_dir(B).join(&id);
    let other_folder = world.inbox_dir(B).join(&other);
    wait_for_path(&folder).await;
    wait_for_path(&other_folder).await;
    wait_for_path(&world.inbox_dir(C).join(&other)).await;

    // All three signatures are in the folder, exactly as the agents hold them.
    let submission = read_signed(&folder.join("submission-receipt.pb"));
    let delivery = read_signed(&folder.join("delivery-receipt.pb"));
    let submitted = pb::Receipt::decode(submission.payload.as_ref()).unwrap();
    assert_eq!(submitted.kind, ReceiptKind::Submission as i32);
    assert_eq!(submitted.message_id, id);

    let (code, stdout, stderr) = verify(&world, &folder);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    for needle in [
        "VALID",
        "3 signatures checked",
        "1 origin      signed by sender 000.00.00.H31",
        "2 submission  broker receipt",
        "3 delivery    recipient receipt by 000.00.12.H31",
        "certificate valid at the trusted time and now",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in {stdout}");
    }
    let trusted = lienthong_proto::rfc3339_ms(submitted.at_ms).unwrap();
    assert!(
        stdout.contains(&format!("trusted time  {trusted}")),
        "{stdout}"
    );
    let json = lienthong(&[
        "verify",
        &folder.display().to_string(),
        "--ca",
        &world.pki.ca_cert.display().to_string(),
        "--json",
    ]);
    assert_eq!(json.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["trusted_time"], trusted.as_str());
    assert_eq!(report["signatures"].as_array().unwrap().len(), 3);
    assert_eq!(report["signatures"][2]["signer"], B);

    // Each tampering is refused, naming which signature failed.
    let variant = |name: &str, change: &dyn Fn(&Path)| {
        let dir = world.path(&format!("tampered-{name}"));
        copy_dir(&folder, &dir);
        change(&dir);
        dir
    };
    // One bit of the signature, or of the signed receipt bytes (the last field: the
    // digest or the time it states).
    let flip = |file: &'static str, in_signature: bool| {
        move |dir: &Path| {
            let path = dir.join(file);
            let mut signed = read_signed(&path);
            if in_signature {
                signed.signature[10] ^= 1;
            } else {
                let mut payload = signed.payload.to_vec();
                let last = payload.len() - 1;
                payload[last] ^= 1;
                signed.payload = payload.into();
            }
            std::fs::write(&path, signed.encode_to_vec()).unwrap();
        }
    };
    let cases: Vec<(&str, PathBuf, Vec<&str>)> = vec![
        (
            "submission-signature",
            variant("sub-sig", &flip("submission-receipt.pb", true)),
            vec!["submission receipt", "signature"],
        ),
        (
            "submission-payload",
            variant("sub-payload", &flip("submission-receipt.pb", false)),
            vec!["submission receipt"],
        ),
        (
            "delivery-signature",
            variant("del-sig", &flip("delivery-receipt.pb", true)),
            vec!["delivery receipt", "signature"],
        ),
        (
            "delivery-payload",
            variant("del-payload", &flip("delivery-receipt.pb", false)),
            vec!["delivery receipt"],
        ),
        (
            "receipts-swapped",
            variant("swapped", &|dir: &Path| {
                std::fs::rename(dir.join("delivery-receipt.pb"), dir.join("tmp")).unwrap();
                std::fs::rename(
                    dir.join("submission-receipt.pb"),
                    dir.join("delivery-receipt.pb"),
                )
                .unwrap();
                std::fs::rename(dir.join("tmp"), dir.join("submission-receipt.pb")).unwrap();
            }),
            vec!["submission receipt"],
        ),
        (
            "submission-of-another-document",
            variant("other-sub", &|dir: &Path| {
                std::fs::copy(
                    other_folder.join("submission-receipt.pb"),
                    dir.join("submission-receipt.pb"),
                )
                .unwrap();
            }),
            vec!["submission receipt", "differs"],
        ),
        (
            "delivery-of-another-document",
            variant("other-del", &|dir: &Path| {
                std::fs::copy(
                    other_folder.join("delivery-receipt.pb"),
                    dir.join("delivery-receipt.pb"),
                )
                .unwrap();
            }),
            vec!["delivery receipt", "differs"],
        ),
        (
            "delivery-missing",
            variant("no-del", &|dir: &Path| {
                std::fs::remove_file(dir.join("delivery-receipt.pb")).unwrap();
            }),
            vec!["delivery-receipt.pb"],
        ),
        (
            "submission-missing",
            variant("no-sub", &|dir: &Path| {
                std::fs::remove_file(dir.join("submission-receipt.pb")).unwrap();
            }),
            vec!["submission-receipt.pb"],
        ),
        (
            // C signs a receipt claiming B received it.
            "delivery-signed-by-another-agency",
            variant("c-signs", &|dir: &Path| {
                let c_key = world.agency_tls(C).signing_key().unwrap();
                let mut claimed = pb::Receipt::decode(delivery.payload.as_ref()).unwrap();
                claimed.issuer = B.into();
                let forged = sign_receipt(&claimed, &c_key).unwrap();
                std::fs::write(dir.join("delivery-receipt.pb"), forged.encode_to_vec()).unwrap();
            }),
            vec!["delivery receipt", "000.00.15.H31"],
        ),
        (
            // The broker's receipt re-signed by an agency: wrong role.
            "submission-signed-by-an-agency",
            variant("agency-sub", &|dir: &Path| {
                let a_key = world.agency_tls(A).signing_key().unwrap();
                let forged = sign_receipt(&submitted, &a_key).unwrap();
                std::fs::write(dir.join("submission-receipt.pb"), forged.encode_to_vec()).unwrap();
            }),
            vec!["submission receipt"],
        ),
        (
            "receipt-file-not-protobuf",
            variant("garbage", &|dir: &Path| {
                std::fs::write(dir.join("delivery-receipt.pb"), b"\xff\xff\xff\xff").unwrap();
            }),
            vec!["delivery receipt", "not a signed message"],
        ),
    ];
    for (name, dir, needles) in &cases {
        let (code, stdout, stderr) = verify(&world, dir);
        assert_eq!(code, Some(1), "{name}: {stdout}\n{stderr}");
        for needle in needles {
            assert!(
                stderr.contains(needle),
                "{name}: {needle:?} not in {stderr}"
            );
        }
    }
    // The genuine folder itself is untouched and still valid.
    assert_eq!(verify(&world, &folder).0, Some(0));

    a.stop().await;
    b.stop().await;
    c.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_deliveries_without_a_valid_submission_receipt() {
    let world = World::new();
    let a_key = world.agency_tls(A).signing_key().unwrap();
    let broker_key = world.broker_tls().signing_key().unwrap();
    let seal = |subject: &str| {
        let mut h = header(A, &[B], &[]);
        h.subject = subject.into();
        let envelope = lienthong_proto::document::seal(&h, &a_key).unwrap();
        (h, envelope)
    };
    let submission_for = |h: &pb::DocumentHeader, envelope: &Signed, key: &SigningKey| {
        sign_receipt(
            &receipt(ReceiptKind::Submission, h, envelope, now_ms(), ""),
            key,
        )
        .unwrap()
    };
    let (missing_h, missing) = seal("no receipt");
    let (other_h, other) = seal("receipt of another document");
    let (agency_h, agency) = seal("receipt signed by an agency");
    let (good_h, good) = seal("genuine");
    let good_receipt = submission_for(&good_h, &good, &broker_key);
    let delivery = |envelope: &Signed, receipt: Option<Signed>| pb::Delivery {
        envelope: Some(envelope.clone()),
        attempt: 1,
        submission_receipt: receipt,
        ..Default::default()
    };
    let deliveries = vec![
        delivery(&missing, None),
        delivery(&other, Some(submission_for(&good_h, &good, &broker_key))),
        delivery(&agency, Some(submission_for(&agency_h, &agency, &a_key))),
        delivery(&good, Some(good_receipt.clone())),
    ];
    // A broker that pushes these on the first session and hands over what the agent
    // answers: the real broker never sends such deliveries.
    let mut fake = FakeExchange::new()
        .session_deliveries(deliveries)
        .serve(&world)
        .await;
    let b = Agent::start(world.agent_config(B, &fake.url)).await;

    // Hello, then one answer per delivery.
    let mut refused = std::collections::HashMap::new();
    let mut acked = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while refused.len() + acked.len() < 4 {
        let message = tokio::time::timeout_at(deadline, fake.answers.recv())
            .await
            .expect("the agent answers every delivery within 30 s")
            .expect("answers channel open");
        match message.msg {
            Some(pb::agent_message::Msg::Refuse(r)) => {
                refused.insert(r.message_id, r.reason);
            }
            Some(pb::agent_message::Msg::Ack(a)) => acked.push(a.message_id),
            _ => {}
        }
    }
    assert_eq!(acked, vec![good_h.message_id.clone()]);
    let reason = |h: &pb::DocumentHeader| refused.get(&h.message_id).cloned().unwrap_or_default();
    assert!(
        reason(&missing_h).contains("carries no submission receipt"),
        "{refused:?}"
    );
    assert!(
        reason(&other_h).contains("submission receipt does not verify")
            && reason(&other_h).contains("differs"),
        "{refused:?}"
    );
    assert!(
        reason(&agency_h).contains("submission receipt does not verify"),
        "{refused:?}"
    );
    // Only the genuine one was stored and exported, with the broker's receipt as sent.
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&good_h.message_id)).await;
    assert_eq!(
        inbox_entries(&world.inbox_dir(B)),
        vec![good_h.message_id.clone()]
    );
    assert_eq!(b.client.inbox().await.unwrap().len(), 1);
    let exported = world.inbox_dir(B).join(&good_h.message_id);
    assert_eq!(
        std::fs::read(exported.join("submission-receipt.pb")).unwrap(),
        good_receipt.encode_to_vec()
    );
    assert!(exported.join("delivery-receipt.pb").is_file());
    b.stop().await;
    fake.stop();
}
