//! Fault injection under steady load: endpoints on 127.0.0.1 in two regions die, hang after
//! accepting, cut streams mid-response, answer garbage and slow down while client tasks keep
//! sending. Each case counts what clients saw (nothing where a retry was possible, otherwise
//! a clean JSON 502/503/504 and never a hang past `request_timeout`), checks that traffic
//! moved, and that nothing panicked. `cargo test --test faults`.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;

const US_EAST: [f64; 2] = [39.04, -77.49];
const US_WEST: [f64; 2] = [45.6, -121.2];

/// Slack over `request_timeout` for a client call: connect, a retry, a slow shared machine.
const MARGIN: Duration = Duration::from_secs(3);

/// Traffic moves away "within seconds" (docs/health.md); generous for a shared machine
/// (about 1–3 s here).
const MOVE_BOUND: Duration = Duration::from_secs(8);

/// Error codes Meridian's own JSON answers may carry (docs/routing.md, Errors).
const ERROR_CODES: [&str; 8] = [
    "no_region_available",
    "residency_unavailable",
    "upstream_unreachable",
    "upstream_timeout",
    "location_refused",
    "residency_forbidden",
    "body_too_large",
    "bad_request",
];

/// Two regions: us-east (two endpoints, home of US clients) and us-west (one endpoint).
struct Rig {
    east_a: FakeUpstream,
    east_b: FakeUpstream,
    west: FakeUpstream,
    proxy: Meridian,
    request_timeout: Duration,
    /// The config the proxy started with.
    config: String,
}

impl Rig {
    async fn start(request_timeout: &str, outlier: &str) -> Rig {
        Rig::start_with(request_timeout, outlier, "").await
    }

    /// `geoip` lines are added to `[geoip]`.
    async fn start_with(request_timeout: &str, outlier: &str, geoip: &str) -> Rig {
        Rig::start_full(request_timeout, outlier, geoip, "").await
    }

    /// `server` lines are added to `[server]`.
    async fn start_full(request_timeout: &str, outlier: &str, geoip: &str, server: &str) -> Rig {
        let east_a = FakeUpstream::start("east-a").await.unwrap();
        let east_b = FakeUpstream::start("east-b").await.unwrap();
        let west = FakeUpstream::start("west").await.unwrap();
        let mut c = base_config().replace(
            "[server]\n",
            &format!("[server]\nrequest_timeout = \"{request_timeout}\"\nstall_timeout = \"2s\"\n{server}"),
        );
        c.push_str(&format!("[geoip]\ndefault_region = \"us-east\"\n{geoip}\n"));
        c.push_str(
            "[health]\ninterval = \"200ms\"\ntimeout = \"500ms\"\nunhealthy_after = 2\nhealthy_after = 2\nslow_start = \"0s\"\n\n",
        );
        // `outlier` lines come last and may replace these defaults.
        let errors = if outlier.contains("consecutive_errors") {
            ""
        } else {
            "consecutive_errors = 3\n"
        };
        c.push_str(&format!("[outlier]\n{errors}ejection_time = \"2s\"\n{outlier}\n\n"));
        c.push_str(&region("us-east", US_EAST, &["US"], &[east_a.url(), east_b.url()]));
        c.push_str(&region("us-west", US_WEST, &[], &[west.url()]));
        let proxy = Meridian::start(&c);
        let request_timeout = humantime::parse_duration(request_timeout).unwrap();
        let rig = Rig {
            east_a,
            east_b,
            west,
            proxy,
            request_timeout,
            config: c,
        };
        eventually("ready after the first probe round", || async {
            try_get(rig.proxy.admin, "/readyz").await == Some(200)
        })
        .await;
        rig
    }

