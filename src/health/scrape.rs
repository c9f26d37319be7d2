//! Reading load signals: a model server's Prometheus page, scraped right after each passed
//! health probe with the probe's timeout, and ORCA headers on responses. A missing or broken
//! page or header degrades the endpoint's signals to `none` with one warning; clients never
//! see it.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};

use super::EndpointHealth;
use super::load::{self, LoadError, LoadReport, SignalChange};
use crate::forward::endpoint_get::endpoint_get;
use crate::runtime::Snapshot;
use http::HeaderValue;

/// Metrics pages past this size are not read: vLLM's, histograms included, is far smaller.
const MAX_PAGE: usize = 4 * 1024 * 1024;

/// Scrapes `health`'s metrics page if its region reads one, and records the reading.
pub async fn scrape(rt: &Snapshot, health: &Arc<EndpointHealth>) {
    let Some((config, endpoint)) = rt.endpoint_of(health) else {
        return;
    };
    if !load::scraped(config.load.source) {
        return;
    }
    let timeout = config.probe.timeout.unwrap_or(rt.config.health.timeout);
    let interval = config.probe.interval.unwrap_or(rt.config.health.interval);
    let reading = async {
        let req =
            endpoint_get(&endpoint.config, &config.load.path, "meridian-load-scrape").map_err(LoadError::Fetch)?;
        let resp = rt
            .upstreams
            .send(req, endpoint.config.protocol, timeout)
            .await
            .map_err(|e| LoadError::Fetch(e.detail()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_PAGE)
            .collect()
            .await
            .map_err(|e| LoadError::Fetch(format!("reading the page: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(LoadError::Fetch(format!("status {}", status.as_u16())));
        }
        load::parse_prometheus(config.load.source, &String::from_utf8_lossy(&body))
    };
    let reading: Result<LoadReport, LoadError> = match tokio::time::timeout(timeout, reading).await {
        Ok(r) => r,
        Err(_) => Err(LoadError::Fetch(format!("no answer within {timeout:?}"))),
    };
    let change = health.signals.update(reading, load::ttl(interval));
    report(health, change);
}

/// Logs a change of an endpoint's signal state, once per change.
pub fn report(health: &EndpointHealth, change: Option<SignalChange>) {
    let (region, endpoint) = (health.region.as_str(), health.url.as_str());
    match change {
        Some(SignalChange::Degraded(error)) => {
            tracing::warn!(region, endpoint, %error, "load signals unavailable: balancing without them until they return")
        }
        Some(SignalChange::Recovered) => tracing::info!(region, endpoint, "load signals back"),
        None => {}
    }
}

/// Reads an ORCA load report from a response of an endpoint in region `region`, when that
/// region's source is `orca`. A response without the header leaves the reading as it was
/// (servers attach it to inference routes only); a header that cannot be read degrades.
pub fn orca(rt: &Snapshot, region: usize, health: &EndpointHealth, headers: &http::HeaderMap) {
    let Some(config) = rt.config.regions.get(region) else {
        return;
    };
    if config.load.source != crate::config::LoadSource::Orca {
        return;
    }
    let Some(value) = headers.get(load::ORCA_HEADER) else {
        return;
    };
    let reading = value
        .to_str()
        .map_err(|_| LoadError::Orca("not visible ASCII".into()))
        .and_then(load::parse_orca);
    let interval = config.probe.interval.unwrap_or(rt.config.health.interval);
    report(health, health.signals.update(reading, load::ttl(interval)));
}

/// Removes the load report from an `orca` region's response before it reaches the client.
pub fn strip_orca(rt: &Snapshot, region: usize, headers: &mut http::HeaderMap) {
    let orca = rt
        .config
        .regions
        .get(region)
        .is_some_and(|c| c.load.source == crate::config::LoadSource::Orca);
    if orca {
        headers.remove(load::ORCA_HEADER);
    }
}

/// Asks an `orca` region's endpoint to attach its load report (vLLM and Triton do so only
/// when asked), unless the client already asked for a format.
pub fn ask_for_orca(rt: &Snapshot, region: usize, headers: &mut http::HeaderMap) {
    let orca = rt
        .config
        .regions
        .get(region)
        .is_some_and(|c| c.load.source == crate::config::LoadSource::Orca);
    if orca && !headers.contains_key(load::ORCA_FORMAT_HEADER) {
        headers.insert(load::ORCA_FORMAT_HEADER, HeaderValue::from_static("TEXT"));
    }
}
