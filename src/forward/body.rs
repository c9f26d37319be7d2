//! Bodies in flight: request bodies kept for replay or streamed under a size limit, and
//! response bodies streamed frame by frame with a stall watchdog and a completion hook.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};

/// Bodies up to this size are kept so a failed attempt can be replayed elsewhere.
pub const REPLAY_LIMIT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the limit")]
    TooLarge,
    #[error("client body: {0}")]
    Client(#[source] hyper::Error),
    #[error("upstream body: {0}")]
    Upstream(#[source] hyper::Error),
    #[error("upstream stalled for {0:?}")]
    Stalled(Duration),
}

/// A request body on its way to an endpoint.
#[derive(Debug)]
pub enum RequestBody {
    Empty,
    /// Fully read and kept: can be sent again.
    Kept(Kept),
    Streaming(StreamingBody),
}

/// A body read to its end: the bytes and any trailers, replayable.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

/// A body streamed from the client, with the bytes already read in front.
#[derive(Debug)]
pub struct StreamingBody {
    prefix: Option<Bytes>,
    inner: Incoming,
    seen: u64,
    limit: u64,
    overflow: Arc<AtomicBool>,
}

impl RequestBody {
    /// A copy for another attempt; `None` when the body was streamed and is gone.
    pub fn replay(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Empty => Some(RequestBody::Empty),
            RequestBody::Kept(k) => Some(RequestBody::Kept(k.clone())),
            RequestBody::Streaming(_) => None,
        }
    }

    /// The bytes of a body kept whole for replay (affinity may read a JSON field from them).
    pub fn kept(&self) -> Option<&[u8]> {
        match self {
            RequestBody::Kept(k) => k.data.as_deref(),
            RequestBody::Empty | RequestBody::Streaming(_) => None,
        }
    }

    pub fn len_hint(&self) -> u64 {
        match self {
            RequestBody::Empty => 0,
            RequestBody::Kept(k) => k.data.as_ref().map_or(0, |b| b.len() as u64),
            RequestBody::Streaming(s) => s.seen,
        }
    }
}

/// Reads the start of a client body: keeps it whole when it ends within [`REPLAY_LIMIT`],
/// otherwise returns a streaming body that fails once `limit` bytes are passed. `overflow`
/// is set when the limit trips mid-stream, so the caller can answer 413.
pub async fn prepare(
    mut body: Incoming,
    declared: Option<u64>,
    limit: u64,
    overflow: Arc<AtomicBool>,
) -> Result<RequestBody, BodyError> {
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    if body.is_end_stream() {
        return Ok(RequestBody::Empty);
    }
    if declared.is_some_and(|n| n > REPLAY_LIMIT) {
        return Ok(RequestBody::Streaming(StreamingBody {
            prefix: None,
            inner: body,
            seen: 0,
            limit,
            overflow,
        }));
    }
    let mut kept = BytesMut::new();
    let mut trailers = None;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => return Err(BodyError::Client(e)),
            Some(Ok(frame)) => {
                let data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        // Trailers end the body; keep them for every attempt.
                        trailers = frame.into_trailers().ok();
                        continue;
                    }
                };
                kept.extend_from_slice(&data);
                if kept.len() as u64 > limit {
                    linger(&mut body).await;
                    return Err(BodyError::TooLarge);
                }
                if kept.len() as u64 > REPLAY_LIMIT {
                    let seen = kept.len() as u64;
                    return Ok(RequestBody::Streaming(StreamingBody {
                        prefix: Some(kept.freeze()),
                        inner: body,
                        seen,
                        limit,
                        overflow,
                    }));
                }
            }
        }
    }
    Ok(RequestBody::Kept(Kept {
        data: (!kept.is_empty()).then(|| kept.freeze()),
        trailers,
    }))
}

/// How much of a refused body is read and thrown away, and for how long, before the 413.
const LINGER_BYTES: u64 = 1 << 20;
const LINGER_TIME: Duration = Duration::from_millis(250);

/// Reads and discards the rest of a refused body for a short while (NGINX's lingering
/// close): a client still sending when the connection closes would get a reset and could
/// lose the 413 that explains why.
async fn linger(body: &mut Incoming) {
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut drained = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            drained += frame.data_ref().map_or(0, |d| d.len() as u64);
            if drained > LINGER_BYTES {
                break;
            }
        }
    })
    .await;
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Kept(k) => match (k.data.take(), k.trailers.take()) {
                (Some(data), trailers) => {
                    k.trailers = trailers;
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                (None, Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                (None, None) => Poll::Ready(None),
            },
            RequestBody::Streaming(s) => {
                if let Some(prefix) = s.prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                match ready!(Pin::new(&mut s.inner).poll_frame(cx)) {
                    None => Poll::Ready(None),
                    Some(Err(e)) => Poll::Ready(Some(Err(BodyError::Client(e)))),
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            s.seen += data.len() as u64;
                            if s.seen > s.limit {
                                s.overflow.store(true, Ordering::Release);
                                return Poll::Ready(Some(Err(BodyError::TooLarge)));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Kept(k) => k.data.is_none() && k.trailers.is_none(),
            RequestBody::Streaming(s) => s.prefix.is_none() && s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Kept(k) => SizeHint::with_exact(k.data.as_ref().map_or(0, |b| b.len() as u64)),
            RequestBody::Streaming(s) => {
                let mut hint = s.inner.size_hint();
                let prefix = s.prefix.as_ref().map_or(0, |p| p.len() as u64);
                hint.set_lower(hint.lower() + prefix);
                if let Some(upper) = hint.upper() {
                    hint.set_upper(upper + prefix);
                }
                hint
            }
        }
    }
}

/// How a streamed response ended, for the completion hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    Complete,
    Stalled,
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
}

/// Called once when a response body is finished or dropped.
pub trait Completion: Send + 'static {
    fn complete(self: Box<Self>, end: StreamEnd, bytes: u64);
}

