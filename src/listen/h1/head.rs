//! The pure half of the HTTP/1.1 server: a request head parsed off the front of the read
//! buffer (with RFC 9112's framing rules, as hyper applies them), and a response head
//! written with the framing Meridian chooses. No I/O here; the table tests pin each rule.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Uri, Version};

use crate::forward::endpoint_fields::{EndpointFields, shadowed};
use crate::forward::h1::{
    BodyState, Chunk, FieldSpan, FieldSpans, FieldValues, FramingError, FramingFields, Step, chunked_last, decode,
    field_spans, fields_of, has_token, has_token_in, parse_decimal, token_is,
};
use crate::forward::head_fields::{FieldMask, HeadFields};
use crate::forward::inbound::ClientHead;
use crate::forward::request_fields::RequestFields;

/// The longest request target accepted at all (hyper's limit); `server.max_uri_bytes` is
/// applied later, with Meridian's JSON answer.
const MAX_URI_LEN: usize = u16::MAX as usize - 1;

/// Why a request head was refused; the connection answers with [`HeadError::status`] and
/// closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// The request line or a header is not HTTP/1.1 (obs-fold, a space before the colon,
    /// a bad token, a bare LF).
    #[error("malformed request head")]
    Malformed,
    /// A request target in a form its method does not take (RFC 9112 §3.2): authority-form
    /// other than for CONNECT, `*` other than for OPTIONS.
    #[error("invalid request target")]
    Target,
    /// An HTTP/1.1 request with neither a `Host` field nor an absolute-form target
    /// (RFC 9112 §3.2).
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    /// The head passed `server.max_header_bytes` or `server.max_headers`.
    #[error("request head too large")]
    TooLarge,
    /// The request target passed 64 KiB.
    #[error("request target too long")]
    UriTooLong,
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("unsupported HTTP version")]
    Version,
    /// Content-Length values that disagree or do not parse.
    #[error("invalid content-length")]
    ContentLength,
    /// Transfer-Encoding on HTTP/1.0, or with a last coding other than chunked.
    #[error("invalid transfer-encoding")]
    TransferEncoding,
}

impl HeadError {
    /// The status answered (as hyper answers the same refusals).
    pub fn status(self) -> StatusCode {
        match self {
            HeadError::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UriTooLong => StatusCode::URI_TOO_LONG,
            HeadError::Version => StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            HeadError::Malformed
            | HeadError::Target
            | HeadError::MissingHost
            | HeadError::ContentLength
            | HeadError::TransferEncoding => StatusCode::BAD_REQUEST,
        }
    }
}

/// A parsed request head: the request (its body still to read) and how to read the body.
#[derive(Debug)]
pub(crate) struct RequestHead {
    /// The request's parts and its fields over its head's bytes
    /// (`forward::request_fields`); its map is empty when the fields are listed, and holds
    /// them for a head of more fields than a list marks.
    pub(crate) request: Box<ClientHead>,
    /// `Length(n)`, `Chunked` or `Done` (a request body is never delimited by the close).
    pub(crate) body: BodyState,
    /// The client allows another request on this connection.
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a `100` before it sends the body.
    pub(crate) expect_continue: bool,
    /// An HTTP/1.1 upgrade (`Upgrade` with the `upgrade` token in `Connection`).
    pub(crate) upgrade: bool,
    /// `TE: trailers`: a chunked response may end with trailers.
    pub(crate) takes_trailers: bool,
}

impl RequestHead {
    /// The request's fields, listed or in its map.
    #[cfg(test)]
    pub(crate) fn fields(&self) -> RequestFields<'_> {
        RequestFields::new(self.request.listed.as_ref(), &self.request.parts.headers)
    }
}

