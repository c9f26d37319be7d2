//! The per-request routing decision (docs/routing.md, Location to When nothing is
//! available), pure over the compiled table and a view of region state.

use std::borrow::Cow;

use http::{HeaderMap, HeaderName, Method};

use super::table::{Candidate, InlineCandidates, RegionId, RouteTable, ZoneId, order_nearest};
use crate::config::UnknownPolicy;
use crate::geo::{Country, GeoPoint, Located};

/// The parts of a request that route rules match on.
#[derive(Clone, Copy)]
pub struct RequestFacts<'a> {
    /// The request method, for a rule's `methods`.
    pub method: &'a Method,
    /// The request path, matched against a rule's `path_prefix` by whole segments.
    pub path: &'a str,
    /// The request headers, for a rule's `headers`.
    pub headers: &'a dyn FieldLookup,
}

impl std::fmt::Debug for RequestFacts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestFacts")
            .field("method", self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A request's fields as the rules read them: a map, or the proxy's view of a head's
/// fields (`forward::request_fields`), which the decision does not depend on.
pub trait FieldLookup {
    /// The first value of `name`.
    fn first(&self, name: &HeaderName) -> Option<&[u8]>;
}

impl FieldLookup for HeaderMap {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(http::HeaderValue::as_bytes)
    }
}

/// Which regions may serve this request, in order, and under which rules.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePlan<'t> {
    /// The client's country; `None` for an unlocated client.
    pub country: Option<Country>,
    pub(crate) origin: GeoPoint,
    /// The client's residency zone, if its country is bound to one.
    pub zone: Option<ZoneId>,
    pub(crate) home: Option<RegionId>,
    pub(crate) sharded: bool,
    /// The `[fallback]` may serve this client (its zone allows it; no rule matched, not sharded).
    pub fallback: bool,
    /// Index of the `[[route]]` rule that matched, if any.
    pub rule: Option<usize>,
    /// Regions to try, in order (failover, retries and panic mode walk it).
    pub candidates: Cow<'t, [Candidate]>,
}

/// The request is refused before any region is considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `geoip.unknown = "refuse"` and the client could not be located.
    LocationRefused,
    /// A route rule lists no region of the client's residency zone.
    ResidencyForbidden {
        /// The client's residency zone.
        zone: ZoneId,
        /// Index of the `[[route]]` rule that matched.
        rule: usize,
    },
}

/// How a region looks to the selection right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionState {
    /// Has an endpoint in rotation and is under its spillover thresholds.
    Available,
    /// Every endpoint is past a spillover threshold.
    Saturated,
    /// No healthy endpoint; panic mode may still use it.
    Unhealthy,
    /// Drained, or every endpoint already tried for this request: never used.
    Unavailable,
}

/// Where the next attempt goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the attempt to this region.
    Region(RegionId),
    /// Send the attempt to the `[fallback]` hosted API.
    Fallback,
    /// Meridian answers 503 itself.
    Refuse(NoRegion),
}

/// Why no region (and no fallback) can take the request: answered with a 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRegion {
    /// A residency-bound client whose zone cannot serve it.
    ResidencyUnavailable {
        /// The client's residency zone.
        zone: ZoneId,
    },
    /// No candidate region can serve and there is no usable fallback (`no_region_available`).
    NoRegionAvailable,
}

/// Steps 2–4 and route rules: the ordered candidates for a located client. A per-client
/// order (coordinates, no home region) is allocated; the request path uses [`plan_in`].
pub fn plan<'t>(table: &'t RouteTable, located: Located, req: &RequestFacts<'_>) -> Result<RoutePlan<'t>, Refusal> {
    plan_with(table, located, req, None)
}

/// [`plan`], with a per-client order written into `scratch` (the caller's stack) rather
/// than allocated. The plan itself stays small, so the precomputed path pays nothing.
pub fn plan_in<'t>(
    table: &'t RouteTable,
    located: Located,
    req: &RequestFacts<'_>,
    scratch: &'t mut InlineCandidates,
) -> Result<RoutePlan<'t>, Refusal> {
    plan_with(table, located, req, Some(scratch))
}

