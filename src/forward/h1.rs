//! Meridian's own HTTP/1.1 exchange with an endpoint, for the request that is most of an
//! inference edge's traffic: a head and a body known whole (none, or kept for replay).
//!
//! The request goes out in one write; the response head is parsed with `httparse`; the body
//! is read straight off the connection by whoever reads the body (the client connection's
//! task), with no task and no channel per upstream connection, as NGINX and Pingora do. A
//! finished body gives its connection back to the pool itself. Streamed request bodies,
//! trailers and upgrades still go through hyper's client (`pool`).
//!
//! The decisions (framing, chunk decoding, keep-alive) are pure functions over bytes, tested
//! without sockets; [`H1Body`] only adds the reads.
//!
//! An endpoint may answer before it has read the whole request (413 on a large upload): while
//! a write waits, the connection is read too, and an answer that comes then is the response,
//! whether the endpoint then closes, or neither reads nor closes.

use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version, header};
use hyper::body::{Body, Frame, SizeHint};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::client::{UpstreamError, UpstreamErrorKind};
use super::endpoint_fields::EndpointFields;
use super::pool::Conn;
use super::request_fields::{RequestFields, shadowed};
use super::rewrite::X_FORWARDED_FOR;

/// The largest response head (status line and headers), and trailer section, read from an
/// endpoint. NGINX's default is one page (`proxy_buffer_size`); model servers send a few
/// hundred bytes.
const MAX_HEAD: usize = 64 * 1024;
/// Headers per response head, as hyper's default.
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read at first: a model's stream is many small events, and
/// every open stream keeps this much; a read that fills it doubles the next, up to
/// [`MAX_READ_SIZE`], for large bodies.
pub(crate) const READ_SIZE: usize = 4 * 1024;
const MAX_READ_SIZE: usize = 64 * 1024;
/// A chunk-size line longer than this is refused (extensions included).
const MAX_CHUNK_LINE: usize = 4096;
/// Bodies up to this size are copied behind the head, so the request is one write (and one
/// TLS record); larger ones follow it.
const INLINE_BODY: usize = 16 * 1024;

/// Why an endpoint's response could not be read as HTTP/1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The status line or a header is not HTTP/1.1.
    #[error("invalid response head")]
    Head,
    /// The response head passed 64 KiB or 100 headers.
    #[error("response head too large")]
    HeadTooLarge,
    /// `101` to a request that asked for no upgrade.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedSwitch,
    /// A transfer coding other than `chunked` last: its bytes cannot be relayed re-framed
    /// without the coding, and the client would take them as the content (NGINX answers 502).
    #[error("unsupported transfer coding")]
    TransferCoding,
    /// Content-Length values that disagree or do not parse.
    #[error("invalid content-length")]
    ContentLength,
    /// A chunk size line that is not hex digits and extensions, or too long.
    #[error("invalid chunk size line")]
    ChunkSize,
    /// A chunk's data not followed by CRLF.
    #[error("invalid chunk end")]
    ChunkEnd,
    /// Trailers that do not parse or pass 64 KiB.
    #[error("invalid trailers")]
    Trailers,
    /// The connection closed before the body's end.
    #[error("the connection closed before the end of the body")]
    Incomplete,
}

/// How a response body is delimited (RFC 9112 §6.3), and where its reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyState {
    /// Bytes still to read of a Content-Length body.
    Length(u64),
    /// Chunked transfer coding.
    Chunked(Chunk),
    /// Read to the connection's close (no length given): the connection is not reused.
    Close,
    /// The body ended.
    Done,
}

/// Where chunked decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Bytes still to read of the current chunk.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// What one decoding step produced.
#[derive(Debug)]
pub(crate) enum Step {
    /// A frame to hand on.
    Frame(Frame<Bytes>),
    /// The buffer holds no complete step: read more.
    NeedMore,
    /// The body ended.
    End,
}

/// A head's fields as the framing reads them: every value of one name, in order.
pub(crate) trait FieldValues {
    fn values_of<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a;
}

impl FieldValues for super::head_fields::HeadFields {
    fn values_of<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.values(name.as_str())
    }
}

impl FieldValues for HeaderMap {
    fn values_of<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }
}

/// The body's delimitation and whether the connection may carry another request, from the
/// request method and the response head.
pub(crate) fn framing<F: FieldValues + ?Sized>(
    method: &Method,
    status: StatusCode,
    version: Version,
    (headers, present): (&F, FramingFields),
) -> Result<(BodyState, bool), FramingError> {
    let keep_alive = keeps_alive(version, headers, present.connection);
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((BodyState::Done, keep_alive));
    }
    if present.transfer_encoding {
        if !chunked_last(headers) {
            // Another coding last (RFC 9112 §6.3, rule 4: delimited by the close): relayed
            // with `Transfer-Encoding` gone, as a hop-by-hop field must be, the client would
            // read gzip or the like as the content. Refused as an invalid answer.
            return Err(FramingError::TransferCoding);
        }
        // Content-Length beside Transfer-Encoding is ignored, and the connection is not
        // trusted with another request (rule 3).
        let both = present.content_length;
        return Ok((BodyState::Chunked(Chunk::Size), keep_alive && !both));
    }
    let mut length: Option<u64> = None;
    // Looked up only when there: a loop over an `Option` (`flatten`) stayed a call of its
    // own (callgrind).
    if present.content_length {
        for value in headers.values_of(&header::CONTENT_LENGTH) {
            for part in value.split(|&b| b == b',') {
                let n = parse_decimal(part.trim_ascii()).ok_or(FramingError::ContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(FramingError::ContentLength);
                }
                length = Some(n);
            }
        }
    }
    match length {
        Some(0) => Ok((BodyState::Done, keep_alive)),
        Some(n) => Ok((BodyState::Length(n), keep_alive)),
        None => Ok((BodyState::Close, false)),
    }
}

/// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 only with
/// `Connection: keep-alive`.
fn keeps_alive<F: FieldValues + ?Sized>(version: Version, headers: &F, connection: bool) -> bool {
    match version {
        Version::HTTP_11 => !(connection && has_token(headers, header::CONNECTION, b"close")),
        _ => connection && has_token(headers, header::CONNECTION, b"keep-alive"),
    }
}

/// True when a comma-separated field (`Connection`, `TE`) names `token`, in any case.
pub(crate) fn has_token<F: FieldValues + ?Sized>(headers: &F, name: HeaderName, token: &[u8]) -> bool {
    headers.values_of(&name).any(|v| has_token_in(v, token))
}

/// True when the comma-separated field value lists `token` (ASCII case-insensitive).
pub(crate) fn has_token_in(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// True when the last transfer coding is `chunked` (RFC 9112 §6.3: only then does the
/// coding itself delimit the body).
pub(crate) fn chunked_last<F: FieldValues + ?Sized>(headers: &F) -> bool {
    headers
        .values_of(&header::TRANSFER_ENCODING)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|coding| coding.trim_ascii())
        .filter(|coding| !coding.is_empty())
        .last()
        .is_some_and(|last| last.eq_ignore_ascii_case(b"chunked"))
}

/// A Content-Length value: decimal digits only (no sign, no spaces), any number of them as
/// long as the value fits in a `u64` (hyper's rule).
pub(crate) fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A chunk-size line without its CRLF: hex digits, then nothing or extensions.
fn parse_chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    // 15 hex digits keep every size below 2^60: no overflow, and no real chunk is larger.
    if digits == 0 || digits > 15 {
        return Err(FramingError::ChunkSize);
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(FramingError::ChunkSize);
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n * 16 + u64::from(v)
    }))
}

