//! `lienthong bench`: sizes the hardware it runs on. Every scenario starts a real broker
//! and real agents as child processes of this binary (`broker` / `agent` subcommands)
//! with mutual TLS, in a fresh folder under one temporary directory, drives the sender
//! agent's local HTTP API, detects storage at the recipient through its inbox, and stops
//! the children with SIGTERM at its end. Children log (`RUST_LOG=warn`) to files in that
//! folder; progress goes to stderr, the results table (or one JSON object) to stdout.
//!
//! Scenarios: 1 small documents with 256 in flight, 2 the same one at a time, 3 256 KiB
//! documents, 4 one large streamed document (with the disk's sequential write rate for
//! comparison), 5 idle connected agencies (broker memory per connection), 6 a broker
//! restarted over many pending documents (time to ready, then scenario 1 against it).
//!
//! Agents run as a gateway that reads the API would run them: without an inbox folder.
//! Scenario 1 runs a second time with the folder export on, and then counts a document
//! once its exported folder exists. Every run first probes the disk it writes to (1 KiB
//! append + fdatasync, 256 MiB sequential write + fdatasync) and reports, for scenarios
//! 1–3, the CPU time per document of each process (utime + stime from /proc).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Args;
use futures_util::StreamExt as _;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest};
use lienthong_certs_dev::{DevCa, DevPkiPaths, LeafSpec, write_dev_pki};
use lienthong_proto::pb::{AgentMessage, Hello, agent_message};
use lienthong_proto::tls::TlsFiles;
use rand::RngCore as _;
use serde_json::{Value, json};

use crate::error::CliError;
use crate::http::AgentClient;
use crate::output::{errln, outln};

const MIB: f64 = 1024.0 * 1024.0;
const SENDER: &str = "000.00.00.H31";
const RECIPIENT: &str = "000.00.12.H31";
/// Registered at the broker, never connected: scenario 6's pending documents wait for it.
const ABSENT: &str = "000.00.15.H31";
/// Notation of scenario 6's stored documents: their business ids never meet the agent's.
const PENDING_NOTATION: &str = "BENCH-PENDING";
const FSYNC: &str = "fdatasync before every acknowledgement (group commit)";
const SIGNATURE: &str = "ECDSA P-256";
const TLS: &str = "TLS 1.3 mTLS";
/// Without progress for this long, a wait is declared stuck.
const STALL: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Scenarios to run, comma separated (1..6).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6")]
    scenarios: Vec<u8>,
    /// Documents in scenario 1 (and in scenario 6's measurement).
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Documents in scenario 2 (one in flight).
    #[arg(long, default_value_t = 2_000)]
    latency_count: u64,
    /// Documents in scenario 3 (256 KiB each).
    #[arg(long, default_value_t = 2_000)]
    large_count: u64,
    /// Size in bytes of scenario 4's single document.
    #[arg(long, default_value_t = 1 << 30)]
    large_size: u64,
    /// Idle connected agencies in scenario 5.
    #[arg(long, default_value_t = 10_000)]
    connections: u64,
    /// Documents pending at the broker in scenario 6.
    #[arg(long, default_value_t = 1_000_000)]
    pending: u64,
    /// Print one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Keep the temporary directory and print its path.
    #[arg(long)]
    keep: bool,
}

/// What the whole invocation shares: the binary, the dev PKI, the temporary root.
struct Ctx {
    bin: PathBuf,
    root: PathBuf,
    pki: DevPkiPaths,
    keep: bool,
}

fn failed(what: &str) -> impl Fn(String) -> CliError + '_ {
    move |e| CliError::Failed(format!("{what}: {e}"))
}

fn progress(line: &str) {
    errln!("bench: {line}");
}

fn now_ms() -> i64 {
    lienthong_proto::now_ms()
}

pub async fn run(args: BenchArgs) -> Result<(), CliError> {
    if let Some(bad) = args.scenarios.iter().find(|s| !(1..=6).contains(*s)) {
        return Err(CliError::Usage(format!(
            "--scenarios: {bad} is not a scenario (1 to 6)"
        )));
    }
    for (flag, value) in [
        ("--count", args.count),
        ("--latency-count", args.latency_count),
        ("--large-count", args.large_count),
        ("--large-size", args.large_size),
        ("--connections", args.connections),
        ("--pending", args.pending),
    ] {
        if value == 0 {
            return Err(CliError::Usage(format!("{flag} must be at least 1")));
        }
    }
    let bin =
        std::env::current_exe().map_err(|e| failed("locating this program")(e.to_string()))?;
    let temp = tempfile::Builder::new()
        .prefix("lienthong-bench-")
        .tempdir()
        .map_err(|e| failed("creating a temporary folder")(e.to_string()))?;
    let root = temp.path().to_owned();
    let codes: Vec<String> = [SENDER, RECIPIENT, ABSENT]
        .iter()
        .map(|c| (*c).to_owned())
        .collect();
    let pki =
        write_dev_pki(&root.join("pki"), &codes).map_err(|e| failed("dev PKI")(e.to_string()))?;
    let ctx = Ctx {
        bin,
        root,
        pki,
        keep: args.keep,
    };
    let disk = disk_probe(&ctx.root).await?;
    let outcome = run_scenarios(&ctx, &args).await;
    if args.keep {
        let kept = temp.keep();
        progress(&format!("kept {}", kept.display()));
    }
    let rows = outcome?;
    let mut conditions = conditions();
    conditions["disk"] = disk;
    if args.json {
        let scenarios: Vec<Value> = rows.iter().map(Row::json).collect();
        let object = json!({ "conditions": conditions, "scenarios": scenarios });
        outln!("{object}");
    } else {
        print_table(&conditions, &rows);
    }
    Ok(())
}

