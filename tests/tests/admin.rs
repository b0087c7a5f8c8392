//! The operators' admin service over real mutual TLS: one document's timeline and
//! evidence, agency registration, suspension and resumption, and `lienthong admin`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lienthong_proto::TrustAnchors;
use lienthong_proto::document::seal;
use lienthong_proto::document::verify_document;
use lienthong_proto::pb::{
    AgenciesRequest, AgentMessage, DeliveryState, Hello, MessageRequest, MessageResponse,
    ReceiptKind, RegisterAgencyRequest, ResumeAgencyRequest, StatusRequest, SuspendAgencyRequest,
    admin_client::AdminClient, agent_message::Msg, broker_message,
};
use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
use lienthong_proto::signing::VerifyTime;
use lienthong_tests::*;
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");
/// A department not in the dev PKI, registered by the operator in these tests.
const NEW: &str = "000.00.20.H31";

fn anchors(world: &World) -> TrustAnchors {
    TrustAnchors::from_pem(&std::fs::read(&world.pki.ca_cert).unwrap()).unwrap()
}

async fn message(admin: &AdminClient<Channel>, id: &str) -> Result<MessageResponse, tonic::Status> {
    admin
        .clone()
        .message(MessageRequest { id: id.into() })
        .await
        .map(|r| r.into_inner())
}

async fn wait_message(
    admin: &AdminClient<Channel>,
    id: &str,
    what: &str,
    done: impl Fn(&MessageResponse) -> bool,
) -> MessageResponse {
    let mut last = None;
    let found = wait_until(
        what,
        Duration::from_secs(30),
        || async { message(admin, id).await.ok() },
        done,
        &mut last,
    )
    .await;
    found.unwrap_or_else(|| panic!("timed out waiting for {what}; last: {last:?}"))
}

