//! Delivered and dead-lettered counts per recipient agency over the last hour and the
//! last 24 hours, for the operators' queue view.
//!
//! Kept in memory only, as a ring of per-minute counters per agency fed by the settle
//! paths (a verified delivery receipt, a dead letter): **the counts start from zero
//! each time the broker starts**; what was settled before a restart is not counted.
//! The store holds the settled deliveries themselves, but counting them would mean
//! scanning every delivery record for each queue view.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

/// Minutes kept: one day.
const MINUTES: usize = 24 * 60;
const MINUTE_MS: i64 = 60_000;

/// What settled a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    DeadLettered,
}

/// The counts of one agency.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub delivered_last_hour: u64,
    pub delivered_last_day: u64,
    pub dead_lettered_last_hour: u64,
    pub dead_lettered_last_day: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    /// The minute (Unix ms / 60 000) this slot counts; older contents are stale.
    minute: i64,
    delivered: u64,
    dead: u64,
}

#[derive(Default)]
pub struct RecentCounts {
    rings: Mutex<HashMap<String, Vec<Slot>>>,
}

impl RecentCounts {
    /// Counts one settled delivery for `agency` at `at_ms`.
    pub fn record(&self, agency: &str, outcome: Outcome, at_ms: i64) {
        let minute = at_ms.div_euclid(MINUTE_MS);
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        let ring = rings
            .entry(agency.to_owned())
            .or_insert_with(|| vec![Slot::default(); MINUTES]);
        let index = usize::try_from(minute.rem_euclid(MINUTES as i64)).unwrap_or(0);
        let Some(slot) = ring.get_mut(index) else {
            return;
        };
        if slot.minute != minute {
            *slot = Slot {
                minute,
                ..Slot::default()
            };
        }
        match outcome {
            Outcome::Delivered => slot.delivered = slot.delivered.saturating_add(1),
            Outcome::DeadLettered => slot.dead = slot.dead.saturating_add(1),
        }
    }

    /// The counts of `agency` over the hour and the day before `now_ms` (by minute).
    pub fn counts(&self, agency: &str, now_ms: i64) -> Counts {
        let now = now_ms.div_euclid(MINUTE_MS);
        let rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        let mut counts = Counts::default();
        for slot in rings.get(agency).map(Vec::as_slice).unwrap_or_default() {
            let age = now - slot.minute;
            if !(0..MINUTES as i64).contains(&age) {
                continue;
            }
            counts.delivered_last_day += slot.delivered;
            counts.dead_lettered_last_day += slot.dead;
            if age < 60 {
                counts.delivered_last_hour += slot.delivered;
                counts.dead_lettered_last_hour += slot.dead;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_hour_and_day_and_forgets_older_minutes() {
        let recent = RecentCounts::default();
        let now = 1_000 * MINUTES as i64 * MINUTE_MS;
        recent.record("A", Outcome::Delivered, now);
        recent.record("A", Outcome::Delivered, now - 59 * MINUTE_MS);
        recent.record("A", Outcome::Delivered, now - 61 * MINUTE_MS);
        recent.record("A", Outcome::DeadLettered, now - 23 * 60 * MINUTE_MS);
        recent.record("A", Outcome::DeadLettered, now - 30 * MINUTE_MS);
        recent.record("B", Outcome::Delivered, now);
        assert_eq!(
            recent.counts("A", now),
            Counts {
                delivered_last_hour: 2,
                delivered_last_day: 3,
                dead_lettered_last_hour: 1,
                dead_lettered_last_day: 2,
            }
        );
        // A day later the same slots are stale.
        let later = now + MINUTES as i64 * MINUTE_MS;
        assert_eq!(recent.counts("A", later), Counts::default());
        // A new count in a reused slot replaces the stale one.
        recent.record("A", Outcome::Delivered, later);
        assert_eq!(recent.counts("A", later).delivered_last_day, 1);
        assert_eq!(recent.counts("C", now), Counts::default());
    }
}
