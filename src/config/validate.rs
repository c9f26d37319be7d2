//! From the file mirror to a typed [`Config`]; every problem is reported with its key path
//! and line, all at once rather than one per run.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Method, Uri};
use ipnet::IpNet;
use toml::Spanned;

use super::file::{self, EndpointFile, FileConfig, LoadSource, LogFormat, UnknownPolicy, UpstreamProtocol};
use crate::geo::{Country, GeoPoint, Subdivision};

/// Default `server.max_buffered_answer`: the part of an `application/json` answer read for
/// its `usage`.
pub(crate) const DEFAULT_MAX_BUFFERED_ANSWER: usize = 256 * 1024;

/// The validated configuration. Indexes (`usize`) point into `regions` / `zones`.
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) source: Option<PathBuf>,
    /// `[server]`: client-facing listeners, timeouts and request limits.
    pub server: ServerConfig,
    /// `[admin]`: the admin API listener and its bearer token.
    pub admin: AdminConfig,
    /// `[geoip]`: how clients are located (databases, trusted proxies, unlocated clients).
    pub geoip: GeoipConfig,
    /// `[health]`: active probes and the recovery ramp.
    pub health: HealthConfig,
    /// `[outlier]`: passive ejection thresholds applied to real traffic.
    pub outlier: OutlierConfig,
    /// `[retry]`: attempts per request, the retry budget and the replayable paths.
    pub retry: RetryConfig,
    /// `[log]`: log format and whether the access log is on.
    pub log: LogConfig,
    /// `[[region]]` tables in file order; a region's index here is its id everywhere else.
    pub regions: Vec<RegionConfig>,
    /// `[[residency]]` zones in file order; a zone's index here is its id everywhere else.
    pub zones: Vec<ZoneConfig>,
    /// `[[route]]` rules, tried in file order before the geographic decision.
    pub routes: Vec<RouteConfig>,
    /// `[fallback]`: the hosted API used when no region may serve; `None` when absent.
    pub fallback: Option<FallbackConfig>,
    pub(crate) spillover: Option<SpilloverConfig>,
    pub(crate) upstream_tls: UpstreamTlsConfig,
    /// `[tracing]` with an `otlp_endpoint`; `None`: tracing off.
    pub tracing: Option<TracingConfig>,
    /// `[[limit]]` rules, in file order.
    pub limit_rules: Vec<super::LimitRule>,
    /// `[limits]`: where admission counters live (in process or Redis) and how many keys.
    pub limits: super::LimitsConfig,
    pub(crate) upstream: super::upstream::UpstreamConfig,
}

/// Where and how request spans are exported (OTLP/HTTP, protobuf).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// The collector; spans are posted to its `/v1/traces`.
    pub endpoint: EndpointConfig,
    pub(crate) service_name: String,
    /// Share of new traces sampled; a client's `traceparent` decides for its own traces.
    pub sample_ratio: f64,
}

/// `[server]`: the client-facing listeners and the limits that protect them.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `server.listen`: the cleartext listener, HTTP/1.1 and h2c (default `0.0.0.0:8080`).
    pub listen: SocketAddr,
    /// `server.tls_listen` with its certificates; `None` when no HTTPS listener is configured.
    pub tls: Option<TlsConfig>,
    pub(crate) proxy_protocol: bool,
    pub(crate) request_timeout: Duration,
    pub(crate) stall_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_request_body: u64,
    pub(crate) max_buffered_answer: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) max_uri_bytes: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) body_timeout: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) max_connections: usize,
    pub(crate) http2_max_concurrent_streams: u32,
    /// `server.shutdown_timeout`: how long `SIGTERM` waits for in-flight requests, after the
    /// delay (default 30s).
    pub shutdown_timeout: Duration,
    /// `server.worker_threads`: runtime threads; `None`: one per core.
    pub worker_threads: Option<usize>,
    /// After SIGTERM, how long listeners keep serving while `/readyz` answers 503.
    pub shutdown_delay: Duration,
}

/// The HTTPS listener: `server.tls_listen`, `tls_cert`, `tls_key` and the SNI certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// `server.tls_listen`: the address of the HTTPS listener (ALPN `h2` and `http/1.1`).
    pub listen: SocketAddr,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) sni: Vec<SniCertificate>,
}

/// TLS towards `https://` region endpoints: extra roots and an optional client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsConfig {
    pub(crate) ca_file: Option<PathBuf>,
    /// Certificate chain and key presented to endpoints (mTLS).
    pub(crate) client_auth: Option<(PathBuf, PathBuf)>,
}

/// One `[[server.certificate]]`: a certificate served to clients that ask for one of `names`
/// by SNI.
#[derive(Debug, Clone, PartialEq)]
pub struct SniCertificate {
    pub(crate) names: Vec<String>,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// `[admin]`: where the admin API listens and who may call its mutating endpoints.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// `admin.listen`: the admin API's address (default `127.0.0.1:9901`).
    pub listen: SocketAddr,
    /// The bearer token read from `token_env` at load; `None` disables mutating calls.
    pub token: Option<String>,
    /// `admin.token_env`: the environment variable that `token` was read from.
    pub token_env: Option<String>,
}

/// `[geoip]`: the databases that locate clients and whose forwarded addresses are believed.
#[derive(Debug, Clone)]
pub struct GeoipConfig {
    /// `geoip.database`, in lookup order (resolved against the config's directory).
    pub databases: Vec<PathBuf>,
    /// The embedded country database answers after the listed ones.
    pub embedded_fallback: bool,
    pub(crate) max_accuracy_radius_km: u32,
    /// `geoip.trusted_proxies`: peers whose `X-Forwarded-For` is believed (default loopback).
    pub trusted_proxies: Vec<IpNet>,
    pub(crate) default_region: usize,
    pub(crate) unknown: UnknownPolicy,
}

impl GeoipConfig {
    /// The database chain to open.
    pub fn chain(&self) -> crate::geo::Chain<'_> {
        crate::geo::Chain {
            databases: &self.databases,
            embedded_fallback: self.embedded_fallback,
            max_accuracy_radius_km: self.max_accuracy_radius_km,
        }
    }
}

/// `[health]`: active probes of every endpoint and the recovery ramp.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// `health.enabled`: `false` turns active probes off; ejections then end with their
    /// hold-down alone (default `true`).
    pub enabled: bool,
    /// `health.path`: probed with `GET` after the endpoint's base path (default `/health`).
    pub path: String,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    /// `health.unhealthy_after`: failed probes in a row that eject an endpoint (default 3).
    pub unhealthy_after: u32,
    /// `health.healthy_after`: passed probes in a row before an ejected endpoint returns
    /// (default 2).
    pub healthy_after: u32,
    /// `health.slow_start`: ramp for a returning region and probation for a returning endpoint;
    /// zero turns it off (default 10s).
    pub slow_start: Duration,
    pub(crate) jitter: f64,
    pub(crate) degraded_below: f64,
    /// `health.panic_mode`: serve from ejected endpoints when no candidate has one in rotation,
    /// inside the client's zone only (default `false`).
    pub panic_mode: bool,
}

/// `[outlier]`: passive outlier detection on real traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    /// `outlier.consecutive_errors`: failures in a row that eject an endpoint; `0` turns error
    /// counting off (default 5).
    pub consecutive_errors: u32,
    /// The first-token threshold (key `ttfb_threshold`, alias `first_token_threshold`).
    pub ttfb_threshold: Duration,
    /// `outlier.tpot_threshold`: average time per output token above which an endpoint is
    /// ejected (default 250ms).
    pub tpot_threshold: Duration,
    /// `outlier.ejection_time`: shortest ejection by real traffic; doubles with each repeat
    /// (default 30s).
    pub ejection_time: Duration,
    /// `outlier.max_ejection_time`: cap of the doubling (default 5m, or `ejection_time` when
    /// longer).
    pub max_ejection_time: Duration,
    /// `outlier.max_retry_after`: cap of a `Retry-After` honoured from an endpoint's 429 or 503
    /// (default 60s).
    pub max_retry_after: Duration,
}

