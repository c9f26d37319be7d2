//! The traffic a profile-guided release build learns from (`scripts/release-build.sh`), and
//! the smoke test of the build it produces.
//!
//! `profile_load MERIDIAN_BINARY [REQUESTS]` starts `fast_upstream` (beside this example) and
//! the given Meridian binary on free loopback ports, sends it the shapes of traffic the
//! benchmarks measure and operators run — HTTP/1.1 keep-alive GETs and 4 KiB POSTs, SSE
//! streams, h2c, HTTPS over HTTP/1.1 and HTTP/2 with fresh handshakes, then the same again
//! with the access log on after a reload — checks every answer, and stops Meridian with
//! SIGTERM so an instrumented build writes its profile. It exits non-zero when any answer
//! is wrong or Meridian does not exit cleanly, so the optimised binary can be run through
//! it too. REQUESTS (default 20,000) is the count of each kind of plain request.
//!
//! Code that this traffic never reaches is laid out as cold by the optimiser: it still runs,
//! only from further away. So the mix follows what an inference edge serves, not the tests.

use std::error::Error;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

type BoxError = Box<dyn Error + Send + Sync>;

/// Client addresses the embedded country database places in different regions (GB, US,
/// DE, unknown), behind the trusted loopback hop.
const CLIENTS: [&str; 4] = ["81.2.69.142", "8.8.8.8", "91.198.174.192", "10.1.2.3"];
const CONNECTIONS: usize = 32;
const STARTUP: Duration = Duration::from_secs(20);

#[derive(Clone, Copy)]
enum Kind {
    Get,
    Post,
    Sse,
}

/// A request of `kind` from client `n`.
fn request(kind: Kind, n: usize, body: &Bytes) -> http::Result<http::Request<Full<Bytes>>> {
    let builder = http::Request::builder()
        .header("host", "localhost")
        .header("x-forwarded-for", CLIENTS[n % CLIENTS.len()])
        .header("user-agent", "profile_load");
    match kind {
        Kind::Get => builder.uri("/v1/models").body(Full::new(Bytes::new())),
        Kind::Sse => builder
            .uri("/sse")
            .header("accept", "text/event-stream")
            .body(Full::new(Bytes::new())),
        Kind::Post => builder
            .method("POST")
            .uri("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-profile")
            .body(Full::new(body.clone())),
    }
}

/// A 4 KiB chat request, the size of a short conversation.
fn chat_body() -> Bytes {
    let content = "x".repeat(4096 - 80);
    Bytes::from(format!(
        "{{\"model\":\"m\",\"stream\":false,\"messages\":[{{\"role\":\"user\",\"content\":\"{content}\"}}]}}"
    ))
}

async fn check(resp: http::Response<hyper::body::Incoming>, kind: Kind) -> Result<(), BoxError> {
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != 200 || body.is_empty() {
        return Err(format!("answer {status} with {} bytes", body.len()).into());
    }
    if matches!(kind, Kind::Sse) && !body.ends_with(b"data: [DONE]\n\n") {
        return Err("SSE stream without its [DONE] event".into());
    }
    Ok(())
}

/// `count` requests of `kind`, one after another, on one HTTP/1.1 connection over `io`.
async fn h1_run<I>(io: I, kind: Kind, count: usize, body: Bytes) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    for n in 0..count {
        sender.ready().await?;
        check(sender.send_request(request(kind, n, &body)?).await?, kind).await?;
    }
    Ok(())
}

/// `count` requests alternating GET and POST, 16 at a time, on one HTTP/2 connection.
async fn h2_run<I>(io: I, count: usize, body: Bytes) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let mut streams = tokio::task::JoinSet::new();
    for lane in 0..16 {
        let mut sender = sender.clone();
        let body = body.clone();
        streams.spawn(async move {
            for n in (lane..count).step_by(16) {
                let kind = if n % 4 == 0 { Kind::Post } else { Kind::Get };
                sender.ready().await?;
                check(sender.send_request(request(kind, n, &body)?).await?, kind).await?;
            }
            Ok::<_, BoxError>(())
        });
    }
    join_all(streams).await
}

async fn join_all(mut set: tokio::task::JoinSet<Result<(), BoxError>>) -> Result<(), BoxError> {
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(())
}

struct Target {
    plain: SocketAddr,
    tls: SocketAddr,
    /// Offering only h2, or only http/1.1: Meridian prefers h2 when both are offered.
    tls_h2: tokio_rustls::TlsConnector,
    tls_h1: tokio_rustls::TlsConnector,
}

