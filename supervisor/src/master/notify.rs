//! systemd's notification protocol (`sd_notify`): READY, RELOADING, STOPPING, STATUS and the
//! watchdog, as datagrams to `$NOTIFY_SOCKET`. Does nothing when systemd did not ask for it.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The connection to systemd, if there is one.
pub(crate) struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
    last_status: String,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace) and
    /// `$WATCHDOG_USEC` (when `$WATCHDOG_PID` is unset or names this process).
    pub(crate) fn from_env() -> Notifier {
        let target = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let addr = match path.strip_prefix('@') {
                Some(name) => SocketAddr::from_abstract_name(name.as_bytes()).ok()?,
                None => SocketAddr::from_pathname(&path).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .map(|p| p.parse::<u32>().ok() == Some(std::process::id()))
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|_| for_us)
            .map(Duration::from_micros);
        Notifier {
            target,
            watchdog,
            last_status: String::new(),
        }
    }

    fn send(&self, message: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }

    /// The pool can serve.
    pub(crate) fn ready(&self) {
        self.send("READY=1");
    }

    /// A reload or upgrade started.
    pub(crate) fn reloading(&self, monotonic: Duration) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            monotonic.as_micros()
        ));
    }

    /// A stop started.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// A one-line summary, sent when it changes.
    pub(crate) fn status(&mut self, line: String) {
        if self.target.is_some() && line != self.last_status {
            self.send(&format!("STATUS={line}"));
            self.last_status = line;
        }
    }

    /// How often to send WATCHDOG=1: half of what systemd allows.
    pub(crate) fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    /// Tells systemd the master is alive.
    pub(crate) fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// The master's side of systemd: the notifier and when the watchdog was last fed.
pub(crate) struct Systemd {
    pub(crate) notifier: Notifier,
    /// When WATCHDOG=1 was last sent.
    watchdog_at: Duration,
}

impl Systemd {
    /// From the environment, as of `now`.
    pub(crate) fn from_env(now: Duration) -> Systemd {
        Systemd {
            notifier: Notifier::from_env(),
            watchdog_at: now,
        }
    }

    /// Feeds the watchdog when it is due.
    pub(crate) fn tick(&mut self, now: Duration) {
        if let Some(every) = self.notifier.watchdog_every() {
            if now.saturating_sub(self.watchdog_at) >= every {
                self.notifier.watchdog();
                self.watchdog_at = now;
            }
        }
    }

    /// How long until the watchdog is due, if there is one.
    pub(crate) fn next_due(&self, now: Duration) -> Option<Duration> {
        let every = self.notifier.watchdog_every()?;
        Some((self.watchdog_at + every).saturating_sub(now))
    }
}
