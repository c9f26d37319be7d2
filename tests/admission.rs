//! Admission control through the real binary, local mode: per-key rates answered 429 with
//! `Retry-After` and `x-ratelimit-*`, concurrency slots freed when a stream ends or its
//! client goes away.

mod support;

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;

/// The error code of an OpenAI-shaped error (`{"error": {"code": ...}}`) or of the older
/// flat shape (`{"error": "code"}`).
fn error_code(body: &serde_json::Value) -> Option<&str> {
    body["error"]["code"].as_str().or_else(|| body["error"].as_str())
}

async fn one_region(limits: &str) -> (FakeUpstream, Meridian) {
    let up = FakeUpstream::start("us-east").await.unwrap();
    let mut config = base_config();
    config.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[up.url()]));
    config.push_str(limits);
    let proxy = Meridian::start(&config);
    (up, proxy)
}

async fn post(proxy: &Meridian, headers: &[(&str, &str)]) -> Reply {
    call(
        "POST",
        proxy.listen,
        "/v1/chat/completions",
        headers,
        r#"{"model":"llama","messages":[]}"#,
    )
    .await
}

#[tokio::test]
async fn per_key_rate_limit_answers_429_with_retry_after_and_headers() {
    // A refill far slower than the test: the burst is all a key gets.
    let (up, proxy) = one_region(
        "[[limit]]\nname = \"per-key\"\nkey = \"header:authorization\"\nrequests_per_second = 0.01\nburst = 2\n",
    )
    .await;
    let key = [("authorization", "Bearer key-one")];
    let first = post(&proxy, &key).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(first.header("x-ratelimit-remaining-requests"), Some("1"));
    assert!(
        first
            .header("x-ratelimit-reset-requests")
            .is_some_and(|r| r.ends_with('s'))
    );
    let second = post(&proxy, &key).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-ratelimit-remaining-requests"), Some("0"));
    let served = up.requests();

    let limited = post(&proxy, &key).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert_eq!(error_code(&limited.json()), Some("rate_limit_exceeded"));
    assert!(
        limited.text().contains("per-key"),
        "names the limit: {}",
        limited.text()
    );
    let retry: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After in seconds");
    // One request every 100 s: the next one fits in about 100 s.
    assert!((90..=100).contains(&retry), "{retry}");
    assert_eq!(limited.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(limited.header("x-ratelimit-reset-requests").is_some());
    assert_eq!(up.requests(), served, "a limited request never reaches an endpoint");

    // Other keys have their own budget; requests without the key are not counted.
    let other = post(&proxy, &[("authorization", "Bearer key-two")]).await;
    assert_eq!(other.status, 200);
    for _ in 0..3 {
        let anonymous = post(&proxy, &[]).await;
        assert_eq!(anonymous.status, 200);
        assert!(anonymous.header("x-ratelimit-limit-requests").is_none());
    }

    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    assert!(
        metrics.contains(r#"meridian_admission_requests_total{result="limited",rule="per-key"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"meridian_admission_keys_tracked{rule="per-key"} 2"#),
        "{metrics}"
    );
    // The key is hashed: it appears in no log line.
    assert!(!proxy.logs().iter().any(|l| l.contains("key-one")));
}

/// Sends a streaming request and returns its response once the head is in.
async fn open_stream(proxy: &Meridian, tenant: &str) -> http::Response<hyper::body::Incoming> {
    send_from(
        "127.0.0.1".parse().unwrap(),
        proxy.listen,
        request(
            "POST",
            proxy.listen,
            "/v1/chat/completions",
            &[("x-tenant", tenant), ("content-type", "application/json")],
            r#"{"stream":true}"#,
        ),
    )
    .await
}

#[tokio::test]
async fn concurrency_limit_releases_on_stream_end_and_on_client_abort() {
    let (up, proxy) = one_region("[[limit]]\nname = \"tenant\"\nkey = \"header:x-tenant\"\nconcurrent = 1\n").await;
    up.set_behavior(Behavior::Gated { events: 2 });

    // One stream in flight holds the tenant's only slot.
    let stream = open_stream(&proxy, "acme").await;
    assert_eq!(stream.status(), 200);
    let mut body = stream.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame()).await.expect("first event");
    assert!(first.is_some());
    let refused = post(&proxy, &[("x-tenant", "acme")]).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(error_code(&refused.json()), Some("rate_limit_exceeded"));
    assert!(refused.header("retry-after").is_some());
    let other = open_stream(&proxy, "globex").await;
    assert_eq!(other.status(), 200, "another tenant has its own slot");
    drop(other);

    // The stream ends: the slot is free again.
    up.release();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("stream ends");
    assert!(rest.is_ok());
    // From here on streams never end on their own (a gate permit left by `release` could
    // let a gated one finish early).
    up.set_behavior(Behavior::Stall);
    let held = admitted_stream(&proxy).await;

    // The client goes away mid-stream: the slot is freed without the stream ever ending.
    let refused = post(&proxy, &[("x-tenant", "acme")]).await;
    assert_eq!(refused.status, 429, "the slot is held while the stream lives");
    drop(held);
    let _again = admitted_stream(&proxy).await;
}

/// Polls until a new `acme` stream is admitted, and returns it.
async fn admitted_stream(proxy: &Meridian) -> http::Response<hyper::body::Incoming> {
    let start = std::time::Instant::now();
    loop {
        let s = open_stream(proxy, "acme").await;
        if s.status() == 200 {
            return s;
        }
        assert!(start.elapsed() < DEADLINE, "the tenant's slot was never released");
        drop(s);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[test]
fn check_prints_the_rules_and_route_shows_which_a_request_meets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meridian.toml");
    let config = format!(
        "[geoip]\ndefault_region = \"us-east\"\n\n{}\
         [[limit]]\nname = \"per-key\"\nkey = \"header:authorization\"\nrequests_per_second = 10\nburst = 20\ntokens_per_minute = 200000\n\n\
         [[limit]]\nname = \"tenant-llama\"\nkey = \"header:x-tenant\"\nmatch = {{ model = \"llama\" }}\nconcurrent = 8\n",
        region("us-east", [39.04, -77.49], &["US"], &["http://127.0.0.1:9".to_string()])
    );
    std::fs::write(&path, config).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(args)
            .output()
            .expect("run meridian");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let path = path.to_str().unwrap();
    let checked = run(&["check", "-c", path]);
    assert!(checked.contains("limits (local, max_keys 100000):"), "{checked}");
    assert!(
        checked.contains("per-key: key header:authorization: 10 req/s burst 20, 200000 tokens/min"),
        "{checked}"
    );
    assert!(
        checked.contains("tenant-llama: key header:x-tenant model llama: 8 concurrent"),
        "{checked}"
    );

    let routed = run(&[
        "route",
        "-c",
        path,
        "--header",
        "authorization: Bearer k",
        "--header",
        "x-tenant: acme",
        "--model",
        "mistral",
        "8.8.8.8",
    ]);
    assert!(
        routed.contains("limit per-key: counted under header:authorization"),
        "{routed}"
    );
    assert!(
        routed.contains("limit tenant-llama: not counted (another model)"),
        "{routed}"
    );
    let routed = run(&[
        "route",
        "-c",
        path,
        "--header",
        "x-tenant: acme",
        "--model",
        "llama",
        "8.8.8.8",
    ]);
    assert!(
        routed.contains("limit per-key: not counted (no header:authorization in the request)"),
        "{routed}"
    );
    assert!(
        routed.contains("limit tenant-llama: counted under header:x-tenant"),
        "{routed}"
    );
}
