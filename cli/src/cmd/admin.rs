//! `lienthong admin`: operator commands against the broker's admin gRPC service, with
//! an operator certificate.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use lienthong_proto::pb::QueuesRequest;
use lienthong_proto::pb::admin_client::AdminClient;
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
    match args.command {
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
