//! The operator's keys, declared once: [`Cli`] is both the command line (clap) and the TOML file
//! (serde), so a key's name, type and doc (its `--help` line) are written in one place, and the
//! file and the flags cannot disagree about which keys exist. Every field is optional here; the
//! defaults are the `DEFAULT_*` constants below, applied after the flags are laid over the file
//! (a default given to clap would hide the file's value), and shown in `--help` from the same
//! constants by [`with_defaults`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser};
use serde::Deserialize;

use super::parse::show_duration;

/// Listen backlog: nginx's (and Redis's) default on Linux, so a pool behind nginx queues as
/// much as nginx itself would. The kernel caps it at `net.core.somaxconn` (4096 since Linux
/// 5.4, 128 before), silently.
pub const DEFAULT_BACKLOG: i32 = 511;
/// Unix socket file mode: owner and group (nginx's group) may connect, others may not, as
/// PHP-FPM's `listen.mode = 0660`.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Process manager: `static`, like Gunicorn, for memory that does not change with load.
pub const DEFAULT_PM: &str = "static";
/// Workers per CPU when `workers` is not given: one computing while another waits on I/O, the
/// Gunicorn rule of thumb (its `2 x cores + 1`, without the one).
pub const DEFAULT_WORKERS_PER_CPU: usize = 2;
/// `dynamic`: spawn when fewer workers than this are idle (`pm.min_spare_servers` in PHP-FPM's
/// shipped `www.conf`).
pub const DEFAULT_MIN_SPARE: usize = 1;
/// `dynamic`: stop idle workers above this many (`pm.max_spare_servers` in PHP-FPM's shipped
/// `www.conf`; its `start_servers` is the midpoint rule `start_workers` uses too).
pub const DEFAULT_MAX_SPARE: usize = 3;
/// Upper bound of the spawn rate, which doubles per tick while needed: PHP-FPM's
/// `pm.max_spawn_rate` default.
pub const DEFAULT_MAX_SPAWN_RATE: usize = 32;
/// `ondemand`: stop a worker idle this long (PHP-FPM's `pm.process_idle_timeout`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests before a worker recycles itself: 0, never, as PHP-FPM's `pm.max_requests`; leaks
/// are the application's to opt into fixing this way.
pub const DEFAULT_MAX_REQUESTS: u64 = 0;
/// The default jitter is `max_requests` divided by this: a tenth spreads the restarts of
/// workers started together over a tenth of their lifetime.
pub const DEFAULT_JITTER_DIVISOR: u64 = 10;
/// SIGTERM to SIGKILL for a worker past `request_timeout`: time to log and unwind, short next
/// to any timeout worth setting.
pub const DEFAULT_REQUEST_TIMEOUT_GRACE: Duration = Duration::from_secs(2);
/// Graceful stop bound: Gunicorn's `graceful_timeout`, and well inside systemd's default
/// `TimeoutStopSec` of 90 s, so the pool finishes before systemd kills it.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle kept-alive connection bound: above nginx's 60 s `keepalive_timeout`, so nginx closes an
/// idle upstream connection first and never writes to one we just closed.
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(75);
/// How long a connection may take to send a complete request (from accept for a new one,
/// from its first byte for a kept-alive one) before it is closed: nginx writes a request
/// within microseconds of connecting, and 10 s still covers a frontend stalled by a slow
/// client's headers (nginx reads the whole header block before it connects upstream).
pub const DEFAULT_REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors a worker keeps for itself when `max_connections` is derived from its open-file
/// limit: the listeners, the runtime's epoll and wake-up fds, the scoreboard, the log, the
/// master's channel, and files the application opens.
pub const FD_RESERVE: usize = 64;
/// Requests one worker runs at once: 1, the classic prefork model (one request per process).
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: usize = 1;
/// Requests one worker runs at once when the application is an async service (`serve`): a
/// waiting future costs a few kilobytes, not a thread, so a worker holds hundreds; 256 covers
/// 1,000 requests a second per worker that each wait 250 ms, while the memory a worker can be
/// made to buffer (each request's body and output channels, at most a few hundred kilobytes)
/// stays bounded.
pub const DEFAULT_SERVICE_MAX_REQUESTS_IN_FLIGHT: usize = 256;
/// Requests one worker may hold waiting for a room: no bound, as before (a waiting request
/// costs its connection and its params, already bounded), so a pool upgraded to this version
/// keeps behaving the same; set `max_queue` (and `queue_timeout`) to shed load with 503s.
pub const DEFAULT_MAX_QUEUE: Option<usize> = None;
/// How long a request may wait for a room before it is answered 503: no bound by default, for
/// the same reason as [`DEFAULT_MAX_QUEUE`]; nginx's own `fastcgi_read_timeout` (60 s) still
/// ends the wait for its client.
pub const DEFAULT_QUEUE_TIMEOUT: Option<Duration> = None;
/// Log format: `text`, for people reading a terminal; `json` is for collectors.
pub const DEFAULT_LOG_FORMAT: &str = "text";
/// The body of the ping answer: PHP-FPM's `ping.response`.
pub const DEFAULT_PING_RESPONSE: &str = "pong";
/// The pool's name on the status page: PHP-FPM's default pool, so dashboards match.
pub const DEFAULT_POOL_NAME: &str = "www";
/// Access log: off, since nginx in front already writes one.
pub const DEFAULT_ACCESS_LOG: bool = false;
/// Workers as root: refused unless asked for, as PHP-FPM's `--allow-to-run-as-root`; one
/// application bug would otherwise own the machine.
pub const DEFAULT_ALLOW_ROOT: bool = false;
/// Workers inherit the master's environment (PHP-FPM clears it): a Rust application is
/// configured through its environment (`DATABASE_URL`, `RUST_LOG`), read by `init_worker` and
/// by handlers as well as by the setup, and systemd's `Environment=` already decides what the
/// master has. `clear_env = true` gives PHP-FPM's behaviour.
pub const DEFAULT_CLEAR_ENV: bool = false;

