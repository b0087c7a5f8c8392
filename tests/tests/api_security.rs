//! The agent's local API signs for nobody but its token holder: the authorization
//! matrix over every route of `api_guard::ROUTES` (checked against the OpenAPI
//! document), the token file's creation and refusal, the off-loopback rule with and
//! without TLS, and the listener's timeouts and connection cap under idle connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use lienthong_agent::api_guard::{ApiRoute, BodyKind, ROUTES};
use lienthong_agent::api_types::ErrorBody;
use lienthong_tests::*;
use reqwest::header::{CONTENT_TYPE, HOST, ORIGIN, WWW_AUTHENTICATE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

/// A route's path with `{id}` filled in by a valid message id nobody sent.
fn concrete(route: &ApiRoute, id: &str) -> String {
    route.path.replace("{id}", id)
}

/// A body the route's handler refuses (400) or takes without signing (an upload).
fn harmless_body(route: &ApiRoute) -> (Option<&'static str>, Vec<u8>) {
    match route.body {
        BodyKind::None => (None, Vec::new()),
        BodyKind::Json => (Some("application/json"), b"{}".to_vec()),
        BodyKind::OctetStream => (Some("application/octet-stream"), b"bytes".to_vec()),
        BodyKind::Xml => (Some("application/xml"), b"<not-an-edxml-package/>".to_vec()),
    }
}

#[derive(Debug, Clone, Copy)]
enum Variant {
    NoToken,
    WrongToken,
    RightToken,
    ForeignHost,
    ForeignOrigin,
    CrossSiteFetch,
    /// A form a web page can post without a preflight: `text/plain`, with the token.
    TextPlainPost,
    /// What a browser sends for a cross-site form: Origin, Sec-Fetch-Site, no token.
    BrowserForm,
}

const VARIANTS: [Variant; 8] = [
    Variant::NoToken,
    Variant::WrongToken,
    Variant::RightToken,
    Variant::ForeignHost,
    Variant::ForeignOrigin,
    Variant::CrossSiteFetch,
    Variant::TextPlainPost,
    Variant::BrowserForm,
];

async fn request(
    http: &reqwest::Client,
    agent: &Agent,
    route: &ApiRoute,
    variant: Variant,
    id: &str,
) -> (u16, reqwest::header::HeaderMap, String) {
    let port = agent.api.rsplit(':').next().unwrap().to_owned();
    let url = format!("{}{}", agent.api, concrete(route, id));
    let (content_type, body) = harmless_body(route);
    let method = match variant {
        Variant::TextPlainPost | Variant::BrowserForm => reqwest::Method::POST,
        _ => route.method.parse().unwrap(),
    };
    let mut builder = http.request(method, &url);
    let token = match variant {
        Variant::NoToken | Variant::BrowserForm => None,
        Variant::WrongToken => Some(format!("{}0", &agent.token[1..])),
        _ => Some(agent.token.clone()),
    };
    if let Some(token) = token {
        builder = builder.bearer_auth(token);
    }
    builder = match variant {
        Variant::ForeignHost => builder.header(HOST, format!("evil.example:{port}")),
        Variant::ForeignOrigin => builder.header(ORIGIN, "http://evil.example"),
        Variant::CrossSiteFetch => builder.header("sec-fetch-site", "cross-site"),
        Variant::BrowserForm => builder
            .header(ORIGIN, "http://evil.example")
            .header("sec-fetch-site", "cross-site"),
        _ => builder,
    };
    builder = match variant {
        Variant::TextPlainPost | Variant::BrowserForm => builder
            .header(CONTENT_TYPE, "text/plain")
            .body("{\"to\":[\"000.00.12.H31\"],\"subject\":\"x\"}"),
        _ => match content_type {
            Some(ct) => builder.header(CONTENT_TYPE, ct).body(body),
            None => builder,
        },
    };
    let response = builder.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap())
}

/// The error text of an [`ErrorBody`], or a panic naming what came instead.
fn error_text(what: &str, body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("{what}: not an ErrorBody ({e}): {body:?}"))
        .error
}

