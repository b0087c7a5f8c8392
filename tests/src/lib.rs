//! The lienthong test harness: a fresh dev PKI per test, the real broker and agents on
//! `127.0.0.1:0` (in-process, or the real binary as a child process that tests kill
//! with SIGKILL and restart), and waiting on conditions with deadlines instead of sleeps.
//!
//! Modules: `fake_broker`, a configurable Exchange server that drives an agent with
//! what the real broker never sends or forwards to a real broker and counts the calls;
//! `proxy`, a WAN fault proxy (latency, bandwidth, blackhole, cut).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod fake_broker;
pub mod proxy;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use lienthong_agent::AgentConfig;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, StatusView};
use lienthong_broker::BrokerConfig;
use lienthong_certs_dev::{DevCa, DevPkiPaths, LeafSpec, write_dev_pki};
use lienthong_cli::http::AgentClient;
use lienthong_proto::AgencyCode;
use lienthong_proto::tls::TlsFiles;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const A: &str = "000.00.00.H31";
pub const B: &str = "000.00.12.H31";
pub const C: &str = "000.00.15.H31";

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    lienthong_proto::tls::install_crypto_provider();
}

/// A temporary world: dev PKI and data folders, removed at drop.
pub struct World {
    pub dir: TempDir,
    pub pki: DevPkiPaths,
    pub ca: DevCa,
}

impl World {
    pub fn new() -> Self {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let codes: Vec<String> = [A, B, C].iter().map(|c| (*c).to_owned()).collect();
        let pki = write_dev_pki(&dir.path().join("pki"), &codes).unwrap();
        let ca = DevCa::from_pem(
            &std::fs::read_to_string(&pki.ca_cert).unwrap(),
            &std::fs::read_to_string(&pki.ca_key).unwrap(),
        )
        .unwrap();
        Self { dir, pki, ca }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn broker_tls(&self) -> TlsFiles {
        TlsFiles::load(
            &self.pki.ca_cert,
            &self.pki.broker_cert,
            &self.pki.broker_key,
        )
        .unwrap()
    }

    pub fn agency_tls(&self, code: &str) -> TlsFiles {
        let (cert, key) = self.pki.agency(code).unwrap();
        TlsFiles::load(&self.pki.ca_cert, cert, key).unwrap()
    }

    pub fn operator_tls(&self) -> TlsFiles {
        TlsFiles::load(
            &self.pki.ca_cert,
            &self.pki.operator_cert,
            &self.pki.operator_key,
        )
        .unwrap()
    }

    /// TLS files for a certificate minted by `ca` (the world's CA unless given), with
    /// the world's CA as trust anchor.
    pub fn custom_tls(&self, ca: Option<&DevCa>, spec: &LeafSpec) -> TlsFiles {
        let issued = ca.unwrap_or(&self.ca).issue(spec).unwrap();
        TlsFiles {
            ca_pem: std::fs::read(&self.pki.ca_cert).unwrap(),
            cert_pem: issued.cert_pem.into_bytes(),
            key_pem: issued.key_pem.into_bytes(),
        }
    }

    pub fn broker_config(&self, data: &str) -> BrokerConfig {
        let mut config = BrokerConfig::new(self.broker_tls(), self.path(data));
        // Test machines may have little disk; the disk-full test sets its own reserve.
        config.min_free_bytes = 16 * 1024 * 1024;
        for code in [A, B, C] {
            config
                .agencies
                .push((AgencyCode::parse(code).unwrap(), String::new()));
        }
        config
    }

    pub fn agent_config(&self, code: &str, broker_url: &str) -> AgentConfig {
        let mut config = AgentConfig::new(
            AgencyCode::parse(code).unwrap(),
            broker_url.to_owned(),
            self.agency_tls(code),
            self.path(&format!("agent-{code}/data")),
            self.inbox_dir(code),
        );
        config.reconnect_min = Duration::from_millis(50);
        config.reconnect_max = Duration::from_millis(500);
        config
    }

    pub fn inbox_dir(&self, code: &str) -> PathBuf {
        self.path(&format!("agent-{code}/inbox"))
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// A broker running in this process.
pub struct Broker {
    pub addr: SocketAddr,
    pub url: String,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), lienthong_broker::BrokerError>>,
}

impl Broker {
    pub async fn start(config: BrokerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(config, listener)
    }

    pub fn start_on(config: BrokerConfig, listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(lienthong_broker::run(config, listener, shutdown.clone()));
        Self {
            addr,
            url: format!("https://localhost:{}", addr.port()),
            shutdown,
            task,
        }
    }

    /// Starts a broker that also serves its admin HTTP listener (`/metrics`, `/healthz`,
    /// `/readyz`) on loopback; returns it with that listener's `http://` base URL.
    pub async fn start_with_admin(config: BrokerConfig) -> (Self, String) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_url = format!("http://{}", admin.local_addr().unwrap());
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(lienthong_broker::run_with_admin(
            config,
            listener,
            Some(admin),
            shutdown.clone(),
        ));
        let broker = Self {
            addr,
            url: format!("https://localhost:{}", addr.port()),
            shutdown,
            task,
        };
        (broker, admin_url)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("broker stops within 20 s")
            .unwrap()
            .unwrap();
    }
}

/// An agent running in this process.
pub struct Agent {
    pub code: String,
    pub api: String,
    /// The agent's API token (`Authorization: Bearer`), for raw HTTP calls.
    pub token: String,
    /// The file it is in, for `--api-token-file`.
    pub token_file: PathBuf,
    pub client: AgentClient,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), lienthong_agent::AgentError>>,
}

