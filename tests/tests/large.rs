//! Large documents: streamed in chunks end to end, resumed (not restarted) when the link
//! breaks mid-upload or mid-delivery, and refused before upload when over the limits.
//! Sizes are small here (a few MiB, over the streaming threshold); `lienthong bench`
//! runs the 1 GiB case.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use lienthong_agent::api_types::{AttachmentUpload, SendRequest};
use lienthong_proto::document::{STREAMED_THRESHOLD, describe_attachment, seal};
use lienthong_tests::proxy::FaultProxy;
use lienthong_tests::*;
use rand::RngCore;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Total bytes of the files under `dir` (recursively); 0 when it does not exist.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                bytes_under(&path)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

async fn wait_bytes_under(dir: PathBuf, at_least: u64, what: &str) {
    let mut last = None;
    let found = wait_until(
        what,
        Duration::from_secs(30),
        || {
            let dir = dir.clone();
            async move { Some(bytes_under(&dir)) }
        },
        |n| *n >= at_least,
        &mut last,
    )
    .await;
    assert!(
        found.is_some(),
        "{what}: only {last:?} bytes under {}",
        dir.display()
    );
}

/// Sends one file through the agent's upload API, as `lienthong send` does.
async fn send_file(agent: &Agent, to: &str, path: &Path) -> String {
    let uploaded = agent.client.upload(path, |_| {}).await.unwrap();
    let request = SendRequest {
        to: vec![to.into()],
        subject: "Hồ sơ quét lớn".into(),
        attachments: vec![AttachmentUpload {
            name: path.file_name().unwrap().to_str().unwrap().into(),
            media_type: None,
            content_base64: String::new(),
            upload_id: Some(uploaded.upload_id),
        }],
        ..SendRequest::default()
    };
    agent.client.send(&request).await.unwrap().message_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_document_resumes_on_both_legs_after_the_link_breaks() {
    init_tracing();
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    // Each agent reaches the broker over its own capped link, so that a cut lands in
    // the middle of a transfer.
    let upload_link = FaultProxy::start(broker.addr).await;
    let delivery_link = FaultProxy::start(broker.addr).await;
    let rate = 3 * 1024 * 1024;
    upload_link.set_bandwidth(Some(rate));
    delivery_link.set_bandwidth(Some(rate));
    let a = Agent::start(world.agent_config(A, &upload_link.url())).await;
    let b = Agent::start(world.agent_config(B, &delivery_link.url())).await;

    let size: usize = 12 * 1024 * 1024;
    let bytes = random_bytes(size);
    let file = world.path("scan.pdf");
    std::fs::write(&file, &bytes).unwrap();
    let id = send_file(&a, B, &file).await;

    // Upload leg: cut when the broker holds a third, then let it reconnect.
    let partial = world.path("broker/lienthong-blobs/partial");
    wait_bytes_under(
        partial,
        size as u64 / 3,
        "a third of the upload at the broker",
    )
    .await;
    assert!(upload_link.cut_all() >= 1);

    // Delivery leg: cut when the recipient holds a third.
    let incoming = world.path(&format!("agent-{B}/data/files/incoming"));
    wait_bytes_under(incoming, size as u64 / 3, "a third of the delivery at B").await;
    assert!(delivery_link.cut_all() >= 1);

    let status = a
        .wait_status(&id, "delivered with a verified receipt", |s| {
            s.recipients
                .iter()
                .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
        })
        .await;
    assert!(status.submission_receipt_verified);
    let exported = world.inbox_dir(B).join(&id).join("scan.pdf");
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&exported).await;
    assert_eq!(std::fs::read(&exported).unwrap(), bytes, "byte-identical");

    // Resumed, not restarted: each link carried the document about once (plus
    // protocol overhead), not the third again plus the whole.
    let up = upload_link.stats().to_upstream;
    let down = delivery_link.stats().to_client;
    let bound = size as u64 + size as u64 / 5;
    assert!(
        up < bound,
        "upload carried {up} bytes for {size}: restarted?"
    );
    assert!(
        down < bound,
        "delivery carried {down} bytes for {size}: restarted?"
    );
    assert!(up >= size as u64 && down >= size as u64);

    // Nothing left half-received on either side.
    assert_eq!(
        bytes_under(&world.path("broker/lienthong-blobs/partial")),
        0
    );
    assert_eq!(
        bytes_under(&world.path(&format!("agent-{B}/data/files/incoming"))),
        0
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documents_over_the_limits_are_refused_before_upload() {
    init_tracing();
    let world = World::new();
    let mut broker_config = world.broker_config("broker");
    broker_config.max_document_bytes = 3 * 1024 * 1024;
    let broker = Broker::start(broker_config).await;
    let mut agent_config = world.agent_config(A, &broker.url);
    agent_config.max_document_bytes = 6 * 1024 * 1024;
    let a = Agent::start(agent_config).await;

    // Over the agent's limit: refused from the declared length, nothing kept.
    let too_big = world.path("too-big.bin");
    std::fs::write(&too_big, vec![1u8; 6 * 1024 * 1024 + 1]).unwrap();
    let refused = a.client.upload(&too_big, |_| {}).await.unwrap_err();
    let text = refused.to_string();
    assert!(text.contains("max_document_bytes"), "{text}");
    assert!(text.contains("6291456"), "{text}");
    let uploads = world.path(&format!("agent-{A}/data/files/uploads"));
    assert_eq!(bytes_under(&uploads), 0);

    // Within the agent's but over the broker's: RESOURCE_EXHAUSTED naming the limit,
    // answered from the envelope, before any attachment byte is stored.
    let big = world.path("big.bin");
    std::fs::write(&big, random_bytes(4 * 1024 * 1024)).unwrap();
    let id = send_file(&a, B, &big).await;
    let status = a
        .wait_status(&id, "refused by the broker", |s| s.outbox_state == "failed")
        .await;
    let reason = status.failure_reason.unwrap();
    assert!(reason.contains("ResourceExhausted"), "{reason}");
    assert!(reason.contains("max_document_bytes"), "{reason}");
    assert_eq!(bytes_under(&world.path("broker/lienthong-blobs")), 0);
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_streamed_submission_with_a_wrong_digest_is_refused_and_not_stored() {
    init_tracing();
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let declared = random_bytes(STREAMED_THRESHOLD as usize + 4096);
    let mut sent = declared.clone();
    sent[100] ^= 0xff;
    let mut doc = header(A, &[B], &[]);
    doc.attachments = vec![describe_attachment(
        "a.bin",
        "application/octet-stream",
        &declared,
    )];
    let envelope = seal(&doc, &key).unwrap();
    let mut client = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let refused = submit(&mut client, envelope, &[&sent]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("SHA-256"),
        "{}",
        refused.message()
    );
    let status = client
        .status(lienthong_proto::pb::StatusRequest {
            message_id: doc.message_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(bytes_under(&world.path("broker/lienthong-blobs")), 0);
    broker.stop().await;
}
