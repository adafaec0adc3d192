//! Configuration: one TOML file and command-line flags over it, validated once into typed
//! values. Every flag has the same key in the file (`--max-requests` is `max_requests`); flags
//! win. Unknown keys are errors, and every error names the key, the value and what is accepted.
//!
//! - `raw`: the keys, declared once as [`Cli`] (flags and file), their defaults and `--help`.
//! - `parse`: the value syntaxes (durations, sizes, addresses, modes, user and group names).
//! - `clients`: `allowed_clients`, the TCP peers served.
//! - `process`: what a worker becomes after the fork (account, environment, limits).
//! - here: [`Config`], [`ConfigError`], [`Config::load`] and one validator per group of keys.

mod clients;
mod parse;
mod process;
mod program;
mod raw;
mod tasks;

use std::fmt;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use clients::AllowedClients;
use parse::{account_id, parse_duration, parse_mode, parse_size, Account};
pub use parse::{ListenAddr, Rlimit};
pub use process::{Identity, Scheduling, WorkerProcess};
pub use program::Program;
use raw::*;
pub use raw::{Cli, FD_RESERVE};
// The lease's settings are read only by the task process's lease (feature `postgres`).
#[cfg_attr(not(feature = "postgres"), allow(unused_imports))]
pub use tasks::LeaseConfig;
pub use tasks::{TaskConfig, TaskMode};

/// How the pool is sized, like PHP-FPM's `pm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Exactly `workers` processes.
    Static,
    /// Between `min_spare` and `max_spare` idle workers, at most `workers` in all.
    Dynamic,
    /// None until requests arrive; idle workers are reaped after `idle_timeout`.
    OnDemand,
}

/// The validated pool settings the policies read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Process manager mode.
    pub mode: PoolMode,
    /// The maximum number of workers (the exact number for `static`).
    pub workers: usize,
    /// Workers started at boot (`dynamic` only).
    pub start_workers: usize,
    /// Spawn when fewer idle workers than this (`dynamic`).
    pub min_spare: usize,
    /// Stop idle workers above this many (`dynamic`).
    pub max_spare: usize,
    /// Upper bound of the doubling spawn rate per tick (default 32, like PHP-FPM).
    pub max_spawn_rate: usize,
    /// `ondemand`: reap a worker idle longer than this.
    pub idle_timeout: Duration,
}

/// Ownership and mode of unix socket files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// Permission bits.
    pub mode: u32,
    /// Owner uid.
    pub owner: Option<u32>,
    /// Group gid.
    pub group: Option<u32>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listening addresses (empty only when systemd passes sockets).
    pub listen: Vec<ListenAddr>,
    /// Listen backlog.
    pub backlog: i32,
    /// Unix socket file mode and ownership.
    pub socket: SocketOptions,
    /// Pool sizing.
    pub pool: PoolConfig,
    /// Requests after which a worker recycles itself (0: never).
    pub max_requests: u64,
    /// Extra requests, up to this many, drawn per worker.
    pub max_requests_jitter: u64,
    /// Resident memory above which a worker recycles itself.
    pub max_rss: Option<u64>,
    /// A request running longer ends with its worker.
    pub request_timeout: Option<Duration>,
    /// SIGTERM to SIGKILL delay for a timed-out worker.
    pub request_timeout_grace: Duration,
    /// Graceful stop bound.
    pub shutdown_timeout: Duration,
    /// Idle kept-alive connection bound.
    pub keepalive_timeout: Duration,
    /// Requests one worker runs at once.
    pub max_requests_in_flight: NonZeroUsize,
    /// Time a connection has to send a complete request.
    pub request_read_timeout: Duration,
    /// Connections one worker serves at once; `None`: its open-file limit minus
    /// [`raw::FD_RESERVE`], decided in the worker.
    pub max_connections: Option<NonZeroUsize>,
    /// The TCP peers served; `None`: anyone.
    pub allowed_clients: Option<AllowedClients>,
    /// A request waiting this long for a room is answered 503.
    pub queue_timeout: Option<Duration>,
    /// Requests one worker holds waiting for a room; more are answered 503 at once.
    pub max_queue: Option<usize>,
    /// Pid file.
    pub pid_file: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log file (stderr when none).
    pub log_file: Option<PathBuf>,
    /// Status page path.
    pub status_path: Option<String>,
    /// Ping path.
    pub ping_path: Option<String>,
    /// Ping answer body.
    pub ping_response: String,
    /// Slow request threshold.
    pub slow_request_timeout: Option<Duration>,
    /// One log line per request.
    pub access_log: bool,
    /// The pool's name.
    pub pool_name: String,
    /// Validate and exit.
    pub check_config: bool,
    /// What each worker becomes after the fork: its account, environment and limits.
    pub process: WorkerProcess,
    /// Background tasks: where their host lock files live.
    pub task_lock_dir: PathBuf,
    /// Background tasks, as configured (`[tasks.NAME]`).
    pub tasks: Vec<TaskConfig>,
    /// The foreign FastCGI program each worker runs (`fcgi-pool`).
    pub program: Option<Program>,
}