/// One step of reading a body out of `buf`; data frames share `buf`'s memory.
pub(crate) fn decode(state: &mut BodyState, buf: &mut BytesMut) -> Result<Step, FramingError> {
    loop {
        match state {
            BodyState::Done => return Ok(Step::End),
            BodyState::Length(0) => {
                *state = BodyState::Done;
                return Ok(Step::End);
            }
            BodyState::Length(left) => {
                let Some(data) = take_up_to(buf, left) else {
                    return Ok(Step::NeedMore);
                };
                if *left == 0 {
                    *state = BodyState::Done;
                }
                return Ok(Step::Frame(Frame::data(data)));
            }
            BodyState::Close => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                return Ok(Step::Frame(Frame::data(buf.split().freeze())));
            }
            BodyState::Chunked(chunk) => match chunk {
                Chunk::Size => {
                    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
                    let Some(lf) = memchr::memchr(b'\n', window) else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(FramingError::ChunkSize);
                        }
                        return Ok(Step::NeedMore);
                    };
                    let line = window[..lf].strip_suffix(b"\r").ok_or(FramingError::ChunkSize)?;
                    let size = parse_chunk_size(line)?;
                    buf.advance(lf + 1);
                    *chunk = if size == 0 { Chunk::Trailers } else { Chunk::Data(size) };
                }
                Chunk::Data(left) => {
                    let Some(data) = take_up_to(buf, left) else {
                        return Ok(Step::NeedMore);
                    };
                    if *left == 0 {
                        *chunk = Chunk::DataEnd;
                    }
                    return Ok(Step::Frame(Frame::data(data)));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(FramingError::ChunkEnd);
                    }
                    buf.advance(2);
                    *chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *state = BodyState::Done;
                        return Ok(Step::End);
                    }
                    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
                        if buf.len() > MAX_HEAD {
                            return Err(FramingError::Trailers);
                        }
                        return Ok(Step::NeedMore);
                    };
                    let trailers = parse_trailers(&buf[..end + 4])?;
                    buf.advance(end + 4);
                    *state = BodyState::Done;
                    return Ok(Step::Frame(Frame::trailers(trailers)));
                }
            },
        }
    }
}

/// As much of the `left` bytes still due as `buf` holds (none when it is empty), sharing its
/// memory; `left` counts them off.
fn take_up_to(buf: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if buf.is_empty() {
        return None;
    }
    let take = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
    *left -= take as u64;
    Some(buf.split_to(take).freeze())
}

fn parse_trailers(block: &[u8]) -> Result<HeaderMap, FramingError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = match httparse::parse_headers(block, &mut fields) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        _ => return Err(FramingError::Trailers),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| FramingError::Trailers)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| FramingError::Trailers)?;
        map.append(name, value);
    }
    Ok(map)
}

/// Each field's name and value as offsets into `buf`, which `httparse` parsed: the head
/// is frozen next, and the values become slices of it.
pub(crate) type FieldSpans = SmallVec<[FieldSpan; 24]>;

/// One field's name and value as `start..end` byte offsets into its head. `u32`, not
/// `Range<usize>`: the spans travel by value with the parsed head, and at half the size
/// (16 bytes a field, 384 inline) each of those moves copies half as much.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FieldSpan {
    name: [u32; 2],
    value: [u32; 2],
}

impl FieldSpan {
    pub(crate) fn name(self) -> Range<usize> {
        self.name[0] as usize..self.name[1] as usize
    }

    pub(crate) fn name_len(self) -> usize {
        self.name[1].wrapping_sub(self.name[0]) as usize
    }

    pub(crate) fn value(self) -> Range<usize> {
        self.value[0] as usize..self.value[1] as usize
    }
}

/// The offsets of httparse's `fields` in `buf`, written into `spans` where the caller keeps
/// them: returned by value, the 395-byte inline array was copied at each step out of the
/// parser (five copies, ~500 instructions a proxied request). `None` if `buf` is too large
/// for `u32` offsets.
#[inline]
pub(crate) fn field_spans(buf: &[u8], fields: &[httparse::Header<'_>], spans: &mut FieldSpans) -> Option<()> {
    // Every offset fits once the buffer does (heads are limited far below 4 GiB).
    u32::try_from(buf.len()).ok()?;
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        [start as u32, (start + s.len()) as u32]
    };
    spans.clear();
    spans.extend(fields.iter().map(|f| FieldSpan {
        name: span(f.name.as_bytes()),
        value: span(f.value),
    }));
    Some(())
}

/// The fields at `spans` (from `field_spans`: fields httparse accepted) in the frozen `head`,
/// values sharing its memory, in a map with room for `extra` more (growing it would rehash
/// it); `None` if a span lies outside the head or a name is not a field name.
#[inline]
pub(crate) fn fields_of(head: &Bytes, spans: &[FieldSpan], extra: usize) -> Option<(HeaderMap, FramingFields)> {
    let mut headers = HeaderMap::with_capacity(spans.len() + extra);
    let mut framing = FramingFields::default();
    for span in spans {
        let name = head.get(span.name())?;
        let name = match known_name(name) {
            Some(known) => {
                if FramingFields::LENGTHS & (1 << name.len()) != 0 {
                    framing.note(known);
                }
                known.clone()
            }
            None => {
                let name = HeaderName::from_bytes(name).ok()?;
                framing.note(&name);
                name
            }
        };
        // Checked here, as `Bytes::slice` would panic on a span outside the head.
        let value = span.value();
        if value.start > value.end || value.end > head.len() {
            return None;
        }
        // SAFETY: not memory safety (a `HeaderValue` is bytes either way) but its promise of
        // valid bytes, which httparse kept already: a `FieldSpan` is made only in this
        // module, by `field_spans` from the fields httparse accepted (default config: no
        // obs-fold; the tests make valid ones by hand), whose values admit the same bytes
        // `HeaderValue` does (HTAB, then 0x20 and up except DEL). Checking again cost ~400
        // instructions a proxied request (two heads); hyper's HTTP/1.1 role skips it the
        // same way. Debug builds (tests, fuzz targets) still check, and panic.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(value)) };
        headers.append(name, value);
    }
    Some((headers, framing))
}

/// Which of the fields that frame a message (or this hop of it) its head carries, noted as
/// the head's fields are taken in: the framing then looks up only what is there (a map
/// lookup is a hash and a probe, and most heads carry no `Connection`, `Transfer-Encoding`,
/// `Expect`, `Upgrade` or `TE`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FramingFields {
    pub(crate) connection: bool,
    pub(crate) transfer_encoding: bool,
    pub(crate) content_length: bool,
    pub(crate) expect: bool,
    pub(crate) upgrade: bool,
    pub(crate) te: bool,
}

impl FramingFields {
    /// The lengths of the framing fields' names, as bits: only a name of one of these
    /// lengths is compared with them (`known_name` returns names of at most 30 bytes).
    const LENGTHS: u32 = 1 << 2 | 1 << 6 | 1 << 7 | 1 << 10 | 1 << 14 | 1 << 17;

    /// Of a map built elsewhere (the tests' tables).
    #[cfg(test)]
    pub(crate) fn of(headers: &HeaderMap) -> FramingFields {
        FramingFields {
            connection: headers.contains_key(header::CONNECTION),
            transfer_encoding: headers.contains_key(header::TRANSFER_ENCODING),
            content_length: headers.contains_key(header::CONTENT_LENGTH),
            expect: headers.contains_key(header::EXPECT),
            upgrade: headers.contains_key(header::UPGRADE),
            te: headers.contains_key(header::TE),
        }
    }

    /// Notes a name as sent (any case), by its length first.
    pub(crate) fn note_sent(&mut self, name: &[u8]) {
        if FramingFields::LENGTHS & (1 << name.len().min(31)) == 0 {
            return;
        }
        let is = |lower: &[u8]| token_is(name, lower);
        match name.len() {
            2 => self.te |= is(b"te"),
            6 => self.expect |= is(b"expect"),
            7 => self.upgrade |= is(b"upgrade"),
            10 => self.connection |= is(b"connection"),
            14 => self.content_length |= is(b"content-length"),
            17 => self.transfer_encoding |= is(b"transfer-encoding"),
            _ => {}
        }
    }

    fn note(&mut self, name: &HeaderName) {
        if name == header::CONNECTION {
            self.connection = true;
        } else if name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if name == header::CONTENT_LENGTH {
            self.content_length = true;
        } else if name == header::EXPECT {
            self.expect = true;
        } else if name == header::UPGRADE {
            self.upgrade = true;
        } else if name == header::TE {
            self.te = true;
        }
    }
}

