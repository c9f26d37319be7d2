//! Health, failover and failback through the real binary: endpoints on 127.0.0.1 that die,
//! slow down, fail, flap, shed load and stall, with short probe intervals and polling.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;

const US_EAST: [f64; 2] = [39.04, -77.49];
const US_WEST: [f64; 2] = [45.6, -121.2];
const EU_WEST: [f64; 2] = [53.35, -6.26];
const UK_SOUTH: [f64; 2] = [51.51, -0.13];

/// A config with fast probes and outlier detection; `key = value` lines in `health` and
/// `outlier` replace the defaults here.
fn config(server: &str, health: &str, outlier: &str, regions: &str) -> String {
    let mut c = base_config().replace("[server]\n", &format!("[server]\n{server}\n"));
    c.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    let section = |name: &str, defaults: &str, overrides: &str| {
        let key = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
        let given: Vec<String> = overrides.lines().map(key).collect();
        let mut out = format!("[{name}]\n");
        for line in defaults.lines().filter(|l| !given.contains(&key(l))) {
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(overrides);
        out.push_str("\n\n");
        out
    };
    c.push_str(&section(
        "health",
        "interval = \"200ms\"\ntimeout = \"500ms\"\nunhealthy_after = 2\nhealthy_after = 2",
        health,
    ));
    c.push_str(&section(
        "outlier",
        "consecutive_errors = 3\nttfb_threshold = \"300ms\"\nejection_time = \"1s\"",
        outlier,
    ));
    c.push_str(regions);
    c
}

async fn region_available(proxy: &Meridian, name: &str) -> bool {
    let s = status(proxy).await;
    s["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .is_some_and(|r| r["available"] == true)
}

async fn get_us(proxy: &Meridian) -> Reply {
    get_as(proxy.listen, ips::US, "/v1/models").await
}

/// What a client saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    method: &'static str,
    status: u16,
    region: Option<String>,
    attempts: u32,
    body: String,
}

/// Sends GETs and 10 KiB POSTs as a US client on `workers` tasks until `stop`.
fn steady_traffic(proxy: &Meridian, workers: usize, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<Vec<Seen>>> {
    (0..workers)
        .map(|w| {
            let target = proxy.listen;
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let post = vec![b'x'; 10 * 1024];
                let mut i = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let xff = [
                        ("x-forwarded-for", ips::US),
                        ("content-type", "application/octet-stream"),
                    ];
                    let method = if (i + w).is_multiple_of(2) { "GET" } else { "POST" };
                    let r = if method == "GET" {
                        call("GET", target, "/v1/models", &xff, Bytes::new()).await
                    } else {
                        chat(target, &xff, post.clone()).await
                    };
                    seen.push(Seen {
                        at: Instant::now(),
                        method,
                        status: r.status,
                        region: r.region().map(str::to_string),
                        attempts: r
                            .header("x-meridian-attempts")
                            .and_then(|a| a.parse().ok())
                            .unwrap_or(1),
                        body: r.text(),
                    });
                    i += 1;
                }
                seen
            })
        })
        .collect()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<Seen>>>) -> Vec<Seen> {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|s| s.at);
    all
}

#[tokio::test]
async fn region_outage_fails_over_with_no_client_visible_error() {
    let (a, b) = (
        FakeUpstream::start("us-east").await.unwrap(),
        FakeUpstream::start("us-east").await.unwrap(),
    );
    let west = FakeUpstream::start("us-west").await.unwrap();
    let eu = FakeUpstream::start("eu-west").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[a.url(), b.url()])
        + &region("us-west", US_WEST, &[], &[west.url()])
        + &region("eu-west", EU_WEST, &["IE"], &[eu.url()]);
    let proxy = Meridian::start(&config("", "slow_start = \"0s\"", "", &regions));

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = steady_traffic(&proxy, 3, stop.clone());
    eventually("traffic reaches us-east", || async {
        a.requests() + b.requests() >= 10
    })
    .await;
    let killed_at = Instant::now();
    a.kill();
    b.kill();
    eventually("us-east is ejected", || async {
        !region_available(&proxy, "us-east").await
    })
    .await;
    let west_before = west.requests();
    eventually("us-west serves steadily", || async {
        west.requests() >= west_before + 20
    })
    .await;
    stop.store(true, Ordering::Release);
    let seen = collect(traffic).await;

    let errors: Vec<&Seen> = seen.iter().filter(|s| s.status != 200).collect();
    assert!(errors.is_empty(), "client-visible errors: {errors:#?}");
    let after: Vec<&Seen> = seen.iter().filter(|s| s.at > killed_at).collect();
    assert!(
        after.iter().all(|s| s.region.as_deref() != Some("eu-west")),
        "next-nearest is us-west"
    );
    assert!(
        after
            .iter()
            .any(|s| s.attempts >= 2 && s.region.as_deref() == Some("us-west")),
        "some request was retried into us-west"
    );
    // 10 KiB bodies were replayed intact on the retry.
    assert!(
        after
            .iter()
            .filter(|s| s.body.contains("request_bytes"))
            .all(|s| s.body.contains("\"request_bytes\":10240") || s.body.contains("\"request_bytes\":0"))
    );
    assert_eq!(eu.requests(), 0);
    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    assert!(
        metrics.contains("meridian_failovers_total{from_region=\"us-east\""),
        "{metrics}"
    );
    assert!(metrics.contains("meridian_endpoint_ejections_total"), "{metrics}");
    assert!(metrics.contains("meridian_retries_total"), "{metrics}");
}

