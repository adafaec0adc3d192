//! One FastCGI connection in a worker: read records, start requests, feed their bodies, write
//! their responses. Runs on the worker's event loop; never blocks it.
//!
//! Body bytes go to the handler through a small bounded channel. While a chunk waits for room,
//! the connection stops reading the socket, so a slow application slows the client instead of
//! growing memory. Responses come back as encoded records; the tail of each (last STDOUT, empty
//! STDOUT, END_REQUEST) is written in one write.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fcgi::server::{Event, ServerConnection};
use fcgi::Role;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};

use crate::app::request::{BodyReader, Request};
use crate::app::response::Out;
use crate::worker::rooms::{start_or_wait, Room, Waiting};
use crate::worker::run::Job;

/// What every connection of a worker shares.
pub(crate) struct Context {
    pub limits: fcgi::Limits,
    pub keepalive_timeout: Duration,
    pub jobs: std::sync::mpsc::Sender<Job>,
    /// The I/O thread, which runs a request itself when it is free (see `inline.rs`).
    pub inline: Arc<crate::worker::inline::Inline<Job>>,
    /// Room for requests: at most `max_requests_in_flight` at once (see `room.rs`).
    pub rooms: crate::worker::rooms::Rooms,
    /// Becomes true when the worker drains: idle connections close, busy ones finish first.
    pub draining: watch::Receiver<bool>,
    /// Starts the drain (an accept loop that cannot go on).
    pub stop: watch::Sender<bool>,
    /// The status page and ping paths, answered here without the application.
    pub status: crate::worker::status::Paths,
    /// The scoreboard, for the status page.
    pub board: Arc<crate::scoreboard::Scoreboard>,
    /// This worker's slot.
    pub slot: usize,
    /// The socketpair to the master, for handing connections over when draining and
    /// receiving those of other workers.
    pub handover: Option<Arc<tokio::net::UnixStream>>,
    /// Tells idle kept-alive connections to move to a worker with room: this one has been busy
    /// a while (see [`BUSY_MIGRATE_AFTER`]).
    pub migrate: Notify,
    /// Whether a busy check is already scheduled.
    pub busy_check: AtomicBool,
    /// A request on an open connection took the room the accept loop had parked: the accept
    /// loop waits for room again before it accepts, so requests already here go first.
    pub wanted: Notify,
    /// The worker's runtime, for tasks started from handler threads.
    pub runtime: tokio::runtime::Handle,
    /// Dropped with the last reference to the context: the worker waits for that to exit.
    pub _done: mpsc::Sender<()>,
}

/// Record-sized chunks of body one request buffers before the socket stops being read.
fn body_chunks(limits: &fcgi::Limits) -> usize {
    (limits.max_buffered_body / fcgi::record::MAX_CONTENT_LEN).max(1)
}

struct Streams {
    id: u16,
    stdin: Option<mpsc::Sender<Bytes>>,
    data: Option<mpsc::Sender<Bytes>>,
}

/// How long the room reserved at accept waits for the connection's first request before it is
/// given back: nginx sends its request at once, a client that sends nothing must not keep a
/// worker from accepting.
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(2);

