//! A closed stderr or stdout never takes a `lienthong` process down: an agent whose
//! stderr is a pipe nobody reads any more (a log shipper that died) keeps receiving,
//! sending and reconnecting, and stops on SIGTERM; a client command whose stdout is
//! closed (`lienthong inbox | head -c1`) exits quietly, without a panic message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lienthong_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

/// The write end of a pipe whose read end is already closed: every write to it fails
/// with EPIPE from the first byte on.
fn dead_pipe() -> Stdio {
    let mut reader = Command::new("true").stdin(Stdio::piped()).spawn().unwrap();
    let writer = reader.stdin.take().unwrap();
    // `true` held the only read end; it is closed once `true` has exited.
    reader.wait().unwrap();
    Stdio::from(writer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_closed_stderr_keeps_working_and_stops_on_sigterm() {
    let world = World::new();
    let mut broker = BrokerProcess::start(Path::new(BIN), &world, "broker").await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let mut b = AgentProcess::prepare(Path::new(BIN), &world, B, &broker.url);
    // Debug: every step of every delivery writes a log line into the dead pipe.
    b.process.spawn_with(dead_pipe(), Some("debug")).await;

    // B receives.
    let first = a.send(&[B], "Gửi B lần một", &[("a.txt", b"mot")]).await;
    wait_for_path(&world.inbox_dir(B).join(&first)).await;
    // B sends, and its document is delivered with a receipt.
    let request = lienthong_agent::api_types::SendRequest {
        to: vec![A.into()],
        subject: "Từ B".into(),
        ..Default::default()
    };
    let from_b = b.client.send(&request).await.unwrap().message_id;
    wait_for_path(&world.inbox_dir(A).join(&from_b)).await;
    let mut last = None;
    let delivered = wait_until(
        "B's document delivered",
        Duration::from_secs(60),
        || {
            let client = b.client.clone();
            let id = from_b.clone();
            async move { client.status(&id).await.ok() }
        },
        |v| {
            v.recipients
                .iter()
                .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
        },
        &mut last,
    )
    .await;
    assert!(delivered.is_some(), "{last:?}");

    // The broker goes away and comes back: B's session ends (a warning it cannot
    // write) and B reconnects.
    broker.kill();
    broker.spawn().await;
    let second = a.send(&[B], "Gửi B sau khi khởi động lại", &[]).await;
    wait_for_path(&world.inbox_dir(B).join(&second)).await;
    assert_eq!(b.client.inbox().await.unwrap().len(), 2);

    // SIGTERM still stops it, cleanly.
    let status = b
        .process
        .terminate_within(Duration::from_secs(30))
        .await
        .expect("the agent exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    a.stop().await;
    broker.terminate();
}

/// Runs the binary with stdout closed; returns (exit code, stderr).
fn with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(dead_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (child.wait().unwrap().code(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_exit_quietly_when_stdout_is_closed() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            a.send(&[B], &format!("Văn bản {i}"), &[("a.txt", b"x")])
                .await,
        );
    }
    for id in &ids {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    let folder = world.inbox_dir(B).join(&ids[0]).display().to_string();
    let ca = world.pki.ca_cert.display().to_string();
    let a_token = a.token_file.display().to_string();
    let b_token = b.token_file.display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["inbox", "--api", &b.api, "--api-token-file", &b_token],
        vec![
            "inbox",
            "--api",
            &b.api,
            "--api-token-file",
            &b_token,
            "--json",
        ],
        vec![
            "status",
            "--api",
            &a.api,
            "--api-token-file",
            &a_token,
            &ids[0],
        ],
        vec!["directory", "--api", &a.api, "--api-token-file", &a_token],
        vec!["verify", &folder, "--ca", &ca],
        vec!["--help"],
    ];
    for args in &commands {
        let (code, stderr) = with_closed_stdout(args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?} said: {stderr}");
    }

    // As a person types it: the first byte arrives, nothing else is said.
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "'{BIN}' inbox --api {} --api-token-file '{b_token}' | head -c1",
                b.api
            ),
        ])
        .output()
        .unwrap();
    assert_eq!(out.stdout, b"M");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
