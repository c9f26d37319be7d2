//! Human and JSON explanations for `meridian check` (the region table) and `meridian route`
//! (one decision per IP), computed with the same code the proxy runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::Serialize;

use crate::config::{Config, UnknownPolicy};
use crate::geo::{GeoDb, GeoPoint, Locate, Located};
use crate::route::{self, Decision, Refusal, RegionState, RequestFacts, RoutePlan, RouteTable};

/// One candidate region of a routing decision, as `meridian route` shows it.
#[derive(Debug, Serialize)]
pub struct CandidateView {
    /// The region's name.
    pub region: String,
    pub(crate) distance_km: f64,
    pub(crate) home: bool,
    pub(crate) priority: u32,
}

/// The routing decision for one address, as `meridian route --json` prints it.
#[derive(Debug, Serialize)]
pub struct RouteExplanation {
    pub(crate) ip: String,
    /// The client's ISO country code; `None` when unlocated.
    pub country: Option<String>,
    pub(crate) location: Option<GeoPoint>,
    /// Where the location came from: "database", "country_table" or "default_region".
    pub location_source: &'static str,
    /// The GeoIP database that located the address (`embedded` or the file's path); `None`
    /// when none knew it.
    pub database: Option<String>,
    /// The ISO 3166-2 subdivision the database gives, where it gives a code.
    pub subdivision: Option<String>,
    /// The client's residency zone, by name.
    pub zone: Option<String>,
    /// Candidate regions in the order they would be tried.
    pub candidates: Vec<CandidateView>,
    pub(crate) chosen: Option<String>,
    /// Priority level of the chosen region: 0 for a primary, more for a standby.
    pub priority_level: Option<u32>,
    /// `failover = false` on the client's zone or home region: home region only.
    pub sharded: bool,
    /// The `[[route]]` rule that matched the request, if any.
    pub rule: Option<RuleView>,
    /// Whether the `[fallback]` may serve this client.
    pub fallback: FallbackView,
    pub(crate) pattern: Vec<String>,
    pub(crate) refusal: Option<String>,
    /// The model asked for (`--model`), and which candidates were left out for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) without_model: Vec<String>,
}

/// The `[[route]]` rule that matched, as `meridian route` shows it.
#[derive(Debug, Serialize)]
pub struct RuleView {
    pub(crate) index: usize,
    pub(crate) path_prefix: String,
    /// The rule's regions, by name, in the order tried.
    pub regions: Vec<String>,
    /// The rule's `residency_exempt`: zone clients may leave their zone for this path.
    pub residency_exempt: bool,
}

/// Whether the `[fallback]` endpoint may serve this client, and why not.
#[derive(Debug, Serialize)]
pub struct FallbackView {
    pub(crate) configured: bool,
    pub(crate) eligible: bool,
    /// Why the fallback may or may not serve, in words.
    pub reason: &'static str,
}

/// The model table for `meridian check`: each region and the models it serves.
pub fn render_models(config: &Config) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "models:");
    for r in &config.regions {
        let listed = r.models.as_ref().map(|m| m.join(", "));
        let line = match (listed, r.discover_models) {
            (None, false) => "every model".to_string(),
            (Some(l), false) => l,
            (None, true) => "discovered from GET /v1/models (every model until the first answer)".to_string(),
            (Some(l), true) => format!("{l}, and what GET /v1/models lists"),
        };
        let _ = writeln!(s, "  {:<16} {line}", r.name);
    }
    s
}

