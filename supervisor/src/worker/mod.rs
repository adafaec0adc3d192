//! A worker process: forked by the master, it builds its own current-thread tokio runtime,
//! accepts on every inherited listener, and serves connections until told to drain.
//!
//! It accepts only while it has room for another request (`max_requests_in_flight`), so the
//! kernel hands new connections to a worker with room. Kept-alive connections that sit idle
//! cost nothing but a file descriptor.

pub(crate) mod connection;
pub(crate) mod inline;
pub(crate) mod rooms;
pub(crate) mod run;
pub(crate) mod status;

use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::clock;
use crate::config::Config;
use crate::listener::ListenerSocket;
use crate::scoreboard::{Scoreboard, SlotState};
use crate::Responder;
use connection::Context;
use inline::Inline;
use rooms::Room;
use run::{Recycle, Shared};

/// Everything a worker needs to know, decided by the master before the fork.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub slot: usize,
    pub max_in_flight: usize,
    pub keepalive_timeout: Duration,
    pub limits: fcgi::Limits,
    pub recycle: Recycle,
    pub status: crate::worker::status::Paths,
    pub access_log: bool,
}

impl Settings {
    /// The settings of a worker in `slot`; called in the worker, right after the fork.
    pub(crate) fn new(cfg: &Config, slot: usize) -> Settings {
        Settings {
            slot,
            max_in_flight: cfg.max_requests_in_flight.get(),
            keepalive_timeout: cfg.keepalive_timeout,
            limits: fcgi::Limits {
                max_reqs: cfg.max_requests_in_flight.get(),
                ..fcgi::Limits::default()
            },
            access_log: cfg.access_log,
            status: status::Paths {
                status: cfg.status_path.clone(),
                ping: cfg.ping_path.clone(),
                ping_response: cfg.ping_response.clone(),
                pool: cfg.pool_name.clone(),
            },
            recycle: Recycle {
                // Called in the new worker: its pid seeds the jitter, so the workers of one
                // pool recycle at different times.
                request_limit: run::request_limit(
                    cfg.max_requests,
                    cfg.max_requests_jitter,
                    u64::from(std::process::id()),
                ),
                max_rss: cfg.max_rss,
            },
        }
    }
}

/// Runs the worker and exits the process; never returns.
pub(crate) fn run<R: Responder>(
    app: Arc<R>,
    listeners: Vec<ListenerSocket>,
    board: Arc<Scoreboard>,
    settings: Settings,
    channel: Option<std::os::unix::net::UnixStream>,
) -> ! {
    let code = match serve(app, listeners, board, settings, channel) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(pid = std::process::id(), error = %e, "worker failed");
            1
        }
    };
    std::process::exit(code)
}

