//! One FastCGI connection in a worker: read records, start requests, feed their bodies, write
//! their responses. Runs on the worker's event loop; never blocks it.
//!
//! [`Conn`] holds a connection's state and its rules; each of its `on_*` methods is one thing
//! that can happen (bytes read, bytes written, output from a request, a timer) and returns what
//! to do next ([`Next`]). [`serve`] is the thin loop that waits for those things and does what
//! they decide, so the rules are tested without sockets and with time as a parameter.
//!
//! Body bytes go to the handler through a small bounded channel. While a chunk waits for room,
//! the connection stops reading the socket, so a slow application slows the client instead of
//! growing memory. Responses come back as encoded records; the tail of each (last STDOUT, empty
//! STDOUT, END_REQUEST) is written in one write. The bodies are `connection/bodies.rs`, where a
//! request is served (here or at another worker) `connection/placement.rs`, and the read and
//! request deadlines `connection/timers.rs`.
//!
//! What a connection holds while it has not sent a complete request: no room (after
//! [`FIRST_REQUEST_GRACE`]), a read buffer of at most one record plus a read (64 KiB + 255
//! padding + [`READ_RESERVE`]), and the params being gathered, bounded by the fcgi
//! `max_params_bytes`. It is closed `request_read_timeout` after accept, or after the first
//! byte of a request on a kept-alive connection.
//!
//! A request past `request_timeout` is answered here, not by killing the worker under the
//! client: `504` if nothing of its response went out, else END_REQUEST after what did; the
//! connection then closes (the stuck handler may still write under that request id) and the
//! worker drains, to be replaced by the master.
//!
//! A request refused while it waits for a room ([`refuse`]: past `queue_timeout`, or over
//! `max_queue`) is answered `503` with `Retry-After` here too; one whose client left (an
//! FCGI_ABORT_REQUEST, or the connection's end, which the connection reports through
//! [`Waiting::left`]) gets only its END_REQUEST, and never runs.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fcgi::server::{Event, ServerConnection};
use fcgi::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::app::body::{BodyReader, Out};
use crate::app::request::Request;
use crate::worker::episode::EPISODES;
use crate::worker::output::send_in_runtime;
use crate::worker::rooms::Refused;
use crate::worker::run::{Room, Waiting};
use crate::worker::{Alive, Worker};
use bodies::{Bodies, Closed};

mod bodies;
mod placement;
mod timers;

pub(crate) use placement::{Carried, Place};
use timers::{read_timed_out, request_timed_out};
pub(crate) use timers::{Running, Timer};

/// Bytes the read buffer starts with: a typical request (params and a small body) arrives in
/// one read, and a full-size record in a few.
const READ_BUFFER: usize = 16 * 1024;

/// Spare room made in the read buffer after every read: without it a nearly full buffer would
/// be read into a few bytes at a time (`BytesMut` grows by only 64 bytes on its own).
const READ_RESERVE: usize = 4 * 1024;

/// Messages a connection's requests may have sent it before their senders wait: each is up to
/// a full record, so a few keep the socket busy while the application produces more, and the
/// memory a slow client can make a connection hold stays bounded.
const OUT_CHANNEL: usize = 8;

/// Output queued beyond which the handler's sends wait: a few records, so a slow client slows
/// the application instead of growing memory.
const OUTBOX_HIGH_WATER: usize = 256 * 1024;

/// How long the room reserved at accept waits for the connection's first request before it is
/// given back and the connection waits without one. nginx writes its request right after the
/// connect completes, so on loopback or a LAN it is here within microseconds; 5 ms covers a
/// frontend descheduled for a few time slices. A connection that sends nothing (or part of a
/// request) costs the accept loop at most this long, so 200 of them cost a worker 1 s of
/// accepting at worst, spread over the pool; the request that arrives later still runs, taking
/// a room like any request on a kept-alive connection.
pub(crate) const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(5);

/// How long a finished connection keeps draining input its client still sends before it is
/// closed anyway.
const LINGER: Duration = Duration::from_secs(1);

