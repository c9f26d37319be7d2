//! A strict reader of the Prometheus text exposition format (0.0.4) and OpenMetrics 1.0 text,
//! line by line (pure): `:` in metric names, quoted UTF-8 names (`{"a.b"}`), escaped label
//! values, `+Inf`/`-Inf`/`NaN`, timestamps and OpenMetrics exemplars.
//!
//! Only what the model servers' pages need is kept: a sample's name, labels, value and
//! timestamp. A line that does not follow the grammar is an error naming what is wrong; the
//! caller decides whether that spoils the page.

use std::borrow::Cow;
use std::fmt::Write as _;

/// One line of a metrics page.
#[derive(Debug, Clone, PartialEq)]
pub enum Line<'a> {
    /// An empty line, or blanks only.
    Blank,
    /// `# HELP name text` (text unescaped).
    Help {
        /// The metric family the help text is for.
        name: Cow<'a, str>,
        /// The help text, with `\\`, `\n` and `\"` unescaped.
        text: Cow<'a, str>,
    },
    /// `# TYPE name kind`.
    Type {
        /// The metric family being typed.
        name: Cow<'a, str>,
        /// Its declared type.
        kind: Kind,
    },
    /// `# UNIT name unit` (OpenMetrics).
    Unit {
        /// The metric family the unit is for.
        name: Cow<'a, str>,
        /// The unit as written (`seconds`, `bytes`, ...).
        unit: &'a str,
    },
    /// `# EOF` (OpenMetrics): nothing may follow.
    Eof,
    /// Any other `#` line.
    Comment,
    /// A sample: `name{labels} value [timestamp]`.
    Sample(Sample<'a>),
}

/// The metric types of both formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A monotonically increasing total (`counter`).
    Counter,
    /// A value that goes up and down (`gauge`).
    Gauge,
    /// Bucketed observations (`histogram`).
    Histogram,
    /// An OpenMetrics histogram whose buckets may go down (`gaugehistogram`).
    GaugeHistogram,
    /// Quantiles with a sum and count (`summary`).
    Summary,
    /// An OpenMetrics constant-1 sample carrying labels (`info`).
    Info,
    /// An OpenMetrics set of boolean states (`stateset`).
    StateSet,
    /// No declared type: `untyped` (Prometheus) or `unknown` (OpenMetrics).
    Untyped,
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// The metric name, unquoted and unescaped (it may contain `:` or, quoted, any UTF-8).
    pub name: Cow<'a, str>,
    /// Label pairs in the order written, values unescaped.
    pub labels: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The sample value; `+Inf`, `-Inf` and `NaN` are read too.
    pub value: f64,
    /// As written: milliseconds in the Prometheus format, seconds in OpenMetrics.
    pub timestamp: Option<f64>,
}

impl Sample<'_> {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_ref())
    }

    /// The sample as one line of the Prometheus text format (quoting a name that needs it).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let quoted_name = !is_metric_name(&self.name);
        if quoted_name {
            out.push('{');
            push_quoted(&mut out, &self.name);
        } else {
            out.push_str(&self.name);
        }
        if !self.labels.is_empty() || quoted_name {
            if !quoted_name {
                out.push('{');
            }
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 || quoted_name {
                    out.push(',');
                }
                if is_label_name(k) {
                    out.push_str(k);
                } else {
                    push_quoted(&mut out, k);
                }
                out.push('=');
                push_quoted(&mut out, v);
            }
            out.push('}');
        }
        out.push(' ');
        push_float(&mut out, self.value);
        if let Some(ts) = self.timestamp {
            out.push(' ');
            push_float(&mut out, ts);
        }
        out
    }
}

fn push_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_float(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v == f64::INFINITY {
        out.push_str("+Inf");
    } else if v == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        // `{:?}` of an f64 is the shortest text that reads back to the same value.
        let _ = write!(out, "{v:?}");
    }
}

