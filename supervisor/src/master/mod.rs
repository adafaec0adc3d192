//! The master: single-threaded and synchronous. It owns the listeners and the workers, reads
//! signals from a signalfd, reaps children in a loop (signals coalesce), and once a second (or
//! at once, when a signal arrives) asks the policies what to do and does it.

pub(crate) mod notify;
pub(crate) mod policy;
pub(crate) mod signals;
pub(crate) mod upgrade;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::clock;
use crate::config::PoolMode;
use crate::config::{Cli, Config};
use crate::listener::Listener;
use crate::passing;
use crate::scoreboard::{PoolStats, Scoreboard, SlotSnapshot, SlotState};
use crate::sys::{self, Fork};
use crate::{worker, Responder};
use notify::Notifier;
use policy::{Pool, Respawn, SlowLog, TimeoutAction, WorkerState, WorkerView};
use signals::Intent;
use std::os::unix::net::UnixStream;
use upgrade::{AdoptedWorker, Inherited};

/// The maintenance tick: how often an idle master wakes.
const TICK: Duration = Duration::from_secs(1);

/// What the master knows of one worker beyond its scoreboard slot.
#[derive(Debug)]
struct Worker {
    slot: usize,
    generation: u64,
    started: Duration,
    /// SIGTERM sent for a request timeout, and when.
    timeout_term_at: Option<Duration>,
    /// Told to stop (pool shrink, reload, shutdown): its exit is expected.
    stopping: bool,
    /// The master's end of the socketpair connections are passed over (none for workers
    /// adopted across an upgrade).
    channel: Option<UnixStream>,
}

struct Stopping {
    deadline: Duration,
    killed: bool,
}

/// The running master.
pub(crate) struct Master<R> {
    cfg: Config,
    app: Arc<R>,
    listeners: Vec<Listener>,
    board: Arc<Scoreboard>,
    pool: Pool,
    respawn: Respawn,
    slow: SlowLog,
    workers: HashMap<Pid, Worker>,
    generation: u64,
    stopping: Option<Stopping>,
    signals: SignalFd,
    /// The command line, to re-read the configuration on reload.
    cli: Cli,
    /// A reload is waiting for the current generation to be ready before older ones drain.
    reload_since: Option<Duration>,
    /// Whether the slow reload was already reported.
    reload_warned: bool,
    /// Listeners removed from the configuration, closed once the workers using them are gone.
    retired: Vec<Listener>,
    /// systemd, when it asked to be told.
    notifier: Notifier,
    /// READY=1 was sent for the current generation.
    ready_sent: bool,
    /// When WATCHDOG=1 was last sent.
    watchdog_at: Duration,
    /// Pool-wide figures for the status page, published in the scoreboard each tick.
    stats: PoolStats,
    /// Channels of reaped workers, read once more for connections they handed over last.
    orphan_channels: Vec<UnixStream>,
    /// Handed-over connections waiting for a worker to take them (during a reload, before the
    /// new generation exists). Their requests wait in the sockets meanwhile.
    passed: Vec<std::os::fd::OwnedFd>,
    /// Wake on a connection arriving, not just on the tick: set while a `dynamic` or `ondemand`
    /// pool has no worker ready to take one and room to start one.
    watch_listeners: bool,
}

/// Scoreboard slots: room for a full pool, a second generation during reload, and workers that
/// are draining while their replacements start.
fn slots_for(cfg: &Config) -> usize {
    // 384 bytes a slot: a generous table costs nothing and lets reloads and TTIN grow the pool.
    (cfg.pool.workers * 4).max(256)
}

/// How often the master looks at a new generation's readiness during a reload or upgrade.
const RELOAD_POLL: Duration = Duration::from_millis(20);

/// How long a reload may wait for the new generation before the master says so, loudly.
const RELOAD_SLOW: Duration = Duration::from_secs(10);

