//! Model-aware routing (docs/inference.md, "Models"): the model a request asks for, which regions serve
//! it, and the route plan's candidates filtered to them, geo order kept (pure).

use std::borrow::Cow;

use http::Method;

use super::decide::{RoutePlan, path_matches};
use super::table::RegionId;
use crate::config::Config;
use crate::json_scan;

/// The OpenAI-compatible paths whose JSON body names the model.
pub(crate) const MODEL_PATHS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Why a request for a model cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelRefusal {
    /// The client's residency zone has no region serving the model (some region elsewhere does).
    NotInZone {
        /// The client's residency zone.
        zone: usize,
    },
    /// No candidate region serves the model.
    NotFound,
}

/// Whether a request to `path` names its model in the body: a POST to an OpenAI model path,
/// or to the path of a `[[route]]` with `model_from_body`.
pub fn reads_model(config: &Config, method: &Method, path: &str) -> bool {
    method == Method::POST
        && (MODEL_PATHS.contains(&path)
            || config
                .routes
                .iter()
                .any(|r| r.model_from_body && path_matches(&r.path_prefix, path)))
}

/// The `model` field of a JSON request body, borrowed from the body kept for replay.
/// `None` when the body is not a JSON object with a string `model` (the request is then
/// routed as if it named none).
pub fn request_model(body: &[u8]) -> Option<&str> {
    let raw = json_scan::top_level_string(body, b"model")?;
    // Escaped names are not model names anyone deploys; they are taken as they are written.
    std::str::from_utf8(raw).ok().filter(|m| !m.is_empty())
}

/// Whether a region serves `model`: its configured `models` (absent: every model), and with
/// discovery on, any model one of its endpoints lists. `discovered` is `None` while no
/// endpoint has answered `/v1/models`, else whether one lists the model. A discovering
/// region with no list of its own serves every model until its first answer.
pub fn region_serves(configured: Option<&[String]>, discover: bool, discovered: Option<bool>, model: &str) -> bool {
    if configured.is_some_and(|list| list.iter().any(|m| m == model)) {
        return true;
    }
    match (discover, discovered) {
        (false, _) | (true, None) => configured.is_none(),
        (true, Some(found)) => found,
    }
}

