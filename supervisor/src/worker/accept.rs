//! Taking connections: the accept loop over every listener, connections handed over by draining
//! workers (received from the master), and the other way, idle connections handed over when
//! this worker drains or stays busy with a long request.
//!
//! The loop accepts only while the worker has room for another request (`max_requests_in_flight`),
//! so the kernel hands new connections to a worker with room. Kept-alive connections that sit
//! idle cost nothing but a file descriptor.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

use crate::listener::ListenerSocket;
use crate::scoreboard::SlotState;
use crate::worker::connection;
use crate::worker::run::Room;
use crate::worker::{Alive, Worker};

/// One inherited listener, registered with the runtime.
enum Listening {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// A connection just accepted, of either kind.
enum Accepted {
    Tcp(tokio::net::TcpStream),
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
            Listening::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| Accepted::Tcp(s)),
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
    loop {
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
            Ok(Accepted::Tcp(stream)) => {
                let _ = stream.set_nodelay(true);
                spawn_tcp(stream, &worker, room, &alive);
            }
            Ok(Accepted::Unix(stream)) => spawn_unix(stream, &worker, room, &alive),
            Err(e) if is_transient(&e) => backoff().await,
            Err(e) => return fail(&worker, e),
        }
    }
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
/// and the master looks only at its tick. One `SIGURG` tells it now (`Intent::Wake`); once
/// per episode without room, so the cost is a signal per saturation, never one per request.
/// Returns whether this episode's wake is done: sent, or refused by the kernel (a worker
/// running as another user than its master may not signal it), which retrying would not mend;
/// the master's tick still comes.
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
    match nix::sys::signal::kill(master, Signal::SIGURG) {
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

/// Serves a TCP connection; if the worker drains while it is idle, hands it over.
fn spawn_tcp(
    stream: tokio::net::TcpStream,
    worker: &Arc<Worker>,
    room: Option<Room>,
    alive: &Alive,
) {
    let (rd, wr) = stream.into_split();
    spawn_serve(rd, wr, worker, room, alive, |rd, wr| {
        Some(rd.reunite(wr).ok()?.into_std().ok()?.into())
    });
}

/// Serves a unix connection; if the worker drains while it is idle, hands it over.
fn spawn_unix(
    stream: tokio::net::UnixStream,
    worker: &Arc<Worker>,
    room: Option<Room>,
    alive: &Alive,
) {
    let (rd, wr) = stream.into_split();
    spawn_serve(rd, wr, worker, room, alive, |rd, wr| {
        Some(rd.reunite(wr).ok()?.into_std().ok()?.into())
    });
}

/// Serves a connection; one that comes back idle from a draining worker is made whole again
/// by `reunite` and handed over.
fn spawn_serve<Rd, Wr>(
    rd: Rd,
    wr: Wr,
    worker: &Arc<Worker>,
    room: Option<Room>,
    alive: &Alive,
    reunite: impl FnOnce(Rd, Wr) -> Option<std::os::fd::OwnedFd> + Send + 'static,
) where
    Rd: tokio::io::AsyncRead + Unpin + Send + 'static,
    Wr: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (worker, alive) = (Arc::clone(worker), alive.clone());
    tokio::spawn(async move {
        if let Some((rd, wr)) = connection::serve(rd, wr, Arc::clone(&worker), room, alive).await {
            if let Some(fd) = reunite(rd, wr) {
                hand_over(&worker, fd.as_fd());
            }
        }
    });
}

/// Passes an idle connection to the master, which gives it to a worker that stays. If that
/// fails the connection is closed here, as it would have been without hand-over.
fn hand_over(worker: &Worker, conn: std::os::fd::BorrowedFd<'_>) {
    if let Some(channel) = &worker.handover {
        if let Err(e) = crate::passing::send(channel.as_fd(), conn) {
            tracing::debug!(pid = std::process::id(), error = %e, "cannot hand a connection over; closing it");
        }
    }
}

/// Takes connections handed over by draining workers, until this worker drains itself.
pub(crate) async fn receive_passed(worker: Arc<Worker>, alive: Alive) {
    let Some(channel) = &worker.handover else {
        return;
    };
    let mut draining = worker.drain.subscribe();
    loop {
        tokio::select! {
            ready = channel.readable() => if ready.is_err() { return },
            _ = draining.changed() => return,
        }
        loop {
            let got = channel.try_io(tokio::io::Interest::READABLE, || {
                crate::passing::recv(channel.as_fd())
            });
            match got {
                Ok(Some(fd)) => match crate::passing::classify(fd) {
                    Ok(crate::passing::Passed::Tcp(s)) => {
                        if let Ok(s) = s
                            .set_nonblocking(true)
                            .and_then(|()| tokio::net::TcpStream::from_std(s))
                        {
                            spawn_tcp(s, &worker, None, &alive);
                        }
                    }
                    Ok(crate::passing::Passed::Unix(s)) => {
                        if let Ok(s) = s
                            .set_nonblocking(true)
                            .and_then(|()| tokio::net::UnixStream::from_std(s))
                        {
                            spawn_unix(s, &worker, None, &alive);
                        }
                    }
                    Err(_) => {}
                },
                Ok(None) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
    }
}

fn fail(worker: &Worker, e: std::io::Error) {
    tracing::error!(pid = std::process::id(), error = %e, "cannot accept; worker draining");
    worker.drain.send_replace(true);
}

/// Per-connection accept failures (a peer that reset first, fd exhaustion) must not stop the
/// worker; on resource exhaustion it pauses briefly instead of spinning.
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
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
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
        let slot = worker.board.slot(worker.slot);
        loop {
            tokio::time::sleep(BUSY_MIGRATE_AFTER).await;
            if slot.state() != SlotState::Busy || *worker.drain.borrow() {
                break;
            }
            // Busy with one request that has run that long, not with a stream of fast ones.
            let running = crate::clock::now().saturating_sub(slot.since());
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
