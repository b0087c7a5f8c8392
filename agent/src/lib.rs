//! lienthong-agent: an agency's agent.
//!
//! It signs documents with the agency key and keeps them in a durable outbox until the
//! broker accepts them; it holds one long-lived session with the broker, verifies every
//! pushed document end to end, stores it durably, exports it to the inbox folder and
//! answers with a signed delivery receipt; and it serves a local HTTP JSON API for the
//! agency's gateways and clerks.
//!
//! Modules: [`store`] (sled, durability), `sealer` (numbers, batch-signs and stores
//! drafted documents a group at a time), `outbox` (submitter), `session` (broker
//! session, delivery handling), [`export`] (inbox folders), `api` and [`api_types`]
//! (local HTTP API), [`api_guard`] (its token, Host/Origin and Content-Type rules and
//! route table), [`api_server`] (its listener: timeouts, connection cap, TLS), `broker_client` (gRPC channel, retry policy), `metrics`
//! (Prometheus, served by the API at `/metrics`), `edxml_api` (edXML import and
//! export over the API), `dropfolder` (sends `.edxml` files dropped in a folder),
//! [`token`] (a document-signing key on a PKCS#11 token), [`error`].
//!
//! Invariants: nothing is acknowledged (HTTP 202, delivery Ack) before it is durable;
//! nothing received is trusted before `verify_document` passed; document bodies and
//! keys are never logged.
#![forbid(unsafe_code)]

mod api;
pub mod api_guard;
pub mod api_server;
pub mod api_types;
mod broker_client;
mod business;
mod dropfolder;
mod edxml_api;
pub mod error;
pub mod export;
mod exporter;
mod files;
mod intake;
mod metrics;
mod outbox;
mod reload;
/// The API's request checks without an agent, for the fuzz target `api_json`.
#[doc(hidden)]
pub mod request_check;
mod sealer;
mod session;
pub mod store;
pub mod token;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lienthong_proto::pb::exchange_client::ExchangeClient;
use lienthong_proto::tls::TlsFiles;
use lienthong_proto::{AgencyCode, SigningKey, TrustAnchors};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use error::AgentError;
pub use reload::{ReloadHook, ReloadLoad, Reloaded};

