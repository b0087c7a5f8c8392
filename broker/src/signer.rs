//! The submission-receipt signer of the single `Submit` path: concurrent submissions
//! share one batch signature (DESIGN section 4, X-Road's batch signer).
//!
//! One task owns the work: it takes the first waiting receipt and everything that
//! queued while the previous signature ran (at most [`MAX_BATCH`]), signs them with
//! one `sign_receipts` call and answers each caller with its own `Signed` and inclusion
//! proof. There is no timer: alone, a receipt is signed at once, as a batch of one,
//! which is the single-signature format of version 1.
//!
//! Invariants: every request gets exactly one answer (its receipt, or the signing error
//! for the whole batch); the queue is bounded ([`QUEUE`]), so waiting callers cannot
//! grow memory without bound; the task ends when the last handle is dropped.

use std::sync::Arc;

use lienthong_proto::ProtocolError;
use lienthong_proto::SigningKey;
use lienthong_proto::pb::{Receipt, Signed};
use lienthong_proto::receipt::sign_receipts;
use tokio::sync::{mpsc, oneshot};

use crate::error::BrokerError;

/// Most receipts under one signature.
const MAX_BATCH: usize = 1024;
/// Receipts waiting for the signer at most; a caller beyond waits for room.
const QUEUE: usize = 4096;

type Reply = oneshot::Sender<Result<Signed, ProtocolError>>;

/// Handle to the signer task.
pub(crate) struct ReceiptSigner {
    requests: mpsc::Sender<(Receipt, Reply)>,
}

impl ReceiptSigner {
    /// Starts the signer task with `key` (within a tokio runtime).
    pub(crate) fn start(key: Arc<SigningKey>) -> Self {
        let (requests, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(sign_loop(key, receiver));
        Self { requests }
    }

    /// Signs `receipt`, together with whatever other receipts queued meanwhile.
    pub(crate) async fn sign(&self, receipt: Receipt) -> Result<Signed, BrokerError> {
        let (reply, answer) = oneshot::channel();
        let gone = || BrokerError::Serve("the receipt signer has stopped".into());
        self.requests
            .send((receipt, reply))
            .await
            .map_err(|_| gone())?;
        Ok(answer.await.map_err(|_| gone())??)
    }
}

async fn sign_loop(key: Arc<SigningKey>, mut receiver: mpsc::Receiver<(Receipt, Reply)>) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (receipts, replies): (Vec<Receipt>, Vec<Reply>) = batch.into_iter().unzip();
        // One signature plus a hash per receipt: short enough to run on this task.
        match sign_receipts(&receipts, &key) {
            Ok(signed) if signed.len() == replies.len() => {
                for (reply, signed) in replies.into_iter().zip(signed) {
                    // A caller that gave up (its call ended) needs no answer.
                    let _ = reply.send(Ok(signed));
                }
            }
            Ok(_) => {
                for reply in replies {
                    let _ = reply.send(Err(ProtocolError::Key {
                        detail: "the batch signer returned another number of receipts".into(),
                    }));
                }
            }
            Err(error) => {
                tracing::error!(%error, receipts = receipts.len(), "cannot sign submission receipts");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}
