//! lienthong-edxml: edXML packages (QCVN 102:2016/BTTTT) for interoperability with
//! existing document-management systems.
//!
//! Layout:
//! - [`xml`]: safe XML reading (no DTD, no entities beyond the predefined five, size,
//!   depth and element limits) into a small element tree, and the output writer.
//! - [`rules`]: the field rules of DESIGN §9 (lengths, dates, agency codes, document ids).
//! - [`document`]: [`EdxmlDocument`], [`parse_document`], [`validate_document`],
//!   [`write_document`].
//! - [`status`]: [`EdxmlStatus`], [`parse_status`], [`write_status`].
//! - [`header`]: mapping to and from `lienthong_proto::pb::DocumentHeader`.
//! - [`notes`]: [`FieldNote`], what a package holds that is accepted but not carried.
//! - [`error`]: [`EdxmlError`], whose variants name the edXML path and the rule broken.
//!
//! Invariants: nothing here panics on any input; whatever a parser returns passed every
//! rule, and whatever a writer produces its parser reads back equal.
//!
//! ## The edXML form, and the choices made where sources disagree
//!
//! Written form (the one the QCVN 102:2016 SDK examples use): a root `edXML` whose
//! default namespace is `http://www.mic.gov.vn/TBT/QCVN_102_2016`, holding
//! `edXML:edXMLEnvelope` (prefix `edXML` bound to the same namespace) with
//! `edXMLHeader` (`MessageHeader`, `TraceHeaderList/Bussiness`) and `edXMLBody`
//! (`edXMLManifest/Reference` with `xlink:href="cid:…"`), followed by
//! `AttachmentEncoded/Attachment` (`ContentType`, `ContentId` without `cid:`,
//! `Description`, `ContentTransferEncoded` base64, `AttachmentName`) under the root.
//!
//! Read leniently where implementations differ (each rule, its source and the producers
//! it was checked against: docs/edxml.md):
//! - the root may be `edXML` or a bare `edXMLEnvelope`; any prefix bound to the edXML
//!   namespace is accepted, and so are unqualified elements with no namespace at all;
//!   elements of other namespaces (e.g. XML signatures) are ignored;
//! - `AttachmentEncoded` may sit under the root or under the envelope; content ids are
//!   compared without `cid:` and `<>`; a reference's id is its `href` attribute, else its
//!   `ContentId` child; an attachment without `AttachmentName` takes its reference's;
//! - base64 may be wrapped over lines (whitespace is ignored);
//! - `OtherInfo/TyperNotation` (seen in SDKs) is read as `TypistText`; status
//!   `StaffInfo/EmailAddress` as `Email`;
//! - `SteeringType` 0 (what provincial platforms write) means "not stated" and is kept
//!   as 0, as is an absent or empty one; 1..=3 as the standard defines them;
//! - the status element may be `Status` or `MessageStatus`; its `Timestamp` may be
//!   `yyyy/MM/dd HH:mm:ss`, the legacy `dd/MM/yyyy HH:mm:ss` or ISO 8601 in Vietnam
//!   time, and is normalised to the first; a one-digit `StatusCode` is padded;
//! - several `ResponseFor` (the national SDK keeps a list): the first is read;
//! - whatever is accepted but not carried in the signed header is reported
//!   ([`FieldNote`], [`parse_message_noted`]), never dropped silently.
//!
//! Strict where the standard (and DESIGN §9) is clear:
//! - `SteeringType` above 3 is refused.
//! - `PromulgationDate`, `DueDate` and `ResponseFor/PromulgationDate` are real dates
//!   written `yyyy/MM/dd`.
//! - `DocumentId` is `{OrganId},{yyyy/MM/dd},{CodeNumber}/{CodeNotation}` and, in
//!   `MessageHeader`, equals what the header fields give.
//! - Only UTF-8 input.
#![forbid(unsafe_code)]

pub mod document;
pub mod error;
pub mod header;
pub mod notes;
pub mod rules;
pub mod status;
pub mod xml;

pub use document::{
    AttachmentSink, EdxmlAttachment, EdxmlDocument, Signer, parse_document, steering_type_text,
    validate_document, write_document,
};
pub use error::EdxmlError;
pub use header::{AttachmentBytes, ImportedHeader, from_header};
pub use notes::FieldNote;
pub use status::{EdxmlStatus, StaffInfo, parse_status, validate_status, write_status};

