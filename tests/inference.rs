//! Inference-aware balancing through the real binary: fake model servers publish vLLM-,
//! TGI- and SGLang-shaped metrics pages and ORCA headers, and tests change the numbers while
//! the proxy runs: endpoint choice, regional spillover with hysteresis, residency, affinity.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;

const US_EAST: [f64; 2] = [39.04, -77.49];
const US_WEST: [f64; 2] = [45.6, -121.2];
const EU_CENTRAL: [f64; 2] = [50.11, 8.68];
const EU_WEST: [f64; 2] = [53.35, -6.26];
const UK_SOUTH: [f64; 2] = [51.51, -0.13];

/// Fast probes (which carry the scrapes), no slow start, and `extra` sections.
fn config(extra: &str, regions: &str) -> String {
    let mut c = base_config();
    c.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    c.push_str("[health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_after = 2\nhealthy_after = 2\nslow_start = \"0s\"\n\n");
    c.push_str(extra);
    c.push_str("\n\n");
    c.push_str(regions);
    c
}

/// A region block with extra keys (`load = ...`, `affinity = ...`).
fn region_with(name: &str, location: [f64; 2], countries: &[&str], endpoints: &[String], keys: &str) -> String {
    format!(
        "{}\n{keys}\n\n",
        region(name, location, countries, endpoints).trim_end()
    )
}

