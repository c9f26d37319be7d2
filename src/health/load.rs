//! Load signals from the model servers: parsing Prometheus pages and ORCA headers (pure),
//! and the per-endpoint atomics the balancer and the spillover check read.
//!
//! Metrics read, per source (label sets, e.g. one per `model_name` or engine, are summed for
//! the counts; the KV-cache fraction takes the fullest one, since a sum would pass 1):
//!
//! | source | queue depth | running | KV-cache utilisation (0..=1) |
//! | --- | --- | --- | --- |
//! | vllm | `vllm:num_requests_waiting` | `vllm:num_requests_running` | `vllm:kv_cache_usage_perc`, else `vllm:gpu_cache_usage_perc` |
//! | tgi | `tgi_queue_size` | `tgi_batch_current_size` | — |
//! | sglang | `sglang:num_queue_reqs` | `sglang:num_running_reqs` | `sglang:token_usage` |
//! | orca | `num_requests_waiting`, `queue_depth`, `queue_size` | `num_requests_running` | `kv_cache_usage_perc`, `kv_cache_utilization`, `gpu_cache_usage_perc` |

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::exposition;
use crate::config::LoadSource;

/// One reading of an endpoint's load; `None` where the server did not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LoadReport {
    pub(crate) queue_depth: Option<f64>,
    pub(crate) running: Option<f64>,
    pub(crate) kv_cache: Option<f64>,
}

impl LoadReport {
    fn is_empty(&self) -> bool {
        self.queue_depth.is_none() && self.running.is_none() && self.kv_cache.is_none()
    }
}

/// Why a metrics page or an ORCA header gave nothing usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// A line of the metrics page does not follow the exposition format; holds the problem.
    #[error("metrics page unreadable: {0}")]
    Unreadable(String),
    /// The page parsed but holds none of the source's metrics; holds the source's name.
    #[error("none of the {0} load metrics are on the page")]
    NoMetrics(&'static str),
    /// An ORCA `endpoint-load-metrics` header could not be read; holds the problem.
    #[error("ORCA header not understood: {0}")]
    Orca(String),
    /// The metrics page could not be fetched (connect, status, timeout); holds the cause.
    #[error("{0}")]
    Fetch(String),
}

/// The metric names a Prometheus source publishes, as the servers write them.
struct Names {
    queue: &'static [&'static str],
    running: &'static [&'static str],
    /// In order of preference: the first one present wins.
    kv: &'static [&'static str],
}

fn names(source: LoadSource) -> Option<Names> {
    match source {
        LoadSource::Vllm => Some(Names {
            queue: &["vllm:num_requests_waiting"],
            running: &["vllm:num_requests_running"],
            kv: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        }),
        LoadSource::Tgi => Some(Names {
            queue: &["tgi_queue_size"],
            running: &["tgi_batch_current_size"],
            kv: &[],
        }),
        LoadSource::Sglang => Some(Names {
            queue: &["sglang:num_queue_reqs"],
            running: &["sglang:num_running_reqs"],
            kv: &["sglang:token_usage"],
        }),
        LoadSource::Orca | LoadSource::None => None,
    }
}

/// Whether `source` is read by scraping a metrics page.
pub fn scraped(source: LoadSource) -> bool {
    names(source).is_some()
}

fn source_name(source: LoadSource) -> &'static str {
    match source {
        LoadSource::Vllm => "vllm",
        LoadSource::Tgi => "tgi",
        LoadSource::Sglang => "sglang",
        LoadSource::Orca => "orca",
        LoadSource::None => "none",
    }
}

