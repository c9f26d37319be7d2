//! Slow start: a recovered endpoint or region gets its share of traffic back along a linear
//! ramp over `health.slow_start`, so a region that comes back is not stampeded.

use std::time::Duration;

/// Share at the start of the ramp: enough to prove the endpoint with real traffic.
pub(crate) const FLOOR: f64 = 0.1;

/// Weight factor in `FLOOR..=1` after `elapsed` of a ramp lasting `window`.
pub(crate) fn ramp(elapsed: Duration, window: Duration) -> f64 {
    if window.is_zero() || elapsed >= window {
        return 1.0;
    }
    FLOOR + (1.0 - FLOOR) * (elapsed.as_secs_f64() / window.as_secs_f64())
}

/// Whether one request goes to a region at `ramp`: `draw` is uniform in `0..1`. A region
/// at full weight admits without a draw.
pub(crate) fn admit(ramp: f64, draw: impl FnOnce() -> f64) -> bool {
    ramp >= 1.0 || draw() < ramp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_table() {
        let s = Duration::from_secs;
        let cases = [
            (s(0), s(10), FLOOR),
            (s(5), s(10), 0.55),
            (s(10), s(10), 1.0),
            (s(60), s(10), 1.0),
            (s(0), s(0), 1.0),
        ];
        for (elapsed, window, want) in cases {
            assert!((ramp(elapsed, window) - want).abs() < 1e-9, "{elapsed:?}/{window:?}");
        }
    }

    #[test]
    fn admitted_share_follows_the_ramp() {
        let mut rng = fastrand::Rng::with_seed(3);
        let admitted = (0..10_000).filter(|_| admit(0.25, || rng.f64())).count();
        assert!((2_200..2_800).contains(&admitted), "{admitted}");
        assert!(admit(1.0, || 0.999_999));
        assert!(!admit(FLOOR, || 0.5));
    }
}
