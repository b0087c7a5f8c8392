//! `lienthong admin`: operator commands against the broker's admin gRPC service, with
//! an operator certificate.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use lienthong_proto::pb::admin_client::AdminClient;
use lienthong_proto::pb::{
    AgenciesRequest, AgencyInfo, AuditTailRequest, AuditVerifyRequest, BindCertificateRequest,
    BindingInfo, BindingsRequest, BlockInfo, BlockListRequest, BlockRequest, DeadLetter,
    DeadLettersRequest, DeliveryState, HealthRequest, MessageRequest, MessageResponse,
    PurgeRequest, QueuesRequest, RedriveRequest, RegisterAgencyRequest, ReloadCrlsRequest,
    ResumeAgencyRequest, Signed, SuspendAgencyRequest, UnbindCertificateRequest, UnblockRequest,
};
use lienthong_proto::tls::TlsFiles;
use serde::Deserialize;

use crate::config::{self, relative_to, required};
use crate::error::CliError;
use crate::output::{escape, outln};

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
    Queues {
        /// Refresh in place every 2 seconds until Ctrl-C.
        #[arg(long)]
        watch: bool,
    },
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
    /// One document by message id or business document id: header, per-recipient
    /// timeline and the evidence (sender's signature, broker and delivery receipts).
    Message {
        /// A message id or a business document id.
        id: String,
    },
    /// Registered agencies as a tree, and their registration and suspension.
    Agencies {
        #[command(subcommand)]
        action: Option<AgenciesAction>,
    },
    /// Dead-letter every document from one sender still queued for one recipient (each
    /// gets the broker's signed notice; redrive can queue them again). Prints the count.
    Purge {
        /// The sender agency code.
        #[arg(long)]
        from: String,
        /// The recipient agency code.
        #[arg(long)]
        to: String,
        /// Why, shown to the sender in the notice.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Block a certificate at once by its SPKI SHA-256 (64 hex digits) or the
    /// certificate file: its calls are refused, the open session and submissions of its
    /// agency are ended. Audited.
    Block {
        /// The SPKI SHA-256 (64 hex digits) or the certificate file (PEM or DER).
        target: String,
        /// Why (recorded in the audit log and shown to the refused caller).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Lift a block (SPKI SHA-256 or certificate file). Audited.
    Unblock {
        /// The SPKI SHA-256 (64 hex digits) or the certificate file (PEM or DER).
        target: String,
    },
    /// The blocked certificates.
    Blocked,
    /// Certificate revocation lists: `reload` re-reads the broker's CRL files now and
    /// shows the CRLs in force (exit 1 when the files cannot be read).
    Crls {
        #[command(subcommand)]
        action: CrlsAction,
    },
    /// The hash-chained audit log: its latest entries (default) or a check of the chain.
    Audit {
        #[command(subcommand)]
        action: Option<AuditAction>,
    },
}

#[derive(Debug, Subcommand)]
enum CrlsAction {
    /// Re-read the CRL files now.
    Reload,
}

#[derive(Debug, Subcommand)]
enum AuditAction {
    /// The latest entries, oldest first.
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        n: u32,
    },
    /// Walk the whole chain and report the first break (exit 1 when broken).
    Verify,
}

