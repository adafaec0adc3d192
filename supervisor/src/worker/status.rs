//! The status page and the ping, answered by a worker's I/O thread from the scoreboard without
//! calling the application, in PHP-FPM's formats so existing dashboards and exporters read them.
//!
//! Why it answers while every worker is busy: application code never holds a worker's event
//! loop for more than a few milliseconds (a long request runs on while a standby thread drives
//! the loop, see `inline.rs`). Below the pool's maximum, a busy pool grows (the master wakes on
//! a waiting connection and starts a worker with room, in milliseconds). At the maximum, the
//! workers keep accepting connections, holding the application's requests until a handler is
//! free (as the kernel's backlog would have), so a status or ping request is read and answered
//! at once. PHP-FPM serves its status page from a pool worker, so it cannot answer when it is
//! needed most.

use std::fmt::Write as _;
use std::time::Duration;

use crate::scoreboard::{
    Metrics, PoolStats, SlotSnapshot, SlotState, TaskSnapshot, DURATION_BUCKETS,
};

mod tasks;

/// Where the status page and the ping live.
#[derive(Debug, Clone, Default)]
pub(crate) struct Paths {
    pub status: Option<String>,
    pub ping: Option<String>,
    pub ping_response: String,
    pub pool: String,
}

/// The status page's output formats, chosen by the query string like PHP-FPM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `key: value` lines (the default).
    Text,
    /// `?json`.
    Json,
    /// `?openmetrics`.
    OpenMetrics,
    /// `?html`.
    Html,
}

/// The format and whether `full` (one entry per worker) was asked for.
pub fn parse_query(query: &str) -> (Format, bool) {
    let mut format = Format::Text;
    let mut full = false;
    for part in query.split('&') {
        match part.split('=').next().unwrap_or("") {
            "json" => format = Format::Json,
            "openmetrics" => format = Format::OpenMetrics,
            "html" => format = Format::Html,
            "full" => full = true,
            _ => {}
        }
    }
    (format, full)
}

/// Everything the page shows, gathered at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The pool's name.
    pub pool: String,
    /// The master's figures.
    pub stats: PoolStats,
    /// Every worker.
    pub workers: Vec<SlotSnapshot>,
    /// Every background task process.
    pub tasks: Vec<TaskSnapshot>,
    /// Connections accepted so far.
    pub accepted: u64,
    /// Requests answered, by status and duration, and those refused while they waited.
    pub metrics: Metrics,
    /// The monotonic clock now.
    pub now: Duration,
}

struct Figures {
    idle: u64,
    active: u64,
    total: u64,
    listen_queue: u64,
}

fn figures(s: &Snapshot) -> Figures {
    let live = s.workers.iter().filter(|w| w.state != SlotState::Free);
    let (mut idle, mut active, mut total, mut held) = (0, 0, 0, 0);
    for w in live {
        total += 1;
        held += w.held;
        if w.in_flight > 0 {
            active += 1;
        } else if matches!(w.state, SlotState::Idle) {
            idle += 1;
        }
    }
    Figures {
        idle,
        active,
        total,
        listen_queue: s.stats.listen_queue + held,
    }
}

fn pm_name(mode: u64) -> &'static str {
    match mode {
        1 => "dynamic",
        2 => "ondemand",
        _ => "static",
    }
}

fn state_name(w: &SlotSnapshot) -> &'static str {
    match w.state {
        SlotState::Idle if w.in_flight == 0 => "Idle",
        SlotState::Idle | SlotState::Busy => "Running",
        SlotState::Starting => "Starting",
        SlotState::Draining => "Finishing",
        SlotState::Free => "Free",
    }
}

