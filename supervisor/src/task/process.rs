//! The task process: forked by the master, it takes the host lock, then (with a lease) waits
//! to be leader, and runs the task on its schedule until told to stop. A stop lets the current
//! run finish, up to `stop_timeout`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;

use super::schedule::{self, Run};
use super::{lock, Task, TaskContext, CLOCK_OFFSET_ENV};
use crate::clock;
use crate::config::TaskConfig;
use crate::scoreboard::{Scoreboard, TaskRole, TaskSlot, TaskState};
use crate::worker::Application;

/// Exit code of a task process whose run panicked: EX_SOFTWARE. The master counts it as a
/// crash (crash-loop backoff).
pub(crate) const EXIT_PANIC: i32 = 70;
/// Exit code of a leader that lost its lease: EX_TEMPFAIL. Expected: the master starts a new
/// process at once, which becomes a standby until it can lead again.
pub(crate) const EXIT_LEASE_LOST: i32 = 75;
/// Exit code of a task process that could not start (lock file, database settings).
const EXIT_FAILURE: i32 = 1;

/// A stop request, shared by the signal thread, the run loop and the application's run.
#[derive(Debug, Default)]
pub(crate) struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    /// Asks everything waiting to stop.
    pub(crate) fn request(&self) {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        self.wake.notify_all();
    }

    /// Whether a stop was asked for.
    pub(crate) fn requested(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleeps up to `d`; returns at once, true, when a stop is asked for.
    pub(crate) fn sleep(&self, d: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, d, |s| !*s)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }
}

/// What a task process needs from the master, decided before the fork.
pub(crate) struct Spec {
    pub cfg: TaskConfig,
    pub lock_dir: PathBuf,
    pub pool: String,
    pub slot: usize,
    pub master: Pid,
}

/// The process's side of one task: its slot, its stop, and what each run needs.
pub(crate) struct Runner<'a, R> {
    pub app: &'a R,
    pub task: Task<R>,
    pub cfg: &'a TaskConfig,
    pub slot: TaskSlot<'a>,
    pub stop: Arc<Stop>,
    clock_offset_secs: i64,
    iteration: u64,
}

impl<R> Runner<'_, R> {
    /// One run. A panic ends the process (the master backs off); an error is recorded.
    pub(crate) fn run_once(&mut self, epoch: Option<i64>) -> Run {
        self.iteration += 1;
        let ctx = TaskContext {
            name: self.cfg.name.clone(),
            epoch,
            iteration: self.iteration,
            database_url: self.cfg.lease.as_ref().map(|l| l.url.clone()),
            stop: Arc::clone(&self.stop),
            clock_offset_secs: self.clock_offset_secs,
        };
        let start = clock::now();
        self.slot.begin_run(start, unix_ms());
        let result = catch_unwind(AssertUnwindSafe(|| (self.task.run)(self.app, &ctx)));
        let end = clock::now();
        match result {
            Ok(Ok(())) => self.slot.end_run(end, None),
            Ok(Err(e)) => {
                tracing::warn!(
                    pid = std::process::id(),
                    task = self.cfg.name,
                    iteration = self.iteration,
                    error = e,
                    "task run failed"
                );
                self.slot.end_run(end, Some(&e));
            }
            Err(_) => {
                // The panic hook logged the message and its place.
                self.slot.end_run(end, Some("panicked"));
                std::process::exit(EXIT_PANIC);
            }
        }
        if self.stop.requested() {
            self.slot.set_state(TaskState::Stopping);
        }
        Run { start, end }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the task process and exits; never returns.
pub(crate) fn run<R: Application>(
    app: Arc<R>,
    task: Task<R>,
    spec: Spec,
    board: Arc<Scoreboard>,
) -> ! {
    let code = match serve(&*app, task, &spec, board) {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(pid = std::process::id(), task = spec.cfg.name, error = %e, "task failed");
            EXIT_FAILURE
        }
    };
    std::process::exit(code)
}

