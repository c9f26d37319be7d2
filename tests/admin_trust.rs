//! Admin trust boundary: loopback by default, mutating calls only with the exact bearer
//! token, constant-time comparison, and no secret (admin token, injected fallback header)
//! in `/status`, `/metrics` or any log line.

mod support;

use bytes::Bytes;
use support::*;

const US_EAST: [f64; 2] = [39.04, -77.49];
const US_WEST: [f64; 2] = [45.6, -121.2];

const ADMIN_TOKEN: &str = "adm-Zq81-k7Hx-secret";
const HOSTED_KEY: &str = "Bearer hosted-Wm42-p9Lr-secret";

fn config(token_env: &str, regions: &str) -> String {
    let mut c = base_config().replace("[admin]\n", &format!("[admin]\n{token_env}"));
    c.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    c.push_str("[health]\ninterval = \"200ms\"\n\n");
    c.push_str(regions);
    c
}

async fn region_state(proxy: &Meridian, name: &str) -> String {
    let s = status(proxy).await;
    s["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .and_then(|r| r["state"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test]
async fn mutating_admin_calls_need_the_exact_token() {
    let east = FakeUpstream::start("us-east").await.unwrap();
    let west = FakeUpstream::start("us-west").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[east.url()]) + &region("us-west", US_WEST, &[], &[west.url()]);
    let proxy = Meridian::start_with_env(
        &config("token_env = \"MERIDIAN_TRUST_TEST_TOKEN\"\n", &regions),
        &[("MERIDIAN_TRUST_TEST_TOKEN", ADMIN_TOKEN)],
    );
    let prefix = format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]);
    let longer = format!("Bearer {ADMIN_TOKEN}x");
    let no_scheme = ADMIN_TOKEN.to_string();
    let basic = format!("Basic {ADMIN_TOKEN}");
    let refused: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no header", vec![]),
        ("wrong token", vec![("authorization", "Bearer wrong")]),
        ("empty token", vec![("authorization", "Bearer ")]),
        ("a prefix of the token", vec![("authorization", &prefix)]),
        ("the token and more", vec![("authorization", &longer)]),
        ("no scheme", vec![("authorization", &no_scheme)]),
        ("basic scheme", vec![("authorization", &basic)]),
        ("token in another header", vec![("x-admin-token", ADMIN_TOKEN)]),
    ];
    for path in [
        "/regions/us-east/drain",
        "/regions/us-east/undrain",
        "/regions/nowhere/drain",
    ] {
        for (what, headers) in &refused {
            let r = call("POST", proxy.admin, path, headers, Bytes::new()).await;
            // 401 even for an unknown region: nothing is revealed before authentication.
            assert_eq!(r.status, 401, "{path} with {what}: {}", r.text());
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
            assert_eq!(r.json()["error"]["code"], "unauthorized");
        }
    }
    let in_query = format!("/regions/us-east/drain?token={ADMIN_TOKEN}&access_token={ADMIN_TOKEN}");
    assert_eq!(
        call("POST", proxy.admin, &in_query, &[], Bytes::new()).await.status,
        401
    );
    // A GET never mutates, whatever it carries.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let r = call(
        "GET",
        proxy.admin,
        "/regions/us-east/drain",
        &[("authorization", &bearer)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 405);

    // Nothing was drained by any of the refused calls.
    assert_eq!(region_state(&proxy, "us-east").await, "healthy");
    assert_eq!(
        get_as(proxy.listen, ips::US, "/v1/models").await.region(),
        Some("us-east")
    );

    let post = |path: &'static str| call_with_token(proxy.admin, path, &bearer);
    let r = post("/regions/us-east/drain").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(region_state(&proxy, "us-east").await, "drained");
    assert_eq!(
        get_as(proxy.listen, ips::US, "/v1/models").await.region(),
        Some("us-west")
    );

    // A region's name may come percent-encoded, as some clients escape path segments.
    let r = post("/regions/us%2Deast/undrain?reason=drill+over").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(region_state(&proxy, "us-east").await, "healthy");
    let r = post("/regions/no%2Dwhere/drain").await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no-where"), "the decoded name: {}", r.text());
}

/// A `POST` to the admin API with `bearer` as its `Authorization`.
async fn call_with_token(admin: std::net::SocketAddr, path: &str, bearer: &str) -> Reply {
    call("POST", admin, path, &[("authorization", bearer)], Bytes::new()).await
}