/// How long an idle kept-alive connection of a draining worker stays readable before it
/// closes: long enough to catch a request nginx is writing at that moment.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// How long an idle kept-alive connection stays open once the whole host is leaving (the
/// master's graceful stop): nginx keeps using the connections it has cached to a host whose
/// listeners already refuse new ones, so each closes right after its next answer, where
/// nginx sees the close with the answer and never reuses it. One nginx does not use for this
/// long is closed idle; by then nginx has most likely tried a new connection to the host, been
/// refused, retried elsewhere and marked the host failed (`max_fails=1`), so it no longer picks
/// the connection. Long enough for that under any load that uses the host, short beside
/// `shutdown_timeout`.
pub(crate) const LEAVING_IDLE: Duration = Duration::from_secs(1);

/// `Retry-After` of a 503 for a full queue, in seconds: a queue overflows in bursts that last
/// seconds, and a client told 1 s comes back once the pool has turned over its requests a few
/// times; longer would keep people waiting on a pool that is free again.
const RETRY_AFTER_SECS: u32 = 1;

/// What the loop does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Go on serving.
    Continue,
    /// Close the connection now.
    Close,
    /// Close it now: the peer left while its request waited undecoded for room, and that
    /// request is dropped unrun, as one whose client left while it waited in the queue is.
    Abandon,
    /// Half-close, drain what the client still sends for a moment, then close.
    Linger,
    /// Give the connection back whole, to be passed to another worker.
    HandOver,
}

/// What the keep-alive timer found when it fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keepalive {
    /// Idle for the whole timeout: close.
    Expired,
    /// An answer came since it was set: fire again then.
    Until(Instant),
}

/// The worker's rules a connection follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub limits: fcgi::Limits,
    pub keepalive_timeout: Duration,
    /// Time to send a complete request, from accept or from the request's first byte.
    pub request_read_timeout: Duration,
    /// A request running longer is answered 504 here.
    pub request_timeout: Option<Duration>,
    /// The worker has a channel to the master, so idle connections can move to another worker.
    pub can_hand_over: bool,
}

/// One connection's state.
pub(crate) struct Conn {
    rules: Rules,
    fcgi: ServerConnection,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    /// The request bodies being received.
    bodies: Bodies,
    /// Encoded output not yet written. Writing never blocks reading: a client that sends a
    /// large body before it reads the response (libfcgi, our own client) must not deadlock us.
    outbox: VecDeque<Bytes>,
    /// Bytes in `outbox`.
    queued: usize,
    /// The protocol or the drain says to close once the outbox is written.
    close_when_written: bool,
    /// The peer has sent everything it will.
    eof: bool,
    /// The room for a request the accept loop took before accepting: the first request runs in
    /// it, so the worker never accepts more connections than it can serve (`None` for a
    /// connection accepted while the whole pool was saturated, or handed over).
    reserved: Option<Room>,
    /// The drain has been seen by the loop (its wake-up is spent).
    drain_seen: bool,
    /// When an idle connection of a draining worker without a channel closes.
    quiet_until: Option<Instant>,
    /// The host is leaving ([`Conn::leave`]): nothing is handed over any more.
    leaving: bool,
    /// When the last answer was queued: the keep-alive timeout counts from there.
    idle_since: Instant,
    /// When the reserved room goes back if no request has taken it.
    grace_until: Instant,
    /// Accepted here and no request has arrived yet: held to `request_read_timeout` from accept.
    fresh: bool,
    /// When the request being read must be complete; `None` while none is being read.
    read_deadline: Option<Instant>,
    /// Requests delivered (run, rejected or answered from the scoreboard) and not yet answered.
    in_flight: usize,
    /// The request running in the application, for `request_timeout`. One at most: the core
    /// refuses a second concurrent request on a connection (`max_requests_per_conn` 1).
    running: Option<Running>,
    /// A request timed out: what its handler still sends is discarded, and the connection
    /// closes once the answer is written.
    timed_out: bool,
    /// How many times the request whose first bytes are in `buf` has moved between workers
    /// already: at [`MAX_MOVES`](placement::MAX_MOVES) it is served here, room or not (see [`Conn::place`]).
    moves: u8,
    /// A request waits undecoded for room (see [`Conn::place`]).
    pub(crate) waiting: bool,
    /// When a waiting request looks again at the latest, if it waits behind a request that
    /// started (see [`Conn::place`]).
    pub(crate) relook_at: Option<Instant>,
    /// Looks taken for the request that waits.
    looks: u8,
    /// The request delivered and not yet answered, and its flag saying its client left: set
    /// at an abort or at the connection's end, so that if it still waits it is never run.
    left: Option<(u16, Arc<AtomicBool>)>,
}

