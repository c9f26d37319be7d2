//! HTTPS through the real binary: ALPN h2 and http/1.1, TLS 1.2 and 1.3, SNI certificate
//! choice, reload on SIGHUP and on file change without dropping open connections, bad
//! certificates rejected.

mod support;

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::certs::{Leaf, Sender, TestCa, alpn, client_config, served_cert, tls_connect};
use support::*;

struct Tls {
    up: FakeUpstream,
    proxy: Meridian,
    ca: TestCa,
    dir: tempfile::TempDir,
}

/// One region behind a TLS listener whose default certificate covers `localhost`, with
/// `server` lines in `[server]` and the `[[server.certificate]]` tables `extra` writes.
async fn start(server: &str, extra: impl FnOnce(&TestCa, &Path) -> String) -> (Tls, Leaf) {
    let ca = TestCa::new("meridian test CA");
    let dir = tempfile::tempdir().unwrap();
    let default = ca.leaf(&["localhost"]);
    let (cert, key) = default.write(dir.path(), "default");
    let extra = extra(&ca, dir.path());
    let up = FakeUpstream::start("us-east").await.unwrap();
    let server = format!("[server]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n{server}");
    let mut config = base_config().replace("[server]\n", &server);
    config.push_str(&extra);
    config.push_str("[geoip]\ndefault_region = \"us-east\"\n\n");
    config.push_str(&region("us-east", [39.04, -77.49], &["US"], &[up.url()]));
    let proxy = Meridian::start(&config);
    assert!(proxy.tls_listen.is_some(), "TLS listener address logged");
    (Tls { up, proxy, ca, dir }, default)
}

fn get(path: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(format!("https://localhost{path}"))
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The certificate served to a new handshake with SNI `name`.
async fn cert_for(t: &Tls, name: &str) -> Option<rustls::pki_types::CertificateDer<'static>> {
    let target = t.proxy.tls_listen.unwrap();
    let tcp = tokio::net::TcpStream::connect(target).await.ok()?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).ok()?;
    let stream = tokio_rustls::TlsConnector::from(client_config(None, &[b"http/1.1"]))
        .connect(server_name, tcp)
        .await
        .ok()?;
    Some(served_cert(&stream))
}

#[tokio::test]
async fn https_with_alpn_h2_and_http11() {
    let (t, _) = start("", |_, _| String::new()).await;
    let target = t.proxy.tls_listen.unwrap();
    for (offer, version) in [
        (b"h2".as_slice(), http::Version::HTTP_2),
        (b"http/1.1".as_slice(), http::Version::HTTP_11),
    ] {
        let stream = tls_connect(target, "localhost", client_config(Some(&t.ca), &[offer])).await;
        assert_eq!(alpn(&stream).as_deref(), Some(offer));
        let mut sender = Sender::over(stream).await;
        let resp = sender.send(get("/v1/models")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version);
        assert_eq!(resp.headers()["x-meridian-region"], "us-east");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("us-east"));
    }
    let seen = t.up.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.headers["x-forwarded-proto"], "https");
        assert_eq!(s.headers["host"], "localhost");
    }
    // The cleartext listener keeps saying http.
    let r = call("GET", t.proxy.listen, "/v1/models", &[], Bytes::new()).await;
    assert_eq!(r.status, 200);
    assert_eq!(t.up.seen()[2].headers["x-forwarded-proto"], "http");
}

