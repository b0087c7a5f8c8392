//! edXML document packages: the model, [`parse_document`], [`validate_document`] and
//! [`write_document`].
//!
//! Invariants:
//! - [`parse_document`] returns only documents that pass [`validate_document`]; and
//!   [`write_document`] writes only such documents, so `parse(write(doc)) == doc` for
//!   every document `parse_document` returned.
//! - Single values are trimmed of surrounding whitespace when read.
//! - Every manifest reference resolves to exactly one attachment and every attachment is
//!   referenced exactly once; content ids are compared without a `cid:` prefix or `<>`.

use std::collections::{HashMap, HashSet};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::error::{EdxmlError, shorten};
use crate::rules::{
    self, agency, date, document_id, max_chars, no_control, one_line, required_chars,
    required_one_line,
};
use crate::xml::{EDXML_NS, Element, Writer, parse_tree};
use crate::{Limits, ResponseFor};

/// Steering type kept when the package has no (or an empty) `SteeringType`: 0, not
/// stated, the value real producers write for the same thing (issue 16).
pub const DEFAULT_STEERING_TYPE: u32 = 0;

/// `SteeringType` as people read it: `0 (not stated)`, `1 (not a directive)`,
/// `2 (directive)`, `3 (report on a directive)`; any other value as a bare number.
pub fn steering_type_text(steering_type: u32) -> String {
    let meaning = match steering_type {
        0 => "not stated",
        1 => "not a directive",
        2 => "directive",
        3 => "report on a directive",
        other => return other.to_string(),
    };
    format!("{steering_type} ({meaning})")
}
/// Media type used when an attachment has no `ContentType`.
pub const DEFAULT_MEDIA_TYPE: &str = "application/octet-stream";

/// Who signed the paper document (`MessageHeader/SignerInfo`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signer {
    pub competence: String,
    pub position: String,
    pub full_name: String,
}

/// One attachment, decoded.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct EdxmlAttachment {
    /// File name (`AttachmentName`): a safe plain file name.
    pub name: String,
    /// `ContentType`, e.g. `application/pdf`.
    pub media_type: String,
    /// Content id without the `cid:` prefix.
    pub content_id: String,
    /// `Description`, empty when none.
    pub description: String,
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for EdxmlAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdxmlAttachment")
            .field("name", &self.name)
            .field("media_type", &self.media_type)
            .field("content_id", &self.content_id)
            .field("description", &self.description)
            .field("bytes", &format_args!("{} bytes", self.bytes.len()))
            .finish()
    }
}

/// An edXML document package (QCVN 102:2016 `MessageHeader`, `TraceHeaderList/Bussiness`
/// and the attachments).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EdxmlDocument {
    /// `From/OrganId`.
    pub sender: String,
    /// `From/OrganName`, empty when none.
    pub sender_name: String,
    /// Each `To/OrganId`, at least one.
    pub recipients: Vec<String>,
    /// `Code/CodeNumber` (số), 1..=11 characters.
    pub number: String,
    /// `Code/CodeNotation` (ký hiệu), at most 30 characters.
    pub notation: String,
    /// `DocumentType/Type`.
    pub document_type: String,
    /// `DocumentType/TypeName`, at most 100 characters.
    pub document_type_name: String,
    /// `Subject` (trích yếu), 1..=500 characters.
    pub subject: String,
    /// `Content`, at most 500 characters.
    pub content: String,
    /// `PromulgationInfo/Place`, at most 50 characters.
    pub issue_place: String,
    /// `PromulgationInfo/PromulgationDate`, `yyyy/MM/dd`.
    pub issue_date: String,
    pub signer: Signer,
    /// `OtherInfo/Priority`, 0..=4.
    pub priority: u32,
    /// `SteeringType`: 0 not stated ([`DEFAULT_STEERING_TYPE`], also when absent),
    /// 1 not a directive, 2 directive, 3 report on a directive.
    pub steering_type: u32,
    /// `DueDate`, `yyyy/MM/dd`.
    pub due_date: Option<String>,
    /// Each `ToPlaces/Place`, at most 150 characters each.
    pub to_places: Vec<String>,
    /// `TraceHeaderList/Bussiness/BussinessDocType`: 0 new, 1 recall, 2 update, 3 replace.
    pub business_type: u32,
    /// `Bussiness/BussinessDocReason`.
    pub business_reason: Option<String>,
    /// `Bussiness/DocumentId`: the document a recall, update or replacement concerns.
    pub business_document_id: Option<String>,
    /// `MessageHeader/DocumentId`; when present it equals
    /// `{sender},{issue_date},{number}/{notation}`.
    pub document_id: Option<String>,
    /// `MessageHeader/ResponseFor`: the document this one answers.
    pub response_for: Option<ResponseFor>,
    /// `OtherInfo/PageAmount`.
    pub page_amount: Option<u32>,
    /// `OtherInfo/PromulgationAmount`.
    pub promulgation_amount: Option<u32>,
    /// `OtherInfo/SphereOfPromulgation`.
    pub sphere_of_promulgation: Option<String>,
    /// `OtherInfo/TypistText` (also read from `TyperNotation`).
    pub typist_text: Option<String>,
    /// Each `OtherInfo/Appendixes/Appendix`.
    pub appendixes: Vec<String>,
    pub attachments: Vec<EdxmlAttachment>,
}

