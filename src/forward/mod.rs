//! Forwarding one attempt to an endpoint: header rewriting (`rewrite`), bodies in flight
//! (`body`), pooled connections (`client`), upgraded connections (`upgrade`) and the
//! fallback's circuit breaker (`breaker`).

pub mod body;
pub mod breaker;
pub mod client;
pub mod inbound;
pub mod limit;
pub mod rewrite;
pub mod upgrade;
