//! The document-signing key on a PKCS#11 token (SoftHSM2): the real `lienthong agent`
//! binary signs with a key that exists only on the token (`--signing-key
//! pkcs11:token=…;object=…`, `--pkcs11-module`, `--pin-file`), its documents reach the
//! recipient over the real broker and mTLS and verify there and with `lienthong verify`;
//! a wrong PIN, a missing key, a missing token, an unloadable module and a PIN file
//! others may read stop it at start with a clear message; a token that disappears
//! while it runs fails the next send with an error naming the token, stores nothing,
//! and signing works again once the token is back.
//!
//! SoftHSM2 comes from Debian's `softhsm2` (`.ci/run` installs it); where it is not
//! installed these tests print `SKIPPED: softhsm2 not installed` and pass. SoftHSM2
//! reads `SOFTHSM2_CONF` at start, so every process that uses the token is a child with
//! its own environment, and each test has its own token directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use lienthong_certs_dev::{IssuedCert, LeafSpec};
use lienthong_proto::TrustAnchors;
use lienthong_proto::document::verify_document;
use lienthong_proto::pb::Signed;
use lienthong_proto::signing::VerifyTime;
use lienthong_tests::*;
use prost::Message as _;
use reqwest::header::CONTENT_TYPE;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const TOKEN: &str = "lienthong-A";
const OBJECT: &str = "seal";
const PIN: &str = "246810";

/// A SoftHSM2 configuration of this test's own: tokens live in `tokens`.
struct SoftHsm {
    conf: PathBuf,
    tokens: PathBuf,
}

impl SoftHsm {
    /// None (after printing SKIPPED) when SoftHSM2 is not installed.
    fn new(world: &World) -> Option<Self> {
        let installed = Path::new(MODULE).is_file()
            && Command::new("softhsm2-util")
                .arg("--version")
                .output()
                .is_ok_and(|out| out.status.success());
        if !installed {
            println!("SKIPPED: softhsm2 not installed");
            return None;
        }
        let dir = world.path("softhsm");
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        Some(Self { conf, tokens })
    }

    fn util(&self, args: &[&str]) -> Output {
        let out = Command::new("softhsm2-util")
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "softhsm2-util {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// A new token labelled `label` with the user PIN [`PIN`].
    fn init_token(&self, label: &str) {
        self.util(&[
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            PIN,
            "--so-pin",
            "13579111",
        ]);
    }

    /// Puts the private key of `issued` on the token as `object` with CKA_ID `id`
    /// (hex), then deletes every copy of it outside the token.
    fn import_key(&self, dir: &Path, token: &str, object: &str, id: &str, issued: &IssuedCert) {
        let key = dir.join(format!("{object}-key.pem"));
        std::fs::write(&key, &issued.key_pem).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        self.util(&[
            "--import",
            &key.display().to_string(),
            "--token",
            token,
            "--label",
            object,
            "--id",
            id,
            "--pin",
            PIN,
        ]);
        std::fs::remove_file(&key).unwrap();
    }
}

/// A token [`TOKEN`] holding A's document-signing key [`OBJECT`], its certificate in a
/// file (the key is on the token only) and a PIN file (0600).
struct Setup {
    hsm: SoftHsm,
    issued: IssuedCert,
    cert: PathBuf,
    pin_file: PathBuf,
}

fn setup(world: &World) -> Option<Setup> {
    let hsm = SoftHsm::new(world)?;
    hsm.init_token(TOKEN);
    let issued = world.ca.issue(&LeafSpec::agency(A)).unwrap();
    let dir = world.path("seal");
    std::fs::create_dir_all(&dir).unwrap();
    hsm.import_key(&dir, TOKEN, OBJECT, "01", &issued);
    let cert = dir.join("seal-cert.pem");
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    Some(Setup {
        hsm,
        issued,
        cert,
        pin_file,
    })
}

/// The token flags for agent A.
fn token_args(setup: &Setup, uri: &str, module: &str, pin_file: &Path) -> Vec<String> {
    vec![
        "--signing-cert".into(),
        setup.cert.display().to_string(),
        "--signing-key".into(),
        uri.into(),
        "--pkcs11-module".into(),
        module.into(),
        "--pin-file".into(),
        pin_file.display().to_string(),
    ]
}

fn default_uri() -> String {
    format!("pkcs11:token={TOKEN};object={OBJECT}")
}

/// Agent A as a child process signing on the token: the harness's command line run
/// through `env` so that the child alone sees `SOFTHSM2_CONF`.
fn token_agent(world: &World, setup: &Setup, broker_url: &str, extra: Vec<String>) -> AgentProcess {
    let mut agent = AgentProcess::prepare(Path::new(BIN), world, A, broker_url);
    let process = &mut agent.process;
    process.args.extend(extra);
    let mut args = vec![
        format!("SOFTHSM2_CONF={}", setup.hsm.conf.display()),
        BIN.to_owned(),
    ];
    args.append(&mut process.args);
    process.args = args;
    process.bin = PathBuf::from("/usr/bin/env");
    agent
}

/// Runs agent A with `extra` flags, expecting it to stop at start: (exit code, stderr).
async fn start_fails(world: &World, setup: &Setup, extra: Vec<String>) -> (Option<i32>, String) {
    let agent = token_agent(world, setup, "https://localhost:9", extra);
    exits_at_start(&agent.process.bin, &agent.process.args).await
}

/// Runs `bin args`, expecting it to exit by itself: (exit code, stderr).
async fn exits_at_start(bin: &Path, args: &[String]) -> (Option<i32>, String) {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Polls the exit with a deadline (the child exits on its own or the test fails).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() >= deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the agent did not stop at start");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code(), stderr)
}

/// Asserts a start-up failure with exit code 2 and exactly this last line on stderr.
async fn assert_refused(world: &World, setup: &Setup, extra: Vec<String>, message: &str) {
    let (code, stderr) = start_fails(world, setup, extra).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(format!("lienthong: {message}").as_str()),
        "{stderr}"
    );
}

