//! Listing for gateways (issue 13), over the real API: the inbox and the sent documents
//! page by page with a cursor that neither repeats nor skips while documents keep
//! arriving, every query parameter checked, and attachments downloaded by name
//! (streamed, with their type and length; unknown names and path tricks are 404).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use lienthong_tests::*;

/// `GET path` on `agent`'s API: the status and the body bytes, with two headers.
async fn get(agent: &Agent, path: &str) -> (u16, Vec<u8>, Option<String>, Option<String>) {
    let (name, value) = bearer(&agent.token);
    let response = reqwest::Client::new()
        .get(format!("{}{path}", agent.api))
        .header(name, value)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let header = |h: &str| {
        response
            .headers()
            .get(h)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (media, length) = (header("content-type"), header("content-length"));
    (
        status,
        response.bytes().await.unwrap().to_vec(),
        media,
        length,
    )
}

async fn get_json(agent: &Agent, path: &str) -> (u16, serde_json::Value) {
    let (status, body, _, _) = get(agent, path).await;
    (status, serde_json::from_slice(&body).unwrap())
}

async fn wait_count(agent: &Agent, count: u64) {
    let mut last = None;
    wait_until(
        "the inbox count",
        Duration::from_secs(60),
        || {
            let client = agent.client.clone();
            async move { client.inbox_count(None, 0).await.ok() }
        },
        |n| *n >= count,
        &mut last,
    )
    .await
    .unwrap_or_else(|| panic!("inbox count: {last:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_neither_repeat_nor_skip_while_documents_arrive() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let mut sent = Vec::new();
    for i in 0..25 {
        sent.push(a.send(&[B], &format!("đợt một {i}"), &[]).await);
    }
    wait_count(&b, 25).await;

    // Page through with limit 10; after the first page, more documents arrive.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/inbox?limit=10&cursor={c}"),
            None => "/v1/inbox?limit=10".to_owned(),
        };
        let (status, page) = get_json(&b, &path).await;
        assert_eq!(status, 200, "{page}");
        assert!(page["items"].as_array().unwrap().len() <= 10);
        for item in page["items"].as_array().unwrap() {
            seen.push(item["message_id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        if pages == 1 {
            for i in 0..5 {
                sent.push(a.send(&[B], &format!("đợt hai {i}"), &[]).await);
            }
            wait_count(&b, 30).await;
        }
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if !page["more"].as_bool().unwrap() {
            break;
        }
        assert!(pages < 10, "too many pages");
    }
    assert_eq!(seen.len(), 30, "{seen:?}");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 30, "no repeats");
    assert_eq!(
        seen.iter().collect::<HashSet<_>>(),
        sent.iter().collect::<HashSet<_>>(),
        "no skips"
    );
    // The last cursor gives only what arrives later.
    let last = cursor.unwrap();
    let (_, page) = get_json(&b, &format!("/v1/inbox?cursor={last}")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0, "{page}");
    assert_eq!(page["next_cursor"].as_str(), Some(last.as_str()));
    let later = a.send(&[B], "muộn", &[]).await;
    wait_count(&b, 31).await;
    let (_, page) = get_json(&b, &format!("/v1/inbox?cursor={last}")).await;
    assert_eq!(
        page["items"][0]["message_id"].as_str(),
        Some(later.as_str())
    );

    // Filters.
    let (_, page) = get_json(
        &b,
        &format!("/v1/inbox?sender={A}&status=active&limit=1000"),
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 31);
    let (_, page) = get_json(&b, "/v1/inbox?sender=000.00.99.H31").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    let (_, page) = get_json(&b, "/v1/inbox?since=2999-01-01T00:00:00Z").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    let (_, page) = get_json(&b, "/v1/inbox?since=2020-01-01T00:00:00%2B07:00&limit=5").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    assert_eq!(page["more"], true);

    // Every bad parameter is a 400 naming it.
    for (query, named) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("cursor=zzz", "cursor"),
        ("cursor=c00000000000000000", "cursor"),
        ("since=yesterday", "since"),
        ("sender=H31", "sender"),
        ("status=read", "status"),
        ("recipient=000.00.00.H31", "recipient"),
        ("sort=asc", "sort"),
    ] {
        let (status, body) = get_json(&b, &format!("/v1/inbox?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(named),
            "{query}: {body}"
        );
    }

    // The sender's list of sent documents, same shape.
    let (status, page) = get_json(&a, &format!("/v1/sent?recipient={B}&limit=1000")).await;
    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 31);
    assert_eq!(items[0]["message_id"].as_str(), Some(sent[0].as_str()));
    assert_eq!(items[0]["subject"], "đợt một 0");
    assert!(
        ["outbox", "submitted"].contains(&items[0]["state"].as_str().unwrap()),
        "{}",
        items[0]
    );
    let (status, body) = get_json(&a, "/v1/sent?sender=000.00.00.H31").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get_json(&a, "/v1/sent?status=queued").await;
    assert_eq!(status, 400, "{body}");
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attachments_download_by_name_streamed_with_type_and_length() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let pdf: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let small = a
        .send(
            &[B],
            "nhỏ",
            &[
                ("Quyết định.pdf", &pdf),
                ("ghi chú.txt", b"xin chao"),
                ("empty.txt", b""),
            ],
        )
        .await;
    // Over the streaming threshold: the recipient keeps it as a file.
    let big_bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i * 31 % 255) as u8).collect();
    let big = a.send(&[B], "lớn", &[("big.bin", &big_bytes)]).await;
    wait_count(&b, 2).await;

    for (id, name, bytes, media) in [
        (&small, "Quyết%20định.pdf", &pdf[..], "application/pdf"),
        (&small, "ghi%20ch%C3%BA.txt", &b"xin chao"[..], "text/plain"),
        (&small, "empty.txt", &b""[..], "text/plain"),
        (&big, "big.bin", &big_bytes[..], "application/octet-stream"),
    ] {
        let (status, body, content_type, length) =
            get(&b, &format!("/v1/inbox/{id}/attachments/{name}")).await;
        assert_eq!(status, 200, "{name}");
        assert_eq!(content_type.as_deref(), Some(media), "{name}");
        assert_eq!(length, Some(bytes.len().to_string()), "{name}");
        assert!(body == bytes, "{name}: the bytes as sent");
    }
    for name in [
        "missing.pdf",
        "..%2Fenvelope.pb",
        "%2E%2E",
        "..%2F..%2Fapi-token",
        "0",
        "Quy%E1%BA%BFt%20%C4%91%E1%BB%8Bnh.PDF",
    ] {
        let (status, body, _, _) = get(&b, &format!("/v1/inbox/{small}/attachments/{name}")).await;
        assert_eq!(status, 404, "{name}: {}", String::from_utf8_lossy(&body));
    }
    let (status, _, _, _) = get(
        &b,
        "/v1/inbox/01900000-0000-7000-8000-000000000000/attachments/a.pdf",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, _, _) = get(&b, "/v1/inbox/not-an-id/attachments/a.pdf").await;
    assert_eq!(status, 400);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
