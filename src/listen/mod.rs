//! Client-facing listeners: accept loop, connection limits, idle and header timeouts,
//! PROXY protocol, TLS, HTTP/1.1 (Meridian's own server, [`h1`]) + HTTP/2 (hyper's; h2c
//! or ALPN) on one port, graceful shutdown.

pub mod h1;
mod idle;
/// Connections the kernel queues for `accept`: a burst of clients connecting at once must
/// not overflow it while the runtime is busy, or their SYNs are dropped and each retries a
/// second later. NGINX asks for 511; the kernel caps it at `net.core.somaxconn`. (tokio's
/// own `bind` asks for 128.)
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr` with a deep accept queue (and `SO_REUSEADDR`, so a restart
/// does not wait for the old connections' `TIME_WAIT`).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

pub mod proxy_protocol;
mod recycle;
mod send;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use http::header;

use crate::config::ServerConfig;
use crate::error::ProxyError;
use crate::forward::body::ResponseBody;
use crate::forward::client_body::ClientBody;
use crate::forward::inbound::ClientHead;
use crate::geo::LocateMemo;
use crate::proxy::{ConnInfo, Proxy};
pub use idle::{ActiveRequest, Activity, IdleIo, Timeouts};
use proxy_protocol::ProxyHeaderError;
use recycle::Recycled;

/// Limits applied to every client connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) http2_max_concurrent_streams: u32,
    /// `server.shutdown_timeout`: how long shutdown waits for in-flight requests and streams.
    pub shutdown_timeout: Duration,
    /// Every connection starts with a PROXY v1/v2 header naming the client.
    pub proxy_protocol: bool,
}

impl Limits {
    pub(crate) fn from_config(s: &ServerConfig) -> Limits {
        Limits {
            max_connections: s.max_connections,
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            send_timeout: s.send_timeout,
            http2_max_concurrent_streams: s.http2_max_concurrent_streams,
            shutdown_timeout: s.shutdown_timeout,
            proxy_protocol: s.proxy_protocol,
        }
    }
}

/// hyper's HTTP/2 server settings for client connections (HTTP/1.1 is Meridian's own, in
/// [`h1`]).
pub struct Builders {
    http2: http2::Builder<TokioExecutor>,
}

/// The server settings of every client connection, from the listener's limits.
pub fn builder(limits: &Limits) -> Builders {
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(header_list_cap(limits.max_header_bytes, limits.max_headers))
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(100);
    Builders { http2 }
}

/// The header list size HTTP/2 advertises and enforces (`SETTINGS_MAX_HEADER_LIST_SIZE`):
/// `server.max_header_bytes` plus what HTTP/2 counts beyond HTTP/1.1 for a head of
/// `server.max_headers` fields (32 bytes a field, RFC 7541 §4.1, where a head line adds
/// four, and the pseudo-header fields). Every head HTTP/1.1 accepts fits; Meridian then
/// holds each request to HTTP/1.1's count itself ([`Http1Head`]) and answers JSON,
/// where the h2 crate's own 431 above this size has no body.
fn header_list_cap(max_header_bytes: usize, max_headers: usize) -> u32 {
    let slack = max_headers.saturating_add(5).saturating_mul(32);
    u32::try_from(max_header_bytes.saturating_add(slack)).unwrap_or(u32::MAX)
}

/// The HTTP/2 client preface (RFC 9113 §3.4): a connection that opens with it speaks h2c
/// with prior knowledge (or h2 after ALPN), any other is HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes, as far as they can still be the HTTP/2 preface: 24
/// bytes that are the preface, or fewer that stop matching it (or the peer closed first).
/// HTTP/1.1 starts its read buffer with them; for HTTP/2, [`Rewound`] gives them back to
/// hyper together with what follows.
async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> std::io::Result<([u8; 24], usize)> {
    let mut buf = [0u8; 24];
    let mut filled = 0;
    while filled < buf.len() && buf[..filled] == H2_PREFACE[..filled] {
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok((buf, filled))
}

/// An IO whose first read returns the sniffed bytes followed, in the same read, by
/// whatever the socket already holds.
struct Rewound<I> {
    sniffed: [u8; 24],
    start: usize,
    end: usize,
    inner: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewound<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.start == this.end {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = (this.end - this.start).min(buf.remaining());
        buf.put_slice(&this.sniffed[this.start..this.start + n]);
        this.start += n;
        if this.start == this.end && buf.remaining() > 0 {
            // The rest of the head, if it is there; an error or nothing yet shows on the
            // next read, which hyper makes once it has parsed what it got.
            let mut more = buf.take(buf.remaining());
            if let Poll::Ready(Ok(())) = Pin::new(&mut this.inner).poll_read(cx, &mut more) {
                let got = more.filled().len();
                // SAFETY: `more` borrows `buf`'s unfilled part; the inner read initialised
                // and filled its first `got` bytes.
                unsafe { buf.assume_init(got) };
                buf.advance(got);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewound<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's (HTTP/2) connections that can finish their requests in flight and then close.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self)
    }
}

/// Runs `conn` until it ends; when the listener shuts down (or is gone), asks it to finish
/// its requests in flight and close. The receiver is held until the connection ends:
/// the listener's shutdown waits for every one, HTTP/1.1's included ([`h1`] watches the
/// same receiver).
async fn graceful<C: Graceful>(conn: C, mut drain: watch::Receiver<()>) -> hyper::Result<()> {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        biased;
        done = conn.as_mut() => return done,
        // A shutdown, or the listener gone: either way, no new requests.
        _ = drain.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}

/// Serves cleartext HTTP/1.1 and h2c on `listener` until `shutdown` turns true, then
/// stops accepting and waits for open connections up to `shutdown_timeout`.
pub async fn serve(listener: TcpListener, proxy: Proxy, limits: Limits, shutdown: watch::Receiver<bool>) {
    accept_loop(listener, proxy, limits, None, shutdown).await
}

/// Serves HTTPS (ALPN h2 and http/1.1) on `listener`, like [`serve`] otherwise.
pub(crate) async fn serve_tls(
    listener: TcpListener,
    proxy: Proxy,
    limits: Limits,
    tls: TlsAcceptor,
    shutdown: watch::Receiver<bool>,
) {
    accept_loop(listener, proxy, limits, Some(tls), shutdown).await
}

/// Why a connection was closed before HTTP started.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    ProxyHeader(#[from] ProxyHeaderError),
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("TLS handshake not done within {0:?}")]
    TlsTimeout(Duration),
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Proxy,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&limits));
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection holds a receiver until it ends; shutdown signals them and waits.
    let (drain, _) = watch::channel(());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "connection limit reached; closing");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gauge = proxy.shared.metrics.open_connections.clone();
        let conn = Connection {
            proxy: proxy.clone(),
            limits: limits.clone(),
            builder: builder.clone(),
            drain: drain.subscribe(),
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            gauge.inc();
            match conn.run(stream, peer, tls).await {
                Ok(()) => {}
                // A bad PROXY header usually means a load balancer without the PROXY
                // protocol, or a client reaching the listener around it: worth seeing.
                Err(e @ HandshakeError::ProxyHeader(_)) => {
                    tracing::warn!(%peer, error = %e, "connection closed: no valid PROXY header")
                }
                // Failed TLS handshakes are scanners and broken clients: too common to warn.
                Err(e) => tracing::debug!(%peer, error = %e, "connection closed before HTTP"),
            }
            gauge.dec();
        });
    }
    drop(listener);
    let _ = drain.send(());
    if tokio::time::timeout(limits.shutdown_timeout, drain.closed())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout: closing connections still open");
    }
}

/// One accepted connection: PROXY header, TLS handshake, then HTTP.
struct Connection {
    proxy: Proxy,
    limits: Arc<Limits>,
    builder: Arc<Builders>,
    drain: watch::Receiver<()>,
}

impl Connection {
    async fn run(
        self,
        stream: TcpStream,
        tcp_peer: SocketAddr,
        tls: Option<TlsAcceptor>,
    ) -> Result<(), HandshakeError> {
        // Both preludes share the header read timeout: a client that dawdles before its
        // first request is cut off just like one that dawdles inside it.
        // Each stage is boxed: the connection's task then holds only the stage it is in,
        // not the largest of them (11 KiB with the TLS handshake and both serve paths
        // inline, for every plain connection's life).
        let deadline = self.limits.header_read_timeout;
        if self.limits.proxy_protocol {
            let (source, stream) = Box::pin(proxy_protocol::read_header(stream, deadline)).await?;
            self.secure(stream, source.unwrap_or(tcp_peer), tls).await
        } else {
            self.secure(stream, tcp_peer, tls).await
        }
    }

    /// The TLS handshake, when the listener has one, then HTTP.
    async fn secure<S>(self, stream: S, peer: SocketAddr, tls: Option<TlsAcceptor>) -> Result<(), HandshakeError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let deadline = self.limits.header_read_timeout;
        match tls {
            None => {
                Box::pin(self.serve(stream, ConnInfo { peer, tls: false })).await;
                Ok(())
            }
            Some(acceptor) => {
                let stream = match tokio::time::timeout(deadline, Box::pin(acceptor.accept(stream))).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(HandshakeError::Tls(e)),
                    Err(_) => return Err(HandshakeError::TlsTimeout(deadline)),
                };
                Box::pin(self.serve(stream, ConnInfo { peer, tls: true })).await;
                Ok(())
            }
        }
    }

    /// Serves HTTP on an established stream; HTTP/1.1 or HTTP/2 is told from the preface,
    /// which also covers ALPN h2 (the client then opens with the preface).
    async fn serve<I>(self, io: I, info: ConnInfo)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = info.peer;
        let proxy = self.proxy;
        let timeouts = Timeouts {
            header_read: self.limits.header_read_timeout,
            idle: self.limits.idle_timeout,
            send: self.limits.send_timeout,
        };
        let (mut io, activity) = IdleIo::new(io, timeouts);
        let mut drain = self.drain;
        let sniffed = tokio::select! {
            biased;
            sniffed = sniff(&mut io) => sniffed,
            // Shutting down before the first request: nothing to finish (as hyper-util's
            // auto connection, which cancels its version read).
            _ = drain.changed() => return,
        };
        let (sniffed, end) = match sniffed {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
                return;
            }
        };
        if sniffed[..end] != H2_PREFACE[..] {
            h1::serve(io, &sniffed[..end], proxy, info, activity, &self.limits, drain).await;
            return;
        }
        let io = TokioIo::new(Rewound {
            sniffed,
            start: 0,
            end,
            inner: io,
        });
        let send_timeout = timeouts.send;
        let max_headers = self.limits.max_headers;
        let max_header_bytes = self.limits.max_header_bytes;
        // The streams of one connection come from one client: its last lookup is kept.
        let memo = Arc::new(LocateMemo::default());
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let proxy = proxy.clone();
            let memo = memo.clone();
            let guard = activity.begin();
            // All of the stream's work in one block from the spares, built in place: hyper
            // keeps the future it is given (in the stream's task, for the stream's life,
            // moved a few times as the task is spawned), so that is a pointer, not the
            // request and its ~4 KiB of state.
            Recycled::pin_in_place(|| async move {
                let head_request = req.method() == http::Method::HEAD;
                let head = Http1Head::of(&req);
                let mut resp = if head.fields > max_headers || head.bytes > max_header_bytes {
                    // As HTTP/1.1 refuses such a head: never routed, never forwarded.
                    tracing::debug!(%peer, ?head, max_headers, max_header_bytes, "HTTP/2 request head too large");
                    ProxyError::MalformedHead { status: 431 }.response(Duration::ZERO)
                } else {
                    let (parts, body) = req.into_parts();
                    // In the stream's block, where the rest of its state is.
                    let mut head = ClientHead { parts, listed: None };
                    let Ok(resp) = proxy.handle(info, Some(&memo), &mut head, ClientBody::from(body)).await;
                    resp
                };
                if head_request {
                    without_content(&mut resp);
                }
                // hyper's HTTP/2 server writes the map: an endpoint's fields go into it.
                if let Some(fields) = resp.body_mut().take_endpoint_fields() {
                    fields.append_to(resp.headers_mut());
                }
                let (head, mut body) = resp.into_parts();
                // What of the body is in hand goes with the head (see `send`).
                let ready =
                    std::future::poll_fn(|cx| Poll::Ready(hyper::body::Body::poll_frame(Pin::new(&mut body), cx)))
                        .await;
                // The request stays in flight until its response body is done; an HTTP/2
                // stream's window can stay shut while the connection is busy.
                let body = Guarded {
                    body: send::ClientBody::with_send_timeout(body, ready, send_timeout),
                    _guard: guard,
                };
                Ok::<_, std::convert::Infallible>(http::Response::from_parts(head, body))
            })
        });
        let conn = self.builder.http2.serve_connection(io, service);
        if let Err(e) = Box::pin(graceful(conn, drain)).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// An HTTP/2 request's head as HTTP/1.1 would write it, so `server.max_headers` and
/// `server.max_header_bytes` hold over both versions alike (hyper enforces only HTTP/2's own
/// list size, which counts 28 bytes more a field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Http1Head {
    /// Field lines: `:authority` stands for the Host line when there is none, and cookie
    /// crumbs (RFC 9113 §8.2.3) are the one `cookie` line they would be joined into.
    fields: usize,
    /// Bytes: the request line, each field line as `name: value` and CRLF (a joined crumb
    /// costs "; " instead), and the blank line.
    bytes: usize,
}

impl Http1Head {
    fn of<B>(req: &http::Request<B>) -> Http1Head {
        let headers = req.headers();
        let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
        // "GET /path HTTP/1.1\r\n" and the final "\r\n".
        let mut bytes = req.method().as_str().len() + 1 + target + 11 + 2;
        for (name, value) in headers {
            bytes += name.as_str().len() + value.len() + 4;
        }
        let mut fields = headers.len();
        let joined = headers.get_all(header::COOKIE).iter().count().saturating_sub(1);
        fields -= joined;
        bytes -= joined * ("cookie".len() + 4 - 2);
        if let Some(authority) = req.uri().authority() {
            if !headers.contains_key(header::HOST) {
                fields += 1;
                bytes += "host".len() + authority.as_str().len() + 4;
            }
        }
        Http1Head { fields, bytes }
    }
}

/// A HEAD answer carries no content (RFC 9110 §9.3.2), and hyper's HTTP/2 server sends
/// whatever body it is given. Meridian's own answers lose their body and state no length,
/// as HTTP/1.1 writes them; an endpoint's answer to HEAD has no body (its length stands).
fn without_content(resp: &mut http::Response<ResponseBody>) {
    if let ResponseBody::Local(body) = resp.body_mut() {
        *body = None;
    }
}

/// A response body that keeps its request counted as in flight until it is finished, so
/// a long stream is never mistaken for an idle connection.
pub(crate) struct Guarded<B> {
    body: B,
    _guard: ActiveRequest,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;
    use bytes::Bytes;
    use http::HeaderValue;

    /// Has `:authority`, the fields (name, how many), too many with `max_headers = 4`.
    type Case = (bool, &'static [(&'static str, usize)], bool);

    fn h2_request(authority: bool, fields: &[(&str, usize)]) -> Result<http::Request<()>, http::Error> {
        let uri = if authority {
            "http://api.example/v1/models"
        } else {
            "/v1/models"
        };
        let mut req = http::Request::builder().uri(uri);
        for (name, count) in fields {
            for i in 0..*count {
                req = req.header(*name, format!("v{i}"));
            }
        }
        req.body(())
    }

    #[test]
    fn http2_fields_are_counted_as_http1_would_count_them() -> TestResult {
        let cases: &[Case] = &[
            (true, &[("x-a", 3)], false),
            // :authority is the Host line HTTP/1.1 would count.
            (true, &[("x-a", 4)], true),
            (false, &[("x-a", 4)], false),
            (true, &[("host", 1), ("x-a", 3)], false),
            (true, &[("x-a", 5)], true),
            (false, &[("x-a", 5)], true),
            // Cookie crumbs are one line.
            (true, &[("cookie", 6), ("x-a", 2)], false),
            (true, &[("cookie", 6), ("x-a", 3)], true),
        ];
        for (authority, fields, want) in cases {
            let req = h2_request(*authority, fields)?;
            assert_eq!(Http1Head::of(&req).fields > 4, *want, "{authority} {fields:?}");
        }
        Ok(())
    }

    /// The head HTTP/1.1 would carry for `req`, written out.
    fn as_http1(req: &http::Request<()>) -> String {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut head = format!("{} {target} HTTP/1.1\r\n", req.method());
        if let Some(a) = req
            .uri()
            .authority()
            .filter(|_| !req.headers().contains_key(header::HOST))
        {
            head += &format!("host: {a}\r\n");
        }
        let crumbs: Vec<_> = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .flat_map(|v| v.to_str())
            .collect();
        if !crumbs.is_empty() {
            head += &format!("cookie: {}\r\n", crumbs.join("; "));
        }
        for (name, value) in req.headers().iter().filter(|(n, _)| **n != header::COOKIE) {
            head += &format!("{name}: {}\r\n", value.to_str().unwrap_or_default());
        }
        head + "\r\n"
    }

    #[test]
    fn http2_heads_are_sized_as_http1_would_write_them() -> TestResult {
        let cases: &[(bool, &[(&str, usize)])] = &[
            (true, &[]),
            (false, &[("x-a", 3)]),
            (true, &[("x-a", 4)]),
            (true, &[("host", 1), ("x-a", 3)]),
            (true, &[("cookie", 6), ("x-a", 2)]),
            (false, &[("cookie", 1)]),
        ];
        for (authority, fields) in cases {
            let req = h2_request(*authority, fields)?;
            let size = as_http1(&req).len();
            assert_eq!(Http1Head::of(&req).bytes, size, "{authority} {fields:?}");
        }
        Ok(())
    }

    #[test]
    fn http2_admits_every_head_http1_admits() -> TestResult {
        // The most fields, the shortest: where HTTP/2's count outgrows HTTP/1.1's most.
        for (limit, max_headers) in [(8192, 100), (65536, 100), (16384, 1000)] {
            let mut req = h2_request(true, &[("a", max_headers - 2)])?;
            let fill = limit - as_http1(&req).len() - "b: \r\n".len();
            req.headers_mut().insert("b", HeaderValue::from_str(&"x".repeat(fill))?);
            assert_eq!(Http1Head::of(&req).bytes, limit);
            // RFC 7541 §4.1: each field, pseudo-header fields included, counts 32 more.
            let uri = req.uri();
            let pseudo = [
                (":method", req.method().as_str().len()),
                (":scheme", uri.scheme_str().map_or(0, str::len)),
                (":authority", uri.authority().map_or(0, |a| a.as_str().len())),
                (":path", uri.path_and_query().map_or(1, |p| p.as_str().len())),
            ];
            let list: usize = pseudo.iter().map(|(n, v)| n.len() + v + 32).sum::<usize>()
                + req
                    .headers()
                    .iter()
                    .map(|(n, v)| n.as_str().len() + v.len() + 32)
                    .sum::<usize>();
            let cap = header_list_cap(limit, max_headers) as usize;
            assert!(
                list <= cap,
                "{limit} / {max_headers}: a {list}-byte list over the {cap} advertised"
            );
        }
        Ok(())
    }

    #[test]
    fn head_answers_lose_their_own_content() {
        let mut own: http::Response<ResponseBody> = ProxyError::BadRequest("x").response(Duration::ZERO);
        without_content(&mut own);
        assert!(hyper::body::Body::is_end_stream(own.body()));
        // hyper's HTTP/2 server writes a length only for a body it is to send.
        assert!(own.headers().get(header::CONTENT_LENGTH).is_none());
        let mut stated = http::Response::new(ResponseBody::Local(Some(Bytes::from_static(b"abc"))));
        stated
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        without_content(&mut stated);
        assert!(hyper::body::Body::is_end_stream(stated.body()));
        assert_eq!(stated.headers()[header::CONTENT_LENGTH], "3");
    }
}
