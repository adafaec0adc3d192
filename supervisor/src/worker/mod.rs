//! A worker process: forked by the master, it builds its own current-thread tokio runtime,
//! accepts on every inherited listener, and serves connections until told to drain.
//!
//! This file sets the process up, builds the one [`Worker`] every part shares, and drains.
//! The rest: `accept` (taking and handing over connections), `connection` (one FastCGI
//! connection), `rooms` (the cap on requests in flight and the queue), `run` (running a request,
//! handler threads, recycling), `output` (a response as records), `inline` (requests on the
//! I/O thread), `status` (the status page), `episode` (limits hit by peers, logged once per
//! episode), `process` (the account, environment and limits it takes on after the fork).

mod accept;
mod connection;
mod episode;
mod inline;
mod output;
mod process;
mod rooms;
mod run;
mod service;
mod status;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};

use crate::clock;
use crate::config::{Config, PoolMode};
use crate::listener::ListenerSocket;
use crate::scoreboard::{Scoreboard, SlotState};
use crate::Responder;
use inline::Inline;
use rooms::Rooms;
use run::{Job, Recycle, Waiting};
pub(crate) use service::{Exchange, Progress, Runner, ServiceApp};

/// Everything a worker needs to know, decided by the master before the fork.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub slot: usize,
    pub max_in_flight: usize,
    pub keepalive_timeout: Duration,
    /// Time a connection has to send a complete request.
    pub request_read_timeout: Duration,
    /// A request running longer is answered 504 by its connection, and the worker drains.
    pub request_timeout: Option<Duration>,
    pub limits: fcgi::Limits,
    pub recycle: Recycle,
    pub status: status::Paths,
    pub access_log: bool,
    /// The pool can grow (`pm` dynamic or ondemand): a worker at its cap that sees connections
    /// waiting wakes the master (`accept::wake_master`), which starts workers for them.
    pub pool_grows: bool,
    /// The account, environment and limits the worker takes on before any application code.
    pub process: crate::config::WorkerProcess,
    /// The TCP peers served (`None`: anyone), checked right after accept.
    pub allowed_clients: Option<crate::config::AllowedClients>,
    /// `max_queue` and `queue_timeout`, the bounds on requests waiting for a room.
    pub admission: rooms::Admission,
}

