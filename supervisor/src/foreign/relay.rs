//! One attempt at a request on a connection to the program, on the worker's event loop: the
//! request's records are written, the body (if it did not fit in them) streams alongside, and
//! the answer's records come back re-labelled with nginx's request id. The program's CGI
//! header block is held until it is complete (so a program that dies before it can still be
//! answered cleanly, or sent the request again), then everything goes to nginx as it
//! arrives; the program's stderr becomes log lines.

use std::future::poll_fn;
use std::pin::Pin;

use bytes::BytesMut;
use fcgi::client::{decode_event, ClientEvent};
use fcgi::record::{self, kind, ProtocolStatus};
use fcgi::response::ResponseWriter;
use fcgi::Role;
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::{cgi, REQUEST_ID};
use crate::app::body::Out;
use crate::worker::Progress;
use crate::RequestBody;

/// The longest CGI header block accepted from the program: nginx's own limit is its
/// `fastcgi_buffer_size` (4 or 8 KiB), so anything longer would fail there anyway.
const HEAD_MAX: usize = 64 * 1024;
/// Bytes read from the program at a time: four full records.
const READ_CHUNK: usize = 4 * 16 * 1024;

/// Why an attempt got no whole answer from the program.
#[derive(Debug)]
pub(super) struct Failure {
    /// The program sent part of an answer (or nginx has part of it): the request ran, so it
    /// is not sent again.
    pub(super) answered: bool,
    /// The program turned the request down (END_REQUEST `FCGI_OVERLOADED`, ...): it is alive.
    pub(super) refused: Option<ProtocolStatus>,
    pub(super) why: String,
}

impl Failure {
    fn new(answered: bool, why: impl Into<String>) -> Failure {
        Failure {
            answered,
            refused: None,
            why: why.into(),
        }
    }
}

/// How an attempt ended well.
pub(super) enum Done {
    /// The whole answer went to nginx; the connection is free for another request when the
    /// program left nothing unread on it.
    Answered(Option<UnixStream>),
    /// nginx went away (the client left) before the answer was through: the connection is
    /// dropped, which the program sees as the end of the request.
    ClientGone,
}

/// Sends the request (`records`, and then `body` when it did not fit in them) on `conn` and
/// relays the answer to `out` as request `id`.
pub(super) async fn attempt(
    mut conn: UnixStream,
    records: &[u8],
    body: Option<RequestBody>,
    role: Role,
    to: &Nginx<'_>,
    progress: &mut Progress,
) -> Result<Done, Failure> {
    conn.write_all(records)
        .await
        .map_err(|e| Failure::new(false, format!("cannot send the request: {e}")))?;
    let mut buf = BytesMut::new();
    // Whether every record of the request went out: only then did the program see all of it.
    let (delivered, all_sent) = match body {
        None => (relay(&mut conn, &mut buf, to, progress).await?, true),
        // A program may answer before it has read all its input: the body is written
        // alongside the reading, never before it, or both sides could wait on full buffers.
        Some(body) => {
            let (mut rd, mut wr) = conn.split();
            let pump = pump(&mut wr, body, role);
            let answer = relay(&mut rd, &mut buf, to, progress);
            tokio::pin!(pump, answer);
            let mut pumped = None;
            loop {
                tokio::select! {
                    done = &mut answer => break (done?, pumped == Some(true)),
                    sent = &mut pump, if pumped.is_none() => {
                        if sent.as_ref().is_err_and(|e| e.client_gone) {
                            return Ok(Done::ClientGone);
                        }
                        pumped = Some(sent.is_ok());
                    }
                }
            }
        }
    };
    Ok(match delivered {
        true => Done::Answered((buf.is_empty() && all_sent).then_some(conn)),
        false => Done::ClientGone,
    })
}

/// Where the answer goes: nginx's connection, as request `id`.
pub(super) struct Nginx<'a> {
    pub(super) id: u16,
    pub(super) out: &'a mpsc::Sender<Out>,
    /// The request, for log lines.
    pub(super) uri: &'a str,
}

/// Why the body could not be streamed.
struct PumpError {
    /// The client's body ended before its length (the client left).
    client_gone: bool,
}

