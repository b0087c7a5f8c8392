//! The answers kept for `Idempotency-Key` retries of the send routes.
//!
//! Tree `idempotency`: `k<key>` → [`IdempotencyRecord`] (JSON) and `t<at_ms BE><key>`
//! → empty, the same entries in age order for pruning.
//!
//! Invariants:
//! - An entry is written only after the documents it answers for (after they are
//!   durable, or for a single send by the sealer right after the document in the same
//!   group write, so that sled's ordered log never keeps the entry without the
//!   document), and made durable before the answer leaves: a retry finds it after a
//!   restart. (A crash that keeps the document but not the entry makes the retry send
//!   again. The window is one sled write.)
//! - Entries are kept for at most [`IDEMPOTENCY_MAX_AGE_MS`] and at most
//!   [`IDEMPOTENCY_MAX_ENTRIES`]: every write prunes the expired ones and then the
//!   oldest over the count, so the tree stays bounded whatever clients send. A lookup
//!   treats an expired entry as absent.
//! - Both keys of an entry are written and removed in one atomic batch.

use serde::{Deserialize, Serialize};

use super::{Store, StoreError, decode_json, encode_json, key};

/// How long an answer is kept for retries: a day, as clients retry within hours.
pub const IDEMPOTENCY_MAX_AGE_MS: i64 = 24 * 60 * 60 * 1000;
/// The most answers kept (about a day of a busy agency's documents, a few MB).
pub const IDEMPOTENCY_MAX_ENTRIES: u64 = 100_000;

/// What a send answered under one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// Hex SHA-256 of the route and the request body: the same key with another
    /// request is a conflict, not a retry.
    pub fingerprint: String,
    /// The route, for the conflict message (`POST /v1/documents`).
    pub route: String,
    pub at_ms: i64,
    /// The HTTP status answered.
    pub status: u16,
    /// The JSON body answered, verbatim.
    pub body: String,
}

fn age_key(at_ms: i64, idem_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(idem_key.len().saturating_add(9));
    k.push(b't');
    // Times before 1970 do not occur; clamped so the order stays numeric.
    k.extend_from_slice(&u64::try_from(at_ms).unwrap_or(0).to_be_bytes());
    k.extend_from_slice(idem_key.as_bytes());
    k
}

fn age_of(age_key: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = age_key.get(1..9)?.try_into().ok()?;
    i64::try_from(u64::from_be_bytes(bytes)).ok()
}

impl Store {
    /// The answer kept under `idem_key`, unless it is older than the retention at
    /// `now_ms`.
    pub fn idempotency_get(
        &self,
        idem_key: &str,
        now_ms: i64,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let k = key(b'k', idem_key);
        let Some(value) = self.idempotency.get(&k)? else {
            return Ok(None);
        };
        let record: IdempotencyRecord = decode_json(&k, &value)?;
        if now_ms.saturating_sub(record.at_ms) > IDEMPOTENCY_MAX_AGE_MS {
            return Ok(None);
        }
        Ok(Some(record))
    }

    /// Keeps `record` under `idem_key` (replacing an expired one), pruning to the
    /// default bounds. Call [`Store::durable`] before answering.
    pub fn idempotency_put(
        &self,
        idem_key: &str,
        record: &IdempotencyRecord,
    ) -> Result<(), StoreError> {
        self.idempotency_put_bounded(
            idem_key,
            record,
            IDEMPOTENCY_MAX_AGE_MS,
            IDEMPOTENCY_MAX_ENTRIES,
        )
    }

    /// [`Store::idempotency_put`] with explicit bounds (tests use small ones).
    pub fn idempotency_put_bounded(
        &self,
        idem_key: &str,
        record: &IdempotencyRecord,
        max_age_ms: i64,
        max_entries: u64,
    ) -> Result<(), StoreError> {
        self.idempotency_put_many_bounded(&[(idem_key, record)], max_age_ms, max_entries)
    }

    /// Keeps several answers with one batch write and one pruning pass (the sealer's
    /// group), to the default bounds. Call [`Store::durable`] before answering.
    pub fn idempotency_put_many(
        &self,
        entries: &[(&str, &IdempotencyRecord)],
    ) -> Result<(), StoreError> {
        self.idempotency_put_many_bounded(entries, IDEMPOTENCY_MAX_AGE_MS, IDEMPOTENCY_MAX_ENTRIES)
    }

