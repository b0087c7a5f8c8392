//! `lienthong broker`: run the central broker until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use lienthong_broker::BrokerConfig;
use lienthong_proto::tls::TlsFiles;
use lienthong_proto::{AgencyCode, TrustAnchors};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Problems, relative_to, required};
use crate::error::CliError;

#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// TOML configuration file; keys are the long flag names.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the configuration (flags, file and the files it names: CA, certificate,
    /// key and that they match, token files) without starting: print one OK line and
    /// exit 0, or list every problem and exit 2.
    #[arg(long)]
    check_config: bool,
    /// Address for agents (gRPC over mutual TLS). Default 127.0.0.1:7443.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address for the admin HTTP listener: GET /metrics (Prometheus), /healthz and
    /// /readyz. Plain HTTP without authentication: give a loopback address (e.g.
    /// 127.0.0.1:9443) or one reachable only from the monitoring network. Default: none.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<SocketAddr>,
    /// Deprecated: the token shows in `ps`; use --admin-token-file.
    #[arg(long, value_name = "TOKEN", hide = true)]
    admin_token: Option<String>,
    /// File of operator bearer tokens for the dashboard and its /api on the admin
    /// listener (`Authorization: Bearer TOKEN`; open the page as `/#token=TOKEN`): one
    /// per line, `name:token` (the name goes into the audit log) or a bare token; mode
    /// 0600 (refused when group- or world-readable). /metrics, /healthz, /readyz stay open.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// Let the admin listener (plain HTTP) bind to a non-loopback address; needs
    /// --admin-token-file. Without it such an address is refused.
    #[arg(long)]
    admin_insecure_bind: bool,
    /// Seconds a gRPC connection has to finish its TLS handshake (default 10).
    #[arg(long, value_name = "SECS")]
    tls_handshake_timeout_secs: Option<u64>,
    /// Seconds to start HTTP/2 after the handshake, and for an admin request's head
    /// (default 10).
    #[arg(long, value_name = "SECS")]
    http_header_timeout_secs: Option<u64>,
    /// Most gRPC connections open at once (default 16384; lowered to fit the open-file
    /// limit).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most gRPC connections in their TLS handshake at once (default 256; lowered to
    /// fit the open-file limit).
    #[arg(long)]
    max_handshakes: Option<usize>,
    /// Data directory (sled store). Required.
    #[arg(long)]
    data: Option<PathBuf>,
    /// CA bundle (PEM) for client certificates and, unless --document-ca is given,
    /// document signatures. Required.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Broker certificate chain (PEM). Required.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Broker private key (PKCS#8 PEM), matching --cert. Required.
    #[arg(long)]
    key: Option<PathBuf>,
    /// CA bundle for document signatures, when it differs from --ca.
    #[arg(long)]
    document_ca: Option<PathBuf>,
    /// Register an agency at start: CODE or CODE=NAME (repeatable).
    #[arg(long = "register", value_name = "CODE[=NAME]")]
    register: Vec<String>,
    /// Refuse agencies that are not registered instead of registering them on their
    /// first authenticated connection.
    #[arg(long)]
    no_auto_register: bool,
    /// Largest total attachment size of one document, in bytes (default 2147483648,
    /// 2 GiB).
    #[arg(long)]
    max_document_bytes: Option<u64>,
    /// Seconds to wait for an acknowledgement before offering a delivery again (default
    /// 30; doubled per attempt up to 5 minutes).
    #[arg(long)]
    ack_timeout_secs: Option<u64>,
    /// Deliveries one agent session may have unacknowledged at once, 1 to 16384
    /// (default 512); an agent's own, smaller window wins. A window holds whole batches
    /// in flight; the broker's memory per busy session grows with it.
    #[arg(long, value_name = "N")]
    window: Option<u32>,
    /// Most documents in one SubmitBatch call, 1 to 16384 (default 1024); a larger
    /// batch is refused whole before anything is stored. Agents send up to 256 per
    /// call: below that their batches are refused and go one document per Submit.
    #[arg(long, value_name = "N")]
    max_batch_documents: Option<usize>,
    /// Name used in the broker's receipts (default broker).
    #[arg(long)]
    name: Option<String>,
    /// Default expiry in hours by priority 0..4, comma separated (default 168,72,24,8,8).
    #[arg(long, value_delimiter = ',')]
    expiry_hours: Option<Vec<u64>>,
    /// Most documents queued for one recipient before submissions to it are refused
    /// (default 1000000).
    #[arg(long)]
    max_pending_documents: Option<u64>,
    /// Most bytes queued for one recipient before submissions to it are refused (default
    /// 53687091200, 50 GiB).
    #[arg(long)]
    max_pending_bytes: Option<u64>,
    /// Free disk space kept in reserve: submissions that would leave less are refused
    /// (default 536870912, 512 MiB).
    #[arg(long)]
    min_free_bytes: Option<u64>,
    /// Most submissions one agency may have open at once (default 16).
    #[arg(long)]
    max_submissions_per_agency: Option<u32>,
    /// Most bytes one agency's open submissions may reserve (default 4 GiB).
    #[arg(long)]
    max_reserved_bytes_per_agency: Option<u64>,
    /// Seconds a submission stream may send nothing before it is ended (default 60).
    #[arg(long)]
    stall_timeout_secs: Option<u64>,
    /// Seconds between sweeps of stale partial uploads (default 60).
    #[arg(long)]
    partial_sweep_interval_secs: Option<u64>,
    /// A CRL file (PEM or DER) for TLS clients and document signers; repeat for several
    /// CAs. Re-read every --crl-refresh-secs and on `lienthong admin crls reload`.
    #[arg(long = "crl-file", value_name = "FILE")]
    crl_file: Vec<PathBuf>,
    /// Seconds between re-reads of the CRL files (default 3600).
    #[arg(long)]
    crl_refresh_secs: Option<u64>,
    /// Seconds past its nextUpdate a CRL is still used (default 0: a stale CRL's
    /// certificates are refused at once).
    #[arg(long)]
    crl_stale_grace_secs: Option<u64>,
    /// Most documents one sender may have queued for one recipient (default: a quarter
    /// of --max-pending-documents).
    #[arg(long)]
    max_pending_per_sender_documents: Option<u64>,
    /// Most bytes one sender may have queued for one recipient (default: a quarter of
    /// --max-pending-bytes).
    #[arg(long)]
    max_pending_per_sender_bytes: Option<u64>,
    /// The furthest expiry a sender may set, in hours from submission (default 720).
    #[arg(long)]
    max_expiry_hours: Option<u64>,
    /// How far ahead of the broker's clock a document's creation time may be, in
    /// seconds (default 300).
    #[arg(long)]
    max_clock_skew_secs: Option<u64>,
    /// How old a document may be when submitted, in hours (default 720).
    #[arg(long)]
    max_document_age_hours: Option<u64>,
}

