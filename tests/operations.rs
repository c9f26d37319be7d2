//! Operating the real binary: Prometheus metrics, the JSON access log, config reload on
//! SIGHUP and on file change, and graceful shutdown on SIGTERM.

mod support;

use std::collections::HashSet;

use bytes::Bytes;
use http_body_util::BodyExt;
use meridian::health::exposition;
use support::*;

const TOKEN: &str = "ops-admin-token";

/// us-east (US, CA), eu-west (IE, FR, DE), uk-south (GB, residency zone "uk"), ap-southeast
/// (SG); `/v1/fine_tuning` only in us-east.
struct World {
    us: FakeUpstream,
    eu: FakeUpstream,
    uk: FakeUpstream,
    ap: FakeUpstream,
}

impl World {
    async fn start() -> World {
        World {
            us: FakeUpstream::start("us-east").await.unwrap(),
            eu: FakeUpstream::start("eu-west").await.unwrap(),
            uk: FakeUpstream::start("uk-south").await.unwrap(),
            ap: FakeUpstream::start("ap-southeast").await.unwrap(),
        }
    }

    /// The config text; `de_home` is the region listing DE, `extra` goes after `[server]`'s
    /// keys and before the regions.
    fn config(&self, de_home: &str, server: &str, extra: &str) -> String {
        let mut c = base_config()
            .replace("[server]\n", &format!("[server]\n{server}"))
            .replace("[admin]\n", "[admin]\ntoken_env = \"OPS_ADMIN_TOKEN\"\n");
        c.push_str("[geoip]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndefault_region = \"us-east\"\n\n");
        c.push_str(extra);
        let with_de = |mut countries: Vec<&'static str>, name: &str| {
            if de_home == name {
                countries.push("DE");
            }
            countries
        };
        c.push_str(&region(
            "us-east",
            [39.04, -77.49],
            &with_de(vec!["US", "CA"], "us-east"),
            &[self.us.url()],
        ));
        c.push_str(&region(
            "eu-west",
            [53.35, -6.26],
            &with_de(vec!["IE", "FR"], "eu-west"),
            &[self.eu.url()],
        ));
        c.push_str(&region("uk-south", [51.51, -0.13], &["GB"], &[self.uk.url()]));
        c.push_str(&region("ap-southeast", [1.35, 103.82], &["SG"], &[self.ap.url()]));
        c.push_str("[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n");
        c.push_str("[[route]]\npath_prefix = \"/v1/fine_tuning\"\nregions = [\"us-east\"]\n\n");
        c
    }

    fn proxy(&self, config: &str) -> Meridian {
        Meridian::start_with_env(config, &[("OPS_ADMIN_TOKEN", TOKEN)])
    }
}

// ---- metrics helpers ----

/// A `/metrics` page read with Meridian's own strict exposition reader.
struct Scrape {
    samples: Vec<Sample>,
    /// Families with a `# HELP` line.
    docs: HashSet<String>,
}

struct Sample {
    metric: String,
    labels: Labels,
    value: f64,
}

struct Labels(Vec<(String, String)>);

