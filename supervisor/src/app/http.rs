//! What an async service (`serve`) sees: the FastCGI request as an `http::Request` whose body
//! is a [`RequestBody`] streaming STDIN as it arrives, with the CGI variables, the role and the
//! remote address as extensions. Nothing is parsed twice: nginx already parsed the HTTP, and
//! its CGI variables map one to one onto the request's parts.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use fcgi::Params;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

use crate::app::body::BodyReader;
use crate::app::request::Request;

/// The request an async service is called with.
pub type HttpRequest = http::Request<RequestBody>;

/// The client's address, from `REMOTE_ADDR` and `REMOTE_PORT`, as a request extension (absent
/// when the web server sent no valid `REMOTE_ADDR`). With the `axum` feature the same address is
/// also there as axum's `ConnectInfo<SocketAddr>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// The request body of an async service: the STDIN records as they arrive. The connection
/// stops reading the socket while this body is not polled, so a slow service slows the client
/// instead of growing memory.
#[derive(Debug)]
pub struct RequestBody {
    rx: Option<mpsc::Receiver<Bytes>>,
    /// Bytes already in memory, returned first.
    first: Bytes,
    /// `CONTENT_LENGTH` minus what was returned: the body is cut short if the stream ends
    /// before it reaches 0.
    remaining: Option<u64>,
}

/// The request body ended before `CONTENT_LENGTH` bytes arrived: the client or the web server
/// went away (or aborted the request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    /// Bytes that were still expected.
    pub missing: u64,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request body cut short: {} bytes of CONTENT_LENGTH never arrived (client gone)",
            self.missing
        )
    }
}

impl std::error::Error for BodyError {}

impl RequestBody {
    pub(crate) fn new(reader: BodyReader, content_length: Option<u64>) -> RequestBody {
        let (rx, first) = reader.into_parts();
        RequestBody {
            rx,
            first,
            remaining: content_length,
        }
    }

    /// A body of bytes already in memory (for tests of services).
    pub fn from_bytes(bytes: impl Into<Bytes>) -> RequestBody {
        let first = bytes.into();
        RequestBody {
            remaining: Some(first.len() as u64),
            rx: None,
            first,
        }
    }

    /// An empty body.
    pub fn empty() -> RequestBody {
        RequestBody::from_bytes(Bytes::new())
    }