impl Settings {
    /// The settings of a worker in `slot`; called in the worker, right after the fork.
    pub(crate) fn new(cfg: &Config, slot: usize) -> Settings {
        Settings {
            slot,
            max_in_flight: cfg.max_requests_in_flight.get(),
            keepalive_timeout: cfg.keepalive_timeout,
            request_read_timeout: cfg.request_read_timeout,
            request_timeout: cfg.request_timeout,
            limits: fcgi::Limits {
                max_reqs: cfg.max_requests_in_flight.get(),
                max_conns: max_connections(cfg.max_connections),
                // One request per connection: a second concurrent one is refused by the core
                // with CANT_MPX_CONN, and GET_VALUES says FCGI_MPXS_CONNS 0.
                max_requests_per_conn: fcgi::DEFAULT_MAX_REQUESTS_PER_CONN,
                ..fcgi::Limits::default()
            },
            access_log: cfg.access_log,
            pool_grows: cfg.pool.mode != PoolMode::Static,
            process: cfg.process.clone(),
            allowed_clients: cfg.allowed_clients.clone(),
            admission: rooms::Admission {
                max_queue: cfg.max_queue,
                queue_timeout: cfg.queue_timeout,
            },
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

/// `max_connections` as configured, else this process's open-file limit minus
/// [`crate::config::FD_RESERVE`] (at least 1): what `FCGI_MAX_CONNS` says and the accept
/// loop enforces.
fn max_connections(configured: Option<std::num::NonZeroUsize>) -> usize {
    if let Some(n) = configured {
        return n.get();
    }
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
        .unwrap_or(fcgi::DEFAULT_MAX_CONNS);
    soft.saturating_sub(crate::config::FD_RESERVE).max(1)
}

/// What the master hands each worker at the fork: a [`Responder`], or an async service's
/// setup (`service.rs`).
pub(crate) trait Application: Send + Sync + 'static {
    /// What serves this worker's requests, made right after the fork, on its runtime.
    fn for_worker(self: Arc<Self>, runtime: &tokio::runtime::Runtime) -> Result<Handler, String>;

    /// The background tasks the application defines (`Responder::tasks`); an async service
    /// defines none.
    fn tasks(&self) -> Vec<crate::Task<Self>>
    where
        Self: Sized,
    {
        Vec::new()
    }

    /// Whether a worker's event loop ends a request at `request_timeout` itself and goes on
    /// serving (an async service drops its future, a foreign program's relay kills the child),
    /// so that the master ends the worker only if its loop is stuck. A blocking handler cannot
    /// be stopped: its worker is ended.
    fn answers_its_timeouts(&self) -> bool {
        false
    }

    /// The worker is about to exit (its requests are over, or it failed): what it started
    /// that dying with it would not stop is stopped here. `exit` drops nothing.
    fn worker_exiting(&self) {}
}

impl<R: Responder> Application for R {
    fn for_worker(self: Arc<Self>, _: &tokio::runtime::Runtime) -> Result<Handler, String> {
        self.init_worker()
            .map_err(|why| format!("worker init failed: {why}"))?;
        Ok(Handler::Blocking(self))
    }

    fn tasks(&self) -> Vec<crate::Task<Self>> {
        Responder::tasks(self)
    }
}

/// What runs a worker's requests.
pub(crate) enum Handler {
    /// A blocking [`Responder`], on the I/O thread or a handler thread (`run.rs`).
    Blocking(Arc<dyn Responder>),
    /// An async service, on the worker's runtime (`service.rs`).
    Service(Arc<dyn service::Serve>),
}

/// What every part of a worker shares: its settings, the application, its scoreboard slot, the
/// room for requests, the two ways a request runs, and the drain. Built once, after the fork.
pub(crate) struct Worker {
    pub settings: Settings,
    pub app: Handler,
    pub board: Arc<Scoreboard>,
    /// This worker's slot in the scoreboard.
    pub slot: usize,
    /// `max_requests_in_flight`, as the scoreboard counts it.
    pub cap: u32,
    /// Room for requests: at most `max_requests_in_flight` at once (see `rooms.rs`).
    pub rooms: Arc<Rooms<Waiting>>,
    /// The handler threads' queue.
    pub jobs: std_mpsc::Sender<Job>,
    /// The I/O thread, which runs a request itself when it is free (see `inline.rs`).
    pub inline: Arc<Inline<Job>>,
    /// True once the worker drains: idle connections close or move, busy ones finish first.
    /// Anything that must stop the worker (a signal, a recycling limit, an accept loop that
    /// cannot go on) sets it.
    pub drain: watch::Sender<bool>,
    /// The worker's runtime, for tasks started from handler threads.
    pub runtime: tokio::runtime::Handle,
    /// The socketpair to the master, for handing connections over when draining and
    /// receiving those of other workers.
    pub handover: Option<Arc<tokio::net::UnixStream>>,
    /// Tells idle kept-alive connections to move to a worker with room: this one has been busy
    /// a while (see `accept::BUSY_MIGRATE_AFTER`).
    pub migrate: Notify,
    /// Whether a busy check is already scheduled.
    pub busy_check: AtomicBool,
    /// Set by a handler thread when the worker reached a recycling limit.
    pub recycle_now: AtomicBool,
    /// When RSS was last measured (microseconds of the shared clock).
    pub rss_measured: AtomicU64,
    /// The connections open, for `max_connections` and the descriptor limit.
    pub conns: accept::Conns,
    /// A request passed `request_timeout`: its thread is stuck, and the slot keeps showing it
    /// busy while the worker drains, so the master's timeout replaces the worker as always.
    pub timed_out: AtomicBool,
    /// The whole host is leaving (SIGQUIT from the master's graceful stop, not a reload's
    /// SIGTERM): connections are not handed over, they close after their next answer.
    pub leaving: AtomicBool,
}

impl Worker {
    /// The worker, and the receiving end of its handler threads' queue.
    fn new(
        settings: Settings,
        app: Handler,
        board: Arc<Scoreboard>,
        runtime: tokio::runtime::Handle,
        handover: Option<Arc<tokio::net::UnixStream>>,
    ) -> (Arc<Worker>, std_mpsc::Receiver<Job>) {
        let (jobs, jobs_rx) = std_mpsc::channel();
        let cap = settings.max_in_flight.max(1);
        let slot = settings.slot;
        let counter = Arc::clone(&board);
        let worker = Arc::new_cyclic(|me: &std::sync::Weak<Worker>| {
            let (me, refuser) = (me.clone(), me.clone());
            let hooks = rooms::Hooks {
                held: Box::new(move |delta| counter.slot(slot).add_held(delta)),
                start: Box::new(move |waiting: Waiting, room: run::Room| {
                    if let Some(worker) = me.upgrade() {
                        run::start(&worker, waiting.with(room));
                        accept::schedule_busy_check(&worker);
                    }
                }),
                refuse: Box::new(move |waiting: Waiting, why| {
                    if let Some(worker) = refuser.upgrade() {
                        connection::refuse(&worker, waiting, why);
                    }
                }),
                gone: Box::new(Waiting::gone),
            };
            let rooms = Rooms::new(cap, settings.admission, hooks);
            Worker {
                app,
                board,
                slot,
                cap: u32::try_from(cap).unwrap_or(u32::MAX),
                rooms,
                jobs,
                inline: Inline::new(),
                drain: watch::Sender::new(false),
                runtime,
                handover,
                migrate: Notify::new(),
                busy_check: AtomicBool::new(false),
                recycle_now: AtomicBool::new(false),
                rss_measured: AtomicU64::new(0),
                conns: accept::Conns::default(),
                timed_out: AtomicBool::new(false),
                leaving: AtomicBool::new(false),
                settings,
            }
        });
        (worker, jobs_rx)
    }

    /// The rules its connections follow.
    fn rules(&self) -> connection::Rules {
        connection::Rules {
            limits: self.settings.limits,
            keepalive_timeout: self.settings.keepalive_timeout,
            request_read_timeout: self.settings.request_read_timeout,
            request_timeout: self.settings.request_timeout,
            can_hand_over: self.handover.is_some(),
        }
    }

    /// How long the youngest request holding a room here has run, once every room is held by
    /// a request that started (the slot shows Busy from when the last of them did); `None`
    /// while a room is held by a request given it and not yet started.
    pub(crate) fn running_for(&self) -> Option<Duration> {
        let slot = self.board.slot(self.slot);
        (slot.state() == SlotState::Busy).then(|| clock::now().saturating_sub(slot.since()))
    }
}

/// Held by every connection and every request of the worker: once the last is dropped the
/// drain is complete (completion is "all senders dropped").
#[derive(Clone)]
pub(crate) struct Alive {
    _done: mpsc::Sender<()>,
}

impl Alive {
    /// The first token, and what resolves once it and every clone are gone.
    fn new() -> (Alive, mpsc::Receiver<()>) {
        let (done, all_gone) = mpsc::channel(1);
        (Alive { _done: done }, all_gone)
    }
}

/// Runs the worker and exits the process; never returns.
pub(crate) fn run<R: Application>(
    app: Arc<R>,
    listeners: Vec<ListenerSocket>,
    board: Arc<Scoreboard>,
    settings: Settings,
    channel: Option<std::os::unix::net::UnixStream>,
) -> ! {
    let code = match serve(Arc::clone(&app), listeners, board, settings, channel) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(pid = std::process::id(), error = %e, "worker failed");
            1
        }
    };
    app.worker_exiting();
    std::process::exit(code)
}

