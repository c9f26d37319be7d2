//! A client's request fields as everything after the listener reads them.
//!
//! Meridian's HTTP/1.1 server keeps a request's fields as spans over its head's bytes
//! (`forward::head_fields`) rather than building a `HeaderMap` for them: for the openai SDK's
//! request (17 fields) the map's inserts, hashes and drop were ~3,800 of 37,000
//! instructions (callgrind, fifteenth part of issue 13), and most fields are only passed
//! on. The request's own map still exists: HTTP/2 requests arrive in it, and whatever
//! Meridian sets on a request (the `Host` of an absolute-form target, `traceparent`, the
//! rewrite's `te: trailers`) goes there and stands in for the listed fields of its name,
//! as an insert into one map did. [`RequestFields`] reads the two as one.

#[cfg(test)]
use std::ops::Range;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::head_fields::HeadFields;
pub(crate) use super::head_fields::shadowed;

/// The fields of a client's request: its listed fields (HTTP/1.1) shadowed by its map.
#[derive(Debug, Clone, Copy)]
pub struct RequestFields<'a> {
    listed: Option<&'a HeadFields>,
    map: &'a HeaderMap,
}

impl<'a> From<&'a HeaderMap> for RequestFields<'a> {
    fn from(map: &'a HeaderMap) -> RequestFields<'a> {
        RequestFields { listed: None, map }
    }
}

impl<'a> RequestFields<'a> {
    pub(crate) fn new(listed: Option<&'a HeadFields>, map: &'a HeaderMap) -> RequestFields<'a> {
        RequestFields { listed, map }
    }

    /// The map holds `name`: it stands in for the listed fields of that name. An empty map
    /// (the usual HTTP/1.1 request) is not hashed into.
    fn in_map(self, name: &HeaderName) -> bool {
        !self.map.is_empty() && self.map.contains_key(name)
    }

    /// The first value of `name`, as `HeaderMap::get` gives.
    pub fn get(self, name: &HeaderName) -> Option<&'a [u8]> {
        match self.listed {
            Some(listed) if !self.in_map(name) => listed.get(name.as_str()),
            _ => self.map.get(name).map(HeaderValue::as_bytes),
        }
    }

    /// The first value of `name` as text, as `HeaderValue::to_str` gives it (visible ASCII
    /// only).
    pub fn get_str(self, name: &HeaderName) -> Option<&'a str> {
        self.get(name).and_then(visible)
    }

    /// The first value of `name` as a `HeaderValue` (sharing the head's memory).
    pub fn get_value(self, name: &HeaderName) -> Option<HeaderValue> {
        match self.listed {
            Some(listed) if !self.in_map(name) => listed.get(name.as_str()).and_then(|v| listed.value_of(v)),
            _ => self.map.get(name).cloned(),
        }
    }

    /// Every value of `name`, in order.
    pub fn values(self, name: &'a HeaderName) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
        match self.listed {
            Some(listed) if !self.in_map(name) => Values::Listed(listed.values(name.as_str())),
            _ => Values::Mapped(self.map.get_all(name).into_iter()),
        }
    }

    /// Every field, in order: the listed ones the map does not stand in for (names as the
    /// client sent them), then the map's (names lowercase).
    #[cfg(test)]
    pub(crate) fn iter(self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let map = self.map;
        let listed = self.listed.into_iter().flat_map(move |l| {
            l.fields()
                .filter(move |(_, name, _)| !shadowed(map, name))
                .map(|(_, name, value)| (name, value))
        });
        listed.chain(map.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())))
    }

    /// Every field for a head writer: the listed ones the map does not stand in for, each
    /// with where its whole line lies in [`Self::listed_head`] when it lies there as
    /// written (`name: value\r\n`), then the map's.
    #[cfg(test)]
    pub(crate) fn lines(self) -> impl Iterator<Item = (&'a [u8], &'a [u8], Option<Range<usize>>)> + 'a {
        let map = self.map;
        let listed = self
            .listed
            .into_iter()
            .flat_map(move |l| l.lines().filter(move |(name, _, _)| !shadowed(map, name)));
        listed.chain(map.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes(), None)))
    }

    /// The listed fields and the map, for a writer that walks them apart (the map's fields
    /// stand in for listed ones of their names: see [`shadowed`]).
    pub(crate) fn sources(self) -> (Option<&'a HeadFields>, &'a HeaderMap) {
        (self.listed, self.map)
    }

    /// The bytes of the head the listed fields lie in (empty when none are listed).
    pub(crate) fn listed_head(self) -> &'a [u8] {
        self.listed.map_or(&[], HeadFields::head)
    }

    /// About how many fields there are (for sizing).
    pub fn len(self) -> usize {
        self.listed.map_or(0, HeadFields::len) + self.map.len()
    }

    /// There are none.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// The fields in one map (for hyper's clients), with room for `extra` more.
    pub fn to_map(self, extra: usize) -> HeaderMap {
        let Some(listed) = self.listed else {
            return self.map.clone();
        };
        let mut map = listed
            .to_map(self.map.len() + extra, |name| shadowed(self.map, name))
            .unwrap_or_default();
        for (name, value) in self.map {
            map.append(name, value.clone());
        }
        map
    }
}

