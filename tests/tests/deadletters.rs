//! Expiry, refusal, dead letters and redrive, redelivery after a missing
//! acknowledgement, and per-recipient backpressure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use base64::Engine as _;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, StatusView};
use lienthong_certs_dev::DevCa;
use lienthong_proto::TrustAnchors;
use lienthong_proto::document::seal;
use lienthong_proto::pb::{
    AgentMessage, DeadLettersRequest, Hello, RedriveRequest, StatusRequest, agent_message::Msg,
    broker_message,
};
use lienthong_tests::*;
use tonic::Code;

fn broker_config(world: &World) -> lienthong_broker::BrokerConfig {
    let mut config = world.broker_config("broker");
    config.expiry_check_interval = Duration::from_millis(50);
    config
}

fn recipient<'a>(
    view: &'a StatusView,
    code: &str,
) -> &'a lienthong_agent::api_types::RecipientView {
    view.recipients.iter().find(|r| r.agency == code).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_delivery_gets_a_signed_notice_and_redrive_delivers_it_once() {
    let world = World::new();
    let broker = Broker::start(broker_config(&world)).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let request = SendRequest {
        to: vec![B.into()],
        subject: "Hết hạn khi B vắng mặt".into(),
        expires_at_ms: Some(lienthong_proto::now_ms() + 1500),
        attachments: vec![AttachmentUpload {
            name: "a.txt".into(),
            media_type: None,
            content_base64: base64::engine::general_purpose::STANDARD.encode(b"het han"),
            upload_id: None,
        }],
        ..SendRequest::default()
    };
    let id = a.client.send(&request).await.unwrap().message_id;
    let view = a
        .wait_status(&id, "expired", |v| {
            v.recipients.iter().any(|r| r.state == "expired")
        })
        .await;
    let b_view = recipient(&view, B);
    assert_eq!(b_view.notice_verified, Some(true));
    assert!(
        b_view.reason.as_deref().unwrap().contains("expiry"),
        "{b_view:?}"
    );

    let mut admin = admin_client(&world, &broker.url).await;
    let dead = admin
        .dead_letters(DeadLettersRequest { agency: B.into() })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, id);
    let redriven = admin
        .redrive(RedriveRequest {
            message_id: id.clone(),
            agency: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven.len(), 1);

    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let view = a
        .wait_status(&id, "delivered after redrive", |v| {
            v.recipients.iter().all(|r| r.state == "delivered")
        })
        .await;
    let b_view = recipient(&view, B);
    assert_eq!(b_view.receipt_verified, Some(true));
    assert!(
        b_view.attempt_log.iter().any(|a| a.outcome == "redriven"),
        "{b_view:?}"
    );
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![id.clone()]);

    // Not a dead letter any more: a second redrive finds nothing.
    let again = admin
        .redrive(RedriveRequest {
            message_id: id.clone(),
            agency: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert!(
        admin
            .dead_letters(DeadLettersRequest {
                agency: String::new()
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters
            .is_empty()
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_delivery_is_a_dead_letter_and_redrive_after_the_fix_delivers_once() {
    let world = World::new();
    let broker = Broker::start(broker_config(&world)).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    // B trusts the wrong CA for documents: it must refuse A's signature.
    let mut misconfigured = world.agent_config(B, &broker.url);
    let rogue = DevCa::generate("some other CA").unwrap();
    misconfigured.document_anchors =
        Some(TrustAnchors::from_pem(rogue.cert_pem().as_bytes()).unwrap());
    let b = Agent::start(misconfigured).await;

    let id = a.send(&[B], "Bị từ chối", &[("a.txt", b"tu choi")]).await;
    let view = a
        .wait_status(&id, "refused", |v| {
            v.recipients.iter().any(|r| r.state == "refused")
        })
        .await;
    let b_view = recipient(&view, B);
    assert_eq!(b_view.notice_verified, Some(true));
    assert!(b_view.reason.as_deref().unwrap().contains(B), "{b_view:?}");
    assert!(inbox_entries(&world.inbox_dir(B)).is_empty());
    b.stop().await;

    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let mut admin = admin_client(&world, &broker.url).await;
    let redriven = admin
        .redrive(RedriveRequest {
            message_id: String::new(),
            agency: B.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven.len(), 1);
    a.wait_status(&id, "delivered after redrive", |v| {
        v.recipients
            .iter()
            .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
    })
    .await;
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![id.clone()]);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_delivery_is_offered_again_and_each_attempt_is_recorded() {
    let world = World::new();
    let mut config = broker_config(&world);
    config.ack_timeout = Duration::from_millis(200);
    config.max_ack_timeout = Duration::from_millis(400);
    let broker = Broker::start(config).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut client = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let header = header(A, &[B], &[]);
    submit(&mut client, seal(&header, &key).unwrap(), &[])
        .await
        .unwrap();

    // A silent recipient: takes deliveries, never acknowledges.
    let mut silent = exchange_client(&broker.url, world.agency_tls(B).client_config("localhost"))
        .await
        .unwrap();
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
    let mut stream = silent
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut attempts = Vec::new();
    while attempts.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("redelivery within the backoff")
            .unwrap()
            .unwrap();
        let Some(broker_message::Msg::Delivery(delivery)) = message.msg else {
            panic!("expected a delivery");
        };
        attempts.push(delivery.attempt);
    }
    assert_eq!(attempts, vec![1, 2, 3]);
    drop(tx);
    drop(stream);

    let status = client
        .status(StatusRequest {
            message_id: header.message_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let log = &status.recipients[0].attempt_log;
    assert!(
        log.iter()
            .filter(|a| a.outcome == "no acknowledgement")
            .count()
            >= 2,
        "{log:?}"
    );

    // The real agent then receives it exactly once.
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    wait_for_path(&world.inbox_dir(B).join(&header.message_id)).await;
    let mut last = None;
    let delivered = wait_until(
        "delivered",
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            let id = header.message_id.clone();
            async move {
                client
                    .status(StatusRequest { message_id: id })
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            }
        },
        |s| s.recipients[0].state == lienthong_proto::pb::DeliveryState::Delivered as i32,
        &mut last,
    )
    .await;
    assert!(delivered.is_some(), "{last:?}");
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&header.message_id)).await;
    assert_eq!(
        inbox_entries(&world.inbox_dir(B)),
        vec![header.message_id.clone()]
    );
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_recipient_queue_refuses_with_resource_exhausted_naming_the_limit() {
    let world = World::new();
    let mut config = broker_config(&world);
    config.max_pending_documents = 2;
    config.max_pending_bytes = 10_000;
    // One sender fills the recipient's whole queue here: its own share (a quarter by
    // default) is the subject of tests/quotas.rs.
    config.max_pending_per_sender_documents = Some(2);
    config.max_pending_per_sender_bytes = Some(10_000);
    let broker = Broker::start(config).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut client = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let small: &[u8] = b"nho";
    for _ in 0..2 {
        let h = header(A, &[B], &[("a.txt", small)]);
        submit(&mut client, seal(&h, &key).unwrap(), &[small])
            .await
            .unwrap();
    }
    let third = header(A, &[B], &[("a.txt", small)]);
    let status = submit(&mut client, seal(&third, &key).unwrap(), &[small])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_pending_documents"),
        "{}",
        status.message()
    );
    // C's queue is empty, but a big document exceeds its byte limit.
    let big = vec![7u8; 20_000];
    let h = header(A, &[C], &[("big.bin", &big)]);
    let status = submit(&mut client, seal(&h, &key).unwrap(), &[&big])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("max_pending_bytes"),
        "{}",
        status.message()
    );
    for id in [&third.message_id, &h.message_id] {
        let status = client
            .status(StatusRequest {
                message_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }

    // Once B drains its queue, the refused document goes through.
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let admin = admin_client(&world, &broker.url).await;
    let mut last = None;
    let drained = wait_until(
        "B's queue drained",
        Duration::from_secs(30),
        || {
            let mut admin = admin.clone();
            async move {
                admin
                    .queues(lienthong_proto::pb::QueuesRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            }
        },
        |q| q.queues.iter().any(|q| q.agency == B && q.pending == 0),
        &mut last,
    )
    .await;
    assert!(drained.is_some(), "{last:?}");
    submit(&mut client, seal(&third, &key).unwrap(), &[small])
        .await
        .unwrap();
    wait_for_path(&world.inbox_dir(B).join(&third.message_id)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)).len(), 3);
    b.stop().await;
    broker.stop().await;
}

/// `lienthong_broker_agency_dead_letters{agency}` from the admin listener at `admin`.
async fn dead_letters_metric(admin: &str, agency: &str) -> Option<u64> {
    let series = format!("lienthong_broker_agency_dead_letters{{agency=\"{agency}\"}}");
    metric_value(admin, None, &series).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_counted_per_agency_across_a_restart_and_a_redrive_takes_one_off() {
    let world = World::new();
    let (broker, admin_url) = Broker::start_with_admin(broker_config(&world)).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    assert_eq!(dead_letters_metric(&admin_url, B).await, Some(0));
    // B and C never connect: three documents expire, two for B and one for C.
    let mut ids = Vec::new();
    for to in [B, B, C] {
        let request = SendRequest {
            to: vec![to.into()],
            subject: "Hết hạn".into(),
            expires_at_ms: Some(lienthong_proto::now_ms() + 1000),
            ..SendRequest::default()
        };
        ids.push(a.client.send(&request).await.unwrap().message_id);
    }
    for id in &ids {
        a.wait_status(id, "expired", |v| {
            v.recipients.iter().any(|r| r.state == "expired")
        })
        .await;
    }
    assert_eq!(dead_letters_metric(&admin_url, B).await, Some(2));
    assert_eq!(dead_letters_metric(&admin_url, C).await, Some(1));
    assert_eq!(dead_letters_metric(&admin_url, A).await, Some(0));

    // Counted again from the store at start.
    broker.stop().await;
    let (broker, admin_url) = Broker::start_with_admin(broker_config(&world)).await;
    assert_eq!(dead_letters_metric(&admin_url, B).await, Some(2));
    assert_eq!(dead_letters_metric(&admin_url, C).await, Some(1));

    let mut admin = admin_client(&world, &broker.url).await;
    let redriven = admin
        .redrive(RedriveRequest {
            message_id: ids[0].clone(),
            agency: B.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .redriven;
    assert_eq!(redriven.len(), 1);
    assert_eq!(dead_letters_metric(&admin_url, B).await, Some(1));
    assert_eq!(dead_letters_metric(&admin_url, C).await, Some(1));
    a.stop().await;
    broker.stop().await;
}