/// `ResponseFor`: the document a package or status message answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseFor {
    /// The agency that issued the original document.
    pub organ_id: String,
    /// Its number and notation, `CodeNumber/CodeNotation`.
    pub code: String,
    /// Its promulgation date, `yyyy/MM/dd`.
    pub promulgation_date: String,
    /// Its document id `{OrganId},{yyyy/MM/dd},{CodeNumber}/{CodeNotation}`.
    pub document_id: String,
}

/// Bounds on what a parser accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The whole package, in bytes.
    pub max_package_bytes: usize,
    /// One decoded attachment, in bytes.
    pub max_attachment_bytes: usize,
    /// Attachments per package.
    pub max_attachments: usize,
    /// Element nesting depth (edXML needs about 6).
    pub max_depth: usize,
    /// Elements in the whole package.
    pub max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_package_bytes: 256 * 1024 * 1024,
            max_attachment_bytes: 128 * 1024 * 1024,
            max_attachments: lienthong_proto::document::MAX_ATTACHMENTS,
            max_depth: 32,
            max_elements: 200_000,
        }
    }
}

/// Either kind of edXML message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdxmlMessage {
    Document(Box<EdxmlDocument>),
    Status(Box<EdxmlStatus>),
}

/// Parses a package that may be a document or a status message: a status message is one
/// whose `edXMLHeader` holds `Status` (or `MessageStatus`) rather than `MessageHeader`.
pub fn parse_message(xml: &[u8], limits: &Limits) -> Result<EdxmlMessage, EdxmlError> {
    message_from(xml, limits, None).map(|(message, _)| message)
}

/// [`parse_message`], with the fields accepted but not carried ([`FieldNote`]).
pub fn parse_message_noted(
    xml: &[u8],
    limits: &Limits,
) -> Result<(EdxmlMessage, Vec<FieldNote>), EdxmlError> {
    message_from(xml, limits, None)
}

/// [`parse_message`], with each attachment's decoded bytes handed to `sink` piece by
/// piece instead of kept in [`EdxmlAttachment::bytes`] (left empty): memory holds the
/// package and its tree, never a decoded attachment whole. The sink may have received
/// bytes even when the parse then fails on a later rule: its owner discards them.
/// Returns the fields accepted but not carried too ([`FieldNote`]).
pub fn parse_message_into(
    xml: &[u8],
    limits: &Limits,
    sink: &mut AttachmentSink<'_>,
) -> Result<(EdxmlMessage, Vec<FieldNote>), EdxmlError> {
    message_from(xml, limits, Some(sink))
}

/// The tree is built once (it holds the attachments' base64 text: building it twice
/// would double the memory a large package takes).
fn message_from(
    xml: &[u8],
    limits: &Limits,
    sink: Option<&mut AttachmentSink<'_>>,
) -> Result<(EdxmlMessage, Vec<FieldNote>), EdxmlError> {
    let root = xml::parse_tree(xml, limits)?;
    let (envelope, holders) = document::envelope(&root)?;
    let header = envelope.required("edXMLHeader", "edXMLHeader")?;
    let is_status = header.one("MessageHeader", "MessageHeader")?.is_none()
        && (header.one("Status", "Status")?.is_some()
            || header.one("MessageStatus", "Status")?.is_some());
    if is_status {
        let status = status::status_from_tree(&root)?;
        Ok((
            EdxmlMessage::Status(Box::new(status)),
            notes::status_notes(header),
        ))
    } else {
        let doc = document::document_from_tree(&root, limits, sink)?;
        let body = envelope.one("edXMLBody", "edXMLBody")?;
        let attachments: Vec<&xml::Element> = holders
            .iter()
            .flat_map(|holder| holder.all("AttachmentEncoded"))
            .flat_map(|list| list.all("Attachment"))
            .collect();
        let known = [
            "edXMLEnvelope",
            "edXMLHeader",
            "edXMLBody",
            "AttachmentEncoded",
        ];
        let others: Vec<&xml::Element> = holders
            .iter()
            .flat_map(|holder| holder.children.iter())
            .filter(|e| !(e.edxml && known.contains(&e.name.as_str())))
            .collect();
        let notes = notes::document_notes(header, body, &attachments, &others, &doc);
        Ok((EdxmlMessage::Document(Box::new(doc)), notes))
    }
}