impl Labels {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

async fn scrape(proxy: &Meridian) -> Scrape {
    let r = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await;
    assert_eq!(r.status, 200);
    let text = r.text();
    check_exposition(&text);
    let mut scrape = Scrape {
        samples: Vec::new(),
        docs: HashSet::new(),
    };
    for line in text.lines() {
        match exposition::parse_line(line).unwrap_or_else(|e| panic!("{e}: {line}")) {
            exposition::Line::Sample(x) => scrape.samples.push(Sample {
                metric: x.name.to_string(),
                labels: Labels(x.labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                value: x.value,
            }),
            exposition::Line::Help { name, .. } => {
                scrape.docs.insert(name.to_string());
            }
            _ => {}
        }
    }
    scrape
}

/// The value of the sample `name` whose labels include `labels`; 0 when absent (a counter
/// that has not moved yet is not exposed).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| x.value)
        .sum()
}

/// Stricter than the parser: every sample line is `name{labels} value`, every family has
/// HELP and TYPE, every name is `meridian_` prefixed.
fn check_exposition(text: &str) {
    let mut typed = HashSet::new();
    let mut helped = HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unexpected type: {line}"
            );
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter without _total: {name}");
            }
            typed.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_string());
        } else if !line.is_empty() {
            let (series, v) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            assert!(
                v.parse::<f64>().is_ok() || v == "+Inf" || v == "-Inf" || v == "NaN",
                "bad value: {line}"
            );
            let name = series.split('{').next().unwrap();
            // The process collector's standard names are the one exception.
            assert!(
                name.starts_with("meridian_") || name.starts_with("process_"),
                "unprefixed: {line}"
            );
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad name: {line}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                assert!(
                    labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                    "bad labels: {line}"
                );
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "sample before its TYPE: {line}");
            assert!(helped.contains(family), "sample without HELP: {line}");
        }
    }
}

fn metric_families(s: &Scrape) -> HashSet<String> {
    s.docs.clone()
}

fn region_status<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["regions"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("region {name} in /status: {status}"))
}

