//! Cache affinity (docs/routing.md, Affinity): a session goes to the same endpoint of its region, by
//! weighted rendezvous hashing, so the model server's prefix cache is reused [pure].
//!
//! Rendezvous hashing ranks every endpoint by a hash of (session, endpoint); the session
//! takes the best-ranked endpoint that may serve. An ejected endpoint's sessions spread over
//! the others while every other session stays put, and they come back when it recovers.
//! Affinity yields to health (only eligible endpoints rank), to saturation (an endpoint past
//! a spillover threshold is passed over while another has room) and to load (bounded load:
//! an endpoint with more than [`BOUND`] times its share of in-flight requests is passed over).

/// An endpoint as affinity sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate<'a> {
    /// May take this request (healthy, not shed, not already tried).
    pub eligible: bool,
    /// Stable identity: the endpoint's URL, the same in every Meridian instance.
    pub id: &'a str,
    /// Configured weight: a heavier endpoint owns proportionally more sessions.
    pub weight: f64,
    pub in_flight: u32,
    /// At or above a spillover threshold.
    pub saturated: bool,
}

/// How far above its fair share of in-flight requests an endpoint may go before its
/// sessions overflow to their next choice (consistent hashing with bounded loads).
pub const BOUND: f64 = 1.25;
/// In-flight requests an endpoint may always have over its bound, so that at low load a
/// session's own few concurrent requests do not push it off its endpoint.
pub const SLACK: f64 = 2.0;

/// The session's endpoint: an index into `endpoints`, `None` when none is eligible.
pub fn pick(session: &[u8], endpoints: &[Candidate<'_>]) -> Option<usize> {
    let eligible: Vec<usize> = (0..endpoints.len()).filter(|&i| endpoints[i].eligible).collect();
    if eligible.is_empty() {
        return None;
    }
    let mut pool: Vec<usize> = eligible.iter().copied().filter(|&i| !endpoints[i].saturated).collect();
    if pool.is_empty() {
        pool = eligible;
    }
    let total: u32 = pool.iter().map(|&i| endpoints[i].in_flight).sum();
    let capacity = (BOUND * f64::from(total + 1) / pool.len() as f64).ceil() + SLACK;
    let within: Vec<usize> = pool
        .iter()
        .copied()
        .filter(|&i| f64::from(endpoints[i].in_flight) < capacity)
        .collect();
    if !within.is_empty() {
        pool = within;
    }
    let key = fnv1a(session);
    pool.into_iter()
        .map(|i| (i, rank(key, &endpoints[i])))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// The request's endpoint in `region` by affinity: `None` when the region has no affinity
/// or the request carries no session, else the pick (`Some(None)`: nothing eligible).
/// `loads` are the balancer's views of the region's endpoints, in order; `body` is the
/// request body when it was kept for replay (never read from the stream for this).
pub fn for_request(
    rt: &crate::runtime::Runtime,
    region: usize,
    loads: &[crate::balance::EndpointLoad],
    headers: &http::HeaderMap,
    body: Option<&[u8]>,
) -> Option<Option<usize>> {
    let config = rt.config.regions.get(region)?;
    let from_header = config
        .affinity_header
        .as_ref()
        .and_then(|h| headers.get(h))
        .map(|v| std::borrow::Cow::Borrowed(v.as_bytes()));
    let session = match from_header {
        Some(s) => s,
        None => std::borrow::Cow::Owned(body_field(body?, config.affinity_body_field.as_deref()?)?),
    };
    if session.is_empty() {
        return None;
    }
    let r = rt.regions.get(region)?;
    let spill = rt.config.spillover.as_ref();
    let candidates: Vec<Candidate<'_>> = r
        .endpoints
        .iter()
        .zip(loads)
        .map(|(e, l)| Candidate {
            eligible: l.eligible,
            id: &e.config.url,
            weight: f64::from(e.config.weight),
            in_flight: l.in_flight,
            saturated: crate::route::spillover::endpoint_saturated(e.health.signals.current(), spill),
        })
        .collect();
    Some(pick(&session, &candidates))
}

/// The value of a top-level string or number `field` of a JSON object body, as bytes.
/// One pass over the body; other values are skipped without being built.
pub fn body_field(body: &[u8], field: &str) -> Option<Vec<u8>> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Find<'f>(&'f str);
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<Vec<u8>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if found.is_none() && key == self.0 {
                    found = match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::String(s) => Some(s.into_bytes()),
                        serde_json::Value::Number(n) => Some(n.to_string().into_bytes()),
                        _ => None,
                    };
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    serde_json::Deserializer::from_slice(body)
        .deserialize_map(Find(field))
        .ok()
        .flatten()
}

