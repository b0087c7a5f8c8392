//! Admission of calls per agency, so that one agency can neither fill nor stall the
//! broker: how many Submit streams it has open and how many bytes they reserve, the
//! cancellation of its open calls when an operator suspends it, and the partial
//! uploads (`lienthong-blobs/partial/...`) being written now or left behind.
//!
//! Invariants:
//! - An agency's counters (open submissions, reserved bytes) equal the sum over its
//!   live [`Submission`] guards: each guard adds on creation and subtracts exactly what
//!   it added when dropped, with checked arithmetic (a sum that would overflow is over
//!   the limit).
//! - Suspension is linearised with acceptance: a submission stores its document only
//!   while holding its agency's gate for reading and seeing its token not cancelled;
//!   a suspension holds the gate for writing while it writes the store and cancels the
//!   token. So a document is either accepted before the suspension or not at all.
//! - A partial upload folder is either claimed by exactly one live submission or idle;
//!   the sweeper removes only idle folders untouched for the stall timeout, and checks
//!   and removes under the same lock that claims, so it never removes a folder in use.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::error::BrokerError;

/// What the broker tracks for one agency with calls open (or being suspended).
struct AgencyCalls {
    /// Cancelled when the agency is suspended; replaced by a fresh one right after, so
    /// calls that start later are refused by the stored suspension instead.
    token: CancellationToken,
    gate: Arc<RwLock<()>>,
    submissions: u32,
    reserved: u64,
}

impl Default for AgencyCalls {
    fn default() -> Self {
        Self {
            token: CancellationToken::new(),
            gate: Arc::new(RwLock::new(())),
            submissions: 0,
            reserved: 0,
        }
    }
}

#[derive(Default)]
struct Inner {
    agencies: HashMap<String, AgencyCalls>,
    /// Partial upload folders claimed by a live submission.
    active_partials: HashSet<PathBuf>,
}

#[derive(Default)]
pub(crate) struct Admission {
    inner: Mutex<Inner>,
}

impl Admission {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits one more Submit stream of `agency`, or refuses it when the agency already
    /// has `max_submissions` open.
    pub(crate) fn begin_submission(
        &self,
        agency: &str,
        max_submissions: u32,
    ) -> Result<Submission<'_>, BrokerError> {
        let mut inner = self.lock();
        let calls = inner.agencies.entry(agency.to_owned()).or_default();
        let open = calls.submissions;
        let Some(next) = open.checked_add(1).filter(|n| *n <= max_submissions) else {
            tracing::warn!(
                agency,
                open,
                "submission refused: too many open submissions"
            );
            return Err(BrokerError::ResourceExhausted(format!(
                "agency {agency} already has {open} submissions open, the limit \
                 (max_submissions_per_agency = {max_submissions}); finish or cancel one and retry"
            )));
        };
        calls.submissions = next;
        Ok(Submission {
            admission: self,
            agency: agency.to_owned(),
            token: calls.token.clone(),
            reserved: 0,
            partial: None,
        })
    }

    /// Open submissions and reserved bytes of `agency` (for tests and views).
    #[cfg(test)]
    pub(crate) fn usage(&self, agency: &str) -> (u32, u64) {
        self.lock()
            .agencies
            .get(agency)
            .map_or((0, 0), |c| (c.submissions, c.reserved))
    }

    /// Holds `agency`'s gate for writing: no submission of it can store a document
    /// until the guard drops. Take it before writing a suspension to the store, then
    /// call [`Admission::cancel_calls`].
    pub(crate) async fn hold_gate(&self, agency: &str) -> OwnedRwLockWriteGuard<()> {
        let gate = self
            .lock()
            .agencies
            .entry(agency.to_owned())
            .or_default()
            .gate
            .clone();
        gate.write_owned().await
    }

    /// Cancels every open call of `agency` (it was suspended), and gives calls that
    /// start from now on a fresh token: they are refused by the stored suspension.
    pub(crate) fn cancel_calls(&self, agency: &str) -> bool {
        let mut inner = self.lock();
        let Some(calls) = inner.agencies.get_mut(agency) else {
            return false;
        };
        let open = calls.submissions;
        calls.token.cancel();
        calls.token = CancellationToken::new();
        open > 0
    }

    /// Drops the bookkeeping of an agency with nothing open and nobody holding its gate.
    fn forget_if_idle(inner: &mut Inner, agency: &str) {
        if inner.agencies.get(agency).is_some_and(|c| {
            c.submissions == 0 && c.reserved == 0 && Arc::strong_count(&c.gate) == 1
        }) {
            inner.agencies.remove(agency);
        }
    }

    /// Removes the partial upload folders under `root` that no live submission holds
    /// and that nothing touched for `older_than`. Returns (folders removed, bytes freed).
    /// Blocking: call from `spawn_blocking`.
    pub(crate) fn sweep_partials(
        &self,
        root: &Path,
        older_than: Duration,
    ) -> std::io::Result<(u64, u64)> {
        let entries = match std::fs::read_dir(root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(e),
        };
        let now = SystemTime::now();
        let mut removed = (0u64, 0u64);
        for entry in entries {
            let path = entry?.path();
            // Checked and removed under the lock that claims folders: a submission
            // cannot start writing into a folder between the check and the removal.
            let inner = self.lock();
            if inner.active_partials.contains(&path) {
                continue;
            }
            let (touched, bytes) = last_touched_and_size(&path);
            let idle =
                touched.is_some_and(|t| now.duration_since(t).unwrap_or_default() >= older_than);
            if !idle {
                continue;
            }
            let outcome = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            drop(inner);
            match outcome {
                Ok(()) => {
                    removed.0 = removed.0.saturating_add(1);
                    removed.1 = removed.1.saturating_add(bytes);
                    tracing::info!(partial = %path.display(), bytes, "stale partial upload removed");
                }
                Err(error) => {
                    tracing::warn!(partial = %path.display(), %error, "cannot remove a stale partial upload");
                }
            }
        }
        Ok(removed)
    }
}

