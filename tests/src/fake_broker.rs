//! A fake broker: a tonic server of the Exchange service (the broker's mutual-TLS
//! identity, a `127.0.0.1:0` listener) that drives an agent with what the real broker
//! never sends (bad signatures, missing receipts, oversized batches), or stands in
//! front of a real broker and counts what an agent calls.
//!
//! What each call does, as configured with [`FakeExchange`]:
//! - `Session`: the n-th session pushes the n-th prepared list of messages (none once
//!   the lists run out), then stays open until the test calls
//!   [`FakeServer::end_session`]. Every message the agent sends on any session is handed
//!   to the test on [`FakeServer::answers`].
//! - `Submit`, `Status`, `UploadStatus`: forwarded to the real broker given with
//!   [`FakeExchange::forward_to`] (under the fake's client identity); without one,
//!   UNAVAILABLE for `Submit` and UNIMPLEMENTED for the others.
//! - `SubmitBatch`: as [`BatchMode`] says.
//! - `Directory`: an empty directory.
//!
//! Every `Submit` and `SubmitBatch` call is counted in [`Calls`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use lienthong_proto::pb;
use prost::Message as _;
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt as _;

use crate::World;

/// What `SubmitBatch` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchMode {
    /// UNAVAILABLE, as every `Submit` without a real broker behind.
    Unavailable,
    /// UNIMPLEMENTED: a broker older than batches, so the agent falls back to `Submit`.
    Unimplemented,
    /// Each document forwarded to the real broker as its own `Submit`, the outcomes
    /// collected in order (UNAVAILABLE without a real broker).
    ForwardEach,
}

/// How many calls the fake served; shared with the test through [`FakeServer::calls`].
#[derive(Debug, Default)]
pub struct Calls {
    /// `Submit` calls.
    pub submits: AtomicUsize,
    /// `SubmitBatch` calls, refused ones included.
    pub batch_calls: AtomicUsize,
    /// Documents in the `SubmitBatch` calls that were forwarded.
    pub batch_documents: AtomicUsize,
    /// The most documents in one forwarded `SubmitBatch` call.
    pub largest_batch: AtomicUsize,
}

/// The fake's configuration; [`FakeExchange::serve`] starts it.
pub struct FakeExchange {
    sessions: VecDeque<Vec<pb::BrokerMessage>>,
    forward: Option<pb::exchange_client::ExchangeClient<tonic::transport::Channel>>,
    batch_mode: BatchMode,
}

impl Default for FakeExchange {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeExchange {
    /// Pushes nothing, forwards nothing, `SubmitBatch` UNAVAILABLE.
    pub fn new() -> Self {
        Self {
            sessions: VecDeque::new(),
            forward: None,
            batch_mode: BatchMode::Unavailable,
        }
    }

    /// The messages the next session (in the order of these calls) pushes.
    pub fn session(mut self, pushes: Vec<pb::BrokerMessage>) -> Self {
        self.sessions.push_back(pushes);
        self
    }

    /// Deliveries the next session pushes, one `BrokerMessage` each.
    pub fn session_deliveries(self, deliveries: Vec<pb::Delivery>) -> Self {
        self.session(
            deliveries
                .into_iter()
                .map(|d| pb::BrokerMessage {
                    msg: Some(pb::broker_message::Msg::Delivery(d)),
                })
                .collect(),
        )
    }

    /// Forwards `Submit`, `Status` and `UploadStatus` (and `SubmitBatch` with
    /// [`BatchMode::ForwardEach`]) to a real broker over `client`.
    pub fn forward_to(
        mut self,
        client: pb::exchange_client::ExchangeClient<tonic::transport::Channel>,
    ) -> Self {
        self.forward = Some(client);
        self
    }

    pub fn batch_mode(mut self, mode: BatchMode) -> Self {
        self.batch_mode = mode;
        self
    }