impl EdxmlDocument {
    /// The business document id `{sender},{issue_date},{number}/{notation}`.
    pub fn business_id(&self) -> String {
        lienthong_proto::document::business_id(
            &self.sender,
            &self.issue_date,
            &self.number,
            &self.notation,
        )
    }

    /// For a recall, update or replacement: the document id it concerns, for the caller
    /// to resolve to a message id. `Bussiness/DocumentId` first, then
    /// `ResponseFor/DocumentId`, then the package's own `DocumentId` (a recall or update
    /// travels under the id of the document it concerns). `None` for a new document.
    pub fn refers_to_business_id(&self) -> Option<String> {
        if self.business_type == 0 {
            return None;
        }
        self.business_document_id
            .clone()
            .or_else(|| self.response_for.as_ref().map(|r| r.document_id.clone()))
            .filter(|id| !id.is_empty())
            .or_else(|| Some(self.business_id()))
    }
}

pub(crate) mod path {
    pub const FROM: &str = "MessageHeader/From";
    pub const FROM_ORGAN_ID: &str = "MessageHeader/From/OrganId";
    pub const FROM_ORGAN_NAME: &str = "MessageHeader/From/OrganName";
    pub const TO: &str = "MessageHeader/To";
    pub const TO_ORGAN_ID: &str = "MessageHeader/To/OrganId";
    pub const CODE: &str = "MessageHeader/Code";
    pub const CODE_NUMBER: &str = "MessageHeader/Code/CodeNumber";
    pub const CODE_NOTATION: &str = "MessageHeader/Code/CodeNotation";
    pub const PROMULGATION_INFO: &str = "MessageHeader/PromulgationInfo";
    pub const PLACE: &str = "MessageHeader/PromulgationInfo/Place";
    pub const PROMULGATION_DATE: &str = "MessageHeader/PromulgationInfo/PromulgationDate";
    pub const DOCUMENT_TYPE: &str = "MessageHeader/DocumentType";
    pub const TYPE: &str = "MessageHeader/DocumentType/Type";
    pub const TYPE_NAME: &str = "MessageHeader/DocumentType/TypeName";
    pub const SUBJECT: &str = "MessageHeader/Subject";
    pub const CONTENT: &str = "MessageHeader/Content";
    pub const SIGNER_INFO: &str = "MessageHeader/SignerInfo";
    pub const COMPETENCE: &str = "MessageHeader/SignerInfo/Competence";
    pub const POSITION: &str = "MessageHeader/SignerInfo/Position";
    pub const FULL_NAME: &str = "MessageHeader/SignerInfo/FullName";
    pub const DUE_DATE: &str = "MessageHeader/DueDate";
    pub const TO_PLACES: &str = "MessageHeader/ToPlaces";
    pub const TO_PLACES_PLACE: &str = "MessageHeader/ToPlaces/Place";
    pub const OTHER_INFO: &str = "MessageHeader/OtherInfo";
    pub const PRIORITY: &str = "MessageHeader/OtherInfo/Priority";
    pub const SPHERE: &str = "MessageHeader/OtherInfo/SphereOfPromulgation";
    pub const TYPIST: &str = "MessageHeader/OtherInfo/TypistText";
    pub const PROMULGATION_AMOUNT: &str = "MessageHeader/OtherInfo/PromulgationAmount";
    pub const PAGE_AMOUNT: &str = "MessageHeader/OtherInfo/PageAmount";
    pub const APPENDIXES: &str = "MessageHeader/OtherInfo/Appendixes";
    pub const APPENDIX: &str = "MessageHeader/OtherInfo/Appendixes/Appendix";
    pub const RESPONSE_FOR: &str = "MessageHeader/ResponseFor";
    pub const STEERING_TYPE: &str = "MessageHeader/SteeringType";
    pub const DOCUMENT_ID: &str = "MessageHeader/DocumentId";
    pub const TRACE_HEADER_LIST: &str = "TraceHeaderList";
    pub const BUSSINESS: &str = "TraceHeaderList/Bussiness";
    pub const BUSSINESS_DOC_TYPE: &str = "TraceHeaderList/Bussiness/BussinessDocType";
    pub const BUSSINESS_DOC_REASON: &str = "TraceHeaderList/Bussiness/BussinessDocReason";
    pub const BUSSINESS_DOCUMENT_ID: &str = "TraceHeaderList/Bussiness/DocumentId";
    pub const MANIFEST: &str = "edXMLBody/edXMLManifest";
}

/// Finds the envelope under the root (`edXML` wrapper or a bare `edXMLEnvelope`) and
/// the elements that may hold `AttachmentEncoded`.
pub(crate) fn envelope(root: &Element) -> Result<(&Element, Vec<&Element>), EdxmlError> {
    if root.edxml && root.name == "edXML" {
        let envelope = root.required("edXMLEnvelope", "edXMLEnvelope")?;
        Ok((envelope, vec![root, envelope]))
    } else if root.edxml && root.name == "edXMLEnvelope" {
        Ok((root, vec![root]))
    } else {
        Err(EdxmlError::NotEdxml {
            found: shorten(&root.name),
        })
    }
}

