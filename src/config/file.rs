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
pub struct FileConfig {
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
    /// Connections kept and opened per endpoint.
    pub upstream: Option<super::upstream::UpstreamFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: Option<Spanned<String>>,
    pub tls_listen: Option<Spanned<String>>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateFile>,
    pub proxy_protocol: Option<bool>,
    pub request_timeout: Option<Duration>,
    pub stall_timeout: Option<Duration>,
    pub connect_timeout: Option<Duration>,
    pub max_request_body: Option<Size>,
    pub max_header_bytes: Option<Size>,
    pub max_headers: Option<usize>,
    pub max_uri_bytes: Option<Size>,
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFile {
    pub names: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Option<Spanned<String>>,
    pub token_env: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeoipFile {
    pub database: Option<PathBuf>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
    pub default_region: Option<Spanned<String>>,
    pub unknown: Option<UnknownPolicy>,
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
pub struct HealthFile {
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
    pub degraded_below: Option<f64>,
    /// Serve from unhealthy endpoints (inside the residency fence) when no candidate is healthy.
    pub panic_mode: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    /// 0 turns error counting off.
    pub consecutive_errors: Option<u32>,
    pub ttfb_threshold: Option<Duration>,
    pub ejection_time: Option<Duration>,
    pub max_ejection_time: Option<Duration>,
    pub max_retry_after: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    pub max_attempts: Option<u32>,
    /// Retries allowed as a fraction of requests over the budget window.
    pub budget_ratio: Option<f64>,
    /// Retries per second always allowed, whatever the ratio says.
    pub budget_min_per_second: Option<u32>,
    /// Paths whose requests may be sent again after they may have reached an endpoint.
    pub replay_paths: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    pub format: Option<LogFormat>,
    pub access_log: Option<bool>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    #[default]
    Auto,
    Text,
    Json,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionFile {
    pub name: Spanned<String>,
    pub location: Spanned<Vec<f64>>,
    #[serde(default)]
    pub countries: Vec<Spanned<String>>,
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
}

/// Per-region probe overrides, for fleets whose model servers expose health differently.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionHealthFile {
    pub path: Option<String>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum EndpointFile {
    Url(String),
    Detailed(DetailedEndpoint),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetailedEndpoint {
    pub url: String,
    pub weight: Option<u32>,
    /// Overrides the region's `protocol` for this endpoint.
    pub protocol: Option<UpstreamProtocol>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadFile {
    pub source: LoadSource,
    pub path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadSource {
    Vllm,
    Tgi,
    Sglang,
    Orca,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinityFile {
    pub header: Option<String>,
    /// A top-level JSON body field (e.g. `user`), read only from bodies kept for replay.
    pub body_field: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidencyFile {
    pub name: Spanned<String>,
    pub countries: Vec<Spanned<String>>,
    pub regions: Vec<Spanned<String>>,
    pub failover: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub path_prefix: Spanned<String>,
    pub regions: Vec<Spanned<String>>,
    #[serde(default)]
    pub residency_exempt: bool,
    /// Optional extra match: only these methods.
    pub methods: Option<Vec<String>>,
    /// Optional extra match: header name → exact value.
    pub headers: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackFile {
    pub endpoint: Spanned<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    pub zone: Option<Spanned<String>>,
    pub ca_file: Option<PathBuf>,
    /// Path prefix mapping applied to requests sent to the fallback: `{ "/v1" = "/openai/v1" }`.
    #[serde(default)]
    pub path_rewrite: BTreeMap<String, String>,
    /// Circuit breaker: `{ failures = 5, cool_down = "30s" }`.
    pub breaker: Option<BreakerFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerFile {
    /// Consecutive failed attempts that open the breaker.
    pub failures: Option<u32>,
    /// How long an open breaker sheds fallback traffic before one trial request.
    pub cool_down: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpilloverFile {
    pub queue_depth: Option<f64>,
    pub kv_cache: Option<f64>,
}

/// TLS towards `https://` region endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsFile {
    /// Extra trusted roots (PEM), beside the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) presented to endpoints that ask for one (mTLS).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}
