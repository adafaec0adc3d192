//! Pool policies: pure functions of a scoreboard snapshot and `now`.
//!
//! Time is a `Duration` on the monotonic clock (`CLOCK_MONOTONIC`, shared by all processes),
//! so tests pass any value they like: that is the fake clock.

use std::time::Duration;

use crate::config::{PoolConfig, PoolMode};

/// What a worker is doing, as the policies see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Forked, not yet accepting.
    Starting,
    /// Accepting, with room for a request.
    Idle,
    /// At its cap of requests in flight.
    Busy,
    /// Finishing its requests before it exits.
    Draining,
}

/// One worker, from the scoreboard plus what the master remembers.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    /// Its pid.
    pub pid: i32,
    /// What it is doing.
    pub state: WorkerState,
    /// When it was spawned.
    pub started: Duration,
    /// When it entered its current state (idle since / busy since = current request start).
    pub since: Duration,
    /// Requests it has finished.
    pub requests: u64,
    /// When the master sent SIGTERM for a request timeout, if it did.
    pub timeout_term_at: Option<Duration>,
}

/// The first tick of an episode in which the pool is at its maximum while requests wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxReached {
    /// Workers in the pool.
    pub workers: usize,
    /// Connections waiting.
    pub waiting: usize,
}

/// What one maintenance tick decided.
#[derive(Debug, Default, PartialEq)]
pub struct PoolPlan {
    /// Workers to start.
    pub spawn: usize,
    /// Idle workers to stop gracefully, longest-idle first; never a busy or starting one.
    pub stop: Vec<i32>,
    /// Set once per episode of "at the maximum with requests waiting", for one log line.
    pub max_reached: Option<MaxReached>,
}

/// Pool sizing, with the little memory it needs between ticks.
#[derive(Debug, Clone)]
pub struct Pool {
    cfg: PoolConfig,
    /// Spawns allowed this tick in `dynamic`; doubles while spawning is still needed.
    rate: usize,
    /// Whether the current "maximum reached" episode was already reported.
    max_reported: bool,
}

