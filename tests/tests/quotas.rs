//! One agency must not fill or stall the broker: declared sizes are summed with checked
//! arithmetic and bounded per attachment, streamed bytes are counted as they arrive,
//! open submissions and reserved bytes are capped per agency, stalled streams time out
//! and their partial uploads are swept, suspension cancels open submissions, each
//! sender's share of a recipient's queue is capped, the expiry and creation time a
//! sender may set are bounded, and an operator can purge one sender's queued documents
//! to one recipient. Every refusal is checked for its exact code and the limit it names,
//! and for storing nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use lienthong_broker::BrokerConfig;
use lienthong_proto::document::seal;
use lienthong_proto::pb::{
    self, AttachmentChunk, AuditTailRequest, DeadLettersRequest, DeliveryState, MessageRequest,
    PurgeRequest, ResumeAgencyRequest, StatusRequest, SubmitFrame, SubmitResponse,
    SuspendAgencyRequest, submit_frame::Frame,
};
use lienthong_proto::signing::Domain;
use lienthong_tests::*;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");
use prost::Message;
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const MIB: usize = 1024 * 1024;
const CHUNK: usize = 256 * 1024;

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

fn partial_root(world: &World) -> PathBuf {
    world.path("broker").join("lienthong-blobs").join("partial")
}

/// Folders (partial uploads) directly under `dir`; 0 when it does not exist.
fn folders_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
        .unwrap_or(0)
}

async fn wait_folders(dir: &Path, want: usize, what: &str) {
    let mut last = None;
    let found = wait_until(
        what,
        Duration::from_secs(60),
        || async move { Some(folders_under(dir)) },
        |n| *n == want,
        &mut last,
    )
    .await;
    assert!(
        found.is_some(),
        "{what}: {last:?} folders under {}",
        dir.display()
    );
}

fn envelope_frame(envelope: pb::Signed) -> SubmitFrame {
    SubmitFrame {
        frame: Some(Frame::Envelope(envelope)),
    }
}

fn chunk_frame(index: u32, offset: u64, data: &[u8]) -> SubmitFrame {
    SubmitFrame {
        frame: Some(Frame::Chunk(AttachmentChunk {
            attachment_index: index,
            data: data.to_vec().into(),
            offset,
        })),
    }
}

/// The frames of attachment `index` from `from` to its end, in chunks.
fn chunks_of(index: u32, bytes: &[u8], from: usize) -> Vec<SubmitFrame> {
    bytes[from..]
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, part)| chunk_frame(index, (from + i * CHUNK) as u64, part))
        .collect()
}

/// A Submit stream on its own connection that the test feeds frame by frame.
struct OpenStream {
    tx: Option<mpsc::Sender<SubmitFrame>>,
    call: tokio::task::JoinHandle<Result<SubmitResponse, tonic::Status>>,
}

