//! The broker's batch path (issue 11) over real mTLS and a real sled store: SubmitBatch
//! with per-document outcomes and batch-signed receipts, duplicates within and across
//! batches, a broker killed while batches are in flight, DeliveryBatch pushes to a
//! session whose Hello asks for them with one AckBatch settling them, and the batch
//! size limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use lienthong_proto::document::seal_batch;
use lienthong_proto::pb::{self, agent_message::Msg, broker_message};
use lienthong_proto::receipt::{ExpectedReceipt, sign_receipts, verify_receipt};
use lienthong_proto::signing::TrustAnchors;
use lienthong_tests::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_lienthong-under-test");

type Client = pb::exchange_client::ExchangeClient<tonic::transport::Channel>;

async fn client_of(world: &World, url: &str, code: &str) -> Client {
    exchange_client(url, world.agency_tls(code).client_config("localhost"))
        .await
        .unwrap()
}

fn anchors(world: &World) -> TrustAnchors {
    TrustAnchors::from_pem(&std::fs::read(&world.pki.ca_cert).unwrap()).unwrap()
}

/// Headers from A with one small attachment each, sealed with one batch signature.
fn sealed_batch(world: &World, headers: &[pb::DocumentHeader]) -> Vec<pb::BatchDocument> {
    let key = world.agency_tls(A).signing_key().unwrap();
    seal_batch(headers, &key)
        .into_iter()
        .zip(headers)
        .map(|(signed, header)| pb::BatchDocument {
            envelope: Some(signed.unwrap()),
            attachments: vec![body_of(&header.subject)],
        })
        .collect()
}

/// The attachment bytes of a test document, derived from its subject.
fn body_of(subject: &str) -> Vec<u8> {
    format!("noi dung {subject}").repeat(20).into_bytes()
}

/// A header from A to `to` whose one attachment is `body_of(subject)`.
fn doc(to: &[&str], subject: &str) -> pb::DocumentHeader {
    let body = body_of(subject);
    let mut h = header(A, to, &[("van-ban.txt", &body)]);
    h.subject = subject.to_owned();
    h
}

fn sha(envelope: &pb::Signed) -> Vec<u8> {
    lienthong_proto::sha256(&envelope.payload).to_vec()
}

