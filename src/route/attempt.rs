//! The attempt planner (pure): where attempt n of a request goes — a region's endpoint, the
//! fallback, Meridian's own refusal, or nowhere — given the route plan, a view of region and
//! endpoint state, what was tried and how it failed, and the retry policy.
//!
//! The proxy's loop only does I/O around [`next_attempt`]: send, record the outcome in the
//! tried list, ask again. Whether a failure may be retried is decided here, once
//! (`may_retry`), from the failure's retry class and the request's replay permission.

use smallvec::SmallVec;

use super::decide::{Decision, NoRegion, RegionState, RoutePlan, select};
use super::table::RegionId;
use crate::balance::{self, EndpointLoad};

/// May the attempt be made again elsewhere (Pingora's `fail_to_connect` versus
/// `error_while_proxy`)? The forwarder classifies each failure; the planner decides
/// with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryClass {
    /// Nothing reached the endpoint: always safe to retry.
    NothingSent,
    /// The endpoint may have acted on the request: retry only a request that may be replayed.
    MaybeSent,
    /// The client's side failed: another endpoint would fail the same way.
    Never,
}

/// Where one attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// One endpoint of one region.
    Endpoint {
        /// The region, an index into [`Config::regions`](crate::config::Config::regions).
        region: RegionId,
        /// Index of the endpoint in that region's `endpoints`, in config order.
        endpoint: usize,
    },
    /// The `[fallback]` hosted API.
    Fallback,
}

/// How a finished attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No response head; the upstream error's retry class.
    Error(RetryClass),
    /// The endpoint answered 502, 503 or 504: it may have acted on the request.
    GatewayStatus,
}

/// One attempt made for this request and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tried {
    pub(crate) target: Target,
    pub(crate) failure: Failure,
}

/// Why a request is not served by its first-choice region (`meridian_failovers_total`'s
/// `reason` label and the access log's `failover_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverReason {
    /// The first choice had no healthy endpoint.
    Unhealthy,
    /// The first choice was drained or had no endpoint left.
    Unavailable,
    /// The first choice was past its spillover thresholds.
    Saturated,
    /// The first choice is ramping up after recovery and this request was not admitted.
    SlowStart,
    /// An earlier attempt failed and this one went elsewhere.
    Retry,
}

impl FailoverReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailoverReason::Unhealthy => "unhealthy",
            FailoverReason::Unavailable => "unavailable",
            FailoverReason::Saturated => "saturated",
            FailoverReason::SlowStart => "slow_start",
            FailoverReason::Retry => "retry",
        }
    }
}

/// Why no further attempt is made; the request is answered with the last attempt's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `retry.max_attempts` attempts have been made.
    MaxAttempts,
    /// The last failure may not be retried for this request.
    NotRetryable,
    /// The retry budget is spent.
    BudgetExhausted,
    /// The selected region has no endpoint left that this request has not tried.
    NoEndpoint,
}

/// The planner's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Send the request to `target`; `retry` when an attempt came before (a budget token was
    /// taken); `reason` when `target` is not the first-choice region.
    Send {
        /// Where to send it.
        target: Target,
        /// An earlier attempt failed: this one is a retry and counts against the retry budget.
        retry: bool,
        /// Why `target` is not the first-choice region; `None` when it is.
        reason: Option<FailoverReason>,
    },
    /// No candidate can serve: Meridian answers 503 with this.
    Refuse(NoRegion),
    /// No further attempt; answer with the last attempt's error.
    Stop(Stop),
}

/// The request's retry policy, as plain data.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// `retry.max_attempts`: attempts per request, the first included.
    pub max_attempts: u32,
    /// The request may be sent again after it may have reached an endpoint (the replay rules,
    /// computed by the caller).
    pub replay: bool,
    /// The body is kept whole, so it can be sent again; a streamed body gets one attempt.
    pub body_kept: bool,
    /// `health.panic_mode`: ejected endpoints may serve when no candidate has one in rotation.
    pub panic_mode: bool,
    /// Candidate regions in slow start that this request passes over (drawn once per request
    /// with [`slow_start_skips`]).
    pub slow_start_skips: &'a [RegionId],
}

