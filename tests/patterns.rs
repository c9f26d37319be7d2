//! The four deployment patterns, each from its shipped example config (endpoints swapped
//! for fake upstreams on 127.0.0.1): active-passive, sharded, hub-and-spoke, and the
//! hosted-API fallback over TLS with a test CA.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;

const EXAMPLES: [&str; 4] = ["active-passive", "sharded", "hub-and-spoke", "fallback"];

fn example_path(name: &str) -> String {
    format!("{}/config/{name}.toml", env!("CARGO_MANIFEST_DIR"))
}

/// The example config with ephemeral listeners, JSON logs, and each `(from, to)` replaced.
fn example(name: &str, replace: &[(&str, String)]) -> String {
    let mut text = std::fs::read_to_string(example_path(name)).expect("example config");
    let mut all: Vec<(&str, String)> = vec![
        ("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"".into()),
        ("listen = \"127.0.0.1:9901\"", "listen = \"127.0.0.1:0\"".into()),
        ("format = \"auto\"", "format = \"json\"".into()),
    ];
    all.extend(replace.iter().cloned());
    for (from, to) in all {
        assert!(text.contains(from), "{name}.toml has no {from:?}");
        text = text.replace(from, &to);
    }
    text
}

fn endpoint(port: u16) -> &'static str {
    match port {
        8001 => "\"http://127.0.0.1:8001\"",
        8002 => "\"http://127.0.0.1:8002\"",
        8003 => "\"http://127.0.0.1:8003\"",
        8004 => "\"http://127.0.0.1:8004\"",
        _ => unreachable!("examples use 8001-8004"),
    }
}

fn quoted(u: &FakeUpstream) -> String {
    format!("{:?}", u.url())
}

/// A fake endpoint that can die and come back on its port; `kill` returns once the port
/// refuses connections (the upstream holds it while dead).
struct Mortal {
    up: FakeUpstream,
}

impl std::ops::Deref for Mortal {
    type Target = FakeUpstream;
    fn deref(&self) -> &FakeUpstream {
        &self.up
    }
}

impl Mortal {
    async fn start(name: &str) -> Mortal {
        Mortal {
            up: FakeUpstream::start(name).await.expect("fake upstream"),
        }
    }

    async fn kill(&mut self) {
        self.up.kill_and_wait().await;
    }

    async fn revive(&mut self) {
        self.up.revive().await.expect("rebind the revived endpoint");
    }
}

#[test]
fn every_example_config_passes_check() {
    for name in EXAMPLES {
        let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["check", "-c", &example_path(name)])
            .env_remove("HOSTED_API_KEY")
            .output()
            .expect("run meridian check");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("patterns: "), "{name}: {stdout}");
        assert!(!stdout.contains("sk-check-only"), "{name}: check printed a secret");
    }
}

fn route_json(name: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["route", "-c", &example_path(name), "--json"])
        .args(args)
        .env("HOSTED_API_KEY", "sk-check-only")
        .output()
        .expect("run meridian route");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    v.as_array().cloned().unwrap_or_default()
}

#[test]
fn route_explains_the_pattern_in_effect() {
    let ap = route_json("active-passive", &[ips::US]);
    assert_eq!(ap[0]["chosen"], "eu-west");
    assert_eq!(ap[0]["priority_level"], 0);
    assert_eq!(ap[0]["candidates"][1]["priority"], 1, "the standby comes last");
    assert!(ap[0]["pattern"][0].as_str().unwrap().starts_with("active-passive"));

    let sh = route_json("sharded", &[ips::DE, ips::AU]);
    assert_eq!(sh[0]["sharded"], true);
    assert_eq!(sh[0]["candidates"].as_array().unwrap().len(), 1);
    assert_eq!(sh[1]["sharded"], false);

    let hub = route_json("hub-and-spoke", &["--path", "/v1/fine_tuning/jobs", ips::AU, ips::GB]);
    assert_eq!(hub[0]["rule"]["path_prefix"], "/v1/fine_tuning");
    assert_eq!(hub[0]["chosen"], "us-east");
    assert!(
        hub[1]["refusal"]
            .as_str()
            .is_some_and(|r| r.starts_with("403 residency_forbidden: route[0]")),
        "{}",
        hub[1]
    );
    let batch = route_json("hub-and-spoke", &["--header", "x-workload: batch", ips::AU]);
    assert_eq!(batch[0]["rule"]["index"], 2);

    let fb = route_json("fallback", &[ips::US, ips::DE, ips::GB]);
    assert_eq!(fb[0]["fallback"]["eligible"], true);
    assert_eq!(fb[1]["fallback"]["eligible"], true, "fallback.zone is eu");
    assert_eq!(fb[2]["fallback"]["eligible"], false);
}