/// `lienthong verify DIR --ca CA` passes.
fn assert_verifies(world: &World, folder: &Path) {
    let out = Command::new(BIN)
        .args([
            "verify",
            &folder.display().to_string(),
            "--ca",
            &world.pki.ca_cert.display().to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify {}: {stdout}{}",
        folder.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("VALID"), "{stdout}");
}

fn item(subject: &str) -> serde_json::Value {
    serde_json::json!({
        "to": [B],
        "subject": subject,
        "attachments": [{
            "name": "cong-van.txt",
            "content_base64": base64::engine::general_purpose::STANDARD.encode(subject.as_bytes()),
        }],
    })
}

/// `POST path` with `body` to agent A's API: (status, JSON answer).
async fn post(
    agent: &AgentProcess,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let (name, value) = bearer(&agent.token);
    let response = reqwest::Client::new()
        .post(format!("{}{path}", agent.api))
        .header(name, value)
        .header(CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Sends one document from A to B; the message id.
async fn send_one(agent: &AgentProcess, subject: &str) -> String {
    let (status, body) = post(agent, "/v1/documents", &item(subject)).await;
    assert_eq!(status, 202, "{body}");
    body["message_id"].as_str().unwrap().to_owned()
}

/// Reads the envelope B exported for `id` and checks it at the recipient's standards:
/// signed by A with the token key's certificate.
fn exported_envelope(world: &World, setup: &Setup, id: &str) -> Signed {
    let folder = world.inbox_dir(B).join(id);
    let envelope = Signed::decode(
        std::fs::read(folder.join("envelope.pb"))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(envelope.cert_chain.first(), Some(&setup.issued.cert_der));
    let anchors = TrustAnchors::from_pem(&std::fs::read(&world.pki.ca_cert).unwrap()).unwrap();
    let verified = verify_document(&envelope, &anchors, VerifyTime::Now).unwrap();
    assert_eq!(verified.header.message_id, id);
    assert_eq!(verified.header.sender, A);
    envelope
}

/// A's outbox gauge by state, from its `/metrics`.
async fn outbox_gauge(agent: &AgentProcess) -> Vec<(String, i64)> {
    let (name, value) = bearer(&agent.token);
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", agent.api))
        .header(name, value)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut states: Vec<(String, i64)> = text
        .lines()
        .filter_map(|line| line.strip_prefix("lienthong_agent_outbox_documents{state=\""))
        .filter_map(|rest| {
            let (state, value) = rest.split_once("\"} ")?;
            Some((state.to_owned(), value.trim().parse().ok()?))
        })
        .collect();
    states.sort();
    states
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_document_verifies_at_the_recipient_and_offline() {
    let world = World::new();
    let Some(setup) = setup(&world) else { return };
    let broker = Broker::start(world.broker_config("broker")).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let mut a = token_agent(
        &world,
        &setup,
        &broker.url,
        token_args(&setup, &default_uri(), MODULE, &setup.pin_file),
    );
    a.process.spawn().await;

    // One document: signed on the token (the key exists nowhere else), delivered,
    // verified by B on receipt, exported with its receipts and verified offline.
    let id = send_one(&a, "Công văn ký bằng token").await;
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    let single = exported_envelope(&world, &setup, &id);
    assert!(single.batch.is_none());
    assert_verifies(&world, &world.inbox_dir(B).join(&id));

    // A batch: one token signature over the Merkle root serves every document.
    let documents: Vec<serde_json::Value> = (0..8).map(|i| item(&format!("Lô {i}"))).collect();
    let (status, body) = post(
        &a,
        "/v1/documents/batch",
        &serde_json::json!({ "documents": documents }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], 202, "{r}");
            r["message_id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 8);
    let mut signatures = std::collections::HashSet::new();
    for id in &ids {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
        let envelope = exported_envelope(&world, &setup, id);
        assert!(envelope.batch.is_some(), "{id} was not batch-signed");
        signatures.insert(envelope.signature);
        assert_verifies(&world, &world.inbox_dir(B).join(id));
    }
    assert_eq!(signatures.len(), 1, "one token signature for the batch");
    assert_eq!(b.client.inbox().await.unwrap().len(), 9);

    assert!(
        a.process
            .terminate_within(Duration::from_secs(20))
            .await
            .is_some()
    );
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_a_missing_key_or_token_stop_the_agent_at_start() {
    let world = World::new();
    let Some(setup) = setup(&world) else { return };
    let dir = world.path("seal");

    let wrong_pin = dir.join("wrong-pin");
    std::fs::write(&wrong_pin, "000000\n").unwrap();
    std::fs::set_permissions(&wrong_pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_refused(
        &world,
        &setup,
        token_args(&setup, &default_uri(), MODULE, &wrong_pin),
        &format!(
            "--signing-key: token \"{TOKEN}\": wrong PIN (the PIN in {} was refused)",
            wrong_pin.display()
        ),
    )
    .await;

    assert_refused(
        &world,
        &setup,
        token_args(
            &setup,
            &format!("pkcs11:token={TOKEN};object=no-such-key"),
            MODULE,
            &setup.pin_file,
        ),
        &format!("--signing-key: token \"{TOKEN}\": no private key with label \"no-such-key\""),
    )
    .await;
    assert_refused(
        &world,
        &setup,
        token_args(
            &setup,
            &format!("pkcs11:token={TOKEN};object={OBJECT};id=%02"),
            MODULE,
            &setup.pin_file,
        ),
        &format!(
            "--signing-key: token \"{TOKEN}\": no private key with label \"{OBJECT}\" and id 02"
        ),
    )
    .await;

    assert_refused(
        &world,
        &setup,
        token_args(
            &setup,
            &format!("pkcs11:token=No%20such%20token;object={OBJECT}"),
            MODULE,
            &setup.pin_file,
        ),
        &format!(
            "--signing-key: no token \"No such token\" in the PKCS#11 module {MODULE} (tokens present: \"{TOKEN}\")"
        ),
    )
    .await;

    assert_refused(
        &world,
        &setup,
        token_args(&setup, &default_uri(), "/nonexistent/libpkcs11.so", &setup.pin_file),
        "--signing-key: cannot load the PKCS#11 module /nonexistent/libpkcs11.so: libloading error (/nonexistent/libpkcs11.so: cannot open shared object file: No such file or directory)",
    )
    .await;

    let readable = dir.join("readable-pin");
    std::fs::write(&readable, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_refused(
        &world,
        &setup,
        token_args(&setup, &default_uri(), MODULE, &readable),
        &format!(
            "--signing-key: PIN file {} may be read by other users (mode 0644); run chmod 600 on it",
            readable.display()
        ),
    )
    .await;

    // The same keys in the configuration file: the URI is not taken for a path.
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "signing_cert = {:?}\nsigning_key = \"pkcs11:token={TOKEN};object=from-config\"\npkcs11_module = {MODULE:?}\npin_file = {:?}\n",
            setup.cert.display().to_string(),
            setup.pin_file.display().to_string(),
        ),
    )
    .unwrap();
    assert_refused(
        &world,
        &setup,
        vec!["--config".into(), config.display().to_string()],
        &format!("--signing-key: token \"{TOKEN}\": no private key with label \"from-config\""),
    )
    .await;

    // A key on the token that is not the certificate's.
    let stranger = world.ca.issue(&LeafSpec::agency(A)).unwrap();
    setup
        .hsm
        .import_key(&dir, TOKEN, "stranger", "03", &stranger);
    assert_refused(
        &world,
        &setup,
        token_args(
            &setup,
            &format!("pkcs11:token={TOKEN};object=stranger"),
            MODULE,
            &setup.pin_file,
        ),
        &format!(
            "--signing-key: token \"{TOKEN}\": cannot use key: the private key does not match the certificate"
        ),
    )
    .await;

    // The TLS key stays a file.
    let mut agent = AgentProcess::prepare(Path::new(BIN), &world, A, "https://localhost:9");
    let key = agent
        .process
        .args
        .iter()
        .position(|a| a == "--key")
        .unwrap()
        + 1;
    agent.process.args[key] = default_uri();
    let (code, stderr) = exits_at_start(&agent.process.bin, &agent.process.args).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.lines().last(),
        Some(
            "lienthong: --key is the TLS key and must be a PEM file; a key on a token goes in --signing-key (with --signing-cert)"
        ),
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_token_fails_the_next_send_and_stores_nothing() {
    let world = World::new();
    let Some(setup) = setup(&world) else { return };
    let broker = Broker::start(world.broker_config("broker")).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let mut a = token_agent(
        &world,
        &setup,
        &broker.url,
        token_args(&setup, &default_uri(), MODULE, &setup.pin_file),
    );
    a.process.spawn_with(Stdio::piped(), Some("warn")).await;
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = a.process.take_stderr().unwrap();
    let sink = Arc::clone(&log);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });

    let first = send_one(&a, "Trước khi rút token").await;
    wait_for_path(&world.inbox_dir(B).join(&first)).await;
    exported_envelope(&world, &setup, &first);
    let before = outbox_gauge(&a).await;

    // The token goes away: its folder leaves the token directory.
    let token_dirs: Vec<PathBuf> = std::fs::read_dir(&setup.hsm.tokens)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(token_dirs.len(), 1, "{token_dirs:?}");
    let away = world.path("token-away");
    std::fs::rename(&token_dirs[0], &away).unwrap();

    let (status, body) = post(&a, "/v1/documents", &item("Sau khi rút token")).await;
    assert_eq!(status, 500, "{body}");
    let expected = format!("token \"{TOKEN}\" is not reachable (was it removed?)");
    let mut last = None;
    let logged = wait_until(
        "the agent logs the token error",
        Duration::from_secs(10),
        || {
            let text = log.lock().unwrap().clone();
            async move { Some(text) }
        },
        |text| text.contains(&expected),
        &mut last,
    )
    .await;
    assert!(logged.is_some(), "{expected:?} not in the log: {last:?}");
    // Nothing half-stored: the outbox counts what it held before, and B has one document.
    assert_eq!(outbox_gauge(&a).await, before);

    // The token is back: the next send opens a new session and signs.
    std::fs::rename(&away, &token_dirs[0]).unwrap();
    let (status, body) = post(&a, "/v1/documents", &item("Token đã cắm lại")).await;
    assert_eq!(status, 202, "{body} {}", log.lock().unwrap());
    let third = body["message_id"].as_str().unwrap().to_owned();
    wait_for_path(&world.inbox_dir(B).join(&third)).await;
    exported_envelope(&world, &setup, &third);
    let mut expected_ids = vec![first, third];
    expected_ids.sort();
    assert_eq!(inbox_entries(&world.inbox_dir(B)), expected_ids);

    assert!(
        a.process
            .terminate_within(Duration::from_secs(20))
            .await
            .is_some()
    );
    b.stop().await;
    broker.stop().await;
}
