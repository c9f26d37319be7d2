//! Pooled connections to endpoints (HTTP/1.1, HTTP/2, TLS) and one attempt's outcome.

use std::error::Error as _;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::body::{EndpointBody, RequestBody};
use super::h1::OwnRequest;
use super::h2::Http2Pool;
use super::limit::{CappedConnector, ConnectionCaps, EndpointLimit};
use super::pool::{Http1Pool, Http1Settings, PooledEndpoint};
use crate::config::{EndpointLimitConfig, UpstreamProtocol, UpstreamTlsConfig};
use crate::route::attempt::RetryClass;

/// The cause kept under an [`UpstreamError`]: the original error object, for the log.
pub(crate) type Source = Box<dyn std::error::Error + Send + Sync>;

/// Why an attempt got no response head.
#[derive(Debug, thiserror::Error)]
#[error("{kind}")]
pub struct UpstreamError {
    kind: UpstreamErrorKind,
    #[source]
    source: Option<Source>,
}

/// What went wrong, by where the attempt stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The connection was refused or the endpoint unreachable: nothing was sent.
    ConnectRefused,
    /// No connection within `connect_timeout`: nothing was sent.
    ConnectTimeout,
    /// The TLS handshake failed: nothing was sent.
    Tls,
    /// The connection broke after the request went out, before a response head.
    ResetBeforeHead,
    /// No response head within `request_timeout`.
    HeadTimeout,
    /// The endpoint answered something that is not HTTP, or the request could not be framed.
    Protocol,
    /// The fallback's circuit breaker refused the attempt: nothing was sent.
    BreakerOpen,
    /// The plan named the fallback but none is configured: nothing was sent.
    NoFallback,
    /// The client's own body failed (too large, or the client went away).
    ClientBody,
    /// The client stopped sending its body for `server.body_timeout`: answered 408 and
    /// never counted against the endpoint.
    ClientStalled,
}

impl UpstreamErrorKind {
    pub(crate) fn retry_class(self) -> RetryClass {
        match self {
            UpstreamErrorKind::ConnectRefused
            | UpstreamErrorKind::ConnectTimeout
            | UpstreamErrorKind::Tls
            | UpstreamErrorKind::BreakerOpen
            | UpstreamErrorKind::NoFallback => RetryClass::NothingSent,
            UpstreamErrorKind::ResetBeforeHead | UpstreamErrorKind::HeadTimeout | UpstreamErrorKind::Protocol => {
                RetryClass::MaybeSent
            }
            UpstreamErrorKind::ClientBody | UpstreamErrorKind::ClientStalled => RetryClass::Never,
        }
    }

    /// A stable short description, safe to show to clients (no OS error text).
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::ConnectRefused => "connection refused",
            UpstreamErrorKind::ConnectTimeout => "connect timeout",
            UpstreamErrorKind::Tls => "TLS handshake failed",
            UpstreamErrorKind::ResetBeforeHead => "connection closed before a response",
            UpstreamErrorKind::HeadTimeout => "no response within the request timeout",
            UpstreamErrorKind::Protocol => "invalid response from the endpoint",
            UpstreamErrorKind::BreakerOpen => "circuit breaker open",
            UpstreamErrorKind::NoFallback => "no fallback configured",
            UpstreamErrorKind::ClientBody => "the request body failed",
            UpstreamErrorKind::ClientStalled => "the request body stalled",
        }
    }
}

impl fmt::Display for UpstreamErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl UpstreamError {
    pub fn new(kind: UpstreamErrorKind, source: impl Into<Source>) -> UpstreamError {
        UpstreamError {
            kind,
            source: Some(source.into()),
        }
    }

    /// An error with no underlying cause (an open breaker, a missing fallback, a timeout).
    pub(crate) fn bare(kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError { kind, source: None }
    }

    pub fn kind(&self) -> UpstreamErrorKind {
        self.kind
    }

    pub(crate) fn retry_class(&self) -> RetryClass {
        self.kind.retry_class()
    }

