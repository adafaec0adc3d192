//! A dynamic or ondemand pool starts workers for waiting requests at once, not at the master's
//! one-second tick: a worker at its cap that sees connections waiting wakes the master.

use std::time::{Duration, Instant};

use e2e::{assert_throughout, fcgi_request, worker_pids, App, TempDir};

/// Sends `clients` requests for `/sleep?ms=ms` at once, each on its own connection; returns
/// when each was answered, from the start, earliest first.
fn sleep_at_once(app: &App, clients: usize, ms: u64) -> Vec<Duration> {
    let start = Instant::now();
    let uri = format!("/sleep?ms={ms}");
    let clients: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, uri) = (app.tcp(), uri.clone());
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

#[test]
fn a_dynamic_pool_of_one_starts_a_worker_for_each_waiting_request_at_once() {
    let dir = TempDir::new("grow-dynamic");
    let app = App::start(
        &dir,
        &[
            "--pm",
            "dynamic",
            "--workers",
            "8",
            "--start-workers",
            "1",
            "--min-spare",
            "1",
            "--max-spare",
            "1",
        ],
    );
    app.wait_for_workers(1);
    // 6 requests of 3 s: at the tick the last 5 would end near 4 s.
    let done = sleep_at_once(&app, 6, 3000);
    eprintln!("dynamic, 6 x 3 s from 1 worker: answered at {done:?}");
    let last = done[done.len() - 1];
    assert!(
        last < Duration::from_millis(3500),
        "all answered within 3.5 s: {done:?}"
    );
}

#[test]
fn an_ondemand_pool_starts_workers_for_a_burst_from_empty_at_once() {
    let dir = TempDir::new("grow-ondemand");
    let app = App::start(
        &dir,
        &[
            "--pm",
            "ondemand",
            "--workers",
            "8",
            "--idle-timeout",
            "10s",
        ],
    );
    assert_throughout(
        Duration::from_millis(200),
        "ondemand starts with no worker",
        || worker_pids(app.pid()).is_empty(),
    );
    let done = sleep_at_once(&app, 4, 2000);
    eprintln!("ondemand, 4 x 2 s from empty: answered at {done:?}");
    let last = done[done.len() - 1];
    assert!(
        last < Duration::from_millis(2500),
        "all answered within 2.5 s: {done:?}"
    );
    assert_eq!(worker_pids(app.pid()).len(), 4, "one worker each, no more");
}
