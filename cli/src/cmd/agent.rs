//! `lienthong agent`: run an agency's agent until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use lienthong_agent::AgentConfig;
use lienthong_agent::token::{TokenConfig, TokenUri};
use lienthong_proto::tls::TlsFiles;
use lienthong_proto::{AgencyCode, SigningKey, TrustAnchors};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Problems, relative_to, required};
use crate::error::CliError;

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// TOML configuration file; keys are the long flag names.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the configuration (flags, file and the files it names: CA, certificates,
    /// keys and that they match, the token and its PIN, the API token file) without
    /// starting: print one OK line and exit 0, or list every problem and exit 2.
    #[arg(long)]
    check_config: bool,
    /// The broker, e.g. https://localhost:7443. Required.
    #[arg(long)]
    broker: Option<String>,
    /// This agency's code, e.g. 000.00.12.H31; it must be the one in --cert. Required.
    #[arg(long)]
    agency: Option<String>,
    /// CA bundle (PEM): trusts the broker and, unless --document-ca is given, document
    /// signers. Required.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// This agency's TLS certificate chain (PEM). Required.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This agency's TLS private key (PKCS#8 PEM), matching --cert. Required.
    #[arg(long)]
    key: Option<PathBuf>,
    /// A separate document-signing certificate chain (default: --cert).
    #[arg(long)]
    signing_cert: Option<PathBuf>,
    /// A separate document-signing key (default: --key): a PKCS#8 PEM file, or a key
    /// on a PKCS#11 token named by its URI, `pkcs11:token=LABEL;object=LABEL`.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// The PKCS#11 module (.so) of the token holding --signing-key.
    #[arg(long)]
    pkcs11_module: Option<PathBuf>,
    /// The file holding the token's user PIN (mode 0600; one line).
    #[arg(long)]
    pin_file: Option<PathBuf>,
    /// CA bundle for document signatures, when it differs from --ca.
    #[arg(long)]
    document_ca: Option<PathBuf>,
    /// Data directory (sled outbox and inbox). Required.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Local HTTP API address. Default 127.0.0.1:7180.
    #[arg(long)]
    api: Option<SocketAddr>,
    /// Folder where received documents are exported, after they are acknowledged.
    /// Absent: no folder (a gateway that reads documents over the API).
    #[arg(long)]
    inbox_dir: Option<PathBuf>,
    /// Most documents waiting in the outbox before new ones are refused with HTTP 429
    /// (default 10000).
    #[arg(long)]
    max_outbox_documents: Option<u64>,
    /// Most attachment bytes waiting in the outbox before new documents are refused
    /// (default 10737418240, 10 GiB).
    #[arg(long)]
    max_outbox_bytes: Option<u64>,
    /// Largest document (sum of its attachments) taken from the gateway or the broker,
    /// default 2 GiB; a larger upload is refused before any byte is stored.
    #[arg(long)]
    max_document_bytes: Option<u64>,
    /// Drop folder: `.edxml` packages written here are sent, then moved to `sent/`
    /// (with the message id) or `failed/` (with the reason).
    #[arg(long)]
    drop_dir: Option<PathBuf>,
    /// A gateway group (name or numeric id) that may read the inbox folder: folders
    /// 0750 and files 0640 with that group. Default: 0700 and 0600, this user only.
    #[arg(long)]
    inbox_group: Option<String>,
    /// The API's bearer token file, default <data>/api-token (created 0600 with a
    /// random token when missing; refused when others may read it).
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Serve the API over HTTPS with this certificate chain (PEM); with --api-tls-key.
    #[arg(long)]
    api_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --api-tls-cert.
    #[arg(long)]
    api_tls_key: Option<PathBuf>,
    /// Allow a non-loopback --api address without TLS (a warning is logged at every
    /// start). Without it, or TLS, the agent refuses to start off loopback.
    #[arg(long)]
    api_insecure_bind: bool,
    /// A host name clients use to reach an API bound off loopback (repeatable):
    /// requests naming other hosts are refused.
    #[arg(long = "api-host", value_name = "NAME")]
    api_hosts: Vec<String>,
    /// Most API connections open at once (default 256).
    #[arg(long)]
    api_max_connections: Option<usize>,
    /// Largest JSON or edXML request body the local API reads, default 48 MiB;
    /// larger files go through `POST /v1/uploads`.
    #[arg(long)]
    api_max_body_bytes: Option<usize>,
    /// Seconds after which an upload not taken into a document is removed (default
    /// 86400, 24 h).
    #[arg(long)]
    upload_max_age_secs: Option<u64>,
    /// Deliveries this agent takes unacknowledged at once, 1 to 16384 (default 512;
    /// the broker's own window caps it). Its batches from the broker are at most this
    /// large too.
    #[arg(long, value_name = "N")]
    window: Option<u32>,
}

