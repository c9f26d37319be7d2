//! The fallback's circuit breaker: after `failures` consecutive failed attempts it opens and
//! sheds fallback traffic for `cool_down`, then lets one trial request through (half-open);
//! the trial's outcome closes it again or reopens it.
//!
//! `Breaker` is the pure state machine (clock passed in, transitions returned);
//! `SharedBreaker` publishes it for the request path, which reads one atomic while closed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

/// The thresholds live with the rest of the config, which must not import `forward`.
pub(crate) use crate::config::BreakerPolicy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerStatus {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerStatus {
    /// The name logs and metrics use, as serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerStatus::Closed => "closed",
            BreakerStatus::Open => "open",
            BreakerStatus::HalfOpen => "half_open",
        }
    }
}

/// A change of status, returned once so the caller logs it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BreakerTransition {
    pub from: BreakerStatus,
    pub to: BreakerStatus,
}

/// What the breaker says about sending one more request to the fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// Half-open: this request is the one trial; its outcome decides.
    Trial,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Breaker {
    status: BreakerStatus,
    consecutive_failures: u32,
    /// Open: when the cool-down ends. Half-open: when an unanswered trial is given up on,
    /// so a trial whose outcome never comes back cannot wedge the breaker.
    until: Option<Instant>,
    trial_in_flight: bool,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new()
    }
}

impl Breaker {
    pub(crate) fn new() -> Breaker {
        Breaker {
            status: BreakerStatus::Closed,
            consecutive_failures: 0,
            until: None,
            trial_in_flight: false,
        }
    }

    pub(crate) fn status(&self) -> BreakerStatus {
        self.status
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// Whether a request at `now` would be admitted, without taking the trial slot.
    #[cfg(test)]
    pub(crate) fn would_admit(&self, now: Instant) -> bool {
        match self.status {
            BreakerStatus::Closed => true,
            BreakerStatus::Open => self.until.is_none_or(|t| now >= t),
            BreakerStatus::HalfOpen => !self.trial_in_flight || self.until.is_none_or(|t| now >= t),
        }
    }

    /// Admits (or not) one request at `now`; a trial takes the half-open slot.
    pub(crate) fn admit(&mut self, now: Instant, p: &BreakerPolicy) -> (Admission, Option<BreakerTransition>) {
        match self.status {
            BreakerStatus::Closed => (Admission::Allowed, None),
            BreakerStatus::Open if self.until.is_some_and(|t| now < t) => (Admission::Rejected, None),
            BreakerStatus::Open => {
                let t = self.goto(BreakerStatus::HalfOpen);
                self.start_trial(now, p);
                (Admission::Trial, t)
            }
            BreakerStatus::HalfOpen if self.trial_in_flight && self.until.is_some_and(|t| now < t) => {
                (Admission::Rejected, None)
            }
            BreakerStatus::HalfOpen => {
                self.start_trial(now, p);
                (Admission::Trial, None)
            }
        }
    }

    /// Records the outcome of an admitted request.
    pub(crate) fn record(&mut self, success: bool, now: Instant, p: &BreakerPolicy) -> Option<BreakerTransition> {
        if success {
            self.consecutive_failures = 0;
            self.trial_in_flight = false;
            self.until = None;
            return self.goto(BreakerStatus::Closed);
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        match self.status {
            BreakerStatus::Closed if self.consecutive_failures < p.failures => None,
            // A failed trial reopens at once; so does reaching the threshold while closed.
            BreakerStatus::Closed | BreakerStatus::HalfOpen => {
                self.trial_in_flight = false;
                self.until = Some(now + p.cool_down);
                self.goto(BreakerStatus::Open)
            }
            // Requests admitted before it opened still report; they change nothing.
            BreakerStatus::Open => None,
        }
    }

    fn start_trial(&mut self, now: Instant, p: &BreakerPolicy) {
        self.trial_in_flight = true;
        self.until = Some(now + p.cool_down);
    }

    fn goto(&mut self, to: BreakerStatus) -> Option<BreakerTransition> {
        if self.status == to {
            return None;
        }
        let from = self.status;
        self.status = to;
        Some(BreakerTransition { from, to })
    }
}

/// The breaker as the request path sees it: selection reads two atomics on every request
/// (closed, or else the instant it may admit again); the mutex is taken only to admit a
/// request to a breaker that is not closed, and to record an outcome of the fallback.
#[derive(Debug)]
pub struct SharedBreaker {
    policy: BreakerPolicy,
    epoch: Instant,
    closed: AtomicBool,
    /// Published `Breaker::until`, in nanoseconds since `epoch`.
    until_nanos: AtomicU64,
    machine: Mutex<Breaker>,
}

/// The breaker's state for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerStatus,
    pub(crate) consecutive_failures: u32,
    pub(crate) failures_to_open: u32,
    pub(crate) cool_down_seconds: f64,
}

impl SharedBreaker {
    pub fn new(policy: BreakerPolicy) -> SharedBreaker {
        SharedBreaker {
            policy,
            epoch: Instant::now(),
            closed: AtomicBool::new(true),
            until_nanos: AtomicU64::new(0),
            machine: Mutex::new(Breaker::new()),
        }
    }

    pub fn policy(&self) -> BreakerPolicy {
        self.policy
    }

