//! Header rewriting both ways: hop-by-hop removal, `X-Forwarded-*`, request id and the
//! `x-meridian-*` headers (docs/routing.md, Headers).

use std::net::IpAddr;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::endpoint_fields::EndpointFields;
use super::h1::token_is;
use super::head_fields::FieldMask;
use super::head_fields::HeadFields;
use super::request_fields::{RequestFields, visible};

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_MERIDIAN_COUNTRY: HeaderName = HeaderName::from_static("x-meridian-country");
pub(crate) static X_MERIDIAN_REGION: HeaderName = HeaderName::from_static("x-meridian-region");
pub(crate) static X_MERIDIAN_ATTEMPTS: HeaderName = HeaderName::from_static("x-meridian-attempts");

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// non-standard ones proxies still meet). `Trailer` is end to end and stays: HTTP/1.1
/// sends only the trailer fields it announces, so dropping it would drop gRPC trailers.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
];
const CONNECTION_AT: usize = 0;
const KEEP_ALIVE_AT: usize = 1;
const PROXY_CONNECTION_AT: usize = 2;
const PROXY_AUTHENTICATE_AT: usize = 3;
const PROXY_AUTHORIZATION_AT: usize = 4;

/// Headers a peer's `Connection` header cannot remove: Meridian sets or relies on them,
/// so naming them there would strip what the endpoint or client must see.
static PROTECTED: [HeaderName; 6] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-request-id"),
];

pub(crate) static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub(crate) static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const TE_AT: usize = 5;
const TRANSFER_ENCODING_AT: usize = 6;

/// What one pass over a message's field names found. Most messages carry none of the
/// fields a rewrite removes, and every `remove` or lookup is a hash and a probe (the
/// rewrite bench shows the difference): the removals ask only for what is there.
#[derive(Debug, Default, PartialEq, Eq)]
struct Present {
    hop_by_hop: [bool; HOP_BY_HOP.len()],
    upgrade: bool,
    forwarded: bool,
    real_ip: bool,
    meridian: bool,
    /// The fields the request rewrite appends to or keeps: known from this one pass, not
    /// looked up again (`Connection` cannot name them away, they are `PROTECTED`).
    forwarded_for: bool,
    forwarded_proto: bool,
    request_id: bool,
}

fn scan(headers: &HeaderMap) -> Present {
    let mut present = Present::default();
    for name in headers.keys() {
        present.note(name.as_str());
    }
    present
}

/// [`scan`] over a request's fields, its listed ones too (names in any case).
fn scan_request(headers: &HeaderMap, listed: Option<&HeadFields>) -> Present {
    let mut present = scan(headers);
    if let Some(listed) = listed {
        listed.each_name(|name| present.note_sent(name));
    }
    present
}

/// An `x-meridian-*` name as sent (any case): only Meridian speaks for Meridian.
fn is_meridian(name: &[u8]) -> bool {
    const PREFIX: &[u8] = b"x-meridian-";
    name.get(..PREFIX.len()).is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
}

/// A name that, `_` read as `-`, is one Meridian sets or judges (`X_Forwarded_For`,
/// `x_meridian_country`): CGI-style servers (WSGI, Rack, PHP) fold both spellings into one
/// variable (`HTTP_X_FORWARDED_FOR`), so such a field could stand in for the real one
/// behind Meridian's back. Removed with the `x-meridian-*` fields, as NGINX ignores names
/// with underscores by default. Every such name starts with `x`: most names cost one test.
fn is_alias(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 4] = [b"x-real-ip", b"x-request-id", b"x-forwarded-for", b"x-forwarded-proto"];
    const PREFIX: &[u8] = b"x-meridian-";
    let same = |sent: &[u8], lower: &[u8]| {
        sent.iter()
            .zip(lower)
            .all(|(&n, &l)| n.to_ascii_lowercase() == l || (n == b'_' && l == b'-'))
    };
    // The comparisons fail at the first differing byte; the underscore is looked for last.
    matches!(name.first(), Some(b'x' | b'X'))
        && (NAMES.iter().any(|n| n.len() == name.len() && same(name, n))
            || name.len() >= PREFIX.len() && same(&name[..PREFIX.len()], PREFIX))
        && name.contains(&b'_')
}

