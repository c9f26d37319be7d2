//! Endpoint choice within a region: power of two choices over a load score (docs/routing.md,
//! Selection).

/// What the balancer knows of one endpoint at the moment of a pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointLoad {
    /// May take traffic (healthy, not ejected, not shed, not already tried).
    pub eligible: bool,
    /// Peak-EWMA time to first byte, in seconds.
    pub latency: f64,
    pub(crate) in_flight: u32,
    /// Configured weight times the slow-start ramp, > 0.
    pub(crate) weight: f64,
    /// Waiting requests reported by the model server (0 when unknown).
    pub queue_depth: f64,
    /// KV-cache utilisation in 0..=1 (0 when unknown).
    pub kv_cache: f64,
}

/// Latency assumed for an endpoint that has not answered yet, so new endpoints are tried
/// but not flooded.
pub(crate) const DEFAULT_LATENCY: f64 = 0.05;

/// Cost of one request waiting at the model server, in in-flight requests: a waiting
/// request holds up the next one about as long as one of ours being served.
pub(crate) const QUEUE_WEIGHT: f64 = 1.0;
/// KV-cache utilisation from which the cost rises: below it the cache has room to spare.
pub(crate) const KV_KNEE: f64 = 0.8;
/// Cost added per unit of KV-cache utilisation past the knee: ×2 when the cache is full,
/// where vLLM starts preempting running requests and recomputing them.
pub(crate) const KV_SLOPE: f64 = 5.0;

impl EndpointLoad {
    /// Lower is better: expected wait, scaled by queue and cache pressure, per unit of weight.
    ///
    /// `latency × (in_flight + 1 + QUEUE_WEIGHT × queue_depth) × kv_factor / weight`, where
    /// `latency × (in_flight + 1)` is linkerd's peak-EWMA cost and
    /// `kv_factor = 1 + KV_SLOPE × max(0, kv_cache − KV_KNEE)` (1 up to 80 %, 2 at 100 %).
    /// Unknown signals are 0, which leaves plain peak-EWMA.
    pub(crate) fn score(&self) -> f64 {
        let latency = if self.latency > 0.0 {
            self.latency
        } else {
            DEFAULT_LATENCY
        };
        let kv_factor = 1.0 + (self.kv_cache - KV_KNEE).max(0.0) * KV_SLOPE;
        let work = self.in_flight as f64 + 1.0 + QUEUE_WEIGHT * self.queue_depth.max(0.0);
        latency * work * kv_factor / self.weight.max(1e-3)
    }
}

/// Picks among eligible endpoints: two distinct random draws, the lower score wins.
/// `draw(n)` returns a uniform index below `n`; injected so tests are deterministic.
pub(crate) fn pick(endpoints: &[EndpointLoad], mut draw: impl FnMut(usize) -> usize) -> Option<usize> {
    let eligible = endpoints.iter().filter(|e| e.eligible).count();
    let nth = |n: usize| {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.eligible)
            .nth(n)
            .map(|(i, _)| i)
    };
    match eligible {
        0 => None,
        1 => nth(0),
        n => {
            let a = draw(n);
            let mut b = draw(n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (nth(a)?, nth(b)?);
            if endpoints[b].score() < endpoints[a].score() {
                Some(b)
            } else {
                Some(a)
            }
        }
    }
}

