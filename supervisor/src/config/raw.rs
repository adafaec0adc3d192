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
/// Requests one worker runs at once: 1, the classic prefork model (one request per process).
pub const DEFAULT_MAX_REQUESTS_IN_FLIGHT: usize = 1;
/// Log format: `text`, for people reading a terminal; `json` is for collectors.
pub const DEFAULT_LOG_FORMAT: &str = "text";
/// The body of the ping answer: PHP-FPM's `ping.response`.
pub const DEFAULT_PING_RESPONSE: &str = "pong";
/// The pool's name on the status page: PHP-FPM's default pool, so dashboards match.
pub const DEFAULT_POOL_NAME: &str = "www";
/// Access log: off, since nginx in front already writes one.
pub const DEFAULT_ACCESS_LOG: bool = false;

/// The command line every application built on this library gets, and the keys of its TOML
/// file (the same names, in snake_case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Parser, Deserialize)]
#[serde(deny_unknown_fields)]
#[command(version, about = "A prefork FastCGI application server", long_about = None)]
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
}

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
            pid_file: self.pid_file.or(file.pid_file),
            log_format: self.log_format.or(file.log_format),
            log_file: self.log_file.or(file.log_file),
            status_path: self.status_path.or(file.status_path),
            ping_path: self.ping_path.or(file.ping_path),
            ping_response: self.ping_response.or(file.ping_response),
            access_log: self.access_log.or(file.access_log),
            pool_name: self.pool_name.or(file.pool_name),
            program: if self.program.is_empty() {
                file.program
            } else {
                self.program
            },
            // Not file keys: they describe this invocation.
            config: self.config,
            check_config: self.check_config,
            inherits_listeners: self.inherits_listeners,
        }
    }
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
        ("log_format", DEFAULT_LOG_FORMAT.to_string()),
        ("ping_response", DEFAULT_PING_RESPONSE.to_string()),
        ("pool_name", DEFAULT_POOL_NAME.to_string()),
        ("access_log", off(DEFAULT_ACCESS_LOG)),
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
        ("pid_file", r#""/tmp/a.pid""#, &["/tmp/a.pid"]),
        ("log_format", r#""json""#, &["json"]),
        ("log_file", r#""/tmp/a.log""#, &["/tmp/a.log"]),
        ("status_path", r#""/status""#, &["/status"]),
        ("ping_path", r#""/ping""#, &["/ping"]),
        ("ping_response", r#""ok""#, &["ok"]),
        ("access_log", "true", &[]),
        ("pool_name", r#""api""#, &["api"]),
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
