//! `[upstream]`: how many connections Meridian keeps and opens per endpoint.
//!
//! `keepalive` caps idle pooled connections per endpoint (NGINX's `keepalive N`);
//! `max_connections_per_endpoint` with `max_queue` and `queue_timeout` caps concurrent
//! requests per endpoint with a bounded wait (HAProxy's `maxconn`, `maxqueue`, `timeout queue`).

use std::time::Duration;

use serde::Deserialize;

use super::units;

/// `[upstream]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpstreamFile {
    pub keepalive: Option<usize>,
    pub max_connections_per_endpoint: Option<usize>,
    pub(crate) max_queue: Option<usize>,
    pub(crate) queue_timeout: Option<units::Duration>,
}

/// Idle connections kept per endpoint unless configured: enough for steady reuse under
/// ordinary concurrency, few enough that a burst does not leave thousands behind.
pub(crate) const DEFAULT_KEEPALIVE: usize = 32;
const DEFAULT_MAX_QUEUE: usize = 1024;
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(2);

/// Validated `[upstream]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Idle connections kept per endpoint (per protocol); more are closed when they go idle.
    pub keepalive: usize,
    /// `None`: no cap on concurrent requests per endpoint.
    pub limit: Option<EndpointLimitConfig>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            keepalive: DEFAULT_KEEPALIVE,
            limit: None,
        }
    }
}

/// The per-endpoint concurrency cap and its wait queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointLimitConfig {
    /// Concurrent requests (and so HTTP/1.1 connections) per endpoint.
    pub max_connections: usize,
    /// Requests that may wait for a slot; past it an attempt fails at once.
    pub(crate) max_queue: usize,
    /// Longest wait for a slot.
    pub(crate) queue_timeout: Duration,
}

/// Validates `[upstream]`; problems are (key path, message).
pub(crate) fn validate(file: UpstreamFile) -> (UpstreamConfig, Vec<(&'static str, &'static str)>) {
    let mut problems = Vec::new();
    let queue_timeout = file.queue_timeout.map_or(DEFAULT_QUEUE_TIMEOUT, |d| d.0);
    if queue_timeout.is_zero() {
        problems.push(("upstream.queue_timeout", "must be greater than zero"));
    }
    let limit = match file.max_connections_per_endpoint {
        Some(0) => {
            problems.push(("upstream.max_connections_per_endpoint", "must be greater than zero"));
            None
        }
        Some(max_connections) => Some(EndpointLimitConfig {
            max_connections,
            max_queue: file.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
            queue_timeout,
        }),
        None => {
            if file.max_queue.is_some() || file.queue_timeout.is_some() {
                problems.push((
                    "upstream.max_queue",
                    "max_queue and queue_timeout need max_connections_per_endpoint",
                ));
            }
            None
        }
    };
    let config = UpstreamConfig {
        keepalive: file.keepalive.unwrap_or(DEFAULT_KEEPALIVE),
        limit,
    };
    (config, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (UpstreamConfig, Vec<(&'static str, &'static str)>) {
        validate(toml::from_str(text).unwrap_or_else(|e| panic!("{e}")))
    }

    #[test]
    fn keys_and_defaults() {
        let limited = |max, queue, secs| {
            Some(EndpointLimitConfig {
                max_connections: max,
                max_queue: queue,
                queue_timeout: Duration::from_secs(secs),
            })
        };
        let cases: &[(&str, usize, Option<EndpointLimitConfig>, &[&str])] = &[
            ("", DEFAULT_KEEPALIVE, None, &[]),
            ("keepalive = 0", 0, None, &[]),
            ("keepalive = 256", 256, None, &[]),
            (
                "max_connections_per_endpoint = 8",
                DEFAULT_KEEPALIVE,
                limited(8, 1024, 2),
                &[],
            ),
            (
                "max_connections_per_endpoint = 8\nmax_queue = 0\nqueue_timeout = \"5s\"",
                DEFAULT_KEEPALIVE,
                limited(8, 0, 5),
                &[],
            ),
            (
                "max_connections_per_endpoint = 0",
                DEFAULT_KEEPALIVE,
                None,
                &["upstream.max_connections_per_endpoint"],
            ),
            (
                "max_connections_per_endpoint = 1\nqueue_timeout = \"0s\"",
                DEFAULT_KEEPALIVE,
                limited(1, 1024, 0),
                &["upstream.queue_timeout"],
            ),
            ("max_queue = 4", DEFAULT_KEEPALIVE, None, &["upstream.max_queue"]),
        ];
        for (text, keepalive, limit, keys) in cases {
            let (config, problems) = parse(text);
            assert_eq!(config.keepalive, *keepalive, "{text}");
            assert_eq!(config.limit, *limit, "{text}");
            let got: Vec<&str> = problems.iter().map(|p| p.0).collect();
            assert_eq!(got, *keys, "{text}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<UpstreamFile>("keep_alive = 3").is_err());
    }
}
