//! Protocols end to end through the real binary: HTTP/2 both sides (h2c, h2 over TLS, prior
//! knowledge to endpoints), gRPC-style trailers, TLS and mTLS to endpoints, WebSocket
//! bridging, and the PROXY protocol.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::certs::{Sender, TestCa, client_config, tls_connect};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// `[server]` lines plus the two regions every test here uses: us-east (home of US, the
/// default) and uk-south (home of GB, a residency zone).
fn two_regions(server: &str, us: &str, uk: &str, extra: &str) -> String {
    let mut config = base_config().replace("[server]\n", &format!("[server]\n{server}"));
    config.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[us.to_string()]));
    config.push_str(&region("uk-south", [51.51, -0.13], &["GB"], &[uk.to_string()]));
    config.push_str("[[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n");
    config.push_str(extra);
    config
}

async fn h2c(target: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(target).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn grpc_call(target: SocketAddr, xff: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{target}/inference.Model/Generate"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-forwarded-for", xff)
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap()
}

#[tokio::test]
async fn h2c_and_h2_over_tls_reach_an_http2_endpoint_with_prior_knowledge() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let ca = TestCa::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "server");
    let server = format!("tls_listen = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n");
    let config = two_regions(&server, &us.url(), &uk.url(), "").replace(
        "countries = [\"GB\"]\nendpoints",
        "countries = [\"GB\"]\nprotocol = \"http2\"\nendpoints",
    );
    let proxy = Meridian::start(&config);

    // h2c prior knowledge from the client, HTTP/2 prior knowledge to the endpoint.
    let mut sender = h2c(proxy.listen).await;
    let resp = sender.send_request(grpc_call(proxy.listen, ips::GB)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-meridian-region"], "uk-south");

    // h2 over TLS (ALPN) from the client.
    let stream = tls_connect(
        proxy.tls_listen.unwrap(),
        "localhost",
        client_config(Some(&ca), &[b"h2"]),
    )
    .await;
    let mut tls = Sender::over(stream).await;
    let req = Request::builder()
        .uri("https://localhost/v1/models")
        .header("x-forwarded-for", ips::GB)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tls.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-meridian-region"], "uk-south");

    let seen = uk.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.version, http::Version::HTTP_2, "endpoint spoken to over HTTP/2");
    }
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
    assert_eq!(seen[1].headers["x-forwarded-proto"], "https");
    // HTTP/1.1 stays the default for regions that do not ask.
    let r = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert_eq!(r.region(), Some("us-east"));
    assert_eq!(us.seen()[0].version, http::Version::HTTP_11);
}

#[tokio::test]
async fn one_endpoint_can_speak_http2_in_an_http1_region() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let detailed = format!("endpoints = [{{ url = {:?}, protocol = \"http2\" }}]", uk.url());
    let config = two_regions("", &us.url(), &uk.url(), "").replace(&format!("endpoints = [{:?}]", uk.url()), &detailed);
    assert!(config.contains("protocol = \"http2\""));
    let proxy = Meridian::start(&config);
    let r = get_as(proxy.listen, ips::GB, "/v1/models").await;
    assert_eq!(r.region(), Some("uk-south"));
    let r = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert_eq!(r.region(), Some("us-east"));
    assert_eq!(uk.seen()[0].version, http::Version::HTTP_2);
    assert_eq!(us.seen()[0].version, http::Version::HTTP_11);
}

#[tokio::test]
async fn grpc_trailers_pass_through_untouched() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    us.set_behavior(Behavior::Trailers);
    uk.set_behavior(Behavior::Trailers);
    let config = two_regions("", &us.url(), &uk.url(), "").replace(
        "countries = [\"GB\"]\nendpoints",
        "countries = [\"GB\"]\nprotocol = \"http2\"\nendpoints",
    );
    let proxy = Meridian::start(&config);

    // HTTP/2 end to end (client → uk-south over h2 prior knowledge).
    let mut sender = h2c(proxy.listen).await;
    let resp = sender.send_request(grpc_call(proxy.listen, ips::GB)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers over h2");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"\0\0\0\0\x02hi"));
    assert_eq!(uk.seen()[0].headers["te"], "trailers");

    // HTTP/1.1 both sides (client → us-east), with TE: trailers.
    let resp = send_from(
        "127.0.0.1".parse().unwrap(),
        proxy.listen,
        request(
            "POST",
            proxy.listen,
            "/inference.Model/Generate",
            &[("te", "trailers"), ("x-forwarded-for", ips::US)],
            Bytes::from_static(b"\0\0\0\0\x02hi"),
        ),
    )
    .await;
    assert_eq!(resp.headers()["x-meridian-region"], "us-east");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers over HTTP/1.1 chunked");
    assert_eq!(trailers["grpc-status"], "0");
}

