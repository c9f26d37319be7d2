//! Client-facing listeners: accept loop, connection limits, idle and header timeouts,
//! HTTP/1.1 + h2c on one port, graceful shutdown.

mod idle;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::ServerConfig;
use crate::proxy::{ConnInfo, Proxy};
pub use idle::IdleIo;

/// Limits applied to every client connection.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_max_concurrent_streams: u32,
    pub shutdown_timeout: Duration,
}

impl Limits {
    pub fn from_config(s: &ServerConfig) -> Limits {
        Limits {
            max_connections: s.max_connections,
            max_header_bytes: s.max_header_bytes,
            max_headers: s.max_headers,
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
            http2_max_concurrent_streams: s.http2_max_concurrent_streams,
            shutdown_timeout: s.shutdown_timeout,
        }
    }
}

pub fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
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
pub async fn serve(listener: TcpListener, proxy: Proxy, limits: Limits, mut shutdown: watch::Receiver<bool>) {
    let builder = Arc::new(builder(&limits));
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
        let info = ConnInfo { peer, tls: false };
        let gauge = proxy.shared.metrics.open_connections.clone();
        let proxy = proxy.clone();
        let (io, activity) = IdleIo::new(stream, limits.idle_timeout);
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let guard = activity.begin();
            async move {
                let resp = proxy.handle(info, req).await;
                drop(guard);
                resp
            }
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            gauge.inc();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
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