fn opt_number(
    parent: &Element,
    name: &str,
    path: &str,
    min: u32,
    max: u32,
) -> Result<Option<u32>, EdxmlError> {
    parent
        .value_non_empty(name, path)?
        .map(|v| rules::number(path, &v, min, max))
        .transpose()
}

pub(crate) fn read_response_for(element: &Element, base: &str) -> Result<ResponseFor, EdxmlError> {
    let p = |leaf: &str| format!("{base}/{leaf}");
    Ok(ResponseFor {
        organ_id: element.value_or_empty("OrganId", &p("OrganId"))?,
        code: element.value_or_empty("Code", &p("Code"))?,
        promulgation_date: element.value_or_empty("PromulgationDate", &p("PromulgationDate"))?,
        document_id: element.value_or_empty("DocumentId", &p("DocumentId"))?,
    })
}

pub(crate) fn validate_response_for(r: &ResponseFor, base: &str) -> Result<(), EdxmlError> {
    let p = |leaf: &str| format!("{base}/{leaf}");
    agency(&p("OrganId"), &r.organ_id)?;
    max_chars(&p("Code"), &r.code, 42)?;
    date(&p("PromulgationDate"), &r.promulgation_date)?;
    let id_path = p("DocumentId");
    let parts = document_id(&id_path, &r.document_id)?;
    if parts.organ_id != r.organ_id || parts.date != r.promulgation_date {
        return Err(EdxmlError::DocumentIdMismatch {
            path: id_path,
            value: shorten(&r.document_id),
            expected: format!("{},{},…", r.organ_id, r.promulgation_date),
        });
    }
    Ok(())
}

fn content_key(id: &str) -> String {
    let id = id.trim();
    let id = id.strip_prefix("cid:").unwrap_or(id);
    id.trim_start_matches('<').trim_end_matches('>').to_owned()
}

/// Parses and validates an edXML document package.
pub fn parse_document(xml: &[u8], limits: &Limits) -> Result<EdxmlDocument, EdxmlError> {
    let root = parse_tree(xml, limits)?;
    document_from_tree(&root, limits, None)
}

/// Receives the decoded bytes of each attachment while a package is parsed with
/// [`crate::parse_message_into`]: `(attachment index, bytes)`, in order, at least once
/// per attachment (an empty slice for an empty one). An `Err` stops the parse with
/// [`EdxmlError::Sink`] carrying its text.
pub type AttachmentSink<'a> = dyn FnMut(usize, &[u8]) -> Result<(), String> + 'a;

/// A document from a parsed tree; with a sink, attachment bytes go there and
/// [`EdxmlAttachment::bytes`] stays empty.
pub(crate) fn document_from_tree(
    root: &Element,
    limits: &Limits,
    sink: Option<&mut AttachmentSink<'_>>,
) -> Result<EdxmlDocument, EdxmlError> {
    let (env, holders) = envelope(root)?;
    let header = env.required("edXMLHeader", "edXMLHeader")?;
    let message = header.required("MessageHeader", "MessageHeader")?;
    let doc = read_document(header, message, env, &holders, limits, sink)?;
    validate_document(&doc, limits)?;
    Ok(doc)
}