async fn drain(proxy: &Meridian, region: &str) {
    let auth = format!("Bearer {TOKEN}");
    let r = call(
        "POST",
        proxy.admin,
        &format!("/regions/{region}/drain"),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Starts a streamed completion as a client from `xff` and returns it once its first
/// event has arrived (the endpoint must be [`Behavior::Gated`]).
async fn open_stream(proxy: &Meridian, xff: &str) -> (String, hyper::body::Incoming) {
    let resp = send_from(
        "127.0.0.1".parse().unwrap(),
        proxy.listen,
        chat_request(
            proxy.listen,
            &[("content-type", "application/json"), ("x-forwarded-for", xff)],
            r#"{"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let region = resp.headers()["x-meridian-region"].to_str().unwrap().to_string();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("first event")
        .unwrap()
        .unwrap();
    assert!(first.into_data().unwrap().starts_with(b"data: "));
    (region, body)
}

async fn finish_stream(body: hyper::body::Incoming) -> String {
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("rest of the stream")
        .expect("the stream ends cleanly")
        .to_bytes();
    String::from_utf8_lossy(&rest).into_owned()
}

fn rewrite_config(proxy: &Meridian, text: &str) {
    // Written beside and renamed over, as deploy tools do, so no half file is ever seen.
    let tmp = proxy.config_path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &proxy.config_path).unwrap();
}

fn json_logs(proxy: &Meridian) -> Vec<serde_json::Value> {
    proxy
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

// ---- metrics ----

#[tokio::test]
async fn metrics_count_each_request_once_with_its_region_and_status_class() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "", ""));
    w.uk.set_behavior(Behavior::Status(404));
    for _ in 0..3 {
        assert_eq!(get_as(proxy.listen, ips::US, "/v1/models").await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(get_as(proxy.listen, ips::IE, "/v1/models").await.status, 200);
    }
    assert_eq!(get_as(proxy.listen, ips::GB, "/v1/models").await.status, 404);
    // The rule sends fine-tuning to us-east only: outside the uk zone, so refused.
    let r = get_as(proxy.listen, ips::GB, "/v1/fine_tuning/jobs").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "residency_forbidden");
    assert!(
        r.header("x-request-id").is_some_and(|id| id.len() > 8),
        "a generated id"
    );

    let requests = "meridian_requests_total";
    eventually("every request counted", || async {
        let s = scrape(&proxy).await;
        value(&s, requests, &[("region", "us-east"), ("status_class", "2xx")]) == 3.0
            && value(&s, requests, &[("region", "eu-west"), ("status_class", "2xx")]) == 2.0
            && value(&s, requests, &[("region", "uk-south"), ("status_class", "4xx")]) == 1.0
            && value(&s, requests, &[("region", "none"), ("status_class", "4xx")]) == 1.0
    })
    .await;
    let s = scrape(&proxy).await;
    assert_eq!(value(&s, requests, &[]), 7.0, "nothing else was counted");
    assert_eq!(value(&s, requests, &[("region", "ap-southeast")]), 0.0);
    for (region, n) in [("us-east", 3.0), ("eu-west", 2.0), ("uk-south", 1.0)] {
        let labels = [("region", region)];
        assert_eq!(
            value(&s, "meridian_request_duration_seconds_count", &labels),
            n,
            "{region}"
        );
        assert_eq!(
            value(&s, "meridian_upstream_ttfb_seconds_count", &labels),
            n,
            "{region}"
        );
        assert!(
            value(&s, "meridian_upstream_ttfb_seconds_sum", &labels) > 0.0,
            "{region}"
        );
    }
    // (upper bound, count) of each bucket, in page order.
    let buckets: Vec<(f64, f64)> = s
        .samples
        .iter()
        .filter(|x| x.metric == "meridian_upstream_ttfb_seconds_bucket" && x.labels.get("region") == Some("us-east"))
        .map(|x| {
            let le = x.labels.get("le").expect("le label");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("le number")
            };
            (le, x.value)
        })
        .collect();
    assert_eq!(buckets.first().map(|b| b.0), Some(0.005));
    assert!(buckets.iter().any(|b| b.0 == 120.0));
    assert_eq!(buckets.last().map(|b| b.1), Some(3.0));

    let rejections = "meridian_residency_rejections_total";
    assert_eq!(value(&s, rejections, &[("zone", "uk")]), 1.0);
    assert_eq!(value(&s, "meridian_geoip_lookups_total", &[("result", "hit")]), 7.0);
    assert_eq!(value(&s, "meridian_geoip_lookups_total", &[]), 7.0);
    assert_eq!(value(&s, "meridian_failovers_total", &[]), 0.0);
    assert_eq!(value(&s, "meridian_retries_total", &[]), 0.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(value(&s, "meridian_build_info", &[("version", version)]), 1.0);
    assert_eq!(
        value(&s, "meridian_config_reloads_total", &[("result", "success")]),
        1.0
    );
    assert!(value(&s, "meridian_config_last_reload_success_timestamp_seconds", &[]) > 1.6e9);
    assert!(s.samples.iter().any(|x| x.metric == "meridian_open_connections"));
    for region in ["us-east", "eu-west", "uk-south", "ap-southeast"] {
        assert_eq!(value(&s, "meridian_region_available", &[("region", region)]), 1.0);
    }
    let us = w.us.url();
    for (state, want) in [("healthy", 1.0), ("suspect", 0.0), ("ejected", 0.0), ("probation", 0.0)] {
        let labels = [("region", "us-east"), ("endpoint", us.as_str()), ("state", state)];
        assert_eq!(value(&s, "meridian_endpoint_state", &labels), want, "{state}");
    }

    // Every metric exposed is documented.
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    for family in metric_families(&s) {
        assert!(
            docs.contains(&format!("`{family}`")),
            "{family} is not in docs/metrics.md"
        );
    }
}

#[tokio::test]
async fn failovers_retries_and_drains_are_counted() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "", ""));
    w.eu.kill_and_wait().await;
    // Connection refused in eu-west: retried in the next region.
    let r = get_as(proxy.listen, ips::IE, "/v1/models").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let to = r.region().unwrap().to_string();
    assert_ne!(to, "eu-west");
    drain(&proxy, "ap-southeast").await;

    eventually("failover counted", || async {
        let s = scrape(&proxy).await;
        value(
            &s,
            "meridian_requests_total",
            &[("region", to.as_str()), ("status_class", "2xx")],
        ) == 1.0
    })
    .await;
    let s = scrape(&proxy).await;
    let labels = [
        ("from_region", "eu-west"),
        ("to_region", to.as_str()),
        ("reason", "retry"),
    ];
    assert_eq!(value(&s, "meridian_failovers_total", &labels), 1.0);
    assert_eq!(value(&s, "meridian_failovers_total", &[]), 1.0);
    assert_eq!(value(&s, "meridian_retries_total", &[]), 1.0);
    assert_eq!(
        value(&s, "meridian_region_available", &[("region", "ap-southeast")]),
        0.0
    );
}

