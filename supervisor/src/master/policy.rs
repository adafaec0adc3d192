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
    /// with `waiting` connections queued in the kernel.
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
                // Requests already waiting are demand, not a guess: serve them in one tick.
                if waiting > 0 && spare == 0 {
                    plan.spawn = plan
                        .spawn
                        .max(waiting.min(self.cfg.max_spawn_rate).min(room));
                }
                if idle > self.cfg.max_spare {
                    plan.stop = longest_idle(workers, idle - self.cfg.max_spare);
                }
            }
            PoolMode::OnDemand => {
                if waiting > 0 && idle + starting == 0 {
                    plan.spawn = waiting.min(self.cfg.max_spawn_rate).min(room);
                }
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

        let at_max = total >= max && idle == 0 && waiting > 0;
        if at_max && !self.max_reported {
            plan.max_reached = Some(MaxReached {
                workers: total,
                waiting,
            });
        }
        self.max_reported = at_max;
        plan
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

/// A worker that dies younger than this counts towards a crash loop: it cannot have served
/// for long, so replacing it at full speed would only spin.
pub const YOUNG_DEATH: Duration = Duration::from_secs(1);
/// The first delay of a crash loop, doubled on each further young death.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest delay between respawns, like systemd's and Kubernetes' caps: long enough to stop
/// the spinning, short enough that a fixed dependency is picked up soon.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Respawn with crash-loop backoff: a worker that dies is replaced at once, but when workers
/// keep dying young the replacements wait, twice as long each time, up to [`BACKOFF_MAX`].
#[derive(Debug, Clone, Default)]
pub struct Respawn {
    young_deaths: u32,
    delay: Duration,
    hold_until: Option<Duration>,
}

impl Respawn {
    /// No crash loop yet.
    pub fn new() -> Respawn {
        Respawn::default()
    }

    /// Records an unexpected exit after `lifetime`. Returns the delay when this exit starts or
    /// lengthens a backoff (to be logged), `None` otherwise.
    pub fn on_crash(&mut self, lifetime: Duration, now: Duration) -> Option<Duration> {
        if lifetime >= YOUNG_DEATH {
            // One old worker dying is an accident, not a loop: replace it at once.
            return None;
        }
        self.young_deaths += 1;
        if self.young_deaths < 2 {
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

    /// A worker is up and has lived past [`YOUNG_DEATH`]: the loop, if any, is over.
    pub fn on_healthy(&mut self) {
        self.young_deaths = 0;
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

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1000);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn w(pid: i32, state: WorkerState, since: Duration) -> WorkerView {
        WorkerView {
            pid,
            state,
            started: Duration::ZERO,
            since,
            requests: 0,
            timeout_term_at: None,
        }
    }

    fn idle(n: i32) -> Vec<WorkerView> {
        (1..=n).map(|p| w(p, WorkerState::Idle, T)).collect()
    }

    fn cfg(mode: PoolMode) -> PoolConfig {
        PoolConfig {
            mode,
            workers: 10,
            start_workers: 3,
            min_spare: 2,
            max_spare: 4,
            max_spawn_rate: 8,
            idle_timeout: secs(10),
        }
    }

    #[test]
    fn static_keeps_exactly_its_size() {
        let mut pool = Pool::new(cfg(PoolMode::Static));
        assert_eq!(pool.initial_workers(), 10);
        assert_eq!(pool.tick(&idle(10), 0, T), PoolPlan::default());
        assert_eq!(pool.tick(&idle(7), 0, T).spawn, 3, "the dead are replaced");
        let mut shrunk = cfg(PoolMode::Static);
        shrunk.workers = 8;
        pool.set_config(shrunk);
        let mut ws = idle(10);
        ws[0].state = WorkerState::Busy;
        assert_eq!(pool.tick(&ws, 0, T).stop.len(), 2);
    }

    #[test]
    fn dynamic_spawn_rate_doubles_and_resets() {
        let mut c = cfg(PoolMode::Dynamic);
        c.min_spare = 8;
        c.workers = 40;
        c.max_spawn_rate = 4;
        let mut pool = Pool::new(c);
        assert_eq!(pool.initial_workers(), 3);
        let busy: Vec<_> = (1..=3).map(|p| w(p, WorkerState::Busy, T)).collect();
        let rates: Vec<usize> = (0..4).map(|_| pool.tick(&busy, 0, T).spawn).collect();
        assert_eq!(rates, [1, 2, 4, 4]);
        assert_eq!(pool.tick(&idle(8), 0, T).spawn, 0);
        assert_eq!(
            pool.tick(&busy, 0, T).spawn,
            1,
            "rate reset once nothing was needed"
        );
    }

    #[test]
    fn dynamic_stops_excess_idle_longest_idle_first_never_busy() {
        let mut pool = Pool::new(cfg(PoolMode::Dynamic));
        let mut ws: Vec<_> = (1..=7)
            .map(|p| w(p, WorkerState::Idle, T + secs(p as u64)))
            .collect();
        ws.push(w(8, WorkerState::Busy, T));
        ws.push(w(9, WorkerState::Starting, T));
        let plan = pool.tick(&ws, 0, T + secs(100));
        assert_eq!(
            plan.stop,
            vec![1, 2, 3],
            "7 idle, max_spare 4: the 3 idle longest go"
        );
    }

    #[test]
    fn dynamic_serves_a_burst_within_a_few_ticks_and_never_exceeds_the_maximum() {
        let mut pool = Pool::new(cfg(PoolMode::Dynamic));
        let mut ws: Vec<_> = (1..=3).map(|p| w(p, WorkerState::Busy, T)).collect();
        let mut ticks = 0;
        while ws.len() < 10 {
            let plan = pool.tick(&ws, 20, T);
            assert!(plan.spawn > 0);
            // New workers are busy at once with the waiting requests.
            for _ in 0..plan.spawn {
                ws.push(w(ws.len() as i32 + 1, WorkerState::Busy, T));
            }
            assert!(ws.len() <= 10);
            ticks += 1;
        }
        assert!(ticks <= 2, "grew to the maximum in {ticks} ticks");
        let plan = pool.tick(&ws, 20, T);
        assert_eq!(plan.spawn, 0);
        assert_eq!(
            plan.max_reached,
            Some(MaxReached {
                workers: 10,
                waiting: 20
            })
        );
        assert_eq!(pool.tick(&ws, 20, T).max_reached, None, "once per episode");
        pool.tick(&ws, 0, T);
        assert!(
            pool.tick(&ws, 5, T).max_reached.is_some(),
            "a new episode is reported again"
        );
    }

    #[test]
    fn ondemand_starts_empty_spawns_on_waiting_and_reaps_idle() {
        let mut pool = Pool::new(cfg(PoolMode::OnDemand));
        assert_eq!(pool.initial_workers(), 0);
        assert_eq!(pool.tick(&[], 0, T).spawn, 0);
        assert_eq!(pool.tick(&[], 1, T).spawn, 1);
        let starting = vec![w(1, WorkerState::Starting, T)];
        assert_eq!(
            pool.tick(&starting, 1, T).spawn,
            0,
            "a starting worker will take it"
        );
        let ws = vec![w(1, WorkerState::Idle, T)];
        assert!(pool.tick(&ws, 0, T + secs(9)).stop.is_empty());
        assert_eq!(pool.tick(&ws, 0, T + secs(10)).stop, vec![1]);
    }

    #[test]
    fn one_old_death_respawns_at_once() {
        let mut r = Respawn::new();
        assert_eq!(r.on_crash(secs(60), T), None);
        assert_eq!(r.hold_until(T), None);
    }

    #[test]
    fn crash_loop_backs_off_exponentially_up_to_the_cap() {
        let mut r = Respawn::new();
        assert_eq!(
            r.on_crash(Duration::from_millis(5), T),
            None,
            "the first young death is free"
        );
        let mut delays = Vec::new();
        for _ in 0..12 {
            delays.push(r.on_crash(Duration::from_millis(5), T).expect("backoff"));
        }
        assert_eq!(
            &delays[..4],
            &[100, 200, 400, 800].map(Duration::from_millis)
        );
        assert_eq!(*delays.last().expect("12 delays"), BACKOFF_MAX);
        assert_eq!(r.hold_until(T), Some(T + BACKOFF_MAX));
        r.on_healthy();
        assert_eq!(r.hold_until(T), None);
        assert_eq!(r.on_crash(Duration::from_millis(5), T), None);
    }

    #[test]
    fn crash_loop_spawns_stay_few() {
        // Workers that die 1 ms after spawning, for 5 simulated seconds.
        let mut r = Respawn::new();
        let mut now = T;
        let end = T + secs(5);
        let mut spawns = 0;
        while now < end {
            if let Some(t) = r.hold_until(now) {
                now = t;
                continue;
            }
            spawns += 1;
            now += Duration::from_millis(1);
            r.on_crash(Duration::from_millis(1), now);
        }
        assert!(spawns < 20, "{spawns} spawns");
    }

    #[test]
    fn timeouts_term_once_then_kill_after_grace() {
        let mut ws = vec![w(1, WorkerState::Busy, T), w(2, WorkerState::Idle, T)];
        let grace = secs(2);
        assert!(request_timeouts(&ws, secs(30), grace, T + secs(30)).is_empty());
        assert_eq!(
            request_timeouts(&ws, secs(30), grace, T + secs(31)),
            vec![TimeoutAction::Term {
                pid: 1,
                elapsed: secs(31)
            }]
        );
        ws[0].timeout_term_at = Some(T + secs(31));
        assert!(request_timeouts(&ws, secs(30), grace, T + secs(32)).is_empty());
        assert_eq!(
            request_timeouts(&ws, secs(30), grace, T + secs(33)),
            vec![TimeoutAction::Kill {
                pid: 1,
                elapsed: secs(33)
            }]
        );
    }

    #[test]
    fn slow_requests_are_reported_once_each() {
        let mut log = SlowLog::default();
        let ws = vec![w(1, WorkerState::Busy, T)];
        assert!(log.check(&ws, secs(5), T + secs(5)).is_empty());
        assert_eq!(log.check(&ws, secs(5), T + secs(6)), vec![(1, secs(6))]);
        assert!(log.check(&ws, secs(5), T + secs(7)).is_empty());
        let next = vec![w(1, WorkerState::Busy, T + secs(10))];
        assert_eq!(log.check(&next, secs(5), T + secs(16)), vec![(1, secs(6))]);
    }
}
