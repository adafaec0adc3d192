//! The background tasks' rows of the status page: one block per task process, in every format,
//! after the pool's (and the workers') fields.

use std::fmt::Write as _;

use super::{clf_time, Snapshot};
use crate::scoreboard::TaskSnapshot;

/// A task's fields, in the order every format shows them.
pub(super) fn fields(s: &Snapshot, t: &TaskSnapshot) -> Vec<(&'static str, String)> {
    let never = t.run_start.is_zero();
    let running = t.state == crate::scoreboard::TaskState::Running;
    vec![
        ("task", t.name.clone()),
        ("pid", t.pid.to_string()),
        ("state", t.state.name().to_string()),
        ("role", t.role.name().to_string()),
        ("epoch", t.epoch.to_string()),
        ("generation", t.generation.to_string()),
        (
            "start since",
            s.now.saturating_sub(t.started).as_secs().to_string(),
        ),
        ("iterations", t.iterations.to_string()),
        ("errors", t.errors.to_string()),
        (
            "last run start",
            if never {
                "-".into()
            } else {
                clf_time(t.run_start_unix_ms / 1000)
            },
        ),
        // Like a request's duration: the running run's time so far, else the last one's.
        (
            "last run duration",
            if running {
                s.now.saturating_sub(t.run_start)
            } else {
                t.last_duration
            }
            .as_micros()
            .to_string(),
        ),
        (
            "last error",
            if t.last_error.is_empty() {
                "-".into()
            } else {
                t.last_error.clone()
            },
        ),
    ]
}

/// Fields given as strings in JSON; the rest are numbers.
fn is_text(key: &str) -> bool {
    matches!(
        key,
        "task" | "state" | "role" | "last run start" | "last error"
    )
}

/// The `key: value` blocks, one per task process.
pub(super) fn text(s: &Snapshot, out: &mut String) {
    for t in &s.tasks {
        out.push_str("\n************************\n");
        for (k, v) in fields(s, t) {
            let _ = writeln!(out, "{:<21} {v}", format!("{k}:"));
        }
    }
}

/// The `tasks` array of the JSON page.
pub(super) fn json(s: &Snapshot) -> serde_json::Value {
    let rows = s.tasks.iter().map(|t| {
        let mut map = serde_json::Map::new();
        for (k, v) in fields(s, t) {
            let value = if is_text(k) {
                serde_json::Value::from(v)
            } else {
                v.parse::<u64>()
                    .map(serde_json::Value::from)
                    .unwrap_or(serde_json::Value::from(v))
            };
            map.insert(k.to_string(), value);
        }
        map.insert(
            "last run start unix ms".into(),
            serde_json::Value::from(t.run_start_unix_ms),
        );
        serde_json::Value::Object(map)
    });
    serde_json::Value::Array(rows.collect())
}

/// One task family: name, type, help, and its value.
type TaskMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&TaskSnapshot) -> u64,
);

#[rustfmt::skip]
const TASK_METRICS: [TaskMetric; 4] = [
    ("task_iterations", "counter", "Runs one task process finished.", |t| t.iterations),
    ("task_errors", "counter", "Runs of one task process that returned an error.", |t| t.errors),
    ("task_leader", "gauge", "1 while the task process holds the lease, or runs without one.",
        |t| u64::from(t.role != crate::scoreboard::TaskRole::Standby)),
    ("task_last_run_duration_seconds", "gauge", "How long the last run of one task took.",
        |t| t.last_duration.as_secs()),
];

/// The task families of the OpenMetrics page (before `# EOF`).
pub(super) fn openmetrics(s: &Snapshot, pool: &str, out: &mut String) {
    if s.tasks.is_empty() {
        return;
    }
    for (name, kind, help, value) in TASK_METRICS {
        let _ = writeln!(out, "# TYPE fcgi_pool_{name} {kind}");
        if name.ends_with("_seconds") {
            let _ = writeln!(out, "# UNIT fcgi_pool_{name} seconds");
        }
        let _ = writeln!(out, "# HELP fcgi_pool_{name} {help}");
        let suffix = if kind == "counter" { "_total" } else { "" };
        for t in &s.tasks {
            let _ = writeln!(
                out,
                "fcgi_pool_{name}{suffix}{{pool=\"{pool}\",task=\"{}\",pid=\"{}\"}} {}",
                t.name,
                t.pid,
                value(t)
            );
        }
    }
}