impl Target {
    async fn tcp(&self) -> Result<TcpStream, BoxError> {
        let stream = TcpStream::connect(self.plain).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    async fn tls(&self, h2: bool) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
        let stream = TcpStream::connect(self.tls).await?;
        stream.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let (connector, alpn) = if h2 {
            (&self.tls_h2, b"h2".as_slice())
        } else {
            (&self.tls_h1, b"http/1.1".as_slice())
        };
        let stream = connector.connect(name, stream).await?;
        if stream.get_ref().1.alpn_protocol() != Some(alpn) {
            return Err("Meridian did not agree to the one protocol offered".into());
        }
        Ok(stream)
    }
}

/// Every kind of traffic once; `requests` of each plain kind.
async fn traffic(target: Arc<Target>, requests: usize) -> Result<(), BoxError> {
    let body = chat_body();
    let per_conn = requests.div_ceil(CONNECTIONS);
    let mut set = tokio::task::JoinSet::new();
    for kind in [Kind::Get, Kind::Post] {
        for _ in 0..CONNECTIONS {
            let (target, body) = (target.clone(), body.clone());
            set.spawn(async move { h1_run(target.tcp().await?, kind, per_conn, body).await });
        }
        join_all(std::mem::take(&mut set)).await?;
    }
    // SSE: short streams (three events 5 ms apart), 16 at a time.
    for _ in 0..16 {
        let (target, body) = (target.clone(), body.clone());
        set.spawn(async move { h1_run(target.tcp().await?, Kind::Sse, 20, body).await });
    }
    join_all(std::mem::take(&mut set)).await?;
    for _ in 0..4 {
        let (target, body) = (target.clone(), body.clone());
        set.spawn(async move { h2_run(target.tcp().await?, requests / 4, body).await });
    }
    join_all(std::mem::take(&mut set)).await?;
    // HTTPS: keep-alive HTTP/1.1 on most connections, HTTP/2 on every fourth, then fresh
    // handshakes with one request each.
    for n in 0..CONNECTIONS {
        let (target, body) = (target.clone(), body.clone());
        set.spawn(async move {
            if n % 4 == 0 {
                h2_run(target.tls(true).await?, per_conn, body).await
            } else {
                let kind = if n % 4 == 1 { Kind::Post } else { Kind::Get };
                h1_run(target.tls(false).await?, kind, per_conn, body).await
            }
        });
    }
    join_all(std::mem::take(&mut set)).await?;
    for _ in 0..(requests / 20).max(1) {
        h1_run(target.tls(false).await?, Kind::Get, 1, body.clone()).await?;
    }
    Ok(())
}

/// `N` distinct free loopback ports: the sockets are held until all are picked (one at a
/// time, the kernel may hand the same port out twice).
fn free_ports<const N: usize>() -> std::io::Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        *port = listener.local_addr()?.port();
        held.push(listener);
    }
    Ok(ports)
}

/// The benchmark's region map (benches/load/meridian.toml) on the given ports, written out
/// here because the container build's context leaves benches/load/ out.
fn config(dir: &Path, plain: u16, tls: u16, admin: u16, upstream: u16, access_log: bool) -> String {
    let dir = dir.display();
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:{plain}\"\ntls_listen = \"127.0.0.1:{tls}\"\n\
         tls_cert = \"{dir}/cert.pem\"\ntls_key = \"{dir}/key.pem\"\nworker_threads = 1\n\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\n\
         [geoip]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndefault_region = \"us-east\"\n\n\
         [log]\naccess_log = {access_log}\n\n[upstream]\nkeepalive = 256\n\n\
         [[residency]]\nname = \"uk\"\ncountries = [\"GB\"]\nregions = [\"uk-south\"]\n\n"
    );
    for (name, location, countries) in [
        ("us-east", "[39.04, -77.49]", "[\"US\", \"CA\"]"),
        ("eu-west", "[53.35, -6.26]", "[\"IE\", \"FR\", \"DE\", \"NL\"]"),
        ("uk-south", "[51.51, -0.13]", "[\"GB\"]"),
    ] {
        text.push_str(&format!(
            "[[region]]\nname = \"{name}\"\nlocation = {location}\ncountries = {countries}\n\
             endpoints = [\"http://127.0.0.1:{upstream}\"]\n\n"
        ));
    }
    text
}

