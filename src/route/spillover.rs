//! Regional spillover (docs/routing.md, Spillover): when a region counts as saturated, with
//! hysteresis so it does not flap at the threshold [pure].

use crate::config::SpilloverConfig;
use crate::health::load::Load;

/// A saturated region leaves that state once an endpoint falls below this fraction of the
/// threshold; between it and the threshold the region keeps the state it had.
pub(crate) const RELEASE: f64 = 0.8;

/// How close an endpoint is to saturation: its reading as a fraction of the threshold, the
/// highest over queue depth and KV cache. 1.0 or more is at or above a threshold; 0 when
/// the reading is unknown (a missing metrics page never saturates a region).
pub(crate) fn pressure(load: Option<Load>, t: &SpilloverConfig) -> f64 {
    let Some(load) = load else { return 0.0 };
    let ratio = |value: f64, threshold: Option<f64>| match threshold {
        Some(th) if th > 0.0 => value / th,
        _ => 0.0,
    };
    ratio(load.queue_depth, t.queue_depth).max(ratio(load.kv_cache, t.kv_cache))
}

/// A region's pressure: that of its least pressed endpoint that may serve, since one
/// endpoint with room is enough to keep the region's clients at home. `None` for none.
pub(crate) fn region_pressure(endpoints: impl IntoIterator<Item = f64>) -> Option<f64> {
    endpoints.into_iter().reduce(f64::min)
}

/// The region's saturated state after a new reading; `Some(new)` when it changes.
/// Entered when every serving endpoint is at or above a threshold, left when one is below
/// [`RELEASE`] of it, or when no endpoint can serve (the region is then unavailable anyway).
pub(crate) fn next(saturated: bool, pressure: Option<f64>) -> Option<bool> {
    let now = match pressure {
        None => false,
        Some(p) if saturated => p >= RELEASE,
        Some(p) => p >= 1.0,
    };
    (now != saturated).then_some(now)
}

/// Whether one endpoint is at or above a threshold; affinity lets such an endpoint's
/// sessions go elsewhere while another endpoint has room.
pub(crate) fn endpoint_saturated(load: Option<Load>, t: Option<&SpilloverConfig>) -> bool {
    t.is_some_and(|t| pressure(load, t) >= 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(queue_depth: f64, kv_cache: f64) -> Option<Load> {
        Some(Load {
            queue_depth,
            running: 0.0,
            kv_cache,
        })
    }

    #[test]
    fn pressure_table() {
        let both = SpilloverConfig {
            queue_depth: Some(10.0),
            kv_cache: Some(0.9),
        };
        let queue_only = SpilloverConfig {
            queue_depth: Some(10.0),
            kv_cache: None,
        };
        let cases = [
            ("unknown", None, &both, 0.0),
            ("idle", load(0.0, 0.0), &both, 0.0),
            ("queue at threshold", load(10.0, 0.0), &both, 1.0),
            ("half queue", load(5.0, 0.0), &both, 0.5),
            ("kv dominates", load(1.0, 0.9), &both, 1.0),
            ("kv ignored without a kv threshold", load(1.0, 1.0), &queue_only, 0.1),
        ];
        for (name, l, t, want) in cases {
            assert!((pressure(l, t) - want).abs() < 1e-9, "{name}: {}", pressure(l, t));
        }
    }

    #[test]
    fn hysteresis_table() {
        // (saturated before, region pressure, transition)
        let cases = [
            (false, Some(0.5), None),
            (false, Some(0.99), None),
            (false, Some(1.0), Some(true)),
            (false, Some(3.0), Some(true)),
            (true, Some(1.5), None),
            (true, Some(0.9), None),
            (true, Some(0.8), None),
            (true, Some(0.79), Some(false)),
            (true, None, Some(false)),
            (false, None, None),
        ];
        for (was, p, want) in cases {
            assert_eq!(next(was, p), want, "was {was}, pressure {p:?}");
        }
    }

    #[test]
    fn holding_between_release_and_threshold_never_flips() {
        for start in [false, true] {
            let mut state = start;
            for p in [0.85, 0.95, 0.81, 0.99, 0.8] {
                if let Some(s) = next(state, Some(p)) {
                    state = s;
                }
            }
            assert_eq!(state, start);
        }
    }

    /// What selection does with saturated regions (docs/routing.md, Spillover): skipped like
    /// unavailable ones, never across a zone, and a zone's clients are still served inside
    /// it when every zone region is saturated.
    #[test]
    fn selection_spills_past_saturated_regions_inside_the_plan_only() {
        use crate::geo::{Country, Located};
        use crate::route::{Decision, RegionState, RequestFacts, plan, select};
        let t = crate::test_fixtures::world("[fallback]\nendpoint = \"http://127.0.0.1:9\"");
        let id = |n: &str| t.config.region_index(n).unwrap_or(usize::MAX);
        let headers = http::HeaderMap::new();
        let facts = RequestFacts {
            method: &http::Method::GET,
            path: "/v1/chat/completions",
            headers: &headers,
        };
        // (client, saturated regions, fallback usable, decision)
        let cases: [(&str, &[&str], bool, Decision); 7] = [
            ("US", &["us-east"], false, Decision::Region(id("us-west"))),
            ("US", &["us-east", "us-west"], false, Decision::Region(id("eu-west"))),
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
                true,
                Decision::Fallback,
            ),
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
                false,
                Decision::Region(id("us-east")),
            ),
            ("DE", &["eu-central"], false, Decision::Region(id("eu-west"))),
            (
                "DE",
                &["eu-central", "eu-west"],
                false,
                Decision::Region(id("eu-central")),
            ),
            (
                "DE",
                &["eu-central", "eu-west"],
                true,
                Decision::Region(id("eu-central")),
            ),
        ];
        for (code, saturated, fallback, want) in cases {
            let located = Located::in_country(Country::parse(code).unwrap_or_else(|| panic!("{code}")));
            let p = plan(&t, located, &facts).unwrap_or_else(|e| panic!("{e:?}"));
            let ids: Vec<usize> = saturated.iter().map(|n| id(n)).collect();
            let state = |r: usize| {
                if ids.contains(&r) {
                    RegionState::Saturated
                } else {
                    RegionState::Available
                }
            };
            assert_eq!(
                select(&p, state, fallback, false),
                want,
                "{code} with {saturated:?} saturated"
            );
        }
    }

    #[test]
    fn the_least_pressed_endpoint_decides() {
        assert_eq!(region_pressure([1.2, 0.3, 2.0]), Some(0.3));
        assert_eq!(region_pressure([]), None);
        let t = SpilloverConfig {
            queue_depth: Some(4.0),
            kv_cache: None,
        };
        assert!(endpoint_saturated(load(4.0, 0.0), Some(&t)));
        assert!(!endpoint_saturated(load(3.0, 0.0), Some(&t)));
        assert!(!endpoint_saturated(load(9.0, 0.0), None));
    }
}