impl Pool {
    /// A pool following `cfg`.
    pub fn new(cfg: PoolConfig) -> Pool {
        Pool {
            cfg,
            rate: 1,
            max_reported: false,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// New settings (reload, TTIN, TTOU).
    pub fn set_config(&mut self, cfg: PoolConfig) {
        self.cfg = cfg;
    }

    /// Workers to start at boot.
    pub fn initial_workers(&self) -> usize {
        match self.cfg.mode {
            PoolMode::Static => self.cfg.workers,
            PoolMode::Dynamic => self.cfg.start_workers.min(self.cfg.workers),
            PoolMode::OnDemand => 0,
        }
    }

    /// One maintenance tick over the current generation's workers (draining ones excluded),
    /// with `waiting` connections or requests waiting for a worker (in the kernel's queues or
    /// held by a saturated worker).
    pub fn tick(&mut self, workers: &[WorkerView], waiting: usize, now: Duration) -> PoolPlan {
        let total = workers.len();
        let max = self.cfg.workers;
        let idle = count(workers, WorkerState::Idle);
        let starting = count(workers, WorkerState::Starting);
        let room = max.saturating_sub(total);
        let mut plan = PoolPlan::default();

        match self.cfg.mode {
            PoolMode::Static => {
                plan.spawn = room;
                // After TTOU the pool may be over its size: shed idle workers, never busy ones.
                plan.stop = longest_idle(workers, total.saturating_sub(max));
            }
            PoolMode::Dynamic => {
                // Starting workers are about to be idle: count them as spare.
                let spare = idle + starting;
                let want = self.cfg.min_spare.saturating_sub(spare);
                if want > 0 && room > 0 {
                    plan.spawn = want.min(self.rate).min(room);
                    self.rate = (self.rate * 2).min(self.cfg.max_spawn_rate.max(1));
                } else {
                    self.rate = 1;
                }
                plan.spawn = plan.spawn.max(self.for_waiting(waiting, spare, room));
                if idle > self.cfg.max_spare {
                    plan.stop = longest_idle(workers, idle - self.cfg.max_spare);
                }
            }
            PoolMode::OnDemand => {
                plan.spawn = self.for_waiting(waiting, idle + starting, room);
                let expired: Vec<&WorkerView> = workers
                    .iter()
                    .filter(|w| {
                        w.state == WorkerState::Idle
                            && now.saturating_sub(w.since) >= self.cfg.idle_timeout
                    })
                    .collect();
                plan.stop = longest_idle_of(expired, usize::MAX);
            }
        }

        // A starting worker is about to take what waits: a pool replacing its dead (a crash
        // storm) is not out of workers, and saying so at every replacement would bury the
        // line that matters.
        let at_max = total >= max && idle + starting == 0 && waiting > 0;
        if at_max && !self.max_reported {
            plan.max_reached = Some(MaxReached {
                workers: total,
                waiting,
            });
        }
        self.max_reported = at_max;
        plan
    }

    /// Workers to start for `waiting` requests or connections: when none of the workers is
    /// idle or starting (`spare`), nothing already running will take them, so one worker each,
    /// all in this pass rather than at the doubling rate, up to `max_spawn_rate` and the `room`
    /// left below the maximum. Waiting beside a spare worker is the instant before that worker
    /// accepts, not demand: spawning for it would overshoot on every busy tick.
    fn for_waiting(&self, waiting: usize, spare: usize, room: usize) -> usize {
        if spare > 0 {
            return 0;
        }
        waiting.min(self.cfg.max_spawn_rate).min(room)
    }
}

fn count(workers: &[WorkerView], state: WorkerState) -> usize {
    workers.iter().filter(|w| w.state == state).count()
}

fn longest_idle(workers: &[WorkerView], n: usize) -> Vec<i32> {
    longest_idle_of(
        workers
            .iter()
            .filter(|w| w.state == WorkerState::Idle)
            .collect(),
        n,
    )
}

fn longest_idle_of(mut idle: Vec<&WorkerView>, n: usize) -> Vec<i32> {
    idle.sort_by_key(|w| w.since);
    idle.into_iter().take(n).map(|w| w.pid).collect()
}

/// A worker that became ready and dies younger than this without taking a request counts
/// towards a crash loop (see [`Respawn`]); one that lived this long proved it can run.
pub const YOUNG_DEATH: Duration = Duration::from_secs(1);
/// The first delay of a crash loop, doubled on each further counted death.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest delay between respawns, like systemd's and Kubernetes' caps: long enough to stop
/// the spinning, short enough that a fixed dependency is picked up soon.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How far a worker that died unexpectedly had got, read from its slot when it was reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Death {
    /// From its spawn to its reaping.
    pub lifetime: Duration,
    /// Its slot left Starting: it was set up and accepting.
    pub ready: bool,
    /// It took a request: finished one, or had one in flight when it died.
    pub served: bool,
}

impl Death {
    /// Whether this death says that workers cannot start, rather than that one worker met an
    /// accident (see [`Respawn`]).
    pub fn counts(&self) -> bool {
        !self.ready || (!self.served && self.lifetime < YOUNG_DEATH)
    }
}

/// Respawn with crash-loop backoff. A dead worker is replaced at once unless deaths show that
/// workers cannot start; then the replacements wait, twice as long each time, from
/// [`BACKOFF_START`] up to [`BACKOFF_MAX`].
///
/// Which deaths count ([`Death::counts`]):
/// - a worker that never became ready (its slot never left Starting: the process setup or
///   `init_worker` failed, the program exits at once) counts, however long it took to fail;
/// - a worker that became ready and died younger than [`YOUNG_DEATH`] without taking a single
///   request counts too: something in the worker itself (a background thread, a watchdog)
///   kills each one right after it starts, and replacing those at full speed would spin
///   forever;
/// - a worker that took a request, or lived past [`YOUNG_DEATH`], and then died (a crash in a
///   request, a kill, an OOM) does not count: it is replaced at once, so a client that crashes
///   a worker with every request costs one worker at a time, never the pool. Such a death ends
///   a crash loop, since that worker proved that workers start and serve.
///
/// The first counted death is free, since one worker failing to start is not yet a loop; from
/// the second on, spawning is held back. The loop also ends when a running worker proves
/// healthy ([`any_healthy`]: ready, and it took a request or lived past [`YOUNG_DEATH`]).
/// Readiness alone does not end it: a worker that dies young right after becoming ready would
/// reset the loop it belongs to each time, and spin.
#[derive(Debug, Clone, Default)]
pub struct Respawn {
    counted: u32,
    delay: Duration,
    hold_until: Option<Duration>,
}

impl Respawn {
    /// No crash loop yet.
    pub fn new() -> Respawn {
        Respawn::default()
    }