impl AgentArgs {
    /// The `--config` file, read early for its `log_format`.
    pub(crate) fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_deref()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    /// Read before tracing starts (`logging::format_from_config`); declared here so
    /// that the key is accepted and its value checked with the rest of the file.
    #[allow(dead_code)]
    log_format: Option<crate::logging::LogFormat>,
    broker: Option<String>,
    agency: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    signing_cert: Option<PathBuf>,
    signing_key: Option<PathBuf>,
    pkcs11_module: Option<PathBuf>,
    pin_file: Option<PathBuf>,
    document_ca: Option<PathBuf>,
    data: Option<PathBuf>,
    api: Option<SocketAddr>,
    inbox_dir: Option<PathBuf>,
    max_outbox_documents: Option<u64>,
    max_outbox_bytes: Option<u64>,
    max_document_bytes: Option<u64>,
    drop_dir: Option<PathBuf>,
    inbox_group: Option<String>,
    api_token_file: Option<PathBuf>,
    api_tls_cert: Option<PathBuf>,
    api_tls_key: Option<PathBuf>,
    api_insecure_bind: Option<bool>,
    #[serde(alias = "api_host")]
    api_hosts: Option<Vec<String>>,
    api_max_connections: Option<usize>,
    api_max_body_bytes: Option<usize>,
    upload_max_age_secs: Option<u64>,
    window: Option<u32>,
}

/// The keys the `--config` file takes (for `lienthong docs configuration`).
pub(crate) fn config_keys() -> &'static [&'static str] {
    crate::config::keys::<AgentFile>()
}

