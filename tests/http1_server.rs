//! Meridian's own HTTP/1.1 server, over raw sockets: keep-alive and pipelining, HTTP/1.0,
//! `Expect: 100-continue`, chunked request bodies, HEAD, and a client that goes away with
//! its request in flight (its upstream request is cancelled).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off a stream: status, head text, body (de-chunked).
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Reads one response; `buf` keeps what was read past it. `head_only` for answers to HEAD.
async fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Answer {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                if status == 100 {
                    buf.drain(..end + 4);
                    continue;
                }
                let mut answer = Answer {
                    status,
                    head,
                    body: Vec::new(),
                };
                let mut rest = buf.split_off(end + 4);
                if head_only {
                    *buf = rest;
                    return answer;
                }
                if let Some(len) = answer.header("content-length") {
                    let len: usize = len.parse().unwrap();
                    while rest.len() < len {
                        read_more(s, &mut rest).await;
                    }
                    answer.body = rest.drain(..len).collect();
                } else if answer.header("transfer-encoding").as_deref() == Some("chunked") {
                    loop {
                        let Some(lf) = rest.windows(2).position(|w| w == b"\r\n") else {
                            read_more(s, &mut rest).await;
                            continue;
                        };
                        let size = usize::from_str_radix(std::str::from_utf8(&rest[..lf]).unwrap(), 16).unwrap();
                        while rest.len() < lf + 2 + size + 2 {
                            read_more(s, &mut rest).await;
                        }
                        answer.body.extend_from_slice(&rest[lf + 2..lf + 2 + size]);
                        rest.drain(..lf + 2 + size + 2);
                        if size == 0 {
                            break;
                        }
                    }
                } else {
                    s.read_to_end(&mut rest).await.unwrap();
                    answer.body = std::mem::take(&mut rest);
                }
                *buf = rest;
                return answer;
            }
            read_more(s, buf).await;
        }
    })
    .await
    .expect("a response within the deadline")
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await.unwrap();
    assert!(n > 0, "closed early; have {:?}", String::from_utf8_lossy(buf));
    buf.extend_from_slice(&chunk[..n]);
}

/// True when the server closes the connection (after anything still unread).
async fn closes(s: &mut TcpStream) -> bool {
    let mut sink = Vec::new();
    matches!(
        tokio::time::timeout(DEADLINE, s.read_to_end(&mut sink)).await,
        Ok(Ok(_))
    )
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (up, proxy) = one_region("").await;
    let mut s = connect(proxy.listen).await;
    s.write_all(
        b"GET /v1/one HTTP/1.1\r\nHost: a\r\n\r\nPOST /v1/two HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /v1/three HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    for _ in 0..3 {
        let a = read_answer(&mut s, &mut buf, false).await;
        assert_eq!(a.status, 200, "{}", a.head);
        assert!(a.header("date").is_some(), "a Date header: {}", a.head);
    }
    let paths: Vec<String> = up.seen().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/one", "/v1/two", "/v1/three"]);
    assert_eq!(&up.seen()[1].body[..], b"hello");
    // Still open for a fourth.
    s.write_all(b"GET /v1/four HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("connection").as_deref(), Some("close"));
    assert!(closes(&mut s).await);
}

/// A head that arrives in pieces is answered once it is whole, and so is the shorter one
/// behind it on the same connection (what was parsed of the first is forgotten).
#[tokio::test]
async fn a_head_arriving_in_pieces_is_answered_once_whole() {
    let (up, proxy) = one_region("").await;
    let mut s = connect(proxy.listen).await;
    s.set_nodelay(true).unwrap();
    let mut buf = Vec::new();
    for (path, long) in [("/v1/models", 300), ("/v1/models?second", 10)] {
        let head = format!("GET {path} HTTP/1.1\r\nHost: a\r\nX-Long: {}\r\n\r\n", "x".repeat(long));
        for piece in head.as_bytes().chunks(37) {
            s.write_all(piece).await.unwrap();
            // Apart, so the server reads (and tries to parse) each piece on its own.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let answer = read_answer(&mut s, &mut buf, false).await;
        assert_eq!(answer.status, 200, "{path}: {}", answer.head);
    }
    assert_eq!(up.requests(), 2);
}

#[tokio::test]
async fn http10_closes_unless_kept_alive() {
    let (_up, proxy) = one_region("").await;
    let mut s = connect(proxy.listen).await;
    s.write_all(b"GET /v1/models HTTP/1.0\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let a = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(a.status, 200);
    assert_ne!(
        a.header("transfer-encoding").as_deref(),
        Some("chunked"),
        "no chunked to 1.0"
    );
    assert!(closes(&mut s).await, "HTTP/1.0 without keep-alive closes");

    let mut s = connect(proxy.listen).await;
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /v1/models HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let a = read_answer(&mut s, &mut buf, false).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("connection").as_deref(), Some("keep-alive"), "{}", a.head);
    }
}

#[tokio::test]
async fn expect_continue_gets_100_before_the_body_is_sent() {
    let (up, proxy) = one_region("").await;
    let mut s = connect(proxy.listen).await;
    s.write_all(b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut interim))
        .await
        .expect("a 100 Continue while the body is held back")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello world").await.unwrap();
    let a = read_answer(&mut s, &mut Vec::new(), false).await;
    assert_eq!(a.status, 200);
    assert_eq!(&up.seen()[0].body[..], b"hello world");
}

