//! Several hosts behind one nginx (the rig in `tests/src/hosts.rs`: network namespaces, one
//! master each, nginx's `upstream` with keep_conn on), under GET and POST load, every response
//! counted: a host killed, a host drained, a rolling upgrade, a host's network cut.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use e2e::hosts::{Frontend, Rig};
use e2e::http::{self, Body};
use e2e::{wait_until, worker_pids};
use nix::sys::signal::Signal;

/// Client threads of the load: each has at most one request in flight.
const CLIENTS: usize = 6;

/// What every host runs: a small static pool, so the load keeps every worker busy.
const APP_ARGS: &[&str] = &["--pm", "static", "--workers", "2"];

/// How soon after a host dies nginx has seen every kept-alive connection to it close: the
/// next turns of its event loop, milliseconds, stretched by a loaded machine.
const DEATH_NOTICED: Duration = Duration::from_millis(250);

/// One request of the load.
#[derive(Debug, Clone)]
struct Outcome {
    method: &'static str,
    path: &'static str,
    /// 0: no HTTP answer at all (nginx itself failed).
    status: u16,
    start: Instant,
    took: Duration,
}

/// GET /hello and POST /echo (every other request), and on one client a slow GET, until
/// stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Outcome>>>,
}

impl Load {
    fn start(port: u16, slow: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..CLIENTS)
            .map(|c| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut out = Vec::new();
                    // Bounded whatever happens to the stop flag.
                    let until = Instant::now() + Duration::from_secs(120);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                        i += 1;
                        let start = Instant::now();
                        let body = format!("post {c} {i}\n");
                        let (method, path, r) = if slow && c == 0 {
                            ("GET", "/sleep?ms=300", http::get(port, "/sleep?ms=300"))
                        } else if i.is_multiple_of(2) {
                            let r = http::request(
                                port,
                                "POST",
                                "/echo",
                                &[],
                                Body::Bytes(body.as_bytes()),
                            );
                            ("POST", "/echo", r)
                        } else {
                            ("GET", "/hello", http::get(port, "/hello"))
                        };
                        let status = match r {
                            Ok(r) if r.status == 200 && method == "POST" => {
                                assert_eq!(r.body, body.as_bytes(), "the echo is the body sent");
                                200
                            }
                            Ok(r) => r.status,
                            Err(_) => 0,
                        };
                        out.push(Outcome {
                            method,
                            path,
                            status,
                            start,
                            took: start.elapsed(),
                        });
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().expect("a load thread"))
            .collect()
    }
}

fn failed(outcomes: &[Outcome]) -> Vec<&Outcome> {
    outcomes.iter().filter(|o| o.status != 200).collect()
}

/// Requests in flight at `at`.
fn in_flight_at(outcomes: &[Outcome], at: Instant) -> usize {
    outcomes
        .iter()
        .filter(|o| o.start <= at && o.start + o.took >= at)
        .count()
}

/// One line of the rig's access log.
struct Logged {
    at: f64,
    status: u16,
    /// The hosts tried, in order; the last one answered.
    tried: Vec<String>,
}

