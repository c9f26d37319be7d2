//! The attempt planner's view of live state: a [`Snapshot`]'s health objects, the request's
//! session (affinity) and the retry budget. Used by the proxy, the decision bench and the
//! no-allocation test, so all three run the same code.

use crate::balance::EndpointLoad;
use crate::retry::RetryBudget;
use crate::route::RegionState;
use crate::route::attempt::{Loads, View};
use crate::runtime::Snapshot;

/// One request's view; cheap to build per attempt.
pub struct LiveView<'a> {
    /// The snapshot in force when the request began.
    pub rt: &'a Snapshot,
    /// The process-wide retry budget that retries draw tokens from.
    pub budget: &'a RetryBudget,
    /// The request's headers (affinity reads its session header).
    pub headers: crate::forward::rewrite::SentFields<'a>,
    /// The request body when it was kept whole (affinity may read a JSON field from it).
    pub body: Option<&'a [u8]>,
}

impl View for LiveView<'_> {
    fn region_state(&self, region: usize, tried: impl Fn(usize) -> bool) -> RegionState {
        self.rt.region_state(region, tried)
    }

    fn fallback_usable(&self) -> bool {
        self.rt.fallback.as_ref().is_some_and(|f| f.breaker.would_admit())
    }

    fn endpoint_loads(&self, region: usize, out: &mut Loads) {
        out.clear();
        let Some(r) = self.rt.regions.get(region) else {
            return;
        };
        let slow_start = self.rt.config.health.slow_start;
        out.extend(r.endpoints.iter().map(|e| e.health.load(e.config.weight, slow_start)));
    }

    fn affinity(&self, region: usize, loads: &[EndpointLoad]) -> Option<Option<usize>> {
        crate::affinity::for_request(self.rt, region, loads, self.headers, self.body)
    }

    fn take_retry(&self) -> bool {
        let retry = &self.rt.config.retry;
        self.budget.try_retry(retry.budget_ratio, retry.budget_min_per_second)
    }
}
