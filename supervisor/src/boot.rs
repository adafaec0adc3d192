//! Starting: the command line and the file become a `Config`, listeners are inherited or
//! bound, the pid file is written, the application is set up, and the master takes over.
//! Every failure on the way is one [`StartError`], mapped to the process's exit code in one
//! `match` and reported in one place. A first argument `status` runs the status command
//! instead (`status_command.rs`).

use std::fmt::{self, Display};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Cli, Config, ConfigError, ListenAddr};
use crate::listener::Listener;
use crate::logging;
use crate::master::{inherit, Master};
use crate::worker::Application;

/// Exit code for a failure to start (setup, sockets, files).
const EXIT_FAILURE: i32 = 1;
/// Exit code for a bad configuration, like clap's for a bad command line: the operator has
/// something to fix before trying again.
const EXIT_BAD_CONFIG: i32 = 2;

/// Why the server did not start.
#[derive(Debug)]
pub(crate) enum StartError {
    /// The configuration is invalid.
    Config(ConfigError),
    /// `--check-config`: the configuration is valid but the application's setup failed.
    CheckSetup(String),
    /// The log file cannot be opened.
    Logging(io::Error),
    /// What a previous master or systemd passed on cannot be taken over.
    Inherit(io::Error),
    /// A listening socket cannot be bound.
    Listen {
        /// The address.
        addr: ListenAddr,
        /// Why.
        error: io::Error,
    },
    /// The pid file cannot be written.
    PidFile {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The application's setup failed.
    Setup(String),
    /// The master cannot take over (signals, scoreboard).
    Master(io::Error),
}

impl Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::CheckSetup(e) => {
                write!(f, "configuration ok, but the application setup failed: {e}")
            }
            StartError::Logging(e) => write!(f, "cannot start logging: {e}"),
            StartError::Inherit(e) => write!(f, "cannot take over the inherited sockets: {e}"),
            StartError::Listen { addr, error } => write!(f, "cannot listen on {addr}: {error}"),
            StartError::PidFile { path, error } => {
                write!(f, "cannot write pid file {}: {error}", path.display())
            }
            StartError::Setup(e) => write!(f, "application setup failed: {e}"),
            StartError::Master(e) => write!(f, "cannot start the master: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl StartError {
    /// The process's exit code.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            StartError::Config(_) => EXIT_BAD_CONFIG,
            StartError::CheckSetup(_)
            | StartError::Logging(_)
            | StartError::Inherit(_)
            | StartError::Listen { .. }
            | StartError::PidFile { .. }
            | StartError::Setup(_)
            | StartError::Master(_) => EXIT_FAILURE,
        }
    }

    /// Failures before logging is set up go to stderr, prefixed with the program's name like
    /// any command-line tool's; later ones are logged, where the operator reads the rest.
    fn report(&self, program: &str) {
        let logged = !matches!(
            self,
            StartError::Config(_) | StartError::CheckSetup(_) | StartError::Logging(_)
        );
        if logged {
            tracing::error!("{self}");
        } else {
            eprintln!("{program}: {self}");
        }
    }
}

/// Starts the server and runs it to the end: the process's exit code. `setup` sees the
/// validated configuration; `serves_async`: the application is an async service (`serve`),
/// which changes a default (`max_requests_in_flight`).
pub(crate) fn run<R, E, F>(setup: F, serves_async: bool) -> i32
where
    R: Application,
    E: Display,
    F: FnOnce(&Config) -> Result<R, E>,
{
    let program = std::env::args().next().unwrap_or_else(|| "server".into());
    // Before the server's own parsing: `status` is a command, not a value of a flag.
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|first| first == "status") {
        return crate::status_command::run(&program, args);
    }
    match start(&program, setup, serves_async) {
        Ok(code) => code,
        Err(e) => {
            e.report(&program);
            e.exit_code()
        }
    }
}

