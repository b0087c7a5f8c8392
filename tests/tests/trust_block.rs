//! The operator block list by SPKI hash (issue 12): a block is effective at once: the
//! blocked agency's open delivery session ends, its open submission is cancelled with
//! nothing stored, its next calls (session, Submit) are refused and its next TLS
//! handshake fails; the block and its
//! lifting are audited; unblocking restores delivery of what queued meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lienthong_proto::agency::spki_sha256;
use lienthong_proto::document::seal;
use lienthong_proto::pb::{
    self, AuditTailRequest, BlockListRequest, MessageRequest, QueuesRequest, SubmitFrame,
    admin_client::AdminClient, submit_frame::Frame,
};
use lienthong_tests::*;
use tonic::Code;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

async fn connected(admin: &mut AdminClient<Channel>, code: &str) -> bool {
    admin
        .queues(QueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues
        .iter()
        .any(|q| q.agency == code && q.connected)
}

async fn wait_connected(admin: &AdminClient<Channel>, code: &str, want: bool) {
    let mut last = None;
    let found = wait_until(
        if want { "connected" } else { "disconnected" },
        Duration::from_secs(20),
        || {
            let mut admin = admin.clone();
            let code = code.to_owned();
            async move { Some(connected(&mut admin, &code).await) }
        },
        |now| *now == want,
        &mut last,
    )
    .await;
    assert!(found.is_some(), "{code}: connected should become {want}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_ends_the_session_and_open_calls_at_once_and_unblock_restores() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    // One open submission per agency: a probe refused with RESOURCE_EXHAUSTED proves
    // that the held-open submission below is counted, i.e. in flight.
    config.max_submissions_per_agency = 1;
    let broker = Broker::start(config).await;
    let mut admin = admin_client(&world, &broker.url).await;
    let a = Agent::start(world.agent_config(A, &broker.url)).await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    wait_connected(&admin, B, true).await;

    // B holds a submission open: its envelope is in, its attachment never comes.
    let b_tls = world.agency_tls(B);
    let key_b = b_tls.signing_key().unwrap();
    let held = header(B, &[A], &[("held.txt", b"never sent")]);
    let held_id = held.message_id.clone();
    let (frames, rx) = tokio::sync::mpsc::channel::<SubmitFrame>(4);
    frames
        .send(SubmitFrame {
            frame: Some(Frame::Envelope(seal(&held, &key_b).unwrap())),
        })
        .await
        .unwrap();
    let mut b_client = exchange_client(&broker.url, b_tls.client_config("localhost"))
        .await
        .unwrap();
    let open = tokio::spawn({
        let mut client = b_client.clone();
        async move {
            client
                .submit(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }
    });
    let mut last = None;
    let in_flight = wait_until(
        "the held submission counted",
        Duration::from_secs(20),
        || {
            let mut probe = b_client.clone();
            async move {
                let empty: Vec<SubmitFrame> = Vec::new();
                Some(probe.submit(tokio_stream::iter(empty)).await.map(|_| ()))
            }
        },
        |r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted),
        &mut last,
    )
    .await;
    assert!(in_flight.is_some(), "{last:?}");

    // The operator blocks B's certificate (the file; the CLI hashes its SPKI).
    let b_cert = world.pki.agency(B).unwrap().0.to_owned();
    let b_der = lienthong_proto::signing::certs_from_pem(&std::fs::read(&b_cert).unwrap(), "c")
        .unwrap()
        .remove(0);
    let b_hash = hex(spki_sha256(&b_der).unwrap());
    let bin = std::path::Path::new(BIN);
    let out = run_admin_cli(
        bin,
        &world,
        &broker.url,
        &["block", b_cert.to_str().unwrap(), "--reason", "khóa bị lộ"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&b_hash));

    // At once: the open submission ended, nothing of it stored...
    let ended = tokio::time::timeout(Duration::from_secs(10), open)
        .await
        .expect("the open submission ends at once")
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(
        ended.message().contains("nothing was stored"),
        "{}",
        ended.message()
    );
    let missing = admin
        .message(MessageRequest { id: held_id })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    // ...the session ended and the agent cannot open another...
    wait_connected(&admin, B, false).await;
    let refused = b_client
        .directory(pb::DirectoryRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("blocked"),
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("khóa bị lộ"),
        "{}",
        refused.message()
    );
    // ...and its next Submit is refused: on the connection opened before the block by
    // the registry, on a new one already by its TLS handshake (whose failure shows on
    // the first call with a code that varies, STACK.md: "failed, nothing stored").
    let doc = header(B, &[A], &[]);
    let refused = submit(&mut b_client, seal(&doc, &key_b).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let doc = header(B, &[A], &[]);
    let fresh = exchange_client(&broker.url, b_tls.client_config("localhost")).await;
    if let Ok(mut fresh) = fresh {
        let refused = submit(&mut fresh, seal(&doc, &key_b).unwrap(), &[]).await;
        assert!(refused.is_err(), "a blocked certificate's handshake fails");
    }
    let missing = admin
        .message(MessageRequest { id: doc.message_id })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // The list shows it, bound to B.
    let blocked = admin
        .block_list(BlockListRequest {})
        .await
        .unwrap()
        .into_inner()
        .blocked;
    assert_eq!(blocked.len(), 1, "{blocked:?}");
    assert_eq!(hex(&blocked[0].spki_sha256), b_hash);
    assert_eq!(blocked[0].code, B);
    assert_eq!(blocked[0].reason, "khóa bị lộ");

    // A document for B waits in its queue meanwhile.
    let id = a.send(&[B], "trong lúc bị chặn", &[("x.txt", b"x")]).await;

    // Unblocked: the agent's next reconnection is accepted and the document delivered.
    let out = run_admin_cli(bin, &world, &broker.url, &["unblock", &b_hash]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_admin_cli(bin, &world, &broker.url, &["unblock", &b_hash]).await;
    assert_eq!(out.status.code(), Some(1), "not blocked any more");
    a.wait_status(&id, "delivered to B after unblock", |v| {
        v.recipients.iter().all(|r| r.state == "delivered")
    })
    .await;
    let out = run_admin_cli(bin, &world, &broker.url, &["--json", "blocked"]).await;
    assert!(out.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 0, "{rows}");

    // Both are audited, with the operator and the reason.
    let audit = admin
        .audit_tail(AuditTailRequest { n: 100 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let blocked = audit
        .iter()
        .find(|e| e.kind == "certificate_blocked")
        .expect("block audited");
    assert_eq!(blocked.agency, B);
    assert!(blocked.detail.contains(&b_hash) && blocked.detail.contains("khóa bị lộ"));
    assert!(
        blocked.detail.contains("operator operator"),
        "{}",
        blocked.detail
    );
    assert!(
        audit
            .iter()
            .any(|e| e.kind == "certificate_unblocked" && e.agency == B),
        "{audit:?}"
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}