#[derive(Debug, Subcommand)]
enum AgenciesAction {
    /// The registered agencies, children indented under their parents (the default).
    List,
    /// Register an agency so that documents may be addressed to it.
    Register {
        /// The agency's code, e.g. 000.00.12.H31.
        code: String,
        /// The agency's name.
        #[arg(long)]
        name: String,
    },
    /// Suspend an agency: it can neither send nor receive; its session is ended,
    /// documents to it are refused, deliveries already queued for it wait.
    Suspend {
        /// The agency's code, e.g. 000.00.12.H31.
        code: String,
        /// Why (shown to the agency and to senders addressing it).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Resume a suspended agency; its queued deliveries go out again.
    Resume {
        /// The agency's code, e.g. 000.00.12.H31.
        code: String,
    },
    /// Bind a certificate to an agency by its SPKI SHA-256: from now on that
    /// certificate (TLS or seal) is the agency, with or without a lienthong SAN URI.
    Bind {
        /// The agency's code, e.g. 000.00.12.H31.
        code: String,
        /// The certificate (PEM or DER); its first certificate is bound. (Not named
        /// `cert`: that is the global flag with the operator's own certificate.)
        #[arg(value_name = "CERT.pem")]
        certificate: PathBuf,
    },
    /// Remove a binding: the SPKI SHA-256 (64 hex digits) or the certificate file.
    /// The agency's open session is ended. (A certificate with a lienthong SAN URI is
    /// bound again on its next use: block it to keep it out.)
    Unbind {
        /// The SPKI SHA-256 (64 hex digits) or the certificate file (PEM or DER).
        target: String,
    },
    /// The certificate bindings, of one agency or all.
    Bindings {
        /// Only this agency's bindings (all agencies' when left out).
        code: Option<String>,
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

/// The keys the `--config` file takes (for `lienthong docs configuration`).
pub(crate) fn config_keys() -> &'static [&'static str] {
    crate::config::keys::<AdminFile>()
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
                outln!(
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
                outln!(
                    "ready ({} documents stored, {} bytes free)",
                    health.documents,
                    health.free_bytes
                );
            } else {
                outln!("NOT READY: {}", escape(&health.reason));
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
        AdminCommand::Message { id } => {
            let message = client
                .message(MessageRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            print_message(&message, args.json);
        }
        AdminCommand::Agencies {
            action:
                Some(
                    action @ (AgenciesAction::Bind { .. }
                    | AgenciesAction::Unbind { .. }
                    | AgenciesAction::Bindings { .. }),
                ),
        } => {
            let list = match action {
                AgenciesAction::Bind { code, certificate } => vec![
                    client
                        .bind_certificate(BindCertificateRequest {
                            code,
                            cert_der: read_cert_der(&certificate)?,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner(),
                ],
                AgenciesAction::Unbind { target } => vec![
                    client
                        .unbind_certificate(UnbindCertificateRequest {
                            spki_sha256: spki_target(&target)?,
                        })
                        .await
                        .map_err(refused)?
                        .into_inner(),
                ],
                AgenciesAction::Bindings { code } => {
                    client
                        .bindings(BindingsRequest {
                            code: code.unwrap_or_default(),
                        })
                        .await
                        .map_err(refused)?
                        .into_inner()
                        .bindings
                }
                _ => Vec::new(),
            };
            print_bindings(&list, args.json);
        }
        AdminCommand::Block { target, reason } => {
            let info = client
                .block(BlockRequest {
                    spki_sha256: spki_target(&target)?,
                    reason: reason.unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            print_blocks(&[info], args.json);
        }
        AdminCommand::Unblock { target } => {
            let info = client
                .unblock(UnblockRequest {
                    spki_sha256: spki_target(&target)?,
                })
                .await
                .map_err(refused)?
                .into_inner();
            print_blocks(&[info], args.json);
        }
        AdminCommand::Crls {
            action: CrlsAction::Reload,
        } => {
            let crls = client
                .reload_crls(ReloadCrlsRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .crls;
            if args.json {
                let rows: Vec<serde_json::Value> = crls
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "issuer": c.issuer,
                            "this_update": time(c.this_update_ms),
                            "next_update": time(c.next_update_ms),
                            "revoked": c.revoked,
                            "stale": c.stale,
                        })
                    })
                    .collect();
                outln!("{}", serde_json::Value::Array(rows));
            } else {
                for c in &crls {
                    outln!(
                        "{}  next update {}  {} revoked{}",
                        escape(&c.issuer),
                        time(c.next_update_ms),
                        c.revoked,
                        if c.stale { "  STALE" } else { "" }
                    );
                }
            }
        }
        AdminCommand::Blocked => {
            let list = client
                .block_list(BlockListRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .blocked;
            print_blocks(&list, args.json);
        }
        AdminCommand::Agencies { action } => {
            let one = |info: AgencyInfo| vec![info];
            let list = match action.unwrap_or(AgenciesAction::List) {
                AgenciesAction::List => {
                    let list = client
                        .agencies(AgenciesRequest {})
                        .await
                        .map_err(refused)?
                        .into_inner()
                        .agencies;
                    if !args.json {
                        print_agency_tree(&list);
                        return Ok(());
                    }
                    list
                }
                AgenciesAction::Register { code, name } => one(client
                    .register_agency(RegisterAgencyRequest { code, name })
                    .await
                    .map_err(refused)?
                    .into_inner()),
                AgenciesAction::Suspend { code, reason } => one(client
                    .suspend_agency(SuspendAgencyRequest {
                        code,
                        reason: reason.unwrap_or_default(),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner()),
                AgenciesAction::Resume { code } => one(client
                    .resume_agency(ResumeAgencyRequest { code })
                    .await
                    .map_err(refused)?
                    .into_inner()),
                // Answered above.
                AgenciesAction::Bind { .. }
                | AgenciesAction::Unbind { .. }
                | AgenciesAction::Bindings { .. } => Vec::new(),
            };
            if args.json {
                let rows: Vec<serde_json::Value> = list.iter().map(agency_json).collect();
                outln!("{}", serde_json::Value::Array(rows));
            } else {
                for a in &list {
                    outln!("{}", agency_line(a));
                }
            }
        }
        AdminCommand::Purge { from, to, reason } => {
            let purged = client
                .purge(PurgeRequest {
                    from,
                    to,
                    reason: reason.unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "purged": purged.purged,
                        "message_ids": purged.message_ids,
                    })
                );
            } else {
                println!("{}", purged.purged);
            }
        }
        AdminCommand::Audit { action } => match action.unwrap_or(AuditAction::Tail { n: 20 }) {
            AuditAction::Tail { n } => {
                let entries = client
                    .audit_tail(AuditTailRequest { n: n.max(1) })
                    .await
                    .map_err(refused)?
                    .into_inner()
                    .entries;
                if args.json {
                    let rows: Vec<serde_json::Value> = entries
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "seq": e.seq,
                                "at": lienthong_proto::rfc3339_ms(e.at_ms),
                                "kind": e.kind,
                                "message_id": e.message_id,
                                "agency": e.agency,
                                "header_sha256": hex::encode(&e.header_sha256),
                                "prev_hash": hex::encode(&e.prev_hash),
                                "hash": hex::encode(&e.hash),
                                "detail": e.detail,
                            })
                        })
                        .collect();
                    outln!("{}", serde_json::Value::Array(rows));
                } else {
                    for e in &entries {
                        let hash = hex::encode(&e.hash);
                        outln!(
                            "{:>6}  {:<29} {:<17} {:<13} {:<36} {}  {}",
                            e.seq,
                            time(e.at_ms),
                            escape(&e.kind),
                            escape(&e.agency),
                            escape(&e.message_id),
                            hash.get(..16).unwrap_or(&hash),
                            escape(&e.detail)
                        );
                    }
                }
            }
            AuditAction::Verify => {
                let v = client
                    .audit_verify(AuditVerifyRequest {})
                    .await
                    .map_err(refused)?
                    .into_inner();
                if args.json {
                    outln!(
                        "{}",
                        serde_json::json!({
                            "intact": v.intact,
                            "entries": v.entries,
                            "first_break_seq": if v.intact { None } else { Some(v.first_break_seq) },
                            "detail": v.detail,
                            "head_hash": hex::encode(&v.head_hash),
                        })
                    );
                } else if v.intact {
                    outln!(
                        "audit chain intact: {} entries, head {}",
                        v.entries,
                        hex::encode(&v.head_hash)
                    );
                } else {
                    outln!(
                        "AUDIT CHAIN BROKEN at entry {}: {} ({} entries intact before it)",
                        v.first_break_seq,
                        escape(&v.detail),
                        v.entries
                    );
                }
                if !v.intact {
                    return Err(CliError::Failed("the audit chain is broken".into()));
                }
            }
        },
        AdminCommand::Queues { watch } => loop {
            let queues = client
                .queues(QueuesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .queues;
            if watch {
                // Clear the screen and home the cursor: the table refreshes in place.
                crate::output::write_stdout(format_args!("\x1b[2J\x1b[H"));
                outln!(
                    "lienthong queues at {} (Ctrl-C to stop)",
                    lienthong_proto::rfc3339_ms(lienthong_proto::now_ms()).unwrap_or_default()
                );
            }
            print_queues(&queues, args.json);
            if !watch {
                break;
            }
            tokio::select! {
                _ = crate::shutdown_signal() => break,
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
            }
        },
    }
    Ok(())
}

fn print_queues(queues: &[lienthong_proto::pb::QueueInfo], json: bool) {
    if json {
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
                    "delivered_last_hour": q.delivered_last_hour,
                    "delivered_last_day": q.delivered_last_day,
                    "dead_lettered_last_hour": q.dead_lettered_last_hour,
                    "dead_lettered_last_day": q.dead_lettered_last_day,
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(rows));
    } else {
        outln!(
            "{:<15} {:<10} {:>8} {:>12} {:>10} {:>9} {:>13} {:>13}",
            "AGENCY",
            "CONNECTED",
            "PENDING",
            "BYTES",
            "OLDEST(s)",
            "IN-FLIGHT",
            "DELIV 1h/24h",
            "DEAD 1h/24h"
        );
        for q in queues {
            outln!(
                "{:<15} {:<10} {:>8} {:>12} {:>10} {:>9} {:>13} {:>13}",
                escape(&q.agency),
                if q.connected { "yes" } else { "no" },
                q.pending,
                q.pending_bytes,
                q.oldest_pending_seconds,
                q.in_flight,
                format!("{}/{}", q.delivered_last_hour, q.delivered_last_day),
                format!("{}/{}", q.dead_lettered_last_hour, q.dead_lettered_last_day)
            );
        }
        outln!("(delivered and dead-lettered counts since the broker started)");
    }
}

fn state_name(state: i32) -> &'static str {
    match DeliveryState::try_from(state) {
        Ok(DeliveryState::Queued) => "queued",
        Ok(DeliveryState::Delivered) => "delivered",
        Ok(DeliveryState::Refused) => "refused",
        Ok(DeliveryState::Expired) => "expired",
        Ok(DeliveryState::Recalled) => "recalled",
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
        outln!("{}", serde_json::Value::Array(rows));
        return;
    }
    outln!(
        "{:<36}  {:<13}  {:<8}  {:>8}  REASON",
        "MESSAGE ID",
        "RECIPIENT",
        "STATE",
        "ATTEMPTS"
    );
    for d in list {
        outln!(
            "{:<36}  {:<13}  {:<8}  {:>8}  {}",
            escape(&d.message_id),
            escape(&d.agency),
            state_name(d.state),
            d.attempts,
            escape(&d.reason)
        );
    }
}