impl<R: Responder> Master<R> {
    /// Takes over: blocks the handled signals, creates the scoreboard. Call before any fork.
    pub(crate) fn new(
        cli: Cli,
        cfg: Config,
        app: Arc<R>,
        listeners: Vec<Listener>,
        inherited: Inherited,
    ) -> std::io::Result<Self> {
        let mask = signals::handled();
        nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        let board = match inherited.board {
            Some(board) => board,
            None => Scoreboard::new(slots_for(&cfg))?,
        };
        let board = Arc::new(board);
        let now = clock::now();
        // Workers of the previous master (an upgrade) keep serving until this master's own
        // generation is ready, exactly as in a reload.
        let workers: HashMap<Pid, Worker> = inherited
            .workers
            .iter()
            .map(|w| {
                let worker = Worker {
                    slot: w.slot,
                    generation: w.generation,
                    started: w.started,
                    timeout_term_at: None,
                    stopping: false,
                    // The channel survives the exec too, so these workers still hand over.
                    channel: w.channel.and_then(|fd| {
                        let fd = sys::adopt_fd(fd).ok()?;
                        let channel = UnixStream::from(fd);
                        channel.set_nonblocking(true).ok()?;
                        Some(channel)
                    }),
                };
                (w.pid, worker)
            })
            .collect();
        let adopted = !workers.is_empty();
        let mut stats = board.stats();
        if stats.start_time == 0 {
            // A fresh start (an upgrade keeps its predecessor's figures).
            stats.start_time = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            stats.started = now;
        }
        Ok(Master {
            pool: Pool::new(cfg.pool.clone()),
            cfg,
            app,
            listeners,
            board,
            respawn: Respawn::new(),
            slow: SlowLog::default(),
            workers,
            generation: inherited.generation + 1,
            stopping: None,
            signals,
            watch_listeners: false,
            cli,
            reload_since: adopted.then_some(now),
            reload_warned: false,
            retired: Vec::new(),
            notifier: Notifier::from_env(),
            ready_sent: false,
            watchdog_at: now,
            stats,
            orphan_channels: Vec::new(),
            passed: Vec::new(),
        })
    }

    /// Runs until the pool has stopped. Returns the process exit code.
    pub(crate) fn run(mut self) -> i32 {
        tracing::info!(
            pid = std::process::id(),
            listen = %self.listeners.iter().map(|l| l.addr().to_string()).collect::<Vec<_>>().join(", "),
            pm = ?self.cfg.pool.mode,
            workers = self.cfg.pool.workers,
            "master started"
        );
        self.publish_stats(&[], 0);
        for _ in 0..self.pool.initial_workers() {
            self.spawn(clock::now());
        }
        if self.pool.initial_workers() == 0 && self.reload_since.is_none() {
            // ondemand: nothing to wait for.
            self.ready_sent = true;
            self.notifier.ready();
        }
        loop {
            let now = clock::now();
            self.wait(self.next_wake(now));
            for intent in self.read_intents() {
                self.apply(intent);
            }
            self.forward_connections();
            self.reap();
            self.forward_connections();
            let now = clock::now();
            if let Some(every) = self.notifier.watchdog_every() {
                if now.saturating_sub(self.watchdog_at) >= every {
                    self.notifier.watchdog();
                    self.watchdog_at = now;
                }
            }
            if let Some(stop) = &mut self.stopping {
                if self.workers.is_empty() {
                    tracing::info!(pid = std::process::id(), "master stopped");
                    return 0;
                }
                if now >= stop.deadline && !stop.killed {
                    stop.killed = true;
                    tracing::warn!(
                        workers = self.workers.len(),
                        timeout = ?self.cfg.shutdown_timeout,
                        "shutdown timeout reached; killing remaining workers"
                    );
                    self.signal_all(Signal::SIGKILL);
                }
                continue;
            }
            self.maintain(now);
        }
    }

    fn next_wake(&self, now: Duration) -> Duration {
        let mut wake = TICK;
        if let Some(t) = self.respawn.hold_until(now) {
            wake = wake.min(t.saturating_sub(now));
        }
        if let Some(stop) = &self.stopping {
            wake = wake.min(stop.deadline.saturating_sub(now));
        }
        if let Some(every) = self.notifier.watchdog_every() {
            wake = wake.min((self.watchdog_at + every).saturating_sub(now));
        }
        if self.reload_since.is_some() || !self.passed.is_empty() {
            // A new generation gets ready in milliseconds; look often until it is.
            wake = wake.min(RELOAD_POLL);
        }
        wake.max(Duration::from_millis(1))
    }

