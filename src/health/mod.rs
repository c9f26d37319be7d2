//! Endpoint and region health: the pure state machine (`state`), latency and slow-start
//! maths, load signals from the model servers (`load`), drains, and the shared, lock-free
//! view the request path reads. The tasks that feed it from outside the traffic (probes,
//! scrapes, model discovery) are in `crate::probe`.

pub mod drain;
pub mod exposition;
pub(crate) mod latency;
pub mod load;
pub mod slow_start;
pub mod state;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::balance::EndpointLoad;
use latency::PeakEwma;
use state::{EndpointState, Event, Policy, Status, Transition};

/// Milliseconds since the first call in this process: lets atomics carry instants.
pub(crate) fn millis(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    t.saturating_duration_since(epoch).as_millis() as u64
}

/// Marks "no instant" in the atomics below.
const NEVER: u64 = u64::MAX;

/// An endpoint's identity: its URL hashed (FNV-1a, then the murmur3 finaliser), the same in
/// every Meridian instance and across reloads. Prefix and session affinity rank endpoints by
/// it (so every instance sends a prompt to the same endpoint); the background tasks find their
/// endpoint in a new snapshot by it and the region's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EndpointId(pub u64);

impl EndpointId {
    /// The id of the endpoint at `url`.
    pub fn of_url(url: &str) -> EndpointId {
        EndpointId(crate::balance::mix(crate::balance::fnv1a(url.as_bytes())))
    }
}

/// Live state of one endpoint, shared by requests, probes and admin. Kept across config
/// reloads for endpoints that stay (same region, same URL).
#[derive(Debug)]
pub struct EndpointHealth {
    /// The name of the region the endpoint belongs to.
    pub region: String,
    /// The endpoint's identity, from its URL.
    pub id: EndpointId,
    pub(crate) url: Arc<str>,
    in_flight: AtomicU32,
    /// Published copy of `machine.status.serving()`, so picks read atomics, not the lock.
    serving: AtomicBool,
    /// `Retry-After` shedding ends at this `millis()`.
    shed_until: AtomicU64,
    /// Probation (slow start) began at this `millis()`, or `NEVER`.
    ramp_start: AtomicU64,
    /// Peak-EWMA latency for the balancer (f64 bits, seconds).
    latency: AtomicU64,
    /// A probe has completed since start-up.
    probed: AtomicBool,
    /// Queue depth and KV cache as the model server last reported them.
    pub signals: load::LoadSignals,
    /// The models the endpoint listed at `GET /v1/models` last time (discovering regions).
    pub models: arc_swap::ArcSwapOption<Vec<String>>,
    machine: Mutex<Machine>,
}

#[derive(Debug)]
struct Machine {
    state: EndpointState,
    latency: PeakEwma,
    last_transition: SystemTime,
    last_probe: Option<ProbeResult>,
}

/// The latest active probe, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub(crate) ok: bool,
    pub(crate) latency_ms: f64,
    pub(crate) detail: Option<String>,
}

impl EndpointHealth {
    /// Records a load-signal reading (a scraped page or an ORCA header) and logs a change
    /// of the signals' state once per change.
    pub(crate) fn update_signals(&self, reading: Result<load::LoadReport, load::LoadError>, ttl: Duration) {
        let (region, endpoint) = (self.region.as_str(), &*self.url);
        match self.signals.update(reading, ttl) {
            Some(load::SignalChange::Degraded(error)) => {
                tracing::warn!(region, endpoint, %error, "load signals unavailable: balancing without them until they return")
            }
            Some(load::SignalChange::Recovered) => tracing::info!(region, endpoint, "load signals back"),
            None => {}
        }
    }

