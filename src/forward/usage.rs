//! What a model answer says about itself, read as it passes: the time of its first
//! non-empty chunk, the SSE data events of a stream and the `usage` token counts of a
//! stream's final usage chunk or of a JSON answer [pure: bytes and instants in, numbers out].
//!
//! Streams are never buffered: a line is parsed where it lies in its chunk, and only a line
//! split across chunks is carried over, up to [`LINE_CAP`] bytes. A JSON answer is read up to
//! its cap, in place when it arrives in one chunk (the usual case for a sized answer).

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::body::StreamEnd;
use crate::health::state::Answer;

/// A stream line split across chunks is carried over up to this length; a longer one is
/// still counted, but its `usage` is not read (usage chunks are a few hundred bytes).
pub(crate) const LINE_CAP: usize = 8 * 1024;

/// How an answer arrives, known from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// `text/event-stream`, or a body without a length: the client sees tokens as they come.
    Streamed,
    /// A sized answer: the client sees it all at once.
    Whole,
}

/// How the body is read for `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Sse,
    Json,
    Other,
}

/// Token counts an answer reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

/// The incremental reader of one response body.
#[derive(Debug)]
pub struct UsageScanner {
    kind: AnswerKind,
    format: Format,
    first_chunk: Option<Instant>,
    data_events: u64,
    usage: Usage,
    /// SSE: the start of a line whose end has not arrived yet.
    partial: Vec<u8>,
    /// The carried-over line passed [`LINE_CAP`]: counted, not parsed.
    partial_overflow: bool,
    /// JSON: the answer's first `cap` bytes, when it came in more than one chunk.
    buffered: Vec<u8>,
    cap: usize,
    /// JSON: the declared length, to parse a whole answer in place.
    length: Option<u64>,
    /// JSON: done (parsed, or past the cap).
    settled: bool,
}

/// What the scanner saw, at the end of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    pub kind: AnswerKind,
    pub(crate) first_chunk: Option<Instant>,
    pub usage: Usage,
    /// Output tokens: `usage.completion_tokens`, else a stream's data events.
    pub output_tokens: Option<u64>,
}

impl UsageScanner {
    /// A scanner for a response with this `Content-Type`; `length`: its body's declared length, as
    /// the body's framing has it (not looked up again: this runs on every response); `cap`
    /// is `max_buffered_answer`.
    pub(crate) fn for_response(
        content_type: Option<&[u8]>,
        length: Option<u64>,
        end_stream: bool,
        cap: usize,
    ) -> UsageScanner {
        let sse = content_type.is_some_and(crate::forward::body::is_sse_type);
        let json = content_type.is_some_and(|v| {
            let v = v.trim_ascii_start();
            const JSON: &[u8] = b"application/json";
            v.len() >= JSON.len() && v[..JSON.len()].eq_ignore_ascii_case(JSON)
        });
        let streamed = sse || (length.is_none() && !end_stream);
        let format = match (sse, json) {
            (true, _) => Format::Sse,
            (false, true) => Format::Json,
            (false, false) => Format::Other,
        };
        UsageScanner::new(
            if streamed {
                AnswerKind::Streamed
            } else {
                AnswerKind::Whole
            },
            format,
            length,
            cap,
        )
    }

    fn new(kind: AnswerKind, format: Format, length: Option<u64>, cap: usize) -> UsageScanner {
        UsageScanner {
            kind,
            format,
            first_chunk: None,
            data_events: 0,
            usage: Usage::default(),
            partial: Vec::new(),
            partial_overflow: false,
            buffered: Vec::new(),
            cap,
            length,
            settled: format != Format::Json,
        }
    }

    pub fn kind(&self) -> AnswerKind {
        self.kind
    }

    /// The response is a `text/event-stream`.
    pub(crate) fn is_sse(&self) -> bool {
        self.format == Format::Sse
    }

    /// True until the first non-empty chunk: the caller reads the clock only then.
    #[cfg(test)]
    pub(crate) fn waiting_for_first_chunk(&self) -> bool {
        self.first_chunk.is_none()
    }

    /// Reads one body chunk; `now` is asked for only on a streamed answer's first non-empty
    /// chunk (a whole answer's first chunk time is never measured: [`measure`]).
    pub fn feed(&mut self, chunk: &[u8], now: impl FnOnce() -> Instant) {
        if chunk.is_empty() {
            return;
        }
        if self.kind == AnswerKind::Streamed && self.first_chunk.is_none() {
            self.first_chunk = Some(now());
        }
        match self.format {
            Format::Sse => self.feed_sse(chunk),
            Format::Json => self.feed_json(chunk),
            Format::Other => {}
        }
    }

