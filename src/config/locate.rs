//! Where a key path (`region[0].endpoints[1]`) is written in the config text, and the key
//! path of a deserialisation error: what places a problem found without a span.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// `serde_spanned` reads a `Spanned<T>` as a map with these private keys; they are not
/// part of the key path a person writes.
const SPANNED_PRIVATE: &str = "$__serde_spanned_private_";

/// The key path of a deserialisation error as written in the file: `region[0].foo`,
/// `server.request_timeout`; empty at the top level.
pub(super) fn error_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if key.starts_with(SPANNED_PRIVATE) => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            // A part serde could not name (inside an untagged enum): what came before is
            // still where the problem is.
            Segment::Unknown => break,
        }
    }
    out
}

/// The span of the deepest part of `key` found in `doc`: the key itself for a table entry
/// (`server.connect_timeout`), the element for an index (`geoip.database[1]`).
pub(super) fn span_of(doc: &Spanned<DeTable<'_>>, key: &str) -> Option<Range<usize>> {
    let mut span = None;
    let mut table = Some(doc.get_ref());
    for part in key.split('.') {
        let (name, indexes) = part.split_at(part.find('[').unwrap_or(part.len()));
        let Some((k, v)) = table.and_then(|t| t.get_key_value(name)) else {
            break;
        };
        span = Some(k.span());
        let mut value: &DeValue<'_> = v.get_ref();
        for index in indexes.split(['[', ']']).filter(|s| !s.is_empty()) {
            let element = index
                .parse::<usize>()
                .ok()
                .and_then(|i| value.as_array().and_then(|a| a.get(i)));
            let Some(element) = element else { return span };
            span = Some(element.span());
            value = element.get_ref();
        }
        table = value.as_table();
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_find_their_line() {
        let text = "[server]\nconnect_timeout = \"0s\"\n\n[geoip]\ndatabase = [\n  \"a.mmdb\",\n  \"b.mmdb\",\n]\n\n\
                    [[region]]\nname = \"a\"\n\n[[region]]\nname = \"b\"\nhealth = { interval = \"0s\" }\n";
        let doc = DeTable::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let line = |key: &str| span_of(&doc, key).map(|s| super::super::validate::line_of(text, &s));
        let cases: [(&str, Option<usize>); 8] = [
            ("server.connect_timeout", Some(2)),
            ("geoip.database", Some(5)),
            ("geoip.database[1]", Some(7)),
            // A single file named with an index: the key's own line.
            ("geoip.database[9]", Some(5)),
            ("region[1].name", Some(14)),
            ("region[1].health.interval", Some(15)),
            ("region", Some(10)),
            ("tracing.sample_ratio", None),
        ];
        for (key, want) in cases {
            assert_eq!(line(key), want, "{key}");
        }
    }
}
