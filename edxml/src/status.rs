//! edXML status messages (`edXMLHeader/Status`): the business status a recipient sends
//! back about a document, [`parse_status`] and [`write_status`].
//!
//! Invariants: the status code is one of [`STATUS_CODES`]; codes 02 (refused) and 16
//! (recall/update refused) carry a non-empty `Description` giving the reason; the
//! `Timestamp` is `yyyy/MM/dd HH:mm:ss`; `parse_status(write_status(s)) == s`.
//!
//! Read tolerantly (docs/edxml.md): the element may be `Status` (the standard's name,
//! always written) or `MessageStatus` (vendors' SDKs); a one-digit status code is
//! padded (`1` → `01`); the timestamp is normalised from the legacy day-first and the
//! ISO 8601 forms ([`crate::rules::normalise_timestamp`]).

use crate::document::{envelope, read_response_for, validate_response_for, write_response_for};
use crate::error::{EdxmlError, shorten};
use crate::rules::{
    agency, max_chars, normalise_status_code, normalise_timestamp, one_line, timestamp,
};
use crate::xml::{EDXML_NS, Writer, parse_tree};
use crate::{Limits, ResponseFor};

/// Business status codes (DESIGN §9): 01 arrived, 02 refused, 03 accepted, 04 assigned,
/// 05 in progress, 06 completed, 13 recall requested, 15 recall/update agreed,
/// 16 recall/update refused.
pub const STATUS_CODES: [&str; 9] = ["01", "02", "03", "04", "05", "06", "13", "15", "16"];

/// Status codes that must give their reason in `Description`.
pub const STATUS_CODES_NEEDING_REASON: [&str; 2] = ["02", "16"];

/// `Status/StaffInfo`: who handled the document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaffInfo {
    pub department: String,
    pub staff: String,
    pub mobile: String,
    pub email: String,
}

/// A status message about a document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdxmlStatus {
    /// `Status/From/OrganId`: the reporting agency (the document's recipient).
    pub from: String,
    /// `Status/From/OrganName`, empty when none.
    pub from_name: String,
    /// `Status/ResponseFor`: the document reported on; its `organ_id` is the original
    /// sender.
    pub response_for: ResponseFor,
    /// `Status/StatusCode`, one of [`STATUS_CODES`].
    pub status_code: String,
    /// `Status/Description`; required for 02 and 16.
    pub description: Option<String>,
    /// `Status/Timestamp`, `yyyy/MM/dd HH:mm:ss`.
    pub timestamp: String,
    /// `Status/StaffInfo`.
    pub staff: Option<StaffInfo>,
}

mod path {
    pub const STATUS: &str = "Status";
    pub const RESPONSE_FOR: &str = "Status/ResponseFor";
    pub const FROM: &str = "Status/From";
    pub const FROM_ORGAN_ID: &str = "Status/From/OrganId";
    pub const FROM_ORGAN_NAME: &str = "Status/From/OrganName";
    pub const STATUS_CODE: &str = "Status/StatusCode";
    pub const DESCRIPTION: &str = "Status/Description";
    pub const TIMESTAMP: &str = "Status/Timestamp";
    pub const STAFF_INFO: &str = "Status/StaffInfo";
    pub const DEPARTMENT: &str = "Status/StaffInfo/Department";
    pub const STAFF: &str = "Status/StaffInfo/Staff";
    pub const MOBILE: &str = "Status/StaffInfo/Mobile";
    pub const EMAIL: &str = "Status/StaffInfo/Email";
}

/// Parses and validates a status message.
pub fn parse_status(xml: &[u8], limits: &Limits) -> Result<EdxmlStatus, EdxmlError> {
    let root = parse_tree(xml, limits)?;
    status_from_tree(&root)
}

