//! Prometheus `/metrics`, `/healthz` and `/readyz` of the broker's admin listener and
//! of the agents' API, read over real HTTP while a real exchange runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest};
use lienthong_tests::*;

/// One scrape: `name{labels}` → value, exactly as exposed.
#[derive(Debug, Clone)]
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut values = HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            assert!(
                values.insert(series.to_owned(), value).is_none(),
                "series {series} exposed twice"
            );
        }
        Self(values)
    }

    /// The value of a series; 0 when absent, like a counter that never moved.
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }
}

async fn scrape(base: &str) -> Option<Scrape> {
    scrape_with(base, None).await
}

/// A scrape of an agent's `/metrics`, which needs its API token.
async fn scrape_with(base: &str, token: Option<&str>) -> Option<Scrape> {
    let mut request = reqwest::Client::new().get(format!("{base}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.ok()?;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Some(Scrape::parse(&response.text().await.ok()?))
}

/// Scrapes until `accept` holds; panics with the last scrape after 30 s.
async fn scrape_until(base: &str, what: &str, accept: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    let found = wait_until(
        what,
        Duration::from_secs(30),
        || scrape(base),
        accept,
        &mut last,
    )
    .await;
    found.unwrap_or_else(|| panic!("timed out waiting for {what}; last scrape: {last:?}"))
}

/// Scrapes an agent (with its token) until `accept` holds.
async fn scrape_agent_until(agent: &Agent, what: &str, accept: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut last = None;
    let found = wait_until(
        what,
        Duration::from_secs(30),
        || scrape_with(&agent.api, Some(&agent.token)),
        accept,
        &mut last,
    )
    .await;
    found.unwrap_or_else(|| panic!("timed out waiting for {what}; last scrape: {last:?}"))
}

/// A GET to an agent's API with its token.
async fn get_agent(agent: &Agent, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", agent.api))
        .bearer_auth(&agent.token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn get(url: &str) -> (u16, String) {
    let response = reqwest::get(url).await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn upload(name: &str, bytes: &[u8]) -> AttachmentUpload {
    AttachmentUpload {
        name: name.into(),
        media_type: None,
        content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
        upload_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_and_agents_expose_metrics_health_and_readiness() {
    let world = World::new();
    let (broker, admin) = Broker::start_with_admin(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    // C stays offline: its queue keeps what is sent to it.

    assert_eq!(get(&format!("{admin}/healthz")).await, (200, "ok".into()));
    assert_eq!(get(&format!("{admin}/readyz")).await, (200, "ready".into()));

    let id = a
        .send(&[B, C], "Báo cáo số liệu", &[("bc.txt", b"so lieu")])
        .await;
    a.wait_status(&id, "delivered to B", |v| {
        v.recipients
            .iter()
            .any(|r| r.agency == B && r.state == "delivered")
    })
    .await;

    // Refused for good by the broker: the recipient is not registered there.
    let refused = SendRequest {
        to: vec!["000.00.99.H31".into()],
        subject: "Gửi nhầm nơi nhận".into(),
        attachments: vec![upload("x.txt", b"x")],
        ..SendRequest::default()
    };
    let refused_id = a.client.send(&refused).await.unwrap().message_id;
    a.wait_status(&refused_id, "refused by the broker", |v| {
        v.outbox_state == "failed"
    })
    .await;

    let c_queue = format!("lienthong_broker_queue_pending_documents{{agency=\"{C}\"}}");
    let m = scrape_until(&admin, "acknowledgement and refusal counted", |m| {
        m.get("lienthong_broker_acknowledgements_total") >= 1.0
            && m.get("lienthong_broker_submissions_refused_total{reason=\"invalid_argument\"}")
                >= 1.0
    })
    .await;
    assert_eq!(m.get("lienthong_broker_submissions_accepted_total"), 1.0);
    assert_eq!(m.get("lienthong_broker_submissions_duplicate_total"), 0.0);
    assert_eq!(
        m.get("lienthong_broker_submissions_refused_total{reason=\"invalid_argument\"}"),
        1.0
    );
    // Every reason is exposed from the start, so rates work before the first refusal.
    assert!(m.has("lienthong_broker_submissions_refused_total{reason=\"resource_exhausted\"}"));
    assert_eq!(
        m.get("lienthong_broker_submission_duration_seconds_count"),
        1.0
    );
    assert_eq!(m.get("lienthong_broker_acknowledgements_total"), 1.0);
    assert_eq!(
        m.get("lienthong_broker_delivery_duration_seconds_count"),
        1.0
    );
    assert!(m.get("lienthong_broker_deliveries_total") >= 1.0);
    assert_eq!(m.get("lienthong_broker_redeliveries_total"), 0.0);
    assert_eq!(
        m.get("lienthong_broker_dead_letters_total{outcome=\"expired\"}"),
        0.0
    );
    // The offline recipient's queue holds the one document sent to it.
    assert_eq!(m.get(&c_queue), 1.0);
    assert!(
        m.get(&format!(
            "lienthong_broker_queue_pending_bytes{{agency=\"{C}\"}}"
        )) > 0.0
    );
    assert!(m.has(&format!(
        "lienthong_broker_queue_oldest_pending_seconds{{agency=\"{C}\"}}"
    )));
    assert_eq!(
        m.get(&format!(
            "lienthong_broker_queue_pending_documents{{agency=\"{B}\"}}"
        )),
        0.0
    );
    assert_eq!(
        m.get(&format!(
            "lienthong_broker_agency_connected{{agency=\"{B}\"}}"
        )),
        1.0
    );
    assert_eq!(
        m.get(&format!(
            "lienthong_broker_agency_connected{{agency=\"{C}\"}}"
        )),
        0.0
    );
    assert!(m.get("lienthong_broker_connected_agents") >= 2.0);
    for role in ["tls", "signing"] {
        let left = m.get(&format!(
            "lienthong_certificate_expiry_seconds{{certificate=\"{role}\"}}"
        ));
        assert!(left > 0.0, "{role} certificate expiry: {left}");
    }
    assert_eq!(m.get("lienthong_broker_ready"), 1.0);
    assert_eq!(m.get("lienthong_broker_store_writable"), 1.0);
    assert!(m.get("lienthong_broker_store_size_bytes") > 0.0);
    assert!(m.get("lienthong_broker_store_free_bytes") > 0.0);
    assert_eq!(m.get("lienthong_broker_store_documents"), 1.0);
    assert!(m.get("lienthong_broker_store_flush_duration_seconds_count") >= 1.0);

    // The sender's agent: one document submitted, one refused for good.
    let am = scrape_agent_until(&a, "A's refusal counted", |m| {
        m.get("lienthong_agent_submissions_total{outcome=\"refused\"}") >= 1.0
    })
    .await;
    assert_eq!(
        am.get("lienthong_agent_outbox_documents{state=\"submitted\"}"),
        1.0
    );
    assert_eq!(
        am.get("lienthong_agent_outbox_documents{state=\"failed\"}"),
        1.0
    );
    assert_eq!(
        am.get("lienthong_agent_outbox_documents{state=\"outbox\"}"),
        0.0
    );
    assert_eq!(
        am.get("lienthong_agent_submissions_total{outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(
        am.get("lienthong_agent_submissions_total{outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(am.get("lienthong_agent_session_connected"), 1.0);
    assert!(am.get("lienthong_certificate_expiry_seconds{certificate=\"signing\"}") > 0.0);

    // The recipient's agent: one document received, nothing duplicated or refused.
    let bm = scrape_agent_until(&b, "B's delivery counted", |m| {
        m.get("lienthong_agent_deliveries_received_total") >= 1.0
    })
    .await;
    assert_eq!(bm.get("lienthong_agent_deliveries_received_total"), 1.0);
    assert_eq!(bm.get("lienthong_agent_deliveries_duplicate_total"), 0.0);
    assert_eq!(bm.get("lienthong_agent_deliveries_refused_total"), 0.0);
    assert_eq!(bm.get("lienthong_agent_session_connected"), 1.0);
    assert!(bm.get("lienthong_certificate_expiry_seconds{certificate=\"tls\"}") > 0.0);
    assert_eq!(get(&format!("{}/healthz", b.api)).await, (200, "ok".into()));
    assert_eq!(get_agent(&b, "/readyz").await, (200, "ready".into()));

    // The queue gauge follows the store: C comes online and takes its document.
    let c = Agent::start(world.agent_config(C, &broker.url)).await;
    let m = scrape_until(&admin, "C's queue drained", |m| {
        m.get(&c_queue) == 0.0 && m.get("lienthong_broker_acknowledgements_total") == 2.0
    })
    .await;
    assert_eq!(
        m.get("lienthong_broker_delivery_duration_seconds_count"),
        2.0
    );

    // B goes away: the broker's connection gauge follows.
    b.stop().await;
    scrape_until(&admin, "B disconnected", |m| {
        m.get(&format!(
            "lienthong_broker_agency_connected{{agency=\"{B}\"}}"
        )) == 0.0
    })
    .await;

    c.stop().await;
    a.stop().await;
    broker.stop().await;
    // The admin listener ends with the broker.
    assert!(reqwest::get(format!("{admin}/healthz")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deliveries_are_counted_as_dead_letters() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.expiry_check_interval = Duration::from_millis(50);
    let (broker, admin) = Broker::start_with_admin(config).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let request = SendRequest {
        to: vec![C.into()],
        subject: "Hết hạn khi C vắng mặt".into(),
        expires_at_ms: Some(lienthong_proto::now_ms() + 1000),
        attachments: vec![upload("a.txt", b"het han")],
        ..SendRequest::default()
    };
    let id = a.client.send(&request).await.unwrap().message_id;
    a.wait_status(&id, "expired", |v| {
        v.recipients.iter().any(|r| r.state == "expired")
    })
    .await;
    let m = scrape_until(&admin, "dead letter counted", |m| {
        m.get("lienthong_broker_dead_letters_total{outcome=\"expired\"}") == 1.0
    })
    .await;
    assert_eq!(
        m.get("lienthong_broker_dead_letters_total{outcome=\"refused\"}"),
        0.0
    );
    assert_eq!(
        m.get(&format!(
            "lienthong_broker_queue_pending_documents{{agency=\"{C}\"}}"
        )),
        0.0
    );
    a.stop().await;
    broker.stop().await;
}
