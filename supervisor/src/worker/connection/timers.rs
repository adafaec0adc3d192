//! A connection's deadlines for the request it reads and the request it runs: the first
//! request's grace and `request_read_timeout` (one read timer), and `request_timeout`, answered
//! here `504` (one request timer). Each timer is set once and pushed back when it fires early;
//! the rules are [`Conn`] methods with time as a parameter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Conn;
use crate::app::body::Out;
use crate::worker::episode::EPISODES;
use crate::worker::Worker;

/// A request running in the application, as its connection watches it for `request_timeout`.
pub(crate) struct Running {
    pub(super) id: u16,
    /// When it got its room and started, in microseconds of [`crate::clock::now`]; 0 while it
    /// waits for room (a queued request has not started, and its worker is not stuck).
    pub(super) started: Arc<AtomicU64>,
    method: String,
    uri: String,
    /// Part of its response went out: the status is sent, so a timeout cannot answer 504.
    pub(super) sent: bool,
}

/// What a request timer found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    /// The bound is reached.
    Expired,
    /// Not yet: fire again then.
    Until(Instant),
}

impl Conn {
    /// Whether the read timer matters: a reserved room to give back, or a request being read.
    pub(crate) fn read_timer_armed(&self) -> bool {
        self.reserved.is_some() || self.read_deadline.is_some()
    }

    /// The read timer fired: past [`FIRST_REQUEST_GRACE`](super::FIRST_REQUEST_GRACE) the reserved room goes back to the
    /// worker; past the read deadline the connection is to close.
    pub(crate) fn on_read_timer(&mut self, now: Instant) -> Timer {
        if self.reserved.is_some() && now >= self.grace_until {
            self.reserved = None;
        }
        match self.read_deadline {
            Some(deadline) if now >= deadline => Timer::Expired,
            deadline => {
                let grace = self.reserved.as_ref().map(|_| self.grace_until);
                let next = match (grace, deadline) {
                    (Some(g), Some(d)) => g.min(d),
                    (g, d) => g.or(d).unwrap_or(now),
                };
                Timer::Until(next)
            }
        }
    }

    /// Watches request `id`, started (once it has its room) at the time `started` holds.
    pub(crate) fn track(&mut self, id: u16, started: Arc<AtomicU64>, method: String, uri: String) {
        self.running = Some(Running {
            id,
            started,
            method,
            uri,
            sent: false,
        });
    }

    /// Whether the request timer matters: a request runs and `request_timeout` is set.
    pub(crate) fn request_timer_armed(&self) -> bool {
        self.running.is_some() && self.rules.request_timeout.is_some()
    }

    /// The request timer fired at `now` (`clock` is [`crate::clock::now`] at the same moment):
    /// whether the running request is past `request_timeout`, counted from when it started.
    pub(crate) fn on_request_timer(&self, now: Instant, clock: Duration) -> Timer {
        let (Some(running), Some(timeout)) = (&self.running, self.rules.request_timeout) else {
            // Disarmed (see `request_timer_armed`): the deadline is not looked at.
            return Timer::Until(now);
        };
        let started = running.started.load(Ordering::Acquire);
        if started == 0 {
            // Still waiting for room: it cannot time out before a full timeout from now.
            return Timer::Until(now + timeout);
        }
        let elapsed = clock.saturating_sub(Duration::from_micros(started));
        if elapsed >= timeout {
            Timer::Expired
        } else {
            Timer::Until(now + (timeout - elapsed))
        }
    }

    /// Answers the running request at its timeout: `504` if nothing of it went out, else the
    /// end of what did; then the connection closes once that is written. Returns the request's
    /// method and URI, and whether it was answered 504, for the log.
    pub(crate) fn time_out(&mut self, now: Instant) -> Option<(String, String, bool)> {
        let running = self.running.take()?;
        let id = running.id;
        let mut tail = if running.sent {
            let mut tail = BytesMut::new();
            fcgi::response::ResponseWriter::new(id).finish(&mut tail);
            tail
        } else {
            let res = crate::app::response::status(http::StatusCode::GATEWAY_TIMEOUT);
            // A buffered response: encoded whole, nothing sent on the channel.
            let (unused, _) = mpsc::channel(1);
            match crate::worker::output::encode(id, res, &unused) {
                Out::Last(_, tail) => tail,
                Out::Chunk(_) => BytesMut::new(),
            }
        };
        self.idle_since = now;
        self.in_flight = self.in_flight.saturating_sub(1);
        self.bodies.end(id);
        self.fcgi.end_request(id, 0, &mut tail);
        self.queue(tail.freeze());
        self.timed_out = true;
        self.close_when_written = true;
        Some((running.method, running.uri, !running.sent))
    }
}

/// A connection closed for not sending a complete request in time: counted, logged once per
/// episode.
pub(super) fn read_timed_out(timeout: Duration) {
    EPISODES.read_timeout.hit(
        || {
            tracing::warn!(
                pid = std::process::id(),
                timeout_ms = timeout.as_millis() as u64,
                "closing connections that sent no complete request within request_read_timeout (counted until quiet)"
            )
        },
        |connections| {
            tracing::info!(
                pid = std::process::id(),
                connections,
                "connections closed without a complete request: episode over"
            )
        },
    );
}

/// The running request passed `request_timeout`: it is answered now, and the worker, which has
/// a stuck thread, drains so the master replaces it.
pub(super) fn request_timed_out(worker: &Worker, conn: &mut Conn) {
    let elapsed = conn
        .running
        .as_ref()
        .map(|r| Duration::from_micros(r.started.load(Ordering::Acquire)))
        .map(|started| crate::clock::now().saturating_sub(started))
        .unwrap_or_default();
    if let Some((method, uri, answered_504)) = conn.time_out(Instant::now()) {
        tracing::error!(
            pid = std::process::id(),
            method,
            uri,
            elapsed_ms = elapsed.as_millis() as u64,
            status = if answered_504 { 504 } else { 0 },
            "request past request_timeout: answered {}; worker draining to be replaced",
            if answered_504 {
                "504"
            } else {
                "with what it had sent"
            }
        );
        worker.timed_out.store(true, Ordering::Release);
        worker.drain.send_replace(true);
    }
}