    /// Whether the fallback may be offered to selection now (does not take the trial slot).
    pub(crate) fn would_admit(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.nanos(Instant::now()) >= self.until_nanos.load(Ordering::Acquire)
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn admit(&self) -> Admission {
        if self.closed.load(Ordering::Acquire) {
            return Admission::Allowed;
        }
        let policy = self.policy;
        self.with(|m, now| m.admit(now, &policy))
    }

    pub fn record(&self, success: bool) {
        let policy = self.policy;
        self.with(|m, now| ((), m.record(success, now, &policy)));
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
        BreakerSnapshot {
            state: m.status(),
            consecutive_failures: m.consecutive_failures(),
            failures_to_open: self.policy.failures,
            cool_down_seconds: self.policy.cool_down.as_secs_f64(),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Breaker, Instant) -> (T, Option<BreakerTransition>)) -> T {
        // A poisoned lock means a panic mid-update; the state is plain data, keep going.
        let mut m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
        let (out, transition) = f(&mut m, Instant::now());
        // `until` before `closed`, so a reader that sees "not closed" sees its deadline.
        self.until_nanos
            .store(m.until.map_or(0, |t| self.nanos(t)), Ordering::Release);
        self.closed
            .store(m.status() == BreakerStatus::Closed, Ordering::Release);
        drop(m);
        if let Some(t) = transition {
            tracing::warn!(
                from = t.from.as_str(),
                to = t.to.as_str(),
                "fallback circuit breaker changed state"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const P: BreakerPolicy = BreakerPolicy {
        failures: 3,
        cool_down: Duration::from_secs(10),
    };

    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Ask for admission at t seconds; expect this answer.
        Admit(u64, Admission),
        /// Record an outcome at t seconds.
        Record(u64, bool),
    }
    use Admission::*;
    use Step::*;

    fn run(steps: &[Step]) -> Vec<BreakerStatus> {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Breaker::new();
        let mut statuses = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            match *step {
                Admit(t, want) => {
                    assert_eq!(b.would_admit(at(t)), want != Rejected, "peek at step {i}");
                    assert_eq!(b.admit(at(t), &P).0, want, "step {i}");
                }
                Record(t, ok) => {
                    b.record(ok, at(t), &P);
                }
            }
            statuses.push(b.status());
        }
        statuses
    }

    #[test]
    fn breaker_table() {
        use BreakerStatus::*;
        let cases: [(&str, &[Step], BreakerStatus); 7] = [
            (
                "failures below the threshold keep it closed",
                &[Record(0, false), Record(0, false), Admit(0, Allowed)],
                Closed,
            ),
            (
                "a success resets the count",
                &[
                    Record(0, false),
                    Record(0, false),
                    Record(0, true),
                    Record(0, false),
                    Record(0, false),
                    Admit(0, Allowed),
                ],
                Closed,
            ),
            (
                "the threshold opens it; it sheds until the cool-down ends",
                &[Record(0, false), Record(0, false), Record(1, false), Admit(5, Rejected)],
                Open,
            ),
            (
                "after the cool-down one trial goes through, others wait",
                &[
                    Record(0, false),
                    Record(0, false),
                    Record(0, false),
                    Admit(10, Trial),
                    Admit(11, Rejected),
                ],
                HalfOpen,
            ),
            (
                "a successful trial closes it",
                &[
                    Record(0, false),
                    Record(0, false),
                    Record(0, false),
                    Admit(10, Trial),
                    Record(11, true),
                    Admit(11, Allowed),
                ],
                Closed,
            ),
            (
                "a failed trial reopens it for another cool-down",
                &[
                    Record(0, false),
                    Record(0, false),
                    Record(0, false),
                    Admit(10, Trial),
                    Record(11, false),
                    Admit(20, Rejected),
                    Admit(21, Trial),
                ],
                HalfOpen,
            ),
            (
                "a trial that never reports is given up on after a cool-down",
                &[
                    Record(0, false),
                    Record(0, false),
                    Record(0, false),
                    Admit(10, Trial),
                    Admit(19, Rejected),
                    Admit(20, Trial),
                ],
                HalfOpen,
            ),
        ];
        for (what, steps, want) in cases {
            let statuses = run(steps);
            assert_eq!(statuses.last().copied(), Some(want), "{what}");
        }
    }

    #[test]
    fn transitions_are_reported_once() {
        let t0 = Instant::now();
        let mut b = Breaker::new();
        assert_eq!(b.record(false, t0, &P), None);
        assert_eq!(b.record(false, t0, &P), None);
        let opened = b.record(false, t0, &P);
        assert_eq!(
            opened,
            Some(BreakerTransition {
                from: BreakerStatus::Closed,
                to: BreakerStatus::Open
            })
        );
        // Late failures of requests admitted before it opened change nothing.
        assert_eq!(b.record(false, t0, &P), None);
        let (a, t) = b.admit(t0 + P.cool_down, &P);
        assert_eq!(a, Admission::Trial);
        assert_eq!(t.map(|t| t.to), Some(BreakerStatus::HalfOpen));
        assert_eq!(
            b.record(true, t0 + P.cool_down, &P).map(|t| t.to),
            Some(BreakerStatus::Closed)
        );
        assert_eq!(b.record(true, t0 + P.cool_down, &P), None);
    }

    #[test]
    fn shared_breaker_publishes_closed_flag() {
        let b = SharedBreaker::new(BreakerPolicy {
            failures: 1,
            cool_down: Duration::from_secs(3600),
        });
        assert!(b.would_admit());
        assert_eq!(b.admit(), Admission::Allowed);
        b.record(false);
        assert!(!b.would_admit());
        assert_eq!(b.admit(), Admission::Rejected);
        assert_eq!(b.snapshot().state, BreakerStatus::Open);
    }
}
