//! Retry rules: which requests may be sent again (replay rules), and the retry budget:
//! retries may add at most a fraction of the recent request rate (plus a small floor), so
//! a sick region cannot turn every request into three.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use http::{HeaderName, Method};

use crate::clock;
use crate::forward::request_fields::RequestFields;
use crate::route::path_matches;

/// A client's promise that the endpoint deduplicates (the draft IETF header).
pub(crate) static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// May a request whose bytes may already have reached an endpoint be sent to another?
/// Yes for idempotent methods, requests carrying `Idempotency-Key`, and paths declared
/// safe to replay (`[retry] replay_paths`, matched on whole segments of the normalised
/// path). A failure before anything was sent (connect) is always retryable: see
/// `UpstreamError::retryable`.
pub(crate) fn may_replay(method: &Method, headers: RequestFields<'_>, path: &str, replay_paths: &[String]) -> bool {
    is_idempotent(method)
        || headers.get(&IDEMPOTENCY_KEY).is_some_and(|v| !v.is_empty())
        || replay_paths.iter().any(|p| path_matches(p, path))
}

/// RFC 9110 §9.2.2.
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

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

    pub(crate) fn record_request(&self) {
        // Windows of seconds: the coarse clock is enough (and cheaper on every request).
        self.roll(clock::coarse());
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget if there is one left.
    pub(crate) fn try_retry(&self, ratio: f64, min_per_second: u32) -> bool {
        self.roll(clock::coarse());
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
    use http::HeaderMap;

    #[test]
    fn replay_table() {
        let paths: Vec<String> = crate::config::DEFAULT_REPLAY_PATHS
            .iter()
            .map(|p| p.to_string())
            .collect();
        let key = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(&IDEMPOTENCY_KEY, http::HeaderValue::from_static(v));
            h
        };
        let none = HeaderMap::new();
        let cases: &[(Method, &HeaderMap, &str, bool)] = &[
            (Method::GET, &none, "/v1/files", true),
            (Method::PUT, &none, "/v1/files/x", true),
            (Method::DELETE, &none, "/v1/files/x", true),
            (Method::POST, &none, "/v1/chat/completions", true),
            (Method::POST, &none, "/v1/completions", true),
            (Method::POST, &none, "/v1/embeddings", true),
            (Method::POST, &none, "/v1/responses", true),
            (Method::POST, &none, "/v1/responses/resp_1/cancel", true),
            (Method::POST, &none, "/v1/files", false),
            (Method::POST, &none, "/v1/batches", false),
            (Method::POST, &none, "/v1/fine_tuning/jobs", false),
            (Method::POST, &none, "/v1/chat/completions_x", false),
            (Method::PATCH, &none, "/v1/files/x", false),
            (Method::POST, &key("k-1"), "/v1/files", true),
            (Method::POST, &key(""), "/v1/files", false),
        ];
        for (method, headers, path, want) in cases {
            assert_eq!(
                may_replay(method, (*headers).into(), path, &paths),
                *want,
                "{method} {path}"
            );
        }
        assert!(!may_replay(&Method::POST, (&none).into(), "/v1/chat/completions", &[]));
    }

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
