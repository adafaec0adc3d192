//! Where a request that reaches an idle kept-alive connection is served: here, or at another
//! worker, the connection carried there with the bytes read ([`Conn::place`]); and when an idle
//! connection of a busy worker moves ([`Conn::may_migrate`]). Pure rules: the loop in
//! `connection.rs` asks, with the clock and the scoreboard's figures as parameters.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::Conn;
use crate::passing::MAX_CARRIED;

/// How long the request holding this worker's room must have run before a request that finds
/// no room here moves to a worker with room. A fast request ends within microseconds, so a
/// request that arrives behind one waits for it here, undecoded, and is served here; moving
/// costs both workers more than that (bench/ab: with a move whenever another worker showed
/// room, one request in five moved under saturation and the pool did 0.78x the requests). One
/// that has run this long is slow: the request behind it moves, so it waits at most this long
/// behind a slow neighbour while another worker has room.
pub(super) const SLOW_AFTER: Duration = Duration::from_millis(1);

/// Looks a request takes behind a slow request, in a pool with no room anywhere, before it
/// queues here: one every [`SLOW_AFTER`], so about this many milliseconds; then it waits in the
/// worker's queue, where `queue_timeout` and `max_queue` govern it. (Waits for a room freed
/// here are not counted: the rooms freed bound them.)
pub(super) const MAX_LOOKS: u8 = 8;

/// How many times one request may move between workers: each move is to a worker that showed
/// room, so more than one is rare (it filled up as the request arrived); the bound keeps a
/// request from bouncing between workers that keep filling up.
pub(super) const MAX_MOVES: u8 = 3;

/// What a connection brings from its previous owner.
#[derive(Debug, Default)]
pub(crate) struct Carried {
    /// Read and not yet decoded: they come first.
    pub bytes: Bytes,
    /// How many times the request they begin has moved, this move included (0 if none).
    pub moves: u8,
}

/// Where a request that reached an idle connection is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    /// Here: decode it.
    Here,
    /// At a worker with room: hand the connection over with the bytes read.
    Elsewhere,
    /// Not yet: wait undecoded for room here, and look again at `relook_at` at the latest.
    Wait,
}

impl Conn {
    /// This worker is busy with a long request and another has room: an idle connection moves
    /// there, so nginx's next request on it does not wait behind the long one.
    pub(crate) fn may_migrate(&self) -> bool {
        self.idle() && self.buf.is_empty() && self.reserved.is_none() && self.rules.can_hand_over
    }

    /// Bytes of a new request reached this idle connection: where it is served. With room here,
    /// here. Without, what decides is the request holding the room. Not started yet (it starts
    /// as soon as the event loop's turn ends): this one waits undecoded for a room freed here,
    /// or for the busy check's word that the worker has been held by one request for
    /// `BUSY_MIGRATE_AFTER`. Started less than [`SLOW_AFTER`] ago: it waits for a room freed
    /// here, or until that request turns slow. Slow: it moves, with the bytes read, to a worker
    /// with room; with no room anywhere it looks again every [`SLOW_AFTER`], and after
    /// [`MAX_LOOKS`] it queues here. A fast request ends within microseconds, so fast traffic is
    /// served where it arrives, with no timer set. Only before anything is decoded (nothing of
    /// the request is in the protocol core, so the next owner starts from the carried bytes),
    /// with nothing reserved here, not with a request that moved [`MAX_MOVES`] times already,
    /// and only if it carries at most [`MAX_CARRIED`]. `room_here` (is a room free),
    /// `running_here` (how long the youngest request holding a room here has run, `None` if it
    /// has not started) and `room_elsewhere` are asked only as far as the decision needs them:
    /// this runs on every read.
    pub(crate) fn place(
        &mut self,
        now: Instant,
        room_here: impl FnOnce() -> bool,
        running_here: impl FnOnce() -> Option<Duration>,
        room_elsewhere: impl FnOnce() -> bool,
    ) -> Place {
        let movable = self.rules.can_hand_over
            && !self.buf.is_empty()
            && self.buf.len() <= MAX_CARRIED
            && self.moves < MAX_MOVES
            && self.reserved.is_none()
            && !self.eof
            && !self.close_when_written
            && self.idle()
            && !self.fcgi.expects_input();
        self.relook_at = None;
        self.waiting = false;
        if !movable || self.looks >= MAX_LOOKS || room_here() {
            return Place::Here;
        }
        self.waiting = true;
        let Some(running) = running_here() else {
            // No timer: registering one on every such request costs fast traffic a wake-up of
            // the event loop each (an eventfd write), and the busy check covers a slow one.
            return Place::Wait;
        };
        if running < SLOW_AFTER {
            self.relook_at = Some(now + (SLOW_AFTER - running));
            return Place::Wait;
        }
        if room_elsewhere() {
            self.waiting = false;
            return Place::Elsewhere;
        }
        // Counted only here: waits for a room freed here are bounded by the rooms freed.
        self.looks += 1;
        self.relook_at = Some(now + SLOW_AFTER);
        Place::Wait
    }

    /// A request was decoded: the next one is placed afresh.
    pub(super) fn request_placed(&mut self) {
        self.moves = 0;
        self.relook_at = None;
        self.waiting = false;
        self.looks = 0;
    }

    /// The bytes read and not yet decoded, for the connection's next owner: one move more for
    /// the request they begin, if any.
    pub(crate) fn take_read(&mut self) -> Carried {
        let bytes = self.buf.split().freeze();
        let moves = if bytes.is_empty() {
            0
        } else {
            self.moves.saturating_add(1)
        };
        Carried { bytes, moves }
    }
}