impl Conn {
    /// A connection whose first bytes, `carried`, were read by the worker it comes from.
    pub(crate) fn new(
        rules: Rules,
        reserved: Option<Room>,
        carried: &Carried,
        now: Instant,
    ) -> Conn {
        let (carried, moves) = (&carried.bytes[..], carried.moves);
        let mut buf = BytesMut::with_capacity(READ_BUFFER.max(carried.len() + READ_RESERVE));
        buf.extend_from_slice(carried);
        Conn {
            rules,
            fcgi: ServerConnection::new(rules.limits),
            buf,
            bodies: Bodies::new(&rules.limits),
            outbox: VecDeque::new(),
            queued: 0,
            close_when_written: false,
            eof: false,
            reserved,
            drain_seen: false,
            quiet_until: None,
            leaving: false,
            idle_since: now,
            grace_until: now + FIRST_REQUEST_GRACE,
            fresh: false,
            read_deadline: None,
            in_flight: 0,
            running: None,
            timed_out: false,
            moves,
            waiting: false,
            relook_at: None,
            looks: 0,
            left: None,
        }
    }

    /// Request `id` was handed to the rooms: `left` is to be set if its client goes.
    pub(crate) fn watch_left(&mut self, id: u16, left: Arc<AtomicBool>) {
        self.left = Some((id, left));
    }

    /// The client of request `id` (of any, with `None`) is gone.
    fn client_left(&mut self, id: Option<u16>) {
        if let Some((watched, left)) = &self.left {
            if id.is_none_or(|id| id == *watched) {
                left.store(true, Ordering::Release);
            }
        }
    }

    /// A connection just accepted at `now`: it has `request_read_timeout` to send a request.
    pub(crate) fn accepted(mut self, now: Instant) -> Conn {
        self.fresh = true;
        self.read_deadline = Some(now + self.rules.request_read_timeout);
        self
    }

    /// A request delivered to be answered: no longer reading one.
    fn arrived(&mut self) {
        self.in_flight += 1;
        self.fresh = false;
        self.read_deadline = None;
    }

    /// The next request among the complete records already read, or one the protocol core
    /// refused; body records on the way are fed to their requests. `None` once nothing more
    /// can be decoded now.
    pub(crate) fn next_request(&mut self) -> Result<Option<Arrived>, fcgi::Error> {
        while !self.bodies.waiting() && !self.close_when_written {
            match self.fcgi.decode(&mut self.buf)? {
                None => break,
                Some(Event::Request(req)) => {
                    self.arrived();
                    self.request_placed();
                    return Ok(Some(Arrived::Request(req)));
                }
                Some(Event::Rejected { id, reason }) => {
                    self.arrived();
                    self.request_placed();
                    return Ok(Some(Arrived::Rejected { id, reason }));
                }
                Some(Event::Abort { id }) => {
                    self.client_left(Some(id));
                    self.bodies.on_event(Event::Abort { id });
                }
                Some(event) => self.bodies.on_event(event),
            }
        }
        Ok(None)
    }

    /// Opens the body streams of request `id`: its STDIN, and DATA for the Filter role.
    pub(crate) fn open_bodies(&mut self, id: u16, role: Role) -> (BodyReader, BodyReader) {
        self.bodies.open(id, role)
    }

