//! The protocol error: small, `Copy`, comparable, so tests can `assert_eq!` on it.

use std::fmt;

/// Everything a peer can get wrong that leaves the connection unusable. Each one closes the
/// connection; none panics. A well-framed request that breaks a limit is not an error: it is
/// refused or rejected on its own (see [`crate::server`]) and the connection carries on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The record header's version byte is not `FCGI_VERSION_1`.
    UnsupportedVersion(u8),
    /// A fixed-size record body (BEGIN_REQUEST, END_REQUEST, UNKNOWN_TYPE, ABORT_REQUEST) has the
    /// wrong length.
    BadContentLength {
        /// The record type.
        record_type: u8,
        /// The length the peer sent.
        len: u16,
        /// The length the specification requires.
        expected: u16,
    },
    /// A record type this side never receives (a server getting STDOUT, a client getting STDIN).
    UnexpectedRecord {
        /// The record type.
        record_type: u8,
    },
    /// A management record with a non-zero request id, or an application record with id 0.
    BadRequestId {
        /// The record type.
        record_type: u8,
        /// The request id the peer sent.
        id: u16,
    },
    /// A stream or abort record for a request id that was never begun.
    UnknownRequest {
        /// The request id.
        id: u16,
    },
    /// BEGIN_REQUEST for an id whose request is still running.
    DuplicateRequest {
        /// The request id.
        id: u16,
    },
    /// A name-value stream holds more pairs than the limit: a GET_VALUES query, or what
    /// [`crate::Params::decode`] returns to its own caller. A request's PARAMS over the limit
    /// is [`crate::server::Event::Rejected`] instead.
    TooManyParams {
        /// The limit in pairs.
        limit: usize,
    },
    /// A name-value pair whose lengths run past the end of its stream.
    TruncatedParams,
    /// A stream record after that stream's empty terminating record.
    StreamAfterEnd {
        /// The record type.
        record_type: u8,
        /// The request id.
        id: u16,
    },
    /// STDIN or DATA before the PARAMS stream ended.
    StdinBeforeParams {
        /// The request id.
        id: u16,
    },
    /// The peer closed the connection in the middle of a record.
    Truncated {
        /// Bytes of the unfinished record that had arrived.
        buffered: usize,
    },
    /// The peer closed the connection before the response was complete (client side).
    IncompleteResponse,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::UnsupportedVersion(v) => {
                write!(f, "unsupported FastCGI version {v}, expected 1")
            }
            Error::BadContentLength {
                record_type,
                len,
                expected,
            } => write!(
                f,
                "record type {record_type} has content length {len}, expected {expected}"
            ),
            Error::UnexpectedRecord { record_type } => {
                write!(f, "unexpected record type {record_type} in this direction")
            }
            Error::BadRequestId { record_type, id } => {
                write!(f, "record type {record_type} cannot carry request id {id}")
            }
            Error::UnknownRequest { id } => {
                write!(f, "record for request id {id}, which was never begun")
            }
            Error::DuplicateRequest { id } => {
                write!(
                    f,
                    "BEGIN_REQUEST for request id {id}, which is still active"
                )
            }
            Error::TooManyParams { limit } => write!(f, "params exceed {limit} name-value pairs"),
            Error::TruncatedParams => {
                write!(f, "name-value pair runs past the end of the params stream")
            }
            Error::StreamAfterEnd { record_type, id } => write!(
                f,
                "record type {record_type} for request id {id} after its stream ended"
            ),
            Error::StdinBeforeParams { id } => {
                write!(
                    f,
                    "STDIN or DATA for request id {id} before its PARAMS ended"
                )
            }
            Error::Truncated { buffered } => {
                write!(
                    f,
                    "connection closed inside a record ({buffered} bytes buffered)"
                )
            }
            Error::IncompleteResponse => write!(f, "connection closed before END_REQUEST"),
        }
    }
}

impl std::error::Error for Error {}