/// A field name clients, model servers and APIs commonly send, as a static name (`None` for
/// any other). `HeaderName::from_bytes` copies every custom name to the heap, and an SDK's
/// request carries a dozen (`x-stainless-*`, `openai-*`, tracing), an API's answer its
/// `x-ratelimit-*`; for a standard name it lowercases into a scratch buffer and matches on
/// that. Here a name is looked up by length first, so a miss costs one `match`, then
/// compared a word at a time (`name` is a token, as httparse checked).
fn known_name(name: &[u8]) -> Option<&'static HeaderName> {
    let candidates: &'static [HeaderName] = match name.len() {
        2 => {
            static NAMES: [HeaderName; 1] = [header::TE];
            &NAMES
        }
        4 => {
            static NAMES: [HeaderName; 4] = [header::HOST, header::DATE, header::VARY, header::ETAG];
            &NAMES
        }
        6 => {
            static NAMES: [HeaderName; 5] = [
                header::ACCEPT,
                header::SERVER,
                header::ORIGIN,
                header::COOKIE,
                header::EXPECT,
            ];
            &NAMES
        }
        7 => {
            static NAMES: [HeaderName; 2] = [header::REFERER, header::UPGRADE];
            &NAMES
        }
        8 => {
            static NAMES: [HeaderName; 1] = [header::LOCATION];
            &NAMES
        }
        9 => {
            static NAMES: [HeaderName; 2] = [
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static("x-real-ip"),
            ];
            &NAMES
        }
        10 => {
            static NAMES: [HeaderName; 4] = [
                header::USER_AGENT,
                header::CONNECTION,
                HeaderName::from_static("tracestate"),
                header::SET_COOKIE,
            ];
            &NAMES
        }
        11 => {
            static NAMES: [HeaderName; 3] = [
                HeaderName::from_static("openai-beta"),
                HeaderName::from_static("traceparent"),
                header::RETRY_AFTER,
            ];
            &NAMES
        }
        12 => {
            static NAMES: [HeaderName; 2] = [header::CONTENT_TYPE, HeaderName::from_static("x-request-id")];
            &NAMES
        }
        13 => {
            static NAMES: [HeaderName; 3] = [header::AUTHORIZATION, header::CACHE_CONTROL, header::LAST_MODIFIED];
            &NAMES
        }
        14 => {
            static NAMES: [HeaderName; 4] = [
                header::CONTENT_LENGTH,
                HeaderName::from_static("openai-project"),
                HeaderName::from_static("openai-version"),
                HeaderName::from_static("x-stainless-os"),
            ];
            &NAMES
        }
        15 => {
            static NAMES: [HeaderName; 3] = [
                HeaderName::from_static("x-forwarded-for"),
                header::ACCEPT_ENCODING,
                header::ACCEPT_LANGUAGE,
            ];
            &NAMES
        }
        16 => {
            static NAMES: [HeaderName; 4] = [
                HeaderName::from_static("x-stainless-arch"),
                HeaderName::from_static("x-stainless-lang"),
                HeaderName::from_static("x-forwarded-host"),
                header::CONTENT_ENCODING,
            ];
            &NAMES
        }
        17 => {
            static NAMES: [HeaderName; 4] = [
                header::TRANSFER_ENCODING,
                HeaderName::from_static("x-stainless-async"),
                HeaderName::from_static("x-forwarded-proto"),
                HeaderName::from_static("anthropic-version"),
            ];
            &NAMES
        }
        19 => {
            static NAMES: [HeaderName; 3] = [
                HeaderName::from_static("x-stainless-runtime"),
                HeaderName::from_static("x-stainless-timeout"),
                HeaderName::from_static("openai-organization"),
            ];
            &NAMES
        }
        20 => {
            static NAMES: [HeaderName; 1] = [HeaderName::from_static("openai-processing-ms")];
            &NAMES
        }
        21 => {
            static NAMES: [HeaderName; 1] = [HeaderName::from_static("endpoint-load-metrics")];
            &NAMES
        }
        23 => {
            static NAMES: [HeaderName; 1] = [HeaderName::from_static("x-stainless-retry-count")];
            &NAMES
        }
        24 => {
            static NAMES: [HeaderName; 3] = [
                HeaderName::from_static("x-stainless-read-timeout"),
                HeaderName::from_static("x-ratelimit-limit-tokens"),
                HeaderName::from_static("x-ratelimit-reset-tokens"),
            ];
            &NAMES
        }
        26 => {
            static NAMES: [HeaderName; 2] = [
                HeaderName::from_static("x-ratelimit-limit-requests"),
                HeaderName::from_static("x-ratelimit-reset-requests"),
            ];
            &NAMES
        }
        27 => {
            static NAMES: [HeaderName; 2] = [
                HeaderName::from_static("x-stainless-package-version"),
                HeaderName::from_static("x-stainless-runtime-version"),
            ];
            &NAMES
        }
        28 => {
            static NAMES: [HeaderName; 1] = [HeaderName::from_static("x-ratelimit-remaining-tokens")];
            &NAMES
        }
        30 => {
            static NAMES: [HeaderName; 1] = [HeaderName::from_static("x-ratelimit-remaining-requests")];
            &NAMES
        }
        _ => return None,
    };
    candidates
        .iter()
        .find(|known| token_is(name, known.as_str().as_bytes()))
}

/// True when the token `name` is `lower` (a name of lowercase letters, digits and `-`) in
/// any case. For token bytes (RFC 9110 §5.6.2), OR-ing 0x20 lowercases a letter, leaves a
/// digit or `-` as it is, and turns no other token byte into one of those (only control
/// bytes become digits or `-`): so eight bytes compare in one step.
pub(crate) fn token_is(name: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = u64::from_ne_bytes([0x20; 8]);
    if name.len() != lower.len() {
        return false;
    }
    let (name_words, lower_words) = (name.chunks_exact(8), lower.chunks_exact(8));
    let (name_tail, lower_tail) = (name_words.remainder(), lower_words.remainder());
    for (a, b) in name_words.zip(lower_words) {
        let (Ok(a), Ok(b)) = (<[u8; 8]>::try_from(a), <[u8; 8]>::try_from(b)) else {
            return false;
        };
        if u64::from_ne_bytes(a) | CASE != u64::from_ne_bytes(b) {
            return false;
        }
    }
    name_tail.iter().zip(lower_tail).all(|(a, b)| a | 0x20 == *b)
}

/// A parsed response head: the response (its body still to read; its fields in `fields`,
/// not in the response's map) and how to read the body.
pub(crate) struct Head {
    pub(crate) response: Response<()>,
    pub(crate) fields: Box<EndpointFields>,
    pub(crate) body: BodyState,
    pub(crate) keep_alive: bool,
}

/// Parses a response head off the front of `buf`, skipping interim responses (`100`, `103`);
/// `None` while the head is incomplete. Header values share the head's memory.
pub(crate) fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, FramingError> {
    loop {
        // Uninitialised slots: zeroing 100 headers cost more than the parse (callgrind).
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        let len = match config.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields) {
            // Whole in one read or not, a head is held to the same bound.
            Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => return Err(FramingError::HeadTooLarge),
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(FramingError::HeadTooLarge),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(FramingError::HeadTooLarge),
            Err(_) => return Err(FramingError::Head),
        };
        let code = parsed.code.ok_or(FramingError::Head)?;
        // RFC 9110 §15: status codes are 100–599; `http` takes up to 999.
        let status = StatusCode::from_u16(code)
            .ok()
            .filter(|s| s.as_u16() <= 599)
            .ok_or(FramingError::Head)?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(FramingError::UnexpectedSwitch);
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        let mut fields = EndpointFields::boxed();
        field_spans(buf, parsed.headers, fields.spans_mut()).ok_or(FramingError::HeadTooLarge)?;
        let head = buf.split_to(len).freeze();
        let present = fields.take_in(head).ok_or(FramingError::Head)?;
        let (body, keep_alive) = framing(method, status, version, (&*fields, present))?;
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        return Ok(Some(Head {
            response,
            fields,
            body,
            keep_alive,
        }));
    }
}

/// Reads a whole response out of `wire` as Meridian reads an endpoint's (the end of `wire`
/// is the connection's close): its status and body length, or why the bytes are not a
/// response. For the fuzz target (`fuzz/fuzz_targets/endpoint_response.rs`) and tests.
pub fn read_whole_response(method: &Method, wire: &[u8]) -> Result<(StatusCode, u64), FramingError> {
    let mut buf = BytesMut::from(wire);
    let head = parse_head(&mut buf, method)?.ok_or(FramingError::Incomplete)?;
    let mut state = head.body;
    let mut len = 0;
    loop {
        match decode(&mut state, &mut buf)? {
            Step::Frame(frame) => len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Step::End => return Ok((head.response.status(), len)),
            Step::NeedMore if state == BodyState::Close => return Ok((head.response.status(), len)),
            Step::NeedMore => return Err(FramingError::Incomplete),
        }
    }
}