async fn run_scenarios(ctx: &Ctx, args: &BenchArgs) -> Result<Vec<Row>, CliError> {
    let mut rows = Vec::new();
    let mut empty_rate = None;
    let wanted = |n: u8| args.scenarios.contains(&n);
    if wanted(1) || wanted(6) {
        let row = streamed(ctx, 1, 1024, 256, args.count, false).await?;
        empty_rate = Some(row.docs_per_sec());
        if wanted(1) {
            rows.push(row);
            rows.push(streamed(ctx, 1, 1024, 256, args.count, true).await?);
        }
    }
    if wanted(2) {
        rows.push(streamed(ctx, 2, 1024, 1, args.latency_count, false).await?);
    }
    if wanted(3) {
        rows.push(streamed(ctx, 3, 256 * 1024, 256, args.large_count, false).await?);
    }
    if wanted(4) {
        rows.push(large(ctx, args.large_size).await?);
    }
    if wanted(5) {
        rows.push(idle(ctx, args.connections).await?);
    }
    if wanted(6) {
        rows.push(pending(ctx, args.pending, args.count, empty_rate.unwrap_or(0.0)).await?);
    }
    Ok(rows)
}

/// One line of results.
enum Row {
    Stream {
        scenario: u8,
        size: u64,
        in_flight: usize,
        /// The recipient exported every document to its inbox folder.
        export: bool,
        m: Measured,
    },
    Large {
        bytes: u64,
        mb_per_sec: f64,
        disk_mb_per_sec: f64,
        rss_broker: f64,
        rss_sender: f64,
        rss_recipient: f64,
    },
    Idle {
        connections: u64,
        kib_per_connection: f64,
    },
    Pending {
        pending: u64,
        ready_seconds: f64,
        m: Measured,
        empty_rate: f64,
    },
}

impl Row {
    fn docs_per_sec(&self) -> f64 {
        match self {
            Row::Stream { m, .. } | Row::Pending { m, .. } => m.docs_per_sec,
            _ => 0.0,
        }
    }

    fn name(&self) -> String {
        match self {
            Row::Stream {
                size,
                in_flight,
                export,
                ..
            } => format!(
                "{} KiB documents, {in_flight} in flight{}",
                size / 1024,
                if *export { ", inbox export" } else { "" }
            ),
            Row::Large { bytes, .. } => format!("one {:.0} MiB document", *bytes as f64 / MIB),
            Row::Idle { connections, .. } => format!("{connections} idle connected agencies"),
            Row::Pending { pending, .. } => {
                format!("broker holding {pending} pending documents")
            }
        }
    }

    fn json(&self) -> Value {
        let name = self.name();
        match self {
            Row::Stream {
                scenario,
                export,
                m,
                ..
            } => json!({
                "scenario": scenario, "name": name, "documents": m.documents,
                "inbox_export": export,
                "docs_per_sec": m.docs_per_sec, "mb_per_sec": m.mb_per_sec,
                "p50_ms": m.p50_ms, "p99_ms": m.p99_ms,
                "cpu_us_per_doc": m.cpu.json(),
            }),
            Row::Large {
                bytes,
                mb_per_sec,
                disk_mb_per_sec,
                rss_broker,
                rss_sender,
                rss_recipient,
            } => json!({
                "scenario": 4, "name": name, "bytes": bytes, "mb_per_sec": mb_per_sec,
                "disk_seq_write_mb_per_sec": disk_mb_per_sec,
                "peak_rss_broker_mib": rss_broker, "peak_rss_sender_mib": rss_sender,
                "peak_rss_recipient_mib": rss_recipient,
            }),
            Row::Idle {
                connections,
                kib_per_connection,
            } => json!({
                "scenario": 5, "name": name, "connections": connections,
                "broker_rss_per_connection_kib": kib_per_connection,
            }),
            Row::Pending {
                pending,
                ready_seconds,
                m,
                empty_rate,
            } => json!({
                "scenario": 6, "name": name, "pending": pending,
                "ready_seconds": ready_seconds, "docs_per_sec": m.docs_per_sec,
                "empty_docs_per_sec": empty_rate, "ratio": ratio(m.docs_per_sec, *empty_rate),
            }),
        }
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn conditions() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!(" {}", s.trim()))
        .unwrap_or_default();
    let distro = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| format!(" ({})", v.trim_matches('"')))
        })
        .unwrap_or_default();
    json!({
        "cores": cores,
        "os": format!("{}{release}{distro}", std::env::consts::OS),
        "fsync": FSYNC,
        "signature": SIGNATURE,
        "tls": TLS,
    })
}

