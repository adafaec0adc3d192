//! Request assembly for the application side: records in, events out, no I/O.
//!
//! [`ServerConnection::handle`] takes one record and yields at most one [`Event`]; the PARAMS
//! stream is gathered (it is small and bounded) and delivered whole with the request, while STDIN
//! and DATA are passed on record by record, so a body is never required to be buffered.
//! Management replies (GET_VALUES_RESULT, UNKNOWN_TYPE) and refusals the core makes itself
//! (END_REQUEST with UNKNOWN_ROLE, CANT_MPX_CONN or OVERLOADED) queue in an output buffer the
//! shell drains with [`ServerConnection::take_output`] and writes before anything else.
//!
//! # What the shell does with each event
//! | event | the shell |
//! |---|---|
//! | [`Event::Request`] | runs the request, then writes its STDOUT and [`ServerConnection::end_request`] |
//! | [`Event::Stdin`], [`Event::Data`] | passes the bytes to the running request |
//! | [`Event::StdinEnd`], [`Event::DataEnd`] | ends that stream for the request |
//! | [`Event::Abort`] | ends the request's streams early; it still answers with `end_request` |
//! | [`Event::Rejected`] | answers at once without running anything (for HTTP: `Status: 431`), then `end_request` |
//!
//! Two words are kept apart: a *refused* request is answered by the core itself at
//! BEGIN_REQUEST, and the shell never hears of it; a *rejected* one is reported to the shell,
//! which answers it.
//!
//! A rejected request never reaches the application, but it is still the shell's to answer:
//! it counts in [`ServerConnection::active`] until `end_request`, and what the client still
//! sends for it is dropped unread, so it costs no memory while the answer is written. The
//! connection stays usable for the next request.
//!
//! # Multiplexing
//! A connection runs at most [`Limits::max_requests_per_conn`] requests at once; the default,
//! 1, means it does not multiplex. A BEGIN_REQUEST beyond that is refused here with END_REQUEST
//! (`FCGI_CANT_MPX_CONN` when the cap is 1, `FCGI_OVERLOADED` above), its later records are
//! drained, and the requests already open and the connection carry on: the shell never sees
//! it. GET_VALUES answers `FCGI_MPXS_CONNS` accordingly, so a client that asks first is told
//! the truth.
//!
//! # Errors
//! [`ServerConnection::decode`] returns an [`Error`] only when the byte stream itself cannot be
//! trusted any more (a bad version or record length, a record for a request that never began,
//! a stream after its end): the shell closes the connection. Everything a well-framed request
//! can get wrong is answered per request instead.

use std::fmt;

use bytes::{Bytes, BytesMut};

use crate::params::{self, Params};
use crate::record::{self, kind, ProtocolStatus, Record, Role, NULL_REQUEST_ID};
use crate::{Error, Limits};

/// A request whose PARAMS stream is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request id, unique among this connection's active requests.
    pub id: u16,
    /// The role asked for (never [`Role::Unknown`]: those are refused here).
    pub role: Role,
    /// Whether the client asked to keep the connection open after this request.
    pub keep_conn: bool,
    /// The CGI variables.
    pub params: Params,
}

/// What a record meant, for the layer that runs requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A new request: params complete, body to follow.
    Request(Request),
    /// A piece of the request body (never empty).
    Stdin {
        /// The request id.
        id: u16,
        /// The bytes.
        data: Bytes,
    },
    /// The request body is complete.
    StdinEnd {
        /// The request id.
        id: u16,
    },
    /// A piece of the Filter role's DATA stream (never empty).
    Data {
        /// The request id.
        id: u16,
        /// The bytes.
        data: Bytes,
    },
    /// The DATA stream is complete.
    DataEnd {
        /// The request id.
        id: u16,
    },
    /// The client gave up on the request; the application should end it soon.
    Abort {
        /// The request id.
        id: u16,
    },
    /// A request that began but will not be delivered: its PARAMS broke a limit. Emitted once,
    /// instead of [`Event::Request`]; no other event follows for this id. The shell answers it
    /// (STDOUT, then [`ServerConnection::end_request`]) without running the application.
    Rejected {
        /// The request id.
        id: u16,
        /// Which limit it broke.
        reason: Rejection,
    },
}

/// Why a request was rejected. Both are HTTP's `431 Request Header Fields Too Large`: the
/// PARAMS stream carries the client's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The PARAMS stream is longer than [`Limits::max_params_bytes`].
    ParamsTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// The PARAMS stream holds more name-value pairs than [`Limits::max_params`].
    TooManyParams {
        /// The limit in pairs.
        limit: usize,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rejection::ParamsTooLarge { limit } => write!(f, "params exceed {limit} bytes"),
            Rejection::TooManyParams { limit } => {
                write!(f, "params exceed {limit} name-value pairs")
            }
        }
    }
}

/// Answered requests a connection remembers until the client ends their STDIN, so records
/// already on their way are drained instead of being errors. 64 covers a client that sends a
/// few dozen BEGIN_REQUESTs before their streams; each costs a few dozen bytes. Beyond it the
/// oldest is forgotten: its late records then close the connection as records for an unknown
/// request, a cost only a client that ignores END_REQUEST pays.
const MAX_DRAINING: usize = 64;

#[derive(Debug)]
enum Phase {
    /// Gathering the PARAMS stream.
    Params(BytesMut),
    /// Params delivered; the application is running the request.
    Running { stdin_done: bool, data_done: bool },
    /// [`Event::Rejected`] went out; the shell owes the answer. The client's records for it are
    /// dropped unread.
    Rejected { stdin_done: bool },
    /// END_REQUEST is sent, by the shell or by the core when it refused the request at BEGIN;
    /// what the client still sends of it is drained, not an error.
    Finished,
}

impl Phase {
    /// Whether the request still needs its END_REQUEST.
    fn is_active(&self) -> bool {
        !matches!(self, Phase::Finished)
    }
}

