//! The per-endpoint health state machine: events and a clock in, transitions out. No I/O.
//!
//! ```text
//!  healthy ──(one failure)──▶ suspect ──(unhealthy_after probes | consecutive_errors | slow answers)──▶ ejected
//!     ▲                          │                                                                   │
//!     └──────(success)───────────┘            (hold-down over and healthy_after probes passed)       ▼
//!     └────────────────(probation lasted slow_start without a failure)─────────────────────────── probation
//! ```
//! A failure during probation ejects again at once, for twice as long: a flapping endpoint
//! spends more and more time out instead of pulling traffic back every interval.
//!
//! Slow answers are judged as a model client feels them ([`Answer`]): the time to the first
//! token of a streamed answer, the time per output token of an answer that reports tokens,
//! and the time to the head only for plain answers that are neither. A long answer is never
//! slow by its length alone.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::OutlierConfig;

/// Thresholds the machine applies; built from `[health]` and `[outlier]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// `health.unhealthy_after`: failed probes in a row that eject an endpoint.
    pub unhealthy_after: u32,
    /// `health.healthy_after`: passed probes in a row an ejected endpoint needs to return.
    pub healthy_after: u32,
    /// Passive outlier detection: errors, first-token and per-token latency, ejections.
    pub outlier: OutlierConfig,
    /// How long a returning endpoint stays on probation (the slow-start window).
    pub probation: Duration,
    /// Active probes run: leaving an ejection needs `healthy_after` passed probes.
    pub probes: bool,
}

/// Responses needed before the TTFB average may eject: one slow answer is not a trend.
pub(crate) const TTFB_MIN_SAMPLES: u32 = 3;

/// Weight of a new sample in the TTFB average.
const EWMA_WEIGHT: f64 = 0.1;

/// Something that happened to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// An active probe got a complete 2xx answer.
    ProbePassed {
        /// How long the probe took; feeds the balancer's latency estimate.
        latency: Duration,
    },
    /// An active probe failed: no complete 2xx answer within the probe timeout.
    ProbeFailed,
    /// A response head arrived from real traffic (its time feeds the balancer, not the
    /// outlier check: the answer's kind decides that once it ends, see [`Event::Answered`]).
    Response {
        /// The response status; 5xx counts as an error against the endpoint.
        status: u16,
        /// Request sent → response head.
        ttfb: Duration,
    },
    /// A response below 500 was relayed to its end: the endpoint works.
    Completed,
    /// The endpoint asked to be left alone (`429`/`503` with `Retry-After`).
    Shed {
        /// How long the endpoint asked to be left alone, before the `max_retry_after` cap.
        retry_after: Duration,
    },
    /// No response head: the connection was refused, timed out, failed TLS or broke off.
    ConnectError,
    /// No response head within `server.request_timeout`.
    Timeout,
    /// A streamed body stopped mid-way (stall or reset).
    StreamError,
    /// An answer's body ended: its latency as the client felt it.
    Answered(Answer),
}

/// The latency of one answer, measured when its body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// `text/event-stream`, or a body without a length.
    pub streamed: bool,
    /// Request sent → response head.
    pub head: Duration,
    /// Request sent → first non-empty body chunk (streamed answers).
    pub first_token: Option<Duration>,
    /// Time per output token, when the answer reported (or streamed) a token count.
    pub per_token: Option<Duration>,
}

impl Answer {
    /// The samples outlier detection takes from this answer: (first-token signal, per-token
    /// signal). A streamed answer gives its TTFT; an answer with tokens its TPOT; a plain
    /// answer that is neither its head time.
    pub fn samples(&self) -> (Option<Duration>, Option<Duration>) {
        match (self.streamed, self.per_token) {
            (true, per) => (Some(self.first_token.unwrap_or(self.head)), per),
            (false, Some(per)) => (None, Some(per)),
            (false, None) => (Some(self.head), None),
        }
    }
}

/// Where an endpoint stands in the health state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// In rotation, nothing failed recently.
    Healthy,
    /// Serving, but something failed recently.
    Suspect,
    /// Out of rotation.
    Ejected,
    /// Back in rotation on a short leash, its share ramping up.
    Probation,
}