impl BrokerArgs {
    /// The `--config` file, read early for its `log_format`.
    pub(crate) fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BrokerFile {
    /// Read before tracing starts (`logging::format_from_config`); declared here so
    /// that the key is accepted and its value checked with the rest of the file.
    #[allow(dead_code)]
    log_format: Option<crate::logging::LogFormat>,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    admin_token: Option<String>,
    admin_token_file: Option<PathBuf>,
    admin_insecure_bind: Option<bool>,
    tls_handshake_timeout_secs: Option<u64>,
    http_header_timeout_secs: Option<u64>,
    max_connections: Option<usize>,
    max_handshakes: Option<usize>,
    data: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    document_ca: Option<PathBuf>,
    #[serde(default)]
    register: Vec<String>,
    no_auto_register: Option<bool>,
    max_document_bytes: Option<u64>,
    ack_timeout_secs: Option<u64>,
    window: Option<u32>,
    max_batch_documents: Option<usize>,
    name: Option<String>,
    expiry_hours: Option<Vec<u64>>,
    max_pending_documents: Option<u64>,
    max_pending_bytes: Option<u64>,
    min_free_bytes: Option<u64>,
    max_submissions_per_agency: Option<u32>,
    max_reserved_bytes_per_agency: Option<u64>,
    stall_timeout_secs: Option<u64>,
    partial_sweep_interval_secs: Option<u64>,
    max_pending_per_sender_documents: Option<u64>,
    max_pending_per_sender_bytes: Option<u64>,
    max_expiry_hours: Option<u64>,
    max_clock_skew_secs: Option<u64>,
    max_document_age_hours: Option<u64>,
    #[serde(default)]
    crl_file: Vec<PathBuf>,
    crl_refresh_secs: Option<u64>,
    crl_stale_grace_secs: Option<u64>,
}

/// The keys the `--config` file takes (for `lienthong docs configuration`).
pub(crate) fn config_keys() -> &'static [&'static str] {
    crate::config::keys::<BrokerFile>()
}

