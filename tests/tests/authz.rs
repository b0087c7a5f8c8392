//! The gRPC authorization matrix: every method of every service in the schema (read
//! from the compiled .proto descriptors, so a new RPC cannot be left out) called by
//! every kind of caller, each cell with its expected answer, and for every refused cell
//! the proof that nothing changed in the broker.
//!
//! Callers: no client certificate, agency A, agency B acting on A's document, a
//! suspended agency (C), the operator, the broker's own certificate (server-auth only)
//! and an agency certificate from another CA. A certificate the TLS layer rejects fails
//! on the first call with a code that varies between runs (STACK.md): those cells
//! assert "failed, nothing changed", not one code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use lienthong_certs_dev::{DevCa, LeafSpec};
use lienthong_proto::document::seal;
use lienthong_proto::pb::{self, admin_client::AdminClient, exchange_client::ExchangeClient};
use lienthong_tests::*;
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// The methods this matrix knows how to call, per service. Checked against the
/// descriptors: a new RPC fails the test until it is added here and to `call`.
const EXCHANGE_METHODS: [&str; 6] = [
    "Submit",
    "SubmitBatch",
    "Session",
    "Status",
    "UploadStatus",
    "Directory",
];
const ADMIN_METHODS: [&str; 19] = [
    "ReloadCrls",
    "BindCertificate",
    "UnbindCertificate",
    "Bindings",
    "Block",
    "Unblock",
    "BlockList",
    "Queues",
    "DeadLetters",
    "Redrive",
    "Health",
    "Message",
    "Agencies",
    "RegisterAgency",
    "SuspendAgency",
    "ResumeAgency",
    "AuditTail",
    "AuditVerify",
    "Purge",
];
/// An agency the operator may suspend and resume without touching A, B or C.
const D: &str = "000.00.20.H31";

/// (service full name, method names) from the compiled schema.
fn schema_services() -> Vec<(String, BTreeSet<String>)> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/proto");
    let set = protox::compile(
        ["lienthong/v1/document.proto", "lienthong/v1/exchange.proto"],
        [root],
    )
    .unwrap();
    let mut services = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let name = format!("{}.{}", file.package(), service.name());
            let methods = service.method.iter().map(|m| m.name().to_owned()).collect();
            services.push((name, methods));
        }
    }
    services.sort();
    services
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    NoCertificate,
    AgencyA,
    AgencyBOnAsDocument,
    SuspendedAgency,
    Operator,
    BrokerCertificate,
    OtherCa,
}

const CALLERS: [Caller; 7] = [
    Caller::NoCertificate,
    Caller::AgencyA,
    Caller::AgencyBOnAsDocument,
    Caller::SuspendedAgency,
    Caller::Operator,
    Caller::BrokerCertificate,
    Caller::OtherCa,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The TLS layer refuses the certificate: the call fails (code varies).
    Rejected,
    /// Exactly this code.
    Refused(Code),
    /// Served: success, or a business answer (not found, invalid argument...), but
    /// never an authentication or authorization refusal.
    Served,
}

fn expected(caller: Caller, service: &str, method: &str) -> Expect {
    let admin = service == pb::admin_server::SERVICE_NAME;
    match caller {
        Caller::NoCertificate | Caller::BrokerCertificate | Caller::OtherCa => Expect::Rejected,
        Caller::Operator if admin => Expect::Served,
        Caller::Operator => Expect::Refused(Code::PermissionDenied),
        _ if admin => Expect::Refused(Code::PermissionDenied),
        Caller::SuspendedAgency => Expect::Refused(Code::PermissionDenied),
        Caller::AgencyA => Expect::Served,
        Caller::AgencyBOnAsDocument => match method {
            // A's signed document over B's TLS identity.
            // In a batch the refusal is the document's outcome (see `call`).
            "Submit" | "SubmitBatch" => Expect::Refused(Code::PermissionDenied),
            // A's document to C is not B's to see: as if it did not exist.
            "Status" => Expect::Refused(Code::NotFound),
            // Answers only for B's own uploads: nothing about A's (checked below).
            _ => Expect::Served,
        },
    }
}

/// What the broker holds, as an operator sees it: compared before and after every
/// refused call.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    agencies: Vec<(String, bool)>,
    queues: Vec<(String, u64, u64)>,
    dead_letters: usize,
    documents: u64,
    audit_head: Option<u64>,
}