/// What is wrong with a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpositionError {
    /// The line starts with neither a metric name nor a quoted name.
    #[error("a metric name was expected")]
    NoName,
    /// A label set holds something other than a label name where one is due.
    #[error("a label name was expected")]
    NoLabelName,
    /// A label name is not followed by `=`.
    #[error("'=' was expected after a label name")]
    NoEquals,
    /// A label's `=` is not followed by a double-quoted value.
    #[error("a quoted label value was expected")]
    NoLabelValue,
    /// A quoted name or value runs to the end of the line.
    #[error("a quoted string is not closed")]
    Unterminated,
    /// An escape other than `\\`, `\"` or `\n` in a quoted string or help text; holds the
    /// escaped character.
    #[error("unknown escape \\{0} in a quoted string")]
    BadEscape(char),
    /// Labels are not separated by `,` or closed by `}`.
    #[error("',' or '}}' was expected in the label set")]
    BadLabelSeparator,
    /// One label set names the same label twice; holds the name.
    #[error("label {0:?} appears twice")]
    DuplicateLabel(String),
    /// The line ends after the name or label set, before any value.
    #[error("a space was expected before the value")]
    NoSpace,
    /// The value (or timestamp) is not a number; holds the text.
    #[error("{0:?} is not a number")]
    BadNumber(String),
    /// Text where the line should end or a blank is due (after a sample, a name, a `# TYPE`
    /// name); holds the rest of the line.
    #[error("unexpected text after the sample: {0:?}")]
    Trailing(String),
    /// A `# TYPE` line names a type neither format knows; holds it.
    #[error("unknown metric type {0:?}")]
    BadType(String),
}

/// Whether `s` is a metric name that needs no quoting: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub(crate) fn is_metric_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
}

/// Whether `s` is a label name that needs no quoting: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub(crate) fn is_label_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic() || c == b'_') && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// The metric name a line is about, without reading the rest of it: lets a reader skip the
/// lines it does not want (a vLLM page is mostly histogram buckets). `None` for lines that
/// name no metric, and for quoted names (read those with [`parse_line`]).
pub(crate) fn line_name(line: &str) -> Option<&str> {
    let line = line.trim_start_matches([' ', '\t']);
    let rest = match line.strip_prefix('#') {
        Some(comment) => {
            let comment = comment.trim_start_matches([' ', '\t']);
            let kw = ["HELP", "TYPE", "UNIT"].into_iter().find(|k| comment.starts_with(k))?;
            comment[kw.len()..].trim_start_matches([' ', '\t'])
        }
        None => line,
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(rest.len());
    Some(&rest[..end]).filter(|n| is_metric_name(n))
}

/// Reads one line (without its line break; a trailing `\r` is allowed).
pub fn parse_line(line: &str) -> Result<Line<'_>, ExpositionError> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut c = Cursor { s: line, at: 0 };
    c.skip_blanks();
    if c.done() {
        return Ok(Line::Blank);
    }
    if c.eat('#') {
        return parse_comment(c);
    }
    parse_sample(&mut c).map(Line::Sample)
}

fn parse_comment(mut c: Cursor<'_>) -> Result<Line<'_>, ExpositionError> {
    c.skip_blanks();
    let keyword = c.word();
    match keyword {
        "EOF" if c.rest().trim().is_empty() => return Ok(Line::Eof),
        "HELP" | "TYPE" | "UNIT" => {}
        _ => return Ok(Line::Comment),
    }
    if !c.skip_blanks() {
        return Ok(Line::Comment);
    }
    let name = c.metric_name()?;
    let had_space = c.skip_blanks();
    let rest = c.rest();
    if !had_space && !rest.is_empty() {
        return Err(ExpositionError::Trailing(rest.into()));
    }
    match keyword {
        "HELP" => Ok(Line::Help {
            name,
            text: unescape_help(rest)?,
        }),
        "TYPE" => Ok(Line::Type {
            name,
            kind: kind(rest.trim_end())?,
        }),
        _ => Ok(Line::Unit {
            name,
            unit: rest.trim_end(),
        }),
    }
}

fn kind(s: &str) -> Result<Kind, ExpositionError> {
    Ok(match s {
        "counter" => Kind::Counter,
        "gauge" => Kind::Gauge,
        "histogram" => Kind::Histogram,
        "gaugehistogram" => Kind::GaugeHistogram,
        "summary" => Kind::Summary,
        "info" => Kind::Info,
        "stateset" => Kind::StateSet,
        "untyped" | "unknown" => Kind::Untyped,
        other => return Err(ExpositionError::BadType(other.into())),
    })
}

/// HELP text escapes `\\` and `\n` (OpenMetrics also `\"`).
fn unescape_help(s: &str) -> Result<Cow<'_, str>, ExpositionError> {
    if !s.contains('\\') {
        return Ok(Cow::Borrowed(s));
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch != '\\' {
            out.push(ch);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') => out.push('"'),
            Some(other) => return Err(ExpositionError::BadEscape(other)),
            None => out.push('\\'),
        }
    }
    Ok(Cow::Owned(out))
}

