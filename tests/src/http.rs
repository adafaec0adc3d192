//! A small blocking HTTP/1.1 client: enough to talk to nginx the way a browser or curl would,
//! including chunked request bodies and large headers. One request per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// How the request body is sent.
pub enum Body<'a> {
    /// No body.
    None,
    /// With Content-Length.
    Bytes(&'a [u8]),
    /// With Transfer-Encoding: chunked, in chunks of the given size.
    Chunked(&'a [u8], usize),
}

/// A response.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name`, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request to 127.0.0.1:`port` and reads the whole response.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    match body {
        Body::None => {}
        Body::Bytes(b) => head.push_str(&format!("Content-Length: {}\r\n", b.len())),
        Body::Chunked(..) => head.push_str("Transfer-Encoding: chunked\r\n"),
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    match body {
        Body::None => {}
        Body::Bytes(b) => s.write_all(b)?,
        Body::Chunked(b, size) => {
            for chunk in b.chunks(size.max(1)) {
                s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                s.write_all(chunk)?;
                s.write_all(b"\r\n")?;
            }
            s.write_all(b"0\r\n\r\n")?;
        }
    }
    read_response(BufReader::new(s))
}

/// GET `path`.
pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    request(port, "GET", path, &[], Body::None)
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn read_response(mut r: BufReader<TcpStream>) -> std::io::Result<Response> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&line))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').ok_or_else(|| bad(l))?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let mut res = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if res
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(&line))?;
            if size == 0 {
                break;
            }
            let start = res.body.len();
            res.body.resize(start + size, 0);
            r.read_exact(&mut res.body[start..])?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(len) = res
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        res.body.resize(len, 0);
        r.read_exact(&mut res.body)?;
    } else if method_has_body(status) {
        r.read_to_end(&mut res.body)?;
    }
    Ok(res)
}

fn method_has_body(status: u16) -> bool {
    !(status == 204 || status == 304 || (100..200).contains(&status))
}
