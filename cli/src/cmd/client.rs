//! `send`, `status` and `inbox`: a clerk's commands against the local agent's API.

use std::path::PathBuf;

use clap::Args;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, StatusView};
use serde::Deserialize;

use crate::config;
use crate::error::CliError;
use crate::http::AgentClient;
use crate::output::{escape, outln};

const DEFAULT_API: &str = "http://127.0.0.1:7180";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    api: Option<String>,
    api_token_file: Option<PathBuf>,
}

/// The keys the `--config` file takes (for `lienthong docs configuration`).
pub(crate) fn config_keys() -> &'static [&'static str] {
    crate::config::keys::<ClientFile>()
}

/// The agent's API and its token for a client subcommand: flags (or the environment
/// variable) first, then the `--config` file, then the default address.
pub(crate) fn agent_client(
    api: Option<String>,
    token_file: Option<PathBuf>,
    config: Option<&std::path::Path>,
) -> Result<AgentClient, CliError> {
    let file: ClientFile = config::load(config)?;
    let url = api.or(file.api).unwrap_or_else(|| DEFAULT_API.to_owned());
    let token_file = token_file.or(file.api_token_file.map(|p| config::relative_to(config, p)));
    let token = crate::http::read_token_file(token_file.as_deref())?;
    AgentClient::new(&url, &token)
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// TOML configuration file with `api` and `api_token_file`; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// The agent's API token file (the agent writes it to <data>/api-token).
    #[arg(long, env = "LIENTHONG_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Recipient agency codes, comma separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "edxml")]
    to: Vec<String>,
    /// Subject (trích yếu).
    #[arg(long, required_unless_present = "edxml")]
    subject: Option<String>,
    /// Send an edXML package (QCVN 102:2016) instead: recipients, fields and
    /// attachments come from the package; the agent signs it as usual.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "to", "subject", "number", "notation", "priority", "files",
        "updates", "replaces", "remove", "reason",
    ])]
    edxml: Option<PathBuf>,
    /// Document number (số); the agent numbers it when absent.
    #[arg(long)]
    number: Option<String>,
    /// Notation (ký hiệu), e.g. UBND-VP.
    #[arg(long)]
    notation: Option<String>,
    /// 0 normal, 1 urgent, 2 very urgent, 3 express, 4 express at a set time.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=4))]
    priority: Option<u32>,
    /// This document updates (business type 2) the one with this message id, sent by
    /// this agency.
    #[arg(long, conflicts_with = "replaces")]
    updates: Option<String>,
    /// This document replaces (business type 3) the one with this message id.
    #[arg(long)]
    replaces: Option<String>,
    /// With --updates/--replaces: recipients of the earlier version that this one
    /// removes (they are told), comma separated.
    #[arg(long, value_delimiter = ',')]
    remove: Vec<String>,
    /// Why it is updated or replaced.
    #[arg(long)]
    reason: Option<String>,
    /// Files to attach.
    files: Vec<PathBuf>,
}

