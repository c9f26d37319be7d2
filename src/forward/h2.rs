//! HTTP/2 to endpoints: one multiplexed connection per endpoint, opened on first use and
//! again once it closes. A request's `Host` becomes its `:authority` (RFC 9113 §8.3.1: the
//! two must not disagree, and strict servers reset the connection when they do), so the
//! connection is keyed by the endpoint, not by the request's URI as hyper-util's pool keys it:
//! a client choosing its Host must not choose how many connections an endpoint gets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper::client::conn::http2::{Builder, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower_service::Service;

use super::body::RequestBody;
use super::client::{Source, UpstreamError, UpstreamErrorKind};
use super::limit::CappedConnector;

pub(crate) type Connector = HttpsConnector<CappedConnector<HttpConnector>>;

/// The HTTP/2 connections of every endpoint one config speaks HTTP/2 to.
pub(crate) struct Http2Pool {
    connector: Connector,
    /// An endpoint's connection unused this long is let go (`server.idle_timeout`).
    idle_timeout: Duration,
    endpoints: Mutex<HashMap<(Scheme, Authority), Arc<Endpoint>>>,
}

/// One endpoint's connection, if open.
struct Endpoint {
    /// Held while connecting: requests arriving meanwhile share the new connection.
    conn: tokio::sync::Mutex<Option<(u64, SendRequest<RequestBody>)>>,
    /// A request took the connection since the idle check last looked.
    used: AtomicBool,
    generation: AtomicU64,
}

/// Why no connection could be opened; its cause chain tells the kind (`connect_kind`).
#[derive(Debug, thiserror::Error)]
#[error("connecting to the endpoint over HTTP/2")]
struct ConnectError(#[source] Source);

impl Http2Pool {
    pub(crate) fn new(connector: Connector, idle_timeout: Duration) -> Http2Pool {
        Http2Pool {
            connector,
            idle_timeout,
            endpoints: Mutex::default(),
        }
    }

    /// Sends `req` (its URI the endpoint's) with its `Host` as `:authority`.
    pub(crate) async fn request(&self, mut req: Request<RequestBody>) -> Result<Response<Incoming>, UpstreamError> {
        let (Some(scheme), Some(authority)) = (req.uri().scheme().cloned(), req.uri().authority().cloned()) else {
            return Err(UpstreamError::new(
                UpstreamErrorKind::Protocol,
                "request URI has no scheme or authority",
            ));
        };
        let endpoint = self.endpoint(&scheme, &authority);
        let host = req.headers_mut().remove(header::HOST);
        let uri = std::mem::take(req.uri_mut());
        *req.uri_mut() = with_authority(uri, host.as_ref());
        let mut sender = endpoint.sender(self, &scheme, &authority).await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // The connection was closing (GOAWAY) and the request never left: once more
                // on a new one, as hyper-util's pool retries.
                Some(req) => {
                    endpoint.forget();
                    let mut sender = endpoint.sender(self, &scheme, &authority).await?;
                    sender.send_request(req).await.map_err(UpstreamError::request)
                }
                None => Err(UpstreamError::request(e.into_error())),
            },
        }
    }

    fn endpoint(&self, scheme: &Scheme, authority: &Authority) -> Arc<Endpoint> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((scheme.clone(), authority.clone()))
            .or_insert_with(|| {
                Arc::new(Endpoint {
                    conn: tokio::sync::Mutex::new(None),
                    used: AtomicBool::new(false),
                    generation: AtomicU64::new(0),
                })
            })
            .clone()
    }
}

impl Endpoint {
    /// The open connection, or a new one.
    async fn sender(
        self: &Arc<Self>,
        pool: &Http2Pool,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<SendRequest<RequestBody>, UpstreamError> {
        let mut slot = self.conn.lock().await;
        self.used.store(true, Ordering::Release);
        if let Some((_, sender)) = slot.as_ref().filter(|(_, s)| !s.is_closed()) {
            return Ok(sender.clone());
        }
        *slot = None;
        let dst = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(PathAndQuery::from_static("/"))
            .build()
            .map_err(|e| UpstreamError::new(UpstreamErrorKind::Protocol, e))?;
        let mut connector = pool.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(connect_error)?;
        let io = connector.call(dst).await.map_err(connect_error)?;
        let (sender, conn) = Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| connect_error(e.into()))?;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(run(conn, Arc::downgrade(self), generation, pool.idle_timeout));
        *slot = Some((generation, sender.clone()));
        Ok(sender)
    }

    /// Drops the connection from the slot (it failed to take a request).
    fn forget(&self) {
        if let Ok(mut slot) = self.conn.try_lock() {
            if slot.as_ref().is_some_and(|(_, s)| !s.is_ready()) {
                *slot = None;
            }
        }
    }
}

/// Drives one connection; once no request took it for a whole idle timeout, the slot lets
/// it go, and it closes when its streams are done.
async fn run<C>(conn: C, endpoint: Weak<Endpoint>, generation: u64, idle: Duration)
where
    C: std::future::Future<Output = hyper::Result<()>>,
{
    let mut conn = std::pin::pin!(conn);
    // `interval` refuses a zero period.
    let mut ticks = tokio::time::interval(idle.max(Duration::from_millis(100)));
    ticks.tick().await;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "endpoint HTTP/2 connection ended with an error");
                }
                return;
            }
            _ = ticks.tick() => {
                let Some(endpoint) = endpoint.upgrade() else { break };
                if endpoint.used.swap(false, Ordering::AcqRel) {
                    continue;
                }
                // Someone is connecting: the slot is theirs to change.
                let Ok(mut slot) = endpoint.conn.try_lock() else { continue };
                if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
                    *slot = None;
                }
                break;
            }
        }
    }
    let _ = conn.await;
}

fn connect_error(e: Source) -> UpstreamError {
    let e = ConnectError(e);
    UpstreamError::new(super::client::connect_kind(&e), e)
}

/// The URI an HTTP/2 endpoint gets: `:authority` is the `Host` HTTP/1.1 would have carried
/// (the client's, or the fallback's or endpoint's where Meridian sets it); the endpoint's own
/// when there is none, or it is no valid authority (userinfo is not allowed in
/// `:authority`).
fn with_authority(uri: Uri, host: Option<&HeaderValue>) -> Uri {
    let Some(authority) = host
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .filter(|a| !a.as_str().contains('@'))
    else {
        return uri;
    };
    let kept = uri.clone();
    let mut parts = uri.into_parts();
    parts.authority = Some(authority);
    Uri::from_parts(parts).unwrap_or(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn host_becomes_the_authority() -> TestResult {
        let uri: Uri = "http://127.0.0.1:9000/v1/models?x=1".parse()?;
        let cases: &[(Option<&str>, &str)] = &[
            (Some("api.example"), "http://api.example/v1/models?x=1"),
            (Some("api.example:8443"), "http://api.example:8443/v1/models?x=1"),
            (Some("[2001:db8::1]:80"), "http://[2001:db8::1]:80/v1/models?x=1"),
            (None, "http://127.0.0.1:9000/v1/models?x=1"),
            (Some("user@api.example"), "http://127.0.0.1:9000/v1/models?x=1"),
            (Some("bad host"), "http://127.0.0.1:9000/v1/models?x=1"),
            (Some(""), "http://127.0.0.1:9000/v1/models?x=1"),
        ];
        for (host, want) in cases {
            let host = host.map(HeaderValue::from_str).transpose()?;
            assert_eq!(
                with_authority(uri.clone(), host.as_ref()).to_string(),
                *want,
                "{host:?}"
            );
        }
        Ok(())
    }
}
