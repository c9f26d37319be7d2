//! Pooled connections to endpoints (HTTP/1.1, HTTP/2, TLS) and one attempt's outcome.

use std::error::Error as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::body::RequestBody;
use super::limit::{CappedConnector, ConnectionCaps, EndpointLimit};
use crate::config::{EndpointLimitConfig, UpstreamProtocol, UpstreamTlsConfig};

type Pool = Client<HttpsConnector<CappedConnector<HttpConnector>>, RequestBody>;

/// Why an attempt got no response head.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: the connection was refused, unreachable, or timed out.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection broke before a response head arrived.
    #[error("connection closed before a response: {0}")]
    Reset(String),
    /// No response head within `request_timeout`.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The client's own body failed (too large, or the client went away).
    #[error("request body: {0}")]
    Body(String),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// The client stopped sending its body for `server.body_timeout`: answered 408 and
    /// never counted against the endpoint.
    #[error("the client's body stalled for {0:?}")]
    ClientStalled(Duration),
}

impl UpstreamError {
    /// Nothing was sent (refused, unreachable, connect timeout): any request may go
    /// elsewhere.
    pub fn retryable(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    /// The request may have reached the endpoint, which gave no answer: another endpoint
    /// may be tried only for requests that `retry::may_replay` allows.
    pub fn retryable_if_replayable(&self) -> bool {
        matches!(self, UpstreamError::Reset(_) | UpstreamError::Protocol(_))
    }

    fn from_body(b: &super::body::BodyError) -> UpstreamError {
        match b {
            super::body::BodyError::ClientStalled(d) => UpstreamError::ClientStalled(*d),
            b => UpstreamError::Body(b.to_string()),
        }
    }

    fn classify(e: hyper_util::client::legacy::Error) -> UpstreamError {
        let detail = error_chain(&e);
        if e.is_connect() {
            return UpstreamError::Connect(detail);
        }
        let mut source = e.source();
        while let Some(s) = source {
            if let Some(h) = s.downcast_ref::<hyper::Error>() {
                if h.is_body_write_aborted() || h.is_user() {
                    // The body's own error: see whether it is ours.
                    if let Some(b) = h.source().and_then(|s| s.downcast_ref::<super::body::BodyError>()) {
                        return UpstreamError::from_body(b);
                    }
                }
                if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                    return UpstreamError::Reset(detail);
                }
                if h.is_parse() {
                    return UpstreamError::Protocol(detail);
                }
            }
            if let Some(b) = s.downcast_ref::<super::body::BodyError>() {
                return UpstreamError::from_body(b);
            }
            if let Some(io) = s.downcast_ref::<io::Error>() {
                if matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::UnexpectedEof
                ) {
                    return UpstreamError::Reset(detail);
                }
            }
            source = s.source();
        }
        UpstreamError::Protocol(detail)
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
pub struct Upstreams {
    http1: Pool,
    http2: Pool,
    /// Request slots per endpoint, when `upstream.max_connections_per_endpoint` is set.
    limits: Option<Arc<EndpointLimits>>,
}

/// Pool knobs shared by every upstream client.
#[derive(Debug, Clone)]
pub struct PoolSettings {
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
    pub fn new(settings: &PoolSettings, tls: &UpstreamTlsConfig) -> Result<Upstreams, ClientSetupError> {
        let tls = tls_config(tls.ca_file.as_deref(), tls.client_auth.as_ref())?;
        // One cap per endpoint across both protocols' pools.
        let caps = settings
            .limit
            .map(|l| Arc::new(ConnectionCaps::new(l.max_connections, settings.connect_timeout)));
        Ok(Upstreams {
            http1: pool(settings, tls.clone(), false, caps.clone()),
            http2: pool(settings, tls, true, caps),
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
    pub fn endpoint_limit(
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
    pub async fn send(
        &self,
        req: Request<RequestBody>,
        protocol: UpstreamProtocol,
        timeout: Duration,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pool = match protocol {
            UpstreamProtocol::Http1 => &self.http1,
            UpstreamProtocol::Http2 => &self.http2,
        };
        let body_sent = req.body().sent_signal();
        let deadline = async {
            match body_sent {
                Some(sent) => sent.endpoint_deadline(timeout).await,
                None => tokio::time::sleep(timeout).await,
            }
        };
        tokio::select! {
            biased;
            resp = pool.request(req) => resp.map_err(UpstreamError::classify),
            () = deadline => Err(UpstreamError::Timeout(timeout)),
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

fn pool(
    settings: &PoolSettings,
    tls: Arc<rustls::ClientConfig>,
    http2: bool,
    caps: Option<Arc<ConnectionCaps>>,
) -> Pool {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let http = CappedConnector::new(http, caps);
    // The builder sets ALPN from the enabled versions: h2 for the HTTP/2 pool, http/1.1
    // for the other, so a TLS endpoint speaks what the pool expects.
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http();
    let connector = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(settings.idle_timeout)
        // NGINX's `keepalive N`: a burst's extra connections close as they go idle instead
        // of staying pooled (and resident) until the idle timeout.
        .pool_max_idle_per_host(settings.keepalive)
        .http2_only(http2);
    builder.build(connector)
}
