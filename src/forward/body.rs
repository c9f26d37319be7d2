//! Bodies in flight: request bodies kept for replay or streamed under a size limit, and
//! response bodies streamed frame by frame with a stall watchdog and a completion hook.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::client_body::{ClientBody, ClientBodyError};
use super::endpoint_fields::EndpointFields;
use super::usage::{Scanned, UsageScanner};
use crate::clock;

pub use super::h1::{H1Body, H1BodyError};

/// Bodies up to this size are kept so a failed attempt can be replayed elsewhere.
pub(crate) const REPLAY_LIMIT: u64 = 1 << 20;

/// Why a request or response body could not be relayed to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The request body passed `server.max_request_body` (answered 413).
    #[error("request body exceeds the limit")]
    TooLarge,
    /// Reading the client's request body failed (the client reset or broke the connection).
    #[error("client body: {0}")]
    Client(#[source] ClientBodyError),
    /// Reading the endpoint's response body failed mid-way.
    #[error("upstream body: {0}")]
    Upstream(#[source] EndpointBodyError),
    /// The endpoint sent no body bytes for `server.stall_timeout`; counts against it.
    #[error("upstream stalled for {0:?}")]
    Stalled(Duration),
    /// The client sent no body bytes for `server.body_timeout`: its fault, not the endpoint's.
    #[error("client sent no body bytes for {0:?}")]
    ClientStalled(Duration),
    /// The client took no response bytes for `server.send_timeout`.
    #[error("client took no response bytes for {0:?}")]
    SendTimeout(Duration),
}

/// Tells the attempt how a streamed request body is getting on, so `request_timeout`
/// counts the endpoint's time only, never the client's upload: it runs once the body has
/// been sent, and while the endpoint is not taking the bytes the client did send.
#[derive(Debug, Clone)]
pub(crate) struct BodySent(Arc<SentState>);

#[derive(Debug)]
struct SentState {
    done: AtomicBool,
    notify: Notify,
    epoch: Instant,
    /// When the last piece was handed over (nanoseconds after `epoch`).
    handed: AtomicU64,
    /// The sender asked for more and the client has not sent it yet.
    waiting_on_client: AtomicBool,
}

impl Default for BodySent {
    fn default() -> Self {
        BodySent(Arc::new(SentState {
            done: AtomicBool::new(false),
            notify: Notify::new(),
            epoch: Instant::now(),
            handed: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
        }))
    }
}

impl BodySent {
    fn mark(&self) {
        self.0.done.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    fn on_pending(&self) {
        self.0.waiting_on_client.store(true, Ordering::Release);
    }

    fn on_handed(&self) {
        let nanos = u64::try_from(self.0.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.0.handed.store(nanos, Ordering::Release);
        self.0.waiting_on_client.store(false, Ordering::Release);
    }

    fn is_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }

    /// When the endpoint has run out of time to take the last piece handed to it; `None`
    /// while the client owes the next one.
    fn endpoint_due(&self, timeout: Duration) -> Option<Instant> {
        if self.0.waiting_on_client.load(Ordering::Acquire) {
            return None;
        }
        Some(self.0.epoch + Duration::from_nanos(self.0.handed.load(Ordering::Acquire)) + timeout)
    }

    /// Resolves once the body is sent.
    pub(crate) async fn wait(&self) {
        loop {
            // Registered before the check: a `mark` in between is not missed.
            let notified = self.0.notify.notified();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }

    /// Resolves when the endpoint has used up `timeout`: after the body was sent, or with
    /// the body half sent because the endpoint stopped taking it.
    pub(crate) async fn endpoint_deadline(&self, timeout: Duration) {
        loop {
            if self.is_done() {
                tokio::time::sleep(timeout).await;
                return;
            }
            let due = self.endpoint_due(timeout).unwrap_or_else(|| Instant::now() + timeout);
            tokio::select! {
                () = self.wait() => {}
                () = tokio::time::sleep_until(due) => {
                    if !self.is_done() && self.endpoint_due(timeout).is_some_and(|d| d <= Instant::now()) {
                        return;
                    }
                }
            }
        }
    }
}

/// A request body on its way to an endpoint.
#[derive(Debug)]
pub enum RequestBody {
    /// No body: the request ended with its head.
    Empty,
    /// Fully read and kept: can be sent again.
    Kept(Kept),
    /// Boxed, as the kept trailers are: hyper's client channel to each upstream connection
    /// holds 32 requests' worth of slots (tokio's mpsc block), so every byte of this enum
    /// costs 32 per connection.
    Streaming(Box<StreamingBody>),
}

/// A body read to its end: the bytes and any trailers, replayable.
#[derive(Debug, Clone, Default)]
pub struct Kept {
    data: Option<Bytes>,
    trailers: Option<Box<HeaderMap>>,
}

impl RequestBody {
    /// A body Meridian writes itself (span exports), kept so it could be resent.
    pub fn bytes(data: Bytes) -> RequestBody {
        RequestBody::Kept(Kept {
            data: Some(data),
            trailers: None,
        })
    }
}

/// A body streamed from the client, with the bytes already read in front.
#[derive(Debug)]
pub struct StreamingBody {
    prefix: Option<Bytes>,
    inner: ClientBody,
    seen: u64,
    limit: u64,
    overflow: Arc<AtomicBool>,
    /// Longest wait for the client's next body bytes.
    read_timeout: Duration,
    read_deadline: Pin<Box<Sleep>>,
    sent: BodySent,
}

impl StreamingBody {
    fn new(
        prefix: Option<Bytes>,
        inner: ClientBody,
        limit: u64,
        overflow: Arc<AtomicBool>,
        read_timeout: Duration,
    ) -> Self {
        StreamingBody {
            seen: prefix.as_ref().map_or(0, |p| p.len() as u64),
            prefix,
            inner,
            limit,
            overflow,
            read_timeout,
            read_deadline: Box::pin(tokio::time::sleep(read_timeout)),
            sent: BodySent::default(),
        }
    }
}

impl Drop for StreamingBody {
    fn drop(&mut self) {
        self.sent.mark();
    }
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

    /// The whole body when it is known whole and has no trailers (none, or kept): what
    /// Meridian's own HTTP/1.1 exchange sends in one write.
    pub(crate) fn whole(&self) -> Option<Bytes> {
        match self {
            RequestBody::Empty => Some(Bytes::new()),
            RequestBody::Kept(Kept { data, trailers: None }) => Some(data.clone().unwrap_or_default()),
            RequestBody::Kept(_) | RequestBody::Streaming(_) => None,
        }
    }

    /// For a streamed body, the signal that it has been sent to its end.
    pub(crate) fn sent_signal(&self) -> Option<BodySent> {
        match self {
            RequestBody::Streaming(s) => Some(s.sent.clone()),
            RequestBody::Empty | RequestBody::Kept(_) => None,
        }
    }

    pub(crate) fn len_hint(&self) -> u64 {
        match self {
            RequestBody::Empty => 0,
            RequestBody::Kept(k) => k.data.as_ref().map_or(0, |b| b.len() as u64),
            RequestBody::Streaming(s) => s.seen,
        }
    }
}

/// Reads the start of a client body: keeps it whole when it ends within [`REPLAY_LIMIT`],
/// otherwise returns a streaming body that fails once `limit` bytes are passed, with a flag
/// set when the limit trips mid-stream, so the caller can answer 413 (a body kept whole has
/// none: it cannot trip). A client that sends nothing for `read_timeout` between two reads
/// gets [`BodyError::ClientStalled`].
pub(crate) async fn prepare(
    mut body: ClientBody,
    declared: Option<u64>,
    limit: u64,
    read_timeout: Duration,
) -> Result<(RequestBody, Option<Arc<AtomicBool>>), BodyError> {
    let streaming = |prefix, body| {
        let overflow = Arc::new(AtomicBool::new(false));
        let streamed = StreamingBody::new(prefix, body, limit, overflow.clone(), read_timeout);
        (RequestBody::Streaming(Box::new(streamed)), Some(overflow))
    };
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    if body.is_end_stream() {
        return Ok((RequestBody::Empty, None));
    }
    if declared.is_some_and(|n| n > REPLAY_LIMIT) {
        return Ok(streaming(None, body));
    }
    let mut kept = BytesMut::new();
    let mut trailers = None;
    loop {
        let next = tokio::time::timeout(read_timeout, body.frame())
            .await
            .map_err(|_| BodyError::ClientStalled(read_timeout))?;
        match next {
            None => break,
            Some(Err(e)) => return Err(BodyError::Client(e)),
            Some(Ok(frame)) => {
                let data = match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        // Trailers end the body; keep them for every attempt.
                        trailers = frame.into_trailers().ok().map(Box::new);
                        continue;
                    }
                };
                kept.extend_from_slice(&data);
                if kept.len() as u64 > limit {
                    linger(&mut body).await;
                    return Err(BodyError::TooLarge);
                }
                if kept.len() as u64 > REPLAY_LIMIT {
                    return Ok(streaming(Some(kept.freeze()), body));
                }
            }
        }
    }
    let kept = RequestBody::Kept(Kept {
        data: (!kept.is_empty()).then(|| kept.freeze()),
        trailers,
    });
    Ok((kept, None))
}

/// How much of a refused body is read and thrown away, and for how long, before the 413.
const LINGER_BYTES: u64 = 1 << 20;
const LINGER_TIME: Duration = Duration::from_millis(250);

/// Reads and discards the rest of a refused body for a short while (NGINX's lingering
/// close): a client still sending when the connection closes would get a reset and could
/// lose the 413 that explains why.
async fn linger(body: &mut ClientBody) {
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
                (None, Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(*trailers)))),
                (None, None) => Poll::Ready(None),
            },
            RequestBody::Streaming(s) => {
                if let Some(prefix) = s.prefix.take() {
                    s.sent.on_handed();
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                let polled = match Pin::new(&mut s.inner).poll_frame(cx) {
                    Poll::Ready(p) => p,
                    Poll::Pending => {
                        if s.read_deadline.as_mut().poll(cx).is_ready() {
                            s.sent.mark();
                            return Poll::Ready(Some(Err(BodyError::ClientStalled(s.read_timeout))));
                        }
                        s.sent.on_pending();
                        return Poll::Pending;
                    }
                };
                match polled {
                    None => {
                        s.sent.mark();
                        Poll::Ready(None)
                    }
                    Some(Err(e)) => {
                        s.sent.mark();
                        Poll::Ready(Some(Err(BodyError::Client(e))))
                    }
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref() {
                            s.seen += data.len() as u64;
                            if s.seen > s.limit {
                                s.overflow.store(true, Ordering::Release);
                                s.sent.mark();
                                return Poll::Ready(Some(Err(BodyError::TooLarge)));
                            }
                        }
                        s.sent.on_handed();
                        if s.inner.is_end_stream() {
                            s.sent.mark();
                        } else {
                            let next = Instant::from(clock::coarse()) + s.read_timeout;
                            s.read_deadline.as_mut().reset(next);
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
            // Trailers need chunked framing on HTTP/1.1: an exact length would make the
            // client send `content-length` and drop them.
            RequestBody::Kept(k) => {
                let len = k.data.as_ref().map_or(0, |b| b.len() as u64);
                if k.trailers.is_some() {
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
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
    /// The endpoint's body reached its end.
    Complete,
    /// The endpoint sent nothing for `server.stall_timeout`; the stream was cut.
    Stalled,
    /// Reading from the endpoint failed mid-way (reset, protocol error).
    UpstreamError,
    /// The client went away before the end.
    ClientGone,
}

/// Called once when a response body is finished or dropped, with what the body said
/// about itself (first-chunk time, token counts).
pub trait Completion: Send + 'static {
    /// Reports how the body ended, its size in bytes and what the usage scanner read.
    fn complete(self: Box<Self>, end: StreamEnd, bytes: u64, scanned: Scanned);
}

/// An endpoint's response body as it comes off the connection: read by Meridian's own
/// HTTP/1.1 code, or by hyper's client (HTTP/2, and HTTP/1.1 exchanges with a streamed body
/// or an upgrade).
pub enum EndpointBody {
    /// Read straight off the connection (`forward::h1`).
    Own(H1Body),
    /// Read by hyper's client.
    Hyper(Incoming),
}

impl EndpointBody {
    /// The response's fields when they are still the head's bytes (Meridian's own HTTP/1.1
    /// reading), not in the response's map: see [`EndpointFields`].
    pub(crate) fn fields(&self) -> Option<&EndpointFields> {
        match self {
            EndpointBody::Own(b) => b.fields(),
            EndpointBody::Hyper(_) => None,
        }
    }

    /// As [`Self::fields`], to rewrite them.
    pub(crate) fn fields_mut(&mut self) -> Option<&mut EndpointFields> {
        match self {
            EndpointBody::Own(b) => b.fields_mut(),
            EndpointBody::Hyper(_) => None,
        }
    }

    /// Takes the response's fields out for writing (or mapping): see [`Self::fields_mut`].
    pub(crate) fn take_fields(&mut self) -> Option<Box<EndpointFields>> {
        match self {
            EndpointBody::Own(b) => b.take_fields(),
            EndpointBody::Hyper(_) => None,
        }
    }
}

/// Why an endpoint's response body failed mid-way.
#[derive(Debug, thiserror::Error)]
pub enum EndpointBodyError {
    /// Meridian's own HTTP/1.1 reading failed.
    #[error(transparent)]
    Own(#[from] H1BodyError),
    /// hyper's client failed.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl Body for EndpointBody {
    type Data = Bytes;
    type Error = EndpointBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, EndpointBodyError>>> {
        match self.get_mut() {
            EndpointBody::Own(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            EndpointBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EndpointBody::Own(b) => b.is_end_stream(),
            EndpointBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EndpointBody::Own(b) => b.size_hint(),
            EndpointBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// A response body relayed from an endpoint frame by frame, never buffered.
pub struct UpstreamBody {
    inner: EndpointBody,
    /// Armed the first time the endpoint has nothing to give, so an answer that comes whole
    /// (most non-streamed ones) never allocates, registers or cancels a timer; after that,
    /// pushed back by each frame.
    stall: Option<Pin<Box<Sleep>>>,
    stall_timeout: Duration,
    sse: bool,
    /// Where the SSE stream stands, so a cut can close the line and event it left open.
    sse_tail: SseTail,
    bytes: u64,
    finished: bool,
    /// Reads first-chunk time and token counts as the bytes pass.
    scanner: UsageScanner,
    completion: Option<Box<dyn Completion>>,
}

impl UpstreamBody {
    /// Relays `inner`, cutting it after `stall_timeout` of silence; `sse` marks an event stream
    /// so a cut can close the event it left open.
    pub fn new(
        inner: EndpointBody,
        stall_timeout: Duration,
        sse: bool,
        scanner: UsageScanner,
        completion: Box<dyn Completion>,
    ) -> UpstreamBody {
        UpstreamBody {
            inner,
            stall: None,
            stall_timeout,
            sse,
            sse_tail: SseTail::default(),
            bytes: 0,
            finished: false,
            scanner,
            completion: Some(completion),
        }
    }

    /// Wraps the completion hook, for state that must live exactly as long as the body
    /// (an admission's concurrency slot). A finished body has no hook left to wrap.
    pub(crate) fn wrap_completion(&mut self, wrap: impl FnOnce(Box<dyn Completion>) -> Box<dyn Completion>) {
        if let Some(c) = self.completion.take() {
            self.completion = Some(wrap(c));
        }
    }

    fn finish(&mut self, end: StreamEnd) {
        self.finished = true;
        if let Some(c) = self.completion.take() {
            let scanned = self.scanner.finish();
            c.complete(end, self.bytes, scanned);
        }
    }

    /// A stream that breaks after its first byte cannot be retried; SSE clients get a last
    /// event saying why, so they can tell a cut from a finished answer.
    fn fail(&mut self, end: StreamEnd, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.finish(end);
        if self.sse {
            // The OpenAI shape of Meridian's other errors, so the SDKs raise `APIError` with
            // this message and code (they read `error` as an object); codes from the same
            // closed list. The OS error behind a broken stream goes to the log, not here.
            tracing::debug!(%error, "stream cut");
            let (code, message) = match error {
                BodyError::Stalled(after) => (
                    "upstream_timeout",
                    format!("the endpoint sent nothing for {after:?}; the stream was cut"),
                ),
                _ => (
                    "upstream_unreachable",
                    "the endpoint's stream broke off before its end".to_string(),
                ),
            };
            let data = serde_json::json!({
                "error": {"message": message, "type": "server_error", "code": code, "param": null}
            });
            // The closer first: the client's parser dispatches whatever the endpoint left
            // half-sent on its own, instead of merging it into this event.
            let event = format!("{}event: error\ndata: {data}\n\n", self.sse_tail.closer());
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
                    if this.sse {
                        this.sse_tail = this.sse_tail.after(data);
                    }
                    this.scanner.feed(data, std::time::Instant::now);
                }
                if this.inner.is_end_stream() {
                    // A sized body may not be polled again once its last byte is out.
                    this.finish(StreamEnd::Complete);
                } else if let Some(stall) = this.stall.as_mut() {
                    stall
                        .as_mut()
                        .reset(Instant::from(clock::coarse()) + this.stall_timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(StreamEnd::UpstreamError, BodyError::Upstream(e)),
            Poll::Pending => {
                let timeout = this.stall_timeout;
                let stall = this.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(StreamEnd::Stalled, BodyError::Stalled(timeout)),
                    Poll::Pending => Poll::Pending,
                }
            }
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

/// The state an SSE stream was left in (WHATWG HTML §9.2.6: lines end in CR, LF or CRLF;
/// a blank line dispatches the event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SseTail {
    /// The last line has no terminator yet.
    line_open: bool,
    /// A line was sent since the last blank line: an event waits for dispatch.
    event_open: bool,
    /// The last byte was CR: an LF right after it would only complete that terminator.
    cr: bool,
}

impl SseTail {
    pub(crate) fn after(mut self, bytes: &[u8]) -> SseTail {
        for &b in bytes {
            match b {
                b'\n' if self.cr => self.cr = false,
                b'\n' | b'\r' => {
                    if self.line_open {
                        self.line_open = false;
                    } else {
                        self.event_open = false;
                    }
                    self.cr = b == b'\r';
                }
                _ => {
                    self.cr = false;
                    self.line_open = true;
                    self.event_open = true;
                }
            }
        }
        self
    }

    /// What ends the open line and event, so the next bytes start a fresh event.
    pub(crate) fn closer(self) -> &'static str {
        match (self.line_open, self.event_open, self.cr) {
            (true, _, _) => "\n\n",
            // A lone LF after CR would only finish the CRLF: a CR makes the blank line.
            (false, true, true) => "\r\n",
            (false, true, false) => "\n",
            (false, false, _) => "",
        }
    }
}

/// What the client receives: relayed from an endpoint, or written by Meridian itself.
#[allow(clippy::large_enum_variant)] // why: nearly every response relays; boxing would allocate for each
pub enum ResponseBody {
    /// An endpoint's response body, relayed frame by frame.
    Upstream(UpstreamBody),
    /// A body Meridian wrote itself (errors, admin answers); `None` is empty.
    Local(Option<Bytes>),
}

impl ResponseBody {
    /// An endpoint's fields not in the response's map, taken out to be written ahead of the
    /// map's fields (or appended to the map): see [`EndpointFields`].
    pub(crate) fn take_endpoint_fields(&mut self) -> Option<Box<EndpointFields>> {
        match self {
            ResponseBody::Upstream(u) => u.inner.take_fields(),
            ResponseBody::Local(_) => None,
        }
    }
}

impl From<Bytes> for ResponseBody {
    fn from(b: Bytes) -> Self {
        ResponseBody::Local(Some(b))
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

/// True for a `text/event-stream` Content-Type value.
pub(crate) fn is_sse_type(value: &[u8]) -> bool {
    // Compared in place: this runs on every response, so no lowercased copy.
    const SSE: &[u8] = b"text/event-stream";
    let v = value.trim_ascii_start();
    v.len() >= SSE.len() && v[..SSE.len()].eq_ignore_ascii_case(SSE)
}

#[cfg(test)]
mod kept_tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    #[tokio::test]
    async fn endpoint_clock_runs_only_on_the_endpoint() {
        let t = Duration::from_millis(50);
        // The client owes the next bytes: the endpoint's clock does not run.
        let waiting = BodySent::default();
        waiting.on_pending();
        assert!(tokio::time::timeout(t * 6, waiting.endpoint_deadline(t)).await.is_err());
        // Bytes handed over and not taken: the endpoint's time runs out.
        let handed = BodySent::default();
        handed.on_handed();
        assert!(tokio::time::timeout(t * 40, handed.endpoint_deadline(t)).await.is_ok());
        // Sent to its end: request_timeout from then.
        let sent = BodySent::default();
        sent.on_pending();
        let clock = tokio::spawn({
            let sent = sent.clone();
            async move { sent.endpoint_deadline(t).await }
        });
        sent.mark();
        assert!(tokio::time::timeout(t * 40, clock).await.is_ok());
    }

    #[test]
    fn sse_cuts_close_the_open_line_and_event() {
        let cases: &[(&[&str], &str)] = &[
            (&[], ""),
            (&["data: {\"tok\": \"hal"], "\n\n"),
            (&["data: a\n"], "\n"),
            (&["data: a\n\n"], ""),
            (&["data: a\r\n\r\n"], ""),
            (&["data: a\r\n"], "\n"),
            (&["data: a\r"], "\r\n"),
            (&["data: a\r\r"], ""),
            (&["data: a\n\ndata: b"], "\n\n"),
            (&["data: a\r", "\n"], "\n"),
            (&["data: a\r", "\n\r\n"], ""),
            (&[": keep-alive\n\n", "data: x"], "\n\n"),
        ];
        for (chunks, want) in cases {
            let tail = chunks.iter().fold(SseTail::default(), |t, c| t.after(c.as_bytes()));
            assert_eq!(tail.closer(), *want, "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn kept_bodies_replay_data_then_trailers() -> TestResult {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", http::HeaderValue::from_static("1S"));
        let body = RequestBody::Kept(Kept {
            data: Some(Bytes::from_static(b"hello")),
            trailers: Some(Box::new(trailers)),
        });
        for attempt in [
            body.replay().ok_or("not replayable")?,
            body.replay().ok_or("not replayable")?,
        ] {
            assert_eq!(attempt.len_hint(), 5);
            // Not exact: a length would frame the body without its trailers.
            let hint = attempt.size_hint();
            assert_eq!((hint.lower(), hint.exact()), (5, None));
            let collected = attempt.collect().await?;
            assert_eq!(collected.trailers().ok_or("no trailers")?["grpc-timeout"], "1S");
            assert_eq!(collected.to_bytes(), "hello");
        }
        let empty = RequestBody::Kept(Kept::default());
        assert!(empty.is_end_stream());
        Ok(())
    }
}
