//! Prometheus metrics: one registry, names prefixed `meridian_`, bounded label sets.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets for inference latencies: 5 ms up to two minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_ttfb: HistogramVec,
    pub failovers: IntCounterVec,
    pub residency_rejections: IntCounterVec,
    pub retries: IntCounter,
    pub endpoint_state: IntGaugeVec,
    pub region_available: IntGaugeVec,
    pub region_saturated: IntGaugeVec,
    pub geoip_lookups: IntCounterVec,
    /// `geoip_lookups` resolved per result once, so a request bumps a counter without hashing labels.
    pub geoip_results: GeoipResults,
    /// Build time of each GeoIP database in the chain, by `database` (path or `embedded`).
    pub geoip_database_build: IntGaugeVec,
    pub open_connections: IntGauge,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: Gauge,
    pub tls_reloads: IntCounterVec,
    pub ejections: IntCounterVec,
    pub probe_duration: HistogramVec,
    pub spillovers: IntCounterVec,
    pub fallback_requests: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    registry
        .register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    let h = HistogramVec::new(opts, labels).unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    registry
        .register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let build_info = gauge(&r, "meridian_build_info", "Build information; always 1.", &["version"]);
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let open_connections = IntGauge::new("meridian_open_connections", "Client connections currently open.")
            .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        r.register(Box::new(open_connections.clone()))
            .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        let config_last_reload_success = Gauge::new(
            "meridian_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        r.register(Box::new(config_last_reload_success.clone()))
            .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        let retries = IntCounter::new("meridian_retries_total", "Attempts made after a first one failed.")
            .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        r.register(Box::new(retries.clone())).unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        let geoip_lookups = counter(
            &r,
            "meridian_geoip_lookups_total",
            "GeoIP lookups by result.",
            &["result"],
        );
        let geoip_results = GeoipResults {
            hit: geoip_lookups.with_label_values(&["hit"]),
            miss: geoip_lookups.with_label_values(&["miss"]),
            private: geoip_lookups.with_label_values(&["private"]),
        };
        Metrics {
            requests: counter(
                &r,
                "meridian_requests_total",
                "Requests answered, by serving region and status class.",
                &["region", "status_class"],
            ),
            request_duration: histogram(
                &r,
                "meridian_request_duration_seconds",
                "Time from request to the end of the response body.",
                &["region"],
            ),
            upstream_ttfb: histogram(
                &r,
                "meridian_upstream_ttfb_seconds",
                "Time from sending to an endpoint to its response head.",
                &["region"],
            ),
            failovers: counter(
                &r,
                "meridian_failovers_total",
                "Requests served by another region than the client's first choice.",
                &["from_region", "to_region", "reason"],
            ),
            residency_rejections: counter(
                &r,
                "meridian_residency_rejections_total",
                "Requests refused to keep a residency zone's clients inside it.",
                &["zone"],
            ),
            retries,
            endpoint_state: gauge(
                &r,
                "meridian_endpoint_state",
                "1 for the state each endpoint is in.",
                &["region", "endpoint", "state"],
            ),
            region_available: gauge(
                &r,
                "meridian_region_available",
                "1 when the region has an available endpoint and is not drained.",
                &["region"],
            ),
            region_saturated: gauge(
                &r,
                "meridian_region_saturated",
                "1 when every endpoint of the region is past a spillover threshold.",
                &["region"],
            ),
            geoip_lookups,
            geoip_results,
            geoip_database_build: gauge(
                &r,
                "meridian_geoip_database_build_timestamp_seconds",
                "Unix time each GeoIP database in force was built (its metadata), by database.",
                &["database"],
            ),
            open_connections,
            config_reloads: counter(
                &r,
                "meridian_config_reloads_total",
                "Config loads and reloads by result.",
                &["result"],
            ),
            config_last_reload_success,
            tls_reloads: counter(
                &r,
                "meridian_tls_reloads_total",
                "TLS certificate set reloads by result.",
                &["result"],
            ),
            ejections: counter(
                &r,
                "meridian_endpoint_ejections_total",
                "Endpoints taken out of rotation, by reason.",
                &["region", "reason"],
            ),
            probe_duration: histogram(
                &r,
                "meridian_probe_duration_seconds",
                "Active health probe latency.",
                &["region"],
            ),
            spillovers: counter(
                &r,
                "meridian_spillovers_total",
                "Requests sent past a saturated region.",
                &["from_region", "to_region"],
            ),
            fallback_requests: counter(
                &r,
                "meridian_fallback_requests_total",
                "Requests sent to the hosted fallback, by result.",
                &["result"],
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding to a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Drops the availability series of a region that left the config. Its request counters
    /// stay: counters must not go backwards within a process.
    pub fn forget_region(&self, region: &str) {
        let _ = self.region_available.remove_label_values(&[region]);
        let _ = self.region_saturated.remove_label_values(&[region]);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `meridian_geoip_lookups_total` counters, one per result.
pub struct GeoipResults {
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub private: IntCounter,
}

/// Per-region metric handles, resolved once per config load so requests skip label hashing.
#[derive(Clone)]
pub struct RegionMetrics {
    pub requests: [prometheus::IntCounter; 5],
    pub duration: Histogram,
    pub ttfb: Histogram,
}

impl RegionMetrics {
    pub fn new(m: &Metrics, region: &str) -> RegionMetrics {
        let class = |c: &str| m.requests.with_label_values(&[region, c]);
        RegionMetrics {
            requests: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            duration: m.request_duration.with_label_values(&[region]),
            ttfb: m.upstream_ttfb.with_label_values(&[region]),
        }
    }

    pub fn count(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[i].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(m: &Metrics, name: &str) -> Vec<String> {
        m.render()
            .lines()
            .filter(|l| l.starts_with(name))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn forgetting_a_region_drops_its_gauges_but_not_its_counters() {
        let m = Metrics::new();
        let r = RegionMetrics::new(&m, "eu");
        r.count(200);
        r.count(503);
        r.count(99);
        m.region_available.with_label_values(&["eu"]).set(1);
        m.forget_region("eu");
        assert!(lines(&m, "meridian_region_available{").is_empty());
        let requests = lines(&m, "meridian_requests_total{");
        assert!(requests.contains(&r#"meridian_requests_total{region="eu",status_class="2xx"} 1"#.to_string()));
        assert!(requests.contains(&r#"meridian_requests_total{region="eu",status_class="5xx"} 1"#.to_string()));
        // Out-of-range statuses land in the nearest class rather than a new label value.
        assert!(requests.contains(&r#"meridian_requests_total{region="eu",status_class="1xx"} 1"#.to_string()));
    }

    #[test]
    fn build_info_is_always_there() {
        let m = Metrics::new();
        let want = format!("meridian_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert_eq!(lines(&m, "meridian_build_info{"), vec![want]);
    }
}