/// The largest `--window` (deliveries unacknowledged per session), for broker and agent.
pub(crate) const MAX_WINDOW: u32 = 16_384;

/// The largest `--max-batch-documents`.
pub(crate) const MAX_BATCH_DOCUMENTS: usize = 16_384;

/// `value` of `--name` if it lies in `min..=max`, else a usage error naming the flag,
/// the bounds and what the number counts.
pub(crate) fn in_range<T>(value: T, name: &str, min: T, max: T, counts: &str) -> Result<T, CliError>
where
    T: PartialOrd + std::fmt::Display + Copy,
{
    if value < min || value > max {
        return Err(CliError::Usage(format!(
            "--{name} must be from {min} to {max} ({counts}), not {value}"
        )));
    }
    Ok(value)
}

/// A delivery window from a flag or a file, checked.
pub(crate) fn window(value: Option<u32>) -> Result<Option<u32>, CliError> {
    value
        .map(|w| {
            in_range(
                w,
                "window",
                1,
                MAX_WINDOW,
                "deliveries unacknowledged per session",
            )
        })
        .transpose()
}

fn parse_registration(value: &str) -> Result<(AgencyCode, String), CliError> {
    let (code, name) = value.split_once('=').unwrap_or((value, ""));
    let code = AgencyCode::parse(code).map_err(|e| CliError::Usage(format!("--register: {e}")))?;
    Ok((code, name.to_owned()))
}

/// The per-agency admission and quota settings, as given by flags or by the file.
#[derive(Debug, Clone, Copy)]
struct AdmissionSettings {
    max_submissions_per_agency: Option<u32>,
    max_reserved_bytes_per_agency: Option<u64>,
    stall_timeout_secs: Option<u64>,
    partial_sweep_interval_secs: Option<u64>,
    max_pending_per_sender_documents: Option<u64>,
    max_pending_per_sender_bytes: Option<u64>,
    max_expiry_hours: Option<u64>,
    max_clock_skew_secs: Option<u64>,
    max_document_age_hours: Option<u64>,
}

/// Copies the admission settings out of `BrokerArgs` or `BrokerFile` (same field names).
macro_rules! admission_settings {
    ($from:expr) => {
        AdmissionSettings {
            max_submissions_per_agency: $from.max_submissions_per_agency,
            max_reserved_bytes_per_agency: $from.max_reserved_bytes_per_agency,
            stall_timeout_secs: $from.stall_timeout_secs,
            partial_sweep_interval_secs: $from.partial_sweep_interval_secs,
            max_pending_per_sender_documents: $from.max_pending_per_sender_documents,
            max_pending_per_sender_bytes: $from.max_pending_per_sender_bytes,
            max_expiry_hours: $from.max_expiry_hours,
            max_clock_skew_secs: $from.max_clock_skew_secs,
            max_document_age_hours: $from.max_document_age_hours,
        }
    };
}