#[test]
fn check_rejects_a_home_region_outside_its_zone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crossing.toml");
    let text = std::fs::read_to_string(example_path("fallback"))
        .unwrap()
        .replace("countries = [\"US\", \"CA\"]", "countries = [\"US\", \"CA\", \"GB\"]")
        .replace("countries = [\"GB\"]\nendpoints", "countries = []\nendpoints");
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["check", "-c", &path.display().to_string()])
        .env("HOSTED_API_KEY", "x")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    // File, line and key path: the line of `countries` in the first region.
    let line = 1 + text
        .lines()
        .position(|l| l.starts_with("countries = [\"US\", \"CA\", \"GB\"]"))
        .unwrap();
    assert!(
        err.contains(&format!("crossing.toml:{line}: region[0].countries[2]")) && err.contains("residency zone \"uk\""),
        "{err}"
    );
}

#[tokio::test]
async fn active_passive_standby_takes_over_without_failures_and_gives_back() {
    let mut primary_a = Mortal::start("eu-west").await;
    let mut primary_b = Mortal::start("eu-west").await;
    let standby = FakeUpstream::start("eu-central").await.unwrap();
    let config = example(
        "active-passive",
        &[
            (endpoint(8001), quoted(&primary_a)),
            (endpoint(8002), quoted(&primary_b)),
            (endpoint(8003), quoted(&standby)),
            // Fast enough for a test; the same hysteresis as in production.
            ("interval = \"2s\"", "interval = \"200ms\"".into()),
            ("timeout = \"1s\"", "timeout = \"150ms\"".into()),
            ("slow_start = \"10s\"", "slow_start = \"0s\"".into()),
            ("ejection_time = \"30s\"", "ejection_time = \"300ms\"".into()),
        ],
    );
    let proxy = Meridian::start(&config);
    let clients = [ips::US, ips::GB, ips::AU, ips::DE, ips::FR, ips::IE];

    // Primary up: the standby sees nothing, from any country.
    for ip in clients.iter().cycle().take(18) {
        let r = get_as(proxy.listen, ip, "/v1/models").await;
        assert_eq!(r.status, 200, "{ip}: {}", r.text());
        assert_eq!(r.region(), Some("eu-west"), "{ip}");
    }
    assert_eq!(standby.requests(), 0, "the standby is idle while the primary is up");

    // Primary dies: every GET still succeeds, on the standby.
    primary_a.kill().await;
    primary_b.kill().await;
    for ip in clients.iter().cycle().take(30) {
        let r = get_as(proxy.listen, ip, "/v1/models").await;
        assert_eq!(r.status, 200, "{ip}: a GET failed during failover: {}", r.text());
        assert_eq!(r.region(), Some("eu-central"), "{ip}");
    }
    assert!(standby.requests() >= 30);

    // Primary recovers: traffic returns to it.
    primary_a.revive().await;
    primary_b.revive().await;
    let served_before = primary_a.requests() + primary_b.requests();
    eventually("traffic returns to the primary", || async {
        get_as(proxy.listen, ips::US, "/v1/models").await.region() == Some("eu-west")
    })
    .await;
    assert!(primary_a.requests() + primary_b.requests() > served_before);
    // And stays there: once both primary endpoints are back, the standby is idle again.
    eventually("the standby is idle again", || async {
        let before = standby.requests();
        for ip in clients {
            let r = get_as(proxy.listen, ip, "/v1/models").await;
            if r.status != 200 {
                return false;
            }
        }
        standby.requests() == before
    })
    .await;
}

