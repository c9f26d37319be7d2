//! Admission control: whether a request may go on, by the `[[limit]]` rules it meets.
//!
//! `rule` finds the rules a request meets and their keys; `local` counts in the process
//! (default), `redis` in Redis for a fleet. Every applicable rule is checked and the
//! tightest decides: a request is admitted only when every rule admits it, and a refusal
//! takes back what the other rules had counted. An admitted request holds an [`Admitted`]
//! for as long as its answer: dropping it frees its concurrency slots, and the answer's
//! tokens are charged through it.

pub(crate) mod local;
pub(crate) mod redis;
pub(crate) mod rule;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Response};
use prometheus::IntCounter;

use crate::config::{BackendErrorPolicy, Config, LimitRule, LimitsConfig};
use crate::error::ProxyError;
use crate::forward::body::{Completion, ResponseBody, StreamEnd};
use crate::forward::usage::Scanned;
use crate::observe::metrics::Metrics;
use local::{Costs, Entry, Table};
use redis::{BackendMetrics, Fleet, FleetKey};
pub use rule::{KeyValue, RequestView, key_of};

/// Which of a rule's limits refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// The rule's `requests_per_second` rate (with its `burst`) is spent.
    Requests,
    /// The key already has the rule's `concurrent` requests in flight.
    Concurrent,
    /// The key's `tokens_per_minute` budget is spent.
    Tokens,
    /// The shared counter store did not answer and the rule fails closed.
    Backend,
}

impl LimitKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Concurrent => "concurrent requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Backend => "limit backend unavailable",
        }
    }
}

/// The numbers of one `x-ratelimit-*` family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// Until the quota is whole again.
    pub reset: Duration,
}

/// What one rule said about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleOutcome {
    pub(crate) rule: usize,
    pub(crate) denied: Option<(LimitKind, Duration)>,
    pub(crate) requests: Option<Quota>,
    pub(crate) tokens: Option<Quota>,
}

impl RuleOutcome {
    pub(crate) fn admitted(rule: usize) -> RuleOutcome {
        RuleOutcome {
            rule,
            denied: None,
            requests: None,
            tokens: None,
        }
    }

    pub(crate) fn deny(&mut self, kind: LimitKind, wait: Duration) {
        self.denied = Some((kind, wait));
    }
}

/// The `x-ratelimit-*` headers of an answer: the tightest quota of each family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub(crate) requests: Option<Quota>,
    pub(crate) tokens: Option<Quota>,
}

static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

impl RateHeaders {
    /// The tightest quotas among `outcomes`: fewest remaining, then smallest limit.
    pub(crate) fn tightest<'a>(outcomes: impl IntoIterator<Item = &'a RuleOutcome>) -> RateHeaders {
        let pick = |q: Option<Quota>, best: Option<Quota>| match (q, best) {
            (Some(q), Some(b)) if (q.remaining, q.limit) < (b.remaining, b.limit) => Some(q),
            (Some(q), None) => Some(q),
            (_, b) => b,
        };
        outcomes.into_iter().fold(RateHeaders::default(), |h, o| RateHeaders {
            requests: pick(o.requests, h.requests),
            tokens: pick(o.tokens, h.tokens),
        })
    }

    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        let families = [
            (self.requests, &LIMIT_REQUESTS, &REMAINING_REQUESTS, &RESET_REQUESTS),
            (self.tokens, &LIMIT_TOKENS, &REMAINING_TOKENS, &RESET_TOKENS),
        ];
        for (quota, limit, remaining, reset) in families {
            let Some(q) = quota else { continue };
            headers.insert(limit.clone(), HeaderValue::from(q.limit));
            headers.insert(remaining.clone(), HeaderValue::from(q.remaining));
            if let Ok(v) = HeaderValue::from_str(&reset_text(q.reset)) {
                headers.insert(reset.clone(), v);
            }
        }
    }
}

