//! Model servers as they behave, through the real binary: the response head at once and
//! tokens later for streams, whole answers after generation with `usage`, `/v1/models`.
//! First-token and per-token outlier detection, model-aware routing with discovery, and
//! prefix-cache affinity.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use support::*;
use tokio::sync::{mpsc, watch};

const US_EAST: [f64; 2] = [39.04, -77.49];
const US_WEST: [f64; 2] = [45.6, -121.2];
const EU_CENTRAL: [f64; 2] = [50.11, 8.68];

/// How a fake model server answers chat and completion requests.
#[derive(Debug, Clone)]
struct Pace {
    /// Request → first token (streams: after an instant head; whole answers: part of the wait).
    first_token: Duration,
    /// Between tokens.
    gap: Duration,
    tokens: usize,
}

impl Pace {
    fn new(first_token_ms: u64, gap_ms: u64, tokens: usize) -> Pace {
        Pace {
            first_token: Duration::from_millis(first_token_ms),
            gap: Duration::from_millis(gap_ms),
            tokens,
        }
    }
}

struct ModelState {
    name: String,
    pace: Mutex<Pace>,
    models: Mutex<Vec<String>>,
    /// Answers wait until this is true.
    open: watch::Sender<bool>,
    served: AtomicUsize,
}

/// A fake OpenAI-compatible model server on 127.0.0.1:0.
#[derive(Clone)]
struct ModelServer {
    addr: SocketAddr,
    state: Arc<ModelState>,
}

/// A response body fed by a channel: the head goes out before any token exists.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

impl ModelServer {
    async fn start(name: &str, models: &[&str]) -> ModelServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ModelState {
            name: name.to_string(),
            pace: Mutex::new(Pace::new(5, 1, 3)),
            models: Mutex::new(models.iter().map(|m| m.to_string()).collect()),
            open: watch::channel(true).0,
            served: AtomicUsize::new(0),
        });
        let s = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        ModelServer { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn set_pace(&self, pace: Pace) {
        *self.state.pace.lock().unwrap() = pace;
    }

    fn add_model(&self, model: &str) {
        self.state.models.lock().unwrap().push(model.to_string());
    }

    fn hold(&self, held: bool) {
        self.state.open.send_replace(!held);
    }
}

fn chunk(content: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
    ))
}

async fn answer(s: Arc<ModelState>, req: Request<Incoming>) -> Result<Response<ChannelBody>, Infallible> {
    let path = req.uri().path().to_string();
    let (tx, rx) = mpsc::channel(64);
    let builder = Response::builder().header("x-served-by", s.name.as_str());
    if path == "/health" {
        let _ = tx.try_send(Bytes::from_static(b"ok"));
        drop(tx);
        return Ok(builder.header("content-length", "2").body(ChannelBody(rx)).unwrap());
    }
    if path == "/v1/models" {
        let data: Vec<_> = s
            .models
            .lock()
            .unwrap()
            .iter()
            .map(|id| serde_json::json!({"id": id, "object": "model", "owned_by": "vllm"}))
            .collect();
        let body = serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).unwrap();
        let len = body.len();
        let _ = tx.try_send(Bytes::from(body));
        drop(tx);
        return Ok(builder
            .header("content-type", "application/json")
            .header("content-length", len)
            .body(ChannelBody(rx))
            .unwrap());
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let stream = request["stream"] == true;
    s.served.fetch_add(1, Ordering::SeqCst);
    let pace = s.pace.lock().unwrap().clone();
    let mut open = s.open.subscribe();
    let _ = open.wait_for(|o| *o).await;
    if stream {
        // The head at once, as uvicorn and axum servers write it; tokens after prefill.
        tokio::spawn(async move {
            tokio::time::sleep(pace.first_token).await;
            for i in 0..pace.tokens {
                if i > 0 {
                    tokio::time::sleep(pace.gap).await;
                }
                if tx.send(chunk(&format!("t{i} "))).await.is_err() {
                    return;
                }
            }
            let usage = format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":12,\"completion_tokens\":{},\"total_tokens\":{}}}}}\n\ndata: [DONE]\n\n",
                pace.tokens,
                pace.tokens + 12
            );
            let _ = tx.send(Bytes::from(usage)).await;
        });
        return Ok(builder
            .header("content-type", "text/event-stream")
            .body(ChannelBody(rx))
            .unwrap());
    }
    // Whole answers arrive after generation, with their usage.
    tokio::time::sleep(pace.first_token + pace.gap * pace.tokens.saturating_sub(1) as u32).await;
    let text: String = (0..pace.tokens).map(|i| format!("t{i} ")).collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": pace.tokens, "total_tokens": pace.tokens + 12},
    }))
    .unwrap();
    let len = body.len();
    let _ = tx.try_send(Bytes::from(body));
    drop(tx);
    Ok(builder
        .header("content-type", "application/json")
        .header("content-length", len)
        .body(ChannelBody(rx))
        .unwrap())
}

