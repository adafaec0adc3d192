//! The master: single-threaded and synchronous. It owns the listeners and the workers, reads
//! signals from a signalfd, reaps children in a loop (signals coalesce), and once a second (or
//! at once, when a signal arrives) asks the policies what to do and does it.
//!
//! This file is the loop: wait, read intents, forward connections, reap, maintain, spawn. What
//! the loop decides comes from `policy`; the maintenance pass, reload generations, connection
//! forwarding, the USR2 upgrade, what an upgrade hands over, and systemd each have their own
//! file and, where they keep state, their own field group of [`Master`].

mod forward;
pub(crate) mod inherit;
mod maintain;
mod notify;
mod policy;
mod reload;
mod signals;
mod tasks;
mod upgrade;

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::clock;
use crate::config::{Cli, Config};
use crate::listener::Listener;
use crate::scoreboard::{Scoreboard, SlotState};
use crate::sys::{self, Fork};
use crate::worker::{self, Application};
use forward::Forwarding;
use inherit::{AdoptedWorker, Inherited};
use maintain::Policies;
use notify::Systemd;
use policy::Resize;
use reload::Generations;
use signals::Intent;

/// The maintenance tick: how often an idle master wakes.
const TICK: Duration = Duration::from_secs(1);

/// How often the master looks at a new generation's readiness during a reload or upgrade.
const RELOAD_POLL: Duration = Duration::from_millis(20);

/// The shortest wait: a deadline already past must not turn the loop into a busy spin.
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Scoreboard slots per configured worker: the pool, a second generation beside it during a
/// reload ([`policy::GENERATIONS_IN_BOARD`]), and as much again so TTIN can double the pool
/// (growing stops at half the table) and a reload of the doubled pool still fits.
const SLOTS_PER_WORKER: usize = 4;

/// The fewest slots: a slot is under 400 bytes, so 256 cost under 100 KiB, and they let a small
/// pool grow by TTIN to 127 workers without a restart.
const MIN_SLOTS: usize = 256;

/// Scoreboard slots for `cfg`; the table is sized once, at startup.
fn slots_for(cfg: &Config) -> usize {
    (cfg.pool.workers * SLOTS_PER_WORKER).max(MIN_SLOTS)
}

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
    /// adopted across an upgrade whose predecessor had none).
    channel: Option<UnixStream>,
}

impl Worker {
    /// A worker of the previous master (an upgrade). Its channel survives the exec too, so it
    /// still hands over.
    fn adopted(w: &AdoptedWorker) -> Worker {
        Worker {
            slot: w.slot,
            generation: w.generation,
            started: w.started,
            timeout_term_at: None,
            stopping: false,
            channel: w.channel.and_then(|fd| {
                let channel = UnixStream::from(sys::adopt_fd(fd).ok()?);
                channel.set_nonblocking(true).ok()?;
                Some(channel)
            }),
        }
    }
}

/// A stop under way.
struct Stopping {
    deadline: Duration,
    killed: bool,
}

/// The running master.
pub(crate) struct Master<R> {
    cfg: Config,
    /// The command line, to re-read the configuration on reload.
    cli: Cli,
    app: Arc<R>,
    listeners: Vec<Listener>,
    board: Arc<Scoreboard>,
    workers: HashMap<Pid, Worker>,
    signals: SignalFd,
    stopping: Option<Stopping>,
    policies: Policies,
    generations: Generations,
    forwarding: Forwarding,
    systemd: Systemd,
    /// The background tasks' processes (`tasks.rs`).
    tasks: tasks::Tasks<R>,
}