fn print_table(conditions: &Value, rows: &[Row]) {
    let field = |k: &str| match &conditions[k] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    outln!("Machine: {} cores, {}", field("cores"), field("os"));
    outln!(
        "Durability: {}; signatures: {}; transport: {}",
        field("fsync"),
        field("signature"),
        field("tls")
    );
    let disk = &conditions["disk"];
    outln!(
        "Disk in this run: 1 KiB append + fdatasync {:.0} ops/s (p50 {:.3} ms); sequential write 256 MiB + fdatasync {:.1} MiB/s",
        disk["fsync_append_ops_per_sec"].as_f64().unwrap_or(0.0),
        disk["fsync_append_p50_ms"].as_f64().unwrap_or(0.0),
        disk["seq_write_mib_per_sec"].as_f64().unwrap_or(0.0)
    );
    outln!(
        "{:<2} {:<40} {:>9} {:>9} {:>8} {:>10} {:>9} {:>9} {:>9}  other",
        "#",
        "scenario",
        "doc size",
        "in flight",
        "count",
        "docs/s",
        "MiB/s",
        "p50 ms",
        "p99 ms"
    );
    for row in rows {
        let name = row.name();
        match row {
            Row::Stream {
                scenario,
                size,
                in_flight,
                m,
                ..
            } => outln!(
                "{scenario:<2} {name:<40} {:>9} {in_flight:>9} {:>8} {:>10.1} {:>9.2} {:>9.1} {:>9.1}  CPU µs per document: {}",
                size_text(*size),
                m.documents,
                m.docs_per_sec,
                m.mb_per_sec,
                m.p50_ms,
                m.p99_ms,
                m.cpu.text()
            ),
            Row::Large {
                bytes,
                mb_per_sec,
                disk_mb_per_sec,
                rss_broker,
                rss_sender,
                rss_recipient,
            } => outln!(
                "{:<2} {name:<40} {:>9} {:>9} {:>8} {:>10} {mb_per_sec:>9.2} {:>9} {:>9}  disk sequential write {disk_mb_per_sec:.1} MiB/s \
                 (ratio {:.2}); peak RSS broker {rss_broker:.1} MiB, sender {rss_sender:.1} MiB, recipient {rss_recipient:.1} MiB",
                4,
                size_text(*bytes),
                1,
                1,
                "-",
                "-",
                "-",
                ratio(*mb_per_sec, *disk_mb_per_sec)
            ),
            Row::Idle {
                connections,
                kib_per_connection,
            } => outln!(
                "{:<2} {name:<40} {:>9} {:>9} {connections:>8} {:>10} {:>9} {:>9} {:>9}  broker RSS {kib_per_connection:.1} KiB per connection",
                5,
                "-",
                "-",
                "-",
                "-",
                "-",
                "-"
            ),
            Row::Pending {
                pending,
                ready_seconds,
                m,
                empty_rate,
            } => outln!(
                "{:<2} {name:<40} {:>9} {:>9} {:>8} {:>10.1} {:>9.2} {:>9.1} {:>9.1}  ready {ready_seconds:.2} s after restart over {pending}; \
                 {:.2} x the empty broker's {empty_rate:.1} docs/s",
                6,
                size_text(1024),
                256,
                m.documents,
                m.docs_per_sec,
                m.mb_per_sec,
                m.p50_ms,
                m.p99_ms,
                ratio(m.docs_per_sec, *empty_rate)
            ),
        }
    }
    outln!("MiB/s = 2^20 bytes of attachment per second.");
}

fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

// ---------------------------------------------------------------------------------
// Child processes

