//! lienthong-broker: the central broker of a lienthong exchange.
//!
//! Layout:
//! - [`run`] serves the gRPC services on a listener the caller bound, until shutdown;
//!   [`run_with_admin`] also serves the admin HTTP listener (`http`: `/metrics`,
//!   `/healthz`, `/readyz`; `metrics`: what is measured).
//! - `exchange`: submission, agent sessions and status (agency certificates).
//! - `admin`: queue views for operators (operator certificates).
//! - `session`: pushing one recipient's queue with a bounded window.
//! - `hub`: which agencies have a live session (at most one each).
//! - `listener`: accepting connections on both listeners with timeouts and caps (TLS
//!   handshake done here, not by tonic), and the open-file limit.
//! - [`store`]: sled trees and the submission transaction; `commit`: group commit.
//! - `auth`: the caller's identity from its TLS certificate; `trust`: the registry of
//!   certificate bindings (SPKI hash → agency) and the operator block list;
//!   `revocation`: CRLs for TLS clients and document signers, refreshed.
//! - [`error`]: the error type and its mapping to gRPC status codes.
//!
//! Invariant: a submission is answered only after it is durable on disk, and a queued
//! delivery leaves its queue only with the recipient's verified signed receipt.
#![forbid(unsafe_code)]

mod admin;
mod admission;
mod audit;
mod auth;
mod commit;
mod dashboard;
mod deadletter;
pub mod error;
mod exchange;
mod http;
mod hub;
mod listener;
mod metrics;
mod recall;
mod recent;
pub mod records;
mod reload;
mod revocation;
mod session;
pub mod store;
mod trust;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lienthong_proto::pb::{admin_server::AdminServer, exchange_server::ExchangeServer};
use lienthong_proto::tls::{TlsFiles, install_crypto_provider};
use lienthong_proto::{AgencyCode, SigningKey, TrustAnchors};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::BrokerError;
pub use reload::ReloadHook;