fn plan_with<'t>(
    table: &'t RouteTable,
    located: Located,
    req: &RequestFacts<'_>,
    scratch: Option<&'t mut InlineCandidates>,
) -> Result<RoutePlan<'t>, Refusal> {
    let config = &table.config;
    let known = match located {
        Located::Country {
            country,
            point,
            subdivision,
            ..
        } => table.country_plan(country).map(|p| (p, country, point, subdivision)),
        Located::Private | Located::Unknown => None,
    };
    let mut plan = match known {
        Some((base, country, point, subdivision)) => {
            let claimed = subdivision.and_then(|s| table.subdivision_plan(s));
            // Only a client with coordinates needs the pool: the common country-only
            // lookup goes straight to the precomputed plan.
            let nearest = match (claimed, point) {
                (None, Some(point)) => table.nearest_pool(country).map(|pool| (pool, point)),
                _ => None,
            };
            let mut plan = match (claimed, nearest) {
                // A subdivision a region claims: that region first, precomputed.
                (Some(p), _) => RoutePlan::reborrow(p),
                // No home region and the client's own coordinates: nearest region first,
                // ordered for this client (us-east or us-west for a US client).
                (None, Some((pool, point))) => {
                    let mut plan = RoutePlan::reborrow(base);
                    plan.candidates = match (scratch, order_nearest(config, pool, point, base.sharded)) {
                        (Some(scratch), Some(order)) => {
                            *scratch = order;
                            let scratch: &'t InlineCandidates = scratch;
                            Cow::Borrowed(scratch.as_slice())
                        }
                        _ => Cow::Owned(
                            super::table::order_candidates(config, base.country, point)
                                .candidates
                                .into_owned(),
                        ),
                    };
                    plan
                }
                // A home region, or a country-level location: the precomputed order.
                _ => RoutePlan::reborrow(base),
            };
            if let Some(point) = point {
                plan.origin = point;
            }
            plan
        }
        None if config.geoip.unknown == UnknownPolicy::Refuse => return Err(Refusal::LocationRefused),
        None => RoutePlan::reborrow(table.unlocated_plan()),
    };
    if let Some(rule) = matching_rule(table, req) {
        let candidates = table.rule_candidates(rule, plan.zone);
        if let (Some(zone), true) = (plan.zone, candidates.is_empty()) {
            return Err(Refusal::ResidencyForbidden { zone, rule });
        }
        plan.rule = Some(rule);
        plan.fallback = false;
        plan.sharded = false;
        plan.candidates = Cow::Borrowed(candidates);
    }
    Ok(plan)
}

impl<'t> RoutePlan<'t> {
    /// The same plan over borrowed candidates: what a request starts from, without a copy.
    pub(crate) fn reborrow(&'t self) -> RoutePlan<'t> {
        RoutePlan {
            candidates: Cow::Borrowed(&self.candidates),
            ..*self
        }
    }
}

fn matching_rule(table: &RouteTable, req: &RequestFacts<'_>) -> Option<usize> {
    table.config.routes.iter().position(|rule| {
        path_matches(&rule.path_prefix, req.path)
            && rule.methods.as_ref().is_none_or(|ms| ms.contains(req.method))
            && rule
                .headers
                .iter()
                .all(|(name, value)| req.headers.first(name) == Some(value.as_bytes()))
    })
}

/// Whole-segment prefix match: `/v1/a` matches `/v1/a` and `/v1/a/b`, not `/v1/ab`.
/// The prefix is stored without a trailing slash (`/` is stored as "").
pub fn path_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Step 5–6: the first candidate that can serve, else the fallback, else a refusal.
/// Saturated regions come after the fallback but before a refusal; panic mode, when on,
/// uses unhealthy candidates (never drained ones) as a last resort, inside the plan only.
pub fn select(
    plan: &RoutePlan<'_>,
    state: impl Fn(RegionId) -> RegionState,
    fallback_usable: bool,
    panic_mode: bool,
) -> Decision {
    let first = |wanted: RegionState| {
        plan.candidates
            .iter()
            .find(|c| state(c.region) == wanted)
            .map(|c| c.region)
    };
    if let Some(r) = first(RegionState::Available) {
        return Decision::Region(r);
    }
    if plan.fallback && fallback_usable {
        return Decision::Fallback;
    }
    if let Some(r) = first(RegionState::Saturated) {
        return Decision::Region(r);
    }
    if panic_mode {
        if let Some(r) = first(RegionState::Unhealthy) {
            return Decision::Region(r);
        }
    }
    Decision::Refuse(match plan.zone {
        Some(zone) if plan.rule.is_none() => NoRegion::ResidencyUnavailable { zone },
        _ => NoRegion::NoRegionAvailable,
    })
}

#[cfg(test)]
mod tests {
    use super::super::table::{InlineCandidates, order_candidates};
    use super::*;
    use crate::config::Config;
    use crate::test_fixtures::{TestResult, WORLD, world};
    use std::sync::Arc;

