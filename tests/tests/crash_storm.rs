//! Deaths that must not cost the service: a client crashing a worker with every request keeps
//! the pool at its size, while workers that cannot start still back off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{fcgi_request, wait_until, App, TempDir};

/// How long the storm lasts: the figure.
const STORM: Duration = Duration::from_secs(5);

/// How often the second client asks for `/hello`, as in the issue.
const HELLO_EVERY: Duration = Duration::from_millis(20);

/// The worst `/hello` latency allowed during the storm. The issue asks for 50 ms, and that is
/// what this measures on a quiet machine (4-70 ms here, with other builds running); the bound
/// is wider for two shared, loaded cores, and still well under what a backoff costs (100 ms
/// doubling, the pool at 0 meanwhile).
const HELLO_WORST: Duration = Duration::from_millis(500);

/// How often the pool is sampled during the storm.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// The share of samples that must find the whole pool, counting a dead worker the master has
/// not reaped yet as one being replaced: the others fall between a reap and the fork of the
/// replacement, a fraction of a millisecond each. Measured 82-91% on two loaded cores, and
/// once just under 80% in three back-to-back runs; the old backoff rule gave 2.7%, so 60%
/// still tells the two apart without failing on a busy machine.
const FULL_SHARE: f64 = 0.6;

/// The share of samples that must find 2 live workers. With `/crash` repeated as fast as the
/// pool answers, each worker lives a few milliseconds and the kernel and the master take about
/// one more to reap it, so the pool is mostly replacing one: measured 49-53% on two loaded
/// cores (the issue saw 0% with the old backoff). Set well below that for a busier machine.
const FULL_ANYWAY: f64 = 0.25;

/// The crash-loop backoff's log line.
const BACKOFF: &str = "workers keep dying before they serve: delaying respawn (crash-loop backoff)";

/// Every JSON log line whose `message` is `message`, in order (complete lines only).
fn json_lines(log: &str, message: &str) -> Vec<serde_json::Value> {
    let complete = log.rfind('\n').map_or("", |end| &log[..=end]);
    complete
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == message)
        .collect()
}

/// The master's children at one moment.
#[derive(Debug)]
struct Children {
    /// Running (a worker that is dying but not yet a zombie counts here too).
    live: usize,
    /// Exited and not yet reaped: zombies.
    dead: usize,
}

/// The master's children, read from its `children` list: one file and a stat per child.
/// (`worker_pids` scans all of /proc, which takes longer than a worker lives in this storm,
/// so its counts miss the replacements of workers that die during the scan.)
fn children(master: i32) -> Children {
    let mut c = Children { live: 0, dead: 0 };
    let Ok(list) = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")) else {
        return c;
    };
    for pid in list.split_whitespace() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        match stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next())
        {
            Some("Z") => c.dead += 1,
            Some(_) => c.live += 1,
            None => {}
        }
    }
    c
}