/// The newest modification time of `path` and the files directly in it, and their
/// total size. A partial upload folder holds one file per attachment, nothing deeper.
fn last_touched_and_size(path: &Path) -> (Option<SystemTime>, u64) {
    let mut newest = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut bytes = 0u64;
    if let Ok(entries) = std::fs::read_dir(path) {
        for meta in entries
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
        {
            bytes = bytes.saturating_add(meta.len());
            if let Ok(modified) = meta.modified() {
                newest = Some(newest.map_or(modified, |n| n.max(modified)));
            }
        }
    }
    (newest, bytes)
}

impl Admission {
    /// Bytes on disk in `sender`'s partial uploads under `root` that no live submission
    /// holds, except the folder `resuming` (the upload about to continue). Blocking.
    pub(crate) fn idle_partial_bytes(&self, root: &Path, sender: &str, resuming: &Path) -> u64 {
        let prefix = format!("{sender}-");
        let Ok(entries) = std::fs::read_dir(root) else {
            return 0;
        };
        let mut total = 0u64;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix));
            if !ours || path == resuming || self.lock().active_partials.contains(&path) {
                continue;
            }
            total = total.saturating_add(last_touched_and_size(&path).1);
        }
        total
    }
}

/// Bytes held in partial uploads under `root` (open streams and leftovers alike).
pub(crate) fn partial_bytes(root: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| last_touched_and_size(&e.path()).1)
        .fold(0u64, u64::saturating_add)
}

/// One admitted Submit stream; releases what it holds when dropped.
pub(crate) struct Submission<'a> {
    admission: &'a Admission,
    agency: String,
    token: CancellationToken,
    reserved: u64,
    partial: Option<PathBuf>,
}

impl Submission<'_> {
    pub(crate) fn agency(&self) -> &str {
        &self.agency
    }

    /// Cancelled when the agency is suspended while this stream is open.
    pub(crate) fn cancelled(&self) -> &CancellationToken {
        &self.token
    }

    /// Reserves `bytes` (the document's declared size) for this stream, or refuses it
    /// when the agency's open streams would then reserve more than `max_reserved`.
    /// `leftover` is what the agency's broken-off uploads still hold on disk until they
    /// are swept: counted too, or an agency could fill the disk by breaking off uploads.
    pub(crate) fn reserve(
        &mut self,
        bytes: u64,
        leftover: u64,
        max_reserved: u64,
    ) -> Result<(), BrokerError> {
        let mut inner = self.admission.lock();
        let calls = inner.agencies.entry(self.agency.clone()).or_default();
        let held = calls.reserved.saturating_add(leftover);
        match held
            .checked_add(bytes)
            .filter(|total| *total <= max_reserved)
        {
            Some(_) => {
                calls.reserved = calls.reserved.saturating_add(bytes);
                self.reserved = self.reserved.saturating_add(bytes);
                Ok(())
            }
            None => {
                tracing::warn!(agency = %self.agency, held, bytes, "submission refused: agency reservation limit");
                Err(BrokerError::ResourceExhausted(format!(
                    "agency {}'s open submissions and unfinished uploads already hold {held} \
                     bytes; this document's {bytes} more would exceed the limit of \
                     {max_reserved} (max_reserved_bytes_per_agency); retry when they finished",
                    self.agency
                )))
            }
        }
    }

    /// Marks `dir` as this stream's partial upload folder, so the sweeper leaves it.
    pub(crate) fn claim_partial(&mut self, dir: &Path) {
        self.admission.lock().active_partials.insert(dir.to_owned());
        self.partial = Some(dir.to_owned());
    }

    /// Waits until no suspension of this agency is being written, and holds that off
    /// until the returned guard drops; refuses when the agency was suspended meanwhile.
    pub(crate) async fn hold_off_suspension(
        &self,
    ) -> Result<OwnedRwLockReadGuard<()>, BrokerError> {
        // The entry lives while this submission is counted in it.
        let gate = self
            .admission
            .lock()
            .agencies
            .entry(self.agency.clone())
            .or_default()
            .gate
            .clone();
        let guard = gate.read_owned().await;
        if self.token.is_cancelled() {
            return Err(suspended_during(&self.agency));
        }
        Ok(guard)
    }
}

