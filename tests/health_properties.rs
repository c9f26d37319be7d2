//! Property tests for the endpoint health state machine: over arbitrary policies, event
//! sequences and clock advances it never holds an endpoint ejected beyond
//! `max_ejection_time`, and an endpoint whose probes pass for long enough always returns.

use std::time::{Duration, Instant};

use meridian::config::OutlierConfig;
use meridian::health::state::{Answer, EndpointState, Event, Policy, Status};
use proptest::prelude::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        1u32..5,
        1u32..5,
        0u32..6,
        50u64..2_000,
        100u64..20_000,
        1u32..10,
        0u64..5_000,
        any::<bool>(),
        0u64..30_000,
    )
        .prop_map(
            |(unhealthy_after, healthy_after, errors, ttfb, ejection, cap_factor, probation, probes, retry)| Policy {
                unhealthy_after,
                healthy_after,
                outlier: OutlierConfig {
                    consecutive_errors: errors,
                    ttfb_threshold: ms(ttfb),
                    tpot_threshold: ms(ttfb / 4 + 1),
                    ejection_time: ms(ejection),
                    // Config validation keeps the cap at or above ejection_time.
                    max_ejection_time: ms(ejection) * cap_factor,
                    max_retry_after: ms(retry),
                },
                probation: ms(probation),
                probes,
            },
        )
}

/// Failures weigh more than successes, so sequences reach repeated ejections and the
/// doubling hold-down, where a missing cap would show.
fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => Just(Event::ProbeFailed),
        3 => Just(Event::ConnectError),
        2 => Just(Event::Timeout),
        2 => Just(Event::StreamError),
        2 => (0u64..3_000, prop_oneof![Just(200u16), Just(500), Just(503), Just(404)])
            .prop_map(|(t, status)| Event::Response { status, ttfb: ms(t) }),
        2 => (0u64..500).prop_map(|l| Event::ProbePassed { latency: ms(l) }),
        2 => (any::<bool>(), 0u64..3_000, proptest::option::of(0u64..1_000)).prop_map(|(streamed, t, per)| {
            Event::Answered(Answer { streamed, head: ms(t / 2), first_token: Some(ms(t)), per_token: per.map(ms) })
        }),
        1 => Just(Event::Completed),
        1 => (0u64..120_000).prop_map(|r| Event::Shed { retry_after: ms(r) }),
    ]
}

/// One step: time passes, then an event arrives (or only the clock ticks).
fn steps() -> impl Strategy<Value = Vec<(u64, Option<Event>)>> {
    proptest::collection::vec((0u64..20_000, proptest::option::weighted(0.9, event())), 0..300)
}

/// Without active probes there are no probe results: those events become clock ticks.
fn realistic(event: Option<Event>, p: &Policy) -> Option<Event> {
    match event {
        Some(Event::ProbePassed { .. } | Event::ProbeFailed) if !p.probes => None,
        e => e,
    }
}

/// Asserts the cap on the current ejection, if any.
fn check_cap(m: &EndpointState, p: &Policy) -> Result<(), TestCaseError> {
    if m.status == Status::Ejected {
        let until = m.ejected_until.unwrap_or(m.since);
        prop_assert!(
            until.saturating_duration_since(m.since) <= p.outlier.max_ejection_time,
            "held for {:?}, cap {:?}",
            until.saturating_duration_since(m.since),
            p.outlier.max_ejection_time
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn never_ejected_beyond_the_cap(p in policy(), steps in steps()) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut m = EndpointState::new(t0);
        for (advance, event) in steps {
            now += ms(advance);
            match realistic(event, &p) {
                Some(e) => m.observe(e, now, &p),
                None => m.tick(now, &p),
            };
            check_cap(&m, &p)?;
            // Past the cap, the hold-down is over: only probes (when they run) still
            // decide, and with probes off nothing may keep it out.
            if m.status == Status::Ejected {
                let later = now.max(m.since + p.outlier.max_ejection_time);
                let mut probe = m.clone();
                probe.tick(later, &p);
                if !p.probes {
                    prop_assert!(probe.status.serving(), "still ejected {:?} after the cap without probes", p.outlier.max_ejection_time);
                }
            }
        }
    }

    #[test]
    fn passing_probes_always_bring_an_endpoint_back(p in policy(), steps in steps(), interval in 100u64..5_000) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut m = EndpointState::new(t0);
        for (advance, event) in steps {
            now += ms(advance);
            match realistic(event, &p) {
                Some(e) => m.observe(e, now, &p),
                None => m.tick(now, &p),
            };
        }
        // From wherever the sequence left it, probes pass every `interval` and no traffic
        // fails: long enough is the cap, healthy_after probes and probation (and any shed).
        let interval = ms(interval);
        let long_enough = p.outlier.max_ejection_time.max(p.outlier.max_retry_after)
            + interval * (p.healthy_after + 2)
            + p.probation;
        let end = now + long_enough;
        while now <= end {
            now += interval;
            match realistic(Some(Event::ProbePassed { latency: ms(1) }), &p) {
                Some(e) => m.observe(e, now, &p),
                None => m.tick(now, &p),
            };
            check_cap(&m, &p)?;
        }
        prop_assert!(m.status.serving(), "still {:?} ({:?}) after {long_enough:?} of passing probes", m.status, m.reason);
        prop_assert!(m.available(now), "serving but not available (shed) at the end");
        prop_assert!(
            matches!(m.status, Status::Healthy | Status::Suspect),
            "probation never ended: {:?}",
            m.status
        );
    }
}

#[test]
fn hold_down_is_capped_for_every_backoff_level() {
    // The doubling is where an unbounded hold-down would come from: 2^n grows past any cap.
    let p = Policy {
        unhealthy_after: 1,
        healthy_after: 1,
        outlier: OutlierConfig {
            consecutive_errors: 1,
            ttfb_threshold: ms(500),
            tpot_threshold: ms(250),
            ejection_time: ms(1_000),
            max_ejection_time: ms(8_000),
            max_retry_after: ms(1_000),
        },
        probation: ms(0),
        probes: false,
    };
    let t0 = Instant::now();
    let mut now = t0;
    let mut m = EndpointState::new(t0);
    let mut longest = Duration::ZERO;
    for _ in 0..64 {
        m.observe(Event::ConnectError, now, &p);
        assert_eq!(m.status, Status::Ejected);
        let until = m.ejected_until.expect("an ejection has an end");
        longest = longest.max(until - now);
        // Straight back, straight out: the backoff keeps growing.
        now = until;
        m.tick(now, &p);
        assert!(m.status.serving());
    }
    assert_eq!(longest, p.outlier.max_ejection_time);
}
