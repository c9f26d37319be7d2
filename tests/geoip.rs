//! City-level GeoIP on small databases built here: every record shape, 32- and 64-bit
//! coordinates, IPv4/IPv6 split files, the embedded fallback, the accuracy radius, and the
//! real binary routing, explaining and hot-reloading with them.

mod support;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use meridian::config::Config;
use meridian::geo::{Database, GeoDb, Locate, Located};
use support::mmdb::{Value, Writer, map, s};
use support::*;

const SAN_JOSE: (f64, f64) = (37.3388, -121.8916);
const ASHBURN: (f64, f64) = (39.0437, -77.4875);
const BUILT: u64 = 1_780_000_000;

/// A GeoLite2/GeoIP2 City record, keys in the order MaxMind writes them, with a second
/// subdivision and fields after `subdivisions` so skipping is exercised.
fn maxmind_city(country: &str, at: (f64, f64), radius: u16, subdivision: &str) -> Value {
    let names = |n: &str| map(&[("de", s(n)), ("en", s(n))]);
    map(&[
        (
            "city",
            map(&[("geoname_id", Value::U32(5_392_171)), ("names", names("San Jose"))]),
        ),
        (
            "continent",
            map(&[
                ("code", s("NA")),
                ("geoname_id", Value::U32(6_255_149)),
                ("names", names("North America")),
            ]),
        ),
        (
            "country",
            map(&[
                ("geoname_id", Value::U32(6_252_001)),
                ("iso_code", s(country)),
                ("names", names("Somewhere")),
            ]),
        ),
        (
            "subdivisions",
            Value::Array(vec![
                map(&[
                    ("geoname_id", Value::U32(5_332_921)),
                    ("iso_code", s(subdivision)),
                    ("names", names("First")),
                ]),
                map(&[("iso_code", s("ZZ")), ("names", names("Second"))]),
            ]),
        ),
        (
            "location",
            map(&[
                ("accuracy_radius", Value::U16(radius)),
                ("latitude", Value::Double(at.0)),
                ("longitude", Value::Double(at.1)),
                ("metro_code", Value::U16(807)),
                ("time_zone", s("America/Los_Angeles")),
            ]),
        ),
        ("postal", map(&[("code", s("95141"))])),
        ("registered_country", map(&[("iso_code", s(country))])),
        ("traits", map(&[("is_anycast", Value::Bool(false))])),
    ])
}

fn maxmind_country(country: &str) -> Value {
    map(&[
        ("continent", map(&[("code", s("NA"))])),
        (
            "country",
            map(&[("iso_code", s(country)), ("is_in_european_union", Value::Bool(false))]),
        ),
        ("registered_country", map(&[("iso_code", s(country))])),
    ])
}

/// An anycast network: GeoIP2 gives only where it is registered.
fn maxmind_registered_only(country: &str) -> Value {
    map(&[
        ("registered_country", map(&[("iso_code", s(country))])),
        ("traits", map(&[("is_anycast", Value::Bool(true))])),
    ])
}

/// ip-location-db city: flat, coordinates as 32-bit floats in the published files.
fn ipdb_city(country: &str, at: (f64, f64), double: bool) -> Value {
    let coord = |v: f64| {
        if double {
            Value::Double(v)
        } else {
            Value::Float(v as f32)
        }
    };
    map(&[
        ("city", s("San Jose")),
        ("country_code", s(country)),
        ("latitude", coord(at.0)),
        ("longitude", coord(at.1)),
        ("postcode", s("95141")),
        ("state1", s("California")),
        ("state2", s("")),
        ("timezone", s("America/Los_Angeles")),
    ])
}

fn ipdb_country(country: &str) -> Value {
    map(&[("country_code", s(country))])
}

/// DB-IP Lite city: GeoIP2-compatible keys, no accuracy radius, subdivisions by name only.
fn dbip_city(country: &str, at: (f64, f64)) -> Value {
    map(&[
        ("city", map(&[("names", map(&[("en", s("San Jose"))]))])),
        (
            "continent",
            map(&[("code", s("NA")), ("geoname_id", Value::U32(6_255_149))]),
        ),
        (
            "country",
            map(&[
                ("geoname_id", Value::U32(6_252_001)),
                ("is_in_european_union", Value::Bool(false)),
                ("iso_code", s(country)),
                ("names", map(&[("en", s("United States"))])),
            ]),
        ),
        (
            "location",
            map(&[("latitude", Value::Double(at.0)), ("longitude", Value::Double(at.1))]),
        ),
        (
            "subdivisions",
            Value::Array(vec![map(&[("names", map(&[("en", s("California"))]))])]),
        ),
    ])
}

