//! Meridian's own HTTP/1.1 server connection, over `httparse`, as NGINX, Pingora and sozu
//! own theirs: hyper's server connection kept an 8 KiB read buffer and an 8 KiB write
//! buffer for every connection's life (19 of the 28 KiB each SSE stream cost), and about a
//! third of the instructions of a proxied request.
//!
//! One task per connection does all of the socket's I/O: it reads a head, hands the
//! request to the proxy, feeds the request body to it as it asks (a body that came with the
//! head is handed over whole), watches the socket for the client's close while the answer
//! is pending (a client that goes away cancels its upstream request, as hyper does), and
//! writes the response. Buffers are released whenever the connection goes idle.
//!
//! The parsing and framing rules are pure functions in [`head`]; the request smuggling and
//! limit tests, proptests and the `client_request` fuzz target hold them to what hyper
//! accepted and refused.

pub mod head;

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, watch};

use super::Limits;
use super::idle::{Activity, error_response};
use super::recycle::Slot;
use crate::forward::body::ResponseBody;
use crate::forward::client_body::{ClientBody, ClientBodyError, Demand, PipeWriter, pipe};
use crate::forward::h1::{BodyState, Step, decode};
use crate::forward::upgrade;
use crate::geo::LocateMemo;
use crate::proxy::{ConnInfo, Proxy};
use head::{Exchange, HeadError, RequestHead, ResponseFraming};

/// Bytes asked of the socket per read at first; a head that does not fit doubles it (up
/// to `server.max_header_bytes`), and so does a body read that fills it.
const READ_SIZE: usize = 4 * 1024;
const MAX_READ_SIZE: usize = 64 * 1024;
/// Response bytes gathered before they are written: small frames that are ready together
/// go out in one write (one TLS record), a large body in writes of about this size.
const WRITE_BATCH: usize = 16 * 1024;
/// A lingering close's bounds: the bytes read and dropped, and the time it may take.
const LINGER_BYTES: usize = 16 << 20;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);
/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Why a connection ended before its time.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection with a request in flight")]
    ClientGone,
    #[error("response body: {0}")]
    Body(#[source] crate::forward::body::BodyError),
    #[error("the response body did not match its Content-Length")]
    Length,
}

/// The request body as the connection task feeds it.
enum Feed {
    /// Read to its end (or there was none).
    Done,
    /// Piped to the proxy as it asks.
    Piped {
        writer: PipeWriter,
        state: BodyState,
        /// A `100 Continue` is owed before the first read for the body.
        continue_due: bool,
    },
    /// Not read to its end (the reader left, or the body was broken): the connection
    /// cannot carry another request.
    Abandoned,
}

struct Conn<I> {
    io: I,
    rbuf: BytesMut,
    /// How much of `rbuf` was an incomplete head when last parsed (0: none was).
    partial_head: usize,
    read_size: usize,
    /// The client closed its side (or the read failed).
    read_closed: bool,
    wbuf: Vec<u8>,
    written: usize,
    /// Bytes of [`CONTINUE`] still to write.
    interim: &'static [u8],
    max_head: usize,
    max_headers: usize,
}

