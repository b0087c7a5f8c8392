//! The sender's batch path (issue 11): `POST /v1/documents/batch` with per-item
//! outcomes and its limits, concurrent POSTs sharing one batch signature in the
//! outbox, and the outbox submitting with `SubmitBatch` — or, against a broker that
//! answers it UNIMPLEMENTED, one document per `Submit` — over real mTLS to the real
//! broker, with the documents delivered to the recipient agent exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use lienthong_agent::api_types::{SendBatchResponse, SendRequest};
use lienthong_proto::document::verify_document;
use lienthong_proto::pb;
use lienthong_proto::signing::VerifyTime;
use lienthong_tests::fake_broker::{BatchMode, FakeExchange, FakeServer};
use lienthong_tests::*;
use prost::Message as _;
use reqwest::header::{CONTENT_TYPE, ORIGIN};

/// A small valid send request to `to`.
fn item(to: &str, subject: &str) -> serde_json::Value {
    serde_json::json!({
        "to": [to],
        "subject": subject,
        "attachments": [{
            "name": "note.txt",
            "content_base64": base64::engine::general_purpose::STANDARD.encode(subject.as_bytes()),
        }],
    })
}

async fn post_batch(
    agent: &Agent,
    body: &serde_json::Value,
) -> (reqwest::StatusCode, serde_json::Value) {
    let (name, value) = bearer(&agent.token);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/documents/batch", agent.api))
        .header(name, value)
        .header(CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// The status and error `POST /v1/documents` answers for `body`.
async fn post_single(agent: &Agent, body: &serde_json::Value) -> (u16, String) {
    let (name, value) = bearer(&agent.token);
    let response = reqwest::Client::new()
        .post(format!("{}/v1/documents", agent.api))
        .header(name, value)
        .header(CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Waits until `agent`'s inbox holds `count` documents; answers their message ids.
async fn wait_inbox(agent: &Agent, count: usize) -> Vec<String> {
    let mut last = None;
    let items = wait_until(
        "the recipient's inbox",
        Duration::from_secs(60),
        || {
            let client = agent.client.clone();
            async move { client.inbox().await.ok() }
        },
        |items| items.len() >= count,
        &mut last,
    )
    .await
    .unwrap_or_else(|| {
        panic!(
            "inbox never reached {count}; last: {:?}",
            last.map(|l| l.len())
        )
    });
    items.into_iter().map(|i| i.message_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_fifty_with_two_bad_items_fails_exactly_those_and_delivers_the_rest_once() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let mut documents: Vec<serde_json::Value> = (0..50)
        .map(|i| item(B, &format!("batch item {i}")))
        .collect();
    // Item 17: a field the single route refuses (priority out of range).
    documents[17]["priority"] = serde_json::json!(9);
    // Item 33: a recipient that is not an agency code.
    documents[33]["to"] = serde_json::json!(["not-an-agency"]);
    let expected_17 = post_single(&a, &documents[17]).await;
    let expected_33 = post_single(&a, &documents[33]).await;
    assert_eq!(expected_17.0, 400, "{expected_17:?}");
    assert_eq!(expected_33.0, 400, "{expected_33:?}");

    let (status, body) = post_batch(&a, &serde_json::json!({ "documents": documents })).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let answer: SendBatchResponse = serde_json::from_value(body).unwrap();
    assert_eq!(answer.results.len(), 50);
    let mut accepted = Vec::new();
    for (i, result) in answer.results.iter().enumerate() {
        match i {
            17 => {
                assert_eq!(
                    (result.status, result.error.clone().unwrap()),
                    expected_17,
                    "item 17"
                );
                assert!(result.message_id.is_none());
            }
            33 => {
                assert_eq!(
                    (result.status, result.error.clone().unwrap()),
                    expected_33,
                    "item 33"
                );
                assert!(result.message_id.is_none());
            }
            _ => {
                assert_eq!(result.status, 202, "item {i}: {result:?}");
                assert!(result.error.is_none());
                accepted.push(result.message_id.clone().unwrap());
            }
        }
    }
    assert_eq!(accepted.len(), 48);
    assert_eq!(accepted.iter().collect::<HashSet<_>>().len(), 48);
    // Numbers came from the counter: distinct business ids.
    let business: HashSet<_> = answer
        .results
        .iter()
        .filter_map(|r| r.business_id.clone())
        .collect();
    assert_eq!(business.len(), 48);

    let received = wait_inbox(&b, 48).await;
    assert_eq!(received.len(), 48, "each document once");
    assert_eq!(
        received.iter().collect::<HashSet<_>>(),
        accepted.iter().collect::<HashSet<_>>()
    );
    for id in &accepted {
        a.wait_status(id, "delivered", |v| {
            v.recipients.iter().all(|r| r.state == "delivered") && !v.recipients.is_empty()
        })
        .await;
    }
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_share_batch_signatures_that_verify() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let mut posts = tokio::task::JoinSet::new();
    for i in 0..64 {
        let client = a.client.clone();
        posts.spawn(async move {
            let request = SendRequest {
                to: vec![B.to_owned()],
                subject: format!("concurrent {i}"),
                ..SendRequest::default()
            };
            client.send(&request).await.unwrap().message_id
        });
    }
    let mut ids = Vec::new();
    while let Some(id) = posts.join_next().await {
        ids.push(id.unwrap());
    }
    assert_eq!(wait_inbox(&b, 64).await.len(), 64);
    a.stop().await;

    // The envelopes exactly as sealed into A's outbox.
    let store =
        lienthong_agent::store::Store::open(&world.path(&format!("agent-{A}/data"))).unwrap();
    let anchors = world.agency_tls(A).trust_anchors().unwrap();
    let mut roots: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut numbers = HashSet::new();
    for id in &ids {
        let bytes = store.outbox_envelope(id).unwrap().expect("envelope stored");
        let envelope = pb::Signed::decode(bytes.as_ref()).unwrap();
        let verified = verify_document(&envelope, &anchors, VerifyTime::Now)
            .unwrap_or_else(|e| panic!("{id} does not verify: {e}"));
        assert_eq!(&verified.header.message_id, id);
        assert!(
            numbers.insert(verified.header.number.clone()),
            "numbers are unique"
        );
        if envelope.batch.is_some() {
            // Documents of one batch carry the same signature over the same root.
            *roots.entry(envelope.signature.clone()).or_default() += 1;
        }
    }
    let batched: usize = roots.values().sum();
    assert!(
        batched >= 2 && roots.values().any(|&n| n >= 2),
        "a burst of 64 concurrent POSTs shared no batch signature: {roots:?}"
    );
    drop(store);
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_endpoint_refuses_over_1000_items_empty_lists_and_foreign_callers() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;

    let documents: Vec<serde_json::Value> = (0..1001).map(|i| item(B, &format!("x{i}"))).collect();
    let (status, body) = post_batch(&a, &serde_json::json!({ "documents": documents })).await;
    assert_eq!(status, reqwest::StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("1001") && error.contains("at most 1000"),
        "{error}"
    );
    let (status, body) = post_batch(&a, &serde_json::json!({ "documents": [] })).await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");

    let url = format!("{}/v1/documents/batch", a.api);
    let one = serde_json::to_vec(&serde_json::json!({ "documents": [item(B, "y")] })).unwrap();
    let no_token = reqwest::Client::new()
        .post(&url)
        .header(CONTENT_TYPE, "application/json")
        .body(one.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), reqwest::StatusCode::UNAUTHORIZED);
    let (name, value) = bearer(&a.token);
    let cross_site = reqwest::Client::new()
        .post(&url)
        .header(name, value)
        .header(CONTENT_TYPE, "application/json")
        .header(ORIGIN, "https://evil.example")
        .body(one)
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), reqwest::StatusCode::FORBIDDEN);
    a.stop().await;

    // Nothing of any refused call was accepted.
    let store =
        lienthong_agent::store::Store::open(&world.path(&format!("agent-{A}/data"))).unwrap();
    assert!(store.outbox_records().unwrap().is_empty());
    drop(store);
    broker.stop().await;
}

/// A broker in front of the real one: `Submit` and `Status` are forwarded with the
/// sender's identity; `SubmitBatch` is answered UNIMPLEMENTED (an older broker) or, with
/// `batches`, served by forwarding each document as a `Submit` and collecting the
/// outcomes. The session is left idle (the sender receives nothing here).
async fn forwarding_broker(world: &World, real_url: &str, batches: bool) -> FakeServer {
    let real = exchange_client(real_url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    FakeExchange::new()
        .forward_to(real)
        .batch_mode(if batches {
            BatchMode::ForwardEach
        } else {
            BatchMode::Unimplemented
        })
        .serve(world)
        .await
}

/// Sends `count` documents from A to B through the batch endpoint (many wait in the
/// outbox at once); answers their message ids.
async fn send_many(a: &Agent, count: usize) -> Vec<String> {
    let documents: Vec<serde_json::Value> = (0..count)
        .map(|i| item(B, &format!("outbox {i}")))
        .collect();
    let (status, body) = post_batch(a, &serde_json::json!({ "documents": documents })).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let answer: SendBatchResponse = serde_json::from_value(body).unwrap();
    answer
        .results
        .into_iter()
        .map(|r| r.message_id.expect("accepted"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_broker_without_submit_batch_documents_arrive_through_submit() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let fake = forwarding_broker(&world, &broker.url, false).await;
    let a = Agent::start(world.agent_config(A, &fake.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let ids = send_many(&a, 30).await;
    let received = wait_inbox(&b, 30).await;
    assert_eq!(
        received.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    for id in &ids {
        a.wait_status(id, "submitted", |v| {
            v.outbox_state == "submitted" && v.submission_receipt_verified
        })
        .await;
    }
    // One refused SubmitBatch, then every document through its own Submit.
    assert!(fake.calls.batch_calls.load(Ordering::SeqCst) >= 1);
    assert!(
        fake.calls.submits.load(Ordering::SeqCst) >= 30,
        "{} submits",
        fake.calls.submits.load(Ordering::SeqCst)
    );
    a.stop().await;
    b.stop().await;
    fake.stop();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_submits_batches_and_stores_verified_receipts() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let fake = forwarding_broker(&world, &broker.url, true).await;
    let a = Agent::start(world.agent_config(A, &fake.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let ids = send_many(&a, 120).await;
    let received = wait_inbox(&b, 120).await;
    assert_eq!(received.len(), 120, "each document once");
    assert_eq!(
        received.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    for id in &ids {
        a.wait_status(id, "submitted with a receipt", |v| {
            v.outbox_state == "submitted" && v.submission_receipt_verified
        })
        .await;
    }
    // Whole documents went in SubmitBatch calls only, several per call.
    assert_eq!(fake.calls.submits.load(Ordering::SeqCst), 0);
    assert_eq!(fake.calls.batch_documents.load(Ordering::SeqCst), 120);
    assert!(
        fake.calls.largest_batch.load(Ordering::SeqCst) >= 2,
        "batches of {} at most",
        fake.calls.largest_batch.load(Ordering::SeqCst)
    );
    a.stop().await;
    // Each outbox entry holds the broker's receipt, verifiable for its own document.
    let store =
        lienthong_agent::store::Store::open(&world.path(&format!("agent-{A}/data"))).unwrap();
    let broker_anchors = world.broker_tls().trust_anchors().unwrap();
    for id in &ids {
        let receipt = store.submission_receipt(id).unwrap().expect("receipt kept");
        let receipt = pb::Signed::decode(receipt.as_ref()).unwrap();
        let envelope = store.outbox_envelope(id).unwrap().unwrap();
        let envelope = pb::Signed::decode(envelope.as_ref()).unwrap();
        let digest = lienthong_proto::sha256(&envelope.payload);
        lienthong_proto::receipt::verify_receipt(
            &receipt,
            &broker_anchors,
            &lienthong_proto::receipt::ExpectedReceipt {
                kind: pb::ReceiptKind::Submission,
                message_id: id,
                header_sha256: &digest,
                recipient: None,
                live: true,
            },
        )
        .unwrap();
    }
    drop(store);
    b.stop().await;
    fake.stop();
    broker.stop().await;
}

/// Reads one HTTP/1.1 response (headers and a `Content-Length` body) from `stream`.
async fn read_response(stream: &mut tokio::net::TcpStream) -> (u16, String, Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = Vec::new();
    let mut byte = [0u8; 1];
    while !buffer.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "the connection closed mid-response");
        buffer.push(byte[0]);
    }
    let head = String::from_utf8(buffer).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("a Content-Length");
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_kept_alive_connection_carries_many_sends() {
    use tokio::io::AsyncWriteExt as _;
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let host = a.api.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&host).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let (path, body) = if i % 2 == 0 {
            ("/v1/documents", item(B, &format!("kept alive {i}")))
        } else {
            (
                "/v1/documents/batch",
                serde_json::json!({ "documents": [item(B, &format!("kept alive {i}"))] }),
            )
        };
        let body = serde_json::to_vec(&body).unwrap();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            a.token,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        let (status, head, body) = read_response(&mut stream).await;
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if i % 2 == 0 {
            assert_eq!(status, 202, "{body}");
            ids.push(body["message_id"].as_str().unwrap().to_owned());
        } else {
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["results"][0]["status"], 202, "{body}");
            ids.push(
                body["results"][0]["message_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    let received = wait_inbox(&b, 5).await;
    assert_eq!(
        received.iter().collect::<HashSet<_>>(),
        ids.iter().collect::<HashSet<_>>()
    );
    drop(stream);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

/// The value of the agent metric line that starts with `prefix`.
async fn agent_metric(agent: &Agent, prefix: &str) -> f64 {
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", agent.api))
        .bearer_auth(&agent.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Forty documents of 256 KiB (10 MiB in all, under the streaming threshold each) wait in
/// the outbox together: they go in `SubmitBatch` calls that fit the broker's message
/// limit. Before the protocol named one batch size, the agent packed 16 MiB per call,
/// the broker refused each such call whole (9 MiB limit) and every document was sent
/// again in its own `Submit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_whole_documents_go_in_batches_that_fit_the_brokers_message_limit() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;

    let content = vec![0x5a_u8; 256 * 1024];
    let encoded = base64::engine::general_purpose::STANDARD.encode(&content);
    let documents: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            serde_json::json!({
                "to": [B],
                "subject": format!("large {i}"),
                "attachments": [{ "name": "scan.pdf", "content_base64": encoded }],
            })
        })
        .collect();
    let (status, body) = post_batch(&a, &serde_json::json!({ "documents": documents })).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let answer: SendBatchResponse = serde_json::from_value(body).unwrap();
    let ids: HashSet<String> = answer
        .results
        .into_iter()
        .map(|r| r.message_id.expect("accepted"))
        .collect();
    assert_eq!(ids.len(), 40);

    let received = wait_inbox(&b, 40).await;
    assert_eq!(received.into_iter().collect::<HashSet<_>>(), ids);
    let single = agent_metric(&a, "lienthong_agent_submit_calls_total{call=\"single\"}").await;
    let batch = agent_metric(&a, "lienthong_agent_submit_calls_total{call=\"batch\"}").await;
    assert_eq!(single, 0.0, "no document needed its own Submit");
    // 10 MiB in batches of at most MAX_BATCH_BYTES (4 MiB): at least three calls.
    assert!(batch >= 3.0, "{batch} SubmitBatch calls");

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
