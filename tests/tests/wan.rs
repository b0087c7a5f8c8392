//! A bad WAN between the agents and the broker, made by the harness's fault proxy: slow
//! links, cut connections and blackholes (bytes accepted, nothing forwarded). After the
//! link heals everything arrives exactly once, and HTTP/2 keepalive finds a blackholed
//! link within a time bounded by its configuration.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lienthong_agent::AgentConfig;
use lienthong_agent::api_types::StatusView;
use lienthong_broker::BrokerConfig;
use lienthong_proto::pb::admin_client::AdminClient;
use lienthong_proto::pb::{QueueInfo, QueuesRequest};
use lienthong_tests::proxy::FaultProxy;
use lienthong_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tonic::transport::Channel;

/// Small on purpose, so that a dead link is found within seconds.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait for an acknowledgement before the broker offers a delivery again on
/// the same session (it doubles with each attempt).
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

fn wan_broker(world: &World) -> BrokerConfig {
    let mut config = world.broker_config("broker");
    config.keepalive_interval = KEEPALIVE_INTERVAL;
    config.keepalive_timeout = KEEPALIVE_TIMEOUT;
    config.ack_timeout = ACK_TIMEOUT;
    config
}

fn wan_agent(world: &World, code: &str, url: &str) -> AgentConfig {
    let mut config = world.agent_config(code, url);
    config.keepalive_interval = KEEPALIVE_INTERVAL;
    config.keepalive_timeout = KEEPALIVE_TIMEOUT;
    config
}

/// The operator's view of the broker's queues (a direct connection, no proxy).
struct Operator {
    client: AdminClient<Channel>,
}

impl Operator {
    async fn connect(world: &World, broker: &Broker) -> Self {
        Self {
            client: admin_client(world, &broker.url).await,
        }
    }

    async fn queue(&self, agency: &str) -> Option<QueueInfo> {
        let mut client = self.client.clone();
        let response = client.queues(QueuesRequest {}).await.ok()?;
        response
            .into_inner()
            .queues
            .into_iter()
            .find(|q| q.agency == agency)
    }

    /// Waits up to `limit` for `agency`'s queue to satisfy `accept`; panics on timeout.
    async fn wait(
        &self,
        agency: &str,
        what: &str,
        limit: Duration,
        accept: impl Fn(&QueueInfo) -> bool,
    ) -> QueueInfo {
        let mut last = None;
        let found = wait_until(what, limit, || self.queue(agency), accept, &mut last).await;
        found.unwrap_or_else(|| panic!("timed out waiting for {what}; last: {last:?}"))
    }
}

fn delivered_with_receipts(view: &StatusView) -> bool {
    !view.recipients.is_empty()
        && view
            .recipients
            .iter()
            .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
}

fn attempts_of(view: &StatusView, agency: &str) -> u32 {
    view.recipients
        .iter()
        .find(|r| r.agency == agency)
        .map_or(0, |r| r.attempts)
}

/// Deterministic bytes that differ from document to document.
fn content(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// Document `i`: a short letter, and for every third one a 100–500 KiB annex.
fn attachments_of(i: u32) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![(
        format!("cong-van-{i}.txt"),
        format!("Kính gửi các cơ quan: văn bản số {i}").into_bytes(),
    )];
    if i % 3 == 1 {
        let kib = 100 + (i as usize * 37) % 401;
        files.push((format!("phu-luc-{i}.pdf"), content(i, kib * 1024)));
    }
    files
}

struct Sent {
    id: String,
    files: Vec<(String, Vec<u8>)>,
}

async fn send_docs(a: &Agent, range: std::ops::Range<u32>, sent: &mut Vec<Sent>) {
    for i in range {
        let files = attachments_of(i);
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
            .collect();
        let id = a
            .send(&[B, C], &format!("Văn bản qua mạng kém {i}"), &refs)
            .await;
        sent.push(Sent { id, files });
    }
}