    /// The body ended (or was cut): what was seen.
    pub fn finish(&mut self) -> Scanned {
        if self.format == Format::Sse && !self.partial.is_empty() {
            // A last line without its newline still counts.
            let line = std::mem::take(&mut self.partial);
            self.line(&line, !self.partial_overflow);
        }
        if !self.settled {
            self.settled = true;
            let buffered = std::mem::take(&mut self.buffered);
            self.parse_json(&buffered);
        }
        let output_tokens = self.usage.completion_tokens.or(match self.format {
            Format::Sse if self.data_events > 0 => Some(self.data_events),
            _ => None,
        });
        Scanned {
            kind: self.kind,
            first_chunk: self.first_chunk,
            usage: self.usage,
            output_tokens,
        }
    }

    fn feed_sse(&mut self, mut chunk: &[u8]) {
        if !self.partial.is_empty() || self.partial_overflow {
            // Finish the line carried over from the previous chunk.
            let Some(nl) = memchr::memchr(b'\n', chunk) else {
                self.carry(chunk);
                return;
            };
            self.carry(&chunk[..nl]);
            let line = std::mem::take(&mut self.partial);
            let parse = !self.partial_overflow;
            self.partial_overflow = false;
            self.line(&line, parse);
            // Keep the allocation for the next split line.
            self.partial = line;
            self.partial.clear();
            chunk = &chunk[nl + 1..];
        }
        while let Some(nl) = memchr::memchr(b'\n', chunk) {
            self.line(&chunk[..nl], true);
            chunk = &chunk[nl + 1..];
        }
        if !chunk.is_empty() {
            self.carry(chunk);
        }
    }

    fn carry(&mut self, bytes: &[u8]) {
        let room = LINE_CAP.saturating_sub(self.partial.len());
        if bytes.len() > room {
            self.partial_overflow = true;
        }
        self.partial.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    /// One SSE line (without its newline).
    fn line(&mut self, line: &[u8], parse: bool) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if data.is_empty() || data == b"[DONE]" {
            return;
        }
        self.data_events += 1;
        if parse && mentions_usage(data) {
            self.read_usage(data);
        }
    }

    fn feed_json(&mut self, chunk: &[u8]) {
        if self.settled {
            return;
        }
        if self.buffered.is_empty() && self.length == Some(chunk.len() as u64) {
            // The whole answer in one chunk: parsed where it lies, no copy.
            self.settled = true;
            self.parse_json(&chunk[..chunk.len().min(self.cap)]);
            return;
        }
        let room = self.cap.saturating_sub(self.buffered.len());
        if self.buffered.is_empty() {
            let expected = self.length.map_or(room, |n| (n as usize).min(room));
            self.buffered.reserve_exact(expected.max(chunk.len().min(room)));
        }
        // Past the cap nothing more is kept: the first `cap` bytes are parsed at the end
        // (usage comes last and is then lost; the answer reports no tokens).
        self.buffered.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    fn parse_json(&mut self, bytes: &[u8]) {
        if mentions_usage(bytes) {
            self.read_usage(bytes);
        }
    }

    fn read_usage(&mut self, json: &[u8]) {
        #[derive(Deserialize)]
        struct Answer {
            usage: Option<Counts>,
        }
        #[derive(Deserialize)]
        struct Counts {
            prompt_tokens: Option<u64>,
            completion_tokens: Option<u64>,
        }
        if let Ok(Answer { usage: Some(c) }) = serde_json::from_slice::<Answer>(json) {
            // The last report wins: with continuous usage stats every chunk carries one.
            self.usage = Usage {
                prompt_tokens: c.prompt_tokens.or(self.usage.prompt_tokens),
                completion_tokens: c.completion_tokens.or(self.usage.completion_tokens),
            };
        }
    }
}

/// Whether `json` has a `"usage"` key to parse for. The searcher is built once: building
/// it per answer cost more than the search (callgrind).
fn mentions_usage(json: &[u8]) -> bool {
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    USAGE.find(json).is_some()
}

/// Latency of one attempt as a model client feels it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Latency {
    /// Request sent → response head.
    pub head: Duration,
    /// Request sent → first non-empty body chunk, for a streamed answer.
    pub first_token: Option<Duration>,
    /// Time per output token, for an answer whose token count is known.
    pub per_token: Option<Duration>,
    pub output_tokens: Option<u64>,
}

