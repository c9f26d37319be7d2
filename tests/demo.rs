//! `meridian demo`, the README's first command: its model servers answer as real ones do
//! and the tour's requests route as printed.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use support::chat;

/// Kills the demo however the test ends; on a failure, prints its log (the access log says
/// how each request ended).
struct Demo(std::process::Child, tempfile::NamedTempFile);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.1.path()).unwrap_or_default();
            eprintln!("--- the demo's log ---\n{log}");
        }
    }
}

#[tokio::test]
async fn demo_routes_the_tour_and_streams_tokens_with_usage() {
    let log = tempfile::NamedTempFile::new().expect("a temp file for the demo's log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("the log file reopens"))
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout is piped");
    let demo = Demo(child, log);
    // The reader keeps reading to the end: closing the pipe after the address line would
    // cut the rest of the tour off, as a user's `| head` would.
    let (found, address) = tokio::sync::oneshot::channel::<SocketAddr>();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let addr = line
                .split_once("the proxy on http://")
                .and_then(|(_, rest)| rest.split(',').next()?.parse().ok());
            if let Some(addr) = addr {
                if let Some(tx) = found.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let proxy = address.await.expect("the demo prints its proxy address");

    // The demo's health interval is 1 s and slow start 3 s; answers come at once, though:
    // a region with no probe result yet is served.
    let us = chat(proxy, &[("x-forwarded-for", "8.8.8.8")], r#"{"model":"demo"}"#).await;
    assert_eq!(us.status, 200, "{}", us.text());
    assert_eq!(us.region(), Some("us-east"));
    assert_eq!(us.json()["usage"]["completion_tokens"], 8);

    let gb = chat(
        proxy,
        &[("x-forwarded-for", "81.2.69.142")],
        r#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await;
    assert_eq!(gb.status, 200, "{}", gb.text());
    assert_eq!(gb.region(), Some("uk-south"));
    assert_eq!(gb.header("content-type"), Some("text/event-stream"));
    let text = gb.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| e.starts_with("data: ")).collect();
    assert_eq!(events.len(), 10, "8 tokens, a usage chunk and [DONE]: {text}");
    assert!(events[4].contains("uk-south"), "{text}");
    assert!(events[8].contains(r#""completion_tokens":8"#), "{text}");
    assert_eq!(events[9], "data: [DONE]");
    drop(demo);
}

/// A reader that goes away (`meridian demo | head -3`) is no reason to stop serving: the
/// tour cannot be printed, the proxy keeps answering.
#[tokio::test]
async fn demo_keeps_serving_when_its_reader_goes_away() {
    let log = tempfile::NamedTempFile::new().expect("a temp file for the demo's log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(log.reopen().expect("the log file reopens"))
        .spawn()
        .expect("demo starts");
    drop(child.stdout.take());
    let mut demo = Demo(child, log);

    // The address comes from the log now; the warning follows the failed write.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let proxy: SocketAddr = loop {
        let text = std::fs::read_to_string(demo.1.path()).unwrap_or_default();
        if text.contains("the demo tour could not be printed") {
            let addr = text
                .split("listen=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            break addr.expect("the log names the listener");
        }
        if let Ok(Some(status)) = demo.0.try_wait() {
            panic!("the demo ended ({status}) when its reader went away:\n{text}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no warning about the tour in: {text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let us = chat(proxy, &[("x-forwarded-for", "8.8.8.8")], r#"{"model":"demo"}"#).await;
    assert_eq!(us.status, 200, "{}", us.text());
    assert_eq!(us.region(), Some("us-east"));
    drop(demo);
}
