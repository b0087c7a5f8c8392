//! `edxml check` and `edxml export`: edXML packages (QCVN 102:2016) for systems that
//! exchange documents as files; and the package half of `send --edxml`.
//!
//! `check` needs no agent: it applies every edXML rule and prints, as JSON, the header
//! the agent would sign (or the status message it would report), the steering type as
//! people read it (`steering_type_text`, e.g. `0 (not stated)`) and every field read but
//! not carried (`not_carried`: path and reason). An invalid package exits 1 with the
//! edXML path of the field and the rule it breaks.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use lienthong_edxml::{EdxmlDocument, EdxmlMessage, EdxmlStatus, FieldNote, Limits};
use serde_json::{Value, json};

use crate::error::CliError;
use crate::http::AgentClient;
use crate::output::outln;

#[derive(Debug, Subcommand)]
pub enum EdxmlCommand {
    /// Validate a package offline and print the header it would send, as JSON, with
    /// the fields it reads but would not carry (`not_carried`).
    Check(CheckArgs),
    /// Write a received document as an edXML package.
    Export(ExportArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The package, e.g. cong-van.edxml.
    file: PathBuf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// TOML configuration file with `api` and `api_token_file`; flags win.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The local agent's API, default http://127.0.0.1:7180.
    #[arg(long)]
    api: Option<String>,
    /// The agent's API token file (the agent writes it to <data>/api-token).
    #[arg(long, env = "LIENTHONG_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// The received document's message id (see `lienthong inbox`).
    message_id: String,
    /// Where to write the package.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

pub async fn run(command: EdxmlCommand) -> Result<(), CliError> {
    match command {
        EdxmlCommand::Check(args) => check(&args.file),
        EdxmlCommand::Export(args) => export(args).await,
    }
}

fn read_package(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

fn check(path: &Path) -> Result<(), CliError> {
    let package = read_package(path)?;
    let (message, notes) = lienthong_edxml::parse_message_noted(&package, &Limits::default())
        .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
    let mut value = match message {
        EdxmlMessage::Document(doc) => document_value(&doc),
        EdxmlMessage::Status(status) => status_value(&status),
    };
    if let Some(map) = value.as_object_mut() {
        map.insert("not_carried".into(), notes_value(&notes));
    }
    let text = serde_json::to_string_pretty(&value)
        .map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))?;
    outln!("{text}");
    Ok(())
}

/// The header the agent would sign for this package (its message id, time and
/// signature are the agent's), as JSON: the fields `document.json` shows.
fn document_value(doc: &EdxmlDocument) -> Value {
    let header = doc.to_header("", 0).header;
    let mut map = lienthong_agent::export::header_json(&header);
    map.insert("kind".into(), json!("document"));
    map.insert(
        "steering_type_text".into(),
        json!(lienthong_edxml::steering_type_text(doc.steering_type)),
    );
    Value::Object(map)
}

/// Each field read but not carried, as `{"path", "reason"}`.
fn notes_value(notes: &[FieldNote]) -> Value {
    Value::Array(
        notes
            .iter()
            .map(|n| json!({ "path": n.path, "reason": n.reason }))
            .collect(),
    )
}

/// The status report the agent would send for this status message, as JSON.
fn status_value(status: &EdxmlStatus) -> Value {
    let staff = status.staff.as_ref().map(|s| {
        json!({
            "department": s.department,
            "staff": s.staff,
            "mobile": s.mobile,
            "email": s.email,
        })
    });
    json!({
        "kind": "status",
        "from": status.from,
        "from_name": (!status.from_name.is_empty()).then(|| status.from_name.clone()),
        "response_for": {
            "organ_id": status.response_for.organ_id,
            "code": status.response_for.code,
            "promulgation_date": status.response_for.promulgation_date,
            "document_id": status.response_for.document_id,
        },
        "status_code": status.status_code,
        "description": status.description,
        "timestamp": status.timestamp,
        "staff": staff,
    })
}

async fn export(args: ExportArgs) -> Result<(), CliError> {
    let client =
        super::client::agent_client(args.api, args.api_token_file, args.config.as_deref())?;
    let package = client.inbox_edxml(&args.message_id).await?;
    let file_name = args
        .out
        .file_name()
        .ok_or_else(|| CliError::Usage(format!("--out {}: not a file name", args.out.display())))?;
    let mut partial_name = file_name.to_os_string();
    partial_name.push(".tmp");
    let partial = args.out.with_file_name(partial_name);
    let failed = |e: std::io::Error| CliError::Failed(format!("{}: {e}", args.out.display()));
    std::fs::write(&partial, &package).map_err(failed)?;
    if let Err(e) = std::fs::rename(&partial, &args.out) {
        let _ = std::fs::remove_file(&partial);
        return Err(failed(e));
    }
    Ok(())
}

/// `send --edxml FILE`: posts the package; prints the message id alone.
pub async fn send_package(client: &AgentClient, path: &Path) -> Result<(), CliError> {
    let package = read_package(path)?;
    let response = client.send_edxml(package).await.map_err(|e| match e {
        CliError::Failed(message) => CliError::Failed(format!("{}: {message}", path.display())),
        other => other,
    })?;
    outln!("{}", response.message_id);
    Ok(())
}
