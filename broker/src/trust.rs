//! Who a certificate is: the registry of certificate bindings and the operator block
//! list, both keyed by the SHA-256 of the certificate's SubjectPublicKeyInfo (SPKI).
//!
//! Identity = binding. A certificate whose SPKI is bound to an agency is that agency,
//! whatever its subject says; government CAs issue certificates with no lienthong URI,
//! so an operator binds them (`lienthong admin agencies bind CODE CERT.pem`). The dev
//! PKI's SAN URI `urn:lienthong:agency:<code>` still works unchanged: such a certificate
//! with no binding yet is **bound on first use** (its first authenticated call, or the
//! first document it signed), provided the agency is registered or may be registered
//! automatically. The binding is recorded in the audit log as made by the SAN URI. Each
//! certificate (TLS, seal, a rollover's new key) gets its own binding and can be blocked
//! alone.
//!
//! Trees (in the store's database, made durable by its group commit):
//! - `bindings`: SPKI hash (32 bytes) → [`BindingRecord`].
//! - `blocked`: SPKI hash (32 bytes) → [`BlockRecord`].
//!
//! Invariants:
//! - A blocked SPKI is refused before any binding or URI is looked at, for TLS callers
//!   and document signers alike.
//! - A bound certificate whose SAN URI names another identity is refused as conflicting
//!   rather than trusting either.
//! - A block (and an unbind) is written while the bound agency's admission gate is held
//!   for writing, then the agency's open submissions are cancelled and its session is
//!   ended: no submission of it stores a document after the block is written. Ending
//!   the session ends it for all of the agency's certificates (the hub knows sessions by
//!   agency): a session on another, still trusted certificate reconnects at once.
//! - Operator certificates are identified by their SAN URI only; they are never bound.

use lienthong_proto::agency::{SignerIdentity, spki_sha256, subject_text};
use lienthong_proto::{AgencyCode, PeerIdentity, ProtocolError};
use prost::Message;

use crate::Shared;
use crate::error::BrokerError;
use crate::store::{Store, StoreError};

/// One certificate bound to an agency.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BindingRecord {
    #[prost(string, tag = "1")]
    pub code: String,
    /// The certificate's subject when it was bound, for people.
    #[prost(string, tag = "2")]
    pub subject: String,
    #[prost(int64, tag = "3")]
    pub bound_at_ms: i64,
    /// "operator NAME" or "SAN URI on first use".
    #[prost(string, tag = "4")]
    pub bound_by: String,
}

/// One blocked SPKI.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BlockRecord {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(int64, tag = "2")]
    pub blocked_at_ms: i64,
    #[prost(string, tag = "3")]
    pub blocked_by: String,
    /// The agency the SPKI was bound to when blocked; empty when none.
    #[prost(string, tag = "4")]
    pub code: String,
}

/// Why a certificate is not accepted as an identity.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("the certificate with SPKI SHA-256 {hash} is blocked by the operator: {reason}")]
    Blocked { hash: String, reason: String },
    #[error(
        "the certificate with SPKI SHA-256 {hash} ({subject}) is not bound to any agency and \
         carries no lienthong identity; an operator binds it with \
         `lienthong admin agencies bind CODE CERT.pem`"
    )]
    Unbound { hash: String, subject: String },
    #[error(
        "the certificate with SPKI SHA-256 {hash} is bound to agency {bound} but names {named} \
         in its SAN URI; refused as conflicting"
    )]
    Conflict {
        hash: String,
        bound: String,
        named: String,
    },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for TrustError {
    fn from(e: sled::Error) -> Self {
        Self::Store(StoreError::from(e))
    }
}

impl From<TrustError> for BrokerError {
    fn from(e: TrustError) -> Self {
        match e {
            TrustError::Store(e) => BrokerError::Store(e),
            TrustError::Protocol(e) => {
                BrokerError::Unauthenticated(format!("the client certificate is not usable: {e}"))
            }
            other => BrokerError::Unauthenticated(other.to_string()),
        }
    }
}

/// The bindings and the block list.
pub(crate) struct Trust {
    bindings: sled::Tree,
    blocked: sled::Tree,
    store: Store,
    /// Whether an unregistered agency is registered on its first connection: a SAN URI
    /// naming an agency that will be refused anyway makes no binding.
    auto_register: bool,
    /// CRLs, checked for document signers after their identity.
    revocation: std::sync::Arc<crate::revocation::Revocation>,
}

