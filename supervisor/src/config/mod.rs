//! Configuration: one TOML file and command-line flags over it, validated once into typed
//! values. Every flag has the same key in the file (`--max-requests` is `max_requests`); flags
//! win. Unknown keys are errors, and every error names the key, the value and what is accepted.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// The command line every application built on this library gets.
#[derive(Debug, Clone, Default, Parser)]
#[command(version, about = "A prefork FastCGI application server", long_about = None)]
pub struct Cli {
    /// TOML configuration file; flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where to listen: `unix:/path/app.sock`, `127.0.0.1:9000` or `[::1]:9000` (repeatable).
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Listen backlog [default: 511].
    #[arg(long, value_name = "N")]
    pub backlog: Option<i32>,
    /// Mode of unix socket files, octal [default: 0660].
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Owner of unix socket files (name or uid).
    #[arg(long, value_name = "USER")]
    pub socket_owner: Option<String>,
    /// Group of unix socket files (name or gid).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Process manager: static, dynamic or ondemand [default: static].
    #[arg(long, value_name = "MODE")]
    pub pm: Option<String>,
    /// Worker processes (the maximum for dynamic and ondemand) [default: CPUs x 2].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// dynamic: workers started at boot [default: min_spare + (max_spare - min_spare) / 2].
    #[arg(long, value_name = "N")]
    pub start_workers: Option<usize>,
    /// dynamic: spawn when fewer idle workers than this [default: 1].
    #[arg(long, value_name = "N")]
    pub min_spare: Option<usize>,
    /// dynamic: stop idle workers above this many [default: 3].
    #[arg(long, value_name = "N")]
    pub max_spare: Option<usize>,
    /// dynamic and ondemand: most workers spawned per tick [default: 32].
    #[arg(long, value_name = "N")]
    pub max_spawn_rate: Option<usize>,
    /// ondemand: stop a worker idle this long [default: 10s].
    #[arg(long, value_name = "DUR")]
    pub idle_timeout: Option<String>,
    /// Recycle a worker after this many requests, 0 = never [default: 0].
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u64>,
    /// Up to this many extra requests per worker, so they recycle at different times
    /// [default: max_requests / 10].
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<u64>,
    /// Recycle a worker whose resident memory exceeds this (512m, 1g).
    #[arg(long, value_name = "BYTES")]
    pub max_rss: Option<String>,
    /// End a request running longer than this by replacing its worker (30s, 5m).
    #[arg(long, value_name = "DUR")]
    pub request_timeout: Option<String>,
    /// After a timeout's SIGTERM, SIGKILL the worker this much later [default: 2s].
    #[arg(long, value_name = "DUR")]
    pub request_timeout_grace: Option<String>,
    /// Log a request running longer than this, once.
    #[arg(long, value_name = "DUR")]
    pub slow_request_timeout: Option<String>,
    /// Graceful stop: kill what still runs after this [default: 30s].
    #[arg(long, value_name = "DUR")]
    pub shutdown_timeout: Option<String>,
    /// Close a kept-alive connection idle this long; keep it above nginx's 60 s [default: 75s].
    #[arg(long, value_name = "DUR")]
    pub keepalive_timeout: Option<String>,
    /// Requests one worker runs at once [default: 1].
    #[arg(long, value_name = "N")]
    pub max_requests_in_flight: Option<usize>,
    /// Write the master's pid here.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Log format: text or json [default: text].
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
    /// The body of the ping answer [default: pong].
    #[arg(long, value_name = "TEXT")]
    pub ping_response: Option<String>,
    /// Log one line per request.
    #[arg(long)]
    pub access_log: bool,
    /// The pool's name on the status page [default: www].
    #[arg(long, value_name = "NAME")]
    pub pool_name: Option<String>,
    /// Validate the configuration and exit: 0 when valid, 2 when not (1 when the application's
    /// setup fails).
    #[arg(long)]
    pub check_config: bool,
    /// Listening sockets come from systemd or a previous master, so `listen` may be empty.
    #[arg(skip)]
    pub inherits_listeners: bool,
}

impl Cli {
    /// Parses the process's arguments.
    pub fn parse_from_env() -> Result<Cli, clap::Error> {
        Cli::try_parse()
    }
}