    /// Records an unexpected exit. Returns the delay when this exit starts or lengthens a
    /// backoff (to be logged), `None` when the replacement may start at once.
    pub fn on_crash(&mut self, death: Death, now: Duration) -> Option<Duration> {
        if !death.counts() {
            self.on_healthy();
            return None;
        }
        self.counted += 1;
        if self.counted < 2 {
            return None;
        }
        self.delay = if self.delay.is_zero() {
            BACKOFF_START
        } else {
            (self.delay * 2).min(BACKOFF_MAX)
        };
        self.hold_until = Some(now + self.delay);
        Some(self.delay)
    }

    /// A worker proved healthy: the loop, if any, is over.
    pub fn on_healthy(&mut self) {
        self.counted = 0;
        self.delay = Duration::ZERO;
        self.hold_until = None;
    }

    /// `None` when spawning is allowed now; else the time before which it is not.
    pub fn hold_until(&self, now: Duration) -> Option<Duration> {
        self.hold_until.filter(|&t| t > now)
    }
}

/// What to do about a request that ran too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutAction {
    /// Ask the worker to stop (SIGTERM).
    Term {
        /// The worker.
        pid: i32,
        /// How long the request has run.
        elapsed: Duration,
    },
    /// It did not: kill it (SIGKILL).
    Kill {
        /// The worker.
        pid: i32,
        /// How long the request has run.
        elapsed: Duration,
    },
}

/// How long past `request_timeout` a request must be before the master ends a worker whose
/// event loop answers its own timeouts (an async service, a foreign program). The loop answers
/// at the timeout itself, give or take its lag; its watchdog marks the slot busy at most 0.75 s
/// past the timeout if the loop is stuck. Acting at the timeout as for a blocking worker
/// would race the loop's own answer and now and then replace a worker that was fine.
pub const SELF_TIMED_MARGIN: Duration = Duration::from_secs(1);

/// The age of a request at which the master ends its worker: `request_timeout`, plus
/// [`SELF_TIMED_MARGIN`] where the worker's loop answers its own timeouts.
pub fn ending_age(request_timeout: Duration, answers_its_timeouts: bool) -> Duration {
    if answers_its_timeouts {
        request_timeout + SELF_TIMED_MARGIN
    } else {
        request_timeout
    }
}

/// Busy workers whose request started more than `timeout` ago get one Term; those termed more
/// than `grace` ago get Kill.
pub fn request_timeouts(
    workers: &[WorkerView],
    timeout: Duration,
    grace: Duration,
    now: Duration,
) -> Vec<TimeoutAction> {
    workers
        .iter()
        .filter_map(|w| {
            let elapsed = now.saturating_sub(w.since);
            match w.timeout_term_at {
                Some(at) if now.saturating_sub(at) >= grace => Some(TimeoutAction::Kill {
                    pid: w.pid,
                    elapsed,
                }),
                Some(_) => None,
                None if w.state == WorkerState::Busy && elapsed > timeout => {
                    Some(TimeoutAction::Term {
                        pid: w.pid,
                        elapsed,
                    })
                }
                None => None,
            }
        })
        .collect()
}

/// Remembers which requests were already reported slow, so each is logged once.
#[derive(Debug, Clone, Default)]
pub struct SlowLog {
    reported: Vec<(i32, Duration)>,
}

impl SlowLog {
    /// Busy workers whose current request has run longer than `threshold` and was not reported
    /// yet: (pid, elapsed).
    pub fn check(
        &mut self,
        workers: &[WorkerView],
        threshold: Duration,
        now: Duration,
    ) -> Vec<(i32, Duration)> {
        // Forget requests that ended.
        self.reported.retain(|(pid, since)| {
            workers
                .iter()
                .any(|w| w.pid == *pid && w.since == *since && w.state == WorkerState::Busy)
        });
        let mut slow = Vec::new();
        for w in workers.iter().filter(|w| w.state == WorkerState::Busy) {
            let elapsed = now.saturating_sub(w.since);
            if elapsed > threshold && !self.reported.contains(&(w.pid, w.since)) {
                self.reported.push((w.pid, w.since));
                slow.push((w.pid, elapsed));
            }
        }
        slow
    }
}

