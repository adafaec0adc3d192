//! The prefork supervisor end to end: the real `app-example` binary, real processes, real
//! signals, spoken to with the project's own FastCGI client over a unix socket and TCP.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::{
    assert_throughout, fcgi_request, fetch_pid, wait_until, worker_pids, App, TempDir, Via,
    WORKERS_DEADLINE,
};
use nix::sys::signal::Signal;

#[test]
fn static_pool_has_exactly_its_workers_and_serves_on_both_listeners() {
    let dir = TempDir::new("static");
    let app = App::start(&dir, &["--pm", "static", "--workers", "3"]);
    app.wait_for_workers(3);
    let unix = fcgi_request(&app.unix(), "GET", "/hello", b"").expect("unix request");
    assert_eq!((unix.status(), unix.body()), (200, &b"Hello, world!\n"[..]));
    let tcp = fcgi_request(&app.tcp(), "GET", "/hello", b"").expect("tcp request");
    assert_eq!((tcp.status(), tcp.body()), (200, &b"Hello, world!\n"[..]));
}

#[test]
fn dynamic_pool_grows_under_a_burst_and_shrinks_back() {
    let dir = TempDir::new("dynamic");
    let app = App::start(
        &dir,
        &[
            "--pm",
            "dynamic",
            "--workers",
            "6",
            "--start-workers",
            "2",
            "--min-spare",
            "1",
            "--max-spare",
            "2",
        ],
    );
    app.wait_for_workers(2);
    let started = Instant::now();
    let burst: Vec<_> = (0..6)
        .map(|_| {
            let addr = app.tcp();
            std::thread::spawn(move || fcgi_request(&addr, "GET", "/sleep?ms=4000", b""))
        })
        .collect();
    // Within the 4 s the requests sleep: the pool grew for them, not after them.
    app.wait_for_workers_within(6, Duration::from_secs(4));
    for t in burst {
        let res = t.join().expect("client thread").expect("burst request");
        assert_eq!(res.body(), b"slept 4000\n");
    }
    // Every request of the burst got a worker of its own at once (the first busy worker woke
    // the master), rather than at the master's tick (up to 5 s) or after one of the first two
    // finished (8 s).
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "burst took {:?}",
        started.elapsed()
    );
    // Back to max_spare.
    app.wait_for_workers(2);
}

#[test]
fn ondemand_starts_empty_spawns_for_a_request_and_reaps_idle_workers() {
    let dir = TempDir::new("ondemand");
    let app = App::start(
        &dir,
        &["--pm", "ondemand", "--workers", "4", "--idle-timeout", "1s"],
    );
    // Watch the master for over a full tick to prove it does not spawn on its own.
    app.wait_for_log("master started");
    assert_throughout(
        Duration::from_millis(1200),
        "ondemand starts with no worker",
        || worker_pids(app.pid()).is_empty(),
    );
    let res =
        fcgi_request(&app.unix(), "GET", "/hello", b"").expect("request through the unix socket");
    assert_eq!(res.status(), 200);
    assert_eq!(worker_pids(app.pid()).len(), 1);
    // Reaped after its 1 s idle timeout.
    app.wait_for_workers_within(0, Duration::from_secs(5));
}

#[test]
fn killed_worker_is_replaced_and_requests_keep_succeeding() {
    let dir = TempDir::new("respawn");
    let app = App::start(&dir, &["--pm", "static", "--workers", "1"]);
    let first = answering_worker(&app);
    let killed_at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL)
        .expect("kill worker");
    // The replacement's first answer: connections made meanwhile wait in the backlog.
    let second = answering_worker(&app);
    let elapsed = killed_at.elapsed();
    eprintln!("worker SIGKILL to replacement answering: {elapsed:?}");
    assert_ne!(first, second);
    for _ in 0..20 {
        let res = fcgi_request(&app.unix(), "GET", "/hello", b"").expect("request after respawn");
        assert_eq!(res.status(), 200);
    }
}

#[test]
fn workers_die_with_the_master() {
    let dir = TempDir::new("orphans");
    let app = App::start(&dir, &["--pm", "static", "--workers", "3"]);
    app.wait_for_workers(3);
    let workers = worker_pids(app.pid());
    app.signal(Signal::SIGKILL);
    let start = Instant::now();
    wait_until(
        Duration::from_secs(1),
        "every worker to exit after the master's SIGKILL",
        || {
            workers
                .iter()
                .all(|pid| !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(*pid))
        },
    );
    eprintln!("workers gone {:?} after the master died", start.elapsed());
}