/// Inference requests: replaying one elsewhere costs compute but creates nothing twice.
pub(crate) const DEFAULT_REPLAY_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// `[retry]`: how often and which requests are sent again after a failed attempt.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// `retry.max_attempts`: attempts per request, the first included (default 3).
    pub max_attempts: u32,
    pub(crate) budget_ratio: f64,
    pub(crate) budget_min_per_second: u32,
    /// Whole-segment path prefixes, stored without a trailing slash.
    pub(crate) replay_paths: Vec<String>,
}

/// `[log]`: the log output.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `log.format`: text, JSON lines, or auto (text on a terminal); needs a restart to change.
    pub format: LogFormat,
    pub(crate) access_log: bool,
}

/// One `[[region]]`: a place that serves inference, with its endpoints and home clients.
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// `name`: unique region name, used in routing, metrics, logs and the admin API.
    pub name: String,
    pub(crate) location: GeoPoint,
    /// `countries`: ISO 3166-1 countries whose clients this region is home to.
    pub countries: Vec<Country>,
    /// ISO 3166-2 subdivisions whose clients are home clients here (over their country's).
    pub subdivisions: Vec<Subdivision>,
    pub(crate) endpoints: Vec<EndpointConfig>,
    pub(crate) priority: u32,
    pub(crate) failover: bool,
    pub(crate) load: LoadConfig,
    pub(crate) affinity_header: Option<HeaderName>,
    /// Top-level JSON body field that names the session when the header is absent.
    pub(crate) affinity_body_field: Option<String>,
    /// Probe settings over `[health]` for this region's endpoints.
    pub probe: ProbeOverride,
    /// `drain = { ... }`: drained by the config, for every instance that loads it.
    pub drain: Option<ConfigDrain>,
    /// The models this region serves; `None`: every model (or what discovery finds).
    pub models: Option<Vec<String>>,
    /// Read `GET /v1/models` from each endpoint with the probes.
    pub discover_models: bool,
    /// Prefix-cache affinity, when configured.
    pub(crate) prefix_affinity: Option<PrefixAffinity>,
}

/// `affinity = { prefix_bytes, max_load_factor }`: requests whose prompts start alike go to
/// the same endpoint, within a bounded load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PrefixAffinity {
    pub prefix_bytes: usize,
    pub max_load_factor: f64,
}

/// A drain written in the config. Kept even when `until` is past: whether it is in force
/// is decided against the clock ([`crate::health::drain::decide`]), not at parse time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigDrain {
    /// Why the region is drained, as shown in `/status` and `meridian check`.
    pub reason: String,
    pub(crate) until: Option<std::time::SystemTime>,
}

/// `[[region]] health = { ... }`: what differs from `[health]` for one region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeOverride {
    /// `path`: probe path for this region's endpoints instead of `health.path`.
    pub path: Option<String>,
    pub(crate) interval: Option<Duration>,
    pub(crate) timeout: Option<Duration>,
}

/// One endpoint of a region (or the fallback): where requests are sent and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointConfig {
    /// The URL as configured, normalised (`http://10.0.0.1:8000`); identifies the endpoint
    /// across reloads.
    pub url: String,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// Path prefix to put in front of the request path (empty for none).
    pub(crate) base_path: String,
    pub(crate) weight: u32,
    /// How requests reach it: the endpoint's own `protocol`, else its region's.
    pub protocol: UpstreamProtocol,
}

/// `load = { source, path }`: where a region's endpoints report their load.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadConfig {
    pub(crate) source: LoadSource,
    /// `load.path`: the metrics page scraped for the `vllm`, `tgi` and `sglang` sources
    /// (default `/metrics`).
    pub path: String,
}

/// One `[[residency]]` zone: countries whose clients may only be served by its regions.
#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// `name`: unique zone name, named in refusals, logs and metrics.
    pub name: std::sync::Arc<str>,
    /// `countries`: the countries whose clients the zone binds; each in at most one zone.
    pub countries: Vec<Country>,
    /// `regions`: indexes into [`Config::regions`] of the only regions its clients may use.
    pub regions: Vec<usize>,
    pub(crate) failover: bool,
}

/// One `[[route]]` rule: requests it matches go to the listed regions in order, wherever the
/// client is.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub(crate) path_prefix: String,
    /// `regions`: indexes into [`Config::regions`], tried in this order.
    pub regions: Vec<usize>,
    /// `residency_exempt`: zone clients may reach the listed regions outside their zone (for
    /// paths without personal data only).
    pub residency_exempt: bool,
    pub(crate) methods: Option<Vec<Method>>,
    /// `headers`: name and exact value pairs that must all be present for the rule to match.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// POSTs matched by this rule name their model in the body.
    pub(crate) model_from_body: bool,
}

/// Thresholds from `[fallback] breaker = { failures = N, cool_down = "30s" }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive failures that open the breaker.
    pub failures: u32,
    /// How long it stays open before a trial request is allowed.
    pub cool_down: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures: 5,
            cool_down: Duration::from_secs(30),
        }
    }
}

/// `[fallback]`: a hosted API used when no region may serve.
#[derive(Debug, Clone)]
pub struct FallbackConfig {
    pub(crate) endpoint: EndpointConfig,
    /// Injected headers; values are marked sensitive and never logged.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// `zone`: index into [`Config::zones`] of a residency zone whose clients it may also serve.
    pub zone: Option<usize>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) path_rewrite: Vec<(String, String)>,
    pub(crate) breaker: BreakerPolicy,
}

/// `[spillover]`: load thresholds past which an endpoint counts as overloaded.
#[derive(Debug, Clone, PartialEq)]
pub struct SpilloverConfig {
    pub(crate) queue_depth: Option<f64>,
    pub(crate) kv_cache: Option<f64>,
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Key path, e.g. `region[2].countries[0]`; empty when the file itself is unreadable.
    pub key: String,
    pub(crate) line: Option<usize>,
    /// What is wrong, in words meant for the person editing the file.
    pub message: String,
}

impl Problem {
    /// A problem with `key`, found outside validation; [`Source::error`] places its line.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            line: None,
            message: message.into(),
        }
    }
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub(crate) file: Option<PathBuf>,
    /// Every problem found, in the order validation met them.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<config>".into());
        writeln!(f, "invalid config {file}: {} problem(s)", self.problems.len())?;
        for p in &self.problems {
            write!(f, "  {file}")?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
            }
            if p.key.is_empty() {
                writeln!(f, ": {}", p.message)?;
            } else {
                writeln!(f, ": {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Source::read(path)?.config()
    }

    /// Parses and validates config text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, path, &|var| std::env::var(var).ok())
    }

    /// [`Config::parse`] reading environment variables (`admin.token_env`, `env:` header
    /// values) through `env`, so a caller can check a config written for another machine.
    pub fn parse_with_env(
        text: &str,
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (config, mut problems) = validate(text, path, env)?;
        if problems.is_empty() {
            return Ok(config);
        }
        place(text, &mut problems);
        Err(ConfigError {
            file: path.map(Path::to_owned),
            problems,
        })
    }

    /// The index of the region called `name` in [`Config::regions`], if there is one.
    pub fn region_index(&self, name: &str) -> Option<usize> {
        self.regions.iter().position(|r| r.name == name)
    }

    /// The index of the residency zone called `name` in [`Config::zones`], if there is one.
    pub fn zone_index(&self, name: &str) -> Option<usize> {
        self.zones.iter().position(|z| &*z.name == name)
    }
}

/// Region names that mean something else in metrics, logs and responses, and why.
const RESERVED_REGION_NAMES: [(&str, &str); 2] = [
    ("fallback", "for the [fallback] endpoint"),
    (
        "none",
        "for requests answered before a region was chosen (the region label in metrics)",
    ),
];

/// Every lookup may walk the whole chain: a handful of files is the intended use.
const MAX_GEOIP_DATABASES: usize = 16;

pub(super) fn line_of(text: &str, span: &Range<usize>) -> usize {
    text.get(..span.start).map_or(0, |t| t.matches('\n').count()) + 1
}