/// Serves HTTP/1.1 on `io` until the client closes, a response ends the connection, or
/// the listener drains. `prefix` is what was read to tell HTTP/1.1 from HTTP/2.
pub(super) async fn serve<I>(
    io: I,
    prefix: &[u8],
    proxy: Proxy,
    info: ConnInfo,
    activity: Activity,
    limits: &Limits,
    drain: watch::Receiver<()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut conn = Conn {
        io,
        rbuf: BytesMut::from(prefix),
        partial_head: 0,
        read_size: READ_SIZE,
        read_closed: false,
        wbuf: Vec::new(),
        written: 0,
        interim: &[],
        max_head: limits.max_header_bytes,
        max_headers: limits.max_headers,
    };
    let peer = info.peer;
    // The requests of one connection come from one client: its last lookup is kept.
    let memo = LocateMemo::default();
    // One wait for the drain for the connection's life (a new one per request registered
    // and dropped a waiter each time), polled once: from then on the drain wakes this task,
    // and a look at `drain`'s version says whether it did (polling the registered wait again
    // for every request cost ~160 instructions).
    let mut watch = drain.clone();
    let mut drained = std::pin::pin!(watch.changed());
    if poll_fn(|cx| Poll::Ready(drained.as_mut().poll(cx).is_ready())).await {
        return;
    }
    let draining = || drain.has_changed().unwrap_or(true);
    loop {
        conn.read_size = READ_SIZE;
        let head = poll_fn(|cx| match conn.poll_head(cx) {
            // Draining, with nothing begun: close now.
            Poll::Pending if conn.rbuf.is_empty() && draining() => Poll::Ready(None),
            polled => polled.map(Some),
        })
        .await;
        let head = match head {
            // Draining with nothing begun, or the client closed between requests.
            None | Some(Ok(None)) => return,
            Some(Ok(Some(head))) => head,
            Some(Err(Refusal::Head(e))) => {
                tracing::debug!(%peer, error = %e, "request head refused");
                conn.refuse(e).await;
                return;
            }
            Some(Err(Refusal::Io(e))) => {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
                return;
            }
        };
        // One request and its response, written out here rather than awaited as a future of
        // its own: that future (1.3 KiB) was built, then copied twice into this one's state,
        // for every request (callgrind: ~300 instructions).
        let next: Result<Next, ConnError> = 'exchange: {
            let guard = activity.begin();
            // The handler's block first (see `Slot`).
            let slot = Slot::take();
            let RequestHead {
                mut request,
                body,
                keep_alive,
                expect_continue,
                upgrade,
                takes_trailers,
            } = head;
            let version = request.parts.version;
            let head_request = request.parts.method == Method::HEAD;
            // Trailers are sent to a chunked response only when the client said it takes them
            // (`takes_trailers`).
            let mut upgrade_tx = None;
            if upgrade {
                let (tx, rx) = oneshot::channel();
                request.parts.extensions.insert(upgrade::OnClientUpgrade::new(rx));
                upgrade_tx = Some(tx);
            }
            let (body, mut feed) = conn.request_body(body, expect_continue);
            if conn.rbuf.is_empty() {
                // The head and body share the buffer's memory until the request is done with
                // them; the connection's own handle need not keep it for a long stream.
                conn.rbuf = BytesMut::new();
            }
            // On the heap: the request's state (~4 KiB) is only needed while it runs, not for
            // the connection's life. Built in place, in a block an earlier request freed.
            let mut handler = slot.pin(proxy.handle(info, Some(&memo), &mut request, body));
            // The answer is moved once, out of the handler, and read in place after that:
            // returned through `Poll` and taken apart with `into_parts`, its 352 bytes were
            // copied four times (callgrind: ~250 instructions a request).
            let mut answer = None;
            let answered = poll_fn(|cx| {
                if let Poll::Ready(resp) = handler.as_mut().poll(cx) {
                    let Ok(resp) = resp;
                    answer = Some(resp);
                    return Poll::Ready(Ok(()));
                }
                conn.poll_feed(cx, &mut feed)?;
                if matches!(feed, Feed::Done | Feed::Abandoned) && conn.poll_client_gone(cx) {
                    return Poll::Ready(Err(ConnError::ClientGone));
                }
                Poll::Pending
            })
            .await;
            drop(handler);
            // The head's bytes share the read buffer's memory: not kept for a long stream.
            drop(request);
            if let Err(e) = answered {
                break 'exchange Err(e);
            }
            let Some(response) = answer.as_mut() else {
                // Not reached: the handler's answer is the only way out of the poll with `Ok`.
                break 'exchange Ok(Next::Close { linger: false });
            };
            if let Feed::Piped { continue_due, .. } = &mut feed {
                // A final answer came first: a `100` now would land inside it.
                *continue_due = false;
            }
            // Draining: this is the last response (hyper's graceful shutdown does the same).
            let exchange = Exchange {
                head_request,
                version,
                keep_alive: keep_alive && !draining() && matches!(feed, Feed::Done),
            };
            let status = response.status();
            let switching = status == StatusCode::SWITCHING_PROTOCOLS;
            let exact = response.body().size_hint().exact();
            let date = date::now();
            // An endpoint's fields still over its head's bytes come first (as they would in
            // the map), then what the map holds.
            let endpoint = response.body_mut().take_endpoint_fields();
            let endpoint_len = endpoint.as_ref().map_or(0, |f| f.head_len());
            // One allocation for the head (and the first frames behind it).
            conn.wbuf.reserve(256 + endpoint_len + response.headers().len() * 48);
            let fields = (endpoint.as_deref(), response.headers());
            let (framing, keep_alive) = head::encode_response(&mut conn.wbuf, status, fields, exact, exchange, &date);
            drop(endpoint);
            // The head is written: a long stream keeps only its body. (A map that never held
            // a field, as when the endpoint's are all listed, has nothing to give back.)
            if response.headers().capacity() > 0 {
                drop(std::mem::take(response.headers_mut()));
            }
            response.extensions_mut().clear();
            if switching {
                if let Err(e) = poll_fn(|cx| conn.poll_write_buffered(cx)).await {
                    break 'exchange Err(e);
                }
                drop(answer);
                let Some(tx) = upgrade_tx else {
                    // `101` to a request that asked for none: nothing to switch to.
                    break 'exchange Ok(Next::Close { linger: false });
                };
                activity.upgraded();
                drop(guard);
                break 'exchange Ok(Next::Upgrade(tx));
            }
            drop(upgrade_tx);
            let mut out = Outgoing::new(framing, takes_trailers);
            if framing == ResponseFraming::None {
                drop(answer);
                if let Err(e) = poll_fn(|cx| conn.poll_write_buffered(cx)).await {
                    break 'exchange Err(e);
                }
            } else {
                let mut body = Pin::new(response.body_mut());
                if let Err(e) = poll_fn(|cx| conn.poll_response(cx, body.as_mut(), &mut out, &mut feed)).await {
                    break 'exchange Err(e);
                }
                drop(answer);
            }
            // This task reads next (the next head, or the lingering close), which arms the
            // idle deadline: it registered no waker for the end (`IdleIo::expired`).
            drop(guard);
            let body_read = conn.finish_feed(&mut feed);
            if keep_alive && out.clean && body_read {
                Ok(Next::KeepAlive)
            } else {
                // Linger when the client may still be sending: its body was not all read, or
                // it pipelined more behind this request (NGINX's `lingering_close on` looks at
                // its buffer the same way).
                Ok(Next::Close {
                    linger: !body_read || !conn.rbuf.is_empty(),
                })
            }
        };
        match next {
            Ok(Next::KeepAlive) => conn.release_idle(),
            Ok(Next::Close { linger }) => {
                conn.close(linger).await;
                return;
            }
            Ok(Next::Upgrade(bridge)) => {
                let leftover = conn.rbuf.split().freeze();
                let _ = bridge.send(upgrade::Upgraded::new(leftover, Box::new(conn.io)));
                return;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
                return;
            }
        }
    }
}