    /// The room reserved at accept, for the first request.
    pub(crate) fn take_reserved(&mut self) -> Option<Room> {
        self.reserved.take()
    }

    /// No request runs, nothing waits to be fed or written.
    pub(crate) fn idle(&self) -> bool {
        self.fcgi.active() == 0 && !self.bodies.waiting() && self.outbox.is_empty()
    }

    /// The socket is read only while no body chunk waits and more input matters.
    pub(crate) fn may_read(&self) -> bool {
        !self.bodies.waiting() && !self.eof && !self.close_when_written
    }

    /// Output from requests is taken only while the outbox is below its high-water mark.
    pub(crate) fn may_take_output(&self) -> bool {
        self.queued < OUTBOX_HIGH_WATER
    }

    /// What to do before waiting again, given whether the worker is `draining`.
    pub(crate) fn decide(&mut self, now: Instant, draining: bool) -> Next {
        if let Some(control) = self.fcgi.take_output() {
            self.queue(control);
        }
        if self.outbox.is_empty() && self.close_when_written {
            if self.buf.is_empty() && !self.fcgi.expects_input() {
                // Everything the client sent has been read: closing resets nothing.
                return Next::Close;
            }
            // The answer is complete, but the client may still be sending the rest of a body
            // nobody read: closing now would reset the connection and could cost the client
            // the end of the answer.
            return Next::Linger;
        }
        let idle = self.idle();
        if idle && (self.eof || self.fcgi.wants_close()) {
            return Next::Close;
        }
        // Reading a request (bytes of one, or params begun) with none in flight: the read
        // timeout counts from its first byte; a fresh connection's counts from accept.
        let reading =
            self.in_flight == 0 && (self.fresh || !self.buf.is_empty() || self.fcgi.active() > 0);
        match (reading, self.read_deadline) {
            (true, None) => self.read_deadline = Some(now + self.rules.request_read_timeout),
            (false, Some(_)) => self.read_deadline = None,
            _ => {}
        }
        // A connection accepted with room reserved gets its first request served, drain or not.
        let drained = draining && self.reserved.is_none();
        // Draining: an idle kept-alive connection is not closed at once. nginx may be writing a
        // request into it right now, and closing on unread data would reset it: a 502 for a
        // POST, which nginx does not retry. Handed over, nothing is closed under nginx; without
        // a channel it stays readable for a quiet moment, a request that arrives is served, and
        // the connection closes once that answer is written.
        if drained && idle && self.buf.is_empty() && self.rules.can_hand_over {
            return Next::HandOver;
        }
        if drained && self.quiet_until.is_none() && !self.rules.can_hand_over {
            self.quiet_until = Some(now + DRAIN_QUIET);
        }
        Next::Continue
    }

    fn queue(&mut self, bytes: Bytes) {
        self.queued += bytes.len();
        self.outbox.push_back(bytes);
    }

    /// `written` bytes of the outbox's front went out.
    pub(crate) fn on_written(&mut self, written: std::io::Result<usize>) -> Next {
        let Ok(n) = written else { return Next::Close };
        self.queued -= n;
        if let Some(front) = self.outbox.front_mut() {
            front.advance(n);
            if front.is_empty() {
                self.outbox.pop_front();
            }
        }
        Next::Continue
    }

    /// A read into the buffer returned.
    pub(crate) fn on_read(&mut self, read: std::io::Result<usize>) -> Next {
        self.buf.reserve(READ_RESERVE);
        match read {
            Ok(0) => {
                if self.waiting {
                    // nginx closes when its client goes. What it sent is whole records of a
                    // request never decoded, not a protocol error.
                    self.buf.clear();
                    return Next::Abandon;
                }
                if let Err(e) = self.fcgi.handle_eof(&self.buf) {
                    tracing::warn!(pid = std::process::id(), error = %e, "closing fastcgi peer connection");
                    return Next::Close;
                }
                self.eof = true;
                // Bodies still open will never complete: their readers see the end.
                self.bodies.end_all();
                // nginx closes its upstream connection when its client goes: a request still
                // waiting for a room is not to run for nobody.
                self.client_left(None);
                Next::Continue
            }
            Ok(_) => Next::Continue,
            Err(_) => Next::Close,
        }
    }

