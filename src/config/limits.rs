//! `[[limit]]` rules and `[limits]` validated into their typed form.

use std::time::Duration;

use http::HeaderName;
use toml::Spanned;

use super::file::{BackendErrorPolicy, LimitFile, LimitsFile};
use super::validate::{Problem, line_of};

/// Keys tracked per rule in local mode when `[limits] max_keys` is not set.
pub(crate) const DEFAULT_MAX_KEYS: usize = 100_000;
/// How long a Redis round trip may take when `[limits] backend.timeout` is not set.
pub(crate) const DEFAULT_BACKEND_TIMEOUT: Duration = Duration::from_millis(5);

/// Whose requests a rule counts together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// The value of a request header (hashed before it is stored).
    Header(HeaderName),
    /// The client address Meridian resolved (trusted `X-Forwarded-For` applied).
    ClientIp,
}

impl std::fmt::Display for LimitKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitKey::Header(h) => write!(f, "header:{h}"),
            LimitKey::ClientIp => f.write_str("client_ip"),
        }
    }
}

/// Requests per second with a burst (GCRA).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub(crate) per_second: f64,
    pub(crate) burst: u32,
}

/// One validated `[[limit]]` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitRule {
    /// `name`: the rule's name in metrics, logs and 429 messages (default `limit[N]`).
    pub name: String,
    pub(crate) key: LimitKey,
    pub(crate) path_prefix: Option<String>,
    pub(crate) model: Option<String>,
    pub(crate) rate: Option<RateLimit>,
    pub(crate) concurrent: Option<u32>,
    pub(crate) tokens_per_minute: Option<u64>,
    pub(crate) on_backend_error: BackendErrorPolicy,
}

/// `[limits]`: where counters live and how many keys a process keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    pub(crate) backend: Option<LimitsBackend>,
    pub(crate) max_keys: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: None,
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
}

/// The shared counter store of fleet mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsBackend {
    pub(crate) redis: String,
    pub(crate) timeout: Duration,
}

/// Validates every rule and the `[limits]` table; problems name their key path.
pub(super) fn validate(
    text: &str,
    rules: Vec<LimitFile>,
    limits: Option<LimitsFile>,
) -> (Vec<LimitRule>, LimitsConfig, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut problem = |key: String, span: Option<std::ops::Range<usize>>, message: String| {
        problems.push(Problem {
            key,
            line: span.map(|s| line_of(text, &s)),
            message,
        });
    };
    let mut out = Vec::with_capacity(rules.len());
    let mut names = std::collections::HashSet::new();
    for (i, r) in rules.into_iter().enumerate() {
        let at = format!("limit[{i}]");
        let name = r.name.clone().unwrap_or_else(|| at.clone());
        if name.is_empty() || !names.insert(name.clone()) {
            problem(
                format!("{at}.name"),
                None,
                format!("{name:?} must be a non-empty name no other rule has"),
            );
        }
        let key = match parse_key(&r.key) {
            Ok(k) => k,
            Err(message) => {
                problem(format!("{at}.key"), Some(r.key.span()), message);
                continue;
            }
        };
        let rate = match (r.requests_per_second, r.burst) {
            (None, None) => None,
            (None, Some(_)) => {
                problem(format!("{at}.burst"), None, "burst needs requests_per_second".into());
                None
            }
            (Some(rps), burst) => {
                if !(rps.is_finite() && rps > 0.0) {
                    problem(
                        format!("{at}.requests_per_second"),
                        None,
                        format!("{rps} must be a number greater than zero"),
                    );
                }
                // Without a burst, one second's worth may arrive together.
                let burst = burst.unwrap_or_else(|| rps.ceil().clamp(1.0, u32::MAX as f64) as u32);
                if burst == 0 {
                    problem(format!("{at}.burst"), None, "must be at least 1".into());
                }
                Some(RateLimit { per_second: rps, burst })
            }
        };
        if r.concurrent == Some(0) {
            problem(format!("{at}.concurrent"), None, "must be at least 1".into());
        }
        if r.tokens_per_minute == Some(0) {
            problem(format!("{at}.tokens_per_minute"), None, "must be at least 1".into());
        }
        if rate.is_none() && r.concurrent.is_none() && r.tokens_per_minute.is_none() {
            problem(
                at.clone(),
                Some(r.key.span()),
                "sets no limit: give requests_per_second, concurrent or tokens_per_minute".into(),
            );
        }
        let matches = r.matches.unwrap_or_default();
        if let Some(p) = &matches.path_prefix {
            if !p.starts_with('/') {
                problem(
                    format!("{at}.match.path_prefix"),
                    None,
                    format!("{p:?} must start with '/'"),
                );
            }
        }
        out.push(LimitRule {
            name,
            key,
            path_prefix: matches.path_prefix,
            model: matches.model,
            rate,
            concurrent: r.concurrent,
            tokens_per_minute: r.tokens_per_minute,
            on_backend_error: r.on_backend_error.unwrap_or_default(),
        });
    }
    let limits = limits.unwrap_or_default();
    let max_keys = limits.max_keys.unwrap_or(DEFAULT_MAX_KEYS);
    if max_keys == 0 {
        problem("limits.max_keys".into(), None, "must be at least 1".into());
    }
    let backend = limits.backend.map(|b| {
        let url = b.redis.get_ref();
        if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
            problem(
                "limits.backend.redis".into(),
                Some(b.redis.span()),
                format!("{url:?} is not a URL like \"redis://127.0.0.1:6379\""),
            );
        }
        let timeout = b.timeout.map_or(DEFAULT_BACKEND_TIMEOUT, |t| t.0);
        if timeout.is_zero() {
            problem(
                "limits.backend.timeout".into(),
                None,
                "must be greater than zero".into(),
            );
        }
        LimitsBackend {
            redis: b.redis.into_inner(),
            timeout,
        }
    });
    (out, LimitsConfig { backend, max_keys }, problems)
}

