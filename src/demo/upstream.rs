//! The demo's model server: one per region on loopback, answering as an OpenAI-compatible
//! server does. `POST` answers a chat completion (JSON with `usage`, or with
//! `"stream": true` an SSE stream whose head comes at once and whose tokens follow, 40 ms
//! apart, the last chunk carrying `usage`); `GET /v1/models` lists the one model `demo`;
//! `GET /health` is 200. Tests use their own endpoint with switchable faults
//! (`tests/support/upstream.rs`); nothing here is meant to fail.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

type DemoBody = BoxBody<Bytes, Infallible>;

/// The answer's words, one SSE event each; the region's name is spliced in.
const WORDS: [&str; 8] = [
    "Hello",
    " from",
    " region",
    " ",
    "{region}",
    ".",
    " Streaming",
    " works.",
];
const TOKEN_GAP: Duration = Duration::from_millis(40);

/// A running demo endpoint; dropping it stops it.
pub(crate) struct DemoUpstream {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
}

impl DemoUpstream {
    /// Starts on an ephemeral loopback port.
    pub(crate) async fn start(region: &str) -> std::io::Result<DemoUpstream> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::from(region), stopped));
        Ok(DemoUpstream { addr, stop })
    }

    /// `http://127.0.0.1:port`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(listener: TcpListener, region: Arc<str>, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let region = region.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(region.clone(), req));
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
            _ = stopped.changed() => return,
        }
    }
}

async fn answer(region: Arc<str>, req: Request<Incoming>) -> Result<Response<DemoBody>, Infallible> {
    let (parts, body) = req.into_parts();
    match (&parts.method, parts.uri.path()) {
        (_, "/health") => return Ok(json(r#"{"status":"ok"}"#.to_string())),
        (&Method::GET, "/v1/models") => {
            return Ok(json(
                r#"{"object":"list","data":[{"id":"demo","object":"model","owned_by":"meridian-demo"}]}"#.to_string(),
            ));
        }
        _ => {}
    }
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let streamed = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("stream").and_then(serde_json::Value::as_bool))
        .unwrap_or(false);
    Ok(if streamed { stream(region) } else { completion(&region) })
}

fn json(text: String) -> Response<DemoBody> {
    let mut resp = Response::new(Full::new(Bytes::from(text)).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn word(region: &str, i: usize) -> &str {
    match WORDS.get(i) {
        Some(&"{region}") => region,
        Some(w) => w,
        None => "",
    }
}

fn completion(region: &str) -> Response<DemoBody> {
    let text: String = (0..WORDS.len()).map(|i| word(region, i)).collect();
    let reply = serde_json::json!({
        "id": format!("chatcmpl-{region}"),
        "object": "chat.completion",
        "model": "demo",
        "region": region,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": WORDS.len(), "total_tokens": 8 + WORDS.len()},
    });
    json(reply.to_string())
}

fn stream(region: Arc<str>) -> Response<DemoBody> {
    // The head goes at once; the first token only after a gap, as prefill takes on a real
    // server, then one per gap.
    let mut gap = tokio::time::interval_at(tokio::time::Instant::now() + TOKEN_GAP, TOKEN_GAP);
    gap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let tokens = TokenStream { region, next: 0, gap };
    let mut resp = Response::new(StreamBody::new(tokens).boxed());
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    resp
}

/// The SSE events of one answer: a chunk per word on each tick, then a usage chunk, then
/// `[DONE]`, as vLLM sends them with `stream_options.include_usage`.
struct TokenStream {
    region: Arc<str>,
    next: usize,
    gap: tokio::time::Interval,
}

impl futures_core::Stream for TokenStream {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let i = self.next;
        if i > WORDS.len() + 1 {
            return Poll::Ready(None);
        }
        if i < WORDS.len() && self.gap.poll_tick(cx).is_pending() {
            return Poll::Pending;
        }
        self.next += 1;
        let event = if i < WORDS.len() {
            let chunk = serde_json::json!({
                "id": format!("chatcmpl-{}", self.region),
                "object": "chat.completion.chunk",
                "model": "demo",
                "choices": [{"index": 0, "delta": {"content": word(&self.region, i)}}],
            });
            format!("data: {chunk}\n\n")
        } else if i == WORDS.len() {
            let usage = serde_json::json!({
                "id": format!("chatcmpl-{}", self.region),
                "object": "chat.completion.chunk",
                "model": "demo",
                "choices": [],
                "usage": {"prompt_tokens": 8, "completion_tokens": WORDS.len(), "total_tokens": 8 + WORDS.len()},
            });
            format!("data: {usage}\n\n")
        } else {
            "data: [DONE]\n\n".to_string()
        };
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }
}