#[derive(Debug)]
struct Slot {
    id: u16,
    role: Role,
    keep_conn: bool,
    phase: Phase,
}

/// One connection's protocol state on the application side.
#[derive(Debug)]
pub struct ServerConnection {
    limits: Limits,
    /// In BEGIN_REQUEST order, so the oldest answered one is the first forgotten.
    slots: Vec<Slot>,
    out: BytesMut,
    close_after_idle: bool,
}

impl ServerConnection {
    /// A connection enforcing `limits`.
    pub fn new(limits: Limits) -> ServerConnection {
        ServerConnection {
            limits,
            slots: Vec::new(),
            out: BytesMut::new(),
            close_after_idle: false,
        }
    }

    /// Decodes records from `src` until one yields an event: `Ok(None)` means more bytes are
    /// needed (check [`ServerConnection::take_output`] even then).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Event>, Error> {
        while let Some(rec) = record::decode(src)? {
            if let Some(event) = self.handle(rec)? {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// Takes one record.
    pub fn handle(&mut self, rec: Record) -> Result<Option<Event>, Error> {
        let id = rec.request_id;
        match rec.record_type {
            kind::GET_VALUES => {
                // "Management records have a requestId value of zero."
                if id != NULL_REQUEST_ID {
                    return Err(Error::BadRequestId {
                        record_type: rec.record_type,
                        id,
                    });
                }
                self.answer_get_values(rec.content)?;
                Ok(None)
            }
            kind::BEGIN_REQUEST => {
                nonzero_id(&rec)?;
                self.begin(rec)
            }
            kind::PARAMS | kind::STDIN | kind::DATA | kind::ABORT_REQUEST => {
                nonzero_id(&rec)?;
                self.stream(rec)
            }
            kind::END_REQUEST
            | kind::STDOUT
            | kind::STDERR
            | kind::GET_VALUES_RESULT
            | kind::UNKNOWN_TYPE => Err(Error::UnexpectedRecord {
                record_type: rec.record_type,
            }),
            other => {
                // "The application responds to a management record of unknown type with
                // FCGI_UNKNOWN_TYPE." Application records of a future type get the same answer.
                record::encode_unknown_type(other, &mut self.out);
                Ok(None)
            }
        }
    }

    fn begin(&mut self, rec: Record) -> Result<Option<Event>, Error> {
        let (role, keep_conn) = record::parse_begin_request(&rec)?;
        let id = rec.request_id;
        if let Some(i) = self.position(id) {
            if self.slots[i].phase.is_active() {
                return Err(Error::DuplicateRequest { id });
            }
            // The client may reuse an id once END_REQUEST went out, even before we saw the end
            // of the old body.
            self.slots.remove(i);
        }
        let refusal = if matches!(role, Role::Unknown(_)) {
            Some(ProtocolStatus::UnknownRole)
        } else if self.active() >= self.limits.max_requests_per_conn {
            Some(if self.limits.multiplexes() {
                // "FCGI_OVERLOADED: rejecting a new request. This happens when the application
                // runs out of some resource": here, the room for requests on this connection.
                ProtocolStatus::Overloaded
            } else {
                // "FCGI_CANT_MPX_CONN: rejecting a new request. This happens when a Web server
                // sends concurrent requests over one connection to an application that is
                // designed to process one request at a time per connection."
                ProtocolStatus::CantMpxConn
            })
        } else {
            None
        };
        let phase = match refusal {
            Some(status) => {
                record::encode_end_request(id, 0, status, &mut self.out);
                Phase::Finished
            }
            None => Phase::Params(BytesMut::new()),
        };
        self.slots.push(Slot {
            id,
            role,
            keep_conn,
            phase,
        });
        self.forget_oldest_finished();
        Ok(None)
    }

    fn stream(&mut self, rec: Record) -> Result<Option<Event>, Error> {
        let id = rec.request_id;
        let Some(i) = self.position(id) else {
            if rec.record_type == kind::ABORT_REQUEST {
                // An abort can cross our END_REQUEST on the wire: nothing left to abort.
                return Ok(None);
            }
            return Err(Error::UnknownRequest { id });
        };
        let t = rec.record_type;
        if t == kind::ABORT_REQUEST {
            record::expect_len(&rec, 0)?;
        }
        let end_of_stdin = t == kind::STDIN && rec.content.is_empty();
        let slot = &mut self.slots[i];
        match &mut slot.phase {
            Phase::Finished => {
                if end_of_stdin {
                    self.slots.remove(i);
                }
                Ok(None)
            }
            Phase::Rejected { stdin_done } => {
                // Dropped unread, however much comes: the answer does not depend on it. An
                // abort changes nothing either: the shell's answer is already on its way.
                *stdin_done |= end_of_stdin;
                Ok(None)
            }
            Phase::Params(_) if t == kind::ABORT_REQUEST => {
                // Nothing was handed to the application yet: end it here.
                record::encode_end_request(id, 0, ProtocolStatus::RequestComplete, &mut self.out);
                slot.phase = Phase::Finished;
                self.forget_oldest_finished();
                Ok(None)
            }
            Phase::Params(buf) if t == kind::PARAMS => {
                match gather(buf, rec.content, &self.limits)? {
                    Gathered::More => Ok(None),
                    Gathered::Whole(params) => {
                        slot.phase = Phase::Running {
                            stdin_done: false,
                            data_done: slot.role != Role::Filter,
                        };
                        Ok(Some(Event::Request(Request {
                            id,
                            role: slot.role,
                            keep_conn: slot.keep_conn,
                            params,
                        })))
                    }
                    Gathered::Over(reason) => {
                        // Dropping the buffer is what keeps a rejected request from costing
                        // memory, however much more it sends.
                        slot.phase = Phase::Rejected { stdin_done: false };
                        Ok(Some(Event::Rejected { id, reason }))
                    }
                }
            }
            Phase::Params(_) => Err(Error::StdinBeforeParams { id }),
            Phase::Running {
                stdin_done,
                data_done,
            } => running(id, stdin_done, data_done, rec),
        }
    }

    /// Writes END_REQUEST for `id` into `dst` and forgets the request once its body has been
    /// read. Returns true when the connection should close after this write: the client did not
    /// set `FCGI_KEEP_CONN` and no other request is open.
    ///
    /// Call it once for every [`Event::Request`] and every [`Event::Rejected`], after that
    /// request's STDOUT.
    pub fn end_request(&mut self, id: u16, app_status: u32, dst: &mut BytesMut) -> bool {
        record::encode_end_request(id, app_status, ProtocolStatus::RequestComplete, dst);
        if let Some(i) = self.position(id) {
            let done = matches!(
                self.slots[i].phase,
                Phase::Running {
                    stdin_done: true,
                    ..
                } | Phase::Rejected { stdin_done: true }
            );
            if !self.slots[i].keep_conn {
                // "If zero, the application closes the connection after responding."
                self.close_after_idle = true;
            }
            if done {
                self.slots.remove(i);
            } else {
                self.slots[i].phase = Phase::Finished;
                self.forget_oldest_finished();
            }
        }
        self.close_after_idle && self.active() == 0
    }

    /// Requests that still need their END_REQUEST from the shell: gathering params, running,
    /// or rejected and not yet answered. Never more than [`Limits::max_requests_per_conn`].
    pub fn active(&self) -> usize {
        self.slots.iter().filter(|s| s.phase.is_active()).count()
    }

    /// True while the client still has input to send: a request's params or body are not
    /// complete, even if the application already answered it.
    pub fn expects_input(&self) -> bool {
        !self.slots.is_empty()
    }

    /// True when a request without `FCGI_KEEP_CONN` has ended: close once nothing is active.
    pub fn wants_close(&self) -> bool {
        self.close_after_idle
    }

    /// Bytes allocated for PARAMS streams still being gathered: at most twice
    /// [`Limits::max_params_bytes`] per active request (the buffer grows by doubling), and
    /// nothing for a rejected one however much it sends.
    pub fn buffered_params(&self) -> usize {
        self.slots
            .iter()
            .map(|s| match &s.phase {
                Phase::Params(buf) => buf.capacity(),
                _ => 0,
            })
            .sum()
    }

    /// Control records queued by the protocol itself, to be written before anything else.
    pub fn take_output(&mut self) -> Option<Bytes> {
        if self.out.is_empty() {
            None
        } else {
            Some(self.out.split().freeze())
        }
    }

    /// Checks the end of input: an error if a record was cut off.
    pub fn handle_eof(&self, src: &BytesMut) -> Result<(), Error> {
        record::check_eof(src)
    }

    fn position(&self, id: u16) -> Option<usize> {
        self.slots.iter().position(|s| s.id == id)
    }

    /// Keeps at most [`MAX_DRAINING`] answered requests; called after each one is answered.
    fn forget_oldest_finished(&mut self) {
        let finished = self.slots.iter().filter(|s| !s.phase.is_active()).count();
        if finished > MAX_DRAINING {
            if let Some(i) = self.slots.iter().position(|s| !s.phase.is_active()) {
                self.slots.remove(i);
            }
        }
    }

    fn answer_get_values(&mut self, content: Bytes) -> Result<(), Error> {
        let asked = Params::decode(content, self.limits.max_params)?;
        let mut body = Vec::new();
        for (name, _) in asked.iter() {
            let value = match name {
                // "FCGI_MAX_CONNS: The maximum number of concurrent transport connections this
                // application will accept."
                b"FCGI_MAX_CONNS" => self.limits.max_conns,
                // "FCGI_MAX_REQS: The maximum number of concurrent requests this application
                // will accept": the process's cap, or fewer if its connections cannot hold it.
                b"FCGI_MAX_REQS" => self.limits.max_reqs.min(
                    self.limits
                        .max_conns
                        .saturating_mul(self.limits.max_requests_per_conn),
                ),
                // "FCGI_MPXS_CONNS: "0" if this application does not multiplex connections
                // (i.e. handle concurrent requests over each connection), "1" otherwise."
                b"FCGI_MPXS_CONNS" => usize::from(self.limits.multiplexes()),
                // "The application ... ignores unknown names."
                _ => continue,
            };
            params::encode_pair(name, value.to_string().as_bytes(), &mut body);
        }
        // Three known names with at most 20-digit values cannot exceed one record, but a peer
        // that repeats them could: answer only what fits.
        body.truncate(record::MAX_CONTENT_LEN);
        record::encode(
            kind::GET_VALUES_RESULT,
            NULL_REQUEST_ID,
            &body,
            &mut self.out,
        );
        Ok(())
    }
}

/// What one PARAMS record did to a request gathering them.
enum Gathered {
    /// Buffered; the stream goes on.
    More,
    /// The stream ended and decoded.
    Whole(Params),
    /// The stream broke a limit.
    Over(Rejection),
}

/// Adds one PARAMS record to `buf`, checking the limits before anything is buffered.
fn gather(buf: &mut BytesMut, content: Bytes, limits: &Limits) -> Result<Gathered, Error> {
    if content.is_empty() {
        return match Params::decode(std::mem::take(buf).freeze(), limits.max_params) {
            Ok(params) => Ok(Gathered::Whole(params)),
            Err(Error::TooManyParams { limit }) => {
                Ok(Gathered::Over(Rejection::TooManyParams { limit }))
            }
            Err(e) => Err(e),
        };
    }
    if buf.len() + content.len() > limits.max_params_bytes {
        return Ok(Gathered::Over(Rejection::ParamsTooLarge {
            limit: limits.max_params_bytes,
        }));
    }
    buf.extend_from_slice(&content);
    Ok(Gathered::More)
}

/// One STDIN, DATA, PARAMS or ABORT record for request `id`, which the application is running.
fn running(
    id: u16,
    stdin_done: &mut bool,
    data_done: &mut bool,
    rec: Record,
) -> Result<Option<Event>, Error> {
    let t = rec.record_type;
    match t {
        kind::ABORT_REQUEST => Ok(Some(Event::Abort { id })),
        kind::PARAMS => Err(Error::StreamAfterEnd { record_type: t, id }),
        kind::STDIN => {
            if *stdin_done {
                return Err(Error::StreamAfterEnd { record_type: t, id });
            }
            if rec.content.is_empty() {
                *stdin_done = true;
                return Ok(Some(Event::StdinEnd { id }));
            }
            Ok(Some(Event::Stdin {
                id,
                data: rec.content,
            }))
        }
        _ => {
            // DATA: only the Filter role has this stream; for others it counts as ended.
            if *data_done {
                return Err(Error::StreamAfterEnd { record_type: t, id });
            }
            if rec.content.is_empty() {
                *data_done = true;
                return Ok(Some(Event::DataEnd { id }));
            }
            Ok(Some(Event::Data {
                id,
                data: rec.content,
            }))
        }
    }
}

fn nonzero_id(rec: &Record) -> Result<(), Error> {
    if rec.request_id == NULL_REQUEST_ID {
        return Err(Error::BadRequestId {
            record_type: rec.record_type,
            id: 0,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode, encode_begin_request, encode_end_of_stream};

    fn limits() -> Limits {
        Limits {
            max_requests_per_conn: 2,
            max_conns: 7,
            max_reqs: 3,
            ..Limits::default()
        }
    }

    fn begin(id: u16, role: Role, keep: bool, dst: &mut BytesMut) {
        encode_begin_request(id, role, keep, dst);
    }

    fn params(id: u16, pairs: &[(&str, &str)], dst: &mut BytesMut) {
        let mut raw = BytesMut::new();
        for (n, v) in pairs {
            params::encode_pair(n.as_bytes(), v.as_bytes(), &mut raw);
        }
        record::encode_stream(kind::PARAMS, id, &raw, dst);
        encode_end_of_stream(kind::PARAMS, id, dst);
    }

    fn all(conn: &mut ServerConnection, buf: &mut BytesMut) -> Result<Vec<Event>, Error> {
        let mut events = Vec::new();
        while let Some(e) = conn.decode(buf)? {
            events.push(e);
        }
        Ok(events)
    }

    fn decode_one(bytes: &[u8]) -> Result<Vec<Event>, Error> {
        let mut conn = ServerConnection::new(limits());
        all(&mut conn, &mut BytesMut::from(bytes))
    }

    #[test]
    fn a_whole_request_from_bytes() {
        let wire: &[u8] = b"\x01\x01\x00\x01\x00\x08\x00\x00\x00\x01\x01\x00\x00\x00\x00\x00\
            \x01\x04\x00\x01\x00\x07\x01\x00\x01\x04AGET!\x00\
            \x01\x04\x00\x01\x00\x00\x00\x00\
            \x01\x05\x00\x01\x00\x02\x06\x00hi\x00\x00\x00\x00\x00\x00\
            \x01\x05\x00\x01\x00\x00\x00\x00";
        let events = decode_one(wire).expect("valid");
        let Event::Request(req) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(
            (req.id, req.role, req.keep_conn),
            (1, Role::Responder, true)
        );
        assert_eq!(req.params.get_str("A"), Some("GET!"));
        assert_eq!(
            events[1],
            Event::Stdin {
                id: 1,
                data: Bytes::from_static(b"hi")
            }
        );
        assert_eq!(events[2], Event::StdinEnd { id: 1 });
    }

    #[test]
    fn input_is_expected_until_the_body_ends_even_after_the_answer() {
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, false, &mut wire);
        params(1, &[("A", "b")], &mut wire);
        let mut conn = ServerConnection::new(limits());
        all(&mut conn, &mut wire).expect("valid");
        assert!(conn.expects_input());
        // Answered before its body ended (as cgi-fcgi's requests are): still expecting it.
        assert!(conn.end_request(1, 0, &mut BytesMut::new()));
        assert!(conn.expects_input());
        encode_end_of_stream(kind::STDIN, 1, &mut wire);
        all(&mut conn, &mut wire).expect("valid");
        assert!(!conn.expects_input());

        // A request read whole, then answered: nothing more to come.
        let mut conn = ServerConnection::new(limits());
        begin(2, Role::Responder, false, &mut wire);
        params(2, &[("A", "b")], &mut wire);
        encode_end_of_stream(kind::STDIN, 2, &mut wire);
        all(&mut conn, &mut wire).expect("valid");
        assert!(conn.end_request(2, 0, &mut BytesMut::new()));
        assert!(!conn.expects_input());
    }

    #[test]
    fn pairs_straddle_records() {
        let mut raw = BytesMut::new();
        params::encode_pair(b"LONG", &[b'z'; 300], &mut raw);
        params::encode_pair(b"B", b"\xff\x00", &mut raw);
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, false, &mut wire);
        // Cut inside the 4-byte length, and again inside the value.
        for piece in [&raw[..2], &raw[2..150], &raw[150..]] {
            encode(kind::PARAMS, 1, piece, &mut wire);
        }
        encode_end_of_stream(kind::PARAMS, 1, &mut wire);
        let mut conn = ServerConnection::new(limits());
        let Some(Event::Request(req)) = conn.decode(&mut wire).expect("valid") else {
            panic!()
        };
        assert_eq!(req.params.get("LONG").map(|v| v.len()), Some(300));
        assert_eq!(req.params.get("B"), Some(&b"\xff\x00"[..]));
    }

    /// GET_VALUES for the three names the specification defines, and one it does not.
    const GET_VALUES: &[u8] = b"\x01\x09\x00\x00\x00\x36\x02\x00\
        \x0e\x00FCGI_MAX_CONNS\x0d\x00FCGI_MAX_REQS\x0f\x00FCGI_MPXS_CONNS\x04\x00NOPE\x00\x00";

    fn get_values(limits: Limits) -> Bytes {
        let mut conn = ServerConnection::new(limits);
        assert_eq!(conn.decode(&mut BytesMut::from(GET_VALUES)), Ok(None));
        conn.take_output().expect("an answer")
    }

    #[test]
    fn get_values_without_multiplexing_says_so() {
        // 51 bytes of pairs, padded to 56; unknown names are left out.
        let answer = get_values(Limits {
            max_conns: 7,
            max_reqs: 3,
            ..Limits::default()
        });
        assert_eq!(
            &answer[..],
            b"\x01\x0a\x00\x00\x00\x33\x05\x00\
              \x0e\x01FCGI_MAX_CONNS7\x0d\x01FCGI_MAX_REQS3\x0f\x01FCGI_MPXS_CONNS0\
              \x00\x00\x00\x00\x00"
        );
        // MAX_REQS is the process's cap, unless its connections cannot hold that many.
        let answer = get_values(Limits {
            max_conns: 2,
            max_reqs: 5,
            ..Limits::default()
        });
        let mut answer = BytesMut::from(&answer[..]);
        let rec = record::decode(&mut answer).expect("valid").expect("whole");
        let values = Params::decode(rec.content, 10).expect("pairs");
        assert_eq!(values.get_str("FCGI_MAX_CONNS"), Some("2"));
        assert_eq!(values.get_str("FCGI_MAX_REQS"), Some("2"));
        assert_eq!(values.get_str("FCGI_MPXS_CONNS"), Some("0"));
        // The defaults: one request at a time, not multiplexed.
        let mut answer = BytesMut::from(&get_values(Limits::default())[..]);
        let rec = record::decode(&mut answer).expect("valid").expect("whole");
        let values = Params::decode(rec.content, 10).expect("pairs");
        assert_eq!(values.get_str("FCGI_MAX_CONNS"), Some("1024"));
        assert_eq!(values.get_str("FCGI_MAX_REQS"), Some("1"));
        assert_eq!(values.get_str("FCGI_MPXS_CONNS"), Some("0"));
    }

    #[test]
    fn get_values_with_multiplexing_says_so() {
        let answer = get_values(Limits {
            max_requests_per_conn: crate::MULTIPLEXED_REQUESTS_PER_CONN,
            max_conns: 7,
            max_reqs: 30,
            ..Limits::default()
        });
        assert_eq!(
            &answer[..],
            b"\x01\x0a\x00\x00\x00\x34\x04\x00\
              \x0e\x01FCGI_MAX_CONNS7\x0d\x02FCGI_MAX_REQS30\x0f\x01FCGI_MPXS_CONNS1\
              \x00\x00\x00\x00"
        );
    }

    #[test]
    fn get_values_between_params_records_is_answered() {
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        encode(kind::PARAMS, 1, b"\x01\x01ab", &mut wire);
        wire.extend_from_slice(GET_VALUES);
        encode_end_of_stream(kind::PARAMS, 1, &mut wire);
        let mut conn = ServerConnection::new(limits());
        let events = all(&mut conn, &mut wire).expect("valid");
        assert!(matches!(&events[..], [Event::Request(r)] if r.params.get_str("a") == Some("b")));
        let mut out = BytesMut::from(&conn.take_output().expect("an answer")[..]);
        let rec = record::decode(&mut out).expect("valid").expect("whole");
        assert_eq!(
            (rec.record_type, rec.request_id),
            (kind::GET_VALUES_RESULT, 0)
        );
        let values = Params::decode(rec.content, 10).expect("pairs");
        assert_eq!(values.get_str("FCGI_MAX_CONNS"), Some("7"));
        assert_eq!(values.get_str("FCGI_MAX_REQS"), Some("3"));
        assert_eq!(values.get_str("FCGI_MPXS_CONNS"), Some("1"));
    }

    #[test]
    fn unknown_record_type_is_answered_with_unknown_type() {
        let mut conn = ServerConnection::new(limits());
        let mut wire = BytesMut::from(&b"\x01\x63\x00\x00\x00\x00\x00\x00"[..]);
        assert_eq!(conn.decode(&mut wire), Ok(None));
        assert_eq!(
            &conn.take_output().expect("answer")[..],
            b"\x01\x0b\x00\x00\x00\x08\x00\x00\x63\x00\x00\x00\x00\x00\x00\x00"
        );
    }

    #[test]
    fn unknown_role_is_refused_and_its_streams_drained() {
        let mut conn = ServerConnection::new(limits());
        let mut wire = BytesMut::new();
        begin(3, Role::Unknown(9), false, &mut wire);
        params(3, &[("A", "b")], &mut wire);
        encode_end_of_stream(kind::STDIN, 3, &mut wire);
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
        assert_eq!(
            &conn.take_output().expect("refusal")[..],
            b"\x01\x03\x00\x03\x00\x08\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00"
        );
        assert_eq!(conn.active(), 0);
    }

    #[test]
    fn multiplexed_requests_and_the_limit() {
        let mut conn = ServerConnection::new(limits());
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        begin(2, Role::Responder, true, &mut wire);
        begin(3, Role::Responder, true, &mut wire);
        params(2, &[("N", "2")], &mut wire);
        params(1, &[("N", "1")], &mut wire);
        encode(kind::STDIN, 1, b"one", &mut wire);
        encode(kind::STDIN, 2, b"two", &mut wire);
        let events = all(&mut conn, &mut wire).expect("valid");
        let ids: Vec<u16> = events
            .iter()
            .map(|e| match e {
                Event::Request(r) => r.id,
                Event::Stdin { id, .. } => *id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [2, 1, 1, 2]);
        let refusal = conn.take_output().expect("third refused");
        assert_eq!(
            &refusal[..],
            b"\x01\x03\x00\x03\x00\x08\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00"
        );
    }

    /// CANT_MPX_CONN (protocolStatus 1) for request `id`.
    fn cant_mpx(id: u8) -> [u8; 16] {
        let mut rec = *b"\x01\x03\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00";
        rec[3] = id;
        rec
    }

    #[test]
    fn abort_before_and_after_params() {
        let mut conn = ServerConnection::new(limits());
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        encode(kind::ABORT_REQUEST, 1, b"", &mut wire);
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
        assert_eq!(conn.take_output().expect("ended")[1], kind::END_REQUEST);

        begin(2, Role::Responder, true, &mut wire);
        params(2, &[], &mut wire);
        encode(kind::ABORT_REQUEST, 2, b"", &mut wire);
        let events = all(&mut conn, &mut wire).expect("valid");
        assert_eq!(events.last(), Some(&Event::Abort { id: 2 }));
        // An abort crossing our END_REQUEST is ignored.
        encode(kind::ABORT_REQUEST, 9, b"", &mut wire);
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
    }

    #[test]
    fn filter_role_has_a_data_stream() {
        let mut conn = ServerConnection::new(limits());
        let mut wire = BytesMut::new();
        begin(1, Role::Filter, false, &mut wire);
        params(1, &[], &mut wire);
        encode_end_of_stream(kind::STDIN, 1, &mut wire);
        encode(kind::DATA, 1, b"file", &mut wire);
        encode_end_of_stream(kind::DATA, 1, &mut wire);
        let events = all(&mut conn, &mut wire).expect("valid");
        assert_eq!(
            &events[1..],
            &[
                Event::StdinEnd { id: 1 },
                Event::Data {
                    id: 1,
                    data: Bytes::from_static(b"file")
                },
                Event::DataEnd { id: 1 }
            ]
        );
    }

    #[test]
    fn ids_are_reusable_after_end_request_even_before_the_body_is_drained() {
        let mut conn = ServerConnection::new(limits());
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        params(1, &[], &mut wire);
        encode(kind::STDIN, 1, b"part", &mut wire);
        all(&mut conn, &mut wire).expect("valid");
        let mut out = BytesMut::new();
        assert!(!conn.end_request(1, 0, &mut out), "keep_conn: stay open");
        assert_eq!(
            &out[..],
            b"\x01\x03\x00\x01\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
        );
        // The rest of the old body is drained silently...
        encode(kind::STDIN, 1, b"more", &mut wire);
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
        // ...and the id begins a new request.
        begin(1, Role::Responder, false, &mut wire);
        params(1, &[("X", "y")], &mut wire);
        encode_end_of_stream(kind::STDIN, 1, &mut wire);
        let events = all(&mut conn, &mut wire).expect("valid");
        assert!(matches!(&events[0], Event::Request(r) if r.params.get_str("X") == Some("y")));
        assert!(conn.end_request(1, 0, &mut out), "no keep_conn: close");
    }

    #[test]
    fn every_error_is_typed() {
        let begin1: &[u8] = b"\x01\x01\x00\x01\x00\x08\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00";
        let params1_end: &[u8] = b"\x01\x04\x00\x01\x00\x00\x00\x00";
        let cases: Vec<(Vec<u8>, Error)> = vec![
            (
                b"\x00\x01\x00\x01\x00\x00\x00\x00".to_vec(),
                Error::UnsupportedVersion(0),
            ),
            (
                b"\x01\x05\x00\x05\x00\x00\x00\x00".to_vec(),
                Error::UnknownRequest { id: 5 },
            ),
            ([begin1, begin1].concat(), Error::DuplicateRequest { id: 1 }),
            (
                b"\x01\x01\x00\x01\x00\x04\x00\x00\x00\x01\x00\x00".to_vec(),
                Error::BadContentLength {
                    record_type: 1,
                    len: 4,
                    expected: 8,
                },
            ),
            (
                [
                    begin1,
                    b"\x01\x02\x00\x01\x00\x01\x07\x00x\x00\x00\x00\x00\x00\x00\x00",
                ]
                .concat(),
                Error::BadContentLength {
                    record_type: 2,
                    len: 1,
                    expected: 0,
                },
            ),
            (
                b"\x01\x09\x00\x01\x00\x00\x00\x00".to_vec(),
                Error::BadRequestId {
                    record_type: kind::GET_VALUES,
                    id: 1,
                },
            ),
            (
                b"\x01\x05\x00\x00\x00\x00\x00\x00".to_vec(),
                Error::BadRequestId {
                    record_type: kind::STDIN,
                    id: 0,
                },
            ),
            (
                b"\x01\x06\x00\x01\x00\x00\x00\x00".to_vec(),
                Error::UnexpectedRecord {
                    record_type: kind::STDOUT,
                },
            ),
            (
                [begin1, b"\x01\x05\x00\x01\x00\x00\x00\x00"].concat(),
                Error::StdinBeforeParams { id: 1 },
            ),
            (
                [begin1, params1_end, params1_end].concat(),
                Error::StreamAfterEnd {
                    record_type: kind::PARAMS,
                    id: 1,
                },
            ),
            (
                [
                    begin1,
                    b"\x01\x04\x00\x01\x00\x02\x06\x00\x05\x01\x00\x00\x00\x00\x00\x00",
                    params1_end,
                ]
                .concat(),
                Error::TruncatedParams,
            ),
        ];
        for (wire, expected) in cases {
            assert_eq!(decode_one(&wire), Err(expected), "{wire:?}");
        }
    }

    #[test]
    fn truncated_input_at_eof() {
        let mut conn = ServerConnection::new(limits());
        let mut wire = BytesMut::from(&b"\x01\x05\x00\x01\x00\x10\x00\x00abc"[..]);
        assert_eq!(conn.decode(&mut wire), Ok(None));
        assert_eq!(
            conn.handle_eof(&wire),
            Err(Error::Truncated { buffered: 11 })
        );
    }

    #[test]
    fn a_second_request_while_one_is_active_is_refused_and_the_first_goes_on() {
        let mut conn = ServerConnection::new(Limits::default());
        // BEGIN 1 (keep), PARAMS 1 {A: GET!}; then BEGIN 2 (keep), its PARAMS and body.
        let mut wire = BytesMut::from(
            &b"\x01\x01\x00\x01\x00\x08\x00\x00\x00\x01\x01\x00\x00\x00\x00\x00\
               \x01\x04\x00\x01\x00\x07\x01\x00\x01\x04AGET!\x00\
               \x01\x04\x00\x01\x00\x00\x00\x00\
               \x01\x01\x00\x02\x00\x08\x00\x00\x00\x01\x01\x00\x00\x00\x00\x00\
               \x01\x04\x00\x02\x00\x07\x01\x00\x01\x04BPUT!\x00\
               \x01\x04\x00\x02\x00\x00\x00\x00\
               \x01\x05\x00\x02\x00\x02\x06\x00no\x00\x00\x00\x00\x00\x00\
               \x01\x05\x00\x02\x00\x00\x00\x00\
               \x01\x05\x00\x01\x00\x02\x06\x00hi\x00\x00\x00\x00\x00\x00\
               \x01\x05\x00\x01\x00\x00\x00\x00"[..],
        );
        let events = all(&mut conn, &mut wire).expect("the connection stays usable");
        let [Event::Request(req), stdin, end] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!((req.id, req.params.get_str("A")), (1, Some("GET!")));
        assert_eq!(
            (stdin, end),
            (
                &Event::Stdin {
                    id: 1,
                    data: Bytes::from_static(b"hi")
                },
                &Event::StdinEnd { id: 1 }
            )
        );
        assert_eq!(&conn.take_output().expect("refusal")[..], &cant_mpx(2));
        assert_eq!(conn.active(), 1);
        // The refused request's records were drained to its end: nothing of it is left.
        assert!(!conn.end_request(1, 0, &mut BytesMut::new()), "keep_conn");
        assert!(!conn.expects_input());

        // Once the first has ended, the next request is taken.
        let mut wire = BytesMut::from(
            &b"\x01\x01\x00\x03\x00\x08\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\
               \x01\x04\x00\x03\x00\x00\x00\x00\
               \x01\x05\x00\x03\x00\x00\x00\x00"[..],
        );
        let events = all(&mut conn, &mut wire).expect("valid");
        assert!(matches!(&events[..], [Event::Request(r), Event::StdinEnd { id: 3 }] if r.id == 3));
        assert_eq!(conn.take_output(), None, "nothing refused");
        assert!(
            conn.end_request(3, 0, &mut BytesMut::new()),
            "no keep_conn: close"
        );
    }

    fn interleaved_three(conn: &mut ServerConnection) -> Vec<Event> {
        let mut wire = BytesMut::new();
        for id in 1..=3 {
            begin(id, Role::Responder, true, &mut wire);
        }
        for id in [2, 1, 3] {
            params(id, &[("N", &id.to_string())], &mut wire);
        }
        for id in [3, 1, 2] {
            encode(kind::STDIN, id, b"body", &mut wire);
        }
        for id in [2, 3, 1] {
            encode_end_of_stream(kind::STDIN, id, &mut wire);
        }
        all(conn, &mut wire).expect("the connection stays usable")
    }

    #[test]
    fn three_interleaved_requests_without_multiplexing_run_one() {
        let mut conn = ServerConnection::new(Limits::default());
        let events = interleaved_three(&mut conn);
        let [Event::Request(req), Event::Stdin { id: 1, .. }, Event::StdinEnd { id: 1 }] =
            &events[..]
        else {
            panic!("{events:?}")
        };
        assert_eq!(req.params.get_str("N"), Some("1"));
        assert_eq!(
            &conn.take_output().expect("refusals")[..],
            &[cant_mpx(2), cant_mpx(3)].concat()[..]
        );
        assert_eq!(conn.active(), 1);
        assert!(!conn.end_request(1, 0, &mut BytesMut::new()));
        assert_eq!((conn.active(), conn.expects_input()), (0, false));
    }

    #[test]
    fn three_interleaved_requests_with_multiplexing_run_all() {
        let mut conn = ServerConnection::new(Limits {
            max_requests_per_conn: crate::MULTIPLEXED_REQUESTS_PER_CONN,
            ..Limits::default()
        });
        let events = interleaved_three(&mut conn);
        let order: Vec<(u16, &str)> = events
            .iter()
            .map(|e| match e {
                Event::Request(r) => (r.id, "request"),
                Event::Stdin { id, .. } => (*id, "stdin"),
                Event::StdinEnd { id } => (*id, "end"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            order,
            [
                (2, "request"),
                (1, "request"),
                (3, "request"),
                (3, "stdin"),
                (1, "stdin"),
                (2, "stdin"),
                (2, "end"),
                (3, "end"),
                (1, "end")
            ]
        );
        assert_eq!(conn.take_output(), None);
        assert_eq!(conn.active(), 3);
    }

    #[test]
    fn answered_requests_are_remembered_within_a_bound() {
        // A client that opens many requests on a connection that takes one at a time, and
        // never sends their streams: each is refused, and the connection stays usable.
        let mut conn = ServerConnection::new(Limits::default());
        let mut wire = BytesMut::new();
        for id in 1..=200 {
            begin(id, Role::Responder, true, &mut wire);
        }
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
        assert_eq!(conn.take_output().map(|o| o.len()), Some(199 * 16));
        assert_eq!(conn.slots.len(), 1 + MAX_DRAINING);
        // The latest refused ones still drain; the oldest are forgotten, and a record for one
        // of them is one for an unknown request.
        encode(kind::PARAMS, 200, b"late", &mut wire);
        params(1, &[], &mut wire);
        assert!(
            matches!(&all(&mut conn, &mut wire).expect("valid")[..], [Event::Request(r)] if r.id == 1)
        );
        encode(kind::PARAMS, 2, b"late", &mut wire);
        assert_eq!(
            all(&mut conn, &mut wire),
            Err(Error::UnknownRequest { id: 2 })
        );
    }

    fn small() -> Limits {
        Limits {
            max_params_bytes: 10,
            max_params: 2,
            ..Limits::default()
        }
    }

    #[test]
    fn params_over_the_limit_reject_the_request_and_keep_the_connection() {
        let mut conn = ServerConnection::new(small());
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        encode(kind::PARAMS, 1, &[1u8; 6], &mut wire);
        encode(kind::PARAMS, 1, &[1u8; 5], &mut wire);
        let rejected = Event::Rejected {
            id: 1,
            reason: Rejection::ParamsTooLarge { limit: 10 },
        };
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![rejected]));
        assert_eq!((conn.active(), conn.buffered_params()), (1, 0));
        // The rest of its params and its body are dropped, an abort too: the answer is owed.
        encode(kind::PARAMS, 1, &[1u8; 300], &mut wire);
        encode_end_of_stream(kind::PARAMS, 1, &mut wire);
        encode(kind::STDIN, 1, b"body", &mut wire);
        encode(kind::ABORT_REQUEST, 1, b"", &mut wire);
        encode_end_of_stream(kind::STDIN, 1, &mut wire);
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
        assert_eq!(conn.take_output(), None, "the core does not answer it");
        assert_eq!(conn.active(), 1);
        // The shell answers it like any request.
        let mut out = BytesMut::new();
        assert!(!conn.end_request(1, 0, &mut out), "keep_conn");
        assert_eq!(
            &out[..],
            b"\x01\x03\x00\x01\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
        );
        assert_eq!((conn.active(), conn.expects_input()), (0, false));
        // And the next request on the connection is served.
        begin(2, Role::Responder, false, &mut wire);
        params(2, &[("A", "b")], &mut wire);
        let events = all(&mut conn, &mut wire).expect("valid");
        assert!(matches!(&events[..], [Event::Request(r)] if r.params.get_str("A") == Some("b")));
    }

    #[test]
    fn a_rejected_request_answered_at_once_drains_the_rest() {
        // What the worker does: answer on the Rejected event, before the client is done.
        let mut conn = ServerConnection::new(small());
        let mut wire = BytesMut::new();
        begin(1, Role::Filter, false, &mut wire);
        params(1, &[("a", ""), ("b", ""), ("c", "")], &mut wire);
        let rejected = Event::Rejected {
            id: 1,
            reason: Rejection::TooManyParams { limit: 2 },
        };
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![rejected]));
        assert!(conn.end_request(1, 0, &mut BytesMut::new()), "no keep_conn");
        assert!(conn.expects_input(), "its body is still coming");
        encode(kind::STDIN, 1, b"body", &mut wire);
        encode(kind::DATA, 1, b"data", &mut wire);
        encode_end_of_stream(kind::STDIN, 1, &mut wire);
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
        assert!(!conn.expects_input());
    }

    #[test]
    fn params_exactly_at_the_limits_are_accepted() {
        // Two pairs of 2 + 1 + 2 bytes: 10 bytes, the limit, in two records.
        let mut raw = BytesMut::new();
        params::encode_pair(b"a", b"12", &mut raw);
        params::encode_pair(b"b", b"34", &mut raw);
        assert_eq!(raw.len(), 10);
        let mut conn = ServerConnection::new(small());
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        encode(kind::PARAMS, 1, &raw[..4], &mut wire);
        encode(kind::PARAMS, 1, &raw[4..], &mut wire);
        encode_end_of_stream(kind::PARAMS, 1, &mut wire);
        let events = all(&mut conn, &mut wire).expect("valid");
        assert!(matches!(&events[..], [Event::Request(r)] if r.params.len() == 2));

        // One byte more is over.
        let mut conn = ServerConnection::new(small());
        begin(1, Role::Responder, true, &mut wire);
        encode(kind::PARAMS, 1, &raw, &mut wire);
        encode(kind::PARAMS, 1, b"c", &mut wire);
        assert_eq!(
            all(&mut conn, &mut wire),
            Ok(vec![Event::Rejected {
                id: 1,
                reason: Rejection::ParamsTooLarge { limit: 10 }
            }])
        );
    }

    #[test]
    fn ten_megabytes_of_params_are_dropped_not_buffered() {
        let limits = Limits::default();
        let mut conn = ServerConnection::new(limits);
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        let chunk = vec![b'x'; record::MAX_ALIGNED_CONTENT_LEN];
        let mut events = all(&mut conn, &mut wire).expect("valid");
        let mut sent = 0;
        let mut most_held = 0;
        while sent < 10 << 20 {
            // Fed one record at a time, as reads would: the input buffer never holds them.
            encode(kind::PARAMS, 1, &chunk, &mut wire);
            sent += chunk.len();
            events.extend(all(&mut conn, &mut wire).expect("valid"));
            assert!(wire.is_empty());
            most_held = most_held.max(conn.buffered_params());
        }
        assert!(
            most_held <= 2 * limits.max_params_bytes,
            "held {most_held} bytes"
        );
        assert_eq!(conn.buffered_params(), 0, "dropped once rejected");
        assert_eq!(
            events,
            [Event::Rejected {
                id: 1,
                reason: Rejection::ParamsTooLarge {
                    limit: limits.max_params_bytes
                }
            }]
        );
        encode_end_of_stream(kind::PARAMS, 1, &mut wire);
        encode_end_of_stream(kind::STDIN, 1, &mut wire);
        assert_eq!(all(&mut conn, &mut wire), Ok(vec![]));
        assert!(!conn.end_request(1, 0, &mut BytesMut::new()));
        begin(2, Role::Responder, true, &mut wire);
        params(2, &[("A", "b")], &mut wire);
        assert!(
            matches!(&all(&mut conn, &mut wire).expect("valid")[..], [Event::Request(r)] if r.id == 2)
        );
    }
}