/// The config as far as it validates and every problem found in it; `Err` when the text
/// is not a config file at all (TOML syntax, an unknown key, a value of the wrong type).
fn validate(
    text: &str,
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Config, Vec<Problem>), ConfigError> {
    let base = path.and_then(Path::parent).unwrap_or(Path::new(""));
    let unreadable = |e: toml::de::Error, key: String| ConfigError {
        file: path.map(Path::to_owned),
        problems: vec![Problem {
            key,
            line: e.span().map(|s| line_of(text, &s)),
            message: e.message().trim().to_string(),
        }],
    };
    let document = toml::Deserializer::parse(text).map_err(|e| unreadable(e, String::new()))?;
    let raw: FileConfig = serde_path_to_error::deserialize(document).map_err(|e| {
        let key = super::locate::error_path(e.path());
        unreadable(e.into_inner(), key)
    })?;
    let mut v = Validator {
        text,
        base,
        problems: Vec::new(),
        homes: Vec::new(),
        env,
    };
    let config = v.config(raw);
    Ok((config, v.problems))
}

/// Gives each problem found without a span the line its key path is written on. Only a
/// rejected file pays for this second parse.
fn place(text: &str, problems: &mut [Problem]) {
    if problems.iter().all(|p| p.line.is_some() || p.key.is_empty()) {
        return;
    }
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return;
    };
    for p in problems.iter_mut().filter(|p| p.line.is_none()) {
        p.line = super::locate::span_of(&doc, &p.key).map(|s| line_of(text, &s));
    }
}

/// A config file as read from disk. Its text is kept so that problems found after
/// validation (a GeoIP database or a certificate that cannot be opened) are reported with
/// their line, like the rest.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    /// Reads the file; a file that cannot be read is a problem of its own.
    pub fn read(path: &Path) -> Result<Source, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Source {
                path: path.to_owned(),
                text,
            }),
            Err(e) => Err(ConfigError {
                file: Some(path.to_owned()),
                problems: vec![Problem {
                    key: String::new(),
                    line: None,
                    message: format!("cannot read: {e}"),
                }],
            }),
        }
    }

    /// Parses and validates the text.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = Config::parse(&self.text, Some(&self.path))?;
        config.source = Some(self.path.clone());
        Ok(config)
    }

    /// The config as far as it validates, with every problem found: a rejected config can
    /// still be looked at (`meridian check` opens the files it names, to report those
    /// problems in the same run). `Err` when the text is not a config file at all.
    pub fn config_and_problems(&self) -> Result<(Config, Vec<Problem>), ConfigError> {
        let (mut config, problems) = validate(&self.text, Some(&self.path), &|var| std::env::var(var).ok())?;
        config.source = Some(self.path.clone());
        Ok((config, problems))
    }

    /// `problems` as this file's error, each without a line placed at the line of its key.
    pub fn error(&self, mut problems: Vec<Problem>) -> ConfigError {
        place(&self.text, &mut problems);
        ConfigError {
            file: Some(self.path.clone()),
            problems,
        }
    }
}

