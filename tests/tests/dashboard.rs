//! The operator dashboard in a real headless Chromium, against an in-process broker
//! carrying real traffic: the queue table shows the right depths worst first, the
//! search shows a document's timeline, the redrive button queues a dead letter again,
//! and a screenshot is left in the target directory.
//!
//! Chromium is driven through the DevTools protocol over `--remote-debugging-pipe`
//! (NUL-separated JSON on the child's file descriptors 3 and 4, mapped by `sh` onto its
//! stdin and stdout), so no WebSocket client and no browser-automation package is
//! needed. Without `chromium` on the PATH the test prints `SKIPPED` and passes; `.ci/run`
//! installs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest};
use lienthong_tests::*;
use serde_json::{Value, json};

const TOKEN: &str = "operator-token-for-the-test";

/// A headless Chromium and its DevTools pipe, attached to one page.
struct Browser {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1400,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut child = child;
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Self {
            child,
            input,
            output,
            next_id: 1,
            session: None,
            _profile: profile,
        }
    }

    /// Sends one command and returns its result, skipping events; panics on an error.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.input.write_all(&bytes).unwrap();
        self.input.flush().unwrap();
        loop {
            let mut frame = Vec::new();
            let n = self.output.read_until(0, &mut frame).unwrap();
            assert!(n > 0, "chromium closed its DevTools pipe during {method}");
            frame.pop();
            let reply: Value = serde_json::from_slice(&frame).unwrap();
            if reply["id"].as_u64() == Some(id) {
                assert!(
                    reply.get("error").is_none(),
                    "{method} failed: {}",
                    reply["error"]
                );
                return reply["result"].clone();
            }
        }
    }

    /// Opens a page of 1400×1000 CSS pixels and attaches to it.
    fn open_page(&mut self) {
        let target = self.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        self.call("Page.enable", json!({}));
        self.call("Runtime.enable", json!({}));
        self.resize(1000);
    }

    fn resize(&mut self, height: u64) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression} threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` every 100 ms until `accept` holds; panics after 20 s.
    fn wait_for(&mut self, what: &str, expression: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let value = self.eval(expression);
            if accept(&value) {
                return value;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {what}; last value: {value}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG of the whole page.
    fn screenshot(&mut self) -> Vec<u8> {
        let metrics = self.call("Page.getLayoutMetrics", json!({}));
        let height = metrics["cssContentSize"]["height"]
            .as_f64()
            .unwrap_or(1000.0)
            .ceil()
            .max(1000.0);
        self.resize(height as u64);
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = Vec::new();
        let _ = self.output.read_to_end(&mut rest);
    }
}

fn chromium_installed() -> bool {
    Command::new("chromium")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

async fn api(admin_url: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{admin_url}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn queue<'a>(queues: &'a Value, code: &str) -> &'a Value {
    queues["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["agency"] == code)
        .unwrap()
}

/// A broker with its admin listener behind [`TOKEN`], agent A online, and B offline with
/// one expired document (a dead letter) and three queued.
struct Traffic {
    world: World,
    broker: Broker,
    admin_url: String,
    a: Agent,
    dead_id: String,
    pending_ids: Vec<String>,
    /// The business document id of the second queued document.
    business_id: String,
}

async fn traffic() -> Traffic {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.expiry_check_interval = Duration::from_millis(50);
    config.admin_token = Some(TOKEN.into());
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;

    // B is offline: one document expires into a dead letter, three wait in its queue.
    let expiring = SendRequest {
        to: vec![B.into()],
        subject: "Hết hạn khi Sở Tài chính vắng mặt".into(),
        expires_at_ms: Some(lienthong_proto::now_ms() + 1500),
        attachments: vec![AttachmentUpload {
            name: "het-han.txt".into(),
            media_type: None,
            content_base64: base64::engine::general_purpose::STANDARD.encode(b"het han"),
            upload_id: None,
        }],
        ..SendRequest::default()
    };
    let dead_id = a.client.send(&expiring).await.unwrap().message_id;
    let mut pending_ids = Vec::new();
    for n in 1..=3 {
        let subject = format!("Về việc báo cáo quý IV, lần {n}");
        let body = format!("Kính gửi Sở Tài chính ({n})");
        pending_ids.push(
            a.send(&[B], &subject, &[("cong-van.txt", body.as_bytes())])
                .await,
        );
    }
    a.wait_status(&dead_id, "the expiry", |v| {
        v.recipients.iter().any(|r| r.state == "expired")
    })
    .await;
    let second = a
        .wait_status(&pending_ids[1], "accepted", |v| {
            v.submission_receipt_verified
        })
        .await;
    for id in &pending_ids {
        a.wait_status(id, "accepted", |v| v.submission_receipt_verified)
            .await;
    }

    Traffic {
        world,
        broker,
        admin_url,
        a,
        dead_id,
        pending_ids,
        business_id: second.business_id,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_api_lists_queues_documents_and_redrives_behind_the_token() {
    let Traffic {
        world: _world,
        broker,
        admin_url,
        a,
        dead_id,
        pending_ids,
        business_id,
    } = traffic().await;
    let client = reqwest::Client::new();
    for path in [
        "/api/queues".to_owned(),
        format!("/api/agencies/{B}/pending"),
        format!("/api/messages/{dead_id}"),
    ] {
        let response = client
            .get(format!("{admin_url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
    }
    let refused = client
        .post(format!("{admin_url}/api/redrive"))
        .json(&json!({"message_id": dead_id}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // The page itself holds no data and loads without the token.
    let page = reqwest::get(format!("{admin_url}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Cơ quan"));

    let pending = api(&admin_url, &format!("/api/agencies/{B}/pending")).await;
    let mut listed: Vec<&str> = pending["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["message_id"].as_str().unwrap())
        .collect();
    listed.sort_unstable();
    let mut expected: Vec<&str> = pending_ids.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(listed, expected, "{pending}");
    assert_eq!(pending["total"], 3);

    // Business ids hold slashes (`sender,yyyy/MM/dd,number/`): one path segment encoded.
    let encoded = business_id.replace('/', "%2F");
    let by_business = api(&admin_url, &format!("/api/messages/{encoded}")).await;
    assert_eq!(by_business["message_id"], pending_ids[1].as_str());
    assert_eq!(by_business["recipients"][0]["state"], "queued");
    let dead = api(&admin_url, &format!("/api/messages/{dead_id}")).await;
    assert_eq!(dead["recipients"][0]["state"], "expired", "{dead}");
    let missing = client
        .get(format!("{admin_url}/api/messages/no-such-document"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let redrive = |message_id: String| {
        client
            .post(format!("{admin_url}/api/redrive"))
            .bearer_auth(TOKEN)
            .json(&json!({"message_id": message_id, "agency": B}))
            .send()
    };
    let first = redrive(dead_id.clone()).await.unwrap();
    assert_eq!(first.status(), 200);
    let body: Value = first.json().await.unwrap();
    assert_eq!(
        body["redriven"][0]["message_id"],
        dead_id.as_str(),
        "{body}"
    );
    // Not a dead letter any more.
    assert_eq!(redrive(dead_id.clone()).await.unwrap().status(), 404);
    let queues = api(&admin_url, "/api/queues").await;
    assert_eq!(queue(&queues, B)["pending"], 4, "{queues}");
    assert_eq!(queue(&queues, B)["dead_letters"], 0, "{queues}");
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_queues_finds_documents_and_redrives_in_chromium() {
    if !chromium_installed() {
        println!("SKIPPED: chromium not installed");
        return;
    }
    let Traffic {
        world,
        broker,
        admin_url,
        a,
        dead_id,
        pending_ids,
        business_id,
    } = traffic().await;

    // The API behind the page: the token is required, the monitoring endpoints stay open.
    let unauthenticated = reqwest::get(format!("{admin_url}/api/queues"))
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let wrong = reqwest::Client::new()
        .get(format!("{admin_url}/api/queues"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        reqwest::get(format!("{admin_url}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{admin_url}/metrics"))
            .await
            .unwrap()
            .status(),
        200
    );
    let queues = api(&admin_url, "/api/queues").await;
    assert_eq!(queue(&queues, B)["pending"], 3, "{queues}");
    assert_eq!(queue(&queues, B)["dead_letters"], 1, "{queues}");
    assert_eq!(queue(&queues, B)["connected"], false, "{queues}");
    assert_eq!(queue(&queues, A)["connected"], true, "{queues}");

    let page_url = format!("{admin_url}/#token={TOKEN}");
    let dead = dead_id.clone();
    let second_id = pending_ids[1].clone();
    let (before, screenshot) = tokio::task::spawn_blocking(move || {
        let mut browser = Browser::launch();
        browser.open_page();
        browser.navigate(&page_url);

        // The table: B, offline with three pending, is first; A is online.
        let rows = browser.wait_for(
            "B's row with 3 pending",
            r#"JSON.stringify([...document.querySelectorAll('#queues tbody tr')].map(r =>
                 [r.dataset.agency, r.querySelector('.pending')?.textContent,
                  r.querySelector('.connection')?.textContent, r.querySelector('.dead')?.textContent]))"#,
            |v| v.as_str().is_some_and(|s| s.contains(&format!(r#"["{B}","3""#))),
        );
        let rows: Vec<Vec<String>> = serde_json::from_str(rows.as_str().unwrap()).unwrap();
        assert_eq!(rows[0][0], B, "worst first: {rows:?}");
        assert_eq!(rows[0][1], "3", "{rows:?}");
        assert!(rows[0][2].contains("Offline"), "{rows:?}");
        assert_eq!(rows[0][3], "1", "{rows:?}");
        let a_row = rows.iter().find(|r| r[0] == A).unwrap();
        assert!(a_row[2].contains("Online"), "{rows:?}");
        assert_eq!(a_row[1], "0", "{rows:?}");

        // Search by business document id: the timeline of that document.
        browser.eval(&format!(
            "document.getElementById('search-input').value = {};
             document.getElementById('search-form').requestSubmit(); true",
            json!(business_id)
        ));
        browser.wait_for(
            "the timeline by business id",
            "document.querySelector('#timeline .message-id')?.textContent ?? null",
            |v| v == &json!(second_id),
        );
        let events = browser.eval(
            "[...document.querySelectorAll('#timeline .recipient li')].map(li => li.dataset.event)",
        );
        assert_eq!(events[0], "accepted", "{events}");
        let state = browser.eval("document.querySelector('#timeline .recipient').dataset.state");
        assert_eq!(state, "queued");

        // Search by message id for the dead letter: expired.
        browser.eval(&format!(
            "document.getElementById('search-input').value = {};
             document.getElementById('search-form').requestSubmit(); true",
            json!(dead)
        ));
        browser.wait_for(
            "the expired timeline",
            "document.querySelector('#timeline .recipient')?.dataset.state ?? null",
            |v| v == "expired",
        );
        let not_found = browser.eval(
            "document.getElementById('search-input').value = 'no-such-document';
             document.getElementById('search-form').requestSubmit(); true",
        );
        assert_eq!(not_found, true);
        browser.wait_for(
            "not found",
            "document.querySelector('#timeline .not-found')?.textContent ?? null",
            |v| v.as_str().is_some_and(|s| s.contains("No such document")),
        );

        // Click B: its pending documents and its dead letter; press redrive.
        browser.eval(&format!(
            "document.querySelector('#queues tr[data-agency=\"{B}\"]').click(); true"
        ));
        let pending = browser.wait_for(
            "B's pending list",
            "document.querySelectorAll('#pending tbody tr[data-message-id]').length",
            |v| v == 3,
        );
        assert_eq!(pending, 3);
        browser.wait_for(
            "the redrive button",
            &format!("!!document.querySelector('#dead-letters button.redrive[data-message-id=\"{dead}\"]')"),
            |v| v == true,
        );
        let before = browser.screenshot();
        browser.eval(&format!(
            "document.querySelector('#dead-letters button.redrive[data-message-id=\"{dead}\"]').click(); true"
        ));
        browser.wait_for(
            "the dead letter queued again",
            r#"JSON.stringify([document.querySelectorAll('#dead-letters tbody tr[data-message-id]').length,
                document.querySelectorAll('#pending tbody tr[data-message-id]').length,
                document.querySelector('#queues tr[data-agency="000.00.12.H31"] .pending')?.textContent,
                document.getElementById('detail-message').textContent])"#,
            |v| {
                v.as_str()
                    .is_some_and(|s| s.starts_with(r#"[0,4,"4","#) && s.contains("queued again"))
            },
        );
        // The timeline of the redriven document shows the operator's redrive.
        browser.eval(&format!(
            "document.getElementById('search-input').value = {};
             document.getElementById('search-form').requestSubmit(); true",
            json!(dead)
        ));
        browser.wait_for(
            "the redriven timeline",
            "[...document.querySelectorAll('#timeline .recipient li')].map(li => li.dataset.event).join(',')",
            |v| v.as_str().is_some_and(|s| s.contains("redriven")),
        );
        (before, browser.screenshot())
    })
    .await
    .unwrap();

    // Left for a person to look at: before pressing redrive, and at the end.
    for (name, png) in [
        ("dashboard-before-redrive.png", &before),
        ("dashboard.png", &screenshot),
    ] {
        assert!(png.starts_with(b"\x89PNG"), "{name} is not a PNG");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
        std::fs::write(&path, png).unwrap();
        println!("screenshot: {}", path.display());
    }

    // The broker agrees: no dead letter, four queued for B.
    let dead_letters = api(&admin_url, &format!("/api/agencies/{B}/dead-letters")).await;
    assert!(
        dead_letters["dead_letters"].as_array().unwrap().is_empty(),
        "{dead_letters}"
    );
    let queues = api(&admin_url, "/api/queues").await;
    assert_eq!(queue(&queues, B)["pending"], 4, "{queues}");

    // B comes online: everything is delivered, the redriven document once.
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    for id in pending_ids.iter().chain([&dead_id]) {
        a.wait_status(id, "delivered", |v| {
            v.recipients.iter().all(|r| r.state == "delivered")
        })
        .await;
    }
    // Exported after the acknowledgement (issue 11): wait for the folder.
    for id in pending_ids.iter().chain([&dead_id]) {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    assert_eq!(inbox_entries(&world.inbox_dir(B)).len(), 4);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
