//! Signing keys, trust anchors, and signatures over exact bytes.
//!
//! Every signature covers `domain prefix || payload`. The prefix says what the payload
//! is, so a signature made over a receipt can never be replayed as a document header
//! and the other way round. Verification checks the signer's certificate chain against
//! the configured trust anchors first, then the signature, and only then does any
//! caller decode the payload.
//!
//! A private key lives in a PEM file (ring signs in this process) or on a hardware
//! token behind a [`DigestSigner`]: the exact bytes a file key would sign are hashed
//! here and only the SHA-256 digest goes to the token, whose raw `r || s` answer is
//! re-encoded as the ASN.1 signature a file key produces, so verifiers cannot tell
//! the two apart.

use std::time::Duration;

use ring::rand::SystemRandom;
use ring::signature::{self as ring_sig, KeyPair as _};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, TrustAnchor, UnixTime};
use webpki::{EndEntityCert, KeyUsage};

use crate::ProtocolError;
use crate::agency::PeerIdentity;
use crate::pb::{BatchProof, SignatureAlgorithm, Signed};

/// What a signed payload is; selects the domain-separation prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    DocumentHeader,
    Receipt,
}

impl Domain {
    fn prefix(self) -> &'static [u8] {
        match self {
            Domain::DocumentHeader => b"lienthong/v1 document-header\0",
            Domain::Receipt => b"lienthong/v1 receipt\0",
        }
    }
}

/// Which extended key usage the signer's certificate must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignerRole {
    /// Agencies sign with client (or seal) certificates.
    Agency,
    /// The broker signs submission receipts with its server certificate.
    Broker,
}

/// An ECDSA P-256 private key held outside this process (a PKCS#11 token): it signs a
/// SHA-256 digest and answers the raw `r || s` (32 + 32 bytes, big-endian), as
/// PKCS#11's `CKM_ECDSA` does. Implementations must be callable from any thread.
pub trait DigestSigner: Send + Sync {
    /// Signs `digest`. An error's text is shown to the operator: it should name the
    /// device and say what failed, and never carry a PIN.
    fn sign_digest(
        &self,
        digest: &[u8; 32],
    ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>>;

    /// Where the key is, for logs (e.g. the token and object labels).
    fn describe(&self) -> String;
}

enum KeyKind {
    Ed25519(ring_sig::Ed25519KeyPair),
    Ecdsa(ring_sig::EcdsaKeyPair, SignatureAlgorithm),
    Rsa(ring_sig::RsaKeyPair),
    /// ECDSA P-256 on a token; the public key is the leaf certificate's.
    External {
        signer: std::sync::Arc<dyn DigestSigner>,
        public_key: Vec<u8>,
    },
}

/// A private key with its certificate chain (leaf first), able to produce [`Signed`].
pub struct SigningKey {
    kind: KeyKind,
    chain: Vec<CertificateDer<'static>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for SigningKey {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm())
            .field("chain_len", &self.chain.len())
            .finish()
    }
}

impl SigningKey {
    /// Loads a PKCS#8 private key (PEM) and its certificate chain (PEM, leaf first).
    /// ECDSA P-256 and P-384, Ed25519 and RSA (2048 bits or more) are recognised.
    pub fn from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, ProtocolError> {
        let chain = certs_from_pem(cert_chain_pem, "certificate chain")?;
        let key = PrivatePkcs8KeyDer::from_pem_slice(key_pem).map_err(|e| ProtocolError::Pem {
            what: "private key (expected PKCS#8 \"PRIVATE KEY\")",
            detail: e.to_string(),
        })?;
        Self::from_pkcs8_der(chain, key.secret_pkcs8_der())
    }

