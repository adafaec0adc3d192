//! The status page's formats, from a fixed snapshot.

use super::*;

fn snapshot() -> Snapshot {
    let worker = |pid: i32, state: SlotState, in_flight: u32| SlotSnapshot {
        index: 0,
        pid,
        generation: 2,
        state,
        started: Duration::from_secs(100),
        since: Duration::from_secs(150),
        requests: 7,
        in_flight,
        method: "GET".into(),
        uri: "/sleep?ms=5".into(),
        content_length: 0,
        last_duration: Duration::from_micros(1500),
        rss: 4096,
        held: 1,
    };
    Snapshot {
        pool: "www".into(),
        stats: PoolStats {
            start_time: 1_795_000_000,
            started: Duration::from_secs(90),
            mode: 1,
            max_workers: 4,
            generation: 2,
            respawns: 3,
            backoffs: 1,
            max_children_reached: 0,
            slow_requests: 2,
            listen_queue: 5,
            max_listen_queue: 9,
            backlog: 511,
            max_active: 2,
        },
        workers: vec![
            worker(11, SlotState::Busy, 1),
            worker(12, SlotState::Idle, 0),
        ],
        tasks: Vec::new(),
        accepted: 42,
        metrics: metrics(),
        now: Duration::from_secs(200),
    }
}

/// 10 x 200 in 3 ms, 3 x 404 in 7 ms, 2 x 500 at 300 ms, and refusals 4, 5 and 6.
fn metrics() -> Metrics {
    let mut buckets = [0; DURATION_BUCKETS.len() + 1];
    buckets[0] = 10;
    buckets[1] = 3;
    buckets[6] = 2;
    Metrics {
        queue_timeouts: 4,
        queue_full: 5,
        abandoned: 6,
        classes: [0, 10, 0, 3, 2],
        buckets,
        duration_sum: Duration::from_millis(10 * 3 + 3 * 7 + 2 * 300),
    }
}

#[test]
fn admission_counters_in_every_format() {
    let (_, text) = render(&snapshot(), Format::Text, false);
    assert!(
        text.contains(
            "queue timeouts:       4\nqueue full:           5\nabandoned in queue:   6\n"
        ),
        "{text}"
    );
    let (_, json) = render(&snapshot(), Format::Json, false);
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(
        (
            &v["queue timeouts"],
            &v["queue full"],
            &v["abandoned in queue"]
        ),
        (&4.into(), &5.into(), &6.into())
    );
    assert_eq!(v["requests by status"]["2xx"], 10);
    assert_eq!(v["requests by status"]["5xx"], 2);
    assert_eq!(v["request duration"]["buckets"]["0.005"], 10);
    assert_eq!(v["request duration"]["buckets"]["0.01"], 13);
    assert_eq!(v["request duration"]["buckets"]["0.5"], 15);
    assert_eq!(v["request duration"]["buckets"]["+Inf"], 15);
    assert_eq!(v["request duration"]["count"], 15);
    let (_, om) = render(&snapshot(), Format::OpenMetrics, false);
    for line in [
        "fcgi_pool_queue_timeouts_total{pool=\"www\"} 4\n",
        "fcgi_pool_queue_full_total{pool=\"www\"} 5\n",
        "fcgi_pool_abandoned_in_queue_total{pool=\"www\"} 6\n",
    ] {
        assert!(om.contains(line), "{line} in {om}");
    }
}

