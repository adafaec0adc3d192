//! Records: the 8-byte header, the record types, and the decoder that splits a byte stream into
//! records without copying their content.
//!
//! ```text
//! typedef struct {
//!     unsigned char version;
//!     unsigned char type;
//!     unsigned char requestIdB1, requestIdB0;
//!     unsigned char contentLengthB1, contentLengthB0;
//!     unsigned char paddingLength;
//!     unsigned char reserved;
//!     unsigned char contentData[contentLength];
//!     unsigned char paddingData[paddingLength];
//! } FCGI_Record;
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::Error;

/// `FCGI_VERSION_1`, the only version there is.
pub const VERSION_1: u8 = 1;
/// Length of a record header.
pub const HEADER_LEN: usize = 8;
/// The largest content one record can carry (`contentLength` is 16 bits).
pub const MAX_CONTENT_LEN: usize = 65535;
/// The largest content length that is a multiple of 8, so a record needs no padding.
pub const MAX_ALIGNED_CONTENT_LEN: usize = 65528;
/// The request id of management records (`FCGI_NULL_REQUEST_ID`).
pub const NULL_REQUEST_ID: u16 = 0;
/// The `flags` bit of BEGIN_REQUEST asking the application to keep the connection open.
pub const KEEP_CONN: u8 = 1;

/// The record types of FastCGI 1.0, by their wire value.
#[allow(missing_docs)]
pub mod kind {
    pub const BEGIN_REQUEST: u8 = 1;
    pub const ABORT_REQUEST: u8 = 2;
    pub const END_REQUEST: u8 = 3;
    pub const PARAMS: u8 = 4;
    pub const STDIN: u8 = 5;
    pub const STDOUT: u8 = 6;
    pub const STDERR: u8 = 7;
    pub const DATA: u8 = 8;
    pub const GET_VALUES: u8 = 9;
    pub const GET_VALUES_RESULT: u8 = 10;
    pub const UNKNOWN_TYPE: u8 = 11;
}

/// The role a BEGIN_REQUEST asks the application to play.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `FCGI_RESPONDER` (1): the CGI/1.1 role, what nginx and Apache ask for.
    Responder,
    /// `FCGI_AUTHORIZER` (2): allow or deny a request.
    Authorizer,
    /// `FCGI_FILTER` (3): a Responder with an extra DATA stream (the file to filter).
    Filter,
    /// A role this specification does not define; answered with `FCGI_UNKNOWN_ROLE`.
    Unknown(u16),
}

impl Role {
    /// The wire value.
    pub fn code(self) -> u16 {
        match self {
            Role::Responder => 1,
            Role::Authorizer => 2,
            Role::Filter => 3,
            Role::Unknown(c) => c,
        }
    }

    /// The role for a wire value.
    pub fn from_code(code: u16) -> Role {
        match code {
            1 => Role::Responder,
            2 => Role::Authorizer,
            3 => Role::Filter,
            c => Role::Unknown(c),
        }
    }
}

/// The `protocolStatus` of END_REQUEST.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolStatus {
    /// `FCGI_REQUEST_COMPLETE` (0): normal end.
    RequestComplete,
    /// `FCGI_CANT_MPX_CONN` (1): a second request on a connection that takes one at a time.
    CantMpxConn,
    /// `FCGI_OVERLOADED` (2): out of some resource.
    Overloaded,
    /// `FCGI_UNKNOWN_ROLE` (3): the role is not one this application plays.
    UnknownRole,
    /// A value the specification does not define.
    Other(u8),
}

impl ProtocolStatus {
    /// The wire value.
    pub fn code(self) -> u8 {
        match self {
            ProtocolStatus::RequestComplete => 0,
            ProtocolStatus::CantMpxConn => 1,
            ProtocolStatus::Overloaded => 2,
            ProtocolStatus::UnknownRole => 3,
            ProtocolStatus::Other(c) => c,
        }
    }

