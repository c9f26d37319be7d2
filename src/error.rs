//! What Meridian itself answers when it cannot forward: one enum, mapped exhaustively to a
//! status code and the JSON body of SPEC ("error", "message", "zone", "region").

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// A request that Meridian answers itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the client's location could not be determined and unlocated clients are refused")]
    LocationRefused,
    #[error("no region of residency zone {zone} may serve this path")]
    ResidencyForbidden { zone: String },
    #[error("no region of residency zone {zone} is available")]
    ResidencyUnavailable { zone: String },
    #[error("no region is available for this request")]
    NoRegionAvailable { region: Option<String> },
    #[error("the endpoint could not be reached: {detail}")]
    UpstreamUnreachable { region: String, detail: String },
    #[error("the endpoint did not answer within the request timeout")]
    UpstreamTimeout { region: String },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Answered 414; reported with the `bad_request` code, SPEC's list of codes being closed.
    #[error("the request target is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    /// Answered 429 with `Retry-After`: an admission rule's limit is reached.
    #[error("rate limit {rule:?} reached ({limit}); retry in {}s", retry_after_secs(*retry_after))]
    RateLimited {
        rule: String,
        limit: &'static str,
        retry_after: std::time::Duration,
    },
}

/// Whole seconds to wait, rounded up, at least one.
fn retry_after_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0 || d.is_zero())
}

#[derive(Serialize)]
struct Body<'a> {
    error: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::LocationRefused | ProxyError::ResidencyForbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::ResidencyUnavailable { .. } | ProxyError::NoRegionAvailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The machine-readable code of SPEC.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::LocationRefused => "location_refused",
            ProxyError::ResidencyForbidden { .. } => "residency_forbidden",
            ProxyError::ResidencyUnavailable { .. } => "residency_unavailable",
            ProxyError::NoRegionAvailable { .. } => "no_region_available",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequest(_) | ProxyError::UriTooLong { .. } => "bad_request",
            ProxyError::RateLimited { .. } => "rate_limit_exceeded",
        }
    }

    pub fn zone(&self) -> Option<&str> {
        match self {
            ProxyError::ResidencyForbidden { zone } | ProxyError::ResidencyUnavailable { zone } => Some(zone),
            _ => None,
        }
    }

    pub fn region(&self) -> Option<&str> {
        match self {
            ProxyError::UpstreamUnreachable { region, .. } | ProxyError::UpstreamTimeout { region } => Some(region),
            ProxyError::NoRegionAvailable { region } => region.as_deref(),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        let body = Body {
            error: self.code(),
            message: self.to_string(),
            zone: self.zone(),
            region: self.region(),
        };
        serde_json::to_vec(&body).map(Bytes::from).unwrap_or_default()
    }

    pub fn response<B: From<Bytes>>(&self) -> Response<B> {
        let mut resp = Response::new(B::from(self.body()));
        *resp.status_mut() = self.status();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let ProxyError::RateLimited { retry_after, .. } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_answers_say_when_to_retry() {
        let err = ProxyError::RateLimited {
            rule: "per-key".into(),
            limit: "requests",
            retry_after: std::time::Duration::from_millis(1500),
        };
        let resp: Response<Bytes> = err.response();
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "2");
        assert!(err.to_string().contains("\"per-key\""), "{err}");
        assert!(err.to_string().contains("retry in 2s"), "{err}");
        let cases = [(0, 1), (1000, 1), (1001, 2), (59_999, 60)];
        for (ms, secs) in cases {
            assert_eq!(retry_after_secs(std::time::Duration::from_millis(ms)), secs, "{ms}");
        }
    }

    #[test]
    fn every_error_maps_to_status_code_and_json() {
        let cases = [
            (ProxyError::LocationRefused, 403, "location_refused", None, None),
            (
                ProxyError::ResidencyForbidden { zone: "uk".into() },
                403,
                "residency_forbidden",
                Some("uk"),
                None,
            ),
            (
                ProxyError::ResidencyUnavailable { zone: "uk".into() },
                503,
                "residency_unavailable",
                Some("uk"),
                None,
            ),
            (
                ProxyError::NoRegionAvailable { region: None },
                503,
                "no_region_available",
                None,
                None,
            ),
            (
                ProxyError::UpstreamUnreachable {
                    region: "eu-west".into(),
                    detail: "refused".into(),
                },
                502,
                "upstream_unreachable",
                None,
                Some("eu-west"),
            ),
            (
                ProxyError::UpstreamTimeout {
                    region: "us-east".into(),
                },
                504,
                "upstream_timeout",
                None,
                Some("us-east"),
            ),
            (
                ProxyError::BodyTooLarge { limit: 10 },
                413,
                "body_too_large",
                None,
                None,
            ),
            (ProxyError::BadRequest("x"), 400, "bad_request", None, None),
            (ProxyError::UriTooLong { limit: 8 }, 414, "bad_request", None, None),
            (
                ProxyError::RateLimited {
                    rule: "per-key".into(),
                    limit: "requests",
                    retry_after: std::time::Duration::from_millis(1500),
                },
                429,
                "rate_limit_exceeded",
                None,
                None,
            ),
        ];
        for (err, status, code, zone, region) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            let v: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
            assert_eq!(v["error"], code);
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert_eq!(v.get("zone").and_then(|z| z.as_str()), zone);
            assert_eq!(v.get("region").and_then(|z| z.as_str()), region);
        }
    }
}
