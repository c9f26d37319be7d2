//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status`, and region drain for
//! failover drills (bearer token, compared in constant time).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::health::{DrainInfo, EndpointSnapshot};
use crate::route::RegionState;
use crate::runtime::{Shared, Snapshot};

type AdminResponse = Response<Full<Bytes>>;

/// Open admin connections beyond this are closed at once: scrapers and operators need a
/// handful, and an unbounded listener is a way to exhaust the process's file descriptors.
pub(crate) const MAX_ADMIN_CONNECTIONS: usize = 64;

/// Longest drain `?for=` accepted: a year is a config change, not a drill.
const MAX_DRAIN: Duration = Duration::from_secs(366 * 24 * 3600);

/// Serves the admin API on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The header and idle clocks are IdleIo's, as on the proxy listener.
    builder.http1().header_read_timeout(None);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = MAX_ADMIN_CONNECTIONS, "admin connection limit reached; closing");
            continue;
        };
        let server = &shared.snapshot().config.server;
        let timeouts = crate::listen::Timeouts {
            header_read: server.header_read_timeout,
            idle: server.idle_timeout,
            send: server.send_timeout,
        };
        let (io, activity) = crate::listen::IdleIo::new(stream, timeouts);
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = shared.clone();
            // Admin answers are whole in memory: the request is done once handled.
            let _guard = activity.begin();
            async move { Ok::<_, Infallible>(handle(&shared, peer, req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(io), service).into_owned();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = conn.await;
        });
    }
}

fn handle(shared: &Shared, peer: SocketAddr, req: Request<Incoming>) -> AdminResponse {
    // HEAD is answered wherever GET is (RFC 9110 §9.3.2), without the body: load balancers
    // check health with it.
    if req.method() == Method::HEAD {
        let (mut parts, body) = req.into_parts();
        parts.method = Method::GET;
        let mut resp = handle(shared, peer, Request::from_parts(parts, body));
        // The length GET's body would have (hyper sends no body for HEAD over HTTP/1.1, but
        // over HTTP/2 it sends what it is given).
        let length = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
        resp.headers_mut().insert(header::CONTENT_LENGTH, length.into());
        *resp.body_mut() = Full::new(Bytes::new());
        return resp;
    }
    let path = req.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["metrics"]) => text(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", {
            shared.refresh_gauges();
            shared.metrics.render()
        }),
        (&Method::GET, ["healthz"]) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, ["readyz"]) => {
            if shared.is_ready() {
                json_response(StatusCode::OK, &json!({"ready": true}))
            } else {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"ready": false}))
            }
        }
        (&Method::GET, ["status"]) => json_response(StatusCode::OK, &status(shared)),
        (&Method::POST, ["regions", name, action @ ("drain" | "undrain")]) => {
            // A client may escape any character of a path segment (`us%2Deast`).
            let name = &*percent_encoding::percent_decode_str(name).decode_utf8_lossy();
            let token_id = match authorize(shared, &req) {
                Ok(id) => id,
                Err(resp) => return *resp,
            };
            let rt = shared.snapshot();
            let Some(index) = rt.config.region_index(name) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "unknown_region",
                    &format!("no region named {name:?}"),
                );
            };
            let query = DrainQuery::parse(req.uri().query());
            let duration = match query.duration {
                Ok(d) => d,
                Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e),
            };
            let region = &rt.regions[index];
            let reason = query.reason.as_deref().unwrap_or("");
            if *action == "drain" {
                let info = DrainInfo {
                    by: token_id.clone(),
                    peer: peer.to_string(),
                    reason: query.reason.clone(),
                    since_unix: crate::observe::unix_now(),
                    until_unix: duration.map(|d| crate::observe::unix_now() + d.as_secs_f64()),
                };
                let changed = region.health.drain(duration, info);
                tracing::warn!(region = %name, by = %token_id, %peer, reason, expires_in_ms = duration.map(crate::observe::fields::ms), changed, "region drained by admin");
            } else {
                let changed = region.health.undrain();
                tracing::warn!(region = %name, by = %token_id, %peer, reason, changed, "region undrained by admin");
            }
            shared.publish_availability();
            let status = region_status(&rt, index);
            match (*action, &status.config_drain) {
                // The admin drain is lifted, but the fleet-wide one is not this instance's to lift.
                ("undrain", Some(d)) => {
                    let mut body = serde_json::to_value(&status).unwrap_or_default();
                    let message = still_drained_message(&d.reason, d.until.as_deref());
                    if let Some(map) = body.as_object_mut() {
                        map.insert("message".into(), message.into());
                    }
                    json_response(StatusCode::OK, &body)
                }
                _ => json_response(StatusCode::OK, &status),
            }
        }
        (_, ["metrics" | "healthz" | "readyz" | "status"]) | (_, ["regions", _, "drain" | "undrain"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        ),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
    }
}