struct Validator<'a> {
    text: &'a str,
    base: &'a Path,
    problems: Vec<Problem>,
    /// Every home country as written: (region index, index in `countries`, country, span),
    /// for checks that need the zones too.
    homes: Vec<(usize, usize, Country, Range<usize>)>,
    /// Environment lookup (`std::env::var` outside tests).
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Validator<'_> {
    fn problem(&mut self, key: impl Into<String>, span: Option<Range<usize>>, message: impl Into<String>) {
        let line = span.map(|s| line_of(self.text, &s));
        self.problems.push(Problem {
            key: key.into(),
            line,
            message: message.into(),
        });
    }

    fn path(&self, p: PathBuf) -> PathBuf {
        if p.is_relative() { self.base.join(p) } else { p }
    }

    fn addr(&mut self, key: &str, value: Option<Spanned<String>>, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default.parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(value) = value else { return fallback };
        match value.get_ref().parse() {
            Ok(a) => a,
            Err(_) => {
                self.problem(
                    key,
                    Some(value.span()),
                    format!("{:?} is not an address like \"0.0.0.0:8080\"", value.get_ref()),
                );
                fallback
            }
        }
    }

    fn country(&mut self, key: String, code: &Spanned<String>) -> Option<Country> {
        let c = Country::known(code.get_ref());
        if c.is_none() {
            self.problem(
                key,
                Some(code.span()),
                format!("{:?} is not an ISO 3166-1 alpha-2 country code", code.get_ref()),
            );
        }
        c
    }

    /// `value` or its `default`, which must be greater than zero.
    fn positive_or(&mut self, key: &str, value: Option<super::units::Duration>, default: Duration) -> Duration {
        self.positive(key, value.map_or(default, |d| d.0))
    }

    fn positive(&mut self, key: &str, d: Duration) -> Duration {
        if d.is_zero() {
            self.problem(key, None, "must be greater than zero");
        }
        d
    }

    /// The config as far as it validates: with problems it is only looked at, never used.
    fn config(&mut self, raw: FileConfig) -> Config {
        let server = self.server(raw.server);
        let admin = self.admin(raw.admin);
        let regions = self.regions(raw.regions);
        let names: HashMap<String, usize> = regions.iter().enumerate().map(|(i, r)| (r.name.clone(), i)).collect();
        let geoip = self.geoip(raw.geoip, &names);
        let health = self.health(raw.health);
        if !health.enabled {
            for (i, r) in regions.iter().enumerate().filter(|(_, r)| r.discover_models) {
                self.problem(
                    format!("region[{i}].discover_models"),
                    None,
                    format!(
                        "region {:?}: models are discovered with the health probes, and [health] enabled is false",
                        r.name
                    ),
                );
            }
        }
        let outlier = self.outlier(raw.outlier);
        let retry = self.retry(raw.retry);
        let zones = self.zones(raw.residency, &names);
        let routes = self.routes(raw.routes, &names);
        self.homes_inside_zones(&regions, &zones);
        let fallback = raw.fallback.and_then(|f| self.fallback(f, &zones));
        let spillover = raw.spillover.map(|s| self.spillover(s));
        let upstream_tls = raw.upstream_tls.map(|t| self.upstream_tls(t)).unwrap_or_default();
        let tracing = raw.tracing.and_then(|t| self.tracing(t));
        let (upstream, problems) = super::upstream::validate(raw.upstream.unwrap_or_default());
        for (key, message) in problems {
            self.problem(key, None, message);
        }
        let log = LogConfig {
            format: raw.log.format.unwrap_or_default(),
            access_log: raw.log.access_log.unwrap_or(true),
        };
        if regions.is_empty() {
            self.problem("region", None, "at least one [[region]] is required");
        }
        let (limit_rules, limits, problems) = super::limits::validate(self.text, raw.limit_rules, raw.limits);
        self.problems.extend(problems);
        Config {
            source: None,
            server,
            admin,
            geoip,
            health,
            outlier,
            retry,
            log,
            regions,
            zones,
            routes,
            fallback,
            spillover,
            upstream_tls,
            tracing,
            upstream,
            limit_rules,
            limits,
        }
    }

    fn tracing(&mut self, t: file::TracingFile) -> Option<TracingConfig> {
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            self.problem("tracing.sample_ratio", None, "must be between 0 and 1");
        }
        let service_name = t.service_name.unwrap_or_else(|| "meridian".to_string());
        if service_name.trim().is_empty() {
            self.problem("tracing.service_name", None, "must not be empty");
        }
        let endpoint = t.otlp_endpoint?;
        let span = Some(endpoint.span());
        let endpoint = self.endpoint("tracing.otlp_endpoint", span, endpoint.get_ref(), None)?;
        Some(TracingConfig {
            endpoint,
            service_name,
            sample_ratio,
        })
    }

    fn upstream_tls(&mut self, t: file::UpstreamTlsFile) -> UpstreamTlsConfig {
        let client_auth = match (t.client_cert, t.client_key) {
            (Some(cert), Some(key)) => Some((self.path(cert), self.path(key))),
            (None, None) => None,
            _ => {
                self.problem(
                    "upstream_tls.client_cert",
                    None,
                    "client_cert and client_key go together",
                );
                None
            }
        };
        UpstreamTlsConfig {
            ca_file: t.ca_file.map(|p| self.path(p)),
            client_auth,
        }
    }

    fn server(&mut self, s: file::ServerFile) -> ServerConfig {
        let listen = self.addr("server.listen", s.listen, "0.0.0.0:8080");
        let tls = match (s.tls_listen, s.tls_cert, s.tls_key) {
            (None, None, None) if s.certificates.is_empty() => None,
            (Some(l), Some(cert), Some(key)) => {
                let listen = self.addr("server.tls_listen", Some(l), "0.0.0.0:8443");
                let sni = s
                    .certificates
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        if c.names.is_empty() {
                            self.problem(
                                format!("server.certificate[{i}].names"),
                                None,
                                "must name at least one host",
                            );
                        }
                        SniCertificate {
                            names: c.names.iter().map(|n| n.to_ascii_lowercase()).collect(),
                            cert: self.path(c.cert),
                            key: self.path(c.key),
                        }
                    })
                    .collect();
                Some(TlsConfig {
                    listen,
                    cert: self.path(cert),
                    key: self.path(key),
                    sni,
                })
            }
            _ => {
                self.problem(
                    "server.tls_listen",
                    None,
                    "tls_listen, tls_cert and tls_key go together",
                );
                None
            }
        };
        let max_header_bytes = s.max_header_bytes.map_or(64 << 10, |b| b.0) as usize;
        if max_header_bytes < 8192 {
            self.problem("server.max_header_bytes", None, "must be at least 8KiB");
        }
        let max_connections = s.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            self.problem("server.max_connections", None, "must be greater than zero");
        }
        ServerConfig {
            listen,
            tls,
            proxy_protocol: s.proxy_protocol.unwrap_or(false),
            request_timeout: self.positive_or("server.request_timeout", s.request_timeout, Duration::from_secs(60)),
            stall_timeout: self.positive_or("server.stall_timeout", s.stall_timeout, Duration::from_secs(30)),
            connect_timeout: self.positive_or("server.connect_timeout", s.connect_timeout, Duration::from_secs(2)),
            max_request_body: s.max_request_body.map_or(10 << 20, |b| b.0),
            max_buffered_answer: s
                .max_buffered_answer
                .map_or(DEFAULT_MAX_BUFFERED_ANSWER, |b| b.0 as usize),
            max_header_bytes,
            max_headers: s.max_headers.unwrap_or(100),
            max_uri_bytes: s.max_uri_bytes.map_or(8 << 10, |b| b.0) as usize,
            header_read_timeout: self.positive_or(
                "server.header_read_timeout",
                s.header_read_timeout,
                Duration::from_secs(10),
            ),
            idle_timeout: self.positive_or("server.idle_timeout", s.idle_timeout, Duration::from_secs(60)),
            body_timeout: self.positive_or("server.body_timeout", s.body_timeout, Duration::from_secs(30)),
            send_timeout: self.positive_or("server.send_timeout", s.send_timeout, Duration::from_secs(60)),
            max_connections,
            http2_max_concurrent_streams: s.http2_max_concurrent_streams.unwrap_or(256),
            shutdown_timeout: s.shutdown_timeout.map_or(Duration::from_secs(30), |d| d.0),
            worker_threads: s.worker_threads,
            shutdown_delay: s.shutdown_delay.map_or(Duration::ZERO, |d| d.0),
        }
    }

    fn admin(&mut self, a: file::AdminFile) -> AdminConfig {
        let listen = self.addr("admin.listen", a.listen, "127.0.0.1:9901");
        let token = a
            .token_env
            .as_ref()
            .and_then(|var| (self.env)(var))
            .filter(|t| !t.is_empty());
        AdminConfig {
            listen,
            token,
            token_env: a.token_env,
        }
    }

    fn geoip(&mut self, g: file::GeoipFile, names: &HashMap<String, usize>) -> GeoipConfig {
        let trusted_raw = g.trusted_proxies.unwrap_or_else(|| {
            vec![
                Spanned::new(0..0, "127.0.0.1/32".into()),
                Spanned::new(0..0, "::1/128".into()),
            ]
        });
        let mut trusted_proxies = Vec::new();
        for (i, t) in trusted_raw.iter().enumerate() {
            let text = t.get_ref().trim();
            match text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
            {
                Ok(net) => trusted_proxies.push(net.trunc()),
                Err(_) => self.problem(
                    format!("geoip.trusted_proxies[{i}]"),
                    Some(t.span()),
                    format!("{text:?} is not an IP address or CIDR"),
                ),
            }
        }
        let default_region = match &g.default_region {
            Some(name) => match names.get(name.get_ref()) {
                Some(&i) => Some(i),
                None => {
                    self.problem(
                        "geoip.default_region",
                        Some(name.span()),
                        format!("names unknown region {:?}", name.get_ref()),
                    );
                    None
                }
            },
            // Without an explicit default the first region serves unlocated clients.
            None => (!names.is_empty()).then_some(0),
        };
        let databases = self.geoip_databases(g.database);
        let embedded_fallback = g.embedded_fallback.unwrap_or(true);
        if !embedded_fallback && databases.is_empty() {
            self.problem(
                "geoip.embedded_fallback",
                None,
                "false needs geoip.database: without the embedded database no address could be located",
            );
        }
        let max_accuracy_radius_km = g
            .max_accuracy_radius_km
            .unwrap_or(crate::geo::DEFAULT_MAX_ACCURACY_RADIUS_KM);
        if max_accuracy_radius_km == 0 {
            self.problem("geoip.max_accuracy_radius_km", None, "must be at least 1");
        }
        GeoipConfig {
            databases,
            embedded_fallback,
            max_accuracy_radius_km,
            trusted_proxies,
            // Unknown only when a problem rejects the config.
            default_region: default_region.unwrap_or(0),
            unknown: g.unknown.unwrap_or_default(),
        }
    }

    fn geoip_databases(&mut self, database: Option<Spanned<file::GeoipDatabases>>) -> Vec<PathBuf> {
        let Some(database) = database else { return Vec::new() };
        let span = database.span();
        let (list, many) = match database.into_inner() {
            file::GeoipDatabases::One(p) => (vec![p], false),
            file::GeoipDatabases::Many(ps) => (ps, true),
        };
        if list.is_empty() {
            self.problem(
                "geoip.database",
                Some(span.clone()),
                "lists no file; leave it out for the embedded database",
            );
        }
        if list.len() > MAX_GEOIP_DATABASES {
            self.problem(
                "geoip.database",
                Some(span.clone()),
                format!("lists {} files; at most {MAX_GEOIP_DATABASES}", list.len()),
            );
        }
        let mut out: Vec<PathBuf> = Vec::new();
        for (i, p) in list.into_iter().enumerate() {
            let key = if many {
                format!("geoip.database[{i}]")
            } else {
                "geoip.database".to_string()
            };
            let p = self.path(p);
            if out.contains(&p) {
                self.problem(key, Some(span.clone()), format!("{} is listed twice", p.display()));
            } else {
                out.push(p);
            }
        }
        out
    }

    fn health(&mut self, h: file::HealthFile) -> HealthConfig {
        let interval = self.positive_or("health.interval", h.interval, Duration::from_secs(2));
        let timeout = self.positive_or("health.timeout", h.timeout, Duration::from_secs(1));
        let path = h.path.unwrap_or_else(|| "/health".into());
        if !path.starts_with('/') {
            self.problem("health.path", None, "must start with '/'");
        }
        let jitter = h.jitter.unwrap_or(0.1);
        if !(0.0..=0.5).contains(&jitter) {
            self.problem("health.jitter", None, "must be between 0 and 0.5");
        }
        let degraded_below = h.degraded_below.unwrap_or(0.5);
        if !(0.0..=1.0).contains(&degraded_below) {
            self.problem("health.degraded_below", None, "must be between 0 and 1");
        }
        let unhealthy_after = h.unhealthy_after.unwrap_or(3);
        let healthy_after = h.healthy_after.unwrap_or(2);
        if unhealthy_after == 0 {
            self.problem("health.unhealthy_after", None, "must be at least 1");
        }
        if healthy_after == 0 {
            self.problem("health.healthy_after", None, "must be at least 1");
        }
        HealthConfig {
            enabled: h.enabled.unwrap_or(true),
            path,
            interval,
            timeout,
            unhealthy_after,
            healthy_after,
            slow_start: h.slow_start.map_or(Duration::from_secs(10), |d| d.0),
            jitter,
            degraded_below,
            panic_mode: h.panic_mode.unwrap_or(false),
        }
    }

    fn outlier(&mut self, o: file::OutlierFile) -> OutlierConfig {
        let ejection_time = self.positive_or("outlier.ejection_time", o.ejection_time, Duration::from_secs(30));
        let max_ejection_time = o
            .max_ejection_time
            .map_or(ejection_time.max(Duration::from_secs(300)), |d| d.0);
        if max_ejection_time < ejection_time {
            self.problem(
                "outlier.max_ejection_time",
                None,
                "must not be shorter than ejection_time",
            );
        }
        OutlierConfig {
            consecutive_errors: o.consecutive_errors.unwrap_or(5),
            ttfb_threshold: self.positive_or("outlier.ttfb_threshold", o.ttfb_threshold, Duration::from_secs(2)),
            tpot_threshold: self.positive_or("outlier.tpot_threshold", o.tpot_threshold, Duration::from_millis(250)),
            ejection_time,
            max_ejection_time,
            max_retry_after: o.max_retry_after.map_or(Duration::from_secs(60), |d| d.0),
        }
    }

    /// One `retry.replay_paths` entry: an absolute path already in normal form, so it can
    /// be compared with the normalised request path.
    fn replay_path(&mut self, i: usize, p: &str) -> Option<String> {
        let key = format!("retry.replay_paths[{i}]");
        let normal = crate::path::normalise(p)
            .ok()
            .filter(|n| n.as_ref() == p && p.starts_with('/'));
        if normal.is_none() || p.contains('?') {
            self.problem(
                key,
                None,
                "must be an absolute path without dot-segments, `//` or a query, like \"/v1/chat/completions\"",
            );
            return None;
        }
        Some(p.trim_end_matches('/').to_string())
    }

    fn retry(&mut self, r: file::RetryFile) -> RetryConfig {
        let max_attempts = r.max_attempts.unwrap_or(3);
        if max_attempts == 0 {
            self.problem("retry.max_attempts", None, "must be at least 1");
        }
        let budget_ratio = r.budget_ratio.unwrap_or(0.2);
        if !(0.0..=1.0).contains(&budget_ratio) {
            self.problem("retry.budget_ratio", None, "must be between 0 and 1");
        }
        let replay_paths = match r.replay_paths {
            None => DEFAULT_REPLAY_PATHS.iter().map(|p| p.to_string()).collect(),
            Some(paths) => paths
                .iter()
                .enumerate()
                .filter_map(|(i, p)| self.replay_path(i, p))
                .collect(),
        };
        RetryConfig {
            replay_paths,
            max_attempts: max_attempts.max(1),
            budget_ratio,
            budget_min_per_second: r.budget_min_per_second.unwrap_or(10),
        }
    }

    fn endpoint(
        &mut self,
        key: &str,
        span: Option<Range<usize>>,
        text: &str,
        weight: Option<u32>,
    ) -> Option<EndpointConfig> {
        let uri: Uri = match text.parse() {
            Ok(u) => u,
            Err(e) => {
                self.problem(key, span.clone(), format!("{text:?} is not a URL: {e}"));
                return None;
            }
        };
        let scheme = match uri.scheme() {
            Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
            _ => {
                self.problem(
                    key,
                    span.clone(),
                    format!("{text:?} must start with http:// or https://"),
                );
                return None;
            }
        };
        let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()).cloned() else {
            self.problem(key, span.clone(), format!("{text:?} has no host"));
            return None;
        };
        if uri.query().is_some() {
            self.problem(key, span.clone(), format!("{text:?} must not have a query"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        let weight = weight.unwrap_or(1);
        if weight == 0 {
            self.problem(key, span.clone(), "weight must be at least 1");
        }
        Some(EndpointConfig {
            url: format!("{scheme}://{authority}{base_path}"),
            scheme,
            authority,
            base_path,
            weight,
            protocol: UpstreamProtocol::Http1,
        })
    }

    fn regions(&mut self, raw: Vec<file::RegionFile>) -> Vec<RegionConfig> {
        let mut seen = HashMap::new();
        let mut home: HashMap<Country, String> = HashMap::new();
        let mut claimed: HashMap<Subdivision, String> = HashMap::new();
        let mut out = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let key = format!("region[{i}]");
            let name = r.name.get_ref().trim().to_string();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                self.problem(
                    format!("{key}.name"),
                    Some(r.name.span()),
                    format!("{name:?} must be non-empty letters, digits, '-', '_' or '.'"),
                );
            }
            if let Some(why) = RESERVED_REGION_NAMES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, why)| why)
            {
                self.problem(
                    format!("{key}.name"),
                    Some(r.name.span()),
                    format!("{name:?} is reserved {why}"),
                );
            }
            if let Some(first) = seen.insert(name.clone(), i) {
                self.problem(
                    format!("{key}.name"),
                    Some(r.name.span()),
                    format!("duplicate region name {name:?} (also region[{first}])"),
                );
            }
            let location = match r.location.get_ref().as_slice() {
                [lat, lon] if (-90.0..=90.0).contains(lat) && (-180.0..=180.0).contains(lon) => {
                    GeoPoint { lat: *lat, lon: *lon }
                }
                [lat, lon] => {
                    self.problem(
                        format!("{key}.location"),
                        Some(r.location.span()),
                        format!("[{lat}, {lon}] is out of range: latitude -90..90, longitude -180..180"),
                    );
                    GeoPoint { lat: 0.0, lon: 0.0 }
                }
                _ => {
                    self.problem(
                        format!("{key}.location"),
                        Some(r.location.span()),
                        "must be [latitude, longitude]",
                    );
                    GeoPoint { lat: 0.0, lon: 0.0 }
                }
            };
            let mut countries = Vec::new();
            for (j, c) in r.countries.iter().enumerate() {
                let ckey = format!("{key}.countries[{j}]");
                if let Some(country) = self.country(ckey.clone(), c) {
                    if let Some(other) = home.insert(country, name.clone()) {
                        if other != name {
                            self.problem(
                                ckey,
                                Some(c.span()),
                                format!(
                                    "{country} is already the home of region {other:?}; a country has one home region"
                                ),
                            );
                        }
                    }
                    self.homes.push((i, j, country, c.span()));
                    countries.push(country);
                }
            }
            let mut subdivisions = Vec::new();
            for (j, s) in r.subdivisions.iter().enumerate() {
                let skey = format!("{key}.subdivisions[{j}]");
                match Subdivision::parse(s.get_ref().trim()).filter(|s| s.country().info().is_some()) {
                    Some(sub) => {
                        if let Some(other) = claimed.insert(sub, name.clone()) {
                            self.problem(
                                skey,
                                Some(s.span()),
                                format!(
                                    "{sub} is already claimed by region {other:?}; a subdivision has one home region"
                                ),
                            );
                        } else {
                            subdivisions.push(sub);
                        }
                    }
                    None => self.problem(
                        skey,
                        Some(s.span()),
                        format!(
                            "{:?} is not an ISO 3166-2 code like \"US-CA\" (country, dash, 1-3 letters or digits)",
                            s.get_ref()
                        ),
                    ),
                }
            }
            let ep_span = r.endpoints.span();
            let endpoints_raw = r.endpoints.into_inner();
            if endpoints_raw.is_empty() {
                self.problem(
                    format!("{key}.endpoints"),
                    Some(ep_span),
                    "must list at least one endpoint",
                );
            }
            let mut endpoints: Vec<EndpointConfig> = Vec::new();
            for (j, e) in endpoints_raw.iter().enumerate() {
                let ekey = format!("{key}.endpoints[{j}]");
                let (url, weight, protocol) = match e.get_ref() {
                    EndpointFile::Url(u) => (u.as_str(), None, None),
                    EndpointFile::Detailed(d) => (d.url.as_str(), d.weight, d.protocol),
                };
                if let Some(mut ep) = self.endpoint(&ekey, Some(e.span()), url, weight) {
                    ep.protocol = protocol.or(r.protocol).unwrap_or_default();
                    if endpoints.iter().any(|x| x.url == ep.url) {
                        self.problem(ekey, Some(e.span()), format!("duplicate endpoint {:?}", ep.url));
                    } else {
                        endpoints.push(ep);
                    }
                }
            }
            let load = match r.load {
                Some(l) => {
                    let path = l.path.unwrap_or_else(|| "/metrics".into());
                    if !path.starts_with('/') {
                        self.problem(format!("{key}.load.path"), None, "must start with '/'");
                    }
                    LoadConfig { source: l.source, path }
                }
                None => LoadConfig {
                    source: LoadSource::None,
                    path: "/metrics".into(),
                },
            };
            let mut prefix_affinity = None;
            let (affinity_header, affinity_body_field) = match r.affinity {
                Some(a) => {
                    if a.header.is_none() && a.body_field.is_none() && a.prefix_bytes.is_none() {
                        self.problem(
                            format!("{key}.affinity"),
                            None,
                            "set header, body_field or prefix_bytes",
                        );
                    }
                    if a.prefix_bytes == Some(0) {
                        self.problem(format!("{key}.affinity.prefix_bytes"), None, "must be at least 1");
                    }
                    let max_load_factor = a.max_load_factor.unwrap_or(1.25);
                    if !(max_load_factor.is_finite() && max_load_factor >= 1.0) {
                        self.problem(format!("{key}.affinity.max_load_factor"), None, "must be at least 1");
                    } else if a.max_load_factor.is_some() && a.prefix_bytes.is_none() {
                        self.problem(
                            format!("{key}.affinity.max_load_factor"),
                            None,
                            "applies to prefix affinity: set prefix_bytes too",
                        );
                    }
                    prefix_affinity = a.prefix_bytes.map(|prefix_bytes| PrefixAffinity {
                        prefix_bytes,
                        max_load_factor,
                    });
                    if a.body_field.as_deref().is_some_and(str::is_empty) {
                        self.problem(format!("{key}.affinity.body_field"), None, "must not be empty");
                    }
                    let header = a.header.and_then(|h| match HeaderName::from_bytes(h.as_bytes()) {
                        Ok(h) => Some(h),
                        Err(_) => {
                            self.problem(
                                format!("{key}.affinity.header"),
                                None,
                                format!("{h:?} is not a header name"),
                            );
                            None
                        }
                    });
                    (header, a.body_field)
                }
                None => (None, None),
            };
            let probe = match r.health {
                Some(h) => {
                    if h.path.as_deref().is_some_and(|p| !p.starts_with('/')) {
                        self.problem(format!("{key}.health.path"), None, "must start with '/'");
                    }
                    ProbeOverride {
                        path: h.path,
                        interval: h
                            .interval
                            .map(|d| self.positive(&format!("{key}.health.interval"), d.0)),
                        timeout: h.timeout.map(|d| self.positive(&format!("{key}.health.timeout"), d.0)),
                    }
                }
                None => ProbeOverride::default(),
            };
            let drain = r.drain.and_then(|d| self.drain(&format!("{key}.drain"), d));
            let models = r.models.map(|list| {
                let mut out: Vec<String> = Vec::with_capacity(list.len());
                for (j, m) in list.into_iter().enumerate() {
                    let name = m.get_ref().trim();
                    if name.is_empty() {
                        self.problem(format!("{key}.models[{j}]"), Some(m.span()), "must not be empty");
                    } else if !out.iter().any(|x| x == name) {
                        out.push(name.to_string());
                    }
                }
                out
            });
            let discover_models = r.discover_models.unwrap_or(false);
            out.push(RegionConfig {
                models,
                discover_models,
                prefix_affinity,
                probe,
                drain,
                name,
                location,
                countries,
                subdivisions,
                endpoints,
                priority: r.priority,
                failover: r.failover.unwrap_or(true),
                load,
                affinity_header,
                affinity_body_field,
            });
        }
        out
    }

    fn drain(&mut self, key: &str, d: file::DrainFile) -> Option<ConfigDrain> {
        let reason = d.reason.get_ref().trim().to_string();
        if reason.is_empty() {
            self.problem(format!("{key}.reason"), Some(d.reason.span()), "must not be empty");
        }
        let until = match d.until {
            None => None,
            Some(u) => {
                let span = u.span();
                let parsed = match u.into_inner() {
                    toml::Value::String(s) => super::units::parse_rfc3339(&s),
                    toml::Value::Datetime(t) => super::units::parse_rfc3339(&t.to_string()),
                    other => Err(format!(
                        "expected an RFC 3339 time string, found a {}",
                        other.type_str()
                    )),
                };
                match parsed {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.problem(format!("{key}.until"), Some(span), e);
                        return None;
                    }
                }
            }
        };
        Some(ConfigDrain { reason, until })
    }

    fn region_refs(&mut self, key: &str, refs: &[Spanned<String>], names: &HashMap<String, usize>) -> Vec<usize> {
        let mut out = Vec::new();
        for (j, r) in refs.iter().enumerate() {
            match names.get(r.get_ref()) {
                Some(&i) if out.contains(&i) => self.problem(
                    format!("{key}[{j}]"),
                    Some(r.span()),
                    format!("region {:?} listed twice", r.get_ref()),
                ),
                Some(&i) => out.push(i),
                None => self.problem(
                    format!("{key}[{j}]"),
                    Some(r.span()),
                    format!("names unknown region {:?}", r.get_ref()),
                ),
            }
        }
        out
    }

    fn zones(&mut self, raw: Vec<file::ResidencyFile>, names: &HashMap<String, usize>) -> Vec<ZoneConfig> {
        let mut zone_of: HashMap<Country, String> = HashMap::new();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (i, z) in raw.into_iter().enumerate() {
            let key = format!("residency[{i}]");
            let name = z.name.get_ref().trim().to_string();
            if name.is_empty() {
                self.problem(format!("{key}.name"), Some(z.name.span()), "must not be empty");
            }
            if !seen.insert(name.clone()) {
                self.problem(
                    format!("{key}.name"),
                    Some(z.name.span()),
                    format!("duplicate residency zone {name:?}"),
                );
            }
            let mut countries = Vec::new();
            for (j, c) in z.countries.iter().enumerate() {
                let ckey = format!("{key}.countries[{j}]");
                if let Some(country) = self.country(ckey.clone(), c) {
                    if let Some(other) = zone_of.insert(country, name.clone()) {
                        if other != name {
                            self.problem(
                                ckey,
                                Some(c.span()),
                                format!("{country} is already bound to residency zone {other:?}"),
                            );
                        }
                    }
                    countries.push(country);
                }
            }
            if z.countries.is_empty() {
                self.problem(
                    format!("{key}.countries"),
                    Some(z.name.span()),
                    "must list at least one country",
                );
            }
            let regions = self.region_refs(&format!("{key}.regions"), &z.regions, names);
            if z.regions.is_empty() {
                self.problem(
                    format!("{key}.regions"),
                    Some(z.name.span()),
                    "must list at least one region",
                );
            }
            out.push(ZoneConfig {
                name: name.into(),
                countries,
                regions,
                failover: z.failover.unwrap_or(true),
            });
        }
        out
    }

    /// A region that calls a zone's country home but is not one of the zone's regions would
    /// put that country's home outside its zone: the failover order written in the file
    /// crosses, so it is refused rather than silently skipped.
    fn homes_inside_zones(&mut self, regions: &[RegionConfig], zones: &[ZoneConfig]) {
        for (i, j, c, span) in std::mem::take(&mut self.homes) {
            let Some(r) = regions.get(i) else { continue };
            for (z, zone) in zones.iter().enumerate() {
                if zone.countries.contains(&c) && !zone.regions.contains(&i) {
                    self.problem(
                        format!("region[{i}].countries[{j}]"),
                        Some(span.clone()),
                        format!(
                            "{c} is bound to residency zone {:?} (residency[{z}]), which does not include region {:?}: \
                             its clients could never be served at home; add the region to the zone or move {c} to a zone region",
                            zone.name, r.name
                        ),
                    );
                }
            }
        }
        // The same for subdivision claims: a claim the zone cannot honour is an error.
        for (i, r) in regions.iter().enumerate() {
            for (j, sub) in r.subdivisions.iter().enumerate() {
                for (z, zone) in zones.iter().enumerate() {
                    if zone.countries.contains(&sub.country()) && !zone.regions.contains(&i) {
                        self.problem(
                            format!("region[{i}].subdivisions[{j}]"),
                            None,
                            format!(
                                "{sub} is in residency zone {:?} (residency[{z}]), which does not include region {:?}",
                                zone.name, r.name
                            ),
                        );
                    }
                }
            }
        }
    }

    fn routes(&mut self, raw: Vec<file::RouteFile>, names: &HashMap<String, usize>) -> Vec<RouteConfig> {
        let mut out = Vec::new();
        for (i, r) in raw.into_iter().enumerate() {
            let key = format!("route[{i}]");
            let prefix = r.path_prefix.get_ref().trim_end_matches('/').to_string();
            if !r.path_prefix.get_ref().starts_with('/') {
                self.problem(
                    format!("{key}.path_prefix"),
                    Some(r.path_prefix.span()),
                    "must start with '/'",
                );
            }
            if r.path_prefix.get_ref().contains(['?', '#']) {
                self.problem(
                    format!("{key}.path_prefix"),
                    Some(r.path_prefix.span()),
                    "matches the path only: no query or fragment",
                );
            }
            let regions = self.region_refs(&format!("{key}.regions"), &r.regions, names);
            if r.regions.is_empty() {
                self.problem(
                    format!("{key}.regions"),
                    Some(r.path_prefix.span()),
                    "must list at least one region",
                );
            }
            let methods = r.methods.map(|ms| {
                ms.iter()
                    .filter_map(|m| match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(m) => Some(m),
                        Err(_) => {
                            self.problem(format!("{key}.methods"), None, format!("{m:?} is not an HTTP method"));
                            None
                        }
                    })
                    .collect()
            });
            let mut headers = Vec::new();
            for (name, value) in r.headers.unwrap_or_default() {
                match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(&value)) {
                    (Ok(n), Ok(v)) => headers.push((n, v)),
                    _ => self.problem(
                        format!("{key}.headers.{name}"),
                        None,
                        "is not a valid header name and value",
                    ),
                }
            }
            out.push(RouteConfig {
                path_prefix: prefix,
                regions,
                residency_exempt: r.residency_exempt,
                methods,
                headers,
                model_from_body: r.model_from_body,
            });
        }
        out
    }

    fn fallback(&mut self, f: file::FallbackFile, zones: &[ZoneConfig]) -> Option<FallbackConfig> {
        let endpoint = self.endpoint("fallback.endpoint", Some(f.endpoint.span()), f.endpoint.get_ref(), None);
        let mut headers = Vec::new();
        for (name, value) in &f.headers {
            let key = format!("fallback.headers.{name}");
            let Ok(hname) = HeaderName::from_bytes(name.as_bytes()) else {
                self.problem(key, Some(value.span()), format!("{name:?} is not a header name"));
                continue;
            };
            let text = match value.get_ref().strip_prefix("env:") {
                Some(var) => match (self.env)(var) {
                    Some(v) => v,
                    None => {
                        // Name the variable, never a value.
                        self.problem(
                            key,
                            Some(value.span()),
                            format!("environment variable {var} is not set"),
                        );
                        continue;
                    }
                },
                None => value.get_ref().clone(),
            };
            match HeaderValue::from_str(&text) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    headers.push((hname, v));
                }
                Err(_) => self.problem(key, Some(value.span()), "value is not a valid header value"),
            }
        }
        let zone = match &f.zone {
            Some(z) => match zones.iter().position(|x| *x.name == **z.get_ref()) {
                Some(i) => Some(i),
                None => {
                    self.problem(
                        "fallback.zone",
                        Some(z.span()),
                        format!("names unknown residency zone {:?}", z.get_ref()),
                    );
                    None
                }
            },
            None => None,
        };
        let mut path_rewrite: Vec<(String, String)> = f
            .path_rewrite
            .into_iter()
            .filter(|(from, to)| {
                let ok = from.starts_with('/') && to.starts_with('/');
                if !ok {
                    self.problem(
                        format!("fallback.path_rewrite.{from}"),
                        None,
                        "both prefixes must start with '/'",
                    );
                }
                ok
            })
            // Stored without a trailing slash so the match is by whole segments.
            .map(|(from, to)| {
                (
                    from.trim_end_matches('/').to_string(),
                    to.trim_end_matches('/').to_string(),
                )
            })
            .collect();
        // The longest prefix wins, whatever the order in the file.
        path_rewrite.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let defaults = BreakerPolicy::default();
        let breaker = match f.breaker {
            Some(b) => {
                let failures = b.failures.unwrap_or(defaults.failures);
                if failures == 0 {
                    self.problem("fallback.breaker.failures", None, "must be at least 1");
                }
                BreakerPolicy {
                    failures,
                    cool_down: self.positive_or("fallback.breaker.cool_down", b.cool_down, defaults.cool_down),
                }
            }
            None => defaults,
        };
        Some(FallbackConfig {
            endpoint: endpoint?,
            headers,
            zone,
            ca_file: f.ca_file.map(|p| self.path(p)),
            path_rewrite,
            breaker,
        })
    }

    fn spillover(&mut self, s: file::SpilloverFile) -> SpilloverConfig {
        // A threshold of 0 would hold every region saturated from the first reading on.
        if let Some(k) = s.kv_cache {
            if !(k > 0.0 && k <= 1.0) {
                self.problem("spillover.kv_cache", None, "must be a fraction above 0, at most 1");
            }
        }
        if let Some(q) = s.queue_depth {
            if !(q > 0.0 && q.is_finite()) {
                self.problem("spillover.queue_depth", None, "must be greater than zero");
            }
        }
        if s.queue_depth.is_none() && s.kv_cache.is_none() {
            self.problem("spillover", None, "set queue_depth, kv_cache or both");
        }
        SpilloverConfig {
            queue_depth: s.queue_depth,
            kv_cache: s.kv_cache,
        }
    }
}

