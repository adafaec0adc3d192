//! Property tests: every encoder round-trips through its decoder, at the boundary lengths named
//! below and at random ones, and decoding never depends on where the reads split the stream.

use bytes::{Bytes, BytesMut};
use fcgi::client::{self, ClientEvent};
use fcgi::params::{decode_length, encode_length, encode_pair, Params, MAX_PAIR_LEN};
use fcgi::record::{self, kind, MAX_CONTENT_LEN};
use fcgi::response::ResponseWriter;
use fcgi::server::{Event, Rejection, ServerConnection};
use fcgi::{Limits, ProtocolStatus, Role};
use proptest::prelude::*;

/// The lengths where encodings change form or hit a limit: three published FastCGI crates got
/// the 4-byte form wrong.
const BOUNDARY_LENGTHS: [usize; 6] = [0, 127, 128, 65535, 65536, 0x7fff_ffff];

#[test]
fn lengths_at_every_boundary_round_trip() {
    for len in BOUNDARY_LENGTHS {
        let mut buf = Vec::new();
        encode_length(len, &mut buf);
        assert_eq!(buf.len(), if len <= 127 { 1 } else { 4 }, "{len}");
        assert_eq!(decode_length(&buf), Some((len, buf.len())), "{len}");
    }
    assert_eq!(MAX_PAIR_LEN, 0x7fff_ffff);
}

#[test]
fn pairs_at_the_boundary_lengths_round_trip() {
    // 2^31-1 is proven on the length alone above; a pair that size would take 2 GiB.
    for len in &BOUNDARY_LENGTHS[..5] {
        let name = vec![b'n'; *len];
        let value = vec![0xffu8; *len];
        let mut buf = Vec::new();
        encode_pair(&name, &value, &mut buf);
        let p = Params::decode(Bytes::from(buf), 1).expect("valid");
        let (n, v) = p.iter().next().expect("one pair");
        assert_eq!((n.len(), v.len()), (*len, *len));
    }
}

#[test]
fn records_at_the_boundary_content_lengths() {
    for len in [0usize, 127, 128, MAX_CONTENT_LEN] {
        let content = vec![3u8; len];
        let mut buf = BytesMut::new();
        record::encode(kind::STDOUT, 1, &content, &mut buf);
        assert_eq!(buf.len() % 8, 0, "aligned");
        let r = record::decode(&mut buf).expect("valid").expect("whole");
        assert_eq!(r.content.len(), len);
    }
    // 65536 bytes do not fit one record: the stream encoder splits them.
    let mut buf = BytesMut::new();
    record::encode_stream(kind::STDOUT, 1, &vec![1u8; 65536], &mut buf);
    let mut total = 0;
    while let Some(r) = record::decode(&mut buf).expect("valid") {
        total += r.content.len();
    }
    assert_eq!(total, 65536);
}

fn pair() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let len = prop_oneof![0usize..130, Just(127usize), Just(128usize), 200usize..1000];
    (len.clone(), len).prop_flat_map(|(n, v)| {
        (
            proptest::collection::vec(any::<u8>(), n),
            proptest::collection::vec(any::<u8>(), v),
        )
    })
}

#[derive(Debug, Clone)]
struct Req {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    stdin: Vec<u8>,
    keep_conn: bool,
}

fn request() -> impl Strategy<Value = Req> {
    (
        proptest::collection::vec(pair(), 0..12),
        proptest::collection::vec(any::<u8>(), 0..70_000),
        any::<bool>(),
    )
        .prop_map(|(pairs, stdin, keep_conn)| Req {
            pairs,
            stdin,
            keep_conn,
        })
}

fn conversation(reqs: &[Req]) -> BytesMut {
    let mut wire = BytesMut::new();
    for (i, r) in reqs.iter().enumerate() {
        let params = Params::from_pairs(r.pairs.iter().map(|(n, v)| (n.clone(), v.clone())));
        client::encode_request(
            i as u16 + 1,
            Role::Responder,
            r.keep_conn,
            &params,
            &r.stdin,
            &mut wire,
        );
    }
    wire
}