impl Agent {
    pub async fn start(config: AgentConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(config, listener).await
    }

    /// Starts the agent with its API on `listener`; the client talks to it over
    /// loopback (127.0.0.1 and the listener's port, also when bound to 0.0.0.0).
    pub async fn start_on(config: AgentConfig, listener: TcpListener) -> Self {
        let code = config.agency.to_string();
        // The token file the agent will read, made (or read) before it starts.
        let token_file = config.api_token_path();
        let token = api_token(&token_file);
        let api = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(lienthong_agent::run(config, listener, shutdown.clone()));
        Self {
            code,
            client: AgentClient::new(&api, &token).unwrap(),
            token,
            token_file,
            api,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("agent stops within 20 s")
            .unwrap()
            .unwrap();
    }

    /// Sends a document with the given attachments (name, bytes); returns the message id.
    pub async fn send(&self, to: &[&str], subject: &str, attachments: &[(&str, &[u8])]) -> String {
        let request = SendRequest {
            to: to.iter().map(|c| (*c).to_owned()).collect(),
            subject: subject.to_owned(),
            attachments: attachments
                .iter()
                .map(|(name, bytes)| AttachmentUpload {
                    name: (*name).to_owned(),
                    media_type: None,
                    content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
                    upload_id: None,
                })
                .collect(),
            ..SendRequest::default()
        };
        self.client.send(&request).await.unwrap().message_id
    }

    /// Waits until the status satisfies `done`; panics with the last status on timeout.
    pub async fn wait_status(
        &self,
        message_id: &str,
        what: &str,
        done: impl Fn(&StatusView) -> bool,
    ) -> StatusView {
        let mut last = None;
        let found = wait_until(
            what,
            Duration::from_secs(30),
            || {
                let client = self.client.clone();
                let id = message_id.to_owned();
                async move { client.status(&id).await.ok() }
            },
            done,
            &mut last,
        )
        .await;
        found.unwrap_or_else(|| panic!("timed out waiting for {what}; last status: {last:?}"))
    }
}

/// The API token in `path`, creating the file as the agent would when missing.
pub fn api_token(path: &Path) -> String {
    lienthong_agent::api_guard::ApiToken::load_or_create(path)
        .unwrap()
        .expose()
        .to_owned()
}

/// `Authorization: Bearer <token>` for raw reqwest calls to an agent's API.
pub fn bearer(token: &str) -> (reqwest::header::HeaderName, String) {
    (reqwest::header::AUTHORIZATION, format!("Bearer {token}"))
}

/// Polls `probe` every 25 ms until `accept` holds or `limit` passes. Returns the
/// accepted value, or None (with the last value seen in `last`).
pub async fn wait_until<T, F, Fut>(
    what: &str,
    limit: Duration,
    probe: F,
    accept: impl Fn(&T) -> bool,
    last: &mut Option<T>,
) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            if accept(&value) {
                return Some(value);
            }
            *last = Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("deadline passed while waiting for: {what}");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `path` exists (e.g. an exported inbox folder).
pub async fn wait_for_path(path: &Path) {
    let mut last = None;
    let found = wait_until(
        &format!("{}", path.display()),
        Duration::from_secs(30),
        || async { Some(path.exists()) },
        |exists| *exists,
        &mut last,
    )
    .await;
    assert!(
        found.is_some(),
        "{} did not appear within 30 s",
        path.display()
    );
}

/// The message-id folders in an inbox directory (hidden and `recalled` excluded).
pub fn inbox_entries(inbox: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(inbox)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| !n.starts_with('.') && n != "recalled")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A free loopback port, picked now (kept across restarts of the same process).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// The real `lienthong` binary as a child process, ready once `addr` accepts TCP.
pub struct Process {
    pub bin: PathBuf,
    pub args: Vec<String>,
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl Process {
    pub fn new(bin: &Path, args: Vec<String>, addr: SocketAddr) -> Self {
        Self {
            bin: bin.to_owned(),
            args,
            addr,
            child: None,
        }
    }

    /// Starts the child and waits until it accepts TCP connections.
    pub async fn spawn(&mut self) {
        self.spawn_with(Stdio::inherit(), None).await;
    }

    /// [`Process::spawn`] with the child's stderr given (e.g. a pipe whose reader is
    /// gone) and, when given, its `RUST_LOG`.
    pub async fn spawn_with(&mut self, stderr: Stdio, rust_log: Option<&str>) {
        let rust_log = rust_log
            .map(str::to_owned)
            .unwrap_or_else(|| std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let addr = self.addr;
        let mut last = None;
        let up = wait_until(
            "process listening",
            Duration::from_secs(30),
            || async move { Some(tokio::net::TcpStream::connect(addr).await.is_ok()) },
            |ok| *ok,
            &mut last,
        )
        .await;
        assert!(up.is_some(), "{} did not listen on {addr}", self.args[0]);
    }

    /// The child's stderr, when it was spawned with `Stdio::piped()`.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// The child's process id while it runs (e.g. to read `/proc/<pid>/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (a name `kill` knows: `HUP`, `STOP`...) to the running child.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("running");
        let sent = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal} {pid} failed");
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM, then waits for the exit; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait().unwrap()
    }
}

impl Process {
    /// SIGTERM, then waits up to `limit` for the exit. None when the process did not
    /// exit in time (it is then killed with SIGKILL).
    pub async fn terminate_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real binary running `broker`, registering A, B and C.
pub struct BrokerProcess {
    pub url: String,
    pub process: Process,
}

impl BrokerProcess {
    pub async fn start(bin: &Path, world: &World, data: &str) -> Self {
        let mut broker = Self::prepare(bin, world, data);
        broker.process.spawn().await;
        broker
    }