/// A `lienthong` child process; killed (SIGKILL) if dropped while still running.
struct Proc {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn spawn(ctx: &Ctx, name: &str, args: &[String], log: PathBuf) -> Result<Self, CliError> {
        let file = std::fs::File::create(&log)
            .map_err(|e| failed("creating a log file")(format!("{}: {e}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(|e| failed("creating a log file")(e.to_string()))?;
        let child = Command::new(&ctx.bin)
            .args(args)
            // LIENTHONG_BENCH_CHILD_LOG (e.g. `info`) to study a run's groups and timings.
            .env(
                "RUST_LOG",
                std::env::var("LIENTHONG_BENCH_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| failed("starting a child process")(format!("{name}: {e}")))?;
        Ok(Self {
            name: name.to_owned(),
            log,
            child: Some(child),
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// An error when the child has exited, naming its log.
    fn check_alive(&mut self) -> Result<(), CliError> {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            return Err(CliError::Failed(format!(
                "{} exited ({status}); see {}",
                self.name,
                self.log.display()
            )));
        }
        Ok(())
    }

    /// SIGTERM, then waits up to 30 s for the exit before SIGKILL.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = rustix::process::Pid::from_child(&child);
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        progress(&format!(
            "{} did not stop within 30 s; killing it",
            self.name
        ));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// A `Vm*` line of /proc/PID/status in MiB.
    fn memory_mib(&self, key: &str) -> Result<f64, CliError> {
        let pid = self
            .pid()
            .ok_or_else(|| CliError::Failed(format!("{} is not running", self.name)))?;
        proc_status_kib(pid, key).map(|kib| kib as f64 / 1024.0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn proc_status_kib(pid: u32, key: &str) -> Result<u64, CliError> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| failed(&path)(e.to_string()))?;
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| CliError::Failed(format!("{path} has no {key} line")))
}

fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| failed("picking a loopback port")(e.to_string()))
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// A broker and a sender and a recipient agent.
struct Cluster {
    broker: Proc,
    sender: Proc,
    recipient: Proc,
    send_api: AgentClient,
    recv_api: AgentClient,
    /// From the broker's spawn until its /readyz answered 200.
    broker_ready: Duration,
    /// Inbox count at the recipient after the warm-up document.
    baseline: u64,
}

impl Cluster {
    async fn stop(&mut self) {
        self.sender.stop().await;
        self.recipient.stop().await;
        self.broker.stop().await;
    }
}

async fn start_broker(
    ctx: &Ctx,
    dir: &Path,
    data: &Path,
) -> Result<(Proc, String, Duration), CliError> {
    let port = free_port()?;
    let admin = free_port()?;
    let mut args: Vec<String> = vec![
        "broker".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--admin-listen".into(),
        format!("127.0.0.1:{admin}"),
        "--data".into(),
        path_arg(data),
        "--ca".into(),
        path_arg(&ctx.pki.ca_cert),
        "--cert".into(),
        path_arg(&ctx.pki.broker_cert),
        "--key".into(),
        path_arg(&ctx.pki.broker_key),
        "--min-free-bytes".into(),
        (256u64 << 20).to_string(),
    ];
    for code in [SENDER, RECIPIENT, ABSENT] {
        args.push("--register".into());
        args.push(code.into());
    }
    let started = Instant::now();
    let mut broker = Proc::spawn(ctx, "broker", &args, dir.join("broker.log"))?;
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        broker.check_alive()?;
        if let Ok(response) = http.get(&ready).send().await
            && response.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "the broker was not ready within 600 s; see {}",
                broker.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((
        broker,
        format!("https://localhost:{port}"),
        started.elapsed(),
    ))
}

async fn start_agent(
    ctx: &Ctx,
    dir: &Path,
    code: &str,
    broker: &str,
    export: bool,
) -> Result<(Proc, AgentClient), CliError> {
    let (cert, key) = ctx
        .pki
        .agency(code)
        .ok_or_else(|| CliError::Failed(format!("no certificate for {code}")))?;
    let port = free_port()?;
    let home = dir.join(format!("agent-{code}"));
    let mut args: Vec<String> = vec![
        "agent".into(),
        "--broker".into(),
        broker.into(),
        "--agency".into(),
        code.into(),
        "--ca".into(),
        path_arg(&ctx.pki.ca_cert),
        "--cert".into(),
        path_arg(cert),
        "--key".into(),
        path_arg(key),
        "--data".into(),
        path_arg(&home.join("data")),
        "--api".into(),
        format!("127.0.0.1:{port}"),
        // The benchmark measures the pipeline, not the outbox's admission limit.
        "--max-outbox-documents".into(),
        "100000000".into(),
    ];
    if export {
        args.push("--inbox-dir".into());
        args.push(path_arg(&inbox_folder(dir, code)));
    }
    // The agent reads the token this creates (<data>/api-token), so the client has
    // it before the agent listens.
    let token_path = home
        .join("data")
        .join(lienthong_agent::api_guard::TOKEN_FILE_NAME);
    let token = lienthong_agent::api_guard::ApiToken::load_or_create(&token_path)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let mut agent = Proc::spawn(ctx, code, &args, dir.join(format!("agent-{code}.log")))?;
    let client = AgentClient::new(&format!("http://127.0.0.1:{port}"), token.expose())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        agent.check_alive()?;
        if client.inbox_count(None, 0).await.is_ok() {
            return Ok((agent, client));
        }
        if Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "agent {code} did not answer within 60 s; see {}",
                agent.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the three processes, then sends one warm-up document and waits until the
/// recipient holds it: both sessions are up before anything is measured.
/// The recipient's inbox folder when it exports (`export`).
fn inbox_folder(dir: &Path, code: &str) -> PathBuf {
    dir.join(format!("agent-{code}")).join("inbox")
}

async fn start_cluster(
    ctx: &Ctx,
    dir: &Path,
    data: Option<&Path>,
    export: bool,
) -> Result<Cluster, CliError> {
    let data = data.map_or_else(|| dir.join("broker-data"), Path::to_owned);
    let (broker, url, broker_ready) = start_broker(ctx, dir, &data).await?;
    let (sender, send_api) = start_agent(ctx, dir, SENDER, &url, false).await?;
    let (recipient, recv_api) = start_agent(ctx, dir, RECIPIENT, &url, export).await?;
    let mut cluster = Cluster {
        broker,
        sender,
        recipient,
        send_api,
        recv_api,
        broker_ready,
        baseline: 0,
    };
    let before = cluster.recv_api.inbox_count(None, 0).await?;
    cluster.send_api.send(&small_request(0, b"warm-up")).await?;
    cluster.baseline = wait_count(&mut cluster, before + 1).await?;
    Ok(cluster)
}

/// Long-polls the recipient's inbox count until it reaches `target`; fails when it
/// stops growing for [`STALL`] or a process died.
async fn wait_count(cluster: &mut Cluster, target: u64) -> Result<u64, CliError> {
    let mut count = cluster.recv_api.inbox_count(None, 0).await?;
    let mut last_growth = Instant::now();
    let mut last_print = Instant::now();
    while count < target {
        let now = cluster.recv_api.inbox_count(Some(count), 2_000).await?;
        if now > count {
            count = now;
            last_growth = Instant::now();
        } else {
            for p in [
                &mut cluster.broker,
                &mut cluster.sender,
                &mut cluster.recipient,
            ] {
                p.check_alive()?;
            }
            if last_growth.elapsed() > STALL {
                return Err(CliError::Failed(format!(
                    "the recipient's inbox stayed at {count} of {target} for {} s",
                    STALL.as_secs()
                )));
            }
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            progress(&format!("  recipient holds {count} of {target}"));
            last_print = Instant::now();
        }
    }
    Ok(count)
}

fn small_request(n: u64, bytes: &[u8]) -> SendRequest {
    SendRequest {
        to: vec![RECIPIENT.into()],
        subject: format!("Văn bản đo hiệu năng số {n}"),
        notation: Some("BENCH".into()),
        attachments: vec![AttachmentUpload {
            name: "tai-lieu.bin".into(),
            media_type: Some("application/octet-stream".into()),
            content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            upload_id: None,
        }],
        ..SendRequest::default()
    }
}

/// A fresh folder for one scenario; removed at the end unless `--keep`.
struct ScenarioDir {
    path: PathBuf,
    keep: bool,
}

impl ScenarioDir {
    fn new(ctx: &Ctx, scenario: impl std::fmt::Display) -> Result<Self, CliError> {
        let path = ctx.root.join(format!("scenario-{scenario}"));
        std::fs::create_dir_all(&path).map_err(|e| {
            failed("creating a scenario folder")(format!("{}: {e}", path.display()))
        })?;
        Ok(Self {
            path,
            keep: ctx.keep,
        })
    }
}

impl Drop for ScenarioDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------
// Scenarios 1, 2, 3 (and 6's measurement)

struct Measured {
    documents: u64,
    docs_per_sec: f64,
    mb_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu: CpuPerDoc,
}

async fn streamed(
    ctx: &Ctx,
    scenario: u8,
    size: usize,
    in_flight: usize,
    count: u64,
    export: bool,
) -> Result<Row, CliError> {
    progress(&format!(
        "scenario {scenario}: {count} documents of {}, {in_flight} in flight{}",
        size_text(size as u64),
        if export { ", inbox folder export" } else { "" }
    ));
    let dir = ScenarioDir::new(
        ctx,
        format!("{scenario}{}", if export { "-export" } else { "" }),
    )?;
    let mut cluster = start_cluster(ctx, &dir.path, None, export).await?;
    let exported = export.then(|| inbox_folder(&dir.path, RECIPIENT));
    let outcome = measure(&mut cluster, size, in_flight, count, exported.as_deref()).await;
    cluster.stop().await;
    let m = outcome?;
    progress(&format!(
        "scenario {scenario}: {:.1} documents/s, p50 {:.1} ms, p99 {:.1} ms; CPU µs per document: {}",
        m.docs_per_sec,
        m.p50_ms,
        m.p99_ms,
        m.cpu.text()
    ));
    Ok(Row::Stream {
        scenario,
        size: size as u64,
        in_flight,
        export,
        m,
    })
}

/// CPU time (user + system) of each process over a measurement, per document.
#[derive(Debug, Clone, Copy, Default)]
struct CpuPerDoc {
    broker: f64,
    sender: f64,
    recipient: f64,
    driver: f64,
}

impl CpuPerDoc {
    fn total(&self) -> f64 {
        self.broker + self.sender + self.recipient
    }

    fn text(&self) -> String {
        format!(
            "broker {:.0}, sender {:.0}, recipient {:.0} (sum {:.0}); driver {:.0}",
            self.broker,
            self.sender,
            self.recipient,
            self.total(),
            self.driver
        )
    }

    fn json(&self) -> Value {
        json!({
            "broker": self.broker, "sender": self.sender, "recipient": self.recipient,
            "sum": self.total(), "driver": self.driver,
        })
    }
}

/// utime + stime of a process in microseconds (/proc/PID/stat counts in USER_HZ
/// ticks, which Linux fixes at 100 per second for user space).
fn cpu_micros(pid: &str) -> Result<u64, CliError> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| failed(&path)(e.to_string()))?;
    // Fields after the command name, which is in parentheses and may contain spaces:
    // state is field 3, utime field 14, stime field 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| CliError::Failed(format!("{path}: unexpected format")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64, CliError> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| CliError::Failed(format!("{path}: no field {}", i + 3)))
    };
    Ok((tick(11)? + tick(12)?).saturating_mul(10_000))
}

/// CPU microseconds of the three processes and this driver, now.
fn cpu_snapshot(cluster: &Cluster) -> Result<[u64; 4], CliError> {
    let pid = |p: &Proc| {
        p.pid()
            .map(|pid| pid.to_string())
            .ok_or_else(|| CliError::Failed(format!("{} is not running", p.name)))
    };
    Ok([
        cpu_micros(&pid(&cluster.broker)?)?,
        cpu_micros(&pid(&cluster.sender)?)?,
        cpu_micros(&pid(&cluster.recipient)?)?,
        cpu_micros("self")?,
    ])
}

/// The disk this run writes to: 1 KiB appends each followed by fdatasync (for 2 s), and
/// 256 MiB written sequentially in 1 MiB blocks followed by one fdatasync.
async fn disk_probe(root: &Path) -> Result<Value, CliError> {
    progress("probing the disk (1 KiB append + fdatasync for 2 s; 256 MiB sequential write)");
    let root = root.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Value, CliError> {
        let path = root.join("fsync-probe.bin");
        let fail = |e: std::io::Error| failed("disk probe")(format!("{}: {e}", path.display()));
        let mut file = std::fs::File::create(&path).map_err(fail)?;
        let block = [0x5au8; 1024];
        let mut latencies = Vec::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            let op = Instant::now();
            file.write_all(&block).map_err(fail)?;
            file.sync_data().map_err(fail)?;
            latencies.push(op.elapsed().as_secs_f64() * 1000.0);
        }
        let ops = latencies.len() as f64 / started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        drop(file);
        let _ = std::fs::remove_file(&path);
        let seq = root.join("seq-probe.bin");
        let size = 256u64 << 20;
        let started = Instant::now();
        write_random(&seq, size, true)?;
        let mib_per_sec = size as f64 / MIB / started.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&seq);
        progress(&format!(
            "  fdatasync {ops:.0} ops/s (p50 {:.3} ms), sequential write {mib_per_sec:.1} MiB/s",
            percentile(&latencies, 0.5)
        ));
        Ok(json!({
            "fsync_append_ops_per_sec": ops,
            "fsync_append_p50_ms": percentile(&latencies, 0.5),
            "fsync_append_p99_ms": percentile(&latencies, 0.99),
            "seq_write_mib_per_sec": mib_per_sec,
        }))
    })
    .await
    .map_err(|e| failed("disk probe")(e.to_string()))?
}

/// Entries (exported document folders) in the inbox folder, hidden ones left out.
fn exported_count(inbox: &Path) -> u64 {
    std::fs::read_dir(inbox).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .count() as u64
    })
}