/// The per-agency admission and quota settings: flags win over the file. Every bad
/// value goes into `problems`.
fn apply_admission(
    broker: &mut BrokerConfig,
    args: &AdmissionSettings,
    file: &AdmissionSettings,
    problems: &mut Problems,
) {
    let positive = |value: u64, name: &str| {
        if value == 0 {
            Err(CliError::Usage(format!("--{name} must be at least 1")))
        } else {
            Ok(value)
        }
    };
    let hours = |h: u64, name: &str| -> Result<Duration, CliError> {
        let secs = positive(h, name)?
            .checked_mul(3600)
            .ok_or_else(|| CliError::Usage(format!("--{name} is too large")))?;
        Ok(Duration::from_secs(secs))
    };
    if let Some(n) = args
        .max_submissions_per_agency
        .or(file.max_submissions_per_agency)
        && let Some(n) = problems.take(positive(u64::from(n), "max-submissions-per-agency"))
    {
        broker.max_submissions_per_agency = u32::try_from(n).unwrap_or(u32::MAX);
    }
    if let Some(n) = args
        .max_reserved_bytes_per_agency
        .or(file.max_reserved_bytes_per_agency)
        && let Some(n) = problems.take(positive(n, "max-reserved-bytes-per-agency"))
    {
        broker.max_reserved_bytes_per_agency = n;
    }
    if let Some(secs) = args.stall_timeout_secs.or(file.stall_timeout_secs)
        && let Some(secs) = problems.take(positive(secs, "stall-timeout-secs"))
    {
        broker.stall_timeout = Duration::from_secs(secs);
    }
    if let Some(secs) = args
        .partial_sweep_interval_secs
        .or(file.partial_sweep_interval_secs)
        && let Some(secs) = problems.take(positive(secs, "partial-sweep-interval-secs"))
    {
        broker.partial_sweep_interval = Duration::from_secs(secs);
    }
    if let Some(n) = args
        .max_pending_per_sender_documents
        .or(file.max_pending_per_sender_documents)
        && let Some(n) = problems.take(positive(n, "max-pending-per-sender-documents"))
    {
        broker.max_pending_per_sender_documents = Some(n);
    }
    if let Some(n) = args
        .max_pending_per_sender_bytes
        .or(file.max_pending_per_sender_bytes)
        && let Some(n) = problems.take(positive(n, "max-pending-per-sender-bytes"))
    {
        broker.max_pending_per_sender_bytes = Some(n);
    }
    if let Some(h) = args.max_expiry_hours.or(file.max_expiry_hours)
        && let Some(d) = problems.take(hours(h, "max-expiry-hours"))
    {
        broker.max_expiry = d;
    }
    if let Some(secs) = args.max_clock_skew_secs.or(file.max_clock_skew_secs) {
        broker.max_clock_skew = Duration::from_secs(secs);
    }
    if let Some(h) = args.max_document_age_hours.or(file.max_document_age_hours)
        && let Some(d) = problems.take(hours(h, "max-document-age-hours"))
    {
        broker.max_document_age = d;
    }
}