    async fn endpoint_state(&self, url: &str) -> String {
        let Some(status) = admin_json(self.proxy.admin, "/status").await else {
            return String::new();
        };
        status["regions"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["endpoints"].as_array().cloned().unwrap_or_default())
            .find(|e| e["url"] == url)
            .and_then(|e| e["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    fn assert_no_panic(&self) {
        let logs = self.proxy.logs();
        let panics: Vec<&String> = logs.iter().filter(|l| l.contains("panicked")).collect();
        assert!(panics.is_empty(), "panic in the proxy log: {panics:?}");
    }
}

async fn try_get(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    admin_call(addr, path).await.map(|(s, _)| s)
}

async fn admin_json(addr: std::net::SocketAddr, path: &str) -> Option<serde_json::Value> {
    let (_, body) = admin_call(addr, path).await?;
    serde_json::from_slice(&body).ok()
}

async fn admin_call(addr: std::net::SocketAddr, path: &str) -> Option<(u16, Bytes)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", addr, path, &[], Bytes::new()))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, body))
}

/// What kind of request a load worker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Get,
    /// A 10 KiB body to a replay path (`/v1/embeddings`): kept, so retryable after a
    /// refused or reset connection.
    Post,
    /// A 10 KiB upload (`/v1/batches`): not replayable once it may have been sent.
    Upload,
    /// A streamed (SSE) completion.
    Stream,
}

/// What one client saw of one request.
#[derive(Debug, Clone)]
struct Outcome {
    kind: Kind,
    /// When the request was sent and when its answer ended.
    sent: Instant,
    at: Instant,
    status: u16,
    /// The fake endpoint that answered (`x-upstream-region` carries its name).
    upstream: Option<String>,
    body: String,
    /// The response body broke off (transport error after the head).
    body_error: bool,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status == 200 && !self.body_error && !self.body.contains("event: error")
    }

    /// Meridian's own answer: JSON with a documented error code and a message.
    fn clean_error(&self, statuses: &[u16]) -> bool {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        statuses.contains(&self.status)
            && v["error"]["code"].as_str().is_some_and(|c| ERROR_CODES.contains(&c))
            && v["error"]["message"].as_str().is_some_and(|m| !m.is_empty())
    }
}

/// One request over a fresh connection, as a US client. Fails the test if it takes longer
/// than `request_timeout` + [`MARGIN`]: a fault must never turn into a hang.
async fn one(target: std::net::SocketAddr, kind: Kind, limit: Duration) -> Outcome {
    let sent = Instant::now();
    let fut = async {
        let stream = TcpStream::connect(target).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let xff = ("x-forwarded-for", ips::US);
        let req = match kind {
            Kind::Get => request("GET", target, "/v1/models", &[xff], Bytes::new()),
            Kind::Post => request("POST", target, "/v1/embeddings", &[xff], vec![b'x'; 10 * 1024]),
            Kind::Upload => request("POST", target, "/v1/batches", &[xff], vec![b'x'; 10 * 1024]),
            Kind::Stream => chat_request(
                target,
                &[xff, ("content-type", "application/json")],
                r#"{"model":"m","stream":true}"#,
            ),
        };
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, mut body) = resp.into_parts();
        let mut bytes = Vec::new();
        let mut body_error = false;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => {
                    if let Some(d) = f.data_ref() {
                        bytes.extend_from_slice(d);
                    }
                }
                Err(_) => {
                    body_error = true;
                    break;
                }
            }
        }
        Ok::<_, String>(Outcome {
            kind,
            sent,
            at: Instant::now(),
            status: parts.status.as_u16(),
            upstream: parts
                .headers
                .get("x-upstream-region")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: String::from_utf8_lossy(&bytes).into_owned(),
            body_error,
        })
    };
    match tokio::time::timeout(limit + MARGIN, fut).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => panic!("{kind:?}: the proxy refused or dropped the request: {e}"),
        Err(_) => panic!("{kind:?}: no complete answer within request_timeout + {MARGIN:?}"),
    }
}

