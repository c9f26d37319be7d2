//! Request path normalisation: the one spelling of a path that route rules, residency and
//! the endpoint all see (docs/security.md).
//!
//! An endpoint that decodes `%2e%2e` or resolves `..` itself would otherwise serve a path
//! other than the one Meridian matched its rules on.

use std::borrow::Cow;

/// Why a path cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PathError {
    /// A `..` segment would leave the root.
    #[error("the path climbs above /")]
    AboveRoot,
}

/// Normalises an origin-form path (no query): percent-encoded unreserved characters and
/// `/` are decoded, repeated slashes merged, and dot-segments removed (RFC 3986 §5.2.4).
/// Paths that need no change are returned borrowed; a path that does not start with `/`
/// (`*` of `OPTIONS *`) is returned as it is.
pub(crate) fn normalise(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') || is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            // Repeated slashes: `//` is one `/`; a final empty segment is a trailing slash.
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

/// True when `normalise` would return `path` (which starts with `/`) unchanged: no `%`, no
/// empty, `.` or `..` segment. The common case, checked in one pass over the bytes without allocating, with
/// no look-ahead (matching the rest of the path after each `/` cost ~17 instructions a byte).
fn is_normal(path: &str) -> bool {
    // The segment being read: its length, and how many of its bytes are dots.
    let (mut len, mut dots) = (0usize, 0usize);
    // A segment that is empty, `.` or `..` needs normalising (an empty last one is a
    // trailing slash, which does not).
    let odd = |len: usize, dots: usize| len == dots && dots <= 2;
    for &b in path.as_bytes().iter().skip(1) {
        match b {
            b'%' => return false,
            b'/' if odd(len, dots) => return false,
            b'/' => (len, dots) = (0, 0),
            b'.' => (len, dots) = (len + 1, dots + 1),
            _ => len += 1,
        }
    }
    len == 0 || !odd(len, dots)
}

/// Decodes `%XX` where XX is an unreserved character (RFC 3986 §2.3) or `/`; every other
/// escape is kept as written, with its hex digits uppercased so equal paths compare equal.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h << 4 | l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'/') {
                    out.push(char::from(c));
                } else {
                    out.push('%');
                    out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                    out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
                }
                i += 3;
                continue;
            }
        }
        // The path came from a parsed URI: ASCII only, so byte and char agree.
        out.push(char::from(bytes[i]));
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::path_matches;
    use proptest::prelude::*;

    /// Every path of up to seven bytes from `/ . a %` is judged as by looking ahead after
    /// each slash (the rule written out).
    #[test]
    fn normal_paths_are_told_as_the_rule_says() {
        fn by_the_rule(path: &str) -> bool {
            let bytes = path.as_bytes();
            bytes.iter().enumerate().all(|(i, &b)| match b {
                b'%' => false,
                b'/' => !matches!(
                    &bytes[i + 1..],
                    [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'.', b'.'] | [b'.', b'.', b'/', ..]
                ),
                _ => true,
            })
        }
        let alphabet = ['/', '.', 'a', '%'];
        let mut paths = vec![String::from("/")];
        for _ in 0..6 {
            let longer: Vec<String> = paths
                .iter()
                .filter(|p| p.len() == paths.last().map_or(0, String::len))
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            paths.extend(longer);
        }
        assert!(paths.len() > 5000);
        for p in &paths {
            assert_eq!(is_normal(p), by_the_rule(p), "{p:?}");
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("/", Ok("/")),
            ("/v1/models", Ok("/v1/models")),
            ("/v1/models/", Ok("/v1/models/")),
            ("/v1/models/../files/file-abc/content", Ok("/v1/files/file-abc/content")),
            ("/v1/models/%2e%2e/files/x", Ok("/v1/files/x")),
            ("/v1/models/%2E%2E/files/x", Ok("/v1/files/x")),
            ("/v1/models/./../files/x", Ok("/v1/files/x")),
            ("/v1/models/..%2Ffiles/x", Ok("/v1/files/x")),
            ("/v1/models/..%2ffiles/x", Ok("/v1/files/x")),
            ("/v1/models%2F..%2F..%2Fv1/files", Ok("/v1/files")),
            ("//v1//models", Ok("/v1/models")),
            ("/v1/./models/.", Ok("/v1/models/")),
            ("/v1/models/..", Ok("/v1/")),
            ("/%76%31/chat", Ok("/v1/chat")),
            ("/a%20b/%zz/%3f", Ok("/a%20b/%zz/%3F")),
            ("/v1/a%2", Ok("/v1/a%2")),
            ("/..", Err(PathError::AboveRoot)),
            ("/v1/../..", Err(PathError::AboveRoot)),
            ("/%2e%2e/etc", Err(PathError::AboveRoot)),
            ("/v1/..%2f..%2f..", Err(PathError::AboveRoot)),
            ("*", Ok("*")),
        ];
        for (input, want) in cases {
            let got = normalise(input).map(|c| c.into_owned());
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{input}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/v1/chat/completions", "/v1/models/", "/a.b/c..d/.e"] {
            assert!(matches!(normalise(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    /// How a lenient endpoint reads a path: every escape decoded, then dot-segments
    /// resolved with `..` at the root staying at the root.
    fn lenient(path: &str) -> String {
        let bytes = path.as_bytes();
        let mut decoded = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    decoded.push(h << 4 | l);
                    i += 3;
                    continue;
                }
            }
            decoded.push(bytes[i]);
            i += 1;
        }
        let decoded = String::from_utf8_lossy(&decoded);
        let mut out: Vec<&str> = Vec::new();
        for s in decoded.split('/') {
            match s {
                "" | "." => {}
                ".." => {
                    out.pop();
                }
                s => out.push(s),
            }
        }
        format!("/{}", out.join("/"))
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("v1".to_string()),
            Just("models".to_string()),
            Just("files".to_string()),
            Just("..".to_string()),
            Just(".".to_string()),
            Just("".to_string()),
            Just("%2e%2e".to_string()),
            Just("%2E%2e".to_string()),
            Just("%2e".to_string()),
            Just("..%2F".to_string()),
            Just("%2fv1%2f".to_string()),
            Just("mod%65ls".to_string()),
            Just("%252e%252e".to_string()),
            "[a-z.%2fF]{0,6}",
        ]
    }

    /// `is_normal` by its definition, segment by segment.
    fn is_normal_by_segments(path: &str) -> bool {
        if path.contains('%') {
            return false;
        }
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        segments.iter().enumerate().all(|(i, s)| match *s {
            "." | ".." => false,
            "" => i + 1 == segments.len(),
            _ => true,
        })
    }

    proptest! {
        /// The one-pass check agrees with the definition on any path.
        #[test]
        fn the_byte_scan_is_the_segment_rule(path in "/[a-z./%]{0,12}") {
            prop_assert_eq!(is_normal(&path), is_normal_by_segments(&path), "{}", path);
        }

        /// What Meridian matches is what a normalising endpoint serves: no path the
        /// normaliser accepts reaches the exempt prefix upstream unless its normalised form
        /// matches it here, and the normalised form is a fixed point.
        #[test]
        fn exempt_rule_matches_only_through_the_normalised_form(
            segments in proptest::collection::vec(segment(), 0..8),
        ) {
            let raw = format!("/{}", segments.join("/"));
            if let Ok(n) = normalise(&raw) {
                let n = n.into_owned();
                prop_assert_eq!(normalise(&n).map(|c| c.into_owned()), Ok(n.clone()));
                for prefix in ["/v1/models", "/v1/files", "/v1"] {
                    let upstream_sees = lenient(&n);
                    prop_assert_eq!(
                        path_matches(prefix, &n),
                        path_matches(prefix, &upstream_sees),
                        "raw {} normalised {} upstream {}", raw, n, upstream_sees
                    );
                }
            }
        }
    }
}
