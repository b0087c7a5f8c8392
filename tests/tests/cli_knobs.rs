//! The delivery window and batch size on the command line (issue 11): `lienthong
//! broker --window N --max-batch-documents N` and `lienthong agent --window N`, their
//! config-file keys, their bounds (a value out of them is refused with exit code 2 and
//! a message naming the flag, the bounds and the value, before anything is opened), and
//! their effect on the real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use lienthong_proto::document::seal_batch;
use lienthong_proto::pb;
use lienthong_tests::fake_broker::FakeExchange;
use lienthong_tests::*;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// `broker` with everything it needs, storing in `data`, plus `extra`.
fn broker_args(world: &World, data: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "broker".to_owned(),
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--data".into(),
        data.display().to_string(),
        "--ca".into(),
        world.pki.ca_cert.display().to_string(),
        "--cert".into(),
        world.pki.broker_cert.display().to_string(),
        "--key".into(),
        world.pki.broker_key.display().to_string(),
    ];
    args.extend(strings(extra));
    args
}

/// `agent` for B with everything it needs, storing in `data`, plus `extra`.
fn agent_args(world: &World, data: &Path, extra: &[&str]) -> Vec<String> {
    let (cert, key) = world.pki.agency(B).unwrap();
    let mut args = vec![
        "agent".to_owned(),
        "--broker".into(),
        format!("https://localhost:{}", free_port()),
        "--agency".into(),
        B.into(),
        "--ca".into(),
        world.pki.ca_cert.display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--data".into(),
        data.display().to_string(),
        "--api".into(),
        format!("127.0.0.1:{}", free_port()),
    ];
    args.extend(strings(extra));
    args
}

/// Asserts a usage refusal (exit code 2) whose message holds every one of `needles`,
/// and that the data directory was never created.
fn assert_refused(output: &Output, data: &Path, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert!(!data.exists(), "refused before anything was opened");
}

#[test]
fn out_of_range_windows_and_batch_sizes_are_refused_before_anything_starts() {
    let world = World::new();
    let data = world.path("never-created");
    let window_bounds = "--window must be from 1 to 16384 (deliveries unacknowledged per session)";
    for (extra, value) in [
        (["--window", "0"], "not 0"),
        (["--window", "16385"], "not 16385"),
    ] {
        let output = run(&broker_args(&world, &data, &extra));
        assert_refused(&output, &data, &[window_bounds, value]);
        let output = run(&agent_args(&world, &data, &extra));
        assert_refused(&output, &data, &[window_bounds, value]);
    }
    for (extra, value) in [
        (["--max-batch-documents", "0"], "not 0"),
        (["--max-batch-documents", "100000"], "not 100000"),
    ] {
        let output = run(&broker_args(&world, &data, &extra));
        assert_refused(
            &output,
            &data,
            &[
                "--max-batch-documents must be from 1 to 16384 (documents per SubmitBatch call)",
                value,
            ],
        );
    }
    // The same keys in a configuration file are held to the same bounds.
    let file = world.path("broker.toml");
    std::fs::write(&file, "window = 0\nmax_batch_documents = 64\n").unwrap();
    let output = run(&broker_args(
        &world,
        &data,
        &["--config", &file.display().to_string()],
    ));
    assert_refused(&output, &data, &[window_bounds, "not 0"]);
    let file = world.path("agent.toml");
    std::fs::write(&file, "window = 20000\n").unwrap();
    let output = run(&agent_args(
        &world,
        &data,
        &["--config", &file.display().to_string()],
    ));
    assert_refused(&output, &data, &[window_bounds, "not 20000"]);
    // Not a number at all: clap names the flag.
    let output = run(&broker_args(&world, &data, &["--window", "many"]));
    assert_refused(&output, &data, &["'many'", "--window"]);
}