/// `23/Nov/2026:04:00:00 +0000`, PHP-FPM's start time format.
fn clf_time(unix: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// The page: its content type and body.
pub fn render(s: &Snapshot, format: Format, full: bool) -> (&'static str, String) {
    match format {
        Format::Text => ("text/plain", text(s, full)),
        Format::Json => ("application/json", json(s, full)),
        Format::OpenMetrics => (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics(s, full),
        ),
        Format::Html => ("text/html", html(s, full)),
    }
}

/// The pool's fields in PHP-FPM's order, then ours.
fn pool_fields(s: &Snapshot) -> Vec<(&'static str, String)> {
    let f = figures(s);
    let since = s.now.saturating_sub(s.stats.started).as_secs();
    vec![
        ("pool", s.pool.clone()),
        ("process manager", pm_name(s.stats.mode).to_string()),
        ("start time", clf_time(s.stats.start_time)),
        ("start since", since.to_string()),
        ("accepted conn", s.accepted.to_string()),
        ("listen queue", f.listen_queue.to_string()),
        (
            "max listen queue",
            s.stats.max_listen_queue.max(f.listen_queue).to_string(),
        ),
        ("listen queue len", s.stats.backlog.to_string()),
        ("idle processes", f.idle.to_string()),
        ("active processes", f.active.to_string()),
        ("total processes", f.total.to_string()),
        (
            "max active processes",
            s.stats.max_active.max(f.active).to_string(),
        ),
        (
            "max children reached",
            s.stats.max_children_reached.to_string(),
        ),
        ("slow requests", s.stats.slow_requests.to_string()),
        ("max processes", s.stats.max_workers.to_string()),
        ("generation", s.stats.generation.to_string()),
        ("respawns", s.stats.respawns.to_string()),
        ("crash loop backoffs", s.stats.backoffs.to_string()),
        ("queue timeouts", s.metrics.queue_timeouts.to_string()),
        ("queue full", s.metrics.queue_full.to_string()),
        ("abandoned in queue", s.metrics.abandoned.to_string()),
    ]
}

/// The status classes, as labels and JSON keys.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A bucket's upper bound as OpenMetrics writes it: a float, `1.0` rather than `1`, as the
/// reference clients do, so `le` label values match across exporters.
fn le(bound: Duration) -> String {
    let secs = bound.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.1}")
    } else {
        format!("{secs}")
    }
}

/// The histogram's cumulative counts, one per bound of [`DURATION_BUCKETS`] then `+Inf`.
fn cumulative(m: &Metrics) -> Vec<(String, u64)> {
    let bounds = DURATION_BUCKETS
        .iter()
        .map(|&b| le(b))
        .chain(["+Inf".to_string()]);
    let mut total = 0;
    bounds
        .zip(m.buckets)
        .map(|(le, n)| {
            total += n;
            (le, total)
        })
        .collect()
}

fn worker_fields(s: &Snapshot, w: &SlotSnapshot) -> Vec<(&'static str, String)> {
    vec![
        ("pid", w.pid.to_string()),
        ("state", state_name(w).to_string()),
        (
            "start time",
            clf_time(s.stats.start_time + w.started.saturating_sub(s.stats.started).as_secs()),
        ),
        (
            "start since",
            s.now.saturating_sub(w.started).as_secs().to_string(),
        ),
        ("requests", w.requests.to_string()),
        // Like PHP-FPM: the running request's time so far, else the last one's.
        (
            "request duration",
            request_duration(s, w).as_micros().to_string(),
        ),
        (
            "request method",
            if w.method.is_empty() {
                "-".into()
            } else {
                w.method.clone()
            },
        ),
        (
            "request URI",
            if w.uri.is_empty() {
                "-".into()
            } else {
                w.uri.clone()
            },
        ),
        ("content length", w.content_length.to_string()),
        ("user", "-".to_string()),
        ("script", "-".to_string()),
        ("last request cpu", "0.00".to_string()),
        ("last request memory", w.rss.to_string()),
        ("generation", w.generation.to_string()),
        // Beyond PHP-FPM: a worker may run many requests at once (an async service); the
        // request fields above are then the oldest one's.
        ("requests in flight", w.in_flight.to_string()),
    ]
}

fn request_duration(s: &Snapshot, w: &SlotSnapshot) -> Duration {
    if w.in_flight > 0 {
        s.now.saturating_sub(w.since)
    } else {
        w.last_duration
    }
}

fn text(s: &Snapshot, full: bool) -> String {
    let mut out = String::new();
    for (k, v) in pool_fields(s) {
        let _ = writeln!(out, "{:<21} {v}", format!("{k}:"));
    }
    if full {
        for w in s.workers.iter().filter(|w| w.state != SlotState::Free) {
            out.push_str("\n************************\n");
            for (k, v) in worker_fields(s, w) {
                let _ = writeln!(out, "{:<21} {v}", format!("{k}:"));
            }
        }
    }
    tasks::text(s, &mut out);
    out
}

/// Text fields that PHP-FPM's JSON gives as strings; everything else is a number.
fn is_text(key: &str) -> bool {
    matches!(
        key,
        "pool" | "process manager" | "state" | "request method" | "request URI" | "user" | "script"
    )
}

