//! One connection to a foreign program, read record by record: the CGI header block first,
//! then the body, relayed; the program's stderr becomes log lines.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;

use bytes::{Bytes, BytesMut};
use fcgi::client::{decode_event, ClientEvent};
use fcgi::record::ProtocolStatus;

use super::cgi;
use crate::app::body::BodyWriter;
use crate::{Body, Response};

/// The longest CGI header block accepted from the program: nginx's own limit is its
/// `fastcgi_buffer_size` (4 or 8 KiB), so anything longer would fail there anyway.
const HEAD_MAX: usize = 64 * 1024;
/// Bytes read from the child per `read`: four full records.
const READ_CHUNK: usize = 4 * 16 * 1024;
/// Why a request got no answer from the program.
pub(super) struct Failure {
    /// The program sent part of an answer: the request ran, so it is not sent again.
    pub(super) answered: bool,
    /// The program turned the request down (END_REQUEST `FCGI_OVERLOADED`, ...): it is alive.
    pub(super) refused: Option<ProtocolStatus>,
    pub(super) why: String,
}

/// The CGI header block and what followed it.
pub(super) struct Head {
    head: BytesMut,
    rest: BytesMut,
    /// The request ended with these bytes (END_REQUEST has arrived).
    ended: bool,
}

/// What the program sends, with its stderr logged.
enum Piece {
    Stdout(Bytes),
    End,
    /// END_REQUEST with a protocol status other than complete: the program turned it down.
    Refused(ProtocolStatus),
}

/// One connection to the child, read record by record.
pub(super) struct Upstream {
    pub(super) conn: UnixStream,
    buf: BytesMut,
    uri: String,
}

impl Upstream {
    pub(super) fn new(conn: UnixStream, uri: &str) -> Upstream {
        Upstream {
            conn,
            buf: BytesMut::new(),
            uri: uri.to_string(),
        }
    }