/// Parses a request head off the front of `buf`; `None` while it is incomplete. The fields
/// and the target share the head's memory.
pub(crate) fn parse_request(
    buf: &mut BytesMut,
    max_head: usize,
    max_headers: usize,
) -> Result<Option<RequestHead>, HeadError> {
    // Filled where they will live, the parts and the fields (their spans by `locate`) in
    // the block that carries them to the end of the request.
    let mut request = ClientHead::for_parser();
    let ClientHead { parts, listed } = &mut *request;
    let fields = listed.get_or_insert_with(HeadFields::new);
    let Some(Located {
        len,
        method,
        version,
        target,
    }) = locate(buf, max_head, max_headers, fields.spans_mut())?
    else {
        return Ok(None);
    };
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target)).map_err(|_| HeadError::Malformed)?;
    let form = TargetForm::of(&uri);
    let mut present = FramingFields::default();
    // Noted with the framing fields, in the pass that takes them in.
    let mut has_host = false;
    // The parts' own map stays empty unless the fields do not fit the list.
    if fields.spans_mut().len() <= FieldMask::BITS {
        let taken = fields.take_in(head, |_, name| {
            present.note_sent(name);
            has_host |= name.len() == 4 && token_is(name, b"host");
        });
        if !taken {
            return Err(HeadError::Malformed);
        }
    } else {
        // More fields than a list marks (a configuration allowing over 128): a map.
        let (headers, noted) =
            fields_of(&head, fields.spans_mut(), ADDED_REQUEST_FIELDS).ok_or(HeadError::Malformed)?;
        (parts.headers, present) = (headers, noted);
        has_host = parts.headers.contains_key(header::HOST);
        *listed = None;
    }
    let map = &mut parts.headers;
    let framing = match listed.as_ref() {
        Some(fields) => request_framing(version, fields, present)?,
        None => request_framing(version, &*map, present)?,
    };
    form.admits(&method, version, has_host)?;
    let view = RequestFields::new(listed.as_ref(), &*map);
    // Both asked of the noted fields first: most requests carry neither.
    let upgrade = version == Version::HTTP_11
        && present.upgrade
        && present.connection
        && crate::forward::upgrade::is_upgrade(view);
    let takes_trailers = present.te && view.values(&header::TE).any(|v| has_token_in(v, b"trailers"));
    if framing.drop_content_length {
        map.remove(header::CONTENT_LENGTH);
        if let Some(fields) = listed.as_mut() {
            fields.drop_named("content-length");
        }
    }
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    Ok(Some(RequestHead {
        request,
        body: framing.body,
        keep_alive: framing.keep_alive,
        expect_continue: framing.expect_continue,
        upgrade,
        takes_trailers,
    }))
}

/// Request fields the proxy may put into the map before forwarding: `traceparent` when it
/// traces, `Host` from an absolute-form target. The forwarding fields it adds are written
/// by the encoder, not put into the map (`rewrite::AddedFields`).
const ADDED_REQUEST_FIELDS: usize = 2;

/// Header field slots on the stack; a configuration allowing more uses the heap.
const INLINE_FIELDS: usize = 128;

/// A complete head's parts, as offsets into the buffer (its fields' in `locate`'s `spans`).
struct Located {
    len: usize,
    method: Method,
    version: Version,
    target: Range<usize>,
}

/// Runs `httparse` over `buf`, the fields' offsets into `spans`; `None` while the head is
/// incomplete.
fn locate(
    buf: &[u8],
    max_head: usize,
    max_headers: usize,
    spans: &mut FieldSpans,
) -> Result<Option<Located>, HeadError> {
    // Uninitialised slots, as in the response parser: zeroing them costs more than parsing.
    let mut inline = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; INLINE_FIELDS];
    let mut heap = Vec::new();
    let fields = if max_headers <= INLINE_FIELDS {
        &mut inline[..max_headers]
    } else {
        heap.resize(max_headers, MaybeUninit::uninit());
        &mut heap[..]
    };
    let mut parsed = httparse::Request::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config.parse_request_with_uninit_headers(&mut parsed, buf, fields) {
        Ok(httparse::Status::Complete(len)) if len > max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(httparse::Error::Version) => return Err(HeadError::Version),
        Err(_) => return Err(HeadError::Malformed),
    };
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version) else {
        return Err(HeadError::Malformed);
    };
    if target.len() > MAX_URI_LEN {
        return Err(HeadError::UriTooLong);
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Malformed)?;
    let version = if minor == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
    // Offsets: the head is frozen next, and the target and values become slices of it.
    let start = target.as_ptr() as usize - buf.as_ptr() as usize;
    let target = start..start + target.len();
    field_spans(buf, parsed.headers, spans).ok_or(HeadError::TooLarge)?;
    if !lines_end_in_crlf(buf, len, spans) {
        return Err(HeadError::Malformed);
    }
    Ok(Some(Located {
        len,
        method,
        version,
        target,
    }))
}

/// Whether every line of the complete head `buf[..len]` ends in CRLF. httparse also takes a
/// bare LF (RFC 9112 §2.2 lets a recipient); Meridian refuses it, as it refuses obs-fold.
/// Only the ends of lines are looked at, found without a scan: each field's line starts
/// at its name, which httparse found after an LF, and the head ends with an empty line.
fn lines_end_in_crlf(buf: &[u8], len: usize, spans: &[FieldSpan]) -> bool {
    // The byte two before a line's start: the CR of the line before it.
    let cr_before = |start: usize| start.checked_sub(2).and_then(|i| buf.get(i)) == Some(&b'\r');
    spans.iter().all(|span| cr_before(span.name().start)) && cr_before(len) && len.checked_sub(2).is_some_and(cr_before)
}