/// 403 when no token is configured (mutations are off), 401 without the right bearer token.
/// Returns the token's id for the logs.
fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<String, Box<AdminResponse>> {
    let rt = shared.snapshot();
    let Some(token) = rt.config.admin.token.as_deref() else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "mutating admin calls are disabled: no admin token is configured",
        )));
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .unwrap_or("");
    if token_matches(presented, token) {
        Ok(token_id(token))
    } else {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        Err(Box::new(resp))
    }
}

/// Compares a presented token with the configured one in constant time. Both are hashed
/// first: digests have one length whatever was presented, whereas `ct_eq` on the raw bytes
/// returns early on a length mismatch and so reveals the token's length.
fn token_matches(presented: &str, token: &str) -> bool {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    !presented.is_empty() && bool::from(digest(presented).as_ref().ct_eq(digest(token).as_ref()))
}

/// A short, non-secret name for a token in logs: the start of its SHA-256, as SSH shows keys.
pub(crate) fn token_id(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `?for=10m&reason=drill` on drain and undrain.
struct DrainQuery {
    duration: Result<Option<Duration>, String>,
    reason: Option<String>,
}

impl DrainQuery {
    fn parse(query: Option<&str>) -> DrainQuery {
        let mut q = DrainQuery {
            duration: Ok(None),
            reason: None,
        };
        // `+` and percent escapes decoded as a form's query is (a reason with spaces).
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "for" => {
                    q.duration = match humantime::parse_duration(&value) {
                        Ok(d) if !d.is_zero() && d <= MAX_DRAIN => Ok(Some(d)),
                        _ => Err(format!(
                            "for={value:?} is not a duration like \"10m\" (at most {})",
                            humantime::format_duration(MAX_DRAIN)
                        )),
                    }
                }
                // Bounded: it goes into logs and /status.
                "reason" => q.reason = Some(value.chars().take(200).collect()),
                _ => {}
            }
        }
        q
    }
}

#[derive(Serialize)]
struct RegionStatus {
    name: String,
    state: &'static str,
    available: bool,
    drained: bool,
    /// Every endpoint past a spillover threshold: new requests go to the next region.
    saturated: bool,
    load_source: crate::config::LoadSource,
    priority: u32,
    failover: bool,
    location: crate::geo::GeoPoint,
    endpoints_available: usize,
    /// Share of its clients the region takes while it ramps back (slow start).
    slow_start_weight: Option<f64>,
    /// Who drains it: "config", "admin", both or neither.
    drained_by: Vec<&'static str>,
    /// The admin drain on this instance.
    drain: Option<DrainInfo>,
    /// The config's fleet-wide drain, while in force.
    config_drain: Option<ConfigDrainStatus>,
    /// Configured models (`null`: every model) and, with discovery, what the endpoints list.
    models: Option<Vec<String>>,
    discovered_models: Option<Vec<String>>,
    endpoints: Vec<EndpointSnapshot>,
}

#[derive(Serialize)]
struct ConfigDrainStatus {
    reason: String,
    /// RFC 3339; absent: until the config changes.
    until: Option<String>,
}

fn still_drained_message(reason: &str, until: Option<&str>) -> String {
    let until = until.map_or_else(|| "until the config changes".to_string(), |u| format!("until {u}"));
    format!(
        "the admin drain is lifted, but the config still drains this region ({reason}, {until}): an admin undrain does not lift a config drain; remove drain from its [[region]] and reload"
    )
}