#[tokio::test]
async fn sni_picks_the_certificate_for_each_name() {
    let mut leaves = Vec::new();
    let (t, default) = start("", |ca, dir| {
        let eu = ca.leaf(&["api.example.eu"]);
        let wild = ca.leaf(&["*.example.com"]);
        let (eu_cert, eu_key) = eu.write(dir, "eu");
        let (wild_cert, wild_key) = wild.write(dir, "wild");
        leaves.push(eu);
        leaves.push(wild);
        format!(
            "[[server.certificate]]\nnames = [\"api.example.eu\"]\ncert = {eu_cert:?}\nkey = {eu_key:?}\n\n\
             [[server.certificate]]\nnames = [\"*.example.com\"]\ncert = {wild_cert:?}\nkey = {wild_key:?}\n\n"
        )
    })
    .await;
    let (eu, wild) = (&leaves[0], &leaves[1]);
    let cases = [
        ("api.example.eu", &eu.der),
        ("chat.example.com", &wild.der),
        ("example.com", &default.der),
        ("unknown.example.org", &default.der),
        // An IP address sends no SNI at all.
        ("127.0.0.1", &default.der),
    ];
    for (name, want) in cases {
        assert_eq!(cert_for(&t, name).await.as_ref(), Some(want), "SNI {name}");
    }
    // And the named certificates verify for their names against the CA.
    let target = t.proxy.tls_listen.unwrap();
    for name in ["api.example.eu", "chat.example.com"] {
        let stream = tls_connect(target, name, client_config(Some(&t.ca), &[b"h2"])).await;
        let mut sender = Sender::over(stream).await;
        assert_eq!(sender.send(get("/v1/models")).await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn sighup_reload_serves_the_new_certificate_and_keeps_open_connections() {
    let (t, _) = start("", |_, _| String::new()).await;
    let target = t.proxy.tls_listen.unwrap();
    let open = tls_connect(target, "localhost", client_config(Some(&t.ca), &[b"http/1.1"])).await;
    let mut open = Sender::over(open).await;
    assert_eq!(open.send(get("/first")).await.unwrap().status(), 200);

    let new = t.ca.leaf(&["localhost"]);
    new.write(t.dir.path(), "default");
    t.proxy.signal("HUP");
    eventually("a reload triggered by the signal", || async {
        t.proxy
            .logs()
            .iter()
            .any(|l| l.contains("TLS certificates reloaded") && l.contains("sighup"))
    })
    .await;
    eventually("new handshakes get the new certificate", || async {
        cert_for(&t, "localhost").await.as_ref() == Some(&new.der)
    })
    .await;

    // The connection opened before the reload still serves requests.
    let resp = open.send(get("/second")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(t.up.seen().last().unwrap().path, "/second");
}

#[tokio::test]
async fn a_changed_certificate_file_is_picked_up_without_a_signal() {
    let (t, _) = start("", |_, _| String::new()).await;
    let new = t.ca.leaf(&["localhost"]);
    new.write(t.dir.path(), "default");
    eventually("the watcher reloads the changed files", || async {
        cert_for(&t, "localhost").await.as_ref() == Some(&new.der)
    })
    .await;
}

#[tokio::test]
async fn a_broken_certificate_on_reload_keeps_the_old_one() {
    let (t, old) = start("", |_, _| String::new()).await;
    std::fs::write(
        t.dir.path().join("default.pem"),
        "-----BEGIN CERTIFICATE-----\nbroken\n",
    )
    .unwrap();
    t.proxy.signal("HUP");
    eventually("the reload is rejected in the log", || async {
        t.proxy.logs().iter().any(|l| l.contains("TLS reload rejected"))
    })
    .await;
    assert_eq!(cert_for(&t, "localhost").await, Some(old.der.clone()));
    let metrics = call("GET", t.proxy.admin, "/metrics", &[], Bytes::new()).await.text();
    assert!(
        metrics.contains("meridian_tls_reloads_total{result=\"error\"}"),
        "{metrics}"
    );

    // A key that belongs to another certificate is rejected too.
    let other = t.ca.leaf(&["localhost"]);
    std::fs::write(t.dir.path().join("default.pem"), &old.cert_pem).unwrap();
    std::fs::write(t.dir.path().join("default.key"), &other.key_pem).unwrap();
    t.proxy.signal("HUP");
    eventually("the mismatched key is rejected", || async {
        t.proxy
            .logs()
            .iter()
            .any(|l| l.contains("TLS reload rejected") && l.contains("does not fit"))
    })
    .await;
    let stream = tls_connect(
        t.proxy.tls_listen.unwrap(),
        "localhost",
        client_config(Some(&t.ca), &[b"h2"]),
    )
    .await;
    assert_eq!(served_cert(&stream), old.der);
    let mut sender = Sender::over(stream).await;
    assert_eq!(sender.send(get("/still")).await.unwrap().status(), 200);
}

/// A reload whose new config names a certificate that cannot be read is rejected whole:
/// its other changes (here a new default region) do not go into force beside the old
/// certificates, so the config in force is always one a restart would accept.
#[tokio::test]
async fn a_reload_naming_a_missing_certificate_is_rejected_whole() {
    let (t, old) = start("", |_, _| String::new()).await;
    let west = FakeUpstream::start("us-west").await.unwrap();
    let config = std::fs::read_to_string(&t.proxy.config_path).unwrap();
    let missing = t.dir.path().join("missing.pem");
    let changed = config
        .replace(
            &format!("tls_cert = {:?}", t.dir.path().join("default.pem")),
            &format!("tls_cert = {missing:?}"),
        )
        .replace("default_region = \"us-east\"", "default_region = \"us-west\"")
        + &region("us-west", [37.77, -122.42], &[], &[west.url()]);
    assert_ne!(changed, config, "the test rewrites the certificate path");
    std::fs::write(&t.proxy.config_path, changed).unwrap();
    t.proxy.signal("HUP");
    eventually("the reload is rejected", || async {
        t.proxy.logs().iter().any(|l| {
            l.contains("config reload rejected") && l.contains("missing.pem") && l.contains("server.tls_cert: ")
        })
    })
    .await;
    // Still the old config: a private client goes to the old default region, over the
    // old certificate.
    let reply = get_as(t.proxy.listen, "10.0.0.1", "/x").await;
    assert_eq!(reply.region(), Some("us-east"));
    assert_eq!(cert_for(&t, "localhost").await, Some(old.der.clone()));
    assert!(!t.proxy.logs().iter().any(|l| l.contains("config reloaded")));
}

#[tokio::test]
async fn tls_12_and_13_are_both_accepted() {
    let (t, _) = start("", |_, _| String::new()).await;
    let target = t.proxy.tls_listen.unwrap();
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(t.ca.roots())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let stream = tls_connect(target, "localhost", std::sync::Arc::new(config)).await;
        assert_eq!(stream.get_ref().1.protocol_version(), Some(version.version));
        let mut sender = Sender::over(stream).await;
        assert_eq!(sender.send(get("/v1/models")).await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_handshake_is_cut_off() {
    let (t, _) = start("header_read_timeout = \"300ms\"\n", |_, _| String::new()).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(t.proxy.tls_listen.unwrap())
        .await
        .unwrap();
    // The first bytes of a ClientHello, then silence.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the listener closes the connection");
    // And keeps serving.
    assert!(cert_for(&t, "localhost").await.is_some());
}
