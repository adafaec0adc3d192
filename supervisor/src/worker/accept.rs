//! Taking connections: the accept loop over every listener, connections handed over by other
//! workers (received from the master), and the other way, connections handed over when this
//! worker drains, stays busy with a long request, or has no room for a request that arrives
//! (see `passing.rs`).
//!
//! The loop accepts only while the worker has room for another request (`max_requests_in_flight`),
//! so the kernel hands new connections to a worker with room: that is how the pool balances.
//! The room is reserved for the new connection only for [`connection::FIRST_REQUEST_GRACE`];
//! a connection that has not sent a complete request by then gives it back and waits without
//! one, so silent or half-sent connections cannot keep the worker from accepting. Kept-alive
//! connections that sit idle cost nothing but a file descriptor.
//!
//! The loop also stops at `max_connections` (what `FCGI_MAX_CONNS` advertises) and, when
//! accept fails for want of a descriptor, until one of this worker's connections closes; either
//! way the kernel's queue holds the rest for the other workers, and one line per episode says so.
//!
//! A TCP connection from a peer outside `allowed_clients` is closed right after accept, before
//! a byte of it is read; the room the loop had reserved stays parked for the next connection,
//! so such peers cost a worker nothing but the accept. Unix sockets are not filtered: the
//! socket file's permissions are their access control.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::listener::ListenerSocket;
use crate::passing::{self, Inbox, Message, Passed};
use crate::scoreboard::SlotState;
use crate::worker::connection::{self, Carried};
use crate::worker::episode::EPISODES;
use crate::worker::run::Room;
use crate::worker::{Alive, Worker};

/// One inherited listener, registered with the runtime.
enum Listening {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A connection just accepted, of either kind.
enum Accepted {
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
    Unix(tokio::net::UnixStream),
}

impl AsFd for Listening {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Listening::Tcp(l) => l.as_fd(),
            Listening::Unix(l) => l.as_fd(),
        }
    }
}

