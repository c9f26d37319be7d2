//! Meridian's own HTTP/1.1 connection pool.
//!
//! Connections are plain sockets (TCP, or TLS over TCP) kept per endpoint, newest first
//! (LIFO: the warm connection is reused and the cold ones expire), at most `keepalive` idle
//! per endpoint, as NGINX's upstream `keepalive` does; one idle longer than `idle_timeout`
//! is closed by a sweep. A request whose body is known whole (none, or kept for replay) is
//! exchanged by Meridian's own HTTP/1.1 code (`h1`), and its connection comes back when the
//! response body ends. Anything else (a streamed body, trailers, an upgrade) gets the
//! connection handed to hyper's client for that one exchange.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::body::{EndpointBody, RequestBody};
use super::client::{UpstreamError, UpstreamErrorKind};
use super::h1::{self, OwnRequest};
use super::limit::ConnectionCaps;
use crate::clock;

/// Which endpoint a connection belongs to.
#[derive(Debug, Clone)]
struct PoolKey {
    tls: bool,
    authority: Authority,
}

// By the authority's text as written: `Authority`'s own hash lowercases byte by byte, which
// cost ~1,100 instructions a request (callgrind). An endpoint's URL is one string per
// config, so a host spelt in two cases at most gets two idle stacks.
impl PartialEq for PoolKey {
    fn eq(&self, other: &PoolKey) -> bool {
        self.tls == other.tls && self.authority.as_str() == other.authority.as_str()
    }
}

impl Eq for PoolKey {}

impl std::hash::Hash for PoolKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.tls.hash(state);
        self.authority.as_str().hash(state);
    }
}

impl PoolKey {
    /// The key of `scheme://authority`; `None` unless the scheme is http or https.
    fn new(scheme: &Scheme, authority: &Authority) -> Option<PoolKey> {
        let tls = if *scheme == Scheme::HTTPS {
            true
        } else if *scheme == Scheme::HTTP {
            false
        } else {
            return None;
        };
        Some(PoolKey {
            tls,
            authority: authority.clone(),
        })
    }

    fn of(uri: &Uri) -> Result<PoolKey, UpstreamError> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(UpstreamError::new(
                UpstreamErrorKind::Protocol,
                "request URI has no scheme or authority",
            ));
        };
        PoolKey::new(scheme, authority)
            .ok_or_else(|| UpstreamError::new(UpstreamErrorKind::Protocol, "request URI is not http(s)"))
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    fn port(&self) -> u16 {
        self.authority.port_u16().unwrap_or(if self.tls { 443 } else { 80 })
    }

    /// The host without IPv6 brackets, as name resolution and SNI want it.
    fn host(&self) -> &str {
        let host = self.authority.host();
        host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
    }
}

/// An open connection to an endpoint, with the bytes read from it and not yet used.
pub(crate) struct Conn {
    endpoint: Arc<Endpoint>,
    pub(crate) io: EndpointIo,
    pub(crate) read_buf: BytesMut,
    /// Bytes to ask of the next read (`h1::poll_fill` grows it for large bodies).
    pub(crate) read_size: usize,
    /// The response-head timer, kept armed across this connection's requests.
    pub(crate) head_deadline: h1::HeadDeadline,
    /// The endpoint's connection cap counts this connection until it closes.
    _permit: Option<OwnedSemaphorePermit>,
}

/// The socket under a connection: TCP, or TLS over TCP.
pub(crate) enum EndpointIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// An endpoint's idle stack, resolved once per config (see [`Http1Pool::endpoint_of`]).
#[derive(Clone)]
pub(crate) struct PooledEndpoint(Arc<Endpoint>);

/// One endpoint's idle connections, newest last.
struct Endpoint {
    key: PoolKey,
    idle: Mutex<Vec<Idle>>,
    pool: Weak<Inner>,
}

/// A connection resting in its endpoint's stack.
struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// How the pool connects and how long it keeps what it does not use.
#[derive(Clone)]
pub(crate) struct Http1Settings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub keepalive: usize,
    /// ALPN `http/1.1`; SNI is the endpoint's host name (none for an IP, as RFC 6066 says).
    pub tls: Arc<rustls::ClientConfig>,
    pub caps: Option<Arc<ConnectionCaps>>,
}

