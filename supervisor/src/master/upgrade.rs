//! USR2, the binary upgrade: the binary on disk is checked against the current command line,
//! then executed in place of this one, handing over the listeners, the scoreboard and the
//! running workers in the variables of [`super::inherit`]. Any failure keeps the old binary
//! running, with everything as it was.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::inherit::{self, AdoptedWorker, ListenerEntry};
use super::Master;
use crate::clock;
use crate::listener::Listener;
use crate::scoreboard::Scoreboard;
use crate::worker::Application;

impl<R: Application> Master<R> {
    /// USR2: checks the new binary, then re-executes it in place. Refused while a reload is
    /// under way: the successor would adopt two generations and know which one is ready only
    /// by waiting again.
    pub(super) fn upgrade(&mut self) {
        if self.generations.reloading() {
            tracing::warn!(
                "upgrade refused: a reload is still under way; send USR2 again once it is done"
            );
            return;
        }
        let argv: Vec<OsString> = std::env::args_os().collect();
        let Some(program) = argv.first() else { return };
        tracing::info!(program = %program.to_string_lossy(), "upgrade: checking the new binary");
        if let Err(refusal) = check_new_binary(&argv) {
            tracing::error!("upgrade refused: {refusal}; still running the old one");
            return;
        }
        // Task processes are not passed on: they finish their run and exit, and the
        // successor's wait for the host lock until they have (see `tasks.rs`).
        self.stop_tasks(clock::now());
        let workers: Vec<AdoptedWorker> = self
            .workers
            .iter()
            .map(|(pid, w)| AdoptedWorker {
                pid: *pid,
                slot: w.slot,
                generation: w.generation,
                started: w.started,
                channel: w.channel.as_ref().map(|c| c.as_raw_fd()),
            })
            .collect();
        let channels: Vec<_> = self
            .workers
            .values()
            .filter_map(|w| w.channel.as_ref())
            .map(|c| c.as_fd())
            .collect();
        self.systemd.notifier.reloading(clock::now());
        tracing::info!(
            pid = std::process::id(),
            workers = workers.len(),
            "upgrade: re-executing in place; the running workers serve until the new ones are ready"
        );
        let err = exec_successor(
            &argv,
            &self.listeners,
            &self.board,
            &workers,
            &channels,
            self.generations.current,
        );
        tracing::error!(error = %err, "upgrade failed: cannot execute the new binary; still running the old one");
        self.systemd.notifier.ready();
    }
}

/// Runs the binary on disk with this command line and `--check-config`, which loads the
/// configuration and runs the application's setup. An empty listener list tells it sockets
/// would be inherited, so `listen` may be empty as it may be for this master.
fn check_new_binary(argv: &[OsString]) -> Result<(), String> {
    let Some(program) = argv.first() else {
        return Err("no argv[0] to check".into());
    };
    let out = Command::new(program)
        .args(check_args(argv))
        .env(inherit::ENV_LISTENERS, "")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run the new binary {program:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Err(format!(
        "the new binary failed its check ({}): {}",
        out.status,
        said.trim()
    ))
}

/// The arguments of the check of `argv`: `--check-config` first, where it is the pool's flag.
/// Appended, it would follow a foreign program's `--` (`fcgi-pool ... -- php-cgi`) and be
/// an argument of the program.
fn check_args(argv: &[OsString]) -> impl Iterator<Item = &std::ffi::OsStr> {
    std::iter::once("--check-config".as_ref()).chain(argv.iter().skip(1).map(OsString::as_os_str))
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

/// Re-executes `argv` in this process with everything passed on. Returns only on failure,
/// with everything as it was.
fn exec_successor(
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
        let entries: Vec<ListenerEntry> = listeners
            .iter()
            .map(|l| ListenerEntry {
                fd: l.as_fd().as_raw_fd(),
                created: l.created_file(),
                activated: l.activated(),
            })
            .collect();
        let board = (board.fd().as_raw_fd(), board.len());
        for (var, value) in inherit::inheritance_env(&entries, board, workers, generation) {
            std::env::set_var(var, value);
        }
        Ok(nix::unistd::execvp(program, &args)?)
    })();
    // Only reached when something failed: put everything back.
    for fd in &fds {
        let _ = set_cloexec(*fd, true);
    }
    for var in inherit::INHERITED_VARS {
        std::env::remove_var(var);
    }
    match result {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_flag_comes_before_a_programs_arguments() {
        let argv: Vec<OsString> = [
            "fcgi-pool",
            "--workers",
            "2",
            "--",
            "php-cgi",
            "-c",
            "x.ini",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let args: Vec<&std::ffi::OsStr> = check_args(&argv).collect();
        assert_eq!(
            args,
            [
                "--check-config",
                "--workers",
                "2",
                "--",
                "php-cgi",
                "-c",
                "x.ini"
            ]
        );
    }
}
