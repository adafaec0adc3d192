//! `[tasks.NAME]` and `[lease]`: the background tasks' keys, validated into [`TaskConfig`].

use std::path::PathBuf;
use std::time::Duration;

use super::parse::parse_duration;
use super::raw::{
    Cli, LeaseKeys, TaskKeys, DEFAULT_LEASE_CHECK_INTERVAL, DEFAULT_LEASE_CHECK_TIMEOUT,
    DEFAULT_LEASE_RETRY, DEFAULT_LEASE_SESSION_TIMEOUT, DEFAULT_TASK_INTERVAL, DEFAULT_TASK_MODE,
    DEFAULT_TASK_STOP_TIMEOUT,
};
use super::ConfigError;

/// How a task's runs are spaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskMode {
    /// Again at once, or `interval` after the previous run started if that is later.
    Loop,
    /// `interval` after the previous run ended: never a pile-up.
    Interval,
}

/// The leader lease of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// PostgreSQL connection string.
    pub url: String,
    /// Spacing of the leader's `SELECT 1` checks.
    pub check_interval: Duration,
    /// A check unanswered this long loses the lease.
    pub check_timeout: Duration,
    /// The session's `idle_session_timeout`.
    pub session_timeout: Duration,
    /// A standby's retry spacing (jittered).
    pub retry: Duration,
}

impl LeaseConfig {
    /// How long after its last successful check a leader may still run: it stops once a
    /// check is this late. A new leader waits this long before its first run, so a predecessor
    /// whose session was dropped under it has stopped by then.
    pub fn proof_window(&self) -> Duration {
        self.check_interval + self.check_timeout
    }
}

/// One configured task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskConfig {
    /// The application's name for it.
    pub name: String,
    /// Whether it runs.
    pub enabled: bool,
    /// Spacing rule.
    pub mode: TaskMode,
    /// Spacing.
    pub interval: Duration,
    /// Bound of a graceful stop.
    pub stop_timeout: Duration,
    /// Bound of one run.
    pub run_timeout: Option<Duration>,
    /// One leader across hosts, if configured.
    pub lease: Option<LeaseConfig>,
}

/// The validated task keys.
pub(super) struct Tasks {
    pub lock_dir: PathBuf,
    pub tasks: Vec<TaskConfig>,
}

/// A key under a task's section, named as the operator wrote it. Leaked: it only exists for an
/// error, which ends the start or refuses the reload, and `ConfigError` names keys statically.
fn key(section: &str, name: &str) -> &'static str {
    Box::leak(format!("{section}.{name}").into_boxed_str())
}

fn duration(
    section: &str,
    name: &str,
    v: Option<&String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|e| ConfigError::Value {
            key: key(section, name),
            value: s.clone(),
            expected: e.trim_start_matches("expected ").to_string(),
        }),
    }
}

fn positive(section: &str, name: &str, d: Duration, v: &str) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::Value {
            key: key(section, name),
            value: v.to_string(),
            expected: "a duration above zero".into(),
        });
    }
    Ok(d)
}

/// `task_lock_dir`, `[tasks.*]` and `[lease]`.
pub(super) fn tasks(raw: &Cli) -> Result<Tasks, ConfigError> {
    let lock_dir = raw.task_lock_dir.clone().unwrap_or_else(std::env::temp_dir);
    let shared = raw.lease.as_ref();
    let mut tasks = Vec::new();
    for (name, keys) in &raw.tasks {
        tasks.push(task(name, keys, shared)?);
    }
    Ok(Tasks { lock_dir, tasks })
}

/// A task name becomes a lock file's name and a status row: keep it to what both take.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::scoreboard::TASK_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn task(name: &str, k: &TaskKeys, shared: Option<&LeaseKeys>) -> Result<TaskConfig, ConfigError> {
    if !valid_name(name) {
        return Err(ConfigError::Value {
            key: "tasks",
            value: name.to_string(),
            expected: format!(
                "a task name of letters, digits, '_' and '-', at most {} bytes",
                crate::scoreboard::TASK_NAME_BYTES
            ),
        });
    }
    let section = format!("tasks.{name}");
    let mode = match k.mode.as_deref().unwrap_or(DEFAULT_TASK_MODE) {
        "interval" => TaskMode::Interval,
        "loop" => TaskMode::Loop,
        other => {
            return Err(ConfigError::Value {
                key: key(&section, "mode"),
                value: other.to_string(),
                expected: "interval or loop".into(),
            })
        }
    };
    let interval = duration(
        &section,
        "interval",
        k.interval.as_ref(),
        DEFAULT_TASK_INTERVAL,
    )?;
    let stop_timeout = duration(
        &section,
        "stop_timeout",
        k.stop_timeout.as_ref(),
        DEFAULT_TASK_STOP_TIMEOUT,
    )?;
    let run_timeout = match &k.run_timeout {
        None => None,
        Some(v) => Some(positive(
            &section,
            "run_timeout",
            duration(&section, "run_timeout", Some(v), Duration::ZERO)?,
            v,
        )?),
    };
    let url = match k.lease.as_deref() {
        Some("none") => None,
        Some(url) => Some(url.to_string()),
        None => shared.and_then(|l| l.url.clone()),
    };
    let lease = match url {
        None => None,
        Some(url) => Some(lease(url, shared)?),
    };
    Ok(TaskConfig {
        name: name.to_string(),
        enabled: k.enabled.unwrap_or(true),
        mode,
        interval,
        stop_timeout,
        run_timeout,
        lease,
    })
}

