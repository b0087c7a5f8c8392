//! Agency codes (`ddd.dd.dd.Xdd`) and the identity a certificate carries.
//!
//! A certificate names its holder's role in a SAN URI: `urn:lienthong:agency:<code>` or
//! `urn:lienthong:operator:<name>`. A certificate with several different lienthong URIs
//! is refused as ambiguous rather than picking one.
//!
//! Certificates from a government CA carry no such URI: a verifier then identifies the
//! holder by the SHA-256 of the certificate's SubjectPublicKeyInfo ([`spki_sha256`]),
//! looked up in a registry of bindings ([`SignerIdentity`]). The URI is one way to make
//! the first binding; [`SanUri`] is the resolver that knows nothing else.

use std::fmt;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ProtocolError;

const AGENCY_URI_PREFIX: &str = "urn:lienthong:agency:";
const OPERATOR_URI_PREFIX: &str = "urn:lienthong:operator:";

/// A validated 13-character agency code, e.g. `000.00.12.H31`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgencyCode(String);

impl AgencyCode {
    /// Validates `code` against `^\d{3}\.\d{2}\.\d{2}\.[A-Z]\d{2}$`.
    pub fn parse(code: &str) -> Result<Self, ProtocolError> {
        if is_valid_agency_code(code) {
            Ok(Self(code.to_owned()))
        } else {
            Err(ProtocolError::InvalidAgencyCode {
                code: printable(code),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The code of the level above in the four-level hierarchy, if any:
    /// `000.00.12.H31` belongs to `000.00.00.H31`.
    pub fn parent(&self) -> Option<AgencyCode> {
        let groups: Vec<&str> = self.0.split('.').collect();
        let [a, b, c, d] = groups.as_slice() else {
            return None;
        };
        let parent = if *a != "000" {
            format!("000.{b}.{c}.{d}")
        } else if *b != "00" {
            format!("000.00.{c}.{d}")
        } else if *c != "00" {
            format!("000.00.00.{d}")
        } else {
            return None;
        };
        Some(Self(parent))
    }
}

impl fmt::Display for AgencyCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// True when `code` has the shape `ddd.dd.dd.Xdd`.
pub fn is_valid_agency_code(code: &str) -> bool {
    let b = code.as_bytes();
    if b.len() != 13 {
        return false;
    }
    b.iter().enumerate().all(|(i, &c)| match i {
        3 | 6 | 9 => c == b'.',
        10 => c.is_ascii_uppercase(),
        _ => c.is_ascii_digit(),
    })
}

/// Untrusted text shortened and stripped of control characters, fit for an error
/// message or a log line. Format characters (bidi overrides, zero-width...) and line
/// separators are stripped too: they would let the text rearrange or hide the words
/// around it.
pub fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(64)
        .map(|c| if is_hidden_control(c) { '?' } else { c })
        .collect();
    if text.chars().count() > 64 {
        out.push('…');
    }
    out
}

/// True for characters that are not shown as themselves but change what a line shows:
/// controls (general category Cc, CR and LF among them), format characters (Cf: the
/// bidi embeddings, overrides and isolates U+202A–202E and U+2066–2069, zero-width
/// characters U+200B–200F, the byte order mark U+FEFF...) and the line and paragraph
/// separators U+2028/U+2029.
pub fn is_hidden_control(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.is_control()
        || matches!(
            c.general_category(),
            GeneralCategory::Format
                | GeneralCategory::LineSeparator
                | GeneralCategory::ParagraphSeparator
        )
}

/// Untrusted text for a terminal, whole: every [`is_hidden_control`] character is
/// written as `\u{XXXX}` so that nobody can forge a second line or reorder what is
/// shown. Text without one is returned as it is.
pub fn escape_for_display(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_hidden_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len().saturating_add(16));
    for c in text.chars() {
        if is_hidden_control(c) {
            out.push_str(&format!("\\u{{{:04X}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Who a certificate says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    Agency(AgencyCode),
    Operator(String),
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Agency(code) => write!(f, "agency {code}"),
            Self::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

impl PeerIdentity {
    /// Reads the lienthong identity from a DER certificate's SAN URIs.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, ProtocolError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| ProtocolError::Malformed {
            what: "certificate",
            detail: e.to_string(),
        })?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| ProtocolError::Malformed {
                what: "certificate subject alternative name",
                detail: e.to_string(),
            })?;
        let mut found: Option<PeerIdentity> = None;
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            let identity = if let Some(code) = uri.strip_prefix(AGENCY_URI_PREFIX) {
                PeerIdentity::Agency(AgencyCode::parse(code)?)
            } else if let Some(operator) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                if operator.is_empty() || operator.chars().any(|c| c.is_control()) {
                    return Err(ProtocolError::NoIdentity);
                }
                PeerIdentity::Operator(operator.to_owned())
            } else {
                continue;
            };
            match &found {
                Some(existing) if *existing != identity => {
                    return Err(ProtocolError::AmbiguousIdentity);
                }
                _ => found = Some(identity),
            }
        }
        found.ok_or(ProtocolError::NoIdentity)
    }

    /// The agency code, or `NoIdentity` for an operator.
    pub fn agency(&self) -> Option<&AgencyCode> {
        match self {
            Self::Agency(code) => Some(code),
            Self::Operator(_) => None,
        }
    }
}

/// SHA-256 of a DER certificate's SubjectPublicKeyInfo (the key and its algorithm,
/// as encoded in the certificate): what a binding or a block names. Two certificates
/// for the same key (a renewal) share it; a new key gets a new one.
pub fn spki_sha256(cert_der: &[u8]) -> Result<[u8; 32], ProtocolError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| ProtocolError::Malformed {
        what: "certificate",
        detail: e.to_string(),
    })?;
    Ok(crate::sha256(cert.public_key().raw))
}

