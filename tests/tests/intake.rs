//! Intake at the agent: nothing acknowledged is lost, memory stays bounded, leftovers
//! are swept.
//!
//! - Every intake (JSON `POST /v1/documents`, edXML `POST /v1/edxml`, the drop folder,
//!   `lienthong send`) carries attachments of 1 MiB − 1, 1 MiB + 1 (the streaming
//!   threshold) and 20 MiB end to end, byte-identical in the recipient's inbox folder,
//!   with the delivery receipt verified.
//! - Bodies over `api_max_body_bytes` are refused with a 413 naming the limit and
//!   pointing to `/v1/uploads` (declared, undeclared, near 2^64), the client always
//!   sees the answer, and nothing is stored.
//! - Uploads count against `max_outbox_bytes`; unused ones and `.part` files are swept.
//! - A drop-folder package the broker refuses moves from `sent/` to `failed/`, across a
//!   restart.
//! - The peak memory of the real agent process for a body at the cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, SendResponse, StatusView};
use lienthong_edxml::{EdxmlAttachment, EdxmlDocument, write_document};
use lienthong_proto::document::STREAMED_THRESHOLD;
use lienthong_tests::*;
use rand::RngCore;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");
const MIB: usize = 1024 * 1024;

/// The sizes every intake is tried with.
fn sizes() -> [usize; 3] {
    let threshold = STREAMED_THRESHOLD as usize;
    [threshold - 1, threshold + 1, 20 * MIB]
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Every raw HTTP request a test makes to an agent's API starts here, so that headers
/// the API requires (e.g. a bearer token) are added in one place.
fn api_request(method: reqwest::Method, api: Api<'_>, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, format!("{}{path}", api.0))
        .bearer_auth(api.1)
}

/// An agent's API: (base URL, bearer token).
type Api<'a> = (&'a str, &'a str);

/// The [`Api`] of a started agent (in process or the real binary).
macro_rules! api {
    ($agent:expr) => {
        ($agent.api.as_str(), $agent.token.as_str())
    };
}

/// The head of a raw HTTP/1.1 request to an agent's API (for what reqwest cannot send,
/// such as a declared length near 2^64); the same one place for required headers.
fn raw_request_head(
    addr: &str,
    token: &str,
    path: &str,
    content_type: &str,
    length: &str,
) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Posts `body` to `path` with a declared length; returns (status, text).
async fn post(api: Api<'_>, path: &str, content_type: &str, body: Vec<u8>) -> (u16, String) {
    let response = api_request(reqwest::Method::POST, api, path)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Posts `body` to `path` without a declared length (chunked); returns (status, text).
async fn post_chunked(
    api: Api<'_>,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, String) {
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = api_request(reqwest::Method::POST, api, path)
        .header("content-type", content_type)
        .body(reqwest::Body::wrap_stream(tokio_stream::iter(pieces)))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// A JSON send request for `to` with one base64 attachment.
fn json_request(to: &str, name: &str, bytes: &[u8]) -> SendRequest {
    SendRequest {
        to: vec![to.into()],
        subject: format!("Tệp {} byte", bytes.len()),
        attachments: vec![AttachmentUpload {
            name: name.into(),
            media_type: None,
            content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            upload_id: None,
        }],
        ..SendRequest::default()
    }
}

/// An edXML document package from A to `to` with one attachment; `number` keeps
/// business ids distinct.
fn edxml_package(to: &str, number: &str, name: &str, bytes: Vec<u8>) -> Vec<u8> {
    let doc = EdxmlDocument {
        sender: A.into(),
        sender_name: "Ủy ban nhân dân tỉnh".into(),
        recipients: vec![to.into()],
        number: number.into(),
        notation: "UBND-VP".into(),
        subject: format!("Gói edXML số {number}"),
        issue_place: "Hưng Yên".into(),
        issue_date: "2026/05/04".into(),
        steering_type: 1,
        attachments: vec![EdxmlAttachment {
            name: name.into(),
            media_type: "application/pdf".into(),
            content_id: "a1".into(),
            description: String::new(),
            bytes,
        }],
        ..EdxmlDocument::default()
    };
    write_document(&doc).unwrap()
}

fn delivered_with_receipt(view: &StatusView) -> bool {
    !view.recipients.is_empty()
        && view
            .recipients
            .iter()
            .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
}

/// Waits until `id` is delivered to B with a verified receipt, and checks the file in
/// B's inbox folder is byte-identical.
async fn assert_arrived(world: &World, a: &Agent, id: &str, name: &str, bytes: &[u8]) {
    let status = a
        .wait_status(
            id,
            "delivered with a verified receipt",
            delivered_with_receipt,
        )
        .await;
    assert!(status.submission_receipt_verified, "{status:?}");
    let path = world.inbox_dir(B).join(id).join(name);
    wait_for_path(&path).await;
    let got = std::fs::read(&path).unwrap();
    assert_eq!(got.len(), bytes.len(), "{name}: size");
    assert!(got == bytes, "{name}: not byte-identical");
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

fn files_dir(world: &World, code: &str, area: &str) -> PathBuf {
    world.path(&format!("agent-{code}/data/files/{area}"))
}

/// Documents the agent holds in its outbox store, every state, from its metrics.
async fn outbox_documents(api: Api<'_>) -> u64 {
    metric_values(api, "lienthong_agent_outbox_documents{")
        .await
        .into_iter()
        .sum()
}

/// The values of the metric lines starting with `prefix`.
async fn metric_values(api: Api<'_>, prefix: &str) -> Vec<u64> {
    let text = api_request(reqwest::Method::GET, api, "/metrics")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .collect()
}

async fn spool_metric(api: Api<'_>, area: &str) -> u64 {
    let values = metric_values(
        api,
        &format!("lienthong_agent_spool_bytes{{area=\"{area}\"}}"),
    )
    .await;
    assert_eq!(
        values.len(),
        1,
        "one lienthong_agent_spool_bytes for {area}"
    );
    values[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_attachments_around_the_streaming_threshold_arrive_whole() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let _b = Agent::start(world.agent_config(B, &broker.url)).await;
    for size in sizes() {
        let bytes = random_bytes(size);
        let name = format!("json-{size}.pdf");
        let body = serde_json::to_vec(&json_request(B, &name, &bytes)).unwrap();
        let (status, text) = post(api!(a), "/v1/documents", "application/json", body).await;
        assert_eq!(status, 202, "{size}: {text}");
        let sent: SendResponse = serde_json::from_str(&text).unwrap();
        assert_arrived(&world, &a, &sent.message_id, &name, &bytes).await;
    }
    // Nothing spooled is left behind once the broker holds the documents.
    assert_eq!(bytes_under(&files_dir(&world, A, "uploads")), 0);
    assert_eq!(bytes_under(&files_dir(&world, A, "outbox")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edxml_attachments_around_the_streaming_threshold_arrive_whole() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let _b = Agent::start(world.agent_config(B, &broker.url)).await;
    for (n, size) in sizes().into_iter().enumerate() {
        let bytes = random_bytes(size);
        let name = format!("edxml-{size}.pdf");
        let package = edxml_package(B, &format!("{}", 100 + n), &name, bytes.clone());
        let (status, text) = post(api!(a), "/v1/edxml", "application/xml", package).await;
        assert_eq!(status, 202, "{size}: {text}");
        let sent: SendResponse = serde_json::from_str(&text).unwrap();
        assert_arrived(&world, &a, &sent.message_id, &name, &bytes).await;
    }
    assert_eq!(bytes_under(&files_dir(&world, A, "uploads")), 0);
    assert_eq!(bytes_under(&files_dir(&world, A, "outbox")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drop_folder_attachments_around_the_streaming_threshold_arrive_whole() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let drop = world.path("drop");
    std::fs::create_dir_all(&drop).unwrap();
    let mut config = world.agent_config(A, &broker.url);
    config.drop_dir = Some(drop.clone());
    let a = Agent::start(config).await;
    let _b = Agent::start(world.agent_config(B, &broker.url)).await;
    for (n, size) in sizes().into_iter().enumerate() {
        let bytes = random_bytes(size);
        let name = format!("drop-{size}.pdf");
        let package = edxml_package(B, &format!("{}", 200 + n), &name, bytes.clone());
        let file = format!("goi-{size}.edxml");
        std::fs::write(drop.join(format!(".{file}")), package).unwrap();
        std::fs::rename(drop.join(format!(".{file}")), drop.join(&file)).unwrap();
        let note = drop.join("sent").join(format!("{file}.json"));
        wait_for_path(&note).await;
        let sent: SendResponse = serde_json::from_slice(&std::fs::read(&note).unwrap()).unwrap();
        assert_arrived(&world, &a, &sent.message_id, &name, &bytes).await;
        assert!(drop.join("sent").join(&file).is_file());
    }
    assert_eq!(std::fs::read_dir(drop.join("failed")).unwrap().count(), 0);
    assert_eq!(bytes_under(&files_dir(&world, A, "uploads")), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_send_around_the_streaming_threshold_arrives_whole() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let _b = Agent::start(world.agent_config(B, &broker.url)).await;
    for size in sizes() {
        let bytes = random_bytes(size);
        let name = format!("cli-{size}.pdf");
        let path = world.path(&name);
        std::fs::write(&path, &bytes).unwrap();
        let api = a.api.clone();
        let file = path.display().to_string();
        let token_file = a.token_file.clone();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args([
                    "send",
                    "--api",
                    &api,
                    "--to",
                    B,
                    "--subject",
                    "Gửi bằng CLI",
                    "--api-token-file",
                ])
                .arg(&token_file)
                .arg(&file)
                .env_remove("RUST_LOG")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let id = String::from_utf8(output.stdout).unwrap().trim().to_owned();
        assert_arrived(&world, &a, &id, &name, &bytes).await;
    }
    assert_eq!(bytes_under(&files_dir(&world, A, "uploads")), 0);
}

/// A JSON request padded with trailing spaces (valid JSON) to exactly `len` bytes.
fn json_body_of(len: usize, attachment: usize) -> Vec<u8> {
    let mut body =
        serde_json::to_vec(&json_request(B, "dem.pdf", &random_bytes(attachment))).unwrap();
    assert!(body.len() <= len, "{} > {len}", body.len());
    body.resize(len, b' ');
    body
}

/// Sends a raw request declaring `length` with no body, reads the answer.
async fn raw_declared(
    addr: &str,
    token: &str,
    path: &str,
    content_type: &str,
    length: &str,
) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(raw_request_head(addr, token, path, content_type, length).as_bytes())
        .await
        .unwrap();
    stream.write_all(b"{").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_over_the_cap_get_a_413_naming_it_and_nothing_is_stored() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let limit = 2 * MIB;
    let mut config = world.agent_config(A, &broker.url);
    config.api_max_body_bytes = limit;
    let a = Agent::start(config).await;
    let _b = Agent::start(world.agent_config(B, &broker.url)).await;
    let addr = a.api.trim_start_matches("http://").to_owned();

    // JSON: limit - 1 and limit are taken (1.4 MiB decoded: a streamed document).
    let mut accepted = 0u64;
    for len in [limit - 1, limit] {
        let body = json_body_of(len, 1_400_000);
        let (status, text) = post(api!(a), "/v1/documents", "application/json", body).await;
        assert_eq!(status, 202, "{len}: {text}");
        accepted += 1;
    }
    // limit + 1, declared or not, many times over (the answer must not be lost to a
    // connection reset): 413 naming the limit and the way for larger files.
    for round in 0..5 {
        for chunked in [false, true] {
            let body = json_body_of(limit + 1, 1_400_000);
            let (status, text) = if chunked {
                post_chunked(api!(a), "/v1/documents", "application/json", body).await
            } else {
                post(api!(a), "/v1/documents", "application/json", body).await
            };
            assert_eq!(status, 413, "round {round}, chunked {chunked}: {text}");
            assert!(text.contains(&limit.to_string()), "{text}");
            assert!(text.contains("api_max_body_bytes"), "{text}");
            assert!(text.contains("/v1/uploads"), "{text}");
        }
    }
    // A declared length near 2^64 is refused from the header alone (hyper itself
    // refuses the last two values, u64::MAX - 1 and u64::MAX, with a 431).
    for length in ["9223372036854775808", "18446744073709551613"] {
        let answer =
            raw_declared(&addr, &a.token, "/v1/documents", "application/json", length).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{length}: {answer}");
        assert!(answer.contains("api_max_body_bytes"), "{answer}");
    }
    for length in ["18446744073709551614", "18446744073709551615"] {
        let answer =
            raw_declared(&addr, &a.token, "/v1/documents", "application/json", length).await;
        assert!(answer.starts_with("HTTP/1.1 4"), "{length}: {answer}");
    }

    // edXML: the same cap. A package padded with trailing whitespace to the size.
    let package_of = |len: usize, number: &str| {
        let mut package = edxml_package(B, number, "goi.pdf", random_bytes(1_400_000));
        assert!(package.len() <= len);
        package.resize(len, b'\n');
        package
    };
    for (len, number) in [(limit - 1, "301"), (limit, "302")] {
        let (status, text) = post(
            api!(a),
            "/v1/edxml",
            "application/xml",
            package_of(len, number),
        )
        .await;
        assert_eq!(status, 202, "{len}: {text}");
        accepted += 1;
    }
    for chunked in [false, true] {
        let package = package_of(limit + 1, "303");
        let (status, text) = if chunked {
            post_chunked(api!(a), "/v1/edxml", "application/xml", package).await
        } else {
            post(api!(a), "/v1/edxml", "application/xml", package).await
        };
        assert_eq!(status, 413, "chunked {chunked}: {text}");
        assert!(text.contains(&limit.to_string()), "{text}");
        assert!(text.contains("api_max_body_bytes"), "{text}");
    }
    let answer = raw_declared(
        &addr,
        &a.token,
        "/v1/edxml",
        "application/xml",
        "18446744073709551613",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Nothing of the refused bodies was stored or spooled.
    assert_eq!(outbox_documents(api!(a)).await, accepted);
    let mut last = None;
    let drained = wait_until(
        "the accepted documents submitted and their files removed",
        Duration::from_secs(60),
        || async {
            Some(
                bytes_under(&files_dir(&world, A, "uploads"))
                    + bytes_under(&files_dir(&world, A, "outbox")),
            )
        },
        |n| *n == 0,
        &mut last,
    )
    .await;
    assert!(drained.is_some(), "files left: {last:?}");
    assert_eq!(outbox_documents(api!(a)).await, accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_over_the_limits_are_answered_not_reset() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut config = world.agent_config(A, &broker.url);
    config.max_document_bytes = 4 * MIB as u64;
    config.max_outbox_bytes = 5 * MIB as u64;
    let a = Agent::start(config).await;
    let _b = Agent::start(world.agent_config(B, &broker.url)).await;
    let uploads = files_dir(&world, A, "uploads");

    // Over max_document_bytes: the client sees the 413 every time, declared or not.
    let too_big = world.path("too-big.bin");
    std::fs::write(&too_big, random_bytes(4 * MIB + 1)).unwrap();
    for round in 0..5 {
        let text = a
            .client
            .upload(&too_big, |_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains("max_document_bytes"), "round {round}: {text}");
        assert!(text.contains(&(4 * MIB).to_string()), "{text}");
        let (status, text) = post_chunked(
            api!(a),
            "/v1/uploads",
            "application/octet-stream",
            random_bytes(4 * MIB + 1),
        )
        .await;
        assert_eq!(status, 413, "round {round}: {text}");
    }
    assert_eq!(bytes_under(&uploads), 0);

    // Unused uploads count against max_outbox_bytes: the second 3 MiB is a 429.
    let two = world.path("two.bin");
    let two_bytes = random_bytes(3 * MIB);
    std::fs::write(&two, &two_bytes).unwrap();
    let first = a.client.upload(&two, |_| {}).await.unwrap();
    for chunked in [false, true] {
        let (status, text) = if chunked {
            post_chunked(
                api!(a),
                "/v1/uploads",
                "application/octet-stream",
                two_bytes.clone(),
            )
            .await
        } else {
            post(
                api!(a),
                "/v1/uploads",
                "application/octet-stream",
                two_bytes.clone(),
            )
            .await
        };
        assert_eq!(status, 429, "chunked {chunked}: {text}");
        assert!(text.contains("max_outbox_bytes"), "{text}");
        assert!(text.contains(&(5 * MIB).to_string()), "{text}");
    }
    assert_eq!(
        bytes_under(&uploads),
        3 * MIB as u64 + bytes_under_meta(&uploads)
    );
    assert_eq!(
        spool_metric(api!(a), "uploads").await,
        bytes_under(&uploads)
    );

    // Once the upload is sent and the broker holds it, there is room again.
    let request = SendRequest {
        to: vec![B.into()],
        subject: "Tệp đã tải lên".into(),
        attachments: vec![AttachmentUpload {
            name: "two.bin".into(),
            media_type: None,
            content_base64: String::new(),
            upload_id: Some(first.upload_id),
        }],
        ..SendRequest::default()
    };
    let sent = a.client.send(&request).await.unwrap();
    assert_arrived(&world, &a, &sent.message_id, "two.bin", &two_bytes).await;
    assert_eq!(bytes_under(&uploads), 0);
    a.client.upload(&two, |_| {}).await.unwrap();
}

/// Bytes of the `.meta` files in `dir` (each upload has one beside it).
fn bytes_under_meta(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".meta"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leftover_uploads_and_parts_are_swept() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let uploads = files_dir(&world, A, "uploads");

    // On a timer: an unused upload older than upload_max_age goes.
    let mut config = world.agent_config(A, &broker.url);
    config.upload_max_age = Duration::from_secs(2);
    config.sweep_interval = Duration::from_millis(200);
    let a = Agent::start(config).await;
    let file = world.path("unused.bin");
    std::fs::write(&file, random_bytes(300_000)).unwrap();
    let unused = a.client.upload(&file, |_| {}).await.unwrap();
    assert!(spool_metric(api!(a), "uploads").await >= 300_000);
    let mut last = None;
    let gone = wait_until(
        "the unused upload swept",
        Duration::from_secs(30),
        || async { Some(bytes_under(&uploads)) },
        |n| *n == 0,
        &mut last,
    )
    .await;
    assert!(gone.is_some(), "uploads left: {last:?}");
    assert_eq!(spool_metric(api!(a), "uploads").await, 0);
    let request = SendRequest {
        to: vec![B.into()],
        subject: "Tệp đã bị dọn".into(),
        attachments: vec![AttachmentUpload {
            name: "unused.bin".into(),
            media_type: None,
            content_base64: String::new(),
            upload_id: Some(unused.upload_id),
        }],
        ..SendRequest::default()
    };
    let refused = a.client.send(&request).await.unwrap_err().to_string();
    assert!(refused.contains("no upload"), "{refused}");
    a.stop().await;

    // At start: every `.part` (no writer survives a restart) and outbox folders no
    // waiting document names; a fresh upload stays.
    let mut config = world.agent_config(A, &broker.url);
    config.upload_max_age = Duration::from_secs(3600);
    let a = Agent::start(config.clone()).await;
    let kept = a.client.upload(&file, |_| {}).await.unwrap();
    a.stop().await;
    let part = uploads.join(format!("{}.part", uuid_like()));
    std::fs::write(&part, random_bytes(1000)).unwrap();
    let orphan = files_dir(&world, A, "outbox").join(uuid_like());
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("0"), random_bytes(1000)).unwrap();
    let a = Agent::start(config).await;
    let mut last = None;
    let swept = wait_until(
        "the agent answering after the start sweep",
        Duration::from_secs(30),
        || async {
            a.client
                .limits()
                .await
                .ok()
                .map(|_| (part.exists(), orphan.exists()))
        },
        |_| true,
        &mut last,
    )
    .await;
    assert_eq!(swept, Some((false, false)));
    assert!(uploads.join(&kept.upload_id).is_file());
    assert_eq!(spool_metric(api!(a), "outbox").await, 0);
    a.stop().await;
    broker.stop().await;
}

/// A fresh lowercase hyphenated UUID-shaped name.
fn uuid_like() -> String {
    let b = random_bytes(16);
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_package_the_broker_refuses_moves_to_failed_across_a_restart() {
    let world = World::new();
    let drop = world.path("drop");
    std::fs::create_dir_all(&drop).unwrap();
    // The broker is not there yet: the package is accepted locally and filed in sent/.
    let port = free_port();
    let broker_url = format!("https://localhost:{port}");
    let mut config = world.agent_config(A, &broker_url);
    config.drop_dir = Some(drop.clone());
    let a = Agent::start(config.clone()).await;
    // 000.00.77.H31 is a well-formed code the broker never registered.
    let package = edxml_package("000.00.77.H31", "401", "goi.pdf", random_bytes(1_200_000));
    std::fs::write(drop.join(".goi.edxml"), package).unwrap();
    std::fs::rename(drop.join(".goi.edxml"), drop.join("goi.edxml")).unwrap();
    let note = drop.join("sent/goi.edxml.json");
    wait_for_path(&note).await;
    let sent: SendResponse = serde_json::from_slice(&std::fs::read(&note).unwrap()).unwrap();
    a.stop().await;

    // The broker comes; the restarted agent submits, the broker refuses for good.
    let mut broker_config = world.broker_config("broker");
    broker_config.auto_register = false;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let broker = Broker::start_on(broker_config, listener);
    let a = Agent::start(config).await;
    let status = a
        .wait_status(&sent.message_id, "refused by the broker", |s| {
            s.outbox_state == "failed"
        })
        .await;
    let broker_reason = status.failure_reason.unwrap();
    // The note moves last: once it is in failed/, the move is complete.
    wait_for_path(&drop.join("failed/goi.edxml.json")).await;
    let reason_file = drop.join("failed/goi.edxml.error.txt");
    let reason = std::fs::read_to_string(&reason_file).unwrap();
    assert!(reason.ends_with('\n'), "{reason:?}");
    assert!(
        reason.contains(&broker_reason),
        "{reason} / {broker_reason}"
    );
    assert!(reason.contains(&sent.message_id), "{reason}");
    assert!(reason.contains("000.00.77.H31"), "{reason}");
    assert!(drop.join("failed/goi.edxml").is_file());
    assert!(drop.join("failed/goi.edxml.json").is_file());
    assert!(!drop.join("sent/goi.edxml").exists());
    assert!(!drop.join("sent/goi.edxml.json").exists());
    // Once: a further restart moves nothing again.
    a.stop().await;
    let mut config = world.agent_config(A, &broker.url);
    config.drop_dir = Some(drop.clone());
    let a = Agent::start(config).await;
    a.client.limits().await.unwrap();
    let names: Vec<String> = std::fs::read_dir(drop.join("failed"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(bytes_under(&files_dir(&world, A, "uploads")), 0);
    assert_eq!(bytes_under(&files_dir(&world, A, "outbox")), 0);
    a.stop().await;
    broker.stop().await;
}

/// VmHWM (peak resident memory) of process `pid`, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// The real agent process (default `api_max_body_bytes`, 48 MiB) takes one body;
/// returns its peak resident memory before and after.
async fn peak_for(path: &str, content_type: &str, body: Vec<u8>) -> (u64, u64) {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut agent = AgentProcess::start(Path::new(BIN), &world, A, &broker.url).await;
    let pid = agent.process.pid().unwrap();
    // Settled after start (the session to the broker is up).
    agent.client.limits().await.unwrap();
    let before = peak_rss(pid);
    let (status, text) = post(api!(agent), path, content_type, body).await;
    assert_eq!(status, 202, "{text}");
    let after = peak_rss(pid);
    agent.process.kill();
    broker.stop().await;
    (before, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peak_memory_of_the_agent_for_bodies_at_the_cap() {
    let cap = 48 * MIB;
    // JSON: one attachment filling the body (base64 takes 4 bytes for 3).
    let body = json_body_of(cap, (cap - 4096) / 4 * 3);
    let (json_before, json_after) = peak_for("/v1/documents", "application/json", body).await;
    // edXML: likewise.
    let mut package = edxml_package(B, "501", "lon.pdf", random_bytes((cap - 8192) / 4 * 3));
    assert!(package.len() <= cap);
    package.resize(cap, b'\n');
    let (edxml_before, edxml_after) = peak_for("/v1/edxml", "application/xml", package).await;
    eprintln!(
        "agent peak RSS (VmHWM) for a {} MiB body: JSON {} MiB (idle {} MiB), edXML {} MiB (idle {} MiB)",
        cap / MIB,
        json_after / MIB as u64,
        json_before / MIB as u64,
        edxml_after / MIB as u64,
        edxml_before / MIB as u64,
    );
    // What the body adds to the idle agent stays within 3× the cap (measured: 2×, the
    // body and one decoded copy of its text at a time).
    for (what, idle, peak) in [
        ("JSON", json_before, json_after),
        ("edXML", edxml_before, edxml_after),
    ] {
        let added = peak.saturating_sub(idle);
        assert!(
            added <= 3 * cap as u64,
            "{what}: the body added {added} bytes of peak RSS, over 3× the {cap}-byte cap"
        );
    }
}
