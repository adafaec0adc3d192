//! A response becomes FastCGI records: a buffered one in one message, a streamed one in chunks
//! as the application writes it (through [`BodyWriter`]), each ending in a tail that the
//! connection completes with END_REQUEST and writes at once.

use bytes::{Bytes, BytesMut};
use fcgi::record::{stream_encoded_len, MAX_ALIGNED_CONTENT_LEN};
use fcgi::response::ResponseWriter;
use tokio::sync::mpsc;

use crate::app::body::{BodyWriter, Out};
use crate::app::response::{encode_head, Body, Response};

/// Room reserved for a CGI header block: a status line and a few headers fit, so the common
/// response encodes its head without growing the buffer.
const HEAD_CAPACITY: usize = 256;

/// Room reserved past the STDOUT records of a tail for the empty STDOUT record (8 bytes) and
/// the END_REQUEST record (16) the connection appends, so neither grows the buffer.
pub(crate) const TAIL_RECORDS_LEN: usize = 32;

/// The tail that ends request `id`'s response with what was already sent of it: its head
/// is out, the rest of its body never will be.
pub(crate) fn cut_short(id: u16) -> Out {
    let mut tail = BytesMut::with_capacity(TAIL_RECORDS_LEN);
    ResponseWriter::new(id).finish(&mut tail);
    Out::Last(id, tail)
}

/// Encodes `res` for request `id`. A buffered response becomes one message, returned for the
/// caller to send; a stream is sent in chunks on `tx` as it is written, and its tail returned.
pub(crate) fn encode(id: u16, res: Response, tx: &mpsc::Sender<Out>) -> Out {
    let (parts, body) = res.into_parts();
    let fcgi = ResponseWriter::new(id);
    let mut head = BytesMut::with_capacity(HEAD_CAPACITY);
    let mut last = match body {
        Body::Empty | Body::Full(_) => {
            let bytes = match body {
                Body::Full(b) => b,
                _ => Bytes::new(),
            };
            encode_head(&parts, Some(bytes.len()), &mut head);
            let mut out = BytesMut::with_capacity(
                stream_encoded_len(head.len() + bytes.len()) + TAIL_RECORDS_LEN,
            );
            if head.len() + bytes.len() <= MAX_ALIGNED_CONTENT_LEN {
                // Headers and body in one record: the common case of a small response.
                head.extend_from_slice(&bytes);
                fcgi.stdout(&head, &mut out);
            } else {
                fcgi.stdout(&head, &mut out);
                fcgi.stdout(&bytes, &mut out);
            }
            out
        }
        Body::Stream(f) => {
            encode_head(&parts, None, &mut head);
            let mut w = BodyWriter::new(id, head, tx.clone());
            // Even a failed stream ends its request cleanly: the client sees a short body.
            let _ = f(&mut w);
            let rest = w.into_unsent();
            let mut out =
                BytesMut::with_capacity(stream_encoded_len(rest.len()) + TAIL_RECORDS_LEN);
            fcgi.stdout(&rest, &mut out);
            out
        }
    };
    fcgi.finish(&mut last);
    Out::Last(id, last)
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

#[cfg(test)]
mod tests {
    use super::*;
    use fcgi::client::{read_response, Response as Answer};
    use std::io::Write;

    /// Every message `encode` produced for request 1, decoded as a client would.
    fn answer(res: Response) -> (Answer, usize) {
        let (tx, mut rx) = mpsc::channel(64);
        let last = encode(1, res, &tx);
        let mut wire = BytesMut::new();
        let mut chunks = 0;
        while let Ok(Out::Chunk(records)) = rx.try_recv() {
            wire.extend_from_slice(&records);
            chunks += 1;
        }
        let Out::Last(1, tail) = last else {
            panic!("the tail of request 1 comes last");
        };
        wire.extend_from_slice(&tail);
        fcgi::record::encode_end_request(1, 0, fcgi::ProtocolStatus::RequestComplete, &mut wire);
        let mut answer = Answer::default();
        assert!(read_response(&mut wire, 1, &mut answer).expect("well-formed"));
        (answer, chunks)
    }

    #[test]
    fn a_stream_with_70000_bytes_of_headers_is_sent_whole() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = body.clone();
        let mut res = http::Response::new(Body::stream(move |w| w.write_all(&body)));
        let value = "v".repeat(999);
        for i in 0..70 {
            res.headers_mut().insert(
                http::HeaderName::from_bytes(format!("x-long-{i}").as_bytes()).expect("name"),
                http::HeaderValue::from_str(&value).expect("value"),
            );
        }
        let (answer, chunks) = answer(res);
        assert_eq!(answer.status(), 200);
        assert_eq!(answer.header("x-long-69").as_deref(), Some(value.as_str()));
        assert_eq!(answer.body(), &expected[..]);
        assert!(
            chunks >= 3,
            "sent as it was written, not buffered whole: {chunks} chunks"
        );
    }

    #[test]
    fn a_full_body_gets_an_exact_length() {
        let (answer, chunks) = answer(crate::app::response::text("hello"));
        assert_eq!(chunks, 0, "one message");
        assert_eq!(answer.header("content-length").as_deref(), Some("5"));
        assert_eq!(answer.body(), b"hello");
    }
}