    /// The waiting body chunk's channel has room (or its reader is gone: the rest is drained).
    pub(crate) fn on_body_room(&mut self, room: Result<mpsc::OwnedPermit<Bytes>, Closed>) -> Next {
        self.bodies.on_room(room);
        Next::Continue
    }

    /// Output from one of the connection's requests.
    pub(crate) fn on_output(&mut self, out: Out, now: Instant, draining: bool) -> Next {
        if self.timed_out {
            // Answered at the timeout; the stuck handler's late output goes nowhere.
            return Next::Continue;
        }
        let bytes = match out {
            Out::Chunk(records) => {
                if let Some(running) = &mut self.running {
                    running.sent = true;
                }
                records
            }
            Out::Last(id, mut tail) => {
                if self
                    .left
                    .as_ref()
                    .is_some_and(|(watched, _)| *watched == id)
                {
                    self.left = None;
                }
                self.idle_since = now;
                self.in_flight = self.in_flight.saturating_sub(1);
                if self.running.as_ref().is_some_and(|r| r.id == id) {
                    self.running = None;
                }
                self.bodies.end(id);
                self.close_when_written |= self.fcgi.end_request(id, 0, &mut tail);
                let last = draining && self.fcgi.active() == 0 && !self.rules.can_hand_over;
                self.close_when_written |= last;
                if last && self.leaving {
                    // nginx caches a kept-alive connection only when END_REQUEST ends what it
                    // read; any record after it in the same read makes nginx close the
                    // connection instead (ngx_http_fastcgi_input_filter). Without this, nginx
                    // may cache it and write a POST into it before it sees the close: a 502
                    // it does not retry. An empty management record is valid FastCGI that
                    // any client ignores, and goes out in the tail's one write.
                    fcgi::record::encode(fcgi::record::kind::GET_VALUES_RESULT, 0, &[], &mut tail);
                }
                tail.freeze()
            }
        };
        self.queue(bytes);
        Next::Continue
    }

    /// The keep-alive timer fired. One timer serves the connection's life, pushed back when it
    /// fires early: re-arming a timer for every request would cost more than the request.
    pub(crate) fn on_keepalive_tick(&self, now: Instant) -> Keepalive {
        let deadline = self.idle_since + self.rules.keepalive_timeout;
        if now >= deadline {
            Keepalive::Expired
        } else {
            Keepalive::Until(deadline)
        }
    }

    /// The whole host is leaving (the master stops): no other worker will take this
    /// connection, so it is not handed over (the master would close it under nginx). It
    /// serves what arrives, closes right after its next answer, and closes idle after
    /// [`LEAVING_IDLE`]. Call before the [`Conn::decide`] that sees the drain.
    pub(crate) fn leave(&mut self, now: Instant) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        self.rules.can_hand_over = false;
        self.quiet_until = Some(now + LEAVING_IDLE);
    }

    /// Whether [`Conn::leave`] was called.
    pub(crate) fn leaving(&self) -> bool {
        self.leaving
    }

    /// The worker started draining; the next [`Conn::decide`] acts on it.
    pub(crate) fn on_drain_started(&mut self) -> Next {
        self.drain_seen = true;
        Next::Continue
    }
}

/// How serving a connection ended: either way the halves come back, so that the caller closes
/// or hands over the socket whole (dropping a tokio write half would first `shutdown` it, a
/// system call per connection that a close does anyway).
pub(crate) enum Ended<Rd, Wr> {
    /// To be closed.
    Closed(Rd, Wr),
    /// To be handed over, with the bytes read and not yet decoded.
    HandOver(Rd, Wr, Carried),
}