/// A configuration value that is not acceptable, or a file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// A key with a bad value.
    Value {
        /// The key (flag `--key-name` is key `key_name`).
        key: &'static str,
        /// The value given.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// The file could not be read or parsed (unknown keys included).
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Workers would run as root and `allow_root` does not say so.
    RunsAsRoot {
        /// The `user` that is root; `None`: no `user`, and the master is root.
        user: Option<String>,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Value {
                key,
                value,
                expected,
            } => {
                write!(
                    f,
                    "invalid value \"{value}\" for key \"{key}\": expected {expected}"
                )
            }
            ConfigError::File { path, message } => {
                write!(f, "config file {}: {}", path.display(), message.trim())
            }
            ConfigError::RunsAsRoot { user } => {
                match user {
                    Some(user) => write!(f, "workers would run as root: user \"{user}\" is uid 0")?,
                    None => write!(
                        f,
                        "workers would run as root: the master runs as root and no user is set"
                    )?,
                }
                write!(
                    f,
                    "; set user = \"nobody\" (--user nobody) or another account, or opt in with \
                     allow_root = true (--allow-root)"
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

fn bad(key: &'static str, value: impl fmt::Display, expected: impl Into<String>) -> ConfigError {
    ConfigError::Value {
        key,
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Parses the value of `key` with one of the `parse` functions, whose "expected ..." becomes
/// the error's `expected`.
fn value<T>(
    key: &'static str,
    value: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    parse(value).map_err(|e| bad(key, value, e.trim_start_matches("expected ")))
}

/// [`value`] for a key that may be absent.
fn parsed<T>(
    key: &'static str,
    v: Option<&str>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, ConfigError> {
    v.map(|s| value(key, s, parse)).transpose()
}

impl Config {
    /// Reads the file named by `--config` (if any), applies the flags over it, and validates.
    /// Called again on reload with the same flags.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => Cli::default(),
        };
        let cfg = Config::merge(cli, file)?;
        process::check_privileges(&cfg.process, nix::unistd::geteuid().as_raw())?;
        Ok(cfg)
    }

    /// Lays the flags over the file's keys, then validates each group of keys in turn.
    pub(crate) fn merge(flags: &Cli, file: Cli) -> Result<Config, ConfigError> {
        let raw = flags.clone().over(file);
        let listen = listen(&raw)?;
        let (backlog, socket) = socket(&raw)?;
        let pool = pool(&raw)?;
        let recycling = recycling(&raw)?;
        let timeouts = timeouts(&raw)?;
        let logging = logging(&raw)?;
        let status = status(&raw)?;
        let process = process::worker_process(&raw, |name| std::env::var(name).ok())?;
        let allowed_clients =
            allowed_clients(&raw, std::env::var(WEB_SERVER_ADDRS).ok().as_deref())?;
        // Socket files belong to the workers' account unless said otherwise, as PHP-FPM's
        // `listen.owner` and `listen.group` default to its `user` and `group`.
        let socket = SocketOptions {
            owner: socket.owner.or(process.identity.as_ref().map(|id| id.uid)),
            group: socket.group.or(process.identity.as_ref().map(|id| id.gid)),
            ..socket
        };
        let tasks = tasks::tasks(&raw)?;
        Ok(Config {
            listen,
            backlog,
            socket,
            pool,
            max_requests: recycling.max_requests,
            max_requests_jitter: recycling.max_requests_jitter,
            max_rss: recycling.max_rss,
            max_requests_in_flight: recycling.max_requests_in_flight,
            request_timeout: timeouts.request,
            request_timeout_grace: timeouts.request_grace,
            slow_request_timeout: timeouts.slow_request,
            shutdown_timeout: timeouts.shutdown,
            keepalive_timeout: timeouts.keepalive,
            request_read_timeout: timeouts.request_read,
            max_connections: recycling.max_connections,
            allowed_clients,
            queue_timeout: timeouts.queue,
            max_queue: raw.max_queue.or(DEFAULT_MAX_QUEUE),
            pid_file: logging.pid_file,
            log_format: logging.format,
            log_file: logging.file,
            access_log: logging.access_log,
            status_path: status.status_path,
            ping_path: status.ping_path,
            ping_response: status.ping_response,
            pool_name: status.pool_name,
            check_config: raw.check_config,
            process,
            task_lock_dir: tasks.lock_dir,
            tasks: tasks.tasks,
            program: program::program(&raw.program, std::env::var("PATH").ok().as_deref())?,
        })
    }
}

/// `listen`: at least one address, unless the sockets are inherited.
fn listen(raw: &Cli) -> Result<Vec<ListenAddr>, ConfigError> {
    let listen = raw
        .listen
        .iter()
        .map(|s| value("listen", s, str::parse::<ListenAddr>))
        .collect::<Result<Vec<_>, _>>()?;
    if listen.is_empty() && !raw.inherits_listeners {
        return Err(bad(
            "listen",
            "",
            "at least one address: give --listen ADDR or listen = [\"unix:/run/app.sock\"]",
        ));
    }
    Ok(listen)
}

/// The variable the FastCGI spec (section 3.2) defines for this: a comma-separated list of
/// the web servers' addresses. Used when `allowed_clients` is not set, so a pool started by a
/// spawner that sets it is as closed as the spec means.
pub const WEB_SERVER_ADDRS: &str = "FCGI_WEB_SERVER_ADDRS";

/// `allowed_clients`, else `web_server_addrs` (the master's [`WEB_SERVER_ADDRS`]); `None`:
/// anyone may connect.
fn allowed_clients(
    raw: &Cli,
    web_server_addrs: Option<&str>,
) -> Result<Option<AllowedClients>, ConfigError> {
    let (key, entries): (&'static str, Vec<String>) = if !raw.allowed_clients.is_empty() {
        ("allowed_clients", raw.allowed_clients.clone())
    } else {
        match web_server_addrs.map(str::trim).filter(|v| !v.is_empty()) {
            Some(v) => (
                WEB_SERVER_ADDRS,
                v.split(',').map(|s| s.trim().to_string()).collect(),
            ),
            None => return Ok(None),
        }
    };
    AllowedClients::parse(&entries)
        .map(Some)
        .map_err(|(entry, why)| bad(key, entry, why))
}

/// `backlog` and the unix socket files' `socket_mode`, `socket_owner`, `socket_group`.
fn socket(raw: &Cli) -> Result<(i32, SocketOptions), ConfigError> {
    let backlog = raw.backlog.unwrap_or(DEFAULT_BACKLOG);
    if backlog < 1 {
        return Err(bad(
            "backlog",
            backlog,
            format!("a positive number (default {DEFAULT_BACKLOG})"),
        ));
    }
    let mode = parsed("socket_mode", raw.socket_mode.as_deref(), parse_mode)?
        .unwrap_or(DEFAULT_SOCKET_MODE);
    let owner = parsed("socket_owner", raw.socket_owner.as_deref(), |v| {
        account_id(v, Account::User)
    })?;
    let group = parsed("socket_group", raw.socket_group.as_deref(), |v| {
        account_id(v, Account::Group)
    })?;
    Ok((backlog, SocketOptions { mode, owner, group }))
}

/// `pm`, `workers`, the dynamic spare bounds, `max_spawn_rate` and `idle_timeout`.
fn pool(raw: &Cli) -> Result<PoolConfig, ConfigError> {
    let pm = raw.pm.as_deref().unwrap_or(DEFAULT_PM);
    let mode = match pm {
        "static" => PoolMode::Static,
        "dynamic" => PoolMode::Dynamic,
        "ondemand" => PoolMode::OnDemand,
        _ => return Err(bad("pm", pm, "static, dynamic or ondemand")),
    };
    // A machine that cannot say how many CPUs it has gets the pool of one CPU.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = raw.workers.unwrap_or(cpus * DEFAULT_WORKERS_PER_CPU);
    if workers == 0 {
        return Err(bad("workers", workers, "at least 1"));
    }
    // Spare bounds above the pool's size could never be met, so they are clamped, not refused.
    let min_spare = raw.min_spare.unwrap_or(DEFAULT_MIN_SPARE).min(workers);
    let max_spare = raw.max_spare.unwrap_or(DEFAULT_MAX_SPARE).min(workers);
    let start_workers = raw
        .start_workers
        .unwrap_or(min_spare + max_spare.saturating_sub(min_spare) / 2);
    if mode == PoolMode::Dynamic {
        check_spares(min_spare, max_spare, start_workers, workers)?;
    }
    let max_spawn_rate = raw.max_spawn_rate.unwrap_or(DEFAULT_MAX_SPAWN_RATE);
    if max_spawn_rate == 0 {
        return Err(bad(
            "max_spawn_rate",
            0,
            format!("at least 1 (default {DEFAULT_MAX_SPAWN_RATE})"),
        ));
    }
    let idle_timeout = parsed("idle_timeout", raw.idle_timeout.as_deref(), parse_duration)?
        .unwrap_or(DEFAULT_IDLE_TIMEOUT);
    Ok(PoolConfig {
        mode,
        workers,
        start_workers,
        min_spare,
        max_spare,
        max_spawn_rate,
        idle_timeout,
    })
}

/// `pm = dynamic` needs `1 <= min_spare <= max_spare` and `min_spare <= start_workers <= workers`.
fn check_spares(
    min_spare: usize,
    max_spare: usize,
    start_workers: usize,
    workers: usize,
) -> Result<(), ConfigError> {
    if min_spare == 0 {
        return Err(bad("min_spare", min_spare, "at least 1 with pm = dynamic"));
    }
    if max_spare < min_spare {
        return Err(bad(
            "max_spare",
            max_spare,
            format!("at least min_spare ({min_spare})"),
        ));
    }
    if start_workers < min_spare || start_workers > workers {
        return Err(bad(
            "start_workers",
            start_workers,
            format!("between min_spare ({min_spare}) and workers ({workers})"),
        ));
    }
    Ok(())
}

/// What makes a worker recycle itself, and how much it runs at once.
struct Recycling {
    max_requests: u64,
    max_requests_jitter: u64,
    max_rss: Option<u64>,
    max_requests_in_flight: NonZeroUsize,
    max_connections: Option<NonZeroUsize>,
}

/// `max_requests`, `max_requests_jitter`, `max_rss`, `max_requests_in_flight` and
/// `max_connections`.
fn recycling(raw: &Cli) -> Result<Recycling, ConfigError> {
    let max_requests = raw.max_requests.unwrap_or(DEFAULT_MAX_REQUESTS);
    let in_flight = raw.max_requests_in_flight.unwrap_or(if raw.serves_async {
        DEFAULT_SERVICE_MAX_REQUESTS_IN_FLIGHT
    } else {
        DEFAULT_MAX_REQUESTS_IN_FLIGHT
    });
    Ok(Recycling {
        max_requests,
        max_requests_jitter: raw
            .max_requests_jitter
            .unwrap_or(max_requests / DEFAULT_JITTER_DIVISOR),
        max_rss: parsed("max_rss", raw.max_rss.as_deref(), parse_size)?,
        max_requests_in_flight: NonZeroUsize::new(in_flight)
            .ok_or_else(|| bad("max_requests_in_flight", in_flight, "at least 1"))?,
        max_connections: match raw.max_connections {
            None => None,
            Some(n) => {
                Some(NonZeroUsize::new(n).ok_or_else(|| bad("max_connections", n, "at least 1"))?)
            }
        },
    })
}

/// The time bounds on requests, connections and the graceful stop.
struct Timeouts {
    request: Option<Duration>,
    request_grace: Duration,
    slow_request: Option<Duration>,
    shutdown: Duration,
    keepalive: Duration,
    request_read: Duration,
    queue: Option<Duration>,
}

/// `request_timeout`, `request_timeout_grace`, `slow_request_timeout`, `shutdown_timeout`,
/// `keepalive_timeout`, `request_read_timeout`, `queue_timeout`.
fn timeouts(raw: &Cli) -> Result<Timeouts, ConfigError> {
    let duration =
        |key: &'static str, v: &Option<String>| parsed(key, v.as_deref(), parse_duration);
    Ok(Timeouts {
        request: duration("request_timeout", &raw.request_timeout)?,
        request_grace: duration("request_timeout_grace", &raw.request_timeout_grace)?
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT_GRACE),
        slow_request: duration("slow_request_timeout", &raw.slow_request_timeout)?,
        shutdown: duration("shutdown_timeout", &raw.shutdown_timeout)?
            .unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
        keepalive: duration("keepalive_timeout", &raw.keepalive_timeout)?
            .unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT),
        request_read: match duration("request_read_timeout", &raw.request_read_timeout)? {
            Some(d) if d.is_zero() => {
                return Err(bad("request_read_timeout", "0", "a positive duration"))
            }
            d => d.unwrap_or(DEFAULT_REQUEST_READ_TIMEOUT),
        },
        queue: match duration("queue_timeout", &raw.queue_timeout)? {
            Some(d) if d.is_zero() => {
                return Err(bad(
                    "queue_timeout",
                    "0",
                    "a positive duration (max_queue = 0 refuses waiting at all)",
                ))
            }
            d => d.or(DEFAULT_QUEUE_TIMEOUT),
        },
    })
}

/// Where and how the master and the workers log, and where the pid goes.
struct Logging {
    pid_file: Option<PathBuf>,
    format: LogFormat,
    file: Option<PathBuf>,
    access_log: bool,
}

/// `pid_file`, `log_format`, `log_file`, `access_log`.
fn logging(raw: &Cli) -> Result<Logging, ConfigError> {
    let format = raw.log_format.as_deref().unwrap_or(DEFAULT_LOG_FORMAT);
    let format = match format {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        _ => return Err(bad("log_format", format, "text or json")),
    };
    Ok(Logging {
        pid_file: raw.pid_file.clone(),
        format,
        file: raw.log_file.clone(),
        access_log: raw.access_log.unwrap_or(DEFAULT_ACCESS_LOG),
    })
}

/// What the worker answers itself, without the application.
struct Status {
    status_path: Option<String>,
    ping_path: Option<String>,
    ping_response: String,
    pool_name: String,
}

/// `status_path`, `ping_path` (each a path starting with `/`), `ping_response`, `pool_name`.
fn status(raw: &Cli) -> Result<Status, ConfigError> {
    let path = |key: &'static str, v: &Option<String>| match v {
        Some(p) if !p.starts_with('/') => Err(bad(key, p, "a path starting with /, like /status")),
        other => Ok(other.clone()),
    };
    Ok(Status {
        status_path: path("status_path", &raw.status_path)?,
        ping_path: path("ping_path", &raw.ping_path)?,
        ping_response: raw
            .ping_response
            .clone()
            .unwrap_or_else(|| DEFAULT_PING_RESPONSE.into()),
        pool_name: raw
            .pool_name
            .clone()
            .unwrap_or_else(|| DEFAULT_POOL_NAME.into()),
    })
}

/// The file's keys, unvalidated (the `status` command reads its address and path).
pub(crate) fn read_file(path: &Path) -> Result<Cli, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