impl Status {
    pub(crate) const ALL: [Status; 4] = [Status::Healthy, Status::Suspect, Status::Ejected, Status::Probation];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Suspect => "suspect",
            Status::Ejected => "ejected",
            Status::Probation => "probation",
        }
    }

    /// Takes traffic (unless shed).
    pub fn serving(self) -> bool {
        !matches!(self, Status::Ejected)
    }
}

/// Why an endpoint's status changed; named in logs, metrics and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// One probe failed (suspect).
    ProbeFailed,
    /// One request failed (suspect).
    RequestFailed,
    /// `health.unhealthy_after` probes failed in a row (→ ejected).
    ProbesFailed,
    /// `outlier.consecutive_errors` requests failed in a row (→ ejected).
    ConsecutiveErrors,
    /// First tokens (or heads of plain answers) slower than `ttfb_threshold`.
    SlowFirstByte,
    /// Output tokens slower than `tpot_threshold`.
    SlowOutputTokens,
    /// Failures stopped before a threshold (suspect → healthy).
    Recovered,
    /// Hold-down over and `healthy_after` probes passed (ejected → probation).
    ProbesPassed,
    /// Hold-down over, probes off (ejected → probation).
    EjectionExpired,
    /// Probation lasted `health.slow_start` without a failure (probation → healthy).
    ProbationPassed,
}

impl Reason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::ProbeFailed => "probe_failed",
            Reason::RequestFailed => "request_failed",
            Reason::ProbesFailed => "probes_failed",
            Reason::ConsecutiveErrors => "consecutive_errors",
            Reason::SlowFirstByte => "slow_first_byte",
            Reason::SlowOutputTokens => "slow_output_tokens",
            Reason::Recovered => "recovered",
            Reason::ProbesPassed => "probes_passed",
            Reason::EjectionExpired => "ejection_expired",
            Reason::ProbationPassed => "probation_passed",
        }
    }
}

/// A change of status, returned once so callers log and count it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub(crate) from: Status,
    pub(crate) to: Status,
    /// Why the status changed.
    pub reason: Reason,
}

/// One endpoint's health state machine: its status and the counters that move it.
#[derive(Debug, Clone)]
pub struct EndpointState {
    /// Where the endpoint stands now.
    pub status: Status,
    /// Why it entered its current status; `None` until the first transition.
    pub reason: Option<Reason>,
    /// Time of the last transition.
    pub since: Instant,
    pub(crate) probe_failures: u32,
    pub(crate) probe_passes: u32,
    /// Failed requests in a row; reset by a completed answer.
    pub consecutive_errors: u32,
    pub(crate) total_errors: u64,
    /// Ejections over the endpoint's life.
    pub ejections: u32,
    /// Recent ejections: each one doubles the next hold-down; decays while healthy.
    pub backoff: u32,
    calm_since: Instant,
    /// While ejected: when the hold-down ends.
    pub ejected_until: Option<Instant>,
    pub(crate) shed_until: Option<Instant>,
    /// EWMA of the first-token signal of real traffic, seconds (see [`Answer::samples`]).
    pub(crate) ttfb_ewma: f64,
    ttfb_samples: u32,
    /// EWMA of time per output token, seconds.
    pub(crate) tpot_ewma: f64,
    tpot_samples: u32,
}

impl EndpointState {
    /// A healthy endpoint with clean counters, as of `now`.
    pub fn new(now: Instant) -> EndpointState {
        EndpointState {
            status: Status::Healthy,
            reason: None,
            since: now,
            probe_failures: 0,
            probe_passes: 0,
            consecutive_errors: 0,
            total_errors: 0,
            ejections: 0,
            backoff: 0,
            calm_since: now,
            ejected_until: None,
            shed_until: None,
            ttfb_ewma: 0.0,
            ttfb_samples: 0,
            tpot_ewma: 0.0,
            tpot_samples: 0,
        }
    }

    /// May take new requests at `now`.
    pub fn available(&self, now: Instant) -> bool {
        self.status.serving() && self.shed_until.is_none_or(|t| now >= t)
    }

    /// Start of the probation ramp, while on probation.
    pub(crate) fn ramp_start(&self) -> Option<Instant> {
        (self.status == Status::Probation).then_some(self.since)
    }

