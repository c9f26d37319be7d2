//! Fixtures shared by unit tests: one multi-region world to route over.

use std::sync::Arc;

use crate::config::Config;
use crate::geo::GeoPoint;
use crate::route::{Candidate, RoutePlan, RouteTable};

/// Six regions on three continents with two residency zones: `uk` (GB, served only by
/// uk-south) and `eu` (DE and FR, served by eu-central and eu-west). us-east is the home of
/// US and CA and the default region; us-west is nobody's home.
pub(crate) const WORLD: &str = r#"
    [geoip]
    default_region = "us-east"
    [[region]]
    name = "us-east"
    location = [39.04, -77.49]
    countries = ["US", "CA"]
    endpoints = ["http://127.0.0.1:1"]
    [[region]]
    name = "us-west"
    location = [45.6, -121.2]
    endpoints = ["http://127.0.0.1:2"]
    [[region]]
    name = "eu-west"
    location = [53.35, -6.26]
    countries = ["IE", "FR"]
    endpoints = ["http://127.0.0.1:3"]
    [[region]]
    name = "eu-central"
    location = [50.11, 8.68]
    countries = ["DE"]
    endpoints = ["http://127.0.0.1:4"]
    [[region]]
    name = "uk-south"
    location = [51.51, -0.13]
    countries = ["GB"]
    endpoints = ["http://127.0.0.1:5"]
    [[region]]
    name = "ap-southeast"
    location = [1.35, 103.82]
    countries = ["SG", "AU"]
    endpoints = ["http://127.0.0.1:6"]
    [[residency]]
    name = "uk"
    countries = ["GB"]
    regions = ["uk-south"]
    [[residency]]
    name = "eu"
    countries = ["DE", "FR"]
    regions = ["eu-central", "eu-west"]
"#;

/// [`WORLD`] with `extra` TOML appended (tables it does not already have), validated.
pub(crate) fn world_config(extra: &str) -> Config {
    Config::parse(&format!("{WORLD}\n{extra}"), None).unwrap_or_else(|e| panic!("{e}"))
}

/// The route table compiled from [`world_config`].
pub(crate) fn world(extra: &str) -> RouteTable {
    RouteTable::new(Arc::new(world_config(extra)))
}

/// What a unit test returns, so a failed setup step surfaces through `?` with its message.
pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

/// An endpoint on loopback that answers every request 200 and counts them: the target of
/// the prober's unit tests (the integration tests have a model server with faults).
pub(crate) struct CountingEndpoint {
    addr: std::net::SocketAddr,
    hits: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingEndpoint {
    pub(crate) async fn start() -> std::io::Result<CountingEndpoint> {
        use hyper_util::rt::TokioIo;
        use std::sync::atomic::Ordering;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        counter.fetch_add(1, Ordering::AcqRel);
                        async { Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from("ok"))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(CountingEndpoint { addr, hits, task })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered so far.
    pub(crate) fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl Drop for CountingEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plan over `regions` in this order (no country, no distances, no rule), in residency zone
/// `zone` when given, with the fallback allowed when `fallback`.
pub(crate) fn plan_over(regions: &[usize], zone: Option<usize>, fallback: bool) -> RoutePlan<'static> {
    RoutePlan {
        country: None,
        origin: GeoPoint { lat: 0.0, lon: 0.0 },
        zone,
        home: None,
        sharded: false,
        fallback,
        rule: None,
        candidates: regions
            .iter()
            .map(|&region| Candidate {
                region,
                distance_km: 0.0,
                home: false,
            })
            .collect::<Vec<_>>()
            .into(),
    }
}

/// Parsed fields into a map, as hyper (and Meridian's HTTP/1.1 reading before it kept
/// fields over the head) gives them: the yardstick for the listed-field paths.
pub(crate) fn map_of(fields: &[httparse::Header<'_>]) -> Result<http::HeaderMap, Box<dyn std::error::Error>> {
    let mut map = http::HeaderMap::new();
    for f in fields {
        map.append(
            http::HeaderName::from_bytes(f.name.as_bytes())?,
            http::HeaderValue::from_bytes(f.value)?,
        );
    }
    Ok(map)
}