/// The command line every application built on this library gets, and the keys of its TOML
/// file (the same names, in snake_case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Parser, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(
    version,
    about = "A prefork FastCGI application server",
    long_about = None,
    after_help = "`status` as the first argument prints a running pool's status page instead \
                  (see `status --help`)."
)]
pub struct Cli {
    /// TOML configuration file; flags override its keys.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where to listen: `unix:/path/app.sock`, `127.0.0.1:9000` or `[::1]:9000` (repeatable).
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub listen: Vec<String>,
    /// Listen backlog.
    #[arg(long, value_name = "N")]
    pub backlog: Option<i32>,
    /// Mode of unix socket files, octal.
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Owner of unix socket files (name or uid).
    #[arg(long, value_name = "USER")]
    pub socket_owner: Option<String>,
    /// Group of unix socket files (name or gid).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Process manager: static, dynamic or ondemand.
    #[arg(long, value_name = "MODE")]
    pub pm: Option<String>,
    /// Worker processes (the maximum for dynamic and ondemand).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// dynamic: workers started at boot.
    #[arg(long, value_name = "N")]
    pub start_workers: Option<usize>,
    /// dynamic: spawn when fewer idle workers than this.
    #[arg(long, value_name = "N")]
    pub min_spare: Option<usize>,
    /// dynamic: stop idle workers above this many.
    #[arg(long, value_name = "N")]
    pub max_spare: Option<usize>,
    /// dynamic and ondemand: most workers spawned per tick.
    #[arg(long, value_name = "N")]
    pub max_spawn_rate: Option<usize>,
    /// ondemand: stop a worker idle this long.
    #[arg(long, value_name = "DUR")]
    pub idle_timeout: Option<String>,
    /// Recycle a worker after this many requests, 0 = never.
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Up to this many extra requests per worker, so they recycle at different times.
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<u64>,
    /// Recycle a worker whose resident memory exceeds this (512m, 1g).
    #[arg(long, value_name = "BYTES")]
    pub max_rss: Option<String>,
    /// End a request running longer than this by replacing its worker (30s, 5m).
    #[arg(long, value_name = "DUR")]
    pub request_timeout: Option<String>,
    /// After a timeout's SIGTERM, SIGKILL the worker this much later.
    #[arg(long, value_name = "DUR")]
    pub request_timeout_grace: Option<String>,
    /// Log a request running longer than this, once.
    #[arg(long, value_name = "DUR")]
    pub slow_request_timeout: Option<String>,
    /// Graceful stop: kill what still runs after this.
    #[arg(long, value_name = "DUR")]
    pub shutdown_timeout: Option<String>,
    /// Close a kept-alive connection idle this long; keep it above nginx's 60 s.
    #[arg(long, value_name = "DUR")]
    pub keepalive_timeout: Option<String>,
    /// Requests one worker runs at once.
    #[arg(long, value_name = "N")]
    pub max_requests_in_flight: Option<usize>,
    /// Close a connection that takes longer than this to send a complete request.
    #[arg(long, value_name = "DUR")]
    pub request_read_timeout: Option<String>,
    /// Connections one worker serves at once (FCGI_MAX_CONNS); more wait in the listen queue.
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// TCP peers allowed to connect: addresses or CIDR ranges, IPv4 or IPv6 (repeatable;
    /// default: anyone, or FCGI_WEB_SERVER_ADDRS if set). Unix sockets are not filtered.
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// Answer 503 to a request that waited this long in a worker for a room.
    #[arg(long, value_name = "DUR")]
    pub queue_timeout: Option<String>,
    /// Answer 503 at once to a request that finds this many waiting in its worker.
    #[arg(long, value_name = "N")]
    pub max_queue: Option<usize>,
    /// Write the master's pid here.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log to this file instead of stderr (reopened on SIGUSR1).
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Answer the pool status page at this path.
    #[arg(long, value_name = "PATH")]
    pub status_path: Option<String>,
    /// Answer health checks at this path.
    #[arg(long, value_name = "PATH")]
    pub ping_path: Option<String>,
    /// The body of the ping answer.
    #[arg(long, value_name = "TEXT")]
    pub ping_response: Option<String>,
    /// Log one line per request (`--access-log=false` turns off what the file turned on).
    // A bare `--access-log` means true; `require_equals` keeps it from eating the next word.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub access_log: Option<bool>,
    /// The pool's name on the status page.
    #[arg(long, value_name = "NAME")]
    pub pool_name: Option<String>,
    /// Workers switch to this user (name or uid) after the fork; the master keeps its own.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Workers switch to this group (name or gid) instead of the user's own.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Let workers run as root: needed when the master runs as root without `user`, or when
    /// `user` is root.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub allow_root: Option<bool>,
    /// Workers start with no environment but `env`.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub clear_env: Option<bool>,
    /// A variable of the workers' environment; `$VAR`, `${VAR}` read the master's, `$$` is a
    /// `$` (repeatable; `[env]` in the file).
    #[arg(long, value_name = "NAME=VALUE", value_parser = env_pair)]
    #[serde(default, deserialize_with = "env_table")]
    pub env: Vec<(String, String)>,
    /// Workers' open-file limit (soft and hard) instead of the master's.
    #[arg(long, value_name = "N")]
    pub rlimit_files: Option<u64>,
    /// Workers' core-file size limit (soft and hard): a size (0, 1g) or unlimited.
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "number_or_text")]
    pub rlimit_core: Option<String>,
    /// Workers' CPU scheduling policy: `normal`, or `batch` (a woken worker does not preempt
    /// a running process: more throughput when nginx and the pool saturate the cores, later
    /// wake-ups when other programs keep them busy).
    #[arg(long, value_name = "POLICY")]
    pub cpu_scheduling: Option<String>,
    /// A FastCGI program to run as each worker's process (php-cgi, a Perl FCGI script, a
    /// libfcgi binary, fcgiwrap): its path (searched in `PATH` when it has no `/`) and its
    /// arguments, after `--` on the command line; `fcgi-pool` needs it.
    #[arg(last = true, value_name = "PROGRAM")]
    #[serde(default)]
    pub program: Vec<String>,
    /// Validate the configuration and exit: 0 when valid, 2 when not (1 when the application's
    /// setup fails).
    #[arg(long)]
    #[serde(skip)]
    pub check_config: bool,
    /// Listening sockets come from systemd or a previous master, so `listen` may be empty.
    #[arg(skip)]
    #[serde(skip)]
    pub inherits_listeners: bool,
    /// The application is an async service (`serve`): `max_requests_in_flight` defaults to
    /// [`DEFAULT_SERVICE_MAX_REQUESTS_IN_FLIGHT`].
    #[arg(skip)]
    #[serde(skip)]
    pub serves_async: bool,

    // Background tasks (README "Background tasks"): `[tasks.NAME]` and `[lease]` are file-only
    // sections, since a table of tables has no sensible flag form.
    /// Background tasks: directory of the per-task host lock files.
    #[arg(long, value_name = "DIR")]
    pub task_lock_dir: Option<PathBuf>,
    /// `[tasks.NAME]`: the tasks to run, by the names the application gives them.
    #[arg(skip)]
    #[serde(default)]
    pub tasks: std::collections::BTreeMap<String, TaskKeys>,
    /// `[lease]`: the PostgreSQL leader lease the tasks share unless one names its own.
    #[arg(skip)]
    #[serde(default)]
    pub lease: Option<LeaseKeys>,
}