fn time(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    lienthong_proto::rfc3339_ms(ms).unwrap_or_else(|| ms.to_string())
}

fn signed_json(signed: Option<&Signed>) -> serde_json::Value {
    use base64::Engine as _;
    use prost::Message as _;
    match signed {
        Some(s) => serde_json::Value::String(
            base64::engine::general_purpose::STANDARD.encode(s.encode_to_vec()),
        ),
        None => serde_json::Value::Null,
    }
}

fn print_message(m: &MessageResponse, json: bool) {
    if json {
        let timelines: Vec<serde_json::Value> = m
            .timelines
            .iter()
            .map(|t| {
                serde_json::json!({
                    "agency": t.agency,
                    "state": state_name(t.state),
                    "attempts": t.attempts,
                    "reason": t.reason,
                    "events": t.events.iter().map(|e| serde_json::json!({
                        "at": lienthong_proto::rfc3339_ms(e.at_ms),
                        "at_ms": e.at_ms,
                        "event": e.event,
                        "detail": e.detail,
                    })).collect::<Vec<_>>(),
                    "delivery_receipt": signed_json(t.delivery_receipt.as_ref()),
                    "notice": signed_json(t.notice.as_ref()),
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({
                "message_id": m.message_id,
                "business_id": m.business_id,
                "sender": m.sender,
                "recipients": m.recipients,
                "subject": m.subject,
                "number": m.number,
                "notation": m.notation,
                "priority": m.priority,
                "created_at": lienthong_proto::rfc3339_ms(m.created_at_ms),
                "accepted_at": lienthong_proto::rfc3339_ms(m.accepted_at_ms),
                "expires_at": lienthong_proto::rfc3339_ms(m.expires_at_ms),
                "envelope": signed_json(m.envelope.as_ref()),
                "submission_receipt": signed_json(m.submission_receipt.as_ref()),
                "timelines": timelines,
            })
        );
        return;
    }
    let present = |s: Option<&Signed>| if s.is_some() { "present" } else { "missing" };
    outln!("message     {}", escape(&m.message_id));
    outln!("business id {}", escape(&m.business_id));
    outln!("sender      {}", escape(&m.sender));
    outln!("recipients  {}", escape(&m.recipients.join(", ")));
    outln!("subject     {}", escape(&m.subject));
    outln!("number      {}/{}", escape(&m.number), escape(&m.notation));
    outln!("priority    {}", m.priority);
    outln!("created     {}", time(m.created_at_ms));
    outln!("accepted    {}", time(m.accepted_at_ms));
    outln!("expires     {}", time(m.expires_at_ms));
    outln!(
        "evidence    sender's signed envelope: {}; broker's submission receipt: {}",
        present(m.envelope.as_ref()),
        present(m.submission_receipt.as_ref())
    );
    for t in &m.timelines {
        outln!();
        outln!(
            "{}  {} ({} attempts)",
            escape(&t.agency),
            state_name(t.state),
            t.attempts
        );
        for e in &t.events {
            if e.detail.is_empty() {
                outln!("  {:<29} {}", time(e.at_ms), escape(&e.event));
            } else {
                outln!(
                    "  {:<29} {:<12} {}",
                    time(e.at_ms),
                    escape(&e.event),
                    escape(&e.detail)
                );
            }
        }
        if t.delivery_receipt.is_some() {
            outln!("  evidence: the recipient's signed delivery receipt");
        }
        if t.notice.is_some() {
            outln!("  evidence: the broker's signed dead-letter notice");
        }
    }
}

/// The first certificate of a PEM or DER file, DER.
fn read_cert_der(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    let bytes =
        std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Ok(bytes);
    }
    lienthong_proto::signing::certs_from_pem(&bytes, "certificate")
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .map(|der| der.to_vec())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{}: expected a PEM CERTIFICATE block",
                path.display()
            ))
        })
}

