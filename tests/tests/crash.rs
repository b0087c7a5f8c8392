//! Crash tests: the real broker and agent binaries killed with SIGKILL at random
//! moments under load, and restarted. The promise checked at the end: every document
//! that got a submission receipt is in every recipient's inbox exactly once,
//! byte-identical, and no inbox holds anything that was not receipted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, StatusView};
use lienthong_cli::http::AgentClient;
use lienthong_tests::*;
use rand::Rng;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

/// A document sent in a test: recipients and the attachment's bytes.
#[derive(Debug, Clone)]
struct Sent {
    to: Vec<String>,
    body: Vec<u8>,
}

async fn send(client: &AgentClient, to: &[&str], body: &[u8]) -> Option<String> {
    let request = SendRequest {
        to: to.iter().map(|c| (*c).to_owned()).collect(),
        subject: "Văn bản kiểm thử sự cố".into(),
        attachments: vec![AttachmentUpload {
            name: "noi-dung.bin".into(),
            media_type: None,
            content_base64: base64::engine::general_purpose::STANDARD.encode(body),
            upload_id: None,
        }],
        ..SendRequest::default()
    };
    client.send(&request).await.ok().map(|r| r.message_id)
}

fn body_for(sender: &str, n: u32) -> Vec<u8> {
    let size = 200 + (n as usize * 997) % 20_000;
    let mut body = format!("{sender}#{n}:").into_bytes();
    body.extend((0..size).map(|i| (i as u32 ^ n) as u8));
    body
}

/// Waits until every document is delivered to all its recipients with verified
/// receipts, then checks each recipient's inbox holds exactly its documents.
async fn assert_all_delivered_exactly_once(
    world: &World,
    senders: &[(AgentClient, BTreeMap<String, Sent>)],
) {
    let mut expected_inbox: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (client, sent) in senders {
        for (id, doc) in sent {
            let mut last: Option<StatusView> = None;
            let done = wait_until(
                "every recipient delivered",
                Duration::from_secs(120),
                || {
                    let client = client.clone();
                    let id = id.clone();
                    async move { client.status(&id).await.ok() }
                },
                |v: &StatusView| {
                    v.submission_receipt_verified
                        && v.recipients.len() == doc.to.len()
                        && v.recipients
                            .iter()
                            .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
                },
                &mut last,
            )
            .await;
            assert!(done.is_some(), "{id} not delivered; last status {last:?}");
            for code in &doc.to {
                let file = world.inbox_dir(code).join(id).join("noi-dung.bin");
                // Exported after the acknowledgement (issue 11): wait for the file.
                wait_for_path(&file).await;
                assert_eq!(
                    std::fs::read(&file).unwrap(),
                    doc.body,
                    "{}",
                    file.display()
                );
                expected_inbox
                    .entry(code.clone())
                    .or_default()
                    .insert(id.clone());
            }
        }
    }
    for (code, ids) in expected_inbox {
        let actual: BTreeSet<String> = inbox_entries(&world.inbox_dir(&code)).into_iter().collect();
        assert_eq!(actual, ids, "inbox of {code}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_twenty_times_under_load_loses_and_duplicates_nothing() {
    let world = World::new();
    let mut broker = BrokerProcess::start(Path::new(BIN), &world, "broker").await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let c = Agent::start(world.agent_config(C, &broker.url)).await;

    let running = Arc::new(AtomicBool::new(true));
    let mut loads = Vec::new();
    for (client, sender, to) in [
        (a.client.clone(), A, vec![B, C]),
        (c.client.clone(), C, vec![B]),
        (b.client.clone(), B, vec![A]),
    ] {
        let running = running.clone();
        let sent = Arc::new(Mutex::new(BTreeMap::new()));
        let record = sent.clone();
        let loader = client.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u32;
            while running.load(Ordering::Relaxed) {
                let body = body_for(sender, n);
                let id = send(&loader, &to, &body)
                    .await
                    .expect("the agent accepts locally");
                record.lock().unwrap().insert(
                    id,
                    Sent {
                        to: to.iter().map(|c| (*c).to_owned()).collect(),
                        body,
                    },
                );
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        loads.push((client, sent, task));
    }

    let mut kills = 0;
    while kills < 20 {
        // Let the load run into the broker for a random while, then pull the plug.
        let pause = rand::rng().random_range(50..400);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        broker.kill();
        kills += 1;
        broker.spawn().await;
    }
    running.store(false, Ordering::Relaxed);
    let mut senders = Vec::new();
    for (client, sent, task) in loads {
        task.await.unwrap();
        let sent = sent.lock().unwrap().clone();
        senders.push((client, sent));
    }
    let total: usize = senders.iter().map(|(_, s)| s.len()).sum();
    eprintln!("crash loop: {kills} SIGKILLs of the broker, {total} documents sent");
    assert!(total >= 40, "too little load to mean anything: {total}");
    assert_all_delivered_exactly_once(&world, &senders).await;
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_agent_killed_during_deliveries_gets_each_document_once() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let mut sent = BTreeMap::new();
    for n in 0..60 {
        let body = body_for(A, n);
        let id = send(&a.client, &[B], &body).await.unwrap();
        sent.insert(
            id,
            Sent {
                to: vec![B.into()],
                body,
            },
        );
    }
    let mut b = AgentProcess::start(Path::new(BIN), &world, B, &broker.url).await;
    for _ in 0..8 {
        let pause = rand::rng().random_range(20..250);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        b.process.kill();
        b.process.spawn().await;
    }
    assert_all_delivered_exactly_once(&world, &[(a.client.clone(), sent)]).await;
    let listed = b.client.inbox().await.unwrap();
    assert_eq!(listed.len(), 60);
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_agent_killed_with_documents_in_its_outbox_sends_them_after_restart() {
    let world = World::new();
    // The broker is not up yet: everything stays in A's outbox.
    let port = free_port();
    let url = format!("https://localhost:{port}");
    let mut a = AgentProcess::start(Path::new(BIN), &world, A, &url).await;
    let mut sent = BTreeMap::new();
    for n in 0..25 {
        let body = body_for(A, n);
        let id = send(&a.client, &[B, C], &body).await.unwrap();
        sent.insert(
            id,
            Sent {
                to: vec![B.into(), C.into()],
                body,
            },
        );
    }
    for id in sent.keys() {
        assert_eq!(a.client.status(id).await.unwrap().outbox_state, "outbox");
    }
    a.process.kill();
    a.process.spawn().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let broker = Broker::start_on(world.broker_config("broker"), listener);
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let c = Agent::start(world.agent_config(C, &broker.url)).await;
    // Kill the sender once more while it is draining its outbox.
    tokio::time::sleep(Duration::from_millis(rand::rng().random_range(0..100))).await;
    a.process.kill();
    a.process.spawn().await;
    assert_all_delivered_exactly_once(&world, &[(a.client.clone(), sent)]).await;
    b.stop().await;
    c.stop().await;
    broker.stop().await;
}
