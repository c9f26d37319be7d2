//! HTTP/1.1 upgrades (WebSocket and friends): telling an upgrade request apart, and once
//! the endpoint answers `101`, bridging the two upgraded connections byte for byte until
//! either side closes.

use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// True when the headers ask to switch protocols: an `Upgrade` header and the `upgrade`
/// token in `Connection`. HTTP/2 forbids both, so this only ever holds for HTTP/1.1.
/// `Upgrade: h2c` is not bridged: it concerns this hop only (and RFC 9113 retired it), so
/// it is stripped like any hop-by-hop header and the request served as HTTP/1.1.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("h2c"))
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Starts the bridge when the endpoint switched protocols; any other answer is returned
/// unchanged (a refused upgrade is an ordinary response).
pub(crate) fn bridge<B>(mut resp: Response<B>, client: Option<OnUpgrade>) -> Response<B> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return resp;
    }
    let Some(client) = client else {
        // Only reachable if an endpoint sends 101 to a request that did not ask for it;
        // the client connection cannot switch, so hyper closes it after this response.
        tracing::warn!("endpoint switched protocols without an upgrade request");
        return resp;
    };
    // The endpoint's upgraded connection travels in the response extensions from the
    // pooled client through the relay.
    let upstream = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed before bridging");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(bytes_up = up, bytes_down = down, "upgraded connection closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_need_both_headers() {
        let cases: [(&[(&str, &str)], bool); 7] = [
            (&[("connection", "Upgrade"), ("upgrade", "websocket")], true),
            (&[("connection", "keep-alive, upgrade"), ("upgrade", "websocket")], true),
            (
                &[
                    ("connection", "keep-alive"),
                    ("connection", "UPGRADE"),
                    ("upgrade", "x"),
                ],
                true,
            ),
            (&[("upgrade", "websocket")], false),
            (&[("connection", "upgrade")], false),
            (&[("connection", "upgrades"), ("upgrade", "websocket")], false),
            (&[("connection", "Upgrade, HTTP2-Settings"), ("upgrade", "h2c")], false),
        ];
        for (pairs, want) in cases {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(http::HeaderName::from_static(k), http::HeaderValue::from_static(v));
            }
            assert_eq!(is_upgrade(&h), want, "{pairs:?}");
        }
    }
}