pub async fn send(args: SendArgs) -> Result<(), CliError> {
    use std::io::IsTerminal as _;
    let client = agent_client(args.api, args.api_token_file, args.config.as_deref())?;
    if let Some(package) = &args.edxml {
        return super::edxml::send_package(&client, package).await;
    }
    let mut files = Vec::with_capacity(args.files.len());
    let mut total: u64 = 0;
    for path in &args.files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CliError::Usage(format!("{}: not a file name", path.display())))?;
        let meta = std::fs::metadata(path)
            .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        if !meta.is_file() {
            return Err(CliError::Usage(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        total = total.saturating_add(meta.len());
        files.push((name.to_owned(), path.clone()));
    }
    // Refused before any byte is uploaded when the agent would not take it.
    let limits = client.limits().await?;
    if total > limits.max_document_bytes {
        return Err(CliError::Failed(format!(
            "the files total {total} bytes; the agent accepts at most {} per document (max_document_bytes)",
            limits.max_document_bytes
        )));
    }
    // A progress bar for large files, only for a person watching a terminal.
    let bar = (std::io::stdout().is_terminal() && total >= PROGRESS_FROM_BYTES).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut attachments = Vec::with_capacity(files.len());
    let mut done_before: u64 = 0;
    for (name, path) in &files {
        let watcher = bar.clone();
        let base = done_before;
        let uploaded = client
            .upload(path, move |sent| {
                if let Some(bar) = &watcher {
                    bar.set_position(base + sent);
                }
            })
            .await?;
        done_before = done_before.saturating_add(uploaded.size);
        attachments.push(AttachmentUpload {
            name: name.clone(),
            media_type: None,
            content_base64: String::new(),
            upload_id: Some(uploaded.upload_id),
        });
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let request = SendRequest {
        to: args.to,
        subject: args.subject.unwrap_or_default(),
        number: args.number,
        notation: args.notation,
        priority: args.priority,
        attachments,
        business_type: if args.updates.is_some() {
            Some(2)
        } else if args.replaces.is_some() {
            Some(3)
        } else {
            None
        },
        refers_to: args.updates.or(args.replaces),
        business_reason: args.reason,
        removed_recipients: (!args.remove.is_empty()).then_some(args.remove),
        ..SendRequest::default()
    };
    let response = client.send(&request).await?;
    outln!("{}", response.message_id);
    Ok(())
}

/// Files smaller than this in total upload without a progress bar.
const PROGRESS_FROM_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// TOML configuration file with `api` and `api_token_file`; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// The agent's API token file (the agent writes it to <data>/api-token).
    #[arg(long, env = "LIENTHONG_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// The message id `send` printed.
    message_id: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn status(args: StatusArgs) -> Result<(), CliError> {
    let client = agent_client(args.api, args.api_token_file, args.config.as_deref())?;
    let view = client.status(&args.message_id).await?;
    if args.json {
        let text = serde_json::to_string(&view)
            .map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))?;
        outln!("{text}");
    } else {
        print_status(&view);
    }
    // A document that failed (refused by the broker, or refused or expired for a
    // recipient) is a failed operation for scripts: exit 1, after the status.
    match failure_of(&view) {
        Some(why) => Err(CliError::Failed(why)),
        None => Ok(()),
    }
}

/// Why the document failed, when it did.
fn failure_of(view: &StatusView) -> Option<String> {
    if view.outbox_state == "failed" {
        return Some(format!(
            "document {} failed: the broker refused it{}",
            escape(&view.message_id),
            view.failure_reason
                .as_ref()
                .map(|r| format!(" ({})", escape(r)))
                .unwrap_or_default()
        ));
    }
    let failed: Vec<String> = view
        .recipients
        .iter()
        .filter(|r| r.state == "refused" || r.state == "expired")
        .map(|r| format!("{} {}", escape(&r.agency), escape(&r.state)))
        .collect();
    (!failed.is_empty()).then(|| {
        format!(
            "document {} was not delivered to: {}",
            escape(&view.message_id),
            failed.join(", ")
        )
    })
}

/// The words for a business status code (DESIGN §9), Vietnamese and English.
pub(crate) fn business_code_words(code: &str) -> &'static str {
    match code {
        "01" => "đã đến / arrived",
        "02" => "từ chối tiếp nhận / refused",
        "03" => "đã tiếp nhận / accepted",
        "04" => "phân công / assigned",
        "05" => "đang xử lý / in progress",
        "06" => "hoàn thành / completed",
        "13" => "lấy lại / recall requested",
        "15" => "đồng ý thu hồi, cập nhật / recall or update agreed",
        "16" => "từ chối thu hồi, cập nhật / recall or update refused",
        _ => "mã không rõ / unknown code",
    }
}

/// The local outbox state in words.
fn outbox_words(state: &str) -> String {
    match state {
        "outbox" => "not yet at the broker (waiting in the outbox)".to_owned(),
        "submitted" => "at the broker".to_owned(),
        "failed" => "FAILED: refused by the broker".to_owned(),
        "received" => "received by this agency".to_owned(),
        other => escape(other).into_owned(),
    }
}

