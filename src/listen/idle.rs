//! Closes connections that stay idle (no bytes either way, no request in flight) for longer
//! than `idle_timeout`, without a task or timer per request.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests in flight on one connection.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<AtomicU32>);

pub struct ActiveRequest(Arc<AtomicU32>);

impl Activity {
    pub fn begin(&self) -> ActiveRequest {
        self.0.fetch_add(1, Ordering::AcqRel);
        ActiveRequest(self.0.clone())
    }

    fn busy(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An IO wrapper whose reads fail with `TimedOut` once the connection has been idle too long.
///
/// Activity only records the time; the timer is moved when it fires, not on every read and
/// write, so a busy keep-alive connection costs a clock read per I/O, not a timer-wheel update.
pub struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    last_active: Instant,
    activity: Activity,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, timeout: Duration) -> (IdleIo<T>, Activity) {
        let activity = Activity::default();
        let io = IdleIo {
            inner,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            last_active: Instant::now(),
            activity: activity.clone(),
        };
        (io, activity)
    }

    fn touch(&mut self) {
        self.last_active = Instant::now();
    }

    /// True once the connection has been idle for `timeout`; otherwise leaves the timer
    /// armed for the next possible expiry and registered with `cx`.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let deadline = self.last_active + self.timeout;
            if deadline > now {
                // There was activity since the timer was set: wait out the rest.
                self.timer.as_mut().reset(deadline);
            } else if self.activity.busy() {
                // A request is being served (e.g. waiting for a first token): not idle.
                self.last_active = now;
                self.timer.as_mut().reset(now + self.timeout);
            } else {
                return true;
            }
        }
        false
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if self.idle_expired(cx) {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
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