/// The subject of a DER certificate as text (RFC 4514 style), for people and logs.
pub fn subject_text(cert_der: &[u8]) -> Result<String, ProtocolError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| ProtocolError::Malformed {
        what: "certificate",
        detail: e.to_string(),
    })?;
    Ok(name_text(&cert.subject().to_string()))
}

/// A distinguished name as text for people: hidden controls replaced, at most 512
/// characters. Not [`printable`]: a name is longer than its 64 characters, and people
/// compare the whole of it (O, OU, CN, UID).
pub fn name_text(name: &str) -> String {
    name.chars()
        .take(512)
        .map(|c| if is_hidden_control(c) { '?' } else { c })
        .collect()
}

/// Decides who the holder of a (chain-verified) leaf certificate is. Verifiers that
/// keep a registry of bindings implement it; [`SanUri`] reads the SAN URI alone.
pub trait SignerIdentity {
    /// `chain`: the signer's certificate chain as carried by the signature, leaf first,
    /// already verified against the trust anchors.
    fn identify(&self, chain: &[Vec<u8>]) -> Result<PeerIdentity, ProtocolError>;
}

/// The identity written in the certificate's SAN URI, and nothing else.
#[derive(Debug, Clone, Copy, Default)]
pub struct SanUri;

impl SignerIdentity for SanUri {
    fn identify(&self, chain: &[Vec<u8>]) -> Result<PeerIdentity, ProtocolError> {
        PeerIdentity::from_cert_der(chain.first().ok_or(ProtocolError::NoCertificate)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agency_code_shape() {
        for ok in ["000.00.00.H31", "000.00.12.H31", "123.45.67.Z99"] {
            assert!(AgencyCode::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "000.00.00.h31",
            "000.00.00.H3",
            "000.00.00.H311",
            "000-00-00-H31",
            "00A.00.00.H31",
            "000.00.00.131",
        ] {
            assert_eq!(
                AgencyCode::parse(bad),
                Err(ProtocolError::InvalidAgencyCode {
                    code: bad.to_owned()
                })
            );
        }
    }

    #[test]
    fn hierarchy_parent() {
        let parse = |c: &str| AgencyCode::parse(c).expect("valid code");
        assert_eq!(
            parse("000.00.12.H31").parent(),
            Some(parse("000.00.00.H31"))
        );
        assert_eq!(
            parse("000.03.12.H31").parent(),
            Some(parse("000.00.12.H31"))
        );
        assert_eq!(parse("000.00.00.H31").parent(), None);
    }
}
