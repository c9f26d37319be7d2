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
    /// `detail` (the socket or TLS error) goes to the access log, not to the client.
    #[error("the endpoint could not be reached")]
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
        }
    }

    pub fn zone(&self) -> Option<&str> {
        match self {
            ProxyError::ResidencyForbidden { zone } | ProxyError::ResidencyUnavailable { zone } => Some(zone),
            _ => None,
        }
    }

    /// What went wrong in Meridian's own words, for the log only.
    pub fn detail(&self) -> Option<&str> {
        match self {
            ProxyError::UpstreamUnreachable { detail, .. } => Some(detail),
            ProxyError::LocationRefused
            | ProxyError::ResidencyForbidden { .. }
            | ProxyError::ResidencyUnavailable { .. }
            | ProxyError::NoRegionAvailable { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::UriTooLong { .. } => None,
        }
    }

    /// Whether this is a refusal to keep a residency zone's client inside it: counted with
    /// `region="none"`, whatever was tried before.
    pub fn is_residency(&self) -> bool {
        matches!(
            self,
            ProxyError::ResidencyForbidden { .. } | ProxyError::ResidencyUnavailable { .. }
        )
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
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
