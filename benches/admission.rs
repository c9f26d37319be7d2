//! Criterion benches for admission control: the local limit check a limited request pays.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use meridian::admission::{Admission, RequestView, Verdict};
use meridian::config::Config;
use meridian::observe::metrics::Metrics;

const REGION: &str =
    "[[region]]\nname = \"eu\"\nlocation = [50.1, 8.7]\ncountries = [\"DE\"]\nendpoints = [\"http://127.0.0.1:9\"]\n";

fn admission(rules: &str) -> Admission {
    let config = Config::parse(&format!("{REGION}{rules}"), None).unwrap_or_else(|e| panic!("{e}"));
    Admission::new(&config, &Metrics::new(), None).unwrap_or_else(|e| panic!("{e}"))
}

fn local(c: &mut Criterion) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_static("Bearer sk-0123456789abcdef0123456789abcdef"),
    );
    let client: IpAddr = "203.0.113.7".parse().unwrap_or_else(|e| panic!("{e}"));
    let req = RequestView {
        client_ip: client,
        path: "/v1/chat/completions",
        headers: meridian::forward::rewrite::SentFields::client_only(&headers),
        model: None,
    };
    // A rate the bench never reaches, so every check admits (and is dropped at once).
    let rate = admission("[[limit]]\nkey = \"header:authorization\"\nrequests_per_second = 1e9\nburst = 1000000\n");
    let all = admission(
        "[[limit]]\nkey = \"header:authorization\"\nrequests_per_second = 1e9\nburst = 1000000\nconcurrent = 1000\ntokens_per_minute = 1000000000\n",
    );
    let none = admission("[[limit]]\nkey = \"header:x-tenant\"\nconcurrent = 1\n");
    let admitted = |v: Verdict| matches!(v, Verdict::Admitted(_));

    let mut g = c.benchmark_group("admission");
    g.bench_function("local_rate_check", |b| {
        b.iter(|| admitted(rate.admit_local(black_box(&req))))
    });
    g.bench_function("local_rate_concurrency_tokens", |b| {
        b.iter(|| admitted(all.admit_local(black_box(&req))))
    });
    g.bench_function("no_rule_applies", |b| {
        b.iter(|| admitted(none.admit_local(black_box(&req))))
    });
    g.finish();
}

criterion_group!(benches, local);
criterion_main!(benches);
