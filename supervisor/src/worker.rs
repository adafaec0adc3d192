//! A worker process: forked by the master, it builds its own current-thread tokio runtime,
//! accepts on every inherited listener, and serves connections until told to drain.
//!
//! It accepts only while it has room for another request (`max_requests_in_flight`), so the
//! kernel hands new connections to a worker with room. Kept-alive connections that sit idle
//! cost nothing but a file descriptor.

use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::LocalSet;

use crate::connection::{self, Context};
use crate::handler::{self, Recycle, Shared};
use crate::listener::ListenerSocket;
use crate::scoreboard::{self, Scoreboard, SlotState};
use crate::Responder;

/// Everything a worker needs to know, decided by the master before the fork.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub slot: usize,
    pub max_in_flight: usize,
    pub keepalive_timeout: Duration,
    pub limits: fcgi::Limits,
    pub recycle: Recycle,
}

/// Runs the worker and exits the process; never returns.
pub(crate) fn run<R: Responder>(
    app: Arc<R>,
    listeners: Vec<ListenerSocket>,
    board: Arc<Scoreboard>,
    settings: Settings,
) -> ! {
    let code = match serve(app, listeners, board, settings) {
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
) -> std::io::Result<()> {
    // If the master dies by any means, so do we: no orphans holding the socket.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        // The master died between fork and prctl.
        return Ok(());
    }
    // One log line per panic, with its place; the handler adds which request it cost.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
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
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = LocalSet::new();
    local.block_on(&runtime, async move {
        let (drain_tx, drain_rx) = watch::channel(false);
        let cap = settings.max_in_flight.max(1);
        let shared = Arc::new(Shared {
            app,
            board: Arc::clone(&board),
            slot: settings.slot,
            cap: cap as u32,
            recycle: settings.recycle,
            recycle_now: AtomicBool::new(false),
            wake: drain_tx.clone(),
        });
        let jobs = handler::start(cap, shared)?;
        let permits = Arc::new(Semaphore::new(cap));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
        let ctx = Rc::new(Context {
            limits: settings.limits,
            keepalive_timeout: settings.keepalive_timeout,
            jobs,
            permits,
            draining: drain_rx.clone(),
            stop: drain_tx.clone(),
            _done: done_tx,
        });
        let accepting: Vec<_> = listeners
            .into_iter()
            .map(|l| tokio::task::spawn_local(accept_loop(l, Rc::clone(&ctx))))
            .collect();
        let slot = board.slot(settings.slot);
        slot.set_pid(std::process::id() as i32);
        slot.set_state(SlotState::Idle, scoreboard::now());

        wait_for_drain(drain_rx).await?;
        slot.set_state(SlotState::Draining, scoreboard::now());
        drain_tx.send_replace(true);
        for task in &accepting {
            task.abort();
        }
        // Every connection holds the context; when the last one has finished its requests and
        // closed, the `done` sender inside it is dropped and this returns.
        drop(ctx);
        drop(accepting);
        let _ = done_rx.recv().await;
        Ok(())
    })
}

/// Waits for a reason to drain: SIGTERM or SIGQUIT from the master, or a recycling limit.
/// SIGINT is ignored: Ctrl-C in a terminal reaches the whole process group, and the master
/// decides what it means.
async fn wait_for_drain(mut drain: watch::Receiver<bool>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        if *drain.borrow_and_update() {
            return Ok(());
        }
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = quit.recv() => return Ok(()),
            _ = int.recv() => {}
            changed = drain.changed() => if changed.is_err() { return Ok(()) },
        }
    }
}

/// Accepts connections while the worker has room for another request.
async fn accept_loop(listener: ListenerSocket, ctx: Rc<Context>) {
    let result = match listener {
        ListenerSocket::Tcp(l) => match l.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(l)) {
            Ok(l) => {
                accept_each(&ctx, || async {
                    let (stream, _) = l.accept().await?;
                    stream.set_nodelay(true)?;
                    let (rd, wr) = stream.into_split();
                    Ok(tokio::task::spawn_local(connection::serve(rd, wr, Rc::clone(&ctx))))
                })
                .await
            }
            Err(e) => Err(e),
        },
        ListenerSocket::Unix(l) => match l.set_nonblocking(true).and_then(|()| tokio::net::UnixListener::from_std(l)) {
            Ok(l) => {
                accept_each(&ctx, || async {
                    let (stream, _) = l.accept().await?;
                    let (rd, wr) = stream.into_split();
                    Ok(tokio::task::spawn_local(connection::serve(rd, wr, Rc::clone(&ctx))))
                })
                .await
            }
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        tracing::error!(pid = std::process::id(), error = %e, "cannot accept; worker draining");
        ctx.stop.send_replace(true);
    }
}

async fn accept_each<F, Fut>(ctx: &Rc<Context>, mut accept: F) -> std::io::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<tokio::task::JoinHandle<()>>>,
{
    loop {
        // At the cap, stop accepting: the kernel gives the connection to a worker with room.
        match ctx.permits.acquire().await {
            Ok(room) => drop(room),
            Err(_) => return Ok(()),
        }
        match accept().await {
            Ok(_) => {}
            // Per-connection failures (the peer reset before we accepted, fd limits) must not
            // stop the worker; back off briefly on resource exhaustion.
            Err(e) if is_transient(&e) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted | WouldBlock)
        || matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
