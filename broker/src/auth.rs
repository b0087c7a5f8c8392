//! Who is calling: the identity of the client certificate presented over mutual TLS.
//!
//! The listener's TLS layer has already checked the chain against the configured client
//! CAs (a connection without a trusted certificate never reaches a handler). Here the
//! registry (`trust`) decides who the leaf is: a blocked SPKI is refused, a bound one is
//! its agency, a dev-PKI SAN URI names the role (and binds an agency's certificate on
//! first use); then the role must fit the service.

use lienthong_proto::{AgencyCode, PeerIdentity};
use tonic::Request;

use crate::Shared;
use crate::error::BrokerError;

/// The identity of the caller, from its leaf certificate and the registry.
pub fn peer_identity<T>(
    shared: &Shared,
    request: &Request<T>,
) -> Result<PeerIdentity, BrokerError> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| BrokerError::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| BrokerError::Unauthenticated("a client certificate is required".into()))?;
    Ok(shared.trust.identify(leaf)?)
}

/// The calling agency; operators are refused.
pub fn agency<T>(shared: &Shared, request: &Request<T>) -> Result<AgencyCode, BrokerError> {
    match peer_identity(shared, request)? {
        PeerIdentity::Agency(code) => Ok(code),
        PeerIdentity::Operator(_) => Err(BrokerError::PermissionDenied(
            "an operator certificate cannot exchange documents; use an agency certificate".into(),
        )),
    }
}

/// The calling operator's name; agencies are refused.
pub fn operator<T>(shared: &Shared, request: &Request<T>) -> Result<String, BrokerError> {
    match peer_identity(shared, request)? {
        PeerIdentity::Operator(name) => Ok(name),
        PeerIdentity::Agency(code) => Err(BrokerError::PermissionDenied(format!(
            "agency {code} may not use the admin service; use an operator certificate"
        ))),
    }
}

/// The SPKI hash of the caller's leaf certificate, to check again later in the call
/// ([`crate::trust::Trust::refuse_blocked`]).
pub fn leaf_spki<T>(request: &Request<T>) -> Result<[u8; 32], BrokerError> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| BrokerError::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| BrokerError::Unauthenticated("a client certificate is required".into()))?;
    lienthong_proto::agency::spki_sha256(leaf).map_err(|e| {
        BrokerError::Unauthenticated(format!("the client certificate is not usable: {e}"))
    })
}
