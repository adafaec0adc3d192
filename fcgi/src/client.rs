//! The web server's side: encode a request, decode the response. Used by the project's tests,
//! health checks and load generator; nginx plays this part in production.

use bytes::{Bytes, BytesMut};

use crate::params::Params;
use crate::record::{self, kind, ProtocolStatus, Role, MAX_ALIGNED_CONTENT_LEN};
use crate::Error;

/// Writes a whole request: BEGIN_REQUEST, the PARAMS stream, the STDIN stream.
pub fn encode_request(
    id: u16,
    role: Role,
    keep_conn: bool,
    params: &Params,
    stdin: &[u8],
    dst: &mut BytesMut,
) {
    record::encode_begin_request(id, role, keep_conn, dst);
    encode_params(id, params, dst);
    encode_stream_with_end(kind::STDIN, id, stdin, dst);
}

/// Writes the PARAMS stream and its terminator. Pairs are encoded back to back and cut into
/// records at fixed sizes, so a long pair straddles records exactly as nginx and libfcgi do it.
pub fn encode_params(id: u16, params: &Params, dst: &mut BytesMut) {
    let mut raw = BytesMut::with_capacity(params.encoded_len());
    params.encode(&mut raw);
    encode_stream_with_end(kind::PARAMS, id, &raw, dst);
}

/// Writes `data` as a stream of `record_type` and then the empty record that ends it.
pub fn encode_stream_with_end(record_type: u8, id: u16, data: &[u8], dst: &mut BytesMut) {
    record::encode_stream(record_type, id, data, dst);
    record::encode_end_of_stream(record_type, id, dst);
}

/// Writes GET_VALUES asking for `names`.
pub fn encode_get_values(names: &[&str], dst: &mut BytesMut) {
    let mut body = BytesMut::new();
    for name in names {
        crate::params::encode_pair(name.as_bytes(), b"", &mut body);
    }
    debug_assert!(body.len() <= MAX_ALIGNED_CONTENT_LEN);
    record::encode(kind::GET_VALUES, record::NULL_REQUEST_ID, &body, dst);
}

/// What the application sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Response bytes (empty: the stream ended).
    Stdout {
        /// The request id.
        id: u16,
        /// The bytes.
        data: Bytes,
    },
    /// Error-log bytes (empty: the stream ended).
    Stderr {
        /// The request id.
        id: u16,
        /// The bytes.
        data: Bytes,
    },
    /// The request is over.
    End {
        /// The request id.
        id: u16,
        /// The application's exit status.
        app_status: u32,
        /// How the protocol ended it.
        protocol_status: ProtocolStatus,
    },
    /// The answer to GET_VALUES.
    Values(Params),
    /// The application did not understand a record type we sent.
    UnknownType(u8),
}

/// Decodes the next event the application sent: `Ok(None)` when more bytes are needed.
pub fn decode_event(src: &mut BytesMut) -> Result<Option<ClientEvent>, Error> {
    let Some(rec) = record::decode(src)? else {
        return Ok(None);
    };
    let id = rec.request_id;
    let event = match rec.record_type {
        kind::STDOUT => ClientEvent::Stdout {
            id,
            data: rec.content,
        },
        kind::STDERR => ClientEvent::Stderr {
            id,
            data: rec.content,
        },
        kind::END_REQUEST => {
            let (app_status, protocol_status) = record::parse_end_request(&rec)?;
            ClientEvent::End {
                id,
                app_status,
                protocol_status,
            }
        }
        kind::GET_VALUES_RESULT => ClientEvent::Values(Params::decode(rec.content, usize::MAX)?),
        kind::UNKNOWN_TYPE => {
            record::expect_len(&rec, 8)?;
            ClientEvent::UnknownType(rec.content[0])
        }
        t => return Err(Error::UnexpectedRecord { record_type: t }),
    };
    Ok(Some(event))
}

/// A complete response to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// Everything the application wrote to STDOUT: CGI headers, a blank line, the body.
    pub stdout: Vec<u8>,
    /// Everything written to STDERR.
    pub stderr: Vec<u8>,
    /// The app status of END_REQUEST.
    pub app_status: u32,
    /// The protocol status of END_REQUEST (`None` before it arrived).
    pub protocol_status: Option<ProtocolStatus>,
}

impl Response {
    /// Feeds one event for this response's request; true once END_REQUEST arrived.
    pub fn push(&mut self, event: ClientEvent) -> bool {
        match event {
            ClientEvent::Stdout { data, .. } => self.stdout.extend_from_slice(&data),
            ClientEvent::Stderr { data, .. } => self.stderr.extend_from_slice(&data),
            ClientEvent::End {
                app_status,
                protocol_status,
                ..
            } => {
                self.app_status = app_status;
                self.protocol_status = Some(protocol_status);
                return true;
            }
            ClientEvent::Values(_) | ClientEvent::UnknownType(_) => {}
        }
        false
    }

    /// The CGI header block split from the body: lines (without CRLF) and the body.
    fn split(&self) -> (Vec<&[u8]>, &[u8]) {
        let out = &self.stdout[..];
        let (head, body) = match find(out, b"\r\n\r\n") {
            Some(i) => (&out[..i], &out[i + 4..]),
            None => match find(out, b"\n\n") {
                Some(i) => (&out[..i], &out[i + 2..]),
                None => (out, &out[out.len()..]),
            },
        };
        let lines = head
            .split(|&b| b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.is_empty())
            .collect();
        (lines, body)
    }

    /// The CGI headers as (name, value) text.
    pub fn headers(&self) -> Vec<(String, String)> {
        self.split()
            .0
            .into_iter()
            .filter_map(|line| {
                let line = String::from_utf8_lossy(line);
                let (name, value) = line.split_once(':')?;
                Some((name.trim().to_string(), value.trim().to_string()))
            })
            .collect()
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers()
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The HTTP status the `Status:` header gives, 200 when absent (CGI/1.1 rule).
    pub fn status(&self) -> u16 {
        self.header("Status")
            .and_then(|s| s.split_whitespace().next().and_then(|c| c.parse().ok()))
            .unwrap_or(200)
    }

    /// The body after the header block.
    pub fn body(&self) -> &[u8] {
        self.split().1
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads events for request `id` from `src` into `response`; true once it is complete.
pub fn read_response(src: &mut BytesMut, id: u16, response: &mut Response) -> Result<bool, Error> {
    while let Some(event) = decode_event(src)? {
        let for_us = match &event {
            ClientEvent::Stdout { id: i, .. }
            | ClientEvent::Stderr { id: i, .. }
            | ClientEvent::End { id: i, .. } => *i == id,
            _ => false,
        };
        if for_us && response.push(event) {
            return Ok(true);
        }
    }
    Ok(false)
}
