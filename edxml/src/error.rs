//! The one error type of this crate.
//!
//! Invariants: every variant that concerns a field carries its edXML path (e.g.
//! `MessageHeader/Code/CodeNumber`, relative to `edXMLHeader`, or
//! `AttachmentEncoded/Attachment[2]/AttachmentName` with a 1-based index), so that the
//! Display text reads "<path>: <rule broken>". Offending values are shortened with
//! [`shorten`] (64 characters at most, control characters replaced) before they are
//! stored, so an error never carries a whole hostile input.

/// Why an edXML package or status message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EdxmlError {
    #[error("XML syntax error at line {line}, column {column}: {detail}")]
    XmlSyntax {
        line: usize,
        column: usize,
        detail: String,
    },
    #[error(
        "document type declarations (DTD) are refused: they can define entities (XXE, entity expansion)"
    )]
    DtdRefused,
    #[error(
        "entity reference &{name}; is refused: only the five predefined XML entities and character references are allowed"
    )]
    EntityRefused { name: String },
    #[error("the {what} exceeds the limit of {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("too many {what}: at most {limit}")]
    TooMany { what: &'static str, limit: usize },
    #[error(
        "not an edXML package: the root element is {found}, expected edXML or edXMLEnvelope in namespace http://www.mic.gov.vn/TBT/QCVN_102_2016"
    )]
    NotEdxml { found: String },
    #[error("{path}: required element is missing")]
    MissingElement { path: String },
    #[error("{path}: appears more than once")]
    DuplicateElement { path: String },
    #[error("{path}: a value is required")]
    EmptyValue { path: String },
    #[error("{path}: at most {max} characters (got {got})")]
    TooLong {
        path: String,
        max: usize,
        got: usize,
    },
    #[error("{path}: control characters are not allowed")]
    ControlCharacter { path: String },
    #[error("{path}: one line: no line breaks or tabs (the signed header shows it on one line)")]
    NotOneLine { path: String },
    #[error("{path}: a real date written yyyy/MM/dd (got \"{value}\")")]
    InvalidDate { path: String, value: String },
    #[error("{path}: a real date and time written yyyy/MM/dd HH:mm:ss (got \"{value}\")")]
    InvalidTimestamp { path: String, value: String },
    #[error("{path}: an integer from {min} to {max} (got \"{value}\")")]
    OutOfRange {
        path: String,
        min: u32,
        max: u32,
        value: String,
    },
    #[error(
        "{path}: \"{value}\" is not a valid agency code (expected ddd.dd.dd.Xdd, e.g. 000.00.12.H31)"
    )]
    InvalidAgencyCode { path: String, value: String },
    #[error("{path}: {rule} (got \"{value}\")")]
    InvalidValue {
        path: String,
        rule: &'static str,
        value: String,
    },
    #[error(
        "{path}: must be {{OrganId}},{{yyyy/MM/dd}},{{CodeNumber}}/{{CodeNotation}} (got \"{value}\")"
    )]
    InvalidDocumentId { path: String, value: String },
    #[error("{path}: \"{value}\" does not match the header, which gives \"{expected}\"")]
    DocumentIdMismatch {
        path: String,
        value: String,
        expected: String,
    },
    #[error(
        "{path}: \"{value}\" is not a safe file name (one plain name, no path, no control or reserved characters)"
    )]
    UnsafeFileName { path: String, value: String },
    #[error("{path}: \"{value}\" names two attachments (names are compared without case)")]
    DuplicateAttachmentName { path: String, value: String },
    #[error("{path}: content id \"{value}\" is used more than once")]
    DuplicateContentId { path: String, value: String },
    #[error("{path}: \"cid:{value}\" does not resolve to an attachment")]
    UnresolvedReference { path: String, value: String },
    #[error("{path}: attachment \"{value}\" is not referenced by the manifest")]
    UnreferencedAttachment { path: String, value: String },
    #[error("{path}: invalid base64 ({detail})")]
    InvalidBase64 { path: String, detail: String },
    /// The [`crate::AttachmentSink`] given to [`crate::parse_message_into`] refused the
    /// decoded bytes (e.g. the disk is full): not the package's fault.
    #[error("{path}: the decoded attachment could not be stored ({detail})")]
    Sink { path: String, detail: String },
    #[error("{path}: unknown status code \"{value}\" (known: 01, 02, 03, 04, 05, 06, 13, 15, 16)")]
    UnknownStatusCode { path: String, value: String },
    #[error("{path}: status {code} requires a description giving the reason")]
    DescriptionRequired { path: String, code: String },
}

