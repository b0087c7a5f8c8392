//! The broker's Prometheus metrics (served by `http` on the admin listener).
//!
//! Two kinds:
//! - event metrics (counters, histograms) updated where the event happens: submission
//!   in `exchange`, pushes and acknowledgements in `session`, dead letters in
//!   `deadletter`, flushes in `commit`;
//! - state metrics (queue depth and oldest age per agency, connections, store size,
//!   readiness, certificate expiry) computed from the store and the hub at scrape time
//!   by [`StateCollector`], so they can never drift from the truth.
//!
//! Label values come from small fixed sets (refusal reasons, dead-letter outcomes,
//! certificate roles) or from registered agency codes; never from free text.
//! Every metric is listed in `docs/metrics.md`.

use std::path::Path;
use std::sync::{OnceLock, Weak};
use std::time::Duration;

use lienthong_proto::ProtocolError;
use lienthong_proto::pb::DeliveryState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Shared;
use crate::error::BrokerError;
use crate::store::StoreError;

/// One label with a value from a fixed set.
type FixedLabel = [(&'static str, &'static str); 1];

/// Why submissions are refused: the gRPC code the sender got, in snake case.
pub(crate) const REFUSAL_REASONS: [&str; 7] = [
    "unauthenticated",
    "permission_denied",
    "invalid_argument",
    "already_exists",
    "resource_exhausted",
    "unavailable",
    "internal",
];

/// The metric handles and their registry.
pub(crate) struct Metrics {
    registry: Registry,
    submissions_accepted: Counter,
    submissions_duplicate: Counter,
    submissions_refused: Family<FixedLabel, Counter>,
    submission_seconds: Histogram,
    deliveries: Counter,
    redeliveries: Counter,
    acknowledgements: Counter,
    delivery_seconds: Histogram,
    dead_letters: Family<FixedLabel, Counter>,
    pub(crate) connections: ConnectionMetrics,
    /// Configuration reloads (`reload`), by outcome (`ok`, `refused`).
    pub(crate) reloads: lienthong_proto::metrics::ReloadCounter,
    /// The certificates held, replaced by a reload.
    pub(crate) certificates: lienthong_proto::metrics::HeldCertificates,
}

/// Two labels, each with a value from a fixed set.
type FixedLabels2 = [(&'static str, &'static str); 2];

/// Connection and session metrics, shared with the listeners' accept loops
/// (`listener`) and the sessions (`session`, `hub`). Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct ConnectionMetrics {
    refused: Family<FixedLabels2, Counter>,
    accept_errors: Family<FixedLabels2, Counter>,
    open: Family<FixedLabel, Gauge>,
    handshakes: Gauge,
    session_conflicts: Counter,
    session_buffered_bytes: Gauge,
}

/// Refusal reasons of [`ConnectionMetrics::refused`].
pub(crate) const CONNECTION_REFUSALS: [&str; 4] = [
    "connection_limit",
    "handshake_evicted",
    "handshake_timeout",
    "tls_error",
];

/// Kinds of [`ConnectionMetrics::accept_error`].
pub(crate) const ACCEPT_ERRORS: [&str; 4] = ["emfile", "enfile", "nomem", "other"];

