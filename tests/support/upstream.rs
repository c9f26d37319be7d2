//! A fake inference endpoint on loopback: OpenAI-style chat completions (JSON or SSE),
//! `/health`, and behaviours a test can switch at runtime (slow, erroring, stalling,
//! resetting, dead). The integration tests' stand-in for a model server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;

/// How the endpoint answers requests other than its health probe.
#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    /// 200 with a JSON completion, or an SSE stream when the body asks for `"stream": true`.
    Ok,
    /// Wait before the response head.
    SlowFirstByte(Duration),
    /// Answer with this status and a small JSON body.
    Status(u16),
    /// Answer 429 with `Retry-After: secs`.
    RetryAfter(u64),
    /// SSE: `events` events `gap` apart, first one at once.
    Stream { events: usize, gap: Duration },
    /// SSE: one event, then wait for [`FakeUpstream::release`] before the rest.
    Gated { events: usize },
    /// SSE: one event, then silence forever.
    Stall,
    /// Accept and read the request, then close the connection without answering.
    Reset,
    /// Accept, then never answer.
    Hang,
    /// Write bytes that are not HTTP.
    Garbage,
    /// Answer 500 to about this percentage of requests, at random; 200 otherwise.
    FailSome { percent: u8 },
    /// Down (503 to requests and probes) for `period`, then up for `period`, and so on,
    /// starting down when the behaviour is set.
    Flap { period: Duration },
    /// gRPC-style: a data frame, then trailers `grpc-status: 0` and `grpc-message: ok`
    /// (announced in `Trailer`, so HTTP/1.1 clients that send `TE: trailers` get them too).
    Trailers,
}

/// What a TLS client showed the endpoint in its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSeen {
    pub sni: Option<String>,
    pub alpn: Option<Vec<u8>>,
    pub client_certificate: bool,
}

/// A request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub version: http::Version,
    pub method: Method,
    pub path: String,
    /// The request target's authority: HTTP/2's `:authority` (none in HTTP/1.1's origin form).
    pub authority: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The request body's trailers, when it ended with some.
    pub trailers: Option<HeaderMap>,
}

struct State {
    name: String,
    /// While killed: a socket bound to the address but not listening, so connections are
    /// refused and no other socket on the host can take the port.
    hold: Mutex<Option<tokio::net::TcpSocket>>,
    behavior: Mutex<Behavior>,
    /// When the behaviour was set (the phase of [`Behavior::Flap`]).
    behavior_since: Mutex<std::time::Instant>,
    healthy: AtomicBool,
    requests: AtomicU64,
    probes: AtomicU64,
    connections: AtomicU64,
    /// Connections open now (accepted, not yet closed).
    open: AtomicU64,
    seen: Mutex<Vec<Seen>>,
    gate: Notify,
    /// Extra response headers (e.g. ORCA load reports).
    extra_headers: Mutex<HeaderMap>,
    /// Body of `GET /metrics`, for load-signal scrapes.
    metrics: Mutex<String>,
    /// Serve HTTPS instead of cleartext.
    tls: Option<tokio_rustls::TlsAcceptor>,
    tls_seen: Mutex<Vec<TlsSeen>>,
}

/// A running fake endpoint. Dropping it stops it.
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    stop: watch::Sender<bool>,
}

type FakeBody = BoxBody<Bytes, Infallible>;