/// Everything the broker needs to run.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Names the broker in its receipts (`broker:<name>`).
    pub name: String,
    /// CA bundle for client certificates, the broker's certificate chain and key.
    pub tls: TlsFiles,
    /// Trust anchors for document and receipt signatures; `None` = the TLS CA bundle.
    pub document_anchors: Option<TrustAnchors>,
    pub data_dir: PathBuf,
    /// Agencies registered at start (code, name), in addition to those already stored.
    pub agencies: Vec<(AgencyCode, String)>,
    /// Register an agency automatically on its first authenticated connection.
    pub auto_register: bool,
    /// Largest total attachment size accepted for one document.
    pub max_document_bytes: u64,
    /// Largest number of unacknowledged deliveries per session.
    pub window: u32,
    /// A pushed delivery without acknowledgement for this long is offered again.
    pub ack_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// After shutdown is requested, in-flight calls get this long to finish.
    pub shutdown_grace: Duration,
    /// Redelivery backoff: the wait for an acknowledgement doubles with each attempt,
    /// from `ack_timeout` up to this.
    pub max_ack_timeout: Duration,
    /// Expiry of a document without its own, by priority 0 (normal) to 4.
    pub default_expiry: [Duration; 5],
    /// How often queued deliveries are checked for expiry.
    pub expiry_check_interval: Duration,
    /// Per-recipient queue limits; a submission that would exceed one is refused with
    /// RESOURCE_EXHAUSTED naming the limit.
    pub max_pending_documents: u64,
    pub max_pending_bytes: u64,
    /// Free space kept in reserve on the store's filesystem: a submission that would
    /// leave less is refused with RESOURCE_EXHAUSTED before anything is written. sled
    /// cannot recover in-process from a full disk (it may hang), so it must never get
    /// there; the reserve covers the store's own growth (several times the largest
    /// write) and deliveries' bookkeeping.
    pub min_free_bytes: u64,
    /// When set, the dashboard's data (`/api/...` on the admin listener) requires
    /// `Authorization: Bearer <token>`; the page itself, `/metrics`, `/healthz` and
    /// `/readyz` stay open.
    pub admin_token: Option<String>,
    /// Most documents in one SubmitBatch call; a larger batch is refused whole with
    /// INVALID_ARGUMENT before anything is stored.
    pub max_batch_documents: usize,
    /// Admission per sending agency: at most this many Submit streams open at once…
    pub max_submissions_per_agency: u32,
    /// …and at most this many bytes reserved by its open streams (declared sizes).
    /// Over either: RESOURCE_EXHAUSTED naming the limit.
    pub max_reserved_bytes_per_agency: u64,
    /// A Submit stream that delivers no frame for this long is ended and its reservation
    /// released; its partial upload is removed.
    pub stall_timeout: Duration,
    /// How often partial uploads left by ended streams are swept (those untouched for
    /// `stall_timeout`); they are also swept at start.
    pub partial_sweep_interval: Duration,
    /// Per (sender, recipient) queue limits; `None` = a quarter of the per-recipient
    /// limit, so no single sender can fill a recipient's queue.
    pub max_pending_per_sender_documents: Option<u64>,
    pub max_pending_per_sender_bytes: Option<u64>,
    /// The furthest expiry a sender may set, from the time of submission.
    pub max_expiry: Duration,
    /// How far in the future a document's `created_at_ms` may be (clock skew).
    pub max_clock_skew: Duration,
    /// How old a document's `created_at_ms` may be when it is submitted.
    pub max_document_age: Duration,

    // --- Connections, sessions and the admin listener (`listener`, `session`, `http`) ---
    /// A gRPC connection must finish its TLS handshake, client certificate included,
    /// within this; until then it holds one of `max_handshakes` slots.
    pub tls_handshake_timeout: Duration,
    /// After its handshake a gRPC connection must start HTTP/2 within this; on the admin
    /// listener each request's head must arrive within this (which also closes an idle
    /// keep-alive connection).
    pub http_header_timeout: Duration,
    /// An admin connection on which no byte moves for this long is closed.
    pub admin_idle_timeout: Duration,
    /// Most gRPC connections open at once, and most of them in their TLS handshake at
    /// once; both are lowered at start to fit the open-file limit (`listener::fit_caps`).
    /// Beyond a cap a new connection is closed at once and counted.
    pub max_connections: usize,
    pub max_handshakes: usize,
    /// Most admin HTTP connections open at once.
    pub max_admin_connections: usize,
    /// Bytes of deliveries one session may have waiting for the transport, and all
    /// sessions together; a session waits for room (one message larger than the whole
    /// per-session budget is still sent, alone).
    pub session_buffer_bytes: u64,
    pub sessions_buffer_bytes: u64,
    /// A session that cannot queue anything for this long (its agent stopped reading)
    /// ends, returning its buffered bytes.
    pub session_stall_timeout: Duration,
    /// Named operator tokens for the admin listener, in addition to `admin_token`; the
    /// name is recorded in the audit log for every operator action taken with it.
    pub admin_tokens: Vec<AdminToken>,
    /// Serve the admin listener on a non-loopback address although it speaks plain HTTP
    /// (logged as a warning). Without it such an address is refused at start.
    pub admin_insecure_bind: bool,

    // --- Revocation (`revocation`) ---
    /// CRL files (PEM or DER) applied to TLS client certificates and document signers;
    /// read at start (an unreadable one refuses to start) and every
    /// `crl_refresh_interval`, and on `Admin.ReloadCrls`.
    pub crl_files: Vec<PathBuf>,
    pub crl_refresh_interval: Duration,
    /// How long past its nextUpdate a CRL is still used; zero (the default) refuses a
    /// stale CRL's certificates at once (fail closed).
    pub crl_stale_grace: Duration,

    // --- Reload (`reload`) ---
    /// Reload requests (SIGHUP in the CLI) and how to read the configuration again;
    /// `None`: the configuration is fixed for the broker's life.
    pub reload: Option<ReloadHook>,
}

/// An operator token for the admin listener and the name it acts under.
#[derive(Clone)]
pub struct AdminToken {
    pub name: String,
    pub token: String,
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself: configs are logged.
        write!(f, "AdminToken {{ name: {:?} }}", self.name)
    }
}

