//! A borrowed walk over a JSON request body: the top-level fields of an object, string
//! values as raw slices of the body, everything else skipped without being built. Enough
//! to read `model` and the prompt's text where they lie, with no allocation [pure].
//!
//! Strings are returned as their raw (still escaped) bytes: exact for the plain names models
//! have, and stable for hashing. Malformed input ends the walk (`None`), never panics.

/// Position after any JSON whitespace at `i`.
fn ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The raw content of the string starting at `b[i] == '"'`, and the position after it.
pub(crate) fn string(b: &[u8], i: usize) -> Option<(&[u8], usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let mut j = start;
    // Prompts are long strings: jump from quote or backslash to the next (SIMD), not byte by byte.
    loop {
        let k = j + memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[k] == b'"' {
            return Some((&b[start..k], k + 1));
        }
        j = k + 2;
    }
}

/// At most the first `max` raw bytes of the string starting at `b[i] == '"'`, without
/// looking further: a prefix hash needs no more of a long prompt than it takes.
pub(crate) fn string_prefix(b: &[u8], i: usize, max: usize) -> Option<&[u8]> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let window = b.get(start..b.len().min(start.saturating_add(max)))?;
    let mut j = 0;
    while let Some(k) = window.get(j..).and_then(|w| memchr::memchr2(b'"', b'\\', w)) {
        let k = j + k;
        if window[k] == b'"' {
            return Some(&window[..k]);
        }
        j = k + 2;
    }
    Some(window)
}

/// The position after the value starting at `i` (after whitespace).
pub(crate) fn skip(b: &[u8], i: usize) -> Option<usize> {
    let i = ws(b, i);
    match *b.get(i)? {
        b'"' => string(b, i).map(|(_, next)| next),
        b'{' | b'[' => {
            // Nesting depth only: strings are stepped over so their brackets do not count.
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string(b, j)?.1;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            // Number, true, false, null.
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

/// Calls `f(key, value_start)` for each field of the object at `i`, in order, until `f`
/// returns `false`. Returns `None` on malformed input.
pub(crate) fn fields<'b>(b: &'b [u8], i: usize, mut f: impl FnMut(&'b [u8], usize) -> bool) -> Option<()> {
    let mut i = ws(b, i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(());
    }
    loop {
        let (key, next) = string(b, i)?;
        i = ws(b, next);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let value = ws(b, i + 1);
        if !f(key, value) {
            return Some(());
        }
        i = ws(b, skip(b, value)?);
        match b.get(i)? {
            b',' => i = ws(b, i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

/// Calls `f(value_start)` for each element of the array at `i`, until `f` returns `false`.
pub(crate) fn elements(b: &[u8], i: usize, mut f: impl FnMut(usize) -> bool) -> Option<()> {
    let mut i = ws(b, i);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some(());
    }
    loop {
        if !f(i) {
            return Some(());
        }
        i = ws(b, skip(b, i)?);
        match b.get(i)? {
            b',' => i = ws(b, i + 1),
            b']' => return Some(()),
            _ => return None,
        }
    }
}

/// The position after the value at `i`, as [`skip`] finds it, for a value inside a container
/// walked element by element ([`object_walk`], [`array_walk`]): `None` also for a bare word
/// holding `{`, `[` or `"`, which is not JSON and which [`skip`] over the whole container
/// would count as structure. So a walk that succeeds ends where that [`skip`] ends.
pub(crate) fn skip_strict(b: &[u8], i: usize) -> Option<usize> {
    let i = ws(b, i);
    let end = skip(b, i)?;
    if !matches!(b[i], b'"' | b'{' | b'[') && b[i..end].iter().any(|c| matches!(c, b'{' | b'[' | b'"')) {
        return None;
    }
    Some(end)
}

/// Walks the object at `i` field by field: `f(key, value_start)` consumes the value and
/// returns the position after it (`None` ends the walk). The position after the object;
/// `None` on malformed input or when `f` gave up.
pub(crate) fn object_walk<'b>(
    b: &'b [u8],
    i: usize,
    mut f: impl FnMut(&'b [u8], usize) -> Option<usize>,
) -> Option<usize> {
    let mut i = ws(b, i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        let (key, next) = string(b, i)?;
        i = ws(b, next);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, f(key, ws(b, i + 1))?);
        match b.get(i)? {
            b',' => i = ws(b, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// Walks the array at `i` element by element: `f(value_start)` consumes the element and
/// returns the position after it. As [`object_walk`].
pub(crate) fn array_walk(b: &[u8], i: usize, mut f: impl FnMut(usize) -> Option<usize>) -> Option<usize> {
    let mut i = ws(b, i);
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i = ws(b, i + 1);
    if b.get(i) == Some(&b']') {
        return Some(i + 1);
    }
    loop {
        i = ws(b, f(i)?);
        match b.get(i)? {
            b',' => i = ws(b, i + 1),
            b']' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The raw string value of top-level field `name` of the object `body`.
pub(crate) fn top_level_string<'b>(body: &'b [u8], name: &[u8]) -> Option<&'b [u8]> {
    let mut found = None;
    fields(body, 0, |key, value| {
        if key == name {
            found = string(body, value).map(|(s, _)| s);
            return false;
        }
        true
    })?;
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_string_table() {
        let cases: [(&str, Option<&str>); 9] = [
            (r#"{"model":"llama-3.1-70b","messages":[]}"#, Some("llama-3.1-70b")),
            (
                r#"{"messages":[{"role":"user","content":"{\"model\":\"no\"]}"}], "model" : "m2" }"#,
                Some("m2"),
            ),
            (r#"{"temperature":0.7,"stream":true,"n":null,"model":"x"}"#, Some("x")),
            (r#"{"nested":{"model":"inner"}}"#, None),
            (r#"{"model":42}"#, None),
            (r#"["model","x"]"#, None),
            (r#"{"model":"unterminated"#, None),
            ("", None),
            (r#"  { "model" : "a\"b" }"#, Some(r#"a\"b"#)),
        ];
        for (body, want) in cases {
            let got = top_level_string(body.as_bytes(), b"model");
            assert_eq!(got, want.map(str::as_bytes), "{body}");
        }
    }

    #[test]
    fn string_prefix_table() {
        let cases: [(&str, usize, Option<&str>); 6] = [
            (r#""hello world""#, 5, Some("hello")),
            (r#""hello""#, 50, Some("hello")),
            (r#""a\"b" tail"#, 50, Some(r#"a\"b"#)),
            (r#""a\"b" tail"#, 2, Some(r#"a\"#)),
            (r#""unterminated"#, 50, Some("unterminated")),
            ("not a string", 5, None),
        ];
        for (text, max, want) in cases {
            assert_eq!(
                string_prefix(text.as_bytes(), 0, max),
                want.map(str::as_bytes),
                "{text} {max}"
            );
        }
    }

    #[test]
    fn malformed_input_ends_the_walk() {
        for body in [
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\":[1,2",
            "{\"a\":1 \"b\":2}",
            "{\"a\":\"\\",
        ] {
            let mut n = 0;
            let _ = fields(body.as_bytes(), 0, |_, _| {
                n += 1;
                true
            });
            assert!(n <= 2, "{body}");
            assert_eq!(top_level_string(body.as_bytes(), b"b"), None, "{body}");
        }
    }
}