/// TTFT and TPOT of one attempt (docs/inference.md, "Latency as a model client feels it"): `sent` is when
/// the request went out, `head` the time to the response head, `end` when the body ended.
pub(crate) fn measure(scanned: &Scanned, sent: Instant, head: Duration, end: Instant) -> Latency {
    let first_token = match scanned.kind {
        AnswerKind::Streamed => scanned.first_chunk.map(|t| t.saturating_duration_since(sent)),
        AnswerKind::Whole => None,
    };
    let total = end.saturating_duration_since(sent);
    let per_token = match (scanned.kind, scanned.output_tokens) {
        (_, None | Some(0)) => None,
        (AnswerKind::Streamed, Some(n)) => match (scanned.first_chunk, n) {
            // One token: nothing after it to measure (the SPEC's formula would give ~0 and
            // pull the endpoint's average down).
            (_, 1) | (None, _) => None,
            // The SPEC's (end − first token) / output tokens: a short stream's gaps are
            // spread over all its tokens, so two slow-ish tokens do not read as one slow one.
            (Some(first), n) => Some(end.saturating_duration_since(first) / n.min(u64::from(u32::MAX)) as u32),
        },
        (AnswerKind::Whole, Some(n)) => Some(total / n.min(u64::from(u32::MAX)) as u32),
    };
    Latency {
        head,
        first_token,
        per_token,
        output_tokens: scanned.output_tokens,
    }
}

