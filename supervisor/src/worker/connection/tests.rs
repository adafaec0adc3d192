//! The connection's rules, without sockets and with time as a parameter: bytes "read" are put
//! into the buffer as a read would, output is "written" by acknowledging it.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use fcgi::client::encode_request;
use fcgi::Params;

use super::placement::{MAX_LOOKS, MAX_MOVES, SLOW_AFTER};
use super::*;
use crate::passing::MAX_CARRIED;
use crate::worker::rooms::Rooms;
use std::sync::atomic::{AtomicU64, Ordering};

const KEEPALIVE: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

fn rules(can_hand_over: bool) -> Rules {
    Rules {
        limits: fcgi::Limits::default(),
        keepalive_timeout: KEEPALIVE,
        request_read_timeout: READ_TIMEOUT,
        request_timeout: Some(REQUEST_TIMEOUT),
        can_hand_over,
    }
}

/// Rooms that start nothing: these tests look at the connection, not at running requests.
fn rooms(n: usize) -> Arc<Rooms<Waiting>> {
    Rooms::new(
        n,
        crate::worker::rooms::Admission::default(),
        crate::worker::rooms::Hooks {
            held: Box::new(|_| {}),
            start: Box::new(|_, _| {}),
            refuse: Box::new(|_, _| {}),
            gone: Box::new(|_| false),
        },
    )
}

/// A room taken at once, as the accept loop takes one before accepting.
fn reserve(rooms: &Arc<Rooms<Waiting>>) -> Room {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(rooms.acquire()).poll(&mut cx) {
        Poll::Ready(Some(room)) => room,
        _ => panic!("a room is free"),
    }
}

/// The client's bytes arrive, as a read of the socket would put them in the buffer.
fn receive(conn: &mut Conn, bytes: &[u8]) {
    conn.buf.extend_from_slice(bytes);
    assert_eq!(conn.on_read(Ok(bytes.len())), Next::Continue);
}

/// A whole request, STDIN included.
fn request(id: u16, keep_conn: bool, stdin: &[u8]) -> BytesMut {
    let params = Params::from_pairs([("REQUEST_METHOD", "POST")]);
    let mut wire = BytesMut::new();
    encode_request(id, Role::Responder, keep_conn, &params, stdin, &mut wire);
    wire
}

/// Decodes the request the client sent and opens its bodies; the readers are returned so the
/// request's STDIN stays open as long as the test wants.
fn take_request(conn: &mut Conn) -> (u16, BodyReader) {
    let Some(Arrived::Request(req)) = conn.next_request().expect("well-formed") else {
        panic!("a request arrived")
    };
    let (body, _) = conn.open_bodies(req.id, req.role);
    assert!(conn.next_request().expect("well-formed").is_none());
    (req.id, body)
}

/// Writes everything queued, as a socket that takes it all would.
fn write_all(conn: &mut Conn) {
    while let Some(front) = conn.outbox.front() {
        let n = front.len();
        assert_eq!(conn.on_written(Ok(n)), Next::Continue);
    }
    assert_eq!(conn.queued, 0);
}

/// Request `id` is answered (an empty tail; END_REQUEST is appended by the connection).
fn answer(conn: &mut Conn, id: u16, now: Instant, draining: bool) {
    let out = Out::Last(id, BytesMut::new());
    assert_eq!(conn.on_output(out, now, draining), Next::Continue);
}

/// One request served to its end: received, answered at `now`, written.
fn serve_one(conn: &mut Conn, keep_conn: bool, now: Instant, draining: bool) {
    receive(conn, &request(1, keep_conn, b"body"));
    let (id, _body) = take_request(conn);
    assert!(!conn.idle());
    answer(conn, id, now, draining);
    write_all(conn);
}

