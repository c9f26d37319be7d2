//! Probes for the load benchmark that wrk cannot do: SSE first-event latency and many idle
//! client connections.
//!
//! `load_probe sse ADDR COUNT`: COUNT fresh connections, each `GET /sse`; prints the time from
//! sending the request to reading the first `data:` line (min, median, p90, p99, in µs).
//!
//! `load_probe idle ADDR COUNT HOLD_SECS`: opens COUNT keep-alive connections, sends one small
//! request on each (so the proxy has a served, idle connection, not a half-open one), prints
//! `ready N`, holds them HOLD_SECS, then closes them all.
//!
//! `load_probe burst ADDR COUNT HOLD_SECS`: a burst of chat clients: opens COUNT connections,
//! then sends one request on every one of them back to back before reading any answer (so
//! the proxy has them all in flight at once), prints `ready N` once all are answered, holds
//! the idle connections HOLD_SECS, then closes them all and prints `closed`.
//!
//! `load_probe streams ADDR COUNT EVENTS GAP_MS`: COUNT concurrent SSE streams, each
//! `GET /sse?events=EVENTS&gap_ms=GAP_MS` on its own connection (at most 256 waiting for
//! their first event at a time, so no accept queue overflows); prints `ready N` once every
//! stream has its first event, `mid open N` a second later (streams still open then: the
//! moment the caller samples memory), and `done ok N events E` at the end (streams that
//! saw all their events and `[DONE]`).
//!
//! `load_probe keepalive ADDR CONNS REQUESTS`: REQUESTS keep-alive requests spread over CONNS
//! connections (one thread each), for instruction counts where h2load is not installed;
//! prints `requests: N ok`.

use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: load_probe sse|idle|burst|keepalive|streams ADDR COUNT [HOLD_SECS|REQUESTS|EVENTS GAP_MS]",
        )
    };
    let mode = args.get(1).ok_or_else(usage)?;
    let addr: SocketAddr = args.get(2).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
    let count: usize = args.get(3).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
    match mode.as_str() {
        "sse" => sse(addr, count),
        "idle" => {
            let hold: u64 = args.get(4).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            idle(addr, count, Duration::from_secs(hold))
        }
        "burst" => {
            let hold: u64 = args.get(4).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            burst(addr, count, Duration::from_secs(hold))
        }
        "keepalive" => {
            let requests: usize = args.get(4).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            keepalive(addr, count, requests)
        }
        "streams" => {
            let events: usize = args.get(4).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            let gap: u64 = args.get(5).and_then(|a| a.parse().ok()).ok_or_else(usage)?;
            streams(addr, count, events, gap)
        }
        _ => Err(usage()),
    }
}

fn streams(addr: SocketAddr, count: usize, events: usize, gap_ms: u64) -> io::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let request = format!(
            "GET /sse?events={events}&gap_ms={gap_ms} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\nX-Forwarded-For: 81.2.69.142\r\n\r\n"
        );
        let request: Arc<[u8]> = Arc::from(request.into_bytes());
        // Streams waiting for their first event; streams open (first event seen, not done).
        let waiting = Arc::new(tokio::sync::Semaphore::new(256));
        let open = Arc::new(AtomicUsize::new(0));
        let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let Ok(permit) = waiting.clone().acquire_owned().await else {
                break;
            };
            let mut stream = match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("streams: connection {i}: {e}");
                    break;
                }
            };
            let (request, open, first_tx) = (request.clone(), open.clone(), first_tx.clone());
            tasks.push(tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let mut permit = Some(permit);
                let mut buf = [0u8; 2048];
                // `data:` lines seen, with the last 4 bytes of the previous read carried over.
                let (mut seen, mut carry, mut done) = (0usize, Vec::<u8>::with_capacity(16), false);
                if stream.write_all(&request).await.is_err() {
                    let _ = first_tx.send(false);
                    return (0, false);
                }
                loop {
                    let n = match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    carry.extend_from_slice(&buf[..n]);
                    seen += carry.windows(5).filter(|w| w == b"data:").count();
                    done |= carry.windows(6).any(|w| w == b"[DONE]");
                    let keep = carry.len().min(5);
                    carry.drain(..carry.len() - keep);
                    if seen > 0 && permit.take().is_some() {
                        open.fetch_add(1, Ordering::Relaxed);
                        let _ = first_tx.send(true);
                    }
                    if done {
                        break;
                    }
                }
                if permit.is_some() {
                    let _ = first_tx.send(false);
                } else {
                    open.fetch_sub(1, Ordering::Relaxed);
                }
                (seen, done)
            }));
        }
        drop(first_tx);
        let (mut firsts, mut failed) = (0, 0);
        while firsts + failed < tasks.len() {
            match first_rx.recv().await {
                Some(true) => firsts += 1,
                Some(false) => failed += 1,
                None => break,
            }
        }
        eprintln!("streams: {firsts} streams open in {:?}, {failed} failed", started.elapsed());
        println!("ready {firsts}");
        io::stdout().flush()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!("mid open {}", open.load(Ordering::Relaxed));
        io::stdout().flush()?;
        let (mut ok, mut total) = (0, 0);
        for t in tasks {
            if let Ok((seen, done)) = t.await {
                total += seen;
                // Every event plus `[DONE]`.
                ok += usize::from(done && seen == events + 1);
            }
        }
        println!("done ok {ok} events {total}");
        io::stdout().flush()
    })
}

