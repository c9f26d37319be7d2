//! Residency as an invariant of the compiled table: no failover order (also what retries and
//! panic mode walk), route rule or fallback may take a zone's client outside its zone.
//!
//! The audit reads the same [`RouteTable`] requests read, so it checks what will happen, not
//! what the config meant. A crossing rejects the config at `meridian check`, start-up and
//! reload; a `residency_exempt` rule is the operator's explicit exemption and is reported.

use std::fmt;

use super::table::{Candidate, CountryPlan, RegionId, RouteTable, ZoneId};
use crate::config::{Config, UnknownPolicy};
use crate::geo::Country;

/// What the audit needs from a compiled table; a trait so tests can feed it broken plans.
pub trait PlanSource {
    /// The validated configuration the table was compiled from.
    fn config(&self) -> &Config;
    /// The precomputed plan for clients of `country`, if the country is known.
    fn country_plan(&self, country: Country) -> Option<&CountryPlan>;
    /// A route rule's candidates for clients of `zone` (`None`: clients of no zone).
    fn rule_candidates(&self, rule: usize, zone: Option<ZoneId>) -> &[Candidate];
}

impl PlanSource for RouteTable {
    fn config(&self) -> &Config {
        &self.config
    }

    fn country_plan(&self, country: Country) -> Option<&CountryPlan> {
        RouteTable::country_plan(self, country)
    }

    fn rule_candidates(&self, rule: usize, zone: Option<ZoneId>) -> &[Candidate] {
        RouteTable::rule_candidates(self, rule, zone)
    }
}

/// The mechanism that would carry a client out of its zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The client's candidate order: failover, retries and panic mode all walk it.
    FailoverOrder,
    /// A `[[route]]` rule, by index, lists a region outside the zone.
    RouteRule(usize),
    /// The plan lets the `[fallback]` serve the zone's clients, though it is not tagged with
    /// the zone.
    Fallback,
}

/// Where the crossing lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A region outside the zone.
    Region(RegionId),
    /// The `[fallback]` endpoint, tagged with another zone or none.
    Fallback,
    /// The plan lost the client's zone altogether.
    Unbound,
}

/// A path that sends clients of `zone` outside it: the config is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// The zone whose clients would leave it.
    pub zone: ZoneId,
    /// The zone's countries whose clients take this path.
    pub countries: Vec<Country>,
    /// How they would leave it.
    pub path: Path,
    pub(crate) to: Destination,
}

/// A `residency_exempt` rule that lets clients of `zone` reach regions outside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Exemption {
    pub rule: usize,
    pub zone: ZoneId,
    pub regions: Vec<RegionId>,
}

/// Everything the audit found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    /// Crossings found: any one rejects the config.
    pub crossings: Vec<Crossing>,
    pub(crate) exemptions: Vec<Exemption>,
    /// Allowed, but worth an operator's attention (a refusal the config implies, a setting
    /// that can never apply).
    pub(crate) notes: Vec<String>,
}

impl Audit {
    /// No crossing: the table keeps every zone's clients inside their zone.
    pub fn is_clean(&self) -> bool {
        self.crossings.is_empty()
    }
}

/// Checks every zone country's plan, every route rule and the fallback.
pub fn audit(source: &impl PlanSource) -> Audit {
    let config = source.config();
    let mut out = Audit::default();
    for (z, zone) in config.zones.iter().enumerate() {
        let inside = |r: RegionId| zone.regions.contains(&r);
        for &country in &zone.countries {
            let Some(plan) = source.country_plan(country) else {
                continue;
            };
            if plan.zone != Some(z) {
                out.add(z, country, Path::FailoverOrder, Destination::Unbound);
            }
            for c in plan.candidates.iter().filter(|c| !inside(c.region)) {
                out.add(z, country, Path::FailoverOrder, Destination::Region(c.region));
            }
            let fallback_zone = config.fallback.as_ref().and_then(|f| f.zone);
            if plan.fallback && fallback_zone != Some(z) {
                out.add(z, country, Path::Fallback, Destination::Fallback);
            }
            for (i, rule) in config.routes.iter().enumerate() {
                let outside: Vec<RegionId> = source
                    .rule_candidates(i, Some(z))
                    .iter()
                    .map(|c| c.region)
                    .filter(|&r| !inside(r))
                    .collect();
                if outside.is_empty() {
                    continue;
                }
                if rule.residency_exempt {
                    if !out.exemptions.iter().any(|e| e.rule == i && e.zone == z) {
                        out.exemptions.push(Exemption {
                            rule: i,
                            zone: z,
                            regions: outside,
                        });
                    }
                } else {
                    for r in outside {
                        out.add(z, country, Path::RouteRule(i), Destination::Region(r));
                    }
                }
            }
        }
        for (i, rule) in config.routes.iter().enumerate() {
            if !rule.residency_exempt && !rule.regions.iter().any(|&r| inside(r)) {
                out.notes.push(format!(
                    "{}: clients of zone {} get 403 residency_forbidden (it lists no region of the zone)",
                    rule_label(config, i),
                    zone.name
                ));
            }
        }
        if let Some(f) = &config.fallback {
            if f.zone == Some(z) && !zone.failover {
                out.notes.push(format!(
                    "fallback.zone = {:?} never applies: zone {} has failover = false, so its clients get 503, not the fallback",
                    zone.name, zone.name
                ));
            }
        }
    }
    if !config.zones.is_empty() && config.geoip.unknown == UnknownPolicy::Default {
        out.notes.push(format!(
            "clients that cannot be located belong to no zone and are served from {} (geoip.unknown = \"refuse\" answers them 403 instead)",
            config
                .regions
                .get(config.geoip.default_region)
                .map_or("?", |r| r.name.as_str())
        ));
    }
    out
}

