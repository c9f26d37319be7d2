//! Hostile input against the real binary: request smuggling shapes, header and URI limits,
//! slow and idle clients, connection limits. Each test fails if its protection is removed.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and reads until the server closes or `DEADLINE` passes.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn smuggling_shapes_are_rejected_before_any_endpoint_sees_them() {
    let (up, proxy) = one_region("").await;
    // hyper reads a message with both headers as chunked and drops Content-Length
    // (RFC 9112 §6.3); every other shape is refused with 400.
    let cases: [(&str, u16, &[u8]); 5] = [
        (
            "content-length with transfer-encoding",
            200,
            b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        ),
        (
            "duplicate differing content-length",
            400,
            b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\nConnection: close\r\n\r\nabcde",
        ),
        ("obs-fold", 400, b"GET /v1/x HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\nConnection: close\r\n\r\n"),
        ("invalid header name", 400, b"GET /v1/x HTTP/1.1\r\nHost: a\r\nBad Header: x\r\nConnection: close\r\n\r\n"),
        ("space before colon", 400, b"GET /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length : 0\r\nConnection: close\r\n\r\n"),
    ];
    for (name, want, bytes) in cases {
        let resp = raw(proxy.listen, bytes).await;
        assert_eq!(status_of(&resp), want, "{name}: {resp}");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "only the chunked request was forwarded");
    assert!(seen[0].body.is_empty());
    assert!(
        seen[0].headers.get("content-length").is_none_or(|v| v == "0"),
        "stale Content-Length forwarded"
    );
    let smuggled = up.seen().iter().any(|s| s.path.contains("smuggled"));
    assert!(!smuggled, "a smuggled request reached the endpoint");
    assert!(up.seen().iter().all(|s| s.headers.get("x-folded").is_none()));
    // Still serving.
    assert_eq!(get_as(proxy.listen, ips::US, "/").await.status, 200);
}

#[tokio::test]
async fn header_and_uri_limits_answer_431_and_414() {
    let (up, proxy) = one_region("max_header_bytes = \"8KiB\"\nmax_headers = 20\nmax_uri_bytes = \"1KiB\"\n").await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    assert_eq!(status_of(&raw(proxy.listen, big.as_bytes()).await), 431);
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    assert_eq!(status_of(&raw(proxy.listen, many.as_bytes()).await), 431);
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "p".repeat(2000)
    );
    let resp = raw(proxy.listen, long.as_bytes()).await;
    assert_eq!(status_of(&resp), 414, "{resp}");
    assert!(resp.contains("\"code\":\"bad_request\""), "{resp}");
    assert_eq!(up.requests(), 0);
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (_up, proxy) = one_region("header_read_timeout = \"500ms\"\n").await;
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ").await.unwrap();
    // The server must close the connection on its own; without the timeout this read
    // would wait until the deadline and fail.
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "slowloris connection still open");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    // A long header timeout, so only the idle timeout can close the connection.
    let (_up, proxy) = one_region("idle_timeout = \"500ms\"\nheader_read_timeout = \"60s\"\n").await;
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Now idle: the server closes it.
    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "idle connection still open");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_accept() {
    let (_up, proxy) = one_region("max_connections = 2\n").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.listen).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0);
        held.push(s);
    }
    let mut third = TcpStream::connect(proxy.listen).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(DEADLINE, third.read_to_end(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "third connection was served: {:?}",
        String::from_utf8_lossy(&buf)
    );
    drop(held);
    // Capacity returns once the others close.
    eventually("a new connection is served", || async {
        try_get_as(proxy.listen, ips::US, "/")
            .await
            .is_some_and(|r| r.status == 200)
    })
    .await;
    let _ = Duration::ZERO;
}

#[tokio::test]
async fn garbage_instead_of_http_is_refused_without_harm() {
    let (_up, proxy) = one_region("").await;
    for junk in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"NOT HTTP AT ALL\r\n\r\n",
        b"\x00\x00\x00\x00",
    ] {
        let _ = raw(proxy.listen, junk).await;
    }
    assert_eq!(get_as(proxy.listen, ips::US, "/").await.status, 200);
    assert!(!proxy.logs().iter().any(|l| l.contains("panicked")));
}

/// Sends raw bytes; the answer, if the server then closed the connection within `DEADLINE`.
async fn answer_then_close(addr: SocketAddr, bytes: &[u8]) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    match tokio::time::timeout(DEADLINE, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => Some(String::from_utf8_lossy(&out).into_owned()),
        _ => None,
    }
}

/// The body of a Meridian answer: the JSON error's `code`.
fn error_code(resp: &str) -> Option<String> {
    let body = resp.split_once("\r\n\r\n")?.1;
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json["error"]["code"].as_str().map(str::to_string)
}

