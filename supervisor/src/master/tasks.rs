//! Supervising the background tasks' processes: one per configured task, forked after the
//! application's setup like a worker, replaced when it dies (with the crash-loop backoff),
//! killed when a run exceeds `run_timeout` or a stop exceeds `stop_timeout`.
//!
//! The reverse of the web rule: on a reload or an upgrade the old process is told to stop and
//! the new one starts at once, but the new one waits for the host lock the old one holds until
//! its run has finished and it has exited (`task::lock`), so the two never run together. The
//! master never talks to a database: leases are the task process's business (`task::lease`).

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::policy::{Respawn, YOUNG_DEATH};
use super::Master;
use crate::clock;
use crate::config::{Config, TaskConfig};
use crate::master::policy::Death;
use crate::scoreboard::{Scoreboard, TaskState, TASK_SLOTS};
use crate::sys::{self, Fork};
use crate::task::process::{self, Spec, EXIT_LEASE_LOST};
use crate::task::Task;
use crate::worker::Application;

/// SIGKILL this long after a stopping task's own `stop_timeout`, in case it cannot exit by
/// itself (it exits at `stop_timeout`; the margin lets it log why).
const STOP_KILL_GRACE: Duration = Duration::from_secs(1);

/// Past a run's deadline before the master looks: the check is `elapsed > timeout`, so waking
/// exactly at the deadline would find nothing to do and spin once more.
const RUN_TIMEOUT_SLACK: Duration = Duration::from_millis(1);

/// One task process.
#[derive(Debug)]
struct TaskProc {
    /// Index into [`Tasks::list`].
    task: usize,
    slot: usize,
    generation: u64,
    started: Duration,
    /// Told to stop: SIGKILL at this time if still running.
    kill_at: Option<Duration>,
    killed: bool,
}

/// A task the application defines, as configured.
struct Supervised<R> {
    task: Task<R>,
    cfg: TaskConfig,
    respawn: Respawn,
}

/// Every task and its processes.
pub(super) struct Tasks<R> {
    list: Vec<Supervised<R>>,
    procs: HashMap<Pid, TaskProc>,
}

/// The configured tasks matched with the application's, or why not.
fn matched<R>(defined: &[Task<R>], cfg: &Config) -> Result<Vec<(Task<R>, TaskConfig)>, String> {
    let mut out = Vec::new();
    for t in &cfg.tasks {
        match defined.iter().find(|d| d.name == t.name) {
            Some(d) => out.push((*d, t.clone())),
            None => {
                let names: Vec<&str> = defined.iter().map(|d| d.name).collect();
                return Err(format!(
                    "[tasks.{}] is configured but the application defines no such task (it defines: {})",
                    t.name,
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                ));
            }
        }
    }
    if out.len() * 2 > TASK_SLOTS {
        return Err(format!(
            "{} tasks are configured; at most {} fit the scoreboard",
            out.len(),
            TASK_SLOTS / 2
        ));
    }
    Ok(out)
}

impl<R> Tasks<R> {
    /// The tasks `cfg` configures, of those the application defines (`defined`).
    pub(super) fn new(defined: Vec<Task<R>>, cfg: &Config) -> io::Result<Tasks<R>> {
        let list = matched(&defined, cfg)
            .map_err(io::Error::other)?
            .into_iter()
            .map(|(task, cfg)| Supervised {
                task,
                cfg,
                respawn: Respawn::new(),
            })
            .collect::<Vec<_>>();
        for d in &defined {
            if !list.iter().any(|s| s.task.name == d.name) {
                tracing::info!(
                    task = d.name,
                    "task defined by the application is not configured; add [tasks.{}] to run it",
                    d.name
                );
            }
        }
        Ok(Tasks {
            list,
            procs: HashMap::new(),
        })
    }

    /// No task process left (a stop may finish).
    pub(super) fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    /// The pids, for signals sent to every child.
    pub(super) fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.procs.keys().copied()
    }

    /// How long until the master must look at the tasks again: a backoff ending, a stop or a
    /// run overrunning.
    pub(super) fn next_due(&self, board: &Scoreboard, now: Duration) -> Option<Duration> {
        let holds = self.list.iter().filter_map(|s| s.respawn.hold_until(now));
        let kills = self.procs.values().filter(|p| !p.killed).filter_map(|p| {
            let run_timeout = self.list.get(p.task).and_then(|s| s.cfg.run_timeout);
            let overrun = run_timeout
                .zip(board.task(p.slot).running_since())
                .map(|(timeout, since)| since + timeout + RUN_TIMEOUT_SLACK);
            p.kill_at.into_iter().chain(overrun).min()
        });
        holds.chain(kills).min().map(|t| t.saturating_sub(now))
    }
}

