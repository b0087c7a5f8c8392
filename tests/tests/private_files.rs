//! Data at rest is private: after an exchange between real `lienthong` processes,
//! every file and folder under the broker's and the agents' data and inbox folders has
//! no group or other permission bits (umask 0077 at start, explicit modes for the
//! inbox); with `--inbox-group` the inbox is 0750/0640 for that group only; a key file
//! others can read is reported at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use lienthong_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

/// Every path under `root` (itself included) with its mode bits.
fn walk(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        out.push((
            path.clone(),
            meta.permissions().mode() & 0o777,
            meta.is_dir(),
        ));
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_programs_write_is_readable_by_other_users() {
    let world = World::new();
    let mut broker = BrokerProcess::start(Path::new(BIN), &world, "broker").await;
    let a = AgentProcess::start(Path::new(BIN), &world, A, &broker.url).await;
    let b = AgentProcess::start(Path::new(BIN), &world, B, &broker.url).await;
    // A small document and a streamed one (files spooled at the broker and agent).
    let small = send(
        &a,
        &[("qd.pdf", b"%PDF-1.4 bi mat".to_vec())],
        "Tài liệu mật",
    )
    .await;
    let large = send_uploaded(&a, &world, "lon.bin", &vec![7u8; 3 << 20], "Tài liệu lớn").await;
    for id in [&small, &large] {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
        wait_delivered(&a, id).await;
    }
    // A status report back, and a recall (its folder moves to recalled/).
    b.client
        .report(
            &small,
            &lienthong_agent::api_types::ReportRequest {
                status: "03".into(),
                reason: None,
                staff: None,
            },
        )
        .await
        .unwrap();
    a.client.recall(&large, "Gửi nhầm").await.unwrap();
    wait_for_path(&world.inbox_dir(B).join("recalled").join(&large)).await;

    let roots = [
        world.path("broker"),
        world.path(&format!("agent-{A}")),
        world.path(&format!("agent-{B}")),
    ];
    let mut checked = 0;
    for root in &roots {
        for (path, mode, _) in walk(root) {
            assert_eq!(mode & 0o077, 0, "{} is {mode:04o}", path.display());
            checked += 1;
        }
    }
    // The walk saw the exported folders' files, sled's files and the broker's blobs.
    let folder = world.inbox_dir(B).join(&small);
    for name in [
        "qd.pdf",
        "envelope.pb",
        "submission-receipt.pb",
        "delivery-receipt.pb",
        "document.json",
    ] {
        let mode = std::fs::metadata(folder.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    assert_eq!(
        std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(checked > 20, "only {checked} paths checked");

    let status = broker.terminate();
    assert!(status.success());
    drop(a);
    drop(b);
}

async fn send(agent: &AgentProcess, files: &[(&str, Vec<u8>)], subject: &str) -> String {
    use base64::Engine as _;
    let request = lienthong_agent::api_types::SendRequest {
        to: vec![B.into()],
        subject: subject.into(),
        attachments: files
            .iter()
            .map(
                |(name, bytes)| lienthong_agent::api_types::AttachmentUpload {
                    name: (*name).into(),
                    media_type: None,
                    content_base64: base64::engine::general_purpose::STANDARD.encode(bytes),
                    upload_id: None,
                },
            )
            .collect(),
        ..Default::default()
    };
    agent.client.send(&request).await.unwrap().message_id
}

/// A streamed document: the file goes through the upload API, as `lienthong send`
/// sends large files.
async fn send_uploaded(
    agent: &AgentProcess,
    world: &World,
    name: &str,
    bytes: &[u8],
    subject: &str,
) -> String {
    let path = world.path(name);
    std::fs::write(&path, bytes).unwrap();
    let uploaded = agent.client.upload(&path, |_| {}).await.unwrap();
    let request = lienthong_agent::api_types::SendRequest {
        to: vec![B.into()],
        subject: subject.into(),
        attachments: vec![lienthong_agent::api_types::AttachmentUpload {
            name: name.into(),
            media_type: None,
            content_base64: String::new(),
            upload_id: Some(uploaded.upload_id),
        }],
        ..Default::default()
    };
    agent.client.send(&request).await.unwrap().message_id
}

async fn wait_delivered(agent: &AgentProcess, id: &str) {
    let mut last = None;
    let found = wait_until(
        "delivered",
        std::time::Duration::from_secs(60),
        || {
            let client = agent.client.clone();
            let id = id.to_owned();
            async move { client.status(&id).await.ok() }
        },
        |v| v.recipients.iter().all(|r| r.state == "delivered"),
        &mut last,
    )
    .await;
    assert!(found.is_some(), "not delivered: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_group_reads_the_inbox_and_nobody_else_does_and_readable_keys_are_reported() {
    let world = World::new();
    let broker = BrokerProcess::start(Path::new(BIN), &world, "broker").await;
    let a = AgentProcess::start(Path::new(BIN), &world, A, &broker.url).await;
    // This process's own group: the only one it can certainly give files to.
    let probe = world.path("probe");
    std::fs::write(&probe, b"").unwrap();
    let gid = std::fs::metadata(&probe).unwrap().gid();

    // B's key copied world-readable: the agent still starts, and says so.
    let (_, key) = world.pki.agency(B).unwrap();
    let loose_key = world.path("loose-b.key");
    std::fs::copy(key, &loose_key).unwrap();
    std::fs::set_permissions(&loose_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut b = AgentProcess::prepare(Path::new(BIN), &world, B, &broker.url);
    let key_flag = b.process.args.iter().position(|a| a == "--key").unwrap();
    b.process.args[key_flag + 1] = loose_key.display().to_string();
    b.process.args.push("--inbox-group".into());
    b.process.args.push(gid.to_string());
    b.process.spawn_with(Stdio::piped(), Some("warn")).await;

    let id = send(&a, &[("qd.pdf", b"noi dung".to_vec())], "Cho nhóm cổng").await;
    let folder = world.inbox_dir(B).join(&id);
    wait_for_path(&folder).await;
    for (path, mode, is_dir) in walk(&world.inbox_dir(B)) {
        let expected = if is_dir { 0o750 } else { 0o640 };
        assert_eq!(mode, expected, "{}", path.display());
        assert_eq!(
            std::fs::metadata(&path).unwrap().gid(),
            gid,
            "{}",
            path.display()
        );
    }
    // The data folder stays private to the agent's user.
    for (path, mode, _) in walk(&world.path(&format!("agent-{B}/data"))) {
        assert_eq!(mode & 0o077, 0, "{} is {mode:04o}", path.display());
    }

    let mut stderr = b.process.take_stderr().unwrap();
    let status = b.process.terminate();
    assert!(status.success(), "{status:?}");
    let mut text = String::new();
    stderr.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("readable by other users")
            && text.contains("loose-b.key")
            && text.contains("0644"),
        "{text}"
    );
    drop(a);
    drop(broker);
}