/// Reads the admin token file, refusing one that other users can read.
fn read_admin_tokens(
    path: &std::path::Path,
) -> Result<Vec<lienthong_broker::AdminToken>, CliError> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|e| CliError::config(path, e))?;
    if metadata.permissions().mode() & 0o044 != 0 {
        return Err(CliError::config(
            path,
            "the admin token file is readable by group or others; chmod 600 it",
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| CliError::config(path, e))?;
    lienthong_broker::AdminToken::parse_file(&text).map_err(|e| CliError::config(path, e))
}

/// A checked configuration, ready to bind and run.
struct Prepared {
    broker: BrokerConfig,
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
}

/// Reads flags and file and checks every value and every file named, gathering all
/// problems before it fails. Creates, binds and writes nothing.
fn prepare(args: BrokerArgs) -> Result<Prepared, CliError> {
    let cfg = args.config.as_deref();
    let file: BrokerFile = config::load(cfg)?;
    let mut problems = Problems::default();
    let p = &mut problems;
    let window = p.take(window(args.window.or(file.window))).flatten();
    let max_batch_documents = p
        .take(
            args.max_batch_documents
                .or(file.max_batch_documents)
                .map(|n| {
                    in_range(
                        n,
                        "max-batch-documents",
                        1,
                        MAX_BATCH_DOCUMENTS,
                        "documents per SubmitBatch call",
                    )
                })
                .transpose(),
        )
        .flatten();
    let path = |flag: Option<PathBuf>, from_file: Option<PathBuf>, name: &str| {
        required(flag, from_file.map(|p| relative_to(cfg, p)), name)
    };
    let data = p.take(path(args.data, file.data, "data"));
    let ca = p.take(path(args.ca, file.ca, "ca"));
    let cert = p.take(path(args.cert, file.cert, "cert"));
    let key = p.take(path(args.key, file.key, "key"));
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7443)));
    // Each file on its own first, so that every unreadable one is named; then the
    // three together (parse, and the key matches the certificate).
    let mut tls = None;
    if let (Some(ca), Some(cert), Some(key)) = (&ca, &cert, &key) {
        // Every file is checked (no short circuit), so each unreadable one is named.
        let unreadable = [ca, cert, key]
            .into_iter()
            .filter(|f| p.take(config::readable(f)).is_none())
            .count();
        if unreadable == 0 {
            crate::private::warn_if_key_readable(key, "broker TLS key");
            tls = p.take(TlsFiles::load(ca, cert, key).map_err(CliError::from));
        }
    }
    // Without usable TLS files the other values are still checked, on a placeholder
    // that is never run: `problems` is not empty then.
    let tls = tls.unwrap_or(TlsFiles {
        ca_pem: Vec::new(),
        cert_pem: Vec::new(),
        key_pem: Vec::new(),
    });
    let mut broker = BrokerConfig::new(tls, data.unwrap_or_default());
    if let Some(document_ca) = args
        .document_ca
        .or(file.document_ca.map(|p| relative_to(cfg, p)))
    {
        let anchors = std::fs::read(&document_ca)
            .map_err(|e| CliError::config(&document_ca, e))
            .and_then(|pem| {
                TrustAnchors::from_pem(&pem).map_err(|e| CliError::config(&document_ca, e))
            });
        broker.document_anchors = p.take(anchors);
    }
    for value in file.register.iter().chain(&args.register) {
        if let Some(registration) = p.take(parse_registration(value)) {
            broker.agencies.push(registration);
        }
    }
    broker.auto_register = !(args.no_auto_register || file.no_auto_register.unwrap_or(false));
    broker.crl_files = file
        .crl_file
        .iter()
        .map(|p| relative_to(cfg, p.clone()))
        .chain(args.crl_file.iter().cloned())
        .collect();
    if let Some(secs) = args.crl_refresh_secs.or(file.crl_refresh_secs) {
        if secs == 0 {
            return Err(CliError::Usage(
                "--crl-refresh-secs must be at least 1".into(),
            ));
        }
        broker.crl_refresh_interval = Duration::from_secs(secs);
    }
    if let Some(secs) = args.crl_stale_grace_secs.or(file.crl_stale_grace_secs) {
        broker.crl_stale_grace = Duration::from_secs(secs);
    }
    if let Some(max) = args.max_document_bytes.or(file.max_document_bytes) {
        broker.max_document_bytes = max;
    }
    if let Some(secs) = args.ack_timeout_secs.or(file.ack_timeout_secs) {
        broker.ack_timeout = Duration::from_secs(secs.max(1));
    }
    if let Some(window) = window {
        broker.window = window;
    }
    if let Some(max) = max_batch_documents {
        broker.max_batch_documents = max;
    }
    if let Some(name) = args.name.or(file.name) {
        broker.name = name;
    }
    if let Some(hours) = args.expiry_hours.or(file.expiry_hours) {
        match <[u64; 5]>::try_from(hours) {
            Ok(hours) => {
                broker.default_expiry =
                    hours.map(|h| Duration::from_secs(h.clamp(1, u64::MAX / 3600) * 3600));
            }
            Err(_) => p.push(CliError::Usage(
                "--expiry-hours takes five values, for priorities 0 to 4".into(),
            )),
        }
    }
    if let Some(max) = args.max_pending_documents.or(file.max_pending_documents) {
        broker.max_pending_documents = max;
    }
    if let Some(max) = args.max_pending_bytes.or(file.max_pending_bytes) {
        broker.max_pending_bytes = max;
    }
    if let Some(min) = args.min_free_bytes.or(file.min_free_bytes) {
        broker.min_free_bytes = min;
    }
    let flags = admission_settings!(args);
    let from_file = admission_settings!(file);
    apply_admission(&mut broker, &flags, &from_file, p);
    if let Some(token) = args
        .admin_token
        .or(file.admin_token)
        .filter(|t| !t.is_empty())
    {
        tracing::warn!(
            "--admin-token / admin_token is deprecated: the token is visible to every local \
             user (ps, the config file); put it in a 0600 file and pass --admin-token-file"
        );
        broker.admin_token = Some(token);
    }
    if let Some(token_file) = args
        .admin_token_file
        .or(file.admin_token_file.map(|p| relative_to(cfg, p)))
        && let Some(tokens) = p.take(read_admin_tokens(&token_file))
    {
        broker.admin_tokens = tokens;
    }
    broker.admin_insecure_bind =
        args.admin_insecure_bind || file.admin_insecure_bind.unwrap_or(false);
    let admin_listen = args.admin_listen.or(file.admin_listen);
    if let Some(addr) = admin_listen
        && !addr.ip().is_loopback()
        && !(broker.admin_insecure_bind
            && (!broker.admin_tokens.is_empty() || broker.admin_token.is_some()))
    {
        p.push(CliError::Usage(format!(
            "--admin-listen {addr} is not a loopback address: give --admin-insecure-bind and \
             --admin-token-file too, or a 127.0.0.1 address"
        )));
    }
    if let Some(secs) = args
        .tls_handshake_timeout_secs
        .or(file.tls_handshake_timeout_secs)
    {
        broker.tls_handshake_timeout = Duration::from_secs(secs.max(1));
    }
    if let Some(secs) = args
        .http_header_timeout_secs
        .or(file.http_header_timeout_secs)
    {
        broker.http_header_timeout = Duration::from_secs(secs.max(1));
    }
    if let Some(max) = args.max_connections.or(file.max_connections) {
        broker.max_connections = max.max(1);
    }
    if let Some(max) = args.max_handshakes.or(file.max_handshakes) {
        broker.max_handshakes = max.max(1);
    }
    problems.finish()?;
    Ok(Prepared {
        broker,
        listen,
        admin_listen,
    })
}

