//! The config file as written: a strict serde mirror of the TOML (unknown keys are errors).
//!
//! Values that validation judges carry their span so errors can name the line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::units::{Duration, Size};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    #[serde(default)]
    pub server: ServerFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub geoip: GeoipFile,
    #[serde(default)]
    pub health: HealthFile,
    #[serde(default)]
    pub outlier: OutlierFile,
    #[serde(default)]
    pub retry: RetryFile,
    #[serde(default)]
    pub log: LogFile,
    #[serde(default, rename = "region")]
    pub regions: Vec<RegionFile>,
    #[serde(default, rename = "residency")]
    pub residency: Vec<ResidencyFile>,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteFile>,
    pub fallback: Option<FallbackFile>,
    pub spillover: Option<SpilloverFile>,
    pub upstream_tls: Option<UpstreamTlsFile>,
    pub tracing: Option<TracingFile>,
    /// Admission control rules (`[[limit]]`).
    #[serde(default, rename = "limit")]
    pub limit_rules: Vec<LimitFile>,
    /// Where admission counters live (`[limits]`).
    pub limits: Option<LimitsFile>,
    /// Connections kept and opened per endpoint.
    pub upstream: Option<super::upstream::UpstreamFile>,
}

/// `[tracing]`: OTLP/HTTP export of request spans.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TracingFile {
    pub(crate) otlp_endpoint: Option<Spanned<String>>,
    pub(crate) service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerFile {
    pub listen: Option<Spanned<String>>,
    pub tls_listen: Option<Spanned<String>>,
    pub(crate) tls_cert: Option<PathBuf>,
    pub(crate) tls_key: Option<PathBuf>,
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateFile>,
    pub proxy_protocol: Option<bool>,
    pub request_timeout: Option<Duration>,
    pub stall_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub max_request_body: Option<Size>,
    /// The part of an `application/json` answer read for its `usage` token counts.
    pub(crate) max_buffered_answer: Option<Size>,
    pub max_header_bytes: Option<Size>,
    pub(crate) max_headers: Option<usize>,
    pub(crate) max_uri_bytes: Option<Size>,
    pub header_read_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// Longest wait between two reads of a request body.
    pub body_timeout: Option<Duration>,
    /// Longest wait for a client to take response bytes.
    pub send_timeout: Option<Duration>,
    pub max_connections: Option<usize>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub shutdown_timeout: Option<Duration>,
    pub worker_threads: Option<usize>,
    /// After SIGTERM: keep serving this long, `/readyz` 503, so load balancers follow.
    pub shutdown_delay: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CertificateFile {
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminFile {
    pub listen: Option<Spanned<String>>,
    pub token_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GeoipFile {
    /// One file or a list, looked up in order.
    pub database: Option<Spanned<GeoipDatabases>>,
    /// `false`: no embedded country database after the listed ones.
    pub embedded_fallback: Option<bool>,
    /// Coordinates less precise than this fall back to the country's point.
    pub max_accuracy_radius_km: Option<u32>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub default_region: Option<Spanned<String>>,
    pub unknown: Option<UnknownPolicy>,
}

/// `geoip.database`: `"city.mmdb"` or `["city-ipv4.mmdb", "city-ipv6.mmdb"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum GeoipDatabases {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

/// What to do with a client whose location cannot be found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPolicy {
    /// Serve it from `default_region`.
    #[default]
    Default,
    /// Answer 403 `location_refused`.
    Refuse,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthFile {
    /// `false` turns active probes off: ejections then end with their hold-down alone.
    pub enabled: Option<bool>,
    pub path: Option<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub unhealthy_after: Option<u32>,
    pub healthy_after: Option<u32>,
    pub slow_start: Option<Duration>,
    /// Fraction of `interval` by which each probe is randomly delayed or advanced.
    pub jitter: Option<f64>,
    /// A region with fewer than this fraction of its endpoints available is reported degraded.
    pub(crate) degraded_below: Option<f64>,
    /// Serve from unhealthy endpoints (inside the residency fence) when no candidate is healthy.
    pub panic_mode: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutlierFile {
    /// 0 turns error counting off.
    pub consecutive_errors: Option<u32>,
    /// The first-token threshold: TTFT of streamed answers, head time of plain ones.
    #[serde(alias = "first_token_threshold")]
    pub ttfb_threshold: Option<Duration>,
    /// Time per output token of answers that report tokens.
    pub tpot_threshold: Option<Duration>,
    pub ejection_time: Option<Duration>,
    pub max_ejection_time: Option<Duration>,
    pub max_retry_after: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryFile {
    pub max_attempts: Option<u32>,
    /// Retries allowed as a fraction of requests over the budget window.
    pub(crate) budget_ratio: Option<f64>,
    /// Retries per second always allowed, whatever the ratio says.
    pub(crate) budget_min_per_second: Option<u32>,
    /// Paths whose requests may be sent again after they may have reached an endpoint.
    pub(crate) replay_paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogFile {
    pub format: Option<LogFormat>,
    pub(crate) access_log: Option<bool>,
}

/// `log.format`: how log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    /// Human-readable lines, always.
    Text,
    /// One JSON object per line, always.
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegionFile {
    pub name: Spanned<String>,
    pub location: Spanned<Vec<f64>>,
    #[serde(default)]
    pub countries: Vec<Spanned<String>>,
    /// ISO 3166-2 codes (`US-CA`) whose clients are home clients of this region.
    #[serde(default)]
    pub subdivisions: Vec<Spanned<String>>,
    pub endpoints: Spanned<Vec<Spanned<EndpointFile>>>,
    #[serde(default)]
    pub priority: u32,
    pub failover: Option<bool>,
    pub load: Option<LoadFile>,
    pub affinity: Option<AffinityFile>,
    /// "http1" (default) or "http2" (prior knowledge on cleartext, ALPN on TLS).
    pub protocol: Option<UpstreamProtocol>,
    /// Probe settings for this region's endpoints, over `[health]`.
    pub health: Option<RegionHealthFile>,
    /// A fleet-wide drain: every instance that loads this config drains the region.
    pub drain: Option<DrainFile>,
    /// The models this region serves; absent: every model.
    pub models: Option<Vec<Spanned<String>>>,
    /// Also read `GET /v1/models` from each endpoint with the probes.
    pub discover_models: Option<bool>,
}

/// `drain = { reason = "maintenance", until = "2026-12-01T14:00:00Z" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DrainFile {
    pub reason: Spanned<String>,
    /// RFC 3339, as a string or a TOML date-time; absent: until the line is removed.
    pub until: Option<Spanned<toml::Value>>,
}

/// Per-region probe overrides, for fleets whose model servers expose health differently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegionHealthFile {
    pub path: Option<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum EndpointFile {
    Url(String),
    Detailed(DetailedEndpoint),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DetailedEndpoint {
    pub url: String,
    pub(crate) weight: Option<u32>,
    /// Overrides the region's `protocol` for this endpoint.
    pub protocol: Option<UpstreamProtocol>,
}

/// `protocol`: how Meridian talks to a region's endpoints (probes follow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http1,
    /// HTTP/2: prior knowledge on `http://`, ALPN `h2` on `https://`.
    Http2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadFile {
    pub source: LoadSource,
    pub path: Option<String>,
}

/// `load.source`: where a region's endpoints publish their load (queue depth, running
/// requests, KV-cache use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadSource {
    /// vLLM's metrics page (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, ...),
    /// scraped after each passed probe.
    Vllm,
    /// Text Generation Inference's metrics page (`tgi_queue_size`, `tgi_batch_current_size`).
    Tgi,
    /// SGLang's metrics page (`sglang:num_queue_reqs`, `sglang:token_usage`, ...).
    Sglang,
    /// ORCA load reports read from each response's `endpoint-load-metrics` header.
    Orca,
    /// No load signal (the default): endpoints are scored on latency and in-flight requests.
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AffinityFile {
    pub header: Option<String>,
    /// A top-level JSON body field (e.g. `user`), read only from bodies kept for replay.
    pub body_field: Option<String>,
    /// Prefix-cache affinity: hash this many bytes of the prompt.
    pub prefix_bytes: Option<usize>,
    /// Prefix affinity skips an endpoint above this multiple of the region's mean in-flight.
    pub max_load_factor: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResidencyFile {
    pub name: Spanned<String>,
    pub countries: Vec<Spanned<String>>,
    pub regions: Vec<Spanned<String>>,
    pub failover: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteFile {
    pub path_prefix: Spanned<String>,
    pub regions: Vec<Spanned<String>>,
    #[serde(default)]
    pub residency_exempt: bool,
    /// Optional extra match: only these methods.
    pub methods: Option<Vec<String>>,
    /// Optional extra match: header name → exact value.
    pub headers: Option<BTreeMap<String, String>>,
    /// POSTs under this prefix name their model in the JSON body's `model` field.
    #[serde(default)]
    pub(crate) model_from_body: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FallbackFile {
    pub endpoint: Spanned<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    pub zone: Option<Spanned<String>>,
    pub ca_file: Option<PathBuf>,
    /// Path prefix mapping applied to requests sent to the fallback: `{ "/v1" = "/openai/v1" }`.
    #[serde(default)]
    pub(crate) path_rewrite: BTreeMap<String, String>,
    /// Circuit breaker: `{ failures = 5, cool_down = "30s" }`.
    pub breaker: Option<BreakerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakerFile {
    /// Consecutive failed attempts that open the breaker.
    pub failures: Option<u32>,
    /// How long an open breaker sheds fallback traffic before one trial request.
    pub cool_down: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpilloverFile {
    pub queue_depth: Option<f64>,
    pub kv_cache: Option<f64>,
}

/// TLS towards `https://` region endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamTlsFile {
    /// Extra trusted roots (PEM), beside the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) presented to endpoints that ask for one (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

/// One `[[limit]]` rule: whose requests it counts and how many it admits.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitFile {
    /// Shown in metrics, logs and 429 answers; `limit[N]` when absent.
    pub name: Option<String>,
    /// `"client_ip"` or `"header:NAME"`.
    pub key: Spanned<String>,
    #[serde(rename = "match")]
    pub matches: Option<LimitMatchFile>,
    pub(crate) requests_per_second: Option<f64>,
    pub burst: Option<u32>,
    pub concurrent: Option<u32>,
    pub(crate) tokens_per_minute: Option<u64>,
    pub(crate) on_backend_error: Option<BackendErrorPolicy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitMatchFile {
    pub path_prefix: Option<String>,
    pub model: Option<String>,
}

/// What a rule does when the shared counter store cannot answer in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendErrorPolicy {
    /// Fail open: admit without counting.
    #[default]
    Allow,
    /// Fail closed: answer 429.
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsFile {
    pub backend: Option<LimitsBackendFile>,
    /// Keys tracked per rule in local mode before the least recently seen is evicted.
    pub max_keys: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsBackendFile {
    pub redis: Spanned<String>,
    pub timeout: Option<Duration>,
}
