//! Reporting health changes once: a transition is logged, counted and published to the
//! gauges and the region availability view in one place, whoever caused it.

use super::{Shared, Snapshot};
use crate::forward::breaker::BreakerStatus;
use crate::health::state::{Event, Status, Transition};
use crate::health::{EndpointHealth, ProbeResult};
use crate::route::RegionState;

impl Shared {
    /// Sets the gauges read from the runtime's state, just before a scrape renders them:
    /// the request path keeps its atomics and pays nothing for these.
    pub(crate) fn refresh_gauges(&self) {
        let rt = self.snapshot();
        let m = &self.metrics;
        m.endpoint_in_flight.reset();
        m.endpoint_queue_depth.reset();
        m.endpoint_kv_cache.reset();
        for r in &rt.regions {
            for e in &r.endpoints {
                let labels = [&*r.name, e.config.url.as_str()];
                m.endpoint_in_flight
                    .with_label_values(&labels)
                    .set(i64::from(e.health.in_flight()));
                let report = e.health.signals.report();
                if let Some(q) = report.and_then(|l| l.queue_depth) {
                    m.endpoint_queue_depth.with_label_values(&labels).set(q);
                }
                if let Some(kv) = report.and_then(|l| l.kv_cache) {
                    m.endpoint_kv_cache.with_label_values(&labels).set(kv);
                }
            }
        }
        m.fallback_breaker_state.reset();
        if let Some(f) = &rt.fallback {
            let now = f.breaker.snapshot().state;
            for s in [BreakerStatus::Closed, BreakerStatus::Open, BreakerStatus::HalfOpen] {
                m.fallback_breaker_state
                    .with_label_values(&[s.as_str()])
                    .set(i64::from(s == now));
            }
        }
    }

    /// Feeds a real-traffic event to an endpoint and reports any transition.
    pub fn observe(&self, rt: &Snapshot, health: &EndpointHealth, event: Event) -> Option<Transition> {
        self.observe_at(rt, health, event, std::time::Instant::now())
    }

    /// [`Self::observe`] at `now`, a time the caller has already read.
    pub(crate) fn observe_at(
        &self,
        rt: &Snapshot,
        health: &EndpointHealth,
        event: Event,
        now: std::time::Instant,
    ) -> Option<Transition> {
        let t = health.observe_at(event, &rt.policy, now);
        if let Some(t) = t {
            self.report(health, t);
        }
        t
    }

    /// [`Self::observe_at`] for several events in order, under the endpoint's one lock.
    pub(crate) fn observe_each_at<const N: usize>(
        &self,
        rt: &Snapshot,
        health: &EndpointHealth,
        events: [Option<Event>; N],
        now: std::time::Instant,
    ) {
        for t in health.observe_each_at(events, &rt.policy, now).into_iter().flatten() {
            self.report(health, t);
        }
    }

    /// Feeds an active probe's result to an endpoint and reports any transition.
    pub fn probed(&self, rt: &Snapshot, health: &EndpointHealth, result: ProbeResult) -> Option<Transition> {
        self.metrics
            .probe_duration
            .with_label_values(&[&health.region])
            .observe(result.latency_ms / 1000.0);
        let t = health.probed(result, &rt.policy);
        if let Some(t) = t {
            self.report(health, t);
        }
        t
    }

    /// Lets time-based transitions happen on every endpoint; clears expired drains.
    pub fn tick(&self, rt: &Snapshot) {
        for r in &rt.regions {
            for e in &r.endpoints {
                if let Some(t) = e.health.tick(&rt.policy) {
                    self.report(&e.health, t);
                }
            }
            if let Some(info) = r.health.expire_drain() {
                tracing::warn!(region = %r.name, by = %info.by, reason = info.reason.as_deref().unwrap_or(""), "region drain expired: back in rotation");
            }
        }
        self.update_saturation(rt);
        self.publish_availability();
    }

    fn report(&self, health: &EndpointHealth, t: Transition) {
        let (region, endpoint) = (health.region.as_str(), &*health.url);
        let reason = t.reason.as_str();
        match t.to {
            Status::Ejected => {
                tracing::warn!(region, endpoint, from = t.from.as_str(), reason, "endpoint ejected");
                self.metrics.ejections.with_label_values(&[region, reason]).inc();
            }
            Status::Probation => {
                tracing::info!(region, endpoint, reason, "endpoint back on probation (slow start)")
            }
            Status::Healthy | Status::Suspect => {
                tracing::debug!(
                    region,
                    endpoint,
                    from = t.from.as_str(),
                    to = t.to.as_str(),
                    reason,
                    "endpoint state changed"
                )
            }
        }
        self.set_endpoint_gauge(health, t.to);
        if t.from == Status::Ejected || t.to == Status::Ejected {
            self.publish_availability();
        }
    }

    /// One series per state, 1 for the current one.
    pub(crate) fn set_endpoint_gauge(&self, health: &EndpointHealth, status: Status) {
        for s in Status::ALL {
            self.metrics
                .endpoint_state
                .with_label_values(&[&health.region, &*health.url, s.as_str()])
                .set(i64::from(s == status));
        }
    }

    /// Refreshes the region and endpoint gauges from the health objects and notes regions
    /// that just came back, which starts their slow start.
    pub(crate) fn publish_availability(&self) {
        let rt = self.snapshot();
        for (i, r) in rt.regions.iter().enumerate() {
            // A saturated region is still up: leaving saturation is no recovery to ramp.
            let available = matches!(
                rt.region_state(i, |_| false),
                RegionState::Available | RegionState::Saturated
            );
            if r.health.note_available(available) && !rt.config.health.slow_start.is_zero() {
                tracing::info!(region = %r.name, slow_start_ms = crate::observe::fields::ms(rt.config.health.slow_start), "region available again: ramping its traffic back");
            }
            self.metrics
                .region_available
                .with_label_values(&[&r.name])
                .set(available as i64);
            let drained = rt.drain_state(i);
            for (source, on) in [("config", drained.config), ("admin", drained.admin)] {
                self.metrics
                    .region_drained
                    .with_label_values(&[&r.name, source])
                    .set(on as i64);
            }
            if r.health.note_config_drain(drained.config) {
                log_config_drain(
                    rt.config.regions.get(i).and_then(|c| c.drain.as_ref()),
                    &r.name,
                    drained.config,
                );
            }
        }
    }

    /// Rebuilds the endpoint gauges after a reload, so removed endpoints disappear.
    pub(crate) fn publish_endpoints(&self, rt: &Snapshot) {
        self.metrics.endpoint_state.reset();
        for r in &rt.regions {
            for e in &r.endpoints {
                self.set_endpoint_gauge(&e.health, e.health.status());
            }
        }
    }
}

/// A config drain starting or ending is logged once, on the change.
fn log_config_drain(drain: Option<&crate::config::ConfigDrain>, region: &str, on: bool) {
    let reason = drain.map_or("", |d| d.reason.as_str());
    let until = drain.and_then(crate::health::drain::format_until).unwrap_or_default();
    if on {
        tracing::warn!(region, reason, %until, "region drained by the config");
    } else {
        tracing::warn!(region, reason, %until, "config drain over: region back in rotation");
    }
}