impl OpenStream {
    async fn open(world: &World, url: &str, code: &str, frames: Vec<SubmitFrame>) -> Self {
        let mut client = exchange_client(url, world.agency_tls(code).client_config("localhost"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(64);
        for frame in frames {
            tx.send(frame).await.unwrap();
        }
        let call = tokio::spawn(async move {
            client
                .submit(ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        });
        Self { tx: Some(tx), call }
    }

    /// The broker's answer, with the stream still open on our side.
    async fn answer(&mut self) -> Result<SubmitResponse, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(60), &mut self.call)
            .await
            .expect("the broker answers within 60 s")
            .unwrap()
    }

    /// Ends the stream from our side (the sender broke off) and returns the answer.
    async fn close(mut self) -> Result<SubmitResponse, tonic::Status> {
        self.tx.take();
        self.answer().await
    }
}

async fn client_of(
    world: &World,
    url: &str,
    code: &str,
) -> pb::exchange_client::ExchangeClient<tonic::transport::Channel> {
    exchange_client(url, world.agency_tls(code).client_config("localhost"))
        .await
        .unwrap()
}

/// Asserts the broker holds nothing of `message_id` (asked as an operator, who sees
/// every document).
async fn assert_not_stored(world: &World, url: &str, message_id: &str) {
    let mut admin = admin_client(world, url).await;
    let status = admin
        .message(MessageRequest {
            id: message_id.to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{message_id}: {status:?}");
    assert!(
        !world
            .path("broker")
            .join("lienthong-blobs")
            .join(message_id)
            .exists(),
        "no attachment folder for {message_id}"
    );
}

#[track_caller]
fn assert_refused(result: Result<SubmitResponse, tonic::Status>, code: Code, names: &[&str]) {
    let status = result.expect_err("the submission is refused");
    assert_eq!(status.code(), code, "{status:?}");
    for name in names {
        assert!(
            status.message().contains(name),
            "{:?} does not name {name}",
            status.message()
        );
    }
}

fn config(world: &World) -> BrokerConfig {
    let mut config = world.broker_config("broker");
    config.max_document_bytes = 3 * MIB as u64;
    config
}

/// A header whose attachments declare `sizes` (digests of nothing), signed by hand
/// so that the broker, not the sender's own header rules, is what refuses it.
fn hand_signed(world: &World, sizes: &[u64]) -> (String, pb::Signed) {
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut h = header(A, &[B], &[]);
    h.attachments = sizes
        .iter()
        .enumerate()
        .map(|(i, size)| pb::AttachmentInfo {
            name: format!("scan-{i}.pdf"),
            media_type: "application/pdf".into(),
            size: *size,
            sha256: vec![7; 32],
        })
        .collect();
    let envelope = key
        .sign(Domain::DocumentHeader, h.encode_to_vec().into())
        .unwrap();
    (h.message_id, envelope)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_sizes_that_overflow_or_exceed_the_limit_are_refused_before_any_byte_is_stored() {
    let world = World::new();
    let broker = Broker::start(config(&world)).await;
    let limit = 3 * MIB as u64;
    let near = 1u64 << 63;
    let cases: Vec<(Vec<u64>, Code, Vec<&str>)> = vec![
        // Wrapping sums: each was a tiny document before the fix.
        (
            vec![near, near],
            Code::InvalidArgument,
            vec!["attachments.size"],
        ),
        (
            vec![u64::MAX, 1],
            Code::InvalidArgument,
            vec!["attachments.size"],
        ),
        (
            vec![near + 5, near - 4, 1],
            Code::InvalidArgument,
            vec!["attachments.size"],
        ),
        // One attachment over the limit, alone or with a sum that still fits.
        (
            vec![u64::MAX],
            Code::ResourceExhausted,
            vec!["attachment 0", "max_document_bytes"],
        ),
        (
            vec![1, limit + 1],
            Code::ResourceExhausted,
            vec!["attachment 1", "max_document_bytes"],
        ),
        (
            vec![near - 1, 1],
            Code::ResourceExhausted,
            vec!["attachment 0", "max_document_bytes"],
        ),
        // Each within the limit, the total over it.
        (
            vec![2 * MIB as u64, MIB as u64 + 1],
            Code::ResourceExhausted,
            vec!["total", "max_document_bytes"],
        ),
    ];
    for (sizes, code, names) in cases {
        let (id, envelope) = hand_signed(&world, &sizes);
        // Bytes follow the envelope, as an attacker would stream them.
        let frames = vec![
            envelope_frame(envelope),
            chunk_frame(0, 0, &random_bytes(CHUNK)),
        ];
        let mut stream = OpenStream::open(&world, &broker.url, A, frames).await;
        // Answered while the stream is still open: refused before reading on.
        let answer = stream.answer().await;
        assert_refused(answer, code, &names);
        assert_not_stored(&world, &broker.url, &id).await;
        assert_eq!(
            folders_under(&partial_root(&world)),
            0,
            "{sizes:?}: no partial upload"
        );
    }

    // At the limit and one below it: accepted (streamed).
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut client = client_of(&world, &broker.url, A).await;
    for attachments in [
        vec![random_bytes(3 * MIB)],
        vec![random_bytes(3 * MIB - 2), random_bytes(1)],
    ] {
        let named: Vec<(String, &[u8])> = attachments
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("a{i}.bin"), b.as_slice()))
            .collect();
        let refs: Vec<(&str, &[u8])> = named.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let h = header(A, &[B], &refs);
        let slices: Vec<&[u8]> = attachments.iter().map(Vec::as_slice).collect();
        let response = submit(&mut client, seal(&h, &key).unwrap(), &slices)
            .await
            .unwrap();
        assert!(!response.duplicate);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sending_more_than_declared_is_refused_at_once_and_its_partial_removed() {
    let world = World::new();
    let broker = Broker::start(config(&world)).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let bytes = random_bytes(MIB + MIB / 2);

    // 1. One chunk past the declared end of the only attachment.
    let h = header(A, &[B], &[("scan.pdf", &bytes)]);
    let mut frames = vec![envelope_frame(seal(&h, &key).unwrap())];
    frames.extend(chunks_of(0, &bytes, 0));
    frames.push(chunk_frame(0, bytes.len() as u64, &[1u8; 1024]));
    let mut stream = OpenStream::open(&world, &broker.url, A, frames).await;
    assert_refused(
        stream.answer().await,
        Code::InvalidArgument,
        &["more attachment bytes than the 1572864"],
    );
    assert_not_stored(&world, &broker.url, &h.message_id).await;
    wait_folders(&partial_root(&world), 0, "the partial upload is removed").await;

    // 2. The same chunk again and again: nothing new on disk, but more bytes sent than
    //    the header declares in total, so the stream cannot be kept alive forever.
    let h = header(A, &[B], &[("scan.pdf", &bytes)]);
    let mut frames = vec![envelope_frame(seal(&h, &key).unwrap())];
    for _ in 0..7 {
        frames.push(chunk_frame(0, 0, &bytes[..CHUNK]));
    }
    let mut stream = OpenStream::open(&world, &broker.url, A, frames).await;
    assert_refused(
        stream.answer().await,
        Code::InvalidArgument,
        &["more attachment bytes than the", "declares"],
    );
    assert_not_stored(&world, &broker.url, &h.message_id).await;
    wait_folders(&partial_root(&world), 0, "the partial upload is removed").await;

    // 3. Exactly the declared bytes: accepted.
    let h = header(A, &[B], &[("scan.pdf", &bytes)]);
    let mut client = client_of(&world, &broker.url, A).await;
    submit(&mut client, seal(&h, &key).unwrap(), &[&bytes])
        .await
        .unwrap();
    broker.stop().await;
}

/// A streamed document of `len` random bytes from `sender` to B: its id and the frames
/// of its envelope and first `sent` bytes.
fn streamed_start(
    world: &World,
    sender: &str,
    len: usize,
    sent: usize,
) -> (String, Vec<SubmitFrame>, Vec<u8>) {
    let key = world.agency_tls(sender).signing_key().unwrap();
    let bytes = random_bytes(len);
    let h = header(sender, &[B], &[("scan.pdf", &bytes)]);
    let mut frames = vec![envelope_frame(seal(&h, &key).unwrap())];
    frames.extend(chunks_of(0, &bytes[..sent], 0));
    (h.message_id, frames, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_submissions_and_reserved_bytes_are_capped_per_agency_and_released_when_streams_end() {
    let world = World::new();
    let mut config = config(&world);
    config.max_submissions_per_agency = 3;
    config.max_reserved_bytes_per_agency = 5 * MIB as u64;
    let broker = Broker::start(config).await;
    let partials = partial_root(&world);

    // Two open streams of 1.5 MiB each, stopped after 100 KiB: about 3 MiB reserved.
    let mut open = Vec::new();
    for _ in 0..2 {
        let (_, frames, _) = streamed_start(&world, A, MIB + MIB / 2, 100 * 1024);
        open.push(OpenStream::open(&world, &broker.url, A, frames).await);
    }
    wait_folders(&partials, 2, "two uploads open").await;

    // 2 MiB more would reserve over 5 MiB.
    let (id, frames, _) = streamed_start(&world, A, 2 * MIB, 0);
    let mut refused = OpenStream::open(&world, &broker.url, A, frames).await;
    assert_refused(
        refused.answer().await,
        Code::ResourceExhausted,
        &["max_reserved_bytes_per_agency", "5242880"],
    );
    assert_not_stored(&world, &broker.url, &id).await;

    // 1.2 MiB fits: the third open stream.
    let (_, frames, _) = streamed_start(&world, A, MIB + MIB / 5, 100 * 1024);
    open.push(OpenStream::open(&world, &broker.url, A, frames).await);
    wait_folders(&partials, 3, "three uploads open").await;

    // A fourth submission, even a small one, is over the count.
    let key = world.agency_tls(A).signing_key().unwrap();
    let small = header(A, &[B], &[("note.txt", b"ok")]);
    let mut client = client_of(&world, &broker.url, A).await;
    assert_refused(
        submit(&mut client, seal(&small, &key).unwrap(), &[b"ok"]).await,
        Code::ResourceExhausted,
        &["max_submissions_per_agency", "3"],
    );
    assert_not_stored(&world, &broker.url, &small.message_id).await;

    // Other agencies are not affected.
    let key_c = world.agency_tls(C).signing_key().unwrap();
    let from_c = header(C, &[B], &[("c.txt", b"from C")]);
    let mut client_c = client_of(&world, &broker.url, C).await;
    submit(&mut client_c, seal(&from_c, &key_c).unwrap(), &[b"from C"])
        .await
        .unwrap();

    // The senders break off: each ends short of its declared size, the slots and the
    // reservations are released, and the partial uploads stay for a resume.
    for stream in open {
        assert_refused(
            stream.close().await,
            Code::InvalidArgument,
            &["bytes received"],
        );
    }
    assert_eq!(folders_under(&partials), 3, "kept for a resume");
    let (id, mut frames, bytes) = streamed_start(&world, A, 2 * MIB + MIB / 2, 0);
    frames.extend(chunks_of(0, &bytes, 0));
    let done = OpenStream::open(&world, &broker.url, A, frames).await;
    done.close().await.unwrap();
    let mut admin = admin_client(&world, &broker.url).await;
    admin.message(MessageRequest { id }).await.unwrap();

    // Broken-off uploads count until swept: 2.75 MiB left of a 3 MiB document, plus
    // the 300 KiB above, leave no room for 2 MiB more; a resume of that same upload
    // is not counted against itself and completes it.
    let (big_id, frames, big) = streamed_start(&world, A, 3 * MIB, 11 * CHUNK);
    let envelope = frames[0].clone();
    OpenStream::open(&world, &broker.url, A, frames)
        .await
        .close()
        .await
        .unwrap_err();
    let (id, frames, _) = streamed_start(&world, A, 2 * MIB, 0);
    assert_refused(
        OpenStream::open(&world, &broker.url, A, frames)
            .await
            .close()
            .await,
        Code::ResourceExhausted,
        &["unfinished uploads", "max_reserved_bytes_per_agency"],
    );
    assert_not_stored(&world, &broker.url, &id).await;
    let mut resume = vec![envelope];
    resume.extend(chunks_of(0, &big, 11 * CHUNK));
    OpenStream::open(&world, &broker.url, A, resume)
        .await
        .close()
        .await
        .unwrap();
    admin.message(MessageRequest { id: big_id }).await.unwrap();
    broker.stop().await;
}

/// The `lienthong_broker_partial_upload_bytes` gauge.
async fn partial_metric(admin_url: &str) -> Option<u64> {
    let text = reqwest::get(format!("{admin_url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("lienthong_broker_partial_upload_bytes "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_time_out_release_their_slot_and_stale_partials_are_swept() {
    let world = World::new();
    let partials = partial_root(&world);
    let mut config = config(&world);
    config.max_submissions_per_agency = 1;
    config.stall_timeout = Duration::from_secs(2);
    config.partial_sweep_interval = Duration::from_millis(500);
    // The store is created by a first run; then a leftover of an earlier upload,
    // untouched for an hour, is put in place: swept at the next start.
    Broker::start(config.clone()).await.stop().await;
    let stale = partials.join(format!("{A}-{}", "ab".repeat(32)));
    std::fs::create_dir_all(&stale).unwrap();
    let file = std::fs::File::create(stale.join("0")).unwrap();
    file.set_len(4096).unwrap();
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(file);
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    assert_eq!(folders_under(&partials), 1);
    let (broker, admin_url) = Broker::start_with_admin(config).await;
    wait_folders(&partials, 0, "the stale leftover is swept at start").await;

    // A stream that sends its envelope and 100 KiB, then nothing (the sender holds it
    // open): ended with the limit named, nothing stored, its partial upload removed.
    let (id, frames, _) = streamed_start(&world, A, 2 * MIB, 100 * 1024);
    let mut stalled = OpenStream::open(&world, &broker.url, A, frames).await;
    assert_refused(
        stalled.answer().await,
        Code::Unavailable,
        &["stall_timeout"],
    );
    assert_not_stored(&world, &broker.url, &id).await;
    wait_folders(&partials, 0, "the stalled upload is removed").await;

    // A stream that never sends its envelope times out too.
    let mut silent = OpenStream::open(&world, &broker.url, A, Vec::new()).await;
    assert_refused(silent.answer().await, Code::Unavailable, &["stall_timeout"]);

    // The slot is free again (the limit is 1): a whole document goes through.
    let (id, mut frames, bytes) = streamed_start(&world, A, MIB + MIB / 2, 0);
    frames.extend(chunks_of(0, &bytes, 0));
    OpenStream::open(&world, &broker.url, A, frames)
        .await
        .close()
        .await
        .unwrap();
    let mut admin = admin_client(&world, &broker.url).await;
    admin.message(MessageRequest { id }).await.unwrap();

    // A sender that broke off leaves a partial upload, visible in the metric, swept
    // once it was untouched for the stall timeout.
    let (_, frames, _) = streamed_start(&world, A, 2 * MIB, 300 * 1024);
    let broken = OpenStream::open(&world, &broker.url, A, frames).await;
    wait_folders(&partials, 1, "the upload is open").await;
    let mut last = None;
    let seen = wait_until(
        "partial bytes in the metric",
        Duration::from_secs(30),
        || partial_metric(&admin_url),
        |n| *n >= 100 * 1024,
        &mut last,
    )
    .await;
    assert!(seen.is_some(), "metric: {last:?}");
    drop(broken);
    wait_folders(&partials, 0, "the broken-off upload is swept").await;
    let zero = wait_until(
        "partial bytes back to 0",
        Duration::from_secs(30),
        || partial_metric(&admin_url),
        |n| *n == 0,
        &mut last,
    )
    .await;
    assert!(zero.is_some(), "metric: {last:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_ends_an_open_submission_with_permission_denied_and_stores_nothing() {
    let world = World::new();
    let broker = Broker::start(config(&world)).await;
    let partials = partial_root(&world);
    let (id, frames, bytes) = streamed_start(&world, A, 2 * MIB, MIB);
    let mut upload = OpenStream::open(&world, &broker.url, A, frames).await;
    wait_folders(&partials, 1, "the upload is open").await;

    let mut admin = admin_client(&world, &broker.url).await;
    admin
        .suspend_agency(SuspendAgencyRequest {
            code: A.into(),
            reason: "kiểm tra an ninh".into(),
        })
        .await
        .unwrap();
    // Ended while the sender still holds the stream open.
    assert_refused(
        upload.answer().await,
        Code::PermissionDenied,
        &["suspended", A],
    );
    // The rest of the bytes would have completed it: too late.
    if let Some(tx) = upload.tx.as_ref() {
        for frame in chunks_of(0, &bytes, MIB) {
            if tx.send(frame).await.is_err() {
                break;
            }
        }
    }
    assert_not_stored(&world, &broker.url, &id).await;
    wait_folders(&partials, 0, "the cancelled upload is removed").await;

    // Every call of the suspended agency is refused, a new submission included.
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut client = client_of(&world, &broker.url, A).await;
    let h = header(A, &[B], &[]);
    assert_refused(
        submit(&mut client, seal(&h, &key).unwrap(), &[]).await,
        Code::PermissionDenied,
        &["suspended"],
    );
    let status = client
        .status(StatusRequest {
            message_id: id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // Resumed, it submits again; the cancelled document was never accepted.
    admin
        .resume_agency(ResumeAgencyRequest { code: A.into() })
        .await
        .unwrap();
    submit(&mut client, seal(&h, &key).unwrap(), &[])
        .await
        .unwrap();
    assert_not_stored(&world, &broker.url, &id).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sender_cannot_fill_a_recipients_queue_and_an_operator_purges_its_documents() {
    let world = World::new();
    let mut config = config(&world);
    // Per pair: a quarter of 8 documents; bytes set on their own.
    config.max_pending_documents = 8;
    config.max_pending_per_sender_bytes = Some(MIB as u64);
    let broker = Broker::start(config.clone()).await;
    let key_a = world.agency_tls(A).signing_key().unwrap();
    let key_c = world.agency_tls(C).signing_key().unwrap();
    let mut a = client_of(&world, &broker.url, A).await;
    let mut c = client_of(&world, &broker.url, C).await;

    // B runs no agent: everything queues. A may hold 2 documents in B's queue.
    let mut queued = Vec::new();
    for _ in 0..2 {
        let h = header(A, &[B], &[]);
        submit(&mut a, seal(&h, &key_a).unwrap(), &[])
            .await
            .unwrap();
        queued.push(h.message_id);
    }
    let third = header(A, &[B], &[]);
    assert_refused(
        submit(&mut a, seal(&third, &key_a).unwrap(), &[]).await,
        Code::ResourceExhausted,
        &["max_pending_per_sender_documents", A, B],
    );
    assert_not_stored(&world, &broker.url, &third.message_id).await;
    // Another sender to B, and A to another recipient, are not blocked.
    let from_c = header(C, &[B], &[]);
    submit(&mut c, seal(&from_c, &key_c).unwrap(), &[])
        .await
        .unwrap();

    // Bytes per pair: 600 KiB, then 600 KiB more would pass 1 MiB; 300 KiB fits.
    let big = random_bytes(600 * 1024);
    let h = header(A, &[C], &[("a.bin", &big)]);
    submit(&mut a, seal(&h, &key_a).unwrap(), &[&big])
        .await
        .unwrap();
    let over = header(A, &[C], &[("b.bin", &big)]);
    assert_refused(
        submit(&mut a, seal(&over, &key_a).unwrap(), &[&big]).await,
        Code::ResourceExhausted,
        &["max_pending_per_sender_bytes", "1048576"],
    );
    assert_not_stored(&world, &broker.url, &over.message_id).await;
    let fits = random_bytes(300 * 1024);
    let h = header(A, &[C], &[("c.bin", &fits)]);
    submit(&mut a, seal(&h, &key_a).unwrap(), &[&fits])
        .await
        .unwrap();

    // The counters are rebuilt from the store at start.
    broker.stop().await;
    let broker = Broker::start(config).await;
    let mut a = client_of(&world, &broker.url, A).await;
    let again = header(A, &[B], &[]);
    assert_refused(
        submit(&mut a, seal(&again, &key_a).unwrap(), &[]).await,
        Code::ResourceExhausted,
        &["max_pending_per_sender_documents"],
    );

    // The operator purges A's documents to B: dead letters with the broker's signed
    // notice, never deleted; C's document to B stays queued.
    let mut admin = admin_client(&world, &broker.url).await;
    let purged = admin
        .purge(PurgeRequest {
            from: A.into(),
            to: B.into(),
            reason: "gửi nhầm hàng loạt".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged, 2);
    let mut ids = purged.message_ids.clone();
    ids.sort();
    let mut expected = queued.clone();
    expected.sort();
    assert_eq!(ids, expected);
    let anchors = world.broker_tls().trust_anchors().unwrap();
    for id in &queued {
        let status = a
            .status(StatusRequest {
                message_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let to_b = &status.recipients[0];
        assert_eq!(to_b.state, DeliveryState::Refused as i32);
        assert!(
            to_b.reason.contains("purged by operator operator"),
            "{}",
            to_b.reason
        );
        assert!(
            to_b.reason.contains("gửi nhầm hàng loạt"),
            "{}",
            to_b.reason
        );
        let notice = lienthong_proto::receipt::verify_receipt(
            to_b.notice.as_ref().expect("a signed notice"),
            &anchors,
            &lienthong_proto::receipt::ExpectedReceipt {
                kind: pb::ReceiptKind::DeadLetter,
                message_id: id,
                header_sha256: &lienthong_proto::sha256(&status.envelope.as_ref().unwrap().payload),
                recipient: Some(B),
                live: true,
            },
        )
        .unwrap();
        assert_eq!(notice.outcome, "purged");
        assert_eq!(notice.message_id, *id);
    }
    let dead = admin
        .dead_letters(DeadLettersRequest { agency: B.into() })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 2, "kept as dead letters");
    let queues = admin
        .queues(pb::QueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues;
    let b_queue = queues.iter().find(|q| q.agency == B).unwrap();
    assert_eq!(b_queue.pending, 1, "C's document still queued");
    let audit = admin
        .audit_tail(AuditTailRequest { n: 5 })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let entry = audit.iter().find(|e| e.kind == "purged").expect("audited");
    assert!(
        entry
            .detail
            .contains("operator operator purged 2 documents from"),
        "{}",
        entry.detail
    );
    // A purge of nothing says 0; A's share of B's queue is free again.
    let none = admin
        .purge(PurgeRequest {
            from: A.into(),
            to: B.into(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(none.purged, 0);
    submit(&mut a, seal(&again, &key_a).unwrap(), &[])
        .await
        .unwrap();
    // Bad codes are refused.
    let bad = admin
        .purge(PurgeRequest {
            from: "A".into(),
            to: B.into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_and_creation_time_a_sender_may_set_are_bounded() {
    let world = World::new();
    let broker = Broker::start(config(&world)).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut client = client_of(&world, &broker.url, A).await;
    let now = lienthong_proto::now_ms();
    let day = 24 * 3600 * 1000i64;
    let minute = 60 * 1000i64;
    // (created_at_ms, expires_at_ms, refusal naming this setting or None)
    let cases: Vec<(i64, i64, Option<&str>)> = vec![
        (now, now + 31 * day, Some("max_expiry")),
        (
            now,
            lienthong_proto::document::MAX_TIME_MS,
            Some("max_expiry"),
        ),
        (now, now + 29 * day, None),
        (now + 10 * minute, 0, Some("max_clock_skew")),
        (now + minute, 0, None),
        (now - 31 * day, 0, Some("max_document_age")),
        (now - day, 0, None),
    ];
    for (created, expires, refusal) in cases {
        let mut h = header(A, &[B], &[]);
        h.created_at_ms = created;
        h.expires_at_ms = expires;
        let result = submit(&mut client, seal(&h, &key).unwrap(), &[]).await;
        match refusal {
            Some(setting) => {
                assert_refused(result, Code::InvalidArgument, &[setting]);
                assert_not_stored(&world, &broker.url, &h.message_id).await;
            }
            None => {
                result.unwrap();
            }
        }
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_admin_purge_prints_the_count_and_refuses_bad_codes() {
    let world = World::new();
    let broker = Broker::start(config(&world)).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut a = client_of(&world, &broker.url, A).await;
    for _ in 0..3 {
        let h = header(A, &[B], &[]);
        submit(&mut a, seal(&h, &key).unwrap(), &[]).await.unwrap();
    }
    let out = run_admin_cli(
        Path::new(BIN),
        &world,
        &broker.url,
        &["purge", "--from", A, "--to", B, "--reason", "thử nghiệm"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
    let mut admin = admin_client(&world, &broker.url).await;
    let dead = admin
        .dead_letters(DeadLettersRequest { agency: B.into() })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(dead.len(), 3);
    assert!(
        dead.iter().all(|d| d.reason.contains("thử nghiệm")),
        "{dead:?}"
    );

    let out = run_admin_cli(
        std::path::Path::new(env!("CARGO_BIN_EXE_lienthong-under-test")),
        &world,
        &broker.url,
        &["purge", "--from", "H31", "--to", B],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    broker.stop().await;
}
