//! Per-endpoint caps: concurrent requests with a bounded wait queue (HAProxy's `maxconn`,
//! `maxqueue`, `timeout queue`), and open connections, so a burst cannot open thousands.
//!
//! A request takes an [`EndpointSlot`] before anything is sent and keeps it for the life of
//! its response (dropped with the relayed body). Every connect, Meridian's HTTP/1.1 pool's
//! and hyper-util's HTTP/2 connector's, takes a connection permit for the life of the TCP
//! connection: a connect may start while a pooled connection is on its way back, and the
//! permit keeps even that race within the cap.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::EndpointLimitConfig;

/// What an arriving request does when no slot is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// Waits in the endpoint's queue.
    Wait,
    /// The queue is full: the attempt fails at once.
    Full,
}

/// The queue decision, given how many requests were already waiting.
pub(crate) fn on_arrival(waiting: usize, max_queue: usize) -> Arrival {
    if waiting < max_queue {
        Arrival::Wait
    } else {
        Arrival::Full
    }
}

/// Why an attempt got no slot. Nothing was sent: the request may go elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Full {
    #[error("endpoint full: {0} requests already waiting")]
    QueueFull(usize),
    #[error("endpoint full: no free connection within {0:?}")]
    QueueTimeout(Duration),
}

/// One endpoint's request slots and wait queue.
#[derive(Debug)]
pub struct EndpointLimit {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    policy: EndpointLimitConfig,
}

/// A taken slot; dropping it frees the slot for the next waiter.
#[derive(Debug)]
pub(crate) struct EndpointSlot {
    _permit: OwnedSemaphorePermit,
}

/// Counts a waiter out of the queue however its wait ends (slot, timeout, cancellation).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EndpointLimit {
    pub fn new(policy: EndpointLimitConfig) -> EndpointLimit {
        EndpointLimit {
            slots: Arc::new(Semaphore::new(policy.max_connections)),
            waiting: AtomicUsize::new(0),
            policy,
        }
    }

    pub fn policy(&self) -> EndpointLimitConfig {
        self.policy
    }

    /// Requests holding a slot now.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.policy.max_connections - self.slots.available_permits()
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Takes a slot: at once when one is free, else after waiting in the queue (first come,
    /// first served) up to the queue timeout.
    pub(crate) async fn enter(&self) -> Result<EndpointSlot, Full> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(EndpointSlot { _permit: permit });
        }
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        if on_arrival(before, self.policy.max_queue) == Arrival::Full {
            return Err(Full::QueueFull(before));
        }
        let timeout = self.policy.queue_timeout;
        match tokio::time::timeout(timeout, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(EndpointSlot { _permit: permit }),
            // The semaphore is never closed; a closed one would mean no slot ever.
            Ok(Err(_)) | Err(_) => Err(Full::QueueTimeout(timeout)),
        }
    }
}

/// Connection permits per endpoint (scheme and authority), shared by the pools of one
/// `Upstreams`.
#[derive(Debug)]
pub(crate) struct ConnectionCaps {
    max: usize,
    wait: Duration,
    by_endpoint: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl ConnectionCaps {
    /// `wait`: how long a connect waits for a permit (the connect timeout).
    pub(crate) fn new(max: usize, wait: Duration) -> ConnectionCaps {
        ConnectionCaps {
            max,
            wait,
            by_endpoint: Mutex::new(HashMap::new()),
        }
    }

    #[cfg(test)]
    fn semaphore(&self, uri: &Uri) -> Arc<Semaphore> {
        self.semaphore_of(
            uri.scheme_str().unwrap_or("http"),
            uri.authority().map_or("", |a| a.as_str()),
        )
    }

    fn semaphore_of(&self, scheme: &str, authority: &str) -> Arc<Semaphore> {
        let key = format!("{scheme}://{authority}");
        // Only connects come here, never a pooled request: the lock is off the hot path.
        let mut map = self.by_endpoint.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max)))
            .clone()
    }

    /// A connection permit of the endpoint at `scheme://authority`, waiting up to the connect
    /// timeout for one to be freed.
    pub(crate) async fn permit(&self, scheme: &str, authority: &str) -> Result<OwnedSemaphorePermit, CapReached> {
        let semaphore = self.semaphore_of(scheme, authority);
        match tokio::time::timeout(self.wait, semaphore.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(CapReached(self.max)),
        }
    }

    /// Open connections to the endpoint of `uri` now.
    #[cfg(test)]
    pub(crate) fn open(&self, uri: &Uri) -> usize {
        self.max - self.semaphore(uri).available_permits()
    }
}

