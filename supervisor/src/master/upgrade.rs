//! Inheriting a running server: a binary upgrade re-executes the master in place (same pid, so
//! systemd and pid files stay right) with its listening sockets, its scoreboard and its workers
//! described in the environment; systemd's socket activation passes sockets the same way.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::unistd::Pid;

use crate::listener::Listener;
use crate::scoreboard::Scoreboard;
use crate::sys;

/// `fd:created:activated` for each listener, comma-separated: `created` is 1 when the unix
/// socket file was created by this pid and is to be removed at exit, `activated` 1 when systemd
/// passed the socket in.
pub(crate) const ENV_LISTENERS: &str = "SUPERVISOR_LISTENERS";
/// `fd:slots` of the scoreboard's memfd.
const ENV_SCOREBOARD: &str = "SUPERVISOR_SCOREBOARD";
/// `pid:slot:generation:started_us:channel_fd` for each worker, comma-separated (`-` for a
/// worker without a connection channel).
const ENV_WORKERS: &str = "SUPERVISOR_WORKERS";
/// The generation the running workers belong to.
const ENV_GENERATION: &str = "SUPERVISOR_GENERATION";

/// A worker the previous master left running.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdoptedWorker {
    pub pid: Pid,
    pub slot: usize,
    pub generation: u64,
    pub started: Duration,
    /// The master's end of its connection channel, as an fd number handed over.
    pub channel: Option<RawFd>,
}

/// What this process inherited.
#[derive(Default)]
pub(crate) struct Inherited {
    pub listeners: Vec<Listener>,
    pub board: Option<Scoreboard>,
    pub workers: Vec<AdoptedWorker>,
    pub generation: u64,
}

fn bad(var: &str, value: &str) -> io::Error {
    io::Error::other(format!("cannot parse {var}={value:?}"))
}

fn number<T: std::str::FromStr>(var: &str, value: &str, field: Option<&str>) -> io::Result<T> {
    field
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| bad(var, value))
}

/// Reads and clears what a previous master (or systemd) handed over.
pub(crate) fn inherit() -> io::Result<Inherited> {
    let mut got = Inherited::default();
    if let Ok(list) = std::env::var(ENV_LISTENERS) {
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let mut parts = item.split(':');
            let fd: RawFd = number(ENV_LISTENERS, &list, parts.next())?;
            let created = parts.next() == Some("1");
            let activated = parts.next() == Some("1");
            got.listeners
                .push(Listener::adopt(sys::adopt_fd(fd)?, created, activated)?);
        }
        if let Ok(board) = std::env::var(ENV_SCOREBOARD) {
            let mut parts = board.split(':');
            let fd: RawFd = number(ENV_SCOREBOARD, &board, parts.next())?;
            let slots: usize = number(ENV_SCOREBOARD, &board, parts.next())?;
            got.board = Some(Scoreboard::from_fd(sys::adopt_fd(fd)?, slots)?);
        }
        if let Ok(workers) = std::env::var(ENV_WORKERS) {
            for item in workers.split(',').filter(|s| !s.is_empty()) {
                let mut p = item.split(':');
                got.workers.push(AdoptedWorker {
                    pid: Pid::from_raw(number(ENV_WORKERS, &workers, p.next())?),
                    slot: number(ENV_WORKERS, &workers, p.next())?,
                    generation: number(ENV_WORKERS, &workers, p.next())?,
                    started: Duration::from_micros(number(ENV_WORKERS, &workers, p.next())?),
                    channel: p.next().and_then(|c| c.parse().ok()),
                });
            }
        }
        if let Ok(g) = std::env::var(ENV_GENERATION) {
            got.generation = number(ENV_GENERATION, &g, Some(&g))?;
        }
    } else if let Some(n) = systemd_fds() {
        // "sd_listen_fds: file descriptors start at 3".
        for fd in 3..3 + n {
            got.listeners
                .push(Listener::adopt(sys::adopt_fd(fd)?, false, true)?);
        }
    }
    for var in [
        ENV_LISTENERS,
        ENV_SCOREBOARD,
        ENV_WORKERS,
        ENV_GENERATION,
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        std::env::remove_var(var);
    }
    Ok(got)
}

/// Whether this process will inherit listening sockets (so `listen` may be empty).
pub(crate) fn will_inherit() -> bool {
    std::env::var_os(ENV_LISTENERS).is_some() || systemd_fds().is_some()
}

/// LISTEN_FDS, when LISTEN_PID names this process.
fn systemd_fds() -> Option<i32> {
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    if pid != std::process::id() {
        return None;
    }
    std::env::var("LISTEN_FDS").ok()?.parse().ok()
}

fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// Re-executes `argv` in this process with everything handed over. Returns only on failure,
/// with everything as it was.
pub(crate) fn exec_successor(
    argv: &[OsString],
    listeners: &[Listener],
    board: &Scoreboard,
    workers: &[AdoptedWorker],
    channels: &[BorrowedFd<'_>],
    generation: u64,
) -> io::Error {
    let fds: Vec<BorrowedFd<'_>> = listeners
        .iter()
        .map(|l| l.as_fd())
        .chain([board.fd()])
        .chain(channels.iter().copied())
        .collect();
    let result = (|| -> io::Result<std::convert::Infallible> {
        let args = argv
            .iter()
            .map(|a| {
                CString::new(a.as_bytes()).map_err(|_| io::Error::other("argument with a NUL byte"))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let program = args
            .first()
            .ok_or_else(|| io::Error::other("no argv[0] to re-execute"))?;
        for fd in &fds {
            set_cloexec(*fd, false)?;
        }
        let list: Vec<String> = listeners
            .iter()
            .map(|l| {
                let fd = l.as_fd().as_raw_fd();
                format!(
                    "{fd}:{}:{}",
                    u8::from(l.created_file()),
                    u8::from(l.activated())
                )
            })
            .collect();
        std::env::set_var(ENV_LISTENERS, list.join(","));
        std::env::set_var(
            ENV_SCOREBOARD,
            format!("{}:{}", board.fd().as_raw_fd(), board.len()),
        );
        let workers: Vec<String> = workers
            .iter()
            .map(|w| {
                let channel = w.channel.map_or("-".to_string(), |fd| fd.to_string());
                format!(
                    "{}:{}:{}:{}:{channel}",
                    w.pid,
                    w.slot,
                    w.generation,
                    w.started.as_micros()
                )
            })
            .collect();
        std::env::set_var(ENV_WORKERS, workers.join(","));
        std::env::set_var(ENV_GENERATION, generation.to_string());
        Ok(nix::unistd::execvp(program, &args)?)
    })();
    // Only reached when something failed: put everything back.
    for fd in &fds {
        let _ = set_cloexec(*fd, true);
    }
    for var in [ENV_LISTENERS, ENV_SCOREBOARD, ENV_WORKERS, ENV_GENERATION] {
        std::env::remove_var(var);
    }
    match result {
        Err(e) => e,
        Ok(never) => match never {},
    }
}
