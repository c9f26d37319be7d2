//! The live state a request reads: one immutable snapshot per config (swapped atomically on
//! reload) over health objects that outlive reloads.

mod orca;
mod report;
mod saturation;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::config::{Config, EndpointConfig, FallbackConfig, UpstreamTlsConfig};
use crate::forward::breaker::SharedBreaker;
use crate::forward::client::{ClientSetupError, PoolSettings, Upstreams};
use crate::geo::{GeoDb, GeoError};
use crate::health::drain::Drained;
use crate::health::state::Policy;
use crate::health::{EndpointHealth, RegionHealth};
use crate::observe::metrics::{Metrics, RegionMetrics};
use crate::route::{RegionState, RouteTable};

/// One config's worth of compiled state.
pub struct Snapshot {
    /// The validated config this snapshot was built from.
    pub config: Arc<Config>,
    /// Candidate orders compiled from `config`, read by every request.
    pub table: RouteTable,
    /// The GeoIP database chain of `[geoip]` (files unchanged on disk are shared across reloads).
    pub geo: Arc<GeoDb>,
    /// One entry per `[[region]]`, in config order; a [`RegionId`](crate::route::RegionId)
    /// indexes it.
    pub regions: Vec<RegionRuntime>,
    pub(crate) policy: Policy,
    pub(crate) upstreams: Upstreams,
    /// The `[fallback]` hosted API with its client and breaker; `None` when not configured.
    pub fallback: Option<FallbackRuntime>,
    /// `[[limit]]` rules and their counters (kept across reloads for unchanged rules).
    pub admission: Arc<crate::admission::Admission>,
}

/// A region as requests see it: its endpoints, live health and metrics.
pub struct RegionRuntime {
    /// The region's configured name (shared: every request's access record names it).
    pub name: Arc<str>,
    /// `x-meridian-region` value, built once.
    pub header: HeaderValue,
    /// Drain and availability state, kept across reloads by region name.
    pub health: Arc<RegionHealth>,
    pub(crate) endpoints: Vec<EndpointRuntime>,
    /// Shared with every relayed answer until its body ends: one reference per request
    /// rather than one per counter and histogram (a dozen atomic increments and decrements).
    pub(crate) metrics: Arc<RegionMetrics>,
}

/// An endpoint as requests see it: its config, live health and metrics.
pub struct EndpointRuntime {
    /// The endpoint as configured (URL, weight, protocol).
    pub config: EndpointConfig,
    /// Health state machine and load signals, kept across reloads for the same region and URL.
    pub health: Arc<EndpointHealth>,
    pub(crate) metrics: crate::observe::metrics::EndpointMetrics,
    /// Request slots, when `upstream.max_connections_per_endpoint` is set.
    pub limit: Option<Arc<crate::forward::limit::EndpointLimit>>,
    /// Its idle HTTP/1.1 connections in this snapshot's pool.
    pub(crate) pooled: Option<crate::forward::pool::PooledEndpoint>,
}

/// The `[fallback]` hosted API as requests see it.
pub struct FallbackRuntime {
    /// The `[fallback]` table as configured.
    pub config: FallbackConfig,
    pub(crate) upstreams: Upstreams,
    pub(crate) header: HeaderValue,
    pub(crate) metrics: Arc<RegionMetrics>,
    /// Kept across reloads while the endpoint and the breaker policy stay the same.
    pub breaker: Arc<SharedBreaker>,
}

