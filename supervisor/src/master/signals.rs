//! The operator's signals, turned into intents in one place.
//!
//! | signal        | intent                                                                 |
//! |---------------|------------------------------------------------------------------------|
//! | TERM, QUIT    | graceful stop: stop accepting, finish in-flight requests, then exit 0  |
//! | INT           | graceful stop; a second INT stops at once                              |
//! | HUP           | reload the configuration and replace the workers                       |
//! | USR2          | re-execute the binary in place (upgrade)                               |
//! | USR1          | reopen log files                                                       |
//! | TTIN / TTOU   | one worker more / one fewer                                            |
//! | CHLD          | reap exited workers                                                    |
//! | URG           | a worker has requests waiting: look at the pool now (sent by workers)  |
//!
//! URG is otherwise sent only for TCP urgent data, to the owner a socket names with
//! `F_SETOWN`, which the master never sets; so it is free for workers to wake their master
//! with, and an operator who sends it by hand costs one maintenance pass.

use nix::sys::signal::{SigSet, Signal};

/// What the master should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Finish in-flight requests, then exit.
    Stop,
    /// Kill the workers and exit now.
    StopNow,
    /// Re-read the configuration and start a new generation of workers.
    Reload,
    /// Re-execute the binary on disk in place.
    Upgrade,
    /// Reopen the log file.
    ReopenLogs,
    /// Raise the pool size by one.
    Grow,
    /// Lower the pool size by one.
    Shrink,
    /// A child exited.
    Reap,
    /// A worker at its cap sees connections waiting while the pool could grow: look at the
    /// pool now rather than at the next tick.
    Wake,
}

/// The signals the master handles; blocked and read synchronously from a signalfd.
pub fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGCHLD,
        Signal::SIGURG,
    ] {
        set.add(sig);
    }
    set
}

/// The intent of `sig`; `stopping` is true once a graceful stop is under way.
pub fn intent(sig: Signal, stopping: bool) -> Option<Intent> {
    Some(match sig {
        Signal::SIGTERM | Signal::SIGQUIT => Intent::Stop,
        Signal::SIGINT if stopping => Intent::StopNow,
        Signal::SIGINT => Intent::Stop,
        Signal::SIGHUP => Intent::Reload,
        Signal::SIGUSR2 => Intent::Upgrade,
        Signal::SIGUSR1 => Intent::ReopenLogs,
        Signal::SIGTTIN => Intent::Grow,
        Signal::SIGTTOU => Intent::Shrink,
        Signal::SIGCHLD => Intent::Reap,
        Signal::SIGURG => Intent::Wake,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_interrupt_stops_at_once() {
        assert_eq!(intent(Signal::SIGINT, false), Some(Intent::Stop));
        assert_eq!(intent(Signal::SIGINT, true), Some(Intent::StopNow));
        assert_eq!(intent(Signal::SIGTERM, true), Some(Intent::Stop));
    }

    #[test]
    fn a_worker_wakes_its_master_with_urg() {
        assert!(
            handled().contains(Signal::SIGURG),
            "blocked, so read from the signalfd"
        );
        assert_eq!(intent(Signal::SIGURG, false), Some(Intent::Wake));
    }

    #[test]
    fn every_handled_signal_has_an_intent() {
        for sig in handled().iter() {
            assert!(intent(sig, false).is_some(), "{sig:?}");
        }
        assert_eq!(intent(Signal::SIGPIPE, false), None);
    }
}
