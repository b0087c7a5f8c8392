//! `send`, `status` and `inbox`: a clerk's commands against the local agent's API.

use std::path::PathBuf;

use base64::Engine as _;
use clap::Args;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, StatusView};
use serde::Deserialize;

use crate::config;
use crate::error::CliError;
use crate::http::AgentClient;

const DEFAULT_API: &str = "http://127.0.0.1:7180";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    api: Option<String>,
}

fn api_url(flag: Option<String>, config: Option<&std::path::Path>) -> Result<String, CliError> {
    let file: ClientFile = config::load(config)?;
    Ok(flag.or(file.api).unwrap_or_else(|| DEFAULT_API.to_owned()))
}

#[derive(Debug, Args)]
pub struct SendArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// Recipient agency codes, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// Subject (trích yếu).
    #[arg(long)]
    subject: String,
    /// Document number (số); the agent numbers it when absent.
    #[arg(long)]
    number: Option<String>,
    /// Notation (ký hiệu), e.g. UBND-VP.
    #[arg(long)]
    notation: Option<String>,
    /// 0 normal, 1 urgent, 2 very urgent, 3 express, 4 express at a set time.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=4))]
    priority: Option<u32>,
    /// Files to attach.
    files: Vec<PathBuf>,
}

pub async fn send(args: SendArgs) -> Result<(), CliError> {
    let client = AgentClient::new(&api_url(args.api, args.config.as_deref())?)?;
    let mut attachments = Vec::with_capacity(args.files.len());
    for path in &args.files {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| CliError::Usage(format!("{}: not a file name", path.display())))?;
        let bytes =
            std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
        attachments.push(AttachmentUpload {
            name: name.to_owned(),
            media_type: None,
            content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
        });
    }
    let request = SendRequest {
        to: args.to,
        subject: args.subject,
        number: args.number,
        notation: args.notation,
        priority: args.priority,
        attachments,
        ..SendRequest::default()
    };
    let response = client.send(&request).await?;
    println!("{}", response.message_id);
    Ok(())
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    api: Option<String>,
    /// The message id `send` printed.
    message_id: String,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn status(args: StatusArgs) -> Result<(), CliError> {
    let client = AgentClient::new(&api_url(args.api, args.config.as_deref())?)?;
    let view = client.status(&args.message_id).await?;
    if args.json {
        let text = serde_json::to_string(&view)
            .map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))?;
        println!("{text}");
    } else {
        print_status(&view);
    }
    Ok(())
}

fn print_status(view: &StatusView) {
    println!("message id   {}", view.message_id);
    println!("business id  {}", view.business_id);
    println!("sender       {}", view.sender);
    println!("outbox       {}", view.outbox_state);
    if let Some(reason) = &view.failure_reason {
        println!("failure      {reason}");
    }
    if let Some(at) = &view.submitted_at {
        println!(
            "accepted     {at} (broker receipt {})",
            if view.submission_receipt_verified {
                "verified"
            } else {
                "NOT verified"
            }
        );
    }
    println!(
        "{:<15} {:<10} {:>8}  RECEIPT / REASON",
        "RECIPIENT", "STATE", "ATTEMPTS"
    );
    for r in &view.recipients {
        let detail = match (&r.receipt_verified, &r.delivered_at, &r.reason) {
            (Some(true), Some(at), _) => format!("delivered {at}, receipt verified"),
            (Some(false), _, _) => "receipt present but NOT verified".to_owned(),
            (_, _, Some(reason)) => reason.clone(),
            _ => String::new(),
        };
        println!(
            "{:<15} {:<10} {:>8}  {detail}",
            r.agency, r.state, r.attempts
        );
    }
}

#[derive(Debug, Args)]
pub struct InboxArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    api: Option<String>,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

pub async fn inbox(args: InboxArgs) -> Result<(), CliError> {
    let client = AgentClient::new(&api_url(args.api, args.config.as_deref())?)?;
    let items = client.inbox().await?;
    if args.json {
        let text = serde_json::to_string(&items)
            .map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))?;
        println!("{text}");
    } else {
        println!(
            "{:<36}  {:<13}  {:<25}  SUBJECT",
            "MESSAGE ID", "SENDER", "RECEIVED"
        );
        for item in &items {
            println!(
                "{:<36}  {:<13}  {:<25}  {}",
                item.message_id, item.sender, item.received_at, item.subject
            );
            println!("{:<36}  {}", "", item.path);
        }
    }
    Ok(())
}
