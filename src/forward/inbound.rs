//! Checks on a client's request head before it is routed: method, `Host`, and the path
//! that rules, residency and the endpoint will see (docs/security.md).

use http::header::{self, HeaderValue};
use http::{Method, Request, Uri, Version};

use crate::error::ProxyError;
use crate::forward::head_fields::HeadFields;
use crate::forward::request_fields::RequestFields;
use crate::path::{self, PathError};

/// Admits a request head, rewriting it in place: the path normalised (original query kept),
/// and for HTTP/1.1 an absolute-form authority made the `Host` (RFC 9112 §3.2.2). `Ok`:
/// whether the head now carries a `Host` field (an HTTP/2 request may carry only
/// `:authority`), so the forwarding need not look again.
/// `listed`: the request's fields over its head's bytes, when its server kept them so.
pub(crate) fn admit<B>(req: &mut Request<B>, listed: Option<&HeadFields>) -> Result<bool, ProxyError> {
    if req.method() == Method::CONNECT {
        // A tunnel would bypass routing and residency altogether.
        return Err(ProxyError::MethodNotAllowed);
    }
    let (mut has_host, host_differs) = {
        let mut hosts = RequestFields::new(listed, req.headers()).values(&header::HOST);
        let first_host = hosts.next();
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest("more than one Host header"));
        }
        let differs = req
            .uri()
            .authority()
            .is_some_and(|a| first_host.is_some_and(|h| !h.eq_ignore_ascii_case(a.as_str().as_bytes())));
        (first_host.is_some(), differs)
    };
    if let Some(authority) = req.uri().authority() {
        match req.version() {
            // h2: `host`, when sent, must name what `:authority` names (RFC 9113 §8.3.1).
            Version::HTTP_2 | Version::HTTP_3 => {
                if host_differs {
                    return Err(ProxyError::BadRequest("host differs from :authority"));
                }
            }
            _ => {
                // In the map, which stands in for a listed `Host`.
                let host = HeaderValue::from_str(authority.as_str())
                    .map_err(|_| ProxyError::BadRequest("the request target's authority is not a valid Host"))?;
                req.headers_mut().insert(header::HOST, host);
                has_host = true;
            }
        }
    }
    if let Some(uri) = normalised_uri(req.uri())? {
        *req.uri_mut() = uri;
    }
    Ok(has_host)
}

/// The URI with its path normalised, or `None` when it is already normal.
fn normalised_uri(uri: &Uri) -> Result<Option<Uri>, ProxyError> {
    let normal = match path::normalise(uri.path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => return Ok(None),
        Ok(std::borrow::Cow::Owned(p)) => p,
        Err(PathError::AboveRoot) => return Err(ProxyError::BadRequest("the path climbs above /")),
    };
    let path_and_query = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        path_and_query
            .parse()
            .map_err(|_| ProxyError::BadRequest("the normalised path is not a valid URI"))?,
    );
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| ProxyError::BadRequest("the normalised path is not a valid URI"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, version: Version, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().method(method).uri(uri).version(version);
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn heads_admitted_and_rewritten() {
        type Case<'a> = (
            &'a str,
            &'a str,
            Version,
            &'a [&'a str],
            Result<(&'a str, Option<&'a str>), ProxyError>,
        );
        let v11 = Version::HTTP_11;
        let v2 = Version::HTTP_2;
        let cases: &[Case<'_>] = &[
            ("GET", "/v1/models", v11, &["a"], Ok(("/v1/models", Some("a")))),
            (
                "GET",
                "/v1/models/../files?x=/../",
                v11,
                &["a"],
                Ok(("/v1/files?x=/../", Some("a"))),
            ),
            (
                "GET",
                "/..",
                v11,
                &["a"],
                Err(ProxyError::BadRequest("the path climbs above /")),
            ),
            (
                "CONNECT",
                "example.com:443",
                v11,
                &["a"],
                Err(ProxyError::MethodNotAllowed),
            ),
            (
                "GET",
                "/",
                v11,
                &["a", "b"],
                Err(ProxyError::BadRequest("more than one Host header")),
            ),
            (
                "GET",
                "http://real.example/v1/x",
                v11,
                &["spoof"],
                Ok(("/v1/x", Some("real.example"))),
            ),
            (
                "GET",
                "http://api.example/v1/x",
                v2,
                &["api.example"],
                Ok(("/v1/x", Some("api.example"))),
            ),
            ("GET", "http://api.example/v1/x", v2, &[], Ok(("/v1/x", None))),
            (
                "GET",
                "http://api.example/v1/x",
                v2,
                &["other.example"],
                Err(ProxyError::BadRequest("host differs from :authority")),
            ),
        ];
        for (method, uri, version, hosts, want) in cases {
            let mut r = req(method, uri, *version, hosts);
            let got = admit(&mut r, None).map(|has_host| {
                let host = r.headers().get("host").map(|h| h.to_str().unwrap().to_string());
                assert_eq!(has_host, host.is_some(), "{method} {uri} {hosts:?}");
                (
                    r.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
                    host,
                )
            });
            let want = want.clone().map(|(p, h)| (p.to_string(), h.map(str::to_string)));
            assert_eq!(got, want, "{method} {uri}");
        }
    }
}