/// A status message from a parsed tree.
pub(crate) fn status_from_tree(root: &crate::xml::Element) -> Result<EdxmlStatus, EdxmlError> {
    use path as p;
    let (env, _) = envelope(root)?;
    let header = env.required("edXMLHeader", "edXMLHeader")?;
    // QCVN 102:2016 and the SDK examples write `Status`; the vendors' SDKs name the
    // same element after their `MessageStatus` class.
    let status = match header.one("Status", p::STATUS)? {
        Some(status) => status,
        None => header.required("MessageStatus", p::STATUS)?,
    };
    let response = status.required("ResponseFor", p::RESPONSE_FOR)?;
    let from = status.required("From", p::FROM)?;
    let staff = match status.one("StaffInfo", p::STAFF_INFO)? {
        Some(info) => Some(StaffInfo {
            department: info.value_or_empty("Department", p::DEPARTMENT)?,
            staff: info.value_or_empty("Staff", p::STAFF)?,
            mobile: info.value_or_empty("Mobile", p::MOBILE)?,
            email: match info.value_non_empty("Email", p::EMAIL)? {
                Some(email) => email,
                None => info.value_or_empty("EmailAddress", p::EMAIL)?,
            },
        }),
        None => None,
    };
    let parsed = EdxmlStatus {
        from: from.value("OrganId", p::FROM_ORGAN_ID)?.ok_or_else(|| {
            EdxmlError::MissingElement {
                path: p::FROM_ORGAN_ID.into(),
            }
        })?,
        from_name: from.value_or_empty("OrganName", p::FROM_ORGAN_NAME)?,
        response_for: read_response_for(response, p::RESPONSE_FOR)?,
        status_code: normalise_status_code(
            &status.value("StatusCode", p::STATUS_CODE)?.ok_or_else(|| {
                EdxmlError::MissingElement {
                    path: p::STATUS_CODE.into(),
                }
            })?,
        ),
        description: status.value_non_empty("Description", p::DESCRIPTION)?,
        timestamp: {
            let written = status.value("Timestamp", p::TIMESTAMP)?.ok_or_else(|| {
                EdxmlError::MissingElement {
                    path: p::TIMESTAMP.into(),
                }
            })?;
            // Refused below (naming the value) when it is none of the known forms.
            normalise_timestamp(&written).unwrap_or(written)
        },
        staff,
    };
    validate_status(&parsed)?;
    Ok(parsed)
}

/// Checks every rule of a status message.
pub fn validate_status(status: &EdxmlStatus) -> Result<(), EdxmlError> {
    use path as p;
    agency(p::FROM_ORGAN_ID, &status.from)?;
    max_chars(p::FROM_ORGAN_NAME, &status.from_name, 200)?;
    validate_response_for(&status.response_for, p::RESPONSE_FOR)?;
    if !STATUS_CODES.contains(&status.status_code.as_str()) {
        return Err(EdxmlError::UnknownStatusCode {
            path: p::STATUS_CODE.into(),
            value: shorten(&status.status_code),
        });
    }
    let description = status.description.as_deref().unwrap_or("");
    max_chars(p::DESCRIPTION, description, 500)?;
    if STATUS_CODES_NEEDING_REASON.contains(&status.status_code.as_str())
        && description.trim().is_empty()
    {
        return Err(EdxmlError::DescriptionRequired {
            path: p::DESCRIPTION.into(),
            code: status.status_code.clone(),
        });
    }
    timestamp(p::TIMESTAMP, &status.timestamp)?;
    if let Some(staff) = &status.staff {
        one_line(p::DEPARTMENT, &staff.department, 200)?;
        one_line(p::STAFF, &staff.staff, 100)?;
        max_chars(p::MOBILE, &staff.mobile, 20)?;
        max_chars(p::EMAIL, &staff.email, 100)?;
    }
    Ok(())
}

/// Writes a status message in the QCVN 102:2016 form after checking its rules.
pub fn write_status(status: &EdxmlStatus) -> Result<Vec<u8>, EdxmlError> {
    validate_status(status)?;
    let mut w = Writer::new();
    w.open("edXML", &[("xmlns", EDXML_NS)]);
    w.open("edXML:edXMLEnvelope", &[("xmlns:edXML", EDXML_NS)]);
    w.open("edXML:edXMLHeader", &[]);
    w.open("edXML:Status", &[]);
    write_response_for(&mut w, &status.response_for);
    w.open("edXML:From", &[]);
    w.leaf("edXML:OrganId", &status.from);
    w.leaf("edXML:OrganName", &status.from_name);
    w.close("edXML:From");
    w.leaf("edXML:StatusCode", &status.status_code);
    w.leaf_opt("edXML:Description", status.description.as_deref());
    w.leaf("edXML:Timestamp", &status.timestamp);
    if let Some(staff) = &status.staff {
        w.open("edXML:StaffInfo", &[]);
        w.leaf("edXML:Department", &staff.department);
        w.leaf("edXML:Staff", &staff.staff);
        w.leaf("edXML:Mobile", &staff.mobile);
        w.leaf("edXML:Email", &staff.email);
        w.close("edXML:StaffInfo");
    }
    w.close("edXML:Status");
    w.close("edXML:edXMLHeader");
    w.open("edXML:edXMLBody", &[]);
    w.close("edXML:edXMLBody");
    w.close("edXML:edXMLEnvelope");
    w.close("edXML");
    Ok(w.finish())
}