/// Every database of the chain that does not open, with its key path, for `check`, `run`
/// and a rejected reload. Loading stops at the first; each file is tried alone only once
/// the chain has failed (`chain_error`).
pub fn geoip_problems(config: &Config, chain_error: &crate::geo::GeoError) -> Vec<Problem> {
    let chain = config.geoip.chain();
    let key = |i: usize| match chain.databases.len() {
        1 => "geoip.database".to_string(),
        _ => format!("geoip.database[{i}]"),
    };
    let mut out: Vec<Problem> = chain
        .databases
        .iter()
        .enumerate()
        .filter_map(|(i, db)| {
            let alone = crate::geo::Chain {
                databases: std::slice::from_ref(db),
                embedded_fallback: false,
                ..chain
            };
            crate::geo::GeoDb::load(alone, None)
                .err()
                .map(|e| Problem::new(key(i), e.to_string()))
        })
        .collect();
    if out.is_empty() {
        out.push(Problem::new("geoip.database", chain_error.to_string()));
    }
    out
}

#[cfg(test)]
mod tls_tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    const REGION: &str = "[[region]]\nname = \"a\"\nlocation = [1, 1]\nendpoints = [\"http://127.0.0.1:1\"]\n";

    #[test]
    fn tls_keys_are_judged_together() {
        let cases: [(&str, Option<&str>); 5] = [
            (
                "[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
                None,
            ),
            (
                "[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"\n",
                Some("server.tls_listen"),
            ),
            ("[upstream_tls]\nca_file = \"ca.pem\"\n", None),
            (
                "[upstream_tls]\nclient_cert = \"c.pem\"\n",
                Some("upstream_tls.client_cert"),
            ),
            (
                "[upstream_tls]\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"\n",
                None,
            ),
        ];
        for (text, problem) in cases {
            let result = Config::parse(&format!("{text}{REGION}"), Some(Path::new("/etc/meridian/m.toml")));
            match (result, problem) {
                (Ok(_), None) => {}
                (Err(e), Some(key)) => assert!(e.problems.iter().any(|p| p.key == key), "{text}: {e}"),
                (r, _) => panic!("{text}: unexpected {:?}", r.err()),
            }
        }
    }

    #[test]
    fn tls_paths_are_relative_to_the_config_file() -> TestResult {
        let text = format!(
            "[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"tls/c.pem\"\ntls_key = \"/abs/k.pem\"\n\n\
             [[server.certificate]]\nnames = [\"*.Example.com\"]\ncert = \"w.pem\"\nkey = \"w.key\"\n\n\
             [upstream_tls]\nclient_cert = \"client.pem\"\nclient_key = \"client.key\"\n{REGION}"
        );
        let c = Config::parse(&text, Some(Path::new("/etc/meridian/m.toml")))?;
        let tls = c.server.tls.ok_or("no [server.tls]")?;
        assert_eq!(tls.cert, Path::new("/etc/meridian/tls/c.pem"));
        assert_eq!(tls.key, Path::new("/abs/k.pem"));
        assert_eq!(tls.sni[0].names, ["*.example.com"]);
        assert_eq!(tls.sni[0].cert, Path::new("/etc/meridian/w.pem"));
        assert_eq!(
            c.upstream_tls.client_auth,
            Some((
                PathBuf::from("/etc/meridian/client.pem"),
                PathBuf::from("/etc/meridian/client.key")
            ))
        );
        Ok(())
    }

    #[test]
    fn timeouts_and_replay_paths() -> TestResult {
        let c = Config::parse(REGION, None)?;
        assert_eq!(c.server.body_timeout, Duration::from_secs(30));
        assert_eq!(c.server.send_timeout, Duration::from_secs(60));
        assert_eq!(
            c.retry.replay_paths,
            [
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/embeddings",
                "/v1/responses"
            ]
        );
        let text = format!(
            "[server]\nbody_timeout = \"5s\"\nsend_timeout = \"2s\"\n[retry]\nreplay_paths = [\"/v1/rerank/\"]\n{REGION}"
        );
        let c = Config::parse(&text, None)?;
        assert_eq!(c.server.body_timeout, Duration::from_secs(5));
        assert_eq!(c.server.send_timeout, Duration::from_secs(2));
        assert_eq!(c.retry.replay_paths, ["/v1/rerank"]);

        let cases: [(&str, &str); 7] = [
            ("[server]\nbody_timeout = \"0s\"\n", "server.body_timeout"),
            ("[server]\nsend_timeout = \"0s\"\n", "server.send_timeout"),
            ("[retry]\nreplay_paths = [\"v1/chat\"]\n", "retry.replay_paths[0]"),
            (
                "[retry]\nreplay_paths = [\"/ok\", \"/v1/../files\"]\n",
                "retry.replay_paths[1]",
            ),
            ("[retry]\nreplay_paths = [\"/v1//files\"]\n", "retry.replay_paths[0]"),
            ("[retry]\nreplay_paths = [\"/v1/%2e%2e\"]\n", "retry.replay_paths[0]"),
            ("[retry]\nreplay_paths = [\"/v1/chat?x=1\"]\n", "retry.replay_paths[0]"),
        ];
        for (text, key) in cases {
            let e = Config::parse(&format!("{text}{REGION}"), None).unwrap_err();
            assert!(e.problems.iter().any(|p| p.key == key), "{text}: {e}");
        }
        // Strict: a misspelt key is an error.
        assert!(Config::parse(&format!("[retry]\nreplay_path = []\n{REGION}"), None).is_err());
        Ok(())
    }
}