fn dbip_country(country: &str) -> Value {
    map(&[
        ("continent", map(&[("code", s("NA"))])),
        (
            "country",
            map(&[("is_in_european_union", Value::Bool(false)), ("iso_code", s(country))]),
        ),
    ])
}

/// Writes one IPv4 database holding `13.56.0.0/16` → `record`.
fn one_record(dir: &Path, name: &str, kind: &str, record: Value) -> PathBuf {
    let path = dir.join(name);
    Writer::new(4, kind, BUILT).insert("13.56.0.0/16", record).write(&path);
    path
}

/// The region table of `config/us-split.toml`, with `geoip` lines and the files given.
fn split_config(files: &[&Path], geoip_extra: &str, endpoints: [&str; 3]) -> String {
    let list: Vec<String> = files.iter().map(|f| format!("{:?}", f.display().to_string())).collect();
    format!(
        "[geoip]\ndatabase = [{}]\ndefault_region = \"us-east\"\n{geoip_extra}\n\n{}{}{}",
        list.join(", "),
        region("us-east", [39.04, -77.49], &["CA"], &[endpoints[0].to_string()]),
        region("us-west", [37.35, -121.96], &["MX"], &[endpoints[1].to_string()]),
        region(
            "eu-west",
            [53.35, -6.26],
            &["IE", "GB", "FR"],
            &[endpoints[2].to_string()]
        ),
    )
}

