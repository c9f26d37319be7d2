//! Running a fleet with the real binary: shutdown a load balancer can follow
//! (`shutdown_delay`), fleet-wide drains in the config, and `meridian healthcheck`.

mod support;

use std::process::Command;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::BodyExt;
use support::*;

const TOKEN: &str = "fleet-admin-token";

struct World {
    us: FakeUpstream,
    eu: FakeUpstream,
}

impl World {
    async fn start() -> World {
        World {
            us: FakeUpstream::start("us-east").await.unwrap(),
            eu: FakeUpstream::start("eu-west").await.unwrap(),
        }
    }

    /// Two regions; `server` goes into `[server]`, `eu_drain` into eu-west's `[[region]]`.
    fn config(&self, server: &str, eu_drain: &str) -> String {
        let mut c = base_config()
            .replace("[server]\n", &format!("[server]\n{server}"))
            .replace("[admin]\n", "[admin]\ntoken_env = \"FLEET_ADMIN_TOKEN\"\n");
        c.push_str("[geoip]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndefault_region = \"us-east\"\n\n");
        c.push_str("[health]\ninterval = \"100ms\"\ntimeout = \"1s\"\n\n");
        c.push_str(&region("us-east", [39.04, -77.49], &["US"], &[self.us.url()]));
        c.push_str(&region("eu-west", [53.35, -6.26], &["IE", "FR"], &[self.eu.url()]));
        c.push_str(eu_drain);
        c
    }

