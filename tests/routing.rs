//! End-to-end routing through the real binary: home region, distance order, residency,
//! trusted and spoofed X-Forwarded-For, forwarded headers.

mod support;

use bytes::Bytes;
use support::*;

struct World {
    us: FakeUpstream,
    eu: FakeUpstream,
    uk: FakeUpstream,
    ap: FakeUpstream,
    proxy: Meridian,
}

async fn world(extra: &str) -> World {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let eu = FakeUpstream::start("eu-west").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let ap = FakeUpstream::start("ap-southeast").await.unwrap();
    let mut config = base_config();
    config.push_str("[geoip]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndefault_region = \"us-east\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US", "CA"], &[us.url()]));
    config.push_str(&region("eu-west", [53.35, -6.26], &["IE", "FR", "DE"], &[eu.url()]));
    config.push_str(&region("uk-south", [51.51, -0.13], &["GB"], &[uk.url()]));
    config.push_str(&region("ap-southeast", [1.35, 103.82], &["SG"], &[ap.url()]));
    config.push_str("[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n");
    config.push_str(extra);
    let proxy = Meridian::start(&config);
    World { us, eu, uk, ap, proxy }
}

#[tokio::test]
async fn clients_reach_their_home_region() {
    let w = world("").await;
    for (ip, want) in [
        (ips::GB, "uk-south"),
        (ips::US, "us-east"),
        (ips::IE, "eu-west"),
        (ips::DE, "eu-west"),
    ] {
        let r = get_as(w.proxy.listen, ip, "/v1/models").await;
        assert_eq!(r.status, 200, "{ip}: {}", r.text());
        assert_eq!(r.region(), Some(want), "{ip}");
        assert_eq!(r.json()["region"], want, "answered by the {want} endpoint");
    }
    assert_eq!(w.uk.requests(), 1);
    assert_eq!(w.us.requests(), 1);
    assert_eq!(w.eu.requests(), 2);
    assert_eq!(w.ap.requests(), 0);
}

#[tokio::test]
async fn clients_without_a_home_go_to_the_nearest_region() {
    let w = world("").await;
    // Australia lists no home region: Singapore is nearest.
    let r = get_as(w.proxy.listen, ips::AU, "/v1/models").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.region(), Some("ap-southeast"));
    assert_eq!(w.ap.requests(), 1);
}

#[tokio::test]
async fn residency_bound_client_gets_503_with_its_zone_and_never_leaves_it() {
    let w = world("").await;
    w.uk.kill_and_wait().await;
    let r = get_as(w.proxy.listen, ips::GB, "/v1/chat/completions").await;
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    // OpenAI-shaped: the SDKs read `error.code`; the zone travels inside `error`.
    assert_eq!(body["error"]["code"], "residency_unavailable");
    assert_eq!(body["error"]["type"], "service_unavailable");
    assert!(body["error"]["param"].is_null() && body["error"].get("param").is_some());
    assert_eq!(body["error"]["zone"], "uk");
    assert!(body.get("zone").is_none(), "nothing outside `error`: {body}");
    let retry_after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a 503 carries Retry-After: {:?}", r.headers));
    assert!(retry_after >= 1);
    assert_eq!(
        w.us.requests() + w.eu.requests() + w.ap.requests(),
        0,
        "no other region saw the request"
    );
    // Clients outside the zone are unaffected.
    assert_eq!(get_as(w.proxy.listen, ips::IE, "/").await.region(), Some("eu-west"));
}