impl Present {
    /// Notes one name as sent (any case): its length picks the one name it can be, so most
    /// names cost a `match` and no comparison.
    fn note_sent(&mut self, name: &[u8]) {
        let is = |lower: &[u8]| token_is(name, lower);
        match name.len() {
            2 if is(b"te") => self.hop_by_hop[TE_AT] = true,
            7 if is(b"upgrade") => self.upgrade = true,
            9 if is(b"forwarded") => self.forwarded = true,
            9 if is(b"x-real-ip") => self.real_ip = true,
            10 if is(b"connection") => self.hop_by_hop[CONNECTION_AT] = true,
            10 if is(b"keep-alive") => self.hop_by_hop[KEEP_ALIVE_AT] = true,
            12 if is(b"x-request-id") => self.request_id = true,
            15 if is(b"x-forwarded-for") => self.forwarded_for = true,
            16 if is(b"proxy-connection") => self.hop_by_hop[PROXY_CONNECTION_AT] = true,
            17 if is(b"transfer-encoding") => self.hop_by_hop[TRANSFER_ENCODING_AT] = true,
            17 if is(b"x-forwarded-proto") => self.forwarded_proto = true,
            18 if is(b"proxy-authenticate") => self.hop_by_hop[PROXY_AUTHENTICATE_AT] = true,
            19 if is(b"proxy-authorization") => self.hop_by_hop[PROXY_AUTHORIZATION_AT] = true,
            // Only a name that is none of the above can be an alias of one.
            _ => self.meridian |= is_alias(name),
        }
        self.meridian |= is_meridian(name);
    }

    /// Notes one (lowercase) name. One `match` on the name's text (lengths first, then one
    /// comparison) rather than a `HeaderName` comparison against each list entry in turn:
    /// this runs for every field of every request and response. Only a hop-by-hop name
    /// goes on to find its place in the list.
    fn note(&mut self, name: &str) {
        let present = self;
        match name {
            hop @ ("connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "transfer-encoding") => {
                if let Some(i) = HOP_BY_HOP.iter().position(|h| h.as_str() == hop) {
                    present.hop_by_hop[i] = true;
                }
            }
            "upgrade" => present.upgrade = true,
            "forwarded" => present.forwarded = true,
            "x-real-ip" => present.real_ip = true,
            "x-forwarded-for" => present.forwarded_for = true,
            "x-forwarded-proto" => present.forwarded_proto = true,
            "x-request-id" => present.request_id = true,
            other => present.meridian |= other.starts_with("x-meridian-") || is_alias(other.as_bytes()),
        }
    }
}

/// Removes `name` from the map and the listed fields.
fn remove(headers: &mut HeaderMap, listed: &mut Option<&mut HeadFields>, name: &HeaderName) {
    if !headers.is_empty() {
        headers.remove(name);
    }
    if let Some(listed) = listed {
        listed.drop_named(name.as_str());
    }
}

/// Removes hop-by-hop headers and any header the `Connection` header names (`scanned`: what
/// [`scan`] found). `Upgrade` is removed too unless the caller is bridging an upgrade (then
/// it must travel).
fn remove_hop_by_hop(
    headers: &mut HeaderMap,
    mut listed: Option<&mut HeadFields>,
    keep_upgrade: bool,
    scanned: &Present,
) {
    let present = scanned.hop_by_hop;
    let upgrade = scanned.upgrade;
    // Headers listed in Connection are hop-by-hop for this message only.
    if present[CONNECTION_AT] {
        // `keep-alive` and `close` (nearly every value) name nothing left to remove, so the
        // usual case collects nothing and allocates nothing.
        let named: Vec<HeaderName> = RequestFields::new(listed.as_deref(), headers)
            .values(&header::CONNECTION)
            .filter_map(visible)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|name| !name.eq_ignore_ascii_case("close"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .filter(|name| !HOP_BY_HOP.contains(name))
            .filter(|name| !PROTECTED.contains(name) && !name.as_str().starts_with("x-meridian-"))
            .filter(|name| !(keep_upgrade && name == header::UPGRADE))
            .collect();
        for name in named {
            remove(headers, &mut listed, &name);
        }
    }
    // gRPC needs `te: trailers` end to end; any other TE value is hop-by-hop.
    let te_trailers = present[TE_AT]
        && RequestFields::new(listed.as_deref(), headers)
            .get(&header::TE)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"trailers"));
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        remove(headers, &mut listed, name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if upgrade {
        remove(headers, &mut listed, &header::UPGRADE);
    }
}

/// Removes every `x-meridian-*` header and every [`is_alias`] (`spoofed`: [`scan`] found
/// one), so none can be spoofed to an endpoint or a client.
fn remove_meridian_headers(headers: &mut HeaderMap, listed: Option<&mut HeadFields>, spoofed: bool) {
    if spoofed {
        let names: Vec<HeaderName> = headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-meridian-") || is_alias(k.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in names {
            headers.remove(name);
        }
        if let Some(listed) = listed {
            let mut dropped = FieldMask::default();
            for (i, name, _) in listed.fields() {
                if is_meridian(name) || is_alias(name) {
                    dropped.set(i);
                }
            }
            listed.drop_fields(dropped);
        }
    }
}

