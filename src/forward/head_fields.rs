//! A message head's fields as they came off the wire: spans over the head's bytes, some
//! marked as not passed on. The endpoint's response (`endpoint_fields`) and the client's
//! HTTP/1.1 request (`request_fields`) keep their fields this way instead of in a
//! `HeaderMap`, whose hash and insert a field, two allocations and drop cost more than
//! everything Meridian does with most fields (pass them on). NGINX and Pingora keep fields
//! the same way: a list over the received bytes.

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
}

impl HeadFields {
    pub(crate) fn new() -> HeadFields {
        HeadFields {
            head: Bytes::new(),
            spans: FieldSpans::new(),
            dropped: FieldMask::default(),
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
        for (i, span) in self.spans.iter().enumerate() {
            let (name, value) = (span.name(), span.value());
            if name.start > name.end || name.end > head.len() || value.start > value.end || value.end > head.len() {
                return false;
            }
            each(i, &head[name]);
        }
        self.head = head;
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

    /// The fields passed on named `name` (any case; lengths are compared first, from the
    /// spans): index and value.
    pub(crate) fn named<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl DoubleEndedIterator<Item = (usize, &'a [u8])> + use<'a, 'n> {
        let (head, dropped) = (&self.head[..], self.dropped);
        self.spans
            .iter()
            .enumerate()
            .filter(move |(i, span)| {
                span.name().len() == name.len()
                    && !dropped.has(*i)
                    && head
                        .get(span.name())
                        .is_some_and(|sent| sent.eq_ignore_ascii_case(name.as_bytes()))
            })
            .map(move |(i, span)| (i, head.get(span.value()).unwrap_or_default()))
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

/// Whether `map` holds `name` (any case), which then stands in for a listed field of that
/// name: whatever sets a field on the message's map after its head was read replaces the
/// head's, as an insert into one map did.
pub(crate) fn shadowed(map: &HeaderMap, name: &[u8]) -> bool {
    !map.is_empty() && std::str::from_utf8(name).is_ok_and(|name| map.contains_key(name))
}
