//! The background tasks' slots: a fixed range after the workers' slots, one per task process
//! (the master claims one at the fork, the task process writes it, the status page reads it).
//! Apart from the workers' slots so that nothing counting workers (saturation, the pool's
//! figures) ever sees a task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{micros, Scoreboard, TextPair, HEADER_WORDS, SLOT_WORDS};

/// Task slots in the table: two per task (the process finishing its iteration and the one of
/// the next generation waiting for it, during a reload or upgrade) for up to 16 tasks, which is
/// more than one pool should run beside its web workers.
pub const TASK_SLOTS: usize = 32;

// Word offsets within a task slot.
const PID: usize = 0;
const GENERATION: usize = 1;
const STATE: usize = 2;
const STARTED: usize = 3;
const RUN_START: usize = 4;
const RUN_START_UNIX_MS: usize = 5;
const LAST_DURATION: usize = 6;
const ITERATIONS: usize = 7;
const ERRORS: usize = 8;
const EPOCH: usize = 9;
const ROLE: usize = 10;
const TEXT_LENS: usize = 11;
const SEQ: usize = 12;
const NAME: usize = 13;
/// Bytes of a task's name kept: names are identifiers in the config (`[tasks.NAME]`).
pub const NAME_BYTES: usize = 32;
const ERROR: usize = NAME + NAME_BYTES / 8;
/// Bytes of the last error kept, enough for a database error's first line.
pub const ERROR_BYTES: usize = 256;
const TASK_SLOT_WORDS: usize = ERROR + ERROR_BYTES / 8;

/// The task's name and last error in its slot.
const TASK_TEXT: TextPair = TextPair {
    seq: SEQ,
    lens: TEXT_LENS,
    first: (NAME, ERROR),
    second: (ERROR, TASK_SLOT_WORDS),
    max: (NAME_BYTES, ERROR_BYTES),
};
/// The task range's words.
pub(super) const TASK_WORDS: usize = TASK_SLOTS * TASK_SLOT_WORDS;

/// What a task process is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// No process.
    Free,
    /// Forked, waiting for the host lock (another process of this task still runs here).
    Waiting,
    /// Holds the host lock, waiting for the leader lease another host holds.
    Standby,
    /// Between two runs.
    Idle,
    /// Running an iteration.
    Running,
    /// Told to stop: finishing its iteration.
    Stopping,
}

impl TaskState {
    fn code(self) -> u64 {
        match self {
            TaskState::Free => 0,
            TaskState::Waiting => 1,
            TaskState::Standby => 2,
            TaskState::Idle => 3,
            TaskState::Running => 4,
            TaskState::Stopping => 5,
        }
    }

    fn from_code(code: u64) -> TaskState {
        match code {
            1 => TaskState::Waiting,
            2 => TaskState::Standby,
            3 => TaskState::Idle,
            4 => TaskState::Running,
            5 => TaskState::Stopping,
            _ => TaskState::Free,
        }
    }

    /// The word the status page shows.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Free => "free",
            TaskState::Waiting => "waiting for host lock",
            TaskState::Standby => "standby",
            TaskState::Idle => "idle",
            TaskState::Running => "running",
            TaskState::Stopping => "stopping",
        }
    }
}

/// Whether the task runs here, as far as the lease goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskRole {
    /// No lease configured: single per host, always runs.
    Local,
    /// Another host holds the lease.
    Standby,
    /// This process holds the lease.
    Leader,
}

impl TaskRole {
    /// The word the status page shows.
    pub fn name(self) -> &'static str {
        match self {
            TaskRole::Local => "local",
            TaskRole::Standby => "standby",
            TaskRole::Leader => "leader",
        }
    }
}