/// Sends `count` documents of `size` random bytes keeping at most `in_flight` of them
/// sent but not yet stored by the recipient (the peers' definition of in flight: from
/// publish to consumer receipt), then reads the recipient's inbox: latency is
/// `received_at` minus the start of the document's POST.
async fn measure(
    cluster: &mut Cluster,
    size: usize,
    in_flight: usize,
    count: u64,
    exported: Option<&Path>,
) -> Result<Measured, CliError> {
    let cpu_before = cpu_snapshot(cluster)?;
    let next = Arc::new(AtomicU64::new(0));
    let baseline = cluster.baseline;
    // One long-poll follows the recipient's count for every sender.
    let (received_tx, received_rx) = tokio::sync::watch::channel(baseline);
    let watching = cluster.recv_api.clone();
    let poller = tokio::spawn(async move {
        let mut seen = baseline;
        while seen < baseline + count {
            match watching.inbox_count(Some(seen), 2_000).await {
                Ok(now) if now > seen => {
                    seen = now;
                    let _ = received_tx.send(now);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    });
    let mut workers = Vec::with_capacity(in_flight);
    for _ in 0..in_flight {
        let next = next.clone();
        let client = cluster.send_api.clone();
        let mut received = received_rx.clone();
        workers.push(tokio::spawn(async move {
            let mut started: Vec<(String, i64)> = Vec::new();
            let mut bytes = vec![0u8; size];
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return Ok::<_, CliError>(started);
                }
                // Document n may go once all but `in_flight - 1` earlier ones arrived.
                let needed = (baseline + n + 1).saturating_sub(in_flight as u64);
                let progressed = matches!(
                    tokio::time::timeout(STALL, received.wait_for(|c| *c >= needed)).await,
                    Ok(Ok(_))
                );
                if !progressed {
                    return Err(CliError::Failed(format!(
                        "the recipient stopped storing documents ({} s without progress)",
                        STALL.as_secs()
                    )));
                }
                rand::rng().fill_bytes(&mut bytes);
                let request = small_request(n + 1, &bytes);
                let at = now_ms();
                let sent = client.send(&request).await?;
                started.push((sent.message_id, at));
            }
        }));
    }
    let mut starts: HashMap<String, i64> = HashMap::with_capacity(count as usize);
    let mut first_error = None;
    for worker in workers {
        match worker.await {
            Ok(Ok(list)) => starts.extend(list),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(CliError::Failed(format!("a sender task failed: {e}")));
            }
        }
    }
    if let Some(error) = first_error {
        poller.abort();
        return Err(error);
    }
    progress(&format!(
        "  all {count} accepted by the sender agent; waiting for the recipient"
    ));
    poller.abort();
    wait_count(cluster, cluster.baseline + count).await?;
    // With the folder export, a document counts once its folder exists: the export
    // follows the receipt, so the last folder, not the last store, ends the run.
    let mut exported_at = i64::MIN;
    if let Some(inbox) = exported {
        let target = cluster.baseline + count;
        let deadline = Instant::now() + STALL;
        loop {
            if exported_count(inbox) >= target {
                exported_at = now_ms();
                break;
            }
            if Instant::now() > deadline {
                return Err(CliError::Failed(format!(
                    "the recipient exported {} of {target} documents to {} within {} s",
                    exported_count(inbox),
                    inbox.display(),
                    STALL.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let cpu_after = cpu_snapshot(cluster)?;
    let per_doc =
        |i: usize| cpu_after[i].saturating_sub(cpu_before[i]) as f64 / count.max(1) as f64;
    let cpu = CpuPerDoc {
        broker: per_doc(0),
        sender: per_doc(1),
        recipient: per_doc(2),
        driver: per_doc(3),
    };
    let inbox = cluster.recv_api.inbox().await?;
    let mut latencies = Vec::with_capacity(count as usize);
    let mut first_start = i64::MAX;
    let mut last_received = i64::MIN;
    for item in inbox {
        let Some(start) = starts.get(&item.message_id) else {
            continue;
        };
        let received = parse_ms(&item.received_at)?;
        first_start = first_start.min(*start);
        last_received = last_received.max(received);
        latencies.push((received - start) as f64);
    }
    if latencies.len() as u64 != count {
        return Err(CliError::Failed(format!(
            "the recipient's inbox lists {} of the {count} documents sent",
            latencies.len()
        )));
    }
    latencies.sort_by(f64::total_cmp);
    let last_received = last_received.max(exported_at);
    let seconds = ((last_received - first_start).max(1)) as f64 / 1000.0;
    let docs_per_sec = count as f64 / seconds;
    Ok(Measured {
        documents: count,
        docs_per_sec,
        mb_per_sec: docs_per_sec * size as f64 / MIB,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        cpu,
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.clamp(1, sorted.len()) - 1)
        .copied()
        .unwrap_or(0.0)
}

fn parse_ms(text: &str) -> Result<i64, CliError> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| CliError::Failed(format!("received_at {text:?}: {e}")))?;
    Ok((at.unix_timestamp_nanos() / 1_000_000) as i64)
}

// ---------------------------------------------------------------------------------
// Scenario 4

/// Writes `size` random bytes to `path` in 1 MiB blocks; with `sync`, fdatasync at the end.
fn write_random(path: &Path, size: u64, sync: bool) -> Result<(), CliError> {
    let fail =
        |e: std::io::Error| failed("writing a test file")(format!("{}: {e}", path.display()));
    let mut file = std::fs::File::create(path).map_err(fail)?;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        let part = block.get_mut(..n).unwrap_or_default();
        rand::rng().fill_bytes(part);
        file.write_all(part).map_err(fail)?;
        left -= n as u64;
    }
    if sync {
        file.sync_data().map_err(fail)?;
    }
    Ok(())
}

async fn large(ctx: &Ctx, size: u64) -> Result<Row, CliError> {
    progress(&format!(
        "scenario 4: one document of {size} bytes, streamed"
    ));
    let dir = ScenarioDir::new(ctx, 4)?;
    let probe = dir.path.join("disk-probe.bin");
    let probe_size = 256u64 << 20;
    let disk_mb_per_sec = {
        let probe = probe.clone();
        let started = Instant::now();
        tokio::task::spawn_blocking(move || write_random(&probe, probe_size, true))
            .await
            .map_err(|e| failed("disk probe")(e.to_string()))??;
        probe_size as f64 / MIB / started.elapsed().as_secs_f64()
    };
    let _ = std::fs::remove_file(&probe);
    progress(&format!(
        "  disk sequential write (256 MiB, 1 MiB blocks, fdatasync): {disk_mb_per_sec:.1} MiB/s"
    ));
    let file = dir.path.join("large.bin");
    {
        let file = file.clone();
        tokio::task::spawn_blocking(move || write_random(&file, size, false))
            .await
            .map_err(|e| failed("writing the large document")(e.to_string()))??;
    }
    let mut cluster = start_cluster(ctx, &dir.path, None, false).await?;
    let outcome = send_large(&mut cluster, &file, size).await;
    let rss = [
        cluster.broker.memory_mib("VmHWM"),
        cluster.sender.memory_mib("VmHWM"),
        cluster.recipient.memory_mib("VmHWM"),
    ];
    cluster.stop().await;
    let mb_per_sec = outcome?;
    let [rss_broker, rss_sender, rss_recipient] = rss;
    let (rss_broker, rss_sender, rss_recipient) = (rss_broker?, rss_sender?, rss_recipient?);
    progress(&format!(
        "scenario 4: {mb_per_sec:.1} MiB/s; peak RSS broker {rss_broker:.1} MiB, sender {rss_sender:.1} MiB, recipient {rss_recipient:.1} MiB"
    ));
    Ok(Row::Large {
        bytes: size,
        mb_per_sec,
        disk_mb_per_sec,
        rss_broker,
        rss_sender,
        rss_recipient,
    })
}

/// Uploads and sends the file; MiB/s from the upload's start until the recipient stored it.
async fn send_large(cluster: &mut Cluster, file: &Path, size: u64) -> Result<f64, CliError> {
    let started = Instant::now();
    let step = (size / 10).max(1);
    let next = AtomicU64::new(step);
    let upload = cluster
        .send_api
        .upload(file, move |sent| {
            if sent >= next.load(Ordering::Relaxed) {
                next.store(sent + step, Ordering::Relaxed);
                progress(&format!("  uploaded {} MiB", sent >> 20));
            }
        })
        .await?;
    let request = SendRequest {
        to: vec![RECIPIENT.into()],
        subject: "Văn bản lớn đo hiệu năng".into(),
        notation: Some("BENCH".into()),
        attachments: vec![AttachmentUpload {
            name: "tai-lieu-lon.bin".into(),
            media_type: Some("application/octet-stream".into()),
            content_base64: String::new(),
            upload_id: Some(upload.upload_id),
        }],
        ..SendRequest::default()
    };
    cluster.send_api.send(&request).await?;
    progress("  sent; waiting for the recipient");
    let target = cluster.baseline + 1;
    wait_count(cluster, target).await?;
    Ok(size as f64 / MIB / started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------
// Scenario 5

/// Raises this process's open-file limit to its hard limit; children inherit it.
fn raise_nofile() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => limit.maximum,
        Err(_) => limit.current,
    }
}

async fn idle(ctx: &Ctx, n: u64) -> Result<Row, CliError> {
    progress(&format!("scenario 5: {n} idle connected agencies"));
    let dir = ScenarioDir::new(ctx, 5)?;
    if let Some(limit) = raise_nofile()
        && limit < n + 256
    {
        progress(&format!(
            "  warning: the open-file limit is {limit}, below {n} connections"
        ));
    }
    let ca = DevCa::from_pem(
        &std::fs::read_to_string(&ctx.pki.ca_cert)
            .map_err(|e| failed("reading the CA")(e.to_string()))?,
        &std::fs::read_to_string(&ctx.pki.ca_key)
            .map_err(|e| failed("reading the CA")(e.to_string()))?,
    )
    .map_err(|e| failed("loading the dev CA")(e.to_string()))?;
    let ca_pem =
        std::fs::read(&ctx.pki.ca_cert).map_err(|e| failed("reading the CA")(e.to_string()))?;
    let mut identities = Vec::with_capacity(n as usize);
    for i in 0..n {
        let code = format!(
            "{:03}.{:02}.{:02}.H31",
            100 + i / 10_000,
            (i / 100) % 100,
            i % 100
        );
        let issued = ca
            .issue(&LeafSpec::agency(&code))
            .map_err(|e| failed("issuing an agency certificate")(format!("{code}: {e}")))?;
        identities.push(TlsFiles {
            ca_pem: ca_pem.clone(),
            cert_pem: issued.cert_pem.into_bytes(),
            key_pem: issued.key_pem.into_bytes(),
        });
        if (i + 1) % 2_000 == 0 {
            progress(&format!("  issued {} certificates", i + 1));
        }
    }
    let (mut broker, url, _) = start_broker(ctx, &dir.path, &dir.path.join("broker-data")).await?;
    let outcome = connect_idle(&mut broker, &url, identities, n).await;
    broker.stop().await;
    let kib_per_connection = outcome?;
    progress(&format!(
        "scenario 5: {kib_per_connection:.1} KiB of broker RSS per connection"
    ));
    Ok(Row::Idle {
        connections: n,
        kib_per_connection,
    })
}

type Held = (
    tonic::transport::Channel,
    tonic::Streaming<lienthong_proto::pb::BrokerMessage>,
);

/// Opens one mutual-TLS session that has said Hello and stays open.
async fn open_session(url: String, tls: TlsFiles) -> Result<Held, String> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .tls_config(tls.client_config("localhost"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let hello = AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            window: 8,
            partial: vec![],
            max_batch: 0,
        })),
    };
    // Hello, then nothing: the request stream stays open for the session's life.
    let outbound = futures_util::stream::iter([hello]).chain(futures_util::stream::pending());
    let mut client = lienthong_proto::pb::exchange_client::ExchangeClient::new(channel.clone());
    let response = client
        .session(outbound)
        .await
        .map_err(|e| format!("{}: {}", e.code(), e.message()))?;
    Ok((channel, response.into_inner()))
}

async fn connect_idle(
    broker: &mut Proc,
    url: &str,
    identities: Vec<TlsFiles>,
    n: u64,
) -> Result<f64, CliError> {
    let pid = broker
        .pid()
        .ok_or_else(|| CliError::Failed("the broker is not running".into()))?;
    let before = proc_status_kib(pid, "VmRSS")?;
    let started = Instant::now();
    let results: Vec<Result<Held, String>> = futures_util::stream::iter(identities)
        .map(|tls| open_session(url.to_owned(), tls))
        .buffer_unordered(64)
        .collect()
        .await;
    let mut held = Vec::with_capacity(results.len());
    let mut errors = 0usize;
    let mut first_error = None;
    for result in results {
        match result {
            Ok(h) => held.push(h),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    broker.check_alive()?;
    if let Some(e) = first_error {
        return Err(CliError::Failed(format!(
            "{errors} of {n} sessions failed to open; first: {e}"
        )));
    }
    progress(&format!(
        "  {} sessions open in {:.1} s",
        held.len(),
        started.elapsed().as_secs_f64()
    ));
    let after = proc_status_kib(pid, "VmRSS")?;
    drop(held);
    Ok(after.saturating_sub(before) as f64 / n as f64)
}

// ---------------------------------------------------------------------------------
// Scenario 6

/// Fills a broker store offline with `n` signed 1 KiB documents from the sender to an
/// agency that never connects, on two threads.
async fn fill(ctx: &Ctx, data: &Path, n: u64) -> Result<(), CliError> {
    use lienthong_broker::records::DocumentRecord;
    use lienthong_broker::store::{Accepted, Store};
    use prost::Message as _;
    let store = Store::open(data).map_err(|e| failed("opening the broker store")(e.to_string()))?;
    let (cert, key) = ctx
        .pki
        .agency(SENDER)
        .ok_or_else(|| CliError::Failed(format!("no certificate for {SENDER}")))?;
    let signing = TlsFiles::load(&ctx.pki.ca_cert, cert, key)?
        .signing_key()
        .map_err(|e| CliError::config(cert, e))?;
    let done = AtomicU64::new(0);
    let fill_one = |store: &Store, n: u64| -> Result<(), CliError> {
        let mut bytes = vec![0u8; 1024];
        rand::rng().fill_bytes(&mut bytes);
        let header = pending_header(n, &bytes);
        let envelope = lienthong_proto::document::seal(&header, &signing)
            .map_err(|e| failed("sealing a document")(e.to_string()))?;
        let at = now_ms();
        let record = DocumentRecord {
            header_sha256: lienthong_proto::sha256(&envelope.payload).to_vec(),
            envelope: envelope.encode_to_vec(),
            submission_receipt: Vec::new(),
            accepted_at_ms: at,
            business_id: header.business_id.clone(),
            sender: header.sender.clone(),
            recipients: header.recipients.clone(),
            attachment_bytes: bytes.len() as u64,
            attachment_count: 1,
            expires_at_ms: at + 30 * 24 * 3_600_000,
            streamed: false,
        };
        match store
            .accept(&record, &header.message_id, &[bytes::Bytes::from(bytes)])
            .map_err(|e| failed("storing a document")(e.to_string()))?
        {
            Accepted::New => Ok(()),
            _ => Err(CliError::Failed(format!(
                "the store did not take document {n} as new"
            ))),
        }
    };
    let result = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let (store, done, fill_one) = (&store, &done, &fill_one);
                scope.spawn(move || -> Result<(), CliError> {
                    let share = n / 2 + if t == 0 { n % 2 } else { 0 };
                    for i in 0..share {
                        fill_one(store, t * n + i + 1)?;
                        let total = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if total % 100_000 == 0 {
                            progress(&format!("  stored {total} of {n} pending documents"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(CliError::Failed("a fill thread panicked".into())))
            })
            .collect::<Result<Vec<()>, CliError>>()
    });
    result?;
    store
        .release()
        .await
        .map_err(|e| failed("closing the broker store")(e.to_string()))
}

/// A header from the sender to the absent agency; `n` makes the business id unique.
fn pending_header(n: u64, bytes: &[u8]) -> lienthong_proto::pb::DocumentHeader {
    use lienthong_proto::document::{
        business_id, describe_attachment, new_message_id, vietnam_date_today,
    };
    let message_id = new_message_id();
    let issue_date = vietnam_date_today();
    let number = n.to_string();
    lienthong_proto::pb::DocumentHeader {
        business_id: business_id(SENDER, &issue_date, &number, PENDING_NOTATION),
        message_id,
        sender: SENDER.to_owned(),
        recipients: vec![ABSENT.to_owned()],
        number,
        notation: PENDING_NOTATION.into(),
        subject: "Văn bản chờ chuyển".into(),
        issue_date,
        created_at_ms: now_ms(),
        attachments: vec![describe_attachment(
            "tai-lieu.bin",
            "application/octet-stream",
            bytes,
        )],
        ..Default::default()
    }
}

async fn pending(ctx: &Ctx, n: u64, count: u64, empty_rate: f64) -> Result<Row, CliError> {
    progress(&format!(
        "scenario 6: restart over {n} pending documents, then {count} documents"
    ));
    let dir = ScenarioDir::new(ctx, 6)?;
    let data = dir.path.join("broker-data");
    let started = Instant::now();
    fill(ctx, &data, n).await?;
    progress(&format!(
        "  filled in {:.1} s; starting the broker",
        started.elapsed().as_secs_f64()
    ));
    let mut cluster = start_cluster(ctx, &dir.path, Some(&data), false).await?;
    let ready_seconds = cluster.broker_ready.as_secs_f64();
    progress(&format!("  broker ready {ready_seconds:.2} s after spawn"));
    let outcome = measure(&mut cluster, 1024, 256, count, None).await;
    cluster.stop().await;
    let m = outcome?;
    progress(&format!(
        "scenario 6: {:.1} documents/s ({:.2} x empty)",
        m.docs_per_sec,
        ratio(m.docs_per_sec, empty_rate)
    ));
    Ok(Row::Pending {
        pending: n,
        ready_seconds,
        m,
        empty_rate,
    })
}
