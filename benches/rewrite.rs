//! Criterion benches for header rewriting (`forward::rewrite`), both ways, on realistic
//! inference-client header sets.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderName, HeaderValue};
use meridian::forward::rewrite::{self, Forwarding};

fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

/// What an OpenAI-style SDK sends through a load balancer.
fn client_request() -> HeaderMap {
    map(&[
        ("host", "api.example.com"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("authorization", "Bearer sk-0123456789abcdef0123456789abcdef"),
        ("x-stainless-lang", "python"),
        ("x-stainless-runtime", "CPython"),
        ("x-forwarded-for", "81.2.69.142"),
        ("connection", "keep-alive"),
    ])
}

fn endpoint_response() -> HeaderMap {
    map(&[
        ("content-type", "application/json"),
        ("content-length", "734"),
        ("date", "Wed, 25 Nov 2026 00:00:00 GMT"),
        ("server", "uvicorn"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
    ])
}

fn rewrite(c: &mut Criterion) {
    let fwd = Forwarding {
        peer: "127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")),
        peer_trusted: true,
        proto: "http",
        country: "GB",
    };
    let region = HeaderValue::from_static("uk-south");
    let mut g = c.benchmark_group("rewrite");
    // The clone in setup is not timed: only the rewrite is, as the proxy runs it (the added
    // fields kept apart for the encoder).
    g.bench_function("request_fields", |b| {
        b.iter_batched_ref(
            client_request,
            |h| rewrite::request_fields(h, black_box(&fwd), false),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("request_fields_with_request_id", |b| {
        let mut base = client_request();
        base.insert("x-request-id", HeaderValue::from_static("0123456789abcdef"));
        b.iter_batched_ref(
            || base.clone(),
            |h| rewrite::request_fields(h, black_box(&fwd), false),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("response_headers", |b| {
        b.iter_batched_ref(
            endpoint_response,
            |h| rewrite::response_headers(h, black_box(&region), 1, false),
            BatchSize::SmallInput,
        )
    });
    // What `proxy.rs` pays to keep the request head for a possible retry.
    g.bench_function("request_header_map_clone", |b| {
        let base = client_request();
        b.iter(|| black_box(&base).clone())
    });
    g.finish();
}

criterion_group!(benches, rewrite);
criterion_main!(benches);