/// Client tasks sending `kinds` in turn, paced, until `stop` or `max` requests each.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(rig: &Rig, workers: usize, kinds: &'static [Kind]) -> Load {
        const MAX_PER_WORKER: usize = 400;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|w| {
                let (stop, sent, outcomes) = (stop.clone(), sent.clone(), outcomes.clone());
                let (target, limit) = (rig.proxy.listen, rig.request_timeout);
                tokio::spawn(async move {
                    for i in 0..MAX_PER_WORKER {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let o = one(target, kinds[(i + w) % kinds.len()], limit).await;
                        outcomes.lock().unwrap().push(o);
                        sent.fetch_add(1, Ordering::AcqRel);
                        tokio::time::sleep(Duration::from_millis(15)).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            outcomes,
            tasks,
        }
    }

    /// The last `n` answers so far.
    fn recent(&self, n: usize) -> Vec<Outcome> {
        let all = self.outcomes.lock().unwrap();
        all[all.len().saturating_sub(n)..].to_vec()
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::Acquire)
    }

    /// Waits until `n` more requests have been answered. A client task that failed (a hang
    /// or a dropped request) fails the test here, with its own message.
    async fn more(&mut self, n: usize) {
        let target = self.sent() + n;
        let start = Instant::now();
        while self.sent() < target {
            if let Some(i) = self.tasks.iter().position(|t| t.is_finished()) {
                if let Err(e) = self.tasks.remove(i).await {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {n} more answers");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            if let Err(e) = t.await {
                // A worker's panic is the test's failure (a hang or a dropped request).
                std::panic::resume_unwind(e.into_panic());
            }
        }
        let mut all = std::mem::take(&mut *self.outcomes.lock().unwrap());
        all.sort_by_key(|o| o.at);
        all
    }
}

/// Waits until `check` holds, returns how long it took from `since`.
async fn moved<F, Fut>(what: &str, since: Instant, check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually(what, check).await;
    let took = since.elapsed();
    eprintln!("{what}: {took:?} after the fault");
    assert!(took <= MOVE_BOUND, "{what} took {took:?}");
    took
}

fn failures(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| !o.ok()).collect()
}

/// After traffic moved, the last requests all succeeded and none went to `avoid`.
fn assert_settled(outcomes: &[Outcome], after: Instant, avoid: &[&str]) {
    let late: Vec<&Outcome> = outcomes.iter().filter(|o| o.sent > after).collect();
    assert!(late.len() >= 5, "too few requests after traffic moved: {}", late.len());
    for o in late {
        assert!(o.ok(), "failure after traffic moved: {o:?}");
        let up = o.upstream.as_deref().unwrap_or("?");
        assert!(!avoid.contains(&up), "{up} still served after it was taken out: {o:?}");
    }
}

#[tokio::test]
async fn killed_endpoints_cost_no_request() {
    let mut rig = Rig::start("2s", "").await;
    let mut load = Load::start(&rig, 3, &[Kind::Get, Kind::Post]);
    load.more(20).await;

    // One endpoint of the home region dies: its share moves to the other one.
    let t = Instant::now();
    rig.east_a.kill();
    moved("east-a ejected", t, || async {
        rig.endpoint_state(&rig.east_a.url()).await == "ejected"
    })
    .await;
    let settled = Instant::now();
    load.more(15).await;

    // The whole home region dies: the next region takes everything.
    let t = Instant::now();
    rig.east_b.kill();
    moved("east-b ejected", t, || async {
        rig.endpoint_state(&rig.east_b.url()).await == "ejected"
    })
    .await;
    let west_settled = Instant::now();
    load.more(15).await;

    // Both come back: traffic returns home.
    rig.east_a.revive().await.unwrap();
    rig.east_b.revive().await.unwrap();
    let t = Instant::now();
    let home_before = rig.east_a.requests() + rig.east_b.requests();
    moved("traffic back in us-east", t, || async {
        rig.east_a.requests() + rig.east_b.requests() > home_before + 5
    })
    .await;
    let outcomes = load.finish().await;

    // Connection refused, and reset before a response byte, are retried for every request
    // that may be replayed (here: GET and a POST to a replay path).
    let failed = failures(&outcomes);
    assert!(failed.is_empty(), "client-visible errors: {failed:?}");
    assert_settled(
        &outcomes
            .iter()
            .filter(|o| o.at < west_settled)
            .cloned()
            .collect::<Vec<_>>(),
        settled,
        &["east-a"],
    );
    assert!(rig.west.requests() > 0);
    let in_west = outcomes
        .iter()
        .filter(|o| o.at > west_settled && o.upstream.as_deref() == Some("west"))
        .count();
    assert!(in_west >= 10, "us-west took over: {in_west}");
    rig.assert_no_panic();
}

