//! Agent sessions over real mTLS: one live session per agency (a second agent with the
//! same certificate is refused, named and counted, and the first keeps receiving), a
//! killed agent's restart gets its session back at once, and a session whose agent never
//! reads holds a bounded number of bytes, frees them when it stalls, and loses nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use lienthong_proto::pb::{self, agent_message::Msg};
use lienthong_tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

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

async fn wait_metric(
    admin_url: &str,
    series: &str,
    what: &str,
    accept: impl Fn(f64) -> bool,
) -> f64 {
    let mut last = None;
    wait_until(
        what,
        Duration::from_secs(30),
        || async { Some(metric(admin_url, series).await) },
        |v| accept(*v),
        &mut last,
    )
    .await
    .unwrap_or_else(|| panic!("{what}: {series} stayed at {last:?}"))
}

fn connected(code: &str) -> String {
    format!("lienthong_broker_agency_connected{{agency=\"{code}\"}}")
}

/// Opens a raw Session for `code` that says Hello and then reads nothing. Returns the
/// call's outcome and the sender that keeps the request stream open.
async fn raw_session(
    world: &World,
    url: &str,
    code: &str,
) -> (
    Result<tonic::Response<tonic::Streaming<pb::BrokerMessage>>, tonic::Status>,
    mpsc::Sender<pb::AgentMessage>,
) {
    let mut client = exchange_client(url, world.agency_tls(code).client_config("localhost"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::AgentMessage {
        msg: Some(Msg::Hello(pb::Hello {
            window: 128,
            partial: Vec::new(),
            max_batch: 0,
        })),
    })
    .await
    .unwrap();
    let response = client.session(ReceiverStream::new(rx)).await;
    (response, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_session_for_an_agency_is_refused_while_the_first_lives() {
    let world = World::new();
    let (broker, admin_url) = Broker::start_with_admin(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    wait_metric(&admin_url, &connected(B), "B connected", |v| v == 1.0).await;

    // A second "agent" for B, same certificate: refused, naming the live session.
    for attempt in 1..=2 {
        let (response, _keep) = raw_session(&world, &broker.url, B).await;
        let status = response.expect_err("a second session must be refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        let message = status.message();
        assert!(
            message.contains(&format!(
                "agency {B} already has a live session from 127.0.0.1:"
            )),
            "{message}"
        );
        assert!(message.contains("second agent"), "{message}");
        assert_eq!(
            metric(&admin_url, "lienthong_broker_session_conflicts_total").await,
            f64::from(attempt)
        );
    }
    // The first session was not disturbed: B receives, exactly once.
    let id = a.send(&[B], "Sau phiên thứ hai", &[("a.txt", b"a")]).await;
    a.wait_status(&id, "delivered", |v| {
        v.recipients.iter().all(|r| r.state == "delivered")
    })
    .await;
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![id.clone()]);
    assert_eq!(metric(&admin_url, &connected(B)).await, 1.0);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_restarted_gets_its_session_back_without_waiting_for_keepalive() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    // Far longer than the test's deadline: the old session must end with its stream.
    config.keepalive_interval = Duration::from_secs(120);
    config.keepalive_timeout = Duration::from_secs(60);
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lienthong-under-test"));
    let mut b = AgentProcess::start(&bin, &world, B, &broker.url).await;
    wait_metric(&admin_url, &connected(B), "B connected", |v| v == 1.0).await;
    b.process.kill();
    let restarted = Instant::now();
    b.process.spawn().await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let id = a
        .send(&[B], "Sau khi khởi động lại", &[("a.txt", b"a")])
        .await;
    a.wait_status(&id, "delivered to the restarted agent", |v| {
        v.recipients.iter().all(|r| r.state == "delivered")
    })
    .await;
    let took = restarted.elapsed();
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(
        metric(&admin_url, "lienthong_broker_session_conflicts_total").await,
        0.0,
        "the killed agent's session ended with its connection"
    );
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_that_never_reads_holds_bounded_bytes_and_frees_them_when_it_stalls() {
    const BUDGET: u64 = 2 * 1024 * 1024;
    const DOC: usize = 700 * 1024;
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.session_buffer_bytes = BUDGET;
    config.session_stall_timeout = Duration::from_secs(3);
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let mut ids = Vec::new();
    for n in 0..12u8 {
        let body = vec![n; DOC];
        ids.push(
            a.send(&[B], &format!("Lớn {n}"), &[("lon.bin", &body)])
                .await,
        );
    }
    for id in &ids {
        a.wait_status(id, "accepted", |v| v.submission_receipt_verified)
            .await;
    }
    // B's "agent" says Hello and never reads.
    let (response, keep) = raw_session(&world, &broker.url, B).await;
    let stream = response.expect("the session opens");
    let buffered = "lienthong_broker_session_buffered_bytes";
    let held = wait_metric(&admin_url, buffered, "the session buffers", |v| v > 0.0).await;
    // Give it every chance to buffer more than it may.
    let mut peak = held;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        peak = peak.max(metric(&admin_url, buffered).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // At most the budget plus one message (a message larger than the rest of the budget
    // waits; one larger than the whole budget would go alone).
    let limit = (BUDGET + DOC as u64 + 64 * 1024) as f64;
    assert!(peak <= limit, "buffered {peak} bytes, budget {BUDGET}");
    assert!(
        peak >= DOC as f64,
        "buffered only {peak}: nothing was pushed"
    );
    // Stalled for session_stall_timeout: the session ends and frees what it held, though
    // the connection and the call are still open.
    wait_metric(&admin_url, buffered, "the stalled session frees", |v| {
        v == 0.0
    })
    .await;
    wait_metric(&admin_url, &connected(B), "the stalled session ends", |v| {
        v == 0.0
    })
    .await;
    assert_eq!(
        metric(
            &admin_url,
            &format!("lienthong_broker_queue_pending_documents{{agency=\"{B}\"}}")
        )
        .await,
        12.0,
        "nothing was lost or settled"
    );
    drop(stream);
    drop(keep);
    // The real agent then receives every document, each once.
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    for id in &ids {
        a.wait_status(id, "delivered", |v| {
            v.recipients.iter().all(|r| r.state == "delivered")
        })
        .await;
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(inbox_entries(&world.inbox_dir(B)), expected);
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_certificate_do_not_split_the_inbox() {
    let world = World::new();
    let (broker, admin_url) = Broker::start_with_admin(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let first = Agent::start(world.agent_config(B, &broker.url)).await;
    wait_metric(&admin_url, &connected(B), "the first B connected", |v| {
        v == 1.0
    })
    .await;
    // A copy of B's agent (say, a restored VM): same certificate, its own data and inbox.
    let mut copy = world.agent_config(B, &broker.url);
    copy.data_dir = world.path("copy-of-b/data");
    copy.inbox_dir = Some(world.path("copy-of-b/inbox"));
    let second = Agent::start(copy).await;
    wait_metric(
        &admin_url,
        "lienthong_broker_session_conflicts_total",
        "the copy is refused",
        |v| v >= 1.0,
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..6 {
        ids.push(
            a.send(&[B], &format!("Văn bản {n}"), &[("a.txt", b"a")])
                .await,
        );
    }
    for id in &ids {
        a.wait_status(id, "delivered", |v| {
            v.recipients.iter().all(|r| r.state == "delivered")
        })
        .await;
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(inbox_entries(&world.inbox_dir(B)), expected);
    assert!(
        inbox_entries(&world.path("copy-of-b/inbox")).is_empty(),
        "the refused copy received documents"
    );
    a.stop().await;
    first.stop().await;
    second.stop().await;
    broker.stop().await;
}