/// Serves one connection until the peer closes it, the protocol says to, or the worker drains;
/// gives it back whole, with the bytes read and not yet decoded, when it is to be handed over.
/// `reserved`: see [`Conn`]; `carried`: the bytes its previous owner read.
pub(crate) async fn serve<Rd, Wr>(
    mut rd: Rd,
    mut wr: Wr,
    worker: Arc<Worker>,
    reserved: Option<Room>,
    fresh: bool,
    carried: Carried,
    alive: Alive,
) -> Ended<Rd, Wr>
where
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin,
{
    let now = Instant::now();
    let mut conn = Conn::new(worker.rules(), reserved, &carried, now);
    drop(carried);
    if fresh {
        conn = conn.accepted(now);
    }
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(OUT_CHANNEL);
    // Futures that live as long as the connection: built and registered once, not on every
    // turn of the loop. Draining only ever goes from false to true, so one wait is enough.
    let mut drain = worker.drain.subscribe();
    let drain_starts = drain.changed();
    let migrate = worker.migrate.notified();
    let read_timer = tokio::time::sleep(if conn.reserved.is_some() {
        FIRST_REQUEST_GRACE
    } else {
        worker.settings.request_read_timeout
    });
    let request_timer =
        tokio::time::sleep(worker.settings.request_timeout.unwrap_or(Duration::ZERO));
    let keepalive = tokio::time::sleep(worker.settings.keepalive_timeout);
    let relook = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(
        drain_starts,
        migrate,
        read_timer,
        request_timer,
        keepalive,
        relook
    );
    loop {
        // One reading of the clock for this turn's decisions: they take microseconds.
        let now = Instant::now();
        // A request that would wait here behind a slow one goes to a worker with room.
        let place = conn.place(
            now,
            || worker.rooms.has_room(),
            || worker.running_for(),
            || worker.board.other_idle(worker.slot),
        );
        // Re-armed only when it would fire too late: one that fires early just has the request
        // placed again (every registration costs the event loop a wake-up).
        if let Some(at) = conn.relook_at {
            if relook.deadline() <= now || at < relook.deadline() {
                relook.as_mut().reset(at);
            }
        }
        if place == Place::Elsewhere {
            tracing::debug!(
                pid = std::process::id(),
                carried = conn.buf.len(),
                moves = conn.moves,
                "no room for a request: its connection moves to a worker with room"
            );
            let carried = conn.take_read();
            return Ended::HandOver(rd, wr, carried);
        }
        loop {
            if place != Place::Here {
                break;
            }
            match conn.next_request() {
                Ok(Some(Arrived::Request(req))) => {
                    start_request(&worker, &mut conn, req, &out_tx, &alive)
                }
                Ok(Some(Arrived::Rejected { id, reason })) => reject(id, reason, &out_tx),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(pid = std::process::id(), error = %e, "closing fastcgi peer connection");
                    return Ended::Closed(rd, wr);
                }
            }
        }
        let draining = *worker.drain.borrow();
        // Set before the drain it comes with, so no decision hands over on a leaving host.
        if !conn.leaving() && worker.leaving.load(std::sync::atomic::Ordering::Acquire) {
            conn.leave(now);
        }
        let next = match conn.decide(now, draining) {
            Next::Continue => tokio::select! {
                written = write_front(&mut wr, &conn.outbox), if !conn.outbox.is_empty() => conn.on_written(written),
                read = rd.read_buf(&mut conn.buf), if conn.may_read() => conn.on_read(read),
                room = conn.bodies.wait_for_room(), if conn.bodies.waiting() => conn.on_body_room(room),
                Some(out) = out_rx.recv(), if conn.may_take_output() => {
                    conn.on_output(out, Instant::now(), *worker.drain.borrow())
                }
                () = &mut keepalive, if conn.idle() => match conn.on_keepalive_tick(Instant::now()) {
                    Keepalive::Expired => Next::Close,
                    Keepalive::Until(deadline) => {
                        keepalive.as_mut().reset(deadline);
                        Next::Continue
                    }
                },
                () = &mut read_timer, if conn.read_timer_armed() => match conn.on_read_timer(Instant::now()) {
                    Timer::Expired => {
                        read_timed_out(worker.settings.request_read_timeout);
                        Next::Close
                    }
                    Timer::Until(deadline) => {
                        read_timer.as_mut().reset(deadline);
                        Next::Continue
                    }
                },
                () = &mut request_timer, if conn.request_timer_armed() => {
                    match conn.on_request_timer(Instant::now(), crate::clock::now()) {
                        Timer::Expired => request_timed_out(&worker, &mut conn),
                        Timer::Until(deadline) => request_timer.as_mut().reset(deadline),
                    }
                    Next::Continue
                }
                _ = &mut drain_starts, if conn.idle() && !conn.drain_seen => conn.on_drain_started(),
                () = sleep_until_opt(conn.quiet_until), if conn.idle() && conn.quiet_until.is_some() => Next::Close,
                () = &mut migrate, if conn.may_migrate() || conn.waiting => {
                    if conn.waiting {
                        // The busy check says one request has held the worker for long: the
                        // waiting request looks again, and this wait is made anew.
                        migrate.set(worker.migrate.notified());
                        Next::Continue
                    } else {
                        Next::HandOver
                    }
                }
                // Waiting undecoded for room: a room freed here (one freed while nobody waited
                // leaves a permit, so none is missed between `place` and this wait).
                () = worker.rooms.freed(), if conn.waiting => Next::Continue,
                () = &mut relook, if conn.relook_at.is_some() => Next::Continue,
            },
            decided => decided,
        };
        match next {
            Next::Continue => {}
            Next::Close => return Ended::Closed(rd, wr),
            Next::Abandon => {
                abandoned(&worker, "");
                return Ended::Closed(rd, wr);
            }
            Next::Linger => {
                linger(&mut rd, &mut wr).await;
                return Ended::Closed(rd, wr);
            }
            Next::HandOver => {
                let carried = conn.take_read();
                return Ended::HandOver(rd, wr, carried);
            }
        }
    }
}

