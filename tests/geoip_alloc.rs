//! A city-database lookup and the per-client distance order must not allocate: a counting
//! global allocator watches this thread while it locates and plans.

use std::net::IpAddr;

use http::{HeaderMap, Method};
use meridian::config::Config;
use meridian::geo::{GeoDb, Locate, Located};
use meridian::route::{self, RequestFacts, RouteTable};

#[path = "support/mmdb.rs"]
#[allow(dead_code)]
mod mmdb;

use mmdb::{Value, Writer, map, s};

#[path = "support/alloc.rs"]
mod alloc;

use alloc::allocations;

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

#[test]
fn city_lookups_and_the_per_client_order_do_not_allocate() {
    let dir = tempfile::tempdir().unwrap();
    let v4 = dir.path().join("city-ipv4.mmdb");
    Writer::new(4, "GeoLite2-City", 1)
        // GeoIP2 shape: nested maps, a subdivisions list, names to skip.
        .insert(
            "13.56.0.0/16",
            map(&[
                ("city", map(&[("names", map(&[("en", s("San Jose"))]))])),
                ("country", map(&[("iso_code", s("US"))])),
                (
                    "subdivisions",
                    Value::Array(vec![
                        map(&[("iso_code", s("CA")), ("names", map(&[("en", s("California"))]))]),
                        map(&[("iso_code", s("XX"))]),
                    ]),
                ),
                (
                    "location",
                    map(&[
                        ("accuracy_radius", Value::U16(20)),
                        ("latitude", Value::Double(37.3388)),
                        ("longitude", Value::Double(-121.8916)),
                    ]),
                ),
            ]),
        )
        // ip-location-db shape: flat, 32-bit coordinates.
        .insert(
            "52.0.0.0/15",
            map(&[
                ("country_code", s("US")),
                ("latitude", Value::Float(39.0469)),
                ("longitude", Value::Float(-77.4903)),
                ("state1", s("Virginia")),
            ]),
        )
        .write(&v4);
    let v6 = dir.path().join("city-ipv6.mmdb");
    Writer::new(6, "city ipv6", 1)
        .insert(
            "2600:1f18::/32",
            map(&[
                ("country_code", s("US")),
                ("latitude", Value::Float(39.0469)),
                ("longitude", Value::Float(-77.4903)),
            ]),
        )
        .write(&v6);
    let text = format!(
        "[geoip]\ndatabase = [{:?}, {:?}]\ndefault_region = \"us-east\"\n\
         [[region]]\nname = \"us-east\"\nlocation = [39.04, -77.49]\ncountries = [\"CA\"]\nendpoints = [\"http://127.0.0.1:1\"]\n\
         [[region]]\nname = \"us-west\"\nlocation = [37.35, -121.96]\nendpoints = [\"http://127.0.0.1:2\"]\n\
         [[region]]\nname = \"eu-west\"\nlocation = [53.35, -6.26]\ncountries = [\"IE\"]\nendpoints = [\"http://127.0.0.1:3\"]\n",
        v4.display().to_string(),
        v6.display().to_string()
    );
    let config = Config::parse(&text, None).unwrap();
    let geo = GeoDb::load(config.geoip.chain(), None).unwrap();
    let table = RouteTable::new(std::sync::Arc::new(config));
    let headers = HeaderMap::new();
    let facts = RequestFacts {
        method: &Method::POST,
        path: "/v1/chat/completions",
        headers: &headers,
    };
    let us_west = table.config.region_index("us-west").unwrap();
    let us_east = table.config.region_index("us-east").unwrap();
    let cases: Vec<(IpAddr, usize)> = vec![
        ("13.56.0.1".parse().unwrap(), us_west),
        ("52.0.0.1".parse().unwrap(), us_east),
        ("2600:1f18::1".parse().unwrap(), us_east),
        // Not in the city files: the embedded database answers (AU, nearer the west coast).
        ("1.1.1.1".parse().unwrap(), us_west),
    ];
    let decide = |ip: IpAddr| {
        let located = geo.locate(ip);
        assert!(matches!(located, Located::Country { .. }), "{ip}: {located:?}");
        let mut scratch = route::InlineCandidates::new();
        route::plan_in(&table, located, &facts, &mut scratch)
            .ok()
            .and_then(|p| p.candidates.first().map(|c| c.region))
    };
    for &(ip, want) in &cases {
        assert_eq!(decide(ip), Some(want), "{ip}");
    }
    let before = allocations();
    for _ in 0..2_000 {
        for &(ip, want) in &cases {
            assert_eq!(decide(ip), Some(want));
        }
    }
    let allocated = allocations() - before;
    assert_eq!(allocated, 0, "8,000 city lookups and plans allocated {allocated} times");
}
