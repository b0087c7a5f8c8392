//! End-to-end exchange over real sockets, real mutual TLS and real sled stores.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_proto::TrustAnchors;
use lienthong_proto::pb::{ReceiptKind, StatusRequest};
use lienthong_proto::receipt::{ExpectedReceipt, verify_receipt};
use lienthong_tests::*;

fn delivered(view: &lienthong_agent::api_types::StatusView) -> bool {
    !view.recipients.is_empty() && view.recipients.iter().all(|r| r.state == "delivered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_with_two_attachments_reaches_both_recipients_with_verified_receipts() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let c = Agent::start(world.agent_config(C, &broker.url)).await;

    let pdf: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let docx = "Nội dung phụ lục – tiếng Việt có dấu".as_bytes().to_vec();
    let id = a
        .send(
            &[B, C],
            "Công văn thử",
            &[("cong-van.pdf", &pdf), ("phu-luc.docx", &docx)],
        )
        .await;

    let view = a.wait_status(&id, "both delivered", delivered).await;
    assert_eq!(view.outbox_state, "submitted");
    assert!(view.submission_receipt_verified);
    assert_eq!(view.recipients.len(), 2);
    for r in &view.recipients {
        assert_eq!(r.receipt_verified, Some(true), "receipt of {}", r.agency);
        assert!(r.delivered_at.is_some());
    }

    for code in [B, C] {
        let folder = world.inbox_dir(code).join(&id);
        wait_for_path(&folder).await;
        assert_eq!(std::fs::read(folder.join("cong-van.pdf")).unwrap(), pdf);
        assert_eq!(std::fs::read(folder.join("phu-luc.docx")).unwrap(), docx);
        assert!(folder.join("envelope.pb").is_file());
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join("document.json")).unwrap()).unwrap();
        assert_eq!(json["message_id"], id.as_str());
        assert_eq!(json["sender"], A);
        assert_eq!(inbox_entries(&world.inbox_dir(code)), vec![id.clone()]);
    }
    let inbox = b.client.inbox().await.unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].message_id, id);
    assert_eq!(inbox[0].sender, A);

    // The broker's status answer carries the evidence; check it independently here.
    let mut raw = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let status = raw
        .status(StatusRequest {
            message_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let anchors = TrustAnchors::from_pem(&std::fs::read(&world.pki.ca_cert).unwrap()).unwrap();
    let envelope = status.envelope.unwrap();
    let header_sha256 = lienthong_proto::sha256(&envelope.payload);
    verify_receipt(
        &status.submission_receipt.unwrap(),
        &anchors,
        &ExpectedReceipt {
            kind: ReceiptKind::Submission,
            message_id: &id,
            header_sha256: &header_sha256,
            recipient: None,
            live: false,
        },
    )
    .unwrap();
    for r in &status.recipients {
        verify_receipt(
            r.delivery_receipt.as_ref().unwrap(),
            &anchors,
            &ExpectedReceipt {
                kind: ReceiptKind::Delivery,
                message_id: &id,
                header_sha256: &header_sha256,
                recipient: Some(&r.agency),
                live: false,
            },
        )
        .unwrap();
    }

    a.stop().await;
    b.stop().await;
    c.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_offline_at_submission_receives_when_it_connects() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let id = a
        .send(&[B], "Gửi khi B vắng mặt", &[("a.txt", b"xin chao")])
        .await;
    let view = a
        .wait_status(&id, "accepted by the broker", |v| {
            v.outbox_state == "submitted"
        })
        .await;
    assert_eq!(view.recipients[0].state, "queued");
    assert!(inbox_entries(&world.inbox_dir(B)).is_empty());

    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    a.wait_status(&id, "delivered to B", delivered).await;
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![id.clone()]);
    assert_eq!(
        std::fs::read(world.inbox_dir(B).join(&id).join("a.txt")).unwrap(),
        b"xin chao"
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_submission_document_waits_in_outbox_then_is_delivered() {
    let world = World::new();
    // Reserve a port for the broker that is not up yet.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let url = format!("https://localhost:{port}");
    let a = Agent::start(world.agent_config(A, &url)).await;
    let b = Agent::start(world.agent_config(B, &url)).await;

    let id = a
        .send(
            &[B],
            "Gửi khi trung tâm mất kết nối",
            &[("a.txt", b"outbox")],
        )
        .await;
    let view = a.client.status(&id).await.unwrap();
    assert_eq!(view.outbox_state, "outbox");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let broker = Broker::start_on(world.broker_config("broker"), listener);
    a.wait_status(&id, "delivered after the broker came up", delivered)
        .await;
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![id.clone()]);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_message_submitted_twice_gives_one_receipt_and_one_delivery() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let tls = world.agency_tls(A);
    let key = tls.signing_key().unwrap();
    let body: &[u8] = b"noi dung";
    let header = header(A, &[B], &[("a.txt", body)]);
    let envelope = lienthong_proto::document::seal(&header, &key).unwrap();
    let mut client = exchange_client(&broker.url, tls.client_config("localhost"))
        .await
        .unwrap();
    let first = submit(&mut client, envelope.clone(), &[body])
        .await
        .unwrap();
    let second = submit(&mut client, envelope, &[body]).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.submission_receipt, second.submission_receipt);

    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    wait_for_path(&world.inbox_dir(B).join(&header.message_id)).await;
    // A later document proves the queue moved past anything a duplicate could have added.
    let later_header = lienthong_tests::header(A, &[B], &[]);
    let later = lienthong_proto::document::seal(&later_header, &key).unwrap();
    submit(&mut client, later, &[]).await.unwrap();
    wait_for_path(&world.inbox_dir(B).join(&later_header.message_id)).await;
    let mut expected = vec![header.message_id.clone(), later_header.message_id.clone()];
    expected.sort();
    assert_eq!(inbox_entries(&world.inbox_dir(B)), expected);
    assert_eq!(b.client.inbox().await.unwrap().len(), 2);
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_outbox_refuses_new_documents_naming_the_limit() {
    let world = World::new();
    // The broker is unreachable: everything stays in the outbox.
    let url = format!("https://localhost:{}", free_port());
    let mut config = world.agent_config(A, &url);
    config.max_outbox_documents = 2;
    config.max_outbox_bytes = 1000;
    let a = Agent::start(config).await;
    a.send(&[B], "Một", &[("a.txt", b"1")]).await;
    a.send(&[B], "Hai", &[("a.txt", b"2")]).await;
    let request = lienthong_agent::api_types::SendRequest {
        to: vec![B.into()],
        subject: "Ba".into(),
        ..Default::default()
    };
    let refused = a.client.send(&request).await.unwrap_err().to_string();
    assert!(refused.contains("max_outbox_documents"), "{refused}");
    a.stop().await;

    let mut config = world.agent_config(C, &url);
    config.max_outbox_bytes = 1000;
    let c = Agent::start(config).await;
    let big = lienthong_agent::api_types::SendRequest {
        to: vec![B.into()],
        subject: "Lớn".into(),
        attachments: vec![lienthong_agent::api_types::AttachmentUpload {
            name: "big.bin".into(),
            media_type: None,
            content_base64: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                vec![0u8; 2000],
            ),
            upload_id: None,
        }],
        ..Default::default()
    };
    let refused = c.client.send(&big).await.unwrap_err().to_string();
    assert!(refused.contains("max_outbox_bytes"), "{refused}");
    c.stop().await;
}
