//! What Meridian itself answers when it cannot forward: one enum, mapped exhaustively to a
//! status code and an OpenAI-shaped JSON body (see docs/errors.md):
//! `{"error": {"message", "type", "code", "param": null, "zone"?, "region"?, "model"?}}`.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

/// A request that Meridian answers itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("the client's location could not be determined and unlocated clients are refused")]
    LocationRefused,
    #[error("no region of residency zone {zone} may serve this path")]
    ResidencyForbidden { zone: String },
    #[error("no region of residency zone {zone} is available")]
    ResidencyUnavailable { zone: String },
    #[error("no region is available for this request")]
    NoRegionAvailable { region: Option<String> },
    /// `reason` is a stable short text: the OS error behind it goes to the log, not to clients.
    #[error("the endpoint could not be reached: {reason}")]
    UpstreamUnreachable { region: String, reason: &'static str },
    #[error("the endpoint did not answer within the request timeout")]
    UpstreamTimeout { region: String },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Answered 414; reported with the `bad_request` code, the list of codes being closed
    /// (docs/errors.md).
    #[error("the request target is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    /// Answered 405 (`CONNECT`: a tunnel would bypass routing); code `bad_request`.
    #[error("this method is not served")]
    MethodNotAllowed,
    /// Answered 408 when the client's body stalls past `server.body_timeout`; the
    /// connection is closed. Code `bad_request`: the client's fault, never an endpoint's.
    #[error("the request body did not arrive within the body timeout")]
    BodyTimeout,
    /// A request head the HTTP/1.1 parser refused (400, 414, 431, 505 as it chose); code
    /// `bad_request`.
    #[error("the request head could not be read (HTTP {status})")]
    MalformedHead { status: u16 },
    #[error("no region serves the model {model}")]
    ModelNotFound { model: String },
    #[error("no region of residency zone {zone} serves the model {model}")]
    ModelNotAvailableInZone { zone: String, model: String },
    /// Answered 429 with `Retry-After`: an admission rule's limit is reached.
    #[error("rate limit {rule:?} reached ({limit}); retry in {}s", retry_after_secs(*retry_after))]
    RateLimited {
        rule: String,
        limit: &'static str,
        retry_after: Duration,
    },
}

/// The OpenAI error envelope.
#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'static str,
    /// Always null: Meridian never blames one request parameter, and the SDKs read the key.
    param: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    zone: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    region: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
}