#[tokio::test]
async fn endpoint_that_hangs_after_accepting_answers_504_or_retries_in_time_and_is_ejected() {
    let rig = Rig::start("700ms", "").await;
    let mut load = Load::start(&rig, 3, &[Kind::Get, Kind::Upload]);
    load.more(15).await;

    let t = Instant::now();
    rig.east_a.set_behavior(Behavior::Hang);
    moved("hanging east-a ejected", t, || async {
        rig.endpoint_state(&rig.east_a.url()).await == "ejected"
    })
    .await;
    let settled = Instant::now();
    load.more(20).await;
    let outcomes = load.finish().await;

    // A request that timed out may have been processed: a POST (not replayable) is not
    // retried and gets a clean 504 after one request_timeout; an idempotent GET is retried
    // elsewhere (SPEC "Replays") and succeeds, after that one timeout.
    let failed = failures(&outcomes);
    for o in &failed {
        assert_eq!(o.kind, Kind::Upload, "a replayable request was not retried: {o:?}");
        assert!(o.clean_error(&[504]), "not a clean 504: {o:?}");
        // One request_timeout, not one per attempt: a timed-out POST is not retried.
        let took = o.at - o.sent;
        assert!(
            took < rig.request_timeout + Duration::from_secs(1),
            "504 after {took:?}"
        );
        assert!(
            o.body.contains("upstream_timeout") && o.body.contains("us-east"),
            "{o:?}"
        );
    }
    let retried_gets = outcomes
        .iter()
        .filter(|o| o.kind == Kind::Get && o.ok() && o.at - o.sent >= rig.request_timeout)
        .count();
    // Three timeouts eject it; at most one more per client task was already in flight.
    assert!(!failed.is_empty() || retried_gets > 0, "the hang was never observed");
    assert!(failed.len() <= 3 + 3, "{} timeouts before ejection", failed.len());
    assert_settled(&outcomes, settled, &["east-a"]);
    rig.assert_no_panic();
}

#[tokio::test]
async fn stream_cut_mid_response_ends_cleanly_and_later_requests_go_elsewhere() {
    let rig = Rig::start("2s", "").await;
    // east-a streams slowly, so there is always a stream in flight on it to cut.
    rig.east_a.set_behavior(Behavior::Stream {
        events: 40,
        gap: Duration::from_millis(20),
    });
    let mut load = Load::start(&rig, 3, &[Kind::Stream, Kind::Get]);
    load.more(10).await;
    let started = rig.east_a.requests();
    eventually("a stream starts on east-a", || async {
        rig.east_a.requests() > started
    })
    .await;

    // Closes every open connection of east-a: the stream in flight is cut after its head.
    let t = Instant::now();
    rig.east_a.kill();
    moved("east-a ejected", t, || async {
        rig.endpoint_state(&rig.east_a.url()).await == "ejected"
    })
    .await;
    let settled = Instant::now();
    load.more(15).await;
    let outcomes = load.finish().await;

    // After the first byte nothing can be retried: the client gets the head, what was
    // relayed, then a final SSE error event saying why, and the stream ends.
    let failed = failures(&outcomes);
    assert!(!failed.is_empty(), "no stream was cut");
    assert!(failed.len() <= 3, "more cut streams than client tasks: {failed:?}");
    for o in &failed {
        // east-a streams whatever is asked, so a GET can be cut too.
        assert_eq!((o.status, o.upstream.as_deref()), (200, Some("east-a")), "{o:?}");
        assert!(!o.body_error, "an SSE stream must end with an event, not abort: {o:?}");
        assert!(
            o.body.starts_with("data: ") && o.body.trim_end().ends_with('}'),
            "relayed part, then the error event: {o:?}"
        );
        assert!(
            o.body.contains("event: error") && o.body.contains("\"code\":\"upstream_unreachable\""),
            "{o:?}"
        );
    }
    assert_settled(&outcomes, settled, &["east-a"]);
    for o in outcomes.iter().filter(|o| o.ok() && o.kind == Kind::Stream) {
        assert!(
            o.body.contains("[DONE]"),
            "a stream that was not cut is complete: {o:?}"
        );
    }
    rig.assert_no_panic();
}

