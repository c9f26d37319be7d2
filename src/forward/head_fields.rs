//! A message head's fields as they came off the wire: spans over the head's bytes, some
//! marked as not passed on. The endpoint's response (`endpoint_fields`) and the client's
//! HTTP/1.1 request (`request_fields`) keep their fields this way instead of in a
//! `HeaderMap`, whose hash and insert a field, two allocations and drop cost more than
//! everything Meridian does with most fields (pass them on). NGINX and Pingora keep fields
//! the same way: a list over the received bytes.

use std::ops::Range;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};

use super::h1::{FieldSpan, FieldSpans, fields_of};

/// One bit a field: a head kept as a list has at most 128 fields (an endpoint's at most
/// `forward::h1::MAX_HEADERS`, 100; a client's longer head goes into a map). Two words
/// rather than a `u128`, which would align a box to 16 bytes (mimalloc's slower aligned
/// path).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FieldMask([u64; 2]);

impl FieldMask {
    pub(crate) const BITS: usize = 128;

    /// Sets bit `i` (< 128).
    pub(crate) fn set(&mut self, i: usize) {
        self.0[(i >> 6) & 1] |= 1 << (i & 63);
    }

    pub(crate) fn has(self, i: usize) -> bool {
        self.0[(i >> 6) & 1] & (1 << (i & 63)) != 0
    }

    fn union(self, other: FieldMask) -> FieldMask {
        FieldMask([self.0[0] | other.0[0], self.0[1] | other.0[1]])
    }
}

/// A head's fields over its bytes, the dropped ones marked.
#[derive(Debug)]
pub(crate) struct HeadFields {
    head: Bytes,
    spans: FieldSpans,
    /// Bit `i`: field `i` is not passed on.
    dropped: FieldMask,
    /// Bit `n` (63 for longer): a field's name is `n` bytes long. Most lookups are for a
    /// name the head does not carry, and miss here without a look at any field.
    lengths: u64,
}

impl HeadFields {
    pub(crate) fn new() -> HeadFields {
        HeadFields {
            head: Bytes::new(),
            spans: FieldSpans::new(),
            dropped: FieldMask::default(),
            lengths: 0,
        }
    }

    /// Where `h1::field_spans` writes the fields' spans in the head to come.
    pub(crate) fn spans_mut(&mut self) -> &mut FieldSpans {
        &mut self.spans
    }

    /// Takes in the frozen `head` the spans (from `h1::field_spans`: fields httparse
    /// accepted) lie in, showing `each` every field's index and name; `false` (and nothing
    /// taken) if a span lies outside the head or there are more fields than a mask holds.
    pub(crate) fn take_in(&mut self, head: Bytes, mut each: impl FnMut(usize, &[u8])) -> bool {
        if self.spans.len() > FieldMask::BITS {
            return false;
        }
        let mut lengths = 0;
        for (i, span) in self.spans.iter().enumerate() {
            let (name, value) = (span.name(), span.value());
            if name.start > name.end || name.end > head.len() || value.start > value.end || value.end > head.len() {
                return false;
            }
            lengths |= length_bit(name.len());
            each(i, &head[name]);
        }
        self.head = head;
        self.lengths = lengths;
        true
    }

    /// The head's bytes, for sizing what is written from them.
    pub(crate) fn head_len(&self) -> usize {
        self.head.len()
    }

    /// How many fields are passed on (for sizing).
    pub(crate) fn len(&self) -> usize {
        self.spans.len() - (self.dropped.0[0].count_ones() + self.dropped.0[1].count_ones()) as usize
    }

