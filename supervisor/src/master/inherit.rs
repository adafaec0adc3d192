//! Inheriting a running server: a binary upgrade re-executes the master in place (same pid, so
//! systemd and pid files stay right) with its listening sockets, its scoreboard and its workers
//! described in `SUPERVISOR_*` variables; systemd's socket activation passes sockets the same
//! way. The format of those variables is written and read here, by pure functions, so both
//! sides of the exec agree and the tests need no environment.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
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

/// Every variable a master passes to its successor, to clear once read (or once an exec failed).
pub(crate) const INHERITED_VARS: [&str; 4] =
    [ENV_LISTENERS, ENV_SCOREBOARD, ENV_WORKERS, ENV_GENERATION];

/// systemd's socket-activation variables, cleared so no child takes them for its own.
const SYSTEMD_VARS: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// "sd_listen_fds: file descriptors start at 3" (after stdin, stdout and stderr).
const SD_LISTEN_FDS_START: RawFd = 3;

/// One listening socket passed on, as the variable describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ListenerEntry {
    pub fd: RawFd,
    /// The unix socket file was created by this master, which removes it at exit.
    pub created: bool,
    /// systemd passed the socket in: a reload never closes it.
    pub activated: bool,
}

/// A worker the previous master left running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AdoptedWorker {
    pub pid: Pid,
    pub slot: usize,
    pub generation: u64,
    pub started: Duration,
    /// The master's end of its connection channel, as an fd number passed on.
    pub channel: Option<RawFd>,
}

/// A variable that does not say what it should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvError {
    var: &'static str,
    value: String,
    want: &'static str,
}

impl fmt::Display for EnvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot parse {}={:?}: want {}",
            self.var, self.value, self.want
        )
    }
}

impl std::error::Error for EnvError {}

impl From<EnvError> for io::Error {
    fn from(e: EnvError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// A listed worker whose slot is past the end of the inherited scoreboard (a previous master
/// that disagrees about the table, or no table passed on at all). Adopting it would index
/// past the table; it is not adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Misfit {
    pub worker: AdoptedWorker,
    /// Slots in the inherited table.
    pub slots: usize,
}

impl fmt::Display for Misfit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (pid, slot) = (self.worker.pid, self.worker.slot);
        if self.slots == 0 {
            write!(
                f,
                "{ENV_WORKERS} puts worker {pid} in slot {slot}, but no scoreboard was passed on \
                 in {ENV_SCOREBOARD}; not adopting it"
            )
        } else {
            write!(
                f,
                "{ENV_WORKERS} puts worker {pid} in slot {slot}, but the inherited scoreboard has \
                 {} slots; not adopting it",
                self.slots
            )
        }
    }
}

/// The workers of [`ENV_WORKERS`]: those to adopt, and those whose slot does not fit.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ParsedWorkers {
    pub adopted: Vec<AdoptedWorker>,
    pub misfits: Vec<Misfit>,
}

/// What this process inherited.
#[derive(Default)]
pub(crate) struct Inherited {
    pub listeners: Vec<Listener>,
    pub board: Option<Scoreboard>,
    pub workers: Vec<AdoptedWorker>,
    pub generation: u64,
}

const WANT_LISTENERS: &str = "fd:created:activated, comma-separated";
const WANT_SCOREBOARD: &str = "fd:slots";
const WANT_WORKERS: &str = "pid:slot:generation:started_us:channel_fd, comma-separated";
const WANT_GENERATION: &str = "a generation number";

fn field<T: std::str::FromStr>(
    var: &'static str,
    value: &str,
    want: &'static str,
    part: Option<&str>,
) -> Result<T, EnvError> {
    part.and_then(|p| p.parse().ok()).ok_or_else(|| EnvError {
        var,
        value: value.to_string(),
        want,
    })
}

fn items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter(|s| !s.is_empty())
}

/// Parses [`ENV_LISTENERS`].
pub(crate) fn parse_listeners(value: &str) -> Result<Vec<ListenerEntry>, EnvError> {
    items(value)
        .map(|item| {
            let mut p = item.split(':');
            Ok(ListenerEntry {
                fd: field(ENV_LISTENERS, value, WANT_LISTENERS, p.next())?,
                created: p.next() == Some("1"),
                activated: p.next() == Some("1"),
            })
        })
        .collect()
}