    /// Loads a PKCS#8 DER private key with its DER certificate chain (leaf first).
    pub fn from_pkcs8_der(
        chain: Vec<CertificateDer<'static>>,
        pkcs8: &[u8],
    ) -> Result<Self, ProtocolError> {
        let rng = SystemRandom::new();
        let kind = if let Ok(k) = ring_sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8) {
            KeyKind::Ed25519(k)
        } else if let Ok(k) = ring_sig::EcdsaKeyPair::from_pkcs8(
            &ring_sig::ECDSA_P256_SHA256_ASN1_SIGNING,
            pkcs8,
            &rng,
        ) {
            KeyKind::Ecdsa(k, SignatureAlgorithm::EcdsaP256Sha256)
        } else if let Ok(k) = ring_sig::EcdsaKeyPair::from_pkcs8(
            &ring_sig::ECDSA_P384_SHA384_ASN1_SIGNING,
            pkcs8,
            &rng,
        ) {
            KeyKind::Ecdsa(k, SignatureAlgorithm::EcdsaP384Sha384)
        } else if let Ok(k) = ring_sig::RsaKeyPair::from_pkcs8(pkcs8) {
            KeyKind::Rsa(k)
        } else {
            return Err(ProtocolError::Key {
                detail: "not an ECDSA P-256/P-384, Ed25519 or RSA PKCS#8 key".into(),
            });
        };
        let key = Self { kind, chain, rng };
        key.check_matches_certificate()?;
        Ok(key)
    }

    /// A key held by `signer` (ECDSA P-256, e.g. on a PKCS#11 token) with its DER
    /// certificate chain (leaf first). The leaf must hold a P-256 public key; one
    /// signature is made at once to check that the key belongs to it.
    pub fn from_digest_signer(
        chain: Vec<CertificateDer<'static>>,
        signer: std::sync::Arc<dyn DigestSigner>,
    ) -> Result<Self, ProtocolError> {
        let leaf = chain.first().ok_or(ProtocolError::NoCertificate)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| ProtocolError::Malformed {
                what: "certificate",
                detail: e.to_string(),
            })?;
        let spki = &cert.tbs_certificate.subject_pki;
        let is_p256 = spki.algorithm.algorithm
            == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
            && spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .is_some_and(|curve| curve == x509_parser::oid_registry::OID_EC_P256);
        if !is_p256 {
            return Err(ProtocolError::Key {
                detail: format!(
                    "a key on a token must be ECDSA P-256, and the certificate for {} holds another kind of key",
                    signer.describe()
                ),
            });
        }
        let public_key = spki.subject_public_key.data.to_vec();
        let key = Self {
            kind: KeyKind::External { signer, public_key },
            chain,
            rng: SystemRandom::new(),
        };
        key.check_matches_certificate()?;
        Ok(key)
    }

    /// Refuses a key that does not belong to the leaf certificate: everything it signed
    /// would fail verification later, far from the mistake.
    fn check_matches_certificate(&self) -> Result<(), ProtocolError> {
        let leaf = self.chain.first().ok_or(ProtocolError::NoCertificate)?;
        let probe = b"lienthong key check";
        let signature = self.sign_raw(probe)?;
        let cert = EndEntityCert::try_from(leaf).map_err(|e| ProtocolError::Malformed {
            what: "certificate",
            detail: e.to_string(),
        })?;
        cert.verify_signature(webpki_algorithm(self.algorithm())?, probe, &signature)
            .map_err(|_| ProtocolError::Key {
                detail: "the private key does not match the certificate".into(),
            })
    }

    pub fn algorithm(&self) -> SignatureAlgorithm {
        match &self.kind {
            KeyKind::Ed25519(_) => SignatureAlgorithm::Ed25519,
            KeyKind::Ecdsa(_, alg) => *alg,
            KeyKind::Rsa(_) => SignatureAlgorithm::RsaPssSha256,
            KeyKind::External { .. } => SignatureAlgorithm::EcdsaP256Sha256,
        }
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The identity in the leaf certificate's SAN URI.
    pub fn identity(&self) -> Result<PeerIdentity, ProtocolError> {
        let leaf = self.chain.first().ok_or(ProtocolError::NoCertificate)?;
        PeerIdentity::from_cert_der(leaf)
    }

    /// The public key bytes, for diagnostics and tests.
    pub fn public_key(&self) -> Vec<u8> {
        match &self.kind {
            KeyKind::Ed25519(k) => k.public_key().as_ref().to_vec(),
            KeyKind::Ecdsa(k, _) => k.public_key().as_ref().to_vec(),
            KeyKind::Rsa(k) => k.public_key().as_ref().to_vec(),
            KeyKind::External { public_key, .. } => public_key.clone(),
        }
    }

    fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        let failed = |_| ProtocolError::Key {
            detail: "signing failed".into(),
        };
        match &self.kind {
            KeyKind::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            KeyKind::Ecdsa(k, _) => Ok(k
                .sign(&self.rng, message)
                .map_err(failed)?
                .as_ref()
                .to_vec()),
            KeyKind::Rsa(k) => {
                let mut signature = vec![0u8; k.public().modulus_len()];
                k.sign(
                    &ring_sig::RSA_PSS_SHA256,
                    &self.rng,
                    message,
                    &mut signature,
                )
                .map_err(failed)?;
                Ok(signature)
            }
            KeyKind::External { signer, .. } => {
                // The same bytes a file key signs, hashed here; the token signs the digest.
                let digest = crate::sha256(message);
                let fixed = signer
                    .sign_digest(&digest)
                    .map_err(|e| ProtocolError::Key {
                        detail: e.to_string(),
                    })?;
                ecdsa_fixed_to_asn1(&fixed).ok_or_else(|| ProtocolError::Key {
                    detail: format!(
                        "{} answered a {}-byte signature, not the 64 bytes of r || s",
                        signer.describe(),
                        fixed.len()
                    ),
                })
            }
        }
    }

    /// Signs `domain prefix || payload` and packs the payload, the signature, the
    /// algorithm and the chain into a [`Signed`].
    pub fn sign(&self, domain: Domain, payload: bytes::Bytes) -> Result<Signed, ProtocolError> {
        let mut message = Vec::with_capacity(domain.prefix().len() + payload.len());
        message.extend_from_slice(domain.prefix());
        message.extend_from_slice(&payload);
        let signature = self.sign_raw(&message)?;
        Ok(Signed {
            payload,
            signature,
            algorithm: self.algorithm() as i32,
            cert_chain: self.chain_der(),
            batch: None,
        })
    }

    fn chain_der(&self) -> Vec<Vec<u8>> {
        self.chain.iter().map(|c| c.to_vec()).collect()
    }

    /// Signs many payloads of one domain with one signature (DESIGN section 4): the
    /// signature covers the root of a Merkle tree over the payloads and each returned
    /// [`Signed`] (in the order of `payloads`) carries its inclusion proof. One payload
    /// is signed directly, exactly as [`SigningKey::sign`] does; none gives none.
    pub fn sign_batch(
        &self,
        domain: Domain,
        payloads: Vec<bytes::Bytes>,
    ) -> Result<Vec<Signed>, ProtocolError> {
        match payloads.len() {
            0 => return Ok(Vec::new()),
            1 => {
                let payload = payloads.into_iter().next().unwrap_or_default();
                return Ok(vec![self.sign(domain, payload)?]);
            }
            _ => {}
        }
        let tree_size = u64::try_from(payloads.len())
            .ok()
            .filter(|n| *n <= crate::merkle::MAX_TREE_SIZE)
            .ok_or(ProtocolError::BadBatchProof(
                crate::merkle::ProofError::TreeSize,
            ))?;
        let leaves: Vec<_> = payloads
            .iter()
            .map(|p| crate::merkle::leaf_hash(domain.prefix(), p))
            .collect();
        let (root, paths) = crate::merkle::root_and_paths(&leaves);
        let signature = self.sign_raw(&batch_root_message(tree_size, &root))?;
        let chain = self.chain_der();
        let algorithm = self.algorithm() as i32;
        Ok(payloads
            .into_iter()
            .zip(paths)
            .enumerate()
            .map(|(index, (payload, path))| Signed {
                payload,
                signature: signature.clone(),
                algorithm,
                cert_chain: chain.clone(),
                batch: Some(BatchProof {
                    leaf_index: index as u64,
                    tree_size,
                    audit_path: path.iter().map(|h| h.to_vec()).collect(),
                }),
            })
            .collect())
    }
}