/// What the planner reads of the live state. The proxy's view reads health atomics and takes
/// retry-budget tokens; tests use plain tables.
pub trait View {
    /// How `region` looks with the endpoints for which `tried` is true left out.
    fn region_state(&self, region: RegionId, tried: impl Fn(usize) -> bool) -> RegionState;
    /// The fallback's breaker would let a request through.
    fn fallback_usable(&self) -> bool;
    /// The balancer's view of each endpoint of `region`, in order, into `out` (cleared first).
    fn endpoint_loads(&self, region: RegionId, out: &mut Loads);
    /// The session's endpoint when the region has affinity and the request a session:
    /// `Some(None)` when none is eligible.
    fn affinity(&self, region: RegionId, loads: &[EndpointLoad]) -> Option<Option<usize>>;
    /// Takes one token from the retry budget; asked only for an attempt after the first,
    /// once a target is found.
    fn take_retry(&self) -> bool;
}

/// Endpoint loads of one region: on the stack up to 16 endpoints, on the heap beyond.
pub(crate) type Loads = SmallVec<[EndpointLoad; 16]>;

/// Slow-start skips of one request: on the stack up to 4 ramping regions.
pub(crate) type Skips = SmallVec<[RegionId; 4]>;

/// May another attempt follow `failure`, after `attempts` attempts?
pub(crate) fn may_retry(failure: Failure, attempts: usize, policy: &Policy<'_>) -> bool {
    if attempts as u64 >= u64::from(policy.max_attempts) || !policy.body_kept {
        return false;
    }
    match failure {
        Failure::Error(RetryClass::NothingSent) => true,
        Failure::Error(RetryClass::MaybeSent) | Failure::GatewayStatus => policy.replay,
        Failure::Error(RetryClass::Never) => false,
    }
}

/// The next attempt for a request that has made `tried` so far. `draw(n)` is a uniform index
/// below `n` (the balancer's random choices).
pub fn next_attempt(
    view: &impl View,
    plan: &RoutePlan<'_>,
    tried: &[Tried],
    policy: &Policy<'_>,
    draw: impl FnMut(usize) -> usize,
) -> Attempt {
    if tried.len() as u64 >= u64::from(policy.max_attempts) {
        return Attempt::Stop(Stop::MaxAttempts);
    }
    if let Some(last) = tried.last() {
        if !may_retry(last.failure, tried.len(), policy) {
            return Attempt::Stop(Stop::NotRetryable);
        }
    }
    let target = match select_region(view, plan, tried, policy) {
        Decision::Region(region) => match pick(view, region, tried, draw) {
            Some(endpoint) => Target::Endpoint { region, endpoint },
            None => return Attempt::Stop(Stop::NoEndpoint),
        },
        Decision::Fallback => Target::Fallback,
        Decision::Refuse(no) => return Attempt::Refuse(no),
    };
    let retry = !tried.is_empty();
    if retry && !view.take_retry() {
        return Attempt::Stop(Stop::BudgetExhausted);
    }
    Attempt::Send {
        target,
        retry,
        reason: failover_reason(view, plan, tried, policy, target),
    }
}

/// Region selection with tried endpoints and slow-start skips left out; a skipped region
/// still serves when nothing else can.
fn select_region(view: &impl View, plan: &RoutePlan<'_>, tried: &[Tried], policy: &Policy<'_>) -> Decision {
    let fallback_usable = view.fallback_usable() && !tried.iter().any(|t| t.target == Target::Fallback);
    let state = |skip: bool| {
        move |r: RegionId| match view.region_state(r, |e| was_tried(tried, r, e)) {
            RegionState::Available if skip && policy.slow_start_skips.contains(&r) => RegionState::Unavailable,
            s => s,
        }
    };
    let decision = select(plan, state(true), fallback_usable, policy.panic_mode);
    if policy.slow_start_skips.is_empty() || matches!(decision, Decision::Region(_)) {
        return decision;
    }
    select(plan, state(false), fallback_usable, policy.panic_mode)
}

/// Power of two choices among the region's untried, available endpoints (any untried one in
/// panic mode); the session's own endpoint when the region has affinity.
fn pick(view: &impl View, region: RegionId, tried: &[Tried], draw: impl FnMut(usize) -> usize) -> Option<usize> {
    let mut loads = Loads::new();
    view.endpoint_loads(region, &mut loads);
    let mut any = false;
    for (i, load) in loads.iter_mut().enumerate() {
        load.eligible &= !was_tried(tried, region, i);
        any |= load.eligible;
    }
    if !any {
        // Panic mode: every untried endpoint is a candidate.
        for (i, load) in loads.iter_mut().enumerate() {
            load.eligible = !was_tried(tried, region, i);
        }
    }
    if let Some(choice) = view.affinity(region, &loads) {
        return choice;
    }
    balance::pick(&loads, draw)
}

