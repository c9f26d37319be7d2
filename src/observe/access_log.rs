//! One structured event per request, emitted when its response body is finished.

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderValue;

/// Fields of one access-log line. Secrets (injected headers, `Authorization`) are never
/// part of it.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    pub request_id: HeaderValue,
    pub client_ip: IpAddr,
    pub country: &'static str,
    pub zone: Option<String>,
    pub method: http::Method,
    pub path: String,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub attempts: u32,
    pub status: u16,
    pub ttfb: Option<Duration>,
    /// Time to the first token of a streamed answer.
    pub ttft: Option<Duration>,
    /// Time per output token.
    pub tpot: Option<Duration>,
    /// Token counts the answer reported (output tokens also counted from stream events):
    /// what admission control charges.
    pub prompt_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub bytes_in: u64,
    pub failover_reason: Option<&'static str>,
    pub error: Option<&'static str>,
}

impl AccessRecord {
    pub fn emit(&self, duration: Duration, bytes_out: u64, end: &'static str) {
        tracing::info!(
            target: "meridian::access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            client_ip = %self.client_ip,
            country = self.country,
            zone = self.zone.as_deref().unwrap_or("-"),
            method = %self.method,
            path = %self.path,
            region = self.region.as_deref().unwrap_or("-"),
            endpoint = self.endpoint.as_deref().unwrap_or("-"),
            attempts = self.attempts,
            status = self.status,
            ttfb_ms = self.ttfb.map(|t| t.as_secs_f64() * 1000.0),
            ttft_ms = self.ttft.map(|t| t.as_secs_f64() * 1000.0),
            tpot_ms = self.tpot.map(|t| t.as_secs_f64() * 1000.0),
            prompt_tokens = self.prompt_tokens,
            output_tokens = self.output_tokens,
            duration_ms = duration.as_secs_f64() * 1000.0,
            bytes_in = self.bytes_in,
            bytes_out = bytes_out,
            failover_reason = self.failover_reason.unwrap_or("-"),
            error = self.error.unwrap_or("-"),
            end,
            "request"
        );
    }
}
