//! The body streams between the application and the worker's I/O thread: [`BodyReader`] for the
//! request body, [`BodyWriter`] for a streamed response, and [`Out`], what a response sends the
//! connection. Both streams block the application's thread when they must wait; just before
//! they do, they call the hook the worker installed (see [`set_before_block`]), so that nothing
//! here knows which thread drives the event loop.

use std::io::{self, Read, Write};
use std::sync::OnceLock;

use bytes::{Buf, Bytes, BytesMut};
use fcgi::record::MAX_ALIGNED_CONTENT_LEN;
use fcgi::response::ResponseWriter;
use tokio::sync::mpsc;

/// What the worker runs before a body stream blocks on its I/O thread.
static BEFORE_BLOCK: OnceLock<fn()> = OnceLock::new();

/// Installs `hook`, called by the body streams right before they block waiting for the event
/// loop. The worker's inline runner installs one: if the thread about to block is the one that
/// drives the loop, another thread must take over first, or the wait would never end. The first
/// hook installed stays.
pub(crate) fn set_before_block(hook: fn()) {
    let _ = BEFORE_BLOCK.set(hook);
}

fn before_block() {
    if let Some(hook) = BEFORE_BLOCK.get() {
        hook();
    }
}

/// A stream of body bytes arriving from the worker's I/O thread; `read` blocks until bytes
/// arrive. Reading stops the flow nowhere else: the I/O thread stops reading the socket when
/// this reader falls behind, so memory stays bounded.
#[derive(Debug)]
pub struct BodyReader {
    rx: Option<mpsc::Receiver<Bytes>>,
    chunk: Bytes,
}

impl BodyReader {
    pub(crate) fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        BodyReader {
            rx: Some(rx),
            chunk: Bytes::new(),
        }
    }

    pub(crate) fn empty() -> Self {
        BodyReader {
            rx: None,
            chunk: Bytes::new(),
        }
    }

    /// A reader over bytes already in memory (for tests of responders).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Self {
        BodyReader {
            rx: None,
            chunk: bytes.into(),
        }
    }

    /// The channel and the bytes already taken from it, for the async body (`app/http.rs`).
    pub(crate) fn into_parts(self) -> (Option<mpsc::Receiver<Bytes>>, Bytes) {
        (self.rx, self.chunk)
    }

    /// The next chunk as it arrived, without copying; `None` at the end of the body.
    pub fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.chunk.is_empty() {
            return Some(std::mem::take(&mut self.chunk));
        }
        recv(self.rx.as_mut()?)
    }
}

/// The next chunk, waiting for it if it has not arrived.
fn recv(rx: &mut mpsc::Receiver<Bytes>) -> Option<Bytes> {
    match rx.try_recv() {
        Ok(chunk) => Some(chunk),
        Err(mpsc::error::TryRecvError::Disconnected) => None,
        Err(mpsc::error::TryRecvError::Empty) => {
            before_block();
            rx.blocking_recv()
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.as_mut().and_then(recv) {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

/// What a request's response sends the connection's I/O task.
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
    /// A writer for request `id` whose first bytes, `head` (the CGI header block), are sent
    /// with the first body bytes.
    pub(crate) fn new(id: u16, head: BytesMut, tx: mpsc::Sender<Out>) -> BodyWriter {
        BodyWriter {
            buf: head,
            fcgi: ResponseWriter::new(id),
            tx,
        }
    }

    /// What is gathered and not yet sent, for the response's tail.
    pub(crate) fn into_unsent(self) -> BytesMut {
        self.buf
    }

    fn send_full(&mut self) -> io::Result<()> {
        let mut records = BytesMut::with_capacity(fcgi::record::stream_encoded_len(self.buf.len()));
        self.fcgi.stdout(&self.buf, &mut records);
        self.buf.clear();
        send_out(&self.tx, Out::Chunk(records.freeze()))
    }
}

impl Write for BodyWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A head larger than a record (long headers) is sent on its own first: what is
        // gathered never outgrows one record plus the head, and every write makes progress.
        if self.buf.len() >= FLUSH_AT {
            self.send_full()?;
        }
        let n = data.len().min(FLUSH_AT - self.buf.len());
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

/// Passes output to the I/O task, waiting while its channel is full.
pub(crate) fn send_out(tx: &mpsc::Sender<Out>, out: Out) -> io::Result<()> {
    match tx.try_send(out) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(closed()),
        Err(mpsc::error::TrySendError::Full(out)) => {
            before_block();
            tx.blocking_send(out).map_err(|_| closed())
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "client connection closed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use fcgi::client::{decode_event, ClientEvent};
    use fcgi::record::stream_encoded_len;

    /// The STDOUT bytes in `records`.
    fn stdout_of(records: &[u8]) -> Vec<u8> {
        let mut src = BytesMut::from(records);
        let mut out = Vec::new();
        while let Some(event) = decode_event(&mut src).expect("well-formed records") {
            if let ClientEvent::Stdout { data, .. } = event {
                out.extend_from_slice(&data);
            }
        }
        assert!(src.is_empty(), "no record cut off");
        out
    }

    #[test]
    fn a_head_longer_than_a_record_goes_first_and_the_stream_stays_bounded() {
        let head = vec![b'h'; 70_000];
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (tx, mut rx) = mpsc::channel(64);
        let mut w = BodyWriter::new(1, BytesMut::from(&head[..]), tx);
        w.write_all(&body[..10]).expect("the channel is open");
        w.write_all(&body[10..]).expect("the channel is open");
        w.flush().expect("the channel is open");
        assert!(w.into_unsent().is_empty(), "flushed");

        let mut chunks = Vec::new();
        while let Ok(out) = rx.try_recv() {
            match out {
                Out::Chunk(records) => chunks.push(records),
                Out::Last(..) => panic!("a writer sends no tail"),
            }
        }
        assert_eq!(stdout_of(&chunks[0]), head, "the head is sent on its own");
        for chunk in &chunks[1..] {
            assert!(
                chunk.len() <= stream_encoded_len(FLUSH_AT),
                "{} bytes",
                chunk.len()
            );
        }
        let sent: Vec<u8> = chunks.iter().flat_map(|c| stdout_of(c)).collect();
        assert_eq!(sent.len(), head.len() + body.len());
        assert_eq!(sent[..head.len()], head[..]);
        assert_eq!(sent[head.len()..], body[..]);
    }

    #[test]
    fn a_short_head_shares_the_first_record_with_the_body() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = BodyWriter::new(1, BytesMut::from(&b"Status: 200 OK\r\n\r\n"[..]), tx);
        let body = vec![b'b'; FLUSH_AT];
        assert_eq!(w.write(&body).expect("open"), FLUSH_AT - 18);
        let Ok(Out::Chunk(first)) = rx.try_recv() else {
            panic!("one full record was sent");
        };
        assert_eq!(first.len(), stream_encoded_len(FLUSH_AT));
    }
}