#[tokio::test]
async fn recovered_region_gets_traffic_back_after_healthy_after_probes() {
    let mut a = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[a.url()]) + &region("us-west", US_WEST, &[], &[west.url()]);
    let proxy = Meridian::start(&config("", "slow_start = \"0s\"", "", &regions));
    assert_eq!(get_us(&proxy).await.region(), Some("us-east"));

    a.kill();
    eventually("us-east is out", || async {
        !region_available(&proxy, "us-east").await
    })
    .await;
    let r = get_us(&proxy).await;
    assert_eq!((r.status, r.region()), (200, Some("us-west")));

    a.revive().await.unwrap();
    let probes_at_revive = a.probes();
    eventually("traffic returns to us-east", || async {
        get_us(&proxy).await.region() == Some("us-east")
    })
    .await;
    // Not on the first sign of life: only after healthy_after (2) probes passed.
    assert!(
        a.probes() >= probes_at_revive + 2,
        "{} probes",
        a.probes() - probes_at_revive
    );
    let e = endpoint_status(&proxy, &a.url()).await;
    assert!(e["ejections"].as_u64().unwrap() >= 1, "{e}");
    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    assert!(metrics.contains("meridian_probe_duration_seconds_bucket{region=\"us-east\""));
    assert!(
        metrics.contains("meridian_region_available{region=\"us-east\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn recovered_region_ramps_back_over_slow_start() {
    let mut a = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[a.url()]) + &region("us-west", US_WEST, &[], &[west.url()]);
    let proxy = Meridian::start(&config("", "slow_start = \"3s\"", "", &regions));
    a.kill();
    eventually("us-east is out", || async {
        !region_available(&proxy, "us-east").await
    })
    .await;
    a.revive().await.unwrap();
    eventually("us-east is back", || async {
        region_available(&proxy, "us-east").await
    })
    .await;

    // Shares over the three thirds of the window, counted from the return.
    let start = Instant::now();
    let mut home = [0u32; 3];
    let mut total = [0u32; 3];
    while start.elapsed() < Duration::from_secs(3) {
        let third = (start.elapsed().as_millis() / 1000).min(2) as usize;
        let r = get_us(&proxy).await;
        assert_eq!(r.status, 200);
        total[third] += 1;
        home[third] += u32::from(r.region() == Some("us-east"));
    }
    let share = |i: usize| f64::from(home[i]) / f64::from(total[i].max(1));
    assert!(total.iter().all(|&t| t >= 5), "too few samples: {total:?}");
    assert!(
        share(0) < 0.75,
        "no jump: first third {:.2} ({home:?}/{total:?})",
        share(0)
    );
    assert!(share(2) > share(0), "share grows: {home:?}/{total:?}");
    eventually("all home traffic back", || async {
        for _ in 0..10 {
            if get_us(&proxy).await.region() != Some("us-east") {
                return false;
            }
        }
        true
    })
    .await;
}