#[cfg(test)]
mod drain_tests {
    use super::*;

    const REGION: &str = "[[region]]\nname = \"a\"\nlocation = [1, 1]\nendpoints = [\"http://127.0.0.1:1\"]\n";

    #[test]
    fn region_drain_is_read_and_judged() {
        let at = |secs| Some(std::time::UNIX_EPOCH + Duration::from_secs(secs));
        type Want = Result<Option<(&'static str, Option<std::time::SystemTime>)>, &'static str>;
        let cases: [(&str, Want); 7] = [
            ("", Ok(None)),
            (
                "drain = { reason = \"maintenance\" }\n",
                Ok(Some(("maintenance", None))),
            ),
            (
                "drain = { reason = \"x\", until = \"2026-12-01T14:00:00Z\" }\n",
                Ok(Some(("x", at(1_796_133_600)))),
            ),
            (
                "drain = { reason = \"x\", until = 2026-12-01T15:00:00+01:00 }\n",
                Ok(Some(("x", at(1_796_133_600)))),
            ),
            (
                "drain = { reason = \"x\", until = \"at two\" }\n",
                Err("region[0].drain.until"),
            ),
            ("drain = { reason = \" \" }\n", Err("region[0].drain.reason")),
            ("drain = { reason = \"x\", for = \"1h\" }\n", Err("region[0].drain.for")),
        ];
        for (line, want) in cases {
            let text = format!("{REGION}{line}");
            let got = Config::parse(&text, None);
            match (got, want) {
                (Ok(c), Ok(want)) => {
                    let d = c.regions[0].drain.as_ref().map(|d| (d.reason.as_str(), d.until));
                    assert_eq!(d, want, "{line}");
                }
                (Err(e), Err(key)) => {
                    assert!(e.problems.iter().any(|p| p.key == key), "{line}: {e}");
                }
                (got, want) => panic!("{line}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn shutdown_delay_defaults_to_zero() {
        let c = Config::parse(REGION, None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.shutdown_delay, Duration::ZERO);
        let c = Config::parse(&format!("[server]\nshutdown_delay = \"5s\"\n{REGION}"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server.shutdown_delay, Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tracing_tests {
    use super::*;

    const REGION: &str = "[[region]]\nname = \"a\"\nlocation = [1, 1]\nendpoints = [\"http://127.0.0.1:1\"]\n";

    #[test]
    fn tracing_keys_table() {
        // (config text, Ok(endpoint URL, service name, ratio) or Err(key path of the problem))
        type Want = Result<Option<(&'static str, &'static str, f64)>, &'static str>;
        let cases: [(&str, Want); 7] = [
            ("", Ok(None)),
            ("[tracing]\nservice_name = \"edge\"\n", Ok(None)),
            (
                "[tracing]\notlp_endpoint = \"http://otel:4318/\"\n",
                Ok(Some(("http://otel:4318", "meridian", 1.0))),
            ),
            (
                "[tracing]\notlp_endpoint = \"https://otel.example\"\nservice_name = \"edge-eu\"\nsample_ratio = 0.1\n",
                Ok(Some(("https://otel.example", "edge-eu", 0.1))),
            ),
            (
                "[tracing]\notlp_endpoint = \"http://otel:4318\"\nsample_ratio = 1.5\n",
                Err("tracing.sample_ratio"),
            ),
            (
                "[tracing]\notlp_endpoint = \"otel:4318\"\n",
                Err("tracing.otlp_endpoint"),
            ),
            (
                "[tracing]\notlp_endpoint = \"http://otel:4318\"\nsample = 1\n",
                Err("tracing.sample"),
            ),
        ];
        for (text, want) in cases {
            let result = Config::parse(&format!("{text}{REGION}"), None);
            match (result, want) {
                (Ok(c), Ok(want)) => {
                    let got = c
                        .tracing
                        .as_ref()
                        .map(|t| (t.endpoint.url.as_str(), t.service_name.as_str(), t.sample_ratio));
                    assert_eq!(got, want, "{text}");
                }
                (Err(e), Err(key)) => assert!(e.problems.iter().any(|p| p.key.starts_with(key)), "{text}: {e}"),
                (r, _) => panic!("{text}: unexpected {:?}", r.err()),
            }
        }
    }
}