/// Every text shown comes from the agent, which has much of it from other agencies
/// and the broker: all of it goes through `escape`.
fn print_status(view: &StatusView) {
    outln!("message id   {}", escape(&view.message_id));
    outln!("business id  {}", escape(&view.business_id));
    outln!("sender       {}", escape(&view.sender));
    outln!("state        {}", outbox_words(&view.outbox_state));
    if let Some(reason) = &view.failure_reason {
        outln!("failure      {}", escape(reason));
    }
    if let Some(at) = &view.submitted_at {
        outln!(
            "accepted     {} (broker receipt {})",
            escape(at),
            if view.submission_receipt_verified {
                "verified"
            } else {
                "NOT verified"
            }
        );
    }
    outln!(
        "{:<15} {:<10} {:>8}  RECEIPT / REASON",
        "RECIPIENT",
        "STATE",
        "ATTEMPTS"
    );
    for r in &view.recipients {
        let detail = match (&r.receipt_verified, &r.delivered_at, &r.reason) {
            (Some(true), Some(at), _) => format!("delivered {}, receipt verified", escape(at)),
            (Some(false), _, _) => "receipt present but NOT verified".to_owned(),
            (_, _, Some(reason)) => escape(reason).into_owned(),
            _ => String::new(),
        };
        outln!(
            "{:<15} {:<10} {:>8}  {detail}",
            escape(&r.agency),
            escape(&r.state),
            r.attempts
        );
        if let Some(recall) = &r.recall {
            outln!("{:<15} recall {}", "", escape(recall));
        }
        for entry in &r.business {
            outln!(
                "{:<15} {} {} {}, reported by {}{}{}",
                "",
                escape(&entry.code),
                business_code_words(&entry.code),
                escape(&entry.at),
                escape(&entry.by),
                entry
                    .reason
                    .as_ref()
                    .map(|reason| format!(": {}", escape(reason)))
                    .unwrap_or_default(),
                if entry.verified {
                    ""
                } else {
                    " (NOT verified)"
                }
            );
        }
    }
}

#[derive(Debug, Args)]
pub struct InboxArgs {
    /// TOML configuration file with `api` and `api_token_file`; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// The agent's API token file (the agent writes it to <data>/api-token).
    #[arg(long, env = "LIENTHONG_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

pub async fn inbox(args: InboxArgs) -> Result<(), CliError> {
    let client = agent_client(args.api, args.api_token_file, args.config.as_deref())?;
    let items = client.inbox().await?;
    if args.json {
        let text = serde_json::to_string(&items)
            .map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))?;
        outln!("{text}");
    } else {
        outln!(
            "{:<36}  {:<13}  {:<25}  SUBJECT",
            "MESSAGE ID",
            "SENDER",
            "RECEIVED"
        );
        for item in &items {
            // Subject and sender come from another agency: escaped, so that a CR/LF or
            // a bidi override cannot forge a line of this listing.
            outln!(
                "{:<36}  {:<13}  {:<25}  {}",
                escape(&item.message_id),
                escape(&item.sender),
                escape(&item.received_at),
                escape(&item.subject)
            );
            outln!("{:<36}  {}", "", escape(&item.path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lienthong_agent::api_types::RecipientView;

    fn view(outbox_state: &str, states: &[&str]) -> StatusView {
        StatusView {
            message_id: "m".into(),
            business_id: "b".into(),
            sender: "000.00.00.H31".into(),
            outbox_state: outbox_state.into(),
            failure_reason: Some("bad signature".into()),
            submitted_at: None,
            submission_receipt_verified: false,
            recipients: states
                .iter()
                .map(|s| RecipientView {
                    agency: "000.00.01.H31".into(),
                    state: (*s).into(),
                    ..RecipientView::default()
                })
                .collect(),
        }
    }

    #[test]
    fn failed_documents_are_failures() {
        assert!(failure_of(&view("outbox", &["queued"])).is_none());
        assert!(failure_of(&view("submitted", &["delivered", "queued"])).is_none());
        let broker = failure_of(&view("failed", &["unknown"])).unwrap();
        assert!(broker.contains("bad signature"), "{broker}");
        let expired = failure_of(&view("submitted", &["delivered", "expired"])).unwrap();
        assert!(expired.contains("000.00.01.H31 expired"), "{expired}");
        assert!(failure_of(&view("submitted", &["refused"])).is_some());
    }

    #[test]
    fn codes_and_states_in_words() {
        assert_eq!(business_code_words("03"), "đã tiếp nhận / accepted");
        assert!(business_code_words("02").contains("refused"));
        assert!(business_code_words("16").contains("từ chối"));
        assert!(business_code_words("99").contains("unknown"));
        assert!(outbox_words("outbox").starts_with("not yet at the broker"));
        assert_eq!(outbox_words("evil\u{1b}[2J"), "evil\\u{001B}[2J");
    }
}
