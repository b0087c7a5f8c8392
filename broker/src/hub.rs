//! The registry of live agent sessions: at most one per agency.
//!
//! A new session for an agency replaces the old one (the old one is cancelled), since an
//! agent that reconnected after a network cut is the same agent. Submissions wake the
//! recipients' sessions through their `Notify`; a wake-up for an agency without a session
//! is simply dropped, because the queue in the store is the source of truth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the hub knows of one live session.
#[derive(Clone)]
pub struct SessionHandle {
    pub id: u64,
    pub notify: Arc<Notify>,
    pub cancel: CancellationToken,
    pub connected_since_ms: i64,
    pub in_flight: Arc<AtomicU64>,
    pub last_seen_ms: Arc<AtomicI64>,
}

/// A snapshot of a session for the admin view.
#[derive(Debug, Clone, Copy)]
pub struct SessionInfo {
    pub connected_since_ms: i64,
    pub in_flight: u64,
    pub last_seen_ms: i64,
}

#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<String, SessionHandle>>,
    next_id: AtomicU64,
}

impl Hub {
    /// Registers a new session for `agency`, cancelling any previous one.
    pub fn register(&self, agency: &str, parent: &CancellationToken) -> SessionHandle {
        let handle = SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            notify: Arc::new(Notify::new()),
            cancel: parent.child_token(),
            connected_since_ms: lienthong_proto::now_ms(),
            in_flight: Arc::new(AtomicU64::new(0)),
            last_seen_ms: Arc::new(AtomicI64::new(lienthong_proto::now_ms())),
        };
        let previous = self
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(agency.to_owned(), handle.clone());
        if let Some(previous) = previous {
            tracing::info!(agency, "new session replaces the previous one");
            previous.cancel.cancel();
        }
        handle
    }

    /// Removes the session `id` of `agency`, unless a newer one replaced it.
    pub fn deregister(&self, agency: &str, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if sessions.get(agency).is_some_and(|h| h.id == id) {
            sessions.remove(agency);
        }
    }

    /// Ends the live session of `agency`, if it has one (e.g. it was suspended); the
    /// session task records its unacknowledged deliveries as "session ended".
    pub fn end_session(&self, agency: &str) -> bool {
        let removed = self
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(agency);
        removed.map(|h| h.cancel.cancel()).is_some()
    }

    /// Wakes the session of `agency`, if it has one.
    pub fn wake(&self, agency: &str) {
        if let Some(handle) = self
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(agency)
        {
            handle.notify.notify_one();
        }
    }

    /// How many agencies have a live session.
    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn info(&self, agency: &str) -> Option<SessionInfo> {
        self.sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(agency)
            .map(|h| SessionInfo {
                connected_since_ms: h.connected_since_ms,
                in_flight: h.in_flight.load(Ordering::Relaxed),
                last_seen_ms: h.last_seen_ms.load(Ordering::Relaxed),
            })
    }
}
