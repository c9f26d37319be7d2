//! What Meridian tells operators: Prometheus metrics and the access log.

pub(crate) mod access_log;
pub mod cert_expiry;
pub(crate) mod fields;
pub mod metrics;
pub(crate) mod trace;

/// Seconds since the Unix epoch, for timestamps operators read (metrics, `/status`).
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