    /// The fields passed on, in order: index, name as sent, value.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (usize, &[u8], &[u8])> {
        let (head, dropped) = (&self.head[..], self.dropped);
        // The spans lie in the head (`take_in` checked): `get` never misses.
        self.spans
            .iter()
            .enumerate()
            .filter(move |(i, _)| !dropped.has(*i))
            .map(move |(i, span)| {
                let name = head.get(span.name()).unwrap_or_default();
                (i, name, head.get(span.value()).unwrap_or_default())
            })
    }

    /// Shows `each` the name of every field passed on, as sent.
    pub(crate) fn each_name(&self, mut each: impl FnMut(&[u8])) {
        for (i, span) in self.spans.iter().enumerate() {
            if !self.dropped.has(i) {
                each(self.head.get(span.name()).unwrap_or_default());
            }
        }
    }

    /// The head's bytes.
    pub(crate) fn head(&self) -> &[u8] {
        &self.head
    }

    /// The fields passed on, in order: name as sent, value, and where the field's whole
    /// line lies in the head when it lies there as Meridian writes one (`name: value\r\n`),
    /// so a writer can copy runs of lines at once.
    pub(crate) fn lines(&self) -> Lines<'_> {
        Lines { fields: self, next: 0 }
    }

    /// The fields passed on named `name` (a lowercase name, sent in any case; lengths are
    /// compared first, from the spans): index and value.
    pub(crate) fn named<'a, 'n>(&'a self, name: &'n str) -> Named<'a, 'n> {
        let carried = self.lengths & length_bit(name.len()) != 0;
        Named {
            fields: self,
            name: name.as_bytes(),
            front: 0,
            back: if carried { self.spans.len() } else { 0 },
        }
    }

    /// Every value of `name` passed on, in order.
    pub(crate) fn values<'a, 'n>(&'a self, name: &'n str) -> impl DoubleEndedIterator<Item = &'a [u8]> + use<'a, 'n> {
        self.named(name).map(|(_, value)| value)
    }

    /// The first value of `name` passed on, as `HeaderMap::get` gives.
    pub(crate) fn get<'a>(&'a self, name: &str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    /// `value` (one of this head's values) as a `HeaderValue` sharing the head's memory.
    pub(crate) fn value_of(&self, value: &[u8]) -> Option<HeaderValue> {
        if value.is_empty() {
            return Some(HeaderValue::from_static(""));
        }
        // `slice_ref` panics on bytes from elsewhere: checked first.
        let range = self.head.as_ptr_range();
        if !range.contains(&value.as_ptr()) || value.as_ptr_range().end > range.end {
            return None;
        }
        HeaderValue::from_maybe_shared(self.head.slice_ref(value)).ok()
    }

    /// Stops passing on the fields whose bits `mask` sets.
    pub(crate) fn drop_fields(&mut self, mask: FieldMask) {
        self.dropped = self.dropped.union(mask);
    }

    /// Stops passing on the fields named `name` (a lowercase name).
    pub(crate) fn drop_named(&mut self, name: &str) {
        let mut dropped = FieldMask::default();
        for (i, _) in self.named(name) {
            dropped.set(i);
        }
        self.drop_fields(dropped);
    }

    /// Takes `name` out of what is passed on; its first value, as `HeaderMap::remove` gives.
    pub(crate) fn take(&mut self, name: &str) -> Option<HeaderValue> {
        let mut taken = FieldMask::default();
        let mut first = None;
        for (i, value) in self.named(name) {
            if first.is_none() {
                first = Some(self.value_of(value));
            }
            taken.set(i);
        }
        self.drop_fields(taken);
        first.flatten()
    }

    /// The fields passed on but those `skip` (given the name as sent) refuses, as a map
    /// with room for `extra` more; `None` only for spans outside the head, which `take_in`
    /// refused.
    pub(crate) fn to_map(&self, extra: usize, skip: impl Fn(&[u8]) -> bool) -> Option<HeaderMap> {
        let kept: FieldSpans;
        let spans: &[FieldSpan] = if self.dropped == FieldMask::default() && !self.fields().any(|(_, n, _)| skip(n)) {
            // The usual head: every field goes, built straight from the spans.
            &self.spans
        } else {
            kept = self
                .fields()
                .filter(|(_, name, _)| !skip(name))
                .map(|(i, _, _)| self.spans[i])
                .collect();
            &kept
        };
        fields_of(&self.head, spans, extra).map(|(map, _)| map)
    }
}

/// [`HeadFields::lines`]: written out rather than built of iterator adapters, which the
/// compiler left as calls of their own on the request path (callgrind).
pub(crate) struct Lines<'a> {
    fields: &'a HeadFields,
    next: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = (&'a [u8], &'a [u8], Option<Range<usize>>);

    fn next(&mut self) -> Option<Self::Item> {
        let f = self.fields;
        while let Some(span) = f.spans.get(self.next) {
            let i = self.next;
            self.next += 1;
            if f.dropped.has(i) {
                continue;
            }
            let (name, value) = (span.name(), span.value());
            let head = &f.head[..];
            let line = (value.start == name.end + 2
                && head.get(name.end..value.start) == Some(b": ")
                && head.get(value.end..value.end + 2) == Some(b"\r\n"))
            .then(|| name.start..value.end + 2);
            return Some((
                head.get(name).unwrap_or_default(),
                head.get(value).unwrap_or_default(),
                line,
            ));
        }
        None
    }
}

/// [`HeadFields::named`], written out for the same reason as [`Lines`].
pub(crate) struct Named<'a, 'n> {
    fields: &'a HeadFields,
    name: &'n [u8],
    /// The spans not yet looked at: `front..back`.
    front: usize,
    back: usize,
}

