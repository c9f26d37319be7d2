//! Client-facing listeners: accept loop, connection limits, idle and header timeouts,
//! PROXY protocol, TLS, HTTP/1.1 + HTTP/2 (h2c or ALPN) on one port, graceful shutdown.

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
mod send;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;
use crate::proxy::{ConnInfo, Proxy};
pub use idle::{ActiveRequest, Activity, IdleIo, Timeouts};
use proxy_protocol::ProxyHeaderError;

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

pub(crate) fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timer also runs between keep-alive requests (so idle connections
    // were cut at header_read_timeout); IdleIo keeps both clocks instead.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(100);
    b
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
    let graceful = GracefulShutdown::new();
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
            watcher: graceful.watcher(),
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
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
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
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
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
        let deadline = self.limits.header_read_timeout;
        if self.limits.proxy_protocol {
            let (source, stream) = proxy_protocol::read_header(stream, deadline).await?;
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
                self.serve(stream, ConnInfo { peer, tls: false }).await;
                Ok(())
            }
            Some(acceptor) => {
                let stream = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(HandshakeError::Tls(e)),
                    Err(_) => return Err(HandshakeError::TlsTimeout(deadline)),
                };
                self.serve(stream, ConnInfo { peer, tls: true }).await;
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
        let (io, activity) = IdleIo::new(io, timeouts);
        let send_timeout = timeouts.send;
        let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let proxy = proxy.clone();
            let activity = activity.clone();
            let guard = activity.begin();
            // An HTTP/2 stream's window can stay shut while the connection is busy.
            let per_stream = req.version() == http::Version::HTTP_2;
            async move {
                let resp = proxy.handle(info, req).await;
                if resp
                    .as_ref()
                    .is_ok_and(|r| r.status() == http::StatusCode::SWITCHING_PROTOCOLS)
                {
                    activity.upgraded();
                }
                // The request stays in flight until its response body is done.
                resp.map(|r| {
                    r.map(|body| Guarded {
                        body: if per_stream {
                            send::ClientBody::with_send_timeout(body, send_timeout)
                        } else {
                            send::ClientBody::Direct(body)
                        },
                        _guard: guard,
                    })
                })
            }
        });
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        if let Err(e) = self.watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
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
