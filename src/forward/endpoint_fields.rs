//! An endpoint's response fields as they came off the wire: relayed without a map.
//!
//! A `HeaderMap` for an endpoint's answer (a hash and an insert a field, the map's two
//! allocations, its drop), the rewrite's inserts into it and writing it out again cost about
//! 2,000 of a proxied request's 28,000 instructions (callgrind, fourteenth part of issue 13),
//! for a head Meridian reads in four places (its framing, `Content-Type`, `Retry-After` on a
//! 429 or 503, an ORCA load report) and otherwise passes on. NGINX and Pingora keep an
//! upstream's fields the same way: a list over the received bytes, some marked as not sent.
//!
//! The fields stay spans over the frozen head; what the response rewrite drops is a bit a
//! field, what it adds is kept beside them. Meridian's HTTP/1.1 server writes them straight
//! out; its HTTP/2 server (and anything else that needs a map) gets one from
//! [`EndpointFields::append_to`]. Names are written lowercase either way, as a map would.
//! A field set on the response's map after the rewrite (admission's rate fields) replaces
//! the endpoint's field of that name, as an insert into one map did.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::h1::{FieldSpans, FieldValues, FramingFields, token_is};
use super::head_fields::HeadFields;
pub(crate) use super::head_fields::{FieldMask, shadowed};

/// An endpoint's response fields over its head's bytes.
#[derive(Debug)]
pub(crate) struct EndpointFields {
    list: HeadFields,
    /// Bit `i`: field `i` is one whose name the client's head writer looks at.
    special: FieldMask,
    /// What one pass over the names found, so the rewrite looks only for what is there.
    seen: Seen,
    /// Written after the endpoint's own fields.
    added: Added,
}

/// The fields a rewrite acts on, noted as the head is taken in.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Seen {
    pub(crate) framing: FramingFields,
    /// `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate` or `Proxy-Authorization`.
    pub(crate) other_hop: bool,
    /// An `x-meridian-*` field: only Meridian speaks for Meridian.
    pub(crate) meridian: bool,
}

impl Seen {
    /// Nothing a response rewrite removes: the usual answer's head.
    pub(crate) fn nothing_to_remove(&self) -> bool {
        let f = self.framing;
        !(f.connection || f.transfer_encoding || f.upgrade || f.te || self.other_hop || self.meridian)
    }
}

#[derive(Debug, Default)]
struct Added {
    /// `te: trailers`, the one `TE` value that travels end to end (gRPC).
    te_trailers: bool,
    region: Option<HeaderValue>,
    attempts: Option<HeaderValue>,
}

const X_MERIDIAN: &[u8] = b"x-meridian-";

impl EndpointFields {
    /// Fields to be taken in by [`Self::take_in`], built where they will live: the spans
    /// are written into the box, not moved there (they are 400 bytes inline).
    pub(crate) fn boxed() -> Box<EndpointFields> {
        // Written into the allocation rather than built beside it and copied there (as
        // `Box::new` did: 560 bytes a response).
        Box::write(
            Box::new_uninit(),
            EndpointFields {
                list: HeadFields::new(),
                special: FieldMask::default(),
                seen: Seen::default(),
                added: Added::default(),
            },
        )
    }

    /// The fields of a field block (`name: value` lines and the empty line), as a test
    /// writes them.
    #[cfg(test)]
    pub(crate) fn of_block(block: &[u8]) -> Box<EndpointFields> {
        let mut parsed = [httparse::EMPTY_HEADER; 32];
        let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(block, &mut parsed) else {
            panic!("not a field block: {}", block.escape_ascii());
        };
        let mut fields = EndpointFields::boxed();
        let spans = super::h1::field_spans(block, parsed, fields.spans_mut());
        assert!(spans.is_some() && fields.take_in(Bytes::copy_from_slice(block)).is_some());
        fields
    }

    /// Where `h1::field_spans` writes the fields' spans in the head to come.
    pub(crate) fn spans_mut(&mut self) -> &mut FieldSpans {
        self.list.spans_mut()
    }

    /// Takes in the frozen `head` the spans (from `h1::field_spans`: fields httparse
    /// accepted) lie in; returns which framing fields are there, or `None` if a span lies
    /// outside the head or there are more fields than a head may have.
    pub(crate) fn take_in(&mut self, head: Bytes) -> Option<FramingFields> {
        let mut seen = Seen::default();
        let mut special = FieldMask::default();
        let taken = self.list.take_in(head, |i, name| {
            if note(&mut seen, name) {
                special.set(i);
            }
        });
        if !taken {
            return None;
        }
        self.special = special;
        self.seen = seen;
        Some(seen.framing)
    }

    /// Whether field `i` is one the client's head is framed by (`Content-Length`,
    /// `Transfer-Encoding`, `Connection`, `Keep-Alive`) or `Date`.
    pub(crate) fn is_special(&self, i: usize) -> bool {
        self.special.has(i)
    }

    pub(crate) fn seen(&self) -> Seen {
        self.seen
    }

