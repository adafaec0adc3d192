//! What the application answers: an `http::Response` whose body is a buffer or a stream, and
//! how it becomes CGI output (`Status: NNN Reason` first, CRLF headers, exact Content-Length).

use std::fmt;
use std::io::{self, Write};

use bytes::{BufMut, Bytes, BytesMut};
use fcgi::record::MAX_ALIGNED_CONTENT_LEN;
use fcgi::response::ResponseWriter;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, StatusCode};
use tokio::sync::mpsc;

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

/// What the handler thread sends the connection's I/O task.
#[derive(Debug)]
pub(crate) enum Out {
    /// Encoded STDOUT records; more follow.
    Chunk(Bytes),
    /// The encoded tail of request `.0`: the last STDOUT records and the empty one. END_REQUEST
    /// is appended by the I/O task, so the whole tail goes out in one write.
    Last(u16, BytesMut),
}

/// Writes a streamed body. Bytes are gathered into full-size records and passed to the I/O
/// thread, which writes them while the application produces more.
pub struct BodyWriter {
    buf: BytesMut,
    fcgi: ResponseWriter,
    tx: mpsc::Sender<Out>,
}

/// Body bytes gathered before they are handed to the I/O thread: one full aligned record.
const FLUSH_AT: usize = MAX_ALIGNED_CONTENT_LEN;

impl BodyWriter {
    fn send_full(&mut self) -> io::Result<()> {
        let mut records = BytesMut::with_capacity(fcgi::record::stream_encoded_len(self.buf.len()));
        self.fcgi.stdout(&self.buf, &mut records);
        self.buf.clear();
        send_out(&self.tx, Out::Chunk(records.freeze()))
    }
}

impl Write for BodyWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = FLUSH_AT - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == FLUSH_AT {
            self.send_full()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.send_full()
    }
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

/// Encodes `res` for request `id`. A buffered response becomes one message, returned for the
/// caller to send; a stream is sent in chunks as it is written, and its tail is returned.
pub(crate) fn encode(id: u16, res: Response, tx: &mpsc::Sender<Out>) -> Out {
    let (parts, body) = res.into_parts();
    let fcgi = ResponseWriter::new(id);
    let mut head = BytesMut::with_capacity(256);
    match body {
        Body::Empty | Body::Full(_) => {
            let bytes = match body {
                Body::Full(b) => b,
                _ => Bytes::new(),
            };
            encode_head(&parts, Some(bytes.len()), &mut head);
            let mut out = BytesMut::with_capacity(
                fcgi::record::stream_encoded_len(head.len() + bytes.len()) + 32,
            );
            if head.len() + bytes.len() <= MAX_ALIGNED_CONTENT_LEN {
                // Headers and body in one record: the common case of a small response.
                head.extend_from_slice(&bytes);
                fcgi.stdout(&head, &mut out);
            } else {
                fcgi.stdout(&head, &mut out);
                fcgi.stdout(&bytes, &mut out);
            }
            fcgi.finish(&mut out);
            Out::Last(id, out)
        }
        Body::Stream(f) => {
            encode_head(&parts, None, &mut head);
            let mut w = BodyWriter {
                buf: head,
                fcgi,
                tx: tx.clone(),
            };
            // Even a failed stream ends its request cleanly: the client sees a short body.
            let _ = f(&mut w);
            let mut out =
                BytesMut::with_capacity(fcgi::record::stream_encoded_len(w.buf.len()) + 32);
            fcgi.stdout(&w.buf, &mut out);
            fcgi.finish(&mut out);
            Out::Last(id, out)
        }
    }
}

/// Passes output to the I/O task, waiting while its channel is full; the I/O thread running
/// this request hands the event loop over first (see `inline.rs`).
pub(crate) fn send_out(tx: &mpsc::Sender<Out>, out: Out) -> io::Result<()> {
    match tx.try_send(out) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(closed()),
        Err(mpsc::error::TrySendError::Full(out)) => {
            crate::worker::inline::will_block();
            tx.blocking_send(out).map_err(|_| closed())
        }
    }
}

/// Passes output to the I/O task from inside the runtime, where nothing may block: if the
/// channel is full, a task sends it once there is room.
pub(crate) fn send_in_runtime(tx: &mpsc::Sender<Out>, out: Out) {
    if let Err(mpsc::error::TrySendError::Full(out)) = tx.try_send(out) {
        let tx = tx.clone();
        tokio::spawn(async move {
            let _ = tx.send(out).await;
        });
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "client connection closed")
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