fn lease(url: String, k: Option<&LeaseKeys>) -> Result<LeaseConfig, ConfigError> {
    let get = |f: fn(&LeaseKeys) -> Option<&String>| k.and_then(f);
    let check_interval = duration(
        "lease",
        "check_interval",
        get(|k| k.check_interval.as_ref()),
        DEFAULT_LEASE_CHECK_INTERVAL,
    )?;
    let check_timeout = duration(
        "lease",
        "check_timeout",
        get(|k| k.check_timeout.as_ref()),
        DEFAULT_LEASE_CHECK_TIMEOUT,
    )?;
    let session_timeout = duration(
        "lease",
        "session_timeout",
        get(|k| k.session_timeout.as_ref()),
        DEFAULT_LEASE_SESSION_TIMEOUT,
    )?;
    let retry = duration(
        "lease",
        "retry",
        get(|k| k.retry.as_ref()),
        DEFAULT_LEASE_RETRY,
    )?;
    positive("lease", "check_interval", check_interval, "0s")?;
    positive("lease", "check_timeout", check_timeout, "0s")?;
    positive("lease", "retry", retry, "0s")?;
    let lease = LeaseConfig {
        url,
        check_interval,
        check_timeout,
        session_timeout,
        retry,
    };
    // The inequality that keeps two leaders from running at once when a leader's connection
    // goes silent: it stops (proof window) before PostgreSQL drops its session and frees the
    // lock (session timeout).
    if session_timeout <= lease.proof_window() {
        return Err(ConfigError::Value {
            key: "lease.session_timeout",
            value: super::parse::show_duration(session_timeout),
            expected: format!(
                "more than check_interval + check_timeout ({})",
                super::parse::show_duration(lease.proof_window())
            ),
        });
    }
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Tasks, ConfigError> {
        let raw: Cli = toml::from_str(text).expect("toml");
        tasks(&raw)
    }

    #[test]
    fn a_task_section_takes_its_defaults_and_the_shared_lease() {
        let t = load(
            "[tasks.drain]\n[tasks.report]\nmode = \"loop\"\ninterval = \"0s\"\nlease = \"none\"\n\
             [lease]\nurl = \"host=/tmp dbname=app\"\ncheck_interval = \"500ms\"\n",
        )
        .expect("valid");
        assert_eq!(t.tasks.len(), 2);
        let drain = &t.tasks[0];
        assert_eq!(drain.name, "drain");
        assert!(drain.enabled);
        assert_eq!(drain.mode, TaskMode::Interval);
        assert_eq!(drain.interval, DEFAULT_TASK_INTERVAL);
        assert_eq!(drain.stop_timeout, DEFAULT_TASK_STOP_TIMEOUT);
        assert_eq!(drain.run_timeout, None);
        let lease = drain.lease.as_ref().expect("the shared lease");
        assert_eq!(lease.url, "host=/tmp dbname=app");
        assert_eq!(
            lease.proof_window(),
            Duration::from_millis(500) + DEFAULT_LEASE_CHECK_TIMEOUT
        );
        let report = &t.tasks[1];
        assert_eq!(
            (report.mode, report.interval),
            (TaskMode::Loop, Duration::ZERO)
        );
        assert_eq!(report.lease, None, "lease = \"none\" opts out");
    }

    #[test]
    fn bad_task_keys_name_the_task_and_the_key() {
        let e = load("[tasks.drain]\nmode = \"cron\"\n")
            .err()
            .expect("invalid");
        assert_eq!(
            e.to_string(),
            "invalid value \"cron\" for key \"tasks.drain.mode\": expected interval or loop"
        );
        let e = load("[tasks.drain]\nrun_timeout = \"0s\"\n")
            .err()
            .expect("invalid");
        assert!(e.to_string().contains("tasks.drain.run_timeout"), "{e}");
        let e = load("[tasks.\"a b\"]\n").err().expect("invalid");
        assert!(e.to_string().contains("task name"), "{e}");
        let e = toml::from_str::<Cli>("[tasks.drain]\nevery = \"1s\"\n").expect_err("unknown");
        assert!(e.to_string().contains("every"), "{e}");
    }

    #[test]
    fn the_session_timeout_must_outlast_the_proof_window() {
        let e = load(
            "[tasks.drain]\nlease = \"host=/tmp\"\n[lease]\ncheck_interval = \"1s\"\n\
             check_timeout = \"2s\"\nsession_timeout = \"3s\"\n",
        )
        .err()
        .expect("invalid");
        assert_eq!(
            e.to_string(),
            "invalid value \"3s\" for key \"lease.session_timeout\": expected more than \
             check_interval + check_timeout (3s)"
        );
    }
}
