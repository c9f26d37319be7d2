//! The per-request decision as `proxy.rs` makes it (client IP → GeoIP → route plan → region
//! → balancer pick), over a real `Runtime`; shared by the decision bench and the no-allocation test.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use meridian::balance::{self, EndpointLoad};
use meridian::client_ip::client_ip;
use meridian::config::Config;
use meridian::geo::Locate;
use meridian::route::{self, Decision, RequestFacts};
use meridian::runtime::{Runtime, Shared};

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
    pub rt: Arc<Runtime>,
    pub peer: IpAddr,
    pub headers: HeaderMap,
    pub method: Method,
}

impl Fixture {
    pub fn new() -> Fixture {
        let config = Config::parse(CONFIG, None).unwrap_or_else(|e| panic!("bench config: {e}"));
        let shared = Shared::new(config).unwrap_or_else(|e| panic!("bench runtime: {e}"));
        let rt = shared.runtime();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static(XFF));
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        Fixture {
            rt,
            peer: IpAddr::from([127, 0, 0, 1]),
            headers,
            method: Method::POST,
        }
    }

    /// The whole decision for one request; returns (region, endpoint).
    pub fn decide(&self, path: &str) -> Option<(usize, usize)> {
        let rt = &*self.rt;
        let client = client_ip(self.peer, &self.headers, &rt.config.geoip.trusted_proxies);
        let located = rt.geo.locate(client);
        let facts = RequestFacts {
            method: &self.method,
            path,
            headers: &self.headers,
        };
        let plan = route::plan(&rt.table, located, &facts).ok()?;
        let decision = route::select(
            &plan,
            |r| rt.region_state(r, |_| false),
            rt.fallback.is_some(),
            rt.config.health.panic_mode,
        );
        let Decision::Region(region) = decision else {
            return None;
        };
        Some((region, pick(rt, region, &self.headers)?))
    }
}

impl Fixture {
    /// [`Fixture::decide`] for a chat completion whose JSON `body` names a model: the model
    /// is read in place, the plan filtered to regions serving it, and the pick hashes the
    /// prompt prefix (uk-south has prefix affinity).
    pub fn decide_model(&self, path: &str, body: &[u8]) -> Option<(usize, usize)> {
        let rt = &*self.rt;
        let client = client_ip(self.peer, &self.headers, &rt.config.geoip.trusted_proxies);
        let located = rt.geo.locate(client);
        let facts = RequestFacts {
            method: &self.method,
            path,
            headers: &self.headers,
        };
        let mut plan = route::plan(&rt.table, located, &facts).ok()?;
        if route::models::reads_model(&rt.config, &self.method, path) {
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
        let decision = route::select(
            &plan,
            |r| rt.region_state(r, |_| false),
            rt.fallback.is_some(),
            rt.config.health.panic_mode,
        );
        let Decision::Region(region) = decision else {
            return None;
        };
        Some((region, pick_with_body(rt, region, &self.headers, Some(body))?))
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

/// The balancer step as the proxy does it: loads from live health (with the slow-start ramp),
/// session affinity when configured, else power of two choices.
pub fn pick(rt: &Runtime, region: usize, headers: &HeaderMap) -> Option<usize> {
    pick_with_body(rt, region, headers, None)
}

/// [`pick`] with the body kept for replay (affinity may read it).
pub fn pick_with_body(rt: &Runtime, region: usize, headers: &HeaderMap, body: Option<&[u8]>) -> Option<usize> {
    let r = rt.regions.get(region)?;
    let mut loads = [EndpointLoad {
        eligible: false,
        latency: 0.0,
        in_flight: 0,
        weight: 1.0,
        queue_depth: 0.0,
        kv_cache: 0.0,
    }; 16];
    let n = r.endpoints.len().min(loads.len());
    for (slot, e) in loads.iter_mut().zip(&r.endpoints) {
        *slot = e.health.load(e.config.weight, rt.config.health.slow_start);
    }
    if let Some(choice) = meridian::affinity::for_request(rt, region, &loads[..n], headers, body) {
        return choice;
    }
    balance::pick(&loads[..n], |k| fastrand::usize(..k))
}
