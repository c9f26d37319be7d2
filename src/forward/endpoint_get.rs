//! One builder for every request to an endpoint: [`to_endpoint`] makes the request line
//! (absolute URI under the endpoint's base path, version for its protocol) for proxied
//! requests and Meridian's own alike; [`endpoint_get`] is Meridian's own `GET` (health probe,
//! load scrape, model discovery) with the endpoint's authority as `Host` and a user agent
//! that names the purpose.

use http::uri::{Authority, InvalidUri, InvalidUriParts, PathAndQuery, Scheme, Uri};
use http::{HeaderValue, Method, Request, Version, header};

use super::body::RequestBody;
use crate::config::{EndpointConfig, UpstreamProtocol};

/// `GET base_path + path` for `endpoint`; `Err` names what made the URI invalid.
pub(crate) fn endpoint_get(
    endpoint: &EndpointConfig,
    path: &str,
    user_agent: &'static str,
) -> Result<Request<RequestBody>, String> {
    let path = under_base(&endpoint.base_path, path).map_err(|e| format!("bad path: {e}"))?;
    let mut req = to_endpoint(
        &endpoint.scheme,
        &endpoint.authority,
        path,
        endpoint.protocol,
        Method::GET,
        RequestBody::Empty,
    )
    .map_err(|e| format!("bad URI: {e}"))?;
    if let Ok(host) = HeaderValue::from_str(endpoint.authority.as_str()) {
        req.headers_mut().insert(header::HOST, host);
    }
    req.headers_mut()
        .insert(header::USER_AGENT, HeaderValue::from_static(user_agent));
    Ok(req)
}

/// `path` (with its query) under an endpoint's base path (`""` or `/prefix`, no trailing
/// slash): the path every request to the endpoint is sent to.
pub(crate) fn under_base(base: &str, path: &str) -> Result<PathAndQuery, InvalidUri> {
    if base.is_empty() {
        return PathAndQuery::try_from(path);
    }
    PathAndQuery::try_from(format!("{base}{path}"))
}

/// The request line of anything Meridian sends to an endpoint, proxied or its own: method,
/// absolute URI and HTTP version for `protocol`; headers are the caller's.
pub(crate) fn to_endpoint<B>(
    scheme: &Scheme,
    authority: &Authority,
    path_and_query: PathAndQuery,
    protocol: UpstreamProtocol,
    method: Method,
    body: B,
) -> Result<Request<B>, InvalidUriParts> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(path_and_query);
    let uri = Uri::from_parts(parts)?;
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = match protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };
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
