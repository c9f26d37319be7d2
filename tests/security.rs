//! Regression tests for the attack sweep of issue 18, with the bytes it showed: raw TCP
//! clients against the real binary, raw-socket and fake upstreams on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const US_EAST: [f64; 2] = [39.04, -77.49];
const UK_SOUTH: [f64; 2] = [51.51, -0.13];

/// The error code of a Meridian JSON error, in the first edition's flat shape or the
/// OpenAI shape (`error.code`).
fn code(body: &serde_json::Value) -> Option<String> {
    let e = &body["error"];
    e["code"].as_str().or_else(|| e.as_str()).map(str::to_string)
}

/// One raw HTTP/1.1 exchange: what came back before the server closed or `wait` passed.
struct Raw {
    head: String,
    body: Vec<u8>,
    /// The server closed the connection.
    closed: bool,
}

impl Raw {
    fn status(&self) -> u16 {
        self.head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body with chunked framing removed (as far as it got).
    fn dechunked(&self) -> Vec<u8> {
        if !self.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            return self.body.clone();
        }
        let mut out = Vec::new();
        let mut rest = &self.body[..];
        while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..i]).unwrap_or("0").trim(), 16).unwrap_or(0);
            rest = &rest[i + 2..];
            if size == 0 {
                break;
            }
            let take = size.min(rest.len());
            out.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            rest = rest.strip_prefix(b"\r\n").unwrap_or(rest);
        }
        out
    }

    /// True when a chunked body ended with its last-chunk marker.
    fn chunked_complete(&self) -> bool {
        self.body.ends_with(b"0\r\n\r\n")
    }
}

/// Reads one response (head and what the body framing says, or up to close) within `wait`.
async fn read_response(stream: &mut TcpStream, wait: Duration) -> Raw {
    let mut buf = Vec::new();
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let body = &buf[end + 4..];
            let probe = Raw {
                head: head.clone(),
                body: body.to_vec(),
                closed,
            };
            let done = match probe.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
                Some(n) => body.len() >= n,
                None => probe.chunked_complete(),
            };
            if done || closed {
                return probe;
            }
        } else if closed {
            return Raw {
                head: String::from_utf8_lossy(&buf).to_string(),
                body: Vec::new(),
                closed,
            };
        }
        let mut chunk = [0u8; 65536];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed = true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {
                let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(buf.len());
                return Raw {
                    head: String::from_utf8_lossy(&buf[..end]).to_string(),
                    body: buf.get(end + 4..).unwrap_or_default().to_vec(),
                    closed: false,
                };
            }
        }
    }
}

/// Sends `bytes` on a new connection and reads one response.
async fn raw(target: SocketAddr, bytes: &[u8]) -> Raw {
    let mut s = TcpStream::connect(target).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_response(&mut s, DEADLINE).await
}

/// Whether the server closes `s` (EOF or reset) within the deadline, reading past anything
/// it sends first.
async fn closes(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A raw endpoint: answers probes with 200, and hands every other request's socket to
/// `answer` (after its head has been read). Returns its URL and the count of such requests.
async fn raw_upstream<F, Fut>(answer: F) -> (String, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                if head.starts_with("GET /health") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                        .await;
                    return;
                }
                seen.fetch_add(1, Ordering::SeqCst);
                answer(s, head).await;
            });
        }
    });
    (url, count)
}

fn one_region(server: &str, url: &str) -> String {
    let mut c = base_config().replace("[server]\n", &format!("[server]\n{server}"));
    c.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    c.push_str(&region("us-east", US_EAST, &["US"], &[url.to_string()]));
    c
}

