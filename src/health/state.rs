//! The per-endpoint health state machine: events and a clock in, transitions out. No I/O.

use std::time::{Duration, Instant};

use serde::Serialize;

/// Thresholds the machine applies; built from `[health]` and `[outlier]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    pub consecutive_errors: u32,
    pub ttfb_threshold: Duration,
    pub ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_retry_after: Duration,
}

/// Something that happened to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    ProbePassed {
        latency: Duration,
    },
    ProbeFailed,
    /// A response head arrived from real traffic.
    Response {
        status: u16,
        ttfb: Duration,
    },
    /// The endpoint asked to be left alone (`429`/`503` with `Retry-After`).
    Shed {
        retry_after: Duration,
    },
    ConnectError,
    Timeout,
    /// A streamed body stopped mid-way (stall or reset).
    StreamError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Healthy,
    Ejected,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    ProbesFailed,
    ProbesPassed,
    ConsecutiveErrors,
    SlowFirstByte,
    EjectionExpired,
}

/// A change of status, returned once so callers log and count it once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Status,
    pub to: Status,
    pub reason: Reason,
}

#[derive(Debug, Clone)]
pub struct EndpointState {
    pub status: Status,
    pub reason: Option<Reason>,
    pub since: Instant,
    pub probe_failures: u32,
    pub probe_passes: u32,
    pub consecutive_errors: u32,
    pub total_errors: u64,
    pub ejections: u32,
    pub ejected_until: Option<Instant>,
    pub shed_until: Option<Instant>,
    /// EWMA of time to first byte, seconds.
    pub ttfb_ewma: f64,
}

const EWMA_WEIGHT: f64 = 0.3;

impl EndpointState {
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
            ejected_until: None,
            shed_until: None,
            ttfb_ewma: 0.0,
        }
    }

    /// May take new requests at `now`.
    pub fn available(&self, now: Instant) -> bool {
        self.status == Status::Healthy && self.shed_until.is_none_or(|t| now >= t)
    }

    fn goto(&mut self, to: Status, reason: Reason, now: Instant) -> Option<Transition> {
        if self.status == to {
            return None;
        }
        let from = self.status;
        self.status = to;
        self.reason = Some(reason);
        self.since = now;
        Some(Transition { from, to, reason })
    }

    fn eject(&mut self, reason: Reason, now: Instant, p: &Policy) -> Option<Transition> {
        let factor = 1u32 << self.ejections.min(16);
        let time = (p.ejection_time * factor).min(p.max_ejection_time);
        self.ejections = self.ejections.saturating_add(1);
        self.ejected_until = Some(now + time);
        self.consecutive_errors = 0;
        self.goto(Status::Ejected, reason, now)
    }

    fn error(&mut self, now: Instant, p: &Policy) -> Option<Transition> {
        self.consecutive_errors += 1;
        self.total_errors += 1;
        if self.status == Status::Healthy && self.consecutive_errors >= p.consecutive_errors {
            return self.eject(Reason::ConsecutiveErrors, now, p);
        }
        None
    }

    /// Applies one event at `now`.
    pub fn observe(&mut self, event: Event, now: Instant, p: &Policy) -> Option<Transition> {
        let expired = self.tick(now);
        let t = match event {
            Event::ProbePassed { latency } => {
                self.probe_failures = 0;
                self.probe_passes += 1;
                if self.ttfb_ewma == 0.0 {
                    self.ttfb_ewma = latency.as_secs_f64();
                }
                if self.status == Status::Unhealthy && self.probe_passes >= p.healthy_after {
                    self.goto(Status::Healthy, Reason::ProbesPassed, now)
                } else {
                    None
                }
            }
            Event::ProbeFailed => {
                self.probe_passes = 0;
                self.probe_failures += 1;
                if self.status != Status::Unhealthy && self.probe_failures >= p.unhealthy_after {
                    self.goto(Status::Unhealthy, Reason::ProbesFailed, now)
                } else {
                    None
                }
            }
            Event::Response { status, ttfb } => {
                let x = ttfb.as_secs_f64();
                self.ttfb_ewma = if self.ttfb_ewma == 0.0 {
                    x
                } else {
                    EWMA_WEIGHT * x + (1.0 - EWMA_WEIGHT) * self.ttfb_ewma
                };
                if status >= 500 {
                    self.error(now, p)
                } else {
                    self.consecutive_errors = 0;
                    if self.status == Status::Healthy && self.ttfb_ewma > p.ttfb_threshold.as_secs_f64() {
                        self.eject(Reason::SlowFirstByte, now, p)
                    } else {
                        None
                    }
                }
            }
            Event::Shed { retry_after } => {
                self.shed_until = Some(now + retry_after.min(p.max_retry_after));
                None
            }
            Event::ConnectError | Event::Timeout | Event::StreamError => self.error(now, p),
        };
        t.or(expired)
    }

    /// Ends an ejection whose time is up.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        match self.ejected_until {
            Some(until) if self.status == Status::Ejected && now >= until => {
                self.ejected_until = None;
                // Forget the slow average, or the first response would eject again.
                self.ttfb_ewma = 0.0;
                self.goto(Status::Healthy, Reason::EjectionExpired, now)
            }
            _ => None,
        }
    }
}
