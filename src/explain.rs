//! Human and JSON explanations for `meridian check` (the region table) and `meridian route`
//! (one decision per IP), computed with the same code the proxy runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use http::{HeaderMap, Method};
use serde::Serialize;

use crate::geo::{GeoDb, GeoPoint, Locate, Located};
use crate::route::{self, Decision, Refusal, RegionState, RequestFacts, RouteTable};

#[derive(Debug, Serialize)]
pub struct CandidateView {
    pub region: String,
    pub distance_km: f64,
    pub home: bool,
    pub priority: u32,
}

/// The routing decision for one address, as `meridian route --json` prints it.
#[derive(Debug, Serialize)]
pub struct RouteExplanation {
    pub ip: String,
    pub country: Option<String>,
    pub location: Option<GeoPoint>,
    /// Where the location came from: "database", "country_table" or "default_region".
    pub location_source: &'static str,
    pub zone: Option<String>,
    pub candidates: Vec<CandidateView>,
    pub chosen: Option<String>,
    pub pattern: Vec<String>,
    pub refusal: Option<String>,
}

pub fn explain_ip(table: &RouteTable, geo: &GeoDb, ip: IpAddr, path: &str) -> RouteExplanation {
    let config = &table.config;
    let located = geo.locate(ip);
    let (country, location_source) = match located {
        Located::Country {
            country,
            point: Some(_),
        } => (Some(country), "database"),
        Located::Country { country, point: None } if country.info().is_some() => (Some(country), "country_table"),
        _ => (located.country(), "default_region"),
    };
    let headers = HeaderMap::new();
    let facts = RequestFacts {
        method: &Method::POST,
        path,
        headers: &headers,
    };
    let mut out = RouteExplanation {
        ip: ip.to_string(),
        country: country.map(|c| c.to_string()),
        location: None,
        location_source,
        zone: None,
        candidates: Vec::new(),
        chosen: None,
        pattern: Vec::new(),
        refusal: None,
    };
    let plan = match route::plan(table, located, &facts) {
        Ok(p) => p,
        Err(Refusal::LocationRefused) => {
            out.refusal =
                Some("403 location_refused: the address cannot be located and geoip.unknown = \"refuse\"".into());
            return out;
        }
        Err(Refusal::ResidencyForbidden { zone, rule }) => {
            out.zone = Some(table.zone_name(zone).to_string());
            out.refusal = Some(format!(
                "403 residency_forbidden: route[{rule}] ({}) lists no region of zone {}",
                config.routes[rule].path_prefix,
                table.zone_name(zone)
            ));
            return out;
        }
    };
    out.location = Some(plan.origin);
    out.zone = plan.zone.map(|z| table.zone_name(z).to_string());
    out.candidates = plan
        .candidates
        .iter()
        .map(|c| CandidateView {
            region: table.region_name(c.region).to_string(),
            distance_km: (plan.origin.distance_km(&config.regions[c.region].location) * 10.0).round() / 10.0,
            home: c.home,
            priority: config.regions[c.region].priority,
        })
        .collect();
    if let Some(rule) = plan.rule {
        out.pattern.push(format!(
            "route[{rule}] path_prefix {} (hub-and-spoke)",
            config.routes[rule].path_prefix
        ));
    }
    if plan.sharded {
        out.pattern.push("sharded: failover = false, home region only".into());
    }
    if out.candidates.iter().any(|c| c.priority > 0) {
        out.pattern.push("active-passive: standbys after every primary".into());
    }
    if plan.fallback {
        out.pattern.push("fallback eligible".into());
    }
    out.chosen = match route::select(&plan, |_| RegionState::Available, plan.fallback, false) {
        Decision::Region(r) => Some(table.region_name(r).to_string()),
        Decision::Fallback => Some("fallback".into()),
        Decision::Refuse(_) => None,
    };
    out
}

/// Text for `meridian route` without `--json`.
pub fn render_route(e: &RouteExplanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", e.ip);
    let _ = writeln!(s, "  country:    {}", e.country.as_deref().unwrap_or("unknown"));
    match e.location {
        Some(p) => {
            let _ = writeln!(
                s,
                "  location:   {:.2}, {:.2} ({})",
                p.lat,
                p.lon,
                e.location_source.replace('_', " ")
            );
        }
        None => {
            let _ = writeln!(s, "  location:   none");
        }
    }
    let _ = writeln!(s, "  zone:       {}", e.zone.as_deref().unwrap_or("none"));
    for p in &e.pattern {
        let _ = writeln!(s, "  pattern:    {p}");
    }
    if !e.candidates.is_empty() {
        let _ = writeln!(s, "  candidates:");
        for (i, c) in e.candidates.iter().enumerate() {
            let mut notes = Vec::new();
            if c.home {
                notes.push("home".to_string());
            }
            if c.priority > 0 {
                notes.push(format!("standby, priority {}", c.priority));
            }
            let notes = if notes.is_empty() {
                String::new()
            } else {
                format!("  ({})", notes.join(", "))
            };
            let _ = writeln!(s, "    {}. {:<16} {:>8.0} km{}", i + 1, c.region, c.distance_km, notes);
        }
    }
    if let Some(r) = &e.refusal {
        let _ = writeln!(s, "  refused:    {r}");
    }
    let _ = writeln!(s, "  chosen:     {}", e.chosen.as_deref().unwrap_or("none (503)"));
    s
}