/// Weighted rendezvous score: `-weight / ln(u)` with `u` uniform in (0, 1) from the hash.
fn rank(session: u64, e: &Candidate<'_>) -> f64 {
    let h = mix(session ^ mix(fnv1a(e.id.as_bytes())));
    // 53 random bits as a fraction, never exactly 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -e.weight.max(1e-9) / u.ln()
}

/// FNV-1a: stable across builds and platforms, so every instance maps sessions alike.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The murmur3 finaliser: spreads FNV's weak low bits over the whole word.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    const URLS: [&str; 4] = [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://10.0.0.3:8000",
        "http://10.0.0.4:8000",
    ];

    fn all() -> Vec<Candidate<'static>> {
        URLS.iter()
            .map(|id| Candidate {
                eligible: true,
                id,
                weight: 1.0,
                in_flight: 0,
                saturated: false,
            })
            .collect()
    }

    fn session(i: usize) -> Vec<u8> {
        format!("session-{i}").into_bytes()
    }

    #[test]
    fn same_session_same_endpoint_and_sessions_spread() {
        let e = all();
        let mut counts = [0; 4];
        for i in 0..4000 {
            let first = pick(&session(i), &e).unwrap();
            assert_eq!(pick(&session(i), &e), Some(first));
            counts[first] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn only_the_ejected_endpoints_sessions_move_and_they_come_back() {
        let healthy = all();
        let mut down = all();
        down[2].eligible = false;
        for i in 0..2000 {
            let before = pick(&session(i), &healthy).unwrap();
            let during = pick(&session(i), &down).unwrap();
            if before == 2 {
                assert_ne!(during, 2);
            } else {
                assert_eq!(during, before, "session {i} moved though its endpoint stayed");
            }
            assert_eq!(pick(&session(i), &healthy), Some(before), "back after recovery");
        }
    }

    #[test]
    fn yields_table() {
        let s = b"user-42";
        let home = pick(s, &all()).unwrap();
        let with = |f: &dyn Fn(&mut Candidate<'static>)| {
            let mut e = all();
            f(&mut e[home]);
            pick(s, &e)
        };
        let cases: [(&str, Option<usize>, bool); 4] = [
            ("ineligible: moves", with(&|c| c.eligible = false), false),
            (
                "saturated: moves while others have room",
                with(&|c| c.saturated = true),
                false,
            ),
            ("over its bounded share: moves", with(&|c| c.in_flight = 10), false),
            ("a little busy: stays", with(&|c| c.in_flight = 1), true),
        ];
        for (name, got, stays) in cases {
            assert_eq!(got == Some(home), stays, "{name}: {got:?} vs home {home}");
        }
        let mut e = all();
        e.iter_mut().for_each(|c| c.saturated = true);
        assert_eq!(pick(s, &e), Some(home), "all saturated: home again");
        e.iter_mut().for_each(|c| c.eligible = false);
        assert_eq!(pick(s, &e), None);
    }

    #[test]
    fn weight_owns_a_proportional_share() {
        let mut e = all();
        e[0].weight = 3.0;
        let mut counts = [0; 4];
        for i in 0..6000 {
            counts[pick(&session(i), &e).unwrap()] += 1;
        }
        // Expected 3/6 for the heavy one, 1/6 for each other.
        assert!(counts[0] > 2500 && counts[1] < 1300, "{counts:?}");
    }

    #[test]
    fn body_field_table() {
        let cases: [(&str, Option<&str>); 7] = [
            (
                r#"{"model":"m","user":"alice","messages":[{"role":"user","content":"hi"}]}"#,
                Some("alice"),
            ),
            (r#"{"messages":[{"user":"not this one"}],"user":42}"#, Some("42")),
            (r#"{"user":{"id":"nested"}}"#, None),
            (r#"{"model":"m"}"#, None),
            (r#"["user","alice"]"#, None),
            (r#"{"user":"alice""#, None),
            ("", None),
        ];
        for (body, want) in cases {
            let got = body_field(body.as_bytes(), "user");
            assert_eq!(got.as_deref(), want.map(str::as_bytes), "{body}");
        }
    }

    #[test]
    fn hashes_are_stable_across_builds() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
