//! One builder for Meridian's own requests to an endpoint (health probe, load scrape, model
//! discovery): a `GET` of a path under the endpoint's base path, in its protocol, with its
//! authority as `Host` and a user agent that names the purpose.

use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Method, Request, Version, header};

use super::body::RequestBody;
use crate::config::{EndpointConfig, UpstreamProtocol};

/// `GET base_path + path` for `endpoint`; `Err` names what made the URI invalid.
pub(crate) fn endpoint_get(
    endpoint: &EndpointConfig,
    path: &str,
    user_agent: &'static str,
) -> Result<Request<RequestBody>, String> {
    let path = PathAndQuery::try_from(format!("{}{path}", endpoint.base_path)).map_err(|e| format!("bad path: {e}"))?;
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(endpoint.scheme.clone());
    parts.authority = Some(endpoint.authority.clone());
    parts.path_and_query = Some(path);
    let uri = Uri::from_parts(parts).map_err(|e| format!("bad URI: {e}"))?;
    let mut req = Request::new(RequestBody::Empty);
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    *req.version_mut() = match endpoint.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
    if let Ok(host) = HeaderValue::from_str(endpoint.authority.as_str()) {
        req.headers_mut().insert(header::HOST, host);
    }
    req.headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_static(user_agent));
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[test]
    fn the_request_carries_base_path_host_version_and_agent() -> TestResult {
        let config = crate::config::Config::parse(
            "[[region]]\nname = \"a\"\nlocation = [0.0, 0.0]\nprotocol = \"http2\"\nendpoints = [\"http://127.0.0.1:9000/base\"]\n",
            None,
        )?;
        let endpoint = &config.regions[0].endpoints[0];
        let req = endpoint_get(endpoint, "/health", "meridian-health-probe")?;
        assert_eq!(req.uri().to_string(), "http://127.0.0.1:9000/base/health");
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.headers()[header::HOST], "127.0.0.1:9000");
        assert_eq!(req.headers()[header::USER_AGENT], "meridian-health-probe");
        assert!(endpoint_get(endpoint, "/a b", "x").is_err());
        Ok(())
    }
}