fn access(rig: &Rig) -> Vec<Logged> {
    rig.access_log()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            Some(Logged {
                at: f.first()?.parse().ok()?,
                status: f.get(3)?.parse().ok()?,
                tried: f
                    .get(4)?
                    .split([',', ':'])
                    .map(str::trim)
                    .filter(|s| s.contains('.'))
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Seconds since the epoch, as nginx's `$msec`.
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs_f64()
}

/// Requests host `ip` answered in the access log after `since` (unix seconds).
fn answered_by(rig: &Rig, ip: &str, since: f64) -> usize {
    access(rig)
        .iter()
        .filter(|l| l.at >= since && l.tried.last().is_some_and(|t| t == ip))
        .count()
}

/// Waits until each host has answered a request through nginx since `since`.
fn wait_all_used(rig: &Rig, since: f64) {
    for i in 0..rig.hosts.len() {
        let ip = rig.host_ip(i).to_string();
        wait_until(
            Duration::from_secs(10),
            &format!("host {i} to answer"),
            || answered_by(rig, &ip, since) > 0,
        );
    }
}

#[test]
fn a_killed_host_costs_only_the_posts_in_flight_on_it_and_is_used_again_once_restarted() {
    let mut rig = Rig::start("hosts-kill", 3, APP_ARGS, Frontend::default());
    let t0 = unix_now();
    let load = Load::start(rig.port(), false);
    wait_all_used(&rig, t0);
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    let killed_unix = unix_now();
    rig.hosts[0].kill_all();
    // The master and its workers are reaped: from here the host's sockets are closed.
    let dead_at = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    rig.start_host(0);
    let restarted = unix_now();
    let ip = rig.host_ip(0).to_string();
    // fail_timeout is 3 s: after it nginx tries the host again, and it answers.
    wait_until(
        Duration::from_secs(10),
        "the restarted host to answer",
        || answered_by(&rig, &ip, restarted) > 0,
    );
    let used_again = unix_now() - restarted;
    let outcomes = load.finish();
    let bad = failed(&outcomes);
    let in_flight = in_flight_at(&outcomes, killed_at);
    eprintln!(
        "kill: {} requests, {} failed ({:?}), {in_flight} in flight on all hosts at the kill; \
         host used again {used_again:.2} s after its restart",
        outcomes.len(),
        bad.len(),
        bad.iter().map(|o| (o.method, o.status)).collect::<Vec<_>>()
    );
    eprintln!(
        "kill: failed requests started at {:?} from the host's death",
        bad.iter()
            .map(|o| o.start.checked_duration_since(dead_at).unwrap_or_default())
            .collect::<Vec<_>>()
    );
    for o in &bad {
        // In flight while the host died (the kill takes the whole group, and the kernel
        // closes the sockets as each process goes), or written by nginx into a kept-alive
        // connection to it before nginx's event loop saw that connection close.
        assert!(
            o.start <= dead_at + DEATH_NOTICED && o.method == "POST",
            "only a POST sent to the host as it died may fail (nginx retries a GET), not {o:?}"
        );
    }
    let in_flight_dying = outcomes
        .iter()
        .filter(|o| o.start <= dead_at && o.start + o.took >= killed_at)
        .count();
    eprintln!(
        "kill: the host took {:?} to die; {in_flight_dying} requests in flight on all hosts meanwhile",
        dead_at - killed_at
    );
    assert!(
        bad.len() <= in_flight_dying,
        "no more failed than were in flight"
    );
    // Routed around: nothing the killed host answered while it was down.
    let down = access(&rig)
        .iter()
        .filter(|l| l.at > killed_unix + 0.05 && l.at < restarted)
        .filter(|l| l.tried.last().is_some_and(|t| *t == ip) && l.status == 200)
        .count();
    assert_eq!(down, 0, "no request was answered by the dead host");
    assert!(outcomes.len() > 100, "the load ran: {}", outcomes.len());
}

#[test]
fn a_drained_host_fails_no_request_and_gets_none_after_the_drain() {
    let rig = Rig::start("hosts-drain", 3, APP_ARGS, Frontend::default());
    let t0 = unix_now();
    let load = Load::start(rig.port(), true);
    wait_all_used(&rig, t0);
    std::thread::sleep(Duration::from_millis(500));
    let ip = rig.host_ip(1).to_string();
    let before = answered_by(&rig, &ip, t0);
    let drain_start = Instant::now();
    rig.hosts[1].signal(Signal::SIGTERM);
    assert!(
        rig.hosts[1].wait_exit(Duration::from_secs(20)),
        "the drained master exits"
    );
    let drained_in = drain_start.elapsed();
    let drained = unix_now();
    // Load keeps going on the two hosts left.
    std::thread::sleep(Duration::from_secs(1));
    let outcomes = load.finish();
    let bad = failed(&outcomes);
    let after = answered_by(&rig, &ip, drained);
    let refused = access(&rig)
        .iter()
        .filter(|l| l.at > drained && l.tried.len() > 1 && l.tried[0] == ip)
        .count();
    eprintln!(
        "drain: {} requests, {} failed ({:?}); the host answered {before} before the drain, \
         {after} after it; drained in {drained_in:?}; {refused} requests tried it after the \
         drain, were refused and went elsewhere",
        outcomes.len(),
        bad.len(),
        bad.iter().map(|o| (o.method, o.status)).collect::<Vec<_>>()
    );
    assert!(bad.is_empty(), "no request failed: {bad:?}");
    assert_eq!(
        after, 0,
        "the drained host answered nothing after its drain"
    );
    assert!(before > 0, "the host was used before the drain");
    assert!(
        rig.hosts[1].log().contains("listeners closed"),
        "the drain closed the listeners first"
    );
}

#[test]
fn a_rolling_upgrade_across_the_hosts_fails_no_request() {
    let rig = Rig::start("hosts-upgrade", 3, APP_ARGS, Frontend::default());
    let t0 = unix_now();
    let load = Load::start(rig.port(), true);
    wait_all_used(&rig, t0);
    for (i, host) in rig.hosts.iter().enumerate() {
        let old: Vec<i32> = worker_pids(host.pid());
        host.signal(Signal::SIGUSR2);
        wait_until(
            Duration::from_secs(20),
            &format!("host {i} to upgrade"),
            || {
                let now = worker_pids(host.pid());
                now.len() == 2 && now.iter().all(|p| !old.contains(p))
            },
        );
        // Serving on the new generation before the next host goes.
        let since = unix_now();
        let ip = rig.host_ip(i).to_string();
        wait_until(
            Duration::from_secs(10),
            "the upgraded host to answer",
            || answered_by(&rig, &ip, since) > 0,
        );
    }
    let outcomes = load.finish();
    let bad = failed(&outcomes);
    eprintln!(
        "rolling upgrade: {} requests, {} failed",
        outcomes.len(),
        bad.len()
    );
    assert!(bad.is_empty(), "no request failed: {bad:?}");
    assert!(outcomes.len() > 100, "the load ran: {}", outcomes.len());
}

#[test]
fn a_host_whose_network_is_cut_is_routed_around_within_nginx_timeouts() {
    let frontend = Frontend {
        connect_timeout: "500ms",
        read_timeout: "2s",
        fail_timeout: "10s",
    };
    let (connect, read) = (Duration::from_millis(500), Duration::from_secs(2));
    let rig = Rig::start("hosts-cut", 3, APP_ARGS, frontend);
    let t0 = unix_now();
    let load = Load::start(rig.port(), true);
    wait_all_used(&rig, t0);
    std::thread::sleep(Duration::from_millis(500));
    let cut = Instant::now();
    rig.set_link(2, false);
    std::thread::sleep(Duration::from_secs(4));
    let outcomes = load.finish();
    rig.set_link(2, true);
    let bad = failed(&outcomes);
    let in_flight = in_flight_at(&outcomes, cut);
    // Past the first failure nginx knows (a read timeout at the latest), the host is out.
    let settled = cut + read + Duration::from_millis(500);
    let slowest_after = outcomes
        .iter()
        .filter(|o| o.start > settled)
        .map(|o| o.took)
        .max()
        .unwrap_or_default();
    let slowest_gets = outcomes
        .iter()
        .filter(|o| o.start > cut && o.method == "GET")
        .map(|o| o.took)
        .max()
        .unwrap_or_default();
    eprintln!(
        "cut: {} requests, {} failed ({:?}), {in_flight} in flight at the cut; slowest GET \
         after the cut {slowest_gets:?}, slowest request once settled {slowest_after:?}",
        outcomes.len(),
        bad.len(),
        bad.iter()
            .map(|o| (o.method, o.path, o.status, o.start.duration_since(cut)))
            .collect::<Vec<_>>()
    );
    for o in &bad {
        // A POST sent to the cut host (in flight, or on a kept-alive connection nginx picked
        // before it knew) ends at the read timeout; nginx does not resend it.
        assert!(
            o.method == "POST" && o.status == 504 && o.start <= settled,
            "only a POST sent to the cut host before nginx knew may fail: {o:?}"
        );
    }
    assert!(
        slowest_gets <= connect + read + read + Duration::from_secs(2),
        "a GET fails over within nginx's timeouts: {slowest_gets:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.start > settled && o.status == 200),
        "the load goes on on the other hosts"
    );
    // Once nginx has seen the host fail, nothing is written to it: nothing waits a read timeout.
    assert!(
        slowest_after < read,
        "no request waits for the cut host once nginx knows: {slowest_after:?}"
    );
}