#[test]
fn an_idle_connection_closes_keepalive_timeout_after_its_last_answer() {
    let t0 = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), t0);
    let answered = t0 + Duration::from_secs(3);
    serve_one(&mut conn, true, answered, false);
    assert_eq!(conn.decide(answered, false), Next::Continue);
    assert!(conn.idle());
    // The timer set when the connection opened fires: it moves to the last answer.
    assert_eq!(
        conn.on_keepalive_tick(t0 + KEEPALIVE),
        Keepalive::Until(answered + KEEPALIVE)
    );
    assert_eq!(
        conn.on_keepalive_tick(answered + KEEPALIVE),
        Keepalive::Expired
    );
}

#[test]
fn a_draining_worker_hands_an_idle_connection_over() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    serve_one(&mut conn, true, now, false);
    assert_eq!(conn.decide(now, true), Next::HandOver);
}

#[test]
fn a_draining_worker_without_a_channel_closes_an_idle_connection_after_a_quiet_moment() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(false), None, &Carried::default(), now);
    serve_one(&mut conn, true, now, false);
    assert_eq!(conn.decide(now, true), Next::Continue, "not closed at once");
    assert_eq!(conn.quiet_until, Some(now + DRAIN_QUIET));
    // A later turn does not push the quiet moment back.
    assert_eq!(conn.decide(now + DRAIN_QUIET / 2, true), Next::Continue);
    assert_eq!(conn.quiet_until, Some(now + DRAIN_QUIET));
}

#[test]
fn a_request_in_the_quiet_moment_is_served_then_the_connection_closes() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(false), None, &Carried::default(), now);
    assert_eq!(conn.decide(now, true), Next::Continue);
    serve_one(&mut conn, true, now, true);
    assert_eq!(conn.decide(now, true), Next::Close);
}

#[test]
fn a_leaving_host_keeps_an_idle_connection_for_its_next_request_then_closes_after_the_answer() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    serve_one(&mut conn, true, now, false);
    conn.leave(now);
    // Not handed over (no worker stays to take it), not closed while nginx may be writing.
    assert_eq!(conn.decide(now, true), Next::Continue);
    assert_eq!(conn.quiet_until, Some(now + LEAVING_IDLE));
    // A second call changes nothing: the idle bound counts from the stop.
    conn.leave(now + LEAVING_IDLE / 2);
    assert_eq!(conn.quiet_until, Some(now + LEAVING_IDLE));
    let later = now + LEAVING_IDLE / 2;
    receive(&mut conn, &request(1, true, b"body"));
    let (id, _body) = take_request(&mut conn);
    answer(&mut conn, id, later, true);
    let tail = conn.outbox.back().expect("the answer's tail").clone();
    // END_REQUEST, then an empty GET_VALUES_RESULT in the same write: nginx then closes the
    // connection instead of caching it.
    assert_eq!(tail[tail.len() - 24 + 1], fcgi::record::kind::END_REQUEST);
    assert_eq!(&tail[tail.len() - 8..], &[1, 10, 0, 0, 0, 0, 0, 0]);
    write_all(&mut conn);
    assert_eq!(
        conn.decide(later, true),
        Next::Close,
        "closed with its answer written, where nginx sees the close with the answer"
    );
}

#[test]
fn a_replaced_worker_still_hands_over_where_a_leaving_one_does_not() {
    let now = Instant::now();
    let mut replaced = Conn::new(rules(true), None, &Carried::default(), now);
    serve_one(&mut replaced, true, now, false);
    assert_eq!(replaced.decide(now, true), Next::HandOver);
    let mut leaving = Conn::new(rules(true), None, &Carried::default(), now);
    serve_one(&mut leaving, true, now, false);
    leaving.leave(now);
    assert_eq!(leaving.decide(now, true), Next::Continue);
    assert!(
        !leaving.may_migrate(),
        "a leaving connection does not migrate either"
    );
    // A replaced worker's last answer ends at END_REQUEST, as always.
    let mut last = Conn::new(rules(false), None, &Carried::default(), now);
    receive(&mut last, &request(1, true, b"body"));
    let (id, _body) = take_request(&mut last);
    answer(&mut last, id, now, true);
    let tail = last.outbox.back().expect("the answer's tail").clone();
    assert_eq!(tail[tail.len() - 16 + 1], fcgi::record::kind::END_REQUEST);
}