impl<R: Application> Master<R> {
    /// Checks `cfg`'s tasks against the application's before a reload applies it.
    pub(super) fn check_tasks(&self, cfg: &Config) -> Result<(), String> {
        matched(&self.app.tasks(), cfg).map(|_| ())
    }

    /// The reload applied `self.cfg`: every running task process stops (its run finishes), and
    /// the next maintenance pass starts the new generation's, which wait for them.
    pub(super) fn reload_tasks(&mut self, now: Duration) {
        let defined = self.app.tasks();
        let Ok(list) = matched(&defined, &self.cfg) else {
            return;
        };
        let old: Vec<String> = self.tasks.list.iter().map(|s| s.cfg.name.clone()).collect();
        self.stop_tasks(now);
        let mut next = Vec::new();
        for (task, cfg) in list {
            let respawn = self
                .tasks
                .list
                .iter()
                .find(|s| s.cfg.name == cfg.name)
                .map(|s| s.respawn.clone())
                .unwrap_or_default();
            next.push(Supervised { task, cfg, respawn });
        }
        // Processes of tasks no longer configured keep their index valid until reaped.
        let remap: Vec<Option<usize>> = old
            .iter()
            .map(|name| next.iter().position(|s| &s.cfg.name == name))
            .collect();
        for p in self.tasks.procs.values_mut() {
            p.task = remap.get(p.task).copied().flatten().unwrap_or(usize::MAX);
        }
        self.tasks.list = next;
    }

    /// Asks every task process to stop after its run; kills it after its `stop_timeout`.
    pub(super) fn stop_tasks(&mut self, now: Duration) {
        for (pid, p) in self.tasks.procs.iter_mut() {
            if p.kill_at.is_none() {
                let timeout = self
                    .tasks
                    .list
                    .get(p.task)
                    .map(|s| s.cfg.stop_timeout)
                    .unwrap_or(Duration::ZERO);
                p.kill_at = Some(now + timeout + STOP_KILL_GRACE);
                let _ = kill(*pid, Signal::SIGTERM);
            }
        }
    }

    /// Once a tick: kills what overran, starts what is missing (unless stopping).
    pub(super) fn maintain_tasks(&mut self, now: Duration, stopping: bool) {
        self.enforce_task_timeouts(now);
        if stopping {
            return;
        }
        let current = self.generations.current;
        for index in 0..self.tasks.list.len() {
            let s = &mut self.tasks.list[index];
            if !s.cfg.enabled {
                continue;
            }
            let running = self
                .tasks
                .procs
                .values()
                .find(|p| p.task == index && p.generation == current && p.kill_at.is_none());
            match running {
                Some(p) if now.saturating_sub(p.started) >= YOUNG_DEATH => s.respawn.on_healthy(),
                Some(_) => {}
                None if s.respawn.hold_until(now).is_some() => {}
                None => self.spawn_task(index, now),
            }
        }
    }

    fn enforce_task_timeouts(&mut self, now: Duration) {
        for (pid, p) in self.tasks.procs.iter_mut() {
            if p.killed {
                continue;
            }
            let name = self
                .tasks
                .list
                .get(p.task)
                .map(|s| s.cfg.name.as_str())
                .unwrap_or("?");
            if p.kill_at.is_some_and(|t| now >= t) {
                tracing::warn!(
                    pid = pid.as_raw(),
                    task = name,
                    "task did not stop within its stop_timeout; killing it"
                );
                p.killed = true;
                let _ = kill(*pid, Signal::SIGKILL);
                continue;
            }
            let timeout = self.tasks.list.get(p.task).and_then(|s| s.cfg.run_timeout);
            let since = self.board.task(p.slot).running_since();
            if let (Some(timeout), Some(since)) = (timeout, since) {
                let elapsed = now.saturating_sub(since);
                if elapsed > timeout {
                    tracing::warn!(
                        pid = pid.as_raw(),
                        task = name,
                        elapsed_ms = elapsed.as_millis() as u64,
                        timeout = ?timeout,
                        "task run timeout: killing the task process"
                    );
                    p.killed = true;
                    let _ = kill(*pid, Signal::SIGKILL);
                }
            }
        }
    }