/// Counts an open connection while it lives.
pub(crate) struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl ConnectionMetrics {
    fn register(&self, registry: &mut Registry) {
        for listener in [crate::listener::GRPC, crate::listener::ADMIN] {
            for reason in CONNECTION_REFUSALS {
                self.refused
                    .get_or_create_owned(&[("listener", listener), ("reason", reason)]);
            }
            for kind in ACCEPT_ERRORS {
                self.accept_errors
                    .get_or_create_owned(&[("listener", listener), ("kind", kind)]);
            }
            self.open.get_or_create_owned(&[("listener", listener)]);
        }
        registry.register(
            "lienthong_broker_connections_refused",
            "Connections closed before being served, by listener and reason (connection_limit, \
             handshake_evicted, handshake_timeout, tls_error)",
            self.refused.clone(),
        );
        registry.register(
            "lienthong_broker_accept_errors",
            "Errors accepting connections, by listener and kind (emfile, enfile, nomem, other); \
             the listener backs off briefly after each",
            self.accept_errors.clone(),
        );
        registry.register(
            "lienthong_broker_connections_open",
            "Connections open, by listener (gRPC: authenticated TLS connections)",
            self.open.clone(),
        );
        registry.register(
            "lienthong_broker_tls_handshakes_in_progress",
            "gRPC connections accepted whose TLS handshake has not finished",
            self.handshakes.clone(),
        );
        registry.register(
            "lienthong_broker_session_conflicts",
            "Session calls refused because the agency already had a live session (a second \
             agent with the same certificate?)",
            self.session_conflicts.clone(),
        );
        registry.register(
            "lienthong_broker_session_buffered_bytes",
            "Bytes of deliveries queued in sessions' outgoing buffers, not yet taken by the transport",
            self.session_buffered_bytes.clone(),
        );
    }

    pub(crate) fn refused(&self, listener: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&[("listener", listener), ("reason", reason)])
            .inc();
    }

    pub(crate) fn accept_error(&self, listener: &'static str, kind: &'static str) {
        self.accept_errors
            .get_or_create(&[("listener", listener), ("kind", kind)])
            .inc();
    }

    pub(crate) fn connection_opened(&self, listener: &'static str) -> OpenConnection {
        let gauge = self.open.get_or_create(&[("listener", listener)]).clone();
        gauge.inc();
        OpenConnection(gauge)
    }

    pub(crate) fn handshake_started(&self) -> OpenConnection {
        self.handshakes.inc();
        OpenConnection(self.handshakes.clone())
    }

    pub(crate) fn session_conflict(&self) {
        self.session_conflicts.inc();
    }

    /// The gauge of bytes buffered in sessions (added and subtracted by `session`).
    pub(crate) fn session_buffered_bytes(&self) -> &Gauge {
        &self.session_buffered_bytes
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

/// Flush latency is observed in `commit`, which knows nothing of the broker around it;
/// so this one histogram is per process (shared by the brokers of a test process).
pub(crate) fn store_flush_seconds() -> &'static Histogram {
    static FLUSH: OnceLock<Histogram> = OnceLock::new();
    FLUSH.get_or_init(|| Histogram::new(exponential_buckets(0.0005, 2.0, 16)))
}

/// The refusal reason label for a submission that failed with `error`: the gRPC code
/// the caller received (see `error.rs`), from [`REFUSAL_REASONS`].
pub(crate) fn refusal_reason(error: &BrokerError) -> &'static str {
    match error {
        BrokerError::Unauthenticated(_) => "unauthenticated",
        BrokerError::PermissionDenied(_)
        | BrokerError::Protocol(ProtocolError::SignerNotSender { .. }) => "permission_denied",
        // NotFound cannot come out of a submission; counted with the bad requests.
        // A resume from the wrong offset is the caller's mistake, like a bad request.
        BrokerError::InvalidArgument(_)
        | BrokerError::Protocol(_)
        | BrokerError::NotFound(_)
        | BrokerError::ResumeConflict(_) => "invalid_argument",
        BrokerError::AlreadyExists(_) => "already_exists",
        BrokerError::ResourceExhausted(_)
        | BrokerError::TooLarge(_)
        | BrokerError::Store(StoreError::Commit(_)) => "resource_exhausted",
        BrokerError::Unavailable(_) | BrokerError::Spool(_) => "unavailable",
        BrokerError::Store(_) | BrokerError::Config { .. } | BrokerError::Serve(_) => "internal",
    }
}