/// Reads flags and file and checks every value and every file named (opening the
/// token, if any, to sign once), gathering all problems before it fails. Binds
/// nothing and creates no file; `check_only` also leaves a missing API token file
/// for the real start to create. On a `reload` a seal key on a token is not opened again
/// (a PKCS#11 module is initialised once per process): the third value is then true and
/// the key in force stays.
async fn prepare(
    args: AgentArgs,
    check_only: bool,
    reload: bool,
) -> Result<(AgentConfig, SocketAddr, bool), CliError> {
    let mut token_kept = false;
    let cfg = args.config.as_deref();
    let file: AgentFile = config::load(cfg)?;
    let mut problems = Problems::default();
    let p = &mut problems;
    let window = p
        .take(super::broker::window(args.window.or(file.window)))
        .flatten();
    let path = |flag: Option<PathBuf>, from_file: Option<PathBuf>, name: &str| {
        required(flag, from_file.map(|p| relative_to(cfg, p)), name)
    };
    let optional_path = |flag: Option<PathBuf>, from_file: Option<PathBuf>| {
        flag.or(from_file.map(|p| relative_to(cfg, p)))
    };
    let broker = p
        .take(required(args.broker, file.broker, "broker"))
        .and_then(|broker| {
            if broker.starts_with("https://") {
                Some(broker)
            } else {
                p.push(CliError::Usage(format!(
                    "--broker must be an https:// URL such as https://localhost:7443, not {broker}"
                )));
                None
            }
        });
    let agency = p
        .take(required(args.agency, file.agency, "agency"))
        .and_then(|agency| {
            p.take(
                AgencyCode::parse(&agency).map_err(|e| CliError::Usage(format!("--agency: {e}"))),
            )
        });
    let ca = p.take(path(args.ca, file.ca, "ca"));
    let cert = p.take(path(args.cert, file.cert, "cert"));
    let key = p.take(path(args.key, file.key, "key"));
    let data = p.take(path(args.data, file.data, "data"));
    let inbox_dir = optional_path(args.inbox_dir, file.inbox_dir);
    let api = args
        .api
        .or(file.api)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7180)));
    let mut tls = None;
    if let (Some(ca), Some(cert), Some(key)) = (&ca, &cert, &key) {
        if TokenUri::is_uri(&key.to_string_lossy()) {
            p.push(CliError::Usage(
                "--key is the TLS key and must be a PEM file; a key on a token goes in --signing-key (with --signing-cert)".into(),
            ));
        } else {
            // Each file on its own first, so that every unreadable one is named.
            // Every file is checked (no short circuit), so each unreadable one is named.
            let unreadable = [ca, cert, key]
                .into_iter()
                .filter(|f| p.take(config::readable(f)).is_none())
                .count();
            if unreadable == 0 {
                crate::private::warn_if_key_readable(key, "agent TLS key");
                tls = p.take(TlsFiles::load(ca, cert, key).map_err(CliError::from));
            }
        }
        if let (Some(tls), Some(agency)) = (&tls, &agency) {
            let identity = tls
                .signing_key()
                .and_then(|k| k.identity())
                .map_err(|e| CliError::config(cert, e));
            if let Some(identity) = p.take(identity)
                && identity.agency() != Some(agency)
            {
                p.push(CliError::config(
                    cert,
                    format!("the certificate is for {identity}, not agency {agency}"),
                ));
            }
        }
    }
    let signing_key = args.signing_key.or(file.signing_key.map(|key| {
        // A PKCS#11 URI in the file is not a path relative to it.
        if TokenUri::is_uri(&key.to_string_lossy()) {
            key
        } else {
            relative_to(cfg, key)
        }
    }));
    let signing = match (
        optional_path(args.signing_cert, file.signing_cert),
        signing_key,
    ) {
        (Some(_), Some(uri)) if reload && TokenUri::is_uri(&uri.to_string_lossy()) => {
            token_kept = true;
            None
        }
        (Some(cert), Some(uri)) if TokenUri::is_uri(&uri.to_string_lossy()) => {
            let token = p.take(
                TokenConfig::new(
                    &uri.to_string_lossy(),
                    optional_path(args.pkcs11_module, file.pkcs11_module),
                    optional_path(args.pin_file, file.pin_file),
                )
                .map_err(|e| CliError::Usage(format!("--signing-key: {e}"))),
            );
            let cert_pem = p.take(std::fs::read(&cert).map_err(|e| CliError::config(&cert, e)));
            match (token, cert_pem) {
                (Some(token), Some(cert_pem)) => {
                    // Loads the module, logs in and signs once: it blocks for a moment.
                    let opened = tokio::task::spawn_blocking(move || {
                        lienthong_agent::token::open_signing_key(&cert_pem, token)
                    })
                    .await
                    .map_err(|e| CliError::Failed(format!("opening the token failed: {e}")))
                    .and_then(|r| r.map_err(|e| CliError::Usage(format!("--signing-key: {e}"))));
                    p.take(opened)
                }
                _ => None,
            }
        }
        (Some(cert), Some(key)) => {
            let cert_pem = p.take(std::fs::read(&cert).map_err(|e| CliError::config(&cert, e)));
            let key_pem = p.take(std::fs::read(&key).map_err(|e| CliError::config(&key, e)));
            match (cert_pem, key_pem) {
                (Some(cert_pem), Some(key_pem)) => {
                    crate::private::warn_if_key_readable(&key, "agent signing key");
                    p.take(
                        SigningKey::from_pem(&cert_pem, &key_pem)
                            .map_err(|e| CliError::config(&key, e)),
                    )
                }
                _ => None,
            }
        }
        (None, None) => None,
        _ => {
            p.push(CliError::Usage(
                "--signing-cert and --signing-key go together".into(),
            ));
            None
        }
    };
    // Without usable TLS files the other values are still checked, on a placeholder
    // that is never run: `problems` is not empty then.
    let tls = tls.unwrap_or(TlsFiles {
        ca_pem: Vec::new(),
        cert_pem: Vec::new(),
        key_pem: Vec::new(),
    });
    let placeholder_agency = || AgencyCode::parse("000.00.00.H31");
    let agency = match agency {
        Some(agency) => agency,
        None => placeholder_agency().map_err(|e| CliError::Failed(e.to_string()))?,
    };
    let mut config = AgentConfig::new(
        agency,
        broker.unwrap_or_default(),
        tls,
        data.unwrap_or_default(),
        PathBuf::new(),
    );
    config.inbox_dir = inbox_dir;
    config.signing_key = signing.map(Arc::new);
    if let Some(window) = window {
        config.window = window;
    }
    if let Some(max) = args.max_outbox_documents.or(file.max_outbox_documents) {
        config.max_outbox_documents = max;
    }
    if let Some(max) = args.max_outbox_bytes.or(file.max_outbox_bytes) {
        config.max_outbox_bytes = max;
    }
    if let Some(max) = args.max_document_bytes.or(file.max_document_bytes) {
        config.max_document_bytes = max;
    }
    config.drop_dir = optional_path(args.drop_dir, file.drop_dir);
    if let Some(group) = args.inbox_group.or(file.inbox_group) {
        config.inbox_group = p.take(
            crate::private::group_id(&group)
                .map_err(|e| CliError::Usage(format!("--inbox-group: {e}"))),
        );
    }
    if let Some(max) = args.api_max_body_bytes.or(file.api_max_body_bytes) {
        config.api_max_body_bytes = max;
    }
    if let Some(secs) = args.upload_max_age_secs.or(file.upload_max_age_secs) {
        config.upload_max_age = std::time::Duration::from_secs(secs);
    }
    if let Some(document_ca) = optional_path(args.document_ca, file.document_ca) {
        let anchors = std::fs::read(&document_ca)
            .map_err(|e| CliError::config(&document_ca, e))
            .and_then(|pem| {
                TrustAnchors::from_pem(&pem).map_err(|e| CliError::config(&document_ca, e))
            });
        config.document_anchors = p.take(anchors);
    }
    config.api_token_file = optional_path(args.api_token_file, file.api_token_file);
    config.api_insecure_bind = args.api_insecure_bind || file.api_insecure_bind.unwrap_or(false);
    config.api_hosts = if args.api_hosts.is_empty() {
        file.api_hosts.unwrap_or_default()
    } else {
        args.api_hosts
    };
    if let Some(max) = args.api_max_connections.or(file.api_max_connections) {
        if max == 0 {
            p.push(CliError::Usage(
                "--api-max-connections must be at least 1".into(),
            ));
        } else {
            config.api_max_connections = max;
        }
    }
    match (
        optional_path(args.api_tls_cert, file.api_tls_cert),
        optional_path(args.api_tls_key, file.api_tls_key),
    ) {
        (Some(cert), Some(key)) => {
            let cert_pem = p.take(std::fs::read(&cert).map_err(|e| CliError::config(&cert, e)));
            let key_pem = p.take(std::fs::read(&key).map_err(|e| CliError::config(&key, e)));
            if let (Some(cert_pem), Some(key_pem)) = (cert_pem, key_pem) {
                // A certificate and key that do not load are a configuration error (exit 2).
                let loads = lienthong_agent::api_server::tls_config(&cert_pem, &key_pem)
                    .map_err(|e| CliError::config(&cert, e));
                if p.take(loads).is_some() {
                    config.api_tls = Some(lienthong_agent::ApiTls { cert_pem, key_pem });
                }
            }
        }
        (None, None) => {}
        _ => p.push(CliError::Usage(
            "--api-tls-cert and --api-tls-key go together".into(),
        )),
    }
    // Refused before anything listens: an API off loopback without TLS, an unusable
    // token file.
    p.take(
        lienthong_agent::api_server::check_bind(
            api,
            config.api_tls.is_some(),
            config.api_insecure_bind,
        )
        .map_err(|e| CliError::Usage(e.to_string())),
    );
    problems.finish()?;
    // The token file exists before the port opens, so a client that waits for the
    // port finds it. A check only reads one that is there.
    let token_path = config.api_token_path();
    let token = if check_only {
        if token_path.exists() {
            lienthong_agent::api_guard::ApiToken::load(&token_path).map(drop)
        } else {
            Ok(())
        }
    } else {
        lienthong_agent::api_guard::ApiToken::load_or_create(&token_path).map(drop)
    };
    token.map_err(|e| CliError::Usage(e.to_string()))?;
    Ok((config, api, token_kept))
}