fn region_status(rt: &Snapshot, index: usize) -> RegionStatus {
    let r = &rt.regions[index];
    let c = &rt.config.regions[index];
    let drain_state = rt.drain_state(index);
    let drained = drain_state.any();
    let config_drain = c
        .drain
        .as_ref()
        .filter(|_| drain_state.config)
        .map(|d| ConfigDrainStatus {
            reason: d.reason.clone(),
            until: crate::health::drain::format_until(d),
        });
    let slow_start = rt.config.health.slow_start;
    let endpoints: Vec<EndpointSnapshot> = r.endpoints.iter().map(|e| e.health.snapshot(slow_start)).collect();
    let endpoints_available = endpoints.iter().filter(|e| e.available).count();
    let region_state = rt.region_state(index, |_| false);
    let saturated = region_state == RegionState::Saturated;
    let available = region_state == RegionState::Available || saturated;
    let state = if drained {
        "drained"
    } else if !available {
        "unavailable"
    } else if saturated {
        "saturated"
    } else if (endpoints_available as f64) < rt.config.health.degraded_below * endpoints.len() as f64 {
        "degraded"
    } else {
        "healthy"
    };
    RegionStatus {
        name: r.name.to_string(),
        state,
        available,
        drained,
        saturated,
        load_source: c.load.source,
        priority: c.priority,
        failover: c.failover,
        location: c.location,
        endpoints_available,
        slow_start_weight: Some(r.health.ramp(slow_start)).filter(|w| *w < 1.0),
        drained_by: drain_state.sources(),
        drain: r.health.drain_info(),
        config_drain,
        models: c.models.clone(),
        discovered_models: c.discover_models.then(|| {
            let mut all: Vec<String> = endpoints
                .iter()
                .flat_map(|e| e.models.iter().flatten().cloned())
                .collect();
            all.sort();
            all.dedup();
            all
        }),
        endpoints,
    }
}

fn status(shared: &Shared) -> serde_json::Value {
    let rt = shared.snapshot();
    let regions: Vec<RegionStatus> = (0..rt.regions.len()).map(|i| region_status(&rt, i)).collect();
    let zones: Vec<_> = rt
        .config
        .zones
        .iter()
        .map(|z| {
            json!({
                "name": z.name,
                "countries": z.countries.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                "regions": z.regions.iter().map(|&r| rt.config.regions[r].name.clone()).collect::<Vec<_>>(),
                "failover": z.failover,
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "ready": shared.is_ready(),
        "config": rt.config.source.as_ref().map(|p| p.display().to_string()),
        "geoip": rt.geo.description(),
        "geoip_databases": crate::explain::geoip_status(&rt.geo),
        "regions": regions,
        "zones": zones,
        "fallback": rt.fallback.as_ref().map(|f| json!({"endpoint": f.config.endpoint.url, "zone": f.config.zone.map(|z| rt.config.zones[z].name.clone()), "breaker": f.breaker.snapshot()})),
        "patterns": crate::explain::pattern_summary(&rt.table),
    })
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> AdminResponse {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    resp
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> AdminResponse {
    let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
    text(status, "application/json", body)
}

/// The same OpenAI-shaped envelope as the proxy's own errors (docs/errors.md).
fn error(status: StatusCode, code: &str, message: &str) -> AdminResponse {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "invalid_request_error", "code": code, "param": null}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_only_the_exact_token() {
        let cases = [
            ("s3cret-token", true),
            ("", false),
            ("s3cret", false),
            ("s3cret-token-", false),
            ("S3CRET-TOKEN", false),
            ("s3cret-tokeN", false),
        ];
        for (presented, want) in cases {
            assert_eq!(token_matches(presented, "s3cret-token"), want, "{presented:?}");
        }
    }

    #[test]
    fn drain_query_table() {
        let m = Duration::from_secs(600);
        type Want = Result<Option<Duration>, ()>;
        let cases: [(Option<&str>, Want, Option<&str>); 10] = [
            (None, Ok(None), None),
            (Some("for=10m"), Ok(Some(m)), None),
            (Some("reason=zone%20drill&for=10m"), Ok(Some(m)), Some("zone drill")),
            (Some("reason=a+b%2Fc"), Ok(None), Some("a b/c")),
            (Some("for=soon"), Err(()), None),
            (Some("for=0s"), Err(()), None),
            (Some("for=18000000000000000000s"), Err(()), None),
            (Some("for=367d"), Err(()), None),
            // Invalid escapes are kept as written.
            (Some("reason=100%"), Ok(None), Some("100%")),
            (Some("reason=%zz"), Ok(None), Some("%zz")),
        ];
        for (query, duration, reason) in cases {
            let q = DrainQuery::parse(query);
            assert_eq!(q.duration.map_err(|_| ()), duration, "{query:?}");
            assert_eq!(q.reason.as_deref(), reason, "{query:?}");
        }
    }

    #[test]
    fn token_id_is_short_stable_and_not_the_token() {
        let id = token_id("s3cret");
        assert_eq!(id, token_id("s3cret"));
        assert_ne!(id, token_id("s3cret2"));
        assert!(id.starts_with("sha256:") && id.len() == 15, "{id}");
        assert!(!id.contains("s3cret"));
    }
}
