//! The recipient's batch path (issue 11): one `DeliveryBatch` in, one `AckBatch` out,
//! a refusal for each bad delivery only, and batch-signed delivery receipts that
//! verify one by one. A fake broker pushes the batch, since the real broker never
//! sends a bad signature or a document addressed to someone else.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use lienthong_proto::document::seal_batch;
use lienthong_proto::pb::{self, ReceiptKind, Signed};
use lienthong_proto::receipt::{ExpectedReceipt, sign_receipt, verify_receipt};
use lienthong_proto::{SigningKey, now_ms, sha256};
use lienthong_tests::fake_broker::{FakeExchange, FakeServer};
use lienthong_tests::*;
use prost::Message;

/// The broker's submission receipt for `envelope`, signed with `key`.
fn submission(header: &pb::DocumentHeader, envelope: &Signed, key: &SigningKey) -> Signed {
    let receipt = pb::Receipt {
        kind: ReceiptKind::Submission as i32,
        message_id: header.message_id.clone(),
        header_sha256: sha256(&envelope.payload).to_vec(),
        at_ms: now_ms(),
        issuer: "broker:localhost".into(),
        business_id: header.business_id.clone(),
        sender: header.sender.clone(),
        ..Default::default()
    };
    sign_receipt(&receipt, key).unwrap()
}