impl Metrics {
    /// Registers every metric; `shared` is read at scrape time for the state metrics,
    /// `certificates` are (role, notAfter in Unix seconds) of the certificates held.
    pub(crate) fn new(shared: Weak<Shared>, certificates: Vec<(&'static str, i64)>) -> Self {
        let mut registry = Registry::default();
        let submissions_accepted = Counter::default();
        registry.register(
            "lienthong_broker_submissions_accepted",
            "Documents accepted (durable, submission receipt sent); duplicates not counted",
            submissions_accepted.clone(),
        );
        let submissions_duplicate = Counter::default();
        registry.register(
            "lienthong_broker_submissions_duplicate",
            "Resubmissions of an already accepted document, answered with the original receipt",
            submissions_duplicate.clone(),
        );
        let submissions_refused = Family::<FixedLabel, Counter>::default();
        for reason in REFUSAL_REASONS {
            submissions_refused.get_or_create_owned(&[("reason", reason)]);
        }
        registry.register(
            "lienthong_broker_submissions_refused",
            "Submissions refused, by reason (the gRPC status code sent)",
            submissions_refused.clone(),
        );
        let submission_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "lienthong_broker_submission_duration_seconds",
            "From the start of a submission request to its durable acceptance",
            submission_seconds.clone(),
        );
        let deliveries = Counter::default();
        registry.register(
            "lienthong_broker_deliveries",
            "Deliveries pushed to recipient agents, redeliveries included",
            deliveries.clone(),
        );
        let redeliveries = Counter::default();
        registry.register(
            "lienthong_broker_redeliveries",
            "Deliveries pushed again (attempt 2 or later)",
            redeliveries.clone(),
        );
        let acknowledgements = Counter::default();
        registry.register(
            "lienthong_broker_acknowledgements",
            "Deliveries settled by the recipient's verified delivery receipt",
            acknowledgements.clone(),
        );
        let delivery_seconds = Histogram::new([
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            14400.0, 86400.0,
        ]);
        registry.register(
            "lienthong_broker_delivery_duration_seconds",
            "End to end: from a document's acceptance to the recipient's verified delivery receipt",
            delivery_seconds.clone(),
        );
        let dead_letters = Family::<FixedLabel, Counter>::default();
        for outcome in ["expired", "refused"] {
            dead_letters.get_or_create_owned(&[("outcome", outcome)]);
        }
        registry.register(
            "lienthong_broker_dead_letters",
            "Deliveries that became dead letters, by outcome (expired, refused)",
            dead_letters.clone(),
        );
        registry.register(
            "lienthong_broker_store_flush_duration_seconds",
            "Group commit: one sled flush plus fdatasync of its data file (per process)",
            store_flush_seconds().clone(),
        );
        let connections = ConnectionMetrics::default();
        connections.register(&mut registry);
        registry.register_collector(Box::new(StateCollector { shared }));
        let certificates =
            lienthong_proto::metrics::register_certificates(&mut registry, certificates);
        let reloads = lienthong_proto::metrics::ReloadCounter::register(
            &mut registry,
            "lienthong_broker_reloads",
            "Configuration reloads (SIGHUP), by outcome: ok, or refused (the configuration in \
             force stays; the log says why)",
        );
        registry.register_collector(Box::new(lienthong_proto::metrics::ProcessCollector {
            role: "broker",
        }));
        Self {
            registry,
            submissions_accepted,
            submissions_duplicate,
            submissions_refused,
            submission_seconds,
            deliveries,
            redeliveries,
            acknowledgements,
            delivery_seconds,
            dead_letters,
            connections,
            reloads,
            certificates,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub(crate) fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::prometheus_text::encode(out, &self.registry)
    }

    pub(crate) fn submission_accepted(&self, duplicate: bool, took: Duration) {
        if duplicate {
            self.submissions_duplicate.inc();
        } else {
            self.submissions_accepted.inc();
            self.submission_seconds.observe(took.as_secs_f64());
        }
    }

    pub(crate) fn submission_refused(&self, error: &BrokerError) {
        self.submissions_refused
            .get_or_create(&[("reason", refusal_reason(error))])
            .inc();
    }

    /// A delivery was pushed; `attempt` counts from 1 across sessions.
    pub(crate) fn delivery_pushed(&self, attempt: u32) {
        self.deliveries.inc();
        if attempt > 1 {
            self.redeliveries.inc();
        }
    }

    /// A delivery of a document accepted at `accepted_at_ms` was settled by its receipt.
    pub(crate) fn acknowledged(&self, accepted_at_ms: i64) {
        self.acknowledgements.inc();
        let millis = lienthong_proto::now_ms()
            .saturating_sub(accepted_at_ms)
            .max(0);
        self.delivery_seconds.observe(millis as f64 / 1000.0);
    }

    pub(crate) fn dead_letter(&self, state: DeliveryState) {
        let outcome = if state == DeliveryState::Refused {
            "refused"
        } else {
            "expired"
        };
        self.dead_letters
            .get_or_create(&[("outcome", outcome)])
            .inc();
    }
}

/// State metrics, read from the store and the hub on each scrape.
struct StateCollector {
    shared: Weak<Shared>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCollector")
    }
}

/// Writes one gauge without labels.
fn gauge<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: N,
) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