/// Re-encodes a raw P-256 ECDSA signature `r || s` (64 bytes) as the DER
/// `ECDSA-Sig-Value` (RFC 3279) that ring's `ECDSA_P256_SHA256_ASN1` produces and
/// verifies. None when `fixed` is not 64 bytes.
pub fn ecdsa_fixed_to_asn1(fixed: &[u8]) -> Option<Vec<u8>> {
    if fixed.len() != 64 {
        return None;
    }
    let (r, s) = fixed.split_at(32);
    // Each INTEGER: minimal big-endian, with a 0x00 in front when the top bit is set
    // (the value is positive). At most 2 + 33 bytes, so every length fits one byte.
    let integer = |bytes: &[u8]| {
        let start = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        let body = &bytes[start..];
        let pad = body.first().is_some_and(|b| b & 0x80 != 0);
        let mut out = Vec::with_capacity(35);
        out.push(0x02);
        out.push(u8::try_from(body.len() + usize::from(pad)).unwrap_or(u8::MAX));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(body);
        out
    };
    let (r, s) = (integer(r), integer(s));
    let mut der = Vec::with_capacity(2 + r.len() + s.len());
    der.push(0x30);
    der.push(u8::try_from(r.len() + s.len()).ok()?);
    der.extend_from_slice(&r);
    der.extend_from_slice(&s);
    Some(der)
}

