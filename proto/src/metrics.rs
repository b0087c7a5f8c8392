//! Prometheus metrics that the broker and the agent both expose, computed at each
//! scrape: `lienthong_build_info`, what the process costs the machine (`process_*`,
//! read from `/proc/self`, named as Prometheus's own clients name them so the usual
//! dashboards and alerts work unchanged) and when each certificate held expires.
//!
//! Every process figure is optional: a platform without `/proc`, or a file that cannot
//! be read or parsed, leaves that figure out of the scrape instead of failing it.

use std::fs;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The process's resource use at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// Resident set size.
    pub resident_memory_bytes: Option<u64>,
    /// Open file descriptors (sockets included).
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// User and system CPU time since the process started.
    pub cpu_seconds: Option<f64>,
    /// When the process started, in Unix seconds.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads the figures of the calling process.
    pub fn read() -> Self {
        let stat = fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields_after_name);
        let ticks = clock_ticks_per_second();
        let field =
            |index: usize| -> Option<u64> { fields.as_ref()?.get(index)?.parse::<u64>().ok() };
        // Field numbers of proc(5), counted from the state (field 3) as index 0.
        let utime = field(14 - 3);
        let stime = field(15 - 3);
        let start_ticks = field(22 - 3);
        let rss_pages = field(24 - 3);
        let cpu_seconds = match (utime, stime, ticks) {
            (Some(u), Some(s), Some(t)) => Some(u.saturating_add(s) as f64 / t as f64),
            _ => None,
        };
        let start_time_seconds = match (start_ticks, ticks, boot_time_seconds()) {
            (Some(start), Some(t), Some(boot)) => Some(boot as f64 + start as f64 / t as f64),
            _ => None,
        };
        let page = rustix::param::page_size() as u64;
        Self {
            resident_memory_bytes: rss_pages.and_then(|p| p.checked_mul(page)),
            open_fds: fs::read_dir("/proc/self/fd")
                .ok()
                .map(|entries| entries.count() as u64),
            max_fds: rustix::process::getrlimit(rustix::process::Resource::Nofile).current,
            cpu_seconds,
            start_time_seconds,
        }
    }
}

/// Exposes `lienthong_build_info{role, version}` (always 1, for joining and for
/// spotting a fleet on mixed versions) and the `process_*` metrics at each scrape.
#[derive(Debug)]
pub struct ProcessCollector {
    /// `broker` or `agent`.
    pub role: &'static str,
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut info = encoder.encode_descriptor(
            "lienthong_build_info",
            "Always 1; the labels name the program's role and version.",
            None,
            MetricType::Gauge,
        )?;
        let labels = [("role", self.role), ("version", env!("CARGO_PKG_VERSION"))];
        ConstGauge::new(1i64).encode(info.encode_family(&labels)?)?;
        let stats = ProcessStats::read();
        let gauges: [(&str, &str, Option<f64>); 4] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                stats.resident_memory_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                stats.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit).",
                stats.max_fds.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds.",
                stats.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        if let Some(seconds) = stats.cpu_seconds {
            // prometheus-client adds the `_total` suffix to counters.
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// The certificates a program holds, by role (`tls`, `ca`, `seal`...), with their
/// notAfter in Unix seconds: `lienthong_certificate_not_after_timestamp_seconds` (for
/// alerts that compare with `time()`) and `lienthong_certificate_expiry_seconds` (the
/// seconds left, negative once expired). The list is shared so that a program that
/// reloads its certificates (SIGHUP) can replace it.
#[derive(Debug)]
pub struct CertificateCollector {
    pub certificates: HeldCertificates,
}

/// Configuration reloads by outcome (`ok`, `refused`), both exposed from start: the
/// broker's and the agent's `SIGHUP`.
#[derive(Debug, Clone, Default)]
pub struct ReloadCounter(
    prometheus_client::metrics::family::Family<
        [(&'static str, &'static str); 1],
        prometheus_client::metrics::counter::Counter,
    >,
);

impl ReloadCounter {
    /// Registers the counter as `name` (exposed as `name_total`).
    pub fn register(
        registry: &mut prometheus_client::registry::Registry,
        name: &str,
        help: &str,
    ) -> Self {
        let counter = Self::default();
        for outcome in ["ok", "refused"] {
            counter.0.get_or_create_owned(&[("outcome", outcome)]);
        }
        registry.register(name, help, counter.0.clone());
        counter
    }

    /// A reload took (`true`) or was refused.
    pub fn record(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "refused" };
        self.0.get_or_create(&[("outcome", outcome)]).inc();
    }
}

