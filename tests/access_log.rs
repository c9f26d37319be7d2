//! The JSON access log, field by field, from the real binary: a request that failed over
//! and then failed, and a residency refusal.

mod support;

use bytes::Bytes;
use support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// Every field an access line carries, beside the log writer's own.
const FIELDS: [&str; 25] = [
    "request_id",
    "trace_id",
    "client_ip",
    "country",
    "zone",
    "method",
    "protocol",
    "host",
    "path",
    "user_agent",
    "region",
    "endpoint",
    "attempts",
    "status",
    "upstream_status",
    "ttfb_ms",
    "duration_ms",
    "bytes_in",
    "bytes_out",
    "failover_reason",
    "error",
    "error_detail",
    "end",
    "message",
    "target",
];

fn access_line(proxy: &Meridian, request_id: &str) -> Option<serde_json::Value> {
    proxy
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["target"] == "meridian::access" && l["request_id"] == request_id)
}

/// Every field is a JSON scalar, no field outside the known set, no Rust debug spelling.
fn check_shape(line: &serde_json::Value) {
    let obj = line.as_object().expect("a JSON object");
    for (k, v) in obj {
        assert!(
            FIELDS.contains(&k.as_str()) || ["timestamp", "level"].contains(&k.as_str()),
            "unexpected field {k} in {line}"
        );
        assert!(
            !v.is_object() && !v.is_array() && !v.is_null(),
            "{k} is not a scalar: {line}"
        );
        if let Some(s) = v.as_str() {
            for debug in ["Some(", "None", "\\\"", "[\""] {
                assert!(!s.contains(debug), "{k} holds a debug rendering: {s}");
            }
        }
    }
    let ms = line["duration_ms"].as_f64().expect("duration_ms a number");
    assert!(ms >= 0.0);
    assert_eq!(
        (ms * 1000.0).round() / 1000.0,
        ms,
        "duration_ms rounded to the microsecond: {ms}"
    );
}

async fn metric(proxy: &Meridian, series: &str) -> Option<f64> {
    let page = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test]
async fn a_failed_over_request_and_a_residency_refusal_log_every_field() {
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let (eu_url, us_url) = (dead_endpoint(1), dead_endpoint(2));
    let mut config = base_config();
    config.push_str("[geoip]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndefault_region = \"us-east\"\n\n");
    // No probes: the dead endpoints stay candidates, so the request meets them.
    config.push_str("[health]\nenabled = false\n\n[retry]\nmax_attempts = 2\n\n");
    config.push_str(&region("eu-west", [53.35, -6.26], &["IE"], &[eu_url]));
    config.push_str(&region(
        "us-east",
        [39.04, -77.49],
        &["US"],
        std::slice::from_ref(&us_url),
    ));
    // Placed far away so that it is not the second choice of an Irish client.
    config.push_str(&region("uk-south", [1.35, 103.82], &["GB"], &[uk.url()]));
    config.push_str("[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n");
    config.push_str("[[route]]\npath_prefix = \"/v1/fine_tuning\"\nregions = [\"us-east\"]\n\n");
    let proxy = Meridian::start(&config);

    // Failed over from eu-west to us-east, and failed there too.
    let headers = [
        ("x-forwarded-for", ips::IE),
        ("x-request-id", "req-failed-over"),
        ("user-agent", "observe-test/1.0"),
        ("traceparent", TRACEPARENT),
    ];
    let r = call("GET", proxy.listen, "/v1/models", &headers, Bytes::new()).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("x-meridian-attempts"), Some("2"));
    assert_eq!(r.json()["error"]["code"], "upstream_unreachable");
    let body = r.text();
    for detail in ["os error", "tcp connect", "errno"] {
        assert!(
            !body.to_lowercase().contains(detail),
            "detail sent to the client: {body}"
        );
    }
    let sent_bytes = r.body.len() as u64;

    eventually("access line of the failed request", || async {
        access_line(&proxy, "req-failed-over").is_some()
    })
    .await;
    let line = access_line(&proxy, "req-failed-over").unwrap();
    check_shape(&line);
    let listen = proxy.listen.to_string();
    let strings = [
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("client_ip", ips::IE),
        ("country", "IE"),
        ("zone", "-"),
        ("method", "GET"),
        ("protocol", "HTTP/1.1"),
        ("host", listen.as_str()),
        ("path", "/v1/models"),
        ("user_agent", "observe-test/1.0"),
        ("region", "us-east"),
        ("endpoint", us_url.as_str()),
        ("failover_reason", "retry"),
        ("error", "upstream_unreachable"),
        ("end", "local"),
        ("message", "request"),
    ];
    for (field, want) in strings {
        assert_eq!(line[field], want, "{field} in {line}");
    }
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["status"], 502);
    assert_eq!(line["bytes_in"], 0);
    assert_eq!(line["bytes_out"].as_u64(), Some(sent_bytes));
    assert!(line.get("upstream_status").is_none(), "no endpoint answered: {line}");
    assert!(line.get("ttfb_ms").is_none(), "no endpoint answered: {line}");
    let detail = line["error_detail"].as_str().expect("error_detail in the log");
    assert!(!detail.is_empty());

    // A residency refusal: a GB client on a path whose rule names a region outside its zone.
    let headers = [("x-forwarded-for", ips::GB), ("x-request-id", "req-residency")];
    let r = call("POST", proxy.listen, "/v1/fine_tuning/jobs", &headers, "{}").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "residency_forbidden");
    assert_eq!(r.header("x-meridian-attempts"), None, "nothing was attempted");
    let sent_bytes = r.body.len() as u64;
    eventually("access line of the refusal", || async {
        access_line(&proxy, "req-residency").is_some()
    })
    .await;
    let line = access_line(&proxy, "req-residency").unwrap();
    check_shape(&line);
    let strings = [
        ("trace_id", "-"),
        ("client_ip", ips::GB),
        ("country", "GB"),
        ("zone", "uk"),
        ("method", "POST"),
        ("protocol", "HTTP/1.1"),
        ("host", listen.as_str()),
        ("path", "/v1/fine_tuning/jobs"),
        ("user_agent", "-"),
        ("region", "-"),
        ("endpoint", "-"),
        ("failover_reason", "-"),
        ("error", "residency_forbidden"),
        ("end", "local"),
    ];
    for (field, want) in strings {
        assert_eq!(line[field], want, "{field} in {line}");
    }
    assert_eq!(line["attempts"], 0);
    assert_eq!(line["status"], 403);
    assert_eq!(line["bytes_in"], 0);
    assert_eq!(line["bytes_out"].as_u64(), Some(sent_bytes));
    for absent in ["upstream_status", "ttfb_ms", "error_detail"] {
        assert!(line.get(absent).is_none(), "{absent} in {line}");
    }

    // In the metrics the refusal is Meridian's, not a region's.
    let refused = r#"meridian_requests_total{region="none",status_class="4xx"}"#;
    assert_eq!(metric(&proxy, refused).await, Some(1.0));
    let by_design = r#"meridian_residency_rejections_total{kind="route_rule",zone="uk"}"#;
    assert_eq!(metric(&proxy, by_design).await, Some(1.0));
    let failed = r#"meridian_requests_total{region="us-east",status_class="5xx"}"#;
    assert_eq!(metric(&proxy, failed).await, Some(1.0));
}