/// The decision for a request from `ip` with this method, path and headers, naming `model` (regions that discover models are taken
/// to serve every model: discovery happens at run time).
pub fn explain_model(
    table: &RouteTable,
    geo: &GeoDb,
    ip: IpAddr,
    facts: &RequestFacts<'_>,
    model: Option<&str>,
) -> RouteExplanation {
    let config = &table.config;
    let located = geo.locate(ip);
    let (country, location_source) = match located {
        Located::Country {
            country,
            point: Some(_),
            ..
        } => (Some(country), "database"),
        Located::Country {
            country, point: None, ..
        } if country.info().is_some() => (Some(country), "country_table"),
        _ => (located.country(), "default_region"),
    };
    let subdivision = match located {
        Located::Country {
            subdivision: Some(s), ..
        } => Some(s.to_string()),
        _ => None,
    };
    let mut out = RouteExplanation {
        ip: ip.to_string(),
        country: country.map(|c| c.to_string()),
        location: None,
        location_source,
        database: located
            .source()
            .and_then(|id| geo.database(id))
            .map(|d| d.label().to_string()),
        subdivision,
        zone: None,
        candidates: Vec::new(),
        chosen: None,
        priority_level: None,
        sharded: false,
        rule: None,
        fallback: FallbackView {
            configured: config.fallback.is_some(),
            eligible: false,
            reason: if config.fallback.is_some() {
                "refused before any region"
            } else {
                "no [fallback] configured"
            },
        },
        pattern: Vec::new(),
        refusal: None,
        model: model.map(str::to_string),
        without_model: Vec::new(),
    };
    let mut plan = match route::plan(table, located, facts) {
        Ok(p) => p,
        Err(Refusal::LocationRefused) => {
            out.refusal =
                Some("403 location_refused: the address cannot be located and geoip.unknown = \"refuse\"".into());
            return out;
        }
        Err(Refusal::ResidencyForbidden { zone, rule }) => {
            out.zone = Some(table.zone_name(zone).to_string());
            out.refusal = Some(format!(
                "403 residency_forbidden: {} lists no region of zone {} and is not residency_exempt",
                route::residency::rule_label(config, rule),
                table.zone_name(zone)
            ));
            return out;
        }
    };
    out.location = Some(plan.origin);
    out.zone = plan.zone.map(|z| table.zone_name(z).to_string());
    if let Some(model) = model {
        let serves = |r: usize| {
            let c = &config.regions[r];
            route::models::region_serves(c.models.as_deref(), c.discover_models, None, model)
        };
        out.without_model = plan
            .candidates
            .iter()
            .filter(|c| !serves(c.region))
            .map(|c| table.region_name(c.region).to_string())
            .collect();
        let fallback = plan.fallback && config.fallback.is_some();
        if let Err(refusal) = route::models::filter_plan(&mut plan, serves, config.regions.len(), fallback) {
            out.refusal = Some(match refusal {
                route::models::ModelRefusal::NotInZone { zone } => format!(
                    "404 model_not_available_in_zone: no region of zone {} serves {model:?}",
                    table.zone_name(zone)
                ),
                route::models::ModelRefusal::NotFound => {
                    format!("404 model_not_found: no candidate region serves {model:?}")
                }
            });
            return out;
        }
    }
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
    out.sharded = plan.sharded;
    out.rule = plan
        .rule
        .and_then(|i| config.routes.get(i).map(|r| (i, r)))
        .map(|(i, r)| RuleView {
            index: i,
            path_prefix: shown_prefix(&r.path_prefix).to_string(),
            regions: r.regions.iter().map(|&x| table.region_name(x).to_string()).collect(),
            residency_exempt: r.residency_exempt,
        });
    out.fallback.eligible = plan.fallback;
    out.fallback.reason = fallback_reason(config, &plan);
    out.pattern = pattern_lines(table, &plan);
    out.chosen = match route::select(&plan, |_| RegionState::Available, plan.fallback, false) {
        Decision::Region(r) => {
            out.priority_level = Some(config.regions[r].priority);
            Some(table.region_name(r).to_string())
        }
        Decision::Fallback => Some("fallback".into()),
        Decision::Refuse(_) => None,
    };
    out
}

fn shown_prefix(prefix: &str) -> &str {
    if prefix.is_empty() { "/" } else { prefix }
}