impl AdminToken {
    /// A token without a name acts as "dashboard token <first 8 hex digits of its
    /// SHA-256>": enough for the audit log to tell tokens apart, useless for guessing.
    pub fn unnamed(token: String) -> Self {
        let digest = lienthong_proto::sha256(token.as_bytes());
        let name = format!(
            "dashboard token {}",
            hex::encode(digest.get(..4).unwrap_or(&[]))
        );
        Self { name, token }
    }

    /// Parses a token file: one token per line, either `name:token` or a bare token;
    /// blank lines and lines starting with `#` are ignored. A name is trimmed and may
    /// not be empty; a token must be at least 16 characters.
    pub fn parse_file(text: &str) -> Result<Vec<Self>, String> {
        let mut tokens = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line_no = number.saturating_add(1);
            let token = match line.split_once(':') {
                Some((name, token)) => {
                    let name = name.trim();
                    if name.is_empty() || name.chars().any(char::is_control) {
                        return Err(format!("line {line_no}: empty or unprintable name"));
                    }
                    Self {
                        name: name.to_owned(),
                        token: token.trim().to_owned(),
                    }
                }
                None => Self::unnamed(line.to_owned()),
            };
            if token.token.len() < 16 {
                return Err(format!(
                    "line {line_no}: the token is shorter than 16 characters"
                ));
            }
            tokens.push(token);
        }
        if tokens.is_empty() {
            return Err("no token in the file".into());
        }
        Ok(tokens)
    }
}

impl BrokerConfig {
    /// Every operator token of the admin listener with its name: `admin_tokens`, and
    /// `admin_token` (named by its hash).
    pub(crate) fn admin_operators(&self) -> Vec<AdminToken> {
        let mut tokens = self.admin_tokens.clone();
        if let Some(token) = self.admin_token.as_ref().filter(|t| !t.is_empty()) {
            tokens.push(AdminToken::unnamed(token.clone()));
        }
        tokens
    }

    pub fn new(tls: TlsFiles, data_dir: PathBuf) -> Self {
        Self {
            name: "broker".into(),
            tls,
            document_anchors: None,
            data_dir,
            agencies: Vec::new(),
            auto_register: true,
            max_document_bytes: 2 * 1024 * 1024 * 1024,
            window: 512,
            ack_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            max_ack_timeout: Duration::from_secs(300),
            default_expiry: [
                Duration::from_secs(7 * 24 * 3600),
                Duration::from_secs(3 * 24 * 3600),
                Duration::from_secs(24 * 3600),
                Duration::from_secs(8 * 3600),
                Duration::from_secs(8 * 3600),
            ],
            expiry_check_interval: Duration::from_secs(1),
            max_pending_documents: 1_000_000,
            max_pending_bytes: 50 * 1024 * 1024 * 1024,
            min_free_bytes: 512 * 1024 * 1024,
            admin_token: None,
            tls_handshake_timeout: Duration::from_secs(10),
            http_header_timeout: Duration::from_secs(10),
            admin_idle_timeout: Duration::from_secs(30),
            // Room for 10,000 idle agencies (issue 11's S5); `fit_caps` lowers it to
            // the open-file limit.
            max_connections: 16_384,
            max_handshakes: 256,
            max_admin_connections: 32,
            session_buffer_bytes: 16 * 1024 * 1024,
            sessions_buffer_bytes: 512 * 1024 * 1024,
            session_stall_timeout: Duration::from_secs(120),
            admin_tokens: Vec::new(),
            admin_insecure_bind: false,
            max_submissions_per_agency: 16,
            max_batch_documents: 1024,
            max_reserved_bytes_per_agency: 4 * 1024 * 1024 * 1024,
            stall_timeout: Duration::from_secs(60),
            partial_sweep_interval: Duration::from_secs(60),
            max_pending_per_sender_documents: None,
            max_pending_per_sender_bytes: None,
            max_expiry: Duration::from_secs(30 * 24 * 3600),
            max_clock_skew: Duration::from_secs(5 * 60),
            max_document_age: Duration::from_secs(30 * 24 * 3600),
            crl_files: Vec::new(),
            crl_refresh_interval: Duration::from_secs(3600),
            crl_stale_grace: Duration::ZERO,
            reload: None,
        }
    }