/// The form of a request target (RFC 9112 §3.2), as it parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetForm {
    /// `/path?query`.
    Origin,
    /// `http://authority/path?query`: its authority stands in for `Host`.
    Absolute,
    /// `host:port`, for CONNECT.
    Authority,
    /// `*`, for a server-wide OPTIONS.
    Asterisk,
}

impl TargetForm {
    fn of(uri: &Uri) -> TargetForm {
        match (uri.scheme(), uri.authority()) {
            (Some(_), _) => TargetForm::Absolute,
            (None, Some(_)) => TargetForm::Authority,
            (None, None) if uri.path() == "*" => TargetForm::Asterisk,
            (None, None) => TargetForm::Origin,
        }
    }

    /// Whether `method` may take a target of this form, on a head with `Host` or not.
    /// CONNECT is let through, whatever its target, to be answered `405` with the rest.
    fn admits(self, method: &Method, version: Version, has_host: bool) -> Result<(), HeadError> {
        if *method == Method::CONNECT {
            return Ok(());
        }
        match self {
            TargetForm::Authority => return Err(HeadError::Target),
            TargetForm::Asterisk if *method != Method::OPTIONS => return Err(HeadError::Target),
            TargetForm::Absolute | TargetForm::Origin | TargetForm::Asterisk => {}
        }
        if version == Version::HTTP_11 && !has_host && self != TargetForm::Absolute {
            return Err(HeadError::MissingHost);
        }
        Ok(())
    }
}

/// Why bytes did not read as one whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The head was refused.
    #[error(transparent)]
    Head(#[from] HeadError),
    /// The body is not of the framing the head announced.
    #[error(transparent)]
    Body(#[from] FramingError),
    /// The bytes end before the request does.
    #[error("incomplete request")]
    Incomplete,
}

/// Reads one whole request out of `wire` as the server reads a client's (head, framing,
/// chunked body): its method and body length, or why the bytes are not a request. For the
/// fuzz target (`fuzz/fuzz_targets/client_request.rs`) and tests.
pub fn read_whole_request(wire: &[u8], max_head: usize, max_headers: usize) -> Result<(Method, u64), WireError> {
    let mut buf = BytesMut::from(wire);
    let head = parse_request(&mut buf, max_head, max_headers)?.ok_or(WireError::Incomplete)?;
    let mut state = head.body;
    let mut len = 0;
    loop {
        match decode(&mut state, &mut buf)? {
            Step::Frame(frame) => len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Step::End => return Ok((head.request.parts.method.clone(), len)),
            Step::NeedMore => return Err(WireError::Incomplete),
        }
    }
}

/// What the framing headers of a request decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestFraming {
    body: BodyState,
    keep_alive: bool,
    expect_continue: bool,
    /// Transfer-Encoding wins over Content-Length, which is not passed on.
    drop_content_length: bool,
}

/// RFC 9112 §6.3 for requests, with hyper's choices where the RFC allows several:
/// Transfer-Encoding must end in `chunked` (and is refused on HTTP/1.0); beside it,
/// Content-Length is dropped and the connection closes after the response; several
/// Content-Length values must agree; no framing header means no body.
/// `present`: which framing fields the head carries (the others are not looked up).
fn request_framing<F: FieldValues + ?Sized>(
    version: Version,
    headers: &F,
    present: FramingFields,
) -> Result<RequestFraming, HeadError> {
    let connection = |token: &[u8]| present.connection && has_token(headers, header::CONNECTION, token);
    let mut keep_alive = if connection(b"close") {
        false
    } else {
        version == Version::HTTP_11 || connection(b"keep-alive")
    };
    let expect_continue = version == Version::HTTP_11
        && present.expect
        && headers
            .values_of(&header::EXPECT)
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    if present.transfer_encoding {
        if version != Version::HTTP_11 {
            return Err(HeadError::TransferEncoding);
        }
        if !chunked_last(headers) {
            return Err(HeadError::TransferEncoding);
        }
        let both = present.content_length;
        keep_alive &= !both;
        return Ok(RequestFraming {
            body: BodyState::Chunked(Chunk::Size),
            keep_alive,
            expect_continue,
            drop_content_length: both,
        });
    }
    let mut length: Option<u64> = None;
    if present.content_length {
        for value in headers.values_of(&header::CONTENT_LENGTH) {
            // One number per field: a list ("5, 5") is refused, as hyper does.
            let n = parse_decimal(value).ok_or(HeadError::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(HeadError::ContentLength);
            }
            length = Some(n);
        }
    }
    let body = match length {
        None | Some(0) => BodyState::Done,
        Some(n) => BodyState::Length(n),
    };
    Ok(RequestFraming {
        body,
        keep_alive,
        expect_continue,
        drop_content_length: false,
    })
}