#[tokio::test]
async fn chunked_request_bodies_arrive_whole_in_pieces() {
    let (up, proxy) = one_region("").await;
    let mut s = connect(proxy.listen).await;
    s.write_all(b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b"6;ext=1\r\n world\r\n0\r\n\r\n").await.unwrap();
    let a = read_answer(&mut s, &mut Vec::new(), false).await;
    assert_eq!(a.status, 200);
    let seen = &up.seen()[0];
    assert_eq!(&seen.body[..], b"hello world");
    assert!(seen.headers.get("transfer-encoding").is_none());
    // A broken chunk is the client's fault: 400, and the connection closes.
    let mut s = connect(proxy.listen).await;
    s.write_all(b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut s, &mut Vec::new(), false).await;
    assert_eq!(a.status, 400, "{}", a.head);
    assert!(closes(&mut s).await);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn head_answers_carry_no_body() {
    let (_up, proxy) = one_region("").await;
    let mut s = connect(proxy.listen).await;
    s.write_all(b"HEAD /v1/models HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let head = read_answer(&mut s, &mut buf, true).await;
    assert_eq!(head.status, 200);
    // The next bytes are the GET's answer, not a body of the HEAD's.
    let get = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(get.status, 200, "{}", get.head);
}

#[tokio::test]
async fn a_client_gone_while_waiting_cancels_its_upstream_request() {
    // Probes far apart: their connection is opened once and left alone, so the count of
    // open upstream connections moves with the request's connection only.
    let up = FakeUpstream::start("us-east").await.unwrap();
    let mut config = base_config();
    config.push_str("[health]\ninterval = \"1h\"\n\n[geoip]\ndefault_region = \"us-east\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[up.url()]));
    let proxy = Meridian::start(&config);
    eventually("the first probe is done", || async { up.probes() >= 1 }).await;
    up.set_behavior(Behavior::SlowFirstByte(Duration::from_secs(60)));
    let mut s = connect(proxy.listen).await;
    s.write_all(b"GET /v1/slow HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    eventually("the request reaches the endpoint", || async { up.requests() == 1 }).await;
    let open = up.open_connections();
    drop(s);
    eventually("the upstream connection is closed", || async {
        up.open_connections() == open - 1
    })
    .await;

    // Mid-stream likewise.
    up.set_behavior(Behavior::Gated { events: 3 });
    let mut s = connect(proxy.listen).await;
    s.write_all(b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 15\r\n\r\n{\"stream\":true}")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let open = up.open_connections();
    drop(s);
    eventually("the streaming upstream connection is closed", || async {
        up.open_connections() == open - 1
    })
    .await;
}

#[tokio::test]
async fn an_endless_request_head_is_refused_at_the_limit() {
    let (up, proxy) = one_region("max_header_bytes = \"8KiB\"\n").await;
    let mut s = connect(proxy.listen).await;
    // No end of head in sight: refused once the limit is reached, not buffered on.
    let _ = s
        .write_all(format!("GET / HTTP/1.1\r\nX-Long: {}", "a".repeat(64 * 1024)).as_bytes())
        .await;
    let a = read_answer(&mut s, &mut Vec::new(), false).await;
    assert_eq!(a.status, 431);
    assert!(String::from_utf8_lossy(&a.body).contains("bad_request"));
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_refused_body_is_never_asked_for() {
    let (up, proxy) = one_region("max_request_body = \"1KiB\"\n").await;
    let mut s = connect(proxy.listen).await;
    s.write_all(b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    // The answer is the refusal itself, with no `100 Continue` before it.
    let mut first = [0u8; 12];
    tokio::time::timeout(DEADLINE, s.read_exact(&mut first))
        .await
        .expect("an answer without the body")
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 413");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn a_request_refused_before_its_body_is_read_gets_its_answer_while_still_sending() {
    let (up, proxy) = one_region("").await;
    let (mut rd, mut wr) = connect(proxy.listen).await.into_split();
    // Refused at admission (two Host fields), before the body is asked for; the body is far
    // larger than the socket buffers, so the client is still sending when the answer comes.
    const BODY: usize = 4 << 20;
    let sender = tokio::spawn(async move {
        let head = format!("POST /v1/chat HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: {BODY}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&vec![b'x'; BODY]).await?;
        wr.shutdown().await
    });
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, rd.read_to_end(&mut answer))
        .await
        .expect("the connection ends")
        .expect("the answer, then the end of the stream: no reset");
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // Closed with the body unread, the socket would have reset the sender's writes.
    sender
        .await
        .unwrap()
        .expect("the whole body was taken while the connection closed");
    assert_eq!(up.requests(), 0);
}

/// A drain closes a keep-alive connection after its request in flight; bytes the client
/// pipelined behind it are read and dropped (lingering close) rather than left unread, which
/// would reset the connection under the client's writes and the answer it is owed.
#[tokio::test]
async fn a_drain_with_pipelined_bytes_buffered_closes_without_a_reset() {
    let (up, proxy) = one_region("").await;
    // Slow enough that the drain surely begins before the answer is written, even on a
    // loaded machine (the test asserts the order, never the time).
    up.set_behavior(Behavior::SlowFirstByte(Duration::from_secs(2)));
    let (mut rd, mut wr) = connect(proxy.listen).await.into_split();
    const BODY: usize = 4 << 20;
    let sender = tokio::spawn(async move {
        let pipelined = format!(
            "GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n\
             POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: {BODY}\r\n\r\n"
        );
        wr.write_all(pipelined.as_bytes()).await?;
        wr.write_all(&vec![b'x'; BODY]).await?;
        wr.shutdown().await
    });
    // The first request is at the endpoint: drain now, so its answer is the last.
    eventually("the first request upstream", || async { up.requests() >= 1 }).await;
    proxy.signal("TERM");
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, rd.read_to_end(&mut answer))
        .await
        .expect("the connection ends")
        .expect("the answer, then the end of the stream: no reset");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    sender
        .await
        .unwrap()
        .expect("the pipelined bytes were taken while the connection closed");
    assert_eq!(up.requests(), 1, "nothing after the drain's last answer");
}

/// A drain lets a request head that had begun arriving finish: the request is answered,
/// and the connection then closes.
#[tokio::test]
async fn a_drain_answers_a_head_that_had_begun_arriving_then_closes() {
    let (up, proxy) = one_region("shutdown_timeout = \"10m\"\n").await;
    let mut s = connect(proxy.listen).await;
    s.set_nodelay(true).unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHo").await.unwrap();
    // Most likely read by the proxy before the drain (nothing shows it, so give it a
    // moment); if not, the bytes are in its socket and the wake-up the drain causes reads
    // them before it looks at the drain. Nothing is timed.
    wait_ready(&proxy).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal("TERM");
    eventually("draining", || async {
        call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status == 503
    })
    .await;
    s.write_all(b"st: a\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let answer = read_answer(&mut s, &mut buf, false).await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(answer.header("connection").as_deref(), Some("close"), "{}", answer.head);
    assert!(closes(&mut s).await, "closed after its answer");
    assert_eq!(up.requests(), 1);
}

/// A drain closes a keep-alive connection that waits for its next request at once: it has
/// nothing in flight, so neither its idle timeout nor the shutdown timeout is waited for, and
/// it can still use its connection right up to the drain.
#[tokio::test]
async fn a_drain_closes_an_idle_keep_alive_connection_at_once() {
    let (_up, mut proxy) = one_region("shutdown_timeout = \"10m\"\nidle_timeout = \"10m\"\n").await;
    let mut s = connect(proxy.listen).await;
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut s, &mut buf, false).await;
        assert_eq!(answer.status, 200, "{}", answer.head);
        assert_eq!(answer.header("connection"), None, "{}", answer.head);
    }
    proxy.signal("TERM");
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest)).await;
    assert!(matches!(ended, Ok(Ok(0))), "closed without a byte: {ended:?} {rest:?}");
    let code = tokio::task::spawn_blocking(move || proxy.wait_exit(DEADLINE))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}
