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
    let proxy: SocketAddr = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout).lines().map_while(Result::ok).find_map(|line| {
            let (_, rest) = line.split_once("the proxy on http://")?;
            rest.split(',').next()?.parse().ok()
        })
    })
    .await
    .expect("reader task")
    .expect("the demo prints its proxy address");

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