/// FNV-1a: stable across builds and platforms, so every instance maps sessions alike.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The murmur3 finaliser: spreads FNV's weak low bits over the whole word.
pub(crate) fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    fn ep(latency: f64, in_flight: u32) -> EndpointLoad {
        EndpointLoad {
            eligible: true,
            latency,
            in_flight,
            weight: 1.0,
            queue_depth: 0.0,
            kv_cache: 0.0,
        }
    }

    #[test]
    fn pick_table() {
        let ineligible = EndpointLoad {
            eligible: false,
            ..ep(0.001, 0)
        };
        let cases: [(&str, Vec<EndpointLoad>, Option<usize>); 6] = [
            ("none", vec![], None),
            ("all ineligible", vec![ineligible, ineligible], None),
            ("single eligible", vec![ineligible, ep(1.0, 10)], Some(1)),
            ("faster wins", vec![ep(0.2, 0), ep(0.1, 0)], Some(1)),
            ("fewer in flight wins", vec![ep(0.1, 5), ep(0.1, 1)], Some(1)),
            ("ineligible skipped", vec![ep(0.5, 0), ineligible, ep(0.1, 0)], Some(2)),
        ];
        for (name, endpoints, want) in cases {
            // Draw 0 then 0: the two distinct picks are the first two eligible.
            assert_eq!(pick(&endpoints, |_| 0), want, "{name}");
        }
    }

    #[test]
    fn score_weights_table() {
        let base = ep(0.1, 0);
        let with = |queue_depth: f64, kv_cache: f64, in_flight: u32| EndpointLoad {
            queue_depth,
            kv_cache,
            in_flight,
            ..base
        };
        // (name, endpoint, expected score)
        let cases = [
            ("idle: latency alone", with(0.0, 0.0, 0), 0.1),
            ("one in flight doubles it", with(0.0, 0.0, 1), 0.2),
            ("one waiting counts like one in flight", with(1.0, 0.0, 0), 0.2),
            ("queue and in flight add up", with(3.0, 0.0, 2), 0.6),
            ("KV below the knee costs nothing", with(0.0, 0.8, 0), 0.1),
            ("KV at 90 %: ×1.5", with(0.0, 0.9, 0), 0.15),
            ("KV full: ×2", with(0.0, 1.0, 0), 0.2),
            ("queue and full KV multiply", with(1.0, 1.0, 0), 0.4),
        ];
        for (name, e, want) in cases {
            assert!((e.score() - want).abs() < 1e-9, "{name}: {} != {want}", e.score());
        }
        // Picks: the shorter queue wins over a slightly faster endpoint.
        let cases = [
            ("shorter queue wins", with(8.0, 0.0, 0), with(0.0, 0.0, 0), 1),
            (
                "faster but queued loses",
                EndpointLoad {
                    latency: 0.05,
                    ..with(4.0, 0.0, 0)
                },
                with(0.0, 0.0, 1),
                1,
            ),
            ("fuller cache loses on a tie", with(0.0, 0.99, 0), with(0.0, 0.5, 0), 1),
            (
                "a short queue beats a busy one",
                with(1.0, 0.0, 0),
                with(0.0, 0.0, 3),
                0,
            ),
        ];
        for (name, a, b, want) in cases {
            assert_eq!(pick(&[a, b], |_| 0), Some(want), "{name}");
        }
    }

    #[test]
    fn queue_kv_and_weight_shape_the_score() {
        let base = ep(0.1, 0);
        let queued = EndpointLoad {
            queue_depth: 8.0,
            ..base
        };
        let full = EndpointLoad { kv_cache: 0.99, ..base };
        let heavy = EndpointLoad { weight: 3.0, ..base };
        assert!(queued.score() > base.score() * 5.0);
        assert!(full.score() > base.score() * 1.5);
        assert!(heavy.score() < base.score());
        let unknown = EndpointLoad { latency: 0.0, ..base };
        assert!(unknown.score() > 0.0);
    }

    #[test]
    fn random_draws_spread_over_equal_endpoints() -> TestResult {
        let endpoints = vec![ep(0.1, 0); 4];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[pick(&endpoints, |n| rng.usize(..n)).ok_or("nothing picked")?] += 1;
        }
        assert!(counts.iter().all(|&c| c > 700), "{counts:?}");
        Ok(())
    }

    #[test]
    fn slow_start_weight_table() {
        // Equal latency; the first endpoint is at the start of its slow-start ramp.
        let ramping = |in_flight| EndpointLoad {
            weight: crate::health::slow_start::FLOOR,
            ..ep(0.05, in_flight)
        };
        let cases = [
            ("a ramping endpoint loses to an idle one", ramping(0), ep(0.05, 0), 1),
            ("and to a moderately busy one", ramping(0), ep(0.05, 5), 1),
            ("but not to a swamped one", ramping(0), ep(0.05, 12), 0),
            ("full weight again: plain peak-EWMA", ep(0.05, 0), ep(0.05, 1), 0),
        ];
        for (name, a, b, want) in cases {
            assert_eq!(pick(&[a, b], |_| 0), Some(want), "{name}");
        }
    }

    #[test]
    fn a_ramping_endpoint_gets_a_small_share() -> TestResult {
        let mut endpoints = vec![ep(0.05, 0); 4];
        endpoints[0].weight = 0.25;
        let mut rng = fastrand::Rng::with_seed(11);
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[pick(&endpoints, |n| rng.usize(..n)).ok_or("nothing picked")?] += 1;
        }
        assert!(counts[0] < counts[1] / 2, "{counts:?}");
        Ok(())
    }
}