    fn wait(&self, timeout: Duration) {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        if self.watch_listeners {
            fds.extend(
                self.listeners
                    .iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
        }
        fds.extend(
            self.workers
                .values()
                .filter_map(|w| w.channel.as_ref())
                .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN)),
        );
        // EINTR and friends only mean "look again": the loop re-reads signals and the clock.
        let _ = poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        );
    }

    /// Connections waiting for a worker: the kernel's accept-queue length where it can be read,
    /// else 1 for a listener with a connection pending.
    fn waiting(&self) -> usize {
        self.listeners
            .iter()
            .map(|l| match l.queue_len() {
                Some(n) => n as usize,
                None => {
                    let mut fds = [PollFd::new(l.as_fd(), PollFlags::POLLIN)];
                    let ready = poll(&mut fds, PollTimeout::ZERO).unwrap_or(0) > 0;
                    usize::from(ready)
                }
            })
            .sum()
    }

    fn read_intents(&mut self) -> Vec<Intent> {
        let mut intents = Vec::new();
        while let Ok(Some(info)) = self.signals.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if let Some(intent) = signals::intent(sig, self.stopping.is_some()) {
                intents.push(intent);
            }
        }
        intents
    }

    fn apply(&mut self, intent: Intent) {
        match intent {
            Intent::Stop => {
                if self.stopping.is_none() {
                    tracing::info!(
                        workers = self.workers.len(),
                        timeout = ?self.cfg.shutdown_timeout,
                        "graceful stop: draining workers"
                    );
                    self.stopping = Some(Stopping {
                        deadline: clock::now() + self.cfg.shutdown_timeout,
                        killed: false,
                    });
                    self.notifier.stopping();
                    self.stop_all();
                }
            }
            Intent::StopNow => {
                tracing::warn!(
                    workers = self.workers.len(),
                    "immediate stop: killing workers"
                );
                self.notifier.stopping();
                self.stopping = Some(Stopping {
                    deadline: clock::now(),
                    killed: true,
                });
                self.signal_all(Signal::SIGKILL);
            }
            Intent::Grow | Intent::Shrink => {
                let mut cfg = self.pool.config().clone();
                let before = cfg.workers;
                cfg.workers = if intent == Intent::Grow {
                    before + 1
                } else {
                    before.saturating_sub(1).max(1)
                };
                // The scoreboard was sized for twice the pool at startup (room for draining
                // workers beside their replacements); growing stays within half of it.
                if intent == Intent::Grow && cfg.workers >= self.board.len() / 2 {
                    tracing::warn!(
                        workers = before,
                        "cannot grow: the scoreboard was sized at startup"
                    );
                    return;
                }
                cfg.min_spare = cfg.min_spare.min(cfg.workers);
                cfg.max_spare = cfg.max_spare.min(cfg.workers);
                cfg.start_workers = cfg.start_workers.min(cfg.workers);
                tracing::info!(
                    from = before,
                    to = cfg.workers,
                    "pool size changed by signal"
                );
                self.pool.set_config(cfg);
            }
            Intent::ReopenLogs => {
                crate::logging::reopen();
                self.signal_all(Signal::SIGUSR1);
            }
            Intent::Reload => self.reload(),
            Intent::Upgrade => self.upgrade(),
            Intent::Reap => {}
        }
    }

    /// HUP: re-reads the configuration; if it is valid, starts a new generation of workers,
    /// and drains the older ones once it is ready. An invalid configuration changes nothing.
    fn reload(&mut self) {
        let cfg = match Config::load(&self.cli) {
            Ok(cfg) => cfg,
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the configuration is invalid; still running the previous one");
                return;
            }
        };
        // Bind what is new before changing anything, so a failure leaves everything as it was.
        let mut fresh = Vec::new();
        for addr in &cfg.listen {
            if self.listeners.iter().any(|l| l.addr() == addr) {
                continue;
            }
            match Listener::bind(addr, cfg.backlog, &cfg.socket) {
                Ok(l) => fresh.push(l),
                Err(e) => {
                    tracing::error!(listen = %addr, error = %e, "reload refused: cannot listen; still running the previous configuration");
                    return;
                }
            }
        }
        let (keep, retire): (Vec<Listener>, Vec<Listener>) = std::mem::take(&mut self.listeners)
            .into_iter()
            .partition(|l| l.activated() || cfg.listen.contains(l.addr()));
        self.listeners = keep;
        self.listeners.extend(fresh);
        self.retired.extend(retire);
        self.generation += 1;
        self.pool = Pool::new(cfg.pool.clone());
        self.cfg = cfg;
        self.reload_since = Some(clock::now());
        self.reload_warned = false;
        self.ready_sent = false;
        self.notifier.reloading(clock::now());
        tracing::info!(
            generation = self.generation,
            workers = self.cfg.pool.workers,
            "reload: starting a new generation; the old one serves until it is ready"
        );
    }

    /// Publishes the pool-wide figures the status page shows.
    fn publish_stats(&mut self, all: &[(WorkerView, SlotSnapshot)], waiting: usize) {
        let held: u64 = all.iter().map(|(_, s)| s.held).sum();
        let kernel = (waiting as u64).saturating_sub(held);
        let active = all.iter().filter(|(_, s)| s.in_flight > 0).count() as u64;
        let s = &mut self.stats;
        s.mode = match self.cfg.pool.mode {
            PoolMode::Static => 0,
            PoolMode::Dynamic => 1,
            PoolMode::OnDemand => 2,
        };
        s.max_workers = self.pool.config().workers as u64;
        s.generation = self.generation;
        s.backlog = self.cfg.backlog as u64;
        s.listen_queue = kernel;
        s.max_listen_queue = s.max_listen_queue.max(kernel + held);
        s.max_active = s.max_active.max(active);
        self.board.set_stats(s);
    }

    /// USR2: checks the binary on disk against the current command line (configuration and
    /// application setup), then re-executes it in place, handing over the listeners, the
    /// scoreboard and the running workers. Any failure keeps the old binary running.
    fn upgrade(&mut self) {
        if self.reload_since.is_some() {
            tracing::warn!(
                "upgrade refused: a reload is still under way; send USR2 again once it is done"
            );
            return;
        }
        let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let Some(program) = argv.first() else { return };
        tracing::info!(program = %program.to_string_lossy(), "upgrade: checking the new binary");
        let check = std::process::Command::new(program)
            .args(&argv[1..])
            .arg("--check-config")
            .env(upgrade::ENV_LISTENERS, "")
            .stdin(std::process::Stdio::null())
            .output();
        match check {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                let said = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stderr),
                    String::from_utf8_lossy(&out.stdout)
                );
                tracing::error!(
                    status = %out.status,
                    output = said.trim(),
                    "upgrade refused: the new binary failed its check; still running the old one"
                );
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade refused: cannot run the new binary; still running the old one");
                return;
            }
        }
        let workers: Vec<AdoptedWorker> = self
            .workers
            .iter()
            .map(|(pid, w)| AdoptedWorker {
                pid: *pid,
                slot: w.slot,
                generation: w.generation,
                started: w.started,
                channel: w.channel.as_ref().map(|c| c.as_raw_fd()),
            })
            .collect();
        let channels: Vec<_> = self
            .workers
            .values()
            .filter_map(|w| w.channel.as_ref())
            .map(|c| c.as_fd())
            .collect();
        self.notifier.reloading(clock::now());
        tracing::info!(
            pid = std::process::id(),
            workers = workers.len(),
            "upgrade: re-executing in place; the running workers serve until the new ones are ready"
        );
        let err = upgrade::exec_successor(
            &argv,
            &self.listeners,
            &self.board,
            &workers,
            &channels,
            self.generation,
        );
        tracing::error!(error = %err, "upgrade failed: cannot execute the new binary; still running the old one");
        self.notifier.ready();
    }

    /// Once the current generation is ready, older workers drain; once they are gone, retired
    /// listeners close.
    fn finish_reload(&mut self, current: &[WorkerView], now: Duration) {
        let ready = current
            .iter()
            .filter(|v| matches!(v.state, WorkerState::Idle | WorkerState::Busy))
            .count();
        if self.reload_since.is_none() && !self.ready_sent && ready > 0 {
            self.ready_sent = true;
            self.notifier.ready();
        }
        if let Some(since) = self.reload_since {
            if ready >= self.pool.initial_workers() {
                let mut drained = 0;
                for (pid, w) in self.workers.iter_mut() {
                    if w.generation < self.generation && !w.stopping {
                        w.stopping = true;
                        let _ = kill(*pid, Signal::SIGTERM);
                        drained += 1;
                    }
                }
                tracing::info!(
                    generation = self.generation,
                    ready,
                    draining = drained,
                    elapsed_ms = now.saturating_sub(since).as_millis() as u64,
                    "reload: new generation ready; draining the old one"
                );
                self.reload_since = None;
                self.ready_sent = true;
                self.notifier.ready();
            } else if now.saturating_sub(since) >= RELOAD_SLOW && !self.reload_warned {
                self.reload_warned = true;
                tracing::error!(
                    generation = self.generation,
                    ready,
                    wanted = self.pool.initial_workers(),
                    "reload: the new generation is not ready; the old generation keeps serving"
                );
            }
        }
        if !self.retired.is_empty()
            && self
                .workers
                .values()
                .all(|w| w.generation == self.generation)
        {
            for l in self.retired.drain(..) {
                tracing::info!(listen = %l.addr(), "listener removed by reload is closed");
            }
        }
    }

    /// Moves the connections draining workers handed over to a worker that stays.
    fn forward_connections(&mut self) {
        let mut passed = std::mem::take(&mut self.passed);
        let channels = self.workers.values().filter_map(|w| w.channel.as_ref());
        for channel in channels.chain(self.orphan_channels.iter()) {
            loop {
                match passing::recv(channel.as_fd()) {
                    Ok(Some(fd)) => passed.push(fd),
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
        }
        self.orphan_channels.clear();
        if passed.is_empty() {
            return;
        }
        let mut targets: Vec<(&Worker, bool)> = self
            .workers
            .values()
            .filter(|w| w.generation == self.generation && !w.stopping && w.channel.is_some())
            .filter(|w| self.board.slot(w.slot).state() != SlotState::Draining)
            .map(|w| (w, self.board.slot(w.slot).state() == SlotState::Idle))
            .collect();
        // Idle workers first; the rest wait for room like any kept-alive request.
        targets.sort_by_key(|(_, idle)| !idle);
        if targets.is_empty() {
            if self.stopping.is_none() {
                // The next generation is about to start: keep them until it does.
                self.passed = passed;
            }
            return;
        }
        for (i, fd) in passed.into_iter().enumerate() {
            let sent = targets
                .get(i % targets.len().max(1))
                .and_then(|(w, _)| w.channel.as_ref())
                .map(|c| passing::send(c.as_fd(), fd.as_fd()));
            match sent {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "cannot pass a kept-alive connection on; closing it")
                }
                None => {}
            }
        }
    }

    fn stop_all(&mut self) {
        for (pid, w) in self.workers.iter_mut() {
            w.stopping = true;
            let _ = kill(*pid, Signal::SIGTERM);
        }
    }

    fn signal_all(&self, sig: Signal) {
        for pid in self.workers.keys() {
            let _ = kill(*pid, sig);
        }
    }

    /// Reaps every exited child; one log line each.
    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => status,
            };
            let (pid, cause, clean) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exit code {code}"), code == 0),
                WaitStatus::Signaled(pid, sig, core) => (
                    pid,
                    format!(
                        "signal {}{}",
                        sig.as_str(),
                        if core { " (core dumped)" } else { "" }
                    ),
                    false,
                ),
                _ => continue,
            };
            let Some(mut w) = self.workers.remove(&pid) else {
                continue;
            };
            self.orphan_channels.extend(w.channel.take());
            let now = clock::now();
            let snap = self.board.slot(w.slot).snapshot();
            self.board.slot(w.slot).free();
            let lifetime = now.saturating_sub(w.started);
            let expected = w.stopping || w.timeout_term_at.is_some() || clean;
            if expected {
                tracing::info!(
                    pid = pid.as_raw(),
                    generation = w.generation,
                    cause,
                    lifetime_ms = lifetime.as_millis() as u64,
                    requests = snap.requests,
                    "worker exited"
                );
            } else {
                tracing::warn!(
                    pid = pid.as_raw(),
                    generation = w.generation,
                    cause,
                    lifetime_ms = lifetime.as_millis() as u64,
                    requests = snap.requests,
                    "worker died unexpectedly"
                );
                self.stats.respawns += 1;
                if let Some(delay) = self.respawn.on_crash(lifetime, now) {
                    self.stats.backoffs += 1;
                    tracing::warn!(
                        delay_ms = delay.as_millis() as u64,
                        "workers keep dying young: delaying respawn (crash-loop backoff)"
                    );
                }
            }
        }
    }

    fn views(&self) -> (Vec<WorkerView>, Vec<(WorkerView, SlotSnapshot)>) {
        let mut current = Vec::new();
        let mut all = Vec::new();
        for (pid, w) in &self.workers {
            let snap = self.board.slot(w.slot).snapshot();
            let state = match snap.state {
                SlotState::Starting | SlotState::Free => WorkerState::Starting,
                SlotState::Idle => WorkerState::Idle,
                SlotState::Busy => WorkerState::Busy,
                SlotState::Draining => WorkerState::Draining,
            };
            let view = WorkerView {
                pid: pid.as_raw(),
                state: if w.stopping {
                    WorkerState::Draining
                } else {
                    state
                },
                started: w.started,
                since: snap.since,
                requests: snap.requests,
                timeout_term_at: w.timeout_term_at,
            };
            if view.state != WorkerState::Draining && w.generation == self.generation {
                current.push(view.clone());
            }
            all.push((view, snap));
        }
        (current, all)
    }

    /// One maintenance pass: timeouts, slow requests, pool size.
    fn maintain(&mut self, now: Duration) {
        let (current, all) = self.views();
        if current.iter().any(|v| {
            v.state != WorkerState::Starting && now.saturating_sub(v.started) >= policy::YOUNG_DEATH
        }) {
            self.respawn.on_healthy();
        }
        let busy: Vec<WorkerView> = all.iter().map(|(v, _)| v.clone()).collect();
        if let Some(timeout) = self.cfg.request_timeout {
            for action in
                policy::request_timeouts(&busy, timeout, self.cfg.request_timeout_grace, now)
            {
                self.timeout(action, &all, now);
            }
        }
        if let Some(threshold) = self.cfg.slow_request_timeout {
            for (pid, elapsed) in self.slow.check(&busy, threshold, now) {
                self.stats.slow_requests += 1;
                if let Some((_, snap)) = all.iter().find(|(v, _)| v.pid == pid) {
                    tracing::warn!(
                        pid,
                        method = snap.method,
                        uri = snap.uri,
                        elapsed_ms = elapsed.as_millis() as u64,
                        "slow request"
                    );
                }
            }
        }
        self.finish_reload(&current, now);
        let idle = current
            .iter()
            .filter(|v| v.state == WorkerState::Idle)
            .count();
        let busy = current
            .iter()
            .filter(|v| v.state == WorkerState::Busy)
            .count();
        self.notifier.status(format!(
            "pool {}: {} workers ({idle} idle, {busy} busy), generation {}",
            self.cfg.pool_name,
            self.workers.len(),
            self.generation
        ));
        // Waiting for a worker: in the kernel's queues, or held by a saturated worker.
        let held: u64 = all.iter().map(|(_, snap)| snap.held).sum();
        let waiting = self.waiting() + held as usize;
        let plan = self.pool.tick(&current, waiting, now);
        self.publish_stats(&all, waiting);
        if let Some(max) = plan.max_reached {
            self.stats.max_children_reached += 1;
            tracing::warn!(
                workers = max.workers,
                waiting = max.waiting,
                "pool is at its maximum and requests are waiting; raise `workers` if this persists"
            );
        }
        for pid in plan.stop {
            if let Some(w) = self.workers.get_mut(&Pid::from_raw(pid)) {
                w.stopping = true;
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let ready = current
            .iter()
            .any(|v| matches!(v.state, WorkerState::Idle | WorkerState::Starting));
        self.watch_listeners = self.pool.config().mode != PoolMode::Static
            && !ready
            && plan.spawn == 0
            && current.len() < self.pool.config().workers;
        if plan.spawn > 0 {
            if let Some(until) = self.respawn.hold_until(now) {
                tracing::debug!(
                    wait_ms = until.saturating_sub(now).as_millis() as u64,
                    "respawn held back"
                );
                return;
            }
            for _ in 0..plan.spawn {
                self.spawn(now);
            }
        }
    }

    fn timeout(
        &mut self,
        action: TimeoutAction,
        all: &[(WorkerView, SlotSnapshot)],
        now: Duration,
    ) {
        let (pid, elapsed, sig) = match action {
            TimeoutAction::Term { pid, elapsed } => (pid, elapsed, Signal::SIGTERM),
            TimeoutAction::Kill { pid, elapsed } => (pid, elapsed, Signal::SIGKILL),
        };
        let (method, uri) = all
            .iter()
            .find(|(v, _)| v.pid == pid)
            .map(|(_, s)| (s.method.clone(), s.uri.clone()))
            .unwrap_or_default();
        tracing::warn!(
            pid,
            method,
            uri,
            elapsed_ms = elapsed.as_millis() as u64,
            signal = sig.as_str(),
            "request timeout: ending worker"
        );
        if let Some(w) = self.workers.get_mut(&Pid::from_raw(pid)) {
            if sig == Signal::SIGTERM {
                w.timeout_term_at = Some(now);
            }
            w.stopping = true;
        }
        let _ = kill(Pid::from_raw(pid), sig);
    }

    fn spawn(&mut self, now: Duration) {
        let Some(slot) = self.board.free_slot() else {
            tracing::warn!(slots = self.board.len(), "scoreboard full; not spawning");
            return;
        };
        self.board.slot(slot).reset(self.generation, now);
        // Connections a draining worker hands over travel on this pair; without it (fd
        // exhaustion) the worker still serves, and closes instead of handing over.
        let pair = UnixStream::pair()
            .and_then(|(m, w)| m.set_nonblocking(true).map(|()| (m, w)))
            .map_err(|e| tracing::warn!(error = %e, "no connection channel for a new worker"))
            .ok();
        let (channel, worker_end) = match pair {
            Some((m, w)) => (Some(m), Some(w)),
            None => (None, None),
        };
        match sys::fork() {
            Ok(Fork::Child) => self.become_worker(slot, worker_end),
            Ok(Fork::Parent(pid)) => {
                self.board.slot(slot).set_pid(pid.as_raw());
                self.workers.insert(
                    pid,
                    Worker {
                        slot,
                        generation: self.generation,
                        started: now,
                        timeout_term_at: None,
                        stopping: false,
                        channel,
                    },
                );
                tracing::debug!(
                    pid = pid.as_raw(),
                    slot,
                    generation = self.generation,
                    "worker spawned"
                );
            }
            Err(e) => {
                self.board.slot(slot).free();
                tracing::error!(error = %e, "fork failed");
            }
        }
    }

    fn become_worker(&self, slot: usize, channel: Option<UnixStream>) -> ! {
        let sockets = self
            .listeners
            .iter()
            .map(|l| l.try_clone_std())
            .collect::<Result<Vec<_>, _>>();
        let sockets = match sockets {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "worker cannot use the listeners");
                std::process::exit(1)
            }
        };
        let settings = worker::Settings::new(&self.cfg, slot);
        worker::run(
            Arc::clone(&self.app),
            sockets,
            Arc::clone(&self.board),
            settings,
            channel,
        )
    }
}

impl<R> Drop for Master<R> {
    fn drop(&mut self) {
        if let Some(path) = &self.cfg.pid_file {
            let _ = std::fs::remove_file(path);
        }
    }
}
