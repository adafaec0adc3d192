//! Arbitrary bytes, in arbitrary read sizes, into the application side's request assembly:
//! it may refuse them, never panic, and never hold more than its limits allow.
#![no_main]

use bytes::BytesMut;
use fcgi::server::{Event, ServerConnection};
use fcgi::Limits;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else { return };
    // The low bit picks one request per connection or multiplexing, so both rules are fuzzed.
    let per_conn = if split & 1 == 0 { 1 } else { 2 };
    let limits = Limits { max_params_bytes: 4096, max_params: 64, max_requests_per_conn: per_conn, ..Limits::default() };
    let mut conn = ServerConnection::new(limits);
    let mut buf = BytesMut::new();
    let step = usize::from(split >> 1).max(1);
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match conn.decode(&mut buf) {
                Ok(Some(Event::Request(req))) => {
                    assert!(req.params.len() <= 64);
                    assert!(req.params.encoded_len() <= 4096);
                    let mut out = BytesMut::new();
                    conn.end_request(req.id, 0, &mut out);
                }
                // Answered at once, as the worker does.
                Ok(Some(Event::Rejected { id, .. })) => {
                    let mut out = BytesMut::new();
                    conn.end_request(id, 0, &mut out);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
            assert!(conn.active() <= per_conn);
            // The buffer doubles as it grows: at most twice the limit per request gathering.
            assert!(conn.buffered_params() <= 2 * 4096 * per_conn);
        }
        let _ = conn.take_output();
        // One record at most is ever buffered: 8 + 65535 + 255 bytes, plus one read.
        assert!(buf.len() <= 8 + 65535 + 255 + step);
    }
    let _ = conn.handle_eof(&buf);
});