// ---- access log ----

#[tokio::test]
async fn access_log_has_one_json_line_per_request_and_no_secrets() {
    const INJECTED: &str = "sk-fallback-secret-4242";
    const CLIENT: &str = "Bearer client-secret-7777";
    let w = World::start().await;
    let fallback = FakeUpstream::start("hosted").await.unwrap();
    let extra = format!(
        "[fallback]\nendpoint = \"{}\"\nheaders = {{ authorization = \"env:OPS_FALLBACK_KEY\" }}\n\n",
        fallback.url()
    );
    let config = w.config("eu-west", "", &extra);
    // Debug level on purpose: a secret must not leak at any level an operator might enable.
    let proxy = Meridian::start_with_env(
        &config,
        &[
            ("OPS_ADMIN_TOKEN", TOKEN),
            ("OPS_FALLBACK_KEY", INJECTED),
            ("RUST_LOG", "debug"),
        ],
    );
    let gb_req = [
        ("x-forwarded-for", ips::GB),
        ("x-request-id", "req-uk-1"),
        ("authorization", CLIENT),
    ];
    let r = chat(proxy.listen, &gb_req, "{}").await;
    assert_eq!(r.status, 200);
    // With every region drained, a client outside any zone is sent to the fallback.
    for region in ["us-east", "eu-west", "uk-south", "ap-southeast"] {
        drain(&proxy, region).await;
    }
    let us_req = [
        ("x-forwarded-for", ips::US),
        ("x-request-id", "req-fallback-2"),
        ("authorization", CLIENT),
    ];
    let r = call("GET", proxy.listen, "/v1/models", &us_req, Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.region(), Some("fallback"));
    assert_eq!(
        fallback.seen()[0].headers["authorization"],
        INJECTED,
        "injected, replacing the client's"
    );
    let r = call(
        "GET",
        proxy.listen,
        "/v1/fine_tuning/jobs",
        &[("x-forwarded-for", ips::GB), ("x-request-id", "req-refused-3")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 403);

    let access = || {
        json_logs(&proxy)
            .into_iter()
            .filter(|l| l["target"] == "meridian::access")
            .collect::<Vec<_>>()
    };
    eventually("three access lines", || async { access().len() == 3 }).await;
    let lines = access();
    let by_id = |id: &str| {
        lines
            .iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {lines:?}"))
    };
    let fields = [
        "request_id",
        "client_ip",
        "country",
        "zone",
        "region",
        "endpoint",
        "attempts",
        "status",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "failover_reason",
    ];
    for line in &lines {
        for f in fields {
            assert!(!line[f].is_null(), "{f} missing in {line}");
        }
    }
    let gb = by_id("req-uk-1");
    assert_eq!(gb["client_ip"], ips::GB);
    assert_eq!(gb["country"], "GB");
    assert_eq!(gb["zone"], "uk");
    assert_eq!(gb["region"], "uk-south");
    assert_eq!(gb["endpoint"], w.uk.url());
    assert_eq!(gb["attempts"], 1);
    assert_eq!(gb["status"], 200);
    assert_eq!(gb["bytes_in"], 2);
    assert!(gb["bytes_out"].as_u64().unwrap() > 0);
    assert!(gb["ttfb_ms"].as_f64().is_some());
    assert_eq!(gb["failover_reason"], "-");
    let us = by_id("req-fallback-2");
    assert_eq!(us["client_ip"], ips::US);
    assert_eq!(us["country"], "US");
    assert_eq!(us["zone"], "-");
    assert_eq!(us["region"], "fallback");
    assert_eq!(us["endpoint"], fallback.url());
    assert_eq!(us["attempts"], 1);
    assert_eq!(us["status"], 200);
    assert_eq!(us["failover_reason"], "unavailable");
    let refused = by_id("req-refused-3");
    assert_eq!(refused["status"], 403);
    assert_eq!(refused["error"], "residency_forbidden");

    let logs = proxy.logs();
    assert!(logs.len() > 3);
    for line in &logs {
        assert!(!line.contains(INJECTED), "injected secret logged: {line}");
        assert!(!line.contains("client-secret-7777"), "client credential logged: {line}");
    }
}

// ---- reload ----

#[tokio::test]
async fn an_invalid_config_is_rejected_and_the_old_table_stays() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "", ""));
    std::fs::write(&proxy.config_path, "[server\nlisten = ").unwrap();
    proxy.signal("HUP");
    let errors = || async {
        value(
            &scrape(&proxy).await,
            "meridian_config_reloads_total",
            &[("result", "error")],
        )
    };
    // The file watcher may see the write before the signal arrives: one or two attempts.
    eventually("reload rejected", || async { errors().await >= 1.0 }).await;
    let rejected = json_logs(&proxy)
        .into_iter()
        .find(|l| l["message"] == "config reload rejected; the previous config stays in force")
        .expect("rejection logged");
    assert_eq!(rejected["level"], "ERROR");
    assert!(
        rejected["error"].as_str().unwrap().contains("meridian.toml"),
        "names the file: {rejected}"
    );
    for (ip, want) in [(ips::GB, "uk-south"), (ips::US, "us-east"), (ips::DE, "eu-west")] {
        let r = get_as(proxy.listen, ip, "/v1/models").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.region(), Some(want), "{ip}");
    }
    // A signal alone reloads (and fails) again; the file is not retried on every poll.
    let before = errors().await;
    proxy.signal("HUP");
    eventually("second rejection", || async { errors().await == before + 1.0 }).await;
    let s = scrape(&proxy).await;
    assert_eq!(
        value(&s, "meridian_config_reloads_total", &[("result", "success")]),
        1.0
    );
    eventually("still ready", || async {
        call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status == 200
    })
    .await;
}

