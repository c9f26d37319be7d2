//! Criterion benches for the per-request decision path, phase by phase and whole.

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use meridian::geo::Locate;
use meridian::route::attempt::{self, Attempt, Policy};
use meridian::route::{self, RequestFacts};

#[path = "support/fixture.rs"]
mod fixture;

use fixture::Fixture;

const PATH: &str = "/v1/chat/completions";

fn decision(c: &mut Criterion) {
    let f = Fixture::new();
    let rt = &*f.rt;
    let trusted = &rt.config.geoip.trusted_proxies;
    let client: IpAddr = "81.2.69.142".parse().unwrap_or_else(|e| panic!("{e}"));
    let located = rt.geo.locate(client);
    let empty = HeaderMap::new();
    let facts = RequestFacts {
        method: &f.method,
        path: PATH,
        headers: &empty,
    };

    let mut g = c.benchmark_group("decision");
    g.bench_function("client_ip", |b| {
        b.iter(|| meridian::client_ip::client_ip(black_box(f.peer), black_box(&f.headers), trusted))
    });
    g.bench_function("client_ip_untrusted_peer", |b| {
        let peer: IpAddr = "203.0.113.9".parse().unwrap_or_else(|e| panic!("{e}"));
        b.iter(|| meridian::client_ip::client_ip(black_box(peer), black_box(&f.headers), trusted))
    });
    g.bench_function("geoip_lookup_embedded", |b| b.iter(|| rt.geo.locate(black_box(client))));
    g.bench_function("geoip_lookup_v6", |b| {
        let v6: IpAddr = "2a00:1450:4009::1".parse().unwrap_or_else(|e| panic!("{e}"));
        b.iter(|| rt.geo.locate(black_box(v6)))
    });
    g.bench_function("route_plan", |b| {
        b.iter(|| route::plan(&rt.table, black_box(located), &facts).map(|p| p.candidates.len()))
    });
    g.bench_function("route_select", |b| {
        let plan = route::plan(&rt.table, located, &facts).unwrap_or_else(|e| panic!("{e:?}"));
        b.iter(|| {
            route::select(
                black_box(&plan),
                |r| rt.region_state(r, |_| false),
                rt.fallback.is_some(),
                false,
            )
        })
    });
    g.bench_function("next_attempt", |b| {
        let plan = route::plan(&rt.table, located, &facts).unwrap_or_else(|e| panic!("{e:?}"));
        let policy = Policy {
            max_attempts: 3,
            replay: false,
            body_kept: true,
            panic_mode: false,
            slow_start_skips: &[],
        };
        let view = f.view();
        b.iter(
            || match attempt::next_attempt(&view, black_box(&plan), &[], &policy, |k| fastrand::usize(..k)) {
                Attempt::Send { target, .. } => Some(target),
                Attempt::Refuse(_) | Attempt::Stop(_) => None,
            },
        )
    });
    g.bench_function("full_decision", |b| b.iter(|| f.decide(black_box(PATH))));
    // Model-aware routing and prefix-cache affinity on top: the model read in place from the
    // body, the plan filtered, the prompt prefix (capped at 2 KiB) hashed for the pick.
    for system in [256, 2048, 8192] {
        let body = fixture::chat_body(system);
        g.bench_function(format!("full_decision_model_prefix_{system}b"), |b| {
            b.iter(|| f.decide_model(PATH, black_box(&body)))
        });
        g.bench_function(format!("prefix_key_{system}b"), |b| {
            b.iter(|| meridian::affinity::prefix_key(black_box(&body), 2048))
        });
    }
    let body = fixture::chat_body(2048);
    g.bench_function("request_model", |b| {
        b.iter(|| route::models::request_model(black_box(&body)))
    });
    g.finish();
}

criterion_group!(benches, decision);
criterion_main!(benches);