pub async fn run(args: AgentArgs) -> Result<(), CliError> {
    let check_only = args.check_config;
    let what = match &args.config {
        Some(path) => path.display().to_string(),
        None => "the agent's flags".to_owned(),
    };
    let reread = args.clone();
    let (mut config, api, _) = prepare(args, check_only, false).await?;
    if check_only {
        crate::output::outln!(
            "{what}: OK (agency {}, broker {}, API on {api}, data {})",
            config.agency,
            config.broker_url,
            config.data_dir.display()
        );
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(api)
        .await
        .map_err(|e| CliError::Failed(format!("cannot listen on {api}: {e}")))?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    // SIGHUP: read the flags' files and the --config file again, as at start.
    config.reload = Some(lienthong_agent::ReloadHook {
        requests: crate::reload_signal()?,
        load: std::sync::Arc::new(move || {
            let args = reread.clone();
            Box::pin(async move {
                prepare(args, false, true)
                    .await
                    .map(|(config, _, keep_signing_key)| lienthong_agent::Reloaded {
                        config,
                        keep_signing_key,
                    })
                    .map_err(|e| e.to_string())
            })
        }),
    });
    lienthong_agent::run(config, listener, shutdown)
        .await
        .map_err(|e| CliError::Failed(format!("agent: {e}")))
}
