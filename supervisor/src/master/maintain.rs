//! The maintenance pass, once a tick: what the workers are doing as the policies see it,
//! request timeouts and slow requests, reload progress, systemd's status line, the pool's
//! size (and TTIN/TTOU changing it), and the figures of the status page.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::policy::{self, Pool, Resize, Respawn, SlowLog, TimeoutAction, WorkerState, WorkerView};
use super::Master;
use crate::config::{PoolConfig, PoolMode};
use crate::scoreboard::{PoolStats, Scoreboard, SlotSnapshot, SlotState};
use crate::worker::Application;

/// The policies and what they count between ticks.
pub(super) struct Policies {
    pub(super) pool: Pool,
    pub(super) respawn: Respawn,
    slow: SlowLog,
    /// Pool-wide figures for the status page, published in the scoreboard each tick.
    pub(super) stats: PoolStats,
    /// Wake on a connection arriving, not just on the tick ([`policy::watch_listeners`]).
    pub(super) watch_listeners: bool,
}

impl Policies {
    /// Following `cfg`, with the figures the scoreboard holds (an upgrade's) or fresh ones.
    pub(super) fn new(cfg: PoolConfig, board: &Scoreboard, now: Duration) -> Policies {
        let pool = Pool::new(cfg);
        // Until the first pass decides: an ondemand pool starts with no worker, so the first
        // connection must wake the master, even within the first tick.
        let watch_listeners = policy::watch_listeners(pool.config(), &[], pool.initial_workers());
        Policies {
            pool,
            respawn: Respawn::new(),
            slow: SlowLog::default(),
            stats: inherited_stats(board, now),
            watch_listeners,
        }
    }
}

impl<R: Application> Master<R> {
    /// TTIN / TTOU: the next ticks start or stop the worker.
    pub(super) fn resize(&mut self, direction: Resize) {
        let pool = &mut self.policies.pool;
        let before = pool.config().workers;
        match policy::resize(pool.config(), direction, self.board.len()) {
            Ok(cfg) => {
                tracing::info!(
                    from = before,
                    to = cfg.workers,
                    "pool size changed by signal"
                );
                pool.set_config(cfg);
            }
            Err(full) => tracing::warn!(
                workers = full.workers,
                slots = full.slots,
                "cannot grow: the scoreboard was sized at startup"
            ),
        }
    }

    /// Publishes the pool-wide figures the status page shows.
    pub(super) fn publish_stats(&mut self, all: &[(WorkerView, SlotSnapshot)], waiting: usize) {
        let held: u64 = all.iter().map(|(_, s)| s.held).sum();
        let kernel = (waiting as u64).saturating_sub(held);
        let active = all.iter().filter(|(_, s)| s.in_flight > 0).count() as u64;
        let s = &mut self.policies.stats;
        s.mode = match self.cfg.pool.mode {
            PoolMode::Static => 0,
            PoolMode::Dynamic => 1,
            PoolMode::OnDemand => 2,
        };
        s.max_workers = self.policies.pool.config().workers as u64;
        s.generation = self.generations.current;
        s.backlog = self.cfg.backlog as u64;
        s.listen_queue = kernel;
        s.max_listen_queue = s.max_listen_queue.max(kernel + held);
        s.max_active = s.max_active.max(active);
        self.board.set_stats(s);
    }
    /// Every worker as the policies see it: the current generation's that do not drain, and
    /// all of them with their slots.
    fn views(&self) -> (Vec<WorkerView>, Vec<(WorkerView, SlotSnapshot)>) {
        let mut current = Vec::new();
        let mut all = Vec::new();
        for (pid, w) in &self.workers {
            let snap = self.board.slot(w.slot).snapshot();
            let state = match snap.state {
                _ if w.stopping => WorkerState::Draining,
                SlotState::Starting | SlotState::Free => WorkerState::Starting,
                SlotState::Idle => WorkerState::Idle,
                SlotState::Busy => WorkerState::Busy,
                SlotState::Draining => WorkerState::Draining,
            };
            let view = WorkerView {
                pid: pid.as_raw(),
                state,
                started: w.started,
                since: snap.since,
                requests: snap.requests,
                timeout_term_at: w.timeout_term_at,
            };
            if view.state != WorkerState::Draining && w.generation == self.generations.current {
                current.push(view.clone());
            }
            all.push((view, snap));
        }
        (current, all)
    }

    /// One maintenance pass: timeouts, slow requests, reload progress, pool size.
    pub(super) fn maintain(&mut self, now: Duration) {
        let (current, all) = self.views();
        if policy::any_healthy(&current, now) {
            self.policies.respawn.on_healthy();
        }
        self.check_requests(&all, now);
        self.finish_reload(&current, now);
        self.report_status(&current);
        self.size_pool(&current, &all, now);
    }

    /// Requests past the timeout end their worker; those past the slow threshold are logged.
    fn check_requests(&mut self, all: &[(WorkerView, SlotSnapshot)], now: Duration) {
        let views: Vec<WorkerView> = all.iter().map(|(v, _)| v.clone()).collect();
        if let Some(timeout) = self.cfg.request_timeout {
            let grace = self.cfg.request_timeout_grace;
            let age = policy::ending_age(timeout, self.app.answers_its_timeouts());
            for action in policy::request_timeouts(&views, age, grace, now) {
                self.timeout(action, all, now);
            }
        }
        if let Some(threshold) = self.cfg.slow_request_timeout {
            for (pid, elapsed) in self.policies.slow.check(&views, threshold, now) {
                self.policies.stats.slow_requests += 1;
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
    }

    /// systemd's one-line status.
    fn report_status(&mut self, current: &[WorkerView]) {
        let count = |state| current.iter().filter(|v| v.state == state).count();
        let (idle, busy) = (count(WorkerState::Idle), count(WorkerState::Busy));
        self.systemd.notifier.status(format!(
            "pool {}: {} workers ({idle} idle, {busy} busy), generation {}",
            self.cfg.pool_name,
            self.workers.len(),
            self.generations.current
        ));
    }

    /// Asks the pool policy what to start and stop, and does it.
    fn size_pool(
        &mut self,
        current: &[WorkerView],
        all: &[(WorkerView, SlotSnapshot)],
        now: Duration,
    ) {
        // Waiting for a worker: in the kernel's queues, or held by a saturated worker.
        let held: u64 = all.iter().map(|(_, snap)| snap.held).sum();
        let waiting = self.waiting() + held as usize + self.forwarding.requests_waiting();
        let plan = self.policies.pool.tick(current, waiting, now);
        self.publish_stats(all, waiting);
        if let Some(max) = plan.max_reached {
            self.policies.stats.max_children_reached += 1;
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
        self.policies.watch_listeners =
            policy::watch_listeners(self.policies.pool.config(), current, plan.spawn);
        if plan.spawn == 0 {
            return;
        }
        if let Some(until) = self.policies.respawn.hold_until(now) {
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
}

/// The pool-wide figures to start from: an upgrade keeps its predecessor's (they live in the
/// inherited scoreboard); a fresh start begins them now.
fn inherited_stats(board: &Scoreboard, now: Duration) -> PoolStats {
    let mut stats = board.stats();
    if stats.start_time == 0 {
        stats.start_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        stats.started = now;
    }
    stats
}