fn serve<R: Application>(
    app: Arc<R>,
    listeners: Vec<ListenerSocket>,
    board: Arc<Scoreboard>,
    settings: Settings,
    channel: Option<std::os::unix::net::UnixStream>,
) -> std::io::Result<()> {
    if !set_up_process()? {
        return Ok(());
    }
    process::become_configured(&settings.process)?;
    let runtime = Arc::new(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            // Before the event loop sleeps, it yields the CPU once. Where nginx, the workers
            // and a foreign program share few cores, the peer the loop waits for often runs in
            // that yield, and the loop then finds its bytes without sleeping and being woken (a
            // context switch each way, and in a VM the wake-up of an idle vCPU). With a core
            // to spare the yield returns at once. Side by side on 2 cores: a few percent for
            // an async app, 10-20% for a foreign program's relay.
            .on_thread_park(std::thread::yield_now)
            .build()?,
    );
    let app = app.for_worker(&runtime).map_err(std::io::Error::other)?;
    let handover = match channel {
        Some(c) => {
            c.set_nonblocking(true)?;
            let _inside = runtime.enter();
            Some(Arc::new(tokio::net::UnixStream::from_std(c)?))
        }
        None => None,
    };
    // An async service runs on the runtime: no handler threads.
    let handlers = match &app {
        Handler::Blocking(_) => settings.max_in_flight.max(1),
        Handler::Service(_) => 0,
    };
    let (worker, jobs) = Worker::new(settings, app, board, runtime.handle().clone(), handover);
    run::spawn_handlers(handlers, jobs, &worker)?;
    if let Handler::Service(serve) = &worker.app {
        service::watchdog(&worker, serve)?;
    }
    {
        let (inline, runtime) = (Arc::clone(&worker.inline), Arc::clone(&runtime));
        std::thread::Builder::new()
            .name("standby".into())
            .spawn(move || inline.standby(&runtime))?;
    }
    let main = runtime.spawn(until_drained(Arc::clone(&worker), listeners));
    // This thread drives the event loop and runs the requests offered to it (see `inline.rs`).
    match worker.inline.drive(
        &runtime,
        main,
        |job| run::respond(&worker, job),
        |answered| deliver(answered, &worker),
    ) {
        Ok(result) => result,
        Err(e) => Err(std::io::Error::other(format!("worker task: {e}"))),
    }
}