    fn table(extra: &str) -> RouteTable {
        world(extra)
    }

    fn table_from(text: &str) -> RouteTable {
        let config = Config::parse(text, None).unwrap_or_else(|e| panic!("{e}"));
        RouteTable::new(Arc::new(config))
    }

    fn names(t: &RouteTable, p: &RoutePlan<'_>) -> Vec<String> {
        p.candidates
            .iter()
            .map(|c| t.region_name(c.region).to_string())
            .collect()
    }

    fn country(code: &str) -> Located {
        Located::in_country(Country::parse(code).unwrap())
    }

    fn at(code: &str, lat: f64, lon: f64, subdivision: Option<&str>) -> Located {
        Located::Country {
            country: Country::parse(code).unwrap(),
            point: Some(GeoPoint { lat, lon }),
            subdivision: subdivision.map(|s| crate::geo::Subdivision::parse(s).unwrap()),
            source: crate::geo::DatabaseId(0),
        }
    }

    /// [`plan`] for tests that expect a plan, so a refusal fails them through `?`.
    fn planned<'t>(t: &'t RouteTable, located: Located, req: &RequestFacts<'_>) -> Result<RoutePlan<'t>, String> {
        plan(t, located, req).map_err(|r| format!("refused: {r:?}"))
    }

    fn facts<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestFacts<'a> {
        RequestFacts {
            method: &Method::GET,
            path,
            headers,
        }
    }

    #[test]
    fn candidate_order_home_then_distance_within_zone() -> TestResult {
        let t = table("");
        let h = HeaderMap::new();
        let cases: [(&str, &[&str]); 7] = [
            (
                "US",
                &[
                    "us-east",
                    "us-west",
                    "eu-west",
                    "uk-south",
                    "eu-central",
                    "ap-southeast",
                ],
            ),
            ("GB", &["uk-south"]),
            ("DE", &["eu-central", "eu-west"]),
            ("FR", &["eu-west", "eu-central"]),
            (
                "IE",
                &[
                    "eu-west",
                    "uk-south",
                    "eu-central",
                    "us-east",
                    "us-west",
                    "ap-southeast",
                ],
            ),
            (
                "AU",
                &[
                    "ap-southeast",
                    "us-west",
                    "eu-central",
                    "uk-south",
                    "eu-west",
                    "us-east",
                ],
            ),
            // No home region: pure distance.
            (
                "JP",
                &[
                    "ap-southeast",
                    "us-west",
                    "eu-central",
                    "uk-south",
                    "eu-west",
                    "us-east",
                ],
            ),
        ];
        for (code, want) in cases {
            let p = planned(&t, country(code), &facts("/v1/chat", &h))?;
            assert_eq!(names(&t, &p), want, "{code}");
            assert!(matches!(p.candidates, Cow::Borrowed(_)), "precomputed for {code}");
        }
        Ok(())
    }

    #[test]
    fn unlocated_clients_use_default_region_or_are_refused() -> TestResult {
        let h = HeaderMap::new();
        let t = table("");
        for located in [Located::Private, Located::Unknown] {
            let p = planned(&t, located, &facts("/", &h))?;
            assert_eq!(names(&t, &p)[..2], ["us-east", "us-west"]);
            assert_eq!(p.zone, None);
        }
        let refusing = Config::parse(
            &WORLD.replace(
                "default_region = \"us-east\"",
                "default_region = \"us-east\"\nunknown = \"refuse\"",
            ),
            None,
        )?;
        let t = RouteTable::new(Arc::new(refusing));
        assert_eq!(
            plan(&t, Located::Private, &facts("/", &h)),
            Err(Refusal::LocationRefused)
        );
        assert!(plan(&t, country("US"), &facts("/", &h)).is_ok());
        Ok(())
    }