impl<R: Application> Master<R> {
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
        let now = clock::now();
        // Workers of the previous master (an upgrade) keep serving until this master's own
        // generation is ready, exactly as in a reload.
        let workers: HashMap<Pid, Worker> = inherited
            .workers
            .iter()
            .map(|w| (w.pid, Worker::adopted(w)))
            .collect();
        let policies = Policies::new(cfg.pool.clone(), &board, now);
        let tasks = tasks::Tasks::new(app.tasks(), &cfg)?;
        Ok(Master {
            tasks,
            generations: Generations::new(inherited.generation, !workers.is_empty(), now),
            cfg,
            cli,
            app,
            listeners,
            board: Arc::new(board),
            workers,
            signals,
            stopping: None,
            policies,
            forwarding: Forwarding::default(),
            systemd: Systemd::from_env(now),
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
        for _ in 0..self.policies.pool.initial_workers() {
            self.spawn(clock::now());
        }
        self.ready_if_nothing_to_start();
        self.maintain_tasks(clock::now(), false);
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
            self.systemd.tick(now);
            self.maintain_tasks(now, self.stopping.is_some());
            if let Some(stop) = &mut self.stopping {
                if self.workers.is_empty() && self.tasks.is_empty() {
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
        if let Some(t) = self.policies.respawn.hold_until(now) {
            wake = wake.min(t.saturating_sub(now));
        }
        if let Some(stop) = &self.stopping {
            wake = wake.min(stop.deadline.saturating_sub(now));
        }
        if let Some(due) = self.tasks.next_due(&self.board, now) {
            wake = wake.min(due);
        }
        if let Some(due) = self.systemd.next_due(now) {
            wake = wake.min(due);
        }
        // Held connections wait for a worker that is coming: look often until it is there.
        // With none coming (an `ondemand` pool gone idle), a request on one wakes the wait.
        let held = self.forwarding.waiting() && !self.policies.watch_listeners;
        if self.generations.reloading() || held {
            // A new generation gets ready in milliseconds; look often until it is.
            wake = wake.min(RELOAD_POLL);
        }
        wake.max(MIN_WAIT)
    }

    fn wait(&self, timeout: Duration) {
        // Rounded up: waking a fraction of a millisecond before a deadline would find it not
        // yet due, and the next wait would be a whole tick.
        let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
        let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
        if self.policies.watch_listeners {
            fds.extend(
                self.listeners
                    .iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
            // Kept-alive connections handed over with no worker to take them: a request on
            // one is a reason to start a worker, as a new connection is.
            fds.extend(
                self.forwarding
                    .held()
                    .map(|c| PollFd::new(c, PollFlags::POLLIN)),
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
                    self.systemd.notifier.stopping();
                    self.stop_all();
                }
            }
            Intent::StopNow => {
                tracing::warn!(
                    workers = self.workers.len(),
                    "immediate stop: killing workers"
                );
                self.systemd.notifier.stopping();
                self.stopping = Some(Stopping {
                    deadline: clock::now(),
                    killed: true,
                });
                self.signal_all(Signal::SIGKILL);
            }
            Intent::Grow => self.resize(Resize::Grow),
            Intent::Shrink => self.resize(Resize::Shrink),
            Intent::ReopenLogs => {
                crate::logging::reopen();
                self.signal_all(Signal::SIGUSR1);
            }
            // A stopping master has closed its listeners: nothing left to reload or hand on.
            Intent::Reload | Intent::Upgrade if self.stopping.is_some() => {
                tracing::warn!(
                    pid = std::process::id(),
                    ?intent,
                    "ignored: a graceful stop is under way"
                );
            }
            Intent::Reload => self.reload(),
            Intent::Upgrade => self.upgrade(),
            // The loop reaps, and maintains the pool (spawning for what waits), right after.
            Intent::Reap | Intent::Wake => {}
        }
    }

    fn forward_connections(&mut self) {
        self.forwarding.forward(
            &self.workers,
            &self.board,
            self.generations.current,
            self.stopping.is_some(),
        );
    }

    /// The host leaves: new connections are refused first, so a frontend fails over (nginx
    /// retries a refused connect for any method, nothing having been sent, and counts it
    /// towards `max_fails`), while the workers finish what they have. SIGQUIT, not the
    /// reload's SIGTERM, tells them no worker stays: they keep each open connection until its
    /// next answer instead of handing it to the master, which could only close it under nginx.
    fn stop_all(&mut self) {
        // Dropping the master's copies (and unlinking the unix sockets it made); each worker
        // closes its own as it stops accepting, and the last close makes the kernel refuse.
        let closed = self.listeners.len();
        self.listeners.clear();
        tracing::info!(
            pid = std::process::id(),
            listeners = closed,
            "listeners closed: new connections are refused while workers finish"
        );
        for (pid, w) in self.workers.iter_mut() {
            w.stopping = true;
            let _ = kill(*pid, Signal::SIGQUIT);
        }
        self.stop_tasks(clock::now());
    }

    fn signal_all(&self, sig: Signal) {
        for pid in self.workers.keys().copied().chain(self.tasks.pids()) {
            let _ = kill(pid, sig);
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
            // Not a worker: a task process, or one not adopted across an upgrade (`inherit`).
            let Some(w) = self.workers.remove(&pid) else {
                self.task_reaped(pid, status, &cause);
                continue;
            };
            self.reaped(pid, w, &cause, clean);
        }
    }

    /// One worker is gone: free its slot, log it, and count it towards a crash loop unless its
    /// exit was expected.
    fn reaped(&mut self, pid: Pid, mut w: Worker, cause: &str, clean: bool) {
        if let Some(channel) = w.channel.take() {
            self.forwarding.orphan(pid, channel);
        }
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
            return;
        }
        let in_flight = snap.in_flight > 0 || snap.state == SlotState::Busy;
        if in_flight {
            // The request it cost: what the operator looks for first.
            tracing::warn!(
                pid = pid.as_raw(),
                generation = w.generation,
                cause,
                lifetime_ms = lifetime.as_millis() as u64,
                requests = snap.requests,
                method = snap.method,
                uri = snap.uri,
                "worker died unexpectedly"
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
        }
        self.policies.stats.respawns += 1;
        let served = in_flight || snap.requests > 0;
        let death = policy::Death {
            lifetime,
            ready: served || !matches!(snap.state, SlotState::Starting | SlotState::Free),
            served,
        };
        if let Some(delay) = self.policies.respawn.on_crash(death, now) {
            self.policies.stats.backoffs += 1;
            tracing::warn!(
                delay_ms = delay.as_millis() as u64,
                "workers keep dying before they serve: delaying respawn (crash-loop backoff)"
            );
        }
    }

    fn spawn(&mut self, now: Duration) {
        let Some(slot) = self.board.free_slot() else {
            tracing::warn!(slots = self.board.len(), "scoreboard full; not spawning");
            return;
        };
        let generation = self.generations.current;
        self.board.slot(slot).reset(generation, now);
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
                        generation,
                        started: now,
                        timeout_term_at: None,
                        stopping: false,
                        channel,
                    },
                );
                tracing::debug!(pid = pid.as_raw(), slot, generation, "worker spawned");
            }
            Err(e) => {
                self.board.slot(slot).free();
                tracing::error!(error = %e, "fork failed");
            }
        }
    }

    fn become_worker(&mut self, slot: usize, channel: Option<UnixStream>) -> ! {
        // The worker keeps only its own copies, which its accept loop closes when it drains:
        // the master's copies, forked with it, would keep a stopping host's listeners open
        // until the worker exits, and the kernel would queue connections nobody accepts,
        // reset at the exit. (Dropped here they unlink nothing: the child did not create them.)
        let listeners = std::mem::take(&mut self.listeners);
        let sockets = listeners
            .iter()
            .map(|l| l.try_clone_std())
            .collect::<Result<Vec<_>, _>>();
        drop(listeners);
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
