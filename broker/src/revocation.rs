//! Revocation at the broker: CRLs read from files (`crl_files`), re-read on a schedule
//! (`crl_refresh_interval`) and on an operator's call (`Admin.ReloadCrls`), applied to
//! TLS clients (the listener's verifier) and to document signers (`trust`).
//!
//! Invariants:
//! - The TLS client verifier is rebuilt from the CRLs and swapped behind
//!   [`SwappableVerifier`] at each refresh; a handshake uses whichever verifier is
//!   current when it checks the client certificate. Roots never change while running.
//! - A refresh that fails (a file missing or unparsable) keeps the CRLs loaded before and
//!   records the error, which `/readyz` and the metrics show until a refresh succeeds;
//!   at start the same failure refuses to start.
//! - Stale means past a CRL's nextUpdate plus `crl_stale_grace`. Fail closed by default
//!   (grace 0): a certificate of a CA whose CRL is stale is refused, at the handshake and
//!   as a document signer. With a grace, CRLs past nextUpdate are accepted until one of
//!   them is older than the grace; from then on every CRL past its nextUpdate is
//!   enforced. A stale CRL makes the broker not ready.
//! - Only end-entity certificates are checked; a CA without a configured CRL is not
//!   checked (its certificates have unknown status, allowed). The handshake also refuses
//!   a client certificate on the operator block list (`trust`).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lienthong_proto::TrustAnchors;
use lienthong_proto::revocation::RevocationLists;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::error::BrokerError;

/// The CRLs in force and how the last refresh went.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub lists: RevocationLists,
    pub loaded_at_ms: i64,
    /// The last refresh's error, until one succeeds.
    pub error: Option<String>,
}

/// A client-certificate verifier that can be replaced while the listener runs.
#[derive(Debug)]
pub(crate) struct SwappableVerifier {
    current: RwLock<Arc<dyn ClientCertVerifier>>,
    hints: Vec<DistinguishedName>,
    blocked: sled::Tree,
}

impl SwappableVerifier {
    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ClientCertVerifier for SwappableVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .current()
            .verify_client_cert(end_entity, intermediates, now)?;
        // A blocked certificate does not even finish its handshake.
        let blocked = lienthong_proto::agency::spki_sha256(end_entity)
            .ok()
            .map(|hash| self.blocked.contains_key(hash));
        match blocked {
            Some(Ok(false)) => Ok(verified),
            Some(Ok(true)) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            )),
            _ => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// CRL files, what was loaded from them, and the verifiers built from that.
pub(crate) struct Revocation {
    /// Replaced by a configuration reload (`reload`).
    files: RwLock<Vec<PathBuf>>,
    grace: Duration,
    roots: Arc<rustls::RootCertStore>,
    document_anchors: TrustAnchors,
    loaded: RwLock<Arc<Loaded>>,
    verifier: Arc<SwappableVerifier>,
    /// Serialises refreshes (the schedule and an operator's call).
    refreshing: tokio::sync::Mutex<()>,
}

