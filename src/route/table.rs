//! The compiled region table: per-country candidate orders precomputed at config load.

use std::borrow::Cow;
use std::sync::Arc;

use super::decide::RoutePlan;
use crate::config::Config;
use crate::geo::{Country, GeoPoint, Subdivision};

/// A region: an index into [`Config::regions`].
pub type RegionId = usize;
/// A residency zone: an index into [`Config::zones`].
pub type ZoneId = usize;

/// One region a client may be sent to, in order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The region to send the client to.
    pub region: RegionId,
    pub(crate) distance_km: f64,
    /// The region lists the client's country in `countries`.
    pub home: bool,
}

/// Everything routing needs to know about clients of one country (or unlocated clients),
/// as the table keeps it: its own candidates, no route rule. A request borrows it
/// (`RoutePlan::reborrow`).
pub type CountryPlan = RoutePlan<'static>;

/// The compiled table. Built once per config; read by every request.
#[derive(Debug)]
pub struct RouteTable {
    /// The configuration the table was compiled from.
    pub config: Arc<Config>,
    by_country: Vec<Option<CountryPlan>>,
    /// Per country with no home region: the regions its clients may use, to be ordered by
    /// distance from each client's own coordinates; empty for countries with a home.
    nearest_pools: Vec<Box<[RegionId]>>,
    /// `[[region]] subdivisions` home claims, with their precomputed plans.
    by_subdivision: Vec<(Subdivision, CountryPlan)>,
    unlocated: CountryPlan,
    /// Per route rule: its candidates for clients with no zone, then for each zone.
    rules: Vec<Vec<Vec<Candidate>>>,
}

impl RouteTable {
    /// Compiles `config` into per-country, per-subdivision and per-rule candidate orders.
    pub fn new(config: Arc<Config>) -> RouteTable {
        let mut by_country = vec![None; 26 * 26];
        let mut nearest_pools: Vec<Box<[RegionId]>> = vec![Box::default(); 26 * 26];
        for a in b'A'..=b'Z' {
            for b in b'A'..=b'Z' {
                let code = [a, b];
                let Some(country) = std::str::from_utf8(&code).ok().and_then(Country::known) else {
                    continue;
                };
                let Some(info) = country.info() else { continue };
                let plan = order_candidates(&config, Some(country), info.point);
                if plan.home.is_none() {
                    let eligible = |r: &RegionId| plan.zone.is_none_or(|z| config.zones[z].regions.contains(r));
                    nearest_pools[country.index()] = (0..config.regions.len()).filter(eligible).collect();
                }
                by_country[country.index()] = Some(plan);
            }
        }
        let mut by_subdivision = Vec::new();
        for (r, region) in config.regions.iter().enumerate() {
            for &sub in &region.subdivisions {
                let Some(info) = sub.country().info() else { continue };
                let plan = order_with_home(&config, Some(sub.country()), info.point, Some(r));
                // A claim the client's residency zone does not allow is no claim.
                if plan.home == Some(r) {
                    by_subdivision.push((sub, plan));
                }
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
            nearest_pools,
            by_subdivision,
            unlocated,
            rules,
        }
    }

    /// The precomputed plan for a country; `None` for codes outside the table.
    pub(crate) fn country_plan(&self, country: Country) -> Option<&CountryPlan> {
        self.by_country.get(country.index()).and_then(Option::as_ref)
    }

    /// The regions a client of `country` may use, when the country is no region's home:
    /// they are ordered by distance from the client's own coordinates. `None` when the
    /// country has a home region, whose precomputed plan serves every client of it.
    pub(crate) fn nearest_pool(&self, country: Country) -> Option<&[RegionId]> {
        self.nearest_pools
            .get(country.index())
            .map(|p| &p[..])
            .filter(|p| !p.is_empty())
    }

    /// The precomputed plan for clients of a subdivision a region claims as home.
    pub(crate) fn subdivision_plan(&self, sub: Subdivision) -> Option<&CountryPlan> {
        self.by_subdivision.iter().find(|(s, _)| *s == sub).map(|(_, p)| p)
    }

    /// The plan for clients that cannot be located (served as if from `default_region`).
    pub(crate) fn unlocated_plan(&self) -> &CountryPlan {
        &self.unlocated
    }

    /// Candidates of route rule `rule` for a client in `zone`.
    pub(crate) fn rule_candidates(&self, rule: usize, zone: Option<ZoneId>) -> &[Candidate] {
        let slot = zone.map_or(0, |z| z + 1);
        self.rules
            .get(rule)
            .and_then(|r| r.get(slot))
            .map_or(&[], Vec::as_slice)
    }

    pub(crate) fn region_name(&self, region: RegionId) -> &str {
        self.config.regions.get(region).map_or("?", |r| r.name.as_str())
    }

    pub(crate) fn zone_name(&self, zone: ZoneId) -> &str {
        self.config.zones.get(zone).map_or("?", |z| &*z.name)
    }

    /// [`Self::zone_name`], shared: for a record that outlives the borrow.
    pub(crate) fn zone_name_shared(&self, zone: ZoneId) -> Option<std::sync::Arc<str>> {
        self.config.zones.get(zone).map(|z| z.name.clone())
    }
}

/// The ordered candidates for a client of `country` located at `origin` (docs/routing.md,
/// Residency and Candidate order): residency filter, then primaries before standbys, home
/// region first, then by great-circle distance; `failover = false` narrows the list to the
/// home region.
pub fn order_candidates(config: &Config, country: Option<Country>, origin: GeoPoint) -> CountryPlan {
    let home = match country {
        Some(c) => config.regions.iter().position(|r| r.countries.contains(&c)),
        // Unlocated clients are home clients of the default region.
        None => Some(config.geoip.default_region),
    };
    order_with_home(config, country, origin, home)
}

/// [`order_candidates`] with the home region given (a subdivision's claim); a home the
/// client's residency zone does not allow is dropped.
fn order_with_home(config: &Config, country: Option<Country>, origin: GeoPoint, home: Option<RegionId>) -> CountryPlan {
    let zone = country.and_then(|c| config.zones.iter().position(|z| z.countries.contains(&c)));
    let eligible = |r: RegionId| zone.is_none_or(|z| config.zones[z].regions.contains(&r));
    let home = home.filter(|&r| eligible(r));
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
        rule: None,
        candidates: Cow::Owned(candidates),
    }
}