#[tokio::test]
async fn slow_first_byte_is_ejected_but_a_gappy_stream_is_not() {
    let slow = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let streamer = FakeUpstream::start("eu-west").await.unwrap();
    slow.set_behavior(Behavior::SlowFirstByte(Duration::from_millis(800)));
    // First byte at once, then 400 ms between events: 1.6 s in all, far past the threshold.
    streamer.set_behavior(Behavior::Stream {
        events: 4,
        gap: Duration::from_millis(400),
    });
    let regions = region("us-east", US_EAST, &["US"], &[slow.url()])
        + &region("us-west", US_WEST, &[], &[west.url()])
        + &region("eu-west", EU_WEST, &["IE"], &[streamer.url()]);
    // 400 ms per event is slow generation by the default per-token threshold (250ms): this
    // test is about the first token, so the per-token one is set out of the way.
    let proxy = Meridian::start(&config(
        "stall_timeout = \"2s\"",
        "",
        "ejection_time = \"30s\"\ntpot_threshold = \"1s\"",
        &regions,
    ));

    let sse = tokio::spawn({
        let target = proxy.listen;
        async move {
            let mut bodies = Vec::new();
            for _ in 0..3 {
                let r = chat(target, &[("x-forwarded-for", ips::IE)], r#"{"stream":true}"#).await;
                bodies.push((r.status, r.region().map(str::to_string), r.text()));
            }
            bodies
        }
    });
    eventually("the slow endpoint is ejected", || async {
        let _ = tokio::join!(get_us(&proxy), get_us(&proxy), get_us(&proxy));
        endpoint_status(&proxy, &slow.url()).await["state"] == "ejected"
    })
    .await;
    assert_eq!(endpoint_status(&proxy, &slow.url()).await["reason"], "slow_first_byte");
    let r = get_us(&proxy).await;
    assert_eq!((r.status, r.region()), (200, Some("us-west")));

    for (status, region, body) in sse.await.unwrap() {
        assert_eq!((status, region.as_deref()), (200, Some("eu-west")));
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    }
    let e = endpoint_status(&proxy, &streamer.url()).await;
    assert_eq!(e["state"], "healthy", "{e}");
    assert_eq!(e["ejections"], 0, "{e}");
    assert!(e["ttfb_ewma_ms"].as_f64().unwrap() < 300.0, "{e}");
}

#[tokio::test]
async fn endpoint_failing_half_the_time_is_ejected_after_consecutive_errors() {
    let flaky = FakeUpstream::start("us-east").await.unwrap();
    let good = FakeUpstream::start("us-west").await.unwrap();
    flaky.set_behavior(Behavior::FailSome { percent: 50 });
    let regions = region("us-east", US_EAST, &["US"], &[flaky.url()]) + &region("us-west", US_WEST, &[], &[good.url()]);
    let proxy = Meridian::start(&config("", "", "ejection_time = \"30s\"", &regions));
    eventually("the flaky endpoint is ejected", || async {
        for _ in 0..5 {
            let r = get_us(&proxy).await;
            // A 500 is the endpoint's own answer: relayed, not retried (docs/routing.md,
            // Retries).
            assert!(r.status == 200 || r.status == 500, "{}", r.status);
        }
        endpoint_status(&proxy, &flaky.url()).await["state"] == "ejected"
    })
    .await;
    let e = endpoint_status(&proxy, &flaky.url()).await;
    assert_eq!(e["reason"], "consecutive_errors", "{e}");
    assert!(e["total_errors"].as_u64().unwrap() >= 3, "{e}");
    let before = flaky.requests();
    for _ in 0..20 {
        let r = get_us(&proxy).await;
        assert_eq!((r.status, r.region()), (200, Some("us-west")));
    }
    assert_eq!(flaky.requests(), before, "no traffic to an ejected endpoint");
}

#[tokio::test]
async fn flapping_endpoint_does_not_move_traffic_every_interval() {
    let flapper = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let regions =
        region("us-east", US_EAST, &["US"], &[flapper.url()]) + &region("us-west", US_WEST, &[], &[west.url()]);
    let proxy = Meridian::start(&config(
        "",
        "interval = \"100ms\"\nslow_start = \"500ms\"\njitter = 0.0",
        "ejection_time = \"1500ms\"\nmax_ejection_time = \"10s\"",
        &regions,
    ));
    // Down 500 ms, up 500 ms: a naive checker would eject and restore it every second.
    flapper.set_behavior(Behavior::Flap {
        period: Duration::from_millis(500),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = steady_traffic(&proxy, 1, stop.clone());
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Release);
    let seen = collect(traffic).await;
    let e = endpoint_status(&proxy, &flapper.url()).await;
    let ejections = e["ejections"].as_u64().unwrap();
    assert!((1..=4).contains(&ejections), "6 flaps, {ejections} ejections: {e}");
    // Each return to service is logged once; a naive checker would return it every second.
    let returns = proxy
        .logs()
        .iter()
        .filter(|l| l.contains("endpoint back on probation"))
        .count();
    assert!(returns <= 4, "{returns} returns in 6 flaps");
    // 503s to GETs were retried in us-west; a POST is not retried on a 503 (docs/routing.md,
    // Retries), so the endpoint's own answer reaches the client.
    let bad = |s: &&Seen| s.status != 200 && (s.method == "GET" || !s.body.contains("fake flap"));
    assert!(seen.iter().filter(bad).count() == 0, "{:?}", seen.iter().find(bad));
}

#[tokio::test]
async fn retry_after_sheds_an_endpoint_for_about_that_long() {
    let a = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[a.url()]) + &region("us-west", US_WEST, &[], &[west.url()]);
    let proxy = Meridian::start(&config("", "slow_start = \"0s\"", "", &regions));
    a.set_behavior(Behavior::RetryAfter(2));
    let r = get_us(&proxy).await;
    let shed_at = Instant::now();
    assert_eq!(r.status, 429);
    a.set_behavior(Behavior::Ok);
    let served_by_west = get_us(&proxy).await;
    assert_eq!((served_by_west.status, served_by_west.region()), (200, Some("us-west")));
    eventually("us-east is used again", || async {
        let r = get_us(&proxy).await;
        assert_eq!(r.status, 200);
        r.region() == Some("us-east")
    })
    .await;
    let elapsed = shed_at.elapsed();
    assert!(elapsed >= Duration::from_millis(1500), "back after {elapsed:?}");
    // Shedding is not a failure.
    let e = endpoint_status(&proxy, &a.url()).await;
    assert_eq!(
        (e["total_errors"].as_u64(), e["ejections"].as_u64()),
        (Some(0), Some(0)),
        "{e}"
    );
}

#[tokio::test]
async fn stalled_stream_ends_with_an_sse_error_and_counts_against_the_endpoint() {
    let a = FakeUpstream::start("us-east").await.unwrap();
    a.set_behavior(Behavior::Stall);
    let regions = region("us-east", US_EAST, &["US"], &[a.url()]);
    let proxy = Meridian::start(&config(
        "stall_timeout = \"300ms\"",
        "",
        "consecutive_errors = 2\nejection_time = \"30s\"",
        &regions,
    ));
    for n in 1..=2u64 {
        let resp = send_from(
            "127.0.0.1".parse().unwrap(),
            proxy.listen,
            chat_request(proxy.listen, &[("x-forwarded-for", ips::US)], r#"{"stream":true}"#),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(DEADLINE, resp.into_body().collect())
            .await
            .expect("the stall is cut")
            .unwrap()
            .to_bytes();
        let body = String::from_utf8_lossy(&body);
        assert!(body.starts_with("data: "), "{body}");
        assert!(
            body.contains("event: error\ndata: {\"error\":{") && body.contains("\"code\":\"upstream_timeout\""),
            "{body}"
        );
        eventually("the stall is counted", || async {
            endpoint_status(&proxy, &a.url()).await["total_errors"].as_u64() == Some(n)
        })
        .await;
    }
    let e = endpoint_status(&proxy, &a.url()).await;
    assert_eq!(
        (e["state"].as_str(), e["reason"].as_str()),
        (Some("ejected"), Some("consecutive_errors")),
        "{e}"
    );
}

#[tokio::test]
async fn residency_client_gets_503_inside_its_zone_even_in_panic_mode() {
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let eu = FakeUpstream::start("eu-west").await.unwrap();
    let us = FakeUpstream::start("us-east").await.unwrap();
    let regions = region("uk-south", UK_SOUTH, &["GB"], &[uk.url()])
        + &region("eu-west", EU_WEST, &["IE"], &[eu.url()])
        + &region("us-east", US_EAST, &["US"], &[us.url()])
        + "[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n";
    let proxy = Meridian::start(&config("", "panic_mode = true", "", &regions));
    uk.kill_and_wait().await;
    eventually("uk-south is ejected", || async {
        let r = get_as(proxy.listen, ips::GB, "/v1/models").await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "residency_unavailable");
        assert_eq!(r.json()["error"]["zone"], "uk");
        !region_available(&proxy, "uk-south").await
    })
    .await;
    for _ in 0..5 {
        let r = get_as(proxy.listen, ips::GB, "/v1/models").await;
        assert_eq!(
            (r.status, r.json()["error"]["code"].as_str()),
            (503, Some("residency_unavailable"))
        );
    }
    for other in [&eu, &us] {
        assert!(
            other.seen().iter().all(|s| s.headers["x-meridian-country"] != "GB"),
            "a GB request left its zone"
        );
    }
    // Others are still served.
    assert_eq!(
        get_as(proxy.listen, ips::IE, "/v1/models").await.region(),
        Some("eu-west")
    );
}

#[tokio::test]
async fn panic_mode_serves_inside_the_fence_when_every_probe_fails() {
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let eu = FakeUpstream::start("eu-west").await.unwrap();
    let us = FakeUpstream::start("us-east").await.unwrap();
    let regions = region("uk-south", UK_SOUTH, &["GB"], &[uk.url()])
        + &region("eu-west", EU_WEST, &["IE"], &[eu.url()])
        + &region("us-east", US_EAST, &["US"], &[us.url()])
        + "[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n";
    let proxy = Meridian::start(&config("", "panic_mode = true", "", &regions));
    // Probes broken everywhere, traffic fine.
    for up in [&uk, &eu, &us] {
        up.set_healthy(false);
    }
    eventually("every endpoint is ejected", || async {
        let mut any = false;
        for r in ["uk-south", "eu-west", "us-east"] {
            any |= region_available(&proxy, r).await;
        }
        !any
    })
    .await;
    let gb = get_as(proxy.listen, ips::GB, "/v1/models").await;
    assert_eq!((gb.status, gb.region()), (200, Some("uk-south")));
    let ie = get_as(proxy.listen, ips::IE, "/v1/models").await;
    assert_eq!((ie.status, ie.region()), (200, Some("eu-west")));
}

#[tokio::test]
async fn drain_moves_traffic_away_and_back_with_the_token() {
    let a = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[a.url()]) + &region("us-west", US_WEST, &[], &[west.url()]);
    let text = config("", "slow_start = \"0s\"", "", &regions)
        .replace("[admin]\n", "[admin]\ntoken_env = \"MERIDIAN_FAILOVER_TEST_TOKEN\"\n");
    let proxy = Meridian::start_with_env(&text, &[("MERIDIAN_FAILOVER_TEST_TOKEN", "s3cret")]);
    eventually("ready after the first probe round", || async {
        call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status == 200
    })
    .await;
    assert!(a.probes() >= 1);
    let bearer = [("authorization", "Bearer s3cret")];
    let post = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let admin = proxy.admin;
        async move { call("POST", admin, path, headers, Bytes::new()).await }
    };
    assert_eq!(post("/regions/us-east/drain", &[]).await.status, 401);
    assert_eq!(
        post("/regions/us-east/drain", &[("authorization", "Bearer wrong")])
            .await
            .status,
        401
    );
    assert_eq!(get_us(&proxy).await.region(), Some("us-east"));

    let r = call(
        "POST",
        proxy.admin,
        "/regions/us-east/drain?reason=failover%20drill",
        &bearer,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "drained");
    assert_eq!(r.json()["drain"]["reason"], "failover drill");
    assert!(r.json()["drain"]["by"].as_str().unwrap().starts_with("sha256:"));
    for _ in 0..5 {
        assert_eq!(get_us(&proxy).await.region(), Some("us-west"));
    }
    assert_eq!(post("/regions/us-east/undrain", &[]).await.status, 401);
    let r = call("POST", proxy.admin, "/regions/us-east/undrain", &bearer, Bytes::new()).await;
    assert_eq!(r.status, 200);
    eventually("traffic is back", || async {
        get_us(&proxy).await.region() == Some("us-east")
    })
    .await;

    // A drain with an expiry ends by itself.
    let r = call(
        "POST",
        proxy.admin,
        "/regions/us-east/drain?for=1s",
        &bearer,
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(get_us(&proxy).await.region(), Some("us-west"));
    eventually("the drain expires", || async {
        get_us(&proxy).await.region() == Some("us-east")
    })
    .await;
    let bad = call(
        "POST",
        proxy.admin,
        "/regions/us-east/drain?for=soon",
        &bearer,
        Bytes::new(),
    )
    .await;
    assert_eq!(bad.status, 400);

    eventually("the expiry is logged", || async {
        proxy.logs().iter().any(|l| l.contains("region drain expired"))
    })
    .await;
    let logs = proxy.logs().join("\n");
    assert!(
        logs.contains("region drained by admin") && logs.contains("failover drill"),
        "{logs}"
    );
    assert!(!logs.contains("s3cret"), "the token is never logged");
}

#[tokio::test]
async fn drain_is_forbidden_without_a_configured_token() {
    let a = FakeUpstream::start("us-east").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[a.url()]);
    let proxy = Meridian::start(&config("", "", "", &regions));
    for path in ["/regions/us-east/drain", "/regions/us-east/undrain"] {
        let r = call(
            "POST",
            proxy.admin,
            path,
            &[("authorization", "Bearer x")],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 403, "{path}");
    }
    assert_eq!(get_us(&proxy).await.region(), Some("us-east"));
}

