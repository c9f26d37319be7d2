//! The routing decision: which regions may serve a client, in which order.
//!
//! `table` compiles the config into per-country candidate orders once per config load;
//! `decide` is the pure per-request decision over that table and a view of region state;
//! `residency` audits the compiled table so no path takes a zone's client outside its zone;
//! `spillover` says when a region's load makes it count as saturated; `models` filters the
//! candidates to the regions serving the requested model.

pub mod attempt;
mod decide;
pub mod models;
pub mod residency;
pub(crate) mod spillover;
mod table;

pub use decide::{
    Decision, FieldLookup, NoRegion, Refusal, RegionState, RequestFacts, RoutePlan, path_matches, plan, plan_in, select,
};
pub use table::{Candidate, CountryPlan, InlineCandidates, RegionId, RouteTable, ZoneId, order_candidates};
