//! Configuration: the TOML file (`file`), human units (`units`) and the validated, typed
//! form the rest of Meridian reads (`validate`).

pub(crate) mod file;
mod limits;
mod locate;
pub(crate) mod units;
pub(crate) mod upstream;
mod validate;

#[cfg(test)]
mod problem_tests;

pub use file::{BackendErrorPolicy, LoadSource, LogFormat, UnknownPolicy, UpstreamProtocol};
pub use limits::{LimitKey, LimitRule, LimitsBackend, LimitsConfig, RateLimit};
pub use upstream::{EndpointLimitConfig, UpstreamConfig};
pub use validate::*;