#[tokio::test]
async fn status_reports_state_reason_latency_and_errors() {
    let a = FakeUpstream::start("us-east").await.unwrap();
    let b = FakeUpstream::start("us-east").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[a.url(), b.url()]);
    let proxy = Meridian::start(&config("", "", "", &regions));
    b.set_healthy(false);
    eventually("b is ejected by probes", || async {
        endpoint_status(&proxy, &b.url()).await["state"] == "ejected"
    })
    .await;
    get_us(&proxy).await;
    let s = status(&proxy).await;
    let region = &s["regions"][0];
    assert_eq!(
        region["state"], "healthy",
        "one of two endpoints left is not yet degraded: {region}"
    );
    let e = endpoint_status(&proxy, &b.url()).await;
    assert_eq!(e["reason"], "probes_failed");
    assert_eq!(e["last_probe"]["ok"], false);
    assert!(e["last_transition_unix"].as_f64().unwrap() > 1.0e9);
    let ok = endpoint_status(&proxy, &a.url()).await;
    assert_eq!(ok["state"], "healthy");
    assert!(ok["latency_ewma_ms"].as_f64().unwrap() > 0.0, "{ok}");
    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    let line = format!(
        "meridian_endpoint_state{{endpoint=\"{}\",region=\"us-east\",state=\"ejected\"}} 1",
        b.url()
    );
    assert!(metrics.contains(&line), "{metrics}");
}

