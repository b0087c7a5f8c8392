//! Bad submissions are refused with the exact code, and nothing of them is stored or
//! delivered. "Nothing delivered" is proven by a valid document sent afterwards to the
//! same recipient: queues are FIFO, so once it arrives, anything stored before it would
//! have arrived first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_certs_dev::{DevCa, LeafSpec};
use lienthong_proto::document::seal;
use lienthong_proto::pb::{Signed, StatusRequest};
use lienthong_proto::signing::Domain;
use lienthong_tests::*;
use prost::Message;
use tonic::Code;

struct Setup {
    world: World,
    broker: Broker,
}

async fn setup() -> Setup {
    let world = World::new();
    let broker = Broker::start(world.broker_config("broker")).await;
    Setup { world, broker }
}

impl Setup {
    async fn client_of(
        &self,
        code: &str,
    ) -> lienthong_proto::pb::exchange_client::ExchangeClient<tonic::transport::Channel> {
        exchange_client(
            &self.broker.url,
            self.world.agency_tls(code).client_config("localhost"),
        )
        .await
        .unwrap()
    }

    /// Asserts the broker knows nothing of `message_id`.
    async fn assert_not_stored(&self, message_id: &str) {
        let mut client = self.client_of(A).await;
        let status = client
            .status(StatusRequest {
                message_id: message_id.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }

    /// Sends a valid document to B, starts B, and asserts B's inbox holds only it.
    async fn assert_nothing_delivered_to_b(&self) {
        let key = self.world.agency_tls(A).signing_key().unwrap();
        let header = header(A, &[B], &[]);
        let mut client = self.client_of(A).await;
        submit(&mut client, seal(&header, &key).unwrap(), &[])
            .await
            .unwrap();
        let b = Agent::start(self.world.agent_config(B, &self.broker.url)).await;
        wait_for_path(&self.world.inbox_dir(B).join(&header.message_id)).await;
        assert_eq!(
            inbox_entries(&self.world.inbox_dir(B)),
            vec![header.message_id.clone()]
        );
        b.stop().await;
    }
}

fn flip_bit(bytes: &mut [u8], index: usize) {
    bytes[index % bytes.len()] ^= 0x01;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_attachment_header_or_foreign_signature_is_invalid_argument() {
    let setup = setup().await;
    let key_a = setup.world.agency_tls(A).signing_key().unwrap();
    let body: Vec<u8> = b"bien ban hop".repeat(100);
    let mut client = setup.client_of(A).await;
    let mut refused_ids = Vec::new();

    // 1. Attachment bytes changed after signing.
    let h = header(A, &[B], &[("a.txt", &body)]);
    let envelope = seal(&h, &key_a).unwrap();
    let mut tampered = body.clone();
    flip_bit(&mut tampered, 17);
    let status = submit(&mut client, envelope, &[&tampered])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("SHA-256"), "{}", status.message());
    refused_ids.push(h.message_id);

    // 2. Header bytes changed after signing.
    let h = header(A, &[B], &[("a.txt", &body)]);
    let mut envelope = seal(&h, &key_a).unwrap();
    let mut payload = envelope.payload.to_vec();
    flip_bit(&mut payload, 40);
    envelope.payload = payload.into();
    let status = submit(&mut client, envelope, &[&body]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    refused_ids.push(h.message_id);

    // 3. Signed by another key (a second certificate for the same agency from the same
    //    CA), with A's certificate chain attached.
    let other = setup
        .world
        .custom_tls(None, &LeafSpec::agency(A))
        .signing_key()
        .unwrap();
    let h = header(A, &[B], &[("a.txt", &body)]);
    let forged = seal(&h, &other).unwrap();
    let envelope = Signed {
        cert_chain: key_a.chain().iter().map(|c| c.to_vec()).collect(),
        ..forged
    };
    let status = submit(&mut client, envelope, &[&body]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    refused_ids.push(h.message_id);

    // 4. A receipt-domain signature presented as a document.
    let h = header(A, &[B], &[]);
    let envelope = key_a
        .sign(Domain::Receipt, h.encode_to_vec().into())
        .unwrap();
    let status = submit(&mut client, envelope, &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    refused_ids.push(h.message_id);

    for id in &refused_ids {
        setup.assert_not_stored(id).await;
    }
    setup.assert_nothing_delivered_to_b().await;
    setup.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agency_claiming_another_sender_is_permission_denied() {
    let setup = setup().await;
    let key_a = setup.world.agency_tls(A).signing_key().unwrap();
    let key_c = setup.world.agency_tls(C).signing_key().unwrap();
    let mut client = setup.client_of(A).await;

    // A signs a header that claims sender C.
    let h = header(C, &[B], &[]);
    let envelope = key_a
        .sign(Domain::DocumentHeader, h.encode_to_vec().into())
        .unwrap();
    let status = submit(&mut client, envelope, &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A relays a document genuinely signed by C over A's own TLS identity.
    let h2 = header(C, &[B], &[]);
    let envelope = seal(&h2, &key_c).unwrap();
    let status = submit(&mut client, envelope, &[]).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(C), "{}", status.message());

    setup.assert_not_stored(&h.message_id).await;
    setup.assert_not_stored(&h2.message_id).await;
    setup.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_recipient_and_bad_codes_are_invalid_argument() {
    let setup = setup().await;
    let key_a = setup.world.agency_tls(A).signing_key().unwrap();
    let mut client = setup.client_of(A).await;
    let h = header(A, &["000.00.99.H31"], &[]);
    let status = submit(&mut client, seal(&h, &key_a).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("000.00.99.H31"),
        "{}",
        status.message()
    );
    setup.assert_not_stored(&h.message_id).await;
    setup.broker.stop().await;
}

/// A call with `tls` fails: at the handshake (connect error) or on the first call with
/// `UNAUTHENTICATED` or a transport-level code (TLS 1.3 reports a refused client
/// certificate only after the handshake).
async fn assert_refused(setup: &Setup, tls: tonic::transport::ClientTlsConfig, what: &str) {
    let key_a = setup.world.agency_tls(A).signing_key().unwrap();
    let h = header(A, &[B], &[]);
    let envelope = seal(&h, &key_a).unwrap();
    match exchange_client(&setup.broker.url, tls).await {
        Err(_) => {}
        Ok(mut client) => {
            let status = submit(&mut client, envelope, &[]).await.unwrap_err();
            assert!(
                matches!(
                    status.code(),
                    Code::Unauthenticated
                        | Code::Unknown
                        | Code::Unavailable
                        | Code::Cancelled
                        | Code::Internal
                ),
                "{what}: unexpected {status:?}"
            );
        }
    }
    setup.assert_not_stored(&h.message_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_rogue_or_expired_client_certificates_are_refused() {
    let setup = setup().await;
    assert_refused(&setup, anonymous_tls(&setup.world), "no client certificate").await;

    let rogue_ca = DevCa::generate("rogue CA").unwrap();
    let rogue = setup
        .world
        .custom_tls(Some(&rogue_ca), &LeafSpec::agency(A));
    assert_refused(&setup, rogue.client_config("localhost"), "rogue CA").await;

    let expired = setup.world.custom_tls(None, &LeafSpec::agency(A).expired());
    assert_refused(&setup, expired.client_config("localhost"), "expired").await;

    // A trusted certificate without an agency identity reaches the handler and is
    // refused there with UNAUTHENTICATED.
    let anonymous = setup
        .world
        .custom_tls(None, &LeafSpec::agency(A).without_uri());
    let mut client = exchange_client(&setup.broker.url, anonymous.client_config("localhost"))
        .await
        .unwrap();
    let key_a = setup.world.agency_tls(A).signing_key().unwrap();
    let h = header(A, &[B], &[]);
    let status = submit(&mut client, seal(&h, &key_a).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    setup.assert_not_stored(&h.message_id).await;

    // An operator certificate may not submit documents.
    let mut client = exchange_client(
        &setup.broker.url,
        setup.world.operator_tls().client_config("localhost"),
    )
    .await
    .unwrap();
    let h = header(A, &[B], &[]);
    let status = submit(&mut client, seal(&h, &key_a).unwrap(), &[])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    setup.broker.stop().await;
}
