//! Background tasks: loops the application defines next to its [`Responder`](crate::Responder),
//! each run in its own process forked from the master (so it shares the preloaded data), never
//! two at once on a host (a lock file per task), and, with a lease configured, on one host at a
//! time across hosts (a PostgreSQL session advisory lock, with a fencing token per term).
//!
//! - here: what the application sees, [`Task`] and [`TaskContext`].
//! - `process`: the task process's life (signals, the host lock, the run loop).
//! - `lock`: the host lock. `schedule`: when the next run starts (pure).
//! - `lease` (feature `postgres`): the leader lease and the schedule on the database's clock.
//!
//! The master only forks and supervises (`master/tasks.rs`); everything that talks to a
//! database lives here, in the task process, so the master stays free of it.

#[cfg(feature = "postgres")]
mod lease;
mod lock;
pub(crate) mod process;
mod schedule;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(crate) use process::Stop;

/// A background task: a name (the config's `[tasks.NAME]`) and the function one run calls.
/// The function gets the application (what setup loaded, shared copy-on-write) and the run's
/// context; an `Err` is logged and shown on the status page, and the loop goes on; a panic
/// ends the task process, which the master replaces with the crash-loop backoff.
pub struct Task<R: ?Sized> {
    /// The task's name: letters, digits, `_` and `-`.
    pub name: &'static str,
    /// One run.
    pub run: fn(&R, &TaskContext) -> Result<(), String>,
}

impl<R: ?Sized> Clone for Task<R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R: ?Sized> Copy for Task<R> {}

impl<R: ?Sized> std::fmt::Debug for Task<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task").field("name", &self.name).finish()
    }
}

/// The variable a test sets to shift what [`TaskContext::host_time`] says, in seconds (may be
/// negative): a host whose clock is wrong, without changing the machine's clock. Nothing the
/// supervisor schedules reads it; it exists to show that.
pub const CLOCK_OFFSET_ENV: &str = "SUPERVISOR_TASK_CLOCK_OFFSET_SECS";

/// What one run of a task knows.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub(crate) name: String,
    pub(crate) epoch: Option<i64>,
    pub(crate) iteration: u64,
    pub(crate) database_url: Option<String>,
    pub(crate) stop: Arc<Stop>,
    pub(crate) clock_offset_secs: i64,
}

impl TaskContext {
    /// The task's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fencing token of this leadership term, with a lease configured: it grows with every
    /// new leader, so a write that carries it (`... WHERE epoch = $1` against
    /// `supervisor_lease`) fails once another host has taken over. `None` without a lease.
    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// Runs this process has started, this one included (1 for the first).
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The lease's connection string, for the task's own connection to the same database.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// True once the task was told to stop (reload, upgrade, shutdown): a long run may end
    /// early; it is killed after `stop_timeout` otherwise.
    pub fn stopping(&self) -> bool {
        self.stop.requested()
    }

    /// Sleeps up to `d`, less if told to stop; true when told to stop.
    pub fn sleep(&self, d: Duration) -> bool {
        self.stop.sleep(d)
    }

    /// This host's wall clock (shifted by [`CLOCK_OFFSET_ENV`] if set). Schedules never use
    /// it: with a lease they run on the database's clock, without one on the monotonic clock.
    pub fn host_time(&self) -> SystemTime {
        let offset = Duration::from_secs(self.clock_offset_secs.unsigned_abs());
        if self.clock_offset_secs >= 0 {
            SystemTime::now() + offset
        } else {
            SystemTime::now() - offset
        }
    }
}