/// A chunked request body's trailers reach the endpoint, over HTTP/1.1 (chunked again) and
/// HTTP/2 (a trailing HEADERS frame), as gRPC-Web and other streaming clients send them.
#[tokio::test]
async fn request_trailers_reach_the_endpoint() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let config = two_regions("", &us.url(), &uk.url(), "").replace(
        "countries = [\"GB\"]\nendpoints",
        "countries = [\"GB\"]\nprotocol = \"http2\"\nendpoints",
    );
    let proxy = Meridian::start(&config);
    for (xff, upstream) in [(ips::US, &us), (ips::GB, &uk)] {
        let mut conn = TcpStream::connect(proxy.listen).await.unwrap();
        let head = format!(
            "POST /v1/upload HTTP/1.1\r\nHost: edge\r\nX-Forwarded-For: {xff}\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n\
             5\r\nhello\r\n0\r\nx-checksum: 5d41\r\n\r\n"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let seen = upstream.seen();
        let seen = seen.last().expect("the endpoint saw the request");
        assert_eq!(seen.body, Bytes::from_static(b"hello"));
        let trailers = seen
            .trailers
            .as_ref()
            .unwrap_or_else(|| panic!("no trailers at {xff}'s endpoint"));
        assert_eq!(trailers["x-checksum"], "5d41");
    }
}

#[tokio::test]
async fn https_endpoints_are_verified_and_shown_a_client_certificate() {
    let server_ca = TestCa::new("endpoint CA");
    let client_ca = TestCa::new("client CA");
    let dir = tempfile::tempdir().unwrap();
    let leaf = server_ca.leaf(&["localhost"]);
    let endpoint_config = leaf.server_config(Some(&client_ca), &[b"h2", b"http/1.1"]);
    let uk = FakeUpstream::start_tls("uk-south", endpoint_config).await.unwrap();
    let us = FakeUpstream::start("us-east").await.unwrap();
    let ca_file = dir.path().join("endpoint-ca.pem");
    std::fs::write(&ca_file, server_ca.pem()).unwrap();
    let (client_cert, client_key) = client_ca.leaf(&["meridian.internal"]).write(dir.path(), "client");
    // A host name, so the endpoint is reached with SNI and verified for that name.
    let uk_url = format!("https://localhost:{}", uk.addr().port());
    let upstream_tls =
        format!("[upstream_tls]\nca_file = {ca_file:?}\nclient_cert = {client_cert:?}\nclient_key = {client_key:?}\n");
    let config = two_regions("", &us.url(), &uk_url, &upstream_tls).replace(
        "countries = [\"GB\"]\nendpoints",
        "countries = [\"GB\"]\nprotocol = \"http2\"\nendpoints",
    );
    let proxy = Meridian::start(&config);

    let r = get_as(proxy.listen, ips::GB, "/v1/models").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.region(), Some("uk-south"));
    let handshakes = uk.tls_seen();
    assert!(!handshakes.is_empty());
    assert_eq!(handshakes[0].sni.as_deref(), Some("localhost"));
    assert_eq!(
        handshakes[0].alpn.as_deref(),
        Some(b"h2".as_slice()),
        "HTTP/2 region asks for h2"
    );
    assert!(handshakes[0].client_certificate, "client certificate presented");
    assert_eq!(uk.seen()[0].version, http::Version::HTTP_2);

    // Without the CA file the endpoint's certificate is not trusted: nothing reaches it.
    let without_ca = config.replace(&format!("ca_file = {ca_file:?}\n"), "");
    let untrusting = Meridian::start(&without_ca);
    let before = uk.requests();
    let r = get_as(untrusting.listen, ips::GB, "/v1/models").await;
    assert!(r.status >= 500, "{} {}", r.status, r.text());
    assert_eq!(uk.requests(), before);
}