/// An SPKI SHA-256 given as 64 hex digits, or the certificate file whose SPKI it is.
fn spki_target(target: &str) -> Result<Vec<u8>, CliError> {
    if target.len() == 64 && target.bytes().all(|b| b.is_ascii_hexdigit()) {
        return hex::decode(target).map_err(|e| CliError::Usage(e.to_string()));
    }
    let path = std::path::Path::new(target);
    if !path.exists() {
        return Err(CliError::Usage(format!(
            "`{}` is neither an SPKI SHA-256 (64 hex digits) nor a certificate file",
            lienthong_proto::agency::printable(target)
        )));
    }
    let der = read_cert_der(path)?;
    lienthong_proto::agency::spki_sha256(&der)
        .map(|hash| hash.to_vec())
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

fn print_bindings(list: &[BindingInfo], json: bool) {
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|b| {
                serde_json::json!({
                    "spki_sha256": hex::encode(&b.spki_sha256),
                    "agency": b.code,
                    "subject": b.subject,
                    "bound_at": time(b.bound_at_ms),
                    "bound_by": b.bound_by,
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(rows));
        return;
    }
    for b in list {
        outln!(
            "{}  {}  {}  (bound {} by {})",
            hex::encode(&b.spki_sha256),
            b.code,
            escape(&b.subject),
            time(b.bound_at_ms),
            escape(&b.bound_by)
        );
    }
}

fn print_blocks(list: &[BlockInfo], json: bool) {
    if json {
        let rows: Vec<serde_json::Value> = list
            .iter()
            .map(|b| {
                serde_json::json!({
                    "spki_sha256": hex::encode(&b.spki_sha256),
                    "blocked": b.blocked,
                    "agency": b.code,
                    "reason": b.reason,
                    "blocked_at": time(b.blocked_at_ms),
                    "blocked_by": b.blocked_by,
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(rows));
        return;
    }
    for b in list {
        outln!(
            "{}  {}  {}  {}  ({} {})",
            hex::encode(&b.spki_sha256),
            if b.blocked { "blocked" } else { "unblocked" },
            if b.code.is_empty() {
                "-"
            } else {
                b.code.as_str()
            },
            escape(&b.reason),
            escape(&b.blocked_by),
            time(b.blocked_at_ms)
        );
    }
}

fn agency_json(a: &AgencyInfo) -> serde_json::Value {
    serde_json::json!({
        "code": a.code,
        "name": a.name,
        "parent": if a.parent.is_empty() { None } else { Some(&a.parent) },
        "status": if a.suspended { "suspended" } else { "active" },
        "suspended_reason": if a.suspended { Some(&a.suspended_reason) } else { None },
        "suspended_at": lienthong_proto::rfc3339_ms(a.suspended_at_ms).filter(|_| a.suspended),
        "registered_at": lienthong_proto::rfc3339_ms(a.registered_at_ms),
        "auto_registered": a.auto_registered,
    })
}

fn agency_line(a: &AgencyInfo) -> String {
    let mut line = escape(&a.code).into_owned();
    if !a.name.is_empty() {
        line.push_str(&format!("  {}", escape(&a.name)));
    }
    if a.suspended {
        line.push_str(&format!(
            "  [SUSPENDED since {}: {}]",
            time(a.suspended_at_ms),
            escape(&a.suspended_reason)
        ));
    } else {
        line.push_str("  [active]");
    }
    line.push_str(&format!("  registered {}", time(a.registered_at_ms)));
    if a.auto_registered {
        line.push_str(" (automatically)");
    }
    line
}

/// Prints the agencies as a tree: each under its nearest registered ancestor.
fn print_agency_tree(list: &[AgencyInfo]) {
    use std::collections::BTreeMap;
    let by_code: BTreeMap<&str, &AgencyInfo> = list.iter().map(|a| (a.code.as_str(), a)).collect();
    let nearest_parent = |a: &AgencyInfo| -> Option<String> {
        let mut code = lienthong_proto::AgencyCode::parse(&a.code).ok()?;
        while let Some(parent) = code.parent() {
            if by_code.contains_key(parent.as_str()) {
                return Some(parent.to_string());
            }
            code = parent;
        }
        None
    };
    let mut children: BTreeMap<Option<String>, Vec<&AgencyInfo>> = BTreeMap::new();
    for a in by_code.values() {
        children.entry(nearest_parent(a)).or_default().push(a);
    }
    fn walk(
        children: &BTreeMap<Option<String>, Vec<&AgencyInfo>>,
        parent: Option<String>,
        depth: usize,
    ) {
        for a in children.get(&parent).map(Vec::as_slice).unwrap_or_default() {
            outln!("{}{}", "  ".repeat(depth), agency_line(a));
            walk(children, Some(a.code.clone()), depth + 1);
        }
    }
    if list.is_empty() {
        outln!("no agencies registered");
    }
    walk(&children, None, 0);
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
