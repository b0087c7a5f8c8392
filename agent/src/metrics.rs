//! The agent's Prometheus metrics, served at `GET /metrics` on the local API.
//!
//! Counters and the session gauge are updated where things happen (`api`, `outbox`,
//! `session`); the outbox gauges start from a count of the store and follow every
//! change; certificate expiry and the bytes of the file spool are computed at scrape
//! time. Every metric is listed in
//! `docs/metrics.md`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use crate::store::OutboxState;

/// One label with a value from a fixed set.
type FixedLabel = [(&'static str, &'static str); 1];

/// How one submission attempt to the broker ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SubmissionOutcome {
    /// Accepted: the broker's submission receipt is stored.
    Ok,
    /// Refused for good (a permanent gRPC code): the document is `failed`.
    Refused,
    /// Failed for now (unreachable or a retryable code): it will be submitted again.
    Retried,
}

/// Which gRPC call carried a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubmitCall {
    /// `SubmitBatch`: any number of whole documents.
    Batch,
    /// `Submit`: one document (streamed ones, or a broker without batches).
    Single,
}

pub(crate) struct Metrics {
    registry: Registry,
    outbox: Family<FixedLabel, Gauge>,
    submissions: Family<FixedLabel, Counter>,
    submit_calls: Family<FixedLabel, Counter>,
    received: Counter,
    duplicates: Counter,
    refused: Counter,
    session_connected: Gauge,
    /// Key reloads (`reload`), by outcome (`ok`, `refused`).
    reloads: lienthong_proto::metrics::ReloadCounter,
    /// The certificates held, replaced by a reload.
    certificates: lienthong_proto::metrics::HeldCertificates,
}