/// What a batch signature covers: a prefix no single payload's signature uses, the
/// tree size and the root. The payloads' own domain is bound in each leaf.
const BATCH_ROOT_PREFIX: &[u8] = b"lienthong/v1 batch-root\0";

fn batch_root_message(tree_size: u64, root: &crate::merkle::Hash) -> Vec<u8> {
    let mut message = Vec::with_capacity(BATCH_ROOT_PREFIX.len() + 8 + 32);
    message.extend_from_slice(BATCH_ROOT_PREFIX);
    message.extend_from_slice(&tree_size.to_be_bytes());
    message.extend_from_slice(root);
    message
}

/// Reads every certificate in a PEM bundle; an empty bundle is an error.
pub fn certs_from_pem(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, ProtocolError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ProtocolError::Pem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(ProtocolError::Pem {
            what,
            detail: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// The certificate authorities whose certificates may sign (documents or receipts).
#[derive(Clone)]
pub struct TrustAnchors {
    anchors: Vec<TrustAnchor<'static>>,
    /// Chains already verified against these anchors: SHA-256 over the role and the DER
    /// chain → the span in which every certificate of the chain is valid (latest
    /// notBefore, earliest notAfter; Unix seconds). A chain that verified at one time
    /// verifies at any time in that span (its signatures do not depend on the time), so
    /// a hit skips building the path again (one signature check per chain link), for a
    /// verification now as for evidence checked at its receipt's time; the signature
    /// over the payload is always checked.
    verified_chains: std::sync::Arc<std::sync::Mutex<ValiditySpans>>,
    /// Batch signatures already checked (see [`TrustAnchors::root_key`]): the other
    /// items of a batch then cost their inclusion proof only.
    verified_roots: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>>,
}

/// Checked batch signatures remembered at most; the cache is emptied when it is full.
const VERIFIED_ROOTS_MAX: usize = 4096;

/// Chain key → (latest notBefore, earliest notAfter) in Unix seconds.
type ValiditySpans = std::collections::HashMap<[u8; 32], (i64, i64)>;

/// Verified chains remembered at most; the cache is emptied when it is full.
const VERIFIED_CHAINS_MAX: usize = 4096;

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustAnchors({} anchors)", self.anchors.len())
    }
}

impl TrustAnchors {
    /// Every certificate in the PEM bundle becomes a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, ProtocolError> {
        let certs = certs_from_pem(pem, "trust anchors")?;
        let anchors = certs
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| ProtocolError::Malformed {
                        what: "trust anchor certificate",
                        detail: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            anchors,
            verified_chains: std::sync::Arc::default(),
            verified_roots: std::sync::Arc::default(),
        })
    }

    /// The trust anchors, for checks that build their own path (revocation).
    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    fn chain_key(role: SignerRole, chain: &[Vec<u8>]) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(&[role as u8]);
        for cert in chain {
            context.update(&(cert.len() as u64).to_be_bytes());
            context.update(cert);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(context.finish().as_ref());
        key
    }

    /// Identifies a checked batch signature: the signed root message, the signature,
    /// the algorithm and the signer's chain.
    fn root_key(signed: &Signed, root_message: &[u8]) -> [u8; 32] {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [root_message, &signed.signature] {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        context.update(&signed.algorithm.to_be_bytes());
        for cert in &signed.cert_chain {
            context.update(&(cert.len() as u64).to_be_bytes());
            context.update(cert);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(context.finish().as_ref());
        key
    }

    fn root_known_valid(&self, key: &[u8; 32]) -> bool {
        self.verified_roots
            .lock()
            .ok()
            .is_some_and(|cache| cache.contains(key))
    }

    fn remember_root(&self, key: [u8; 32]) {
        if let Ok(mut cache) = self.verified_roots.lock() {
            if cache.len() >= VERIFIED_ROOTS_MAX {
                cache.clear();
            }
            cache.insert(key);
        }
    }

    fn chain_known_valid(&self, key: &[u8; 32], at_secs: i64) -> bool {
        self.verified_chains
            .lock()
            .ok()
            .and_then(|cache| cache.get(key).copied())
            .is_some_and(|(not_before, not_after)| not_before <= at_secs && at_secs < not_after)
    }

    fn remember_chain(&self, key: [u8; 32], chain: &[Vec<u8>]) {
        let parsed: Vec<_> = chain
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, cert)| {
                (
                    cert.validity().not_before.timestamp(),
                    cert.validity().not_after.timestamp(),
                )
            })
            .collect();
        // A certificate that does not parse here is not remembered at all.
        if parsed.len() != chain.len() {
            return;
        }
        let not_before = parsed.iter().map(|(b, _)| *b).max();
        let not_after = parsed.iter().map(|(_, a)| *a).min();
        let (Some(not_before), Some(not_after), Ok(mut cache)) =
            (not_before, not_after, self.verified_chains.lock())
        else {
            return;
        };
        if cache.len() >= VERIFIED_CHAINS_MAX {
            cache.clear();
        }
        cache.insert(key, (not_before, not_after));
    }
}