fn serve<R: Application>(
    app: &R,
    task: Task<R>,
    spec: &Spec,
    board: Arc<Scoreboard>,
) -> std::io::Result<()> {
    // A task whose master is gone finishes its run and stops: no orphan holding the lock (or
    // the lease) for ever.
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    if nix::unistd::getppid() != spec.master {
        return Ok(());
    }
    set_panic_hook(&spec.cfg.name);
    let slot = board.task(spec.slot);
    slot.set_pid(std::process::id() as i32);
    let stop = Arc::new(Stop::default());
    watch_signals(Arc::clone(&stop), Arc::clone(&board), spec)?;
    let lock_path = lock::path(&spec.lock_dir, &spec.pool, &spec.cfg.name);
    let _lock = match lock::acquire(&lock_path, &stop, || {
        tracing::info!(
            pid = std::process::id(),
            task = spec.cfg.name,
            lock = %lock_path.display(),
            "task waits for the host lock: its previous process still runs here"
        )
    })? {
        Some(lock) => lock,
        None => return Ok(()),
    };
    let clock_offset_secs = std::env::var(CLOCK_OFFSET_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut runner = Runner {
        app,
        task,
        cfg: &spec.cfg,
        slot,
        stop: Arc::clone(&stop),
        clock_offset_secs,
        iteration: 0,
    };
    match &spec.cfg.lease {
        None => {
            slot.set_role(TaskRole::Local, 0);
            slot.set_state(TaskState::Idle);
            tracing::info!(pid = std::process::id(), task = spec.cfg.name, "task runs (no lease: single per host)");
            local_loop(&mut runner);
            Ok(())
        }
        #[cfg(feature = "postgres")]
        Some(lease) => super::lease::leader_loop(&mut runner, lease),
        #[cfg(not(feature = "postgres"))]
        Some(_) => Err(std::io::Error::other(
            "a lease is configured but this binary was built without the supervisor's `postgres` feature",
        )),
    }
}

/// Without a lease: run on the host's monotonic clock until told to stop.
fn local_loop<R>(runner: &mut Runner<'_, R>) {
    let mut last = None;
    loop {
        let wait =
            schedule::wait_before_next(runner.cfg.mode, runner.cfg.interval, last, clock::now());
        if runner.stop.requested() || runner.stop.sleep(wait) {
            return;
        }
        last = Some(runner.run_once(None));
    }
}

/// TERM and QUIT ask for a stop (the run finishes; past `stop_timeout` the process exits
/// anyway, even with no master left to kill it); INT is the master's to decide; USR1 reopens
/// the log. The signals stay blocked, as the master left them, and one thread waits for them.
fn watch_signals(stop: Arc<Stop>, board: Arc<Scoreboard>, spec: &Spec) -> std::io::Result<()> {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGINT,
    ] {
        set.add(sig);
    }
    let stop_timeout = spec.cfg.stop_timeout;
    let name = spec.cfg.name.clone();
    let slot_index = spec.slot;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(Signal::SIGUSR1) => crate::logging::reopen(),
                Ok(Signal::SIGTERM | Signal::SIGQUIT) => {
                    if stop.requested() {
                        continue;
                    }
                    stop.request();
                    let slot = board.task(slot_index);
                    if slot.state() != TaskState::Running {
                        slot.set_state(TaskState::Stopping);
                    }
                    let name = name.clone();
                    let _ = std::thread::Builder::new()
                        .name("stop-timeout".into())
                        .spawn(move || {
                            std::thread::sleep(stop_timeout);
                            tracing::warn!(
                                pid = std::process::id(),
                                task = name,
                                timeout = ?stop_timeout,
                                "task run did not finish within stop_timeout; exiting"
                            );
                            std::process::exit(EXIT_FAILURE);
                        });
                }
                Ok(_) | Err(_) => {}
            }
        })?;
    Ok(())
}

fn set_panic_hook(task: &str) {
    let task = task.to_string();
    std::panic::set_hook(Box::new(move |info| {
        let (location, message) = crate::logging::panic_parts(info);
        tracing::error!(
            pid = std::process::id(),
            task,
            location,
            panic = message,
            "task panicked"
        );
    }));
}
