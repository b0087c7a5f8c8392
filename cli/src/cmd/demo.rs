//! `lienthong demo`: a whole exchange on one machine. A dev PKI in a temporary folder,
//! a broker and three agents in this process on loopback ports, one document with two
//! attachments sent from the provincial People's Committee to two departments, each
//! step printed; then it keeps running so a person can try the other commands.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use clap::Args;
use lienthong_agent::AgentConfig;
use lienthong_agent::api_types::{AttachmentUpload, SendRequest, StatusView};
use lienthong_broker::BrokerConfig;
use lienthong_certs_dev::{DEFAULT_AGENCIES, write_dev_pki};
use lienthong_proto::AgencyCode;
use lienthong_proto::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::CliError;
use crate::http::AgentClient;
use crate::output::{errln, outln};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after the first exchange instead of waiting for Ctrl-C.
    #[arg(long)]
    once: bool,
}

/// Registered at the broker but running no agent in the demo.
const OFFLINE_AGENCY: &str = "000.00.20.H31";

const AGENCY_NAMES: [&str; 3] = [
    "UBND tỉnh Hưng Yên",
    "Sở Tài chính tỉnh Hưng Yên",
    "Sở Nội vụ tỉnh Hưng Yên",
];

fn failed(what: &str) -> impl Fn(String) -> CliError + '_ {
    move |e| CliError::Failed(format!("{what}: {e}"))
}

async fn bind() -> Result<TcpListener, CliError> {
    TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Failed(format!("cannot bind a loopback port: {e}")))
}

fn port(listener: &TcpListener) -> u16 {
    listener.local_addr().map(|a| a.port()).unwrap_or(0)
}

pub async fn run(args: DemoArgs) -> Result<(), CliError> {
    let temp = tempfile::Builder::new()
        .prefix("lienthong-demo-")
        .tempdir()
        .map_err(|e| CliError::Failed(format!("cannot create a temporary folder: {e}")))?;
    let root = temp.path();
    let codes: Vec<String> = DEFAULT_AGENCIES.iter().map(|c| (*c).to_owned()).collect();
    let pki =
        write_dev_pki(&root.join("pki"), &codes).map_err(|e| failed("dev PKI")(e.to_string()))?;
    outln!("1. Development PKI written to {}", pki.dir.display());

    let shutdown = CancellationToken::new();
    let broker_listener = bind().await?;
    let broker_url = format!("https://localhost:{}", port(&broker_listener));
    let mut broker = BrokerConfig::new(
        TlsFiles::load(&pki.ca_cert, &pki.broker_cert, &pki.broker_key)?,
        root.join("broker"),
    );
    // The demo stores a few kilobytes; don't refuse it on a small temporary disk.
    broker.min_free_bytes = 32 * 1024 * 1024;
    for (code, name) in codes.iter().zip(AGENCY_NAMES) {
        let code = AgencyCode::parse(code).map_err(|e| failed("agency")(e.to_string()))?;
        broker.agencies.push((code, name.to_owned()));
    }
    // An agency registered at the broker that runs no agent in the demo: a document to
    // it stays queued, which is what an operator looks for on the dashboard.
    let offline = AgencyCode::parse(OFFLINE_AGENCY).map_err(|e| failed("agency")(e.to_string()))?;
    broker
        .agencies
        .push((offline, "Sở Y tế tỉnh Hưng Yên".into()));
    let admin_listener = bind().await?;
    let dashboard = format!("http://127.0.0.1:{}/", port(&admin_listener));
    let broker_task = tokio::spawn(lienthong_broker::run_with_admin(
        broker,
        broker_listener,
        Some(admin_listener),
        shutdown.clone(),
    ));
    outln!(
        "2. Broker listening on {broker_url} (mutual TLS), data in {}",
        root.join("broker").display()
    );
    outln!("   Operator dashboard: {dashboard} (metrics at {dashboard}metrics)");

    let mut apis = Vec::new();
    let mut tokens = Vec::new();
    let mut agent_tasks = Vec::new();
    for (code, name) in codes.iter().zip(AGENCY_NAMES) {
        let (cert, key) = pki
            .agency(code)
            .ok_or_else(|| CliError::Failed(format!("no certificate for {code}")))?;
        let tls = TlsFiles::load(&pki.ca_cert, cert, key)?;
        let agency = AgencyCode::parse(code).map_err(|e| failed("agency")(e.to_string()))?;
        let dir = root.join("agents").join(code);
        let config = AgentConfig::new(
            agency,
            broker_url.clone(),
            tls,
            dir.join("data"),
            dir.join("inbox"),
        );
        // The token exists before the agent listens; the demo's client reads it.
        let token_file = config.api_token_path();
        let token = lienthong_agent::api_guard::ApiToken::load_or_create(&token_file)
            .map_err(|e| failed("API token")(e.to_string()))?;
        let listener = bind().await?;
        let api = format!("http://127.0.0.1:{}", port(&listener));
        outln!(
            "3. Agent {code} ({name}): API {api}, inbox {}",
            dir.join("inbox").display()
        );
        outln!("   API token file: {}", token_file.display());
        agent_tasks.push(tokio::spawn(lienthong_agent::run(
            config,
            listener,
            shutdown.clone(),
        )));
        apis.push(api);
        tokens.push((token, token_file));
    }

    let outcome = exchange(&apis, &tokens, &codes, root).await;
    if outcome.is_ok() && !args.once {
        print_try_it(&apis, &tokens, &codes, &broker_url, &pki.dir, &dashboard);
        crate::shutdown_signal().await;
        outln!("Stopping…");
    }
    shutdown.cancel();
    for task in agent_tasks {
        if let Ok(Err(error)) = task.await {
            errln!("agent stopped with an error: {error}");
        }
    }
    if let Ok(Err(error)) = broker_task.await {
        errln!("broker stopped with an error: {error}");
    }
    outcome
}