pub async fn run(args: BrokerArgs) -> Result<(), CliError> {
    let check_only = args.check_config;
    let what = match &args.config {
        Some(path) => path.display().to_string(),
        None => "the broker's flags".to_owned(),
    };
    let reread = args.clone();
    let Prepared {
        mut broker,
        listen,
        admin_listen,
    } = prepare(args)?;
    if check_only {
        crate::output::outln!(
            "{what}: OK (broker on {listen}, data {}, {} agencies registered at start)",
            broker.data_dir.display(),
            broker.agencies.len()
        );
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::Failed(format!("cannot listen on {listen}: {e}")))?;
    let admin_listener = match admin_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            CliError::Failed(format!("cannot listen on {addr} (--admin-listen): {e}"))
        })?),
        None => None,
    };
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("shutdown requested; draining");
        trigger.cancel();
    });
    // SIGHUP: read the flags' files and the --config file again, as at start.
    broker.reload = Some(lienthong_broker::ReloadHook {
        requests: crate::reload_signal()?,
        load: std::sync::Arc::new(move || {
            prepare(reread.clone())
                .map(|prepared| prepared.broker)
                .map_err(|e| e.to_string())
        }),
    });
    lienthong_broker::run_with_admin(broker, listener, admin_listener, shutdown)
        .await
        .map_err(|e| CliError::Failed(format!("broker: {e}")))
}