/// A response body relayed from an endpoint frame by frame, never buffered.
pub struct UpstreamBody {
    inner: Incoming,
    stall: Pin<Box<Sleep>>,
    stall_timeout: Duration,
    sse: bool,
    bytes: u64,
    finished: bool,
    completion: Option<Box<dyn Completion>>,
}

impl UpstreamBody {
    pub fn new(inner: Incoming, stall_timeout: Duration, sse: bool, completion: Box<dyn Completion>) -> UpstreamBody {
        UpstreamBody {
            inner,
            stall: Box::pin(tokio::time::sleep(stall_timeout)),
            stall_timeout,
            sse,
            bytes: 0,
            finished: false,
            completion: Some(completion),
        }
    }

    /// Wraps the completion hook, for state that must live exactly as long as the body
    /// (an admission's concurrency slot). A finished body has no hook left to wrap.
    pub fn wrap_completion(&mut self, wrap: impl FnOnce(Box<dyn Completion>) -> Box<dyn Completion>) {
        if let Some(c) = self.completion.take() {
            self.completion = Some(wrap(c));
        }
    }

    fn finish(&mut self, end: StreamEnd) {
        self.finished = true;
        if let Some(c) = self.completion.take() {
            c.complete(end, self.bytes);
        }
    }

    /// A stream that breaks after its first byte cannot be retried; SSE clients get a last
    /// event saying why, so they can tell a cut from a finished answer.
    fn fail(&mut self, end: StreamEnd, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.finish(end);
        if self.sse {
            let reason = match end {
                StreamEnd::Stalled => "upstream_stalled",
                _ => "upstream_stream_error",
            };
            let event = format!("event: error\ndata: {{\"error\":\"{reason}\",\"message\":\"{error}\"}}\n\n");
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
        } else {
            Poll::Ready(Some(Err(error)))
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.finish(StreamEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    // A sized body may not be polled again once its last byte is out.
                    this.finish(StreamEnd::Complete);
                } else {
                    let deadline = Instant::now() + this.stall_timeout;
                    this.stall.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(StreamEnd::UpstreamError, BodyError::Upstream(e)),
            Poll::Pending => match this.stall.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let timeout = this.stall_timeout;
                    this.fail(StreamEnd::Stalled, BodyError::Stalled(timeout))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(StreamEnd::ClientGone);
        }
    }
}

/// What the client receives: relayed from an endpoint, or written by Meridian itself.
pub enum ResponseBody {
    Upstream(UpstreamBody),
    Local(Option<Bytes>),
}

impl From<Bytes> for ResponseBody {
    fn from(b: Bytes) -> Self {
        ResponseBody::Local(Some(b))
    }
}

impl ResponseBody {
    pub fn empty() -> ResponseBody {
        ResponseBody::Local(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Upstream(u) => Pin::new(u).poll_frame(cx),
            ResponseBody::Local(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(u) => u.is_end_stream(),
            ResponseBody::Local(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(u) => u.size_hint(),
            ResponseBody::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

/// True for `text/event-stream` responses.
pub fn is_sse(headers: &HeaderMap) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        // Compared in place: this runs on every response, so no lowercased copy.
        const SSE: &[u8] = b"text/event-stream";
        let v = v.as_bytes().trim_ascii_start();
        v.len() >= SSE.len() && v[..SSE.len()].eq_ignore_ascii_case(SSE)
    })
}

#[cfg(test)]
mod kept_tests {
    use super::*;

    #[tokio::test]
    async fn kept_bodies_replay_data_then_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", http::HeaderValue::from_static("1S"));
        let body = RequestBody::Kept(Kept {
            data: Some(Bytes::from_static(b"hello")),
            trailers: Some(trailers),
        });
        for attempt in [body.replay().unwrap(), body.replay().unwrap()] {
            assert_eq!(attempt.len_hint(), 5);
            let collected = attempt.collect().await.unwrap();
            assert_eq!(collected.trailers().unwrap()["grpc-timeout"], "1S");
            assert_eq!(collected.to_bytes(), "hello");
        }
        let empty = RequestBody::Kept(Kept::default());
        assert!(empty.is_end_stream());
    }
}