fn parse_sample<'a>(c: &mut Cursor<'a>) -> Result<Sample<'a>, ExpositionError> {
    let mut labels = Vec::new();
    let name = if c.peek() == Some('{') {
        // Prometheus 3: `{"name", label="v"}`; the name is the first, unpaired string.
        c.eat('{');
        c.skip_blanks();
        let name = c.quoted().map_err(|e| match e {
            ExpositionError::NoLabelValue => ExpositionError::NoName,
            e => e,
        })?;
        c.skip_blanks();
        if c.eat(',') {
            parse_labels(c, &mut labels)?;
        } else if !c.eat('}') {
            return Err(ExpositionError::BadLabelSeparator);
        }
        name
    } else {
        let name = c.metric_name()?;
        // Blanks may stand between the name and its label set.
        let at = c.at;
        c.skip_blanks();
        if c.eat('{') {
            parse_labels(c, &mut labels)?;
        } else {
            c.at = at;
        }
        name
    };
    if !c.skip_blanks() {
        return Err(if c.done() {
            ExpositionError::NoSpace
        } else {
            ExpositionError::Trailing(c.rest().into())
        });
    }
    let value = number(c.word())?;
    let mut timestamp = None;
    if c.skip_blanks() && !c.done() && c.peek() != Some('#') {
        timestamp = Some(number(c.word())?);
        c.skip_blanks();
    }
    if c.eat('#') {
        // An OpenMetrics exemplar: ` # {labels} value [timestamp]`, checked and dropped.
        c.skip_blanks();
        if !c.eat('{') {
            return Err(ExpositionError::Trailing(c.rest().into()));
        }
        parse_labels(c, &mut Vec::new())?;
        c.skip_blanks();
        number(c.word())?;
        if c.skip_blanks() && !c.done() {
            number(c.word())?;
            c.skip_blanks();
        }
    }
    if !c.done() {
        return Err(ExpositionError::Trailing(c.rest().into()));
    }
    Ok(Sample {
        name,
        labels,
        value,
        timestamp,
    })
}

/// Reads `label="value", ...}` after the opening brace (a trailing comma is allowed).
fn parse_labels<'a>(c: &mut Cursor<'a>, labels: &mut Vec<(Cow<'a, str>, Cow<'a, str>)>) -> Result<(), ExpositionError> {
    loop {
        c.skip_blanks();
        if c.eat('}') {
            return Ok(());
        }
        let key = if c.peek() == Some('"') {
            c.quoted()?
        } else {
            let key = c.take_while(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !is_label_name(key) {
                return Err(ExpositionError::NoLabelName);
            }
            Cow::Borrowed(key)
        };
        c.skip_blanks();
        if !c.eat('=') {
            return Err(ExpositionError::NoEquals);
        }
        c.skip_blanks();
        let value = c.quoted()?;
        if labels.iter().any(|(k, _)| *k == key) {
            return Err(ExpositionError::DuplicateLabel(key.into_owned()));
        }
        labels.push((key, value));
        c.skip_blanks();
        if c.eat('}') {
            return Ok(());
        }
        if !c.eat(',') {
            return Err(ExpositionError::BadLabelSeparator);
        }
    }
}

/// A sample value or timestamp: Go's float syntax as the exporters write it, plus
/// `+Inf`/`-Inf`/`Inf`/`NaN`. Rust's own spellings (`infinity`, `inf`) are refused.
fn number(s: &str) -> Result<f64, ExpositionError> {
    let bad = || ExpositionError::BadNumber(s.into());
    match s {
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return Err(bad());
    }
    if !digits
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return Err(bad());
    }
    s.parse().map_err(|_| bad())
}

