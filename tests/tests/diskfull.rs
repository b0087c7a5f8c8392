//! Disk full: the broker's store on a small tmpfs made by the test. Submissions that
//! would eat into the free-space reserve are refused with RESOURCE_EXHAUSTED, the
//! broker reports not-ready, documents accepted earlier still deliver, and once space is
//! freed submissions succeed again. Skipped, with the reason printed, only where the
//! machine forbids mounting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use lienthong_proto::document::seal;
use lienthong_proto::pb::HealthRequest;
use lienthong_tests::*;
use tonic::Code;

/// A tmpfs mounted for the test, unmounted at drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Self(dir.to_owned()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_refuses_new_documents_delivers_old_ones_and_recovers_when_space_returns() {
    let world = World::new();
    let mount = world.path("small-disk");
    let _tmpfs = match Tmpfs::mount(&mount, "40m") {
        Ok(tmpfs) => tmpfs,
        Err(reason) => {
            eprintln!("SKIPPED: this machine forbids mounting a tmpfs: {reason}");
            return;
        }
    };
    // Space taken by something else on the same disk, freed later by the "operator".
    let filler = mount.join("filler.bin");
    std::fs::write(&filler, vec![0u8; 14 << 20]).unwrap();

    let mut config = world.broker_config("unused");
    config.data_dir = mount.join("broker");
    config.min_free_bytes = 8 << 20;
    let broker = Broker::start(config).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut client = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    let mut admin = admin_client(&world, &broker.url).await;
    assert!(
        admin
            .health(HealthRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );

    // Fill the disk with documents for B (offline) until the broker refuses one.
    let mut accepted = Vec::new();
    let mut refusal = None;
    for n in 0..60u32 {
        let body: Vec<u8> = (0..(1u32 << 20)).map(|i| (i ^ n) as u8).collect();
        let h = header(A, &[B], &[("scan.pdf", &body)]);
        match submit(&mut client, seal(&h, &key).unwrap(), &[&body]).await {
            Ok(_) => accepted.push((h.message_id, body)),
            Err(status) => {
                refusal = Some((h.message_id, status));
                break;
            }
        }
    }
    let (refused_id, status) = refusal.expect("the small disk filled up within 60 MiB");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("min_free_bytes"),
        "{}",
        status.message()
    );
    assert!(accepted.len() >= 2, "only {} accepted", accepted.len());
    let health = admin.health(HealthRequest {}).await.unwrap().into_inner();
    assert!(!health.ready, "{health:?}");
    assert!(
        health.store_writable,
        "the reserve kept sled away from ENOSPC"
    );
    eprintln!(
        "disk full after {} documents of 1 MiB: {} bytes free, reserve {}",
        accepted.len(),
        health.free_bytes,
        health.min_free_bytes
    );

    // Everything accepted before still reaches B, byte for byte.
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    for (id, body) in &accepted {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
        assert_eq!(
            &std::fs::read(world.inbox_dir(B).join(id).join("scan.pdf")).unwrap(),
            body
        );
    }
    assert_eq!(inbox_entries(&world.inbox_dir(B)).len(), accepted.len());

    // Space returns: the broker is ready again and takes the refused document.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        admin
            .health(HealthRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    let body: Vec<u8> = vec![42u8; 1 << 20];
    let h = header(A, &[B], &[("scan.pdf", &body)]);
    submit(&mut client, seal(&h, &key).unwrap(), &[&body])
        .await
        .unwrap();
    wait_for_path(&world.inbox_dir(B).join(&h.message_id)).await;
    let status = client
        .status(lienthong_proto::pb::StatusRequest {
            message_id: refused_id,
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::NotFound,
        "the refused document was not stored"
    );
    b.stop().await;
    broker.stop().await;
}