/// When a certificate chain must have been valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyTime {
    Now,
    /// Unix milliseconds: e.g. the time the broker's receipt says it accepted a
    /// document, for checking evidence long after the certificates expired.
    AtMs(i64),
}

impl VerifyTime {
    fn unix_time(self) -> UnixTime {
        match self {
            VerifyTime::Now => UnixTime::now(),
            VerifyTime::AtMs(ms) => {
                UnixTime::since_unix_epoch(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
            }
        }
    }
}

fn webpki_algorithm(
    algorithm: SignatureAlgorithm,
) -> Result<&'static dyn rustls_pki_types::SignatureVerificationAlgorithm, ProtocolError> {
    use webpki::ring as algs;
    Ok(match algorithm {
        SignatureAlgorithm::EcdsaP256Sha256 => algs::ECDSA_P256_SHA256,
        SignatureAlgorithm::EcdsaP384Sha384 => algs::ECDSA_P384_SHA384,
        SignatureAlgorithm::Ed25519 => algs::ED25519,
        SignatureAlgorithm::RsaPkcs1Sha256 => algs::RSA_PKCS1_2048_8192_SHA256,
        SignatureAlgorithm::RsaPkcs1Sha384 => algs::RSA_PKCS1_2048_8192_SHA384,
        SignatureAlgorithm::RsaPssSha256 => algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        SignatureAlgorithm::RsaPssSha384 => algs::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
        SignatureAlgorithm::Unspecified => return Err(ProtocolError::UnsupportedAlgorithm),
    })
}

