//! A minimal, fast HTTP/1.1 upstream for load benchmarks: a fixed small body on any path,
//! and an SSE stream on `/sse` whose first event leaves with the response head.
//! `/sse?events=N&gap_ms=MS` sends N events MS apart instead of 3 events 5 ms apart (then
//! `data: [DONE]`), for streams held long enough to measure memory mid-stream.
//!
//! Usage: `fast_upstream [ADDR]` (default 127.0.0.1:18080). One current-thread runtime, so
//! it costs one core at most and leaves the other to the proxy under test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{Either, Full, StreamBody};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

/// About the size of a short JSON answer; small enough that the proxy, not the copy, is measured.
const BODY: &[u8] =
    b"{\"id\":\"bench\",\"object\":\"chat.completion\",\"choices\":[{\"message\":{\"content\":\"ok\"}}]}\n";
const SSE_EVENTS: usize = 3;
const SSE_GAP: Duration = Duration::from_millis(5);

type Body = Either<Full<Bytes>, StreamBody<tokio_stream::ReceiverStream>>;

mod tokio_stream {
    //! The few lines of a channel-backed frame stream, to avoid a dependency.
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use bytes::Bytes;
    use hyper::body::Frame;
    use tokio::sync::mpsc;

    pub struct ReceiverStream(pub mpsc::Receiver<Bytes>);

    impl futures_core::Stream for ReceiverStream {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
        }
    }
}

/// `events` and `gap_ms` from a `/sse` query, each defaulting to the short stream's.
fn sse_shape(query: Option<&str>) -> (usize, Duration) {
    let (mut events, mut gap) = (SSE_EVENTS, SSE_GAP);
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("events", v)) => events = v.parse().unwrap_or(events).max(1),
            Some(("gap_ms", v)) => gap = v.parse().map(Duration::from_millis).unwrap_or(gap),
            _ => {}
        }
    }
    (events, gap)
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    if req.uri().path() == "/sse" {
        let (events, gap) = sse_shape(req.uri().query());
        let (tx, rx) = mpsc::channel(2);
        // The first event is queued before the head is returned, so hyper writes both at once.
        let _ = tx.try_send(Bytes::from_static(b"data: {\"n\":0}\n\n"));
        tokio::spawn(async move {
            for n in 1..events {
                tokio::time::sleep(gap).await;
                if tx.send(Bytes::from(format!("data: {{\"n\":{n}}}\n\n"))).await.is_err() {
                    return;
                }
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let mut resp = Response::new(Either::Right(StreamBody::new(tokio_stream::ReceiverStream(rx))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
        return Ok(resp);
    }
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from_static(BODY))));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{a}: {e}")))?,
        None => SocketAddr::from(([127, 0, 0, 1], 18080)),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        // A deep accept queue, as Meridian's: proxies open hundreds of connections at once in a burst.
        let listener = meridian::listen::bind(addr)?;
        eprintln!("fast_upstream listening on {}", listener.local_addr()?);
        // Accepted connections, so a run can check that the proxy reuses its upstream connections.
        let accepted = Arc::new(AtomicU64::new(0));
        let report = accepted.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = report.load(Ordering::Relaxed);
                if now != last {
                    eprintln!("fast_upstream connections accepted: {now}");
                    last = now;
                }
            }
        });
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            accepted.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service_fn(handle))
                    .await;
            });
        }
    })
}