impl FakeUpstream {
    /// Starts on an ephemeral loopback port.
    pub async fn start(name: &str) -> std::io::Result<FakeUpstream> {
        FakeUpstream::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> std::io::Result<FakeUpstream> {
        FakeUpstream::start_with(name, addr, None).await
    }

    /// Starts an HTTPS endpoint on an ephemeral loopback port with `config` (certificates,
    /// ALPN, client authentication as the caller wants).
    pub async fn start_tls(name: &str, config: Arc<rustls::ServerConfig>) -> std::io::Result<FakeUpstream> {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        FakeUpstream::start_with(name, SocketAddr::from(([127, 0, 0, 1], 0)), Some(acceptor)).await
    }

    async fn start_with(
        name: &str,
        addr: SocketAddr,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Result<FakeUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            name: name.to_string(),
            hold: Mutex::new(None),
            behavior: Mutex::new(Behavior::Ok),
            behavior_since: Mutex::new(std::time::Instant::now()),
            healthy: AtomicBool::new(true),
            requests: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            seen: Mutex::new(Vec::new()),
            gate: Notify::new(),
            extra_headers: Mutex::new(HeaderMap::new()),
            metrics: Mutex::new(String::new()),
            tls,
            tls_seen: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept_loop(listener, state.clone(), stopped));
        Ok(FakeUpstream { addr, state, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        let scheme = if self.state.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// TLS handshakes completed so far.
    pub fn tls_seen(&self) -> Vec<TlsSeen> {
        lock(&self.state.tls_seen).clone()
    }

    pub fn set_behavior(&self, b: Behavior) {
        *lock(&self.state.behavior_since) = std::time::Instant::now();
        *lock(&self.state.behavior) = b;
    }

    /// Whether `/health` answers 200 (true) or 503.
    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::Release);
    }

    /// Lets a [`Behavior::Gated`] stream continue.
    pub fn release(&self) {
        self.state.gate.notify_waiters();
        self.state.gate.notify_one();
    }

    pub fn set_header(&self, name: &'static str, value: &str) {
        if let Ok(v) = header::HeaderValue::from_str(value) {
            lock(&self.state.extra_headers).insert(name, v);
        }
    }

    pub fn set_metrics(&self, text: &str) {
        *lock(&self.state.metrics) = text.to_string();
    }

    /// Requests served, not counting health probes or metrics scrapes.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Acquire)
    }

