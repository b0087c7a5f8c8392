//! Mapping between edXML documents and our signed header
//! (`lienthong_proto::pb::DocumentHeader`).
//!
//! Invariants:
//! - [`EdxmlDocument::to_header`] fills every header field edXML carries; the header it
//!   returns for a new document (business type 0) passes
//!   `lienthong_proto::document::validate_header` whenever the document passed
//!   [`crate::validate_document`]. For a recall, update or replacement, `refers_to` must be
//!   a message id, which edXML does not know: the caller resolves
//!   [`ImportedHeader::refers_to_business_id`] and sets it.
//! - That header encodes within `MAX_HEADER_BYTES` (what the broker checks before it
//!   verifies a signature): [`crate::validate_document`] bounds it
//!   (`header_bytes_bound`), since edXML puts no count on `ToPlaces/Place`.
//! - [`from_header`] copies every field back; the package's `DocumentId` is the header's
//!   business id and content ids are `att<n>@lienthong` in attachment order.

use lienthong_proto::document::describe_attachment;
use lienthong_proto::pb::{AttachmentInfo, DocumentHeader, SignerInfo};
use prost::Message as _;

use crate::document::{EdxmlAttachment, EdxmlDocument, Signer};

/// An attachment to export: its name, media type and bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachmentBytes {
    pub name: String,
    pub media_type: String,
    pub bytes: Vec<u8>,
}

/// A header built from an edXML package, with what the caller still has to resolve.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportedHeader {
    pub header: DocumentHeader,
    /// For a recall, update or replacement: the business id of the document concerned
    /// (see [`EdxmlDocument::refers_to_business_id`]); set `header.refers_to` to the
    /// message id it resolves to.
    pub refers_to_business_id: Option<String>,
}

impl EdxmlDocument {
    /// Our header for this package. `message_id` and `created_at_ms` come from the
    /// caller (the importing agent); `expires_at_ms` is 0 (the broker's default) and
    /// `refers_to` is empty (see [`ImportedHeader`]).
    pub fn to_header(&self, message_id: &str, created_at_ms: i64) -> ImportedHeader {
        let attachments = self
            .attachments
            .iter()
            .map(|a| describe_attachment(&a.name, &a.media_type, &a.bytes))
            .collect();
        ImportedHeader {
            header: self.header_with(message_id, created_at_ms, attachments),
            refers_to_business_id: self.refers_to_business_id(),
        }
    }

    /// An upper bound of the encoded size of the header an importing agent signs for
    /// this package: [`EdxmlDocument::to_header`] with the largest creation time, a
    /// message id in `refers_to`, and each attachment's size at its largest encoding
    /// (digests have a fixed length). Computed without hashing the attachments.
    pub(crate) fn header_bytes_bound(&self) -> usize {
        const UUID: &str = "00000000-0000-7000-8000-000000000000";
        let attachments = self
            .attachments
            .iter()
            .map(|a| AttachmentInfo {
                name: a.name.clone(),
                media_type: a.media_type.clone(),
                size: u64::MAX,
                sha256: vec![0xff; 32],
            })
            .collect();
        let mut header = self.header_with(UUID, i64::MAX, attachments);
        header.refers_to = UUID.to_owned();
        header.encoded_len()
    }

    fn header_with(
        &self,
        message_id: &str,
        created_at_ms: i64,
        attachments: Vec<AttachmentInfo>,
    ) -> DocumentHeader {
        DocumentHeader {
            message_id: message_id.to_owned(),
            sender: self.sender.clone(),
            recipients: self.recipients.clone(),
            business_id: self.business_id(),
            number: self.number.clone(),
            notation: self.notation.clone(),
            document_type: self.document_type.clone(),
            document_type_name: self.document_type_name.clone(),
            subject: self.subject.clone(),
            content: self.content.clone(),
            issue_place: self.issue_place.clone(),
            issue_date: self.issue_date.clone(),
            signer: Some(SignerInfo {
                competence: self.signer.competence.clone(),
                position: self.signer.position.clone(),
                full_name: self.signer.full_name.clone(),
            }),
            priority: self.priority,
            steering_type: self.steering_type,
            due_date: self.due_date.clone().unwrap_or_default(),
            business_type: i32::try_from(self.business_type).unwrap_or(i32::MAX),
            refers_to: String::new(),
            created_at_ms,
            expires_at_ms: 0,
            attachments,
            to_places: self.to_places.clone(),
            sender_name: self.sender_name.clone(),
            kind: lienthong_proto::pb::DocumentKind::Document as i32,
            status: None,
            business_reason: self.business_reason.clone().unwrap_or_default(),
            removed_recipients: Vec::new(),
            refers_to_business_id: self.refers_to_business_id().unwrap_or_default(),
        }
    }
}

/// An edXML document for a header we received or sent, to export to a system that
/// speaks edXML. `ResponseFor`, `Bussiness/DocumentId` and the reason of a recall are not
/// in our header: set `response_for`, `business_document_id` and `business_reason` on
/// the result when known. A steering type of 0 (not stated) stays 0.
pub fn from_header(header: &DocumentHeader, attachments: Vec<AttachmentBytes>) -> EdxmlDocument {
    let signer = header.signer.clone().unwrap_or_default();
    EdxmlDocument {
        sender: header.sender.clone(),
        sender_name: header.sender_name.clone(),
        recipients: header.recipients.clone(),
        number: header.number.clone(),
        notation: header.notation.clone(),
        document_type: header.document_type.clone(),
        document_type_name: header.document_type_name.clone(),
        subject: header.subject.clone(),
        content: header.content.clone(),
        issue_place: header.issue_place.clone(),
        issue_date: header.issue_date.clone(),
        signer: Signer {
            competence: signer.competence,
            position: signer.position,
            full_name: signer.full_name,
        },
        priority: header.priority,
        steering_type: header.steering_type,
        due_date: Some(header.due_date.clone()).filter(|d| !d.is_empty()),
        to_places: header.to_places.clone(),
        business_type: u32::try_from(header.business_type).unwrap_or(u32::MAX),
        business_reason: None,
        business_document_id: None,
        document_id: Some(lienthong_proto::document::business_id(
            &header.sender,
            &header.issue_date,
            &header.number,
            &header.notation,
        )),
        response_for: None,
        page_amount: None,
        promulgation_amount: None,
        sphere_of_promulgation: None,
        typist_text: None,
        appendixes: Vec::new(),
        attachments: attachments
            .into_iter()
            .enumerate()
            .map(|(i, a)| EdxmlAttachment {
                name: a.name,
                media_type: a.media_type,
                content_id: format!("att{}@lienthong", i + 1),
                description: String::new(),
                bytes: a.bytes,
            })
            .collect(),
    }
}