fn was_tried(tried: &[Tried], region: RegionId, endpoint: usize) -> bool {
    tried.iter().any(|t| t.target == Target::Endpoint { region, endpoint })
}

/// Why `target` is not the first-choice region, if it is not.
fn failover_reason(
    view: &impl View,
    plan: &RoutePlan<'_>,
    tried: &[Tried],
    policy: &Policy<'_>,
    target: Target,
) -> Option<FailoverReason> {
    let first = plan.candidates.first()?.region;
    if matches!(target, Target::Endpoint { region, .. } if region == first) {
        return None;
    }
    if !tried.is_empty() {
        return Some(FailoverReason::Retry);
    }
    Some(match view.region_state(first, |_| false) {
        RegionState::Saturated => FailoverReason::Saturated,
        RegionState::Unavailable => FailoverReason::Unavailable,
        RegionState::Available | RegionState::Unhealthy if policy.slow_start_skips.contains(&first) => {
            FailoverReason::SlowStart
        }
        RegionState::Available | RegionState::Unhealthy => FailoverReason::Unhealthy,
    })
}

/// Candidate regions in slow start that this request passes over: each ramping region
/// (`ramp(r)` below 1) admits a request when `draw()` (uniform in 0..1) falls below its ramp.
pub fn slow_start_skips(plan: &RoutePlan<'_>, ramp: impl Fn(RegionId) -> f64, mut draw: impl FnMut() -> f64) -> Skips {
    let mut skips = Skips::new();
    for c in plan.candidates.iter() {
        let ramp = ramp(c.region);
        if !crate::health::slow_start::admit(ramp, &mut draw) {
            skips.push(c.region);
        }
    }
    skips
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use proptest::prelude::*;

    use super::*;

    /// One region as the fake view sees it.
    #[derive(Debug, Clone)]
    struct FakeRegion {
        drained: bool,
        saturated: bool,
        /// Per endpoint: healthy and not shed.
        endpoints: Vec<bool>,
    }

    /// A view over plain tables; the budget is a number of retry tokens.
    #[derive(Debug)]
    struct Fake {
        regions: Vec<FakeRegion>,
        fallback: bool,
        tokens: Cell<u32>,
        session: Option<usize>,
    }

    impl View for Fake {
        fn region_state(&self, region: RegionId, tried: impl Fn(usize) -> bool) -> RegionState {
            let Some(r) = self.regions.get(region) else {
                return RegionState::Unavailable;
            };
            let untried: Vec<bool> = (0..r.endpoints.len())
                .filter(|&e| !tried(e))
                .map(|e| r.endpoints[e])
                .collect();
            match (r.drained, untried.iter().any(|&a| a), untried.is_empty()) {
                (true, _, _) | (false, false, true) => RegionState::Unavailable,
                (false, true, _) if r.saturated => RegionState::Saturated,
                (false, true, _) => RegionState::Available,
                (false, false, false) => RegionState::Unhealthy,
            }
        }

        fn fallback_usable(&self) -> bool {
            self.fallback
        }

        fn endpoint_loads(&self, region: RegionId, out: &mut Loads) {
            out.clear();
            for &available in self.regions.get(region).map_or(&[][..], |r| &r.endpoints) {
                out.push(EndpointLoad {
                    eligible: available,
                    latency: 0.1,
                    in_flight: 0,
                    weight: 1.0,
                    queue_depth: 0.0,
                    kv_cache: 0.0,
                });
            }
        }

        fn affinity(&self, _region: RegionId, loads: &[EndpointLoad]) -> Option<Option<usize>> {
            self.session.map(|e| {
                loads
                    .get(e)
                    .filter(|l| l.eligible)
                    .map(|_| e)
                    .or_else(|| loads.iter().position(|l| l.eligible))
            })
        }

        fn take_retry(&self) -> bool {
            let left = self.tokens.get();
            self.tokens.set(left.saturating_sub(1));
            left > 0
        }
    }

    fn region(endpoints: &[bool]) -> FakeRegion {
        FakeRegion {
            drained: false,
            saturated: false,
            endpoints: endpoints.to_vec(),
        }
    }

    fn fake(regions: Vec<FakeRegion>) -> Fake {
        Fake {
            regions,
            fallback: false,
            tokens: Cell::new(100),
            session: None,
        }
    }

    fn plan(regions: &[RegionId], zone: bool, fallback: bool) -> RoutePlan<'static> {
        RoutePlan {
            home: regions.first().copied(),
            ..crate::test_fixtures::plan_over(regions, zone.then_some(0), fallback)
        }
    }

    const POLICY: Policy<'static> = Policy {
        max_attempts: 3,
        replay: true,
        body_kept: true,
        panic_mode: false,
        slow_start_skips: &[],
    };

    fn send(region: RegionId, endpoint: usize, retry: bool, reason: Option<FailoverReason>) -> Attempt {
        Attempt::Send {
            target: Target::Endpoint { region, endpoint },
            retry,
            reason,
        }
    }

    fn failed(region: RegionId, endpoint: usize, failure: Failure) -> Tried {
        Tried {
            target: Target::Endpoint { region, endpoint },
            failure,
        }
    }

    const REFUSED: Failure = Failure::Error(RetryClass::NothingSent);
    const RESET: Failure = Failure::Error(RetryClass::MaybeSent);

    #[test]
    fn first_attempts_and_failover_reasons() {
        let drained = FakeRegion {
            drained: true,
            ..region(&[true])
        };
        let saturated = FakeRegion {
            saturated: true,
            ..region(&[true])
        };
        let with_fallback = Fake {
            fallback: true,
            ..fake(vec![region(&[false]), region(&[false])])
        };
        let ramping = Policy {
            slow_start_skips: &[0],
            ..POLICY
        };
        let panic = Policy {
            panic_mode: true,
            ..POLICY
        };
        let cases: Vec<(&str, Fake, RoutePlan<'_>, Policy<'_>, Attempt)> = vec![
            (
                "first choice serves",
                fake(vec![region(&[true]), region(&[true])]),
                plan(&[0, 1], false, false),
                POLICY,
                send(0, 0, false, None),
            ),
            (
                "unhealthy first choice",
                fake(vec![region(&[false]), region(&[true])]),
                plan(&[0, 1], false, false),
                POLICY,
                send(1, 0, false, Some(FailoverReason::Unhealthy)),
            ),
            (
                "drained first choice",
                fake(vec![drained, region(&[true])]),
                plan(&[0, 1], false, false),
                POLICY,
                send(1, 0, false, Some(FailoverReason::Unavailable)),
            ),
            (
                "saturated first choice",
                fake(vec![saturated.clone(), region(&[true])]),
                plan(&[0, 1], false, false),
                POLICY,
                send(1, 0, false, Some(FailoverReason::Saturated)),
            ),
            (
                "slow start skips the first choice",
                fake(vec![region(&[true]), region(&[true])]),
                plan(&[0, 1], false, false),
                ramping,
                send(0, 0, false, None).with_target(1, 0, Some(FailoverReason::SlowStart)),
            ),
            (
                "a skipped region serves when nothing else can",
                fake(vec![region(&[true]), region(&[false])]),
                plan(&[0, 1], false, false),
                ramping,
                send(0, 0, false, None),
            ),
            (
                "saturated only: still served",
                fake(vec![saturated]),
                plan(&[0], false, false),
                POLICY,
                send(0, 0, false, None),
            ),
            (
                "nothing healthy: fallback",
                with_fallback,
                plan(&[0, 1], false, true),
                POLICY,
                Attempt::Send {
                    target: Target::Fallback,
                    retry: false,
                    reason: Some(FailoverReason::Unhealthy),
                },
            ),
            (
                "nothing healthy: refused",
                fake(vec![region(&[false])]),
                plan(&[0], false, false),
                POLICY,
                Attempt::Refuse(NoRegion::NoRegionAvailable),
            ),
            (
                "zone with nothing healthy",
                fake(vec![region(&[false])]),
                plan(&[0], true, false),
                POLICY,
                Attempt::Refuse(NoRegion::ResidencyUnavailable { zone: 0 }),
            ),
            (
                "panic mode uses an unhealthy region",
                fake(vec![region(&[false, false])]),
                plan(&[0], false, false),
                panic,
                send(0, 0, false, None),
            ),
            (
                "no candidates",
                fake(vec![region(&[true])]),
                plan(&[], false, false),
                POLICY,
                Attempt::Refuse(NoRegion::NoRegionAvailable),
            ),
        ];
        for (name, view, plan, policy, want) in cases {
            assert_eq!(next_attempt(&view, &plan, &[], &policy, |_| 0), want, "{name}");
        }
    }

    impl Attempt {
        fn with_target(self, region: RegionId, endpoint: usize, reason: Option<FailoverReason>) -> Attempt {
            match self {
                Attempt::Send { retry, .. } => Attempt::Send {
                    target: Target::Endpoint { region, endpoint },
                    retry,
                    reason,
                },
                other => other,
            }
        }
    }

    #[test]
    fn retries_follow_the_failure_class_and_the_policy() {
        let two = || fake(vec![region(&[true, true]), region(&[true])]);
        let p = plan(&[0, 1], false, false);
        let no_replay = Policy {
            replay: false,
            ..POLICY
        };
        let streamed = Policy {
            body_kept: false,
            ..POLICY
        };
        let broke = Fake {
            tokens: Cell::new(0),
            ..two()
        };
        let cases: Vec<(&str, Fake, Vec<Tried>, Policy<'_>, Attempt)> = vec![
            (
                "refused: the other endpoint of the region, same region: no reason",
                two(),
                vec![failed(0, 0, REFUSED)],
                POLICY,
                send(0, 1, true, None),
            ),
            (
                "region exhausted: next region, as a retry",
                two(),
                vec![failed(0, 0, REFUSED), failed(0, 1, REFUSED)],
                POLICY,
                send(1, 0, true, Some(FailoverReason::Retry)),
            ),
            (
                "max attempts",
                two(),
                vec![failed(0, 0, REFUSED), failed(0, 1, REFUSED), failed(1, 0, REFUSED)],
                POLICY,
                Attempt::Stop(Stop::MaxAttempts),
            ),
            (
                "everything tried: refused",
                fake(vec![region(&[true])]),
                vec![failed(0, 0, REFUSED)],
                POLICY,
                Attempt::Refuse(NoRegion::NoRegionAvailable),
            ),
            (
                "reset, replay allowed",
                two(),
                vec![failed(0, 0, RESET)],
                POLICY,
                send(0, 1, true, None),
            ),
            (
                "reset, replay not allowed",
                two(),
                vec![failed(0, 0, RESET)],
                no_replay,
                Attempt::Stop(Stop::NotRetryable),
            ),
            (
                "gateway status, replay not allowed",
                two(),
                vec![failed(0, 0, Failure::GatewayStatus)],
                no_replay,
                Attempt::Stop(Stop::NotRetryable),
            ),
            (
                "gateway status, replay allowed",
                two(),
                vec![failed(0, 0, Failure::GatewayStatus)],
                POLICY,
                send(0, 1, true, None),
            ),
            (
                "refused, replay not allowed: nothing was sent",
                two(),
                vec![failed(0, 0, REFUSED)],
                no_replay,
                send(0, 1, true, None),
            ),
            (
                "client body failed",
                two(),
                vec![failed(0, 0, Failure::Error(RetryClass::Never))],
                POLICY,
                Attempt::Stop(Stop::NotRetryable),
            ),
            (
                "streamed body: one attempt",
                two(),
                vec![failed(0, 0, REFUSED)],
                streamed,
                Attempt::Stop(Stop::NotRetryable),
            ),
            (
                "budget spent",
                broke,
                vec![failed(0, 0, REFUSED)],
                POLICY,
                Attempt::Stop(Stop::BudgetExhausted),
            ),
        ];
        for (name, view, tried, policy, want) in cases {
            assert_eq!(next_attempt(&view, &p, &tried, &policy, |_| 0), want, "{name}");
        }
    }

    #[test]
    fn fallback_is_tried_once() {
        let view = Fake {
            fallback: true,
            ..fake(vec![region(&[false])])
        };
        let p = plan(&[0], false, true);
        let tried = [Tried {
            target: Target::Fallback,
            failure: REFUSED,
        }];
        assert_eq!(
            next_attempt(&view, &p, &tried, &POLICY, |_| 0),
            Attempt::Refuse(NoRegion::NoRegionAvailable)
        );
    }

    #[test]
    fn affinity_keeps_a_session_on_its_endpoint_until_it_was_tried() {
        let view = Fake {
            session: Some(2),
            ..fake(vec![region(&[true, true, true])])
        };
        let p = plan(&[0], false, false);
        assert_eq!(next_attempt(&view, &p, &[], &POLICY, |_| 0), send(0, 2, false, None));
        let tried = [failed(0, 2, REFUSED)];
        assert_eq!(next_attempt(&view, &p, &tried, &POLICY, |_| 0), send(0, 0, true, None));
    }

    #[test]
    fn a_region_with_more_than_sixteen_endpoints_uses_all_of_them() {
        let mut endpoints = vec![false; 40];
        endpoints[39] = true;
        let view = fake(vec![region(&endpoints)]);
        assert_eq!(
            next_attempt(&view, &plan(&[0], false, false), &[], &POLICY, |_| 0),
            send(0, 39, false, None)
        );
    }

    #[test]
    fn slow_start_skips_regions_below_their_ramp_only() {
        let p = plan(&[0, 1, 2, 70], false, false);
        let ramps = [1.0, 0.5, 0.5, 0.2];
        let ramp = |r: RegionId| if r == 70 { ramps[3] } else { ramps[r] };
        let draws = [0.9, 0.1, 0.9];
        let mut next = draws.iter().copied();
        let skips = slow_start_skips(&p, ramp, || next.next().unwrap_or(0.0));
        // Region 0 is not ramping (no draw); 1 drew 0.9 ≥ 0.5; 2 drew 0.1 < 0.5; 70 drew 0.9.
        assert_eq!(skips.as_slice(), &[1, 70]);
    }

    fn arb_region() -> impl Strategy<Value = FakeRegion> {
        (
            any::<bool>(),
            any::<bool>(),
            prop::collection::vec(any::<bool>(), 0..20),
        )
            .prop_map(|(drained, saturated, endpoints)| FakeRegion {
                drained: drained && endpoints.len() % 3 == 0,
                saturated,
                endpoints,
            })
    }

    proptest! {
        /// A whole request's attempts, every one failing: never outside the plan (so never
        /// across residency), never an endpoint twice while an untried available one exists in
        /// the chosen region, never more than `max_attempts`, never more retries than tokens.
        #[test]
        fn attempts_stay_inside_the_plan_and_the_limits(
            regions in prop::collection::vec(arb_region(), 1..6),
            order in prop::collection::vec(0usize..6, 0..6),
            zone in any::<bool>(),
            fallback in any::<bool>(),
            panic_mode in any::<bool>(),
            max_attempts in 1u32..6,
            tokens in 0u32..4,
            failures in prop::collection::vec(0u8..4, 6),
            seed in any::<u64>(),
        ) {
            let candidates: Vec<RegionId> = {
                let mut seen = Vec::new();
                for r in order.into_iter().filter(|&r| r < regions.len()) {
                    if !seen.contains(&r) {
                        seen.push(r);
                    }
                }
                seen
            };
            let view = Fake { regions, fallback, tokens: Cell::new(tokens), session: None };
            // A zone's plan never has the fallback.
            let p = plan(&candidates, zone, fallback && !zone);
            let policy = Policy { max_attempts, panic_mode, ..POLICY };
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut tried: Vec<Tried> = Vec::new();
            let mut retries = 0;
            loop {
                match next_attempt(&view, &p, &tried, &policy, |n| rng.usize(..n)) {
                    Attempt::Send { target, retry, .. } => {
                        prop_assert_eq!(retry, !tried.is_empty());
                        retries += u32::from(retry);
                        match target {
                            Target::Fallback => {
                                prop_assert!(p.fallback, "fallback outside the plan");
                                prop_assert!(!tried.iter().any(|t| t.target == Target::Fallback));
                            }
                            Target::Endpoint { region, endpoint } => {
                                prop_assert!(candidates.contains(&region), "region {} outside the plan", region);
                                prop_assert!(!tried.iter().any(|t| t.target == target), "{:?} repeated", target);
                                let available_untried = view.regions[region].endpoints.iter().enumerate()
                                    .any(|(e, &ok)| ok && !tried.iter().any(|t| t.target == Target::Endpoint { region, endpoint: e }));
                                prop_assert!(!available_untried || view.regions[region].endpoints[endpoint],
                                    "unavailable endpoint {} chosen while another was available", endpoint);
                            }
                        }
                        let failure = match failures[tried.len() % failures.len()] {
                            0 => REFUSED,
                            1 => RESET,
                            2 => Failure::GatewayStatus,
                            _ => Failure::Error(RetryClass::NothingSent),
                        };
                        tried.push(Tried { target, failure });
                    }
                    Attempt::Refuse(NoRegion::ResidencyUnavailable { .. }) => {
                        prop_assert!(zone);
                        break;
                    }
                    Attempt::Refuse(NoRegion::NoRegionAvailable) | Attempt::Stop(_) => break,
                }
                prop_assert!(tried.len() as u32 <= max_attempts);
            }
            prop_assert!(tried.len() as u32 <= max_attempts);
            prop_assert!(retries <= tokens);
        }
    }
}
