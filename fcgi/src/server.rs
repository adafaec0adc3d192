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
            let value = match &name[..] {
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