/// Reads the load metrics of `source` from a Prometheus or OpenMetrics text page. Lines of
/// other metrics are skipped by name without being read, so histograms elsewhere on the
/// page cost little and an exotic line there spoils nothing; a line of a wanted metric that
/// breaks the grammar makes the page unreadable (the signals degrade, with one warning).
pub fn parse_prometheus(source: LoadSource, page: &str) -> Result<LoadReport, LoadError> {
    let Some(n) = names(source) else {
        return Err(LoadError::NoMetrics(source_name(source)));
    };
    let wanted = |name: &str| n.queue.contains(&name) || n.running.contains(&name) || n.kv.contains(&name);
    let mut samples: Vec<(&str, f64)> = Vec::new();
    for (number, line) in page.lines().enumerate() {
        let Some(name) = exposition::line_name(line).filter(|name| wanted(name)) else {
            continue;
        };
        match exposition::parse_line(line) {
            Ok(exposition::Line::Sample(s)) => {
                if s.value.is_finite() && s.value >= 0.0 {
                    samples.push((name, s.value));
                }
            }
            Ok(_) => {}
            Err(e) => return Err(LoadError::Unreadable(format!("line {}: {e}", number + 1))),
        }
    }
    let fold = |metric: &str, combine: fn(f64, f64) -> f64| {
        samples
            .iter()
            .filter(|(name, _)| *name == metric)
            .map(|(_, v)| *v)
            .reduce(combine)
    };
    let first = |list: &[&str], combine: fn(f64, f64) -> f64| list.iter().find_map(|m| fold(m, combine));
    let report = LoadReport {
        queue_depth: first(n.queue, |a, b| a + b),
        running: first(n.running, |a, b| a + b),
        kv_cache: first(n.kv, f64::max).map(|k| k.min(1.0)),
    };
    if report.is_empty() {
        return Err(LoadError::NoMetrics(source_name(source)));
    }
    Ok(report)
}

/// The response header ORCA load reports come in, and the request header that asks a
/// server (vLLM, Triton) to attach it.
pub(crate) const ORCA_HEADER: &str = "endpoint-load-metrics";
pub(crate) const ORCA_FORMAT_HEADER: &str = "endpoint-load-metrics-format";

/// Reads an `endpoint-load-metrics` value: `TEXT k=v, k=v` (also `k:v`, and without the
/// `TEXT ` prefix, as Envoy's native form) or `JSON {...}`. Names may carry the
/// `named_metrics.` prefix. The binary form is not read.
pub(crate) fn parse_orca(value: &str) -> Result<LoadReport, LoadError> {
    let value = value.trim();
    let mut pairs: Vec<(String, f64)> = Vec::new();
    if let Some(json) = value.strip_prefix("JSON") {
        let v: serde_json::Value = serde_json::from_str(json.trim()).map_err(|e| LoadError::Orca(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| LoadError::Orca("not a JSON object".into()))?;
        for (k, v) in obj {
            match (k.as_str(), v) {
                ("named_metrics", serde_json::Value::Object(named)) => {
                    pairs.extend(named.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))));
                }
                (k, v) => pairs.extend(v.as_f64().map(|v| (k.to_string(), v))),
            }
        }
    } else if value.starts_with("BIN") {
        return Err(LoadError::Orca("the binary form is not supported; ask for TEXT".into()));
    } else {
        let text = value.strip_prefix("TEXT").unwrap_or(value);
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .or_else(|| item.split_once(':'))
                .ok_or_else(|| LoadError::Orca(format!("{item:?} is not name=value")))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| LoadError::Orca(format!("{item:?} has no number")))?;
            let k = k.trim();
            pairs.push((k.strip_prefix("named_metrics.").unwrap_or(k).to_string(), v));
        }
    }
    let find = |names: &[&str]| {
        names.iter().find_map(|n| {
            pairs
                .iter()
                .find(|(k, v)| k == n && v.is_finite() && *v >= 0.0)
                .map(|(_, v)| *v)
        })
    };
    let report = LoadReport {
        queue_depth: find(&["num_requests_waiting", "queue_depth", "queue_size"]),
        running: find(&["num_requests_running", "running_requests"]),
        kv_cache: find(&["kv_cache_usage_perc", "kv_cache_utilization", "gpu_cache_usage_perc"]).map(|k| k.min(1.0)),
    };
    if report.is_empty() {
        return Err(LoadError::Orca("no queue or KV-cache metric in it".into()));
    }
    Ok(report)
}

/// How far an endpoint's load signals can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SignalState {
    /// Nothing read yet (or source `none`).
    Unknown,
    /// Signals read and fresh.
    Ok,
    /// The page or header is missing or broken: treated as `none` until it comes back.
    Degraded,
}

/// What happened to the signal state on an update, for logging once.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalChange {
    /// The signals stopped being usable, and why.
    Degraded(LoadError),
    /// The signals are usable again.
    Recovered,
}