    /// The queue limits applied to each (sender, recipient) pair and recipient.
    pub fn queue_limits(&self) -> store::QueueLimits {
        store::QueueLimits {
            max_documents: self.max_pending_documents,
            max_bytes: self.max_pending_bytes,
            max_pair_documents: self
                .max_pending_per_sender_documents
                .unwrap_or(self.max_pending_documents / 4)
                .max(1),
            max_pair_bytes: self
                .max_pending_per_sender_bytes
                .unwrap_or(self.max_pending_bytes / 4)
                .max(1),
        }
    }

    /// Largest gRPC message: a delivery carries the whole document for now.
    /// One gRPC message carries at most a whole small document (attachments up to the
    /// streaming threshold, a header, a certificate chain) or one chunk; larger
    /// documents are streamed, so no message needs to hold one.
    pub(crate) fn max_message_bytes(&self) -> usize {
        usize::try_from(lienthong_proto::document::STREAMED_THRESHOLD)
            .unwrap_or(usize::MAX)
            .saturating_add(8 * 1024 * 1024)
    }
}

/// Message ids being stored right now, so two concurrent submissions of the same id
/// cannot interleave their attachment writes.
#[derive(Default)]
struct InProgress(Mutex<HashSet<String>>);

pub(crate) struct InProgressGuard<'a> {
    set: &'a InProgress,
    id: String,
}

impl InProgress {
    fn claim(&self, id: &str) -> Option<InProgressGuard<'_>> {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        set.insert(id.to_owned()).then(|| InProgressGuard {
            set: self,
            id: id.to_owned(),
        })
    }
}