#[test]
fn crash_loop_backs_off() {
    let dir = TempDir::new("crashloop");
    let app = App::start_with_env(
        &dir,
        &["--pm", "static", "--workers", "2"],
        &[("APP_EXAMPLE_FAIL_WORKER_INIT", "1")],
    );
    app.wait_for_log("crash-loop backoff");
    let deaths = || app.stderr().matches("worker died unexpectedly").count();
    wait_until(Duration::from_secs(15), "workers to keep dying", || {
        deaths() >= 3
    });
    // Without backoff two workers dying at once would respawn thousands of times in 3 s.
    assert_throughout(
        Duration::from_secs(3),
        "respawns bounded by the backoff (under 30 deaths)",
        || deaths() < 30,
    );
}

#[test]
fn setup_failure_exits_non_zero_with_the_reason() {
    let dir = TempDir::new("setupfail");
    let app = App::start_with_env(&dir, &[], &[("APP_EXAMPLE_FAIL_SETUP", "yes")]);
    let status = app
        .wait_exit(Duration::from_secs(10))
        .expect("exits on its own");
    assert_eq!(status.code(), Some(1));
    let err = app.stderr();
    assert!(err.contains("application setup failed"), "{err}");
    assert!(err.contains("APP_EXAMPLE_FAIL_SETUP"), "{err}");
}

#[test]
fn request_timeout_kills_and_replaces_the_worker() {
    let dir = TempDir::new("timeout");
    let app = App::start(
        &dir,
        &[
            "--pm",
            "static",
            "--workers",
            "1",
            "--request-timeout",
            "1s",
        ],
    );
    let before = answering_worker(&app);
    let res = fcgi_request(&app.unix(), "GET", "/sleep?ms=20000", b"");
    assert!(
        res.is_err(),
        "the hung request is cut off, not answered: {res:?}"
    );
    app.wait_for_log("request timeout");
    let after = answering_worker(&app);
    assert_ne!(before, after, "the worker was replaced");
    let log = app.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("request timeout"))
        .expect("timeout line");
    assert!(
        line.contains("/sleep?ms=20000") && line.contains("GET"),
        "{line}"
    );
}

#[test]
fn max_requests_recycles_workers_without_failing_a_request() {
    let dir = TempDir::new("recycle");
    let app = App::start(
        &dir,
        &["--pm", "static", "--workers", "2", "--max-requests", "5"],
    );
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..60 {
        let pid = fetch_pid(Via::Fcgi(&app.unix())).unwrap_or_else(|e| panic!("request {i}: {e}"));
        pids.insert(pid);
    }
    assert!(
        pids.len() >= 6,
        "60 requests at 5-ish per worker went through many workers: {pids:?}"
    );
}

