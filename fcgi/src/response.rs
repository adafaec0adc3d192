//! Encoding the application's side of a request: STDOUT and STDERR streams, then END_REQUEST.
//!
//! Real clients need the tail of a response (last STDOUT, empty STDOUT, END_REQUEST) in one
//! write: [`ResponseWriter::finish`] and [`crate::server::ServerConnection::end_request`] both
//! append to the caller's buffer, which the shell writes once.

use bytes::BufMut;

use crate::record::{self, kind};

/// The output streams of one request.
#[derive(Debug, Clone, Copy)]
pub struct ResponseWriter {
    id: u16,
    stderr_used: bool,
}

impl ResponseWriter {
    /// Output for request `id`.
    pub fn new(id: u16) -> ResponseWriter {
        ResponseWriter {
            id,
            stderr_used: false,
        }
    }

    /// The request id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Writes `data` as STDOUT records (nothing for empty data: that would end the stream).
    pub fn stdout(&self, data: &[u8], dst: &mut impl BufMut) {
        record::encode_stream(kind::STDOUT, self.id, data, dst);
    }

    /// Writes `data` as STDERR records: the web server logs them.
    pub fn stderr(&mut self, data: &[u8], dst: &mut impl BufMut) {
        if !data.is_empty() {
            self.stderr_used = true;
        }
        record::encode_stream(kind::STDERR, self.id, data, dst);
    }

    /// Ends the streams: an empty STDOUT record, and an empty STDERR record if any STDERR was
    /// sent. END_REQUEST follows, from the connection that tracks the request.
    pub fn finish(&self, dst: &mut impl BufMut) {
        // "The application signals the end of a stream by sending a record with contentLength 0."
        record::encode_end_of_stream(kind::STDOUT, self.id, dst);
        if self.stderr_used {
            record::encode_end_of_stream(kind::STDERR, self.id, dst);
        }
    }
}
