//! Text that cannot spoof, end to end: a modified agent's crafted header (line breaks
//! in one-line fields, bidi overrides and zero-width characters in attachment names,
//! NFC/NFD duplicates, `COM¹`) is refused by the broker and stores nothing; the agent's
//! API refuses the same from a gateway; and the CLI escapes control and format
//! characters in what it prints, so a received subject or reason cannot forge a line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use lienthong_agent::api_types::ReportRequest;
use lienthong_proto::pb::{self, DocumentHeader};
use lienthong_proto::signing::Domain;
use lienthong_tests::*;
use prost::Message;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

/// Every raw request to an agent's API in this file starts here (one place to add
/// what the API will require of callers, such as an Authorization header).
fn api_request(method: reqwest::Method, agent: &Agent, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, format!("{}{path}", agent.api))
        .bearer_auth(&agent.token)
}

async fn api_post_json(agent: &Agent, path: &str, body: &serde_json::Value) -> (u16, String) {
    let response = api_request(reqwest::Method::POST, agent, path)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn lienthong(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The crafted headers, each with what the refusal must name.
fn crafted() -> Vec<(&'static str, DocumentHeader, &'static str)> {
    let body: &[u8] = b"x";
    let base = || header(A, &[B], &[("a.pdf", body)]);
    let mut out = Vec::new();
    let mut h = base();
    h.subject = "Thông báo\r\n0190a5b2-0000-7000-8000-000000000001  000.00.00.H31".into();
    out.push(("subject with CR/LF", h, "subject"));
    let mut h = base();
    h.signer = Some(pb::SignerInfo {
        full_name: "Nguyễn Văn A\nChủ tịch".into(),
        ..Default::default()
    });
    out.push(("signer name with LF", h, "signer.full_name"));
    let mut h = base();
    h.sender_name = "UBND\u{1b}[2J".into();
    out.push(("sender name with ESC", h, "sender_name"));
    for name in [
        "evil\u{202e}gnp.exe",
        "hop\u{200b}.pdf",
        "\u{feff}a.pdf",
        "a\u{2066}b.pdf",
        "COM\u{b9}.pdf",
        "a\rb.pdf",
    ] {
        let mut h = base();
        h.attachments[0].name = name.into();
        out.push(("attachment name", h, "attachment 0"));
    }
    let mut h = base();
    let mut twin = h.attachments[0].clone();
    h.attachments[0].name = "Quy\u{1ebf}t.pdf".into();
    twin.name = "Quye\u{302}\u{301}t.pdf".into();
    h.attachments.push(twin);
    out.push(("NFC/NFD duplicate names", h, "attachment 1"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_refuses_crafted_headers_and_stores_nothing() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut exchange = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let mut admin = admin_client(&world, &broker.url).await;
    let mut ids = Vec::new();
    for (what, h, names) in crafted() {
        // Signed with A's real key, bypassing `seal`: what a modified agent sends.
        let envelope = key
            .sign(Domain::DocumentHeader, h.encode_to_vec().into())
            .unwrap();
        let bodies: Vec<&[u8]> = h.attachments.iter().map(|_| b"x".as_slice()).collect();
        let status = submit(&mut exchange, envelope, &bodies)
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{what}: {status:?}"
        );
        assert!(
            status.message().contains(names),
            "{what}: {names:?} not in {:?}",
            status.message()
        );
        // The refusal's text cannot spoof either: no raw control or format character.
        assert!(
            !status
                .message()
                .chars()
                .any(lienthong_proto::agency::is_hidden_control),
            "{what}: {:?}",
            status.message()
        );
        let lookup = admin
            .message(pb::MessageRequest {
                id: h.message_id.clone(),
            })
            .await;
        assert_eq!(
            lookup.expect_err(what).code(),
            tonic::Code::NotFound,
            "{what} was stored"
        );
        ids.push(h.message_id);
    }
    // B then receives only a genuine document sent after them (its queue is in order).
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let genuine = a.send(&[B], "Văn bản thật", &[]).await;
    wait_for_path(&world.inbox_dir(B).join(&genuine)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![genuine]);
    assert_eq!(b.client.inbox().await.unwrap().len(), 1);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_api_refuses_spoofing_text_from_a_gateway() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let attachment = |name: &str| serde_json::json!([{ "name": name, "content_base64": "eA==" }]);
    let cases = [
        (
            serde_json::json!({"to": [B], "subject": "Họp\r\nGiả mạo", "attachments": []}),
            "subject",
        ),
        (
            serde_json::json!({"to": [B], "subject": "Họp", "notation": "UB\nND", "attachments": []}),
            "notation",
        ),
        (
            serde_json::json!({"to": [B], "subject": "Họp", "attachments": attachment("evil\u{202e}gnp.exe")}),
            "attachment 0",
        ),
        (
            serde_json::json!({"to": [B], "subject": "Họp", "attachments": attachment("COM\u{b9}.txt")}),
            "attachment 0",
        ),
        (
            serde_json::json!({"to": [B], "subject": "Họp", "attachments": attachment("a\u{200f}.pdf")}),
            "attachment 0",
        ),
    ];
    for (body, names) in &cases {
        let (status, text) = api_post_json(&a, "/v1/documents", body).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(names), "{names:?} not in {text}");
    }
    // Nothing was signed or queued: the outbox is empty.
    let metrics = api_request(reqwest::Method::GET, &a, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let outbox: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("lienthong_agent_outbox_documents"))
        .collect();
    assert!(!outbox.is_empty(), "{metrics}");
    assert!(outbox.iter().all(|l| l.ends_with(" 0")), "{outbox:?}");
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_escapes_control_and_format_characters_it_prints() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    // Format characters are allowed in a subject (only control characters are not):
    // the listing must show them escaped, not let them reorder the line.
    let subject = "Hợp đồng \u{202e}fdp.exe\u{202c} \u{2066}x\u{2069}\u{200b}";
    let id = a.send(&[B], subject, &[]).await;
    wait_for_path(&world.inbox_dir(B).join(&id)).await;

    let (code, stdout, stderr) = lienthong(&[
        "inbox",
        "--api",
        &b.api,
        "--api-token-file",
        &b.token_file.display().to_string(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    // No hidden character reaches the terminal but the line ends themselves.
    assert!(
        stdout
            .chars()
            .all(|c| c == '\n' || !lienthong_proto::agency::is_hidden_control(c)),
        "{stdout:?}"
    );
    assert!(
        stdout.contains("Hợp đồng \\u{202E}fdp.exe\\u{202C} \\u{2066}x\\u{2069}\\u{200B}"),
        "{stdout}"
    );
    // A header line, then two lines per document.
    assert_eq!(stdout.lines().count(), 3, "{stdout}");

    // A reason is free text (line breaks allowed): shown on one line in `status`.
    b.client
        .report(
            &id,
            &ReportRequest {
                status: "02".into(),
                reason: Some("Sai thể thức\r\n000.00.15.H31   delivered  1  giả".into()),
                staff: None,
            },
        )
        .await
        .unwrap();
    a.wait_status(&id, "the refusal back at A", |v| {
        v.recipients
            .iter()
            .any(|r| r.business.iter().any(|e| e.code == "02" && e.verified))
    })
    .await;
    let (code, stdout, stderr) = lienthong(&[
        "status",
        "--api",
        &a.api,
        "--api-token-file",
        &a.token_file.display().to_string(),
        &id,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stdout.contains('\r'), "{stdout:?}");
    let reason_lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("Sai thể thức"))
        .collect();
    assert_eq!(reason_lines.len(), 1, "{stdout}");
    assert!(
        reason_lines[0].contains("Sai thể thức\\u{000D}\\u{000A}000.00.15.H31"),
        "{stdout}"
    );
    assert!(
        !stdout.lines().any(|l| l.starts_with("000.00.15.H31")),
        "a forged recipient row: {stdout}"
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