pub(crate) fn read_lists(files: &[PathBuf]) -> Result<RevocationLists, String> {
    let mut lists = RevocationLists::default();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        lists
            .add(&bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(lists)
}

impl Revocation {
    /// Loads the CRL files (an error names the file) and builds the TLS verifier.
    pub(crate) fn start(
        files: Vec<PathBuf>,
        grace: Duration,
        roots: Arc<rustls::RootCertStore>,
        document_anchors: TrustAnchors,
        blocked: sled::Tree,
    ) -> Result<Self, BrokerError> {
        let config_error = |detail: String| BrokerError::Config {
            path: "crl_files".into(),
            detail,
        };
        let lists = read_lists(&files).map_err(config_error)?;
        let loaded = Loaded {
            lists,
            loaded_at_ms: lienthong_proto::now_ms(),
            error: None,
        };
        let first =
            build_verifier(&roots, &loaded.lists, enforce(&loaded, grace)).map_err(config_error)?;
        let verifier = Arc::new(SwappableVerifier {
            hints: first.root_hint_subjects().to_vec(),
            current: RwLock::new(first),
            blocked,
        });
        if !files.is_empty() {
            tracing::info!(crls = loaded.lists.infos().len(), "CRLs loaded");
        }
        Ok(Self {
            files: RwLock::new(files),
            grace,
            roots,
            document_anchors,
            loaded: RwLock::new(Arc::new(loaded)),
            verifier,
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    pub(crate) fn verifier(&self) -> Arc<SwappableVerifier> {
        self.verifier.clone()
    }

    pub(crate) fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn configured(&self) -> bool {
        !self.files().is_empty()
    }

    fn files(&self) -> Vec<PathBuf> {
        self.files
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The CRL files of a reloaded configuration; they are read at the next refresh.
    pub(crate) fn set_files(&self, files: Vec<PathBuf>) {
        *self
            .files
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = files;
    }

    /// Re-reads the files and swaps the verifier; a failure keeps the previous CRLs and
    /// is recorded. Returns the number of CRLs in force.
    pub(crate) async fn refresh(&self) -> Result<usize, BrokerError> {
        let _one = self.refreshing.lock().await;
        let files = self.files();
        let read = tokio::task::spawn_blocking(move || read_lists(&files))
            .await
            .map_err(|e| BrokerError::Serve(e.to_string()))?;
        let previous = self.loaded();
        let next = match read {
            Ok(lists) => Loaded {
                lists,
                loaded_at_ms: lienthong_proto::now_ms(),
                error: None,
            },
            Err(error) => {
                tracing::error!(%error, "cannot refresh the CRLs; keeping the ones loaded before");
                Loaded {
                    lists: previous.lists.clone(),
                    loaded_at_ms: previous.loaded_at_ms,
                    error: Some(error),
                }
            }
        };
        let verifier = build_verifier(&self.roots, &next.lists, enforce(&next, self.grace))
            .map_err(|detail| BrokerError::Config {
                path: "crl_files".into(),
                detail,
            })?;
        *self
            .verifier
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = verifier;
        let count = next.lists.infos().len();
        let failed = next.error.clone();
        *self
            .loaded
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        match failed {
            Some(error) => Err(BrokerError::Unavailable(format!(
                "the CRLs could not be refreshed (the previous ones stay in force): {error}"
            ))),
            None => Ok(count),
        }
    }

    /// Why revocation makes the broker not ready: a failed refresh or a stale CRL.
    pub(crate) fn not_ready_reason(&self) -> Option<String> {
        let loaded = self.loaded();
        if let Some(error) = &loaded.error {
            return Some(format!("the CRLs could not be refreshed: {error}"));
        }
        let stale = stale(&loaded, self.grace, lienthong_proto::now_ms());
        (!stale.is_empty()).then(|| {
            format!(
                "stale CRL (past its nextUpdate{}): {}; certificates of these CAs are refused",
                if self.grace.is_zero() {
                    String::new()
                } else {
                    format!(" + {} s grace", self.grace.as_secs())
                },
                stale.join(", ")
            )
        })
    }

    /// Refuses a document signer whose certificate is revoked, or whose CA's CRL is
    /// enforced as stale (see the module header). Checked at the time of submission.
    pub(crate) fn check_signer(
        &self,
        chain: &[Vec<u8>],
    ) -> Result<(), lienthong_proto::ProtocolError> {
        let loaded = self.loaded();
        if loaded.lists.is_empty() {
            return Ok(());
        }
        self.document_anchors.check_revocation(
            chain,
            &loaded.lists,
            UnixTime::now(),
            enforce(&loaded, self.grace),
        )
    }
}

/// Issuers of the CRLs past nextUpdate + grace at `now_ms`.
pub(crate) fn stale(loaded: &Loaded, grace: Duration, now_ms: i64) -> Vec<String> {
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    loaded
        .lists
        .infos()
        .iter()
        .filter(|info| {
            info.next_update_ms
                .is_some_and(|next| next.saturating_add(grace_ms) < now_ms)
        })
        .map(|info| info.issuer.clone())
        .collect()
}

/// Whether CRLs past their nextUpdate are refused now (see the module header).
fn enforce(loaded: &Loaded, grace: Duration) -> bool {
    grace.is_zero() || !stale(loaded, grace, lienthong_proto::now_ms()).is_empty()
}

fn build_verifier(
    roots: &Arc<rustls::RootCertStore>,
    lists: &RevocationLists,
    enforce_expiry: bool,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut builder = rustls::server::WebPkiClientVerifier::builder(roots.clone());
    if !lists.is_empty() {
        builder = builder
            .with_crls(lists.ders().iter().cloned())
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
        if enforce_expiry {
            builder = builder.enforce_revocation_expiration();
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// Refreshes every `interval` until `shutdown` (while CRL files are configured: a
/// reload may add or remove them).
pub(crate) async fn refresh_loop(shared: Arc<crate::Shared>, interval: Duration) {
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if shared.revocation.configured() {
            // Errors are recorded for /readyz and logged by `refresh`.
            let _ = shared.revocation.refresh().await;
        }
    }
}