async fn snapshot(admin: &mut AdminClient<Channel>) -> Snapshot {
    let agencies = admin
        .agencies(pb::AgenciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .agencies
        .into_iter()
        .map(|a| (a.code, a.suspended))
        .collect();
    let queues = admin
        .queues(pb::QueuesRequest {})
        .await
        .unwrap()
        .into_inner()
        .queues
        .into_iter()
        .map(|q| (q.agency, q.pending, q.pending_bytes))
        .collect();
    let dead_letters = admin
        .dead_letters(pb::DeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .len();
    let documents = admin
        .health(pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner()
        .documents;
    let audit_head = admin
        .audit_tail(pb::AuditTailRequest { n: 1 })
        .await
        .unwrap()
        .into_inner()
        .entries
        .last()
        .map(|e| e.seq);
    Snapshot {
        agencies,
        queues,
        dead_letters,
        documents,
        audit_head,
    }
}

/// The document of A (to C) that exists before the matrix runs.
struct Fixture {
    a_document: String,
    a_header_sha256: Vec<u8>,
}

/// Any successful answer.
fn ok<T>(_: T) {}

/// Calls `method` of `service` once over `channel` as `caller`.
async fn call(
    world: &World,
    channel: Channel,
    caller: Caller,
    service: &str,
    method: &str,
    fixture: &Fixture,
) -> Result<(), tonic::Status> {
    let mut exchange = ExchangeClient::new(channel.clone());
    let mut admin = AdminClient::new(channel);
    match (service, method) {
        (pb::exchange_server::SERVICE_NAME, "Submit") => {
            // A fresh document from the sender the caller is (or claims to be).
            let sender = if caller == Caller::SuspendedAgency {
                C
            } else {
                A
            };
            let key = world.agency_tls(sender).signing_key().unwrap();
            let h = header(sender, &[B], &[]);
            submit(&mut exchange, seal(&h, &key).unwrap(), &[])
                .await
                .map(ok)
        }
        (pb::exchange_server::SERVICE_NAME, "SubmitBatch") => {
            let sender = if caller == Caller::SuspendedAgency {
                C
            } else {
                A
            };
            let key = world.agency_tls(sender).signing_key().unwrap();
            let h = header(sender, &[B], &[]);
            let answer = exchange
                .submit_batch(pb::SubmitBatchRequest {
                    documents: vec![pb::BatchDocument {
                        envelope: Some(seal(&h, &key).unwrap()),
                        attachments: Vec::new(),
                    }],
                })
                .await?
                .into_inner();
            assert_eq!(
                answer.outcomes.len(),
                1,
                "{caller:?} SubmitBatch: {answer:?}"
            );
            // A document refused inside the batch counts as the call's answer.
            match &answer.outcomes[0] {
                o if o.code == 0 => Ok(()),
                o => Err(tonic::Status::new(Code::from(o.code), o.message.clone())),
            }
        }
        (pb::exchange_server::SERVICE_NAME, "Session") => {
            let hello = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                    window: 1,
                    partial: Vec::new(),
                    max_batch: 0,
                })),
            };
            // The stream stays open until the answer; dropped after it.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(hello).await.unwrap();
            let answer = exchange
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map(ok);
            drop(tx);
            answer
        }
        (pb::exchange_server::SERVICE_NAME, "Status") => exchange
            .status(pb::StatusRequest {
                message_id: fixture.a_document.clone(),
            })
            .await
            .map(ok),
        (pb::exchange_server::SERVICE_NAME, "UploadStatus") => {
            let answer = exchange
                .upload_status(pb::UploadStatusRequest {
                    message_id: fixture.a_document.clone(),
                    header_sha256: fixture.a_header_sha256.clone(),
                })
                .await?
                .into_inner();
            // Only the sender learns that its document was accepted.
            let reveals = answer.accepted || !answer.stored_bytes.is_empty();
            assert_eq!(
                reveals,
                caller == Caller::AgencyA,
                "{caller:?} UploadStatus: {answer:?}"
            );
            Ok(())
        }
        (pb::exchange_server::SERVICE_NAME, "Directory") => {
            exchange.directory(pb::DirectoryRequest {}).await.map(ok)
        }
        (pb::admin_server::SERVICE_NAME, "Queues") => {
            admin.queues(pb::QueuesRequest {}).await.map(ok)
        }
        (pb::admin_server::SERVICE_NAME, "DeadLetters") => admin
            .dead_letters(pb::DeadLettersRequest::default())
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "Redrive") => admin
            .redrive(pb::RedriveRequest {
                message_id: fixture.a_document.clone(),
                agency: C.into(),
            })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "Health") => {
            admin.health(pb::HealthRequest {}).await.map(ok)
        }
        (pb::admin_server::SERVICE_NAME, "Message") => admin
            .message(pb::MessageRequest {
                id: fixture.a_document.clone(),
            })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "Agencies") => {
            admin.agencies(pb::AgenciesRequest {}).await.map(ok)
        }
        (pb::admin_server::SERVICE_NAME, "RegisterAgency") => {
            // A new code per call: a refused one must not appear.
            let code = format!("000.00.{:02}.H31", 40 + caller as u8);
            admin
                .register_agency(pb::RegisterAgencyRequest {
                    code,
                    name: "Đơn vị thử".into(),
                })
                .await
                .map(ok)
        }
        (pb::admin_server::SERVICE_NAME, "SuspendAgency") => admin
            .suspend_agency(pb::SuspendAgencyRequest {
                code: D.into(),
                reason: "ma trận phân quyền".into(),
            })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "ResumeAgency") => admin
            .resume_agency(pb::ResumeAgencyRequest { code: D.into() })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "AuditTail") => admin
            .audit_tail(pb::AuditTailRequest { n: 1 })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "AuditVerify") => {
            admin.audit_verify(pb::AuditVerifyRequest {}).await.map(ok)
        }
        (pb::admin_server::SERVICE_NAME, "Purge") => admin
            .purge(pb::PurgeRequest {
                from: A.into(),
                to: C.into(),
                reason: String::new(),
            })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "BindCertificate") => admin
            .bind_certificate(pb::BindCertificateRequest {
                code: D.into(),
                cert_der: world.ca.issue(&LeafSpec::agency(D)).unwrap().cert_der,
            })
            .await
            .map(ok),
        // A hash bound to nothing: the operator gets NOT_FOUND, a business answer.
        (pb::admin_server::SERVICE_NAME, "UnbindCertificate") => admin
            .unbind_certificate(pb::UnbindCertificateRequest {
                spki_sha256: vec![7; 32],
            })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "Bindings") => {
            admin.bindings(pb::BindingsRequest::default()).await.map(ok)
        }
        // Blocks (then unblocks) a hash no caller of the matrix presents.
        (pb::admin_server::SERVICE_NAME, "Block") => admin
            .block(pb::BlockRequest {
                spki_sha256: vec![7; 32],
                reason: "ma trận".into(),
            })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "Unblock") => admin
            .unblock(pb::UnblockRequest {
                spki_sha256: vec![7; 32],
            })
            .await
            .map(ok),
        (pb::admin_server::SERVICE_NAME, "ReloadCrls") => {
            admin.reload_crls(pb::ReloadCrlsRequest {}).await.map(ok)
        }
        (pb::admin_server::SERVICE_NAME, "BlockList") => {
            admin.block_list(pb::BlockListRequest {}).await.map(ok)
        }
        (service, method) => panic!(
            "{service}/{method} is not in the authorization matrix: add how to call it to \
             tests/tests/authz.rs with the answer each caller must get"
        ),
    }
}