#[tokio::test]
async fn sharded_home_region_down_means_503_and_nothing_crosses() {
    let mut us = Mortal::start("us-east").await;
    let mut euc = Mortal::start("eu-central").await;
    let euw = FakeUpstream::start("eu-west").await.unwrap();
    let ap = FakeUpstream::start("ap-southeast").await.unwrap();
    let config = example(
        "sharded",
        &[
            (endpoint(8001), quoted(&us)),
            (endpoint(8002), quoted(&euc)),
            (endpoint(8003), quoted(&euw)),
            (endpoint(8004), quoted(&ap)),
        ],
    );
    let proxy = Meridian::start(&config);
    for (ip, want) in [
        (ips::US, "us-east"),
        (ips::DE, "eu-central"),
        (ips::FR, "eu-west"),
        (ips::AU, "ap-southeast"),
    ] {
        let r = get_as(proxy.listen, ip, "/v1/chat/completions").await;
        assert_eq!((r.status, r.region()), (200, Some(want)), "{ip}: {}", r.text());
    }
    assert_eq!(
        [us.requests(), euc.requests(), euw.requests(), ap.requests()],
        [1, 1, 1, 1]
    );

    // A sharded region dies: its clients get 503, every other region sees nothing more.
    us.kill().await;
    euc.kill().await;
    for _ in 0..3 {
        let r = get_as(proxy.listen, ips::US, "/v1/chat/completions").await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "no_region_available");
        let r = get_as(proxy.listen, ips::DE, "/v1/chat/completions").await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["error"]["code"], "residency_unavailable");
        assert_eq!(r.json()["error"]["zone"], "eu");
    }
    assert_eq!(
        [euw.requests(), ap.requests()],
        [1, 1],
        "no request crossed to another shard"
    );

    // /status shows each client group's order: sharded ones end at their home region.
    let status = support::status(&proxy).await;
    let orders = status["patterns"]["failover_orders"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let de = orders
        .iter()
        .find(|g| g["countries"].as_array().is_some_and(|c| c.iter().any(|x| x == "DE")))
        .unwrap_or_else(|| panic!("no group for DE: {status}"));
    assert_eq!(de["order"], "eu-central > 503");
    assert_eq!(de["sharded"], true);
    assert_eq!(de["zone"], "eu");

    // Other shards and unsharded clients carry on.
    assert_eq!(get_as(proxy.listen, ips::FR, "/").await.region(), Some("eu-west"));
    assert_eq!(get_as(proxy.listen, ips::AU, "/").await.region(), Some("ap-southeast"));
}

#[tokio::test]
async fn hub_and_spoke_sends_training_to_the_hub_and_inference_to_the_nearest_spoke() {
    let us = FakeUpstream::start("us-east").await.unwrap();
    let eu = FakeUpstream::start("eu-west").await.unwrap();
    let uk = FakeUpstream::start("uk-south").await.unwrap();
    let ap = FakeUpstream::start("ap-southeast").await.unwrap();
    let config = example(
        "hub-and-spoke",
        &[
            (endpoint(8001), quoted(&us)),
            (endpoint(8002), quoted(&eu)),
            (endpoint(8003), quoted(&uk)),
            (endpoint(8004), quoted(&ap)),
        ],
    );
    let proxy = Meridian::start(&config);

    // Fine-tuning from any country that may leave home: the hub.
    for ip in [ips::AU, ips::IE, ips::US, ips::DE, ips::FR] {
        let r = get_as(proxy.listen, ip, "/v1/fine_tuning/jobs?limit=2").await;
        assert_eq!((r.status, r.region()), (200, Some("us-east")), "{ip}: {}", r.text());
    }
    assert_eq!(us.requests(), 5);
    assert_eq!(us.seen()[0].path, "/v1/fine_tuning/jobs?limit=2");

    // Inference: the nearest spoke.
    for (ip, want) in [
        (ips::AU, "ap-southeast"),
        (ips::IE, "eu-west"),
        (ips::US, "us-east"),
        (ips::GB, "uk-south"),
    ] {
        let r = get_as(proxy.listen, ip, "/v1/chat/completions").await;
        assert_eq!((r.status, r.region()), (200, Some(want)), "{ip}: {}", r.text());
    }

    // Whole segments only: not a fine-tuning path.
    let r = get_as(proxy.listen, ips::AU, "/v1/fine_tuning_x").await;
    assert_eq!(r.region(), Some("ap-southeast"));

    // Batch work, by header: the hub.
    let r = chat(
        proxy.listen,
        &[("x-forwarded-for", ips::AU), ("x-workload", "batch")],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!((r.status, r.region()), (200, Some("us-east")), "{}", r.text());

    // A residency-bound client whose rule points abroad: the documented refusal, and the
    // hub never sees it.
    let hub_before = us.requests();
    let r = get_as(proxy.listen, ips::GB, "/v1/fine_tuning/jobs").await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "residency_forbidden");
    assert_eq!(r.json()["error"]["zone"], "uk");
    assert_eq!(us.requests(), hub_before);

    // ...unless the rule is residency_exempt (the model list carries no personal data).
    let r = get_as(proxy.listen, ips::GB, "/v1/models").await;
    assert_eq!((r.status, r.region()), (200, Some("us-east")), "{}", r.text());
    // The exemption is GET only: other methods on the path are inference-like, so local.
    let r = call(
        "POST",
        proxy.listen,
        "/v1/models",
        &[("x-forwarded-for", ips::GB)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.region(), Some("uk-south"));

    // /status shows the patterns in effect.
    let status = support::status(&proxy).await;
    let patterns = &status["patterns"];
    assert!(
        patterns["patterns"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x == "hub-and-spoke")),
        "{status}"
    );
    assert_eq!(patterns["routes"][0]["path_prefix"], "/v1/fine_tuning");
    assert_eq!(patterns["routes"][3]["residency_exempt"], true);
}