/// Registers a [`CertificateCollector`] over `certificates`; returns the list, which a
/// reload replaces.
pub fn register_certificates(
    registry: &mut prometheus_client::registry::Registry,
    certificates: Vec<(&'static str, i64)>,
) -> HeldCertificates {
    let held: HeldCertificates = std::sync::Arc::new(std::sync::RwLock::new(certificates));
    registry.register_collector(Box::new(CertificateCollector {
        certificates: held.clone(),
    }));
    held
}

/// (role, notAfter in Unix seconds) of the certificates a program holds now.
pub type HeldCertificates = std::sync::Arc<std::sync::RwLock<Vec<(&'static str, i64)>>>;

impl Collector for CertificateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let now_s = crate::now_ms() / 1000;
        let certificates = self
            .certificates
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut metric = encoder.encode_descriptor(
            "lienthong_certificate_not_after_timestamp_seconds",
            "The certificate's notAfter in Unix seconds, by role.",
            None,
            MetricType::Gauge,
        )?;
        for (role, at) in &certificates {
            ConstGauge::new(*at).encode(metric.encode_family(&[("certificate", *role)])?)?;
        }
        let mut metric = encoder.encode_descriptor(
            "lienthong_certificate_expiry_seconds",
            "Seconds until the certificate's notAfter (negative once expired), by role.",
            None,
            MetricType::Gauge,
        )?;
        for (role, at) in &certificates {
            ConstGauge::new(at.saturating_sub(now_s))
                .encode(metric.encode_family(&[("certificate", *role)])?)?;
        }
        Ok(())
    }
}

/// notAfter of a DER certificate, in Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, cert)| cert.validity().not_after.timestamp())
}

/// The fields of `/proc/self/stat` after the command name, which is in parentheses and
/// may itself hold spaces and parentheses (so split after its last `)`).
fn stat_fields_after_name(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

fn clock_ticks_per_second() -> Option<u64> {
    let ticks = rustix::param::clock_ticks_per_second();
    (ticks > 0).then_some(ticks)
}

/// The `btime` line of `/proc/stat`: when the machine booted, in Unix seconds.
fn boot_time_seconds() -> Option<u64> {
    fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_writes_build_info_and_process_metrics() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector { role: "broker" }));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "lienthong_build_info{{role=\"broker\",version=\"{version}\"}} 1"
            )),
            "{text}"
        );
        for name in [
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(name), "{name} missing in {text}");
        }
    }

    #[test]
    fn the_name_may_hold_spaces_and_parentheses() {
        let fields = stat_fields_after_name("42 (a (b) c) S 1 2 3").unwrap();
        assert_eq!(fields, ["S", "1", "2", "3"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_reports_memory_descriptors_and_time() {
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        let during = ProcessStats::read();
        drop(file);
        assert!(during.resident_memory_bytes.unwrap() > 1024 * 1024);
        // At least the file above (other tests of this binary open and close theirs).
        assert!(during.open_fds.unwrap() >= 1);
        assert!(during.max_fds.unwrap() >= during.open_fds.unwrap());
        let started = during.start_time_seconds.unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            started <= now + 1.0 && started > now - 24.0 * 3600.0,
            "{started} vs {now}"
        );
        assert!(during.cpu_seconds.unwrap() >= 0.0);
    }
}