/// HTTP/1.1 connections to endpoints, idle ones kept per endpoint. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Http1Pool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Http1Settings,
    endpoints: Mutex<HashMap<PoolKey, Arc<Endpoint>>>,
    /// The sweep is started by the first check-in (a runtime is certain to be there).
    sweeping: std::sync::Once,
}

/// Whether a connection coming back is kept idle, given how many its endpoint keeps now.
fn keep_idle(idle_now: usize, keepalive: usize) -> bool {
    idle_now < keepalive
}

/// Whether an idle connection has rested too long to be used again.
fn expired(since: Instant, now: Instant, idle_timeout: Duration) -> bool {
    now.saturating_duration_since(since) >= idle_timeout
}

/// How often idle connections are looked over: often enough that none outlives its idle
/// timeout by more than half of it, never in a busy loop.
fn sweep_every(idle_timeout: Duration) -> Duration {
    (idle_timeout / 2).max(Duration::from_millis(100))
}

impl Http1Pool {
    pub(crate) fn new(settings: Http1Settings) -> Http1Pool {
        Http1Pool {
            inner: Arc::new(Inner {
                settings,
                endpoints: Mutex::new(HashMap::new()),
                sweeping: std::sync::Once::new(),
            }),
        }
    }

    /// The idle stack of the endpoint at `scheme://authority`, for a caller to keep (a config's
    /// endpoint resolves it once, not per request).
    pub(crate) fn endpoint_of(&self, scheme: &Scheme, authority: &Authority) -> Option<PooledEndpoint> {
        PoolKey::new(scheme, authority).map(|key| PooledEndpoint(self.endpoint(key)))
    }

    /// Sends `req` (absolute URI) on an idle connection to its endpoint, or a new one; `via`:
    /// the endpoint's idle stack when the caller resolved it (else it is looked up).
    pub(crate) async fn send(
        &self,
        req: Request<RequestBody>,
        via: Option<&PooledEndpoint>,
    ) -> Result<Response<EndpointBody>, UpstreamError> {
        let looked_up;
        let endpoint = match via {
            // Only this pool's stacks: one resolved from a pool a reload replaced is not used.
            Some(PooledEndpoint(e)) if std::ptr::eq(e.pool.as_ptr(), Arc::as_ptr(&self.inner)) => e,
            _ => {
                looked_up = self.endpoint(PoolKey::of(req.uri())?);
                &looked_up
            }
        };
        let whole = req
            .body()
            .whole()
            .filter(|_| !super::upgrade::is_upgrade(req.headers().into()));
        if let Some(body) = whole {
            let own = OwnRequest {
                method: req.method(),
                path: req.uri().path_and_query().map_or("/", PathAndQuery::as_str).into(),
                headers: req.headers().into(),
                extra: None,
                added: None,
                body,
            };
            // `send_via` keeps the head deadline around this call.
            return self.exchange(endpoint, own, None).await;
        }
        let conn = self.conn_to(endpoint, None).await?;
        Box::pin(send_by_hyper(conn, req)).await
    }

    /// Whether `via` is one of this pool's stacks (one resolved before a reload replaced the
    /// pool is not used: [`Http1Pool::send`] looks its endpoint up again).
    pub(crate) fn owns(&self, via: &PooledEndpoint) -> bool {
        std::ptr::eq(via.0.pool.as_ptr(), Arc::as_ptr(&self.inner))
    }

