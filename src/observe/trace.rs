//! Request tracing: W3C Trace Context (`traceparent` continued from the client or started,
//! sent to the endpoint) [pure parts], a server span per request and a client span per
//! upstream attempt, exported as OTLP/HTTP protobuf by one background task.
//!
//! Off unless `[tracing] otlp_endpoint` is set; off, a request pays one atomic load. A
//! reload that adds, changes or removes `[tracing]` applies to requests that start after it.
//! Spans are built as `opentelemetry-proto` messages and posted through Meridian's own
//! pooled hyper client, so the build gains no HTTP stack of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, header};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use prost::Message;
use tokio::sync::mpsc;

use crate::config::{TracingConfig, UpstreamProtocol};
use crate::forward::body::RequestBody;
use crate::forward::client::{PoolSettings, Upstreams};
use crate::forward::request_fields::RequestFields;

/// The `traceparent` request header.
pub(crate) const TRACEPARENT: http::header::HeaderName = http::header::HeaderName::from_static("traceparent");
const TRACESTATE: http::header::HeaderName = http::header::HeaderName::from_static("tracestate");

/// A parsed `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceParent {
    pub trace_id: [u8; 16],
    pub(crate) parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Reads a header value; `None` for anything W3C says to ignore (bad lengths, upper
    /// case, all-zero ids, version `ff`).
    pub(crate) fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let parent = parts.next()?;
        let flags = parts.next()?;
        let version = hex_byte(version)?;
        // Version 00 has exactly four parts; a later version may add more after them.
        if version == 0xff || (version == 0 && parts.next().is_some()) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        hex_into(trace, &mut trace_id)?;
        hex_into(parent, &mut parent_id)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags: hex_byte(flags)?,
        })
    }

    pub(crate) fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// The trace id of the client's `traceparent`, when it sent a valid one.
pub(crate) fn client_trace_id(headers: RequestFields<'_>) -> Option<String> {
    let value = headers.get_str(&TRACEPARENT)?;
    TraceParent::parse(value).map(|t| t.trace_id_hex())
}

fn hex_byte(s: &str) -> Option<u8> {
    let mut b = [0u8; 1];
    hex_into(s, &mut b)?;
    Some(b[0])
}

/// Lowercase hex of exactly `out.len()` bytes.
fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Spans waiting for export past this are dropped (and counted in the log once per batch):
/// a stuck collector must not grow memory.
const QUEUE: usize = 8192;
/// Spans per export request.
const BATCH: usize = 512;
/// How long a batch waits to fill before it is sent.
const LINGER: Duration = Duration::from_millis(200);

/// The tracer in force: `None` while `[tracing]` is absent. Replaced on reload; spans
/// begun under the one before go to whichever is in force when they end.
static TRACER: ArcSwapOption<Tracer> = ArcSwapOption::const_empty();
/// Whether [`TRACER`] holds one: read first, so a request with tracing off pays one
/// atomic load.
static ON: AtomicBool = AtomicBool::new(false);

struct Tracer {
    config: TracingConfig,
    spans: mpsc::Sender<Span>,
}

/// Puts `config` in force, at start and on every reload: a new or changed `[tracing]`
/// starts a new exporter task (the one before sends what it holds and ends with its last
/// sender), an unchanged one keeps the exporter running, `None` turns tracing off.
pub(crate) fn configure(config: Option<&TracingConfig>) -> Result<(), crate::forward::client::ClientSetupError> {
    let Some(config) = config else {
        if TRACER.swap(None).is_some() {
            ON.store(false, Ordering::Release);
            tracing::info!("tracing off");
        }
        return Ok(());
    };
    if TRACER.load().as_ref().is_some_and(|t| t.config == *config) {
        return Ok(());
    }
    let settings = PoolSettings {
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(90),
        // One collector: a few connections are plenty.
        keepalive: 4,
        limit: None,
    };
    let client = Upstreams::new(&settings, &Default::default())?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let url = format!("{}/v1/traces", config.endpoint.url);
    let resource = Resource {
        attributes: vec![
            kv("service.name", config.service_name.clone()),
            kv("service.version", env!("CARGO_PKG_VERSION").to_string()),
        ],
        ..Default::default()
    };
    tokio::spawn(export(rx, client, url, config.endpoint.authority.to_string(), resource));
    TRACER.store(Some(Arc::new(Tracer {
        config: config.clone(),
        spans: tx,
    })));
    ON.store(true, Ordering::Release);
    tracing::info!(endpoint = %config.endpoint.url, sample_ratio = config.sample_ratio, "tracing on: OTLP/HTTP export");
    Ok(())
}

