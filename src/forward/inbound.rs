//! Checks on a client's request head before it is routed: method, `Host`, and the path
//! that rules, residency and the endpoint will see (docs/security.md).

use http::header::{self, HeaderValue};
use http::{Method, Uri, Version};

use crate::error::ProxyError;
use crate::forward::head_fields::HeadFields;
use crate::forward::request_fields::RequestFields;
use crate::path::{self, PathError};

/// A client's request head as the proxy reads and rewrites it: its parts, and its fields
/// still listed over the head's bytes.
///
/// HTTP/1.1's parser fills one in a heap block that stays put until the request's handler
/// is done, and the handler borrows it: held by value, the parts (224 bytes) were copied six times on
/// their way from the parser into the request's future, each copy into memory the
/// connection had not touched since its last request (callgrind's cache model: ~20 L1d
/// write misses a request at 50 connections). HTTP/2 keeps it in the stream's block.
#[derive(Debug)]
pub(crate) struct ClientHead {
    pub(crate) parts: http::request::Parts,
    /// `None` when the fields are all in the parts' map: a head of more fields than a list
    /// marks, or an HTTP/2 request.
    pub(crate) listed: Option<HeadFields>,
}

impl ClientHead {
    /// A block for the HTTP/1.1 parser to fill in place: empty parts and an empty list.
    pub(crate) fn for_parser() -> Box<ClientHead> {
        // Written into the block: `Box::new` built the 700 bytes on the stack and copied them.
        Box::write(
            Box::new_uninit(),
            ClientHead {
                parts: http::Request::new(()).into_parts().0,
                listed: Some(HeadFields::new()),
            },
        )
    }
}

/// Admits a request head, rewriting it in place: the path normalised (original query kept),
/// and for HTTP/1.1 an absolute-form authority made the `Host` (RFC 9112 §3.2.2). `Ok`:
/// whether the head now carries a `Host` field (an HTTP/2 request may carry only
/// `:authority`), so the forwarding need not look again.
/// `listed`: the request's fields over its head's bytes, when its server kept them so.
pub(crate) fn admit(req: &mut http::request::Parts, listed: Option<&HeadFields>) -> Result<bool, ProxyError> {
    if req.method == Method::CONNECT {
        // A tunnel would bypass routing and residency altogether.
        return Err(ProxyError::MethodNotAllowed);
    }
    let (mut has_host, host_differs) = {
        let mut hosts = RequestFields::new(listed, &req.headers).values(&header::HOST);
        let first_host = hosts.next();
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest("more than one Host header"));
        }
        let authority = req.uri.authority();
        // The field is judged only when it is the host: an absolute-form target's
        // authority replaces it (RFC 9112 §3.2.2), and `:authority` must match it.
        if authority.is_none() && first_host.is_some_and(|h| !is_host(h)) {
            return Err(ProxyError::BadRequest("invalid Host header"));
        }
        let differs =
            authority.is_some_and(|a| first_host.is_some_and(|h| !h.eq_ignore_ascii_case(a.as_str().as_bytes())));
        (first_host.is_some(), differs)
    };
    if let Some(authority) = req.uri.authority() {
        // Userinfo above all: it would reach the endpoint as its `Host` (RFC 9110 §4.2.4
        // deprecates it in http(s) URIs; RFC 9113 §8.3.1 forbids it in `:authority`).
        if !is_host(authority.as_str().as_bytes()) {
            return Err(ProxyError::BadRequest("invalid authority in the request target"));
        }
        match req.version {
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
                req.headers.insert(header::HOST, host);
                has_host = true;
            }
        }
    }
    if let Some(uri) = normalised_uri(&req.uri)? {
        req.uri = uri;
    }
    Ok(has_host)
}

/// Whether `v` is a `Host` value (RFC 9110 §7.2): `uri-host [":" port]`, the host a
/// non-empty reg-name, an IPv4 address or a bracketed IP literal, the port digits up to
/// 65535; no userinfo, no whitespace, no `/`, `?`, `#` or `@`. One pass over the bytes (a
/// few dozen, per request).
pub(crate) fn is_host(v: &[u8]) -> bool {
    let port = if let Some(literal) = v.strip_prefix(b"[") {
        let Some(close) = memchr::memchr(b']', literal) else {
            return false;
        };
        if !is_ip_literal(&literal[..close]) {
            return false;
        }
        match &literal[close + 1..] {
            [] => return true,
            [b':', port @ ..] => port,
            _ => return false,
        }
    } else {
        // An IPv4 address is a reg-name too. The run of plain name bytes first, in a tight
        // loop (this runs for every request); percent-encodings and the port after it.
        let mut i = v
            .iter()
            .position(|&b| !matches!(REG_NAME[usize::from(b)], Byte::Name))
            .unwrap_or(v.len());
        while let Some(&b) = v.get(i) {
            match REG_NAME[usize::from(b)] {
                Byte::Name => i += 1,
                Byte::Percent if v.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => i += 3,
                Byte::Colon => break,
                Byte::Percent | Byte::Other => return false,
            }
        }
        // An `http(s)` URI's host is never empty (RFC 9110 §4.2.1: reject it), nor is
        // what a `Host` stands in for: `Host:` and `Host: :80` are refused, as NGINX does.
        if i == 0 {
            return false;
        }
        v.get(i + 1..).unwrap_or_default()
    };
    // Digits, and a port that exists (an empty one means the scheme's default).
    port.len() <= 5 && port.iter().all(u8::is_ascii_digit) && (port.len() < 5 || port <= b"65535".as_slice())
}