/// What the records read so far hold.
pub(crate) enum Arrived {
    /// A complete request, to run.
    Request(fcgi::server::Request),
    /// A request the protocol core refused (its params are over a limit); it is answered
    /// here and its remaining records are discarded by the core.
    Rejected {
        /// The request.
        id: u16,
        /// Which limit.
        reason: fcgi::server::Rejection,
    },
}

/// Answers a refused request `431 Request Header Fields Too Large` (nginx passes the status to
/// the client); the connection stays usable. Logged once per episode.
fn reject(id: u16, reason: fcgi::server::Rejection, out: &mpsc::Sender<Out>) {
    EPISODES.rejected.hit(
        || {
            tracing::warn!(
                pid = std::process::id(),
                %reason,
                "request params over the limit: answering 431 (counted until quiet)"
            )
        },
        |requests| {
            tracing::info!(
                pid = std::process::id(),
                requests,
                "requests answered 431: episode over"
            )
        },
    );
    let res = crate::app::response::status(http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    send_in_runtime(out, crate::worker::output::encode(id, res, out));
}

/// Starts one request: the status page and the ping are answered here, from the scoreboard,
/// with no room and no handler; anything else runs once it has room.
fn start_request(
    worker: &Arc<Worker>,
    conn: &mut Conn,
    req: fcgi::server::Request,
    out: &mpsc::Sender<Out>,
    alive: &Alive,
) {
    if let Some(page) = crate::worker::status::answer(&worker.settings.status, &worker.board, &req)
    {
        let w = fcgi::response::ResponseWriter::new(req.id);
        let mut records = BytesMut::with_capacity(
            fcgi::record::stream_encoded_len(page.len()) + crate::worker::output::TAIL_RECORDS_LEN,
        );
        w.stdout(&page, &mut records);
        w.finish(&mut records);
        send_in_runtime(out, Out::Last(req.id, records));
        return;
    }
    let (body, data) = conn.open_bodies(req.id, req.role);
    let request = Request {
        role: req.role,
        params: req.params,
        body,
        data,
    };
    let started = Arc::new(AtomicU64::new(0));
    if worker.settings.request_timeout.is_some() {
        let method = request.method().to_string();
        conn.track(
            req.id,
            Arc::clone(&started),
            method,
            request.uri().to_string(),
        );
    }
    let left = Arc::new(AtomicBool::new(false));
    conn.watch_left(req.id, Arc::clone(&left));
    let waiting = Waiting {
        id: req.id,
        request,
        out: out.clone(),
        alive: alive.clone(),
        started,
        left,
    };
    worker
        .rooms
        .start_or_wait(waiting, conn.take_reserved(), crate::clock::now());
}

/// A request that waited for a room and will not run: past `queue_timeout` or over
/// `max_queue` it is answered `503 Service Unavailable` with `Retry-After` (nginx passes both
/// to its client); abandoned, it gets only its END_REQUEST, which nobody reads. Counted in
/// the scoreboard, logged once per episode. Called from the event loop, or from a handler
/// thread whose finished request handed its room on.
pub(crate) fn refuse(worker: &Worker, waiting: Waiting, why: Refused) {
    // Answering and the episode's timer need the runtime's context, which a handler thread
    // lacks.
    let _inside = worker.runtime.enter();
    let settings = &worker.settings.admission;
    let (uri, id) = (waiting.request.uri().to_string(), waiting.id);
    let pid = std::process::id();
    let answer = match why {
        Refused::Abandoned => {
            abandoned(worker, &uri);
            Out::Last(id, BytesMut::new())
        }
        Refused::QueueTimeout | Refused::QueueFull => {
            worker.board.add_refused(why);
            if why == Refused::QueueTimeout {
                let queue_timeout_ms =
                    settings.queue_timeout.unwrap_or_default().as_millis() as u64;
                EPISODES.queue_timeout.hit(
                    || tracing::warn!(pid, queue_timeout_ms, uri, "requests waited queue_timeout for a room: answering 503 (counted until quiet); add workers or raise max_requests_in_flight"),
                    move |requests| tracing::info!(pid, requests, "requests answered 503 at queue_timeout: episode over"),
                );
            } else {
                let max_queue = settings.max_queue.unwrap_or_default();
                EPISODES.queue_full.hit(
                    || tracing::warn!(pid, max_queue, uri, "max_queue requests wait for a room: answering 503 at once (counted until quiet); add workers or raise max_queue"),
                    move |requests| tracing::info!(pid, requests, "requests answered 503 over max_queue: episode over"),
                );
            }
            let mut res = crate::app::response::status(http::StatusCode::SERVICE_UNAVAILABLE);
            res.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(RETRY_AFTER_SECS),
            );
            crate::worker::output::encode(id, res, &waiting.out)
        }
    };
    send_in_runtime(&waiting.out, answer);
}

/// A waiting request's client is gone (`uri`, if it was decoded): it is dropped unrun, counted
/// in the scoreboard, and logged once per episode.
fn abandoned(worker: &Worker, uri: &str) {
    worker.board.add_refused(Refused::Abandoned);
    let pid = std::process::id();
    EPISODES.abandoned.hit(
        || {
            tracing::info!(
                pid,
                uri,
                "a waiting request's client is gone: dropped unrun (counted until quiet)"
            )
        },
        move |requests| {
            tracing::info!(
                pid,
                requests,
                "waiting requests dropped, their client gone: episode over"
            )
        },
    );
}

/// Half-closes, then drains what the client still sends for at most [`LINGER`].
async fn linger<Rd, Wr>(rd: &mut Rd, wr: &mut Wr)
where
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin,
{
    let _ = wr.shutdown().await;
    let mut sink = [0u8; READ_BUFFER];
    let drain = async { while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn write_front<Wr: AsyncWrite + Unpin>(
    wr: &mut Wr,
    outbox: &VecDeque<Bytes>,
) -> std::io::Result<usize> {
    match outbox.front() {
        Some(front) => wr.write(front).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