    /// The broker's command line, not started yet: a test may add arguments to
    /// `process.args` before [`BrokerProcess::spawn`].
    pub fn prepare(bin: &Path, world: &World, data: &str) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut args: Vec<String> = vec![
            "broker".into(),
            "--listen".into(),
            addr.to_string(),
            "--data".into(),
            world.path(data).display().to_string(),
            "--ca".into(),
            world.pki.ca_cert.display().to_string(),
            "--cert".into(),
            world.pki.broker_cert.display().to_string(),
            "--key".into(),
            world.pki.broker_key.display().to_string(),
        ];
        args.push("--min-free-bytes".into());
        args.push((16u64 << 20).to_string());
        for code in [A, B, C] {
            args.push("--register".into());
            args.push(code.into());
        }
        Self {
            url: format!("https://localhost:{port}"),
            process: Process::new(bin, args, addr),
        }
    }

    pub async fn spawn(&mut self) {
        self.process.spawn().await;
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.terminate()
    }
}

/// The real binary running `agent` for `code`, with its API on a fixed loopback port.
pub struct AgentProcess {
    pub api: String,
    /// The agent's API token (it reads `<data>/api-token`, made before it starts).
    pub token: String,
    pub client: AgentClient,
    pub process: Process,
}

impl AgentProcess {
    pub async fn start(bin: &Path, world: &World, code: &str, broker_url: &str) -> Self {
        let mut agent = Self::prepare(bin, world, code, broker_url);
        agent.process.spawn().await;
        agent
    }

    /// The agent's command line, not started yet: a test may change its arguments or
    /// start it with [`Process::spawn_with`].
    pub fn prepare(bin: &Path, world: &World, code: &str, broker_url: &str) -> Self {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let (cert, key) = world.pki.agency(code).unwrap();
        let args: Vec<String> = vec![
            "agent".into(),
            "--broker".into(),
            broker_url.into(),
            "--agency".into(),
            code.into(),
            "--ca".into(),
            world.pki.ca_cert.display().to_string(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--data".into(),
            world
                .path(&format!("agent-{code}/data"))
                .display()
                .to_string(),
            "--api".into(),
            addr.to_string(),
            "--inbox-dir".into(),
            world.inbox_dir(code).display().to_string(),
        ];
        let token = api_token(
            &world
                .path(&format!("agent-{code}/data"))
                .join(lienthong_agent::api_guard::TOKEN_FILE_NAME),
        );
        let process = Process::new(bin, args, addr);
        let api = format!("http://{addr}");
        Self {
            client: AgentClient::new(&api, &token).unwrap(),
            token,
            api,
            process,
        }
    }
}

/// A raw gRPC client of the broker's Exchange service, for tests that craft envelopes.
pub async fn exchange_client(
    url: &str,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<
    lienthong_proto::pb::exchange_client::ExchangeClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(lienthong_proto::pb::exchange_client::ExchangeClient::new(
        channel,
    ))
}

/// TLS without a client certificate.
pub fn anonymous_tls(world: &World) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&world.pki.ca_cert).unwrap(),
        ))
        .domain_name("localhost")
}

