//! Mutual-TLS configuration for tonic, built from PEM files.
//!
//! The PEM files are parsed here first so that a wrong path or a wrong file is reported
//! at start-up with the file's name, instead of as an opaque handshake failure later.
//! Client certificates are mandatory on the server: a connection without a certificate
//! from a configured CA never reaches a handler.

use std::path::{Path, PathBuf};

use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::ProtocolError;
use crate::signing::{SigningKey, TrustAnchors, certs_from_pem};

/// Installs rustls's ring provider as the process default. Safe to call repeatedly.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A PEM file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {detail}")]
pub struct PemFileError {
    pub path: PathBuf,
    pub detail: String,
}

fn read(path: &Path) -> Result<Vec<u8>, PemFileError> {
    std::fs::read(path).map_err(|e| PemFileError {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn in_file(path: &Path) -> impl Fn(ProtocolError) -> PemFileError + '_ {
    move |e| PemFileError {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

/// The PEM material of one party: trust anchors, own certificate chain and key.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles { .. }")
    }
}

impl TlsFiles {
    /// Reads and checks the three files: the CA bundle parses, the chain parses, and the
    /// key is a PKCS#8 key matching the certificate.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, PemFileError> {
        let files = Self {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        };
        TrustAnchors::from_pem(&files.ca_pem).map_err(in_file(ca))?;
        certs_from_pem(&files.cert_pem, "certificate").map_err(in_file(cert))?;
        PrivatePkcs8KeyDer::from_pem_slice(&files.key_pem).map_err(|e| PemFileError {
            path: key.to_owned(),
            detail: format!("expected a PKCS#8 \"PRIVATE KEY\" PEM block: {e}"),
        })?;
        SigningKey::from_pem(&files.cert_pem, &files.key_pem).map_err(in_file(key))?;
        Ok(files)
    }

    pub fn trust_anchors(&self) -> Result<TrustAnchors, ProtocolError> {
        TrustAnchors::from_pem(&self.ca_pem)
    }

    pub fn signing_key(&self) -> Result<SigningKey, ProtocolError> {
        SigningKey::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Server side: our identity, and client certificates required from `ca_pem`.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    /// Client side: trust `ca_pem` for the server, present our certificate.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(server_name)
    }
}
