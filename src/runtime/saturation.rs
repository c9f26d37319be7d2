//! Publishing region saturation: on every health tick the endpoints' load signals go through
//! the spillover hysteresis (`route::spillover`); a change is logged and gauged once.

use super::{Shared, Snapshot};
use crate::route::spillover;

impl Shared {
    /// Recomputes every region's saturated state from its serving endpoints' latest readings.
    pub(crate) fn update_saturation(&self, rt: &Snapshot) {
        for r in &rt.regions {
            let pressure = rt.config.spillover.as_ref().and_then(|t| {
                spillover::region_pressure(
                    r.endpoints
                        .iter()
                        .filter(|e| e.health.is_available())
                        .map(|e| spillover::pressure(e.health.signals.current(), t)),
                )
            });
            let was = r.health.is_saturated();
            if let Some(now) = spillover::next(was, pressure) {
                r.health.set_saturated(now);
                if now {
                    tracing::warn!(region = %r.name, pressure = pressure.unwrap_or(0.0), "region saturated: new requests spill to the next region");
                } else {
                    tracing::info!(region = %r.name, pressure = pressure.unwrap_or(0.0), "region drained below the spillover release level: taking its clients back");
                }
            }
            self.metrics
                .region_saturated
                .with_label_values(&[&r.name])
                .set(i64::from(r.health.is_saturated()));
        }
    }
}