/// Why a config could not be compiled into a snapshot; the snapshot in force stays.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A `geoip.database` file could not be opened or read.
    #[error(transparent)]
    Geo(#[from] GeoError),
    /// The upstream TLS settings (`[upstream_tls]`, fallback `ca_file`) could not be loaded.
    #[error("upstream TLS: {0}")]
    Client(#[from] ClientSetupError),
    /// The compiled table would take a zone's client outside its zone.
    #[error(transparent)]
    Residency(#[from] crate::route::residency::Crossings),
    /// The `[limits]` Redis backend could not be set up.
    #[error(transparent)]
    Admission(#[from] crate::admission::AdmissionError),
}

/// State shared by every connection, task and admin call for the life of the process.
pub struct Shared {
    runtime: ArcSwap<Snapshot>,
    pub(crate) metrics: Metrics,
    registry: Registry,
    /// Set once the first probe round is done.
    pub ready: AtomicBool,
    pub(crate) draining: AtomicBool,
    /// Bumped by every `install`, so the prober follows endpoint changes.
    pub generation: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    /// Compiles `config` into the first snapshot and publishes its endpoints and availability.
    pub fn new(config: Config) -> Result<Arc<Shared>, SnapshotError> {
        let metrics = Metrics::new();
        let registry = Registry::default();
        let runtime = build(&metrics, &registry, config, None)?;
        let shared = Shared {
            runtime: ArcSwap::from_pointee(runtime),
            metrics,
            registry,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            generation: tokio::sync::watch::Sender::new(0),
        };
        shared.publish_endpoints(&shared.snapshot());
        shared.publish_availability();
        shared
            .snapshot()
            .geo
            .publish_build_times(&shared.metrics.geoip_database_build);
        Ok(Arc::new(shared))
    }

    /// The snapshot in force; in-flight requests keep the one they loaded.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.runtime.load_full()
    }

    /// Builds a runtime for `config`, reusing health of endpoints and regions that stay.
    pub fn build(&self, config: Config, previous: Option<&Snapshot>) -> Result<Snapshot, SnapshotError> {
        build(&self.metrics, &self.registry, config, previous)
    }
    /// Puts a new runtime in force. Requests already running keep the snapshot they
    /// loaded; gauges of regions and endpoints that left the config are dropped.
    pub fn install(&self, runtime: Snapshot) {
        let previous = self.runtime.swap(Arc::new(runtime));
        let current = self.snapshot();
        for old in &previous.regions {
            if !current.regions.iter().any(|r| r.name == old.name) {
                self.metrics.forget_region(&old.name);
            }
        }
        self.publish_endpoints(&current);
        self.publish_availability();
        current.geo.publish_build_times(&self.metrics.geoip_database_build);
        self.generation.send_modify(|g| *g += 1);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }
}

impl Snapshot {
    /// The region config and endpoint that own `health`, for the background tasks (probe,
    /// load scrape, model discovery) that hold an endpoint's health object across reloads.
    pub(crate) fn endpoint_of(
        &self,
        health: &Arc<EndpointHealth>,
    ) -> Option<(&crate::config::RegionConfig, &EndpointRuntime)> {
        self.regions.iter().zip(&self.config.regions).find_map(|(r, c)| {
            (c.name == health.region)
                .then(|| r.endpoints.iter().find(|e| e.health.id == health.id))
                .flatten()
                .map(|e| (c, e))
        })
    }

    /// Which drains hold region `r`: the config's and the admin's.
    pub(crate) fn drain_state(&self, r: usize) -> Drained {
        let config = self.config.regions.get(r).and_then(|c| c.drain.as_ref());
        let admin = self.regions.get(r).is_some_and(|region| region.health.is_drained());
        // The clock is read only for a region the config drains: requests pay nothing otherwise.
        let now = if config.is_some() {
            SystemTime::now()
        } else {
            SystemTime::UNIX_EPOCH
        };
        crate::health::drain::decide(config, admin, now)
    }

    /// Whether region `r` serves `model`: its configured list, and what its endpoints listed
    /// at `/v1/models` when it discovers models (docs/inference.md, "Models").
    pub fn region_serves(&self, r: usize, model: &str) -> bool {
        let (Some(config), Some(region)) = (self.config.regions.get(r), self.regions.get(r)) else {
            return false;
        };
        let discovered = config.discover_models.then(|| {
            let mut heard = None;
            for e in &region.endpoints {
                if let Some(list) = e.health.models.load().as_deref() {
                    heard = Some(heard.unwrap_or(false) || list.iter().any(|m| m == model));
                }
            }
            heard
        });
        crate::route::models::region_serves(
            config.models.as_deref(),
            config.discover_models,
            discovered.flatten(),
            model,
        )
    }

    /// How region `r` looks to selection; `tried(endpoint)` marks endpoints this request has
    /// already used.
    pub fn region_state(&self, r: usize, tried: impl Fn(usize) -> bool) -> RegionState {
        let Some(region) = self.regions.get(r) else {
            return RegionState::Unavailable;
        };
        if self.drain_state(r).any() {
            return RegionState::Unavailable;
        }
        let mut untried = false;
        for (i, e) in region.endpoints.iter().enumerate() {
            if tried(i) {
                continue;
            }
            if e.health.is_available() {
                // Spillover: a saturated region is passed over like an unavailable one.
                return if region.health.is_saturated() {
                    RegionState::Saturated
                } else {
                    RegionState::Available
                };
            }
            untried = true;
        }
        if untried {
            RegionState::Unhealthy
        } else {
            RegionState::Unavailable
        }
    }
}

/// Health objects by identity, so they survive reloads.
#[derive(Default)]
struct Registry {
    endpoints: Mutex<HashMap<(String, String), Arc<EndpointHealth>>>,
    regions: Mutex<HashMap<String, Arc<RegionHealth>>>,
}

fn build(
    metrics: &Metrics,
    registry: &Registry,
    config: Config,
    previous: Option<&Snapshot>,
) -> Result<Snapshot, SnapshotError> {
    // Database files unchanged on disk are kept; a file updated in place is read again.
    let geo = Arc::new(GeoDb::load(config.geoip.chain(), previous.map(|p| &*p.geo))?);
    // Everything that can fail comes before the health registry is touched, so a rejected
    // reload leaves it as it was.
    let settings = PoolSettings {
        connect_timeout: config.server.connect_timeout,
        idle_timeout: config.server.idle_timeout,
        keepalive: config.upstream.keepalive,
        limit: config.upstream.limit,
    };
    let upstreams = match previous {
        Some(p)
            if p.config.server.connect_timeout == config.server.connect_timeout
                && p.config.server.idle_timeout == config.server.idle_timeout
                && p.config.upstream_tls == config.upstream_tls
                && p.config.upstream == config.upstream =>
        {
            p.upstreams.clone()
        }
        _ => Upstreams::new(&settings, &config.upstream_tls)?,
    };
    let fallback = match &config.fallback {
        Some(f) => Some(FallbackRuntime {
            // The fallback is another party's API: its own CA file, never our client certificate.
            // Capped per endpoint only for regions: a hosted API sets its own limits.
            upstreams: Upstreams::new(
                &PoolSettings {
                    limit: None,
                    ..settings.clone()
                },
                &UpstreamTlsConfig {
                    ca_file: f.ca_file.clone(),
                    client_auth: None,
                },
            )?,
            config: f.clone(),
            header: HeaderValue::from_static("fallback"),
            metrics: Arc::new(RegionMetrics::new(metrics, "fallback")),
            breaker: previous
                .and_then(|p| p.fallback.as_ref())
                .filter(|p| p.config.endpoint == f.endpoint && p.breaker.policy() == f.breaker)
                .map_or_else(|| Arc::new(SharedBreaker::new(f.breaker)), |p| p.breaker.clone()),
        }),
        None => None,
    };
    let admission = Arc::new(crate::admission::Admission::new(
        &config,
        metrics,
        previous.map(|p| p.admission.as_ref()),
    )?);
    let config = Arc::new(config);
    let table = RouteTable::new(config.clone());
    crate::route::residency::verify(&table)?;
    warn_stale_drains(&config, SystemTime::now());
    let mut endpoints_registry = registry.endpoints.lock().unwrap_or_else(|p| p.into_inner());
    let mut region_registry = registry.regions.lock().unwrap_or_else(|p| p.into_inner());
    let mut kept = HashMap::new();
    let mut regions = Vec::with_capacity(config.regions.len());
    for r in &config.regions {
        let health = region_registry.entry(r.name.clone()).or_default().clone();
        let endpoints = r
            .endpoints
            .iter()
            .map(|e| {
                let key = (r.name.clone(), e.url.clone());
                let health = endpoints_registry
                    .entry(key.clone())
                    .or_insert_with(|| Arc::new(EndpointHealth::new(&r.name, &e.url)))
                    .clone();
                kept.insert(key, health.clone());
                EndpointRuntime {
                    metrics: crate::observe::metrics::EndpointMetrics::new(metrics, &r.name, &e.url),
                    limit: upstreams.endpoint_limit(&e.scheme, &e.authority),
                    pooled: upstreams.pooled_endpoint(&e.scheme, &e.authority),
                    config: e.clone(),
                    health,
                }
            })
            .collect();
        regions.push(RegionRuntime {
            name: Arc::from(r.name.as_str()),
            header: HeaderValue::from_str(&r.name).unwrap_or(HeaderValue::from_static("unknown")),
            health,
            endpoints,
            metrics: Arc::new(RegionMetrics::new(metrics, &r.name)),
        });
    }
    // Endpoints that left the config are forgotten, so a later re-add starts fresh.
    *endpoints_registry = kept;
    region_registry.retain(|name, _| config.regions.iter().any(|r| &r.name == name));
    drop(endpoints_registry);
    drop(region_registry);
    Ok(Snapshot {
        table,
        policy: crate::health::policy(&config),
        config,
        geo,
        regions,
        upstreams,
        fallback,
        admission,
    })
}

/// A config drain whose `until` is already past is ignored; say so at every load.
fn warn_stale_drains(config: &Config, now: SystemTime) {
    for r in &config.regions {
        if let Some(d) = r.drain.as_ref().filter(|d| crate::health::drain::is_stale(d, now)) {
            let until = crate::health::drain::format_until(d).unwrap_or_default();
            tracing::warn!(region = %r.name, reason = %d.reason, %until, "config drain ignored: its until is in the past");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_ENDPOINTS: &str = r#"
[[region]]
name = "us-east"
location = [39.04, -77.49]
countries = ["US"]
endpoints = ["http://127.0.0.1:9", "http://127.0.0.2:9"]
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, None).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn a_failed_build_leaves_the_health_registry_alone() {
        let shared = Shared::new(parse(TWO_ENDPOINTS)).unwrap_or_else(|e| panic!("{e}"));
        let kept = shared.snapshot().regions[0].endpoints[1].health.clone();
        // Valid as text, but the fallback's CA file cannot be read: fails while building,
        // after validation, with the second endpoint gone from the new config.
        let broken = TWO_ENDPOINTS.replace(", \"http://127.0.0.2:9\"", "")
            + "[fallback]\nendpoint = \"http://127.0.0.1:9\"\nca_file = \"/nonexistent/ca.pem\"\n";
        assert!(shared.build(parse(&broken), Some(&shared.snapshot())).is_err());
        let rt = shared
            .build(parse(TWO_ENDPOINTS), Some(&shared.snapshot()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            Arc::ptr_eq(&rt.regions[0].endpoints[1].health, &kept),
            "health survived"
        );
    }
}