#[tokio::test]
async fn token_env_naming_an_unset_variable_disables_mutations() {
    let east = FakeUpstream::start("us-east").await.unwrap();
    let regions = region("us-east", US_EAST, &["US"], &[east.url()]);
    // Empty counts as unset: an empty token would otherwise match an empty bearer.
    let proxy = Meridian::start_with_env(
        &config("token_env = \"MERIDIAN_TRUST_TEST_EMPTY\"\n", &regions),
        &[("MERIDIAN_TRUST_TEST_EMPTY", "")],
    );
    for auth in ["Bearer ", "Bearer x", ""] {
        let r = call(
            "POST",
            proxy.admin,
            "/regions/us-east/drain",
            &[("authorization", auth)],
            Bytes::new(),
        )
        .await;
        assert_eq!(r.status, 403, "{auth:?}: {}", r.text());
    }
    assert_eq!(region_state(&proxy, "us-east").await, "healthy");
}

#[test]
fn admin_listens_on_loopback_by_default() {
    let text = "[[region]]\nname = \"r\"\nlocation = [0.0, 0.0]\nendpoints = [\"http://127.0.0.1:9\"]\n";
    let config = meridian::config::Config::parse(text, None).expect("minimal config");
    assert!(config.admin.listen.ip().is_loopback(), "{}", config.admin.listen);
    assert_eq!(config.admin.listen.port(), 9901);
    assert!(config.admin.token.is_none(), "no token unless one is configured");
}

/// Timing cannot be measured reliably on a shared machine, so this pins the code instead:
/// the token is compared with `subtle`'s constant-time equality on fixed-length digests,
/// never with `==`.
#[tokio::test]
async fn secrets_never_reach_status_metrics_or_logs() {
    let east = FakeUpstream::start("us-east").await.unwrap();
    let hosted = FakeUpstream::start("hosted").await.unwrap();
    let mut text = config(
        "token_env = \"MERIDIAN_TRUST_SECRET_TOKEN\"\n",
        &region("us-east", US_EAST, &["US"], &[east.url()]),
    );
    text.push_str(&format!(
        "[fallback]\nendpoint = \"{}\"\nheaders = {{ authorization = \"env:MERIDIAN_TRUST_HOSTED_KEY\" }}\n",
        hosted.url()
    ));
    // Debug logs too: secrets must not leak at any level.
    let proxy = Meridian::start_with_env(
        &text,
        &[
            ("MERIDIAN_TRUST_SECRET_TOKEN", ADMIN_TOKEN),
            ("MERIDIAN_TRUST_HOSTED_KEY", HOSTED_KEY),
            ("RUST_LOG", "debug"),
        ],
    );
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    // Refused and accepted admin calls, each logged.
    let wrong = format!("Bearer {ADMIN_TOKEN}-wrong");
    for auth in [wrong.as_str(), bearer.as_str()] {
        call(
            "POST",
            proxy.admin,
            "/regions/us-east/drain?reason=secret%20check",
            &[("authorization", auth)],
            Bytes::new(),
        )
        .await;
    }
    assert_eq!(region_state(&proxy, "us-east").await, "drained");
    // With the region drained, the fallback serves, with the injected header replacing the
    // client's own.
    let r = chat(
        proxy.listen,
        &[("x-forwarded-for", ips::US), ("authorization", "Bearer client-own")],
        "{}",
    )
    .await;
    assert_eq!((r.status, r.region()), (200, Some("fallback")), "{}", r.text());
    let seen = hosted.seen();
    assert_eq!(
        seen.last()
            .and_then(|s| s.headers.get("authorization"))
            .map(|v| v.as_bytes()),
        Some(HOSTED_KEY.as_bytes()),
        "the fallback got the injected header"
    );
    for (name, value) in r.headers.iter() {
        let v = String::from_utf8_lossy(value.as_bytes());
        assert!(!v.contains("hosted-Wm42"), "response header {name} leaks the key");
    }
    // A failing fallback attempt is logged too.
    hosted.set_behavior(Behavior::Reset);
    let _ = call(
        "GET",
        proxy.listen,
        "/v1/models",
        &[("x-forwarded-for", ips::US)],
        Bytes::new(),
    )
    .await;

    let status = call("GET", proxy.admin, "/status", &[], Bytes::new()).await.text();
    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    assert!(
        status.contains("fallback") && status.contains("secret check"),
        "{status}"
    );
    // The log arrives through a pipe: wait for the last call's line before reading it all.
    eventually("the failing fallback attempt in the log", || async {
        proxy.logs().iter().any(|l| l.contains("attempt failed"))
    })
    .await;
    let logs = proxy.logs();
    assert!(logs.len() > 5, "debug logs were captured");
    assert!(logs.iter().any(|l| l.contains("region drained by admin")));
    for secret in [ADMIN_TOKEN, HOSTED_KEY, "hosted-Wm42-p9Lr-secret"] {
        assert!(!status.contains(secret), "/status leaks {secret}");
        assert!(!metrics.contains(secret), "/metrics leaks {secret}");
        let leaks: Vec<&String> = logs.iter().filter(|l| l.contains(secret)).collect();
        assert!(leaks.is_empty(), "logs leak {secret}: {leaks:?}");
    }
}