/// A reset time the way OpenAI writes it: "250ms", "1.5s", "59s".
pub(crate) fn reset_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let s = format!("{:.3}", d.as_secs_f64());
    format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
}

/// A refused request: which rule and limit, and when to come back.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub(crate) rule: String,
    pub(crate) limit: LimitKind,
    pub(crate) retry_after: Duration,
    /// The `x-ratelimit-*` headers to put on the 429.
    pub headers: RateHeaders,
}

impl Limited {
    pub(crate) fn error(&self) -> ProxyError {
        ProxyError::RateLimited {
            rule: self.rule.clone(),
            limit: self.limit.as_str(),
            retry_after: self.retry_after,
        }
    }
}

/// The decision for one request.
pub enum Verdict {
    /// No rule applies.
    Unlimited,
    /// Every matching rule admitted it; the request holds its slots until its answer ends.
    Admitted(Admitted),
    /// A rule refused it: answered 429 with `Retry-After`.
    Limited(Limited),
}

/// What an admitted request holds until its answer ends.
enum Hold {
    Local { table: Arc<Table>, entry: Arc<Entry> },
    Fleet(FleetKey),
}

/// An admitted request's slots and budgets. Dropping it frees its concurrency slots, on
/// every end of the request: completion, client gone, upstream failure, or an answer that
/// never reached the client.
pub struct Admitted {
    /// Each counting rule's outcome and what it holds (nothing when Redis failed open).
    counted: Vec<(RuleOutcome, Option<Hold>)>,
    fleet: Option<(Arc<Fleet>, String)>,
    /// The `x-ratelimit-*` headers to put on the answer.
    pub headers: RateHeaders,
}