/// Kills the child when dropped (an error path), unless it was already waited for.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn signal(child: &Child, signal: libc::c_int) -> Result<(), BoxError> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) on a child this process started and has not yet waited for.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Polls until Meridian answers through the upstream; an error at once when either
/// process has exited (a port taken between its pick and the bind, say).
async fn wait_until_serving(target: &Target, meridian: &mut Child, upstream: &mut Child) -> Result<(), BoxError> {
    let start = Instant::now();
    loop {
        if let Some(status) = meridian.try_wait()? {
            return Err(format!("Meridian exited at start ({status})").into());
        }
        if let Some(status) = upstream.try_wait()? {
            return Err(format!("the upstream exited at start ({status})").into());
        }
        let attempt = async { h1_run(target.tcp().await?, Kind::Get, 1, Bytes::new()).await };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() > STARTUP => return Err(format!("Meridian not serving: {e}").into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Tries to start on other ports when a start fails: free ports are picked before the
/// processes bind them, and on a busy machine another process may take one in between.
const START_ATTEMPTS: usize = 3;

fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let binary = PathBuf::from(args.next().ok_or("usage: profile_load MERIDIAN_BINARY [REQUESTS]")?);
    let requests: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(20_000);
    let dir = tempfile::tempdir()?;
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    std::fs::write(dir.path().join("cert.pem"), cert.pem())?;
    std::fs::write(dir.path().join("key.pem"), signing_key.serialize_pem())?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
    let connector = |alpn: &[u8]| -> Result<tokio_rustls::TlsConnector, BoxError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        client.alpn_protocols = vec![alpn.to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
    };
    let log_text = || std::fs::read_to_string(dir.path().join("meridian.log")).unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let upstream_bin = std::env::current_exe()?.with_file_name("fast_upstream");
    let config_path = dir.path().join("meridian.toml");

    let mut attempt = 1;
    let ([plain, tls, admin, up], _upstream, mut meridian, target) = loop {
        let ports @ [plain, tls, admin, up] = free_ports()?;
        let mut upstream = Reaped(
            Command::new(&upstream_bin)
                .arg(format!("127.0.0.1:{up}"))
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("{}: {e}", upstream_bin.display()))?,
        );
        std::fs::write(&config_path, config(dir.path(), plain, tls, admin, up, false))?;
        let log = std::fs::File::create(dir.path().join("meridian.log"))?;
        let mut meridian = Reaped(
            Command::new(&binary)
                .arg("run")
                .arg("--config")
                .arg(&config_path)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("{}: {e}", binary.display()))?,
        );
        let target = Arc::new(Target {
            plain: SocketAddr::from(([127, 0, 0, 1], plain)),
            tls: SocketAddr::from(([127, 0, 0, 1], tls)),
            tls_h2: connector(b"h2")?,
            tls_h1: connector(b"http/1.1")?,
        });
        match runtime.block_on(wait_until_serving(&target, &mut meridian.0, &mut upstream.0)) {
            Ok(()) => break (ports, upstream, meridian, target),
            Err(e) if attempt < START_ATTEMPTS => {
                eprintln!("profile_load: {e}; starting again on other ports\n{}", log_text());
                attempt += 1;
            }
            Err(e) => return Err(format!("{e}\nMeridian's log:\n{}", log_text()).into()),
        }
    };

    let outcome = runtime.block_on(async {
        let start = Instant::now();
        traffic(target.clone(), requests).await?;
        // The same with the access log on, as most deployments run, once the reload is in
        // force (polled in the log with a deadline, not assumed after a sleep).
        std::fs::write(&config_path, config(dir.path(), plain, tls, admin, up, true))?;
        signal(&meridian.0, libc::SIGHUP)?;
        let deadline = Instant::now() + STARTUP;
        while !log_text().contains("config reloaded") {
            if Instant::now() > deadline {
                return Err("the access-log reload did not happen".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        traffic(target.clone(), requests / 4).await?;
        eprintln!("profile_load: traffic done in {:.1} s", start.elapsed().as_secs_f64());
        Ok::<_, BoxError>(())
    });
    if let Err(e) = outcome {
        return Err(format!("{e}\nMeridian's log:\n{}", log_text()).into());
    }
    signal(&meridian.0, libc::SIGTERM)?;
    let deadline = Instant::now() + STARTUP;
    let status = loop {
        if let Some(status) = meridian.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            return Err("Meridian did not exit after SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        return Err(format!("Meridian exited with {status}; its log:\n{}", log_text()).into());
    }
    Ok(())
}