    /// Applies one event at `now`; returns the net change of status, if any.
    pub fn observe(&mut self, event: Event, now: Instant, p: &Policy) -> Option<Transition> {
        let before = self.status;
        // The event first, then the clock: a failing probe at the end of a hold-down keeps
        // the endpoint out rather than letting it in for an instant.
        match event {
            Event::ProbePassed { .. } => {
                self.probe_failures = 0;
                self.probe_passes = self.probe_passes.saturating_add(1);
            }
            Event::ProbeFailed => {
                self.probe_passes = 0;
                self.probe_failures = self.probe_failures.saturating_add(1);
            }
            Event::Response { status, .. } => {
                if status >= 500 {
                    self.count_error();
                }
            }
            Event::Answered(answer) => {
                let (first, per) = answer.samples();
                if let Some(x) = first {
                    fold(&mut self.ttfb_ewma, &mut self.ttfb_samples, x);
                }
                if let Some(x) = per {
                    fold(&mut self.tpot_ewma, &mut self.tpot_samples, x);
                }
            }
            Event::Completed => self.consecutive_errors = 0,
            Event::Shed { retry_after } => {
                self.shed_until = Some(now + retry_after.min(p.outlier.max_retry_after));
            }
            Event::ConnectError | Event::Timeout | Event::StreamError => self.count_error(),
        }
        let reason = self.settle(now, p);
        self.net(before, reason)
    }

    /// Lets time pass: hold-downs end, probation completes, backoff decays.
    pub fn tick(&mut self, now: Instant, p: &Policy) -> Option<Transition> {
        let before = self.status;
        let reason = self.settle(now, p);
        self.net(before, reason)
    }

    fn net(&self, before: Status, reason: Option<Reason>) -> Option<Transition> {
        match reason {
            Some(reason) if self.status != before => Some(Transition {
                from: before,
                to: self.status,
                reason,
            }),
            _ => None,
        }
    }

    fn count_error(&mut self) {
        self.consecutive_errors = self.consecutive_errors.saturating_add(1);
        self.total_errors = self.total_errors.saturating_add(1);
    }

    /// Why the answers are too slow, if they are.
    fn slow(&self, p: &Policy) -> Option<Reason> {
        if self.ttfb_samples >= TTFB_MIN_SAMPLES && self.ttfb_ewma > p.outlier.ttfb_threshold.as_secs_f64() {
            Some(Reason::SlowFirstByte)
        } else if self.tpot_samples >= TTFB_MIN_SAMPLES && self.tpot_ewma > p.outlier.tpot_threshold.as_secs_f64() {
            Some(Reason::SlowOutputTokens)
        } else {
            None
        }
    }

    /// Moves the status as far as the counters and the clock say; returns the last reason.
    fn settle(&mut self, now: Instant, p: &Policy) -> Option<Reason> {
        if self.at_rest(p) {
            return None;
        }
        self.settle_all(now, p)
    }

    /// Nothing can move: healthy, nothing counted against the endpoint, no backoff left to
    /// decay. Every answer settles (two or three times a request) and this is the usual
    /// state; the full walk cost ~100 instructions to find nothing.
    fn at_rest(&self, p: &Policy) -> bool {
        self.status == Status::Healthy
            && self.backoff == 0
            && self.probe_failures == 0
            && self.consecutive_errors == 0
            && p.unhealthy_after > 0
            && self.slow(p).is_none()
    }

    /// [`Self::settle`] without the short cut.
    fn settle_all(&mut self, now: Instant, p: &Policy) -> Option<Reason> {
        let mut last = None;
        // At most ejected → probation → healthy in one step (a zero probation).
        for _ in 0..3 {
            match self.step(now, p) {
                Some(r) => last = Some(r),
                None => break,
            }
        }
        if matches!(self.status, Status::Healthy | Status::Suspect)
            && self.backoff > 0
            && now.saturating_duration_since(self.calm_since) >= p.outlier.ejection_time
        {
            self.backoff -= 1;
            self.calm_since = now;
        }
        last
    }