    /// Sends `req` with Meridian's own exchange on an idle connection of `via` (one of this
    /// pool's stacks: see [`Http1Pool::owns`]), or a new one; the response head is due by
    /// `deadline` (a `HeadTimeout` error after it).
    ///
    /// Not an `async fn`: a layer of its own would hold the request once more and copy the
    /// exchange's state into its own when it starts (as would [`Upstreams::send_own`]'s).
    ///
    /// [`Upstreams::send_own`]: super::client::Upstreams::send_own
    pub(crate) fn send_own<'a>(
        &'a self,
        via: &'a PooledEndpoint,
        req: OwnRequest<'a>,
        deadline: std::time::Instant,
    ) -> impl Future<Output = Result<Response<EndpointBody>, UpstreamError>> + Send + 'a {
        self.exchange(&via.0, req, Some(deadline))
    }

    /// Not an `async fn` either: that would keep `req` twice (see `send_own`).
    #[allow(clippy::manual_async_fn)] // why: the state size, above
    fn exchange(
        &self,
        endpoint: &Arc<Endpoint>,
        req: OwnRequest<'_>,
        deadline: Option<std::time::Instant>,
    ) -> impl Future<Output = Result<Response<EndpointBody>, UpstreamError>> + Send {
        async move {
            let conn = self.conn_to(endpoint, deadline).await?;
            let resp = h1::exchange(conn, req, endpoint.key.authority.as_str(), deadline).await?;
            Ok(resp.map(EndpointBody::Own))
        }
    }

    /// An idle connection to `endpoint`, or a new one, opened by `deadline` if one is given
    /// (the request's head deadline counts the connect too). The connect is boxed: inline,
    /// its state would size every request's future (each layer above copies that size when
    /// it starts this one), for a path a kept-alive connection rarely takes; a checkout
    /// needs no timer at all.
    async fn conn_to(
        &self,
        endpoint: &Arc<Endpoint>,
        deadline: Option<std::time::Instant>,
    ) -> Result<Box<Conn>, UpstreamError> {
        match (endpoint.checkout(self.inner.settings.idle_timeout), deadline) {
            (Some(conn), _) => Ok(conn),
            (None, None) => Box::pin(self.connect(endpoint)).await,
            (None, Some(due)) => Box::pin(tokio::time::timeout_at(due.into(), self.connect(endpoint)))
                .await
                .unwrap_or_else(|_| Err(UpstreamError::bare(UpstreamErrorKind::HeadTimeout))),
        }
    }

    /// The endpoint's idle stack, made on first use.
    fn endpoint(&self, key: PoolKey) -> Arc<Endpoint> {
        let mut endpoints = self.inner.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(endpoint) = endpoints.get(&key) {
            return endpoint.clone();
        }
        let endpoint = Arc::new(Endpoint {
            key: key.clone(),
            idle: Mutex::new(Vec::new()),
            pool: Arc::downgrade(&self.inner),
        });
        endpoints.insert(key, endpoint.clone());
        endpoint
    }

    async fn connect(&self, endpoint: &Arc<Endpoint>) -> Result<Box<Conn>, UpstreamError> {
        let settings = &self.inner.settings;
        let key = &endpoint.key;
        let permit = match &settings.caps {
            Some(caps) => Some(
                caps.permit(key.scheme(), key.authority.as_str())
                    .await
                    .map_err(|e| UpstreamError::new(UpstreamErrorKind::ConnectRefused, e))?,
            ),
            None => None,
        };
        let tcp = tokio::time::timeout(settings.connect_timeout, tcp_connect(key))
            .await
            .map_err(|_| UpstreamError::bare(UpstreamErrorKind::ConnectTimeout))?
            .map_err(|e| UpstreamError::new(UpstreamErrorKind::ConnectRefused, e))?;
        let io = if key.tls {
            let name = ServerName::try_from(key.host().to_string())
                .map_err(|e| UpstreamError::new(UpstreamErrorKind::Tls, e))?;
            let tls = tokio_rustls::TlsConnector::from(settings.tls.clone());
            let stream = tokio::time::timeout(settings.connect_timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| UpstreamError::bare(UpstreamErrorKind::ConnectTimeout))?
                .map_err(|e| UpstreamError::new(UpstreamErrorKind::Tls, e))?;
            EndpointIo::Tls(Box::new(stream))
        } else {
            EndpointIo::Plain(tcp)
        };
        tracing::debug!(endpoint = %key.authority, tls = key.tls, "endpoint connection opened");
        Ok(Box::new(Conn {
            endpoint: endpoint.clone(),
            io,
            read_buf: BytesMut::new(),
            read_size: h1::READ_SIZE,
            head_deadline: h1::HeadDeadline::default(),
            _permit: permit,
        }))
    }
}

/// Connects to the endpoint's addresses in turn, as resolved (an IP needs no lookup).
async fn tcp_connect(key: &PoolKey) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((key.host(), key.port())).await? {
        match connect_one(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the endpoint's host resolved to no address")))
}

async fn connect_one(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    // A dead peer behind an idle pooled connection is found within minutes, not hours.
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
    Ok(stream)
}

/// Hands `conn` to hyper's client for one exchange that Meridian's own code does not make (a
/// streamed body, trailers, an upgrade): hyper's task drives it (and any upgrade) to its
/// end, then the connection closes and frees its permit of the endpoint's cap.
/// A streamed body or an upgrade: sent by hyper's client connection on `conn`.
async fn send_by_hyper(
    conn: Box<Conn>,
    mut req: Request<RequestBody>,
) -> Result<Response<EndpointBody>, UpstreamError> {
    // HTTP/1.1 origin form for hyper: the endpoint gets the path; the authority is in `Host`.
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or(PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::from(path);
    let mut sender = handshake(conn).await?;
    let resp = sender.send_request(req).await.map_err(UpstreamError::request)?;
    Ok(resp.map(EndpointBody::Hyper))
}

async fn handshake(conn: Box<Conn>) -> Result<http1::SendRequest<RequestBody>, UpstreamError> {
    let Conn {
        io, _permit: permit, ..
    } = *conn;
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "endpoint connection ended with an error");
        }
        drop(permit);
    });
    Ok(sender)
}