#[test]
fn health_and_outlier_keys_are_strict() {
    use meridian::config::Config;
    let base = "[[region]]\nname = \"r\"\nlocation = [0.0, 0.0]\nendpoints = [\"http://127.0.0.1:9\"]\n";
    let ok = Config::parse(
        &format!("[health]\nenabled = false\npanic_mode = true\n[outlier]\nconsecutive_errors = 0\n{base}"),
        None,
    )
    .unwrap();
    assert!(!ok.health.enabled && ok.health.panic_mode);
    assert_eq!(ok.outlier.consecutive_errors, 0);
    let cases = [
        ("[health]\nenable = false\n", "enable"),
        ("[health]\njitter = 0.9\n", "health.jitter"),
        ("[health]\nhealthy_after = 0\n", "health.healthy_after"),
        ("", "region[0].health.path"),
        (
            "[outlier]\nejection_time = \"1m\"\nmax_ejection_time = \"10s\"\n",
            "outlier.max_ejection_time",
        ),
    ];
    let bad_region = base.replace("endpoints =", "health = { path = \"ready\" }\nendpoints =");
    for (text, key) in cases {
        let region = if text.is_empty() { &bad_region } else { base };
        let err = Config::parse(&format!("{text}{region}"), None).unwrap_err().to_string();
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[tokio::test]
async fn a_region_can_probe_its_own_health_path() {
    let custom = FakeUpstream::start("us-east").await.unwrap();
    let plain = FakeUpstream::start("us-west").await.unwrap();
    // Both fail `/health`; us-east is probed on a path its servers answer instead.
    custom.set_healthy(false);
    plain.set_healthy(false);
    let regions = region("us-east", US_EAST, &["US"], &[custom.url()]).replace(
        "endpoints =",
        "health = { path = \"/v1/models\", interval = \"100ms\" }\nendpoints =",
    ) + &region("us-west", US_WEST, &[], &[plain.url()]);
    let proxy = Meridian::start(&config("", "", "", &regions));
    eventually("us-west is ejected by its probes", || async {
        endpoint_status(&proxy, &plain.url()).await["state"] == "ejected"
    })
    .await;
    let e = endpoint_status(&proxy, &custom.url()).await;
    assert_eq!(e["state"], "healthy", "{e}");
    assert!(custom.seen().iter().any(|s| s.path == "/v1/models"));
    assert_eq!(custom.probes(), 0, "/health is not probed in us-east");
}
