//! The client's request body as a listener hands it over: hyper's (HTTP/2), or from
//! Meridian's HTTP/1.1 server either whole (it came with the head, the common case for a
//! chat request) or piped one frame at a time from the connection task that reads the
//! socket. The pipe is a one-frame slot: the connection reads only what the body's reader
//! asks for, so a slow endpoint slows the client (backpressure), as with hyper.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::h1::FramingError;

/// Why the client's body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// hyper's HTTP/2 stream failed.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// The bytes are not a body of the framing the head announced.
    #[error("{0}")]
    Framing(#[from] FramingError),
    /// The connection closed before the body's end.
    #[error("the client closed the connection before the end of the body")]
    Closed,
    /// The connection failed.
    #[error("{0}")]
    Io(io::ErrorKind),
}

/// A request body from a client.
#[derive(Debug)]
pub enum ClientBody {
    /// From hyper's server (HTTP/2).
    Hyper(Incoming),
    /// Complete with its head (or empty); `None` once taken.
    Whole(Option<Bytes>),
    /// Read by the connection task as it is asked for.
    Piped(PipeReader),
}

impl ClientBody {
    /// An empty body.
    pub fn empty() -> ClientBody {
        ClientBody::Whole(None)
    }
}

impl From<Incoming> for ClientBody {
    fn from(body: Incoming) -> ClientBody {
        ClientBody::Hyper(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(ClientBodyError::Hyper),
            ClientBody::Whole(data) => Poll::Ready(data.take().filter(|d| !d.is_empty()).map(|d| Ok(Frame::data(d)))),
            ClientBody::Piped(p) => p.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Whole(data) => data.as_ref().is_none_or(Bytes::is_empty),
            ClientBody::Piped(p) => {
                let state = p.lock();
                matches!(state.end, Some(Ok(()))) && state.frame.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            ClientBody::Piped(p) => match p.lock().remaining {
                Some(n) => SizeHint::with_exact(n),
                None => SizeHint::default(),
            },
        }
    }
}

#[derive(Debug, Default)]
struct PipeState {
    /// The next frame, not yet taken by the reader.
    frame: Option<Frame<Bytes>>,
    /// How the body ended, once it has (`Ok` also after the error was taken).
    end: Option<Result<(), ClientBodyError>>,
    /// The reader is waiting for a frame.
    wanted: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The reader is gone: what is left of the body will not be read.
    reader_gone: bool,
    /// Bytes still due, when the length is known.
    remaining: Option<u64>,
}

#[derive(Debug, Default)]
struct Pipe(Mutex<PipeState>);

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        // A panic while holding this lock leaves plain data behind: still usable.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The body's reading end, in the request.
#[derive(Debug)]
pub struct PipeReader(Arc<Pipe>);

/// The connection task's end: it puts frames in as the reader asks for them.
#[derive(Debug)]
pub(crate) struct PipeWriter(Arc<Pipe>);

/// A pipe for a body of `remaining` bytes (`None`: chunked).
pub(crate) fn pipe(remaining: Option<u64>) -> (PipeWriter, PipeReader) {
    let pipe = Arc::new(Pipe(Mutex::new(PipeState {
        remaining,
        ..PipeState::default()
    })));
    (PipeWriter(pipe.clone()), PipeReader(pipe))
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(w) = waker.take() {
        w.wake();
    }
}

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl PipeReader {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.0.lock()
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let mut state = self.0.lock();
        if let Some(frame) = state.frame.take() {
            if let (Some(n), Some(data)) = (state.remaining.as_mut(), frame.data_ref()) {
                *n = n.saturating_sub(data.len() as u64);
            }
            wake(&mut state.writer);
            return Poll::Ready(Some(Ok(frame)));
        }
        match state.end.take() {
            Some(Ok(())) => {
                state.end = Some(Ok(()));
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                state.end = Some(Ok(()));
                Poll::Ready(Some(Err(e)))
            }
            None => {
                state.wanted = true;
                register(&mut state.reader, cx);
                wake(&mut state.writer);
                Poll::Pending
            }
        }
    }
}

impl Drop for PipeReader {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.reader_gone = true;
        wake(&mut state.writer);
    }
}

/// What the reader of a pipe wants from the connection task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Demand {
    /// A frame: read and decode one.
    Frame,
    /// Nothing now (the last frame is not taken yet, or nothing was asked): the connection
    /// task is woken when that changes.
    Wait,
    /// The reader is gone.
    Gone,
}

impl PipeWriter {
    /// Whether the reader wants a frame now; registers the connection task to be woken
    /// when it does.
    pub(crate) fn demand(&self, cx: &Context<'_>) -> Demand {
        let mut state = self.0.lock();
        if state.reader_gone {
            return Demand::Gone;
        }
        if state.frame.is_none() && state.wanted {
            return Demand::Frame;
        }
        register(&mut state.writer, cx);
        Demand::Wait
    }

    /// Hands the reader its frame.
    pub(crate) fn put(&self, frame: Frame<Bytes>) {
        let mut state = self.0.lock();
        state.frame = Some(frame);
        state.wanted = false;
        wake(&mut state.reader);
    }

    /// Ends the body, cleanly or with an error.
    pub(crate) fn end(&self, end: Result<(), ClientBodyError>) {
        let mut state = self.0.lock();
        state.end = Some(end);
        wake(&mut state.reader);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn frames_flow_on_demand_and_end() -> Result<(), ClientBodyError> {
        let (writer, reader) = pipe(Some(5));
        let body = ClientBody::Piped(reader);
        let noop = Context::from_waker(Waker::noop());
        assert_eq!(writer.demand(&noop), Demand::Wait, "nothing asked yet");
        let feeder = async {
            for part in [&b"ab"[..], b"cde"] {
                loop {
                    match std::future::poll_fn(|cx| Poll::Ready(writer.demand(cx))).await {
                        Demand::Frame => break,
                        Demand::Wait => tokio::task::yield_now().await,
                        Demand::Gone => panic!("reader gone"),
                    }
                }
                writer.put(Frame::data(Bytes::from_static(part)));
            }
            loop {
                if std::future::poll_fn(|cx| Poll::Ready(writer.demand(cx))).await == Demand::Frame {
                    writer.end(Ok(()));
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        let (collected, ()) = tokio::join!(body.collect(), feeder);
        assert_eq!(collected?.to_bytes(), Bytes::from_static(b"abcde"));
        Ok(())
    }

    #[tokio::test]
    async fn an_error_is_read_once_then_the_body_ends() {
        let (writer, reader) = pipe(None);
        let mut body = ClientBody::Piped(reader);
        writer.end(Err(ClientBodyError::Closed));
        assert!(matches!(body.frame().await, Some(Err(ClientBodyError::Closed))));
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn a_dropped_reader_is_seen() {
        let (writer, reader) = pipe(None);
        drop(reader);
        assert_eq!(writer.demand(&Context::from_waker(Waker::noop())), Demand::Gone);
    }

    #[tokio::test]
    async fn whole_bodies_are_one_frame() -> Result<(), Box<dyn std::error::Error>> {
        let mut body = ClientBody::Whole(Some(Bytes::from_static(b"{}")));
        assert_eq!(body.size_hint().exact(), Some(2));
        assert!(!body.is_end_stream());
        let frame = body.frame().await.ok_or("no frame")??;
        assert_eq!(frame.into_data().map_err(|_| "not data")?, "{}");
        assert!(body.is_end_stream());
        assert!(ClientBody::empty().is_end_stream());
        Ok(())
    }
}