/// A copy of one task slot.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSnapshot {
    /// The slot's index in the task range.
    pub index: usize,
    /// The task's name.
    pub name: String,
    /// The task process.
    pub pid: i32,
    /// The generation it belongs to.
    pub generation: u64,
    /// What it is doing.
    pub state: TaskState,
    /// Leader, standby, or local.
    pub role: TaskRole,
    /// When the process was forked (shared monotonic clock).
    pub started: Duration,
    /// When the current or last run started (shared monotonic clock; zero before the first).
    pub run_start: Duration,
    /// The same moment as Unix time in milliseconds, for people.
    pub run_start_unix_ms: u64,
    /// How long the last finished run took.
    pub last_duration: Duration,
    /// Runs finished by this process.
    pub iterations: u64,
    /// Runs that returned an error.
    pub errors: u64,
    /// The fencing token of the lease held (0: none).
    pub epoch: u64,
    /// The last run's error, empty when it succeeded.
    pub last_error: String,
}

impl Scoreboard {
    /// Task slot `index`. Panics past [`TASK_SLOTS`]: a bug in the master.
    pub fn task(&self, index: usize) -> TaskSlot<'_> {
        assert!(index < TASK_SLOTS, "task slot {index} of {TASK_SLOTS}");
        let start = HEADER_WORDS + self.slots * SLOT_WORDS + index * TASK_SLOT_WORDS;
        TaskSlot {
            index,
            w: &self.mem.words()[start..start + TASK_SLOT_WORDS],
        }
    }

    /// The first free task slot (master only).
    pub fn free_task_slot(&self) -> Option<usize> {
        (0..TASK_SLOTS).find(|&i| self.task(i).state() == TaskState::Free)
    }

    /// Every task slot in use.
    pub fn task_snapshot(&self) -> Vec<TaskSnapshot> {
        (0..TASK_SLOTS)
            .map(|i| self.task(i))
            .filter(|t| t.state() != TaskState::Free)
            .map(|t| t.snapshot())
            .collect()
    }
}

/// One task process's slot.
#[derive(Clone, Copy)]
pub struct TaskSlot<'a> {
    index: usize,
    w: &'a [AtomicU64],
}