fn serve<R: Responder>(
    app: Arc<R>,
    listeners: Vec<ListenerSocket>,
    board: Arc<Scoreboard>,
    settings: Settings,
    channel: Option<std::os::unix::net::UnixStream>,
) -> std::io::Result<()> {
    // If the master dies by any means, so do we: no orphans holding the socket.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        // The master died between fork and prctl.
        return Ok(());
    }
    // One log line per panic, with its place; the handler adds which request it cost.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(pid = std::process::id(), location, message, "panic");
    }));
    // The master blocks signals to read them synchronously; a worker takes them normally.
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;

    if let Err(why) = app.init_worker() {
        return Err(std::io::Error::other(format!("worker init failed: {why}")));
    }
    let runtime = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
    );
    let (drain_tx, drain_rx) = watch::channel(false);
    let cap = settings.max_in_flight.max(1);
    let shared = Arc::new(Shared {
        app,
        board: Arc::clone(&board),
        slot: settings.slot,
        cap: cap as u32,
        recycle: settings.recycle,
        recycle_now: AtomicBool::new(false),
        rss_measured: std::sync::atomic::AtomicU64::new(0),
        access_log: settings.access_log,
        wake: drain_tx.clone(),
    });
    let jobs = run::start(cap, Arc::clone(&shared))?;
    let inline = Inline::new();
    {
        let (inline, runtime) = (Arc::clone(&inline), Arc::clone(&runtime));
        std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || inline.standby(&runtime))?;
    }
    let offer = Arc::clone(&inline);
    let main = runtime.spawn(async move {
        let handover = match channel {
            Some(c) => {
                c.set_nonblocking(true)?;
                Some(Arc::new(tokio::net::UnixStream::from_std(c)?))
            }
            None => None,
        };
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
        let ctx = Arc::new(Context {
            limits: settings.limits,
            keepalive_timeout: settings.keepalive_timeout,
            jobs,
            inline: offer,
            rooms: rooms::Rooms::new(cap),
            draining: drain_rx.clone(),
            stop: drain_tx.clone(),
            wanted: tokio::sync::Notify::new(),
            runtime: tokio::runtime::Handle::current(),
            migrate: tokio::sync::Notify::new(),
            busy_check: AtomicBool::new(false),
            handover: handover.clone(),
            status: settings.status.clone(),
            board: Arc::clone(&board),
            slot: settings.slot,
            _done: done_tx,
        });
        let accepting = tokio::spawn(accept_loop(listeners, Arc::clone(&ctx)));
        tokio::spawn(receive_passed(Arc::clone(&ctx)));
        let slot = board.slot(settings.slot);
        slot.set_pid(std::process::id() as i32);
        slot.set_state(SlotState::Idle, clock::now());

        wait_for_drain(drain_rx).await?;
        slot.set_state(SlotState::Draining, clock::now());
        drain_tx.send_replace(true);
        accepting.abort();
        drop(accepting);
        // Every connection holds the context; when the last one has finished its requests and
        // closed, the `done` sender inside it is dropped and this returns.
        drop(ctx);
        let _ = done_rx.recv().await;
        // Connections the master passed while this worker was starting to drain go back to it
        // rather than die with this process.
        if let Some(channel) = &handover {
            while let Ok(passed) = crate::passing::recv(channel.as_fd()) {
                if let Some(fd) = passed {
                    let _ = crate::passing::send(channel.as_fd(), fd.as_fd());
                }
            }
        }
        Ok::<(), std::io::Error>(())
    });
    // This thread drives the event loop and runs the requests offered to it (see `inline.rs`).
    match inline.drive(
        &runtime,
        main,
        |job| run::respond(&shared, job),
        |answered| deliver(answered, &shared),
    ) {
        Ok(result) => result,
        Err(e) => Err(std::io::Error::other(format!("worker task: {e}"))),
    }
}

/// Passes a response run on this thread to its connection, from inside the runtime.
fn deliver<R>(answered: run::Answered, shared: &Shared<R>) {
    let run::Answered { out, tail, finish } = answered;
    crate::app::response::send_in_runtime(&out, tail);
    finish.finish(shared);
}

