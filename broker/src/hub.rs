//! The registry of live agent sessions: at most one per agency.
//!
//! The rule: while an agency's session is live, a second Session call for it is refused
//! ([`Hub::try_register`] returns the [`Conflict`]), never swapped in. Two agents running
//! with one certificate would otherwise take the session from each other every few
//! hundred milliseconds and split the agency's documents between two inboxes. "Live"
//! means its stream has not ended: an agent that was killed closes its TCP connection and
//! the session ends at once; a connection cut without a FIN ends when HTTP/2 keepalive
//! gets no answer (`keepalive_interval` + `keepalive_timeout`). Then the agency's next
//! Session call takes the slot. A session cancelled by the broker (suspension, shutdown)
//! no longer counts as live. Submissions wake the
//! recipients' sessions through their `Notify`; a wake-up for an agency without a session
//! is simply dropped, because the queue in the store is the source of truth.

use std::collections::HashMap;
use std::net::SocketAddr;
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
    /// The agent's address, when the transport knows it.
    pub peer: Option<SocketAddr>,
}

/// The live session that made a new one be refused.
#[derive(Debug, Clone, Copy)]
pub struct Conflict {
    pub peer: Option<SocketAddr>,
    pub since_ms: i64,
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
    /// Registers a new session for `agency` from `peer`, unless a live one exists: then
    /// the live one is returned as the conflict and nothing changes.
    pub fn try_register(
        &self,
        agency: &str,
        peer: Option<SocketAddr>,
        parent: &CancellationToken,
    ) -> Result<SessionHandle, Conflict> {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(live) = sessions.get(agency)
            && !live.cancel.is_cancelled()
        {
            return Err(Conflict {
                peer: live.peer,
                since_ms: live.connected_since_ms,
            });
        }
        let handle = SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            notify: Arc::new(Notify::new()),
            cancel: parent.child_token(),
            connected_since_ms: lienthong_proto::now_ms(),
            in_flight: Arc::new(AtomicU64::new(0)),
            last_seen_ms: Arc::new(AtomicI64::new(lienthong_proto::now_ms())),
            peer,
        };
        sessions.insert(agency.to_owned(), handle.clone());
        Ok(handle)
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