const UNSET: u64 = u64::MAX;

/// An endpoint's latest load reading, in atomics: written by the scraper or by responses,
/// read lock-free by every pick and by the spillover tick.
#[derive(Debug)]
pub struct LoadSignals {
    queue_depth: AtomicU64,
    running: AtomicU64,
    kv_cache: AtomicU64,
    /// The reading is stale after this `millis()`; 0 when there is none.
    valid_until: AtomicU64,
    state: AtomicU8,
}

impl Default for LoadSignals {
    fn default() -> Self {
        LoadSignals {
            queue_depth: AtomicU64::new(UNSET),
            running: AtomicU64::new(UNSET),
            kv_cache: AtomicU64::new(UNSET),
            valid_until: AtomicU64::new(0),
            state: AtomicU8::new(SignalState::Unknown as u8),
        }
    }
}

/// A reading as the balancer sees it: zeros where unknown or stale.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Load {
    pub(crate) queue_depth: f64,
    pub(crate) running: f64,
    pub(crate) kv_cache: f64,
}

fn store(a: &AtomicU64, v: Option<f64>) {
    a.store(v.map_or(UNSET, f64::to_bits), Ordering::Relaxed);
}

fn read(a: &AtomicU64) -> Option<f64> {
    match a.load(Ordering::Relaxed) {
        UNSET => None,
        bits => Some(f64::from_bits(bits)),
    }
}

impl LoadSignals {
    /// Records a reading (valid for `ttl`) or a failure; returns a change of state, so the
    /// caller logs a broken page once rather than on every scrape.
    pub fn update(&self, reading: Result<LoadReport, LoadError>, ttl: Duration) -> Option<SignalChange> {
        self.update_at(reading, ttl, Instant::now())
    }

    /// [`Self::update`] at `now`, so tests control the clock.
    pub(crate) fn update_at(
        &self,
        reading: Result<LoadReport, LoadError>,
        ttl: Duration,
        now: Instant,
    ) -> Option<SignalChange> {
        let was = self.state();
        match reading {
            Ok(r) => {
                store(&self.queue_depth, r.queue_depth);
                store(&self.running, r.running);
                store(&self.kv_cache, r.kv_cache);
                let until = super::millis(now + ttl).max(1);
                self.valid_until.store(until, Ordering::Release);
                self.state.store(SignalState::Ok as u8, Ordering::Relaxed);
                (was == SignalState::Degraded).then_some(SignalChange::Recovered)
            }
            Err(e) => {
                self.clear();
                self.state.store(SignalState::Degraded as u8, Ordering::Relaxed);
                (was != SignalState::Degraded).then_some(SignalChange::Degraded(e))
            }
        }
    }

    fn clear(&self) {
        self.valid_until.store(0, Ordering::Release);
        store(&self.queue_depth, None);
        store(&self.running, None);
        store(&self.kv_cache, None);
    }

    pub(crate) fn state(&self) -> SignalState {
        match self.state.load(Ordering::Relaxed) {
            s if s == SignalState::Ok as u8 => SignalState::Ok,
            s if s == SignalState::Degraded as u8 => SignalState::Degraded,
            _ => SignalState::Unknown,
        }
    }

    /// The current reading, or `None` when there is none or it went stale (an endpoint
    /// that stopped getting traffic must not keep an old ORCA report forever).
    pub fn current(&self) -> Option<Load> {
        self.current_with(Instant::now)
    }

    /// [`Self::current`] at `now`, so tests control the clock.
    #[cfg(test)]
    pub(crate) fn current_at(&self, now: Instant) -> Option<Load> {
        self.current_with(|| now)
    }

    /// The clock is read only when there is a reading to age: endpoints without load
    /// signals pay nothing per pick.
    fn current_with(&self, now: impl FnOnce() -> Instant) -> Option<Load> {
        let until = self.valid_until.load(Ordering::Acquire);
        if until == 0 || super::millis(now()) > until {
            return None;
        }
        Some(Load {
            queue_depth: read(&self.queue_depth).unwrap_or(0.0),
            running: read(&self.running).unwrap_or(0.0),
            kv_cache: read(&self.kv_cache).unwrap_or(0.0),
        })
    }