/// PERMISSION_DENIED for a stream whose agency was suspended while it was open.
pub(crate) fn suspended_during(agency: &str) -> BrokerError {
    BrokerError::PermissionDenied(format!(
        "agency {agency} was suspended, or the certificate of this call blocked or unbound, \
         while this submission was open; nothing was stored"
    ))
}

impl Drop for Submission<'_> {
    fn drop(&mut self) {
        let mut inner = self.admission.lock();
        if let Some(dir) = self.partial.take() {
            inner.active_partials.remove(&dir);
        }
        if let Some(calls) = inner.agencies.get_mut(&self.agency) {
            calls.submissions = calls.submissions.saturating_sub(1);
            calls.reserved = calls.reserved.saturating_sub(self.reserved);
        }
        Admission::forget_if_idle(&mut inner, &self.agency);
    }
}

/// Sweeps stale partial uploads at start and every `partial_sweep_interval`, until
/// shutdown.
pub(crate) async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.partial_sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The first tick is immediate: leftovers of a previous run go at start.
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let worker = shared.clone();
        let swept = tokio::task::spawn_blocking(move || {
            let root = worker.store.blob_root().join("partial");
            worker
                .admission
                .sweep_partials(&root, worker.config.stall_timeout)
        })
        .await;
        match swept {
            Ok(Ok((0, _))) => {}
            Ok(Ok((folders, bytes))) => {
                tracing::info!(folders, bytes, "stale partial uploads swept");
            }
            Ok(Err(error)) => tracing::warn!(%error, "partial upload sweep failed"),
            Err(error) => tracing::warn!(%error, "partial upload sweep did not finish"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn counters_add_up_refuse_over_the_limits_and_return_to_zero() {
        let admission = Admission::default();
        let a = "000.00.00.H31";
        let mut first = admission.begin_submission(a, 2).unwrap();
        let mut second = admission.begin_submission(a, 2).unwrap();
        let third = admission.begin_submission(a, 2);
        assert!(
            matches!(&third, Err(BrokerError::ResourceExhausted(m)) if m.contains("max_submissions_per_agency")),
            "{:?}",
            third.err()
        );
        first.reserve(100, 0, 150).unwrap();
        let over = second.reserve(51, 0, 150).unwrap_err();
        assert!(
            over.to_string().contains("max_reserved_bytes_per_agency"),
            "{over}"
        );
        // A size near 2^64 cannot wrap the sum into the limit.
        let wrap = second.reserve(u64::MAX - 50, 0, u64::MAX).unwrap_err();
        assert!(
            wrap.to_string().contains("max_reserved_bytes_per_agency"),
            "{wrap}"
        );
        // Leftovers on disk count against the same limit.
        let leftover = second.reserve(50, 1, 150).unwrap_err();
        assert!(
            leftover
                .to_string()
                .contains("max_reserved_bytes_per_agency"),
            "{leftover}"
        );
        second.reserve(50, 0, 150).unwrap();
        assert_eq!(admission.usage(a), (2, 150));
        drop(first);
        assert_eq!(admission.usage(a), (1, 50));
        drop(second);
        assert_eq!(admission.usage(a), (0, 0));
        assert!(admission.lock().agencies.is_empty());
    }

    #[tokio::test]
    async fn suspension_cancels_open_streams_and_waits_for_a_store_in_progress() {
        let admission = Admission::default();
        let a = "000.00.00.H31";
        let open = admission.begin_submission(a, 4).unwrap();
        let storing = open.hold_off_suspension().await.unwrap();
        // The suspension waits for the store in progress.
        let mut suspension = Box::pin(admission.hold_gate(a));
        assert!(futures_util::poll!(&mut suspension).is_pending());
        drop(storing);
        let held = suspension.await;
        assert!(admission.cancel_calls(a));
        drop(held);
        assert!(open.cancelled().is_cancelled());
        assert!(matches!(
            open.hold_off_suspension().await,
            Err(BrokerError::PermissionDenied(_))
        ));
        // A stream opened after the suspension holds a fresh token.
        let later = admission.begin_submission(a, 4).unwrap();
        assert!(!later.cancelled().is_cancelled());
    }

    #[test]
    fn sweep_removes_only_idle_old_folders() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (idle, busy) = (root.join("idle"), root.join("busy"));
        for d in [&idle, &busy] {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join("0"), vec![1u8; 1000]).unwrap();
        }
        let admission = Admission::default();
        assert_eq!(partial_bytes(root), 2000);
        // Too young for a long stall timeout.
        assert_eq!(
            admission
                .sweep_partials(root, Duration::from_secs(3600))
                .unwrap(),
            (0, 0)
        );
        let mut holder = admission.begin_submission("000.00.00.H31", 1).unwrap();
        holder.claim_partial(&busy);
        assert_eq!(
            admission.sweep_partials(root, Duration::ZERO).unwrap(),
            (1, 1000)
        );
        assert!(!idle.exists() && busy.exists());
        drop(holder);
        assert_eq!(
            admission.sweep_partials(root, Duration::ZERO).unwrap(),
            (1, 1000)
        );
        assert!(!busy.exists());
        assert_eq!(partial_bytes(root), 0);
    }
}