#[test]
fn a_draining_worker_serves_the_first_request_of_a_connection_it_reserved_room_for() {
    let rooms = rooms(1);
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), Some(reserve(&rooms)), &Carried::default(), now);
    assert_eq!(conn.decide(now, true), Next::Continue);
    assert_eq!(conn.quiet_until, None);
    receive(&mut conn, &request(1, true, b""));
    let (id, _body) = take_request(&mut conn);
    assert!(
        conn.take_reserved().is_some(),
        "the request runs in the reserved room"
    );
    answer(&mut conn, id, now, true);
    write_all(&mut conn);
    assert_eq!(conn.decide(now, true), Next::HandOver);
}

#[test]
fn a_busy_migrate_notification_moves_only_an_idle_connection() {
    let rooms = rooms(1);
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), Some(reserve(&rooms)), &Carried::default(), now);
    assert!(
        !conn.may_migrate(),
        "its first request is still to come, in its room"
    );
    conn.on_read_timer(now + FIRST_REQUEST_GRACE);
    assert!(conn.may_migrate());
    receive(&mut conn, &request(1, true, b"body"));
    let (id, _body) = take_request(&mut conn);
    assert!(!conn.may_migrate(), "a request runs");
    answer(&mut conn, id, now, false);
    assert!(!conn.may_migrate(), "its answer is not written yet");
    write_all(&mut conn);
    assert!(conn.may_migrate());
    assert!(
        !Conn::new(rules(false), None, &Carried::default(), now).may_migrate(),
        "no channel to move it by"
    );
}

/// What a connection brings whose request moved `moves` times.
fn moved(bytes: &[u8], moves: u8) -> Carried {
    Carried {
        bytes: Bytes::copy_from_slice(bytes),
        moves,
    }
}

/// Whether `conn` moves given room here and elsewhere, with a slow request holding the room
/// here when there is none.
fn moves(conn: &mut Conn, room_here: bool, room_elsewhere: bool) -> bool {
    let slow = || Some(SLOW_AFTER);
    conn.place(Instant::now(), || room_here, slow, || room_elsewhere) == Place::Elsewhere
}

#[test]
fn a_request_at_an_idle_connection_without_room_moves_with_its_bytes_to_room_elsewhere() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    serve_one(&mut conn, true, now, false);
    assert!(!moves(&mut conn, false, true), "nothing arrived yet");
    let wire = request(2, true, b"next");
    receive(&mut conn, &wire);
    assert!(moves(&mut conn, false, true));
    let carried = conn.take_read();
    assert_eq!(&carried.bytes[..], &wire[..], "every byte read goes along");
    assert_eq!(carried.moves, 1, "its first move");
    // Half a request moves as well: the rest waits in the socket for the next owner.
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &wire[..3]);
    assert!(moves(&mut conn, false, true));
}

#[test]
fn a_request_with_room_here_or_none_elsewhere_is_served_here() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b""));
    assert!(!moves(&mut conn, true, true), "a room is free here");
    assert!(
        !moves(&mut conn, false, false),
        "no other worker has room either"
    );
    let rooms = rooms(1);
    let mut conn = Conn::new(rules(true), Some(reserve(&rooms)), &Carried::default(), now);
    receive(&mut conn, &request(1, true, b""));
    assert!(
        !moves(&mut conn, false, true),
        "its room was reserved at accept"
    );
}

#[test]
fn a_connection_with_a_request_under_way_or_without_a_channel_is_served_here() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b"body"));
    let (_id, _body) = take_request(&mut conn);
    receive(&mut conn, &request(2, true, b""));
    assert!(!moves(&mut conn, false, true), "request 1 is active on it");
    let mut conn = Conn::new(rules(false), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b""));
    assert!(!moves(&mut conn, false, true), "no channel to move it by");
    // BEGIN_REQUEST decoded, its params still to come: the core holds part of the request.
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    let wire = request(1, true, b"body");
    let begin = fcgi::record::HEADER_LEN + 8;
    receive(&mut conn, &wire[..begin + 1]);
    assert!(conn.next_request().expect("well-formed").is_none());
    assert!(!moves(&mut conn, false, true));
}