#[tokio::test]
async fn sighup_moves_a_country_while_streams_and_health_state_survive() {
    let w = World::start().await;
    let extra = "[outlier]\nconsecutive_errors = 1\nejection_time = \"10m\"\n\n";
    let proxy = w.proxy(&w.config("eu-west", "", extra));

    // Health state to keep: uk-south's endpoint ejected by real traffic, ap-southeast drained.
    w.uk.set_behavior(Behavior::Status(500));
    let r = chat(proxy.listen, &[("x-forwarded-for", ips::GB)], "{}").await;
    assert_eq!(r.status, 500);
    w.uk.set_behavior(Behavior::Ok);
    drain(&proxy, "ap-southeast").await;
    let st = status(&proxy).await;
    assert_eq!(region_status(&st, "uk-south")["endpoints"][0]["state"], "ejected");

    // A German client's stream is open on eu-west while DE moves to us-east.
    w.eu.set_behavior(Behavior::Gated { events: 3 });
    let (region, stream) = open_stream(&proxy, ips::DE).await;
    assert_eq!(region, "eu-west");
    assert!(value(&scrape(&proxy).await, "meridian_open_connections", &[]) >= 1.0);
    rewrite_config(&proxy, &w.config("us-east", "", extra));
    proxy.signal("HUP");
    // Wait for the reload before asking: until then DE would reach the gated endpoint.
    eventually("reload done", || async {
        let s = scrape(&proxy).await;
        value(&s, "meridian_config_reloads_total", &[("result", "success")]) >= 2.0
    })
    .await;
    let r = get_as(proxy.listen, ips::DE, "/v1/models").await;
    assert_eq!(r.region(), Some("us-east"), "DE routed by the new table");
    w.eu.release();
    let rest = finish_stream(stream).await;
    assert!(
        rest.contains("\"index\":2") && rest.ends_with("data: [DONE]\n\n"),
        "{rest}"
    );

    let st = status(&proxy).await;
    let uk = region_status(&st, "uk-south");
    assert_eq!(uk["endpoints"][0]["state"], "ejected", "{uk}");
    assert_eq!(uk["available"], false);
    assert_eq!(region_status(&st, "ap-southeast")["drained"], true);
    let r = get_as(proxy.listen, ips::GB, "/v1/models").await;
    assert_eq!(r.status, 503, "uk-south is still out: {}", r.text());
    assert_eq!(r.json()["error"]["code"], "residency_unavailable");
    assert_eq!(
        get_as(proxy.listen, ips::FR, "/v1/models").await.region(),
        Some("eu-west")
    );

    let s = scrape(&proxy).await;
    assert_eq!(value(&s, "meridian_config_reloads_total", &[("result", "error")]), 0.0);
    let uk_url = w.uk.url();
    let labels = [
        ("region", "uk-south"),
        ("endpoint", uk_url.as_str()),
        ("state", "ejected"),
    ];
    assert_eq!(value(&s, "meridian_endpoint_state", &labels), 1.0);
    assert!(
        json_logs(&proxy)
            .iter()
            .any(|l| l["message"] == "config reloaded" && l["trigger"] == "sighup"),
        "reload logged with its trigger"
    );
}