/// What the request rewrite needs to know about the connection and the decision.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The address of the connection's peer, appended to `X-Forwarded-For`.
    pub peer: IpAddr,
    /// The peer is a trusted proxy: its `X-Forwarded-For`, `Forwarded` and `X-Real-IP` stay.
    pub peer_trusted: bool,
    /// "http" or "https": how the client reached Meridian.
    pub proto: &'static str,
    /// The client's ISO country code for `x-meridian-country` (`XX` when unlocated).
    pub country: &'a str,
}

/// The fields Meridian adds to a request for its endpoint. They are kept beside the client's
/// map, not put into it: an insert is a hash and a probe, four for every request, while the
/// encoder writes them for the cost of their bytes;
/// a trusted peer's `X-Forwarded-For` chain is written as the encoder meets it, with the
/// peer appended, not joined into a new value first. Whatever hands the request on sends
/// them in place of the client's fields they supersede ([`AddedFields::apply`] for a map,
/// the HTTP/1.1 encoder as it writes), and what reads the request as its endpoint will see
/// it asks [`SentFields`].
#[derive(Debug, Clone)]
pub struct AddedFields {
    /// The peer's address: the last hop of `X-Forwarded-For`.
    pub peer: HeaderValue,
    /// A trusted peer sent `X-Forwarded-For`: the peer is appended to that chain. Else
    /// `X-Forwarded-For` is the peer alone, in place of any the client sent.
    pub appends: bool,
    /// The chain with the peer appended as one value, made when asked for as one.
    joined: OnceLock<HeaderValue>,
    /// `X-Forwarded-Proto`, unless a trusted peer sent its own.
    pub forwarded_proto: Option<HeaderValue>,
    /// `X-Request-Id` when Meridian made one: the client sent none, or one unfit to keep
    /// (empty, over 200 bytes), which it supersedes.
    pub request_id: Option<HeaderValue>,
    /// `x-meridian-country` (any the client sent is gone with the other `x-meridian-*`).
    pub country: HeaderValue,
    /// The request asks to switch protocols: its `Upgrade` travels, with `Connection:
    /// upgrade`, and only over HTTP/1.1.
    pub upgrade: bool,
}

impl AddedFields {
    /// The value of `name` as sent, when Meridian sets it; `client`: the client's fields
    /// (where a chain the peer is appended to comes from).
    pub fn value<'s>(&'s self, name: &HeaderName, client: RequestFields<'_>) -> Option<&'s HeaderValue> {
        match name.as_str() {
            "x-forwarded-for" => Some(self.forwarded_for(client)),
            "x-forwarded-proto" => self.forwarded_proto.as_ref(),
            "x-request-id" => self.request_id.as_ref(),
            "x-meridian-country" => Some(&self.country),
            _ => None,
        }
    }

    /// `X-Forwarded-For` as one value: the client's chain joined, with the peer appended.
    fn forwarded_for(&self, client: RequestFields<'_>) -> &HeaderValue {
        if !self.appends {
            return &self.peer;
        }
        self.joined.get_or_init(|| {
            let len = client.values(&X_FORWARDED_FOR).map(|v| v.len() + 2).sum::<usize>() + self.peer.len();
            // Sized exactly: the buffer becomes the value's storage, not copied again.
            let mut chain = Vec::with_capacity(len);
            for v in client.values(&X_FORWARDED_FOR) {
                chain.extend_from_slice(v);
                chain.extend_from_slice(b", ");
            }
            chain.extend_from_slice(self.peer.as_bytes());
            HeaderValue::from_maybe_shared(Bytes::from(chain)).unwrap_or_else(|_| self.peer.clone())
        })
    }

    /// The added fields other than `X-Forwarded-For` (which the encoder writes where it
    /// meets the client's chain), in the order they are sent.
    pub fn others(&self) -> impl Iterator<Item = (&'static HeaderName, &HeaderValue)> {
        [
            (&X_FORWARDED_PROTO, self.forwarded_proto.as_ref()),
            (&X_REQUEST_ID, self.request_id.as_ref()),
            (&X_MERIDIAN_COUNTRY, Some(&self.country)),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| (name, v)))
    }

    /// Puts the added fields into `headers` in place of the client's (a request built for
    /// hyper's clients).
    pub fn apply(&self, headers: &mut HeaderMap) {
        let forwarded_for = self.forwarded_for((&*headers).into()).clone();
        headers.insert(&X_FORWARDED_FOR, forwarded_for);
        for (name, value) in self.others() {
            headers.insert(name, value.clone());
        }
    }
}

