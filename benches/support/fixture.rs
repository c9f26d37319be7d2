//! A three-region runtime and one GB request, for the decision bench and the no-allocation
//! test. The decision itself is the library's: the route plan, then the attempt planner over
//! the same live view the proxy uses (`route::attempt::next_attempt` + `LiveView`).

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use meridian::client_ip::client_ip;
use meridian::config::Config;
use meridian::geo::Locate;
use meridian::live_view::LiveView;
use meridian::retry::RetryBudget;
use meridian::route::attempt::{self, Attempt, Policy, Target};
use meridian::route::{self, RequestFacts};
use meridian::runtime::{Shared, Snapshot};

pub const CONFIG: &str = r#"
[geoip]
trusted_proxies = ["127.0.0.1/32", "10.0.0.0/8"]
default_region = "us-east"
[[region]]
name = "us-east"
location = [39.04, -77.49]
countries = ["US", "CA"]
endpoints = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
[[region]]
name = "eu-west"
location = [53.35, -6.26]
countries = ["IE", "FR", "DE"]
endpoints = ["http://127.0.0.1:3"]
[[region]]
name = "uk-south"
location = [51.51, -0.13]
countries = ["GB"]
endpoints = ["http://127.0.0.1:4", "http://127.0.0.1:5", "http://127.0.0.1:6"]
models = ["llama-3.1-70b", "gpt-oss-120b"]
affinity = { prefix_bytes = 2048, max_load_factor = 1.25 }
[[residency]]
name = "uk"
countries = ["GB"]
regions = ["uk-south"]
"#;

/// A GB address in the embedded database, behind one trusted internal hop.
pub const XFF: &str = "81.2.69.142, 10.1.2.3";

pub struct Fixture {
    pub rt: Arc<Snapshot>,
    pub budget: RetryBudget,
    pub peer: IpAddr,
    pub headers: HeaderMap,
    pub method: Method,
}

impl Fixture {
    pub fn new() -> Fixture {
        let config = Config::parse(CONFIG, None).unwrap_or_else(|e| panic!("bench config: {e}"));
        let shared = Shared::new(config).unwrap_or_else(|e| panic!("bench runtime: {e}"));
        let rt = shared.snapshot();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static(XFF));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        Fixture {
            rt,
            budget: RetryBudget::default(),
            peer: IpAddr::from([127, 0, 0, 1]),
            headers,
            method: Method::POST,
        }
    }

    /// The view the proxy's planner reads, for this fixture's request.
    pub fn view(&self) -> LiveView<'_> {
        LiveView {
            rt: &self.rt,
            budget: &self.budget,
            headers: meridian::forward::rewrite::SentFields::client_only(&self.headers),
            body: None,
        }
    }

    /// The whole first-attempt decision for one request; returns (region, endpoint).
    pub fn decide(&self, path: &str) -> Option<(usize, usize)> {
        self.decide_with(path, None)
    }

    /// [`Fixture::decide`] for a chat completion whose JSON `body` names a model: the model
    /// is read in place, the plan filtered to regions serving it, and the pick hashes the
    /// prompt prefix (uk-south has prefix affinity).
    pub fn decide_model(&self, path: &str, body: &[u8]) -> Option<(usize, usize)> {
        self.decide_with(path, Some(body))
    }

    fn decide_with(&self, path: &str, body: Option<&[u8]>) -> Option<(usize, usize)> {
        let rt = &*self.rt;
        let client = client_ip(self.peer, &self.headers, &rt.config.geoip.trusted_proxies);
        let located = rt.geo.locate(client);
        let facts = RequestFacts {
            method: &self.method,
            path,
            headers: &self.headers,
        };
        let mut plan = route::plan(&rt.table, located, &facts).ok()?;
        if let Some(body) = body.filter(|_| route::models::reads_model(&rt.config, &self.method, path)) {
            if let Some(model) = route::models::request_model(body) {
                route::models::filter_plan(
                    &mut plan,
                    |r| rt.region_serves(r, model),
                    rt.regions.len(),
                    rt.fallback.is_some(),
                )
                .ok()?;
            }
        }
        let window = rt.config.health.slow_start;
        let ramp = |r: usize| rt.regions.get(r).map_or(1.0, |region| region.health.ramp(window));
        let skips = attempt::slow_start_skips(&plan, ramp, fastrand::f64);
        let policy = Policy {
            max_attempts: rt.config.retry.max_attempts,
            replay: false,
            body_kept: true,
            panic_mode: rt.config.health.panic_mode,
            slow_start_skips: &skips,
        };
        let view = LiveView { body, ..self.view() };
        match attempt::next_attempt(&view, &plan, &[], &policy, |k| fastrand::usize(..k)) {
            Attempt::Send {
                target: Target::Endpoint { region, endpoint },
                ..
            } => Some((region, endpoint)),
            Attempt::Send { .. } | Attempt::Refuse(_) | Attempt::Stop(_) => None,
        }
    }
}

/// A chat completion body: a system prompt of `system_bytes` bytes, then a question.
pub fn chat_body(system_bytes: usize) -> Vec<u8> {
    let system = "You answer questions about the order history of a bicycle shop. ".repeat(system_bytes / 64 + 1);
    format!(
        r#"{{"model":"llama-3.1-70b","stream":true,"temperature":0.2,"messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":"Where is my order 1234?"}}]}}"#,
        &system[..system_bytes]
    )
    .into_bytes()
}