/// Serves one connection until the peer closes it, the protocol says to, or the worker drains.
/// `reserved` is the room for a request the accept loop took before accepting: the first
/// request runs in it, so the worker never accepts more connections than it can serve (it is
/// `None` for a connection accepted while the whole pool was saturated).
pub(crate) async fn serve<Rd, Wr>(
    mut rd: Rd,
    mut wr: Wr,
    ctx: Arc<Context>,
    reserved: Option<Room>,
) -> Option<(Rd, Wr)>
where
    Rd: AsyncRead + Unpin,
    Wr: AsyncWrite + Unpin,
{
    let mut conn = ServerConnection::new(ctx.limits);
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(8);
    let mut streams: Vec<Streams> = Vec::new();
    // A body chunk waiting for room in its request's channel; reading pauses meanwhile.
    let mut pending: Option<Bytes> = None;
    let mut pending_tx: Option<mpsc::Sender<Bytes>> = None;
    // Encoded output not yet written. Writing never blocks reading: a client that sends a large
    // body before it reads the response (libfcgi, our own client) must not deadlock us.
    let mut outbox: VecDeque<Bytes> = VecDeque::new();
    let mut queued = 0usize;
    let mut close_when_written = false;
    // Futures that live as long as the connection: built and registered once, not on every
    // turn of the loop. Draining only ever goes from false to true, so one wait is enough.
    let mut draining = ctx.draining.clone();
    let drain_starts = draining.changed();
    tokio::pin!(drain_starts);
    let mut drain_seen = false;
    let migrate = ctx.migrate.notified();
    tokio::pin!(migrate);
    let mut eof = false;
    let peer = "fastcgi peer";
    let mut reserved = reserved;
    let give_back = tokio::time::sleep(FIRST_REQUEST_WAIT);
    tokio::pin!(give_back);
    let mut quiet_until: Option<tokio::time::Instant> = None;
    // One timer for the connection's life, pushed back when it fires early: re-arming a timer
    // for every request would cost more than the request.
    let mut idle_since = tokio::time::Instant::now();
    let keepalive = tokio::time::sleep(ctx.keepalive_timeout);
    tokio::pin!(keepalive);

    loop {
        // Take every complete record already buffered.
        while pending.is_none() && !close_when_written {
            let event = match conn.decode(&mut buf) {
                Ok(Some(Event::Rejected { reason, .. })) => {
                    // TODO(issue 12): answer 431 and keep the connection, instead of closing
                    // it as a protocol error did before the core reported this per request.
                    tracing::warn!(pid = std::process::id(), error = %reason, "closing {peer} connection");
                    return None;
                }
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(pid = std::process::id(), error = %e, "closing {peer} connection");
                    return None;
                }
            };
            if let Some((tx, chunk)) = dispatch(event, &ctx, &out_tx, &mut streams, &mut reserved) {
                pending_tx = Some(tx);
                pending = Some(chunk);
            }
        }
        if let Some(control) = conn.take_output() {
            queued += control.len();
            outbox.push_back(control);
        }
        if outbox.is_empty() && close_when_written {
            if buf.is_empty() && !conn.expects_input() {
                // Everything the client sent has been read: closing resets nothing.
                return None;
            }
            // The answer is complete, but the client may still be sending the rest of a body
            // nobody read: closing now would reset the connection and could cost the client
            // the end of the answer. Half-close, drain what still comes, then close.
            let _ = wr.shutdown().await;
            let mut sink = [0u8; 16 * 1024];
            let drain = async { while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {} };
            let _ = tokio::time::timeout(LINGER, drain).await;
            return None;
        }
        let idle = conn.active() == 0 && pending.is_none() && outbox.is_empty();
        // A connection accepted with room reserved gets its first request served, drain or not.
        let drained = *ctx.draining.borrow() && reserved.is_none();
        if idle && (eof || conn.wants_close()) {
            return None;
        }
        // Draining: an idle kept-alive connection is not closed at once. nginx may be writing a
        // request into it right now, and closing on unread data would reset it: a 502 for a
        // POST, which nginx does not retry. It stays readable for a quiet moment; a request
        // that arrives is served, and the connection closes once that answer is written.
        if drained && idle && buf.is_empty() && ctx.handover.is_some() {
            // Hand the connection to a worker that stays; nothing is closed under nginx.
            return Some((rd, wr));
        }
        if drained && quiet_until.is_none() && ctx.handover.is_none() {
            quiet_until = Some(tokio::time::Instant::now() + DRAIN_QUIET);
        }

        if pending.is_none() {
            pending_tx = None;
        }
        tokio::select! {
            written = write_front(&mut wr, &outbox), if !outbox.is_empty() => match written {
                Ok(n) => {
                    queued -= n;
                    if let Some(front) = outbox.front_mut() {
                        front.advance(n);
                        if front.is_empty() {
                            outbox.pop_front();
                        }
                    }
                }
                Err(_) => return None,
            },
            read = rd.read_buf(&mut buf), if pending.is_none() && !eof && !close_when_written => {
                buf.reserve(4 * 1024);
                match read {
                    Ok(0) => {
                        if let Err(e) = conn.handle_eof(&buf) {
                            tracing::warn!(pid = std::process::id(), error = %e, "closing {peer} connection");
                            return None;
                        }
                        eof = true;
                        // Bodies still open will never complete: their readers see the end.
                        streams.clear();
                    }
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            room = reserve(&pending_tx), if pending.is_some() => {
                // A closed channel means the handler stopped reading: the rest is drained.
                if let (Ok(permit), Some(chunk)) = (room, pending.take()) {
                    permit.send(chunk);
                }
                pending = None;
            }
            Some(out) = out_rx.recv(), if queued < OUTBOX_HIGH_WATER => {
                let bytes = match out {
                    Out::Chunk(records) => records,
                    Out::Last(id, mut tail) => {
                        idle_since = tokio::time::Instant::now();
                        streams.retain(|s| s.id != id);
                        close_when_written |= conn.end_request(id, 0, &mut tail);
                        close_when_written |=
                            *ctx.draining.borrow() && conn.active() == 0 && ctx.handover.is_none();
                        tail.freeze()
                    }
                };
                queued += bytes.len();
                outbox.push_back(bytes);
            }
            () = &mut keepalive, if idle => {
                let deadline = idle_since + ctx.keepalive_timeout;
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                keepalive.as_mut().reset(deadline);
            }
            () = &mut give_back, if reserved.is_some() => reserved = None,
            _ = &mut drain_starts, if idle && !drain_seen => drain_seen = true,
            _ = sleep_until_opt(quiet_until), if idle && quiet_until.is_some() => return None,
            // This worker is busy with a long request and another has room: move there, so
            // nginx's next request on this connection does not wait behind the long one.
            () = &mut migrate, if idle && buf.is_empty() && reserved.is_none() && ctx.handover.is_some() => {
                return Some((rd, wr));
            }
        }
    }
}

/// How long a finished connection keeps draining input its client still sends before it is
/// closed anyway.
const LINGER: Duration = Duration::from_secs(1);

/// How long an idle kept-alive connection of a draining worker stays readable before it
/// closes: long enough to catch a request nginx is writing at that moment.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Output queued beyond which the handler's sends wait: a few records, so a slow client slows
/// the application instead of growing memory.
const OUTBOX_HIGH_WATER: usize = 256 * 1024;

async fn write_front<Wr: AsyncWrite + Unpin>(
    wr: &mut Wr,
    outbox: &VecDeque<Bytes>,
) -> std::io::Result<usize> {
    match outbox.front() {
        Some(front) => wr.write(front).await,
        None => std::future::pending().await,
    }
}

/// How long a worker must stay busy before its idle kept-alive connections move to a worker
/// with room: longer than a fast request, so fast traffic never moves connections around.
pub(crate) const BUSY_MIGRATE_AFTER: Duration = Duration::from_millis(25);

/// After a request starts, looks again a little later: if the worker is still at its cap and
/// another has room, the idle connections move (at most one check in flight).
pub(crate) fn schedule_busy_check(ctx: &Arc<Context>) {
    if ctx.handover.is_none() || ctx.busy_check.swap(true, Ordering::AcqRel) {
        return;
    }
    let ctx = Arc::clone(ctx);
    // Also called from handler threads, outside the runtime.
    ctx.runtime.clone().spawn(async move {
        let slot = ctx.board.slot(ctx.slot);
        loop {
            tokio::time::sleep(BUSY_MIGRATE_AFTER).await;
            if slot.state() != crate::scoreboard::SlotState::Busy || *ctx.draining.borrow() {
                break;
            }
            // Busy with one request that has run that long, not with a stream of fast ones.
            let running = crate::clock::now().saturating_sub(slot.since());
            if running >= BUSY_MIGRATE_AFTER && ctx.board.other_idle(ctx.slot) {
                ctx.migrate.notify_waiters();
                tracing::debug!(
                    pid = std::process::id(),
                    running_ms = running.as_millis() as u64,
                    "busy with a long request: idle connections move to a worker with room"
                );
                break;
            }
        }
        ctx.busy_check.store(false, Ordering::Release);
    });
}

async fn reserve(
    tx: &Option<mpsc::Sender<Bytes>>,
) -> Result<mpsc::Permit<'_, Bytes>, mpsc::error::SendError<()>> {
    match tx {
        Some(tx) => tx.reserve().await,
        None => std::future::pending().await,
    }
}

