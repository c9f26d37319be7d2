//! Connection-level timeouts without a task or timer per request: the header read timeout
//! (a new connection's first request, and from the first byte of each later head), the idle
//! timeout between requests, and the send timeout for a client that stops reading. Also
//! writes the JSON answer to a request head that is refused (400, 431, ...).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::clock;
use crate::error::ProxyError;

/// The timeouts a connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub(crate) header_read: Duration,
    pub(crate) idle: Duration,
    pub(crate) send: Duration,
}

/// Where a connection stands between its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A request (or its response body) is in flight: body and send timeouts apply.
    Busy,
    /// Reading a request head that began at `since` (for the first request: the connection
    /// opened then).
    Head { since: Instant },
    /// Kept alive with nothing in flight since `since`.
    Idle { since: Instant },
}

/// When a connection in `phase` is cut off; `None` while it is busy.
pub(super) fn deadline(phase: Phase, t: &Timeouts) -> Option<Instant> {
    match phase {
        Phase::Busy => None,
        Phase::Head { since } => Some(since + t.header_read),
        Phase::Idle { since } => Some(since + t.idle),
    }
}

/// Requests in flight on one connection, how many began, and when the last one ended.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityState>);

#[derive(Debug)]
struct ActivityState {
    opened: Instant,
    in_flight: AtomicU32,
    begun: AtomicU64,
    /// Nanoseconds after `opened`.
    last_end: AtomicU64,
    /// The connection was upgraded (WebSocket): idle means no bytes either way.
    upgraded: AtomicBool,
    /// The HTTP/2 connection's task, woken when its last stream ends so its idle clock
    /// starts: the connection may not poll the IO again by itself until bytes arrive. (An
    /// HTTP/1.1 connection's requests end in its own task, which reads next.)
    waker: Mutex<Option<Waker>>,
}

/// Held while a request and its response body are in flight.
pub struct ActiveRequest {
    state: Arc<ActivityState>,
}

impl Activity {
    fn new(opened: Instant) -> Activity {
        Activity(Arc::new(ActivityState {
            opened,
            in_flight: AtomicU32::new(0),
            begun: AtomicU64::new(0),
            last_end: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            waker: Mutex::new(None),
        }))
    }

    pub(crate) fn begin(&self) -> ActiveRequest {
        self.0.begun.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        ActiveRequest { state: self.0.clone() }
    }

    /// After a `101`: HTTP is over, bytes are bridged.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Release);
    }

    fn busy(&self) -> bool {
        self.0.in_flight.load(Ordering::Acquire) > 0
    }

    fn begun(&self) -> u64 {
        self.0.begun.load(Ordering::Acquire)
    }

    fn last_end(&self) -> Instant {
        self.0.opened + Duration::from_nanos(self.0.last_end.load(Ordering::Acquire))
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let state = &self.state;
        let since = Instant::from(clock::coarse()).saturating_duration_since(state.opened);
        let nanos = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        state.last_end.fetch_max(nanos, Ordering::AcqRel);
        // Wakes the HTTP/2 connection's task, the only kind that registers one (`expired`).
        if state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = state.waker.lock().ok().and_then(|mut w| w.take());
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Unknown,
    Http1,
    /// Streams multiplex: the connection is idle only with no stream and no frames.
    Http2,
}

