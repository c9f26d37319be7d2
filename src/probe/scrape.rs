//! Scraping load signals: a model server's Prometheus page, read right after each passed
//! health probe with the probe's timeout (ORCA headers on responses are read by the request
//! path, `runtime::orca`). A missing or broken page degrades the endpoint's signals to
//! `none` with one warning; clients never see it.

use std::sync::Arc;

use http_body_util::{BodyExt, Limited};

use crate::forward::endpoint_get::endpoint_get;
use crate::health::EndpointHealth;
use crate::health::load::{self, LoadError, LoadReport};
use crate::runtime::Snapshot;

/// Metrics pages past this size are not read: vLLM's, histograms included, is far smaller.
const MAX_PAGE: usize = 4 * 1024 * 1024;

/// Scrapes `health`'s metrics page if its region reads one, and records the reading.
pub(super) async fn scrape(rt: &Snapshot, health: &Arc<EndpointHealth>) {
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
    health.update_signals(reading, load::ttl(interval));
}