/// What the worker process needs before anything else; false if the master is already gone.
fn set_up_process() -> std::io::Result<bool> {
    // If the master dies by any means, so do we: no orphans holding the socket.
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        // The master died between fork and prctl.
        return Ok(false);
    }
    // One log line per panic, with its place; the handler adds which request it cost.
    std::panic::set_hook(Box::new(|info| {
        let (location, message) = crate::logging::panic_parts(info);
        tracing::error!(pid = std::process::id(), location, message, "panic");
    }));
    // The master blocks signals to read them synchronously; a worker takes them normally.
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
    Ok(true)
}

/// The worker's main task: accept and serve until a reason to drain, then wait until every
/// connection and request has finished.
async fn until_drained(worker: Arc<Worker>, listeners: Vec<ListenerSocket>) -> std::io::Result<()> {
    let drain = worker.drain.subscribe();
    let (alive, mut all_gone) = Alive::new();
    let accepting = tokio::spawn(accept::accept_loop(
        listeners,
        Arc::clone(&worker),
        alive.clone(),
    ));
    let receiving = tokio::spawn(accept::receive_passed(Arc::clone(&worker), alive));
    if worker.settings.admission.queue_timeout.is_some() {
        tokio::spawn(expire_waiting(Arc::clone(&worker)));
    }
    let slot = worker.board.slot(worker.slot);
    slot.set_pid(std::process::id() as i32);
    slot.set_state(SlotState::Idle, clock::now());

    if wait_for_drain(drain).await? == Drain::Leaving {
        // Before the drain is sent: a connection that sees the drain sees this too.
        worker
            .leaving
            .store(true, std::sync::atomic::Ordering::Release);
    }
    if !worker.timed_out.load(std::sync::atomic::Ordering::Acquire) {
        slot.set_state(SlotState::Draining, clock::now());
    }
    worker.drain.send_replace(true);
    accepting.abort();
    drop(accepting);
    // Every connection and request holds an `Alive`: when the last has finished, this returns.
    let _ = all_gone.recv().await;
    // Connections the master passed while this worker was starting to drain go back to it.
    let inbox = receiving.await.unwrap_or_default();
    accept::give_back(&worker, inbox);
    Ok(())
}

/// Answers 503 to requests that waited `queue_timeout` for a room: one timer for the worker,
/// set to the oldest waiting request's deadline, and asleep while none waits.
async fn expire_waiting(worker: Arc<Worker>) {
    loop {
        let now = clock::now();
        match worker.rooms.expire(now) {
            Some(deadline) => tokio::time::sleep(deadline.saturating_sub(now)).await,
            None => worker.rooms.job_queued().await,
        }
    }
}

/// Passes a response run on this thread to its connection, from inside the runtime.
fn deliver(answered: run::Answered, worker: &Worker) {
    let run::Answered { out, tail, finish } = answered;
    output::send_in_runtime(&out, tail);
    finish.finish(worker);
}

/// Why a worker drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// This worker is replaced (reload, shrink, recycling): its connections move to the
    /// workers that stay.
    Replaced,
    /// The whole host stops (SIGQUIT from the master's graceful stop): no worker stays.
    Leaving,
}

/// Waits for a reason to drain: SIGTERM (replaced) or SIGQUIT (the host leaves) from the
/// master, or a recycling limit. SIGINT is ignored: Ctrl-C in a terminal reaches the whole
/// process group, and the master decides what it means.
async fn wait_for_drain(mut drain: watch::Receiver<bool>) -> std::io::Result<Drain> {
    let mut term = signal(SignalKind::terminate())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    loop {
        if *drain.borrow_and_update() {
            return Ok(Drain::Replaced);
        }
        tokio::select! {
            _ = term.recv() => return Ok(Drain::Replaced),
            _ = quit.recv() => return Ok(Drain::Leaving),
            _ = int.recv() => {}
            // The master forwards SIGUSR1 after logrotate: workers write the log too.
            _ = usr1.recv() => crate::logging::reopen(),
            changed = drain.changed() => if changed.is_err() { return Ok(Drain::Replaced) },
        }
    }
}
