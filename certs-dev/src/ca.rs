//! The development certificate authority (`DevCa`): generating or loading the
//! CA, and issuing leaf certificates (`IssuedCert`) from a `LeafSpec`.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};

use crate::error::CertsDevError;
use crate::spec::{KeyAlgorithm, LeafSpec, Role};

/// Organisation name put in every development certificate's subject.
const ORGANIZATION: &str = "lienthong development PKI (not for production)";

/// A certificate and its private key, PEM (key = PKCS#8 "PRIVATE KEY").
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM "CERTIFICATE".
    pub cert_pem: String,
    /// The private key, PEM PKCS#8 "PRIVATE KEY".
    pub key_pem: String,
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The certificate's serial number (big-endian bytes): what a CRL names.
    pub serial: Vec<u8>,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_der_len", &self.cert_der.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A development CA: its certificate and the rcgen issuer (name, key identifier, key).
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("cert_der_len", &self.cert_der.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A positive, random, 16-byte serial number.
pub(crate) fn random_serial() -> Result<SerialNumber, CertsDevError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertsDevError::Random)?;
    // Positive (high bit clear) and exactly 16 bytes long (no leading zero octet).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

fn require_pem_label<'a>(
    pem: &'a str,
    label: &str,
    what: &'static str,
) -> Result<&'a str, CertsDevError> {
    let begin = format!("-----BEGIN {label}-----");
    if pem.contains(&begin) {
        Ok(pem)
    } else {
        Err(CertsDevError::InvalidPem {
            what,
            detail: format!("expected a PEM block `{begin}`"),
        })
    }
}

/// Whether `haystack` contains `needle` as a contiguous byte sequence.
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

impl DevCa {
    /// A new self-signed CA (basic constraints CA, key usage keyCertSign + cRLSign + digitalSignature), ECDSA P-256, 10 years, CN given.
    pub fn generate(common_name: &str) -> Result<DevCa, CertsDevError> {
        let key = KeyPair::generate_for(KeyAlgorithm::EcdsaP256.rcgen())
            .map_err(CertsDevError::cert("generate the CA key"))?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3652);
        params.serial_number = Some(random_serial()?);
        let cert = params
            .self_signed(&key)
            .map_err(CertsDevError::cert("self-sign the CA certificate"))?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Load an existing CA from its PEM certificate and PKCS#8 PEM key (so `pki dev --agency X` can add agencies to an existing dir later).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<DevCa, CertsDevError> {
        let cert_pem = require_pem_label(cert_pem, "CERTIFICATE", "CA certificate")?;
        let key_pem = require_pem_label(key_pem, "PRIVATE KEY", "CA private key (PKCS#8)")?;
        let key =
            KeyPair::from_pem(key_pem).map_err(CertsDevError::cert("parse the CA private key"))?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(CertsDevError::cert("parse the CA certificate"))?;
        // Keep the DER of the certificate itself so cert_der() is byte-exact.
        let cert_der = first_pem_block_der(cert_pem)?;
        if !contains_bytes(&cert_der, &issuer.key().subject_public_key_info()) {
            return Err(CertsDevError::CaKeyMismatch);
        }
        Ok(DevCa {
            issuer,
            cert_pem: cert_pem.to_owned(),
            cert_der,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issue a leaf signed by this CA. Leaf gets key usage digitalSignature, not a CA.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedCert, CertsDevError> {
        let what = spec.role.describe();
        let key = KeyPair::generate_for(spec.key_algorithm.rcgen())
            .map_err(CertsDevError::cert(format!("generate the key for {what}")))?;

        let mut params = CertificateParams::default();
        params.distinguished_name = subject(&spec.role.common_name());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;

        let mut sans = Vec::new();
        match &spec.role {
            Role::Agency(_) | Role::Operator(_) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
            Role::Server(names) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                for name in names {
                    sans.push(match name.parse::<IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|source| {
                            CertsDevError::InvalidName {
                                kind: "DNS name",
                                value: name.clone(),
                                source,
                            }
                        })?),
                    });
                }
            }
        }
        if let Some(uri) = spec.effective_uri() {
            let ia5 = uri
                .as_str()
                .try_into()
                .map_err(|source| CertsDevError::InvalidName {
                    kind: "URI",
                    value: uri.clone(),
                    source,
                })?;
            sans.push(SanType::URI(ia5));
        }
        params.subject_alt_names = sans;

        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CertsDevError::cert(format!(
                "sign the certificate for {what}"
            )))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            serial: serial.to_bytes(),
        })
    }

    /// A CRL signed by this CA revoking `revoked` (serial numbers, see
    /// [`IssuedCert::serial`]), valid from `this_update` to `next_update`; PEM.
    pub fn crl(
        &self,
        revoked: &[&[u8]],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, CertsDevError> {
        crl_signed_by(&self.issuer, revoked, this_update, next_update)
    }
}

/// A CRL (version 2, CRL number from the clock) issued by `issuer`; PEM.
pub(crate) fn crl_signed_by(
    issuer: &Issuer<'static, KeyPair>,
    revoked: &[&[u8]],
    this_update: OffsetDateTime,
    next_update: OffsetDateTime,
) -> Result<String, CertsDevError> {
    let revoked_certs = revoked
        .iter()
        .map(|serial| rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(serial),
            revocation_time: this_update,
            reason_code: Some(rcgen::RevocationReason::KeyCompromise),
            invalidity_date: None,
        })
        .collect();
    // A CRL number must grow with each CRL of a CA: the clock in milliseconds does.
    let number =
        u64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    let params = rcgen::CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    params
        .signed_by(issuer)
        .map_err(CertsDevError::cert("sign the CRL"))?
        .pem()
        .map_err(CertsDevError::cert("encode the CRL"))
}

/// The DER contents of the first `CERTIFICATE` block of `pem`.
fn first_pem_block_der(pem: &str) -> Result<Vec<u8>, CertsDevError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|der| der.to_vec())
        .map_err(|e| CertsDevError::InvalidPem {
            what: "CA certificate",
            detail: e.to_string(),
        })
}