    fn idempotency_put_many_bounded(
        &self,
        new_entries: &[(&str, &IdempotencyRecord)],
        max_age_ms: i64,
        max_entries: u64,
    ) -> Result<(), StoreError> {
        if new_entries.is_empty() {
            return Ok(());
        }
        // One writer at a time keeps the count exact.
        let mut count = self
            .idempotency_count
            .lock()
            .map_err(|_| StoreError::Task("idempotency count lock poisoned".into()))?;
        let mut entries = match *count {
            Some(n) => n,
            None => {
                let mut n = 0u64;
                for k in self.idempotency.scan_prefix(b"t").keys() {
                    k?;
                    n = n.saturating_add(1);
                }
                n
            }
        };
        // One tree: a batch is atomic and much cheaper than a transaction.
        let mut batch = sled::Batch::default();
        let mut written = std::collections::HashSet::new();
        let mut newest_at = i64::MIN;
        for (idem_key, record) in new_entries {
            let main = key(b'k', idem_key);
            let earlier: Option<IdempotencyRecord> = self
                .idempotency
                .get(&main)?
                .map(|v| decode_json(&main, &v))
                .transpose()?;
            let age = age_key(record.at_ms, idem_key);
            match &earlier {
                Some(e) => batch.remove(age_key(e.at_ms, idem_key)),
                None => entries = entries.saturating_add(1),
            }
            batch.insert(main, encode_json(*record)?);
            batch.insert(age.as_slice(), &[] as &[u8]);
            written.insert(age);
            newest_at = newest_at.max(record.at_ms);
        }
        self.idempotency.apply_batch(batch)?;
        // Oldest first: expired ones, then the oldest over the count.
        let cutoff = newest_at.saturating_sub(max_age_ms);
        let mut removals = sled::Batch::default();
        let mut left = entries;
        for k in self.idempotency.scan_prefix(b"t").keys() {
            let k = k?;
            let expired = age_of(&k).is_none_or(|at| at < cutoff);
            if !expired && left <= max_entries {
                break;
            }
            if written.contains(k.as_ref()) {
                // Never prune the entries just written.
                continue;
            }
            let idem = k.get(9..).unwrap_or_default();
            let mut main = Vec::with_capacity(idem.len().saturating_add(1));
            main.push(b'k');
            main.extend_from_slice(idem);
            removals.remove(k.as_ref());
            removals.remove(main);
            left = left.saturating_sub(1);
        }
        self.idempotency.apply_batch(removals)?;
        *count = Some(left);
        Ok(())
    }

    /// How many answers are kept.
    pub fn idempotency_len(&self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for k in self.idempotency.scan_prefix(b"t").keys() {
            k?;
            n = n.saturating_add(1);
        }
        Ok(n)
    }

    /// Claims `idem_key` for a request in progress; `false` when another request with
    /// it is running now (the caller answers 409 rather than send twice).
    pub fn idempotency_claim(&self, idem_key: &str) -> bool {
        match self.idempotency_running.lock() {
            Ok(mut running) => running.insert(idem_key.to_owned()),
            Err(_) => false,
        }
    }

    /// Releases a claim of [`Store::idempotency_claim`].
    pub fn idempotency_release(&self, idem_key: &str) {
        if let Ok(mut running) = self.idempotency_running.lock() {
            running.remove(idem_key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(at_ms: i64, body: &str) -> IdempotencyRecord {
        IdempotencyRecord {
            fingerprint: "f".into(),
            route: "POST /v1/documents".into(),
            at_ms,
            status: 202,
            body: body.into(),
        }
    }

    #[test]
    fn kept_expired_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let day = IDEMPOTENCY_MAX_AGE_MS;
        store.idempotency_put("a", &record(1_000, "A")).unwrap();
        assert_eq!(
            store.idempotency_get("a", 2_000).unwrap().unwrap().body,
            "A"
        );
        // Past the retention it is absent, and the next write prunes it.
        assert!(store.idempotency_get("a", 1_001 + day).unwrap().is_none());
        store
            .idempotency_put("b", &record(2_000 + day, "B"))
            .unwrap();
        assert_eq!(store.idempotency_len().unwrap(), 1);
        // Over the count, the oldest go first.
        for (i, name) in ["c", "d", "e"].iter().enumerate() {
            let at = 3_000 + day + i64::try_from(i).unwrap();
            store
                .idempotency_put_bounded(name, &record(at, name), day, 2)
                .unwrap();
        }
        assert_eq!(store.idempotency_len().unwrap(), 2);
        let now = 4_000 + day;
        assert!(store.idempotency_get("b", now).unwrap().is_none());
        assert!(store.idempotency_get("c", now).unwrap().is_none());
        assert!(store.idempotency_get("d", now).unwrap().is_some());
        assert!(store.idempotency_get("e", now).unwrap().is_some());
        // Rewriting a key replaces its age entry rather than adding one.
        store
            .idempotency_put_bounded("e", &record(5_000 + day, "E2"), day, 2)
            .unwrap();
        assert_eq!(store.idempotency_len().unwrap(), 2);
        drop(store);
        // Durable across a reopen.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.idempotency_get("e", now).unwrap().unwrap().body, "E2");
    }

    #[test]
    fn a_claim_is_exclusive_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.idempotency_claim("k"));
        assert!(!store.idempotency_claim("k"));
        store.idempotency_release("k");
        assert!(store.idempotency_claim("k"));
    }
}