/// A position in one line.
struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a str {
        &self.s[self.at..]
    }
    fn done(&self) -> bool {
        self.at >= self.s.len()
    }
    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }
    fn eat(&mut self, ch: char) -> bool {
        if self.peek() == Some(ch) {
            self.at += ch.len_utf8();
            true
        } else {
            false
        }
    }
    /// Skips spaces and tabs; whether there were any.
    fn skip_blanks(&mut self) -> bool {
        let n = self.rest().len() - self.rest().trim_start_matches([' ', '\t']).len();
        self.at += n;
        n > 0
    }
    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &'a str {
        let rest = self.rest();
        let end = rest.find(|c: char| !f(c)).unwrap_or(rest.len());
        self.at += end;
        &rest[..end]
    }
    /// Up to the next space or tab.
    fn word(&mut self) -> &'a str {
        self.take_while(|c| c != ' ' && c != '\t')
    }
    fn metric_name(&mut self) -> Result<Cow<'a, str>, ExpositionError> {
        if self.peek() == Some('"') {
            return self.quoted().map_err(|_| ExpositionError::NoName);
        }
        let name = self.take_while(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        if !is_metric_name(name) {
            return Err(ExpositionError::NoName);
        }
        Ok(Cow::Borrowed(name))
    }
    /// A double-quoted string with the escapes `\\`, `\"` and `\n`.
    fn quoted(&mut self) -> Result<Cow<'a, str>, ExpositionError> {
        if !self.eat('"') {
            return Err(ExpositionError::NoLabelValue);
        }
        let rest = self.rest();
        let mut owned: Option<String> = None;
        let mut chars = rest.char_indices();
        while let Some((i, ch)) = chars.next() {
            match ch {
                '"' => {
                    self.at += i + 1;
                    return Ok(match owned {
                        Some(s) => Cow::Owned(s),
                        None => Cow::Borrowed(&rest[..i]),
                    });
                }
                '\\' => {
                    let s = owned.get_or_insert_with(|| rest[..i].to_string());
                    match chars.next() {
                        Some((_, '\\')) => s.push('\\'),
                        Some((_, '"')) => s.push('"'),
                        Some((_, 'n')) => s.push('\n'),
                        Some((_, other)) => return Err(ExpositionError::BadEscape(other)),
                        None => return Err(ExpositionError::Unterminated),
                    }
                }
                '\n' => return Err(ExpositionError::Unterminated),
                ch => {
                    if let Some(s) = owned.as_mut() {
                        s.push(ch);
                    }
                }
            }
        }
        Err(ExpositionError::Unterminated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(line: &str) -> Sample<'_> {
        match parse_line(line) {
            Ok(Line::Sample(s)) => s,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    type Labels = &'static [(&'static str, &'static str)];

    #[test]
    fn samples_table() {
        let cases: [(&str, &str, Labels, f64, Option<f64>); 10] = [
            ("tgi_queue_size 12", "tgi_queue_size", &[], 12.0, None),
            (
                "vllm:num_requests_waiting{engine=\"0\",model_name=\"a:b\"} 5.0",
                "vllm:num_requests_waiting",
                &[("engine", "0"), ("model_name", "a:b")],
                5.0,
                None,
            ),
            (
                "m{path=\"C:\\\\dir\\\\\",q=\"say \\\"hi\\\"\\n\"} 1 1700000000000",
                "m",
                &[("path", "C:\\dir\\"), ("q", "say \"hi\"\n")],
                1.0,
                Some(1_700_000_000_000.0),
            ),
            ("m{a=\"x\",} -Inf", "m", &[("a", "x")], f64::NEG_INFINITY, None),
            ("m { a = \"x\" }\t+Inf", "m", &[("a", "x")], f64::INFINITY, None),
            ("m{} 1e-3", "m", &[], 0.001, None),
            (
                "{\"my.metric\", \"a.b\"=\"1\"} 2",
                "my.metric",
                &[("a.b", "1")],
                2.0,
                None,
            ),
            ("{\"x\"} 3", "x", &[], 3.0, None),
            (
                "foo_bucket{le=\"0.5\"} 7 1520879607.789 # {trace_id=\"abc\"} 0.3 1520879607.7",
                "foo_bucket",
                &[("le", "0.5")],
                7.0,
                Some(1_520_879_607.789),
            ),
            ("m 2 # {} 1", "m", &[], 2.0, None),
        ];
        for (line, name, labels, value, ts) in cases {
            let s = sample(line);
            assert_eq!(s.name, name, "{line}");
            let got: Vec<(&str, &str)> = s.labels.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
            assert_eq!(got, labels, "{line}");
            assert!(s.value == value, "{line}: {}", s.value);
            assert_eq!(s.timestamp, ts, "{line}");
        }
        assert!(sample("m NaN").value.is_nan());
    }

    #[test]
    fn errors_table() {
        use ExpositionError as E;
        let cases: [(&str, ExpositionError); 14] = [
            ("0abc 1", E::NoName),
            ("m{0=\"x\"} 1", E::NoLabelName),
            ("m{a} 1", E::NoEquals),
            ("m{a=x} 1", E::NoLabelValue),
            ("m{a=\"x} 1", E::Unterminated),
            ("m{a=\"\\t\"} 1", E::BadEscape('t')),
            ("m{a=\"x\" b=\"y\"} 1", E::BadLabelSeparator),
            ("m{a=\"x\",a=\"y\"} 1", E::DuplicateLabel("a".into())),
            ("m", E::NoSpace),
            ("m banana", E::BadNumber("banana".into())),
            ("m infinity", E::BadNumber("infinity".into())),
            ("m 1 2 3", E::Trailing("3".into())),
            ("m-x 1", E::Trailing("-x 1".into())),
            ("# TYPE m gauges", E::BadType("gauges".into())),
        ];
        for (line, want) in cases {
            assert_eq!(parse_line(line), Err(want), "{line}");
        }
    }

    #[test]
    fn comments_table() {
        assert_eq!(parse_line(""), Ok(Line::Blank));
        assert_eq!(parse_line("  \r"), Ok(Line::Blank));
        assert_eq!(parse_line("# EOF"), Ok(Line::Eof));
        assert_eq!(parse_line("# just words"), Ok(Line::Comment));
        assert_eq!(parse_line("#HELPER x"), Ok(Line::Comment));
        assert_eq!(
            parse_line("# TYPE vllm:kv_cache_usage_perc gauge"),
            Ok(Line::Type {
                name: "vllm:kv_cache_usage_perc".into(),
                kind: Kind::Gauge
            })
        );
        assert_eq!(
            parse_line("# HELP m Line one\\nwith \\\\ slash"),
            Ok(Line::Help {
                name: "m".into(),
                text: "Line one\nwith \\ slash".into()
            })
        );
        assert_eq!(
            parse_line("# UNIT m_seconds seconds"),
            Ok(Line::Unit {
                name: "m_seconds".into(),
                unit: "seconds"
            })
        );
    }

    #[test]
    fn line_name_table() {
        let cases = [
            (
                "vllm:num_requests_waiting{model_name=\"a:b\"} 1",
                Some("vllm:num_requests_waiting"),
            ),
            ("# TYPE sglang:token_usage gauge", Some("sglang:token_usage")),
            ("# HELP tgi_queue_size Current queue size", Some("tgi_queue_size")),
            ("  tgi_queue_size 3", Some("tgi_queue_size")),
            ("# some comment", None),
            ("", None),
            ("{\"a.b\"} 1", None),
        ];
        for (line, want) in cases {
            assert_eq!(line_name(line), want, "{line}");
        }
    }

    fn finite() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>().prop_filter("finite", |v| v.is_finite()),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            (0u32..1000).prop_map(f64::from),
        ]
    }

    proptest! {
        #[test]
        fn rendered_samples_read_back(
            name in prop_oneof!["[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", "\\PC{1,12}"],
            labels in proptest::collection::btree_map(
                prop_oneof!["[a-zA-Z_][a-zA-Z0-9_]{0,10}", "[a-z.]{1,6}"],
                "\\PC{0,12}|[\\\\\"\n]{0,4}",
                0..5,
            ),
            value in finite(),
            timestamp in proptest::option::of(-1_000_000_000_000i64..4_000_000_000_000),
        ) {
            let s = Sample {
                name: name.as_str().into(),
                labels: labels.iter().map(|(k, v)| (k.as_str().into(), v.as_str().into())).collect(),
                value,
                timestamp: timestamp.map(|t| t as f64),
            };
            let line = s.render();
            prop_assert_eq!(parse_line(&line), Ok(Line::Sample(s)), "{}", line);
        }

        #[test]
        fn any_line_reads_or_errs_without_panic(line in "\\PC{0,80}") {
            // NaN is not equal to itself: compare the rendered lines.
            if let Ok(Line::Sample(s)) = parse_line(&line) {
                let again = s.render();
                let reread = match parse_line(&again) {
                    Ok(Line::Sample(s)) => Some(s.render()),
                    _ => None,
                };
                prop_assert_eq!(reread, Some(again));
            }
        }
    }
}