    fn step(&mut self, now: Instant, p: &Policy) -> Option<Reason> {
        let errors_over = |limit: u32| limit > 0 && self.consecutive_errors >= limit;
        match self.status {
            Status::Healthy | Status::Suspect => {
                if self.probe_failures >= p.unhealthy_after {
                    self.eject(Reason::ProbesFailed, now, p)
                } else if errors_over(p.outlier.consecutive_errors) {
                    self.eject(Reason::ConsecutiveErrors, now, p)
                } else if let Some(slow) = self.slow(p) {
                    self.eject(slow, now, p)
                } else if self.probe_failures > 0 {
                    self.goto(Status::Suspect, Reason::ProbeFailed, now)
                } else if self.consecutive_errors > 0 && p.outlier.consecutive_errors > 0 {
                    self.goto(Status::Suspect, Reason::RequestFailed, now)
                } else {
                    self.goto(Status::Healthy, Reason::Recovered, now)
                }
            }
            Status::Probation => {
                // A short leash: one failed probe, or half the error threshold.
                if self.probe_failures > 0 {
                    self.eject(Reason::ProbesFailed, now, p)
                } else if errors_over(p.outlier.consecutive_errors.div_ceil(2)) {
                    self.eject(Reason::ConsecutiveErrors, now, p)
                } else if let Some(slow) = self.slow(p) {
                    self.eject(slow, now, p)
                } else if now.saturating_duration_since(self.since) >= p.probation {
                    self.calm_since = now;
                    self.goto(Status::Healthy, Reason::ProbationPassed, now)
                } else {
                    None
                }
            }
            Status::Ejected => {
                let held = self.ejected_until.is_none_or(|t| now >= t);
                if !held {
                    None
                } else if !p.probes {
                    self.return_to_service(Reason::EjectionExpired, now)
                } else if self.probe_passes >= p.healthy_after {
                    self.return_to_service(Reason::ProbesPassed, now)
                } else {
                    None
                }
            }
        }
    }

    fn goto(&mut self, to: Status, reason: Reason, now: Instant) -> Option<Reason> {
        if self.status == to {
            return None;
        }
        self.status = to;
        self.reason = Some(reason);
        self.since = now;
        Some(reason)
    }

    /// How long an ejection for `reason` lasts at least. The first probe ejection has no
    /// hold-down (the region returns as soon as probes pass); every repeat doubles it.
    pub(crate) fn hold_down(&self, reason: Reason, p: &Policy) -> Duration {
        let level = match (reason, self.backoff) {
            (Reason::ProbesFailed, 0) => return Duration::ZERO,
            (Reason::ProbesFailed, n) => n - 1,
            (_, n) => n,
        };
        p.outlier
            .ejection_time
            .checked_mul(1u32 << level.min(20))
            .unwrap_or(p.outlier.max_ejection_time)
            .min(p.outlier.max_ejection_time)
    }

    fn eject(&mut self, reason: Reason, now: Instant, p: &Policy) -> Option<Reason> {
        let hold = self.hold_down(reason, p);
        self.ejected_until = Some(now + hold);
        self.backoff = self.backoff.saturating_add(1);
        self.ejections = self.ejections.saturating_add(1);
        self.consecutive_errors = 0;
        self.probe_passes = 0;
        self.probe_failures = 0;
        self.goto(Status::Ejected, reason, now)
    }

    fn return_to_service(&mut self, reason: Reason, now: Instant) -> Option<Reason> {
        self.ejected_until = None;
        self.consecutive_errors = 0;
        // Forget the slow average, or the first response would eject again.
        self.ttfb_ewma = 0.0;
        self.ttfb_samples = 0;
        self.tpot_ewma = 0.0;
        self.tpot_samples = 0;
        self.goto(Status::Probation, reason, now)
    }
}

