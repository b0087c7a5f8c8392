//! `lienthong verify DIR --ca F`: offline check of an exported document folder.
//!
//! The folder holds three signatures (DESIGN.md section 5) and all three are checked:
//! 1. origin: the sender's signature over the exact header bytes (`envelope.pb`);
//! 2. submission: the broker's signed receipt (`submission-receipt.pb`) naming the
//!    message id and the SHA-256 of those header bytes, and the time the broker
//!    accepted the document: the document's trusted time;
//! 3. delivery: the recipient agency's signed receipt (`delivery-receipt.pb`) for the
//!    same header digest, signed by that recipient.
//!
//! Invariant: the signer's certificate chain is checked at the trusted time from the
//! broker's receipt, never at the `created_at` the signer wrote into the header: a
//! document forged today with an expired key and backdated must not verify. A missing
//! or failing receipt, or a signer certificate not valid at the trusted time, makes the
//! document INVALID (exit 1) with the reason. Attachment files are checked against the
//! signed header's sizes and digests. `document.json` is for people and is not trusted;
//! everything printed from the header is escaped.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Args;
use lienthong_proto::document::{AttachmentCheck, verify_document};
use lienthong_proto::pb::{self, ReceiptKind, Signed};
use lienthong_proto::receipt::{ExpectedReceipt, MAX_RECEIPT_BYTES, verify_receipt};
use lienthong_proto::signing::VerifyTime;
use lienthong_proto::{ProtocolError, TrustAnchors, rfc3339_ms};
use prost::Message;

use crate::error::CliError;
use crate::output::{escape, outln};

/// File names in an exported folder (see lienthong_agent::export).
const ENVELOPE_FILE: &str = "envelope.pb";
const SUBMISSION_RECEIPT_FILE: &str = "submission-receipt.pb";
const DELIVERY_RECEIPT_FILE: &str = "delivery-receipt.pb";

/// Larger files are not an envelope or a receipt of ours; refused before reading.
const MAX_ENVELOPE_FILE_BYTES: u64 = 4 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The exported document folder (holds envelope.pb, the two receipts and the
    /// attachments).
    dir: PathBuf,
    /// CA bundle (PEM) trusted for document signatures (and for the broker's receipts
    /// unless --broker-ca is given).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// CA bundle (PEM) trusted for the broker's submission receipts, when it differs
    /// from --ca.
    #[arg(long)]
    broker_ca: Option<PathBuf>,
    /// TOML configuration file with `ca` (and optionally `broker_ca`) keys; flags win.
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
    broker_ca: Option<PathBuf>,
}

/// The keys the `--config` file takes (for `lienthong docs configuration`).
pub(crate) fn config_keys() -> &'static [&'static str] {
    crate::config::keys::<VerifyFile>()
}

fn load_anchors(path: &Path) -> Result<TrustAnchors, CliError> {
    let pem = std::fs::read(path).map_err(|e| CliError::config(path, e))?;
    TrustAnchors::from_pem(&pem).map_err(|e| CliError::config(path, e))
}

