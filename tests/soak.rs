//! Bounded soak (opt-in): mixed traffic through two regions while random faults come and go,
//! then checks that no request was lost beyond the documented cases and that the proxy's
//! file descriptors and resident memory did not grow.
//!
//! `cargo test --test soak -- --ignored` (about 45 s; `MERIDIAN_SOAK_SECS` sets 10–60).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;

const US_EAST: [f64; 2] = [39.04, -77.49];
const US_WEST: [f64; 2] = [45.6, -121.2];
const REQUEST_TIMEOUT: Duration = Duration::from_millis(800);
/// Descriptors the proxy may hold more at the end than after warm-up: pooled upstream
/// connections to four endpoints for a handful of clients, and probe connections.
const FD_SLACK: usize = 64;
/// Resident memory growth allowed between warm-up and the end.
const RSS_SLACK_KB: u64 = 32 * 1024;

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    /// Documented: a timeout is not retried (504), a non-idempotent request is not retried
    /// after garbage or a 5xx answer (502 or the endpoint's own status), and a stream cut
    /// after its first byte ends with an SSE error event.
    documented: u64,
    lost: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Get,
    Post,
    Stream,
}

async fn one(target: std::net::SocketAddr, kind: Kind) -> Result<(u16, String, bool), String> {
    let stream = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let xff = ("x-forwarded-for", ips::US);
    let req = match kind {
        Kind::Get => request("GET", target, "/v1/models", &[xff], Bytes::new()),
        Kind::Post => request("POST", target, "/v1/embeddings", &[xff], vec![b'y'; 4096]),
        Kind::Stream => chat_request(
            target,
            &[xff, ("content-type", "application/json")],
            r#"{"stream":true}"#,
        ),
    };
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    match resp.into_body().collect().await {
        Ok(b) => Ok((status, String::from_utf8_lossy(&b.to_bytes()).into_owned(), false)),
        Err(_) => Ok((status, String::new(), true)),
    }
}

fn judge(tally: &mut Tally, kind: Kind, result: Result<(u16, String, bool), String>) {
    let (status, body, broken) = match result {
        Ok(r) => r,
        Err(e) => return tally.lost.push(format!("{kind:?}: {e}")),
    };
    let code = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    let ok = status == 200 && !broken && !body.contains("event: error");
    let documented = match (kind, status) {
        (_, 504) => code.as_deref() == Some("upstream_timeout"),
        (Kind::Post | Kind::Stream, 502) => code.as_deref() == Some("upstream_unreachable"),
        // The endpoint's own 503 to a POST is relayed, not retried.
        (Kind::Post | Kind::Stream, 503) => body.contains("fake 503") || code.is_some(),
        // Cut after the head: an SSE answer (a stalling endpoint streams even to a GET) ends
        // with an error event, a sized body aborts.
        (_, 200) => broken || body.contains("event: error"),
        _ => false,
    };
    if ok {
        tally.ok += 1;
    } else if documented {
        tally.documented += 1;
    } else {
        tally
            .lost
            .push(format!("{kind:?}: {status} {body:.200} broken={broken}"));
    }
}

#[tokio::test]
#[ignore = "soak: cargo test --test soak -- --ignored"]
async fn soak_with_random_faults_loses_nothing_and_leaks_nothing() {
    let secs: u64 = std::env::var("MERIDIAN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45)
        .clamp(10, 60);
    let mut ups = Vec::new();
    for name in ["east-a", "east-b", "west-a", "west-b"] {
        ups.push(FakeUpstream::start(name).await.unwrap());
    }
    let mut c = base_config().replace(
        "[server]\n",
        &format!(
            "[server]\nrequest_timeout = \"{}ms\"\nstall_timeout = \"1s\"\n",
            REQUEST_TIMEOUT.as_millis()
        ),
    );
    c.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    c.push_str("[health]\ninterval = \"200ms\"\ntimeout = \"400ms\"\nunhealthy_after = 2\nhealthy_after = 2\nslow_start = \"1s\"\n\n");
    c.push_str("[outlier]\nconsecutive_errors = 3\nttfb_threshold = \"300ms\"\nejection_time = \"1s\"\nmax_ejection_time = \"4s\"\n\n");
    // Thousands of requests: keep the log to what the check needs.
    c = c.replace(
        "[log]\nformat = \"json\"\n",
        "[log]\nformat = \"json\"\naccess_log = false\n",
    );
    c.push_str(&region("us-east", US_EAST, &["US"], &[ups[0].url(), ups[1].url()]));
    c.push_str(&region("us-west", US_WEST, &[], &[ups[2].url(), ups[3].url()]));
    let proxy = Meridian::start(&c);
    let pid = proxy.pid();
    let target = proxy.listen;

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let kinds = [Kind::Get, Kind::Post, Kind::Stream];
                let mut i = w;
                while !stop.load(Ordering::Acquire) {
                    let kind = kinds[i % kinds.len()];
                    i += 1;
                    match tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(3), one(target, kind)).await {
                        Ok(r) => judge(&mut tally, kind, r),
                        Err(_) => tally.lost.push(format!("{kind:?}: hung past request_timeout")),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tally
            })
        })
        .collect();

    // Warm-up: pools filled, every code path loaded once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (fd_warm, rss_warm) = (fd_count(pid), rss_kb(pid));

    let started = Instant::now();
    let run = Duration::from_secs(secs.saturating_sub(8));
    let mut faults = 0;
    while started.elapsed() < run {
        // One endpoint at a time misbehaves, so a healthy path always exists.
        let i = fastrand::usize(..ups.len());
        let behavior = match fastrand::u8(..6) {
            0 => Behavior::Hang,
            1 => Behavior::SlowFirstByte(Duration::from_millis(400)),
            2 => Behavior::Status(503),
            3 => Behavior::Garbage,
            4 => Behavior::Stall,
            _ => Behavior::Ok,
        };
        let kill = fastrand::bool();
        ups[i].set_behavior(behavior);
        if kill {
            ups[i].kill();
        }
        faults += 1;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(500..1500))).await;
        ups[i].set_behavior(Behavior::Ok);
        if kill {
            ups[i].revive().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(300..1000))).await;
    }
    // Calm, so ejections end and idle connections settle before the last measure.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Release);
    let mut total = Tally::default();
    for w in workers {
        let t = w.await.unwrap();
        total.ok += t.ok;
        total.documented += t.documented;
        total.lost.extend(t.lost);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (fd_end, rss_end) = (fd_count(pid), rss_kb(pid));
    eprintln!(
        "soak: {secs}s, {faults} faults, {} ok, {} documented failures, {} lost; fds {fd_warm} -> {fd_end}, RSS {rss_warm} -> {rss_end} KiB",
        total.ok,
        total.documented,
        total.lost.len()
    );
    assert!(total.lost.is_empty(), "lost requests: {:#?}", total.lost);
    assert!(
        total.ok > 100 * secs / 10,
        "too little traffic got through: {}",
        total.ok
    );
    assert!(fd_warm > 0 && rss_warm > 0, "cannot read /proc/{pid}");
    assert!(
        fd_end <= fd_warm + FD_SLACK,
        "file descriptors grew: {fd_warm} -> {fd_end}"
    );
    assert!(
        rss_end <= rss_warm + RSS_SLACK_KB,
        "RSS grew: {rss_warm} -> {rss_end} KiB"
    );
    let panics: Vec<String> = proxy.logs().into_iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "{panics:?}");
}
