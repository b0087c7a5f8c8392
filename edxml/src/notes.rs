//! What a package holds that lienthong accepts but does not carry: the "never drop a
//! field silently" half of reading tolerantly (docs/edxml.md).
//!
//! Invariants:
//! - Every element under `edXMLHeader`, in the manifest's references and in the
//!   attachments that has a value (non-blank text) and is not mapped to the signed
//!   header (or, for a status message, to the business status report) gives exactly
//!   one [`FieldNote`] per path (repeated elements give one note, without an index).
//! - Elements of another namespace (an XML signature, say) give one note for the
//!   whole element when anything under it has a value.
//! - Notes name paths only, never values: they may be logged.

use crate::document::EdxmlDocument;
use crate::xml::Element;

/// A field that was accepted but is not carried to the recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldNote {
    /// The edXML path, e.g. `MessageHeader/OtherInfo/PageAmount` (no index).
    pub path: String,
    /// Why it is not carried.
    pub reason: &'static str,
}

/// The reason given for a field our signed header has no place for.
pub const NOT_IN_HEADER: &str =
    "accepted; the signed header has no such field, so it is not carried to the recipients";
/// The reason given for elements of another namespace.
pub const OTHER_NAMESPACE: &str =
    "another namespace (e.g. an XML signature): accepted and ignored, not carried";
/// The reason given for a status message's timestamp.
pub const STATUS_TIME: &str =
    "accepted; the status report carries the time the agent signs it instead";
/// The reason given for the parts of a status message a report does not carry.
pub const NOT_IN_REPORT: &str =
    "accepted; a business status report has no such field, so it is not carried";
/// The reason given for `ResponseFor` elements after the first.
pub const EXTRA_RESPONSE_FOR: &str =
    "accepted; only the first ResponseFor is read, the others are not carried";

/// Paths (relative to `edXMLHeader`, manifest and attachments as in errors) whose
/// values a document's signed header carries whatever the business type.
const DOCUMENT_CARRIED: &[&str] = &[
    "MessageHeader/From/OrganId",
    "MessageHeader/From/OrganName",
    "MessageHeader/To/OrganId",
    "MessageHeader/Code/CodeNumber",
    "MessageHeader/Code/CodeNotation",
    "MessageHeader/PromulgationInfo/Place",
    "MessageHeader/PromulgationInfo/PromulgationDate",
    "MessageHeader/DocumentType/Type",
    "MessageHeader/DocumentType/TypeName",
    "MessageHeader/Subject",
    "MessageHeader/Content",
    "MessageHeader/SignerInfo/Competence",
    "MessageHeader/SignerInfo/Position",
    "MessageHeader/SignerInfo/FullName",
    "MessageHeader/DueDate",
    "MessageHeader/ToPlaces/Place",
    "MessageHeader/OtherInfo/Priority",
    "MessageHeader/SteeringType",
    // Checked equal to the business id the header carries.
    "MessageHeader/DocumentId",
    "TraceHeaderList/Bussiness/BussinessDocType",
    "TraceHeaderList/Bussiness/BussinessDocReason",
    "edXMLBody/edXMLManifest/Reference/ContentId",
    "edXMLBody/edXMLManifest/Reference/AttachmentName",
    "edXMLBody/edXMLManifest/Reference/ContentType",
    "AttachmentEncoded/Attachment/ContentId",
    "AttachmentEncoded/Attachment/AttachmentName",
    "AttachmentEncoded/Attachment/ContentType",
    "AttachmentEncoded/Attachment/ContentTransferEncoded",
];

/// What a status report carries (the others are [`NOT_IN_REPORT`], the timestamp
/// [`STATUS_TIME`]).
const STATUS_CARRIED: &[&str] = &[
    "ResponseFor/OrganId",
    "ResponseFor/Code",
    "ResponseFor/PromulgationDate",
    "ResponseFor/DocumentId",
    "From/OrganId",
    "StatusCode",
    "Description",
    "StaffInfo/Staff",
];

struct Notes(Vec<FieldNote>);

