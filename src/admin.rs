//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status`, and region drain for
//! failover drills (bearer token, compared in constant time).

use std::convert::Infallible;
use std::sync::Arc;

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

use crate::health::EndpointSnapshot;
use crate::route::RegionState;
use crate::runtime::{Runtime, Shared};

type AdminResponse = Response<Full<Bytes>>;

/// Serves the admin API on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let shared = shared.clone();
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, req)) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

fn handle(shared: &Shared, req: Request<Incoming>) -> AdminResponse {
    let path = req.uri().path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["metrics"]) => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            shared.metrics.render(),
        ),
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
            if let Err(resp) = authorize(shared, &req) {
                return *resp;
            }
            let rt = shared.runtime();
            let Some(index) = rt.config.region_index(name) else {
                return error(
                    StatusCode::NOT_FOUND,
                    "unknown_region",
                    &format!("no region named {name:?}"),
                );
            };
            let drain = *action == "drain";
            let region = &rt.regions[index];
            if region.health.set_drained(drain) {
                tracing::warn!(region = %name, drained = drain, "region drain changed by admin");
            }
            shared.publish_availability();
            json_response(StatusCode::OK, &region_status(&rt, index))
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
fn authorize(shared: &Shared, req: &Request<Incoming>) -> Result<(), Box<AdminResponse>> {
    let rt = shared.runtime();
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
    if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) && !presented.is_empty() {
        Ok(())
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

#[derive(Serialize)]
struct RegionStatus {
    name: String,
    state: &'static str,
    available: bool,
    drained: bool,
    priority: u32,
    failover: bool,
    location: crate::geo::GeoPoint,
    endpoints_available: usize,
    endpoints: Vec<EndpointSnapshot>,
}

fn region_status(rt: &Runtime, index: usize) -> RegionStatus {
    let r = &rt.regions[index];
    let c = &rt.config.regions[index];
    let drained = r.health.is_drained();
    let endpoints: Vec<EndpointSnapshot> = r.endpoints.iter().map(|e| e.health.snapshot()).collect();
    let endpoints_available = endpoints.iter().filter(|e| e.available).count();
    let available = rt.region_state(index, |_| false) == RegionState::Available;
    let state = if drained {
        "drained"
    } else if !available {
        "unavailable"
    } else if (endpoints_available as f64) < rt.config.health.degraded_below * endpoints.len() as f64 {
        "degraded"
    } else {
        "healthy"
    };
    RegionStatus {
        name: r.name.clone(),
        state,
        available,
        drained,
        priority: c.priority,
        failover: c.failover,
        location: c.location,
        endpoints_available,
        endpoints,
    }
}

fn status(shared: &Shared) -> serde_json::Value {
    let rt = shared.runtime();
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
        "regions": regions,
        "zones": zones,
        "fallback": rt.fallback.as_ref().map(|f| json!({"endpoint": f.config.endpoint.url, "zone": f.config.zone.map(|z| rt.config.zones[z].name.clone())})),
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

fn error(status: StatusCode, code: &str, message: &str) -> AdminResponse {
    json_response(status, &json!({"error": code, "message": message}))
}