/// How a response body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseFraming {
    /// No body is sent (HEAD, 1xx, 204, 304); the body, if any, is dropped.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding (HTTP/1.1 clients, length unknown).
    Chunked,
    /// Until the connection closes (HTTP/1.0 clients, length unknown).
    Close,
}

/// What the response head needs to know about its request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exchange {
    pub(crate) head_request: bool,
    pub(crate) version: Version,
    /// The request and the connection's state allow another request after this one.
    pub(crate) keep_alive: bool,
}

/// Writes the status line and fields into `out`, with Content-Length or chunked coding
/// chosen from the response's fields and body length (`exact`), `Connection` as the
/// outcome needs, and `Date` unless the endpoint sent one. Returns the framing and whether
/// the connection stays open. The fields: an endpoint's still over its head's bytes
/// (`forward::endpoint_fields`; names written lowercase, as a map has them), then the map's.
pub(crate) fn encode_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    (endpoint, headers): (Option<&EndpointFields>, &HeaderMap),
    exact: Option<u64>,
    exchange: Exchange,
    date: &[u8],
) -> (ResponseFraming, bool) {
    let bodiless = status.is_informational() || status == StatusCode::NO_CONTENT;
    let no_body = bodiless || exchange.head_request || status == StatusCode::NOT_MODIFIED;
    // HEAD and 304 answers keep the framing headers of the body they describe.
    let keeps_framing = no_body && !bodiless;
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;

    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    // One pass writes the fields and notes the few the framing depends on: every lookup
    // in a map is a hash and a probe, and this runs for every response.
    let mut noted = Noted {
        keeps_framing,
        switching,
        stated: None,
        closes: false,
        dated: false,
    };
    if let Some(fields) = endpoint {
        for (i, name, value) in fields.fields() {
            // Only a name `note` marked is looked at: most are written straight out.
            if fields.is_special(i) && !noted.sends(Special::of(name), value) || shadowed(headers, name) {
                continue;
            }
            let start = out.len();
            out.extend_from_slice(name);
            out[start..].make_ascii_lowercase();
            write_value(out, value);
        }
        for (name, value) in fields.added() {
            out.extend_from_slice(name);
            write_value(out, value);
        }
    }
    for (name, value) in headers {
        let special = if name == header::CONTENT_LENGTH {
            Special::ContentLength
        } else if name == header::TRANSFER_ENCODING {
            Special::TransferEncoding
        } else if name == header::CONNECTION {
            Special::Connection
        } else if name == "keep-alive" {
            Special::KeepAlive
        } else if name == header::DATE {
            Special::Date
        } else {
            Special::None
        };
        if special != Special::None && !noted.sends(special, value.as_bytes()) {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        write_value(out, value.as_bytes());
    }
    let Noted {
        stated, closes, dated, ..
    } = noted;
    let stated = if bodiless { None } else { stated.flatten() };
    let framing = if no_body {
        ResponseFraming::None
    } else if let Some(n) = stated.or(exact) {
        ResponseFraming::Length(n)
    } else if exchange.version == Version::HTTP_11 {
        ResponseFraming::Chunked
    } else {
        ResponseFraming::Close
    };
    let keep_alive = exchange.keep_alive && !closes && framing != ResponseFraming::Close && !switching;
    match framing {
        ResponseFraming::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        ResponseFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        ResponseFraming::None | ResponseFraming::Close => {}
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    if !switching {
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if exchange.version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    (framing, keep_alive)
}

/// `": value\r\n"` after a field's name.
#[inline]
fn write_value(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The fields the response head's framing looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    Date,
    None,
}

impl Special {
    /// Of a name in any case (an endpoint's, as it sent it).
    fn of(name: &[u8]) -> Special {
        match name.len() {
            4 if token_is(name, b"date") => Special::Date,
            10 if token_is(name, b"connection") => Special::Connection,
            10 if token_is(name, b"keep-alive") => Special::KeepAlive,
            14 if token_is(name, b"content-length") => Special::ContentLength,
            17 if token_is(name, b"transfer-encoding") => Special::TransferEncoding,
            _ => Special::None,
        }
    }
}

/// What the fields written so far said of the framing.
struct Noted {
    keeps_framing: bool,
    switching: bool,
    /// The first `Content-Length`, as `HeaderMap::get` would give.
    stated: Option<Option<u64>>,
    closes: bool,
    dated: bool,
}

impl Noted {
    /// Notes a field; whether it is sent on.
    fn sends(&mut self, special: Special, value: &[u8]) -> bool {
        match special {
            Special::ContentLength => {
                self.stated.get_or_insert_with(|| parse_decimal(value));
                self.keeps_framing
            }
            Special::TransferEncoding => self.keeps_framing,
            Special::Connection => {
                self.closes |= has_token_in(value, b"close");
                self.switching
            }
            Special::KeepAlive => false,
            Special::Date => {
                self.dated = true;
                true
            }
            Special::None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue};

    fn parse(wire: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(wire), 64 * 1024, 100)
    }

    #[test]
    fn request_framing_follows_rfc_9112() {
        use BodyState::{Chunked, Done, Length};
        type Case = (&'static str, Result<(BodyState, bool), HeadError>);
        let cases: [Case; 18] = [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Ok((Done, true))),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                Ok((Done, true)),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
                Err(HeadError::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
                Err(HeadError::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
                Err(HeadError::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 000000000000000000005\r\n\r\n",
                Ok((Length(5), true)),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n",
                Err(HeadError::ContentLength),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok((Chunked(Chunk::Size), true)),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Ok((Chunked(Chunk::Size), true)),
            ),
            // Both: chunked wins, and the connection is not trusted with another request.
            (
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
                Ok((Chunked(Chunk::Size), false)),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
                Err(HeadError::TransferEncoding),
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                Err(HeadError::TransferEncoding),
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                Err(HeadError::TransferEncoding),
            ),
            ("GET / HTTP/1.0\r\n\r\n", Ok((Done, false))),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", Ok((Done, true))),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n",
                Ok((Done, false)),
            ),
        ];
        for (wire, want) in cases {
            let got = parse(wire).map(|h| h.map(|h| (h.body, h.keep_alive)));
            assert_eq!(got, want.map(Some), "{wire:?}");
        }
    }

    #[test]
    fn malformed_heads_are_refused_with_hypers_statuses() {
        let cases: [(&str, HeadError); 8] = [
            ("GET / HTTP/1.1\r\nX-Folded: one\r\n two\r\n\r\n", HeadError::Malformed),
            ("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", HeadError::Malformed),
            ("GET / HTTP/1.1\r\nContent-Length : 0\r\n\r\n", HeadError::Malformed),
            ("GET / HTTP/1.1\r\nHost a\r\n\r\n", HeadError::Malformed),
            ("GET / HTTP/2.0\r\n\r\n", HeadError::Version),
            ("GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", HeadError::Malformed),
            ("G@T / HTTP/1.1\r\n\r\n", HeadError::Malformed),
            ("\x16\x03\x01\x02\x00\x01\x00\x01\r\n\r\n", HeadError::Malformed),
        ];
        for (wire, want) in cases {
            assert_eq!(parse(wire).err(), Some(want), "{wire:?}");
        }
    }

    /// Every line of a head ends in CRLF: a bare LF anywhere in it is refused, as obs-fold.
    #[test]
    fn bare_lfs_are_refused() {
        let cases: [(&str, Result<(), HeadError>); 10] = [
            ("GET /echo HTTP/1.1\nHost: a\nX-A: b\n\n", Err(HeadError::Malformed)),
            (
                "GET /echo HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
                Err(HeadError::Malformed),
            ),
            ("GET /echo HTTP/1.1\nHost: a\r\n\r\n", Err(HeadError::Malformed)),
            ("GET / HTTP/1.1\r\nHost: a\r\n\n", Err(HeadError::Malformed)),
            ("GET / HTTP/1.1\r\nHost: a\n\r\n", Err(HeadError::Malformed)),
            ("GET / HTTP/1.0\n\n", Err(HeadError::Malformed)),
            ("GET / HTTP/1.0\r\n\n", Err(HeadError::Malformed)),
            ("GET / HTTP/1.0\n\r\n", Err(HeadError::Malformed)),
            ("GET / HTTP/1.0\r\n\r\n", Ok(())),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\r\n", Ok(())),
        ];
        for (wire, want) in cases {
            assert_eq!(parse(wire).map(|h| assert!(h.is_some(), "{wire:?}")), want, "{wire:?}");
        }
    }

    /// RFC 9112 §3.2: the target's form must suit the method, and an HTTP/1.1 request
    /// names its host, in `Host` or in an absolute-form target. CONNECT passes, to be
    /// answered `405` later; userinfo and the Host value are the proxy's to judge.
    #[test]
    fn targets_and_host_are_required_as_rfc_9112_says() {
        let cases: [(&str, Result<(), HeadError>); 17] = [
            ("GET / HTTP/1.1\r\nHost: a\r\n\r\n", Ok(())),
            ("GET / HTTP/1.1\r\nhOsT: a\r\n\r\n", Ok(())),
            ("GET / HTTP/1.1\r\n\r\n", Err(HeadError::MissingHost)),
            (
                "GET / HTTP/1.1\r\nX-Host: a\r\nHosts: a\r\n\r\n",
                Err(HeadError::MissingHost),
            ),
            ("GET / HTTP/1.0\r\n\r\n", Ok(())),
            ("GET http://a.example/x HTTP/1.1\r\n\r\n", Ok(())),
            ("GET http://alice:secret@a.example/x HTTP/1.1\r\n\r\n", Ok(())),
            ("GET echo HTTP/1.1\r\nHost: a\r\n\r\n", Err(HeadError::Target)),
            ("GET echo HTTP/1.0\r\n\r\n", Err(HeadError::Target)),
            (
                "POST www.example.com:443 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
                Err(HeadError::Target),
            ),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", Err(HeadError::Target)),
            ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Ok(())),
            ("OPTIONS * HTTP/1.1\r\n\r\n", Err(HeadError::MissingHost)),
            ("OPTIONS /x HTTP/1.1\r\nHost: a\r\n\r\n", Ok(())),
            (
                "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
                Ok(()),
            ),
            ("CONNECT example.com:443 HTTP/1.1\r\n\r\n", Ok(())),
            ("CONNECT * HTTP/1.1\r\n\r\n", Ok(())),
        ];
        for (wire, want) in cases {
            assert_eq!(parse(wire).map(|h| assert!(h.is_some(), "{wire:?}")), want, "{wire:?}");
        }
        assert_eq!(HeadError::MissingHost.status(), StatusCode::BAD_REQUEST);
        assert_eq!(HeadError::Target.status(), StatusCode::BAD_REQUEST);
        // Past 128 fields the head is a map: `Host` is looked for there.
        let fields: String = (0..130).map(|i| format!("X-F{i}: v\r\n")).collect();
        for (host, want) in [("", Some(HeadError::MissingHost)), ("Host: a\r\n", None)] {
            let wire = format!("GET / HTTP/1.1\r\n{fields}{host}\r\n");
            let got = parse_request(&mut BytesMut::from(wire.as_str()), 64 * 1024, 300).err();
            assert_eq!(got, want, "{host:?}");
        }
    }

    proptest::proptest! {
        /// A head that arrives in two pieces parses as it does whole: nothing is decided on
        /// a partial head.
        #[test]
        fn a_split_head_parses_as_the_whole(
            split in 0usize..120,
            te in proptest::bool::ANY,
            value in "[a-zA-Z0-9 ,;=-]{0,20}",
        ) {
            let framing = if te { "Transfer-Encoding: chunked" } else { "Content-Length: 3" };
            let wire = format!("POST /v1/x HTTP/1.1\r\nHost: a\r\nX-V: {value}\r\n{framing}\r\n\r\n");
            let whole = parse(&wire).map(|h| h.map(|h| (h.body, h.keep_alive, h.fields().len())));
            let split = split.min(wire.len());
            let first = parse(&wire[..split]).map(|h| h.map(|h| (h.body, h.keep_alive, h.fields().len())));
            if split < wire.len() {
                proptest::prop_assert!(matches!(first, Ok(None)) || first.is_err() && first == whole, "{first:?}");
            } else {
                proptest::prop_assert_eq!(first, whole);
            }
        }

        /// Any bytes read as a request or fail with a reason; never a panic.
        #[test]
        fn any_bytes_read_as_a_request_or_an_error(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = read_whole_request(&wire, 256, 8);
        }
    }

    #[test]
    fn whole_requests_read_with_their_bodies() {
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(read_whole_request(chunked, 1024, 10), Ok((Method::POST, 5)));
        let short = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nhello";
        assert_eq!(read_whole_request(short, 1024, 10), Err(WireError::Incomplete));
        let bad = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n";
        assert_eq!(
            read_whole_request(bad, 1024, 10),
            Err(WireError::Body(FramingError::ChunkEnd))
        );
    }

    #[test]
    fn heads_are_bounded_in_bytes_and_fields() {
        let mut partial = BytesMut::from(format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(100)).as_str());
        assert_eq!(parse_request(&mut partial, 64, 100).err(), Some(HeadError::TooLarge));
        let mut small = BytesMut::from("GET / HTTP/1.1\r\nX: a");
        assert!(
            matches!(parse_request(&mut small, 64, 100), Ok(None)),
            "partial, within the limit"
        );
        let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", "X: a\r\n".repeat(4));
        assert_eq!(
            parse_request(&mut BytesMut::from(many.as_str()), 1024, 4).err(),
            Some(HeadError::TooLarge)
        );
        assert!(parse_request(&mut BytesMut::from(many.as_str()), 1024, 5).is_ok());
    }

    /// Listed up to 128 fields, in the map beyond (a configuration may allow more); the
    /// same fields either way, and a `Content-Length` beside chunked coding gone from both.
    #[test]
    fn fields_are_listed_or_mapped_and_framing_fields_dropped() -> Result<(), Box<dyn std::error::Error>> {
        for count in [3, 128, 129, 200] {
            let fields: String = (0..count).map(|i| format!("X-F{i}: v{i}\r\n")).collect();
            // Absolute-form, so that no `Host` is needed and the fields are the test's alone.
            let wire =
                format!("POST http://a/ HTTP/1.1\r\n{fields}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n");
            let head = parse_request(&mut BytesMut::from(wire.as_str()), 64 * 1024, 300)?.ok_or("incomplete")?;
            assert_eq!(head.request.listed.is_some(), count + 2 <= 128, "{count} fields");
            let f = head.fields();
            assert_eq!(f.len(), count + 1, "{count} fields");
            assert_eq!(f.get(&header::CONTENT_LENGTH), None, "{count} fields");
            assert_eq!(f.get(&header::TRANSFER_ENCODING), Some(&b"chunked"[..]));
            let last = HeaderName::from_bytes(format!("x-f{}", count - 1).as_bytes())?;
            assert_eq!(f.get(&last), Some(format!("v{}", count - 1).as_bytes()));
            assert!(!head.keep_alive, "both framing fields: the connection closes");
        }
        Ok(())
    }

    #[test]
    fn the_head_is_taken_off_the_buffer_and_the_rest_left() -> Result<(), Box<dyn std::error::Error>> {
        let mut buf = BytesMut::from("\r\nPOST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}GET");
        let head = parse_request(&mut buf, 1024, 10)?.ok_or("incomplete")?;
        assert_eq!(head.request.parts.method, Method::POST);
        assert_eq!(head.request.parts.uri, "/v1/chat?x=1");
        assert_eq!(head.fields().get(&header::HOST), Some(&b"a"[..]));
        assert_eq!(&buf[..], b"{}GET");
        let expect = parse("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n");
        assert!(expect?.ok_or("incomplete")?.expect_continue);
        Ok(())
    }

    fn encode(
        status: u16,
        headers: &[(&'static str, &'static str)],
        exact: Option<u64>,
        exchange: Exchange,
    ) -> (String, ResponseFraming, bool) {
        let Ok(status) = StatusCode::from_u16(status) else {
            panic!("{status} is not a status");
        };
        let mut map = HeaderMap::new();
        let mut block = Vec::new();
        for (name, value) in headers {
            map.append(HeaderName::from_static(name), HeaderValue::from_static(value));
            block.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        block.extend_from_slice(b"\r\n");
        let endpoint = EndpointFields::of_block(&block);
        let date = b"Tue, 01 Dec 2026 19:00:00 GMT";
        let (mut mapped, mut raw) = (Vec::new(), Vec::new());
        let (framing, keep) = encode_response(&mut mapped, status, (None, &map), exact, exchange, date);
        // An endpoint's fields over their head's bytes make the same head.
        let same = encode_response(
            &mut raw,
            status,
            (Some(&endpoint), &HeaderMap::new()),
            exact,
            exchange,
            date,
        );
        assert_eq!(String::from_utf8_lossy(&raw), String::from_utf8_lossy(&mapped));
        assert_eq!(same, (framing, keep));
        (String::from_utf8_lossy(&mapped).into_owned(), framing, keep)
    }

    #[test]
    fn a_field_set_on_the_map_replaces_the_endpoints() {
        let endpoint = EndpointFields::of_block(b"X-RateLimit-Remaining-Requests: 99\r\nContent-Length: 0\r\n\r\n");
        let mut map = HeaderMap::new();
        map.insert("x-ratelimit-remaining-requests", HeaderValue::from_static("4"));
        let mut out = Vec::new();
        let date = b"Tue, 01 Dec 2026 19:00:00 GMT";
        encode_response(&mut out, StatusCode::OK, (Some(&endpoint), &map), None, GET11, date);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("x-ratelimit-remaining-requests: 4\r\n"), "{text}");
        assert!(!text.contains("99"), "{text}");

        let mut mapped = map.clone();
        endpoint.append_to(&mut mapped);
        assert_eq!(mapped.get_all("x-ratelimit-remaining-requests").iter().count(), 1);
        assert_eq!(mapped["x-ratelimit-remaining-requests"], "4");
        assert_eq!(mapped["content-length"], "0");
    }

    #[test]
    fn an_endpoints_names_are_written_lowercase() {
        let endpoint =
            EndpointFields::of_block(b"Content-Type: text/plain\r\nX-Mixed-Case: A\r\nCONTENT-LENGTH: 2\r\n\r\n");
        let mut out = Vec::new();
        let status = StatusCode::OK;
        let date = b"Tue, 01 Dec 2026 19:00:00 GMT";
        let (framing, _) = encode_response(
            &mut out,
            status,
            (Some(&endpoint), &HeaderMap::new()),
            None,
            GET11,
            date,
        );
        assert_eq!(framing, ResponseFraming::Length(2));
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-mixed-case: A\r\ncontent-length: 2\r\ndate: Tue, 01 Dec 2026 19:00:00 GMT\r\n\r\n"
        );
    }

    const GET11: Exchange = Exchange {
        head_request: false,
        version: Version::HTTP_11,
        keep_alive: true,
    };

    #[test]
    fn response_framing_is_chosen_for_the_client() {
        use ResponseFraming::{Chunked, Close, Length, None};
        let head10 = Exchange {
            version: Version::HTTP_10,
            ..GET11
        };
        let head_req = Exchange {
            head_request: true,
            ..GET11
        };
        let closing = Exchange {
            keep_alive: false,
            ..GET11
        };
        type Case = (
            u16,
            &'static [(&'static str, &'static str)],
            Option<u64>,
            Exchange,
            ResponseFraming,
            bool,
        );
        let cases: [Case; 12] = [
            (200, &[("content-length", "5")], Some(5), GET11, Length(5), true),
            // The endpoint's stated length wins over what the body reports, the first of two.
            (
                200,
                &[("content-length", "9"), ("content-length", "4")],
                Some(5),
                GET11,
                Length(9),
                true,
            ),
            (
                200,
                &[("connection", "keep-alive, Close")],
                Some(0),
                GET11,
                Length(0),
                false,
            ),
            (200, &[("connection", "keep-alive")], Option::None, GET11, Chunked, true),
            (200, &[], Some(7), GET11, Length(7), true),
            (
                200,
                &[("transfer-encoding", "chunked")],
                Option::None,
                GET11,
                Chunked,
                true,
            ),
            (200, &[], Option::None, head10, Close, false),
            (200, &[("content-length", "5")], Option::None, head_req, None, true),
            (204, &[("content-length", "0")], Some(0), GET11, None, true),
            (304, &[], Option::None, GET11, None, true),
            (200, &[("connection", "close")], Some(0), GET11, Length(0), false),
            (200, &[], Some(1), closing, Length(1), false),
        ];
        for (status, headers, exact, exchange, framing, keep) in cases {
            let (text, got, kept) = encode(status, headers, exact, exchange);
            assert_eq!((got, kept), (framing, keep), "{status} {headers:?}: {text}");
            assert!(
                text.matches("content-length").count() + text.matches("transfer-encoding").count() <= 1,
                "{text}"
            );
            assert_eq!(text.contains("connection: close"), !keep, "{text}");
        }
    }

    #[test]
    fn response_heads_keep_the_endpoints_fields_and_add_date_once() {
        let (text, ..) = encode(
            200,
            &[("x-meridian-region", "us-east"), ("content-length", "2")],
            Some(2),
            GET11,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\nx-meridian-region: us-east\r\ncontent-length: 2\r\ndate: Tue, 01 Dec 2026 19:00:00 GMT\r\n\r\n"
        );
        let (text, ..) = encode(200, &[("date", "Mon, 30 Nov 2026 00:00:00 GMT")], Some(0), GET11);
        assert_eq!(text.matches("date:").count(), 1);
        let (text, ..) = encode(
            101,
            &[("connection", "upgrade"), ("upgrade", "websocket")],
            Option::None,
            GET11,
        );
        assert!(text.contains("connection: upgrade\r\nupgrade: websocket\r\n"), "{text}");
        assert!(!text.contains("transfer-encoding"), "{text}");
        let (text, ..) = encode(
            200,
            &[],
            Some(0),
            Exchange {
                version: Version::HTTP_10,
                ..GET11
            },
        );
        assert!(text.contains("connection: keep-alive"), "{text}");
    }
}