/// Why the fallback may or may not serve the client of `plan` (mirrors `order_candidates`).
fn fallback_reason(config: &Config, plan: &RoutePlan<'_>) -> &'static str {
    let Some(f) = &config.fallback else {
        return "no [fallback] configured";
    };
    if plan.rule.is_some() {
        return "not for route rules: their regions, then 503";
    }
    if plan.sharded {
        return "sharded: failover = false, 503 instead";
    }
    match plan.zone {
        None => "last candidate: the client has no residency zone",
        Some(z) if f.zone == Some(z) => "last candidate: fallback.zone is the client's zone",
        Some(_) => "residency-bound client: fallback.zone is not its zone",
    }
}

/// One line per deployment pattern in effect for the client of `plan`.
fn pattern_lines(table: &RouteTable, plan: &RoutePlan<'_>) -> Vec<String> {
    let config = &table.config;
    let mut out = Vec::new();
    if let Some(rule) = plan.rule.and_then(|i| config.routes.get(i).map(|r| (i, r))) {
        let (i, r) = rule;
        out.push(format!(
            "hub-and-spoke: route[{i}] {} sends this path to {} in that order{}",
            shown_prefix(&r.path_prefix),
            r.regions
                .iter()
                .map(|&x| table.region_name(x))
                .collect::<Vec<_>>()
                .join(", "),
            if r.residency_exempt {
                " (residency exempt)"
            } else if plan.zone.is_some() {
                " (only the regions of the client's zone)"
            } else {
                ""
            }
        ));
    }
    if plan.sharded {
        let by = match plan.zone {
            Some(z) if !config.zones[z].failover => format!("zone {}", table.zone_name(z)),
            _ => format!("region {}", plan.home.map_or("?", |h| table.region_name(h))),
        };
        out.push(format!(
            "sharded: failover = false on {by}; served by {} only, else 503",
            plan.candidates
                .first()
                .map_or("no region", |c| table.region_name(c.region))
        ));
    }
    let levels: std::collections::BTreeSet<u32> = plan
        .candidates
        .iter()
        .map(|c| config.regions[c.region].priority)
        .collect();
    if levels.len() > 1 || levels.iter().any(|&p| p > 0) {
        let primaries: Vec<&str> = plan
            .candidates
            .iter()
            .filter(|c| Some(&config.regions[c.region].priority) == levels.iter().next())
            .map(|c| table.region_name(c.region))
            .collect();
        out.push(format!(
            "active-passive: priority {} ({}) serves; standbys only when none of it is available",
            levels.iter().next().copied().unwrap_or(0),
            primaries.join(", ")
        ));
    } else if plan.rule.is_none() && !plan.sharded && plan.candidates.len() > 1 {
        out.push("active-active: nearest available region".into());
    }
    if let (Some(z), false) = (plan.zone, plan.sharded) {
        let zone = &config.zones[z];
        let exempt = plan.rule.is_some_and(|i| config.routes[i].residency_exempt);
        out.push(if exempt {
            format!("residency: zone {} is exempted by the matching route rule", zone.name)
        } else {
            format!(
                "residency: zone {}: only {}; never another region",
                zone.name,
                zone.regions
                    .iter()
                    .map(|&r| table.region_name(r))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    }
    if plan.fallback {
        out.push("fallback: last candidate when no region can serve".into());
    }
    out
}

/// The GeoIP chain for `/status`: each database in lookup order, with how many addresses
/// it has located.
pub(crate) fn geoip_status(geo: &GeoDb) -> serde_json::Value {
    geo.databases()
        .iter()
        .map(|d| {
            serde_json::json!({
                "database": d.label(),
                "type": d.database_type(),
                "ip_version": d.ip_version(),
                "build_epoch": d.build_epoch(),
                "located": d.located(),
            })
        })
        .collect()
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
    if let Some(sub) = &e.subdivision {
        let _ = writeln!(s, "  subdivision: {sub}");
    }
    let _ = writeln!(s, "  database:   {}", e.database.as_deref().unwrap_or("none knows it"));
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
    if e.fallback.configured {
        let _ = writeln!(
            s,
            "  fallback:   {} ({})",
            if e.fallback.eligible {
                "eligible"
            } else {
                "not eligible"
            },
            e.fallback.reason
        );
    }
    if let Some(m) = &e.model {
        let _ = writeln!(s, "  model:      {m}");
        if !e.without_model.is_empty() {
            let _ = writeln!(s, "  left out:   {} (do not serve {m})", e.without_model.join(", "));
        }
    }
    if let Some(r) = &e.refusal {
        let _ = writeln!(s, "  refused:    {r}");
    }
    let none = if e.refusal.is_some() { "none" } else { "none (503)" };
    let _ = writeln!(s, "  chosen:     {}", e.chosen.as_deref().unwrap_or(none));
    s
}

/// The deployment patterns a config selects, for `meridian check` and `/status`.
#[derive(Debug, Serialize)]
pub(crate) struct PatternSummary {
    /// "active-active", "active-passive", "sharded", "hub-and-spoke", "fallback".
    pub patterns: Vec<&'static str>,
    /// Regions by priority level, lowest (primary) first.
    pub(crate) priority_levels: Vec<PriorityLevel>,
    /// Regions and zones with `failover = false`.
    pub(crate) sharded_regions: Vec<String>,
    pub(crate) sharded_zones: Vec<String>,
    pub routes: Vec<RuleView>,
    /// Residency exemptions granted by `residency_exempt` rules, and notes from the audit.
    pub(crate) residency_exemptions: Vec<String>,
    pub(crate) residency_notes: Vec<String>,
    /// What each group of clients gets: candidates in order, then fallback and 503.
    pub failover_orders: Vec<OrderGroup>,
}

#[derive(Debug, Serialize)]
pub(crate) struct PriorityLevel {
    pub priority: u32,
    pub regions: Vec<String>,
}

pub(crate) fn pattern_summary(table: &RouteTable) -> PatternSummary {
    let config = &table.config;
    let mut levels: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for r in &config.regions {
        levels.entry(r.priority).or_default().push(r.name.clone());
    }
    let sharded_regions: Vec<String> = config
        .regions
        .iter()
        .filter(|r| !r.failover)
        .map(|r| r.name.clone())
        .collect();
    let sharded_zones: Vec<String> = config
        .zones
        .iter()
        .filter(|z| !z.failover)
        .map(|z| z.name.to_string())
        .collect();
    let mut patterns = Vec::new();
    patterns.push(if levels.len() > 1 {
        "active-passive"
    } else {
        "active-active"
    });
    if !sharded_regions.is_empty() || !sharded_zones.is_empty() {
        patterns.push("sharded");
    }
    if !config.routes.is_empty() {
        patterns.push("hub-and-spoke");
    }
    if config.fallback.is_some() {
        patterns.push("fallback");
    }
    let audit = route::residency::audit(table);
    PatternSummary {
        patterns,
        priority_levels: levels
            .into_iter()
            .map(|(priority, regions)| PriorityLevel { priority, regions })
            .collect(),
        sharded_regions,
        sharded_zones,
        routes: config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| RuleView {
                index: i,
                path_prefix: shown_prefix(&r.path_prefix).to_string(),
                regions: r.regions.iter().map(|&x| table.region_name(x).to_string()).collect(),
                residency_exempt: r.residency_exempt,
            })
            .collect(),
        residency_exemptions: audit
            .exemptions
            .iter()
            .map(|e| route::residency::Named { config, item: e }.to_string())
            .collect(),
        residency_notes: audit.notes,
        failover_orders: failover_orders(table),
    }
}

/// The region table for `meridian check`.
/// A config drain as `check` shows it: in force (and until when) or ignored.
pub fn drain_line(d: &crate::config::ConfigDrain, now: std::time::SystemTime) -> String {
    let until = crate::health::drain::format_until(d);
    match until {
        Some(u) if crate::health::drain::is_stale(d, now) => {
            format!("drain ignored: until {u} is in the past (reason {:?})", d.reason)
        }
        Some(u) => format!("drained by config until {u} (reason {:?})", d.reason),
        None => format!("drained by config until removed (reason {:?})", d.reason),
    }
}

/// The region table for `meridian check`: patterns, priority levels and failover orders.
pub fn render_table(table: &RouteTable) -> String {
    let config = &table.config;
    let summary = pattern_summary(table);
    let mut s = String::new();
    let _ = writeln!(s, "patterns: {}", summary.patterns.join(", "));
    if summary.priority_levels.len() > 1 {
        for level in &summary.priority_levels {
            let _ = writeln!(
                s,
                "  priority {}{}: {}",
                level.priority,
                if level.priority == 0 {
                    " (primary)"
                } else {
                    " (standby)"
                },
                level.regions.join(", ")
            );
        }
    }
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
        if let Some(d) = &r.drain {
            let _ = writeln!(s, "    {}", drain_line(d, std::time::SystemTime::now()));
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
        // Header names only: values may be secrets.
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
        for (from, to) in &f.path_rewrite {
            let _ = writeln!(s, "  path rewrite {} -> {}", shown_prefix(from), shown_prefix(to));
        }
        let _ = writeln!(
            s,
            "  circuit breaker: opens after {} consecutive failures, one trial after {:?}",
            f.breaker.failures, f.breaker.cool_down
        );
    }
    if !summary.residency_exemptions.is_empty() || !summary.residency_notes.is_empty() {
        let _ = writeln!(s, "residency audit (no path leaves a zone):");
        for e in &summary.residency_exemptions {
            let _ = writeln!(s, "  exemption: {e}");
        }
        for n in &summary.residency_notes {
            let _ = writeln!(s, "  note: {n}");
        }
    }
    let _ = writeln!(s, "failover order (home clients of each region, then by zone):");
    for g in &summary.failover_orders {
        let _ = writeln!(s, "  {:<12} {}", g.countries.join(","), g.order);
    }
    s
}

/// Clients that share a candidate order: the order they get, with the fallback and the 503.
#[derive(Debug, Serialize)]
pub struct OrderGroup {
    /// Country codes, or "unlocated".
    pub countries: Vec<String>,
    /// The residency zone of these clients, by name.
    pub zone: Option<String>,
    pub(crate) sharded: bool,
    pub(crate) order: String,
}

/// The failover order of every home country and zone country, grouped, then unlocated
/// clients last.
pub fn failover_orders(table: &RouteTable) -> Vec<OrderGroup> {
    let config = &table.config;
    let mut groups: BTreeMap<(String, Option<usize>, bool), Vec<String>> = BTreeMap::new();
    let homes = config.regions.iter().flat_map(|r| r.countries.iter());
    let zoned = config.zones.iter().flat_map(|z| z.countries.iter());
    for c in homes.chain(zoned) {
        if let Some(plan) = table.country_plan(*c) {
            let key = (
                order_text(table, &plan.candidates, plan.fallback),
                plan.zone,
                plan.sharded,
            );
            let entry = groups.entry(key).or_default();
            if !entry.contains(&c.to_string()) {
                entry.push(c.to_string());
            }
        }
    }
    let group = |((order, zone, sharded), countries): ((String, Option<usize>, bool), Vec<String>)| OrderGroup {
        countries,
        zone: zone.map(|z| table.zone_name(z).to_string()),
        sharded,
        order,
    };
    let mut out: Vec<OrderGroup> = groups.into_iter().map(group).collect();
    let unlocated = table.unlocated_plan();
    // Refused before any region is tried, as `route::plan` decides.
    let order = match config.geoip.unknown {
        UnknownPolicy::Refuse => "403 location_refused".to_string(),
        UnknownPolicy::Default => order_text(table, &unlocated.candidates, unlocated.fallback),
    };
    out.push(OrderGroup {
        countries: vec!["unlocated".into()],
        zone: None,
        sharded: unlocated.sharded,
        order,
    });
    out
}

fn order_text(table: &RouteTable, candidates: &[route::Candidate], fallback: bool) -> String {
    let mut names: Vec<&str> = candidates.iter().map(|c| table.region_name(c.region)).collect();
    if fallback {
        names.push("fallback");
    }
    names.push("503");
    names.join(" > ")
}
