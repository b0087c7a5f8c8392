//! The broker's listeners under abuse, over real sockets: idle and half-open TCP
//! connections, authenticated connections that never speak HTTP/2, more connections
//! than the handshake cap or the process's file limit (the real binary under
//! `ulimit -n 256`), and the admin listener's Host check, security headers, timeouts,
//! connection cap, bind rule and audited operator names.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use lienthong_agent::api_types::{AttachmentUpload, SendRequest};
use lienthong_broker::AdminToken;
use lienthong_proto::pb::AuditTailRequest;
use lienthong_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The value of one series in the admin listener's `/metrics` (0 when absent).
async fn metric(admin_url: &str, series: &str) -> f64 {
    let body = reqwest::get(format!("{admin_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Waits until the series reaches at least `at_least`; returns its value.
async fn wait_metric(admin_url: &str, series: &str, at_least: f64) -> f64 {
    let mut last = None;
    wait_until(
        series,
        Duration::from_secs(30),
        || async { Some(metric(admin_url, series).await) },
        |v| *v >= at_least,
        &mut last,
    )
    .await
    .unwrap_or_else(|| panic!("{series} stayed at {last:?}, expected >= {at_least}"))
}

/// Reads until the peer closes (EOF or reset) or `limit` passes; returns how long it
/// took, or None if the connection was still open at the limit.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.ok().map(|()| started.elapsed())
}

/// One raw HTTP/1.1 request (closing the connection), the whole response as text.
async fn raw_http(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut response))
        .await
        .expect("the admin listener answers")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

fn admin_addr(admin_url: &str) -> SocketAddr {
    admin_url.trim_start_matches("http://").parse().unwrap()
}

const REFUSED: &str = "lienthong_broker_connections_refused_total";

fn refused(listener: &str, reason: &str) -> String {
    format!("{REFUSED}{{listener=\"{listener}\",reason=\"{reason}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connection_sending_nothing_or_half_a_hello_is_closed_after_the_handshake_timeout() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.tls_handshake_timeout = Duration::from_secs(1);
    let (broker, admin_url) = Broker::start_with_admin(config).await;

    let connected = Instant::now();
    let mut silent = TcpStream::connect(broker.addr).await.unwrap();
    // A TLS record header promising a ClientHello that never comes (a slow loris).
    let mut partial = TcpStream::connect(broker.addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    for stream in [&mut silent, &mut partial] {
        closed_within(stream, Duration::from_secs(20))
            .await
            .expect("the broker closes a connection that does not finish its handshake");
        let took = connected.elapsed();
        assert!(
            took >= Duration::from_millis(900),
            "closed after {took:?}, before the 1 s handshake timeout"
        );
    }
    assert_eq!(
        wait_metric(&admin_url, &refused("grpc", "handshake_timeout"), 2.0).await,
        2.0
    );
    assert_eq!(
        metric(&admin_url, "lienthong_broker_tls_handshakes_in_progress").await,
        0.0
    );
    // The listener still serves agencies.
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let id = a.send(&[B], "Sau kết nối treo", &[("a.txt", b"a")]).await;
    a.wait_status(&id, "accepted", |v| v.submission_receipt_verified)
        .await;
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_connection_that_never_starts_http2_is_closed_after_the_header_timeout() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.http_header_timeout = Duration::from_secs(1);
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let connector = agency_tls_connector(&world, A);
    // Silent after the handshake, and stopping half-way through the HTTP/2 preface.
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let connected = Instant::now();
        let tcp = TcpStream::connect(broker.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("handshake");
        tls.write_all(sent).await.unwrap();
        tls.flush().await.unwrap();
        wait_metric(
            &admin_url,
            "lienthong_broker_connections_open{listener=\"grpc\"}",
            1.0,
        )
        .await;
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    // The server's own SETTINGS frame may arrive first.
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "the connection stayed open after sending {sent:?}"
        );
        let took = connected.elapsed();
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    }
    let mut last = None;
    wait_until(
        "the connection is counted closed",
        Duration::from_secs(20),
        || async {
            Some(
                metric(
                    &admin_url,
                    "lienthong_broker_connections_open{listener=\"grpc\"}",
                )
                .await,
            )
        },
        |v| *v == 0.0,
        &mut last,
    )
    .await
    .expect("open gRPC connections back to 0");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshakes_give_way_so_an_agency_gets_in_during_the_flood() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.max_handshakes = 4;
    // Far beyond the test: the agency must get in while the idle connections stay.
    config.tls_handshake_timeout = Duration::from_secs(120);
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(broker.addr).await.unwrap());
    }
    wait_metric(
        &admin_url,
        "lienthong_broker_tls_handshakes_in_progress",
        4.0,
    )
    .await;
    // A fifth finds every handshake slot taken: the oldest is closed at once.
    idle.push(TcpStream::connect(broker.addr).await.unwrap());
    let took = closed_within(&mut idle[0], Duration::from_secs(20))
        .await
        .expect("the oldest idle handshake is closed");
    assert!(took < Duration::from_secs(10), "closed only after {took:?}");
    assert_eq!(
        wait_metric(&admin_url, &refused("grpc", "handshake_evicted"), 1.0).await,
        1.0
    );
    // Four idle connections still hold every slot; the agency gets in regardless.
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let id = a
        .send(&[B], "Giữa cơn lũ kết nối", &[("a.txt", b"a")])
        .await;
    a.wait_status(&id, "accepted", |v| v.submission_receipt_verified)
        .await;
    assert_eq!(
        metric(&admin_url, &refused("grpc", "handshake_timeout")).await,
        0.0,
        "nobody waited for a timeout"
    );
    drop(idle);
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_broker_with_256_file_descriptors_outlives_400_idle_connections() {
    let world = World::new();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lienthong-under-test"));
    let port = free_port();
    let admin_port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let mut args: Vec<String> = vec![
        "-c".into(),
        // Lowers soft and hard limit: the broker cannot raise it back.
        r#"ulimit -n 256 && exec "$0" "$@""#.into(),
        bin.display().to_string(),
        "broker".into(),
        "--listen".into(),
        addr.to_string(),
        "--admin-listen".into(),
        admin.to_string(),
        "--data".into(),
        world.path("broker").display().to_string(),
        "--ca".into(),
        world.pki.ca_cert.display().to_string(),
        "--cert".into(),
        world.pki.broker_cert.display().to_string(),
        "--key".into(),
        world.pki.broker_key.display().to_string(),
        "--min-free-bytes".into(),
        (16u64 << 20).to_string(),
        "--tls-handshake-timeout-secs".into(),
        "2".into(),
    ];
    for code in [A, B, C] {
        args.push("--register".into());
        args.push(code.into());
    }
    let mut process = Process::new(std::path::Path::new("sh"), args, addr);
    process.spawn().await;
    let admin_url = format!("http://{admin}");

    // More idle connections than the process may open files.
    let mut idle = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect(addr).await {
            Ok(stream) => idle.push(stream),
            Err(e) => panic!("connect failed after {}: {e}", idle.len()),
        }
    }
    // The admin listener answers during the flood: it has its own slots.
    let health = raw_http(
        admin,
        &format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        metric(&admin_url, &refused("grpc", "handshake_evicted")).await > 0.0,
        "the flood exceeded the handshake cap"
    );
    // An agency submits once the idle connections have timed out (its agent retries).
    let a = Agent::start(world.agent_config(A, &format!("https://localhost:{port}"))).await;
    let id = a
        .send(&[B], "Giữa cơn lũ kết nối", &[("a.txt", b"a")])
        .await;
    let accepted = a
        .wait_status(&id, "accepted", |v| v.submission_receipt_verified)
        .await;
    assert_eq!(accepted.message_id, id);
    assert!(wait_metric(&admin_url, &refused("grpc", "handshake_timeout"), 1.0).await >= 1.0);
    let health = raw_http(
        admin,
        &format!(
            "GET /healthz HTTP/1.1\r\nHost: localhost:{admin_port}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    drop(idle);
    a.stop().await;
    let status = process.terminate();
    assert!(status.success(), "broker exit: {status:?}");
}

fn header_value<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.split("\r\n\r\n").next()?.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_checks_host_and_site_and_forbids_framing_on_every_response() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.admin_token = Some("operator-token-for-the-test".into());
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let addr = admin_addr(&admin_url);
    let port = addr.port();
    let get = |path: &str, host: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
    };
    let cases = [
        (get("/healthz", &addr.to_string(), ""), "200"),
        (get("/healthz", &format!("localhost:{port}"), ""), "200"),
        (get("/", &format!("localhost:{port}"), ""), "200"),
        (get("/api/queues", &addr.to_string(), ""), "401"),
        (get("/no-such-page", &addr.to_string(), ""), "404"),
        // DNS rebinding: a hostile name resolving to 127.0.0.1.
        (
            get("/api/queues", &format!("evil.example:{port}"), ""),
            "403",
        ),
        (
            get(
                "/healthz",
                &format!("127.0.0.1:{}", port.wrapping_add(1)),
                "",
            ),
            "403",
        ),
        (get("/healthz", "", ""), "403"),
        (
            get(
                "/api/queues",
                &addr.to_string(),
                "Authorization: Bearer operator-token-for-the-test\r\nSec-Fetch-Site: cross-site\r\n",
            ),
            "403",
        ),
        (
            get(
                "/api/queues",
                &addr.to_string(),
                "Authorization: Bearer operator-token-for-the-test\r\nSec-Fetch-Site: same-origin\r\n",
            ),
            "200",
        ),
    ];
    for (request, status) in cases {
        let response = raw_http(addr, &request).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?} → {response}"
        );
        let csp = header_value(&response, "content-security-policy").unwrap_or("");
        assert!(
            csp.contains("frame-ancestors 'none'"),
            "{request:?} → {response}"
        );
        assert_eq!(header_value(&response, "x-frame-options"), Some("DENY"));
    }
    let refused = raw_http(addr, &get("/healthz", &format!("evil.example:{port}"), "")).await;
    assert!(refused.contains("is not this listener"), "{refused}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_closes_slow_and_idle_requests_and_caps_connections() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.http_header_timeout = Duration::from_secs(5);
    config.admin_idle_timeout = Duration::from_secs(5);
    config.max_admin_connections = 3;
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let addr = admin_addr(&admin_url);
    // Silent, half a request line, headers without their end, a body that never comes.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: ")
        .await
        .unwrap();
    let mut no_body = TcpStream::connect(addr).await.unwrap();
    no_body
        .write_all(
            format!(
                "POST /api/redrive HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The cap is 3: a fourth is closed at once.
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    let took = closed_within(&mut fourth, Duration::from_secs(20))
        .await
        .expect("the fourth admin connection is closed");
    assert!(took < Duration::from_secs(4), "closed only after {took:?}");
    for stream in [&mut silent, &mut half, &mut no_body] {
        closed_within(stream, Duration::from_secs(30))
            .await
            .expect("a stalled admin connection is closed");
    }
    // Room again, and counted.
    let health = raw_http(
        addr,
        &format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert_eq!(
        metric(&admin_url, &refused("admin", "connection_limit")).await,
        1.0
    );
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_off_loopback_needs_the_insecure_flag_and_a_token() {
    let world = World::new();
    let run = |config: lienthong_broker::BrokerConfig| async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let admin_port = admin.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(lienthong_broker::run_with_admin(
            config,
            listener,
            Some(admin),
            shutdown.clone(),
        ));
        (task, shutdown, admin_port)
    };
    let (task, _, _) = run(world.broker_config("one")).await;
    let error = task.await.unwrap().unwrap_err().to_string();
    assert!(error.contains("--admin-insecure-bind"), "{error}");
    assert!(!world.path("one").join("db").exists(), "nothing opened");

    let mut config = world.broker_config("two");
    config.admin_insecure_bind = true;
    let (task, _, _) = run(config).await;
    let error = task.await.unwrap().unwrap_err().to_string();
    assert!(error.contains("--admin-token-file"), "{error}");

    let mut config = world.broker_config("three");
    config.admin_insecure_bind = true;
    config.admin_tokens = vec![AdminToken {
        name: "alice".into(),
        token: "a-long-enough-operator-token".into(),
    }];
    let (task, shutdown, port) = run(config).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut last = None;
    let health = wait_until(
        "the insecure admin listener answers",
        Duration::from_secs(20),
        || async {
            let Ok(mut stream) = TcpStream::connect(addr).await else {
                return None;
            };
            let request =
                format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await.ok()?;
            Some(response)
        },
        |r| r.starts_with("HTTP/1.1 200"),
        &mut last,
    )
    .await;
    assert!(health.is_some(), "{last:?}");
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redrives_are_audited_with_the_operator_token_name_or_certificate() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.expiry_check_interval = Duration::from_millis(50);
    // A redriven document gets a fresh default expiry: short, so it dies again soon.
    config.default_expiry = [Duration::from_millis(500); 5];
    config.admin_tokens = vec![AdminToken {
        name: "Nguyễn Văn An".into(),
        token: "token-of-an-operator-named-an".into(),
    }];
    config.admin_token = Some("legacy-token-without-a-name".into());
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    // B is offline: a document for it expires into a dead letter.
    let expiring = SendRequest {
        to: vec![B.into()],
        subject: "Hết hạn".into(),
        expires_at_ms: Some(lienthong_proto::now_ms() + 500),
        attachments: vec![AttachmentUpload {
            name: "a.txt".into(),
            media_type: None,
            content_base64: "YQ==".into(),
            upload_id: None,
        }],
        ..SendRequest::default()
    };
    let dead = a.client.send(&expiring).await.unwrap().message_id;
    // The store's own view (the dashboard's), so a stale status cannot pass for a new one.
    let expired = || {
        let url = format!("{admin_url}/api/messages/{dead}");
        async move {
            let mut last = None;
            wait_until(
                "the dead letter",
                Duration::from_secs(30),
                || {
                    let url = url.clone();
                    async move {
                        let response = reqwest::Client::new()
                            .get(url)
                            .bearer_auth("token-of-an-operator-named-an")
                            .send()
                            .await
                            .ok()?;
                        response.json::<serde_json::Value>().await.ok()
                    }
                },
                |v| v["recipients"][0]["state"] == "expired",
                &mut last,
            )
            .await
            .unwrap_or_else(|| panic!("not expired: {last:?}"));
        }
    };
    expired().await;
    let client = reqwest::Client::new();
    let redrive = |token: &'static str| {
        let client = client.clone();
        let url = format!("{admin_url}/api/redrive");
        let dead = dead.clone();
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({ "message_id": dead, "agency": B }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(redrive("not-a-token-of-this-broker").await, 401);
    assert_eq!(redrive("token-of-an-operator-named-an").await, 200);
    expired().await;
    assert_eq!(redrive("legacy-token-without-a-name").await, 200);
    expired().await;
    let mut admin = admin_client(&world, &broker.url).await;
    let redrive_grpc = admin
        .redrive(lienthong_proto::pb::RedriveRequest {
            message_id: dead.clone(),
            agency: B.into(),
        })
        .await;
    assert!(redrive_grpc.is_ok(), "{redrive_grpc:?}");
    let entries = admin
        .audit_tail(AuditTailRequest { n: 200 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let who: Vec<String> = entries
        .iter()
        .filter(|e| e.kind == "redriven")
        .map(|e| e.detail.clone())
        .collect();
    let legacy_hash: String = lienthong_proto::sha256(b"legacy-token-without-a-name")[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(who.len(), 3, "{entries:?}");
    assert_eq!(who[0], "queued again by operator Nguyễn Văn An");
    assert_eq!(
        who[1],
        format!("queued again by operator dashboard token {legacy_hash}")
    );
    assert!(
        who[2].starts_with("queued again by operator certificate ") && who[2].len() > 37,
        "{who:?}"
    );
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_file_readable_by_others_is_refused_and_a_private_one_is_used() {
    let world = World::new();
    let bin = env!("CARGO_BIN_EXE_lienthong-under-test");
    let token_file = world.path("admin-tokens");
    let mut file = std::fs::File::create(&token_file).unwrap();
    writeln!(file, "# operators\nbinh:token-of-operator-binh-0001").unwrap();
    drop(file);
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let port = free_port();
    let admin_port = free_port();
    let args = |data: &str| -> Vec<String> {
        vec![
            "broker".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--admin-listen".into(),
            format!("127.0.0.1:{admin_port}"),
            "--admin-token-file".into(),
            token_file.display().to_string(),
            "--data".into(),
            world.path(data).display().to_string(),
            "--ca".into(),
            world.pki.ca_cert.display().to_string(),
            "--cert".into(),
            world.pki.broker_cert.display().to_string(),
            "--key".into(),
            world.pki.broker_key.display().to_string(),
            "--min-free-bytes".into(),
            (16u64 << 20).to_string(),
        ]
    };
    let output = std::process::Command::new(bin)
        .args(args("broker"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("chmod 600"), "{stderr}");
    assert!(stderr.contains("admin-tokens"), "{stderr}");

    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut process = Process::new(
        std::path::Path::new(bin),
        args("broker"),
        format!("127.0.0.1:{admin_port}").parse().unwrap(),
    );
    process.spawn().await;
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{admin_port}/api/queues");
    let without = client.get(&url).send().await.unwrap().status().as_u16();
    assert_eq!(without, 401);
    let with = client
        .get(&url)
        .bearer_auth("token-of-operator-binh-0001")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(with, 200);
    // The name is not a token.
    let name = client
        .get(&url)
        .bearer_auth("binh")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(name, 401);
    assert!(process.terminate().success());
}
