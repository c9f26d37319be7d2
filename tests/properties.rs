//! Property tests on the parsers and decisions: arbitrary config text never panics the
//! loader, `X-Forwarded-For` never yields a trusted hop as the client (unless every hop is
//! trusted), and no table, request or health view routes a residency-bound client outside
//! its zone.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use ipnet::IpNet;
use meridian::client_ip::{client_ip, is_trusted};
use meridian::config::Config;
use meridian::geo::{Country, Located};
use meridian::route::{self, Decision, RegionState, RequestFacts, RouteTable};
use proptest::prelude::*;

const VALID: &str = r#"
[server]
listen = "127.0.0.1:0"
max_request_body = "1MiB"
[geoip]
default_region = "a"
trusted_proxies = ["127.0.0.1/32"]
[[region]]
name = "a"
location = [10.0, 20.0]
countries = ["US"]
endpoints = ["http://127.0.0.1:1"]
[[residency]]
name = "z"
countries = ["GB"]
regions = ["a"]
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn config_parsing_never_panics_on_arbitrary_text(text in ".{0,400}") {
        let _ = Config::parse(&text, None);
    }

    #[test]
    fn config_parsing_never_panics_on_mutated_configs(cut in 0usize..VALID.len(), insert in "[\\[\\]=\"a-z0-9., \n-]{0,20}") {
        let mut text = VALID.to_string();
        let at = (0..=cut).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.insert_str(at, &insert);
        if let Err(e) = Config::parse(&text, None) {
            // Every error says what is wrong.
            prop_assert!(!e.problems.is_empty());
            prop_assert!(e.problems.iter().all(|p| !p.message.is_empty()));
        }
    }

    #[test]
    fn forwarded_for_never_names_a_trusted_hop_unless_all_are(
        peer_trusted in any::<bool>(),
        hops in proptest::collection::vec(prop_oneof![
            Just("10.0.0.1".to_string()),
            Just("10.9.9.9".to_string()),
            Just("127.0.0.1".to_string()),
            Just("81.2.69.142".to_string()),
            Just("8.8.8.8".to_string()),
            Just("2001:db8::1".to_string()),
            Just("garbage".to_string()),
            Just("".to_string()),
            "[0-9a-f:., \\[\\]]{0,24}",
        ], 0..8),
    ) {
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let peer: IpAddr = if peer_trusted { "127.0.0.1".parse().unwrap() } else { "203.0.113.5".parse().unwrap() };
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&hops.join(",")) {
            headers.insert("x-forwarded-for", v);
        }
        let client = client_ip(peer, &headers, &trusted);
        if !peer_trusted {
            prop_assert_eq!(client, peer, "untrusted peers are never overridden");
        } else if is_trusted(client, &trusted) {
            // Only allowed when the walk found no untrusted hop to its right: then the
            // answer is the left-most trusted hop it reached (or the peer).
            let parsed: Vec<Option<IpAddr>> = hops
                .join(",")
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(meridian::client_ip::parse_hop)
                .collect();
            let right_of_stop = parsed.iter().rev().take_while(|h| h.is_some());
            prop_assert!(right_of_stop.flatten().all(|ip| is_trusted(*ip, &trusted)));
        }
    }
}

