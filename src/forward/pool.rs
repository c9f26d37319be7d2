//! Meridian's own HTTP/1.1 connection pool, on `hyper::client::conn::http1`.
//!
//! What hyper-util's legacy client did per request and this pool does not: a task spawned
//! for every response to wait for its connection to become idle again, a boxed response
//! future, and a pool key built and hashed twice. Here a connection goes back to its
//! endpoint's stack when the response body is done with it ([`Checkin`] dropped), and is
//! checked out newest first (LIFO: the warm connection, the cold ones expire), as NGINX's
//! upstream `keepalive` does. At most `keepalive` idle connections are kept per endpoint;
//! one idle longer than `idle_timeout` is closed by a sweep.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::body::RequestBody;
use super::client::{UpstreamError, UpstreamErrorKind};
use super::limit::ConnectionCaps;

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
    fn of(uri: &Uri) -> Result<PoolKey, UpstreamError> {
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UpstreamError::new(UpstreamErrorKind::Protocol, "request URI has no authority"))?;
        let tls = match uri.scheme() {
            Some(s) if *s == Scheme::HTTPS => true,
            Some(s) if *s == Scheme::HTTP => false,
            _ => {
                return Err(UpstreamError::new(
                    UpstreamErrorKind::Protocol,
                    "request URI is not http(s)",
                ));
            }
        };
        Ok(PoolKey { tls, authority })
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

/// An open connection: its request side and the endpoint it goes to.
struct Conn {
    endpoint: Arc<Endpoint>,
    sender: SendRequest<RequestBody>,
}

/// One endpoint's idle connections, newest last.
struct Endpoint {
    key: PoolKey,
    idle: Mutex<Vec<Idle>>,
    pool: Weak<Inner>,
}

/// A connection resting in its endpoint's stack.
struct Idle {
    conn: Conn,
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

    /// Sends `req` (absolute URI) on an idle connection to its endpoint, or a new one. A
    /// pooled connection that closed before the request went out (the endpoint's own idle
    /// timeout won the race) is replaced by a new one, once: nothing had been sent.
    pub(crate) async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Checkin), UpstreamError> {
        let key = PoolKey::of(req.uri())?;
        // HTTP/1.1 origin form: the endpoint gets the path; the authority is in `Host`.
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or(PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
        let endpoint = self.endpoint(key);
        let mut pooled = endpoint.checkout(self.inner.settings.idle_timeout);
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                None => self.connect(&endpoint).await?,
            };
            match conn.sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Checkin { conn: Some(conn) })),
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => req = back,
                    _ => return Err(UpstreamError::request(e.into_error())),
                },
            }
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

    async fn connect(&self, endpoint: &Arc<Endpoint>) -> Result<Conn, UpstreamError> {
        let settings = &self.inner.settings;
        let key = &endpoint.key;
        let permit = match &settings.caps {
            Some(caps) => Some(
                caps.permit(key.tls, &key.authority)
                    .await
                    .map_err(|e| UpstreamError::new(UpstreamErrorKind::ConnectRefused, e))?,
            ),
            None => None,
        };
        let tcp = tokio::time::timeout(settings.connect_timeout, tcp_connect(key))
            .await
            .map_err(|_| UpstreamError::bare(UpstreamErrorKind::ConnectTimeout))?
            .map_err(|e| UpstreamError::new(UpstreamErrorKind::ConnectRefused, e))?;
        let sender = if key.tls {
            let name = ServerName::try_from(key.host().to_string())
                .map_err(|e| UpstreamError::new(UpstreamErrorKind::Tls, e))?;
            let tls = tokio_rustls::TlsConnector::from(settings.tls.clone());
            let stream = tokio::time::timeout(settings.connect_timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| UpstreamError::bare(UpstreamErrorKind::ConnectTimeout))?
                .map_err(|e| UpstreamError::new(UpstreamErrorKind::Tls, e))?;
            handshake(stream, permit).await?
        } else {
            handshake(tcp, permit).await?
        };
        tracing::debug!(endpoint = %key.authority, tls = key.tls, "endpoint connection opened");
        Ok(Conn {
            endpoint: endpoint.clone(),
            sender,
        })
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

/// The HTTP/1.1 handshake; the connection's task drives it (and any upgrade) to its end and
/// then frees its permit of the endpoint's connection cap.
async fn handshake<T>(io: T, permit: Option<OwnedSemaphorePermit>) -> Result<SendRequest<RequestBody>, UpstreamError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "endpoint connection ended with an error");
        }
        drop(permit);
    });
    Ok(sender)
}

/// Brings a connection back to its endpoint's idle stack when dropped: hold it for as long
/// as the response body is read.
pub(crate) struct Checkin {
    conn: Option<Conn>,
}

impl Checkin {
    /// For a response that came without a pooled HTTP/1 connection (HTTP/2 multiplexes).
    pub(crate) fn none() -> Checkin {
        Checkin { conn: None }
    }
}

impl Drop for Checkin {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if conn.sender.is_closed() {
            return;
        }
        if conn.sender.is_ready() {
            Endpoint::put(conn);
            return;
        }
        // The connection is still finishing the response (its last bytes, or a body dropped
        // unread, after which hyper closes it): back once it is ready, if it ever is.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if std::future::poll_fn(|cx| conn.sender.poll_ready(cx)).await.is_ok() {
                    Endpoint::put(conn);
                }
            });
        }
    }
}

impl Endpoint {
    /// The newest idle connection that is still open and fresh.
    fn checkout(&self, idle_timeout: Duration) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(entry) = idle.pop() {
            if entry.conn.sender.is_ready() && !expired(entry.since, now, idle_timeout) {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Keeps `conn` idle, unless its endpoint already keeps `keepalive` (or the pool is gone).
    fn put(conn: Conn) {
        let Some(pool) = conn.endpoint.pool.upgrade() else {
            return;
        };
        pool.sweeping.call_once(|| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(sweep(Arc::downgrade(&pool), sweep_every(pool.settings.idle_timeout)));
            }
        });
        let endpoint = conn.endpoint.clone();
        let mut idle = endpoint.idle.lock().unwrap_or_else(|p| p.into_inner());
        if keep_idle(idle.len(), pool.settings.keepalive) {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        // Not kept: dropping its sender lets hyper close the connection.
    }
}

impl Inner {
    /// Closes the idle connections that expired or that the endpoint closed.
    fn sweep(&self, now: Instant) {
        let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        for endpoint in endpoints.values() {
            let mut idle = endpoint.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|e| !e.conn.sender.is_closed() && !expired(e.since, now, self.settings.idle_timeout));
        }
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
        pool.sweep(Instant::now());
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
        let (resp, checkin) = pool.send(req).await?;
        let body = resp.into_body().collect().await?.to_bytes();
        drop(checkin);
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
            // Let the connection's task see the close before the next checkout.
            tokio::time::sleep(Duration::from_millis(20)).await;
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
        let (resp, checkin) = pool.send(req).await?;
        drop(checkin);
        drop(resp);
        // Whatever became of that connection, the next request is answered.
        assert_eq!(get(&pool, addr).await?, "ok");
        assert!(accepted.load(Ordering::SeqCst) <= 2);
        Ok(())
    }
}
