//! Tracing end to end: the real binary exports OTLP/HTTP protobuf to a fake collector; a
//! server span per request, a client span per attempt, the client's trace continued, the
//! endpoint given a `traceparent` of its attempt, the access log's `trace_id` the
//! exported one. Without `[tracing]` nothing is exported.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;
use support::*;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP collector on 127.0.0.1: decodes every `POST /v1/traces` body.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    posts: Arc<Mutex<Vec<(String, String)>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let (s, p) = (spans.clone(), posts.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let (s, p) = (s.clone(), p.clone());
                        async move {
                            let path = req.uri().path().to_string();
                            let kind = req
                                .headers()
                                .get("content-type")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            p.lock().unwrap().push((path, kind));
                            let export = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                            for rs in export.resource_spans {
                                let service = rs
                                    .resource
                                    .iter()
                                    .flat_map(|r| &r.attributes)
                                    .find(|a| a.key == "service.name")
                                    .and_then(|a| a.value.clone());
                                assert!(
                                    matches!(service.and_then(|v| v.value), Some(Value::StringValue(n)) if n == "edge-test"),
                                    "service.name on the resource"
                                );
                                for ss in rs.scope_spans {
                                    s.lock().unwrap().extend(ss.spans);
                                }
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, spans, posts }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone())
        .and_then(|v| v.value)
}

fn access_line(proxy: &Meridian, request_id: &str) -> Option<serde_json::Value> {
    proxy
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["target"] == "meridian::access" && l["request_id"] == request_id)
}

/// eu-west's endpoint is dead, us-east's answers: an Irish client's request takes two
/// attempts.
async fn config(extra: &str) -> (String, FakeUpstream, String) {
    let eu_url = dead_endpoint(1);
    let us = FakeUpstream::start("us-east").await.unwrap();
    let mut c = base_config();
    c.push_str("[geoip]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndefault_region = \"us-east\"\n\n");
    c.push_str("[health]\nenabled = false\n\n");
    c.push_str(extra);
    c.push_str(&region(
        "eu-west",
        [53.35, -6.26],
        &["IE"],
        std::slice::from_ref(&eu_url),
    ));
    c.push_str(&region("us-east", [39.04, -77.49], &["US"], &[us.url()]));
    (c, us, eu_url)
}

#[tokio::test]
async fn spans_are_exported_and_the_trace_continues_to_the_endpoint() {
    let collector = Collector::start().await;
    let tracing = format!(
        "[tracing]\notlp_endpoint = \"http://{}\"\nservice_name = \"edge-test\"\nsample_ratio = 0.0\n\n",
        collector.addr
    );
    let (config, us, eu_url) = config(&tracing).await;
    let proxy = Meridian::start(&config);

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let headers = [
        ("x-forwarded-for", ips::IE),
        ("x-request-id", "req-traced"),
        ("traceparent", traceparent.as_str()),
        ("tracestate", "vendor=opaque"),
    ];
    let r = call("GET", proxy.listen, "/v1/models", &headers, Bytes::new()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.region(), Some("us-east"));

    eventually("three spans exported", || async { collector.spans().len() >= 3 }).await;
    let spans = collector.spans();
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let servers: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Server as i32).collect();
    let mut clients: Vec<&Span> = spans.iter().filter(|s| s.kind == SpanKind::Client as i32).collect();
    assert_eq!(servers.len(), 1, "one server span per request");
    assert_eq!(clients.len(), 2, "one client span per attempt");
    clients.sort_by_key(|s| match attr(s, "meridian.attempt") {
        Some(Value::IntValue(n)) => n,
        other => panic!("attempt number: {other:?}"),
    });
    let numbers: Vec<_> = clients.iter().map(|s| attr(s, "meridian.attempt")).collect();
    assert_eq!(
        numbers,
        [Some(Value::IntValue(1)), Some(Value::IntValue(2))],
        "attempts count from 1, as the access log's"
    );
    let server = servers[0];

    // The client's trace is continued: same trace id, its span the server span's parent.
    for s in &spans {
        assert_eq!(hex(&s.trace_id), CLIENT_TRACE);
        assert_eq!(s.trace_state, "vendor=opaque");
        assert!(s.end_time_unix_nano >= s.start_time_unix_nano);
    }
    assert_eq!(hex(&server.parent_span_id), CLIENT_SPAN);
    for c in &clients {
        assert_eq!(
            c.parent_span_id, server.span_id,
            "client spans are children of the server span"
        );
        assert_ne!(c.span_id, server.span_id);
    }
    assert_ne!(clients[0].span_id, clients[1].span_id);

    // Server span attributes.
    let s = |span: &Span, k: &str| match attr(span, k) {
        Some(Value::StringValue(v)) => v,
        other => panic!("{k}: {other:?}"),
    };
    let i = |span: &Span, k: &str| match attr(span, k) {
        Some(Value::IntValue(v)) => v,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(s(server, "http.request.method"), "GET");
    assert_eq!(s(server, "http.route"), "/v1/models");
    assert_eq!(s(server, "client.geo.country_iso_code"), "IE");
    assert_eq!(s(server, "meridian.zone"), "-");
    assert_eq!(s(server, "meridian.region"), "us-east");
    assert_eq!(i(server, "http.response.status_code"), 200);

    // Client spans: the dead endpoint, then the one that answered.
    assert_eq!(s(clients[0], "server.address"), eu_url);
    assert_eq!(s(clients[0], "meridian.region"), "eu-west");
    assert!(s(clients[0], "error.type").contains("connect"));
    assert!(attr(clients[0], "meridian.ttfb_ms").is_none());
    assert_eq!(s(clients[1], "server.address"), us.url());
    assert_eq!(s(clients[1], "meridian.failover_reason"), "retry");
    assert_eq!(i(clients[1], "http.response.status_code"), 200);
    assert!(matches!(attr(clients[1], "meridian.ttfb_ms"), Some(Value::DoubleValue(ms)) if ms >= 0.0));

    // The endpoint received a traceparent naming the attempt's client span.
    let seen = us.seen();
    let sent = seen[0].headers["traceparent"].to_str().unwrap();
    assert_eq!(sent, format!("00-{CLIENT_TRACE}-{}-01", hex(&clients[1].span_id)));
    assert_eq!(seen[0].headers["tracestate"], "vendor=opaque");

    // The access log's trace id is the exported one.
    eventually("access line", || async { access_line(&proxy, "req-traced").is_some() }).await;
    assert_eq!(access_line(&proxy, "req-traced").unwrap()["trace_id"], CLIENT_TRACE);

    // Exported as OTLP/HTTP protobuf.
    for (path, kind) in collector.posts.lock().unwrap().iter() {
        assert_eq!(path, "/v1/traces");
        assert_eq!(kind, "application/x-protobuf");
    }

    // A new trace (no traceparent) is started; with sample_ratio 0 it is not exported, but
    // the endpoint still gets a traceparent and the log its trace id.
    let before = collector.spans().len();
    let headers = [("x-forwarded-for", ips::US), ("x-request-id", "req-unsampled")];
    let r = call("GET", proxy.listen, "/v1/models", &headers, Bytes::new()).await;
    assert_eq!(r.status, 200);
    eventually("access line", || async {
        access_line(&proxy, "req-unsampled").is_some()
    })
    .await;
    let trace_id = access_line(&proxy, "req-unsampled").unwrap()["trace_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(trace_id.len(), 32);
    assert_ne!(trace_id, CLIENT_TRACE);
    let seen = us.seen();
    let sent = seen.last().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        sent.starts_with(&format!("00-{trace_id}-")) && sent.ends_with("-00"),
        "{sent}"
    );
    // A sampled request after it is exported: so the unsampled one had its chance first.
    let r = call(
        "GET",
        proxy.listen,
        "/v1/models",
        &[("x-forwarded-for", ips::US), ("traceparent", traceparent.as_str())],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, 200);
    eventually("the sampled request's spans", || async {
        collector.spans().len() >= before + 2
    })
    .await;
    let spans = collector.spans();
    assert!(
        spans.iter().all(|s| hex(&s.trace_id) != trace_id),
        "an unsampled trace was exported"
    );
}