    /// The head's bytes, for sizing what is written from them.
    pub(crate) fn head_len(&self) -> usize {
        self.list.head_len()
    }

    /// The relayed fields, in order: index, name as sent, value.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (usize, &[u8], &[u8])> {
        self.list.fields()
    }

    /// Every relayed value of `lower` (a lowercase name), in order.
    pub(crate) fn values<'a>(&'a self, lower: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.list.values(lower)
    }

    /// The first relayed value of `lower`, as `HeaderMap::get` gives.
    pub(crate) fn get<'a>(&'a self, lower: &'a str) -> Option<&'a [u8]> {
        self.list.get(lower)
    }

    /// Stops relaying the fields whose bits `mask` sets.
    pub(crate) fn drop_fields(&mut self, mask: FieldMask) {
        self.list.drop_fields(mask);
    }

    /// Takes `lower` out of what is relayed; its first value, as `HeaderMap::remove` gives.
    pub(crate) fn take(&mut self, lower: &str) -> Option<HeaderValue> {
        self.list.take(lower)
    }

    /// What the rewrite adds: `te: trailers` kept, the region that answered, the attempts
    /// it took (when more than one).
    pub(crate) fn add(&mut self, te_trailers: bool, region: HeaderValue, attempts: Option<HeaderValue>) {
        self.added = Added {
            te_trailers,
            region: Some(region),
            attempts,
        };
    }

    /// What Meridian adds after the endpoint's relayed fields ([`Self::fields`]), names
    /// lowercase.
    pub(crate) fn added(&self) -> impl Iterator<Item = (&'static [u8], &[u8])> {
        let te = self.added.te_trailers.then_some((&b"te"[..], &b"trailers"[..]));
        let region = self
            .added
            .region
            .as_ref()
            .map(|v| (super::rewrite::X_MERIDIAN_REGION.as_str().as_bytes(), v.as_bytes()));
        let attempts = self
            .added
            .attempts
            .as_ref()
            .map(|v| (super::rewrite::X_MERIDIAN_ATTEMPTS.as_str().as_bytes(), v.as_bytes()));
        te.into_iter().chain(region).chain(attempts)
    }

    /// What goes to the client, in order: the endpoint's relayed fields (names as sent),
    /// then what Meridian added.
    #[cfg(test)]
    pub(crate) fn relayed(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let added = self.added().map(|(name, value)| (name as &[u8], value));
        self.fields().map(|(_, name, value)| (name, value)).chain(added)
    }

    /// Appends what is relayed to `map` (for the HTTP/2 server, and a `101`'s rewrite).
    pub(crate) fn append_to(self, map: &mut HeaderMap) {
        // As the HTTP/1.1 reading built its map before (known names static, values sharing
        // the head). The map's own fields (set after the endpoint's: admission's) follow
        // and replace the endpoint's of their names.
        if let Some(mut fields) = self.list.to_map(map.len() + 3, |name| shadowed(map, name)) {
            fields.extend(std::mem::take(map));
            *map = fields;
        }
        let Added {
            te_trailers,
            region,
            attempts,
        } = self.added;
        if te_trailers {
            map.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(region) = region {
            map.insert(&super::rewrite::X_MERIDIAN_REGION, region);
        }
        if let Some(attempts) = attempts {
            map.insert(&super::rewrite::X_MERIDIAN_ATTEMPTS, attempts);
        }
    }
}

impl FieldValues for EndpointFields {
    fn values_of<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.values(name.as_str())
    }
}

