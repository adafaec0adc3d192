//! The child running the program, the connection kept to it, and the private directory of
//! the workers' sockets.

use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Child;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use nix::sys::signal::Signal;

/// How long a newly started program has to answer its first connection: php-cgi starts in
/// tens of milliseconds, a large preload in seconds; a program that takes longer is reported
/// as failing to start.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a child that closed a connection without an answer is given to finish exiting,
/// so that its exit status can say whether the request ran: process teardown takes
/// milliseconds.
pub(super) const EXIT_WAIT: Duration = Duration::from_secs(1);
/// The polling step while waiting for a child to answer or exit.
pub(super) const POLL_STEP: Duration = Duration::from_millis(2);
/// How many names the pool's socket directory may try before giving up: each try is a fresh
/// name, so only a broken temp directory exhausts them.
const DIR_ATTEMPTS: u32 = 16;

/// A connection to the child, and which child.
pub(super) struct Link {
    pub(super) conn: tokio::net::UnixStream,
    pub(super) program_pid: u32,
    /// Kept from an earlier request rather than opened for this one.
    pub(super) reused: bool,
}

/// Whether a kept connection is still open and silent as far as the event loop has seen (no
/// system call: it asks the runtime's readiness, which the child's close or stray bytes set).
/// The child closed it otherwise (it does not keep connections, or it exited), and anything
/// unread on it is not an answer to anything. What arrived since the loop last looked is
/// missed: a close shows as a failed attempt, and the request goes out again on a fresh
/// connection; bytes a program writes after its END_REQUEST would be read as the start of the
/// next answer, and fail it, as a program breaking the protocol does.
pub(super) fn quiet(conn: &tokio::net::UnixStream) -> bool {
    // With its budget spent, the task gets `Pending` whatever the readiness: not quiet, then.
    if !tokio::task::coop::has_budget_remaining() {
        return false;
    }
    let mut cx = Context::from_waker(Waker::noop());
    conn.poll_read_ready(&mut cx).is_pending()
}

/// A running child and its socket.
pub(super) struct Process {
    pub(super) child: Child,
    pub(super) socket: PathBuf,
    /// The connection of its last request, if it kept it open.
    pub(super) kept: Option<tokio::net::UnixStream>,
    /// Requests sent to it.
    pub(super) served: u64,
}

impl Process {
    /// Waits until the program accepts a connection and answers (or closes) it: a
    /// GET_VALUES record asks it something every FastCGI library answers. A program that
    /// exits first, or is silent for [`START_TIMEOUT`], failed to start.
    pub(super) fn wait_ready(&mut self, program: &str) -> Result<(), String> {
        let pid = self.child.id();
        let fail = |why: String| format!("program {program} (pid {pid}) {why}");
        let mut conn = UnixStream::connect(&self.socket).map_err(|e| {
            fail(format!(
                "cannot be reached at {}: {e}",
                self.socket.display()
            ))
        })?;
        let mut ask = BytesMut::new();
        fcgi::client::encode_get_values(&["FCGI_MPXS_CONNS"], &mut ask);
        conn.write_all(&ask)
            .map_err(|e| fail(format!("cannot be asked if it runs: {e}")))?;
        conn.set_read_timeout(Some(POLL_STEP * 10))
            .map_err(|e| fail(format!("cannot be waited for: {e}")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let mut answer = [0u8; 256];
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(fail(format!(
                    "exited at start ({status}) before accepting a connection"
                )));
            }
            match conn.read(&mut answer) {
                Ok(n) if n > 0 => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Err(fail(format!(
                            "did not answer within {START_TIMEOUT:?} of starting"
                        )));
                    }
                }
                // Closed: it accepted and hung up, or it died and the socket went with it.
                _ => return self.alive_after_close(&fail),
            }
        }
    }

    /// After the first connection closed: whether the program is still running.
    fn alive_after_close(&mut self, fail: &dyn Fn(String) -> String) -> Result<(), String> {
        let deadline = Instant::now() + EXIT_WAIT / 10;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(fail(format!(
                    "exited at start ({status}) before answering a connection"
                )));
            }
            std::thread::sleep(POLL_STEP);
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Its whole process group (it leads one of its own): whatever it forked goes too.
        // Only while it is not reaped: until then its pid, the group's id, is not reused.
        if let (Ok(None), Ok(pid)) = (self.child.try_wait(), i32::try_from(self.child.id())) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The directory of the workers' sockets, made by the master with mode 0700 and removed by
/// it when it stops.
pub(super) struct PoolDir {
    pub(super) path: PathBuf,
    /// The master's pid: workers hold a copy, which must not remove it.
    owner: u32,
}

impl PoolDir {
    pub(super) fn create() -> Result<PoolDir, String> {
        let owner = std::process::id();
        let base = std::env::temp_dir();
        let mut last = None;
        for attempt in 0..DIR_ATTEMPTS {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(attempt);
            let path = base.join(format!("fcgi-pool.{owner}.{nanos:08x}{attempt}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PoolDir { path, owner }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(format!(
                        "cannot make the programs' socket directory {}: {e}",
                        path.display()
                    ))
                }
            }
        }
        Err(format!(
            "cannot make the programs' socket directory in {}: {last:?}",
            base.display()
        ))
    }

    /// Removes the sockets of workers that are gone (killed before they could clean up), and
    /// any left by an earlier process with this worker's pid.
    pub(super) fn remove_stale_sockets(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        let me = std::process::id();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let gone = pid as u32 == me
                || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    == Err(nix::errno::Errno::ESRCH);
            if gone {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

impl Drop for PoolDir {
    fn drop(&mut self) {
        if std::process::id() == self.owner {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_kept_connection_is_quiet_until_the_program_writes_or_closes() {
        let (kept, mut program) = tokio::net::UnixStream::pair().expect("pair");
        assert!(quiet(&kept), "open and silent");
        program.write_all(b"stray").await.expect("write");
        kept.readable().await.expect("readable");
        assert!(!quiet(&kept), "bytes nobody asked for");

        let (kept, program) = tokio::net::UnixStream::pair().expect("pair");
        assert!(quiet(&kept));
        drop(program);
        kept.readable().await.expect("readable");
        assert!(!quiet(&kept), "closed by the program");
    }

    #[test]
    fn the_socket_directory_is_private_and_only_its_maker_removes_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = PoolDir::create().expect("a temp dir");
        let mode = std::fs::metadata(&dir.path)
            .expect("made")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = dir.path.clone();
        let copy = PoolDir {
            path: path.clone(),
            owner: std::process::id() + 1,
        };
        drop(copy);
        assert!(path.exists(), "a worker's copy leaves it");
        std::fs::write(path.join(format!("{}-0.sock", std::process::id())), b"").expect("write");
        dir.remove_stale_sockets();
        assert_eq!(std::fs::read_dir(&path).expect("listed").count(), 0);
        drop(dir);
        assert!(!path.exists(), "the master removes it");
    }
}
