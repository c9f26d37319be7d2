//! The send timeout for one HTTP/2 stream: a client that keeps its connection busy (pings,
//! other streams) but holds one stream's window shut is cut off from that stream, and the
//! stream's upstream request is cancelled.
//!
//! hyper does not poll a stream's body while its flow-control window is closed, so a timer
//! inside the body would never run: a task pumps the body into a one-frame channel
//! instead, and gives up when the client has not taken a frame for `send_timeout`.
//! HTTP/1.1 needs none of this: a client that does not read blocks the socket, which
//! `IdleIo` times out.

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

/// What a client connection is sent: the response body itself, or (HTTP/2 streams) its
/// pumped copy.
pub(crate) enum ClientBody {
    Direct(ResponseBody),
    Pumped(Pumped),
}

/// A response body read by a pump task, one frame at a time.
pub(crate) struct Pumped {
    frames: mpsc::Receiver<Frame<Bytes>>,
    /// Set when the pump gave up on the client: the stream ends in an error, not cleanly.
    abandoned: Arc<AtomicBool>,
    timeout: Duration,
    hint: SizeHint,
}

impl ClientBody {
    /// Bodies Meridian wrote itself are whole in memory and need no pump.
    pub(crate) fn with_send_timeout(body: ResponseBody, timeout: Duration) -> ClientBody {
        if matches!(body, ResponseBody::Local(_)) || body.is_end_stream() {
            return ClientBody::Direct(body);
        }
        let (tx, frames) = mpsc::channel(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let hint = body.size_hint();
        let flag = abandoned.clone();
        tokio::spawn(async move {
            let mut body = body;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    flag.store(true, Ordering::Release);
                    return;
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

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::Direct(b) => Pin::new(b).poll_frame(cx),
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
            ClientBody::Direct(b) => b.is_end_stream(),
            ClientBody::Pumped(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Direct(b) => b.size_hint(),
            ClientBody::Pumped(p) => p.hint,
        }
    }
}