#[tokio::test]
async fn spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let w = world("").await;
    // 127.0.0.2 is loopback but not in trusted_proxies: its GB claim must change nothing.
    let r = call_from(
        "127.0.0.2".parse().unwrap(),
        "GET",
        w.proxy.listen,
        "/v1/models",
        &[
            ("x-forwarded-for", ips::GB),
            // Underscore spellings a CGI-style endpoint would read as the real fields.
            ("x_forwarded_for", ips::GB),
            ("X_Meridian_Country", "GB"),
            ("x_real_ip", ips::GB),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.region(),
        Some("us-east"),
        "unlocated peer goes to default_region, not uk-south"
    );
    let seen = w.us.seen();
    let h = &seen[0].headers;
    for alias in ["x_forwarded_for", "x_meridian_country", "x_real_ip"] {
        assert!(h.get(alias).is_none(), "{alias} reached the endpoint: {h:?}");
    }
    assert_eq!(
        h["x-forwarded-for"], "127.0.0.2",
        "the spoofed chain is replaced by the peer"
    );
    assert_eq!(h["x-meridian-country"], "XX");
    assert_eq!(w.uk.requests(), 0);
}

#[tokio::test]
async fn forwarded_headers_and_hop_by_hop_removal() {
    let w = world("").await;
    let r = call(
        "GET",
        w.proxy.listen,
        "/v1/models?x=1",
        &[
            ("x-forwarded-for", ips::GB),
            ("x-forwarded-proto", "https"),
            ("x-meridian-region", "spoofed"),
            ("x-meridian-debug", "1"),
            ("connection", "keep-alive, x-hop-secret"),
            ("x-hop-secret", "do-not-forward"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-custom", "kept"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.region(), Some("uk-south"));
    let request_id = r.header("x-request-id").map(str::to_string);
    let seen = w.uk.seen();
    let s = &seen[0];
    assert_eq!(s.path, "/v1/models?x=1");
    assert_eq!(s.headers["x-forwarded-for"], format!("{}, 127.0.0.1", ips::GB));
    assert_eq!(s.headers["x-forwarded-proto"], "https", "kept from a trusted peer");
    assert_eq!(s.headers["x-meridian-country"], "GB");
    assert!(s.headers.get("x-meridian-region").is_none());
    assert!(s.headers.get("x-meridian-debug").is_none());
    assert!(s.headers.get("x-hop-secret").is_none());
    assert!(s.headers.get("keep-alive").is_none());
    assert!(s.headers.get("proxy-authorization").is_none());
    assert_eq!(s.headers["x-custom"], "kept");
    let id = s.headers["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "generated request id");
    let _ = request_id;

    // A client-sent request id is kept.
    let _ = call(
        "GET",
        w.proxy.listen,
        "/",
        &[("x-request-id", "client-id-42")],
        Bytes::new(),
    )
    .await;
    assert_eq!(w.us.seen()[0].headers["x-request-id"], "client-id-42");
    assert_eq!(w.us.seen()[0].headers["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn unlocated_clients_can_be_refused() {
    let w = world("").await;
    drop(w.proxy);
    let mut config = base_config();
    config.push_str("[geoip]\ndefault_region = \"us-east\"\nunknown = \"refuse\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[w.us.url()]));
    let proxy = Meridian::start(&config);
    let r = get_as(proxy.listen, "10.1.2.3", "/").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "location_refused");
    let r = get_as(proxy.listen, ips::US, "/").await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn an_endpoint_with_a_base_path_gets_the_request_under_it_probes_too() {
    let up = FakeUpstream::start("us-east").await.unwrap();
    let mut config = base_config();
    config.push_str("[health]\ninterval = \"100ms\"\n\n");
    let endpoint = format!("{}/serving", up.url());
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[endpoint]));
    let proxy = Meridian::start(&config);
    let r = get_as(proxy.listen, ips::US, "/v1/models?limit=2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Among what the endpoint saw, not its last request: a probe (every 100 ms) may come in
    // between the answer and this look.
    let seen = up.seen();
    assert!(
        seen.iter().any(|s| s.path == "/serving/v1/models?limit=2"),
        "{:?}",
        seen.iter().map(|s| &s.path).collect::<Vec<_>>()
    );
    // The prober's GET goes under the base path as well (a probe of /health would 404 on a
    // real server mounted under a prefix).
    eventually("a probe under the base path", || async {
        up.seen().iter().any(|s| s.path == "/serving/health")
    })
    .await;
    assert_eq!(up.probes(), 0, "no probe outside the base path");
}