#[test]
fn help_documents_the_knobs_and_their_bounds() {
    let broker = run(&strings(&["broker", "--help"]));
    assert!(broker.status.success(), "{broker:?}");
    let text = String::from_utf8_lossy(&broker.stdout);
    assert!(text.contains("--window <N>"), "{text}");
    assert!(text.contains("--max-batch-documents <N>"), "{text}");
    assert!(text.contains("1 to 16384 (default 512)"), "{text}");
    assert!(text.contains("1 to 16384 (default 1024)"), "{text}");
    let agent = run(&strings(&["agent", "--help"]));
    assert!(agent.status.success(), "{agent:?}");
    let text = String::from_utf8_lossy(&agent.stdout);
    assert!(text.contains("--window <N>"), "{text}");
    assert!(text.contains("1 to 16384 (default 512"), "{text}");
}

/// A batch of `n` small documents from A to B, sealed with one batch signature.
fn batch_for_b(world: &World, n: usize) -> Vec<pb::BatchDocument> {
    let key = world.agency_tls(A).signing_key().unwrap();
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| format!("cửa sổ {i}").into_bytes()).collect();
    let headers: Vec<pb::DocumentHeader> = bodies
        .iter()
        .map(|body| header(A, &[B], &[("van-ban.txt", body)]))
        .collect();
    seal_batch(&headers, &key)
        .into_iter()
        .zip(bodies)
        .map(|(envelope, body)| pb::BatchDocument {
            envelope: Some(envelope.unwrap()),
            attachments: vec![body],
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_takes_its_window_and_batch_limit_from_the_flags() {
    let world = World::new();
    let mut broker = BrokerProcess::prepare(Path::new(BIN), &world, "broker");
    broker
        .process
        .args
        .extend(strings(&["--window", "3", "--max-batch-documents", "2"]));
    broker.spawn().await;
    let mut a = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();

    // Three documents in one call are over --max-batch-documents 2: refused whole.
    let status = a
        .submit_batch(pb::SubmitBatchRequest {
            documents: batch_for_b(&world, 3),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("at most 2 per call (max_batch_documents)"),
        "{}",
        status.message()
    );
    // Five documents for B in calls of two at most are taken.
    for n in [2, 2, 1] {
        let outcomes = a
            .submit_batch(pb::SubmitBatchRequest {
                documents: batch_for_b(&world, n),
            })
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        assert_eq!(outcomes.len(), n);
        assert!(outcomes.iter().all(|o| o.code == 0), "{outcomes:?}");
    }

    // B asks for batches of up to 256 without a window of its own: the first fill of
    // the broker's window of 3 pushes exactly 3 of the 5 (its default 512 would push 5).
    let mut b = exchange_client(&broker.url, world.agency_tls(B).client_config("localhost"))
        .await
        .unwrap();
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            window: 0,
            partial: Vec::new(),
            max_batch: 256,
        })),
    };
    let outbound =
        tokio_stream::StreamExt::chain(tokio_stream::iter([hello]), tokio_stream::pending());
    let mut pushed = b.session(outbound).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(30), pushed.message())
        .await
        .expect("the broker pushes within 30 s")
        .unwrap()
        .expect("a message");
    match first.msg {
        Some(pb::broker_message::Msg::Batch(batch)) => {
            assert_eq!(batch.deliveries.len(), 3, "one window's worth");
        }
        other => panic!("five small deliveries go out as a batch, got {other:?}"),
    }
    drop(pushed);
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_announces_its_window_from_the_flag() {
    let world = World::new();
    let mut fake = FakeExchange::new().serve(&world).await;
    let mut agent = AgentProcess::prepare(Path::new(BIN), &world, B, &fake.url);
    agent.process.args.extend(strings(&["--window", "7"]));
    agent.process.spawn().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let hello = loop {
        let message = tokio::time::timeout_at(deadline, fake.answers.recv())
            .await
            .expect("the agent opens its session within 30 s")
            .expect("answers channel open");
        if let Some(pb::agent_message::Msg::Hello(hello)) = message.msg {
            break hello;
        }
    };
    assert_eq!(hello.window, 7, "{hello:?}");
    assert_eq!(
        hello.max_batch, 7,
        "batches no larger than the window: {hello:?}"
    );
    assert!(agent.process.terminate().success());
    fake.stop();
}