/// Notes `name` in `seen` (lengths first, so most names cost one `match`); true for a name
/// the client's head writer looks at.
fn note(seen: &mut Seen, name: &[u8]) -> bool {
    let f = &mut seen.framing;
    let special = match name.len() {
        2 if token_is(name, b"te") => {
            f.te = true;
            false
        }
        4 => token_is(name, b"date"),
        6 if token_is(name, b"expect") => {
            f.expect = true;
            false
        }
        7 if token_is(name, b"upgrade") => {
            f.upgrade = true;
            false
        }
        10 if token_is(name, b"connection") => {
            f.connection = true;
            true
        }
        10 if token_is(name, b"keep-alive") => {
            seen.other_hop = true;
            true
        }
        14 if token_is(name, b"content-length") => {
            f.content_length = true;
            true
        }
        16 if token_is(name, b"proxy-connection") => {
            seen.other_hop = true;
            false
        }
        17 if token_is(name, b"transfer-encoding") => {
            f.transfer_encoding = true;
            true
        }
        18 if token_is(name, b"proxy-authenticate") => {
            seen.other_hop = true;
            false
        }
        19 if token_is(name, b"proxy-authorization") => {
            seen.other_hop = true;
            false
        }
        _ => false,
    };
    if name.len() >= X_MERIDIAN.len() && token_is(&name[..X_MERIDIAN.len()], X_MERIDIAN) {
        seen.meridian = true;
    }
    special
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::h1::parse_head;
    use crate::forward::rewrite::{response_fields, response_headers};
    use crate::test_fixtures::TestResult;
    use bytes::BytesMut;
    use http::Method;

    /// Heads as endpoints send them, the usual and the hostile.
    const HEADS: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: Tue, 01 Dec 2026 19:00:00 GMT\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal, Content-Type, x-meridian-zone\r\nX-Internal: 1\r\nx-internal: 2\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTE: trailers\r\nTE: gzip\r\nTrailer: grpc-status\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nte: gzip\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Meridian-Region: spoofed\r\nx-meridian-attempts: 9\r\nx-meridian-: bare\r\nx-meridians: kept\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\nProxy-Authenticate: Basic\r\nProxy-Authorization: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nSet-Cookie: a=1\r\nX-Other: 1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: X-Gone\xff\r\nX-Gone: 1\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
    ];

    fn parsed(wire: &[u8]) -> Result<Box<EndpointFields>, Box<dyn std::error::Error>> {
        let mut buf = BytesMut::from(wire);
        let head = parse_head(&mut buf, &Method::GET)?.ok_or("incomplete")?;
        Ok(head.fields)
    }

    /// The same head into a map, as hyper's client (and this code before) gives it.
    fn mapped(wire: &[u8]) -> Result<HeaderMap, Box<dyn std::error::Error>> {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut fields);
        response.parse(wire)?;
        crate::test_fixtures::map_of(response.headers)
    }

    fn sorted<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<(String, Vec<u8>)> {
        let mut v: Vec<_> = pairs
            .map(|(n, v)| (String::from_utf8_lossy(n).to_ascii_lowercase(), v.to_vec()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_rewrite_relays_what_the_map_rewrite_relays() -> TestResult {
        let region = HeaderValue::from_static("eu-west");
        for wire in HEADS {
            for attempts in [1, 3] {
                let mut map = mapped(wire)?;
                response_headers(&mut map, &region, attempts, false);
                let want = sorted(map.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())));

                let mut fields = parsed(wire)?;
                response_fields(&mut fields, &region, attempts);
                assert_eq!(
                    sorted(fields.relayed()),
                    want,
                    "{}, {attempts} attempts",
                    wire.escape_ascii()
                );

                // Mapped for HTTP/2, the same fields again.
                let mut appended = HeaderMap::new();
                fields.append_to(&mut appended);
                let got = sorted(appended.iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())));
                assert_eq!(got, want, "{} mapped", wire.escape_ascii());
            }
        }
        Ok(())
    }

    #[test]
    fn lookups_and_takes_see_any_case_and_only_what_is_relayed() -> TestResult {
        let mut fields = parsed(HEADS[9])?;
        assert_eq!(fields.get("retry-after"), Some(&b"3"[..]));
        assert_eq!(fields.values("set-cookie").collect::<Vec<_>>(), [&b"a=1"[..], b"b=2"]);
        assert_eq!(fields.take("set-cookie"), Some(HeaderValue::from_static("a=1")));
        assert_eq!(fields.get("set-cookie"), None, "every value is taken");
        assert_eq!(fields.take("set-cookie"), None);
        assert!(
            fields
                .relayed()
                .all(|(name, _)| !name.eq_ignore_ascii_case(b"set-cookie"))
        );
        assert_eq!(fields.get("x-other"), Some(&b"1"[..]));
        Ok(())
    }

    #[test]
    fn the_usual_answer_has_nothing_to_remove() -> TestResult {
        assert!(parsed(HEADS[0])?.seen().nothing_to_remove());
        for wire in &HEADS[1..9] {
            assert!(!parsed(wire)?.seen().nothing_to_remove(), "{}", wire.escape_ascii());
        }
        Ok(())
    }

    /// Names are not checked again (a map's `HeaderName::from_bytes` did): every name httparse
    /// takes, `HeaderName` takes too, so no head refused before is taken now.
    #[test]
    fn httparse_takes_the_name_bytes_a_header_name_takes() {
        for b in 0..=255u8 {
            let name = [b'x', b, b'y'];
            let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
            wire.extend_from_slice(&name);
            wire.extend_from_slice(b": 1\r\n\r\n");
            let mut fields = [httparse::EMPTY_HEADER; 2];
            let mut response = httparse::Response::new(&mut fields);
            if response.parse(&wire).is_ok() {
                let taken = response.headers[0].name.as_bytes();
                assert!(HeaderName::from_bytes(taken).is_ok(), "byte {b:#04x}");
            }
        }
    }

    #[test]
    fn spans_outside_the_head_are_refused() {
        use crate::forward::h1::field_spans;
        let wire = b"X-A: 1\r\n";
        let mut fields = [httparse::EMPTY_HEADER; 2];
        let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(b"X-A: 1\r\n\r\n", &mut fields)
        else {
            panic!("not parsed");
        };
        let mut fields = EndpointFields::boxed();
        // Spans taken from a longer buffer than the head they are given with.
        assert!(field_spans(b"X-A: 1\r\n\r\n", parsed, fields.spans_mut()).is_some());
        assert!(fields.take_in(Bytes::from_static(&wire[..4])).is_none());
    }
}