fn json(s: &Snapshot, full: bool) -> String {
    let object = |fields: Vec<(&'static str, String)>, start_time: u64| {
        let mut map = serde_json::Map::new();
        for (k, v) in fields {
            let value = if k == "start time" {
                serde_json::Value::from(start_time)
            } else if is_text(k) {
                serde_json::Value::from(v)
            } else if k == "last request cpu" {
                serde_json::Value::from(0.0)
            } else {
                v.parse::<u64>()
                    .map(serde_json::Value::from)
                    .unwrap_or(serde_json::Value::from(v))
            };
            map.insert(k.to_string(), value);
        }
        map
    };
    let mut pool = object(pool_fields(s), s.stats.start_time);
    let classes: serde_json::Map<String, serde_json::Value> = CLASSES
        .iter()
        .zip(s.metrics.classes)
        .map(|(class, n)| (class.to_string(), n.into()))
        .collect();
    pool.insert("requests by status".into(), classes.into());
    let buckets: serde_json::Map<String, serde_json::Value> = cumulative(&s.metrics)
        .into_iter()
        .map(|(le, n)| (le, n.into()))
        .collect();
    pool.insert(
        "request duration".into(),
        serde_json::json!({
            "buckets": buckets,
            "sum": s.metrics.duration_sum.as_secs_f64(),
            "count": s.metrics.buckets.iter().sum::<u64>(),
        }),
    );
    if full {
        let procs: Vec<serde_json::Value> = s
            .workers
            .iter()
            .filter(|w| w.state != SlotState::Free)
            .map(|w| {
                let start =
                    s.stats.start_time + w.started.saturating_sub(s.stats.started).as_secs();
                serde_json::Value::Object(object(worker_fields(s, w), start))
            })
            .collect();
        pool.insert("processes".into(), serde_json::Value::Array(procs));
    }
    if !s.tasks.is_empty() {
        pool.insert("tasks".into(), tasks::json(s));
    }
    serde_json::Value::Object(pool).to_string()
}

/// One pool-wide OpenMetrics family: name, type, help, and how to read its value.
type PoolMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Snapshot, &Figures) -> u64,
);

/// The pool-wide families, in the order they are written.
#[rustfmt::skip]
const POOL_METRICS: [PoolMetric; 18] = [
    ("accepted_connections", "counter", "Requests accepted by the pool.", |s, _| s.accepted),
    ("listen_queue", "gauge", "Connections waiting for a worker.", |_, f| f.listen_queue),
    ("max_listen_queue", "gauge", "The most connections that waited.",
        |s, f| s.stats.max_listen_queue.max(f.listen_queue)),
    ("listen_queue_length", "gauge", "The listen backlog.", |s, _| s.stats.backlog),
    ("idle_processes", "gauge", "Workers with room for a request.", |_, f| f.idle),
    ("active_processes", "gauge", "Workers running a request.", |_, f| f.active),
    ("total_processes", "gauge", "Workers.", |_, f| f.total),
    ("max_active_processes", "gauge", "The most workers ever active at once.",
        |s, f| s.stats.max_active.max(f.active)),
    ("max_children_reached", "counter", "Times the pool was at its maximum while requests waited.",
        |s, _| s.stats.max_children_reached),
    ("slow_requests", "counter", "Requests that ran past slow_request_timeout.",
        |s, _| s.stats.slow_requests),
    ("max_processes", "gauge", "The configured maximum of workers.", |s, _| s.stats.max_workers),
    ("generation", "gauge", "The current generation of workers.", |s, _| s.stats.generation),
    ("respawns", "counter", "Workers replaced after dying unexpectedly.", |s, _| s.stats.respawns),
    ("crash_loop_backoffs", "counter", "Respawns delayed by the crash-loop backoff.",
        |s, _| s.stats.backoffs),
    ("start_time_seconds", "gauge", "Unix time the master started.", |s, _| s.stats.start_time),
    ("queue_timeouts", "counter", "Requests answered 503 after waiting queue_timeout for a worker.",
        |s, _| s.metrics.queue_timeouts),
    ("queue_full", "counter", "Requests answered 503 at once, max_queue waiting already.",
        |s, _| s.metrics.queue_full),
    ("abandoned_in_queue", "counter", "Waiting requests dropped unrun, their client gone.",
        |s, _| s.metrics.abandoned),
];

/// One per-worker family (`?full`): name, type, help, and its extra labels and value.
type WorkerMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SlotSnapshot) -> (String, u64),
);

/// The per-worker families, in the order they are written.
#[rustfmt::skip]
const WORKER_METRICS: [WorkerMetric; 3] = [
    ("process_requests", "counter", "Requests one worker finished.",
        |w| (String::new(), w.requests)),
    ("process_state", "gauge", "What one worker is doing (1 for its state).",
        |w| (format!(",state=\"{}\"", state_name(w)), 1)),
    ("process_last_request_memory_bytes", "gauge", "Resident memory of one worker.",
        |w| (String::new(), w.rss)),
];

