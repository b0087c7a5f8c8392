//! The on-disk layout of a development PKI directory (`write_dev_pki`,
//! `DevPkiPaths`) and agency-code validation.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ca::{DevCa, IssuedCert};
use crate::error::CertsDevError;
use crate::spec::LeafSpec;

/// Hưng Yên: provincial People's Committee and two departments.
pub const DEFAULT_AGENCIES: [&str; 3] = ["000.00.00.H31", "000.00.12.H31", "000.00.15.H31"];

/// Common name of the CA created by [`write_dev_pki`].
const CA_COMMON_NAME: &str = "lienthong dev CA";
/// Names the broker certificate is valid for.
const BROKER_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];
/// Name of the operator certificate's identity.
const OPERATOR_NAME: &str = "operator";

pub use lienthong_proto::agency::is_valid_agency_code;

/// Where `write_dev_pki` put things.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPkiPaths {
    /// The directory itself.
    pub dir: PathBuf,
    /// `DIR/ca.crt`.
    pub ca_cert: PathBuf,
    /// `DIR/ca.key`.
    pub ca_key: PathBuf,
    /// `DIR/broker.crt`.
    pub broker_cert: PathBuf,
    /// `DIR/broker.key`.
    pub broker_key: PathBuf,
    /// `DIR/operator.crt`.
    pub operator_cert: PathBuf,
    /// `DIR/operator.key`.
    pub operator_key: PathBuf,
    /// `(code, DIR/agencies/<code>.crt, DIR/agencies/<code>.key)` for each requested agency.
    pub agencies: Vec<(String, PathBuf, PathBuf)>,
}

impl DevPkiPaths {
    /// The layout of `dir`, without any agencies.
    fn new(dir: &Path) -> Self {
        DevPkiPaths {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            broker_cert: dir.join("broker.crt"),
            broker_key: dir.join("broker.key"),
            operator_cert: dir.join("operator.crt"),
            operator_key: dir.join("operator.key"),
            agencies: Vec::new(),
        }
    }

    /// Certificate and key paths of agency `code`, if it was part of the run.
    pub fn agency(&self, code: &str) -> Option<(&Path, &Path)> {
        self.agencies
            .iter()
            .find(|(candidate, _, _)| candidate == code)
            .map(|(_, cert, key)| (cert.as_path(), key.as_path()))
    }
}

/// Writes DIR/ca.crt, DIR/ca.key, DIR/broker.crt, DIR/broker.key (SANs localhost, 127.0.0.1, ::1),
/// DIR/operator.crt, DIR/operator.key (operator name "operator"), DIR/agencies/<code>.crt and
/// <code>.key for each agency.
///
/// Key files are created with mode 0600, certificates with 0644. If DIR/ca.crt and DIR/ca.key
/// already exist, that CA is reused and every existing certificate/key pair is left alone, so
/// the command can be re-run to add agencies; otherwise everything is (re)created. If only one
/// of ca.crt / ca.key exists, [`CertsDevError::IncompleteCa`] is returned and nothing is written.
///
/// Every agency code is validated first; an invalid one gives
/// [`CertsDevError::InvalidAgencyCode`] before anything is written. Duplicate codes are issued once.
pub fn write_dev_pki(dir: &Path, agencies: &[String]) -> Result<DevPkiPaths, CertsDevError> {
    if let Some(bad) = agencies.iter().find(|code| !is_valid_agency_code(code)) {
        return Err(CertsDevError::InvalidAgencyCode { code: bad.clone() });
    }

    let mut paths = DevPkiPaths::new(dir);
    let agencies_dir = dir.join("agencies");
    for code in agencies {
        if paths.agency(code).is_none() {
            paths.agencies.push((
                code.clone(),
                agencies_dir.join(format!("{code}.crt")),
                agencies_dir.join(format!("{code}.key")),
            ));
        }
    }

    let (ca, reuse) = match (paths.ca_cert.exists(), paths.ca_key.exists()) {
        (true, true) => {
            let cert_pem = read_to_string(&paths.ca_cert)?;
            let key_pem = read_to_string(&paths.ca_key)?;
            (DevCa::from_pem(&cert_pem, &key_pem)?, true)
        }
        (false, false) => (DevCa::generate(CA_COMMON_NAME)?, false),
        (true, false) => {
            return Err(CertsDevError::IncompleteCa {
                present: paths.ca_cert.clone(),
                missing: paths.ca_key.clone(),
            });
        }
        (false, true) => {
            return Err(CertsDevError::IncompleteCa {
                present: paths.ca_key.clone(),
                missing: paths.ca_cert.clone(),
            });
        }
    };

    create_dir(dir)?;
    create_dir(&agencies_dir)?;

    if !reuse {
        // Key first: a crash in between leaves ca.key without ca.crt, which is refused above
        // rather than silently replaced by a CA that no longer matches issued certificates.
        write_file(&paths.ca_key, ca.key_pem().as_bytes(), KEY_MODE)?;
        write_file(&paths.ca_cert, ca.cert_pem().as_bytes(), CERT_MODE)?;
    }

    let keep_existing = reuse;
    issue_pair(
        &ca,
        &LeafSpec::server(&BROKER_NAMES),
        &paths.broker_cert,
        &paths.broker_key,
        keep_existing,
    )?;
    issue_pair(
        &ca,
        &LeafSpec::operator(OPERATOR_NAME),
        &paths.operator_cert,
        &paths.operator_key,
        keep_existing,
    )?;
    for (code, cert, key) in &paths.agencies {
        issue_pair(&ca, &LeafSpec::agency(code), cert, key, keep_existing)?;
    }
    Ok(paths)
}

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

/// Issue `spec` and write it to `cert`/`key`, unless `keep_existing` and both files exist.
fn issue_pair(
    ca: &DevCa,
    spec: &LeafSpec,
    cert: &Path,
    key: &Path,
    keep_existing: bool,
) -> Result<(), CertsDevError> {
    if keep_existing && cert.exists() && key.exists() {
        return Ok(());
    }
    let IssuedCert {
        cert_pem, key_pem, ..
    } = ca.issue(spec)?;
    write_file(key, key_pem.as_bytes(), KEY_MODE)?;
    write_file(cert, cert_pem.as_bytes(), CERT_MODE)
}

fn read_to_string(path: &Path) -> Result<String, CertsDevError> {
    fs::read_to_string(path).map_err(CertsDevError::io("read", path))
}

fn create_dir(path: &Path) -> Result<(), CertsDevError> {
    fs::create_dir_all(path).map_err(CertsDevError::io("create directory", path))
}

/// Write `contents` to a freshly created file with permissions `mode` (on Unix). An existing
/// file is removed first so its old permissions cannot survive.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertsDevError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(CertsDevError::io("replace", path)(error)),
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .map_err(CertsDevError::io("create", path))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(CertsDevError::io("write", path))
}
