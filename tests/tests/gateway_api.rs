//! The gateway's API (issue 13): what a document-management system meets when it
//! talks to its agent over the real loopback API with the real token: unknown JSON
//! fields refused by name (a misspelt field must never send a document without it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_tests::*;
use reqwest::header::CONTENT_TYPE;

/// POSTs `body` as JSON to `path` of `agent`; answers the status and the JSON answer.
async fn post_json(
    agent: &Agent,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (name, value) = bearer(&agent.token);
    let response = reqwest::Client::new()
        .post(format!("{}{path}", agent.api))
        .header(name, value)
        .header(CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_refused_with_their_name_and_nothing_is_sent() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;

    // The misspelt subject of the issue: refused, naming the field.
    let (status, body) = post_json(
        &a,
        "/v1/documents",
        &serde_json::json!({"to": [B], "subject": "Công văn", "subjct": "Công văn"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("unknown field `subjct`"), "{error}");

    // Nested: the path in the body is named too.
    let (status, body) = post_json(
        &a,
        "/v1/documents",
        &serde_json::json!({"to": [B], "subject": "s", "signer": {"fullname": "Nguyễn Văn A"}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("signer") && error.contains("unknown field `fullname`"),
        "{error}"
    );
    let (status, body) = post_json(
        &a,
        "/v1/documents",
        &serde_json::json!({"to": [B], "subject": "s",
            "attachments": [{"name": "a.txt", "content_base64": "YQ==", "mediatype": "text/plain"}]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("attachments[0]") && error.contains("`mediatype`"),
        "{error}"
    );

    // In a batch only the item with the unknown field fails, naming it.
    let (status, body) = post_json(
        &a,
        "/v1/documents/batch",
        &serde_json::json!({"documents": [
            {"to": [B], "subject": "good"},
            {"to": [B], "subject": "bad", "priorty": 2},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["status"], 202, "{body}");
    assert_eq!(body["results"][1]["status"], 400, "{body}");
    let error = body["results"][1]["error"].as_str().unwrap();
    assert!(error.contains("unknown field `priorty`"), "{error}");
    let (status, body) = post_json(
        &a,
        "/v1/documents/batch",
        &serde_json::json!({"documents": [], "atomic": true}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("`atomic`"),
        "{body}"
    );

    // A recall and a status report refuse unknown fields too.
    let sent = a.send(&[B], "to recall", &[]).await;
    let (status, body) = post_json(
        &a,
        &format!("/v1/documents/{sent}/recall"),
        &serde_json::json!({"reason": "sai", "reson": "sai"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("`reson`"),
        "{body}"
    );
    let (status, body) = post_json(
        &a,
        &format!("/v1/inbox/{sent}/status"),
        &serde_json::json!({"status": "03", "staf": "x"}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("`staf`"), "{body}");

    // Only the good document of the batch and the one to recall were accepted.
    let sent_view = a.client.status(&sent).await.unwrap();
    assert_eq!(sent_view.message_id, sent);
    let store_dir = world.path(&format!("agent-{A}/data"));
    a.stop().await;
    let store = lienthong_agent::store::Store::open(&store_dir).unwrap();
    let records = store.outbox_records().unwrap();
    assert_eq!(records.len(), 2, "only 'good' and 'to recall': {records:?}");
    assert!(records.iter().any(|r| r.message_id == sent));
    broker.stop().await;
}