impl ProxyError {
    pub(crate) fn status(&self) -> StatusCode {
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
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::MalformedHead { status } => StatusCode::from_u16(*status)
                .ok()
                .filter(|s| s.is_client_error() || s.is_server_error())
                .unwrap_or(StatusCode::BAD_REQUEST),
            ProxyError::ModelNotFound { .. } | ProxyError::ModelNotAvailableInZone { .. } => StatusCode::NOT_FOUND,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The machine-readable code (`error.code`, docs/errors.md).
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ProxyError::LocationRefused => "location_refused",
            ProxyError::ResidencyForbidden { .. } => "residency_forbidden",
            ProxyError::ResidencyUnavailable { .. } => "residency_unavailable",
            ProxyError::NoRegionAvailable { .. } => "no_region_available",
            ProxyError::UpstreamUnreachable { .. } => "upstream_unreachable",
            ProxyError::UpstreamTimeout { .. } => "upstream_timeout",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequest(_)
            | ProxyError::UriTooLong { .. }
            | ProxyError::MethodNotAllowed
            | ProxyError::BodyTimeout
            | ProxyError::MalformedHead { .. } => "bad_request",
            ProxyError::ModelNotFound { .. } => "model_not_found",
            ProxyError::ModelNotAvailableInZone { .. } => "model_not_available_in_zone",
            ProxyError::RateLimited { .. } => "rate_limit_exceeded",
        }
    }

    /// `error.type`, by who must act: the client (`invalid_request_error`, every 4xx), wait
    /// and retry (`service_unavailable`, every 503) or the endpoint failed (`server_error`).
    pub(crate) fn kind(&self) -> &'static str {
        // A head the parser refused is the client's fault, whatever status it chose (505).
        if matches!(self, ProxyError::MalformedHead { .. }) {
            return "invalid_request_error";
        }
        match self.status() {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error", // as the OpenAI API types its 429s
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The residency zone, region and model the error names, for the body and the metrics.
    fn names(&self) -> (Option<&str>, Option<&str>, Option<&str>) {
        match self {
            ProxyError::ResidencyForbidden { zone } | ProxyError::ResidencyUnavailable { zone } => {
                (Some(zone), None, None)
            }
            ProxyError::ModelNotAvailableInZone { zone, model } => (Some(zone), None, Some(model)),
            ProxyError::ModelNotFound { model } => (None, None, Some(model)),
            ProxyError::UpstreamUnreachable { region, .. } | ProxyError::UpstreamTimeout { region } => {
                (None, Some(region), None)
            }
            ProxyError::NoRegionAvailable { region } => (None, region.as_deref(), None),
            ProxyError::LocationRefused
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::UriTooLong { .. }
            | ProxyError::MethodNotAllowed
            | ProxyError::BodyTimeout
            | ProxyError::MalformedHead { .. }
            | ProxyError::RateLimited { .. } => (None, None, None),
        }
    }

    pub(crate) fn zone(&self) -> Option<&str> {
        self.names().0
    }

    /// Whether this is a refusal to keep a residency zone's client inside it: counted with
    /// `region="none"`, whatever was tried before.
    pub(crate) fn is_residency(&self) -> bool {
        matches!(
            self,
            ProxyError::ResidencyForbidden { .. } | ProxyError::ResidencyUnavailable { .. }
        )
    }

    pub(crate) fn region(&self) -> Option<&str> {
        self.names().1
    }

    pub(crate) fn model(&self) -> Option<&str> {
        self.names().2
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> Bytes {
        let body = Envelope {
            error: Body {
                message: self.to_string(),
                kind: self.kind(),
                code: self.code(),
                param: None,
                zone: self.zone(),
                region: self.region(),
                model: self.model(),
            },
        };
        serde_json::to_vec(&body).map(Bytes::from).unwrap_or_default()
    }

    /// The whole answer. A 503 carries `Retry-After: retry_after` in whole seconds (at least 1):
    /// about when health checks may have found a region again.
    pub(crate) fn response<B: From<Bytes>>(&self, retry_after: Duration) -> Response<B> {
        let mut resp = Response::new(B::from(self.body()));
        *resp.status_mut() = self.status();
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let ProxyError::MethodNotAllowed = self {
            // RFC 9110 §15.5.6: a 405 lists what is allowed; only CONNECT is refused.
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        if let ProxyError::RateLimited { retry_after, .. } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
        } else if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs(retry_after)));
        }
        resp
    }
}