/// A random region table: regions, zones, rules, flags.
#[derive(Debug, Clone)]
struct Table {
    regions: Vec<(f64, f64, Vec<&'static str>, u32, bool)>,
    zones: Vec<(Vec<&'static str>, Vec<usize>, bool)>,
    rules: Vec<(usize, Vec<usize>, bool)>,
    fallback_zone: Option<Option<usize>>,
}

const COUNTRIES: [&str; 8] = ["GB", "DE", "FR", "US", "IE", "AU", "JP", "BR"];
const PREFIXES: [&str; 3] = ["/v1/fine_tuning", "/v1/files", "/v1"];

fn table_strategy() -> impl Strategy<Value = Table> {
    let region = (
        -80.0..80.0f64,
        -170.0..170.0f64,
        proptest::sample::subsequence(COUNTRIES.to_vec(), 0..3),
        0u32..3,
        any::<bool>(),
    );
    proptest::collection::vec(region, 1..6).prop_flat_map(|regions| {
        let n = regions.len();
        let zone = (
            proptest::sample::subsequence(COUNTRIES.to_vec(), 1..3),
            proptest::collection::vec(0..n, 1..3),
            any::<bool>(),
        );
        let rule = (0..PREFIXES.len(), proptest::collection::vec(0..n, 1..3), any::<bool>());
        (
            Just(regions),
            proptest::collection::vec(zone, 0..3),
            proptest::collection::vec(rule, 0..3),
            proptest::option::of(proptest::option::of(0usize..3)),
        )
            .prop_map(|(regions, zones, rules, fallback_zone)| Table {
                regions,
                zones,
                rules,
                fallback_zone,
            })
    })
}

/// Renders the table as config text, dropping what would make it invalid (a country with
/// two homes or in two zones, a region listed twice).
fn render(t: &Table) -> String {
    let mut s = String::from("[geoip]\ndefault_region = \"r0\"\n");
    // The regions each zoned country may use (first zone wins, as below): a region may not
    // call a country home unless the country's zone includes it.
    let mut zone_regions: std::collections::HashMap<&str, &Vec<usize>> = std::collections::HashMap::new();
    for (countries, regions, _) in &t.zones {
        for c in countries {
            zone_regions.entry(*c).or_insert(regions);
        }
    }
    let mut homes = std::collections::HashSet::new();
    for (i, (lat, lon, countries, priority, failover)) in t.regions.iter().enumerate() {
        let countries: Vec<String> = countries
            .iter()
            .filter(|c| zone_regions.get(**c).is_none_or(|rs| rs.contains(&i)))
            .filter(|c| homes.insert(**c))
            .map(|c| format!("{c:?}"))
            .collect();
        s.push_str(&format!(
            "[[region]]\nname = \"r{i}\"\nlocation = [{lat}, {lon}]\ncountries = [{}]\nendpoints = [\"http://127.0.0.1:{}\"]\npriority = {priority}\nfailover = {failover}\n",
            countries.join(", "),
            1000 + i
        ));
    }
    let mut zoned = std::collections::HashSet::new();
    let mut zone_names = Vec::new();
    for (i, (countries, regions, failover)) in t.zones.iter().enumerate() {
        let countries: Vec<String> = countries
            .iter()
            .filter(|c| zoned.insert(**c))
            .map(|c| format!("{c:?}"))
            .collect();
        if countries.is_empty() {
            continue;
        }
        let mut regions: Vec<usize> = regions.clone();
        regions.dedup();
        regions.sort();
        regions.dedup();
        let regions: Vec<String> = regions.iter().map(|r| format!("\"r{r}\"")).collect();
        s.push_str(&format!(
            "[[residency]]\nname = \"z{i}\"\ncountries = [{}]\nregions = [{}]\nfailover = {failover}\n",
            countries.join(", "),
            regions.join(", ")
        ));
        zone_names.push(format!("z{i}"));
    }
    for (prefix, regions, exempt) in &t.rules {
        let mut regions = regions.clone();
        regions.sort();
        regions.dedup();
        let regions: Vec<String> = regions.iter().map(|r| format!("\"r{r}\"")).collect();
        s.push_str(&format!(
            "[[route]]\npath_prefix = \"{}\"\nregions = [{}]\nresidency_exempt = {exempt}\n",
            PREFIXES[*prefix],
            regions.join(", ")
        ));
    }
    if let Some(zone) = &t.fallback_zone {
        s.push_str("[fallback]\nendpoint = \"http://127.0.0.1:9\"\n");
        if let Some(name) = zone.and_then(|z| zone_names.get(z)) {
            s.push_str(&format!("zone = \"{name}\"\n"));
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

    #[test]
    fn routing_never_leaves_a_residency_zone(
        table in table_strategy(),
        states in proptest::collection::vec(0u8..4, 6),
        country in proptest::sample::select(COUNTRIES.to_vec()),
        path in proptest::sample::select(vec!["/v1/chat/completions", "/v1/fine_tuning/jobs", "/v1/files", "/"]),
        panic_mode in any::<bool>(),
    ) {
        let text = render(&table);
        let config = match Config::parse(&text, None) {
            Ok(c) => c,
            Err(e) => return Err(TestCaseError::fail(format!("generated config invalid: {e}\n{text}"))),
        };
        let config = Arc::new(config);
        let rt = RouteTable::new(config.clone());
        // The load-time audit agrees: no compiled table has a crossing.
        let audit = route::residency::audit(&rt);
        prop_assert!(audit.is_clean(), "audit found crossings {:?}\n{}", audit.crossings, text);
        let country = Country::parse(country).unwrap();
        let zone = config.zones.iter().position(|z| z.countries.contains(&country));
        let headers = HeaderMap::new();
        let facts = RequestFacts { method: &Method::POST, path, headers: &headers };
        let located = Located::in_country(country);
        let Ok(plan) = route::plan(&rt, located, &facts) else { return Ok(()) };
        let exempt = plan.rule.is_some_and(|r| config.routes[r].residency_exempt);
        let state = |r: usize| match states[r % states.len()] {
            0 => RegionState::Available,
            1 => RegionState::Saturated,
            2 => RegionState::Unhealthy,
            _ => RegionState::Unavailable,
        };
        if let Some(z) = zone {
            let allowed = &config.zones[z].regions;
            if !exempt {
                for c in plan.candidates.iter() {
                    prop_assert!(allowed.contains(&c.region), "candidate r{} outside zone z{z}\n{text}", c.region);
                }
            }
            for fallback_usable in [true, false] {
                match route::select(&plan, state, fallback_usable, panic_mode) {
                    Decision::Region(r) => prop_assert!(exempt || allowed.contains(&r), "chose r{r} outside zone\n{text}"),
                    Decision::Fallback => prop_assert_eq!(config.fallback.as_ref().and_then(|f| f.zone), Some(z), "fallback outside zone\n{}", text),
                    Decision::Refuse(_) => {}
                }
            }
        }
        let _ = Ipv4Addr::LOCALHOST;
    }
}