/// Algorithms accepted in certificate chains.
static CHAIN_ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

fn map_chain_error(error: webpki::Error) -> ProtocolError {
    match error {
        webpki::Error::UnknownIssuer => ProtocolError::UnknownIssuer,
        webpki::Error::CertExpired { .. } => ProtocolError::CertificateExpired,
        webpki::Error::CertNotValidYet { .. } => ProtocolError::CertificateNotYetValid,
        other => ProtocolError::CertificateInvalid {
            detail: other.to_string(),
        },
    }
}

/// Checks a [`Signed`]: the chain against `anchors` at `time` for `role`, then the
/// signature over `domain prefix || payload`. Returns the leaf certificate (DER) of the
/// signer; the payload may be decoded only after this succeeded.
pub fn verify_signed<'a>(
    signed: &'a Signed,
    domain: Domain,
    anchors: &TrustAnchors,
    role: SignerRole,
    time: VerifyTime,
) -> Result<&'a [u8], ProtocolError> {
    let algorithm = SignatureAlgorithm::try_from(signed.algorithm)
        .map_err(|_| ProtocolError::UnsupportedAlgorithm)?;
    let webpki_alg = webpki_algorithm(algorithm)?;
    let (leaf, intermediates) = signed
        .cert_chain
        .split_first()
        .ok_or(ProtocolError::NoCertificate)?;
    let leaf_der = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let cert = EndEntityCert::try_from(&leaf_der).map_err(|e| ProtocolError::Malformed {
        what: "signer certificate",
        detail: e.to_string(),
    })?;
    let usage = match role {
        SignerRole::Agency => KeyUsage::client_auth(),
        SignerRole::Broker => KeyUsage::server_auth(),
    };
    // A recipient checks every delivery's submission receipt at the receipt's own time:
    // the cache serves those checks as well as checks "now".
    let at_secs = i64::try_from(time.unix_time().as_secs()).unwrap_or(i64::MAX);
    let cache_key = Some(TrustAnchors::chain_key(role, &signed.cert_chain));
    let known = cache_key
        .as_ref()
        .is_some_and(|key| anchors.chain_known_valid(key, at_secs));
    if !known {
        cert.verify_for_usage(
            CHAIN_ALGORITHMS,
            &anchors.anchors,
            &intermediates,
            time.unix_time(),
            usage,
            None,
            None,
        )
        .map_err(map_chain_error)?;
        if let Some(key) = cache_key {
            anchors.remember_chain(key, &signed.cert_chain);
        }
    }

    let message = match &signed.batch {
        None => {
            let mut message = Vec::with_capacity(domain.prefix().len() + signed.payload.len());
            message.extend_from_slice(domain.prefix());
            message.extend_from_slice(&signed.payload);
            message
        }
        Some(proof) => {
            let leaf_hash = crate::merkle::leaf_hash(domain.prefix(), &signed.payload);
            let root = crate::merkle::root_from_path(
                leaf_hash,
                proof.leaf_index,
                proof.tree_size,
                &proof.audit_path,
            )
            .map_err(ProtocolError::BadBatchProof)?;
            batch_root_message(proof.tree_size, &root)
        }
    };
    // A batch root already checked with this signature, algorithm and chain needs no
    // second public-key operation: the chain itself was checked above for this time.
    let root_key = signed
        .batch
        .is_some()
        .then(|| TrustAnchors::root_key(signed, &message));
    if root_key
        .as_ref()
        .is_some_and(|key| anchors.root_known_valid(key))
    {
        return Ok(leaf);
    }
    cert.verify_signature(webpki_alg, &message, &signed.signature)
        .map_err(|e| match e {
            webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
            | webpki::Error::SignatureAlgorithmMismatch => ProtocolError::AlgorithmMismatch,
            _ => ProtocolError::BadSignature,
        })?;
    if let Some(key) = root_key {
        anchors.remember_root(key);
    }
    Ok(leaf)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// Raw `r || s` signatures from ring, re-encoded, verify as ring's own ASN.1 ones:
    /// many signatures cover r and s with the top bit set and with leading zero bytes.
    #[test]
    fn fixed_signatures_reencoded_verify_as_asn1() {
        let rng = SystemRandom::new();
        let pkcs8 = ring_sig::EcdsaKeyPair::generate_pkcs8(
            &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let key = ring_sig::EcdsaKeyPair::from_pkcs8(
            &ring_sig::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let public = ring_sig::UnparsedPublicKey::new(
            &ring_sig::ECDSA_P256_SHA256_ASN1,
            key.public_key().as_ref().to_vec(),
        );
        for i in 0..300u32 {
            let message = i.to_be_bytes();
            let fixed = key.sign(&rng, &message).unwrap();
            let der = ecdsa_fixed_to_asn1(fixed.as_ref()).unwrap();
            public.verify(&message, &der).unwrap();
        }
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        let mut fixed = [0u8; 64];
        fixed[31] = 0x01; // r = 1
        fixed[32] = 0x80; // s has its top bit set
        let der = ecdsa_fixed_to_asn1(&fixed).unwrap();
        assert_eq!(&der[..5], &[0x30, 3 + 35, 0x02, 0x01, 0x01]);
        assert_eq!(&der[5..8], &[0x02, 33, 0x00]);
        assert_eq!(der.len(), 2 + 3 + 35);
        assert!(ecdsa_fixed_to_asn1(&[0u8; 63]).is_none());
    }

    /// A token that answers badly: the wrong length, or a signature by another key.
    struct Broken(Vec<u8>);

    impl DigestSigner for Broken {
        fn sign_digest(
            &self,
            _digest: &[u8; 32],
        ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
            Ok(self.0.clone())
        }
        fn describe(&self) -> String {
            "the test token".into()
        }
    }

    /// A token that is gone.
    struct Gone;

    impl DigestSigner for Gone {
        fn sign_digest(
            &self,
            _digest: &[u8; 32],
        ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
            Err("token \"t\" is not reachable".into())
        }
        fn describe(&self) -> String {
            "the test token".into()
        }
    }

    fn agency_chain(spec: &lienthong_certs_dev::LeafSpec) -> Vec<CertificateDer<'static>> {
        let ca = lienthong_certs_dev::DevCa::generate("test CA").unwrap();
        let issued = ca.issue(spec).unwrap();
        vec![CertificateDer::from(issued.cert_der)]
    }

    #[test]
    fn a_token_key_is_checked_against_its_certificate() {
        let chain = agency_chain(&lienthong_certs_dev::LeafSpec::agency("000.00.00.H31"));
        let short =
            SigningKey::from_digest_signer(chain.clone(), std::sync::Arc::new(Broken(vec![1; 10])));
        assert!(
            matches!(&short, Err(ProtocolError::Key { detail }) if detail.contains("10-byte")),
            "{short:?}"
        );
        let other = SigningKey::from_digest_signer(
            chain.clone(),
            std::sync::Arc::new(Broken(vec![0x55; 64])),
        );
        assert_eq!(
            other.err(),
            Some(ProtocolError::Key {
                detail: "the private key does not match the certificate".into()
            })
        );
        let gone = SigningKey::from_digest_signer(chain, std::sync::Arc::new(Gone));
        assert_eq!(
            gone.err(),
            Some(ProtocolError::Key {
                detail: "token \"t\" is not reachable".into()
            })
        );
    }

    #[test]
    fn a_token_key_must_be_p256() {
        let spec = lienthong_certs_dev::LeafSpec::agency("000.00.00.H31")
            .with_key_algorithm(lienthong_certs_dev::KeyAlgorithm::Ed25519);
        let result = SigningKey::from_digest_signer(agency_chain(&spec), std::sync::Arc::new(Gone));
        assert!(
            matches!(&result, Err(ProtocolError::Key { detail }) if detail.contains("must be ECDSA P-256")),
            "{result:?}"
        );
    }
}