/// A GB client behind the trusted loopback hop, as compare.sh's wrk runs send.
const MODELS: &[u8] = b"GET /v1/models HTTP/1.1\r\nHost: bench\r\nX-Forwarded-For: 81.2.69.142\r\n\r\n";

fn burst(addr: SocketAddr, count: usize, hold: Duration) -> io::Result<()> {
    let mut open = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        match TcpStream::connect(addr) {
            Ok(s) => open.push(s),
            Err(e) => {
                eprintln!("connection {i}: {e}");
                break;
            }
        }
    }
    eprintln!("burst: {} connected in {:?}", open.len(), started.elapsed());
    // Every request leaves before any answer is read: the proxy sees the whole burst at once.
    for stream in &mut open {
        stream.set_nodelay(true)?;
        stream.write_all(MODELS)?;
    }
    let mut buf = vec![0u8; 4096];
    let (mut answered, mut ok, mut failed) = (0, 0, 0);
    for stream in &mut open {
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        match read_response(stream, &mut buf) {
            Ok(()) => {
                answered += 1;
                ok += usize::from(buf.starts_with(b"HTTP/1.1 200"));
            }
            Err(e) => {
                if failed < 3 {
                    eprintln!("burst: no answer: {e}");
                }
                failed += 1;
            }
        }
    }
    if answered > ok || failed > 0 {
        eprintln!(
            "burst: {ok} answered 200, {} other statuses, {failed} not answered",
            answered - ok
        );
    }
    println!("ready {answered}");
    io::stdout().flush()?;
    std::thread::sleep(hold);
    drop(open);
    println!("closed");
    io::stdout().flush()
}

fn keepalive(addr: SocketAddr, conns: usize, requests: usize) -> io::Result<()> {
    let conns = conns.max(1);
    let workers: Vec<_> = (0..conns)
        .map(|i| {
            // The first connections take the remainder, so the total is exact.
            let mine = requests / conns + usize::from(i < requests % conns);
            std::thread::spawn(move || -> io::Result<usize> {
                let mut stream = TcpStream::connect(addr)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(Duration::from_secs(60)))?;
                let mut buf = vec![0u8; 4096];
                for _ in 0..mine {
                    stream.write_all(MODELS)?;
                    read_response(&mut stream, &mut buf)?;
                }
                Ok(mine)
            })
        })
        .collect();
    let mut ok = 0;
    for w in workers {
        match w.join() {
            Ok(Ok(n)) => ok += n,
            Ok(Err(e)) => eprintln!("connection failed: {e}"),
            Err(_) => eprintln!("a client thread panicked"),
        }
    }
    println!("requests: {ok} ok");
    if ok == requests {
        Ok(())
    } else {
        Err(io::Error::other(format!("{ok} of {requests} requests answered")))
    }
}

fn sse(addr: SocketAddr, count: usize) -> io::Result<()> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = io::BufReader::new(stream.try_clone()?);
        let start = Instant::now();
        stream
            .write_all(b"GET /sse HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n")?;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "stream ended before an event",
                ));
            }
            // Chunked framing puts the size on its own line; the event line starts with `data:`.
            if line.starts_with("data:") {
                break;
            }
        }
        samples.push(start.elapsed());
        drop(reader);
        drop(stream);
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6;
    println!(
        "sse_first_event_us min={:.0} p50={:.0} p90={:.0} p99={:.0} n={}",
        at(0.0),
        at(0.5),
        at(0.9),
        at(0.99),
        samples.len()
    );
    Ok(())
}

fn idle(addr: SocketAddr, count: usize, hold: Duration) -> io::Result<()> {
    let mut open = Vec::with_capacity(count);
    let mut buf = vec![0u8; 4096];
    for i in 0..count {
        let mut stream = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("connection {i}: {e}");
                break;
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        read_response(&mut stream, &mut buf)?;
        open.push(stream);
    }
    println!("ready {}", open.len());
    io::stdout().flush()?;
    std::thread::sleep(hold);
    Ok(())
}

/// Reads one response with a `Content-Length` body.
fn read_response(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<()> {
    let mut have = 0;
    loop {
        let n = stream.read(&mut buf[have..])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed mid-response"));
        }
        have += n;
        let text = &buf[..have];
        if let Some(end) = text.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&text[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if have >= end + 4 + len {
                return Ok(());
            }
        }
        if have == buf.len() {
            return Err(io::Error::other("response larger than the probe's buffer"));
        }
    }
}