fn start<R, E, F>(program: &str, setup: F, serves_async: bool) -> Result<i32, StartError>
where
    R: Application,
    E: Display,
    F: FnOnce(&Config) -> Result<R, E>,
{
    let mut cli = match Cli::parse_from_env() {
        Ok(cli) => cli,
        // clap prints its own message and exits 2 (0 for --help and --version).
        Err(e) => e.exit(),
    };
    cli.inherits_listeners = inherit::will_inherit();
    cli.serves_async = serves_async;
    let cfg = Config::load(&cli).map_err(StartError::Config)?;
    if cfg.check_config {
        // The application's setup runs too: a binary upgrade checks the new binary this way
        // before it replaces the running one.
        setup(&cfg).map_err(|e| StartError::CheckSetup(e.to_string()))?;
        println!("{program}: configuration ok");
        return Ok(0);
    }
    logging::init(cfg.log_format, cfg.log_file.as_deref()).map_err(StartError::Logging)?;
    let mut inherited = inherit::inherit().map_err(StartError::Inherit)?;
    let listeners = listen(&cfg, std::mem::take(&mut inherited.listeners))?;
    check_open_files(&cfg, listeners.len());
    if let Some(path) = &cfg.pid_file {
        write_pid_file(path)?;
    }
    let pid_file = cfg.pid_file.clone();
    let master = setup(&cfg)
        .map_err(|e| StartError::Setup(e.to_string()))
        .and_then(|app| {
            Master::new(cli, cfg, Arc::new(app), listeners, inherited).map_err(StartError::Master)
        });
    match master {
        // The master removes the pid file when it stops.
        Ok(master) => Ok(master.run()),
        Err(e) => {
            if let Some(path) = pid_file {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// The inherited listeners, plus one bound for each configured address none of them has.
fn listen(cfg: &Config, mut listeners: Vec<Listener>) -> Result<Vec<Listener>, StartError> {
    for addr in &cfg.listen {
        if listeners.iter().any(|l| l.addr() == addr) {
            continue;
        }
        let bound =
            Listener::bind(addr, cfg.backlog, &cfg.socket).map_err(|error| StartError::Listen {
                addr: addr.clone(),
                error,
            })?;
        listeners.push(bound);
    }
    Ok(listeners)
}

/// Files a process holds besides its sockets: stdio, the log file, the scoreboard, the event
/// loop's epoll, eventfd and signalfd, and room for the application's own files.
const RESERVED_FILES: u64 = 64;

/// The open-file limits a configuration needs: the master holds every listener and, during a
/// reload, a channel to each worker of two generations; a worker holds the listeners, its
/// channel and up to fcgi's `max_conns` connections.
fn open_files_needed(workers: usize, listeners: usize) -> (u64, u64) {
    let listeners = listeners as u64;
    let master = listeners + 2 * workers as u64 + RESERVED_FILES;
    let worker = listeners + 1 + fcgi::DEFAULT_MAX_CONNS as u64 + RESERVED_FILES;
    (master, worker)
}

/// What to raise, when the master's soft RLIMIT_NOFILE (`own`) or the workers' limit (their
/// `rlimit_files`, else the master's) is below what the configuration needs: one line each.
fn open_files_warnings(cfg: &Config, listeners: usize, own: u64) -> Vec<String> {
    let (master, worker) = open_files_needed(cfg.pool.workers, listeners);
    let mut warnings = Vec::new();
    if own < master {
        warnings.push(format!(
            "the master's open-file limit is {own}, but {} workers on {listeners} listeners need \
             up to {master} during a reload: raise LimitNOFILE= (or ulimit -n) to at least {master}",
            cfg.pool.workers
        ));
    }
    let (limit, raise) = match cfg.process.rlimit_files {
        Some(n) => (n, "rlimit_files"),
        None => (own, "LimitNOFILE= (or ulimit -n, or set rlimit_files)"),
    };
    if limit < worker {
        warnings.push(format!(
            "a worker's open-file limit is {limit}, but it may hold {} connections and \
             {listeners} listeners: raise {raise} to at least {worker}",
            fcgi::DEFAULT_MAX_CONNS
        ));
    }
    warnings
}

/// Warns, without refusing to start, when the file limits cannot hold what the configuration
/// allows at its peak: a pool that serves well below it would be refused for nothing.
fn check_open_files(cfg: &Config, listeners: usize) {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return;
    };
    for warning in open_files_warnings(cfg, listeners, soft) {
        tracing::warn!("{warning}");
    }
}

fn write_pid_file(path: &Path) -> Result<(), StartError> {
    std::fs::write(path, format!("{}\n", std::process::id())).map_err(|error| StartError::PidFile {
        path: path.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(message: &str) -> io::Error {
        io::Error::other(message.to_string())
    }

    #[test]
    fn a_bad_configuration_exits_2_and_every_other_failure_1() {
        let config = StartError::Config(ConfigError::Value {
            key: "workers",
            value: "0".into(),
            expected: "a number from 1".into(),
        });
        assert_eq!(config.exit_code(), 2);
        let others = [
            StartError::CheckSetup("no database".into()),
            StartError::Logging(io("denied")),
            StartError::Inherit(io("fd 3 is not open")),
            StartError::Listen {
                addr: ListenAddr::Unix("/run/app.sock".into()),
                error: io("in use"),
            },
            StartError::PidFile {
                path: "/run/app.pid".into(),
                error: io("denied"),
            },
            StartError::Setup("no database".into()),
            StartError::Master(io("no memory")),
        ];
        for e in others {
            assert_eq!(e.exit_code(), 1, "{e}");
        }
    }

    #[test]
    fn open_file_warnings_say_what_to_raise_and_to_what() {
        // `--allow-root`: the tests may run as root; the limits do not depend on the account.
        let cli = Cli::parse_args([
            "app",
            "--listen",
            "127.0.0.1:9000",
            "--workers",
            "100",
            "--allow-root",
        ])
        .expect("valid");
        let cfg = Config::load(&cli).expect("valid");
        let (master, worker) = open_files_needed(100, 2);
        assert_eq!(master, 2 + 200 + RESERVED_FILES);
        assert_eq!(worker, 2 + 1 + 1024 + RESERVED_FILES);
        assert!(open_files_warnings(&cfg, 2, 1 << 20).is_empty());
        let low = open_files_warnings(&cfg, 2, 200);
        assert_eq!(low.len(), 2, "{low:?}");
        assert!(
            low[0].contains("raise LimitNOFILE= (or ulimit -n) to at least 266"),
            "{}",
            low[0]
        );
        assert!(low[1].contains("at least 1091"), "{}", low[1]);
        let mut cfg = cfg;
        cfg.process.rlimit_files = Some(100);
        let workers = open_files_warnings(&cfg, 2, 1 << 20);
        assert_eq!(
            workers,
            vec![
                "a worker's open-file limit is 100, but it may hold 1024 connections and 2 \
                  listeners: raise rlimit_files to at least 1091"
                    .to_string()
            ]
        );
    }

    #[test]
    fn messages_name_the_thing_and_the_cause() {
        let listen = StartError::Listen {
            addr: ListenAddr::Unix("/run/app.sock".into()),
            error: io("address in use"),
        };
        assert_eq!(
            listen.to_string(),
            "cannot listen on unix:/run/app.sock: address in use"
        );
        let pid = StartError::PidFile {
            path: "/run/app.pid".into(),
            error: io("permission denied"),
        };
        assert_eq!(
            pid.to_string(),
            "cannot write pid file /run/app.pid: permission denied"
        );
        assert_eq!(
            StartError::Setup("APP_EXAMPLE_FAIL_SETUP".into()).to_string(),
            "application setup failed: APP_EXAMPLE_FAIL_SETUP"
        );
        assert_eq!(
            StartError::CheckSetup("no database".into()).to_string(),
            "configuration ok, but the application setup failed: no database"
        );
    }
}