/// Whole seconds, rounded up, at least 1: `Retry-After: 0` would invite an immediate retry.
pub(crate) fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn a_refused_method_says_what_is_allowed() {
        let resp: Response<Bytes> = ProxyError::MethodNotAllowed.response(Duration::from_secs(1));
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        let allow = resp.headers().get(header::ALLOW).and_then(|v| v.to_str().ok());
        assert!(
            allow.is_some_and(|a| a.contains("GET") && !a.contains("CONNECT")),
            "{allow:?}"
        );
    }

    #[test]
    fn rate_limited_answers_say_when_to_retry() {
        let err = ProxyError::RateLimited {
            rule: "per-key".into(),
            limit: "requests",
            retry_after: Duration::from_millis(1500),
        };
        let resp: Response<Bytes> = err.response(Duration::from_secs(5));
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers().get(header::RETRY_AFTER).unwrap(), "2");
        let v: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert!(err.to_string().contains("\"per-key\""), "{err}");
        assert!(err.to_string().contains("retry in 2s"), "{err}");
    }

    #[test]
    fn every_error_maps_to_status_type_code_and_json() -> TestResult {
        type Case = (
            ProxyError,
            u16,
            &'static str,
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
            Option<&'static str>,
        );
        let inv = "invalid_request_error";
        let cases: Vec<Case> = vec![
            (
                ProxyError::LocationRefused,
                403,
                inv,
                "location_refused",
                None,
                None,
                None,
            ),
            (
                ProxyError::ResidencyForbidden { zone: "uk".into() },
                403,
                inv,
                "residency_forbidden",
                Some("uk"),
                None,
                None,
            ),
            (
                ProxyError::ResidencyUnavailable { zone: "uk".into() },
                503,
                "service_unavailable",
                "residency_unavailable",
                Some("uk"),
                None,
                None,
            ),
            (
                ProxyError::NoRegionAvailable { region: None },
                503,
                "service_unavailable",
                "no_region_available",
                None,
                None,
                None,
            ),
            (
                ProxyError::UpstreamUnreachable {
                    region: "eu-west".into(),
                    reason: "connection refused",
                },
                502,
                "server_error",
                "upstream_unreachable",
                None,
                Some("eu-west"),
                None,
            ),
            (
                ProxyError::UpstreamTimeout {
                    region: "us-east".into(),
                },
                504,
                "server_error",
                "upstream_timeout",
                None,
                Some("us-east"),
                None,
            ),
            (
                ProxyError::BodyTooLarge { limit: 10 },
                413,
                inv,
                "body_too_large",
                None,
                None,
                None,
            ),
            (ProxyError::BadRequest("x"), 400, inv, "bad_request", None, None, None),
            (
                ProxyError::UriTooLong { limit: 8 },
                414,
                inv,
                "bad_request",
                None,
                None,
                None,
            ),
            (
                ProxyError::ModelNotFound { model: "m".into() },
                404,
                inv,
                "model_not_found",
                None,
                None,
                Some("m"),
            ),
            (
                ProxyError::ModelNotAvailableInZone {
                    zone: "uk".into(),
                    model: "m".into(),
                },
                404,
                inv,
                "model_not_available_in_zone",
                Some("uk"),
                None,
                Some("m"),
            ),
            (ProxyError::MethodNotAllowed, 405, inv, "bad_request", None, None, None),
            (ProxyError::BodyTimeout, 408, inv, "bad_request", None, None, None),
            (
                ProxyError::MalformedHead { status: 431 },
                431,
                inv,
                "bad_request",
                None,
                None,
                None,
            ),
            (
                ProxyError::MalformedHead { status: 200 },
                400,
                inv,
                "bad_request",
                None,
                None,
                None,
            ),
        ];
        for (err, status, kind, code, zone, region, model) in cases {
            assert_eq!(err.status().as_u16(), status, "{err:?}");
            let v: serde_json::Value = serde_json::from_slice(&err.body())?;
            let e = &v["error"];
            assert_eq!(e["code"], code, "{v}");
            assert_eq!(e["type"], kind, "{v}");
            assert!(e["param"].is_null() && e.get("param").is_some(), "{v}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
            assert_eq!(e.get("zone").and_then(|z| z.as_str()), zone, "{v}");
            assert_eq!(e.get("region").and_then(|z| z.as_str()), region, "{v}");
            assert_eq!(e.get("model").and_then(|z| z.as_str()), model, "{v}");
            assert_eq!(v.as_object().map(|o| o.len()), Some(1), "only `error` at the top: {v}");
            let resp: Response<Bytes> = err.response(Duration::from_millis(2500));
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .map(|v| v.to_str().unwrap().to_string());
            assert_eq!(retry_after.is_some(), status == 503, "{err:?}");
        }
        Ok(())
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        let cases = [(0, 1), (1, 1), (999, 1), (1000, 1), (1001, 2), (2500, 3), (10_000, 10)];
        for (millis, secs) in cases {
            assert_eq!(retry_after_secs(Duration::from_millis(millis)), secs, "{millis} ms");
        }
    }
}