    /// The raw reading for `/status` (fields the server does not publish stay `None`).
    pub fn report(&self) -> Option<LoadReport> {
        self.current()?;
        Some(LoadReport {
            queue_depth: read(&self.queue_depth),
            running: read(&self.running),
            kv_cache: read(&self.kv_cache),
        })
    }
}

/// How long a reading stays usable: a few scrape rounds, so one slow scrape does not drop
/// it, and never under five seconds.
pub(crate) fn ttl(interval: Duration) -> Duration {
    (interval * 5).max(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
vllm:num_requests_running{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 5.0
vllm:num_requests_waiting{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.42
vllm:kv_cache_usage_perc{engine="1",model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.61
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.5
"#;

    const VLLM_OLD: &str = "# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.\n# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.9\nvllm:num_requests_waiting{model_name=\"m\"} 1.0\n";

    const TGI: &str = "# HELP tgi_queue_size Current queue size\n# TYPE tgi_queue_size gauge\ntgi_queue_size 12\n# HELP tgi_batch_current_size Current batch size\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 8\n";

    const SGLANG: &str = "# HELP sglang:num_running_reqs The number of running requests.\n# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 6.0\n# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n# TYPE sglang:num_queue_reqs gauge\nsglang:num_queue_reqs{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 9.0\n# HELP sglang:token_usage The token usage\n# TYPE sglang:token_usage gauge\nsglang:token_usage{model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 0.28\n";

    fn r(q: Option<f64>, run: Option<f64>, kv: Option<f64>) -> LoadReport {
        LoadReport {
            queue_depth: q,
            running: run,
            kv_cache: kv,
        }
    }

    #[test]
    fn prometheus_pages_table() {
        let cases: [(&str, LoadSource, &str, Result<LoadReport, LoadError>); 9] = [
            (
                "vllm sums engines, kv takes the fullest",
                LoadSource::Vllm,
                VLLM,
                Ok(r(Some(7.0), Some(7.0), Some(0.61))),
            ),
            (
                "older vllm cache name",
                LoadSource::Vllm,
                VLLM_OLD,
                Ok(r(Some(1.0), None, Some(0.9))),
            ),
            (
                "tgi, no labels",
                LoadSource::Tgi,
                TGI,
                Ok(r(Some(12.0), Some(8.0), None)),
            ),
            (
                "sglang",
                LoadSource::Sglang,
                SGLANG,
                Ok(r(Some(9.0), Some(6.0), Some(0.28))),
            ),
            (
                "the wrong source finds nothing",
                LoadSource::Tgi,
                VLLM,
                Err(LoadError::NoMetrics("tgi")),
            ),
            ("an empty page", LoadSource::Vllm, "", Err(LoadError::NoMetrics("vllm"))),
            (
                "an HTML error page",
                LoadSource::Sglang,
                "<html><body>502 Bad Gateway</body></html>",
                Err(LoadError::NoMetrics("sglang")),
            ),
            (
                "a wanted line that breaks the grammar spoils the page",
                LoadSource::Tgi,
                "tgi_queue_size banana\ntgi_batch_current_size 3\n",
                Err(LoadError::Unreadable("line 1: \"banana\" is not a number".into())),
            ),
            (
                "negative and NaN values are skipped, broken unwanted lines ignored",
                LoadSource::Tgi,
                "tgi_batch_current_size -3\ntgi_queue_size NaN\nother{ 1\n",
                Err(LoadError::NoMetrics("tgi")),
            ),
        ];
        for (name, source, page, want) in cases {
            assert_eq!(parse_prometheus(source, page), want, "{name}");
        }
    }

    #[test]
    fn orca_headers_table() {
        let cases: [(&str, Option<LoadReport>); 8] = [
            (
                "TEXT named_metrics.kv_cache_usage_perc=0.4, named_metrics.num_requests_waiting=3.0",
                Some(r(Some(3.0), None, Some(0.4))),
            ),
            (
                "TEXT named_metrics.queue_depth=7, kv_cache_utilization=0.97",
                Some(r(Some(7.0), None, Some(0.97))),
            ),
            (
                "cpu_utilization:0.3, named_metrics.queue_size:2",
                Some(r(Some(2.0), None, None)),
            ),
            (
                r#"JSON {"cpu_utilization": 0.3, "named_metrics": {"kv_cache_usage_perc": 0.5, "num_requests_running": 4}}"#,
                Some(r(None, Some(4.0), Some(0.5))),
            ),
            ("TEXT cpu_utilization=0.3", None),
            ("TEXT named_metrics.queue_depth=lots", None),
            ("BIN CgQIARAB", None),
            ("JSON {not json", None),
        ];
        for (header, want) in cases {
            assert_eq!(parse_orca(header).ok(), want, "{header}");
        }
    }

    #[test]
    fn a_broken_source_is_reported_once_and_reads_as_none() {
        let s = LoadSignals::default();
        let ttl = Duration::from_secs(5);
        assert_eq!(s.current(), None);
        assert_eq!(s.update(Ok(r(Some(3.0), None, Some(0.5))), ttl), None);
        assert_eq!(
            s.current(),
            Some(Load {
                queue_depth: 3.0,
                running: 0.0,
                kv_cache: 0.5
            })
        );
        let broken = || Err(LoadError::NoMetrics("vllm"));
        assert!(matches!(s.update(broken(), ttl), Some(SignalChange::Degraded(_))));
        assert_eq!(s.update(broken(), ttl), None, "warned once, not per scrape");
        assert_eq!(s.current(), None);
        assert_eq!(s.state(), SignalState::Degraded);
        assert_eq!(
            s.update(Ok(r(Some(1.0), None, None)), ttl),
            Some(SignalChange::Recovered)
        );
        let now = Instant::now();
        assert_eq!(s.update_at(Ok(r(Some(1.0), None, None)), ttl, now), None);
        assert!(s.current_at(now + ttl).is_some(), "fresh until its ttl is over");
        assert_eq!(
            s.current_at(now + ttl + Duration::from_millis(5)),
            None,
            "a stale reading is dropped"
        );
    }

    const FIXTURES: [(&str, &str, LoadSource, LoadReport); 5] = [
        (
            "vllm.prom",
            include_str!("fixtures/vllm.prom"),
            LoadSource::Vllm,
            LoadReport {
                queue_depth: Some(7.0),
                running: Some(25.0),
                kv_cache: Some(0.7315271966527197),
            },
        ),
        (
            "vllm_v0.prom",
            include_str!("fixtures/vllm_v0.prom"),
            LoadSource::Vllm,
            LoadReport {
                queue_depth: Some(9.0),
                running: Some(31.0),
                kv_cache: Some(0.9623),
            },
        ),
        (
            "vllm_openmetrics.txt",
            include_str!("fixtures/vllm_openmetrics.txt"),
            LoadSource::Vllm,
            LoadReport {
                queue_depth: Some(0.0),
                running: Some(6.0),
                kv_cache: Some(0.125),
            },
        ),
        (
            "tgi.prom",
            include_str!("fixtures/tgi.prom"),
            LoadSource::Tgi,
            LoadReport {
                queue_depth: Some(17.0),
                running: Some(32.0),
                kv_cache: None,
            },
        ),
        (
            "sglang.prom",
            include_str!("fixtures/sglang.prom"),
            LoadSource::Sglang,
            LoadReport {
                queue_depth: Some(6.0),
                running: Some(21.0),
                kv_cache: Some(0.83),
            },
        ),
    ];

    #[test]
    fn model_server_pages_give_their_load() {
        for (file, page, source, want) in FIXTURES {
            assert_eq!(parse_prometheus(source, page), Ok(want), "{file}");
        }
    }

    #[test]
    fn every_line_of_the_model_server_pages_is_read_strictly() {
        use exposition::Line;
        for (file, page, _, _) in FIXTURES {
            let mut samples = 0;
            for (n, line) in page.lines().enumerate() {
                match exposition::parse_line(line) {
                    Ok(Line::Sample(_)) => samples += 1,
                    Ok(Line::Comment) => panic!("{file}:{}: a comment the reader did not recognise: {line}", n + 1),
                    Ok(_) => {}
                    Err(e) => panic!("{file}:{}: {e}: {line}", n + 1),
                }
            }
            assert!(samples > 10, "{file}: {samples} samples");
        }
    }
}
