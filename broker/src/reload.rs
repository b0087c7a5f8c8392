//! Reloading the broker's configuration while it runs (`SIGHUP` in the CLI): its TLS
//! certificate chain and key, the signing key of its receipts (the same pair), the CRL
//! files, and the agencies registered by configuration.
//!
//! Invariants:
//! - A reload is all or nothing as far as its files go: the new configuration is read
//!   and checked whole (the chain parses, the key matches the certificate, every CRL
//!   file parses) before anything is swapped; a refused reload logs why, counts it, and
//!   leaves everything in force as it was. (Only a store error while registering the
//!   newly listed agencies, after the swap, is reported as a refusal with the new
//!   certificate already in force.)
//! - Nothing open is dropped: sessions and calls in progress keep the TLS connection
//!   they have; new handshakes present the new certificate, and receipts signed after
//!   the swap carry the new key's signature.
//! - What the broker cannot change while running (its listeners, data directory, CA
//!   bundle, limits) takes effect at the next restart; a reload says so when one of the
//!   files it would need has changed.

use std::sync::{Arc, RwLock};

use lienthong_proto::tls::TlsFiles;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::BrokerError;
use crate::{BrokerConfig, Shared};

/// Where reload requests come from and how the new configuration is read: the CLI
/// passes its `SIGHUP` stream's wake-ups and a function that reads the flags' files and
/// the `--config` file again, as at start.
#[derive(Clone)]
pub struct ReloadHook {
    /// Notified once per request (`notify_one`: a request made while a reload runs is
    /// kept and served after it).
    pub requests: Arc<tokio::sync::Notify>,
    /// Reads and checks the configuration again; an error says what is wrong with it.
    pub load: Arc<dyn Fn() -> Result<BrokerConfig, String> + Send + Sync>,
}

impl std::fmt::Debug for ReloadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadHook { .. }")
    }
}

/// The broker's TLS certificate and key, replaced on reload; a handshake uses whichever
/// is current when the client says hello.
#[derive(Debug)]
pub(crate) struct ServerCertificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCertificate {
    pub(crate) fn new(tls: &TlsFiles) -> Result<Self, BrokerError> {
        Ok(Self {
            current: RwLock::new(Arc::new(certified_key(tls)?)),
        })
    }

    fn replace(&self, key: CertifiedKey) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The chain and key of `tls` for rustls, refused unless the key is the certificate's.
pub(crate) fn certified_key(tls: &TlsFiles) -> Result<CertifiedKey, BrokerError> {
    let config_error = |what: &str, detail: String| BrokerError::Config {
        path: what.to_owned(),
        detail,
    };
    let chain = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error("broker certificate", e.to_string()))?;
    if chain.is_empty() {
        return Err(config_error(
            "broker certificate",
            "no CERTIFICATE block".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
        .map_err(|e| config_error("broker key", e.to_string()))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| config_error("broker key", e.to_string()))?;
    let certified = CertifiedKey::new(chain, key);
    certified.keys_match().map_err(|e| {
        config_error(
            "broker certificate/key",
            format!("the key is not the certificate's: {e}"),
        )
    })?;
    Ok(certified)
}

/// What a reload changed, for its log line and the operator.
#[derive(Debug, Default)]
pub(crate) struct Reloaded {
    pub certificate_changed: bool,
    pub agencies_registered: usize,
    pub crls: usize,
}

/// Serves reload requests until shutdown.
pub(crate) async fn reload_loop(shared: Arc<Shared>, hook: ReloadHook) {
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = hook.requests.notified() => {}
        }
        let load = hook.load.clone();
        let read = match tokio::task::spawn_blocking(move || load()).await {
            Ok(read) => read,
            Err(e) => Err(format!("the reload task failed: {e}")),
        };
        let result = match read {
            Ok(config) => apply(&shared, config).await,
            Err(detail) => Err(BrokerError::Config {
                path: "configuration".into(),
                detail,
            }),
        };
        match result {
            Ok(reloaded) => {
                shared.metrics.reloads.record(true);
                tracing::info!(
                    certificate_changed = reloaded.certificate_changed,
                    agencies_registered = reloaded.agencies_registered,
                    crls = reloaded.crls,
                    "configuration reloaded; other settings take effect at the next restart"
                );
            }
            Err(error) => {
                shared.metrics.reloads.record(false);
                tracing::error!(%error, "reload refused; the configuration in force is unchanged");
            }
        }
    }
}

/// Checks `config` whole, then swaps what can change while running.
pub(crate) async fn apply(shared: &Shared, config: BrokerConfig) -> Result<Reloaded, BrokerError> {
    let certified = certified_key(&config.tls)?;
    let signing_key = config.tls.signing_key().map_err(|e| BrokerError::Config {
        path: "broker certificate/key".into(),
        detail: e.to_string(),
    })?;
    // Every CRL file must parse before anything is swapped; the refresh below reads
    // them again (a file replaced in between is then refused there, keeping the old).
    let files = config.crl_files.clone();
    tokio::task::spawn_blocking(move || crate::revocation::read_lists(&files))
        .await
        .map_err(|e| BrokerError::Serve(e.to_string()))?
        .map_err(|detail| BrokerError::Config {
            path: "crl_files".into(),
            detail,
        })?;
    if shared.config.tls.ca_pem != config.tls.ca_pem {
        tracing::warn!("the CA bundle changed; it takes effect at the next restart");
    }
    let certificate_changed = shared.signing_key().chain() != signing_key.chain();
    shared.server_certificate.replace(certified);
    let held = crate::held_certificates(&config.tls, &signing_key);
    shared.set_signing_key(signing_key);
    *shared
        .metrics
        .certificates
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = held;
    let store = shared.store.clone();
    let agencies = config.agencies.clone();
    // register_agency inserts only codes not yet registered (and audits those).
    let agencies_registered = tokio::task::spawn_blocking(move || {
        let mut added = 0usize;
        for (code, name) in &agencies {
            if store.register_agency(
                code.as_str(),
                name,
                false,
                lienthong_proto::now_ms(),
                "the broker's configuration, reloaded",
            )? {
                added = added.saturating_add(1);
            }
        }
        Ok::<usize, BrokerError>(added)
    })
    .await
    .map_err(|e| BrokerError::Serve(e.to_string()))??;
    shared.revocation.set_files(config.crl_files);
    // The files were read and checked above; one replaced since then fails here, keeps
    // the CRLs in force and is shown by /readyz and the metrics like any failed refresh.
    let crls = match shared.revocation.refresh().await {
        Ok(count) => count,
        Err(error) => {
            tracing::error!(%error, "the reload's CRL refresh failed; the CRLs in force stay");
            shared.revocation.loaded().lists.infos().len()
        }
    };
    Ok(Reloaded {
        certificate_changed,
        agencies_registered,
        crls,
    })
}