/// Streams `body` as STDIN records, then the ends of the input streams.
async fn pump<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut body: RequestBody,
    role: Role,
) -> Result<(), PumpError> {
    let mut records = BytesMut::new();
    loop {
        let frame = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        records.clear();
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    record::encode_stream(kind::STDIN, REQUEST_ID, &data, &mut records);
                }
            }
            Some(Err(_)) => return Err(PumpError { client_gone: true }),
            None => break,
        }
        // The program stopped reading (it answered, or died): the rest is not needed.
        wr.write_all(&records)
            .await
            .map_err(|_| PumpError { client_gone: false })?;
    }
    records.clear();
    end_streams(role, &mut records);
    wr.write_all(&records)
        .await
        .map_err(|_| PumpError { client_gone: false })
}

/// The empty records that end the input streams: STDIN, and DATA for a filter.
pub(super) fn end_streams(role: Role, dst: &mut BytesMut) {
    record::encode_end_of_stream(kind::STDIN, REQUEST_ID, dst);
    if role == Role::Filter {
        record::encode_end_of_stream(kind::DATA, REQUEST_ID, dst);
    }
}

/// Relays the answer read from `rd` to nginx: true when it went through whole (what is left
/// in `buf` was read past its end), false when nginx went away first.
async fn relay<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    to: &Nginx<'_>,
    progress: &mut Progress,
) -> Result<bool, Failure> {
    let fcgi = ResponseWriter::new(to.id);
    // The header block, until its blank line arrives; then records go out as they come.
    let mut head = Vec::new();
    let mut batch = BytesMut::new();
    loop {
        loop {
            let event = decode_event(buf).map_err(|e| {
                Failure::new(
                    progress.head_sent || !head.is_empty(),
                    format!("it broke the protocol: {e}"),
                )
            })?;
            match event {
                None => break,
                Some(ClientEvent::Stdout { data, .. }) if progress.head_sent => {
                    fcgi.stdout(&data, &mut batch);
                }
                Some(ClientEvent::Stdout { data, .. }) => {
                    head.extend_from_slice(&data);
                    if let Some(end) = cgi::head_end(&head) {
                        progress.status = cgi::status_of(&head[..end]);
                        progress.head_sent = true;
                        fcgi.stdout(&head, &mut batch);
                    } else if head.len() > HEAD_MAX {
                        return Err(Failure::new(
                            true,
                            format!("its CGI header block is over {HEAD_MAX} bytes"),
                        ));
                    }
                }
                Some(ClientEvent::Stderr { data, .. }) => log_stderr(&data, to.uri),
                Some(ClientEvent::End {
                    protocol_status, ..
                }) => {
                    if protocol_status != ProtocolStatus::RequestComplete && !progress.head_sent {
                        return Err(Failure {
                            answered: true,
                            refused: Some(protocol_status),
                            why: format!("it refused the request ({protocol_status:?})"),
                        });
                    }
                    if !progress.head_sent {
                        if head.is_empty() {
                            return Err(Failure::new(true, "it ended the request without output"));
                        }
                        // Nothing but header lines: all of it is the header block.
                        cgi::complete(&mut head);
                        progress.status = cgi::status_of(&head);
                        progress.head_sent = true;
                        fcgi.stdout(&head, &mut batch);
                    }
                    fcgi.finish(&mut batch);
                    progress.ended = true;
                    return Ok(to.out.send(Out::Last(to.id, batch)).await.is_ok());
                }
                Some(_) => {}
            }
        }
        if !batch.is_empty()
            && to
                .out
                .send(Out::Chunk(batch.split().freeze()))
                .await
                .is_err()
        {
            return Ok(false);
        }
        buf.reserve(READ_CHUNK);
        let read = rd.read_buf(buf).await;
        let answered = progress.head_sent || !head.is_empty();
        match read {
            Ok(0) => return Err(Failure::new(answered, "it closed the connection")),
            Ok(_) => {}
            Err(e) => {
                return Err(Failure::new(
                    answered,
                    format!("cannot read its answer: {e}"),
                ))
            }
        }
    }
}