impl EdxmlError {
    /// The edXML path of the field concerned, when the error is about one field.
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::MissingElement { path }
            | Self::DuplicateElement { path }
            | Self::EmptyValue { path }
            | Self::TooLong { path, .. }
            | Self::ControlCharacter { path }
            | Self::NotOneLine { path }
            | Self::InvalidDate { path, .. }
            | Self::InvalidTimestamp { path, .. }
            | Self::OutOfRange { path, .. }
            | Self::InvalidAgencyCode { path, .. }
            | Self::InvalidValue { path, .. }
            | Self::InvalidDocumentId { path, .. }
            | Self::DocumentIdMismatch { path, .. }
            | Self::UnsafeFileName { path, .. }
            | Self::DuplicateAttachmentName { path, .. }
            | Self::DuplicateContentId { path, .. }
            | Self::UnresolvedReference { path, .. }
            | Self::UnreferencedAttachment { path, .. }
            | Self::InvalidBase64 { path, .. }
            | Self::Sink { path, .. }
            | Self::UnknownStatusCode { path, .. }
            | Self::DescriptionRequired { path, .. } => Some(path),
            Self::XmlSyntax { .. }
            | Self::DtdRefused
            | Self::EntityRefused { .. }
            | Self::TooLarge { .. }
            | Self::TooMany { .. }
            | Self::NotEdxml { .. } => None,
        }
    }

    /// The variant's name, e.g. `"TooLong"`: what corpus tests compare.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::XmlSyntax { .. } => "XmlSyntax",
            Self::DtdRefused => "DtdRefused",
            Self::EntityRefused { .. } => "EntityRefused",
            Self::TooLarge { .. } => "TooLarge",
            Self::TooMany { .. } => "TooMany",
            Self::NotEdxml { .. } => "NotEdxml",
            Self::MissingElement { .. } => "MissingElement",
            Self::DuplicateElement { .. } => "DuplicateElement",
            Self::EmptyValue { .. } => "EmptyValue",
            Self::TooLong { .. } => "TooLong",
            Self::ControlCharacter { .. } => "ControlCharacter",
            Self::NotOneLine { .. } => "NotOneLine",
            Self::InvalidDate { .. } => "InvalidDate",
            Self::InvalidTimestamp { .. } => "InvalidTimestamp",
            Self::OutOfRange { .. } => "OutOfRange",
            Self::InvalidAgencyCode { .. } => "InvalidAgencyCode",
            Self::InvalidValue { .. } => "InvalidValue",
            Self::InvalidDocumentId { .. } => "InvalidDocumentId",
            Self::DocumentIdMismatch { .. } => "DocumentIdMismatch",
            Self::UnsafeFileName { .. } => "UnsafeFileName",
            Self::DuplicateAttachmentName { .. } => "DuplicateAttachmentName",
            Self::DuplicateContentId { .. } => "DuplicateContentId",
            Self::UnresolvedReference { .. } => "UnresolvedReference",
            Self::UnreferencedAttachment { .. } => "UnreferencedAttachment",
            Self::InvalidBase64 { .. } => "InvalidBase64",
            Self::Sink { .. } => "Sink",
            Self::UnknownStatusCode { .. } => "UnknownStatusCode",
            Self::DescriptionRequired { .. } => "DescriptionRequired",
        }
    }
}

/// Untrusted text shortened for an error message: at most 64 characters, control
/// characters replaced by `?`, an ellipsis when cut.
pub fn shorten(text: &str) -> String {
    lienthong_proto::agency::printable(text)
}