    fn proxy(&self, config: &str) -> Meridian {
        Meridian::start_with_env(config, &[("FLEET_ADMIN_TOKEN", TOKEN)])
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn json_logs(proxy: &Meridian) -> Vec<serde_json::Value> {
    proxy
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn region_status(proxy: &Meridian, name: &str) -> serde_json::Value {
    let status = call("GET", proxy.admin, "/status", &[], Bytes::new()).await.json();
    status["regions"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no region {name} in {status}"))
}

/// `meridian_region_drained{region, source}` as scraped.
async fn drained_metric(proxy: &Meridian, region: &str, source: &str) -> Option<f64> {
    let text = call("GET", proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    let want = format!("meridian_region_drained{{region=\"{region}\",source=\"{source}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
}

/// A streamed completion from a US client, held open by the gated upstream.
async fn open_stream(proxy: &Meridian) -> hyper::body::Incoming {
    let resp = send_from(
        "127.0.0.1".parse().unwrap(),
        proxy.listen,
        request(
            "POST",
            proxy.listen,
            "/v1/chat/completions",
            &[("content-type", "application/json"), ("x-forwarded-for", ips::US)],
            r#"{"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("first event")
        .unwrap()
        .unwrap();
    assert!(first.into_data().unwrap().starts_with(b"data: "));
    body
}

async fn finish_stream(body: hyper::body::Incoming) -> String {
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("rest of the stream")
        .expect("the stream ends cleanly")
        .to_bytes();
    String::from_utf8_lossy(&rest).into_owned()
}

// ---- shutdown a load balancer can follow ----

#[tokio::test]
async fn during_the_shutdown_delay_new_connections_are_served_while_readyz_says_503() {
    let w = World::start().await;
    // Long enough that the test, not the clock, ends it (with a second SIGTERM).
    let proxy = w.proxy(&w.config("shutdown_delay = \"10m\"\n", ""));
    wait_ready(&proxy).await;
    w.us.set_behavior(Behavior::Gated { events: 3 });
    let stream = open_stream(&proxy).await;
    proxy.signal("TERM");
    eventually("/readyz says draining", || async {
        call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status == 503
    })
    .await;
    // New connections, as a load balancer still sends them, are accepted and served.
    for _ in 0..3 {
        let r = get_as(proxy.listen, ips::IE, "/v1/models").await;
        assert_eq!((r.status, r.region()), (200, Some("eu-west")), "{}", r.text());
    }
    let logs = json_logs(&proxy);
    assert!(
        logs.iter()
            .any(|l| l["message"] == "stop signal: /readyz answers 503, still serving for the shutdown delay"),
        "{logs:?}"
    );
    assert!(
        !logs.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutting down: no new connections"))),
        "the listener stays open during the delay"
    );
    // A second signal ends the delay: the listener closes, the stream in flight finishes.
    proxy.signal("TERM");
    eventually("new connections refused", || async {
        tokio::net::TcpStream::connect(proxy.listen).await.is_err()
    })
    .await;
    w.us.release();
    let rest = finish_stream(stream).await;
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let (code, proxy) = wait_exit(proxy).await;
    assert_eq!(code, Some(0), "{:?}", proxy.logs());
}

#[tokio::test]
async fn after_the_shutdown_delay_the_listener_closes_and_a_stream_in_flight_finishes() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("shutdown_delay = \"300ms\"\n", ""));
    wait_ready(&proxy).await;
    w.us.set_behavior(Behavior::Gated { events: 3 });
    let stream = open_stream(&proxy).await;
    proxy.signal("TERM");
    eventually("the delay runs out and new connections are refused", || async {
        tokio::net::TcpStream::connect(proxy.listen).await.is_err()
    })
    .await;
    assert_eq!(call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status, 503);
    w.us.release();
    let rest = finish_stream(stream).await;
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let (code, proxy) = wait_exit(proxy).await;
    assert_eq!(code, Some(0), "{:?}", proxy.logs());
    let logs = json_logs(&proxy);
    let delay = logs
        .iter()
        .position(|l| l["message"] == "stop signal: /readyz answers 503, still serving for the shutdown delay");
    let drain = logs.iter().position(|l| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("shutting down: no new connections"))
    });
    assert!(matches!((delay, drain), (Some(a), Some(b)) if a < b), "{logs:?}");
}

/// A client that connected and has sent nothing has no request to finish: the shutdown
/// closes it instead of waiting for its header timeout (here longer than the test's wait).
#[tokio::test]
async fn a_connection_that_sent_nothing_does_not_hold_up_the_shutdown() {
    use tokio::io::AsyncReadExt;
    let w = World::start().await;
    let proxy = w.proxy(&w.config("header_read_timeout = \"10m\"\nshutdown_timeout = \"10m\"\n", ""));
    wait_ready(&proxy).await;
    let mut silent = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    // The listener has it: an answered request on another connection comes after the accept.
    assert_eq!(
        call("GET", proxy.listen, "/v1/models", &[], Bytes::new()).await.status,
        200
    );
    proxy.signal("TERM");
    let (code, proxy) = wait_exit(proxy).await;
    assert_eq!(code, Some(0), "{:?}", proxy.logs());
    let mut buf = [0u8; 16];
    assert!(
        matches!(silent.read(&mut buf).await, Ok(0) | Err(_)),
        "the silent connection stayed open"
    );
}

// ---- fleet-wide drains in the config ----

#[tokio::test]
async fn a_config_drain_with_a_past_until_is_ignored_with_a_warning() {
    let w = World::start().await;
    let until = rfc3339(SystemTime::now() - Duration::from_secs(3600));
    let drain = format!("drain = {{ reason = \"maintenance\", until = \"{until}\" }}\n\n");
    let proxy = w.proxy(&w.config("", &drain));
    let warning = json_logs(&proxy)
        .into_iter()
        .find(|l| l["message"] == "config drain ignored: its until is in the past")
        .unwrap_or_else(|| panic!("no warning in {:?}", proxy.logs()));
    assert_eq!(
        (&warning["level"], &warning["region"], &warning["until"]),
        (&"WARN".into(), &"eu-west".into(), &until.clone().into())
    );
    let eu = region_status(&proxy, "eu-west").await;
    assert_eq!(eu["drained"], false, "{eu}");
    assert_eq!(eu["config_drain"], serde_json::Value::Null, "{eu}");
    assert_eq!(
        get_as(proxy.listen, ips::IE, "/v1/models").await.region(),
        Some("eu-west")
    );
    assert_eq!(drained_metric(&proxy, "eu-west", "config").await, Some(0.0));
    // `check` says so too, on stderr, and still accepts the config.
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["check", "-c"])
        .arg(&proxy.config_path)
        .env("FLEET_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("drain ignored: until {until} is in the past")),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_config_drain_with_a_future_until_drains_then_lifts_itself() {
    let w = World::start().await;
    // Short, so the test sees it lift; long enough to see it in force after start-up.
    let until = SystemTime::now() + Duration::from_secs(6);
    // As written in the file: whole seconds.
    let until = humantime::parse_rfc3339(&rfc3339(until)).unwrap();
    let drain = format!(
        "drain = {{ reason = \"maintenance\", until = \"{}\" }}\n\n",
        rfc3339(until)
    );
    let proxy = w.proxy(&w.config("", &drain));
    let eu = region_status(&proxy, "eu-west").await;
    assert_eq!(
        (&eu["state"], &eu["drained"], &eu["drained_by"]),
        (&"drained".into(), &true.into(), &serde_json::json!(["config"])),
        "{eu}"
    );
    assert_eq!(eu["config_drain"]["reason"], "maintenance");
    assert_eq!(eu["config_drain"]["until"], rfc3339(until));
    assert_eq!(drained_metric(&proxy, "eu-west", "config").await, Some(1.0));
    assert_eq!(drained_metric(&proxy, "eu-west", "admin").await, Some(0.0));
    // Its clients go elsewhere meanwhile.
    assert_eq!(
        get_as(proxy.listen, ips::IE, "/v1/models").await.region(),
        Some("us-east")
    );
    // No reload: the drain ends at `until` by itself.
    eventually("eu-west back in rotation", || async {
        get_as(proxy.listen, ips::IE, "/v1/models").await.region() == Some("eu-west")
    })
    .await;
    assert!(SystemTime::now() >= until, "lifted only once until had passed");
    eventually("metric follows", || async {
        drained_metric(&proxy, "eu-west", "config").await == Some(0.0)
    })
    .await;
    assert_eq!(region_status(&proxy, "eu-west").await["drained"], false);
    // The log arrives through a pipe, after the region is back: wait for the line.
    eventually("the drain's end in the log", || async {
        json_logs(&proxy)
            .iter()
            .any(|l| l["message"] == "config drain over: region back in rotation" && l["region"] == "eu-west")
    })
    .await;
}

#[tokio::test]
async fn an_admin_undrain_does_not_lift_a_config_drain_and_says_so() {
    let w = World::start().await;
    let drain = "drain = { reason = \"rack move\" }\n\n";
    let proxy = w.proxy(&w.config("", drain));
    let auth = format!("Bearer {TOKEN}");
    let post = |path: &'static str| {
        let auth = auth.clone();
        let admin = proxy.admin;
        async move { call("POST", admin, path, &[("authorization", &auth)], Bytes::new()).await }
    };
    let drained = post("/regions/eu-west/drain?reason=drill").await;
    assert_eq!(drained.status, 200);
    assert_eq!(drained.json()["drained_by"], serde_json::json!(["config", "admin"]));
    assert_eq!(drained_metric(&proxy, "eu-west", "admin").await, Some(1.0));
    let undrained = post("/regions/eu-west/undrain").await;
    assert_eq!(undrained.status, 200, "{}", undrained.text());
    let body = undrained.json();
    assert_eq!(
        (&body["drained"], &body["drained_by"]),
        (&true.into(), &serde_json::json!(["config"])),
        "{body}"
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("does not lift a config drain") && message.contains("rack move"),
        "{body}"
    );
    assert_eq!(drained_metric(&proxy, "eu-west", "admin").await, Some(0.0));
    assert_eq!(drained_metric(&proxy, "eu-west", "config").await, Some(1.0));
    assert_eq!(
        get_as(proxy.listen, ips::IE, "/v1/models").await.region(),
        Some("us-east")
    );
    // A region the config does not drain undrains as before, without a message.
    post("/regions/us-east/drain").await;
    let us = post("/regions/us-east/undrain").await.json();
    assert_eq!(
        (&us["drained"], &us["message"]),
        (&false.into(), &serde_json::Value::Null)
    );
}

#[tokio::test]
async fn a_reload_applies_and_lifts_a_config_drain() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("", ""));
    assert_eq!(
        get_as(proxy.listen, ips::IE, "/v1/models").await.region(),
        Some("eu-west")
    );
    let drained = w.config("", "drain = { reason = \"maintenance\" }\n\n");
    std::fs::write(&proxy.config_path, &drained).unwrap();
    proxy.signal("HUP");
    eventually("drained after reload", || async {
        get_as(proxy.listen, ips::IE, "/v1/models").await.region() == Some("us-east")
    })
    .await;
    assert_eq!(drained_metric(&proxy, "eu-west", "config").await, Some(1.0));
    std::fs::write(&proxy.config_path, w.config("", "")).unwrap();
    proxy.signal("HUP");
    eventually("back after the drain is removed", || async {
        get_as(proxy.listen, ips::IE, "/v1/models").await.region() == Some("eu-west")
    })
    .await;
}

/// A ConfigMap volume as the kubelet lays it out: `meridian.toml -> ..data/meridian.toml`,
/// `..data -> ..<timestamp>`; an update writes a new timestamped directory and swaps the
/// `..data` symlink by rename. The file watch reads through the links, so it notices.
#[cfg(unix)]
#[tokio::test]
async fn a_configmap_update_by_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    let w = World::start().await;
    let proxy = w.proxy(&w.config("", ""));
    let dir = proxy.config_path.parent().unwrap().to_path_buf();
    let publish = |version: &str, text: &str| {
        let data = dir.join(version);
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("meridian.toml"), text).unwrap();
        symlink(version, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    };
    // The same config, now behind the kubelet's links.
    publish("..2026_12_01_v1", &w.config("", ""));
    symlink("..data/meridian.toml", dir.join("meridian.toml.tmp")).unwrap();
    std::fs::rename(dir.join("meridian.toml.tmp"), &proxy.config_path).unwrap();
    assert_eq!(
        get_as(proxy.listen, ips::IE, "/v1/models").await.region(),
        Some("eu-west")
    );
    publish(
        "..2026_12_01_v2",
        &w.config("", "drain = { reason = \"maintenance\" }\n\n"),
    );
    eventually("the swapped ConfigMap is loaded", || async {
        get_as(proxy.listen, ips::IE, "/v1/models").await.region() == Some("us-east")
    })
    .await;
    eventually("the file-change reload in the log", || async {
        json_logs(&proxy)
            .iter()
            .any(|l| l["message"] == "config reloaded" && l["trigger"] == "file_change")
    })
    .await;
}