    /// The status for a wire value.
    pub fn from_code(code: u8) -> ProtocolStatus {
        match code {
            0 => ProtocolStatus::RequestComplete,
            1 => ProtocolStatus::CantMpxConn,
            2 => ProtocolStatus::Overloaded,
            3 => ProtocolStatus::UnknownRole,
            c => ProtocolStatus::Other(c),
        }
    }
}

/// A record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The record type (see [`kind`]).
    pub record_type: u8,
    /// The request the record belongs to; 0 for management records.
    pub request_id: u16,
    /// Bytes of content after the header.
    pub content_len: u16,
    /// Bytes of padding after the content.
    pub padding_len: u8,
}

impl Header {
    /// Parses a header, checking only the version: everything else is meaning, not syntax.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Header, Error> {
        // "This specification documents FCGI_VERSION_1."
        if b[0] != VERSION_1 {
            return Err(Error::UnsupportedVersion(b[0]));
        }
        Ok(Header {
            record_type: b[1],
            request_id: u16::from_be_bytes([b[2], b[3]]),
            content_len: u16::from_be_bytes([b[4], b[5]]),
            padding_len: b[6],
        })
    }

    /// Writes the header.
    pub fn encode(&self, dst: &mut impl BufMut) {
        dst.put_u8(VERSION_1);
        dst.put_u8(self.record_type);
        dst.put_u16(self.request_id);
        dst.put_u16(self.content_len);
        dst.put_u8(self.padding_len);
        dst.put_u8(0);
    }
}

/// One record as it came off the wire: header fields plus content, padding dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record type (see [`kind`]).
    pub record_type: u8,
    /// The request id.
    pub request_id: u16,
    /// The content, split off the input without copying.
    pub content: Bytes,
}

/// Splits one record off the front of `src`: `Ok(None)` when more bytes are needed.
///
/// The content is split off zero-copy; padding is consumed and dropped. The decoder cannot be
/// made to allocate: a record is at most 8 + 65535 + 255 bytes, all already buffered by the caller.
pub fn decode(src: &mut BytesMut) -> Result<Option<Record>, Error> {
    let Some(head) = src.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::parse(head)?;
    let content_len = usize::from(header.content_len);
    let total = HEADER_LEN + content_len + usize::from(header.padding_len);
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(HEADER_LEN);
    let content = src.split_to(content_len).freeze();
    // "The receiver of a record ignores the paddingData."
    src.advance(usize::from(header.padding_len));
    Ok(Some(Record {
        record_type: header.record_type,
        request_id: header.request_id,
        content,
    }))
}

/// At end of input: an error if a record was left half-received.
pub fn check_eof(src: &BytesMut) -> Result<(), Error> {
    if src.is_empty() {
        Ok(())
    } else {
        Err(Error::Truncated {
            buffered: src.len(),
        })
    }
}

/// Padding that brings `content_len` up to a multiple of 8.
///
/// "We recommend that records be placed on boundaries that are multiples of eight bytes."
pub fn padding_for(content_len: usize) -> u8 {
    // Always < 8, so the cast cannot truncate.
    ((8 - content_len % 8) % 8) as u8
}

/// Writes one record with `content` (at most [`MAX_CONTENT_LEN`] bytes) and 8-byte padding.
pub fn encode(record_type: u8, request_id: u16, content: &[u8], dst: &mut impl BufMut) {
    debug_assert!(
        content.len() <= MAX_CONTENT_LEN,
        "caller splits content into records"
    );
    let padding = padding_for(content.len());
    Header {
        record_type,
        request_id,
        content_len: content.len() as u16,
        padding_len: padding,
    }
    .encode(dst);
    dst.put_slice(content);
    dst.put_bytes(0, usize::from(padding));
}

/// Writes a whole stream chunk as as many records as it takes, each at most
/// [`MAX_ALIGNED_CONTENT_LEN`] bytes so none needs padding but the last. Writes nothing for an
/// empty `data`: the empty record ends a stream, so it must be asked for with [`encode_end_of_stream`].
pub fn encode_stream(record_type: u8, request_id: u16, data: &[u8], dst: &mut impl BufMut) {
    for chunk in data.chunks(MAX_ALIGNED_CONTENT_LEN) {
        encode(record_type, request_id, chunk, dst);
    }
}