#[test]
fn graceful_stop_finishes_the_request_in_flight() {
    let dir = TempDir::new("graceful");
    let app = App::start_with_env(
        &dir,
        &["--pm", "static", "--workers", "2"],
        &[("RUST_LOG", "debug")],
    );
    app.wait_for_workers(2);
    let addr = app.unix();
    let slow = std::thread::spawn(move || fcgi_request(&addr, "GET", "/sleep?ms=2000", b""));
    app.wait_for_log("request started");
    app.signal(Signal::SIGTERM);
    let res = slow
        .join()
        .expect("client thread")
        .expect("the in-flight request completes");
    assert_eq!((res.status(), res.body()), (200, &b"slept 2000\n"[..]));
    let status = app
        .wait_exit(Duration::from_secs(10))
        .expect("master exits");
    assert_eq!(status.code(), Some(0));
    assert!(!app.unix_path().exists(), "the unix socket file is removed");
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let dir = TempDir::new("badconfig");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--listen", "127.0.0.1:0", "--workers", "0"],
            "\"workers\"",
        ),
        (
            &["--listen", "127.0.0.1:0", "--request-timeout", "soon"],
            "\"request_timeout\"",
        ),
        (&["--listen", "127.0.0.1:0", "--pm", "sometimes"], "\"pm\""),
        (&["--listen", "nowhere"], "\"listen\""),
        (
            &["--listen", "127.0.0.1:0", "--no-such-flag"],
            "--no-such-flag",
        ),
    ];
    for (args, key) in cases {
        let (code, err) = App::run_to_exit(&dir, args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(key), "{args:?} names {key}: {err}");
    }
    let conf = dir.path().join("bad.toml");
    std::fs::write(&conf, "workers = 2\nwrokers = 3\n").expect("write config");
    let (code, err) = App::run_to_exit(
        &dir,
        &[
            "--config",
            conf.to_str().expect("utf-8 path"),
            "--check-config",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("wrokers"), "the unknown key is named: {err}");
    let (code, out) = App::run_to_exit(&dir, &["--check-config", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(0), "{out}");
}

/// The pid of the worker that answers `/pid`, once one does.
fn answering_worker(app: &App) -> i32 {
    let mut last = None;
    wait_until(WORKERS_DEADLINE, "a worker answering /pid", || {
        last = fetch_pid(Via::Fcgi(&app.unix())).ok();
        last.is_some()
    });
    last.expect("checked by wait_until")
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[test]
fn ttin_and_ttou_resize_the_pool() {
    let dir = TempDir::new("ttin");
    let app = App::start(&dir, &["--pm", "static", "--workers", "2"]);
    app.wait_for_workers(2);
    app.signal(Signal::SIGTTIN);
    app.wait_for_workers_within(3, Duration::from_secs(5));
    app.signal(Signal::SIGTTOU);
    app.wait_for_log("to=2");
    app.signal(Signal::SIGTTOU);
    app.wait_for_workers_within(1, Duration::from_secs(5));
    let r = fcgi_request(&app.unix(), "GET", "/hello", b"").expect("still serving");
    assert_eq!(r.status(), 200);
}

#[test]
fn an_idle_kept_alive_connection_closes_after_the_keepalive_timeout_and_not_before() {
    use std::io::{Read, Write};
    let dir = TempDir::new("keepalive");
    let app = App::start(&dir, &["--workers", "1", "--keepalive-timeout", "1500ms"]);
    let mut wire = bytes::BytesMut::new();
    let params = fcgi::Params::from_pairs([
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", "/hello"),
        ("SCRIPT_NAME", "/hello"),
    ]);
    let mut conn = std::os::unix::net::UnixStream::connect(app.unix_path()).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // Two requests on the connection, the second 1 s after the first: the timeout counts from
    // the last answer, not from the connection's start.
    let mut answered = Vec::new();
    for id in [1, 2] {
        wire.clear();
        fcgi::client::encode_request(id, fcgi::Role::Responder, true, &params, b"", &mut wire);
        conn.write_all(&wire).expect("send request");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // END_REQUEST (type 3) for this id ends the answer.
        while !got
            .windows(4)
            .any(|w| w == [1, 3, (id >> 8) as u8, id as u8])
        {
            let n = conn.read(&mut buf).expect("answer");
            assert_ne!(n, 0, "closed before answering request {id}");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&got).contains("Hello, world!"));
        answered.push(Instant::now());
        if id == 1 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).expect("EOF, not a timeout");
    let idle = answered[1].elapsed();
    assert_eq!(n, 0, "nothing but the close follows");
    assert!(
        idle >= Duration::from_millis(1500),
        "closed after {idle:?} idle"
    );
    assert!(idle < Duration::from_secs(10), "still open after {idle:?}");
}

#[test]
fn an_answer_does_not_wait_for_the_request_queued_behind_it() {
    // One worker, one request at a time: the second request waits for the first. The first
    // answer must reach its client when it is ready, not when the second request is done.
    let dir = TempDir::new("answer-first");
    let app = App::start(&dir, &["--workers", "1"]);
    let done = sleep_at_once(&app, 2, 600);
    assert!(
        done[1] - done[0] >= Duration::from_millis(300),
        "answers came at {done:?}: the first waited for the second request"
    );
}

#[test]
fn a_worker_runs_max_requests_in_flight_requests_at_once() {
    // One worker that may run three requests at once: one on its I/O thread, two on handler
    // threads. Three 800 ms requests end together (one after another would take 2.4 s), and a
    // fourth waits for room.
    let dir = TempDir::new("in-flight");
    let app = App::start(&dir, &["--workers", "1", "--max-requests-in-flight", "3"]);
    let done = sleep_at_once(&app, 4, 800);
    assert!(
        done[2] < Duration::from_millis(2000),
        "three requests at once: {done:?}"
    );
    assert!(
        done[3] >= Duration::from_millis(1600),
        "the fourth waited for room: {done:?}"
    );
}

/// Sends `clients` requests for `/sleep?ms=ms` at once, each on its own connection; returns
/// when each was answered, from the start, earliest first.
fn sleep_at_once(app: &App, clients: usize, ms: u64) -> Vec<Duration> {
    let start = Instant::now();
    let uri = format!("/sleep?ms={ms}");
    let clients: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, uri) = (app.unix(), uri.clone());
            std::thread::spawn(move || {
                let res = fcgi_request(&addr, "GET", &uri, b"").expect("answer");
                assert_eq!(res.status(), 200);
                start.elapsed()
            })
        })
        .collect();
    let mut done: Vec<Duration> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    done.sort();
    done
}
