//! Test support: run the real `meridian` binary with a config, fake endpoints on loopback,
//! and small HTTP clients (from 127.0.0.1 or another loopback source address).
#![allow(dead_code, unused_imports)]

pub mod certs;
pub mod mmdb;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

pub mod upstream;
pub use upstream::{Behavior, FakeUpstream};

/// Generous deadline for conditions polled in tests; machines are shared and slow.
/// An endpoint URL nothing listens on, and nothing ever will: no test binds 127.0.0.3, so
/// unlike a killed upstream's port it cannot be taken by another test running in parallel.
/// `n` tells several dead endpoints apart.
pub fn dead_endpoint(n: u16) -> String {
    format!("http://127.0.0.3:{}", n.max(1))
}

pub const DEADLINE: Duration = Duration::from_secs(20);

/// A running `meridian run` process.
pub struct Meridian {
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTPS listener, when the config sets `server.tls_listen`.
    pub tls_listen: Option<SocketAddr>,
    pub config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

/// The `[server]`, `[admin]` and `[log]` lines every test config starts with: ephemeral
/// loopback ports, JSON logs.
pub fn base_config() -> String {
    "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\nformat = \"json\"\n\n"
        .to_string()
}

impl Meridian {
    /// Writes `config` to a temp dir and starts the binary; waits until it logs its bound
    /// addresses. `config` should begin with [`base_config`] (or set the same keys).
    pub fn start(config: &str) -> Meridian {
        Meridian::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Meridian {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("meridian.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn meridian");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("meridian serving") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let line = match rx.recv_timeout(DEADLINE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("meridian did not start; logs:\n{}", logs.lock().unwrap().join("\n"));
            }
        };
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        let listen = v["listen"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("listen address in log");
        let admin = v["admin"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("admin address in log");
        let tls_listen = v["tls_listen"].as_str().and_then(|s| s.parse().ok());
        Meridian {
            child,
            listen,
            admin,
            tls_listen,
            config_path,
            logs,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.listen, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (e.g. "HUP", "TERM") to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its status code.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Meridian {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A region block for a test config.
pub fn region(name: &str, location: [f64; 2], countries: &[&str], endpoints: &[String]) -> String {
    let countries: Vec<String> = countries.iter().map(|c| format!("{c:?}")).collect();
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        "[[region]]\nname = \"{name}\"\nlocation = [{}, {}]\ncountries = [{}]\nendpoints = [{}]\n\n",
        location[0],
        location[1],
        countries.join(", "),
        endpoints.join(", ")
    )
}

/// A simple response with its body collected.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn region(&self) -> Option<&str> {
        self.header("x-meridian-region")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Opens an HTTP/1.1 connection from `source` (e.g. 127.0.0.2) to `target`.
pub async fn connect_from(source: IpAddr, target: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(source, 0)).expect("bind source");
    let stream = socket.connect(target).await.expect("connect");
    stream.set_nodelay(true).ok();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// Sends one request from `source` over a new connection and returns the streaming response.
pub async fn send_from(source: IpAddr, target: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    let mut sender = connect_from(source, target).await;
    sender.send_request(req).await.expect("send request")
}

/// Builds a request; `headers` are (name, value) pairs.
pub fn request(
    method: &str,
    target: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{target}{path}"))
        .header("host", target.to_string());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(body.into())).expect("request")
}

/// Like [`get_as`] but returns `None` when the connection or request fails, for polling.
pub async fn try_get_as(target: SocketAddr, xff: &str, path: &str) -> Option<Reply> {
    let socket = TcpSocket::new_v4().ok()?;
    let stream = socket.connect(target).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender
        .send_request(request("GET", target, path, &[("x-forwarded-for", xff)], Bytes::new()))
        .await
        .ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// Sends from 127.0.0.1 and collects the whole body.
pub async fn call(
    method: &str,
    target: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    call_from("127.0.0.1".parse().unwrap(), method, target, path, headers, body).await
}

pub async fn call_from(
    source: IpAddr,
    method: &str,
    target: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let resp = send_from(source, target, request(method, target, path, headers, body)).await;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// GET as a client in the country of `xff` (sent through the trusted loopback peer).
pub async fn get_as(target: SocketAddr, xff: &str, path: &str) -> Reply {
    call("GET", target, path, &[("x-forwarded-for", xff)], Bytes::new()).await
}

/// The path of an OpenAI-style chat completion, the request most tests send.
pub const CHAT_PATH: &str = "/v1/chat/completions";

/// A chat completion `POST` to `target`; `headers` are (name, value) pairs.
pub fn chat_request(target: SocketAddr, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    request("POST", target, CHAT_PATH, headers, body)
}

/// POSTs a chat completion from 127.0.0.1 and collects the whole reply.
pub async fn chat(target: SocketAddr, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    call("POST", target, CHAT_PATH, headers, body).await
}

/// The admin `/status` document.
pub async fn status(proxy: &Meridian) -> serde_json::Value {
    call("GET", proxy.admin, "/status", &[], Bytes::new()).await.json()
}

/// The `/status` entry of the endpoint with `url` (`Null` when there is none).
pub async fn endpoint_status(proxy: &Meridian, url: &str) -> serde_json::Value {
    let s = status(proxy).await;
    s["regions"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["url"] == url)
        .unwrap_or(serde_json::Value::Null)
}

/// One fake endpoint in region `us-east`, home of US clients and the default region, and the
/// proxy in front; `server_extra` is added to `[server]`.
pub async fn one_region(server_extra: &str) -> (FakeUpstream, Meridian) {
    let up = FakeUpstream::start("us-east").await.unwrap();
    let mut config = base_config().replace("[server]\n", &format!("[server]\n{server_extra}"));
    config.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[up.url()]));
    (up, Meridian::start(&config))
}

/// Polls `check` every 50 ms until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < DEADLINE {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Client addresses the embedded database places in known countries.
pub mod ips {
    pub const GB: &str = "81.2.69.142";
    pub const US: &str = "8.8.8.8";
    pub const AU: &str = "1.1.1.1";
    pub const IE: &str = "87.44.0.1";
    pub const DE: &str = "5.9.0.1";
    pub const FR: &str = "62.210.0.1";
}

/// Waits for `/readyz` to answer 200 (after the first probe round), so a later 503 means
/// draining.
pub async fn wait_ready(proxy: &Meridian) {
    eventually("ready", || async {
        call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status == 200
    })
    .await;
}

/// Waits (off the runtime's threads) for the process to exit; its exit code and the handle.
pub async fn wait_exit(mut proxy: Meridian) -> (Option<i32>, Meridian) {
    tokio::task::spawn_blocking(move || {
        let code = proxy.wait_exit(DEADLINE);
        (code, proxy)
    })
    .await
    .unwrap()
}
