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

/// The balancer step as the proxy does it: loads from live health (with the slow-start ramp),
/// session affinity when configured, else power of two choices.
pub fn pick(rt: &Runtime, region: usize, headers: &HeaderMap) -> Option<usize> {
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
    if let Some(choice) = meridian::affinity::for_request(rt, region, &loads[..n], headers, None) {
        return choice;
    }
    balance::pick(&loads[..n], |k| fastrand::usize(..k))
}
