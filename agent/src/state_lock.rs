//! The agent state's lock: who takes it, how long they waited, and who held it long.
//!
//! A scrape, the OTLP push, the /proc rescan and the ring-buffer handlers share one state.
//! Slow work (inspecting and probing a Redis binary, reading /proc for a snapshot) happens
//! outside it; what is left is short. The wait of every taker is kept as a histogram per
//! site (`fanout.state_lock.wait`), so that a stall shows up as a number, not a guess.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::metrics::HistogramValue;

/// Bucket bounds of the wait histogram, in seconds.
pub const WAIT_BOUNDS: [f64; 9] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0];

/// A hold longer than this is logged (at debug) with its site.
const LONG_HOLD: Duration = Duration::from_millis(50);

#[derive(Clone, Debug, Default)]
struct Waits {
    /// One per bound, then +Inf.
    counts: [u64; WAIT_BOUNDS.len() + 1],
    sum: f64,
}

/// Wait histograms by site (a handful of static names: bounded).
#[derive(Debug, Default)]
pub struct LockWaits(parking_lot::Mutex<BTreeMap<&'static str, Waits>>);

impl LockWaits {
    pub fn record(&self, site: &'static str, waited: Duration) {
        let seconds = waited.as_secs_f64();
        let bucket = WAIT_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(WAIT_BOUNDS.len());
        let mut sites = self.0.lock();
        let waits = sites.entry(site).or_default();
        waits.counts[bucket] += 1;
        waits.sum += seconds;
    }

    /// Cumulative-from-start histograms, one per site that ever took the lock.
    pub fn histograms(&self) -> Vec<(&'static str, HistogramValue)> {
        self.0
            .lock()
            .iter()
            .map(|(site, waits)| {
                (
                    *site,
                    HistogramValue {
                        bounds: WAIT_BOUNDS.to_vec(),
                        counts: waits.counts.to_vec(),
                        sum: waits.sum,
                        count: waits.counts.iter().sum(),
                    },
                )
            })
            .collect()
    }
}

/// The state (the agent's: `T` is `AgentState`), locked by `site`. Released fairly: a thread
/// already waiting gets the lock before the releasing thread can take it back.
pub struct StateGuard<'a, T> {
    guard: Option<parking_lot::MutexGuard<'a, T>>,
    site: &'static str,
    since: Instant,
}

impl<'a, T> StateGuard<'a, T> {
    pub fn take(lock: &'a parking_lot::Mutex<T>, site: &'static str, waits: &LockWaits) -> Self {
        let asked = Instant::now();
        let guard = lock.lock();
        let since = Instant::now();
        waits.record(site, since - asked);
        Self {
            guard: Some(guard),
            site,
            since,
        }
    }
}

impl<T> std::ops::Deref for StateGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl<T> std::ops::DerefMut for StateGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl<T> Drop for StateGuard<'_, T> {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            parking_lot::MutexGuard::unlock_fair(guard);
        }
        let held = self.since.elapsed();
        if held > LONG_HOLD {
            tracing::debug!(
                site = self.site,
                held_ms = held.as_millis() as u64,
                "state lock held long"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_land_in_their_buckets_per_site() {
        let waits = LockWaits::default();
        waits.record("snapshot", Duration::from_micros(200));
        waits.record("snapshot", Duration::from_millis(150));
        waits.record("snapshot", Duration::from_secs(3));
        waits.record("rescan", Duration::from_millis(1));
        let h = waits.histograms();
        assert_eq!(h.len(), 2);
        let (site, rescan) = &h[0];
        assert_eq!(*site, "rescan");
        assert_eq!(rescan.counts[0], 1, "1 ms is in the <= 1 ms bucket");
        let (_, snapshot) = &h[1];
        assert_eq!(snapshot.count, 3);
        assert_eq!(snapshot.counts, vec![1, 0, 0, 0, 0, 0, 1, 0, 0, 1]);
        assert!((snapshot.sum - 3.1502).abs() < 1e-9);
    }
}
