//! `report`, `recall` and `directory`: a clerk's business workflow against the local
//! agent — statuses for received documents, recalling a sent one, and finding
//! recipients by name.

use std::path::PathBuf;

use clap::Args;
use lienthong_agent::api_types::ReportRequest;

use crate::cmd::client::agent_client;
use crate::error::CliError;
use crate::output::{escape, outln};

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// TOML configuration file with `api` and `api_token_file`; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// The agent's API token file (the agent writes it to <data>/api-token).
    #[arg(long, env = "LIENTHONG_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// The received document's message id.
    message_id: String,
    /// 02 refused, 03 accepted, 04 assigned, 05 in progress, 06 completed; 15 / 16 agree
    /// to or refuse a recall or update.
    #[arg(long, value_parser = ["02", "03", "04", "05", "06", "15", "16"])]
    status: String,
    /// Why (required for 02 and 16).
    #[arg(long)]
    reason: Option<String>,
    /// Who reports it (the clerk's name).
    #[arg(long)]
    staff: Option<String>,
}

/// Prints the status report's message id.
pub async fn report(args: ReportArgs) -> Result<(), CliError> {
    if (args.status == "02" || args.status == "16")
        && args.reason.as_deref().is_none_or(|r| r.trim().is_empty())
    {
        return Err(CliError::Usage(format!(
            "--reason is required for status {}",
            args.status
        )));
    }
    let client = agent_client(args.api, args.api_token_file, args.config.as_deref())?;
    let request = ReportRequest {
        status: args.status,
        reason: args.reason,
        staff: args.staff,
    };
    let sent = client.report(&args.message_id, &request).await?;
    outln!("{}", sent.message_id);
    Ok(())
}

#[derive(Debug, Args)]
pub struct RecallArgs {
    /// TOML configuration file with `api` and `api_token_file`; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// The agent's API token file (the agent writes it to <data>/api-token).
    #[arg(long, env = "LIENTHONG_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// The message id of a document this agency sent.
    message_id: String,
    /// Why it is recalled.
    #[arg(long)]
    reason: String,
}

/// Prints the recall's message id.
pub async fn recall(args: RecallArgs) -> Result<(), CliError> {
    if args.reason.trim().is_empty() {
        return Err(CliError::Usage("--reason must not be empty".into()));
    }
    let client = agent_client(args.api, args.api_token_file, args.config.as_deref())?;
    let sent = client.recall(&args.message_id, &args.reason).await?;
    outln!("{}", sent.message_id);
    Ok(())
}

#[derive(Debug, Args)]
pub struct DirectoryArgs {
    /// TOML configuration file with `api` and `api_token_file`; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// The agent's API token file (the agent writes it to <data>/api-token).
    #[arg(long, env = "LIENTHONG_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Only agencies whose name or code contains this (case-insensitive).
    search: Option<String>,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

pub async fn directory(args: DirectoryArgs) -> Result<(), CliError> {
    let client = agent_client(args.api, args.api_token_file, args.config.as_deref())?;
    let mut agencies = client.directory().await?;
    if let Some(search) = &args.search {
        let needle = search.to_lowercase();
        agencies.retain(|a| {
            a.name.to_lowercase().contains(&needle) || a.code.to_lowercase().contains(&needle)
        });
    }
    if args.json {
        let text = serde_json::to_string(&agencies)
            .map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))?;
        outln!("{text}");
        return Ok(());
    }
    outln!("{:<15} {:<15} NAME", "CODE", "PARENT");
    for a in &agencies {
        outln!(
            "{:<15} {:<15} {}{}",
            escape(&a.code),
            escape(&a.parent),
            escape(&a.name),
            if a.suspended { " (suspended)" } else { "" }
        );
    }
    Ok(())
}