/// Everything an agent needs to run.
#[derive(Clone)]
pub struct AgentConfig {
    pub agency: AgencyCode,
    /// `https://HOST:PORT` of the broker.
    pub broker_url: String,
    /// CA bundle (trusts the broker and, by default, document signers), own chain, key.
    pub tls: TlsFiles,
    /// The key documents and receipts are signed with; `None` = the TLS cert and key.
    pub signing_key: Option<Arc<SigningKey>>,
    /// Trust anchors for document and delivery-receipt signatures; `None` = `tls.ca_pem`.
    pub document_anchors: Option<TrustAnchors>,
    /// The sled database lives here.
    pub data_dir: PathBuf,
    /// Received documents are exported to `<inbox_dir>/<message-id>/` after they are
    /// acknowledged; `None`: no folder (a gateway that reads the API).
    pub inbox_dir: Option<PathBuf>,
    /// Deliveries the agent accepts unacknowledged (default 512: a window is whole
    /// batches in flight, and small deliveries cost the broker their ids only).
    pub window: u32,
    /// Backoff for session reconnects and outbox retries (default 200 ms .. 30 s).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// HTTP/2 keepalive ping interval (default 20 s) and timeout (default 10 s).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// gRPC maximum message size, both directions (default 256 MiB).
    pub max_message_bytes: usize,
    /// Largest JSON or edXML request body the local HTTP API reads (default 48 MiB:
    /// a 20 MiB attachment in base64 with margin); larger files go through
    /// `POST /v1/uploads`, which streams them to disk. Memory per request stays within
    /// a small multiple of it.
    pub api_max_body_bytes: usize,
    /// Uploads not taken into a document are removed after this long (default 24 h).
    pub upload_max_age: Duration,
    /// How often leftovers are swept besides at start (default 1 h).
    pub sweep_interval: Duration,
    /// Outbox limits: documents and attachment bytes not yet accepted by the broker.
    /// Over either, a new document is refused (HTTP 429) naming the limit, so an
    /// unreachable broker never makes the agent's disk grow without bound.
    pub max_outbox_documents: u64,
    pub max_outbox_bytes: u64,
    /// The largest document (sum of its attachments) accepted from the gateway or
    /// from the broker (default 2 GiB); larger ones are refused before any upload.
    pub max_document_bytes: u64,
    /// Drop folder: `.edxml` packages written here are sent as if posted to
    /// `POST /v1/edxml`, then moved to `sent/` or `failed/` (default: none).
    pub drop_dir: Option<PathBuf>,
    /// A gateway group (numeric id) that may read the inbox folder: folders 0750 and
    /// files 0640 with that group. `None` (default): 0700 and 0600, the agent's user only.
    pub inbox_group: Option<u32>,
    /// The API's bearer token file; `None` = `<data_dir>/api-token`, created (0600,
    /// 32 random bytes in hex) when missing. Refused when others may read it.
    pub api_token_file: Option<PathBuf>,
    /// Serve the API over HTTPS with this certificate chain and key (PEM).
    pub api_tls: Option<ApiTls>,
    /// Allow a non-loopback API address without TLS (logged as a warning at start).
    pub api_insecure_bind: bool,
    /// Host names the API answers to besides `localhost` and its bound address (for
    /// an API bound off loopback: the name clients use).
    pub api_hosts: Vec<String>,
    /// A request's headers must arrive within this (also bounds a kept-alive
    /// connection waiting for its next request; default 10 s).
    pub api_header_timeout: Duration,
    /// A connection on which no byte moved for this long is closed (default 60 s).
    pub api_idle_timeout: Duration,
    /// A TLS handshake must finish within this (default 10 s).
    pub api_tls_handshake_timeout: Duration,
    /// Most API connections open at once (default 256); more wait to be accepted.
    pub api_max_connections: usize,
    /// Reload requests (SIGHUP in the CLI) and how to read the configuration again;
    /// `None`: the keys are fixed for the agent's life.
    pub reload: Option<ReloadHook>,
}

