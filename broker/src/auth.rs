//! Who is calling: the identity in the client certificate presented over mutual TLS.
//!
//! tonic's TLS layer has already checked the chain against the configured client CAs
//! (a connection without a trusted certificate never reaches a handler). Here we read
//! the role and code from the leaf's SAN URI and check the role fits the service.

use lienthong_proto::{AgencyCode, PeerIdentity};
use tonic::Request;

use crate::error::BrokerError;

/// The identity of the caller, from its leaf certificate.
pub fn peer_identity<T>(request: &Request<T>) -> Result<PeerIdentity, BrokerError> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| BrokerError::Unauthenticated("a client certificate is required".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| BrokerError::Unauthenticated("a client certificate is required".into()))?;
    PeerIdentity::from_cert_der(leaf).map_err(|e| {
        BrokerError::Unauthenticated(format!("the client certificate is not usable: {e}"))
    })
}

/// The calling agency; operators are refused.
pub fn agency<T>(request: &Request<T>) -> Result<AgencyCode, BrokerError> {
    match peer_identity(request)? {
        PeerIdentity::Agency(code) => Ok(code),
        PeerIdentity::Operator(_) => Err(BrokerError::PermissionDenied(
            "an operator certificate cannot exchange documents; use an agency certificate".into(),
        )),
    }
}

/// The calling operator's name; agencies are refused.
pub fn operator<T>(request: &Request<T>) -> Result<String, BrokerError> {
    match peer_identity(request)? {
        PeerIdentity::Operator(name) => Ok(name),
        PeerIdentity::Agency(code) => Err(BrokerError::PermissionDenied(format!(
            "agency {code} may not use the admin service; use an operator certificate"
        ))),
    }
}