#[test]
fn a_request_behind_a_fast_one_waits_for_it_and_one_behind_a_slow_one_moves() {
    let t0 = Instant::now();
    let us = Duration::from_micros;
    let mut conn = Conn::new(rules(true), None, &Carried::default(), t0);
    receive(&mut conn, &request(1, true, b""));
    // The room goes to a request not yet started: this one waits for it, with no timer (the
    // busy check wakes it if that one turns out slow).
    let place = conn.place(t0, || false, || None, || panic!("not asked"));
    assert_eq!(place, Place::Wait);
    assert!(conn.waiting);
    assert_eq!(conn.relook_at, None);
    assert_eq!(
        conn.place(t0, || true, || panic!(), || panic!()),
        Place::Here
    );
    assert!(!conn.waiting, "no longer waiting");
    // Behind one that started 200 us ago: it waits, to look again when that one turns slow.
    let mut conn = Conn::new(rules(true), None, &Carried::default(), t0);
    receive(&mut conn, &request(1, true, b""));
    let place = conn.place(t0, || false, || Some(us(200)), || panic!("not asked"));
    assert_eq!(place, Place::Wait);
    assert_eq!(conn.relook_at, Some(t0 + SLOW_AFTER - us(200)));
    // A room freed here meanwhile: served here.
    assert_eq!(
        conn.place(t0 + us(10), || true, || panic!(), || panic!()),
        Place::Here
    );
    assert_eq!(conn.relook_at, None, "no longer waiting");
    // Still no room when that one turned slow: it moves to a worker with room.
    let mut conn = Conn::new(rules(true), None, &Carried::default(), t0);
    receive(&mut conn, &request(1, true, b""));
    assert_eq!(
        conn.place(t0, || false, || Some(us(200)), || panic!()),
        Place::Wait
    );
    let at = conn.relook_at.expect("a moment to look again");
    assert_eq!(
        conn.place(at, || false, || Some(SLOW_AFTER), || true),
        Place::Elsewhere
    );
}

#[test]
fn a_request_behind_a_slow_one_with_no_room_anywhere_looks_a_few_times_then_queues_here() {
    let t0 = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), t0);
    receive(&mut conn, &request(1, true, b""));
    let mut now = t0;
    let mut looks = 0;
    loop {
        match conn.place(now, || false, || Some(SLOW_AFTER * 5), || false) {
            Place::Wait => {
                let at = conn.relook_at.expect("a moment to look again");
                assert_eq!(
                    at - now,
                    SLOW_AFTER,
                    "looks again a slow request's time later"
                );
                looks += 1;
                now = at;
            }
            Place::Here => break,
            Place::Elsewhere => panic!("no room elsewhere"),
        }
    }
    assert_eq!(looks, MAX_LOOKS);
    assert!(
        conn.next_request().expect("well-formed").is_some(),
        "decoded here"
    );
}

#[test]
fn a_request_over_the_carried_bound_is_served_here() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &vec![0u8; MAX_CARRIED + 1]);
    assert!(!moves(&mut conn, false, true));
}

