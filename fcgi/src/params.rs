//! Name-value pairs: the PARAMS stream and the GET_VALUES bodies.
//!
//! "FastCGI transmits a name-value pair as the length of the name, followed by the length of the
//! value, followed by the name, followed by the value. Lengths of 127 bytes and less can be
//! encoded in one byte, while longer lengths are always encoded in four bytes."
//!
//! Names and values are bytes, not text: a value may be any binary string, and a name may repeat
//! (every occurrence is kept, in order).

use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::Error;

/// The longest name or value the 4-byte length form can express (the high bit is the marker).
pub const MAX_PAIR_LEN: usize = 0x7fff_ffff;

/// Writes a length in the 1-byte form when it fits in 7 bits, else the 4-byte form.
pub fn encode_length(len: usize, dst: &mut impl BufMut) {
    debug_assert!(len <= MAX_PAIR_LEN, "caller bounds pair lengths");
    if len <= 127 {
        dst.put_u8(len as u8);
    } else {
        // "nameLengthB3 >> 7 == 1": the top bit marks the 4-byte form.
        dst.put_u32(len as u32 | 0x8000_0000);
    }
}

/// Reads a length: `Some((len, bytes used))`, or `None` if `src` is too short to hold it.
pub fn decode_length(src: &[u8]) -> Option<(usize, usize)> {
    let first = *src.first()?;
    if first >> 7 == 0 {
        return Some((usize::from(first), 1));
    }
    let b = src.get(..4)?;
    let len = u32::from_be_bytes([b[0] & 0x7f, b[1], b[2], b[3]]);
    Some((len as usize, 4))
}

/// The bytes one pair takes on the wire.
pub fn encoded_pair_len(name: &[u8], value: &[u8]) -> usize {
    let len_of = |n: usize| if n <= 127 { 1 } else { 4 };
    len_of(name.len()) + len_of(value.len()) + name.len() + value.len()
}

/// Writes one name-value pair.
pub fn encode_pair(name: &[u8], value: &[u8], dst: &mut impl BufMut) {
    encode_length(name.len(), dst);
    encode_length(value.len(), dst);
    dst.put_slice(name);
    dst.put_slice(value);
}

/// The name-value pairs of one request, in the order they arrived, duplicates included.
///
/// The pairs stay in the bytes they arrived in: decoding records where each name and value
/// is, and allocates nothing per pair.
#[derive(Clone, Default)]
pub struct Params {
    buf: Bytes,
    pairs: Vec<(Range<usize>, Range<usize>)>,
}

impl Params {
    /// Decodes a whole stream's worth of pairs, sharing `src`'s memory. At most `max_pairs`.
    pub fn decode(src: Bytes, max_pairs: usize) -> Result<Params, Error> {
        // A pair takes at least two bytes; nginx sends ~30 pairs of ~20 bytes.
        let mut pairs = Vec::with_capacity((src.len() / 16).min(max_pairs).min(64));
        let mut pos = 0;
        while pos < src.len() {
            if pairs.len() == max_pairs {
                return Err(Error::TooManyParams { limit: max_pairs });
            }
            let (name_len, n) = decode_length(&src[pos..]).ok_or(Error::TruncatedParams)?;
            pos += n;
            let (value_len, n) = decode_length(&src[pos..]).ok_or(Error::TruncatedParams)?;
            pos += n;
            // Checked before slicing: a length from the wire is never trusted.
            let rest = src.len() - pos;
            if name_len > rest || value_len > rest - name_len {
                return Err(Error::TruncatedParams);
            }
            let name = pos..pos + name_len;
            pos += name_len;
            let value = pos..pos + value_len;
            pos += value_len;
            pairs.push((name, value));
        }
        Ok(Params { buf: src, pairs })
    }