/// A hosted API on 127.0.0.1 over TLS, with a certificate from a CA made for the test.
struct HostedApi {
    addr: SocketAddr,
    ca_pem: String,
    seen: Arc<Mutex<Vec<(String, http::HeaderMap)>>>,
    /// The SNI name of each TLS handshake.
    sni: Arc<Mutex<Vec<Option<String>>>>,
    status: Arc<Mutex<u16>>,
}

impl HostedApi {
    async fn start() -> HostedApi {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Meridian test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let chain = vec![cert.der().clone()];
        let key_der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(Mutex::new(200u16));
        let sni = Arc::new(Mutex::new(Vec::new()));
        let (seen2, status2, sni2) = (seen.clone(), status.clone(), sni.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, seen, status) = (acceptor.clone(), seen2.clone(), status2.clone());
                let sni_seen = sni2.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    sni_seen.lock().unwrap().push(sni);
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (seen, status) = (seen.clone(), status.clone());
                        async move {
                            let path = req.uri().path_and_query().map_or("/".into(), |p| p.to_string());
                            seen.lock().unwrap().push((path, req.headers().clone()));
                            let code = *status.lock().unwrap();
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"{\"served_by\":\"hosted\"}")));
                            *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HostedApi {
            addr,
            ca_pem: ca.pem(),
            seen,
            sni,
            status,
        }
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last(&self) -> (String, http::HeaderMap) {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request at the fallback")
    }
}

async fn fallback_world(extra: &[(&str, String)]) -> (HostedApi, [Mortal; 3], Meridian, tempfile::TempDir, String) {
    let hosted = HostedApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("test-ca.pem");
    std::fs::write(&ca_path, &hosted.ca_pem).unwrap();
    let us = Mortal::start("us-east").await;
    let eu = Mortal::start("eu-west").await;
    let uk = Mortal::start("uk-south").await;
    let mut replace = vec![
        (endpoint(8001), quoted(&us)),
        (endpoint(8002), quoted(&eu)),
        (endpoint(8003), quoted(&uk)),
        (
            "endpoint = \"https://127.0.0.1:9443\"",
            // A name, not an address, so the client sends SNI; it resolves to 127.0.0.1.
            format!("endpoint = \"https://localhost:{}\"", hosted.addr.port()),
        ),
        (
            // The shipped example injects a literal header only; the test injects the key.
            "headers = { \"x-client\" = \"meridian-edge\" }",
            "headers = { authorization = \"env:HOSTED_API_KEY\", \"x-client\" = \"meridian-edge\" }".to_string(),
        ),
        (
            "# ca_file = \"tls/private-ca.pem\"",
            format!("ca_file = {:?}", ca_path.display().to_string()),
        ),
    ];
    replace.extend(extra.iter().cloned());
    let config = example("fallback", &replace);
    // Unique per run, so finding it anywhere in the logs can only mean a leak.
    let secret = format!("sk-test-{:016x}", fastrand::u64(..));
    let proxy = Meridian::start_with_env(&config, &[("HOSTED_API_KEY", &format!("Bearer {secret}"))]);
    (hosted, [us, eu, uk], proxy, dir, secret)
}