#[tokio::test]
async fn garbage_instead_of_http_is_retried_for_idempotent_requests_only() {
    // A high error threshold: the failing probes eject east-a, so the garbage is met by
    // real traffic for a while first, and the brief restart below does not eject it.
    let mut rig = Rig::start("2s", "consecutive_errors = 50").await;
    let mut load = Load::start(&rig, 3, &[Kind::Get, Kind::Post]);
    load.more(15).await;

    // Garbage is chosen per connection: drop east-a's pooled connections so the next
    // requests meet it.
    let t = Instant::now();
    rig.east_a.set_behavior(Behavior::Garbage);
    rig.east_a.kill_and_wait().await;
    rig.east_a.revive().await.unwrap();
    moved("garbling east-a ejected", t, || async {
        rig.endpoint_state(&rig.east_a.url()).await == "ejected"
    })
    .await;
    let settled = Instant::now();
    load.more(20).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    // A garbled answer is a 502 from that endpoint: GET is retried elsewhere (docs/routing.md,
    // Retries); a POST may have been acted on, so it gets a clean 502.
    let gets: Vec<_> = failed.iter().filter(|o| o.kind == Kind::Get).collect();
    assert!(gets.is_empty(), "idempotent requests failed on garbage: {gets:?}");
    for o in &failed {
        assert!(o.clean_error(&[502]), "not a clean 502: {o:?}");
        assert!(o.body.contains("upstream_unreachable"), "{o:?}");
        // A stable text per failure kind: the parser's or the OS's error text stays in the log.
        let v: serde_json::Value = serde_json::from_str(&o.body).unwrap_or_default();
        let stable = [
            "the endpoint could not be reached: invalid response from the endpoint",
            "the endpoint could not be reached: connection closed before a response",
        ];
        assert!(
            v["error"]["message"].as_str().is_some_and(|m| stable.contains(&m)),
            "{o:?}"
        );
    }
    assert!(
        gets.is_empty() && failed.len() < outcomes.len() / 2,
        "{} POSTs failed before ejection",
        failed.len()
    );
    assert!(rig.east_a.connections() > 0);
    assert_settled(&outcomes, settled, &["east-a"]);
    rig.assert_no_panic();
}

#[tokio::test]
async fn slow_first_byte_costs_no_request_and_moves_traffic() {
    let rig = Rig::start("2s", "ttfb_threshold = \"200ms\"").await;
    let mut load = Load::start(&rig, 3, &[Kind::Get, Kind::Stream, Kind::Post]);
    load.more(15).await;

    // One slow endpoint: the balancer's latency estimate steers around it.
    let slow = Behavior::SlowFirstByte(Duration::from_millis(500));
    let t = Instant::now();
    rig.east_a.set_behavior(slow.clone());
    moved("traffic off slow east-a", t, || async {
        let recent = load.recent(10);
        recent.len() == 10 && recent.iter().all(|o| o.upstream.as_deref() == Some("east-b"))
    })
    .await;

    // The whole home region slow: the TTFB outlier check ejects both, us-west serves.
    let t = Instant::now();
    rig.east_b.set_behavior(slow);
    moved("slow us-east ejected", t, || async {
        rig.endpoint_state(&rig.east_a.url()).await == "ejected"
            && rig.endpoint_state(&rig.east_b.url()).await == "ejected"
    })
    .await;
    let settled = Instant::now();
    load.more(20).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    assert!(failed.is_empty(), "slow is not failed: {failed:?}");
    assert_settled(&outcomes, settled, &["east-a", "east-b"]);
    rig.assert_no_panic();
}

