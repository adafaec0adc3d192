//! Support code for the end-to-end tests: temporary directories, free ports, processes that
//! are always stopped (by process group, never by name), polling with a deadline, the
//! applications and frontends the tests start, and checkers for what they answer and log
//! (the JSON log, the OpenMetrics grammar).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

mod app;
pub mod hosts;
pub mod http;
pub mod log;
mod nginx;
pub mod openmetrics;
pub mod pg;

pub use app::{
    fcgi_request, fcgi_request_as, fcgi_request_with, fetch_pid, opt_in_if_root, sched_policy,
    worker_pids, Addr, App, Via, WORKERS_DEADLINE,
};
pub use nginx::Nginx;

/// A directory removed when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new, empty directory named after `label`.
    pub fn new(label: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "fcgi-e2e-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A TCP port free right now on 127.0.0.1 (callers retry if they lose a race for it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary of this workspace, built by `cargo build --workspace --bins` (the test command
/// does that first) into the same profile directory as the running test.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

/// A child process in its own process group, stopped with its whole group when dropped.
pub struct Proc {
    child: Mutex<Child>,
    pid: i32,
    log: PathBuf,
    exited: Mutex<Option<ExitStatus>>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr going to `<dir>/<name>.log`.
    pub fn spawn(dir: &TempDir, name: &str, mut cmd: Command) -> Proc {
        let log = dir.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let pid = child.id() as i32;
        Proc {
            child: Mutex::new(child),
            pid,
            log,
            exited: Mutex::new(None),
        }
    }

    /// Its pid (and process group id).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&self, sig: Signal) {
        let _ = kill(Pid::from_raw(self.pid), sig);
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = *self.exited.lock().expect("lock") {
                return Some(s);
            }
            if let Ok(Some(s)) = self.child.lock().expect("lock").try_wait() {
                *self.exited.lock().expect("lock") = Some(s);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What it printed so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The whole group: workers forked by a master are in it too.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        if let Ok(mut child) = self.child.lock() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `f` every 10 ms until it is true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every 10 ms for `duration` and panics naming `what` the first time it is false:
/// for what must not happen in a while (a pool that must not grow), where [`wait_until`] is
/// for what must happen.
pub fn assert_throughout(duration: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < duration {
        assert!(f(), "{what} failed after {:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(f(), "{what} failed at the end of {duration:?}");
}