fn read_document(
    header: &Element,
    m: &Element,
    env: &Element,
    holders: &[&Element],
    limits: &Limits,
    sink: Option<&mut AttachmentSink<'_>>,
) -> Result<EdxmlDocument, EdxmlError> {
    use path as p;
    let mut doc = EdxmlDocument::default();

    let from = m.required("From", p::FROM)?;
    doc.sender =
        from.value("OrganId", p::FROM_ORGAN_ID)?
            .ok_or_else(|| EdxmlError::MissingElement {
                path: p::FROM_ORGAN_ID.into(),
            })?;
    doc.sender_name = from.value_or_empty("OrganName", p::FROM_ORGAN_NAME)?;

    for to in m.all("To") {
        let id =
            to.value("OrganId", p::TO_ORGAN_ID)?
                .ok_or_else(|| EdxmlError::MissingElement {
                    path: p::TO_ORGAN_ID.into(),
                })?;
        doc.recipients.push(id);
    }
    if doc.recipients.is_empty() {
        return Err(EdxmlError::MissingElement { path: p::TO.into() });
    }

    let code = m.required("Code", p::CODE)?;
    doc.number =
        code.value("CodeNumber", p::CODE_NUMBER)?
            .ok_or_else(|| EdxmlError::MissingElement {
                path: p::CODE_NUMBER.into(),
            })?;
    doc.notation = code.value_or_empty("CodeNotation", p::CODE_NOTATION)?;

    let promulgation = m.required("PromulgationInfo", p::PROMULGATION_INFO)?;
    doc.issue_place = promulgation.value_or_empty("Place", p::PLACE)?;
    doc.issue_date = promulgation
        .value("PromulgationDate", p::PROMULGATION_DATE)?
        .ok_or_else(|| EdxmlError::MissingElement {
            path: p::PROMULGATION_DATE.into(),
        })?;

    if let Some(kind) = m.one("DocumentType", p::DOCUMENT_TYPE)? {
        doc.document_type = kind.value_or_empty("Type", p::TYPE)?;
        doc.document_type_name = kind.value_or_empty("TypeName", p::TYPE_NAME)?;
    }
    doc.subject = m
        .value("Subject", p::SUBJECT)?
        .ok_or_else(|| EdxmlError::MissingElement {
            path: p::SUBJECT.into(),
        })?;
    doc.content = m.value_or_empty("Content", p::CONTENT)?;
    if let Some(signer) = m.one("SignerInfo", p::SIGNER_INFO)? {
        doc.signer = Signer {
            competence: signer.value_or_empty("Competence", p::COMPETENCE)?,
            position: signer.value_or_empty("Position", p::POSITION)?,
            full_name: signer.value_or_empty("FullName", p::FULL_NAME)?,
        };
    }
    doc.due_date = m.value_non_empty("DueDate", p::DUE_DATE)?;
    if let Some(places) = m.one("ToPlaces", p::TO_PLACES)? {
        doc.to_places = places
            .all("Place")
            .map(|e| e.text.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
    }
    if let Some(other) = m.one("OtherInfo", p::OTHER_INFO)? {
        doc.priority = opt_number(other, "Priority", p::PRIORITY, 0, 4)?.unwrap_or(0);
        doc.sphere_of_promulgation = other.value_non_empty("SphereOfPromulgation", p::SPHERE)?;
        doc.typist_text = match other.value_non_empty("TypistText", p::TYPIST)? {
            Some(text) => Some(text),
            None => other.value_non_empty("TyperNotation", p::TYPIST)?,
        };
        doc.promulgation_amount = opt_number(
            other,
            "PromulgationAmount",
            p::PROMULGATION_AMOUNT,
            0,
            u32::MAX,
        )?;
        doc.page_amount = opt_number(other, "PageAmount", p::PAGE_AMOUNT, 0, u32::MAX)?;
        if let Some(appendixes) = other.one("Appendixes", p::APPENDIXES)? {
            doc.appendixes = appendixes
                .all("Appendix")
                .map(|e| e.text.trim().to_owned())
                .filter(|v| !v.is_empty())
                .collect();
        }
    }
    // The national SDK keeps a list of `ResponseFor`; only the first is read (the
    // others are reported as not carried, see `crate::notes`).
    if let Some(response) = m.all("ResponseFor").next() {
        doc.response_for = Some(read_response_for(response, p::RESPONSE_FOR)?);
    }
    doc.steering_type =
        opt_number(m, "SteeringType", p::STEERING_TYPE, 0, 3)?.unwrap_or(DEFAULT_STEERING_TYPE);
    doc.document_id = m.value_non_empty("DocumentId", p::DOCUMENT_ID)?;

    if let Some(trace) = header.one("TraceHeaderList", p::TRACE_HEADER_LIST)?
        && let Some(business) = trace.one("Bussiness", p::BUSSINESS)?
    {
        doc.business_type =
            opt_number(business, "BussinessDocType", p::BUSSINESS_DOC_TYPE, 0, 3)?.unwrap_or(0);
        doc.business_reason =
            business.value_non_empty("BussinessDocReason", p::BUSSINESS_DOC_REASON)?;
        doc.business_document_id =
            business.value_non_empty("DocumentId", p::BUSSINESS_DOCUMENT_ID)?;
    }

    doc.attachments = read_attachments(env, holders, limits, sink)?;
    Ok(doc)
}

fn read_attachments(
    env: &Element,
    holders: &[&Element],
    limits: &Limits,
    mut sink: Option<&mut AttachmentSink<'_>>,
) -> Result<Vec<EdxmlAttachment>, EdxmlError> {
    // The manifest: content id -> index of the reference.
    let mut references: Vec<(String, Option<String>)> = Vec::new();
    if let Some(body) = env.one("edXMLBody", "edXMLBody")?
        && let Some(manifest) = body.one("edXMLManifest", path::MANIFEST)?
    {
        for (i, reference) in manifest.all("Reference").enumerate() {
            let base = format!("{}/Reference[{}]", path::MANIFEST, i + 1);
            let id = match reference.attribute("href") {
                Some(href) => content_key(href),
                None => content_key(
                    &reference
                        .value("ContentId", &format!("{base}/ContentId"))?
                        .unwrap_or_default(),
                ),
            };
            if id.is_empty() {
                return Err(EdxmlError::MissingElement {
                    path: format!("{base}/ContentId"),
                });
            }
            let name =
                reference.value_non_empty("AttachmentName", &format!("{base}/AttachmentName"))?;
            references.push((id, name));
        }
    }
    let mut encoded = Vec::new();
    for holder in holders {
        for list in holder.all("AttachmentEncoded") {
            encoded.extend(list.all("Attachment"));
        }
    }
    if encoded.len() > limits.max_attachments {
        return Err(EdxmlError::TooMany {
            what: "attachments",
            limit: limits.max_attachments,
        });
    }
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut attachments = Vec::with_capacity(encoded.len());
    for (i, element) in encoded.iter().enumerate() {
        let base = format!("AttachmentEncoded/Attachment[{}]", i + 1);
        let id_path = format!("{base}/ContentId");
        let content_id = content_key(&element.value("ContentId", &id_path)?.ok_or_else(|| {
            EdxmlError::MissingElement {
                path: id_path.clone(),
            }
        })?);
        if by_id.insert(content_id.clone(), i).is_some() {
            return Err(EdxmlError::DuplicateContentId {
                path: id_path,
                value: shorten(&content_id),
            });
        }
        let reference_name = references
            .iter()
            .find(|(id, _)| *id == content_id)
            .and_then(|(_, name)| name.clone());
        let name_path = format!("{base}/AttachmentName");
        let name = match element.value_non_empty("AttachmentName", &name_path)? {
            Some(name) => name,
            None => reference_name.ok_or(EdxmlError::MissingElement { path: name_path })?,
        };
        let media_type = element
            .value_non_empty("ContentType", &format!("{base}/ContentType"))?
            .unwrap_or_else(|| DEFAULT_MEDIA_TYPE.to_owned());
        let description = element.value_or_empty("Description", &format!("{base}/Description"))?;
        let data_path = format!("{base}/ContentTransferEncoded");
        let data = element
            .one("ContentTransferEncoded", &data_path)?
            .ok_or_else(|| EdxmlError::MissingElement {
                path: data_path.clone(),
            })?;
        let bytes = match sink.as_mut() {
            None => decode_base64(&data.text, &data_path, limits)?,
            Some(sink) => {
                let mut emit = |bytes: &[u8]| {
                    sink(i, bytes).map_err(|detail| EdxmlError::Sink {
                        path: data_path.clone(),
                        detail,
                    })
                };
                emit(&[])?;
                decode_base64_into(&data.text, &data_path, limits, &mut emit)?;
                Vec::new()
            }
        };
        attachments.push(EdxmlAttachment {
            name,
            media_type,
            content_id,
            description,
            bytes,
        });
    }
    let mut referenced = HashSet::new();
    for (i, (id, _)) in references.iter().enumerate() {
        let base = format!("{}/Reference[{}]", path::MANIFEST, i + 1);
        if !referenced.insert(id.clone()) {
            return Err(EdxmlError::DuplicateContentId {
                path: base,
                value: shorten(id),
            });
        }
        if !by_id.contains_key(id) {
            return Err(EdxmlError::UnresolvedReference {
                path: base,
                value: shorten(id),
            });
        }
    }
    for (i, attachment) in attachments.iter().enumerate() {
        if !referenced.contains(&attachment.content_id) {
            return Err(EdxmlError::UnreferencedAttachment {
                path: format!("AttachmentEncoded/Attachment[{}]", i + 1),
                value: shorten(&attachment.content_id),
            });
        }
    }
    Ok(attachments)
}

fn decode_base64(text: &str, path: &str, limits: &Limits) -> Result<Vec<u8>, EdxmlError> {
    let mut bytes = Vec::new();
    decode_base64_into(text, path, limits, &mut |piece: &[u8]| {
        bytes.extend_from_slice(piece);
        Ok(())
    })?;
    Ok(bytes)
}

/// Base64 characters decoded at a time (a multiple of 4): memory stays at one piece
/// however large the attachment.
const DECODE_PIECE: usize = 64 * 1024;

/// Decodes base64 `text` (whitespace ignored, padding required) piece by piece into
/// `emit`, never holding the whole decoded attachment. Refuses over
/// `max_attachment_bytes` before decoding anything, and reports an invalid byte at its
/// offset in the whitespace-free text, as a whole decode would. Returns the size.
fn decode_base64_into(
    text: &str,
    path: &str,
    limits: &Limits,
    emit: &mut dyn FnMut(&[u8]) -> Result<(), EdxmlError>,
) -> Result<u64, EdxmlError> {
    let significant = text.bytes().filter(|b| !b.is_ascii_whitespace()).count();
    if significant / 4 * 3 > limits.max_attachment_bytes.saturating_add(3) {
        return Err(EdxmlError::TooLarge {
            what: "attachment",
            limit: limits.max_attachment_bytes,
        });
    }
    let invalid = |e: base64::DecodeError, base: usize| {
        use base64::DecodeError as D;
        let e = match e {
            D::InvalidByte(at, byte) => D::InvalidByte(at.saturating_add(base), byte),
            D::InvalidLastSymbol(at, byte) => D::InvalidLastSymbol(at.saturating_add(base), byte),
            other => other,
        };
        EdxmlError::InvalidBase64 {
            path: path.into(),
            detail: e.to_string(),
        }
    };
    let mut piece: Vec<u8> = Vec::with_capacity(DECODE_PIECE.min(significant));
    let mut decoded: Vec<u8> = Vec::with_capacity(DECODE_PIECE / 4 * 3);
    let mut base = 0usize;
    let mut size = 0u64;
    let mut flush = |piece: &mut Vec<u8>, base: &mut usize, last: bool| {
        if piece.is_empty() || (!last && piece.len() < DECODE_PIECE) {
            return Ok(());
        }
        // Padding is legal only at the very end: a middle piece ending in `=` would
        // decode on its own, where the whole text is invalid.
        if !last && piece.last() == Some(&b'=') {
            return Err(invalid(base64::DecodeError::InvalidPadding, *base));
        }
        decoded.clear();
        STANDARD
            .decode_vec(piece.as_slice(), &mut decoded)
            .map_err(|e| invalid(e, *base))?;
        size = size.saturating_add(decoded.len() as u64);
        if size > limits.max_attachment_bytes as u64 {
            return Err(EdxmlError::TooLarge {
                what: "attachment",
                limit: limits.max_attachment_bytes,
            });
        }
        emit(&decoded)?;
        *base = base.saturating_add(piece.len());
        piece.clear();
        Ok(())
    };
    for byte in text.bytes().filter(|b| !b.is_ascii_whitespace()) {
        // A full piece is decoded only once more text follows it: then it is known not
        // to be the last.
        flush(&mut piece, &mut base, false)?;
        piece.push(byte);
    }
    flush(&mut piece, &mut base, true)?;
    Ok(size)
}

/// Checks every rule of DESIGN §9 on a document (what [`parse_document`] and
/// [`write_document`] both enforce).
pub fn validate_document(doc: &EdxmlDocument, limits: &Limits) -> Result<(), EdxmlError> {
    use path as p;
    agency(p::FROM_ORGAN_ID, &doc.sender)?;
    one_line(p::FROM_ORGAN_NAME, &doc.sender_name, 200)?;
    if doc.recipients.is_empty() {
        return Err(EdxmlError::MissingElement { path: p::TO.into() });
    }
    if doc.recipients.len() > lienthong_proto::document::MAX_RECIPIENTS {
        return Err(EdxmlError::TooMany {
            what: "recipients",
            limit: lienthong_proto::document::MAX_RECIPIENTS,
        });
    }
    let mut seen = HashSet::new();
    for recipient in &doc.recipients {
        agency(p::TO_ORGAN_ID, recipient)?;
        if *recipient == doc.sender {
            return Err(EdxmlError::InvalidValue {
                path: p::TO_ORGAN_ID.into(),
                rule: "the sender cannot be a recipient",
                value: shorten(recipient),
            });
        }
        if !seen.insert(recipient.as_str()) {
            return Err(EdxmlError::InvalidValue {
                path: p::TO_ORGAN_ID.into(),
                rule: "each recipient is listed once",
                value: shorten(recipient),
            });
        }
    }
    required_one_line(p::CODE_NUMBER, &doc.number, 11)?;
    one_line(p::CODE_NOTATION, &doc.notation, 30)?;
    one_line(p::PLACE, &doc.issue_place, 50)?;
    date(p::PROMULGATION_DATE, &doc.issue_date)?;
    one_line(p::TYPE, &doc.document_type, 100)?;
    one_line(p::TYPE_NAME, &doc.document_type_name, 100)?;
    required_one_line(p::SUBJECT, &doc.subject, 500)?;
    max_chars(p::CONTENT, &doc.content, 500)?;
    one_line(p::COMPETENCE, &doc.signer.competence, 100)?;
    one_line(p::POSITION, &doc.signer.position, 100)?;
    one_line(p::FULL_NAME, &doc.signer.full_name, 100)?;
    if let Some(due) = &doc.due_date {
        date(p::DUE_DATE, due)?;
    }
    for place in &doc.to_places {
        one_line(p::TO_PLACES_PLACE, place, 150)?;
    }
    rules::in_range(p::PRIORITY, doc.priority, 0, 4)?;
    rules::in_range(p::STEERING_TYPE, doc.steering_type, 0, 3)?;
    rules::in_range(p::BUSSINESS_DOC_TYPE, doc.business_type, 0, 3)?;
    if let Some(reason) = &doc.business_reason {
        max_chars(p::BUSSINESS_DOC_REASON, reason, 500)?;
    }
    if let Some(sphere) = &doc.sphere_of_promulgation {
        max_chars(p::SPHERE, sphere, 500)?;
    }
    if let Some(typist) = &doc.typist_text {
        max_chars(p::TYPIST, typist, 100)?;
    }
    for appendix in &doc.appendixes {
        max_chars(p::APPENDIX, appendix, 500)?;
    }
    if let Some(id) = &doc.document_id {
        document_id(p::DOCUMENT_ID, id)?;
        let expected = doc.business_id();
        if *id != expected {
            return Err(EdxmlError::DocumentIdMismatch {
                path: p::DOCUMENT_ID.into(),
                value: shorten(id),
                expected: shorten(&expected),
            });
        }
    }
    if let Some(id) = &doc.business_document_id {
        document_id(p::BUSSINESS_DOCUMENT_ID, id)?;
    }
    if let Some(response) = &doc.response_for {
        validate_response_for(response, p::RESPONSE_FOR)?;
    }
    validate_attachments(&doc.attachments, limits)?;
    // Each field has a length rule but `ToPlaces` has no count: without this bound a
    // package could map to a header the agent signs and the broker then refuses.
    if doc.header_bytes_bound() > lienthong_proto::document::MAX_HEADER_BYTES {
        return Err(EdxmlError::TooLarge {
            what: "signed header these fields make",
            limit: lienthong_proto::document::MAX_HEADER_BYTES,
        });
    }
    Ok(())
}

fn validate_attachments(
    attachments: &[EdxmlAttachment],
    limits: &Limits,
) -> Result<(), EdxmlError> {
    if attachments.len() > limits.max_attachments {
        return Err(EdxmlError::TooMany {
            what: "attachments",
            limit: limits.max_attachments,
        });
    }
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for (i, attachment) in attachments.iter().enumerate() {
        let base = format!("AttachmentEncoded/Attachment[{}]", i + 1);
        let name_path = format!("{base}/AttachmentName");
        // Surrounding whitespace is trimmed when read: " .x" would be written and read
        // back as ".x", which is not a safe name (found by the `edxml` fuzz target).
        if !lienthong_proto::document::is_safe_file_name(&attachment.name)
            || attachment.name.trim() != attachment.name
        {
            return Err(EdxmlError::UnsafeFileName {
                path: name_path,
                value: shorten(&attachment.name),
            });
        }
        if !names.insert(attachment.name.to_lowercase()) {
            return Err(EdxmlError::DuplicateAttachmentName {
                path: name_path,
                value: shorten(&attachment.name),
            });
        }
        let id_path = format!("{base}/ContentId");
        required_chars(&id_path, &attachment.content_id, 255)?;
        if attachment
            .content_id
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '<' | '>'))
            || attachment.content_id.starts_with("cid:")
        {
            return Err(EdxmlError::InvalidValue {
                path: id_path,
                rule: "a content id without cid:, spaces or angle brackets",
                value: shorten(&attachment.content_id),
            });
        }
        if !ids.insert(attachment.content_id.as_str()) {
            return Err(EdxmlError::DuplicateContentId {
                path: id_path,
                value: shorten(&attachment.content_id),
            });
        }
        required_one_line(&format!("{base}/ContentType"), &attachment.media_type, 127)?;
        no_control(&format!("{base}/Description"), &attachment.description)?;
        max_chars(&format!("{base}/Description"), &attachment.description, 500)?;
        if attachment.bytes.len() > limits.max_attachment_bytes {
            return Err(EdxmlError::TooLarge {
                what: "attachment",
                limit: limits.max_attachment_bytes,
            });
        }
    }
    Ok(())
}

