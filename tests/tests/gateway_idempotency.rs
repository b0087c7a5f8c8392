//! `Idempotency-Key` on the send routes (issue 13), over the real API and a real
//! broker: a retry gets the first message id and the recipient gets one document, also
//! after the agent restarted in between; the same key with another body is refused
//! and sends nothing; malformed keys are a 400.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use lienthong_edxml::{EdxmlDocument, write_document};
use lienthong_tests::*;
use reqwest::header::CONTENT_TYPE;

/// POSTs `body` with `content_type` and an optional key; answers status, the replay
/// header and the body.
async fn post(
    agent: &Agent,
    path: &str,
    content_type: &str,
    key: Option<&str>,
    body: Vec<u8>,
) -> (u16, bool, String) {
    let (name, value) = bearer(&agent.token);
    let mut request = reqwest::Client::new()
        .post(format!("{}{path}", agent.api))
        .header(name, value)
        .header(CONTENT_TYPE, content_type)
        .body(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let replayed = response.headers().get("idempotent-replayed").is_some();
    (status, replayed, response.text().await.unwrap())
}

fn json(value: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

/// The message ids in B's inbox once it holds `count`; then waits a marker document
/// through, so that a late duplicate would have arrived before the answer.
async fn inbox_ids_after_marker(a: &Agent, b: &Agent, count: usize) -> Vec<String> {
    let marker = a.send(&[B], "marker", &[]).await;
    let mut last = None;
    let items = wait_until(
        "the marker in B's inbox",
        Duration::from_secs(60),
        || {
            let client = b.client.clone();
            async move { client.inbox().await.ok() }
        },
        |items| items.iter().any(|i| i.message_id == marker) && items.len() > count,
        &mut last,
    )
    .await
    .unwrap_or_else(|| panic!("B's inbox: {last:?}"));
    items
        .into_iter()
        .map(|i| i.message_id)
        .filter(|id| *id != marker)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_returns_the_first_id_and_the_recipient_gets_one_document() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let doc = serde_json::json!({"to": [B], "subject": "Công văn gửi một lần"});
    let key = "0192f0c4-retry-1";

    let (status, replayed, first) = post(
        &a,
        "/v1/documents",
        "application/json",
        Some(key),
        json(&doc),
    )
    .await;
    assert_eq!((status, replayed), (202, false), "{first}");
    let (status, replayed, again) = post(
        &a,
        "/v1/documents",
        "application/json",
        Some(key),
        json(&doc),
    )
    .await;
    assert_eq!((status, replayed), (202, true), "{again}");
    assert_eq!(again, first, "the same status and body");
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    let id = first["message_id"].as_str().unwrap().to_owned();

    // A batch with its own key: replayed whole.
    let batch = serde_json::json!({"documents": [
        {"to": [B], "subject": "batch one"},
        {"to": [B], "subject": "batch two"},
        {"to": ["bad"], "subject": "refused item"},
    ]});
    let (status, _, batch_first) = post(
        &a,
        "/v1/documents/batch",
        "application/json",
        Some("batch-key-1"),
        json(&batch),
    )
    .await;
    assert_eq!(status, 200, "{batch_first}");

    // An edXML package with its own key.
    let package = write_document(&EdxmlDocument {
        sender: A.into(),
        recipients: vec![B.into()],
        number: "7".into(),
        notation: "UBND-VP".into(),
        subject: "edXML một lần".into(),
        issue_date: "2026/05/04".into(),
        ..EdxmlDocument::default()
    })
    .unwrap();
    let (status, _, edxml_first) = post(
        &a,
        "/v1/edxml",
        "application/xml",
        Some("edxml-key-1"),
        package.clone(),
    )
    .await;
    assert_eq!(status, 202, "{edxml_first}");

    // The agent restarts between the first request and the retries.
    let config = world.agent_config(A, &broker.url);
    a.stop().await;
    let a = Agent::start(config).await;
    let (status, replayed, after) = post(
        &a,
        "/v1/documents",
        "application/json",
        Some(key),
        json(&doc),
    )
    .await;
    assert_eq!((status, replayed), (202, true), "{after}");
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after, first);
    let (status, replayed, batch_again) = post(
        &a,
        "/v1/documents/batch",
        "application/json",
        Some("batch-key-1"),
        json(&batch),
    )
    .await;
    assert_eq!((status, replayed), (200, true));
    assert_eq!(batch_again, batch_first);
    let (status, replayed, edxml_again) = post(
        &a,
        "/v1/edxml",
        "application/xml",
        Some("edxml-key-1"),
        package.clone(),
    )
    .await;
    assert_eq!((status, replayed), (202, true));
    assert_eq!(edxml_again, edxml_first);

    // The same key with another body: refused, naming the key; nothing sent.
    let other = serde_json::json!({"to": [B], "subject": "another document"});
    let (status, _, refused) = post(
        &a,
        "/v1/documents",
        "application/json",
        Some(key),
        json(&other),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused.contains(key) && refused.contains("another request"),
        "{refused}"
    );
    // The key of one route on another route is a different request too.
    let (status, _, refused) = post(
        &a,
        "/v1/documents/batch",
        "application/json",
        Some(key),
        json(&serde_json::json!({"documents": [doc]})),
    )
    .await;
    assert_eq!(status, 422, "{refused}");

    // Malformed keys: a 400 before anything is read into a document.
    for bad in ["", "has space", &"k".repeat(201)] {
        let (status, _, body) = post(
            &a,
            "/v1/documents",
            "application/json",
            Some(bad),
            json(&other),
        )
        .await;
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert!(body.contains("Idempotency-Key"), "{body}");
    }

    // B got each document once: the single one, the two good batch items, the package.
    let batch_first: serde_json::Value = serde_json::from_str(&batch_first).unwrap();
    let edxml_first: serde_json::Value = serde_json::from_str(&edxml_first).unwrap();
    let mut expected: Vec<String> = vec![id, edxml_first["message_id"].as_str().unwrap().into()];
    for result in batch_first["results"].as_array().unwrap() {
        if let Some(id) = result["message_id"].as_str() {
            expected.push(id.to_owned());
        }
    }
    assert_eq!(expected.len(), 4, "{batch_first}");
    let received = inbox_ids_after_marker(&a, &b, expected.len()).await;
    assert_eq!(received.len(), expected.len(), "{received:?}");
    assert_eq!(
        received.into_iter().collect::<HashSet<_>>(),
        expected.into_iter().collect::<HashSet<_>>()
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

/// Reads one HTTP/1.1 request head from `stream` (up to the blank line).
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        assert_eq!(n, 1, "the client closed before its request head ended");
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

fn idempotency_key_of(head: &str) -> String {
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("idempotency-key")
                .then(|| value.trim().to_owned())
        })
        .expect("the request carries an Idempotency-Key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_client_resends_a_request_lost_with_its_connection_under_the_same_key() {
    use tokio::io::AsyncWriteExt;
    // An "agent" whose first connection closes as the request arrives, as a kept-alive
    // connection does when the agent closes it at that moment.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (mut first, _) = listener.accept().await.unwrap();
        let first_key = idempotency_key_of(&read_head(&mut first).await);
        drop(first);
        let (mut second, _) = listener.accept().await.unwrap();
        let head = read_head(&mut second).await;
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        let mut body = vec![0u8; length];
        tokio::io::AsyncReadExt::read_exact(&mut second, &mut body)
            .await
            .unwrap();
        let answer = r#"{"message_id":"0193a3c0-0000-7000-8000-000000000001","business_id":"x"}"#;
        second
            .write_all(
                format!(
                    "HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                    answer.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        (first_key, idempotency_key_of(&head))
    });
    let client = lienthong_cli::http::AgentClient::new(&format!("http://{addr}"), "t").unwrap();
    let sent = client
        .send(&lienthong_agent::api_types::SendRequest {
            to: vec![B.into()],
            subject: "gửi lại".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(sent.message_id, "0193a3c0-0000-7000-8000-000000000001");
    let (first_key, second_key) = server.await.unwrap();
    assert!(!first_key.is_empty());
    assert_eq!(first_key, second_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_larger_than_the_api_connection_cap_sends_every_document_exactly_once() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut config = world.agent_config(A, &broker.url);
    config.api_max_connections = 2;
    let a = Agent::start(config).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    // 48 sends at once from one client: its pool opens more connections than the API
    // keeps, so connections are closed under it while it works.
    let sends = (0..48).map(|i| {
        let client = a.client.clone();
        async move {
            client
                .send(&lienthong_agent::api_types::SendRequest {
                    to: vec![B.into()],
                    subject: format!("văn bản {i}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .message_id
        }
    });
    let ids: HashSet<String> = futures_join_all(sends).await.into_iter().collect();
    assert_eq!(ids.len(), 48);
    for id in &ids {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    assert_eq!(inbox_entries(&world.inbox_dir(B)).len(), 48);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

/// Runs the futures concurrently and gathers their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}
