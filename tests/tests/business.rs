//! The agencies' workflow over real sockets: business statuses 01→03→04→05→06 (forward
//! only, signed, shown to the sender), recalls answered 15, a recall that overtakes its
//! document at the broker, and an update that removes a recipient.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_agent::api_types::{ReportRequest, SendRequest, StatusView};
use lienthong_proto::document::seal;
use lienthong_proto::pb;
use lienthong_tests::*;

fn report(status: &str, reason: Option<&str>) -> ReportRequest {
    ReportRequest {
        status: status.into(),
        reason: reason.map(str::to_owned),
        staff: Some("Nguyễn Thị Văn Thư".into()),
    }
}

fn codes(view: &StatusView, agency: &str) -> Vec<String> {
    view.recipients
        .iter()
        .find(|r| r.agency == agency)
        .map(|r| r.business.iter().map(|e| e.code.clone()).collect())
        .unwrap_or_default()
}

async fn delivered(sender: &Agent, id: &str) -> StatusView {
    sender
        .wait_status(id, "delivered to every recipient", |s| {
            s.recipients.iter().all(|r| r.state == "delivered")
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statuses_go_forward_from_arrived_to_completed_and_are_signed() {
    init_tracing();
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let c = Agent::start(world.agent_config(C, &broker.url)).await;
    let id = a
        .send(&[B], "Về việc báo cáo quý", &[("bao-cao.txt", b"noi dung")])
        .await;
    delivered(&a, &id).await;
    wait_for_path(&world.inbox_dir(B).join(&id)).await;

    // 02 needs a reason; a status for a document never received is refused.
    let no_reason = b.client.report(&id, &report("02", None)).await.unwrap_err();
    assert!(no_reason.to_string().contains("reason"), "{no_reason}");
    let stranger = c.client.report(&id, &report("03", None)).await.unwrap_err();
    assert!(
        stranger.to_string().contains("never received"),
        "{stranger}"
    );

    for code in ["03", "04", "05", "06"] {
        b.client.report(&id, &report(code, None)).await.unwrap();
    }
    // Forward only: nothing before 06 can follow it.
    let backwards = b.client.report(&id, &report("03", None)).await.unwrap_err();
    assert!(
        backwards.to_string().contains("cannot follow 06"),
        "{backwards}"
    );

    let view = a
        .wait_status(&id, "B's statuses up to 06", |s| {
            codes(s, B).last().map(String::as_str) == Some("06")
        })
        .await;
    assert_eq!(codes(&view, B), ["01", "03", "04", "05", "06"]);
    let history = &view.recipients[0].business;
    assert!(history.iter().all(|e| e.verified && e.by == B));
    assert_eq!(
        history[1].staff.as_deref(),
        Some("Nguyễn Thị Văn Thư"),
        "who reported it"
    );
    // Ordered by signing time: RFC 3339 text with trimmed fractions does not sort.
    assert!(
        history.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "oldest first: {history:?}"
    );

    // The broker refuses a report from an agency that did not receive the document,
    // even one signed correctly and sent around the agent.
    let mut header = header(C, &[A], &[]);
    header.kind = pb::DocumentKind::Status as i32;
    header.refers_to = id.clone();
    header.status = Some(pb::StatusReport {
        code: "03".into(),
        ..Default::default()
    });
    let envelope = seal(&header, &world.agency_tls(C).signing_key().unwrap()).unwrap();
    let mut client = exchange_client(&broker.url, world.agency_tls(C).client_config("localhost"))
        .await
        .unwrap();
    let refused = submit(&mut client, envelope, &[]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("did not receive"),
        "{}",
        refused.message()
    );

    // Status reports are evidence at the sender, not documents in its inbox.
    assert!(a.client.inbox().await.unwrap().is_empty());

    // A clerk picks recipients from the broker's directory, with the hierarchy.
    let directory = c.client.directory().await.unwrap();
    let codes_listed: Vec<&str> = directory.iter().map(|d| d.code.as_str()).collect();
    for code in [A, B, C] {
        assert!(codes_listed.contains(&code), "{code} in {codes_listed:?}");
    }
    let b_entry = directory.iter().find(|d| d.code == B).unwrap();
    assert_eq!(b_entry.parent, A, "000.00.12.H31 sits under 000.00.00.H31");
    for agent in [a, b, c] {
        agent.stop().await;
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recall_moves_the_copy_aside_and_the_recipient_agrees() {
    init_tracing();
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let id = a
        .send(&[B], "Quyết định (gửi nhầm)", &[("qd.txt", b"quyet dinh")])
        .await;
    delivered(&a, &id).await;
    let folder = world.inbox_dir(B).join(&id);
    wait_for_path(&folder).await;

    let recall_id = a
        .client
        .recall(&id, "Gửi nhầm đơn vị")
        .await
        .unwrap()
        .message_id;
    let moved = world.inbox_dir(B).join("recalled").join(&id);
    wait_for_path(&moved).await;
    assert!(!folder.exists(), "the copy moved, not copied");
    assert_eq!(std::fs::read(moved.join("qd.txt")).unwrap(), b"quyet dinh");
    let inbox = b.client.inbox().await.unwrap();
    let item = inbox.iter().find(|i| i.message_id == id).unwrap();
    assert_eq!(item.recalled_by.as_deref(), Some(recall_id.as_str()));
    assert!(item.path.ends_with(&format!("recalled/{id}")));
    let notice = inbox.iter().find(|i| i.message_id == recall_id).unwrap();
    assert_eq!(notice.business_type, "recall");
    assert_eq!(notice.refers_to.as_deref(), Some(id.as_str()));

    let pending = a
        .wait_status(&id, "recall pending at B", |s| {
            s.recipients[0].recall.as_deref() == Some("pending")
        })
        .await;
    assert!(codes(&pending, B).contains(&"13".to_owned()));

    b.client.report(&id, &report("15", None)).await.unwrap();
    let agreed = a
        .wait_status(&id, "recall agreed by B", |s| {
            s.recipients[0].recall.as_deref() == Some("agreed")
        })
        .await;
    assert_eq!(codes(&agreed, B), ["01", "13", "15"]);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recall_that_reaches_the_broker_first_stops_the_delivery() {
    init_tracing();
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    // B is offline: the document waits in its queue.
    let id = a
        .send(&[B], "Công văn chưa gửi đi", &[("cv.txt", b"cong van")])
        .await;
    a.wait_status(&id, "queued for B", |s| {
        s.outbox_state == "submitted" && s.recipients[0].state == "queued"
    })
    .await;
    let recall_id = a
        .client
        .recall(&id, "Thu hồi trước khi gửi")
        .await
        .unwrap()
        .message_id;
    let view = a
        .wait_status(&id, "stopped at the broker", |s| {
            s.recipients[0].state == "recalled"
        })
        .await;
    let b_view = &view.recipients[0];
    assert_eq!(
        b_view.notice_verified,
        Some(true),
        "the broker's signed notice"
    );
    assert!(
        b_view
            .reason
            .as_deref()
            .unwrap()
            .contains("Thu hồi trước khi gửi")
    );
    assert_eq!(b_view.recall.as_deref(), Some("stopped before delivery"));
    a.wait_status(&recall_id, "the recall itself not delivered either", |s| {
        s.recipients[0].state == "recalled"
    })
    .await;

    // B comes online; a later document arrives, the recalled one (and the recall) never.
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let later = a.send(&[B], "Công văn sau", &[]).await;
    delivered(&a, &later).await;
    let inbox = b.client.inbox().await.unwrap();
    let ids: Vec<&str> = inbox.iter().map(|i| i.message_id.as_str()).collect();
    assert_eq!(ids, [later.as_str()]);
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&later)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![later.clone()]);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_links_the_versions_and_tells_a_removed_recipient() {
    init_tracing();
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let c = Agent::start(world.agent_config(C, &broker.url)).await;
    let first = a
        .send(&[B, C], "Kế hoạch năm", &[("ke-hoach.txt", b"v1")])
        .await;
    delivered(&a, &first).await;

    let update = SendRequest {
        to: vec![B.into()],
        subject: "Kế hoạch năm (cập nhật)".into(),
        business_type: Some(2),
        refers_to: Some(first.clone()),
        business_reason: Some("Bổ sung chỉ tiêu".into()),
        removed_recipients: Some(vec![C.into()]),
        attachments: vec![lienthong_agent::api_types::AttachmentUpload {
            name: "ke-hoach.txt".into(),
            content_base64: base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                b"v2",
            ),
            ..Default::default()
        }],
        ..SendRequest::default()
    };
    let second = a.client.send(&update).await.unwrap().message_id;
    let view = delivered(&a, &second).await;
    let mut told: Vec<&str> = view.recipients.iter().map(|r| r.agency.as_str()).collect();
    told.sort_unstable();
    assert_eq!(told, [B, C], "the removed recipient is told too");

    let b_first = b
        .client
        .inbox()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.message_id == first)
        .unwrap();
    assert_eq!(b_first.superseded_by.as_deref(), Some(second.as_str()));
    assert_eq!(b_first.removed_by, None);
    let b_second = b
        .client
        .inbox()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.message_id == second)
        .unwrap();
    assert_eq!(b_second.business_type, "update");
    assert_eq!(b_second.refers_to.as_deref(), Some(first.as_str()));
    let c_first = c
        .client
        .inbox()
        .await
        .unwrap()
        .into_iter()
        .find(|i| i.message_id == first)
        .unwrap();
    assert_eq!(c_first.removed_by.as_deref(), Some(second.as_str()));

    // Updating someone else's document is refused by the agent.
    let foreign = SendRequest {
        to: vec![A.into()],
        subject: "Không được".into(),
        business_type: Some(2),
        refers_to: Some(first.clone()),
        ..SendRequest::default()
    };
    let refused = b.client.send(&foreign).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("not a document this agency sent"),
        "{refused}"
    );
    for agent in [a, b, c] {
        agent.stop().await;
    }
    broker.stop().await;
}
