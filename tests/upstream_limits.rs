//! `[upstream]` end to end: idle connections kept per endpoint (`keepalive`), and the
//! per-endpoint connection cap with its wait queue, counted at real loopback endpoints.

mod support;

use std::time::Duration;

use support::*;

/// Probes off, so every connection an endpoint sees comes from forwarded requests.
fn config(upstream: &str, regions: &str) -> String {
    let mut c = base_config();
    c.push_str("[health]\nenabled = false\n\n[outlier]\nconsecutive_errors = 0\n\n");
    c.push_str(&format!("[upstream]\n{upstream}\n\n"));
    c.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    c.push_str(regions);
    c
}

/// `n` requests at once, each on its own connection; their statuses, sorted.
async fn burst(listen: std::net::SocketAddr, n: usize) -> Vec<u16> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move { get_as(listen, ips::US, "/v1/models").await.status });
    }
    let mut statuses = Vec::new();
    while let Some(s) = tasks.join_next().await {
        statuses.push(s.unwrap_or_else(|e| panic!("{e}")));
    }
    statuses.sort_unstable();
    statuses
}

#[tokio::test]
async fn a_burst_opens_no_more_than_max_connections_per_endpoint() {
    let up = FakeUpstream::start("us-east").await.unwrap();
    // Slow enough that the burst's requests overlap at the endpoint.
    up.set_behavior(Behavior::SlowFirstByte(Duration::from_millis(100)));
    let proxy = Meridian::start(&config(
        "max_connections_per_endpoint = 4\nqueue_timeout = \"60s\"",
        &region("us-east", [39.04, -77.49], &["US"], &[up.url()]),
    ));
    let statuses = burst(proxy.listen, 40).await;
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request waited its turn: {statuses:?}"
    );
    assert_eq!(up.requests(), 40);
    let opened = up.connections();
    assert!(
        (1..=4).contains(&opened),
        "{opened} upstream connections for a cap of 4"
    );
}

#[tokio::test]
async fn a_full_endpoint_sends_nothing_and_the_attempt_moves_on() {
    let a = FakeUpstream::start("us-east-a").await.unwrap();
    let b = FakeUpstream::start("us-east-b").await.unwrap();
    for up in [&a, &b] {
        up.set_behavior(Behavior::SlowFirstByte(Duration::from_secs(2)));
    }
    let proxy = Meridian::start(&config(
        "max_connections_per_endpoint = 1\nmax_queue = 0",
        &region("us-east", [39.04, -77.49], &["US"], &[a.url(), b.url()]),
    ));
    // Two requests fill both endpoints (whichever the first pick is, a full one moves on).
    let first = tokio::spawn(burst(proxy.listen, 2));
    eventually("both endpoints busy", || async {
        a.requests() == 1 && b.requests() == 1
    })
    .await;
    // A third finds both full and no queue: refused without reaching either.
    let refused = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(refused.text().contains("no_region_available"), "{}", refused.text());
    assert_eq!((a.requests(), b.requests()), (1, 1), "nothing was sent");
    let statuses = first.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(statuses, vec![200, 200]);
    // The slots were freed with the responses; the endpoints were never marked down.
    for up in [&a, &b] {
        up.set_behavior(Behavior::Ok);
    }
    assert_eq!(get_as(proxy.listen, ips::US, "/v1/models").await.status, 200);
    for url in [a.url(), b.url()] {
        let state = endpoint_status(&proxy, &url).await;
        assert_ne!(state["state"], "ejected", "{url}: {state}");
    }
}

#[tokio::test]
async fn idle_upstream_connections_are_capped_by_keepalive() {
    let up = FakeUpstream::start("us-east").await.unwrap();
    up.set_behavior(Behavior::SlowFirstByte(Duration::from_millis(200)));
    let proxy = Meridian::start(&config(
        "keepalive = 2",
        &region("us-east", [39.04, -77.49], &["US"], &[up.url()]),
    ));
    let statuses = burst(proxy.listen, 20).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(up.connections() > 2, "the burst needed more than the kept connections");
    // Past `keepalive`, connections close as they go idle, long before idle_timeout (60 s).
    eventually("idle upstream connections down to keepalive", || async {
        up.open_connections() <= 2
    })
    .await;
    // The kept ones are reused.
    let before = up.connections();
    assert_eq!(get_as(proxy.listen, ips::US, "/v1/models").await.status, 200);
    assert_eq!(up.connections(), before, "served on a kept connection");
}