/// A request's fields as its endpoint will see them: the client's (rewritten) with
/// Meridian's additions in place of what they supersede. For what reads a request after
/// the rewrite (rate-limit keys, session affinity): a client cannot set what Meridian sets.
#[derive(Debug, Clone, Copy)]
pub struct SentFields<'a> {
    /// The client's fields, rewritten.
    pub client: RequestFields<'a>,
    /// What Meridian adds to them (`None`: nothing, or not yet).
    pub added: Option<&'a AddedFields>,
}

impl<'a> SentFields<'a> {
    /// Fields not rewritten yet, or with nothing added (tests, tools).
    pub fn client_only(client: &'a HeaderMap) -> SentFields<'a> {
        SentFields {
            client: client.into(),
            added: None,
        }
    }

    /// The first value of `name`, as sent.
    pub fn get(&self, name: &HeaderName) -> Option<&'a [u8]> {
        // Each superseded field has its added value: nothing falls through to what it replaced.
        self.added
            .and_then(|a| a.value(name, self.client))
            .map(HeaderValue::as_bytes)
            .or_else(|| self.client.get(name))
    }
}

/// Rewrites a request's headers for an endpoint in place: the request id in force, the
/// map as [`request_fields`] leaves it with the added fields applied. For tests and tools;
/// the proxy keeps the added fields apart.
pub fn request_headers(headers: &mut HeaderMap, fwd: &Forwarding<'_>, upgrade: bool) -> HeaderValue {
    let (request_id, added) = request_fields(headers, fwd, upgrade);
    added.apply(headers);
    request_id
}

/// Rewrites a request's headers for an endpoint: hop-by-hop and spoofed fields removed from
/// `headers`, the fields Meridian adds returned apart, with the request id in force.
pub fn request_fields(headers: &mut HeaderMap, fwd: &Forwarding<'_>, upgrade: bool) -> (HeaderValue, AddedFields) {
    rewrite_request((headers, None), fwd, upgrade)
}

/// [`request_fields`] over a request's map and its listed fields (Meridian's HTTP/1.1
/// reading keeps a client's fields over its head's bytes): what is removed is removed from
/// both, what is set goes into the map.
pub(crate) fn rewrite_request(
    (headers, mut listed): (&mut HeaderMap, Option<&mut HeadFields>),
    fwd: &Forwarding<'_>,
    upgrade: bool,
) -> (HeaderValue, AddedFields) {
    let present = scan_request(headers, listed.as_deref());
    remove_hop_by_hop(headers, listed.as_deref_mut(), upgrade, &present);
    remove_meridian_headers(headers, listed.as_deref_mut(), present.meridian);
    if !fwd.peer_trusted {
        // Like X-Forwarded-For, these name the client only when a trusted proxy says so.
        if present.forwarded {
            remove(headers, &mut listed, &FORWARDED);
        }
        if present.real_ip {
            remove(headers, &mut listed, &X_REAL_IP);
        }
    }

    let peer = ip_value(fwd.peer);
    let appends = fwd.peer_trusted && present.forwarded_for;

    let forwarded_proto = if fwd.peer_trusted && present.forwarded_proto {
        None
    } else {
        Some(HeaderValue::from_static(fwd.proto))
    };

    let sent_id = if present.request_id {
        RequestFields::new(listed.as_deref(), headers).get_value(&X_REQUEST_ID)
    } else {
        None
    };
    let (request_id, made_id) = match sent_id {
        Some(id) if !id.is_empty() && id.len() <= 200 => (id, None),
        _ => {
            let id = new_request_id();
            (id.clone(), Some(id))
        }
    };
    // The country table's own spelling is static: the value points at it, nothing is copied.
    let country = crate::geo::Country::parse(fwd.country)
        .and_then(|c| c.info())
        .and_then(|info| HeaderValue::from_maybe_shared(Bytes::from_static(info.code.as_bytes())).ok())
        .or_else(|| HeaderValue::from_str(fwd.country).ok())
        .unwrap_or(HeaderValue::from_static("XX"));
    let added = AddedFields {
        peer,
        appends,
        joined: OnceLock::new(),
        forwarded_proto,
        request_id: made_id,
        country,
        upgrade,
    };
    (request_id, added)
}

