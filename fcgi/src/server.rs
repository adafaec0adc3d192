//! Request assembly for the application side: records in, events out, no I/O.
//!
//! [`ServerConnection::handle`] takes one record and yields at most one [`Event`]; the PARAMS
//! stream is gathered (it is small and bounded) and delivered whole with the request, while STDIN
//! and DATA are passed on record by record, so a body is never required to be buffered.
//! Management replies (GET_VALUES_RESULT, UNKNOWN_TYPE) and rejections (END_REQUEST with
//! UNKNOWN_ROLE or CANT_MPX_CONN) queue in an output buffer the shell drains with
//! [`ServerConnection::take_output`].

use bytes::{Bytes, BytesMut};

use crate::params::{self, Params};
use crate::record::{self, kind, ProtocolStatus, Record, Role, NULL_REQUEST_ID};
use crate::{Error, Limits};

/// A request whose PARAMS stream is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request id, unique among this connection's active requests.
    pub id: u16,
    /// The role asked for (never [`Role::Unknown`]: those are rejected here).
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
}

#[derive(Debug)]
enum Phase {
    /// Gathering the PARAMS stream.
    Params(BytesMut),
    /// Params delivered; the application is running the request.
    Running { stdin_done: bool, data_done: bool },
    /// END_REQUEST is sent; what the client still sends of the body is drained, not an error.
    Finished,
    /// Refused at BEGIN; its streams are drained until STDIN ends.
    Rejected,
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
            match self.slots[i].phase {
                // The client may reuse an id once END_REQUEST went out, even before we saw the
                // end of the old body.
                Phase::Finished | Phase::Rejected => {
                    self.slots.swap_remove(i);
                }
                _ => return Err(Error::DuplicateRequest { id }),
            }
        }
        // Rejected and finished-but-draining slots count too, so the table stays bounded.
        let table_limit = self.limits.max_requests_per_conn.saturating_mul(2).max(2);
        if self.slots.len() >= table_limit {
            return Err(Error::TooManyRequests { limit: table_limit });
        }
        let running = self
            .slots
            .iter()
            .filter(|s| matches!(s.phase, Phase::Params(_) | Phase::Running { .. }))
            .count();
        let refusal = if matches!(role, Role::Unknown(_)) {
            Some(ProtocolStatus::UnknownRole)
        } else if running >= self.limits.max_requests_per_conn {
            Some(if self.limits.max_requests_per_conn == 1 {
                ProtocolStatus::CantMpxConn
            } else {
                ProtocolStatus::Overloaded
            })
        } else {
            None
        };
        let phase = match refusal {
            Some(status) => {
                record::encode_end_request(id, 0, status, &mut self.out);
                Phase::Rejected
            }
            None => Phase::Params(BytesMut::new()),
        };
        self.slots.push(Slot {
            id,
            role,
            keep_conn,
            phase,
        });
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
        let max_params_bytes = self.limits.max_params_bytes;
        let max_params = self.limits.max_params;
        let slot = &mut self.slots[i];
        let t = rec.record_type;
        if t == kind::ABORT_REQUEST {
            record::expect_len(&rec, 0)?;
        }
        match (&mut slot.phase, t) {
            (Phase::Finished | Phase::Rejected, _) => {
                if t == kind::STDIN && rec.content.is_empty() {
                    self.slots.swap_remove(i);
                }
                Ok(None)
            }
            (Phase::Params(_), kind::ABORT_REQUEST) => {
                // Nothing was handed to the application yet: end it here.
                record::encode_end_request(id, 0, ProtocolStatus::RequestComplete, &mut self.out);
                slot.phase = Phase::Finished;
                Ok(None)
            }
            (Phase::Params(buf), kind::PARAMS) => {
                if rec.content.is_empty() {
                    let raw = std::mem::take(buf).freeze();
                    let params = Params::decode(raw, max_params)?;
                    slot.phase = Phase::Running {
                        stdin_done: false,
                        data_done: slot.role != Role::Filter,
                    };
                    return Ok(Some(Event::Request(Request {
                        id,
                        role: slot.role,
                        keep_conn: slot.keep_conn,
                        params,
                    })));
                }
                if buf.len() + rec.content.len() > max_params_bytes {
                    return Err(Error::ParamsTooLarge {
                        limit: max_params_bytes,
                    });
                }
                buf.extend_from_slice(&rec.content);
                Ok(None)
            }
            (Phase::Params(_), _) => Err(Error::StdinBeforeParams { id }),
            (Phase::Running { .. }, kind::PARAMS) => {
                Err(Error::StreamAfterEnd { record_type: t, id })
            }
            (Phase::Running { .. }, kind::ABORT_REQUEST) => Ok(Some(Event::Abort { id })),
            (Phase::Running { stdin_done, .. }, kind::STDIN) => {
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
            (Phase::Running { data_done, .. }, _) => {
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

    /// Writes END_REQUEST for `id` into `dst` and forgets the request once its body has been
    /// read. Returns true when the connection should close after this write: the client did not
    /// set `FCGI_KEEP_CONN` and no other request is open.
    pub fn end_request(&mut self, id: u16, app_status: u32, dst: &mut BytesMut) -> bool {
        record::encode_end_request(id, app_status, ProtocolStatus::RequestComplete, dst);
        if let Some(i) = self.position(id) {
            let done = matches!(
                self.slots[i].phase,
                Phase::Running {
                    stdin_done: true,
                    ..
                }
            );
            if !self.slots[i].keep_conn {
                // "If zero, the application closes the connection after responding."
                self.close_after_idle = true;
            }
            if done {
                self.slots.swap_remove(i);
            } else {
                self.slots[i].phase = Phase::Finished;
            }
        }
        self.close_after_idle && self.active() == 0
    }

    /// Requests the application is running or about to run (not finished, not rejected).
    pub fn active(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.phase, Phase::Params(_) | Phase::Running { .. }))
            .count()
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

    fn answer_get_values(&mut self, content: Bytes) -> Result<(), Error> {
        let asked = Params::decode(content, self.limits.max_params)?;
        let mut body = Vec::new();
        for (name, _) in asked.iter() {
            let value = match name {
                b"FCGI_MAX_CONNS" => self.limits.max_conns,
                b"FCGI_MAX_REQS" => self.limits.max_reqs,
                b"FCGI_MPXS_CONNS" => usize::from(self.limits.max_requests_per_conn > 1),
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

    #[test]
    fn get_values_between_params_records_is_answered_with_the_limits() {
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        encode(kind::PARAMS, 1, b"\x01\x01ab", &mut wire);
        wire.extend_from_slice(
            b"\x01\x09\x00\x00\x00\x36\x02\x00\x0e\x00FCGI_MAX_CONNS\x0d\x00FCGI_MAX_REQS\x0f\x00FCGI_MPXS_CONNS\x04\x00NOPE\x00\x00",
        );
        encode_end_of_stream(kind::PARAMS, 1, &mut wire);
        let mut conn = ServerConnection::new(limits());
        let events = all(&mut conn, &mut wire).expect("valid");
        assert!(matches!(&events[0], Event::Request(r) if r.params.get_str("a") == Some("b")));
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
        assert_eq!(values.len(), 3, "unknown names are left out");
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

        let mut one = ServerConnection::new(Limits {
            max_requests_per_conn: 1,
            ..limits()
        });
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        begin(2, Role::Responder, true, &mut wire);
        all(&mut one, &mut wire).expect("valid");
        assert_eq!(
            one.take_output().expect("refusal")[12],
            1,
            "FCGI_CANT_MPX_CONN"
        );
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
    fn params_limits() {
        let small = Limits {
            max_params_bytes: 10,
            max_params: 2,
            ..limits()
        };
        let mut conn = ServerConnection::new(small);
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        encode(kind::PARAMS, 1, &[1u8; 11], &mut wire);
        assert_eq!(
            all(&mut conn, &mut wire),
            Err(Error::ParamsTooLarge { limit: 10 })
        );

        let mut conn = ServerConnection::new(small);
        let mut wire = BytesMut::new();
        begin(1, Role::Responder, true, &mut wire);
        params(1, &[("a", ""), ("b", ""), ("c", "")], &mut wire);
        assert_eq!(
            all(&mut conn, &mut wire),
            Err(Error::TooManyParams { limit: 2 })
        );
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
    fn too_many_open_requests_even_refused_ones() {
        let mut conn = ServerConnection::new(Limits {
            max_requests_per_conn: 1,
            ..limits()
        });
        let mut wire = BytesMut::new();
        for id in 1..=3 {
            begin(id, Role::Responder, true, &mut wire);
        }
        assert_eq!(
            all(&mut conn, &mut wire),
            Err(Error::TooManyRequests { limit: 2 })
        );
    }
}