async fn wait_submitted(a: &Agent, sent: &[Sent]) {
    for doc in sent {
        a.wait_status(&doc.id, "accepted by the broker", |v| {
            v.outbox_state == "submitted"
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn documents_survive_slow_cut_and_blackholed_links_and_arrive_exactly_once() {
    let started = Instant::now();
    let world = World::new();
    let broker = Broker::start(wan_broker(&world)).await;
    let operator = Operator::connect(&world, &broker).await;
    let pa = FaultProxy::start(broker.addr).await;
    let pb = FaultProxy::start(broker.addr).await;
    let pc = FaultProxy::start(broker.addr).await;
    let proxies = [&pa, &pb, &pc];
    let a = Agent::start(wan_agent(&world, A, &pa.url())).await;
    let b = Agent::start(wan_agent(&world, B, &pb.url())).await;
    let c = Agent::start(wan_agent(&world, C, &pc.url())).await;
    for code in [A, B, C] {
        operator
            .wait(
                code,
                "session through the proxy",
                Duration::from_secs(15),
                |q| q.connected,
            )
            .await;
    }
    let mut sent = Vec::new();

    // 1. A slow link: 50 ms each way and 2 MB/s in each direction, for every agency.
    for proxy in proxies {
        proxy.set_latency(Duration::from_millis(50));
        proxy.set_bandwidth(Some(2_000_000));
    }
    send_docs(&a, 0..10, &mut sent).await;
    wait_submitted(&a, &sent[..2]).await;

    // 2. Every connection cut while documents are on the way.
    let accepted_before_cut: Vec<u64> = proxies.iter().map(|p| p.stats().accepted).collect();
    let cut: Vec<usize> = proxies.iter().map(|p| p.cut_all()).collect();
    send_docs(&a, 10..20, &mut sent).await;
    wait_submitted(&a, &sent).await;

    // 3. The recipients' links go black, then the sender's, for about 3 s in all.
    //    A document submitted while B's link is black and seen pushed to B (attempts
    //    >= 1) cannot have reached B: it must be pushed again after the link heals.
    pb.blackhole(true);
    pc.blackhole(true);
    let blackhole_start = Instant::now();
    send_docs(&a, 20..25, &mut sent).await;
    wait_submitted(&a, &sent[20..25]).await;
    let mut pushed_into_blackhole: Vec<(String, &str)> = Vec::new();
    for doc in &sent[20..25] {
        let view = a.client.status(&doc.id).await.unwrap();
        for code in [B, C] {
            if attempts_of(&view, code) >= 1 {
                pushed_into_blackhole.push((doc.id.clone(), code));
            }
        }
    }
    pa.blackhole(true);
    // Into A's black link: the submission (one with a 223 KiB annex) hangs until A's
    // keepalive gives up on the connection.
    send_docs(&a, 25..27, &mut sent).await;
    let black_for = Duration::from_secs(3).saturating_sub(blackhole_start.elapsed());
    tokio::time::sleep(black_for).await;
    let discarded: Vec<u64> = proxies.iter().map(|p| p.stats().discarded).collect();
    for proxy in proxies {
        proxy.blackhole(false);
    }
    let healed_at = Instant::now();

    // 4. Healed, and at once every connection is cut again. The cut also resets the
    //    TLS handshakes that agents started while their link was black: the agent sets
    //    no TLS handshake timeout, so without it such a redial would hang forever (see
    //    `agent_whose_redial_went_into_the_blackhole_reconnects_after_healing`).
    let cut_again: Vec<usize> = proxies.iter().map(|p| p.cut_all()).collect();
    a.wait_status(
        &sent[26].id,
        "a document from the blackout submitted",
        |v| v.outbox_state == "submitted",
    )
    .await;
    let recovered_in = healed_at.elapsed();
    send_docs(&a, 27..30, &mut sent).await;
    for proxy in proxies {
        proxy.heal();
    }

    // Everything arrives exactly once, with verified receipts.
    let mut max_attempts = 0;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for doc in &sent {
        let view = a
            .wait_status(&doc.id, "delivered to B and C", delivered_with_receipts)
            .await;
        assert_eq!(view.outbox_state, "submitted", "{view:?}");
        assert!(view.submission_receipt_verified, "{view:?}");
        assert_eq!(view.recipients.len(), 2, "{view:?}");
        for r in &view.recipients {
            // The push that was acknowledged is the last one in the attempt log.
            let last = r.attempt_log.last().map(|a| a.outcome.as_str());
            assert_eq!(last, Some("acknowledged"), "{view:?}");
            max_attempts = max_attempts.max(r.attempts);
            for attempt in &r.attempt_log {
                *outcomes.entry(attempt.outcome.clone()).or_default() += 1;
            }
        }
    }
    let mut expected: Vec<String> = sent.iter().map(|d| d.id.clone()).collect();
    expected.sort();
    for (code, agent) in [(B, &b), (C, &c)] {
        let inbox = world.inbox_dir(code);
        // Exported after the acknowledgement (issue 11): wait for the folders.
        for id in &expected {
            wait_for_path(&inbox.join(id)).await;
        }
        assert_eq!(inbox_entries(&inbox), expected, "inbox of {code}");
        for doc in &sent {
            for (name, bytes) in &doc.files {
                let stored = std::fs::read(inbox.join(&doc.id).join(name)).unwrap();
                assert!(stored == *bytes, "{code}: {}/{name} differs", doc.id);
            }
        }
        let listed: BTreeSet<String> = agent
            .client
            .inbox()
            .await
            .unwrap()
            .into_iter()
            .map(|item| item.message_id)
            .collect();
        assert_eq!(listed.len(), sent.len(), "inbox API of {code}");
        assert_eq!(listed, expected.iter().cloned().collect(), "{code}");
    }
    // The broker's queues drain: nothing pending, nothing waiting for an ack.
    for code in [B, C] {
        operator
            .wait(code, "queue drained", Duration::from_secs(15), |q| {
                q.pending == 0 && q.in_flight == 0
            })
            .await;
    }

    // The retries, as far as they are guaranteed. A cut closes every connection open
    // at that moment, and documents sent after it were delivered, so every agency's
    // agent dialled again: each proxy accepted a connection after the cut.
    for (proxy, before) in proxies.iter().zip(&accepted_before_cut) {
        let stats = proxy.stats();
        assert!(stats.accepted > *before, "no reconnection: {stats:?}");
    }
    // Every push into the blackhole failed and was followed by another push, and the
    // status shows both. (That some document was pushed into the blackhole at all
    // depends on its submission beating the broker's keepalive, so it is not asserted.)
    for (id, code) in &pushed_into_blackhole {
        let view = a.client.status(id).await.unwrap();
        let recipient = view.recipients.iter().find(|r| r.agency == *code).unwrap();
        assert!(recipient.attempts >= 2, "{code}: {view:?}");
        let failed = recipient
            .attempt_log
            .iter()
            .any(|a| a.outcome != "acknowledged" && a.outcome != "pushed");
        assert!(failed, "{code}: {view:?}");
    }
    eprintln!(
        "wan: {} documents in {:?}; cut {cut:?} then {cut_again:?} connections; \
         discarded {discarded:?} bytes while black; traffic again {recovered_in:?} after \
         healing; {} deliveries pushed into the blackhole; max attempts {max_attempts}; \
         attempt outcomes {outcomes:?}; proxies {:?}",
        sent.len(),
        started.elapsed(),
        pushed_into_blackhole.len(),
        proxies.iter().map(|p| p.stats()).collect::<Vec<_>>()
    );

    a.stop().await;
    b.stop().await;
    c.stop().await;
    broker.stop().await;
}

/// Agent B behind a proxy, A direct. B's link goes black while a document for B is
/// sent; both ends must notice within the keepalive bound. Then the link heals (and,
/// with `cut_after_heal`, every connection is cut) and B must come back and receive the
/// document.
async fn blackhole_b_then_heal(cut_after_heal: bool) {
    let world = World::new();
    let broker = Broker::start(wan_broker(&world)).await;
    let operator = Operator::connect(&world, &broker).await;
    let pb = FaultProxy::start(broker.addr).await;
    let a = Agent::start(wan_agent(&world, A, &broker.url)).await;
    let b_config = wan_agent(&world, B, &pb.url());
    let reconnect_max = b_config.reconnect_max;
    let b = Agent::start(b_config).await;
    let before = operator
        .wait(B, "B connected", Duration::from_secs(15), |q| q.connected)
        .await;

    pb.blackhole(true);
    let black_at = Instant::now();
    let annex = content(7, 64 * 1024);
    let id = a
        .send(&[B], "Gửi khi đường truyền chết", &[("pl.pdf", &annex)])
        .await;
    // A peer pings after an interval without reading anything and gives up when no
    // answer comes within the timeout; the slack covers scheduling and polling.
    let bound = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + Duration::from_secs(2);
    operator
        .wait(B, "the broker drops B's session", bound * 3, |q| {
            !q.connected
        })
        .await;
    let broker_noticed = black_at.elapsed();
    assert!(
        broker_noticed <= bound,
        "the broker noticed after {broker_noticed:?}, bound {bound:?}"
    );
    // The blackhole swallows closes too, so the broker found out by its own keepalive.
    let stats = pb.stats();
    assert!(stats.open >= 1 && stats.discarded > 0, "{stats:?}");
    // B notices by its own keepalive and dials again (into the blackhole).
    let mut last = None;
    let redialled = wait_until(
        "B dials again",
        bound * 3,
        || async { Some(pb.stats()) },
        |s| s.accepted >= 2,
        &mut last,
    )
    .await;
    assert!(redialled.is_some(), "B did not dial again: {last:?}");
    let agent_noticed = black_at.elapsed();
    assert!(
        agent_noticed <= bound + reconnect_max,
        "B dialled again after {agent_noticed:?}, bound {:?}",
        bound + reconnect_max
    );
    let view = a
        .wait_status(&id, "queued at the broker", |v| {
            v.outbox_state == "submitted"
        })
        .await;
    assert_ne!(view.recipients[0].state, "delivered", "{view:?}");
    assert!(inbox_entries(&world.inbox_dir(B)).is_empty());

    pb.blackhole(false);
    let healed_at = Instant::now();
    if cut_after_heal {
        pb.cut_all();
    }
    // A redial waits for the next backoff; one that went into the blackhole is given
    // up after the agent's connect timeout (5 s).
    let back_bound = Duration::from_secs(5) + reconnect_max + Duration::from_secs(2);
    let after = operator
        .wait(B, "B connected again", back_bound * 2, |q| q.connected)
        .await;
    let back_after = healed_at.elapsed();
    assert!(
        back_after <= back_bound,
        "B came back after {back_after:?}, bound {back_bound:?}"
    );
    assert!(after.connected_since_ms > before.connected_since_ms);
    let view = a
        .wait_status(&id, "delivered after healing", delivered_with_receipts)
        .await;
    // Exported after the acknowledgement (issue 11): wait for the folder.
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)), vec![id.clone()]);
    assert_eq!(
        std::fs::read(world.inbox_dir(B).join(&id).join("pl.pdf")).unwrap(),
        annex
    );
    eprintln!(
        "keepalive: broker dropped the session {broker_noticed:?} and B dialled again \
         {agent_noticed:?} after the blackhole (bound {bound:?}); B back {back_after:?} \
         after healing (cut: {cut_after_heal}); attempts {}; proxy {:?}",
        attempts_of(&view, B),
        pb.stats()
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keepalive_finds_a_blackholed_link_at_both_ends_and_the_agent_comes_back() {
    // With a cut after healing as well: both kinds of recovery must work.
    blackhole_b_then_heal(true).await;
}

/// Regression, found with this proxy: `connect_timeout` bounds the TCP connect only and
/// HTTP/2 keepalive starts after the TLS handshake, so a ClientHello lost in a
/// blackhole left the agent waiting forever after the link healed. The agent now sets
/// a TLS handshake timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_whose_redial_went_into_the_blackhole_reconnects_after_healing() {
    blackhole_b_then_heal(false).await;
}

/// An echo server on `127.0.0.1:0`.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Reads exactly `len` bytes within 5 s.
async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("bytes within 5 s")
        .unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_delays_caps_blackholes_and_cuts_plain_tcp() {
    let echo = echo_server().await;
    let proxy = FaultProxy::start(echo).await;
    let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();

    // A perfect link first.
    stream.write_all(b"xin chao").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 8).await, b"xin chao");

    // Latency is added in each direction: a round trip takes at least twice of it.
    let latency = Duration::from_millis(150);
    proxy.set_latency(latency);
    let sent_at = Instant::now();
    stream.write_all(b"tre").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 3).await, b"tre");
    let round_trip = sent_at.elapsed();
    assert!(round_trip >= 2 * latency, "round trip {round_trip:?}");

    // A cap of 200 kB/s: 100 kB take about half a second each way (pipelined), and
    // come back in order.
    proxy.set_latency(Duration::ZERO);
    proxy.set_bandwidth(Some(200_000));
    let bulk = content(3, 100_000);
    let sent_at = Instant::now();
    let (mut read, mut write) = stream.split();
    let (_, echoed) = tokio::join!(write.write_all(&bulk), async {
        let mut buf = vec![0u8; bulk.len()];
        tokio::time::timeout(Duration::from_secs(10), read.read_exact(&mut buf))
            .await
            .expect("bulk within 10 s")
            .unwrap();
        buf
    });
    let took = sent_at.elapsed();
    assert!(echoed == bulk, "bulk bytes differ");
    assert!(
        took >= Duration::from_millis(450),
        "100 kB at 200 kB/s took {took:?}"
    );
    proxy.set_bandwidth(None);

    // A blackhole: bytes are taken, nothing comes back, the connection stays open.
    proxy.blackhole(true);
    stream.write_all(b"mat").await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await;
    assert!(read.is_err(), "read through a blackhole: {read:?}");
    let stats = proxy.stats();
    assert_eq!(stats.open, 1, "{stats:?}");
    assert_eq!(stats.discarded, 3, "{stats:?}");
    // Healed: later bytes pass, the swallowed ones are gone for good.
    proxy.blackhole(false);
    stream.write_all(b"lai").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 3).await, b"lai");

    // A cut closes the connection: the read ends with 0 bytes or a reset.
    assert_eq!(proxy.cut_all(), 1);
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("the cut is seen within 5 s");
    assert!(matches!(read, Ok(0) | Err(_)), "read after a cut: {read:?}");

    // New connections are still accepted; a client that closes ends its connection.
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    again.write_all(b"moi").await.unwrap();
    assert_eq!(read_exactly(&mut again, 3).await, b"moi");
    let stats = proxy.stats();
    assert_eq!(
        (stats.accepted, stats.cut, stats.open),
        (2, 1, 1),
        "{stats:?}"
    );
    drop(again);
    let mut last = None;
    let closed = wait_until(
        "the proxy closed the connection",
        Duration::from_secs(5),
        || async { Some(proxy.stats().open) },
        |open| *open == 0,
        &mut last,
    )
    .await;
    assert!(closed.is_some(), "still open: {last:?}");

    // Dropping the proxy closes its connections and its listener.
    let mut last_one = TcpStream::connect(proxy.addr()).await.unwrap();
    let addr = proxy.addr();
    drop(proxy);
    let read = tokio::time::timeout(Duration::from_secs(5), last_one.read(&mut buf))
        .await
        .expect("the drop is seen within 5 s");
    assert!(matches!(read, Ok(0) | Err(_)), "read after drop: {read:?}");
    let refused = wait_until(
        "the listener is closed",
        Duration::from_secs(5),
        || async { Some(TcpStream::connect(addr).await.is_err()) },
        |refused| *refused,
        &mut None,
    )
    .await;
    assert!(refused.is_some(), "the proxy still accepts after drop");
}
