//! Config problems as `Config::parse` reports them: every kind of problem a file can have
//! names its exact key path, its line and what is wrong (the command line only adds the
//! file name; `tests/cli.rs` checks that part).

use super::Config;

/// Two regions and a residency zone, shared with `tests/cli.rs`.
const GOOD: &str = include_str!("../../tests/support/two_regions.toml");

/// What, the edit of GOOD (from, to), key path, line, part of the message.
type Case = (
    &'static str,
    (&'static str, &'static str),
    &'static str,
    usize,
    &'static str,
);

#[test]
fn each_problem_names_its_key_path_and_line() {
    assert!(Config::parse(GOOD, None).is_ok());
    let cases: [Case; 23] = [
        (
            "duplicate region",
            ("name = \"uk-south\"", "name = \"us-east\""),
            "region[1].name",
            11,
            "duplicate region name \"us-east\" (also region[0])",
        ),
        (
            "zone names an unknown region",
            ("regions = [\"uk-south\"]", "regions = [\"uk-north\"]"),
            "residency[0].regions[0]",
            19,
            "names unknown region \"uk-north\"",
        ),
        (
            "default_region unknown",
            ("default_region = \"us-east\"", "default_region = \"mars\""),
            "geoip.default_region",
            2,
            "names unknown region \"mars\"",
        ),
        (
            "bad country code",
            ("[\"US\", \"CA\"]", "[\"US\", \"XQ\"]"),
            "region[0].countries[1]",
            7,
            "\"XQ\" is not an ISO 3166-1 alpha-2 country code",
        ),
        (
            "endpoint without scheme",
            ("\"http://127.0.0.1:8001\"", "\"127.0.0.1:8001\""),
            "region[0].endpoints[0]",
            8,
            "must start with http:// or https://",
        ),
        (
            "endpoint without host",
            ("\"http://127.0.0.1:8001\"", "\"http://\""),
            "region[0].endpoints[0]",
            8,
            "\"http://\" is not a URL",
        ),
        (
            "latitude out of range",
            ("[39.04, -77.49]", "[139.04, -77.49]"),
            "region[0].location",
            6,
            "out of range",
        ),
        (
            "empty endpoints",
            ("endpoints = [\"http://127.0.0.1:8002\"]", "endpoints = []"),
            "region[1].endpoints",
            14,
            "must list at least one endpoint",
        ),
        (
            "country homed twice",
            ("[\"GB\"]\nendpoints", "[\"GB\", \"US\"]\nendpoints"),
            "region[1].countries[1]",
            13,
            "US is already the home of region \"us-east\"",
        ),
        (
            "health path without a slash",
            ("[geoip]", "[health]\npath = \"health\"\n\n[geoip]"),
            "health.path",
            2,
            "must start with '/'",
        ),
        (
            "zero connect timeout",
            ("[geoip]", "[server]\nconnect_timeout = \"0s\"\n\n[geoip]"),
            "server.connect_timeout",
            2,
            "must be greater than zero",
        ),
        (
            "zero probe interval",
            ("[geoip]", "[health]\ninterval = \"0s\"\n\n[geoip]"),
            "health.interval",
            2,
            "must be greater than zero",
        ),
        (
            "zero probe timeout",
            ("[geoip]", "[health]\ninterval = \"2s\"\ntimeout = \"0s\"\n\n[geoip]"),
            "health.timeout",
            3,
            "must be greater than zero",
        ),
        (
            "zero probe interval of a region",
            (
                "endpoints = [\"http://127.0.0.1:8002\"]",
                "endpoints = [\"http://127.0.0.1:8002\"]\nhealth = { interval = \"0s\" }",
            ),
            "region[1].health.interval",
            15,
            "must be greater than zero",
        ),
        (
            "not a duration",
            ("[geoip]", "[server]\n\nrequest_timeout = \"5 parsecs\"\n\n[geoip]"),
            "server.request_timeout",
            3,
            "invalid duration \"5 parsecs\"",
        ),
        (
            "a duration as a number",
            ("[geoip]", "[server]\n\nrequest_timeout = 5\n\n[geoip]"),
            "server.request_timeout",
            3,
            "invalid type: integer `5`, expected a string",
        ),
        (
            "not a size",
            ("[geoip]", "[server]\n\nmax_request_body = \"10 MB big\"\n\n[geoip]"),
            "server.max_request_body",
            3,
            "invalid size \"10 MB big\"",
        ),
        (
            "unknown policy",
            (
                "default_region = \"us-east\"",
                "default_region = \"us-east\"\nunknown = \"maybe\"",
            ),
            "geoip.unknown",
            3,
            "unknown variant `maybe`",
        ),
        (
            "zone without regions",
            ("regions = [\"uk-south\"]", ""),
            "residency[0]",
            16,
            "missing field `regions`",
        ),
        (
            "unknown key in a region",
            ("name = \"us-east\"", "name = \"us-east\"\nfoo = 1"),
            "region[0].foo",
            6,
            "unknown field `foo`",
        ),
        (
            "misspelt key of an endpoint",
            (
                "[\"http://127.0.0.1:8002\"]",
                "[{ url = \"http://127.0.0.1:8002\", wieght = 2 }]",
            ),
            "region[1].endpoints[0]",
            14,
            "",
        ),
        (
            "region named none",
            ("name = \"uk-south\"", "name = \"none\""),
            "region[1].name",
            11,
            "\"none\" is reserved",
        ),
        (
            "region named fallback",
            ("name = \"uk-south\"", "name = \"fallback\""),
            "region[1].name",
            11,
            "\"fallback\" is reserved for the [fallback] endpoint",
        ),
    ];
    for (what, (from, to), key, line, message) in cases {
        assert!(GOOD.contains(from), "{what}: the fixture has {from:?}");
        let err = match Config::parse(&GOOD.replace(from, to), None) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e,
        };
        // The first problem is the cause; a duplicate name may bring consequences after it.
        let p = &err.problems[0];
        assert_eq!(p.key, key, "{what}: {err}");
        assert_eq!(p.line, Some(line), "{what}: {err}");
        assert!(p.message.contains(message), "{what}: {err}");
    }
}

/// The parser itself refuses unknown keys: the message names the key, the key path and
/// the line place it.
#[test]
fn an_unknown_key_is_named_with_its_line() {
    let err = match Config::parse(&GOOD.replace("[geoip]", "[geoip]\ndefualt = 1"), None) {
        Ok(_) => panic!("an unknown key was accepted"),
        Err(e) => e,
    };
    assert_eq!(err.problems.len(), 1, "{err}");
    let p = &err.problems[0];
    assert_eq!((p.key.as_str(), p.line), ("geoip.defualt", Some(2)), "{err}");
    assert!(p.message.starts_with("unknown field `defualt`"), "{err}");
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let text = GOOD
        .replace("[\"US\", \"CA\"]", "[\"US\", \"XQ\"]")
        .replace("default_region = \"us-east\"", "default_region = \"mars\"");
    let err = match Config::parse(&text, None) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["region[0].countries[1]", "geoip.default_region"], "{err}");
}