/// What follows a response on its connection.
enum Next {
    KeepAlive,
    /// `linger`: the client may still be sending (its request's body was not all read).
    Close {
        linger: bool,
    },
    /// The `101` is written: the connection goes to the bridge.
    Upgrade(oneshot::Sender<upgrade::Upgraded>),
}

/// Why no request came of a head.
enum Refusal {
    Head(HeadError),
    Io(io::Error),
}

impl<I> Conn<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Reads until a whole head is in; `None` when the client closed between requests (or
    /// in the middle of a head, which gets no answer either). A poll function, not an
    /// `async fn`: that future was built, then copied twice into the connection's, for
    /// every request.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<RequestHead>, Refusal>> {
        loop {
            // An incomplete head is parsed again only once more bytes are in.
            if self.rbuf.len() > self.partial_head {
                match head::parse_request(&mut self.rbuf, self.max_head, self.max_headers) {
                    Ok(Some(head)) => {
                        self.partial_head = 0;
                        return Poll::Ready(Ok(Some(head)));
                    }
                    Ok(None) => self.partial_head = self.rbuf.len(),
                    Err(e) => return Poll::Ready(Err(Refusal::Head(e))),
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Refusal::Io(e))),
            }
        }
    }

    /// The body as the proxy gets it: whole when the head brought all of it.
    fn request_body(&mut self, state: BodyState, expect_continue: bool) -> (ClientBody, Feed) {
        match state {
            BodyState::Done => (ClientBody::empty(), Feed::Done),
            BodyState::Length(n) if self.rbuf.len() as u64 >= n => {
                let whole = self.rbuf.split_to(n as usize).freeze();
                (ClientBody::Whole(Some(whole)), Feed::Done)
            }
            state => {
                let remaining = match state {
                    BodyState::Length(n) => Some(n),
                    _ => None,
                };
                let (writer, reader) = pipe(remaining);
                let feed = Feed::Piped {
                    writer,
                    state,
                    continue_due: expect_continue && self.rbuf.is_empty(),
                };
                (ClientBody::Piped(reader), feed)
            }
        }
    }

    /// Reads and decodes body frames while the body's reader asks for them.
    fn poll_feed(&mut self, cx: &mut Context<'_>, feed: &mut Feed) -> Result<(), ConnError> {
        loop {
            let Feed::Piped {
                writer,
                state,
                continue_due,
            } = feed
            else {
                return Ok(());
            };
            match writer.demand(cx) {
                Demand::Wait => return Ok(()),
                Demand::Gone => {
                    *feed = Feed::Abandoned;
                    return Ok(());
                }
                Demand::Frame => {}
            }
            if *continue_due {
                *continue_due = false;
                self.interim = CONTINUE;
            }
            while !self.interim.is_empty() {
                match Pin::new(&mut self.io).poll_write(cx, self.interim) {
                    Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                    Poll::Ready(Ok(n)) => self.interim = &self.interim[n..],
                    Poll::Ready(Err(e)) => return Err(e.into()),
                    Poll::Pending => return Ok(()),
                }
            }
            let failure = match decode(state, &mut self.rbuf) {
                Ok(Step::Frame(frame)) => {
                    writer.put(frame);
                    if *state == BodyState::Done {
                        writer.end(Ok(()));
                        *feed = Feed::Done;
                    }
                    continue;
                }
                Ok(Step::End) => {
                    writer.end(Ok(()));
                    *feed = Feed::Done;
                    return Ok(());
                }
                Ok(Step::NeedMore) => match self.poll_fill(cx) {
                    Poll::Ready(Ok(0)) => ClientBodyError::Closed,
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(e)) => ClientBodyError::Io(e.kind()),
                    Poll::Pending => return Ok(()),
                },
                Err(e) => ClientBodyError::Framing(e),
            };
            writer.end(Err(failure));
            *feed = Feed::Abandoned;
            return Ok(());
        }
    }

    /// After the response: a body the proxy did not read to its end may still be whole in
    /// the buffer (it is then skipped); otherwise the connection cannot be reused.
    fn finish_feed(&mut self, feed: &mut Feed) -> bool {
        let Feed::Piped { state, .. } = feed else {
            return matches!(feed, Feed::Done);
        };
        loop {
            match decode(state, &mut self.rbuf) {
                Ok(Step::Frame(_)) => {}
                Ok(Step::End) => return true,
                Ok(Step::NeedMore) | Err(_) => return false,
            }
        }
    }

    /// True once the client has closed its side (or its connection failed) while its
    /// request is in flight. Bytes it sends meanwhile (a pipelined request) are kept for
    /// later, and the socket is not read further until they are used.
    fn poll_client_gone(&mut self, cx: &mut Context<'_>) -> bool {
        if self.read_closed {
            return true;
        }
        if !self.rbuf.is_empty() {
            return false;
        }
        // A stack buffer: an SSE stream's connection keeps no read buffer while it waits.
        let mut probe = [0u8; 512];
        let mut read = ReadBuf::new(&mut probe);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => {
                self.read_closed = true;
                true
            }
            Poll::Ready(Ok(())) => {
                self.rbuf.extend_from_slice(read.filled());
                false
            }
            Poll::Ready(Err(_)) => {
                self.read_closed = true;
                true
            }
            Poll::Pending => false,
        }
    }

    /// Reads more of the client's bytes; `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_closed {
            return Poll::Ready(Ok(0));
        }
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 4 {
            // A head that did not fit the last read doubles the next.
            self.rbuf.reserve(self.read_size.max(self.rbuf.len()));
        }
        let spare = self.rbuf.spare_capacity_mut();
        let asked = spare.len();
        let mut read = ReadBuf::uninit(spare);
        match ready!(Pin::new(&mut self.io).poll_read(cx, &mut read)) {
            Ok(()) => {
                let n = read.filled().len();
                // SAFETY: `poll_read` initialised the first `n` spare bytes.
                unsafe { self.rbuf.set_len(self.rbuf.len() + n) };
                if n == 0 {
                    self.read_closed = true;
                } else if n == asked {
                    self.read_size = (self.read_size * 2).min(MAX_READ_SIZE);
                }
                Poll::Ready(Ok(n))
            }
            Err(e) => {
                self.read_closed = true;
                Poll::Ready(Err(e))
            }
        }
    }

    /// Writes the response: the head is in `wbuf`; body frames that are ready together are
    /// gathered behind it and written at once.
    fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
        mut body: Pin<&mut ResponseBody>,
        out: &mut Outgoing,
        feed: &mut Feed,
    ) -> Poll<Result<(), ConnError>> {
        loop {
            let mut waiting = false;
            while !out.finished && out.failed.is_none() && self.wbuf.len() - self.written < WRITE_BATCH {
                match body.as_mut().poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => out.encode(&data, &mut self.wbuf)?,
                        Err(frame) => {
                            if let Ok(trailers) = frame.into_trailers() {
                                out.trailers(&trailers, &mut self.wbuf);
                            }
                        }
                    },
                    Poll::Ready(None) => out.finish(&mut self.wbuf)?,
                    // Each chunk is relayed as it is read (SPEC, "Streaming"): the head and
                    // what came before the failure are written, then the connection is cut.
                    Poll::Ready(Some(Err(e))) => out.failed = Some(e),
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                }
            }
            if self.written == self.wbuf.len() && !out.finished && out.failed.is_none() {
                return self.poll_wait(cx, feed);
            }
            if self.poll_write_buffered(cx)?.is_pending() {
                return self.poll_wait(cx, feed);
            }
            if let Some(e) = out.failed.take() {
                return Poll::Ready(Err(ConnError::Body(e)));
            }
            if out.finished {
                return Poll::Ready(Ok(()));
            }
            if waiting {
                return self.poll_wait(cx, feed);
            }
        }
    }

    /// Before the response task waits: the request body is fed if it is asked for, and a
    /// client that has gone away ends the wait (only then, so a response that is ready at
    /// once costs no look at the socket).
    fn poll_wait(&mut self, cx: &mut Context<'_>, feed: &mut Feed) -> Poll<Result<(), ConnError>> {
        self.poll_feed(cx, feed)?;
        if matches!(feed, Feed::Done | Feed::Abandoned) && self.poll_client_gone(cx) {
            return Poll::Ready(Err(ConnError::ClientGone));
        }
        Poll::Pending
    }

    /// Writes and flushes what `wbuf` holds.
    fn poll_write_buffered(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        while self.written < self.wbuf.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.written..])) {
                Ok(0) => return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into())),
                Ok(n) => self.written += n,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.wbuf.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Between requests: buffers go back to the allocator unless bytes wait in them, so an
    /// idle keep-alive connection holds none (NGINX frees its header buffer likewise).
    fn release_idle(&mut self) {
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        self.wbuf = Vec::new();
    }

    /// Answers a head that was refused, and closes.
    async fn refuse(&mut self, e: HeadError) {
        self.wbuf = error_response(e.status().as_u16());
        self.written = 0;
        if poll_fn(|cx| self.poll_write_buffered(cx)).await.is_ok() {
            // The rest of a refused head may still be coming.
            self.close(true).await;
        }
    }

    /// Closes the connection after its last response (TLS: with a close_notify). With
    /// `linger`, what the client still sends is then read and dropped until it closes too,
    /// for a bounded while (NGINX's lingering close): closed with unread bytes, the socket
    /// would answer with a reset, and a client still sending the body of a request answered
    /// early (refused before its body was read) would see a failed write and may never read
    /// the answer.
    async fn close(&mut self, linger: bool) {
        let _ = poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await;
        if !linger || self.read_closed {
            return;
        }
        let mut drained = 0;
        let _ = tokio::time::timeout(LINGER_TIME, async {
            // On the heap, and only now: an array here would sit in every connection's
            // future (8 KiB more per connection, copied whole when its task is spawned).
            let mut sink = vec![0u8; 8 * 1024];
            while drained <= LINGER_BYTES {
                let mut read = ReadBuf::new(&mut sink);
                match poll_fn(|cx| Pin::new(&mut self.io).poll_read(cx, &mut read)).await {
                    Ok(()) if !read.filled().is_empty() => drained += read.filled().len(),
                    _ => break,
                }
            }
        })
        .await;
    }
}