/// Lower-case hex of an SPKI hash, as shown and accepted by the CLI.
pub(crate) fn hash_hex(hash: &[u8]) -> String {
    hex::encode(hash)
}

/// An SPKI hash from the wire: exactly 32 bytes.
pub(crate) fn parse_hash(bytes: &[u8]) -> Result<[u8; 32], BrokerError> {
    <[u8; 32]>::try_from(bytes).map_err(|_| {
        BrokerError::InvalidArgument(format!("an SPKI SHA-256 is 32 bytes, got {}", bytes.len()))
    })
}

fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, TrustError> {
    M::decode(bytes).map_err(|e| TrustError::Store(StoreError::from(e)))
}

impl Trust {
    pub(crate) fn open(
        store: &Store,
        auto_register: bool,
        revocation: std::sync::Arc<crate::revocation::Revocation>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            revocation,
            bindings: store.tree("bindings")?,
            blocked: store.tree("blocked")?,
            store: store.clone(),
            auto_register,
        })
    }

    /// The block on `hash`, if any.
    pub(crate) fn block_of(&self, hash: &[u8; 32]) -> Result<Option<BlockRecord>, TrustError> {
        self.blocked.get(hash)?.map(|v| decode(&v)).transpose()
    }

    /// The binding of `hash`, if any.
    pub(crate) fn binding_of(&self, hash: &[u8; 32]) -> Result<Option<BindingRecord>, TrustError> {
        self.bindings.get(hash)?.map(|v| decode(&v)).transpose()
    }

    /// Who the holder of the chain-verified leaf `leaf_der` is: blocked → refused; bound
    /// → the bound agency; a lienthong SAN URI → that identity (an agency's certificate
    /// is bound on this first use); otherwise refused as unbound.
    pub(crate) fn identify(&self, leaf_der: &[u8]) -> Result<PeerIdentity, TrustError> {
        let hash = spki_sha256(leaf_der)?;
        if let Some(block) = self.block_of(&hash)? {
            return Err(TrustError::Blocked {
                hash: hash_hex(&hash),
                reason: block.reason,
            });
        }
        let named = PeerIdentity::from_cert_der(leaf_der);
        if let Some(binding) = self.binding_of(&hash)? {
            let bound = AgencyCode::parse(&binding.code)?;
            return match named {
                Ok(PeerIdentity::Agency(code)) if code != bound => Err(TrustError::Conflict {
                    hash: hash_hex(&hash),
                    bound: bound.to_string(),
                    named: code.to_string(),
                }),
                Ok(PeerIdentity::Operator(name)) => Err(TrustError::Conflict {
                    hash: hash_hex(&hash),
                    bound: bound.to_string(),
                    named: format!("operator {name}"),
                }),
                _ => Ok(PeerIdentity::Agency(bound)),
            };
        }
        match named {
            Ok(PeerIdentity::Agency(code)) => {
                self.bind_on_first_use(&hash, &code, leaf_der)?;
                Ok(PeerIdentity::Agency(code))
            }
            Ok(operator) => Ok(operator),
            Err(ProtocolError::NoIdentity) => Err(TrustError::Unbound {
                hash: hash_hex(&hash),
                subject: subject_text(leaf_der).unwrap_or_default(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Binds a SAN-URI certificate of `code` the first time it is seen, unless the agency
    /// is neither registered nor registrable (the call is refused later anyway).
    fn bind_on_first_use(
        &self,
        hash: &[u8; 32],
        code: &AgencyCode,
        leaf_der: &[u8],
    ) -> Result<(), TrustError> {
        if !self.auto_register && !self.store.is_registered(code.as_str())? {
            return Ok(());
        }
        let now = lienthong_proto::now_ms();
        let record = BindingRecord {
            code: code.to_string(),
            subject: subject_text(leaf_der).unwrap_or_default(),
            bound_at_ms: now,
            bound_by: "SAN URI on first use".into(),
        };
        let inserted = self
            .bindings
            .compare_and_swap(hash, None as Option<&[u8]>, Some(record.encode_to_vec()))?
            .is_ok();
        if inserted {
            tracing::info!(agency = %code, spki = %hash_hex(hash), "certificate bound on first use (SAN URI)");
            self.store.audit_operator_action(
                "certificate_bound",
                code.as_str(),
                format!(
                    "SPKI SHA-256 {} ({}) bound by its SAN URI on first use",
                    hash_hex(hash),
                    record.subject
                ),
                now,
            )?;
        }
        Ok(())
    }

    /// Binds `cert_der`'s SPKI to `code` (registered). Idempotent for the same agency;
    /// a binding to another agency must be removed first.
    pub(crate) fn bind(
        &self,
        code: &AgencyCode,
        cert_der: &[u8],
        operator: &str,
    ) -> Result<(BindingRecord, [u8; 32]), BrokerError> {
        if !self.store.is_registered(code.as_str())? {
            return Err(BrokerError::NotFound(format!(
                "agency {code} is not registered at this broker; register it first"
            )));
        }
        let hash = spki_sha256(cert_der)?;
        let now = lienthong_proto::now_ms();
        let record = BindingRecord {
            code: code.to_string(),
            subject: subject_text(cert_der)?,
            bound_at_ms: now,
            bound_by: format!("operator {operator}"),
        };
        match self.bindings.compare_and_swap(
            hash,
            None as Option<&[u8]>,
            Some(record.encode_to_vec()),
        ) {
            Err(e) => return Err(StoreError::from(e).into()),
            Ok(Ok(())) => {}
            Ok(Err(existing)) => {
                let existing: BindingRecord =
                    BindingRecord::decode(existing.current.as_deref().unwrap_or_default())
                        .map_err(StoreError::from)?;
                if existing.code == code.as_str() {
                    return Ok((existing, hash));
                }
                return Err(BrokerError::AlreadyExists(format!(
                    "the certificate with SPKI SHA-256 {} is already bound to agency {}; \
                     unbind it first",
                    hash_hex(&hash),
                    existing.code
                )));
            }
        }
        self.store.audit_operator_action(
            "certificate_bound",
            code.as_str(),
            format!(
                "SPKI SHA-256 {} ({}) bound by operator {operator}",
                hash_hex(&hash),
                record.subject
            ),
            now,
        )?;
        tracing::info!(agency = %code, spki = %hash_hex(&hash), operator, "certificate bound");
        Ok((record, hash))
    }

    /// Refuses a caller whose certificate was blocked since it was identified. A
    /// submission calls it once it is counted in admission: a block written before that
    /// is seen here, one written after cancels the submission's token.
    pub(crate) fn refuse_blocked(&self, hash: &[u8; 32]) -> Result<(), BrokerError> {
        match self.block_of(hash)? {
            Some(block) => Err(TrustError::Blocked {
                hash: hash_hex(hash),
                reason: block.reason,
            }
            .into()),
            None => Ok(()),
        }
    }

    /// Every binding, optionally of one agency, ordered by code then hash.
    pub(crate) fn bindings(
        &self,
        code: Option<&AgencyCode>,
    ) -> Result<Vec<([u8; 32], BindingRecord)>, TrustError> {
        let mut out = Vec::new();
        for item in self.bindings.iter() {
            let (key, value) = item?;
            let Ok(hash) = <[u8; 32]>::try_from(key.as_ref()) else {
                continue;
            };
            let record: BindingRecord = decode(&value)?;
            if code.is_none_or(|c| c.as_str() == record.code) {
                out.push((hash, record));
            }
        }
        out.sort_by(|a, b| a.1.code.cmp(&b.1.code).then(a.0.cmp(&b.0)));
        Ok(out)
    }

    /// Every block, ordered by hash.
    pub(crate) fn blocks(&self) -> Result<Vec<([u8; 32], BlockRecord)>, TrustError> {
        let mut out = Vec::new();
        for item in self.blocked.iter() {
            let (key, value) = item?;
            if let Ok(hash) = <[u8; 32]>::try_from(key.as_ref()) {
                out.push((hash, decode(&value)?));
            }
        }
        Ok(out)
    }
}

/// Lets document verification ask the registry who signed (broker side): a blocked,
/// unbound or revoked signer is refused with [`ProtocolError::SignerRefused`].
impl SignerIdentity for Trust {
    fn identify(&self, chain: &[Vec<u8>]) -> Result<PeerIdentity, ProtocolError> {
        let leaf_der = chain.first().ok_or(ProtocolError::NoCertificate)?;
        let identity = Trust::identify(self, leaf_der).map_err(|e| match e {
            TrustError::Protocol(e) => e,
            TrustError::Store(e) => {
                tracing::error!(error = %e, "cannot read the certificate bindings");
                ProtocolError::SignerRefused {
                    detail: "the broker cannot read its certificate bindings right now".into(),
                }
            }
            other => ProtocolError::SignerRefused {
                detail: other.to_string(),
            },
        })?;
        self.revocation.check_signer(chain)?;
        Ok(identity)
    }
}

/// Removes the binding of `hash` and ends what its agency has open, so that the next
/// call is identified again. Returns the removed binding.
pub(crate) async fn unbind(
    shared: &Shared,
    hash: &[u8; 32],
    operator: &str,
) -> Result<BindingRecord, BrokerError> {
    let trust = &shared.trust;
    let record = trust.binding_of(hash)?.ok_or_else(|| {
        BrokerError::NotFound(format!(
            "no certificate with SPKI SHA-256 {} is bound",
            hash_hex(hash)
        ))
    })?;
    let gate = shared.admission.hold_gate(&record.code).await;
    trust.bindings.remove(hash).map_err(StoreError::from)?;
    shared.store.audit_operator_action(
        "certificate_unbound",
        &record.code,
        format!(
            "SPKI SHA-256 {} ({}) unbound by operator {operator}",
            hash_hex(hash),
            record.subject
        ),
        lienthong_proto::now_ms(),
    )?;
    shared.admission.cancel_calls(&record.code);
    drop(gate);
    shared.store.durable().await?;
    shared.hub.end_session(&record.code);
    tracing::warn!(agency = %record.code, spki = %hash_hex(hash), operator, "certificate unbound");
    Ok(record)
}

/// Blocks `hash` at once: written under the bound agency's gate, then that agency's
/// open submissions are cancelled and its session ended; audited.
pub(crate) async fn block(
    shared: &Shared,
    hash: &[u8; 32],
    reason: &str,
    operator: &str,
) -> Result<BlockRecord, BrokerError> {
    let trust = &shared.trust;
    let code = trust.binding_of(hash)?.map(|b| b.code).unwrap_or_default();
    let gate = match code.as_str() {
        "" => None,
        code => Some(shared.admission.hold_gate(code).await),
    };
    let record = BlockRecord {
        reason: reason.to_owned(),
        blocked_at_ms: lienthong_proto::now_ms(),
        blocked_by: format!("operator {operator}"),
        code: code.clone(),
    };
    trust
        .blocked
        .insert(hash, record.encode_to_vec())
        .map_err(StoreError::from)?;
    shared.store.audit_operator_action(
        "certificate_blocked",
        &code,
        format!(
            "SPKI SHA-256 {} blocked by operator {operator}: {reason}",
            hash_hex(hash)
        ),
        record.blocked_at_ms,
    )?;
    let cancelled = !code.is_empty() && shared.admission.cancel_calls(&code);
    drop(gate);
    shared.store.durable().await?;
    let ended = !code.is_empty() && shared.hub.end_session(&code);
    tracing::warn!(
        spki = %hash_hex(hash),
        agency = %code,
        operator,
        reason,
        cancelled,
        ended,
        "certificate blocked"
    );
    Ok(record)
}

/// Lifts the block on `hash`; audited. The previous record is returned.
pub(crate) async fn unblock(
    shared: &Shared,
    hash: &[u8; 32],
    operator: &str,
) -> Result<BlockRecord, BrokerError> {
    let trust = &shared.trust;
    let old = trust
        .blocked
        .remove(hash)
        .map_err(StoreError::from)?
        .ok_or_else(|| {
            BrokerError::NotFound(format!(
                "the certificate with SPKI SHA-256 {} is not blocked",
                hash_hex(hash)
            ))
        })?;
    let record: BlockRecord = decode(&old)?;
    shared.store.audit_operator_action(
        "certificate_unblocked",
        &record.code,
        format!(
            "SPKI SHA-256 {} unblocked by operator {operator}",
            hash_hex(hash)
        ),
        lienthong_proto::now_ms(),
    )?;
    shared.store.durable().await?;
    if !record.code.is_empty() {
        shared.hub.wake(&record.code);
    }
    tracing::info!(spki = %hash_hex(hash), operator, "certificate unblocked");
    Ok(record)
}
