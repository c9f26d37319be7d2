//! Cache affinity (docs/routing.md, Affinity): a session goes to the same endpoint of its region, by
//! weighted rendezvous hashing, so the model server's prefix cache is reused (pure).
//!
//! Rendezvous hashing ranks every endpoint by a hash of (session, endpoint); the session
//! takes the best-ranked endpoint that may serve. An ejected endpoint's sessions spread over
//! the others while every other session stays put, and they come back when it recovers.
//! Affinity yields to health (only eligible endpoints rank), to saturation (an endpoint past
//! a spillover threshold is passed over while another has room) and to load (bounded load:
//! an endpoint with more than `BOUND` times its share of in-flight requests is passed over).
//!
//! Prefix-cache affinity (docs/inference.md, "Prefix-cache affinity") needs no session: the first
//! `prefix_bytes` of the prompt (system prompt first, then the messages' text, or the prompt
//! / input text) are hashed in place, with no allocation, to the same rendezvous order; an
//! endpoint above `max_load_factor` × the region's mean in-flight is skipped. A session
//! header or body field, when configured and present, wins over the prefix.

use crate::balance::{fnv1a, mix};

/// An endpoint as affinity sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// May take this request (healthy, not shed, not already tried).
    pub eligible: bool,
    /// Stable identity: the endpoint's [`EndpointId`](crate::health::EndpointId), the same in every Meridian
    /// instance (computed once per config, not per request).
    pub id: u64,
    /// Configured weight: a heavier endpoint owns proportionally more sessions.
    pub(crate) weight: f64,
    pub(crate) in_flight: u32,
    /// At or above a spillover threshold.
    pub saturated: bool,
}

/// How far above its fair share of in-flight requests an endpoint may go before its
/// sessions overflow to their next choice (consistent hashing with bounded loads).
pub(crate) const BOUND: f64 = 1.25;
/// In-flight requests an endpoint may always have over its bound, so that at low load a
/// session's own few concurrent requests do not push it off its endpoint.
pub(crate) const SLACK: f64 = 2.0;