/// A response body's framing on the wire, and how far it got.
struct Outgoing {
    framing: ResponseFraming,
    /// Bytes still due of a Content-Length body.
    remaining: u64,
    finished: bool,
    /// The body ended as its framing said: the connection may be reused.
    clean: bool,
    /// The client sent `TE: trailers`.
    takes_trailers: bool,
    /// The last chunk and the trailers are written.
    trailers_sent: bool,
    /// The body failed: what was read before goes out first, then the connection is cut.
    failed: Option<crate::forward::body::BodyError>,
}

impl Outgoing {
    fn new(framing: ResponseFraming, takes_trailers: bool) -> Outgoing {
        Outgoing {
            framing,
            remaining: match framing {
                ResponseFraming::Length(n) => n,
                _ => 0,
            },
            finished: false,
            clean: true,
            takes_trailers,
            trailers_sent: false,
            failed: None,
        }
    }

    /// Trailers go in the last chunk of a chunked body, to a client that takes them; they
    /// are dropped otherwise (as hyper does).
    fn trailers(&mut self, trailers: &http::HeaderMap, out: &mut Vec<u8>) {
        if self.framing != ResponseFraming::Chunked || !self.takes_trailers || self.trailers_sent {
            return;
        }
        self.trailers_sent = true;
        out.extend_from_slice(b"0\r\n");
        for (name, value) in trailers {
            if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    fn encode(&mut self, data: &Bytes, out: &mut Vec<u8>) -> Result<(), ConnError> {
        if data.is_empty() {
            return Ok(());
        }
        match self.framing {
            ResponseFraming::Chunked => {
                let mut hex = [0u8; 16];
                out.extend_from_slice(chunk_size(data.len(), &mut hex));
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            ResponseFraming::Length(_) => {
                let len = data.len() as u64;
                if len > self.remaining {
                    return Err(ConnError::Length);
                }
                self.remaining -= len;
                out.extend_from_slice(data);
            }
            ResponseFraming::Close => out.extend_from_slice(data),
            ResponseFraming::None => {}
        }
        Ok(())
    }

    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), ConnError> {
        self.finished = true;
        match self.framing {
            ResponseFraming::Chunked if !self.trailers_sent => out.extend_from_slice(b"0\r\n\r\n"),
            ResponseFraming::Length(_) if self.remaining > 0 => return Err(ConnError::Length),
            ResponseFraming::Close => self.clean = false,
            _ => {}
        }
        Ok(())
    }
}

/// `len` in lowercase hex, as a chunk-size line starts.
fn chunk_size(len: usize, buf: &mut [u8; 16]) -> &[u8] {
    let mut i = buf.len();
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The `Date` header value, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, UNIX_EPOCH};

    use crate::clock;

    pub(super) const LEN: usize = 29;

    thread_local! {
        static CACHED: RefCell<(u64, [u8; LEN])> = const { RefCell::new((u64::MAX, [0; LEN])) };
    }

    pub(super) fn now() -> [u8; LEN] {
        let secs = clock::unix_secs();
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != secs {
                let text = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs));
                if text.len() == LEN {
                    cached.1.copy_from_slice(text.as_bytes());
                    cached.0 = secs;
                }
            }
            cached.1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without making one.
    fn future_size<A, F: Future>(_f: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_connection_future_stays_small() {
        type Args = (
            super::super::idle::IdleIo<tokio::net::TcpStream>,
            &'static [u8],
            Proxy,
            ConnInfo,
            Activity,
            &'static Limits,
            watch::Receiver<()>,
        );
        let size = future_size(|(io, prefix, proxy, info, activity, limits, drain): Args| {
            serve(io, prefix, proxy, info, activity, limits, drain)
        });
        // Every open connection holds this much for its life, and its task's spawn copies
        // it whole: 2.8 KiB today, 9.4 KiB when the lingering close kept its drain buffer
        // in the future. Larger per-request state belongs behind a box.
        assert!(size <= 4096, "an HTTP/1.1 connection's future is {size} bytes");
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        let mut buf = [0u8; 16];
        for (n, want) in [
            (0, "0"),
            (9, "9"),
            (10, "a"),
            (255, "ff"),
            (4096, "1000"),
            (usize::MAX, "ffffffffffffffff"),
        ] {
            assert_eq!(chunk_size(n, &mut buf), want.as_bytes());
        }
    }

    #[test]
    fn bodies_are_held_to_their_framing() -> Result<(), ConnError> {
        let mut out = Vec::new();
        let mut chunked = Outgoing::new(ResponseFraming::Chunked, false);
        chunked.encode(&Bytes::from_static(b"hello"), &mut out)?;
        chunked.encode(&Bytes::new(), &mut out)?;
        chunked.finish(&mut out)?;
        assert_eq!(out, b"5\r\nhello\r\n0\r\n\r\n");
        assert!(chunked.clean);

        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let mut out = Vec::new();
        let mut with = Outgoing::new(ResponseFraming::Chunked, true);
        with.trailers(&trailers, &mut out);
        with.finish(&mut out)?;
        assert_eq!(out, b"0\r\ngrpc-status: 0\r\n\r\n");
        let mut out = Vec::new();
        let mut without = Outgoing::new(ResponseFraming::Chunked, false);
        without.trailers(&trailers, &mut out);
        without.finish(&mut out)?;
        assert_eq!(out, b"0\r\n\r\n", "no trailers unless the client takes them");

        let mut out = Vec::new();
        let mut length = Outgoing::new(ResponseFraming::Length(3), false);
        assert!(
            length.encode(&Bytes::from_static(b"abcd"), &mut out).is_err(),
            "too long"
        );
        let mut short = Outgoing::new(ResponseFraming::Length(3), false);
        short.encode(&Bytes::from_static(b"ab"), &mut out)?;
        assert!(short.finish(&mut out).is_err(), "too short");

        let mut close = Outgoing::new(ResponseFraming::Close, false);
        close.finish(&mut Vec::new())?;
        assert!(!close.clean, "a close-delimited body ends its connection");
        Ok(())
    }

    #[test]
    fn the_date_is_an_imf_fixdate() -> Result<(), std::str::Utf8Error> {
        let date = date::now();
        let text = std::str::from_utf8(&date)?;
        assert!(text.ends_with(" GMT"), "{text}");
        assert!(httpdate::parse_http_date(text).is_ok(), "{text}");
        Ok(())
    }
}
