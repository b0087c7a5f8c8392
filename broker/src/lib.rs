//! lienthong-broker: the central broker of a lienthong exchange.
//!
//! Layout:
//! - [`run`] serves the gRPC services on a listener the caller bound, until shutdown;
//!   [`run_with_admin`] also serves the admin HTTP listener (`http`: `/metrics`,
//!   `/healthz`, `/readyz`; `metrics`: what is measured).
//! - `exchange`: submission, agent sessions and status (agency certificates).
//! - `admin`: queue views for operators (operator certificates).
//! - `session`: pushing one recipient's queue with a bounded window.
//! - `hub`: which agencies have a live session.
//! - [`store`]: sled trees and the submission transaction; `commit`: group commit.
//! - `auth`: the caller's identity from its TLS certificate.
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
mod metrics;
mod recall;
mod recent;
pub mod records;
mod session;
pub mod store;

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

/// HTTP/2 flow-control windows (bytes) for the Exchange service.
pub const HTTP2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const HTTP2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

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
}

impl BrokerConfig {
    pub fn new(tls: TlsFiles, data_dir: PathBuf) -> Self {
        Self {
            name: "broker".into(),
            tls,
            document_anchors: None,
            data_dir,
            agencies: Vec::new(),
            auto_register: true,
            max_document_bytes: 2 * 1024 * 1024 * 1024,
            window: 128,
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
            max_submissions_per_agency: 16,
            max_reserved_bytes_per_agency: 4 * 1024 * 1024 * 1024,
            stall_timeout: Duration::from_secs(60),
            partial_sweep_interval: Duration::from_secs(60),
            max_pending_per_sender_documents: None,
            max_pending_per_sender_bytes: None,
            max_expiry: Duration::from_secs(30 * 24 * 3600),
            max_clock_skew: Duration::from_secs(5 * 60),
            max_document_age: Duration::from_secs(30 * 24 * 3600),
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
    fn max_message_bytes(&self) -> usize {
        usize::try_from(lienthong_proto::document::STREAMED_THRESHOLD)
            .unwrap_or(usize::MAX)
            .saturating_add(8 * 1024 * 1024)
    }
}

/// Message ids being stored right now, so two concurrent submissions of the same id
/// cannot interleave their attachment writes.
#[derive(Default)]
struct InProgress(Mutex<HashSet<String>>);

struct InProgressGuard<'a> {
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

/// State shared by the services and sessions.
struct Shared {
    config: BrokerConfig,
    store: store::Store,
    hub: hub::Hub,
    signing_key: SigningKey,
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
/// its `/api`, which can redrive dead letters). Only the dashboard's `/api` can be
/// protected (`admin_token`); bind it to loopback or a monitoring network. It stops when
/// shutdown begins.
pub async fn run_with_admin(
    config: BrokerConfig,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), BrokerError> {
    install_crypto_provider();
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
        store.register_agency(code.as_str(), name, false, lienthong_proto::now_ms())?;
    }
    let local_addr = listener.local_addr().ok();
    let certificates = held_certificates(&config.tls, &signing_key);
    let shared = Arc::new_cyclic(|weak| Shared {
        store: store.clone(),
        hub: hub::Hub::default(),
        signing_key,
        document_anchors,
        in_progress: InProgress::default(),
        writing_bytes: std::sync::atomic::AtomicU64::new(0),
        space_needed: std::sync::atomic::AtomicU64::new(0),
        shutdown: shutdown.child_token(),
        metrics: metrics::Metrics::new(weak.clone(), certificates),
        admission: admission::Admission::default(),
        config,
    });
    tokio::spawn(deadletter::expiry_loop(shared.clone()));
    tokio::spawn(admission::sweep_loop(shared.clone()));
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
        addr = ?local_addr,
        data_dir = %shared.config.data_dir.display(),
        documents = store.document_count(),
        "broker listening"
    );
    let serve = tonic::transport::Server::builder()
        .tls_config(shared.config.tls.server_config())
        .map_err(|e| BrokerError::Serve(e.to_string()))?
        .http2_keepalive_interval(Some(shared.config.keepalive_interval))
        .http2_keepalive_timeout(Some(shared.config.keepalive_timeout))
        // WAN links have large bandwidth-delay products: start with windows that fill
        // ~100 Mbit/s at 300 ms round trip, and let h2 grow them from its BDP estimate.
        .initial_stream_window_size(Some(crate::HTTP2_STREAM_WINDOW))
        .initial_connection_window_size(Some(crate::HTTP2_CONNECTION_WINDOW))
        .http2_adaptive_window(Some(true))
        .add_service(exchange)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // Small messages (receipts, acknowledgements) must not wait for Nagle; tonic
            // sets this only on listeners it binds itself.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled(),
        );
    let admin = admin_listener.map(|admin_listener| {
        tracing::info!(addr = ?admin_listener.local_addr().ok(), "admin HTTP listening");
        let app = http::router(shared.clone());
        let stop = shared.shutdown.clone().cancelled_owned();
        tokio::spawn(async move {
            let served = axum::serve(admin_listener, app).with_graceful_shutdown(stop);
            if let Err(error) = served.await {
                tracing::error!(%error, "admin HTTP listener failed");
            }
        })
    });
    let grace = shared.config.shutdown_grace;
    let result = tokio::select! {
        served = serve => served.map_err(|e| BrokerError::Serve(e.to_string())),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight calls did not finish within the grace period");
            Ok(())
        }
    };
    shared.shutdown.cancel();
    if let Some(mut admin) = admin {
        // Its requests hold the shared state, and with it the store: wait for them.
        if tokio::time::timeout(grace, &mut admin).await.is_err() {
            tracing::warn!("admin HTTP requests did not finish within the grace period");
            admin.abort();
            let _ = admin.await;
        }
    }
    store.close().await?;
    tracing::info!("broker stopped; store flushed");
    result
}