#[test]
fn a_request_moves_a_bounded_number_of_times_and_its_connection_may_move_again_later() {
    let now = Instant::now();
    let wire = request(1, true, b"body");
    // Moved once, it lands on a worker that filled up meanwhile: it moves on, counted.
    let mut conn = Conn::new(rules(true), None, &moved(&wire, 1), now);
    assert!(moves(&mut conn, false, true));
    let carried = conn.take_read();
    assert_eq!((&carried.bytes[..], carried.moves), (&wire[..], 2));
    let mut conn = Conn::new(rules(true), None, &moved(&wire, MAX_MOVES), now);
    assert!(
        !moves(&mut conn, false, true),
        "moved as often as a request may"
    );
    let (id, _body) = take_request(&mut conn);
    answer(&mut conn, id, now, false);
    write_all(&mut conn);
    receive(&mut conn, &request(2, true, b""));
    assert!(
        moves(&mut conn, false, true),
        "the next request is a new one"
    );
    // Carried bytes that are only part of the request keep it here for the rest.
    let mut conn = Conn::new(rules(true), None, &moved(&wire[..3], MAX_MOVES), now);
    receive(&mut conn, &wire[3..]);
    assert!(!moves(&mut conn, false, true));
    assert!(matches!(
        conn.next_request().expect("well-formed"),
        Some(Arrived::Request(_))
    ));
}

#[test]
fn a_finished_connection_whose_input_was_all_read_closes_at_once() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    serve_one(&mut conn, false, now, false);
    assert_eq!(conn.decide(now, false), Next::Close);
}

#[test]
fn a_finished_connection_whose_client_still_sends_lingers() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    let mut wire = request(1, false, b"");
    // Cut before the end of STDIN: the client is still sending a body nobody reads.
    wire.truncate(wire.len() - fcgi::record::HEADER_LEN);
    receive(&mut conn, &wire);
    let (id, _body) = take_request(&mut conn);
    answer(&mut conn, id, now, false);
    assert_eq!(
        conn.decide(now, false),
        Next::Continue,
        "the answer is not written yet"
    );
    write_all(&mut conn);
    assert_eq!(conn.decide(now, false), Next::Linger);
}

#[test]
fn the_first_request_grace_gives_the_reserved_room_back() {
    let rooms = rooms(1);
    let now = Instant::now();
    let mut conn =
        Conn::new(rules(true), Some(reserve(&rooms)), &Carried::default(), now).accepted(now);
    let mut cx = Context::from_waker(Waker::noop());
    let mut acquire = pin!(rooms.acquire());
    assert!(
        acquire.as_mut().poll(&mut cx).is_pending(),
        "the connection holds the room"
    );
    assert_eq!(
        conn.on_read_timer(now + FIRST_REQUEST_GRACE / 2),
        Timer::Until(now + FIRST_REQUEST_GRACE),
        "within the grace the room stays"
    );
    assert!(acquire.as_mut().poll(&mut cx).is_pending());
    assert_eq!(
        conn.on_read_timer(now + FIRST_REQUEST_GRACE),
        Timer::Until(now + READ_TIMEOUT),
        "the room goes back; the read deadline is next"
    );
    assert!(matches!(acquire.poll(&mut cx), Poll::Ready(Some(_))));
}

#[test]
fn a_connection_that_never_completes_a_request_is_closed_at_the_read_timeout() {
    let now = Instant::now();
    let mut silent = Conn::new(rules(true), None, &Carried::default(), now).accepted(now);
    assert_eq!(silent.decide(now, false), Next::Continue);
    assert!(
        silent.read_timer_armed(),
        "a fresh connection is timed from accept"
    );
    assert_eq!(silent.on_read_timer(now + READ_TIMEOUT), Timer::Expired);

    let mut partial = Conn::new(rules(true), None, &Carried::default(), now).accepted(now);
    receive(&mut partial, &request(1, true, b"")[..3]);
    assert!(partial
        .next_request()
        .expect("well-formed so far")
        .is_none());
    let later = now + READ_TIMEOUT / 2;
    assert_eq!(partial.decide(later, false), Next::Continue);
    assert_eq!(
        partial.on_read_timer(later),
        Timer::Until(now + READ_TIMEOUT),
        "three bytes do not restart the clock of a fresh connection"
    );
    assert_eq!(partial.on_read_timer(now + READ_TIMEOUT), Timer::Expired);
}

