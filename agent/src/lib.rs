//! lienthong-agent: an agency's agent.
//!
//! It signs documents with the agency key and keeps them in a durable outbox until the
//! broker accepts them; it holds one long-lived session with the broker, verifies every
//! pushed document end to end, stores it durably, exports it to the inbox folder and
//! answers with a signed delivery receipt; and it serves a local HTTP JSON API for the
//! agency's gateways and clerks.
//!
//! Modules: [`store`] (sled, durability), `outbox` (submitter), `session` (broker
//! session, delivery handling), [`export`] (inbox folders), `api` and [`api_types`]
//! (local HTTP API), `broker_client` (gRPC channel, retry policy), `metrics`
//! (Prometheus, served by the API at `/metrics`), `edxml_api` (edXML import and
//! export over the API), `dropfolder` (sends `.edxml` files dropped in a folder),
//! [`error`].
//!
//! Invariants: nothing is acknowledged (HTTP 202, delivery Ack) before it is durable;
//! nothing received is trusted before `verify_document` passed; document bodies and
//! keys are never logged.
#![forbid(unsafe_code)]

mod api;
pub mod api_types;
mod broker_client;
mod business;
mod dropfolder;
mod edxml_api;
pub mod error;
pub mod export;
mod files;
mod metrics;
mod outbox;
/// The API's request checks without an agent, for the fuzz target `api_json`.
#[doc(hidden)]
pub mod request_check;
mod session;
pub mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lienthong_proto::pb::exchange_client::ExchangeClient;
use lienthong_proto::tls::TlsFiles;
use lienthong_proto::{AgencyCode, PeerIdentity, SigningKey, TrustAnchors};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use error::AgentError;

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
    /// Received documents are exported to `<inbox_dir>/<message-id>/`.
    pub inbox_dir: PathBuf,
    /// Deliveries the agent accepts unacknowledged (default 128).
    pub window: u32,
    /// Backoff for session reconnects and outbox retries (default 200 ms .. 30 s).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// HTTP/2 keepalive ping interval (default 20 s) and timeout (default 10 s).
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// gRPC maximum message size, both directions (default 256 MiB).
    pub max_message_bytes: usize,
    /// Largest request body the local HTTP API accepts (default 512 MiB).
    pub api_max_body_bytes: usize,
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
            inbox_dir: inbox_dir.into(),
            window: 128,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            max_message_bytes: 256 * 1024 * 1024,
            api_max_body_bytes: 512 * 1024 * 1024,
            max_outbox_documents: 10_000,
            max_outbox_bytes: 10 * 1024 * 1024 * 1024,
            max_document_bytes: 2 * 1024 * 1024 * 1024,
            drop_dir: None,
        }
    }
}

/// What the agent's tasks share.
pub(crate) struct Agent {
    pub agency: AgencyCode,
    pub store: store::Store,
    pub signing_key: Arc<SigningKey>,
    /// Trusts the broker (submission receipts).
    pub tls_anchors: TrustAnchors,
    /// Trusts document signers (documents, delivery receipts).
    pub document_anchors: TrustAnchors,
    pub client: ExchangeClient<Channel>,
    /// Absolute.
    pub inbox_dir: PathBuf,
    /// New outbox documents, for the submitter (which takes the receiver at start).
    pub outbox_tx: tokio::sync::mpsc::UnboundedSender<String>,
    pub outbox_new: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    pub window: u32,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub metrics: metrics::Metrics,
    pub max_outbox_documents: u64,
    pub max_outbox_bytes: u64,
    pub max_document_bytes: u64,
    pub files: files::Files,
    /// Shared syncs of the inbox folder's filesystem for concurrent exports.
    pub export_sync: export::GroupSync,
    /// Documents in the inbox; bumped when a new one is stored.
    pub inbox_count: tokio::sync::watch::Sender<u64>,
}

impl Agent {
    pub(crate) fn backoff(&self, failures: u32) -> Duration {
        broker_client::backoff(failures, self.reconnect_min, self.reconnect_max)
    }
}

