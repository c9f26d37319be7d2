//! Criterion benches for the per-request decision path.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use meridian::config::Config;
use meridian::geo::{GeoDb, Locate};
use meridian::route::{self, RequestFacts, RouteTable};

const CONFIG: &str = r#"
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
endpoints = ["http://127.0.0.1:4"]
[[residency]]
name = "uk"
countries = ["GB"]
regions = ["uk-south"]
"#;

fn decision(c: &mut Criterion) {
    let config = Arc::new(Config::parse(CONFIG, None).expect("config"));
    let table = RouteTable::new(config.clone());
    let geo = GeoDb::embedded();
    let mut headers = HeaderMap::new();
    headers.insert("x-forwarded-for", HeaderValue::from_static("81.2.69.142, 10.1.2.3"));
    let peer: IpAddr = "127.0.0.1".parse().expect("ip");

    c.bench_function("client_ip", |b| {
        b.iter(|| meridian::client_ip::client_ip(black_box(peer), black_box(&headers), &config.geoip.trusted_proxies))
    });
    let client: IpAddr = "81.2.69.142".parse().expect("ip");
    c.bench_function("geoip_lookup", |b| b.iter(|| geo.locate(black_box(client))));
    let located = geo.locate(client);
    let empty = HeaderMap::new();
    c.bench_function("route_plan", |b| {
        b.iter(|| {
            let facts = RequestFacts {
                method: &Method::POST,
                path: "/v1/chat/completions",
                headers: &empty,
            };
            route::plan(&table, black_box(located), &facts).map(|p| p.candidates.len())
        })
    });
    c.bench_function("full_decision", |b| {
        b.iter(|| {
            let ip = meridian::client_ip::client_ip(black_box(peer), &headers, &config.geoip.trusted_proxies);
            let located = geo.locate(ip);
            let facts = RequestFacts {
                method: &Method::POST,
                path: "/v1/chat/completions",
                headers: &empty,
            };
            let plan = route::plan(&table, located, &facts).ok()?;
            Some(route::select(&plan, |_| route::RegionState::Available, false, false))
        })
    });
}

criterion_group!(benches, decision);
criterion_main!(benches);