impl<'a> Named<'a, '_> {
    /// Field `i`'s value when it is passed on and named so. The length and the mask are
    /// looked at here, inlined into the loop; the names only when those allow.
    #[inline]
    fn at(&self, i: usize) -> Option<&'a [u8]> {
        let f = self.fields;
        let span = f.spans.get(i)?;
        if span.name_len() != self.name.len() || f.dropped.has(i) {
            return None;
        }
        self.named_so(*span)
    }

    #[inline(never)]
    fn named_so(&self, span: FieldSpan) -> Option<&'a [u8]> {
        let head = &self.fields.head[..];
        if !same_name(head.get(span.name())?, self.name) {
            return None;
        }
        head.get(span.value())
    }
}

fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

/// Whether a name as sent is `lower` (a lowercase name) in any case: eight bytes at a
/// time, the sent word's ASCII capitals lowered (std's `eq_ignore_ascii_case` goes a byte at
/// a time, lowering both sides).
fn same_name(sent: &[u8], lower: &[u8]) -> bool {
    /// Sets 0x20 in each byte that is `A`..=`Z`: a byte's low seven bits plus 0x3f carry
    /// into its top bit from `A` up, plus 0x25 from past `Z` up; non-ASCII bytes are left.
    fn lowered(x: u64) -> u64 {
        const TOP: u64 = 0x8080_8080_8080_8080;
        let low = x & !TOP;
        let from_a = low + 0x3f3f_3f3f_3f3f_3f3f;
        let past_z = low + 0x2525_2525_2525_2525;
        x | ((from_a & !past_z & !x & TOP) >> 2)
    }
    fn word(bytes: &[u8], at: usize) -> u64 {
        bytes
            .get(at..at + 8)
            .and_then(|w| w.try_into().ok())
            .map_or(u64::MAX, u64::from_le_bytes)
    }
    let n = sent.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        let pack = |s: &[u8]| s.iter().fold(0u64, |w, &b| w << 8 | u64::from(b));
        return lowered(pack(sent)) == pack(lower);
    }
    // Whole words, then the last eight bytes (overlapping the last word when `n` is not a
    // multiple of eight).
    let mut at = 0;
    while at + 8 < n {
        if lowered(word(sent, at)) != word(lower, at) {
            return false;
        }
        at += 8;
    }
    lowered(word(sent, n - 8)) == word(lower, n - 8)
}

impl<'a> Iterator for Named<'a, '_> {
    type Item = (usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        while self.front < self.back {
            let i = self.front;
            self.front += 1;
            if let Some(value) = self.at(i) {
                return Some((i, value));
            }
        }
        None
    }
}

impl DoubleEndedIterator for Named<'_, '_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        while self.front < self.back {
            self.back -= 1;
            if let Some(value) = self.at(self.back) {
                return Some((self.back, value));
            }
        }
        None
    }
}

/// Whether `map` holds `name` (any case), which then stands in for a listed field of that
/// name: whatever sets a field on the message's map after its head was read replaces the
/// head's, as an insert into one map did.
pub(crate) fn shadowed(map: &HeaderMap, name: &[u8]) -> bool {
    !map.is_empty() && std::str::from_utf8(name).is_ok_and(|name| map.contains_key(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_same_in_any_case_and_only_then() {
        let names: Vec<Vec<u8>> = (0..=255u8)
            .flat_map(|b| {
                [
                    vec![b],
                    vec![b'x', b'-', b, b'a', b'b', b'c', b'd', b'e', b'f', b'Z', b],
                ]
            })
            .collect();
        for a in &names {
            for b in names.iter().filter(|b| b.len() == a.len()) {
                let lower = b.to_ascii_lowercase();
                let want = a.eq_ignore_ascii_case(b);
                assert_eq!(same_name(a, &lower), want, "{} {}", a.escape_ascii(), b.escape_ascii());
            }
        }
        assert!(same_name(b"X-Forwarded-For", b"x-forwarded-for"));
        assert!(same_name(
            b"X-Stainless-Runtime-Version",
            b"x-stainless-runtime-version"
        ));
        assert!(!same_name(
            b"X-Stainless-Runtime-Versiom",
            b"x-stainless-runtime-version"
        ));
        assert!(!same_name(
            b"Y-Stainless-Runtime-Version",
            b"x-stainless-runtime-version"
        ));
        assert!(!same_name(b"x^y", b"x~y") && !same_name(b"x_y", b"x\x7fy"));
    }
}
