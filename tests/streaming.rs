//! Streaming both ways through the real binary: SSE unbuffered, request bodies intact,
//! size limits, HTTP/2 cleartext.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;

#[tokio::test]
async fn sse_events_arrive_one_by_one_without_buffering() {
    let (up, proxy) = one_region("").await;
    up.set_behavior(Behavior::Gated { events: 3 });
    let resp = send_from(
        "127.0.0.1".parse().unwrap(),
        proxy.listen,
        chat_request(
            proxy.listen,
            &[("content-type", "application/json")],
            r#"{"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-meridian-region"], "us-east");
    let mut body = resp.into_body();
    // The endpoint withholds event 2 until we hold event 1: a buffering proxy would
    // deadlock here and the test would time out.
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("first event arrives while the endpoint waits")
        .unwrap()
        .unwrap();
    let first = first.into_data().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    assert!(String::from_utf8_lossy(&first).contains("\"index\":0"));
    up.release();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("rest arrives")
        .unwrap()
        .to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("\"index\":1") && rest.contains("\"index\":2"), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test]
async fn post_bodies_arrive_intact_small_and_streamed() {
    let (up, proxy) = one_region("").await;
    // 10 KiB kept for replay, 3 MiB streamed past the replay limit.
    for size in [10 * 1024, 3 * 1024 * 1024] {
        let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let r = call(
            "POST",
            proxy.listen,
            "/v1/embeddings",
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = up.seen();
        let last = seen.last().unwrap();
        assert_eq!(last.method, "POST");
        assert_eq!(last.body.len(), size);
        assert!(last.body == body, "body of {size} bytes changed on the way");
    }
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let (up, proxy) = one_region("max_request_body = \"16KiB\"\n").await;
    let r = chat(proxy.listen, &[], vec![b'x'; 17 * 1024]).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    // Exactly at the limit passes.
    let r = chat(proxy.listen, &[], vec![b'x'; 16 * 1024]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.requests(), 1);
}

#[tokio::test]
async fn chunked_bodies_over_the_limit_get_413() {
    let (up, proxy) = one_region("max_request_body = \"16KiB\"\n").await;
    // No content-length: the limit trips while reading.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(4);
    tokio::spawn(async move {
        for _ in 0..40 {
            if tx
                .send(Ok(hyper::body::Frame::data(Bytes::from(vec![b'y'; 1024]))))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/v1/x", proxy.listen))
        .header("host", "meridian")
        .body(body)
        .unwrap();
    let stream = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(up.requests(), 0);
}

fn tokio_stream_from<T: Send + 'static>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    let _ = &mut rx;
    S(rx)
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let (up, proxy) = one_region("").await;
    let stream = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/v1/chat/completions", proxy.listen))
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .unwrap();
    let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-meridian-region"], "us-east");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"));
    // The endpoint got an HTTP/1.1 request with a Host header built from :authority.
    let seen = up.seen();
    assert_eq!(seen[0].headers["host"], proxy.listen.to_string());
    let _ = Duration::ZERO;
}

/// An HTTP/2 answer with no body (here a `HEAD`'s) ends as complete, and one whose body
/// came whole with its head arrives whole: neither waits on a pump for the client.
#[tokio::test]
async fn h2c_answers_in_hand_are_sent_and_logged_complete() {
    let (_up, proxy) = one_region("").await;
    let stream = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for method in ["HEAD", "GET"] {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/v1/models", proxy.listen))
            .header("x-request-id", format!("h2-{method}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{method}");
        let length = resp.headers().get("content-length").cloned();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if method == "GET" {
            assert!(!body.is_empty());
            assert_eq!(
                length.as_ref().map(|l| l.to_str().unwrap()),
                Some(body.len().to_string().as_str())
            );
        } else {
            assert!(body.is_empty());
        }
        let id = format!("\"request_id\":\"h2-{method}\"");
        eventually(&format!("{method} logged complete"), || async {
            proxy
                .logs()
                .iter()
                .any(|l| l.contains(&id) && l.contains("\"end\":\"complete\""))
        })
        .await;
    }
}