/// A WebSocket echo endpoint that answers `/health`, prefixes echoes with its name and
/// records the upgrade requests it saw.
async fn ws_upstream(name: &'static str) -> (String, Arc<Mutex<Vec<HeaderMap>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            let service = service_fn(move |mut req: Request<Incoming>| {
                let record = record.clone();
                async move {
                    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))));
                    };
                    record.lock().unwrap().push(req.headers().clone());
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(upgraded) = upgrade.await else { return };
                        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                            TokioIo::new(upgraded),
                            Role::Server,
                            None,
                        )
                        .await;
                        while let Some(Ok(msg)) = ws.next().await {
                            let Message::Text(t) = msg else {
                                if msg.is_close() {
                                    break;
                                }
                                continue;
                            };
                            if ws.send(Message::text(format!("{name}: {t}"))).await.is_err() {
                                break;
                            }
                        }
                    });
                    let resp = Response::builder()
                        .status(101)
                        .header("connection", "upgrade")
                        .header("upgrade", "websocket")
                        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    Ok(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades(),
            );
        }
    });
    (url, seen)
}

#[tokio::test]
async fn websocket_echo_is_routed_by_geo_and_bridged_both_ways() {
    let (us_url, _) = ws_upstream("us-east").await;
    let (uk_url, uk_seen) = ws_upstream("uk-south").await;
    let proxy = Meridian::start(&two_regions("", &us_url, &uk_url, ""));

    for (xff, region) in [(ips::GB, "uk-south"), (ips::US, "us-east")] {
        let mut req = format!("ws://{}/v1/realtime", proxy.listen)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("x-forwarded-for", xff.parse().unwrap());
        let stream = TcpStream::connect(proxy.listen).await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
        assert_eq!(resp.status(), 101);
        assert_eq!(resp.headers()["x-meridian-region"], region);
        for text in ["hello", "second message"] {
            ws.send(Message::text(text)).await.unwrap();
            let echo = tokio::time::timeout(DEADLINE, ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(echo, Message::text(format!("{region}: {text}")));
        }
        ws.close(None).await.unwrap();
    }
    let seen = uk_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["upgrade"], "websocket");
    assert_eq!(seen[0]["x-meridian-country"], "GB");
    assert_eq!(seen[0]["x-forwarded-for"], format!("{}, 127.0.0.1", ips::GB));
}