/// Writes one gauge with one label, a value per label value.
fn gauge_family<N: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: impl IntoIterator<Item = (String, N)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (value_label, value) in values {
        let labels = [(label, value_label.as_str())];
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Bytes of the files under `dir` (sled's data file, config, blobs, snapshots).
fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => dir_size(&entry.path()),
            Ok(_) => entry.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Per agency: (code, pending documents, pending bytes, oldest pending age in seconds,
/// connected, dead letters held).
type QueueRow = (String, u64, u64, f64, i64, u64);

fn queue_rows(shared: &Shared) -> Vec<QueueRow> {
    let agencies = match shared.store.agencies() {
        Ok(agencies) => agencies,
        Err(error) => {
            tracing::warn!(%error, "metrics: cannot list agencies");
            return Vec::new();
        }
    };
    let now = lienthong_proto::now_ms();
    agencies
        .into_iter()
        .filter_map(|(code, _)| match shared.store.queue_stats(&code) {
            Ok(stats) => {
                let age = stats
                    .oldest_enqueued_ms
                    .map(|t| now.saturating_sub(t).max(0) as f64 / 1000.0)
                    .unwrap_or(0.0);
                let connected = i64::from(shared.hub.info(&code).is_some());
                let dead = shared.store.dead_letter_count(&code);
                Some((
                    code,
                    stats.pending,
                    stats.pending_bytes,
                    age,
                    connected,
                    dead,
                ))
            }
            Err(error) => {
                tracing::warn!(%error, agency = %code, "metrics: cannot read a queue");
                None
            }
        })
        .collect()
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        let e = &mut encoder;
        let ready = crate::not_ready_reason(&shared).is_none() && !shared.shutdown.is_cancelled();
        gauge(
            e,
            "lienthong_broker_ready",
            "1 when the broker accepts documents (store writable, disk above the reserve, serving).",
            i64::from(ready),
        )?;
        let crls = shared.revocation.loaded();
        gauge(
            e,
            "lienthong_broker_crls",
            "CRLs in force (crl_files).",
            crls.lists.infos().len() as i64,
        )?;
        gauge(
            e,
            "lienthong_broker_crl_refresh_failed",
            "1 while the last refresh of the CRL files failed (the previous CRLs stay in force).",
            i64::from(crls.error.is_some()),
        )?;
        gauge(
            e,
            "lienthong_broker_crls_stale",
            "CRLs past their nextUpdate plus crl_stale_grace: their CAs' certificates are refused.",
            crate::revocation::stale(
                &crls,
                shared.config.crl_stale_grace,
                lienthong_proto::now_ms(),
            )
            .len() as i64,
        )?;
        gauge(
            e,
            "lienthong_broker_store_writable",
            "0 after a failed flush: the store then refuses writes.",
            i64::from(shared.store.is_writable()),
        )?;
        gauge(
            e,
            "lienthong_broker_store_size_bytes",
            "Bytes of the store's files on disk.",
            dir_size(&shared.config.data_dir),
        )?;
        gauge(
            e,
            "lienthong_broker_store_free_bytes",
            "Bytes free for the broker on the store's filesystem.",
            shared.store.free_bytes().unwrap_or(0),
        )?;
        gauge(
            e,
            "lienthong_broker_disk_reserve_bytes",
            "Bytes the broker keeps free on the store's filesystem (min_free_bytes): below it, documents are refused and the broker is not ready.",
            shared.config.min_free_bytes,
        )?;
        gauge(
            e,
            "lienthong_broker_partial_upload_bytes",
            "Bytes held in partial uploads of streamed documents (open or left by ended streams).",
            crate::admission::partial_bytes(&shared.store.blob_root().join("partial")),
        )?;
        gauge(
            e,
            "lienthong_broker_store_documents",
            "Documents held in the store.",
            shared.store.document_count() as u64,
        )?;
        gauge(
            e,
            "lienthong_broker_connected_agents",
            "Agencies with a live session.",
            shared.hub.session_count() as u64,
        )?;
        let rows = queue_rows(&shared);
        gauge_family(
            e,
            "lienthong_broker_agency_connected",
            "1 when the registered agency has a live session, else 0.",
            "agency",
            rows.iter().map(|r| (r.0.clone(), r.4)),
        )?;
        gauge_family(
            e,
            "lienthong_broker_queue_pending_documents",
            "Deliveries waiting for the agency's delivery receipt.",
            "agency",
            rows.iter().map(|r| (r.0.clone(), r.1)),
        )?;
        gauge_family(
            e,
            "lienthong_broker_queue_pending_bytes",
            "Bytes of the documents waiting for the agency.",
            "agency",
            rows.iter().map(|r| (r.0.clone(), r.2)),
        )?;
        gauge_family(
            e,
            "lienthong_broker_queue_oldest_pending_seconds",
            "Age of the agency's oldest pending delivery (0 when none).",
            "agency",
            rows.iter().map(|r| (r.0.clone(), r.3)),
        )?;
        gauge_family(
            e,
            "lienthong_broker_agency_dead_letters",
            "Dead letters to the agency held now (expired or refused, not redriven).",
            "agency",
            rows.iter().map(|r| (r.0.clone(), r.5)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_from_the_fixed_set() {
        let errors = [
            BrokerError::Unauthenticated("x".into()),
            BrokerError::PermissionDenied("x".into()),
            BrokerError::InvalidArgument("x".into()),
            BrokerError::AlreadyExists("x".into()),
            BrokerError::ResourceExhausted("x".into()),
            BrokerError::NotFound("x".into()),
            BrokerError::Unavailable("x".into()),
            BrokerError::Serve("x".into()),
        ];
        for error in &errors {
            assert!(
                REFUSAL_REASONS.contains(&refusal_reason(error)),
                "{error:?}"
            );
        }
        assert_eq!(
            refusal_reason(&BrokerError::Store(StoreError::Corrupt("x".into()))),
            "internal"
        );
    }
}