/// No connection permit within the wait: the endpoint already has its cap of connections.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("endpoint connection limit ({0}) reached")]
pub(crate) struct CapReached(pub usize);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connector whose connections each hold a permit of their endpoint's cap.
#[derive(Clone)]
pub(crate) struct CappedConnector<C> {
    inner: C,
    caps: Option<Arc<ConnectionCaps>>,
}

impl<C> CappedConnector<C> {
    pub(crate) fn new(inner: C, caps: Option<Arc<ConnectionCaps>>) -> CappedConnector<C> {
        CappedConnector { inner, caps }
    }
}

/// A connection and its endpoint permit, released when the connection closes.
pub(crate) struct Capped<T> {
    io: T,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<C> tower_service::Service<Uri> for CappedConnector<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = Capped<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // The clone is the one that was polled ready (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let caps = self.caps.clone();
        Box::pin(async move {
            let permit = match caps {
                Some(caps) => {
                    let scheme = uri.scheme_str().unwrap_or("http");
                    let authority = uri.authority().map_or("", |a| a.as_str());
                    Some(caps.permit(scheme, authority).await?)
                }
                None => None,
            };
            let io = inner.call(uri).await.map_err(Into::into)?;
            Ok(Capped { io, _permit: permit })
        })
    }
}

impl<T: Connection> Connection for Capped<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Capped<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Capped<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: usize, queue: usize, timeout_ms: u64) -> Arc<EndpointLimit> {
        Arc::new(EndpointLimit::new(EndpointLimitConfig {
            max_connections: max,
            max_queue: queue,
            queue_timeout: Duration::from_millis(timeout_ms),
        }))
    }

    #[test]
    fn queue_decision() {
        let cases = [
            (0, 0, Arrival::Full),
            (0, 1, Arrival::Wait),
            (1, 1, Arrival::Full),
            (3, 4, Arrival::Wait),
            (4, 4, Arrival::Full),
            (9, 4, Arrival::Full),
        ];
        for (waiting, max_queue, want) in cases {
            assert_eq!(
                on_arrival(waiting, max_queue),
                want,
                "{waiting} waiting, queue {max_queue}"
            );
        }
    }

    #[tokio::test]
    async fn slots_queue_and_release() {
        let l = limit(2, 1, 60_000);
        let a = l.enter().await.unwrap_or_else(|e| panic!("{e}"));
        let _b = l.enter().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.in_use(), 2);
        // The third waits; the fourth finds the one-place queue taken.
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await }
        });
        while l.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(l.enter().await.err(), Some(Full::QueueFull(1)));
        assert_eq!(l.waiting(), 1, "the refused one left no trace");
        drop(a);
        let c = waiter.await.unwrap_or_else(|e| panic!("{e}"));
        assert!(c.is_ok(), "the waiter got the freed slot");
        assert_eq!((l.in_use(), l.waiting()), (2, 0));
        drop(c);
        assert_eq!(l.in_use(), 1);
    }

    #[tokio::test]
    async fn a_wait_ends_at_the_queue_timeout() {
        let l = limit(1, 8, 500);
        let _a = l.enter().await.unwrap_or_else(|e| panic!("{e}"));
        // Paused time: the timeout fires as soon as the runtime is idle.
        assert_eq!(
            l.enter().await.err(),
            Some(Full::QueueTimeout(Duration::from_millis(500)))
        );
        assert_eq!((l.in_use(), l.waiting()), (1, 0));
    }

    #[tokio::test]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let l = limit(1, 8, 60_000);
        let a = l.enter().await.unwrap_or_else(|e| panic!("{e}"));
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.enter().await.map(drop) }
        });
        while l.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(l.waiting(), 0);
        drop(a);
        assert_eq!(l.in_use(), 0, "no slot leaked to the cancelled waiter");
        assert!(l.enter().await.is_ok());
    }

    #[test]
    fn connection_caps_are_per_endpoint() {
        let caps = ConnectionCaps::new(2, Duration::from_secs(1));
        let a: Uri = "http://10.0.0.1:8000/x".parse().unwrap_or_else(|e| panic!("{e}"));
        let a2: Uri = "http://10.0.0.1:8000/other".parse().unwrap_or_else(|e| panic!("{e}"));
        let b: Uri = "https://10.0.0.1:8000/x".parse().unwrap_or_else(|e| panic!("{e}"));
        let held = caps.semaphore(&a).try_acquire_owned().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(caps.open(&a2), 1, "same scheme and authority, same cap");
        assert_eq!(caps.open(&b), 0, "another scheme is another endpoint");
        drop(held);
        assert_eq!(caps.open(&a), 0);
    }
}