/// Posts batches of finished spans to the collector until the process ends.
async fn export(mut rx: mpsc::Receiver<Span>, client: Upstreams, url: String, host: String, resource: Resource) {
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let body = encode(&resource, batch);
        let result = post(&client, &url, &host, body).await;
        // One warning when export starts failing, one line when it recovers.
        match (result, failing) {
            (Ok(()), true) => {
                failing = false;
                tracing::info!(endpoint = %url, "span export recovered");
            }
            (Err(error), false) => {
                failing = true;
                tracing::warn!(endpoint = %url, %error, "span export failed; spans are dropped until it works");
            }
            _ => {}
        }
    }
}

/// One OTLP export request holding `spans`.
pub(crate) fn encode(resource: &Resource, spans: Vec<Span>) -> Bytes {
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "meridian".to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    Bytes::from(request.encode_to_vec())
}

async fn post(client: &Upstreams, url: &str, host: &str, body: Bytes) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let mut req = Request::new(RequestBody::bytes(body));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
    if let Ok(h) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, h);
    }
    let resp = client
        .send(req, UpstreamProtocol::Http1, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    // Drain the answer so the connection goes back to the pool.
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("collector answered {}", status.as_u16()))
    }
}

/// Whether a new trace is sampled: parent-based, the client's `sampled` flag decides for
/// its trace; otherwise the trace id, read as a number, falls under `ratio` of its range
/// (the same id gives the same answer on every instance).
pub(crate) fn sampled(parent: Option<&TraceParent>, trace_id: &[u8; 16], ratio: f64) -> bool {
    if let Some(p) = parent {
        return p.flags & 1 == 1;
    }
    if ratio >= 1.0 {
        return true;
    }
    if ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let x = u64::from_be_bytes(low) >> 1;
    // Compared in 63 bits so the bound fits exactly in a u64.
    (x as f64) < ratio * (1u64 << 63) as f64
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
        if id != [0; N] {
            return id;
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

fn kv(key: &str, value: impl Into<AttributeValue>) -> KeyValue {
    let value = match value.into() {
        AttributeValue::Str(s) => any_value::Value::StringValue(s),
        AttributeValue::Int(i) => any_value::Value::IntValue(i),
        AttributeValue::Float(f) => any_value::Value::DoubleValue(f),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

enum AttributeValue {
    Str(String),
    Int(i64),
    Float(f64),
}

impl From<String> for AttributeValue {
    fn from(s: String) -> Self {
        AttributeValue::Str(s)
    }
}
impl From<&str> for AttributeValue {
    fn from(s: &str) -> Self {
        AttributeValue::Str(s.to_string())
    }
}
impl From<i64> for AttributeValue {
    fn from(i: i64) -> Self {
        AttributeValue::Int(i)
    }
}
impl From<f64> for AttributeValue {
    fn from(f: f64) -> Self {
        AttributeValue::Float(f)
    }
}

/// The trace of one request: its server span, open until the response ends.
#[derive(Debug, Clone)]
pub(crate) struct RequestTrace {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The client's span, when it sent a `traceparent`.
    pub(crate) parent_id: Option<[u8; 8]>,
    pub sampled: bool,
    tracestate: String,
    start: SystemTime,
    method: String,
    route: String,
}

impl RequestTrace {
    /// Opens the server span of a request: continues the client's trace or starts one.
    /// `None` when tracing is off.
    pub(crate) fn start(method: &Method, path: &str, headers: RequestFields<'_>) -> Option<Box<RequestTrace>> {
        if !ON.load(Ordering::Acquire) {
            return None;
        }
        let sample_ratio = TRACER.load().as_ref()?.config.sample_ratio;
        let parent = headers.get_str(&TRACEPARENT).and_then(TraceParent::parse);
        let trace_id = parent.map_or_else(random_id::<16>, |p| p.trace_id);
        let tracestate = headers
            .get_str(&TRACESTATE)
            .filter(|_| parent.is_some())
            .unwrap_or("")
            .to_string();
        Some(Box::new(RequestTrace {
            trace_id,
            span_id: random_id::<8>(),
            parent_id: parent.map(|p| p.parent_id),
            sampled: sampled(parent.as_ref(), &trace_id, sample_ratio),
            tracestate,
            start: SystemTime::now(),
            method: method.as_str().to_string(),
            route: path.to_string(),
        }))
    }

    pub(crate) fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Opens the client span of attempt `number` (1 for the first).
    pub(crate) fn attempt(&self, number: u32) -> AttemptSpan {
        AttemptSpan {
            span_id: random_id::<8>(),
            number,
            start: SystemTime::now(),
        }
    }

    /// The `traceparent` an endpoint receives for `attempt`: this trace, the attempt's
    /// span as parent, this request's sampling decision.
    pub(crate) fn traceparent(&self, attempt: &AttemptSpan) -> HeaderValue {
        let flags = if self.sampled { "01" } else { "00" };
        let value = format!("00-{}-{}-{flags}", hex(&self.trace_id), hex(&attempt.span_id));
        // unwrap-ok: lowercase hex and dashes are always a valid header value
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("00"))
    }

    /// Closes the server span and queues it for export.
    pub(crate) fn end(&self, fields: ServerFields<'_>) {
        if !self.sampled {
            return;
        }
        let mut attributes = vec![
            kv("http.request.method", self.method.as_str()),
            kv("http.route", self.route.as_str()),
            kv("http.response.status_code", i64::from(fields.status)),
            kv("client.geo.country_iso_code", fields.country),
            kv("meridian.zone", fields.zone.unwrap_or("-")),
            kv("meridian.region", fields.region.unwrap_or("none")),
            kv("meridian.attempts", i64::from(fields.attempts)),
        ];
        if let Some(error) = fields.error {
            attributes.push(kv("error.type", error));
        }
        let status = if fields.status >= 500 {
            status::StatusCode::Error
        } else {
            status::StatusCode::Unset
        };
        let name = format!("{} {}", self.method, self.route);
        self.send(
            self.span_id,
            self.parent_id,
            name,
            span::SpanKind::Server,
            self.start,
            attributes,
            status,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        span_id: [u8; 8],
        parent: Option<[u8; 8]>,
        name: String,
        kind: span::SpanKind,
        start: SystemTime,
        attributes: Vec<KeyValue>,
        code: status::StatusCode,
    ) {
        let tracer = TRACER.load();
        let Some(tracer) = tracer.as_ref() else { return };
        let span = Span {
            trace_id: self.trace_id.to_vec(),
            span_id: span_id.to_vec(),
            trace_state: self.tracestate.clone(),
            parent_span_id: parent.map_or_else(Vec::new, |p| p.to_vec()),
            flags: 1 | 0x100 | if self.parent_id.is_some() { 0x200 } else { 0 },
            name,
            kind: kind as i32,
            start_time_unix_nano: unix_nanos(start),
            end_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes,
            status: Some(Status {
                message: String::new(),
                code: code as i32,
            }),
            ..Default::default()
        };
        // A full queue drops the span rather than slow the request.
        let _ = tracer.spans.try_send(span);
    }
}

/// What the server span reports when it ends.
pub(crate) struct ServerFields<'a> {
    pub status: u16,
    pub country: &'static str,
    pub zone: Option<&'a str>,
    pub region: Option<&'a str>,
    pub attempts: u32,
    pub error: Option<&'static str>,
}

/// The client span of one upstream attempt.
#[derive(Debug)]
pub(crate) struct AttemptSpan {
    pub span_id: [u8; 8],
    number: u32,
    start: SystemTime,
}

/// What a client span reports when it ends.
pub(crate) struct AttemptFields<'a> {
    pub region: &'a str,
    pub endpoint: &'a str,
    /// The response head's status, when one came.
    pub status: Option<u16>,
    /// Why the attempt failed, when it did.
    pub error: Option<String>,
    /// Why this attempt went where it went, when it was not the first choice.
    pub failover_reason: Option<&'static str>,
    pub ttfb: Option<Duration>,
}

impl AttemptSpan {
    /// Closes the client span at the response head (or the failure) and queues it.
    pub(crate) fn end(self, trace: &RequestTrace, fields: AttemptFields<'_>) {
        if !trace.sampled {
            return;
        }
        let mut attributes = vec![
            kv("server.address", fields.endpoint),
            kv("meridian.region", fields.region),
            kv("meridian.attempt", i64::from(self.number)),
            kv("http.request.method", trace.method.as_str()),
        ];
        if let Some(status) = fields.status {
            attributes.push(kv("http.response.status_code", i64::from(status)));
        }
        if let Some(reason) = fields.failover_reason {
            attributes.push(kv("meridian.failover_reason", reason));
        }
        if let Some(ttfb) = fields.ttfb {
            attributes.push(kv("meridian.ttfb_ms", super::fields::ms(ttfb)));
        }
        let failed = fields.error.is_some() || fields.status.is_some_and(|s| s >= 500);
        if let Some(error) = fields.error {
            attributes.push(kv("error.type", error));
        }
        let code = if failed {
            status::StatusCode::Error
        } else {
            status::StatusCode::Unset
        };
        let name = format!("{} attempt {}", trace.method, self.number);
        trace.send(
            self.span_id,
            Some(trace.span_id),
            name,
            span::SpanKind::Client,
            self.start,
            attributes,
            code,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_table() {
        let cases = [
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Some(("4bf92f3577b34da6a3ce929d0e0e4736", 1)),
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-later",
                Some(("4bf92f3577b34da6a3ce929d0e0e4736", 0)),
            ),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", None),
            ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
            ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
            ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
            ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
            ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
            ("garbage", None),
            ("", None),
        ];
        for (value, want) in cases {
            let got = TraceParent::parse(value).map(|t| (t.trace_id_hex(), t.flags));
            assert_eq!(got, want.map(|(t, f)| (t.to_string(), f)), "{value}");
        }
    }

    #[test]
    fn sampling_table() {
        let parent = |flags| TraceParent {
            trace_id: [1; 16],
            parent_id: [2; 8],
            flags,
        };
        let low = [0u8; 16];
        let mut high = [0u8; 16];
        high[8] = 0xff;
        let cases = [
            (Some(parent(1)), low, 0.0, true),
            (Some(parent(0)), low, 1.0, false),
            (None, high, 1.0, true),
            (None, low, 0.0, false),
            (None, low, 0.5, true),
            (None, high, 0.5, false),
        ];
        for (p, id, ratio, want) in cases {
            assert_eq!(sampled(p.as_ref(), &id, ratio), want, "{p:?} {ratio}");
        }
        // Over many random ids the share sampled follows the ratio.
        let n = (0..10_000).filter(|_| sampled(None, &random_id::<16>(), 0.25)).count();
        assert!((2_000..3_000).contains(&n), "{n}");
    }
}