#[tokio::test]
async fn a_changed_file_reloads_without_a_signal_and_listener_moves_wait_for_restart() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "", ""));
    assert_eq!(
        get_as(proxy.listen, ips::DE, "/v1/models").await.region(),
        Some("eu-west")
    );
    let moved = w.config("us-east", "", "").replace(
        "listen = \"127.0.0.1:0\"\n\n[admin]",
        "listen = \"127.0.0.2:0\"\n\n[admin]",
    );
    assert!(moved.contains("127.0.0.2:0"));
    rewrite_config(&proxy, &moved);
    eventually("DE routed by the new table", || async {
        get_as(proxy.listen, ips::DE, "/v1/models").await.region() == Some("us-east")
    })
    .await;
    let logs = json_logs(&proxy);
    assert!(
        logs.iter()
            .any(|l| l["message"] == "config reloaded" && l["trigger"] == "file_change"),
        "{logs:?}"
    );
    let warning = logs
        .iter()
        .find(|l| l["key"] == "server.listen")
        .expect("listener change reported");
    assert_eq!(warning["level"], "WARN");
    assert!(warning["message"].as_str().unwrap().contains("restart"));
    assert!(!logs.iter().any(|l| l["key"] == "admin.listen"));
    // Still on the old socket, and the file was loaded exactly once.
    let s = scrape(&proxy).await;
    assert_eq!(
        value(&s, "meridian_config_reloads_total", &[("result", "success")]),
        2.0
    );
    assert_eq!(value(&s, "meridian_config_reloads_total", &[("result", "error")]), 0.0);
}

/// With one worker the process runs on one thread between the file watcher's polls: a
/// second thread (tokio keeps an idle blocking thread 10 s by default) makes the kernel take
/// a file reference on every socket call. The watcher still sees a change afterwards.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn one_worker_runs_on_one_thread_between_file_polls_and_still_sees_changes() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "worker_threads = 1\n", ""));
    let tasks = format!("/proc/{}/task", proxy.pid());
    let threads = || std::fs::read_dir(&tasks).map_or(0, |d| d.count());
    // The reload proves the watcher's polls ran (each on a blocking thread); after them,
    // with each poll's thread gone 50 ms later, most looks see one thread.
    rewrite_config(&proxy, &w.config("us-east", "worker_threads = 1\n", ""));
    eventually("DE routed by the new table", || async {
        get_as(proxy.listen, ips::DE, "/v1/models").await.region() == Some("us-east")
    })
    .await;
    eventually("one thread between polls", || async { threads() == 1 }).await;
}