/// `[tasks.NAME]`: one background task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskKeys {
    /// Run it (default true once the section exists).
    pub enabled: Option<bool>,
    /// `interval`: the next run starts `interval` after the previous one ended; `loop`: it
    /// starts at once, or `interval` after the previous one started.
    pub mode: Option<String>,
    /// The spacing of runs (see `mode`).
    pub interval: Option<String>,
    /// How long a stopping task may take to finish its run before it is killed.
    pub stop_timeout: Option<String>,
    /// A run longer than this is ended by killing the task process.
    pub run_timeout: Option<String>,
    /// The lease's connection string for this task, over `[lease] url`; `"none"` for none.
    pub lease: Option<String>,
}

/// `[lease]`: one leader across hosts through a PostgreSQL session advisory lock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseKeys {
    /// Connection string of a direct connection (not through a transaction pooler).
    pub url: Option<String>,
    /// How often the leader proves, with `SELECT 1`, that its session still holds the lock.
    pub check_interval: Option<String>,
    /// A check not answered within this means the lease is lost.
    pub check_timeout: Option<String>,
    /// The session's `idle_session_timeout`: how soon PostgreSQL drops a silent leader's
    /// session and so its lock. Must exceed `check_interval + check_timeout`.
    pub session_timeout: Option<String>,
    /// How often a standby tries to take the lease (jittered by half either way).
    pub retry: Option<String>,
}