/// Writes the empty record that ends a stream.
pub fn encode_end_of_stream(record_type: u8, request_id: u16, dst: &mut impl BufMut) {
    encode(record_type, request_id, &[], dst);
}

/// The bytes [`encode_stream`] writes for `len` bytes of data, for sizing buffers.
pub fn stream_encoded_len(len: usize) -> usize {
    let full = len / MAX_ALIGNED_CONTENT_LEN;
    let rest = len % MAX_ALIGNED_CONTENT_LEN;
    let mut n = full * (HEADER_LEN + MAX_ALIGNED_CONTENT_LEN);
    if rest > 0 {
        n += HEADER_LEN + rest + usize::from(padding_for(rest));
    }
    n
}

/// Writes BEGIN_REQUEST.
pub fn encode_begin_request(request_id: u16, role: Role, keep_conn: bool, dst: &mut impl BufMut) {
    let mut body = [0u8; 8];
    body[..2].copy_from_slice(&role.code().to_be_bytes());
    body[2] = if keep_conn { KEEP_CONN } else { 0 };
    encode(kind::BEGIN_REQUEST, request_id, &body, dst);
}

/// Writes END_REQUEST.
pub fn encode_end_request(
    request_id: u16,
    app_status: u32,
    protocol_status: ProtocolStatus,
    dst: &mut impl BufMut,
) {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&app_status.to_be_bytes());
    body[4] = protocol_status.code();
    encode(kind::END_REQUEST, request_id, &body, dst);
}

/// Writes UNKNOWN_TYPE for a record type this side does not understand.
pub fn encode_unknown_type(record_type: u8, dst: &mut impl BufMut) {
    let mut body = [0u8; 8];
    body[0] = record_type;
    encode(kind::UNKNOWN_TYPE, NULL_REQUEST_ID, &body, dst);
}

/// Checks that a fixed-size body has the length the specification gives it.
pub(crate) fn expect_len(record: &Record, expected: u16) -> Result<(), Error> {
    let len = record.content.len() as u16;
    if len != expected {
        return Err(Error::BadContentLength {
            record_type: record.record_type,
            len,
            expected,
        });
    }
    Ok(())
}

/// The body of a BEGIN_REQUEST: role and whether to keep the connection.
pub fn parse_begin_request(record: &Record) -> Result<(Role, bool), Error> {
    // typedef struct { roleB1, roleB0, flags, reserved[5] } FCGI_BeginRequestBody;
    expect_len(record, 8)?;
    let c = &record.content;
    Ok((
        Role::from_code(u16::from_be_bytes([c[0], c[1]])),
        c[2] & KEEP_CONN != 0,
    ))
}