fn chain(dir: &Path, files: &[&Path], geoip_extra: &str) -> Result<GeoDb, String> {
    let text = split_config(
        files,
        geoip_extra,
        ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"],
    );
    let config = Config::parse(&text, Some(&dir.join("meridian.toml"))).map_err(|e| e.to_string())?;
    GeoDb::load(config.geoip.chain(), None).map_err(|e| e.to_string())
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// (country, point, subdivision, database label) of a lookup.
type Found = (Option<String>, Option<(f64, f64)>, Option<String>, Option<String>);

fn found(geo: &GeoDb, addr: &str) -> Found {
    match geo.locate(ip(addr)) {
        Located::Country {
            country,
            point,
            subdivision,
            source,
        } => (
            Some(country.to_string()),
            point.map(|p| (p.lat, p.lon)),
            subdivision.map(|s| s.to_string()),
            geo.database(source).map(|d| d.label().to_string()),
        ),
        _ => (None, None, None, None),
    }
}

fn near(a: Option<(f64, f64)>, b: (f64, f64)) -> bool {
    a.is_some_and(|a| (a.0 - b.0).abs() < 1e-4 && (a.1 - b.1).abs() < 1e-4)
}

#[test]
fn every_common_record_shape_is_read() {
    let dir = tempfile::tempdir().unwrap();
    // (file, database_type, record, country, coordinates, subdivision)
    type Case = (
        &'static str,
        &'static str,
        Value,
        &'static str,
        Option<(f64, f64)>,
        Option<&'static str>,
    );
    let cases: Vec<Case> = vec![
        (
            "geolite2-city.mmdb",
            "GeoLite2-City",
            maxmind_city("US", SAN_JOSE, 20, "CA"),
            "US",
            Some(SAN_JOSE),
            Some("US-CA"),
        ),
        (
            "geolite2-country.mmdb",
            "GeoLite2-Country",
            maxmind_country("US"),
            "US",
            None,
            None,
        ),
        (
            "geoip2-anycast.mmdb",
            "GeoIP2-Country",
            maxmind_registered_only("AU"),
            "AU",
            None,
            None,
        ),
        (
            "ipdb-city-f32.mmdb",
            "geolite2-city",
            ipdb_city("US", SAN_JOSE, false),
            "US",
            Some(SAN_JOSE),
            None,
        ),
        (
            "ipdb-city-f64.mmdb",
            "geolite2-city",
            ipdb_city("US", SAN_JOSE, true),
            "US",
            Some(SAN_JOSE),
            None,
        ),
        (
            "ipdb-country.mmdb",
            "geo-whois-asn-country",
            ipdb_country("IE"),
            "IE",
            None,
            None,
        ),
        (
            "dbip-city-lite.mmdb",
            "DBIP-City-Lite",
            dbip_city("US", SAN_JOSE),
            "US",
            Some(SAN_JOSE),
            None,
        ),
        (
            "dbip-country-lite.mmdb",
            "DBIP-Country-Lite",
            dbip_country("DE"),
            "DE",
            None,
            None,
        ),
    ];
    for (file, kind, record, country, point, subdivision) in cases {
        let path = one_record(dir.path(), file, kind, record);
        let geo = chain(dir.path(), &[&path], "embedded_fallback = false").unwrap_or_else(|e| panic!("{file}: {e}"));
        let (c, p, sub, db) = found(&geo, "13.56.0.1");
        assert_eq!(c.as_deref(), Some(country), "{file}");
        match point {
            Some(want) => assert!(near(p, want), "{file}: {p:?}"),
            None => assert_eq!(p, None, "{file}"),
        }
        assert_eq!(sub.as_deref(), subdivision, "{file}");
        assert_eq!(db, Some(path.display().to_string()), "{file}");
        // An address outside the one network: no record, and no embedded database to ask.
        assert_eq!(geo.locate(ip("52.0.0.1")), Located::Unknown, "{file}");
    }
}

#[test]
fn float32_and_float64_coordinates_read_the_same_decimal_point() {
    let dir = tempfile::tempdir().unwrap();
    for (name, double) in [("f32.mmdb", false), ("f64.mmdb", true)] {
        let path = one_record(dir.path(), name, "city", ipdb_city("US", (37.3388, -121.8916), double));
        let geo = chain(dir.path(), &[&path], "").unwrap();
        let (_, p, _, _) = found(&geo, "13.56.200.7");
        // 37.3388f32 widened naively is 37.33879852294922: kept to the writer's decimals.
        assert_eq!(p, Some((37.3388, -121.8916)), "{name}");
    }
}

#[test]
fn ipv4_and_ipv6_split_files_each_answer_their_family_then_the_embedded_database() {
    let dir = tempfile::tempdir().unwrap();
    let v4 = dir.path().join("city-ipv4.mmdb");
    Writer::new(4, "city ipv4", BUILT)
        .insert("13.56.0.0/16", ipdb_city("US", SAN_JOSE, false))
        .insert("52.0.0.0/15", ipdb_city("US", ASHBURN, false))
        .write(&v4);
    let v6 = dir.path().join("city-ipv6.mmdb");
    Writer::new(6, "city ipv6", BUILT)
        .insert("2600:1f18::/32", ipdb_city("US", ASHBURN, false))
        .insert("2600:1f1c::/32", ipdb_city("US", SAN_JOSE, false))
        .write(&v6);
    let geo = chain(dir.path(), &[&v4, &v6], "").unwrap();
    let (v4_label, v6_label) = (v4.display().to_string(), v6.display().to_string());
    let cases = [
        ("13.56.0.1", Some("US"), Some(SAN_JOSE), Some(v4_label.as_str())),
        ("52.0.0.1", Some("US"), Some(ASHBURN), Some(v4_label.as_str())),
        ("::ffff:52.0.0.1", Some("US"), Some(ASHBURN), Some(v4_label.as_str())),
        ("2600:1f18::1", Some("US"), Some(ASHBURN), Some(v6_label.as_str())),
        ("2600:1f1c:4000::1", Some("US"), Some(SAN_JOSE), Some(v6_label.as_str())),
        // In neither city file: the embedded country database places it, without a point.
        ("1.1.1.1", Some("AU"), None, Some("embedded")),
        ("81.2.69.142", Some("GB"), None, Some("embedded")),
    ];
    for (addr, country, point, db) in cases {
        let (c, p, _, label) = found(&geo, addr);
        assert_eq!(c.as_deref(), country, "{addr}");
        match point {
            Some(want) => assert!(near(p, want), "{addr}: {p:?}"),
            None => assert_eq!(p, None, "{addr}"),
        }
        assert_eq!(label.as_deref(), db, "{addr}");
    }
    assert_eq!(geo.databases().len(), 3);
    assert_eq!(geo.databases()[0].ip_version(), 4);
    assert!(geo.databases()[0].located() >= 3, "counted per database");
    assert_eq!(geo.locate(ip("10.0.0.1")), Located::Private);

    // Without the embedded fallback an address the city files do not know is unknown.
    let alone = chain(dir.path(), &[&v4, &v6], "embedded_fallback = false").unwrap();
    assert_eq!(alone.locate(ip("1.1.1.1")), Located::Unknown);
    assert_eq!(alone.databases().len(), 2);
}

#[test]
fn coordinates_with_a_large_accuracy_radius_fall_back_to_the_country_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("radius.mmdb");
    Writer::new(4, "GeoLite2-City", BUILT)
        .insert("13.56.0.0/16", maxmind_city("US", SAN_JOSE, 20, "CA"))
        // A whole-country guess: the centre of the US, 1,000 km either way.
        .insert("52.0.0.0/15", maxmind_city("US", (37.751, -97.822), 1000, "KS"))
        .write(&path);
    let cases = [
        ("", "13.56.0.1", true),
        ("", "52.0.0.1", false),
        ("max_accuracy_radius_km = 1000", "52.0.0.1", true),
        ("max_accuracy_radius_km = 10", "13.56.0.1", false),
    ];
    for (extra, addr, kept) in cases {
        let geo = chain(dir.path(), &[&path], extra).unwrap();
        let (c, p, sub, _) = found(&geo, addr);
        assert_eq!(c.as_deref(), Some("US"), "{extra} {addr}");
        assert_eq!(p.is_some(), kept, "{extra} {addr}: {p:?}");
        assert!(sub.is_some(), "the subdivision stands whatever the radius");
    }
}

