//! Meridian: a geo-routing edge proxy for AI inference served from several regions.
//!
//! A request flows through the modules in this order:
//!
//! 1. [`listen`] accepts the connection (limits, idle timeout, PROXY protocol, TLS with SNI,
//!    HTTP/1.1 + HTTP/2 via h2c or ALPN);
//! 2. [`proxy`] handles the request, one phase per step:
//!    [`client_ip`] (trusted `X-Forwarded-For`) → [`geo`] (country, coordinates) →
//!    [`route`] (residency, route rules, candidate order; `route::attempt` plans each attempt
//!    over a [`live_view`] of health) →
//!    [`admission`] (`[[limit]]` rules: rate, concurrency, tokens; 429 when limited) →
//!    `balance` (endpoint pick; [`affinity`] for sessions) →
//!    [`forward`] (rewrite, send, stream back, bridge upgrades) →
//!    [`health`] (observe the outcome) and [`observe`] (metrics, access log);
//! 3. `error` turns anything Meridian answers itself into a status and a JSON body.
//!
//! [`config`] validates the TOML region map; [`runtime`] compiles it into the snapshot
//! requests read; `probe` checks every endpoint beside the traffic (health probes, load
//! scrapes, model discovery); `reload` swaps in a new snapshot on SIGHUP or a file change;
//! [`app`] wires it all; [`admin`] serves status, metrics and drills;
//! [`explain`] powers `meridian check` and `meridian route`; [`demo`] is the zero-setup tour.
//! `path` (path normalisation) and `json_scan` (a borrowed JSON walk) are leaves that
//! config, routing and forwarding share.
//!
//! Modules depend on each other in one direction only (`tests/architecture.rs` checks it):
//! leaves (`clock`, `geo`, `path`, `json_scan`, `balance`) → `config` → `health` → `route` →
//! `forward` → `observe` → `admission` → `runtime` → `probe`, `proxy` → `listen` → `app`.

// No panics outside tests: a provably safe site carries a scoped allow and a `why:`.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]
// Items are `pub(crate)` unless a test, bench or the binary needs them.
#![warn(unreachable_pub)]
#![warn(missing_docs)]

pub mod admin;
pub mod admission;
pub mod affinity;
pub mod app;
mod balance;
pub mod client_ip;
pub mod clock;
pub mod config;
pub mod demo;
mod error;
pub mod explain;
pub mod forward;
pub mod geo;
pub mod health;
pub mod healthcheck;
mod json_scan;
pub mod listen;
pub mod live_view;
pub mod observe;
mod path;
mod probe;
pub mod proxy;
mod reload;
pub mod retry;
pub mod route;
pub mod runtime;
#[cfg(test)]
mod test_fixtures;