/// A valid header from `sender` to `recipients` describing `attachments`.
pub fn header(
    sender: &str,
    recipients: &[&str],
    attachments: &[(&str, &[u8])],
) -> lienthong_proto::pb::DocumentHeader {
    use lienthong_proto::document::{
        business_id, describe_attachment, new_message_id, vietnam_date_today,
    };
    let message_id = new_message_id();
    let issue_date = vietnam_date_today();
    // A unique number per document keeps business ids distinct.
    let number = message_id[24..].to_owned()[..8].to_owned();
    lienthong_proto::pb::DocumentHeader {
        business_id: business_id(sender, &issue_date, &number, "TEST"),
        message_id,
        sender: sender.to_owned(),
        recipients: recipients.iter().map(|r| (*r).to_owned()).collect(),
        number,
        notation: "TEST".into(),
        subject: "Văn bản thử nghiệm".into(),
        issue_date,
        created_at_ms: lienthong_proto::now_ms(),
        attachments: attachments
            .iter()
            .map(|(name, bytes)| describe_attachment(name, "application/octet-stream", bytes))
            .collect(),
        ..Default::default()
    }
}

/// Submits an envelope and its attachments over `client`, one chunk per attachment.
pub async fn submit(
    client: &mut lienthong_proto::pb::exchange_client::ExchangeClient<tonic::transport::Channel>,
    envelope: lienthong_proto::pb::Signed,
    attachments: &[&[u8]],
) -> Result<lienthong_proto::pb::SubmitResponse, tonic::Status> {
    use lienthong_proto::pb::{AttachmentChunk, SubmitFrame, submit_frame::Frame};
    let mut frames = vec![SubmitFrame {
        frame: Some(Frame::Envelope(envelope)),
    }];
    for (index, bytes) in attachments.iter().enumerate() {
        frames.push(SubmitFrame {
            frame: Some(Frame::Chunk(AttachmentChunk {
                attachment_index: index as u32,
                data: bytes.to_vec().into(),
                offset: 0,
            })),
        });
    }
    client
        .submit(tokio_stream::iter(frames))
        .await
        .map(|r| r.into_inner())
}

/// The broker's Admin service with the operator certificate.
pub async fn admin_client(
    world: &World,
    url: &str,
) -> lienthong_proto::pb::admin_client::AdminClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(world.operator_tls().client_config("localhost"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    lienthong_proto::pb::admin_client::AdminClient::new(channel)
}

/// Runs `lienthong admin ARGS` (the binary `bin`) with the operator certificate of
/// `world` against the broker at `url`.
pub async fn run_admin_cli(
    bin: &Path,
    world: &World,
    url: &str,
    args: &[&str],
) -> std::process::Output {
    let mut all: Vec<String> = vec![
        "admin".into(),
        "--broker".into(),
        url.into(),
        "--ca".into(),
        world.pki.ca_cert.display().to_string(),
        "--cert".into(),
        world.pki.operator_cert.display().to_string(),
        "--key".into(),
        world.pki.operator_key.display().to_string(),
    ];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let bin = bin.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(bin).args(&all).output().unwrap()
    })
    .await
    .unwrap()
}

/// The value of one series (`name{labels}` exactly as exposed) in the Prometheus text
/// at `base/metrics`; `token` for an agent's API. None when unreachable or absent.
pub async fn metric_value(base: &str, token: Option<&str>, series: &str) -> Option<u64> {
    let mut request = reqwest::Client::new().get(format!("{base}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let text = request.send().await.ok()?.text().await.ok()?;
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
}

/// A rustls client (HTTP/2 by ALPN) with agency `code`'s certificate, trusting the
/// world's CA: for tests that speak TLS to the broker below gRPC.
pub fn agency_tls_connector(world: &World, code: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls = world.agency_tls(code);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem).unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}