#[test]
fn check_shows_a_config_drain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meridian.toml");
    let text = format!(
        "{}[[region]]\nname = \"eu-west\"\nlocation = [53.35, -6.26]\nendpoints = [\"http://127.0.0.1:9\"]\n\
         drain = {{ reason = \"maintenance\", until = \"2999-01-01T00:00:00Z\" }}\n\n\
         [[region]]\nname = \"us-east\"\nlocation = [39.04, -77.49]\nendpoints = [\"http://127.0.0.1:9\"]\n\
         drain = {{ reason = \"network work\" }}\n",
        base_config()
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("drained by config until 2999-01-01T00:00:00Z (reason \"maintenance\")"),
        "{stdout}"
    );
    assert!(
        stdout.contains("drained by config until removed (reason \"network work\")"),
        "{stdout}"
    );
}

// ---- meridian healthcheck ----

fn healthcheck(config: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["healthcheck", "--timeout", "2s", "-c"])
        .arg(config)
        .output()
        .unwrap()
}

#[tokio::test]
async fn healthcheck_exits_zero_only_while_readyz_answers_200() {
    let w = World::start().await;
    let proxy = w.proxy(&w.config("shutdown_delay = \"10m\"\n", ""));
    wait_ready(&proxy).await;
    // The container config's shape: admin on every interface, reached on loopback.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("container.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"0.0.0.0:{}\"\ntoken_env = \"UNSET_IN_THIS_TEST\"\n",
            proxy.admin.port()
        ),
    )
    .unwrap();
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || healthcheck(&config)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    proxy.signal("TERM");
    eventually("draining", || async {
        call("GET", proxy.admin, "/readyz", &[], Bytes::new()).await.status == 503
    })
    .await;
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || healthcheck(&config)
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not ready") && stderr.contains("503"), "{stderr}");
    drop(proxy);
}

#[test]
fn healthcheck_fails_with_a_message_when_nothing_listens() {
    // A port that was free a moment ago: bound, read, released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("m.toml");
    std::fs::write(&config, format!("[admin]\nlisten = \"127.0.0.1:{port}\"\n")).unwrap();
    let out = healthcheck(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the admin listener"), "{stderr}");
    let out = healthcheck(&dir.path().join("missing.toml"));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