/// Task mode: `interval`, so a run that takes long never piles up behind itself.
pub const DEFAULT_TASK_MODE: &str = "interval";
/// Task spacing: a second, "polling a queue once a second", the usual job of such a loop.
pub const DEFAULT_TASK_INTERVAL: Duration = Duration::from_secs(1);
/// A stopping task's bound: the same as the pool's `shutdown_timeout`, well inside systemd's
/// 90 s.
pub const DEFAULT_TASK_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lease check spacing: a second, so a leader that lost its session stops within about a
/// second plus `check_timeout`.
pub const DEFAULT_LEASE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Lease check bound: a round trip to a healthy database takes milliseconds; two seconds
/// allows a busy one without letting a black-holed connection go unnoticed for long.
pub const DEFAULT_LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// The lease session's `idle_session_timeout`: over three times `check_interval +
/// check_timeout`, so a leader that cannot check always stops well before PostgreSQL frees
/// its lock for a standby.
pub const DEFAULT_LEASE_SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// Standby retry spacing: a second, so a takeover takes about a second once the lock is free.
pub const DEFAULT_LEASE_RETRY: Duration = Duration::from_secs(1);

impl Cli {
    /// Parses the process's arguments, with the defaults shown in `--help`.
    pub fn parse_from_env() -> Result<Cli, clap::Error> {
        Cli::parse_args(std::env::args_os())
    }