/// TTIN or TTOU: one worker more or one fewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// One worker more.
    Grow,
    /// One worker fewer.
    Shrink,
}

/// Why TTIN changed nothing: the pool would outgrow its share of the scoreboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoardFull {
    /// The pool size, unchanged.
    pub workers: usize,
    /// Slots in the scoreboard.
    pub slots: usize,
}

/// Generations that must fit in the scoreboard at once: during a reload the new generation
/// starts beside the old one, which drains only once the new one is ready.
pub const GENERATIONS_IN_BOARD: usize = 2;

/// The pool settings after TTIN or TTOU. The scoreboard is sized once, at startup: growing
/// stops short of [`GENERATIONS_IN_BOARD`]'s share of it, so a reload of the grown pool still
/// fits. Shrinking stops at one worker. The spare and start counts are clamped to the new size,
/// which they may not exceed.
pub fn resize(cfg: &PoolConfig, resize: Resize, slots: usize) -> Result<PoolConfig, BoardFull> {
    let mut cfg = cfg.clone();
    let before = cfg.workers;
    cfg.workers = match resize {
        Resize::Grow => before + 1,
        Resize::Shrink => before.saturating_sub(1).max(1),
    };
    if resize == Resize::Grow && cfg.workers >= slots / GENERATIONS_IN_BOARD {
        return Err(BoardFull {
            workers: before,
            slots,
        });
    }
    cfg.min_spare = cfg.min_spare.min(cfg.workers);
    cfg.max_spare = cfg.max_spare.min(cfg.workers);
    cfg.start_workers = cfg.start_workers.min(cfg.workers);
    Ok(cfg)
}

/// Whether some current worker is up (past starting) and has taken a request or lived past
/// [`YOUNG_DEATH`]: then a crash loop, if any, is over ([`Respawn::on_healthy`]).
pub fn any_healthy(current: &[WorkerView], now: Duration) -> bool {
    current.iter().any(|v| {
        v.state != WorkerState::Starting
            && (v.requests > 0
                || v.state == WorkerState::Busy
                || now.saturating_sub(v.started) >= YOUNG_DEATH)
    })
}

/// Whether the master should wake on a connection arriving rather than on its tick: a pool
/// that starts workers on demand (`dynamic`, `ondemand`) has none ready or about to be
/// (idle or starting), this tick starts none, and there is room for one. A `static` pool is
/// always full, and a starting worker will take the connection itself.
pub fn watch_listeners(cfg: &PoolConfig, current: &[WorkerView], spawning: usize) -> bool {
    let ready = current
        .iter()
        .any(|v| matches!(v.state, WorkerState::Idle | WorkerState::Starting));
    cfg.mode != PoolMode::Static && !ready && spawning == 0 && current.len() < cfg.workers
}

/// How long a reload may wait for the new generation before the master says so, loudly.
pub const RELOAD_SLOW: Duration = Duration::from_secs(10);

/// Current workers that serve (idle or busy): what readiness counts.
pub fn ready_workers(current: &[WorkerView]) -> usize {
    current
        .iter()
        .filter(|v| matches!(v.state, WorkerState::Idle | WorkerState::Busy))
        .count()
}

/// Where a reload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadProgress {
    /// The new generation is ready: the older ones drain.
    Ready,
    /// Not yet.
    Waiting,
    /// Not yet, and it has been [`RELOAD_SLOW`] or longer.
    Late,
}

/// A reload that started at `since` is done once `ready` workers of the new generation serve,
/// as many as the pool starts with (`wanted`, [`Pool::initial_workers`]).
pub fn reload_progress(
    ready: usize,
    wanted: usize,
    since: Duration,
    now: Duration,
) -> ReloadProgress {
    if ready >= wanted {
        ReloadProgress::Ready
    } else if now.saturating_sub(since) >= RELOAD_SLOW {
        ReloadProgress::Late
    } else {
        ReloadProgress::Waiting
    }
}

#[cfg(test)]
mod tests;
