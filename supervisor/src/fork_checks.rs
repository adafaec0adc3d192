//! Not API: the checks that fork, run by `supervisor/tests/fork.rs`. They cannot be unit
//! tests: libtest runs every test on a thread of its own (even with `--test-threads=1`), and
//! forking a multi-threaded process is unsound, since the child inherits locks that other
//! threads held (the allocator's, stdout's) with nobody left to release them. The harness-less
//! test binary calls these one after another from `main`, its only thread, and every fork here
//! first checks that the process has exactly one thread.

use std::sync::atomic::Ordering;
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitStatus};

use crate::scoreboard::{Scoreboard, SlotState};
use crate::sys::{fork, Fork, SharedWords};

/// A check: `Err` says what went wrong.
pub type Check = fn() -> Result<(), String>;

/// Every check, with its name, in the order they must run (the last one starts a thread).
pub const CHECKS: &[(&str, Check)] = &[
    (
        "a_forked_child_writes_what_the_parent_reads",
        a_forked_child_writes_what_the_parent_reads,
    ),
    (
        "a_forked_worker_is_seen_by_the_master",
        a_forked_worker_is_seen_by_the_master,
    ),
    (
        "fork_is_refused_while_another_thread_runs",
        fork_is_refused_while_another_thread_runs,
    ),
];

/// A time for the slots, like the master's clock after 100 s.
const T0: Duration = Duration::from_secs(100);

fn a_forked_child_writes_what_the_parent_reads() -> Result<(), String> {
    let shared = SharedWords::new(4).map_err(|e| format!("cannot map 4 words: {e}"))?;
    in_child(|| shared.words()[2].store(42, Ordering::Release))?;
    match shared.words()[2].load(Ordering::Acquire) {
        42 => Ok(()),
        n => Err(format!("the parent reads {n} where the child wrote 42")),
    }
}

fn a_forked_worker_is_seen_by_the_master() -> Result<(), String> {
    let board = Scoreboard::new(1).map_err(|e| format!("cannot map a scoreboard: {e}"))?;
    board.slot(0).reset(1, T0);
    in_child(|| {
        board.slot(0).begin_request("POST", "/child", 3, 1, T0);
        board.add_accepted();
    })?;
    let s = board.slot(0).snapshot();
    let seen = (s.method.as_str(), s.uri.as_str(), s.state, board.accepted());
    let wrote = ("POST", "/child", SlotState::Busy, 1);
    if seen == wrote {
        Ok(())
    } else {
        Err(format!(
            "the master sees {seen:?} where the worker wrote {wrote:?}"
        ))
    }
}

fn fork_is_refused_while_another_thread_runs() -> Result<(), String> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    // Blocks until `stop` is dropped.
    let other = std::thread::spawn(move || stopped.recv());
    let refused = in_child(|| {});
    drop(stop);
    other
        .join()
        .map_err(|_| "the second thread panicked".to_string())?
        .ok();
    match refused {
        Err(e) if e.starts_with("refusing to fork") => Ok(()),
        Err(e) => Err(format!("refused for the wrong reason: {e}")),
        Ok(()) => Err("forked with two threads running".to_string()),
    }
}

/// Forks; the child runs `child` and exits 0 (1 if it panicked), and the parent waits for it.
/// Refuses unless this process has exactly one thread.
fn in_child(child: impl FnOnce()) -> Result<(), String> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(format!(
            "refusing to fork: this process has {threads} threads, forking is sound with 1 only"
        ));
    }
    match fork().map_err(|e| format!("fork failed: {e}"))? {
        Fork::Child => {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).is_ok();
            // `exit` flushes stdout, which holds nothing: the callers print whole lines, and
            // Rust's stdout writes each line out as it ends.
            std::process::exit(if ok { 0 } else { 1 })
        }
        Fork::Parent(pid) => match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, 0)) => Ok(()),
            other => Err(format!("child {pid} ended with {other:?}, not exit code 0")),
        },
    }
}

/// The `Threads:` line of /proc/self/status.
fn thread_count() -> Result<usize, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| "/proc/self/status has no Threads: line".to_string())
}