    /// The whole chain, for the log only: it holds OS error text.
    pub fn detail(&self) -> String {
        error_chain(self)
    }

    /// A request on an open connection failed (the pool's own HTTP/1.1 connections, and
    /// HTTP/2's).
    pub(crate) fn request(e: hyper::Error) -> UpstreamError {
        let kind = request_kind(&e);
        UpstreamError::new(kind, e)
    }
}

/// A failure after the connection was open, by the first cause in the chain that tells.
fn request_kind(e: &(dyn std::error::Error + 'static)) -> UpstreamErrorKind {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_body_write_aborted() || h.is_user() {
                // The body's own error: see whether it is ours.
                if let Some(b) = h.source().and_then(|s| s.downcast_ref::<super::body::BodyError>()) {
                    return body_kind(b);
                }
            }
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return UpstreamErrorKind::ResetBeforeHead;
            }
            if h.is_parse() {
                return UpstreamErrorKind::Protocol;
            }
        }
        if let Some(b) = s.downcast_ref::<super::body::BodyError>() {
            return body_kind(b);
        }
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ) {
                return UpstreamErrorKind::ResetBeforeHead;
            }
        }
        source = s.source();
    }
    UpstreamErrorKind::Protocol
}

/// A connect failure by its cause: a timeout, a TLS failure, else refused/unreachable.
pub(super) fn connect_kind(e: &(dyn std::error::Error + 'static)) -> UpstreamErrorKind {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<rustls::Error>() {
            return UpstreamErrorKind::Tls;
        }
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return UpstreamErrorKind::ConnectTimeout;
            }
            if io.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
                return UpstreamErrorKind::Tls;
            }
        }
        source = s.source();
    }
    UpstreamErrorKind::ConnectRefused
}

/// The client's own body failed: a stall is told apart so it is answered 408.
fn body_kind(b: &super::body::BodyError) -> UpstreamErrorKind {
    match b {
        super::body::BodyError::ClientStalled(_) => UpstreamErrorKind::ClientStalled,
        _ => UpstreamErrorKind::ClientBody,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("TLS client setup: {0}")]
    Tls(rustls::Error),
    #[error("CA file {path} holds no usable certificate")]
    NoCertificate { path: String },
    #[error("cannot read client certificate or key {path}: {source}")]
    ClientCert {
        path: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("client certificate {path} holds no certificate")]
    NoClientCertificate { path: String },
}

/// Connection pools to endpoints, one per protocol. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Upstreams {
    /// Meridian's own pool: the proxied hot path.
    http1: Http1Pool,
    /// One multiplexed connection per endpoint, nothing to pool per request.
    http2: Arc<Http2Pool>,
    /// Request slots per endpoint, when `upstream.max_connections_per_endpoint` is set.
    limits: Option<Arc<EndpointLimits>>,
}

/// Pool knobs shared by every upstream client.
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint and protocol (`upstream.keepalive`).
    pub keepalive: usize,
    pub limit: Option<EndpointLimitConfig>,
}

/// One [`EndpointLimit`] per endpoint (scheme and authority), made on first use.
struct EndpointLimits {
    policy: EndpointLimitConfig,
    by_endpoint: std::sync::Mutex<std::collections::HashMap<String, Arc<EndpointLimit>>>,
}