/// Formats [`ENV_LISTENERS`].
pub(crate) fn format_listeners(listeners: &[ListenerEntry]) -> String {
    listeners
        .iter()
        .map(|l| format!("{}:{}:{}", l.fd, u8::from(l.created), u8::from(l.activated)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses [`ENV_SCOREBOARD`]: the memfd and its number of slots.
pub(crate) fn parse_scoreboard(value: &str) -> Result<(RawFd, usize), EnvError> {
    let mut p = value.split(':');
    let fd = field(ENV_SCOREBOARD, value, WANT_SCOREBOARD, p.next())?;
    let slots = field(ENV_SCOREBOARD, value, WANT_SCOREBOARD, p.next())?;
    Ok((fd, slots))
}

/// Parses [`ENV_WORKERS`] against a scoreboard of `slots` slots. A malformed entry is an error
/// (the variable cannot be trusted at all); a well-formed worker whose slot does not fit the
/// table is a [`Misfit`], so the others are still adopted.
pub(crate) fn parse_workers(value: &str, slots: usize) -> Result<ParsedWorkers, EnvError> {
    let mut parsed = ParsedWorkers::default();
    for item in items(value) {
        let mut p = item.split(':');
        let pid = Pid::from_raw(field(ENV_WORKERS, value, WANT_WORKERS, p.next())?);
        let slot = field(ENV_WORKERS, value, WANT_WORKERS, p.next())?;
        let generation = field(ENV_WORKERS, value, WANT_WORKERS, p.next())?;
        let started = Duration::from_micros(field(ENV_WORKERS, value, WANT_WORKERS, p.next())?);
        // `-` (or nothing): a worker without a channel.
        let channel = p.next().and_then(|c| c.parse().ok());
        let worker = AdoptedWorker {
            pid,
            slot,
            generation,
            started,
            channel,
        };
        if slot < slots {
            parsed.adopted.push(worker);
        } else {
            parsed.misfits.push(Misfit { worker, slots });
        }
    }
    Ok(parsed)
}

/// Formats [`ENV_WORKERS`].
pub(crate) fn format_workers(workers: &[AdoptedWorker]) -> String {
    workers
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
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses [`ENV_GENERATION`].
pub(crate) fn parse_generation(value: &str) -> Result<u64, EnvError> {
    field(ENV_GENERATION, value, WANT_GENERATION, Some(value))
}

/// The variables a master sets for its successor, in the order [`inherit`] reads them.
pub(crate) fn inheritance_env(
    listeners: &[ListenerEntry],
    board: (RawFd, usize),
    workers: &[AdoptedWorker],
    generation: u64,
) -> [(&'static str, String); 4] {
    [
        (ENV_LISTENERS, format_listeners(listeners)),
        (ENV_SCOREBOARD, format!("{}:{}", board.0, board.1)),
        (ENV_WORKERS, format_workers(workers)),
        (ENV_GENERATION, generation.to_string()),
    ]
}

/// Reads and clears what a previous master (or systemd) passed on.
pub(crate) fn inherit() -> io::Result<Inherited> {
    let mut got = Inherited::default();
    if let Ok(list) = std::env::var(ENV_LISTENERS) {
        for l in parse_listeners(&list)? {
            got.listeners.push(Listener::adopt(
                sys::adopt_fd(l.fd)?,
                l.created,
                l.activated,
            )?);
        }
        if let Ok(board) = std::env::var(ENV_SCOREBOARD) {
            let (fd, slots) = parse_scoreboard(&board)?;
            got.board = Some(Scoreboard::from_fd(sys::adopt_fd(fd)?, slots)?);
        }
        if let Ok(workers) = std::env::var(ENV_WORKERS) {
            let slots = got.board.as_ref().map_or(0, Scoreboard::len);
            let parsed = parse_workers(&workers, slots)?;
            for misfit in &parsed.misfits {
                let_go(misfit);
            }
            got.workers = parsed.adopted;
        }
        if let Ok(g) = std::env::var(ENV_GENERATION) {
            got.generation = parse_generation(&g)?;
        }
    } else if let Some(n) = systemd_fds() {
        for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + n {
            got.listeners
                .push(Listener::adopt(sys::adopt_fd(fd)?, false, true)?);
        }
    }
    for var in INHERITED_VARS.iter().chain(&SYSTEMD_VARS) {
        std::env::remove_var(var);
    }
    Ok(got)
}

/// A worker that is not adopted would otherwise serve on untracked: never replaced, never
/// stopped, its slot unwatched. It is told to drain and exit (SIGTERM, as in a reload), and its
/// channel is closed, so it closes its kept-alive connections instead of handing them to no
/// one. Only a child of this process is signalled: a pid in the variable that is not one is
/// left alone. Its exit is reaped like any child's and, being unknown, logged by no one.
fn let_go(misfit: &Misfit) {
    if let Some(fd) = misfit.worker.channel {
        drop(sys::adopt_fd(fd));
    }
    let pid = misfit.worker.pid;
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => {
            tracing::error!("{misfit}; stopping it (SIGTERM)");
            let _ = kill(pid, Signal::SIGTERM);
        }
        // It exited meanwhile, and is now reaped.
        Ok(_) => tracing::error!("{misfit}; it has exited"),
        Err(_) => tracing::error!("{misfit}; not a child of this process, so left alone"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(pid: i32, slot: usize, channel: Option<RawFd>) -> AdoptedWorker {
        AdoptedWorker {
            pid: Pid::from_raw(pid),
            slot,
            generation: 7,
            started: Duration::from_micros(1_234_567),
            channel,
        }
    }

    #[test]
    fn listeners_round_trip() {
        let listeners = [
            ListenerEntry {
                fd: 3,
                created: true,
                activated: false,
            },
            ListenerEntry {
                fd: 10,
                created: false,
                activated: true,
            },
        ];
        let value = format_listeners(&listeners);
        assert_eq!(value, "3:1:0,10:0:1");
        assert_eq!(parse_listeners(&value), Ok(listeners.to_vec()));
        assert_eq!(parse_listeners(""), Ok(Vec::new()));
    }

    #[test]
    fn workers_round_trip_with_and_without_a_channel() {
        let workers = [worker(4242, 0, Some(9)), worker(4243, 255, None)];
        let value = format_workers(&workers);
        assert_eq!(value, "4242:0:7:1234567:9,4243:255:7:1234567:-");
        let parsed = parse_workers(&value, 256).expect("well-formed");
        assert_eq!(parsed.adopted, workers.to_vec());
        assert!(parsed.misfits.is_empty());
    }

    #[test]
    fn a_worker_past_the_scoreboard_is_not_adopted_and_named() {
        let value = format_workers(&[worker(1, 3, Some(9)), worker(2, 4, None)]);
        let parsed = parse_workers(&value, 4).expect("well-formed");
        assert_eq!(parsed.adopted, vec![worker(1, 3, Some(9))]);
        assert_eq!(
            parsed.misfits,
            vec![Misfit {
                worker: worker(2, 4, None),
                slots: 4
            }]
        );
        let said = parsed.misfits[0].to_string();
        for part in ["SUPERVISOR_WORKERS", "worker 2", "slot 4", "4 slots"] {
            assert!(said.contains(part), "{said:?} names {part:?}");
        }
        // No table passed on: no slot fits.
        let parsed = parse_workers(&value, 0).expect("well-formed");
        assert!(parsed.adopted.is_empty());
        assert_eq!(parsed.misfits.len(), 2);
        let said = parsed.misfits[0].to_string();
        assert!(
            said.contains("no scoreboard") && said.contains("SUPERVISOR_SCOREBOARD"),
            "{said}"
        );
    }

    #[test]
    fn malformed_entries_are_errors_naming_the_variable_and_the_format() {
        for value in ["4242", "4242:x:7:1:-", "4242:0:7", ":0:7:1:-"] {
            let err = parse_workers(value, 256).expect_err(value);
            let said = err.to_string();
            assert!(said.contains("SUPERVISOR_WORKERS"), "{said}");
            assert!(said.contains(&format!("{value:?}")), "{said}");
            assert!(said.contains("pid:slot:generation"), "{said}");
        }
        assert!(parse_listeners("3:1:0,x").is_err());
        assert!(parse_scoreboard("5").is_err());
        assert!(parse_generation("-1").is_err());
    }

    #[test]
    fn inheritance_env_is_what_inherit_reads() {
        let listeners = [ListenerEntry {
            fd: 3,
            created: false,
            activated: false,
        }];
        let workers = [worker(4242, 1, Some(8))];
        let env = inheritance_env(&listeners, (5, 256), &workers, 9);
        let names: Vec<&str> = env.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, INHERITED_VARS);
        assert_eq!(parse_listeners(&env[0].1), Ok(listeners.to_vec()));
        assert_eq!(parse_scoreboard(&env[1].1), Ok((5, 256)));
        let (_, slots) = parse_scoreboard(&env[1].1).expect("well-formed");
        assert_eq!(
            parse_workers(&env[2].1, slots).map(|p| p.adopted),
            Ok(workers.to_vec())
        );
        assert_eq!(parse_generation(&env[3].1), Ok(9));
    }
}