impl Admitted {
    /// Charges the answer's tokens to every token budget the request counted against.
    pub(crate) fn charge_tokens(&self, tokens: u64) {
        for (_, h) in &self.counted {
            match h {
                None => {}
                Some(Hold::Local { table, entry }) => entry.charge(&table.costs, tokens, table.now()),
                Some(Hold::Fleet(k)) => {
                    if let Some((fleet, _)) = &self.fleet {
                        fleet.charge(k.base.clone(), k.costs, tokens);
                    }
                }
            }
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut bases = Vec::new();
        for (_, h) in &self.counted {
            match h {
                Some(Hold::Local { table, entry }) if table.costs.concurrent > 0 => entry.release(),
                Some(Hold::Fleet(k)) if k.costs.concurrent > 0 => bases.push(k.base.clone()),
                Some(Hold::Local { .. } | Hold::Fleet(_)) | None => {}
            }
        }
        if let Some((fleet, member)) = self.fleet.take() {
            fleet.release(bases, member);
        }
    }
}

/// Cannot set up admission control.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    /// The Redis backend of `[limits]` could not be set up.
    #[error("limits.backend.redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

struct CompiledRule {
    config: LimitRule,
    costs: Costs,
    /// Local mode's counters; `None` in fleet mode.
    table: Option<Arc<Table>>,
    admitted: IntCounter,
    limited: IntCounter,
}

/// The compiled rules of one config and where they count.
pub struct Admission {
    rules: Vec<CompiledRule>,
    fleet: Option<Arc<Fleet>>,
    max_keys: usize,
    /// Some rule matches on the body's `model`: only then is the body parsed.
    pub(crate) needs_model: bool,
}

impl Admission {
    /// Compiles the rules of `config`; counters of rules that did not change are kept from
    /// `previous`, so a reload does not hand every key a fresh burst.
    pub fn new(config: &Config, metrics: &Metrics, previous: Option<&Admission>) -> Result<Admission, AdmissionError> {
        let limits = &config.limits;
        let fleet = match (&limits.backend, previous.and_then(|p| p.fleet.as_ref())) {
            (None, _) => None,
            (Some(b), Some(f)) if f.config == *b => Some(f.clone()),
            (Some(b), _) => {
                let errors = &metrics.admission_backend_errors;
                Some(Fleet::new(
                    b,
                    BackendMetrics {
                        timeouts: errors.with_label_values(&["timeout"]),
                        errors: errors.with_label_values(&["error"]),
                        replies: errors.with_label_values(&["reply"]),
                        duration: metrics.admission_backend_duration.clone(),
                    },
                )?)
            }
        };
        let rules = config
            .limit_rules
            .iter()
            .map(|r| {
                let costs = Costs::of(r);
                let table = fleet.is_none().then(|| {
                    previous
                        .filter(|p| p.fleet.is_none() && p.max_keys == limits.max_keys)
                        .and_then(|p| p.rules.iter().find(|old| old.config == *r))
                        .and_then(|old| old.table.clone())
                        .unwrap_or_else(|| {
                            Arc::new(Table::new(
                                costs,
                                limits.max_keys,
                                metrics.admission_keys.with_label_values(&[&r.name]),
                                metrics.admission_evictions.with_label_values(&[&r.name]),
                            ))
                        })
                });
                CompiledRule {
                    config: r.clone(),
                    costs,
                    table,
                    admitted: metrics.admission_requests.with_label_values(&[&r.name, "admitted"]),
                    limited: metrics.admission_requests.with_label_values(&[&r.name, "limited"]),
                }
            })
            .collect::<Vec<_>>();
        Ok(Admission {
            needs_model: rules.iter().any(|r| r.config.model.is_some()),
            rules,
            fleet,
            max_keys: limits.max_keys,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Decides for one request; in fleet mode at most one Redis round trip, bounded by the
    /// backend timeout.
    pub async fn admit(&self, req: &RequestView<'_>) -> Verdict {
        if self.rules.is_empty() {
            return Verdict::Unlimited;
        }
        match &self.fleet {
            None => self.admit_local(req),
            Some(fleet) => self.admit_fleet(fleet, req).await,
        }
    }

    /// Local mode: no await, no allocation for a request no rule applies to.
    pub fn admit_local(&self, req: &RequestView<'_>) -> Verdict {
        let mut counted = Vec::new();
        let mut now = None;
        for (i, r) in self.rules.iter().enumerate() {
            let (Some(table), Some(key)) = (&r.table, key_of(&r.config, req)) else {
                continue;
            };
            // One reading of the clock for every rule of the request.
            let now = *now.get_or_insert_with(local::clock);
            let entry = table.entry(rule::local_hash(&table.hasher, key), now);
            let outcome = entry.admit(&r.costs, now, i);
            counted.push((
                outcome,
                Some(Hold::Local {
                    table: table.clone(),
                    entry,
                }),
            ));
        }
        if counted.is_empty() {
            return Verdict::Unlimited;
        }
        self.conclude(counted, None)
    }

    async fn admit_fleet(&self, fleet: &Arc<Fleet>, req: &RequestView<'_>) -> Verdict {
        let keys: Vec<FleetKey> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                key_of(&r.config, req).map(|key| FleetKey {
                    rule: i,
                    base: format!("meridian:limit:{}", rule::fleet_hash(&r.config.name, key)),
                    costs: r.costs,
                })
            })
            .collect();
        if keys.is_empty() {
            return Verdict::Unlimited;
        }
        let member = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        match fleet.admit(&keys, &member).await {
            Ok(outcomes) => {
                let counted = outcomes.into_iter().zip(keys).map(|(o, k)| (o, Some(Hold::Fleet(k))));
                self.conclude(counted.collect(), Some((fleet.clone(), member)))
            }
            Err(_) => {
                // Each rule fails open or closed on its own; open rules count nothing.
                let counted = keys
                    .iter()
                    .map(|k| {
                        let mut o = RuleOutcome::admitted(k.rule);
                        if self.rules[k.rule].config.on_backend_error == BackendErrorPolicy::Deny {
                            o.deny(LimitKind::Backend, Duration::from_secs(1));
                        }
                        (o, None)
                    })
                    .collect();
                self.conclude(counted, None)
            }
        }
    }

    /// Admitted when every rule admitted; otherwise takes back what the admitting rules
    /// counted (the request never runs) and reports the longest wait.
    fn conclude(&self, counted: Vec<(RuleOutcome, Option<Hold>)>, fleet: Option<(Arc<Fleet>, String)>) -> Verdict {
        let headers = RateHeaders::tightest(counted.iter().map(|(o, _)| o));
        let refusal = counted
            .iter()
            .filter_map(|(o, _)| o.denied.map(|(kind, wait)| (o.rule, kind, wait)))
            .max_by_key(|(_, _, wait)| *wait);
        let Some((rule, limit, retry_after)) = refusal else {
            for (o, _) in &counted {
                self.rules[o.rule].admitted.inc();
            }
            return Verdict::Admitted(Admitted {
                counted,
                fleet,
                headers,
            });
        };
        for (o, h) in &counted {
            match (o.denied, h) {
                (None, Some(Hold::Local { table, entry })) => entry.undo(&table.costs),
                (Some(_), _) => self.rules[o.rule].limited.inc(),
                // In fleet mode the script committed nothing for a refused request.
                (None, Some(Hold::Fleet(_)) | None) => {}
            }
        }
        drop(fleet);
        Verdict::Limited(Limited {
            rule: self.rules[rule].config.name.clone(),
            limit,
            retry_after,
            headers,
        })
    }
}

/// Keeps an admission for exactly as long as the relayed body it is attached to.
struct Held {
    inner: Box<dyn Completion>,
    admitted: Admitted,
}

impl Completion for Held {
    fn complete(self: Box<Self>, end: StreamEnd, bytes: u64, scanned: Scanned) {
        let Held { inner, admitted } = *self;
        // Prompt + output tokens as the answer reported them (its `usage`, or a stream's
        // data events when it reported none); an answer that counted nothing costs nothing.
        let answer_tokens = match (scanned.usage.prompt_tokens, scanned.output_tokens) {
            (None, None) => None,
            (prompt, output) => Some(prompt.unwrap_or(0) + output.unwrap_or(0)),
        };
        inner.complete(end, bytes, scanned);
        if let Some(n) = answer_tokens {
            admitted.charge_tokens(n);
        }
        // `admitted` drops here: its concurrency slots are free.
    }
}

/// Puts the rate headers on an answer and ties the admission to its body: released when
/// the body ends or is dropped; at once for an answer Meridian wrote itself.
pub(crate) fn attach(mut resp: Response<ResponseBody>, admitted: Option<Admitted>) -> Response<ResponseBody> {
    let Some(admitted) = admitted else { return resp };
    admitted.headers.apply(resp.headers_mut());
    if let ResponseBody::Upstream(body) = resp.body_mut() {
        body.wrap_completion(move |inner| Box::new(Held { inner, admitted }));
    }
    resp
}

/// Puts the rate headers on a `101` and hands back the admission, for the bridge to hold
/// until the upgraded session (a WebSocket) closes: a concurrency limit then counts open
/// sessions, where the empty `101` body would free the slot at once.
pub(crate) fn attach_session(
    mut resp: Response<ResponseBody>,
    admitted: Option<Admitted>,
) -> (Response<ResponseBody>, Option<Admitted>) {
    if let Some(admitted) = &admitted {
        admitted.headers.apply(resp.headers_mut());
    }
    (resp, admitted)
}

/// The rules as `meridian check` prints them.
pub fn describe(rules: &[LimitRule], limits: &LimitsConfig) -> String {
    let mut out = String::new();
    if rules.is_empty() {
        return out;
    }
    let mode = match &limits.backend {
        Some(b) => format!("redis, timeout {:?}", b.timeout),
        None => format!("local, max_keys {}", limits.max_keys),
    };
    let _ = writeln!(out, "limits ({mode}):");
    for r in rules {
        let mut what = Vec::new();
        if let Some(rate) = r.rate {
            what.push(format!("{} req/s burst {}", rate.per_second, rate.burst));
        }
        if let Some(c) = r.concurrent {
            what.push(format!("{c} concurrent"));
        }
        if let Some(t) = r.tokens_per_minute {
            what.push(format!("{t} tokens/min"));
        }
        let mut scope = String::new();
        if let Some(p) = &r.path_prefix {
            let _ = write!(scope, " path {p}*");
        }
        if let Some(m) = &r.model {
            let _ = write!(scope, " model {m}");
        }
        let policy = match r.on_backend_error {
            BackendErrorPolicy::Allow => "allow",
            BackendErrorPolicy::Deny => "deny",
        };
        let _ = writeln!(
            out,
            "  {}: key {}{scope}: {}; on backend error {policy}",
            r.name,
            r.key,
            what.join(", ")
        );
    }
    out
}

/// Which rules a request would meet, as `meridian route` prints them.
pub fn explain(rules: &[LimitRule], req: &RequestView<'_>) -> Vec<String> {
    rules
        .iter()
        .map(|r| match key_of(r, req) {
            Some(_) => format!("limit {}: counted under {}", r.name, r.key),
            None => {
                let why = if r
                    .path_prefix
                    .as_ref()
                    .is_some_and(|p| !req.path.starts_with(p.as_str()))
                {
                    "path outside its prefix".to_string()
                } else if r.model.is_some() && req.model != r.model.as_deref() {
                    "another model".to_string()
                } else {
                    format!("no {} in the request", r.key)
                };
                format!("limit {}: not counted ({why})", r.name)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::sync::Mutex;

    use crate::test_fixtures::TestResult;

    const REGION: &str = "[[region]]\nname = \"eu\"\nlocation = [50.1, 8.7]\ncountries = [\"DE\"]\nendpoints = [\"http://127.0.0.1:9\"]\n";

    fn admission(rules: &str) -> (Admission, Metrics) {
        let config = Config::parse(&format!("{REGION}{rules}"), None).unwrap_or_else(|e| panic!("{e}"));
        let metrics = Metrics::new();
        let a = Admission::new(&config, &metrics, None).unwrap_or_else(|e| panic!("{e}"));
        (a, metrics)
    }

    fn view<'a>(headers: &'a HeaderMap, ip: &str) -> RequestView<'a> {
        RequestView {
            client_ip: ip.parse::<IpAddr>().unwrap_or_else(|e| panic!("{ip}: {e}")),
            path: "/v1/chat/completions",
            headers: crate::forward::rewrite::SentFields::client_only(headers),
            model: None,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn admitted(v: Verdict) -> Option<Admitted> {
        match v {
            Verdict::Admitted(a) => Some(a),
            Verdict::Unlimited | Verdict::Limited(_) => None,
        }
    }

    #[test]
    fn requests_without_the_key_are_not_counted() {
        let (a, _) = admission("[[limit]]\nkey = \"header:x-tenant\"\nconcurrent = 1\n");
        let none = headers(&[]);
        for _ in 0..3 {
            assert!(matches!(a.admit_local(&view(&none, "192.0.2.1")), Verdict::Unlimited));
        }
    }

    #[test]
    fn the_tightest_rule_decides_and_a_refusal_takes_back_the_others() {
        let (a, m) = admission(
            "[[limit]]\nname = \"ip\"\nkey = \"client_ip\"\nrequests_per_second = 0.001\nburst = 5\n\
             [[limit]]\nname = \"tenant\"\nkey = \"header:x-tenant\"\nrequests_per_second = 0.001\nburst = 1\n",
        );
        let t = headers(&[("x-tenant", "acme")]);
        let first = admitted(a.admit_local(&view(&t, "192.0.2.1")));
        assert_eq!(
            first.map(|f| f.headers.requests.map(|q| (q.limit, q.remaining))),
            Some(Some((1, 0))),
            "the tenant's quota is the tighter one"
        );
        match a.admit_local(&view(&t, "192.0.2.1")) {
            Verdict::Limited(l) => {
                assert_eq!(l.rule, "tenant");
                assert_eq!(l.limit, LimitKind::Requests);
                assert!(l.retry_after > Duration::from_secs(900));
            }
            _ => panic!("second request of the tenant must be limited"),
        }
        // The refused request did not spend the IP's burst: 4 more fit, then it is spent.
        let anon = headers(&[]);
        for i in 0..4 {
            assert!(admitted(a.admit_local(&view(&anon, "192.0.2.1"))).is_some(), "{i}");
        }
        assert!(matches!(a.admit_local(&view(&anon, "192.0.2.1")), Verdict::Limited(_)));
        let text = m.render();
        assert!(
            text.contains(r#"meridian_admission_requests_total{result="limited",rule="tenant"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"meridian_admission_requests_total{result="admitted",rule="ip"} 5"#),
            "{text}"
        );
    }

    /// A completion that records how it ended.
    struct Probe(Arc<Mutex<Vec<StreamEnd>>>);
    impl Completion for Probe {
        fn complete(self: Box<Self>, end: StreamEnd, _bytes: u64, _scanned: Scanned) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(end);
        }
    }

    #[test]
    fn concurrency_is_released_on_every_end_of_a_request() -> TestResult {
        let (a, _) = admission("[[limit]]\nkey = \"client_ip\"\nconcurrent = 1\n");
        let h = headers(&[]);
        let ends = [
            StreamEnd::Complete,
            StreamEnd::ClientGone,
            StreamEnd::UpstreamError,
            StreamEnd::Stalled,
        ];
        for end in ends {
            let held = admitted(a.admit_local(&view(&h, "192.0.2.9"))).ok_or("admitted")?;
            assert!(
                matches!(a.admit_local(&view(&h, "192.0.2.9")), Verdict::Limited(_)),
                "{end:?}"
            );
            let seen = Arc::new(Mutex::new(Vec::new()));
            let c: Box<dyn Completion> = Box::new(Held {
                inner: Box::new(Probe(seen.clone())),
                admitted: held,
            });
            let scanned = crate::forward::usage::UsageScanner::for_response(None, Some(0), true, 0).finish();
            c.complete(end, 0, scanned);
            assert_eq!(
                *seen.lock().map_err(|e| e.to_string())?,
                vec![end],
                "the inner completion runs"
            );
            let again = admitted(a.admit_local(&view(&h, "192.0.2.9")));
            assert!(again.is_some(), "released after {end:?}");
        }
        // A body dropped before any end (the answer never left) releases too.
        let held = admitted(a.admit_local(&view(&h, "192.0.2.9"))).ok_or("admitted")?;
        drop(Box::new(Held {
            inner: Box::new(Probe(Arc::new(Mutex::new(Vec::new())))),
            admitted: held,
        }));
        assert!(admitted(a.admit_local(&view(&h, "192.0.2.9"))).is_some());
        Ok(())
    }

    #[test]
    fn charged_tokens_stop_admission_until_they_refill() -> TestResult {
        let (a, _) = admission("[[limit]]\nkey = \"header:authorization\"\ntokens_per_minute = 1000\n");
        let h = headers(&[("authorization", "Bearer k")]);
        let first = admitted(a.admit_local(&view(&h, "192.0.2.1"))).ok_or("under budget")?;
        assert_eq!(first.headers.tokens.map(|q| q.remaining), Some(1000));
        first.charge_tokens(400);
        let second = admitted(a.admit_local(&view(&h, "192.0.2.1"))).ok_or("still under")?;
        let left = second.headers.tokens.map_or(0, |q| q.remaining);
        assert!((599..=600).contains(&left), "{left}");
        second.charge_tokens(700);
        match a.admit_local(&view(&h, "192.0.2.1")) {
            Verdict::Limited(l) => {
                assert_eq!(l.limit, LimitKind::Tokens);
                // 100 tokens past the budget of 1000/min: about 6 s.
                assert!(l.retry_after > Duration::from_secs(5) && l.retry_after <= Duration::from_secs(6));
            }
            _ => panic!("over budget"),
        }
        // Another key has its own budget.
        let other = headers(&[("authorization", "Bearer other")]);
        assert!(admitted(a.admit_local(&view(&other, "192.0.2.1"))).is_some());
        Ok(())
    }

    #[test]
    fn counters_survive_a_reload_of_unchanged_rules() -> TestResult {
        let text = "[[limit]]\nkey = \"client_ip\"\nrequests_per_second = 0.001\nburst = 1\n";
        let (a, m) = admission(text);
        let h = headers(&[]);
        assert!(admitted(a.admit_local(&view(&h, "192.0.2.1"))).is_some());
        let config = Config::parse(&format!("{REGION}{text}"), None)?;
        let b = Admission::new(&config, &m, Some(&a))?;
        assert!(matches!(b.admit_local(&view(&h, "192.0.2.1")), Verdict::Limited(_)));
        let changed = Config::parse(&format!("{REGION}{}", text.replace("burst = 1", "burst = 2")), None)?;
        let c = Admission::new(&changed, &m, Some(&b))?;
        assert!(
            admitted(c.admit_local(&view(&h, "192.0.2.1"))).is_some(),
            "a changed rule starts fresh"
        );
        Ok(())
    }

    #[test]
    fn headers_and_reset_text() -> TestResult {
        let cases = [
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1.5s"),
            (Duration::from_secs(59), "59s"),
            (Duration::ZERO, "0ms"),
        ];
        for (d, want) in cases {
            assert_eq!(reset_text(d), want);
        }
        let mut h = HeaderMap::new();
        RateHeaders {
            requests: Some(Quota {
                limit: 10,
                remaining: 3,
                reset: Duration::from_millis(700),
            }),
            tokens: None,
        }
        .apply(&mut h);
        assert_eq!(
            h.get("x-ratelimit-limit-requests")
                .ok_or("x-ratelimit-limit-requests")?,
            "10"
        );
        assert_eq!(
            h.get("x-ratelimit-remaining-requests")
                .ok_or("x-ratelimit-remaining-requests")?,
            "3"
        );
        assert_eq!(
            h.get("x-ratelimit-reset-requests")
                .ok_or("x-ratelimit-reset-requests")?,
            "700ms"
        );
        assert!(h.get("x-ratelimit-limit-tokens").is_none());
        Ok(())
    }

    #[test]
    fn describe_and_explain() {
        let config = Config::parse(
            &format!(
                "{REGION}[[limit]]\nname = \"per-key\"\nkey = \"header:authorization\"\nmatch = {{ path_prefix = \"/v1/\" }}\nrequests_per_second = 10\nburst = 20\ntokens_per_minute = 1000\n[[limit]]\nname = \"tenant\"\nkey = \"header:x-tenant\"\nconcurrent = 4\non_backend_error = \"deny\"\n"
            ),
            None,
        )
        .unwrap();
        let text = describe(&config.limit_rules, &config.limits);
        assert!(text.contains("limits (local, max_keys 100000):"), "{text}");
        assert!(
            text.contains("per-key: key header:authorization path /v1/*: 10 req/s burst 20, 1000 tokens/min; on backend error allow"),
            "{text}"
        );
        assert!(
            text.contains("tenant: key header:x-tenant: 4 concurrent; on backend error deny"),
            "{text}"
        );
        let h = headers(&[("authorization", "Bearer k")]);
        let lines = explain(&config.limit_rules, &view(&h, "192.0.2.1"));
        assert_eq!(
            lines,
            [
                "limit per-key: counted under header:authorization",
                "limit tenant: not counted (no header:x-tenant in the request)"
            ]
        );
    }
}
