//! Which rules a request meets and under which key: matching, key extraction and hashing.

use std::hash::BuildHasher;
use std::net::IpAddr;

use crate::config::{LimitKey, LimitRule};

/// What admission reads from a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The client address (after `X-Forwarded-For` from trusted proxies), for `key = "client_ip"`.
    pub client_ip: IpAddr,
    /// The request path, for a rule's `match.path_prefix`.
    pub path: &'a str,
    /// The request headers, for `key = "header:NAME"`.
    /// The request's fields as its endpoint will get them.
    pub headers: crate::forward::rewrite::SentFields<'a>,
    /// The `model` of a JSON body kept whole, when one was sent.
    pub model: Option<&'a str>,
}

/// A rule's key as found in a request; borrowed, hashed before anything stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyValue<'a> {
    /// The raw value of the rule's header (`key = "header:NAME"`).
    Header(&'a [u8]),
    /// The client address (`key = "client_ip"`).
    Ip(IpAddr),
}

/// Whether `rule` applies to the request, and under which key. `None`: the rule does not
/// match, or the request lacks its key (a request without the header is not counted).
pub fn key_of<'a>(rule: &LimitRule, req: &RequestView<'a>) -> Option<KeyValue<'a>> {
    if let Some(prefix) = &rule.path_prefix {
        if !req.path.starts_with(prefix.as_str()) {
            return None;
        }
    }
    if let Some(model) = &rule.model {
        if req.model != Some(model.as_str()) {
            return None;
        }
    }
    match &rule.key {
        LimitKey::ClientIp => Some(KeyValue::Ip(req.client_ip)),
        LimitKey::Header(name) => {
            let value = req.headers.get(name)?;
            (!value.is_empty()).then_some(KeyValue::Header(value))
        }
    }
}

/// The in-process hash of a key: keyed per process (SipHash), so stored hashes say nothing
/// about the keys and cannot be aimed at one shard.
pub(crate) fn local_hash(hasher: &impl BuildHasher, key: KeyValue<'_>) -> u64 {
    match key {
        KeyValue::Header(v) => hasher.hash_one(v),
        KeyValue::Ip(ip) => hasher.hash_one(ip),
    }
}

/// The fleet-wide name of a key: the same on every instance, and no clear key in Redis.
pub(crate) fn fleet_hash(rule: &str, key: KeyValue<'_>) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(rule.as_bytes());
    ctx.update(b"\0");
    match key {
        KeyValue::Header(v) => ctx.update(v),
        KeyValue::Ip(ip) => ctx.update(ip.to_string().as_bytes()),
    }
    let digest = ctx.finish();
    digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendErrorPolicy, LimitKey};

    fn rule(key: LimitKey, path_prefix: Option<&str>, model: Option<&str>) -> LimitRule {
        LimitRule {
            name: "r".into(),
            key,
            path_prefix: path_prefix.map(str::to_string),
            model: model.map(str::to_string),
            rate: None,
            concurrent: Some(1),
            tokens_per_minute: None,
            on_backend_error: BackendErrorPolicy::Allow,
        }
    }

    #[test]
    fn keys_and_matches() -> crate::test_fixtures::TestResult {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer k1".parse()?);
        headers.insert("x-empty", "".parse()?);
        let ip: IpAddr = "203.0.113.7".parse()?;
        let req = RequestView {
            client_ip: ip,
            path: "/v1/chat/completions",
            headers: crate::forward::rewrite::SentFields::client_only(&headers),
            model: Some("llama"),
        };
        let auth = LimitKey::Header("authorization".parse()?);
        let cases = [
            (
                rule(auth.clone(), None, None),
                Some(KeyValue::Header(b"Bearer k1".as_slice())),
            ),
            (rule(LimitKey::ClientIp, None, None), Some(KeyValue::Ip(ip))),
            (rule(LimitKey::Header("x-tenant".parse()?), None, None), None),
            (rule(LimitKey::Header("x-empty".parse()?), None, None), None),
            (
                rule(auth.clone(), Some("/v1/"), None),
                Some(KeyValue::Header(b"Bearer k1".as_slice())),
            ),
            (rule(auth.clone(), Some("/v2/"), None), None),
            (
                rule(auth.clone(), None, Some("llama")),
                Some(KeyValue::Header(b"Bearer k1".as_slice())),
            ),
            (rule(auth, None, Some("mistral")), None),
        ];
        for (i, (r, want)) in cases.iter().enumerate() {
            assert_eq!(key_of(r, &req), *want, "case {i}");
        }
        Ok(())
    }

    #[test]
    fn hashes_hide_the_key_and_differ_by_rule() {
        let a = fleet_hash("r1", KeyValue::Header(b"secret-key"));
        assert_eq!(a.len(), 32);
        assert!(!a.contains("secret"));
        assert_eq!(a, fleet_hash("r1", KeyValue::Header(b"secret-key")));
        assert_ne!(a, fleet_hash("r2", KeyValue::Header(b"secret-key")));
        let s = std::collections::hash_map::RandomState::new();
        assert_eq!(
            local_hash(&s, KeyValue::Header(b"k")),
            local_hash(&s, KeyValue::Header(b"k"))
        );
    }
}
