//! One structured event per request, emitted when its response body is finished. Every
//! field is a JSON number or string: `-` where a string has no value, absent where a number
//! has none.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Version, header};

use super::fields::ms;
use crate::forward::request_fields::RequestFields;

/// Client-supplied strings are cut to this many bytes in the log.
const MAX_LOGGED: usize = 256;

/// Fields of one access-log line. Secrets (injected headers, `Authorization`) are never
/// part of it.
#[derive(Debug, Clone)]
pub(crate) struct AccessRecord {
    pub request_id: HeaderValue,
    pub client_ip: IpAddr,
    pub country: &'static str,
    /// Shared with the configuration: a clone per request, not a copy.
    pub zone: Option<std::sync::Arc<str>>,
    pub method: http::Method,
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub protocol: &'static str,
    pub host: Option<String>,
    pub user_agent: Option<String>,
    pub region: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    pub attempts: u32,
    /// The status sent to the client.
    pub status: u16,
    /// The status of the last endpoint answer, when one answered.
    pub upstream_status: Option<u16>,
    pub ttfb: Option<Duration>,
    /// Time to the first token of a streamed answer.
    pub(crate) ttft: Option<Duration>,
    /// Time per output token.
    pub tpot: Option<Duration>,
    /// Token counts the answer reported (output tokens also counted from stream events):
    /// what admission control charges.
    pub prompt_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub bytes_in: u64,
    pub failover_reason: Option<&'static str>,
    pub error: Option<&'static str>,
    /// Why the last attempt failed, in Meridian's words (never sent to the client).
    pub error_detail: Option<String>,
    /// The W3C trace id (32 lowercase hex digits) of the request's trace, when it has one.
    pub trace_id: Option<String>,
    /// The request's server span, when tracing is on; ended with the response.
    pub trace: Option<Box<super::trace::RequestTrace>>,
}

impl AccessRecord {
    /// The record of a request just located; the phases fill in the rest.
    pub(crate) fn new(client_ip: IpAddr, country: &'static str, method: http::Method, path: String) -> AccessRecord {
        AccessRecord {
            request_id: HeaderValue::from_static("-"),
            client_ip,
            country,
            zone: None,
            method,
            path,
            protocol: "HTTP",
            host: None,
            user_agent: None,
            region: None,
            endpoint: None,
            attempts: 0,
            status: 0,
            upstream_status: None,
            ttfb: None,
            ttft: None,
            tpot: None,
            prompt_tokens: None,
            output_tokens: None,
            bytes_in: 0,
            failover_reason: None,
            error: None,
            error_detail: None,
            trace_id: None,
            trace: None,
        }
    }

    /// Fills the fields read from the request head; `log` false (access log off) keeps
    /// the request path free of the copies.
    pub(crate) fn head(&mut self, version: Version, headers: RequestFields<'_>, authority: Option<&str>, log: bool) {
        self.protocol = protocol(version);
        if !log {
            return;
        }
        let text = |v: &str| cut(v).to_string();
        self.host = headers
            .get_str(&header::HOST)
            .map(text)
            .or_else(|| authority.map(|a| cut(a).to_string()));
        self.user_agent = headers.get_str(&header::USER_AGENT).map(text);
    }

    /// Ends the request's server span, if it has one.
    pub(crate) fn end_trace(&mut self) {
        if let Some(t) = self.trace.take() {
            t.end(super::trace::ServerFields {
                status: self.status,
                country: self.country,
                zone: self.zone.as_deref(),
                region: self.region.as_deref(),
                attempts: self.attempts,
                error: self.error,
            });
        }
    }

    pub(crate) fn emit(&self, duration: Duration, bytes_out: u64, end: &'static str) {
        tracing::info!(
            target: "meridian::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            trace_id = self.trace_id.as_deref().unwrap_or("-"),
            client_ip = %self.client_ip,
            country = self.country,
            zone = self.zone.as_deref().unwrap_or("-"),
            method = %self.method,
            protocol = self.protocol,
            host = self.host.as_deref().unwrap_or("-"),
            path = %self.path,
            user_agent = self.user_agent.as_deref().unwrap_or("-"),
            region = self.region.as_deref().unwrap_or("-"),
            endpoint = self.endpoint.as_deref().unwrap_or("-"),
            attempts = self.attempts,
            status = self.status,
            upstream_status = self.upstream_status,
            ttfb_ms = self.ttfb.map(ms),
            ttft_ms = self.ttft.map(ms),
            tpot_ms = self.tpot.map(ms),
            prompt_tokens = self.prompt_tokens,
            output_tokens = self.output_tokens,
            duration_ms = ms(duration),
            bytes_in = self.bytes_in,
            bytes_out = bytes_out,
            failover_reason = self.failover_reason.unwrap_or("-"),
            error = self.error.unwrap_or("-"),
            error_detail = self.error_detail.as_deref(),
            end,
            "request"
        );
    }
}

/// The protocol as HTTP spells it in a request line.
pub(crate) fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// `s` cut to at most [`MAX_LOGGED`] bytes, on a character boundary.
fn cut(s: &str) -> &str {
    if s.len() <= MAX_LOGGED {
        return s;
    }
    let mut end = MAX_LOGGED;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_table() {
        let cases = [
            (Version::HTTP_10, "HTTP/1.0"),
            (Version::HTTP_11, "HTTP/1.1"),
            (Version::HTTP_2, "HTTP/2"),
        ];
        for (v, want) in cases {
            assert_eq!(protocol(v), want);
        }
    }

    #[test]
    fn long_client_strings_are_cut_on_a_character_boundary() {
        let long = "é".repeat(200);
        let c = cut(&long);
        assert!(c.len() <= MAX_LOGGED && c.len() >= MAX_LOGGED - 1);
        assert!(long.starts_with(c));
        assert_eq!(cut("curl/8.5"), "curl/8.5");
    }
}