/// A's outbox by state, from its metrics (read with the token).
async fn outbox_states(agent: &Agent) -> Vec<(String, String)> {
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
        .filter(|l| l.starts_with("lienthong_agent_outbox_documents{"))
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_strangers_and_web_pages_and_signs_nothing() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    // One real document, so the counts below start from something.
    let sent = a.send(&[B], "Trước khi thử", &[("a.txt", b"x")]).await;
    a.wait_status(&sent, "delivered", |v| {
        v.recipients.iter().all(|r| r.state == "delivered")
    })
    .await;
    let outbox_before = outbox_states(&a).await;
    assert!(!outbox_before.is_empty());
    let inbox_before = b.client.inbox_count(None, 0).await.unwrap();
    assert_eq!(inbox_before, 1);

    let http = reqwest::Client::new();
    let nobody = lienthong_proto::document::new_message_id();
    for route in ROUTES {
        for variant in VARIANTS {
            let (status, headers, body) = request(&http, &a, route, variant, &nobody).await;
            let what = format!("{} {} {variant:?}", route.method, route.path);
            match variant {
                Variant::NoToken | Variant::WrongToken if route.open => {
                    assert_eq!(status, 200, "{what}: {body}");
                }
                Variant::NoToken | Variant::WrongToken => {
                    assert_eq!(status, 401, "{what}: {body}");
                    let challenge = headers[WWW_AUTHENTICATE].to_str().unwrap();
                    assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
                    assert!(error_text(&what, &body).contains("token"), "{what}: {body}");
                }
                Variant::RightToken => {
                    // The handler answered: no guard refusal, no router 404/405.
                    assert!(
                        ![401, 403, 405, 415].contains(&status),
                        "{what}: {status} {body}"
                    );
                    if status == 404 {
                        error_text(&what, &body);
                    }
                }
                Variant::ForeignHost => {
                    assert_eq!(status, 403, "{what}: {body}");
                    assert!(error_text(&what, &body).contains("Host"), "{what}: {body}");
                }
                Variant::ForeignOrigin => {
                    assert_eq!(status, 403, "{what}: {body}");
                    assert!(
                        error_text(&what, &body).contains("Origin"),
                        "{what}: {body}"
                    );
                }
                Variant::CrossSiteFetch => {
                    assert_eq!(status, 403, "{what}: {body}");
                    let text = error_text(&what, &body);
                    assert!(text.contains("Sec-Fetch-Site"), "{what}: {body}");
                }
                Variant::TextPlainPost if route.method == "POST" => {
                    assert_eq!(status, 415, "{what}: {body}");
                    let text = error_text(&what, &body);
                    assert!(
                        text.contains("Content-Type") && text.contains("text/plain"),
                        "{what}: {text}"
                    );
                }
                Variant::TextPlainPost => {
                    assert_eq!(status, 405, "{what}: {body}");
                }
                Variant::BrowserForm => {
                    assert_eq!(status, 403, "{what}: {body}");
                }
            }
        }
    }

    // Nothing of all that was signed, queued or delivered.
    assert_eq!(outbox_states(&a).await, outbox_before);
    assert_eq!(b.client.inbox_count(None, 0).await.unwrap(), inbox_before);
    assert_eq!(a.client.inbox_count(None, 0).await.unwrap(), 0);

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_table_is_the_openapi_document_and_own_hosts_are_accepted() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let http = reqwest::Client::new();
    let doc: serde_json::Value = http
        .get(format!("{}/openapi.json", a.api))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    let mut declared: Vec<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    documented.sort();
    declared.sort();
    assert_eq!(documented, declared);
    // The document says every route but /healthz needs the bearer token.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["paths"]["/healthz"]["get"]["security"],
        serde_json::json!([])
    );

    // Our own names for the API pass, with and without the port; look-alikes do not.
    let port = a.api.rsplit(':').next().unwrap().to_owned();
    let limits = format!("{}/v1/limits", a.api);
    for (host, origin, site, expected) in [
        (format!("localhost:{port}"), None, None, 200),
        ("localhost".to_owned(), None, None, 200),
        (format!("127.0.0.1:{port}"), None, Some("same-origin"), 200),
        ("127.0.0.1".to_owned(), None, Some("none"), 200),
        (
            format!("127.0.0.1:{port}"),
            Some(format!("http://127.0.0.1:{port}")),
            Some("same-origin"),
            200,
        ),
        (
            format!("localhost:{port}"),
            Some(format!("http://localhost:{port}")),
            None,
            200,
        ),
        (format!("localhost:{port}"), Some("null".into()), None, 403),
        (
            format!("localhost:{port}"),
            Some(format!("https://localhost:{port}")),
            None,
            403,
        ),
        (format!("localhost:{port}"), None, Some("same-site"), 403),
        (format!("localhost.evil.example:{port}"), None, None, 403),
        (format!("127.0.0.1.evil.example:{port}"), None, None, 403),
        (format!("[::1]:{port}"), None, None, 403),
        (
            format!("localhost:{}", port.parse::<u16>().unwrap() ^ 1),
            None,
            None,
            403,
        ),
    ] {
        let mut builder = http.get(&limits).bearer_auth(&a.token).header(HOST, &host);
        if let Some(origin) = &origin {
            builder = builder.header(ORIGIN, origin);
        }
        if let Some(site) = site {
            builder = builder.header("sec-fetch-site", site);
        }
        let response = builder.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            expected,
            "Host {host} Origin {origin:?} Sec-Fetch-Site {site:?}"
        );
        assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    }
    // Parameters and case in Content-Type are fine; a look-alike type is not.
    for (content_type, expected) in [
        ("application/xml; charset=utf-8", 400),
        ("TEXT/XML", 400),
        ("application/xml-dtd", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
    ] {
        let response = http
            .post(format!("{}/v1/edxml", a.api))
            .bearer_auth(&a.token)
            .header(CONTENT_TYPE, content_type)
            .body("<x/>")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{content_type}");
    }
    // No Content-Type at all on a JSON route.
    let response = http
        .post(format!("{}/v1/documents", a.api))
        .bearer_auth(&a.token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415);
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_creates_a_private_token_before_it_serves_and_refuses_an_open_one() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    // The library itself (not the harness) creates the default token file.
    let config = world.agent_config(A, &broker.url);
    let token_path = config.data_dir.join("api-token");
    assert!(!token_path.exists());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(lienthong_agent::run(config, listener, shutdown.clone()));
    let mut last = None;
    let up = wait_until(
        "agent healthy",
        Duration::from_secs(30),
        || {
            let url = format!("{api}/healthz");
            async move { Some(reqwest::get(url).await.is_ok_and(|r| r.status() == 200)) }
        },
        |ok| *ok,
        &mut last,
    )
    .await;
    assert!(up.is_some());
    // It is there as soon as the API answers: made before serving.
    let meta = std::fs::metadata(&token_path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let token = std::fs::read_to_string(&token_path).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let answer = reqwest::Client::new()
        .get(format!("{api}/v1/inbox"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Opened to the group: the agent (library) refuses to start, naming the file.
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = lienthong_agent::run(
        world.agent_config(A, &broker.url),
        listener,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains(&token_path.display().to_string()),
        "{refused}"
    );

    // The real binary: exit 2, the path and the fix in the message, nothing listening.
    std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = free_port();
    let out = agent_command(&world, &format!("127.0.0.1:{port}"), &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&token_path.display().to_string()) && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    // Not a regular file.
    let dir_token = world.path("token-dir");
    std::fs::create_dir(&dir_token).unwrap();
    let out = agent_command(
        &world,
        &format!("127.0.0.1:{port}"),
        &["--api-token-file", &dir_token.display().to_string()],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    broker.stop().await;
}

/// `lienthong agent` for A with extra arguments; returns once it exits (it must).
fn agent_command(world: &World, api: &str, extra: &[&str]) -> std::process::Output {
    let (cert, key) = world.pki.agency(A).unwrap();
    let mut args: Vec<String> = [
        "agent",
        "--broker",
        "https://localhost:1",
        "--agency",
        A,
        "--ca",
        &world.pki.ca_cert.display().to_string(),
        "--cert",
        &cert.display().to_string(),
        "--key",
        &key.display().to_string(),
        "--data",
        &world.path(&format!("agent-{A}/data")).display().to_string(),
        "--inbox-dir",
        &world.inbox_dir(A).display().to_string(),
        "--api",
        api,
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Command::new(BIN).args(&args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_need_the_token_file_and_name_a_refused_token() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let api = a.api.clone();
    let token_file = a.token_file.display().to_string();
    let wrong = world.path("wrong-token");
    std::fs::write(&wrong, "f".repeat(64)).unwrap();
    std::fs::set_permissions(&wrong, std::fs::Permissions::from_mode(0o600)).unwrap();
    let wrong = wrong.display().to_string();
    let run = move |args: Vec<String>, env: Option<String>| {
        let mut command = Command::new(BIN);
        command.args(&args).env_remove("LIENTHONG_API_TOKEN_FILE");
        if let Some(env) = env {
            command.env("LIENTHONG_API_TOKEN_FILE", env);
        }
        command.output().unwrap()
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let inbox = |more: &[&str]| {
            let mut args = vec!["inbox".to_owned(), "--api".to_owned(), api.clone()];
            args.extend(more.iter().map(|s| (*s).to_owned()));
            args
        };
        (
            run(inbox(&[]), None),
            run(inbox(&["--api-token-file", "/nonexistent/api-token"]), None),
            run(inbox(&[]), Some(token_file.clone())),
            run(inbox(&["--api-token-file", &token_file]), None),
            run(inbox(&["--api-token-file", &wrong]), None),
            run(
                vec![
                    "directory".into(),
                    "--api".into(),
                    api.clone(),
                    "--json".into(),
                ],
                Some(token_file.clone()),
            ),
        )
    })
    .await
    .unwrap();
    let (none, missing, from_env, from_flag, refused, directory) = outcome;
    for out in [&none, &missing] {
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--api-token-file") && stderr.contains("LIENTHONG_API_TOKEN_FILE"),
            "{stderr}"
        );
    }
    for out in [&from_env, &from_flag, &directory] {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("the agent refused the API token: check --api-token-file"),
        "{stderr}"
    );
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_needs_tls_and_with_tls_the_api_speaks_only_https() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;

    // The binary refuses 0.0.0.0 without TLS or the explicit flag, before listening.
    let port = free_port();
    let out = agent_command(&world, &format!("0.0.0.0:{port}"), &[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--api-tls-cert") && stderr.contains("--api-insecure-bind"),
        "{stderr}"
    );
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    // A TLS key file that holds no key is a configuration error, before listening.
    let ca = world.pki.ca_cert.display().to_string();
    let out = agent_command(
        &world,
        &format!("0.0.0.0:{port}"),
        &["--api-tls-cert", &ca, "--api-tls-key", &ca],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("API TLS key"), "{stderr}");
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    // So does the library.
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let refused = lienthong_agent::run(
        world.agent_config(A, &broker.url),
        listener,
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(refused.to_string().contains("not loopback"), "{refused}");

    // With TLS (the dev broker certificate names localhost) it serves HTTPS only.
    let mut config = world.agent_config(A, &broker.url);
    config.api_tls = Some(lienthong_agent::ApiTls {
        cert_pem: std::fs::read(&world.pki.broker_cert).unwrap(),
        key_pem: std::fs::read(&world.pki.broker_key).unwrap(),
    });
    config.api_tls_handshake_timeout = Duration::from_millis(500);
    let token = api_token(&config.api_token_path());
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(lienthong_agent::run(config, listener, shutdown.clone()));

    let https = |request: String| {
        let ca = std::fs::read(&world.pki.ca_cert).unwrap();
        async move {
            let mut roots = rustls::RootCertStore::empty();
            use rustls_pki_types::pem::PemObject as _;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
                roots.add(cert.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.ok()?;
            tls.write_all(request.as_bytes()).await.ok()?;
            let mut answer = Vec::new();
            let _ = tls.read_to_end(&mut answer).await;
            Some(String::from_utf8_lossy(&answer).into_owned())
        }
    };
    let get = |auth: &str, host: &str| {
        format!("GET /v1/limits HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
    };
    let authorized = format!("Authorization: Bearer {token}\r\n");
    let mut last = None;
    let answer = wait_until(
        "the API answers over HTTPS",
        Duration::from_secs(30),
        || https(get(&authorized, &format!("localhost:{port}"))),
        |a| a.starts_with("HTTP/1.1 200"),
        &mut last,
    )
    .await;
    assert!(answer.is_some(), "last: {last:?}");
    let answer = answer.unwrap();
    assert!(answer.contains("max_document_bytes"), "{answer}");
    let no_token = https(get("", &format!("localhost:{port}"))).await.unwrap();
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    let rebinding = https(get(&authorized, &format!("evil.example:{port}")))
        .await
        .unwrap();
    assert!(rebinding.starts_with("HTTP/1.1 403"), "{rebinding}");

    // Plain HTTP gets no HTTP answer: the TLS server closes the connection.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/v1/limits"))
        .bearer_auth(&token)
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    // A client that opens TCP and never starts the handshake is dropped.
    let mut silent = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent TLS client was not closed: {closed:?}"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // With --api-insecure-bind the library starts off loopback without TLS.
    let mut config = world.agent_config(A, &broker.url);
    config.api_insecure_bind = true;
    let insecure = Agent::start_on(config, TcpListener::bind("0.0.0.0:0").await.unwrap()).await;
    let limits = insecure.client.limits().await.unwrap();
    assert!(limits.max_document_bytes > 0);
    insecure.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_cannot_lock_the_api() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut config = world.agent_config(A, &broker.url);
    config.api_max_connections = 16;
    config.api_header_timeout = Duration::from_millis(300);
    config.api_idle_timeout = Duration::from_millis(600);
    let a = Agent::start(config).await;
    a.client.limits().await.unwrap();
    let addr = a.api.trim_start_matches("http://").to_owned();

    // 300 connections that never send a byte: far more than the cap.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    // An authenticated request still gets its answer once the idle ones time out.
    let answered = tokio::time::timeout(Duration::from_secs(120), a.client.inbox())
        .await
        .expect("the API answered within 120 s despite 300 idle connections");
    assert!(answered.unwrap().is_empty());
    // The server closed the first idle connections itself.
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(60), idle[0].read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection was left open: {closed:?}"
    );
    drop(idle);

    // Slowloris: headers dribbled a line at a time are cut off by the header timeout,
    // although bytes keep arriving.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /v1/inbox HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut cut = false;
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            cut = true;
            break;
        }
        let mut probe = [0u8; 256];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), slow.read(&mut probe)).await
        {
            // A 408 or a close both mean it was cut off.
            let _ = n;
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a client dribbling headers kept its connection for 60 s"
    );

    // A stalled upload is closed by the idle timeout and leaves no file behind.
    let uploads = world.path(&format!("agent-{A}/data/files/uploads"));
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/uploads HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n0123456789",
        a.token
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let ended =
        tokio::time::timeout(Duration::from_secs(60), stalled.read_to_end(&mut answer)).await;
    assert!(
        ended.is_ok(),
        "a stalled upload kept its connection for 60 s"
    );
    let mut last = None;
    let swept = wait_until(
        "the partial upload removed",
        Duration::from_secs(30),
        || async {
            Some(
                std::fs::read_dir(&uploads)
                    .map(|d| d.filter_map(|e| e.ok()).count())
                    .unwrap_or(0),
            )
        },
        |n| *n == 0,
        &mut last,
    )
    .await;
    assert!(swept.is_some(), "upload files left: {last:?}");
    // And the API still answers.
    assert!(a.client.inbox().await.unwrap().is_empty());
    a.stop().await;
    broker.stop().await;
}

/// A client whose kept-alive connections fill the cap (a gateway's HTTP pool that grew
/// past it) does not make a new connection wait for their keep-alive timeout: the oldest
/// is asked to close and the newcomer is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_the_least_recently_active_connection_makes_room() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut config = world.agent_config(A, &broker.url);
    config.api_max_connections = 2;
    // Idle keep-alive would hold a connection this long without the eviction.
    config.api_header_timeout = Duration::from_secs(60);
    config.api_idle_timeout = Duration::from_secs(120);
    let a = Agent::start(config).await;
    let addr = a.api.trim_start_matches("http://").to_owned();

    // Two connections, each answered once and then kept alive, idle.
    let mut kept = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "GET /v1/limits HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
            a.token
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = whole_response(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        kept.push(stream);
    }
    // The older connection is used again: the newer one is now the least recently
    // active (an HTTP pool reuses its most recent connection first).
    let request = format!(
        "GET /v1/limits HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        a.token
    );
    kept[0].write_all(request.as_bytes()).await.unwrap();
    let answer = whole_response(&mut kept[0]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // A third connection is served well before any keep-alive timeout.
    let answered = tokio::time::timeout(Duration::from_secs(10), a.client.limits())
        .await
        .expect("a new connection waited behind idle kept-alive ones");
    assert!(answered.unwrap().max_document_bytes > 0);
    // The least recently active one was closed to make room, and only it.
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), kept[1].read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "the least recently active connection stayed open: {closed:?}"
    );
    let mut probe = [0u8; 1];
    let still_open =
        tokio::time::timeout(Duration::from_millis(300), kept[0].read(&mut probe)).await;
    assert!(
        still_open.is_err(),
        "the recently used connection was closed too: {still_open:?}"
    );
    drop(kept);
    a.stop().await;
    broker.stop().await;
}

/// One whole HTTP/1.1 response with a `content-length` body, read from `stream`.
async fn whole_response(stream: &mut TcpStream) -> String {
    let read = async {
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed mid-head");
            got.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
        got.extend_from_slice(&body);
        String::from_utf8_lossy(&got).into_owned()
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answered")
}
