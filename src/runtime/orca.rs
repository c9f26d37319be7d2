//! ORCA load reports on the request path: asked for on requests to an `orca` region's
//! endpoints (vLLM and Triton attach one only when asked), read from their response heads
//! and removed before the response reaches the client. A response without the header
//! leaves the reading as it was (servers attach it to inference routes only); a header that
//! cannot be read degrades the endpoint's signals.

use http::{HeaderMap, HeaderValue};

use super::Snapshot;
use crate::config::LoadSource;
use crate::health::EndpointHealth;
use crate::health::load::{self, LoadError};

impl Snapshot {
    fn reads_orca(&self, region: usize) -> bool {
        self.config
            .regions
            .get(region)
            .is_some_and(|c| c.load.source == LoadSource::Orca)
    }

    /// Asks an `orca` region's endpoint for its load report, unless the client already
    /// asked for a format.
    pub(crate) fn ask_for_load_report(&self, region: usize, headers: &mut HeaderMap) {
        if let Some((name, value)) = self.load_report_field(region) {
            if !headers.contains_key(name) {
                headers.insert(name, HeaderValue::from_static(value));
            }
        }
    }

    /// The field that asks an `orca` region's endpoint for its load report (sent unless
    /// the client asked for a format); `None` for other regions.
    pub(crate) fn load_report_field(&self, region: usize) -> Option<(&'static str, &'static str)> {
        self.reads_orca(region).then_some((load::ORCA_FORMAT_HEADER, "TEXT"))
    }

    /// Reads the load report of an `orca` region's response into the endpoint's signals
    /// and removes it: load reports are for Meridian's balancer, not for clients (they
    /// would expose internal queue and cache numbers). `take` removes a field from the
    /// response and returns its first value.
    pub(crate) fn take_load_report(
        &self,
        region: usize,
        health: &EndpointHealth,
        take: impl FnOnce(&str) -> Option<HeaderValue>,
    ) {
        let Some(config) = self.config.regions.get(region) else {
            return;
        };
        if config.load.source != LoadSource::Orca {
            return;
        }
        let Some(value) = take(load::ORCA_HEADER) else {
            return;
        };
        let reading = value
            .to_str()
            .map_err(|_| LoadError::Orca("not visible ASCII".into()))
            .and_then(load::parse_orca);
        let interval = config.probe.interval.unwrap_or(self.config.health.interval);
        health.update_signals(reading, load::ttl(interval));
    }
}
