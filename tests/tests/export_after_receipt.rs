//! Export after the receipt (issue 11): the recipient acknowledges once its store is
//! durable and writes the inbox folder afterwards, in batches, each document once,
//! resumed after a crash; without `--inbox-dir` it writes no folder and serves
//! documents over its API. Real broker, real agents, real mTLS and sled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, StatusView};
use lienthong_edxml::{Limits, parse_document};
use lienthong_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

fn delivered(view: &StatusView) -> bool {
    view.recipients
        .iter()
        .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
}

/// `lienthong verify DIR --ca CA` passes (all three signatures).
fn assert_verifies(world: &World, folder: &Path) {
    let out = Command::new(BIN)
        .args([
            "verify",
            &folder.display().to_string(),
            "--ca",
            &world.pki.ca_cert.display().to_string(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify {}: {}{}",
        folder.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_complete(world: &World, folder: &Path) {
    for file in [
        "envelope.pb",
        "submission-receipt.pb",
        "delivery-receipt.pb",
        "document.json",
    ] {
        assert!(folder.join(file).is_file(), "{}/{file}", folder.display());
    }
    assert_verifies(world, folder);
}

fn request(subject: &str, name: &str, bytes: &[u8]) -> SendRequest {
    SendRequest {
        to: vec![B.to_owned()],
        subject: subject.to_owned(),
        attachments: vec![AttachmentUpload {
            name: name.to_owned(),
            media_type: None,
            content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            upload_id: None,
        }],
        ..SendRequest::default()
    }
}

/// Sends `count` documents to B at once (concurrent API calls); returns their ids.
async fn send_many(a: &lienthong_cli::http::AgentClient, count: usize) -> Vec<String> {
    let mut sending = tokio::task::JoinSet::new();
    for i in 0..count {
        let client = a.clone();
        sending.spawn(async move {
            let body = format!("Văn bản số {i}").into_bytes();
            client
                .send(&request(&format!("Lô {i}"), "van-ban.txt", &body))
                .await
                .unwrap()
                .message_id
        });
    }
    let mut ids = Vec::with_capacity(count);
    while let Some(id) = sending.join_next().await {
        ids.push(id.unwrap());
    }
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_documents_are_each_exported_once_with_their_three_signatures() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let ids = send_many(&a.client, 40).await;
    for id in &ids {
        a.wait_status(id, "delivered with a verified receipt", delivered)
            .await;
    }
    for id in &ids {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    // One folder per document, none half-written, each verifying offline.
    let names: Vec<String> = std::fs::read_dir(world.inbox_dir(B))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), ids.len(), "{names:?}");
    assert_eq!(inbox_entries(&world.inbox_dir(B)), ids);
    for id in &ids {
        assert_complete(&world, &world.inbox_dir(B).join(id));
    }
    let listed: BTreeSet<String> = b
        .client
        .inbox()
        .await
        .unwrap()
        .into_iter()
        .map(|item| item.message_id)
        .collect();
    assert_eq!(listed, ids.iter().cloned().collect());
    b.stop().await;
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_documents_not_yet_exported_are_exported_after_a_crash() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let mut b = AgentProcess::start(Path::new(BIN), &world, B, &broker.url).await;

    // The inbox folder becomes a file: every export fails (also as root), while the
    // store and the receipts work as usual.
    let inbox = world.inbox_dir(B);
    // The port listens before the agent has made its folder; it answers requests
    // only once it has.
    b.client.inbox().await.unwrap();
    assert!(inbox.is_dir());
    std::fs::remove_dir(&inbox).unwrap();
    std::fs::write(&inbox, b"not a folder").unwrap();

    let ids = send_many(&a.client, 5).await;
    // Acknowledged (the sender holds verified delivery receipts) without any export.
    for id in &ids {
        a.wait_status(id, "delivered with a verified receipt", delivered)
            .await;
    }
    assert!(inbox.is_file(), "nothing could be exported");

    // Crash, give the folder back, start again: every stored document is exported,
    // once, complete.
    b.process.kill();
    std::fs::remove_file(&inbox).unwrap();
    b.process.spawn().await;
    for id in &ids {
        wait_for_path(&inbox.join(id)).await;
    }
    assert_eq!(inbox_entries(&inbox), ids);
    let leftovers: Vec<String> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for id in &ids {
        assert_complete(&world, &inbox.join(id));
    }
    assert_eq!(b.client.inbox().await.unwrap().len(), ids.len());
    b.process.kill();
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_an_inbox_folder_serves_documents_over_its_api() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let mut config = world.agent_config(B, &broker.url);
    config.inbox_dir = None;
    let b = Agent::start(config).await;

    // A small document (inline) and one over the streaming threshold (files).
    let small = b"Kinh gui So Tai chinh".to_vec();
    let large: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let small_id = a
        .client
        .send(&request("Nhỏ", "nho.txt", &small))
        .await
        .unwrap()
        .message_id;
    let large_id = a
        .client
        .send(&request("Lớn", "lon.bin", &large))
        .await
        .unwrap()
        .message_id;
    for id in [&small_id, &large_id] {
        a.wait_status(id, "delivered with a verified receipt", delivered)
            .await;
    }

    let listed = b.client.inbox().await.unwrap();
    let listed_ids: BTreeSet<String> = listed.iter().map(|i| i.message_id.clone()).collect();
    assert_eq!(
        listed_ids,
        BTreeSet::from([small_id.clone(), large_id.clone()])
    );
    for item in &listed {
        assert_eq!(item.path, "", "no folder to point at");
    }
    for (id, name, bytes) in [
        (&small_id, "nho.txt", &small),
        (&large_id, "lon.bin", &large),
    ] {
        let package = b.client.inbox_edxml(id).await.unwrap();
        let doc = parse_document(&package, &Limits::default()).unwrap();
        assert_eq!(doc.attachments.len(), 1);
        assert_eq!(doc.attachments[0].name, name);
        assert!(doc.attachments[0].bytes == *bytes, "{name} served whole");
    }
    assert!(
        !world.inbox_dir(B).exists(),
        "an agent without --inbox-dir creates no folder"
    );
    b.stop().await;
    a.stop().await;
    broker.stop().await;
}