/// Reads one of the folder's signed files; missing or undecodable means INVALID.
fn read_signed(dir: &Path, name: &str, what: &str) -> Result<Signed, CliError> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path).map_err(|e| {
        CliError::Invalid(format!(
            "{what}: {}: {e} (an exported folder holds {ENVELOPE_FILE}, \
             {SUBMISSION_RECEIPT_FILE} and {DELIVERY_RECEIPT_FILE})",
            path.display()
        ))
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_ENVELOPE_FILE_BYTES.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
    if u64::try_from(bytes.len()).unwrap_or(u64::MAX) > MAX_ENVELOPE_FILE_BYTES {
        return Err(CliError::Invalid(format!(
            "{what}: {} is larger than {MAX_ENVELOPE_FILE_BYTES} bytes",
            path.display()
        )));
    }
    Signed::decode(bytes.as_slice()).map_err(|e| {
        CliError::Invalid(format!(
            "{what}: {}: not a signed message: {e}",
            path.display()
        ))
    })
}

/// The result of the three checks.
struct Checked {
    header: pb::DocumentHeader,
    header_sha256: [u8; 32],
    submission: pb::Receipt,
    delivery: pb::Receipt,
    /// The signer's certificate is still valid now (not only at the trusted time).
    valid_now: bool,
}

fn time_text(ms: i64) -> String {
    rfc3339_ms(ms).unwrap_or_else(|| format!("{ms} ms"))
}

/// Checks the three signatures; each failure names which one and why.
fn check_evidence(
    envelope: &Signed,
    submission: &Signed,
    delivery: &Signed,
    document_anchors: &TrustAnchors,
    broker_anchors: &TrustAnchors,
) -> Result<Checked, CliError> {
    let header_sha256 = lienthong_proto::sha256(&envelope.payload);
    // Read only to know which message id the receipts must name; nothing from it is
    // trusted before the sender's signature is checked below, and the receipts bind
    // the exact header bytes by digest anyway.
    let claimed_id = pb::DocumentHeader::decode(envelope.payload.as_ref())
        .map(|h| h.message_id)
        .unwrap_or_default();

    // 2. The broker's receipt first: its time is the one the signer is checked at.
    let submission = verify_receipt(
        submission,
        broker_anchors,
        &ExpectedReceipt {
            kind: ReceiptKind::Submission,
            message_id: &claimed_id,
            header_sha256: &header_sha256,
            recipient: None,
            live: false,
        },
    )
    .map_err(|e| {
        CliError::Invalid(format!(
            "submission receipt ({SUBMISSION_RECEIPT_FILE}): {e}"
        ))
    })?;
    let trusted_at = submission.at_ms;

    // 1. The sender's signature, its chain checked at the trusted time.
    let verified = verify_document(envelope, document_anchors, VerifyTime::AtMs(trusted_at))
        .map_err(|e| match e {
            ProtocolError::CertificateExpired | ProtocolError::CertificateNotYetValid => {
                CliError::Invalid(format!(
                    "sender signature ({ENVELOPE_FILE}): {e} at the trusted time {} (the \
                     broker's submission receipt); the time the signer claims is not trusted",
                    time_text(trusted_at)
                ))
            }
            other => CliError::Invalid(format!("sender signature ({ENVELOPE_FILE}): {other}")),
        })?;
    let valid_now = verify_document(envelope, document_anchors, VerifyTime::Now).is_ok();

    // 3. The recipient's receipt: signed by the agency it names, one of the recipients.
    let claimed_recipient = (delivery.payload.len() <= MAX_RECEIPT_BYTES)
        .then(|| pb::Receipt::decode(delivery.payload.as_ref()).ok())
        .flatten()
        .map(|r| r.recipient)
        .unwrap_or_default();
    if !verified.header.recipients.contains(&claimed_recipient) {
        return Err(CliError::Invalid(format!(
            "delivery receipt ({DELIVERY_RECEIPT_FILE}): it names {}, which is not a recipient of the document",
            escape(&claimed_recipient)
        )));
    }
    let delivery = verify_receipt(
        delivery,
        document_anchors,
        &ExpectedReceipt {
            kind: ReceiptKind::Delivery,
            message_id: &verified.header.message_id,
            header_sha256: &header_sha256,
            recipient: Some(&claimed_recipient),
            live: false,
        },
    )
    .map_err(|e| CliError::Invalid(format!("delivery receipt ({DELIVERY_RECEIPT_FILE}): {e}")))?;
    if delivery.at_ms < submission.at_ms {
        return Err(CliError::Invalid(format!(
            "delivery receipt ({DELIVERY_RECEIPT_FILE}): it says {}, before the broker accepted \
             the document at {}",
            time_text(delivery.at_ms),
            time_text(submission.at_ms)
        )));
    }
    Ok(Checked {
        header: verified.header,
        header_sha256,
        submission,
        delivery,
        valid_now,
    })
}

pub fn run(args: VerifyArgs) -> Result<(), CliError> {
    let file: VerifyFile = crate::config::load(args.config.as_deref())?;
    let from_file =
        |p: Option<PathBuf>| p.map(|p| crate::config::relative_to(args.config.as_deref(), p));
    let ca = crate::config::required(args.ca.clone(), from_file(file.ca), "ca")?;
    let document_anchors = load_anchors(&ca)?;
    let broker_anchors = match args.broker_ca.clone().or(from_file(file.broker_ca)) {
        Some(path) => load_anchors(&path)?,
        None => document_anchors.clone(),
    };
    let envelope_path = args.dir.join(ENVELOPE_FILE);
    if !envelope_path.is_file() {
        return Err(CliError::Usage(format!(
            "{}: no such file; give an exported document folder",
            envelope_path.display()
        )));
    }
    let envelope = read_signed(&args.dir, ENVELOPE_FILE, "sender signature")?;
    let submission = read_signed(&args.dir, SUBMISSION_RECEIPT_FILE, "submission receipt")?;
    let delivery = read_signed(&args.dir, DELIVERY_RECEIPT_FILE, "delivery receipt")?;
    let checked = check_evidence(
        &envelope,
        &submission,
        &delivery,
        &document_anchors,
        &broker_anchors,
    )?;
    for (index, info) in checked.header.attachments.iter().enumerate() {
        check_file(&args.dir.join(&info.name), index, info)?;
    }
    print_report(&args, &checked);
    Ok(())
}

fn print_report(args: &VerifyArgs, checked: &Checked) {
    let header = &checked.header;
    let trusted = time_text(checked.submission.at_ms);
    let certificate = if checked.valid_now {
        "certificate valid at the trusted time and now"
    } else {
        "certificate valid at the trusted time; expired since"
    };
    if args.json {
        let report = serde_json::json!({
            "valid": true,
            "message_id": header.message_id,
            "business_id": header.business_id,
            "sender": header.sender,
            "recipients": header.recipients,
            "subject": header.subject,
            "header_sha256": hex::encode(checked.header_sha256),
            "trusted_time": trusted,
            "certificate_checked_at": certificate,
            "signatures": [
                {"kind": "origin", "signer": header.sender, "file": ENVELOPE_FILE},
                {"kind": "submission", "signer": checked.submission.issuer,
                 "at": time_text(checked.submission.at_ms), "file": SUBMISSION_RECEIPT_FILE},
                {"kind": "delivery", "signer": checked.delivery.recipient,
                 "at": time_text(checked.delivery.at_ms), "file": DELIVERY_RECEIPT_FILE},
            ],
            "attachments": header.attachments.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
        });
        outln!("{report}");
        return;
    }
    outln!("VALID: {} (3 signatures checked)", args.dir.display());
    outln!("  message id    {}", escape(&header.message_id));
    outln!("  business id   {}", escape(&header.business_id));
    outln!("  trusted time  {trusted} (from the broker's submission receipt)");
    outln!(
        "  1 origin      signed by sender {} over the header ({certificate})",
        escape(&header.sender)
    );
    outln!(
        "  2 submission  broker receipt by {} at {trusted}, bound to header SHA-256 {}",
        escape(&checked.submission.issuer),
        hex::encode(checked.header_sha256)
    );
    outln!(
        "  3 delivery    recipient receipt by {} at {}",
        escape(&checked.delivery.recipient),
        time_text(checked.delivery.at_ms)
    );
    outln!("  subject       {}", escape(&header.subject));
    for info in &header.attachments {
        outln!(
            "  attachment    {} ({} bytes, SHA-256 matches)",
            escape(&info.name),
            info.size
        );
    }
}

fn check_file(path: &Path, index: usize, info: &pb::AttachmentInfo) -> Result<(), CliError> {
    let mut file = std::fs::File::open(path).map_err(|e| {
        CliError::Invalid(format!(
            "attachment {}: {e}",
            escape(&path.display().to_string())
        ))
    })?;
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