impl Upstreams {
    pub(crate) fn new(settings: &PoolSettings, tls: &UpstreamTlsConfig) -> Result<Upstreams, ClientSetupError> {
        let tls = tls_config(tls.ca_file.as_deref(), tls.client_auth.as_ref())?;
        // One cap per endpoint across both protocols' pools.
        let caps = settings
            .limit
            .map(|l| Arc::new(ConnectionCaps::new(l.max_connections, settings.connect_timeout)));
        let mut http1_tls = (*tls).clone();
        http1_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Upstreams {
            http1: Http1Pool::new(Http1Settings {
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.idle_timeout,
                keepalive: settings.keepalive,
                tls: Arc::new(http1_tls),
                caps: caps.clone(),
            }),
            http2: Arc::new(Http2Pool::new(connector(settings, tls, caps), settings.idle_timeout)),
            limits: settings.limit.map(|policy| {
                Arc::new(EndpointLimits {
                    policy,
                    by_endpoint: Default::default(),
                })
            }),
        })
    }

    /// The request slots of the endpoint at `scheme://authority`, when endpoints are capped.
    /// Resolved once per endpoint when a config is built, not per request.
    pub(crate) fn endpoint_limit(
        &self,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
    ) -> Option<Arc<EndpointLimit>> {
        let limits = self.limits.as_ref()?;
        let key = format!("{scheme}://{authority}");
        let mut map = limits.by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
        Some(
            map.entry(key)
                .or_insert_with(|| Arc::new(EndpointLimit::new(limits.policy)))
                .clone(),
        )
    }

    /// Sends one attempt and waits for the response head up to `timeout`, counted from
    /// when the request body has been sent: a client's slow upload is not the endpoint's
    /// time.
    pub(crate) async fn send(
        &self,
        req: Request<RequestBody>,
        protocol: UpstreamProtocol,
        timeout: Duration,
    ) -> Result<Response<EndpointBody>, UpstreamError> {
        self.send_via(None, req, protocol, timeout).await
    }

    /// The idle HTTP/1.1 connections of the endpoint at `scheme://authority`, resolved when a
    /// config is built so that [`Upstreams::send_via`] needs no lookup per request.
    pub(crate) fn pooled_endpoint(
        &self,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
    ) -> Option<PooledEndpoint> {
        self.http1.endpoint_of(scheme, authority)
    }

    /// Whether [`Upstreams::send_own`] can send through `via` (it is this config's stack).
    pub(crate) fn owns(&self, via: &PooledEndpoint) -> bool {
        self.http1.owns(via)
    }

    /// The hot path: a whole request to an HTTP/1.1 endpoint through its resolved idle
    /// stack, with Meridian's own exchange, borrowed from the client's request; the response
    /// head is due by `deadline` (the send time plus the request timeout, as in
    /// [`Upstreams::send_via`]; the caller has read the clock already).
    pub(crate) fn send_own<'a>(
        &'a self,
        via: &'a PooledEndpoint,
        req: OwnRequest<'a>,
        deadline: std::time::Instant,
    ) -> impl Future<Output = Result<Response<EndpointBody>, UpstreamError>> + Send + 'a {
        // The pool's own exchange keeps the deadline on the connection's timer.
        self.http1.send_own(via, req, deadline)
    }

    /// [`Upstreams::send`] through an endpoint's resolved idle stack.
    pub(crate) async fn send_via(
        &self,
        via: Option<&PooledEndpoint>,
        req: Request<RequestBody>,
        protocol: UpstreamProtocol,
        timeout: Duration,
    ) -> Result<Response<EndpointBody>, UpstreamError> {
        let body_sent = req.body().sent_signal();
        let deadline = async {
            match body_sent {
                Some(sent) => sent.endpoint_deadline(timeout).await,
                None => tokio::time::sleep(timeout).await,
            }
        };
        let sent = async {
            match protocol {
                UpstreamProtocol::Http1 => self.http1.send(req, via).await,
                // Boxed: hyper-util's client future would size every HTTP/1.1 request's too.
                UpstreamProtocol::Http2 => {
                    let resp = Box::pin(self.http2.request(req)).await?;
                    Ok(resp.map(EndpointBody::Hyper))
                }
            }
        };
        tokio::select! {
            biased;
            resp = sent => resp,
            // The bound is in the config; no cause to keep.
            () = deadline => Err(UpstreamError::bare(UpstreamErrorKind::HeadTimeout)),
        }
    }
}