    /// Serves the fake with the broker's certificate of `world` on a fresh port.
    pub async fn serve(self, world: &World) -> FakeServer {
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let end = Arc::new(Notify::new());
        let calls = Arc::new(Calls::default());
        let service = Service {
            sessions: Mutex::new(self.sessions),
            forward: self.forward,
            batch_mode: self.batch_mode,
            answers: answers_tx,
            end: Arc::clone(&end),
            calls: Arc::clone(&calls),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(world.broker_tls().server_config())
                .unwrap()
                .add_service(pb::exchange_server::ExchangeServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        FakeServer {
            url: format!("https://localhost:{port}"),
            answers,
            calls,
            end,
            server,
        }
    }
}

/// A running fake broker.
pub struct FakeServer {
    /// `https://localhost:PORT`, for an agent's configuration.
    pub url: String,
    /// Every message agents sent on their sessions, in order.
    pub answers: mpsc::UnboundedReceiver<pb::AgentMessage>,
    pub calls: Arc<Calls>,
    end: Arc<Notify>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl FakeServer {
    /// Ends the session that has pushed its messages and waits (or, when none waits
    /// yet, the next one to get there): the agent sees its stream close.
    pub fn end_session(&self) {
        self.end.notify_one();
    }

    /// Stops serving; open connections are dropped.
    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Service {
    sessions: Mutex<VecDeque<Vec<pb::BrokerMessage>>>,
    forward: Option<pb::exchange_client::ExchangeClient<tonic::transport::Channel>>,
    batch_mode: BatchMode,
    answers: mpsc::UnboundedSender<pb::AgentMessage>,
    end: Arc<Notify>,
    calls: Arc<Calls>,
}

type Pushed = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::BrokerMessage, tonic::Status>> + Send>,
>;

impl Service {
    fn real(&self) -> Option<pb::exchange_client::ExchangeClient<tonic::transport::Channel>> {
        self.forward.clone()
    }

    /// Forwards each document as its own `Submit` and collects the outcomes.
    async fn forward_each(
        &self,
        mut real: pb::exchange_client::ExchangeClient<tonic::transport::Channel>,
        documents: Vec<pb::BatchDocument>,
    ) -> Vec<pb::SubmitOutcome> {
        let mut outcomes = Vec::new();
        for document in documents {
            let envelope = document.envelope.unwrap_or_default();
            let message_id = pb::DocumentHeader::decode(envelope.payload.as_ref())
                .map(|h| h.message_id)
                .unwrap_or_default();
            let attachments: Vec<&[u8]> = document.attachments.iter().map(Vec::as_slice).collect();
            outcomes.push(
                match crate::submit(&mut real, envelope, &attachments).await {
                    Ok(answer) => pb::SubmitOutcome {
                        message_id,
                        submission_receipt: answer.submission_receipt,
                        duplicate: answer.duplicate,
                        code: 0,
                        message: String::new(),
                    },
                    Err(status) => pb::SubmitOutcome {
                        message_id,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                        ..Default::default()
                    },
                },
            );
        }
        outcomes
    }
}

#[tonic::async_trait]
impl pb::exchange_server::Exchange for Service {
    async fn submit(
        &self,
        request: tonic::Request<tonic::Streaming<pb::SubmitFrame>>,
    ) -> Result<tonic::Response<pb::SubmitResponse>, tonic::Status> {
        self.calls.submits.fetch_add(1, Ordering::SeqCst);
        let Some(mut real) = self.real() else {
            return Err(tonic::Status::unavailable("fake broker"));
        };
        let mut inbound = request.into_inner();
        let mut frames = Vec::new();
        while let Some(frame) = inbound.next().await {
            frames.push(frame?);
        }
        real.submit(tokio_stream::iter(frames)).await
    }

    async fn submit_batch(
        &self,
        request: tonic::Request<pb::SubmitBatchRequest>,
    ) -> Result<tonic::Response<pb::SubmitBatchResponse>, tonic::Status> {
        self.calls.batch_calls.fetch_add(1, Ordering::SeqCst);
        let real = match (self.batch_mode, self.real()) {
            (BatchMode::Unimplemented, _) => {
                return Err(tonic::Status::unimplemented("an older broker"));
            }
            (BatchMode::ForwardEach, Some(real)) => real,
            (BatchMode::Unavailable | BatchMode::ForwardEach, _) => {
                return Err(tonic::Status::unavailable("fake broker"));
            }
        };
        let documents = request.into_inner().documents;
        self.calls
            .batch_documents
            .fetch_add(documents.len(), Ordering::SeqCst);
        self.calls
            .largest_batch
            .fetch_max(documents.len(), Ordering::SeqCst);
        let outcomes = self.forward_each(real, documents).await;
        Ok(tonic::Response::new(pb::SubmitBatchResponse { outcomes }))
    }

    type SessionStream = Pushed;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<pb::AgentMessage>>,
    ) -> Result<tonic::Response<Pushed>, tonic::Status> {
        let mut from_agent = request.into_inner();
        let answers = self.answers.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = from_agent.next().await {
                let _ = answers.send(message);
            }
        });
        let pushes = self
            .sessions
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel(pushes.len().max(1));
        let end = Arc::clone(&self.end);
        tokio::spawn(async move {
            for message in pushes {
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
            // Dropping the sender closes the session.
            end.notified().await;
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn status(
        &self,
        request: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::StatusResponse>, tonic::Status> {
        match self.real() {
            Some(mut real) => real.status(request.into_inner()).await,
            None => Err(tonic::Status::unimplemented("fake broker")),
        }
    }

    async fn upload_status(
        &self,
        request: tonic::Request<pb::UploadStatusRequest>,
    ) -> Result<tonic::Response<pb::UploadStatusResponse>, tonic::Status> {
        match self.real() {
            Some(mut real) => real.upload_status(request.into_inner()).await,
            None => Err(tonic::Status::unimplemented("fake broker")),
        }
    }

    async fn directory(
        &self,
        _: tonic::Request<pb::DirectoryRequest>,
    ) -> Result<tonic::Response<pb::DirectoryResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::DirectoryResponse::default()))
    }
}
