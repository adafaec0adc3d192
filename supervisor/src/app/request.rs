//! What the application sees of a request: the CGI variables, HTTP-shaped accessors over them,
//! and its body (a [`BodyReader`], see `body.rs`).

use std::io::{self, Read};

use bytes::Bytes;
use fcgi::{Params, Role};

use crate::app::body::BodyReader;

/// The most `body_bytes` reserves up front from `CONTENT_LENGTH`: the header is the client's
/// word, and a large claim must not allocate before a byte of the body has arrived.
const BODY_PREALLOC_MAX: u64 = 1 << 20;

/// One request, as the web server passed it.
#[derive(Debug)]
pub struct Request {
    pub(crate) role: Role,
    pub(crate) params: Params,
    pub(crate) body: BodyReader,
    pub(crate) data: BodyReader,
}

impl Request {
    /// The FastCGI role: almost always [`Role::Responder`].
    pub fn role(&self) -> Role {
        self.role
    }

    /// `REQUEST_METHOD`, e.g. `GET` (`GET` when the web server sent none).
    pub fn method(&self) -> http::Method {
        self.params
            .get("REQUEST_METHOD")
            .and_then(|m| http::Method::from_bytes(m).ok())
            .unwrap_or(http::Method::GET)
    }

    /// The path of the request, without the query: `DOCUMENT_URI`, else `SCRIPT_NAME` +
    /// `PATH_INFO`, else `REQUEST_URI` up to `?`.
    pub fn path(&self) -> &str {
        if let Some(p) = self
            .params
            .get_str("DOCUMENT_URI")
            .filter(|p| !p.is_empty())
        {
            return p;
        }
        if let Some(p) = self.params.get_str("SCRIPT_NAME").filter(|p| !p.is_empty()) {
            return p;
        }
        let uri = self.uri();
        uri.split('?').next().unwrap_or(uri)
    }

    /// `QUERY_STRING`, empty when absent.
    pub fn query(&self) -> &str {
        self.params.get_str("QUERY_STRING").unwrap_or("")
    }

    /// One query parameter's raw value (not percent-decoded): `query_param("ms")` on `ms=5`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query().split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }

    /// `REQUEST_URI` as the client sent it (path and query), empty when absent.
    pub fn uri(&self) -> &str {
        self.params.get_str("REQUEST_URI").unwrap_or("")
    }

    /// An HTTP request header by name (`content-type` and `content-length` come from their CGI
    /// variables, the rest from `HTTP_*`), if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        let var = header_var(name);
        self.params.get_str(var)
    }

    /// Every HTTP request header, rebuilt from the CGI variables.
    pub fn headers(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in self.params.iter() {
            let header = if let Some(rest) = name.strip_prefix(b"HTTP_") {
                rest.to_ascii_lowercase()
                    .into_iter()
                    .map(|b| if b == b'_' { b'-' } else { b })
                    .collect::<Vec<u8>>()
            } else if name == b"CONTENT_TYPE" {
                b"content-type".to_vec()
            } else if name == b"CONTENT_LENGTH" {
                b"content-length".to_vec()
            } else {
                continue;
            };
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(&header),
                http::HeaderValue::from_bytes(value),
            ) {
                map.append(n, v);
            }
        }
        map
    }

    /// A CGI variable, raw bytes (binary-safe).
    pub fn param(&self, name: &str) -> Option<&[u8]> {
        self.params.get(name)
    }

    /// Every CGI variable, in the order received, duplicates included.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// `CONTENT_LENGTH`, if the web server sent a valid one.
    pub fn content_length(&self) -> Option<u64> {
        self.params
            .get_str("CONTENT_LENGTH")
            .and_then(|v| v.parse().ok())
    }

    /// The request body, read as it arrives: memory stays bounded however large it is.
    pub fn body(&mut self) -> &mut BodyReader {
        &mut self.body
    }

    /// Takes the body out of the request, to move it into a streamed response.
    pub fn take_body(&mut self) -> BodyReader {
        std::mem::replace(&mut self.body, BodyReader::empty())
    }

    /// Reads the whole body into memory (for small bodies; prefer [`Request::body`]).
    pub fn body_bytes(&mut self) -> io::Result<Vec<u8>> {
        let mut v =
            Vec::with_capacity(self.content_length().unwrap_or(0).min(BODY_PREALLOC_MAX) as usize);
        self.body.read_to_end(&mut v)?;
        Ok(v)
    }

    /// The Filter role's DATA stream (the file to filter); empty for other roles.
    pub fn data(&mut self) -> &mut BodyReader {
        &mut self.data
    }
}

fn header_var(name: &str) -> String {
    if name.eq_ignore_ascii_case("content-type") {
        return "CONTENT_TYPE".into();
    }
    if name.eq_ignore_ascii_case("content-length") {
        return "CONTENT_LENGTH".into();
    }
    let mut var = String::with_capacity(5 + name.len());
    var.push_str("HTTP_");
    var.extend(name.chars().map(|c| {
        if c == '-' {
            '_'
        } else {
            c.to_ascii_uppercase()
        }
    }));
    var
}

impl Request {
    /// A request built in memory, for unit tests of a [`crate::Responder`].
    pub fn for_test(params: Params, body: impl Into<Bytes>) -> Request {
        Request {
            role: Role::Responder,
            params,
            body: BodyReader::from_bytes(body),
            data: BodyReader::empty(),
        }
    }
}