    /// Builds params from pairs (for clients and tests).
    pub fn from_pairs<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: impl IntoIterator<Item = (N, V)>,
    ) -> Params {
        let mut buf = BytesMut::new();
        let mut ranges = Vec::new();
        for (name, value) in pairs {
            append(&mut buf, &mut ranges, name.as_ref(), value.as_ref());
        }
        Params {
            buf: buf.freeze(),
            pairs: ranges,
        }
    }

    /// Writes every pair.
    pub fn encode(&self, dst: &mut impl BufMut) {
        for (name, value) in self.iter() {
            encode_pair(name, value, dst);
        }
    }

    /// The bytes [`Params::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        self.iter().map(|(n, v)| encoded_pair_len(n, v)).sum()
    }

    /// The value of the last pair named `name`: later pairs override earlier ones, as in a CGI
    /// environment built by `setenv`.
    pub fn get(&self, name: impl AsRef<[u8]>) -> Option<&[u8]> {
        let name = name.as_ref();
        self.iter().rev().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The value of `name` as UTF-8 text, if present and valid.
    pub fn get_str(&self, name: impl AsRef<[u8]>) -> Option<&str> {
        self.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// `value` (one of these pairs' values, from [`Params::get`] or [`Params::iter`]) as a
    /// slice of the shared buffer the pairs live in: no copy, for types that keep their bytes
    /// (`http::HeaderValue`, `http::uri::PathAndQuery`). `None` for bytes from elsewhere.
    pub fn shared(&self, value: &[u8]) -> Option<Bytes> {
        let start = (value.as_ptr() as usize).checked_sub(self.buf.as_ptr() as usize)?;
        let end = start.checked_add(value.len())?;
        (end <= self.buf.len()).then(|| self.buf.slice(start..end))
    }

    /// Every pair, in arrival order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&[u8], &[u8])> {
        self.pairs
            .iter()
            .map(|(n, v)| (&self.buf[n.clone()], &self.buf[v.clone()]))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Appends a pair (copying what came before: for building requests, not for serving them).
    pub fn push(&mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let mut buf = BytesMut::from(&self.buf[..]);
        append(&mut buf, &mut self.pairs, name.as_ref(), value.as_ref());
        self.buf = buf.freeze();
    }
}

/// Appends a pair's bytes to `buf` and records where they are.
fn append(
    buf: &mut BytesMut,
    pairs: &mut Vec<(Range<usize>, Range<usize>)>,
    name: &[u8],
    value: &[u8],
) {
    let start = buf.len();
    buf.extend_from_slice(name);
    let mid = buf.len();
    buf.extend_from_slice(value);
    pairs.push((start..mid, mid..buf.len()));
}

impl PartialEq for Params {
    fn eq(&self, other: &Params) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Params {}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(n, v)| (String::from_utf8_lossy(n), String::from_utf8_lossy(v))),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_and_four_byte_lengths() {
        let mut buf = Vec::new();
        encode_pair(b"A", &[b'v'; 128], &mut buf);
        assert_eq!(&buf[..6], b"\x01\x80\x00\x00\x80A");
        let p = Params::decode(Bytes::from(buf), 10).expect("valid");
        assert_eq!(p.get("A").map(|v| v.len()), Some(128));
        assert_eq!(decode_length(b"\x7f"), Some((127, 1)));
        assert_eq!(decode_length(b"\xff\xff\xff\xff"), Some((MAX_PAIR_LEN, 4)));
        assert_eq!(decode_length(b"\x80\x00\x01"), None);
    }

    #[test]
    fn duplicates_kept_and_last_wins() {
        let raw = Bytes::from_static(b"\x01\x01ax\x01\x01ay\x01\x00b");
        let p = Params::decode(raw, 10).expect("valid");
        assert_eq!(p.len(), 3);
        assert_eq!(p.get("a"), Some(&b"y"[..]));
        assert_eq!(p.get("b").map(|v| v.len()), Some(0));
        assert_eq!(p.iter().filter(|(n, _)| *n == b"a").count(), 2);
    }

    #[test]
    fn a_value_is_shared_without_a_copy_and_outside_bytes_are_refused() {
        let raw = Bytes::from_static(b"\x01\x03ayes\x01\x00b");
        let p = Params::decode(raw.clone(), 10).expect("valid");
        let value = p.get("a").expect("present");
        let shared = p.shared(value).expect("inside");
        assert_eq!(&shared[..], b"yes");
        assert_eq!(
            shared.as_ptr(),
            value.as_ptr(),
            "the same bytes, not a copy"
        );
        assert_eq!(
            p.shared(p.get("b").expect("empty")).map(|b| b.len()),
            Some(0)
        );
        let elsewhere = vec![b'y', b'e', b's'];
        assert_eq!(p.shared(&elsewhere), None, "bytes of another buffer");
    }

    #[test]
    fn binary_values() {
        let mut p = Params::default();
        p.push(&b"BIN"[..], &b"\x00\xff\xfe\r\n"[..]);
        let mut buf = Vec::new();
        p.encode(&mut buf);
        let back = Params::decode(Bytes::from(buf), 10).expect("valid");
        assert_eq!(back, p);
        assert_eq!(back.get_str("BIN"), None, "not UTF-8");
    }

    #[test]
    fn truncated_pairs_are_errors() {
        for raw in [
            &b"\x05"[..],
            b"\x05\x01abc",
            b"\x80\x00",
            b"\x01\x80\x00\x00\x10a",
        ] {
            assert_eq!(
                Params::decode(Bytes::copy_from_slice(raw), 10),
                Err(Error::TruncatedParams),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn impossible_lengths_do_not_allocate() {
        // Both lengths near 2^31: rejected by arithmetic, with nothing allocated for them.
        let raw = Bytes::from_static(b"\xff\xff\xff\xff\xff\xff\xff\xffab");
        assert_eq!(Params::decode(raw, 10), Err(Error::TruncatedParams));
    }

    #[test]
    fn pair_limit() {
        let raw = Bytes::from_static(b"\x01\x00a\x01\x00b\x01\x00c");
        assert_eq!(
            Params::decode(raw.clone(), 2),
            Err(Error::TooManyParams { limit: 2 })
        );
        assert_eq!(Params::decode(raw, 3).map(|p| p.len()), Ok(3));
    }
}