/// The region table for `meridian check`.
pub fn render_table(table: &RouteTable) -> String {
    let config = &table.config;
    let mut s = String::new();
    let _ = writeln!(s, "regions:");
    for r in &config.regions {
        let mut flags = Vec::new();
        if r.priority > 0 {
            flags.push(format!("standby priority {}", r.priority));
        }
        if !r.failover {
            flags.push("failover = false".into());
        }
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" [{}]", flags.join(", "))
        };
        let _ = writeln!(
            s,
            "  {} at {:.2}, {:.2}{}",
            r.name, r.location.lat, r.location.lon, flags
        );
        let countries: Vec<String> = r.countries.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            s,
            "    home countries: {}",
            if countries.is_empty() {
                "-".into()
            } else {
                countries.join(", ")
            }
        );
        for e in &r.endpoints {
            let _ = writeln!(s, "    endpoint {} (weight {})", e.url, e.weight);
        }
    }
    if !config.zones.is_empty() {
        let _ = writeln!(s, "residency zones:");
        for z in &config.zones {
            let countries: Vec<String> = z.countries.iter().map(|c| c.to_string()).collect();
            let regions: Vec<&str> = z.regions.iter().map(|&r| table.region_name(r)).collect();
            let _ = writeln!(
                s,
                "  {}: {} -> only {}{}",
                z.name,
                countries.join(", "),
                regions.join(", "),
                if z.failover { "" } else { " (failover = false)" }
            );
        }
    }
    if !config.routes.is_empty() {
        let _ = writeln!(s, "route rules:");
        for (i, r) in config.routes.iter().enumerate() {
            let regions: Vec<&str> = r.regions.iter().map(|&x| table.region_name(x)).collect();
            let prefix = if r.path_prefix.is_empty() {
                "/"
            } else {
                r.path_prefix.as_str()
            };
            let _ = writeln!(
                s,
                "  route[{i}] {} -> {}{}",
                prefix,
                regions.join(", "),
                if r.residency_exempt { " (residency exempt)" } else { "" }
            );
        }
    }
    if let Some(f) = &config.fallback {
        let zone = f
            .zone
            .map(|z| format!(", also serves zone {}", table.zone_name(z)))
            .unwrap_or_default();
        let names: Vec<&str> = f.headers.iter().map(|(n, _)| n.as_str()).collect();
        let _ = writeln!(
            s,
            "fallback: {} (injects {}){}",
            f.endpoint.url,
            if names.is_empty() {
                "nothing".into()
            } else {
                names.join(", ")
            },
            zone
        );
    }
    let _ = writeln!(s, "failover order (home clients of each region, then by zone):");
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &config.regions {
        for c in &r.countries {
            if let Some(plan) = table.country_plan(*c) {
                groups
                    .entry(order_text(table, &plan.candidates, plan.fallback))
                    .or_default()
                    .push(c.to_string());
            }
        }
    }
    for z in &config.zones {
        for c in &z.countries {
            if let Some(plan) = table.country_plan(*c) {
                let entry = groups
                    .entry(order_text(table, &plan.candidates, plan.fallback))
                    .or_default();
                if !entry.contains(&c.to_string()) {
                    entry.push(c.to_string());
                }
            }
        }
    }
    for (order, countries) in &groups {
        let _ = writeln!(s, "  {:<12} {}", countries.join(","), order);
    }
    let unlocated = table.unlocated_plan();
    let _ = writeln!(
        s,
        "  {:<12} {}",
        "unlocated",
        order_text(table, &unlocated.candidates, unlocated.fallback)
    );
    s
}

fn order_text(table: &RouteTable, candidates: &[route::Candidate], fallback: bool) -> String {
    let mut names: Vec<&str> = candidates.iter().map(|c| table.region_name(c.region)).collect();
    if fallback {
        names.push("fallback");
    }
    names.push("503");
    names.join(" > ")
}