/// A vLLM (V1) page, two engines of one model; the counts split over them.
fn vllm_page(waiting: u32, running: u32, kv: f64) -> String {
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let (w0, r0) = (waiting / 2, running / 2);
    format!(
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n\
         # TYPE vllm:num_requests_running gauge\n\
         vllm:num_requests_running{{engine=\"0\",model_name=\"{model}\"}} {r0}.0\n\
         vllm:num_requests_running{{engine=\"1\",model_name=\"{model}\"}} {}.0\n\
         # HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"{model}\"}} {w0}.0\n\
         vllm:num_requests_waiting{{engine=\"1\",model_name=\"{model}\"}} {}.0\n\
         # HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
         # TYPE vllm:kv_cache_usage_perc gauge\n\
         vllm:kv_cache_usage_perc{{engine=\"0\",model_name=\"{model}\"}} {kv}\n\
         vllm:kv_cache_usage_perc{{engine=\"1\",model_name=\"{model}\"}} {kv}\n\
         # HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n\
         # TYPE vllm:time_to_first_token_seconds histogram\n\
         vllm:time_to_first_token_seconds_sum{{engine=\"0\",model_name=\"{model}\"}} 12.5\n\
         vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"0.001\",model_name=\"{model}\"}} 0.0\n\
         vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"+Inf\",model_name=\"{model}\"}} 40.0\n\
         vllm:time_to_first_token_seconds_count{{engine=\"0\",model_name=\"{model}\"}} 40.0\n",
        running - r0,
        waiting - w0,
    )
}

/// A TGI page (metrics-exporter-prometheus: no labels on these gauges).
fn tgi_page(queue: u32, batch: u32) -> String {
    format!(
        "# HELP tgi_batch_current_size Current batch size\n\
         # TYPE tgi_batch_current_size gauge\n\
         tgi_batch_current_size {batch}\n\
         # HELP tgi_queue_size Current queue size\n\
         # TYPE tgi_queue_size gauge\n\
         tgi_queue_size {queue}\n\
         # HELP tgi_request_count Total number of requests\n\
         # TYPE tgi_request_count counter\n\
         tgi_request_count 1204\n"
    )
}

/// An SGLang page (`--enable-metrics`).
fn sglang_page(queue: u32, running: u32, token_usage: f64) -> String {
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    format!(
        "# HELP sglang:prompt_tokens_total Number of prefill tokens processed.\n\
         # TYPE sglang:prompt_tokens_total counter\n\
         sglang:prompt_tokens_total{{model_name=\"{model}\"}} 8.128902e+06\n\
         # HELP sglang:num_running_reqs The number of running requests.\n\
         # TYPE sglang:num_running_reqs gauge\n\
         sglang:num_running_reqs{{model_name=\"{model}\"}} {running}.0\n\
         # HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n\
         # TYPE sglang:num_queue_reqs gauge\n\
         sglang:num_queue_reqs{{model_name=\"{model}\"}} {queue}.0\n\
         # HELP sglang:token_usage The token usage\n\
         # TYPE sglang:token_usage gauge\n\
         sglang:token_usage{{model_name=\"{model}\"}} {token_usage}\n"
    )
}

async fn region_status(proxy: &Meridian, name: &str) -> serde_json::Value {
    let s = status(proxy).await;
    s["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

async fn saturated(proxy: &Meridian, name: &str) -> bool {
    region_status(proxy, name).await["saturated"] == true
}

/// The queue depth `/status` shows for the endpoint with `url`.
async fn queue_seen(proxy: &Meridian, url: &str) -> Option<f64> {
    endpoint_status(proxy, url).await["load"]["queue_depth"].as_f64()
}

async fn wait_queue(proxy: &Meridian, url: &str, want: f64) {
    eventually(&format!("{url} reports queue {want}"), || async {
        queue_seen(proxy, url).await == Some(want)
    })
    .await;
}

async fn metrics(proxy: &Meridian) -> String {
    call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text()
}

/// Region that served each of `n` GETs from `ip`.
async fn regions_served(proxy: &Meridian, ip: &str, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let r = get_as(proxy.listen, ip, "/v1/models").await;
        assert_eq!(r.status, 200, "{}", r.text());
        out.push(r.region().unwrap_or("?").to_string());
    }
    out
}

/// Sends GETs from `ip` for `how_long` and checks each landed in `want` (the state must
/// hold across several probe and scrape rounds).
async fn holds(proxy: &Meridian, ip: &str, how_long: Duration, want: &str) {
    let start = Instant::now();
    while start.elapsed() < how_long {
        let served = regions_served(proxy, ip, 5).await;
        assert!(served.iter().all(|r| r == want), "want {want}, got {served:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_queue_past_the_threshold_spills_to_the_next_region_and_comes_back_without_flapping() {
    let a = FakeUpstream::start("us-east-a").await.unwrap();
    let b = FakeUpstream::start("us-east-b").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let far = FakeUpstream::start("eu-west").await.unwrap();
    a.set_metrics(&vllm_page(0, 2, 0.3));
    b.set_metrics(&vllm_page(0, 2, 0.3));
    let regions = region_with(
        "us-east",
        US_EAST,
        &["US"],
        &[a.url(), b.url()],
        "load = { source = \"vllm\" }",
    ) + &region("us-west", US_WEST, &[], &[west.url()])
        + &region("eu-west", EU_WEST, &["IE"], &[far.url()]);
    let proxy = Meridian::start(&config("[spillover]\nqueue_depth = 10\n", &regions));
    wait_queue(&proxy, &a.url(), 0.0).await;
    wait_queue(&proxy, &b.url(), 0.0).await;
    assert!(regions_served(&proxy, ips::US, 5).await.iter().all(|r| r == "us-east"));

    // One endpoint past the threshold is not enough: the other still has room.
    a.set_metrics(&vllm_page(12, 8, 0.5));
    b.set_metrics(&vllm_page(4, 8, 0.5));
    wait_queue(&proxy, &a.url(), 12.0).await;
    wait_queue(&proxy, &b.url(), 4.0).await;
    holds(&proxy, ips::US, Duration::from_millis(500), "us-east").await;
    assert!(!saturated(&proxy, "us-east").await);

    // Every endpoint at or above it: new requests spill to the next-nearest region.
    b.set_metrics(&vllm_page(10, 8, 0.5));
    eventually("us-east saturates", || async { saturated(&proxy, "us-east").await }).await;
    assert_eq!(region_status(&proxy, "us-east").await["state"], "saturated");
    let m = metrics(&proxy).await;
    assert!(m.contains("meridian_region_saturated{region=\"us-east\"} 1"), "{m}");
    holds(&proxy, ips::US, Duration::from_millis(300), "us-west").await;

    // Between 80 % and 100 % of the threshold it stays saturated, round after round.
    a.set_metrics(&vllm_page(9, 8, 0.5));
    b.set_metrics(&vllm_page(9, 8, 0.5));
    wait_queue(&proxy, &a.url(), 9.0).await;
    wait_queue(&proxy, &b.url(), 9.0).await;
    holds(&proxy, ips::US, Duration::from_secs(1), "us-west").await;
    assert!(saturated(&proxy, "us-east").await);

    // Below 80 % on one endpoint: the region takes its clients back.
    a.set_metrics(&vllm_page(7, 8, 0.5));
    eventually("us-east drains", || async { !saturated(&proxy, "us-east").await }).await;
    holds(&proxy, ips::US, Duration::from_millis(300), "us-east").await;

    // And between 80 % and 100 % again it stays unsaturated: no flapping either way.
    a.set_metrics(&vllm_page(9, 8, 0.5));
    wait_queue(&proxy, &a.url(), 9.0).await;
    holds(&proxy, ips::US, Duration::from_secs(1), "us-east").await;
    assert!(!saturated(&proxy, "us-east").await);

    assert_eq!(far.requests(), 0, "the spill went to the next-nearest region only");
    let m = metrics(&proxy).await;
    assert!(
        m.contains("meridian_spillovers_total{from_region=\"us-east\",to_region=\"us-west\"}"),
        "{m}"
    );
    assert!(m.contains("meridian_region_saturated{region=\"us-east\"} 0"), "{m}");
}

#[tokio::test]
async fn residency_bound_clients_spill_only_inside_their_zone() {
    let central = FakeUpstream::start("eu-central").await.unwrap();
    let west = FakeUpstream::start("eu-west").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let us = FakeUpstream::start("us-east").await.unwrap();
    central.set_metrics(&sglang_page(0, 1, 0.2));
    west.set_metrics(&sglang_page(0, 1, 0.2));
    uk.set_metrics(&tgi_page(0, 1));
    let sglang = "load = { source = \"sglang\" }";
    let regions = region_with("eu-central", EU_CENTRAL, &["DE"], &[central.url()], sglang)
        + &region_with("eu-west", EU_WEST, &["IE"], &[west.url()], sglang)
        + &region_with(
            "uk-south",
            UK_SOUTH,
            &["GB"],
            &[uk.url()],
            "load = { source = \"tgi\", path = \"/metrics\" }",
        )
        + &region("us-east", US_EAST, &["US"], &[us.url()])
        + "[[residency]]\nname = \"eu\"\ncountries = [\"DE\"]\nregions = [\"eu-central\", \"eu-west\"]\n\n"
        + "[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n";
    let proxy = Meridian::start(&config("[spillover]\nqueue_depth = 8\nkv_cache = 0.9\n", &regions));
    wait_queue(&proxy, &central.url(), 0.0).await;
    wait_queue(&proxy, &uk.url(), 0.0).await;

    // eu-central saturated by its KV cache: DE clients spill to eu-west, inside the zone.
    central.set_metrics(&sglang_page(2, 30, 0.95));
    eventually("eu-central saturates", || async {
        saturated(&proxy, "eu-central").await
    })
    .await;
    holds(&proxy, ips::DE, Duration::from_millis(300), "eu-west").await;

    // Both zone regions saturated: DE clients are still served inside the zone, at home.
    west.set_metrics(&sglang_page(20, 30, 0.5));
    eventually("eu-west saturates", || async { saturated(&proxy, "eu-west").await }).await;
    holds(&proxy, ips::DE, Duration::from_millis(500), "eu-central").await;

    // The single-region uk zone: saturated, yet GB clients stay in uk-south.
    uk.set_metrics(&tgi_page(40, 16));
    eventually("uk-south saturates", || async { saturated(&proxy, "uk-south").await }).await;
    holds(&proxy, ips::GB, Duration::from_millis(500), "uk-south").await;
    assert_eq!(us.requests(), 0, "no zone client went abroad");

    // A client without residency spills past every saturated region.
    let served = regions_served(&proxy, ips::IE, 5).await;
    assert!(served.iter().all(|r| r == "us-east"), "{served:?}");
}

/// Counts, over `n` sequential requests from a US client, how many each endpoint served.
async fn shares(proxy: &Meridian, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = get_as(proxy.listen, ips::US, "/v1/models").await;
        assert_eq!(r.status, 200);
        *counts
            .entry(r.header("x-upstream-region").unwrap_or("?").to_string())
            .or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn the_endpoint_with_the_shorter_vllm_queue_gets_most_of_the_traffic() {
    let short = FakeUpstream::start("short").await.unwrap();
    let long = FakeUpstream::start("long").await.unwrap();
    // Far apart, so that a latency blip on a busy test machine cannot outweigh the queues.
    short.set_metrics(&vllm_page(1, 4, 0.4));
    long.set_metrics(&vllm_page(40, 4, 0.4));
    let regions = region_with(
        "us-east",
        US_EAST,
        &["US"],
        &[short.url(), long.url()],
        "load = { source = \"vllm\" }",
    );
    let proxy = Meridian::start(&config("", &regions));
    wait_queue(&proxy, &short.url(), 1.0).await;
    wait_queue(&proxy, &long.url(), 40.0).await;
    let counts = shares(&proxy, 300).await;
    let s = counts.get("short").copied().unwrap_or(0);
    assert!(s >= 240, "the short queue should take most of 300: {counts:?}");

    // Flip the numbers at runtime: the traffic follows.
    short.set_metrics(&vllm_page(40, 4, 0.4));
    long.set_metrics(&vllm_page(0, 4, 0.4));
    wait_queue(&proxy, &short.url(), 40.0).await;
    wait_queue(&proxy, &long.url(), 0.0).await;
    let counts = shares(&proxy, 300).await;
    assert!(counts.get("long").copied().unwrap_or(0) >= 240, "{counts:?}");
}

#[tokio::test]
async fn orca_headers_steer_traffic_and_are_asked_for() {
    let short = FakeUpstream::start("short").await.unwrap();
    let long = FakeUpstream::start("long").await.unwrap();
    short.set_header(
        "endpoint-load-metrics",
        "TEXT named_metrics.kv_cache_usage_perc=0.3, named_metrics.num_requests_waiting=0",
    );
    long.set_header(
        "endpoint-load-metrics",
        "TEXT named_metrics.queue_depth=30, kv_cache_utilization=0.97",
    );
    let regions = region_with(
        "us-east",
        US_EAST,
        &["US"],
        &[short.url(), long.url()],
        "load = { source = \"orca\" }",
    );
    let proxy = Meridian::start(&config("", &regions));
    // Both learn their report from the first responses they send. The requests go at once:
    // one after another, the balancer would send each to whichever endpoint answered faster
    // so far, and the other might never answer (nor report) before the deadline.
    eventually("both endpoints have reported", || async {
        futures_util::future::join_all((0..8).map(|_| get_as(proxy.listen, ips::US, "/v1/models"))).await;
        queue_seen(&proxy, &short.url()).await == Some(0.0) && queue_seen(&proxy, &long.url()).await == Some(30.0)
    })
    .await;
    let counts = shares(&proxy, 300).await;
    assert!(counts.get("short").copied().unwrap_or(0) >= 240, "{counts:?}");
    let reply = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert!(
        reply.header("endpoint-load-metrics").is_none(),
        "load reports stay inside"
    );
    let asked = short.seen().iter().all(|s| {
        s.headers
            .get("endpoint-load-metrics-format")
            .is_some_and(|v| v == "TEXT")
    });
    assert!(asked, "requests ask the endpoint for its ORCA report");

    // The numbers change at runtime; the new report arrives with the next response.
    short.set_header("endpoint-load-metrics", "TEXT named_metrics.num_requests_waiting=30");
    eventually("the new report is read", || async {
        let _ = shares(&proxy, 2).await;
        queue_seen(&proxy, &short.url()).await == Some(30.0)
    })
    .await;
}

#[tokio::test]
async fn a_broken_metrics_page_degrades_to_none_with_one_warning() {
    let a = FakeUpstream::start("us-east-a").await.unwrap();
    let b = FakeUpstream::start("us-east-b").await.unwrap();
    a.set_metrics("<html><body>404 page not found</body></html>");
    b.set_metrics(&tgi_page(3, 2));
    let regions = region_with(
        "us-east",
        US_EAST,
        &["US"],
        &[a.url(), b.url()],
        "load = { source = \"tgi\" }",
    );
    let proxy = Meridian::start(&config("[spillover]\nqueue_depth = 1\n", &regions));
    wait_queue(&proxy, &b.url(), 3.0).await;
    let warnings = |proxy: &Meridian| {
        proxy
            .logs()
            .iter()
            .filter(|l| l.contains("load signals unavailable") && l.contains(&a.url()))
            .count()
    };
    eventually("a warning for the broken page", || async { warnings(&proxy) >= 1 }).await;
    // Several more scrape rounds: still one warning, and clients never notice.
    let probes = a.probes();
    eventually("more scrape rounds", || async { a.probes() >= probes + 5 }).await;
    assert_eq!(warnings(&proxy), 1);
    assert!(regions_served(&proxy, ips::US, 10).await.iter().all(|r| r == "us-east"));
    let e = region_status(&proxy, "us-east").await;
    let broken = &e["endpoints"][0];
    assert_eq!(broken["load_signals"], "degraded", "{e}");
    assert!(broken["load"].is_null(), "{e}");
    // Unknown load never saturates the region, though b is past the threshold.
    assert_eq!(e["saturated"], false, "{e}");

    a.set_metrics(&tgi_page(0, 1));
    wait_queue(&proxy, &a.url(), 0.0).await;
    eventually("recovery is logged", || async {
        proxy
            .logs()
            .iter()
            .any(|l| l.contains("load signals back") && l.contains(&a.url()))
    })
    .await;
}

/// The endpoint (its fake's name) that served session `id`.
async fn served_session(proxy: &Meridian, id: &str) -> String {
    let r = call(
        "GET",
        proxy.listen,
        "/v1/models",
        &[("x-forwarded-for", ips::US), ("x-session-id", id)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    r.header("x-upstream-region").unwrap_or("?").to_string()
}

#[tokio::test]
async fn a_session_sticks_to_its_endpoint_moves_when_it_is_ejected_and_returns() {
    let e: Vec<FakeUpstream> = vec![
        FakeUpstream::start("e0").await.unwrap(),
        FakeUpstream::start("e1").await.unwrap(),
        FakeUpstream::start("e2").await.unwrap(),
    ];
    let urls: Vec<String> = e.iter().map(FakeUpstream::url).collect();
    let regions = region_with(
        "us-east",
        US_EAST,
        &["US"],
        &urls,
        "affinity = { header = \"x-session-id\" }",
    );
    let proxy = Meridian::start(&config("", &regions));

    let sessions: Vec<String> = (0..24).map(|i| format!("session-{i}")).collect();
    let mut home = HashMap::new();
    for s in &sessions {
        let first = served_session(&proxy, s).await;
        for _ in 0..4 {
            assert_eq!(served_session(&proxy, s).await, first, "{s} stays on its endpoint");
        }
        home.insert(s.clone(), first);
    }
    let used: std::collections::HashSet<&String> = home.values().collect();
    assert!(used.len() >= 2, "sessions spread over endpoints: {home:?}");

    // Eject the endpoint of the first session: its sessions move, the others stay.
    let victim = home[&sessions[0]].clone();
    let index = ["e0", "e1", "e2"].iter().position(|n| *n == victim).unwrap();
    e[index].set_healthy(false);
    eventually("the endpoint is ejected", || async {
        region_status(&proxy, "us-east").await["endpoints"][index]["available"] == false
    })
    .await;
    for s in &sessions {
        let now = served_session(&proxy, s).await;
        if home[s] == victim {
            assert_ne!(now, victim, "{s} moved off the ejected endpoint");
            assert_eq!(served_session(&proxy, s).await, now, "{s} sticks to its new endpoint");
        } else {
            assert_eq!(now, home[s], "{s} kept its endpoint");
        }
    }

    // Recovered: the session returns to its endpoint (rendezvous hashing).
    e[index].set_healthy(true);
    eventually("the first session returns home", || async {
        served_session(&proxy, &sessions[0]).await == victim
    })
    .await;
}

#[test]
fn spillover_and_load_keys_are_validated_by_key_path() {
    let region = "[[region]]\nname = \"r\"\nlocation = [0.0, 0.0]\nendpoints = [\"http://127.0.0.1:1\"]\n";
    let cases: [(&str, &str, Option<&str>); 11] = [
        ("", "affinity = { body_field = \"user\" }", None),
        ("", "affinity = {}", Some("region[0].affinity")),
        (
            "",
            "affinity = { header = \"bad header\" }",
            Some("region[0].affinity.header"),
        ),
        ("", "load = { source = \"vllm\" }", None),
        (
            "[spillover]\nqueue_depth = 16\nkv_cache = 0.95",
            "load = { source = \"sglang\", path = \"/m\" }",
            None,
        ),
        ("[spillover]\nqueue_depth = 0", "", Some("spillover.queue_depth")),
        ("[spillover]\nkv_cache = 1.5", "", Some("spillover.kv_cache")),
        ("[spillover]\nkv_cache = 0.0", "", Some("spillover.kv_cache")),
        ("[spillover]\n", "", Some("spillover")),
        ("", "load = { source = \"triton\" }", Some("unknown variant `triton`")),
        (
            "",
            "load = { source = \"tgi\", path = \"metrics\" }",
            Some("region[0].load.path"),
        ),
    ];
    for (extra, keys, problem) in cases {
        let text = format!("{extra}\n{region}{keys}\n");
        match (meridian::config::Config::parse(&text, None), problem) {
            (Ok(_), None) => {}
            (Err(e), Some(key)) => assert!(e.to_string().contains(key), "{text}: {e}"),
            (got, want) => panic!(
                "{text}: got {:?}, want a problem at {want:?}",
                got.err().map(|e| e.to_string())
            ),
        }
    }
}

/// The endpoint that served a chat completion whose body names `user`.
async fn chat_as(proxy: &Meridian, user: &str) -> String {
    let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"user":"{user}"}}"#);
    let r = chat(
        proxy.listen,
        &[("x-forwarded-for", ips::US), ("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(r.status, 200);
    r.header("x-upstream-region").unwrap_or("?").to_string()
}

#[tokio::test]
async fn a_json_body_field_keeps_a_user_on_one_endpoint() {
    let e: Vec<FakeUpstream> = vec![
        FakeUpstream::start("e0").await.unwrap(),
        FakeUpstream::start("e1").await.unwrap(),
        FakeUpstream::start("e2").await.unwrap(),
    ];
    let urls: Vec<String> = e.iter().map(FakeUpstream::url).collect();
    let regions = region_with(
        "us-east",
        US_EAST,
        &["US"],
        &urls,
        "affinity = { header = \"x-session-id\", body_field = \"user\" }",
    );
    let proxy = Meridian::start(&config("", &regions));
    let mut used = std::collections::HashSet::new();
    for i in 0..12 {
        let user = format!("user-{i}");
        let first = chat_as(&proxy, &user).await;
        for _ in 0..3 {
            assert_eq!(chat_as(&proxy, &user).await, first, "{user} stays on its endpoint");
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "users spread over endpoints: {used:?}");
}