/// The file's keys: the same names as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<Vec<String>>,
    backlog: Option<i32>,
    socket_mode: Option<String>,
    socket_owner: Option<String>,
    socket_group: Option<String>,
    pm: Option<String>,
    workers: Option<usize>,
    start_workers: Option<usize>,
    min_spare: Option<usize>,
    max_spare: Option<usize>,
    max_spawn_rate: Option<usize>,
    idle_timeout: Option<String>,
    max_requests: Option<u64>,
    max_requests_jitter: Option<u64>,
    max_rss: Option<String>,
    request_timeout: Option<String>,
    request_timeout_grace: Option<String>,
    slow_request_timeout: Option<String>,
    shutdown_timeout: Option<String>,
    keepalive_timeout: Option<String>,
    max_requests_in_flight: Option<usize>,
    pid_file: Option<PathBuf>,
    log_format: Option<String>,
    log_file: Option<PathBuf>,
    status_path: Option<String>,
    ping_path: Option<String>,
    ping_response: Option<String>,
    access_log: Option<bool>,
    pool_name: Option<String>,
}

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

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket file.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const EXPECTED: &str =
            "unix:/path/to.sock, /path/to.sock, 127.0.0.1:9000, [::1]:9000 or localhost:9000";
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("expected {EXPECTED}"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(sa));
        }
        // A host name resolves once, at startup, to its first address.
        s.to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(ListenAddr::Tcp)
            .ok_or_else(|| format!("expected {EXPECTED}"))
    }
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

/// Parses `500ms`, `30s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a duration like 500ms, 30s, 5m, 1h".to_string())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err("expected a duration like 500ms, 30s, 5m, 1h".into()),
    };
    Ok(d)
}

/// Parses a byte size: `512`, `64k`, `256m`, `1g` (also `KiB`, `MiB`, `GiB`; binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a size like 512m, 1g, 65536".to_string())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err("expected a size like 512m, 1g, 65536".into()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| "size too large".to_string())
}

fn duration(key: &'static str, v: Option<&String>) -> Result<Option<Duration>, ConfigError> {
    v.map(|s| parse_duration(s).map_err(|e| bad(key, s, e.trim_start_matches("expected "))))
        .transpose()
}

fn user_id(key: &'static str, v: &str, group: bool) -> Result<u32, ConfigError> {
    if let Ok(n) = v.parse::<u32>() {
        return Ok(n);
    }
    let found = if group {
        nix::unistd::Group::from_name(v)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    } else {
        nix::unistd::User::from_name(v)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    };
    found.ok_or_else(|| {
        bad(
            key,
            v,
            if group {
                "an existing group name or a gid"
            } else {
                "an existing user name or a uid"
            },
        )
    })
}