pub(crate) fn write_response_for(w: &mut Writer, r: &ResponseFor) {
    w.open("edXML:ResponseFor", &[]);
    w.leaf("edXML:OrganId", &r.organ_id);
    w.leaf("edXML:Code", &r.code);
    w.leaf("edXML:PromulgationDate", &r.promulgation_date);
    w.leaf("edXML:DocumentId", &r.document_id);
    w.close("edXML:ResponseFor");
}

/// Writes a package in the QCVN 102:2016 form after checking every rule with the
/// default [`Limits`]: root `edXML` (default namespace edXML), `edXML:edXMLEnvelope`
/// with header and manifest, then `AttachmentEncoded` under the root.
pub fn write_document(doc: &EdxmlDocument) -> Result<Vec<u8>, EdxmlError> {
    validate_document(doc, &Limits::default())?;
    let mut w = Writer::new();
    w.open("edXML", &[("xmlns", EDXML_NS)]);
    w.open("edXML:edXMLEnvelope", &[("xmlns:edXML", EDXML_NS)]);
    w.open("edXML:edXMLHeader", &[]);
    w.open("edXML:MessageHeader", &[]);

    w.open("edXML:From", &[]);
    w.leaf("edXML:OrganId", &doc.sender);
    w.leaf("edXML:OrganName", &doc.sender_name);
    w.close("edXML:From");
    for recipient in &doc.recipients {
        w.open("edXML:To", &[]);
        w.leaf("edXML:OrganId", recipient);
        w.close("edXML:To");
    }
    w.open("edXML:Code", &[]);
    w.leaf("edXML:CodeNumber", &doc.number);
    w.leaf("edXML:CodeNotation", &doc.notation);
    w.close("edXML:Code");
    w.open("edXML:PromulgationInfo", &[]);
    w.leaf("edXML:Place", &doc.issue_place);
    w.leaf("edXML:PromulgationDate", &doc.issue_date);
    w.close("edXML:PromulgationInfo");
    w.open("edXML:DocumentType", &[]);
    w.leaf("edXML:Type", &doc.document_type);
    w.leaf("edXML:TypeName", &doc.document_type_name);
    w.close("edXML:DocumentType");
    w.leaf("edXML:Subject", &doc.subject);
    w.leaf("edXML:Content", &doc.content);
    w.open("edXML:SignerInfo", &[]);
    w.leaf("edXML:Competence", &doc.signer.competence);
    w.leaf("edXML:Position", &doc.signer.position);
    w.leaf("edXML:FullName", &doc.signer.full_name);
    w.close("edXML:SignerInfo");
    w.leaf_opt("edXML:DueDate", doc.due_date.as_deref());
    w.open("edXML:ToPlaces", &[]);
    for place in &doc.to_places {
        w.leaf("edXML:Place", place);
    }
    w.close("edXML:ToPlaces");
    w.open("edXML:OtherInfo", &[]);
    w.leaf("edXML:Priority", &doc.priority.to_string());
    w.leaf_opt(
        "edXML:SphereOfPromulgation",
        doc.sphere_of_promulgation.as_deref(),
    );
    w.leaf_opt("edXML:TypistText", doc.typist_text.as_deref());
    w.leaf_opt(
        "edXML:PromulgationAmount",
        doc.promulgation_amount.map(|n| n.to_string()).as_deref(),
    );
    w.leaf_opt(
        "edXML:PageAmount",
        doc.page_amount.map(|n| n.to_string()).as_deref(),
    );
    w.open("edXML:Appendixes", &[]);
    for appendix in &doc.appendixes {
        w.leaf("edXML:Appendix", appendix);
    }
    w.close("edXML:Appendixes");
    w.close("edXML:OtherInfo");
    if let Some(response) = &doc.response_for {
        write_response_for(&mut w, response);
    }
    w.leaf("edXML:SteeringType", &doc.steering_type.to_string());
    w.leaf_opt("edXML:DocumentId", doc.document_id.as_deref());
    w.close("edXML:MessageHeader");

    w.open("edXML:TraceHeaderList", &[]);
    w.open("edXML:Bussiness", &[]);
    w.leaf("edXML:BussinessDocType", &doc.business_type.to_string());
    w.leaf_opt("edXML:BussinessDocReason", doc.business_reason.as_deref());
    w.leaf_opt("edXML:DocumentId", doc.business_document_id.as_deref());
    w.close("edXML:Bussiness");
    w.close("edXML:TraceHeaderList");
    w.close("edXML:edXMLHeader");

    w.open("edXML:edXMLBody", &[]);
    w.open("edXML:edXMLManifest", &[("version", "1.0")]);
    for attachment in &doc.attachments {
        let href = format!("cid:{}", attachment.content_id);
        w.open(
            "edXML:Reference",
            &[
                ("xmlns:xlink", "http://www.w3.org/1999/xlink"),
                ("xlink:href", &href),
                ("xlink:type", "simple"),
            ],
        );
        w.leaf("edXML:ContentId", &href);
        w.leaf("edXML:AttachmentName", &attachment.name);
        w.leaf("edXML:ContentType", &attachment.media_type);
        w.close("edXML:Reference");
    }
    w.close("edXML:edXMLManifest");
    w.close("edXML:edXMLBody");
    w.close("edXML:edXMLEnvelope");

    if !doc.attachments.is_empty() {
        w.open("AttachmentEncoded", &[]);
        for attachment in &doc.attachments {
            w.open("Attachment", &[]);
            w.leaf("ContentType", &attachment.media_type);
            w.leaf("ContentId", &attachment.content_id);
            w.leaf("Description", &attachment.description);
            w.leaf(
                "ContentTransferEncoded",
                &STANDARD.encode(&attachment.bytes),
            );
            w.leaf("AttachmentName", &attachment.name);
            w.close("Attachment");
        }
        w.close("AttachmentEncoded");
    }
    w.close("edXML");
    Ok(w.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The piecewise decoder agrees with a whole decode on wrapped text at every piece
    /// boundary, and refuses what a whole decode refuses.
    #[test]
    fn piecewise_decoding_matches_a_whole_decode() {
        let limits = Limits::default();
        let piece = DECODE_PIECE / 4 * 3;
        for len in [0, 1, 2, 3, piece - 1, piece, piece + 1, 2 * piece + 2] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            let text = STANDARD.encode(&bytes);
            // Wrapped over lines of 76 characters, and with whitespace at the end.
            let wrapped: String = text
                .as_bytes()
                .chunks(76)
                .map(|line| String::from_utf8_lossy(line).into_owned())
                .collect::<Vec<_>>()
                .join("\r\n")
                + "\n  ";
            assert_eq!(
                decode_base64(&wrapped, "p", &limits).unwrap(),
                bytes,
                "{len}"
            );
            let mut pieces = 0;
            let mut total = Vec::new();
            let size = decode_base64_into(&text, "p", &limits, &mut |b: &[u8]| {
                pieces += 1;
                total.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            assert_eq!(size, len as u64);
            assert_eq!(total, bytes);
            assert!(pieces <= len / piece + 1, "{len}: {pieces} pieces");
        }
        // `=` ending a piece that is not the last: a whole decode refuses it too.
        let mut text = STANDARD.encode(vec![1u8; 2 * piece]).into_bytes();
        text[DECODE_PIECE - 1] = b'=';
        let text = String::from_utf8(text).unwrap();
        assert!(STANDARD.decode(&text).is_err());
        let error = decode_base64(&text, "p", &limits).unwrap_err();
        assert_eq!(error.kind(), "InvalidBase64");
        // An invalid byte is reported at its offset in the whole text.
        let mut text = STANDARD.encode(vec![1u8; 2 * piece]).into_bytes();
        text[DECODE_PIECE + 9] = b'@';
        let whole = STANDARD.decode(&text).unwrap_err().to_string();
        let text = String::from_utf8(text).unwrap();
        let error = decode_base64(&text, "p", &limits).unwrap_err().to_string();
        assert!(error.contains(&whole), "{error} / {whole}");
        // Over the attachment limit: refused before anything is decoded.
        let small = Limits {
            max_attachment_bytes: 10,
            ..Limits::default()
        };
        let mut called = false;
        let error = decode_base64_into(&STANDARD.encode([0u8; 30]), "p", &small, &mut |_| {
            called = true;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(error.kind(), "TooLarge");
        assert!(!called);
    }
}