#[tokio::test]
async fn whole_region_hanging_is_504_then_the_next_region_serves() {
    let rig = Rig::start("700ms", "").await;
    let mut load = Load::start(&rig, 3, &[Kind::Get]);
    load.more(10).await;

    let t = Instant::now();
    rig.east_a.set_behavior(Behavior::Hang);
    rig.east_b.set_behavior(Behavior::Hang);
    moved("traffic in us-west", t, || async {
        rig.endpoint_state(&rig.east_a.url()).await == "ejected"
            && rig.endpoint_state(&rig.east_b.url()).await == "ejected"
    })
    .await;
    let settled = Instant::now();
    load.more(20).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    for o in &failed {
        assert!(o.clean_error(&[504]), "not a clean 504: {o:?}");
        // One request_timeout, not one per attempt: a timed-out request is not retried.
        let took = o.at - o.sent;
        assert!(
            took < rig.request_timeout + Duration::from_secs(1),
            "504 after {took:?}"
        );
    }
    assert!(failed.len() <= 2 * (3 + 3), "{} timeouts", failed.len());
    assert_settled(&outcomes, settled, &["east-a", "east-b"]);
    rig.assert_no_panic();
}

#[tokio::test]
async fn corrupt_geoip_database_on_reload_keeps_the_old_config_serving() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.mmdb");
    let bad = dir.path().join("bad.mmdb");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/geoip/geo-whois-asn-country.mmdb"),
        &good,
    )
    .unwrap();
    std::fs::write(&bad, b"\x00\x01 not a MaxMind database, truncated mid-download").unwrap();
    let rig = Rig::start_with("2s", "", &format!("database = {:?}\n", good.display().to_string())).await;
    let mut load = Load::start(&rig, 3, &[Kind::Get, Kind::Post]);
    load.more(10).await;
    let rejected = || {
        rig.proxy
            .logs()
            .iter()
            .filter(|l| l.contains("config reload rejected"))
            .count()
    };

    // A new config naming a corrupt database (and moving US clients west): rejected whole.
    let west_block = region("us-west", US_WEST, &[], &[rig.west.url()]);
    let moved_home = rig
        .config
        .replace("countries = [\"US\"]", "countries = []")
        .replace(&west_block, &region("us-west", US_WEST, &["US"], &[rig.west.url()]))
        .replace(&good.display().to_string(), &bad.display().to_string());
    assert!(moved_home.contains("bad.mmdb") && moved_home.contains("countries = [\"US\"]"));
    std::fs::write(&rig.proxy.config_path, &moved_home).unwrap();
    rig.proxy.signal("HUP");
    eventually("the reload is rejected", || async { rejected() >= 1 }).await;
    let line = rig
        .proxy
        .logs()
        .into_iter()
        .find(|l| l.contains("config reload rejected"));
    assert!(line.is_some_and(|l| l.contains("bad.mmdb")), "the error names the file");
    load.more(15).await;

    // The file in force corrupted in place, then a reload: the database already loaded
    // keeps serving.
    std::fs::write(&good, b"\xff garbage").unwrap();
    std::fs::write(&rig.proxy.config_path, &rig.config).unwrap();
    rig.proxy.signal("HUP");
    load.more(15).await;
    let outcomes = load.finish().await;

    let failed = failures(&outcomes);
    assert!(
        failed.is_empty(),
        "client-visible errors across the reloads: {failed:?}"
    );
    // The old table stayed: US clients are still served at home, located by the old file.
    for o in &outcomes {
        let up = o.upstream.as_deref().unwrap_or("?");
        assert!(up.starts_with("east-"), "served by {up} after a rejected reload: {o:?}");
    }
    let r = get_as(rig.proxy.listen, ips::US, "/v1/models").await;
    assert_eq!((r.status, r.region()), (200, Some("us-east")));
    rig.assert_no_panic();
}

