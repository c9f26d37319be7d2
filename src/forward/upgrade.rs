//! HTTP/1.1 upgrades (WebSocket and friends): telling an upgrade request apart, and once
//! the endpoint answers `101`, bridging the two upgraded connections byte for byte until
//! either side closes.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::header;
use http::{Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

use super::request_fields::{RequestFields, visible};

/// A client connection that can be bridged.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A client connection from Meridian's HTTP/1.1 server after its `101`: the bytes the
/// client sent behind its request are read first.
pub(crate) struct Upgraded {
    leftover: Bytes,
    io: Box<dyn Stream>,
}

impl Upgraded {
    pub(crate) fn new(leftover: Bytes, io: Box<dyn Stream>) -> Upgraded {
        Upgraded { leftover, io }
    }
}

impl AsyncRead for Upgraded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.remaining());
            buf.put_slice(&self.leftover[..n]);
            self.leftover.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The client's side of an upgrade in Meridian's HTTP/1.1 server: the connection, once
/// the `101` is written. In the request's extensions (which need `Clone`), taken once.
#[derive(Clone)]
pub(crate) struct OnClientUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl OnClientUpgrade {
    pub(crate) fn new(rx: oneshot::Receiver<Upgraded>) -> OnClientUpgrade {
        OnClientUpgrade(Arc::new(Mutex::new(Some(rx))))
    }

    fn take(&self) -> Option<oneshot::Receiver<Upgraded>> {
        self.0.lock().ok().and_then(|mut r| r.take())
    }
}

/// The client's side of an upgrade, from whichever server read the request.
pub(crate) enum ClientUpgrade {
    Hyper(OnUpgrade),
    Own(oneshot::Receiver<Upgraded>),
}

impl ClientUpgrade {
    /// The upgrade a request's extensions carry, taken out of them.
    pub(crate) fn take(extensions: &mut http::Extensions) -> Option<ClientUpgrade> {
        if let Some(on) = extensions.remove::<OnUpgrade>() {
            return Some(ClientUpgrade::Hyper(on));
        }
        extensions
            .remove::<OnClientUpgrade>()
            .and_then(|on| on.take())
            .map(ClientUpgrade::Own)
    }

    async fn connection(self) -> Result<Box<dyn Stream>, Box<dyn std::error::Error + Send + Sync>> {
        match self {
            ClientUpgrade::Hyper(on) => Ok(Box::new(TokioIo::new(on.await?))),
            ClientUpgrade::Own(rx) => Ok(Box::new(rx.await?)),
        }
    }
}

/// True when the headers ask to switch protocols: an `Upgrade` header and the `upgrade`
/// token in `Connection`. HTTP/2 forbids both, so this only ever holds for HTTP/1.1.
/// `Upgrade: h2c` is not bridged: it concerns this hop only (and RFC 9113 retired it), so
/// it is stripped like any hop-by-hop header and the request served as HTTP/1.1.
pub(crate) fn is_upgrade(headers: RequestFields<'_>) -> bool {
    headers
        .get_str(&header::UPGRADE)
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("h2c"))
        && headers
            .values(&header::CONNECTION)
            .filter_map(visible)
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Starts the bridge when the endpoint switched protocols; any other answer is returned
/// unchanged (a refused upgrade is an ordinary response). `held` lives as long as the
/// bridged connection: what it holds (an admission's concurrency slots) is released when
/// the session closes, not when the `101` is sent.
pub(crate) fn bridge<B, H: Send + 'static>(
    mut resp: Response<B>,
    client: Option<ClientUpgrade>,
    held: H,
) -> Response<B> {
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
        let (client, upstream) = tokio::join!(client.connection(), upstream);
        let (mut client, upstream) = match (client, upstream) {
            (Ok(client), Ok(upstream)) => (client, upstream),
            (Err(e), _) => {
                tracing::debug!(error = %e, "upgrade failed before bridging");
                return;
            }
            (_, Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed before bridging");
                return;
            }
        };
        let mut upstream = TokioIo::new(upstream);
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(bytes_up = up, bytes_down = down, "upgraded connection closed"),
            Err(e) => tracing::debug!(error = %e, "upgraded connection ended with an error"),
        }
        drop(held);
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

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
            assert_eq!(is_upgrade((&h).into()), want, "{pairs:?}");
        }
    }
}
