//! Prometheus metrics: one registry, names prefixed `meridian_`, bounded label sets.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Buckets for time to first token: 10 ms up to a minute.
const FIRST_TOKEN_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Buckets for time per output token: 1 ms up to two seconds.
const PER_TOKEN_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0];
use crate::forward::client::{UpstreamError, UpstreamErrorKind};

/// Buckets for inference latencies: 5 ms up to two minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Every Prometheus metric Meridian exports, in one registry served at admin `/metrics`.
pub struct Metrics {
    registry: Registry,
    pub(crate) requests: IntCounterVec,
    pub(crate) request_duration: HistogramVec,
    pub(crate) upstream_ttfb: HistogramVec,
    pub(crate) upstream_first_token: HistogramVec,
    pub(crate) upstream_per_token: HistogramVec,
    pub(crate) output_tokens: IntCounterVec,
    pub(crate) failovers: IntCounterVec,
    pub(crate) residency_rejections: IntCounterVec,
    pub(crate) retries: IntCounter,
    pub(crate) endpoint_state: IntGaugeVec,
    pub(crate) region_available: IntGaugeVec,
    pub(crate) region_saturated: IntGaugeVec,
    pub(crate) region_drained: IntGaugeVec,
    /// `meridian_geoip_lookups_total` resolved per result once, so a request bumps a counter
    /// without hashing labels.
    pub(crate) geoip_results: GeoipResults,
    /// Build time of each GeoIP database in the chain, by `database` (path or `embedded`).
    pub(crate) geoip_database_build: IntGaugeVec,
    pub(crate) open_connections: IntGauge,
    pub(crate) config_reloads: IntCounterVec,
    pub(crate) config_last_reload_success: Gauge,
    pub(crate) tls_reloads: IntCounterVec,
    pub(crate) ejections: IntCounterVec,
    pub(crate) probe_duration: HistogramVec,
    pub(crate) spillovers: IntCounterVec,
    pub(crate) fallback_requests: IntCounterVec,
    pub(crate) endpoint_requests: IntCounterVec,
    pub(crate) endpoint_errors: IntCounterVec,
    pub(crate) endpoint_ttfb: HistogramVec,
    pub(crate) endpoint_in_flight: IntGaugeVec,
    pub(crate) endpoint_queue_depth: GaugeVec,
    pub(crate) endpoint_kv_cache: GaugeVec,
    pub(crate) request_bytes: IntCounterVec,
    pub(crate) response_bytes: IntCounterVec,
    pub(crate) fallback_breaker_state: IntGaugeVec,
    pub(crate) tls_certificate_expiry: GaugeVec,
    pub(crate) admission_requests: IntCounterVec,
    pub(crate) admission_backend_errors: IntCounterVec,
    pub(crate) admission_backend_duration: Histogram,
    pub(crate) admission_keys: IntGaugeVec,
    pub(crate) admission_evictions: IntCounterVec,
}

fn float_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    registry
        .register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    g
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
    histogram_with(registry, name, help, labels, LATENCY_BUCKETS)
}

