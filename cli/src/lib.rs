//! lienthong-cli: the `lienthong` command. Thin: it parses arguments and configuration,
//! sets up tracing, and calls the libraries.
//!
//! Layout: `cmd::<subcommand>` per subcommand, [`config`] for `--config` files,
//! `http` for the agent's local API client, [`error`] for exit codes, [`output`] for
//! printing (escaped untrusted text, a closed stdout or stderr), [`private`] for the
//! umask and key-file checks.
#![forbid(unsafe_code)]

mod cmd;
pub mod config;
pub mod docs;
pub mod error;
pub mod http;
pub mod logging;
pub mod output;
pub mod private;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

/// lienthong — exchange of digitally signed official documents between agencies.
#[derive(Debug, Parser)]
#[command(name = "lienthong", version, about, propagate_version = true)]
pub struct Cli {
    /// How diagnostics are written to stderr: `text` (one readable line per event,
    /// coloured only on a terminal) or `json` (one JSON object per line, for log
    /// shippers). Broker and agent also take `log_format` in their --config file; the
    /// flag wins. Default: text.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<logging::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole exchange on this machine: dev PKI, a broker and three agents.
    Demo(cmd::demo::DemoArgs),
    /// Public-key infrastructure helpers.
    #[command(subcommand)]
    Pki(cmd::pki::PkiCommand),
    /// Run the central broker.
    Broker(cmd::broker::BrokerArgs),
    /// Run an agency's agent.
    Agent(cmd::agent::AgentArgs),
    /// Send a document through the local agent; prints the message id.
    Send(cmd::client::SendArgs),
    /// Show a sent document's per-recipient state and receipts.
    Status(cmd::client::StatusArgs),
    /// List the documents this agency received.
    Inbox(cmd::client::InboxArgs),
    /// Report a business status (02–06, 15, 16) for a received document to its sender.
    Report(cmd::business::ReportArgs),
    /// Recall a document this agency sent (status 13); recipients answer 15 or 16.
    Recall(cmd::business::RecallArgs),
    /// The agencies registered at the broker, to pick recipients by name.
    Directory(cmd::business::DirectoryArgs),
    /// edXML packages (QCVN 102:2016): check one offline, export a received document.
    #[command(subcommand)]
    Edxml(cmd::edxml::EdxmlCommand),
    /// Check an exported document offline: signature, certificate chain, attachments.
    Verify(cmd::verify::VerifyArgs),
    /// Operator commands against the broker's admin service.
    Admin(cmd::admin::AdminArgs),
    /// Measure this machine: throughput, latency, large documents, idle connections and
    /// restart time against a real broker and agents in child processes.
    Bench(cmd::bench::BenchArgs),
    /// Generated documentation (for maintainers).
    #[command(subcommand, hide = true)]
    Docs(DocsCommand),
}

#[derive(Debug, Subcommand)]
enum DocsCommand {
    /// Print docs/configuration.md: every flag and config key, its default and help.
    Configuration,
}

/// docs/configuration.md as this build would write it.
pub fn configuration_markdown() -> String {
    docs::configuration_markdown(&<Cli as clap::CommandFactory>::command())
}

/// Parses the command line, runs the command, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    // Before anything can create a file: sled, spool files, exports, the dev PKI.
    private::restrict_umask();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // clap prints help and version to stdout with exit 0, usage errors with 2.
            let _ = error.print();
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
    };
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            output::errln!("lienthong: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            output::errln!("lienthong: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn run(command: Command) -> Result<(), CliError> {
    lienthong_proto::tls::install_crypto_provider();
    match command {
        Command::Demo(args) => cmd::demo::run(args).await,
        Command::Pki(command) => cmd::pki::run(command),
        Command::Broker(args) => cmd::broker::run(args).await,
        Command::Agent(args) => cmd::agent::run(args).await,
        Command::Send(args) => cmd::client::send(args).await,
        Command::Status(args) => cmd::client::status(args).await,
        Command::Inbox(args) => cmd::client::inbox(args).await,
        Command::Report(args) => cmd::business::report(args).await,
        Command::Recall(args) => cmd::business::recall(args).await,
        Command::Directory(args) => cmd::business::directory(args).await,
        Command::Edxml(command) => cmd::edxml::run(command).await,
        Command::Verify(args) => cmd::verify::run(args),
        Command::Admin(args) => cmd::admin::run(args).await,
        Command::Bench(args) => cmd::bench::run(args).await,
        Command::Docs(DocsCommand::Configuration) => {
            output::outln!("{}", configuration_markdown().trim_end());
            Ok(())
        }
    }
}

/// Servers log at info by default, the demo and client commands only warnings;
/// `RUST_LOG` overrides. The format: the flag, else the server's config file, else text.
fn init_tracing(cli: &Cli) {
    let (default, config) = match &cli.command {
        Command::Broker(args) => ("info", args.config_path()),
        Command::Agent(args) => ("info", args.config_path()),
        // The demo prints its own steps; its servers' logs would bury them.
        _ => ("warn", None),
    };
    let format = cli
        .log_format
        .or_else(|| config.and_then(logging::format_from_config))
        .unwrap_or_default();
    logging::init(format, default);
}

/// A wake-up per SIGHUP (a configuration reload), from now on: the handler is installed
/// before this returns, so a SIGHUP can no longer end the process.
pub(crate) fn reload_signal() -> Result<std::sync::Arc<tokio::sync::Notify>, CliError> {
    let requests = std::sync::Arc::new(tokio::sync::Notify::new());
    #[cfg(unix)]
    {
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| CliError::Failed(format!("cannot handle SIGHUP: {e}")))?;
        let notify = requests.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                notify.notify_one();
            }
        });
    }
    Ok(requests)
}

/// Waits for SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
