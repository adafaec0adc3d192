//! Reading the application's JSON log (`--log-format json`: one object a line) for an event.

use std::time::Duration;

use serde_json::Value;

use crate::wait_until;

/// How long an event may take to reach the log: as long as a worker takes to start, spawn and
/// be reaped on a loaded machine, with room to spare.
pub const LOG_DEADLINE: Duration = Duration::from_secs(15);

/// The first line of the JSON log `log` whose `message` is `message`. Every complete line must
/// be JSON, or this panics naming it: a JSON log holds nothing else. A last line without its
/// line feed is still being written and is left for the next read.
pub fn json_log_line(log: &str, message: &str) -> Option<Value> {
    let complete = log.rfind('\n').map_or("", |end| &log[..=end]);
    let lines: Vec<Value> = complete
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    lines.into_iter().find(|l| l["message"] == message)
}

/// Polls `read` (the log's text so far) until [`json_log_line`] finds `message`, for up to
/// [`LOG_DEADLINE`].
pub fn wait_for_json_line(mut read: impl FnMut() -> String, message: &str) -> Value {
    let mut found = None;
    wait_until(
        LOG_DEADLINE,
        &format!("the JSON log line {message:?}"),
        || {
            found = json_log_line(&read(), message);
            found.is_some()
        },
    );
    found.expect("checked by wait_until")
}