/// Folds one sample (seconds) into an EWMA that starts at its first sample.
fn fold(ewma: &mut f64, samples: &mut u32, sample: Duration) {
    let x = sample.as_secs_f64();
    *ewma = if *samples == 0 {
        x
    } else {
        EWMA_WEIGHT * x + (1.0 - EWMA_WEIGHT) * *ewma
    };
    *samples = samples.saturating_add(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short cut finds nothing to do exactly where the full walk changes nothing.
    #[test]
    fn an_endpoint_at_rest_settles_as_the_full_walk_does() {
        let t0 = Instant::now();
        let mut p = policy();
        let mut at_rest = 0;
        for status in [Status::Healthy, Status::Suspect, Status::Probation, Status::Ejected] {
            for probe_failures in [0, 1, 3] {
                for consecutive_errors in [0, 1, 4] {
                    for backoff in [0, 1] {
                        for ewma in [0.0, 0.4, 0.6] {
                            for unhealthy_after in [0, 3] {
                                p.unhealthy_after = unhealthy_after;
                                let mut s = EndpointState::new(t0);
                                s.status = status;
                                s.probe_failures = probe_failures;
                                s.consecutive_errors = consecutive_errors;
                                s.backoff = backoff;
                                (s.ttfb_ewma, s.ttfb_samples) = (ewma, TTFB_MIN_SAMPLES);
                                let now = t0 + Duration::from_secs(20);
                                let (mut short, mut full) = (s.clone(), s.clone());
                                let case = format!(
                                    "{status:?} {probe_failures} {consecutive_errors} {backoff} {ewma} {unhealthy_after}"
                                );
                                assert_eq!(short.settle(now, &p), full.settle_all(now, &p), "{case}");
                                assert_eq!(format!("{short:?}"), format!("{full:?}"), "{case}");
                                at_rest += usize::from(s.at_rest(&p));
                            }
                        }
                    }
                }
            }
        }
        assert!(at_rest > 0, "the short cut was taken");
    }

    fn policy() -> Policy {
        Policy {
            unhealthy_after: 3,
            healthy_after: 2,
            outlier: OutlierConfig {
                consecutive_errors: 4,
                ttfb_threshold: Duration::from_millis(500),
                tpot_threshold: Duration::from_millis(250),
                ejection_time: Duration::from_secs(10),
                max_ejection_time: Duration::from_secs(60),
                max_retry_after: Duration::from_secs(30),
            },
            probation: Duration::from_secs(5),
            probes: true,
        }
    }

    const PASS: Event = Event::ProbePassed {
        latency: Duration::from_millis(1),
    };
    const FAIL: Event = Event::ProbeFailed;
    const OK: Event = Event::Response {
        status: 200,
        ttfb: Duration::from_millis(10),
    };
    const E500: Event = Event::Response {
        status: 500,
        ttfb: Duration::from_millis(10),
    };
    /// A plain answer with a slow head.
    const SLOW: Event = Event::Answered(Answer {
        streamed: false,
        head: Duration::from_secs(2),
        first_token: None,
        per_token: None,
    });
    const fn streamed(head: u64, first: u64, per: Option<u64>) -> Event {
        Event::Answered(Answer {
            streamed: true,
            head: Duration::from_millis(head),
            first_token: Some(Duration::from_millis(first)),
            per_token: match per {
                Some(p) => Some(Duration::from_millis(p)),
                None => None,
            },
        })
    }
    const fn whole(head: u64, per: Option<u64>) -> Event {
        Event::Answered(Answer {
            streamed: false,
            head: Duration::from_millis(head),
            first_token: None,
            per_token: match per {
                Some(p) => Some(Duration::from_millis(p)),
                None => None,
            },
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Feeds `(offset, event)` pairs and returns the status after each.
    fn run(p: &Policy, steps: &[(u64, Option<Event>)]) -> Vec<Status> {
        let t0 = Instant::now();
        let mut m = EndpointState::new(t0);
        steps
            .iter()
            .map(|&(at, e)| {
                let now = t0 + ms(at);
                match e {
                    Some(e) => m.observe(e, now, p),
                    None => m.tick(now, p),
                };
                m.status
            })
            .collect()
    }

    use Status::{Ejected as X, Healthy as H, Probation as P, Suspect as S};

    #[test]
    fn transition_table() {
        let p = policy();
        #[rustfmt::skip]
        type Steps = Vec<(u64, Option<Event>)>;
        let cases: Vec<(&str, Steps, Vec<Status>)> = vec![
            (
                "one failed probe is suspicion only",
                vec![(0, Some(FAIL)), (100, Some(PASS))],
                vec![S, H],
            ),
            (
                "unhealthy_after failed probes eject",
                vec![(0, Some(FAIL)), (1, Some(FAIL)), (2, Some(FAIL))],
                vec![S, S, X],
            ),
            (
                "a pass in between resets the count (hysteresis)",
                vec![
                    (0, Some(FAIL)),
                    (1, Some(FAIL)),
                    (2, Some(PASS)),
                    (3, Some(FAIL)),
                    (4, Some(FAIL)),
                ],
                vec![S, S, H, S, S],
            ),
            (
                "healthy_after passes bring a probe-ejected endpoint back on probation",
                vec![
                    (0, Some(FAIL)),
                    (1, Some(FAIL)),
                    (2, Some(FAIL)),
                    (3, Some(PASS)),
                    (4, Some(PASS)),
                ],
                vec![S, S, X, X, P],
            ),
            (
                "probation lasts the slow-start window",
                vec![
                    (0, Some(FAIL)),
                    (1, Some(FAIL)),
                    (2, Some(FAIL)),
                    (3, Some(PASS)),
                    (4, Some(PASS)),
                    (4_000, None),
                    (5_004, None),
                ],
                vec![S, S, X, X, P, P, H],
            ),
            (
                "consecutive errors eject; a completed response resets them",
                vec![
                    (0, Some(E500)),
                    (1, Some(Event::ConnectError)),
                    (2, Some(Event::Completed)),
                    (3, Some(E500)),
                    (4, Some(Event::Timeout)),
                    (5, Some(Event::StreamError)),
                    (6, Some(E500)),
                ],
                vec![S, S, H, S, S, S, X],
            ),
            (
                "a 2xx head alone does not clear errors (the stream may still stall)",
                vec![
                    (0, Some(Event::StreamError)),
                    (1, Some(OK)),
                    (2, Some(Event::StreamError)),
                    (3, Some(OK)),
                    (4, Some(Event::StreamError)),
                    (5, Some(OK)),
                    (6, Some(Event::StreamError)),
                ],
                vec![S, S, S, S, S, S, X],
            ),
            (
                "slow first bytes eject after enough samples",
                vec![(0, Some(SLOW)), (1, Some(SLOW)), (2, Some(SLOW))],
                vec![H, H, X],
            ),
            (
                "a slow first token behind an instant head ejects",
                vec![
                    (0, Some(streamed(1, 1000, None))),
                    (1, Some(streamed(1, 1000, None))),
                    (2, Some(streamed(1, 1000, None))),
                ],
                vec![H, H, X],
            ),
            (
                "a slow stream with a fast first token does not",
                vec![
                    (0, Some(streamed(1, 20, Some(100)))),
                    (1, Some(streamed(1, 20, Some(100)))),
                    (2, Some(streamed(1, 20, Some(100)))),
                ],
                vec![H, H, H],
            ),
            (
                "a long whole answer at a healthy pace does not (1.5 s head, 5 ms per token)",
                vec![
                    (0, Some(whole(1500, Some(5)))),
                    (1, Some(whole(1500, Some(5)))),
                    (2, Some(whole(1500, Some(5)))),
                ],
                vec![H, H, H],
            ),
            (
                "output tokens over the threshold eject, streamed or whole",
                vec![
                    (0, Some(whole(1500, Some(400)))),
                    (1, Some(streamed(1, 20, Some(400)))),
                    (2, Some(whole(900, Some(400)))),
                ],
                vec![H, H, X],
            ),
            (
                "a slow head no longer counts by itself: the answer decides",
                vec![
                    (
                        0,
                        Some(Event::Response {
                            status: 200,
                            ttfb: Duration::from_secs(5)
                        })
                    );
                    3
                ],
                vec![H, H, H],
            ),
            (
                "one slow answer among fast ones is not a trend",
                vec![(0, Some(OK)), (1, Some(OK)), (2, Some(OK)), (3, Some(SLOW))],
                vec![H, H, H, H],
            ),
            (
                "outlier ejection holds for ejection_time even when probes pass",
                vec![
                    (0, Some(E500)),
                    (1, Some(E500)),
                    (2, Some(E500)),
                    (3, Some(E500)),
                    (500, Some(PASS)),
                    (1_000, Some(PASS)),
                    (9_999, None),
                    (10_003, None),
                ],
                vec![S, S, S, X, X, X, X, P],
            ),
            (
                "one failure on probation ejects again",
                vec![
                    (0, Some(FAIL)),
                    (1, Some(FAIL)),
                    (2, Some(FAIL)),
                    (3, Some(PASS)),
                    (4, Some(PASS)),
                    (100, Some(FAIL)),
                ],
                vec![S, S, X, X, P, X],
            ),
            (
                "half the error threshold on probation ejects again",
                vec![
                    (0, Some(FAIL)),
                    (1, Some(FAIL)),
                    (2, Some(FAIL)),
                    (3, Some(PASS)),
                    (4, Some(PASS)),
                    (100, Some(E500)),
                    (101, Some(E500)),
                ],
                vec![S, S, X, X, P, P, X],
            ),
        ];
        for (name, steps, want) in cases {
            assert_eq!(run(&p, &steps), want, "{name}");
        }
    }

    #[test]
    fn errors_off_when_threshold_is_zero() {
        let mut p = policy();
        p.outlier.consecutive_errors = 0;
        let steps: Vec<_> = (0..10).map(|i| (i, Some(E500))).collect();
        assert!(run(&p, &steps).iter().all(|s| *s == H));
    }

    #[test]
    fn without_probes_an_ejection_ends_with_its_hold_down() {
        let p = Policy {
            probes: false,
            ..policy()
        };
        let steps = [
            (0, Some(E500)),
            (1, Some(E500)),
            (2, Some(E500)),
            (3, Some(E500)),
            (10_002, None),
            (10_003, None),
        ];
        assert_eq!(run(&p, &steps), vec![S, S, S, X, X, P]);
    }

    #[test]
    fn hold_down_doubles_up_to_the_cap_and_decays_while_healthy() {
        let p = policy();
        let t0 = Instant::now();
        let mut m = EndpointState::new(t0);
        let mut now = t0;
        let mut holds = Vec::new();
        for _ in 0..6 {
            for _ in 0..4 {
                m.observe(E500, now, &p);
            }
            assert_eq!(m.status, X);
            let until = m.ejected_until.unwrap();
            holds.push((until - now).as_secs());
            now = until;
            m.observe(PASS, now, &p);
            m.observe(PASS, now, &p);
            assert_eq!(m.status, P);
        }
        assert_eq!(holds, vec![10, 20, 40, 60, 60, 60]);
        // Survive probation, then stay healthy: each ejection_time of calm forgets one ejection.
        now += p.probation;
        m.tick(now, &p);
        assert_eq!(m.status, H);
        let level = m.backoff;
        now += p.outlier.ejection_time * 2;
        m.tick(now, &p);
        m.tick(now + p.outlier.ejection_time, &p);
        assert_eq!(m.backoff, level - 2);
    }

    #[test]
    fn first_probe_ejection_has_no_hold_down_but_repeats_do() {
        let p = policy();
        let t0 = Instant::now();
        let mut m = EndpointState::new(t0);
        for _ in 0..3 {
            m.observe(FAIL, t0, &p);
        }
        assert_eq!(m.ejected_until, Some(t0));
        m.observe(PASS, t0, &p);
        m.observe(PASS, t0, &p);
        assert_eq!(m.status, P);
        m.observe(FAIL, t0 + ms(10), &p);
        assert_eq!(m.ejected_until, Some(t0 + ms(10) + p.outlier.ejection_time));
    }

    #[test]
    fn flapping_probes_return_less_and_less_often() {
        // Probes flip every 2 intervals (1 s each): a naive machine would return every 4 s.
        let mut p = Policy {
            unhealthy_after: 2,
            probation: Duration::from_secs(2),
            ..policy()
        };
        p.outlier.ejection_time = Duration::from_secs(4);
        let t0 = Instant::now();
        let mut m = EndpointState::new(t0);
        let mut returns = 0;
        for i in 0..120u64 {
            let event = if (i / 2) % 2 == 0 { FAIL } else { PASS };
            if let Some(t) = m.observe(event, t0 + Duration::from_secs(i), &p) {
                returns += usize::from(t.to == P);
            }
        }
        // Naive: 30 returns in 120 s. Backoff: 4 s, 8, 16, 32, 60 → a handful.
        assert!(returns <= 6, "{returns} returns");
        assert!(returns >= 2, "{returns} returns");
    }

    #[test]
    fn shed_is_capped_and_not_a_failure() {
        let p = policy();
        let t0 = Instant::now();
        let mut m = EndpointState::new(t0);
        m.observe(
            Event::Shed {
                retry_after: Duration::from_secs(3600),
            },
            t0,
            &p,
        );
        assert_eq!(m.status, H);
        assert_eq!(m.consecutive_errors, 0);
        assert!(!m.available(t0 + Duration::from_secs(29)));
        assert!(m.available(t0 + Duration::from_secs(30)));
    }
}
