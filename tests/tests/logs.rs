//! The broker's log as an operator's tools read it: `--log-format json` (or `log_format`
//! in the config file) gives one JSON object per stderr line; the default text format
//! has no colour escapes when stderr is not a terminal; a refused TLS handshake is one
//! WARN line naming the peer and the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lienthong_tests::*;
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

/// The lines the child writes to stderr, collected by a thread as they come (so the
/// pipe never fills), until the child exits.
struct StderrLines {
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl StderrLines {
    fn follow(stderr: std::process::ChildStderr) -> Self {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Self { lines, reader }
    }

    /// Waits up to 30 s for a line that `accept` takes; returns it.
    async fn wait_for(&self, what: &str, accept: impl Fn(&str) -> bool) -> String {
        let mut last = None;
        let found = wait_until(
            what,
            Duration::from_secs(30),
            || async { Some(self.lines.lock().unwrap().clone()) },
            |lines| lines.iter().any(|l| accept(l)),
            &mut last,
        )
        .await;
        let lines = found.unwrap_or_else(|| panic!("no line for {what}; stderr: {last:#?}"));
        lines.into_iter().find(|l| accept(l)).unwrap()
    }

    /// Every line, once the child has exited (its stderr is closed then).
    fn all(self) -> Vec<String> {
        self.reader.join().unwrap();
        Arc::try_unwrap(self.lines).unwrap().into_inner().unwrap()
    }
}

/// A TCP connection to the broker that sends bytes that are no TLS ClientHello.
async fn garbage_handshake(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    local
}

async fn start_broker(extra: &[&str], world: &World) -> (BrokerProcess, StderrLines) {
    let mut broker = BrokerProcess::prepare(Path::new(BIN), world, "broker");
    broker
        .process
        .args
        .extend(extra.iter().map(|a| (*a).to_owned()));
    broker
        .process
        .spawn_with(Stdio::piped(), Some("info"))
        .await;
    let stderr = StderrLines::follow(broker.process.take_stderr().unwrap());
    (broker, stderr)
}

fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    assert!(!lines.is_empty(), "the broker logged nothing");
    lines
        .iter()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"))
        })
        .collect()
}

/// The JSON WARN line for a refused handshake from `peer`, if `lines` hold one.
fn refused_from<'a>(lines: &'a [serde_json::Value], peer: &str) -> Option<&'a serde_json::Value> {
    lines.iter().find(|v| {
        v["level"] == "WARN" && v["fields"]["peer"] == peer && v["fields"]["reason"] == "tls_error"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_name_each_refused_peer() {
    let world = World::new();
    let (mut broker, stderr) = start_broker(&["--log-format", "json"], &world).await;
    // Two refused handshakes in a row: each gets its own WARN line (the rate limit
    // only bites in a flood).
    let first = garbage_handshake(broker.process.addr).await.to_string();
    let second = garbage_handshake(broker.process.addr).await.to_string();
    for peer in [&first, &second] {
        stderr
            .wait_for("the refusal's WARN line", |l| {
                l.contains(peer.as_str()) && l.contains("WARN")
            })
            .await;
    }
    let status = broker.terminate();
    assert!(status.success(), "{status:?}");

    let lines = json_lines(&stderr.all());
    for peer in [&first, &second] {
        let warn = refused_from(&lines, peer).unwrap_or_else(|| panic!("{lines:#?}"));
        assert_eq!(warn["fields"]["listener"], "grpc");
        assert!(
            !warn["fields"]["detail"].as_str().unwrap().is_empty(),
            "{warn}"
        );
        assert!(warn["timestamp"].is_string(), "{warn}");
    }
    // The start-up line is there too, as JSON.
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "broker listening"),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_in_the_config_file() {
    let world = World::new();
    let config = world.path("broker-log.toml");
    std::fs::write(&config, "log_format = \"json\"\n").unwrap();
    let config = config.display().to_string();
    let (mut broker, stderr) = start_broker(&["--config", &config], &world).await;
    let peer = garbage_handshake(broker.process.addr).await.to_string();
    stderr
        .wait_for("the refusal's WARN line", |l| l.contains(peer.as_str()))
        .await;
    broker.terminate();
    let lines = json_lines(&stderr.all());
    assert!(refused_from(&lines, &peer).is_some(), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_to_a_pipe_have_no_colours_and_plain_fields() {
    let world = World::new();
    let (mut broker, stderr) = start_broker(&[], &world).await;
    let peer = garbage_handshake(broker.process.addr).await.to_string();
    let line = stderr
        .wait_for("the refusal's WARN line", |l| l.contains(peer.as_str()))
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("TLS handshake refused"), "{line}");
    assert!(line.contains(&format!("peer={peer}")), "{line}");
    assert!(line.contains("reason=tls_error"), "{line}");
    broker.terminate();
    let lines = stderr.all();
    for line in &lines {
        assert!(!line.contains("\x1b["), "ANSI escape in {line:?}");
        // No Rust debug formatting of optional values (`addr=Some(127.0.0.1:…)`).
        assert!(!line.contains("Some("), "debug formatting in {line:?}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("broker listening") && l.contains("addr=127.0.0.1:")),
        "{lines:#?}"
    );
    // Not JSON: the default is text.
    assert!(
        lines
            .iter()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
    );
}

#[test]
fn an_unknown_log_format_is_a_usage_error() {
    let out = std::process::Command::new(BIN)
        .args(["--log-format", "xml", "pki", "dev", "--out", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("json"), "{stderr}");
}