/// (role, notAfter in Unix seconds) of the certificates the agent holds, for the
/// expiry metric: its TLS certificate and the certificate it signs with.
fn held_certificates(tls: &TlsFiles, signing_key: &SigningKey) -> Vec<(&'static str, i64)> {
    let tls_cert = lienthong_proto::signing::certs_from_pem(&tls.cert_pem, "certificate")
        .ok()
        .and_then(|certs| certs.first().and_then(|c| metrics::not_after(c)));
    let signing_cert = signing_key
        .chain()
        .first()
        .and_then(|c| metrics::not_after(c));
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
    let signing_key = match &config.signing_key {
        Some(key) => Arc::clone(key),
        None => Arc::new(config.tls.signing_key().map_err(|source| AgentError::Key {
            what: "TLS certificate and key",
            source,
        })?),
    };
    match signing_key.identity() {
        Ok(PeerIdentity::Agency(code)) if code == config.agency => {}
        Ok(other) => {
            return Err(AgentError::Config(format!(
                "the signing certificate is for {other}, not agency {}",
                config.agency
            )));
        }
        Err(source) => {
            return Err(AgentError::Key {
                what: "signing certificate",
                source,
            });
        }
    }
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
    let (store, (outbox_counts, inbox_count)) = tokio::task::spawn_blocking(move || {
        let store = store::Store::open(&data_dir)?;
        files::Files::new(&data_dir)
            .create()
            .map_err(|e| AgentError::Corrupt {
                path: data_dir.clone(),
                detail: e.to_string(),
            })?;
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

    let inbox_io = |source| AgentError::Io {
        path: config.inbox_dir.clone(),
        source,
    };
    std::fs::create_dir_all(&config.inbox_dir).map_err(inbox_io)?;
    let inbox_dir = std::fs::canonicalize(&config.inbox_dir).map_err(inbox_io)?;
    let removed = export::remove_partials(&inbox_dir).map_err(|e| AgentError::Io {
        path: e.path,
        source: e.source,
    })?;
    if removed > 0 {
        tracing::info!(agency = %config.agency, removed, "removed half-written inbox folders");
    }

    let (outbox_tx, outbox_rx) = tokio::sync::mpsc::unbounded_channel();
    let export_sync = export::GroupSync::new(&inbox_dir).map_err(|e| AgentError::Io {
        path: e.path,
        source: e.source,
    })?;
    let agent = Arc::new(Agent {
        agency: config.agency.clone(),
        store,
        signing_key,
        tls_anchors,
        document_anchors,
        client,
        inbox_dir,
        outbox_tx,
        outbox_new: std::sync::Mutex::new(Some(outbox_rx)),
        window: config.window.max(1),
        reconnect_min: config.reconnect_min,
        reconnect_max: config.reconnect_max.max(config.reconnect_min),
        metrics: metrics::Metrics::new(outbox_counts, certificates),
        max_outbox_documents: config.max_outbox_documents,
        max_outbox_bytes: config.max_outbox_bytes,
        max_document_bytes: config.max_document_bytes,
        files: files::Files::new(&config.data_dir),
        export_sync,
        inbox_count: tokio::sync::watch::Sender::new(inbox_count),
    });

    session::reexport_pending(&agent).await;

    let stop = shutdown.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(outbox::run(Arc::clone(&agent), stop.clone()));
    tasks.spawn(session::run(Arc::clone(&agent), stop.clone()));
    if let Some(drop_dir) = config.drop_dir.clone() {
        tasks.spawn(dropfolder::run(Arc::clone(&agent), drop_dir, stop.clone()));
    }

    let api_addr = api_listener.local_addr().ok();
    tracing::info!(
        agency = %agent.agency,
        api = ?api_addr,
        broker = %config.broker_url,
        data = %config.data_dir.display(),
        inbox = %agent.inbox_dir.display(),
        "agent running"
    );
    let app = api::router(Arc::clone(&agent), config.api_max_body_bytes);
    // Answers are small and latency matters: no Nagle delay on the API's sockets.
    let api_listener = axum::serve::ListenerExt::tap_io(api_listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let served = axum::serve(api_listener, app)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .await;
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
