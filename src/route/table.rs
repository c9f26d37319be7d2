//! The compiled region table: per-country candidate orders precomputed at config load.

use std::sync::Arc;

use crate::config::Config;
use crate::geo::{Country, GeoPoint};

pub type RegionId = usize;
pub type ZoneId = usize;

/// One region a client may be sent to, in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub region: RegionId,
    pub distance_km: f64,
    /// The region lists the client's country in `countries`.
    pub home: bool,
}

/// Everything routing needs to know about clients of one country (or unlocated clients).
#[derive(Debug, Clone, PartialEq)]
pub struct CountryPlan {
    pub country: Option<Country>,
    /// Where distances are measured from.
    pub origin: GeoPoint,
    pub zone: Option<ZoneId>,
    pub home: Option<RegionId>,
    /// `failover = false` on the zone or the home region: only the home region may serve.
    pub sharded: bool,
    /// The fallback may serve these clients when no candidate can.
    pub fallback: bool,
    pub candidates: Vec<Candidate>,
}

/// The compiled table. Built once per config; read by every request.
#[derive(Debug)]
pub struct RouteTable {
    pub config: Arc<Config>,
    by_country: Vec<Option<CountryPlan>>,
    unlocated: CountryPlan,
    /// Per route rule: its candidates for clients with no zone, then for each zone.
    rules: Vec<Vec<Vec<Candidate>>>,
}

impl RouteTable {
    pub fn new(config: Arc<Config>) -> RouteTable {
        let mut by_country = vec![None; 26 * 26];
        for a in b'A'..=b'Z' {
            for b in b'A'..=b'Z' {
                let code = [a, b];
                let Some(country) = std::str::from_utf8(&code).ok().and_then(Country::known) else {
                    continue;
                };
                let Some(info) = country.info() else { continue };
                by_country[country.index()] = Some(order_candidates(&config, Some(country), info.point));
            }
        }
        let default_region = &config.regions[config.geoip.default_region];
        let unlocated = order_candidates(&config, None, default_region.location);
        let rules = config
            .routes
            .iter()
            .map(|rule| {
                let mut per_zone = Vec::with_capacity(config.zones.len() + 1);
                let as_candidates = |keep: &dyn Fn(RegionId) -> bool| {
                    rule.regions
                        .iter()
                        .filter(|&&r| keep(r))
                        .map(|&region| Candidate {
                            region,
                            distance_km: 0.0,
                            home: false,
                        })
                        .collect::<Vec<_>>()
                };
                per_zone.push(as_candidates(&|_| true));
                for zone in &config.zones {
                    if rule.residency_exempt {
                        per_zone.push(as_candidates(&|_| true));
                    } else {
                        per_zone.push(as_candidates(&|r| zone.regions.contains(&r)));
                    }
                }
                per_zone
            })
            .collect();
        RouteTable {
            config,
            by_country,
            unlocated,
            rules,
        }
    }

    /// The precomputed plan for a country; `None` for codes outside the table.
    pub fn country_plan(&self, country: Country) -> Option<&CountryPlan> {
        self.by_country.get(country.index()).and_then(Option::as_ref)
    }

    /// The plan for clients that cannot be located (served as if from `default_region`).
    pub fn unlocated_plan(&self) -> &CountryPlan {
        &self.unlocated
    }

    /// Candidates of route rule `rule` for a client in `zone`.
    pub fn rule_candidates(&self, rule: usize, zone: Option<ZoneId>) -> &[Candidate] {
        let slot = zone.map_or(0, |z| z + 1);
        self.rules
            .get(rule)
            .and_then(|r| r.get(slot))
            .map_or(&[], Vec::as_slice)
    }

    pub fn region_name(&self, region: RegionId) -> &str {
        self.config.regions.get(region).map_or("?", |r| r.name.as_str())
    }

    pub fn zone_name(&self, zone: ZoneId) -> &str {
        self.config.zones.get(zone).map_or("?", |z| z.name.as_str())
    }
}

/// The ordered candidates for a client of `country` located at `origin` (docs/routing.md,
/// Residency and Candidate order): residency filter, then primaries before standbys, home
/// region first, then by great-circle distance; `failover = false` narrows the list to the
/// home region.
pub fn order_candidates(config: &Config, country: Option<Country>, origin: GeoPoint) -> CountryPlan {
    let zone = country.and_then(|c| config.zones.iter().position(|z| z.countries.contains(&c)));
    let eligible = |r: RegionId| zone.is_none_or(|z| config.zones[z].regions.contains(&r));
    let home = match country {
        Some(c) => config
            .regions
            .iter()
            .position(|r| r.countries.contains(&c))
            .filter(|&r| eligible(r)),
        // Unlocated clients are home clients of the default region.
        None => Some(config.geoip.default_region),
    };
    let mut candidates: Vec<Candidate> = (0..config.regions.len())
        .filter(|&r| eligible(r))
        .map(|r| Candidate {
            region: r,
            distance_km: origin.distance_km(&config.regions[r].location),
            home: Some(r) == home,
        })
        .collect();
    candidates.sort_by(|a, b| {
        let (pa, pb) = (config.regions[a.region].priority, config.regions[b.region].priority);
        pa.cmp(&pb)
            .then(b.home.cmp(&a.home))
            .then(a.distance_km.total_cmp(&b.distance_km))
            .then(a.region.cmp(&b.region))
    });
    let zone_sharded = zone.is_some_and(|z| !config.zones[z].failover);
    let region_sharded = home.is_some_and(|h| !config.regions[h].failover);
    let sharded = zone_sharded || region_sharded;
    if sharded {
        // The home region, or for a zone country no region calls home, the zone's nearest.
        let keep = home.or_else(|| {
            candidates
                .iter()
                .min_by(|a, b| a.distance_km.total_cmp(&b.distance_km))
                .map(|c| c.region)
        });
        candidates.retain(|c| Some(c.region) == keep);
    }
    let fallback = config.fallback.as_ref().is_some_and(|f| match zone {
        None => !sharded,
        Some(z) => f.zone == Some(z) && !sharded,
    });
    CountryPlan {
        country,
        origin,
        zone,
        home,
        sharded,
        fallback,
        candidates,
    }
}
