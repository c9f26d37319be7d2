//! The retry budget: retries may add at most a fraction of the recent request rate (plus a
//! small floor), so a sick region cannot turn every request into three.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Window over which requests and retries are counted.
const WINDOW_SECS: u64 = 10;

/// Counts of requests and retries in the current and previous window, packed per window so
/// the hot path is two atomic adds.
#[derive(Debug)]
pub struct RetryBudget {
    epoch: Instant,
    /// Window number the counters belong to.
    window: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    previous_requests: AtomicU64,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            epoch: Instant::now(),
            window: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            previous_requests: AtomicU64::new(0),
        }
    }
}

impl RetryBudget {
    fn roll(&self, now: Instant) {
        let w = now.duration_since(self.epoch).as_secs() / WINDOW_SECS;
        let current = self.window.load(Ordering::Relaxed);
        if w != current
            && self
                .window
                .compare_exchange(current, w, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            let last = self.requests.swap(0, Ordering::AcqRel);
            self.previous_requests
                .store(if w == current + 1 { last } else { 0 }, Ordering::Relaxed);
            self.retries.store(0, Ordering::Relaxed);
        }
    }

    pub fn record_request(&self) {
        self.roll(Instant::now());
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one left.
    pub fn try_retry(&self, ratio: f64, min_per_second: u32) -> bool {
        self.roll(Instant::now());
        let base = self
            .requests
            .load(Ordering::Relaxed)
            .max(self.previous_requests.load(Ordering::Relaxed));
        let allowed = (base as f64 * ratio) as u64 + u64::from(min_per_second) * WINDOW_SECS;
        self.retries.fetch_add(1, Ordering::AcqRel) < allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_allows_floor_plus_ratio() {
        let b = RetryBudget::default();
        // No traffic: only the floor (1/s over 10 s).
        let granted = (0..50).filter(|_| b.try_retry(0.2, 1)).count();
        assert_eq!(granted, 10);
        let b = RetryBudget::default();
        for _ in 0..1000 {
            b.record_request();
        }
        let granted = (0..1000).filter(|_| b.try_retry(0.2, 0)).count();
        assert_eq!(granted, 200);
    }
}
