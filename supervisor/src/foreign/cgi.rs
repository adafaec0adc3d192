//! The CGI header block a foreign program writes (`Status: 404 Not Found`, `Content-Type: ...`,
//! a blank line), read into the `http` response the worker encodes again. Pure: unit-tested.

use http::{HeaderName, HeaderValue, StatusCode};

/// Where the header block ends in `stdout`: the offset of the body, if the blank line has
/// arrived. CGI allows LF or CRLF line ends.
pub(crate) fn head_end(stdout: &[u8]) -> Option<usize> {
    let mut line_start = 0;
    for (i, &b) in stdout.iter().enumerate() {
        if b != b'\n' {
            continue;
        }
        let line = &stdout[line_start..i];
        if line.is_empty() || line == b"\r" {
            return Some(i + 1);
        }
        line_start = i + 1;
    }
    None
}

/// The status and headers of a header block; the names of lines that could not be used.
pub(crate) fn parse_head(head: &[u8]) -> (http::response::Parts, Vec<String>) {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    let mut skipped = Vec::new();
    let mut status = None;
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            skipped.push(String::from_utf8_lossy(line).into_owned());
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"status") {
            match value
                .get(..3)
                .and_then(|code| StatusCode::from_bytes(code).ok())
            {
                Some(code) => status = Some(code),
                None => skipped.push(String::from_utf8_lossy(line).into_owned()),
            }
            continue;
        }
        match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            (Ok(name), Ok(value)) => {
                parts.headers.append(name, value);
            }
            _ => skipped.push(String::from_utf8_lossy(line).into_owned()),
        }
    }
    // CGI (RFC 3875 6.2.3) and nginx: a Location without a Status is a redirect.
    parts.status = match status {
        Some(code) => code,
        None if parts.headers.contains_key(http::header::LOCATION) => StatusCode::FOUND,
        None => StatusCode::OK,
    };
    (parts, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_ends_at_the_first_blank_line_with_either_line_end() {
        assert_eq!(head_end(b"A: b\r\n\r\nbody"), Some(8));
        assert_eq!(head_end(b"A: b\n\nbody\n\n"), Some(6));
        assert_eq!(head_end(b"\r\nbody"), Some(2));
        assert_eq!(head_end(b"A: b\r\nC: d\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn status_headers_and_duplicates_are_kept() {
        let (parts, skipped) = parse_head(
            b"Status: 404 Not Found\r\nContent-type: text/html\r\nSet-Cookie: a=1\r\n\
              Set-Cookie: b=2\r\nX-Powered-By: PHP/8.2\r\n",
        );
        assert_eq!(parts.status, StatusCode::NOT_FOUND);
        assert_eq!(parts.headers["content-type"], "text/html");
        assert_eq!(parts.headers.get_all("set-cookie").iter().count(), 2);
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn a_location_without_status_redirects_and_bad_lines_are_named() {
        let (parts, skipped) = parse_head(b"Location: /there\nno colon here\nStatus: abc\n");
        assert_eq!(parts.status, StatusCode::FOUND);
        assert_eq!(skipped, vec!["no colon here", "Status: abc"]);
        let (parts, _) = parse_head(b"Content-Type: text/plain\n");
        assert_eq!(parts.status, StatusCode::OK);
    }
}
