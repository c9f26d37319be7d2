//! The command line as users meet it: `check` on good and bad configs, `route` in text and
//! JSON.

use std::process::Command;

fn meridian(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(args)
        .output()
        .expect("run meridian");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Two regions and a residency zone, shared with the config's problem tests.
const GOOD: &str = include_str!("support/two_regions.toml");

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_accepts_the_shipped_example_and_prints_the_table() {
    let (code, out, err) = meridian(&[
        "check",
        "-c",
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/meridian.toml"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("us-east") && out.contains("uk-south") && out.contains("eu-west"),
        "{out}"
    );
    assert!(
        out.contains("residency zones:") && out.contains("uk: GB -> only uk-south"),
        "{out}"
    );
    assert!(out.contains("failover order"), "{out}");
    assert!(out.contains("GB           uk-south > 503"), "{out}");
}

#[test]
fn check_rejects_each_invalid_config_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    // Each kind of problem is covered through `Config::parse` (src/config/validate.rs);
    // here, what the command adds: exit 1 and `file:line: key: message`.
    let cases: [(&str, String, &str); 6] = [
        (
            "bad country code",
            GOOD.replace("[\"US\", \"CA\"]", "[\"US\", \"XQ\"]"),
            ":7: region[0].countries[1]: \"XQ\" is not an ISO 3166-1 alpha-2 country code",
        ),
        (
            "unknown key",
            GOOD.replace("[geoip]", "[geoip]\ndefualt = 1"),
            ":2: geoip.defualt: unknown field `defualt`",
        ),
        (
            "zero timeout",
            format!("[server]\nconnect_timeout = \"0s\"\n\n{GOOD}"),
            ":2: server.connect_timeout: must be greater than zero",
        ),
        (
            "not a duration",
            format!("[server]\n\nrequest_timeout = \"5 parsecs\"\n\n{GOOD}"),
            ":3: server.request_timeout: invalid duration \"5 parsecs\"",
        ),
        (
            "missing GeoIP database",
            GOOD.replace("[geoip]", "[geoip]\ndatabase = \"nope.mmdb\""),
            ":2: geoip.database: cannot read GeoIP database",
        ),
        (
            "missing certificate",
            format!(
                "[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"nope.pem\"\ntls_key = \"nope.key\"\n\n{GOOD}"
            ),
            ":3: server.tls_cert: cannot read",
        ),
    ];
    for (name, text, want) in cases {
        let path = write(&dir, "bad.toml", &text);
        let (code, _out, err) = meridian(&["check", "-c", &path]);
        assert_eq!(code, 1, "{name}: should fail\n{err}");
        assert!(err.contains(&format!("{path}{want}")), "{name}: wants {want:?}\n{err}");
    }
    // Several problems are all reported in one run.
    let text = GOOD
        .replace("[\"US\", \"CA\"]", "[\"US\", \"XQ\"]")
        .replace("default_region = \"us-east\"", "default_region = \"mars\"");
    let path = write(&dir, "two.toml", &text);
    let (_, _, err) = meridian(&["check", "-c", &path]);
    assert!(err.contains("2 problem(s)"), "{err}");
    // A rejected config's files are opened too: their problems come in the same run.
    let text =
        format!("[server]\nconnect_timeout = \"0s\"\n\n{GOOD}").replace("[geoip]", "[geoip]\ndatabase = \"nope.mmdb\"");
    let path = write(&dir, "files.toml", &text);
    let (code, _, err) = meridian(&["check", "-c", &path]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains(&format!("{path}:2: server.connect_timeout: must be greater than zero")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{path}:5: geoip.database: cannot read GeoIP database")),
        "{err}"
    );
    let (code, _, err) = meridian(&["check", "-c", "/nonexistent/meridian.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
}

/// `check` and `run` refuse a GeoIP database or a certificate that does not load, and both
/// say where: the config file's line and key, then why.
#[test]
fn check_and_run_name_the_line_and_key_of_a_file_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir, "corrupt.mmdb", "definitely not a database");
    let geo = write(
        &dir,
        "c.toml",
        &GOOD.replace("[geoip]", "[geoip]\ndatabase = \"corrupt.mmdb\""),
    );
    let server = "[server]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"none.pem\"\ntls_key = \"none.key\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n";
    let tls = write(&dir, "tls.toml", &format!("{server}{GOOD}"));
    for command in ["check", "run"] {
        let (code, _, err) = meridian(&[command, "-c", &geo]);
        assert_eq!(code, 1, "{command}: {err}");
        assert!(
            err.contains(&format!("{geo}:2: geoip.database: GeoIP database"))
                && err.contains("corrupt.mmdb")
                && err.contains("not a valid MaxMind DB"),
            "{command}: {err}"
        );
        let (code, _, err) = meridian(&[command, "-c", &tls]);
        assert_eq!(code, 1, "{command}: {err}");
        assert!(
            err.contains(&format!("{tls}:4: server.tls_cert: cannot read")),
            "{command}: {err}"
        );
    }
}

/// With `geoip.unknown = "refuse"` unlocated clients are refused before any region, and the
/// table says so, as `route` does.
#[test]
fn check_shows_refused_unlocated_clients() {
    let sharded = concat!(env!("CARGO_MANIFEST_DIR"), "/config/sharded.toml");
    let (code, out, err) = meridian(&["check", "-c", sharded]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  unlocated    403 location_refused\n"), "{out}");
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/meridian.toml");
    let (code, out, err) = meridian(&["check", "-c", example]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  unlocated    us-east > "), "{out}");
}

/// `meridian route ... | head -1`: the reader goes before the output is written.
#[test]
fn route_into_a_closed_pipe_ends_quietly() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/meridian.toml");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["route", "-c", example, "81.2.69.142", "8.8.8.8", "1.1.1.1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run meridian");
    // Closed at once: the config and GeoIP database take far longer to load.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for meridian");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn route_explains_each_address() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/meridian.toml");
    let (code, out, err) = meridian(&["route", "-c", example, "81.2.69.142", "8.8.8.8", "1.1.1.1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("81.2.69.142\n  country:    GB"), "{out}");
    assert!(out.contains("zone:       uk"), "{out}");
    assert!(out.contains("chosen:     uk-south"), "{out}");
    assert!(out.contains("chosen:     us-east"), "{out}");
    assert!(out.contains(" km"), "{out}");

    let (code, out, _) = meridian(&[
        "route",
        "-c",
        example,
        "--json",
        "81.2.69.142",
        "8.8.8.8",
        "1.1.1.1",
        "10.0.0.1",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 4);
    assert_eq!(a[0]["ip"], "81.2.69.142");
    assert_eq!(a[0]["country"], "GB");
    assert_eq!(a[0]["zone"], "uk");
    assert_eq!(a[0]["chosen"], "uk-south");
    assert_eq!(
        a[0]["candidates"].as_array().unwrap().len(),
        1,
        "the uk zone allows one region"
    );
    assert_eq!(a[0]["candidates"][0]["home"], true);
    assert!(a[0]["location"]["lat"].is_number());
    assert_eq!(a[1]["country"], "US");
    assert_eq!(a[1]["chosen"], "us-east");
    // AU: no home region, ordered by distance.
    let d: Vec<f64> = a[2]["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["distance_km"].as_f64().unwrap())
        .collect();
    assert!(d.windows(2).all(|w| w[0] <= w[1]), "{d:?}");
    assert_eq!(a[3]["country"], serde_json::Value::Null);
    assert_eq!(a[3]["chosen"], "us-east", "private addresses use default_region");

    let (code, _, err) = meridian(&["route", "-c", example, "not-an-ip"]);
    assert_eq!(code, 1);
    assert!(err.contains("not an IP address"));
}

#[test]
fn model_keys_check_and_route_explain_model_routing() {
    let dir = tempfile::tempdir().unwrap();
    let config = GOOD
        .replace(
            "endpoints = [\"http://127.0.0.1:8001\"]",
            "endpoints = [\"http://127.0.0.1:8001\"]\nmodels = [\"gpt-oss-120b\"]",
        )
        .replace(
            "endpoints = [\"http://127.0.0.1:8002\"]",
            "endpoints = [\"http://127.0.0.1:8002\"]\nmodels = [\"llama-3.1-70b\"]\naffinity = { prefix_bytes = 2048 }",
        );
    let path = write(&dir, "models.toml", &config);
    let (code, out, err) = meridian(&["check", "-c", &path]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("models:"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("us-east") && l.contains("gpt-oss-120b")),
        "{out}"
    );

    // A US client asking for a model only uk-south has: the farther region.
    let (code, out, _) = meridian(&["route", "-c", &path, "--model", "llama-3.1-70b", "8.8.8.8"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("chosen:     uk-south") && out.contains("left out:   us-east"),
        "{out}"
    );
    // A GB (uk zone) client asking for a model its zone lacks.
    let (_, out, _) = meridian(&["route", "-c", &path, "--model", "gpt-oss-120b", "81.2.69.142"]);
    assert!(
        out.contains("404 model_not_available_in_zone") && out.contains("uk"),
        "{out}"
    );
    let (_, out, _) = meridian(&["route", "-c", &path, "--model", "nope", "8.8.8.8", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v[0]["refusal"].as_str().unwrap().starts_with("404 model_not_found"),
        "{v}"
    );

    // Strict keys, named by path.
    let cases = [
        (
            config.replace("models = [\"gpt-oss-120b\"]", "models = [\"\"]"),
            "region[0].models[0]",
        ),
        (
            config.replace("prefix_bytes = 2048", "prefix_bytes = 0"),
            "region[1].affinity.prefix_bytes",
        ),
        (
            config.replace("prefix_bytes = 2048", "prefix_bytes = 2048, max_load_factor = 0.5"),
            "region[1].affinity.max_load_factor",
        ),
        (
            config.replace(
                "models = [\"gpt-oss-120b\"]",
                "discover_models = true\n[health]\nenabled = false",
            ),
            "discover_models",
        ),
        (
            config.replace("prefix_bytes = 2048", "prefix_byte = 2048"),
            "prefix_byte",
        ),
    ];
    for (text, key) in cases {
        let path = write(&dir, "bad.toml", &text);
        let (code, _, err) = meridian(&["check", "-c", &path]);
        assert_ne!(code, 0, "{key} accepted");
        assert!(err.contains(key), "{key} not named in {err}");
    }
    let alias = GOOD.replace(
        "[geoip]",
        "[outlier]\nfirst_token_threshold = \"1s\"\ntpot_threshold = \"100ms\"\n\n[geoip]",
    );
    let (code, _, err) = meridian(&["check", "-c", &write(&dir, "alias.toml", &alias)]);
    assert_eq!(code, 0, "{err}");
}