fn histogram_with(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let h = HistogramVec::new(opts, labels).unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    registry
        .register(Box::new(h.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}")); // unwrap-ok: static definitions
    h
}

impl Metrics {
    /// Registers every metric (and sets `meridian_build_info`) in a new registry.
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
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: registered once per registry
        let geoip_results = GeoipResults {
            hit: geoip_lookups.with_label_values(&["hit"]),
            miss: geoip_lookups.with_label_values(&["miss"]),
            private: geoip_lookups.with_label_values(&["private"]),
        };
        // A Redis round trip is measured in microseconds to milliseconds.
        let admission_backend_duration = Histogram::with_opts(
            HistogramOpts::new(
                "meridian_admission_backend_duration_seconds",
                "Time of one admission check against the shared counter store.",
            )
            .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05]),
        )
        .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        r.register(Box::new(admission_backend_duration.clone()))
            .unwrap_or_else(|e| panic!("{e}")); // unwrap-ok: static definitions
        Metrics {
            admission_requests: counter(
                &r,
                "meridian_admission_requests_total",
                "Requests each admission rule counted, by result (admitted, limited).",
                &["rule", "result"],
            ),
            admission_backend_errors: counter(
                &r,
                "meridian_admission_backend_errors_total",
                "Admission checks the shared counter store did not answer, by kind.",
                &["kind"],
            ),
            admission_backend_duration,
            admission_keys: gauge(
                &r,
                "meridian_admission_keys_tracked",
                "Keys an admission rule holds counters for in this process.",
                &["rule"],
            ),
            admission_evictions: counter(
                &r,
                "meridian_admission_evictions_total",
                "Keys with live counters dropped to stay within limits.max_keys.",
                &["rule"],
            ),
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
            upstream_first_token: histogram_with(
                &r,
                "meridian_upstream_first_token_seconds",
                "Time from sending to an endpoint to the first token of its streamed answer.",
                &["region"],
                FIRST_TOKEN_BUCKETS,
            ),
            upstream_per_token: histogram_with(
                &r,
                "meridian_upstream_time_per_output_token_seconds",
                "Time per output token of answers that report tokens.",
                &["region"],
                PER_TOKEN_BUCKETS,
            ),
            output_tokens: counter(
                &r,
                "meridian_upstream_output_tokens_total",
                "Output tokens of answers, as reported by usage or counted from stream events.",
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
                "Requests refused to keep a residency zone's clients inside it, by kind: route_rule (403, a rule's design) or unavailable (503).",
                &["zone", "kind"],
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
            region_drained: gauge(
                &r,
                "meridian_region_drained",
                "1 while the region is drained, by source: the config (planned, fleet-wide) or this instance's admin API.",
                &["region", "source"],
            ),
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
            endpoint_requests: counter(
                &r,
                "meridian_endpoint_requests_total",
                "Attempts sent to each endpoint.",
                &["region", "endpoint"],
            ),
            endpoint_errors: counter(
                &r,
                "meridian_endpoint_errors_total",
                "Failed attempts per endpoint, by class.",
                &["region", "endpoint", "class"],
            ),
            endpoint_ttfb: histogram(
                &r,
                "meridian_endpoint_ttfb_seconds",
                "Time from sending to an endpoint to its response head, per endpoint.",
                &["region", "endpoint"],
            ),
            endpoint_in_flight: gauge(
                &r,
                "meridian_endpoint_in_flight",
                "Requests sent to the endpoint whose response has not ended.",
                &["region", "endpoint"],
            ),
            endpoint_queue_depth: float_gauge(
                &r,
                "meridian_endpoint_queue_depth",
                "Requests waiting in the model server's queue, as it last reported.",
                &["region", "endpoint"],
            ),
            endpoint_kv_cache: float_gauge(
                &r,
                "meridian_endpoint_kv_cache_usage_ratio",
                "The model server's KV-cache use (0 to 1), as it last reported.",
                &["region", "endpoint"],
            ),
            request_bytes: counter(
                &r,
                "meridian_request_bytes_total",
                "Request body bytes read from clients, by serving region.",
                &["region"],
            ),
            response_bytes: counter(
                &r,
                "meridian_response_bytes_total",
                "Response body bytes sent to clients, by serving region.",
                &["region"],
            ),
            fallback_breaker_state: gauge(
                &r,
                "meridian_fallback_breaker_state",
                "1 for the state the fallback's circuit breaker is in.",
                &["state"],
            ),
            tls_certificate_expiry: float_gauge(
                &r,
                "meridian_tls_certificate_expiry_timestamp_seconds",
                "Unix time the leaf certificate of each TLS listener certificate file expires.",
                &["certificate"],
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
    pub(crate) fn forget_region(&self, region: &str) {
        let _ = self.region_available.remove_label_values(&[region]);
        let _ = self.region_saturated.remove_label_values(&[region]);
        for source in ["config", "admin"] {
            let _ = self.region_drained.remove_label_values(&[region, source]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The `meridian_geoip_lookups_total` counters, one per result.
pub(crate) struct GeoipResults {
    pub hit: IntCounter,
    pub miss: IntCounter,
    pub private: IntCounter,
}

/// Per-region metric handles, resolved once per config load so requests skip label hashing.
#[derive(Clone)]
pub struct RegionMetrics {
    pub(crate) requests: [prometheus::IntCounter; 5],
    pub(crate) duration: Histogram,
    pub(crate) ttfb: Histogram,
    pub(crate) first_token: Histogram,
    pub(crate) per_token: Histogram,
    pub(crate) output_tokens: IntCounter,
    pub(crate) bytes_in: IntCounter,
    pub(crate) bytes_out: IntCounter,
}

impl RegionMetrics {
    /// The request counters and duration histogram of one region (the fallback is one too).
    pub fn new(m: &Metrics, region: &str) -> RegionMetrics {
        let class = |c: &str| m.requests.with_label_values(&[region, c]);
        RegionMetrics {
            requests: [class("1xx"), class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            duration: m.request_duration.with_label_values(&[region]),
            ttfb: m.upstream_ttfb.with_label_values(&[region]),
            first_token: m.upstream_first_token.with_label_values(&[region]),
            per_token: m.upstream_per_token.with_label_values(&[region]),
            output_tokens: m.output_tokens.with_label_values(&[region]),
            bytes_in: m.request_bytes.with_label_values(&[region]),
            bytes_out: m.response_bytes.with_label_values(&[region]),
        }
    }

    pub(crate) fn count(&self, status: u16) {
        let i = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[i].inc();
    }

    /// Records an answer's first-token and per-token latency and its output tokens.
    pub(crate) fn observe_answer(&self, l: &crate::forward::usage::Latency) {
        if let Some(t) = l.first_token {
            self.first_token.observe(t.as_secs_f64());
        }
        if let Some(t) = l.per_token {
            self.per_token.observe(t.as_secs_f64());
        }
        if let Some(n) = l.output_tokens {
            self.output_tokens.inc_by(n);
        }
    }
}

/// Per-endpoint handles, resolved once per config load. The `endpoint` label is the
/// endpoint's URL as configured, the same value as `meridian_endpoint_state` and the access
/// log carry: bounded by the config.
#[derive(Clone)]
pub struct EndpointMetrics {
    pub(crate) requests: IntCounter,
    pub(crate) ttfb: Histogram,
    /// One per [`ErrorClass`], in its order.
    errors: [IntCounter; ErrorClass::ALL.len()],
}

/// Why an attempt at an endpoint failed, as `meridian_endpoint_errors_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorClass {
    /// Refused, unreachable or not connected in time: nothing was sent.
    ConnectFailure,
    /// Connected, then closed before a response head.
    Reset,
    /// No response head within `request_timeout`.
    Timeout,
    /// Garbage instead of a response head.
    Protocol,
    /// The endpoint answered 5xx.
    Status5xx,
}

impl ErrorClass {
    pub(crate) const ALL: [ErrorClass; 5] = [
        ErrorClass::ConnectFailure,
        ErrorClass::Reset,
        ErrorClass::Timeout,
        ErrorClass::Protocol,
        ErrorClass::Status5xx,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorClass::ConnectFailure => "connect_failure",
            ErrorClass::Reset => "reset",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Protocol => "protocol",
            ErrorClass::Status5xx => "status_5xx",
        }
    }

    /// The class of a failed attempt; `None` for the client's own body failing, which says
    /// nothing about the endpoint.
    pub(crate) fn of(e: &UpstreamError) -> Option<ErrorClass> {
        match e.kind() {
            UpstreamErrorKind::ConnectRefused | UpstreamErrorKind::ConnectTimeout | UpstreamErrorKind::Tls => {
                Some(ErrorClass::ConnectFailure)
            }
            UpstreamErrorKind::ResetBeforeHead => Some(ErrorClass::Reset),
            UpstreamErrorKind::HeadTimeout => Some(ErrorClass::Timeout),
            UpstreamErrorKind::Protocol => Some(ErrorClass::Protocol),
            UpstreamErrorKind::BreakerOpen
            | UpstreamErrorKind::NoFallback
            | UpstreamErrorKind::ClientBody
            | UpstreamErrorKind::ClientStalled => None,
        }
    }
}

impl EndpointMetrics {
    /// The per-endpoint request, first-byte time and error series of `endpoint` in `region`.
    pub fn new(m: &Metrics, region: &str, endpoint: &str) -> EndpointMetrics {
        EndpointMetrics {
            requests: m.endpoint_requests.with_label_values(&[region, endpoint]),
            ttfb: m.endpoint_ttfb.with_label_values(&[region, endpoint]),
            errors: ErrorClass::ALL.map(|c| m.endpoint_errors.with_label_values(&[region, endpoint, c.as_str()])),
        }
    }

    /// Counts one attempt: the response head's status and time, or the failure.
    pub fn attempt(&self, outcome: Result<(u16, std::time::Duration), &UpstreamError>) {
        self.requests.inc();
        let class = match outcome {
            Ok((status, ttfb)) => {
                self.ttfb.observe(ttfb.as_secs_f64());
                (status >= 500).then_some(ErrorClass::Status5xx)
            }
            Err(e) => ErrorClass::of(e),
        };
        if let Some(c) = class {
            self.errors[c as usize].inc();
        }
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
    fn endpoint_attempts_are_counted_by_class() {
        let m = Metrics::new();
        let e = EndpointMetrics::new(&m, "eu", "http://10.0.0.1:8000");
        let ms = std::time::Duration::from_millis(20);
        e.attempt(Ok((200, ms)));
        e.attempt(Ok((503, ms)));
        e.attempt(Err(&UpstreamError::bare(UpstreamErrorKind::ConnectRefused)));
        e.attempt(Err(&UpstreamError::bare(UpstreamErrorKind::HeadTimeout)));
        e.attempt(Err(&UpstreamError::bare(UpstreamErrorKind::ClientBody)));
        let page = m.render();
        let has = |line: &str| page.lines().any(|l| l == line);
        assert!(has(
            r#"meridian_endpoint_requests_total{endpoint="http://10.0.0.1:8000",region="eu"} 5"#
        ));
        for (class, n) in [
            ("status_5xx", 1),
            ("connect_failure", 1),
            ("timeout", 1),
            ("reset", 0),
            ("protocol", 0),
        ] {
            let line = format!(
                r#"meridian_endpoint_errors_total{{class="{class}",endpoint="http://10.0.0.1:8000",region="eu"}} {n}"#
            );
            assert!(has(&line), "{line}");
        }
        assert!(has(
            r#"meridian_endpoint_ttfb_seconds_count{endpoint="http://10.0.0.1:8000",region="eu"} 2"#
        ));
    }

    #[test]
    fn error_classes_index_their_counters() {
        for (i, c) in ErrorClass::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }

    #[test]
    fn build_info_is_always_there() {
        let m = Metrics::new();
        let want = format!("meridian_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert_eq!(lines(&m, "meridian_build_info{"), vec![want]);
    }
}