    /// Parses `args` (the program name first) as [`Cli::parse_from_env`] parses the process's.
    pub fn parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = with_defaults(Cli::command()).try_get_matches_from(args)?;
        Cli::from_arg_matches(&matches)
    }

    /// Lays these flags over the file's keys: a key given as a flag wins, field by field. The
    /// struct literal names every field, so a new key does not compile until it is merged here.
    pub fn over(self, file: Cli) -> Cli {
        Cli {
            listen: if self.listen.is_empty() {
                file.listen
            } else {
                self.listen
            },
            backlog: self.backlog.or(file.backlog),
            socket_mode: self.socket_mode.or(file.socket_mode),
            socket_owner: self.socket_owner.or(file.socket_owner),
            socket_group: self.socket_group.or(file.socket_group),
            pm: self.pm.or(file.pm),
            workers: self.workers.or(file.workers),
            start_workers: self.start_workers.or(file.start_workers),
            min_spare: self.min_spare.or(file.min_spare),
            max_spare: self.max_spare.or(file.max_spare),
            max_spawn_rate: self.max_spawn_rate.or(file.max_spawn_rate),
            idle_timeout: self.idle_timeout.or(file.idle_timeout),
            max_requests: self.max_requests.or(file.max_requests),
            max_requests_jitter: self.max_requests_jitter.or(file.max_requests_jitter),
            max_rss: self.max_rss.or(file.max_rss),
            request_timeout: self.request_timeout.or(file.request_timeout),
            request_timeout_grace: self.request_timeout_grace.or(file.request_timeout_grace),
            slow_request_timeout: self.slow_request_timeout.or(file.slow_request_timeout),
            shutdown_timeout: self.shutdown_timeout.or(file.shutdown_timeout),
            keepalive_timeout: self.keepalive_timeout.or(file.keepalive_timeout),
            max_requests_in_flight: self.max_requests_in_flight.or(file.max_requests_in_flight),
            request_read_timeout: self.request_read_timeout.or(file.request_read_timeout),
            max_connections: self.max_connections.or(file.max_connections),
            allowed_clients: if self.allowed_clients.is_empty() {
                file.allowed_clients
            } else {
                self.allowed_clients
            },
            queue_timeout: self.queue_timeout.or(file.queue_timeout),
            max_queue: self.max_queue.or(file.max_queue),
            pid_file: self.pid_file.or(file.pid_file),
            log_format: self.log_format.or(file.log_format),
            log_file: self.log_file.or(file.log_file),
            status_path: self.status_path.or(file.status_path),
            ping_path: self.ping_path.or(file.ping_path),
            ping_response: self.ping_response.or(file.ping_response),
            access_log: self.access_log.or(file.access_log),
            pool_name: self.pool_name.or(file.pool_name),
            user: self.user.or(file.user),
            group: self.group.or(file.group),
            allow_root: self.allow_root.or(file.allow_root),
            clear_env: self.clear_env.or(file.clear_env),
            env: env_over(self.env, file.env),
            rlimit_files: self.rlimit_files.or(file.rlimit_files),
            rlimit_core: self.rlimit_core.or(file.rlimit_core),
            cpu_scheduling: self.cpu_scheduling.or(file.cpu_scheduling),
            task_lock_dir: self.task_lock_dir.or(file.task_lock_dir),
            // File-only sections.
            tasks: file.tasks,
            lease: file.lease,
            program: if self.program.is_empty() {
                file.program
            } else {
                self.program
            },
            // Not file keys: they describe this invocation.
            config: self.config,
            check_config: self.check_config,
            inherits_listeners: self.inherits_listeners,
            serves_async: self.serves_async,
        }
    }
}

/// `--env NAME=VALUE`: split at the first `=`; the value may be empty, the name not.
fn env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

/// `[env]` in the file: a table of names and string values.
fn env_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    let table = std::collections::BTreeMap::<String, String>::deserialize(d)?;
    Ok(table.into_iter().collect())
}

/// A key whose value is a number or a word (`rlimit_core = 0`, `rlimit_core = "unlimited"`).
fn number_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumberOrText {
        Number(u64),
        Text(String),
    }
    Ok(Some(match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => n.to_string(),
        NumberOrText::Text(t) => t,
    }))
}

