//! Certificate revocation lists (CRLs, RFC 5280), parsed once and used both by the TLS
//! client verifier (as DER) and by document-signature checks ([`TrustAnchors::check_revocation`]).
//!
//! Only the end-entity certificate is checked (the leaf: a TLS client or a document
//! signer), and a certificate whose issuer publishes no configured CRL has unknown status,
//! which is allowed: CRLs are configured per CA, and a CA without one is trusted as
//! before. A CRL's own signature is checked against the issuer found while building the
//! chain, so a forged CRL revokes nothing. Whether a CRL past its nextUpdate is refused
//! is the caller's choice (`enforce_expiry`); webpki accepts it otherwise.

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::prelude::FromDer;

use crate::ProtocolError;
use crate::signing::TrustAnchors;

/// What a loaded CRL says about itself, for health views and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    pub issuer: String,
    pub this_update_ms: i64,
    /// None when the CRL has no nextUpdate (then it never goes stale).
    pub next_update_ms: Option<i64>,
    pub revoked: usize,
}

/// Parsed CRLs.
#[derive(Clone, Default)]
pub struct RevocationLists {
    ders: Vec<CertificateRevocationListDer<'static>>,
    parsed: Vec<std::sync::Arc<CertRevocationList<'static>>>,
    infos: Vec<CrlInfo>,
}

impl std::fmt::Debug for RevocationLists {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationLists")
            .field("crls", &self.infos)
            .finish()
    }
}

impl RevocationLists {
    /// Adds every CRL of `bytes`: PEM ("X509 CRL" blocks) or one DER CRL.
    pub fn add(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        use rustls_pki_types::pem::PemObject;
        let malformed = |detail: String| ProtocolError::Malformed {
            what: "certificate revocation list",
            detail,
        };
        let ders: Vec<CertificateRevocationListDer<'static>> =
            if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                CertificateRevocationListDer::pem_slice_iter(bytes)
                    .collect::<Result<_, _>>()
                    .map_err(|e| malformed(e.to_string()))?
            } else {
                vec![CertificateRevocationListDer::from(bytes.to_vec())]
            };
        if ders.is_empty() {
            return Err(malformed("no X509 CRL block".into()));
        }
        for der in ders {
            let owned =
                OwnedCertRevocationList::from_der(&der).map_err(|e| malformed(format!("{e:?}")))?;
            let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
                .map_err(|e| malformed(e.to_string()))?;
            let ms = |t: x509_parser::time::ASN1Time| t.timestamp().saturating_mul(1000);
            self.infos.push(CrlInfo {
                issuer: crate::agency::name_text(&crl.issuer().to_string()),
                this_update_ms: ms(crl.last_update()),
                next_update_ms: crl.next_update().map(ms),
                revoked: crl.iter_revoked_certificates().count(),
            });
            self.parsed
                .push(std::sync::Arc::new(CertRevocationList::from(owned)));
            self.ders.push(der);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.parsed.is_empty()
    }

    /// The CRLs as DER, for rustls's client verifier.
    pub fn ders(&self) -> &[CertificateRevocationListDer<'static>] {
        &self.ders
    }

    pub fn infos(&self) -> &[CrlInfo] {
        &self.infos
    }
}

impl TrustAnchors {
    /// Checks the leaf of `chain` (leaf first, then intermediates; DER) against `lists`
    /// at `at`: `Ok` when no CRL of its issuer revokes it (or none is configured).
    /// With `enforce_expiry`, a CRL of its issuer past its nextUpdate is an error.
    pub fn check_revocation(
        &self,
        chain: &[Vec<u8>],
        lists: &RevocationLists,
        at: UnixTime,
        enforce_expiry: bool,
    ) -> Result<(), ProtocolError> {
        if lists.is_empty() {
            return Ok(());
        }
        let (leaf, intermediates) = chain.split_first().ok_or(ProtocolError::NoCertificate)?;
        let leaf = CertificateDer::from(leaf.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let cert = EndEntityCert::try_from(&leaf).map_err(|e| ProtocolError::Malformed {
            what: "signer certificate",
            detail: e.to_string(),
        })?;
        let refs: Vec<&CertRevocationList<'_>> = lists.parsed.iter().map(|c| c.as_ref()).collect();
        let options = RevocationOptionsBuilder::new(&refs)
            .map_err(|_| ProtocolError::SignerRefused {
                detail: "no CRL configured".into(),
            })?
            .with_depth(RevocationCheckDepth::EndEntity)
            .with_status_policy(UnknownStatusPolicy::Allow)
            .with_expiration_policy(if enforce_expiry {
                ExpirationPolicy::Enforce
            } else {
                ExpirationPolicy::Ignore
            })
            .build();
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            self.anchors(),
            &intermediates,
            at,
            KeyUsage::client_auth(),
            Some(options),
            None,
        )
        .map(|_| ())
        .map_err(|e| ProtocolError::SignerRefused {
            detail: match e {
                webpki::Error::CertRevoked => "the signer's certificate is revoked (CRL)".into(),
                webpki::Error::CrlExpired { .. } => {
                    "the CRL of the signer's CA is out of date (past its nextUpdate); \
                     the broker refuses until a fresh one is loaded"
                        .into()
                }
                other => format!("revocation check failed: {other:?}"),
            },
        })
    }
}