    #[test]
    fn a_home_region_keeps_the_precomputed_order_whatever_the_coordinates() -> TestResult {
        let t = table("");
        let h = HeaderMap::new();
        // US is us-east's home: a Seattle client still goes there first (listing US as a
        // home turns distance ordering inside the country off), from the table as is.
        let p = planned(&t, at("US", 47.6, -122.3, None), &facts("/", &h))?;
        assert_eq!(names(&t, &p)[..3], ["us-east", "us-west", "eu-west"]);
        assert!(matches!(p.candidates, Cow::Borrowed(_)));
        assert_eq!(
            p.origin,
            GeoPoint { lat: 47.6, lon: -122.3 },
            "distances are shown from the client"
        );
        Ok(())
    }

    #[test]
    fn coordinates_order_regions_when_the_country_has_no_home() -> TestResult {
        let t = table_from(&WORLD.replace(r#"countries = ["US", "CA"]"#, r#"countries = ["CA"]"#));
        let h = HeaderMap::new();
        let cases = [
            (at("US", 37.34, -121.89, None), "us-west"), // San Jose
            (at("US", 47.6, -122.3, None), "us-west"),   // Seattle
            (at("US", 39.04, -77.49, None), "us-east"),  // Ashburn
            (at("US", 25.77, -80.19, None), "us-east"),  // Miami
            (at("JP", 35.68, 139.69, None), "ap-southeast"),
            (country("US"), "us-east"), // no coordinates: the country's point (Kansas)
        ];
        for (located, first) in cases {
            let p = planned(&t, located, &facts("/", &h))?;
            assert_eq!(names(&t, &p)[0], first, "{located:?}");
            // The same order the allocating reference computes.
            if let Located::Country {
                country,
                point: Some(point),
                ..
            } = located
            {
                let reference = order_candidates(&t.config, Some(country), point);
                assert_eq!(&*p.candidates, &reference.candidates[..], "{located:?}");
                // The same order written to the caller's scratch, borrowed from it.
                let mut scratch = InlineCandidates::new();
                let inline =
                    plan_in(&t, located, &facts("/", &h), &mut scratch).map_err(|r| format!("refused: {r:?}"))?;
                assert!(matches!(inline.candidates, Cow::Borrowed(_)), "{located:?}");
                assert_eq!(inline, p, "{located:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_sharded_zone_without_home_keeps_the_region_nearest_the_client() -> TestResult {
        // DE and FR have a home; BE is in the zone and no region's home: its clients go to
        // the zone region nearest them, and only there.
        let t = table_from(&format!(
            "{}\nfailover = false",
            WORLD.replace(r#"countries = ["DE", "FR"]"#, r#"countries = ["DE", "FR", "BE", "IT"]"#)
        ));
        let h = HeaderMap::new();
        let cases = [
            (at("BE", 51.2, 2.9, None), "eu-central"), // Ostend: 420 km from Frankfurt, 680 from Dublin
            (at("IT", 45.46, 9.19, None), "eu-central"), // Milan
            // A block the database places near Dublin, though registered in BE: Dublin.
            (at("BE", 53.0, -6.0, None), "eu-west"),
        ];
        for (located, want) in cases {
            let p = planned(&t, located, &facts("/", &h))?;
            let reference = match located {
                Located::Country {
                    country,
                    point: Some(point),
                    ..
                } => order_candidates(&t.config, Some(country), point),
                _ => unreachable!(),
            };
            assert_eq!(&*p.candidates, &reference.candidates[..], "{located:?}");
            assert_eq!(names(&t, &p), [want], "{located:?}");
        }
        Ok(())
    }

    #[test]
    fn a_subdivision_claim_makes_a_home_inside_a_country() {
        let t = table_from(&WORLD.replace(
            "name = \"us-west\"\n",
            "name = \"us-west\"\n        subdivisions = [\"US-CA\", \"US-OR\"]\n",
        ));
        let h = HeaderMap::new();
        let cases = [
            (at("US", 37.34, -121.89, Some("US-CA")), "us-west", Some("us-west")),
            (at("US", 45.5, -122.7, Some("US-OR")), "us-west", Some("us-west")),
            (at("US", 47.6, -122.3, Some("US-WA")), "us-east", Some("us-east")),
            (at("US", 40.7, -74.0, None), "us-east", Some("us-east")),
        ];
        for (located, first, home) in cases {
            let p = plan(&t, located, &facts("/", &h)).unwrap();
            assert_eq!(names(&t, &p)[0], first, "{located:?}");
            assert_eq!(p.home.map(|r| t.region_name(r)), home, "{located:?}");
            assert!(p.candidates[0].home);
        }
    }

    #[test]
    fn selection_skips_unavailable_and_never_leaves_the_zone() -> TestResult {
        let t = table("[fallback]\nendpoint = \"http://127.0.0.1:9\"");
        let h = HeaderMap::new();
        let region = |n: &str| t.config.region_index(n).unwrap();
        let down = |list: &'static [&'static str]| {
            let ids: Vec<RegionId> = list.iter().map(|n| region(n)).collect();
            move |r: RegionId| {
                if ids.contains(&r) {
                    RegionState::Unavailable
                } else {
                    RegionState::Available
                }
            }
        };
        let uk = t.config.zone_index("uk").ok_or("no zone uk")?;
        let cases: [(&str, &'static [&'static str], Decision); 6] = [
            ("US", &[], Decision::Region(region("us-east"))),
            ("US", &["us-east"], Decision::Region(region("us-west"))),
            ("GB", &[], Decision::Region(region("uk-south"))),
            (
                "GB",
                &["uk-south"],
                Decision::Refuse(NoRegion::ResidencyUnavailable { zone: uk }),
            ),
            ("DE", &["eu-central"], Decision::Region(region("eu-west"))),
            (
                "US",
                &[
                    "us-east",
                    "us-west",
                    "uk-south",
                    "eu-west",
                    "eu-central",
                    "ap-southeast",
                ],
                Decision::Fallback,
            ),
        ];
        for (code, regions_down, want) in cases {
            let p = planned(&t, country(code), &facts("/", &h))?;
            assert_eq!(
                select(&p, down(regions_down), true, false),
                want,
                "{code} with {regions_down:?} down"
            );
        }
        let p = planned(&t, country("US"), &facts("/", &h))?;
        assert_eq!(
            select(&p, |_| RegionState::Unavailable, false, false),
            Decision::Refuse(NoRegion::NoRegionAvailable)
        );
        Ok(())
    }

    #[test]
    fn saturated_and_panic_are_last_resorts() -> TestResult {
        let t = table("");
        let h = HeaderMap::new();
        let p = planned(&t, country("GB"), &facts("/", &h))?;
        let uk = t.config.region_index("uk-south").ok_or("no region uk-south")?;
        assert_eq!(
            select(&p, |_| RegionState::Saturated, false, false),
            Decision::Region(uk)
        );
        assert!(matches!(
            select(&p, |_| RegionState::Unhealthy, false, false),
            Decision::Refuse(_)
        ));
        assert_eq!(
            select(&p, |_| RegionState::Unhealthy, false, true),
            Decision::Region(uk)
        );
        assert!(matches!(
            select(&p, |_| RegionState::Unavailable, false, true),
            Decision::Refuse(_)
        ));
        Ok(())
    }

    #[test]
    fn sharding_keeps_clients_home() -> TestResult {
        let t = table("").config.as_ref().clone();
        let mut c = t;
        let eu = c.zone_index("eu").ok_or("no zone eu")?;
        c.zones[eu].failover = false;
        let us = c.region_index("us-east").ok_or("no region us-east")?;
        c.regions[us].failover = false;
        let t = RouteTable::new(Arc::new(c));
        let h = HeaderMap::new();
        let cases: [(&str, &[&str], bool); 4] = [
            ("DE", &["eu-central"], true),
            ("FR", &["eu-west"], true),
            ("US", &["us-east"], true),
            (
                "IE",
                &[
                    "eu-west",
                    "uk-south",
                    "eu-central",
                    "us-east",
                    "us-west",
                    "ap-southeast",
                ],
                false,
            ),
        ];
        for (code, want, sharded) in cases {
            let p = planned(&t, country(code), &facts("/", &h))?;
            assert_eq!(names(&t, &p), want, "{code}");
            assert_eq!(p.sharded, sharded, "{code}");
        }
        Ok(())
    }

    #[test]
    fn standbys_come_after_every_primary() -> TestResult {
        let t = table("").config.as_ref().clone();
        let mut c = t;
        let uk = c.region_index("uk-south").ok_or("no region uk-south")?;
        let use_ = c.region_index("us-east").ok_or("no region us-east")?;
        c.regions[uk].priority = 1;
        c.regions[use_].priority = 1;
        let t = RouteTable::new(Arc::new(c));
        let h = HeaderMap::new();
        let p = planned(&t, country("IE"), &facts("/", &h))?;
        assert_eq!(
            names(&t, &p),
            [
                "eu-west",
                "eu-central",
                "us-west",
                "ap-southeast",
                "uk-south",
                "us-east"
            ]
        );
        let p = planned(&t, country("US"), &facts("/", &h))?;
        assert_eq!(names(&t, &p)[..1], ["us-west"]);
        assert_eq!(names(&t, &p)[4..], ["us-east", "uk-south"]);
        Ok(())
    }

    #[test]
    fn route_rules_match_whole_segments_and_respect_residency() -> TestResult {
        let t = table(
            r#"
            [[route]]
            path_prefix = "/v1/fine_tuning"
            regions = ["us-east"]
            [[route]]
            path_prefix = "/v1/models"
            regions = ["us-east", "eu-west"]
            [[route]]
            path_prefix = "/v1/files"
            regions = ["us-east"]
            residency_exempt = true
            "#,
        );
        let h = HeaderMap::new();
        let eu = t.config.zone_index("eu").ok_or("no zone eu")?;
        let uk = t.config.zone_index("uk").ok_or("no zone uk")?;
        type Want = Result<&'static [&'static str], Refusal>;
        let cases: [(&str, &str, Want); 9] = [
            ("AU", "/v1/fine_tuning", Ok(&["us-east"])),
            ("AU", "/v1/fine_tuning/jobs", Ok(&["us-east"])),
            (
                "AU",
                "/v1/fine_tuning_x",
                Ok(&[
                    "ap-southeast",
                    "us-west",
                    "eu-central",
                    "uk-south",
                    "eu-west",
                    "us-east",
                ]),
            ),
            (
                "AU",
                "/v1/fine_tuningjobs",
                Ok(&[
                    "ap-southeast",
                    "us-west",
                    "eu-central",
                    "uk-south",
                    "eu-west",
                    "us-east",
                ]),
            ),
            (
                "DE",
                "/v1/fine_tuning",
                Err(Refusal::ResidencyForbidden { zone: eu, rule: 0 }),
            ),
            ("DE", "/v1/models", Ok(&["eu-west"])),
            (
                "GB",
                "/v1/models",
                Err(Refusal::ResidencyForbidden { zone: uk, rule: 1 }),
            ),
            ("GB", "/v1/files/abc", Ok(&["us-east"])),
            ("US", "/v1/models/x", Ok(&["us-east", "eu-west"])),
        ];
        for (code, path, want) in cases {
            let got = plan(&t, country(code), &facts(path, &h));
            match (got, want) {
                (Ok(p), Ok(w)) => assert_eq!(names(&t, &p), w, "{code} {path}"),
                (Err(e), Err(w)) => assert_eq!(e, w, "{code} {path}"),
                (got, want) => panic!("{code} {path}: got {got:?}, want {want:?}"),
            }
        }
        // A rule's regions, then 503: no fallback for a rule.
        let p = planned(&t, country("AU"), &facts("/v1/fine_tuning", &h))?;
        assert_eq!(
            select(&p, |_| RegionState::Unavailable, true, false),
            Decision::Refuse(NoRegion::NoRegionAvailable)
        );
        Ok(())
    }

    #[test]
    fn fallback_eligibility_follows_zones() -> TestResult {
        let t = table("[fallback]\nendpoint = \"https://127.0.0.1:9\"\nzone = \"eu\"");
        let h = HeaderMap::new();
        let cases = [("US", true), ("DE", true), ("GB", false), ("JP", true)];
        for (code, fallback) in cases {
            let p = planned(&t, country(code), &facts("/", &h))?;
            assert_eq!(p.fallback, fallback, "{code}");
        }
        Ok(())
    }

    #[test]
    fn whole_segment_prefixes() {
        let cases = [
            ("/v1/a", "/v1/a", true),
            ("/v1/a", "/v1/a/", true),
            ("/v1/a", "/v1/a/b", true),
            ("/v1/a", "/v1/ab", false),
            ("/v1/a", "/v1", false),
            ("", "/anything", true),
        ];
        for (prefix, path, want) in cases {
            assert_eq!(path_matches(prefix, path), want, "{prefix} vs {path}");
        }
    }
}