impl Conn {
    /// Back to its endpoint's idle stack, unless the endpoint already keeps `keepalive` (or
    /// the pool is gone): then it closes.
    pub(crate) fn checkin(self: Box<Self>) {
        let Some(pool) = self.endpoint.pool.upgrade() else {
            return;
        };
        pool.sweeping.call_once(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(sweep(Arc::downgrade(&pool), sweep_every(pool.settings.idle_timeout)));
            }
        });
        let endpoint = self.endpoint.clone();
        let mut idle = endpoint.idle.lock().unwrap_or_else(|p| p.into_inner());
        if keep_idle(idle.len(), pool.settings.keepalive) {
            idle.push(Idle {
                conn: self,
                since: clock::coarse(),
            });
        }
    }
}

impl EndpointIo {
    /// True when a read would block: the endpoint neither closed the connection nor sent
    /// anything. Over TCP no syscall and no waker registration when the socket reported
    /// nothing since the last read (a poll registered one: ~140 instructions a checkout).
    pub(crate) fn reads_nothing(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            EndpointIo::Plain(s) => matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            EndpointIo::Tls(s) => {
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let mut read = ReadBuf::new(&mut probe);
                Pin::new(s.as_mut()).poll_read(&mut cx, &mut read).is_pending()
            }
        }
    }
}

impl AsyncRead for EndpointIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EndpointIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            EndpointIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for EndpointIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            EndpointIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            EndpointIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            EndpointIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            EndpointIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            EndpointIo::Plain(s) => s.is_write_vectored(),
            EndpointIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EndpointIo::Plain(s) => Pin::new(s).poll_flush(cx),
            EndpointIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            EndpointIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            EndpointIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Endpoint {
    /// The newest idle connection that is still open and fresh.
    fn checkout(&self, idle_timeout: Duration) -> Option<Box<Conn>> {
        let now = clock::coarse();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(mut entry) = idle.pop() {
            if !expired(entry.since, now, idle_timeout) && entry.conn.idle_and_open() {
                return Some(entry.conn);
            }
        }
        None
    }
}

impl Inner {
    /// Closes the idle connections that expired or that the endpoint closed.
    fn sweep(&self, now: Instant) {
        let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        for endpoint in endpoints.values() {
            let mut idle = endpoint.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain_mut(|e| !expired(e.since, now, self.settings.idle_timeout) && e.conn.idle_and_open());
        }
    }

    /// Whether any idle connection still reads as open (the check a checkout makes).
    #[cfg(test)]
    fn any_idle_open(&self) -> bool {
        let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints.values().any(|e| {
            let mut idle = e.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter_mut().any(|i| i.conn.idle_and_open())
        })
    }