/// Crossings found at load, each named for the operator (region, zone and rule names need
/// the config, so they are rendered while it is at hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a residency-bound client could leave its zone:\n  {}", .0.join("\n  "))]
pub struct Crossings(pub Vec<String>);

/// The audit as a load-time gate: the audit when clean, else every crossing.
pub fn verify(table: &RouteTable) -> Result<Audit, Crossings> {
    let a = audit(table);
    if a.is_clean() {
        return Ok(a);
    }
    Err(Crossings(
        a.crossings
            .iter()
            .map(|c| {
                Named {
                    config: &table.config,
                    item: c,
                }
                .to_string()
            })
            .collect(),
    ))
}

impl Audit {
    /// Records one crossing, merging countries that cross the same way.
    fn add(&mut self, zone: ZoneId, country: Country, path: Path, to: Destination) {
        match self
            .crossings
            .iter_mut()
            .find(|c| c.zone == zone && c.path == path && c.to == to)
        {
            Some(c) if !c.countries.contains(&country) => c.countries.push(country),
            Some(_) => {}
            None => self.crossings.push(Crossing {
                zone,
                countries: vec![country],
                path,
                to,
            }),
        }
    }
}

fn shown_prefix(prefix: &str) -> &str {
    if prefix.is_empty() { "/" } else { prefix }
}

/// `route[2] /v1/chat/completions [GET] [x-workload: batch]`: what the rule matches.
pub(crate) fn rule_label(config: &Config, rule: usize) -> String {
    let Some(r) = config.routes.get(rule) else {
        return format!("route[{rule}]");
    };
    let mut s = format!("route[{rule}] {}", shown_prefix(&r.path_prefix));
    if let Some(methods) = &r.methods {
        let m: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
        s.push_str(&format!(" [{}]", m.join(",")));
    }
    for (name, value) in &r.headers {
        s.push_str(&format!(" [{name}: {}]", value.to_str().unwrap_or("?")));
    }
    s
}

/// Names regions, zones and rules for messages.
pub(crate) struct Named<'a, T> {
    pub config: &'a Config,
    pub item: &'a T,
}

impl fmt::Display for Named<'_, Crossing> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.config;
        let c = self.item;
        let zone = config.zones.get(c.zone).map_or("?", |z| &*z.name);
        let countries: Vec<String> = c.countries.iter().map(|c| c.to_string()).collect();
        let region = |r: RegionId| config.regions.get(r).map_or("?", |r| r.name.as_str());
        let path = match c.path {
            Path::FailoverOrder => "failover order (also walked by retries and panic mode)".to_string(),
            Path::RouteRule(i) => rule_label(config, i),
            Path::Fallback => "[fallback]".to_string(),
        };
        match c.to {
            Destination::Region(r) => write!(
                f,
                "residency zone {zone}: {path} sends {} to region {}, outside the zone",
                countries.join(","),
                region(r)
            ),
            Destination::Fallback => write!(
                f,
                "residency zone {zone}: {path} serves {} although fallback.zone is {}",
                countries.join(","),
                config
                    .fallback
                    .as_ref()
                    .and_then(|x| x.zone)
                    .and_then(|z| config.zones.get(z))
                    .map_or("unset".to_string(), |z| format!("{:?}", z.name))
            ),
            Destination::Unbound => write!(
                f,
                "residency zone {zone}: {path} for {} is not bound to the zone",
                countries.join(",")
            ),
        }
    }
}