#[test]
fn openmetrics_request_classes_and_a_cumulative_histogram() {
    let (_, om) = render(&snapshot(), Format::OpenMetrics, false);
    let expected = "\
# TYPE fcgi_pool_requests counter
# HELP fcgi_pool_requests Requests the application answered, by status class.
fcgi_pool_requests_total{pool=\"www\",class=\"1xx\"} 0
fcgi_pool_requests_total{pool=\"www\",class=\"2xx\"} 10
fcgi_pool_requests_total{pool=\"www\",class=\"3xx\"} 0
fcgi_pool_requests_total{pool=\"www\",class=\"4xx\"} 3
fcgi_pool_requests_total{pool=\"www\",class=\"5xx\"} 2
# TYPE fcgi_pool_request_duration_seconds histogram
# UNIT fcgi_pool_request_duration_seconds seconds
# HELP fcgi_pool_request_duration_seconds How long the application took to answer requests.
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"0.005\"} 10
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"0.01\"} 13
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"0.025\"} 13
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"0.05\"} 13
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"0.1\"} 13
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"0.25\"} 13
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"0.5\"} 15
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"1.0\"} 15
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"2.5\"} 15
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"5.0\"} 15
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"10.0\"} 15
fcgi_pool_request_duration_seconds_bucket{pool=\"www\",le=\"+Inf\"} 15
fcgi_pool_request_duration_seconds_sum{pool=\"www\"} 0.651
fcgi_pool_request_duration_seconds_count{pool=\"www\"} 15
";
    assert!(om.contains(expected), "{om}");
}

#[test]
fn text_has_php_fpm_fields() {
    let (ct, body) = render(&snapshot(), Format::Text, false);
    assert_eq!(ct, "text/plain");
    assert!(
        body.starts_with("pool:                 www\nprocess manager:      dynamic\n"),
        "{body}"
    );
    assert!(
        body.contains("start time:           18/Nov/2026:11:06:40 +0000\n"),
        "{body}"
    );
    assert!(body.contains("start since:          110\n"));
    assert!(body.contains("accepted conn:        42\n"));
    assert!(
        body.contains("listen queue:         7\n"),
        "kernel 5 + held 2: {body}"
    );
    assert!(body
        .contains("idle processes:       1\nactive processes:     1\ntotal processes:      2\n"));
}

#[test]
fn json_full_parses_with_numbers() {
    let (_, body) = render(&snapshot(), Format::Json, true);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["accepted conn"], 42);
    assert_eq!(v["start time"], 1_795_000_000u64);
    assert_eq!(v["process manager"], "dynamic");
    assert_eq!(v["processes"][0]["state"], "Running");
    assert_eq!(v["processes"][1]["request URI"], "/sleep?ms=5");
    assert_eq!(v["processes"][1]["request duration"], 1500);
}

#[test]
fn openmetrics_lines_follow_the_grammar() {
    let (ct, body) = render(&snapshot(), Format::OpenMetrics, true);
    assert!(ct.starts_with("application/openmetrics-text; version=1.0.0"));
    assert!(body.ends_with("# EOF\n"));
    for line in body.lines() {
        let ok = line == "# EOF"
            || line.starts_with("# TYPE fcgi_pool_")
            || line.starts_with("# HELP fcgi_pool_")
            || line.starts_with("# UNIT fcgi_pool_")
            || (line.starts_with("fcgi_pool_")
                && line.contains("{pool=\"www\"")
                && line
                    .rsplit(' ')
                    .next()
                    .is_some_and(|v| v.parse::<f64>().is_ok()));
        assert!(ok, "bad line: {line}");
    }
    assert!(body.contains("fcgi_pool_accepted_connections_total{pool=\"www\"} 42\n"));
}

#[test]
fn query_picks_format_and_full() {
    assert_eq!(parse_query(""), (Format::Text, false));
    assert_eq!(parse_query("json&full"), (Format::Json, true));
    assert_eq!(parse_query("full&openmetrics"), (Format::OpenMetrics, true));
    assert_eq!(parse_query("html"), (Format::Html, false));
}

#[test]
fn start_time_format() {
    assert_eq!(clf_time(0), "01/Jan/1970:00:00:00 +0000");
    assert_eq!(clf_time(1_795_000_000), "18/Nov/2026:11:06:40 +0000");
}

#[test]
fn task_rows_appear_in_every_format() {
    use crate::scoreboard::{TaskRole, TaskSnapshot, TaskState};
    let mut s = snapshot();
    s.tasks.push(TaskSnapshot {
        index: 0,
        name: "drain".into(),
        pid: 31,
        generation: 2,
        state: TaskState::Idle,
        role: TaskRole::Leader,
        started: Duration::from_secs(120),
        run_start: Duration::from_secs(190),
        run_start_unix_ms: 1_795_000_100_000,
        last_duration: Duration::from_millis(250),
        iterations: 9,
        errors: 1,
        epoch: 4,
        last_error: "database went away".into(),
    });
    let (_, text) = render(&s, Format::Text, false);
    assert!(text.contains("task:                 drain\n"), "{text}");
    assert!(text.contains("role:                 leader\n"), "{text}");
    assert!(text.contains("last run duration:    250000\n"), "{text}");
    assert!(
        text.contains("last error:           database went away\n"),
        "{text}"
    );
    let (_, json) = render(&s, Format::Json, false);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    let t = &v["tasks"][0];
    assert_eq!(t["task"], "drain");
    assert_eq!(t["epoch"], 4);
    assert_eq!(t["iterations"], 9);
    assert_eq!(t["state"], "idle");
    let (_, metrics) = render(&s, Format::OpenMetrics, false);
    assert!(
        metrics.contains(
            "fcgi_pool_task_iterations_total{pool=\"www\",task=\"drain\",pid=\"31\"} 9\n"
        ),
        "{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"));
    let (_, none) = render(&snapshot(), Format::Json, false);
    assert!(!none.contains("tasks"), "no tasks, no key: {none}");
}