/// A request as Meridian's own exchange sends it, borrowed from the client's request: no
/// request is built and no header map copied per attempt; the wire form is the only copy.
pub(crate) struct OwnRequest<'a> {
    pub(crate) method: &'a Method,
    /// The origin form (path and query) the endpoint gets.
    pub(crate) path: std::borrow::Cow<'a, str>,
    pub(crate) headers: RequestFields<'a>,
    /// One field more for this endpoint (a region's load-report request), sent unless the
    /// headers carry it.
    pub(crate) extra: Option<(&'static str, &'static str)>,
    /// The fields Meridian adds to a client's request, sent in place of the client's fields
    /// they supersede.
    pub(crate) added: Option<&'a crate::forward::rewrite::AddedFields>,
    /// The whole body (empty for none).
    pub(crate) body: Bytes,
}

/// The request head in HTTP/1.1 wire form, with `inline` (the body, or nothing when it
/// follows separately) behind it: Content-Length is the known body's (none for a bodiless
/// GET or HEAD that did not state one), Transfer-Encoding never (the body is whole); `host`
/// is sent when the headers carry none.
pub(crate) fn encode_head(req: &OwnRequest<'_>, host: &str, inline: &[u8]) -> Vec<u8> {
    let headers = req.headers;
    let raw = headers.listed_head();
    let mut out = Vec::with_capacity(256 + raw.len() + headers.len() * 16 + inline.len());
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let fields_at = out.len();
    let mut w = FieldWriter {
        out,
        raw,
        run: 0..0,
        req,
        hosted: false,
        stated: false,
        has_extra: false,
        chained: false,
    };
    let (listed, map) = headers.sources();
    if let Some(listed) = listed {
        let shadowing = !map.is_empty();
        for (name, value, line) in listed.lines() {
            if !(shadowing && shadowed(map, name)) {
                w.field(name, value, line);
            }
        }
    }
    for (name, value) in map {
        w.field(name.as_str().as_bytes(), value.as_bytes(), None);
    }
    w.flush();
    let FieldWriter {
        mut out,
        hosted,
        stated,
        has_extra,
        chained,
        ..
    } = w;
    if let Some(added) = req.added {
        if !chained {
            out.extend_from_slice(b"x-forwarded-for: ");
            out.extend_from_slice(added.peer.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        for (name, value) in added.others() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    if !hosted {
        // First, as user agents send it (RFC 9110 §7.2); rare: HTTP/2 requests carry their
        // authority to here as a Host field already.
        let line = [b"host: ", host.as_bytes(), b"\r\n"].concat();
        out.splice(fields_at..fields_at, line);
    }
    if let Some((name, value)) = req.extra.filter(|_| !has_extra) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = matches!(
        *req.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::DELETE
    );
    if !req.body.is_empty() || stated || !bodiless {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(req.body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(inline);
    out
}

/// The request fields the endpoint's head writer treats apart, told from their names (any
/// case) by length first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SentName {
    Host,
    ContentLength,
    TransferEncoding,
    XForwardedFor,
    XForwardedProto,
    XRequestId,
    XMeridianCountry,
    Other,
}

impl SentName {
    fn of(name: &[u8]) -> SentName {
        // Eight bytes a step (`token_is`), not a byte a step: this runs for every field.
        let is = |lower: &[u8]| token_is(name, lower);
        match name.len() {
            4 if is(b"host") => SentName::Host,
            12 if is(b"x-request-id") => SentName::XRequestId,
            14 if is(b"content-length") => SentName::ContentLength,
            15 if is(b"x-forwarded-for") => SentName::XForwardedFor,
            17 if is(b"transfer-encoding") => SentName::TransferEncoding,
            17 if is(b"x-forwarded-proto") => SentName::XForwardedProto,
            18 if is(b"x-meridian-country") => SentName::XMeridianCountry,
            _ => SentName::Other,
        }
    }

    /// The client's fields of this name are not sent as they came: an added one takes their
    /// place (`X-Forwarded-For`: the chain they hold, with the peer appended).
    fn superseded_by(self, added: &crate::forward::rewrite::AddedFields) -> bool {
        match self {
            SentName::XForwardedFor | SentName::XMeridianCountry => true,
            SentName::XForwardedProto => added.forwarded_proto.is_some(),
            SentName::XRequestId => added.request_id.is_some(),
            _ => false,
        }
    }
}

/// [`encode_head`]'s pass over the client's fields: one pass writes them and notes what
/// decides the rest (names are told apart by their lengths first: this runs for every
/// field of every request).
struct FieldWriter<'r, 'a> {
    out: Vec<u8>,
    /// The client's head, where its listed fields lie.
    raw: &'a [u8],
    /// Fields passed on as they came lie in the head as consecutive lines: a run of them
    /// is copied at once (names as the client sent them, as NGINX passes them).
    run: Range<usize>,
    req: &'r OwnRequest<'a>,
    hosted: bool,
    stated: bool,
    has_extra: bool,
    /// A trusted peer's X-Forwarded-For chain is written where its first value stands,
    /// every value of it joined there, the peer appended.
    chained: bool,
}

impl FieldWriter<'_, '_> {
    /// One field; `line`: where its whole line lies in the client's head, if it does.
    fn field(&mut self, name: &[u8], value: &[u8], line: Option<Range<usize>>) {
        let known = SentName::of(name);
        let passed = match (known, self.req.added) {
            (SentName::XForwardedFor, Some(added)) => {
                if added.appends && !self.chained {
                    self.flush();
                    let out = &mut self.out;
                    out.extend_from_slice(b"x-forwarded-for: ");
                    for (i, value) in self.req.headers.values(&X_FORWARDED_FOR).enumerate() {
                        if i > 0 {
                            out.extend_from_slice(b", ");
                        }
                        out.extend_from_slice(value);
                    }
                    end_chain(out, &added.peer);
                    self.chained = true;
                }
                false
            }
            (known, Some(added)) if known.superseded_by(added) => false,
            (SentName::ContentLength, _) => {
                self.stated = true;
                false
            }
            (SentName::TransferEncoding, _) => false,
            (known, _) => {
                self.hosted |= known == SentName::Host;
                if let Some((extra, _)) = self.req.extra {
                    self.has_extra |= token_is(name, extra.as_bytes());
                }
                true
            }
        };
        match line {
            Some(line) if passed && line.start == self.run.end && !self.run.is_empty() => self.run.end = line.end,
            Some(line) if passed => {
                self.flush();
                self.run = line;
            }
            _ => {
                self.flush();
                if passed {
                    let out = &mut self.out;
                    out.extend_from_slice(name);
                    out.extend_from_slice(b": ");
                    out.extend_from_slice(value);
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
    }

    /// Writes the run of whole lines of the client's head, and empties it.
    fn flush(&mut self) {
        if let Some(lines) = self.raw.get(self.run.clone()) {
            self.out.extend_from_slice(lines);
        }
        self.run = 0..0;
    }
}

/// Ends an `X-Forwarded-For` line written from a trusted peer's chain: the peer appended.
fn end_chain(out: &mut Vec<u8>, peer: &HeaderValue) {
    out.extend_from_slice(b", ");
    out.extend_from_slice(peer.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A connection's response-head deadline: one timer for the connection's life, not one
/// per request. Registering and cancelling a timer in tokio's wheel for every request (the
/// usual `timeout`) takes the driver's lock twice; this one stays armed across requests and
/// is moved only when it fires before the current request's due time (requests of one
/// config share one timeout, so due times only grow: about once per timeout a connection)
/// or when a due time precedes it (a reload shortened the timeout).
#[derive(Default)]
pub(crate) struct HeadDeadline {
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Where `timer` is set.
    armed: Option<tokio::time::Instant>,
}

impl HeadDeadline {
    /// Ready once `due` has passed; registers the task's waker otherwise.
    pub(crate) fn poll_due(&mut self, due: tokio::time::Instant, cx: &mut Context<'_>) -> Poll<()> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        let armed = self.armed.get_or_insert(due);
        if *armed > due {
            timer.as_mut().reset(due);
            *armed = due;
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired at `armed`: the request is late if that was its own due time (or later).
            if due <= *armed {
                return Poll::Ready(());
            }
            // Set for an earlier request: now for this one (polled again, it registers).
            timer.as_mut().reset(due);
            *armed = due;
        }
    }
}

/// One request on `conn`: the head (with the body behind it when small), then the response
/// head, which is due by `deadline` (`None`: the caller keeps its own). The body is read
/// later through the returned [`H1Body`], which gives the connection back when it ends.
///
/// An `async` block rather than an `async fn`, which would keep the request twice in its
/// state and copy it from one to the other when it starts.
#[allow(clippy::manual_async_fn)] // why: the state size, above
pub(crate) fn exchange(
    mut conn: Box<Conn>,
    req: OwnRequest<'_>,
    host: &str,
    deadline: Option<std::time::Instant>,
) -> impl Future<Output = Result<Response<H1Body>, UpstreamError>> + Send {
    async move {
        let mut timer = std::mem::take(&mut conn.head_deadline);
        let head = {
            let mut answer = std::pin::pin!(send_and_read_head(&mut conn, &req, host));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(head) = answer.as_mut().poll(cx) {
                    return Poll::Ready(head);
                }
                match deadline {
                    Some(due) => timer
                        .poll_due(due.into(), cx)
                        .map(|()| Err(UpstreamError::bare(UpstreamErrorKind::HeadTimeout))),
                    None => Poll::Pending,
                }
            })
            .await?
        };
        conn.head_deadline = timer;
        let (parts, ()) = head.response.into_parts();
        let mut body = H1Body {
            conn: Some(conn),
            state: head.body,
            keep_alive: head.keep_alive,
            fields: Some(head.fields),
        };
        if body.state == BodyState::Done {
            body.finish();
        }
        Ok(Response::from_parts(parts, body))
    }
}

/// Writes the request and reads the response head.
async fn send_and_read_head(conn: &mut Conn, req: &OwnRequest<'_>, host: &str) -> Result<Head, UpstreamError> {
    let body = &req.body;
    let inline: &[u8] = if body.len() <= INLINE_BODY { body } else { &[] };
    let head = encode_head(req, host, inline);
    let method = req.method;
    let mut unsent: [&[u8]; 2] = [&head, if inline.is_empty() { body } else { &[] }];
    match std::future::poll_fn(|cx| poll_send(conn, &mut unsent, method, cx)).await {
        Ok(Sent::All) => read_head(conn, method).await,
        // The rest of the request was never sent: the connection cannot carry another.
        Ok(Sent::Answered(head)) => Ok(Head {
            keep_alive: false,
            ..head
        }),
        Err(SendError::Head(e)) => Err(UpstreamError::new(UpstreamErrorKind::Protocol, e)),
        // An endpoint may answer before the body is all sent (413, then close): that answer,
        // if it came, is the response; the connection is not reused either way.
        Err(SendError::Io(e)) => match read_head(conn, method).await {
            Ok(head) => Ok(Head {
                keep_alive: false,
                ..head
            }),
            Err(_) => Err(UpstreamError::new(UpstreamErrorKind::ResetBeforeHead, e)),
        },
    }
}

/// How a request's write ended.
enum Sent {
    /// Every byte is written; the response comes next.
    All,
    /// The endpoint answered while the request was still going out.
    Answered(Head),
}

/// Why a request's write ended before its response head.
enum SendError {
    /// The connection failed (or the endpoint closed it); an answer may still be buffered.
    Io(io::Error),
    /// The endpoint answered with something that is not an HTTP/1.1 response head.
    Head(FramingError),
}

/// Writes what is left of `unsent`. While the endpoint does not take more, what it sends is
/// read: a server that refuses a body answers before reading it, and may then neither
/// read nor close (RFC 9112 §9.5: the client watches for that answer and stops sending).
/// The common request goes out in one write and never reads here.
fn poll_send(
    conn: &mut Conn,
    unsent: &mut [&[u8]; 2],
    method: &Method,
    cx: &mut Context<'_>,
) -> Poll<Result<Sent, SendError>> {
    loop {
        let Some(next) = unsent.iter_mut().find(|part| !part.is_empty()) else {
            return Pin::new(&mut conn.io)
                .poll_flush(cx)
                .map(|flushed| flushed.map(|()| Sent::All).map_err(SendError::Io));
        };
        match Pin::new(&mut conn.io).poll_write(cx, next) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(SendError::Io(io::ErrorKind::WriteZero.into()))),
            Poll::Ready(Ok(n)) => *next = &next[n..],
            Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Io(e))),
            Poll::Pending => loop {
                match conn.poll_fill(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(SendError::Io(io::ErrorKind::UnexpectedEof.into())));
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Io(e))),
                    Poll::Ready(Ok(_)) => match parse_head(&mut conn.read_buf, method) {
                        Ok(Some(head)) => return Poll::Ready(Ok(Sent::Answered(head))),
                        Ok(None) => {}
                        Err(e) => return Poll::Ready(Err(SendError::Head(e))),
                    },
                }
            },
        }
    }
}

