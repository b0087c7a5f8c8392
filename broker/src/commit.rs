//! Group commit: makes sled's writes durable, one flush for everyone waiting.
//!
//! A writer applies its changes to sled, then calls [`GroupCommit::durable`] and waits.
//! A single task takes every request that is waiting, flushes sled once and then
//! `fdatasync`s sled's data file (sled's own flush stops at `sync_file_range`, which
//! survives a killed process but not a power cut), and answers all of them. Requests that
//! arrive during a flush are served by the next one, so each waiter's writes are always
//! covered by the flush that answers it. There is no timer: under no load a request is
//! flushed at once; under load, batches grow by themselves.
//!
//! After a failed flush the store is poisoned: every later request fails too, because
//! sled's state on disk is then unknown and acknowledging anything would be a lie.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot, watch};

/// Why a durability request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("flushing the store failed: {0}")]
    FlushFailed(String),
    #[error("the store refused writes after an earlier flush failure")]
    Poisoned,
    #[error("the store is shutting down")]
    Closed,
}

type Waiter = oneshot::Sender<Result<(), CommitError>>;

/// Handle to the group-commit task.
#[derive(Clone)]
pub struct GroupCommit {
    requests: mpsc::UnboundedSender<Waiter>,
    poisoned: Arc<AtomicBool>,
    /// Its sender lives in the task: closed once the task has ended and let go of sled.
    ended: watch::Receiver<()>,
}

impl GroupCommit {
    /// Starts the commit task for `db` stored in `dir`. The data file is opened once
    /// here so each commit costs one flush and one `fdatasync`, nothing else.
    pub fn start(db: sled::Db, dir: &Path) -> std::io::Result<Self> {
        let data_file = File::open(sled_data_file(dir))?;
        let (requests, receiver) = mpsc::unbounded_channel();
        let poisoned = Arc::new(AtomicBool::new(false));
        let poisoned_task = poisoned.clone();
        let (ended_tx, ended) = watch::channel(());
        tokio::spawn(async move {
            commit_loop(db, Arc::new(data_file), receiver, poisoned_task).await;
            drop(ended_tx);
        });
        Ok(Self {
            requests,
            poisoned,
            ended,
        })
    }

    /// Drops this handle and waits until the commit task has ended, which it does once
    /// every handle is gone; the task's `sled::Db` clone and data file are closed then.
    pub async fn finish(self) {
        let Self {
            requests,
            poisoned: _,
            mut ended,
        } = self;
        drop(requests);
        while ended.changed().await.is_ok() {}
    }

    /// Waits until everything written to sled before this call is on disk.
    pub async fn durable(&self) -> Result<(), CommitError> {
        if self.is_poisoned() {
            return Err(CommitError::Poisoned);
        }
        let (tx, rx) = oneshot::channel();
        self.requests.send(tx).map_err(|_| CommitError::Closed)?;
        rx.await.map_err(|_| CommitError::Closed)?
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}

/// sled 0.34 keeps its log and pages in one file named `db` inside its directory.
pub fn sled_data_file(dir: &Path) -> PathBuf {
    dir.join("db")
}

async fn commit_loop(
    db: sled::Db,
    data_file: Arc<File>,
    mut receiver: mpsc::UnboundedReceiver<Waiter>,
    poisoned: Arc<AtomicBool>,
) {
    while let Some(first) = receiver.recv().await {
        let mut waiters = vec![first];
        while let Ok(next) = receiver.try_recv() {
            waiters.push(next);
        }
        let result = if poisoned.load(Ordering::Acquire) {
            Err(CommitError::Poisoned)
        } else {
            let started = std::time::Instant::now();
            let outcome = flush_and_sync(&db, &data_file).await;
            crate::metrics::store_flush_seconds().observe(started.elapsed().as_secs_f64());
            if let Err(error) = &outcome {
                poisoned.store(true, Ordering::Release);
                tracing::error!(%error, "store flush failed; refusing further writes");
            }
            outcome
        };
        tracing::trace!(batch = waiters.len(), "group commit");
        for waiter in waiters {
            // A waiter that gave up (its RPC was cancelled) needs no answer.
            let _ = waiter.send(result.clone());
        }
    }
}

/// A flush that takes longer than this is treated as failed: sled can hang forever
/// after a blob write hit a full disk, and a broker that waits forever acknowledges
/// nothing and says nothing.
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn flush_and_sync(db: &sled::Db, data_file: &Arc<File>) -> Result<(), CommitError> {
    tokio::time::timeout(FLUSH_TIMEOUT, db.flush_async())
        .await
        .map_err(|_| CommitError::FlushFailed(format!("no flush within {FLUSH_TIMEOUT:?}")))?
        .map_err(|e| CommitError::FlushFailed(e.to_string()))?;
    let file = data_file.clone();
    tokio::task::spawn_blocking(move || file.sync_data())
        .await
        .map_err(|e| CommitError::FlushFailed(e.to_string()))?
        .map_err(|e| CommitError::FlushFailed(e.to_string()))
}