/// Item 1: a GB client's dot-segment paths are matched, and sent, normalised.
#[tokio::test(flavor = "multi_thread")]
async fn dot_segments_do_not_bypass_residency() {
    let us = FakeUpstream::start("us").await.unwrap();
    let uk = FakeUpstream::start("uk").await.unwrap();
    let mut c = base_config();
    c.push_str(&region("us-east", US_EAST, &["US"], &[us.url()]));
    c.push_str(&region("uk-south", UK_SOUTH, &["GB"], &[uk.url()]));
    c.push_str("[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n");
    c.push_str("[[route]]\npath_prefix = \"/v1/models\"\nregions = [\"us-east\"]\nresidency_exempt = true\n\n");
    let proxy = Meridian::start(&c);

    let models = raw(
        proxy.listen,
        format!(
            "GET /v1/models HTTP/1.1\r\nHost: api\r\nX-Forwarded-For: {}\r\n\r\n",
            ips::GB
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(models.header("x-meridian-region").as_deref(), Some("us-east"));

    let attacks = [
        "/v1/models/../files/file-abc/content",
        "/v1/models/%2e%2e/files/file-abc/content",
        "/v1/models/%2E%2E/files/file-abc/content",
        "/v1/models/./../files/file-abc/content",
        "/v1/models/..%2Ffiles/file-abc/content",
        "/v1/models//../../v1/files/file-abc/content",
    ];
    let us_before = us.requests();
    for path in attacks {
        let r = raw(
            proxy.listen,
            format!(
                "GET {path}?purpose=x HTTP/1.1\r\nHost: api\r\nX-Forwarded-For: {}\r\n\r\n",
                ips::GB
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(r.status(), 200, "{path}: {}", r.head);
        assert_eq!(r.header("x-meridian-region").as_deref(), Some("uk-south"), "{path}");
        let seen = uk.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.path, "/v1/files/file-abc/content?purpose=x", "{path}");
    }
    assert_eq!(
        us.requests(),
        us_before,
        "the exempt region served a normalised non-exempt path"
    );

    let above = raw(proxy.listen, b"GET /v1/../../etc/passwd HTTP/1.1\r\nHost: api\r\n\r\n").await;
    assert_eq!(above.status(), 400);
    assert_eq!(code(&above.json()).as_deref(), Some("bad_request"));
}

/// Items 2 and 3: a declared body that never comes is the client's fault: 408, the
/// connection closed, and the endpoint stays in.
#[tokio::test(flavor = "multi_thread")]
async fn stalled_bodies_get_408_and_never_eject() {
    let uk = FakeUpstream::start("uk").await.unwrap();
    let mut c = base_config().replace(
        "[server]\n",
        "[server]\nrequest_timeout = \"1s\"\nbody_timeout = \"500ms\"\n",
    );
    c.push_str("[outlier]\nconsecutive_errors = 3\n\n");
    c.push_str(&region(
        "us-east",
        US_EAST,
        &["US"],
        &[FakeUpstream::start("us").await.unwrap().url()],
    ));
    c.push_str(&region("uk-south", UK_SOUTH, &["GB"], &[uk.url()]));
    c.push_str("[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n");
    let proxy = Meridian::start(&c);

    // Streamed (above the replay limit) and kept (small) bodies, five of each.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let target = proxy.listen;
        tasks.push(tokio::spawn(async move {
            let (length, sent): (usize, &[u8]) = if i % 2 == 0 { (1_100_000, b"") } else { (100, b"hello") };
            let mut s = TcpStream::connect(target).await.unwrap();
            let head = format!(
                "POST /v1/files HTTP/1.1\r\nHost: api\r\nX-Forwarded-For: {}\r\nContent-Length: {length}\r\n\r\n",
                ips::GB
            );
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(sent).await.unwrap();
            let r = read_response(&mut s, DEADLINE).await;
            (r.status(), code(&r.json()), closes(&mut s).await)
        }));
    }
    for t in tasks {
        let (status, code, closed) = t.await.unwrap();
        assert_eq!(status, 408);
        assert_eq!(code.as_deref(), Some("bad_request"));
        assert!(closed, "a stalled body's connection stayed open");
    }
    let r = get_as(proxy.listen, ips::GB, "/v1/models").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.region(), Some("uk-south"));
}

/// Item 4: a POST an endpoint may have executed is not sent to another one.
#[tokio::test(flavor = "multi_thread")]
async fn non_replayable_posts_are_never_sent_twice() {
    let a = FakeUpstream::start("a").await.unwrap();
    let b = FakeUpstream::start("b").await.unwrap();
    a.set_behavior(Behavior::Reset);
    b.set_behavior(Behavior::Reset);
    let mut c = base_config();
    c.push_str(&region("us-east", US_EAST, &["US"], &[a.url(), b.url()]));
    let proxy = Meridian::start(&c);

    let r = call("POST", proxy.listen, "/v1/files", &[], "file bytes").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(code(&r.json()).as_deref(), Some("upstream_unreachable"));
    assert_eq!(r.header("x-meridian-attempts"), Some("1"));
    assert_eq!(a.requests() + b.requests(), 1, "the upload reached two endpoints");

    // Replayable: an inference path, an Idempotency-Key, an idempotent method.
    a.set_behavior(Behavior::Ok);
    for (method, path, headers) in [
        ("POST", "/v1/chat/completions", &[][..]),
        ("POST", "/v1/files", &[("idempotency-key", "k-1")][..]),
        ("PUT", "/v1/files/f", &[][..]),
    ] {
        let mut served = 0;
        for _ in 0..4 {
            let r = call(method, proxy.listen, path, headers, "{}").await;
            assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
            served += 1;
        }
        assert_eq!(served, 4);
    }
}

/// The other side of item 2: an endpoint that stops taking a streamed body is still held
/// to `request_timeout` (504), though the body was never fully sent.
#[tokio::test(flavor = "multi_thread")]
async fn endpoint_not_reading_a_streamed_body_times_out() {
    let (url, _) = raw_upstream(|s, _| async move {
        // Holds the connection, reads nothing more, answers nothing.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    })
    .await;
    let proxy = Meridian::start(&one_region("request_timeout = \"1s\"\n", &url));
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    let total = 6 << 20;
    s.write_all(format!("POST /v1/files HTTP/1.1\r\nHost: api\r\nContent-Length: {total}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..total / chunk.len() {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let got = tokio::time::timeout(DEADLINE, async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    writer.abort();
    assert!(got.is_ok(), "no answer: the endpoint held a half-sent body for ever");
    let head = String::from_utf8_lossy(&buf);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
}

/// Item 5: an SSE stream cut mid-line ends that line and event before `event: error`.
#[tokio::test(flavor = "multi_thread")]
async fn cut_sse_stream_closes_the_partial_event() {
    let (url, _) = raw_upstream(|mut s, _| async move {
        let _ = s
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n12\r\ndata: {\"tok\": \"hal\r\n",
            )
            .await;
        let _ = s.flush().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Reset, not a clean close (the drop does not block: nothing is left to send).
        #[allow(deprecated)]
        let _ = s.set_linger(Some(Duration::ZERO));
    })
    .await;
    let proxy = Meridian::start(&one_region("", &url));
    let r = raw(proxy.listen, b"GET /v1/stream HTTP/1.1\r\nHost: api\r\n\r\n").await;
    let body = String::from_utf8_lossy(&r.dechunked()).to_string();
    assert!(
        body.starts_with("data: {\"tok\": \"hal\n\nevent: error\ndata: "),
        "partial event merged into the error: {body:?}"
    );
    assert!(body.ends_with("\n\n"), "{body:?}");
    eventually_log(&proxy, "\"end\":\"upstream_error\"").await;
}

async fn eventually_log(proxy: &Meridian, needle: &str) {
    eventually(needle, || async { proxy.logs().iter().any(|l| l.contains(needle)) }).await;
}

/// Item 6: both framings: relayed chunked, whole; a short Content-Length body aborts.
#[tokio::test(flavor = "multi_thread")]
async fn response_framing_is_never_silently_truncated() {
    let (url, _) = raw_upstream(|mut s, head| async move {
        let reply: &[u8] = if head.starts_with("GET /both") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\na\r\n0123456789\r\n0\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"
        };
        let _ = s.write_all(reply).await;
        let _ = s.flush().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    })
    .await;
    let proxy = Meridian::start(&one_region("", &url));
    let both = raw(proxy.listen, b"GET /both HTTP/1.1\r\nHost: api\r\n\r\n").await;
    assert_eq!(both.status(), 200, "{}", both.head);
    assert_eq!(both.header("content-length"), None, "{}", both.head);
    assert_eq!(both.dechunked(), b"0123456789");

    let short = raw(proxy.listen, b"GET /short HTTP/1.1\r\nHost: api\r\n\r\n").await;
    assert_eq!(short.header("content-length").as_deref(), Some("10"));
    assert!(short.closed && short.body.len() < 10, "a short body looked complete");

    // HTTP/2: the stream ends in an error, whether the cut came with the head or after it.
    let stream = TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://{}/short", proxy.listen))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(DEADLINE, http_body_util::BodyExt::collect(resp.into_body()))
        .await
        .unwrap();
    assert!(body.is_err(), "a short body looked complete over HTTP/2: {body:?}");
}

/// Item 7: `header_read_timeout` for a silent new connection and a half-sent head;
/// `idle_timeout` (longer) between kept-alive requests.
#[tokio::test(flavor = "multi_thread")]
async fn header_and_idle_timeouts_are_not_swapped() {
    let up = FakeUpstream::start("us").await.unwrap();
    let proxy = Meridian::start(&one_region(
        "header_read_timeout = \"1s\"\nidle_timeout = \"60s\"\n",
        &up.url(),
    ));
    // A new connection that sends nothing, and one that stops inside its head.
    let mut silent = TcpStream::connect(proxy.listen).await.unwrap();
    let mut partial = TcpStream::connect(proxy.listen).await.unwrap();
    partial.write_all(b"GET /v1/models HTTP/1.1\r\nHost: a").await.unwrap();
    assert!(
        closes(&mut silent).await,
        "a silent new connection was held past header_read_timeout"
    );
    assert!(
        closes(&mut partial).await,
        "a half-sent head was held past header_read_timeout"
    );

    // Kept alive for longer than header_read_timeout: still usable.
    let mut kept = TcpStream::connect(proxy.listen).await.unwrap();
    kept.write_all(b"GET /v1/models HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut kept, DEADLINE).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    kept.write_all(b"GET /v1/models HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let again = read_response(&mut kept, DEADLINE).await;
    assert_eq!(
        again.status(),
        200,
        "idle keep-alive connection closed early: {:?}",
        again.head
    );
}

/// Item 8: a client that stops reading is cut off at `send_timeout` and its upstream
/// request cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn client_that_does_not_read_is_cut_and_upstream_cancelled() {
    let (url, mut cancelled_rx) = endless_stream_upstream().await;
    let proxy = Meridian::start(&one_region("send_timeout = \"1s\"\nstall_timeout = \"60s\"\n", &url));
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(proxy.listen).await.unwrap();
    s.write_all(b"GET /v1/stream HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    // Never read: the upstream must be let go of.
    let cancelled = tokio::time::timeout(DEADLINE, cancelled_rx.recv()).await;
    assert!(
        cancelled.is_ok(),
        "the upstream request was held for a client that does not read"
    );
    drop(s);
}

/// A raw endpoint that streams SSE until Meridian lets go; the receiver hears when it did.
async fn endless_stream_upstream() -> (String, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (cancelled_tx, cancelled_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (url, _) = raw_upstream(move |mut s, _| {
        let cancelled = cancelled_tx.clone();
        async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .await;
            let event = format!("{:x}\r\ndata: {}\n\n\r\n", 8 + 1024, "x".repeat(1024));
            while s.write_all(event.as_bytes()).await.is_ok() {}
            let _ = cancelled.send(());
        }
    })
    .await;
    (url, cancelled_rx)
}

/// Item 8, HTTP/2: a stream whose window the client keeps shut (while it pings) is cut at
/// `send_timeout` and its upstream request cancelled.
#[tokio::test(flavor = "multi_thread")]
async fn h2_stream_with_a_shut_window_is_cut_and_upstream_cancelled() {
    let (url, mut cancelled) = endless_stream_upstream().await;
    let proxy = Meridian::start(&one_region("send_timeout = \"1s\"\nstall_timeout = \"60s\"\n", &url));
    let stream = TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(200))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(1024)
        .handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(format!("http://{}/v1/stream", proxy.listen))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    // The head is taken; the body never is, so the stream's window stays shut.
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let cut = tokio::time::timeout(DEADLINE, cancelled.recv()).await;
    assert!(
        cut.is_ok(),
        "the upstream request was held for a stream whose window stayed shut"
    );
    drop(resp);
}

/// Item 9: duplicate Host, absolute-form authority, CONNECT.
#[tokio::test(flavor = "multi_thread")]
async fn host_and_method_are_checked() {
    let up = FakeUpstream::start("us").await.unwrap();
    let proxy = Meridian::start(&one_region("", &up.url()));
    let dup = raw(proxy.listen, b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").await;
    assert_eq!(dup.status(), 400);
    assert_eq!(code(&dup.json()).as_deref(), Some("bad_request"));

    let absolute = raw(
        proxy.listen,
        b"GET http://real.example/v1/models HTTP/1.1\r\nHost: spoof.example\r\n\r\n",
    )
    .await;
    assert_eq!(absolute.status(), 200);
    let seen = up.seen();
    assert_eq!(seen.last().unwrap().headers["host"], "real.example");

    let before = up.requests();
    let connect = raw(
        proxy.listen,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(connect.status(), 405, "{}", connect.head);
    assert!(
        connect.head.to_ascii_lowercase().contains("\r\nallow: get"),
        "a 405 says what is allowed: {}",
        connect.head
    );
    assert_eq!(code(&connect.json()).as_deref(), Some("bad_request"));
    assert_eq!(up.requests(), before, "CONNECT reached the endpoint");
}

/// Item 9, HTTP/2: a `host` that differs from `:authority` is refused.
#[tokio::test(flavor = "multi_thread")]
async fn h2_host_must_match_authority() {
    let up = FakeUpstream::start("us").await.unwrap();
    let proxy = Meridian::start(&one_region("", &up.url()));
    let stream = TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://api.example/v1/models")
        .header("host", "other.example")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    let ok = http::Request::builder()
        .uri("http://api.example/v1/models")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(ok).await.unwrap().status(), 200);
}

/// Item 10: trust leaks both ways, and hyper's own refusals carry the JSON body.
#[tokio::test(flavor = "multi_thread")]
async fn trust_leaks_are_closed() {
    let up = FakeUpstream::start("us").await.unwrap();
    up.set_header("x-meridian-attempts", "9");
    let proxy = Meridian::start(&one_region("", &up.url()));

    // 127.0.0.2 is not a trusted proxy.
    let untrusted = call_from(
        "127.0.0.2".parse().unwrap(),
        "GET",
        proxy.listen,
        "/v1/models",
        &[("forwarded", "for=6.6.6.6"), ("x-real-ip", "6.6.6.6")],
        "",
    )
    .await;
    assert_eq!(untrusted.status, 200);
    assert_eq!(
        untrusted.header("x-meridian-attempts"),
        None,
        "an endpoint set x-meridian-attempts"
    );
    let seen = up.seen();
    let last = seen.last().unwrap();
    assert!(last.headers.get("forwarded").is_none());
    assert!(last.headers.get("x-real-ip").is_none());

    let named = raw(
        proxy.listen,
        b"GET /v1/models HTTP/1.1\r\nHost: api.example\r\nX-Forwarded-For: 81.2.69.142\r\nConnection: host, x-forwarded-for\r\n\r\n",
    )
    .await;
    assert_eq!(named.status(), 200);
    let seen = up.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.headers["host"], "api.example");
    assert_eq!(last.headers["x-forwarded-for"], "81.2.69.142, 127.0.0.1");

    let huge = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(100 * 1024));
    let r = raw(proxy.listen, huge.as_bytes()).await;
    assert_eq!(r.status(), 431, "{}", r.head);
    assert_eq!(code(&r.json()).as_deref(), Some("bad_request"), "{:?}", r.body);
    let r = raw(proxy.listen, b"GET / HTTP/1.1\r\nHost a\r\n\r\n").await;
    assert_eq!(r.status(), 400, "{}", r.head);
    assert_eq!(code(&r.json()).as_deref(), Some("bad_request"), "{:?}", r.body);
}

/// Item 11: the admin listener's header timeout, connection cap and duration validation.
#[tokio::test(flavor = "multi_thread")]
async fn admin_listener_is_bounded() {
    let up = FakeUpstream::start("us").await.unwrap();
    let mut c = one_region("header_read_timeout = \"1s\"\n", &up.url());
    c = c.replace("[admin]\n", "[admin]\ntoken_env = \"MERIDIAN_SECURITY_TEST_TOKEN\"\n");
    let proxy = Meridian::start_with_env(&c, &[("MERIDIAN_SECURITY_TEST_TOKEN", "t0ken")]);

    let r = raw(
        proxy.admin,
        b"POST /regions/us-east/drain?for=18000000000000000000s HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t0ken\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 400, "{}", r.head);
    let ok = raw(proxy.admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(ok.status(), 200, "the admin listener stopped answering");

    let mut silent = TcpStream::connect(proxy.admin).await.unwrap();
    assert!(closes(&mut silent).await, "a silent admin connection was held");

    // The cap: connections past it are closed at once while the others are held.
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut s = TcpStream::connect(proxy.admin).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    let mut extra = TcpStream::connect(proxy.admin).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_millis(900), extra.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "connection past the admin cap was served: {n:?}"
    );
}

/// An endpoint's response head is held to 64 KiB (docs/configuration.md) even when it
/// arrives whole in one write: the attempt fails, and the client gets `502` (a GET would be
/// retried, then `503` with no endpoint left).
#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_head_above_64_kib_in_one_write_fails_the_attempt() {
    let head = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
        "v".repeat(100_000)
    );
    let r = answer_to_a_post_when_the_endpoint_sends(head.into_bytes()).await;
    assert!(!r.head.contains("x-big"), "the oversized head was relayed");
}

/// Sends a non-replayable POST through a proxy whose one endpoint answers `answer` and
/// closes; asserts the attempt failed (docs/routing.md, Retries: the failed attempt's own
/// answer, `502 upstream_unreachable`) and returns Meridian's answer.
async fn answer_to_a_post_when_the_endpoint_sends(answer: Vec<u8>) -> Raw {
    let answer = Arc::new(answer);
    let name = String::from_utf8_lossy(&answer[..answer.len().min(60)]).to_string();
    let (url, seen) = raw_upstream(move |mut s, _| {
        let answer = answer.clone();
        async move {
            let _ = s.write_all(&answer).await;
            let _ = s.flush().await;
        }
    })
    .await;
    let proxy = Meridian::start(&one_region("", &url));
    let r = raw(
        proxy.listen,
        b"POST /v1/files HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert_eq!(
        r.status(),
        502,
        "{name:?}: {} {}",
        r.head,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(
        code(&r.json()).as_deref(),
        Some("upstream_unreachable"),
        "{name:?}: {}",
        r.head
    );
    assert!(seen.load(Ordering::SeqCst) >= 1, "the endpoint was never asked");
    r
}

/// A chunked answer whose framing breaks in the same read as its first chunk: the head and
/// that chunk still reach the client (each chunk is relayed as it is read), then the
/// connection is cut without a last chunk, never ended cleanly. It used to be cut with
/// nothing written: an empty reply.
#[tokio::test]
async fn a_body_that_breaks_in_its_first_read_relays_what_came_then_cuts() {
    let (url, _) = raw_upstream(|mut s, _| async move {
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\n")
            .await;
        let _ = s.flush().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    })
    .await;
    let proxy = Meridian::start(&one_region("", &url));
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: api\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was never cut: {}", String::from_utf8_lossy(&got)),
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("hello"), "the chunk read before the failure: {got}");
    assert!(!got.ends_with("0\r\n\r\n"), "a cut body must not end cleanly: {got}");
}

/// Answers Meridian cannot relay faithfully fail the attempt, as NGINX answers them 502: a
/// status outside 100–599, and a transfer coding other than `chunked` last (relayed without
/// `Transfer-Encoding`, a client would take the coded bytes for the content).
#[tokio::test]
async fn answers_with_an_unknown_coding_or_status_fail_the_attempt() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n\x1f\x8b\x08"[..],
        &b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok"[..],
    ] {
        answer_to_a_post_when_the_endpoint_sends(answer.to_vec()).await;
    }
}

/// HEAD is answered wherever GET is on the admin listener (load balancers check health with
/// it): the same status, GET's length, no body.
#[tokio::test]
async fn admin_health_answers_head() {
    let proxy = Meridian::start(&one_region("", "http://127.0.0.1:9"));
    for path in ["/healthz", "/metrics"] {
        let mut s = TcpStream::connect(proxy.admin).await.unwrap();
        s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
            .await
            .expect("the admin listener closes after the answer")
            .unwrap();
        let got = String::from_utf8_lossy(&got);
        let (head, body) = got.split_once("\r\n\r\n").unwrap_or((&got, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {got}");
        assert!(body.is_empty(), "{path}: a HEAD answer with a body: {got}");
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(str::to_string)
            })
            .and_then(|v| v.trim().parse::<u64>().ok());
        assert!(length.is_some_and(|n| n > 0), "{path}: GET's length: {head}");
    }
}