/// Rewrites a response's headers for the client.
pub fn response_headers(headers: &mut HeaderMap, region: &HeaderValue, attempts: u32, upgrade: bool) {
    let present = scan(headers);
    if present.hop_by_hop[TRANSFER_ENCODING_AT] {
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and the body was read
        // chunked; relayed with the stale length, a client would keep a prefix of it.
        headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(headers, None, upgrade, &present);
    // Only Meridian speaks for Meridian: an endpoint cannot fake a region or attempt count.
    remove_meridian_headers(headers, None, present.meridian);
    headers.insert(&X_MERIDIAN_REGION, region.clone());
    if attempts > 1 {
        headers.insert(&X_MERIDIAN_ATTEMPTS, HeaderValue::from(attempts));
    }
}

/// [`response_headers`] for fields still over their head's bytes: the same fields dropped,
/// the same added (a test holds the two to each other). Not for a `101`: Meridian's own
/// HTTP/1.1 reading refuses one (upgrades go through hyper), so `Upgrade` is always dropped.
pub(crate) fn response_fields(fields: &mut EndpointFields, region: &HeaderValue, attempts: u32) {
    let seen = fields.seen();
    let attempts = (attempts > 1).then(|| HeaderValue::from(attempts));
    if seen.nothing_to_remove() {
        // The usual answer: nothing to look at twice.
        fields.add(false, region.clone(), attempts);
        return;
    }
    let framing = seen.framing;
    let te_trailers = framing.te && fields.get("te").is_some_and(|v| v.eq_ignore_ascii_case(b"trailers"));
    // Names the `Connection` field lists are hop-by-hop for this message only (values that
    // are not visible ASCII are skipped, as `HeaderValue::to_str` skips them above).
    let named_by_connection = |name: &[u8]| {
        framing.connection
            && !PROTECTED.iter().any(|p| token_is(name, p.as_str().as_bytes()))
            && fields
                .values("connection")
                .filter(|v| v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)))
                .flat_map(|v| v.split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|token| !token.eq_ignore_ascii_case(b"close"))
                .any(|token| token.eq_ignore_ascii_case(name))
    };
    let mut dropped = FieldMask::default();
    for (i, name, _) in fields.fields() {
        let hop = HOP_BY_HOP.iter().any(|h| token_is(name, h.as_str().as_bytes())) || token_is(name, b"upgrade");
        // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length (see `response_headers`).
        let stale_length = framing.transfer_encoding && token_is(name, b"content-length");
        let meridian = seen.meridian && name.len() >= 11 && name[..11].eq_ignore_ascii_case(b"x-meridian-");
        if hop || stale_length || meridian || named_by_connection(name) {
            dropped.set(i);
        }
    }
    fields.drop_fields(dropped);
    fields.add(te_trailers, region.clone(), attempts);
}

/// The peer's address as a field value. A worker's connections mostly come from the same few
/// peers (the load balancers in front), so its last one is kept: a clone shares it, where
/// writing and copying it out again cost ~300 instructions a request.
fn ip_value(ip: IpAddr) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(IpAddr, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((seen, value)) if *seen == ip => value.clone(),
        _ => {
            let value = ip_text(ip);
            *last = Some((ip, value.clone()));
            value
        }
    })
}