fn parse_key(key: &Spanned<String>) -> Result<LimitKey, String> {
    let k = key.get_ref().trim();
    if k == "client_ip" {
        return Ok(LimitKey::ClientIp);
    }
    match k.strip_prefix("header:") {
        Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
            .map(LimitKey::Header)
            .map_err(|_| format!("{name:?} is not a header name")),
        None => Err(format!("{k:?} is not a key: write \"client_ip\" or \"header:NAME\"")),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const REGION: &str = "[[region]]\nname = \"eu\"\nlocation = [50.1, 8.7]\ncountries = [\"DE\"]\nendpoints = [\"http://127.0.0.1:9\"]\n";

    fn problems(extra: &str) -> Vec<String> {
        match Config::parse(&format!("{REGION}{extra}"), None) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems.iter().map(|p| format!("{}: {}", p.key, p.message)).collect(),
        }
    }

    #[test]
    fn a_full_rule_parses() {
        let text = format!(
            "{REGION}[[limit]]\nname = \"per-key\"\nkey = \"header:Authorization\"\nmatch = {{ path_prefix = \"/v1/\", model = \"m\" }}\nrequests_per_second = 10\nburst = 20\nconcurrent = 8\ntokens_per_minute = 200000\non_backend_error = \"deny\"\n\n[limits]\nbackend = {{ redis = \"redis://127.0.0.1:6379\", timeout = \"5ms\" }}\nmax_keys = 10\n"
        );
        let c = Config::parse(&text, None).unwrap_or_else(|e| panic!("{e}"));
        let r = &c.limit_rules[0];
        assert_eq!(r.key.to_string(), "header:authorization");
        assert_eq!(r.rate.map(|r| (r.per_second, r.burst)), Some((10.0, 20)));
        assert_eq!(r.path_prefix.as_deref(), Some("/v1/"));
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.on_backend_error, crate::config::BackendErrorPolicy::Deny);
        assert_eq!(c.limits.max_keys, 10);
        assert_eq!(
            c.limits.backend.as_ref().map(|b| b.timeout),
            Some(std::time::Duration::from_millis(5))
        );
    }

    #[test]
    fn defaults_burst_name_and_policy() {
        let c = Config::parse(
            &format!("{REGION}[[limit]]\nkey = \"client_ip\"\nrequests_per_second = 2.5\n"),
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let r = &c.limit_rules[0];
        assert_eq!(r.name, "limit[0]");
        assert_eq!(r.rate.map(|r| r.burst), Some(3));
        assert_eq!(r.on_backend_error, crate::config::BackendErrorPolicy::Allow);
        assert!(c.limits.backend.is_none());
    }

    #[test]
    fn bad_rules_name_their_key_path() {
        let cases = [
            ("[[limit]]\nkey = \"cookie:x\"\nconcurrent = 1\n", "limit[0].key"),
            ("[[limit]]\nkey = \"client_ip\"\n", "limit[0]: sets no limit"),
            ("[[limit]]\nkey = \"client_ip\"\nburst = 3\n", "limit[0].burst"),
            (
                "[[limit]]\nkey = \"client_ip\"\nrequests_per_second = 0\n",
                "limit[0].requests_per_second",
            ),
            (
                "[[limit]]\nkey = \"client_ip\"\nconcurrent = 0\n",
                "limit[0].concurrent",
            ),
            (
                "[[limit]]\nkey = \"client_ip\"\nconcurrent = 1\nrate = 3\n",
                "unknown field",
            ),
            (
                "[[limit]]\nkey = \"client_ip\"\nconcurrent = 1\nmatch = { path = \"/\" }\n",
                "unknown field",
            ),
            (
                "[[limit]]\nname = \"a\"\nkey = \"client_ip\"\nconcurrent = 1\n[[limit]]\nname = \"a\"\nkey = \"client_ip\"\nconcurrent = 1\n",
                "limit[1].name",
            ),
            (
                "[limits]\nbackend = { redis = \"localhost:6379\" }\n",
                "limits.backend.redis",
            ),
            ("[limits]\nmax_keys = 0\n", "limits.max_keys"),
            (
                "[limits]\nbackend = { redis = \"redis://x\", tls = true }\n",
                "unknown field",
            ),
        ];
        for (text, want) in cases {
            let got = problems(text);
            assert!(got.iter().any(|p| p.contains(want)), "{text:?}: {got:?}");
        }
    }
}