/// Waits for a reason to drain: SIGTERM or SIGQUIT from the master, or a recycling limit.
/// SIGINT is ignored: Ctrl-C in a terminal reaches the whole process group, and the master
/// decides what it means.
async fn wait_for_drain(mut drain: watch::Receiver<bool>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        if *drain.borrow_and_update() {
            return Ok(());
        }
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = quit.recv() => return Ok(()),
            _ = int.recv() => {}
            // The master forwards SIGUSR1 after logrotate: workers write the log too.
            _ = usr1.recv() => crate::logging::reopen(),
            changed = drain.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

enum Listening {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
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
async fn accept_loop(sockets: Vec<ListenerSocket>, ctx: Arc<Context>) {
    let listeners = match sockets
        .into_iter()
        .map(Listening::new)
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(l) => l,
        Err(e) => return fail(&ctx, e),
    };
    let mut turn = 0;
    loop {
        // Normally a worker accepts only with room for the request. When the whole pool is
        // saturated it accepts anyway: the connection would only wait in the kernel's backlog,
        // and a status or ping request on it is answered at once (see `status.rs`).
        let room = match rooms::unpark(&ctx) {
            // Still parked from the last turn: a wake-up that was not about the room.
            Some(room) => Some(room),
            None => tokio::select! {
                biased;
                room = rooms::acquire(&ctx) => match room {
                    Some(room) => Some(room),
                    None => return,
                },
                () = pool_saturated(&ctx) => None,
            },
        };
        if *ctx.draining.borrow() {
            return;
        }
        let (accepted, room) = match room {
            Some(room) => {
                // Parked where a request on a kept-alive connection can take it at once.
                rooms::park(room);
                tokio::select! {
                    biased;
                    // A request on a kept-alive connection took the room.
                    _ = ctx.wanted.notified() => continue,
                    accepted = accept_any(&listeners, &mut turn) => (accepted, rooms::unpark(&ctx)),
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
                spawn_tcp(stream, Arc::clone(&ctx), room);
            }
            Ok(Accepted::Unix(stream)) => spawn_unix(stream, Arc::clone(&ctx), room),
            Err(e) if is_transient(&e) => backoff().await,
            Err(e) => return fail(&ctx, e),
        }
    }
}

/// How often a worker at its cap looks whether the whole pool is saturated.
const SATURATION_CHECK: Duration = Duration::from_millis(20);

/// Returns once no worker of the pool has room for a request.
async fn pool_saturated(ctx: &Context) {
    loop {
        tokio::time::sleep(SATURATION_CHECK).await;
        if ctx.board.saturated() {
            return;
        }
    }
}

/// Serves a TCP connection; if the worker drains while it is idle, hands it over.
fn spawn_tcp(stream: tokio::net::TcpStream, ctx: Arc<Context>, room: Option<Room>) {
    let (rd, wr) = stream.into_split();
    spawn_serve(rd, wr, ctx, room, |rd, wr| {
        Some(rd.reunite(wr).ok()?.into_std().ok()?.into())
    });
}

/// Serves a unix connection; if the worker drains while it is idle, hands it over.
fn spawn_unix(stream: tokio::net::UnixStream, ctx: Arc<Context>, room: Option<Room>) {
    let (rd, wr) = stream.into_split();
    spawn_serve(rd, wr, ctx, room, |rd, wr| {
        Some(rd.reunite(wr).ok()?.into_std().ok()?.into())
    });
}

/// Serves a connection; one that comes back idle from a draining worker is made whole again
/// by `reunite` and handed over.
fn spawn_serve<Rd, Wr>(
    rd: Rd,
    wr: Wr,
    ctx: Arc<Context>,
    room: Option<Room>,
    reunite: impl FnOnce(Rd, Wr) -> Option<std::os::fd::OwnedFd> + Send + 'static,
) where
    Rd: tokio::io::AsyncRead + Unpin + Send + 'static,
    Wr: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Some((rd, wr)) = connection::serve(rd, wr, Arc::clone(&ctx), room).await {
            if let Some(fd) = reunite(rd, wr) {
                hand_over(&ctx, fd.as_fd());
            }
        }
    });
}

/// Passes an idle connection to the master, which gives it to a worker that stays. If that
/// fails the connection is closed here, as it would have been without hand-over.
fn hand_over(ctx: &Context, conn: std::os::fd::BorrowedFd<'_>) {
    if let Some(channel) = &ctx.handover {
        if let Err(e) = crate::passing::send(channel.as_fd(), conn) {
            tracing::debug!(pid = std::process::id(), error = %e, "cannot hand a connection over; closing it");
        }
    }
}

/// Takes connections handed over by draining workers, until this worker drains itself.
async fn receive_passed(ctx: Arc<Context>) {
    let Some(channel) = &ctx.handover else { return };
    let mut draining = ctx.draining.clone();
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
                            spawn_tcp(s, Arc::clone(&ctx), None);
                        }
                    }
                    Ok(crate::passing::Passed::Unix(s)) => {
                        if let Ok(s) = s
                            .set_nonblocking(true)
                            .and_then(|()| tokio::net::UnixStream::from_std(s))
                        {
                            spawn_unix(s, Arc::clone(&ctx), None);
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

fn fail(ctx: &Context, e: std::io::Error) {
    tracing::error!(pid = std::process::id(), error = %e, "cannot accept; worker draining");
    ctx.stop.send_replace(true);
}

/// Per-connection accept failures (a peer that reset first, fd exhaustion) must not stop the
/// worker; on resource exhaustion it pauses briefly instead of spinning.
async fn backoff() {
    tokio::time::sleep(Duration::from_millis(10)).await;
}

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