/// The body of an END_REQUEST: app status and protocol status.
pub fn parse_end_request(record: &Record) -> Result<(u32, ProtocolStatus), Error> {
    // typedef struct { appStatusB3..B0, protocolStatus, reserved[3] } FCGI_EndRequestBody;
    expect_len(record, 8)?;
    let c = &record.content;
    Ok((
        u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
        ProtocolStatus::from_code(c[4]),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_padding_skipped() {
        let mut buf = BytesMut::new();
        encode(kind::STDOUT, 7, b"hello", &mut buf);
        assert_eq!(
            &buf[..],
            b"\x01\x06\x00\x07\x00\x05\x03\x00hello\x00\x00\x00"
        );
        buf.extend_from_slice(b"\x01\x05\x00\x01\x00\x00\x00\x00");
        let r = decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(
            (r.record_type, r.request_id, &r.content[..]),
            (kind::STDOUT, 7, &b"hello"[..])
        );
        let r = decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(
            (r.record_type, r.request_id, r.content.len()),
            (kind::STDIN, 1, 0)
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn need_more_bytes_is_none_not_error() {
        let mut buf = BytesMut::from(&b"\x01\x05\x00\x01\x00\x04\x04"[..]);
        assert_eq!(decode(&mut buf), Ok(None));
        buf.extend_from_slice(b"\x00abcd\x00\x00\x00");
        assert_eq!(decode(&mut buf), Ok(None), "padding not yet complete");
        buf.extend_from_slice(b"\x00");
        assert_eq!(
            decode(&mut buf).expect("valid").expect("complete").content,
            &b"abcd"[..]
        );
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut buf = BytesMut::from(&b"\x02\x05\x00\x01\x00\x00\x00\x00"[..]);
        assert_eq!(decode(&mut buf), Err(Error::UnsupportedVersion(2)));
    }

    #[test]
    fn truncated_at_eof() {
        let buf = BytesMut::from(&b"\x01\x05\x00"[..]);
        assert_eq!(check_eof(&buf), Err(Error::Truncated { buffered: 3 }));
        assert_eq!(check_eof(&BytesMut::new()), Ok(()));
    }

    #[test]
    fn begin_and_end_request_bodies() {
        let mut buf = BytesMut::new();
        encode_begin_request(1, Role::Responder, true, &mut buf);
        assert_eq!(
            &buf[..],
            b"\x01\x01\x00\x01\x00\x08\x00\x00\x00\x01\x01\x00\x00\x00\x00\x00"
        );
        let r = decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(parse_begin_request(&r), Ok((Role::Responder, true)));

        encode_end_request(1, 0x0102_0304, ProtocolStatus::Overloaded, &mut buf);
        assert_eq!(
            &buf[..],
            b"\x01\x03\x00\x01\x00\x08\x00\x00\x01\x02\x03\x04\x02\x00\x00\x00"
        );
        let r = decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(
            parse_end_request(&r),
            Ok((0x0102_0304, ProtocolStatus::Overloaded))
        );
    }

    #[test]
    fn short_begin_request_is_rejected() {
        let mut buf = BytesMut::from(&b"\x01\x01\x00\x01\x00\x02\x00\x00\x00\x01"[..]);
        let r = decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(
            parse_begin_request(&r),
            Err(Error::BadContentLength {
                record_type: 1,
                len: 2,
                expected: 8
            })
        );
    }

    #[test]
    fn unknown_type_body() {
        let mut buf = BytesMut::new();
        encode_unknown_type(42, &mut buf);
        assert_eq!(
            &buf[..],
            b"\x01\x0b\x00\x00\x00\x08\x00\x00\x2a\x00\x00\x00\x00\x00\x00\x00"
        );
    }

    #[test]
    fn streams_split_at_65528_and_stay_aligned() {
        let data = vec![7u8; MAX_ALIGNED_CONTENT_LEN + 3];
        let mut buf = BytesMut::new();
        encode_stream(kind::STDOUT, 1, &data, &mut buf);
        assert_eq!(buf.len(), stream_encoded_len(data.len()));
        assert_eq!(buf.len() % 8, 0);
        let a = decode(&mut buf).expect("valid").expect("complete");
        let b = decode(&mut buf).expect("valid").expect("complete");
        assert_eq!(
            (a.content.len(), b.content.len()),
            (MAX_ALIGNED_CONTENT_LEN, 3)
        );
        encode_stream(kind::STDOUT, 1, b"", &mut buf);
        assert!(
            buf.is_empty(),
            "an empty chunk must not end the stream by accident"
        );
    }

    #[test]
    fn max_content_and_padding_lengths() {
        let mut buf = BytesMut::new();
        Header {
            record_type: kind::STDIN,
            request_id: 65535,
            content_len: 65535,
            padding_len: 255,
        }
        .encode(&mut buf);
        buf.put_bytes(b'x', 65535 + 255);
        let r = decode(&mut buf).expect("valid").expect("complete");
        assert_eq!((r.request_id, r.content.len()), (65535, 65535));
        assert!(buf.is_empty());
    }
}