/// The API's HTTPS certificate chain and private key, PEM.
#[derive(Clone)]
pub struct ApiTls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl AgentConfig {
    /// The API token file this configuration uses.
    pub fn api_token_path(&self) -> PathBuf {
        api_guard::token_path(self.api_token_file.as_deref(), &self.data_dir)
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("agency", &self.agency)
            .field("broker_url", &self.broker_url)
            .field("data_dir", &self.data_dir)
            .field("inbox_dir", &self.inbox_dir)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl AgentConfig {
    /// A configuration with the defaults for everything not given.
    pub fn new(
        agency: AgencyCode,
        broker_url: impl Into<String>,
        tls: TlsFiles,
        data_dir: impl Into<PathBuf>,
        inbox_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            agency,
            broker_url: broker_url.into(),
            tls,
            signing_key: None,
            document_anchors: None,
            data_dir: data_dir.into(),
            inbox_dir: Some(inbox_dir.into()),
            window: 512,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            max_message_bytes: 256 * 1024 * 1024,
            api_max_body_bytes: 48 * 1024 * 1024,
            upload_max_age: Duration::from_secs(24 * 3600),
            sweep_interval: Duration::from_secs(3600),
            max_outbox_documents: 10_000,
            max_outbox_bytes: 10 * 1024 * 1024 * 1024,
            max_document_bytes: 2 * 1024 * 1024 * 1024,
            drop_dir: None,
            inbox_group: None,
            api_token_file: None,
            api_tls: None,
            api_insecure_bind: false,
            api_hosts: Vec::new(),
            api_header_timeout: Duration::from_secs(10),
            api_idle_timeout: Duration::from_secs(60),
            api_tls_handshake_timeout: Duration::from_secs(10),
            api_max_connections: 256,
            reload: None,
        }
    }
}

/// What the agent's tasks share.
pub(crate) struct Agent {
    pub agency: AgencyCode,
    pub store: store::Store,
    /// Seals documents and signs receipts; replaced by a reload (`reload`).
    signing_key: std::sync::RwLock<Arc<SigningKey>>,
    /// Trusts the broker (submission receipts).
    pub tls_anchors: TrustAnchors,
    /// Trusts document signers (documents, delivery receipts).
    pub document_anchors: TrustAnchors,
    /// The broker client; replaced by a reload (new certificate for new connections).
    client: std::sync::RwLock<ExchangeClient<Channel>>,
    /// The inbox folder documents are exported to, if any.
    pub inbox: Option<exporter::InboxFolder>,
    /// Documents durable in the store and waiting for export.
    pub export_queue: exporter::ExportQueue,
    /// New outbox documents, for the submitter (which takes the receiver at start).
    pub outbox_tx: tokio::sync::mpsc::UnboundedSender<String>,
    pub outbox_new: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    /// Drafted documents for the sealer task (numbers, one batch signature and one
    /// store write per group).
    pub sealer: sealer::SealSender,
    pub window: u32,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub metrics: metrics::Metrics,
    pub max_outbox_documents: u64,
    pub max_outbox_bytes: u64,
    pub max_document_bytes: u64,
    /// Largest JSON or edXML body read (`AgentConfig::api_max_body_bytes`).
    pub api_max_body_bytes: u64,
    /// The memory JSON and edXML bodies may take at once (4× the cap).
    pub body_budget: intake::BodyBudget,
    pub files: files::Files,
    /// Modes and group of what is written to the inbox folder.
    pub inbox_access: export::InboxAccess,
    /// Documents in the inbox; bumped when a new one is stored.
    pub inbox_count: tokio::sync::watch::Sender<u64>,
}

impl Agent {
    /// The key documents are sealed and receipts signed with now.
    pub(crate) fn signing_key(&self) -> Arc<SigningKey> {
        self.signing_key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_signing_key(&self, key: Arc<SigningKey>) {
        *self
            .signing_key
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = key;
    }

    /// The broker client for a new call (cheap: it shares its channel).
    pub(crate) fn client(&self) -> ExchangeClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_client(&self, client: ExchangeClient<Channel>) {
        *self
            .client
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = client;
    }

    /// The inbox folder (absolute), if this agent exports to one.
    pub(crate) fn inbox_dir(&self) -> Option<&std::path::Path> {
        self.inbox.as_ref().map(|f| f.dir.as_path())
    }

    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        broker_client::backoff(failures, self.reconnect_min, self.reconnect_max)
    }
}

/// (role, notAfter in Unix seconds) of the certificates the agent holds, for the
/// expiry metric: its TLS certificate and the certificate it signs with.
fn held_certificates(tls: &TlsFiles, signing_key: &SigningKey) -> Vec<(&'static str, i64)> {
    let tls_cert = lienthong_proto::signing::certs_from_pem(&tls.cert_pem, "certificate")
        .ok()
        .and_then(|certs| {
            certs
                .first()
                .and_then(|c| lienthong_proto::metrics::not_after(c))
        });
    let signing_cert = signing_key
        .chain()
        .first()
        .and_then(|c| lienthong_proto::metrics::not_after(c));
    [("tls", tls_cert), ("signing", signing_cert)]
        .into_iter()
        .filter_map(|(role, at)| at.map(|at| (role, at)))
        .collect()
}

/// Opens the store (refusing a corrupt or foreign data directory with an error naming
/// the path), then serves the local HTTP API on `api_listener`, runs the outbox
/// submitter and the broker session until `shutdown` is cancelled; then stops taking
/// requests, flushes the store and returns `Ok(())`.
pub async fn run(
    config: AgentConfig,
    api_listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    lienthong_proto::tls::install_crypto_provider();
    // The API's rules first: nothing starts when it could not be served safely.
    let api_addr = api_listener.local_addr().map_err(AgentError::Api)?;
    api_server::check_bind(api_addr, config.api_tls.is_some(), config.api_insecure_bind)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let api_tls = match &config.api_tls {
        Some(files) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            api_server::tls_config(&files.cert_pem, &files.key_pem).map_err(AgentError::Config)?,
        ))),
        None => None,
    };
    let token_path = config.api_token_path();
    let api_token =
        tokio::task::spawn_blocking(move || api_guard::ApiToken::load_or_create(&token_path))
            .await
            .map_err(|e| AgentError::Config(format!("reading the API token failed: {e}")))?
            .map_err(AgentError::ApiToken)?;
    let signing_key = reload::signing_key_for(&config)?;
    let tls_anchors = config
        .tls
        .trust_anchors()
        .map_err(|source| AgentError::Key {
            what: "CA bundle",
            source,
        })?;
    let document_anchors = config
        .document_anchors
        .clone()
        .unwrap_or_else(|| tls_anchors.clone());
    let client = broker_client::client(&config)?;

    // The store first: an inbox folder inside the data directory must not make a new
    // data directory look foreign.
    let data_dir = config.data_dir.clone();
    let upload_max_age = config.upload_max_age;
    let (store, (outbox_counts, inbox_count)) = tokio::task::spawn_blocking(move || {
        let store = store::Store::open(&data_dir)?;
        let files = files::Files::new(&data_dir);
        files.create().map_err(|e| AgentError::Corrupt {
            path: data_dir.clone(),
            detail: e.to_string(),
        })?;
        // Before the API serves: nothing is being written, so every `.part` is a
        // leftover, and an outbox folder is needed only by a document still waiting.
        let swept = files.sweep(upload_max_age, true, |id| {
            store
                .outbox_record(id)
                .map(|r| r.is_some_and(|r| r.state == store::OutboxState::Outbox))
                // Unreadable: keep it, the submitter will say what is wrong.
                .unwrap_or(true)
        });
        if swept != files::Swept::default() {
            tracing::info!(
                parts = swept.parts,
                uploads = swept.uploads,
                outbox_folders = swept.outbox_folders,
                bytes = swept.bytes,
                "swept leftovers of earlier runs"
            );
        }
        let counts = store.outbox_counts().map_err(|e| AgentError::Corrupt {
            path: data_dir.clone(),
            detail: format!("cannot read the outbox: {e}"),
        })?;
        let inbox = store.inbox_len().map_err(|e| AgentError::Corrupt {
            path: data_dir.clone(),
            detail: format!("cannot read the inbox: {e}"),
        })?;
        Ok::<_, AgentError>((store, (counts, inbox)))
    })
    .await
    .map_err(|e| AgentError::Corrupt {
        path: config.data_dir.clone(),
        detail: format!("opening the store failed: {e}"),
    })??;
    let certificates = held_certificates(&config.tls, &signing_key);

    let inbox_access = export::InboxAccess {
        group: config.inbox_group,
    };
    let inbox = match &config.inbox_dir {
        Some(dir) => Some(open_inbox_folder(&config.agency, dir, inbox_access)?),
        None => None,
    };
    let (outbox_tx, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
    let (sealer_tx, sealer_rx) = tokio::sync::mpsc::unbounded_channel();
    let agent = Arc::new(Agent {
        agency: config.agency.clone(),
        store,
        signing_key: std::sync::RwLock::new(signing_key),
        tls_anchors,
        document_anchors,
        client: std::sync::RwLock::new(client),
        inbox,
        export_queue: exporter::ExportQueue::default(),
        outbox_tx,
        outbox_new: std::sync::Mutex::new(Some(outbox_rx)),
        sealer: sealer_tx,
        window: config.window.max(1),
        reconnect_min: config.reconnect_min,
        reconnect_max: config.reconnect_max.max(config.reconnect_min),
        metrics: metrics::Metrics::new(
            outbox_counts,
            certificates,
            files::Files::new(&config.data_dir),
        ),
        max_outbox_documents: config.max_outbox_documents,
        max_outbox_bytes: config.max_outbox_bytes,
        max_document_bytes: config.max_document_bytes,
        api_max_body_bytes: u64::try_from(config.api_max_body_bytes).unwrap_or(u64::MAX),
        body_budget: intake::BodyBudget::new(
            u64::try_from(config.api_max_body_bytes).unwrap_or(u64::MAX),
        ),
        files: files::Files::new(&config.data_dir),
        inbox_access,
        inbox_count: tokio::sync::watch::Sender::new(inbox_count),
    });

    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(outbox::run(Arc::clone(&agent), stop.clone()));
    // Not one of `tasks`: it ends with the agent, after the API drained its requests.
    tokio::spawn(sealer::run(Arc::downgrade(&agent), sealer_rx));
    tasks.spawn(session::run(Arc::clone(&agent), stop.clone()));
    // Exports what the session stored, and at start what an earlier run left.
    tasks.spawn(exporter::run(Arc::clone(&agent), stop.clone()));
    tasks.spawn(files::sweep_periodically(
        Arc::clone(&agent),
        config.upload_max_age,
        config.sweep_interval,
        stop.clone(),
    ));
    if let Some(drop_dir) = config.drop_dir.clone() {
        tasks.spawn(dropfolder::run(Arc::clone(&agent), drop_dir, stop.clone()));
    }
    if let Some(hook) = config.reload.clone() {
        tasks.spawn(reload::reload_loop(Arc::clone(&agent), hook, stop.clone()));
    }

    tracing::info!(
        agency = %agent.agency,
        api = %api_addr,
        api_tls = api_tls.is_some(),
        api_token_file = %config.api_token_path().display(),
        broker = %config.broker_url,
        data = %config.data_dir.display(),
        inbox = %exporter::describe(agent.inbox_dir()),
        "agent running"
    );
    let guard = api_guard::Guard::new(&api_token, api_addr, &config.api_hosts, api_tls.is_some());
    let app = api::router(Arc::clone(&agent), config.api_max_body_bytes, guard);
    let options = api_server::ServeOptions {
        header_timeout: config.api_header_timeout,
        idle_timeout: config.api_idle_timeout,
        tls_handshake_timeout: config.api_tls_handshake_timeout,
        max_connections: config.api_max_connections,
        tls: api_tls,
    };
    let served = api_server::serve(api_listener, app, options, stop.clone()).await;
    if let Err(e) = &served {
        tracing::error!(agency = %agent.agency, error = %e, "local HTTP API failed; stopping");
    }
    stop.cancel();
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::error!(agency = %agent.agency, error = %e, "agent task failed");
        }
    }
    agent.store.durable().await?;
    tracing::info!(agency = %agent.agency, "agent stopped");
    served.map_err(AgentError::Api)
}

/// Creates the inbox folder (with its modes), removes folders a crash left half
/// written, and opens its shared sync.
fn open_inbox_folder(
    agency: &AgencyCode,
    dir: &std::path::Path,
    access: export::InboxAccess,
) -> Result<exporter::InboxFolder, AgentError> {
    let from_export = |e: export::ExportError| AgentError::Io {
        path: e.path,
        source: e.source,
    };
    access.create_dir(dir).map_err(from_export)?;
    let dir = std::fs::canonicalize(dir).map_err(|source| AgentError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let removed = export::remove_partials(&dir).map_err(from_export)?;
    if removed > 0 {
        tracing::info!(agency = %agency, removed, "removed half-written inbox folders");
    }
    let sync = export::GroupSync::new(&dir).map_err(from_export)?;
    Ok(exporter::InboxFolder { dir, access, sync })
}