/// Serves a fake broker whose sessions push `sessions`, one list each in turn: the
/// real broker never sends a bad signature or a document addressed to someone else.
async fn start_broker(world: &World, sessions: Vec<Vec<pb::BrokerMessage>>) -> FakeServer {
    sessions
        .into_iter()
        .fold(FakeExchange::new(), FakeExchange::session)
        .serve(world)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_batch_refuses_only_its_bad_deliveries_and_acks_the_rest_with_one_signature() {
    let world = World::new();
    let a_key = world.agency_tls(A).signing_key().unwrap();
    let broker_key = world.broker_tls().signing_key().unwrap();

    // Five documents sealed by A with one batch signature: three good ones for B, one
    // for C only (not addressed to B), and one whose payload is swapped after sealing
    // (its signature no longer matches).
    let body = |n: u8| vec![n; 100 + usize::from(n)];
    let bodies: Vec<Vec<u8>> = (0..5).map(body).collect();
    let mut headers: Vec<pb::DocumentHeader> = (0..5)
        .map(|i| {
            let to: &[&str] = if i == 3 { &[C] } else { &[B] };
            header(A, to, &[("noi-dung.bin", &bodies[i])])
        })
        .collect();
    for (i, h) in headers.iter_mut().enumerate() {
        h.subject = format!("Văn bản lô {i}");
    }
    let mut envelopes: Vec<Signed> = seal_batch(&headers, &a_key)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(envelopes[0].batch.is_some(), "sealed as one batch");
    // The forged one claims another header (other id, addressed to B) under the
    // batch's signature and proof.
    let mut forged_header = header(A, &[B], &[("noi-dung.bin", &bodies[1])]);
    forged_header.subject = "Không phải văn bản đã ký".into();
    envelopes[1].payload = forged_header.encode_to_vec().into();
    let forged_id = forged_header.message_id.clone();
    let not_ours_id = headers[3].message_id.clone();
    let good: Vec<usize> = vec![0, 2, 4];

    let deliveries: Vec<pb::Delivery> = (0..5)
        .map(|i| {
            let h = if i == 1 { &forged_header } else { &headers[i] };
            pb::Delivery {
                envelope: Some(envelopes[i].clone()),
                attachments: vec![bodies[i].clone().into()],
                attempt: 1,
                submission_receipt: Some(submission(h, &envelopes[i], &broker_key)),
                ..Default::default()
            }
        })
        .collect();
    let pushes = vec![pb::BrokerMessage {
        msg: Some(pb::broker_message::Msg::Batch(pb::DeliveryBatch {
            deliveries,
        })),
    }];
    let mut fake = start_broker(&world, vec![pushes]).await;
    let b = Agent::start(world.agent_config(B, &fake.url)).await;

    // The Hello asks for batches; then exactly one AckBatch answers the batch.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut hello = None;
    let mut batches = Vec::new();
    while batches.is_empty() {
        let message = tokio::time::timeout_at(deadline, fake.answers.recv())
            .await
            .expect("the agent answers the batch within 30 s")
            .expect("answers channel open");
        match message.msg {
            Some(pb::agent_message::Msg::Hello(h)) => hello = Some(h),
            Some(pb::agent_message::Msg::Batch(batch)) => batches.push(batch),
            other => panic!("a batch is answered by an AckBatch, got {other:?}"),
        }
    }
    let hello = hello.expect("Hello first");
    assert!(hello.max_batch >= 5 && hello.max_batch <= 256, "{hello:?}");
    let batch = batches.pop().unwrap();

    // Refusals for exactly the two bad ones, with reasons a person can act on.
    let refused: HashMap<String, String> = batch
        .refusals
        .iter()
        .map(|r| (r.message_id.clone(), r.reason.clone()))
        .collect();
    assert_eq!(
        refused.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([forged_id.clone(), not_ours_id.clone()]),
        "{refused:?}"
    );
    assert!(refused[&forged_id].contains("signature"), "{refused:?}");
    assert!(
        refused[&not_ours_id].contains("not a recipient"),
        "{refused:?}"
    );

    // Acks for the three good ones, each with its own delivery receipt: one batch
    // signature (same signature bytes, a proof each) that verifies item by item.
    let acked: BTreeSet<String> = batch.acks.iter().map(|a| a.message_id.clone()).collect();
    let good_ids: BTreeSet<String> = good
        .iter()
        .map(|&i| headers[i].message_id.clone())
        .collect();
    assert_eq!(acked, good_ids);
    let anchors = world.agency_tls(B).trust_anchors().unwrap();
    let mut signatures = BTreeSet::new();
    let mut leaves = BTreeSet::new();
    for ack in &batch.acks {
        let i = good
            .iter()
            .copied()
            .find(|&i| headers[i].message_id == ack.message_id)
            .unwrap();
        let receipt = ack.delivery_receipt.as_ref().expect("a delivery receipt");
        let proof = receipt.batch.as_ref().expect("a batch inclusion proof");
        assert_eq!(proof.tree_size, 3);
        leaves.insert(proof.leaf_index);
        signatures.insert(receipt.signature.clone());
        let header_sha256 = sha256(&envelopes[i].payload);
        let decoded = verify_receipt(
            receipt,
            &anchors,
            &ExpectedReceipt {
                kind: ReceiptKind::Delivery,
                message_id: &ack.message_id,
                header_sha256: &header_sha256,
                recipient: Some(B),
                live: false,
            },
        )
        .expect("the batch-signed delivery receipt verifies");
        assert_eq!(decoded.issuer, B);
    }
    assert_eq!(signatures.len(), 1, "one signature for the whole batch");
    assert_eq!(leaves, BTreeSet::from([0, 1, 2]));

    // The good ones are stored and exported (after the acknowledgement) with the
    // receipt that was sent; nothing of the bad ones is stored or exported.
    for id in &good_ids {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    assert_eq!(
        inbox_entries(&world.inbox_dir(B)),
        good_ids.iter().cloned().collect::<Vec<_>>()
    );
    for ack in &batch.acks {
        let folder = world.inbox_dir(B).join(&ack.message_id);
        assert_eq!(
            std::fs::read(folder.join("delivery-receipt.pb")).unwrap(),
            ack.delivery_receipt.as_ref().unwrap().encode_to_vec()
        );
        assert!(folder.join("submission-receipt.pb").is_file());
    }
    let listed: BTreeSet<String> = b
        .client
        .inbox()
        .await
        .unwrap()
        .into_iter()
        .map(|item| item.message_id)
        .collect();
    assert_eq!(listed, good_ids);
    for bad in [&forged_id, &not_ours_id] {
        assert!(!world.inbox_dir(B).join(bad).exists());
        let status = b.client.status(bad).await;
        assert!(status.is_err(), "{bad} must be unknown to B: {status:?}");
    }
    b.stop().await;
    fake.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_announced_ends_the_session_and_stores_nothing() {
    let world = World::new();
    let a_key = world.agency_tls(A).signing_key().unwrap();
    let broker_key = world.broker_tls().signing_key().unwrap();
    // The agent's window (and so its max_batch) is 2; the broker pushes 3.
    let headers: Vec<pb::DocumentHeader> = (0..3).map(|_| header(A, &[B], &[])).collect();
    let deliveries: Vec<pb::Delivery> = seal_batch(&headers, &a_key)
        .into_iter()
        .zip(&headers)
        .map(|(envelope, h)| {
            let envelope = envelope.unwrap();
            pb::Delivery {
                submission_receipt: Some(submission(h, &envelope, &broker_key)),
                envelope: Some(envelope),
                attempt: 1,
                ..Default::default()
            }
        })
        .collect();
    let pushes = vec![pb::BrokerMessage {
        msg: Some(pb::broker_message::Msg::Batch(pb::DeliveryBatch {
            deliveries,
        })),
    }];
    let mut fake = start_broker(&world, vec![pushes]).await;
    let mut config = world.agent_config(B, &fake.url);
    config.window = 2;
    let b = Agent::start(config).await;

    // The session ends without an answer: the agent dials again and says Hello again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut hellos = 0;
    while hellos < 2 {
        let message = tokio::time::timeout_at(deadline, fake.answers.recv())
            .await
            .expect("the agent reconnects within 30 s")
            .expect("answers channel open");
        match message.msg {
            Some(pb::agent_message::Msg::Hello(h)) => {
                assert_eq!(h.max_batch, 2);
                hellos += 1;
            }
            other => panic!("an oversized batch gets no answer, got {other:?}"),
        }
    }
    assert!(b.client.inbox().await.unwrap().is_empty());
    b.stop().await;
    fake.stop();
}

/// The next AckBatch the agent sends (Hellos are skipped).
async fn next_ack_batch(
    answers: &mut tokio::sync::mpsc::UnboundedReceiver<pb::AgentMessage>,
) -> pb::AckBatch {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let message = tokio::time::timeout_at(deadline, answers.recv())
            .await
            .expect("the agent answers within 30 s")
            .expect("answers channel open");
        match message.msg {
            Some(pb::agent_message::Msg::Hello(_)) => continue,
            Some(pb::agent_message::Msg::Batch(batch)) => return batch,
            other => panic!("a batch is answered by an AckBatch, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_batch_is_answered_with_the_stored_receipts_and_stored_once() {
    let world = World::new();
    let a_key = world.agency_tls(A).signing_key().unwrap();
    let broker_key = world.broker_tls().signing_key().unwrap();
    let headers: Vec<pb::DocumentHeader> = (0..3)
        .map(|i| {
            let body = vec![i as u8; 64];
            header(A, &[B], &[("tep.bin", &body)])
        })
        .collect();
    // Sealed once: a redelivery carries the very bytes the broker stored.
    let envelopes: Vec<Signed> = seal_batch(&headers, &a_key)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let deliveries = |attempt: u32| -> Vec<pb::Delivery> {
        envelopes
            .iter()
            .zip(&headers)
            .enumerate()
            .map(|(i, (envelope, h))| pb::Delivery {
                submission_receipt: Some(submission(h, envelope, &broker_key)),
                envelope: Some(envelope.clone()),
                attachments: vec![vec![i as u8; 64].into()],
                attempt,
                ..Default::default()
            })
            .collect()
    };
    let batch = |attempt: u32| {
        vec![pb::BrokerMessage {
            msg: Some(pb::broker_message::Msg::Batch(pb::DeliveryBatch {
                deliveries: deliveries(attempt),
            })),
        }]
    };
    // The same documents twice, as a broker that lost the first AckBatch redelivers
    // them on the next session.
    let mut fake = start_broker(&world, vec![batch(1), batch(2)]).await;
    let b = Agent::start(world.agent_config(B, &fake.url)).await;

    let first = next_ack_batch(&mut fake.answers).await;
    assert_eq!(first.acks.len(), 3, "{first:?}");
    assert!(first.refusals.is_empty(), "{first:?}");
    fake.end_session();
    let second = next_ack_batch(&mut fake.answers).await;
    assert!(second.refusals.is_empty(), "{second:?}");
    let receipts = |batch: &pb::AckBatch| -> std::collections::BTreeMap<String, Vec<u8>> {
        batch
            .acks
            .iter()
            .map(|a| {
                (
                    a.message_id.clone(),
                    a.delivery_receipt.as_ref().unwrap().encode_to_vec(),
                )
            })
            .collect()
    };
    assert_eq!(
        receipts(&second),
        receipts(&first),
        "the stored receipts, unchanged"
    );

    let ids: Vec<String> = receipts(&first).into_keys().collect();
    for id in &ids {
        wait_for_path(&world.inbox_dir(B).join(id)).await;
    }
    assert_eq!(inbox_entries(&world.inbox_dir(B)), ids);
    assert_eq!(b.client.inbox().await.unwrap().len(), 3);
    b.stop().await;
    fake.stop();
}