impl TaskSlot<'_> {
    fn get(&self, field: usize) -> u64 {
        self.w[field].load(Ordering::Acquire)
    }

    fn set(&self, field: usize, value: u64) {
        self.w[field].store(value, Ordering::Release);
    }

    /// Master, before the fork: a new process of task `name`, waiting for the host lock.
    pub fn reset(&self, name: &str, generation: u64, now: Duration) {
        for field in [
            PID,
            RUN_START,
            RUN_START_UNIX_MS,
            LAST_DURATION,
            ITERATIONS,
            ERRORS,
            EPOCH,
            ROLE,
        ] {
            self.set(field, 0);
        }
        self.write_text(name, "");
        self.set(GENERATION, generation);
        self.set(STARTED, micros(now));
        self.set(STATE, TaskState::Waiting.code());
    }

    /// Records the process's pid.
    pub fn set_pid(&self, pid: i32) {
        self.set(PID, pid as u32 as u64);
    }

    /// The process's pid.
    pub fn pid(&self) -> i32 {
        self.get(PID) as u32 as i32
    }

    /// Master, after reaping: free again.
    pub fn free(&self) {
        self.set(STATE, TaskState::Free.code());
        self.set(PID, 0);
    }

    /// The process's state.
    pub fn state(&self) -> TaskState {
        TaskState::from_code(self.get(STATE))
    }

    /// Task process: what it does now.
    pub fn set_state(&self, state: TaskState) {
        self.set(STATE, state.code());
    }

    /// Task process: its role and the lease's fencing token (0 without one).
    pub fn set_role(&self, role: TaskRole, epoch: u64) {
        let code = match role {
            TaskRole::Local => 0,
            TaskRole::Standby => 1,
            TaskRole::Leader => 2,
        };
        self.set(EPOCH, epoch);
        self.set(ROLE, code);
    }

    /// Task process: a run starts.
    pub fn begin_run(&self, now: Duration, unix_ms: u64) {
        self.set(RUN_START, micros(now));
        self.set(RUN_START_UNIX_MS, unix_ms);
        self.set(STATE, TaskState::Running.code());
    }

    /// Task process: the run ended, with its error if it failed.
    pub fn end_run(&self, now: Duration, error: Option<&str>) {
        let start = Duration::from_micros(self.get(RUN_START));
        self.set(LAST_DURATION, micros(now.saturating_sub(start)));
        self.w[ITERATIONS].fetch_add(1, Ordering::AcqRel);
        if error.is_some() {
            self.w[ERRORS].fetch_add(1, Ordering::AcqRel);
        }
        let (name, _) = self.read_text();
        self.write_text(&name, error.unwrap_or(""));
        if self.state() == TaskState::Running {
            self.set(STATE, TaskState::Idle.code());
        }
    }

    /// When the current run started, if one runs (master: `run_timeout`).
    pub fn running_since(&self) -> Option<Duration> {
        (self.state() == TaskState::Running).then(|| Duration::from_micros(self.get(RUN_START)))
    }

    fn write_text(&self, name: &str, error: &str) {
        TASK_TEXT.write(self.w, name, error);
    }

    fn read_text(&self) -> (String, String) {
        TASK_TEXT.read(self.w)
    }

    /// A copy of the slot.
    pub fn snapshot(&self) -> TaskSnapshot {
        let (name, last_error) = self.read_text();
        TaskSnapshot {
            index: self.index,
            name,
            pid: self.pid(),
            generation: self.get(GENERATION),
            state: self.state(),
            role: match self.get(ROLE) {
                1 => TaskRole::Standby,
                2 => TaskRole::Leader,
                _ => TaskRole::Local,
            },
            started: Duration::from_micros(self.get(STARTED)),
            run_start: Duration::from_micros(self.get(RUN_START)),
            run_start_unix_ms: self.get(RUN_START_UNIX_MS),
            last_duration: Duration::from_micros(self.get(LAST_DURATION)),
            iterations: self.get(ITERATIONS),
            errors: self.get(ERRORS),
            epoch: self.get(EPOCH),
            last_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(100);

    #[test]
    fn a_task_slot_records_runs_and_errors_apart_from_the_workers() {
        let board = Scoreboard::new(2).expect("map");
        assert_eq!(board.free_task_slot(), Some(0));
        let t = board.task(0);
        t.reset("drain", 3, T0);
        t.set_pid(42);
        assert_eq!(board.free_task_slot(), Some(1));
        assert!(
            board.snapshot().is_empty(),
            "no worker slot is used by a task"
        );
        t.set_role(TaskRole::Leader, 7);
        t.begin_run(T0 + Duration::from_secs(1), 1_000);
        assert_eq!(t.running_since(), Some(T0 + Duration::from_secs(1)));
        t.end_run(T0 + Duration::from_millis(1500), Some("database went away"));
        let s = t.snapshot();
        assert_eq!(s.name, "drain");
        assert_eq!((s.pid, s.generation, s.epoch), (42, 3, 7));
        assert_eq!((s.iterations, s.errors), (1, 1));
        assert_eq!(s.state, TaskState::Idle);
        assert_eq!(s.role, TaskRole::Leader);
        assert_eq!(s.last_duration, Duration::from_millis(500));
        assert_eq!(s.last_error, "database went away");
        t.begin_run(T0 + Duration::from_secs(2), 2_000);
        t.end_run(T0 + Duration::from_secs(3), None);
        let s = t.snapshot();
        assert_eq!((s.iterations, s.errors, s.last_error.as_str()), (2, 1, ""));
        assert_eq!(s.name, "drain", "the name survives the error being cleared");
        t.free();
        assert!(board.task_snapshot().is_empty());
    }

    #[test]
    fn the_last_task_slot_does_not_overlap_the_last_worker_slot() {
        let board = Scoreboard::new(1).expect("map");
        board.slot(0).reset(1, T0);
        board.slot(0).set_pid(7);
        let last = board.task(TASK_SLOTS - 1);
        last.reset("x", 1, T0);
        last.set_pid(9);
        assert_eq!(board.slot(0).snapshot().pid, 7);
        assert_eq!(last.pid(), 9);
    }
}
