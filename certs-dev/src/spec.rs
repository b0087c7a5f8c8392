//! What to put in a leaf certificate: the role (agency, operator, server),
//! key algorithm, validity window and identity-URI overrides (`LeafSpec`).

use time::{Duration, OffsetDateTime};

/// Prefix of an agency's identity URI; the agency code follows.
pub const AGENCY_URI_PREFIX: &str = "urn:lienthong:agency:";
/// Prefix of an operator's identity URI; the operator name follows.
pub const OPERATOR_URI_PREFIX: &str = "urn:lienthong:operator:";

/// `urn:lienthong:agency:<code>`.
pub fn agency_uri(code: &str) -> String {
    format!("{AGENCY_URI_PREFIX}{code}")
}

/// `urn:lienthong:operator:<name>`.
pub fn operator_uri(name: &str) -> String {
    format!("{OPERATOR_URI_PREFIX}{name}")
}

/// Key algorithm of a generated key pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256.
    #[default]
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    pub(crate) fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// What a leaf certificate is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Agency client + document-signing certificate. SAN URI `urn:lienthong:agency:<code>`, EKU clientAuth, CN = code.
    Agency(String),
    /// Operator client certificate. SAN URI `urn:lienthong:operator:<name>`, EKU clientAuth.
    Operator(String),
    /// TLS server certificate with DNS and IP SANs (strings: parse IPs into IP SANs, others DNS), EKU serverAuth.
    Server(Vec<String>),
}

impl Role {
    /// The identity URI this role carries by default (none for servers).
    pub fn default_uri(&self) -> Option<String> {
        match self {
            Role::Agency(code) => Some(agency_uri(code)),
            Role::Operator(name) => Some(operator_uri(name)),
            Role::Server(_) => None,
        }
    }

    /// The subject common name used for this role.
    pub(crate) fn common_name(&self) -> String {
        match self {
            Role::Agency(code) => code.clone(),
            Role::Operator(name) => name.clone(),
            Role::Server(names) => names
                .first()
                .cloned()
                .unwrap_or_else(|| "lienthong server".to_owned()),
        }
    }

    /// A short description for error messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Role::Agency(code) => format!("agency {code}"),
            Role::Operator(name) => format!("operator {name}"),
            Role::Server(names) => format!("server {}", names.join(", ")),
        }
    }
}

/// Everything needed to issue one leaf certificate. Build it with
/// [`LeafSpec::agency`], [`LeafSpec::operator`] or [`LeafSpec::server`] and
/// adjust it with the `with_*` / [`expired`](LeafSpec::expired) builders.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafSpec {
    /// What the certificate is for.
    pub role: Role,
    /// Algorithm of the leaf's freshly generated key.
    pub key_algorithm: KeyAlgorithm,
    /// Start of validity (default: now - 1 hour).
    pub not_before: OffsetDateTime,
    /// End of validity (default: now + 825 days).
    pub not_after: OffsetDateTime,
    /// Replace the role's SAN URI with this one (tests: a wrong or malformed agency URI). None = the role's URI.
    pub uri_override: Option<String>,
    /// Leave out every SAN URI (tests: a certificate with no agency identity).
    pub omit_uri: bool,
}

impl LeafSpec {
    /// A spec for `role` with default algorithm and validity.
    pub fn new(role: Role) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            role,
            key_algorithm: KeyAlgorithm::default(),
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(825),
            uri_override: None,
            omit_uri: false,
        }
    }

    /// An agency certificate for `code` (not validated here: tests may want bad codes).
    pub fn agency(code: &str) -> Self {
        Self::new(Role::Agency(code.to_owned()))
    }

    /// An operator client certificate for `name`.
    pub fn operator(name: &str) -> Self {
        Self::new(Role::Operator(name.to_owned()))
    }

    /// A TLS server certificate for the given DNS names and IP addresses.
    pub fn server(names: &[&str]) -> Self {
        Self::new(Role::Server(
            names.iter().map(|name| (*name).to_owned()).collect(),
        ))
    }

    /// Move the validity window entirely into the past (now - 30 days .. now - 1 day).
    pub fn expired(mut self) -> Self {
        let now = OffsetDateTime::now_utc();
        self.not_before = now - Duration::days(30);
        self.not_after = now - Duration::days(1);
        self
    }

    /// Use `alg` for the leaf key.
    pub fn with_key_algorithm(mut self, alg: KeyAlgorithm) -> Self {
        self.key_algorithm = alg;
        self
    }

    /// Use a custom validity window.
    pub fn with_validity(mut self, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Put `uri` in the SAN instead of the role's own URI (also clears [`without_uri`](Self::without_uri)).
    pub fn with_uri(mut self, uri: &str) -> Self {
        self.uri_override = Some(uri.to_owned());
        self.omit_uri = false;
        self
    }

    /// Leave every SAN URI out.
    pub fn without_uri(mut self) -> Self {
        self.omit_uri = true;
        self
    }

    /// The SAN URI the certificate will carry, if any.
    pub fn effective_uri(&self) -> Option<String> {
        if self.omit_uri {
            return None;
        }
        match &self.uri_override {
            Some(uri) => Some(uri.clone()),
            None => self.role.default_uri(),
        }
    }
}
