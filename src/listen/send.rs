//! The send timeout for one HTTP/2 stream: a client that keeps its connection busy (pings,
//! other streams) but holds one stream's window shut is cut off from that stream, and the
//! stream's upstream request is cancelled.
//!
//! hyper does not poll a stream's body while its flow-control window is closed, so a timer
//! inside the body would never run: a task pumps the body into a one-frame channel
//! instead, and gives up when the client has not taken a frame for `send_timeout`.
//! HTTP/1.1 needs none of this: a client that does not read blocks the socket, which
//! `IdleIo` times out.
//!
//! Most answers need no pump: a body whose every byte came in with the head (an endpoint's
//! sized answer read in one go, an error Meridian wrote) is finished upstream before the
//! head goes out, so a client that never opens its window holds no endpoint, only those
//! bytes, as HTTP/2's own send buffer would. The pump (a task, a channel, a wake-up a
//! frame: ~7,000 instructions a request, a seventh of an h2c request's cost) is for the
//! bodies still coming.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::forward::body::{BodyError, ResponseBody};

/// What an HTTP/2 stream is sent: the response body, all of it already in hand, or its
/// pumped copy.
pub(crate) enum ClientBody {
    /// The whole body, read before the head was sent: its one frame (or the error that
    /// ended it), then nothing.
    Held(Option<Result<Frame<Bytes>, BodyError>>),
    Pumped(Pumped),
}

/// A body's poll: a frame, its error, its end, or nothing yet.
pub(crate) type Polled = Poll<Option<Result<Frame<Bytes>, BodyError>>>;

/// A response body read by a pump task, one frame at a time.
pub(crate) struct Pumped {
    frames: mpsc::Receiver<Frame<Bytes>>,
    /// Set when the pump gave up on the client: the stream ends in an error, not cleanly.
    abandoned: Arc<AtomicBool>,
    timeout: Duration,
    hint: SizeHint,
}

impl ClientBody {
    /// The body an HTTP/2 stream is sent, given what of it was `ready` when its head was
    /// (polled once in the stream's task): all of it, or a pump for the rest.
    pub(crate) fn with_send_timeout(body: ResponseBody, ready: Polled, timeout: Duration) -> ClientBody {
        let first = match ready {
            Poll::Ready(None) => return ClientBody::Held(None),
            Poll::Ready(Some(Err(e))) => return ClientBody::Held(Some(Err(e))),
            // The last frame: the endpoint's part is over (its connection is back in the
            // pool and the request logged), whatever the client does with its window.
            Poll::Ready(Some(Ok(frame))) if body.is_end_stream() => return ClientBody::Held(Some(Ok(frame))),
            Poll::Ready(Some(Ok(frame))) => Some(frame),
            Poll::Pending => None,
        };
        // The whole body's size, as hyper writes it into a `content-length` the head lacks:
        // what is left plus the frame in hand.
        let hint = with_first(
            body.size_hint(),
            first.as_ref().and_then(Frame::data_ref).map_or(0, Bytes::len),
        );
        let (tx, frames) = mpsc::channel(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let flag = abandoned.clone();
        tokio::spawn(async move {
            let mut body = body;
            let mut first = first;
            loop {
                let frame = match first.take() {
                    Some(frame) => frame,
                    None => match body.frame().await {
                        Some(Ok(frame)) => frame,
                        Some(Err(_)) => {
                            flag.store(true, Ordering::Release);
                            return;
                        }
                        None => return,
                    },
                };
                match tokio::time::timeout(timeout, tx.send(frame)).await {
                    Ok(Ok(())) => {}
                    // The client reset the stream: dropping `body` cancels the upstream.
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::debug!(?timeout, "client took no response bytes; stream cut");
                        flag.store(true, Ordering::Release);
                        return;
                    }
                }
            }
        });
        ClientBody::Pumped(Pumped {
            frames,
            abandoned,
            timeout,
            hint,
        })
    }
}

/// `rest` with `first` more bytes.
fn with_first(rest: SizeHint, first: usize) -> SizeHint {
    let first = first as u64;
    let mut hint = SizeHint::new();
    hint.set_lower(rest.lower().saturating_add(first));
    if let Some(upper) = rest.upper() {
        hint.set_upper(upper.saturating_add(first));
    }
    hint
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Held(last) => Poll::Ready(last.take()),
            ClientBody::Pumped(p) => match p.frames.poll_recv(cx) {
                Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) if p.abandoned.load(Ordering::Acquire) => {
                    Poll::Ready(Some(Err(BodyError::SendTimeout(p.timeout))))
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Held(last) => last.is_none(),
            ClientBody::Pumped(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Held(Some(Ok(frame))) => SizeHint::with_exact(frame.data_ref().map_or(0, |d| d.len() as u64)),
            ClientBody::Held(Some(Err(_))) => SizeHint::default(),
            ClientBody::Held(None) => SizeHint::with_exact(0),
            ClientBody::Pumped(p) => p.hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collected(body: ClientBody) -> (Vec<u8>, Option<BodyError>) {
        let mut body = body;
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => bytes.extend_from_slice(frame.data_ref().map_or(&[][..], |d| &d[..])),
                Err(e) => return (bytes, Some(e)),
            }
        }
        (bytes, None)
    }

    fn local(bytes: &'static str) -> ResponseBody {
        ResponseBody::Local(Some(Bytes::from_static(bytes.as_bytes())))
    }

    fn data(bytes: &'static str) -> Polled {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(bytes.as_bytes())))))
    }

    /// (what was ready with the head, the body left, held without a pump?, bytes, error?)
    #[tokio::test]
    async fn whole_bodies_are_held_and_the_rest_pumped_in_order() {
        let cases: [(Polled, ResponseBody, bool, &str, bool); 5] = [
            // The last frame came with the head: held, its length exact.
            (data("hello"), ResponseBody::Local(None), true, "hello", false),
            (Poll::Ready(None), ResponseBody::Local(None), true, "", false),
            (
                Poll::Ready(Some(Err(BodyError::Stalled(Duration::from_secs(1))))),
                ResponseBody::Local(None),
                true,
                "",
                true,
            ),
            // More to come: the frame in hand first, then the body's.
            (data("first "), local("second"), false, "first second", false),
            (Poll::Pending, local("all later"), false, "all later", false),
        ];
        for (ready, body, held, bytes, failed) in cases {
            let body = ClientBody::with_send_timeout(body, ready, Duration::from_secs(5));
            assert_eq!(matches!(body, ClientBody::Held(_)), held, "{bytes:?}");
            if !failed {
                // The whole body's size, the frame read ahead included.
                assert_eq!(body.size_hint().exact(), Some(bytes.len() as u64), "{bytes:?}");
            }
            let (got, error) = collected(body).await;
            assert_eq!(got, bytes.as_bytes());
            assert_eq!(error.is_some(), failed, "{bytes:?}: {error:?}");
        }
    }
}