    /// The live state of a new endpoint of `region` at `url`: healthy, unprobed, idle.
    pub fn new(region: &str, url: &str) -> EndpointHealth {
        let now = Instant::now();
        EndpointHealth {
            region: region.to_string(),
            id: EndpointId::of_url(url),
            url: Arc::from(url),
            in_flight: AtomicU32::new(0),
            serving: AtomicBool::new(true),
            shed_until: AtomicU64::new(0),
            ramp_start: AtomicU64::new(NEVER),
            latency: AtomicU64::new(0f64.to_bits()),
            probed: AtomicBool::new(false),
            signals: load::LoadSignals::default(),
            models: arc_swap::ArcSwapOption::empty(),
            machine: Mutex::new(Machine {
                state: EndpointState::new(now),
                latency: PeakEwma::default(),
                last_transition: SystemTime::now(),
                last_probe: None,
            }),
        }
    }

    /// May take new requests now: in rotation and not shedding load.
    pub(crate) fn is_available(&self) -> bool {
        self.available_with(Instant::now)
    }

    /// [`Self::is_available`] at `now`, so tests control the clock.
    #[cfg(test)]
    pub(crate) fn is_available_at(&self, now: Instant) -> bool {
        self.available_with(|| now)
    }

    fn available_with(&self, now: impl FnOnce() -> Instant) -> bool {
        if !self.serving.load(Ordering::Acquire) {
            return false;
        }
        // 0 means "not shedding", the usual case: no clock read on the request path then
        // (this runs per endpoint in every pick and region check).
        let shed_until = self.shed_until.load(Ordering::Relaxed);
        shed_until == 0 || millis(now()) >= shed_until
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn latency(&self) -> f64 {
        f64::from_bits(self.latency.load(Ordering::Relaxed))
    }

    pub(crate) fn has_been_probed(&self) -> bool {
        self.probed.load(Ordering::Acquire)
    }

    /// Slow-start factor in `FLOOR..=1`: below 1 while on probation.
    pub fn ramp(&self, window: Duration) -> f64 {
        match self.ramp_start.load(Ordering::Relaxed) {
            NEVER => 1.0,
            start => slow_start::ramp(
                Duration::from_millis(millis(Instant::now()).saturating_sub(start)),
                window,
            ),
        }
    }

    pub(crate) fn load(&self, weight: u32, slow_start: Duration) -> EndpointLoad {
        let signals = self.signals.current().unwrap_or_default();
        EndpointLoad {
            eligible: self.is_available(),
            latency: self.latency(),
            in_flight: self.in_flight(),
            weight: weight as f64 * self.ramp(slow_start),
            queue_depth: signals.queue_depth,
            kv_cache: signals.kv_cache,
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Feeds one event to the state machine and publishes the result. Callers should go
    /// through [`crate::runtime::Shared::observe`], which also logs and counts transitions.
    pub fn observe(&self, event: Event, policy: &Policy) -> Option<Transition> {
        self.observe_at(event, policy, Instant::now())
    }

    /// [`Self::observe`] at `now`: a time the caller already read, or one a test controls.
    pub(crate) fn observe_at(&self, event: Event, policy: &Policy, now: Instant) -> Option<Transition> {
        self.with_machine(now, |m, now| Self::apply(m, event, policy, now))
    }

    /// [`Self::observe_at`] for the events one answer ends with, in order, under one lock
    /// (one lock and one publication where each event took its own); each event may make
    /// its own transition.
    pub(crate) fn observe_each_at<const N: usize>(
        &self,
        events: [Option<Event>; N],
        policy: &Policy,
        now: Instant,
    ) -> [Option<Transition>; N] {
        let mut made = [None; N];
        self.with_machine(now, |m, now| {
            for (event, t) in events.into_iter().zip(made.iter_mut()) {
                if let Some(event) = event {
                    *t = Self::apply(m, event, policy, now);
                }
            }
            made.iter().rev().find_map(|t| *t)
        });
        made
    }

    fn apply(m: &mut Machine, event: Event, policy: &Policy, now: Instant) -> Option<Transition> {
        match event {
            Event::ProbePassed { latency } => m.latency.observe(latency, now),
            Event::Response { ttfb, .. } => m.latency.observe(ttfb, now),
            // A streamed answer's head comes at once: its first token is what the
            // balancer should steer by.
            Event::Answered(a) if a.streamed => {
                if let Some(first) = a.first_token {
                    m.latency.observe(first, now)
                }
            }
            _ => {}
        }
        m.state.observe(event, now, policy)
    }

    /// Records an active probe's outcome for `/status`, then feeds it to the machine.
    pub fn probed(&self, result: ProbeResult, policy: &Policy) -> Option<Transition> {
        let event = if result.ok {
            Event::ProbePassed {
                latency: Duration::from_secs_f64(result.latency_ms / 1000.0),
            }
        } else {
            Event::ProbeFailed
        };
        let t = self.with_machine(Instant::now(), |m, now| {
            m.last_probe = Some(result);
            if let Event::ProbePassed { latency } = event {
                m.latency.observe(latency, now);
            }
            m.state.observe(event, now, policy)
        });
        self.probed.store(true, Ordering::Release);
        t
    }

    /// Lets time-based transitions (hold-down over, probation done) happen without an event.
    pub fn tick(&self, policy: &Policy) -> Option<Transition> {
        self.with_machine(Instant::now(), |m, now| m.state.tick(now, policy))
    }

    /// The endpoint's current status in the state machine.
    pub fn status(&self) -> Status {
        self.lock().state.status
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        // A poisoned lock means a panic mid-update; the state is still plain data, keep going.
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_machine(
        &self,
        now: Instant,
        f: impl FnOnce(&mut Machine, Instant) -> Option<Transition>,
    ) -> Option<Transition> {
        let mut m = self.lock();
        let t = f(&mut m, now);
        if t.is_some() {
            m.last_transition = SystemTime::now();
        }
        let s = &m.state;
        self.serving.store(s.status.serving(), Ordering::Release);
        self.shed_until.store(s.shed_until.map_or(0, millis), Ordering::Relaxed);
        self.ramp_start
            .store(s.ramp_start().map_or(NEVER, millis), Ordering::Relaxed);
        self.latency.store(m.latency.value.to_bits(), Ordering::Relaxed);
        t
    }

    pub(crate) fn snapshot(&self, slow_start: Duration) -> EndpointSnapshot {
        let now = Instant::now();
        let m = self.lock();
        let s = &m.state;
        EndpointSnapshot {
            url: self.url.to_string(),
            state: s.status,
            available: s.available(now),
            reason: s.reason.map(state::Reason::as_str),
            since_seconds: now.saturating_duration_since(s.since).as_secs_f64(),
            last_transition_unix: m
                .last_transition
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            ejected_for_seconds: s
                .ejected_until
                .filter(|_| s.status == Status::Ejected)
                .map(|t| t.saturating_duration_since(now).as_secs_f64()),
            shed_for_seconds: s
                .shed_until
                .map(|t| t.saturating_duration_since(now).as_secs_f64())
                .filter(|d| *d > 0.0),
            slow_start_weight: s
                .ramp_start()
                .map(|t| slow_start::ramp(now.saturating_duration_since(t), slow_start)),
            ttfb_ewma_ms: s.ttfb_ewma * 1000.0,
            tpot_ewma_ms: s.tpot_ewma * 1000.0,
            models: self.models.load_full().map(|m| m.as_ref().clone()),
            latency_ewma_ms: m.latency.value * 1000.0,
            in_flight: self.in_flight(),
            consecutive_errors: s.consecutive_errors,
            total_errors: s.total_errors,
            ejections: s.ejections,
            probe_failures: s.probe_failures,
            probe_passes: s.probe_passes,
            last_probe: m.last_probe.clone(),
            load_signals: self.signals.state(),
            load: self.signals.report(),
        }
    }
}

/// An endpoint's state for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    pub(crate) url: String,
    pub(crate) state: Status,
    pub(crate) available: bool,
    /// Why it is in its state.
    pub reason: Option<&'static str>,
    pub(crate) since_seconds: f64,
    pub(crate) last_transition_unix: f64,
    pub(crate) ejected_for_seconds: Option<f64>,
    pub(crate) shed_for_seconds: Option<f64>,
    pub(crate) slow_start_weight: Option<f64>,
    /// The outlier check's first-token average (TTFT, or head time of plain answers).
    pub ttfb_ewma_ms: f64,
    /// The outlier check's time-per-output-token average.
    pub tpot_ewma_ms: f64,
    /// Models listed at `GET /v1/models` (regions with `discover_models`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    pub(crate) latency_ewma_ms: f64,
    pub(crate) in_flight: u32,
    /// Failed requests in a row.
    pub consecutive_errors: u32,
    pub(crate) total_errors: u64,
    pub(crate) ejections: u32,
    pub(crate) probe_failures: u32,
    pub(crate) probe_passes: u32,
    pub(crate) last_probe: Option<ProbeResult>,
    /// Whether the model server's load report is being read.
    pub load_signals: load::SignalState,
    /// The latest load report, while fresh.
    pub load: Option<load::LoadReport>,
}

/// Decrements the in-flight count when the request (and its streamed body) is done.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<EndpointHealth>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Live state of one region, kept across reloads by name.
#[derive(Debug)]
pub struct RegionHealth {
    /// 0: not drained; `NEVER`: drained until undrained; else drained until this `millis()`.
    drained_until: AtomicU64,
    drain: Mutex<Option<DrainInfo>>,
    /// Availability as last published, to notice a recovery.
    was_available: AtomicBool,
    /// The region came back at this `millis()` (slow start), or `NEVER`.
    recovered_at: AtomicU64,
    /// Every endpoint is past a spillover threshold (with hysteresis, see `route::spillover`).
    saturated: AtomicBool,
    /// The config's drain as last published, to log its start and end once.
    config_drained: AtomicBool,
}

impl Default for RegionHealth {
    fn default() -> Self {
        RegionHealth {
            drained_until: AtomicU64::new(0),
            drain: Mutex::new(None),
            // Regions start available: no slow start at start-up.
            was_available: AtomicBool::new(true),
            recovered_at: AtomicU64::new(NEVER),
            saturated: AtomicBool::new(false),
            config_drained: AtomicBool::new(false),
        }
    }
}

/// Who drained a region, why, and until when; for logs and `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct DrainInfo {
    /// Fingerprint of the admin token used (never the token).
    pub by: String,
    /// The admin client's socket address.
    pub peer: String,
    /// The reason given with the drain call (`?reason=`), if any.
    pub reason: Option<String>,
    pub(crate) since_unix: f64,
    pub(crate) until_unix: Option<f64>,
}

impl RegionHealth {
    pub(crate) fn is_drained(&self) -> bool {
        self.drained_with(Instant::now)
    }

    /// [`Self::is_drained`] at `now`, so tests control the clock.
    pub(crate) fn is_drained_at(&self, now: Instant) -> bool {
        self.drained_with(|| now)
    }

    /// The clock is read only for a drain with an end: every request asks this of its
    /// regions, and almost none is drained.
    fn drained_with(&self, now: impl FnOnce() -> Instant) -> bool {
        match self.drained_until.load(Ordering::Acquire) {
            0 => false,
            NEVER => true,
            until => millis(now()) < until,
        }
    }

    /// Drains for `duration` (or until undrained). Returns whether it was not drained before.
    pub fn drain(&self, duration: Option<Duration>, info: DrainInfo) -> bool {
        self.drain_at(duration, info, Instant::now())
    }

    /// [`Self::drain`] at `now`, so tests control the clock.
    pub(crate) fn drain_at(&self, duration: Option<Duration>, info: DrainInfo, now: Instant) -> bool {
        let was = self.is_drained_at(now);
        let until = duration.map_or(NEVER, |d| millis(now + d).max(1));
        *self.drain.lock().unwrap_or_else(|p| p.into_inner()) = Some(info);
        self.drained_until.store(until, Ordering::Release);
        !was
    }

    /// Returns whether it was drained before.
    pub fn undrain(&self) -> bool {
        let was = self.is_drained();
        self.drained_until.store(0, Ordering::Release);
        *self.drain.lock().unwrap_or_else(|p| p.into_inner()) = None;
        was
    }

    pub(crate) fn drain_info(&self) -> Option<DrainInfo> {
        self.drain_info_at(Instant::now())
    }

    /// [`Self::drain_info`] at `now`, so tests control the clock.
    pub(crate) fn drain_info_at(&self, now: Instant) -> Option<DrainInfo> {
        if !self.is_drained_at(now) {
            return None;
        }
        self.drain.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Clears a drain whose time is up; returns its info once, so it is logged once.
    pub(crate) fn expire_drain(&self) -> Option<DrainInfo> {
        self.expire_drain_at(Instant::now())
    }

    /// [`Self::expire_drain`] at `now`, so tests control the clock.
    pub(crate) fn expire_drain_at(&self, now: Instant) -> Option<DrainInfo> {
        let until = self.drained_until.load(Ordering::Acquire);
        if until == 0 || until == NEVER || millis(now) < until {
            return None;
        }
        self.drained_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        self.drain.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Notes the region's availability; a return to service starts its slow start.
    /// Returns true when it just came back.
    pub(crate) fn note_available(&self, available: bool) -> bool {
        let was = self.was_available.swap(available, Ordering::AcqRel);
        if available && !was {
            self.recovered_at.store(millis(Instant::now()), Ordering::Release);
            return true;
        }
        false
    }

    /// Notes whether the config drains the region; returns whether that changed.
    pub(crate) fn note_config_drain(&self, drained: bool) -> bool {
        self.config_drained.swap(drained, Ordering::AcqRel) != drained
    }

    pub(crate) fn is_saturated(&self) -> bool {
        self.saturated.load(Ordering::Acquire)
    }

    /// Returns whether the state changed.
    pub(crate) fn set_saturated(&self, saturated: bool) -> bool {
        self.saturated.swap(saturated, Ordering::AcqRel) != saturated
    }

    /// Share of its clients the region takes back: below 1 during slow start.
    pub fn ramp(&self, window: Duration) -> f64 {
        match self.recovered_at.load(Ordering::Acquire) {
            NEVER => 1.0,
            at => slow_start::ramp(Duration::from_millis(millis(Instant::now()).saturating_sub(at)), window),
        }
    }
}

/// The health policy from the validated config.
pub fn policy(config: &crate::config::Config) -> Policy {
    Policy {
        unhealthy_after: config.health.unhealthy_after,
        healthy_after: config.health.healthy_after,
        outlier: config.outlier,
        probation: config.health.slow_start,
        probes: config.health.enabled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DrainInfo {
        DrainInfo {
            by: "sha256:00000000".into(),
            peer: "127.0.0.1:1".into(),
            reason: Some("drill".into()),
            since_unix: 0.0,
            until_unix: None,
        }
    }

    #[test]
    fn a_drain_with_an_expiry_ends_by_itself_and_is_reported_once() {
        let r = RegionHealth::default();
        let start = Instant::now();
        assert!(r.drain_at(Some(Duration::from_millis(30)), info(), start));
        assert!(r.is_drained_at(start));
        assert!(r.is_drained_at(start + Duration::from_millis(29)));
        assert!(
            r.expire_drain_at(start + Duration::from_millis(29)).is_none(),
            "not yet"
        );
        assert_eq!(r.drain_info_at(start).and_then(|i| i.reason), Some("drill".into()));
        let later = start + Duration::from_millis(40);
        assert!(
            !r.is_drained_at(later),
            "expired on the hot path without waiting for a tick"
        );
        assert!(r.drain_info_at(later).is_none());
        assert!(r.expire_drain_at(later).is_some());
        assert!(r.expire_drain_at(later).is_none());
        assert!(r.drain_at(None, info(), later));
        assert!(
            r.expire_drain_at(later + Duration::from_secs(3600)).is_none(),
            "an open-ended drain does not expire"
        );
        assert!(r.undrain());
        assert!(!r.undrain());
    }

    #[test]
    fn only_a_return_starts_the_region_ramp() {
        let r = RegionHealth::default();
        let window = Duration::from_secs(10);
        assert!(!r.note_available(true), "available from start-up: no ramp");
        assert_eq!(r.ramp(window), 1.0);
        assert!(!r.note_available(false));
        assert!(r.note_available(true));
        let ramp = r.ramp(window);
        assert!((slow_start::FLOOR..0.2).contains(&ramp), "{ramp}");
        assert_eq!(r.ramp(Duration::ZERO), 1.0);
    }

    /// One probe or one error ejects; Retry-After capped at 30 ms.
    fn strict_policy() -> Policy {
        Policy {
            unhealthy_after: 1,
            healthy_after: 1,
            outlier: crate::config::OutlierConfig {
                consecutive_errors: 1,
                ttfb_threshold: Duration::from_secs(1),
                tpot_threshold: Duration::from_millis(250),
                ejection_time: Duration::from_secs(60),
                max_ejection_time: Duration::from_secs(60),
                max_retry_after: Duration::from_millis(30),
            },
            probation: Duration::from_secs(10),
            probes: true,
        }
    }

    /// The events an answer ends with, applied under one lock, leave the endpoint as the
    /// same events fed one by one do, with the same transitions.
    #[test]
    fn events_under_one_lock_match_the_same_events_one_by_one() {
        let strict = strict_policy();
        let p = Policy {
            outlier: crate::config::OutlierConfig {
                consecutive_errors: 2,
                ttfb_threshold: Duration::from_millis(100),
                tpot_threshold: Duration::from_millis(50),
                max_retry_after: Duration::from_secs(1),
                ..strict.outlier
            },
            ..strict
        };
        let slow = |streamed| {
            Event::Answered(state::Answer {
                streamed,
                head: Duration::from_millis(1),
                first_token: Some(Duration::from_millis(900)),
                per_token: Some(Duration::from_millis(400)),
            })
        };
        // (history before, the events of the answer)
        let cases: [(&[Event], [Option<Event>; 2]); 5] = [
            (&[], [Some(Event::Completed), Some(slow(true))]),
            (&[Event::StreamError], [Some(Event::Completed), None]),
            (&[Event::StreamError], [Some(Event::StreamError), Some(slow(false))]),
            (&[], [None, None]),
            (&[Event::ConnectError], [None, Some(slow(true))]),
        ];
        for (before, events) in cases {
            let start = Instant::now();
            let (one_by_one, batched) = (EndpointHealth::new("r", "u"), EndpointHealth::new("r", "u"));
            for h in [&one_by_one, &batched] {
                for e in before {
                    h.observe_at(*e, &p, start);
                }
            }
            let at = start + Duration::from_millis(5);
            let expected = events.map(|e| e.and_then(|e| one_by_one.observe_at(e, &p, at)));
            assert_eq!(batched.observe_each_at(events, &p, at), expected, "{events:?}");
            assert_eq!(batched.status(), one_by_one.status(), "{events:?}");
            assert_eq!(
                batched.latency.load(Ordering::Relaxed),
                one_by_one.latency.load(Ordering::Relaxed),
                "{events:?}"
            );
        }
    }

    #[test]
    fn shedding_and_ejection_are_read_without_the_lock() {
        let h = EndpointHealth::new("r", "http://127.0.0.1:1");
        let p = strict_policy();
        let start = Instant::now();
        h.observe_at(
            Event::Shed {
                retry_after: Duration::from_secs(5),
            },
            &p,
            start,
        );
        assert!(!h.is_available_at(start));
        assert!(!h.is_available_at(start + Duration::from_millis(29)));
        let later = start + Duration::from_millis(40);
        assert!(h.is_available_at(later), "Retry-After capped by max_retry_after");
        let t = h.observe_at(Event::ConnectError, &p, later);
        assert_eq!(
            t.map(|t| (t.to, t.reason)),
            Some((Status::Ejected, state::Reason::ConsecutiveErrors))
        );
        assert!(!h.is_available_at(later));
        assert!(!h.load(1, Duration::from_secs(10)).eligible);
    }
}