/// An agent's API token and the file it is in.
type TokenFile = (lienthong_agent::api_guard::ApiToken, std::path::PathBuf);

async fn exchange(
    apis: &[String],
    tokens: &[TokenFile],
    codes: &[String],
    root: &Path,
) -> Result<(), CliError> {
    let (Some(sender_api), Some((token, _)), Some(recipients)) =
        (apis.first(), tokens.first(), codes.get(1..))
    else {
        return Err(CliError::Failed("the demo needs three agencies".into()));
    };
    let client = AgentClient::new(sender_api, token.expose())?;
    let letter = "ỦY BAN NHÂN DÂN TỈNH HƯNG YÊN\n\nV/v triển khai liên thông văn bản điện tử.\n\
                  Đề nghị các sở xác nhận đã nhận văn bản trong ngày.\n";
    let table = "đơn vị,số văn bản\nSở Tài chính,12\nSở Nội vụ,7\n";
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let request = SendRequest {
        to: recipients.to_vec(),
        subject: "Về việc triển khai liên thông văn bản điện tử (demo)".into(),
        notation: Some("UBND-VP".into()),
        attachments: vec![
            AttachmentUpload {
                name: "cong-van.txt".into(),
                media_type: Some("text/plain; charset=utf-8".into()),
                content_base64: b64(letter),
                upload_id: None,
            },
            AttachmentUpload {
                name: "phu-luc.csv".into(),
                media_type: Some("text/csv".into()),
                content_base64: b64(table),
                upload_id: None,
            },
        ],
        ..SendRequest::default()
    };
    let sent = client.send(&request).await?;
    outln!(
        "4. {} signed document {} (business id {}) and stored it in its outbox",
        codes.first().map(String::as_str).unwrap_or(""),
        sent.message_id,
        sent.business_id
    );
    let view = wait_for(&client, &sent.message_id, |v| v.outbox_state != "outbox").await?;
    if view.outbox_state != "submitted" {
        return Err(CliError::Failed(format!(
            "the broker did not accept the document: {}",
            view.failure_reason.unwrap_or_default()
        )));
    }
    outln!(
        "5. Broker accepted it at {} with a signed submission receipt ({})",
        view.submitted_at.as_deref().unwrap_or("?"),
        if view.submission_receipt_verified {
            "verified"
        } else {
            "NOT verified"
        }
    );
    let view = wait_for(&client, &sent.message_id, |v| {
        v.recipients
            .iter()
            .all(|r| r.state != "queued" && r.state != "unknown")
    })
    .await?;
    for r in &view.recipients {
        outln!(
            "6. {}: {} at {}, delivery receipt {}",
            r.agency,
            r.state,
            r.delivered_at.as_deref().unwrap_or("?"),
            match r.receipt_verified {
                Some(true) => "verified",
                Some(false) => "NOT verified",
                None => "absent",
            }
        );
    }
    for code in recipients {
        let folder = root
            .join("agents")
            .join(code)
            .join("inbox")
            .join(&sent.message_id);
        // The recipient exports after its receipt (issue 11): the folder follows shortly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !folder.is_dir() {
            if std::time::Instant::now() > deadline {
                return Err(CliError::Failed(format!(
                    "{code} acknowledged the document but did not export it to {} within 30 s",
                    folder.display()
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        outln!("7. {code} exported it to {}", folder.display());
    }
    if view.recipients.iter().any(|r| r.state != "delivered") {
        return Err(CliError::Failed(
            "not every recipient received the document".into(),
        ));
    }
    let stuck = SendRequest {
        to: vec![OFFLINE_AGENCY.into()],
        subject: "Báo cáo tình hình dịch bệnh (chờ Sở Y tế kết nối)".into(),
        notation: Some("UBND-VX".into()),
        ..SendRequest::default()
    };
    let stuck = client.send(&stuck).await?;
    wait_for(&client, &stuck.message_id, |v| v.outbox_state != "outbox").await?;
    outln!(
        "8. A document to {OFFLINE_AGENCY}, which runs no agent here, stays queued at the broker: {}",
        stuck.message_id
    );
    Ok(())
}

async fn wait_for(
    client: &AgentClient,
    message_id: &str,
    done: impl Fn(&StatusView) -> bool,
) -> Result<StatusView, CliError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view = client.status(message_id).await?;
        if done(&view) {
            return Ok(view);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "timed out waiting on {message_id}; last state: outbox {}",
                view.outbox_state
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_try_it(
    apis: &[String],
    tokens: &[TokenFile],
    codes: &[String],
    broker_url: &str,
    pki: &Path,
    dashboard: &str,
) {
    let (Some(a), Some(b), Some((_, a_token)), Some((_, b_token))) =
        (apis.first(), apis.get(1), tokens.first(), tokens.get(1))
    else {
        return;
    };
    let to = codes.get(1..).map(|c| c.join(",")).unwrap_or_default();
    outln!();
    outln!("The exchange keeps running. In another terminal, try:");
    outln!(
        "  export LIENTHONG_API_TOKEN_FILE={}   # the API token of {}",
        a_token.display(),
        codes.first().map(String::as_str).unwrap_or("")
    );
    outln!("  echo 'Kính gửi các sở' > /tmp/thu.txt");
    outln!(
        "  id=$(cargo run --release -q -- send --api {a} --to {to} --subject 'Thử nghiệm' /tmp/thu.txt)"
    );
    outln!("  cargo run --release -q -- status --api {a} \"$id\"");
    outln!(
        "  cargo run --release -q -- inbox --api {b} --api-token-file {}",
        b_token.display()
    );
    outln!(
        "  cargo run --release -q -- verify --ca {} <folder printed by inbox>",
        pki.join("ca.crt").display()
    );
    outln!(
        "  cargo run --release -q -- admin --broker {broker_url} --ca {0}/ca.crt --cert {0}/operator.crt --key {0}/operator.key queues",
        pki.display()
    );
    outln!(
        "Open the operator dashboard at {dashboard} to find the document stuck for {OFFLINE_AGENCY}."
    );
    outln!("Press Ctrl-C to stop (the temporary folder is removed).");
}