impl Config {
    /// Reads the file named by `--config` (if any), applies the flags over it, and validates.
    /// Called again on reload with the same flags.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Config::merge(cli, file)
    }

    fn merge(cli: &Cli, f: FileConfig) -> Result<Config, ConfigError> {
        let listen_src = if cli.listen.is_empty() {
            f.listen.unwrap_or_default()
        } else {
            cli.listen.clone()
        };
        let listen = listen_src
            .iter()
            .map(|s| {
                s.parse::<ListenAddr>()
                    .map_err(|e| bad("listen", s, e.trim_start_matches("expected ")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() && !cli.inherits_listeners {
            return Err(bad(
                "listen",
                "",
                "at least one address: give --listen ADDR or listen = [\"unix:/run/app.sock\"]",
            ));
        }

        let backlog = cli.backlog.or(f.backlog).unwrap_or(511);
        if backlog < 1 {
            return Err(bad("backlog", backlog, "a positive number (default 511)"));
        }
        let mode_s = cli
            .socket_mode
            .clone()
            .or(f.socket_mode)
            .unwrap_or_else(|| "0660".into());
        let mode = u32::from_str_radix(mode_s.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| bad("socket_mode", &mode_s, "an octal mode like 0660"))?;
        let owner = cli
            .socket_owner
            .clone()
            .or(f.socket_owner)
            .map(|v| user_id("socket_owner", &v, false))
            .transpose()?;
        let group = cli
            .socket_group
            .clone()
            .or(f.socket_group)
            .map(|v| user_id("socket_group", &v, true))
            .transpose()?;

        let pm_s = cli.pm.clone().or(f.pm).unwrap_or_else(|| "static".into());
        let mode_pm = match pm_s.as_str() {
            "static" => PoolMode::Static,
            "dynamic" => PoolMode::Dynamic,
            "ondemand" => PoolMode::OnDemand,
            _ => return Err(bad("pm", &pm_s, "static, dynamic or ondemand")),
        };
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let workers = cli.workers.or(f.workers).unwrap_or(cpus * 2);
        if workers == 0 {
            return Err(bad("workers", workers, "at least 1"));
        }
        let min_spare = cli.min_spare.or(f.min_spare).unwrap_or(1).min(workers);
        let max_spare = cli.max_spare.or(f.max_spare).unwrap_or(3).min(workers);
        let start_workers = cli
            .start_workers
            .or(f.start_workers)
            .unwrap_or(min_spare + max_spare.saturating_sub(min_spare) / 2);
        if mode_pm == PoolMode::Dynamic {
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
        }
        let max_spawn_rate = cli.max_spawn_rate.or(f.max_spawn_rate).unwrap_or(32);
        if max_spawn_rate == 0 {
            return Err(bad("max_spawn_rate", 0, "at least 1 (default 32)"));
        }
        let idle_timeout = duration(
            "idle_timeout",
            cli.idle_timeout.as_ref().or(f.idle_timeout.as_ref()),
        )?
        .unwrap_or(Duration::from_secs(10));

        let max_requests = cli.max_requests.or(f.max_requests).unwrap_or(0);
        let max_requests_jitter = cli
            .max_requests_jitter
            .or(f.max_requests_jitter)
            .unwrap_or(max_requests / 10);
        let max_rss = cli
            .max_rss
            .as_ref()
            .or(f.max_rss.as_ref())
            .map(|s| {
                parse_size(s).map_err(|e| bad("max_rss", s, e.trim_start_matches("expected ")))
            })
            .transpose()?;
        let request_timeout = duration(
            "request_timeout",
            cli.request_timeout.as_ref().or(f.request_timeout.as_ref()),
        )?;
        let request_timeout_grace = duration(
            "request_timeout_grace",
            cli.request_timeout_grace
                .as_ref()
                .or(f.request_timeout_grace.as_ref()),
        )?
        .unwrap_or(Duration::from_secs(2));
        let slow_request_timeout = duration(
            "slow_request_timeout",
            cli.slow_request_timeout
                .as_ref()
                .or(f.slow_request_timeout.as_ref()),
        )?;
        let shutdown_timeout = duration(
            "shutdown_timeout",
            cli.shutdown_timeout
                .as_ref()
                .or(f.shutdown_timeout.as_ref()),
        )?
        .unwrap_or(Duration::from_secs(30));
        let keepalive_timeout = duration(
            "keepalive_timeout",
            cli.keepalive_timeout
                .as_ref()
                .or(f.keepalive_timeout.as_ref()),
        )?
        .unwrap_or(Duration::from_secs(75));
        let in_flight = cli
            .max_requests_in_flight
            .or(f.max_requests_in_flight)
            .unwrap_or(1);
        let max_requests_in_flight = NonZeroUsize::new(in_flight)
            .ok_or_else(|| bad("max_requests_in_flight", in_flight, "at least 1"))?;

        let format_s = cli
            .log_format
            .clone()
            .or(f.log_format)
            .unwrap_or_else(|| "text".into());
        let log_format = match format_s.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(bad("log_format", &format_s, "text or json")),
        };
        let path_key =
            |key: &'static str, v: Option<String>| -> Result<Option<String>, ConfigError> {
                match v {
                    Some(p) if !p.starts_with('/') => {
                        Err(bad(key, &p, "a path starting with /, like /status"))
                    }
                    other => Ok(other),
                }
            };
        let status_path = path_key("status_path", cli.status_path.clone().or(f.status_path))?;
        let ping_path = path_key("ping_path", cli.ping_path.clone().or(f.ping_path))?;

        Ok(Config {
            listen,
            backlog,
            socket: SocketOptions { mode, owner, group },
            pool: PoolConfig {
                mode: mode_pm,
                workers,
                start_workers,
                min_spare,
                max_spare,
                max_spawn_rate,
                idle_timeout,
            },
            max_requests,
            max_requests_jitter,
            max_rss,
            request_timeout,
            request_timeout_grace,
            shutdown_timeout,
            keepalive_timeout,
            max_requests_in_flight,
            pid_file: cli.pid_file.clone().or(f.pid_file),
            log_format,
            log_file: cli.log_file.clone().or(f.log_file),
            status_path,
            ping_path,
            ping_response: cli
                .ping_response
                .clone()
                .or(f.ping_response)
                .unwrap_or_else(|| "pong".into()),
            slow_request_timeout,
            access_log: cli.access_log || f.access_log.unwrap_or(false),
            pool_name: cli
                .pool_name
                .clone()
                .or(f.pool_name)
                .unwrap_or_else(|| "www".into()),
            check_config: cli.check_config,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
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
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec!["app", "--listen", "127.0.0.1:9000"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("valid flags")
    }

    fn file(toml: &str) -> FileConfig {
        toml::from_str(toml).expect("valid toml")
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(
            parse_duration("soon").is_err()
                && parse_duration("5d").is_err()
                && parse_duration("").is_err()
        );
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("lots").is_err() && parse_size("1t").is_err());
    }

    #[test]
    fn defaults() {
        let c = Config::merge(&cli(&[]), FileConfig::default()).expect("valid");
        assert_eq!(c.pool.mode, PoolMode::Static);
        assert!(c.pool.workers >= 2);
        assert_eq!(c.backlog, 511);
        assert_eq!(c.socket.mode, 0o660);
        assert_eq!(c.keepalive_timeout, Duration::from_secs(75));
        assert_eq!(c.max_requests_in_flight.get(), 1);
        assert_eq!((c.max_requests, c.request_timeout), (0, None));
    }

    #[test]
    fn flags_override_the_file() {
        let f = file("workers = 3\npm = \"dynamic\"\nmax_spare = 2\nrequest_timeout = \"30s\"\nlisten = [\"unix:/tmp/x.sock\"]");
        let c = Config::merge(&cli(&["--workers", "5"]), f).expect("valid");
        assert_eq!(c.pool.workers, 5);
        assert_eq!(c.pool.mode, PoolMode::Dynamic);
        assert_eq!(c.request_timeout, Some(Duration::from_secs(30)));
        assert_eq!(
            c.listen,
            vec![ListenAddr::Tcp("127.0.0.1:9000".parse().expect("addr"))]
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = toml::from_str::<FileConfig>("wrokers = 3").expect_err("unknown key");
        assert!(err.to_string().contains("wrokers"), "{err}");
    }

    #[test]
    fn each_bad_value_names_its_key() {
        let cases: &[(&[&str], &str)] = &[
            (&["--workers", "0"], "workers"),
            (&["--pm", "sometimes"], "pm"),
            (&["--request-timeout", "soon"], "request_timeout"),
            (&["--max-rss", "lots"], "max_rss"),
            (&["--socket-mode", "999"], "socket_mode"),
            (&["--log-format", "xml"], "log_format"),
            (
                &[
                    "--pm",
                    "dynamic",
                    "--workers",
                    "4",
                    "--min-spare",
                    "3",
                    "--max-spare",
                    "2",
                ],
                "max_spare",
            ),
            (&["--max-requests-in-flight", "0"], "max_requests_in_flight"),
            (&["--status-path", "status"], "status_path"),
        ];
        for (args, key) in cases {
            let err = Config::merge(&cli(args), FileConfig::default()).expect_err("invalid");
            let msg = err.to_string();
            assert!(msg.contains(&format!("\"{key}\"")), "{args:?}: {msg}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "unix:/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "/run/a.sock".parse(),
            Ok(ListenAddr::Unix("/run/a.sock".into()))
        );
        assert_eq!(
            "127.0.0.1:9000".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:9000".parse().expect("v4")))
        );
        assert_eq!(
            "[::1]:9000".parse(),
            Ok(ListenAddr::Tcp("[::1]:9000".parse().expect("v6")))
        );
        assert!("localhost:9000".parse::<ListenAddr>().is_ok());
        assert!("nonsense".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
    }
}