// ---- shutdown ----

#[tokio::test]
async fn sigterm_lets_an_inflight_stream_finish_refuses_new_connections_and_exits_zero() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "", ""));
    w.us.set_behavior(Behavior::Gated { events: 3 });
    let (_, stream) = open_stream(&proxy, ips::US).await;
    wait_ready(&proxy).await;
    proxy.signal("TERM");
    eventually("/readyz says draining", || async {
        call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status == 503
    })
    .await;
    eventually("new connections refused", || async {
        tokio::net::TcpStream::connect(proxy.listen).await.is_err()
    })
    .await;
    w.us.release();
    let rest = finish_stream(stream).await;
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let (code, proxy) = wait_exit(proxy).await;
    assert_eq!(code, Some(0), "{:?}", proxy.logs());
    assert!(json_logs(&proxy).iter().any(|l| l["message"] == "stopped"));
}

#[tokio::test]
async fn shutdown_timeout_bounds_the_wait_for_a_stream_that_never_ends() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "shutdown_timeout = \"300ms\"\n", ""));
    w.us.set_behavior(Behavior::Gated { events: 3 });
    let (_, stream) = open_stream(&proxy, ips::US).await;
    proxy.signal("TERM");
    let (code, proxy) = wait_exit(proxy).await;
    assert_eq!(code, Some(0), "{:?}", proxy.logs());
    // The cut stream ends, with an error, rather than hanging.
    let ended = tokio::time::timeout(DEADLINE, stream.collect()).await;
    assert!(ended.is_ok());
}

#[tokio::test]
async fn a_second_sigterm_stops_waiting() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("eu-west", "shutdown_timeout = \"10m\"\n", ""));
    w.us.set_behavior(Behavior::Gated { events: 3 });
    let (_, _stream) = open_stream(&proxy, ips::US).await;
    proxy.signal("TERM");
    // Two signals sent at once would be delivered as one: wait for the first to be handled.
    eventually("draining", || async {
        json_logs(&proxy)
            .iter()
            .any(|l| l["message"] == "shutting down: no new connections, draining in-flight requests")
    })
    .await;
    proxy.signal("TERM");
    let (code, proxy) = wait_exit(proxy).await;
    assert_eq!(
        code,
        Some(0),
        "exits long before the 10 minute timeout: {:?}",
        proxy.logs()
    );
    assert!(
        json_logs(&proxy)
            .iter()
            .any(|l| l["level"] == "WARN" && l["message"].as_str().unwrap().contains("second stop signal"))
    );
}

// ---- deploy files ----

/// Every `meridian_*` name the dashboard and the alert rules query is a documented metric,
/// so a rename cannot silently blank a panel or an alert.
#[test]
fn dashboard_and_alerts_query_documented_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).unwrap_or_else(|e| panic!("{p}: {e}"));
    let docs = read("docs/metrics.md");
    let dashboard: serde_json::Value = serde_json::from_str(&read("deploy/grafana/meridian.json")).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "dashboard queries: {exprs:?}");
    let alerts = read("deploy/prometheus/alerts.yml");
    let mut names = HashSet::new();
    for text in exprs.iter().map(String::as_str).chain([alerts.as_str()]) {
        let mut rest = text;
        while let Some(i) = rest.find("meridian_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    for name in &names {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            docs.contains(&format!("`{family}`")),
            "{name} is queried but not documented"
        );
    }
    for wanted in [
        "meridian_requests_total",
        "meridian_failovers_total",
        "meridian_endpoint_state",
        "meridian_upstream_first_token_seconds",
        "meridian_upstream_time_per_output_token_seconds",
        "meridian_residency_rejections_total",
    ] {
        assert!(exprs.iter().any(|e| e.contains(wanted)), "the dashboard shows {wanted}");
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}
