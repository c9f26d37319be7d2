//! Forwarding one attempt to an endpoint: header rewriting (`rewrite`), bodies in flight
//! (`body`) and pooled connections (`client`).

pub mod body;
pub mod client;
pub mod rewrite;