/// An IO wrapper whose reads fail with `TimedOut` when the connection outstays its phase's
/// deadline, and whose writes fail when the client takes no bytes for the send timeout.
///
/// The read timer moves only when it fires or when an earlier deadline appears, and is not
/// polled while a request is in flight, so a busy connection costs no timer-wheel update.
pub struct IdleIo<T> {
    inner: T,
    timeouts: Timeouts,
    timer: Pin<Box<Sleep>>,
    armed: Instant,
    activity: Activity,
    protocol: Protocol,
    /// The current head's first byte, and how many requests had begun then.
    head: (Instant, u64),
    /// Last read or write, for HTTP/2's idleness.
    last_io: Instant,
    send_timer: Pin<Box<Sleep>>,
    write_blocked: bool,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`, held to `timeouts`; the returned [`Activity`] is for the request handler,
    /// which marks each request it serves (a connection with one in flight is not idle).
    pub fn new(inner: T, timeouts: Timeouts) -> (IdleIo<T>, Activity) {
        let now = Instant::now();
        let activity = Activity::new(now);
        let armed = now + timeouts.header_read;
        let io = IdleIo {
            inner,
            timeouts,
            timer: Box::pin(tokio::time::sleep_until(armed)),
            armed,
            activity: activity.clone(),
            protocol: Protocol::Unknown,
            head: (now, 0),
            last_io: now,
            send_timer: Box::pin(tokio::time::sleep(timeouts.send)),
            write_blocked: false,
        };
        (io, activity)
    }

    fn phase(&self) -> Phase {
        if self.activity.busy() {
            return Phase::Busy;
        }
        if self.activity.0.upgraded.load(Ordering::Acquire) {
            // The upgrading request's end stands for the I/O before it: an HTTP/1.1
            // connection tracks `last_io` only once upgraded.
            return Phase::Idle {
                since: self.activity.last_end().max(self.last_io),
            };
        }
        let begun = self.activity.begun();
        match self.protocol {
            Protocol::Http2 if begun > 0 => Phase::Idle {
                since: self.activity.last_end().max(self.last_io),
            },
            Protocol::Http2 => Phase::Head { since: self.head.0 },
            Protocol::Unknown | Protocol::Http1 if self.head.1 == begun => Phase::Head { since: self.head.0 },
            Protocol::Unknown | Protocol::Http1 => Phase::Idle {
                since: self.activity.last_end(),
            },
        }
    }

    /// Whether the phase reads `last_io` (HTTP/2, and an upgraded connection's bridge): an
    /// HTTP/1.1 request's I/O need not read the clock for it.
    fn tracks_last_io(&self) -> bool {
        self.protocol != Protocol::Http1 || self.activity.0.upgraded.load(Ordering::Acquire)
    }

    fn on_read(&mut self, bytes: &[u8]) {
        if self.protocol == Protocol::Unknown {
            self.protocol = if bytes.starts_with(b"PRI ") {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
        }
        if self.tracks_last_io() {
            self.last_io = Instant::from(clock::coarse());
            return;
        }
        let begun = self.activity.begun();
        if !self.activity.busy() && self.head.1 != begun {
            // The first byte of the next request head.
            self.head = (Instant::from(clock::coarse()), begun);
        }
    }

    /// True once the phase's deadline has passed; otherwise the timer is armed for the
    /// next possible expiry and registered with `cx`.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        // Only HTTP/2's requests end in tasks of their own: an HTTP/1.1 connection's end in
        // the task that reads it and reads next, which arms the deadline. Woken for them, that
        // task polled the connection once more per request (~600 instructions).
        if self.protocol != Protocol::Http1
            && let Ok(mut w) = self.activity.0.waker.lock()
        {
            match w.as_ref() {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        // A busy connection has no deadline, and needs no timer: the end of its last request
        // wakes this task (or is this task, in HTTP/1.1), and that poll arms the timer.
        let Some(due) = deadline(self.phase(), &self.timeouts) else {
            return false;
        };
        loop {
            // A deadline at or after the armed timer needs no clock read: the timer says when
            // it may have passed (a keep-alive connection's deadlines only move later, so this
            // is the usual case).
            if due < self.armed {
                if due <= Instant::now() {
                    return true;
                }
                self.armed = due;
                self.timer.as_mut().reset(due);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            // The timer fired, so `armed` has passed, and with it any deadline up to it.
            if due <= self.armed {
                return true;
            }
            // Fired early (the phase moved on): wait for the current deadline.
            self.armed = due;
            self.timer.as_mut().reset(due);
        }
    }
}

/// A complete HTTP/1.1 answer with Meridian's JSON error body; the connection closes.
pub(super) fn error_response(status: u16) -> Vec<u8> {
    let err = ProxyError::MalformedHead { status };
    let body = err.body();
    let reason = err.status().canonical_reason().unwrap_or("Bad Request");
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        err.status().as_u16(),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let filled = &buf.filled()[before..];
                    let first = &filled[..filled.len().min(4)];
                    let mut head = [0u8; 4];
                    head[..first.len()].copy_from_slice(first);
                    self.on_read(&head[..first.len()]);
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.expired(cx) {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> IdleIo<T> {
    /// Tracks a write's progress against the send timeout.
    fn after_write(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match r {
            Poll::Pending => {
                if !self.write_blocked {
                    self.write_blocked = true;
                    let due = Instant::from(clock::coarse()) + self.timeouts.send;
                    self.send_timer.as_mut().reset(due);
                }
                if self.send_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "send timeout")));
                }
                Poll::Pending
            }
            Poll::Ready(r) => {
                self.write_blocked = false;
                if matches!(r, Ok(n) if n > 0) && self.tracks_last_io() {
                    self.last_io = Instant::from(clock::coarse());
                }
                Poll::Ready(r)
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.after_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_by_phase() {
        let t = Timeouts {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            send: Duration::from_secs(60),
        };
        let at = Instant::now();
        assert_eq!(deadline(Phase::Busy, &t), None);
        assert_eq!(
            deadline(Phase::Head { since: at }, &t),
            Some(at + Duration::from_secs(10))
        );
        assert_eq!(
            deadline(Phase::Idle { since: at }, &t),
            Some(at + Duration::from_secs(60))
        );
    }

    /// Counts its wakes.
    struct Wakes(AtomicU32);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The connection's task is woken by the end of its last request when that request ran
    /// in a task of its own (HTTP/2); an HTTP/1.1 request ends in the connection's task,
    /// which reads next, so none is registered for it.
    #[tokio::test]
    async fn the_last_request_wakes_an_http2_connection_and_not_an_http1_one() {
        let timeouts = Timeouts {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            send: Duration::from_secs(60),
        };
        for (first_bytes, woken) in [(&b"PRI * HTTP/2.0\r\n"[..], 1), (&b"GET / HTTP/1.1\r\n"[..], 0)] {
            let (mut io, activity) = IdleIo::new((), timeouts);
            io.on_read(first_bytes);
            let wakes = Arc::new(Wakes(AtomicU32::new(0)));
            let waker = Waker::from(wakes.clone());
            let mut cx = Context::from_waker(&waker);

            // Two in flight (HTTP/2 streams, or a request and its body): only the last wakes.
            let (first, second) = (activity.begin(), activity.begin());
            assert!(!io.expired(&mut cx), "a busy connection has no deadline");
            drop(first);
            assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
            assert!(activity.busy());
            drop(second);
            assert!(!activity.busy());
            assert_eq!(wakes.0.load(Ordering::Relaxed), woken, "{first_bytes:?}");
            // Idle now: the deadline is armed, not passed.
            assert!(!io.expired(&mut cx));
        }
    }

    #[test]
    fn refusals_carry_the_json_body() {
        let out = String::from_utf8(error_response(431)).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        assert!(out.contains("\"bad_request\""), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
    }
}
