//! Endpoint and region health: the pure state machine (`state`) and the shared, lock-free
//! runtime view the request path reads.

pub mod state;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::balance::EndpointLoad;
use state::{EndpointState, Event, Policy, Status, Transition};

/// Runtime state of one endpoint, shared by requests, probes and admin. Kept across config
/// reloads for endpoints that stay (same region, same URL).
#[derive(Debug)]
pub struct EndpointHealth {
    pub region: String,
    pub url: String,
    in_flight: AtomicU32,
    /// Published copy of `machine.available()`, so picks read one atomic.
    available: AtomicBool,
    /// Published copy of the TTFB EWMA (f64 bits, seconds).
    ttfb_ewma: AtomicU64,
    machine: Mutex<EndpointState>,
    epoch: Instant,
}

impl EndpointHealth {
    pub fn new(region: &str, url: &str) -> EndpointHealth {
        let now = Instant::now();
        EndpointHealth {
            region: region.to_string(),
            url: url.to_string(),
            in_flight: AtomicU32::new(0),
            available: AtomicBool::new(true),
            ttfb_ewma: AtomicU64::new(0f64.to_bits()),
            machine: Mutex::new(EndpointState::new(now)),
            epoch: now,
        }
    }

    pub fn is_available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn ttfb_ewma(&self) -> f64 {
        f64::from_bits(self.ttfb_ewma.load(Ordering::Relaxed))
    }

    pub fn load(&self, weight: u32) -> EndpointLoad {
        EndpointLoad {
            eligible: self.is_available(),
            latency: self.ttfb_ewma(),
            in_flight: self.in_flight(),
            weight: weight as f64,
            queue_depth: 0.0,
            kv_cache: 0.0,
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Feeds one event to the state machine and publishes the result.
    pub fn observe(&self, event: Event, policy: &Policy) -> Option<Transition> {
        self.with_machine(|m, now| m.observe(event, now, policy))
    }

    /// Lets time-based transitions (ejection expiry) happen without an event.
    pub fn tick(&self) -> Option<Transition> {
        self.with_machine(|m, now| m.tick(now))
    }

    fn with_machine(&self, f: impl FnOnce(&mut EndpointState, Instant) -> Option<Transition>) -> Option<Transition> {
        let now = Instant::now();
        // A poisoned lock means a panic mid-update; the state is still plain data, keep going.
        let mut m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
        let t = f(&mut m, now);
        self.available.store(m.available(now), Ordering::Release);
        self.ttfb_ewma.store(m.ttfb_ewma.to_bits(), Ordering::Relaxed);
        t
    }

    pub fn snapshot(&self) -> EndpointSnapshot {
        let m = self.machine.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        EndpointSnapshot {
            url: self.url.clone(),
            state: m.status,
            available: m.available(now),
            reason: m.reason,
            since_seconds: now.duration_since(m.since).as_secs_f64(),
            ttfb_ewma_ms: m.ttfb_ewma * 1000.0,
            in_flight: self.in_flight(),
            consecutive_errors: m.consecutive_errors,
            total_errors: m.total_errors,
            ejections: m.ejections,
            uptime_seconds: now.duration_since(self.epoch).as_secs_f64(),
        }
    }
}

/// An endpoint's state for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    pub url: String,
    pub state: Status,
    pub available: bool,
    pub reason: Option<state::Reason>,
    pub since_seconds: f64,
    pub ttfb_ewma_ms: f64,
    pub in_flight: u32,
    pub consecutive_errors: u32,
    pub total_errors: u64,
    pub ejections: u32,
    pub uptime_seconds: f64,
}

/// Decrements the in-flight count when the request (and its streamed body) is done.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<EndpointHealth>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runtime state of one region, kept across reloads by name.
#[derive(Debug, Default)]
pub struct RegionHealth {
    drained: AtomicBool,
}

impl RegionHealth {
    pub fn is_drained(&self) -> bool {
        self.drained.load(Ordering::Acquire)
    }

    /// Returns whether the flag changed.
    pub fn set_drained(&self, drained: bool) -> bool {
        self.drained.swap(drained, Ordering::AcqRel) != drained
    }
}

/// The health policy from the validated config.
pub fn policy(config: &crate::config::Config) -> Policy {
    Policy {
        unhealthy_after: config.health.unhealthy_after,
        healthy_after: config.health.healthy_after,
        consecutive_errors: config.outlier.consecutive_errors,
        ttfb_threshold: config.outlier.ttfb_threshold,
        ejection_time: config.outlier.ejection_time,
        max_ejection_time: config.outlier.max_ejection_time,
        max_retry_after: config.outlier.max_retry_after,
    }
}