/// A concurrency limit counts open WebSocket sessions: the admission is held until the
/// bridged connection closes, not released with the empty body of the `101`.
#[tokio::test]
async fn a_websocket_session_holds_its_concurrency_slot_until_it_closes() {
    let (us_url, _) = ws_upstream("us-east").await;
    let (uk_url, _) = ws_upstream("uk-south").await;
    let limit = "[[limit]]\nname = \"tenant\"\nkey = \"header:x-tenant\"\nconcurrent = 1\n";
    let proxy = Meridian::start(&two_regions("", &us_url, &uk_url, limit));
    let tenant = [("x-tenant", "acme"), ("x-forwarded-for", ips::US)];

    let mut req = format!("ws://{}/v1/realtime", proxy.listen)
        .into_client_request()
        .unwrap();
    for (k, v) in tenant {
        req.headers_mut().insert(k, v.parse().unwrap());
    }
    let stream = TcpStream::connect(proxy.listen).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    let echo = tokio::time::timeout(DEADLINE, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(echo, Message::text("us-east: hello"));

    // The open session holds the tenant's only slot.
    let refused = call("GET", proxy.listen, "/v1/models", &tenant, Bytes::new()).await;
    assert_eq!(refused.status, 429, "{}", String::from_utf8_lossy(&refused.body));
    let other = call(
        "GET",
        proxy.listen,
        "/v1/models",
        &[("x-tenant", "globex")],
        Bytes::new(),
    )
    .await;
    assert_eq!(other.status, 200, "another tenant has its own slot");

    // Closed, the session frees it.
    ws.close(None).await.unwrap();
    drop(ws);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let again = call("GET", proxy.listen, "/v1/models", &tenant, Bytes::new()).await;
        if again.status == 200 {
            break;
        }
        assert_eq!(again.status, 429);
        assert!(tokio::time::Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The idle timeout of a bridged WebSocket counts from the upgrade, not from the
/// connection's earlier requests: a kept-alive connection busy for longer than the timeout
/// before it upgrades is not closed at once.
#[tokio::test]
async fn an_upgrade_after_a_busy_keep_alive_connection_gets_its_whole_idle_timeout() {
    let (us_url, _) = ws_upstream("us-east").await;
    let (uk_url, _) = ws_upstream("uk-south").await;
    let proxy = Meridian::start(&two_regions("idle_timeout = \"1s\"\n", &us_url, &uk_url, ""));
    let stream = TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    // Requests for longer than the idle timeout, never idle for as long as it.
    let busy_until = tokio::time::Instant::now() + Duration::from_millis(1600);
    while tokio::time::Instant::now() < busy_until {
        let resp = sender
            .send_request(request("GET", proxy.listen, "/v1/models", &[], Bytes::new()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let upgrade = request(
        "GET",
        proxy.listen,
        "/v1/realtime",
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        Bytes::new(),
    );
    let resp = sender.send_request(upgrade).await.unwrap();
    assert_eq!(resp.status(), 101);
    let upgraded = hyper::upgrade::on(resp).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, None).await;
    // Within the timeout of the upgrade (though past it since the connection's first read).
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::text("still here")).await.unwrap();
    let echo = tokio::time::timeout(DEADLINE, ws.next()).await.unwrap();
    assert!(
        matches!(&echo, Some(Ok(m)) if *m == Message::text("us-east: still here")),
        "the bridge was closed: {echo:?}"
    );
}

/// A PROXY v2 header for a TCP/IPv4 client.
fn proxy_v2(source: &str, destination: SocketAddr) -> Vec<u8> {
    let source: SocketAddr = source.parse().unwrap();
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .unwrap()
}

fn proxy_v2_local() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap()
}

/// Writes `prefix` on a new connection, then sends one HTTP/1.1 request over it.
async fn call_with_prefix(target: SocketAddr, prefix: &[u8], headers: &[(&str, &str)]) -> Reply {
    let mut stream = TcpStream::connect(target).await.unwrap();
    stream.write_all(prefix).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(request("GET", target, "/v1/models", headers, Bytes::new()))
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn proxy_protocol_headers_set_the_client_address() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let proxy = Meridian::start(&two_regions("proxy_protocol = true\n", &us.url(), &uk.url(), ""));
    let target = proxy.listen;

    let v1 = format!("PROXY TCP4 {} 127.0.0.1 5555 {}\r\n", ips::GB, target.port());
    let r = call_with_prefix(target, v1.as_bytes(), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.region(), Some("uk-south"), "v1 header address located in GB");
    assert_eq!(uk.seen()[0].headers["x-forwarded-for"], ips::GB);

    // The header's address is the peer and is not a trusted proxy: its X-Forwarded-For is
    // ignored, exactly as for a direct client.
    let r = call_with_prefix(
        target,
        &proxy_v2(&format!("{}:4000", ips::GB), target),
        &[("x-forwarded-for", ips::US)],
    )
    .await;
    assert_eq!(r.region(), Some("uk-south"), "v2 header address located in GB");
    assert_eq!(uk.seen()[1].headers["x-forwarded-for"], ips::GB);
    assert_eq!(uk.seen()[1].headers["x-meridian-country"], "GB");

    // v2 LOCAL: the TCP peer (trusted 127.0.0.1) stands, so its X-Forwarded-For counts.
    let r = call_with_prefix(target, &proxy_v2_local(), &[("x-forwarded-for", ips::US)]).await;
    assert_eq!(r.region(), Some("us-east"));
    assert_eq!(
        us.seen()[0].headers["x-forwarded-for"],
        format!("{}, 127.0.0.1", ips::US)
    );
}

/// A v1 header that arrives in two TCP segments, cut at any byte, is read whole: the
/// connection is served and located by the header's address.
#[tokio::test]
async fn a_proxy_v1_header_split_across_reads_is_served() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let proxy = Meridian::start(&two_regions("proxy_protocol = true\n", &us.url(), &uk.url(), ""));
    let target = proxy.listen;
    let headers = [
        (
            format!("PROXY TCP4 {} 127.0.0.1 5555 {}\r\n", ips::GB, target.port()),
            "uk-south",
        ),
        // An address the database does not place: the default region.
        (
            format!("PROXY TCP6 2001:db8::1 ::1 4000 {}\r\n", target.port()),
            "us-east",
        ),
    ];
    for (header, region) in &headers {
        for cut in 1..header.len() {
            let mut stream = TcpStream::connect(target).await.unwrap();
            stream.write_all(&header.as_bytes()[..cut]).await.unwrap();
            // Long enough for the proxy to read the first part on its own.
            tokio::time::sleep(Duration::from_millis(30)).await;
            stream.write_all(&header.as_bytes()[cut..]).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let resp = sender
                .send_request(request("GET", target, "/v1/models", &[], Bytes::new()))
                .await
                .unwrap_or_else(|e| panic!("cut at {cut} of {header:?}: {e}"));
            assert_eq!(resp.status(), 200, "cut at {cut} of {header:?}");
            assert_eq!(
                resp.headers()["x-meridian-region"],
                *region,
                "cut at {cut} of {header:?}"
            );
        }
    }
}

#[tokio::test]
async fn proxy_protocol_applies_to_the_tls_listener_too() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let ca = TestCa::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(&["localhost"]).write(dir.path(), "server");
    let server =
        format!("proxy_protocol = true\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n");
    let proxy = Meridian::start(&two_regions(&server, &us.url(), &uk.url(), ""));
    let target = proxy.tls_listen.unwrap();

    let mut tcp = TcpStream::connect(target).await.unwrap();
    tcp.write_all(&proxy_v2(&format!("{}:4000", ips::GB), target))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(client_config(Some(&ca), &[b"h2"]))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut sender = Sender::over(stream).await;
    let req = Request::builder()
        .uri("https://localhost/v1/models")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send(req).await.unwrap();
    assert_eq!(resp.headers()["x-meridian-region"], "uk-south");
    assert_eq!(uk.seen()[0].headers["x-forwarded-proto"], "https");
}

#[tokio::test]
async fn malformed_or_missing_proxy_headers_close_the_connection() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let server = "proxy_protocol = true\nheader_read_timeout = \"300ms\"\n";
    let proxy = Meridian::start(&two_regions(server, &us.url(), &uk.url(), ""));
    let target = proxy.listen;

    let bad: [&[u8]; 6] = [
        // Silent, and then only part of a header: cut off at header_read_timeout.
        b"",
        b"PROXY TCP4 81.2.69.142",
        // No header at all: a plain request.
        b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 81.2.69.142\r\n\r\n",
        b"PROXY TCP9 81.2.69.142 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x2f\x11\0\x0c",
    ];
    for input in bad {
        let mut stream = TcpStream::connect(target).await.unwrap();
        stream.write_all(input).await.unwrap();
        let mut answer = Vec::new();
        // Closed without an HTTP answer (EOF, or a reset when unread bytes were pending).
        let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer))
            .await
            .expect("connection closed");
        assert!(
            read.is_err() || answer.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(us.requests() + uk.requests(), 0);

    // The process is still serving.
    let v1 = format!("PROXY TCP4 {} 127.0.0.1 5555 {}\r\n", ips::US, target.port());
    let r = call_with_prefix(target, v1.as_bytes(), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.region(), Some("us-east"));
}