impl Listening {
    fn new(socket: ListenerSocket) -> std::io::Result<Listening> {
        Ok(match socket {
            ListenerSocket::Tcp(l) => {
                l.set_nonblocking(true)?;
                Listening::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            ListenerSocket::Unix(l) => {
                l.set_nonblocking(true)?;
                Listening::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        })
    }

    fn poll_accept(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<Accepted>> {
        match self {
            Listening::Tcp(l) => l.poll_accept(cx).map_ok(|(s, peer)| Accepted::Tcp(s, peer)),
            Listening::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// The next connection on any listener, starting the scan at a rotating index so a busy
/// listener cannot starve the others.
async fn accept_any(listeners: &[Listening], turn: &mut usize) -> std::io::Result<Accepted> {
    std::future::poll_fn(|cx| {
        let n = listeners.len();
        for i in 0..n {
            let l = &listeners[(*turn + i) % n];
            if let std::task::Poll::Ready(result) = l.poll_accept(cx) {
                *turn = (*turn + i + 1) % n;
                return std::task::Poll::Ready(result);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// Accepts connections, on every listener, while the worker has room for another request.
pub(crate) async fn accept_loop(sockets: Vec<ListenerSocket>, worker: Arc<Worker>, alive: Alive) {
    let listeners = match sockets
        .into_iter()
        .map(Listening::new)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(l) => l,
        Err(e) => return fail(&worker, e),
    };
    let rooms = &worker.rooms;
    let mut turn = 0;
    // The master was woken in this episode without room (see `wake_master`).
    let mut woke = false;
    let max_conns = worker.settings.limits.max_conns;
    loop {
        let open = worker.conns.open();
        if open >= max_conns {
            EPISODES.conn_cap.hit(
                || {
                    tracing::warn!(
                        pid = std::process::id(),
                        open,
                        max_connections = max_conns,
                        "at max_connections: not accepting until a connection closes; the listen queue holds new ones for other workers"
                    )
                },
                |times| tracing::info!(pid = std::process::id(), times, "max_connections episode over"),
            );
            worker.conns.until_fewer_than(max_conns, FD_RETRY).await;
            continue;
        }
        // Normally a worker accepts only with room for the request. When the whole pool is
        // saturated it accepts anyway: the connection would only wait in the kernel's backlog,
        // and a status or ping request on it is answered at once (see `status.rs`).
        let room = match rooms.unpark() {
            // Still parked from the last turn: a wake-up that was not about the room.
            Some(room) => Some(room),
            None => tokio::select! {
                biased;
                room = rooms.acquire() => match room {
                    Some(room) => Some(room),
                    None => return,
                },
                () = pool_saturated(&worker, &listeners, &mut woke) => None,
            },
        };
        if room.is_some() {
            woke = false;
        }
        if *worker.drain.borrow() {
            return;
        }
        let (accepted, room) = match room {
            Some(room) => {
                // Parked where a request on a kept-alive connection can take it at once.
                room.park();
                tokio::select! {
                    biased;
                    // A request on a kept-alive connection took the room.
                    () = rooms.parked_room_taken() => continue,
                    accepted = accept_any(&listeners, &mut turn) => (accepted, rooms.unpark()),
                }
            }
            None => tokio::select! {
                accepted = accept_any(&listeners, &mut turn) => (accepted, None),
                // Room may have come back, or the pool may no longer be saturated: look again.
                _ = tokio::time::sleep(SATURATION_CHECK) => continue,
            },
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) if !allowed(&worker, peer) => {
                drop(stream);
                // Kept for the next connection: this one never had a request to run.
                if let Some(room) = room {
                    room.park();
                }
            }
            Ok(Accepted::Tcp(stream, _)) => {
                let _ = stream.set_nodelay(true);
                spawn_tcp(stream, &worker, room, true, Carried::default(), &alive);
            }
            Ok(Accepted::Unix(stream)) => {
                spawn_unix(stream, &worker, room, true, Carried::default(), &alive)
            }
            Err(e) if is_fd_limit(&e) => {
                drop(room);
                let open = worker.conns.open();
                EPISODES.fds.hit(
                    || {
                        tracing::warn!(
                            pid = std::process::id(),
                            open,
                            limit = open_file_limit(),
                            error = %e,
                            "at the open-file limit: not accepting until a connection closes; raise LimitNOFILE (ulimit -n) or lower max_connections"
                        )
                    },
                    |times| tracing::info!(pid = std::process::id(), times, "open-file limit episode over"),
                );
                worker.conns.until_fewer_than(open, FD_RETRY).await;
            }
            Err(e) if is_transient(&e) => backoff().await,
            Err(e) => return fail(&worker, e),
        }
    }
}

/// Whether `peer` may connect: anyone without `allowed_clients`. A refusal is logged once per
/// episode, with the first peer refused and, at its end, how many connections were.
fn allowed(worker: &Worker, peer: std::net::SocketAddr) -> bool {
    let Some(allowed) = &worker.settings.allowed_clients else {
        return true;
    };
    if allowed.allows(peer.ip()) {
        return true;
    }
    let pid = std::process::id();
    EPISODES.not_allowed.hit(
        || {
            tracing::warn!(
                pid,
                peer = %peer.ip(),
                allowed_clients = %allowed,
                "closing connections from peers not in allowed_clients (counted until quiet)"
            )
        },
        move |connections| {
            tracing::info!(
                pid,
                connections,
                "connections from peers not in allowed_clients closed: episode over"
            )
        },
    );
    false
}

/// How often a worker at its cap looks whether the whole pool is saturated.
const SATURATION_CHECK: Duration = Duration::from_millis(20);

/// Returns once no worker of the pool has room for a request. Meanwhile, wakes the master
/// once if connections wait that no worker will take (`woke` remembers it).
async fn pool_saturated(worker: &Worker, listeners: &[Listening], woke: &mut bool) {
    loop {
        if !*woke && worker.settings.pool_grows {
            *woke = wake_master(worker, listeners);
        }
        tokio::time::sleep(SATURATION_CHECK).await;
        if worker.board.saturated() {
            return;
        }
    }
}

/// A worker at its cap in a pool that can grow: when a connection waits on a listener and no
/// other worker is idle or starting, nothing will take it until the master starts a worker,
/// and the master looks only at its tick. One message on the worker's channel tells it now
/// (the master polls every channel, and any wake-up runs its maintenance pass); once per
/// episode without room, so the cost is one write per saturation, never one per request.
/// Without a channel it sends `SIGURG` instead (`Intent::Wake`), which the kernel refuses when
/// the worker runs as another user than its master. Returns whether this episode's wake is
/// done: sent, or refused, which retrying would not mend; the master's tick still comes.
fn wake_master(worker: &Worker, listeners: &[Listening]) -> bool {
    // Until its request has begun this worker's slot still says Idle, and the master, seeing
    // a worker with room, would start none: look again at the next check.
    let busy = worker.board.slot(worker.slot).state() == SlotState::Busy;
    if !busy || worker.board.saturated() || worker.board.other_ready(worker.slot) {
        return false;
    }
    let mut fds: Vec<PollFd<'_>> = listeners
        .iter()
        .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
        .collect();
    if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
        return false;
    }
    let master = nix::unistd::getppid();
    // Parent 1: the master is gone, and PR_SET_PDEATHSIG ends this worker.
    if master.as_raw() <= 1 {
        return false;
    }
    let sent = match &worker.handover {
        Some(channel) => passing::send_wake(channel.as_fd()),
        None => nix::sys::signal::kill(master, Signal::SIGURG).map_err(std::io::Error::from),
    };
    match sent {
        Ok(()) => {
            tracing::debug!(
                pid = std::process::id(),
                master = master.as_raw(),
                "at the cap with connections waiting: woke the master"
            );
            true
        }
        Err(e) => {
            tracing::debug!(pid = std::process::id(), error = %e, "cannot wake the master");
            true
        }
    }
}

/// Serves a TCP connection that starts with `carried`, `fresh` when just accepted (held to
/// `request_read_timeout` from now); hands it over when it is to move.
fn spawn_tcp(
    stream: tokio::net::TcpStream,
    worker: &Arc<Worker>,
    room: Option<Room>,
    fresh: bool,
    carried: Carried,
    alive: &Alive,
) {
    let (rd, wr) = stream.into_split();
    let origin = Origin {
        room,
        fresh,
        carried,
    };
    spawn_serve(rd, wr, worker, origin, alive, |rd, wr| {
        Some(rd.reunite(wr).ok()?.into_std().ok()?.into())
    });
}

/// Serves a unix connection that starts with `carried`; hands it over when it is to move.
fn spawn_unix(
    stream: tokio::net::UnixStream,
    worker: &Arc<Worker>,
    room: Option<Room>,
    fresh: bool,
    carried: Carried,
    alive: &Alive,
) {
    let (rd, wr) = stream.into_split();
    let origin = Origin {
        room,
        fresh,
        carried,
    };
    spawn_serve(rd, wr, worker, origin, alive, |rd, wr| {
        Some(rd.reunite(wr).ok()?.into_std().ok()?.into())
    });
}

/// Where a connection comes from, as its serving starts.
struct Origin {
    /// The room reserved at accept, for its first request.
    room: Option<Room>,
    /// Accepted here: held to `request_read_timeout` from now.
    fresh: bool,
    /// What another worker read from it before it moved here.
    carried: Carried,
}

/// Serves a connection, then makes it whole again with `reunite`: one that is to move is handed
/// over with the bytes read from it, any other is closed.
fn spawn_serve<Rd, Wr>(
    rd: Rd,
    wr: Wr,
    worker: &Arc<Worker>,
    origin: Origin,
    alive: &Alive,
    reunite: impl FnOnce(Rd, Wr) -> Option<OwnedFd> + Send + 'static,
) where
    Rd: tokio::io::AsyncRead + Unpin + Send + 'static,
    Wr: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (worker, alive) = (Arc::clone(worker), alive.clone());
    // Counted before the task runs, so the accept loop's next look at the cap sees it.
    let open = OpenConn::new(&worker);
    tokio::spawn(async move {
        let Origin {
            room,
            fresh,
            carried,
        } = origin;
        let served = connection::serve(
            rd,
            wr,
            Arc::clone(&worker),
            room,
            fresh,
            carried,
            alive.clone(),
        );
        match served.await {
            connection::Ended::HandOver(rd, wr, carried) => {
                // Handed over: no longer this worker's descriptor to count.
                drop(open);
                if let Some(fd) = reunite(rd, wr) {
                    hand_over(&worker, fd, carried, &alive);
                }
            }
            // Made whole and closed: no `shutdown` first.
            connection::Ended::Closed(rd, wr) => drop(reunite(rd, wr)),
        }
    });
}

/// The connections a worker has open, and a wake-up when one closes.
#[derive(Debug, Default)]
pub(crate) struct Conns {
    open: AtomicUsize,
    closed: tokio::sync::Notify,
}

impl Conns {
    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Returns once fewer than `n` connections are open, or after `at_most` (the descriptors
    /// may be held by something other than connections, which closes without telling us).
    async fn until_fewer_than(&self, n: usize, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, async {
            loop {
                let closed = self.closed.notified();
                tokio::pin!(closed);
                // Registered before the count is read, so a close in between is not missed.
                closed.as_mut().enable();
                if self.open() < n {
                    return;
                }
                closed.await;
            }
        })
        .await;
    }
}

/// One open connection, counted in [`Conns`] while it lives.
struct OpenConn(Arc<Worker>);

impl OpenConn {
    fn new(worker: &Arc<Worker>) -> OpenConn {
        worker.conns.open.fetch_add(1, Ordering::AcqRel);
        OpenConn(Arc::clone(worker))
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.conns.open.fetch_sub(1, Ordering::AcqRel);
        self.0.conns.closed.notify_waiters();
    }
}

/// How long the accept loop waits at a connection limit for one of its connections to close
/// before it looks again: the descriptors may be the application's, which close unseen, and
/// one retry a second costs nothing (no spin) while barely delaying the recovery.
const FD_RETRY: Duration = Duration::from_secs(1);

/// Accept failed for want of a descriptor (the process's or the system's).
fn is_fd_limit(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// This process's soft RLIMIT_NOFILE, for the log line (0 if it cannot be read).
fn open_file_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0)
}

/// Passes a connection to the master, which gives it to a worker with room. If that fails, a
/// connection with a request under way is served here after all (it is not moved again); an
/// idle one is closed, as it would have been without hand-over.
fn hand_over(worker: &Arc<Worker>, conn: OwnedFd, carried: Carried, alive: &Alive) {
    let Some(channel) = &worker.handover else {
        return;
    };
    if let Err(e) = passing::send_conn(channel.as_fd(), conn.as_fd(), &carried.bytes, carried.moves)
    {
        if carried.bytes.is_empty() {
            tracing::debug!(pid = std::process::id(), error = %e, "cannot hand an idle connection over; closing it");
        } else {
            tracing::warn!(pid = std::process::id(), error = %e, carried = carried.bytes.len(), "cannot hand a connection over; serving its request here");
            // Moved as far as it may: it stays.
            let carried = Carried {
                moves: u8::MAX,
                ..carried
            };
            serve_passed(worker, conn, carried, alive);
        }
    }
}

/// Serves a connection another worker read `carried` from.
fn serve_passed(worker: &Arc<Worker>, fd: OwnedFd, carried: Carried, alive: &Alive) {
    let served = match passing::classify(fd) {
        Ok(Passed::Tcp(s)) => s
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(s))
            .map(|s| spawn_tcp(s, worker, None, false, carried, alive)),
        Ok(Passed::Unix(s)) => s
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(s))
            .map(|s| spawn_unix(s, worker, None, false, carried, alive)),
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::warn!(pid = std::process::id(), error = %e, "cannot serve a connection passed by the master; closing it");
    }
}

/// Takes connections handed over by other workers, until this worker drains itself; returns
/// the channel's inbox, which may hold part of a message, for [`give_back`].
pub(crate) async fn receive_passed(worker: Arc<Worker>, alive: Alive) -> Inbox {
    let mut inbox = Inbox::new();
    let Some(channel) = &worker.handover else {
        return inbox;
    };
    let mut draining = worker.drain.subscribe();
    loop {
        tokio::select! {
            ready = channel.readable() => if ready.is_err() { return inbox },
            _ = draining.changed() => return inbox,
        }
        // Nothing read means the readiness was stale: say so, so it is cleared.
        let got = channel.try_io(tokio::io::Interest::READABLE, || {
            match inbox.recv(channel.as_fd()) {
                Ok(messages) if messages.is_empty() => Err(std::io::ErrorKind::WouldBlock.into()),
                got => got,
            }
        });
        match got {
            Ok(messages) => {
                for m in messages {
                    match m {
                        Message::Conn {
                            conn,
                            carried,
                            moves,
                        } => {
                            let carried = Carried {
                                bytes: carried,
                                moves,
                            };
                            serve_passed(&worker, conn, carried, &alive)
                        }
                        // Only the master is woken.
                        Message::Wake => {}
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!(pid = std::process::id(), error = %e, "the channel from the master failed; no more connections are passed to this worker");
                return inbox;
            }
        }
    }
}

/// Once drained: connections the master passed while this worker was starting to drain go
/// back to it, with their bytes, rather than die with this process.
pub(crate) fn give_back(worker: &Worker, mut inbox: Inbox) {
    let Some(channel) = &worker.handover else {
        return;
    };
    while let Ok(messages) = inbox.recv(channel.as_fd()) {
        if messages.is_empty() {
            return;
        }
        for m in messages {
            if let Message::Conn {
                conn,
                carried,
                moves,
            } = m
            {
                if let Err(e) = passing::send_conn(channel.as_fd(), conn.as_fd(), &carried, moves) {
                    tracing::warn!(pid = std::process::id(), error = %e, carried = carried.len(), "cannot give a passed connection back while draining; closing it");
                }
            }
        }
    }
}

fn fail(worker: &Worker, e: std::io::Error) {
    tracing::error!(pid = std::process::id(), error = %e, "cannot accept; worker draining");
    worker.drain.send_replace(true);
}

/// Per-connection accept failures (a peer that reset first, memory exhaustion) must not stop
/// the worker; on resource exhaustion it pauses briefly instead of spinning.
async fn backoff() {
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// The pause after an accept failure: long enough not to spin while descriptors or memory are
/// exhausted, short enough that the next connection barely notices.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM))
}

/// How long a worker must stay busy before its idle kept-alive connections move to a worker
/// with room: longer than a fast request, so fast traffic never moves connections around.
pub(crate) const BUSY_MIGRATE_AFTER: Duration = Duration::from_millis(25);

/// After a request starts, looks again a little later: if the worker is still at its cap and
/// another has room, the idle connections move (at most one check in flight).
pub(crate) fn schedule_busy_check(worker: &Arc<Worker>) {
    if worker.handover.is_none() || worker.busy_check.swap(true, Ordering::AcqRel) {
        return;
    }
    let worker = Arc::clone(worker);
    // Also called from handler threads, outside the runtime.
    worker.runtime.clone().spawn(async move {
        loop {
            tokio::time::sleep(BUSY_MIGRATE_AFTER).await;
            let Some(running) = worker.running_for() else {
                break;
            };
            if *worker.drain.borrow() {
                break;
            }
            // Busy with one request that has run that long, not with a stream of fast ones.
            if running >= BUSY_MIGRATE_AFTER && worker.board.other_idle(worker.slot) {
                worker.migrate.notify_waiters();
                tracing::debug!(
                    pid = std::process::id(),
                    running_ms = running.as_millis() as u64,
                    "busy with a long request: idle connections move to a worker with room"
                );
                break;
            }
        }
        worker.busy_check.store(false, Ordering::Release);
    });
}