/// The values of one name, from the list or from the map: an enum rather than a chain of
/// both (callgrind: the chain's adapters cost more than the lookup).
enum Values<'a, L> {
    Listed(L),
    Mapped(http::header::ValueIter<'a, HeaderValue>),
}

impl<'a, L: Iterator<Item = &'a [u8]>> Iterator for Values<'a, L> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Listed(l) => l.next(),
            Values::Mapped(m) => m.next().map(HeaderValue::as_bytes),
        }
    }
}

impl<'a, L: DoubleEndedIterator<Item = &'a [u8]>> DoubleEndedIterator for Values<'a, L> {
    fn next_back(&mut self) -> Option<&'a [u8]> {
        match self {
            Values::Listed(l) => l.next_back(),
            Values::Mapped(m) => m.next_back().map(HeaderValue::as_bytes),
        }
    }
}

impl crate::route::FieldLookup for RequestFields<'_> {
    fn first(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name)
    }
}

/// `value` as text when it is visible ASCII (and tab), as `HeaderValue::to_str` allows.
pub fn visible(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)) {
        // SAFETY: every byte is ASCII (checked just above), and ASCII is UTF-8; checking
        // again cost a call a lookup (callgrind).
        Some(unsafe { std::str::from_utf8_unchecked(value) })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::header;

    fn listed(block: &[u8]) -> HeadFields {
        let mut parsed = [httparse::EMPTY_HEADER; 16];
        let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(block, &mut parsed) else {
            panic!("not a field block: {}", block.escape_ascii());
        };
        let mut fields = HeadFields::new();
        assert!(super::super::h1::field_spans(block, parsed, fields.spans_mut()).is_some());
        assert!(fields.take_in(Bytes::copy_from_slice(block), |_, _| {}));
        fields
    }

    #[test]
    fn the_map_stands_in_for_listed_fields_of_its_names() {
        let head = listed(
            b"Host: a.example\r\nX-Forwarded-For: 1.1.1.1\r\nx-forwarded-for: 2.2.2.2\r\nTraceparent: old\r\n\r\n",
        );
        let mut map = HeaderMap::new();
        let fields = RequestFields::new(Some(&head), &map);
        assert_eq!(fields.get(&header::HOST), Some(&b"a.example"[..]));
        let xff = HeaderName::from_static("x-forwarded-for");
        assert_eq!(fields.values(&xff).collect::<Vec<_>>(), [&b"1.1.1.1"[..], b"2.2.2.2"]);
        assert_eq!(fields.values(&xff).next_back(), Some(&b"2.2.2.2"[..]));
        assert_eq!(fields.len(), 4);

        map.insert(header::HOST, HeaderValue::from_static("b.example"));
        map.insert("traceparent", HeaderValue::from_static("new"));
        let fields = RequestFields::new(Some(&head), &map);
        assert_eq!(fields.get_str(&header::HOST), Some("b.example"));
        assert_eq!(
            fields.get_value(&HeaderName::from_static("traceparent")),
            Some(HeaderValue::from_static("new"))
        );
        let all: Vec<_> = fields
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.to_vec()))
            .collect();
        assert_eq!(all.len(), 4, "{all:?}");
        assert!(!all.iter().any(|(_, v)| v == b"a.example" || v == b"old"));

        let mapped = fields.to_map(0);
        assert_eq!(mapped.get(header::HOST), Some(&HeaderValue::from_static("b.example")));
        assert_eq!(mapped.get_all(&xff).iter().count(), 2);
        assert_eq!(mapped.len(), 4);
    }

    /// Client heads, the usual and the hostile: framing and hop-by-hop fields, names in any
    /// case, spoofed `x-meridian-*`, forwarding chains apart and together, request ids.
    const HEADS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nUser-Agent: OpenAI/Python 1.109.1\r\nContent-Type: application/json\r\nAuthorization: Bearer k\r\nX-Stainless-Lang: python\r\nContent-Length: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nAccept: */*\r\nx-forwarded-for: 2.2.2.2, 3.3.3.3\r\nX-Forwarded-Proto: https\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Internal, Host, x-meridian-zone, Upgrade\r\nX-Internal: 1\r\nx-internal: 2\r\nKeep-Alive: timeout=5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\nProxy-Connection: keep-alive\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nte: gzip\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Meridian-Region: spoofed\r\nx-meridian-country: ZZ\r\nX-MERIDIAN-: bare\r\nx-meridians: kept\r\nx-meridian-a-rather-long-spoofed-field-name: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nX-Request-Id: abc-123\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nx-request-id: \r\nX-Other: 1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Gone\xff\r\nX-Gone: 1\r\n\r\n",
    ];

    /// The same head into a map, as hyper's server (and this code before) gives it.
    fn mapped(wire: &[u8]) -> Result<HeaderMap, Box<dyn std::error::Error>> {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut fields);
        request.parse(wire)?;
        crate::test_fixtures::map_of(request.headers)
    }

    /// The head an endpoint gets, its lines sorted (a map regroups same-named fields), the
    /// made request id (random) left out.
    fn sent_lines(fields: RequestFields<'_>, added: &crate::forward::rewrite::AddedFields) -> Vec<String> {
        let own = crate::forward::h1::OwnRequest {
            method: &http::Method::GET,
            path: "/".into(),
            headers: fields,
            extra: Some(("endpoint-load-metrics-format", "TEXT")),
            added: Some(added),
            body: Bytes::new(),
        };
        let wire = crate::forward::h1::encode_head(&own, "fallback.example", b"");
        let mut lines: Vec<String> = String::from_utf8_lossy(&wire)
            .split("\r\n")
            // Names as the client sent them (a map has them lowercase).
            .map(|l| match l.split_once(": ") {
                Some((name, value)) => format!("{}: {value}", name.to_ascii_lowercase()),
                None => l.to_string(),
            })
            .filter(|l| !(added.request_id.is_some() && l.starts_with("x-request-id: ")))
            .collect();
        lines.sort();
        lines
    }

    #[test]
    fn the_listed_rewrite_sends_what_the_map_rewrite_sends() -> Result<(), Box<dyn std::error::Error>> {
        use crate::forward::rewrite::{Forwarding, SentFields, rewrite_request};
        for wire in HEADS {
            for (trusted, upgrade) in [(false, false), (true, false), (true, true)] {
                let fwd = Forwarding {
                    peer: "10.0.0.1".parse()?,
                    peer_trusted: trusted,
                    proto: "https",
                    country: "GB",
                };
                let mut map = mapped(wire)?;
                let (map_id, map_added) = rewrite_request((&mut map, None), &fwd, upgrade);
                let want = sent_lines((&map).into(), &map_added);

                let mut head =
                    crate::listen::h1::head::parse_request(&mut (*wire).into(), 4096, 64)?.ok_or("incomplete")?;
                let mut request_map = std::mem::take(&mut head.request.parts.headers);
                let mut listed = head.request.listed.take().ok_or("not listed")?;
                let (id, added) = rewrite_request((&mut request_map, Some(&mut listed)), &fwd, upgrade);
                let fields = RequestFields::new(Some(&listed), &request_map);
                let case = format!("{} trusted {trusted} upgrade {upgrade}", wire.escape_ascii());
                assert_eq!(sent_lines(fields, &added), want, "{case}");
                // Passed on as the client spelled them.
                let own = crate::forward::h1::OwnRequest {
                    method: &http::Method::GET,
                    path: "/".into(),
                    headers: fields,
                    extra: None,
                    added: Some(&added),
                    body: Bytes::new(),
                };
                let written = crate::forward::h1::encode_head(&own, "a", b"");
                // (But for what the writer sets itself.)
                let rewritten = |name: &[u8]| {
                    [
                        "x-forwarded-for",
                        "x-forwarded-proto",
                        "x-request-id",
                        "content-length",
                        "transfer-encoding",
                    ]
                    .iter()
                    .any(|r| name.eq_ignore_ascii_case(r.as_bytes()))
                };
                for (name, _, _) in fields.lines().filter(|(name, _, _)| !rewritten(name)) {
                    let line = [name, b": "].concat();
                    assert!(
                        written.windows(line.len()).any(|w| w == line),
                        "{case}: {}",
                        line.escape_ascii()
                    );
                }
                assert_eq!(added.request_id.is_some(), map_added.request_id.is_some(), "{case}");
                if map_added.request_id.is_none() {
                    assert_eq!(id, map_id, "{case}");
                }
                // What rate-limit keys and affinity read, as sent.
                let sent = SentFields {
                    client: fields,
                    added: Some(&added),
                };
                let map_sent = SentFields {
                    client: (&map).into(),
                    added: Some(&map_added),
                };
                for name in [
                    "x-forwarded-for",
                    "x-forwarded-proto",
                    "host",
                    "x-internal",
                    "upgrade",
                    "te",
                ] {
                    let name = HeaderName::from_static(name);
                    assert_eq!(sent.get(&name), map_sent.get(&name), "{case}: {name}");
                }
                // Built for hyper's clients: the same map.
                let mut built = fields.to_map(0);
                added.apply(&mut built);
                let mut map_built = map.clone();
                map_added.apply(&mut map_built);
                built.remove("x-request-id");
                map_built.remove("x-request-id");
                let sorted = |m: &HeaderMap| {
                    let mut v: Vec<_> = m.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
                    v.sort();
                    v
                };
                assert_eq!(sorted(&built), sorted(&map_built), "{case}");
            }
        }
        Ok(())
    }

    #[test]
    fn text_is_what_a_header_value_calls_text() {
        for b in 0..=255u8 {
            let value = [b'a', b, b'z'];
            let Ok(v) = HeaderValue::from_bytes(&value) else {
                continue;
            };
            assert_eq!(visible(&value), v.to_str().ok(), "byte {b:#04x}");
        }
    }
}
