//! Tests that run the real `lienthong` binary: the broker killed with SIGKILL and
//! restarted, a clean SIGTERM shutdown, and the `verify` and `admin` commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use lienthong_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_with_undelivered_documents_delivers_each_exactly_once_after_restart() {
    let world = World::new();
    let mut broker = BrokerProcess::start(Path::new(BIN), &world, "broker").await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;

    let mut ids = Vec::new();
    for i in 0..20u32 {
        let body = format!("văn bản số {i}").into_bytes();
        ids.push((
            a.send(&[B], &format!("Tài liệu {i}"), &[("vb.txt", &body)])
                .await,
            body,
        ));
    }
    for (id, _) in &ids {
        a.wait_status(id, "accepted by the broker", |v| {
            v.outbox_state == "submitted"
        })
        .await;
    }
    // Every document has a submission receipt: the broker promised them. Kill it hard.
    broker.kill();
    broker.spawn().await;

    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    for (id, _) in &ids {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    let mut expected: Vec<String> = ids.iter().map(|(id, _)| id.clone()).collect();
    expected.sort();
    assert_eq!(inbox_entries(&world.inbox_dir(B)), expected);
    for (id, body) in &ids {
        assert_eq!(
            &std::fs::read(world.inbox_dir(B).join(id).join("vb.txt")).unwrap(),
            body
        );
        a.wait_status(id, "delivery receipt back at A", |v| {
            v.recipients
                .iter()
                .all(|r| r.state == "delivered" && r.receipt_verified == Some(true))
        })
        .await;
    }
    assert_eq!(b.client.inbox().await.unwrap().len(), ids.len());

    // Kill again after delivery and restart: nothing is delivered a second time.
    broker.kill();
    broker.spawn().await;
    let extra = a.send(&[B], "Sau lần khởi động lại", &[]).await;
    wait_for_path(&world.inbox_dir(B).join(&extra)).await;
    assert_eq!(inbox_entries(&world.inbox_dir(B)).len(), ids.len() + 1);

    // SIGTERM: a clean exit with status 0.
    let status = broker.terminate();
    assert!(status.success(), "broker exit status {status:?}");
    a.stop().await;
    b.stop().await;
}

fn lienthong(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_accepts_an_exported_document_and_rejects_a_changed_attachment_byte() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    let id = a
        .send(
            &[B],
            "Kiểm tra ngoại tuyến",
            &[("qd.pdf", b"%PDF-1.4 quyet dinh")],
        )
        .await;
    let folder = world.inbox_dir(B).join(&id);
    wait_for_path(&folder).await;
    let ca = world.pki.ca_cert.display().to_string();
    let dir = folder.display().to_string();

    let ok = lienthong(&["verify", &dir, "--ca", &ca]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains(&id));

    let path = folder.join("qd.pdf");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let bad = lienthong(&["verify", &dir, "--ca", &ca]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("SHA-256"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // Another CA does not vouch for the signer.
    let other = world.path("other-pki");
    let made = lienthong(&["pki", "dev", "--out", &other.display().to_string()]);
    assert_eq!(made.status.code(), Some(0));
    std::fs::write(&path, b"%PDF-1.4 quyet dinh").unwrap();
    let foreign = lienthong(&[
        "verify",
        &dir,
        "--ca",
        &other.join("ca.crt").display().to_string(),
    ]);
    assert_eq!(foreign.status.code(), Some(1));

    // Bad usage exits 2.
    let usage = lienthong(&["verify", &dir]);
    assert_eq!(usage.status.code(), Some(2));

    // The same from a --config file; an unknown key is named and exits 2.
    let config = world.path("verify.toml");
    std::fs::write(&config, format!("ca = {:?}\n", ca)).unwrap();
    let from_file = lienthong(&["verify", &dir, "--config", &config.display().to_string()]);
    assert_eq!(
        from_file.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&from_file.stderr)
    );
    std::fs::write(&config, format!("ca = {:?}\ncerts = 1\n", ca)).unwrap();
    let typo = lienthong(&["verify", &dir, "--config", &config.display().to_string()]);
    assert_eq!(typo.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&typo.stderr).contains("certs"),
        "{}",
        String::from_utf8_lossy(&typo.stderr)
    );

    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_queues_shows_depth_and_refuses_agency_certificates() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let first = a.send(&[B], "Một", &[]).await;
    let second = a.send(&[B], "Hai", &[]).await;
    for id in [&first, &second] {
        a.wait_status(id, "accepted", |v| v.outbox_state == "submitted")
            .await;
    }
    let ca = world.pki.ca_cert.display().to_string();
    let url = broker.url.clone();
    let out = tokio::task::spawn_blocking({
        let (cert, key) = (
            world.pki.operator_cert.display().to_string(),
            world.pki.operator_key.display().to_string(),
        );
        let (ca, url) = (ca.clone(), url.clone());
        move || {
            lienthong(&[
                "admin", "--broker", &url, "--ca", &ca, "--cert", &cert, "--key", &key, "queues",
                "--json",
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row_b = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agency"] == B)
        .unwrap();
    assert_eq!(row_b["pending"], 2);
    assert_eq!(row_b["connected"], false);
    let row_a = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["agency"] == A)
        .unwrap();
    assert_eq!(row_a["pending"], 0);
    assert_eq!(row_a["connected"], true);

    let (cert, key) = world.pki.agency(A).unwrap();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let refused = tokio::task::spawn_blocking(move || {
        lienthong(&[
            "admin", "--broker", &url, "--ca", &ca, "--cert", &cert, "--key", &key, "queues",
        ])
    })
    .await
    .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    a.stop().await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_or_corrupt_data_directories_are_refused_naming_the_path() {
    let world = World::new();
    let base = [
        "broker",
        "--listen",
        "127.0.0.1:0",
        "--ca",
        &world.pki.ca_cert.display().to_string(),
        "--cert",
        &world.pki.broker_cert.display().to_string(),
        "--key",
        &world.pki.broker_key.display().to_string(),
    ]
    .map(String::from);
    let run = |data: &Path| {
        let mut args: Vec<String> = base.to_vec();
        args.push("--data".into());
        args.push(data.display().to_string());
        Command::new(BIN).args(&args).output().unwrap()
    };

    // Someone else's files.
    let foreign = world.path("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"not a store").unwrap();
    let out = run(&foreign);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&foreign.display().to_string()) && stderr.contains("not a lienthong"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&foreign).unwrap().count(),
        1,
        "nothing was written into it"
    );

    // A real store whose data file was overwritten.
    let mut broker = BrokerProcess::start(Path::new(BIN), &world, "store").await;
    assert!(broker.terminate().success());
    let db = world.path("store").join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(
        &db,
        (0..len).map(|i| (i * 31 % 253) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    let out = run(&world.path("store"));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&world.path("store").display().to_string()) && stderr.contains("corrupt"),
        "{stderr}"
    );
}
