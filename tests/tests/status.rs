//! The status page, the ping and the logs an operator runs on.

use std::time::{Duration, Instant};

use e2e::log::wait_for_json_line;
use e2e::{fcgi_request, http, openmetrics, wait_until, worker_pids, Addr, App, Nginx, TempDir};
use nix::sys::signal::Signal;

const PATHS: [&str; 4] = ["--status-path", "/status", "--ping-path", "/ping"];

fn start(dir: &TempDir, extra: &[&str]) -> App {
    let mut args: Vec<&str> = PATHS.to_vec();
    args.extend_from_slice(extra);
    App::start(dir, &args)
}

fn status_json(addr: &Addr) -> serde_json::Value {
    let r = fcgi_request(addr, "GET", "/status?json&full", b"").expect("status");
    assert_eq!(r.status(), 200);
    serde_json::from_slice(r.body()).expect("status JSON")
}

#[test]
fn every_format_parses_and_counts_right() {
    let dir = TempDir::new("status-formats");
    let app = start(&dir, &["--workers", "2"]);
    app.wait_for_workers(2);
    for _ in 0..5 {
        assert_eq!(
            fcgi_request(&app.unix(), "GET", "/hello", b"")
                .expect("hello")
                .status(),
            200
        );
    }

    let r = fcgi_request(&app.unix(), "GET", "/status", b"").expect("text");
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(
        r.header("cache-control").as_deref(),
        Some("no-cache, no-store, must-revalidate, max-age=0")
    );
    let text = String::from_utf8_lossy(r.body()).into_owned();
    let fields: std::collections::HashMap<&str, &str> = text
        .lines()
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim(), v.trim())))
        .collect();
    assert_eq!(fields.get("pool"), Some(&"www"));
    assert_eq!(fields.get("process manager"), Some(&"static"));
    assert_eq!(fields.get("accepted conn"), Some(&"5"), "{text}");
    assert_eq!(fields.get("total processes"), Some(&"2"));
    assert_eq!(fields.get("listen queue len"), Some(&"511"));

    let json = status_json(&app.unix());
    assert_eq!(json["accepted conn"], 5);
    assert_eq!(json["processes"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["max processes"], 2);
    assert_eq!(json["generation"], 1);

    let r = fcgi_request(&app.unix(), "GET", "/status?openmetrics&full", b"").expect("openmetrics");
    assert_eq!(
        r.header("content-type").as_deref(),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let metrics = String::from_utf8_lossy(r.body()).into_owned();
    assert!(metrics.ends_with("# EOF\n"));
    let samples = openmetrics::check(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    for s in &samples {
        assert!(s.name.starts_with("fcgi_pool_"), "{s:?}");
        assert_eq!(
            s.labels.first().map(|(n, v)| (n.as_str(), v.as_str())),
            Some(("pool", "www")),
            "{s:?}"
        );
    }
    assert!(metrics.contains("fcgi_pool_accepted_connections_total{pool=\"www\"} 5\n"));
    // With `full`, one state sample for each worker, named by its pid.
    let mut pids: Vec<i32> = samples
        .iter()
        .filter(|s| s.name == "fcgi_pool_process_state")
        .map(|s| {
            s.label("pid")
                .and_then(|p| p.parse().ok())
                .expect("a pid label")
        })
        .collect();
    let mut workers = worker_pids(app.pid());
    pids.sort();
    workers.sort();
    assert_eq!(pids, workers, "{metrics}");

    let r = fcgi_request(&app.unix(), "GET", "/status?html", b"").expect("html");
    assert!(String::from_utf8_lossy(r.body()).contains("<th>accepted conn</th><td>5</td>"));

    let r = fcgi_request(&app.unix(), "HEAD", "/ping", b"").expect("HEAD ping");
    assert_eq!((r.status(), r.body().len()), (200, 0));
    let r = fcgi_request(&app.unix(), "GET", "/ping", b"").expect("ping");
    assert_eq!(r.body(), b"pong\n");
}

#[test]
fn busy_workers_and_waiting_connections_are_counted_and_status_still_answers() {
    let dir = TempDir::new("status-busy");
    let app = start(&dir, &["--workers", "2"]);
    app.wait_for_workers(2);
    // Two requests keep both workers busy, three more wait for them.
    let slow: Vec<_> = (0..5)
        .map(|_| {
            let addr = app.unix();
            std::thread::spawn(move || fcgi_request(&addr, "GET", "/sleep?ms=3000", b""))
        })
        .collect();
    wait_until(
        Duration::from_secs(5),
        "2 active processes and 3 waiting",
        || {
            let s = status_json(&app.unix());
            s["active processes"] == 2 && s["listen queue"].as_u64().is_some_and(|q| q >= 3)
        },
    );
    for path in ["/status", "/ping"] {
        let t = Instant::now();
        let r = fcgi_request(&app.unix(), "GET", path, b"").expect("answered");
        let took = t.elapsed();
        assert_eq!(r.status(), 200);
        assert!(
            took < Duration::from_millis(100),
            "{path} took {took:?} while every worker was busy"
        );
    }
    for t in slow {
        let r = t
            .join()
            .expect("client")
            .expect("every waiting request is served in the end");
        assert_eq!(r.body(), b"slept 3000\n");
    }
}

#[test]
fn worker_exit_and_timeout_lines_in_json() {
    let dir = TempDir::new("status-logs");
    let app = start(
        &dir,
        &[
            "--workers",
            "1",
            "--log-format",
            "json",
            "--request-timeout",
            "1s",
        ],
    );
    let r = fcgi_request(&app.unix(), "GET", "/sleep?ms=10000", b"").expect("answered");
    assert_eq!(
        r.status(),
        504,
        "the worker answers the request at its timeout"
    );
    let timeout = app.wait_for_json_line("request timeout: ending worker");
    assert_eq!(timeout["method"], "GET");
    assert_eq!(timeout["uri"], "/sleep?ms=10000");
    assert!(timeout["elapsed_ms"].as_u64().is_some_and(|ms| ms >= 1000));
    assert!(timeout["pid"].as_i64().is_some());
    let exit = app.wait_for_json_line("worker exited");
    assert_eq!(exit["pid"], timeout["pid"]);
    assert_eq!(exit["generation"], 1);
    assert!(exit["cause"]
        .as_str()
        .is_some_and(|c| c.starts_with("signal SIG") || c.starts_with("exit code")));
    assert!(exit["lifetime_ms"].as_u64().is_some());
    assert!(exit["requests"].as_u64().is_some());

    // A worker killed from outside: its line says which signal. (The replacement of the
    // worker that timed out is forked after its exit line: wait for it.)
    app.wait_for_workers(1);
    let pid = worker_pids(app.pid())[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
    let died = app.wait_for_json_line("worker died unexpectedly");
    assert_eq!(died["pid"], pid);
    assert_eq!(died["cause"], "signal SIGKILL");
}

#[test]
fn status_and_ping_through_nginx() {
    let dir = TempDir::new("status-nginx");
    let app = start(&dir, &["--workers", "1"]);
    let nginx = Nginx::start(&dir, &format!("unix:{}", app.unix_path().display()), true);
    let r = http::get(nginx.port(), "/status?json").expect("status");
    assert_eq!(r.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(json["pool"], "www");
    let r = http::get(nginx.port(), "/ping").expect("ping");
    assert_eq!((r.status, &r.body[..]), (200, &b"pong\n"[..]));
    assert_eq!(
        r.header("cache-control"),
        Some("no-cache, no-store, must-revalidate, max-age=0")
    );
}

#[test]
fn log_file_is_reopened_on_usr1_and_access_log_lines_name_the_request() {
    let dir = TempDir::new("status-logfile");
    let log = dir.path().join("app.log");
    let log_arg = log.to_str().expect("utf-8 path").to_string();
    let app = start(
        &dir,
        &[
            "--workers",
            "1",
            "--log-file",
            &log_arg,
            "--access-log",
            "--log-format",
            "json",
        ],
    );
    let r = fcgi_request(&app.unix(), "GET", "/hello?x=1", b"").expect("hello");
    assert_eq!(r.status(), 200);
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let line = wait_for_json_line(read_log, "request");
    assert_eq!(
        (
            line["uri"].as_str(),
            line["method"].as_str(),
            line["status"].as_u64()
        ),
        (Some("/hello?x=1"), Some("GET"), Some(200))
    );
    assert!(line["duration_ms"].as_f64().is_some() && line["pid"].as_i64().is_some());

    // logrotate moves the file away, then asks for a new one.
    std::fs::rename(&log, dir.path().join("app.log.1")).expect("rotate");
    app.signal(Signal::SIGUSR1);
    wait_until(
        Duration::from_secs(5),
        "a new log file from the master and the worker",
        || std::fs::read_to_string(&log).is_ok_and(|t| t.matches("log file reopened").count() == 2),
    );
    let r = fcgi_request(&app.unix(), "GET", "/hello?after=rotation", b"").expect("hello");
    assert_eq!(r.status(), 200);
    // The new file's only access line.
    let line = wait_for_json_line(read_log, "request");
    assert_eq!(line["uri"], "/hello?after=rotation");
}

#[test]
fn openmetrics_escapes_a_pool_name_with_quotes_and_backslashes() {
    let dir = TempDir::new("status-escape");
    let pool = r#"a "quoted" \ pool"#;
    let app = start(&dir, &["--workers", "1", "--pool-name", pool]);
    app.wait_for_workers(1);
    let r = fcgi_request(&app.unix(), "GET", "/status?openmetrics&full", b"").expect("openmetrics");
    assert_eq!(r.status(), 200);
    let metrics = String::from_utf8_lossy(r.body()).into_owned();
    let samples = openmetrics::check(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    assert!(!samples.is_empty(), "{metrics}");
    for s in &samples {
        assert_eq!(s.label("pool"), Some(pool), "{s:?}");
    }
}
