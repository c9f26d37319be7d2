//! Peak-EWMA latency (linkerd/finagle): jumps up to a slower sample at once, decays towards
//! faster ones with a time constant, so a stalling endpoint is avoided immediately and
//! forgiven gradually.

use std::time::{Duration, Instant};

/// Time constant of the decay towards faster samples.
pub(crate) const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct PeakEwma {
    /// Seconds; 0 until the first sample.
    pub value: f64,
    at: Option<Instant>,
}

impl PeakEwma {
    /// Folds in one latency sample (a request's time to first byte, or a probe's latency).
    pub(crate) fn observe(&mut self, sample: Duration, now: Instant) {
        let x = sample.as_secs_f64();
        self.value = match self.at {
            None => x,
            Some(_) if x > self.value => x,
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let w = (-elapsed / DECAY.as_secs_f64()).exp();
                self.value * w + x * (1.0 - w)
            }
        };
        self.at = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_at_once_and_decays_with_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut e = PeakEwma::default();
        let cases = [
            (0, 100, 0.100),      // first sample taken as is
            (0, 500, 0.500),      // slower: jump
            (1, 100, 0.500),      // faster right after: barely moves
            (20_000, 100, 0.154), // faster after two time constants: mostly forgotten
        ];
        for (at, sample, want) in cases {
            e.observe(ms(sample), t0 + ms(at));
            assert!((e.value - want).abs() < 0.01, "at {at}: {} != {want}", e.value);
        }
    }
}