#[tokio::test]
async fn fallback_serves_over_tls_when_every_region_is_down_but_never_a_zone_client() {
    let (hosted, mut regions, proxy, _dir, secret) = fallback_world(&[]).await;
    let r = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert_eq!((r.status, r.region()), (200, Some("us-east")), "regions first");
    assert_eq!(hosted.requests(), 0);

    for r in &mut regions {
        r.kill().await;
    }
    // Every region down: the hosted API serves, over TLS verified with the test CA.
    let r = call(
        "POST",
        proxy.listen,
        "/v1/chat/completions?x=1",
        &[
            ("x-forwarded-for", ips::US),
            ("authorization", "Bearer client-supplied"),
        ],
        Bytes::from_static(b"{\"model\":\"m\"}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.region(), Some("fallback"));
    assert_eq!(r.json()["served_by"], "hosted");
    let (path, headers) = hosted.last();
    assert_eq!(path, "/openai/v1/chat/completions?x=1", "path rewritten by prefix");
    assert_eq!(
        headers["authorization"],
        format!("Bearer {secret}").as_str(),
        "injected header replaces the client's"
    );
    assert_eq!(
        headers["host"],
        format!("localhost:{}", hosted.addr.port()).as_str(),
        "Host is the fallback's"
    );
    assert_eq!(
        hosted.sni.lock().unwrap().last().cloned().flatten().as_deref(),
        Some("localhost"),
        "SNI is the fallback's host"
    );
    assert_eq!(headers["x-meridian-country"], "US");

    // An EU client may use the fallback: it carries zone "eu".
    let r = get_as(proxy.listen, ips::DE, "/v1/models").await;
    assert_eq!((r.status, r.region()), (200, Some("fallback")), "{}", r.text());

    // A UK client may not: 503 in its zone, and the fallback never sees it.
    let before = hosted.requests();
    let r = get_as(proxy.listen, ips::GB, "/v1/chat/completions").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "residency_unavailable");
    assert_eq!(r.json()["error"]["zone"], "uk");
    assert_eq!(
        hosted.requests(),
        before,
        "a residency-bound client was sent to the fallback"
    );

    // The injected value never appears in any log line.
    // Access log lines are written when a body ends: wait for the fallback's.
    eventually("the fallback request is logged", || async {
        proxy.logs().iter().any(|l| l.contains("\"region\":\"fallback\""))
    })
    .await;
    for line in &proxy.logs() {
        assert!(!line.contains(&secret), "secret in log line: {line}");
    }
}

#[tokio::test]
async fn a_failing_fallback_opens_its_breaker_and_stops_costing_requests() {
    let (hosted, mut regions, proxy, _dir, _secret) = fallback_world(&[(
        "breaker = { failures = 5, cool_down = \"30s\" }",
        "breaker = { failures = 2, cool_down = \"300ms\" }".into(),
    )])
    .await;
    for r in &mut regions {
        r.kill().await;
    }
    *hosted.status.lock().unwrap() = 500;
    // Two failures open the breaker; from then on the fallback is not tried.
    for _ in 0..2 {
        let r = get_as(proxy.listen, ips::US, "/v1/models").await;
        assert_eq!(r.status, 500, "the fallback's own answer is relayed: {}", r.text());
    }
    let tried = hosted.requests();
    let r = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "no_region_available");
    assert_eq!(hosted.requests(), tried, "an open breaker sends nothing");
    let status = support::status(&proxy).await;
    assert_eq!(status["fallback"]["breaker"]["state"], "open", "{status}");

    // The fallback recovers: after the cool-down one trial closes the breaker again.
    *hosted.status.lock().unwrap() = 200;
    eventually("the breaker lets a trial through and closes", || async {
        get_as(proxy.listen, ips::US, "/v1/models").await.region() == Some("fallback")
    })
    .await;
    let status = support::status(&proxy).await;
    assert_eq!(status["fallback"]["breaker"]["state"], "closed", "{status}");
}
