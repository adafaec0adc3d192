//! Generations of workers: HUP re-reads the configuration and starts a new generation beside
//! the running one, which drains only once the new one is ready; listeners the new
//! configuration dropped close once no worker uses them. An upgrade's successor starts the
//! same way, beside the workers it adopted.

use std::time::Duration;

use nix::sys::signal::{kill, Signal};

use super::policy::{self, Pool, ReloadProgress, WorkerView};
use super::Master;
use crate::clock;
use crate::config::Config;
use crate::listener::Listener;
use crate::worker::Application;

/// Which generation is current, and how far its start has got.
pub(super) struct Generations {
    /// The generation new workers belong to; older ones drain once it is ready.
    pub(super) current: u64,
    /// A reload is waiting for the current generation to be ready before older ones drain.
    since: Option<Duration>,
    /// Whether the slow reload was already reported.
    warned: bool,
    /// READY=1 was sent for the current generation.
    ready_sent: bool,
    /// Listeners removed from the configuration, closed once the workers using them are gone.
    retired: Vec<Listener>,
}

impl Generations {
    /// The generation after `inherited` (0 on a fresh start). With `adopted` workers (an
    /// upgrade) the new generation starts as a reload does.
    pub(super) fn new(inherited: u64, adopted: bool, now: Duration) -> Generations {
        Generations {
            current: inherited + 1,
            since: adopted.then_some(now),
            warned: false,
            ready_sent: false,
            retired: Vec::new(),
        }
    }

    /// In a forked child that never accepts (a task process): lets go of the retired
    /// listeners' fds, so they close when the master closes them.
    pub(super) fn close_retired_in_child(&mut self) {
        self.retired.clear();
    }

    /// Whether a reload (or an upgrade's start) waits for the current generation.
    pub(super) fn reloading(&self) -> bool {
        self.since.is_some()
    }
}

impl<R: Application> Master<R> {
    /// HUP: re-reads the configuration; if it is valid, starts a new generation of workers,
    /// and drains the older ones once it is ready. An invalid configuration changes nothing.
    pub(super) fn reload(&mut self) {
        let cfg = match Config::load(&self.cli) {
            Ok(cfg) => cfg,
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the configuration is invalid; still running the previous one");
                return;
            }
        };
        if let Err(e) = self.check_tasks(&cfg) {
            tracing::error!(error = %e, "reload refused: still running the previous configuration");
            return;
        }
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
        let g = &mut self.generations;
        g.retired.extend(retire);
        g.current += 1;
        g.since = Some(clock::now());
        g.warned = false;
        g.ready_sent = false;
        self.policies.pool = Pool::new(cfg.pool.clone());
        self.cfg = cfg;
        self.reload_tasks(clock::now());
        self.systemd.notifier.reloading(clock::now());
        tracing::info!(
            generation = self.generations.current,
            workers = self.cfg.pool.workers,
            "reload: starting a new generation; the old one serves until it is ready"
        );
    }

    /// A pool that starts no worker (`ondemand`) is ready at once, unless it waits for a
    /// generation it adopted.
    pub(super) fn ready_if_nothing_to_start(&mut self) {
        let g = &mut self.generations;
        if self.policies.pool.initial_workers() == 0 && g.since.is_none() {
            g.ready_sent = true;
            self.systemd.notifier.ready();
        }
    }

    /// Once the current generation is ready, older workers drain; once they are gone, retired
    /// listeners close.
    pub(super) fn finish_reload(&mut self, current: &[WorkerView], now: Duration) {
        let ready = policy::ready_workers(current);
        let wanted = self.policies.pool.initial_workers();
        let g = &mut self.generations;
        match g.since {
            None if !g.ready_sent && ready > 0 => {
                g.ready_sent = true;
                self.systemd.notifier.ready();
            }
            None => {}
            Some(since) => match policy::reload_progress(ready, wanted, since, now) {
                ReloadProgress::Ready => self.drain_older(ready, since, now),
                ReloadProgress::Late if !g.warned => {
                    g.warned = true;
                    tracing::error!(
                        generation = g.current,
                        ready,
                        wanted,
                        "reload: the new generation is not ready; the old generation keeps serving"
                    );
                }
                ReloadProgress::Late | ReloadProgress::Waiting => {}
            },
        }
        self.close_retired();
    }

    /// The current generation is ready: every older worker drains.
    fn drain_older(&mut self, ready: usize, since: Duration, now: Duration) {
        let current = self.generations.current;
        let mut drained = 0;
        for (pid, w) in self.workers.iter_mut() {
            if w.generation < current && !w.stopping {
                w.stopping = true;
                let _ = kill(*pid, Signal::SIGTERM);
                drained += 1;
            }
        }
        tracing::info!(
            generation = current,
            ready,
            draining = drained,
            elapsed_ms = now.saturating_sub(since).as_millis() as u64,
            "reload: new generation ready; draining the old one"
        );
        let g = &mut self.generations;
        g.since = None;
        g.ready_sent = true;
        self.systemd.notifier.ready();
    }

    fn close_retired(&mut self) {
        let g = &mut self.generations;
        if !g.retired.is_empty() && self.workers.values().all(|w| w.generation == g.current) {
            for l in g.retired.drain(..) {
                tracing::info!(listen = %l.addr(), "listener removed by reload is closed");
            }
        }
    }
}