#[test]
fn a_kept_alive_connection_is_timed_from_the_first_byte_of_its_next_request() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now).accepted(now);
    serve_one(&mut conn, true, now, false);
    assert_eq!(conn.decide(now, false), Next::Continue);
    assert!(
        !conn.read_timer_armed(),
        "idle and kept alive: the keep-alive timeout governs it"
    );
    let first_byte = now + KEEPALIVE / 2;
    receive(&mut conn, &request(1, true, b"")[..5]);
    assert!(conn.next_request().expect("well-formed so far").is_none());
    assert_eq!(conn.decide(first_byte, false), Next::Continue);
    assert_eq!(
        conn.on_read_timer(first_byte),
        Timer::Until(first_byte + READ_TIMEOUT)
    );
    // The rest arrives: the request runs, and no read deadline is left to close it.
    receive(&mut conn, &request(1, true, b"")[5..]);
    let _ = take_request(&mut conn);
    assert_eq!(conn.decide(first_byte, false), Next::Continue);
    assert!(!conn.read_timer_armed());
}

/// A running request, tracked as `start_request` does; returns what its run would set.
fn run_tracked(conn: &mut Conn) -> (u16, BodyReader, Arc<AtomicU64>) {
    receive(conn, &request(1, true, b""));
    let (id, body) = take_request(conn);
    let started = Arc::new(AtomicU64::new(0));
    conn.track(id, Arc::clone(&started), "GET".into(), "/sleep".into());
    (id, body, started)
}

/// The records queued for the client, decoded as request `id`'s answer.
fn answered(conn: &mut Conn, id: u16) -> fcgi::client::Response {
    let mut wire = BytesMut::new();
    for chunk in &conn.outbox {
        wire.extend_from_slice(chunk);
    }
    let mut answer = fcgi::client::Response::default();
    assert!(
        fcgi::client::read_response(&mut wire, id, &mut answer).expect("well-formed"),
        "the answer is complete, END_REQUEST included"
    );
    answer
}

#[test]
fn a_request_past_its_timeout_is_answered_504_and_its_late_output_dropped() {
    let now = Instant::now();
    let clock = Duration::from_secs(100);
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    let (id, _body, started) = run_tracked(&mut conn);
    assert!(conn.request_timer_armed());
    assert_eq!(
        conn.on_request_timer(now, clock),
        Timer::Until(now + REQUEST_TIMEOUT),
        "waiting for room, it has not started"
    );
    started.store(clock.as_micros() as u64, Ordering::Release);
    let half = REQUEST_TIMEOUT / 2;
    assert_eq!(
        conn.on_request_timer(now + half, clock + half),
        Timer::Until(now + REQUEST_TIMEOUT)
    );
    assert_eq!(
        conn.on_request_timer(now + REQUEST_TIMEOUT, clock + REQUEST_TIMEOUT),
        Timer::Expired
    );
    let (method, uri, was_504) = conn.time_out(now + REQUEST_TIMEOUT).expect("it ran");
    assert_eq!(
        (method.as_str(), uri.as_str(), was_504),
        ("GET", "/sleep", true)
    );
    assert_eq!(answered(&mut conn, id).status(), 504);
    let queued = conn.queued;
    answer(&mut conn, id, now, false);
    assert_eq!(conn.queued, queued, "the stuck handler's answer is dropped");
    write_all(&mut conn);
    assert_eq!(
        conn.decide(now, false),
        Next::Close,
        "it closes: the handler may still write under that id"
    );
}

#[test]
fn a_request_that_had_sent_part_of_its_answer_ends_with_what_it_sent() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    let (id, _body, started) = run_tracked(&mut conn);
    started.store(1, Ordering::Release);
    let mut head = BytesMut::new();
    fcgi::response::ResponseWriter::new(id).stdout(b"Status: 200\r\n\r\npart", &mut head);
    conn.on_output(Out::Chunk(head.freeze()), now, false);
    let (_, _, was_504) = conn.time_out(now).expect("it ran");
    assert!(!was_504);
    let answer = answered(&mut conn, id);
    assert_eq!((answer.status(), answer.body()), (200, &b"part"[..]));
}

