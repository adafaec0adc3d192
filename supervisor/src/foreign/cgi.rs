//! The CGI header block a foreign program writes (`Status: 404 Not Found`, `Content-Type: ...`,
//! a blank line). It goes to nginx as the program wrote it (nginx parses it, as it does
//! PHP-FPM's); the worker only finds where it ends and reads the status, for its log, its
//! metrics and the status page. Pure: unit-tested.

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

/// The status a header block gives, as nginx reads it: its `Status` line, else 302 with a
/// `Location` (CGI, RFC 3875 6.2.3), else 200. A `Status` nginx cannot read counts as 502,
/// the answer nginx gives for it.
pub(crate) fn status_of(head: &[u8]) -> u16 {
    let mut location = false;
    for line in head.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii();
        let value = line[colon + 1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"status") {
            return value
                .get(..3)
                .and_then(|code| std::str::from_utf8(code).ok())
                .and_then(|code| code.parse::<u16>().ok())
                .filter(|code| (100..=999).contains(code))
                .unwrap_or(502);
        }
        location |= name.eq_ignore_ascii_case(b"location");
    }
    if location {
        302
    } else {
        200
    }
}

/// A header block the program ended without its blank line (all of its output was header
/// lines), completed so that nginx reads it as one.
pub(crate) fn complete(head: &mut Vec<u8>) {
    if !head.ends_with(b"\n") {
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
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
    fn the_status_line_wins_then_a_location_redirects() {
        assert_eq!(
            status_of(b"Content-type: text/html\r\nStatus: 404 Not Found\r\n\r\n"),
            404
        );
        assert_eq!(status_of(b"status:201\n\n"), 201);
        assert_eq!(status_of(b"Location: /there\nX-A: 1\n\n"), 302);
        assert_eq!(
            status_of(b"Location: /there\r\nStatus: 301 Moved\r\n\r\n"),
            301
        );
        assert_eq!(status_of(b"Content-Type: text/plain\n\n"), 200);
        assert_eq!(status_of(b"Status: abc\n\n"), 502);
        assert_eq!(status_of(b"Status: 42\n\n"), 502);
    }

    #[test]
    fn a_head_without_its_blank_line_is_completed() {
        let mut head = b"Status: 204 No Content".to_vec();
        complete(&mut head);
        assert_eq!(head_end(&head), Some(head.len()));
        let mut lf = b"X-A: 1\n".to_vec();
        complete(&mut lf);
        assert_eq!(&lf[..], b"X-A: 1\n\r\n");
        assert_eq!(head_end(&lf), Some(lf.len()));
    }
}