/// A response streaming for longer than the idle timeout is not idleness, over HTTP/1.1 and
/// HTTP/2 alike; once the last one ends, the connection is idle and closed after the timeout.
#[tokio::test]
async fn a_stream_outlasts_the_idle_timeout_and_the_connection_closes_once_idle() {
    let up = FakeUpstream::start("us-east").await.unwrap();
    up.set_behavior(Behavior::Stream {
        events: 6,
        gap: Duration::from_millis(150),
    });
    let proxy = Meridian::start(&two_regions("idle_timeout = \"400ms\"\n", &up.url(), &up.url(), ""));
    let events = |body: &[u8]| String::from_utf8_lossy(body).matches("data: ").count();

    // HTTP/2 (h2c): the connection's task ends when the server closes it.
    let stream = TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(chat_request(proxy.listen, &[], r#"{"stream":true}"#))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(events(&body), 7, "HTTP/2 stream cut: {body:?}");
    let closed = tokio::time::timeout(DEADLINE, conn).await;
    assert!(closed.is_ok(), "idle HTTP/2 connection still open");

    // HTTP/1.1, raw: the whole chunked stream, then the server's close.
    let mut s = TcpStream::connect(proxy.listen).await.unwrap();
    let body = r#"{"stream":true}"#;
    let head = format!(
        "POST {CHAT_PATH} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(DEADLINE, s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "idle HTTP/1.1 connection still open");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(events(&got), 7, "HTTP/1.1 stream cut: {text}");
    assert!(text.ends_with("0\r\n\r\n"), "stream not ended cleanly: {text}");
}

/// Sends `req` over a new h2c connection and collects the reply (an error if the stream or
/// its body fails: a HEAD answer with content fails in the client's h2 layer).
async fn h2c_call(target: SocketAddr, req: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
    let mut sender = h2c(target).await;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

fn h2_request(method: &str, target: SocketAddr, path: &str, headers: &[(String, String)]) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(format!("http://{target}{path}"));
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// `server.max_headers` holds over HTTP/2 as over HTTP/1.1: the same 431 answer, and the
/// endpoint never sees the request. `:authority` counts as the Host line it stands for.
#[tokio::test]
async fn http2_requests_with_too_many_header_fields_get_431() {
    let (up, proxy) = one_region("max_headers = 10\n").await;
    let fields = |n: usize| (0..n).map(|i| (format!("x-f{i}"), "v".to_string())).collect::<Vec<_>>();

    let ok = h2c_call(proxy.listen, h2_request("GET", proxy.listen, "/v1/models", &fields(9)))
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "authority + 9 fields are 10");
    assert_eq!(up.requests(), 1);

    let refused = h2_refusal(proxy.listen, &fields(10)).await;
    assert_eq!(up.requests(), 1, "a refused request reached the endpoint");

    // The same answer HTTP/1.1 gives for Host and 10 more fields.
    let head: String = fields(10).iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let http1 = http1_refusal(
        proxy.listen,
        &format!("GET /v1/models HTTP/1.1\r\nhost: a\r\n{head}\r\n"),
    )
    .await;
    assert_eq!(http1, refused.json());
    assert_eq!(up.requests(), 1);
}

/// Sends a GET with `fields` over h2c; it must get Meridian's JSON `431`.
async fn h2_refusal(listen: SocketAddr, fields: &[(String, String)]) -> Reply {
    let refused = h2c_call(listen, h2_request("GET", listen, "/v1/models", fields))
        .await
        .unwrap();
    assert_eq!(refused.status, 431, "{}", refused.text());
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert_eq!(refused.json()["error"]["code"], "bad_request");
    refused
}

/// Sends `head` over HTTP/1.1 and returns the JSON body of the `431` it must get.
async fn http1_refusal(listen: SocketAddr, head: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap()
}

/// `server.max_header_bytes` holds over HTTP/2 as HTTP/1.1 counts a head: a head within it
/// is served though HTTP/2's own count (32 bytes more a field) is over it, and one beyond it
/// gets the same JSON 431 as over HTTP/1.1 (not the h2 crate's empty one).
#[tokio::test]
async fn http2_heads_are_held_to_the_header_bytes_limit_as_http1_counts_them() {
    let (up, proxy) = one_region("max_header_bytes = \"8KiB\"\n").await;
    // 90 fields of 66 bytes (fewer than the endpoint's 100): 6,300 bytes as HTTP/1.1 lines,
    // 8,820 as HTTP/2 counts them.
    let fields: Vec<_> = (0..90).map(|i| (format!("x-f{i:03}"), "v".repeat(60))).collect();
    let ok = h2c_call(proxy.listen, h2_request("GET", proxy.listen, "/v1/models", &fields))
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(up.requests(), 1);

    let big = [("x-big".to_string(), "b".repeat(9000))];
    let refused = h2_refusal(proxy.listen, &big).await;
    assert_eq!(up.requests(), 1, "a refused request reached the endpoint");

    // HTTP/1.1 refuses the same head with the same answer.
    let head = format!("GET /v1/models HTTP/1.1\r\nhost: a\r\nx-big: {}\r\n\r\n", big[0].1);
    assert_eq!(http1_refusal(proxy.listen, &head).await, refused.json());
}

/// Answers to HEAD carry no content over HTTP/2, Meridian's own as an endpoint's, and the
/// same fields as over HTTP/1.1 (an endpoint's length; none for Meridian's own).
#[tokio::test]
async fn head_answers_over_http2_carry_no_content() {
    let up = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let drained = "drain = { reason = \"test\" }\n";
    let config = two_regions("max_uri_bytes = 64\n", &up.url(), &uk.url(), "").replacen(
        "countries = [\"GB\"]\n",
        &format!("countries = [\"GB\"]\n{drained}"),
        1,
    );
    let proxy = Meridian::start(&config);
    let gb = [("x-forwarded-for".to_string(), ips::GB.to_string())];
    let long = format!("/v1/{}", "x".repeat(80));
    // (path, request fields, status)
    type Case<'a> = (&'a str, &'a [(String, String)], u16);
    let cases: [Case; 3] = [
        ("/a/../../x", &[], 400),
        (&long, &[], 414),
        // uk-south is drained: its zone's client gets a 503.
        ("/v1/models", &gb, 503),
    ];
    for (path, headers, status) in cases {
        let get = h2c_call(proxy.listen, h2_request("GET", proxy.listen, path, headers))
            .await
            .unwrap();
        assert_eq!(get.status, status, "GET {path}: {}", get.text());
        assert!(!get.body.is_empty());
        let head = h2c_call(proxy.listen, h2_request("HEAD", proxy.listen, path, headers))
            .await
            .unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
        assert_eq!(head.status, status, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path}: {:?}", head.body);
        assert_eq!(head.header("content-type"), Some("application/json"), "HEAD {path}");
        // HTTP/1.1 says the same.
        let xff = headers.first().map_or("127.0.0.1", |h| h.1.as_str());
        let h1 = call("HEAD", proxy.listen, path, &[("x-forwarded-for", xff)], Bytes::new()).await;
        assert_eq!(h1.status, status);
        assert_eq!(
            h1.header("content-length"),
            head.header("content-length"),
            "HEAD {path} over HTTP/1.1"
        );
    }
    assert_eq!(up.requests() + uk.requests(), 0);

    // An endpoint's answer to HEAD is relayed with its length and no content.
    let get = h2c_call(proxy.listen, h2_request("GET", proxy.listen, "/v1/models", &[]))
        .await
        .unwrap();
    let head = h2c_call(proxy.listen, h2_request("HEAD", proxy.listen, "/v1/models", &[]))
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.region(), Some("us-east"));
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), Some(get.body.len().to_string().as_str()));
    assert_eq!(up.seen().last().map(|s| s.method.clone()), Some(http::Method::HEAD));
}