impl fmt::Display for Named<'_, Exemption> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = self.config;
        let e = self.item;
        let zone = config.zones.get(e.zone).map_or("?", |z| &*z.name);
        let regions: Vec<&str> = e
            .regions
            .iter()
            .map(|&r| config.regions.get(r).map_or("?", |r| r.name.as_str()))
            .collect();
        write!(
            f,
            "{} is residency_exempt: clients of zone {zone} may reach {} outside the zone",
            rule_label(config, e.rule),
            regions.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The shared world, refusing unlocated clients: the note about them is tested apart.
    fn table(extra: &str) -> RouteTable {
        let mut config = crate::test_fixtures::world_config(extra);
        config.geoip.unknown = UnknownPolicy::Refuse;
        RouteTable::new(Arc::new(config))
    }

    fn messages(t: &RouteTable, a: &Audit) -> Vec<String> {
        a.crossings
            .iter()
            .map(|c| {
                Named {
                    config: &t.config,
                    item: c,
                }
                .to_string()
            })
            .collect()
    }

    /// Configs Meridian compiles: none may cross; exemptions and notes are reported.
    #[test]
    fn compiled_tables_never_cross() {
        let cases: [(&str, &str, usize, usize); 5] = [
            ("plain zones", "", 0, 0),
            ("panic mode", "[health]\npanic_mode = true", 0, 0),
            (
                "zoned fallback",
                "[fallback]\nendpoint = \"https://127.0.0.1:9\"\nzone = \"eu\"",
                0,
                0,
            ),
            (
                "hub abroad, not exempt: refused, noted",
                "[[route]]\npath_prefix = \"/v1/fine_tuning\"\nregions = [\"us-east\"]",
                0,
                2,
            ),
            (
                "hub abroad, exempt: allowed, reported per zone",
                "[[route]]\npath_prefix = \"/v1/files\"\nregions = [\"us-east\"]\nresidency_exempt = true",
                2,
                0,
            ),
        ];
        for (what, extra, exemptions, notes) in cases {
            let t = table(extra);
            let a = audit(&t);
            assert!(a.is_clean(), "{what}: {:?}", messages(&t, &a));
            assert_eq!(a.exemptions.len(), exemptions, "{what}: {:?}", a.exemptions);
            assert_eq!(a.notes.len(), notes, "{what}: {:?}", a.notes);
        }
        let mut c = table("[fallback]\nendpoint = \"https://127.0.0.1:9\"\nzone = \"eu\"")
            .config
            .as_ref()
            .clone();
        c.zones[1].failover = false;
        c.geoip.unknown = UnknownPolicy::Default;
        let a = audit(&RouteTable::new(Arc::new(c)));
        assert!(a.is_clean());
        assert_eq!(a.notes.len(), 2, "{:?}", a.notes);
        assert!(a.notes[0].contains("never applies"));
        assert!(a.notes[1].contains("cannot be located"));
    }

    /// A table whose plans were built wrongly: the audit must name each crossing.
    struct Broken {
        table: RouteTable,
        plans: Vec<(Country, CountryPlan)>,
        rule: Vec<Candidate>,
    }

    impl PlanSource for Broken {
        fn config(&self) -> &Config {
            &self.table.config
        }
        fn country_plan(&self, country: Country) -> Option<&CountryPlan> {
            self.plans
                .iter()
                .find(|(c, _)| *c == country)
                .map(|(_, p)| p)
                .or_else(|| self.table.country_plan(country))
        }
        fn rule_candidates(&self, _rule: usize, _zone: Option<ZoneId>) -> &[Candidate] {
            &self.rule
        }
    }

    fn cand(region: RegionId) -> Candidate {
        Candidate {
            region,
            distance_km: 0.0,
            home: false,
        }
    }

    #[test]
    fn broken_plans_are_named() {
        let gb = Country::parse("GB").unwrap();
        let t = table(
            "[fallback]\nendpoint = \"https://127.0.0.1:9\"\n[[route]]\npath_prefix = \"/v1/fine_tuning\"\nregions = [\"us-east\"]",
        );
        let id = |n: &str| t.config.region_index(n).unwrap_or(usize::MAX);
        let (us, uk) = (id("us-east"), id("uk-south"));
        let plan = |zone: Option<ZoneId>, candidates: Vec<Candidate>, fallback: bool| CountryPlan {
            candidates: candidates.into(),
            ..crate::test_fixtures::plan_over(&[], zone, fallback)
        };
        type Case = (
            &'static str,
            Vec<(Country, CountryPlan)>,
            Vec<Candidate>,
            &'static [&'static str],
        );
        let cases: Vec<Case> = vec![
            (
                "failover order leaves the zone",
                vec![(gb, plan(Some(0), vec![cand(uk), cand(us)], false))],
                vec![],
                &[
                    "residency zone uk: failover order (also walked by retries and panic mode) sends GB to region us-east, outside the zone",
                ],
            ),
            (
                "fallback for a zone it is not tagged with",
                vec![(gb, plan(Some(0), vec![cand(uk)], true))],
                vec![],
                &["residency zone uk: [fallback] serves GB although fallback.zone is unset"],
            ),
            (
                "plan lost its zone",
                vec![(gb, plan(None, vec![cand(uk)], false))],
                vec![],
                &[
                    "residency zone uk: failover order (also walked by retries and panic mode) for GB is not bound to the zone",
                ],
            ),
            (
                "route rule not filtered; countries merged per zone",
                vec![],
                vec![cand(us)],
                &[
                    "residency zone uk: route[0] /v1/fine_tuning sends GB to region us-east, outside the zone",
                    "residency zone eu: route[0] /v1/fine_tuning sends DE,FR to region us-east, outside the zone",
                ],
            ),
        ];
        for (what, plans, rule, want) in cases {
            let b = Broken {
                table: table(
                    "[fallback]\nendpoint = \"https://127.0.0.1:9\"\n[[route]]\npath_prefix = \"/v1/fine_tuning\"\nregions = [\"us-east\"]",
                ),
                plans,
                rule,
            };
            let a = audit(&b);
            assert_eq!(messages(&t, &a), want, "{what}");
        }
    }
}