fn ip_text(ip: IpAddr) -> HeaderValue {
    let mut buf = [0u8; 48];
    let n = match ip {
        IpAddr::V4(v4) => ipv4_text(v4, &mut buf),
        IpAddr::V6(_) => {
            use std::io::Write;
            let mut w = &mut buf[..];
            let _ = write!(w, "{ip}");
            48 - w.len()
        }
    };
    // Shared from the start: a copied value would allocate its shared form on the first
    // clone.
    let text = Bytes::from_owner(buf).slice(..n);
    HeaderValue::from_maybe_shared(text).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Dotted decimal into `out`, returning its length: the formatter's `Display` costs about
/// 950 instructions a request (callgrind), this a tenth of that.
fn ipv4_text(ip: std::net::Ipv4Addr, out: &mut [u8; 48]) -> usize {
    let mut n = 0;
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            out[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            out[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        out[n] = b'0' + octet % 10;
        n += 1;
    }
    n
}

/// 128 random bits as 32 hex digits.
pub(crate) fn new_request_id() -> HeaderValue {
    let id = fastrand::u128(..);
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&hex_digits((id >> 64) as u64));
    out[16..].copy_from_slice(&hex_digits(id as u64));
    // Hex digits are always a valid header value. Owned by a shared `Bytes` from the start:
    // the id goes to the endpoint and to the access record, and cloning a copied one would
    // allocate its shared form on the first clone.
    HeaderValue::from_maybe_shared(Bytes::from_owner(out)).unwrap_or(HeaderValue::from_static("0"))
}

/// `x`'s sixteen lowercase hex digits, most significant first, worked out in one 128-bit
/// word rather than a table look-up a digit (~25 instructions against ~110 for an id).
fn hex_digits(x: u64) -> [u8; 16] {
    const fn each_byte(b: u8) -> u128 {
        u128::from_ne_bytes([b; 16])
    }
    // Spread the digits apart, halving the group each step, until each nibble has a byte.
    let mut v = u128::from(x);
    v = (v | v << 32) & 0x0000_0000_ffff_ffff_0000_0000_ffff_ffff;
    v = (v | v << 16) & 0x0000_ffff_0000_ffff_0000_ffff_0000_ffff;
    v = (v | v << 8) & 0x00ff_00ff_00ff_00ff_00ff_00ff_00ff_00ff;
    v = (v | v << 4) & each_byte(0x0f);
    // A byte is 10..=15 exactly when adding 6 carries into its high nibble (never further:
    // 15 + 6 < 256); those skip from after `9` to `a`.
    let letters = ((v + each_byte(6)) >> 4) & each_byte(1);
    (v + each_byte(b'0') + letters * u128::from(b'a' - b'9' - 1)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// The endpoint-fields rewrite skips its pass when the head's first look found nothing
    /// to remove: every name it removes must be one that look notices, in any case.
    #[test]
    fn names_as_sent_are_noted_as_their_lowercase() {
        for (at, name) in [
            (CONNECTION_AT, "connection"),
            (KEEP_ALIVE_AT, "keep-alive"),
            (PROXY_CONNECTION_AT, "proxy-connection"),
            (PROXY_AUTHENTICATE_AT, "proxy-authenticate"),
            (PROXY_AUTHORIZATION_AT, "proxy-authorization"),
            (TE_AT, "te"),
            (TRANSFER_ENCODING_AT, "transfer-encoding"),
        ] {
            assert_eq!(HOP_BY_HOP[at], name);
        }
        let names = HOP_BY_HOP.iter().map(HeaderName::as_str).chain([
            "upgrade",
            "forwarded",
            "x-real-ip",
            "x-request-id",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-meridian-region",
            "x-meridian-",
            "x-meridians",
            "x-meridian-a-rather-long-field-name",
            "content-type",
            "user-agent",
            "x-stainless-runtime",
            "x-real-ips",
        ]);
        for name in names {
            let mut want = Present::default();
            want.note(name);
            let mixed: String = name
                .chars()
                .enumerate()
                .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c })
                .collect();
            for sent in [name.to_string(), name.to_ascii_uppercase(), mixed] {
                let mut got = Present::default();
                got.note_sent(sent.as_bytes());
                assert_eq!(got, want, "{sent}");
            }
        }
    }

    #[test]
    fn every_field_the_response_rewrite_removes_is_noticed_when_the_head_is_taken_in() {
        let names =
            HOP_BY_HOP
                .iter()
                .map(HeaderName::as_str)
                .chain(["upgrade", "x-meridian-region", "x-meridian-anything"]);
        for name in names {
            for written in [name.to_string(), name.to_ascii_uppercase()] {
                let block = format!("{written}: v\r\ncontent-length: 0\r\n\r\n");
                let fields = EndpointFields::of_block(block.as_bytes());
                assert!(!fields.seen().nothing_to_remove(), "{written}");
            }
        }
    }

    #[test]
    fn the_scan_finds_each_hop_by_hop_field_at_its_own_place() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            let found = scan(&h).hop_by_hop;
            let expected: Vec<bool> = (0..HOP_BY_HOP.len()).map(|j| j == i).collect();
            assert_eq!(found.to_vec(), expected, "{name}");
        }
        let found = scan(&headers(&[
            ("Upgrade", "websocket"),
            ("Forwarded", "for=1.2.3.4"),
            ("X-Real-IP", "1.2.3.4"),
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-Request-Id", "abc"),
            ("X-Meridian-Region", "spoofed"),
        ]));
        let flags = [
            found.upgrade,
            found.forwarded,
            found.real_ip,
            found.forwarded_for,
            found.forwarded_proto,
            found.request_id,
            found.meridian,
        ];
        assert_eq!(flags, [true; 7]);
        assert_eq!(found.hop_by_hop, [false; HOP_BY_HOP.len()]);
        let none = scan(&headers(&[("Content-Type", "text/plain"), ("X-Meridian", "not ours")]));
        assert!(!none.meridian && !none.request_id && !none.upgrade);
    }

    #[test]
    fn underscore_spellings_of_meridians_fields_are_aliases() {
        let cases: &[(&str, bool)] = &[
            ("X_Forwarded_For", true),
            ("x-forwarded_for", true),
            ("x_forwarded_proto", true),
            ("X_Real_IP", true),
            ("x_request_id", true),
            ("x_meridian_country", true),
            ("X-Meridian_Region", true),
            // The real spellings are not aliases: they are handled as themselves.
            ("x-forwarded-for", false),
            ("x-meridian-country", false),
            // Other names with underscores pass (NGINX would drop them too, but they stand
            // in for nothing Meridian vouches for).
            ("x_custom_trace", false),
            ("x_forwarded_fo", false),
            ("my_header", false),
            ("content-type", false),
        ];
        for (name, alias) in cases {
            assert_eq!(is_alias(name.as_bytes()), *alias, "{name}");
        }
        // Removed from a map and from listed fields alike.
        let mut h = headers(&[
            ("x_forwarded_for", "1.2.3.4"),
            ("x_meridian_country", "FR"),
            ("accept", "*/*"),
        ]);
        let present = scan(&h);
        assert!(present.meridian);
        remove_meridian_headers(&mut h, None, present.meridian);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    fn header<'h>(h: &'h HeaderMap, name: &str) -> Option<&'h str> {
        h.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("content-type", "application/json"),
        ]);
        let present = scan(&h);
        remove_hop_by_hop(&mut h, None, false, &present);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);

        let mut h = headers(&[("te", "trailers"), ("connection", "upgrade"), ("upgrade", "websocket")]);
        let present = scan(&h);
        remove_hop_by_hop(&mut h, None, true, &present);
        assert_eq!(header(&h, "te"), Some("trailers"));
        assert_eq!(header(&h, "upgrade"), Some("websocket"));
        assert_eq!(header(&h, "connection"), Some("upgrade"));
    }

    #[test]
    fn ipv4_text_is_dotted_decimal() {
        let cases = [
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [10, 0, 0, 1],
            [100, 20, 3, 0],
            [1, 99, 109, 250],
        ];
        for octets in cases {
            let ip = std::net::Ipv4Addr::from(octets);
            let mut buf = [0u8; 48];
            let n = ipv4_text(ip, &mut buf);
            assert_eq!(&buf[..n], ip.to_string().as_bytes());
        }
    }

    proptest::proptest! {
        #[test]
        fn ipv4_text_matches_display(bits: u32) {
            let ip = std::net::Ipv4Addr::from(bits);
            let mut buf = [0u8; 48];
            let n = ipv4_text(ip, &mut buf);
            let shown = ip.to_string();
            proptest::prop_assert_eq!(&buf[..n], shown.as_bytes());
        }
    }

    #[test]
    fn forwarded_headers_by_trust() -> TestResult {
        type Case<'a> = (bool, &'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: [Case<'_>; 4] = [
            (
                true,
                &[("x-forwarded-for", "81.2.69.142"), ("x-forwarded-proto", "https")],
                "81.2.69.142, 127.0.0.1",
                "https",
            ),
            (true, &[], "127.0.0.1", "http"),
            (
                false,
                &[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-proto", "https")],
                "127.0.0.1",
                "http",
            ),
            (
                true,
                &[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "8.8.8.8")],
                "1.1.1.1, 8.8.8.8, 127.0.0.1",
                "http",
            ),
        ];
        for (trusted, input, xff, proto) in cases {
            let mut h = headers(input);
            h.insert("x-meridian-region", HeaderValue::from_static("spoofed"));
            h.insert("x-meridian-anything", HeaderValue::from_static("spoofed"));
            let fwd = Forwarding {
                peer: "127.0.0.1".parse()?,
                peer_trusted: trusted,
                proto: "http",
                country: "GB",
            };
            let id = request_headers(&mut h, &fwd, false);
            assert_eq!(header(&h, "x-forwarded-for"), Some(xff), "{input:?}");
            assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
            assert_eq!(header(&h, "x-forwarded-proto"), Some(proto), "{input:?}");
            assert_eq!(header(&h, "x-meridian-country"), Some("GB"));
            assert!(h.get("x-meridian-region").is_none());
            assert!(h.get("x-meridian-anything").is_none());
            assert_eq!(id.len(), 32);
            assert_eq!(h.get("x-request-id"), Some(&id));
        }
        let mut h = headers(&[("x-request-id", "abc-123")]);
        let fwd = Forwarding {
            peer: "::1".parse()?,
            peer_trusted: false,
            proto: "https",
            country: "XX",
        };
        assert_eq!(request_headers(&mut h, &fwd, false), "abc-123");
        assert_eq!(header(&h, "x-forwarded-for"), Some("::1"));
        Ok(())
    }

    #[test]
    fn sent_fields_read_what_the_endpoint_gets() -> TestResult {
        let cases: &[(bool, &[(&str, &str)])] = &[
            (
                false,
                &[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-proto", "https"),
                    ("x-other", "1"),
                ],
            ),
            (
                true,
                &[
                    ("x-forwarded-for", "81.2.69.142"),
                    ("x-forwarded-for", "10.0.0.1, 10.0.0.2"),
                ],
            ),
            (true, &[("x-forwarded-proto", "https"), ("x-request-id", "abc")]),
            (false, &[("x-meridian-country", "US"), ("x-request-id", "kept")]),
        ];
        for (trusted, input) in cases {
            let fwd = Forwarding {
                peer: "127.0.0.1".parse()?,
                peer_trusted: *trusted,
                proto: "http",
                country: "GB",
            };
            let mut kept = headers(input);
            let (_, added) = request_fields(&mut kept, &fwd, false);
            let mut whole = headers(input);
            request_headers(&mut whole, &fwd, false);
            let sent = SentFields {
                client: (&kept).into(),
                added: Some(&added),
            };
            for name in [
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-meridian-country",
                "x-other",
                "host",
            ] {
                let name = HeaderName::from_static(name);
                assert_eq!(
                    sent.get(&name),
                    whole.get(&name).map(HeaderValue::as_bytes),
                    "{input:?} {name}"
                );
            }
            let client_id = input.iter().find(|(n, _)| *n == "x-request-id").map(|(_, v)| *v);
            if let Some(id) = client_id {
                assert_eq!(sent.get(&X_REQUEST_ID), Some(id.as_bytes()));
            }
        }
        Ok(())
    }

    #[test]
    fn trust_leaks_are_closed() -> TestResult {
        // A client's Connection header cannot strip what Meridian sets or relies on.
        let mut h = headers(&[
            (
                "connection",
                "host, content-length, x-forwarded-for, x-request-id, x-meridian-country, x-other",
            ),
            ("host", "api.example"),
            ("content-length", "5"),
            ("x-forwarded-for", "81.2.69.142"),
            ("x-request-id", "abc"),
            ("x-other", "1"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        let mut fwd = Forwarding {
            peer: "127.0.0.1".parse()?,
            peer_trusted: true,
            proto: "http",
            country: "GB",
        };
        let mut trusted = h.clone();
        request_headers(&mut trusted, &fwd, false);
        assert_eq!(header(&trusted, "host"), Some("api.example"));
        assert_eq!(header(&trusted, "content-length"), Some("5"));
        assert_eq!(header(&trusted, "x-forwarded-for"), Some("81.2.69.142, 127.0.0.1"));
        assert_eq!(header(&trusted, "x-request-id"), Some("abc"));
        assert_eq!(header(&trusted, "x-meridian-country"), Some("GB"));
        assert!(trusted.get("x-other").is_none());
        assert_eq!(header(&trusted, "forwarded"), Some("for=6.6.6.6"));
        assert_eq!(header(&trusted, "x-real-ip"), Some("6.6.6.6"));
        fwd.peer_trusted = false;
        request_headers(&mut h, &fwd, false);
        assert!(h.get("forwarded").is_none());
        assert!(h.get("x-real-ip").is_none());

        // Responses: no stale length beside chunked framing, no endpoint-made x-meridian-*.
        let mut r = headers(&[
            ("content-length", "5"),
            ("transfer-encoding", "chunked"),
            ("x-meridian-attempts", "7"),
            ("x-meridian-region", "spoofed"),
            ("x-meridian-anything", "1"),
        ]);
        response_headers(&mut r, &HeaderValue::from_static("us-east"), 1, false);
        assert!(r.get("content-length").is_none());
        assert!(r.get("transfer-encoding").is_none());
        assert!(r.get("x-meridian-attempts").is_none());
        assert!(r.get("x-meridian-anything").is_none());
        assert_eq!(header(&r, "x-meridian-region"), Some("us-east"));
        Ok(())
    }

    #[test]
    fn request_ids_are_unique_hex() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        // All 128 bits, most significant digit first, zero-padded.
        for seed in [1, 7, 42] {
            fastrand::seed(seed);
            let id = new_request_id();
            fastrand::seed(seed);
            assert_eq!(id, format!("{:032x}", fastrand::u128(..)).as_str());
        }
    }

    #[test]
    fn peer_values_follow_the_peer() {
        for ip in [
            "127.0.0.1",
            "127.0.0.1",
            "10.0.0.2",
            "::1",
            "255.255.255.255",
            "0.0.0.0",
            "2001:db8::7",
            "127.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip), ip.to_string().as_str());
        }
    }

    #[test]
    fn hex_digits_match_the_formatter() {
        let mut cases = vec![0, 1, 9, 10, 15, 16, 0xa5, u64::MAX, u64::MAX - 1, 0x0123_4567_89ab_cdef];
        cases.extend((0..16).map(|d| 0x1111_1111_1111_1111 * d));
        cases.extend((0..1000).map(|_| fastrand::u64(..)));
        for x in cases {
            assert_eq!(
                std::str::from_utf8(&hex_digits(x)).unwrap(),
                format!("{x:016x}"),
                "{x:#x}"
            );
        }
    }
}