    /// Idle connections kept now, over every endpoint.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints
            .values()
            .map(|e| e.idle.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

// An idle connection holds its endpoint (`Conn::endpoint`), which holds the idle stack: a
// cycle that only emptying the stacks breaks. A pool replaced by a reload closes its idle
// connections here; connections in use go when their response is done (no pool to return to).
impl Drop for Inner {
    fn drop(&mut self) {
        let endpoints = self.endpoints.get_mut().unwrap_or_else(|p| p.into_inner());
        for endpoint in endpoints.values() {
            endpoint.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }
}

/// Sweeps until the pool is gone (a reload built another).
async fn sweep(pool: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.sweep(clock::coarse());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn idle_connections_are_kept_up_to_keepalive() {
        for (idle_now, keepalive, kept) in [(0, 0, false), (0, 1, true), (1, 1, false), (3, 4, true), (4, 4, false)] {
            assert_eq!(
                keep_idle(idle_now, keepalive),
                kept,
                "{idle_now} idle, keepalive {keepalive}"
            );
        }
    }

    #[test]
    fn expiry_and_sweep_interval() {
        let t = Instant::now();
        let s = Duration::from_secs(1);
        assert!(!expired(t, t, s));
        assert!(!expired(t, t + Duration::from_millis(999), s));
        assert!(expired(t, t + s, s));
        // A clock read before `since` (another thread's) is not an expiry.
        assert!(!expired(t + s, t, s));
        assert_eq!(sweep_every(Duration::from_secs(60)), Duration::from_secs(30));
        assert_eq!(sweep_every(Duration::from_millis(50)), Duration::from_millis(100));
    }

    fn settings(keepalive: usize, idle_timeout: Duration) -> Result<Http1Settings, Box<dyn std::error::Error>> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        Ok(Http1Settings {
            connect_timeout: Duration::from_secs(5),
            idle_timeout,
            keepalive,
            tls: Arc::new(tls),
            caps: None,
        })
    }

    /// A keep-alive HTTP/1.1 endpoint on loopback that counts the connections it accepted
    /// and answers every request `200 ok`; `close_idle` closes a connection after each answer.
    async fn endpoint(close_after_answer: bool) -> std::io::Result<(SocketAddr, Arc<AtomicUsize>)> {
        let (addr, accepted, _) = endpoint_counting_closes(close_after_answer).await?;
        Ok((addr, accepted))
    }

    /// [`endpoint`], also counting the connections Meridian closed.
    async fn endpoint_counting_closes(
        close_after_answer: bool,
    ) -> std::io::Result<(SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, closes) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let closes = closes.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        let Ok(n) = conn.read(&mut buf).await else { return };
                        if n == 0 {
                            closes.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if conn.write_all(answer).await.is_err() {
                                return;
                            }
                            if close_after_answer {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Ok((addr, accepted, closed))
    }

    async fn get(pool: &Http1Pool, addr: SocketAddr) -> Result<String, Box<dyn std::error::Error>> {
        let mut req = Request::new(RequestBody::Empty);
        *req.uri_mut() = format!("http://{addr}/v1/models").parse()?;
        req.headers_mut().insert(http::header::HOST, addr.to_string().parse()?);
        let resp = pool.send(req, None).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(String::from_utf8(body.to_vec())?)
    }

    #[tokio::test]
    async fn a_finished_response_returns_its_connection_for_the_next_request() -> TestResult {
        let (addr, accepted) = endpoint(false).await?;
        let pool = Http1Pool::new(settings(4, Duration::from_secs(30))?);
        for _ in 0..5 {
            assert_eq!(get(&pool, addr).await?, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection served all five");
        assert_eq!(pool.inner.idle_count(), 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_dropped_pool_closes_its_idle_connections() -> TestResult {
        let (addr, _, closed) = endpoint_counting_closes(false).await?;
        let pool = Http1Pool::new(settings(4, Duration::from_secs(30))?);
        assert_eq!(get(&pool, addr).await?, "ok");
        assert_eq!(pool.inner.idle_count(), 1);
        drop(pool);
        let deadline = Instant::now() + Duration::from_secs(10);
        while closed.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the idle connection outlived its pool");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_resolved_endpoint_is_used_only_by_its_own_pool() -> TestResult {
        let (addr, accepted) = endpoint(false).await?;
        let authority: Authority = addr.to_string().parse()?;
        let (ours, other) = (
            Http1Pool::new(settings(4, Duration::from_secs(30))?),
            Http1Pool::new(settings(4, Duration::from_secs(30))?),
        );
        let resolved = ours.endpoint_of(&Scheme::HTTP, &authority).ok_or("http is pooled")?;
        assert!(ours.endpoint_of(&"ftp".parse()?, &authority).is_none());
        for pool in [&ours, &ours, &other] {
            let mut req = Request::new(RequestBody::Empty);
            *req.uri_mut() = format!("http://{addr}/").parse()?;
            pool.send(req, Some(&resolved)).await?.into_body().collect().await?;
        }
        // Ours reused its one connection; the other pool ignored a stack not its own.
        assert_eq!((ours.inner.idle_count(), other.inner.idle_count()), (1, 1));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        Ok(())
    }

    /// An endpoint that answers every request with `answer` as soon as its head is in,
    /// reading none of its body, as servers with an upload limit do. With `hold`, each
    /// connection is then kept open, unread, on the returned channel (a handler that does not
    /// consume refused uploads); without, it is closed (unread bytes make that a reset).
    async fn answering_at_the_head(
        answer: &'static [u8],
        hold: bool,
    ) -> std::io::Result<(SocketAddr, tokio::sync::mpsc::UnboundedReceiver<TcpStream>)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (held_tx, held) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(answer).await;
                if hold {
                    let _ = held_tx.send(conn);
                }
            }
        });
        Ok((addr, held))
    }

    fn large_upload(addr: SocketAddr) -> Result<Request<RequestBody>, Box<dyn std::error::Error>> {
        let mut req = Request::new(RequestBody::bytes(bytes::Bytes::from(vec![b'x'; 8 << 20])));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = format!("http://{addr}/v1/files").parse()?;
        Ok(req)
    }

    /// The endpoint answers 413 and closes.
    #[tokio::test]
    async fn an_answer_before_the_body_is_all_sent_is_the_response() -> TestResult {
        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let (addr, _) = answering_at_the_head(answer, false).await?;
        let pool = Http1Pool::new(settings(4, Duration::from_secs(30))?);
        let resp = pool.send(large_upload(addr)?, None).await?;
        assert_eq!(resp.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            pool.inner.idle_count(),
            0,
            "a connection that broke mid-request is not kept"
        );
        Ok(())
    }

    /// The endpoint answers 413 and then neither reads the body nor closes: the answer is the
    /// response at once, not after the request's timeout.
    #[tokio::test]
    async fn an_answer_from_an_endpoint_that_stops_reading_is_the_response() -> TestResult {
        let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 7\r\n\r\ntoo big";
        let (addr, mut held) = answering_at_the_head(answer, true).await?;
        let pool = Http1Pool::new(settings(4, Duration::from_secs(30))?);
        // No head deadline here: without the read during the write this never ends.
        let resp = tokio::time::timeout(Duration::from_secs(30), pool.send(large_upload(addr)?, None))
            .await
            .map_err(|_| "the answer was not read while the body was going out")??;
        assert_eq!(resp.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
        let body = resp.into_body().collect().await?.to_bytes();
        assert_eq!(&body[..], b"too big");
        assert_eq!(
            pool.inner.idle_count(),
            0,
            "a half-sent request's connection is not kept"
        );
        assert!(held.recv().await.is_some(), "the endpoint still holds its end");
        Ok(())
    }

    #[tokio::test]
    async fn keepalive_zero_keeps_nothing_idle() -> TestResult {
        let (addr, accepted) = endpoint(false).await?;
        let pool = Http1Pool::new(settings(0, Duration::from_secs(30))?);
        for _ in 0..3 {
            assert_eq!(get(&pool, addr).await?, "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.inner.idle_count(), 0);
        Ok(())
    }

    #[tokio::test]
    async fn a_connection_the_endpoint_closed_is_not_reused() -> TestResult {
        let (addr, accepted) = endpoint(true).await?;
        let pool = Http1Pool::new(settings(4, Duration::from_secs(30))?);
        for _ in 0..3 {
            assert_eq!(get(&pool, addr).await?, "ok");
            // Once the reactor has seen the close, the next checkout must pass the connection by.
            let deadline = Instant::now() + Duration::from_secs(10);
            while pool.inner.any_idle_open() {
                assert!(Instant::now() < deadline, "the close was never seen");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        Ok(())
    }

    #[tokio::test]
    async fn idle_connections_expire_and_are_swept() -> TestResult {
        let (addr, accepted) = endpoint(false).await?;
        let pool = Http1Pool::new(settings(4, Duration::from_millis(150))?);
        assert_eq!(get(&pool, addr).await?, "ok");
        assert_eq!(pool.inner.idle_count(), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pool.inner.idle_count() > 0 {
            assert!(Instant::now() < deadline, "the idle connection was never swept");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(get(&pool, addr).await?, "ok");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "an expired connection is not reused"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_response_dropped_unread_never_returns_a_busy_connection() -> TestResult {
        let (addr, accepted) = endpoint(false).await?;
        let pool = Http1Pool::new(settings(4, Duration::from_secs(30))?);
        let mut req = Request::new(RequestBody::Empty);
        *req.uri_mut() = format!("http://{addr}/").parse()?;
        drop(pool.send(req, None).await?);
        // Whatever became of that connection, the next request is answered.
        assert_eq!(get(&pool, addr).await?, "ok");
        assert!(accepted.load(Ordering::SeqCst) <= 2);
        Ok(())
    }
}