/// What a byte may be in a reg-name (RFC 3986 §3.2.2): unreserved or a sub-delim, the start
/// of a percent-encoding, the colon before the port, or nothing allowed.
#[derive(Clone, Copy)]
enum Byte {
    Name,
    Percent,
    Colon,
    Other,
}

const REG_NAME: [Byte; 256] = {
    let mut table = [Byte::Other; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'='
            )
        {
            table[b] = Byte::Name;
        }
        b += 1;
    }
    table[b'%' as usize] = Byte::Percent;
    table[b':' as usize] = Byte::Colon;
    table
};

/// The inside of `[...]`: an IPv6 address, or IPvFuture (`v` HEXDIG+ `.` then unreserved,
/// sub-delims or `:`).
fn is_ip_literal(v: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = v {
        let digits = rest.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        return match rest.get(digits..) {
            Some([b'.', tail @ ..]) if digits > 0 && !tail.is_empty() => tail
                .iter()
                .all(|&b| b == b':' || matches!(REG_NAME[usize::from(b)], Byte::Name)),
            _ => false,
        };
    }
    std::str::from_utf8(v).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
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
    use http::Request;

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
            ("GET", "/", v11, &["[::1]:8080"], Ok(("/", Some("[::1]:8080")))),
            (
                "GET",
                "/",
                v11,
                &["a b"],
                Err(ProxyError::BadRequest("invalid Host header")),
            ),
            (
                "GET",
                "/",
                v11,
                &["a/b?c"],
                Err(ProxyError::BadRequest("invalid Host header")),
            ),
            (
                "GET",
                "/",
                v11,
                &["user@evil.example"],
                Err(ProxyError::BadRequest("invalid Host header")),
            ),
            (
                "GET",
                "/",
                v2,
                &["a b"],
                Err(ProxyError::BadRequest("invalid Host header")),
            ),
            // An absolute-form target's authority replaces the field, whatever it holds.
            (
                "GET",
                "http://real.example/x",
                v11,
                &["a b"],
                Ok(("/x", Some("real.example"))),
            ),
            (
                "GET",
                "http://alice:secret@foo.example/echo",
                v11,
                &[],
                Err(ProxyError::BadRequest("invalid authority in the request target")),
            ),
            (
                "GET",
                "http://alice@api.example/v1/x",
                v2,
                &[],
                Err(ProxyError::BadRequest("invalid authority in the request target")),
            ),
            (
                "GET",
                "http://api.example/v1/x",
                v2,
                &["other.example"],
                Err(ProxyError::BadRequest("host differs from :authority")),
            ),
        ];
        for (method, uri, version, hosts, want) in cases {
            let (mut r, ()) = req(method, uri, *version, hosts).into_parts();
            let got = admit(&mut r, None).map(|has_host| {
                let host = r.headers.get("host").map(|h| h.to_str().unwrap().to_string());
                assert_eq!(has_host, host.is_some(), "{method} {uri} {hosts:?}");
                (r.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(), host)
            });
            let want = want.clone().map(|(p, h)| (p.to_string(), h.map(str::to_string)));
            assert_eq!(got, want, "{method} {uri}");
        }
    }

    #[test]
    fn host_values_follow_the_authority_syntax() {
        let cases: &[(&str, bool)] = &[
            ("api.example.com", true),
            ("api.example.com:8080", true),
            ("127.0.0.1:18081", true),
            ("localhost", true),
            ("xn--bcher-kva.example", true),
            ("a%2Db", true),
            ("a_b~c!$&'()*+,;=", true),
            ("a:", true),
            ("a:65535", true),
            ("a:00080", true),
            ("", false),
            (":80", false),
            (":", false),
            ("a:65536", false),
            ("a:99999", false),
            ("a:123456", false),
            ("[::1]:70000", false),
            ("[::1]", true),
            ("[2001:db8::1]:443", true),
            ("[v1.fe80::a+en1]", true),
            ("a b", false),
            ("a\tb", false),
            ("a/b?c", false),
            ("a#b", false),
            ("a?b", false),
            ("user@evil.example", false),
            ("alice:secret@foo.example", false),
            ("a:b", false),
            ("a:80:80", false),
            ("a:8o", false),
            ("a%2", false),
            ("a%zz", false),
            ("a\"b", false),
            ("é.example", false),
            ("[::1", false),
            ("[::g]", false),
            ("[::1]x", false),
            ("[::1]:x", false),
            ("[v1.]", false),
            ("[vz.a]", false),
            ("::1", false),
        ];
        for (value, want) in cases {
            assert_eq!(is_host(value.as_bytes()), *want, "{value:?}");
        }
    }
}