/// The latency sample outlier detection takes from an answer that ended `end`; `None`
/// when the answer says nothing about the endpoint's speed (`ok`: a status below 400; an
/// error answer's speed is not the model's).
pub(crate) fn answer(
    end: StreamEnd,
    ok: bool,
    scanned: &Scanned,
    l: &Latency,
    sent: Instant,
    now: Instant,
) -> Option<Answer> {
    if !ok {
        return None;
    }
    let streamed = scanned.kind == AnswerKind::Streamed;
    match (end, scanned.kind) {
        (StreamEnd::Complete, _) => Some(Answer {
            streamed,
            head: l.head,
            first_token: l.first_token,
            per_token: l.per_token,
        }),
        // The client gave up on a stream: how long it had waited bounds the first token
        // from below, so a first token that never comes still counts.
        (StreamEnd::ClientGone, AnswerKind::Streamed) => Some(Answer {
            streamed,
            head: l.head,
            first_token: Some(l.first_token.unwrap_or_else(|| now.saturating_duration_since(sent))),
            per_token: None,
        }),
        // A whole answer cut short has no token count; a broken stream is counted as an error.
        (StreamEnd::ClientGone, AnswerKind::Whole) | (StreamEnd::Stalled | StreamEnd::UpstreamError, _) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MAX_BUFFERED_ANSWER as MAX_BUFFERED_ANSWER;

    /// The `Content-Type` among `pairs`, as a response's fields give it.
    fn content_type(pairs: &[(&'static str, &'static str)]) -> Option<&'static [u8]> {
        pairs
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("content-type"))
            .map(|(_, value)| value.as_bytes())
    }

    const SSE: &[(&str, &str)] = &[("content-type", "text/event-stream; charset=utf-8")];

    /// A vLLM chat stream with `stream_options.include_usage`: role chunk, 3 content chunks,
    /// a usage-only chunk, `[DONE]`.
    const VLLM_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-9f\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-9f\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-9f\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-9f\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"},\"logprobs\":null,\"finish_reason\":\"stop\",\"stop_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-9f\",\"object\":\"chat.completion.chunk\",\"created\":1733050000,\"model\":\"meta-llama/Llama-3.1-8B-Instruct\",\"choices\":[],\"usage\":{\"prompt_tokens\":17,\"total_tokens\":20,\"completion_tokens\":3}}\n\n",
        "data: [DONE]\n\n",
    );

    /// The same stream without a usage chunk (OpenAI's default): 4 data events.
    const PLAIN_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\r\n\r\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\n",
        ": keep-alive comment\r\n\r\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"}}]}\r\n\r\n",
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n",
        "data: [DONE]\r\n\r\n",
    );

    const JSON_ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1733050000,"model":"gpt-oss-120b","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":300,"total_tokens":312}}"#;

    /// Feeds `body` in pieces of `split` bytes (0: whole).
    fn scan(h: &[(&'static str, &'static str)], body: &str, split: usize, cap: usize) -> Scanned {
        let t0 = Instant::now();
        let length = h
            .iter()
            .find(|(name, _)| *name == "content-length")
            .and_then(|(_, v)| v.parse().ok());
        let mut s = UsageScanner::for_response(content_type(h), length, false, cap);
        let bytes = body.as_bytes();
        let pieces: Vec<&[u8]> = if split == 0 {
            vec![bytes]
        } else {
            bytes.chunks(split).collect()
        };
        for (i, p) in pieces.iter().enumerate() {
            s.feed(p, || t0 + Duration::from_millis(i as u64));
        }
        s.finish()
    }

    #[test]
    fn scanner_table() {
        let json_len = JSON_ANSWER.len().to_string().leak() as &'static str;
        let json_h: &[(&str, &str)] = &[("content-type", "application/json"), ("content-length", json_len)];
        let chunked_json: &[(&str, &str)] = &[("content-type", "application/json")];
        let plain: &[(&str, &str)] = &[("content-type", "text/plain"), ("content-length", "5")];
        type Case<'a> = (
            &'a str,
            &'a [(&'static str, &'static str)],
            &'a str,
            usize,
            usize,
            AnswerKind,
            Usage,
            Option<u64>,
        );
        let u = |p, c| Usage {
            prompt_tokens: Some(p),
            completion_tokens: Some(c),
        };
        let cases: Vec<Case<'_>> = vec![
            (
                "vLLM stream, whole",
                SSE,
                VLLM_STREAM,
                0,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Streamed,
                u(17, 3),
                Some(3),
            ),
            (
                "vLLM stream, 7-byte chunks",
                SSE,
                VLLM_STREAM,
                7,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Streamed,
                u(17, 3),
                Some(3),
            ),
            (
                "vLLM stream, 1-byte chunks",
                SSE,
                VLLM_STREAM,
                1,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Streamed,
                u(17, 3),
                Some(3),
            ),
            (
                "vLLM stream, split mid-line",
                SSE,
                VLLM_STREAM,
                301,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Streamed,
                u(17, 3),
                Some(3),
            ),
            (
                "stream without usage: data events",
                SSE,
                PLAIN_STREAM,
                0,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Streamed,
                Usage::default(),
                Some(4),
            ),
            (
                "stream without usage, split",
                SSE,
                PLAIN_STREAM,
                13,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Streamed,
                Usage::default(),
                Some(4),
            ),
            (
                "JSON answer in one chunk",
                json_h,
                JSON_ANSWER,
                0,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Whole,
                u(12, 300),
                Some(300),
            ),
            (
                "JSON answer in pieces",
                json_h,
                JSON_ANSWER,
                50,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Whole,
                u(12, 300),
                Some(300),
            ),
            (
                "chunked JSON is streamed, usage still read",
                chunked_json,
                JSON_ANSWER,
                50,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Streamed,
                u(12, 300),
                Some(300),
            ),
            (
                "JSON past the cap: usage not read",
                json_h,
                JSON_ANSWER,
                50,
                100,
                AnswerKind::Whole,
                Usage::default(),
                None,
            ),
            (
                "plain answer: nothing read",
                plain,
                "hello",
                0,
                MAX_BUFFERED_ANSWER,
                AnswerKind::Whole,
                Usage::default(),
                None,
            ),
        ];
        for (name, h, body, split, cap, kind, usage, out) in cases {
            let s = scan(h, body, split, cap);
            assert_eq!(s.kind, kind, "{name}");
            assert_eq!(s.usage, usage, "{name}");
            assert_eq!(s.output_tokens, out, "{name}");
            // The clock is read for a streamed answer's first chunk only.
            assert_eq!(s.first_chunk.is_some(), kind == AnswerKind::Streamed, "{name}");
        }
    }

    #[test]
    fn first_chunk_time_is_the_first_non_empty_chunk() {
        let t0 = Instant::now();
        let mut s = UsageScanner::for_response(content_type(SSE), None, false, MAX_BUFFERED_ANSWER);
        s.feed(b"", || t0);
        assert!(s.waiting_for_first_chunk());
        s.feed(b"data: {}\n\n", || t0 + Duration::from_secs(1));
        s.feed(b"data: {}\n\n", || t0 + Duration::from_secs(2));
        assert_eq!(s.finish().first_chunk, Some(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn an_overlong_split_line_is_counted_not_parsed() {
        let long = format!(
            "data: {{\"pad\":\"{}\",\"usage\":{{\"completion_tokens\":9}}}}\n\ndata: {{}}\n\n",
            "x".repeat(LINE_CAP * 2)
        );
        let s = scan(SSE, &long, 1000, MAX_BUFFERED_ANSWER);
        assert_eq!(s.usage, Usage::default());
        assert_eq!(s.output_tokens, Some(2));
    }

    #[test]
    fn a_stream_never_keeps_more_than_a_line() {
        let t0 = Instant::now();
        let mut s = UsageScanner::for_response(content_type(SSE), None, false, MAX_BUFFERED_ANSWER);
        for _ in 0..1000 {
            s.feed(VLLM_STREAM.as_bytes(), || t0);
        }
        assert!(s.partial.capacity() <= LINE_CAP + 1 && s.buffered.capacity() == 0);
        s.feed(&VLLM_STREAM.as_bytes()[..100], || t0);
        assert!(s.partial.len() == 100);
    }

    #[test]
    fn answer_table() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let l = Latency {
            head: ms(5),
            first_token: None,
            per_token: None,
            output_tokens: None,
        };
        let s = |kind| Scanned {
            kind,
            first_chunk: None,
            usage: Usage::default(),
            output_tokens: None,
        };
        use AnswerKind::{Streamed, Whole};
        let cases = [
            (
                "complete stream",
                StreamEnd::Complete,
                true,
                Streamed,
                Some(Some(ms(5))),
            ),
            (
                "client gave up before the first token: waited time",
                StreamEnd::ClientGone,
                true,
                Streamed,
                Some(Some(ms(900))),
            ),
            ("cut whole answer: nothing", StreamEnd::ClientGone, true, Whole, None),
            (
                "stalled: nothing (an error instead)",
                StreamEnd::Stalled,
                true,
                Streamed,
                None,
            ),
            ("5xx: nothing", StreamEnd::Complete, false, Whole, None),
        ];
        for (name, end, ok, kind, want) in cases {
            let got = answer(end, ok, &s(kind), &l, t0, t0 + ms(900));
            assert_eq!(got.map(|a| a.samples().0), want, "{name}");
        }
    }

    #[test]
    fn measure_table() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let scanned = |kind, first: Option<u64>, out: Option<u64>| Scanned {
            kind,
            first_chunk: first.map(|f| t0 + ms(f)),
            usage: Usage::default(),
            output_tokens: out,
        };
        use AnswerKind::{Streamed, Whole};
        // (name, scanned, head, end, first_token, per_token)
        let cases = [
            (
                "stream: TTFT and (end-first)/n",
                scanned(Streamed, Some(1000), Some(100)),
                5,
                2000,
                Some(1000),
                Some(10),
            ),
            (
                "stream of two tokens 350 ms apart: 175 ms a token",
                scanned(Streamed, Some(100), Some(2)),
                5,
                450,
                Some(100),
                Some(175),
            ),
            (
                "stream of one token: no TPOT",
                scanned(Streamed, Some(100), Some(1)),
                5,
                100,
                Some(100),
                None,
            ),
            (
                "stream without a count: TTFT only",
                scanned(Streamed, Some(40), None),
                5,
                900,
                Some(40),
                None,
            ),
            (
                "whole answer: total / tokens",
                scanned(Whole, Some(1500), Some(300)),
                1500,
                1500,
                None,
                Some(5),
            ),
            (
                "plain whole answer: head only",
                scanned(Whole, Some(30), None),
                30,
                31,
                None,
                None,
            ),
            (
                "zero tokens: no TPOT",
                scanned(Whole, Some(30), Some(0)),
                30,
                31,
                None,
                None,
            ),
        ];
        for (name, s, head, end, first, per) in cases {
            let l = measure(&s, t0, ms(head), t0 + ms(end));
            assert_eq!(l.first_token, first.map(ms), "{name}");
            assert_eq!(l.per_token, per.map(ms), "{name}");
            assert_eq!(l.head, ms(head), "{name}");
        }
    }
}