/// Endpoints are verified against the webpki roots plus `ca_file`; SNI is the endpoint's
/// host (hyper-rustls takes it from the URI; IP hosts get none, as RFC 6066 says).
fn tls_config(
    ca_file: Option<&Path>,
    client_auth: Option<&(PathBuf, PathBuf)>,
) -> Result<Arc<rustls::ClientConfig>, ClientSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|source| ClientSetupError::CaFile {
                path: shown.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .collect();
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(ClientSetupError::NoCertificate { path: shown });
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ClientSetupError::Tls)?
        .with_root_certificates(roots);
    let config = match client_auth {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let read_error = |path: &Path| {
                let path = path.display().to_string();
                move |source| ClientSetupError::ClientCert { path, source }
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(read_error(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read_error(cert))?;
            if chain.is_empty() {
                return Err(ClientSetupError::NoClientCertificate {
                    path: cert.display().to_string(),
                });
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(read_error(key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(ClientSetupError::Tls)?
        }
    };
    Ok(Arc::new(config))
}

/// The HTTP/2 connector: h2 by ALPN over TLS, prior knowledge over plain TCP.
fn connector(
    settings: &PoolSettings,
    tls: Arc<rustls::ClientConfig>,
    caps: Option<Arc<ConnectionCaps>>,
) -> super::h2::Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let http = CappedConnector::new(http, caps);
    // The builder sets ALPN h2 from the enabled version, so a TLS endpoint speaks HTTP/2.
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http2()
        .wrap_connector(http)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn every_kind_has_its_retry_class() {
        use RetryClass::{MaybeSent, Never, NothingSent};
        use UpstreamErrorKind as K;
        let cases = [
            (K::ConnectRefused, NothingSent),
            (K::ConnectTimeout, NothingSent),
            (K::Tls, NothingSent),
            (K::BreakerOpen, NothingSent),
            (K::NoFallback, NothingSent),
            (K::ResetBeforeHead, MaybeSent),
            (K::HeadTimeout, MaybeSent),
            (K::Protocol, MaybeSent),
            (K::ClientBody, Never),
        ];
        for (kind, class) in cases {
            assert_eq!(UpstreamError::bare(kind).retry_class(), class, "{kind:?}");
            assert!(!kind.as_str().is_empty());
        }
    }

    /// What a loopback endpoint does with the attempt.
    enum Endpoint {
        /// Nothing listens on the port.
        Closed,
        /// Reads the request, then closes without answering.
        CloseAfterRequest,
        /// Answers with bytes that are not HTTP.
        Garbage,
        /// Reads the request and never answers.
        Silent,
    }

    async fn attempt(endpoint: Endpoint) -> Result<UpstreamError, Box<dyn std::error::Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        match endpoint {
            Endpoint::Closed => drop(listener),
            other => {
                tokio::spawn(async move {
                    let (mut conn, _) = listener.accept().await.unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    match other {
                        Endpoint::Garbage => {
                            let _ = conn.write_all(b"SSH-2.0-not-http\r\n\r\n").await;
                        }
                        Endpoint::Silent => tokio::time::sleep(Duration::from_secs(30)).await,
                        Endpoint::CloseAfterRequest | Endpoint::Closed => {}
                    }
                });
            }
        }
        let settings = PoolSettings {
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            keepalive: 4,
            limit: None,
        };
        let upstreams = Upstreams::new(&settings, &UpstreamTlsConfig::default())?;
        let mut req = Request::new(RequestBody::Empty);
        *req.uri_mut() = format!("http://{addr}/v1/models").parse()?;
        let sent = upstreams
            .send(req, UpstreamProtocol::Http1, Duration::from_millis(300))
            .await;
        Ok(sent.err().ok_or("the endpoint answered")?)
    }

    #[tokio::test]
    async fn failures_over_real_sockets_are_typed() -> TestResult {
        let cases = [
            (Endpoint::Closed, UpstreamErrorKind::ConnectRefused),
            (Endpoint::CloseAfterRequest, UpstreamErrorKind::ResetBeforeHead),
            (Endpoint::Garbage, UpstreamErrorKind::Protocol),
            (Endpoint::Silent, UpstreamErrorKind::HeadTimeout),
        ];
        for (endpoint, want) in cases {
            let err = attempt(endpoint).await?;
            assert_eq!(err.kind(), want, "{}", err.detail());
            // The client-facing text is the kind's, never the OS error.
            assert_eq!(err.to_string(), want.as_str());
        }
        Ok(())
    }
}