/// An HTTP/2 endpoint gets one authority: the client's Host in `:authority`, no `host`
/// field beside it (RFC 9113 §8.3.1); its health probes name the endpoint itself.
#[tokio::test]
async fn http2_endpoints_get_the_host_as_authority_and_no_host_field() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let config = two_regions("", &us.url(), &uk.url(), "")
        .replace(
            "countries = [\"GB\"]\nendpoints",
            "countries = [\"GB\"]\nprotocol = \"http2\"\nendpoints",
        )
        .replacen("[[region]]", "[health]\ninterval = \"100ms\"\n\n[[region]]", 1);
    let proxy = Meridian::start(&config);

    // HTTP/1.1 client with its own Host.
    // Origin form: an absolute-form target's authority would replace the Host.
    let req = Request::builder()
        .uri("/v1/models")
        .header("host", "api.example.com")
        .header("x-forwarded-for", ips::GB)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send_from("127.0.0.1".parse().unwrap(), proxy.listen, req).await;
    assert_eq!(resp.status(), 200);
    // h2c client: its :authority.
    let req = Request::builder()
        .uri("http://api.example.eu:8443/v1/models")
        .header("x-forwarded-for", ips::GB)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = h2c_call(proxy.listen, req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.region(), Some("uk-south"));

    let seen = uk.seen();
    assert_eq!(seen.len(), 2);
    for (s, want) in seen.iter().zip(["api.example.com", "api.example.eu:8443"]) {
        assert_eq!(s.version, http::Version::HTTP_2);
        assert_eq!(s.authority.as_deref(), Some(want));
        assert!(
            s.headers.get("host").is_none(),
            "host beside :authority: {:?}",
            s.headers
        );
    }
    // The probes still pass over HTTP/2: the endpoint is never ejected.
    let probes = uk.probes();
    eventually("more probes", || async { uk.probes() >= probes + 3 }).await;
    assert_eq!(endpoint_status(&proxy, &uk.url()).await["state"], "healthy");
}