    pub fn probes(&self) -> u64 {
        self.state.probes.load(Ordering::Acquire)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Acquire)
    }

    /// TCP connections open now.
    pub fn open_connections(&self) -> u64 {
        self.state.open.load(Ordering::Acquire)
    }

    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    /// Stops listening and closes every open connection, as a crashed server would.
    pub fn kill(&self) {
        let _ = self.stop.send(true);
    }

    /// [`kill`](Self::kill), then waits until the listener is closed and the port held, so
    /// the next connection is refused.
    pub async fn kill_and_wait(&self) {
        self.kill();
        for _ in 0..2000 {
            if lock(&self.state.hold).is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Starts again on the same address after [`kill`](Self::kill).
    pub async fn revive(&mut self) -> std::io::Result<()> {
        // While it was down, an outgoing connection on this host may have been given the
        // freed port as its ephemeral source port; such connections are short, so retry.
        let mut tries = 0;
        let listener = loop {
            // Released on every try: a kill() just before may still be stopping its accept
            // loop, which takes the hold only once its listener is closed.
            lock(&self.state.hold).take();
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let (stop, stopped) = watch::channel(false);
        self.stop = stop;
        tokio::spawn(accept_loop(listener, self.state.clone(), stopped));
        Ok(())
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Counts a connection out of [`FakeUpstream::open_connections`] however its task ends.
struct OpenConnection(Arc<State>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, mut stopped: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                state.connections.fetch_add(1, Ordering::AcqRel);
                state.open.fetch_add(1, Ordering::AcqRel);
                let state = state.clone();
                conns.spawn(async move {
                    let _open = OpenConnection(state.clone());
                    let behavior = lock(&state.behavior).clone();
                    if behavior == Behavior::Garbage {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut stream = stream;
                        let mut buf = [0u8; 1024];
                        let _ = stream.read(&mut buf).await;
                        let _ = stream.write_all(b"\x00\x01garbage, not HTTP at all\r\n\r\n").await;
                        return;
                    }
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match state.tls.clone() {
                        None => {
                            let service = service_fn(move |req| handle(state.clone(), req));
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else { return };
                            let (_, conn) = stream.get_ref();
                            lock(&state.tls_seen).push(TlsSeen {
                                sni: conn.server_name().map(str::to_string),
                                alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                                client_certificate: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                            });
                            let service = service_fn(move |req| handle(state.clone(), req));
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
            _ = stopped.changed() => break,
        }
    }
    conns.abort_all();
    let addr = listener.local_addr();
    drop(listener);
    if let Ok(addr) = addr {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        if let Ok(socket) = socket {
            // Connections accepted on the port may linger (closing, TIME_WAIT).
            let _ = socket.set_reuseaddr(true);
            if socket.bind(addr).is_ok() {
                *lock(&state.hold) = Some(socket);
            }
        }
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<FakeBody> {
    let mut resp = Response::new(http_body_util::Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

fn sse_event(name: &str, index: usize, token: &str) -> Bytes {
    let chunk = serde_json::json!({
        "id": format!("chatcmpl-{name}"),
        "object": "chat.completion.chunk",
        "region": name,
        "index": index,
        "choices": [{"index": 0, "delta": {"content": token}}],
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

const TOKENS: [&str; 8] = ["Hello", " from", " region", " ", "", ".", " Streaming", " works."];

fn token(name: &str, i: usize) -> String {
    match TOKENS.get(i) {
        Some(&"") => name.to_string(),
        Some(t) => (*t).to_string(),
        None => format!(" token{i}"),
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<FakeBody>, Box<dyn std::error::Error + Send + Sync>> {
    let path = req.uri().path().to_string();
    if path == "/health" {
        state.probes.fetch_add(1, Ordering::AcqRel);
        return Ok(if state.healthy.load(Ordering::Acquire) && !flapped_down(&state) {
            full(StatusCode::OK, "application/json", r#"{"status":"ok"}"#)
        } else {
            full(
                StatusCode::SERVICE_UNAVAILABLE,
                "application/json",
                r#"{"status":"down"}"#,
            )
        });
    }
    if path == "/metrics" {
        let text = lock(&state.metrics).clone();
        return Ok(full(StatusCode::OK, "text/plain; version=0.0.4", text));
    }
    let (parts, body) = req.into_parts();
    let (body, trailers) = match body.collect().await {
        Ok(collected) => {
            let trailers = collected.trailers().cloned();
            (collected.to_bytes(), trailers)
        }
        Err(_) => (Bytes::new(), None),
    };
    state.requests.fetch_add(1, Ordering::AcqRel);
    lock(&state.seen).push(Seen {
        version: parts.version,
        method: parts.method.clone(),
        path: parts.uri.path_and_query().map_or(path.clone(), |p| p.to_string()),
        authority: parts.uri.authority().map(|a| a.to_string()),
        headers: parts.headers.clone(),
        body: body.clone(),
        trailers,
    });
    let wants_stream = {
        let text = String::from_utf8_lossy(&body);
        text.contains("\"stream\":true")
            || text.contains("\"stream\": true")
            || parts
                .headers
                .get(header::ACCEPT)
                .is_some_and(|a| a == "text/event-stream")
    };
    let behavior = lock(&state.behavior).clone();
    let name = state.name.clone();
    let mut resp = match behavior {
        Behavior::Ok if wants_stream => stream(state.clone(), TOKENS.len(), Duration::from_millis(40), false, false),
        Behavior::Ok => completion(&name, &body),
        Behavior::SlowFirstByte(d) => {
            tokio::time::sleep(d).await;
            if wants_stream {
                stream(state.clone(), 3, Duration::from_millis(10), false, false)
            } else {
                completion(&name, &body)
            }
        }
        Behavior::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            full(
                status,
                "application/json",
                format!(r#"{{"error":"fake {code}","region":"{name}"}}"#),
            )
        }
        Behavior::RetryAfter(secs) => {
            let mut r = full(
                StatusCode::TOO_MANY_REQUESTS,
                "application/json",
                r#"{"error":"overloaded"}"#,
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
            r
        }
        Behavior::Stream { events, gap } => stream(state.clone(), events, gap, false, false),
        Behavior::Gated { events } => stream(state.clone(), events, Duration::ZERO, true, false),
        Behavior::Stall => stream(state.clone(), 2, Duration::ZERO, false, true),
        // A service error makes hyper close the connection without a response.
        Behavior::Reset => return Err("reset by fake upstream".into()),
        Behavior::Hang => {
            std::future::pending::<()>().await;
            completion(&name, &body)
        }
        Behavior::Garbage => completion(&name, &body),
        Behavior::FailSome { percent } if fastrand::u8(..100) < percent => full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "application/json",
            format!(r#"{{"error":"fake 500","region":"{name}"}}"#),
        ),
        Behavior::Flap { .. } if flapped_down(&state) => full(
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            format!(r#"{{"error":"fake flap","region":"{name}"}}"#),
        ),
        Behavior::FailSome { .. } | Behavior::Flap { .. } => completion(&name, &body),
        Behavior::Trailers => grpc_like(),
    };
    for (k, v) in lock(&state.extra_headers).iter() {
        resp.headers_mut().insert(k.clone(), v.clone());
    }
    resp.headers_mut().insert(
        "x-upstream-region",
        header::HeaderValue::from_str(&name).unwrap_or(header::HeaderValue::from_static("?")),
    );
    Ok(resp)
}

/// In the down half of a [`Behavior::Flap`] cycle.
fn flapped_down(state: &State) -> bool {
    let Behavior::Flap { period } = *lock(&state.behavior) else {
        return false;
    };
    let elapsed = lock(&state.behavior_since).elapsed();
    period.is_zero() || (elapsed.as_nanos() / period.as_nanos()).is_multiple_of(2)
}

fn completion(name: &str, body: &Bytes) -> Response<FakeBody> {
    let reply = serde_json::json!({
        "id": format!("chatcmpl-{name}"),
        "object": "chat.completion",
        "region": name,
        "request_bytes": body.len(),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Hello from {name}.")}}],
    });
    full(StatusCode::OK, "application/json", reply.to_string())
}

fn grpc_like() -> Response<FakeBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", header::HeaderValue::from_static("0"));
    trailers.insert("grpc-message", header::HeaderValue::from_static("ok"));
    let frames = [
        // One length-prefixed gRPC message: uncompressed, 2 bytes.
        Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi")),
        Frame::trailers(trailers),
    ];
    let body = StreamBody::new(futures_stream(move |tx| async move {
        for frame in frames {
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    }));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/grpc"),
    );
    resp.headers_mut().insert(
        header::TRAILER,
        header::HeaderValue::from_static("grpc-status, grpc-message"),
    );
    resp
}

fn stream(state: Arc<State>, events: usize, gap: Duration, gated: bool, stall: bool) -> Response<FakeBody> {
    let name = state.name.clone();
    let body = StreamBody::new(futures_stream(move |tx| async move {
        for i in 0..events {
            if i > 0 {
                if gated && i == 1 {
                    state.gate.notified().await;
                } else if stall {
                    std::future::pending::<()>().await;
                } else if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
            }
            if tx
                .send(Frame::data(sse_event(&name, i, &token(&name, i))))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = tx.send(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    }));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    resp
}

/// A body stream fed by a task through a channel.
fn futures_stream<F, Fut>(produce: F) -> ChannelStream
where
    F: FnOnce(mpsc::Sender<Frame<Bytes>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(produce(tx));
    ChannelStream { rx }
}

pub struct ChannelStream {
    rx: mpsc::Receiver<Frame<Bytes>>,
}

impl futures_core::Stream for ChannelStream {
    type Item = Result<Frame<Bytes>, Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|f| f.map(Ok))
    }
}