/// The flags' variables over the file's, name by name: a name given as a flag wins, the
/// file's other names stay.
fn env_over(flags: Vec<(String, String)>, file: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = file
        .into_iter()
        .filter(|(name, _)| !flags.iter().any(|(n, _)| n == name))
        .collect();
    env.extend(flags);
    env
}

/// Each key's default as `--help` and the README show it, from the constants; keys that are
/// off unless given have none. Computed defaults are written as their formula.
pub fn defaults() -> Vec<(&'static str, String)> {
    let off = |on: bool| if on { "on" } else { "off" }.to_string();
    vec![
        ("backlog", DEFAULT_BACKLOG.to_string()),
        ("socket_mode", format!("{DEFAULT_SOCKET_MODE:04o}")),
        ("pm", DEFAULT_PM.to_string()),
        ("workers", format!("CPUs x {DEFAULT_WORKERS_PER_CPU}")),
        (
            "start_workers",
            "min_spare + (max_spare - min_spare) / 2".into(),
        ),
        ("min_spare", DEFAULT_MIN_SPARE.to_string()),
        ("max_spare", DEFAULT_MAX_SPARE.to_string()),
        ("max_spawn_rate", DEFAULT_MAX_SPAWN_RATE.to_string()),
        ("idle_timeout", show_duration(DEFAULT_IDLE_TIMEOUT)),
        ("max_requests", DEFAULT_MAX_REQUESTS.to_string()),
        (
            "max_requests_jitter",
            format!("max_requests / {DEFAULT_JITTER_DIVISOR}"),
        ),
        (
            "request_timeout_grace",
            show_duration(DEFAULT_REQUEST_TIMEOUT_GRACE),
        ),
        ("shutdown_timeout", show_duration(DEFAULT_SHUTDOWN_TIMEOUT)),
        (
            "keepalive_timeout",
            show_duration(DEFAULT_KEEPALIVE_TIMEOUT),
        ),
        (
            "max_requests_in_flight",
            DEFAULT_MAX_REQUESTS_IN_FLIGHT.to_string(),
        ),
        (
            "request_read_timeout",
            show_duration(DEFAULT_REQUEST_READ_TIMEOUT),
        ),
        ("max_connections", format!("open-file limit - {FD_RESERVE}")),
        ("allowed_clients", "anyone".to_string()),
        (
            "queue_timeout",
            DEFAULT_QUEUE_TIMEOUT.map_or("none".to_string(), show_duration),
        ),
        (
            "max_queue",
            DEFAULT_MAX_QUEUE.map_or("none".to_string(), |n| n.to_string()),
        ),
        ("log_format", DEFAULT_LOG_FORMAT.to_string()),
        ("ping_response", DEFAULT_PING_RESPONSE.to_string()),
        ("pool_name", DEFAULT_POOL_NAME.to_string()),
        ("access_log", off(DEFAULT_ACCESS_LOG)),
        ("allow_root", off(DEFAULT_ALLOW_ROOT)),
        ("clear_env", off(DEFAULT_CLEAR_ENV)),
        ("task_lock_dir", "the system's temporary directory".into()),
    ]
}

