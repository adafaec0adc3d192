//! The host lock: at most one process of a task on a host, whichever master started it (two
//! masters of a pool during a restart, a reload's or an upgrade's next generation). The task
//! process holds an exclusive `flock` on its task's lock file for its whole life; the kernel
//! releases it when the process ends, however it ends.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::Stop;

/// How often a process waiting for the lock tries again: a finishing predecessor is followed
/// within this, and the cost is one syscall.
const LOCK_POLL: Duration = Duration::from_millis(20);

/// Lock files are readable by all (they hold nothing) and written by the pool's user only.
const LOCK_FILE_MODE: u32 = 0o644;

/// The lock file of task `task` of pool `pool` in `dir`.
pub(crate) fn path(dir: &Path, pool: &str, task: &str) -> PathBuf {
    dir.join(format!("{pool}.task.{task}.lock"))
}

/// Takes the lock at `path`, waiting while another process holds it; `None` if told to stop
/// first. `waiting` is called once, if the lock is held when first tried.
pub(crate) fn acquire(
    path: &Path,
    stop: &Stop,
    waiting: impl FnOnce(),
) -> io::Result<Option<Flock<File>>> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(LOCK_FILE_MODE)
        .open(path)
        .map_err(|e| io::Error::other(format!("cannot open task lock {}: {e}", path.display())))?;
    let mut waiting = Some(waiting);
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Some(lock)),
            Err((back, Errno::EWOULDBLOCK)) => {
                file = back;
                if let Some(say) = waiting.take() {
                    say();
                }
                if stop.sleep(LOCK_POLL) {
                    return Ok(None);
                }
            }
            Err((_, e)) => {
                return Err(io::Error::other(format!(
                    "cannot lock {}: {e}",
                    path.display()
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_until_told_to_stop_and_gets_it_once_free() {
        let dir = std::env::temp_dir().join(format!("task-lock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = path(&dir, "www", "drain");
        assert!(path.ends_with("www.task.drain.lock"));
        let none = Stop::default();
        let first = acquire(&path, &none, || {}).expect("lock").expect("free");
        // flock conflicts between two opens of the file even in one process.
        let stop = Stop::default();
        stop.request();
        let mut waited = false;
        let second = acquire(&path, &stop, || waited = true).expect("lock");
        assert!(second.is_none(), "held: the stopped waiter gives up");
        assert!(waited, "and said it waited");
        drop(first);
        let third = acquire(&path, &none, || panic!("free now")).expect("lock");
        assert!(third.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
