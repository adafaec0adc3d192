//! What the application answers: an `http::Response` whose body is a buffer or a stream, and
//! its CGI header block (`Status: NNN Reason` first, CRLF headers, exact Content-Length). The
//! worker turns the rest into records (`worker/output.rs`).

use std::fmt;
use std::io;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};

use crate::app::body::BodyWriter;

/// The application's answer.
pub type Response = http::Response<Body>;

/// A function that writes a streamed body.
pub type StreamFn = Box<dyn FnOnce(&mut BodyWriter) -> io::Result<()> + Send>;

/// A response body: nothing, bytes in memory, or a stream written as it is produced.
pub enum Body {
    /// No body.
    Empty,
    /// A body in memory; its Content-Length is set exactly.
    Full(Bytes),
    /// A body written incrementally: sent as it is produced, with bounded memory.
    Stream(StreamFn),
}

impl Body {
    /// A streamed body: `f` writes it to the [`BodyWriter`], which blocks while the client is
    /// slower than the application.
    pub fn stream(f: impl FnOnce(&mut BodyWriter) -> io::Result<()> + Send + 'static) -> Body {
        Body::Stream(Box::new(f))
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Empty => f.write_str("Body::Empty"),
            Body::Full(b) => write!(f, "Body::Full({} bytes)", b.len()),
            Body::Stream(_) => f.write_str("Body::Stream"),
        }
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Body {
        Body::Full(Bytes::from_static(s.as_bytes()))
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::Full(Bytes::from(s))
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        Body::Full(Bytes::from(v))
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body::Full(b)
    }
}

/// A `200 OK` response with `Content-Type: text/plain; charset=utf-8`.
pub fn text(body: impl Into<Body>) -> Response {
    with_type("text/plain; charset=utf-8", body)
}

/// A `200 OK` response with the given content type.
pub fn with_type(content_type: &'static str, body: impl Into<Body>) -> Response {
    let mut res = http::Response::new(body.into());
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// A plain-text response with `status` and its reason phrase as the body.
pub fn status(status: StatusCode) -> Response {
    let reason = status.canonical_reason().unwrap_or("Unknown");
    let mut res = text(format!("{} {reason}\n", status.as_u16()));
    *res.status_mut() = status;
    res
}

/// Writes the CGI header block of `res` into `dst`: status line first, CRLF line ends.
pub(crate) fn encode_head(
    parts: &http::response::Parts,
    body_len: Option<usize>,
    dst: &mut BytesMut,
) {
    let status = parts.status;
    dst.put_slice(b"Status: ");
    dst.put_slice(status.as_str().as_bytes());
    dst.put_u8(b' ');
    dst.put_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    dst.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // A buffered body's length is known exactly; the application's guess is dropped.
        if body_len.is_some() && name == CONTENT_LENGTH {
            continue;
        }
        dst.put_slice(name.as_str().as_bytes());
        dst.put_slice(b": ");
        dst.put_slice(value.as_bytes());
        dst.put_slice(b"\r\n");
    }
    if let Some(len) = body_len {
        dst.put_slice(b"Content-Length: ");
        dst.put_slice(len.to_string().as_bytes());
        dst.put_slice(b"\r\n");
    }
    dst.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_has_status_first_and_exact_length() {
        let mut res = text("hi");
        res.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("99"));
        let (parts, _) = res.into_parts();
        let mut dst = BytesMut::new();
        encode_head(&parts, Some(2), &mut dst);
        assert_eq!(
            &dst[..],
            b"Status: 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\n"
        );
    }

    #[test]
    fn stream_head_has_no_length() {
        let mut res = http::Response::new(Body::Empty);
        *res.status_mut() = StatusCode::FOUND;
        res.headers_mut()
            .insert(http::header::LOCATION, HeaderValue::from_static("/x"));
        let (parts, _) = res.into_parts();
        let mut dst = BytesMut::new();
        encode_head(&parts, None, &mut dst);
        assert_eq!(&dst[..], b"Status: 302 Found\r\nlocation: /x\r\n\r\n");
    }
}