fn state_of(m: &MessageResponse, agency: &str) -> i32 {
    m.timelines
        .iter()
        .find(|t| t.agency == agency)
        .unwrap()
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_by_id_or_business_id_shows_the_timeline_and_evidence_that_verifies() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    // C stays offline: its copy stays queued.
    let id = a
        .send(&[B, C], "Về việc tra cứu", &[("a.txt", b"tra cuu")])
        .await;
    let status = a
        .wait_status(&id, "delivered to B", |v| {
            v.recipients
                .iter()
                .any(|r| r.agency == B && r.state == "delivered")
        })
        .await;
    let admin = admin_client(&world, &broker.url).await;
    let by_id = wait_message(&admin, &id, "B's receipt at the broker", |m| {
        state_of(m, B) == DeliveryState::Delivered as i32
    })
    .await;
    assert_eq!(by_id.message_id, id);
    assert_eq!(by_id.business_id, status.business_id);
    assert_eq!(by_id.sender, A);
    assert_eq!(by_id.recipients, vec![B.to_owned(), C.to_owned()]);
    assert_eq!(by_id.subject, "Về việc tra cứu");
    assert!(by_id.accepted_at_ms > 0 && by_id.expires_at_ms > by_id.accepted_at_ms);
    assert!(by_id.created_at_ms > 0);

    // Looked up by the business document id: the same document.
    let by_business = message(&admin, &status.business_id).await.unwrap();
    assert_eq!(by_business.message_id, id);
    assert_eq!(by_business.timelines.len(), 2);

    // Evidence: the sender's signature, the broker's receipt, B's receipt.
    let anchors = anchors(&world);
    let verified =
        verify_document(by_id.envelope.as_ref().unwrap(), &anchors, VerifyTime::Now).unwrap();
    assert_eq!(verified.header.message_id, id);
    let submission = verify_receipt(
        by_id.submission_receipt.as_ref().unwrap(),
        &anchors,
        &ExpectedReceipt {
            kind: ReceiptKind::Submission,
            message_id: &id,
            header_sha256: &verified.header_sha256,
            recipient: None,
            live: false,
        },
    )
    .unwrap();
    assert_eq!(submission.at_ms, by_id.accepted_at_ms);

    let timeline_b = by_id.timelines.iter().find(|t| t.agency == B).unwrap();
    let delivery = verify_receipt(
        timeline_b.delivery_receipt.as_ref().unwrap(),
        &anchors,
        &ExpectedReceipt {
            kind: ReceiptKind::Delivery,
            message_id: &id,
            header_sha256: &verified.header_sha256,
            recipient: Some(B),
            live: false,
        },
    )
    .unwrap();
    assert_eq!(delivery.recipient, B);
    let events: Vec<(&str, &str)> = timeline_b
        .events
        .iter()
        .map(|e| (e.event.as_str(), e.detail.as_str()))
        .collect();
    assert_eq!(events.first().unwrap().0, "accepted", "{events:?}");
    assert!(events.contains(&("pushed", "acknowledged")), "{events:?}");
    assert_eq!(events.last().unwrap().0, "delivered", "{events:?}");
    assert!(
        timeline_b
            .events
            .windows(2)
            .all(|w| w[0].at_ms <= w[1].at_ms)
    );

    let timeline_c = by_id.timelines.iter().find(|t| t.agency == C).unwrap();
    assert_eq!(timeline_c.state, DeliveryState::Queued as i32);
    assert_eq!(timeline_c.events.len(), 1, "{timeline_c:?}");
    assert!(timeline_c.delivery_receipt.is_none() && timeline_c.notice.is_none());

    let missing = message(&admin, "khong-co-van-ban-nay").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing.message().contains("khong-co-van-ban-nay"),
        "{}",
        missing.message()
    );

    // The CLI prints the same as a timeline.
    let out = run_admin(&world, &broker.url, &["message", &id]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&status.business_id), "{text}");
    assert!(text.contains("delivered"), "{text}");
    assert!(text.contains("acknowledged"), "{text}");
    assert!(text.contains("signed delivery receipt"), "{text}");
    let out = run_admin(
        &world,
        &broker.url,
        &["message", &status.business_id, "--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["message_id"], id.as_str());
    assert!(json["submission_receipt"].is_string());
    let out = run_admin(&world, &broker.url, &["message", "khong-co"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_agency_neither_sends_nor_receives_and_resume_delivers_the_queue_once() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let key_a = world.agency_tls(A).signing_key().unwrap();
    let key_b = world.agency_tls(B).signing_key().unwrap();
    let mut client_a = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let mut client_b = exchange_client(&broker.url, world.agency_tls(B).client_config("localhost"))
        .await
        .unwrap();
    let queued = header(A, &[B], &[]);
    submit(&mut client_a, seal(&queued, &key_a).unwrap(), &[])
        .await
        .unwrap();

    // B's session takes the delivery and does not acknowledge it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(AgentMessage {
        msg: Some(Msg::Hello(Hello {
            window: 8,
            partial: Vec::new(),
            max_batch: 0,
        })),
    })
    .await
    .unwrap();
    let mut stream = client_b
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a delivery")
        .unwrap()
        .unwrap();
    assert!(matches!(first.msg, Some(broker_message::Msg::Delivery(_))));

    let mut admin = admin_client(&world, &broker.url).await;
    let reason = "kiểm tra an ninh";
    let info = admin
        .suspend_agency(SuspendAgencyRequest {
            code: B.into(),
            reason: reason.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.suspended);
    assert_eq!(info.suspended_reason, reason);

    // The open session ends.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the suspended agency's session ends");
    assert!(!matches!(ended, Ok(Some(_))));
    drop(tx);

    // A new session is refused.
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let refused = client_b
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!("agency {B} is suspended: {reason}")
    );

    // B's own submissions are refused.
    let from_b = header(B, &[A], &[]);
    let refused = submit(&mut client_b, seal(&from_b, &key_b).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert_eq!(
        refused.message(),
        format!("agency {B} is suspended: {reason}")
    );

    // A document addressed to B is refused at submission, naming B; nothing is stored.
    let to_b = header(A, &[C, B], &[]);
    let refused = submit(&mut client_a, seal(&to_b, &key_a).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!("recipient {B} is suspended")),
        "{}",
        refused.message()
    );
    let missing = client_a
        .status(StatusRequest {
            message_id: to_b.message_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // The queued delivery waits; its timeline shows the attempt cut by the suspension.
    let waiting = message(&admin, &queued.message_id).await.unwrap();
    assert_eq!(state_of(&waiting, B), DeliveryState::Queued as i32);
    let listed = admin
        .agencies(AgenciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .agencies;
    let b_info = listed.iter().find(|a| a.code == B).unwrap();
    assert!(b_info.suspended);
    assert_eq!(b_info.parent, A);

    // The real agent cannot connect while suspended; after resume it gets the
    // queued document exactly once.
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let info = admin
        .resume_agency(ResumeAgencyRequest { code: B.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!info.suspended && info.suspended_reason.is_empty());
    wait_for_path(&world.inbox_dir(B).join(&queued.message_id)).await;
    let delivered = wait_message(&admin, &queued.message_id, "delivered after resume", |m| {
        state_of(m, B) == DeliveryState::Delivered as i32
    })
    .await;
    let timeline = &delivered.timelines[0];
    assert!(
        timeline
            .events
            .iter()
            .any(|e| e.event == "pushed" && e.detail == "session ended"),
        "{timeline:?}"
    );
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&queued.message_id)).await;
    assert_eq!(
        inbox_entries(&world.inbox_dir(B)),
        vec![queued.message_id.clone()]
    );
    // And B sends again.
    let again = header(B, &[A], &[]);
    submit(&mut client_b, seal(&again, &key_b).unwrap(), &[])
        .await
        .unwrap();
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_registers_a_new_agency_and_agency_certificates_are_refused() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.auto_register = false;
    let broker = Broker::start(config).await;
    let mut admin = admin_client(&world, &broker.url).await;
    let key_a = world.agency_tls(A).signing_key().unwrap();
    let mut client_a = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();

    let to_new = header(A, &[NEW], &[]);
    let refused = submit(&mut client_a, seal(&to_new, &key_a).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    let info = admin
        .register_agency(RegisterAgencyRequest {
            code: NEW.into(),
            name: "Sở Y tế".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.code, NEW);
    assert_eq!(info.name, "Sở Y tế");
    assert_eq!(info.parent, A);
    assert!(!info.auto_registered && !info.suspended && info.registered_at_ms > 0);
    submit(&mut client_a, seal(&to_new, &key_a).unwrap(), &[])
        .await
        .unwrap();

    let again = admin
        .register_agency(RegisterAgencyRequest {
            code: NEW.into(),
            name: "lần hai".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    let bad = admin
        .register_agency(RegisterAgencyRequest {
            code: "H31".into(),
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let unknown = admin
        .suspend_agency(SuspendAgencyRequest {
            code: "000.00.99.H31".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let codes: Vec<String> = admin
        .agencies(AgenciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .agencies
        .into_iter()
        .map(|a| a.code)
        .collect();
    assert_eq!(codes, vec![A, B, C, NEW]);

    // Agency certificates may not use any of it.
    let channel = tonic::transport::Endpoint::from_shared(broker.url.clone())
        .unwrap()
        .tls_config(world.agency_tls(B).client_config("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut as_agency = AdminClient::new(channel);
    let denied = as_agency.agencies(AgenciesRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = as_agency
        .suspend_agency(SuspendAgencyRequest {
            code: A.into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = as_agency
        .register_agency(RegisterAgencyRequest {
            code: "000.00.21.H31".into(),
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = as_agency
        .message(MessageRequest {
            id: to_new.message_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    broker.stop().await;
}

async fn run_admin(world: &World, url: &str, args: &[&str]) -> std::process::Output {
    run_admin_cli(std::path::Path::new(BIN), world, url, args).await
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_admin_agencies_prints_the_tree_and_manages_agencies() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let out = run_admin(
        &world,
        &broker.url,
        &["agencies", "register", NEW, "--name", "Sở Y tế"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run_admin(
        &world,
        &broker.url,
        &["agencies", "suspend", C, "--reason", "bảo trì"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = run_admin(&world, &broker.url, &["agencies"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with(A), "{text}");
    assert!(lines[1].starts_with(&format!("  {B}")), "{text}");
    assert!(lines[2].starts_with(&format!("  {C}")), "{text}");
    assert!(
        lines[2].contains("SUSPENDED") && lines[2].contains("bảo trì"),
        "{text}"
    );
    assert!(lines[3].starts_with(&format!("  {NEW}  Sở Y tế")), "{text}");
    assert!(lines[3].contains("[active]"), "{text}");

    let out = run_admin(&world, &broker.url, &["agencies", "list", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row_c = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["code"] == C)
        .unwrap();
    assert_eq!(row_c["status"], "suspended");
    assert_eq!(row_c["parent"], A);
    assert_eq!(row_c["suspended_reason"], "bảo trì");

    let out = run_admin(&world, &broker.url, &["agencies", "resume", C]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("[active]"));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_count_delivered_and_dead_lettered_documents_of_the_last_hour_and_day() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.expiry_check_interval = Duration::from_millis(50);
    let broker = Broker::start(config).await;
    let key_a = world.agency_tls(A).signing_key().unwrap();
    let mut client_a = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    for _ in 0..2 {
        let to_b = header(A, &[B], &[]);
        submit(&mut client_a, seal(&to_b, &key_a).unwrap(), &[])
            .await
            .unwrap();
    }
    // C is offline and the document expires quickly: a dead letter.
    let mut to_c = header(A, &[C], &[]);
    to_c.expires_at_ms = lienthong_proto::now_ms() + 300;
    submit(&mut client_a, seal(&to_c, &key_a).unwrap(), &[])
        .await
        .unwrap();

    let admin = admin_client(&world, &broker.url).await;
    let mut last = None;
    let counted = wait_until(
        "two deliveries to B and one dead letter for C counted",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .queues(lienthong_proto::pb::QueuesRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner().queues)
            }
        },
        |queues| {
            let row = |code: &str| queues.iter().find(|q| q.agency == code).cloned();
            row(B).is_some_and(|q| q.delivered_last_hour == 2)
                && row(C).is_some_and(|q| q.dead_lettered_last_hour == 1)
        },
        &mut last,
    )
    .await;
    let queues = counted.unwrap_or_else(|| panic!("{last:?}"));
    let row_b = queues.iter().find(|q| q.agency == B).unwrap();
    assert_eq!(
        (row_b.delivered_last_day, row_b.dead_lettered_last_day),
        (2, 0)
    );
    let row_c = queues.iter().find(|q| q.agency == C).unwrap();
    assert_eq!(
        (row_c.delivered_last_day, row_c.dead_lettered_last_day),
        (0, 1)
    );

    let out = run_admin(&world, &broker.url, &["queues", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let json_b = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agency"] == B)
        .unwrap();
    assert_eq!(json_b["delivered_last_hour"], 2);
    assert_eq!(json_b["delivered_last_day"], 2);
    let out = run_admin(&world, &broker.url, &["queues"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("DELIV 1h/24h"), "{text}");
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_chains_accepted_documents_receipts_and_suspensions() {
    use lienthong_proto::pb::{AuditTailRequest, AuditVerifyRequest};
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let id = a.send(&[B], "Nhật ký kiểm toán", &[("a.txt", b"x")]).await;
    let mut admin = admin_client(&world, &broker.url).await;
    let delivered = wait_message(&admin, &id, "delivered", |m| {
        state_of(m, B) == DeliveryState::Delivered as i32
    })
    .await;
    admin
        .suspend_agency(SuspendAgencyRequest {
            code: C.into(),
            reason: "bảo trì".into(),
        })
        .await
        .unwrap();
    admin
        .resume_agency(lienthong_proto::pb::ResumeAgencyRequest { code: C.into() })
        .await
        .unwrap();
    admin
        .register_agency(RegisterAgencyRequest {
            code: "000.00.20.H31".into(),
            name: "Sở Y tế".into(),
        })
        .await
        .unwrap();

    let all_entries = admin
        .audit_tail(AuditTailRequest { n: 1000 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    // A's and B's certificates were bound on their first use (issue 12), at moments
    // that depend on when each agent connected: checked apart from the rest.
    let bound: Vec<&str> = all_entries
        .iter()
        .filter(|e| e.kind == "certificate_bound")
        .map(|e| e.agency.as_str())
        .collect();
    assert_eq!(bound.len(), 2, "{all_entries:?}");
    assert!(bound.contains(&A) && bound.contains(&B), "{bound:?}");
    let entries: Vec<_> = all_entries
        .iter()
        .filter(|e| e.kind != "certificate_bound")
        .cloned()
        .collect();
    // The three startup registrations, the document, its receipt, the suspension.
    let kinds: Vec<&str> = entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "agency_registered",
            "agency_registered",
            "agency_registered",
            "accepted",
            "delivered",
            "agency_suspended",
            "agency_resumed",
            "agency_registered"
        ]
    );
    let header_sha256 = verify_document(
        delivered.envelope.as_ref().unwrap(),
        &anchors(&world),
        VerifyTime::Now,
    )
    .unwrap()
    .header_sha256;
    let accepted = &entries[3];
    assert_eq!(
        (accepted.message_id.as_str(), accepted.agency.as_str()),
        (id.as_str(), A)
    );
    assert_eq!(accepted.header_sha256, header_sha256.to_vec());
    assert_eq!(entries[4].agency, B);
    // Every operator action names the operator; startup registrations name the config.
    assert_eq!(
        entries[5].detail,
        "bảo trì (suspended by operator operator)"
    );
    assert_eq!(entries[6].detail, "resumed by operator operator");
    assert_eq!(
        entries[7].detail,
        "Sở Y tế (registered by operator operator)"
    );
    assert!(
        entries[..3].iter().all(|e| e
            .detail
            .ends_with("(registered by the broker's configuration (--register))")),
        "{entries:?}"
    );
    for (seq, pair) in all_entries.windows(2).enumerate() {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
        assert_eq!(pair[1].seq, seq as u64 + 1);
    }
    let verified = admin
        .audit_verify(AuditVerifyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact, "{verified:?}");
    assert_eq!(verified.entries, 10);
    assert_eq!(verified.head_hash, entries[7].hash);

    let out = run_admin(&world, &broker.url, &["audit", "verify"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact: 10 entries"));
    let out = run_admin(&world, &broker.url, &["audit", "tail", "-n", "5"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(text.contains("delivered") && text.contains(&id), "{text}");
    assert!(text.contains("suspended by operator operator"), "{text}");

    // Agency certificates may not read it.
    let channel = tonic::transport::Endpoint::from_shared(broker.url.clone())
        .unwrap()
        .tls_config(world.agency_tls(A).client_config("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let denied = AdminClient::new(channel)
        .audit_tail(AuditTailRequest { n: 1 })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