impl Notes {
    fn add(&mut self, path: String, reason: &'static str) {
        if !self.0.iter().any(|n| n.path == path) {
            self.0.push(FieldNote { path, reason });
        }
    }

    /// Walks `element` (at `path`): each leaf with a value not accepted by `carried`
    /// gives a note with the reason `reason_of` gives.
    fn walk(
        &mut self,
        element: &Element,
        path: &str,
        carried: &dyn Fn(&str) -> bool,
        reason_of: &dyn Fn(&str) -> &'static str,
    ) {
        if !element.edxml {
            if has_value(element) {
                self.add(format!("{path} (another namespace)"), OTHER_NAMESPACE);
            }
            return;
        }
        if element.children.is_empty() {
            if !element.text.trim().is_empty() && !carried(path) {
                self.add(path.to_owned(), reason_of(path));
            }
            return;
        }
        for child in &element.children {
            let child_path = format!("{path}/{}", child.name);
            self.walk(child, &child_path, carried, reason_of);
        }
    }
}

fn has_value(element: &Element) -> bool {
    !element.text.trim().is_empty() || element.children.iter().any(has_value)
}

/// The notes for a parsed document: `header` is its `edXMLHeader`, `body` its
/// `edXMLBody`, `attachments` every `AttachmentEncoded/Attachment`, `others` any other
/// element beside the envelope, its header and body, or `AttachmentEncoded`.
pub(crate) fn document_notes(
    header: &Element,
    body: Option<&Element>,
    attachments: &[&Element],
    others: &[&Element],
    doc: &EdxmlDocument,
) -> Vec<FieldNote> {
    let mut notes = Notes(Vec::new());
    let recall_or_update = doc.business_type != 0;
    // `ResponseFor` names the document a recall, update or replacement concerns when
    // `Bussiness/DocumentId` does not; otherwise the header has no place for it.
    let response_for_carried = recall_or_update && doc.business_document_id.is_none();
    let carried = |path: &str| {
        DOCUMENT_CARRIED.contains(&path)
            || (recall_or_update && path == "TraceHeaderList/Bussiness/DocumentId")
    };
    let reason = |_: &str| NOT_IN_HEADER;
    for section in &header.children {
        let section_path = section.name.clone();
        if section.edxml && section.name == "MessageHeader" {
            let mut responses = 0usize;
            for field in &section.children {
                let path = format!("MessageHeader/{}", field.name);
                if field.edxml && field.name == "ResponseFor" {
                    responses += 1;
                    if responses > 1 {
                        if has_value(field) {
                            notes.add(path, EXTRA_RESPONSE_FOR);
                        }
                        continue;
                    }
                    if response_for_carried {
                        continue;
                    }
                }
                notes.walk(field, &path, &carried, &reason);
            }
        } else {
            notes.walk(section, &section_path, &carried, &reason);
        }
    }
    if let Some(body) = body {
        notes.walk(body, "edXMLBody", &carried, &reason);
    }
    for attachment in attachments {
        notes.walk(
            attachment,
            "AttachmentEncoded/Attachment",
            &carried,
            &reason,
        );
    }
    for other in others {
        notes.walk(other, &other.name, &carried, &reason);
    }
    notes.0
}

/// The notes for a parsed status message; `header` is its `edXMLHeader`, which holds
/// the `Status` (or `MessageStatus`) element. Paths start with `Status/` either way.
pub(crate) fn status_notes(header: &Element) -> Vec<FieldNote> {
    let mut notes = Notes(Vec::new());
    let carried = |path: &str| {
        path.strip_prefix("Status/")
            .is_some_and(|rest| STATUS_CARRIED.contains(&rest))
    };
    let reason = |path: &str| {
        if path == "Status/Timestamp" {
            STATUS_TIME
        } else {
            NOT_IN_REPORT
        }
    };
    for section in &header.children {
        let is_status =
            section.edxml && (section.name == "Status" || section.name == "MessageStatus");
        let path = if is_status {
            "Status".to_owned()
        } else {
            section.name.clone()
        };
        notes.walk(section, &path, &carried, &reason);
    }
    notes.0
}
