//! Development PKI for lienthong: a throw-away certificate authority and the
//! broker, operator and agency certificates it signs.
//!
//! This crate owns everything `lienthong pki dev` writes to disk and every
//! certificate that tests mint on the fly (including deliberately broken ones:
//! expired, issued by a rogue CA, or with a wrong or missing agency URI), the
//! government-CA-shaped test PKI (`GovPki`: root, intermediate, leaves with no
//! lienthong URI) and CRLs.
//! Nothing here is meant for production: keys are generated locally and
//! stored unencrypted.

mod ca;
mod error;
mod gov;
mod layout;
mod spec;

pub use ca::{DevCa, IssuedCert};
pub use error::CertsDevError;
pub use gov::{GovKey, GovLeafSpec, GovPki};
pub use layout::{DEFAULT_AGENCIES, DevPkiPaths, is_valid_agency_code, write_dev_pki};
pub use spec::{
    AGENCY_URI_PREFIX, KeyAlgorithm, LeafSpec, OPERATOR_URI_PREFIX, Role, agency_uri, operator_uri,
};

#[cfg(test)]
mod tests;