#[test]
fn a_corrupt_or_missing_file_is_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = one_record(dir.path(), "good.mmdb", "city", ipdb_city("US", SAN_JOSE, false));
    let corrupt = dir.path().join("corrupt.mmdb");
    let mut bytes = Writer::new(4, "city", BUILT)
        .insert("13.56.0.0/16", ipdb_city("US", SAN_JOSE, false))
        .build();
    // Keep the metadata, wreck the tree and data.
    for b in bytes.iter_mut().take(64) {
        *b = 0xff;
    }
    std::fs::write(&corrupt, &bytes).unwrap();
    let err = chain(dir.path(), &[&good, &corrupt], "").err().unwrap();
    assert!(
        err.contains("corrupt.mmdb") && err.contains("not a valid MaxMind DB"),
        "{err}"
    );
    let err = chain(dir.path(), &[&good, &dir.path().join("absent.mmdb")], "")
        .err()
        .unwrap();
    assert!(err.contains("absent.mmdb") && err.contains("cannot read"), "{err}");
    assert!(Database::open(&good).is_ok());
}

#[test]
fn config_errors_name_the_geoip_key() {
    let cases = [
        ("database = []\n", "geoip.database"),
        ("database = [\"a.mmdb\", \"a.mmdb\"]\n", "geoip.database[1]"),
        ("embedded_fallback = false\n", "geoip.embedded_fallback"),
        ("max_accuracy_radius_km = 0\n", "geoip.max_accuracy_radius_km"),
        ("max_accuracy_radius = 5\n", "max_accuracy_radius"),
    ];
    let many: Vec<String> = (0..17).map(|i| format!("\"city-{i}.mmdb\"")).collect();
    let many = format!("database = [{}]\n", many.join(", "));
    let cases: Vec<(&str, &str)> = cases.into_iter().chain([(many.as_str(), "at most 16")]).collect();
    for (geoip, key) in cases {
        let text = format!(
            "[geoip]\n{geoip}\n{}",
            region("us-east", [39.04, -77.49], &["US"], &["http://127.0.0.1:1".into()])
        );
        let err = Config::parse(&text, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(key), "{geoip}: {err}");
    }
    let claims = format!(
        "{}{}",
        region("us-east", [39.04, -77.49], &["US"], &["http://127.0.0.1:1".into()]),
        "[[region]]\nname = \"us-west\"\nlocation = [37.35, -121.96]\nsubdivisions = [\"US-CA\", \"California\"]\nendpoints = [\"http://127.0.0.1:2\"]\n"
    );
    let err = Config::parse(&claims, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("region[1].subdivisions[1]"), "{err}");
}

fn route_json(config: &Path, ips: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["route", "--json", "-c"])
        .arg(config)
        .args(ips)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

