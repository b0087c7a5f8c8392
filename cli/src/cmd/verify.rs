//! `lienthong verify DIR --ca F`: offline check of an exported document folder.
//!
//! Checks, in order: the envelope's signature and the signer's chain against the given
//! CA bundle (now; if the certificate has since expired, at the signing time the header
//! states, and says so), that the signer is the sender, and every attachment file's
//! size and SHA-256 against the signed header. `document.json` is for people and is not
//! trusted.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Args;
use lienthong_proto::document::{AttachmentCheck, VerifiedDocument, verify_document};
use lienthong_proto::pb::Signed;
use lienthong_proto::signing::VerifyTime;
use lienthong_proto::{ProtocolError, TrustAnchors};
use prost::Message;

use crate::error::CliError;
use crate::output::outln;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The exported document folder (holds envelope.pb and the attachments).
    dir: PathBuf,
    /// CA bundle (PEM) trusted for document signatures.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// TOML configuration file with a `ca` key; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyFile {
    ca: Option<PathBuf>,
}

pub fn run(args: VerifyArgs) -> Result<(), CliError> {
    let file: VerifyFile = crate::config::load(args.config.as_deref())?;
    let ca = crate::config::required(
        args.ca,
        file.ca
            .map(|p| crate::config::relative_to(args.config.as_deref(), p)),
        "ca",
    )?;
    let ca_pem = std::fs::read(&ca).map_err(|e| CliError::config(&ca, e))?;
    let anchors = TrustAnchors::from_pem(&ca_pem).map_err(|e| CliError::config(&ca, e))?;
    let envelope_path = args.dir.join("envelope.pb");
    let envelope_bytes = std::fs::read(&envelope_path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", envelope_path.display())))?;
    let envelope = Signed::decode(envelope_bytes.as_slice()).map_err(|e| {
        CliError::Invalid(format!(
            "{}: not a signed envelope: {e}",
            envelope_path.display()
        ))
    })?;
    let (verified, checked_at) = verify_with_fallback(&envelope, &anchors)
        .map_err(|e| CliError::Invalid(format!("signature: {e}")))?;
    for (index, info) in verified.header.attachments.iter().enumerate() {
        check_file(&args.dir.join(&info.name), index, info)?;
    }
    let header = &verified.header;
    if args.json {
        let report = serde_json::json!({
            "valid": true,
            "message_id": header.message_id,
            "business_id": header.business_id,
            "sender": header.sender,
            "recipients": header.recipients,
            "subject": header.subject,
            "header_sha256": hex::encode(verified.header_sha256),
            "certificate_checked_at": checked_at,
            "attachments": header.attachments.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
        });
        outln!("{report}");
    } else {
        outln!("VALID: {}", args.dir.display());
        outln!("  message id   {}", header.message_id);
        outln!("  business id  {}", header.business_id);
        outln!(
            "  signed by    {} (signature and certificate chain verified, {checked_at})",
            header.sender
        );
        outln!("  subject      {}", header.subject);
        for info in &header.attachments {
            outln!(
                "  attachment   {} ({} bytes, SHA-256 matches)",
                info.name,
                info.size
            );
        }
    }
    Ok(())
}

fn verify_with_fallback(
    envelope: &Signed,
    anchors: &TrustAnchors,
) -> Result<(VerifiedDocument, &'static str), ProtocolError> {
    match verify_document(envelope, anchors, VerifyTime::Now) {
        Ok(verified) => Ok((verified, "certificate valid now")),
        Err(ProtocolError::CertificateExpired) => {
            // Evidence outlives certificates: check the chain at the signing time.
            let header = lienthong_proto::pb::DocumentHeader::decode(envelope.payload.as_ref())
                .map_err(|e| ProtocolError::Malformed {
                    what: "document header",
                    detail: e.to_string(),
                })?;
            let verified =
                verify_document(envelope, anchors, VerifyTime::AtMs(header.created_at_ms))?;
            Ok((
                verified,
                "certificate valid at the signing time; expired since",
            ))
        }
        Err(other) => Err(other),
    }
}

fn check_file(
    path: &Path,
    index: usize,
    info: &lienthong_proto::pb::AttachmentInfo,
) -> Result<(), CliError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| CliError::Invalid(format!("attachment {}: {e}", path.display())))?;
    let mut check = AttachmentCheck::new(index, info);
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        check
            .update(&buffer[..n])
            .map_err(|e| CliError::Invalid(e.to_string()))?;
    }
    check.finish().map_err(|e| CliError::Invalid(e.to_string()))
}