#[test]
fn a_peer_that_closes_an_idle_connection_is_closed() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    assert_eq!(conn.on_read(Ok(0)), Next::Continue);
    assert!(!conn.may_read());
    assert_eq!(conn.decide(now, false), Next::Close);
}

#[test]
fn a_peer_that_leaves_while_its_request_waits_for_room_abandons_it_without_a_protocol_error() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b""));
    assert_eq!(conn.place(now, || false, || None, || false), Place::Wait);
    assert_eq!(
        conn.on_read(Ok(0)),
        Next::Abandon,
        "counted as a request dropped unrun"
    );
    assert!(conn.buf.is_empty());
    // Not waiting, the same close is a request cut off mid-record.
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b"")[..5]);
    assert_eq!(conn.on_read(Ok(0)), Next::Close);
}

#[test]
fn a_record_cut_off_by_the_peer_closing_closes_at_once() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b"")[..5]);
    assert_eq!(conn.on_read(Ok(0)), Next::Close);
}

#[test]
fn a_body_chunk_without_room_pauses_reading_until_the_handler_reads() {
    let limits = fcgi::Limits {
        max_buffered_body: fcgi::record::MAX_CONTENT_LEN,
        ..fcgi::Limits::default()
    };
    let now = Instant::now();
    let mut conn = Conn::new(
        Rules {
            limits,
            ..rules(true)
        },
        None,
        &Carried::default(),
        now,
    );
    let body = vec![b'x'; 3 * fcgi::record::MAX_ALIGNED_CONTENT_LEN];
    receive(&mut conn, &request(1, true, &body));
    let (_, mut reader) = take_request(&mut conn);
    // One chunk fits the channel, the next waits: the socket is not read meanwhile.
    assert!(conn.bodies.waiting());
    assert!(!conn.may_read());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut got = reader.next_chunk().expect("the first chunk").len();
    while conn.bodies.waiting() {
        let room = runtime.block_on(conn.bodies.wait_for_room());
        assert_eq!(conn.on_body_room(room), Next::Continue);
        assert!(conn.may_read());
        assert!(conn.next_request().expect("well-formed").is_none());
        got += reader.next_chunk().expect("the next chunk").len();
    }
    assert_eq!(got, body.len());
    assert_eq!(reader.next_chunk(), None, "the body ended");
}

#[test]
fn an_abort_or_the_connections_end_marks_the_waiting_request_gone() {
    let now = Instant::now();
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b""));
    let (id, _body) = take_request(&mut conn);
    let left = Arc::new(AtomicBool::new(false));
    conn.watch_left(id, Arc::clone(&left));
    // FCGI_ABORT_REQUEST for another request id changes nothing (the core ignores it too).
    receive(&mut conn, &[1, 2, 0, 9, 0, 0, 0, 0]);
    assert!(conn.next_request().expect("well-formed").is_none());
    assert!(!left.load(Ordering::Acquire));
    receive(&mut conn, &[1, 2, 0, 1, 0, 0, 0, 0]);
    assert!(conn.next_request().expect("well-formed").is_none());
    assert!(left.load(Ordering::Acquire), "aborted: it is never run");

    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b""));
    let (id, _body) = take_request(&mut conn);
    let left = Arc::new(AtomicBool::new(false));
    conn.watch_left(id, Arc::clone(&left));
    assert_eq!(conn.on_read(Ok(0)), Next::Continue);
    assert!(
        left.load(Ordering::Acquire),
        "the connection ended: nobody waits for it"
    );

    // Once answered, the request is no longer watched.
    let mut conn = Conn::new(rules(true), None, &Carried::default(), now);
    receive(&mut conn, &request(1, true, b""));
    let (id, _body) = take_request(&mut conn);
    let left = Arc::new(AtomicBool::new(false));
    conn.watch_left(id, Arc::clone(&left));
    answer(&mut conn, id, now, false);
    assert_eq!(conn.on_read(Ok(0)), Next::Continue);
    assert!(!left.load(Ordering::Acquire));
}
