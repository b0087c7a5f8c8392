//! A test PKI shaped like a government CA's (`GovPki`): a root, an intermediate that
//! issues the leaves, and leaf certificates the way a national CA issues them to
//! agencies: no lienthong SAN URI, a subject with O, OU, CN and a tax-code-like UID
//! (`UID=MST:0101234567`), RSA 2048 or ECDSA P-256 keys, clientAuth, and a CRL
//! distribution point URL. Such certificates identify an agency only through a binding
//! made by the broker's operator.
//!
//! ring cannot generate RSA keys, so the RSA keys are fixtures generated once with
//! `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` (`testdata/`): the
//! root's, and one for leaves. Every RSA leaf therefore shares one key (and one SPKI
//! hash); issue ECDSA leaves for several distinct identities.
//!
//! Leaves' `cert_pem` holds the leaf followed by the intermediate, so a TLS client and
//! a signed document carry the whole chain up to the root, the trust anchor.

use rcgen::{
    BasicConstraints, CertificateParams, CrlDistributionPoint, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::ca::{IssuedCert, crl_signed_by, random_serial};
use crate::error::CertsDevError;

const ROOT_RSA_KEY: &str = include_str!("../testdata/gov-rsa2048-root-key.pem");
const LEAF_RSA_KEY: &str = include_str!("../testdata/gov-rsa2048-leaf-key.pem");

/// The OID of the LDAP `UID` attribute (0.9.2342.19200300.100.1.1), where Vietnamese
/// CAs put the tax code (`MST:`) or citizen id of the holder.
const UID_OID: [u64; 7] = [0, 9, 2342, 19_200_300, 100, 1, 1];

/// The key of a government-shaped leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GovKey {
    /// RSA 2048 (the fixture key shared by every RSA leaf), signed with SHA-256.
    Rsa2048,
    /// A fresh ECDSA P-256 key.
    EcdsaP256,
}

/// The subject and key of a government-shaped leaf.
#[derive(Clone, Debug)]
pub struct GovLeafSpec {
    /// O, e.g. "UBND tỉnh Hưng Yên".
    pub organization: String,
    /// OU, e.g. "Sở Tài chính".
    pub unit: String,
    /// CN, e.g. "Sở Tài chính tỉnh Hưng Yên".
    pub common_name: String,
    /// UID, e.g. "MST:0900123456".
    pub uid: String,
    pub key: GovKey,
}

impl GovLeafSpec {
    pub fn new(organization: &str, unit: &str, common_name: &str, uid: &str, key: GovKey) -> Self {
        Self {
            organization: organization.to_owned(),
            unit: unit.to_owned(),
            common_name: common_name.to_owned(),
            uid: uid.to_owned(),
            key,
        }
    }
}

/// A root and an intermediate CA; see the module documentation.
pub struct GovPki {
    root_pem: String,
    intermediate_pem: String,
    intermediate: Issuer<'static, KeyPair>,
    /// The URL leaves name as their CRL distribution point.
    crl_url: String,
}

impl std::fmt::Debug for GovPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GovPki")
            .field("crl_url", &self.crl_url)
            .finish()
    }
}

fn ca_params(common_name: &str, path_len: u8) -> Result<CertificateParams, CertsDevError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CountryName, "VN");
    dn.push(
        DnType::OrganizationName,
        "Test Government CA (not for production)",
    );
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3652);
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

impl GovPki {
    /// A new root (RSA 2048, path length 1) and intermediate (ECDSA P-256, path length
    /// 0); leaves name `crl_url` as their CRL distribution point.
    pub fn generate(crl_url: &str) -> Result<Self, CertsDevError> {
        let root_key =
            KeyPair::from_pem(ROOT_RSA_KEY).map_err(CertsDevError::cert("load the root key"))?;
        let root_params = ca_params("Test Government Root CA", 1)?;
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(CertsDevError::cert("self-sign the root"))?;
        let root = Issuer::new(root_params, root_key);
        let intermediate_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(CertsDevError::cert("generate the intermediate key"))?;
        let mut intermediate_params = ca_params("Test Government Issuing CA", 0)?;
        intermediate_params.use_authority_key_identifier_extension = true;
        let intermediate_cert = intermediate_params
            .signed_by(&intermediate_key, &root)
            .map_err(CertsDevError::cert("sign the intermediate"))?;
        Ok(Self {
            root_pem: root_cert.pem(),
            intermediate_pem: intermediate_cert.pem(),
            intermediate: Issuer::new(intermediate_params, intermediate_key),
            crl_url: crl_url.to_owned(),
        })
    }

    /// The root certificate (the trust anchor), PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The intermediate certificate, PEM.
    pub fn intermediate_pem(&self) -> &str {
        &self.intermediate_pem
    }

    /// Issues a leaf from the intermediate: digitalSignature + nonRepudiation,
    /// clientAuth, no SAN URI, the CRL distribution point. `cert_pem` is leaf then
    /// intermediate.
    pub fn issue(&self, spec: &GovLeafSpec) -> Result<IssuedCert, CertsDevError> {
        let key = match spec.key {
            GovKey::Rsa2048 => KeyPair::from_pem(LEAF_RSA_KEY)
                .map_err(CertsDevError::cert("load the RSA leaf key"))?,
            GovKey::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .map_err(CertsDevError::cert("generate the leaf key"))?,
        };
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "VN");
        dn.push(DnType::OrganizationName, spec.organization.as_str());
        dn.push(DnType::OrganizationalUnitName, spec.unit.as_str());
        dn.push(DnType::CommonName, spec.common_name.as_str());
        dn.push(DnType::CustomDnType(UID_OID.to_vec()), spec.uid.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::ContentCommitment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3 * 365);
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        params.crl_distribution_points = vec![CrlDistributionPoint {
            uris: vec![self.crl_url.clone()],
        }];
        let cert = params
            .signed_by(&key, &self.intermediate)
            .map_err(CertsDevError::cert(format!(
                "sign the certificate for {}",
                spec.common_name
            )))?;
        Ok(IssuedCert {
            cert_pem: format!("{}{}", cert.pem(), self.intermediate_pem),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            serial: serial.to_bytes(),
        })
    }

    /// A CRL from the intermediate (the leaves' issuer) revoking `revoked` serials; PEM.
    pub fn crl(
        &self,
        revoked: &[&[u8]],
        this_update: OffsetDateTime,
        next_update: OffsetDateTime,
    ) -> Result<String, CertsDevError> {
        crl_signed_by(&self.intermediate, revoked, this_update, next_update)
    }

    /// [`GovPki::crl`] with its times in seconds from now (negative: in the past), for
    /// callers without the `time` crate (a stale CRL: both negative).
    pub fn crl_from_now(
        &self,
        revoked: &[&[u8]],
        this_update_secs: i64,
        next_update_secs: i64,
    ) -> Result<String, CertsDevError> {
        let now = OffsetDateTime::now_utc();
        self.crl(
            revoked,
            now + Duration::seconds(this_update_secs),
            now + Duration::seconds(next_update_secs),
        )
    }
}