#[test]
fn route_and_check_say_which_database_located_each_address() {
    let dir = tempfile::tempdir().unwrap();
    let v4 = dir.path().join("city-ipv4.mmdb");
    Writer::new(4, "city ipv4", BUILT)
        .insert("13.56.0.0/16", ipdb_city("US", SAN_JOSE, false))
        .insert("52.0.0.0/15", ipdb_city("US", ASHBURN, false))
        .insert("87.44.0.0/16", ipdb_city("IE", (51.8985, -8.4756), false))
        .write(&v4);
    let config = dir.path().join("us-split.toml");
    std::fs::write(
        &config,
        split_config(
            &[&v4],
            "",
            ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"],
        ),
    )
    .unwrap();
    let out = route_json(&config, &["13.56.0.1", "52.0.0.1", "87.44.0.1", "1.1.1.1", "10.0.0.1"]);
    let label = v4.display().to_string();
    let cases = [
        ("us-west", Some("US"), Some(label.as_str()), "database"),
        ("us-east", Some("US"), Some(label.as_str()), "database"),
        ("eu-west", Some("IE"), Some(label.as_str()), "database"),
        ("us-west", Some("AU"), Some("embedded"), "country_table"),
        ("us-east", None, None, "default_region"),
    ];
    for (e, (chosen, country, database, source)) in out.iter().zip(cases) {
        assert_eq!(e["chosen"], chosen, "{e}");
        assert_eq!(e["country"].as_str(), country, "{e}");
        assert_eq!(e["database"].as_str(), database, "{e}");
        assert_eq!(e["location_source"], source, "{e}");
    }
    // The US client's distances are from its own coordinates: San Jose is next to us-west.
    assert!(
        out[0]["candidates"][0]["distance_km"].as_f64().unwrap() < 50.0,
        "{}",
        out[0]
    );

    let text = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["route", "-c"])
        .arg(&config)
        .arg("13.56.0.1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("database:   {label}")), "{text}");

    let check = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}");
    assert!(stdout.contains(&label) && stdout.contains("embedded"), "{stdout}");
}

/// Replaces `path` the way a refresh job does: written beside, renamed over.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn build_time_gauge(metrics: &str, label: &str) -> Option<u64> {
    let prefix = format!("meridian_geoip_database_build_timestamp_seconds{{database=\"{label}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn the_proxy_splits_the_us_and_reloads_each_database_file_in_place() {
    let east = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let eu = FakeUpstream::start("eu-west").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v4 = dir.path().join("city-ipv4.mmdb");
    let v6 = dir.path().join("city-ipv6.mmdb");
    let city_v4 = |at: (f64, f64), built: u64| {
        Writer::new(4, "city ipv4", built)
            .insert("13.56.0.0/16", ipdb_city("US", at, false))
            .build()
    };
    replace(&v4, &city_v4(SAN_JOSE, BUILT));
    Writer::new(6, "city ipv6", BUILT)
        .insert("2600:1f18::/32", ipdb_city("US", ASHBURN, false))
        .write(&v6);
    let config = format!(
        "{}{}",
        base_config(),
        split_config(&[&v4, &v6], "", [&east.url(), &west.url(), &eu.url()])
    );
    let proxy = Meridian::start(&config);
    let cases = [
        ("13.56.0.1", "us-west"),
        ("2600:1f18::1", "us-east"),
        (ips::IE, "eu-west"),
        (ips::AU, "us-west"), // embedded: AU, nearer the west coast
    ];
    for (addr, want) in cases {
        let reply = get_as(proxy.listen, addr, "/v1/models").await;
        assert_eq!(reply.region(), Some(want), "{addr}: {}", reply.status);
    }
    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    let v4_label = v4.display().to_string();
    assert_eq!(build_time_gauge(&metrics, &v4_label), Some(BUILT), "{metrics}");
    assert_eq!(build_time_gauge(&metrics, "embedded").map(|t| t > 0), Some(true));
    let status = call("GET", proxy.admin, "/status", &[], Bytes::new()).await.json();
    let chain = status["geoip_databases"].as_array().unwrap();
    assert_eq!(chain.len(), 3, "{status}");
    assert_eq!(chain[0]["database"], v4_label.as_str());
    assert!(chain[0]["located"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(chain[2]["database"], "embedded");

    // The weekly refresh moves 13.56.0.0/16 to Ashburn: the file alone changed.
    replace(&v4, &city_v4(ASHBURN, BUILT + 7 * 86_400));
    eventually("13.56.0.1 follows the refreshed database", || async {
        get_as(proxy.listen, "13.56.0.1", "/v1/models").await.region() == Some("us-east")
    })
    .await;
    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    assert_eq!(build_time_gauge(&metrics, &v4_label), Some(BUILT + 7 * 86_400));

    // A corrupt refresh is rejected, named by the config's line and key as `check` names it,
    // and the database in force stays.
    replace(&v4, b"truncated download");
    eventually("the corrupt database is rejected", || async {
        proxy.logs().iter().any(|l| {
            l.contains("config reload rejected")
                && l.contains("city-ipv4.mmdb")
                && l.contains(".toml:")
                && l.contains("geoip.database[0]: ")
        })
    })
    .await;
    assert_eq!(
        get_as(proxy.listen, "13.56.0.1", "/v1/models").await.region(),
        Some("us-east")
    );
    assert_eq!(
        get_as(proxy.listen, "2600:1f18::1", "/v1/models").await.region(),
        Some("us-east")
    );
}