/// The next read's size: doubled after a read that filled what it asked for (more is
/// waiting), up to [`MAX_READ_SIZE`].
fn next_read_size(current: usize, asked: usize, got: usize) -> usize {
    if got == asked && asked > 0 {
        (current * 2).min(MAX_READ_SIZE)
    } else {
        current
    }
}

/// Reads until a whole response head is in, skipping interim responses.
async fn read_head(conn: &mut Conn, method: &Method) -> Result<Head, UpstreamError> {
    loop {
        match parse_head(&mut conn.read_buf, method) {
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(e) => return Err(UpstreamError::new(UpstreamErrorKind::Protocol, e)),
        }
        match std::future::poll_fn(|cx| conn.poll_fill(cx)).await {
            Ok(0) => {
                return Err(UpstreamError::new(
                    UpstreamErrorKind::ResetBeforeHead,
                    "the endpoint closed the connection before a response",
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(UpstreamError::new(UpstreamErrorKind::ResetBeforeHead, e)),
        }
    }
}

impl Conn {
    /// Reads more of the endpoint's bytes into the buffer; `Ok(0)` at the connection's end.
    pub(crate) fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < self.read_size / 4 {
            self.read_buf.reserve(self.read_size);
        }
        let spare = self.read_buf.spare_capacity_mut();
        let asked = spare.len();
        let mut read = ReadBuf::uninit(spare);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                let n = read.filled().len();
                // SAFETY: `poll_read` initialised the first `n` spare bytes.
                unsafe { self.read_buf.set_len(self.read_buf.len() + n) };
                self.read_size = next_read_size(self.read_size, asked, n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// True unless the endpoint closed the idle connection or sent something unasked: a
    /// read that would block is the only good answer. No syscall when the socket reported
    /// nothing since the last read.
    pub(crate) fn idle_and_open(&mut self) -> bool {
        if !self.read_buf.is_empty() {
            return false;
        }
        self.io.reads_nothing()
    }
}

/// Why reading an endpoint's response body failed.
#[derive(Debug, thiserror::Error)]
pub enum H1BodyError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The bytes are not a body of the framing the head announced.
    #[error("{0}")]
    Framing(#[from] FramingError),
}

/// A response body read straight off its connection; the connection goes back to its pool
/// when the body ends cleanly, and is closed if it is dropped before.
pub struct H1Body {
    /// Boxed since connect: it moves between the pool and bodies as a pointer.
    conn: Option<Box<Conn>>,
    state: BodyState,
    keep_alive: bool,
    /// The response's fields, until the client's connection writes (or maps) them.
    fields: Option<Box<EndpointFields>>,
}

impl H1Body {
    pub(crate) fn fields(&self) -> Option<&EndpointFields> {
        self.fields.as_deref()
    }

    pub(crate) fn fields_mut(&mut self) -> Option<&mut EndpointFields> {
        self.fields.as_deref_mut()
    }

    pub(crate) fn take_fields(&mut self) -> Option<Box<EndpointFields>> {
        self.fields.take()
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(conn) = self.conn.take() {
            // Bytes past the body's end would be read as the next response: not reused.
            if self.keep_alive && conn.read_buf.is_empty() {
                conn.checkin();
            }
        }
    }

    fn fail(&mut self, e: H1BodyError) -> Poll<Option<Result<Frame<Bytes>, H1BodyError>>> {
        self.state = BodyState::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = H1BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, H1BodyError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match decode(&mut this.state, &mut conn.read_buf) {
                Ok(Step::Frame(frame)) => {
                    if this.state == BodyState::Done {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => return this.fail(e.into()),
            }
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) if this.state == BodyState::Close => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return this.fail(FramingError::Incomplete.into()),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(e.into()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::TestResult;

    /// Polls the deadline once, as a request's exchange does while it waits.
    async fn poll_once(d: &mut HeadDeadline, due: tokio::time::Instant) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(d.poll_due(due, cx))).await
    }

    #[tokio::test]
    async fn a_head_deadline_fires_at_its_due_time() {
        let mut d = HeadDeadline::default();
        let due = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        let fired = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| d.poll_due(due, cx)),
        )
        .await;
        assert!(fired.is_ok(), "never fired");
        assert!(tokio::time::Instant::now() >= due);
    }

    #[tokio::test]
    async fn a_timer_armed_for_an_earlier_request_does_not_end_a_later_one() {
        let mut d = HeadDeadline::default();
        let now = tokio::time::Instant::now();
        // The first request's due time passes while the timer stays armed for it...
        assert!(
            poll_once(&mut d, now + std::time::Duration::from_millis(10))
                .await
                .is_pending()
        );
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        // ...and the next request on the connection, due in an hour, is not late.
        let later = tokio::time::Instant::now() + std::time::Duration::from_secs(3600);
        assert!(poll_once(&mut d, later).await.is_pending());
        assert_eq!(d.armed, Some(later), "re-armed for the request waiting now");
        // A due time before the armed one (a reload shortened the timeout) moves it back.
        let past = tokio::time::Instant::now();
        let fired = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| d.poll_due(past, cx)),
        )
        .await;
        assert!(fired.is_ok(), "the earlier due time was not kept");
        assert_eq!(d.armed, Some(past));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    /// Method, status, version, headers; the framing expected.
    type FramingCase<'a> = (
        &'a Method,
        StatusCode,
        Version,
        &'a [(&'a str, &'a str)],
        Result<(BodyState, bool), FramingError>,
    );

    /// Bytes on the wire; the body expected.
    type DecodeCase<'a> = (&'a [u8], Result<&'a [u8], FramingError>);

    /// A whole response on the wire; its status and body length.
    type ResponseCase<'a> = (&'a [u8], Result<(u16, u64), FramingError>);

    #[test]
    fn reads_grow_only_when_filled() {
        let cases = [
            (READ_SIZE, READ_SIZE, READ_SIZE, 2 * READ_SIZE),
            (READ_SIZE, READ_SIZE, 100, READ_SIZE),
            (MAX_READ_SIZE, MAX_READ_SIZE, MAX_READ_SIZE, MAX_READ_SIZE),
            (READ_SIZE, 0, 0, READ_SIZE),
        ];
        for (current, asked, got, next) in cases {
            assert_eq!(next_read_size(current, asked, got), next, "{current} {asked} {got}");
        }
    }

    #[test]
    fn framing_table() {
        use BodyState::*;
        let get = Method::GET;
        let ok = StatusCode::OK;
        let h11 = Version::HTTP_11;
        let cases: &[FramingCase] = &[
            (&get, ok, h11, &[("content-length", "12")], Ok((Length(12), true))),
            (&get, ok, h11, &[("content-length", "0")], Ok((Done, true))),
            (&get, ok, h11, &[("content-length", "5, 5")], Ok((Length(5), true))),
            (
                &get,
                ok,
                h11,
                &[("content-length", "5"), ("content-length", "6")],
                Err(FramingError::ContentLength),
            ),
            (
                &get,
                ok,
                h11,
                &[("content-length", "-1")],
                Err(FramingError::ContentLength),
            ),
            (
                &get,
                ok,
                h11,
                &[("content-length", "")],
                Err(FramingError::ContentLength),
            ),
            (
                &get,
                ok,
                h11,
                &[("transfer-encoding", "chunked")],
                Ok((Chunked(Chunk::Size), true)),
            ),
            (
                &get,
                ok,
                h11,
                &[("transfer-encoding", "gzip, Chunked")],
                Ok((Chunked(Chunk::Size), true)),
            ),
            (
                &get,
                ok,
                h11,
                &[("transfer-encoding", "chunked, gzip")],
                Err(FramingError::TransferCoding),
            ),
            // Both: Transfer-Encoding wins and the connection is not reused.
            (
                &get,
                ok,
                h11,
                &[("transfer-encoding", "chunked"), ("content-length", "3")],
                Ok((Chunked(Chunk::Size), false)),
            ),
            (&get, ok, h11, &[], Ok((Close, false))),
            (
                &get,
                ok,
                h11,
                &[("connection", "close"), ("content-length", "2")],
                Ok((Length(2), false)),
            ),
            (
                &get,
                ok,
                Version::HTTP_10,
                &[("content-length", "2")],
                Ok((Length(2), false)),
            ),
            (
                &get,
                ok,
                Version::HTTP_10,
                &[("connection", "Keep-Alive"), ("content-length", "2")],
                Ok((Length(2), true)),
            ),
            (&Method::HEAD, ok, h11, &[("content-length", "100")], Ok((Done, true))),
            (&get, StatusCode::NO_CONTENT, h11, &[], Ok((Done, true))),
            (
                &get,
                StatusCode::NOT_MODIFIED,
                h11,
                &[("content-length", "100")],
                Ok((Done, true)),
            ),
        ];
        for (method, status, version, pairs, want) in cases {
            let map = headers(pairs);
            let got = framing(method, *status, *version, (&map, FramingFields::of(&map)));
            assert_eq!(&got, want, "{method} {status} {version:?} {pairs:?}");
        }
    }

    /// Feeds `wire` to the decoder in pieces of `step` bytes, as reads would deliver it.
    fn decode_all(
        mut state: BodyState,
        wire: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), FramingError> {
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut fed = 0;
        loop {
            match decode(&mut state, &mut buf)? {
                Step::Frame(f) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Step::End => return Ok((data, trailers)),
                Step::NeedMore if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Step::NeedMore if state == BodyState::Close => return Ok((data, trailers)),
                Step::NeedMore => return Err(FramingError::Incomplete),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let chunked = BodyState::Chunked(Chunk::Size);
        let cases: &[DecodeCase] = &[
            (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", Ok(b"hello world")),
            (b"A;name=value\r\n0123456789\r\n0\r\n\r\n", Ok(b"0123456789")),
            (b"a \r\n0123456789\r\n0\r\n\r\n", Ok(b"0123456789")),
            (b"0\r\n\r\n", Ok(b"")),
            (b"5\r\nhelloXX0\r\n\r\n", Err(FramingError::ChunkEnd)),
            (b"5\nhello\r\n0\r\n\r\n", Err(FramingError::ChunkSize)),
            (b"-5\r\nhello\r\n0\r\n\r\n", Err(FramingError::ChunkSize)),
            (b"0x5\r\nhello\r\n0\r\n\r\n", Err(FramingError::ChunkSize)),
            (b"1000000000000000\r\n", Err(FramingError::ChunkSize)),
            (b"5\r\nhel", Err(FramingError::Incomplete)),
        ];
        for (wire, want) in cases {
            for step in [1, 2, 3, 7, wire.len().max(1)] {
                let got = decode_all(chunked, wire, step).map(|(d, _)| d);
                let want = want.map(<[u8]>::to_vec);
                assert_eq!(got, want, "{:?} in steps of {step}", String::from_utf8_lossy(wire));
            }
        }
    }

    /// `data` in chunks of the given sizes (the last chunk takes the rest), then the last-chunk.
    fn chunked(data: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut wire = Vec::new();
        let mut rest = data;
        for &size in sizes.iter().chain(std::iter::once(&usize::MAX)) {
            let take = size.clamp(1, rest.len().max(1)).min(rest.len());
            if take == 0 {
                break;
            }
            wire.extend_from_slice(format!("{take:x}\r\n").as_bytes());
            wire.extend_from_slice(&rest[..take]);
            wire.extend_from_slice(b"\r\n");
            rest = &rest[take..];
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        wire
    }

    proptest::proptest! {
        #[test]
        fn any_chunking_in_any_reads_gives_back_the_data(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..2000),
            sizes in proptest::collection::vec(1usize..300, 0..20),
            step in 1usize..64,
        ) {
            let wire = chunked(&data, &sizes);
            let got = decode_all(BodyState::Chunked(Chunk::Size), &wire, step).map(|(d, _)| d);
            proptest::prop_assert_eq!(got, Ok(data));
        }

        #[test]
        fn arbitrary_bytes_never_panic(wire in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = read_whole_response(&Method::GET, &wire);
            let mut prefixed = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
            prefixed.extend_from_slice(&wire);
            let _ = read_whole_response(&Method::GET, &prefixed);
        }
    }

    #[test]
    fn whole_responses_read_as_an_endpoint_sends_them() {
        let cases: &[ResponseCase] = &[
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", Ok((200, 5))),
            (b"HTTP/1.1 200 OK\r\n\r\nread to the close", Ok((200, 17))),
            (b"HTTP/1.1 204 No Content\r\n\r\n", Ok((204, 0))),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
                Ok((200, 2)),
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort",
                Err(FramingError::Incomplete),
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
                Err(FramingError::ContentLength),
            ),
            (b"HTTP/1.1 200", Err(FramingError::Incomplete)),
        ];
        for (wire, want) in cases {
            let got = read_whole_response(&Method::GET, wire).map(|(s, n)| (s.as_u16(), n));
            assert_eq!(&got, want, "{}", String::from_utf8_lossy(wire));
        }
    }

    #[test]
    fn chunked_trailers_become_a_trailers_frame() -> Result<(), FramingError> {
        let wire = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-usage: 12\r\n\r\n";
        for step in [1, 5, wire.len()] {
            let (data, trailers) = decode_all(BodyState::Chunked(Chunk::Size), wire, step)?;
            assert_eq!(data, b"abc");
            let trailers = trailers.ok_or(FramingError::Trailers)?;
            assert_eq!(trailers.get("x-usage").map(|v| v.as_bytes()), Some(&b"12"[..]));
        }
        Ok(())
    }

    #[test]
    fn a_chunk_line_without_end_is_refused_at_its_limit() {
        let wire = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert_eq!(
            decode_all(BodyState::Chunked(Chunk::Size), &wire, wire.len()).err(),
            Some(FramingError::ChunkSize)
        );
    }

    #[test]
    fn length_and_close_bodies() {
        assert_eq!(
            decode_all(BodyState::Length(5), b"hello", 2).ok().map(|(d, _)| d),
            Some(b"hello".to_vec())
        );
        assert_eq!(
            decode_all(BodyState::Length(6), b"hello", 2).err(),
            Some(FramingError::Incomplete)
        );
        assert_eq!(
            decode_all(BodyState::Close, b"to the end", 3).ok().map(|(d, _)| d),
            Some(b"to the end".to_vec())
        );
        // A Length body never takes the next response's bytes.
        let mut buf = BytesMut::from(&b"helloHTTP/1.1"[..]);
        let mut state = BodyState::Length(5);
        assert!(matches!(decode(&mut state, &mut buf), Ok(Step::Frame(_))));
        assert_eq!((state, &buf[..]), (BodyState::Done, &b"HTTP/1.1"[..]));
    }

    #[test]
    fn response_heads_parse_skip_interim_and_refuse_garbage() {
        let get = Method::GET;
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\n"[..]);
        let head = parse_head(&mut buf, &get)
            .ok()
            .flatten()
            .map(|h| (h.response.status(), h.body, h.keep_alive));
        assert_eq!(head, Some((StatusCode::OK, BodyState::Chunked(Chunk::Size), true)));
        assert_eq!(&buf[..], b"5\r\n", "the body's bytes stay in the buffer");

        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(matches!(parse_head(&mut partial, &get), Ok(None)));
        let mut garbage = BytesMut::from(&b"SSH-2.0-OpenSSH\r\n\r\n"[..]);
        assert_eq!(parse_head(&mut garbage, &get).err(), Some(FramingError::Head));
        for code in ["600", "999"] {
            let mut beyond = BytesMut::from(format!("HTTP/1.1 {code} Odd\r\ncontent-length: 0\r\n\r\n").as_bytes());
            assert_eq!(parse_head(&mut beyond, &get).err(), Some(FramingError::Head), "{code}");
        }
        let mut switch = BytesMut::from(&b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..]);
        assert_eq!(
            parse_head(&mut switch, &get).err(),
            Some(FramingError::UnexpectedSwitch)
        );
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        huge.extend_from_slice(&vec![b'x'; MAX_HEAD]);
        assert_eq!(parse_head(&mut huge, &get).err(), Some(FramingError::HeadTooLarge));
        // A head that arrives whole is held to the bound too: one byte over, refused; at it,
        // read.
        let frame = "HTTP/1.1 200 OK\r\nx-big: \r\ncontent-length: 0\r\n\r\n";
        for (pad, refused) in [
            (100_000, true),
            (MAX_HEAD - frame.len() + 1, true),
            (MAX_HEAD - frame.len(), false),
        ] {
            let wire = frame.replace("x-big: ", &format!("x-big: {}", "v".repeat(pad)));
            let got = parse_head(&mut BytesMut::from(wire.as_str()), &get);
            assert_eq!(got.err() == Some(FramingError::HeadTooLarge), refused, "{pad}");
        }
    }

    #[test]
    fn known_names_are_what_parsing_them_gives() -> TestResult {
        let names = [
            "host",
            "date",
            "accept",
            "user-agent",
            "content-type",
            "authorization",
            "accept-encoding",
            "x-forwarded-for",
            "x-stainless-package-version",
            "x-stainless-runtime-version",
            "x-stainless-read-timeout",
            "openai-organization",
            "traceparent",
            "x-ratelimit-remaining-requests",
            "endpoint-load-metrics",
            "content-length",
            "transfer-encoding",
            "connection",
            "expect",
            "upgrade",
            "te",
        ];
        for lower in names {
            let title: String = lower
                .split('-')
                .map(|w| w[..1].to_ascii_uppercase() + &w[1..])
                .collect::<Vec<_>>()
                .join("-");
            for name in [lower.to_string(), lower.to_ascii_uppercase(), title] {
                let known = known_name(name.as_bytes()).ok_or(name.clone())?;
                assert_eq!(*known, HeaderName::from_bytes(name.as_bytes())?, "{name}");
            }
            // One byte off, anywhere, is another name.
            for at in 0..lower.len() {
                for other in [b'_', b'^', b'~', b'.', b'0'] {
                    let mut near = lower.as_bytes().to_vec();
                    if near[at] == other {
                        continue;
                    }
                    near[at] = other;
                    assert!(known_name(&near).is_none(), "{}", String::from_utf8_lossy(&near));
                }
            }
        }
        for other in ["x-custom", "x-forwarded-fox", "x_forwarded_for", "", "x-stainless-"] {
            assert!(known_name(other.as_bytes()).is_none(), "{other}");
        }
        Ok(())
    }

    #[test]
    fn or_ing_the_case_bit_matches_a_token_only_to_its_own_letters() {
        // RFC 9110 §5.6.2 tchar: the bytes a parsed name can hold.
        let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        let known = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-';
        for b in (0..=u8::MAX).filter(|&b| tchar(b)) {
            for k in (0..=u8::MAX).filter(|&k| known(k)) {
                assert_eq!(token_is(&[b], &[k]), b.eq_ignore_ascii_case(&k), "{b:#x} {k:#x}");
                // The same through the word-at-a-time path.
                let (mut name, mut lower) = (*b"abcdefgh-", *b"abcdefgh-");
                name[3] = b;
                lower[3] = k;
                assert_eq!(token_is(&name, &lower), b.eq_ignore_ascii_case(&k), "{b:#x} {k:#x}");
            }
        }
    }

    #[test]
    fn parsed_fields_share_the_head() -> TestResult {
        // In a parsed head too: the name as `http` would spell it, the value as sent.
        let head = Bytes::from_static(b"X-Request-ID: abc\r\nX-Custom: 1\r\n");
        let span = |name: [u32; 2], value: [u32; 2]| FieldSpan { name, value };
        let (fields, _) = fields_of(&head, &[span([0, 12], [14, 17]), span([19, 27], [29, 30])], 0).ok_or("invalid")?;
        assert_eq!(fields["x-request-id"], "abc");
        assert_eq!(fields["x-custom"], "1");
        // The framing fields it notes are the ones the map holds, whatever their case.
        let head = Bytes::from_static(
            b"Connection: close\r\nTRANSFER-encoding: chunked\r\ncontent-length: 1\r\nExpect: 100-continue\r\nHost: a\r\nUPGRADE: websocket\r\nte: trailers\r\n",
        );
        let mut at = 0;
        let spans: Vec<FieldSpan> = head
            .split_inclusive(|&b| b == b'\n')
            .map(|line| {
                let colon = line.iter().position(|&b| b == b':').unwrap_or(0) as u32;
                let (start, len) = (at, line.len() as u32);
                at += len;
                span([start, start + colon], [start + colon + 2, start + len - 2])
            })
            .collect();
        for n in 0..=spans.len() {
            let (map, noted) = fields_of(&head, &spans[..n], 0).ok_or("invalid")?;
            assert_eq!(noted, FramingFields::of(&map), "the first {n} fields");
        }
        let (map, noted) = fields_of(&head, &spans, 0).ok_or("invalid")?;
        assert_eq!(map["host"], "a");
        assert!(noted.connection && noted.transfer_encoding && noted.content_length && noted.expect);
        assert!(noted.upgrade && noted.te);
        // Known names, noted through the length filter: each framing name's length is in it.
        for name in [
            "connection",
            "transfer-encoding",
            "content-length",
            "expect",
            "upgrade",
            "te",
        ] {
            assert!(known_name(name.as_bytes()).is_some(), "{name}");
            assert_ne!(FramingFields::LENGTHS & (1 << name.len()), 0, "{name}");
        }
        // A span past the head's end is refused, not a panic.
        assert!(fields_of(&head, &[span([0, 12], [14, 99])], 0).is_none());
        assert!(fields_of(&head, &[span([0, 99], [14, 17])], 0).is_none());
        Ok(())
    }

    #[test]
    fn request_heads_state_the_known_body() {
        let h = headers(&[
            ("host", "api.example"),
            ("content-length", "999"),
            ("transfer-encoding", "chunked"),
            ("x-request-id", "abc"),
        ]);
        let wire = encode_head(
            &own(&Method::POST, "/v1/chat/completions", &h, b"{}"),
            "10.0.0.1:8000",
            b"{}",
        );
        let text = String::from_utf8_lossy(&wire);
        assert!(text.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"), "{text}");
        assert!(
            text.contains("\r\nhost: api.example\r\n") && !text.contains("10.0.0.1"),
            "{text}"
        );
        assert!(
            text.contains("\r\ncontent-length: 2\r\n") && !text.contains("999"),
            "{text}"
        );
        assert!(!text.contains("transfer-encoding"), "{text}");
        assert!(text.ends_with("\r\n\r\n{}"), "{text}");

        let none = HeaderMap::new();
        let wire = encode_head(&own(&Method::GET, "/health", &none, b""), "10.0.0.1:8000", b"");
        assert_eq!(&wire[..], b"GET /health HTTP/1.1\r\nhost: 10.0.0.1:8000\r\n\r\n");
        // Without a Host field, the endpoint's authority goes first, before the others.
        let hostless = headers(&[("accept", "*/*"), ("x-request-id", "abc")]);
        let wire = encode_head(&own(&Method::GET, "/", &hostless, b""), "10.0.0.1:8000", b"");
        assert_eq!(
            &wire[..],
            b"GET / HTTP/1.1\r\nhost: 10.0.0.1:8000\r\naccept: */*\r\nx-request-id: abc\r\n\r\n"
        );
        let wire = encode_head(&own(&Method::POST, "/x", &none, b""), "h", b"");
        assert!(String::from_utf8_lossy(&wire).contains("content-length: 0\r\n"));
        // A large body follows the head: its length is stated, its bytes are not inline.
        let wire = encode_head(&own(&Method::POST, "/x", &none, &[b'a'; 100]), "h", b"");
        assert!(String::from_utf8_lossy(&wire).ends_with("content-length: 100\r\n\r\n"));
    }

    fn own<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap, body: &[u8]) -> OwnRequest<'a> {
        OwnRequest {
            method,
            path: path.into(),
            headers: headers.into(),
            extra: None,
            added: None,
            body: Bytes::copy_from_slice(body),
        }
    }

    /// The fields of an encoded head, sorted (their order is not the point).
    fn sorted_fields(wire: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(wire);
        let mut fields: Vec<String> = text
            .split("\r\n")
            .skip(1)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        fields.sort();
        fields
    }

    #[test]
    fn the_added_fields_go_out_in_place_of_what_they_supersede() -> TestResult {
        use crate::forward::rewrite::{Forwarding, request_fields, request_headers};
        let cases: &[(bool, &[(&str, &str)])] = &[
            (
                false,
                &[
                    ("host", "a"),
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-proto", "https"),
                ],
            ),
            (
                true,
                &[
                    ("host", "a"),
                    ("x-forwarded-for", "81.2.69.142"),
                    ("x-forwarded-for", "10.0.0.1"),
                ],
            ),
            (
                true,
                &[("host", "a"), ("x-forwarded-proto", "https"), ("x-request-id", "abc")],
            ),
            (
                false,
                &[("host", "a"), ("x-request-id", ""), ("x-meridian-country", "US")],
            ),
            (false, &[("x-request-id", &*"x".repeat(201)), ("accept", "*/*")]),
        ];
        for (trusted, fields) in cases {
            let fwd = Forwarding {
                peer: "127.0.0.1".parse()?,
                peer_trusted: *trusted,
                proto: "http",
                country: "GB",
            };
            let mut kept = headers(fields);
            let (id, added) = request_fields(&mut kept, &fwd, false);
            let split = encode_head(
                &OwnRequest {
                    added: Some(&added),
                    ..own(&Method::GET, "/", &kept, b"")
                },
                "h",
                b"",
            );
            // The same request rewritten into one map, as hyper's clients get it.
            let mut whole = headers(fields);
            let whole_id = request_headers(&mut whole, &fwd, false);
            let whole_wire = encode_head(&own(&Method::GET, "/", &whole, b""), "h", b"");
            // Request ids are made afresh each time: compare them apart.
            let strip = |fields: Vec<String>| -> Vec<String> {
                fields
                    .into_iter()
                    .filter(|f| !f.starts_with("x-request-id: "))
                    .collect()
            };
            let (split, whole_wire) = (sorted_fields(&split), sorted_fields(&whole_wire));
            assert_eq!(strip(split.clone()), strip(whole_wire.clone()), "{fields:?}");
            let ids = |f: &[String]| f.iter().filter(|f| f.starts_with("x-request-id: ")).count();
            assert_eq!((ids(&split), ids(&whole_wire)), (1, 1), "{fields:?}");
            assert!(split.contains(&format!("x-request-id: {}", id.to_str()?)), "{fields:?}");
            assert_eq!(
                id == whole_id,
                fields
                    .iter()
                    .any(|(n, v)| *n == "x-request-id" && !v.is_empty() && v.len() <= 200)
            );
        }
        Ok(())
    }

    #[test]
    fn the_extra_field_is_sent_unless_the_client_sent_it() {
        let extra = Some(("endpoint-load-metrics-format", "TEXT"));
        let none = HeaderMap::new();
        let wire = encode_head(
            &OwnRequest {
                extra,
                ..own(&Method::GET, "/", &none, b"")
            },
            "h",
            b"",
        );
        assert!(String::from_utf8_lossy(&wire).contains("\r\nendpoint-load-metrics-format: TEXT\r\n"));
        let asked = headers(&[("endpoint-load-metrics-format", "JSON")]);
        let wire = encode_head(
            &OwnRequest {
                extra,
                ..own(&Method::GET, "/", &asked, b"")
            },
            "h",
            b"",
        );
        let text = String::from_utf8_lossy(&wire);
        assert!(text.contains("JSON") && !text.contains("TEXT"), "{text}");
    }
}