/// Filters `plan`'s candidates to the regions that serve the model, keeping their order.
/// The plan is left borrowed (no copy) when every candidate serves it. With nothing left,
/// the fallback may still serve (`fallback_usable`); otherwise a zone client whose zone
/// lacks the model while another region has it is told so, and anyone else hears that the
/// model is not found. `regions` is the number of regions, for "another region has it".
pub fn filter_plan(
    plan: &mut RoutePlan<'_>,
    serves: impl Fn(RegionId) -> bool,
    regions: usize,
    fallback_usable: bool,
) -> Result<(), ModelRefusal> {
    if plan.candidates.iter().all(|c| serves(c.region)) {
        return Ok(());
    }
    let kept: Vec<_> = plan.candidates.iter().filter(|c| serves(c.region)).cloned().collect();
    if kept.is_empty() && !(plan.fallback && fallback_usable) {
        return Err(match plan.zone {
            Some(zone) if (0..regions).any(&serves) => ModelRefusal::NotInZone { zone },
            _ => ModelRefusal::NotFound,
        });
    }
    plan.candidates = Cow::Owned(kept);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn region_serves_table() {
        let llama = s(&["llama-3.1-70b"]);
        let gpt = s(&["gpt-oss-120b"]);
        let _ = gpt;
        // (name, configured, discover, discovered, model, serves)
        type Case<'a> = (&'a str, Option<&'a [String]>, bool, Option<bool>, &'a str, bool);
        let cases: Vec<Case<'_>> = vec![
            ("no list: every model", None, false, None, "anything", true),
            ("listed", Some(&llama), false, None, "llama-3.1-70b", true),
            ("not listed", Some(&llama), false, None, "gpt-oss-120b", false),
            (
                "discovering, nothing heard yet: every model",
                None,
                true,
                None,
                "x",
                true,
            ),
            (
                "discovered on an endpoint",
                None,
                true,
                Some(true),
                "gpt-oss-120b",
                true,
            ),
            (
                "discovered elsewhere only",
                None,
                true,
                Some(false),
                "gpt-oss-120b",
                false,
            ),
            (
                "listed or discovered",
                Some(&llama),
                true,
                Some(true),
                "gpt-oss-120b",
                true,
            ),
            (
                "listed, discovering, nothing heard: the list",
                Some(&llama),
                true,
                None,
                "gpt-oss-120b",
                false,
            ),
            (
                "listed though not discovered",
                Some(&llama),
                true,
                Some(false),
                "llama-3.1-70b",
                true,
            ),
        ];
        for (name, configured, discover, discovered, model, want) in cases {
            assert_eq!(region_serves(configured, discover, discovered, model), want, "{name}");
        }
    }

    use crate::test_fixtures::plan_over as plan;

    #[test]
    fn filter_table() {
        // Regions 0..4; the model is served by the regions in `serving`.
        // (name, candidates, zone, fallback plan, fallback usable, serving, want)
        type Want = Result<Vec<usize>, ModelRefusal>;
        type Case<'a> = (&'a str, &'a [usize], Option<usize>, bool, bool, &'a [usize], Want);
        let cases: [Case<'_>; 7] = [
            (
                "all serve: order kept",
                &[2, 0, 1],
                None,
                true,
                true,
                &[0, 1, 2, 3],
                Ok(vec![2, 0, 1]),
            ),
            (
                "nearer lacks it: farther gets it",
                &[2, 0, 1],
                None,
                true,
                true,
                &[1],
                Ok(vec![1]),
            ),
            (
                "geo order kept",
                &[3, 1, 0, 2],
                None,
                false,
                false,
                &[0, 3],
                Ok(vec![3, 0]),
            ),
            (
                "nowhere: not found",
                &[2, 0],
                None,
                false,
                false,
                &[],
                Err(ModelRefusal::NotFound),
            ),
            (
                "nowhere but the fallback may serve",
                &[2, 0],
                None,
                true,
                true,
                &[],
                Ok(vec![]),
            ),
            (
                "zone without it, elsewhere has it",
                &[0, 1],
                Some(7),
                false,
                false,
                &[3],
                Err(ModelRefusal::NotInZone { zone: 7 }),
            ),
            (
                "zone, served nowhere: not found",
                &[0, 1],
                Some(7),
                false,
                false,
                &[],
                Err(ModelRefusal::NotFound),
            ),
        ];
        for (name, candidates, zone, fallback, usable, serving, want) in cases {
            let mut p = plan(candidates, zone, fallback);
            let got = filter_plan(&mut p, |r| serving.contains(&r), 4, usable)
                .map(|()| p.candidates.iter().map(|c| c.region).collect::<Vec<_>>());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_plan_every_candidate_serves_stays_borrowed() {
        let owned = plan(&[0, 1], None, false);
        let mut p = RoutePlan {
            candidates: Cow::Borrowed(&owned.candidates[..]),
            ..owned.clone()
        };
        filter_plan(&mut p, |_| true, 2, false).unwrap();
        assert!(matches!(p.candidates, Cow::Borrowed(_)));
    }

    #[test]
    fn request_model_table() {
        let cases: [(&str, Option<&str>); 5] = [
            (
                r#"{"model":"gpt-oss-120b","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
                Some("gpt-oss-120b"),
            ),
            (r#"{"messages":[],"model":"m"}"#, Some("m")),
            (r#"{"model":""}"#, None),
            (r#"{"model":null}"#, None),
            ("not json", None),
        ];
        for (body, want) in cases {
            assert_eq!(request_model(body.as_bytes()), want, "{body}");
        }
    }
}