fn tls_of(world: &World, caller: Caller, rogue: &DevCa) -> ClientTlsConfig {
    match caller {
        Caller::NoCertificate => anonymous_tls(world),
        Caller::AgencyA => world.agency_tls(A).client_config("localhost"),
        Caller::AgencyBOnAsDocument => world.agency_tls(B).client_config("localhost"),
        Caller::SuspendedAgency => world.agency_tls(C).client_config("localhost"),
        Caller::Operator => world.operator_tls().client_config("localhost"),
        Caller::BrokerCertificate => world.broker_tls().client_config("localhost"),
        Caller::OtherCa => world
            .custom_tls(Some(rogue), &LeafSpec::agency(A))
            .client_config("localhost"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_every_kind_of_caller_as_the_matrix_says() {
    // The matrix covers exactly the services and methods of the schema.
    let services = schema_services();
    let names: Vec<&str> = services.iter().map(|(n, _)| n.as_str()).collect();
    let mut known = vec![
        pb::admin_server::SERVICE_NAME,
        pb::exchange_server::SERVICE_NAME,
    ];
    known.sort();
    assert_eq!(names, known, "a service was added: give it a matrix");
    for (service, methods) in &services {
        let listed: BTreeSet<String> = if service == pb::exchange_server::SERVICE_NAME {
            EXCHANGE_METHODS.iter().map(|m| (*m).to_owned()).collect()
        } else {
            ADMIN_METHODS.iter().map(|m| (*m).to_owned()).collect()
        };
        assert_eq!(
            methods, &listed,
            "{service}: the matrix must list every method"
        );
    }

    let world = World::new();
    let mut config = world.broker_config("broker");
    config.agencies.push((
        lienthong_proto::AgencyCode::parse(D).unwrap(),
        "Đơn vị D".into(),
    ));
    let broker = Broker::start(config).await;
    let mut operator = admin_client(&world, &broker.url).await;

    // A's document to C, queued (C runs no agent), then C is suspended.
    let key_a = world.agency_tls(A).signing_key().unwrap();
    let h = header(A, &[C], &[]);
    let envelope = seal(&h, &key_a).unwrap();
    let a_header_sha256 = lienthong_proto::sha256(&envelope.payload).to_vec();
    let mut a = exchange_client(&broker.url, world.agency_tls(A).client_config("localhost"))
        .await
        .unwrap();
    submit(&mut a, envelope, &[]).await.unwrap();
    // The first call of a SAN URI certificate binds it (audited): B and C make theirs
    // here, so that every cell below compares the broker in its steady state.
    for code in [B, C] {
        let mut client = exchange_client(
            &broker.url,
            world.agency_tls(code).client_config("localhost"),
        )
        .await
        .unwrap();
        client.directory(pb::DirectoryRequest {}).await.unwrap();
    }
    operator
        .suspend_agency(pb::SuspendAgencyRequest {
            code: C.into(),
            reason: "ma trận".into(),
        })
        .await
        .unwrap();
    let fixture = Fixture {
        a_document: h.message_id,
        a_header_sha256,
    };

    let rogue = DevCa::generate("rogue CA").unwrap();
    let mut cells = 0;
    for caller in CALLERS {
        // A refused certificate may already fail to connect; that is a failed call.
        let channel = Endpoint::from_shared(broker.url.clone())
            .unwrap()
            .tls_config(tls_of(&world, caller, &rogue))
            .unwrap()
            .connect_timeout(Duration::from_secs(30))
            .connect()
            .await;
        for (service, methods) in &services {
            for method in methods {
                let expect = expected(caller, service, method);
                let before = snapshot(&mut operator).await;
                let result = match &channel {
                    Ok(channel) => tokio::time::timeout(
                        Duration::from_secs(30),
                        call(&world, channel.clone(), caller, service, method, &fixture),
                    )
                    .await
                    .unwrap_or_else(|_| panic!("{caller:?} {service}/{method}: no answer in 30 s")),
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                let cell = format!("{caller:?} × {service}/{method}");
                match (expect, &result) {
                    (Expect::Served, Ok(())) => {}
                    (Expect::Served, Err(status)) => assert!(
                        !matches!(
                            status.code(),
                            Code::Unauthenticated
                                | Code::PermissionDenied
                                | Code::Unknown
                                | Code::Cancelled
                                | Code::Internal
                        ),
                        "{cell}: expected to be served, got {status:?}"
                    ),
                    (Expect::Refused(code), Err(status)) => {
                        assert_eq!(status.code(), code, "{cell}: {status:?}");
                    }
                    (Expect::Refused(code), Ok(())) => {
                        panic!("{cell}: expected {code:?}, the call succeeded")
                    }
                    (Expect::Rejected, Err(_)) => {}
                    (Expect::Rejected, Ok(())) => {
                        panic!("{cell}: a rejected certificate was served")
                    }
                }
                if expect != Expect::Served {
                    assert_eq!(
                        snapshot(&mut operator).await,
                        before,
                        "{cell}: a refused call changed the broker"
                    );
                }
                cells += 1;
            }
        }
    }
    assert_eq!(
        cells,
        CALLERS.len() * (EXCHANGE_METHODS.len() + ADMIN_METHODS.len())
    );
    broker.stop().await;
}