    fn took(&mut self, n: usize) {
        if let Some(r) = &mut self.remaining {
            *r = r.saturating_sub(n as u64);
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let chunk = std::mem::take(&mut this.first);
            this.took(chunk.len());
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some(chunk)) => {
                this.took(chunk.len());
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(None) => {
                this.rx = None;
                match this.remaining {
                    Some(missing) if missing > 0 => {
                        this.remaining = Some(0);
                        Poll::Ready(Some(Err(BodyError { missing })))
                    }
                    _ => Poll::Ready(None),
                }
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_empty() && (self.rx.is_none() || self.remaining == Some(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The CGI request as an `http::Request`: method, URI (absolute when the web server says the
/// scheme and the host, so `Host`, `OriginalUri` and `Query` extractors see what the client
/// sent), version, headers, and the CGI variables, the role and the remote address as
/// extensions.
pub(crate) fn to_http(request: Request) -> HttpRequest {
    let Request {
        role, params, body, ..
    } = request;
    let content_length = params
        .get_str("CONTENT_LENGTH")
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut req = http::Request::new(RequestBody::new(body, content_length));
    *req.method_mut() = params
        .get("REQUEST_METHOD")
        .and_then(|m| Method::from_bytes(m).ok())
        .unwrap_or(Method::GET);
    *req.uri_mut() = uri(&params);
    *req.version_mut() = version(params.get_str("SERVER_PROTOCOL"));
    *req.headers_mut() = headers(&params);
    let remote = remote_addr(&params);
    let ext = req.extensions_mut();
    ext.insert(role);
    if let Some(addr) = remote {
        ext.insert(RemoteAddr(addr));
        #[cfg(feature = "axum")]
        ext.insert(axum::extract::ConnectInfo(addr));
    }
    ext.insert(params);
    req
}

/// `REQUEST_URI` (else `DOCUMENT_URI` plus `QUERY_STRING`), made absolute with the scheme from
/// `HTTPS` / `REQUEST_SCHEME` and the authority from `HTTP_HOST` (else `SERVER_NAME` and
/// `SERVER_PORT`); the path alone when either is missing or invalid.
fn uri(params: &Params) -> Uri {
    // `REQUEST_URI` is sliced out of the buffer the params arrived in, not copied: a service
    // that clones the URI (axum's `OriginalUri`) then shares it too.
    let target = match params.get_str("REQUEST_URI").filter(|u| !u.is_empty()) {
        Some(u) => shared(params, u.as_bytes()),
        None => {
            let path = params.get_str("DOCUMENT_URI").unwrap_or("/");
            match params.get_str("QUERY_STRING").filter(|q| !q.is_empty()) {
                Some(q) => Bytes::from(format!("{path}?{q}")),
                None => Bytes::copy_from_slice(path.as_bytes()),
            }
        }
    };
    let Ok(path) = PathAndQuery::from_maybe_shared(target) else {
        return Uri::from_static("/");
    };
    let https = params
        .get_str("HTTPS")
        .is_some_and(|v| !v.is_empty() && !v.eq_ignore_ascii_case("off"));
    let scheme = if https {
        Some(Scheme::HTTPS)
    } else {
        params
            .get_str("REQUEST_SCHEME")
            .and_then(|s| s.parse::<Scheme>().ok())
    };
    let authority = params
        .get("HTTP_HOST")
        .and_then(|h| Authority::from_maybe_shared(shared(params, h)).ok())
        .or_else(|| {
            let name = params.get_str("SERVER_NAME").filter(|n| !n.is_empty())?;
            let port = params.get_str("SERVER_PORT").filter(|p| !p.is_empty());
            let host = match port {
                Some(p) => format!("{name}:{p}"),
                None => name.to_string(),
            };
            host.parse::<Authority>().ok()
        });
    match (scheme, authority) {
        (Some(scheme), Some(authority)) if path.as_str().starts_with('/') => {
            let mut parts = Parts::default();
            parts.scheme = Some(scheme);
            parts.authority = Some(authority);
            parts.path_and_query = Some(path);
            // A scheme, an authority and an absolute path always make a URI.
            Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
        }
        _ => Uri::from(path),
    }
}

/// `value`, one of the params' values, as a slice of their buffer (a copy only for bytes
/// from elsewhere, which `Params` never hands out).
fn shared(params: &Params, value: &[u8]) -> Bytes {
    params
        .shared(value)
        .unwrap_or_else(|| Bytes::copy_from_slice(value))
}

fn version(protocol: Option<&str>) -> Version {
    match protocol {
        Some("HTTP/1.0") => Version::HTTP_10,
        Some("HTTP/2.0" | "HTTP/2") => Version::HTTP_2,
        Some("HTTP/3.0" | "HTTP/3") => Version::HTTP_3,
        Some("HTTP/0.9") => Version::HTTP_09,
        _ => Version::HTTP_11,
    }
}

/// The HTTP request headers: `HTTP_*` (`HTTP_X_FOO` is `x-foo`), `CONTENT_TYPE` and
/// `CONTENT_LENGTH`. Names or values that are not valid HTTP are dropped.
fn headers(params: &Params) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in params.iter() {
        let header = if let Some(rest) = name.strip_prefix(b"HTTP_") {
            header_name(rest)
        } else if name == b"CONTENT_TYPE" {
            Some(http::header::CONTENT_TYPE)
        } else if name == b"CONTENT_LENGTH" {
            Some(http::header::CONTENT_LENGTH)
        } else {
            None
        };
        if value.is_empty()
            && header.as_ref().is_some_and(|h| {
                h == http::header::CONTENT_LENGTH || h == http::header::CONTENT_TYPE
            })
        {
            // nginx sends both, empty, on every request without a body.
            continue;
        }
        // The value is looked at only for a header (every other CGI variable is skipped), and
        // shares the params' buffer.
        if let Some(n) = header {
            if let Ok(v) = HeaderValue::from_maybe_shared(shared(params, value)) {
                map.append(n, v);
            }
        }
    }
    map
}

/// The header an `HTTP_*` variable stands for: `X_FORWARDED_FOR` is `x-forwarded-for`.
fn header_name(var: &[u8]) -> Option<HeaderName> {
    // Header names fit on the stack; a longer one (nginx allows them) takes the heap.
    let mut stack = [0u8; 64];
    let mut heap = Vec::new();
    let name = if var.len() <= stack.len() {
        &mut stack[..var.len()]
    } else {
        heap.resize(var.len(), 0);
        &mut heap[..]
    };
    for (to, &from) in name.iter_mut().zip(var) {
        *to = if from == b'_' {
            b'-'
        } else {
            from.to_ascii_lowercase()
        };
    }
    HeaderName::from_bytes(name).ok()
}

fn remote_addr(params: &Params) -> Option<SocketAddr> {
    let ip: IpAddr = params.get_str("REMOTE_ADDR")?.parse().ok()?;
    let port = params
        .get_str("REMOTE_PORT")
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fcgi::Role;
    use http_body::Body as _;
    use std::future::poll_fn;

    fn params(pairs: &[(&str, &str)]) -> Params {
        Params::from_pairs(pairs.iter().copied())
    }

    fn request(pairs: &[(&str, &str)], body: BodyReader) -> Request {
        Request {
            role: Role::Responder,
            params: params(pairs),
            body,
            data: BodyReader::empty(),
        }
    }

    #[test]
    fn the_uri_is_absolute_with_scheme_and_host() {
        let req = to_http(request(
            &[
                ("REQUEST_METHOD", "POST"),
                ("REQUEST_URI", "/items/7?x=1&y=%20"),
                ("HTTPS", "on"),
                ("HTTP_HOST", "example.com:8443"),
                ("SERVER_PROTOCOL", "HTTP/2.0"),
                ("CONTENT_TYPE", "application/json"),
                ("CONTENT_LENGTH", "2"),
                ("HTTP_X_FORWARDED_FOR", "10.0.0.1"),
                ("REMOTE_ADDR", "::1"),
                ("REMOTE_PORT", "5555"),
            ],
            BodyReader::from_bytes("{}"),
        ));
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri().to_string(),
            "https://example.com:8443/items/7?x=1&y=%20"
        );
        assert_eq!(req.uri().query(), Some("x=1&y=%20"));
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.headers()["host"], "example.com:8443");
        assert_eq!(req.headers()["content-type"], "application/json");
        assert_eq!(req.headers()["x-forwarded-for"], "10.0.0.1");
        assert_eq!(
            req.extensions().get::<RemoteAddr>(),
            Some(&RemoteAddr("[::1]:5555".parse().expect("addr")))
        );
        assert_eq!(req.extensions().get::<Role>(), Some(&Role::Responder));
        let raw = req.extensions().get::<Params>().expect("params");
        assert_eq!(raw.get_str("REQUEST_URI"), Some("/items/7?x=1&y=%20"));
        assert_eq!(req.body().size_hint().exact(), Some(2));
    }

    #[test]
    fn without_a_host_the_uri_is_the_path_and_empty_cgi_headers_are_dropped() {
        let req = to_http(request(
            &[
                ("REQUEST_URI", "/hello"),
                ("CONTENT_TYPE", ""),
                ("CONTENT_LENGTH", ""),
                ("SERVER_PROTOCOL", "HTTP/1.0"),
            ],
            BodyReader::empty(),
        ));
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().to_string(), "/hello");
        assert_eq!(req.version(), Version::HTTP_10);
        assert!(req.headers().is_empty(), "{:?}", req.headers());
        let scheme_from_request = to_http(request(
            &[
                ("REQUEST_URI", "/a"),
                ("REQUEST_SCHEME", "http"),
                ("SERVER_NAME", "localhost"),
                ("SERVER_PORT", "8080"),
            ],
            BodyReader::empty(),
        ));
        assert_eq!(
            scheme_from_request.uri().to_string(),
            "http://localhost:8080/a"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_a_whole_one_ends_cleanly() {
        let (tx, rx) = mpsc::channel(4);
        let mut body = RequestBody::new(BodyReader::new(rx), Some(5));
        tx.send(Bytes::from_static(b"abc")).await.expect("open");
        drop(tx);
        let mut body = Pin::new(&mut body);
        let first = poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        let data = first
            .expect("a frame")
            .expect("ok")
            .into_data()
            .expect("data");
        assert_eq!(&data[..], b"abc");
        assert_eq!(body.size_hint().exact(), Some(2));
        let cut = poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert_eq!(cut.expect("an error").err(), Some(BodyError { missing: 2 }));

        let (tx, rx) = mpsc::channel(4);
        let mut whole = RequestBody::new(BodyReader::new(rx), Some(3));
        tx.send(Bytes::from_static(b"abc")).await.expect("open");
        drop(tx);
        let mut whole = Pin::new(&mut whole);
        assert!(poll_fn(|cx| whole.as_mut().poll_frame(cx)).await.is_some());
        assert!(whole.is_end_stream());
        assert!(poll_fn(|cx| whole.as_mut().poll_frame(cx)).await.is_none());
    }
}
