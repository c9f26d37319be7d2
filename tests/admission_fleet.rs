//! Admission control in fleet mode: real `redis-server` processes on loopback, two Meridian
//! instances sharing one limit, and Redis killed and brought back mid-test. Skipped with a
//! message where `redis-server` is not installed (`.ci/run` installs it).

mod support;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::*;

/// A `redis-server` of our own on a free loopback port, nothing saved to disk.
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// `None` (with a message) when `redis-server` is not installed.
    fn start() -> Option<RedisServer> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            eprintln!("redis-server not found: fleet admission test skipped (apt-get install redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.run();
        Some(server)
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while !self.answers() {
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn error_code(body: &serde_json::Value) -> Option<&str> {
    body["error"]["code"].as_str().or_else(|| body["error"].as_str())
}

async fn proxy(up: &FakeUpstream, redis: &RedisServer, timeout: &str, rules: &str) -> Meridian {
    let mut config = base_config();
    config.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[up.url()]));
    config.push_str(&format!(
        "[limits]\nbackend = {{ redis = \"{}\", timeout = \"{timeout}\" }}\n\n{rules}",
        redis.url()
    ));
    Meridian::start(&config)
}

async fn post(proxy: &Meridian, headers: &[(&str, &str)]) -> Reply {
    let sent = call(
        "POST",
        proxy.listen,
        "/v1/chat/completions",
        headers,
        r#"{"messages":[]}"#,
    );
    tokio::time::timeout(DEADLINE, sent)
        .await
        .expect("an answer, never a hung request")
}

#[tokio::test]
async fn two_instances_share_one_limit() {
    let Some(redis) = RedisServer::start() else { return };
    let up = FakeUpstream::start("us-east").await.unwrap();
    // Fail closed, so every admission below was counted in Redis; a generous timeout for a
    // loaded test machine.
    let rules = "[[limit]]\nname = \"shared\"\nkey = \"header:authorization\"\nrequests_per_second = 0.001\nburst = 3\non_backend_error = \"deny\"\n";
    let a = proxy(&up, &redis, "2s", rules).await;
    let b = proxy(&up, &redis, "2s", rules).await;
    let key = [("authorization", "Bearer fleet-key")];
    let mut statuses = Vec::new();
    for i in 0..8 {
        let via = if i % 2 == 0 { &a } else { &b };
        statuses.push(post(via, &key).await.status);
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 3, "together they admit the burst and no more: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert_eq!(statuses[..3], [200, 200, 200], "{statuses:?}");
    let limited = post(&b, &key).await;
    assert_eq!(limited.status, 429);
    assert_eq!(error_code(&limited.json()), Some("rate_limit_exceeded"));
    assert_eq!(limited.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(limited.header("x-ratelimit-remaining-requests"), Some("0"));
    // The key is hashed before it reaches Redis.
    let keys = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "--scan"])
        .output();
    if let Ok(out) = keys {
        let keys = String::from_utf8_lossy(&out.stdout);
        assert!(!keys.contains("fleet-key"), "{keys}");
    }
}

#[tokio::test]
async fn redis_down_fails_open_or_closed_per_rule_and_recovers() {
    let Some(mut redis) = RedisServer::start() else { return };
    let up = FakeUpstream::start("us-east").await.unwrap();
    let rules = "[[limit]]\nname = \"open\"\nkey = \"header:x-open\"\nrequests_per_second = 0.001\nburst = 1\non_backend_error = \"allow\"\n\n\
                 [[limit]]\nname = \"closed\"\nkey = \"header:x-closed\"\nrequests_per_second = 0.001\nburst = 1\non_backend_error = \"deny\"\n";
    let m = proxy(&up, &redis, "200ms", rules).await;

    // Redis up: both rules count.
    assert_eq!(post(&m, &[("x-open", "a")]).await.status, 200);
    assert_eq!(post(&m, &[("x-open", "a")]).await.status, 429);
    assert_eq!(post(&m, &[("x-closed", "b")]).await.status, 200);
    assert_eq!(post(&m, &[("x-closed", "b")]).await.status, 429);

    redis.kill();
    // Redis down: the open rule admits a key it had limited, the closed rule refuses a key
    // it never saw; both answer (within the backend timeout, not a hung request).
    let open = post(&m, &[("x-open", "a")]).await;
    assert_eq!(open.status, 200, "fail open: {}", open.text());
    let closed = post(&m, &[("x-closed", "c")]).await;
    assert_eq!(closed.status, 429, "fail closed");
    assert_eq!(error_code(&closed.json()), Some("rate_limit_exceeded"));
    assert!(closed.header("retry-after").is_some());
    let metrics = call("GET", m.admin, "/metrics", &[], Bytes::new()).await.text();
    let errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("meridian_admission_backend_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(errors >= 2.0, "{metrics}");
    assert!(
        m.logs().iter().any(|l| l.contains("admission backend failed")),
        "a log line says so"
    );

    // Redis back (empty): the closed rule admits again, and counts again.
    redis.run();
    eventually("the closed rule admits once Redis is back", || async {
        post(&m, &[("x-closed", "d")]).await.status == 200
    })
    .await;
    assert_eq!(post(&m, &[("x-closed", "d")]).await.status, 429, "counting again");
}