#[tokio::test]
async fn without_tracing_nothing_is_exported_and_the_client_traceparent_passes_through() {
    let collector = Collector::start().await;
    let (config, us, _) = config("").await;
    assert!(!config.contains(&collector.addr.to_string()));
    let proxy = Meridian::start(&config);
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let headers = [
        ("x-forwarded-for", ips::US),
        ("x-request-id", "req-plain"),
        ("traceparent", traceparent.as_str()),
    ];
    let r = call("GET", proxy.listen, "/v1/models", &headers, Bytes::new()).await;
    assert_eq!(r.status, 200);
    assert_eq!(us.seen()[0].headers["traceparent"], traceparent.as_str());
    eventually("access line", || async { access_line(&proxy, "req-plain").is_some() }).await;
    assert_eq!(access_line(&proxy, "req-plain").unwrap()["trace_id"], CLIENT_TRACE);
    // Longer than the exporter's batching delay: a tracing-on binary would have posted.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(collector.posts.lock().unwrap().is_empty());
    assert!(!proxy.logs().iter().any(|l| l.contains("tracing on")));
}

/// `[tracing]` follows the config file: a reload that adds it starts a trace per request
/// (exported, and continued to the endpoint), one that removes it stops both, and the
/// process keeps serving throughout.
#[tokio::test]
async fn a_reload_turns_tracing_on_and_off() {
    let collector = Collector::start().await;
    let (off, us, _) = config("").await;
    let proxy = Meridian::start(&off);
    let traced = |n: usize| us.seen().get(n).is_some_and(|r| r.headers.contains_key("traceparent"));
    let r = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert_eq!(r.status, 200);
    assert!(!traced(0), "tracing is off at start");

    let tracing = format!(
        "[tracing]\notlp_endpoint = \"http://{}\"\nservice_name = \"edge-test\"\n\n",
        collector.addr
    );
    let on = off.replace(
        "[health]\nenabled = false\n\n",
        &format!("[health]\nenabled = false\n\n{tracing}"),
    );
    assert_ne!(on, off);
    std::fs::write(&proxy.config_path, &on).unwrap();
    proxy.signal("HUP");
    eventually("a request traced after the reload", || async {
        let r = get_as(proxy.listen, ips::US, "/v1/models").await;
        assert_eq!(r.status, 200);
        traced(us.seen().len() - 1)
    })
    .await;
    eventually("its spans exported", || async { !collector.spans().is_empty() }).await;

    std::fs::write(&proxy.config_path, &off).unwrap();
    proxy.signal("HUP");
    eventually("tracing off after the second reload", || async {
        let r = get_as(proxy.listen, ips::US, "/v1/models").await;
        assert_eq!(r.status, 200);
        !traced(us.seen().len() - 1)
    })
    .await;
    assert!(proxy.logs().iter().any(|l| l.contains("tracing off")));
}
