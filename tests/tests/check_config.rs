//! `lienthong broker --check-config` and `lienthong agent --check-config`: a
//! configuration shaped like deploy/broker.toml and deploy/agent.toml is checked with
//! the files it names, without starting anything; a good one gives one OK line and
//! exit 0, a bad one exit 2 with every bad value named, not just the first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use lienthong_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

fn check(command: &str, config: &Path) -> Output {
    Command::new(BIN)
        .args([command, "--check-config", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `body` (a configuration like deploy/broker.toml) to etc/broker.toml.
fn broker_toml(world: &World, body: &str) -> std::path::PathBuf {
    let path = world.path("etc/broker.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, body).unwrap();
    path
}

fn broker_body(world: &World, key: &Path) -> String {
    format!(
        r#"# like deploy/broker.toml
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
data = "{data}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
register = ["000.00.00.H31=UBND tỉnh Hưng Yên", "000.00.12.H31=Sở Tài chính"]
no_auto_register = true
max_document_bytes = 2147483648
ack_timeout_secs = 30
name = "hungyen-lgsp"
max_submissions_per_agency = 16
stall_timeout_secs = 60
max_expiry_hours = 720
tls_handshake_timeout_secs = 10
max_connections = 16384
log_format = "json"
"#,
        port = free_port(),
        admin = free_port(),
        data = world.path("var/broker").display(),
        ca = world.pki.ca_cert.display(),
        cert = world.pki.broker_cert.display(),
        key = key.display(),
    )
}

#[test]
fn a_good_broker_configuration_is_ok_and_nothing_starts() {
    let world = World::new();
    let config = broker_toml(&world, &broker_body(&world, &world.pki.broker_key));
    let out = check("broker", &config);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains("2 agencies registered"), "{stdout}");
    assert!(
        !world.path("var/broker").exists(),
        "the check created the data dir"
    );
}

#[test]
fn a_bad_broker_configuration_names_every_bad_value() {
    let world = World::new();
    let missing_key = world.path("pki/nope/broker.key");
    let mut body = broker_body(&world, &missing_key);
    body = body.replace(
        "register = [\"000.00.00.H31=UBND tỉnh Hưng Yên\"",
        "register = [\"H31=no code\"",
    );
    body = body.replace("stall_timeout_secs = 60", "stall_timeout_secs = 0");
    body = body.replace("admin_listen = \"127.0.0.1:", "admin_listen = \"0.0.0.0:");
    body.push_str("window = 0\nmax_batch_documents = 0\nexpiry_hours = [1, 2]\n");
    body.push_str("document_ca = \"no-such-ca.crt\"\n");
    let config = broker_toml(&world, &body);
    let out = check("broker", &config);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let stderr = text(&out.stderr);
    for needle in [
        "8 problems",
        "--window must be from 1 to 16384",
        "--max-batch-documents must be from 1 to 16384",
        &missing_key.display().to_string(),
        "--register",
        "--stall-timeout-secs must be at least 1",
        "0.0.0.0:",
        "--expiry-hours takes five values",
        // Relative paths are relative to the file.
        &world.path("etc/no-such-ca.crt").display().to_string(),
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert!(!world.path("var/broker").exists());
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused() {
    let world = World::new();
    let (_, other_key) = world.pki.agency(A).unwrap();
    let config = broker_toml(&world, &broker_body(&world, other_key));
    let out = check("broker", &config);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&other_key.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn unknown_keys_and_wrong_types_are_all_named() {
    let world = World::new();
    let mut body = broker_body(&world, &world.pki.broker_key);
    body.push_str("windw = 3\nmax_handshakes = \"many\"\nlog_format = \"xml\"\n");
    // log_format twice would be a TOML error: drop the first.
    let body = body.replacen("log_format = \"json\"\n", "", 1);
    let config = broker_toml(&world, &body);
    let out = check("broker", &config);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    for needle in ["3 problems", "`windw`", "`max_handshakes`", "`log_format`"] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
}

fn agent_body(world: &World, agency: &str, cert_of: &str) -> String {
    let (cert, key) = world.pki.agency(cert_of).unwrap();
    format!(
        r#"# like deploy/agent.toml
broker = "https://localhost:7443"
agency = "{agency}"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
data = "{data}"
api = "127.0.0.1:{port}"
inbox_dir = "{inbox}"
"#,
        ca = world.pki.ca_cert.display(),
        cert = cert.display(),
        key = key.display(),
        data = world.path("var/agent").display(),
        inbox = world.path("srv/inbox").display(),
        port = free_port(),
    )
}

#[test]
fn a_good_agent_configuration_is_ok_and_creates_nothing() {
    let world = World::new();
    let config = world.path("agent.toml");
    std::fs::write(&config, agent_body(&world, B, B)).unwrap();
    let out = check("agent", &config);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("OK") && stdout.contains(B), "{stdout}");
    // Not even the API token: the real start creates it.
    assert!(!world.path("var/agent").exists());
}

#[test]
fn a_bad_agent_configuration_names_every_bad_value() {
    let world = World::new();
    let mut body = agent_body(&world, C, B).replace("https://", "http://");
    body.push_str("window = 0\napi_max_connections = 0\n");
    body.push_str("signing_cert = \"seal.crt\"\n");
    let config = world.path("agent.toml");
    std::fs::write(&config, body).unwrap();
    let out = check("agent", &config);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    for needle in [
        "5 problems",
        "--broker must be an https:// URL",
        &format!("not agency {C}"),
        "--window must be from 1 to 16384",
        "--api-max-connections must be at least 1",
        "--signing-cert and --signing-key go together",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    }
    assert!(!world.path("var/agent").exists());
}

/// The shipped examples hold only known keys and good values: checked where they are,
/// the only problems are the PKI files they name under /etc/lienthong, which this
/// machine does not have.
#[test]
fn the_shipped_example_configurations_have_only_known_keys() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    for (command, file) in [("broker", "broker.toml"), ("agent", "agent.toml")] {
        let path = deploy.join(file);
        let out = check(command, &path);
        let stderr = text(&out.stderr);
        if out.status.success() {
            continue; // a machine with a real /etc/lienthong/pki
        }
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|l| l.trim_start().starts_with("- "))
            .collect();
        assert_eq!(problems.len(), 3, "{file}: {stderr}");
        for problem in problems {
            assert!(problem.contains("/etc/lienthong/pki/"), "{file}: {problem}");
        }
    }
}