impl Drop for InProgressGuard<'_> {
    fn drop(&mut self) {
        self.set
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Why the broker is not ready to accept documents, if it is not.
pub(crate) fn not_ready_reason(shared: &Shared) -> Option<String> {
    if !shared.store.is_writable() {
        return Some("the store failed to flush and refuses writes; see the log".into());
    }
    if let Some(reason) = shared.revocation.not_ready_reason() {
        return Some(reason);
    }
    let needed = shared
        .space_needed
        .load(std::sync::atomic::Ordering::Acquire)
        .max(shared.config.min_free_bytes);
    match shared.store.free_bytes() {
        Ok(free) if free < needed => Some(format!(
            "disk nearly full: {free} bytes free, the last refused document needed {needed} \
             including the {} kept in reserve (min_free_bytes)",
            shared.config.min_free_bytes
        )),
        Ok(_) => None,
        Err(e) => Some(format!("cannot read the store's free space: {e}")),
    }
}

/// (role, notAfter in Unix seconds) of the certificates the broker holds, for the
/// expiry metric: its TLS certificate and the certificate of its signing key.
pub(crate) fn held_certificates(
    tls: &TlsFiles,
    signing_key: &SigningKey,
) -> Vec<(&'static str, i64)> {
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

/// State shared by the services and sessions.
struct Shared {
    config: BrokerConfig,
    store: store::Store,
    hub: hub::Hub,
    /// The key of the broker's receipts; replaced by a reload (`reload`).
    signing_key: std::sync::RwLock<Arc<SigningKey>>,
    /// The TLS certificate new handshakes present; replaced by a reload.
    server_certificate: Arc<reload::ServerCertificate>,
    document_anchors: TrustAnchors,
    in_progress: InProgress,
    /// Bytes of submissions being written now, counted against the free-space reserve
    /// so that concurrent submissions cannot all pass the check and then overfill.
    writing_bytes: std::sync::atomic::AtomicU64,
    /// Free bytes the last submission refused for disk space needed; 0 when none was.
    /// Readiness stays false until that much is free again.
    space_needed: std::sync::atomic::AtomicU64,
    /// Cancelled at shutdown; sessions end with it so the server can drain.
    shutdown: CancellationToken,
    metrics: metrics::Metrics,
    /// Open calls per agency: concurrency and byte quotas, suspension cancellation,
    /// partial uploads being written.
    admission: admission::Admission,
    /// The budget of bytes all sessions together may have waiting for the transport
    /// (`sessions_buffer_bytes`, at most u32::MAX), and its size.
    session_bytes: Arc<tokio::sync::Semaphore>,
    session_bytes_max: u32,
    /// Certificate bindings and the block list: who a certificate is.
    trust: trust::Trust,
    /// CRLs in force and the TLS client verifier built from them.
    revocation: Arc<revocation::Revocation>,
}

impl Shared {
    /// The key receipts are signed with now.
    fn signing_key(&self) -> Arc<SigningKey> {
        self.signing_key
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_signing_key(&self, key: SigningKey) {
        *self
            .signing_key
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(key);
    }
}

/// Opens the store and serves until `shutdown` is cancelled, then stops accepting,
/// ends the sessions, waits for in-flight calls, and makes everything durable.
pub async fn run(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    run_with_admin(config, listener, None, shutdown).await
}

/// [`run`], and also serves `admin_listener` (when given) with plain HTTP: `GET
/// /metrics` (Prometheus), `/healthz`, `/readyz` and the operator dashboard (`GET /` and
/// its `/api`, which can redrive dead letters). The dashboard's `/api` needs an operator
/// token when any is configured (`admin_tokens`, `admin_token`). A non-loopback
/// `admin_listener` is refused unless `admin_insecure_bind` is set and a token is
/// configured. It stops when shutdown begins.
pub async fn run_with_admin(
    config: BrokerConfig,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    install_crypto_provider();
    // Before anything is opened: a refused configuration leaves nothing running.
    if let Some(addr) = admin_listener.as_ref().and_then(|l| l.local_addr().ok()) {
        http::check_bind(
            addr,
            config.admin_insecure_bind,
            !config.admin_operators().is_empty(),
        )?;
    }
    let config_error = |what: &str, e: lienthong_proto::ProtocolError| BrokerError::Config {
        path: what.to_owned(),
        detail: e.to_string(),
    };
    let signing_key = config
        .tls
        .signing_key()
        .map_err(|e| config_error("broker certificate/key", e))?;
    let document_anchors = match &config.document_anchors {
        Some(anchors) => anchors.clone(),
        None => config
            .tls
            .trust_anchors()
            .map_err(|e| config_error("CA bundle", e))?,
    };
    let store = store::Store::open(&config.data_dir)?;
    for (code, name) in &config.agencies {
        store.register_agency(
            code.as_str(),
            name,
            false,
            lienthong_proto::now_ms(),
            "the broker's configuration (--register)",
        )?;
    }
    let revocation = Arc::new(revocation::Revocation::start(
        config.crl_files.clone(),
        config.crl_stale_grace,
        listener::client_roots(&config.tls)?,
        document_anchors.clone(),
        store.tree("blocked")?,
    )?);
    let trust = trust::Trust::open(&store, config.auto_register, revocation.clone())?;
    let local_addr = listener.local_addr().ok();
    let certificates = held_certificates(&config.tls, &signing_key);
    let server_certificate = Arc::new(reload::ServerCertificate::new(&config.tls)?);
    let session_bytes_max = u32::try_from(config.sessions_buffer_bytes)
        .unwrap_or(u32::MAX)
        .max(1);
    let shared = Arc::new_cyclic(|weak| Shared {
        session_bytes: Arc::new(tokio::sync::Semaphore::new(session_bytes_max as usize)),
        session_bytes_max,
        store: store.clone(),
        hub: hub::Hub::default(),
        signing_key: std::sync::RwLock::new(Arc::new(signing_key)),
        server_certificate,
        document_anchors,
        in_progress: InProgress::default(),
        writing_bytes: std::sync::atomic::AtomicU64::new(0),
        space_needed: std::sync::atomic::AtomicU64::new(0),
        shutdown: shutdown.child_token(),
        metrics: metrics::Metrics::new(weak.clone(), certificates),
        admission: admission::Admission::default(),
        trust,
        revocation,
        config,
    });
    tokio::spawn(deadletter::expiry_loop(shared.clone()));
    tokio::spawn(admission::sweep_loop(shared.clone()));
    tokio::spawn(revocation::refresh_loop(
        shared.clone(),
        shared.config.crl_refresh_interval,
    ));
    if let Some(hook) = shared.config.reload.clone() {
        tokio::spawn(reload::reload_loop(shared.clone(), hook));
    }
    let max_message = shared.config.max_message_bytes();
    let exchange = ExchangeServer::new(exchange::ExchangeService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let admin = AdminServer::new(admin::AdminService {
        shared: shared.clone(),
    });
    tracing::info!(
        addr = local_addr.map(tracing::field::display),
        data_dir = %shared.config.data_dir.display(),
        documents = store.document_count(),
        "broker listening"
    );
    let nofile = listener::raise_nofile_limit();
    let (max_connections, max_handshakes, max_admin_connections) = listener::fit_caps(
        nofile.soft,
        shared.config.max_connections,
        shared.config.max_handshakes,
        shared.config.max_admin_connections,
    );
    tracing::info!(
        nofile_soft = nofile.soft,
        nofile_hard = nofile.hard,
        max_connections,
        max_handshakes,
        max_admin_connections,
        "connection caps"
    );
    let limits = listener::Limits {
        handshake_timeout: shared.config.tls_handshake_timeout,
        header_timeout: shared.config.http_header_timeout,
        idle_timeout: shared.config.admin_idle_timeout,
        max_connections,
        max_handshakes,
    };
    let tls = listener::tls_server_config(
        shared.server_certificate.clone(),
        shared.revocation.verifier(),
    );
    let incoming = listener::grpc_incoming(
        listener,
        tls,
        limits,
        shared.metrics.connections.clone(),
        shutdown.clone(),
    );
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(shared.config.keepalive_interval))
        .http2_keepalive_timeout(Some(shared.config.keepalive_timeout))
        // Flow control: adaptive windows. Each stream and the connection start at the
        // protocol's 64 KiB and hyper grows them from its bandwidth-delay estimate (up to
        // 16 MiB) while data flows, so a large document on a WAN link gets the window
        // the link needs and an idle session keeps the initial one. A window is credit,
        // not a buffer: nothing is allocated for it. (Fixed initial windows set here
        // would be ignored: hyper resets both to 64 KiB in adaptive mode.)
        .http2_adaptive_window(Some(true))
        .add_service(exchange)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled());
    let admin = match admin_listener {
        Some(admin_listener) => {
            let addr = admin_listener
                .local_addr()
                .map_err(|e| BrokerError::Serve(format!("admin listener: {e}")))?;
            tracing::info!(%addr, "admin HTTP listening");
            let app = http::router(shared.clone(), addr);
            let admin_limits = listener::Limits {
                max_connections: max_admin_connections,
                ..limits
            };
            Some(tokio::spawn(listener::serve_admin(
                admin_listener,
                app,
                admin_limits,
                shared.metrics.connections.clone(),
                shared.shutdown.clone(),
                shared.config.shutdown_grace,
            )))
        }
        None => None,
    };
    let grace = shared.config.shutdown_grace;
    let result = tokio::select! {
        served = serve => served.map_err(|e| BrokerError::Serve(e.to_string())),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_seconds = grace.as_secs_f64(), "in-flight calls did not finish within the grace period");
            Ok(())
        }
    };
    shared.shutdown.cancel();
    if let Some(mut admin) = admin {
        // Its requests hold the shared state, and with it the store: wait for them.
        // It ends its own connections after `grace`; the extra second covers that.
        let limit = grace.saturating_add(Duration::from_secs(1));
        if tokio::time::timeout(limit, &mut admin).await.is_err() {
            tracing::warn!("admin HTTP requests did not finish within the grace period");
            admin.abort();
            let _ = admin.await;
        }
    }
    store.close().await?;
    tracing::info!("broker stopped; store flushed");
    result
}