impl Metrics {
    /// `outbox` = (outbox, submitted, failed) counted in the store at start;
    /// `certificates` = (role, notAfter in Unix seconds) of the certificates held.
    /// `files`: the spool whose bytes are reported at scrape.
    pub(crate) fn new(
        outbox_counts: (u64, u64, u64),
        certificates: Vec<(&'static str, i64)>,
        files: crate::files::Files,
    ) -> Self {
        let mut registry = Registry::default();
        let outbox = Family::<FixedLabel, Gauge>::default();
        for (state, count) in [
            (OutboxState::Outbox, outbox_counts.0),
            (OutboxState::Submitted, outbox_counts.1),
            (OutboxState::Failed, outbox_counts.2),
        ] {
            outbox
                .get_or_create_owned(&[("state", state.as_str())])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        registry.register(
            "lienthong_agent_outbox_documents",
            "Documents this agency sent, by state (outbox = waiting for the broker, submitted, failed)",
            outbox.clone(),
        );
        let submissions = Family::<FixedLabel, Counter>::default();
        for outcome in ["ok", "refused", "retried"] {
            submissions.get_or_create_owned(&[("outcome", outcome)]);
        }
        registry.register(
            "lienthong_agent_submissions",
            "Submission attempts to the broker, by outcome (ok, refused for good, retried later)",
            submissions.clone(),
        );
        let submit_calls = Family::<FixedLabel, Counter>::default();
        for call in ["batch", "single"] {
            submit_calls.get_or_create_owned(&[("call", call)]);
        }
        registry.register(
            "lienthong_agent_submit_calls",
            "gRPC calls that carried submissions to the broker: batch (SubmitBatch) or single (Submit)",
            submit_calls.clone(),
        );
        let received = Counter::default();
        registry.register(
            "lienthong_agent_deliveries_received",
            "Documents received, verified, stored and exported (first delivery of each)",
            received.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "lienthong_agent_deliveries_duplicate",
            "Redeliveries of a document already stored, acknowledged again",
            duplicates.clone(),
        );
        let refused = Counter::default();
        registry.register(
            "lienthong_agent_deliveries_refused",
            "Deliveries refused (failed verification, not a recipient, message id reused)",
            refused.clone(),
        );
        let session_connected = Gauge::default();
        registry.register(
            "lienthong_agent_session_connected",
            "1 while the session with the broker is established, else 0",
            session_connected.clone(),
        );
        let certificates =
            lienthong_proto::metrics::register_certificates(&mut registry, certificates);
        let reloads = lienthong_proto::metrics::ReloadCounter::register(
            &mut registry,
            "lienthong_agent_reloads",
            "Key reloads (SIGHUP), by outcome: ok, or refused (the keys in force stay; the log \
             says why)",
        );
        registry.register_collector(Box::new(lienthong_proto::metrics::ProcessCollector {
            role: "agent",
        }));
        registry.register_collector(Box::new(SpoolCollector { files }));
        Self {
            registry,
            outbox,
            submissions,
            submit_calls,
            received,
            duplicates,
            refused,
            session_connected,
            reloads,
            certificates,
        }
    }

    /// A reload took (`true`) or was refused.
    pub(crate) fn reload(&self, ok: bool) {
        self.reloads.record(ok);
    }

    /// The certificates held after a reload.
    pub(crate) fn set_certificates(&self, held: Vec<(&'static str, i64)>) {
        *self
            .certificates
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = held;
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub(crate) fn encode(&self, out: &mut String) -> std::fmt::Result {
        prometheus_client::encoding::prometheus_text::encode(out, &self.registry)
    }

    /// A document entered the outbox.
    pub(crate) fn outbox_added(&self) {
        self.outbox
            .get_or_create(&[("state", OutboxState::Outbox.as_str())])
            .inc();
    }

    /// A submission call is about to be made.
    pub(crate) fn submit_call(&self, call: SubmitCall) {
        let label = match call {
            SubmitCall::Batch => "batch",
            SubmitCall::Single => "single",
        };
        self.submit_calls.get_or_create(&[("call", label)]).inc();
    }

    /// A submission attempt ended; an outbox document moved when it was final.
    pub(crate) fn submission(&self, outcome: SubmissionOutcome) {
        let (label, moved_to) = match outcome {
            SubmissionOutcome::Ok => ("ok", Some(OutboxState::Submitted)),
            SubmissionOutcome::Refused => ("refused", Some(OutboxState::Failed)),
            SubmissionOutcome::Retried => ("retried", None),
        };
        self.submissions.get_or_create(&[("outcome", label)]).inc();
        if let Some(state) = moved_to {
            self.outbox
                .get_or_create(&[("state", OutboxState::Outbox.as_str())])
                .dec();
            self.outbox
                .get_or_create(&[("state", state.as_str())])
                .inc();
        }
    }

    pub(crate) fn delivery_received(&self) {
        self.received.inc();
    }

    pub(crate) fn delivery_duplicate(&self) {
        self.duplicates.inc();
    }

    pub(crate) fn delivery_refused(&self) {
        self.refused.inc();
    }

    /// Sets the session gauge to 1 until the returned guard drops.
    pub(crate) fn session_up(&self) -> SessionUp<'_> {
        self.session_connected.set(1);
        SessionUp(&self.session_connected)
    }
}

/// Holds the session gauge at 1; 0 again when dropped (the session ended).
pub(crate) struct SessionUp<'a>(&'a Gauge);

impl Drop for SessionUp<'_> {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

/// `lienthong_agent_spool_bytes`, read from the folders on each scrape (so it cannot
/// drift from what is on disk).
#[derive(Debug)]
struct SpoolCollector {
    files: crate::files::Files,
}

impl Collector for SpoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (uploads, outbox) = self.files.spool_bytes();
        let mut metric = encoder.encode_descriptor(
            "lienthong_agent_spool_bytes",
            "Bytes of attachment files on disk, by area: uploads (not yet taken into a document, counted against max_outbox_bytes, swept after upload_max_age) and outbox (streamed documents waiting for the broker)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (area, bytes) in [("uploads", uploads), ("outbox", outbox)] {
            let labels = [("area", area)];
            ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX))
                .encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
