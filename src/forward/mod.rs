//! Forwarding one attempt to an endpoint: header rewriting (`rewrite`), bodies in flight
//! (`body`), pooled connections (`client`, HTTP/1.1 in `pool` and `h1`, HTTP/2 in `h2`), upgraded connections (`upgrade`) and the
//! fallback's circuit breaker (`breaker`), and what a model answer reports about itself
//! (`usage`).

pub mod body;
pub(crate) mod breaker;
pub(crate) mod client;
pub mod client_body;
pub(crate) mod endpoint_fields;
pub(crate) mod endpoint_get;
pub mod h1;
pub(crate) mod h2;
pub(crate) mod head_fields;
pub(crate) mod inbound;
pub(crate) mod limit;
pub(crate) mod pool;
pub mod request_fields;
pub mod rewrite;
pub(crate) mod upgrade;
pub(crate) mod usage;