fn events(wire: &[u8], splits: &[usize]) -> Vec<Event> {
    let mut conn = ServerConnection::new(Limits {
        max_requests_per_conn: 64,
        ..Limits::default()
    });
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut cuts = splits.iter().cycle();
    while pos < wire.len() {
        let n = (*cuts.next().unwrap_or(&1)).clamp(1, wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        while let Some(e) = conn.decode(&mut buf).expect("valid conversation") {
            out.push(e);
        }
    }
    conn.handle_eof(&buf).expect("nothing left over");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_record_round_trips(t in 1u8..=11, id in any::<u16>(), content in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let mut buf = BytesMut::new();
        record::encode(t, id, &content, &mut buf);
        prop_assert_eq!(buf.len() % 8, 0);
        let r = record::decode(&mut buf).expect("valid").expect("whole");
        prop_assert_eq!((r.record_type, r.request_id, &r.content[..]), (t, id, &content[..]));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn any_pairs_round_trip(pairs in proptest::collection::vec(pair(), 0..20)) {
        let params = Params::from_pairs(pairs.clone());
        let mut buf = Vec::new();
        params.encode(&mut buf);
        prop_assert_eq!(buf.len(), params.encoded_len());
        let back = Params::decode(Bytes::from(buf), usize::MAX).expect("valid");
        let got: Vec<(Vec<u8>, Vec<u8>)> = back.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect();
        prop_assert_eq!(got, pairs);
    }

    #[test]
    fn any_length_round_trips(len in 0usize..=MAX_PAIR_LEN) {
        let mut buf = Vec::new();
        encode_length(len, &mut buf);
        prop_assert_eq!(decode_length(&buf), Some((len, buf.len())));
    }

    #[test]
    fn decoding_does_not_depend_on_read_splits(
        reqs in proptest::collection::vec(request(), 1..4),
        splits in proptest::collection::vec(1usize..9000, 1..20),
    ) {
        let wire = conversation(&reqs);
        let whole = events(&wire, &[wire.len()]);
        let split = events(&wire, &splits);
        prop_assert_eq!(&whole, &split);
        // And the events say what was sent.
        for (i, r) in reqs.iter().enumerate() {
            let id = i as u16 + 1;
            let Some(Event::Request(req)) = whole.iter().find(|e| matches!(e, Event::Request(q) if q.id == id)) else {
                panic!("request {id} missing");
            };
            prop_assert_eq!(req.keep_conn, r.keep_conn);
            prop_assert_eq!(req.params.len(), r.pairs.len());
            let body: Vec<u8> = whole
                .iter()
                .filter_map(|e| match e { Event::Stdin { id: i, data } if *i == id => Some(data.to_vec()), _ => None })
                .flatten()
                .collect();
            prop_assert_eq!(body, r.stdin.clone());
        }
    }

    #[test]
    fn responses_round_trip_to_the_client(
        stdout in proptest::collection::vec(any::<u8>(), 0..200_000),
        stderr in proptest::collection::vec(any::<u8>(), 0..100),
        app_status in any::<u32>(),
    ) {
        let id = 7;
        let mut conn = ServerConnection::new(Limits::default());
        let mut wire = BytesMut::new();
        client::encode_request(id, Role::Responder, true, &Params::default(), b"", &mut wire);
        while conn.decode(&mut wire).expect("valid").is_some() {}
        let mut out = BytesMut::new();
        let mut w = ResponseWriter::new(id);
        w.stderr(&stderr, &mut out);
        w.stdout(&stdout, &mut out);
        w.finish(&mut out);
        conn.end_request(id, app_status, &mut out);
        prop_assert_eq!(out.len() % 8, 0);
        let mut response = client::Response::default();
        prop_assert!(client::read_response(&mut out, id, &mut response).expect("valid"));
        prop_assert_eq!(response.stdout, stdout);
        prop_assert_eq!(response.stderr, stderr);
        prop_assert_eq!(response.app_status, app_status);
        prop_assert_eq!(response.protocol_status, Some(ProtocolStatus::RequestComplete));
        prop_assert!(out.is_empty(), "nothing after END_REQUEST");
    }
}

/// What a worker sees of `wire` fed in `splits`-sized reads, answering every request (delivered
/// or rejected) as soon as it is known, on a connection that takes one at a time.
fn answered(wire: &[u8], splits: &[usize], limits: Limits) -> (Vec<Event>, usize) {
    let mut conn = ServerConnection::new(limits);
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    let mut most_held = 0;
    let mut cuts = splits.iter().cycle();
    let mut pos = 0;
    while pos < wire.len() {
        let n = (*cuts.next().unwrap_or(&1)).clamp(1, wire.len() - pos);
        buf.extend_from_slice(&wire[pos..pos + n]);
        pos += n;
        while let Some(e) = conn
            .decode(&mut buf)
            .expect("no error: limits reject, not close")
        {
            match &e {
                Event::Request(r) => conn.end_request(r.id, 0, &mut BytesMut::new()),
                Event::Rejected { id, .. } => conn.end_request(*id, 0, &mut BytesMut::new()),
                _ => false,
            };
            seen.push(e);
            most_held = most_held.max(conn.buffered_params());
        }
        assert_eq!(
            conn.take_output(),
            None,
            "nothing refused: one request at a time"
        );
    }
    conn.handle_eof(&buf).expect("nothing left over");
    assert!(!conn.expects_input(), "every request drained to its end");
    (seen, most_held)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn params_over_a_limit_reject_their_request_and_the_next_is_served(
        pairs in proptest::collection::vec(pair(), 0..12),
        stdin in proptest::collection::vec(any::<u8>(), 0..3000),
        max_params_bytes in prop_oneof![0usize..12_000, Just(0usize)],
        max_params in 0usize..14,
        splits in proptest::collection::vec(1usize..9000, 1..20),
    ) {
        let limits = Limits { max_params_bytes, max_params, ..Limits::default() };
        let params = Params::from_pairs(pairs.iter().map(|(n, v)| (n.clone(), v.clone())));
        let mut wire = BytesMut::new();
        client::encode_request(1, Role::Responder, true, &params, &stdin, &mut wire);
        client::encode_request(2, Role::Responder, false, &Params::default(), b"", &mut wire);
        let (events, most_held) = answered(&wire, &splits, limits);
        // Over by bytes is seen first, in the middle of the stream; by pairs only at its end.
        let expected = if params.encoded_len() > max_params_bytes {
            Some(Rejection::ParamsTooLarge { limit: max_params_bytes })
        } else if pairs.len() > max_params {
            Some(Rejection::TooManyParams { limit: max_params })
        } else {
            None
        };
        match (expected, &events[0]) {
            (None, Event::Request(r)) => prop_assert_eq!(r.params.len(), pairs.len()),
            (Some(reason), Event::Rejected { id: 1, reason: got }) => {
                prop_assert_eq!(*got, reason);
                // Nothing of a rejected request follows its rejection.
                prop_assert!(matches!(&events[1], Event::Request(r) if r.id == 2));
            }
            (expected, got) => prop_assert!(false, "expected {expected:?}, got {got:?}"),
        }
        prop_assert!(most_held <= 2 * max_params_bytes.max(1));
        // Answered at once, so their bodies were drained, not delivered.
        prop_assert!(matches!(events.last(), Some(Event::Request(r)) if r.id == 2));
    }
}

#[test]
fn client_sees_unknown_type_and_values() {
    let mut wire = BytesMut::new();
    record::encode_unknown_type(42, &mut wire);
    assert_eq!(
        client::decode_event(&mut wire),
        Ok(Some(ClientEvent::UnknownType(42)))
    );
}
