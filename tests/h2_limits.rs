//! HTTP/2 limits on the client listener, with raw frames: the advertised stream and header
//! list limits, and the reset-flood guards (CVE-2023-44487 "rapid reset" and floods of
//! malformed streams) that end the connection with `GOAWAY ENHANCE_YOUR_CALM`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for a valid `GET /` request: static-table `:method GET`, `:scheme http`, `:path /`,
/// and `:authority a` as a literal without indexing.
fn valid_headers() -> Vec<u8> {
    vec![0x82, 0x86, 0x84, 0x01, 0x01, b'a']
}

/// Writes `flood` while reading what the server sends, until it closes the connection or
/// goes quiet. Reading all along matters: a server that closes with our frames still
/// unread makes the kernel answer with a TCP reset, which discards what we had not read.
async fn exchange(s: TcpStream, flood: Vec<u8>) -> Vec<(u8, u32, Vec<u8>)> {
    let (mut rd, mut wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(3), rd.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf
    });
    for piece in flood.chunks(4096) {
        if wr.write_all(piece).await.is_err() {
            break;
        }
    }
    let buf = reader.await.unwrap_or_default();
    let mut frames = Vec::new();
    let mut at = 0;
    while buf.len() >= at + 9 {
        let len = (usize::from(buf[at]) << 16) | (usize::from(buf[at + 1]) << 8) | usize::from(buf[at + 2]);
        if buf.len() < at + 9 + len {
            break;
        }
        let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]) & 0x7fff_ffff;
        frames.push((buf[at + 3], stream, buf[at + 9..at + 9 + len].to_vec()));
        at += 9 + len;
    }
    frames
}

fn goaway_code(frames: &[(u8, u32, Vec<u8>)]) -> Option<u32> {
    frames
        .iter()
        .find(|(kind, _, p)| *kind == GOAWAY && p.len() >= 8)
        .map(|(_, _, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
}

async fn open(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    s
}

#[tokio::test]
async fn stream_and_header_list_limits_are_advertised() {
    let (_up, proxy) = one_region("http2_max_concurrent_streams = 7\nmax_header_bytes = \"16KiB\"\n").await;
    let mut s = open(proxy.listen).await;
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(n >= 9 && buf[3] == SETTINGS, "the server speaks first with SETTINGS");
    let len = (usize::from(buf[1]) << 8) | usize::from(buf[2]);
    let settings: Vec<(u16, u32)> = buf[9..9 + len]
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(
        settings.contains(&(0x3, 7)),
        "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    // `max_header_bytes` plus what HTTP/2 counts beyond HTTP/1.1 for a head of
    // `max_headers` (100) fields and the pseudo-header fields: 32 bytes each.
    assert!(
        settings.contains(&(0x6, 16 * 1024 + 32 * (100 + 5))),
        "SETTINGS_MAX_HEADER_LIST_SIZE: {settings:?}"
    );
}

#[tokio::test]
async fn a_flood_of_malformed_streams_ends_the_connection() {
    let (up, proxy) = one_region("").await;
    let s = open(proxy.listen).await;
    // A connection-specific header makes each request malformed (RFC 9113 §8.2.2): the
    // server resets the stream. The guard allows 100 such resets per connection.
    let mut malformed = valid_headers();
    malformed.extend([0x00, 10]);
    malformed.extend(b"connection");
    malformed.extend([1, b'x']);
    let mut flood = Vec::new();
    for i in 0..300u32 {
        flood.extend(frame(HEADERS, 0x5, 1 + 2 * i, &malformed));
    }
    let frames = exchange(s, flood).await;
    let resets = frames.iter().filter(|f| f.0 == RST_STREAM).count();
    assert_eq!(
        goaway_code(&frames),
        Some(ENHANCE_YOUR_CALM),
        "no GOAWAY after {resets} resets"
    );
    assert!(resets <= 101, "{resets} streams reset before the connection was closed");
    assert_eq!(up.requests(), 0);
    // The listener itself keeps serving.
    assert_eq!(get_as(proxy.listen, ips::US, "/").await.status, 200);
}

#[tokio::test]
async fn rapid_reset_ends_the_connection() {
    let (_up, proxy) = one_region("").await;
    let s = open(proxy.listen).await;
    // Open a stream and cancel it at once, many times in one write: the server has not
    // accepted them yet when the resets arrive. The guard allows 50 such streams pending.
    let mut flood = Vec::new();
    for i in 0..1000u32 {
        let id = 1 + 2 * i;
        flood.extend(frame(HEADERS, 0x5, id, &valid_headers()));
        flood.extend(frame(RST_STREAM, 0, id, &0x8u32.to_be_bytes()));
    }
    let frames = exchange(s, flood).await;
    assert_eq!(
        goaway_code(&frames),
        Some(ENHANCE_YOUR_CALM),
        "{} frames, no GOAWAY",
        frames.len()
    );
    assert_eq!(get_as(proxy.listen, ips::US, "/").await.status, 200);
}
