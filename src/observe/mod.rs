//! What Meridian tells operators: Prometheus metrics and the access log.

pub mod access_log;
pub mod cert_expiry;
pub mod fields;
pub mod metrics;
pub mod trace;