fn openmetrics(s: &Snapshot, full: bool) -> String {
    let f = figures(s);
    let pool = s.pool.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = String::new();
    for (name, kind, help, value) in POOL_METRICS {
        let _ = writeln!(out, "# TYPE fcgi_pool_{name} {kind}");
        let _ = writeln!(out, "# HELP fcgi_pool_{name} {help}");
        let suffix = if kind == "counter" { "_total" } else { "" };
        let _ = writeln!(
            out,
            "fcgi_pool_{name}{suffix}{{pool=\"{pool}\"}} {}",
            value(s, &f)
        );
    }
    request_metrics(&mut out, &pool, &s.metrics);
    if full {
        for (name, kind, help, sample) in WORKER_METRICS {
            let _ = writeln!(out, "# TYPE fcgi_pool_{name} {kind}");
            if name.ends_with("_bytes") {
                let _ = writeln!(out, "# UNIT fcgi_pool_{name} bytes");
            }
            let _ = writeln!(out, "# HELP fcgi_pool_{name} {help}");
            let suffix = if kind == "counter" { "_total" } else { "" };
            for w in s.workers.iter().filter(|w| w.state != SlotState::Free) {
                let (labels, value) = sample(w);
                let _ = writeln!(
                    out,
                    "fcgi_pool_{name}{suffix}{{pool=\"{pool}\",pid=\"{}\"{labels}}} {value}",
                    w.pid
                );
            }
        }
    }
    tasks::openmetrics(s, &pool, &mut out);
    out.push_str("# EOF\n");
    out
}

/// Requests the application answered: a counter by status class and a duration histogram.
fn request_metrics(out: &mut String, pool: &str, m: &Metrics) {
    let name = "fcgi_pool_requests";
    let _ = writeln!(out, "# TYPE {name} counter");
    let _ = writeln!(
        out,
        "# HELP {name} Requests the application answered, by status class."
    );
    for (class, n) in CLASSES.iter().zip(m.classes) {
        let _ = writeln!(out, "{name}_total{{pool=\"{pool}\",class=\"{class}\"}} {n}");
    }
    let name = "fcgi_pool_request_duration_seconds";
    let _ = writeln!(out, "# TYPE {name} histogram");
    let _ = writeln!(out, "# UNIT {name} seconds");
    let _ = writeln!(
        out,
        "# HELP {name} How long the application took to answer requests."
    );
    let buckets = cumulative(m);
    for (le, n) in &buckets {
        let _ = writeln!(out, "{name}_bucket{{pool=\"{pool}\",le=\"{le}\"}} {n}");
    }
    let count = buckets.last().map_or(0, |b| b.1);
    let sum = m.duration_sum.as_secs_f64();
    let _ = writeln!(out, "{name}_sum{{pool=\"{pool}\"}} {sum}");
    let _ = writeln!(out, "{name}_count{{pool=\"{pool}\"}} {count}");
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(s: &Snapshot, full: bool) -> String {
    let mut out = String::from(
        "<!DOCTYPE html>\n<html><head><title>pool status</title></head><body>\n<table>\n",
    );
    for (k, v) in pool_fields(s) {
        let _ = writeln!(
            out,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(&v)
        );
    }
    out.push_str("</table>\n");
    if full {
        out.push_str("<table>\n<tr>");
        let workers: Vec<&SlotSnapshot> = s
            .workers
            .iter()
            .filter(|w| w.state != SlotState::Free)
            .collect();
        if let Some(first) = workers.first() {
            for (k, _) in worker_fields(s, first) {
                let _ = write!(out, "<th>{}</th>", escape(k));
            }
        }
        out.push_str("</tr>\n");
        for w in workers {
            out.push_str("<tr>");
            for (_, v) in worker_fields(s, w) {
                let _ = write!(out, "<td>{}</td>", escape(&v));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
    }
    out.push_str("</body></html>\n");
    out
}

/// The CGI output (header block and body) for a status or ping request, or `None` when the
/// request is for the application.
pub(crate) fn answer(
    paths: &Paths,
    board: &crate::scoreboard::Scoreboard,
    req: &fcgi::server::Request,
) -> Option<Vec<u8>> {
    let p = &req.params;
    let path = p
        .get_str("SCRIPT_NAME")
        .filter(|s| !s.is_empty())
        .or_else(|| p.get_str("DOCUMENT_URI"))
        .unwrap_or("");
    let head_only = p.get_str("REQUEST_METHOD") == Some("HEAD");
    let (content_type, body) = if paths.ping.as_deref() == Some(path) {
        ("text/plain", format!("{}\n", paths.ping_response))
    } else if paths.status.as_deref() == Some(path) {
        let (format, full) = parse_query(p.get_str("QUERY_STRING").unwrap_or(""));
        let snapshot = Snapshot {
            pool: paths.pool.clone(),
            stats: board.stats(),
            workers: board.snapshot(),
            tasks: board.task_snapshot(),
            accepted: board.accepted(),
            metrics: board.metrics(),
            now: crate::clock::now(),
        };
        let (ct, body) = render(&snapshot, format, full);
        (ct, body)
    } else {
        return None;
    };
    let mut out = format!(
        "Status: 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache, no-store, must-revalidate, max-age=0\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests;