/// The session's endpoint: an index into `endpoints`, `None` when none is eligible.
pub fn pick(session: &[u8], endpoints: &[Candidate]) -> Option<usize> {
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
pub(crate) fn for_request(
    rt: &crate::runtime::Snapshot,
    region: usize,
    loads: &[crate::balance::EndpointLoad],
    headers: crate::forward::rewrite::SentFields<'_>,
    body: Option<&[u8]>,
) -> Option<Option<usize>> {
    let config = rt.config.regions.get(region)?;
    let from_header = config
        .affinity_header
        .as_ref()
        .and_then(|h| headers.get(h))
        .map(std::borrow::Cow::Borrowed);
    let from_body = || {
        body.zip(config.affinity_body_field.as_deref())
            .and_then(|(b, f)| body_field(b, f))
            .map(std::borrow::Cow::Owned)
    };
    let session = match from_header.or_else(from_body) {
        Some(s) if !s.is_empty() => s,
        _ => {
            let prefix = config.prefix_affinity?;
            return for_prefix(rt, region, loads, body?, prefix);
        }
    };
    let r = rt.regions.get(region)?;
    let spill = rt.config.spillover.as_ref();
    let candidates: Vec<Candidate> = r
        .endpoints
        .iter()
        .zip(loads)
        .map(|(e, l)| Candidate {
            eligible: l.eligible,
            id: e.health.id.0,
            weight: f64::from(e.config.weight),
            in_flight: l.in_flight,
            saturated: crate::route::spillover::endpoint_saturated(e.health.signals.current(), spill),
        })
        .collect();
    Some(pick(&session, &candidates))
}

/// Endpoints a prefix pick considers without allocating; more are balanced as usual.
pub(crate) const MAX_PREFIX_ENDPOINTS: usize = 16;

/// Prefix-cache affinity for a request without a session: `None` when the body has no
/// prompt text (the balancer decides), else the pick.
fn for_prefix(
    rt: &crate::runtime::Snapshot,
    region: usize,
    loads: &[crate::balance::EndpointLoad],
    body: &[u8],
    prefix: crate::config::PrefixAffinity,
) -> Option<Option<usize>> {
    // With one endpoint or none to take the request, the balancer picks what the hash would:
    // the body need not be read.
    if loads.iter().filter(|l| l.eligible).count() <= 1 {
        return None;
    }
    let key = prefix_key(body, prefix.prefix_bytes)?;
    let r = rt.regions.get(region)?;
    if r.endpoints.len() > MAX_PREFIX_ENDPOINTS {
        return None;
    }
    let mut candidates = [Candidate {
        eligible: false,
        id: 0,
        weight: 1.0,
        in_flight: 0,
        saturated: false,
    }; MAX_PREFIX_ENDPOINTS];
    for ((slot, e), l) in candidates.iter_mut().zip(&r.endpoints).zip(loads) {
        *slot = Candidate {
            eligible: l.eligible,
            id: e.health.id.0,
            weight: f64::from(e.config.weight),
            in_flight: l.in_flight,
            saturated: false,
        };
    }
    Some(pick_prefix(
        key,
        &candidates[..loads.len().min(r.endpoints.len())],
        prefix.max_load_factor,
    ))
}

/// The prefix's endpoint: the best-ranked eligible endpoint whose in-flight count is within
/// `max_load_factor` × the mean (this request included), else the best-ranked eligible one.
/// No allocation.
pub(crate) fn pick_prefix(key: u64, endpoints: &[Candidate], max_load_factor: f64) -> Option<usize> {
    let (mut total, mut n) = (0u64, 0u32);
    for e in endpoints.iter().filter(|e| e.eligible) {
        total += u64::from(e.in_flight);
        n += 1;
    }
    if n == 0 {
        return None;
    }
    // Bounded loads (Mirrokni et al.): capacity ⌈c · (m + 1) / n⌉ requests per endpoint.
    let capacity = (max_load_factor * (total + 1) as f64 / f64::from(n)).ceil();
    let best = |within: bool| {
        endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.eligible && (!within || f64::from(e.in_flight) < capacity))
            .map(|(i, e)| (i, rank(key, e)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i)
    };
    best(true).or_else(|| best(false))
}

/// The hash of the prompt's first `limit` bytes: `system` / `instructions` first, then the
/// text of `messages` in order (string contents and `text` parts), then `prompt` / `input`.
/// Strings are hashed as written in the body (escapes included). `None` when the body is not
/// a JSON object or has no prompt text.
pub fn prefix_key(body: &[u8], limit: usize) -> Option<u64> {
    // Bodies almost always put the parts in hashing order: hash them in the one walk. The
    // rest (a `system` after `messages`, `messages` twice, input that walk does not follow)
    // is located first, then hashed.
    match prefix_key_in_order(body, limit) {
        Some(key) => key,
        None => prefix_key_located(body, limit),
    }
}

/// [`prefix_key`] in one walk over the body, hashing each part as the walk passes it:
/// `None` when that would not give [`prefix_key_located`]'s answer (parts out of hashing
/// order, `messages` twice, malformed or odd input), so the caller falls back to it.
/// Locating first cost a second and third pass over the messages (the whole-value skip of
/// the top-level walk, then per-message and per-field skips while hashing); this pass reads
/// each byte of the body once.
fn prefix_key_in_order(body: &[u8], limit: usize) -> Option<Option<u64>> {
    use crate::json_scan::{object_walk, skip};
    let mut h = PrefixHasher::new(limit);
    let (mut system, mut messages, mut prompt) = (false, false, false);
    object_walk(body, 0, |key, value| {
        // As `prefix_key_located`: the first `system` / `instructions`, the last `messages`,
        // the first `prompt` / `input`, hashed in that order.
        let hash_it = match key {
            b"system" | b"instructions" if !system => {
                if messages || prompt {
                    return None;
                }
                system = true;
                true
            }
            b"messages" => {
                if messages || prompt {
                    return None;
                }
                messages = true;
                true
            }
            b"prompt" | b"input" if !prompt => {
                prompt = true;
                true
            }
            _ => false,
        };
        if hash_it && !h.full() {
            walk_text(body, value, &mut h, 0)
        } else {
            skip(body, value)
        }
    })?;
    Some((h.written > 0).then(|| h.finish()))
}

/// Hashes what `text` in [`prefix_key_located`] hashes for the value at `at`, and returns the
/// position after the value (`None`: malformed or odd input; the caller falls back). Each
/// string is found once (`memchr`) and its first bytes hashed from that slice.
fn walk_text(b: &[u8], at: usize, h: &mut PrefixHasher, depth: u8) -> Option<usize> {
    use crate::json_scan::{array_walk, object_walk, skip_strict, string};
    match b.get(at)? {
        b'"' => {
            let (s, end) = string(b, at)?;
            h.write(s);
            Some(end)
        }
        b'[' if depth <= 2 => array_walk(b, at, |el| match b.get(el)? {
            _ if h.full() => skip_strict(b, el),
            b'"' => walk_text(b, el, h, depth + 1),
            b'{' => object_walk(b, el, |k, v| {
                if !h.full() && matches!(k, b"content" | b"text") {
                    walk_text(b, v, h, depth + 1)
                } else {
                    skip_strict(b, v)
                }
            }),
            _ => skip_strict(b, el),
        }),
        _ => skip_strict(b, at),
    }
}

/// [`prefix_key`] by locating the parts with one walk over the top-level fields, then
/// hashing each: right for any field order.
fn prefix_key_located(body: &[u8], limit: usize) -> Option<u64> {
    use crate::json_scan::{elements, fields, string, string_prefix};
    // One walk over the top-level fields finds where each part starts.
    let (mut system, mut messages, mut prompt) = (None, None, None);
    fields(body, 0, |key, value| {
        match key {
            b"system" | b"instructions" => system = system.or(Some(value)),
            b"messages" => messages = Some(value),
            b"prompt" | b"input" => prompt = prompt.or(Some(value)),
            _ => {}
        }
        true
    })?;
    let mut h = PrefixHasher::new(limit);
    // A string, or the text parts of a content array (`[{"type":"text","text":...}]`), or an
    // array of strings (a batch of prompts) or of messages (the responses API's `input`).
    fn text(b: &[u8], at: usize, h: &mut PrefixHasher, depth: u8) {
        if let Some(s) = string_prefix(b, at, h.room()) {
            h.write(s);
            return;
        }
        if depth > 2 {
            return;
        }
        let _ = elements(b, at, |el| {
            if string(b, el).is_some() {
                text(b, el, h, depth + 1);
            } else {
                let _ = fields(b, el, |k, v| {
                    if matches!(k, b"content" | b"text") {
                        text(b, v, h, depth + 1);
                    }
                    !h.full()
                });
            }
            !h.full()
        });
    }
    for part in [system, messages, prompt].into_iter().flatten() {
        if h.full() {
            break;
        }
        text(body, part, &mut h, 0);
    }
    (h.written > 0).then(|| h.finish())
}

/// A streaming hash over at most `limit` bytes, eight bytes per multiply; stable across
/// builds and platforms, like [`fnv1a`]. Lives on the stack.
#[derive(Clone)]
struct PrefixHasher {
    h: u64,
    tail: [u8; 8],
    tail_len: usize,
    written: usize,
    limit: usize,
}

impl PrefixHasher {
    fn new(limit: usize) -> PrefixHasher {
        PrefixHasher {
            h: 0xcbf2_9ce4_8422_2325,
            tail: [0; 8],
            tail_len: 0,
            written: 0,
            limit,
        }
    }

    fn full(&self) -> bool {
        self.written >= self.limit
    }

    /// Bytes it will still take.
    fn room(&self) -> usize {
        self.limit.saturating_sub(self.written)
    }

    fn word(&mut self, w: u64) {
        self.h = (self.h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }

    fn write(&mut self, bytes: &[u8]) {
        let take = bytes.len().min(self.limit.saturating_sub(self.written));
        let mut bytes = &bytes[..take];
        self.written += take;
        if self.tail_len > 0 {
            let n = (8 - self.tail_len).min(bytes.len());
            self.tail[self.tail_len..self.tail_len + n].copy_from_slice(&bytes[..n]);
            self.tail_len += n;
            bytes = &bytes[n..];
            if self.tail_len < 8 {
                return;
            }
            self.word(u64::from_le_bytes(self.tail));
            self.tail_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.word(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    fn finish(mut self) -> u64 {
        if self.tail_len > 0 {
            self.tail[self.tail_len..].fill(0);
            self.word(u64::from_le_bytes(self.tail) ^ (self.tail_len as u64) << 59);
        }
        mix(self.h ^ self.written as u64)
    }
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
fn rank(session: u64, e: &Candidate) -> f64 {
    let h = mix(session ^ e.id);
    // 53 random bits as a fraction, never exactly 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -e.weight.max(1e-9) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::fnv1a;
    use crate::test_fixtures::TestResult;

    const URLS: [&str; 4] = [
        "http://10.0.0.1:8000",
        "http://10.0.0.2:8000",
        "http://10.0.0.3:8000",
        "http://10.0.0.4:8000",
    ];

    fn all() -> Vec<Candidate> {
        URLS.iter()
            .map(|url| Candidate {
                eligible: true,
                id: crate::health::EndpointId::of_url(url).0,
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
    fn same_session_same_endpoint_and_sessions_spread() -> TestResult {
        let e = all();
        let mut counts = [0; 4];
        for i in 0..4000 {
            let first = pick(&session(i), &e).ok_or("nothing picked")?;
            assert_eq!(pick(&session(i), &e), Some(first));
            counts[first] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        Ok(())
    }

    #[test]
    fn only_the_ejected_endpoints_sessions_move_and_they_come_back() -> TestResult {
        let healthy = all();
        let mut down = all();
        down[2].eligible = false;
        for i in 0..2000 {
            let before = pick(&session(i), &healthy).ok_or("nothing picked")?;
            let during = pick(&session(i), &down).ok_or("nothing picked")?;
            if before == 2 {
                assert_ne!(during, 2);
            } else {
                assert_eq!(during, before, "session {i} moved though its endpoint stayed");
            }
            assert_eq!(pick(&session(i), &healthy), Some(before), "back after recovery");
        }
        Ok(())
    }

    #[test]
    fn yields_table() -> TestResult {
        let s = b"user-42";
        let home = pick(s, &all()).ok_or("nothing picked")?;
        let with = |f: &dyn Fn(&mut Candidate)| {
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
        Ok(())
    }

    #[test]
    fn weight_owns_a_proportional_share() -> TestResult {
        let mut e = all();
        e[0].weight = 3.0;
        let mut counts = [0; 4];
        for i in 0..6000 {
            counts[pick(&session(i), &e).ok_or("nothing picked")?] += 1;
        }
        // Expected 3/6 for the heavy one, 1/6 for each other.
        assert!(counts[0] > 2500 && counts[1] < 1300, "{counts:?}");
        Ok(())
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

    fn chat(system: &str, user: &str) -> String {
        format!(
            r#"{{"model":"m","messages":[{{"role":"system","content":"{system}"}},{{"role":"user","content":"{user}"}}],"stream":true}}"#
        )
    }

    #[test]
    fn prefix_key_table() {
        let long_system = "You are a careful assistant. ".repeat(100);
        let k = |b: &str, limit| prefix_key(b.as_bytes(), limit);
        let base = k(&chat(&long_system, "question one"), 2048);
        assert!(base.is_some());
        let cases: [(&str, bool); 7] = [
            (
                "same system prompt, another question past the prefix: same key",
                k(&chat(&long_system, "question two"), 2048) == base,
            ),
            (
                "fields in another order: same key",
                k(
                    &format!(
                        r#"{{"stream":true,"messages":[{{"role":"system","content":"{long_system}"}},{{"role":"user","content":"question one"}}],"model":"m"}}"#
                    ),
                    2048,
                ) == base,
            ),
            (
                "another system prompt: another key",
                k(&chat("Be brief.", "question one"), 2048) != base,
            ),
            (
                "short prompts differ by the question",
                k(&chat("Be brief.", "a"), 2048) != k(&chat("Be brief.", "b"), 2048),
            ),
            (
                "content parts hash like a string",
                k(
                    r#"{"messages":[{"role":"user","content":[{"type":"text","text":"hello world"}]}]}"#,
                    64,
                ) == k(r#"{"messages":[{"role":"user","content":"hello world"}]}"#, 64),
            ),
            (
                "instructions come before input",
                k(r#"{"input":"q","instructions":"sys"}"#, 64) == k(r#"{"instructions":"sys","input":"q"}"#, 64),
            ),
            (
                "completions prompt",
                k(r#"{"model":"m","prompt":"Once upon a time"}"#, 64).is_some(),
            ),
        ];
        for (name, holds) in cases {
            assert!(holds, "{name}");
        }
        for body in [r#"{"model":"m"}"#, "not json", r#"{"messages":[]}"#] {
            assert_eq!(k(body, 64), None, "{body}");
        }
    }

    #[test]
    fn prefix_hash_is_independent_of_how_the_text_is_split() {
        let text = b"0123456789abcdefghijklmnopqrstuvwxyz";
        for limit in [1, 7, 8, 9, 20, 100] {
            let mut whole = PrefixHasher::new(limit);
            whole.write(text);
            for cut in 0..text.len() {
                let mut split = PrefixHasher::new(limit);
                split.write(&text[..cut]);
                split.write(&text[cut..]);
                assert_eq!(split.finish(), whole.clone().finish(), "limit {limit} cut {cut}");
            }
        }
    }

    #[test]
    fn the_one_walk_hashes_what_locating_first_hashes() {
        let bodies = [
            chat("You are terse.", "q"),
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"there"}]}]}"#.to_string(),
            r#"{"system":"sys","messages":[{"role":"user","content":"a\"b\\c"}],"max_tokens":5}"#.to_string(),
            r#"{"instructions":"sys","input":[{"role":"user","content":"q"},"plain",7,[1,2],{"text":{"content":"deep"}}]}"#.to_string(),
            r#" { "prompt" : [ "one" , "two" ] , "n" : null , "stop" : [ "\n" ] } "#.to_string(),
            r#"{"messages":[{"role":"user","content":"x"}],"system":"later"}"#.to_string(),
            r#"{"messages":[],"messages":[{"content":"second"}]}"#.to_string(),
            r#"{"input":"q","instructions":"sys","prompt":"p"}"#.to_string(),
            r#"{"messages":[{"content":"c","weird":tr{ue},{"content":1e5}]}"#.to_string(),
        ];
        let mut in_order = 0;
        for body in &bodies {
            let b = body.as_bytes();
            let mut cases: Vec<Vec<u8>> = vec![b.to_vec()];
            for i in 0..b.len() {
                cases.push(b[..i].to_vec());
                for c in *b"\"\\{}[],: x1" {
                    let mut m = b.to_vec();
                    m[i] = c;
                    cases.push(m);
                }
            }
            for case in &cases {
                for limit in [0, 1, 3, 8, 17, 64, 4096] {
                    let want = prefix_key_located(case, limit);
                    if let Some(got) = prefix_key_in_order(case, limit) {
                        in_order += 1;
                        assert_eq!(got, want, "{} limit {limit}", String::from_utf8_lossy(case));
                    }
                    assert_eq!(prefix_key(case, limit), want);
                }
            }
        }
        assert!(in_order > 10_000, "the one walk took {in_order} cases");
        // The usual shapes take the one walk.
        for body in &bodies[..5] {
            assert!(prefix_key_in_order(body.as_bytes(), 64).is_some(), "{body}");
        }
    }

    #[test]
    fn prefix_pick_is_stable_while_balanced_and_spreads_over_the_bound() -> TestResult {
        let e = all();
        let mut homes = [0; 4];
        for i in 0..400 {
            let key = prefix_key(chat(&format!("system {i}"), "q").as_bytes(), 2048).ok_or("no prefix key")?;
            let home = pick_prefix(key, &e, 1.25).ok_or("nothing picked")?;
            assert_eq!(pick_prefix(key, &e, 1.25), Some(home));
            homes[home] += 1;
            // Balanced load: stays.
            let mut busy = all();
            busy.iter_mut().for_each(|c| c.in_flight = 3);
            assert_eq!(pick_prefix(key, &busy, 1.25), Some(home));
            // Its endpoint far over the mean: moves.
            let mut over = all();
            over[home].in_flight = 8;
            assert_ne!(pick_prefix(key, &over, 1.25), Some(home));
            // Everyone else ineligible: home again, whatever its load.
            let mut only = over.clone();
            only.iter_mut().enumerate().for_each(|(j, c)| c.eligible = j == home);
            assert_eq!(pick_prefix(key, &only, 1.25), Some(home));
        }
        assert!(homes.iter().all(|&c| c > 50), "{homes:?}");
        Ok(())
    }

    #[test]
    fn hashes_are_stable_across_builds() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