async fn assert_not_stored(client: &mut Client, message_id: &str) {
    let status = client
        .status(pb::StatusRequest {
            message_id: message_id.to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{message_id}: {status:?}");
}

/// Waits until B's inbox holds exactly `expected` (checked again after a sentinel
/// document sent last has arrived: queues are FIFO, so nothing else can follow).
async fn assert_inbox_exactly(
    world: &World,
    broker_url: &str,
    code: &str,
    expected: &BTreeSet<String>,
) {
    let mut client = client_of(world, broker_url, A).await;
    let sentinel = doc(&[code], "sentinel");
    let batch = sealed_batch(world, std::slice::from_ref(&sentinel));
    let response = client
        .submit_batch(pb::SubmitBatchRequest { documents: batch })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outcomes[0].code, 0, "{:?}", response.outcomes[0]);
    let agent = Agent::start(world.agent_config(code, broker_url)).await;
    wait_for_path(&world.inbox_dir(code).join(&sentinel.message_id)).await;
    let mut want = expected.clone();
    want.insert(sentinel.message_id.clone());
    let mut last = None;
    let got = wait_until(
        "inbox holds every document",
        Duration::from_secs(30),
        || async {
            Some(
                inbox_entries(&world.inbox_dir(code))
                    .into_iter()
                    .collect::<BTreeSet<_>>(),
            )
        },
        |held| *held == want,
        &mut last,
    )
    .await;
    assert_eq!(got.as_ref(), Some(&want), "last seen: {last:?}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_good_documents_gets_batch_signed_receipts_and_is_delivered() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut client = client_of(&world, &broker.url, A).await;
    let headers: Vec<_> = (0..12).map(|i| doc(&[B], &format!("good {i}"))).collect();
    let batch = sealed_batch(&world, &headers);
    let envelopes: Vec<pb::Signed> = batch.iter().map(|d| d.envelope.clone().unwrap()).collect();
    let response = client
        .submit_batch(pb::SubmitBatchRequest { documents: batch })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outcomes.len(), headers.len());
    let anchors = anchors(&world);
    let mut signatures = BTreeSet::new();
    for ((outcome, header), envelope) in response.outcomes.iter().zip(&headers).zip(&envelopes) {
        assert_eq!(outcome.code, 0, "{outcome:?}");
        assert!(!outcome.duplicate);
        assert_eq!(outcome.message_id, header.message_id);
        let receipt = outcome.submission_receipt.as_ref().unwrap();
        let proof = receipt.batch.as_ref().expect("a batch proof");
        assert_eq!(proof.tree_size, headers.len() as u64);
        signatures.insert(receipt.signature.to_vec());
        let digest = sha(envelope);
        let verified = verify_receipt(
            receipt,
            &anchors,
            &ExpectedReceipt {
                kind: pb::ReceiptKind::Submission,
                message_id: &header.message_id,
                header_sha256: &digest,
                recipient: None,
                live: true,
            },
        )
        .unwrap();
        assert_eq!(verified.sender, A);
    }
    assert_eq!(signatures.len(), 1, "one signature for the whole batch");
    let ids: BTreeSet<String> = headers.iter().map(|h| h.message_id.clone()).collect();
    assert_inbox_exactly(&world, &broker.url, B, &ids).await;
    for h in &headers {
        let stored = std::fs::read(world.inbox_dir(B).join(&h.message_id).join("van-ban.txt"));
        assert_eq!(stored.unwrap(), body_of(&h.subject), "{}", h.message_id);
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_fail_alone_with_the_code_submit_gives() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.max_pending_per_sender_documents = Some(3);
    let broker = Broker::start(config).await;
    let mut client = client_of(&world, &broker.url, A).await;
    let headers = vec![
        doc(&[B], "good 1"),
        doc(&[B], "bad signature"),
        doc(&[B], "good 2"),
        doc(&["000.00.99.H31"], "unknown recipient"),
        doc(&[C], "good to C"),
        doc(&[B], "good 3"),
        doc(&[B], "over quota"),
    ];
    let mut batch = sealed_batch(&world, &headers);
    // A bit of the signed header changed after signing: its inclusion proof fails.
    let tampered = batch[1].envelope.as_mut().unwrap();
    let mut payload = tampered.payload.to_vec();
    let at = payload.len() / 2;
    payload[at] ^= 0x01;
    tampered.payload = payload.into();
    let bad_envelopes: Vec<pb::BatchDocument> = [1, 3].iter().map(|i| batch[*i].clone()).collect();
    let response = client
        .submit_batch(pb::SubmitBatchRequest { documents: batch })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = response.outcomes.iter().map(|o| o.code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            Code::InvalidArgument as i32,
            0,
            Code::InvalidArgument as i32,
            0,
            0,
            Code::ResourceExhausted as i32,
        ],
        "{:#?}",
        response.outcomes
    );
    assert!(
        response.outcomes[6]
            .message
            .contains("max_pending_per_sender_documents"),
        "{}",
        response.outcomes[6].message
    );
    // Submit gives the same codes and texts for the same documents.
    for (document, outcome) in bad_envelopes
        .iter()
        .zip([&response.outcomes[1], &response.outcomes[3]])
    {
        let attachment = document.attachments[0].clone();
        let status = submit(
            &mut client,
            document.envelope.clone().unwrap(),
            &[&attachment],
        )
        .await
        .unwrap_err();
        assert_eq!(status.code() as i32, outcome.code, "{status:?}");
        assert_eq!(status.message(), outcome.message);
    }
    let over = doc(&[B], "over quota by Submit");
    let key = world.agency_tls(A).signing_key().unwrap();
    let status = submit(
        &mut client,
        lienthong_proto::document::seal(&over, &key).unwrap(),
        &[&body_of(&over.subject)],
    )
    .await
    .unwrap_err();
    assert_eq!(
        status.code() as i32,
        response.outcomes[6].code,
        "{status:?}"
    );
    for i in [1, 3, 6] {
        assert!(response.outcomes[i].submission_receipt.is_none());
        assert_not_stored(&mut client, &headers[i].message_id).await;
    }
    assert_not_stored(&mut client, &over.message_id).await;
    let to_b: BTreeSet<String> = [0, 2, 5]
        .iter()
        .map(|i| headers[*i].message_id.clone())
        .collect();
    // The quota is full: the sentinel must fit, so raise nothing but deliver C first.
    let c = Agent::start(world.agent_config(C, &broker.url)).await;
    wait_for_path(&world.inbox_dir(C).join(&headers[4].message_id)).await;
    c.stop().await;
    let b = Agent::start(world.agent_config(B, &broker.url)).await;
    for id in &to_b {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    b.stop().await;
    assert_inbox_exactly(&world, &broker.url, B, &to_b).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_within_a_batch_and_a_resubmitted_batch_get_the_original_receipts() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut client = client_of(&world, &broker.url, A).await;
    let headers = vec![doc(&[B], "one"), doc(&[B], "two")];
    let sealed = sealed_batch(&world, &headers);
    let twice = vec![sealed[0].clone(), sealed[1].clone(), sealed[0].clone()];
    let first = client
        .submit_batch(pb::SubmitBatchRequest { documents: twice })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert!(first.iter().all(|o| o.code == 0), "{first:#?}");
    assert_eq!(
        first.iter().map(|o| o.duplicate).collect::<Vec<_>>(),
        vec![false, false, true]
    );
    assert_eq!(first[2].submission_receipt, first[0].submission_receipt);

    let again = client
        .submit_batch(pb::SubmitBatchRequest {
            documents: sealed.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    for (outcome, original) in again.iter().zip(&first) {
        assert_eq!(outcome.code, 0, "{outcome:?}");
        assert!(outcome.duplicate);
        assert_eq!(outcome.submission_receipt, original.submission_receipt);
    }
    // The same id with other content is refused as Submit refuses it.
    let mut changed = headers[0].clone();
    changed.subject = "khác".into();
    let changed_batch = sealed_batch(&world, &[changed]);
    let refused = client
        .submit_batch(pb::SubmitBatchRequest {
            documents: changed_batch,
        })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    assert_eq!(refused[0].code, Code::AlreadyExists as i32, "{refused:?}");
    let ids: BTreeSet<String> = headers.iter().map(|h| h.message_id.clone()).collect();
    assert_inbox_exactly(&world, &broker.url, B, &ids).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_max_batch_documents_is_refused_whole_and_streamed_documents_go_by_submit() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    config.max_batch_documents = 4;
    let broker = Broker::start(config).await;
    let mut client = client_of(&world, &broker.url, A).await;
    let headers: Vec<_> = (0..5).map(|i| doc(&[B], &format!("limit {i}"))).collect();
    let status = client
        .submit_batch(pb::SubmitBatchRequest {
            documents: sealed_batch(&world, &headers),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("max_batch_documents"),
        "{}",
        status.message()
    );
    for h in &headers {
        assert_not_stored(&mut client, &h.message_id).await;
    }
    // An empty batch is refused too.
    let status = client
        .submit_batch(pb::SubmitBatchRequest {
            documents: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Within the limit the documents are accepted, except one that must be streamed.
    let big = vec![7u8; lienthong_proto::document::STREAMED_THRESHOLD as usize + 1];
    let large = header(A, &[B], &[("lon.bin", &big)]);
    let key = world.agency_tls(A).signing_key().unwrap();
    let mut documents = sealed_batch(&world, &headers[..3]);
    documents.insert(
        1,
        pb::BatchDocument {
            envelope: Some(lienthong_proto::document::seal(&large, &key).unwrap()),
            attachments: vec![big.clone()],
        },
    );
    let outcomes = client
        .submit_batch(pb::SubmitBatchRequest { documents })
        .await
        .unwrap()
        .into_inner()
        .outcomes;
    let codes: Vec<i32> = outcomes.iter().map(|o| o.code).collect();
    assert_eq!(
        codes,
        vec![0, Code::InvalidArgument as i32, 0, 0],
        "{outcomes:#?}"
    );
    assert!(
        outcomes[1].message.contains("use Submit"),
        "{}",
        outcomes[1].message
    );
    assert_not_stored(&mut client, &large.message_id).await;
    // The same document through Submit is accepted.
    let response = submit(
        &mut client,
        lienthong_proto::document::seal(&large, &key).unwrap(),
        &[&big],
    )
    .await
    .unwrap();
    assert!(!response.duplicate);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_with_batches_in_flight_accepts_and_delivers_each_document_once() {
    let world = World::new();
    let mut broker = BrokerProcess::start(Path::new(BIN), &world, "broker").await;
    let batches: Vec<Vec<pb::DocumentHeader>> = (0..12)
        .map(|b| {
            (0..16)
                .map(|i| doc(&[B], &format!("crash {b}-{i}")))
                .collect()
        })
        .collect();
    let sealed: Vec<Vec<pb::BatchDocument>> =
        batches.iter().map(|h| sealed_batch(&world, h)).collect();
    // Submit the batches concurrently and kill the broker while they are in flight.
    let url = broker.url.clone();
    let mut tasks = Vec::new();
    for batch in sealed.clone() {
        let mut client = client_of(&world, &url, A).await;
        tasks.push(tokio::spawn(async move {
            client
                .submit_batch(pb::SubmitBatchRequest { documents: batch })
                .await
                .map(|r| r.into_inner().outcomes)
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    broker.kill();
    let mut receipts: BTreeMap<String, pb::Signed> = BTreeMap::new();
    for task in tasks {
        if let Ok(outcomes) = task.await.unwrap() {
            for o in outcomes.into_iter().filter(|o| o.code == 0) {
                receipts.insert(o.message_id.clone(), o.submission_receipt.unwrap());
            }
        }
    }
    eprintln!(
        "killed with batches in flight: {} of {} documents had a receipt",
        receipts.len(),
        batches.len() * 16
    );
    broker.spawn().await;
    // Resubmit every batch until each document has its receipt; a receipt given
    // before the crash comes back unchanged.
    let client = client_of(&world, &broker.url, A).await;
    for batch in &sealed {
        let mut last = None;
        let outcomes = wait_until(
            "the batch is answered after the restart",
            Duration::from_secs(30),
            || {
                let mut client = client.clone();
                let batch = batch.clone();
                async move {
                    client
                        .submit_batch(pb::SubmitBatchRequest { documents: batch })
                        .await
                        .ok()
                        .map(|r| r.into_inner().outcomes)
                }
            },
            |outcomes| outcomes.iter().all(|o| o.code == 0),
            &mut last,
        )
        .await
        .unwrap_or_else(|| panic!("not all accepted: {last:#?}"));
        for o in outcomes {
            let receipt = o.submission_receipt.unwrap();
            if let Some(before) = receipts.get(&o.message_id) {
                assert!(o.duplicate, "{} was accepted twice", o.message_id);
                assert_eq!(&receipt, before, "{}: another receipt", o.message_id);
            }
            receipts.insert(o.message_id.clone(), receipt);
        }
    }
    let all: BTreeSet<String> = batches
        .iter()
        .flatten()
        .map(|h| h.message_id.clone())
        .collect();
    assert_eq!(receipts.keys().cloned().collect::<BTreeSet<_>>(), all);
    assert_inbox_exactly(&world, &broker.url, B, &all).await;
    broker.terminate();
}

/// A raw session for `code` whose Hello asks for batches of `max_batch` within `window`.
async fn batch_session(
    world: &World,
    url: &str,
    code: &str,
    window: u32,
    max_batch: u32,
) -> (
    tonic::Streaming<pb::BrokerMessage>,
    mpsc::Sender<pb::AgentMessage>,
) {
    let mut client = client_of(world, url, code).await;
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::AgentMessage {
        msg: Some(Msg::Hello(pb::Hello {
            window,
            partial: Vec::new(),
            max_batch,
        })),
    })
    .await
    .unwrap();
    let stream = client
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (stream, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_asking_for_batches_gets_delivery_batches_and_one_ack_batch_settles_them() {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    let mut client = client_of(&world, &broker.url, A).await;
    let headers: Vec<_> = (0..40).map(|i| doc(&[B], &format!("push {i}"))).collect();
    for chunk in headers.chunks(20) {
        let outcomes = client
            .submit_batch(pb::SubmitBatchRequest {
                documents: sealed_batch(&world, chunk),
            })
            .await
            .unwrap()
            .into_inner()
            .outcomes;
        assert!(outcomes.iter().all(|o| o.code == 0), "{outcomes:#?}");
    }
    let window = 24u32;
    let (mut stream, tx) = batch_session(&world, &broker.url, B, window, 16).await;
    let key_b = world.agency_tls(B).signing_key().unwrap();
    let mut delivered = BTreeSet::new();
    while delivered.len() < headers.len() {
        // Take what the window allows, then acknowledge it all in one AckBatch.
        let mut unacked: Vec<pb::Delivery> = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
            let Ok(message) = next else { break };
            let message = message.unwrap().expect("the session stays open");
            match message.msg {
                Some(broker_message::Msg::Batch(batch)) => {
                    assert!(!batch.deliveries.is_empty());
                    assert!(
                        batch.deliveries.len() <= 16,
                        "{} in one batch",
                        batch.deliveries.len()
                    );
                    unacked.extend(batch.deliveries);
                }
                other => panic!("expected a DeliveryBatch, got {other:?}"),
            }
            assert!(
                unacked.len() <= window as usize,
                "{} unacknowledged",
                unacked.len()
            );
        }
        assert!(
            !unacked.is_empty(),
            "nothing more was pushed; delivered {}",
            delivered.len()
        );
        let receipts: Vec<pb::Receipt> = unacked
            .iter()
            .map(|d| {
                let envelope = d.envelope.as_ref().unwrap();
                let header: pb::DocumentHeader =
                    prost::Message::decode(envelope.payload.as_ref()).unwrap();
                pb::Receipt {
                    kind: pb::ReceiptKind::Delivery as i32,
                    message_id: header.message_id.clone(),
                    header_sha256: sha(envelope),
                    at_ms: lienthong_proto::now_ms(),
                    issuer: B.into(),
                    business_id: header.business_id,
                    sender: header.sender,
                    recipient: B.into(),
                    ..Default::default()
                }
            })
            .collect();
        let signed = sign_receipts(&receipts, &key_b).unwrap();
        let acks = receipts
            .iter()
            .zip(signed)
            .map(|(r, s)| pb::Ack {
                message_id: r.message_id.clone(),
                delivery_receipt: Some(s),
            })
            .collect();
        for r in &receipts {
            assert!(
                delivered.insert(r.message_id.clone()),
                "{} pushed twice",
                r.message_id
            );
        }
        tx.send(pb::AgentMessage {
            msg: Some(Msg::Batch(pb::AckBatch {
                acks,
                refusals: Vec::new(),
            })),
        })
        .await
        .unwrap();
    }
    // Every delivery settled: delivered with its receipt, the queue empty.
    for h in &headers {
        let mut last = None;
        let state = wait_until(
            "the delivery is settled",
            Duration::from_secs(20),
            || {
                let mut client = client.clone();
                let id = h.message_id.clone();
                async move {
                    client
                        .status(pb::StatusRequest { message_id: id })
                        .await
                        .ok()
                        .map(|r| r.into_inner().recipients[0].clone())
                }
            },
            |r| r.state == pb::DeliveryState::Delivered as i32,
            &mut last,
        )
        .await;
        let state = state.unwrap_or_else(|| panic!("{}: {last:?}", h.message_id));
        assert!(state.delivery_receipt.is_some());
        assert_eq!(state.attempts, 1);
    }
    let mut admin = admin_client(&world, &broker.url).await;
    let queues = admin
        .queues(pb::QueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues;
    let b = queues.iter().find(|q| q.agency == B).expect("B's queue");
    assert_eq!((b.pending, b.pending_bytes), (0, 0), "{b:?}");
    drop(tx);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submits_get_receipts_that_each_verify_alone() {
    let world = World::new();
    let mut config = world.broker_config("broker");
    // All 32 open at once (the default admits 16 per agency).
    config.max_submissions_per_agency = 32;
    let broker = Broker::start(config).await;
    let key = world.agency_tls(A).signing_key().unwrap();
    let headers: Vec<_> = (0..32).map(|i| doc(&[B], &format!("single {i}"))).collect();
    let mut tasks = Vec::new();
    for h in headers.clone() {
        let mut client = client_of(&world, &broker.url, A).await;
        let envelope = lienthong_proto::document::seal(&h, &key).unwrap();
        tasks.push(tokio::spawn(async move {
            let body = body_of(&h.subject);
            let response = submit(&mut client, envelope.clone(), &[&body])
                .await
                .unwrap();
            (h.message_id, sha(&envelope), response)
        }));
    }
    let anchors = anchors(&world);
    let mut signatures = BTreeSet::new();
    for task in tasks {
        let (id, digest, response) = task.await.unwrap();
        assert!(!response.duplicate);
        let receipt = response.submission_receipt.unwrap();
        signatures.insert(receipt.signature.to_vec());
        verify_receipt(
            &receipt,
            &anchors,
            &ExpectedReceipt {
                kind: pb::ReceiptKind::Submission,
                message_id: &id,
                header_sha256: &digest,
                recipient: None,
                live: true,
            },
        )
        .unwrap();
    }
    // Each receipt verifies alone, whichever signature it carries.
    eprintln!(
        "{} submissions, {} signatures",
        headers.len(),
        signatures.len()
    );
    let ids: BTreeSet<String> = headers.iter().map(|h| h.message_id.clone()).collect();
    assert_inbox_exactly(&world, &broker.url, B, &ids).await;
    broker.stop().await;
}
