//! Forwarding one attempt to an endpoint: header rewriting (`rewrite`), bodies in flight
//! (`body`), pooled connections (`client`), upgraded connections (`upgrade`) and the
//! fallback's circuit breaker (`breaker`), and what a model answer reports about itself
//! (`usage`).

pub mod body;
pub mod breaker;
pub mod client;
pub mod endpoint_get;
pub mod inbound;
pub mod limit;
pub mod rewrite;
pub mod upgrade;
pub mod usage;