/// Acts on one event; returns a body chunk that must wait for room.
fn dispatch(
    event: Event,
    ctx: &Arc<Context>,
    out: &mpsc::Sender<Out>,
    streams: &mut Vec<Streams>,
    reserved: &mut Option<Room>,
) -> Option<(mpsc::Sender<Bytes>, Bytes)> {
    match event {
        Event::Request(req) => {
            if let Some(page) = crate::worker::status::answer(&ctx.status, &ctx.board, &req) {
                // Answered on this thread, from the scoreboard: no room needed, no handler.
                let w = fcgi::response::ResponseWriter::new(req.id);
                let mut records = BytesMut::with_capacity(page.len() + 64);
                w.stdout(&page, &mut records);
                w.finish(&mut records);
                crate::app::response::send_in_runtime(out, Out::Last(req.id, records));
                return None;
            }
            let chunks = body_chunks(&ctx.limits);
            let (stdin_tx, stdin_rx) = mpsc::channel(chunks);
            let (data, data_tx) = if req.role == Role::Filter {
                let (tx, rx) = mpsc::channel(chunks);
                (BodyReader::new(rx), Some(tx))
            } else {
                (BodyReader::empty(), None)
            };
            streams.push(Streams {
                id: req.id,
                stdin: Some(stdin_tx),
                data: data_tx,
            });
            let request = Request {
                role: req.role,
                params: req.params,
                body: BodyReader::new(stdin_rx),
                data,
            };
            let waiting = Waiting {
                id: req.id,
                request,
                out: out.clone(),
            };
            start_or_wait(ctx, waiting, reserved);
            None
        }
        Event::Stdin { id, data } => feed(streams, id, data, |s| &mut s.stdin),
        Event::Data { id, data } => feed(streams, id, data, |s| &mut s.data),
        Event::StdinEnd { id } => {
            close(streams, id, |s| &mut s.stdin);
            None
        }
        Event::DataEnd { id } => {
            close(streams, id, |s| &mut s.data);
            None
        }
        Event::Abort { id } => {
            // The handler sees its body end early; whatever it answers goes to a client that
            // no longer waits, and END_REQUEST closes the request.
            close(streams, id, |s| &mut s.stdin);
            close(streams, id, |s| &mut s.data);
            None
        }
        // Closed in `serve` before it gets here (TODO(issue 12): answer 431).
        Event::Rejected { .. } => None,
    }
}

fn feed(
    streams: &mut [Streams],
    id: u16,
    data: Bytes,
    which: impl Fn(&mut Streams) -> &mut Option<mpsc::Sender<Bytes>>,
) -> Option<(mpsc::Sender<Bytes>, Bytes)> {
    let s = streams.iter_mut().find(|s| s.id == id)?;
    let tx = which(s).as_ref()?;
    match tx.try_send(data) {
        Ok(()) => None,
        Err(mpsc::error::TrySendError::Full(data)) => Some((tx.clone(), data)),
        // The handler is done with the body: what is left is drained, not an error.
        Err(mpsc::error::TrySendError::Closed(_)) => None,
    }
}

fn close(
    streams: &mut [Streams],
    id: u16,
    which: impl Fn(&mut Streams) -> &mut Option<mpsc::Sender<Bytes>>,
) {
    if let Some(s) = streams.iter_mut().find(|s| s.id == id) {
        *which(s) = None;
    }
}