/// Sends each head on its own connection: each gets `400 bad_request` and the connection
/// is closed.
async fn refused_with_400(target: std::net::SocketAddr, heads: &[&[u8]]) {
    for bytes in heads {
        let name = String::from_utf8_lossy(bytes);
        let resp = answer_then_close(target, bytes)
            .await
            .unwrap_or_else(|| panic!("{name:?}: the connection stayed open"));
        assert_eq!(status_of(&resp), 400, "{name:?}: {resp}");
        assert_eq!(error_code(&resp).as_deref(), Some("bad_request"), "{name:?}: {resp}");
    }
}

/// A bare LF ends no line of a request head: `400 bad_request`, the connection closed, and
/// nothing forwarded, as for obs-fold (docs/protocols.md, "Malformed requests").
#[tokio::test]
async fn bare_lf_line_ends_are_refused() {
    let (up, proxy) = one_region("").await;
    let cases: [&[u8]; 4] = [
        b"GET /echo HTTP/1.1\nHost: a\nX-A: b\n\n",
        b"GET /echo HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\n",
        b"GET /echo HTTP/1.0\nX-A: b\r\n\r\n",
    ];
    refused_with_400(proxy.listen, &cases).await;
    assert!(up.seen().is_empty(), "a bare-LF request was forwarded");
    // The same head with CRLFs is served.
    let resp = raw(
        proxy.listen,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&resp), 200, "{resp}");
}

/// RFC 9112 §3.2: an HTTP/1.1 request names its host, in a valid `Host` (a non-empty host,
/// a port that exists) or an absolute-form target; `400` otherwise, before any endpoint
/// sees it. HTTP/1.0 needs none.
#[tokio::test]
async fn http11_requests_need_a_valid_host() {
    let (up, proxy) = one_region("").await;
    let refused: [&[u8]; 9] = [
        b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n",
        // An empty host, with or without a port, names nothing (RFC 9110 §4.2.1).
        b"GET /echo HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: :80\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a:65536\r\nConnection: close\r\n\r\n",
        b"GET http://a:99999/echo HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a/b?c\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: user@evil.example\r\nConnection: close\r\n\r\n",
        b"GET /echo HTTP/1.1\r\nHost: a:b\r\nConnection: close\r\n\r\n",
    ];
    refused_with_400(proxy.listen, &refused).await;
    assert!(up.seen().is_empty(), "a request without a valid Host was forwarded");
    let served: [(&[u8], &str); 4] = [
        (b"GET /echo HTTP/1.0\r\n\r\n", ""),
        (
            b"GET /echo HTTP/1.1\r\nHost: api.example:8080\r\nConnection: close\r\n\r\n",
            "api.example:8080",
        ),
        (
            b"GET /echo HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: close\r\n\r\n",
            "[::1]:8080",
        ),
        (
            b"GET http://abs.example/echo HTTP/1.1\r\nConnection: close\r\n\r\n",
            "abs.example",
        ),
    ];
    for (bytes, _) in served {
        let resp = raw(proxy.listen, bytes).await;
        assert_eq!(status_of(&resp), 200, "{:?}: {resp}", String::from_utf8_lossy(bytes));
    }
    let hosts: Vec<String> = up
        .seen()
        .iter()
        .filter_map(|s| {
            s.headers
                .get("host")
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .collect();
    for (_, host) in served.iter().filter(|(_, h)| !h.is_empty()) {
        assert!(hosts.iter().any(|h| h == host), "{host} not forwarded: {hosts:?}");
    }
}

/// Only origin-form, absolute-form and (for OPTIONS) `*` targets are requests to forward:
/// an authority-form target on another method than CONNECT, `*` on another than OPTIONS,
/// and an absolute-form target with userinfo (which would reach the endpoint as its Host)
/// get `400`. CONNECT stays `405`.
#[tokio::test]
async fn targets_in_the_wrong_form_or_with_userinfo_are_refused() {
    let (up, proxy) = one_region("").await;
    let refused: [&[u8]; 6] = [
        b"GET http://alice:secret@foo.example/echo HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET http://alice:secret@foo.example/echo HTTP/1.1\r\nHost: foo.example\r\nConnection: close\r\n\r\n",
        b"GET http://alice@foo.example/echo HTTP/1.0\r\n\r\n",
        b"GET echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"POST www.example.com:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    ];
    refused_with_400(proxy.listen, &refused).await;
    let connect = raw(
        proxy.listen,
        b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: www.example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&connect), 405, "{connect}");
    assert!(up.seen().is_empty(), "a refused target was forwarded");
    // A server-wide OPTIONS is not refused here.
    let options = raw(
        proxy.listen,
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_ne!(status_of(&options), 400, "{options}");
    assert_ne!(status_of(&options), 0, "{options}");
}