/// Appends `[default: ...]` to the help of each key that has one. The doc comment stays the
/// key's meaning and the constant its value; neither is copied into the other.
pub fn with_defaults(mut cmd: clap::Command) -> clap::Command {
    for (key, default) in defaults() {
        cmd = cmd.mut_arg(key, |arg| {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            arg.help(format!("{help} [default: {default}]"))
        });
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One sample value per key, as a TOML value and as the words after `--key` on a command
    /// line; `every_key_is_a_flag_and_a_file_key` fails when a key is missing here.
    const SAMPLES: &[(&str, &str, &[&str])] = &[
        ("listen", r#"["unix:/tmp/a.sock"]"#, &["unix:/tmp/a.sock"]),
        ("backlog", "7", &["7"]),
        ("socket_mode", r#""0600""#, &["0600"]),
        ("socket_owner", r#""root""#, &["root"]),
        ("socket_group", r#""root""#, &["root"]),
        ("pm", r#""dynamic""#, &["dynamic"]),
        ("workers", "7", &["7"]),
        ("start_workers", "7", &["7"]),
        ("min_spare", "7", &["7"]),
        ("max_spare", "7", &["7"]),
        ("max_spawn_rate", "7", &["7"]),
        ("idle_timeout", r#""7s""#, &["7s"]),
        ("max_requests", "7", &["7"]),
        ("max_requests_jitter", "7", &["7"]),
        ("max_rss", r#""7m""#, &["7m"]),
        ("request_timeout", r#""7s""#, &["7s"]),
        ("request_timeout_grace", r#""7s""#, &["7s"]),
        ("slow_request_timeout", r#""7s""#, &["7s"]),
        ("shutdown_timeout", r#""7s""#, &["7s"]),
        ("keepalive_timeout", r#""7s""#, &["7s"]),
        ("max_requests_in_flight", "7", &["7"]),
        ("request_read_timeout", r#""7s""#, &["7s"]),
        ("max_connections", "7", &["7"]),
        ("allowed_clients", r#"["10.0.0.0/8"]"#, &["10.0.0.0/8"]),
        ("queue_timeout", r#""7s""#, &["7s"]),
        ("max_queue", "7", &["7"]),
        ("pid_file", r#""/tmp/a.pid""#, &["/tmp/a.pid"]),
        ("log_format", r#""json""#, &["json"]),
        ("log_file", r#""/tmp/a.log""#, &["/tmp/a.log"]),
        ("status_path", r#""/status""#, &["/status"]),
        ("ping_path", r#""/ping""#, &["/ping"]),
        ("ping_response", r#""ok""#, &["ok"]),
        ("access_log", "true", &[]),
        ("pool_name", r#""api""#, &["api"]),
        ("user", r#""nobody""#, &["nobody"]),
        ("group", r#""nogroup""#, &["nogroup"]),
        ("allow_root", "true", &[]),
        ("clear_env", "true", &[]),
        ("env", r#"{ GREETING = "x$HOME" }"#, &["GREETING=x$HOME"]),
        ("rlimit_files", "4096", &["4096"]),
        ("rlimit_core", r#""unlimited""#, &["unlimited"]),
        ("cpu_scheduling", r#""batch""#, &["batch"]),
        ("task_lock_dir", r#""/run/app""#, &["/run/app"]),
        // Last: everything after `--` is the program's.
        ("program", r#"["/bin/cat", "-u"]"#, &["/bin/cat", "-u"]),
    ];

    /// Flags that describe one invocation and are not file keys.
    const FLAG_ONLY: &[&str] = &["config", "check_config"];

    /// The keys clap knows, without its own `--help` and `--version`.
    fn flag_keys() -> Vec<String> {
        Cli::command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .filter(|id| id != "help" && id != "version")
            .collect()
    }

    fn flag(key: &str) -> String {
        format!("--{}", key.replace('_', "-"))
    }

    /// What introduces `key`'s words on a command line: `program` is what follows `--`.
    fn lead(key: &str) -> String {
        if key == "program" {
            "--".into()
        } else {
            flag(key)
        }
    }

    fn from_flags(key: &str, words: &[&str]) -> Cli {
        let mut args = vec!["app".to_string(), lead(key)];
        args.extend(words.iter().map(|w| w.to_string()));
        Cli::parse_args(&args).unwrap_or_else(|e| panic!("--{key}: {e}"))
    }

    fn from_file(text: &str) -> Cli {
        toml::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn every_key_is_a_flag_and_a_file_key() {
        let mut sampled: Vec<&str> = SAMPLES.iter().map(|s| s.0).collect();
        sampled.extend(FLAG_ONLY);
        let mut keys = flag_keys();
        keys.sort();
        sampled.sort();
        assert_eq!(
            keys, sampled,
            "every key has a sample, and every sample is a key"
        );

        let mut all_flags = vec!["app".to_string()];
        let mut all_file = String::new();
        for (key, toml_value, words) in SAMPLES {
            let by_flag = from_flags(key, words);
            let by_file = from_file(&format!("{key} = {toml_value}"));
            assert_ne!(by_flag, Cli::default(), "--{key} lands in a field");
            assert_eq!(by_flag, by_file, "{key}: the flag and the file key agree");
            all_flags.push(lead(key));
            all_flags.extend(words.iter().map(|w| w.to_string()));
            all_file.push_str(&format!("{key} = {toml_value}\n"));
        }
        let by_flags = Cli::parse_args(&all_flags).expect("every flag at once");
        assert_eq!(by_flags, from_file(&all_file), "all keys at once agree");
        for key in FLAG_ONLY {
            let err = toml::from_str::<Cli>(&format!("{key} = true")).expect_err("flag only");
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn access_log_is_a_bare_flag_and_can_be_turned_off() {
        let parse = |args: &[&str]| Cli::parse_args(args).expect("valid").access_log;
        assert_eq!(parse(&["app"]), None);
        assert_eq!(parse(&["app", "--access-log"]), Some(true));
        assert_eq!(
            parse(&["app", "--access-log", "--workers", "2"]),
            Some(true)
        );
        assert_eq!(parse(&["app", "--access-log=false"]), Some(false));
        let file = from_file("access_log = true");
        let flags = Cli::parse_args(["app", "--access-log=false"]).expect("valid");
        assert_eq!(flags.over(file).access_log, Some(false));
    }

    #[test]
    fn env_is_a_table_in_the_file_and_repeated_flags_that_win_by_name() {
        let file = from_file("[env]\nA = \"file\"\nB = \"file\"");
        assert_eq!(
            file.env,
            vec![("A".into(), "file".into()), ("B".into(), "file".into())]
        );
        let flags = Cli::parse_args(["app", "--env", "B=flag=x", "--env", "C="]).expect("valid");
        assert_eq!(
            flags.over(file).env,
            vec![
                ("A".to_string(), "file".to_string()),
                ("B".to_string(), "flag=x".to_string()),
                ("C".to_string(), String::new()),
            ]
        );
        let err = Cli::parse_args(["app", "--env", "=x"]).expect_err("no name");
        assert!(err.to_string().contains("NAME=VALUE"), "{err}");
        assert_eq!(
            from_file("rlimit_core = 0").rlimit_core.as_deref(),
            Some("0")
        );
    }

    /// The README's configuration section, from `### Configuration` to the next heading.
    fn readme_configuration() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        let readme = std::fs::read_to_string(&path).expect("the README beside the workspace");
        let start = readme
            .find("### Configuration")
            .expect("a configuration section");
        let section = &readme[start + 3..];
        let end = section.find("\n#").unwrap_or(section.len());
        section[..end].to_string()
    }

    #[test]
    fn the_readme_lists_every_key_with_its_default() {
        let section = readme_configuration();
        // Rows of the table: `| `key` | default | meaning |`.
        let rows: Vec<Vec<&str>> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.split('|').map(str::trim).collect())
            .collect();
        let row = |key: &str| {
            rows.iter()
                .find(|cells| cells.get(1) == Some(&format!("`{key}`").as_str()))
                .unwrap_or_else(|| panic!("the README's configuration table has a row for {key}"))
        };
        for key in flag_keys() {
            if FLAG_ONLY.contains(&key.as_str()) {
                assert!(
                    section.contains(&flag(&key)),
                    "the README names {}",
                    flag(&key)
                );
            } else {
                row(&key);
            }
        }
        for (key, default) in defaults() {
            let cell = row(key)[2].replace('`', "");
            assert!(
                cell.starts_with(&default),
                "the README says {key} defaults to {cell:?}, the code says {default:?}"
            );
        }
    }

    #[test]
    fn the_help_shows_each_default_from_its_constant() {
        let mut cmd = with_defaults(Cli::command());
        cmd.build();
        let help = cmd.render_help().to_string();
        for (key, default) in defaults() {
            assert!(
                help.contains(&format!("[default: {default}]")),
                "--{key} shows {default}: {help}"
            );
        }
        assert!(help.contains("Listen backlog [default: 511]"), "{help}");
        assert!(help.contains("[default: 75s]"), "{help}");
    }
}
