//! Reloading the broker's configuration while it runs: the reload hook in process and
//! SIGHUP in the real binary. A reload swaps the TLS certificate new handshakes see and
//! the key of new receipts without dropping the sessions already open; a configuration
//! that does not check out is refused whole and the one in force stays.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lienthong_certs_dev::LeafSpec;
use lienthong_proto::document::seal;
use lienthong_proto::pb::{AgenciesRequest, QueuesRequest};
use lienthong_proto::tls::TlsFiles;
use lienthong_tests::*;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");
/// An agency the reloaded configuration registers.
const NEW: &str = "000.00.20.H31";

/// The end-entity certificate (DER) the broker at `addr` presents to a new connection
/// from agency C.
async fn presented_certificate(world: &World, addr: SocketAddr) -> Vec<u8> {
    let connector = agency_tls_connector(world, C);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Waits until new connections to `addr` see `expected`; panics after 15 s.
async fn wait_presented(world: &World, addr: SocketAddr, expected: &[u8], what: &str) {
    let mut last = None;
    let seen = wait_until(
        what,
        Duration::from_secs(15),
        || async { Some(presented_certificate(world, addr).await) },
        |cert| cert.as_slice() == expected,
        &mut last,
    )
    .await;
    assert!(seen.is_some(), "timed out waiting for {what}");
}

/// Copies the world's broker certificate and key to a folder of their own (the files a
/// reload reads again); returns (certificate, key) paths.
fn own_broker_files(world: &World) -> (PathBuf, PathBuf) {
    let dir = world.path("broker-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("broker.crt"), dir.join("broker.key"));
    std::fs::copy(&world.pki.broker_cert, &cert).unwrap();
    std::fs::copy(&world.pki.broker_key, &key).unwrap();
    (cert, key)
}

/// Replaces `path` the way an operator's deployment would: a new file renamed over it.
fn replace_file(path: &Path, contents: &[u8]) {
    let next = path.with_extension("next");
    std::fs::write(&next, contents).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// A new broker certificate from the world's CA, written over `cert` and `key`; returns
/// its DER.
fn rotate_broker_certificate(world: &World, cert: &Path, key: &Path) -> Vec<u8> {
    let issued = world
        .ca
        .issue(&LeafSpec::server(&["localhost", "127.0.0.1", "::1"]))
        .unwrap();
    replace_file(key, issued.key_pem.as_bytes());
    replace_file(cert, issued.cert_pem.as_bytes());
    issued.cert_der
}

fn der_of(pem_path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_path).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_certificate_and_receipt_key_without_dropping_sessions() {
    let world = World::new();
    let (cert, key) = own_broker_files(&world);
    let ca = world.pki.ca_cert.clone();
    let mut template = world.broker_config("broker");
    template.tls = TlsFiles::load(&ca, &cert, &key).unwrap();
    let requests = Arc::new(tokio::sync::Notify::new());
    let mut config = template.clone();
    let (load_cert, load_key) = (cert.clone(), key.clone());
    config.reload = Some(lienthong_broker::ReloadHook {
        requests: requests.clone(),
        load: Arc::new(move || {
            let mut next = template.clone();
            next.tls = TlsFiles::load(&ca, &load_cert, &load_key).map_err(|e| e.to_string())?;
            Ok(next)
        }),
    });
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let before = a
        .send(&[B], "trước khi nạp lại", &[("a.txt", b"one")])
        .await;
    wait_for_path(&world.inbox_dir(B).join(&before)).await;
    let admin = admin_client(&world, &broker.url).await;
    let sessions = || {
        let mut admin = admin.clone();
        async move {
            let listed = admin
                .queues(QueuesRequest {})
                .await
                .unwrap()
                .into_inner()
                .queues;
            let since = |code: &str| {
                listed
                    .iter()
                    .find(|info| info.agency == code)
                    .unwrap()
                    .connected_since_ms
            };
            (since(A), since(B))
        }
    };
    let sessions_before = sessions().await;
    assert!(sessions_before.0 > 0 && sessions_before.1 > 0);
    let old_der = der_of(&cert);
    assert_eq!(presented_certificate(&world, broker.addr).await, old_der);

    let new_der = rotate_broker_certificate(&world, &cert, &key);
    requests.notify_one();
    wait_presented(&world, broker.addr, &new_der, "the rotated certificate").await;
    let metrics = reqwest::get(format!("{admin_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("lienthong_broker_reloads_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
    // The new certificate's notAfter is what the expiry metric shows now.
    let new_not_after =
        lienthong_proto::metrics::not_after(&CertificateDer::from(new_der.clone())).unwrap();
    assert!(
        metrics.contains(&format!(
            "lienthong_certificate_not_after_timestamp_seconds{{certificate=\"tls\"}} {new_not_after}"
        )),
        "{metrics}"
    );

    // Receipts are signed with the new key from now on.
    let key_a = world.agency_tls(A).signing_key().unwrap();
    let mut client_a = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let receipt = submit(
        &mut client_a,
        seal(&header(A, &[C], &[]), &key_a).unwrap(),
        &[],
    )
    .await
    .unwrap()
    .submission_receipt
    .unwrap();
    assert_eq!(receipt.cert_chain[0], new_der);

    // The sessions opened before the reload are the ones still open, and they carry on.
    assert_eq!(sessions().await, sessions_before);
    let after = a.send(&[B], "sau khi nạp lại", &[("b.txt", b"two")]).await;
    wait_for_path(&world.inbox_dir(B).join(&after)).await;
    assert_eq!(sessions().await, sessions_before);

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

/// The broker's count of reloads with `outcome`, from the admin listener at `admin`.
async fn reloads(admin: &str, outcome: &str) -> Option<u64> {
    let series = format!("lienthong_broker_reloads_total{{outcome=\"{outcome}\"}}");
    metric_value(admin, None, &series).await
}

/// An agent's count of reloads with `outcome`.
async fn agent_reloads(agent_api: &str, token: &str, outcome: &str) -> Option<u64> {
    let series = format!("lienthong_agent_reloads_total{{outcome=\"{outcome}\"}}");
    metric_value(agent_api, Some(token), &series).await
}

async fn wait_reloads(admin: &str, outcome: &str, count: u64) {
    let mut last = None;
    let seen = wait_until(
        "the reload counted",
        Duration::from_secs(15),
        || async { reloads(admin, outcome).await },
        |n| *n == count,
        &mut last,
    )
    .await;
    assert!(
        seen.is_some(),
        "{outcome} reloads: expected {count}, last {last:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_files_and_a_bad_configuration_is_refused_whole() {
    let world = World::new();
    let (cert, key) = own_broker_files(&world);
    let config_file = world.path("broker.toml");
    std::fs::write(&config_file, "register = []\n").unwrap();
    let admin_port = free_port();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let mut broker = BrokerProcess::prepare(Path::new(BIN), &world, "broker");
    let args = &mut broker.process.args;
    for (flag, value) in [("--cert", &cert), ("--key", &key)] {
        let at = args.iter().position(|a| a == flag).unwrap();
        args[at + 1] = value.display().to_string();
    }
    args.extend([
        "--config".into(),
        config_file.display().to_string(),
        "--admin-listen".into(),
        format!("127.0.0.1:{admin_port}"),
    ]);
    broker.spawn().await;
    let addr: SocketAddr = broker
        .url
        .replace("https://localhost", "127.0.0.1")
        .parse()
        .unwrap();
    let old_der = der_of(&cert);
    assert_eq!(presented_certificate(&world, addr).await, old_der);

    // A key that is not the certificate's, and an agency to register: refused whole.
    let stray = world.ca.issue(&LeafSpec::server(&["localhost"])).unwrap();
    replace_file(&key, stray.key_pem.as_bytes());
    std::fs::write(&config_file, format!("register = [\"{NEW}=Sở Mới\"]\n")).unwrap();
    broker.process.signal("HUP");
    wait_reloads(&admin, "refused", 1).await;
    assert_eq!(reloads(&admin, "ok").await, Some(0));
    assert_eq!(presented_certificate(&world, addr).await, old_der);
    let mut operator = admin_client(&world, &broker.url).await;
    let codes = |listed: Vec<lienthong_proto::pb::AgencyInfo>| {
        listed.into_iter().map(|a| a.code).collect::<Vec<_>>()
    };
    let listed = operator
        .agencies(AgenciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!codes(listed.agencies).contains(&NEW.to_owned()));

    // Fixed: a new certificate with its own key; the same SIGHUP now takes.
    let new_der = rotate_broker_certificate(&world, &cert, &key);
    broker.process.signal("HUP");
    wait_reloads(&admin, "ok", 1).await;
    assert_eq!(presented_certificate(&world, addr).await, new_der);
    let listed = operator
        .agencies(AgenciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(codes(listed.agencies).contains(&NEW.to_owned()));

    // Still serving: SIGHUP did not end it, and it stops cleanly.
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reload_seals_and_connects_with_the_new_key_and_keeps_its_session() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let admin = admin_client(&world, &broker.url).await;
    // A's certificate and key in a folder of their own, replaced later.
    let dir = world.path("agent-tls");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("a.crt"), dir.join("a.key"));
    let (world_cert, world_key) = world.pki.agency(A).unwrap();
    std::fs::copy(world_cert, &cert).unwrap();
    std::fs::copy(world_key, &key).unwrap();
    let ca = world.pki.ca_cert.clone();
    let mut template = world.agent_config(A, &broker.url);
    template.tls = TlsFiles::load(&ca, &cert, &key).unwrap();
    let requests = Arc::new(tokio::sync::Notify::new());
    let mut config = template.clone();
    let (load_cert, load_key) = (cert.clone(), key.clone());
    config.reload = Some(lienthong_agent::ReloadHook {
        requests: requests.clone(),
        load: Arc::new(move || {
            let mut next = template.clone();
            let files = TlsFiles::load(&ca, &load_cert, &load_key);
            Box::pin(async move {
                next.tls = files.map_err(|e| e.to_string())?;
                Ok(lienthong_agent::Reloaded {
                    config: next,
                    keep_signing_key: false,
                })
            })
        }),
    });
    let a = Agent::start(config).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let sealer = |id: String| {
        let mut admin = admin.clone();
        async move {
            let message = admin
                .message(lienthong_proto::pb::MessageRequest { id })
                .await
                .unwrap()
                .into_inner();
            message.envelope.unwrap().cert_chain[0].clone()
        }
    };
    let bindings_of_a = || {
        let mut admin = admin.clone();
        async move {
            admin
                .bindings(lienthong_proto::pb::BindingsRequest { code: A.into() })
                .await
                .unwrap()
                .into_inner()
                .bindings
                .len()
        }
    };
    let before = a.send(&[B], "trước", &[("a.txt", b"one")]).await;
    wait_for_path(&world.inbox_dir(B).join(&before)).await;
    assert_eq!(sealer(before).await, der_of(&cert));
    assert_eq!(bindings_of_a().await, 1);
    let session_since = || {
        let mut admin = admin.clone();
        async move {
            admin
                .queues(QueuesRequest {})
                .await
                .unwrap()
                .into_inner()
                .queues
                .into_iter()
                .find(|q| q.agency == A)
                .unwrap()
                .connected_since_ms
        }
    };
    let since = session_since().await;
    assert!(since > 0);

    // A key that is not the certificate's: refused, and A still seals with the old key.
    let stray = world.ca.issue(&LeafSpec::agency(A)).unwrap();
    let old_key = std::fs::read(&key).unwrap();
    replace_file(&key, stray.key_pem.as_bytes());
    requests.notify_one();
    let metric = |outcome: &'static str| agent_reloads(&a.api, &a.token, outcome);
    let mut last = None;
    let refused = wait_until(
        "the refused reload counted",
        Duration::from_secs(15),
        || metric("refused"),
        |n| *n == 1,
        &mut last,
    )
    .await;
    assert!(refused.is_some(), "last: {last:?}");
    replace_file(&key, &old_key);
    let still_old = a.send(&[B], "vẫn khóa cũ", &[("b.txt", b"two")]).await;
    wait_for_path(&world.inbox_dir(B).join(&still_old)).await;
    assert_eq!(sealer(still_old).await, der_of(&cert));

    // A new certificate and key for A: documents sealed from now on carry it, its
    // submissions connect with it (a second binding, made on first use), and the
    // session opened before carries on.
    let issued = world.ca.issue(&LeafSpec::agency(A)).unwrap();
    replace_file(&key, issued.key_pem.as_bytes());
    replace_file(&cert, issued.cert_pem.as_bytes());
    requests.notify_one();
    let ok = wait_until(
        "the reload counted",
        Duration::from_secs(15),
        || metric("ok"),
        |n| *n == 1,
        &mut last,
    )
    .await;
    assert!(ok.is_some(), "last: {last:?}");
    let after = a.send(&[B], "khóa mới", &[("c.txt", b"three")]).await;
    wait_for_path(&world.inbox_dir(B).join(&after)).await;
    assert_eq!(sealer(after).await, issued.cert_der);
    assert_eq!(bindings_of_a().await, 2);
    assert_eq!(session_since().await, since);

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_real_agent_and_it_keeps_serving() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = AgentProcess::start(Path::new(BIN), &world, A, &broker.url).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let reloads = |outcome: &'static str| agent_reloads(&a.api, &a.token, outcome);
    assert_eq!(reloads("ok").await, Some(0));
    a.process.signal("HUP");
    let mut last = None;
    let ok = wait_until(
        "the reload counted",
        Duration::from_secs(15),
        || reloads("ok"),
        |n| *n == 1,
        &mut last,
    )
    .await;
    assert!(ok.is_some(), "last: {last:?}");
    assert_eq!(reloads("refused").await, Some(0));
    let id = a
        .client
        .send(&lienthong_agent::api_types::SendRequest {
            to: vec![B.into()],
            subject: "sau SIGHUP".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .message_id;
    wait_for_path(&world.inbox_dir(B).join(&id)).await;
    b.stop().await;
    broker.stop().await;
}
