//! `lienthong admin`: operator commands against the broker's admin gRPC service, with
//! an operator certificate.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use lienthong_proto::pb::admin_client::AdminClient;
use lienthong_proto::pb::{
    DeadLetter, DeadLettersRequest, DeliveryState, HealthRequest, QueuesRequest, RedriveRequest,
};
use lienthong_proto::tls::TlsFiles;
use serde::Deserialize;

use crate::config::{self, relative_to, required};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// TOML configuration file; keys are the long flag names.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The broker, e.g. https://localhost:7443.
    #[arg(long, global = true)]
    broker: Option<String>,
    /// CA bundle (PEM) that issued the broker's certificate.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Operator certificate (PEM).
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Operator private key (PKCS#8 PEM).
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Per-agency connection state, queue depth and oldest pending age.
    Queues,
    /// Deliveries that ended without a receipt (expired or refused).
    DeadLetters {
        /// Only this recipient agency.
        #[arg(long)]
        agency: Option<String>,
    },
    /// Whether the broker is ready to accept documents (store writable, disk space).
    Health,
    /// Queue dead letters again (same message id: recipients deduplicate).
    Redrive {
        /// The message to redrive.
        message_id: Option<String>,
        /// Only this recipient; alone, every dead letter of this agency.
        #[arg(long)]
        agency: Option<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    broker: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

pub async fn run(args: AdminArgs) -> Result<(), CliError> {
    let cfg = args.config.as_deref();
    let file: AdminFile = config::load(cfg)?;
    let path = |flag: Option<PathBuf>, from_file: Option<PathBuf>, name: &str| {
        required(flag, from_file.map(|p| relative_to(cfg, p)), name)
    };
    let broker = required(args.broker, file.broker, "broker")?;
    let tls = TlsFiles::load(
        &path(args.ca, file.ca, "ca")?,
        &path(args.cert, file.cert, "cert")?,
        &path(args.key, file.key, "key")?,
    )?;
    let channel = connect(&broker, &tls).await?;
    let mut client = AdminClient::new(channel);
    let refused = |s: tonic::Status| {
        CliError::Failed(format!("broker refused: {} ({:?})", s.message(), s.code()))
    };
    match args.command {
        AdminCommand::Health => {
            let health = client
                .health(HealthRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "ready": health.ready,
                        "reason": health.reason,
                        "store_writable": health.store_writable,
                        "free_bytes": health.free_bytes,
                        "min_free_bytes": health.min_free_bytes,
                        "documents": health.documents,
                    })
                );
            } else if health.ready {
                println!(
                    "ready ({} documents stored, {} bytes free)",
                    health.documents, health.free_bytes
                );
            } else {
                println!("NOT READY: {}", health.reason);
            }
            if !health.ready {
                return Err(CliError::Failed("the broker is not ready".into()));
            }
        }
        AdminCommand::DeadLetters { agency } => {
            let list = client
                .dead_letters(DeadLettersRequest {
                    agency: agency.unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .dead_letters;
            print_dead_letters(&list, args.json);
        }
        AdminCommand::Redrive { message_id, agency } => {
            if message_id.is_none() && agency.is_none() {
                return Err(CliError::Usage(
                    "give a MESSAGE_ID, --agency CODE, or both".into(),
                ));
            }
            let list = client
                .redrive(RedriveRequest {
                    message_id: message_id.unwrap_or_default(),
                    agency: agency.unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .redriven;
            print_dead_letters(&list, args.json);
        }
        AdminCommand::Queues => {
            let queues = client
                .queues(QueuesRequest {})
                .await
                .map_err(|s| {
                    CliError::Failed(format!("broker refused: {} ({:?})", s.message(), s.code()))
                })?
                .into_inner()
                .queues;
            if args.json {
                let rows: Vec<serde_json::Value> = queues
                    .iter()
                    .map(|q| {
                        serde_json::json!({
                            "agency": q.agency,
                            "connected": q.connected,
                            "pending": q.pending,
                            "pending_bytes": q.pending_bytes,
                            "oldest_pending_seconds": q.oldest_pending_seconds,
                            "in_flight": q.in_flight,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<15} {:<10} {:>8} {:>12} {:>10} {:>9}",
                    "AGENCY", "CONNECTED", "PENDING", "BYTES", "OLDEST(s)", "IN-FLIGHT"
                );
                for q in &queues {
                    println!(
                        "{:<15} {:<10} {:>8} {:>12} {:>10} {:>9}",
                        q.agency,
                        if q.connected { "yes" } else { "no" },
                        q.pending,
                        q.pending_bytes,
                        q.oldest_pending_seconds,
                        q.in_flight
                    );
                }
            }
        }
    }
    Ok(())
}

fn state_name(state: i32) -> &'static str {
    match DeliveryState::try_from(state) {
        Ok(DeliveryState::Queued) => "queued",
        Ok(DeliveryState::Delivered) => "delivered",
        Ok(DeliveryState::Refused) => "refused",
        Ok(DeliveryState::Expired) => "expired",
        _ => "unknown",
    }
}

fn print_dead_letters(list: &[DeadLetter], json: bool) {
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|d| {
                serde_json::json!({
                    "message_id": d.message_id,
                    "agency": d.agency,
                    "state": state_name(d.state),
                    "reason": d.reason,
                    "at": lienthong_proto::rfc3339_ms(d.at_ms),
                    "sender": d.sender,
                    "business_id": d.business_id,
                    "attempts": d.attempts,
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    println!(
        "{:<36}  {:<13}  {:<8}  {:>8}  REASON",
        "MESSAGE ID", "RECIPIENT", "STATE", "ATTEMPTS"
    );
    for d in list {
        println!(
            "{:<36}  {:<13}  {:<8}  {:>8}  {}",
            d.message_id,
            d.agency,
            state_name(d.state),
            d.attempts,
            d.reason
        );
    }
}

/// A mutual-TLS channel to the broker.
pub async fn connect(broker: &str, tls: &TlsFiles) -> Result<tonic::transport::Channel, CliError> {
    let endpoint = tonic::transport::Endpoint::from_shared(broker.to_owned())
        .map_err(|e| CliError::Usage(format!("--broker {broker}: {e}")))?;
    let host = endpoint
        .uri()
        .host()
        .unwrap_or("localhost")
        .trim_matches(['[', ']'])
        .to_owned();
    endpoint
        .tls_config(tls.client_config(&host))
        .map_err(|e| CliError::Usage(format!("TLS configuration: {e}")))?
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| CliError::Failed(format!("cannot reach the broker at {broker}: {e}")))
}