/// Candidates ordered per request, kept inline so the hot path does not allocate.
pub(crate) const INLINE_CANDIDATES: usize = 16;

/// Up to `INLINE_CANDIDATES` candidates on the stack.
#[derive(Clone, Copy)]
pub struct InlineCandidates {
    len: usize,
    items: [Candidate; INLINE_CANDIDATES],
}

impl Default for InlineCandidates {
    fn default() -> InlineCandidates {
        InlineCandidates::new()
    }
}

impl InlineCandidates {
    /// Empty room for one plan's per-client order.
    pub const fn new() -> InlineCandidates {
        InlineCandidates {
            len: 0,
            items: [Candidate {
                region: 0,
                distance_km: 0.0,
                home: false,
            }; INLINE_CANDIDATES],
        }
    }

    pub(crate) fn as_slice(&self) -> &[Candidate] {
        &self.items[..self.len]
    }
}

/// The candidates of `pool` (a country with no home region) for a client at `origin`:
/// primaries before standbys, then by great-circle distance, as [`order_candidates`]
/// orders them; `sharded` keeps only the nearest. `None` when the pool does not fit inline.
pub(crate) fn order_nearest(
    config: &Config,
    pool: &[RegionId],
    origin: GeoPoint,
    sharded: bool,
) -> Option<InlineCandidates> {
    if pool.len() > INLINE_CANDIDATES {
        return None;
    }
    let mut out = InlineCandidates::new();
    for (slot, &region) in out.items.iter_mut().zip(pool) {
        *slot = Candidate {
            region,
            distance_km: origin.distance_km(&config.regions[region].location),
            home: false,
        };
    }
    out.len = pool.len();
    let items = &mut out.items[..out.len];
    // Unstable sort never allocates; the region index breaks every tie.
    items.sort_unstable_by(|a, b| {
        let (pa, pb) = (config.regions[a.region].priority, config.regions[b.region].priority);
        pa.cmp(&pb)
            .then(a.distance_km.total_cmp(&b.distance_km))
            .then(a.region.cmp(&b.region))
    });
    if sharded {
        let nearest = items
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| a.distance_km.total_cmp(&b.distance_km).then(a.region.cmp(&b.region)))
            .map_or(0, |(i, _)| i);
        out.items[0] = out.items[nearest];
        out.len = out.len.min(1);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_pools_exist_only_for_countries_without_home_and_stay_in_their_zone() {
        let text = r#"
            [geoip]
            default_region = "us-east"
            [[region]]
            name = "us-east"
            location = [39.04, -77.49]
            countries = ["CA"]
            endpoints = ["http://127.0.0.1:1"]
            [[region]]
            name = "us-west"
            location = [37.35, -121.96]
            subdivisions = ["US-CA"]
            endpoints = ["http://127.0.0.1:2"]
            [[region]]
            name = "eu-central"
            location = [50.11, 8.68]
            countries = ["DE"]
            subdivisions = ["FR-75"]
            endpoints = ["http://127.0.0.1:3"]
            [[region]]
            name = "eu-west"
            location = [53.35, -6.26]
            endpoints = ["http://127.0.0.1:4"]
            [[residency]]
            name = "eu"
            countries = ["DE", "FR", "BE"]
            regions = ["eu-central", "eu-west"]
            [[residency]]
            name = "us"
            countries = ["US"]
            regions = ["us-east", "us-west"]
        "#;
        let table = RouteTable::new(Arc::new(Config::parse(text, None).unwrap()));
        let c = |code: &str| Country::parse(code).unwrap();
        let names =
            |pool: Option<&[RegionId]>| pool.map(|p| p.iter().map(|&r| table.region_name(r)).collect::<Vec<_>>());
        let cases: [(&str, Option<Vec<&str>>); 5] = [
            ("CA", None),
            ("DE", None),
            ("US", Some(vec!["us-east", "us-west"])),
            ("BE", Some(vec!["eu-central", "eu-west"])),
            ("JP", Some(vec!["us-east", "us-west", "eu-central", "eu-west"])),
        ];
        for (code, want) in cases {
            assert_eq!(names(table.nearest_pool(c(code))), want, "{code}");
        }
        let sub = |s: &str| Subdivision::parse(s).unwrap();
        assert_eq!(table.subdivision_plan(sub("US-CA")).and_then(|p| p.home), Some(1));
        assert_eq!(table.subdivision_plan(sub("FR-75")).and_then(|p| p.home), Some(2));
        assert_eq!(table.subdivision_plan(sub("US-TX")), None);
    }
}