fn log_stderr(data: &[u8], uri: &str) {
    for line in String::from_utf8_lossy(data).lines() {
        if !line.trim().is_empty() {
            tracing::warn!(pid = std::process::id(), uri, line, "program stderr");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fcgi::client::{read_response, Response as Answer};

    fn stdout_records(chunks: &[&[u8]], end: ProtocolStatus) -> BytesMut {
        let mut dst = BytesMut::new();
        for chunk in chunks {
            record::encode_stream(kind::STDOUT, REQUEST_ID, chunk, &mut dst);
        }
        record::encode_stream(kind::STDERR, REQUEST_ID, b"a warning\n", &mut dst);
        record::encode_end_of_stream(kind::STDOUT, REQUEST_ID, &mut dst);
        record::encode_end_request(REQUEST_ID, 0, end, &mut dst);
        dst
    }

    /// Relays what `records` holds (the program's side closed after them) as request 7, and
    /// decodes what nginx would get.
    async fn relayed(records: &[u8]) -> (Result<bool, Failure>, Progress, Answer) {
        let (tx, mut rx) = mpsc::channel(64);
        let mut progress = Progress::default();
        let to = Nginx {
            id: 7,
            out: &tx,
            uri: "/test",
        };
        let mut src = records;
        let mut buf = BytesMut::new();
        let done = relay(&mut src, &mut buf, &to, &mut progress).await;
        drop(tx);
        let mut wire = BytesMut::new();
        while let Some(out) = rx.recv().await {
            match out {
                Out::Chunk(b) => wire.extend_from_slice(&b),
                Out::Last(id, b) => {
                    assert_eq!(id, 7);
                    wire.extend_from_slice(&b);
                }
            }
        }
        record::encode_end_request(7, 0, ProtocolStatus::RequestComplete, &mut wire);
        let mut answer = Answer::default();
        if !wire.is_empty() && progress.ended {
            assert!(read_response(&mut wire, 7, &mut answer).expect("well-formed"));
        }
        (done, progress, answer)
    }

    #[tokio::test]
    async fn a_head_split_across_records_goes_out_whole_with_the_body_as_request_7() {
        let records = stdout_records(
            &[b"Status: 201 Created\r\nX-A: 1\r", b"\n\r\nbo", b"dy"],
            ProtocolStatus::RequestComplete,
        );
        let (done, progress, answer) = relayed(&records).await;
        assert!(matches!(done, Ok(true)), "{done:?}");
        assert!(progress.head_sent && progress.ended);
        assert_eq!(progress.status, 201);
        assert_eq!(answer.status(), 201);
        assert_eq!(answer.header("x-a").as_deref(), Some("1"));
        assert_eq!(answer.body(), b"body");
    }

    #[tokio::test]
    async fn header_lines_without_a_blank_line_are_a_whole_head() {
        let records = stdout_records(
            &[b"Status: 204 No Content"],
            ProtocolStatus::RequestComplete,
        );
        let (done, progress, answer) = relayed(&records).await;
        assert!(matches!(done, Ok(true)), "{done:?}");
        assert_eq!((progress.status, answer.status()), (204, 204));
        assert!(answer.body().is_empty());
    }

    #[tokio::test]
    async fn silence_then_close_may_be_resent_but_a_refusal_or_a_partial_head_may_not() {
        let (done, progress, _) = relayed(b"").await;
        let f = done.expect_err("no answer");
        assert!(!f.answered && f.refused.is_none(), "{}", f.why);
        assert!(!progress.head_sent);

        let refused = stdout_records(&[], ProtocolStatus::Overloaded);
        let f = relayed(&refused).await.0.expect_err("refused");
        assert_eq!(f.refused, Some(ProtocolStatus::Overloaded));

        let mut partial = BytesMut::new();
        record::encode_stream(kind::STDOUT, REQUEST_ID, b"Content-Type: te", &mut partial);
        let (done, progress, _) = relayed(&partial).await;
        let f = done.expect_err("cut off");
        assert!(f.answered, "part of a head was sent: the request ran");
        assert!(
            !progress.head_sent,
            "nothing reached nginx: it can still get a 502"
        );
    }

    #[tokio::test]
    async fn a_program_that_dies_after_its_head_leaves_a_response_to_cut_short() {
        let mut records = BytesMut::new();
        record::encode_stream(kind::STDOUT, REQUEST_ID, b"X-A: 1\n\npart", &mut records);
        let (done, progress, _) = relayed(&records).await;
        let f = done.expect_err("closed mid-body");
        assert!(f.answered && progress.head_sent && !progress.ended);
    }
}