#[test]
fn a_crash_storm_keeps_the_pool_at_its_size_and_hello_answered() {
    let dir = TempDir::new("crash-storm");
    let app = App::start(
        &dir,
        &["--pm", "static", "--workers", "2", "--log-format", "json"],
    );
    app.wait_for_workers(2);
    let stop = Arc::new(AtomicBool::new(false));
    let crasher = {
        let (addr, stop) = (app.unix(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut crashes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // Each on a new connection; the worker aborts, so this is an error.
                let res = fcgi_request(&addr, "GET", "/crash", b"");
                assert!(res.is_err(), "/crash answered: {res:?}");
                crashes += 1;
            }
            crashes
        })
    };
    let hello = {
        let (addr, stop) = (app.unix(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let res = fcgi_request(&addr, "GET", "/hello", b"")
                    .unwrap_or_else(|e| panic!("/hello {} failed: {e}", latencies.len()));
                assert_eq!(res.status(), 200);
                latencies.push(sent.elapsed());
                std::thread::sleep(HELLO_EVERY.saturating_sub(sent.elapsed()));
            }
            latencies
        })
    };
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < STORM {
        samples.push(children(app.pid()));
        std::thread::sleep(SAMPLE_EVERY);
    }
    stop.store(true, Ordering::Relaxed);
    let crashes = crasher.join().expect("crashing client");
    let latencies = hello.join().expect("hello client");

    let worst = latencies.iter().max().copied().unwrap_or_default();
    let share = |f: &dyn Fn(&Children) -> bool| {
        samples.iter().filter(|c| f(c)).count() as f64 / samples.len() as f64
    };
    let full = share(&|c| c.live == 2);
    let full_or_reaping = share(&|c| c.live + c.dead == 2);
    eprintln!(
        "{crashes} crashes in {STORM:?}; {} /hello, worst {worst:?}; of {} samples the pool was \
         at 2 in {:.1}%, at 2 or short only by dead workers not yet reaped in {:.1}%",
        latencies.len(),
        samples.len(),
        full * 100.0,
        full_or_reaping * 100.0,
    );
    assert!(crashes >= 50, "the storm was real: {crashes} crashes");
    // 250 at most; fewer when the machine starves this test's own threads (2 cores, shared,
    // beside the crashing client and the workers it keeps the master forking).
    assert!(
        latencies.len() >= 50,
        "/hello kept being asked and answered: {} (worst {worst:?})",
        latencies.len()
    );
    assert!(worst < HELLO_WORST, "worst /hello took {worst:?}");
    assert!(
        samples.iter().all(|c| c.live <= 2),
        "never more than the pool: {samples:?}"
    );
    // A worker the master has reaped is replaced in the same loop turn, so the pool is short
    // only by workers still dying or not yet reaped. A backoff would leave it short of reaped
    // workers for 100 ms and more at a time.
    assert!(
        full_or_reaping >= FULL_SHARE,
        "the pool was at 2, or replacing the dead, in only {:.1}% of samples",
        full_or_reaping * 100.0
    );
    assert!(
        full >= FULL_ANYWAY,
        "the pool was at 2 in only {:.1}% of samples",
        full * 100.0
    );

    let log = app.stderr();
    assert!(
        json_lines(&log, BACKOFF).is_empty(),
        "a storm of crashes in requests is no crash loop"
    );
    // Each death names the request it cost.
    let deaths = json_lines(&log, "worker died unexpectedly");
    assert!(deaths.len() >= 50, "{} deaths logged", deaths.len());
    let named = deaths
        .iter()
        .filter(|d| d["method"] == "GET" && d["uri"] == "/crash")
        .count();
    assert_eq!(named, deaths.len(), "every death names GET /crash");
    // The pool is whole right after the storm, not seconds later.
    app.wait_for_workers_within(2, Duration::from_secs(1));
}

#[test]
fn workers_whose_init_fails_back_off_with_growing_delays() {
    let dir = TempDir::new("init-fails");
    let app = App::start_with_env(
        &dir,
        &["--pm", "static", "--workers", "2", "--log-format", "json"],
        &[("APP_EXAMPLE_FAIL_WORKER_INIT", "1")],
    );
    let backoffs = || json_lines(&app.stderr(), BACKOFF);
    // 100 + 200 + 400 ms of holding before the fourth: a few seconds on a loaded machine.
    wait_until(Duration::from_secs(15), "four backoff lines", || {
        backoffs().len() >= 4
    });
    let delays: Vec<u64> = backoffs()
        .iter()
        .map(|l| l["delay_ms"].as_u64().expect("delay_ms"))
        .collect();
    eprintln!("backoff delays: {delays:?}");
    assert_eq!(&delays[..3], &[100, 200, 400], "doubling from 100 ms");
    assert!(
        delays.windows(2).all(|d| d[1] >= d[0]),
        "delays only grow: {delays:?}"
    );
    // The deaths are the init failures, before any request.
    let died = json_lines(&app.stderr(), "worker died unexpectedly");
    assert!(died
        .iter()
        .all(|d| d["requests"] == 0 && d.get("uri").is_none()));
}