    fn spawn_task(&mut self, index: usize, now: Duration) {
        let Some(slot) = self.board.free_task_slot() else {
            tracing::warn!(slots = TASK_SLOTS, "no free task slot; not starting a task");
            return;
        };
        let generation = self.generations.current;
        let s = &self.tasks.list[index];
        let (task, cfg) = (s.task, s.cfg.clone());
        self.board.task(slot).reset(&cfg.name, generation, now);
        // Taken before the fork: the child compares it with its parent to catch a master that
        // died before the child asked to be told.
        let master = Pid::this();
        match sys::fork() {
            Ok(Fork::Child) => {
                // A task never accepts. Without these fds, a listener a reload removes closes
                // once the workers are gone, not when this task ends. (In this process the
                // drop only closes: the socket files belong to the master.)
                drop(std::mem::take(&mut self.listeners));
                self.generations.close_retired_in_child();
                let spec = Spec {
                    lock_dir: self.cfg.task_lock_dir.clone(),
                    pool: self.cfg.pool_name.clone(),
                    slot,
                    master,
                    cfg,
                };
                process::run(Arc::clone(&self.app), task, spec, Arc::clone(&self.board))
            }
            Ok(Fork::Parent(pid)) => {
                self.board.task(slot).set_pid(pid.as_raw());
                tracing::info!(
                    pid = pid.as_raw(),
                    task = cfg.name,
                    generation,
                    mode = ?cfg.mode,
                    lease = cfg.lease.is_some(),
                    "task started"
                );
                self.tasks.procs.insert(
                    pid,
                    TaskProc {
                        task: index,
                        slot,
                        generation,
                        started: now,
                        kill_at: None,
                        killed: false,
                    },
                );
            }
            Err(e) => {
                self.board.task(slot).free();
                tracing::error!(task = cfg.name, error = %e, "fork of a task process failed");
            }
        }
    }

    /// A child that is not a worker exited: if it is a task process, log it and count a crash.
    /// One of a previous master (an upgrade) only frees its slot.
    pub(super) fn task_reaped(&mut self, pid: Pid, status: WaitStatus, cause: &str) {
        let Some(p) = self.tasks.procs.remove(&pid) else {
            for i in 0..TASK_SLOTS {
                let slot = self.board.task(i);
                if slot.pid() == pid.as_raw() && slot.state() != TaskState::Free {
                    let snap = slot.snapshot();
                    slot.free();
                    tracing::info!(
                        pid = pid.as_raw(),
                        task = snap.name,
                        generation = snap.generation,
                        cause,
                        iterations = snap.iterations,
                        "task exited (started by the previous master, before the upgrade)"
                    );
                }
            }
            return;
        };
        let now = clock::now();
        let snap = self.board.task(p.slot).snapshot();
        self.board.task(p.slot).free();
        let lifetime = now.saturating_sub(p.started);
        let code = match status {
            WaitStatus::Exited(_, code) => Some(code),
            _ => None,
        };
        let expected = p.kill_at.is_some() || code == Some(0) || code == Some(EXIT_LEASE_LOST);
        let (pid, lifetime_ms) = (pid.as_raw(), lifetime.as_millis() as u64);
        let (task, iterations) = (snap.name.as_str(), snap.iterations);
        if expected {
            tracing::info!(
                pid,
                task,
                generation = p.generation,
                cause,
                lifetime_ms,
                iterations,
                "task exited"
            );
            return;
        }
        tracing::warn!(
            pid,
            task,
            generation = p.generation,
            cause,
            lifetime_ms,
            iterations,
            "task died unexpectedly"
        );
        // A task the last reload removed is not restarted, so its crashes count for nothing.
        let Some(s) = self.tasks.list.get_mut(p.task) else {
            return;
        };
        // A task process has no requests to prove it healthy: it counts towards the backoff
        // when it dies younger than YOUNG_DEATH (a panic at start, a failing first run), and
        // is replaced at once when it had run longer.
        let death = Death {
            lifetime,
            ready: true,
            served: false,
        };
        if let Some(delay) = s.respawn.on_crash(death, now) {
            tracing::warn!(
                task,
                delay_ms = delay.as_millis() as u64,
                "task keeps dying young: delaying its restart (crash-loop backoff)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;

    fn nothing(_: &(), _: &crate::TaskContext) -> Result<(), String> {
        Ok(())
    }

    fn cfg(toml_text: &str) -> Config {
        let raw: Cli = toml::from_str(toml_text).expect("toml");
        let flags = Cli {
            listen: vec!["127.0.0.1:9000".into()],
            ..Cli::default()
        };
        Config::merge(&flags, raw).expect("valid")
    }

    #[test]
    fn configured_tasks_must_be_defined_by_the_application() {
        let defined = vec![Task {
            name: "drain",
            run: nothing,
        }];
        let ok = matched(&defined, &cfg("[tasks.drain]\n")).expect("defined");
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1.name, "drain");
        assert!(
            matched(&defined, &cfg("")).expect("none").is_empty(),
            "unconfigured: not run"
        );
        let e = matched(&defined, &cfg("[tasks.report]\n")).expect_err("unknown");
        assert_eq!(
            e,
            "[tasks.report] is configured but the application defines no such task (it defines: drain)"
        );
        let e = matched::<()>(&[], &cfg("[tasks.report]\n")).expect_err("unknown");
        assert!(e.ends_with("(it defines: none)"), "{e}");
    }
}
