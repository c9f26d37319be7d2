//! The live `/metrics` page of the real binary: per-endpoint series, model-server load as
//! gauges, bytes, certificate expiry, GeoIP build time and process metrics; and, where
//! `promtool` is installed, `promtool check metrics` finds nothing to say.

mod support;

use bytes::Bytes;
use meridian::health::exposition::{Line, parse_line};
use support::certs::TestCa;
use support::*;

/// The value of the series written exactly as `series` (name and sorted labels).
fn series(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.starts_with(' ').then(|| rest.trim().parse().ok()).flatten()
    })
}

#[tokio::test]
async fn the_metrics_page_has_per_endpoint_load_tls_and_process_series() {
    let live = FakeUpstream::start("eu-west").await.unwrap();
    live.set_metrics(include_str!("../src/health/fixtures/vllm.prom"));
    let dead_url = dead_endpoint(1);

    let ca = TestCa::new("meridian test CA");
    let dir = tempfile::tempdir().unwrap();
    let leaf = ca.leaf(&["localhost"]);
    let (cert, key) = leaf.write(dir.path(), "default");
    let server = format!("[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n");
    let mut config = base_config().replace("[server]\n", &server);
    config.push_str("[geoip]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndefault_region = \"us-east\"\n\n");
    config.push_str("[health]\ninterval = \"200ms\"\n\n");
    config.push_str(&region("eu-west", [53.35, -6.26], &["IE"], &[live.url()]));
    config.push_str("load = { source = \"vllm\", path = \"/metrics\" }\n\n");
    config.push_str(&region(
        "us-east",
        [39.04, -77.49],
        &["US"],
        std::slice::from_ref(&dead_url),
    ));
    let proxy = Meridian::start(&config);

    // A US client: refused by us-east's dead endpoint, then served by eu-west.
    let r = call(
        "POST",
        proxy.listen,
        "/v1/chat/completions",
        &[("x-forwarded-for", ips::US)],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let served_bytes = r.body.len() as f64;

    let live_labels = format!("endpoint=\"{}\",region=\"eu-west\"", live.url());
    let dead_labels = format!("endpoint=\"{dead_url}\",region=\"us-east\"");
    let page = || async { call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text() };
    eventually("model-server load scraped and the request counted", || async {
        let p = page().await;
        series(&p, &format!("meridian_endpoint_queue_depth{{{live_labels}}}")).is_some()
            && series(&p, "meridian_response_bytes_total{region=\"eu-west\"}").is_some()
    })
    .await;
    let p = page().await;
    let get = |s: &str| series(&p, s).unwrap_or_else(|| panic!("{s} not on the page:\n{p}"));

    assert_eq!(get(&format!("meridian_endpoint_queue_depth{{{live_labels}}}")), 7.0);
    assert_eq!(
        get(&format!("meridian_endpoint_kv_cache_usage_ratio{{{live_labels}}}")),
        0.7315271966527197
    );
    assert_eq!(get(&format!("meridian_endpoint_in_flight{{{live_labels}}}")), 0.0);
    assert_eq!(get(&format!("meridian_endpoint_requests_total{{{live_labels}}}")), 1.0);
    assert_eq!(get(&format!("meridian_endpoint_requests_total{{{dead_labels}}}")), 1.0);
    assert_eq!(
        get(&format!(
            "meridian_endpoint_errors_total{{class=\"connect_failure\",{dead_labels}}}"
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            "meridian_endpoint_errors_total{{class=\"connect_failure\",{live_labels}}}"
        )),
        0.0
    );
    assert_eq!(
        get(&format!("meridian_endpoint_ttfb_seconds_count{{{live_labels}}}")),
        1.0
    );
    assert_eq!(get("meridian_request_bytes_total{region=\"eu-west\"}"), 2.0);
    assert_eq!(get("meridian_response_bytes_total{region=\"eu-west\"}"), served_bytes);

    let expiry = meridian::observe::cert_expiry::not_after(&leaf.der).expect("test leaf expiry") as f64;
    let cert_series = format!("meridian_tls_certificate_expiry_timestamp_seconds{{certificate={cert:?}}}");
    assert_eq!(get(&cert_series), expiry);
    assert!(get("meridian_geoip_database_build_timestamp_seconds{database=\"embedded\"}") > 1.5e9);
    if cfg!(target_os = "linux") {
        assert!(get("process_resident_memory_bytes") > 0.0);
        assert!(get("process_open_fds") > 0.0);
    }
    // No fallback configured: no breaker series.
    assert!(!p.contains("meridian_fallback_breaker_state{"));

    // Every line reads under the strict exposition reader.
    for line in p.lines() {
        assert!(!matches!(parse_line(line), Err(_) | Ok(Line::Comment)), "{line}");
    }

    // promtool, when this machine has it (CI installs it where it can).
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: `promtool check metrics` skipped");
        return;
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(p.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics:\n{said}"
    );
}