/// Fast probes, no slow start, a long hold-down (an ejection lasts the whole test), and
/// `outlier` keys.
fn config(outlier: &str, regions: &str) -> String {
    let mut c = base_config();
    c.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    c.push_str("[health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nslow_start = \"0s\"\n\n");
    c.push_str(&format!("[outlier]\nejection_time = \"60s\"\n{outlier}\n\n"));
    c.push_str(regions);
    c
}

fn region_with(name: &str, location: [f64; 2], countries: &[&str], endpoints: &[String], keys: &str) -> String {
    format!(
        "{}\n{keys}\n\n",
        region(name, location, countries, endpoints).trim_end()
    )
}

fn chat_body(model: &str, stream: bool, system: &str, question: &str) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    })
    .to_string()
}

/// A chat completion from a client in the country of `ip`, body read to its end.
async fn chat(proxy: &Meridian, ip: &str, body: String) -> Reply {
    call(
        "POST",
        proxy.listen,
        "/v1/chat/completions",
        &[("x-forwarded-for", ip), ("content-type", "application/json")],
        body,
    )
    .await
}

/// Meridian's error code, in the OpenAI shape (`error.code`) or the first edition's.
fn error_code(body: &serde_json::Value) -> String {
    body["error"]["code"]
        .as_str()
        .or_else(|| body["error"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn endpoint_state(proxy: &Meridian, url: &str) -> serde_json::Value {
    let s = call("GET", proxy.admin, "/status", &[], Bytes::new()).await.json();
    s["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["url"] == url)
        .unwrap_or_default()
}

/// Sends `n` requests at once and returns the regions that served them.
async fn burst(proxy: &Meridian, n: usize, body: &str) -> Vec<String> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (listen, body) = (proxy.listen, body.to_string());
        tasks.push(tokio::spawn(async move {
            let r = call(
                "POST",
                listen,
                "/v1/chat/completions",
                &[("x-forwarded-for", ips::US), ("content-type", "application/json")],
                body,
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.region().unwrap_or("?").to_string()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// us-east (nearest to a US client) and us-west, one model server each.
async fn two_regions(outlier: &str) -> (Meridian, ModelServer, ModelServer) {
    let east = ModelServer::start("east", &["m"]).await;
    let west = ModelServer::start("west", &["m"]).await;
    let regions = format!(
        "{}{}",
        region("us-east", US_EAST, &["US"], &[east.url()]),
        region("us-west", US_WEST, &[], &[west.url()])
    );
    let proxy = Meridian::start(&config(outlier, &regions));
    (proxy, east, west)
}

#[tokio::test]
async fn a_slow_first_token_behind_an_instant_head_moves_traffic_to_the_next_region() {
    let (proxy, east, _west) = two_regions("ttfb_threshold = \"300ms\"").await;
    let body = chat_body("m", true, "sys", "hi");
    assert!(burst(&proxy, 2, &body).await.iter().all(|r| r == "us-east"));

    east.set_pace(Pace::new(1000, 1, 3));
    // The first-token average climbs over the threshold within a few slow answers (each
    // one waited for), then traffic moves.
    eventually("traffic moved to us-west", || async {
        burst(&proxy, 3, &body).await.iter().all(|r| r == "us-west")
    })
    .await;
    let e = endpoint_state(&proxy, &east.url()).await;
    assert_eq!(
        (&e["state"], &e["reason"]),
        (&"ejected".into(), &"slow_first_byte".into()),
        "{e}"
    );
    // The head came at once all along: head time alone would never have moved it.
    assert!(e["ttfb_ewma_ms"].as_f64().unwrap() > 300.0, "{e}");

    let metrics = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    let slow_bucket = metrics
        .lines()
        .find(|l| l.starts_with("meridian_upstream_first_token_seconds_bucket{region=\"us-east\",le=\"0.5\"}"))
        .unwrap_or_else(|| panic!("first-token histogram in\n{metrics}"));
    let count = metrics
        .lines()
        .find(|l| l.starts_with("meridian_upstream_first_token_seconds_count{region=\"us-east\"}"))
        .unwrap();
    assert_ne!(
        slow_bucket.rsplit(' ').next(),
        count.rsplit(' ').next(),
        "the slow first tokens are above 0.5 s"
    );
}

#[tokio::test]
async fn a_slow_stream_with_a_fast_first_token_stays() {
    let (proxy, east, _west) = two_regions("ttfb_threshold = \"300ms\"").await;
    // 10 tokens 100 ms apart: a second per answer, first token at once, 900 ms after it
    // spread over 10 tokens (the SPEC's TPOT): 90 ms a token.
    east.set_pace(Pace::new(5, 100, 10));
    let body = chat_body("m", true, "sys", "hi");
    for _ in 0..2 {
        let served = burst(&proxy, 3, &body).await;
        assert!(served.iter().all(|r| r == "us-east"), "{served:?}");
    }
    let e = endpoint_state(&proxy, &east.url()).await;
    assert_eq!(e["state"], "healthy", "{e}");
    assert!(e["tpot_ewma_ms"].as_f64().unwrap() >= 85.0, "{e}");
    assert!(e["ttfb_ewma_ms"].as_f64().unwrap() < 300.0, "{e}");
    // The access log: output tokens from the usage chunk, TTFT and TPOT.
    let field = |v: &serde_json::Value, k: &str| v.get("fields").unwrap_or(v)[k].clone();
    let access = || {
        proxy
            .logs()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| field(v, "output_tokens") == 10)
    };
    eventually("an access log line with output_tokens", || async { access().is_some() }).await;
    let line = access().unwrap();
    assert!(field(&line, "ttft_ms").as_f64().unwrap() < 300.0, "{line}");
    assert!(field(&line, "tpot_ms").as_f64().unwrap() >= 85.0, "{line}");
    assert_eq!(field(&line, "prompt_tokens"), 12, "{line}");
}

#[tokio::test]
async fn a_long_whole_answer_at_a_healthy_pace_is_not_ejected() {
    let (proxy, east, _west) = two_regions("ttfb_threshold = \"300ms\"").await;
    // 300 tokens at 5 ms: a 1.5 s head from a healthy endpoint.
    east.set_pace(Pace::new(5, 5, 300));
    let body = chat_body("m", false, "sys", "write a story");
    let served = burst(&proxy, 4, &body).await;
    assert!(served.iter().all(|r| r == "us-east"), "{served:?}");
    let served = burst(&proxy, 2, &body).await;
    assert!(served.iter().all(|r| r == "us-east"), "{served:?}");
    let e = endpoint_state(&proxy, &east.url()).await;
    assert_eq!(e["state"], "healthy", "{e}");
    let tpot = e["tpot_ewma_ms"].as_f64().unwrap();
    assert!((4.0..20.0).contains(&tpot), "{e}");
}

#[tokio::test]
async fn a_time_per_token_spike_over_the_threshold_ejects() {
    let (proxy, east, _west) = two_regions("ttfb_threshold = \"300ms\"\ntpot_threshold = \"100ms\"").await;
    east.set_pace(Pace::new(5, 300, 3));
    let body = chat_body("m", true, "sys", "hi");
    let _ = burst(&proxy, 3, &body).await;
    eventually("us-east ejected for slow tokens", || async {
        let e = endpoint_state(&proxy, &east.url()).await;
        e["state"] == "ejected" && e["reason"] == "slow_output_tokens"
    })
    .await;
    let served = burst(&proxy, 3, &body).await;
    assert!(served.iter().all(|r| r == "us-west"), "{served:?}");
}

#[tokio::test]
async fn a_model_served_only_farther_away_goes_there_and_an_unknown_one_is_404() {
    let east = ModelServer::start("east", &[]).await;
    let west = ModelServer::start("west", &[]).await;
    let regions = format!(
        "{}{}",
        region_with(
            "us-east",
            US_EAST,
            &["US"],
            &[east.url()],
            "models = [\"llama-3.1-70b\"]"
        ),
        region_with("us-west", US_WEST, &[], &[west.url()], "models = [\"gpt-oss-120b\"]"),
    );
    let proxy = Meridian::start(&config("", &regions));
    for (model, want) in [("llama-3.1-70b", "us-east"), ("gpt-oss-120b", "us-west")] {
        let r = chat(&proxy, ips::US, chat_body(model, false, "s", "q")).await;
        assert_eq!((r.status, r.region()), (200, Some(want)), "{model}: {}", r.text());
    }
    let r = chat(&proxy, ips::US, chat_body("no-such-model", false, "s", "q")).await;
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(error_code(&r.json()), "model_not_found");
    assert!(r.text().contains("no-such-model"), "{}", r.text());
    // Paths that name no model are routed as before.
    let r = get_as(proxy.listen, ips::US, "/v1/models").await;
    assert_eq!(r.region(), Some("us-east"));
}

#[tokio::test]
async fn a_zone_client_asking_for_a_model_its_zone_lacks_gets_404_naming_both() {
    let eu = ModelServer::start("eu", &[]).await;
    let us = ModelServer::start("us", &[]).await;
    let regions = format!(
        "{}{}[[residency]]\nname = \"eu\"\ncountries = [\"DE\"]\nregions = [\"eu-central\"]\n\n",
        region_with(
            "eu-central",
            EU_CENTRAL,
            &["DE"],
            &[eu.url()],
            "models = [\"llama-3.1-70b\"]"
        ),
        region_with(
            "us-east",
            US_EAST,
            &["US"],
            &[us.url()],
            "models = [\"gpt-oss-120b\", \"llama-3.1-70b\"]"
        ),
    );
    let proxy = Meridian::start(&config("", &regions));
    let r = chat(&proxy, ips::DE, chat_body("llama-3.1-70b", false, "s", "q")).await;
    assert_eq!((r.status, r.region()), (200, Some("eu-central")), "{}", r.text());
    let r = chat(&proxy, ips::DE, chat_body("gpt-oss-120b", false, "s", "q")).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let v = r.json();
    assert_eq!(error_code(&v), "model_not_available_in_zone");
    let text = r.text();
    assert!(text.contains("eu") && text.contains("gpt-oss-120b"), "{text}");
    assert_eq!(us.state.served.load(Ordering::SeqCst), 0, "never sent out of the zone");
    // A client without a zone gets it from us-east.
    let r = chat(&proxy, ips::US, chat_body("gpt-oss-120b", false, "s", "q")).await;
    assert_eq!((r.status, r.region()), (200, Some("us-east")));
}

#[tokio::test]
async fn a_model_added_to_v1_models_is_discovered_without_a_reload() {
    let east = ModelServer::start("east", &["llama-3.1-70b"]).await;
    let west = ModelServer::start("west", &[]).await;
    let regions = format!(
        "{}{}",
        region_with("us-east", US_EAST, &["US"], &[east.url()], "discover_models = true"),
        region("us-west", US_WEST, &[], &[west.url()]),
    );
    let proxy = Meridian::start(&config("", &regions));
    let discovered = |proxy: &Meridian| {
        let admin = proxy.admin;
        async move {
            let s = call("GET", admin, "/status", &[], Bytes::new()).await.json();
            s["regions"][0]["discovered_models"].clone()
        }
    };
    eventually("us-east's models discovered", || async {
        discovered(&proxy).await == serde_json::json!(["llama-3.1-70b"])
    })
    .await;
    let r = chat(&proxy, ips::US, chat_body("qwen-2.5-72b", false, "s", "q")).await;
    assert_eq!((r.status, r.region()), (200, Some("us-west")), "{}", r.text());
    let r = chat(&proxy, ips::US, chat_body("llama-3.1-70b", false, "s", "q")).await;
    assert_eq!(r.region(), Some("us-east"));

    east.add_model("qwen-2.5-72b");
    eventually("the new model is routed to us-east", || async {
        chat(&proxy, ips::US, chat_body("qwen-2.5-72b", false, "s", "q"))
            .await
            .region()
            == Some("us-east")
    })
    .await;
    assert!(
        discovered(&proxy)
            .await
            .as_array()
            .unwrap()
            .contains(&"qwen-2.5-72b".into())
    );
}

#[tokio::test]
async fn the_same_prompt_prefix_lands_on_the_same_endpoint_and_spreads_over_the_bound() {
    let servers = [
        ModelServer::start("a", &[]).await,
        ModelServer::start("b", &[]).await,
        ModelServer::start("c", &[]).await,
    ];
    let urls: Vec<String> = servers.iter().map(ModelServer::url).collect();
    let regions = region_with(
        "us-east",
        US_EAST,
        &["US"],
        &urls,
        "affinity = { prefix_bytes = 256, max_load_factor = 1.25 }",
    );
    let proxy = Meridian::start(&config("", &regions));
    let system = "You are the support assistant of a bicycle shop. Answer briefly. ".repeat(8);
    let served_by = |r: &Reply| r.header("x-served-by").unwrap_or("?").to_string();
    // Balanced (nothing in flight between requests): one endpoint for every question.
    let mut seen = Vec::new();
    for i in 0..8 {
        let r = chat(
            &proxy,
            ips::US,
            chat_body("m", i % 2 == 0, &system, &format!("question {i}")),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.push(served_by(&r));
    }
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    // Another prompt prefix is hashed independently: over a few, more than one endpoint.
    let mut homes = std::collections::HashSet::new();
    for i in 0..12 {
        let r = chat(
            &proxy,
            ips::US,
            chat_body("m", false, &format!("system prompt {i}"), "q"),
        )
        .await;
        homes.insert(served_by(&r));
    }
    assert!(homes.len() > 1, "{homes:?}");

    // Loaded: requests held in flight push the prefix's endpoint past the bound.
    servers.iter().for_each(|s| s.hold(true));
    let mut tasks = Vec::new();
    for i in 0..6 {
        let (listen, body) = (proxy.listen, chat_body("m", false, &system, &format!("held {i}")));
        tasks.push(tokio::spawn(async move {
            call(
                "POST",
                listen,
                "/v1/chat/completions",
                &[("x-forwarded-for", ips::US), ("content-type", "application/json")],
                body,
            )
            .await
        }));
        // One at a time, so each pick sees the ones before in flight.
        let before = i + 1;
        eventually("the request reached a server", || async {
            servers
                .iter()
                .map(|s| s.state.served.load(Ordering::SeqCst))
                .sum::<usize>()
                >= 8 + 12 + before
        })
        .await;
    }
    servers.iter().for_each(|s| s.hold(false));
    let mut spread = std::collections::HashSet::new();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        spread.insert(served_by(&r));
    }
    assert!(spread.len() > 1, "all held requests on {spread:?}");
    assert!(spread.contains(&seen[0]));
}

#[tokio::test]
async fn tokens_per_minute_are_charged_from_the_answers_usage() {
    let server = ModelServer::start("east", &["m"]).await;
    // Each whole answer reports 12 prompt + 50 completion tokens: 62 of a budget of 100.
    server.set_pace(Pace::new(5, 1, 50));
    let mut regions = region("us-east", US_EAST, &["US"], &[server.url()]);
    regions.push_str("[[limit]]\nname = \"tpm\"\nkey = \"client_ip\"\ntokens_per_minute = 100\n\n");
    let proxy = Meridian::start(&config("", &regions));
    let body = chat_body("m", false, "sys", "hi");

    // Admitted while under the budget: 0, then 62 tokens used.
    for n in 0..2 {
        let r = chat(&proxy, ips::US, body.clone()).await;
        assert_eq!(r.status, 200, "answer {n}: {}", r.text());
    }
    // 124 of 100 now charged: the key is over its budget until the minute refills it.
    let mut limited = None;
    for _ in 0..3 {
        let r = chat(&proxy, ips::US, body.clone()).await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let limited = limited.unwrap_or_else(|| panic!("no 429 once the token budget was spent"));
    assert_eq!(error_code(&limited.json()), "rate_limit_exceeded");
    assert!(limited.header("retry-after").is_some());
    assert!(
        limited.header("x-ratelimit-limit-tokens").is_some(),
        "token headers on a limited answer"
    );
    assert!(
        server.state.served.load(Ordering::Relaxed) <= 3,
        "the limit held at the endpoint"
    );
}