    /// The next piece of the answer already read, without waiting for more.
    fn buffered_piece(&mut self) -> io::Result<Option<Piece>> {
        loop {
            let event = decode_event(&mut self.buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            match event {
                None => return Ok(None),
                Some(ClientEvent::Stdout { data, .. }) if !data.is_empty() => {
                    return Ok(Some(Piece::Stdout(data)))
                }
                Some(ClientEvent::End {
                    protocol_status, ..
                }) => {
                    if protocol_status != ProtocolStatus::RequestComplete {
                        return Ok(Some(Piece::Refused(protocol_status)));
                    }
                    return Ok(Some(Piece::End));
                }
                Some(ClientEvent::Stderr { data, .. }) => self.log_stderr(&data),
                // The end of stdout (END_REQUEST follows), or management answers.
                Some(_) => {}
            }
        }
    }

    /// The next piece of the answer; `None` when the program closed the connection first.
    fn next_piece(&mut self) -> io::Result<Option<Piece>> {
        loop {
            if let Some(piece) = self.buffered_piece()? {
                return Ok(Some(piece));
            }
            let len = self.buf.len();
            self.buf.resize(len + READ_CHUNK, 0);
            let read = self.conn.read(&mut self.buf[len..]);
            self.buf.truncate(len + *read.as_ref().unwrap_or(&0));
            if read? == 0 {
                return Ok(None);
            }
        }
    }

    fn log_stderr(&self, data: &[u8]) {
        for line in String::from_utf8_lossy(data).lines() {
            if !line.trim().is_empty() {
                tracing::warn!(
                    pid = std::process::id(),
                    uri = self.uri,
                    line,
                    "program stderr"
                );
            }
        }
    }

    /// Reads until the CGI header block is complete.
    pub(super) fn read_head(&mut self) -> Result<Head, Failure> {
        let mut head = BytesMut::new();
        let mut answered = false;
        loop {
            let fail = |answered, why: String| Failure {
                answered,
                refused: None,
                why,
            };
            match self.next_piece() {
                Ok(Some(Piece::Stdout(data))) => {
                    answered = true;
                    head.extend_from_slice(&data);
                    if let Some(end) = cgi::head_end(&head) {
                        let rest = head.split_off(end);
                        return Ok(Head {
                            head,
                            rest,
                            ended: false,
                        });
                    }
                    if head.len() > HEAD_MAX {
                        return Err(fail(
                            true,
                            format!("its CGI header block is over {HEAD_MAX} bytes"),
                        ));
                    }
                }
                Ok(Some(Piece::End)) if head.is_empty() => {
                    return Err(fail(true, "it ended the request without output".into()))
                }
                // No blank line before the end: all of it is the header block.
                Ok(Some(Piece::End)) => {
                    return Ok(Head {
                        head,
                        rest: BytesMut::new(),
                        ended: true,
                    })
                }
                Ok(Some(Piece::Refused(protocol_status))) => {
                    return Err(Failure {
                        answered: true,
                        refused: Some(protocol_status),
                        why: format!("it refused the request ({protocol_status:?})"),
                    })
                }
                Ok(None) => return Err(fail(answered, "it closed the connection".into())),
                Err(e) => return Err(fail(answered, e.to_string())),
            }
        }
    }

    /// The response: in one piece when the whole answer has already arrived, with the
    /// connection, free for another request; else streamed.
    pub(super) fn into_response(
        mut self,
        mut head: Head,
        head_only: bool,
    ) -> (Response, Option<UnixStream>) {
        let (parts, skipped) = cgi::parse_head(&head.head);
        if !skipped.is_empty() {
            tracing::warn!(pid = std::process::id(), uri = self.uri, lines = ?skipped, "program sent header lines that are not valid HTTP; dropped them");
        }
        while !head.ended {
            match self.buffered_piece() {
                Ok(Some(Piece::Stdout(data))) => head.rest.extend_from_slice(&data),
                Ok(Some(Piece::End)) => head.ended = true,
                Ok(Some(Piece::Refused(_)) | None) | Err(_) => break,
            }
        }
        // A HEAD answer's Content-Length is the program's to give, not the empty body's.
        if head.ended && !head_only {
            let done = self.buf.is_empty().then_some(self.conn);
            return (
                http::Response::from_parts(parts, Body::Full(head.rest.freeze())),
                done,
            );
        }
        let rest = head.rest;
        let body = Body::stream(move |w: &mut BodyWriter| {
            w.write_all(&rest)?;
            if head.ended {
                return Ok(());
            }
            self.relay(w)
        });
        (http::Response::from_parts(parts, body), None)
    }

    /// Relays the rest of stdout to `w`.
    fn relay(&mut self, w: &mut BodyWriter) -> io::Result<()> {
        loop {
            let cut = match self.next_piece() {
                Ok(Some(Piece::Stdout(data))) => {
                    w.write_all(&data)?;
                    continue;
                }
                Ok(Some(Piece::End)) => return Ok(()),
                Ok(Some(Piece::Refused(refusal))) => {
                    io::Error::other(format!("it ended the request with {refusal:?}"))
                }
                Ok(None) => {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "it closed the connection")
                }
                Err(e) => e,
            };
            tracing::error!(pid = std::process::id(), uri = self.uri, error = %cut, "program stopped mid-response; the body is cut short");
            return Err(cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fcgi::record::{self, kind};
    use http::StatusCode;

    use crate::foreign::REQUEST_ID;

    /// An upstream reading what `records` holds, the program's side closed after them.
    fn upstream_of(records: &[u8]) -> Upstream {
        let (ours, mut theirs) = UnixStream::pair().expect("a socket pair");
        theirs.write_all(records).expect("buffered");
        drop(theirs);
        Upstream::new(ours, "/test")
    }

    fn stdout_records(chunks: &[&[u8]], end: ProtocolStatus) -> BytesMut {
        let mut dst = BytesMut::new();
        for chunk in chunks {
            record::encode_stream(kind::STDOUT, REQUEST_ID, chunk, &mut dst);
        }
        record::encode_end_of_stream(kind::STDOUT, REQUEST_ID, &mut dst);
        record::encode_end_request(REQUEST_ID, 0, end, &mut dst);
        dst
    }

    #[test]
    fn a_head_split_across_records_is_found_and_the_rest_is_the_body() {
        let records = stdout_records(
            &[b"Status: 201 Created\r\nX-A: 1\r", b"\n\r\nbo", b"dy"],
            ProtocolStatus::RequestComplete,
        );
        let mut up = upstream_of(&records);
        let head = up.read_head().ok().expect("a head");
        assert_eq!(&head.head[..], b"Status: 201 Created\r\nX-A: 1\r\n\r\n");
        let (res, done) = up.into_response(head, false);
        assert!(done.is_some(), "the connection is free for another request");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(res.headers()["x-a"], "1");
        match res.body() {
            Body::Full(b) => assert_eq!(&b[..], b"body"),
            other => panic!("the whole answer had arrived: {other:?}"),
        }
    }

    #[test]
    fn silence_then_close_may_be_resent_but_a_refusal_or_a_partial_answer_may_not() {
        let Err(f) = upstream_of(b"").read_head() else {
            panic!("no answer")
        };
        assert!(!f.answered && f.refused.is_none(), "{}", f.why);

        let refused = stdout_records(&[], ProtocolStatus::Overloaded);
        let Err(f) = upstream_of(&refused).read_head() else {
            panic!("refused")
        };
        assert_eq!(f.refused, Some(ProtocolStatus::Overloaded));

        let mut partial = BytesMut::new();
        record::encode_stream(kind::STDOUT, REQUEST_ID, b"Content-Type: te", &mut partial);
        let Err(f) = upstream_of(&partial).read_head() else {
            panic!("cut off")
        };
        assert!(f.answered, "part of a head was sent: the request ran");
    }
}