/// Sends a `POST /v1/files` whose body stalls: declared but never (fully) sent. Returns the
/// status Meridian answered.
async fn stalled_upload(target: std::net::SocketAddr, streamed: bool) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (length, sent): (usize, &[u8]) = if streamed { (1_100_000, b"") } else { (100, b"hello") };
    let mut s = TcpStream::connect(target).await.unwrap();
    let head = format!(
        "POST /v1/files HTTP/1.1\r\nHost: api\r\nX-Forwarded-For: {}\r\nContent-Length: {length}\r\n\r\n",
        ips::US
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(sent).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Uploads 1.5 MiB in 64 KiB pieces 100 ms apart: longer than `request_timeout` in all,
/// never a gap as long as `body_timeout`.
async fn slow_upload(target: std::net::SocketAddr) -> u16 {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(1);
    let total = 24 * 64 * 1024;
    tokio::spawn(async move {
        for _ in 0..24 {
            if tx
                .send(Ok(hyper::body::Frame::data(Bytes::from(vec![b'u'; 64 * 1024]))))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let body = http_body_util::StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    let stream = TcpStream::connect(target).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri("/v1/files")
        .header("host", "api")
        .header("x-forwarded-for", ips::US)
        .header("content-length", total.to_string())
        .body(body)
        .unwrap();
    match sender.send_request(req).await {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test]
async fn slow_and_stalled_uploads_under_load_never_eject_an_endpoint() {
    // Three endpoint errors in a row would eject; the client-side clocks are short.
    let rig = Rig::start_full("1s", "", "", "body_timeout = \"500ms\"\n").await;
    let mut load = Load::start(&rig, 3, &[Kind::Get, Kind::Post]);
    load.more(10).await;

    let target = rig.proxy.listen;
    let mut attackers = Vec::new();
    for i in 0..6 {
        attackers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..4 {
                statuses.push(stalled_upload(target, i % 2 == 0).await);
            }
            statuses
        }));
    }
    let slow: Vec<_> = (0..2).map(|_| tokio::spawn(slow_upload(target))).collect();
    let urls = [rig.east_a.url(), rig.east_b.url(), rig.west.url()];
    let mut watch_until_done = true;
    while watch_until_done {
        for url in &urls {
            let state = rig.endpoint_state(url).await;
            assert_ne!(
                state, "ejected",
                "{url} was ejected by clients' slow or stalled uploads"
            );
        }
        watch_until_done = !(attackers.iter().all(|a| a.is_finished()) && slow.iter().all(|s| s.is_finished()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for a in attackers {
        for status in a.await.unwrap() {
            assert_eq!(status, 408, "a stalled upload was not answered 408");
        }
    }
    for s in slow {
        assert_eq!(s.await.unwrap(), 200, "a slow but steady upload failed");
    }
    load.more(10).await;
    let outcomes = load.finish().await;
    assert!(failures(&outcomes).is_empty(), "{:?}", failures(&outcomes));
    for url in &urls {
        assert_ne!(rig.endpoint_state(url).await, "ejected", "{url}");
    }
    rig.assert_no_panic();
}

#[tokio::test]
async fn endpoint_dropping_after_reading_the_request_never_duplicates_a_non_replayable_one() {
    let rig = Rig::start("2s", "consecutive_errors = 1000").await;
    rig.east_a.set_behavior(Behavior::Reset);
    let target = rig.proxy.listen;
    let workers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..30 {
                    let id = format!("upload-{w}-{i}");
                    let (path, replayable) = if i % 3 == 0 {
                        ("/v1/chat/completions", true)
                    } else {
                        ("/v1/files", false)
                    };
                    let reply = call(
                        "POST",
                        target,
                        path,
                        &[("x-forwarded-for", ips::US), ("x-upload-id", &id)],
                        "payload",
                    )
                    .await;
                    answers.push((id, replayable, reply.status, reply.text()));
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.unwrap());
    }
    let mut received: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for up in [&rig.east_a, &rig.east_b, &rig.west] {
        for seen in up.seen() {
            if let Some(id) = seen.headers.get("x-upload-id").and_then(|v| v.to_str().ok()) {
                *received.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    let mut refused = 0;
    for (id, replayable, status, body) in &answers {
        let times = received.get(id).copied().unwrap_or(0);
        if *replayable {
            assert_eq!(*status, 200, "{id}: an inference request was not replayed: {body}");
        } else {
            assert_eq!(times, 1, "{id} reached {times} endpoints");
            if *status != 200 {
                assert_eq!(*status, 502, "{id}: {body}");
                assert!(body.contains("upstream_unreachable"), "{id}: {body}");
                refused += 1;
            }
        }
    }
    // east-a met some uploads (it serves about a third of them), so the rule was exercised.
    assert!(refused > 0, "no upload met the dropping endpoint");
    rig.assert_no_panic();
}
